/* Block core: opening graphs, probing, request checks, locking.
 *
 * Invariants (checked here, so drivers may rely on them):
 *  - every request handed to a driver lies inside [0, size) with no
 *    arithmetic overflow, and len > 0;
 *  - no write-type request reaches a read-only node;
 *  - a format node's driver is entered with bs->lock held, so at most one
 *    request is inside a given format driver at a time (requests are
 *    serialised in arrival order; overlapping requests therefore never
 *    interleave).
 * Threads: any.  See block.h for the lock order.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "block.h"
#include "extsnap.h"
#include "../mem/mem-int.h"
#include "../util/error.h"

static _Atomic int64_t meta_bytes;     /* see bdev_meta_charge */

void bdev_meta_charge(int64_t bytes)
{
    atomic_fetch_add_explicit(&meta_bytes, bytes, memory_order_relaxed);
}

uint64_t bdev_meta_bytes(void)
{
    int64_t v = atomic_load_explicit(&meta_bytes, memory_order_relaxed);
    return v > 0 ? (uint64_t)v : 0;
}

static const struct pms_driver *format_drivers[] = { &pms_drv_qcow2, &pms_drv_raw };

static struct bdev *bdev_new(const struct pms_driver *drv, const char *name)
{
    struct bdev *bs = calloc(1, sizeof *bs);
    if (!bs)
        return NULL;
    bs->drv = drv;
    bs->filename = strdup(name ? name : "");
    if (drv->state_size)
        bs->opaque = calloc(1, drv->state_size);
    if (!bs->filename || (drv->state_size && !bs->opaque)) {
        free(bs->filename);
        free(bs->opaque);
        free(bs);
        return NULL;
    }
    pthread_mutex_init(&bs->lock, NULL);
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&bs->snap_lock, &a);
    pthread_mutexattr_destroy(&a);
    return bs;
}

static void drop_chain_map(struct bdev *bs)
{
    if (bs->chain_map && bs->chain_map_free)
        bs->chain_map_free(bs->chain_map);
    bs->chain_map = NULL;
    bs->chain_map_free = NULL;
}

static void bdev_free(struct bdev *bs)
{
    drop_chain_map(bs);
    pthread_mutex_destroy(&bs->lock);
    pthread_mutex_destroy(&bs->snap_lock);
    free(bs->filename);
    free(bs->opaque);
    free(bs);
}

int bdev_open_protocol(const char *path, const struct pms_open_opts *o, bool readonly,
                       struct bdev **bsp)
{
    const struct pms_driver *drv = (o && o->fault_spec) ? &pms_drv_faulty : &pms_drv_file;
    struct bdev *bs = bdev_new(drv, path);
    if (!bs)
        return pms_err(ENOMEM, "out of memory");
    bs->readonly = readonly;
    bs->cache_mode = o ? o->cache_mode : 0;
    int r = drv->open(bs, path, o);
    if (r < 0) {
        bdev_free(bs);
        return r;
    }
    int64_t len = drv->getlength(bs);
    bs->size = len < 0 ? 0 : (uint64_t)len;
    *bsp = bs;
    return 0;
}

const char *bdev_probe(struct bdev *file)
{
    uint8_t buf[512];
    memset(buf, 0, sizeof buf);
    int64_t len = bdev_file_length(file);
    uint64_t n = len < 0 ? 0 : (len < (int64_t)sizeof buf ? (uint64_t)len : sizeof buf);
    if (n && bdev_file_pread(file, buf, n, 0) < 0)
        return "raw";
    for (size_t i = 0; i < sizeof format_drivers / sizeof *format_drivers; i++)
        if (format_drivers[i]->probe && format_drivers[i]->probe(buf, n) > 0)
            return format_drivers[i]->name;
    return "raw";
}

