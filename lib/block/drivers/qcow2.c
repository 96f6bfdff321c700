/* qcow2 driver: open/validate, header, I/O paths, creation.
 *
 * See qcow2.h for the cluster states, the write-ordering invariants and the
 * locking rule (everything runs under bs->lock).
 *
 * Write path for one cluster:
 *   1. find the L2 table (allocate one, or copy a shared one: COW of metadata);
 *   2. if the entry is NORMAL with COPIED (and, with extended L2, every
 *      subcluster allocated) write in place;
 *   3. else allocate a cluster, fill it with the cluster's current contents
 *      (backing/zero/compressed/old data) overlaid with the new bytes, write
 *      it, point the L2 entry at it (COPIED), and queue the old host
 *      cluster's reference for release.
 * Released references are applied only after the L2 change is durable
 * (pending frees, drained by flush), so a crash can leak but never leaves
 * an entry pointing at a freed cluster.
 *
 * Compressed writes (whole clusters, qcow2_pwrite_compressed) follow the
 * same order: the compressed bytes get a byte range from qcow2_alloc_bytes
 * (packed after the previous compressed cluster; +1 refcount on every host
 * cluster the range touches, never running into a cluster another user
 * owns), are written, and only then does the L2 entry (COMPRESSED, no
 * COPIED, extended-L2 bitmap 0) link them; the old entry's reference goes
 * to the pending frees.  QEMU refuses to compress over an allocated
 * cluster; we replace it like any other write does.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>
#include "qcow2.h"
#include "../../util/error.h"

/* ------------------------------------------------------------------------ */
/* entries                                                                  */

enum qcow2_ctype qcow2_entry_type(struct qcow2_state *s, uint64_t e)
{
    if (e & QCOW_OFLAG_COMPRESSED)
        return QC_COMPRESSED;
    if (!s->ext_l2 && (e & QCOW_OFLAG_ZERO) && s->version >= 3)
        return (e & L2E_OFFSET_MASK) ? QC_ZERO_ALLOC : QC_ZERO_PLAIN;
    if (e & L2E_OFFSET_MASK)
        return QC_NORMAL;
    return QC_UNALLOCATED;
}

uint64_t qcow2_l2_get(struct qcow2_state *s, const uint8_t *l2, uint64_t i)
{
    uint64_t v;
    memcpy(&v, l2 + i * s->l2_entry_size, 8);
    return be64toh(v);
}

uint64_t qcow2_l2_get_bitmap(struct qcow2_state *s, const uint8_t *l2, uint64_t i)
{
    if (!s->ext_l2) return 0;
    uint64_t v;
    memcpy(&v, l2 + i * s->l2_entry_size + 8, 8);
    return be64toh(v);
}

void qcow2_l2_set(struct qcow2_state *s, uint8_t *l2, uint64_t i, uint64_t v)
{
    v = htobe64(v);
    memcpy(l2 + i * s->l2_entry_size, &v, 8);
}

void qcow2_l2_set_bitmap(struct qcow2_state *s, uint8_t *l2, uint64_t i, uint64_t v)
{
    if (!s->ext_l2) return;
    v = htobe64(v);
    memcpy(l2 + i * s->l2_entry_size + 8, &v, 8);
}

/* Entry i of a cached L2 table changed: only its slice is written back. */
static void l2_entry_dirty(struct qcow2_state *s, const uint8_t *l2, uint64_t i)
{
    qcow2_cache_mark_dirty_range(&s->l2_cache, l2, i * s->l2_entry_size, s->l2_entry_size);
}

void qcow2_compressed_range(struct qcow2_state *s, uint64_t e, uint64_t *coff, uint64_t *csize)
{
    uint64_t off = e & s->coffset_mask;
    uint64_t nsec = ((e >> s->csize_shift) & s->csize_mask) + 1;
    *coff = off;
    *csize = nsec * 512 - (off & 511);
}

/* Corruption found in an image.  During the open it only fails the open.
 * Found by an operation on an open image, it is signalled as QEMU does, once
 * per open image: a writable image gets the on-disk corrupt bit (a later
 * writable open is refused until `check -r all`), and the message is
 * QEMU's "qcow2: Marking image as corrupt: ...; further corruption events
 * will be suppressed" (read-only: "qcow2: Image is corrupt: ...; further
 * non-fatal corruption events will be suppressed"), which front ends
 * (`io`) print as qemu-io does; later events carry a plain message. */
int qcow2_signal_corruption(struct bdev *bs, const char *fmt, ...)
{
    struct qcow2_state *s = QS(bs);
    char m[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof m, fmt, ap);
    va_end(ap);
    if (!s->opened || s->check_mode || s->signalled)
        return pms_err(EIO, "image '%s' is corrupt: %s", bs->filename, m);
    s->signalled = true;
    bool fatal = s->writable;
    if (fatal && !(s->incompat & QCOW2_INCOMPAT_CORRUPT) && s->version >= 3) {
        uint64_t be = htobe64(s->incompat | QCOW2_INCOMPAT_CORRUPT);
        if (bdev_file_pwrite(bs->file, &be, 8, 72) == 0 && bdev_file_flush(bs->file) == 0)
            s->incompat |= QCOW2_INCOMPAT_CORRUPT;
    }
    if (fatal)
        return pms_err(EIO, "qcow2: Marking image as corrupt: %s; further corruption events "
                       "will be suppressed", m);
    return pms_err(EIO, "qcow2: Image is corrupt: %s; further non-fatal corruption events "
                   "will be suppressed", m);
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

int qcow2_check_host_range(struct bdev *bs, uint64_t off, uint64_t len, const char *what)
{
    struct qcow2_state *s = QS(bs);
    if (off & 511 || off > QCOW2_MAX_HOST_OFFSET || len > QCOW2_MAX_HOST_OFFSET - off)
        return qcow2_signal_corruption(bs, "%s at offset %llu is invalid", what,
                                       (unsigned long long)off);
    if (ranges_overlap(off, len, 0, s->cluster_size))
        return qcow2_signal_corruption(bs, "%s at offset %llu overlaps the header", what,
                                       (unsigned long long)off);
    if (ranges_overlap(off, len, s->l1_offset, (uint64_t)s->l1_size * 8))
        return qcow2_signal_corruption(bs, "%s at offset %llu overlaps the active L1 table",
                                       what, (unsigned long long)off);
    if (ranges_overlap(off, len, s->reftable_offset,
                       (uint64_t)s->reftable_clusters << s->cluster_bits))
        return qcow2_signal_corruption(bs, "%s at offset %llu overlaps the refcount table",
                                       what, (unsigned long long)off);
    if (ranges_overlap(off, len, s->snapshots_offset, s->snapshots_size))
        return qcow2_signal_corruption(bs, "%s at offset %llu overlaps the snapshot table",
                                       what, (unsigned long long)off);
    return 0;
}

/* Does a cluster-sized table at any nonzero offset of tab[0..n) (masked)
 * overlap [off, off+len)?  Branch-free, as it runs before every in-place
 * data write: a table at x overlaps iff off - cs < x < off + len (off is
 * past the header, so nothing wraps). */
static bool tables_overlap(const uint64_t *tab, uint64_t n, uint64_t mask, uint64_t cs,
                           uint64_t off, uint64_t len)
{
    uint64_t lo = off - (cs - 1), span = len + cs - 1, hit = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t x = tab[i] & mask;
        hit |= (uint64_t)(x != 0) & (uint64_t)(x - lo < span);
    }
    return hit != 0;
}

void qcow2_reftable_bound(struct qcow2_state *s)
{
    uint64_t n = s->reftable ? s->reftable_entries : 0;
    while (n && !(s->reftable[n - 1] & REFT_OFFSET_MASK))
        n--;
    s->reftable_hi = n;
}

int qcow2_check_overlap(struct bdev *bs, uint64_t off, uint64_t len, unsigned ign,
                        const char *what)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_check_host_range(bs, off, len, what);
    if (r < 0 || !len) return r;
    if (!(ign & QCOW2_OL_ACTIVE_L2) && s->l1 &&
        tables_overlap(s->l1, s->l1_size, L1E_OFFSET_MASK, s->cluster_size, off, len))
        return qcow2_signal_corruption(bs, "%s at offset %llu overlaps an active L2 table",
                                       what, (unsigned long long)off);
    if (!(ign & QCOW2_OL_REFBLOCK) && s->reftable &&
        tables_overlap(s->reftable, s->reftable_hi, REFT_OFFSET_MASK, s->cluster_size,
                       off, len))
        return qcow2_signal_corruption(bs, "%s at offset %llu overlaps a refcount block",
                                       what, (unsigned long long)off);
    for (int i = 0; i < s->nb_snaps; i++)
        if (ranges_overlap(off, len, s->snaps[i].l1_table_offset,
                           (uint64_t)s->snaps[i].l1_size * 8))
            return qcow2_signal_corruption(bs, "%s at offset %llu overlaps an inactive L1 "
                                           "table", what, (unsigned long long)off);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* header                                                                   */

static int probe(const uint8_t *buf, size_t len)
{
    uint32_t m;
    if (len < 8) return 0;
    memcpy(&m, buf, 4);
    uint32_t v;
    memcpy(&v, buf + 4, 4);
    (void)v;   /* any version: an unsupported one is refused with a clear error */
    return be32toh(m) == QCOW2_MAGIC ? 100 : 0;
}

static size_t add_ext(uint8_t *buf, size_t pos, size_t cap, uint32_t type, const void *data,
                      uint32_t len)
{
    size_t need = 8 + ((len + 7u) & ~7u);
    if (pos + need > cap) return SIZE_MAX;
    struct qcow2_ext_header h = { htobe32(type), htobe32(len) };
    memcpy(buf + pos, &h, 8);
    memset(buf + pos + 8, 0, need - 8);
    if (len) memcpy(buf + pos + 8, data, len);
    return pos + need;
}

static const struct { uint8_t type, bit; const char *name; } feature_names[] = {
    { 0, 0, "dirty bit" }, { 0, 1, "corrupt bit" }, { 0, 2, "external data file" },
    { 0, 3, "compression type" }, { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" }, { 2, 0, "bitmaps" }, { 2, 1, "raw external data" },
};

/* Serialise header + extensions + backing name into buf (one cluster). */
static int build_header(struct qcow2_state *s, uint8_t *buf, size_t cap, size_t *lenp)
{
    memset(buf, 0, cap);
    struct qcow2_header h;
    memset(&h, 0, sizeof h);
    h.magic = htobe32(QCOW2_MAGIC);
    h.version = htobe32((uint32_t)s->version);
    h.cluster_bits = htobe32(s->cluster_bits);
    h.size = htobe64(s->size);
    h.l1_size = htobe32(s->l1_size);
    h.l1_table_offset = htobe64(s->l1_offset);
    h.refcount_table_offset = htobe64(s->reftable_offset);
    h.refcount_table_clusters = htobe32(s->reftable_clusters);
    h.nb_snapshots = htobe32((uint32_t)s->nb_snaps);
    h.snapshots_offset = htobe64(s->snapshots_offset);
    size_t hlen = QCOW2_V2_HEADER_LEN;
    if (s->version >= 3) {
        h.incompatible_features = htobe64(s->incompat);
        h.compatible_features = htobe64(s->compat);
        h.autoclear_features = htobe64(s->autoclear);
        h.refcount_order = htobe32(s->refcount_order);
        hlen = s->header_length < sizeof h ? sizeof h : s->header_length;
        h.header_length = htobe32((uint32_t)hlen);
        h.compression_type = s->compression_type;
    }
    if (hlen > cap) return pms_err(ENOSPC, "header does not fit in one cluster");
    memcpy(buf, &h, hlen < sizeof h ? hlen : sizeof h);
    size_t pos = hlen;
    if (s->backing_format)
        pos = add_ext(buf, pos, cap, QCOW2_EXT_BACKING_FORMAT, s->backing_format,
                      (uint32_t)strlen(s->backing_format));
    if (pos != SIZE_MAX && s->version >= 3 && s->cluster_size > 4096) {
        if (s->feature_table) {
            pos = add_ext(buf, pos, cap, QCOW2_EXT_FEATURE_TABLE, s->feature_table,
                          s->feature_table_len);
        } else {
            struct qcow2_feature_name ft[sizeof feature_names / sizeof *feature_names];
            memset(ft, 0, sizeof ft);
            for (size_t i = 0; i < sizeof ft / sizeof *ft; i++) {
                ft[i].type = feature_names[i].type;
                ft[i].bit = feature_names[i].bit;
                strncpy(ft[i].name, feature_names[i].name, sizeof ft[i].name);
            }
            pos = add_ext(buf, pos, cap, QCOW2_EXT_FEATURE_TABLE, ft, sizeof ft);
        }
    }
    for (int i = 0; pos != SIZE_MAX && i < s->nb_exts; i++)
        pos = add_ext(buf, pos, cap, s->exts[i].type, s->exts[i].data, s->exts[i].len);
    if (pos != SIZE_MAX && s->version >= 3)
        pos = add_ext(buf, pos, cap, QCOW2_EXT_END, NULL, 0);
    else if (pos != SIZE_MAX)
        pos = add_ext(buf, pos, cap, QCOW2_EXT_END, NULL, 0);
    if (pos == SIZE_MAX)
        return pms_err(ENOSPC, "header extensions do not fit in one cluster");
    if (s->backing_file) {
        size_t bl = strlen(s->backing_file);
        if (pos + bl > cap)
            return pms_err(ENOSPC, "backing file name does not fit in the header cluster");
        memcpy(buf + pos, s->backing_file, bl);
        uint64_t bo = htobe64(pos);
        uint32_t bsz = htobe32((uint32_t)bl);
        memcpy(buf + 8, &bo, 8);
        memcpy(buf + 16, &bsz, 4);
        pos += bl;
    }
    *lenp = pos;
    return 0;
}

int qcow2_update_header(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    uint8_t *buf = malloc(s->cluster_size);
    if (!buf) return pms_err(ENOMEM, "out of memory");
    size_t len;
    int r = build_header(s, buf, s->cluster_size, &len);
    if (r == 0) r = bdev_file_pwrite(bs->file, buf, len, 0);
    if (r == 0) r = bdev_file_flush(bs->file);
    free(buf);
    return r;
}

void qcow2_l1_mark_dirty(struct qcow2_state *s, uint32_t i)
{
    if (s->l1_dirty_lo >= s->l1_dirty_hi) {
        s->l1_dirty_lo = i;
        s->l1_dirty_hi = i + 1;
    } else {
        if (i < s->l1_dirty_lo) s->l1_dirty_lo = i;
        if (i + 1 > s->l1_dirty_hi) s->l1_dirty_hi = i + 1;
    }
}

int qcow2_write_l1(struct bdev *bs, uint32_t first, uint32_t n)
{
    struct qcow2_state *s = QS(bs);
    if (!n) return 0;
    uint64_t *tmp = malloc((size_t)n * 8);
    if (!tmp) return pms_err(ENOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++) tmp[i] = htobe64(s->l1[first + i]);
    int r = bdev_file_pwrite(bs->file, tmp, (uint64_t)n * 8, s->l1_offset + (uint64_t)first * 8);
    free(tmp);
    if (r == 0 && first <= s->l1_dirty_lo && first + n >= s->l1_dirty_hi)
        s->l1_dirty_lo = s->l1_dirty_hi = 0;     /* covered every deferred entry */
    if (r == 0) r = qcow2_barrier(bs);
    return r;
}

int qcow2_grow_l1(struct bdev *bs, uint32_t min_size)
{
    struct qcow2_state *s = QS(bs);
    if (min_size <= s->l1_size) return 0;
    uint64_t nsize = s->l1_size ? s->l1_size : 1;
    while (nsize < min_size) nsize = nsize * 3 / 2 + 1;
    if (nsize * 8 > QCOW2_MAX_L1_BYTES) nsize = min_size;
    if (nsize * 8 > QCOW2_MAX_L1_BYTES)
        return pms_err(EFBIG, "L1 table would exceed %u bytes", QCOW2_MAX_L1_BYTES);
    uint64_t bytes = nsize * 8;
    uint64_t *nl1 = calloc(1, qc_size_to_clusters(s, bytes) << s->cluster_bits);
    if (!nl1) return pms_err(ENOMEM, "out of memory");
    int r = qcow2_flush_metadata(bs);
    int64_t off = r < 0 ? r : qcow2_alloc_clusters(bs, qc_size_to_clusters(s, bytes));
    if (off < 0) { free(nl1); return (int)off; }
    r = qcow2_flush_metadata(bs);
    for (uint32_t i = 0; i < s->l1_size; i++) nl1[i] = htobe64(s->l1[i]);
    if (r == 0) r = bdev_file_pwrite(bs->file, nl1, qc_size_to_clusters(s, bytes) << s->cluster_bits,
                                     (uint64_t)off);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) { free(nl1); return r; }
    struct { uint32_t size; uint64_t off; } __attribute__((packed)) h = {
        htobe32((uint32_t)nsize), htobe64((uint64_t)off) };
    r = bdev_file_pwrite(bs->file, &h, sizeof h, 36);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) { free(nl1); return r; }
    for (uint64_t i = 0; i < nsize; i++) nl1[i] = be64toh(nl1[i]);
    uint64_t old_off = s->l1_offset, old_size = s->l1_size;
    free(s->l1);
    s->l1 = nl1;
    s->l1_size = (uint32_t)nsize;
    s->l1_offset = (uint64_t)off;
    s->l1_reserved = true;                   /* written whole above */
    return old_size ? qcow2_free_clusters(bs, old_off, old_size * 8) : 0;
}

