#!/bin/bash
# qcow2 block engine: `pmemsnap bench` vs `qemu-img bench` side by side, on
# the same images, in one run; then internal snapshot creation on a fully
# allocated 8 GiB image (`pmemsnap snapshot -c` vs `qemu-img snapshot -c`).
#
# Rows (each at depth 1 and 32, cache=writeback, 1 GiB image, 64 KiB clusters):
#   4 KiB reads   of unallocated clusters   (metadata lookup only)
#   4 KiB reads   of allocated clusters
#   4 KiB writes  to unallocated clusters   (step 64 KiB: every write allocates;
#                                            fresh image copy per run)
#   4 KiB writes  to allocated clusters
#   64 KiB writes to unallocated clusters   (fresh image copy per run)
# ratio = pmemsnap ops/s / qemu-img ops/s (> 1: pmemsnap faster).
# pmemsnap serves depth with a pool of min(depth, 16) threads issuing
# synchronous requests; qemu-img keeps `depth` AIO requests in flight.
#
# Environment: PMEMSNAP (binary), BENCH_DIR (scratch, default /var/tmp),
# BENCH_SNAP_SIZE (default 8G), BENCH_QUICK=1 (smaller counts),
# BENCH_ROWS=0 (only the snapshot part).
set -u
here=$(cd "$(dirname "$0")" && pwd)
P=${PMEMSNAP:-$here/../build/tools/pmemsnap}
[ -x "$P" ] || { echo "10-qcow2: no pmemsnap binary at $P (build first)"; exit 1; }
for t in qemu-img qemu-io; do
    command -v $t >/dev/null || { echo "10-qcow2: $t not installed"; exit 1; }
done
W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/pms-bench.XXXXXX") || exit 1
trap 'rm -rf "$W"' EXIT
cd "$W" || exit 1
SNAP_SIZE=${BENCH_SNAP_SIZE:-8G}
q=1; [ "${BENCH_QUICK:-0}" = 1 ] && q=4

die() { echo "10-qcow2: $*"; exit 1; }

# secs TOOL ARGS...: run a bench, print the "Run completed in" seconds
secs() {
    local out
    out=$("$@" 2>&1) || { echo "10-qcow2: failed: $* :: $out" >&2; echo "nan"; return; }
    sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out"
}

printf '%-34s %5s %7s %12s %12s %7s\n' "workload" "depth" "count" "pmemsnap/s" "qemu-img/s" "ratio"
row() { # row LABEL DEPTH COUNT SECS_PMS SECS_QEMU
    awk -v l="$1" -v d="$2" -v c="$3" -v a="$4" -v b="$5" 'BEGIN {
        pa = (a > 0) ? c / a : 0; pb = (b > 0) ? c / b : 0;
        printf "%-34s %5d %7d %12.0f %12.0f %7.2f\n", l, d, c, pa, pb, (pb > 0) ? pa / pb : 0 }'
}

# Images: empty (unallocated) and fully allocated, both 1 GiB.
qemu-img create -q -f qcow2 empty.qcow2 1G || die "create"
cp empty.qcow2 full.qcow2
qemu-img bench -q -w -c 16384 -s 64k -d 32 --pattern=1 full.qcow2 >/dev/null || die "fill"
"$P" info full.qcow2 >/dev/null 2>&1 || die "pmemsnap cannot open qcow2: $("$P" info full.qcow2 2>&1)"

