#!/bin/bash
# Live snapshots while io_uring kernel threads (iou-wrk, iou-sqp), which
# never run signal handlers, move data into and out of the mapping
# (sp-iouring.c): every snapshot must succeed; snapshot k holds the marker
# blocks 0..k read by io_uring before it and none after (qemu-io on the
# snapshot converted by qemu-img); snapshot "final" and the image after
# unmap equal the dump of the mapping (qemu-img compare); qemu-img check
# finds nothing, leaks included.
. "$(dirname "$0")/lib.sh"
SPIOURING=${SPIOURING:-$(dirname "$MEMTEST")/sp-iouring}
NS=6
MARK=$((8 << 20)); BLK=$((64 << 10))
for mode in async sync; do
    img=$T/u-$mode.qcow2
    rm -f "$T"/*.raw
    qemu-img create -q -f qcow2 "$img" 16M
    rc=0; "$SPIOURING" "$img" $mode $NS "$T" || rc=$?
    [ $rc = 77 ] && { echo "SKIP $mode"; continue; }
    [ $rc = 0 ] || fail "sp-iouring $mode exit $rc"
    out=$(qemu-img check "$img" 2>&1) || fail "qemu-img check: $out"
    n=$(qemu-img snapshot -l "$img" | grep -c '^[0-9]')
    [ "$n" = $((NS + 1)) ] || fail "$mode: $n snapshots, want $((NS + 1))"
    for k in $(seq 0 $((NS - 1))); do
        qemu-img convert -f qcow2 -O raw -l snapshot.name=s$k "$img" "$T/s.raw" ||
            fail "convert s$k"
        cmds=()
        for j in $(seq 0 $((NS - 1))); do
            p=$((j + 1)); [ $j -gt $k ] && p=0
            cmds+=(-c "read -P $p $((MARK + j * BLK)) $BLK")
        done
        out=$(qemu-io -f raw "${cmds[@]}" "$T/s.raw" 2>&1) || fail "qemu-io: $out"
        grep -qi "fail\|error" <<<"$out" && fail "$mode snapshot s$k markers: $out"
    done
    qemu-img convert -f qcow2 -O raw -l snapshot.name=final "$img" "$T/final.raw" ||
        fail "convert final"
    qemu-img compare -q -f raw -F raw "$T/final.raw" "$T/mem.raw" ||
        fail "$mode: snapshot final differs from memory"
    qemu-img compare -q -f qcow2 -F raw "$img" "$T/mem.raw" ||
        fail "$mode: image after unmap differs from memory"
    echo "$mode: $NS snapshots and final match (qemu-img, qemu-io)"
done
echo ok
