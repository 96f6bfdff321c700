/* Protocol driver "file": a POSIX file or block device.
 *
 * Stateless apart from the descriptor, so it is entered without a lock by
 * its parent (pread/pwrite are thread-safe).  Writes past the end extend the
 * file.  Zero writes punch holes where the file system can, else write zero
 * buffers.  cache=none is accepted but served through the page cache: qcow2
 * metadata updates are sub-sector, which O_DIRECT would reject.
 *
 * Locking: QEMU-compatible OFD byte locks (file-posix's scheme: byte 100+i
 * "holds permission i", byte 200+i "does not share permission i"; i = 1
 * write, 3 resize).  We take the "does not share write/resize" locks, so a
 * QEMU writer (qemu-io, qemu-img snapshot -c, a running VM) refuses the
 * image while we have it open, while QEMU readers (qemu-img info, check,
 * snapshot -l) still work; and we refuse an image a QEMU writer holds.
 * force_share (-U) skips all of it, as in QEMU.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <unistd.h>
#include "../block.h"
#include "../../util/error.h"

struct file_state { int fd; bool is_blk; };

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

static int file_open(struct bdev *bs, const char *path, const struct pms_open_opts *o)
{
    struct file_state *s = bs->opaque;
    int fd = open(path, (bs->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0)
        return pms_err(errno, "could not open '%s': %s", path, strerror(errno));
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
    if (!(o && o->force_share) && S_ISREG(st.st_mode)) {
        int r = take_locks(bs, fd, path);
        if (r < 0) {
            close(fd);
            return r;
        }
    }
    s->fd = fd;
    s->is_blk = S_ISBLK(st.st_mode);
    return 0;
}

static void file_close(struct bdev *bs)
{
    struct file_state *s = bs->opaque;
    close(s->fd);
}

static int file_pread(struct bdev *bs, void *buf, uint64_t len, uint64_t off)
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

static int file_pwrite(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    struct file_state *s = bs->opaque;
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = pwrite(s->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return pms_err(errno, "write error on '%s' at %llu: %s", bs->filename,
                           (unsigned long long)off, strerror(errno));
        }
        p += n; off += (uint64_t)n; len -= (uint64_t)n;
    }
    return 0;
}

static int file_zero(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags)
{
    (void)flags;
    struct file_state *s = bs->opaque;
    if (!s->is_blk) {
        struct stat st;
        if (fstat(s->fd, &st) == 0 && (uint64_t)st.st_size < off + len) {
            /* extend first so that the punched range exists */
            if (off >= (uint64_t)st.st_size) {
                if (ftruncate(s->fd, (off_t)(off + len)) == 0)
                    return 0;
            }
        }
        if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)off, (off_t)len) == 0) {
            if (fstat(s->fd, &st) == 0 && (uint64_t)st.st_size < off + len)
                if (ftruncate(s->fd, (off_t)(off + len)) < 0)
                    return pms_err(errno, "could not extend '%s'", bs->filename);
            return 0;
        }
        if (fallocate(s->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0)
            return 0;
    }
    static const uint8_t zeroes[65536];
    while (len) {
        uint64_t n = len < sizeof zeroes ? len : sizeof zeroes;
        int r = file_pwrite(bs, zeroes, n, off);
        if (r < 0) return r;
        off += n; len -= n;
    }
    return 0;
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
    struct stat st;
    if (fstat(s->fd, &st) < 0)
        return pms_err(errno, "stat of '%s' failed", bs->filename);
    return st.st_size;
}

static int file_truncate(struct bdev *bs, uint64_t size)
{
    struct file_state *s = bs->opaque;
    if (s->is_blk)
        return pms_err(ENOTSUP, "cannot resize block device '%s'", bs->filename);
    if (ftruncate(s->fd, (off_t)size) < 0)
        return pms_err(errno, "could not resize '%s': %s", bs->filename, strerror(errno));
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
    .flush = file_flush,
    .getlength = file_getlength,
    .truncate = file_truncate,
    .block_status = file_block_status,
};
