/* qcow2 refcounts and cluster allocation.
 *
 * Every host cluster has a refcount (width 1 << refcount_order bits) stored
 * in a refcount block; the refcount table points at the blocks.  Refcount 0
 * means free.  A cluster whose block does not exist has refcount 0.
 *
 * Invariants:
 *  - a new refcount block is written and flushed before the refcount table
 *    entry pointing at it, and the table entry is flushed before any cluster
 *    it describes is used;
 *  - a grown refcount table is written complete (with the blocks describing
 *    itself) before the header switches to it with one 12-byte write;
 *  - no cluster below free_cluster_index is free (allocation hint).
 * Placement is QEMU's, so images match theirs cluster for cluster: the
 * lowest free run; a missing refcount block goes to the first free cluster
 * after the run it is needed for; clusters released since the last flush
 * are taken (after that flush) before the file grows.
 * Threads: called with bs->lock held.
 */
#include <endian.h>
#include <stdlib.h>
#include <string.h>
#include "qcow2.h"
#include "../../util/error.h"

uint64_t qcow2_rb_get(struct qcow2_state *s, const uint8_t *rb, uint64_t i)
{
    switch (s->refcount_order) {
    case 0: return (rb[i / 8] >> (i % 8)) & 1;
    case 1: return (rb[i / 4] >> (2 * (i % 4))) & 3;
    case 2: return (rb[i / 2] >> (4 * (i % 2))) & 15;
    case 3: return rb[i];
    case 4: { uint16_t v; memcpy(&v, rb + 2 * i, 2); return be16toh(v); }
    case 5: { uint32_t v; memcpy(&v, rb + 4 * i, 4); return be32toh(v); }
    default: { uint64_t v; memcpy(&v, rb + 8 * i, 8); return be64toh(v); }
    }
}

void qcow2_rb_set(struct qcow2_state *s, uint8_t *rb, uint64_t i, uint64_t v)
{
    switch (s->refcount_order) {
    case 0: rb[i / 8] = (uint8_t)((rb[i / 8] & ~(1u << (i % 8))) | ((v & 1) << (i % 8))); break;
    case 1: rb[i / 4] = (uint8_t)((rb[i / 4] & ~(3u << (2 * (i % 4)))) | ((v & 3) << (2 * (i % 4)))); break;
    case 2: rb[i / 2] = (uint8_t)((rb[i / 2] & ~(15u << (4 * (i % 2)))) | ((v & 15) << (4 * (i % 2)))); break;
    case 3: rb[i] = (uint8_t)v; break;
    case 4: { uint16_t x = htobe16((uint16_t)v); memcpy(rb + 2 * i, &x, 2); break; }
    case 5: { uint32_t x = htobe32((uint32_t)v); memcpy(rb + 4 * i, &x, 4); break; }
    default: { uint64_t x = htobe64(v); memcpy(rb + 8 * i, &x, 8); break; }
    }
}

int qcow2_refcount_init(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    uint64_t bytes = (uint64_t)s->reftable_clusters << s->cluster_bits;
    if (bytes > QCOW2_MAX_REFTABLE_BYTES)
        return pms_err(EINVAL, "refcount table too large (%llu bytes)", (unsigned long long)bytes);
    s->reftable_entries = bytes / 8;
    s->reftable = malloc(bytes ? bytes : 8);
    if (!s->reftable)
        return pms_err(ENOMEM, "out of memory for the refcount table");
    int r = bdev_file_pread(bs->file, s->reftable, bytes, s->reftable_offset);
    if (r < 0)
        return r;
    int64_t flen = bdev_file_length(bs->file);
    for (uint64_t i = 0; i < s->reftable_entries; i++) {
        s->reftable[i] = be64toh(s->reftable[i]);
        uint64_t off = s->reftable[i] & REFT_OFFSET_MASK;
        if (s->check_mode)
            continue;                   /* the check reports bad entries */
        if (s->reftable[i] & ~REFT_OFFSET_MASK & ~0ull & 0x1ff)
            return pms_err(EINVAL, "refcount table entry %llu has reserved bits set",
                           (unsigned long long)i);
        /* an unaligned entry fails the first use of its block, as QEMU's
         * (get_block), so the rest of the image stays usable */
        if (off && qc_off_in_cluster(s, off))
            continue;
        if (off && off >= (uint64_t)flen)
            return pms_err(EINVAL, "refcount block %llu at offset %llu is invalid "
                           "(beyond the end of the file)",
                           (unsigned long long)i, (unsigned long long)off);
        if (off) {
            r = qcow2_check_host_range(bs, off, s->cluster_size, "refcount block");
            if (r < 0) return r;
        }
    }
    qcow2_reftable_bound(s);
    return 0;
}