/* ------------------------------------------------------------------------ */
/* open                                                                     */

static int read_extensions(struct bdev *bs, const uint8_t *buf, size_t buflen, size_t start,
                           uint64_t end)
{
    struct qcow2_state *s = QS(bs);
    size_t pos = start;
    int cap = s->nb_exts;
    for (;;) {
        /* as QEMU: the list may fill its area without an end marker; a
         * header (the end marker's too) that runs past the area is refused */
        if (pos >= end)
            return 0;
        if (pos + 8 > end || pos + 8 > buflen)
            return pms_err(EINVAL, "header extension at offset %zu runs past the header "
                           "area", pos);
        struct qcow2_ext_header h;
        memcpy(&h, buf + pos, 8);
        uint32_t type = be32toh(h.type), len = be32toh(h.len);
        pos += 8;
        if (len > end - pos || len > buflen - pos)
            return pms_err(EINVAL, "header extension 0x%x (%u bytes) runs past the header "
                           "cluster", type, len);
        if (type == QCOW2_EXT_END) return 0;
        const uint8_t *d = buf + pos;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len > 31) return pms_err(EINVAL, "backing format name too long (%u bytes)", len);
            free(s->backing_format);
            s->backing_format = strndup((const char *)d, len);
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            free(s->feature_table);
            s->feature_table = malloc(len ? len : 1);
            if (!s->feature_table) return pms_err(ENOMEM, "out of memory");
            memcpy(s->feature_table, d, len);
            s->feature_table_len = len;
            break;
        case QCOW2_EXT_CRYPTO:
            return pms_err(ENOTSUP, "encrypted images are not supported");
        case QCOW2_EXT_DATA_FILE:
            return pms_err(ENOTSUP, "images with an external data file are not supported");
        default: {
            struct qcow2_ext *ne = s->exts;
            if (s->nb_exts == cap) {
                cap = cap ? 2 * cap : 8;
                ne = realloc(s->exts, (size_t)cap * sizeof *ne);
                if (!ne) return pms_err(ENOMEM, "out of memory");
                s->exts = ne;
            }
            ne[s->nb_exts].type = type;
            ne[s->nb_exts].len = len;
            ne[s->nb_exts].data = malloc(len ? len : 1);
            if (!ne[s->nb_exts].data) return pms_err(ENOMEM, "out of memory");
            memcpy(ne[s->nb_exts].data, d, len);
            s->nb_exts++;
        }
        }
        pos += (len + 7u) & ~7u;
    }
}

/* Persistent dirty bitmaps: we do not maintain them, so before the first
 * write we mark every bitmap "in use" (inconsistent), exactly the state
 * QEMU leaves after a crash; the bitmaps extension and its clusters stay
 * valid (no leaks), and QEMU users can remove or re-create the bitmaps.
 * Returns 0 when done, <0 when the directory is unusable (then the
 * autoclear bit is cleared instead, as the spec requires). */
static int mark_bitmaps_in_use(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    const struct qcow2_ext *ext = NULL;
    for (int i = 0; i < s->nb_exts; i++)
        if (s->exts[i].type == QCOW2_EXT_BITMAPS) ext = &s->exts[i];
    if (!ext || ext->len < 24) return -EINVAL;
    uint32_t nb; uint64_t dsize, doff;
    memcpy(&nb, ext->data, 4); memcpy(&dsize, ext->data + 8, 8); memcpy(&doff, ext->data + 16, 8);
    nb = be32toh(nb); dsize = be64toh(dsize); doff = be64toh(doff);
    int64_t flen = bdev_file_length(bs->file);
    if (nb == 0 || nb > 65535 || dsize < 24 || dsize > (64u << 20) || qc_off_in_cluster(s, doff) ||
        flen < 0 || doff + dsize > (uint64_t)flen ||
        qcow2_check_host_range(bs, doff, dsize, "bitmap directory") < 0) {
        pms_err_clear();
        return -EINVAL;
    }
    uint8_t *dir = malloc(dsize);
    if (!dir) return -ENOMEM;
    int r = bdev_file_pread(bs->file, dir, dsize, doff);
    uint64_t pos = 0;
    for (uint32_t i = 0; r == 0 && i < nb; i++) {
        if (pos + 24 > dsize) { r = -EINVAL; break; }
        uint32_t flags, extra; uint16_t nlen;
        memcpy(&flags, dir + pos + 12, 4); memcpy(&nlen, dir + pos + 18, 2);
        memcpy(&extra, dir + pos + 20, 4);
        flags = htobe32(be32toh(flags) | 1u);         /* BME_FLAG_IN_USE */
        memcpy(dir + pos + 12, &flags, 4);
        pos += 24 + (uint64_t)be32toh(extra) + be16toh(nlen);
        pos = (pos + 7) & ~7ull;
    }
    if (r == 0 && pos > dsize) r = -EINVAL;
    if (r == 0) r = bdev_file_pwrite(bs->file, dir, dsize, doff);
    if (r == 0) r = bdev_file_flush(bs->file);
    free(dir);
    if (r < 0) pms_err_clear();
    return r;
}

static void free_state(struct qcow2_state *s)
{
    free(s->l1); s->l1 = NULL;
    free(s->reftable); s->reftable = NULL;
    free(s->backing_file); s->backing_file = NULL;
    free(s->backing_format); s->backing_format = NULL;
    for (int i = 0; i < s->nb_exts; i++) free(s->exts[i].data);
    free(s->exts); s->exts = NULL; s->nb_exts = 0;
    free(s->feature_table); s->feature_table = NULL;
    qcow2_free_snapshots(s);
    qcow2_cache_destroy(&s->l2_cache);
    qcow2_cache_destroy(&s->rb_cache);
    free(s->cbuf); s->cbuf = NULL;
    free(s->zbuf); s->zbuf = NULL;
    free(s->bbuf); s->bbuf = NULL; s->bcap = 0;
    free(s->bjobs); s->bjobs = NULL; s->bjobs_cap = 0;
    free(s->bpieces); s->bpieces = NULL; s->bpieces_cap = 0;
    free(s->pending); s->pending = NULL;
}

static int open_backing(struct bdev *bs, const struct pms_open_opts *o)
{
    struct qcow2_state *s = QS(bs);
    /* the files of the chain being opened by this thread, to name loops */
    static __thread struct { dev_t dev; ino_t ino; } chain[QCOW2_MAX_CHAIN_DEPTH];
    static __thread int depth;
    char *path = malloc(PATH_MAX);
    if (!path) return pms_err(ENOMEM, "out of memory");
    if (s->backing_file[0] == '/' || !strchr(bs->filename, '/'))
        snprintf(path, PATH_MAX, "%s", s->backing_file);
    else {
        const char *sl = strrchr(bs->filename, '/');
        snprintf(path, PATH_MAX, "%.*s/%s", (int)(sl - bs->filename), bs->filename,
                 s->backing_file);
    }
    struct pms_open_opts bo;
    pms_open_opts_init(&bo);
    bo.readonly = 1;
    bo.format = o->backing_format ? o->backing_format : s->backing_format;
    bo.cache_mode = o->cache_mode;
    bo.l2_cache_size = QCOW2_BACKING_L2_CACHE;
    int r = 0;
    struct stat st;
    if (bo.format && strcmp(bo.format, "qcow2") && strcmp(bo.format, "raw"))
        r = pms_err(ENOTSUP, "Could not open backing file: Unknown driver '%s'", bo.format);
    else if (depth >= QCOW2_MAX_CHAIN_DEPTH)
        r = pms_err(ELOOP, "backing chain is deeper than %d images", QCOW2_MAX_CHAIN_DEPTH);
    else if (stat(path, &st) == 0) {
        struct stat me;
        if (stat(bs->filename, &me) == 0 && me.st_dev == st.st_dev && me.st_ino == st.st_ino)
            r = pms_err(ELOOP, "'%s' is its own backing file", bs->filename);
        for (int i = 0; i < depth && r == 0; i++)
            if (chain[i].dev == st.st_dev && chain[i].ino == st.st_ino)
                r = pms_err(ELOOP, "backing chain loops back to '%s'", path);
        chain[depth].dev = st.st_dev;
        chain[depth].ino = st.st_ino;
    } else {
        chain[depth].dev = 0;
        chain[depth].ino = 0;
    }
    if (r == 0) {
        depth++;
        r = bdev_open(path, &bo, &bs->backing);
        depth--;
        /* one level's message is enough (a deep chain would repeat it) */
        if (r < 0 && !strstr(pms_err_get(), "Could not open backing file"))
            r = pms_err(-r, "Could not open backing file: %s", pms_err_get());
    }
    free(path);
    return r;
}

static int qcow2_open(struct bdev *bs, const char *path, const struct pms_open_opts *o)
{
    struct qcow2_state *s = QS(bs);
    (void)path;
    s->check_mode = o->check != 0;
    const bool ck = s->check_mode;
    int64_t flen = bdev_file_length(bs->file);
    if (flen < 0) return (int)flen;
    uint8_t hb[sizeof(struct qcow2_header)];
    memset(hb, 0, sizeof hb);
    if ((uint64_t)flen < QCOW2_V2_HEADER_LEN)
        return pms_err(EINVAL, "file is too small to be a qcow2 image");
    int r = bdev_file_pread(bs->file, hb, sizeof hb, 0);
    if (r < 0) return r;
    struct qcow2_header h;
    memcpy(&h, hb, sizeof h);
    if (be32toh(h.magic) != QCOW2_MAGIC)
        return pms_err(EINVAL, "not a qcow2 image (bad magic)");
    s->version = (int)be32toh(h.version);
    if (s->version != 2 && s->version != 3)
        return pms_err(ENOTSUP, "unsupported qcow2 version %d", s->version);
    s->cluster_bits = be32toh(h.cluster_bits);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return pms_err(EINVAL, "unsupported cluster size: 2^%u", s->cluster_bits);
    s->cluster_size = 1ull << s->cluster_bits;
    if (be32toh(h.crypt_method))
        return pms_err(ENOTSUP, "encrypted images are not supported");
    s->size = be64toh(h.size);
    if (s->size > (1ull << 62))
        return pms_err(EFBIG, "image size %llu is too large", (unsigned long long)s->size);
    if (s->version == 2) {
        s->refcount_order = 4;
        s->header_length = QCOW2_V2_HEADER_LEN;
    } else {
        s->incompat = be64toh(h.incompatible_features);
        s->compat = be64toh(h.compatible_features);
        s->autoclear = be64toh(h.autoclear_features);
        s->refcount_order = be32toh(h.refcount_order);
        s->header_length = be32toh(h.header_length);
        if (s->header_length < QCOW2_V3_MIN_HEADER_LEN)
            return pms_err(EINVAL, "qcow2 header length %u is too small", s->header_length);
        if (s->header_length > s->cluster_size)
            return pms_err(EINVAL, "qcow2 header length %u exceeds the cluster size",
                           s->header_length);
        if (s->header_length >= 105)
            s->compression_type = h.compression_type;
        if (s->incompat & ~QCOW2_INCOMPAT_KNOWN) {
            uint64_t unk = s->incompat & ~QCOW2_INCOMPAT_KNOWN;
            if (unk & QCOW2_INCOMPAT_DATA_FILE)
                return pms_err(ENOTSUP, "images with an external data file are not supported");
            return pms_err(ENOTSUP, "unsupported qcow2 feature(s): incompatible bits 0x%llx",
                           (unsigned long long)unk);
        }
        if (s->refcount_order > 6)
            return pms_err(EINVAL, "refcount order %u is out of range (0..6)", s->refcount_order);
        if (s->incompat & QCOW2_INCOMPAT_COMPRESSION) {
            if (s->compression_type > 1)
                return pms_err(ENOTSUP, "unknown compression type %u", s->compression_type);
            if (s->compression_type == QCOW2_COMPRESSION_ZLIB)   /* as QEMU refuses it */
                return pms_err(EINVAL, "Compression type incompatible feature bit must not "
                               "be set for the zlib compression type");
        } else if (s->compression_type != 0)
            return pms_err(EINVAL, "compression type %u set without the compression feature bit",
                           s->compression_type);
        if (s->autoclear & QCOW2_AUTOCLEAR_DATA_RAW)         /* as QEMU refuses it */
            return pms_err(EINVAL, "data-file-raw requires a data file");
        s->ext_l2 = (s->incompat & QCOW2_INCOMPAT_EXTL2) != 0;
        if (s->ext_l2 && s->cluster_bits < 14)
            return pms_err(EINVAL, "extended L2 entries need clusters of at least 16 KiB");
    }
    if ((s->incompat & QCOW2_INCOMPAT_CORRUPT) && !bs->readonly && !ck)
        return pms_err(EACCES, "image is marked corrupt; it can only be opened read-only "
                       "(repair with 'qemu-img check -r all')");
    s->refcount_bits = 1u << s->refcount_order;
    s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX : (1ull << s->refcount_bits) - 1;
    s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
    s->l2_entry_size = s->ext_l2 ? 16 : 8;
    s->l2_bits = s->cluster_bits - (s->ext_l2 ? 4 : 3);
    s->l2_entries = 1ull << s->l2_bits;
    s->sc_bits = s->ext_l2 ? s->cluster_bits - 5 : s->cluster_bits;
    s->sc_size = 1ull << s->sc_bits;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
    s->coffset_mask = (1ull << s->csize_shift) - 1;

    /* header cluster and extensions */
    uint8_t *cl = malloc(s->cluster_size);
    if (!cl) return pms_err(ENOMEM, "out of memory");
    r = bdev_file_pread(bs->file, cl, s->cluster_size, 0);
    if (r < 0) { free(cl); return r; }
    uint64_t bfo = be64toh(h.backing_file_offset);
    uint32_t bfs = be32toh(h.backing_file_size);
    uint64_t ext_end = bfo ? bfo : s->cluster_size;
    /* as QEMU: the name within the first cluster, at most 1023 bytes (it
     * does not check that the name stays clear of the header) */
    if (bfo && (bfo > s->cluster_size || bfs > QCOW2_MAX_BACKING_NAME ||
                bfo + bfs > s->cluster_size)) {
        free(cl);
        return pms_err(EINVAL, "backing file name (offset %llu, %u bytes) is invalid",
                       (unsigned long long)bfo, bfs);
    }
    if (s->version >= 3 || s->header_length < ext_end) {
        r = read_extensions(bs, cl, s->cluster_size, s->header_length, ext_end);
        if (r < 0) { free(cl); return r; }
    }
    if (bfo && bfs) {                  /* (an empty name: no backing file) */
        s->backing_file = strndup((const char *)cl + bfo, bfs);
        if (!s->backing_file || strlen(s->backing_file) != bfs) {
            free(cl);
            return pms_err(EINVAL, "backing file name contains a NUL byte");
        }
    }
    free(cl);

    /* L1 */
    s->l1_size = be32toh(h.l1_size);
    s->l1_offset = be64toh(h.l1_table_offset);
    uint64_t l2_coverage_bits = s->cluster_bits + s->l2_bits;
    uint64_t need_l1 = (s->size + (1ull << l2_coverage_bits) - 1) >> l2_coverage_bits;
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES)
        return pms_err(EFBIG, "active L1 table too large (%u entries)", s->l1_size);
    if (s->l1_size < need_l1)
        return pms_err(EINVAL, "L1 table (%u entries) is too small for the image size",
                       s->l1_size);
    /* In check mode, as QEMU's check: only the alignment; a table outside
     * the file reads as zeroes and the check reports what that breaks. */
    if (s->l1_size && (qc_off_in_cluster(s, s->l1_offset) ||
                       (!ck && (s->l1_offset + (uint64_t)s->l1_size * 8 > (uint64_t)flen ||
                                s->l1_offset < s->cluster_size))))
        return pms_err(EINVAL, "active L1 table offset %llu is invalid",
                       (unsigned long long)s->l1_offset);
    s->reftable_offset = be64toh(h.refcount_table_offset);
    s->reftable_clusters = be32toh(h.refcount_table_clusters);
    /* (no refcount table at all: only a check may open it, to rebuild one,
     * as QEMU's does) */
    if ((s->reftable_clusters == 0 && !ck) || qc_off_in_cluster(s, s->reftable_offset) ||
        ((uint64_t)s->reftable_clusters << s->cluster_bits) > QCOW2_MAX_REFTABLE_BYTES ||
        (!ck && (s->reftable_offset < s->cluster_size || s->reftable_offset >= (uint64_t)flen)))
        return pms_err(EINVAL, "refcount table (offset %llu, %u clusters) is invalid",
                       (unsigned long long)s->reftable_offset, s->reftable_clusters);
    if (!ck && ranges_overlap(s->l1_offset, (uint64_t)s->l1_size * 8, s->reftable_offset,
                              (uint64_t)s->reftable_clusters << s->cluster_bits))
        return pms_err(EINVAL, "active L1 table overlaps the refcount table");
    uint32_t nsnap = be32toh(h.nb_snapshots);
    s->snapshots_offset = be64toh(h.snapshots_offset);
    if (nsnap > QCOW2_MAX_SNAPSHOTS)
        return pms_err(EINVAL, "too many snapshots (%u)", nsnap);
    /* as QEMU's table validation: the offset is cluster aligned even when
     * the table is empty */
    if (qc_off_in_cluster(s, s->snapshots_offset) ||
        (nsnap && (s->snapshots_offset & 7 ||
                  (!ck && (s->snapshots_offset < s->cluster_size ||
                           s->snapshots_offset >= (uint64_t)flen)))))
        return pms_err(EINVAL, "snapshot table offset %llu is invalid",
                       (unsigned long long)s->snapshots_offset);
    s->nb_snaps = (int)nsnap;

    s->l1 = calloc(s->l1_size ? s->l1_size : 1, 8);
    if (!s->l1) return pms_err(ENOMEM, "out of memory");
    r = bdev_file_pread(bs->file, s->l1, (uint64_t)s->l1_size * 8, s->l1_offset);
    if (r < 0) return r;
    for (uint32_t i = 0; i < s->l1_size; i++) {
        s->l1[i] = be64toh(s->l1[i]);
        uint64_t l2 = s->l1[i] & L1E_OFFSET_MASK;
        if (l2 && !ck && (qc_off_in_cluster(s, l2) || l2 >= (uint64_t)flen || l2 < s->cluster_size))
            return pms_err(EINVAL, "L1 entry %u points to an invalid L2 table offset %llu",
                           i, (unsigned long long)l2);
    }
    r = qcow2_read_snapshots(bs);
    if (r < 0) return r;
    r = qcow2_refcount_init(bs);
    if (r < 0) return r;
    for (uint32_t i = 0; i < s->l1_size && !ck; i++) {
        uint64_t l2 = s->l1[i] & L1E_OFFSET_MASK;
        if (l2 && (r = qcow2_check_host_range(bs, l2, s->cluster_size, "L2 table")) < 0)
            return r;
    }
    /* caches */
    /* Default L2 cache: enough tables to cover the whole image, between
     * 1 MiB and 32 MiB (QEMU's default on Linux); buffers are allocated as
     * tables are first used, so a sparse working set costs little. */
    uint64_t l2c = o->l2_cache_size;
    if (!l2c) {
        uint64_t cov = s->cluster_bits + s->l2_bits;
        uint64_t tables = (s->size >> cov) + 1;
        l2c = tables > ((32ull << 20) >> s->cluster_bits) ? 32ull << 20 : tables << s->cluster_bits;
        if (l2c < (1u << 20)) l2c = 1u << 20;
    }
    uint64_t rbc = o->refcount_cache_size ? o->refcount_cache_size : (256u << 10);
    int nl2 = (int)(l2c >> s->cluster_bits), nrb = (int)(rbc >> s->cluster_bits);
    if (nl2 > 4096) nl2 = 4096;
    if (nrb > 1024) nrb = 1024;
    r = qcow2_cache_init(&s->l2_cache, nl2 < 16 ? 16 : nl2, s->cluster_size, false);
    if (r < 0) return r;
    r = qcow2_cache_init(&s->rb_cache, nrb < 8 ? 8 : nrb, s->cluster_size, true);
    if (r < 0) return r;
    s->l2_cache.wgen = &bs->file->wgen;          /* for the checkpoint hooks */
    s->l2_cache.dep_epoch = &s->rb_cache.epoch;
    s->cbuf = malloc(s->cluster_size);
    s->zbuf = malloc(2 * s->cluster_size);
    if (!s->cbuf || !s->zbuf) return pms_err(ENOMEM, "out of memory");
    s->free_cluster_index = 0;
    s->writable = !bs->readonly;
    s->inject_l2_update = o->inject_l2_update > 0 ? o->inject_l2_update : 0;
    s->use_lazy = s->version >= 3 && (o->lazy_refcounts > 0 ||
                                      (o->lazy_refcounts == 0 &&
                                       (s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS)));
    if (s->backing_file && !o->no_backing) {
        r = open_backing(bs, o);
        if (r < 0) return r;
    }
    if (s->writable && (s->incompat & QCOW2_INCOMPAT_DIRTY) && !ck) {
        /* Lazy refcounts were left unclean: rebuild them, as QEMU does. */
        struct pms_check_result res;
        memset(&res, 0, sizeof res);
        res.size = sizeof res;
        r = qcow2_check(bs, PMS_CHECK_REPAIR_ALL, &res, o->repair_msg, o->repair_opaque);
        if (r < 0) return r;
        if (s->incompat & QCOW2_INCOMPAT_DIRTY)     /* the check clears it when done */
            return pms_err(EIO, "image has the dirty bit set and its refcounts could not be "
                           "repaired");
    }
    if (s->writable && (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) && mark_bitmaps_in_use(bs) == 0)
        s->autoclear_keep = QCOW2_AUTOCLEAR_BITMAPS;
    if (s->writable && s->version >= 3 && (s->autoclear & ~(QCOW2_AUTOCLEAR_KNOWN | s->autoclear_keep))) {
        /* we do not maintain bitmaps: clearing the bit tells readers they are stale */
        s->autoclear &= QCOW2_AUTOCLEAR_KNOWN | s->autoclear_keep;
        r = qcow2_update_header(bs);
        if (r < 0) return r;
    }
    s->opened = true;
    return 0;
}

