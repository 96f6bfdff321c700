/* qcow2 consistency check and repair (the meaning of `qemu-img check`).
 *
 * The check rebuilds, in memory, the refcount every host cluster should have
 * by walking everything that references clusters: the header cluster, the
 * active L1 table and each snapshot's L1 table, every L2 table they reach
 * (once per reference, as QEMU counts: an L2 table shared by two L1 tables
 * expects refcount 2 and so does every data cluster in it), data clusters
 * (normal, zero with an offset, and every host cluster a compressed range
 * touches), the snapshot table, the refcount table and the refcount blocks.
 * It then compares with the refcounts stored in the image: stored < expected
 * is a corruption, stored > expected a leak.  Last, the COPIED flags of the
 * active L1 and L2 entries are compared with the (possibly repaired)
 * refcounts.  Messages use qemu-img's wording (without a trailing newline)
 * and go to the caller's callback.
 *
 * Hostile images: every table read is bounded by the format limits, reads
 * past the end of the file return zeroes (as QEMU's do), references ending a
 * cluster or more past the end of the file are reported and not counted, the
 * in-memory refcount array is sized by the file length (at most INT_MAX
 * clusters, as QEMU, and no more than half the physical memory), and the
 * total number of L1/L2 entries examined is capped so that an image whose
 * tables all point at each other cannot keep us busy for long (the check
 * then fails with EFBIG); at most 10000 messages reach the callback.
 *
 * Repair: PMS_CHECK_REPAIR_LEAKS sets leaked refcounts down to the computed
 * value; PMS_CHECK_REPAIR_ALL additionally raises refcounts that are too low
 * (in place, as QEMU, unless a stored refcount is 0 or the refcount
 * structure itself is damaged: then, as QEMU, the whole structure is rebuilt
 * and placed where QEMU places it), fixes COPIED flags and turns unaligned
 * preallocated zero clusters into plain zero clusters.  Stored refcounts are
 * read straight from the refcount blocks after the metadata caches have been
 * flushed; repairs go through qcow2_set_refcount() and the caches.
 * Not done (QEMU does): growing the file for a refcount block past its end
 * (we rebuild instead), repairing the snapshot table, clearing the dirty and
 * corrupt bits after a clean repair.
 *
 * Threads: called with bs->lock held (see qcow2.h).
 */
#include <endian.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "qcow2.h"
#include "../../util/error.h"

/* Upper bound of L1 + L2 entries examined in one check (each L2 table is
 * walked once per reference, as QEMU does).  2^27 entries is 1 GiB of tables
 * read, i.e. 8 TiB of guest data summed over the active image and all
 * snapshots with 64 KiB clusters (a few seconds); an image whose L1 entries
 * all point at the same full L2 table would otherwise need up to
 * 2^22 * 2^18 entries. */
#define CHECK_WORK_LIMIT (1ull << 27)

/* Messages passed to the callback at most (a hostile image can produce one
 * per table entry); the counters are not limited. */
#define CHECK_MSG_LIMIT 10000

#define REFT_RESERVED_MASK 0x1ffull
/* the part of PMS_CHECK_REPAIR_ALL beyond leaks */
#define FIX_ERRORS (PMS_CHECK_REPAIR_ALL & ~PMS_CHECK_REPAIR_LEAKS)

struct ck {
    struct bdev *bs;
    struct qcow2_state *s;
    struct pms_check_result *res;
    pms_check_msg_fn fn;
    void *opaque;
    unsigned flags;

    uint64_t file_len;
    uint32_t *rc;                /* expected refcounts */
    uint64_t nb;                 /* clusters covered by rc (file clusters, maybe +1) */
    uint64_t cap;                /* allocated entries of rc */
    uint64_t rc_limit;           /* saturation value: min(refcount_max, UINT32_MAX) */

    uint64_t work;               /* entries examined so far */
    uint64_t nmsg;               /* messages sent to fn */
    bool changed;                /* a repair went through the caches */
    bool rebuild;                /* refcount structure needs a rebuild (QEMU's sense) */
    bool rebuild_hard;           /* ... and it cannot be fixed in place */

    /* one refcount block read straight from the file */
    uint8_t *rb;
    uint64_t rb_index;           /* reftable index held in rb, UINT64_MAX = none */

    uint8_t *tbl;                /* cluster-sized scratch for L2 tables */
};