static int get_block(struct bdev *bs, uint64_t rti, uint8_t **rb)
{
    struct qcow2_state *s = QS(bs);
    uint64_t off = s->reftable[rti] & REFT_OFFSET_MASK;
    if (qc_off_in_cluster(s, off))
        return qcow2_signal_corruption(bs, "Refblock offset %#llx unaligned (reftable index: "
                                       "%#llx)", (unsigned long long)off,
                                       (unsigned long long)rti);
    return qcow2_cache_get(bs, &s->rb_cache, off, rb);
}

int qcow2_get_refcount(struct bdev *bs, uint64_t ci, uint64_t *rc)
{
    struct qcow2_state *s = QS(bs);
    uint64_t rti = ci >> s->rb_bits;
    *rc = 0;
    if (rti >= s->reftable_entries || !(s->reftable[rti] & REFT_OFFSET_MASK))
        return 0;
    uint8_t *rb;
    int r = get_block(bs, rti, &rb);
    if (r < 0)
        return r;
    *rc = qcow2_rb_get(s, rb, ci & ((1ull << s->rb_bits) - 1));
    return 0;
}

/* First cluster index >= free_cluster_index starting a run of n free clusters. */
static int find_free(struct bdev *bs, uint64_t n, uint64_t *out)
{
    struct qcow2_state *s = QS(bs);
    uint64_t start = s->free_cluster_index, run = 0;
    for (uint64_t ci = start; ; ci++) {
        if (ci > (QCOW2_MAX_HOST_OFFSET >> s->cluster_bits))
            return pms_err(ENOSPC, "image file would exceed the qcow2 offset limit");
        uint64_t rc;
        int r = qcow2_get_refcount(bs, ci, &rc);
        if (r < 0) return r;
        if (rc == 0) {
            if (run == 0) start = ci;
            if (++run == n) { *out = start; return 0; }
        } else {
            run = 0;
            if (ci == s->free_cluster_index) s->free_cluster_index = ci + 1;
        }
    }
}

static int write_reftable_entry(struct bdev *bs, uint64_t rti)
{
    struct qcow2_state *s = QS(bs);
    uint64_t be = htobe64(s->reftable[rti]);
    int r = bdev_file_pwrite(bs->file, &be, 8, s->reftable_offset + rti * 8);
    if (r < 0) return r;
    return bdev_file_flush(bs->file);
}

/* Grow the refcount table to at least min_entries: the new table and the
 * refcount blocks needed to describe it are placed past every used cluster,
 * written, flushed, and then the header is switched with a single write. */
