#!/bin/bash
# External snapshots through the CLI, with QEMU as the oracle: every layer
# qemu-img check clean, every snapshot's chain equal (qemu-img compare) to a
# raw copy QEMU made of the image at that instant, qemu-io and pmemsnap
# writing into each other's overlays, revert keeping the tree, delete of the
# oldest, a middle and the newest snapshot, name rules and hostile layers.
. "$(dirname "$0")/lib.sh"
SZ=8M


begin create
qemu-img create -q -f qcow2 img.qcow2 $SZ
qemu-io -c "write -P 0x11 0 $SZ" img.qcow2 >/dev/null
snap_ref S1
run "$P" snapshot -c S1 --external img.qcow2
[ "$(qemu-img info img.qcow2 | grep -c 'extended l2: true')" = 1 ] || fail "overlay has no extended L2"
qemu-img info img.qcow2 | grep -q '^backing file: img.qcow2@S1$' || fail "backing name is not relative: $(qemu-img info img.qcow2 | grep backing)"
qemu-img info img.qcow2 | grep -q '^backing file format: qcow2$' || fail "no backing format"
qemu-img info img.qcow2 | grep -q '^cluster_size: 65536$' || fail "cluster size"
qemu-img info img.qcow2 | grep -q 'compat: 1.1' || fail "compat"
same img.qcow2@S1 ref-S1.raw
same img.qcow2 ref-S1.raw
ok

begin interop
# qemu-io writes 4 KiB pieces into our overlay (subclusters), we read them back
qemu-io -c "write -P 0x22 4096 4096" -c "write -P 0x23 70000 3000" img.qcow2 >/dev/null
run "$P" io -c "read -P 0x22 4096 4096" -c "read -P 0x23 70000 3000" -c "read -P 0x11 0 4096" \
    -c "read -P 0x11 8192 61808" img.qcow2
# we write, qemu-io reads
run "$P" io -c "write -P 0x33 200000 5000" img.qcow2
qemu-io -c "read -P 0x33 200000 5000" -c "read -P 0x11 205000 1000" -c "read -P 0x22 4096 4096" \
    img.qcow2 | grep -q "Pattern verification failed" && fail "qemu-io reads a wrong pattern"
