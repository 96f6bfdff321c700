#!/bin/bash
# pmemsnap serve: the FUSE file (read, write+fsync, fallocate, SEEK_DATA/
# SEEK_HOLE, modes), snapshots through the CLI client, second daemon
# refused, backing chains outside the allowed directories refused, clean
# shutdown by quit and by SIGTERM -- all checked with QEMU's tools.
. "$SRCDIR/serve/lib.sh"
img=$T/a.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qio "$img" "write -P 0x11 0 1M" "write -P 0x33 32M 64k"
start "$img" a
F=$T/a.file S=$T/a.sock

# modes and size
[ "$(stat -c '%a %s' "$F")" = "600 67108864" ] || fail "FUSE file: $(stat -c '%a %s' "$F")"
[ "$(stat -c '%a %F' "$S")" = "600 socket" ] || fail "socket: $(stat -c '%a %F' "$S")"
ok "file 0600 of the virtual size, socket 0600"

# read what qemu-io wrote
cmp <(head -c 1M "$F") <(head -c 1M /dev/zero | tr '\0' '\021') || fail "read 0x11"
cmp <(dd if="$F" bs=64k skip=512 count=1 status=none) <(head -c 64k /dev/zero | tr '\0' '\063') ||
    fail "read 0x33"
ok "reads"

# write + fsync, then the image has it (qemu-io -U reads the open image)
head -c 1M /dev/zero | tr '\0' '\042' | dd of="$F" bs=1M seek=8 conv=notrunc,fsync status=none ||
    fail "dd write"
qemu-io -U -r -f qcow2 -c "read -P 0x22 8M 1M" "$img" | grep -q "read 1048576" || fail "fsynced write not in the image"
# a write past the end fails
if dd if=/dev/zero of="$F" bs=4k seek=16384 count=1 conv=notrunc,fsync status=none 2>/dev/null; then
    fail "write past the end succeeded"
fi
# a write that crosses the end is short: what fits is written
n=$(python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
n = os.pwrite(fd, b"\x44" * 8192, 64 * 1048576 - 4096)
os.fsync(fd); print(n)' "$F") || fail "pwrite across the end"
[ "$n" = 4096 ] || fail "a write across the end returned $n, not 4096"
qemu-io -U -r -f qcow2 -c "read -P 0x44 $((64 * 1048576 - 4096)) 4k" "$img" | grep -q "read 4096" ||
    fail "the part of a write across the end that fits is not in the image"
ok "write + fsync reaches the image; writes past the end refused, across it short"

# fallocate: punch a hole and zero a range; both read back as zeroes
fallocate -p -o 0 -l 64k "$F" || fail "punch hole"
fallocate -z -o 128k -l 64k "$F" || fail "zero range"
cmp <(head -c 64k "$F") <(head -c 64k /dev/zero) || fail "punched range not zero"
cmp <(dd if="$F" bs=64k skip=2 count=1 status=none) <(head -c 64k /dev/zero) || fail "zero range not zero"
cmp <(dd if="$F" bs=64k skip=1 count=1 status=none) <(head -c 64k /dev/zero | tr '\0' '\021') ||
    fail "fallocate touched a neighbour"
# a punch reaching past the end zeroes up to the end; a zero-range that would
# grow the file is refused
dd if=/dev/urandom of="$F" bs=64k seek=1023 count=1 conv=notrunc status=none
fallocate -p -o $((64 * 1048576 - 4096)) -l 1M "$F" || fail "punch past the end"
cmp <(tail -c 4096 "$F") <(head -c 4096 /dev/zero) || fail "punch past the end left data"
[ "$(stat -c %s "$F")" = 67108864 ] || fail "size changed"
fallocate -z -o $((64 * 1048576 - 4096)) -l 1M "$F" 2>/dev/null && fail "zero-range growing the file accepted"
ok "fallocate punch-hole / zero-range (and past the end)"

# SEEK_DATA/SEEK_HOLE equal qemu-img map's data extents of the image
sync "$F"
"$SERVETEST" seek "$F" > "$T/seek.out" || fail "seek"
qemu-img map -U --output=json -f qcow2 "$img" | python3 -c '
import json, sys
ext, cur = [], None
for e in json.load(sys.stdin):
    if e["data"]:
        if cur and cur[1] == e["start"]:
            cur[1] += e["length"]
        else:
            cur = [e["start"], e["start"] + e["length"]]
            ext.append(cur)
for s, e in ext:
    print("data", s, e)' > "$T/map.out"
diff "$T/map.out" "$T/seek.out" || fail "SEEK_DATA/SEEK_HOLE differ from qemu-img map"
[ "$(wc -l < "$T/seek.out")" -ge 3 ] || fail "expected 3+ data extents: $(cat "$T/seek.out")"
ok "SEEK_DATA/SEEK_HOLE match qemu-img map ($(wc -l < "$T/seek.out") extents)"
# a page stored through a mapping and not yet written back is data too
python3 - "$F" <<'PY' || fail "SEEK_DATA after a mapped store"
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
at = 40 << 20
if os.lseek(fd, at, os.SEEK_HOLE) != at:
    sys.exit("40 MiB is not a hole to start with")
m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, offset=at)
m[4096:4100] = b"ZZZZ"                       # no msync, no fsync
d = os.lseek(fd, at, os.SEEK_DATA)
if d > at + 4096:
    sys.exit("SEEK_DATA from 40 MiB skipped a mapped store: %d" % d)
