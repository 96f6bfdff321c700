/* Protocol driver "file": a POSIX file or block device.
 *
 * Stateless apart from the descriptor, the cached length and the direct-I/O
 * lock, so it is entered without a lock by its parent (pread/pwrite are
 * thread-safe).  Writes past the end extend the file.  Zero writes punch
 * holes where the file system can, else write zero buffers.
 *
 * Length: a writable regular file's length is kept in memory (every write,
 * zero write and truncate goes through here, and the image lock keeps QEMU
 * writers out), so the write path makes no fstat; a read-only open asks the
 * kernel each time (a writer elsewhere may grow the file under -U).  A zero
 * write past the end extends the file with ftruncate (sparse), which is
 * safe because the format node above serializes its requests (LOCKED in
 * block.c).
 *
 * cache=none and directsync open with O_DIRECT, as QEMU does; a file system
 * that refuses O_DIRECT fails the open with a clear error (QEMU's
 * behaviour).  Requests that are not aligned (offset, length or buffer to
 * the file's direct-I/O alignment: statx STATX_DIOALIGN, else the block
 * device's logical sector, else 4096) go through an aligned bounce buffer;
 * an unaligned write is a read-modify-write of its aligned blocks, done
 * under `dio_lock` held exclusively, while every other direct write holds
 * it shared, so that no write lands between the read and the write back.
 * A read-modify-write that reaches past the end trims the file back to the
 * length the plain write would have left.
 *
 * Locking: QEMU-compatible OFD byte locks (file-posix's scheme: byte 100+i
 * "holds permission i", byte 200+i "does not share permission i"; i = 1
 * write, 3 resize).  We take the "does not share write/resize" locks, so a
 * QEMU writer (qemu-io, qemu-img snapshot -c, a running VM) refuses the
 * image while we have it open, while QEMU readers (qemu-img info, check,
 * snapshot -l) still work; and we refuse an image a QEMU writer holds.
 * force_share (-U) skips all of it, as in QEMU.  bdev_file_unlock hands a
 * read-only node's locks over to a writable node of the same file opened
 * next by the same process (an external-snapshot merge): OFD locks of two
 * descriptions conflict even within one process.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <unistd.h>
#include "../block.h"
#include "../../util/error.h"

/* Largest bounce buffer for unaligned direct I/O (bytes): bigger requests
 * go through it in pieces; 1 MiB keeps one qcow2 run in one system call. */
#define BOUNCE_MAX (1u << 20)
/* Direct-I/O alignment when the kernel does not report one (bytes): the
 * largest logical block size in common use, so always accepted. */
#define DIO_ALIGN_DEFAULT 4096u

struct file_state {
    int fd;
    bool is_blk;
    bool cache_len;              /* len is authoritative (writable regular file) */
    bool direct;                 /* opened with O_DIRECT */
    uint32_t align;              /* direct I/O: offset/length alignment */
    uint32_t mem_align;          /* direct I/O: buffer alignment */
    uint64_t len;                /* file length when cache_len (atomic) */
    pthread_rwlock_t dio_lock;   /* direct: RMW exclusive, other writes shared */
};

enum { LOCK_PERM_BASE = 100, LOCK_SHARED_BASE = 200, PERM_WRITE = 1, PERM_RESIZE = 3 };

/* Does another open file description hold a lock on byte off? */
static bool byte_locked(int fd, off_t off)
{
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1 };
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return false;
    return fl.l_type != F_UNLCK;
}

int bdev_file_busy(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return 0;                       /* missing: nothing to protect */
    struct stat st;
    bool busy = false;
    /* creating needs write and resize and shares all but resize, as
     * qemu-img create does: anyone holding or refusing to share write, or
     * holding resize, is in the way */
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        busy = byte_locked(fd, LOCK_SHARED_BASE + PERM_WRITE) ||
               byte_locked(fd, LOCK_SHARED_BASE + PERM_RESIZE) ||
               byte_locked(fd, LOCK_PERM_BASE + PERM_RESIZE);
    close(fd);
    return busy ? pms_err(EBUSY, "failed to get \"write\" lock on '%s': is another process "
                          "using the image?", path) : 0;
}

