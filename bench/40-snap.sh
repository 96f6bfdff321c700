#!/bin/bash
# Snapshot benchmarks on allocated images (issue 8), side by side with their
# references, all in one run.  See docs/benchmarks.md for what each row means.
#  1. snapshot call on fully allocated 1 GiB and 16 GiB regions (every page
#     stored once, flushed, a first snapshot taken), 10 MiB then stored to
#     random 4 KiB pages: call time, pause, bytes written, read back, growth;
#     per snapshot kind (internal; external when the library has it)
#     references: full copy of the region (pwrite + fdatasync to a new file)
#     and QEMU savevm of a VM whose 1 GiB NVDIMM is a file, 1% of it changed
#  2. revert while mapped (1 GiB, 10 MiB changed since the snapshot), then
#     every changed page and a random sample read back, and the live image
#     converted by qemu-img and compared page by page; reference: QEMU loadvm
#  3. first-touch read of 1 GiB through a chain of 100 snapshots vs one layer
#  (rows "external-unmapped": the stores, snapshots and revert without a
#  mapping, through pms_pwrite, as the CLI does; SNAPBENCH_UNMAPPED=0 skips)
#  4. image larger than memory: 64 GiB image, 1 GiB cap, 2 GiB of stores to
#     random pages vs the same stores into an mmap of a sparse raw file
# Knobs (environment): SNAPBENCH_QUICK=1 (1.5-3 minutes: 1 and 2 GiB,
# 3 repetitions, 20 snapshots, 8 GiB image under a 256 MiB cap),
# SNAPBENCH_SIZES_GB, SNAPBENCH_REPS, SNAPBENCH_DIRTY_MB, SNAPBENCH_CHAIN,
# SNAPBENCH_CHAIN_DIRTY_KB, SNAPBENCH_CAP_IMAGE_GB, SNAPBENCH_CAP_MB,
# SNAPBENCH_CAP_STORE_MB, SNAPBENCH_CAP_SECS (time limit of the stores),
# SNAPBENCH_FULLCOPY_REPS, SNAPBENCH_QEMU=0 (no savevm row),
# SNAPBENCH_DIR (scratch; default $TMPDIR or /var/tmp).
set -u
BUILD=${BUILDDIR:-build}
SB=$BUILD/bench/snap-bench
[ -x "$SB" ] || { echo "snap-bench not built ($SB)"; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)

if [ -n "${SNAPBENCH_QUICK:-}" ]; then
    d_sizes="1 2" d_reps=3 d_chain=20 d_capimg=8 d_cap=256 d_capst=512 d_capsecs=30 d_fc=1
else
    d_sizes="1 16" d_reps=5 d_chain=100 d_capimg=64 d_cap=1024 d_capst=2048 d_capsecs=60 d_fc=3
fi
SIZES=${SNAPBENCH_SIZES_GB:-$d_sizes}
REPS=${SNAPBENCH_REPS:-$d_reps}
DIRTY=${SNAPBENCH_DIRTY_MB:-10}
CHAIN=${SNAPBENCH_CHAIN:-$d_chain}
CHAIN_KB=${SNAPBENCH_CHAIN_DIRTY_KB:-1024}
CAPIMG=${SNAPBENCH_CAP_IMAGE_GB:-$d_capimg}
CAP=${SNAPBENCH_CAP_MB:-$d_cap}
CAPST=${SNAPBENCH_CAP_STORE_MB:-$d_capst}
CAPSECS=${SNAPBENCH_CAP_SECS:-$d_capsecs}
FCREPS=${SNAPBENCH_FULLCOPY_REPS:-$d_fc}
FIRST=${SIZES%% *}