static void msg(struct ck *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void msg(struct ck *c, const char *fmt, ...)
{
    if (!c->fn || c->nmsg > CHECK_MSG_LIMIT)
        return;
    if (c->nmsg++ == CHECK_MSG_LIMIT) {
        c->fn(c->opaque, "Too many problems found; further messages are suppressed "
              "(the counts stay exact)");
        return;
    }
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    c->fn(c->opaque, buf);
}

/* Read [off, off+len) of the image file; bytes past its end read as zeroes. */
static int read_file(struct ck *c, void *buf, uint64_t len, uint64_t off)
{
    uint64_t avail = 0;
    if (off < c->file_len)
        avail = c->file_len - off < len ? c->file_len - off : len;
    if (avail) {
        int r = bdev_file_pread(c->bs->file, buf, avail, off);
        if (r < 0)
            return r;
    }
    if (avail < len)
        memset((uint8_t *)buf + avail, 0, len - avail);
    return 0;
}

static int charge(struct ck *c, uint64_t entries)
{
    c->work += entries;
    if (c->work > CHECK_WORK_LIMIT) {
        msg(c, "ERROR: too many table references (more than %llu entries to "
            "examine); check aborted", (unsigned long long)CHECK_WORK_LIMIT);
        c->res->check_errors++;
        return pms_err(EFBIG, "qcow2 check: image references too many tables "
                       "(more than %llu entries)", (unsigned long long)CHECK_WORK_LIMIT);
    }
    return 0;
}

/* Count one reference to every cluster touched by [off, off+size). */
static int inc_refs(struct ck *c, uint64_t off, uint64_t size)
{
    struct qcow2_state *s = c->s;
    if (size == 0)
        return 0;
    uint64_t end = off + size;
    if (end < off || (end > c->file_len && end - c->file_len >= s->cluster_size)) {
        msg(c, "ERROR: counting reference for region exceeding the end of the "
            "file by one cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64,
            off, size);
        c->res->corruptions++;
        return 0;
    }
    uint64_t first = off >> s->cluster_bits, last = (end - 1) >> s->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (k >= c->cap) {
            uint64_t ncap = k + 1;
            uint32_t *n = realloc(c->rc, ncap * sizeof *n);
            if (!n) {
                c->res->check_errors++;
                return pms_err(ENOMEM, "qcow2 check: out of memory");
            }
            memset(n + c->cap, 0, (ncap - c->cap) * sizeof *n);
            c->rc = n;
            c->cap = ncap;
        }
        if (k >= c->nb)
            c->nb = k + 1;
        if (c->rc[k] >= c->rc_limit) {
            msg(c, "ERROR: overflow cluster offset=0x%" PRIx64,
                k << s->cluster_bits);
            msg(c, "Use qemu-img amend to increase the refcount entry width or "
                "qemu-img convert to create a clean copy if the image cannot be "
                "opened for writing");
            c->res->corruptions++;
            continue;
        }
        c->rc[k]++;
    }
    return 0;
}

/* Repair: turn L2 entry idx of the table at l2_off into a plain zero cluster
 * (with extended L2: its allocated subclusters become zero ones), through the
 * L2 cache after checking the table is a place we may write to. */
static int zero_l2_entry(struct ck *c, uint64_t l2_off, uint64_t idx)
{
    struct qcow2_state *s = c->s;
    uint8_t *l2;
    int r = qc_off_in_cluster(s, l2_off)
        ? pms_err(EIO, "L2 table offset %#" PRIx64 " unaligned", l2_off)
        : qcow2_check_host_range(c->bs, l2_off, s->cluster_size, "L2 table");
    if (r == 0)
        r = qcow2_cache_get(c->bs, &s->l2_cache, l2_off, &l2);
    if (r < 0) {
        msg(c, "ERROR: Overlap check failed");
        c->res->check_errors++;
        return r;
    }
    if (s->ext_l2) {
        uint64_t bm = qcow2_l2_get_bitmap(s, l2, idx);
        bm = (bm | (bm << 32)) & 0xffffffff00000000ull;
        qcow2_l2_set_bitmap(s, l2, idx, bm);
        qcow2_l2_set(s, l2, idx, 0);
    } else {
        qcow2_l2_set(s, l2, idx, QCOW_OFLAG_ZERO);
    }
    qcow2_cache_mark_dirty(&s->l2_cache, l2);
    c->changed = true;
    return 0;
}

static int check_l2(struct ck *c, uint64_t l2_off, bool active)
{
    struct qcow2_state *s = c->s;
    struct pms_check_result *res = c->res;
    uint64_t next_contiguous = 0;
    int r = charge(c, s->l2_entries);
    if (r < 0)
        return r;
    r = read_file(c, c->tbl, s->cluster_size, l2_off);
    if (r < 0) {
        msg(c, "ERROR: I/O error in check_refcounts_l2");
        res->check_errors++;
        return r;
    }
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        uint64_t e = qcow2_l2_get(s, c->tbl, i);
        uint64_t bitmap = s->ext_l2 ? qcow2_l2_get_bitmap(s, c->tbl, i) : 0;
        enum qcow2_ctype t = qcow2_entry_type(s, e);

        if (t != QC_COMPRESSED && (e & L2E_STD_RESERVED_MASK)) {
            msg(c, "ERROR found l2 entry with reserved bits set: %" PRIx64, e);
            res->corruptions++;
        }
        switch (t) {
        case QC_COMPRESSED: {
            if (e & QCOW_OFLAG_COPIED) {
                msg(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be "
                    "set for compressed clusters", e & s->coffset_mask);
                e &= ~QCOW_OFLAG_COPIED;
                res->corruptions++;
            }
            if (bitmap) {
                msg(c, "ERROR compressed cluster %d with non-zero subcluster "
                    "allocation bitmap, entry=0x%" PRIx64, (int)i, e);
                res->corruptions++;
                break;
            }
            uint64_t coff, csize;
            qcow2_compressed_range(s, e, &coff, &csize);
            r = inc_refs(c, coff, csize);
            if (r < 0)
                return r;
            if (active) {
                res->allocated_clusters++;
                res->compressed_clusters++;
                /* compressed clusters are fragmented by nature (QEMU) */
                res->fragmented_clusters++;
            }
            break;
        }
        case QC_ZERO_ALLOC:
        case QC_NORMAL: {
            uint64_t off = e & L2E_OFFSET_MASK;
            if ((bitmap >> 32) & bitmap) {
                res->corruptions++;
                msg(c, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted "
                    "subcluster allocation bitmap", off);
            }
            if (qc_off_in_cluster(s, off)) {
                bool has_data = s->ext_l2 ? (bitmap & 0xffffffffull) != 0
                                          : t == QC_NORMAL;
                res->corruptions++;
                if (!has_data) {
                    bool fix = c->flags & FIX_ERRORS;
                    msg(c, "%s offset=%" PRIx64 ": Preallocated cluster is not "
                        "properly aligned; L2 entry corrupted.", fix ? "Repairing" : "ERROR",
                        off);
                    if (fix) {
                        r = zero_l2_entry(c, l2_off, i);
                        if (r < 0)
                            return r;
                        res->corruptions--;
                        res->corruptions_fixed++;
                        continue;       /* the cluster is not referenced any more */
                    }
                } else
                    msg(c, "ERROR offset=%" PRIx64 ": Data cluster is not properly "
                        "aligned; L2 entry corrupted.", off);
            }
            if (active) {
                res->allocated_clusters++;
                if (next_contiguous && off != next_contiguous)
                    res->fragmented_clusters++;
                next_contiguous = off + s->cluster_size;
            }
            r = inc_refs(c, off, s->cluster_size);
            if (r < 0)
                return r;
            break;
        }
        case QC_ZERO_PLAIN:
            break;
        case QC_UNALLOCATED:
            if (bitmap & 0xffffffffull) {
                res->corruptions++;
                msg(c, "ERROR: Unallocated cluster has non-zero subcluster "
                    "allocation map");
            }
            break;
        }
    }
    return 0;
}

