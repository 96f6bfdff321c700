#!/bin/bash
# qemu-img / qemu-io write qcow2 images; we read them byte-exact.
# Oracle: qemu-img convert -O raw of the same image (and qemu-img map).
. "$(dirname "$0")/lib.sh"

QIO="qemu-io"

# workload CS: qemu-io -c arguments exercising a cluster size CS:
# unaligned pattern writes spanning clusters, zero writes with and without
# unmap (aligned and not), discards (aligned and not).
workload() {
    local cs=$1
    echo "write -P 0x11 $((cs - 100)) 300"
    echo "write -P 0x22 $((3 * cs + 17)) $((2 * cs + 5))"
    echo "write -P 0x33 $((6 * cs + 1)) 7"
    echo "write -P 0x44 $((8 * cs)) $((3 * cs))"
    echo "write -z $((8 * cs)) $cs"
    echo "write -z -u $((9 * cs)) $cs"
    echo "write -z $((10 * cs + 10)) 20"
    echo "write -P 0x55 $((12 * cs)) $((2 * cs))"
    echo "discard $((12 * cs)) $cs"
    echo "discard $((13 * cs + 5)) 10"
    echo "write -P 0x66 $((4 * cs + cs / 2)) $((cs / 4 + 3))"
    echo "write -z -u $((3 * cs + 20)) 50"
}

qio_workload() {   # IMG CS [qemu-io args...]
    local img=$1 cs=$2; shift 2
    local args=() line
    while IFS= read -r line; do args+=(-c "$line"); done < <(workload "$cs")
    run $QIO "$@" "${args[@]}" "$img"
}

vsize_for() { local cs=$1; local s=$((16 * cs)); [ $s -lt 4194304 ] && s=4194304; echo $s; }

# --- 1. matrix: cluster size x version x refcount width ---------------------
for cs in 512 4096 65536 1048576 2097152; do
    for compat in 0.10 1.1; do
        for rb in 1 8 16 64; do
            [ $compat = 0.10 ] && [ $rb != 16 ] && continue
            # full refcount-width matrix at 512 and 64k; PMS_TEST_FULL=1 everywhere
            [ -z "${PMS_TEST_FULL:-}" ] && [ $rb != 16 ] && [ $cs != 512 ] && [ $cs != 65536 ] && continue
            begin "matrix cs=$cs compat=$compat refcount_bits=$rb"
            img=m.qcow2; rm -f $img
            run qemu-img create -q -f qcow2 -o cluster_size=$cs,compat=$compat,refcount_bits=$rb $img $(vsize_for $cs) || continue
            qio_workload $img $cs || continue
            qcheck $img || continue
            same_raw $img || continue
            map_cmp $img || continue
            info_cmp $img || continue
            ok
        done
    done
done

# --- 2. compressed clusters (zlib and zstd) ----------------------------------
for cs in 4096 65536 2097152; do
    for ct in zlib zstd; do
        begin "compressed cs=$cs type=$ct"
        rm -f src.raw c.qcow2
        run qemu-img create -q -f raw src.raw 8M || continue
        run $QIO -f raw -c "write -P 0x5a 0 3M" -c "write -P 0x17 $((3 * 1048576 + 333)) 1M" src.raw || continue
        # some incompressible data: qemu stores those clusters uncompressed
        head -c 300000 /dev/urandom | dd of=src.raw bs=300000 seek=$((5 * 1048576 + 7)) oflag=seek_bytes iflag=fullblock conv=notrunc status=none
        run qemu-img convert -c -f raw -O qcow2 -o cluster_size=$cs,compression_type=$ct src.raw c.qcow2 || continue
        qcheck c.qcow2 || continue
        same_raw c.qcow2 || continue
        # qemu rewrites part of a compressed cluster (COW from compressed)
        run $QIO -c "write -P 0x99 $((cs + 100)) 1000" -c "write -z $((2 * cs)) $cs" c.qcow2 || continue
        same_raw c.qcow2 || continue
        map_cmp c.qcow2 || continue
        ok
    done
done
# compressed v2 (zlib only)
begin "compressed compat=0.10"
rm -f src.raw c2.qcow2
run qemu-img create -q -f raw src.raw 4M &&
run $QIO -f raw -c "write -P 0x3c 100 2M" src.raw &&
run qemu-img convert -c -f raw -O qcow2 -o compat=0.10,cluster_size=4096 src.raw c2.qcow2 &&
same_raw c2.qcow2 && ok