static int grow_reftable(struct bdev *bs, uint64_t min_entries)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_cache_writeback(bs, &s->rb_cache);
    if (r < 0) return r;
    /* end of used clusters: the file end rounded up */
    int64_t flen = bdev_file_length(bs->file);
    if (flen < 0) return (int)flen;
    uint64_t start = qc_size_to_clusters(s, (uint64_t)flen);
    if (start < s->free_cluster_index) start = s->free_cluster_index;
    uint64_t per_block = 1ull << s->rb_bits;
    uint64_t entries = s->reftable_entries * 2;
    if (entries < min_entries) entries = min_entries;
    uint64_t tclusters, nblocks = 0;
    for (int iter = 0; iter < 64; iter++) {
        tclusters = qc_size_to_clusters(s, entries * 8);
        uint64_t end = start + tclusters + nblocks;       /* area [start, end) */
        uint64_t need = 0;
        for (uint64_t b = start / per_block; b <= (end - 1) / per_block; b++)
            if (b >= s->reftable_entries || !(s->reftable[b] & REFT_OFFSET_MASK))
                need++;
        uint64_t need_entries = (end - 1) / per_block + 1;
        if (need == nblocks && need_entries <= entries)
            break;
        nblocks = need;
        if (need_entries > entries) entries = need_entries;
    }
    tclusters = qc_size_to_clusters(s, entries * 8);
    uint64_t bytes = tclusters << s->cluster_bits;
    if (bytes > QCOW2_MAX_REFTABLE_BYTES)
        return pms_err(EFBIG, "refcount table would exceed %u bytes", QCOW2_MAX_REFTABLE_BYTES);
    entries = bytes / 8;
    uint64_t *nt = calloc(1, bytes);
    uint8_t *blk = malloc(s->cluster_size);
    if (!nt || !blk) {
        free(nt); free(blk);
        return pms_err(ENOMEM, "out of memory growing the refcount table");
    }
    memcpy(nt, s->reftable, s->reftable_entries * 8);
    uint64_t end = start + nblocks + tclusters;
    /* refcount blocks first (at start ...), then the table */
    uint64_t bci = start;
    for (uint64_t b = start / per_block; b <= (end - 1) / per_block; b++) {
        if (b < s->reftable_entries && (s->reftable[b] & REFT_OFFSET_MASK))
            continue;
        nt[b] = bci << s->cluster_bits;
        bci++;
    }
    uint64_t toff = bci << s->cluster_bits;
    /* fill and write the new blocks; existing blocks are updated through the cache */
    for (uint64_t b = start / per_block; b <= (end - 1) / per_block; b++) {
        bool fresh = !(b < s->reftable_entries && (s->reftable[b] & REFT_OFFSET_MASK));
        uint64_t lo = b * per_block > start ? b * per_block : start;
        uint64_t hi = (b + 1) * per_block < end ? (b + 1) * per_block : end;
        if (fresh) {
            memset(blk, 0, s->cluster_size);
            for (uint64_t ci = lo; ci < hi; ci++)
                qcow2_rb_set(s, blk, ci - b * per_block, 1);
            r = bdev_file_pwrite(bs->file, blk, s->cluster_size, nt[b] & REFT_OFFSET_MASK);
        } else {
            uint8_t *rb;
            r = get_block(bs, b, &rb);
            for (uint64_t ci = lo; r == 0 && ci < hi; ci++)
                qcow2_rb_set(s, rb, ci - b * per_block, 1);
            if (r == 0) qcow2_cache_mark_dirty(&s->rb_cache, rb);
        }
        if (r < 0) goto out;
    }
    r = qcow2_cache_writeback(bs, &s->rb_cache);
    if (r < 0) goto out;
    for (uint64_t i = 0; i < entries; i++) nt[i] = htobe64(nt[i]);
    r = bdev_file_pwrite(bs->file, nt, bytes, toff);
    for (uint64_t i = 0; i < entries; i++) nt[i] = be64toh(nt[i]);
    if (r < 0) goto out;
    r = bdev_file_flush(bs->file);
    if (r < 0) goto out;
    struct { uint64_t off; uint32_t clusters; } __attribute__((packed)) hdr = {
        htobe64(toff), htobe32((uint32_t)tclusters) };
    r = bdev_file_pwrite(bs->file, &hdr, sizeof hdr, 48);
    if (r < 0) goto out;
    r = bdev_file_flush(bs->file);
    if (r < 0) goto out;
    uint64_t old_off = s->reftable_offset, old_clusters = s->reftable_clusters;
    free(s->reftable);
    s->reftable = nt;
    nt = NULL;
    s->reftable_entries = entries;
    s->reftable_offset = toff;
    s->reftable_clusters = (uint32_t)tclusters;
    qcow2_reftable_bound(s);
    r = qcow2_update_refcount(bs, old_off, old_clusters << s->cluster_bits, -1);
