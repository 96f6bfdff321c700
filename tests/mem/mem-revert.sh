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
    # reverts that meet a writeback round mid-way (mem-test.c t_revert_wb)
    w=$T/w-$mode.qcow2
    qemu-img create -q -f qcow2 "$w" 64M || fail "qemu-img create"
    qio "$w" "write -P 0x11 0 64M"
    "$MEMTEST" revert-wb "$w" $mode || fail "revert-wb $mode (exit $?)"
    check_img "$w"
    qio "$w" "read -P 0x11 0 64M"
    echo "reverts meeting the writeback $mode: ok"
done
finish