# --- 3. extended L2 (subclusters) --------------------------------------------
for cs in 16384 65536 2097152; do
    sc=$((cs / 32))
    begin "extended_l2 cs=$cs"
    rm -f x.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=$cs,extended_l2=on x.qcow2 $((8 * cs)) || continue
    run $QIO -c "write -P 0x21 $((sc + 100)) 300" \
             -c "write -P 0x22 $((5 * sc)) $((2 * sc))" \
             -c "write -P 0x23 $((cs - 3 * sc + 7)) $((4 * sc))" \
             -c "write -z $((6 * sc)) $sc" \
             -c "write -z -u $((2 * cs)) $((3 * sc))" \
             -c "write -P 0x24 $((3 * cs + 31 * sc)) $sc" \
             -c "discard $((cs + 2 * sc)) $sc" x.qcow2 || continue
    qcheck x.qcow2 || continue
    same_raw x.qcow2 || continue
    map_cmp x.qcow2 || continue
    # subclusters over a backing file: unallocated subclusters read from backing
    rm -f xb.raw xo.qcow2
    run qemu-img create -q -f raw xb.raw $((8 * cs)) &&
    run $QIO -f raw -c "write -P 0xb1 0 $((8 * cs))" xb.raw &&
    run qemu-img create -q -f qcow2 -o cluster_size=$cs,extended_l2=on -b xb.raw -F raw xo.qcow2 &&
    run $QIO -c "write -P 0x31 $((sc + 5)) 100" -c "write -z $((3 * sc)) $sc" \
             -c "write -P 0x32 $((cs + 17 * sc)) $((2 * sc))" -c "write -z -u $((2 * cs)) $cs" \
             -c "discard $((4 * cs)) $cs" xo.qcow2 &&
    qcheck xo.qcow2 && same_raw xo.qcow2 && map_cmp xo.qcow2 && ok
done

# --- 4. backing chains: qcow2 over qcow2 over raw ------------------------------
for compat in 1.1 0.10; do
  for cs in 4096 65536; do
    begin "backing chain compat=$compat cs=$cs"
    rm -f base.raw mid.qcow2 top.qcow2
    run qemu-img create -q -f raw base.raw 6M &&
    run $QIO -f raw -c "write -P 0xa1 0 6M" -c "write -P 0xa2 $((cs * 3 + 11)) 5000" base.raw &&
    run qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cs -b base.raw -F raw mid.qcow2 &&
    run $QIO -c "write -P 0xb1 $((cs / 2 + 1)) 777" -c "write -P 0xb2 $((cs * 7 - 5)) $((cs + 10))" \
             -c "write -z $((cs * 20)) $((cs * 2))" -c "write -z $((cs * 22 + 100)) 100" mid.qcow2 &&
    run qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cs -b mid.qcow2 -F qcow2 top.qcow2 8M &&
    run $QIO -c "write -P 0xc1 $((cs * 7)) 123" -c "write -P 0xc2 $((6 * 1048576 + 1000)) $((cs * 2))" \
             -c "write -z $((cs * 30 + 1)) $((cs * 2))" -c "discard $((cs * 40)) $((cs * 2))" \
             -c "write -P 0xc3 $((cs * 21 + 9)) 50" top.qcow2 &&
    qcheck mid.qcow2 && qcheck top.qcow2 && same_raw mid.qcow2 && same_raw top.qcow2 &&
    map_cmp top.qcow2 && ok
  done
done

# --- 5. internal snapshots made by qemu-img ------------------------------------
for compat in 1.1 0.10; do
    begin "qemu snapshots compat=$compat"
    rm -f s.qcow2 sc.qcow2 snap-*.raw
    run qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=4096 s.qcow2 4M || continue
    run $QIO -c "write -P 0x01 100 20000" -c "write -P 0x02 1048576 4096" s.qcow2 &&
    run qemu-img snapshot -c first s.qcow2 &&
    run $QIO -c "write -P 0x03 5000 300" -c "write -z 1048576 4096" -c "write -P 0x04 3000000 9999" s.qcow2 &&
    run qemu-img snapshot -c second s.qcow2 &&
    run $QIO -c "write -P 0x05 0 4M" s.qcow2 &&
    run qemu-img snapshot -c third s.qcow2 &&
    run $QIO -c "write -P 0x06 4000 100000" s.qcow2 &&
    run qemu-img snapshot -d third s.qcow2 || continue
    qcheck s.qcow2 || continue
    same_raw s.qcow2 || continue
    # our listing has the same ids and names as qemu-img's
    snaplist qemu-img snapshot -l s.qcow2 > qsnap.txt
    snaplist "$PMS" snapshot -l s.qcow2 > psnap.txt
    if ! cmp -s qsnap.txt psnap.txt; then
        fail "snapshot -l differs: qemu [$(tr '\n' ';' < qsnap.txt)] ours [$(tr '\n' ';' < psnap.txt)]"
        continue
    fi
    # what qemu reads in each snapshot
    bad=0
    for s in first second; do
        qemu-img convert -O raw -l snapshot.name=$s s.qcow2 snap-$s.raw || { fail "qemu convert -l $s"; bad=1; }
    done
    [ $bad = 0 ] || continue
    for s in first second 2; do
        want=$s; [ $s = 2 ] && want=second
        cp s.qcow2 sc.qcow2
        if ! out=$("$PMS" snapshot -a $s sc.qcow2 2>&1); then fail "our snapshot -a $s: $out"; bad=1; continue; fi
        "$PMS" convert -O raw sc.qcow2 p.raw >/dev/null 2>&1
        if ! cmp -s p.raw snap-$want.raw; then fail "after our snapshot -a $s our read differs from qemu's snapshot content"; bad=1; fi
        qemu-img convert -O raw sc.qcow2 q.raw
        if ! cmp -s q.raw snap-$want.raw; then fail "after our snapshot -a $s qemu's read differs from the snapshot"; bad=1; fi
        qcheck sc.qcow2 || bad=1
    done
    [ $bad = 0 ] && ok