int bdev_open(const char *path, const struct pms_open_opts *o, struct bdev **bsp)
{
    struct pms_open_opts def;
    if (!o) {
        pms_open_opts_init(&def);
        o = &def;
    }
    if (!path || !*path)
        return pms_err(EINVAL, "no file name given");
    const struct pms_driver *drv = NULL;
    if (o->format) {
        for (size_t i = 0; i < sizeof format_drivers / sizeof *format_drivers; i++)
            if (strcmp(format_drivers[i]->name, o->format) == 0)
                drv = format_drivers[i];
        if (!drv)
            return pms_err(EINVAL, "unknown image format '%s' (known: qcow2, raw)", o->format);
    }
    struct bdev *file;
    int r = bdev_open_protocol(path, o, o->readonly, &file);
    if (r < 0)
        return r;
    if (!drv) {
        const char *fmt = bdev_probe(file);
        drv = strcmp(fmt, "qcow2") == 0 ? &pms_drv_qcow2 : &pms_drv_raw;
    }
    struct bdev *bs = bdev_new(drv, path);
    if (!bs) {
        bdev_close(file);
        return pms_err(ENOMEM, "out of memory");
    }
    bs->file = file;
    bs->readonly = o->readonly;
    bs->check_only = o->check != 0;
    bs->cache_mode = o->cache_mode;
    r = drv->open(bs, path, o);
    if (r < 0) {
        bdev_close(file);
        bdev_free(bs);
        return r;
    }
    int64_t len = drv->getlength(bs);
    if (len < 0) {
        drv->close(bs);
        bdev_close(bs->file);
        if (bs->backing) bdev_close(bs->backing);
        bdev_free(bs);
        return (int)len;
    }
    bs->size = (uint64_t)len;
    /* leftovers of an interrupted external snapshot (see extsnap.c) */
    if (!o->readonly && !o->no_backing && !o->check && drv == &pms_drv_qcow2)
        bdev_extsnap_recover(bs);
    *bsp = bs;
    return 0;
}

void bdev_swap_state(struct bdev *a, struct bdev *b)
{
#define SWAP(f) do { __typeof__(a->f) t_ = a->f; a->f = b->f; b->f = t_; } while (0)
    SWAP(drv); SWAP(opaque); SWAP(filename); SWAP(readonly); SWAP(check_only);
    SWAP(cache_mode); SWAP(file); SWAP(backing); SWAP(size); SWAP(wgen); SWAP(fgen); SWAP(flush_err);
    SWAP(chain_map); SWAP(chain_map_free);
#undef SWAP
}

void bdev_set_backing(struct bdev *bs, struct bdev *b)
{
    drop_chain_map(bs);
    bs->backing = b;
}

struct bdev *bdev_take_backing(struct bdev *bs)
{
    struct bdev *b = bs->backing;
    bdev_set_backing(bs, NULL);
    return b;
}

void bdev_close(struct bdev *bs)
{
    if (!bs)
        return;
    if (bs->drv->close)
        bs->drv->close(bs);
    if (bs->backing)
        bdev_close(bs->backing);
    if (bs->file)
        bdev_close(bs->file);
    bdev_free(bs);
}

/* Closes handed to background threads (bdev_close_later), so that the
 * last handle's owner can wait for them (bdev_close_wait). */
static pthread_mutex_t later_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t later_cond = PTHREAD_COND_INITIALIZER;
static int later_pending;

/* One close handed over: a node, or a plain descriptor (bs NULL). */
struct later {
    struct bdev *bs;
    int fd;
};

static void close_one(struct later *l)
{
    if (l->bs) bdev_close(l->bs);
    else close(l->fd);
    free(l);
    pthread_mutex_lock(&later_mu);
    later_pending--;
    pthread_cond_broadcast(&later_cond);
    pthread_mutex_unlock(&later_mu);
}

static void *close_later_main(void *arg)
{
    /* a library thread that never touches a mapping, and may sit in the
     * file system's block freeing (state D) for seconds: a live snapshot's
     * stop must not wait for it */
    pthread_setname_np(pthread_self(), "pms-close");
    pms_sp_exempt(1);
    close_one(arg);
    pms_sp_exempt(0);
    return NULL;
}

