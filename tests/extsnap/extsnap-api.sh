#!/bin/bash
# The in-place switch on an open device (extsnap-api switch), then QEMU
# checks every file it left: check clean, each snapshot's chain and the live
# image equal to the expected bytes.
. "$(dirname "$0")/lib.sh"
begin switch
"$EXTSNAP_API" switch "$T" || fail "extsnap-api switch"
[ -e img.qcow2@a ] && fail "deleted snapshot a still has its layer"
[ -e img.qcow2@b ] && fail "deleted snapshot b still has its layer"
for s in c d; do same img.qcow2@$s ref-$s.raw; check_clean img.qcow2@$s; done
same img.qcow2 ref-live.raw
check_clean img.qcow2
ok
begin prep
"$EXTSNAP_API" prep "$T" || fail "extsnap-api prep"
check_clean prep.qcow2; check_clean prep.qcow2@p1
qemu-io -r -c "read -P 0 0 12k" prep.qcow2@p1 | grep -q "verification failed" && fail "layer content"
ok
begin faulty
# power lost (torn/dropped writes, the fault-injecting driver) while a delete
# streams into the live image: it reads as before and checks clean
"$EXTSNAP_API" faulty "$T" || fail "extsnap-api faulty"
ok
begin limit
"$EXTSNAP_API" limit "$T" || fail "extsnap-api limit"
# the CLI opens without the chain: the limit holds there too
refuse "$PMEMSNAP" snapshot -c more --external lim.qcow2
ok
begin resized
# a mapped revert to an external snapshot of another size: EBUSY, as internal
"$EXTSNAP_API" resized "$T" || fail "extsnap-api resized"
ok
begin chain
# 100 snapshots: a 101-image chain QEMU opens and reads like ours
"$EXTSNAP_API" chain "$T" 16 100 || fail "extsnap-api chain"
[ "$(qemu-img info -U --backing-chain chain.qcow2 | grep -c '^image:')" = 101 ] || fail "chain length"
[ "$("$PMEMSNAP" info -U --backing-chain chain.qcow2 | grep -c '^image:')" = 101 ] || fail "our info --backing-chain"
"$PMEMSNAP" convert -O raw chain.qcow2 c.raw || fail "our convert of the chain"
qemu-img compare -q -F raw chain.qcow2 c.raw || fail "our convert of the chain differs"
rm -f c.raw
qemu-img compare -U chain.qcow2 one.qcow2 >/dev/null || fail "qemu-img compare of the chain and the one-layer image"
# block status through the chain map answers as QEMU's walk does
qemu-img map -U --output=json chain.qcow2 >q.json
"$PMEMSNAP" map -U --output=json chain.qcow2 >p.json || fail "our map"
cmp -s q.json p.json || fail "map of the chain differs from qemu-img's: $(diff q.json p.json | head -n 4)"
ok
finish