m.close()
PY
ok "SEEK_DATA finds a page stored through a mapping before it is written back"

# a second daemon on the same image is refused, the first keeps serving
if "$P" serve "$img" --fuse "$T/b.file" --socket "$T/b.sock" 2>"$T/second.err"; then
    fail "second daemon on the same image started"
fi
grep -qi "lock" "$T/second.err" || fail "second daemon: $(cat "$T/second.err")"
[ -S "$S" ] && head -c 1 "$F" >/dev/null || fail "first daemon hurt"
ok "second daemon refused: $(head -1 "$T/second.err")"

# a second daemon (another image) on the live export's FUSE file is refused:
# mounted over it, it would hide the first, whose unmount would then take
# the second's mount away
qemu-img create -q -f qcow2 "$T/other.qcow2" 1M
if "$P" serve "$T/other.qcow2" --fuse "$F" --socket "$T/o.sock" 2>"$T/over.err"; then
    fail "second daemon mounted over the live export"
fi
grep -q "already a mount point" "$T/over.err" || fail "mount over: $(cat "$T/over.err")"
[ "$(stat -c %s "$F")" = 67108864 ] && head -c 1 "$F" >/dev/null || fail "first export hurt"
# a pidfile or log that cannot be written fails the start, with the reason
for opt in --pidfile --log; do
    if "$P" serve "$T/other.qcow2" --fuse "$T/o.file" --socket "$T/o.sock" \
            $opt "$T/no/such/dir/x" 2>"$T/opt.err"; then
        fail "serve started with an unwritable $opt"
    fi
    grep -q -- "$opt" "$T/opt.err" || fail "$opt: $(cat "$T/opt.err")"
    grep -q "$T/o.file" /proc/mounts && fail "$opt: a mount was left behind"
done
ok "mount over a live export, unwritable --pidfile / --log: refused ($(head -1 "$T/over.err"))"

# snapshots through the CLI client
"$P" snapshot -c s1 --socket "$S" || fail "snapshot -c"
head -c 64k /dev/zero | tr '\0' '\125' | dd of="$F" bs=64k seek=0 conv=notrunc status=none
"$P" snapshot -l --socket "$S" | grep -q " s1 " || fail "snapshot -l"
"$P" snapshot -c s1 --socket "$S" 2>"$T/dup.err" && fail "duplicate name accepted"
grep -q "already exists" "$T/dup.err" || fail "dup: $(cat "$T/dup.err")"
"$P" snapshot -a nosuch --socket "$S" 2>"$T/nosuch.err" && fail "revert to a missing snapshot"
grep -q "Could not apply snapshot 'nosuch'" "$T/nosuch.err" || fail "nosuch: $(cat "$T/nosuch.err")"
"$P" snapshot -a s1 --socket "$S" || fail "snapshot -a"
cmp <(head -c 64k "$F") <(head -c 64k /dev/zero) || fail "revert: the file does not show s1's bytes"
"$P" snapshot -c s2 --socket "$S" || fail "snapshot -c s2"
"$P" snapshot -d s1 --socket "$S" || fail "snapshot -d"
[ "$("$P" snapshot -l --socket "$S" | tail -n +3 | awk '{print $2}')" = s2 ] || fail "list after delete"
"$P" stats --socket "$S" | grep -q "^snapshots: 2$" || fail "stats"
ok "snapshot -c/-l/-a/-d and stats over the socket"

# quit: clean shutdown, the image is clean and has everything
stop a
[ ! -e "$F" ] && [ ! -e "$S" ] && [ ! -e "$T/a.pid" ] || fail "leftovers after quit"
check_img "$img"
qio "$img" "read -P 0 0 64k" "read -P 0x11 64k 64k" "read -P 0 128k 64k" "read -P 0x22 8M 1M"
[ "$(qemu-img snapshot -l "$img" | tail -n +3 | awk '{print $2}')" = s2 ] || fail "qemu-img snapshot -l"
ok "quit: unmounted, image clean (qemu-img check), data and snapshots there"

