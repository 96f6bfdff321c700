#!/bin/bash
# Compressed cluster writes (io write -c, convert -c) against QEMU 7.2.
#
# For each format variant (cluster sizes 512 B - 2 MiB, zlib and zstd,
# extended L2) the same sequence runs on our image (pmemsnap io/snapshot)
# and on a qemu-made reference (qemu-io/qemu-img): compressed writes to
# fresh, zero, normal, compressed and snapshot-shared clusters, normal writes
# over compressed clusters, incompressible data (written uncompressed by
# both) and the partial last cluster.  QEMU refuses (EIO) to compress over
# an allocated cluster, so its side discards the cluster first; we replace
# it directly.  Then: qemu-img check clean (no leaks) and reporting
# compressed clusters, qemu-img compare equal, qemu-io read -P of the
# patterns, map equal to qemu-img map (compressed = data without offset),
# the snapshot equal too.  Also: qemu writes compressed and we overwrite;
# our convert -c is compared with qemu-img convert -c (same check
# statistics and file size); alignment and raw refusals.
. "$(dirname "$0")/lib.sh"

if [ $HAVE_CLI != 1 ]; then
    echo "# compressed writes need the pmemsnap CLI: skipped"
    exit 77
fi

# Deterministic data: "semi" compresses (text), "rnd" does not.
$PY - <<'PY'
import random, base64
r = random.Random(7)
raw = r.randbytes(4 << 20)
open("rnd", "wb").write(raw[:4 << 20])
txt = b"".join(b"line %d: %s\n" % (i, base64.b16encode(raw[i * 8:i * 8 + 6]))
               for i in range(300000))
open("semi", "wb").write(txt[:4 << 20])
PY

# ops CS SIZE: lines "SIDE-INDEPENDENT" command lists, one per tool call.
#   cw OFF LEN ARGS  compressed write over a cluster that may be allocated
#                    (qemu side: discard first)
#   io CMD           same qemu-io command on both sides
#   snap NAME        snapshot -c on both sides
mkops() {
    local cs=$1 size=$2 snap=${3-s1}
    local last=$(( (size - 1) / cs * cs ))
    cat <<S
io write -c -P 0x11 0 $((2 * cs))
io write -P 0x22 $((2 * cs)) $cs
cw $((2 * cs)) $cs -P 0x33
io write -P 0x44 $((cs / 2)) 100
cw $cs $cs -s semi
io write -c -s semi $((3 * cs)) $((2 * cs))
${snap:+snap $snap}
cw 0 $cs -P 0x66
io write -P 0x77 $((3 * cs + 10)) 20
io write -z $((5 * cs)) $cs
io write -c -P 0x88 $((5 * cs)) $cs
io write -c -s rnd $((6 * cs)) $((2 * cs))
io write -c -P 0 $((8 * cs)) $cs
cw $((4 * cs)) $cs -P 0x55
cw $last $((size - last)) -P 0x99
io write -c 0 0
S
}

# play_c SIDE IMG OPS
play_c() {
    local side=$1 img=$2 ops=$3 w args
    while IFS= read -r line; do
        read -r -a w <<< "$line"
        case ${w[0]} in
            io) args=(-c "${w[*]:1}") ;;
            cw) if [ $side = ours ]; then args=(-c "write -c ${w[*]:3} ${w[1]} ${w[2]}")
                else args=(-c "discard ${w[1]} ${w[2]}" -c "write -c ${w[*]:3} ${w[1]} ${w[2]}"); fi ;;
            snap)
                if [ $side = ours ]; then run "$PMS" snapshot -c "${w[1]}" "$img" || return 1
                else run qemu-img snapshot -c "${w[1]}" "$img" || return 1; fi
                continue ;;
        esac
        local out
        if [ $side = ours ]; then out=$("$PMS" io "${args[@]}" "$img" 2>&1)
        else out=$(qemu-io "${args[@]}" "$img" 2>&1); fi
        if [ $? -ne 0 ] || echo "$out" | grep -q "failed"; then
            fail "$side: io ${args[*]}: $(echo "$out" | tail -n 3 | tr '\n' '|')"; return 1
        fi
    done < "$ops"
}

# compressed-stat IMG: number of compressed clusters qemu-img check counts
cstat() {
    qemu-img check --output=json "$1" 2>/dev/null |
        $PY -c 'import json,sys; print(json.load(sys.stdin).get("compressed-clusters", 0))'
}