static int check_l1(struct ck *c, uint64_t l1_off, uint32_t l1_size, bool active)
{
    struct qcow2_state *s = c->s;
    if (l1_size == 0)
        return 0;
    uint64_t bytes = (uint64_t)l1_size * 8;
    int r = inc_refs(c, l1_off, bytes);
    if (r < 0)
        return r;
    r = charge(c, l1_size);
    if (r < 0)
        return r;
    uint64_t *l1 = malloc(bytes);
    if (!l1) {
        c->res->check_errors++;
        return pms_err(ENOMEM, "qcow2 check: out of memory for an L1 table of %u entries",
                       l1_size);
    }
    r = read_file(c, l1, bytes, l1_off);
    if (r < 0) {
        msg(c, "ERROR: I/O error in check_refcounts_l1");
        c->res->check_errors++;
        free(l1);
        return r;
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t e = be64toh(l1[i]);
        uint64_t l2_off = e & L1E_OFFSET_MASK;
        if (!e)                 /* as QEMU: flags alone make offset 0 a table */
            continue;
        if (e & L1E_RESERVED_MASK) {
            msg(c, "ERROR found L1 entry with reserved bits set: %" PRIx64, e);
            c->res->corruptions++;
        }
        r = inc_refs(c, l2_off, s->cluster_size);
        if (r < 0)
            break;
        if (qc_off_in_cluster(s, l2_off)) {
            msg(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; "
                "L1 entry corrupted", l2_off);
            c->res->corruptions++;
        }
        r = check_l2(c, l2_off, active);
        if (r < 0)
            break;
    }
    free(l1);
    return r;
}

/* Refcount blocks: sanity of each reftable entry, and one reference each. */
static int check_refblocks(struct ck *c)
{
    struct qcow2_state *s = c->s;
    uint64_t file_clusters = qc_size_to_clusters(s, c->file_len);
    for (uint64_t i = 0; i < s->reftable_entries; i++) {
        uint64_t e = s->reftable[i];
        uint64_t off = e & REFT_OFFSET_MASK;
        uint64_t cl = off >> s->cluster_bits;
        if (e & REFT_RESERVED_MASK) {
            msg(c, "ERROR refcount table entry %" PRIu64 " has reserved bits set", i);
            c->res->corruptions++;
            c->rebuild = c->rebuild_hard = true;
            continue;
        }
        if (qc_off_in_cluster(s, off)) {
            msg(c, "ERROR refcount block %" PRIu64 " is not cluster aligned; "
                "refcount table entry corrupted", i);
            c->res->corruptions++;
            c->rebuild = c->rebuild_hard = true;
            continue;
        }
        if (cl >= file_clusters) {
            msg(c, "ERROR refcount block %" PRIu64 " is outside image", i);
            c->res->corruptions++;
            c->rebuild = c->rebuild_hard = true;
            continue;
        }
        if (off) {
            int r = inc_refs(c, off, s->cluster_size);
            if (r < 0)
                return r;
            if (c->rc[cl] != 1) {
                msg(c, "ERROR refcount block %" PRIu64 " refcount=%" PRIu32, i, c->rc[cl]);
                c->res->corruptions++;
                c->rebuild = c->rebuild_hard = true;
            }
        }
    }
    return 0;
}

/* Persistent dirty bitmaps (autoclear bit set): the directory, each bitmap
 * table and the data clusters they point at are references too (QEMU counts
 * them the same way).  A malformed directory is skipped: QEMU reports those
 * through its bitmap code, not as refcount problems. */
