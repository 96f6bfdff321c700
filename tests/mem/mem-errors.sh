#!/bin/bash
# I/O error during fault-in: the touching thread gets SIGBUS, the error is
# readable through pms_stats; the rest of the mapping keeps working.
. "$(dirname "$0")/lib.sh"
have_mode auto || { echo "SKIP: no userfaultfd write protection"; exit 77; }
img=$T/e.qcow2
qemu-img create -q -f qcow2 "$img" 16M || fail "qemu-img create"
qio "$img" "write -P 0x5a 0 8M"
# host offset of guest offset 2M (injected errors are on the file)
host=$(host_offset "$img" 2097152)
[ -n "$host" ] || fail "no host offset"
"$MEMTEST" sigbus "$img" 2097152 "$host" || fail "sigbus (exit $?)"

# A write-back that fails (the image file may not grow: a full disk) keeps
# the pages dirty; once it may grow, persist writes every byte.
for mode in async sync; do
    have_mode $mode || continue
    w=$T/w-$mode.qcow2
    qemu-img create -q -f qcow2 "$w" 16M || fail "qemu-img create"
    "$MEMTEST" wberr "$w" $mode || fail "wberr $mode (exit $?)"
    cmds=()
    for i in 0 1 2 3 4 5 6 7; do
        cmds+=("read -P $((0x40 + i)) $(((1 + i) << 20)) 1M")
    done
    qio "$w" "${cmds[@]}"       # fails on lost data (a failed write-back)
    check_img "$w"
done
finish