# SIGTERM: clean too; a pre-existing mount point file stays
touch "$T/c.file"
start "$img" c
head -c 4k /dev/zero | tr '\0' '\167' | dd of="$T/c.file" bs=4k seek=100 conv=notrunc status=none
kill -TERM "$PID_c"
for _ in $(seq 100); do kill -0 "$PID_c" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID_c" 2>/dev/null && fail "SIGTERM did not stop the daemon"
[ -f "$T/c.file" ] && [ ! -s "$T/c.file" ] || fail "mount point file not restored"
check_img "$img"
qio "$img" "read -P 0x77 400k 4k"
ok "SIGTERM: written-back, unmounted, image clean"

# unmounted from outside (nothing has the file open: the daemon's write-back
# helper must not hold it either): the daemon stops, the image is clean,
# and a new daemon gets the image
start "$img" um
printf 'UMOUNT' | dd of="$T/um.file" bs=1 seek=8192 conv=notrunc status=none
umount "$T/um.file" || fail "plain umount of an idle export: busy"
for _ in $(seq 100); do kill -0 "$PID_um" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID_um" 2>/dev/null && fail "the daemon kept running after its mount was removed"
grep -q "was unmounted, shutting down" "$T/um.log" || fail "unmount not logged: $(cat "$T/um.log")"
grep -v "was unmounted, shutting down" "$T/um.log" | grep -q . && fail "errors at the unmount: $(cat "$T/um.log")"
check_img "$img"
start "$img" um
[ "$(dd if="$T/um.file" bs=1 skip=8192 count=6 status=none)" = UMOUNT ] || fail "data after umount"
stop um
ok "umount from outside: the daemon stops, the image clean, data kept"

# backing chains: only under the image's directory or --backing-dir
mkdir -p "$T/other" "$T/ov"
qemu-img create -q -f raw "$T/other/secret" 1M
printf 'SECRET' | dd of="$T/other/secret" conv=notrunc status=none
qemu-img create -q -f qcow2 -b ../other/secret -F raw "$T/ov/ov.qcow2"
if "$P" serve "$T/ov/ov.qcow2" --fuse "$T/ov.file" --socket "$T/ov.sock" 2>"$T/bk.err"; then
    fail "chain leaving the image's directory accepted"
fi
grep -q "backing-dir" "$T/bk.err" || fail "refusal message: $(cat "$T/bk.err")"
start "$T/ov/ov.qcow2" ov --backing-dir "$T/other"
[ "$(head -c 6 "$T/ov.file")" = SECRET ] || fail "backing read through --backing-dir"
stop ov
ok "backing chain outside the directory refused ($(cat "$T/bk.err")), allowed with --backing-dir"

# the check judges the files the library opens: a relative backing name is
# joined to the directory of the path as given (QEMU does the same), so an
# image reached through a symbolic link must not be judged from the link's
# target's directory (there 'base' is harmless, beside the link it is not)
mkdir -p "$T/sl/real" "$T/sl/given"
qemu-img create -q -f raw "$T/sl/real/base" 1M
qemu-img create -q -f qcow2 -b base -F raw "$T/sl/real/img.qcow2"
ln -s ../real/img.qcow2 "$T/sl/given/img.qcow2"
ln -s "$T/other/secret" "$T/sl/given/base"
if "$P" serve "$T/sl/given/img.qcow2" --fuse "$T/sl.file" --socket "$T/sl.sock" 2>"$T/sl.err"; then
    fail "a backing file beside the symbolic link, leading outside, was accepted"
fi
grep -q "other/secret" "$T/sl.err" || fail "refusal message: $(cat "$T/sl.err")"
start "$T/sl/real/img.qcow2" sl
[ "$(head -c 6 "$T/sl.file")" = SECRET ] && fail "read the secret through the real path"
stop sl
ok "backing name judged where the library opens it ($(cat "$T/sl.err"))"

# a chain as deep as the library opens (more than 64 layers) is served
mkdir -p "$T/deep"
qemu-img create -q -f qcow2 "$T/deep/l0.qcow2" 1M
qemu-io -c "write -P 0x5a 0 4k" "$T/deep/l0.qcow2" >/dev/null
for i in $(seq 1 80); do
    qemu-img create -q -f qcow2 -b "l$((i - 1)).qcow2" -F qcow2 "$T/deep/l$i.qcow2"