scenario() {
    local name=$1 cs=$2 size=$3 opts=$4 snap=${5-s1}
    begin "$name"
    rm -f ours.qcow2 ref.qcow2
    mkops $cs $size "$snap" | grep -v '^$' > ops.txt
    run "$PMS" create -f qcow2 -o "cluster_size=$cs,$opts" ours.qcow2 $size || return
    run qemu-img create -q -f qcow2 -o "cluster_size=$cs,$opts" ref.qcow2 $size || return
    play_c ours ours.qcow2 ops.txt || return
    play_c qemu ref.qcow2 ops.txt || return
    local out
    out=$(qemu-img check ours.qcow2 2>&1) || { fail "qemu-img check: $(echo "$out" | head -n 8 | tr '\n' '|')"; return; }
    echo "$out" | grep -q "leaked" && { fail "leaks: $out"; return; }
    local nc=$(cstat ours.qcow2) nq=$(cstat ref.qcow2)
    [ "$nc" -gt 0 ] || { fail "qemu-img check counts no compressed clusters"; return; }
    [ "$nc" = "$nq" ] || { fail "compressed clusters: ours $nc, qemu's $nq"; return; }
    out=$(qemu-img compare ours.qcow2 ref.qcow2 2>&1) || { fail "qemu-img compare: $out"; return; }
    out=$(qemu-io -r -U -c "read -P 0x66 0 $cs" \
                 -c "read -P 0x33 $((2 * cs)) $cs" -c "read -P 0x77 $((3 * cs + 10)) 20" \
                 -c "read -P 0x88 $((5 * cs)) $cs" -c "read -P 0 $((8 * cs)) $cs" \
                 -c "read -P 0x55 $((4 * cs)) $cs" ours.qcow2 2>&1)
    if echo "$out" | grep -qi "fail\|error"; then fail "qemu-io read -P: $(echo "$out" | grep -m2 -i 'fail\|error')"; return; fi
    map_cmp ours.qcow2 || return
    # compressed clusters: data without a host offset in qemu-img map
    qemu-img map --output=json ours.qcow2 | $PY -c '
import json, sys
cs = int(sys.argv[1])
m = [e for e in json.load(sys.stdin) if e["start"] <= 5 * cs < e["start"] + e["length"]]
sys.exit(0 if m and m[0]["data"] and "offset" not in m[0] else 1)' $cs ||
        { fail "qemu-img map does not show cluster 5 as compressed"; return; }
    same_raw ours.qcow2 || return
    # the snapshot holds the same on both
    [ -n "$snap" ] || { ok "$nc compressed clusters"; return; }
    cp ours.qcow2 a.qcow2; cp ref.qcow2 b.qcow2
    run qemu-img snapshot -a s1 a.qcow2 && run qemu-img snapshot -a s1 b.qcow2 || return
    qcheck a.qcow2 || return
    out=$(qemu-img compare a.qcow2 b.qcow2 2>&1) || { fail "snapshot s1 differs: $out"; return; }
    ok "$nc compressed clusters"
}

# the sanitizer build runs a subset (the normal build runs all of them)
sizes="512 4096 65536 2097152"; [ -n "${PMS_SANITIZED:-}" ] && sizes="512 65536"
for cs in $sizes; do
    size=$((16 * cs)); [ $cs -ge 4096 ] && size=$((16 * cs - cs / 2))   # partial last cluster
    for z in zlib zstd; do
        scenario "io write -c cs=$cs $z" $cs $size "compression_type=$z"
    done
done
scenario "io write -c cs=65536 extended_l2" 65536 $((16 * 65536)) "extended_l2=on"
[ -z "${PMS_SANITIZED:-}" ] &&
    scenario "io write -c cs=2M extended_l2 zstd" 2097152 $((16 * 2097152 - 4096)) "extended_l2=on,compression_type=zstd"
# narrow refcounts: a host cluster packed with compressed clusters reaches
# the maximum, and the next one starts a fresh cluster (no snapshot: it
# would overflow on both sides)
scenario "io write -c cs=4096 refcount_bits=2" 4096 $((16 * 4096)) "refcount_bits=2" ""
scenario "io write -c cs=512 refcount_bits=1" 512 $((16 * 512)) "refcount_bits=1" ""

# --- qemu writes compressed, we overwrite ------------------------------------------
for z in zlib zstd; do
    begin "qemu compresses, we overwrite ($z)"
    rm -f q.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=$z q.qcow2 1M || continue
    run qemu-io -c "write -c -s semi 0 256k" -c "write -c -P 0x12 256k 64k" q.qcow2 || continue
    run qemu-img snapshot -c qs q.qcow2 || continue
    cp q.qcow2 r.qcow2
    run "$PMS" io -c "write -P 0x21 1000 5000" -c "write -c -P 0x22 64k 64k" -c "write -z 128k 8k" \
        -c "discard 256k 16k" -c "write -c -s semi 300k 12k" q.qcow2 || continue
    run qemu-io -c "write -P 0x21 1000 5000" -c "discard 64k 64k" -c "write -c -P 0x22 64k 64k" \
        -c "write -z 128k 8k" -c "discard 256k 16k" -c "discard 300k 12k" -c "write -c -s semi 300k 12k" r.qcow2 || continue
    qcheck q.qcow2 || continue
    qemu-img check q.qcow2 2>&1 | grep -q leaked && { fail "leaks"; continue; }
    out=$(qemu-img compare q.qcow2 r.qcow2 2>&1) || { fail "compare: $out"; continue; }
    run qemu-img snapshot -a qs q.qcow2 && run qemu-img snapshot -a qs r.qcow2 || continue
    out=$(qemu-img compare q.qcow2 r.qcow2 2>&1) || { fail "compare after apply: $out"; continue; }
    ok
