#!/bin/bash
# We write qcow2 images; QEMU must accept them: qemu-img check clean,
# qemu-io read -P of every region, qemu-img compare against a reference made
# by qemu-io from the same script, snapshots usable by qemu-img both ways,
# and qemu-img info agreeing with ours.
. "$(dirname "$0")/lib.sh"

# scenario NAME SIZE CREATE_OPTS SCRIPT [backing args for create]:
# ours: $PMS create + play; ref: qemu-img create + qemu-io play.  Then check,
# verify, compare, info.
scenario() {
    local name=$1 size=$2 opts=$3 script=$4; shift 4
    local bargs=("$@")
    begin "$name"
    rm -f ours.qcow2 ref.qcow2
    run "$PMS" create -f qcow2 -o "$opts" "${bargs[@]}" ours.qcow2 $size || return
    run qemu-img create -q -f qcow2 -o "$opts" "${bargs[@]}" ref.qcow2 $size || return
    play ours ours.qcow2 "$script" || return
    play qemu ref.qcow2 "$script" || return
    qcheck ours.qcow2 || return
    local margs=()
    if [ ${#bargs[@]} -gt 0 ]; then
        qemu-img convert -O raw "${bargs[1]}" base-flat.raw
        margs=(--base base-flat.raw --unknown-discard)
    fi
    qverify ours.qcow2 $(numfmt --from=iec $size) "$script" "${margs[@]}" || return
    local out
    if ! out=$(qemu-img compare -f qcow2 -F qcow2 ours.qcow2 ref.qcow2 2>&1); then
        fail "qemu-img compare with qemu-made reference: $out"; return
    fi
    info_cmp ours.qcow2 || return
    same_raw ours.qcow2 || return   # and our reader agrees with qemu's
    ok
}

# --- 1. matrix of formats, plain writes/zeroes/discards ----------------------
mkscript_basic() {
    local cs=$1
    cat <<S
io write -P 0x11 $((cs - 100)) 300
io write -P 0x22 $((3 * cs + 17)) $((2 * cs + 5))
io write -P 0x33 $((6 * cs + 1)) 7
io write -P 0x44 $((8 * cs)) $((3 * cs))
io write -z $((8 * cs)) $cs
io write -z -u $((9 * cs)) $cs
io write -z $((10 * cs + 10)) 20
io write -P 0x55 $((12 * cs)) $((2 * cs))
io discard $((12 * cs)) $cs
io flush
io write -P 0x66 $((4 * cs + cs / 2)) $((cs / 4 + 3))
io write -P 0x77 $((14 * cs - 1)) 2
S
}
for cs in 512 4096 65536 2097152; do
    mkscript_basic $cs > basic-$cs.txt
    size=$((16 * cs)); [ $size -lt 4194304 ] && size=4194304
    for v in "compat=1.1,refcount_bits=16" "compat=1.1,refcount_bits=1" "compat=1.1,refcount_bits=64" \
             "compat=1.1,refcount_bits=8" "compat=0.10"; do
        # refcount widths at 512 and 64k only, unless PMS_TEST_FULL=1
        [ -z "${PMS_TEST_FULL:-}" ] && [ $cs != 512 ] && [ $cs != 65536 ] &&
            case $v in *=1|*=8|*=64) continue ;; esac
        scenario "basic cs=$cs $v" $size "cluster_size=$cs,$v" basic-$cs.txt
    done
done

# --- 2. extended L2 -------------------------------------------------------------
for cs in 65536 2097152; do
    sc=$((cs / 32))
    cat > xl2-$cs.txt <<S
io write -P 0x21 $((sc + 100)) 300
io write -P 0x22 $((5 * sc)) $((2 * sc))
io write -P 0x23 $((cs - 3 * sc + 7)) $((4 * sc))
io write -z $((6 * sc)) $sc
io write -z -u $((2 * cs)) $((3 * sc))
io write -P 0x24 $((3 * cs + 31 * sc)) $sc
S
    scenario "extended_l2 cs=$cs" $((8 * cs)) "cluster_size=$cs,extended_l2=on" xl2-$cs.txt
done

# --- 3. backing overlays ---------------------------------------------------------
rm -f base.raw
qemu-img create -q -f raw base.raw 6M
qemu-io -f raw -c "write -P 0xa1 0 6M" -c "write -P 0xa2 12345 70000" base.raw >/dev/null
cat > ov.txt <<S
io write -P 0xb1 1000 777
io write -P 0xb2 $((65536 * 7 - 5)) 70000
io write -z $((65536 * 20)) 131072
io write -z 2000000 100
io write -P 0xb3 $((6 * 1048576 - 10)) 5000
S
grep -v 0xb3 ov.txt > ovmid.txt   # the middle layer has the base's 6M size
for v in "compat=1.1" "compat=0.10" "compat=1.1,cluster_size=4096" "compat=1.1,extended_l2=on"; do
    scenario "overlay over raw $v" 8M "$v" ov.txt -b base.raw -F raw
done
# qcow2 over qcow2 (ours) over raw, partial writes in each layer
begin "chain qcow2/qcow2/raw"
rm -f mid.qcow2 top.qcow2 refmid.qcow2 reftop.qcow2
cat > top.txt <<S
io write -P 0xc1 $((65536 * 7)) 123
io write -P 0xc2 $((1048576 * 3 + 1)) 300000
io write -z 500 1000
S
if run "$PMS" create -f qcow2 -b base.raw -F raw mid.qcow2 &&
   play ours mid.qcow2 ovmid.txt &&
   run "$PMS" create -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 &&
   play ours top.qcow2 top.txt &&
   run qemu-img create -q -f qcow2 -b base.raw -F raw refmid.qcow2 &&
   play qemu refmid.qcow2 ovmid.txt &&
   run qemu-img create -q -f qcow2 -b refmid.qcow2 -F qcow2 reftop.qcow2 &&
   play qemu reftop.qcow2 top.txt &&
   qcheck mid.qcow2 && qcheck top.qcow2; then
    vs=$(qemu-img info --output=json top.qcow2 | $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    if [ "$vs" != 6291456 ]; then fail "create with backing and no size: virtual-size $vs, want 6291456"
    elif ! out=$(qemu-img compare top.qcow2 reftop.qcow2 2>&1); then fail "qemu-img compare: $out"
    elif same_raw top.qcow2 && info_cmp top.qcow2; then ok; fi
fi

# --- 4. snapshots: create/apply/delete sequences, COW --------------------------------
cat > snap.txt <<S
io write -P 0x01 100 200000
io write -P 0x02 1048576 4096
snap-c s1
io write -P 0x03 5000 300
io write -z 1048576 4096
io write -P 0x04 3000000 9999
snap-c s2
io write -P 0x05 0 1M
snap-c s3
io write -P 0x06 4000 100000
snap-a s1
io write -P 0x07 150000 70000
snap-d s2
io write -P 0x08 2999999 3
snap-c s4
io discard 1048576 65536
S
snapvariants=("compat=1.1" "compat=0.10" "compat=1.1,cluster_size=512,refcount_bits=8" "compat=1.1,extended_l2=on")
[ -n "${PMS_TEST_FULL:-}" ] && snapvariants+=("compat=1.1,cluster_size=512" "compat=1.1,refcount_bits=64,cluster_size=4096")
for v in "${snapvariants[@]}"; do
    scenario "snapshots $v" 4M "$v" snap.txt
    [ -f ours.qcow2 ] || continue
    begin "snapshots $v: qemu-img side"
    bad=0
    snaplist qemu-img snapshot -l ours.qcow2 | awk '{print $2}' | tr '\n' ' ' > names.txt
    if [ "$(cat names.txt)" != "s1 s3 s4 " ]; then fail "qemu-img snapshot -l lists [$(cat names.txt)], want [s1 s3 s4]"; bad=1; fi
    snaplist "$PMS" snapshot -l ours.qcow2 > p.txt; snaplist qemu-img snapshot -l ours.qcow2 > q.txt
    cmp -s p.txt q.txt || { fail "our snapshot -l [$(tr '\n' ';' < p.txt)] differs from qemu's [$(tr '\n' ';' < q.txt)]"; bad=1; }
    for s in s1 s3 s4; do
        cp ours.qcow2 a.qcow2
        run qemu-img snapshot -a $s a.qcow2 || { bad=1; continue; }
        qcheck a.qcow2 || bad=1
        qverify a.qcow2 4194304 snap.txt --snap $s || bad=1
    done
    # qemu deletes ours
    cp ours.qcow2 d.qcow2
    if run qemu-img snapshot -d s3 d.qcow2 && run qemu-img snapshot -d s1 d.qcow2 && qcheck d.qcow2; then
        qverify d.qcow2 4194304 snap.txt || bad=1
        "$PMS" check d.qcow2 > chk.txt 2>&1 || { fail "our check after qemu deleted our snapshots: $(tail -n 3 chk.txt)"; bad=1; }
        same_raw d.qcow2 || bad=1
    else bad=1; fi
    # we delete qemu's (and then write, which must not disturb other snapshots)
    cp ours.qcow2 e.qcow2
    if run qemu-img snapshot -c q1 e.qcow2 && run "$PMS" snapshot -d s4 e.qcow2 &&
       run "$PMS" io -c "write -P 0x09 0 4096" e.qcow2 && run "$PMS" snapshot -d q1 e.qcow2 && qcheck e.qcow2; then
        snaplist qemu-img snapshot -l e.qcow2 | awk '{print $2}' | tr '\n' ' ' > names.txt
        [ "$(cat names.txt)" = "s1 s3 " ] || { fail "after deletes qemu-img lists [$(cat names.txt)], want [s1 s3]"; bad=1; }
        cp e.qcow2 f.qcow2
        run qemu-img snapshot -a s3 f.qcow2 && qverify f.qcow2 4194304 snap.txt --snap s3 || bad=1
    else bad=1; fi
    # our apply of a snapshot made by qemu
    cp ours.qcow2 g.qcow2
    if run qemu-img snapshot -c q2 g.qcow2 && run "$PMS" io -c "write -P 0x0a 0 2M" g.qcow2 &&
       run "$PMS" snapshot -a q2 g.qcow2 && qcheck g.qcow2; then
        qverify g.qcow2 4194304 snap.txt || bad=1
    else bad=1; fi
    [ $bad = 0 ] && ok
done

# --- 5. our convert -O qcow2 (CLI only) ---------------------------------------------
if [ $HAVE_CLI = 1 ]; then
    rm -f csrc.raw csrc.qcow2
    qemu-img create -q -f raw csrc.raw 4M
    qemu-io -f raw -c "write -P 0x5a 1000 1M" -c "write -P 0x5b 2M 300000" csrc.raw >/dev/null
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 csrc.raw csrc.qcow2
    qemu-io -c "write -P 0x5c 3M 5000" -c "write -z 1500000 70000" csrc.qcow2 >/dev/null
    for o in "" "-o cluster_size=512" "-o compat=0.10" "-o extended_l2=on,cluster_size=65536" "-o refcount_bits=1"; do
        begin "our convert -O qcow2 $o"
        rm -f cdst.qcow2
        run "$PMS" convert -f qcow2 -O qcow2 $o csrc.qcow2 cdst.qcow2 || continue
        qcheck cdst.qcow2 || continue
        if ! out=$(qemu-img compare csrc.qcow2 cdst.qcow2 2>&1); then fail "qemu-img compare: $out"; continue; fi
        ok
    done
fi

finish