T=$(mktemp -d "${SNAPBENCH_DIR:-${TMPDIR:-/var/tmp}}/pms-snapbench.XXXXXX")
R=$T/res
mkdir -p "$R" "$T/trash"
qemu_pid=
# Files written at random pages hold ~100,000s of extents; on a file system
# mounted with `discard` deleting one takes minutes.  Those go to $T/trash and
# the scratch directory is deleted in the background (idle I/O class) at exit.
cleanup() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
    setsid nohup ionice -c3 rm -rf "$T" >/dev/null 2>&1 </dev/null &
}
trash() { mv "$@" "$T/trash/"; }
trap cleanup EXIT
log() { echo "  [$(date -u +%H:%M:%S)] $*"; }
free_gb() { df -P -BG "$T" | awk 'NR==2 { sub("G", "", $4); print $4 }'; }
echo "$(date -u +%FT%TZ) load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (2 shared vCPUs; other builds make these numbers noisy)" | tee "$R/load0"

# every file of a kind's directory must pass qemu-img check (layers too)
check_all() {
    local dir=$1 out=$2 n=0 bad=0 f
    for f in "$dir"/*; do
        case "$f" in *.gen|*.raw) continue ;; esac
        n=$((n + 1))
        if ! qemu-img check -q "$f" >"$T/check.log" 2>&1; then
            bad=$((bad + 1)); echo "check_fail $(basename "$f"): $(head -1 "$T/check.log")" >>"$out"
        fi
    done
    echo "check_files $n" >>"$out"; echo "check_bad $bad" >>"$out"
}

# which kinds exist at all (a first snapshot of a small mapped image)
KINDS=
for k in internal external; do
    mkdir -p "$T/probe-$k"
    qemu-img create -q -f qcow2 "$T/probe-$k/p.qcow2" 1M
    if "$SB" probe "$k" "$T/probe-$k/p.qcow2" >"$R/probe-$k" 2>&1 && grep -q '^ok' "$R/probe-$k"; then
        KINDS="$KINDS $k"
    else
        [ -s "$R/probe-$k" ] || echo "na snap-bench probe failed" >"$R/probe-$k"
        grep -q '^na ' "$R/probe-$k" || sed -i '1s/^/na /' "$R/probe-$k"
    fi
    rm -rf "$T/probe-$k"
done
log "kinds available:${KINDS:- none}"

# 1 + 2. snapshot call (and revert on the first size)
# (external-unmapped: the same through pms_pwrite and an unmapped device, as
# the CLI does; first size only)
# (internal-nowb, external-nowb: no background writeback round during the
# stores, so the call writes and syncs everything since the last snapshot;
# first size only)
# (external-syncwp: dirty tracking by synchronous write-protect faults,
# PMS_DIRTY_SYNC_WP, instead of the auto choice (WP_ASYNC + PAGEMAP_SCAN,
# whose scans walk every resident page's table entry); every size, so the
# large size is compared with the first in the same mode)
UNMAPPED=; [ "${SNAPBENCH_UNMAPPED:-1}" != 0 ] && UNMAPPED=external-unmapped
for gb in $SIZES; do
    for row in internal external external-syncwp internal-nowb external-nowb $UNMAPPED; do
        k=${row%-nowb} wbms= dirty_mode=
        [ "$row" != "$k" ] && wbms=100000
        [ "$row" = external-syncwp ] && k=external dirty_mode=2
        case $row in internal|external|external-syncwp) ;; *) [ "$gb" != "$FIRST" ] && continue ;; esac
        out=$R/snap-$row-$gb
        if [ "$k" != external-unmapped ] && ! [[ " $KINDS " == *" $k "* ]]; then
            cp "$R/probe-$k" "$out"; continue
        fi
        if [ "$(free_gb)" -lt $((gb + gb / 4 + 4)) ]; then
            echo "na skipped: $(free_gb) GiB free in $T, need $((gb + gb / 4 + 4))" >"$out"; continue
        fi
        dir=$T/snap-$row-$gb
        mkdir -p "$dir"
        qemu-img create -q -f qcow2 "$dir/img.qcow2" "${gb}G"
        rv=; [ "$gb" = "$FIRST" ] && rv=revert
        log "snapshot $row ${gb} GiB: fill, $REPS x ($DIRTY MiB of stores + snapshot) $rv"
        SNAPBENCH_WB_MS=${wbms:-${SNAPBENCH_WB_MS:-0}} SNAPBENCH_DIRTY=${dirty_mode:-${SNAPBENCH_DIRTY:-}} \
            "$SB" snap "$k" "$dir/img.qcow2" "$DIRTY" "$REPS" $rv >"$out" 2>&1 || echo "error exit $?" >>"$out"
        check_all "$dir" "$out"
        if [ -n "$rv" ] && [ -f "$dir/img.qcow2.gen" ]; then
            # oracle: QEMU reads the live image (and its chain) after the revert
            qemu-img convert -O raw "$dir/img.qcow2" "$dir/live.raw" &&
                "$SB" verify-raw "$dir/live.raw" "$dir/img.qcow2.gen" >>"$out" 2>&1
        fi
        echo "files $(ls "$dir" | grep -vc '\.gen$\|\.raw$')" >>"$out"
        rm -rf "$dir"
    done
done

# full-copy reference: the whole region written with pwrite + fdatasync
for gb in $FIRST; do
    for i in $(seq "$FCREPS"); do
        "$SB" fullcopy "$T/full.bin" $((gb * 1024)) >>"$R/fullcopy" 2>&1
        rm -f "$T/full.bin"
    done
done
log "full copy ${FIRST} GiB done"

# QEMU savevm / loadvm of a VM whose 1 GiB NVDIMM is a memory-backend-file
if [ "${SNAPBENCH_QEMU:-1}" != 0 ]; then
    if ! command -v qemu-system-x86_64 >/dev/null; then
        echo "na skipped: qemu-system-x86_64 not installed" >"$R/qemu"
    else
        q=$T/qemu; mkdir -p "$q"
        "$SB" fullcopy "$q/nvdimm.img" 1024 >/dev/null       # every page holds data
        qemu-img create -q -f qcow2 "$q/vmstate.qcow2" 16M
        timeout 600 qemu-system-x86_64 -machine pc,nvdimm=on -accel tcg -m 128M,slots=2,maxmem=4G \
            -object memory-backend-file,id=nv,share=on,mem-path="$q/nvdimm.img",size=1G \
            -device nvdimm,id=nvdimm1,memdev=nv \
            -drive if=none,id=vmstate,file="$q/vmstate.qcow2",format=qcow2 \
            -nodefaults -display none -S -qmp unix:"$q/qmp.sock",server=on,wait=off \
            >"$q/qemu.log" 2>&1 &
        qemu_pid=$!
        log "QEMU savevm/loadvm (TCG, stopped VM, 1 GiB NVDIMM)"
        if timeout 600 python3 - "$q/qmp.sock" "$q/nvdimm.img" >"$R/qemu" 2>&1 <<'EOF'
# savevm s0; change 1% of the NVDIMM file's pages; time savevm s1; change
# another 1%; time loadvm s1 (the revert reference).  Errors: one line, exit 1.
import json, os, random, socket, sys, time
sock, nvfile = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
for i in range(200):
    try:
        s.connect(sock)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit('na skipped: no QMP socket (QEMU did not start)')
f = s.makefile('rw')
def cmd(c, **a):
    f.write(json.dumps({'execute': c, 'arguments': a}) + '\n')
    f.flush()
    while True:
        line = f.readline()
        if not line:
            sys.exit('na skipped: QEMU closed the QMP connection')
        r = json.loads(line)
        if 'return' in r or 'error' in r:
            return r
f.readline()
cmd('qmp_capabilities')
def hmp(line):
    t = time.monotonic()
    r = cmd('human-monitor-command', **{'command-line': line})
    t = time.monotonic() - t
    msg = r['return'] if 'return' in r else r['error'].get('desc', '')
    if 'error' in r or msg.strip():
        sys.exit('na skipped: %s: %s' % (line, msg.strip()))
    return t
rng = random.Random(1)
def dirty():
    fd = os.open(nvfile, os.O_RDWR)
    n = os.fstat(fd).st_size // 4096
    for p in rng.sample(range(n), n // 100):
        os.pwrite(fd, os.urandom(8) * 512, p * 4096)
    os.close(fd)
hmp('savevm s0')
dirty()
sv = hmp('savevm s1')
dirty()
lv = hmp('loadvm s1')
print('savevm_ms %.1f\nloadvm_ms %.1f' % (sv * 1e3, lv * 1e3))
cmd('quit')
EOF
        then
            echo "vmstate $(qemu-img snapshot -l "$q/vmstate.qcow2" | awk '$2 == "s1" { print $3 $4 }')" >>"$R/qemu"
        else
            grep -q '^na ' "$R/qemu" || { tail -1 "$R/qemu" | sed 's/^/na skipped: /' >"$R/qemu.tmp"; mv "$R/qemu.tmp" "$R/qemu"; }
            echo "qemu_log $(tail -1 "$q/qemu.log")" >>"$R/qemu"
        fi
        kill "$qemu_pid" 2>/dev/null; wait "$qemu_pid" 2>/dev/null; qemu_pid=
        rm -rf "$q"
    fi
else
    echo "na skipped: SNAPBENCH_QEMU=0" >"$R/qemu"
fi

# 3. first-touch read through a chain of snapshots vs one layer
for k in internal external $UNMAPPED; do
    out=$R/chain-$k
    if [ "$k" != external-unmapped ] && ! [[ " $KINDS " == *" $k "* ]]; then
        cp "$R/probe-$k" "$out"; continue
    fi
    dir=$T/chain-$k; mkdir -p "$dir"
    qemu-img create -q -f qcow2 "$dir/img.qcow2" "${FIRST}G"
    log "chain $k: $CHAIN snapshots, $CHAIN_KB KiB stored before each"
    "$SB" chain "$k" "$dir/img.qcow2" "$CHAIN" "$CHAIN_KB" >"$out" 2>&1 || echo "error exit $?" >>"$out"
    check_all "$dir" "$out"
    echo "files $(ls "$dir" | grep -vc '\.onelayer$')" >>"$out"
    trash "$dir"
done

# 4. image larger than memory, and the same stores into a sparse raw file
if [ "$(free_gb)" -lt $((CAPST / 1024 * 2 + 4)) ]; then
    echo "na skipped: $(free_gb) GiB free, need $((CAPST / 1024 * 2 + 4))" >"$R/cap"
    cp "$R/cap" "$R/cap-mmap"
else
    qemu-img create -q -f qcow2 "$T/cap.qcow2" "${CAPIMG}G"
    log "cap: ${CAPIMG} GiB image, ${CAP} MiB cap, ${CAPST} MiB of random page stores (at most ${CAPSECS} s)"
    "$SB" cap "$T/cap.qcow2" "$CAP" "$CAPST" "$CAPSECS" >"$R/cap" 2>&1 || echo "error exit $?" >>"$R/cap"
    qemu-img check -q "$T/cap.qcow2" >/dev/null 2>&1; echo "check_bad $?" >>"$R/cap"
    echo "du_MiB $(( $(du -k "$T/cap.qcow2" | cut -f1) / 1024 ))" >>"$R/cap"
    trash "$T/cap.qcow2"
    truncate -s "${CAPIMG}G" "$T/cap.raw"
    "$SB" cap-mmap "$T/cap.raw" "$CAPST" "$CAPSECS" >"$R/cap-mmap" 2>&1 || echo "error exit $?" >>"$R/cap-mmap"
    trash "$T/cap.raw"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg); $SECONDS s in all" | tee "$R/load1"

SIZES="$SIZES" FIRST="$FIRST" DIRTY="$DIRTY" REPS="$REPS" CHAIN="$CHAIN" CHAIN_KB="$CHAIN_KB" \
CAPIMG="$CAPIMG" CAP="$CAP" CAPST="$CAPST" python3 "$here/snap-table.py" "$R"