static void close_later(struct bdev *bs, int fd)
{
    struct later *l = malloc(sizeof *l);
    if (!l) {                           /* close here */
        if (bs) bdev_close(bs);
        else close(fd);
        return;
    }
    *l = (struct later){ bs, fd };
    pthread_attr_t a;
    pthread_t t;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_mutex_lock(&later_mu);
    later_pending++;
    pthread_mutex_unlock(&later_mu);
    if (pthread_create(&t, &a, close_later_main, l) != 0)
        close_one(l);                   /* no thread: close here */
    pthread_attr_destroy(&a);
}

void bdev_close_later(struct bdev *bs)
{
    if (!bs)
        return;
    /* nobody uses the graph any more: its image locks go now, so that the
     * files can be opened for writing before the close is done */
    for (struct bdev *y = bs; y; y = y->backing)
        bdev_file_unlock(y->file ? y->file : y);
    close_later(bs, -1);
}

void bdev_fd_close_later(int fd)
{
    if (fd >= 0)
        close_later(NULL, fd);
}

int bdev_writeout_start(struct bdev *bs)
{
    /* snap_lock pins bs->file and its flags (only an external snapshot
     * swaps them); a merge holds it for seconds, and a skipped start costs
     * nothing but a longer next flush */
    if (pthread_mutex_trylock(&bs->snap_lock) != 0)
        return 0;
    int fd = bs->readonly || bs->cache_mode == PMS_CACHE_UNSAFE ? -ENOTSUP
             : bdev_file_dup(bs->file ? bs->file : bs);
    pthread_mutex_unlock(&bs->snap_lock);
    if (fd < 0)
        return fd == -ENOTSUP ? 0 : pms_err(-fd, "could not duplicate the descriptor of '%s': %s",
                                            bs->filename, strerror(-fd));
    int r = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) < 0 ? -errno : 0;
    close(fd);
    return r < 0 ? pms_err(-r, "could not start the write-out of '%s': %s", bs->filename,
                           strerror(-r)) : 0;
}

int bdev_checkpoint(struct bdev *bs)
{
    /* snap_lock first: an external snapshot swaps bs->drv and bs->file */
    if (pthread_mutex_trylock(&bs->snap_lock) != 0)
        return 0;
    if (!bs->drv->checkpoint_begin || !bs->drv->checkpoint_end || bs->readonly) {
        pthread_mutex_unlock(&bs->snap_lock);
        return 0;
    }
    uint64_t token = 0, gen = 0;
    pthread_mutex_lock(&bs->lock);
    struct bdev *f = bs->file;
    int r = f ? bs->drv->checkpoint_begin(bs, &token) : 0;
    /* the flush runs beside the node's writes: both protocol drivers'
     * flushes may (the file's is an fdatasync, the fault-injecting one
     * takes its own mutex), and f stays bs->file while snap_lock is held */
    pthread_mutex_unlock(&bs->lock);
    if (r == 0 && f)
        r = bdev_file_flush_gen(f, &gen);
    pthread_mutex_lock(&bs->lock);
    if (r == 0 && f)
        r = bs->drv->checkpoint_end(bs, gen, token);
    pthread_mutex_unlock(&bs->lock);
    pthread_mutex_unlock(&bs->snap_lock);
    return r;
}

void bdev_close_wait(void)
{
    pthread_mutex_lock(&later_mu);
    while (later_pending)
        pthread_cond_wait(&later_cond, &later_mu);
    pthread_mutex_unlock(&later_mu);
}

static int check_req(struct bdev *bs, uint64_t len, uint64_t off, bool write)
{
    if (write && bs->readonly)
        return pms_err(EROFS, "image '%s' is opened read-only", bs->filename);
    if (write && bs->check_only)
        return pms_err(EPERM, "image '%s' is opened for checking only", bs->filename);
    if (off + len < off || off > bs->size || len > bs->size - off)
        return pms_err(EINVAL, "request [%llu, +%llu) is outside the image (size %llu)",
                       (unsigned long long)off, (unsigned long long)len,
                       (unsigned long long)bs->size);
    return 0;
}

