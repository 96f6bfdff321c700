#!/bin/bash
# Memory cap: an 8 GiB sparse image, 64 MiB cap, 256 MiB of random stores
# (64 KiB blocks), then a 64 GiB image with a 1 GiB cap, then one under a
# 256 MiB cap with external snapshots every second; RSS (RssAnon from /proc)
# must stay near the cap and all data must come back (evicted pages fault in
# again from the image).
. "$(dirname "$0")/lib.sh"
img=$T/cap.qcow2
qemu-img create -q -f qcow2 "$img" 8G
slack=64
# sanitizer builds carry allocator/shadow overhead
[ -n "${ASAN_OPTIONS:-}" ] && slack=192
for mode in async sync; do
    have_mode $mode || continue
    PMS_CAP_SLACK_MB=$slack "$MEMTEST" cap "$img" $mode 64 $([ $mode = async ] && echo 256 || echo 128) ||
        fail "cap $mode (exit $?)"
done
[ "$NRAN" -gt 0 ] && check_img "$img"
# the smallest cap pms_map accepts: stores keep making progress (a generous
# bound: before the dirty limit's floor this took minutes)
for mode in async sync; do
    have_mode $mode || continue
    t=$T/tiny-$mode.qcow2
    qemu-img create -q -f qcow2 "$t" 16M
    timeout 60 "$MEMTEST" tinycap "$t" $mode || fail "tinycap $mode (exit $?; 124 = still storing after 60 s)"
    check_img "$t"
    cmds=(); for i in 0 1 2 3 4 5 6 7; do cmds+=("read -P $((0x60 + i)) ${i}M 1M"); done
    qio "$t" "${cmds[@]}"
done
# The issue's scale: a 64 GiB sparse image, 1 GiB cap, 1.5 GiB of random
# stores (about 30 s; the normal build only, the sanitizer build runs the
# small case above)
avail_kb=$(df -Pk "$T" | awk 'NR == 2 { print $4 }')
if [ -n "${PMS_SANITIZED:-}" ]; then
    :
elif [ "$NRAN" = 0 ]; then
    :
elif [ "${avail_kb:-0}" -lt $((4 << 20)) ]; then
    echo "skip: the 64 GiB case writes 1.5 GiB and needs 4 GiB free in $T (${avail_kb:-?} KiB free)"
else
    big=$T/big.qcow2
    qemu-img create -q -f qcow2 "$big" 64G
    have_mode auto || fail "auto mode unavailable although a dirty-tracking mode ran"
    PMS_CAP_SLACK_MB=$slack "$MEMTEST" cap "$big" auto 1024 1536 || fail "cap 64 GiB / 1 GiB (exit $?)"
    check_img "$big"
    rm -f "$big"
    # The same kind of image under a 256 MiB cap with an external snapshot
    # every second, three kept: the layers' metadata caches and the
    # deletes' merges count against the cap too (RSS within 10% of it)
    qemu-img create -q -f qcow2 "$big" 64G
    "$MEMTEST" capsnap "$big" auto 256 8 || fail "cap 256 MiB with snapshots (exit $?)"
    check_img "$big"
    for l in "$big"@*; do check_img "$l"; done
    rm -f "$big" "$big"@*
fi
finish
