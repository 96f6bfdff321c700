/* Public API layer: argument checks, routing to the block graph or, while
 * mapped, to the memory device, and the "FUNC: " error prefix.
 * Threads: see pms-dev.h. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/stat.h>
#include <string.h>
#include "pms-dev.h"
#include "util/error.h"
#include "block/drivers/qcow2.h"
#include "block/extsnap.h"

void pms_open_opts_init(struct pms_open_opts *o)
{
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
}

void pms_create_opts_init(struct pms_create_opts *o)
{
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->format = "qcow2";
    o->cluster_size = 65536;
    o->refcount_bits = 16;
}

void pms_map_opts_init(struct pms_map_opts *o)
{
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->dirty_tracking = PMS_DIRTY_AUTO;
}

int pms_open(const char *path, const struct pms_open_opts *opts, pms_dev **devp)
{
    pms_err_clear();
    if (!devp) {
        int r = pms_err(EINVAL, "devp is NULL");
        PMS_API_ERR(r);
        return r;
    }
    *devp = NULL;
    pms_dev *dev = calloc(1, sizeof *dev);
    if (!dev) {
        int r = pms_err(ENOMEM, "out of memory");
        PMS_API_ERR(r);
        return r;
    }
    /* a caller built against an older header passes a shorter struct */
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    if (opts)
        memcpy(&o, opts, opts->size && opts->size < sizeof o ? opts->size : sizeof o);
    o.size = sizeof o;
    int r = opts && opts->size && opts->size < sizeof opts->size
            ? pms_err(EINVAL, "opts->size is %zu: initialise opts with pms_open_opts_init",
                      opts->size)
            : o.cache_mode < PMS_CACHE_WRITEBACK || o.cache_mode > PMS_CACHE_DIRECTSYNC
            ? pms_err(EINVAL, "unknown cache_mode %d", o.cache_mode)
            : o.force_share && !o.readonly
            ? pms_err(EINVAL, "force_share can only be used with read-only images")
            : bdev_open(path, &o, &dev->bs);
    if (r < 0) {
        free(dev);
        PMS_API_ERR(r);
        return r;
    }
    dev->eager_writeout = o.eager_writeout != 0;
    if (dev->eager_writeout && dev->bs->file)
        __atomic_store_n(&dev->bs->file->eager_writeout, true, __ATOMIC_RELAXED);
    pthread_rwlock_init(&dev->lock, NULL);
    *devp = dev;
    return 0;
}

int pms_close(pms_dev *dev)
{
    if (!dev)
        return 0;
    int r = 0;
    pthread_rwlock_wrlock(&dev->lock);
    if (dev->mem) {
        r = pms_mem_unmap(dev->mem, true);
        dev->mem = NULL;
    }
    pthread_rwlock_unlock(&dev->lock);
    int r2 = bdev_flush(dev->bs);
    if (r == 0)
        r = r2;
    bdev_close(dev->bs);
    bdev_close_wait();
    pthread_rwlock_destroy(&dev->lock);
    free(dev);
    PMS_API_ERR(r);
    return r;
}

/* The pointers every call needs: a clear error instead of a crash (and
 * instead of the block layer's NULL-means-zeroes for a write). */
#define NEED(cond, what) do { if (!(cond)) { int r_ = pms_err(EINVAL, "%s is NULL", what); \
                                             PMS_API_ERR(r_); return r_; } } while (0)
/* A caller's result struct: its size field must at least hold itself (0 is
 * an uninitialised struct, not "the whole struct"). */
#define NEED_SIZE(p, type) do { if ((p)->size < sizeof (p)->size) { \
        int r_ = pms_err(EINVAL, #p "->size is %zu: set it to sizeof(struct " #type ")", \
                         (p)->size); \
        PMS_API_ERR(r_); return r_; } } while (0)

int64_t pms_size(pms_dev *dev)
{
    NEED(dev, "dev");
    return bdev_getlength(dev->bs);
}

/* Every call but map/unmap/close runs under the read side of dev->lock. */
#define RDLOCKED(expr) ({ pthread_rwlock_rdlock(&dev->lock); __typeof__(expr) r_ = (expr); \
                          pthread_rwlock_unlock(&dev->lock); r_; })