static int check_bitmaps(struct ck *c)
{
    struct qcow2_state *s = c->s;
    if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    const struct qcow2_ext *ext = NULL;
    for (int i = 0; i < s->nb_exts; i++)
        if (s->exts[i].type == QCOW2_EXT_BITMAPS) ext = &s->exts[i];
    if (!ext || ext->len < 24)
        return 0;
    uint32_t nb; uint64_t dsize, doff;
    memcpy(&nb, ext->data, 4); memcpy(&dsize, ext->data + 8, 8); memcpy(&doff, ext->data + 16, 8);
    nb = be32toh(nb); dsize = be64toh(dsize); doff = be64toh(doff);
    if (nb == 0 || nb > 65535 || dsize < 24 || dsize > (64u << 20) || qc_off_in_cluster(s, doff))
        return 0;
    uint8_t *dir = malloc(dsize);
    uint64_t *tbl = NULL;
    if (!dir) return pms_err(ENOMEM, "out of memory");
    int r = read_file(c, dir, dsize, doff);
    if (r == 0) r = inc_refs(c, doff, dsize);
    uint64_t pos = 0;
    for (uint32_t i = 0; r == 0 && i < nb && pos + 24 <= dsize; i++) {
        uint64_t toff; uint32_t tsize, extra; uint16_t nlen;
        memcpy(&toff, dir + pos, 8); memcpy(&tsize, dir + pos + 8, 4);
        memcpy(&nlen, dir + pos + 18, 2); memcpy(&extra, dir + pos + 20, 4);
        toff = be64toh(toff); tsize = be32toh(tsize);
        pos = (pos + 24 + (uint64_t)be32toh(extra) + be16toh(nlen) + 7) & ~7ull;
        if (!toff || qc_off_in_cluster(s, toff) || (uint64_t)tsize * 8 > (64u << 20))
            continue;
        r = charge(c, tsize);
        if (r == 0) r = inc_refs(c, toff, (uint64_t)tsize * 8);
        free(tbl);
        tbl = malloc((uint64_t)tsize * 8 + 8);
        if (r == 0 && !tbl) r = pms_err(ENOMEM, "out of memory");
        if (r == 0) r = read_file(c, tbl, (uint64_t)tsize * 8, toff);
        for (uint32_t j = 0; r == 0 && j < tsize; j++) {
            uint64_t off = be64toh(tbl[j]) & L2E_OFFSET_MASK;
            if (off && !qc_off_in_cluster(s, off))
                r = inc_refs(c, off, s->cluster_size);
        }
    }
    free(tbl);
    free(dir);
    return r;
}

static int calculate_refcounts(struct ck *c)
{
    struct qcow2_state *s = c->s;
    int r = inc_refs(c, 0, s->cluster_size);             /* header */
    if (r < 0)
        return r;
    if ((uint64_t)s->l1_size > QCOW2_MAX_L1_BYTES / 8) {   /* open refuses these */
        msg(c, "ERROR active L1 table l1_size=%#" PRIx32 " is too large", s->l1_size);
        c->res->corruptions++;
    } else {
        r = check_l1(c, s->l1_offset, s->l1_size, true);
        if (r < 0)
            return r;
    }
    for (int i = 0; i < s->nb_snaps; i++) {
        struct qcow2_snapshot *sn = &s->snaps[i];
        const char *id = sn->id_str ? sn->id_str : "";
        const char *name = sn->name ? sn->name : "";
        if (qc_off_in_cluster(s, sn->l1_table_offset)) {
            msg(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is not "
                "cluster aligned; snapshot table entry corrupted", id, name,
                sn->l1_table_offset);
            c->res->corruptions++;
            continue;
        }
        if ((uint64_t)sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
            msg(c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is too "
                "large; snapshot table entry corrupted", id, name, sn->l1_size);
            c->res->corruptions++;
            continue;
        }
        r = check_l1(c, sn->l1_table_offset, sn->l1_size, false);
        if (r < 0)
            return r;
    }
    r = inc_refs(c, s->snapshots_offset, s->snapshots_size);
    if (r < 0)
        return r;
    r = check_bitmaps(c);
    if (r < 0)
        return r;
    r = inc_refs(c, s->reftable_offset, s->reftable_entries * 8);
    if (r < 0)
        return r;
    return check_refblocks(c);
}

/* Is the refcount block covering cluster k present and sound (so that its
 * entries can be changed in place without allocating anything)? */
static bool refblock_sound(struct ck *c, uint64_t k)
{
    struct qcow2_state *s = c->s;
    uint64_t idx = k >> s->rb_bits;
    if (idx >= s->reftable_entries)
        return false;
    uint64_t e = s->reftable[idx];
    uint64_t off = e & REFT_OFFSET_MASK;
    return off && !(e & REFT_RESERVED_MASK) && !qc_off_in_cluster(s, off) &&
           off < c->file_len && c->file_len - off >= s->cluster_size;
}