static int pending_drain(struct bdev *bs);
static int qcow2_pwrite_zeroes(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags);
static int qcow2_block_status(struct bdev *bs, uint64_t off, uint64_t len, struct pms_extent *e);
static int qcow2_flush(struct bdev *bs);

/* Lazy refcounts (compat bit 0, or the open option) as QEMU has them: while
 * a writer may have refcount updates outstanding the image carries the
 * incompatible dirty bit, so a crash leaves an image every implementation
 * repairs (refcounts rebuilt) on its next writable open.  The bit is
 * written and flushed before the session's first refcount change
 * (qcow2_lazy_mark_dirty, from the refcount code); from then on flushes do
 * not write refcount blocks (qcow2_defer_refcounts): a new L2 table's and a
 * new refcount block's refcounts still are, as QEMU writes them, data
 * clusters' wait for eviction or the clean close, which writes them and
 * clears the bit.  Entered under the node lock. */
int qcow2_lazy_mark_dirty(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    if (!s->use_lazy || (s->incompat & QCOW2_INCOMPAT_DIRTY) ||
        s->version < 3 || !s->writable)
        return 0;
    uint64_t be = htobe64(s->incompat | QCOW2_INCOMPAT_DIRTY);
    int r = bdev_file_pwrite(bs->file, &be, 8, 72);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) return r;
    s->incompat |= QCOW2_INCOMPAT_DIRTY;
    s->lazy_dirty = true;
    return 0;
}

static int lazy_mark_clean(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_cache_writeback(bs, &s->rb_cache);   /* the refcounts first */
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) return r;
    uint64_t be = htobe64(s->incompat & ~QCOW2_INCOMPAT_DIRTY);
    r = bdev_file_pwrite(bs->file, &be, 8, 72);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) return r;
    s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
    s->lazy_dirty = false;
    return 0;
}

static void qcow2_close(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    if (s->writable && s->l1) {
        int r = qcow2_flush_metadata(bs);
        if (r == 0 && s->npending) {
            r = pending_drain(bs);
            if (r == 0)
                r = qcow2_flush_metadata(bs);
        }
        /* a failed flush keeps the dirty bit: the next open repairs */
        if (r == 0 && s->lazy_dirty)
            lazy_mark_clean(bs);
    }
    free_state(s);
}

static int open_wrap(struct bdev *bs, const char *path, const struct pms_open_opts *o)
{
    int r = qcow2_open(bs, path, o);
    if (r < 0) {
        struct qcow2_state *s = QS(bs);
        if (bs->backing) { bdev_close(bs->backing); bs->backing = NULL; }
        free_state(s);
    }
    return r;
}

/* ------------------------------------------------------------------------ */
/* mapping                                                                  */

struct mapping {
    enum qcow2_sctype type;
    uint64_t host;          /* host offset of the byte at off (SC_DATA), or the
                               compressed descriptor's start (SC_COMPRESSED) */
    uint64_t csize;         /* SC_COMPRESSED: compressed bytes */
    uint64_t bytes;         /* bytes from off with the same state (within cluster) */
    bool copied;            /* entry has COPIED (SC_DATA) */
    bool zero_alloc;
};

/* L2 table offset for guest offset off, 0 if none.  Validates the entry. */
static int l2_for(struct bdev *bs, uint64_t off, uint64_t *l2off, uint32_t *l1i)
{
    struct qcow2_state *s = QS(bs);
    uint64_t i = off >> (s->cluster_bits + s->l2_bits);
    *l1i = (uint32_t)i;
    if (i >= s->l1_size) { *l2off = 0; return 0; }
    *l2off = s->l1[i] & L1E_OFFSET_MASK;
    return 0;
}

/* The length of the protocol file, or any value >= need when it is known
 * to reach need bytes (no fstat on the I/O path; see flen_lb).  An error
 * reads as "long enough": the check it serves is skipped, as before. */
static uint64_t file_reaches(struct bdev *bs, uint64_t need)
{
    struct qcow2_state *s = QS(bs);
    if (need <= s->flen_lb)
        return s->flen_lb;
    int64_t fl = bdev_file_length(bs->file);
    if (fl < 0) {
        pms_err_clear();
        return UINT64_MAX;
    }
    s->flen_lb = (uint64_t)fl;
    return (uint64_t)fl;
}

/* Bytes from off (a cluster boundary) up to off + maxlen over which the
 * L2 table mapping off holds nothing but empty entries (all 8 or 16 bytes
 * zero: unallocated, no subcluster allocated or zero), within that table.
 * Block status walks a sparse layer extent by extent; asked one cluster at
 * a time, a walk of a 1 TiB layer with a page stored in every table made
 * 2^24 cache look-ups (2.7 s per external snapshot delete at scale). */
static uint64_t empty_run(struct bdev *bs, uint64_t off, uint64_t maxlen)
{
    struct qcow2_state *s = QS(bs);
    uint64_t l2off;
    uint32_t l1i;
    l2_for(bs, off, &l2off, &l1i);
    if (!l2off)
        return 0;
    const uint64_t w = s->l2_entry_size / 8;       /* 64-bit words per entry */
    uint64_t idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t want = (maxlen + s->cluster_size - 1) >> s->cluster_bits;
    uint64_t last = idx + want < s->l2_entries ? idx + want : s->l2_entries;
    /* the entries asked about, read in one go (one hole test, one read) */
    uint8_t *l2;
    if (qcow2_cache_get_part(bs, &s->l2_cache, l2off, idx * s->l2_entry_size,
                             (last - idx) * s->l2_entry_size, &l2) < 0) {
        pms_err_clear();
        return 0;                           /* the caller asks get_mapping, as before */
    }
    const uint64_t *p = (const uint64_t *)(void *)l2;   /* tables are page aligned */
    uint64_t k = idx * w, end = last * w;
    while (k < end && !p[k])
        k++;
    uint64_t n = (k / w - idx) << s->cluster_bits;      /* whole empty entries */
    return n < maxlen ? n : maxlen;
}

static int get_mapping(struct bdev *bs, uint64_t off, uint64_t maxlen, struct mapping *m)
{
    struct qcow2_state *s = QS(bs);
    memset(m, 0, sizeof *m);
    uint64_t in = qc_off_in_cluster(s, off);
    uint64_t left = s->cluster_size - in;
    if (left > maxlen) left = maxlen;
    uint64_t l2off;
    uint32_t l1i;
    l2_for(bs, off, &l2off, &l1i);
    if (!l2off) {
        m->type = SC_UNALLOCATED;
        m->bytes = left;
        return 0;
    }
    uint8_t *l2;
    uint64_t idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    int r = qcow2_cache_get_part(bs, &s->l2_cache, l2off, idx * s->l2_entry_size,
                                 s->l2_entry_size, &l2);
    if (r < 0) return r;
    uint64_t e = qcow2_l2_get(s, l2, idx);
    uint64_t hoff = e & L2E_OFFSET_MASK;
    switch (qcow2_entry_type(s, e)) {
    case QC_COMPRESSED: {
        /* the bitmap of a compressed cluster is unused: QEMU ignores it when
         * reading and writing (iotest 271), only check reports it */
        qcow2_compressed_range(s, e, &m->host, &m->csize);
        /* A range running past the end of the file is read as far as the
         * file goes, the rest as zeroes (QEMU's reads past the end): the
         * data decompresses when it is all there (iotest 214: a corrupted
         * size field), fails to decompress otherwise. */
        if (m->host < s->cluster_size)
            return qcow2_signal_corruption(bs, "compressed cluster at %llu is outside the file",
                                           (unsigned long long)m->host);
        m->type = SC_COMPRESSED;
        m->bytes = left;
        return 0;
    }
    case QC_ZERO_PLAIN:
    case QC_ZERO_ALLOC:
        if (hoff && (hoff >= file_reaches(bs, hoff + 1) || qc_off_in_cluster(s, hoff)))
            return qcow2_signal_corruption(bs, "zero cluster offset %llu is invalid",
                                           (unsigned long long)hoff);
        if (hoff && (r = qcow2_check_host_range(bs, hoff, s->cluster_size, "zero cluster")) < 0)
            return r;
        m->type = SC_ZERO;
        m->bytes = left;
        m->zero_alloc = hoff != 0;
        m->host = hoff ? hoff + in : 0;
        return 0;
    case QC_UNALLOCATED:
    case QC_NORMAL:
        break;
    }
    /* bit 0 (the zero flag) is reserved in v2; extended L2 entries do not
     * use it and QEMU ignores it there (iotest 271) */
    if (e & (s->version < 3 && !s->ext_l2 ? (L2E_STD_RESERVED_MASK | 1) : L2E_STD_RESERVED_MASK))
        return qcow2_signal_corruption(bs, "L2 entry %llu of table at %llu has reserved bits set",
                                       (unsigned long long)idx, (unsigned long long)l2off);
    if (hoff && (hoff >= file_reaches(bs, hoff + 1) || qc_off_in_cluster(s, hoff)))
        return qcow2_signal_corruption(bs, "data cluster offset %llu is invalid",
                                       (unsigned long long)hoff);
    if (hoff && (r = qcow2_check_host_range(bs, hoff, s->cluster_size, "data cluster")) < 0)
        return r;
    m->copied = (e & QCOW_OFLAG_COPIED) != 0;
    if (!s->ext_l2) {
        m->type = hoff ? SC_DATA : SC_UNALLOCATED;
        m->host = hoff ? hoff + in : 0;
        m->bytes = left;
        return 0;
    }
    uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
    uint32_t alloc = (uint32_t)bm, zero = (uint32_t)(bm >> 32);
    if (alloc & zero)
        return qcow2_signal_corruption(bs, "subcluster both allocated and zero (entry %llu)",
                                       (unsigned long long)idx);
    if (alloc && !hoff)
        return qcow2_signal_corruption(bs, "allocated subclusters without a host cluster");
    unsigned sc = (unsigned)(in >> s->sc_bits);
    int st = (alloc >> sc) & 1 ? 2 : ((zero >> sc) & 1 ? 1 : 0);
    unsigned end = sc + 1;
    while (end < 32) {
        int st2 = (alloc >> end) & 1 ? 2 : ((zero >> end) & 1 ? 1 : 0);
        if (st2 != st) break;
        end++;
    }
    uint64_t n = ((uint64_t)end << s->sc_bits) - in;
    m->bytes = n < left ? n : left;
    m->type = st == 2 ? SC_DATA : st == 1 ? SC_ZERO : SC_UNALLOCATED;
    m->host = hoff ? hoff + in : 0;
    m->zero_alloc = hoff != 0;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* reads                                                                    */

static int decompress(struct bdev *bs, const struct mapping *m, uint8_t *out)
{
    struct qcow2_state *s = QS(bs);
    uint64_t csize = m->csize;
    if (csize > 2 * s->cluster_size) csize = 2 * s->cluster_size;
    uint64_t flen = file_reaches(bs, m->host + csize);
    if (m->host + csize > flen)
        csize = flen > m->host ? flen - m->host : 0;
    int r = bdev_file_pread(bs->file, s->zbuf, csize, m->host);
    if (r < 0) return r;
    if (s->compression_type == QCOW2_COMPRESSION_ZLIB) {
        z_stream z;
        memset(&z, 0, sizeof z);
        if (inflateInit2(&z, -12) != Z_OK)
            return pms_err(EIO, "zlib initialisation failed");
        z.next_in = s->zbuf;
        z.avail_in = (uInt)csize;
        z.next_out = out;
        z.avail_out = (uInt)s->cluster_size;
        int zr = inflate(&z, Z_FINISH);
        uint64_t got = s->cluster_size - z.avail_out;
        inflateEnd(&z);
        if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR) || got != s->cluster_size)
            /* a read error, as QEMU's: the image is not marked corrupt */
            return pms_err(EIO, "image '%s': compressed cluster at %llu does not decompress",
                           bs->filename, (unsigned long long)m->host);
        return 0;
    }
    ZSTD_DCtx *dc = ZSTD_createDCtx();
    if (!dc) return pms_err(ENOMEM, "out of memory");
    ZSTD_inBuffer in = { s->zbuf, csize, 0 };
    ZSTD_outBuffer ob = { out, s->cluster_size, 0 };
    size_t zr = 0;
    while (ob.pos < ob.size) {
        zr = ZSTD_decompressStream(dc, &ob, &in);
        if (ZSTD_isError(zr)) break;
        if (in.pos == in.size) break;
        if (zr == 0) break;
    }
    ZSTD_freeDCtx(dc);
    if (ZSTD_isError(zr) || ob.pos != s->cluster_size)
        return pms_err(EIO, "image '%s': zstd-compressed cluster at %llu does not decompress",
                       bs->filename, (unsigned long long)m->host);
    return 0;
}