out:
    free(nt);
    free(blk);
    return r;
}

/* Make sure refcount block rti exists.  Returns 1 if a block was created
 * (allocation decisions made before must be redone), 0 if it existed. */
static int ensure_block(struct bdev *bs, uint64_t rti)
{
    struct qcow2_state *s = QS(bs);
    int r;
    if (rti >= s->reftable_entries) {
        r = grow_reftable(bs, rti + 1);
        if (r < 0) return r;
        if (s->reftable[rti] & REFT_OFFSET_MASK) return 1;
    }
    if (s->reftable[rti] & REFT_OFFSET_MASK)
        return 0;
    for (int guard = 0; guard < 64; guard++) {
        uint64_t f;
        r = find_free(bs, 1, &f);
        if (r < 0) return r;
        uint64_t frti = f >> s->rb_bits;
        if (frti >= s->reftable_entries) {
            r = grow_reftable(bs, frti + 1);
            if (r < 0) return r;
            if (s->reftable[rti] & REFT_OFFSET_MASK) return 1;
            continue;
        }
        uint64_t foff = f << s->cluster_bits;
        r = qcow2_check_overlap(bs, foff, s->cluster_size, 0, "new refcount block");
        if (r < 0) return r;
        uint8_t *rb;
        if (!(s->reftable[frti] & REFT_OFFSET_MASK)) {
            /* self-describing block for frti placed at f */
            r = qcow2_cache_get_empty(bs, &s->rb_cache, foff, &rb);
            if (r < 0) return r;
            qcow2_rb_set(s, rb, f & ((1ull << s->rb_bits) - 1), 1);
            qcow2_cache_mark_dirty(&s->rb_cache, rb);
            r = qcow2_cache_writeback(bs, &s->rb_cache);  /* writes + flushes */
            if (r < 0) return r;
            s->reftable[frti] = foff;
            if (frti >= s->reftable_hi) s->reftable_hi = frti + 1;
            r = write_reftable_entry(bs, frti);
            if (r < 0) return r;
            if (frti == rti) return 1;
            continue;
        }
        /* f is described by an existing block: account it there */
        r = get_block(bs, frti, &rb);
        if (r < 0) return r;
        qcow2_rb_set(s, rb, f & ((1ull << s->rb_bits) - 1), 1);
        qcow2_cache_mark_dirty(&s->rb_cache, rb);
        r = qcow2_cache_get_empty(bs, &s->rb_cache, foff, &rb);
        if (r < 0) return r;
        qcow2_cache_mark_dirty(&s->rb_cache, rb);
        r = qcow2_cache_writeback(bs, &s->rb_cache);
        if (r < 0) return r;
        s->reftable[rti] = foff;
        if (rti >= s->reftable_hi) s->reftable_hi = rti + 1;
        r = write_reftable_entry(bs, rti);
        if (r < 0) return r;
        return 1;
    }
    return pms_err(EIO, "could not allocate a refcount block");
}