/* Stored refcount of cluster k, read straight from its refcount block. */
static int stored_refcount(struct ck *c, uint64_t k, uint64_t *rc)
{
    struct qcow2_state *s = c->s;
    uint64_t idx = k >> s->rb_bits;
    *rc = 0;
    if (idx >= s->reftable_entries)
        return 0;
    uint64_t off = s->reftable[idx] & REFT_OFFSET_MASK;
    if (!off)
        return 0;
    if (qc_off_in_cluster(s, off) || off > (uint64_t)INT64_MAX - s->cluster_size)
        return -EIO;             /* as QEMU: unaligned or unreadable refcount block */
    if (c->rb_index != idx) {
        c->rb_index = UINT64_MAX;
        int r = read_file(c, c->rb, s->cluster_size, off);
        if (r < 0)
            return r;
        c->rb_index = idx;
    }
    *rc = qcow2_rb_get(s, c->rb, k & ((1ull << s->rb_bits) - 1));
    return 0;
}

static int flush_meta(struct ck *c)
{
    c->rb_index = UINT64_MAX;
    int r = qcow2_flush_metadata(c->bs);
    if (r < 0) {
        msg(c, "ERROR: could not write back metadata: %s", pms_err_get());
        c->res->check_errors++;
    }
    return r;
}

/* Compare computed and stored refcounts; repair per fix (0 = report only). */
static int compare_refcounts(struct ck *c, unsigned fix, uint64_t *highest, bool *changed)
{
    struct qcow2_state *s = c->s;
    struct pms_check_result *res = c->res;
    *highest = 0;
    for (uint64_t i = 0; i < c->nb; i++) {
        uint64_t rc1, rc2 = c->rc[i];
        int r = stored_refcount(c, i, &rc1);
        if (r < 0) {
            msg(c, "Can't get refcount for cluster %" PRIu64 ": %s", i, strerror(-r));
            res->check_errors++;
            continue;
        }
        if (rc1 > 0 || rc2 > 0)
            *highest = i;
        if (rc1 == rc2)
            continue;
        uint64_t *fixed = NULL;
        if (rc1 == 0) {
            c->rebuild = true;
            if (!refblock_sound(c, i))
                c->rebuild_hard = true;
        }
        if (rc1 > rc2 && (fix & PMS_CHECK_REPAIR_LEAKS))
            fixed = &res->leaks_fixed;
        else if (rc1 < rc2 && (fix & FIX_ERRORS) &&
                 refblock_sound(c, i))
            fixed = &res->corruptions_fixed;
        msg(c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
            fixed ? "Repairing" : rc1 < rc2 ? "ERROR" : "Leaked", i, rc1, rc2);
        if (fixed) {
            r = qcow2_set_refcount(c->bs, i, rc2);
            if (r >= 0) {
                (*fixed)++;
                *changed = true;
                continue;
            }
            msg(c, "ERROR: could not update refcount of cluster %" PRIu64 ": %s",
                i, pms_err_get());
        }
        if (rc1 < rc2)
            res->corruptions++;
        else
            res->leaks++;
    }
    (void)s;
    return 0;
}

/* COPIED flags of the active L1 and its L2 tables. */
static int check_oflag_copied(struct ck *c, bool *changed)
{
    struct qcow2_state *s = c->s;
    struct pms_check_result *res = c->res;
    bool repair;
    if (c->flags & FIX_ERRORS)
        repair = true;
    else if (c->flags & PMS_CHECK_REPAIR_LEAKS)
        repair = !res->check_errors && !res->corruptions && !res->leaks;
    else
        repair = false;

    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l1e = s->l1[i];
        uint64_t l2_off = l1e & L1E_OFFSET_MASK;
        uint64_t rc;
        if (!l2_off)
            continue;
        int r = stored_refcount(c, l2_off >> s->cluster_bits, &rc);
        if (r < 0)
            continue;
        if ((rc == 1) != ((l1e & QCOW_OFLAG_COPIED) != 0)) {
            res->corruptions++;
            msg(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64
                " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", i, l1e, rc);
            if (repair) {
                s->l1[i] = rc == 1 ? l1e | QCOW_OFLAG_COPIED : l1e & ~QCOW_OFLAG_COPIED;
                r = qcow2_write_l1(c->bs, i, 1);
                if (r < 0) {
                    s->l1[i] = l1e;
                    msg(c, "ERROR: Could not write L1 table: %s", pms_err_get());
                    res->check_errors++;
                    return r;
                }
                res->corruptions--;
                res->corruptions_fixed++;
                *changed = true;
            }
        }

        r = read_file(c, c->tbl, s->cluster_size, l2_off);
        if (r < 0) {
            msg(c, "ERROR: Could not read L2 table: %s", strerror(-r));
            res->check_errors++;
            return r;
        }
        /* entries to flip, collected first: the L2 cache is only touched to
         * write, after the table was validated as a place we may write to */
        bool dirty = false;
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t e = qcow2_l2_get(s, c->tbl, j);
            enum qcow2_ctype t = qcow2_entry_type(s, e);
            if (t != QC_NORMAL && t != QC_ZERO_ALLOC)
                continue;
            r = stored_refcount(c, (e & L2E_OFFSET_MASK) >> s->cluster_bits, &rc);
            if (r < 0)
                continue;
            if ((rc == 1) != ((e & QCOW_OFLAG_COPIED) != 0)) {
                res->corruptions++;
                msg(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64
                    " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", e, rc);
                if (repair) {
                    qcow2_l2_set(s, c->tbl, j, rc == 1 ? e | QCOW_OFLAG_COPIED
                                                       : e & ~QCOW_OFLAG_COPIED);
                    dirty = true;
                }
            }
        }
        if (dirty) {
            /* count what we are about to fix */
            uint64_t nfix = 0;
            uint8_t *l2;
            r = qc_off_in_cluster(s, l2_off) ? pms_err(EIO, "L2 table offset %#" PRIx64
                                                       " unaligned", l2_off)
                : qcow2_check_host_range(c->bs, l2_off, s->cluster_size, "L2 table");
            if (r < 0) {
                msg(c, "ERROR: Could not write L2 table; metadata overlap check "
                    "failed: %s", pms_err_get());
                res->check_errors++;
                return r;
            }
            r = qcow2_cache_get(c->bs, &s->l2_cache, l2_off, &l2);
            if (r < 0) {
                msg(c, "ERROR: Could not write L2 table: %s", pms_err_get());
                res->check_errors++;
                return r;
            }
            for (uint64_t j = 0; j < s->l2_entries; j++) {
                uint64_t want = qcow2_l2_get(s, c->tbl, j);
                if (qcow2_l2_get(s, l2, j) != want) {
                    qcow2_l2_set(s, l2, j, want);
                    nfix++;
                }
            }
            qcow2_cache_mark_dirty(&s->l2_cache, l2);
            res->corruptions -= nfix <= res->corruptions ? nfix : res->corruptions;
            res->corruptions_fixed += nfix;
            *changed = true;
        }
    }
    return 0;
}

