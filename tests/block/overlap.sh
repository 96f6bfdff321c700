#!/bin/bash
# Writes that would land on metadata are refused, as QEMU's default overlap
# check ("cached") refuses them: a crafted L2 entry points a guest cluster
# (marked COPIED, so it is written in place) at the image's own L2 table, at
# a refcount block, or at an internal snapshot's L1 table.  QEMU is the
# oracle twice: its qemu-io must refuse the same write on a copy, and after
# ours the data that was there reads back unchanged with qemu-io.
. "$(dirname "$0")/lib.sh"

# craft IMG WHAT: 1 MiB of 0xaa at 0 (64 KiB clusters), then L2 entry 1
# (guest 64 KiB) pointed at the metadata cluster WHAT names.
craft() {
    local img=$1 what=$2
    qemu-img create -q -f qcow2 "$img" 64M || return 1
    qemu-io -c "write -P 0xaa 0 1M" "$img" >/dev/null || return 1
    [ "$what" = inactive-l1 ] && { qemu-img snapshot -c s1 "$img" || return 1; }
    $PY - "$img" "$what" <<'PY'
import struct, sys
img, what = sys.argv[1], sys.argv[2]
f = open(img, 'r+b')
def q(off):
    f.seek(off); return struct.unpack('>Q', f.read(8))[0]
l1 = q(40)
l2 = q(l1) & 0x00fffffffffffe00
target = {'active-l2': lambda: l2,
          'refblock': lambda: q(q(48)) & ~0x1ff,
          'inactive-l1': lambda: q(q(64))}[what]()
f.seek(l2 + 8); f.write(struct.pack('>Q', (1 << 63) | target))
PY
}

for what in active-l2 refblock inactive-l1; do
    begin "$what"
    craft a.qcow2 "$what" || { fail "could not craft the image"; continue; }
    cp a.qcow2 q.qcow2
    if qemu-io -c "write -P 0x11 64k 4k" q.qcow2 >qemu.out 2>&1; then
        fail "qemu-io accepted the write (the crafted image is not what this test means): $(tail -n 2 qemu.out | tr '\n' ' ')"
        continue
    fi
    if "$PMS" io -c "write -P 0x11 64k 4k" a.qcow2 >ours.out 2>&1 && ! grep -q "failed" ours.out; then
        fail "the write over the $what was accepted: $(tr '\n' ' ' <ours.out)"
        continue
    fi
    grep -q "overlaps" ours.out ||
        { fail "no overlap message: $(tr '\n' ' ' <ours.out)"; continue; }
    # nothing of the metadata was overwritten: the data reads back
    if ! qemu-io -r -c "read -P 0xaa 128k 896k" a.qcow2 >read.out 2>&1 ||
       grep -q "Pattern verification failed\|read failed" read.out; then
        fail "data around the refused write changed: $(tr '\n' ' ' <read.out | head -c 300)"
        continue
    fi
    ok "$(grep -o 'overlaps [a-z0-9 ]*' ours.out | head -n 1)"
done

echo "overlap.sh: $NTESTS cases, $FAILS failures"
[ "$FAILS" -eq 0 ]