#define ROUTE(call_mem, call_bs) \
    int r = RDLOCKED(dev->mem ? (call_mem) : (call_bs)); PMS_API_ERR(r); return r

int pms_pread(pms_dev *dev, void *buf, size_t len, uint64_t off)
{
    NEED(dev, "dev");
    NEED(buf || !len, "buf");
    ROUTE(pms_mem_pread(dev->mem, buf, len, off), bdev_pread(dev->bs, buf, len, off));
}

int pms_pwrite(pms_dev *dev, const void *buf, size_t len, uint64_t off)
{
    NEED(dev, "dev");
    NEED(buf || !len, "buf");
    ROUTE(pms_mem_pwrite(dev->mem, buf, len, off), bdev_pwrite(dev->bs, buf, len, off));
}

int pms_write_zeroes(pms_dev *dev, size_t len, uint64_t off)
{
    NEED(dev, "dev");
    ROUTE(pms_mem_write_zeroes(dev->mem, len, off),
          bdev_pwrite_zeroes(dev->bs, len, off, BDEV_ZERO_MAY_UNMAP));
}

int pms_vmstate_pread(pms_dev *dev, void *buf, size_t len, uint64_t pos)
{
    NEED(dev, "dev");
    int r = !buf && len ? pms_err(EINVAL, "buf is NULL") :
            RDLOCKED(dev->mem ? pms_err(EBUSY, "device is mapped")
                              : bdev_vmstate_rw(dev->bs, buf, len, pos, false));
    PMS_API_ERR(r);
    return r;
}

int pms_vmstate_pwrite(pms_dev *dev, const void *buf, size_t len, uint64_t pos)
{
    NEED(dev, "dev");
    int r = !buf && len ? pms_err(EINVAL, "buf is NULL") :
            RDLOCKED(dev->mem ? pms_err(EBUSY, "device is mapped")
                              : bdev_vmstate_rw(dev->bs, (void *)buf, len, pos, true));
    PMS_API_ERR(r);
    return r;
}

int pms_write_zeroes_ex(pms_dev *dev, size_t len, uint64_t off, unsigned flags)
{
    NEED(dev, "dev");
    if (flags & ~(unsigned)PMS_ZERO_MAY_UNMAP) {
        int r = pms_err(EINVAL, "pms_write_zeroes_ex: unknown flags 0x%x", flags);
        PMS_API_ERR(r);
        return r;
    }
    ROUTE(pms_mem_write_zeroes(dev->mem, len, off),
          bdev_pwrite_zeroes(dev->bs, len, off,
                             (flags & PMS_ZERO_MAY_UNMAP) ? BDEV_ZERO_MAY_UNMAP : 0));
}

int pms_pwrite_compressed(pms_dev *dev, const void *buf, size_t len, uint64_t off)
{
    NEED(dev, "dev");
    int r = RDLOCKED(dev->mem ? pms_err(EBUSY, "device is mapped") :
                     !buf && len ? pms_err(EINVAL, "buf is NULL") :
                     bdev_pwrite_compressed(dev->bs, buf, len, off));
    PMS_API_ERR(r);
    return r;
}

int pms_discard(pms_dev *dev, size_t len, uint64_t off)
{
    NEED(dev, "dev");
    ROUTE(pms_mem_discard(dev->mem, len, off), bdev_discard(dev->bs, len, off));
}

int pms_flush(pms_dev *dev)
{
    NEED(dev, "dev");
    ROUTE(pms_mem_flush(dev->mem), bdev_flush(dev->bs));
}

int pms_truncate(pms_dev *dev, uint64_t size)
{
    NEED(dev, "dev");
    int r = RDLOCKED(dev->mem ? pms_err(EBUSY, "device is mapped")
                              : bdev_truncate(dev->bs, size));
    PMS_API_ERR(r);
    return r;
}

int pms_block_status(pms_dev *dev, uint64_t off, uint64_t len, struct pms_extent *ext)
{
    NEED(dev, "dev");
    NEED(ext, "ext");
    int r = bdev_block_status(dev->bs, off, len, ext);
    PMS_API_ERR(r);
    return r;
}

