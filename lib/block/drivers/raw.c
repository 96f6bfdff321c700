/* Format driver "raw": guest offset == file offset.  Stateless; entered with
 * bs->lock held by the core (which it does not need). */
#include <string.h>
#include "../block.h"
#include "../../util/error.h"

static int raw_open(struct bdev *bs, const char *path, const struct pms_open_opts *o)
{
    (void)bs; (void)path; (void)o;
    return 0;
}
static void raw_close(struct bdev *bs) { (void)bs; }
static int raw_pread(struct bdev *bs, void *b, uint64_t l, uint64_t o)
{ return bdev_file_pread(bs->file, b, l, o); }
static int raw_pwrite(struct bdev *bs, const void *b, uint64_t l, uint64_t o)
{ return bdev_file_pwrite(bs->file, b, l, o); }
/* May unmap: the part past the end of the file (inside the last, partial
 * sector) already reads as zeroes and stays a hole, the file keeps its
 * length, as QEMU's file-posix punches with KEEP_SIZE; without it the
 * zeroes are written and the file grows. */
static int raw_zero(struct bdev *bs, uint64_t l, uint64_t o, unsigned f)
{
    if (f & BDEV_ZERO_MAY_UNMAP) {
        int64_t flen = bdev_file_length(bs->file);
        if (flen < 0)
            return (int)flen;
        if (o >= (uint64_t)flen)
            return 0;
        if (o + l > (uint64_t)flen)
            l = (uint64_t)flen - o;
    }
    return bdev_file_zero(bs->file, l, o);
}
static int raw_discard(struct bdev *bs, uint64_t l, uint64_t o)
{ return bdev_file_discard(bs->file, l, o); }
static int raw_flush(struct bdev *bs) { return bdev_file_flush(bs->file); }
/* Whole 512-byte sectors, as QEMU's block layer counts them (a 1000-byte
 * file is a 1024-byte disk; the protocol reads zeroes past the end, and a
 * write there extends the file). */
static int64_t raw_getlength(struct bdev *bs)
{
    int64_t n = bdev_file_length(bs->file);
    return n < 0 ? n : (int64_t)(((uint64_t)n + 511) & ~511ull);
}
static int raw_truncate(struct bdev *bs, uint64_t s) { return bdev_file_truncate(bs->file, s); }
static int raw_block_status(struct bdev *bs, uint64_t off, uint64_t len, struct pms_extent *e)
{
    if (!bs->file->drv->block_status) {     /* e.g. the faulty driver */
        e->start = off;
        e->length = len;
        e->host_offset = off;
        e->flags = PMS_BLOCK_DATA | PMS_BLOCK_OFFSET | PMS_BLOCK_ALLOCATED;
        return 0;
    }
    return bs->file->drv->block_status(bs->file, off, len, e);
}
static int raw_info(struct bdev *bs, struct pms_info *info)
{
    (void)bs;
    strcpy(info->format, "raw");
    return 0;
}

const struct pms_driver pms_drv_raw = {
    .name = "raw",
    .open = raw_open,
    .close = raw_close,
    .pread = raw_pread,
    .pwrite = raw_pwrite,
    .pwrite_zeroes = raw_zero,
    .discard = raw_discard,
    .flush = raw_flush,
    .getlength = raw_getlength,
    .truncate = raw_truncate,
    .block_status = raw_block_status,
    .info = raw_info,
};