/* Make room for clusters [0, n) in the refcount array. */
static int grow_rc(struct ck *c, uint64_t n)
{
    if (n <= c->cap)
        return 0;
    uint32_t *p = realloc(c->rc, n * sizeof *p);
    if (!p) {
        c->res->check_errors++;
        return pms_err(ENOMEM, "qcow2 check: out of memory");
    }
    memset(p + c->cap, 0, (n - c->cap) * sizeof *p);
    c->rc = p;
    c->cap = n;
    return 0;
}

/* QEMU's alloc_clusters_imrt: the first run of n clusters free in the
 * computed refcounts at or after *first_free (which moves to the first gap
 * seen), the array growing past the end of the image when there is none;
 * the run is marked used.  Returns its offset or -errno. */
static int64_t imrt_alloc(struct ck *c, uint64_t n, uint64_t *first_free)
{
    uint64_t k = *first_free, run = 0;
    bool first_gap = true;
    for (; k < c->nb && run < n; k++) {
        if (!c->rc[k]) {
            run++;
            if (first_gap) {
                *first_free = k;
                first_gap = false;
            }
        } else
            run = 0;
    }
    if (run < n) {
        uint64_t need = k + n - run;
        int r = grow_rc(c, need + 1);
        if (r < 0)
            return r;
        if (need > c->nb)
            c->nb = need;
    }
    k -= run;
    for (uint64_t i = 0; i < n; i++)
        c->rc[k + i] = 1;
    return (int64_t)(k << c->s->cluster_bits);
}

/* QEMU's rebuild_refcounts_write_refblocks: every refcount block describing
 * a used cluster of [first, end) gets a place (imrt_alloc, never below the
 * block being written) and is written from the computed refcounts.
 * Returns 1 when the table (*rt, *entries, host order) had to grow, 0 if
 * not, or -errno. */
static int write_refblocks(struct ck *c, uint64_t first, uint64_t end, uint64_t **rt,
                           uint64_t *entries)
{
    struct qcow2_state *s = c->s;
    uint64_t cs = s->cluster_size, per_rb = 1ull << s->rb_bits, ff = 0;
    int grown = 0;
    for (uint64_t k = first; k < end; k++) {
        if (k >= c->nb || !c->rc[k])
            continue;
        uint64_t idx = k >> s->rb_bits, start = idx << s->rb_bits, off;
        if (idx < *entries && (*rt)[idx])
            off = (*rt)[idx];
        else {
            if (ff < start)
                ff = start;
            int64_t o = imrt_alloc(c, 1, &ff);
            if (o < 0)
                return (int)o;
            off = (uint64_t)o;
            if ((off >> s->cluster_bits) >= end)
                end = (off >> s->cluster_bits) + 1;
            if (*entries <= idx) {
                uint64_t ne = ((idx + 1) * 8 + cs - 1) / cs * cs / 8;
                if (ne * 8 > QCOW2_MAX_REFTABLE_BYTES)
                    return pms_err(EFBIG, "qcow2 check: rebuilt refcount table would be "
                                   "too large");
                uint64_t *p = realloc(*rt, ne * 8);
                if (!p)
                    return pms_err(ENOMEM, "qcow2 check: out of memory");
                memset(p + *entries, 0, (ne - *entries) * 8);
                *rt = p;
                *entries = ne;
                grown = 1;
            }
            (*rt)[idx] = off;
        }
        memset(c->rb, 0, cs);
        for (uint64_t i = 0; i < per_rb && start + i < c->nb; i++)
            if (c->rc[start + i])
                qcow2_rb_set(s, c->rb, i, c->rc[start + i]);
        int r = bdev_file_pwrite(c->bs->file, c->rb, cs, off);
        if (r < 0)
            return r;
        k = start + per_rb - 1;         /* this block is done */
    }
    return grown;
}