run qemu-io -c "read -P 0x33 200000 5000" img.qcow2
check_clean img.qcow2
# QEMU's writes allocated only the touched subclusters (4 KiB + 4 KiB of
# 2 KiB subclusters); our own writes are the write path's business
alloc=$(qemu-img map --output=json img.qcow2 | python3 -c '
import json,sys
print(sum(e["length"] for e in json.load(sys.stdin)
          if e["depth"]==0 and e["data"] and e["start"] < 196608))')
[ "$alloc" = 8192 ] || fail "qemu-io's writes show $alloc bytes allocated in the overlay, not 8192"
snap_ref S2
run "$P" snapshot -c S2 --external img.qcow2
run "$P" io -c "write -P 0x44 1M 1M" img.qcow2
snap_ref S3
run "$P" snapshot -c S3 --external img.qcow2
run "$P" io -c "write -z 0 64k" -c "write -P 0x55 3M 100k" img.qcow2
snap_ref S4
run "$P" snapshot -c S4 --external img.qcow2
run "$P" io -c "write -P 0x66 2M 10k" img.qcow2
snap_ref live
qemu-img info --backing-chain img.qcow2 >chain.txt || fail "qemu-img info --backing-chain"
[ "$(grep -c '^image:' chain.txt)" = 5 ] || fail "chain is not 5 images: $(grep '^image:' chain.txt)"
for s in S1 S2 S3 S4; do same img.qcow2@$s ref-$s.raw; check_clean img.qcow2@$s; done
same img.qcow2 ref-live.raw
ok

begin list
"$P" snapshot -l img.qcow2 >list.txt || fail "snapshot -l"
head -n 2 list.txt | tail -n 1 | grep -q 'KIND' || fail "no KIND column: $(cat list.txt)"
[ "$(grep -c ' external  img.qcow2@S' list.txt)" = 4 ] || fail "list: $(cat list.txt)"
# info shows what qemu-img info shows (no external snapshots)
"$P" info img.qcow2 | grep -q "Snapshot list" && fail "info lists external snapshots"
ok

begin names
for bad in "" "a/b" "." ".." "$(printf 'x%.0s' $(seq 1 250))"; do
    refuse "$P" snapshot -c "$bad" --external img.qcow2
done
refuse "$P" snapshot -c S2 --external img.qcow2            # exists
run "$P" snapshot -c I1 img.qcow2                          # internal
refuse "$P" snapshot -c I1 --external img.qcow2            # unique across kinds
refuse "$P" snapshot -c S3 img.qcow2
refuse "$P" snapshot -a nosuch img.qcow2
refuse "$P" snapshot -d nosuch img.qcow2
"$P" snapshot -l img.qcow2 | grep -q ' internal  -$' || fail "internal row: $("$P" snapshot -l img.qcow2)"
# revert to an external snapshot would drop I1: refused
refuse "$P" snapshot -a S2 img.qcow2
run "$P" snapshot -d I1 img.qcow2
same img.qcow2 ref-live.raw
ok

begin revert
run "$P" snapshot -a S2 img.qcow2
same img.qcow2 ref-S2.raw
for s in S1 S2 S3 S4; do same img.qcow2@$s ref-$s.raw; check_clean img.qcow2@$s; done
check_clean img.qcow2
# a branch: S5 on S2
run "$P" io -c "write -P 0x77 5M 64k" img.qcow2
qemu-io -c "write -P 0x78 6M 4k" img.qcow2 >/dev/null
snap_ref S5
run "$P" snapshot -c S5 --external img.qcow2
run "$P" io -c "write -P 0x79 7M 4k" img.qcow2
snap_ref live
ok

begin delete
all="S1 S2 S3 S4 S5"
verify() {
    for s in $all; do same img.qcow2@$s ref-$s.raw; check_clean img.qcow2@$s; done
    same img.qcow2 ref-live.raw; check_clean img.qcow2
}
# middle of the chain with two children (S3 and S5 both on S2)
run "$P" snapshot -d S2 img.qcow2
[ -e img.qcow2@S2 ] && fail "layer of S2 still there"
all="S1 S3 S4 S5"; verify
qemu-img info img.qcow2@S3 | grep -q '^backing file: img.qcow2@S1$' || fail "S3 not rebased to S1"
# oldest (the original image: its data moves into both children)
run "$P" snapshot -d S1 -p img.qcow2
all="S3 S4 S5"; verify
qemu-img info img.qcow2@S3 | grep -q '^backing file' && fail "S3 still has a backing file"
# newest (the live image's backing file)
run "$P" snapshot -d S5 img.qcow2
all="S3 S4"; verify
# S5 stood on S2, then on S1, then on nothing: the live image is whole now
qemu-img info img.qcow2 | grep -q '^backing file' && fail "live still has a backing file"
# a leaf that nothing reads through
run "$P" snapshot -d S4 img.qcow2
all="S3"; verify
"$P" snapshot -l img.qcow2 | grep -c external | grep -qx 1 || fail "list after deletes"
ok

begin zero-pages
# deleting the bottom layer streams its data into the live image; pages that
# hold zeroes there (a layer without subclusters keeps a 4 KiB store as a
# whole cluster) are not copied: the live image reads zeroes for them once
# it has no backing file.  A page that is zero in the layer but not in the
# live image must keep the live image's bytes.
qemu-img create -q -f qcow2 zp.qcow2 4M
qemu-io -c "write -P 0x21 0 4M" -c "write -P 0 64k 60k" -c "write -P 0 1M 4k" \
    -c "write -P 0 2M 6k" zp.qcow2 >/dev/null
run "$P" snapshot -c Z --external zp.qcow2
run "$P" io -c "write -P 0x22 68k 4k" -c "write -P 0x23 3M 4k" zp.qcow2
qemu-img convert -U -O raw zp.qcow2 zp-ref.raw
run "$P" snapshot -d Z zp.qcow2
[ -e zp.qcow2@Z ] && fail "layer of Z still there"
qemu-img info zp.qcow2 | grep -q '^backing file' && fail "zp still has a backing file"
same zp.qcow2 zp-ref.raw
check_clean zp.qcow2
run qemu-io -c "read -P 0 64k 4k" -c "read -P 0x22 68k 4k" -c "read -P 0 72k 52k" \
    -c "read -P 0x21 124k 4k" -c "read -P 0 1M 4k" -c "read -P 0 2M 6k" zp.qcow2
# the all-zero pages were not written: less than the 4 MiB of the layer
zalloc=$(qemu-img map --output=json zp.qcow2 | python3 -c '
import json,sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"] and e["depth"]==0))')
[ "$zalloc" -le $((4096*1024 - 16*4096)) ] || fail "zero pages were copied: $zalloc bytes allocated"
ok

# the same with holes in the layer's file: a 4 KiB store into a new cluster
# of a layer without subclusters leaves the rest of the cluster a hole of
# the file (our writer and QEMU's); the stream copies only the file's data,
# and what lies beside a hole (before, after, between two) is kept
begin holes
qemu-img create -q -f qcow2 hp.qcow2 4M
qemu-io -c "write -P 0x31 0 4k" -c "write -P 0x32 188k 4k" -c "write -P 0x35 1M 64k" \
    hp.qcow2 >/dev/null
run "$P" io -c "write -P 0x33 256k 4k" -c "write -P 0x34 316k 4k" -c "write -P 0x37 2M 8k" hp.qcow2
python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); end = os.fstat(fd).st_size; off = 0; holes = 0
while off < end:
    h = os.lseek(fd, off, os.SEEK_HOLE)
    if h >= end: break
    holes += 1
    try: off = os.lseek(fd, h, os.SEEK_DATA)
    except OSError: break
sys.exit(0 if holes else 1)' hp.qcow2 || echo "     note: this file system shows no holes in hp.qcow2"
run "$P" snapshot -c H --external hp.qcow2
run "$P" io -c "write -P 0x36 8k 4k" hp.qcow2
qemu-img convert -U -O raw hp.qcow2 hp-ref.raw
run "$P" snapshot -d H hp.qcow2
qemu-img info hp.qcow2 | grep -q '^backing file' && fail "hp still has a backing file"
same hp.qcow2 hp-ref.raw
check_clean hp.qcow2
run qemu-io -c "read -P 0x31 0 4k" -c "read -P 0 4k 4k" -c "read -P 0x36 8k 4k" \
    -c "read -P 0 12k 176k" -c "read -P 0x32 188k 4k" -c "read -P 0x33 256k 4k" \
    -c "read -P 0 260k 56k" -c "read -P 0x34 316k 4k" -c "read -P 0x35 1M 64k" \
    -c "read -P 0x37 2M 8k" -c "read -P 0 2056k 56k" hp.qcow2
hdata=$(qemu-img map --output=json hp.qcow2 | python3 -c '
import json,sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"] and e["depth"]==0))')
[ "$hdata" -le $((96 * 1024)) ] || fail "holes were copied as data: $hdata bytes"
# a file that ends inside its last data cluster (QEMU reads the rest as
# zeroes, qemu-img check accepts it): the part past the end is a hole too
qemu-img create -q -f qcow2 ht.qcow2 4M
run "$P" io -c "write -P 0x41 3M 4k" ht.qcow2
host=$(qemu-img map --output=json ht.qcow2 | python3 -c '
import json,sys
print([e["offset"] for e in json.load(sys.stdin) if e["data"] and e["start"] == 3 << 20][0])')
truncate -s $((host + 4096)) ht.qcow2
check_clean ht.qcow2
run "$P" snapshot -c T --external ht.qcow2
run "$P" io -c "write -P 0x42 0 4k" ht.qcow2
qemu-img convert -U -O raw ht.qcow2 ht-ref.raw
run "$P" snapshot -d T ht.qcow2
same ht.qcow2 ht-ref.raw
check_clean ht.qcow2
run qemu-io -c "read -P 0x41 3M 4k" -c "read -P 0 3076k 60k" -c "read -P 0x42 0 4k" ht.qcow2
ok

begin commit
# the oldest snapshot with one smaller layer child: deleted by committing the
# child into it (the child's file becomes the parent's), not by copying the
# whole image into the child
qemu-img create -q -f qcow2 cm.qcow2 8M
qemu-io -c "write -P 0x61 0 8M" cm.qcow2 >/dev/null
run "$P" snapshot -c A --external cm.qcow2
run "$P" io -c "write -P 0x62 1M 8k" -c "write -z 2M 64k" cm.qcow2
qemu-img convert -O raw cm.qcow2 ref-cmB.raw
run "$P" snapshot -c B --external cm.qcow2
run "$P" io -c "write -P 0x63 3M 4k" cm.qcow2
qemu-img convert -O raw cm.qcow2 ref-cmlive.raw
ino=$(stat -c %i cm.qcow2@A)
# a QEMU reader holds A: the delete is refused cleanly, A stays listed
qemu-io -r cm.qcow2@A -c "sleep 1500" >/dev/null 2>&1 &
qpid=$!
sleep 0.5
refuse "$P" snapshot -d A cm.qcow2
wait $qpid
ls -a | grep -q deleting && fail "a marker was left by the refused delete"
"$P" snapshot -l cm.qcow2 | grep -q ' A ' || fail "A not listed after the refused delete"
run "$P" snapshot -d A cm.qcow2
[ -e cm.qcow2@A ] && fail "A still there"
[ "$(stat -c %i cm.qcow2@B)" = "$ino" ] || fail "B's file is not A's: not deleted by commit"
same cm.qcow2@B ref-cmB.raw; check_clean cm.qcow2@B
same cm.qcow2 ref-cmlive.raw; check_clean cm.qcow2
qemu-img info cm.qcow2@B | grep -q '^backing file' && fail "B still has a backing file"
"$P" snapshot -l cm.qcow2 | grep -c external | grep -qx 1 || fail "list after the commit"
ok

begin hostile
# a layer whose backing file lies outside the directory (absolute, and ../)
mkdir -p sub
qemu-img create -q -f qcow2 sub/img.qcow2 4M
qemu-io -c "write -P 0x12 0 4M" sub/img.qcow2 >/dev/null
run "$P" snapshot -c A --external sub/img.qcow2
mv sub/img.qcow2@A outside.qcow2
qemu-img rebase -u -F qcow2 -b ../outside.qcow2 sub/img.qcow2
qemu-img convert -O raw sub/img.qcow2 ref-out.raw
run "$P" io -c "write -P 0x13 0 4k" sub/img.qcow2
qemu-img convert -O raw sub/img.qcow2 ref-out2.raw
run "$P" snapshot -c B --external sub/img.qcow2
run "$P" snapshot -c C --external sub/img.qcow2
run "$P" snapshot -d B sub/img.qcow2          # B's backing (../outside) goes to C
same sub/img.qcow2@C ref-out2.raw
same outside.qcow2 ref-out.raw
qemu-img info sub/img.qcow2@C | grep -q '^backing file: ../outside.qcow2' || fail "C's backing: $(qemu-img info sub/img.qcow2@C | grep backing)"
# not a layer: a file with a layer's name that is not qcow2 is not listed
echo junk >sub/img.qcow2@junk
"$P" snapshot -l sub/img.qcow2 | grep -q junk && fail "a non-qcow2 file is listed"
refuse "$P" snapshot -c junk --external sub/img.qcow2
# a missing layer: clear errors, no crash; snapshot -l fails too, as
# qemu-img snapshot -l does (it opens the backing chain)
mv sub/img.qcow2@C gone.qcow2
refuse "$P" io -c "read 0 4k" sub/img.qcow2
refuse "$P" snapshot -a C sub/img.qcow2
refuse "$P" snapshot -d C sub/img.qcow2
refuse "$P" snapshot -l sub/img.qcow2
mv gone.qcow2 sub/img.qcow2@C
run "$P" io -c "read -P 0x13 0 4k" sub/img.qcow2
# a symbolic link as the live path: refused (the layer would land elsewhere)
ln -s sub/img.qcow2 link.qcow2
refuse "$P" snapshot -c E --external link.qcow2
# raw images cannot have external snapshots
qemu-img create -q -f raw r.raw 1M
refuse "$P" snapshot -c A --external r.raw
ok

begin sizes
# layers of different sizes in a chain deep enough for the chain map: our
# reads and block status equal QEMU's
qemu-img create -q -f qcow2 sz.qcow2 4M
qemu-io -c "write -P 0x21 0 4M" sz.qcow2 >/dev/null
for s in A B C D; do
    run "$P" snapshot -c $s --external sz.qcow2
    run "$P" io -c "write -P 0x3$s 1M 4k" sz.qcow2 2>/dev/null || run "$P" io -c "write -P 0x31 1M 4k" sz.qcow2
done
qemu-img resize -q --shrink sz.qcow2@B 2M
qemu-img resize -q sz.qcow2@C 3M
qemu-img resize -q sz.qcow2 6M
qemu-img convert -U -O raw sz.qcow2 q.raw
"$P" convert -O raw sz.qcow2 p.raw || fail "our convert"
cmp -s q.raw p.raw || fail "a chain with layers of other sizes reads differently from QEMU"
qemu-img map -U --output=json sz.qcow2 >q.json
"$P" map -U --output=json sz.qcow2 >p.json
cmp -s q.json p.json || fail "map differs: $(diff q.json p.json | head -n 4)"
ok

begin leftovers
# an interrupted create: a second name of the live inode and a temp overlay
qemu-img create -q -f qcow2 lo.qcow2 1M
ln lo.qcow2 lo.qcow2@half
qemu-img create -q -f qcow2 .lo.qcow2.extsnap-tmp 1M
run "$P" io -c "read 0 4k" lo.qcow2
[ -e lo.qcow2@half ] && fail "a layer that is still the live inode was kept"
[ -e .lo.qcow2.extsnap-tmp ] && fail "temporary overlay was kept"
ok

begin id-vs-name
# an internal snapshot's ID never equals another snapshot's name (lookups
# take either): after an external snapshot named 1, the next internal one
# gets another ID, and -d 1 deletes the external one only
qemu-img create -q -f qcow2 ids.qcow2 16M
$P snapshot -c 1 --external ids.qcow2 || fail "external 1"
# (2 between them: x, in the live image, reads through 2, not through 1)
$P snapshot -c 2 --external ids.qcow2 || fail "external 2"
$P snapshot -c x ids.qcow2 || fail "internal x"
id=$(qemu-img snapshot -l ids.qcow2 | awk '$2 == "x" {print $1}')
[ -n "$id" ] && [ "$id" != 1 ] || fail "internal x got ID '$id'"
$P snapshot -d 1 ids.qcow2 || fail "delete 1"
[ -e ids.qcow2@1 ] && fail "external 1 still there"
qemu-img snapshot -l ids.qcow2 | awk '{print $2}' | grep -qx x || fail "internal x was deleted"
ok "internal ID $id"

begin mixed-delete
# deleting an external snapshot must not change or drop an internal one:
# refused while the live image (reading through the layer) or the layer
# itself holds internal snapshots, allowed once they are gone; nothing is
# written by a refused delete
qemu-img create -q -f qcow2 mx.qcow2 8M
qemu-io -c "write -P 0x11 0 8M" mx.qcow2 >/dev/null
run "$P" snapshot -c I0 mx.qcow2
run "$P" snapshot -c A --external mx.qcow2
qemu-io -c "write -P 0x12 1M 64k" mx.qcow2 >/dev/null
run "$P" snapshot -c B --external mx.qcow2
qemu-io -c "write -P 0x13 2M 64k" mx.qcow2 >/dev/null
qemu-img convert -O raw mx.qcow2 ref-mxI.raw
run "$P" snapshot -c I mx.qcow2
qemu-io -c "write -P 0x14 3M 64k" mx.qcow2 >/dev/null
qemu-img convert -O raw mx.qcow2 ref-mxlive.raw
qemu-img convert -O raw -l snapshot.name=I0 mx.qcow2@A ref-mxI0.raw
sums=$(md5sum mx.qcow2 mx.qcow2@A mx.qcow2@B)
refuse "$P" snapshot -d B mx.qcow2     # the live image's I reads through B
refuse "$P" snapshot -d A mx.qcow2     # A's file holds I0
[ "$(md5sum mx.qcow2 mx.qcow2@A mx.qcow2@B)" = "$sums" ] || fail "a refused delete wrote"
qemu-img convert -O raw -l snapshot.name=I mx.qcow2 mxI.raw
cmp -s mxI.raw ref-mxI.raw || fail "internal snapshot I changed"
# the internal snapshots go: the deletes run, the content stays
run qemu-img snapshot -d I0 mx.qcow2@A
run "$P" snapshot -d A mx.qcow2
run "$P" snapshot -d I mx.qcow2
run "$P" snapshot -d B mx.qcow2
same mx.qcow2 ref-mxlive.raw; check_clean mx.qcow2
qemu-img info mx.qcow2 | grep -q '^backing file' && fail "live still has a backing file"
ok

begin resized
# the image resized between two snapshots: deleting the older one (whose
# only child is the smaller layer) must not commit into a file of another
# size; it streams, and every content stays
qemu-img create -q -f qcow2 rs.qcow2 8M
qemu-io -c "write -P 0x21 0 8M" rs.qcow2 >/dev/null
run "$P" snapshot -c a --external rs.qcow2
run "$P" resize rs.qcow2 16M
qemu-io -c "write -P 0x22 0 64k" -c "write -P 0x23 12M 64k" rs.qcow2 >/dev/null
qemu-img convert -O raw rs.qcow2 ref-rsb.raw
run "$P" snapshot -c b --external rs.qcow2
qemu-io -c "write -P 0x24 1M 64k" rs.qcow2 >/dev/null
qemu-img convert -O raw rs.qcow2 ref-rslive.raw
run "$P" snapshot -d a rs.qcow2
[ -e rs.qcow2@a ] && fail "a still there"
ls -a | grep -q 'rs.qcow2@a.deleting' && fail "a delete marker was left"
same rs.qcow2@b ref-rsb.raw; check_clean rs.qcow2@b
same rs.qcow2 ref-rslive.raw; check_clean rs.qcow2
ok

# chain_ab IMG: a 4 MiB image written with 1, snapshot a, 64 KiB of 2,
# snapshot b (a <- b <- IMG)
chain_ab() {
    qemu-img create -q -f qcow2 "$1" 4M
    qemu-io -c "write -P 1 0 4M" "$1" >/dev/null
    run "$P" snapshot -c a --external "$1"
    qemu-io -c "write -P 2 0 64k" "$1" >/dev/null
    run "$P" snapshot -c b --external "$1"
}

begin unreadable-child
# a layer that cannot be inspected may read through the snapshot being
# deleted: the delete is refused and removes nothing (it removed the layer
# under the child, which no longer opened)
chain_ab uc.qcow2
cp uc.qcow2@b uc-b.good
python3 -c "
import struct; f = open('uc.qcow2@b', 'r+b'); f.seek(20); f.write(struct.pack('>I', 40))"
sums=$(md5sum uc.qcow2 uc.qcow2@a uc.qcow2@b)
refuse "$P" snapshot -d a uc.qcow2
[ "$(md5sum uc.qcow2 uc.qcow2@a uc.qcow2@b)" = "$sums" ] || fail "the refused delete changed a file"
cp uc-b.good uc.qcow2@b
run "$P" snapshot -d a uc.qcow2
check_clean uc.qcow2@b
ok

begin pending-commit
# a delete by commit killed after its copy (the marker stands) whose finish
# is blocked (a QEMU reader holds the snapshot's file): other operations
# are refused until it can be finished, and the deleted snapshot never
# comes back half overwritten
chain_ab pc.qcow2
qemu-img convert -O raw pc.qcow2@b ref-pcb.raw
qemu-io -c "write -P 3 64k 64k" pc.qcow2 >/dev/null
run "$P" snapshot -c c --external pc.qcow2
PMS_EXTSNAP_KILL_AT=delete-committed "$P" snapshot -d a pc.qcow2 2>/dev/null
[ -e .pc.qcow2@a.deleting ] || fail "setup: no marker"
qemu-io -r -c "sleep 3000" pc.qcow2@a >/dev/null 2>&1 &
qpid=$!
sleep 0.5
refuse "$P" snapshot -d b pc.qcow2
refuse "$P" snapshot -c d --external pc.qcow2
wait $qpid
run "$P" io -c "read 0 1" pc.qcow2
"$P" snapshot -l pc.qcow2 | grep -q 'pc.qcow2@a' && fail "the deleted snapshot a is listed again"
ls -a | grep -q 'pc.qcow2@a.deleting' && fail "the marker is still there"
same pc.qcow2@b ref-pcb.raw; check_clean pc.qcow2@b
ok

begin refused-unchanged
# a delete that must stream into two children, one held by a QEMU reader:
# refused before either is written
chain_ab ru.qcow2
run "$P" snapshot -a a ru.qcow2
qemu-io -c "write -P 3 64k 64k" ru.qcow2 >/dev/null
run "$P" snapshot -c d --external ru.qcow2
for held in b d; do
    sums=$(md5sum ru.qcow2@b ru.qcow2@d ru.qcow2@a)
    qemu-io -r -c "sleep 1500" ru.qcow2@$held >/dev/null 2>&1 &
    qpid=$!
    sleep 0.5
    refuse "$P" snapshot -d a ru.qcow2
    wait $qpid
    [ "$(md5sum ru.qcow2@b ru.qcow2@d ru.qcow2@a)" = "$sums" ] ||
        fail "a delete refused for a reader on $held changed a file"
done
# a create killed between its link and its rename: no snapshot (not listed)
PMS_EXTSNAP_KILL_AT=create-link "$P" snapshot -c half --external ru.qcow2 2>/dev/null
"$P" snapshot -l ru.qcow2 | grep -q ' half ' && fail "a snapshot never taken is listed"
refuse "$P" snapshot -d half ru.qcow2
# names as long as the files made of them allow (.IMG@NAME.deleting)
refuse "$P" snapshot -c "$(printf 'n%.0s' $(seq 1 240))" --external ru.qcow2
ok

finish