done
start "$T/deep/l80.qcow2" deep
[ "$(head -c 1 "$T/deep.file" | od -An -tx1 | tr -d ' ')" = 5a ] || fail "deep chain: wrong data"
stop deep
ok "a chain of 81 images served"

# access: only the daemon's user, unless --allow-other (then the file's mode
# 0660 decides: another user outside the group is still refused, the group
# gets in)
chmod 711 "$T"
as() { setpriv --reuid="$1" --regid="$2" --clear-groups "${@:3}"; }
start "$img" acc
as 65534 65534 head -c 1 "$T/acc.file" >/dev/null 2>&1 && fail "another user read the file"
as 65534 65534 stat "$T/acc.file" >/dev/null 2>&1 && fail "another user could stat the file"
stop acc
start "$img" acc --allow-other
[ "$(stat -c %a "$T/acc.file")" = 660 ] || fail "--allow-other mode $(stat -c %a "$T/acc.file")"
as 65534 65534 head -c 1 "$T/acc.file" >/dev/null 2>&1 && fail "--allow-other: a user outside the group read the file"
as 65534 0 head -c 1 "$T/acc.file" >/dev/null 2>&1 || fail "--allow-other: the group cannot read the file"
stop acc
chmod 700 "$T"
ok "access: the daemon's user only; --allow-other lets the group in (mode 0660)"

# usage errors
"$P" serve "$img" --socket "$T/x.sock" 2>/dev/null && fail "no --fuse accepted"
"$P" serve "$T/missing.qcow2" --fuse "$T/x.file" --socket "$T/x.sock" 2>"$T/miss.err" && fail "missing image"
[ "$(wc -l < "$T/miss.err")" = 1 ] || fail "missing image: $(cat "$T/miss.err")"
# the FUSE file must not hide a file the daemon serves from or will create
cp "$img" "$T/img-copy.qcow2"
ln "$T/img-copy.qcow2" "$T/hardlink"
sum=$(md5sum < "$T/img-copy.qcow2")
for f in "$T/img-copy.qcow2" "$T/hardlink" "$T/./img-copy.qcow2" "$T/img-copy.qcow2@s1" \
         "$T/.img-copy.qcow2.extsnap-tmp" "$T/deep/l3.qcow2"; do
    im=$T/img-copy.qcow2
    [ "$f" = "$T/deep/l3.qcow2" ] && im=$T/deep/l80.qcow2
    "$P" serve "$im" --fuse "$f" --socket "$T/x.sock" 2>"$T/self.err" &&
        fail "--fuse $f accepted"
    [ "$(wc -l < "$T/self.err")" = 1 ] && grep -q -- "--fuse" "$T/self.err" ||
        fail "--fuse $f: $(cat "$T/self.err")"
    echo "     refused: $(cat "$T/self.err")"
done
# nor any other file it writes: a pid file or log over the image wrecked it
# (and the pid file was unlinked at exit); two options on one file
im=$T/img-copy.qcow2
for args in "--pidfile $im" "--log $im" "--log $T/deep/l3.qcow2" "--pidfile $T/hardlink" \
            "--log $T/img-copy.qcow2@x" "--pidfile $T/x.file" "--log $T/x.sock" \
            "--pidfile $T/same --log $T/./same"; do
    im=$T/img-copy.qcow2
    case $args in *deep*) im=$T/deep/l80.qcow2 ;; esac
    # shellcheck disable=SC2086
    "$P" serve "$im" --fuse "$T/x.file" --socket "$T/x.sock" $args 2>"$T/self.err" &&
        fail "$args accepted"
    [ "$(wc -l < "$T/self.err")" = 1 ] || fail "$args: $(cat "$T/self.err")"
    echo "     refused: $(cat "$T/self.err")"
done
[ -e "$T/same" ] && fail "a refused start created its pid file"
[ "$(md5sum < "$T/img-copy.qcow2")" = "$sum" ] || fail "a refused start changed the image"
grep -q " $T/" /proc/mounts && fail "a refused start left a mount"
ok "usage errors: one line, non-zero; --fuse, --pidfile, --log on the image, a layer, a snapshot's name or each other refused"

# the daemon keeps none of the caller's standard descriptors (its write-back
# helper neither): a pipe on its output reaches EOF once serve returns
out=$(timeout 20 bash -c "'$P' serve '$img' --fuse '$T/p.file' --socket '$T/p.sock' --pidfile '$T/p.pid' | cat; echo piped-done") ||
    fail "the output pipe of serve did not close"
grep -q piped-done <<<"$out" || fail "serve | cat: $out"
DAEMONS+=("$(cat "$T/p.pid")")
stop p
ok "serve | cat returns once the daemon serves"
echo "serve-basic: all passed"