/* ---- chain map: reads through deep backing chains --------------------------
 *
 * A chain of external snapshots is one image per snapshot.  Reading an
 * unallocated range through it the plain way asks every layer in turn
 * (lock, L2 lookup, recurse): 100 layers cost 100 lookups per cluster.  The
 * chain map of a node X answers, per granule (X's cluster size) of X's
 * backing chain, the depth of the first layer that has any L2 entry there
 * (data, zero or compressed, in any of the granule's (sub)clusters), or that
 * the whole chain has none (zeroes).  A read then goes straight to that
 * layer, which reads its own entries the normal way (and goes further down
 * for what it does not have, through its own map).
 *
 * Valid because every node below X is read-only (backing nodes are opened
 * read-only and never written while attached), so their tables never
 * change; bdev_set_backing drops the map whenever X's chain is replaced.
 * Built lazily per region of CHAIN_MAP_REGION granules, under X's lock
 * (reads run under it), taking each layer's lock while scanning its L1/L2
 * (downward, as any read through the chain does).  A granule reaching past
 * a layer's end stops the walk there (that layer's read zero-fills), so the
 * answer is the same as the walk through every layer.
 */
#define CHAIN_MAP_REGION 4096u          /* granules per lazily built region */
#define CHAIN_MIN_DEPTH 3               /* shallower chains read layer by layer */
enum { CM_UNKNOWN = 0, CM_NONE = 0xffff };

struct chain_map {
    unsigned gbits;                     /* log2 granule bytes */
    uint64_t nregions;
    uint16_t **region;                  /* nregions pointers, NULL until built */
    int nlayers;
    struct bdev **layer;                /* layer[d - 1]: the node at depth d */
    bool bulk;                          /* whole regions at once (see chain_target) */
    uint64_t size;                      /* bytes covered: the node's size when built
                                           (a resize of the node leaves the layers, and
                                           so the answers, as they are) */
};

static void chain_map_free(void *p)
{
    struct chain_map *m = p;
    for (uint64_t i = 0; i < m->nregions; i++)
        if (m->region[i]) {
            free(m->region[i]);
            bdev_meta_charge(-(int64_t)(CHAIN_MAP_REGION * sizeof **m->region));
        }
    free(m->region);
    free(m->layer);
    free(m);
}

/* One layer's scan: does y have any L2 entry for guest bytes [a, b)?  The
 * last L2 table is kept between calls (the scan is sequential, and nothing
 * else uses y's cache meanwhile: y->lock is held). */
struct layer_scan {
    struct bdev *y;
    uint64_t l2off;
    uint8_t *l2;
};

static int layer_has_entry(struct layer_scan *ls, uint64_t a, uint64_t b, bool *has)
{
    struct qcow2_state *s = QS(ls->y);
    *has = false;
    for (uint64_t c = a >> s->cluster_bits; c <= (b - 1) >> s->cluster_bits; c++) {
        uint64_t l1i = c >> s->l2_bits;
        if (l1i >= s->l1_size) return 0;
        uint64_t l2off = s->l1[l1i] & L1E_OFFSET_MASK;
        if (!l2off) {
            c |= s->l2_entries - 1;            /* skip the rest of this table */
            continue;
        }
        uint64_t idx = c & (s->l2_entries - 1);
        int r = qcow2_cache_get_part(ls->y, &s->l2_cache, l2off, idx * s->l2_entry_size,
                                     s->l2_entry_size, &ls->l2);
        if (r < 0) return r;
        ls->l2off = l2off;
        if (qcow2_l2_get(s, ls->l2, idx) || qcow2_l2_get_bitmap(s, ls->l2, idx)) {
            *has = true;
            return 0;
        }
    }
    return 0;
}

/* The answer for one granule, walking the layers (a layer's own map: it
 * is asked only about the granules its partial clusters need). */
static int chain_map_one(struct bdev *bs, struct chain_map *m, uint64_t g, uint16_t *out)
{
    uint64_t a = g << m->gbits, b = a + (1ull << m->gbits);
    if (b > m->size) b = m->size;
    for (int d = 1; d <= m->nlayers; d++) {
        struct bdev *y = m->layer[d - 1];
        bool stop = y->drv != &pms_drv_qcow2 || b > y->size;
        if (!stop) {
            struct layer_scan ls = { y, 0, NULL };
            pthread_mutex_lock(&y->lock);
            int r = layer_has_entry(&ls, a, b, &stop);
            pthread_mutex_unlock(&y->lock);
            if (r < 0) return r;
        }
        if (stop) {
            *out = (uint16_t)d;
            return 0;
        }
    }
    *out = CM_NONE;
    return 0;
}

static int chain_map_build(struct bdev *bs, struct chain_map *m, uint64_t ri)
{
    uint16_t *reg = calloc(CHAIN_MAP_REGION, sizeof *reg);
    if (!reg) return pms_err(ENOMEM, "out of memory");
    if (!m->bulk) {                     /* granules filled one by one */
        m->region[ri] = reg;
        bdev_meta_charge(CHAIN_MAP_REGION * sizeof *reg);
        return 0;
    }
    uint64_t g0 = ri * CHAIN_MAP_REGION, gsz = 1ull << m->gbits;
    uint64_t ng = CHAIN_MAP_REGION, left;
    if ((g0 + ng) << m->gbits > m->size)
        ng = ((m->size + gsz - 1) >> m->gbits) - g0;
    left = ng;
    int r = 0;
    for (int d = 1; d <= m->nlayers && left && r == 0; d++) {
        struct bdev *y = m->layer[d - 1];
        bool qcow2 = y->drv == &pms_drv_qcow2;
        struct layer_scan ls = { y, 0, NULL };
        if (qcow2) pthread_mutex_lock(&y->lock);
        for (uint64_t i = 0; i < ng && r == 0; i++) {
            if (reg[i] != CM_UNKNOWN) continue;
            uint64_t a = (g0 + i) << m->gbits, b = a + gsz;
            if (b > m->size) b = m->size;
            bool stop = !qcow2 || b > y->size;
            if (!stop) r = layer_has_entry(&ls, a, b, &stop);
            if (stop) {
                reg[i] = (uint16_t)d;
                left--;
            }
        }
        if (qcow2) pthread_mutex_unlock(&y->lock);
    }
    if (r < 0) { free(reg); return r; }
    for (uint64_t i = 0; i < ng; i++)
        if (reg[i] == CM_UNKNOWN) reg[i] = CM_NONE;
    m->region[ri] = reg;
    bdev_meta_charge(CHAIN_MAP_REGION * sizeof *reg);
    return 0;
}

/* The chain map of bs, built on first use; NULL when the chain is too short
 * to need one (or allocation failed: the plain walk is always correct). */
static struct chain_map *chain_map_get(struct bdev *bs)
{
    if (bs->chain_map) return bs->chain_map;
    int depth = 0;
    for (struct bdev *y = bs->backing; y; y = y->backing) depth++;
    if (depth < CHAIN_MIN_DEPTH || depth >= CM_NONE) return NULL;
    struct chain_map *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->gbits = QS(bs)->cluster_bits;
    m->size = bs->size;
    uint64_t ng = (m->size + (1ull << m->gbits) - 1) >> m->gbits;
    m->nregions = (ng + CHAIN_MAP_REGION - 1) / CHAIN_MAP_REGION;
    m->region = calloc(m->nregions ? m->nregions : 1, sizeof *m->region);
    m->layer = calloc((size_t)depth, sizeof *m->layer);
    if (!m->region || !m->layer) { free(m->region); free(m->layer); free(m); return NULL; }
    m->nlayers = depth;
    /* The top node reads everything below it once (first touch): whole
     * regions at once, layer by layer, are cheapest.  A read-only layer is
     * only asked about the rest of its partly allocated clusters: a region
     * scan of all the layers below for each would cost layers^2. */
    m->bulk = !bs->readonly;
    int d = 0;
    for (struct bdev *y = bs->backing; y; y = y->backing) m->layer[d++] = y;
    bs->chain_map = m;
    bs->chain_map_free = chain_map_free;
    return m;
}

/* Read [off, off+len) from node y, zeroes past its end. */
static int read_layer(struct bdev *y, uint8_t *buf, uint64_t len, uint64_t off)
{
    uint64_t ysize = y->size;
    uint64_t n = off >= ysize ? 0 : (len < ysize - off ? len : ysize - off);
    if (n) {
        int r = bdev_pread(y, buf, n, off);
        if (r < 0) return r;
    }
    if (n < len) memset(buf + n, 0, len - n);
    return 0;
}

/* Where bytes [off, off+len) that bs does not allocate come from: *y the
 * layer to read (NULL: nothing in the chain, zeroes), *d its depth below bs
 * (1 = bs->backing; with *y NULL the depth of the last layer), *n how many
 * bytes from off share the answer (1..len).  Without a map: the backing
 * node for all of it. */
static int chain_target(struct bdev *bs, uint64_t off, uint64_t len, struct bdev **y, int *d,
                        uint64_t *n)
{
    struct chain_map *m = off + len <= bs->size ? chain_map_get(bs) : NULL;
    if (m && off + len > m->size) m = NULL;   /* grown since: the plain walk */
    if (!m) {
        *y = bs->backing;
        *d = 1;
        *n = len;
        return 0;
    }
    uint64_t g = off >> m->gbits, ri = g / CHAIN_MAP_REGION;
    if (!m->region[ri]) {
        int r = chain_map_build(bs, m, ri);
        if (r < 0) return r;
    }
    uint16_t v = m->region[ri][g % CHAIN_MAP_REGION];
    if (v == CM_UNKNOWN) {
        int r = chain_map_one(bs, m, g, &v);
        if (r < 0) return r;
        m->region[ri][g % CHAIN_MAP_REGION] = v;
    }
    uint64_t end = (g + 1) << m->gbits;
    while (end < off + len) {           /* the following granules with the same answer */
        uint64_t g2 = end >> m->gbits, r2 = g2 / CHAIN_MAP_REGION;
        if (!m->region[r2] || m->region[r2][g2 % CHAIN_MAP_REGION] != v) break;
        end += 1ull << m->gbits;
    }
    *n = (end < off + len ? end : off + len) - off;
    *d = v == CM_NONE ? m->nlayers : v;
    *y = v == CM_NONE ? NULL : m->layer[v - 1];
    return 0;
}

static int read_backing(struct bdev *bs, uint8_t *buf, uint64_t len, uint64_t off)
{
    if (!bs->backing) {
        memset(buf, 0, len);
        return 0;
    }
    while (len) {
        struct bdev *y;
        int d;
        uint64_t n;
        int r = chain_target(bs, off, len, &y, &d, &n);
        if (r == 0) {
            if (y) r = read_layer(y, buf, n, off);
            else memset(buf, 0, n);
        }
        if (r < 0) return r;
        buf += n; off += n; len -= n;
    }
    return 0;
}

/* Read [off, off+len) (len inside one cluster or beyond) into buf. */
static int do_read(struct bdev *bs, uint8_t *buf, uint64_t len, uint64_t off)
{
    struct qcow2_state *s = QS(bs);
    while (len) {
        struct mapping m;
        int r = get_mapping(bs, off, len, &m);
        if (r < 0) return r;
        uint64_t n = m.bytes;
        switch (m.type) {
        case SC_UNALLOCATED:
            /* one backing read for a run of unallocated clusters */
            while (n < len) {
                struct mapping m2;
                r = get_mapping(bs, off + n, len - n, &m2);
                if (r < 0) return r;
                if (m2.type != SC_UNALLOCATED) break;
                n += m2.bytes;
            }
            r = read_backing(bs, buf, n, off);
            break;
        case SC_ZERO:
            memset(buf, 0, n);
            break;
        case SC_DATA:
            r = bdev_file_pread(bs->file, buf, n, m.host);
            break;
        case SC_COMPRESSED:
            r = decompress(bs, &m, s->cbuf);
            if (r == 0) memcpy(buf, s->cbuf + qc_off_in_cluster(s, off), n);
            break;
        }
        if (r < 0) return r;
        buf += n; off += n; len -= n;
    }
    return 0;
}

static int qcow2_pread(struct bdev *bs, void *buf, uint64_t len, uint64_t off)
{
    return do_read(bs, buf, len, off);
}

/* ------------------------------------------------------------------------ */
/* pending frees                                                            */

static int pending_add(struct bdev *bs, uint64_t off, uint64_t len)
{
    struct qcow2_state *s = QS(bs);
    if (s->npending == s->cappending) {
        size_t nc = s->cappending ? s->cappending * 2 : 64;
        struct qcow2_range *np = realloc(s->pending, nc * sizeof *np);
        if (!np) return pms_err(ENOMEM, "out of memory");
        s->pending = np;
        s->cappending = nc;
    }
    s->pending[s->npending++] = (struct qcow2_range){ off, len };
    return 0;
}

/* Queue the release of a whole cluster's reference; note whether it frees
 * the cluster (see pending_frees).  A failed refcount lookup counts as
 * freeing: it only costs a flush. */
static int pending_add_cluster(struct bdev *bs, uint64_t off)
{
    struct qcow2_state *s = QS(bs);
    uint64_t rc = 0;
    if (!s->pending_frees && (qcow2_get_refcount(bs, off >> s->cluster_bits, &rc) < 0 || rc <= 1))
        s->pending_frees = true;
    return pending_add(bs, off, s->cluster_size);
}

static int pending_drain(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    for (size_t i = 0; i < s->npending; i++) {
        int r = qcow2_free_clusters(bs, s->pending[i].off, s->pending[i].len);
        if (r < 0) {
            memmove(s->pending, s->pending + i, (s->npending - i) * sizeof *s->pending);
            s->npending -= i;
            return r;
        }
    }
    s->npending = 0;
    s->pending_frees = false;
    return 0;
}

/* Release the host reference held by entry e (after the L2 change is durable). */
static int release_entry(struct bdev *bs, uint64_t e)
{
    struct qcow2_state *s = QS(bs);
    switch (qcow2_entry_type(s, e)) {
    case QC_COMPRESSED: {
        uint64_t coff, csize;
        qcow2_compressed_range(s, e, &coff, &csize);
        s->pending_frees = true;
        return pending_add(bs, coff, csize);
    }
    case QC_NORMAL:
    case QC_ZERO_ALLOC:
        return pending_add_cluster(bs, e & L2E_OFFSET_MASK);
    default:
        return 0;
    }
}

int qcow2_drain_pending(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    if (!s->npending) return 0;
    int r = qcow2_flush_metadata(bs);
    if (r == 0) r = pending_drain(bs);
    return r;
}

/* ------------------------------------------------------------------------ */
/* writes                                                                   */

/* Get a writable L2 table for guest offset off: allocates or copies it. */
static int get_l2_writable(struct bdev *bs, uint64_t off, uint64_t *l2offp)
{
    struct qcow2_state *s = QS(bs);
    uint64_t l1i = off >> (s->cluster_bits + s->l2_bits);
    int r;
    if (l1i >= s->l1_size) {
        r = qcow2_grow_l1(bs, (uint32_t)l1i + 1);
        if (r < 0) return r;
    }
    uint64_t l1e = s->l1[l1i];
    uint64_t old = l1e & L1E_OFFSET_MASK;
    if (old && (l1e & QCOW_OFLAG_COPIED)) {
        *l2offp = old;
        return 0;
    }
    /* need a new table: fresh, or a copy of a shared one */
    uint8_t *copy = NULL;
    if (old) {
        uint8_t *t;
        r = qcow2_cache_get(bs, &s->l2_cache, old, &t);
        if (r < 0) return r;
        copy = malloc(s->cluster_size);
        if (!copy) return pms_err(ENOMEM, "out of memory");
        memcpy(copy, t, s->cluster_size);
        /* entries stay as they are: the data clusters are still shared, so
         * their COPIED flags are already clear */
    }
    int64_t noff = qcow2_alloc_l2(bs);
    if (noff < 0) { free(copy); return (int)noff; }
    uint8_t *t;
    /* Where the new table lies past the end of the file, the file reads
     * zeroes there: a fresh table then needs only its last slice written
     * (the file then covers the whole table) and the slices its entries
     * change; a table anywhere else (a reused cluster) is written whole. */
    int64_t flen = copy ? 0 : bdev_file_length(bs->file);
    if (flen < 0) pms_err_clear();
    /* The cache writes the table after the write that needs it returned:
     * its blocks must exist now (a table past the end of the file, or in a
     * discarded cluster, is a hole), or a full disk fails that later write
     * and loses the acknowledged one.  A reservation that fails fails this
     * write, with nothing linked. */
    r = bdev_file_reserve(bs->file, (uint64_t)noff, s->cluster_size);
    /* the same for the L1 table, whose entry the next metadata flush
     * writes (an image's L1 table may be a hole: qemu-img and our create
     * leave a zero table unwritten); once per table */
    if (r == 0 && !s->l1_reserved) {
        r = bdev_file_reserve(bs->file, s->l1_offset,
                              qc_size_to_clusters(s, (uint64_t)s->l1_size * 8) * s->cluster_size);
        s->l1_reserved = r == 0;
    }
    if (r < 0) {
        free(copy);
        (void)qcow2_free_clusters(bs, (uint64_t)noff, s->cluster_size);   /* else a leak */
        return r;
    }
    r = qcow2_cache_get_empty(bs, &s->l2_cache, (uint64_t)noff, &t);
    if (r < 0) { free(copy); return r; }
    if (copy) memcpy(t, copy, s->cluster_size);
    free(copy);
    if (flen > 0 && (uint64_t)noff >= (uint64_t)flen)
        qcow2_cache_mark_dirty_range(&s->l2_cache, t, s->cluster_size - s->l2_entry_size,
                                     s->l2_entry_size);
    else
        qcow2_cache_mark_dirty(&s->l2_cache, t);
    /* The on-disk L1 entry is written by the next metadata flush, after the
     * refcount and the new table are durable (qcow2_flush_metadata); until
     * then the in-memory L1 serves lookups. */
    s->l1[l1i] = (uint64_t)noff | QCOW_OFLAG_COPIED;
    qcow2_l1_mark_dirty(s, (uint32_t)l1i);
    r = 0;
    if (old) r = pending_add_cluster(bs, old);
    *l2offp = (uint64_t)noff;
    return r;
}