/* qemu-img creates raw images in whole sectors (file-posix rounds the size up) */
#define RAW_CREATE_ALIGN 512ull

int pms_create(const char *path, uint64_t size, const struct pms_create_opts *opts)
{
    pms_err_clear();
    /* a caller built against an older header passes a shorter struct */
    struct pms_create_opts def;
    pms_create_opts_init(&def);
    bool short_size = opts && opts->size && opts->size < sizeof opts->size;
    if (opts && !short_size)
        memcpy(&def, opts, opts->size && opts->size < sizeof def ? opts->size : sizeof def);
    def.size = sizeof def;
    opts = &def;
    int r;
    if (short_size)
        r = pms_err(EINVAL, "opts->size is too small: initialise opts with pms_create_opts_init");
    else if (!path || !*path)
        r = pms_err(EINVAL, "no file name given");
    else if (size > INT64_MAX)
        r = pms_err(EFBIG, "image size %llu is too large", (unsigned long long)size);
    else if ((r = bdev_file_busy(path)) < 0)
        ;                       /* never truncate an image a QEMU process holds */
    else if (!opts->format || strcmp(opts->format, "qcow2") == 0)
        r = qcow2_create(path, size, opts);
    else if (strcmp(opts->format, "raw") == 0) {
        r = 0;
        if (opts->backing_file)
            r = pms_err(EINVAL, "raw images cannot have a backing file");
        else {
            int pm = opts->preallocation;
            FILE *f = NULL;
            if (pm == PMS_PREALLOC_METADATA || opts->preallocation_metadata)
                r = pms_err(EINVAL, "Unsupported preallocation mode: metadata");
            else if (pm < PMS_PREALLOC_OFF || pm > PMS_PREALLOC_FULL)
                r = pms_err(EINVAL, "unknown preallocation mode %d", pm);
            else if (!(f = fopen(path, "w")))
                r = pms_err(errno, "could not create '%s': %s", path, strerror(errno));
            else {
                size = (size + RAW_CREATE_ALIGN - 1) & ~(RAW_CREATE_ALIGN - 1);
                if (ftruncate(fileno(f), (off_t)size) < 0)
                    r = pms_err(errno, "could not resize '%s': %s", path, strerror(errno));
                else if (pm != PMS_PREALLOC_OFF)
                    r = bdev_fd_prealloc(fileno(f), path, 0, size, pm);
                fclose(f);
            }
        }
    } else
        r = pms_err(EINVAL, "unknown image format '%s' (known: qcow2, raw)", opts->format);
    PMS_API_ERR(r);
    return r;
}

int pms_info(pms_dev *dev, struct pms_info *info)
{
    NEED(dev, "dev");
    NEED(info, "info");
    NEED_SIZE(info, pms_info);
    /* fill a whole struct, hand back as much as the caller's holds */
    size_t sz = info->size < sizeof(struct pms_info) ? info->size : sizeof(struct pms_info);
    struct pms_info full;
    memset(&full, 0, sizeof full);
    struct bdev *bs = dev->bs;
    full.virtual_size = bs->size;
    full.readonly = bs->readonly;
    struct stat st;
    if (stat(bs->file ? bs->file->filename : bs->filename, &st) == 0)
        full.actual_size = (uint64_t)st.st_blocks * 512;
    pthread_mutex_lock(&bs->lock);
    int r = bs->drv->info ? bs->drv->info(bs, &full) : 0;
    pthread_mutex_unlock(&bs->lock);
    full.size = sz;
    memcpy(info, &full, sz);
    PMS_API_ERR(r);
    return r;
}

