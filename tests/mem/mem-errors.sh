#!/bin/bash
# I/O error during fault-in: the touching thread gets SIGBUS, the error is
# readable through pms_stats; the rest of the mapping keeps working.
. "$(dirname "$0")/lib.sh"
img=$T/e.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c "write -P 0x5a 0 8M" "$img" >/dev/null
# host offset of guest offset 2M (injected errors are on the file)
host=$(qemu-img map --output=json -f qcow2 "$img" | python3 -c '
import json,sys
for e in json.load(sys.stdin):
    if e["start"] <= 2097152 < e["start"] + e["length"] and e.get("offset") is not None:
        print(e["offset"] + 2097152 - e["start"]); break')
[ -n "$host" ] || fail "no host offset"
"$MEMTEST" sigbus "$img" 2097152 "$host" || fail sigbus

# A write-back that fails (the image file may not grow: a full disk) keeps
# the pages dirty; once it may grow, persist writes every byte.
for mode in async sync; do
    w=$T/w-$mode.qcow2
    qemu-img create -q -f qcow2 "$w" 16M
    rc=0
    "$MEMTEST" wberr "$w" $mode || rc=$?
    [ $rc = 77 ] && { echo "SKIP wberr $mode"; continue; }
    [ $rc = 0 ] || fail "wberr $mode"
    cmds=()
    for i in 0 1 2 3 4 5 6 7; do
        cmds+=(-c "read -P $((0x40 + i)) $(((1 + i) << 20)) 1M")
    done
    out=$(qemu-io -f qcow2 "${cmds[@]}" "$w" 2>&1)
    grep -qi "fail\|error" <<<"$out" && fail "wberr $mode: data lost after a failed write-back: $out"
    check_img "$w"
done
echo ok