for d in $([ "${BENCH_ROWS:-1}" = 1 ] && echo 1 32); do
    # reads do not modify the image: both tools on the same file
    c=$((100000 / q))
    a=$(secs "$P" bench -c $c -d $d -s 4k empty.qcow2)
    b=$(secs qemu-img bench -c $c -d $d -s 4k empty.qcow2)
    row "4k read, unallocated" $d $c "$a" "$b"
    c=$((100000 / q))
    a=$(secs "$P" bench -c $c -d $d -s 4k full.qcow2)
    b=$(secs qemu-img bench -c $c -d $d -s 4k full.qcow2)
    row "4k read, allocated" $d $c "$a" "$b"
    # allocating writes: one fresh copy of the empty image per tool
    c=$((16000 / q))
    cp empty.qcow2 p.qcow2; cp empty.qcow2 q.qcow2
    a=$(secs "$P" bench -w -c $c -d $d -s 4k -S 64k p.qcow2)
    b=$(secs qemu-img bench -w -c $c -d $d -s 4k -S 64k q.qcow2)
    row "4k write, unallocated (allocating)" $d $c "$a" "$b"
    qemu-img check -q p.qcow2 || echo "   !! image written by pmemsnap bench fails qemu-img check"
    c=$((100000 / q))
    a=$(secs "$P" bench -w -c $c -d $d -s 4k --pattern=2 full.qcow2)
    b=$(secs qemu-img bench -w -c $c -d $d -s 4k --pattern=2 full.qcow2)
    row "4k write, allocated" $d $c "$a" "$b"
    c=$((16000 / q))
    cp empty.qcow2 p.qcow2; cp empty.qcow2 q.qcow2
    a=$(secs "$P" bench -w -c $c -d $d -s 64k p.qcow2)
    b=$(secs qemu-img bench -w -c $c -d $d -s 64k q.qcow2)
    row "64k write, unallocated" $d $c "$a" "$b"
done
qemu-img check -q full.qcow2 || echo "   !! full.qcow2 fails qemu-img check after the runs"
rm -f p.qcow2 q.qcow2 empty.qcow2 full.qcow2

# Internal snapshot of a fully allocated image.  Both tools start from the
# same state: each snapshot is deleted again (refcounts and COPIED flags back
# to 1) before the other tool's run.
avail=$(df -k --output=avail . | tail -1)
need=$(( $(numfmt --from=iec "$SNAP_SIZE") / 1024 + 1048576 ))
if [ "$avail" -lt "$need" ]; then
    echo "snapshot row skipped: need $((need / 1048576)) GiB free in $W"
    exit 0
fi
echo
echo "snapshot -c on a fully allocated $SNAP_SIZE image (64 KiB clusters):"
qemu-img create -q -f qcow2 big.qcow2 "$SNAP_SIZE" || die "create big"
nclus=$(( $(numfmt --from=iec "$SNAP_SIZE") / 65536 ))
t0=$(date +%s.%N)
qemu-img bench -q -w -c $nclus -s 64k -d 32 --pattern=3 big.qcow2 >/dev/null || die "fill big"
t1=$(date +%s.%N)
printf '  filled %s in %.1f s\n' "$SNAP_SIZE" "$(echo "$t1 - $t0" | bc)"
sync
timed() {
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null 2>"$W/timed.err" || { echo "   !! failed: $* :: $(cat "$W/timed.err")" >&2; echo "-1"; return; }
    e=$(date +%s.%N)
    echo "$e - $s" | bc
}
printf '  %-28s %10s %10s %7s\n' "operation" "pmemsnap" "qemu-img" "ratio"
srow() { awk -v l="$1" -v a="$2" -v b="$3" 'BEGIN {
    if (a < 0 || b < 0) { printf "  %-28s %10s %10s\n", l, (a < 0) ? "FAILED" : a "s", (b < 0) ? "FAILED" : b "s"; exit }
    printf "  %-28s %9.3fs %9.3fs %7.2f\n", l, a, b, (a > 0) ? b / a : 0 }'; }
for i in 1 2; do
    b=$(timed qemu-img snapshot -c s$i big.qcow2); bd=$(timed qemu-img snapshot -d s$i big.qcow2)
    a=$(timed "$P" snapshot -c s$i big.qcow2); ad=$(timed "$P" snapshot -d s$i big.qcow2)
    srow "snapshot -c (run $i)" "$a" "$b"
    srow "snapshot -d (run $i)" "$ad" "$bd"
done
# second snapshot on top of an existing one (refcounts 1 -> 2 -> 3)
qemu-img snapshot -c base big.qcow2
b=$(timed qemu-img snapshot -c s3 big.qcow2); qemu-img snapshot -d s3 big.qcow2
a=$(timed "$P" snapshot -c s3 big.qcow2)
srow "snapshot -c with 1 existing" "$a" "$b"
echo "  (ratio = qemu-img time / pmemsnap time; > 1: pmemsnap faster)"
qemu-img check -q big.qcow2 && echo "  qemu-img check after the snapshot runs: clean" ||
    echo "  !! qemu-img check reports problems after the snapshot runs"
