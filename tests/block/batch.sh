#!/bin/bash
# Batched writes (bdev_pwrite_batch, the way the memory device writes back),
# judged by QEMU.  Images are made by qemu-img/qemu-io (64 KiB, 4 KiB and
# 1 MiB clusters, extended L2, an internal snapshot taken by qemu-img,
# backing files, compressed and zero clusters); pms-testtool batch writes a
# list of sorted runs (whole pages, unaligned bytes, runs crossing clusters,
# touching runs) with the fill callback supplying the uncovered bytes from a
# raw copy of the device (ref), from part of it (partial), never (false,
# none).  The same runs written by qemu-io into a raw copy are the reference:
#   - qemu-img check: no errors, no leaks;
#   - qemu-img compare with the raw reference;
#   - the snapshot still reads its old bytes (qemu-img convert -l);
#   - the same runs written by qemu-io into a copy of the starting image give
#     the same L2 entries (type, COPIED, subcluster bitmaps) and the same
#     qemu-img map (offsets aside);
#   - fill mode "marker" answers 0xee for every byte: on a fully allocated
#     image with a snapshot (every cluster shared) each rewritten cluster
#     must hold 0xee around the runs, which proves no old byte was read back.
. "$(dirname "$0")/lib.sh"

# genruns SIZE CS SEED N: sorted, non-overlapping "OFF LEN PATTERN" lines
genruns() {
    $PY - "$@" <<'PY'
import random, sys
size, cs, seed, n = (int(a) for a in sys.argv[1:5])
r = random.Random(seed)
runs = []
for _ in range(n):
    k = r.random()
    if k < 0.45:                                  # pages, as the memory device writes
        off = r.randrange(size // 4096) * 4096
        ln = 4096 * r.randint(1, 3)
    elif k < 0.7:                                 # unaligned bytes
        off = r.randrange(size)
        ln = r.randint(1, 700)
    else:                                         # around and across cluster boundaries
        off = max(0, r.randrange(size // cs) * cs - r.randint(0, 3000))
        ln = r.randint(1, 2 * cs)
    runs.append([off, min(ln, size - off)])
runs.sort()
out, end = [], 0
for off, ln in runs:
    if off < end:
        if r.random() < 0.5:
            continue
        ln -= end - off                           # make it touch the previous run
        off = end
    if ln <= 0:
        continue
    out.append((off, ln, r.randint(1, 255)))
    end = off + ln
for o, l, p in out:
    print(o, l, p)
PY
}

# l2dump IMG: the L2 entries, host offsets aside (see l2dump.py)
l2dump() { $PY "$SRCDIR_BLOCK/l2dump.py" "$1"; }

# marker_ref REF RUNS CS OUT: the reference with every cluster a run touches
# set to 0xee first (what fill mode "marker" must produce on shared clusters)
marker_ref() {
    $PY - "$@" <<'PY'
import sys
ref, runs, cs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
b = bytearray(open(ref, 'rb').read())
rl = [tuple(int(x) for x in l.split()) for l in open(runs) if l.strip()]
for o, l, p in rl:
    for c in range(o // cs, (o + l - 1) // cs + 1):
        b[c * cs:(c + 1) * cs] = b'\xee' * len(b[c * cs:(c + 1) * cs])
for o, l, p in rl:
    b[o:o + l] = bytes([p]) * l
open(out, 'wb').write(b)
PY
}

# mapnorm: qemu-img map --output=json without host offsets, extents with
# the same flags merged (where QEMU put a cluster is not compared, nor the
# "zero" of data extents: it reports holes of the host file, which the file
# system makes and fills as it likes, e.g. ext4 zeroing small gaps)
mapnorm() {
    $PY -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    k = (e["depth"], e["present"], e["zero"] and not e["data"], e["data"])
    if out and out[-1][1] == k and out[-1][0][1] == e["start"]:
        out[-1][0][1] = e["start"] + e["length"]
    else:
        out.append([[e["start"], e["start"] + e["length"]], k])
for (a, b), k in out:
    print(a, b, *k)
'
}

# qio_runs IMG FMT RUNS: write the runs with qemu-io
qio_runs() {
    local img=$1 fmt=$2 runs=$3
    awk '{printf "write -q -P %d %d %d\n", $3, $1, $2}' "$runs" > qio-cmds.txt
    run qemu-io -f "$fmt" "$img" < qio-cmds.txt
}

# bcase NAME SIZE OPTS SETUP SNAP BACKING MODE PER SEED NRUNS
#   SETUP: full (every byte written) | sparse (some data, zeroes, a
#   compressed cluster); SNAP: yes|no; BACKING: yes|no (image is an overlay
#   of a base made the SETUP way); MODE: fill mode; PER: runs per batch (0 all)
bcase() {
    local name=$1 size=$2 opts=$3 setup=$4 snap=$5 backing=$6 mode=$7 per=$8 seed=$9 nruns=${10}
    begin "$name"
    rm -f img.qcow2 base.qcow2 q.qcow2 ref.raw snap0.raw snap1.raw exp.raw
    local cs
    cs=$(echo "$opts" | sed -n 's/.*cluster_size=\([0-9kKmM]*\).*/\1/p')
    cs=$(numfmt --from=iec "$(echo "${cs:-64k}" | tr km KM)")
    local target=img.qcow2
    if [ "$backing" = yes ]; then
        run qemu-img create -q -f qcow2 base.qcow2 "$size" || return
        target=base.qcow2
    else
        run qemu-img create -q -f qcow2 -o "$opts" img.qcow2 "$size" || return
    fi
    if [ "$setup" = full ]; then
        run qemu-io -c "write -q -P 0x5a 0 $size" "$target" || return
    else
        run qemu-io -c "write -q -P 0x31 $((cs / 2)) $((5 * cs))" -c "write -q -z $((2 * cs)) $cs" \
            -c "write -q -c -P 0x32 $((8 * cs)) $cs" -c "write -q -P 0x33 $((12 * cs + 100)) 5000" \
            "$target" || return
    fi
    if [ "$backing" = yes ]; then
        run qemu-img create -q -f qcow2 -o "$opts" -b base.qcow2 -F qcow2 img.qcow2 || return
        run qemu-io -c "write -q -P 0x34 $((3 * cs)) $((cs + 2048))" img.qcow2 || return
    fi
    if [ "$snap" = yes ]; then
        run qemu-img snapshot -c s1 img.qcow2 || return
        run qemu-img convert -l snapshot.name=s1 -O raw img.qcow2 snap0.raw || return
    fi
    genruns "$(numfmt --from=iec "$size")" "$cs" "$seed" "$nruns" > runs.txt
    run qemu-img convert -O raw img.qcow2 ref.raw || return
    cp img.qcow2 q.qcow2
    qio_runs ref.raw raw runs.txt || return
    qio_runs q.qcow2 qcow2 runs.txt || return
    local out
    if ! out=$("$TT" batch -m "$mode" -r ref.raw -b "$per" -t runs.txt img.qcow2 2>&1); then
        fail "batch: $out"; return
    fi
    qcheck img.qcow2 || return
    if [ "$mode" = marker ]; then
        marker_ref ref.raw runs.txt "$cs" exp.raw
        if ! out=$(qemu-img compare -f qcow2 -F raw img.qcow2 exp.raw 2>&1); then
            fail "marker: bytes read back instead of filled: $out"; return
        fi
    else
        if ! out=$(qemu-img compare -f qcow2 -F raw img.qcow2 ref.raw 2>&1); then
            fail "qemu-img compare with the qemu-io reference: $out"; return
        fi
        # the same runs written one by one by qemu-io: same metadata
        if ! out=$(diff <(l2dump q.qcow2) <(l2dump img.qcow2) 2>&1); then
            fail "L2 entries differ from qemu-io's (cluster type copied offset zero bitmap; < qemu > ours): $(echo "$out" | head -n 6 | tr '\n' '|')"
            return
        fi
        if ! out=$(diff <(qemu-img map --output=json q.qcow2 | mapnorm) \
                        <(qemu-img map --output=json img.qcow2 | mapnorm) 2>&1); then
            fail "qemu-img map differs from the qemu-io-written copy: $(echo "$out" | head -n 4 | tr '\n' '|')"
            return
        fi
    fi
    if [ "$snap" = yes ]; then
        run qemu-img convert -l snapshot.name=s1 -O raw img.qcow2 snap1.raw || return
        cmp -s snap0.raw snap1.raw || { fail "snapshot s1 changed"; return; }
    fi
    ok "$(echo "$out" | tail -n 1) $(echo "$mode" | tr -d '\n')"
}

if [ -n "${PMS_SANITIZED:-}" ]; then SZ=4M; N=60; else SZ=8M; N=150; fi
#     name                    size opts                                  setup  snap backing mode    per seed runs
bcase 64k-sparse-none         $SZ  cluster_size=64k                      sparse no   no      none    0   1    $N
bcase 64k-sparse-ref          $SZ  cluster_size=64k                      sparse no   no      ref     0   2    $N
bcase 64k-full-snap-ref       $SZ  cluster_size=64k                      full   yes  no      ref     0   3    $N
bcase 64k-full-snap-partial   $SZ  cluster_size=64k                      full   yes  no      partial 7   4    $N
bcase 64k-full-snap-false     $SZ  cluster_size=64k                      full   yes  no      false   0   5    $N
bcase 64k-full-snap-marker    $SZ  cluster_size=64k                      full   yes  no      marker  0   6    $N
bcase 64k-sparse-snap-ref     $SZ  cluster_size=64k                      sparse yes  no      ref     0   7    $N
bcase 4k-full-snap-ref        $SZ  cluster_size=4k                       full   yes  no      ref     0   8    $N
bcase 4k-sparse-partial       $SZ  cluster_size=4k                       sparse no   no      partial 0   9    $N
bcase 4k-full-snap-marker     $SZ  cluster_size=4k                       full   yes  no      marker  0   10   $N
bcase 512-sparse-snap-ref     2M   cluster_size=512,refcount_bits=64     sparse yes  no      ref     5   11   $N
bcase v2-sparse-snap-none     $SZ  cluster_size=64k,compat=0.10          sparse yes  no      none    0   12   $N
bcase backing-64k-ref         $SZ  cluster_size=64k                      full   no   yes     ref     0   13   $N
bcase backing-64k-none        $SZ  cluster_size=64k                      sparse yes  yes     none    3   14   $N
bcase extl2-full-snap-ref     $SZ  cluster_size=64k,extended_l2=on       full   yes  no      ref     0   15   $N
bcase extl2-full-snap-marker  $SZ  cluster_size=64k,extended_l2=on       full   yes  no      marker  0   16   $N
bcase extl2-sparse-partial    $SZ  cluster_size=64k,extended_l2=on       sparse no   no      partial 0   17   $N
bcase extl2-backing-ref       $SZ  cluster_size=64k,extended_l2=on       full   no   yes     ref     0   18   $N
bcase extl2-backing-none      $SZ  cluster_size=64k,extended_l2=on       sparse yes  yes     none    9   19   $N
bcase extl2-32k-backing-false $SZ  cluster_size=32k,extended_l2=on       full   yes  yes     false   0   20   $N
bcase extl2-1m-backing-partial 16M cluster_size=1M,extended_l2=on        full   no   yes     partial 0   21   $N
bcase extl2-1m-sparse-snap-ref 16M cluster_size=1M,extended_l2=on        sparse yes  no      ref     0   22   $N

# Write order with L2 tables evicted mid-batch (512-byte clusters: 128
# tables, a 16-table cache): every write of an L2 table must come after an
# fdatasync that follows the last data write (data and refcounts durable
# before any table can link them), judged on the system calls.
begin order-with-evictions
if ! command -v strace >/dev/null; then
    echo "skip [order-with-evictions]: no strace"
elif [ -n "${PMS_SANITIZED:-}" ]; then
    echo "skip [order-with-evictions]: sanitizer build (no ptrace)"
else
    rm -f img.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 4M
    genruns 4194304 512 77 300 > runs.txt
    if ! out=$(strace -f -e trace=openat,pwrite64,fdatasync,fsync -o trace.txt \
                 "$TT" batch -L 1 runs.txt img.qcow2 2>&1); then
        fail "batch: $out"
    elif ! out=$($PY - trace.txt img.qcow2 <<'PY'
import re, struct, sys
trace, img = sys.argv[1], sys.argv[2]
f = open(img, 'rb'); h = f.read(112)
cs = 1 << struct.unpack('>I', h[20:24])[0]
l1n, l1off = struct.unpack('>I', h[36:40])[0], struct.unpack('>Q', h[40:48])[0]
rto, rtc = struct.unpack('>Q', h[48:56])[0], struct.unpack('>I', h[56:60])[0]
f.seek(l1off); l2s = {e & 0x00fffffffffffe00 for e in struct.unpack('>%dQ' % l1n, f.read(8 * l1n))} - {0}
f.seek(rto); rbs = {e & ~511 for e in struct.unpack('>%dQ' % (rtc * cs // 8), f.read(rtc * cs))} - {0}
fd = None; data_since_sync = False; tables = 0; bad = []
for line in open(trace):
    m = re.search(r'openat\(AT_FDCWD, "([^"]*)".*= (\d+)$', line)
    if m and m.group(1) == img: fd = m.group(2); continue
    if fd is None: continue
    if re.search(r'(fdatasync|fsync)\(%s\)' % fd, line): data_since_sync = False; continue
    m = re.search(r'pwrite64\(%s, .*, (\d+), (\d+)\) = ' % fd, line)
    if not m: continue
    ln, off = int(m.group(1)), int(m.group(2))
    c = off - off % cs
    if c in l2s and off % cs == 0 and ln == cs:
        tables += 1
        if data_since_sync: bad.append(off)
    elif c in rbs or off < cs or l1off <= off < l1off + 8 * l1n or rto <= off < rto + rtc * cs:
        pass
    else:
        data_since_sync = True
if tables < 20: print("only %d L2 table writes: no evictions exercised" % tables); sys.exit(1)
if bad: print("%d L2 table writes after data without an fdatasync between (first at %d)" % (len(bad), bad[0])); sys.exit(1)
print("%d L2 table writes, each after the data was flushed" % tables)
PY
    ); then
        fail "$out"
    else
        qcheck img.qcow2 && ok "$out"
    fi
fi

# A batch whose runs are not sorted is refused before anything is written.
begin unsorted
printf '65536 10 1\n0 10 2\n' > bad-runs.txt
run qemu-img create -q -f qcow2 img.qcow2 1M
if out=$("$TT" batch bad-runs.txt img.qcow2 2>&1); then
    fail "unsorted runs accepted"
elif ! echo "$out" | grep -q "overlap or are not sorted"; then
    fail "unsorted runs: unexpected message: $out"
elif [ "$(qemu-img map --output=json img.qcow2 | grep -c '"data": true')" != 0 ]; then
    fail "unsorted runs: something was written"
else
    ok
fi
finish
