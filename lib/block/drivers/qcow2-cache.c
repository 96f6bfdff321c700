/* qcow2 metadata caches: L2 tables and refcount blocks.
 *
 * A cache holds n cluster-sized tables keyed by host offset, LRU-evicted.
 * Entry states: free (offset 0), clean (equals disk), dirty (newer than disk).
 * Write-back order (the crash-safety rule "refcount before the pointer"):
 * before any dirty L2 table is written, every dirty refcount block is written
 * and the file flushed, so an L2 entry never reaches the disk pointing at a
 * cluster whose refcount increment is not durable.  Data clusters are written
 * straight to the file before their L2 entry is updated in the cache, and the
 * same file flush makes them durable first.
 * Evicting a dirty L2 table writes back every dirty table behind the one
 * ordering flush it needs, so a working set larger than the cache costs one
 * flush per cache-full of dirty tables, not one per eviction.
 * Dirty state is kept per slice of a table (SLICE_MIN bytes, or 1/64 of the
 * cluster when that is larger: at most 64 slices, one bit each), and write
 * back writes only the dirty slices, one write per run of them: a random
 * workload changes one 8- or 16-byte entry of each table it touches, and
 * writing whole 64 KiB tables for it was 16 times the metadata I/O (QEMU
 * gets the same from l2-cache-entry-size).  The cache still holds and reads
 * whole tables.  A slice is written whole, so the file never holds half of
 * an entry's change; the order rule below is per table, as before.
 * Entries' buffers are slots of one anonymous mapping reserved at init and
 * touched on first use, so a cache sized for a large image costs memory only
 * as tables are touched, each use is charged to the block layer's metadata
 * memory (bdev_meta_charge: a memory cap counts it), and destroying the
 * cache gives the memory back to the system at once (heap buffers of the
 * caches of short-lived layer nodes stayed in malloc's arenas: a 64 GiB
 * image under a 256 MiB cap with a snapshot every second peaked 90 MiB over
 * the cap).  Huge pages are refused on it, or one touched table would make
 * 2 MiB resident.  A hash of the table offset
 * finds an entry without scanning (a miss scans for the LRU victim).
 * Background write-back (qcow2_checkpoint_begin/_end, from bdev_checkpoint):
 * the same rule without the flush under the lock.  Each change of a table
 * records the file's write count (need_gen) and the refcount cache's epoch
 * (need_epoch) at that moment; callers change a table only after the data
 * and refcounts it points at were written, so those two cover them.  Begin
 * writes every dirty refcount block (epoch E), the file is flushed with no
 * lock held (covering write count G), and end writes only the tables with
 * need_gen <= G and need_epoch <= E: a table changed meanwhile waits for
 * the next checkpoint or flush.  need_gen alone covers every change that
 * follows a data write (the write moves the count); need_epoch covers an
 * allocation with no data write behind it.  mem-powerfail cuts power at
 * random points of this with the fault-injecting driver (a checkpoint that
 * ignored need_gen corrupted the image at once).
 * Threads: called with bs->lock held (see qcow2.h); no locking here.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "qcow2.h"
#include "../../util/error.h"

/* Smallest dirty-tracking unit: a page, what a file write costs anyway. */
#define SLICE_MIN 4096u
/* Alignment of a table's buffer: a page, as O_DIRECT reads into it need
 * (tables smaller than a page, 512 B to 2 KiB clusters, take a page each). */
#define SLOT_ALIGN 4096u

