#!/bin/bash
# Memory cap: an 8 GiB sparse image, 64 MiB cap, 256 MiB of random stores
# (64 KiB blocks; bench/20-mem.sh runs 256 MiB / 1 GiB); RSS (RssAnon from /proc) must stay near the cap and all
# data must come back (evicted pages fault in again from the image).
. "$(dirname "$0")/lib.sh"
img=$T/cap.qcow2
qemu-img create -q -f qcow2 "$img" 8G
slack=64
# sanitizer builds carry allocator/shadow overhead
[ -n "${ASAN_OPTIONS:-}" ] && slack=192
for mode in async sync; do
    PMS_CAP_SLACK_MB=$slack "$MEMTEST" cap "$img" $mode 64 $([ $mode = async ] && echo 256 || echo 128)
    rc=$?
    [ $rc = 77 ] && { echo "SKIP $mode"; continue; }
    [ $rc = 0 ] || fail "cap $mode"
done
check_img "$img"
echo ok
