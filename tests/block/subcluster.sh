#!/bin/bash
# Extended L2 (subcluster) writes, compared with QEMU 7.2 step by step: the
# same writes go through qemu-io into one copy and through our io into
# another, and after every step the two must have the same L2 entries
# (COPIED, offset set, subcluster allocation and zero bitmaps), the same
# content (qemu-img compare), and ours must pass qemu-img check.  The steps
# are the data writes of QEMU's iotest 271 (standard writes with and without
# a backing file, several clusters without copy-on-write, copy-on-write of
# clusters shared with a snapshot), then random 4 KiB and unaligned writes
# into overlays of a fully written image, where qemu-img map (offsets
# included) and the disk usage must match too.
. "$(dirname "$0")/lib.sh"

l2dump() { $PY "$SRCDIR_BLOCK/l2dump.py" "$1"; }

# step CMD: qemu-io -c CMD on q.qcow2, our io on p.qcow2, then compare
step() {
    local out
    if ! out=$(qemu-io -c "$1" q.qcow2 2>&1) || echo "$out" | grep -q -i "error\|fail"; then
        fail "qemu-io $1: $out"; return 1
    fi
    if ! out=$("$PMS" io -c "$1" p.qcow2 2>&1) || echo "$out" | grep -q -i "error\|fail"; then
        fail "our io $1: $out"; return 1
    fi
    if ! out=$(diff <(l2dump q.qcow2) <(l2dump p.qcow2)); then
        fail "after '$1' L2 entries differ (cluster flags offset zero bitmap; < qemu > ours): $(echo "$out" | head -n 6 | tr '\n' '|')"
        return 1
    fi
    if ! out=$(qemu-img compare q.qcow2 p.qcow2 2>&1); then
        fail "after '$1': $out"; return 1
    fi
    qcheck p.qcow2
}

# reset SIZE [BACKING_RAW_SIZE]: fresh extended-L2 images q and p (over a raw
# base of 0xff bytes when asked), as iotest 271's _reset_img
reset() {
    rm -f q.qcow2 p.qcow2 base.raw
    if [ -n "${2:-}" ]; then
        run qemu-img create -q -f raw base.raw "$2" || return 1
        run qemu-io -f raw -c "write -q -P 0xff 0 $2" base.raw || return 1
        run qemu-img create -q -f qcow2 -o extended_l2=on -F raw -b base.raw q.qcow2 "$1" || return 1
    else
        run qemu-img create -q -f qcow2 -o extended_l2=on q.qcow2 "$1" || return 1
    fi
    cp q.qcow2 p.qcow2
}

# w C SC OFF LEN [PAT]: write in cluster C (64 KiB), subcluster SC (2 KiB),
# OFF KiB into it
pat=0
w() {
    pat=$((pat % 250 + 1))
    step "write -q -P $pat $(($1 * 64 + $2 * 2 + $3))k $4"
}

for backing in yes no; do
    begin "271-standard-writes-backing-$backing"
    if [ $backing = yes ]; then reset 1M 1M; else reset 1M; fi || continue
    w 0 0 0 1k && w 0 1 1 512 && w 0 2 1 1k && w 0 3 0 2k && w 0 4 0 6k && w 0 7 1 4k &&
        w 0 16 0 1k && w 0 31 1 4k && w 0 0 0 64k && w 0 1 1 512 && ok
    if [ $HAVE_CLI = 1 ]; then
        begin "271-write-over-compressed-backing-$backing"
        # (QEMU refuses a compressed write over an allocated cluster)
        step "write -q -c -P 7 256k 64k" && w 4 1 1 512 && w 2 5 0 1k && ok
    fi
done

begin 271-several-clusters-without-cow
reset 1M && w 0 12 0 40k && w 1 13 0 2k && w 2 14 0 2k && w 3 0 0 34k && w 0 12 0 192k && ok

begin 271-cow-with-snapshot
reset 1M && {
    for c in $(seq 0 9); do
        run qemu-io -c "write -q -z $((64 * c + 14))k 2k" -c "write -q -P $((0xd0 + c)) $((64 * c + 26))k 2k" \
            -c "write -q -P $((0xe0 + c)) $((64 * c + 36))k 2k" q.qcow2 || break
    done
    run qemu-img snapshot -c snap1 q.qcow2 && cp q.qcow2 p.qcow2 &&
    step "write -q -P 0xf0 30k 1k" && step "write -q -P 0xf1 84k 1k" &&
    step "write -q -P 0xf2 168k 1k" && step "write -q -P 0xf3 218k 1k" &&
    step "write -q -P 0xf4 270k 1k" && step "write -q -P 0xf5 321k 1k" &&
    run qemu-img convert -l snapshot.name=snap1 -O raw q.qcow2 qs.raw &&
    run qemu-img convert -l snapshot.name=snap1 -O raw p.qcow2 ps.raw &&
    { cmp -s qs.raw ps.raw || fail "snapshot snap1 reads differently"; } && ok
}

