#!/bin/bash
# Atomic live snapshots: writer threads keep storing an increasing sequence
# into their own slots (one slot per page) while snapshots are taken; each
# snapshot, read back by qemu-img (convert -l snapshot.name=...), must show
# for every thread a prefix (n..n, n-1..n-1) and totals must not go back.
. "$(dirname "$0")/lib.sh"
NT=4; NS=6
# MODE KIND STATE: the image empty, or full (every cluster written by
# qemu-io and shared with a qemu-img snapshot "base": copy-on-write of
# whole clusters, or of subclusters in an external snapshot's overlay;
# zero bytes written as data, so that a counter slot nobody wrote yet
# reads 0)
# "big": an 8 GiB sparse image with the slots spread over all of it
# (MEM_ATOMIC_STRIDE pages apart): the cut's scans and runs over a large
# range (each writer's slots span it, so a part the cut missed fails the
# prefix check)
for cfg in "async internal empty" "sync internal empty" "auto internal full" \
           "auto external full" "sync external empty" "async external big"; do
    read -r mode kind state <<<"$cfg"
    have_mode $mode || continue
    img=$T/a-$mode-$kind-$state.qcow2
    size=64M stride=1
    [ $state = big ] && size=8G stride=$(( (8 << 30) / 4096 / (NT * 64) ))
    export MEM_ATOMIC_STRIDE=$stride
    qemu-img create -q -f qcow2 "$img" $size || fail "qemu-img create"
    base=0
    if [ $state = full ]; then
        qemu-io -f qcow2 -c "write -P 0 0 64M" "$img" >/dev/null || fail "fill"
        qemu-img snapshot -c base "$img" || fail "snapshot base"
        base=1
    fi
    MEM_SNAP_KIND=$kind "$MEMTEST" atomic "$img" $mode $NT $NS || fail "atomic $cfg (exit $?)"
    check_img "$img"
    if [ $kind = external ]; then
        for l in "$img"@*; do check_img "$l"; done
        qemu-img snapshot -l "$img" | grep -c "^[0-9]" | grep -qx 0 || fail "internal snapshots in the overlay"
        [ "$(ls "$img"@* | wc -l)" = $NS ] || fail "layer count"
    else
        qemu-img snapshot -l "$img" | grep -c "^[0-9]" | grep -qx $((NS + base)) || fail "snapshot count"
    fi
    prev=0
    for s in $(seq 0 $((NS - 1))); do
        if [ $kind = external ]; then
            qemu-img convert -f qcow2 -O raw "$img@s$s" "$T/s.raw" || fail "convert layer s$s"
        else
            qemu-img convert -f qcow2 -O raw -l snapshot.name=s$s "$img" "$T/s.raw" ||
                fail "convert s$s"
        fi
        tot=$("$MEMTEST" verify "$T/s.raw" $NT) || fail "$cfg: snapshot s$s not atomic"
        [ "$tot" -ge "$prev" ] || fail "snapshot s$s went back in time ($tot < $prev)"
        prev=$tot
    done
    # the marker pages of snapshot 2, read by qemu-io (internal: applied to
    # a copy with qemu-img snapshot -a; external: the layer itself)
    off=$(( (NT * 64 + 16) * 4096 ))
    if [ $kind = external ]; then
        qio "$img@s2" "read -P 2 $off 1"
    else
        cp "$img" "$T/copy.qcow2"
        qemu-img snapshot -a s2 "$T/copy.qcow2" || fail "snapshot -a"
        qio "$T/copy.qcow2" "read -P 2 $off 1"
    fi
    [ $state = full ] && qio "$img" "read -P 0 63M 1M"
    echo "atomic $cfg: $NS snapshots consistent"
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