static int update_one(struct bdev *bs, uint64_t ci, int64_t addend, bool set, uint64_t val)
{
    struct qcow2_state *s = QS(bs);
    uint64_t rti = ci >> s->rb_bits;
    int r = qcow2_lazy_mark_dirty(bs);      /* lazy refcounts: dirty first */
    if (r < 0) return r;
    r = ensure_block(bs, rti);
    if (r < 0) return r;
    uint8_t *rb;
    r = get_block(bs, rti, &rb);
    if (r < 0) return r;
    uint64_t idx = ci & ((1ull << s->rb_bits) - 1);
    uint64_t old = qcow2_rb_get(s, rb, idx), nv;
    if (set)
        nv = val;
    else if (addend < 0) {
        if (old < (uint64_t)-addend)
            return qcow2_signal_corruption(bs, "refcount of cluster %llu would drop below zero",
                                           (unsigned long long)ci);
        nv = old - (uint64_t)-addend;
    } else {
        nv = old + (uint64_t)addend;
        if (nv > s->refcount_max || nv < old)
            return pms_err(ERANGE, "refcount of cluster %llu would overflow %u bits",
                           (unsigned long long)ci, s->refcount_bits);
    }
    if (nv > s->refcount_max)
        return pms_err(ERANGE, "refcount %llu too large", (unsigned long long)nv);
    qcow2_rb_set(s, rb, idx, nv);
    /* the entry's bytes (refcount_bits may be below 8: its byte) */
    qcow2_cache_mark_dirty_range(&s->rb_cache, rb, idx * s->refcount_bits / 8,
                                 s->refcount_bits >= 8 ? s->refcount_bits / 8 : 1);
    if (nv == 0) {
        if (ci < s->free_cluster_index) s->free_cluster_index = ci;
        if (s->free_byte_offset >> s->cluster_bits == ci)
            s->free_byte_offset = 0;    /* the cluster may be reused whole */
        qcow2_cache_discard(&s->l2_cache, ci << s->cluster_bits);
        qcow2_cache_discard(&s->rb_cache, ci << s->cluster_bits);
    }
    return 0;
}

int qcow2_update_refcount(struct bdev *bs, uint64_t off, uint64_t len, int64_t addend)
{
    struct qcow2_state *s = QS(bs);
    if (len == 0 || addend == 0) return 0;
    uint64_t first = off >> s->cluster_bits, last = (off + len - 1) >> s->cluster_bits;
    for (uint64_t ci = first; ci <= last; ci++) {
        int r = update_one(bs, ci, addend, false, 0);
        if (r < 0) return r;
    }
    return 0;
}

int qcow2_set_refcount(struct bdev *bs, uint64_t ci, uint64_t rc)
{
    return update_one(bs, ci, 0, true, rc);
}

/* at0: QEMU's wording when the allocation landed on the header cluster
 * (a damaged refcount block says it is free), NULL for the generic check */
static int64_t alloc_clusters(struct bdev *bs, uint64_t n, const char *at0)
{
    struct qcow2_state *s = QS(bs);
    bool drained = false;
    for (int guard = 0; guard < 1000; guard++) {
        uint64_t start;
        int r = find_free(bs, n, &start);
        if (r < 0) return r;
        if (s->npending && s->pending_frees && !drained && !s->hold_frees) {
            /* Clusters released since the last flush (discard, COW) are
             * free for QEMU at once; ours wait for the flush that makes
             * their L2 change durable.  Rather than grow the file past them,
             * flush now and take them, so the image is laid out as QEMU
             * lays it out (one flush per discard-then-grow cycle).  Not
             * when no release can free anything (pending_frees): each
             * copy-on-write of a cluster an internal snapshot shares queues
             * one, and draining before every allocation cost two file
             * flushes per write (FUSE write-back of 160 scattered 64 KiB
             * runs: 331 fdatasyncs, 115 ms). */
            int64_t flen = bdev_file_length(bs->file);
            if (flen < 0) return (int)flen;
            if (start + n > qc_size_to_clusters(s, (uint64_t)flen)) {
                drained = true;
                r = qcow2_drain_pending(bs);
                if (r < 0) return r;
                continue;
            }
        }
        int64_t off = (int64_t)(start << s->cluster_bits);
        bool again = false;
        for (uint64_t b = start >> s->rb_bits; !again && b <= (start + n - 1) >> s->rb_bits; b++) {
            /* As QEMU's alloc_refcount_block: a missing block goes to the
             * first free cluster after the range just found, and the search
             * restarts (finding that range again, now described). */
            uint64_t hint = s->free_cluster_index;
            s->free_cluster_index = start + n;
            r = ensure_block(bs, b);
            if (hint < s->free_cluster_index) s->free_cluster_index = hint;
            if (r < 0) return r;
            if (r > 0) again = true;
        }
        if (again) continue;
        if (off == 0 && at0)
            return qcow2_signal_corruption(bs, "%s", at0);
        r = qcow2_check_overlap(bs, (uint64_t)off, n << s->cluster_bits, 0, "new cluster");
        if (r < 0) return r;
        r = qcow2_update_refcount(bs, (uint64_t)off, n << s->cluster_bits, 1);
        if (r < 0) return r;
        if (start == s->free_cluster_index) s->free_cluster_index = start + n;
        return off;
    }
    return pms_err(EIO, "cluster allocation did not converge");
}

