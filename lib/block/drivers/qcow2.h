/* qcow2 driver: in-memory state shared by qcow2*.c.
 *
 * Files: qcow2.c (open, header, I/O paths, create), qcow2-cache.c (L2 and
 * refcount-block caches), qcow2-refcount.c (refcounts and allocation),
 * qcow2-snapshot.c (internal snapshots), qcow2-check.c (check/repair).
 *
 * Threads: every function here is called with bs->lock held (the block core
 * takes it around each driver entry), so the state below needs no locking of
 * its own.  The protocol child (bs->file) is stateless; the backing node has
 * its own lock, taken via bdev_pread().
 *
 * Cluster states (active L1 -> L2 entry):
 *   UNALLOCATED  entry 0: reads from backing (or zero)
 *   ZERO_PLAIN   ZERO flag, no offset: zeroes, nothing allocated
 *   ZERO_ALLOC   ZERO flag with offset: zeroes, cluster kept allocated
 *   NORMAL       offset: data at host offset; COPIED iff refcount == 1
 *   COMPRESSED   compressed bytes at a sector-granular host range
 * With extended L2 each of 32 subclusters is unallocated, zero or allocated.
 *
 * Invariants kept by every write path (crash may leak, never corrupt):
 *  - a refcount increment is durable before any L2/L1 entry or snapshot table
 *    points at the cluster (refcount cache flushed + file flushed before the
 *    L2 cache is written back);
 *  - new data is written before the L2 entry linking it;
 *  - an L2 entry is cleared (durably) before its cluster's refcount drops;
 *  - QCOW_OFLAG_COPIED is set in active L1/L2 entries iff refcount == 1;
 *  - every host offset we follow is checked: aligned, below QCOW2_MAX_HOST_OFFSET,
 *    and not overlapping the header, L1, refcount table or snapshot table.
 */
#ifndef PMS_QCOW2_H
#define PMS_QCOW2_H

#include <stdbool.h>
#include <stdint.h>
#include "../block.h"
#include "qcow2-format.h"

enum qcow2_ctype {
    QC_UNALLOCATED, QC_ZERO_PLAIN, QC_ZERO_ALLOC, QC_NORMAL, QC_COMPRESSED,
};

/* Subcluster state of one guest offset (from qcow2_get_mapping). */
enum qcow2_sctype {
    SC_UNALLOCATED,      /* read from backing / zero */
    SC_ZERO,             /* reads as zeroes */
    SC_DATA,             /* data at host_off */
    SC_COMPRESSED,       /* whole cluster compressed at host_off, csize bytes */
};

struct qcow2_cache_entry {
    uint64_t offset;             /* host offset of the table, 0 = free slot */
    uint8_t *data;               /* cluster_size bytes */
    uint64_t lru;                /* last use tick */
    uint64_t dirty;              /* slices newer than the file (bit i: bytes
                                    [i * slice, (i + 1) * slice)); 0 = clean */
    uint64_t valid;              /* slices read from the file (or zeroed, for a
                                    new table); dirty is always a subset */
    /* While dirty (set at every change; see qcow2_checkpoint_end): */
    uint64_t need_gen;           /* the file's write count at the last change:
                                    the data the table points at is durable once
                                    a flush covered it */
    uint64_t need_epoch;         /* the refcount cache's epoch at the last change:
                                    its refcounts are written once a refcount
                                    write-back covered it */
};

struct qcow2_cache {
    struct qcow2_cache_entry *e;
    int n;
    uint8_t *mem;                /* n * stride bytes, reserved (see qcow2-cache.c);
                                    e[i].data is slot i once used */
    uint64_t stride;             /* bytes per slot: cluster_size, at least a page */
    uint64_t tick;
    bool is_refcount;            /* refcount-block cache (flushed first) */
    uint64_t cluster_size;
    int *slot;                   /* nslot hints: table offset hash -> entry index */
    unsigned nslot;              /* power of two >= 2n */
    int last;                    /* entry returned last (mark_dirty's first guess) */
    uint64_t slice;              /* bytes per dirty bit (see qcow2-cache.c) */
    uint64_t all_slices;         /* mask of every slice of a table */
    uint64_t epoch;              /* count of changes marked (a refcount cache:
                                    every refcount change moves it) */
    const uint64_t *wgen;        /* L2 cache: the file's write count
                                    (struct bdev.wgen), for need_gen */
    const uint64_t *dep_epoch;   /* L2 cache: the refcount cache's epoch */
};

