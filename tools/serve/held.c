/* Held writes: FUSE writes the image could not take for want of space (a
 * full disk, a quota), kept in the daemon until it can.
 *
 * Why: the kernel writes a mapping's dirty pages back to us (FUSE_WRITE)
 * and, when we answer with an error, marks them clean anyway; it reports
 * the error once, to the next msync/fsync.  The bytes then exist only in
 * the page cache, which later drops them: a store into a PMDK pool or a
 * guest's NVDIMM on a full disk was lost for good, while the file still
 * showed it (and a later fsync returned 0).  So a write that fails with
 * ENOSPC/EDQUOT is answered as done and kept here instead, and:
 *   - every fsync (FUSE_FSYNC; a snapshot's final flush is one) first
 *     writes the held writes to the image, in arrival order, and fails with
 *     ENOSPC while any remain: nothing held is ever reported durable, and
 *     no snapshot is taken without them;
 *   - while any are held, every new write and every zeroing goes behind
 *     them (retrying them first), so an older held write never lands over
 *     a newer one;
 *   - reads overlay the held bytes on the image's, under the same lock as
 *     the retries, so a reader sees what was written.
 * At most HELD_MAX_BYTES are held; a write beyond that gets the error, as
 * before (the writer, or the kernel, hears of it).  A revert drops them
 * (they predate it); shutdown retries once more and reports what it could
 * not store.
 *
 * Entry states: HELD (in `v`, not in the image) -> STORED (written by a
 * drain, removed from `v`; the image then holds it until the next flush
 * makes it durable like any write).
 *
 * Threads: FUSE worker threads (write, read, fsync, fallocate) and the
 * control thread (revert, shutdown) enter here, each with srv.io_lock held
 * (shared for FUSE ops, exclusive for a revert); `mu` guards `v` and is
 * held across the image calls of a drain or an overlaid read, so the
 * order of held writes and reads is one order.  `bytes` is also read
 * lock-free (atomic) to keep the common path (nothing held) free of `mu`.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "serve.h"

/* Most bytes of writes held at once.  A VM's NVDIMM or a PMDK pool writes
 * back at most what the kernel lets it keep dirty (its strict 1% share, or
 * the lifted limit under root: a few hundred MiB on this machine); 256 MiB
 * keeps a busy guest's write-back through a full-disk episode, and bounds
 * what the daemon itself takes from memory. */
#define HELD_MAX_BYTES (256ull << 20)

struct held_write {
    uint64_t off;
    size_t len;
    uint8_t *data;
};

void held_init(struct held *h)
{
    memset(h, 0, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
}

void held_destroy(struct held *h)
{
    held_clear(h);
    free(h->v);
    pthread_mutex_destroy(&h->mu);
}

bool held_any(struct held *h)
{
    return atomic_load(&h->bytes) != 0;
}

uint64_t held_bytes(struct held *h)
{
    return atomic_load(&h->bytes);
}

/* err (a -errno of pms_pwrite) means "no room": the write may be held. */
static bool retryable(int err)
{
    return err == -ENOSPC || err == -EDQUOT;
}

/* Store the held writes in order until one fails.  mu held. */
static int drain_locked(struct held *h, pms_dev *dev)
{
    size_t i = 0;
    int r = 0;
    for (; i < h->n; i++) {
        r = pms_pwrite(dev, h->v[i].data, h->v[i].len, h->v[i].off);
        if (r < 0)
            break;
        atomic_fetch_sub(&h->bytes, h->v[i].len);
        free(h->v[i].data);
    }
    memmove(h->v, h->v + i, (h->n - i) * sizeof *h->v);
    h->n -= i;
    if (i && !h->n)
        fprintf(stderr, "pmemsnap: the held writes are stored in the image\n");
    return r;
}

/* Keep a copy of [off, off+len).  mu held. */
static int add_locked(struct held *h, const void *buf, size_t len, uint64_t off)
{
    if (atomic_load(&h->bytes) + len > HELD_MAX_BYTES)
        return -ENOSPC;
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        struct held_write *v = realloc(h->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        h->v = v;
        h->cap = cap;
    }
    uint8_t *d = malloc(len);
    if (!d)
        return -ENOMEM;
    memcpy(d, buf, len);
    h->v[h->n++] = (struct held_write){ off, len, d };
    if (atomic_fetch_add(&h->bytes, len) == 0)
        fprintf(stderr, "pmemsnap: the image's file system is full: writes are held in the "
                "daemon (at most %llu MiB) until there is room; fsync and snapshots fail "
                "meanwhile\n", HELD_MAX_BYTES >> 20);
    return 0;
}

int held_pwrite(struct held *h, pms_dev *dev, const void *buf, size_t len, uint64_t off)
{
    int r = 0;                      /* 0: not tried directly */
    if (!held_any(h)) {             /* the common path: nothing held, no lock */
        r = pms_pwrite(dev, buf, len, off);
        if (!retryable(r))
            return r;
    }
    pthread_mutex_lock(&h->mu);
    if (h->n)                       /* behind the held ones */
        r = drain_locked(h, dev);
    if (r == 0)
        r = pms_pwrite(dev, buf, len, off);
    if (r < 0 && retryable(r))
        r = add_locked(h, buf, len, off);
    pthread_mutex_unlock(&h->mu);
    return r;
}

int held_drain(struct held *h, pms_dev *dev)
{
    if (!held_any(h))
        return 0;
    pthread_mutex_lock(&h->mu);
    int r = drain_locked(h, dev);
    pthread_mutex_unlock(&h->mu);
    return r;
}

int held_pread(struct held *h, pms_dev *dev, void *buf, size_t len, uint64_t off)
{
    if (!held_any(h))
        return pms_pread(dev, buf, len, off);
    pthread_mutex_lock(&h->mu);
    int r = pms_pread(dev, buf, len, off);
    for (size_t i = 0; r == 0 && i < h->n; i++) {     /* in order: newer last */
        const struct held_write *w = &h->v[i];
        uint64_t s = w->off > off ? w->off : off;
        uint64_t e = w->off + w->len < off + len ? w->off + w->len : off + len;
        if (s < e)
            memcpy((uint8_t *)buf + (s - off), w->data + (s - w->off), e - s);
    }
    pthread_mutex_unlock(&h->mu);
    return r;
}

uint64_t held_clear(struct held *h)
{
    pthread_mutex_lock(&h->mu);
    uint64_t dropped = atomic_load(&h->bytes);
    for (size_t i = 0; i < h->n; i++)
        free(h->v[i].data);
    h->n = 0;
    atomic_store(&h->bytes, 0);
    pthread_mutex_unlock(&h->mu);
    return dropped;
}