int pms_check(pms_dev *dev, unsigned flags, struct pms_check_result *res,
              pms_check_msg_fn fn, void *opaque)
{
    NEED(dev, "dev");
    NEED(res, "res");
    NEED_SIZE(res, pms_check_result);
    if (flags & ~(unsigned)PMS_CHECK_REPAIR_ALL) {
        int r = pms_err(EINVAL, "unknown flags 0x%x", flags & ~(unsigned)PMS_CHECK_REPAIR_ALL);
        PMS_API_ERR(r);
        return r;
    }
    struct bdev *bs = dev->bs;
    /* the driver fills a whole struct; the caller gets as much as it holds */
    size_t sz = res->size < sizeof *res ? res->size : sizeof *res;
    struct pms_check_result full;
    memset(&full, 0, sizeof full);
    full.size = sizeof full;
    int r;
    if (!bs->drv->check)
        r = pms_err(ENOTSUP, "format '%s' does not support checks", bs->drv->name);
    else if (flags && bs->readonly)
        r = pms_err(EROFS, "cannot repair a read-only image");
    else {
        pthread_mutex_lock(&bs->lock);
        r = bs->drv->check(bs, flags, &full, fn, opaque);
        pthread_mutex_unlock(&bs->lock);
    }
    full.size = sz;
    memcpy(res, &full, sz);
    PMS_API_ERR(r);
    return r;
}

static int snap_call(pms_dev *dev, int (*fn)(struct bdev *, const char *), const char *name,
                     bool write)
{
    struct bdev *bs = dev->bs;
    if (!name || !*name)
        return pms_err(EINVAL, "snapshot name is empty");
    if (!fn)
        return pms_err(ENOTSUP, "format '%s' does not support internal snapshots",
                       bs->drv->name);
    if (write && bs->readonly)
        return pms_err(EROFS, "image '%s' is opened read-only", bs->filename);
    if (write && bs->check_only)
        return pms_err(EPERM, "image '%s' is opened for checking only", bs->filename);
    pthread_mutex_lock(&bs->lock);
    int r = fn(bs, name);
    pthread_mutex_unlock(&bs->lock);
    return r;
}

static int snapshot_create(pms_dev *dev, const char *name, unsigned flags)
{
    /* names are unique across kinds (bdev_extsnap_create checks both) */
    /* a name whose external snapshot's delete was interrupted is freed by
     * finishing that delete first */
    int e = name && *name ? bdev_extsnap_finish_delete(dev->bs, name) : 0;
    if (e < 0)
        return e;
    e = name && *name && !(flags & PMS_SNAP_EXTERNAL) ? bdev_extsnap_exists(dev->bs, name) : 0;
    if (e)
        return e < 0 ? e : pms_err(EEXIST, "an external snapshot called '%s' exists", name);
    if (dev->mem)
        return pms_mem_snapshot_create(dev->mem, name, flags);
    if (flags & PMS_SNAP_EXTERNAL)
        return bdev_extsnap_create(dev->bs, name);
    return snap_call(dev, dev->bs->drv->snapshot_create, name, true);
}

/* An external snapshot called name (and no internal one: QEMU's id/name
 * lookup keeps working for those). */
static bool is_external(pms_dev *dev, const char *name)
{
    return name && *name && bdev_extsnap_exists(dev->bs, name) > 0;
}

int pms_snapshot_create_ex(pms_dev *dev, const char *name, unsigned flags)
{
    NEED(dev, "dev");
    unsigned known = PMS_SNAP_QUIESCED | PMS_SNAP_EXTERNAL;
    int r = flags & ~known ? pms_err(EINVAL, "unknown flags 0x%x", flags & ~known)
                           : RDLOCKED(snapshot_create(dev, name, flags));
    PMS_API_ERR(r);
    return r;
}

int pms_snapshot_create(pms_dev *dev, const char *name)
{
    NEED(dev, "dev");
    int r = RDLOCKED(snapshot_create(dev, name, 0));
    PMS_API_ERR(r);
    return r;
}

int pms_snapshot_revert(pms_dev *dev, const char *name)
{
    NEED(dev, "dev");
    int r = RDLOCKED(dev->mem ? pms_mem_snapshot_revert(dev->mem, name)
                     : is_external(dev, name) ? bdev_extsnap_revert(dev->bs, name)
                     : snap_call(dev, dev->bs->drv->snapshot_goto, name, true));
    PMS_API_ERR(r);
    return r;
}