/* Largest end of a VM state request: 2^56 bytes keeps base + pos inside
 * qcow2's 2^62 guest space for any disk size qcow2 accepts (QEMU bounds it
 * by its own request limits). */
#define VMSTATE_MAX (1ull << 56)

#define LOCKED(bs, expr) ({ pthread_mutex_lock(&(bs)->lock); int r_ = (expr); \
                            pthread_mutex_unlock(&(bs)->lock); r_; })

int bdev_pread(struct bdev *bs, void *buf, uint64_t len, uint64_t off)
{
    int r = check_req(bs, len, off, false);
    if (r < 0 || len == 0)
        return r;
    return LOCKED(bs, bs->drv->pread(bs, buf, len, off));
}

int bdev_pwrite(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    int r = check_req(bs, len, off, true);
    if (r < 0 || len == 0)
        return r;
    r = LOCKED(bs, bs->drv->pwrite(bs, buf, len, off));
    if (r >= 0 && (bs->cache_mode == PMS_CACHE_WRITETHROUGH ||
                   bs->cache_mode == PMS_CACHE_DIRECTSYNC))
        r = bdev_flush(bs);
    return r;
}

int bdev_pwrite_batch(struct bdev *bs, const struct bdev_wvec *v, size_t n,
                      bdev_fill_fn fill, void *opaque)
{
    for (size_t i = 0; i < n; i++) {
        int r = check_req(bs, v[i].len, v[i].off, true);
        if (r < 0)
            return r;
        if (i && v[i].off < v[i - 1].off + v[i - 1].len)
            return pms_err(EINVAL, "batch runs %zu and %zu overlap or are not sorted", i - 1, i);
    }
    if (n == 0)
        return 0;
    int r = 0;
    if (bs->drv->pwrite_batch)
        r = LOCKED(bs, bs->drv->pwrite_batch(bs, v, n, fill, opaque));
    else
        for (size_t i = 0; i < n && r >= 0; i++)
            if (v[i].len)
                r = LOCKED(bs, bs->drv->pwrite(bs, v[i].buf, v[i].len, v[i].off));
    if (r >= 0 && (bs->cache_mode == PMS_CACHE_WRITETHROUGH ||
                   bs->cache_mode == PMS_CACHE_DIRECTSYNC))
        r = bdev_flush(bs);
    return r;
}

uint64_t bdev_write_unit(struct bdev *bs)
{
    return bs->drv->write_unit ? bs->drv->write_unit(bs) : 1;
}

int bdev_pwrite_zeroes(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags)
{
    int r = check_req(bs, len, off, true);
    if (r < 0 || len == 0)
        return r;
    return LOCKED(bs, bs->drv->pwrite_zeroes(bs, len, off, flags));
}

int bdev_vmstate_rw(struct bdev *bs, void *buf, uint64_t len, uint64_t pos, bool write)
{
    if (!bs->drv->vmstate_offset)
        return pms_err(ENOTSUP, "the %s format has no VM state area", bs->drv->name);
    if (write && bs->readonly)
        return pms_err(EROFS, "image '%s' is opened read-only", bs->filename);
    if (write && bs->check_only)
        return pms_err(EPERM, "image '%s' is opened for checking only", bs->filename);
    uint64_t base = bs->drv->vmstate_offset(bs);
    if (pos > VMSTATE_MAX || len > VMSTATE_MAX - pos)
        return pms_err(EINVAL, "VM state request [%llu, +%llu) is too large",
                       (unsigned long long)pos, (unsigned long long)len);
    if (len == 0)
        return 0;
    return LOCKED(bs, write ? bs->drv->pwrite(bs, buf, len, base + pos)
                            : bs->drv->pread(bs, buf, len, base + pos));
}

int bdev_pwrite_compressed(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    int r = check_req(bs, len, off, true);
    if (r < 0)
        return r;
    if (!bs->drv->pwrite_compressed)
        return pms_err(ENOTSUP, "compressed writes are not supported by the %s format "
                       "(only qcow2)", bs->drv->name);
    /* len 0 reaches the driver: QEMU's end-of-stream marker (qcow2 rounds
     * its file up to a whole sector) */
    r = LOCKED(bs, bs->drv->pwrite_compressed(bs, buf, len, off));
    if (r >= 0 && (bs->cache_mode == PMS_CACHE_WRITETHROUGH ||
                   bs->cache_mode == PMS_CACHE_DIRECTSYNC))
        r = bdev_flush(bs);
    return r;
}