done

# --- convert -c vs qemu-img convert -c ------------------------------------------------
rm -f csrc.qcow2
qemu-img create -q -f qcow2 csrc.qcow2 24M
qemu-io -c "write -s semi 0 3M" -c "write -P 7 5M 100k" -c "write -z 6M 1M" -c "write -P 3 10M 4k" \
        -c "write -s rnd 12M 2M" -c "write -P 0 16M 1M" -c "write -s semi 20M 300k" csrc.qcow2 >/dev/null
copts=("" "compression_type=zstd" "cluster_size=512" "cluster_size=4096,compression_type=zstd"
       "cluster_size=2M" "extended_l2=on" "compat=0.10")
[ -n "${PMS_SANITIZED:-}" ] && copts=("" "cluster_size=4096,compression_type=zstd" "compat=0.10")
for o in "${copts[@]}"; do
    begin "convert -c ${o:-defaults}"
    rm -f c1.qcow2 c2.qcow2
    oo=(); [ -n "$o" ] && oo=(-o "$o")
    run "$PMS" convert -c -O qcow2 "${oo[@]}" csrc.qcow2 c1.qcow2 || continue
    run qemu-img convert -c -O qcow2 "${oo[@]}" csrc.qcow2 c2.qcow2 || continue
    qcheck c1.qcow2 || continue
    out=$(qemu-img compare csrc.qcow2 c1.qcow2 2>&1) || { fail "compare: $out"; continue; }
    n1=$(cstat c1.qcow2); n2=$(cstat c2.qcow2)
    [ "$n1" -gt 0 ] && [ "$n1" = "$n2" ] || { fail "compressed clusters: ours $n1, qemu-img's $n2"; continue; }
    s1=$(stat -c %s c1.qcow2); s2=$(stat -c %s c2.qcow2)
    [ "$s1" = "$s2" ] || { fail "file size: ours $s1, qemu-img's $s2"; continue; }
    info_cmp c1.qcow2 || continue
    ok "$n1 compressed clusters, $s1 bytes"
done

# --- refusals -------------------------------------------------------------------------
begin "write -c refusals as qemu-io"
rm -f e.qcow2 e.raw
qemu-img create -q -f qcow2 -o cluster_size=4096 e.qcow2 1M
qemu-img create -q -f raw e.raw 1M
bad=0
for c in "write -c 1k 4k" "write -c 0 1k" "write -c 4k 6k"; do
    a=$("$PMS" io -c "$c" e.qcow2 2>&1 | head -n 1); b=$(qemu-io -c "$c" e.qcow2 2>&1 | head -n 1)
    [ "$a" = "$b" ] || { fail "$c: ours '$a', qemu-io '$b'"; bad=1; }
done
a=$("$PMS" io -f raw -c "write -c 0 64k" e.raw 2>&1 | head -n 1); b=$(qemu-io -f raw -c "write -c 0 64k" e.raw 2>&1 | head -n 1)
[ "$a" = "$b" ] || { fail "raw: ours '$a', qemu-io '$b'"; bad=1; }
a=$("$PMS" convert -c -O raw e.qcow2 x.raw 2>&1); b=$(qemu-img convert -c -O raw e.qcow2 y.raw 2>&1)
[ "${a#*: }" = "${b#*: }" ] || { fail "convert -c -O raw: ours '$a', qemu-img '$b'"; bad=1; }
a=$("$PMS" create -f qcow2 -o compression_type=zstd,compat=0.10 z.qcow2 1M 2>&1 | tail -n 1)
case $a in *"Non-zlib compression type"*) ;; *) fail "zstd with compat=0.10: '$a'"; bad=1 ;; esac
[ $bad = 0 ] && ok

# --- create -o compression_type=zstd is byte-identical -------------------------------
begin "create compression_type=zstd"
rm -f z1.qcow2 z2.qcow2
a=$("$PMS" create -f qcow2 -o compression_type=zstd z1.qcow2 5M 2>&1)
b=$(qemu-img create -f qcow2 -o compression_type=zstd z2.qcow2 5M 2>&1)
if [ "${a//z1/z2}" != "$b" ]; then fail "output: '$a' vs '$b'"
elif ! cmp -s z1.qcow2 z2.qcow2; then fail "image differs from qemu-img's"
else ok; fi

finish
