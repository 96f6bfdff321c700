#!/bin/bash
# kill -9 of the daemon after a client's fsync (write(2)) and msync (a
# shared mapping): what was made durable is in the image, qemu-img check
# finds no corruption.  The second round runs with --writeback-cache.
. "$SRCDIR/serve/lib.sh"
img=$T/d.qcow2
qemu-img create -q -f qcow2 "$img" 64M
for round in 1 2; do
    # round 2 with the kernel's writeback cache: write(2) is cached too
    if [ $round = 2 ]; then start "$img" d --writeback-cache; else start "$img" d; fi
    F=$T/d.file
    [ "$(stat -c %s "$F")" = 67108864 ] || fail "round $round: size $(stat -c %s "$F")"
    b=$(printf '%02x' $((0x50 + round)))
    head -c 4M /dev/zero | tr '\0' "\\$(printf '%03o' $((0x50 + round)))" |
        dd of="$F" bs=1M seek=1 conv=notrunc,fsync status=none || fail "dd"
    "$SERVETEST" fill "$F" 16M 1M $((0x60 + round)) msync || fail "mmap fill + msync"
    "$P" snapshot -c "r$round" --socket "$T/d.sock" || fail "snapshot"
    kill -9 "$PID_d"
    for _ in $(seq 50); do [ -e "/proc/$PID_d" ] || break; sleep 0.1; done
    [ -e "/proc/$PID_d" ] && fail "the daemon did not die from kill -9"
    if [ $round = 1 ]; then   # the dead mount: a new daemon says what to do
        "$P" serve "$img" --fuse "$F" --socket "$T/d2.sock" 2>"$T/dead.err" && fail "served over a dead mount"
        grep -q "umount -l" "$T/dead.err" || fail "dead mount: $(cat "$T/dead.err")"
    fi
    unmount_ours
    check_img "$img" leaks-ok
    qio "$img" "read -P 0x$b 1M 4M" "read -P 0x$(printf '%02x' $((0x60 + round))) 16M 1M"
    qemu-img snapshot -l "$img" | grep -q " r$round " || fail "snapshot r$round lost"
    rm -f "$F"
    ok "round $round: fsynced and msynced data and the snapshot survive kill -9"
done
qemu-img check -r leaks -q "$img" >/dev/null 2>&1
check_img "$img"
echo "serve-durable: all passed"
