#!/bin/bash
# Revert while mapped: dirty pages are discarded, resident pages dropped and
# faulted back from the reverted image; a revert to a snapshot with data
# where the mapping had learnt the image reads zeroes shows the data.
. "$(dirname "$0")/lib.sh"
for mode in async sync; do
    have_mode $mode || continue
    img=$T/v-$mode.qcow2
    qemu-img create -q -f qcow2 "$img" 32M || fail "qemu-img create"
    "$MEMTEST" revert "$img" $mode || fail "revert $mode (exit $?)"
    check_img "$img"
    qio "$img" "read -P 0xa1 0 2M" "read -P 0 3M 1M" "read -P 0xc3 5M 64K"
    cp "$img" "$T/copy.qcow2"
    qemu-img snapshot -a A "$T/copy.qcow2" || fail "qemu-img snapshot -a A"
    qio "$T/copy.qcow2" "read -P 0xa1 0 2M" "read -P 0 2M 3M"
    echo "revert $mode: ok"
    z=$T/z-$mode.qcow2
    qemu-img create -q -f qcow2 "$z" 32M || fail "qemu-img create"
    "$MEMTEST" revert-zero "$z" $mode || fail "revert-zero $mode (exit $?)"
    check_img "$z"
    qio "$z" "read -P 0x5a 8256K 64K"
    echo "revert to data over known zeroes $mode: ok"
done
finish
