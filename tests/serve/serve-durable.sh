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

# helper_of PID: the pid of PID's write-back helper child (pms-flusher)
helper_of() {
    local f st
    for f in /proc/[0-9]*/stat; do
        st=$(cat "$f" 2>/dev/null) || continue
        case $st in *" (pms-flusher) "[!Z]" $1 "*) echo "${st%% *}"; return 0 ;; esac
    done
    return 1
}
# dead() PID: gone, or a zombie (exited; its reaper is init)
dead() { [ ! -e "/proc/$1" ] || [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" = Z ]; }

# The write-back helper (a child process that writes the page cache back
# for snapshots and flushes): killed, the next snapshot starts a new one
start "$img" h
hp=$(helper_of "$PID_h") || fail "no write-back helper process"
"$SERVETEST" fill "$T/h.file" 20M 1M 0x71 || fail "mmap fill"
kill -9 "$hp"
"$P" snapshot -c h1 --socket "$T/h.sock" || fail "snapshot after the helper was killed"
hp2=$(helper_of "$PID_h") || fail "the helper was not started again"
[ "$hp2" != "$hp" ] || fail "the same helper pid"
kill "$PID_h"
for _ in $(seq 100); do dead "$PID_h" && break; sleep 0.1; done
dead "$PID_h" || fail "the daemon did not stop on SIGTERM"
qemu-img convert -O raw -l snapshot.name=h1 "$img" "$T/h1.raw" || fail "convert h1"
cmp -n 1048576 -i 20971520:0 "$T/h1.raw" <(head -c 1M /dev/zero | tr '\0' '\161') ||
    fail "snapshot h1 lacks the mapped stores (no msync) made before it"
rm -f "$T/h1.raw"
ok "a killed write-back helper is replaced; the snapshot holds every mapped store"

# kill -9 while a snapshot writes back a page cache that a writer keeps
# dirtying: the daemon and its helper die (nothing waits on the dead daemon)
qemu-img create -q -f qcow2 "$T/k.qcow2" 256M
start "$T/k.qcow2" k
hp=$(helper_of "$PID_k") || fail "no write-back helper process"
coproc W { exec "$SERVETEST" writer "$T/k.file" 256M; }
read -r line <&"${W[0]}"
[ "$line" = ready ] || fail "writer: $line"
"$P" snapshot -c k1 --socket "$T/k.sock" >/dev/null 2>&1 & sp=$!
sleep 0.2
kill -9 "$PID_k"
for _ in $(seq 100); do dead "$PID_k" && break; sleep 0.1; done
dead "$PID_k" || fail "the daemon did not die from kill -9 during a snapshot"
for _ in $(seq 100); do dead "$hp" && break; sleep 0.1; done
dead "$hp" || fail "the write-back helper outlived the killed daemon"
unmount_ours
kill -9 "$W_PID" "$sp" 2>/dev/null
wait "$sp" 2>/dev/null
check_img "$T/k.qcow2" leaks-ok
ok "kill -9 during a snapshot of a busy mapping: daemon and helper gone"
echo "serve-durable: all passed"
