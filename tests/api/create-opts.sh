#!/bin/bash
# `create -o lazy_refcounts=on` and `-o preallocation=...` do what
# qemu-img's do, judged by QEMU's tools:
#  - lazy_refcounts: the file is byte-identical to qemu-img's; while we
#    write, the header carries the dirty bit (qemu-img info dirty-flag after
#    a kill -9 mid-session), a clean close clears it (qemu-img check exit
#    0), and after a kill both qemu-img check -r all and our next writable
#    open repair the image with the completed writes intact.
#  - preallocation=metadata|falloc|full: qemu-img map (host offsets
#    aside), qemu-img check and the allocated size match qemu-img create's
#    with the same options; 10M metadata images are byte-identical; writes
#    land in the preallocated clusters (the file does not grow); raw takes
#    falloc/full and refuses metadata with qemu-img's message; an unknown
#    mode is refused with qemu-img's message.
set -u
PMS=$(realpath "${PMEMSNAP:?PMEMSNAP not set}")
command -v strace >/dev/null || { echo "SKIP: strace not installed (apt-get install strace)"; exit 77; }
fail() { echo "FAIL: $*" >&2; exit 1; }
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-copts.XXXXXX")
trap 'rm -rf "$T"' EXIT
qio() {     # qio IMG CMD...: qemu-io, any failure or mismatch fails
    local img=$1; shift
    local args=() c out
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || fail "qemu-io $img: $out"
    grep -qi "fail\|error\|can't" <<<"$out" && fail "qemu-io $img: $out"
    return 0
}
dirty() { qemu-img info -U --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty-flag"])'; }
kb() { du -k "$1" | cut -f1; }

# ---- lazy refcounts
for o in lazy_refcounts=on lazy_refcounts=on,cluster_size=4k lazy_refcounts=on,refcount_bits=1,extended_l2=on; do
    "$PMS" create -q -f qcow2 -o $o "$T/l1" 100M || fail "create -o $o"
    qemu-img create -q -f qcow2 -o $o "$T/l2" 100M
    cmp "$T/l1" "$T/l2" || fail "create -o $o differs from qemu-img's"
done
qemu-img info "$T/l1" | grep -q "lazy refcounts: true" || fail "qemu-img info: no lazy refcounts"
img=$T/lazy.qcow2
"$PMS" create -q -f qcow2 -o lazy_refcounts=on "$img" 64M
out=$("$PMS" io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x12 4M 64k" "$img" 2>&1) || fail "io: $out"
[ "$(dirty "$img")" = False ] || fail "dirty bit left set after a clean close"
qemu-img check -q "$img" || fail "qemu-img check after a clean close"
# killed on its 3rd pwrite64: the first write (and its metadata) is done
ASAN_OPTIONS=${ASAN_OPTIONS:-}:detect_leaks=0 strace -f -qq -o /dev/null -e trace=pwrite64 \
    -e inject=pwrite64:signal=SIGKILL:when=3 \
    "$PMS" io -f qcow2 -c "write -P 0x21 8M 1M" -c "write -P 0x22 16M 1M" "$img" >/dev/null 2>&1 &
wait $! 2>/dev/null
[ "$(dirty "$img")" = True ] || fail "no dirty bit after a kill while writing a lazy-refcounts image"
cp "$img" "$T/copy.qcow2"
qemu-img check -r all "$T/copy.qcow2" >"$T/out" 2>&1 || fail "qemu-img check -r all: $(cat "$T/out")"
qemu-img check -q "$T/copy.qcow2" || fail "qemu-img check after qemu-img's repair"
# our writable open repairs it (refcounts rebuilt), then closes clean
out=$("$PMS" io -f qcow2 -c "write -P 0x31 32M 64k" "$img" 2>&1) || fail "reopen: $out"
[ "$(dirty "$img")" = False ] || fail "dirty bit still set after our repairing open"
qemu-img check -q "$img" || fail "qemu-img check after our repairing open"
qio "$img" "read -P 0x11 0 1M" "read -P 0x12 4M 64k" "read -P 0x31 32M 64k"
# and QEMU writes it after us, leaving it clean too
qio "$img" "write -P 0x41 40M 64k"
[ "$(dirty "$img")" = False ] && qemu-img check -q "$img" || fail "after qemu-io"
echo "lazy_refcounts: byte-identical, dirty while written, repaired after a kill"

# ---- preallocation
for m in metadata falloc full; do
    for o in "" ,cluster_size=4k ,extended_l2=on; do
        for size in 10M 1000k; do
            rm -f "$T/p1" "$T/p2"
            "$PMS" create -q -f qcow2 -o preallocation=$m$o "$T/p1" $size || fail "create $m$o"
            qemu-img create -q -f qcow2 -o preallocation=$m$o "$T/p2" $size
            m1=$(qemu-img map --output=json "$T/p1" | sed 's/"offset": [0-9]*//')
            m2=$(qemu-img map --output=json "$T/p2" | sed 's/"offset": [0-9]*//')
            [ "$m1" = "$m2" ] || fail "$size preallocation=$m$o: qemu-img map differs: $m1 / $m2"
            c1=$(qemu-img check "$T/p1" 2>&1) || fail "$size $m$o: qemu-img check: $c1"
            c2=$(qemu-img check "$T/p2" 2>&1)
            [ "$(head -2 <<<"$c1")" = "$(head -2 <<<"$c2")" ] ||
                fail "$size $m$o: qemu-img check differs: $c1 / $c2"
            [ "$(stat -c %s "$T/p1")" = "$(stat -c %s "$T/p2")" ] ||
                fail "$size $m$o: file length $(stat -c %s "$T/p1") != qemu-img's $(stat -c %s "$T/p2")"
            d=$(( $(kb "$T/p1") - $(kb "$T/p2") ))
            [ ${d#-} -le 64 ] || fail "$size $m$o: allocated $(kb "$T/p1") KiB, qemu-img $(kb "$T/p2") KiB"
        done
    done
    # writes go into the preallocated clusters
    rm -f "$T/p1"
    "$PMS" create -q -f qcow2 -o preallocation=$m "$T/p1" 10M
    len=$(stat -c %s "$T/p1")
    out=$("$PMS" io -f qcow2 -c "write -P 0x51 100000 70000" -c "write -P 0x52 9M 1M" "$T/p1" 2>&1) ||
        fail "io on a preallocated image: $out"
    [ "$(stat -c %s "$T/p1")" = "$len" ] || fail "$m: the file grew on writes into preallocated clusters"
    qio "$T/p1" "read -P 0 0 100000" "read -P 0x51 100000 70000" "read -P 0 170000 8000000" "read -P 0x52 9M 1M"
    qemu-img check -q "$T/p1" || fail "$m: qemu-img check after writes"
    echo "preallocation=$m: map, check, sizes as qemu-img; writes in place"
done
rm -f "$T/p1" "$T/p2"
"$PMS" create -q -f qcow2 -o preallocation=metadata "$T/p1" 10M
qemu-img create -q -f qcow2 -o preallocation=metadata "$T/p2" 10M
cmp "$T/p1" "$T/p2" || fail "10M preallocation=metadata differs from qemu-img's"
# raw
for m in falloc full; do
    "$PMS" create -q -f raw -o preallocation=$m "$T/r1" 10M || fail "raw $m"
    qemu-img create -q -f raw -o preallocation=$m "$T/r2" 10M
    sync "$T/r1" "$T/r2"        # delayed allocation: count blocks once on disk
    d=$(( $(kb "$T/r1") - $(kb "$T/r2") ))
    [ ${d#-} -le 64 ] && [ "$(kb "$T/r1")" -ge 10240 ] &&
        [ "$(stat -c %s "$T/r1")" = "$(stat -c %s "$T/r2")" ] ||
        fail "raw $m: $(kb "$T/r1") KiB vs qemu-img's $(kb "$T/r2") KiB"
    rm -f "$T/r1" "$T/r2"
done
# refusals, with qemu-img's words
for args in "-f raw -o preallocation=metadata" "-f raw -o preallocation=foo" \
            "-f qcow2 -o preallocation=foo" "-f qcow2 -o preallocation=metadata -b base -F raw" \
            "-f qcow2 -o compat=0.10,lazy_refcounts=on"; do
    qemu-img create -q -f raw "$T/base" 1M
    rc=0; e1=$(cd "$T" && "$PMS" create $args x 1M 2>&1 >/dev/null) || rc=$?
    [ $rc = 1 ] || fail "create $args: exit $rc: $e1"
    e2=$(cd "$T" && qemu-img create $args y 1M 2>&1 >/dev/null)
    [ "${e1#*: }" = "$(sed 's/^y:/x:/' <<<"${e2#*: }")" ] || fail "create $args: '$e1', qemu-img: '$e2'"
    rm -f "$T/x" "$T/y"
done
echo ok