struct qcow2_snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    char *id_str;
    char *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;
    uint64_t icount;             /* UINT64_MAX = unknown */
    uint32_t extra_data_size;    /* as read (>= 24 after we rewrite) */
    uint8_t *extra_unknown;      /* extra data beyond the 24 bytes we know, preserved */
    uint32_t extra_unknown_size;
};

struct qcow2_ext {               /* header extension we preserve verbatim */
    uint32_t type;
    uint32_t len;
    uint8_t *data;
};

struct qcow2_range { uint64_t off, len; };
struct wjob;
struct wpiece;

struct qcow2_state {
    /* geometry */
    int version;
    unsigned cluster_bits;
    uint64_t cluster_size;
    unsigned l2_bits;            /* log2 entries per L2 table */
    uint64_t l2_entries;
    unsigned l2_entry_size;      /* 8, or 16 with extended L2 */
    bool ext_l2;
    uint64_t sc_size;            /* subcluster size (= cluster_size without ext L2) */
    unsigned sc_bits;
    unsigned csize_shift;        /* compressed descriptor: 62 - (cluster_bits - 8) */
    uint64_t csize_mask;
    uint64_t coffset_mask;

    uint64_t size;               /* virtual size */

    /* active L1 (host-endian, entries as on disk incl. flags) */
    uint64_t *l1;
    uint32_t l1_size;
    uint64_t l1_offset;

    /* refcount table (host-endian) */
    uint64_t *reftable;
    uint64_t reftable_entries;   /* refcount_table_clusters * cluster_size / 8 */
    uint64_t reftable_hi;        /* entries at or past it are 0 (bounds the overlap
                                    check's scan: qcow2_reftable_bound) */
    uint64_t reftable_offset;
    uint32_t reftable_clusters;
    unsigned refcount_order;
    unsigned refcount_bits;
    uint64_t refcount_max;
    unsigned rb_bits;            /* log2 refcount entries per refcount block */

    /* header fields we keep */
    uint64_t incompat, compat, autoclear;
    uint64_t autoclear_keep;     /* autoclear bits we keep (bitmaps marked in use) */
    uint32_t header_length;
    uint8_t compression_type;
    char *backing_file;          /* as stored; NULL = none */
    char *backing_format;        /* from extension; NULL = none */
    struct qcow2_ext *exts;      /* unknown extensions, preserved */
    int nb_exts;
    uint8_t *feature_table;      /* feature-name table as read (preserved) */
    uint32_t feature_table_len;

    /* snapshots */
    struct qcow2_snapshot *snaps;
    int nb_snaps;
    uint64_t snapshots_offset;
    uint64_t snapshots_size;     /* bytes of the table on disk */

    struct qcow2_cache l2_cache;
    struct qcow2_cache rb_cache;