int qcow2_cache_init(struct qcow2_cache *c, int n, uint64_t cluster_size, bool is_refcount)
{
    memset(c, 0, sizeof *c);
    if (n < 4) n = 4;
    c->nslot = 8;
    while (c->nslot < 2u * (unsigned)n) c->nslot *= 2;
    c->e = calloc((size_t)n, sizeof *c->e);
    c->slot = malloc(c->nslot * sizeof *c->slot);
    c->stride = cluster_size < SLOT_ALIGN ? SLOT_ALIGN : cluster_size;
    c->mem = mmap(NULL, (size_t)n * c->stride, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (c->mem == MAP_FAILED) c->mem = NULL;
    if (!c->e || !c->slot || !c->mem) {
        free(c->e);
        free(c->slot);
        if (c->mem) munmap(c->mem, (size_t)n * c->stride);
        c->e = NULL;
        c->slot = NULL;
        c->mem = NULL;
        return pms_err(ENOMEM, "out of memory for the metadata cache");
    }
    madvise(c->mem, (size_t)n * c->stride, MADV_NOHUGEPAGE);   /* advisory */
    for (unsigned i = 0; i < c->nslot; i++) c->slot[i] = -1;
    c->n = n;
    c->is_refcount = is_refcount;
    c->cluster_size = cluster_size;
    c->slice = cluster_size <= SLICE_MIN ? cluster_size
             : cluster_size / 64 > SLICE_MIN ? cluster_size / 64 : SLICE_MIN;
    uint64_t ns = cluster_size / c->slice;
    c->all_slices = ns >= 64 ? ~0ull : (1ull << ns) - 1;
    return 0;
}

void qcow2_cache_destroy(struct qcow2_cache *c)
{
    if (!c->e) return;
    int used = 0;
    for (int i = 0; i < c->n; i++)
        used += c->e[i].data != NULL;
    munmap(c->mem, (size_t)c->n * c->stride);
    bdev_meta_charge(-(int64_t)used * (int64_t)c->stride);
    c->mem = NULL;
    free(c->e);
    free(c->slot);
    c->e = NULL;
    c->slot = NULL;
    c->n = 0;
}

/* Before a dirty L2 table reaches the file, everything it may point at must
 * be durable: its refcounts (written back here) and the data written since
 * the last flush (the barrier flushes exactly when something was written,
 * refcount blocks evicted earlier included). */
static int order_before_l2(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_defer_refcounts(s) ? 0 : qcow2_cache_writeback(bs, &s->rb_cache);
    if (r == 0) r = qcow2_barrier(bs);
    return r;
}

static int write_entry(struct bdev *bs, struct qcow2_cache *c, struct qcow2_cache_entry *e,
                       bool ordered)
{
    struct qcow2_state *s = QS(bs);
    if (!e->dirty)
        return 0;
    if (!c->is_refcount && !ordered) {
        int r = order_before_l2(bs);
        if (r < 0) return r;
    }
    if (!c->is_refcount && s->inject_l2_update)   /* QEMU's l2_update event (tests) */
        return pms_err(s->inject_l2_update, "injected error on an L2 table update");
    int ro = qcow2_check_overlap(bs, e->offset, c->cluster_size,
                                 c->is_refcount ? QCOW2_OL_REFBLOCK : QCOW2_OL_ACTIVE_L2,
                                 c->is_refcount ? "refcount block" : "L2 table");
    if (ro < 0)
        return ro;
    /* one write per run of dirty slices */
    uint64_t d = e->dirty;
    while (d) {
        unsigned a = (unsigned)__builtin_ctzll(d), b = a;
        while (b < 64 && (d >> b) & 1)
            b++;
        int r = bdev_file_pwrite(bs->file, e->data + (uint64_t)a * c->slice,
                                 (uint64_t)(b - a) * c->slice, e->offset + (uint64_t)a * c->slice);
        if (r < 0)
            return r;
        uint64_t run = b >= 64 ? ~0ull << a : ((1ull << b) - 1) & ~((1ull << a) - 1);
        e->dirty &= ~run;
        d &= ~run;
    }
    return 0;
}

int qcow2_cache_writeback(struct bdev *bs, struct qcow2_cache *c)
{
    bool any = false, ordered = false;
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].dirty) {
            if (!c->is_refcount && !ordered) {
                int r = order_before_l2(bs);      /* once for the whole batch */
                if (r < 0) return r;
                ordered = true;
            }
            int r = write_entry(bs, c, &c->e[i], ordered);
            if (r < 0) return r;
            any = true;
        }
    }
    if (any && c->is_refcount)
        return qcow2_barrier(bs);
    return 0;
}

static unsigned hslot(const struct qcow2_cache *c, uint64_t off)
{
    uint64_t h = (off / c->cluster_size) * 0x9e3779b97f4a7c15ull;
    return (unsigned)(h >> 40) & (c->nslot - 1);
}

