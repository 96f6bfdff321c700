#!/bin/bash
# A full file system and a file-size limit (ulimit -f): every write the tool
# acknowledged reads back with qemu-io, qemu-img check finds no corruption,
# and the failure is one line naming the reason.  The file system is a small
# tmpfs (needs root, or the test skips), filled with fallocate to leave a
# few KiB free.
. "$(dirname "$0")/lib.sh"
mkdir m
if ! mount -t tmpfs -o size=16m tmpfs m 2>/dev/null; then
    echo "SKIP: cannot mount a tmpfs (needs root) for a full file system"; exit 77
fi
trap 'cd /; umount "$T/m"; rm -rf "$T"' EXIT
cd m || exit 1
# fill FREE_KIB: leave about that much free
fill() {
    rm -f filler
    fallocate -l "$(df -B1 --output=avail . | tail -1)" filler 2>/dev/null
    local sz; sz=$(stat -c %s filler)
    truncate -s $((sz - $1 * 1024)) filler
}
check_ok() {   # no corruption: exit 0 or 3 (leaks); output outside the full fs
    local rc=0
    qemu-img check "$1" >"$T/check.out" 2>&1 || rc=$?
    [ $rc = 0 ] || [ $rc = 3 ] || { fail "$2: qemu-img check exit $rc: $(head -3 "$T/check.out")"; return 1; }
}

# 1. 40 scattered allocating writes with ~1 MiB free: the new L2 tables and
#    the L1 entries are written (reserved) before a write is acknowledged,
#    so none of the acknowledged ones is lost at close.
args=(); for i in $(seq 0 39); do args+=(-c "write -P $((i + 1)) $((i * 16))M 64k"); done
for cs in 65536 4096; do
    rm -f a.qcow2
    "$P" create -q -o cluster_size=$cs a.qcow2 1G || { fail "create"; continue; }
    fill 1024
    "$P" io "${args[@]}" a.qcow2 >"$T/io.out" 2>"$T/io.err"
    rc=$? acked=0 rd=()
    for i in $(seq 0 39); do
        grep -q "^wrote 65536/65536 bytes at offset $((i * 16777216))\$" "$T/io.out" || continue
        acked=$((acked + 1)); rd+=(-c "read -P $((i + 1)) $((i * 16))M 64k")
    done
    [ $rc -ne 0 ] || fail "io on a full disk exited 0"
    [ $acked -gt 0 ] || fail "cluster $cs: no write fit (the test proves nothing)"
    lost=0
    [ $acked -gt 0 ] && lost=$(qemu-io -r -f qcow2 "${rd[@]}" a.qcow2 | grep -c "Pattern verification failed")
    [ "$lost" = 0 ] && pass "cluster $cs: $acked acknowledged writes on a full disk all read back" ||
        fail "cluster $cs: $lost of $acked acknowledged writes lost"
    check_ok a.qcow2 "writes on a full disk"
    grep -q "No space left on device" "$T/io.out" "$T/io.err" || fail "the error does not name ENOSPC: $(cat "$T/io.out" "$T/io.err" | tail -2)"
    rm -f filler
done

# 2. internal snapshot with a few KiB free: created or refused, never corrupt
for kib in 0 8 32 128; do
    rm -f a.qcow2 filler
    "$P" create -q a.qcow2 1G && "$P" io -c "write -P 1 0 4M" a.qcow2 >/dev/null || { fail "setup"; continue; }
    fill $kib
    "$P" snapshot -c s1 a.qcow2 2>"$T/snap.err"; rc=$?
    check_ok a.qcow2 "snapshot -c with ${kib} KiB free (exit $rc)" && pass "snapshot -c with ${kib} KiB free: exit $rc, image sound"
    qemu-io -r -f qcow2 -c "read -P 1 0 4M" a.qcow2 | grep -q "^read 4194304" || fail "data changed by a failed snapshot"
    if [ $rc -ne 0 ]; then
        [ "$(wc -l <"$T/snap.err")" = 1 ] || fail "snapshot error is not one line: $(cat "$T/snap.err")"
        [ "$(qemu-img snapshot -l a.qcow2 | grep -c s1)" = 0 ] || fail "a refused snapshot is listed"
    fi
done
rm -f filler

# 3. creating files on a full disk: one line with the reason, nothing left
"$P" create -q a.qcow2 64M
fill 0
dd if=/dev/zero of=filler2 bs=4k 2>/dev/null
for cmd in "create b.qcow2 64M" "convert -O qcow2 a.qcow2 c.qcow2" "snapshot -c s1 --external a.qcow2"; do
    # shellcheck disable=SC2086
    "$P" $cmd >/dev/null 2>"$T/cmd.err"; rc=$?
    if [ $rc -ne 0 ] && grep -q "No space left on device" "$T/cmd.err" && [ "$(wc -l <"$T/cmd.err")" = 1 ]; then
        pass "$cmd on a full disk: $(cat "$T/cmd.err")"
    else
        fail "$cmd on a full disk: exit $rc: $(cat "$T/cmd.err")"
    fi
done
ls -a | grep -q "extsnap-tmp\|^b.qcow2$\|^a.qcow2@" && fail "files left behind: $(ls -a | tr '\n' ' ')"
check_ok a.qcow2 "after the refused external snapshot"
rm -f filler filler2 ./*.qcow2
cd "$T" || exit 1

# 4. a file-size limit: EFBIG, reported; not killed by SIGXFSZ
"$P" create -q l.qcow2 1G
"$P" io -c "write -P 1 0 8M" l.qcow2 >/dev/null
(ulimit -f 12288; exec "$P" io -c "write -P 2 8M 2M" -c "write -P 3 10M 8M" l.qcow2) >lim.out 2>&1
rc=$?
if [ $rc = 1 ] && grep -q "File too large" lim.out; then pass "ulimit -f: exit 1, File too large"
else fail "ulimit -f: exit $rc (153 = killed by SIGXFSZ): $(tail -2 lim.out)"; fi
if grep -q "^wrote 2097152/2097152 bytes at offset 8388608" lim.out; then
    qemu-io -r -f qcow2 -c "read -P 2 8M 2M" -c "read -P 1 0 8M" l.qcow2 | grep -q "verification failed" &&
        fail "ulimit -f: an acknowledged write was lost"
fi
check_ok l.qcow2 "after the file-size limit"
finish