int bdev_discard(struct bdev *bs, uint64_t len, uint64_t off)
{
    int r = check_req(bs, len, off, true);
    if (r < 0 || len == 0)
        return r;
    if (!bs->drv->discard)
        return 0;           /* discard is advisory */
    return LOCKED(bs, bs->drv->discard(bs, len, off));
}

int bdev_flush(struct bdev *bs)
{
    if (bs->readonly || bs->cache_mode == PMS_CACHE_UNSAFE)
        return 0;
    return LOCKED(bs, bs->drv->flush ? bs->drv->flush(bs) : 0);
}

int64_t bdev_getlength(struct bdev *bs)
{
    return (int64_t)bs->size;
}

int bdev_truncate(struct bdev *bs, uint64_t size)
{
    if (bs->readonly)
        return pms_err(EROFS, "image '%s' is opened read-only", bs->filename);
    if (bs->check_only)
        return pms_err(EPERM, "image '%s' is opened for checking only", bs->filename);
    if (!bs->drv->truncate)
        return pms_err(ENOTSUP, "format '%s' cannot be resized", bs->drv->name);
    pthread_mutex_lock(&bs->lock);
    int r = bs->drv->truncate(bs, size);
    if (r >= 0)
        bs->size = size;
    pthread_mutex_unlock(&bs->lock);
    return r;
}

int bdev_block_status(struct bdev *bs, uint64_t off, uint64_t len, struct pms_extent *ext)
{
    int r = check_req(bs, len, off, false);
    if (r < 0)
        return r;
    if (len == 0)
        return pms_err(EINVAL, "empty range");
    memset(ext, 0, sizeof *ext);
    if (!bs->drv->block_status) {
        ext->start = off;
        ext->length = len;
        ext->flags = PMS_BLOCK_DATA | PMS_BLOCK_ALLOCATED;
        return 0;
    }
    r = LOCKED(bs, bs->drv->block_status(bs, off, len, ext));
    if (r >= 0 && (ext->length == 0 || ext->length > len))
        return pms_err(EIO, "driver %s returned a bad extent", bs->drv->name);
    return r;
}

static int walk_locked(struct bdev *bs, uint64_t off, uint64_t len, bdev_extent_fn fn,
                       void *opaque)
{
    uint64_t end = off + len;
    while (off < end) {
        struct pms_extent e;
        memset(&e, 0, sizeof e);
        if (!bs->drv->block_status) {
            e.start = off;
            e.length = end - off;
            e.flags = PMS_BLOCK_DATA | PMS_BLOCK_ALLOCATED;
        } else {
            int r = bs->drv->block_status(bs, off, end - off, &e);
            if (r < 0)
                return r;
            if (e.length == 0 || e.length > end - off)
                return pms_err(EIO, "driver %s returned a bad extent", bs->drv->name);
        }
        int r = fn(opaque, &e);
        if (r < 0)
            return r;
        off = e.start + e.length;
    }
    return 0;
}

int bdev_block_status_walk(struct bdev *bs, uint64_t off, uint64_t len, bdev_extent_fn fn,
                           void *opaque)
{
    int r = check_req(bs, len, off, false);
    if (r < 0)
        return r;
    if (len == 0)
        return pms_err(EINVAL, "empty range");
    return LOCKED(bs, walk_locked(bs, off, len, fn, opaque));
}

/* ---- protocol child access (no lock: protocol drivers are stateless) ---- */