/* Read the slices of want that e does not hold yet, one read per run. */
static int fill_slices(struct bdev *bs, struct qcow2_cache *c, struct qcow2_cache_entry *e,
                       uint64_t want)
{
    uint64_t need = want & ~e->valid;
    while (need) {
        unsigned a = (unsigned)__builtin_ctzll(need), b = a;
        while (b < 64 && (need >> b) & 1)
            b++;
        uint8_t *dst = e->data + (uint64_t)a * c->slice;
        uint64_t at = e->offset + (uint64_t)a * c->slice, len = (uint64_t)(b - a) * c->slice;
        /* Slices in a hole of the file read as zeroes without a read: a
         * table is written a dirty slice at a time, so most of a sparse
         * layer's tables is holes, and reading them made the page cache
         * allocate and read ahead zero pages (a delete's walk of a layer
         * at scale: 3,000 tables) */
        uint64_t z = bdev_file_zero_prefix(bs->file, at, len) / c->slice;
        if (z) {
            memset(dst, 0, z * c->slice);
            b = a + (unsigned)z;
        } else {
            int r = bdev_file_pread(bs->file, dst, len, at);
            if (r < 0)
                return r;
        }
        uint64_t run = b >= 64 ? ~0ull << a : ((1ull << b) - 1) & ~((1ull << a) - 1);
        e->valid |= run;
        need &= ~run;
    }
    return 0;
}

/* Slices covering bytes [from, from + len) of a table. */
static uint64_t slices_of(const struct qcow2_cache *c, uint64_t from, uint64_t len)
{
    if (len == 0 || from + len > c->cluster_size)
        return c->all_slices;
    uint64_t a = from / c->slice, b = (from + len - 1) / c->slice;
    return (b >= 63 ? ~0ull : (1ull << (b + 1)) - 1) & ~((1ull << a) - 1) & c->all_slices;
}

/* want: slices to have read; 0 = a new table (all zeroes, nothing read). */
static int hit(struct bdev *bs, struct qcow2_cache *c, int i, uint64_t want, uint8_t **table)
{
    struct qcow2_cache_entry *e = &c->e[i];
    e->lru = ++c->tick;
    c->last = i;
    *table = e->data;
    if (!want) {
        memset(e->data, 0, QS(bs)->cluster_size);
        e->valid = c->all_slices;
        return 0;
    }
    return fill_slices(bs, c, e, want);
}

static int lookup(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint64_t want,
                  uint8_t **table)
{
    struct qcow2_state *s = QS(bs);
    unsigned h = hslot(c, off);
    int k = c->slot[h];
    if (off && k >= 0 && c->e[k].offset == off)
        return hit(bs, c, k, want, table);
    int victim = -1;
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].offset == off && off) {
            c->slot[h] = i;
            return hit(bs, c, i, want, table);
        }
        if (victim < 0 || c->e[i].offset == 0 ||
            (c->e[victim].offset != 0 && c->e[i].lru < c->e[victim].lru))
            if (victim < 0 || c->e[victim].offset != 0)
                victim = i;
    }
    struct qcow2_cache_entry *e = &c->e[victim];
    /* A dirty L2 victim costs an ordering flush: write every dirty table
     * behind that one flush, so the next evictions find clean tables (a
     * random workload spanning more tables than the cache holds flushed
     * once per eviction: 4 KiB clusters, 2,531 pages over 512 tables of a
     * 1 GiB image with a snapshot made 251 fdatasyncs) */
    int r = e->dirty && !c->is_refcount ? qcow2_cache_writeback(bs, c)
                                        : write_entry(bs, c, e, false);
    if (r < 0)
        return r;
    e->offset = 0;
    if (!e->data) {
        e->data = c->mem + (size_t)(e - c->e) * c->stride;
        bdev_meta_charge((int64_t)c->stride);
    }
    e->valid = 0;
    if (want) {
        e->offset = off;
        r = fill_slices(bs, c, e, want);
        if (r < 0) {
            e->offset = 0;
            e->valid = 0;
            return r;
        }
    } else {
        memset(e->data, 0, s->cluster_size);
        e->valid = c->all_slices;
    }
    e->offset = off;
    e->lru = ++c->tick;
    c->slot[h] = victim;
    c->last = victim;
    *table = e->data;
    return 0;
}

int qcow2_cache_get(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint8_t **table)
{
    return lookup(bs, c, off, c->all_slices, table);
}