/* The writable L2 table for guest offset off and the entry in it. */
static int writable_entry(struct bdev *bs, uint64_t off, uint64_t *l2off, uint8_t **l2,
                          uint64_t *idx, uint64_t *e)
{
    struct qcow2_state *s = QS(bs);
    int r = get_l2_writable(bs, off, l2off);
    *idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    if (r == 0) r = qcow2_cache_get_part(bs, &s->l2_cache, *l2off, *idx * s->l2_entry_size,
                                         s->l2_entry_size, l2);
    if (r < 0) return r;
    *e = qcow2_l2_get(s, *l2, *idx);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the write engine                                                         */
/*
 * Every data write (qcow2_pwrite, write_cluster, qcow2_pwrite_batch) goes
 * through write_batch: sorted, non-overlapping runs are cut into per-cluster
 * pieces and handled a chunk of clusters at a time in four phases:
 *   A. plan: validate each cluster's entry, make its L2 table writable
 *      (allocating or copying it) and decide: written in place (NORMAL with
 *      COPIED, or an owned zero/partly allocated cluster completed in place),
 *      or a new host cluster ("fresh": unallocated, zero, compressed,
 *      shared).  With extended L2 the subclusters written are chosen as
 *      QEMU's calculate_l2_meta does: a fresh cluster replacing a host
 *      cluster copies from its first to its last allocated subcluster, a
 *      fresh one over nothing only the touched subclusters, an owned one
 *      completes the touched subclusters that are not allocated yet; the
 *      others stay unallocated (read from below) or zero.
 *   B. allocate all fresh clusters of the chunk at once, contiguous;
 *   C/D. build each written subcluster range from the run bytes, the
 *      caller's fill callback for the bytes no run covers (falling back to a
 *      read of the old contents: old cluster, backing file or zeroes), and
 *      write them through a combiner that merges host-contiguous extents
 *      into few large writes; zero ranges past the end of the file are left
 *      as holes, zero ranges inside it are punched (as the old path did);
 *   E. only then update the L2 entries (dirty in the cache: the cache
 *      writes refcounts and flushes data before any L2 table reaches the
 *      disk) and queue the replaced clusters' references for release
 *      (pending frees, applied after the next flush).
 * A crash at any point leaks at most the chunk's new clusters.
 * Threads: under bs->lock like every driver entry; fill is called with it
 * held.
 */

#define RUN_MAX_BYTES (1u << 20)     /* largest single write from a caller's buffer */
#define BOUNCE_MAX (1u << 20)        /* bounce buffer for built clusters: as large as the
                                        largest single write (RUN_MAX_BYTES); it stays in
                                        the CPU cache between the fill copy and the write */
#define DIRECT_MIN (64u << 10)       /* pieces at least this long are written from the
                                        caller's buffer instead of being copied */
#define PUNCH_MIN 4096u              /* zero ranges inside the file shorter than one
                                        file-system block are written, longer ones punched */
#define FILL_GRAIN 4096u             /* fill is retried page by page when it cannot
                                        supply a whole gap (partly resident memory) */
#define CHUNK_MAX_JOBS 4096u         /* clusters planned per chunk */
#define CHUNK_MAX_FRESH (256ull << 20) /* new cluster bytes per chunk (bounds a crash's leak) */
#define CHUNK_L2_SHARE 4u            /* a chunk touches at most 1/4 of the L2 cache's tables:
                                        its tables stay cached from planning to linking
                                        (4 KiB clusters, 1 GiB with a snapshot: 1401 -> 772
                                        metadata reads for 2,531 pages) */

struct wpiece {
    uint64_t in, len;            /* bytes [in, in+len) of the cluster */
    const uint8_t *src;          /* NULL: zeroes */
};

struct wjob {
    uint64_t base;               /* guest offset of the cluster */
    uint64_t l2off, idx;         /* writable L2 table and entry index */
    uint64_t e, bm;              /* entry and bitmap before the write */
    uint64_t host;               /* host cluster written (existing or new) */
    uint64_t nbm;                /* bitmap after the write (extended L2) */
    uint32_t wmask;              /* subclusters written whole */
    uint32_t p0, np;             /* pieces */
    bool fresh;                  /* gets a new host cluster */
};

struct wctx {
    struct bdev *bs;
    bdev_fill_fn fill;
    void *opaque;
    uint64_t flen0;              /* file length, measured on first need after the
                                    chunk's allocation (UINT64_MAX: not yet): bytes
                                    at or past it read as zeroes until written */
    /* combiner: the pending extent [host, host+len), from direct or the bounce */
    uint64_t host, len;
    const uint8_t *direct;
    uint64_t wend;               /* end of the highest byte written */
};

static inline uint32_t sc_range(unsigned lo, unsigned hi)   /* bits lo..hi */
{
    uint64_t m = ((2ull << hi) - 1) & ~((1ull << lo) - 1);
    return (uint32_t)m;
}

static int comb_flush(struct wctx *w)
{
    struct qcow2_state *s = QS(w->bs);
    if (!w->len) return 0;
    int r = bdev_file_pwrite(w->bs->file, w->direct ? w->direct : s->bbuf, w->len, w->host);
    if (r == 0 && w->host + w->len > w->wend) w->wend = w->host + w->len;
    w->len = 0;
    w->direct = NULL;
    return r;
}

/* Room *p for len bytes at host offset host in the bounce buffer, merged
 * with the pending extent when contiguous. */
static int comb_bounce(struct wctx *w, uint64_t host, uint64_t len, uint8_t **p)
{
    struct qcow2_state *s = QS(w->bs);
    if (w->len && (w->direct || host != w->host + w->len || w->len + len > BOUNCE_MAX)) {
        int r = comb_flush(w);
        if (r < 0) return r;
    }
    if (w->len + len > s->bcap) {
        size_t nc = s->bcap ? s->bcap * 2 : s->cluster_size;
        while (nc < w->len + len) nc *= 2;
        if (nc > BOUNCE_MAX && w->len + len <= BOUNCE_MAX) nc = BOUNCE_MAX;
        uint8_t *nb = realloc(s->bbuf, nc);
        if (!nb) return pms_err(ENOMEM, "out of memory");
        s->bbuf = nb;
        s->bcap = nc;
    }
    if (!w->len) w->host = host;
    *p = s->bbuf + w->len;
    w->len += len;
    return 0;
}

static int comb_direct(struct wctx *w, uint64_t host, const uint8_t *src, uint64_t len)
{
    if (len < DIRECT_MIN) {
        uint8_t *p;
        int r = comb_bounce(w, host, len, &p);
        if (r == 0) memcpy(p, src, len);
        return r;
    }
    if (w->len && w->direct && host == w->host + w->len && src == w->direct + w->len &&
        w->len + len <= RUN_MAX_BYTES) {
        w->len += len;
        return 0;
    }
    int r = comb_flush(w);
    if (r < 0) return r;
    w->host = host;
    w->len = len;
    w->direct = src;
    return 0;
}

/* Host bytes [host, host+len) must read as zeroes. */
static int comb_zero(struct wctx *w, uint64_t host, uint64_t len)
{
    if (w->flen0 == UINT64_MAX) {
        int64_t fl = bdev_file_length(w->bs->file);       /* once per chunk */
        if (fl < 0) return (int)fl;
        w->flen0 = (uint64_t)fl;
        if (w->flen0 > QS(w->bs)->flen_lb) QS(w->bs)->flen_lb = w->flen0;
    }
    if (host + len > w->flen0) {            /* past the file end: a hole */
        if (host >= w->flen0) return 0;
        len = w->flen0 - host;
    }
    if (len < PUNCH_MIN) {
        uint8_t *p;
        int r = comb_bounce(w, host, len, &p);
        if (r == 0) memset(p, 0, len);
        return r;
    }
    int r = comb_flush(w);
    if (r == 0) r = bdev_file_zero(w->bs->file, len, host);
    return r;
}

static bool below_reads_zero(struct bdev *bs, uint64_t off)
{
    return !bs->backing || off >= bs->backing->size;
}

/* Do the guest bytes [g0, g1) of job j's cluster read as zeroes before the
 * write, without reading anything? */
static bool gap_is_zero(struct wctx *w, const struct wjob *j, uint64_t g0, uint64_t g1)
{
    struct bdev *bs = w->bs;
    struct qcow2_state *s = QS(bs);
    uint64_t clen = s->size - j->base < s->cluster_size ? s->size - j->base : s->cluster_size;
    if (g0 >= clen) return true;
    if (g1 > clen) g1 = clen;
    enum qcow2_ctype t = qcow2_entry_type(s, j->e);
    if (t == QC_COMPRESSED) return false;
    if (!s->ext_l2) {
        if (t == QC_ZERO_PLAIN || t == QC_ZERO_ALLOC) return true;
        return t == QC_UNALLOCATED && below_reads_zero(bs, j->base + g0);
    }
    uint32_t alloc = (uint32_t)j->bm, zero = (uint32_t)(j->bm >> 32);
    for (uint64_t sc = g0 >> s->sc_bits; sc <= (g1 - 1) >> s->sc_bits; sc++) {
        if ((alloc >> sc) & 1) return false;
        if ((zero >> sc) & 1) continue;
        uint64_t from = sc << s->sc_bits > g0 ? sc << s->sc_bits : g0;
        if (!below_reads_zero(bs, j->base + from)) return false;
    }
    return true;
}

/* Guest bytes [off, off+len) as they are before the write, into p: from the
 * caller (fill) when it has them, page by page when it has only some,
 * read from the image otherwise. */
static int fill_or_read(struct wctx *w, uint8_t *p, uint64_t len, uint64_t off)
{
    if (!w->fill)
        return do_read(w->bs, p, len, off);
    if (w->fill(w->opaque, p, len, off))
        return 0;
    if (len <= FILL_GRAIN)
        return do_read(w->bs, p, len, off);
    uint64_t end = off + len, miss = UINT64_MAX;
    for (uint64_t o = off; o < end; ) {
        uint64_t n = FILL_GRAIN - o % FILL_GRAIN;
        if (n > end - o) n = end - o;
        bool ok = w->fill(w->opaque, p + (o - off), n, o);
        if (ok && miss != UINT64_MAX) {
            int r = do_read(w->bs, p + (miss - off), o - miss, miss);
            if (r < 0) return r;
            miss = UINT64_MAX;
        } else if (!ok && miss == UINT64_MAX)
            miss = o;
        o += n;
    }
    if (miss != UINT64_MAX)
        return do_read(w->bs, p + (miss - off), end - miss, miss);
    return 0;
}

/* Write bytes [x, y) of job j's cluster whole: the pieces, and what the
 * cluster read before for the rest. */
static int emit_built(struct wctx *w, const struct wjob *j, const struct wpiece *pc,
                      uint64_t x, uint64_t y)
{
    struct qcow2_state *s = QS(w->bs);
    uint64_t clen = s->size - j->base < s->cluster_size ? s->size - j->base : s->cluster_size;
    const struct wpiece *pe = pc + j->np;
    while (pc < pe && pc->in + pc->len <= x) pc++;
    /* Without fill, a run that needs old bytes is read whole with one read
     * and the pieces laid over it (one read instead of one per gap). */
    if (!w->fill) {
        bool need_read = false;
        uint64_t pos = x;
        for (const struct wpiece *q = pc; pos < y; q++) {
            uint64_t nx = q < pe && q->in < y ? q->in : y;
            if (nx > pos && !gap_is_zero(w, j, pos, nx)) { need_read = true; break; }
            if (q >= pe || q->in >= y) break;
            pos = q->in + q->len;
        }
        if (need_read) {
            uint8_t *b;
            int r = comb_bounce(w, j->host + x, y - x, &b);
            if (r < 0) return r;
            uint64_t rl = clen > x ? (clen < y ? clen : y) - x : 0;
            if (rl) r = do_read(w->bs, b, rl, j->base + x);
            if (r < 0) return r;
            if (rl < y - x) memset(b + rl, 0, y - x - rl);
            for (const struct wpiece *q = pc; q < pe && q->in < y; q++) {
                uint64_t a = q->in > x ? q->in : x, e = q->in + q->len < y ? q->in + q->len : y;
                if (q->src) memcpy(b + (a - x), q->src + (a - q->in), e - a);
                else memset(b + (a - x), 0, e - a);
            }
            return 0;
        }
    }
    uint64_t pos = x;
    while (pos < y) {
        int r;
        if (pc < pe && pc->in <= pos) {
            uint64_t e = pc->in + pc->len < y ? pc->in + pc->len : y;
            if (pc->src)
                r = comb_direct(w, j->host + pos, pc->src + (pos - pc->in), e - pos);
            else
                r = comb_zero(w, j->host + pos, e - pos);
            if (r < 0) return r;
            pos = e;
            if (pos == pc->in + pc->len) pc++;
            continue;
        }
        uint64_t g1 = pc < pe && pc->in < y ? pc->in : y;
        if (gap_is_zero(w, j, pos, g1))
            r = comb_zero(w, j->host + pos, g1 - pos);
        else {
            uint64_t rl = (clen < g1 ? clen : g1) - pos;     /* pos < clen: not all zero */
            uint8_t *b;
            r = comb_bounce(w, j->host + pos, g1 - pos, &b);
            if (r == 0) r = fill_or_read(w, b, rl, j->base + pos);
            if (r == 0 && rl < g1 - pos) memset(b + rl, 0, g1 - pos - rl);
        }
        if (r < 0) return r;
        pos = g1;
    }
    return 0;
}

/* Choose the subclusters job j writes whole and its bitmap afterwards. */
static void plan_job(struct qcow2_state *s, struct wjob *j, const struct wpiece *pc)
{
    unsigned nsc = s->ext_l2 ? QCOW2_SUBCLUSTERS : 1;
    enum qcow2_ctype t = qcow2_entry_type(s, j->e);
    uint32_t alloc, zero;
    if (s->ext_l2) {
        alloc = (uint32_t)j->bm;
        zero = (uint32_t)(j->bm >> 32);
    } else {
        alloc = !j->fresh && t == QC_NORMAL;
        zero = 0;
    }
    bool owned = !j->fresh;
    uint32_t wmask = 0;
    for (uint32_t i = 0; i < j->np; i++) {
        unsigned sa = (unsigned)(pc[i].in >> s->sc_bits);
        unsigned sb = (unsigned)((pc[i].in + pc[i].len - 1) >> s->sc_bits);
        uint32_t rng = sc_range(sa, sb);
        if (!owned) {
            /* a new host cluster: like QEMU, copy whatever the old host
             * cluster has allocated around the write; the whole cluster
             * without subclusters or when compressed */
            unsigned lo = sa, hi = sb;
            if (!s->ext_l2 || t == QC_COMPRESSED) {
                lo = 0;
                hi = nsc - 1;
            } else if ((j->e & L2E_OFFSET_MASK) && alloc) {
                unsigned first = (unsigned)__builtin_ctz(alloc);
                unsigned last = 31u - (unsigned)__builtin_clz(alloc);
                if (first < lo) lo = first;
                if (last > hi) hi = last;
            }
            rng = sc_range(lo, hi);
            wmask |= rng;
            owned = true;
        } else
            wmask |= rng & ~alloc;       /* complete what is not allocated yet */
        alloc |= rng;
        zero &= ~rng;
    }
    j->wmask = wmask;
    j->nbm = ((uint64_t)zero << 32) | alloc;
}

/* Write job j's bytes: whole subcluster runs of wmask built, pieces in
 * allocated subclusters as they are. */
static int emit_job(struct wctx *w, const struct wjob *j, const struct wpiece *pc)
{
    struct qcow2_state *s = QS(w->bs);
    unsigned nsc = s->ext_l2 ? QCOW2_SUBCLUSTERS : 1;
    const struct wpiece *pe = pc + j->np;
    unsigned sc = 0;
    while (sc < nsc) {
        bool in = (j->wmask >> sc) & 1;
        unsigned e = sc + 1;
        while (e < nsc && (((j->wmask >> e) & 1) != 0) == in) e++;
        uint64_t x = (uint64_t)sc << s->sc_bits, y = (uint64_t)e << s->sc_bits;
        int r = 0;
        if (in)
            r = emit_built(w, j, pc, x, y);
        else {
            for (const struct wpiece *q = pc; r == 0 && q < pe; q++) {
                uint64_t a = q->in > x ? q->in : x, b = q->in + q->len < y ? q->in + q->len : y;
                if (a >= b) continue;
                r = q->src ? comb_direct(w, j->host + a, q->src + (a - q->in), b - a)
                           : comb_zero(w, j->host + a, b - a);
            }
        }
        if (r < 0) return r;
        sc = e;
    }
    return 0;
}

/* Phase A for the cluster at guest offset base: validate, make the L2 table
 * writable, classify. */
static int start_job(struct bdev *bs, struct wjob *j, uint64_t base)
{
    struct qcow2_state *s = QS(bs);
    struct mapping m;
    int r = get_mapping(bs, base, s->cluster_size, &m);     /* validates the entry */
    if (r < 0) return r;
    uint8_t *l2;
    r = writable_entry(bs, base, &j->l2off, &l2, &j->idx, &j->e);
    if (r < 0) return r;
    j->base = base;
    j->bm = qcow2_l2_get_bitmap(s, l2, j->idx);
    enum qcow2_ctype t = qcow2_entry_type(s, j->e);
    bool owned = (j->e & QCOW_OFLAG_COPIED) && (t == QC_NORMAL || t == QC_ZERO_ALLOC);
    j->fresh = !owned;
    j->host = owned ? j->e & L2E_OFFSET_MASK : 0;
    if (owned)
        return qcow2_check_overlap(bs, j->host, s->cluster_size, 0, "data cluster");
    return 0;
}

static int grow_array(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 64;
    while (nc < need) nc *= 2;
    void *np = realloc(*p, nc * elem);
    if (!np) return pms_err(ENOMEM, "out of memory");
    *p = np;
    *cap = nc;
    return 0;
}

/* Phase E: link the written clusters. */
static int commit_job(struct bdev *bs, const struct wjob *j)
{
    struct qcow2_state *s = QS(bs);
    uint64_t ne = j->host | QCOW_OFLAG_COPIED;
    bool entry_changes = j->fresh || qcow2_entry_type(s, j->e) == QC_ZERO_ALLOC;
    if (!entry_changes && (!s->ext_l2 || j->nbm == j->bm))
        return 0;                         /* written in place, nothing to link */
    uint8_t *l2;
    int r = qcow2_cache_get_part(bs, &s->l2_cache, j->l2off, j->idx * s->l2_entry_size,
                                 s->l2_entry_size, &l2);
    if (r < 0) return r;
    if (entry_changes) qcow2_l2_set(s, l2, j->idx, ne);
    qcow2_l2_set_bitmap(s, l2, j->idx, j->nbm);
    l2_entry_dirty(s, l2, j->idx);
    return j->fresh ? release_entry(bs, j->e) : 0;
}

static int write_batch(struct bdev *bs, const struct bdev_wvec *v, size_t n,
                       bdev_fill_fn fill, void *opaque)
{
    struct qcow2_state *s = QS(bs);
    uint64_t cs = s->cluster_size;
    size_t ri = 0;                       /* cursor: run ri, byte ro of it */
    uint64_t ro = 0;
    while (ri < n && v[ri].len == 0) ri++;
    while (ri < n) {
        /* A: plan a chunk of clusters */
        size_t nj = 0, np = 0;
        uint64_t nfresh = 0, ntables = 0, table = UINT64_MAX;
        uint64_t max_tables = (uint64_t)s->l2_cache.n / CHUNK_L2_SHARE;
        int r = 0;
        while (ri < n) {
            uint64_t off = v[ri].off + ro;
            uint64_t base = qc_align_down(s, off);
            struct wjob *j = nj ? &s->bjobs[nj - 1] : NULL;
            if (!j || j->base != base) {
                uint64_t t = base >> (s->cluster_bits + s->l2_bits);
                if (nj == CHUNK_MAX_JOBS || nfresh * cs >= CHUNK_MAX_FRESH ||
                    (t != table && ntables >= (max_tables ? max_tables : 1)))
                    break;
                if (t != table) {
                    table = t;
                    ntables++;
                }
                r = grow_array((void **)&s->bjobs, &s->bjobs_cap, nj + 1, sizeof *s->bjobs);
                if (r < 0) return r;
                j = &s->bjobs[nj++];
                r = start_job(bs, j, base);
                if (r < 0) return r;
                j->p0 = (uint32_t)np;
                j->np = 0;
                if (j->fresh) nfresh++;
            }
            uint64_t in = off - base;
            uint64_t len = v[ri].len - ro;
            if (len > cs - in) len = cs - in;
            r = grow_array((void **)&s->bpieces, &s->bpieces_cap, np + 1, sizeof *s->bpieces);
            if (r < 0) return r;
            s->bpieces[np++] = (struct wpiece){ in, len,
                v[ri].buf ? (const uint8_t *)v[ri].buf + ro : NULL };
            j->np++;
            ro += len;
            if (ro == v[ri].len) {
                ro = 0;
                do ri++; while (ri < n && v[ri].len == 0);
            }
        }
        for (size_t k = 0; k < nj; k++)
            plan_job(s, &s->bjobs[k], s->bpieces + s->bjobs[k].p0);
        /* B: allocate the new clusters together */
        struct wctx w = { .bs = bs, .fill = fill, .opaque = opaque, .flen0 = UINT64_MAX };
        uint64_t need_end = 0;
        if (nfresh) {
            int64_t t = qcow2_alloc_clusters(bs, nfresh);
            if (t < 0) return (int)t;
            uint64_t k2 = 0;
            for (size_t k = 0; k < nj; k++)
                if (s->bjobs[k].fresh)
                    s->bjobs[k].host = (uint64_t)t + (k2++ << s->cluster_bits);
            need_end = (uint64_t)t + nfresh * cs;
        }
        /* C/D: build and write */
        for (size_t k = 0; r == 0 && k < nj; k++)
            r = emit_job(&w, &s->bjobs[k], s->bpieces + s->bjobs[k].p0);
        if (r == 0) r = comb_flush(&w);
        if (r < 0) {
            /* nothing references the new clusters yet: give them back
             * (QEMU's qcow2_alloc_cluster_abort), else a failed write leaks */
            if (nfresh)
                qcow2_free_clusters(bs, need_end - nfresh * cs, nfresh * cs);
            return r;
        }
        if (w.wend > s->flen_lb) s->flen_lb = w.wend;
        /* the file covers every new cluster (as after a whole-cluster write);
         * never shrink it: metadata may lie past our clusters */
        if (need_end > s->flen_lb) {
            int64_t fl = bdev_file_length(bs->file);
            if (fl < 0) return (int)fl;
            if ((uint64_t)fl < need_end) r = bdev_file_truncate(bs->file, need_end);
            if (r < 0) return r;
            s->flen_lb = need_end;
        }
        /* E: link */
        for (size_t k = 0; r == 0 && k < nj; k++)
            r = commit_job(bs, &s->bjobs[k]);
        if (r < 0) return r;
    }
    return 0;
}

/* Write within one cluster: [off, off+len), buf NULL = zeroes. */
static int write_cluster(struct bdev *bs, const uint8_t *buf, uint64_t len, uint64_t off)
{
    struct bdev_wvec v = { off, len, buf };
    return write_batch(bs, &v, 1, NULL, NULL);
}

static int qcow2_pwrite(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    struct bdev_wvec v = { off, len, buf };
    return write_batch(bs, &v, 1, NULL, NULL);
}

static int qcow2_pwrite_batch(struct bdev *bs, const struct bdev_wvec *v, size_t n,
                              bdev_fill_fn fill, void *opaque)
{
    for (size_t i = 0; i < n; i++)
        if (!v[i].buf && v[i].len)
            return pms_err(EINVAL, "batch run %zu has no buffer", i);
    return write_batch(bs, v, n, fill, opaque);
}

/* ------------------------------------------------------------------------ */
/* compressed writes                                                        */

/* Compress one cluster (src, cluster_size bytes) into dst of cap bytes, as
 * QEMU's qcow2_co_compress does: zlib raw deflate (default level, window
 * 2^12, memLevel 9) or one zstd frame (default level).  Returns the
 * compressed length, 0 when it does not fit in cap, or -errno. */
static int64_t compress_cluster(struct qcow2_state *s, uint8_t *dst, uint64_t cap,
                                const uint8_t *src)
{
    if (s->compression_type == QCOW2_COMPRESSION_ZLIB) {
        z_stream z;
        memset(&z, 0, sizeof z);
        if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return pms_err(EIO, "zlib initialisation failed");
        z.next_in = (Bytef *)src;
        z.avail_in = (uInt)s->cluster_size;
        z.next_out = dst;
        z.avail_out = (uInt)cap;
        int zr = deflate(&z, Z_FINISH);
        int64_t n = (int64_t)(cap - z.avail_out);
        deflateEnd(&z);
        if (zr == Z_STREAM_END)
            return n;
        if (zr == Z_OK || zr == Z_BUF_ERROR)
            return 0;
        return pms_err(EIO, "zlib compression failed (%d)", zr);
    }
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    if (!cc) return pms_err(ENOMEM, "out of memory");
    ZSTD_outBuffer ob = { dst, cap, 0 };
    ZSTD_inBuffer in = { src, s->cluster_size, 0 };
    size_t zr = ZSTD_compressStream2(cc, &ob, &in, ZSTD_e_end);
    ZSTD_freeCCtx(cc);
    if (ZSTD_isError(zr)) {
        if (ZSTD_getErrorCode(zr) == ZSTD_error_dstSize_tooSmall)
            return 0;
        return pms_err(EIO, "zstd compression failed: %s", ZSTD_getErrorName(zr));
    }
    return zr ? 0 : (int64_t)ob.pos;     /* zr > 0: the frame did not fit */
}

/* Point the cluster at guest offset off (cluster aligned) at n compressed
 * bytes.  Same ordering as write_cluster: the bytes are allocated (refcount
 * +1 on every host cluster they touch) and written before the L2 entry
 * links them; the replaced entry's reference is released after the next
 * flush (pending frees). */
static int write_compressed_cluster(struct bdev *bs, const uint8_t *z, uint64_t n, uint64_t off)
{
    struct qcow2_state *s = QS(bs);
    struct mapping m;
    int r = get_mapping(bs, off, s->cluster_size, &m);   /* validate before writing */
    if (r < 0) return r;
    uint64_t l2off, idx, e;
    uint8_t *l2;
    r = writable_entry(bs, off, &l2off, &l2, &idx, &e);
    if (r < 0) return r;
    int64_t coff = qcow2_alloc_bytes(bs, n);
    if (coff < 0) return (int)coff;
    uint64_t c = (uint64_t)coff;
    uint64_t nsec = ((c + n - 1) >> 9) - (c >> 9);     /* sectors spanned - 1 */
    if ((c & ~s->coffset_mask) || nsec > s->csize_mask)
        return pms_err(EFBIG, "compressed cluster at %llu does not fit an L2 entry",
                       (unsigned long long)c);
    r = qcow2_check_overlap(bs, c & ~511ull, (c & 511) + n, 0, "compressed cluster");
    if (r == 0) r = bdev_file_pwrite(bs->file, z, n, c);
    if (r == 0) r = qcow2_cache_get_part(bs, &s->l2_cache, l2off, idx * s->l2_entry_size,
                                         s->l2_entry_size, &l2);
    if (r < 0) return r;
    /* compressed entries never carry COPIED; with extended L2 the bitmap is 0 */
    qcow2_l2_set(s, l2, idx, c | QCOW_OFLAG_COMPRESSED | (nsec << s->csize_shift));
    qcow2_l2_set_bitmap(s, l2, idx, 0);
    l2_entry_dirty(s, l2, idx);
    return release_entry(bs, e);
}

/* Parallel compression of a batch of clusters (QEMU too compresses in a
 * thread pool): worker t takes clusters t, t + n, ...  Workers only read
 * their inputs and fill their own outputs; the error message of a failed
 * cluster is made again by the caller's thread. */
struct cjob {
    struct qcow2_state *s;
    const uint8_t **in;          /* cluster_size bytes each */
    uint8_t *out;                /* cluster_size bytes per cluster */
    int64_t *len;                /* compressed length, 0 = incompressible, <0 = error */
    unsigned n, first, step;
};

static void *cjob_run(void *arg)
{
    struct cjob *j = arg;
    uint64_t cs = j->s->cluster_size;
    for (unsigned i = j->first; i < j->n; i += j->step)
        j->len[i] = compress_cluster(j->s, j->out + i * cs, cs - 1, j->in[i]);
    return NULL;
}

#define CBATCH_BYTES (8u << 20)       /* compressed per batch (inputs and outputs) */
#define CTHREADS 4

static void compress_batch(struct qcow2_state *s, const uint8_t **in, uint8_t *out,
                           int64_t *len, unsigned n)
{
    struct cjob jobs[CTHREADS];
    pthread_t tid[CTHREADS];
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned nt = n < CTHREADS ? n : CTHREADS;
    if (cpus > 0 && (unsigned long)cpus < nt) nt = (unsigned)cpus;
    if (nt < 1) nt = 1;
    bool started[CTHREADS] = { false };
    for (unsigned t = 1; t < nt; t++) {
        jobs[t] = (struct cjob){ s, in, out, len, n, t, nt };
        started[t] = pthread_create(&tid[t], NULL, cjob_run, &jobs[t]) == 0;
    }
    jobs[0] = (struct cjob){ s, in, out, len, n, 0, nt };
    cjob_run(&jobs[0]);
    for (unsigned t = 1; t < nt; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else cjob_run(&jobs[t]);          /* no thread: do its share here */
    }
}

/* QEMU's qcow2_co_pwritev_compressed_part: whole clusters (the last one of
 * the image may be partial and is padded with zeroes), each compressed on
 * its own; a cluster that does not compress to less than cluster_size - 1
 * bytes is written normally.  Clusters are compressed in parallel a batch
 * at a time, then allocated, written and linked in order. */
static int qcow2_pwrite_compressed(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    struct qcow2_state *s = QS(bs);
    uint64_t cs = s->cluster_size;
    if (s->incompat & QCOW2_INCOMPAT_DATA_FILE)
        return pms_err(ENOTSUP, "compressed writes are not supported with an external data file");
    if (len == 0) {
        /* as QEMU: the end of a compressed stream rounds the file (which
         * may end inside a sector after compressed data) up to a sector */
        int64_t flen = bdev_file_length(bs->file);
        if (flen < 0) return (int)flen;
        if (flen & 511)
            return bdev_file_truncate(bs->file, ((uint64_t)flen + 511) & ~511ull);
        return 0;
    }
    if (qc_off_in_cluster(s, off))
        return pms_err(EINVAL, "compressed writes must start at a cluster boundary "
                       "(offset %llu, cluster size %llu)", (unsigned long long)off,
                       (unsigned long long)cs);
    if (qc_off_in_cluster(s, len) && off + len != s->size)
        return pms_err(EINVAL, "compressed writes must cover whole clusters (length %llu, "
                       "cluster size %llu), except the last cluster of the image",
                       (unsigned long long)len, (unsigned long long)cs);
    uint64_t nclu = (len + cs - 1) / cs;
    unsigned bmax = (unsigned)(CBATCH_BYTES / cs > 1 ? CBATCH_BYTES / cs : 1);
    if (nclu < bmax) bmax = (unsigned)nclu;
    uint8_t *out = malloc(bmax * cs), *pad = NULL;
    const uint8_t **in = malloc(bmax * sizeof *in);
    int64_t *clen = malloc(bmax * sizeof *clen);
    int r = out && in && clen ? 0 : pms_err(ENOMEM, "out of memory");
    const uint8_t *p = buf;
    while (r == 0 && len) {
        unsigned n = 0;
        for (uint64_t o = 0; n < bmax && o < len; o += cs, n++) {
            in[n] = p + o;
            if (len - o < cs) {            /* the image's partial last cluster */
                if (!pad && !(pad = calloc(1, cs))) { r = pms_err(ENOMEM, "out of memory"); break; }
                memcpy(pad, p + o, len - o);
                in[n] = pad;
            }
        }
        if (r < 0) break;
        compress_batch(s, in, out, clen, n);
        for (unsigned i = 0; r == 0 && i < n; i++) {
            uint64_t l = len < cs ? len : cs;
            if (clen[i] < 0)            /* again here, for the error message */
                r = (int)compress_cluster(s, out + i * cs, cs - 1, in[i]);
            else if (clen[i] == 0)
                r = qcow2_pwrite(bs, p, l, off);             /* incompressible */
            else
                r = write_compressed_cluster(bs, out + i * cs, (uint64_t)clen[i], off);
            if (r > 0) r = 0;
            p += l; off += l; len -= l;
        }
    }
    free(out);
    free(in);
    free(clen);
    free(pad);
    return r;
}

/* Zero writes follow QEMU 7.2 (qcow2_co_pwrite_zeroes and the block
 * layer's fallback), so qemu-io `write -z [-u]` leaves the same metadata:
 *   - the unit is the subcluster (the cluster without extended L2);
 *   - a whole unit is marked zero in the L2 entry even where it already
 *     reads as zero (unallocated, no backing file): QEMU reports it
 *     "present, zero";
 *   - its host cluster is dropped only with MAY_UNMAP (or when compressed),
 *     else kept as ZERO_ALLOC — we keep it only when we own it (COPIED); a
 *     cluster shared with a snapshot is released instead, which reads the
 *     same and keeps the snapshot intact;
 *   - a partial unit becomes a zeroed whole unit when the rest of it reads
 *     as zero and the top layer holds no data there; otherwise zeroes are
 *     written as data (QEMU's -ENOTSUP fallback), as is everything on a v2
 *     image, which has no zero flag;
 *   - an entry that already says what we would write is left untouched (no
 *     L2 update, no table allocated or copied). */

#define L2_BITMAP_ALL_ZEROES (0xffffffffull << 32)

/* Does [off, off+len) read as zeroes according to the metadata of the whole
 * chain (QEMU's is_zero: block status, not data)?  Clamped to the size. */
static int reads_zero(struct bdev *bs, uint64_t off, uint64_t len)
{
    struct qcow2_state *s = QS(bs);
    if (off >= s->size) return 1;
    if (len > s->size - off) len = s->size - off;
    while (len) {
        struct pms_extent e;
        int r = qcow2_block_status(bs, off, len, &e);
        if (r < 0) return r;
        if (!(e.flags & PMS_BLOCK_ZERO) || e.length == 0) return 0;
        if (e.length >= len) break;
        off += e.length;
        len -= e.length;
    }
    return 1;
}

/* The L2 entry (and extended-L2 bitmap) of the cluster at off: l2off 0 and
 * e = bm = 0 where no L2 table covers it. */
static int entry_at(struct bdev *bs, uint64_t off, uint64_t *l2off, uint64_t *idx,
                    uint64_t *e, uint64_t *bm)
{
    struct qcow2_state *s = QS(bs);
    uint32_t l1i;
    uint8_t *l2;
    l2_for(bs, off, l2off, &l1i);
    *idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    *e = *bm = 0;
    if (!*l2off)
        return 0;
    int r = qcow2_cache_get_part(bs, &s->l2_cache, *l2off, *idx * s->l2_entry_size,
                                 s->l2_entry_size, &l2);
    if (r < 0) return r;
    *e = qcow2_l2_get(s, l2, *idx);
    *bm = qcow2_l2_get_bitmap(s, l2, *idx);
    return 0;
}

/* Make one whole cluster read as zeroes without data (v3). */
static int zero_whole_cluster(struct bdev *bs, uint64_t off, bool unmap)
{
    struct qcow2_state *s = QS(bs);
    uint64_t l2off, idx, e, bm;
    uint8_t *l2;
    int r = entry_at(bs, off, &l2off, &idx, &e, &bm);
    if (r < 0) return r;
    enum qcow2_ctype t = qcow2_entry_type(s, e);
    bool owned = (t == QC_NORMAL || t == QC_ZERO_ALLOC) && (e & QCOW_OFLAG_COPIED);
    bool drop = t == QC_COMPRESSED ||
                ((t == QC_NORMAL || t == QC_ZERO_ALLOC) && (unmap || !owned));
    uint64_t ne, nb = bm;
    if (s->ext_l2) {
        ne = drop ? 0 : e;
        nb = L2_BITMAP_ALL_ZEROES;
    } else
        ne = (drop ? 0 : e) | QCOW_OFLAG_ZERO;
    if (l2off && ne == e && nb == bm)
        return 0;                       /* already so: no L2 update */
    r = writable_entry(bs, off, &l2off, &l2, &idx, &e);
    if (r < 0) return r;
    qcow2_l2_set(s, l2, idx, ne);
    if (s->ext_l2)
        qcow2_l2_set_bitmap(s, l2, idx, nb);
    l2_entry_dirty(s, l2, idx);
    return drop ? release_entry(bs, e) : 0;
}

/* Extended L2: subclusters [first, first+n) of the cluster at off read as
 * zero (their allocation bits cleared, the host cluster kept).  1 when done,
 * 0 when the entry cannot (compressed): the caller writes data instead. */
static int zero_subclusters(struct bdev *bs, uint64_t off, unsigned first, unsigned n)
{
    struct qcow2_state *s = QS(bs);
    uint64_t l2off, idx, e, bm;
    uint8_t *l2;
    int r = entry_at(bs, off, &l2off, &idx, &e, &bm);
    if (r < 0) return r;
    if (qcow2_entry_type(s, e) == QC_COMPRESSED)
        return 0;
    uint64_t range = (n >= 32 ? 0xffffffffull : ((1ull << n) - 1)) << first;
    uint64_t nb = (bm | (range << 32)) & ~range;
    if (l2off && nb == bm)
        return 1;
    r = writable_entry(bs, off, &l2off, &l2, &idx, &e);
    if (r < 0) return r;
    qcow2_l2_set_bitmap(s, l2, idx, nb);
    l2_entry_dirty(s, l2, idx);
    return 1;
}

/* Whole units [off, off+len) of one cluster read as zero. */
static int zero_units(struct bdev *bs, uint64_t off, uint64_t len, bool unmap)
{
    struct qcow2_state *s = QS(bs);
    uint64_t in = qc_off_in_cluster(s, off);
    if (in == 0 && (len == s->cluster_size || off + len >= s->size))
        return zero_whole_cluster(bs, off, unmap);
    uint64_t end = off + len > s->size ? s->size : off + len;
    unsigned first = (unsigned)(in >> s->sc_bits);
    unsigned last = (unsigned)((qc_off_in_cluster(s, end - 1) >> s->sc_bits) + 1);
    int r = zero_subclusters(bs, off, first, last - first);
    if (r == 0)
        r = write_cluster(bs, NULL, len, off);
    return r < 0 ? r : 0;
}

/* A unit only partly covered by [off, off+len): zero the whole unit when
 * that changes nothing else, else write zeroes as data. */
static int zero_partial(struct bdev *bs, uint64_t off, uint64_t len, bool unmap)
{
    struct qcow2_state *s = QS(bs);
    uint64_t u0 = off & ~(s->sc_size - 1);
    uint64_t uend = u0 + s->sc_size;
    uint64_t tail = off + len >= s->size ? 0 : uend - (off + len);
    int z = reads_zero(bs, u0, off - u0);
    if (z > 0) z = reads_zero(bs, off + len, tail);
    if (z < 0) return z;
    if (z) {
        struct mapping m;
        int r = get_mapping(bs, u0, s->sc_size, &m);
        if (r < 0) return r;
        if ((m.type == SC_UNALLOCATED || m.type == SC_ZERO) && m.bytes >= s->sc_size - (
                u0 + s->sc_size > s->size ? u0 + s->sc_size - s->size : 0))
            return zero_units(bs, u0, uend > s->size ? s->size - u0 : s->sc_size, unmap);
    }
    return write_cluster(bs, NULL, len, off);
}

static int qcow2_pwrite_zeroes(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags)
{
    struct qcow2_state *s = QS(bs);
    bool unmap = flags & BDEV_ZERO_MAY_UNMAP;
    while (len) {
        uint64_t in = qc_off_in_cluster(s, off);
        uint64_t n = s->cluster_size - in;
        if (n > len) n = len;
        int r = 0;
        if (s->version < 3) {
            r = write_cluster(bs, NULL, n, off);
        } else {
            /* head: up to the first unit boundary; middle: whole units;
             * tail: the rest (a unit reaching the image end is whole) */
            uint64_t o = off, left = n;
            uint64_t h = o & (s->sc_size - 1);
            if (h && r == 0) {
                uint64_t hn = s->sc_size - h < left ? s->sc_size - h : left;
                r = zero_partial(bs, o, hn, unmap);
                o += hn; left -= hn;
            }
            uint64_t mid = left & ~(s->sc_size - 1);
            if (o + left >= s->size) mid = left;
            if (mid && r == 0) {
                r = zero_units(bs, o, mid, unmap);
                o += mid; left -= mid;
            }
            if (left && r == 0)
                r = zero_partial(bs, o, left, unmap);
        }
        if (r < 0) return r;
        off += n; len -= n;
    }
    return 0;
}

/* Discard the whole clusters of [off, off+len).  An ordinary discard leaves
 * entries that read as zeroes (v3); a full one (shrink: the range leaves the
 * image) clears them to unallocated, as QEMU's full_discard does. */
static int discard_range(struct bdev *bs, uint64_t len, uint64_t off, bool full)
{
    struct qcow2_state *s = QS(bs);
    /* A v2 image cannot mark clusters as zero: discarding would expose the
     * backing file, so (like QEMU) it keeps the data. */
    if (s->version < 3 && bs->backing && !full)
        return 0;
    /* only whole clusters are discarded, like QEMU */
    uint64_t start = (off + s->cluster_size - 1) & ~(s->cluster_size - 1);
    uint64_t end = off + len == s->size ? off + len : (off + len) & ~(s->cluster_size - 1);
    for (uint64_t o = start; o < end; o += s->cluster_size) {
        uint64_t l1i = o >> (s->cluster_bits + s->l2_bits);
        uint64_t idx = (o >> s->cluster_bits) & (s->l2_entries - 1);
        uint64_t e = 0, bm = 0;
        uint8_t *l2;
        int r;
        if (l1i < s->l1_size && (s->l1[l1i] & L1E_OFFSET_MASK)) {
            r = qcow2_cache_get_part(bs, &s->l2_cache, s->l1[l1i] & L1E_OFFSET_MASK,
                                     idx * s->l2_entry_size, s->l2_entry_size, &l2);
            if (r < 0) return r;
            e = qcow2_l2_get(s, l2, idx);
            bm = qcow2_l2_get_bitmap(s, l2, idx);
        } else if (!bs->backing || full)
            continue;                   /* no table, nothing below: reads zero */
        enum qcow2_ctype t = qcow2_entry_type(s, e);
        if (t == QC_UNALLOCATED && !bm && (!bs->backing || full)) continue;
        if (t == QC_ZERO_PLAIN && !full) continue;
        uint64_t l2off;
        r = get_l2_writable(bs, o, &l2off);
        if (r < 0) return r;
        r = qcow2_cache_get_part(bs, &s->l2_cache, l2off, idx * s->l2_entry_size,
                                 s->l2_entry_size, &l2);
        if (r < 0) return r;
        if (full) {
            qcow2_l2_set(s, l2, idx, 0);
            qcow2_l2_set_bitmap(s, l2, idx, 0);
        } else if (s->ext_l2) {
            qcow2_l2_set(s, l2, idx, 0);
            qcow2_l2_set_bitmap(s, l2, idx, 0xffffffffull << 32);
        } else
            qcow2_l2_set(s, l2, idx, s->version >= 3 ? QCOW_OFLAG_ZERO : 0);
        l2_entry_dirty(s, l2, idx);
        r = release_entry(bs, e);
        if (r < 0) return r;
    }
    return 0;
}

static int qcow2_discard(struct bdev *bs, uint64_t len, uint64_t off)
{
    return discard_range(bs, len, off, false);
}

void qcow2_hold_frees(struct bdev *bs)
{
    QS(bs)->hold_frees = true;
}

static int qcow2_flush(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_flush_metadata(bs);
    if (r == 0 && s->npending && !s->hold_frees) {
        r = pending_drain(bs);
        if (r == 0) r = qcow2_flush_metadata(bs);
    }
    return r;
}

static int64_t qcow2_getlength(struct bdev *bs)
{
    /* QEMU sees whole 512-byte sectors only */
    return (int64_t)(QS(bs)->size & ~511ull);
}

/* Shrink to size, as QEMU's qcow2_co_truncate does: the whole clusters past
 * the new end are discarded to unallocated (the partial last cluster keeps
 * its bytes, so a later grow shows them again, as in QEMU), L2 tables wholly
 * past the end leave the L1 (whose size stays), the header takes the new
 * size and the file loses its unused tail.
 * Order: cleared L2 entries and L1 entries are durable before the clusters
 * they pointed at are freed (the pending-free rule), and the header size is
 * written last, so a crash leaves the old size with a zeroed tail and
 * possibly leaked clusters, never a table pointing at a freed cluster.
 * Snapshots keep their own tables and sizes. */
static int qcow2_shrink(struct bdev *bs, uint64_t size)
{
    struct qcow2_state *s = QS(bs);
    uint64_t cs = s->cluster_size;
    uint64_t from = (size + cs - 1) & ~(cs - 1);
    int r = 0;
    if (from < s->size)
        r = discard_range(bs, s->size - from, from, true);
    uint64_t cov = s->cluster_bits + s->l2_bits;
    uint64_t keep = (size + (1ull << cov) - 1) >> cov;
    for (uint64_t i = keep; r == 0 && i < s->l1_size; i++) {
        uint64_t t = s->l1[i] & L1E_OFFSET_MASK;
        if (!s->l1[i]) continue;
        s->l1[i] = 0;
        qcow2_l1_mark_dirty(s, (uint32_t)i);
        qcow2_cache_discard(&s->l2_cache, t);
        if (t) r = pending_add_cluster(bs, t);
    }
    if (r == 0) r = qcow2_flush(bs);
    if (r < 0) return r;
    uint64_t be = htobe64(size);
    r = bdev_file_pwrite(bs->file, &be, 8, 24);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) return r;
    s->size = size;
    /* the file ends after its last referenced cluster */
    int64_t flen = bdev_file_length(bs->file);
    if (flen <= 0) return 0;
    uint64_t n = qc_size_to_clusters(s, (uint64_t)flen);
    while (n > 1) {
        uint64_t rc;
        r = qcow2_get_refcount(bs, n - 1, &rc);
        if (r < 0 || rc) break;
        n--;
    }
    if (r < 0 || (n << s->cluster_bits) >= (uint64_t)flen) {
        pms_err_clear();
        return 0;
    }
    if (n - 1 < s->free_cluster_index) s->free_cluster_index = n;
    s->flen_lb = 0;                     /* the file shrinks */
    if (bdev_file_truncate(bs->file, n << s->cluster_bits) < 0)
        pms_err_clear();                /* a longer file is only a leak-free tail */
    return 0;
}

