#!/bin/bash
# The image's file system fills up while a mapping writes back (held.c):
# the stores are held in the daemon, msync/fsync and snapshots fail with
# ENOSPC while they are, reads of the file show them, and once there is
# room an fsync stores them all (qemu-io reads every page) and a snapshot
# has them.  Before held writes, the kernel marked those pages clean, a
# later fsync returned 0 and 7 of every 8 pages never reached the image.
# The file system is a small tmpfs (needs root, else the test skips).
. "$SRCDIR/serve/lib.sh"
mkdir "$T/m"
mount -t tmpfs -o size=32m tmpfs "$T/m" 2>/dev/null ||
    { echo "SKIP: cannot mount a tmpfs (needs root) for a full file system"; exit 77; }
trap 'for p in "${DAEMONS[@]}"; do kill -9 "$p" 2>/dev/null; done; unmount_ours; umount "$T/m"; rm -rf "$T"' EXIT
img=$T/m/a.qcow2
qemu-img create -q -f qcow2 "$img" 64M
# about 1 MiB left: the first 8 MiB of stores cannot all be stored
fallocate -l $(( $(df -B1 --output=avail "$T/m" | tail -1) - (1 << 20) )) "$T/m/filler" || fail "fallocate"
start "$img" e
F=$T/e.file
cat > "$T/mm.py" <<'PY'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 16 << 20, mmap.MAP_SHARED)
m[8 << 20:16 << 20] = bytes([int(sys.argv[2], 0)]) * (8 << 20)
try:
    m.flush(); print("msync ok")
except OSError as e:
    print("msync", e.strerror)
PY
out=$(python3 "$T/mm.py" "$F" 0x77)
[ "$out" = "msync No space left on device" ] || fail "msync on a full disk: '$out'"
held=$(qmp "$T/e.sock" '{"execute":"query-stats"}' | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["return"]["held-write-bytes"])')
[ "$held" -gt 0 ] || fail "nothing held after the failed write-back"
ok "msync on a full disk: ENOSPC, $held bytes held in the daemon"
grep -q "writes are held" "$T/e.log" || fail "the log does not say writes are held: $(cat "$T/e.log")"
python3 -c "import os,sys; os.fsync(os.open(sys.argv[1], os.O_RDWR))" "$F" 2>/dev/null &&
    fail "fsync succeeded while writes are held"
"$P" snapshot -c full --socket "$T/e.sock" 2>"$T/snap.err" && fail "snapshot succeeded without the held writes"
grep -q "No space left on device" "$T/snap.err" || fail "snapshot error: $(cat "$T/snap.err")"
qemu-img snapshot -U -l "$img" | grep -q " full " && fail "a refused snapshot is listed"
ok "fsync and snapshot fail while writes are held: $(cat "$T/snap.err")"
# a read of the file past the page cache (O_DIRECT is not needed: drop it)
echo 1 > /proc/sys/vm/drop_caches 2>/dev/null
n=$(python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); d=os.pread(fd, 8<<20, 8<<20); print(sum(1 for i in range(0,len(d),4096) if d[i:i+4096]==b'\x77'*4096))" "$F")
[ "$n" = 2048 ] || fail "the file shows $n of 2048 stored pages while they are held"
rm -f "$T/m/filler"                                  # room again
python3 -c "import os,sys; os.fsync(os.open(sys.argv[1], os.O_RDWR))" "$F" || fail "fsync after freeing space"
qio_ro "$img" "read -P 0x77 8M 8M"
"$P" snapshot -c after --socket "$T/e.sock" || fail "snapshot after freeing space"
ok "after freeing space: fsync stores every held page, the snapshot has them"
held=$(qmp "$T/e.sock" '{"execute":"query-stats"}' | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["return"]["held-write-bytes"])')
[ "$held" = 0 ] || fail "$held bytes still held"
stop e
check_img "$img"
qemu-img convert -f qcow2 -O raw -l snapshot.name=after "$img" "$T/after.raw" 2>/dev/null ||
    qemu-img convert -f qcow2 -O raw -s after "$img" "$T/after.raw"
python3 -c "import sys; d=open(sys.argv[1],'rb').read()[8<<20:16<<20]; sys.exit(0 if d == b'\x77'*(8<<20) else 1)" "$T/after.raw" ||
    fail "snapshot 'after' lacks the stores"
# A file-size limit on the daemon (ulimit -f): writes past it fail with
# EFBIG (pmemsnap ignores SIGXFSZ); the daemon keeps serving and quits clean
img2=$T/l.qcow2
qemu-img create -q -f qcow2 "$img2" 64M
(ulimit -f 4096; start "$img2" l) || fail "serve under ulimit -f"
python3 - "$T/l.file" <<'PY' || fail "writes under the daemon's file-size limit"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
try:
    n = os.pwrite(fd, b'x' * (8 << 20), 0)
    os.fsync(fd)
    print("wrote", n)