int bdev_fd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -ENOSPC;
        buf = (const uint8_t *)buf + n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

int bdev_fd_prealloc(int fd, const char *path, uint64_t off, uint64_t len, int mode)
{
    if (len == 0)
        return 0;
    if (mode == PMS_PREALLOC_FALLOC) {
        int e = posix_fallocate(fd, (off_t)off, (off_t)len);
        if (e)
            return pms_err(e, "could not preallocate '%s' (falloc): %s", path, strerror(e));
        return 0;
    }
    if (mode == PMS_PREALLOC_FULL) {
        static const uint8_t zeroes[1 << 16];
        while (len) {
            size_t n = len < sizeof zeroes ? (size_t)len : sizeof zeroes;
            int r = bdev_fd_pwrite_all(fd, zeroes, n, off);
            if (r < 0)
                return pms_err(-r, "could not preallocate '%s' (full): %s", path, strerror(-r));
            off += n; len -= n;
        }
        return 0;
    }
    struct stat st;
    if (fstat(fd, &st) < 0)
        return pms_err(errno, "could not stat '%s': %s", path, strerror(errno));
    if ((uint64_t)st.st_size < off + len && ftruncate(fd, (off_t)(off + len)) < 0)
        return pms_err(errno, "could not extend '%s': %s", path, strerror(errno));
    return 0;
}

static int take_locks(struct bdev *bs, int fd, const char *path)
{
    static const struct { int off; const char *what; } rw_tests[] = {
        { LOCK_PERM_BASE + PERM_WRITE, "shared \"write\"" },
        { LOCK_PERM_BASE + PERM_RESIZE, "shared \"resize\"" },
        { LOCK_SHARED_BASE + PERM_WRITE, "\"write\"" },
        { LOCK_SHARED_BASE + PERM_RESIZE, "\"resize\"" },
    };
    size_t ntests = bs->readonly ? 2 : 4;
    for (size_t i = 0; i < ntests; i++)
        if (byte_locked(fd, rw_tests[i].off))
            return pms_err(EBUSY, "failed to get %s lock on '%s': is another process using "
                           "the image? (-U / force_share opens it anyway, read-only)",
                           rw_tests[i].what, path);
    for (int b = PERM_WRITE; b <= PERM_RESIZE; b += 2) {
        struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET,
                            .l_start = LOCK_SHARED_BASE + b, .l_len = 1 };
        if (fcntl(fd, F_OFD_SETLK, &fl) < 0 && errno != EINVAL && errno != ENOLCK &&
            errno != EOPNOTSUPP)
            return pms_err(EBUSY, "failed to lock '%s': %s", path, strerror(errno));
    }
    return 0;
}

void bdev_file_unlock(struct bdev *bs)
{
    if (!bs || bs->drv != &pms_drv_file)
        return;
    struct file_state *s = bs->opaque;
    for (int b = PERM_WRITE; b <= PERM_RESIZE; b += 2) {
        struct flock fl = { .l_type = F_UNLCK, .l_whence = SEEK_SET,
                            .l_start = LOCK_SHARED_BASE + b, .l_len = 1 };
        fcntl(s->fd, F_OFD_SETLK, &fl);
    }
}