uint64_t bdev_file_extent(struct bdev *file, uint64_t off, uint64_t len, bool *hole)
{
    struct pms_extent e;
    *hole = false;
    if (!len)
        return 0;
    if (!file->drv->block_status || file->drv->block_status(file, off, len, &e) < 0 ||
        e.start != off || e.length == 0) {
        pms_err_clear();
        return len;                     /* not known: data */
    }
    *hole = (e.flags & (PMS_BLOCK_ZERO | PMS_BLOCK_DATA)) == PMS_BLOCK_ZERO;
    return e.length < len ? e.length : len;
}

uint64_t bdev_file_zero_prefix(struct bdev *file, uint64_t off, uint64_t len)
{
    bool hole;
    uint64_t n = bdev_file_extent(file, off, len, &hole);
    return hole ? n : 0;
}

int bdev_file_pread(struct bdev *file, void *buf, uint64_t len, uint64_t off)
{
    if (len == 0)
        return 0;
    if (off + len < off)
        return pms_err(EINVAL, "offset overflow");
    return file->drv->pread(file, buf, len, off);
}

/* a write to file returned (whatever its result: a failed write may have
 * changed part of the range) */
static void wrote(struct bdev *file)
{
    __atomic_fetch_add(&file->wgen, 1, __ATOMIC_ACQ_REL);
}

int bdev_file_pwrite(struct bdev *file, const void *buf, uint64_t len, uint64_t off)
{
    if (len == 0)
        return 0;
    if (file->readonly)
        return pms_err(EROFS, "'%s' is opened read-only", file->filename);
    if (off + len < off)
        return pms_err(EINVAL, "offset overflow");
    int r = file->drv->pwrite(file, buf, len, off);
    wrote(file);
    return r;
}

int bdev_file_flush_gen(struct bdev *file, uint64_t *gen)
{
    uint64_t g = bdev_file_wgen(file);
    *gen = g;
    if (file->readonly || file->cache_mode == PMS_CACHE_UNSAFE)
        return 0;
    int e = __atomic_load_n(&file->flush_err, __ATOMIC_ACQUIRE);
    if (e)
        return pms_err(e, "an earlier flush of '%s' failed (%s): what it held may be lost",
                       file->filename, strerror(e));
    if (__atomic_load_n(&file->fgen, __ATOMIC_ACQUIRE) >= g)
        return 0;
    int r = file->drv->flush(file);
    if (r < 0) {
        __atomic_store_n(&file->flush_err, -r, __ATOMIC_RELEASE);
        return r;
    }
    uint64_t f = __atomic_load_n(&file->fgen, __ATOMIC_RELAXED);
    while (f < g && !__atomic_compare_exchange_n(&file->fgen, &f, g, false, __ATOMIC_ACQ_REL,
                                                 __ATOMIC_RELAXED))
        ;
    return 0;
}

int bdev_file_flush(struct bdev *file)
{
    uint64_t g;
    return bdev_file_flush_gen(file, &g);
}

int64_t bdev_file_length(struct bdev *file)
{
    return file->drv->getlength(file);
}

int bdev_file_truncate(struct bdev *file, uint64_t size)
{
    if (file->readonly)
        return pms_err(EROFS, "'%s' is opened read-only", file->filename);
    int r = file->drv->truncate(file, size);
    wrote(file);
    return r;
}

int bdev_file_discard(struct bdev *file, uint64_t len, uint64_t off)
{
    if (file->readonly)
        return pms_err(EROFS, "'%s' is opened read-only", file->filename);
    int r = file->drv->discard ? file->drv->discard(file, len, off) : 0;
    wrote(file);
    return r;
}

int bdev_file_reserve(struct bdev *file, uint64_t off, uint64_t len)
{
    if (file->readonly)
        return pms_err(EROFS, "'%s' is opened read-only", file->filename);
    if (!file->drv->reserve || !len)
        return 0;
    int r = file->drv->reserve(file, off, len);
    wrote(file);                    /* the file's size may have changed */
    return r;
}

int bdev_file_zero(struct bdev *file, uint64_t len, uint64_t off)
{
    if (file->readonly)
        return pms_err(EROFS, "'%s' is opened read-only", file->filename);
    int r = file->drv->pwrite_zeroes(file, len, off, 0);
    wrote(file);
    return r;
}
