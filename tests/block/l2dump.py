#!/usr/bin/env python3
"""l2dump.py IMAGE: the active L2 entries of a qcow2 image, one line per
guest cluster that has a non-zero entry:
    CLUSTER FLAGS HAS_OFFSET ZERO_FLAG BITMAP
FLAGS is bits 63-62 (COPIED, compressed), HAS_OFFSET whether a host offset is
set, ZERO_FLAG bit 0, BITMAP the extended-L2 subcluster bitmap (hex, 0
without extended L2).  Host offsets themselves are left out: where a cluster
lands is not what the block tests compare."""
import struct
import sys

f = open(sys.argv[1], 'rb')
h = f.read(112)
cs = 1 << struct.unpack('>I', h[20:24])[0]
l1n = struct.unpack('>I', h[36:40])[0]
l1off = struct.unpack('>Q', h[40:48])[0]
inc = struct.unpack('>Q', h[72:80])[0] if struct.unpack('>I', h[4:8])[0] >= 3 else 0
es = 16 if inc & 16 else 8
f.seek(l1off)
l1 = struct.unpack('>%dQ' % l1n, f.read(8 * l1n))
for i, e in enumerate(l1):
    t = e & 0x00fffffffffffe00
    if not t:
        continue
    f.seek(t)
    d = f.read(cs)
    for j in range(cs // es):
        v = struct.unpack('>Q', d[j * es:j * es + 8])[0]
        bm = struct.unpack('>Q', d[j * es + 8:j * es + 16])[0] if es == 16 else 0
        if v or bm:
            print(i * (cs // es) + j, v >> 62, int(bool(v & 0x00fffffffffffe00)), v & 1,
                  '%016x' % bm)