int bdev_file_dup(struct bdev *bs)
{
    if (!bs || bs->drv != &pms_drv_file)
        return -ENOTSUP;
    struct file_state *s = bs->opaque;
    int fd = fcntl(s->fd, F_DUPFD_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

/* The direct-I/O alignment of fd (offset and memory), as QEMU probes it. */
static void dio_align(struct file_state *s)
{
    s->align = s->mem_align = 0;
#if defined(STATX_DIOALIGN)
    struct statx sx;
    if (statx(s->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
        (sx.stx_mask & STATX_DIOALIGN) && sx.stx_dio_offset_align) {
        s->align = sx.stx_dio_offset_align;
        s->mem_align = sx.stx_dio_mem_align;
    }
#endif
    int ss;
    if (!s->align && s->is_blk && ioctl(s->fd, BLKSSZGET, &ss) == 0 && ss > 0)
        s->align = (uint32_t)ss;
    if (!s->align || (s->align & (s->align - 1)))
        s->align = DIO_ALIGN_DEFAULT;
    if (s->mem_align < s->align)
        s->mem_align = s->align;     /* bounce buffers are aligned to both */
}

static int file_open(struct bdev *bs, const char *path, const struct pms_open_opts *o)
{
    struct file_state *s = bs->opaque;
    bool direct = bs->cache_mode == PMS_CACHE_NONE || bs->cache_mode == PMS_CACHE_DIRECTSYNC;
    /* O_NONBLOCK: opening a FIFO would otherwise wait for its other end
     * (cleared below for what is kept) */
    int fd = open(path, (bs->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK |
                        (direct ? O_DIRECT : 0));
    if (fd < 0 && direct && errno == EINVAL)
        return pms_err(EINVAL, "could not open '%s': the file system does not support "
                       "O_DIRECT (cache mode none/directsync); use cache mode writeback",
                       path);
    if (fd < 0)
        return pms_err(errno, "Could not open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return pms_err(e, "could not stat '%s': %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return pms_err(EISDIR, "'%s' is a directory", path);
    }
    if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) {
        close(fd);
        return pms_err(EINVAL, "'%s' is a %s, not an image file", path,
                       S_ISFIFO(st.st_mode) ? "FIFO" : "socket");
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    if (!(o && o->force_share) && S_ISREG(st.st_mode)) {
        int r = take_locks(bs, fd, path);
        if (r < 0) {
            close(fd);
            return r;
        }
    }
    s->fd = fd;
    s->is_blk = S_ISBLK(st.st_mode);
    s->cache_len = !bs->readonly && S_ISREG(st.st_mode);
    s->len = (uint64_t)st.st_size;
    s->direct = direct;
    if (direct) {
        dio_align(s);
        pthread_rwlock_init(&s->dio_lock, NULL);
    }
    return 0;
}

static void file_close(struct bdev *bs)
{
    struct file_state *s = bs->opaque;
    close(s->fd);
    if (s->direct)
        pthread_rwlock_destroy(&s->dio_lock);
}

/* The file's length: the cached one, or fstat (read-only opens). */
static int64_t cur_len(struct bdev *bs)
{
    struct file_state *s = bs->opaque;
    if (s->cache_len)
        return (int64_t)__atomic_load_n(&s->len, __ATOMIC_ACQUIRE);
    struct stat st;
    if (fstat(s->fd, &st) < 0)
        return pms_err(errno, "stat of '%s' failed", bs->filename);
    return st.st_size;
}

/* The file now reaches at least `end`. */
static void grew_to(struct file_state *s, uint64_t end)
{
    uint64_t cur = __atomic_load_n(&s->len, __ATOMIC_RELAXED);
    while (cur < end &&
           !__atomic_compare_exchange_n(&s->len, &cur, end, true, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED))
        ;
}

/* plain pread loop; past EOF reads as zeroes */
static int raw_read(struct bdev *bs, void *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    uint8_t *p = buf;
    while (len) {
        ssize_t n = pread(s->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return pms_err(errno, "read error on '%s' at %llu: %s", bs->filename,
                           (unsigned long long)off, strerror(errno));
        }
        if (n == 0) {             /* past EOF reads as zeroes */
            memset(p, 0, len);
            return 0;
        }
        p += n; off += (uint64_t)n; len -= (uint64_t)n;
    }
    return 0;
}

static int raw_write(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    const uint8_t *p = buf;
    uint64_t end = off + len;
    while (len) {
        ssize_t n = pwrite(s->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            if (s->cache_len && off > __atomic_load_n(&s->len, __ATOMIC_RELAXED))
                grew_to(s, off);          /* a partial write may have extended it */
            return pms_err(e, "write error on '%s' at %llu: %s", bs->filename,
                           (unsigned long long)off, strerror(e));
        }
        p += n; off += (uint64_t)n; len -= (uint64_t)n;
    }
    if (s->cache_len)
        grew_to(s, end);
    return 0;
}

static bool aligned(const struct file_state *s, const void *buf, uint64_t len, uint64_t off)
{
    return ((uintptr_t)buf & (s->mem_align - 1)) == 0 && (len & (s->align - 1)) == 0 &&
           (off & (s->align - 1)) == 0;
}

static void *bounce_alloc(const struct file_state *s, size_t n)
{
    void *b = NULL;
    return posix_memalign(&b, s->mem_align, n) == 0 ? b : NULL;
}

static int file_pread(struct bdev *bs, void *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    if (!s->direct || aligned(s, buf, len, off))
        return raw_read(bs, buf, len, off);
    /* through an aligned bounce buffer, BOUNCE_MAX at a time */
    uint64_t a = s->align;
    uint8_t *b = bounce_alloc(s, BOUNCE_MAX + 2 * a);
    if (!b)
        return pms_err(ENOMEM, "out of memory");
    uint8_t *p = buf;
    int r = 0;
    while (r == 0 && len) {
        uint64_t a0 = off & ~(a - 1);
        uint64_t n = len < BOUNCE_MAX ? len : BOUNCE_MAX;
        uint64_t a1 = (off + n + a - 1) & ~(a - 1);
        r = raw_read(bs, b, a1 - a0, a0);
        if (r == 0)
            memcpy(p, b + (off - a0), n);
        p += n; off += n; len -= n;
    }
    free(b);
    return r;
}

/* Direct write of an aligned range from an unaligned buffer (no read). */
static int copy_write(struct bdev *bs, const uint8_t *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    uint8_t *b = bounce_alloc(s, len < BOUNCE_MAX ? len : BOUNCE_MAX);
    if (!b)
        return pms_err(ENOMEM, "out of memory");
    int r = 0;
    while (r == 0 && len) {
        uint64_t n = len < BOUNCE_MAX ? len : BOUNCE_MAX;
        memcpy(b, buf, n);
        r = raw_write(bs, b, n, off);
        buf += n; off += n; len -= n;
    }
    free(b);
    return r;
}

/* Read-modify-write of the aligned blocks around [off, off+len); dio_lock
 * held exclusively by the caller.  A block past the end reads as zeroes;
 * the file is trimmed back to where a plain write would have ended it. */
static int rmw_write(struct bdev *bs, const uint8_t *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    uint64_t a = s->align;
    int64_t flen = cur_len(bs);
    if (flen < 0)
        return (int)flen;
    uint64_t want = (uint64_t)flen > off + len ? (uint64_t)flen : off + len;
    uint8_t *b = bounce_alloc(s, BOUNCE_MAX + 2 * a);
    if (!b)
        return pms_err(ENOMEM, "out of memory");
    int r = 0;
    uint64_t top = 0;
    while (r == 0 && len) {
        uint64_t a0 = off & ~(a - 1);
        uint64_t n = len < BOUNCE_MAX ? len : BOUNCE_MAX;
        uint64_t a1 = (off + n + a - 1) & ~(a - 1);
        /* only the first and last blocks need their old contents */
        if (off != a0)
            r = raw_read(bs, b, a, a0);
        if (r == 0 && ((off + n) & (a - 1)) && (a1 - a > a0 || off == a0))
            r = raw_read(bs, b + (a1 - a - a0), a, a1 - a);
        if (r == 0) {
            memcpy(b + (off - a0), buf, n);
            r = raw_write(bs, b, a1 - a0, a0);
        }
        if (a1 > top) top = a1;
        buf += n; off += n; len -= n;
    }
    free(b);
    if (top > want && !s->is_blk) {
        if (ftruncate(s->fd, (off_t)want) < 0 && r == 0)
            r = pms_err(errno, "could not trim '%s': %s", bs->filename, strerror(errno));
        if (s->cache_len)
            __atomic_store_n(&s->len, want, __ATOMIC_RELEASE);
    }
    return r;
}

/* On a node marked eager_writeout (a mapped device's image, or one opened with
 * pms_open_opts.eager_writeout, as pmemsnap serve does), a buffered
 * write at least this large starts its write-out at once
 * (sync_file_range, no wait): the qcow2 engine writes whole clusters and
 * host-contiguous runs of them, and overlapping their write-out with the rest
 * of a batch shortened the flush that follows (an internal snapshot after
 * 10 MiB of random stores: 186-197 ms -> 106-129 ms here).  Smaller writes
 * (scattered subclusters) are left for the flush to merge: starting each
 * at once made the same external snapshot slower (61-85 -> 90-130 ms).
 * Other users (the CLI, QEMU's iotests) keep the plain page-cache
 * behaviour: starting write-out early changes how the file system lays
 * out a file, which tests measuring exact disk usage saw. */
#define WRITEOUT_MIN_BYTES (64u << 10)

static int file_pwrite(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    if (!s->direct) {
        int r = raw_write(bs, buf, len, off);
        if (r == 0 && len >= WRITEOUT_MIN_BYTES && !s->is_blk &&
            __atomic_load_n(&bs->eager_writeout, __ATOMIC_RELAXED))
            (void)sync_file_range(s->fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
        return r;
    }
    int r;
    if (aligned(s, buf, len, off) || ((len | off) & (s->align - 1)) == 0) {
        pthread_rwlock_rdlock(&s->dio_lock);
        r = aligned(s, buf, len, off) ? raw_write(bs, buf, len, off)
                                      : copy_write(bs, buf, len, off);
    } else {
        pthread_rwlock_wrlock(&s->dio_lock);
        r = rmw_write(bs, buf, len, off);
    }
    pthread_rwlock_unlock(&s->dio_lock);
    return r;
}

/* extend to `end` (a sparse tail), never shrink */
static int extend(struct bdev *bs, uint64_t end)
{
    struct file_state *s = bs->opaque;
    if (ftruncate(s->fd, (off_t)end) < 0)
        return pms_err(errno, "could not extend '%s': %s", bs->filename, strerror(errno));
    if (s->cache_len)
        grew_to(s, end);
    return 0;
}

/* Write zeroes over [off, off+len). */
static int write_zeroes(struct bdev *bs, uint64_t off, uint64_t len)
{
    static const uint8_t zeroes[65536];
    while (len) {
        uint64_t n = len < sizeof zeroes ? len : sizeof zeroes;
        int r = file_pwrite(bs, zeroes, n, off);
        if (r < 0) return r;
        off += n; len -= n;
    }
    return 0;
}

static int file_zero(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags)
{
    (void)flags;
    struct file_state *s = bs->opaque;
    if (!s->is_blk && len) {
        int64_t flen = cur_len(bs);
        if (flen < 0)
            return (int)flen;
        if (off >= (uint64_t)flen)          /* entirely past the end: a hole */
            return extend(bs, off + len);
        if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)off, (off_t)len) == 0)
            return (uint64_t)flen < off + len ? extend(bs, off + len) : 0;
        if (fallocate(s->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0) {
            if (s->cache_len)
                grew_to(s, off + len);
            return 0;
        }
    }
    return write_zeroes(bs, off, len);
}

static int file_reserve(struct bdev *bs, uint64_t off, uint64_t len)
{
    struct file_state *s = bs->opaque;
    if (s->is_blk)
        return 0;                   /* a device's blocks all exist */
    if (fallocate(s->fd, 0, (off_t)off, (off_t)len) == 0) {
        if (s->cache_len)
            grew_to(s, off + len);
        return 0;
    }
    int e = errno;
    if (e != EOPNOTSUPP && e != ENOSYS && e != EINVAL)
        return pms_err(e, "could not reserve %llu bytes at %llu in '%s': %s",
                       (unsigned long long)len, (unsigned long long)off, bs->filename,
                       strerror(e));
    /* no fallocate here: what lies past the end of the file is unused, so
     * zeroes written there take the space */
    int64_t flen = cur_len(bs);
    if (flen < 0)
        return (int)flen;
    uint64_t from = off > (uint64_t)flen ? off : (uint64_t)flen;
    return from < off + len ? write_zeroes(bs, from, off + len - from) : 0;
}

static int file_discard(struct bdev *bs, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    if (!s->is_blk)
        (void)fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        (off_t)off, (off_t)len);
    return 0;
}

static int file_flush(struct bdev *bs)
{
    struct file_state *s = bs->opaque;
    if (fdatasync(s->fd) < 0)
        return pms_err(errno, "flush of '%s' failed: %s", bs->filename, strerror(errno));
    return 0;
}

static int64_t file_getlength(struct bdev *bs)
{
    struct file_state *s = bs->opaque;
    if (s->is_blk) {
        uint64_t sz;
        if (ioctl(s->fd, BLKGETSIZE64, &sz) < 0)
            return pms_err(errno, "BLKGETSIZE64 on '%s' failed", bs->filename);
        return (int64_t)sz;
    }
    return cur_len(bs);
}

static int file_truncate(struct bdev *bs, uint64_t size)
{
    struct file_state *s = bs->opaque;
    if (s->is_blk)
        return pms_err(ENOTSUP, "cannot resize block device '%s'", bs->filename);
    if (ftruncate(s->fd, (off_t)size) < 0)
        return pms_err(errno, "could not resize '%s': %s", bs->filename, strerror(errno));
    if (s->cache_len)
        __atomic_store_n(&s->len, size, __ATOMIC_RELEASE);
    return 0;
}

static int file_block_status(struct bdev *bs, uint64_t off, uint64_t len, struct pms_extent *e)
{
    struct file_state *s = bs->opaque;
    e->start = off;
    e->host_offset = off;
    off_t d = lseek(s->fd, (off_t)off, SEEK_DATA);
    if (d < 0 && errno == ENXIO) {          /* hole to EOF */
        e->length = len;
        e->flags = PMS_BLOCK_ZERO | PMS_BLOCK_OFFSET | PMS_BLOCK_ALLOCATED;
        return 0;
    }
    if (d < 0) {
        e->length = len;
        e->flags = PMS_BLOCK_DATA | PMS_BLOCK_OFFSET | PMS_BLOCK_ALLOCATED;
        return 0;
    }
    if ((uint64_t)d > off) {
        uint64_t n = (uint64_t)d - off;
        e->length = n < len ? n : len;
        e->flags = PMS_BLOCK_ZERO | PMS_BLOCK_OFFSET | PMS_BLOCK_ALLOCATED;
        return 0;
    }
    off_t h = lseek(s->fd, (off_t)off, SEEK_HOLE);
    uint64_t n = h < 0 ? len : (uint64_t)h - off;
    if (n == 0) n = len;
    e->length = n < len ? n : len;
    e->flags = PMS_BLOCK_DATA | PMS_BLOCK_OFFSET | PMS_BLOCK_ALLOCATED;
    return 0;
}

const struct pms_driver pms_drv_file = {
    .name = "file",
    .state_size = sizeof(struct file_state),
    .open = file_open,
    .close = file_close,
    .pread = file_pread,
    .pwrite = file_pwrite,
    .pwrite_zeroes = file_zero,
    .discard = file_discard,
    .reserve = file_reserve,
    .flush = file_flush,
    .getlength = file_getlength,
    .truncate = file_truncate,
    .block_status = file_block_status,
};