done

# --- 6. a lazy-refcounts image left dirty by a qemu-io crash ------------------------
for cs in 4096 65536; do
    begin "dirty lazy_refcounts image cs=$cs"
    rm -f lz.qcow2
    run qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=$cs lz.qcow2 4M || continue
    run qemu-io -c "write -P 0x11 1000 100000" -c "write -P 0x12 2M 3000" -c flush lz.qcow2 || continue
    ( qemu-io -c "write -P 0x13 1M 70000" -c "write -z 1000 500" -c abort lz.qcow2 ) >/dev/null 2>&1   # "crashes"
    same_raw lz.qcow2 || continue        # read-only: no repair, same bytes as qemu
    cp q.raw lz-want.raw
    run qemu-io -f raw -c "write -P 0x14 3M 5000" lz-want.raw || continue
    # writable open repairs the refcounts (as QEMU does), then a write
    run "$PMS" io -c "write -P 0x14 3M 5000" lz.qcow2 || continue
    qcheck lz.qcow2 || continue
    if ! out=$(qemu-img compare -f raw -F qcow2 lz-want.raw lz.qcow2 2>&1); then
        fail "after our write to the repaired image: $out"; continue
    fi
    ok
done

# --- 7. odd virtual sizes, images grown by qemu-img resize ----------------------------
begin "unaligned virtual size"
rm -f o.qcow2
run qemu-img create -q -f qcow2 -o cluster_size=65536 o.qcow2 5000192 &&
run qemu-io -c "write -P 0x71 4990000 10192" -c "write -P 0x72 0 100" o.qcow2 &&
same_raw o.qcow2 && info_cmp o.qcow2 && map_cmp o.qcow2 && ok

begin "resized by qemu-img (L1 grows)"
rm -f r.qcow2
run qemu-img create -q -f qcow2 -o cluster_size=512 r.qcow2 1M &&
run qemu-io -c "write -P 0x81 1000 5000" r.qcow2 &&
run qemu-img resize -q r.qcow2 64M &&
run qemu-io -c "write -P 0x82 $((60 * 1048576 + 3)) 100000" r.qcow2 &&
qcheck r.qcow2 && same_raw r.qcow2 && info_cmp r.qcow2 && ok

begin "snapshot of a smaller disk, then resize"
rm -f rs.qcow2 rs2.qcow2
if run qemu-img create -q -f qcow2 -o cluster_size=4096 rs.qcow2 4M &&
   run qemu-io -c "write -P 0x91 0 10000" rs.qcow2 &&
   run qemu-img snapshot -c small rs.qcow2 &&
   run qemu-img resize -q rs.qcow2 8M &&
   run qemu-io -c "write -P 0x92 6M 5000" -c "write -P 0x93 0 100" rs.qcow2 &&
   same_raw rs.qcow2 && run qemu-img convert -O raw -l snapshot.name=small rs.qcow2 small.raw; then
    cp rs.qcow2 rs2.qcow2
    if run "$PMS" snapshot -a small rs2.qcow2 && qcheck rs2.qcow2; then
        vs=$(qemu-img info --output=json rs2.qcow2 | $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
        qemu-img convert -O raw rs2.qcow2 q.raw
        if [ "$vs" != 4194304 ]; then fail "after our snapshot -a, qemu-img info virtual-size $vs, want 4194304 (the snapshot's disk size)"
        elif ! cmp -s -n 4194304 q.raw small.raw; then fail "after our snapshot -a, qemu reads other data than the snapshot held"   # (convert -l pads to the current size)
        else ok; fi
    fi
fi

finish