    uint64_t free_cluster_index; /* allocation hint: no free cluster below */
    /* Compressed-cluster allocation (QEMU's free_byte_offset): the first
     * unused byte of the host cluster that compressed data was last packed
     * into, 0 = none.  Never cluster aligned while set; reset when that
     * cluster's refcount drops to 0 (it may then be reused whole). */
    uint64_t free_byte_offset;
    bool writable;
    bool header_dirty;           /* cleared on close: dirty bit handling */
    uint8_t *cbuf;               /* cluster-sized scratch for compressed reads */
    uint8_t *zbuf;               /* 2 * cluster_size scratch for decompression input */
    /* write engine (qcow2.c write_batch): reused between requests */
    uint8_t *bbuf;               /* bounce buffer for built clusters */
    size_t bcap;
    struct wjob *bjobs;          /* clusters of the chunk being written */
    size_t bjobs_cap;
    struct wpiece *bpieces;      /* their pieces */
    size_t bpieces_cap;
    /* A length the protocol file is known to reach (it only grows while
     * open, except through our own shrink, which resets it): host offsets
     * below it need no fstat to be checked against the end of the file. */
    uint64_t flen_lb;
    /* references released by the write path, applied after the L2 change
     * that dropped them is durable (drained by flush) */
    struct qcow2_range *pending;
    size_t npending, cappending;
    /* some pending release may take a cluster's refcount to 0 (one of the
     * clusters had refcount <= 1 when it was queued, or it is a compressed
     * range, whose host clusters hold several references): only then is
     * draining worth a metadata flush to reuse the space (alloc_clusters).
     * A copy-on-write of a cluster a snapshot shares releases a reference
     * that frees nothing. */
    bool pending_frees;
    /* Apply the pending releases only at close (qcow2_hold_frees): a
     * node writing a layer that read-only nodes of the same file keep
     * reading (an external-snapshot merge) must not reuse a cluster those
     * nodes' cached tables may still point at. */
    bool hold_frees;
    /* Inside a snapshot operation's dirty bracket (see qcow2-snapshot.c):
     * the image is durably marked dirty, so ordering barriers between
     * metadata writes are not needed; only flushes that make a new table's
     * contents durable before a pointer switch remain. */
    bool relaxed;
    bool prealloc_checked, prealloc;  /* QEMU's metadata-preallocation heuristic */
    bool check_mode;             /* opened for pms_check (pms_open_opts.check) */
    /* Lazy refcounts (compat bit): the dirty bit was set by
     * qcow2_lazy_mark_dirty in this session and a clean close clears it.
     * A snapshot bracket takes the bit over (set_dirty clears this), so a
     * bracket that failed keeps its bit for the repair. */
    bool lazy_dirty;
    /* lazy refcounts in use for this open (compat bit or the open option) */
    bool use_lazy;
    int inject_l2_update;        /* pms_open_opts.inject_l2_update (tests) */
    /* a check ran in this session: refcounts are written at every flush
     * again (qcow2_defer_refcounts) */
    bool accurate_refcounts;
    /* qcow2_open completed: from then on corruption found by an operation is
     * signalled as QEMU does (qcow2_signal_corruption); signalled: once. */
    bool opened, signalled;
    /* active L1 entries changed in memory, not yet written: [lo, hi) */
    uint32_t l1_dirty_lo, l1_dirty_hi;
    bool l1_reserved;            /* the L1 table's clusters have their blocks
                                    (bdev_file_reserve, or written whole) */
};

/* An ordering barrier between metadata writes: a file flush, except inside
 * a dirty bracket, where a crash is repaired on the next open anyway. */
static inline int qcow2_barrier(struct bdev *bs)
{
    return ((struct qcow2_state *)bs->opaque)->relaxed ? 0 : bdev_file_flush(bs->file);
}

static inline struct qcow2_state *QS(struct bdev *bs) { return bs->opaque; }

static inline uint64_t qc_off_in_cluster(struct qcow2_state *s, uint64_t off)
{ return off & (s->cluster_size - 1); }
static inline uint64_t qc_align_down(struct qcow2_state *s, uint64_t off)
{ return off & ~(s->cluster_size - 1); }
static inline uint64_t qc_size_to_clusters(struct qcow2_state *s, uint64_t sz)
{ return (sz + s->cluster_size - 1) >> s->cluster_bits; }

/* Classify a (standard part of an) L2 entry. */
enum qcow2_ctype qcow2_entry_type(struct qcow2_state *s, uint64_t l2e);

/* ---- qcow2-cache.c ------------------------------------------------------ */
int  qcow2_cache_init(struct qcow2_cache *c, int n, uint64_t cluster_size, bool is_refcount);
void qcow2_cache_destroy(struct qcow2_cache *c);
/* Get the table at host offset off (reads it on a miss); the pointer stays
 * valid until the next cache call on the same cache. */
int  qcow2_cache_get(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint8_t **table);
/* The table at off with at least bytes [from, from + len) of it read (the
 * slices holding them): for callers that look at or change one entry.  The
 * rest of *table may be stale; qcow2_cache_get makes it whole. */
int  qcow2_cache_get_part(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint64_t from,
                          uint64_t len, uint8_t **table);
/* Like get, but without reading: the caller fills a fresh table (zeroed). */
int  qcow2_cache_get_empty(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint8_t **table);
/* The whole table changed (every slice is written back). */
void qcow2_cache_mark_dirty(struct qcow2_cache *c, const uint8_t *table);
/* Bytes [off, off+len) of the table changed: only their slices are written
 * back. */
void qcow2_cache_mark_dirty_range(struct qcow2_cache *c, const uint8_t *table, uint64_t off,
                                  uint64_t len);
