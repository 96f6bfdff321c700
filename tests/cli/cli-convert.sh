#!/bin/bash
# convert: qcow2 <-> raw round trips checked with qemu-img compare, sparse
# output (zero extents are skipped), the -p progress format, -n into an
# existing image, and refusal cases.
. "$(dirname "$0")/lib.sh"
command -v qemu-img >/dev/null || { echo "SKIP: no qemu-img"; exit 77; }

truncate -s 64M src.raw
qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 20M 64k' -c 'write -P 0 30M 1M' \
        -c 'write -P 0x33 63M 1M' src.raw >/dev/null
have_qcow2=1
"$P" create -f qcow2 probe.qcow2 1M >/dev/null 2>&1 && "$P" info probe.qcow2 >/dev/null 2>&1 || have_qcow2=0

# raw -> raw, sparse
expect_rc 0 "convert raw->raw" "$P" convert -f raw -O raw src.raw dst.raw
qemu-img compare -q -f raw -F raw src.raw dst.raw && pass "raw->raw identical" || fail "raw->raw differs"
alloc=$(( $(stat -c %b dst.raw) * $(stat -c %B dst.raw) ))
[ "$alloc" -le $((3 * 1048576)) ] && pass "raw->raw sparse ($alloc bytes)" || fail "raw->raw not sparse: $alloc"

# -p: qemu-img's progress format, ends with 100.00 and a newline
expect_rc 0 "convert -p" "$P" convert -p -f raw -O raw src.raw dst2.raw
tr '\r' '\n' < out | grep -v '^$' > prog
grep -qxE '    \(0\.00/100%\)' prog || fail "progress does not start at 0.00"
tail -1 prog | grep -qxE '    \(100\.00/100%\)' || fail "progress does not end at 100.00: $(tail -1 prog)"
grep -vqxE '    \([0-9]+\.[0-9]{2}/100%\)' prog && fail "bad progress line: $(grep -vxE '    \([0-9]+\.[0-9]{2}/100%\)' prog | head -1)"
[ "$(tail -c 1 out | od -An -c | tr -d ' ')" = '\n' ] || fail "progress not terminated by newline"
sed 's/[() ]//g; s|/100%||' prog | awk 'NR > 1 && $1 < p { bad = 1 } { p = $1 } END { exit bad }' ||
    fail "progress went backwards"
pass "convert -p format"
expect_rc 0 "convert -q -p prints nothing" "$P" convert -q -p -f raw -O raw src.raw dst3.raw
[ -s out ] && fail "-q -p printed: $(head -c 100 out)"

if [ $have_qcow2 = 1 ]; then
    expect_rc 0 "convert raw->qcow2 -p" "$P" convert -p -f raw -O qcow2 -o cluster_size=64k src.raw a.qcow2
    qemu-img compare -q a.qcow2 src.raw && pass "raw->qcow2 identical" || fail "raw->qcow2 differs"
    qemu-img check -q a.qcow2 && pass "converted qcow2 passes qemu-img check" || fail "check a.qcow2"
    sz=$(stat -c %s a.qcow2)
    [ "$sz" -le $((4 * 1048576)) ] && pass "qcow2 output sparse ($sz bytes)" || fail "qcow2 output too big: $sz"
    # qemu-made qcow2 with a backing file and snapshots -> flattened raw
    qemu-img create -q -f qcow2 b.qcow2 8M
    qemu-io -c 'write -P 1 0 2M' b.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 t.qcow2
    qemu-io -c 'write -P 2 1M 64k' -c 'write -z 0 64k' t.qcow2 >/dev/null
    qemu-img snapshot -c s t.qcow2
    expect_rc 0 "convert chain->raw" "$P" convert -O raw t.qcow2 t.raw
    qemu-img compare -q t.qcow2 t.raw && pass "chain->raw identical" || fail "chain->raw differs"
    expect_rc 0 "convert chain->qcow2 extended_l2" "$P" convert -O qcow2 -o extended_l2=on t.qcow2 t2.qcow2
    qemu-img compare -q t.qcow2 t2.qcow2 && pass "chain->qcow2 identical" || fail "chain->qcow2 differs"
    qemu-img info t2.qcow2 | grep -q 'backing file' && fail "converted image kept a backing file"
    # -n: into an existing larger image full of data; zero extents must be written
    qemu-img create -q -f qcow2 n.qcow2 8M
    qemu-io -c 'write -P 0x77 0 8M' n.qcow2 >/dev/null
    expect_rc 0 "convert -n" "$P" convert -n -O qcow2 t.qcow2 n.qcow2
    qemu-img compare -q t.qcow2 n.qcow2 && pass "convert -n identical" || fail "convert -n differs"
    # qemu-img reads what we wrote back to raw, byte exact
    qemu-img convert -O raw a.qcow2 back.raw
    cmp -s back.raw src.raw && pass "qemu-img reads our qcow2 back" || fail "round trip differs"
fi

# refusals: nothing created
expect_rc 1 "convert bad -o" "$P" convert -O qcow2 -o nosuch=1 src.raw bad.qcow2
[ -e bad.qcow2 ] && fail "bad -o created target"
expect_rc 1 "convert missing source" "$P" convert -O raw nosuch.raw bad.raw
[ -e bad.raw ] && fail "missing source created target"
expect_rc 1 "convert unknown -O" "$P" convert -O vmdk src.raw bad.vmdk
finish
