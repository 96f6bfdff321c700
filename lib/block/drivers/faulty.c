/* Protocol driver "faulty": a POSIX file behind a simulated volatile write
 * cache, for crash-consistency and I/O-error tests (like SQLite's crash VFS).
 *
 * Writes are kept in an in-memory log until flush, which applies them to the
 * file in order and fdatasyncs.  Reads see the file overlaid with the log.
 * After `crash_after` write requests the device "loses power": each logged
 * (unflushed) write is applied whole, dropped, or (mode=tear) applied in a
 * random subset of its 512-byte sectors, chosen by `seed`; the file then
 * holds what a real disk might, and every later request fails with EIO.
 * `read_error_at=OFF` makes any read covering file byte OFF fail with EIO;
 * `read_error_after=N` fails every read after the first N.
 *
 * `flush_delay_us=N` makes a flush take N us with the log unlocked, as a
 * real device's does: writes arriving meanwhile stay unflushed (a flush
 * applies only what was logged when it began), so callers that flush
 * beside writes (bdev_checkpoint) are tested with the window they have on
 * a real disk.
 *
 * `flush_error_at=N` fails the Nth flush that holds writes (1 = the first)
 * with EIO and drops what it held, as Linux does when write-back fails (the
 * pages are marked clean and fdatasync reports the error once): later
 * flushes succeed at the device, and only the caller can remember the loss.
 *
 * Spec: "seed=N,crash_after=N,mode=drop|tear,read_error_at=OFF,read_error_after=N,
 * flush_delay_us=N,flush_error_at=N".
 *
 * Threads: the parent format node calls this with its own lock held, but the
 * memory device may read through a raw parent concurrently, so the log is
 * guarded by `mu`.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "../block.h"
#include "../../util/error.h"
#include "../../util/size.h"

struct wlog { uint64_t off, len; uint8_t *data; uint64_t seq; };

struct faulty_state {
    int fd;
    pthread_mutex_t mu;
    struct wlog *log;
    size_t nlog, caplog;
    uint64_t seed;
    uint64_t crash_after;        /* 0 = never */
    uint64_t writes;
    bool tear;
    bool crashed;
    uint64_t read_error_at;      /* UINT64_MAX = none */
    uint64_t read_error_after;   /* UINT64_MAX = none */
    uint64_t reads;
    uint64_t logical_size;       /* file size including logged writes */
    uint64_t flush_delay_us;     /* a flush's duration, log unlocked (0: none) */
    uint64_t next_seq;           /* sequence number of the next logged write */
    uint64_t flush_error_at;     /* 0 = none */
    uint64_t flushes;            /* flushes that held writes */
};

static uint64_t rnd(uint64_t *x)
{
    *x ^= *x << 13; *x ^= *x >> 7; *x ^= *x << 17;
    return *x;
}

static int parse_spec(struct faulty_state *s, const char *spec)
{
    char *dup = strdup(spec), *save = NULL;
    if (!dup) return pms_err(ENOMEM, "out of memory");
    int r = 0;
    for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(t, '=');
        if (!eq) { r = pms_err(EINVAL, "fault spec: '%s' is not key=value", t); break; }
        *eq = '\0';
        const char *k = t, *v = eq + 1;
        uint64_t n = 0;
        if (strcmp(k, "mode") == 0) {
            if (strcmp(v, "drop") == 0) s->tear = false;
            else if (strcmp(v, "tear") == 0) s->tear = true;
            else { r = pms_err(EINVAL, "fault spec: mode must be drop or tear"); break; }
            continue;
        }
        if (pms_parse_size(v, &n) < 0) { r = pms_err(EINVAL, "fault spec: bad number '%s'", v); break; }
        if (strcmp(k, "seed") == 0) s->seed = n ? n : 1;
        else if (strcmp(k, "crash_after") == 0) s->crash_after = n;
        else if (strcmp(k, "read_error_at") == 0) s->read_error_at = n;
        else if (strcmp(k, "read_error_after") == 0) s->read_error_after = n;
        else if (strcmp(k, "flush_delay_us") == 0) s->flush_delay_us = n;
        else if (strcmp(k, "flush_error_at") == 0) s->flush_error_at = n;
        else { r = pms_err(EINVAL, "fault spec: unknown key '%s'", k); break; }
    }
    free(dup);
    return r;
}