/* Write back every dirty entry (refcount cache first, with a file flush
 * between, when c is the L2 cache). */
int  qcow2_cache_writeback(struct bdev *bs, struct qcow2_cache *c);
/* Drop an entry without writing (cluster was freed). */
void qcow2_cache_discard(struct qcow2_cache *c, uint64_t off);
/* Write back both caches in dependency order and flush the file. */
int  qcow2_flush_metadata(struct bdev *bs);
/* Background write-back (the driver's checkpoint hooks, bdev_checkpoint):
 * begin writes the dirty refcount blocks without a flush and returns the
 * epoch they cover; end writes the dirty L2 tables whose need_gen the
 * flush between covered and whose need_epoch that write-back did. */
int  qcow2_checkpoint_begin(struct bdev *bs, uint64_t *epoch);
int  qcow2_checkpoint_end(struct bdev *bs, uint64_t gen, uint64_t epoch);

/* ---- qcow2-refcount.c --------------------------------------------------- */
int  qcow2_refcount_init(struct bdev *bs);     /* reads the refcount table */
int  qcow2_get_refcount(struct bdev *bs, uint64_t cluster_index, uint64_t *rc);
/* Add addend (may be negative) to every cluster touched by [off, off+len). */
int  qcow2_update_refcount(struct bdev *bs, uint64_t off, uint64_t len, int64_t addend);
/* Set the refcount of one cluster (used by repair). */
int  qcow2_set_refcount(struct bdev *bs, uint64_t cluster_index, uint64_t rc);
/* Allocate n contiguous clusters with refcount 1; returns host offset or -errno. */
int64_t qcow2_alloc_clusters(struct bdev *bs, uint64_t n);
int64_t qcow2_alloc_l2(struct bdev *bs);     /* one cluster for an L2 table */
/* Allocate size (1..cluster_size) bytes for compressed data, packed after
 * the previous compressed allocation as QEMU's qcow2_alloc_bytes does: every
 * host cluster the range touches gets +1 refcount; the range only runs into
 * a cluster it allocated itself.  Returns the byte offset or -errno. */
int64_t qcow2_alloc_bytes(struct bdev *bs, uint64_t size);
/* Decrease refcount of the clusters of [off, off+len) by one. */
int  qcow2_free_clusters(struct bdev *bs, uint64_t off, uint64_t len);
/* Refcount width helpers on a refcount block buffer. */
uint64_t qcow2_rb_get(struct qcow2_state *s, const uint8_t *rb, uint64_t idx);
void qcow2_rb_set(struct qcow2_state *s, uint8_t *rb, uint64_t idx, uint64_t v);
/* Check every reference reachable from l1 (no writes). */
int  qcow2_validate_tree(struct bdev *bs, const uint64_t *l1, uint32_t l1_size);
/* Walk an L1 table (entries host-endian, of l1_size) adding addend to the
 * refcount of every L2 table and data cluster it reaches, then set/clear
 * COPIED in the L2 tables and (if l1 == s->l1) the L1 itself.  addend 0 only
 * fixes COPIED flags.  l1 is updated in memory; the caller writes it. */
int  qcow2_update_snapshot_refcount(struct bdev *bs, uint64_t *l1, uint32_t l1_size,
                                    int addend);

/* ---- qcow2.c ------------------------------------------------------------ */
/* Is [off, off+len) a valid place for a metadata or data cluster: aligned,
 * inside limits, not overlapping header/L1/reftable/snapshot table? */
int  qcow2_check_host_range(struct bdev *bs, uint64_t off, uint64_t len, const char *what);
/* Recompute reftable_hi after the reftable was replaced or loaded. */
void qcow2_reftable_bound(struct qcow2_state *s);
/* Before writing [off, off+len): qcow2_check_host_range, and not over an
 * active L2 table, a refcount block or a snapshot's L1 table either (QEMU's
 * default overlap check, "cached"), except the kinds in ign (the table
 * being written back is one of its own kind). */
#define QCOW2_OL_ACTIVE_L2 0x1u
#define QCOW2_OL_REFBLOCK  0x2u
int  qcow2_check_overlap(struct bdev *bs, uint64_t off, uint64_t len, unsigned ign,
                         const char *what);