except OSError as e:
    print("error:", e.strerror)
PY
PID_l=$(cat "$T/l.pid"); DAEMONS+=("$PID_l")
kill -0 "$PID_l" 2>/dev/null || fail "the daemon died under its file-size limit (SIGXFSZ?)"
"$P" stats --socket "$T/l.sock" >/dev/null || fail "the daemon stopped serving after EFBIG"
stop l
qemu-img check "$img2" >/dev/null 2>&1; rc=$?
[ $rc = 0 ] || [ $rc = 3 ] || fail "qemu-img check exit $rc after the file-size limit"
ok "a file-size limit on the daemon: the write fails, the daemon keeps serving"
# Shutdown while writes are held: the daemon keeps serving and retries
# them, exits once they are stored; a second signal gives them up (and
# says so).  Before, SIGTERM retried once and dropped them.
for mode in store abandon; do
    img3=$T/m/s-$mode.qcow2                  # fresh: every store allocates
    qemu-img create -q -f qcow2 "$img3" 64M
    fallocate -l $(( $(df -B1 --output=avail "$T/m" | tail -1) - (1 << 20) )) "$T/m/filler" || fail "fallocate"
    start "$img3" s
    out=$(python3 "$T/mm.py" "$T/s.file" 0x5a)
    [ "$out" = "msync No space left on device" ] || fail "$mode: msync on a full disk: '$out'"
    kill -TERM "$PID_s"
    sleep 2
    kill -0 "$PID_s" 2>/dev/null || fail "$mode: the daemon exited with writes held: $(tail -2 "$T/s.log")"
    grep -q "writes are held.*still serving" "$T/s.log" || fail "$mode: log: $(tail -2 "$T/s.log")"
    "$P" stats --socket "$T/s.sock" | grep -q "held-write-bytes: [1-9]" ||
        fail "$mode: stats while the shutdown waits: $("$P" stats --socket "$T/s.sock" 2>&1 | grep held)"
    if [ $mode = store ]; then
        rm -f "$T/m/filler"
    else
        kill -TERM "$PID_s"
    fi
    for _ in $(seq 100); do kill -0 "$PID_s" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$PID_s" 2>/dev/null && fail "$mode: the daemon did not exit"
    if [ $mode = store ]; then
        grep -q "held writes are stored" "$T/s.log" || fail "store: log: $(tail -2 "$T/s.log")"
        qio_ro "$img3" "read -P 0x5a 8M 8M"
        ok "SIGTERM with writes held: still serving until there is room, then every page stored"
    else
        grep -q "could not be stored.*lost" "$T/s.log" || fail "abandon: log: $(tail -2 "$T/s.log")"
        ok "a second SIGTERM gives the held writes up, and the log says how many bytes were lost"
        rm -f "$T/m/filler"
    fi
    qemu-img check "$img3" >/dev/null 2>&1; rc=$?
    [ $rc = 0 ] || [ $rc = 3 ] || fail "$mode: qemu-img check exit $rc"
    rm -f "$T/s.log" "$img3"
done
# The shutdown's wait ends by an unmount from outside after space was
# freed: the write-back of the unmount stores the held writes, and the
# daemon exits 0 (it exited 1 with a stale ENOSPC message)
img4=$T/m/u.qcow2
qemu-img create -q -f qcow2 "$img4" 64M
fallocate -l $(( $(df -B1 --output=avail "$T/m" | tail -1) - (1 << 20) )) "$T/m/filler" || fail "fallocate"
"$P" serve "$img4" --fuse "$T/u.file" --socket "$T/u.sock" --foreground 2>"$T/u.log" &
upid=$!; DAEMONS+=("$upid")
for _ in $(seq 50); do [ -S "$T/u.sock" ] && break; sleep 0.1; done
python3 "$T/mm.py" "$T/u.file" 0x6b >/dev/null
kill -TERM "$upid"; sleep 1.5; rm -f "$T/m/filler"
fusermount3 -u "$T/u.file" 2>/dev/null || umount "$T/u.file"
wait "$upid"; urc=$?
[ $urc = 0 ] || fail "unmounted while waiting with held writes: exit $urc: $(tail -3 "$T/u.log")"
qio_ro "$img4" "read -P 0x6b 8M 8M"
ok "unmounted from outside while the shutdown waits: exit 0, every held page stored"
echo "serve-enospc: all passed"