static int qcow2_truncate(struct bdev *bs, uint64_t size)
{
    struct qcow2_state *s = QS(bs);
    if (size % 512)
        return pms_err(EINVAL, "The new size must be a multiple of 512");
    if (s->version < 3 && s->nb_snaps)
        return pms_err(ENOTSUP, "Can't resize a v2 image which has snapshots");
    if (size < s->size)
        return qcow2_shrink(bs, size);
    uint64_t cov = s->cluster_bits + s->l2_bits;
    uint64_t need = (size + (1ull << cov) - 1) >> cov;
    if (need > UINT32_MAX) return pms_err(EFBIG, "size too large");
    int r = qcow2_grow_l1(bs, (uint32_t)need);
    if (r < 0) return r;
    uint64_t old = s->size;
    uint64_t be = htobe64(size);
    r = bdev_file_pwrite(bs->file, &be, 8, 24);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) return r;
    s->size = size;
    /* The grown area must read as zeroes, not as whatever a longer backing
     * file holds there (QEMU zeroes it the same way). */
    if (bs->backing && bs->backing->size > old) {
        uint64_t end = size < bs->backing->size ? size : bs->backing->size;
        r = qcow2_pwrite_zeroes(bs, end - old, old, 0);
        if (r == 0) r = qcow2_flush(bs);
    }
    return r;
}