static int snapshot_delete(pms_dev *dev, const char *name, unsigned flags,
                           pms_progress_fn fn, void *opaque)
{
    return flags ? pms_err(EINVAL, "unknown flags 0x%x", flags)
           /* while mapped too: the merge preserves every layer's content
            * and runs beside the live chain (see extsnap.c), so writeback
            * and faults go on */
           : RDLOCKED(is_external(dev, name) || bdev_extsnap_delete_pending(dev->bs, name)
                      ? bdev_extsnap_delete(dev->bs, name, fn, opaque)
                      : snap_call(dev, dev->bs->drv->snapshot_delete, name, true));
}

int pms_snapshot_delete_ex(pms_dev *dev, const char *name, unsigned flags,
                           pms_progress_fn fn, void *opaque)
{
    NEED(dev, "dev");
    int r = snapshot_delete(dev, name, flags, fn, opaque);
    PMS_API_ERR(r);
    return r;
}

int pms_snapshot_delete(pms_dev *dev, const char *name)
{
    NEED(dev, "dev");
    int r = snapshot_delete(dev, name, 0, NULL, NULL);
    PMS_API_ERR(r);
    return r;
}

int pms_snapshot_list(pms_dev *dev, struct pms_snapshot_info **list, size_t *n)
{
    NEED(dev, "dev");
    NEED(list, "list");
    NEED(n, "n");
    struct bdev *bs = dev->bs;
    int r;
    *list = NULL;
    *n = 0;
    if (!bs->drv->snapshot_list)
        r = 0;                       /* raw: no snapshots */
    else {
        pthread_mutex_lock(&bs->lock);
        r = bs->drv->snapshot_list(bs, list, n);
        pthread_mutex_unlock(&bs->lock);
    }
    if (r == 0)
        r = bdev_extsnap_list(bs, list, n);
    if (r < 0) {
        pms_snapshot_list_free(*list, *n);
        *list = NULL;
        *n = 0;
    }
    PMS_API_ERR(r);
    return r;
}

void pms_snapshot_list_free(struct pms_snapshot_info *list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(list[i].name);
        free(list[i].file);
    }
    free(list);
}

int pms_map(pms_dev *dev, const struct pms_map_opts *opts, void **addrp, size_t *lenp)
{
    NEED(dev, "dev");
    int r;
    pthread_rwlock_wrlock(&dev->lock);
    if (dev->mem)
        r = pms_err(EBUSY, "device is already mapped");
    else if (dev->bs->check_only)
        r = pms_err(EPERM, "image '%s' is opened for checking only", dev->bs->filename);
    else
        r = pms_mem_map(dev, opts, &dev->mem, addrp, lenp);
    pthread_rwlock_unlock(&dev->lock);
    PMS_API_ERR(r);
    return r;
}

int pms_unmap(pms_dev *dev)
{
    NEED(dev, "dev");
    int r;
    pthread_rwlock_wrlock(&dev->lock);
    if (!dev->mem)
        r = pms_err(EINVAL, "device is not mapped");
    else {
        r = pms_mem_unmap(dev->mem, false);
        if (r == 0)
            dev->mem = NULL;
    }
    pthread_rwlock_unlock(&dev->lock);
    PMS_API_ERR(r);
    return r;
}

int pms_persist(pms_dev *dev, const void *addr, size_t len)
{
    NEED(dev, "dev");
    int r = RDLOCKED(dev->mem ? pms_mem_persist(dev->mem, addr, len)
                              : pms_err(EINVAL, "device is not mapped"));
    PMS_API_ERR(r);
    return r;
}

int pms_stats(pms_dev *dev, struct pms_stats *st)
{
    NEED(dev, "dev");
    NEED(st, "st");
    NEED_SIZE(st, pms_stats);
    size_t sz = st->size;
    memset(st, 0, sz < sizeof *st ? sz : sizeof *st);
    st->size = sz;
    int r = RDLOCKED(dev->mem ? pms_mem_stats(dev->mem, st) : 0);
    if (r == 0 && sz >= offsetof(struct pms_stats, metadata_bytes) + sizeof st->metadata_bytes)
        st->metadata_bytes = bdev_meta_bytes();
    PMS_API_ERR(r);
    return r;
}