int64_t qcow2_alloc_clusters(struct bdev *bs, uint64_t n)
{
    return alloc_clusters(bs, n, NULL);
}

int64_t qcow2_alloc_l2(struct bdev *bs)
{
    int64_t off = alloc_clusters(bs, 1, "Preventing invalid allocation of L2 table at offset 0");
    if (off >= 0 && qcow2_defer_refcounts(QS(bs))) {
        /* as QEMU's l2_allocate: a new table's refcount is written even
         * with lazy refcounts */
        int r = qcow2_cache_writeback(bs, &QS(bs)->rb_cache);
        if (r < 0) return r;
    }
    return off;
}

int64_t qcow2_alloc_bytes(struct bdev *bs, uint64_t size)
{
    struct qcow2_state *s = QS(bs);
    uint64_t cs = s->cluster_size;
    if (size == 0 || size > cs)
        return pms_err(EINVAL, "compressed allocation of %llu bytes", (unsigned long long)size);
    uint64_t off = s->free_byte_offset;
    int r;
    if (off) {
        uint64_t rc;
        r = qcow2_get_refcount(bs, off >> s->cluster_bits, &rc);
        if (r < 0) return r;
        if (rc == 0 || rc == s->refcount_max)
            off = 0;                    /* freed meanwhile, or no reference left */
    }
    uint64_t free_in = off ? cs - qc_off_in_cluster(s, off) : 0;
    if (off && free_in >= size) {
        r = qcow2_update_refcount(bs, off, size, 1);
        if (r < 0) return r;
    } else {
        /* a fresh cluster (refcount 1); when it directly follows the
         * partly used one, the data may start in that one and run on */
        int64_t nc = qcow2_alloc_clusters(bs, 1);
        if (nc < 0) return nc;
        if (off && ((off + cs - 1) & ~(cs - 1)) == (uint64_t)nc) {
            r = qcow2_update_refcount(bs, off, 1, 1);
            if (r < 0) return r;
        } else
            off = (uint64_t)nc;
    }
    s->free_byte_offset = qc_off_in_cluster(s, off + size) ? off + size : 0;
    return (int64_t)off;
}

int qcow2_free_clusters(struct bdev *bs, uint64_t off, uint64_t len)
{
    return qcow2_update_refcount(bs, off, len, -1);
}

/* Check every L2 table and data reference reachable from l1 before a
 * snapshot operation modifies anything, so that a hostile image is refused
 * without a single write. */