/* Replace the refcount structure by one built from the computed refcounts,
 * placed as QEMU's rebuild_refcount_structure places it (so the image
 * matches theirs): refcount blocks in the first clusters the computed
 * refcounts leave free, then the table, repeated until the table stops
 * growing.  Clusters in use (old structure included: it is counted) are
 * never overwritten; everything is flushed before the header points at the
 * new table (one 12-byte write).  The old table and blocks become leaks,
 * which the caller repairs. */
static int rebuild_refcounts(struct ck *c)
{
    struct qcow2_state *s = c->s;
    uint64_t cs = s->cluster_size;
    if (qc_size_to_clusters(s, c->file_len) > c->nb) {
        uint64_t fc = qc_size_to_clusters(s, c->file_len);
        int r = grow_rc(c, fc + 1);
        if (r < 0)
            return r;
        c->nb = fc;
    }
    uint64_t *rt = NULL, entries = 0, nrt = 0;
    int64_t rt_off = -1;
    int r = write_refblocks(c, 0, c->nb, &rt, &entries);
    while (r > 0) {
        nrt = (entries * 8 + cs - 1) / cs;
        uint64_t ff = 0;
        rt_off = imrt_alloc(c, nrt, &ff);
        if (rt_off < 0) {
            r = (int)rt_off;
            break;
        }
        uint64_t rs = (uint64_t)rt_off >> s->cluster_bits;
        r = write_refblocks(c, rs, rs + nrt, &rt, &entries);
    }
    c->rb_index = UINT64_MAX;
    if (r == 0 && rt_off < 0)
        r = pms_err(EIO, "qcow2 check: nothing to rebuild a refcount table for");
    if (r < 0 || nrt > UINT32_MAX) {
        free(rt);
        return r < 0 ? r : pms_err(EFBIG, "qcow2 check: rebuilt refcount table would be "
                                   "too large");
    }
    uint64_t rt_entries = nrt * cs / 8;      /* == entries: whole clusters */
    uint64_t *be = calloc(rt_entries, 8);
    if (!be) {
        free(rt);
        return pms_err(ENOMEM, "qcow2 check: out of memory");
    }
    for (uint64_t i = 0; i < entries && i < rt_entries; i++)
        be[i] = htobe64(rt[i]);
    r = bdev_file_pwrite(c->bs->file, be, nrt * cs, (uint64_t)rt_off);
    free(be);
    if (r == 0)
        r = bdev_file_flush(c->bs->file);
    if (r == 0) {
        uint8_t hdr[12];
        uint64_t be_off = htobe64((uint64_t)rt_off);
        uint32_t be_n = htobe32((uint32_t)nrt);
        memcpy(hdr, &be_off, 8);
        memcpy(hdr + 8, &be_n, 4);
        r = bdev_file_pwrite(c->bs->file, hdr, sizeof hdr, 48);
        if (r == 0)
            r = bdev_file_flush(c->bs->file);
    }
    if (r < 0) {
        free(rt);
        return r;
    }
    uint64_t *rt_host = rt;
    if (entries < rt_entries) {
        rt_host = realloc(rt, rt_entries * 8);
        if (!rt_host) {
            free(rt);
            return pms_err(ENOMEM, "qcow2 check: out of memory");
        }
        memset(rt_host + entries, 0, (rt_entries - entries) * 8);
    }
    /* the driver now works on the new structure */
    for (int i = 0; i < s->rb_cache.n; i++)
        if (s->rb_cache.e[i].offset)
            qcow2_cache_discard(&s->rb_cache, s->rb_cache.e[i].offset);
    free(s->reftable);
    s->reftable = rt_host;
    s->reftable_offset = (uint64_t)rt_off;
    s->reftable_clusters = (uint32_t)nrt;
    s->reftable_entries = rt_entries;
    qcow2_reftable_bound(s);
    s->free_cluster_index = 0;
    int64_t len = bdev_file_length(c->bs->file);
    if (len < 0)
        return (int)len;
    c->file_len = (uint64_t)len;
    return 0;
}

static uint64_t phys_mem(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || psz <= 0)
        return UINT64_MAX;
    return (uint64_t)pages * (uint64_t)psz;
}

