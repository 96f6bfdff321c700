#!/bin/bash
# Atomic live snapshots: writer threads keep storing an increasing sequence
# into their own slots (one slot per page) while snapshots are taken; each
# snapshot, read back by qemu-img (convert -l snapshot.name=...), must show
# for every thread a prefix (n..n, n-1..n-1) and totals must not go back.
. "$(dirname "$0")/lib.sh"
NT=4; NS=6
for mode in async sync; do
    have_mode $mode || continue
    img=$T/a-$mode.qcow2
    qemu-img create -q -f qcow2 "$img" 64M || fail "qemu-img create"
    "$MEMTEST" atomic "$img" $mode $NT $NS || fail "atomic $mode (exit $?)"
    check_img "$img"
    qemu-img snapshot -l "$img" | grep -c "^[0-9]" | grep -qx $NS || fail "snapshot count"
    prev=0
    for s in $(seq 0 $((NS - 1))); do
        qemu-img convert -f qcow2 -O raw -l snapshot.name=s$s "$img" "$T/s.raw" ||
            fail "convert s$s"
        tot=$("$MEMTEST" verify "$T/s.raw" $NT) || fail "$mode snapshot s$s not atomic"
        [ "$tot" -ge "$prev" ] || fail "snapshot s$s went back in time ($tot < $prev)"
        prev=$tot
    done
    # and via qemu-img snapshot -a on a copy + qemu-io of the marker pages
    cp "$img" "$T/copy.qcow2"
    qemu-img snapshot -a s2 "$T/copy.qcow2" || fail "snapshot -a"
    off=$(( (NT * 64 + 16) * 4096 ))
    qio "$T/copy.qcow2" "read -P 2 $off 1"
    echo "atomic $mode: $NS snapshots consistent"
done
# a thread that blocks the stop signal: refused cleanly, QUIESCED still works
if have_mode auto; then
    img=$T/blk.qcow2
    qemu-img create -q -f qcow2 "$img" 16M || fail "qemu-img create"
    "$MEMTEST" blocked "$img" || fail "blocked-signal writer (exit $?)"
    qemu-img snapshot -l "$img" >"$T/snl" 2>&1 || fail "qemu-img snapshot -l: $(cat "$T/snl")"
    grep -q quiesced "$T/snl" || fail "quiesced snapshot missing"
    grep -q " live " "$T/snl" && fail "refused snapshot exists"
    check_img "$img"
fi
finish
