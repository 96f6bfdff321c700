#!/bin/bash
# pmemsnap serve vs qemu-storage-daemon --export type=fuse, side by side in
# one run, on the same kind of image and the same C program (serve-bench.c):
#  first-touch read and write through mmap(MAP_SHARED), warm rewrite, msync;
#  libpmemobj transactions/s (tests/serve/pmdk-counter).
# The kernel gives a FUSE mount a strict 1% share of the dirty-page budget
# (bdi strict_limit, max_ratio); `pmemsnap serve` lifts it when run as root
# (it says so in its stats); qemu-storage-daemon's mount keeps the limit,
# as its users get it.  BENCH_SERVE_MB sets the size (default 512 MiB).
set -u
BUILD=${BUILDDIR:-build}
SB=$BUILD/bench/serve-bench
PC=$BUILD/tests/serve/pmdk-counter
P=${PMEMSNAP:-$BUILD/tools/pmemsnap}
[ -x "$SB" ] || { echo "serve-bench not built ($SB)"; exit 1; }
[ -e /dev/fuse ] || { echo "SKIP: no /dev/fuse"; exit 0; }
MB=${BENCH_SERVE_MB:-512}
T=$(mktemp -d /var/tmp/pms-bench-serve.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    for m in $(awk -v t="$T" 'index($2, t) == 1 { print $2 }' /proc/mounts); do
        umount -l "$m" 2>/dev/null
    done
    rm -rf "$T"
}
trap cleanup EXIT
export PMEM_IS_PMEM_FORCE=0

ours_up() {   # ours_up IMG: export IMG at $T/x.file
    "$P" serve "$1" --fuse "$T/x.file" --socket "$T/x.sock" --pidfile "$T/x.pid" || exit 1
    pids+=("$(cat "$T/x.pid")")
}
ours_down() { "$P" stats --socket "$T/x.sock" | grep '^bdi' >"$T/bdi"; kill "$(cat "$T/x.pid")"
              for _ in $(seq 100); do [ -e "$T/x.pid" ] || break; sleep 0.1; done; }
qsd_up() {
    touch "$T/x.file"
    qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$1" \
        --blockdev driver=qcow2,node-name=q,file=f \
        --export type=fuse,id=e,node-name=q,mountpoint="$T/x.file",writable=on \
        --pidfile "$T/q.pid" --daemonize || exit 1
    pids+=("$(cat "$T/q.pid")")
}
qsd_down() { local p; p=$(cat "$T/q.pid"); kill "$p"; for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; }

run() {   # run ours|qsd OUTFILE
    local who=$1 out=$2
    qemu-img create -q -f qcow2 "$T/data.qcow2" "${MB}M"
    qemu-io -f qcow2 -c "write -P 0x33 0 ${MB}M" "$T/data.qcow2" >/dev/null
    "$SB" evict "$T/data.qcow2"
    ${who}_up "$T/data.qcow2"
    "$SB" read "$T/x.file" "$MB" >"$out"
    ${who}_down
    qemu-img create -q -f qcow2 "$T/empty.qcow2" "${MB}M"
    ${who}_up "$T/empty.qcow2"
    "$SB" write "$T/x.file" "$MB" >>"$out"
    ${who}_down
    if [ -x "$PC" ] && command -v pmempool >/dev/null; then
        qemu-img create -q -f qcow2 "$T/pool.qcow2" 64M
        ${who}_up "$T/pool.qcow2"
        "$PC" create "$T/x.file" && "$PC" run "$T/x.file" 300 "$T/progress" | sed "s/^counter [0-9]* tx\/s /pmdk-tx /" >>"$out"
        ${who}_down
    fi
    rm -f "$T"/*.qcow2
}
val() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1] or 0),float(sys.argv[2] or 0); print('%.2f' % (a/b) if b else 'n/a')" "$1" "$2"; }
row() { printf "%-34s %12s %12s %8s  %s\n" "$@"; }

echo "(load average: $(cut -d' ' -f1-3 /proc/loadavg); $MB MiB images; a shared 2-vCPU VM: numbers are noisy)"
run ours "$T/ours.out"
run qsd "$T/qsd.out"
row "mmap of the FUSE file" "pmemsnap" "qsd" "ratio" "(target)"
for k in first-touch-read first-touch-write warm-rewrite msync; do
    row "$k, GB/s" "$(val $k "$T/ours.out")" "$(val $k "$T/qsd.out")" \
        "$(ratio "$(val $k "$T/ours.out")" "$(val $k "$T/qsd.out")")" \
        "$(case $k in first-touch-*) echo '(>= 2)';; esac)"
done
if grep -q pmdk-tx "$T/ours.out"; then
    row "libpmemobj transactions/s" "$(val pmdk-tx "$T/ours.out")" "$(val pmdk-tx "$T/qsd.out")" \
        "$(ratio "$(val pmdk-tx "$T/ours.out")" "$(val pmdk-tx "$T/qsd.out")")" "(>= 2; each msync is durable on both)"
fi
echo "pmemsnap's mount: $(sed 's/^bdi: //' "$T/bdi"); qemu-storage-daemon's: kernel defaults (strict_limit=1)"
echo "details: ours: $(tr '\n' ';' < "$T/ours.out")"
echo "         qsd:  $(tr '\n' ';' < "$T/qsd.out")"
