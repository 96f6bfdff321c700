#!/bin/bash
# Revert while mapped: dirty pages are discarded, resident pages dropped and
# faulted back from the reverted image.
. "$(dirname "$0")/lib.sh"
for mode in async sync; do
    img=$T/v-$mode.qcow2
    qemu-img create -q -f qcow2 "$img" 32M
    "$MEMTEST" revert "$img" $mode; rc=$?
    [ $rc = 77 ] && { echo "SKIP $mode"; continue; }
    [ $rc = 0 ] || fail "revert $mode"
    check_img "$img"
    qio "$img" "read -P 0xa1 0 2M" "read -P 0 3M 1M" "read -P 0xc3 5M 64K"
    cp "$img" "$T/copy.qcow2"
    qemu-img snapshot -a A "$T/copy.qcow2"
    qio "$T/copy.qcow2" "read -P 0xa1 0 2M" "read -P 0 2M 3M"
    echo "revert $mode: ok"
done
echo ok