static int qcow2_block_status(struct bdev *bs, uint64_t off, uint64_t len, struct pms_extent *e)
{
    struct mapping m;
    e->start = off;
    uint64_t done = 0;
    int r = 0;
    unsigned flags = 0;
    uint64_t host = 0;
    int depth = 0;
    /* merge consecutive clusters with the same state (and contiguous host) */
    struct qcow2_state *s = QS(bs);
    const uint64_t l2range = s->cluster_size << s->l2_bits;
    while (done < len) {
        uint64_t l2off;
        uint32_t l1i;
        l2_for(bs, off + done, &l2off, &l1i);
        if (!l2off) {
            /* no L2 table: the rest of its range is unallocated in one go
             * (a sparse 1 TiB image has 2^24 clusters) */
            memset(&m, 0, sizeof m);
            m.type = SC_UNALLOCATED;
            m.bytes = l2range - (off + done) % l2range;
            if (m.bytes > len - done) m.bytes = len - done;
        } else {
            r = get_mapping(bs, off + done, len - done, &m);
            if (r < 0) return r;
            uint64_t ce = off + done + m.bytes;
            if (m.type == SC_UNALLOCATED && !m.zero_alloc && done + m.bytes < len &&
                qc_off_in_cluster(s, ce) == 0)
                m.bytes += empty_run(bs, ce, len - done - m.bytes);
        }
        unsigned f;
        uint64_t h = 0;
        int d = 0;
        uint64_t n = m.bytes;
        switch (m.type) {
        case SC_DATA: f = PMS_BLOCK_DATA | PMS_BLOCK_ALLOCATED | PMS_BLOCK_OFFSET; h = m.host; break;
        case SC_ZERO: f = PMS_BLOCK_ZERO | PMS_BLOCK_ALLOCATED |
                          (m.zero_alloc ? PMS_BLOCK_OFFSET : 0); h = m.host; break;
        case SC_COMPRESSED: f = PMS_BLOCK_DATA | PMS_BLOCK_ALLOCATED | PMS_BLOCK_COMPRESSED; break;
        default:
            if (m.zero_alloc && (!bs->backing || off + done >= bs->backing->size)) {
                /* unallocated subcluster of an allocated cluster */
                f = PMS_BLOCK_ZERO | PMS_BLOCK_OFFSET;
                h = m.host;
            } else if (bs->backing && off + done < bs->backing->size) {
                struct pms_extent be;
                struct bdev *y;
                int yd;
                uint64_t bl = n < bs->backing->size - (off + done) ? n : bs->backing->size - (off + done);
                /* straight to the layer that has something (chain map) */
                r = chain_target(bs, off + done, bl, &y, &yd, &bl);
                if (r < 0) return r;
                if (!y) {                       /* no layer has anything */
                    f = PMS_BLOCK_ZERO; h = 0; d = yd; n = bl;
                } else if (off + done >= y->size) {
                    /* past the end of the layer: zeroes at its parent */
                    f = PMS_BLOCK_ZERO; h = 0; d = yd - 1; n = bl;
                } else {
                    if (bl > y->size - (off + done)) bl = y->size - (off + done);
                    r = bdev_block_status(y, off + done, bl, &be);
                    if (r < 0) return r;
                    f = be.flags;
                    h = be.host_offset;
                    d = be.depth + yd;
                    n = be.length;
                }
            } else {
                f = PMS_BLOCK_ZERO;     /* beyond the chain: depth 0, like qemu */
            }
        }
        if (done == 0) {
            flags = f; host = h; depth = d;
        } else if (f != flags || d != depth ||
                   ((f & PMS_BLOCK_OFFSET) && h != host + done)) {
            break;
        }
        done += n;
    }
    e->length = done;
    e->flags = flags;
    e->depth = depth;
    e->host_offset = host;
    return 0;
}

