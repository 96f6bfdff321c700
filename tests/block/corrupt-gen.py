#!/usr/bin/env python3
"""Generate corrupted qcow2 images for tests/block/corrupt.sh.

usage: corrupt-gen.py OUTDIR [NAME...]

Base images are made with qemu-img / qemu-io (so they are exactly what QEMU
writes); each case copies one and patches bytes.  Every case writes
OUTDIR/NAME.qcow2 and a line "NAME<TAB>description" to OUTDIR/cases.txt.
Table offsets are parsed from the base image, never hard-coded.
"""
import os
import shutil
import struct
import subprocess
import sys

MB = 1 << 20
OUT = sys.argv[1]
# The pmemsnap CLI, for images written by pmemsnap itself (cases of kind
# 'pms' are left out when it is missing or does not implement the commands).
PMS = os.environ.get('PMEMSNAP', '')
if PMS and not (os.access(PMS, os.X_OK) and b'convert' in subprocess.run(
        [PMS, '--help'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout):
    PMS = ''
ONLY = set(sys.argv[2:])


def run(*args, stdin=None):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, input=stdin)


def qemu_io(img, *cmds):
    args = ['qemu-io', '-f', 'qcow2']
    for c in cmds:
        args += ['-c', c]
    run(*args, img)


class Img:
    """A qcow2 image file we patch in place."""

    def __init__(self, path):
        self.path = path
        self.f = open(path, 'r+b')
        self.h = self.header()

    def header(self):
        self.f.seek(0)
        b = self.f.read(112)
        names = ('magic version backing_off backing_size cluster_bits size crypt '
                 'l1_size l1_off rt_off rt_clusters nb_snaps snaps_off incompat '
                 'compat autoclear refcount_order header_length').split()
        vals = struct.unpack('>IIQIIQIIQQIIQQQQII', b[:104])
        h = dict(zip(names, vals))
        h['cs'] = 1 << h['cluster_bits']
        return h

    def r64(self, off):
        self.f.seek(off)
        return struct.unpack('>Q', self.f.read(8))[0]

    def w64(self, off, v):
        self.f.seek(off)
        self.f.write(struct.pack('>Q', v & 0xffffffffffffffff))

    def r32(self, off):
        self.f.seek(off)
        return struct.unpack('>I', self.f.read(4))[0]

    def w32(self, off, v):
        self.f.seek(off)
        self.f.write(struct.pack('>I', v & 0xffffffff))

    def r16(self, off):
        self.f.seek(off)
        return struct.unpack('>H', self.f.read(2))[0]

    def w16(self, off, v):
        self.f.seek(off)
        self.f.write(struct.pack('>H', v & 0xffff))

    def w8(self, off, v):
        self.f.seek(off)
        self.f.write(bytes([v & 0xff]))

    def wbytes(self, off, b):
        self.f.seek(off)
        self.f.write(b)

    def size(self):
        self.f.seek(0, 2)
        return self.f.tell()

    def truncate(self, n):
        self.f.truncate(n)

    # table helpers
    def l1e_off(self, i):
        return self.h['l1_off'] + 8 * i

    def l2_table(self, i=0):
        return self.r64(self.l1e_off(i)) & 0x00fffffffffffe00

    def l2e_off(self, l1i, l2i):
        return self.l2_table(l1i) + 8 * l2i

    def data_cluster(self, l1i=0, l2i=0):
        return self.r64(self.l2e_off(l1i, l2i)) & 0x00fffffffffffe00

    def refblock(self, i=0):
        return self.r64(self.h['rt_off'] + 8 * i) & ~0x1ff

    def set_refcount(self, cluster, v):
        """16-bit refcounts, first refcount block."""
        self.w16(self.refblock(0) + 2 * cluster, v)

    def snap_entry(self, n):
        """Offset of snapshot table entry n."""
        off = self.h['snaps_off']
        for _ in range(n):
            id_len = self.r16(off + 12)
            name_len = self.r16(off + 14)
            extra = self.r32(off + 36)
            ln = 40 + extra + id_len + name_len
            off += (ln + 7) & ~7
        return off

    def close(self):
        self.f.close()


# ---- base images ------------------------------------------------------------

BASES = {}


def base(kind):
    if kind in BASES:
        return BASES[kind]
    p = os.path.join(OUT, 'base-%s.qcow2' % kind)
    if kind == 'plain':           # 4 MiB, data at 0..128k and 1M..1M+64k
        run('qemu-img', 'create', '-q', '-f', 'qcow2', p, '4M')
        qemu_io(p, 'write -P 0x11 0 128k', 'write -P 0x22 1M 64k')
    elif kind == 'v2':
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p, '4M')
        qemu_io(p, 'write -P 0x11 0 128k')
    elif kind == 'snap':          # two snapshots, data rewritten in between
        run('qemu-img', 'create', '-q', '-f', 'qcow2', p, '4M')
        qemu_io(p, 'write -P 0x11 0 128k')
        run('qemu-img', 'snapshot', '-c', 's1', p)
        qemu_io(p, 'write -P 0x33 0 64k')
        run('qemu-img', 'snapshot', '-c', 's2', p)
        qemu_io(p, 'write -P 0x44 64k 64k')
    elif kind in ('zlib', 'zstd'):  # compressed clusters
        raw = os.path.join(OUT, 'base-%s.raw' % kind)
        with open(raw, 'wb') as f:
            for i in range(4 * 16):
                f.write((b'pmemsnap cluster %d ' % i) * (65536 // 24))
                f.write(b'\0' * (65536 - (65536 // 24) * len(b'pmemsnap cluster %d ' % i)))
        run('qemu-img', 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2',
            '-o', 'compression_type=%s' % kind, raw, p)
        os.unlink(raw)
    elif kind == 'backing':       # overlay with a backing file name
        b = os.path.join(OUT, 'base-backing-lower.qcow2')
        run('qemu-img', 'create', '-q', '-f', 'qcow2', b, '4M')
        qemu_io(b, 'write -P 0x55 0 64k')
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b',
            'base-backing-lower.qcow2', p)
        qemu_io(p, 'write -P 0x66 64k 64k')
    elif kind == 'huge':          # 32 TiB virtual: 64k L1 entries, one L2 table
        run('qemu-img', 'create', '-q', '-f', 'qcow2', p, '32T')
        qemu_io(p, 'write -P 0x11 0 64k')
    elif kind == 'pms':           # written by pmemsnap itself (snapshots, rewrite, delete)
        t = PMS
        run(t, 'create', '-q', '-f', 'qcow2', p, '4M')
        run(t, 'io', '-f', 'qcow2', '-c', 'write -P 0x11 0 192k', '-c', 'write -P 0x12 2M 64k', p)
        run(t, 'snapshot', '-f', 'qcow2', '-c', 's1', p)
        run(t, 'io', '-f', 'qcow2', '-c', 'write -P 0x21 64k 64k', '-c', 'write -z 0 64k', p)
        run(t, 'snapshot', '-f', 'qcow2', '-c', 's2', p)
        run(t, 'io', '-f', 'qcow2', '-c', 'write -P 0x31 3M 128k', '-c', 'discard 2M 64k', p)
        run(t, 'snapshot', '-f', 'qcow2', '-d', 's1', p)
    elif kind == 'extl2':         # extended L2: subcluster writes
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', p, '4M')
        qemu_io(p, 'write -P 0x11 0 4k', 'write -P 0x12 8k 4k', 'write -z 64k 4k',
                'write -P 0x13 1M 64k')
    elif kind == 'rc1':           # 1-bit refcounts
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', p, '4M')
        qemu_io(p, 'write -P 0x11 0 128k')
    elif kind == 'rc64':          # 64-bit refcounts and a snapshot
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=64', p, '4M')
        qemu_io(p, 'write -P 0x11 0 128k')
        run('qemu-img', 'snapshot', '-c', 's1', p)
        qemu_io(p, 'write -P 0x22 0 64k')
    elif kind == 'c512':          # smallest clusters: many L2 tables
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', p, '1M')
        qemu_io(p, 'write -P 0x11 0 8k', 'write -P 0x22 300k 2k', 'write -P 0x33 1020k 4k')
    elif kind == 'c2m':           # largest clusters
        run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', p, '8M')
        qemu_io(p, 'write -P 0x11 0 64k', 'write -P 0x22 6M 64k')
    elif kind == 'frag':          # out-of-order allocation, zero and discarded clusters
        run('qemu-img', 'create', '-q', '-f', 'qcow2', p, '8M')
        qemu_io(p, 'write -P 0x11 3M 64k', 'write -P 0x22 0 64k', 'write -P 0x33 6M 128k',
                'write -P 0x44 64k 64k', 'write -P 0x55 2M 192k', 'write -z 2M 64k',
                'discard 6M 64k', 'write -z -u 7M 64k')
    else:
        raise KeyError(kind)
    BASES[kind] = p
    return p


CASES = []


def case(name, kind, desc, only=''):
    """only: comma-separated commands the suite runs on this image (default all)"""
    def deco(fn):
        CASES.append((name, kind, desc, fn, only))
        return fn
    return deco


# ---- valid images (check counters, reads, map against qemu-img) -------------

for _kind in ('plain', 'v2', 'snap', 'zlib', 'zstd', 'backing', 'extl2', 'rc1', 'rc64',
              'c512', 'c2m', 'frag', 'pms'):
    case('ok-' + _kind, _kind, 'valid image (%s)' % _kind)(lambda m: None)

@case('pms-leak', 'pms', 'image written by pmemsnap, one refcount raised (leak)')
def _(m): m.set_refcount(m.data_cluster(0, 1) // m.h['cs'], 2)

# ---- header fields ----------------------------------------------------------

@case('hdr-bad-magic', 'plain', 'magic is not QFI\\xfb')
def _(m): m.w32(0, 0x514649fc)

@case('hdr-version-1', 'plain', 'version 1')
def _(m): m.w32(4, 1)

@case('hdr-version-4', 'plain', 'version 4')
def _(m): m.w32(4, 4)

@case('hdr-cluster-bits-8', 'plain', 'cluster_bits 8 (below 512 bytes)')
def _(m): m.w32(20, 8)

@case('hdr-cluster-bits-22', 'plain', 'cluster_bits 22 (above 2 MiB)')
def _(m): m.w32(20, 22)

@case('hdr-cluster-bits-64', 'plain', 'cluster_bits 64 (shift overflow)')
def _(m): m.w32(20, 64)

@case('hdr-size-huge', 'plain', 'virtual size 2^63')
def _(m): m.w64(24, 1 << 63)

@case('hdr-size-odd', 'plain', 'virtual size not a multiple of 512 (benign)')
def _(m): m.w64(24, 4 * MB - 100)

@case('hdr-l1-size-small', 'plain', 'l1_size 0 for a 4 MiB disk with data')
def _(m): m.w32(36, 0)

@case('hdr-l1-size-huge', 'plain', 'l1_size 0x10000000 (2 GiB L1)')
def _(m): m.w32(36, 0x10000000)

@case('hdr-l1-off-unaligned', 'plain', 'l1_table_offset not cluster aligned')
def _(m): m.w64(40, m.h['l1_off'] + 8)

@case('hdr-l1-off-eof', 'plain', 'l1_table_offset beyond the end of the file')
def _(m): m.w64(40, 1 << 40)

@case('hdr-l1-off-zero', 'plain', 'l1_table_offset 0 (overlaps the header)')
def _(m): m.w64(40, 0)

@case('hdr-rt-off-unaligned', 'plain', 'refcount_table_offset not cluster aligned')
def _(m): m.w64(48, m.h['rt_off'] + 512)

@case('hdr-rt-off-l1', 'plain', 'refcount table at the L1 table')
def _(m): m.w64(48, m.h['l1_off'])

@case('hdr-rt-off-eof', 'plain', 'refcount_table_offset beyond the end of the file')
def _(m): m.w64(48, 1 << 40)

@case('hdr-rt-clusters-0', 'plain', 'refcount_table_clusters 0')
def _(m): m.w32(56, 0)

@case('hdr-rt-clusters-huge', 'plain', 'refcount_table_clusters 0xffffffff')
def _(m): m.w32(56, 0xffffffff)

@case('hdr-nb-snapshots-huge', 'plain', 'nb_snapshots 0xffffffff')
def _(m): m.w32(60, 0xffffffff); m.w64(64, m.h['cs'] * 5)

@case('hdr-snap-off-unaligned', 'snap', 'snapshots_offset not 8-aligned')
def _(m): m.w64(64, m.h['snaps_off'] + 3)

@case('hdr-snap-off-eof', 'snap', 'snapshots_offset beyond the end of the file')
def _(m): m.w64(64, 1 << 40)

@case('hdr-header-length-small', 'plain', 'header_length 96 (< 104)')
def _(m): m.w32(100, 96)

@case('hdr-header-length-big', 'plain', 'header_length larger than a cluster')
def _(m): m.w32(100, m.h['cs'] + 8)

@case('hdr-incompat-unknown', 'plain', 'unknown incompatible feature bit 10')
def _(m): m.w64(72, m.h['incompat'] | (1 << 10))

@case('hdr-crypt-aes', 'plain', 'crypt_method 1 (AES)')
def _(m): m.w32(32, 1)

@case('hdr-crypt-luks', 'plain', 'crypt_method 2 (LUKS)')
def _(m): m.w32(32, 2)

@case('hdr-refcount-order-7', 'plain', 'refcount_order 7 (128-bit refcounts)')
def _(m): m.w32(96, 7)

@case('hdr-backing-off-eof', 'plain', 'backing file name beyond the header cluster')
def _(m): m.w64(8, m.h['cs'] - 4); m.w32(16, 16)

@case('hdr-backing-off-1-empty', 'plain', 'backing_file_offset 1, size 0 (QEMU: no backing)')
def _(m): m.w64(8, 1); m.w32(16, 0)

@case('hdr-backing-size-2000', 'backing', 'backing_file_size 2000 (> 1023)')
def _(m): m.w32(16, 2000)

@case('hdr-ext-unterminated', 'plain', 'header extension whose length runs past the cluster')
def _(m):
    hl = m.h['header_length']
    m.wbytes(hl, b'\0' * 64)
    m.w32(hl, 0x12345678)
    m.w32(hl + 4, m.h['cs'])

@case('hdr-ext-overlong', 'plain', 'header extensions never terminated (fill the cluster)')
def _(m):
    hl = m.h['header_length']
    off = hl
    while off + 16 <= m.h['cs']:
        m.w32(off, 0x12345678)
        m.w32(off + 4, 8)
        m.w64(off + 8, 0)
        off += 16

@case('hdr-ext-end-long', 'plain', 'end-of-extensions marker whose length runs past the cluster')
def _(m):
    hl = m.h['header_length']
    m.wbytes(hl, b'\0' * 16)
    m.w32(hl + 4, m.h['cs'] * 3)

@case('hdr-snap-off-unaligned-empty', 'plain', 'no snapshots, snapshots_offset not aligned')
def _(m): m.w64(64, 1)

@case('hdr-autoclear-data-raw', 'plain', 'data-file-raw autoclear bit without a data file')
def _(m): m.w64(88, m.h['autoclear'] | 2)

@case('hdr-ext-backing-fmt-long', 'backing', 'backing format extension of 2000 bytes')
def _(m):
    hl = m.h['header_length']
    m.w32(hl, 0xe2792aca)
    m.w32(hl + 4, 2000)

@case('hdr-data-file-bit', 'plain', 'external data file incompatible bit')
def _(m): m.w64(72, m.h['incompat'] | 4)

@case('hdr-compression-zstd-no-bit', 'plain', 'compression_type 1 without the incompatible bit')
def _(m): m.w8(104, 1)

@case('hdr-compression-type-7', 'plain', 'compression_type 7 with the incompatible bit')
def _(m): m.w8(104, 7); m.w64(72, m.h['incompat'] | 8)

@case('hdr-dirty', 'plain', 'dirty bit set (refcounts consistent)')
def _(m): m.w64(72, m.h['incompat'] | 1)

@case('hdr-dirty-leak', 'plain', 'dirty bit set and a leaked cluster')
def _(m):
    m.w64(72, m.h['incompat'] | 1)
    m.set_refcount(m.size() // m.h['cs'] - 1, 2)

@case('hdr-corrupt-bit', 'plain', 'corrupt bit set')
def _(m): m.w64(72, m.h['incompat'] | 2)

# ---- L1 / L2 entries --------------------------------------------------------

@case('l1e-eof', 'plain', 'L1 entry points beyond the end of the file')
def _(m): m.w64(m.l1e_off(0), (1 << 63) | (1 << 40))

@case('l1e-unaligned', 'plain', 'L1 entry not cluster aligned')
def _(m): m.w64(m.l1e_off(0), m.r64(m.l1e_off(0)) + 512)

@case('l1e-header', 'plain', 'L1 entry points at the header cluster (flags only)')
def _(m): m.w64(m.l1e_off(0), (1 << 63) | 0x200)

@case('l1e-reftable', 'plain', 'L1 entry points at the refcount table')
def _(m): m.w64(m.l1e_off(0), (1 << 63) | m.h['rt_off'])

@case('l1e-reserved', 'plain', 'L1 entry with reserved bits set')
def _(m): m.w64(m.l1e_off(0), m.r64(m.l1e_off(0)) | (1 << 57))

@case('l2e-eof', 'plain', 'L2 entry points beyond the end of the file')
def _(m): m.w64(m.l2e_off(0, 0), (1 << 63) | (1 << 40))

@case('l2e-l1', 'plain', 'L2 entry points at the L1 table')
def _(m): m.w64(m.l2e_off(0, 0), (1 << 63) | m.h['l1_off'])

@case('l2e-unaligned', 'plain', 'L2 entry not cluster aligned')
def _(m): m.w64(m.l2e_off(0, 0), m.r64(m.l2e_off(0, 0)) + 512)

@case('l2e-zero-unaligned', 'plain', 'preallocated zero cluster with an unaligned offset')
def _(m): m.w64(m.l2e_off(0, 3), (1 << 63) | (m.data_cluster() + 0x200) | 1)

@case('snap-l2e-zero-unaligned', 'snap', 'inactive preallocated zero cluster, unaligned offset')
def _(m):
    sn_l1 = m.r64(m.snap_entry(0))
    l2 = m.r64(sn_l1) & 0x00fffffffffffe00
    m.w64(l2 + 8 * 7, 0x50200 | 1)

@case('l2e-reserved', 'plain', 'L2 entry with reserved bits set')
def _(m): m.w64(m.l2e_off(0, 0), m.r64(m.l2e_off(0, 0)) | (1 << 60))

@case('l2e-copied-missing', 'plain', 'COPIED flag missing in an L2 entry')
def _(m): m.w64(m.l2e_off(0, 0), m.r64(m.l2e_off(0, 0)) & ~(1 << 63))

@case('l1e-copied-missing', 'plain', 'COPIED flag missing in an L1 entry')
def _(m): m.w64(m.l1e_off(0), m.r64(m.l1e_off(0)) & ~(1 << 63))

@case('l2e-shared', 'plain', 'two L2 entries point at the same data cluster')
def _(m): m.w64(m.l2e_off(0, 5), m.r64(m.l2e_off(0, 0)))

@case('l1e-all-same', 'plain', 'every L1 entry points at the same L2 table')
def _(m):
    e = m.r64(m.l1e_off(0)) & ~(1 << 63)
    for i in range(m.r32(36)):
        m.w64(m.l1e_off(i), e)

@case('l2e-self', 'plain', 'L2 entry points at its own L2 table')
def _(m): m.w64(m.l2e_off(0, 0), (1 << 63) | m.l2_table())

@case('rc1-overflow', 'rc1', '1-bit refcounts, a data cluster referenced twice')
def _(m): m.w64(m.l2e_off(0, 5), m.r64(m.l2e_off(0, 0)))

@case('l1e-all-shared-huge', 'huge', '65536 L1 entries all pointing at one full L2 table '
      '(check must give up in bounded time; QEMU would walk 2^29 entries)', only='check')
def _(m):
    e = m.r64(m.l1e_off(0)) & ~(1 << 63)
    l2 = e & 0x00fffffffffffe00
    m.wbytes(l2, struct.pack('>Q', m.r64(l2)) * (m.h['cs'] // 8))
    m.wbytes(m.h['l1_off'], struct.pack('>Q', e) * m.r32(36))

@case('l2e-compressed-huge', 'plain', 'compressed L2 entry with the largest size field')
def _(m): m.w64(m.l2e_off(0, 0), (1 << 62) | ((1 << 62) - 1))

@case('extl2-bitmap', 'extl2', 'extended L2: allocated and zero bits both set')
def _(m): m.w64(m.l2e_off(0, 0) + 8, 0x0000000100000001)

@case('extl2-unalloc-bitmap', 'extl2', 'extended L2: unallocated cluster with allocation bits')
def _(m):
    off = m.l2_table() + 16 * 5
    m.w64(off, 0)
    m.w64(off + 8, 0x3)

@case('snap-l2e-eof', 'snap', 'inactive L2 entry beyond the end of the file')
def _(m):
    sn_l1 = m.r64(m.snap_entry(0))
    l2 = m.r64(sn_l1) & 0x00fffffffffffe00
    m.w64(l2, 1 << 40)

@case('rt-entry-self', 'plain', 'refcount block is the refcount table itself')
def _(m): m.w64(m.h['rt_off'], m.h['rt_off'])

# ---- refcounts --------------------------------------------------------------

@case('rc-leak', 'plain', 'leaked cluster (refcount 1, unreferenced)')
def _(m):
    n = m.size() // m.h['cs']
    m.truncate((n + 1) * m.h['cs'])
    m.set_refcount(n, 1)

@case('rc-too-low', 'plain', 'refcount 0 for a referenced data cluster')
def _(m): m.set_refcount(m.data_cluster() // m.h['cs'], 0)

@case('rc-too-high', 'plain', 'refcount 2 for a data cluster (leak + COPIED)')
def _(m): m.set_refcount(m.data_cluster() // m.h['cs'], 2)

@case('rt-entry-eof', 'plain', 'refcount table entry beyond the end of the file')
def _(m): m.w64(m.h['rt_off'], 1 << 40)

@case('rt-entry-unaligned', 'plain', 'refcount table entry not cluster aligned')
def _(m): m.w64(m.h['rt_off'], m.refblock(0) + 0x1000)

@case('rt-entry-zero', 'plain', 'refcount table entry 0 cleared (refcount block missing)')
def _(m): m.w64(m.h['rt_off'], 0)

@case('rt-entry-l1', 'plain', 'refcount block overlapping the L1 table')
def _(m): m.w64(m.h['rt_off'], m.h['l1_off'])

# ---- snapshots --------------------------------------------------------------

@case('snap-l1-eof', 'snap', 'snapshot L1 table beyond the end of the file')
def _(m): m.w64(m.snap_entry(0), 1 << 40)

@case('snap-l1-unaligned', 'snap', 'snapshot L1 table not cluster aligned')
def _(m): m.w64(m.snap_entry(0), m.r64(m.snap_entry(0)) + 8)

@case('snap-l1-size-huge', 'snap', 'snapshot l1_size 0x10000000')
def _(m): m.w32(m.snap_entry(0) + 8, 0x10000000)

@case('snap-name-size', 'snap', 'snapshot name_size runs past the table')
def _(m): m.w16(m.snap_entry(1) + 14, 0xffff)

@case('snap-extra-huge', 'snap', 'snapshot extra_data_size 0xffffffff')
def _(m): m.w32(m.snap_entry(0) + 36, 0xffffffff)

@case('snap-id-dup', 'snap', 'two snapshots with the same id')
def _(m):
    e0, e1 = m.snap_entry(0), m.snap_entry(1)
    x0, x1 = m.r32(e0 + 36), m.r32(e1 + 36)
    m.f.seek(e0 + 40 + x0)
    id0 = m.f.read(m.r16(e0 + 12))
    m.wbytes(e1 + 40 + x1, id0)

@case('snap-data-rc-low', 'snap', 'data cluster shared by two snapshots with refcount 1')
def _(m):
    sn_l1 = m.r64(m.snap_entry(0))
    l2 = m.r64(sn_l1) & 0x00fffffffffffe00
    m.set_refcount((m.r64(l2 + 8) & 0x00fffffffffffe00) // m.h['cs'], 1)

@case('snap-l2-rc-high', 'snap', 'inactive L2 table refcount too high')
def _(m):
    sn_l1 = m.r64(m.snap_entry(0))
    l2 = m.r64(sn_l1) & 0x00fffffffffffe00
    m.set_refcount(l2 // m.h['cs'], 3)

# ---- compressed clusters ----------------------------------------------------

def comp_entry(m):
    for i in range(m.h['cs'] // 8):
        e = m.r64(m.l2e_off(0, i))
        if e & (1 << 62):
            return m.l2e_off(0, i), e
    raise RuntimeError('no compressed cluster')


@case('comp-eof', 'zlib', 'compressed descriptor beyond the end of the file')
def _(m):
    off, e = comp_entry(m)
    shift = 62 - (m.h['cluster_bits'] - 8)
    m.w64(off, (e & ~((1 << shift) - 1)) | (1 << 40))

@case('comp-garbage', 'zlib', 'compressed data replaced by garbage')
def _(m):
    off, e = comp_entry(m)
    shift = 62 - (m.h['cluster_bits'] - 8)
    coff = e & ((1 << shift) - 1)
    m.wbytes(coff, bytes((i * 37 + 11) & 0xff for i in range(256)))

@case('comp-copied', 'zlib', 'COPIED flag on a compressed cluster')
def _(m):
    off, e = comp_entry(m)
    m.w64(off, e | (1 << 63))

@case('zstd-garbage', 'zstd', 'zstd compressed data replaced by garbage')
def _(m):
    off, e = comp_entry(m)
    shift = 62 - (m.h['cluster_bits'] - 8)
    coff = e & ((1 << shift) - 1)
    m.wbytes(coff, b'\x28\xb5\x2f\xfd' + bytes((i * 53 + 7) & 0xff for i in range(252)))

# ---- truncated files --------------------------------------------------------

@case('trunc-l1', 'plain', 'file cut in the middle of the L1 table')
def _(m): m.truncate(m.h['l1_off'] + 4)

@case('trunc-l2', 'plain', 'file cut in the middle of the first L2 table')
def _(m): m.truncate(m.l2_table() + 100)

@case('trunc-refblock', 'plain', 'file cut in the middle of the refcount block')
def _(m): m.truncate(m.refblock(0) + 64)

@case('trunc-data', 'plain', 'file cut in the middle of the last data cluster')
def _(m): m.truncate(m.size() - m.h['cs'] // 2)

# ---- version 2 --------------------------------------------------------------

@case('v2-zero-flag', 'v2', 'version 2 image with the (v3-only) zero flag in an L2 entry')
def _(m): m.w64(m.l2e_off(0, 0), m.r64(m.l2e_off(0, 0)) | 1)


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, 'cases.txt'), 'w') as lst:
        for name, kind, desc, fn, only in CASES:
            if ONLY and name not in ONLY:
                continue
            if kind == 'pms' and not PMS:
                continue
            p = os.path.join(OUT, name + '.qcow2')
            shutil.copyfile(base(kind), p)
            m = Img(p)
            fn(m)
            m.close()
            lst.write('%s\t%s\t%s\n' % (name, only or 'all', desc))


if __name__ == '__main__':
    main()