int qcow2_check(struct bdev *bs, unsigned flags, struct pms_check_result *res,
                pms_check_msg_fn fn, void *opaque)
{
    struct qcow2_state *s = QS(bs);
    struct ck c = {
        .bs = bs, .s = s, .res = res, .fn = fn, .opaque = opaque, .flags = flags,
        .rb_index = UINT64_MAX,
    };
    int r = 0;
    bool changed = false;

    if (flags && (!s->writable || bs->readonly))
        return pms_err(EROFS, "cannot repair a read-only image");
    if (s->writable) {
        /* the stored refcounts are read from the file: none held back
         * (lazy refcounts) from here on */
        s->accurate_refcounts = true;
        /* reference releases still pending would read as leaks */
        r = qcow2_drain_pending(bs);
        if (r == 0)
            r = qcow2_flush_metadata(bs);
        if (r < 0) {
            res->check_errors++;
            return r;
        }
    }

    int64_t len = bdev_file_length(bs->file);
    if (len < 0) {
        res->check_errors++;
        return (int)len;
    }
    c.file_len = (uint64_t)len;
    c.nb = qc_size_to_clusters(s, c.file_len);
    if (c.nb > INT_MAX) {
        res->check_errors++;
        return pms_err(EFBIG, "qcow2 check: image file has %" PRIu64 " clusters, "
                       "more than the %d a check can handle", c.nb, INT_MAX);
    }
    if ((c.nb + 1) * sizeof *c.rc > phys_mem() / 2) {
        res->check_errors++;
        return pms_err(ENOMEM, "qcow2 check: refcount array for %" PRIu64
                       " clusters would not fit in memory", c.nb);
    }
    res->total_clusters = qc_size_to_clusters(s, s->size);
    c.cap = c.nb + 1;
    c.rc = calloc(c.cap, sizeof *c.rc);
    c.rb = malloc(s->cluster_size);
    c.tbl = malloc(s->cluster_size);
    if (!c.rc || !c.rb || !c.tbl) {
        res->check_errors++;
        r = pms_err(ENOMEM, "qcow2 check: out of memory");
        goto out;
    }
    c.rc_limit = s->refcount_max < UINT32_MAX ? s->refcount_max : UINT32_MAX;

    /* version 3 requires the snapshot extra data up to the disk size */
    uint64_t incomplete = 0;
    for (int i = 0; s->version >= 3 && i < s->nb_snaps; i++)
        if (s->snaps[i].extra_data_size < 16) {
            msg(&c, "ERROR snapshot table entry %d is incomplete", i);
            incomplete++;
        }

    r = calculate_refcounts(&c);
    if (r < 0)
        goto out;

    uint64_t highest;
    struct pms_check_result pre = *res;
    compare_refcounts(&c, 0, &highest, &changed);
    if (flags && c.rebuild && (flags & FIX_ERRORS)) {
        /* as QEMU: rebuild, then count again; the old structure's clusters
         * are now leaks, repaired right away */
        struct pms_check_result old = *res;
        if (c.changed) {            /* the walk below reads the tables from the file */
            r = flush_meta(&c);
            if (r < 0)
                goto out;
        }
        msg(&c, "Rebuilding refcount structure");
        r = rebuild_refcounts(&c);
        if (r < 0) {
            msg(&c, "ERROR could not rebuild the refcount structure: %s", pms_err_get());
            res->check_errors++;
            goto out;
        }
        res->corruptions = 0;
        res->leaks = 0;
        res->allocated_clusters = res->fragmented_clusters = res->compressed_clusters = 0;
        c.rebuild = c.rebuild_hard = false;
        c.nb = qc_size_to_clusters(s, c.file_len);
        r = grow_rc(&c, c.nb + 1);
        if (r < 0)
            goto out;
        memset(c.rc, 0, c.cap * sizeof *c.rc);
        c.work = 0;
        r = calculate_refcounts(&c);
        if (r < 0)
            goto out;
        struct pms_check_result saved = *res;
        compare_refcounts(&c, flags & PMS_CHECK_REPAIR_LEAKS, &highest, &changed);
        if (c.rebuild)
            msg(&c, "ERROR rebuilt refcount structure is still broken");
        uint64_t fresh_leaks = res->leaks;
        *res = saved;               /* the old structure's leaks are not reported */
        if (res->corruptions < old.corruptions)
            res->corruptions_fixed += old.corruptions - res->corruptions;
        if (res->leaks < old.leaks)
            res->leaks_fixed += old.leaks - res->leaks;
        res->leaks += fresh_leaks;
        changed = true;
        r = flush_meta(&c);
        if (r < 0)
            goto out;
    } else if (flags) {
        if (c.rebuild && !(flags & FIX_ERRORS)) {
            msg(&c, "ERROR need to rebuild refcount structures");
            res->check_errors++;
            r = pms_err(EIO, "qcow2 check: the refcount structures need to be rebuilt "
                        "(repair all errors)");
            goto out;
        }
        if (res->leaks || res->corruptions) {
            *res = pre;
            compare_refcounts(&c, flags, &highest, &changed);
            if (changed) {
                r = flush_meta(&c);
                if (r < 0)
                    goto out;
            }
        }
    }

    if (c.changed) {                /* check_oflag_copied reads L2 tables from the file */
        r = flush_meta(&c);
        if (r < 0)
            goto out;
        c.changed = false;
    }
    r = check_oflag_copied(&c, &changed);
    if (r < 0)
        goto out;
    if (changed || c.changed) {
        r = flush_meta(&c);
        if (r < 0)
            goto out;
    }
    res->image_end_offset = (highest + 1) << s->cluster_bits;
    r = 0;
    if (incomplete && (flags & FIX_ERRORS) && !res->check_errors) {
        r = qcow2_rewrite_snapshot_table(bs);
        if (r < 0) {
            res->check_errors++;
            goto out;
        }
        res->corruptions_fixed += incomplete;
    } else
        res->corruptions += incomplete;
    /* As QEMU: a repairing check that leaves nothing broken marks the image
     * clean (dirty bit) and consistent (corrupt bit). */
    if (flags && !res->check_errors && !res->corruptions &&
        (s->incompat & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT))) {
        r = bdev_file_flush(bs->file);
        if (r == 0) {
            s->incompat &= ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
            r = qcow2_update_header(bs);
        }
        if (r == 0) r = bdev_file_flush(bs->file);
        if (r < 0) res->check_errors++;
    }

out:
    free(c.rc);
    free(c.rb);
    free(c.tbl);
    return r;
}