# Bits QEMU ignores (iotest 271): the zero flag (bit 0) of an extended L2
# entry, the subcluster bitmap of a compressed cluster; reads and writes
# work and leave the entries as QEMU's do.
l2off() { $PY -c 'import struct,sys; f=open(sys.argv[1],"rb"); h=f.read(48); f.seek(struct.unpack(">Q",h[40:48])[0]); print(struct.unpack(">Q",f.read(8))[0] & 0x00fffffffffffe00)' "$1"; }
poke() { printf "$3" | dd of="$1" bs=1 seek=$(($(l2off "$1") + $2)) conv=notrunc status=none; }
begin 271-ignored-bits
reset 1M && run qemu-io -c "write -q -P 0x11 0 2k" -c "write -q 256k 1k" q.qcow2 &&
    poke q.qcow2 7 '\x01' && poke q.qcow2 23 '\x01' && cp q.qcow2 p.qcow2 &&
    step "read -q -P 0x11 0 1k" && step "write -q -P 0x12 0 1k" && step "write -q -P 0x13 64k 1k" && ok
if [ $HAVE_CLI = 1 ]; then
    begin 271-compressed-with-bitmap
    reset 1M && run qemu-io -c "write -q -P 11 -c 0 64k" q.qcow2 && poke q.qcow2 11 '\x01\x80' &&
        cp q.qcow2 p.qcow2 && run qemu-io -c "read -q -P 11 0 64k" q.qcow2 &&
        run "$PMS" io -c "read -q -P 11 0 64k" p.qcow2 && step "write -q -P 12 0 2k" && ok
fi

# Random writes into overlays of a fully written image: the external
# snapshot layout (issue 8: only the touched subclusters are allocated).
if [ -n "${PMS_SANITIZED:-}" ]; then NW=60; else NW=200; fi
rm -f full.qcow2
run qemu-img create -q -f qcow2 full.qcow2 16M
run qemu-io -c "write -q -P 0x5a 0 16M" full.qcow2
for cs in 64k 32k 2M; do
    begin "overlay-random-$cs"
    rm -f q.qcow2 p.qcow2
    run qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=$cs -b full.qcow2 -F qcow2 q.qcow2 || continue
    cp q.qcow2 p.qcow2
    $PY - $NW $((16 << 20)) > cmds.txt <<'PY'
import random, sys
n, size = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(n + size)
for i in range(n):
    if i % 4 == 3:      # unaligned
        print("write -q -P %d %d %d" % (i % 250 + 1, r.randrange(size - 3000), r.randint(1, 3000)))
    else:               # pages
        print("write -q -P %d %d 4096" % (i % 250 + 1, r.randrange(size // 4096) * 4096))
PY
    args=()
    while IFS= read -r l; do args+=(-c "$l"); done < cmds.txt
    run qemu-io "${args[@]}" q.qcow2 || continue
    run "$PMS" io "${args[@]}" p.qcow2 || continue
    qcheck p.qcow2 || continue
    if ! out=$(qemu-img compare q.qcow2 p.qcow2 2>&1); then fail "$out"; continue; fi
    if ! out=$(diff <(l2dump q.qcow2) <(l2dump p.qcow2)); then
        fail "L2 entries differ: $(echo "$out" | head -n 4 | tr '\n' '|')"; continue
    fi
    # the map, host offsets included; the "zero" of data extents reports
    # holes of the host file, which the file system fills as it likes
    if ! out=$(diff <(qemu-img map --output=json q.qcow2 | sed 's/"zero": [a-z]*, "data": true/"data": true/') \
                    <(qemu-img map --output=json p.qcow2 | sed 's/"zero": [a-z]*, "data": true/"data": true/')); then
        fail "qemu-img map differs: $(echo "$out" | head -n 4 | tr '\n' '|')"; continue
    fi
    qdu=$(du -B1 q.qcow2 | cut -f1); pdu=$(du -B1 p.qcow2 | cut -f1)
    # (+ one cluster: our new L2 table's cluster is reserved whole so that a
    # full disk fails the write that needs it; QEMU leaves the unwritten
    # part of a 2 MiB table a hole: docs/architecture.md, write ordering)
    csb=$(numfmt --from=iec "${cs^^}")
    if [ "$pdu" -gt $((qdu + qdu / 10 + 65536 + csb)) ]; then
        fail "disk usage $pdu bytes, qemu-io's $qdu"; continue
    fi
    ok "(du: qemu-io $qdu, ours $pdu)"
done
finish
