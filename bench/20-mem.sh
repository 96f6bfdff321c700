#!/bin/bash
# Memory-device benchmarks (one run each, side by side with a reference):
#  1. warm loads/stores over a resident region vs plain anonymous memory
#  2. first-touch sequential read of a qcow2 image (in page cache): our mapping
#     vs mmap of the same image exported by qemu-storage-daemon over FUSE
#  3. snapshot time of a 1 GiB and an 8 GiB region with the same 10 MiB
#     dirtied, vs writing the whole 1 GiB region out durably (qemu-img bench -w,
#     one flush at the end: what a savevm of the region costs).  These rows
#     are on EMPTY images (only the dirtied clusters ever allocated, so no
#     copy-on-write); bench/40-snap.sh measures fully allocated ones.
#  4. writeback throughput vs qemu-img bench -w on the same kind of image
#  5. memory cap at scale: 8 GiB image, 256 MiB cap, 1 GiB of random stores
set -u
BUILD=${BUILDDIR:-build}
MB=$BUILD/bench/mem-bench
MT=$BUILD/tests/mem/mem-test
[ -x "$MB" ] || { echo "mem-bench not built ($MB)"; exit 1; }
T=$(mktemp -d /tmp/pms-bench.XXXXXX)
qsd_pid=
cleanup() {
    [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null && wait "$qsd_pid" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
val() { sed -n "s/^$1 //p" "$2"; }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b else 'n/a')" "$1" "$2"; }
row() { printf "%-44s %12s %12s %8s  %s\n" "$@"; }
row "benchmark" "pmemsnap" "reference" "ratio" "(target)"

# 1. warm
echo "(load average: $(cut -d' ' -f1-3 /proc/loadavg); numbers on a shared 2-vCPU VM are noisy)"
qemu-img create -q -f qcow2 "$T/w.qcow2" 1G
WB_MS=100000 "$MB" warm "$T/w.qcow2" 256 >"$T/warm"
row "warm ld+st 256 MiB, GB/s (writeback idle)" "$(val warm_mapping_GBps "$T/warm")" \
    "$(val warm_anon_GBps "$T/warm")" "$(ratio "$(val warm_mapping_GBps "$T/warm")" "$(val warm_anon_GBps "$T/warm")")" "(>=0.95 vs anon)"
row "  same vs anonymous memory without THP" "$(val warm_mapping_GBps "$T/warm")" \
    "$(val warm_anon4k_GBps "$T/warm")" "$(ratio "$(val warm_mapping_GBps "$T/warm")" "$(val warm_anon4k_GBps "$T/warm")")" "(mapping uses 4 KiB pages)"
WARM_SECS=30 WB_MS=1000 "$MB" warm "$T/w.qcow2" 64 >"$T/warm2"
row "warm ld+st 64 MiB 30 s, GB/s (writeback 1 s)" "$(val warm_mapping_GBps "$T/warm2")" \
    "$(val warm_anon4k_GBps "$T/warm2")" "$(ratio "$(val warm_mapping_GBps "$T/warm2")" "$(val warm_anon4k_GBps "$T/warm2")")" "(all pages re-dirtied each round; $(val warm_written_back_MiB "$T/warm2") MiB written back)"

# 2. first-touch sequential read, 1 GiB of data in the page cache
qemu-img create -q -f qcow2 "$T/r.qcow2" 1G
qemu-io -f qcow2 -c "write -P 0x5a 0 1G" "$T/r.qcow2" >/dev/null
cat "$T/r.qcow2" >/dev/null
"$MB" seqread "$T/r.qcow2" >"$T/seq"
PREFETCH=1 "$MB" seqread "$T/r.qcow2" >"$T/seqp"
touch "$T/fuse.img"
qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$T/r.qcow2" \
    --blockdev driver=qcow2,node-name=q,file=f \
    --export type=fuse,id=e,node-name=q,mountpoint="$T/fuse.img",writable=on >"$T/qsd.log" 2>&1 &
qsd_pid=$!
for i in $(seq 50); do
    [ "$(stat -c %s "$T/fuse.img" 2>/dev/null)" = 1073741824 ] && break
    sleep 0.1
done
if [ "$(stat -c %s "$T/fuse.img" 2>/dev/null)" = 1073741824 ]; then
    "$MB" seqread-mmap "$T/fuse.img" >"$T/seqf"
else
    echo "qemu-storage-daemon FUSE export failed: $(cat "$T/qsd.log")"; echo "seqread_mmap_GBps 0" >"$T/seqf"
fi
kill "$qsd_pid"; wait "$qsd_pid" 2>/dev/null; qsd_pid=
row "first-touch seq read 1 GiB, GB/s" "$(val seqread_mapping_GBps "$T/seq")" \
    "$(val seqread_mmap_GBps "$T/seqf")" "$(ratio "$(val seqread_mapping_GBps "$T/seq")" "$(val seqread_mmap_GBps "$T/seqf")")" "(>=2 vs qsd FUSE mmap)"

row "  with opts.prefetch, GB/s" "$(val seqread_mapping_GBps "$T/seqp")" \
    "$(val seqread_mmap_GBps "$T/seqf")" "$(ratio "$(val seqread_mapping_GBps "$T/seqp")" "$(val seqread_mmap_GBps "$T/seqf")")" ""

# 3. snapshots on an empty image: same 10 MiB dirtied in a 1 GiB and an 8 GiB region
qemu-img create -q -f qcow2 "$T/s1.qcow2" 1G
qemu-img create -q -f qcow2 "$T/s8.qcow2" 8G
"$MB" snap "$T/s1.qcow2" 10 >"$T/snap1"
"$MB" snap "$T/s8.qcow2" 10 >"$T/snap8"
qemu-img create -q -f qcow2 "$T/full.qcow2" 1G
qemu-img bench -w -f qcow2 -t writeback -s 1M -c 1024 -d 16 --flush-interval=1024 "$T/full.qcow2" >"$T/full" 2>&1
full_s=$(sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p' "$T/full")
s1=$(val snap_ms "$T/snap1"); s8=$(val snap_ms "$T/snap8")
row "empty image: snapshot 10 MiB, 8 vs 1 GiB, ms" "$s8" "$s1" "$(ratio "$s8" "$s1")" "(<=1.5)"
row "empty image: snapshot 1 GiB vs write it, ms" "$s1" "$(python3 -c "print('%.1f' % ($full_s*1000))")" \
    "$(ratio "$(python3 -c "print($full_s*1000)")" "$s1")x" "(>=50x faster)"
row "  empty image: pause, 1 GiB / 8 GiB, ms" "$(val snap_pause_ms "$T/snap1")" "$(val snap_pause_ms "$T/snap8")" "" ""

# 4. writeback throughput: 256 MiB stored then pms_persist, vs qemu-img bench -w
qemu-img create -q -f qcow2 "$T/wb.qcow2" 1G
"$MB" wb "$T/wb.qcow2" 256 >"$T/wb"
qemu-img create -q -f qcow2 "$T/qb.qcow2" 1G
qemu-img bench -w -f qcow2 -t writeback -s 64K -c 4096 -d 1 --flush-interval=4096 "$T/qb.qcow2" >"$T/qb" 2>&1
qb_s=$(sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p' "$T/qb")
qb=$(python3 -c "print('%.1f' % (256*1048576/$qb_s/1e6))")
row "writeback 256 MiB (fresh image), MB/s" "$(val writeback_MBps "$T/wb")" "$qb" \
    "$(ratio "$(val writeback_MBps "$T/wb")" "$qb")" "(qemu-img bench -w 64K d=1, one flush)"
qemu-img create -q -f qcow2 "$T/pw.qcow2" 1G
"$MB" pwrite "$T/pw.qcow2" 256 >"$T/pw"
row "  same bytes via pms_pwrite (engine only)" "$(val writeback_MBps "$T/wb")" "$(val pwrite_MBps "$T/pw")" \
    "$(ratio "$(val writeback_MBps "$T/wb")" "$(val pwrite_MBps "$T/pw")")" "(memory-device overhead)"

# 5. memory cap at scale
if [ -x "$MT" ]; then
    qemu-img create -q -f qcow2 "$T/cap.qcow2" 8G
    PMS_CAP_SLACK_MB=64 "$MT" cap "$T/cap.qcow2" async 256 1024 | sed 's/^/  /'
fi