static int faulty_open(struct bdev *bs, const char *path, const struct pms_open_opts *o)
{
    struct faulty_state *s = bs->opaque;
    s->seed = 1;
    s->read_error_at = UINT64_MAX;
    s->read_error_after = UINT64_MAX;
    int r = parse_spec(s, o->fault_spec);
    if (r < 0) return r;
    s->fd = open(path, (bs->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (s->fd < 0)
        return pms_err(errno, "Could not open '%s': %s", path, strerror(errno));
    struct stat st;
    fstat(s->fd, &st);
    s->logical_size = (uint64_t)st.st_size;
    pthread_mutex_init(&s->mu, NULL);
    return 0;
}

static void drop_log(struct faulty_state *s)
{
    for (size_t i = 0; i < s->nlog; i++) free(s->log[i].data);
    s->nlog = 0;
}

static int apply(struct faulty_state *s, const struct wlog *w, uint64_t from, uint64_t len)
{
    const uint8_t *p = w->data + from;
    uint64_t off = w->off + from;
    while (len) {
        ssize_t n = pwrite(s->fd, p, len, (off_t)off);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        p += n; off += (uint64_t)n; len -= (uint64_t)n;
    }
    return 0;
}

/* Power loss: a random subset of the unflushed writes reaches the disk. */
static void crash(struct faulty_state *s)
{
    for (size_t i = 0; i < s->nlog; i++) {
        struct wlog *w = &s->log[i];
        uint64_t x = rnd(&s->seed);
        if (!s->tear) {
            if (x & 1) apply(s, w, 0, w->len);
            continue;
        }
        for (uint64_t o = 0; o < w->len; ) {
            uint64_t n = 512 - ((w->off + o) & 511);
            if (n > w->len - o) n = w->len - o;
            if (rnd(&s->seed) % 3 != 0) apply(s, w, o, n);
            o += n;
        }
    }
    drop_log(s);
    s->crashed = true;
}

static void faulty_close(struct bdev *bs)
{
    struct faulty_state *s = bs->opaque;
    /* closing without a flush is a crash too: unflushed data may be lost */
    if (!s->crashed && s->crash_after) crash(s);
    drop_log(s);
    free(s->log);
    close(s->fd);
    pthread_mutex_destroy(&s->mu);
}

static int faulty_pread(struct bdev *bs, void *buf, uint64_t len, uint64_t off)
{
    struct faulty_state *s = bs->opaque;
    pthread_mutex_lock(&s->mu);
    int r = 0;
    s->reads++;
    if (s->crashed)
        r = pms_err(EIO, "faulty: device has crashed");
    else if (s->reads > s->read_error_after ||
             (s->read_error_at >= off && s->read_error_at < off + len))
        r = pms_err(EIO, "faulty: injected read error at %llu", (unsigned long long)off);
    if (r == 0) {
        uint8_t *p = buf;
        uint64_t o = off, l = len;
        while (l) {
            ssize_t n = pread(s->fd, p, l, (off_t)o);
            if (n < 0) { if (errno == EINTR) continue; r = pms_err(errno, "faulty: read failed"); break; }
            if (n == 0) { memset(p, 0, l); break; }
            p += n; o += (uint64_t)n; l -= (uint64_t)n;
        }
        for (size_t i = 0; r == 0 && i < s->nlog; i++) {
            struct wlog *w = &s->log[i];
            uint64_t a = w->off > off ? w->off : off;
            uint64_t b = w->off + w->len < off + len ? w->off + w->len : off + len;
            if (a < b)
                memcpy((uint8_t *)buf + (a - off), w->data + (a - w->off), b - a);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int faulty_pwrite(struct bdev *bs, const void *buf, uint64_t len, uint64_t off)
{
    struct faulty_state *s = bs->opaque;
    pthread_mutex_lock(&s->mu);
    int r = 0;
    if (s->crashed) {
        r = pms_err(EIO, "faulty: device has crashed");
        goto out;
    }
    if (s->nlog == s->caplog) {
        size_t nc = s->caplog ? s->caplog * 2 : 64;
        struct wlog *nl = realloc(s->log, nc * sizeof *nl);
        if (!nl) { r = pms_err(ENOMEM, "out of memory"); goto out; }
        s->log = nl;
        s->caplog = nc;
    }
    uint8_t *d = malloc(len);
    if (!d) { r = pms_err(ENOMEM, "out of memory"); goto out; }
    memcpy(d, buf, len);
    s->log[s->nlog++] = (struct wlog){ off, len, d, s->next_seq++ };
    if (off + len > s->logical_size) s->logical_size = off + len;
    s->writes++;
    if (s->crash_after && s->writes >= s->crash_after) {
        crash(s);
        r = pms_err(EIO, "faulty: device crashed");
    }
out:
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int faulty_zero(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags)
{
    (void)flags;
    uint8_t *z = calloc(1, len < (1 << 20) ? len : (1 << 20));
    if (!z) return pms_err(ENOMEM, "out of memory");
    int r = 0;
    while (len && r == 0) {
        uint64_t n = len < (1 << 20) ? len : (1 << 20);
        r = faulty_pwrite(bs, z, n, off);
        off += n; len -= n;
    }
    free(z);
    return r;
}

static int faulty_flush(struct bdev *bs)
{
    struct faulty_state *s = bs->opaque;
    pthread_mutex_lock(&s->mu);
    uint64_t upto = s->next_seq;      /* this flush covers the writes before it */
    if (s->flush_delay_us) {
        pthread_mutex_unlock(&s->mu);
        usleep((useconds_t)s->flush_delay_us);
        pthread_mutex_lock(&s->mu);
    }
    int r = 0;
    if (s->crashed)
        r = pms_err(EIO, "faulty: device has crashed");
    /* the log is in sequence order; another flush meanwhile may have
     * applied part of what this one covers */
    size_t n = 0;
    while (n < s->nlog && s->log[n].seq < upto)
        n++;
    bool lose = r == 0 && n && ++s->flushes == s->flush_error_at;
    if (lose)
        r = pms_err(EIO, "faulty: injected flush error");
    for (size_t i = 0; r == 0 && i < n; i++)
        if (apply(s, &s->log[i], 0, s->log[i].len) < 0)
            r = pms_err(EIO, "faulty: write to file failed");
    if (r == 0 || lose) {              /* applied, or lost */
        for (size_t i = 0; i < n; i++)
            free(s->log[i].data);
        if (n && n < s->nlog)
            memmove(s->log, s->log + n, (s->nlog - n) * sizeof *s->log);
        s->nlog -= n;
        if (r == 0 && fdatasync(s->fd) < 0) r = pms_err(errno, "faulty: fdatasync failed");
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

static int64_t faulty_getlength(struct bdev *bs)
{
    struct faulty_state *s = bs->opaque;
    pthread_mutex_lock(&s->mu);
    int64_t l = (int64_t)s->logical_size;
    pthread_mutex_unlock(&s->mu);
    return l;
}

static int faulty_truncate(struct bdev *bs, uint64_t size)
{
    struct faulty_state *s = bs->opaque;
    int r = faulty_flush(bs);
    if (r < 0) return r;
    if (ftruncate(s->fd, (off_t)size) < 0) return pms_err(errno, "faulty: truncate failed");
    s->logical_size = size;
    return 0;
}

const struct pms_driver pms_drv_faulty = {
    .name = "faulty",
    .state_size = sizeof(struct faulty_state),
    .open = faulty_open,
    .close = faulty_close,
    .pread = faulty_pread,
    .pwrite = faulty_pwrite,
    .pwrite_zeroes = faulty_zero,
    .flush = faulty_flush,
    .getlength = faulty_getlength,
    .truncate = faulty_truncate,
};