int qcow2_cache_get_part(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint64_t from,
                         uint64_t len, uint8_t **table)
{
    return lookup(bs, c, off, slices_of(c, from, len), table);
}

int qcow2_cache_get_empty(struct bdev *bs, struct qcow2_cache *c, uint64_t off, uint8_t **table)
{
    return lookup(bs, c, off, 0, table);
}

/* Only slices that were read can be dirty: a slice never read holds
 * nothing a caller may have changed (it got the table with
 * qcow2_cache_get_part for other slices), and writing it would put stale
 * bytes in the file. */
static void mark(struct qcow2_cache *c, const uint8_t *table, uint64_t mask)
{
    struct qcow2_cache_entry *e = NULL;
    if (c->last < c->n && c->e[c->last].data == table)
        e = &c->e[c->last];
    for (int i = 0; !e && i < c->n; i++)
        if (c->e[i].data == table)
            e = &c->e[i];
    if (!e)
        return;
    e->dirty |= mask & e->valid;
    c->epoch++;
    /* callers change a table after the data and refcounts it points at
     * were written (to the file, to the refcount cache): what it depends
     * on is what exists now */
    if (c->wgen)
        e->need_gen = __atomic_load_n(c->wgen, __ATOMIC_ACQUIRE);
    if (c->dep_epoch)
        e->need_epoch = *c->dep_epoch;
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, const uint8_t *table)
{
    mark(c, table, c->all_slices);
}

void qcow2_cache_mark_dirty_range(struct qcow2_cache *c, const uint8_t *table, uint64_t off,
                                  uint64_t len)
{
    if (len == 0)
        return;
    if (off + len > c->cluster_size) {      /* a caller's bug: stay correct */
        mark(c, table, c->all_slices);
        return;
    }
    mark(c, table, slices_of(c, off, len));
}

void qcow2_cache_discard(struct qcow2_cache *c, uint64_t off)
{
    for (int i = 0; i < c->n; i++)
        if (c->e[i].offset == off) {
            c->e[i].offset = 0;
            c->e[i].dirty = 0;
            c->e[i].valid = 0;
            c->e[i].lru = 0;
        }
}

int qcow2_checkpoint_begin(struct bdev *bs, uint64_t *epoch)
{
    struct qcow2_state *s = QS(bs);
    *epoch = s->rb_cache.epoch;
    if (qcow2_defer_refcounts(s)) {
        /* refcounts are rebuilt on open after a crash (lazy refcounts,
         * dirty bracket): L2 tables need only their data durable */
        *epoch = UINT64_MAX;
        return 0;
    }
    for (int i = 0; i < s->rb_cache.n; i++) {
        int r = write_entry(bs, &s->rb_cache, &s->rb_cache.e[i], true);
        if (r < 0) return r;
    }
    return 0;
}

int qcow2_checkpoint_end(struct bdev *bs, uint64_t gen, uint64_t epoch)
{
    struct qcow2_state *s = QS(bs);
    struct qcow2_cache *c = &s->l2_cache;
    for (int i = 0; i < c->n; i++) {
        struct qcow2_cache_entry *e = &c->e[i];
        if (!e->dirty || e->need_gen > gen || e->need_epoch > epoch)
            continue;                 /* changed after what the flush covered */
        int r = write_entry(bs, c, e, true);
        if (r < 0) return r;
    }
    return 0;
}

int qcow2_flush_metadata(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_defer_refcounts(s) ? 0 : qcow2_cache_writeback(bs, &s->rb_cache);
    if (r < 0) return r;
    r = qcow2_cache_writeback(bs, &s->l2_cache);
    if (r < 0) return r;
    if (s->l1_dirty_hi > s->l1_dirty_lo) {
        /* Deferred L1 entries point at tables just written: those must be
         * durable first, even inside a dirty bracket (qcow2_barrier is a
         * no-op there): a repair rebuilds refcounts, never a lost table. */
        r = bdev_file_flush(bs->file);
        if (r == 0) r = qcow2_write_l1(bs, s->l1_dirty_lo, s->l1_dirty_hi - s->l1_dirty_lo);
        if (r < 0) return r;
    }
    return qcow2_barrier(bs);
}