/* QEMU's qcow2_detect_metadata_preallocation: more clusters of the file
 * carry a refcount than the file occupies on disk (10/9 of it, at least 2 more). */
static bool prealloc_detect(struct bdev *bs, uint64_t actual)
{
    struct qcow2_state *s = QS(bs);
    int64_t flen = bdev_file_length(bs->file);
    if (flen < 0)
        return false;
    uint64_t real = actual >> s->cluster_bits;
    uint64_t threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
    uint64_t n = qc_size_to_clusters(s, (uint64_t)flen), used = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t rc, rti = i >> s->rb_bits;
        /* a damaged refcount table entry is for a write to find (and mark
         * the image corrupt), not for this heuristic */
        if (rti < s->reftable_entries &&
            qc_off_in_cluster(s, s->reftable[rti] & REFT_OFFSET_MASK))
            return false;
        if (qcow2_get_refcount(bs, i, &rc) < 0) {
            pms_err_clear();
            return false;
        }
        if (rc && ++used >= threshold)
            return true;
    }
    return false;
}

static int qcow2_info(struct bdev *bs, struct pms_info *info)
{
    struct qcow2_state *s = QS(bs);
    if (!s->prealloc_checked) {
        s->prealloc = prealloc_detect(bs, info->actual_size);
        s->prealloc_checked = true;
    }
    info->metadata_preallocated = s->prealloc;
    strcpy(info->format, "qcow2");
    info->cluster_size = s->cluster_size;
    info->qcow2_version = s->version;
    info->refcount_bits = (int)s->refcount_bits;
    info->extended_l2 = s->ext_l2;
    info->lazy_refcounts = (s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0;
    info->corrupt = (s->incompat & QCOW2_INCOMPAT_CORRUPT) != 0;
    info->dirty_flag = (s->incompat & QCOW2_INCOMPAT_DIRTY) != 0;
    strcpy(info->compression_type, s->compression_type ? "zstd" : "zlib");
    if (s->backing_file) {
        snprintf(info->backing_file, sizeof info->backing_file, "%s", s->backing_file);
        if (bs->backing)
            snprintf(info->full_backing_file, sizeof info->full_backing_file, "%s",
                     bs->backing->filename);
    }
    if (s->backing_format)
        snprintf(info->backing_format, sizeof info->backing_format, "%s", s->backing_format);
    return 0;
}

/* A partial write of an unallocated or shared (sub)cluster writes it whole. */
static uint64_t qcow2_write_unit(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    return s->ext_l2 ? s->cluster_size / QCOW2_SUBCLUSTERS : s->cluster_size;
}

/* QEMU's qcow2_vm_state_offset: the first L1 index past the disk. */
static uint64_t qcow2_vmstate_offset(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    unsigned cov = s->cluster_bits + s->l2_bits;
    return ((s->size + (1ull << cov) - 1) >> cov) << cov;
}

const struct pms_driver pms_drv_qcow2 = {
    .name = "qcow2",
    .state_size = sizeof(struct qcow2_state),
    .probe = probe,
    .open = open_wrap,
    .write_unit = qcow2_write_unit,
    .close = qcow2_close,
    .pread = qcow2_pread,
    .pwrite = qcow2_pwrite,
    .pwrite_batch = qcow2_pwrite_batch,
    .pwrite_zeroes = qcow2_pwrite_zeroes,
    .pwrite_compressed = qcow2_pwrite_compressed,
    .discard = qcow2_discard,
    .flush = qcow2_flush,
    .getlength = qcow2_getlength,
    .truncate = qcow2_truncate,
    .block_status = qcow2_block_status,
    .info = qcow2_info,
    .vmstate_offset = qcow2_vmstate_offset,
    .check = qcow2_check,
    .snapshot_create = qcow2_snapshot_create,
    .snapshot_goto = qcow2_snapshot_goto,
    .snapshot_delete = qcow2_snapshot_delete,
    .snapshot_list = qcow2_snapshot_list,
    .snapshot_changed = qcow2_snapshot_changed,
    .checkpoint_begin = qcow2_checkpoint_begin,
    .checkpoint_end = qcow2_checkpoint_end,
};

/* ------------------------------------------------------------------------ */
/* create                                                                   */

/* Preallocated layout (preallocation != off), computed up front and written
 * by qcow2_create together with the rest: header | reftable | refblocks |
 * L1 | then for metadata each L2 table followed by its data clusters (as
 * QEMU's preallocate_co allocates them), for falloc/full every L2 table and
 * then all data clusters contiguous (QEMU's truncate preallocation puts the
 * data in one run).  Every cluster has refcount 1; L2 entries are NORMAL
 * with COPIED (extended L2: subclusters left unallocated, as QEMU does). */
static uint64_t l2_pos(uint64_t p0, uint64_t i, uint64_t cs, uint64_t per_l2, int mode)
{
    return mode == PMS_PREALLOC_METADATA ? p0 + i * cs * (1 + per_l2) : p0 + i * cs;
}

static uint64_t data_pos(uint64_t p0, uint64_t k, uint64_t cs, uint64_t per_l2, uint64_t nl2,
                         int mode)
{
    if (mode == PMS_PREALLOC_METADATA)
        return l2_pos(p0, k / per_l2, cs, per_l2, mode) + cs * (1 + k % per_l2);
    return p0 + nl2 * cs + k * cs;
}

/* bdev_fd_pwrite_all, or one error line naming the file and the reason. */
static int create_write(int fd, const char *path, const void *buf, size_t len, off_t off)
{
    int r = bdev_fd_pwrite_all(fd, buf, len, (uint64_t)off);
    return r < 0 ? pms_err(-r, "write to '%s' failed: %s", path, strerror(-r)) : 0;
}

int qcow2_create(const char *path, uint64_t size, const struct pms_create_opts *o)
{
    uint64_t cs = o->cluster_size ? o->cluster_size : 65536;
    int pmode = PMS_PREALLOC_OFF;
    if (o->size >= offsetof(struct pms_create_opts, preallocation) + sizeof(int))
        pmode = o->preallocation;
    if (pmode == PMS_PREALLOC_OFF && o->preallocation_metadata)
        pmode = PMS_PREALLOC_METADATA;
    if (pmode < PMS_PREALLOC_OFF || pmode > PMS_PREALLOC_FULL)
        return pms_err(EINVAL, "unknown preallocation mode %d", pmode);
    if (pmode != PMS_PREALLOC_OFF && o->backing_file && !o->extended_l2)
        return pms_err(EINVAL, "Backing file and preallocation can only be used at the same "
                       "time if extended_l2 is on");
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
        return pms_err(EINVAL, "cluster size must be a power of two between 512 and 2M");
    unsigned cbits = (unsigned)__builtin_ctzll(cs);
    int rbits = o->refcount_bits ? o->refcount_bits : 16;
    if (rbits < 1 || rbits > 64 || (rbits & (rbits - 1)))
        return pms_err(EINVAL, "refcount_bits must be a power of two between 1 and 64");
    if (o->compat_v2 && rbits != 16)
        return pms_err(EINVAL, "version 2 images only support 16-bit refcounts");
    if (o->compat_v2 && o->lazy_refcounts)
        return pms_err(EINVAL, "lazy refcounts need a version 3 image (compat=1.1)");
    if (o->compat_v2 && o->extended_l2)
        return pms_err(EINVAL, "extended L2 entries need a version 3 image");
    if (o->extended_l2 && cs < 16384)
        return pms_err(EINVAL, "extended L2 entries need a cluster size of at least 16k");
    bool zstd = false;
    if (o->size >= offsetof(struct pms_create_opts, compression_type) + sizeof(const char *) &&
        o->compression_type && strcmp(o->compression_type, "zlib")) {
        if (strcmp(o->compression_type, "zstd"))
            return pms_err(EINVAL, "unknown compression type '%s' (zlib or zstd)",
                           o->compression_type);
        if (o->compat_v2)
            return pms_err(EINVAL, "zstd compression needs a version 3 image (compat=1.1)");
        zstd = true;
    }
    char *bf = NULL, *bfmt = NULL;
    if (o->backing_file) {
        if (strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME)
            return pms_err(EINVAL, "backing file name too long");
    }
    if (o->backing_file && o->backing_unchecked) {
        /* qemu-img create -u: record the name, never open the file */
        if (!size)
            return pms_err(EINVAL, "an image size is required when the backing file is not "
                           "opened");
        bf = strdup(o->backing_file);
        bfmt = o->backing_format ? strdup(o->backing_format) : NULL;
        if (!bf || (o->backing_format && !bfmt)) {
            free(bf); free(bfmt);
            return pms_err(ENOMEM, "out of memory");
        }
    } else if (o->backing_file) {
        /* validate the backing file and take its size if none given */
        char full[PATH_MAX];
        if (o->backing_file[0] == '/' || !strchr(path, '/'))
            snprintf(full, sizeof full, "%s", o->backing_file);
        else {
            const char *sl = strrchr(path, '/');
            snprintf(full, sizeof full, "%.*s/%s", (int)(sl - path), path, o->backing_file);
        }
        struct pms_open_opts bo;
        pms_open_opts_init(&bo);
        bo.readonly = 1;
        bo.format = o->backing_format;
        struct bdev *b;
        int r = bdev_open(full, &bo, &b);
        if (r < 0)
            return pms_err(-r, "could not open backing file '%s': %s", full, pms_err_get());
        if (!size) size = b->size;
        const char *fmt = o->backing_format ? o->backing_format : b->drv->name;
        bfmt = strdup(fmt);
        bdev_close(b);
        bf = strdup(o->backing_file);
    }
    if (size > (1ull << 61)) {
        free(bf); free(bfmt);
        return pms_err(EFBIG, "image size too large");
    }
    size = (size + 511) & ~511ull;          /* whole sectors, as qemu-img */
    struct qcow2_state st;
    memset(&st, 0, sizeof st);
    st.version = o->compat_v2 ? 2 : 3;
    st.cluster_bits = cbits;
    st.cluster_size = cs;
    st.size = size;
    st.ext_l2 = o->extended_l2;
    unsigned l2bits = cbits - (st.ext_l2 ? 4 : 3);
    uint64_t cov = cbits + l2bits;
    uint64_t l1n = (size + (1ull << cov) - 1) >> cov;
    if (l1n * 8 > QCOW2_MAX_L1_BYTES) {
        free(bf); free(bfmt);
        return pms_err(EFBIG, "image size too large for this cluster size");
    }
    st.l1_size = (uint32_t)l1n;
    st.refcount_order = (unsigned)__builtin_ctz((unsigned)rbits);
    st.header_length = 112;
    st.incompat = (st.ext_l2 ? QCOW2_INCOMPAT_EXTL2 : 0) |
                  (zstd ? QCOW2_INCOMPAT_COMPRESSION : 0);
    st.compression_type = zstd ? QCOW2_COMPRESSION_ZSTD : QCOW2_COMPRESSION_ZLIB;
    st.compat = o->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0;
    st.backing_file = bf;
    st.backing_format = bfmt;
    /* layout: header | reftable | refblock | L1 ... ; grow reftable if the
     * metadata itself needs more than one refcount block */
    uint64_t rb_entries = (cs * 8) >> st.refcount_order;
    uint64_t l1_clusters = (l1n * 8 + cs - 1) / cs;  /* none for a 0-byte image, as QEMU */
    /* preallocation: one L2 table per L1 entry, a cluster per cluster of data */
    uint64_t per_l2 = 1ull << l2bits;
    uint64_t nl2 = pmode != PMS_PREALLOC_OFF ? l1n : 0;
    uint64_t ndata = pmode != PMS_PREALLOC_OFF ? (size + cs - 1) / cs : 0;
    uint64_t rt_clusters = 1, rb_count = 1;
    for (int i = 0; i < 64; i++) {
        uint64_t total = 1 + rt_clusters + rb_count + l1_clusters + nl2 + ndata;
        uint64_t need_rb = (total + rb_entries - 1) / rb_entries;
        uint64_t need_rt = (need_rb * 8 + cs - 1) / cs;
        if (need_rb == rb_count && need_rt == rt_clusters) break;
        rb_count = need_rb; rt_clusters = need_rt;
    }
    st.reftable_offset = cs;
    st.reftable_clusters = (uint32_t)rt_clusters;
    uint64_t rb_off = cs * (1 + rt_clusters);
    uint64_t meta_end = rb_off + rb_count * cs;
    st.l1_offset = l1n ? meta_end : 0;                 /* QEMU: no L1 table, offset 0 */
    uint64_t total = 1 + rt_clusters + rb_count + l1_clusters + nl2 + ndata;
    uint64_t p0 = meta_end + l1_clusters * cs;         /* first L2 table */
    if (st.reftable_clusters * (cs / 8) < rb_count) {
        free(bf); free(bfmt);
        return pms_err(EFBIG, "image size too large to preallocate");
    }

    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        free(bf); free(bfmt);
        return pms_err(e, "could not create '%s': %s", path, strerror(e));
    }
    int r = 0;
    uint8_t *buf = calloc(1, cs > 4096 ? cs : 4096);
    size_t hlen = 0;
    if (!buf) r = pms_err(ENOMEM, "out of memory");
    if (r == 0) r = build_header(&st, buf, cs, &hlen);
    /* preallocating, qemu-img rewrites the header as a whole cluster: the
     * same bytes, the same allocation (its heuristic for metadata
     * preallocation counts allocated blocks) */
    if (r == 0 && pmode != PMS_PREALLOC_OFF)
        hlen = cs;
    if (r == 0) r = create_write(fd, path, buf, hlen, 0);
    /* refcount table */
    for (uint64_t i = 0; r == 0 && i < rt_clusters; i++) {
        memset(buf, 0, cs);
        for (uint64_t j = 0; j < cs / 8; j++) {
            uint64_t bi = i * (cs / 8) + j;
            if (bi < rb_count) {
                uint64_t v = htobe64(rb_off + bi * cs);
                memcpy(buf + j * 8, &v, 8);
            }
        }
        r = create_write(fd, path, buf, cs, (off_t)(cs * (1 + i)));
    }
    /* refcount blocks */
    for (uint64_t b = 0; r == 0 && b < rb_count; b++) {
        memset(buf, 0, cs);
        for (uint64_t ci = b * rb_entries; ci < (b + 1) * rb_entries && ci < total; ci++)
            qcow2_rb_set(&st, buf, ci - b * rb_entries, 1);
        r = create_write(fd, path, buf, cs, (off_t)(rb_off + b * cs));
    }
    /* L1 (zeroes): extend the file to cover it */
    if (r == 0 && ftruncate(fd, (off_t)(meta_end + l1n * 8)) < 0)
        r = pms_err(errno, "could not extend '%s': %s", path, strerror(errno));
    /* preallocation: L1 entries, L2 tables, then the data clusters' space */
    if (r == 0 && pmode != PMS_PREALLOC_OFF) {
        uint64_t *l1 = calloc(l1n ? l1n : 1, 8);
        if (!l1) r = pms_err(ENOMEM, "out of memory");
        for (uint64_t i = 0; r == 0 && i < nl2; i++)
            l1[i] = htobe64(l2_pos(p0, i, cs, per_l2, pmode) | QCOW_OFLAG_COPIED);
        if (r == 0) r = create_write(fd, path, l1, l1n * 8, (off_t)st.l1_offset);
        free(l1);
        unsigned esz = st.ext_l2 ? 16 : 8;
        for (uint64_t i = 0; r == 0 && i < nl2; i++) {
            memset(buf, 0, cs);
            for (uint64_t j = 0; j < per_l2 && i * per_l2 + j < ndata; j++) {
                uint64_t e = htobe64(data_pos(p0, i * per_l2 + j, cs, per_l2, nl2, pmode) |
                                     QCOW_OFLAG_COPIED);
                memcpy(buf + j * esz, &e, 8);
            }
            r = create_write(fd, path, buf, cs, (off_t)l2_pos(p0, i, cs, per_l2, pmode));
        }
        /* the data: a sparse file (metadata), reserved (falloc) or zeroes (full) */
        /* metadata: the file ends with the last data cluster; with extended L2
         * at the image's last byte (no copy-on-write pads the cluster, as in
         * QEMU) */
        if (r == 0 && pmode == PMS_PREALLOC_METADATA && ndata) {
            uint64_t tail = st.ext_l2 ? size - (ndata - 1) * cs : cs;
            r = bdev_fd_prealloc(fd, path, data_pos(p0, ndata - 1, cs, per_l2, nl2, pmode),
                                 tail, pmode);
        }
        if (r == 0 && pmode != PMS_PREALLOC_METADATA)
            r = bdev_fd_prealloc(fd, path, data_pos(p0, 0, cs, per_l2, nl2, pmode), ndata * cs,
                                 pmode);
    }
    if (r == 0 && fsync(fd) < 0)
        r = pms_err(errno, "fsync of '%s' failed", path);
    close(fd);
    free(buf);
    free(bf);
    free(bfmt);
    if (r < 0) unlink(path);
    return r;
}