/* Mark the image corrupt (sets the bit when writable), returns -EIO with msg. */
int  qcow2_signal_corruption(struct bdev *bs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Rewrite header cluster (header, extensions, backing name). */
int  qcow2_update_header(struct bdev *bs);
/* Lazy refcounts: before the first refcount change of a writable session
 * on an image with the lazy-refcounts compat bit, durably set the dirty bit
 * (as QEMU does before it defers refcount updates).  No-op otherwise. */
int  qcow2_lazy_mark_dirty(struct bdev *bs);
/* While the lazy dirty bit is set, refcount blocks are written only when
 * evicted, when a new L2 table or refcount block needs them, and at the
 * clean close (QEMU's qcow2_need_accurate_refcounts() false): a flush
 * writes L2 tables and data, not refcounts. */
static inline bool qcow2_defer_refcounts(const struct qcow2_state *s)
{
    return s->lazy_dirty && !s->accurate_refcounts;
}
/* Note that active L1 entry i changed (written by qcow2_flush_metadata). */
void qcow2_l1_mark_dirty(struct qcow2_state *s, uint32_t i);
/* Write the in-memory active L1 entries [first, first+n) to disk. */
int  qcow2_write_l1(struct bdev *bs, uint32_t first, uint32_t n);
/* Grow the active L1 to at least min_size entries (new table, atomically switched). */
int  qcow2_grow_l1(struct bdev *bs, uint32_t min_size);
uint64_t qcow2_l2_get(struct qcow2_state *s, const uint8_t *l2, uint64_t idx);
uint64_t qcow2_l2_get_bitmap(struct qcow2_state *s, const uint8_t *l2, uint64_t idx);
void qcow2_l2_set(struct qcow2_state *s, uint8_t *l2, uint64_t idx, uint64_t v);
void qcow2_l2_set_bitmap(struct qcow2_state *s, uint8_t *l2, uint64_t idx, uint64_t v);
/* Flush metadata, then apply the pending reference releases. */
int  qcow2_drain_pending(struct bdev *bs);
/* From now until close, flushes and allocations leave the pending releases
 * pending (see hold_frees); close applies them. */
void qcow2_hold_frees(struct bdev *bs);
/* Host bytes [coff, coff+csize) of a compressed descriptor. */
void qcow2_compressed_range(struct qcow2_state *s, uint64_t l2e, uint64_t *coff, uint64_t *csize);

/* ---- qcow2-snapshot.c --------------------------------------------------- */
int  qcow2_read_snapshots(struct bdev *bs);
int  qcow2_rewrite_snapshot_table(struct bdev *bs);
void qcow2_free_snapshots(struct qcow2_state *s);
int  qcow2_snapshot_create(struct bdev *bs, const char *name);
int  qcow2_snapshot_goto(struct bdev *bs, const char *name);
int  qcow2_snapshot_delete(struct bdev *bs, const char *name);
int  qcow2_snapshot_list(struct bdev *bs, struct pms_snapshot_info **list, size_t *n);
int  qcow2_snapshot_changed(struct bdev *bs, const char *name, bdev_range_fn fn, void *opaque);

/* ---- qcow2-check.c ------------------------------------------------------ */
int  qcow2_check(struct bdev *bs, unsigned flags, struct pms_check_result *res,
                 pms_check_msg_fn fn, void *opaque);

/* ---- create (qcow2.c) --------------------------------------------------- */
int  qcow2_create(const char *path, uint64_t size, const struct pms_create_opts *o);
/* Deepest backing chain we open (backing files below the top image): every
 * layer holds a descriptor and a few KiB of stack while the chain opens
 * (recursively), and external snapshots make one layer per snapshot (100
 * snapshots: 101 images); lib/block/extsnap.c refuses to go deeper.  The
 * public name is the one tools check against. */
#define QCOW2_MAX_CHAIN_DEPTH PMS_MAX_BACKING_DEPTH
/* L2 cache of a read-only backing node (bytes): the default (the whole
 * image, up to 32 MiB) per node made a chain's metadata grow with its
 * depth -- 20 layers of a 1 TiB image held 640 MiB of tables beside a
 * 1 GiB memory cap.  Reads through a chain go to the one layer that holds
 * the data (the chain map), and a layer image of a GiB or so needs a few
 * tables; 4 MiB is 64 tables of 64 KiB, 16 GiB of an extended-L2 layer. */
#define QCOW2_BACKING_L2_CACHE (4u << 20)

#endif
