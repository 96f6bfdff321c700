#!/bin/bash
# Lazy fault-in, stores, persist, pwrite/pread coherence, background
# writeback, read-only mapping; both dirty-tracking paths; qcow2 and raw.
. "$(dirname "$0")/lib.sh"
for mode in async sync; do
    img=$T/b-$mode.qcow2
    qemu-img create -q -f qcow2 "$img" 64M
    qemu-io -f qcow2 -c "write -P 0x5a 1M 1M" "$img" >/dev/null
    "$MEMTEST" basic "$img" $mode; rc=$?
    [ $rc = 77 ] && { echo "SKIP $mode"; continue; }
    [ $rc = 0 ] || fail "basic $mode"
    qio "$img" "read -P 0x11 4M 256K" "read -P 0x22 5242980 8192" "read -P 0 5242976 4" \
        "read -P 0x44 7M 64K" "read -P 0 1M 4k" "read -P 0x5a 1052672 1044480" \
        "read -P 0x33 6M 12K" "read -P 0 8M 56M"
    check_img "$img"
    echo "basic $mode: ok"
done
# raw image, and the read-only mapping
raw=$T/r.raw
truncate -s 64M "$raw"
qemu-io -f raw -c "write -P 0x5a 1M 1M" "$raw" >/dev/null
"$MEMTEST" basic "$raw" auto || fail "basic raw"
qemu-io -f raw -c "read -P 0x11 4M 256K" "$raw" | grep -q "verification failed" && fail "raw persist"
img=$T/ro.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c "write -P 0x5a 1M 1M" "$img" >/dev/null
"$MEMTEST" ro "$img" || fail "read-only"
"$MEMTEST" prefetch "$img" || fail "prefetch"
echo ok
