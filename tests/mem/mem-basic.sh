#!/bin/bash
# Lazy fault-in, stores, persist, pwrite/pread coherence, background
# writeback, read-only mapping; both dirty-tracking paths; qcow2 and raw.
# Every qemu-io run must open the image, exit 0 and report no mismatch.
. "$(dirname "$0")/lib.sh"
for mode in async sync; do
    have_mode $mode || continue
    img=$T/b-$mode.qcow2
    qemu-img create -q -f qcow2 "$img" 64M || fail "qemu-img create"
    qio "$img" "write -P 0x5a 1M 1M"
    "$MEMTEST" basic "$img" $mode || fail "basic $mode (exit $?)"
    qio "$img" "read -P 0x11 4M 256K" "read -P 0x22 5242980 8192" "read -P 0 5242976 4" \
        "read -P 0x44 7M 64K" "read -P 0 1M 4k" "read -P 0x5a 1052672 1044480" \
        "read -P 0x33 6M 12K" "read -P 0 8M 56M"
    check_img "$img"
    echo "basic $mode: ok"
done
# raw image, and the read-only mapping
if have_mode auto; then
    raw=$T/r.raw
    truncate -s 64M "$raw"
    qio_f raw "$raw" "write -P 0x5a 1M 1M"
    "$MEMTEST" basic "$raw" auto || fail "basic raw (exit $?)"
    qio_f raw "$raw" "read -P 0x11 4M 256K" "read -P 0x22 5242980 8192" "read -P 0 1M 4k" \
        "read -P 0x44 7M 64K" "read -P 0x5a 1052672 1044480" \
        "read -P 0x33 6M 12K" "read -P 0 8M 56M"
fi
if have_mode auto; then   # ro + prefetch (a writable open)
    img=$T/ro.qcow2
    qemu-img create -q -f qcow2 "$img" 16M || fail "qemu-img create"
    qio "$img" "write -P 0x5a 1M 1M"
    "$MEMTEST" ro "$img" || fail "read-only (exit $?)"
    "$MEMTEST" prefetch "$img" || fail "prefetch (exit $?)"
    check_img "$img"
fi
finish