int qcow2_validate_tree(struct bdev *bs, const uint64_t *l1, uint32_t l1_size)
{
    struct qcow2_state *s = QS(bs);
    int64_t flen = bdev_file_length(bs->file);
    if (flen < 0) return (int)flen;
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2off = l1[i] & L1E_OFFSET_MASK;
        if (!l2off) continue;
        if (qc_off_in_cluster(s, l2off) || l2off >= (uint64_t)flen)
            return qcow2_signal_corruption(bs, "L1 entry %u points to invalid offset %llu", i,
                                           (unsigned long long)l2off);
        int r = qcow2_check_host_range(bs, l2off, s->cluster_size, "L2 table");
        if (r < 0) return r;
        uint8_t *l2;
        r = qcow2_cache_get(bs, &s->l2_cache, l2off, &l2);
        if (r < 0) return r;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t e = qcow2_l2_get(s, l2, j);
            enum qcow2_ctype t = qcow2_entry_type(s, e);
            uint64_t off, len;
            if (t == QC_COMPRESSED) {
                /* byte-granular: check the sectors it spans */
                qcow2_compressed_range(s, e, &off, &len);
                len += off & 511;
                off &= ~511ull;
            }
            else if (t == QC_NORMAL || t == QC_ZERO_ALLOC) {
                off = e & L2E_OFFSET_MASK;
                len = s->cluster_size;
                if (qc_off_in_cluster(s, off))
                    return qcow2_signal_corruption(bs, "unaligned data cluster offset %llu",
                                                   (unsigned long long)off);
            } else
                continue;
            if (off >= (uint64_t)flen)
                return qcow2_signal_corruption(bs, "cluster at offset %llu is beyond the end "
                                               "of the file", (unsigned long long)off);
            r = qcow2_check_host_range(bs, off, len, "data cluster");
            if (r < 0) return r;
        }
    }
    return 0;
}

int qcow2_update_snapshot_refcount(struct bdev *bs, uint64_t *l1, uint32_t l1_size, int addend)
{
    int vr = qcow2_validate_tree(bs, l1, l1_size);
    if (vr < 0) return vr;
    struct qcow2_state *s = QS(bs);
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2off = l1[i] & L1E_OFFSET_MASK;
        if (!l2off) continue;
        int r = qcow2_check_host_range(bs, l2off, s->cluster_size, "L2 table");
        if (r < 0) return r;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint8_t *l2;
            r = qcow2_cache_get(bs, &s->l2_cache, l2off, &l2);
            if (r < 0) return r;
            uint64_t e = qcow2_l2_get(s, l2, j), ne = e;
            uint64_t rc = 0;
            switch (qcow2_entry_type(s, e)) {
            case QC_COMPRESSED: {
                uint64_t coff, csize;
                qcow2_compressed_range(s, e, &coff, &csize);
                r = qcow2_update_refcount(bs, coff, csize, addend);
                if (r < 0) return r;
                continue;
            }
            case QC_NORMAL:
            case QC_ZERO_ALLOC: {
                uint64_t hoff = e & L2E_OFFSET_MASK;
                if (addend) {
                    r = qcow2_update_refcount(bs, hoff, 1, addend);
                    if (r < 0) return r;
                }
                r = qcow2_get_refcount(bs, hoff >> s->cluster_bits, &rc);
                if (r < 0) return r;
                break;
            }
            default:
                continue;
            }
            ne = rc == 1 ? (e | QCOW_OFLAG_COPIED) : (e & ~QCOW_OFLAG_COPIED);
            if (ne != e) {
                r = qcow2_cache_get(bs, &s->l2_cache, l2off, &l2);
                if (r < 0) return r;
                qcow2_l2_set(s, l2, j, ne);
                qcow2_cache_mark_dirty(&s->l2_cache, l2);
            }
        }
        if (addend) {
            int r2 = qcow2_update_refcount(bs, l2off, 1, addend);
            if (r2 < 0) return r2;
        }
        uint64_t rc;
        r = qcow2_get_refcount(bs, l2off >> s->cluster_bits, &rc);
        if (r < 0) return r;
        l1[i] = rc == 1 ? (l1[i] | QCOW_OFLAG_COPIED) : (l1[i] & ~QCOW_OFLAG_COPIED);
        if (rc == 0) l1[i] = 0;   /* table freed (only when dropping an L1) */
    }
    return 0;
}
