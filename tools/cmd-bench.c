/* `pmemsnap bench`: qemu-img bench work-alike (same options, same two lines
 * of output), to compare the pmemsnap block engine with QEMU's on one image.
 *
 * Request i goes to offset o_i: o_0 = -o OFFSET, o_{i+1} = (o_i + STEP) mod
 * image size, as qemu-img bench does.  Depth D is served by a pool of
 * min(D, 16) threads, each taking the next request number from a shared
 * counter and issuing a synchronous pms_pread/pms_pwrite; qemu-img keeps D
 * AIO requests in flight from one thread instead.  (The library serialises
 * requests on one format node under its lock, so more threads would only
 * add contention; at most 16 requests are ever in the engine at once.)
 * With --flush-interval=N a pms_flush follows every N-th completed request.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include "cli.h"

#define MAX_WORKERS 16

struct bench {
    pms_dev *dev;
    uint64_t count, bufsize, step, offset, image_size, flush_interval;
    bool write;
    int pattern;
    atomic_uint_fast64_t next;
    atomic_uint_fast64_t completed;
    atomic_int failed;             /* first error (negative errno) */
    pthread_mutex_t lock;
    char errmsg[256];
};

static void fail(struct bench *b, int r)
{
    pthread_mutex_lock(&b->lock);
    if (atomic_load(&b->failed) == 0) {
        snprintf(b->errmsg, sizeof b->errmsg, "%s", strerror(-r));
        atomic_store(&b->failed, r);
    }
    pthread_mutex_unlock(&b->lock);
}

static void *worker(void *opaque)
{
    struct bench *b = opaque;
    uint8_t *buf = malloc(b->bufsize ? b->bufsize : 1);
    if (!buf) {
        fail(b, -ENOMEM);
        return NULL;
    }
    memset(buf, b->pattern, b->bufsize);
    for (;;) {
        if (atomic_load(&b->failed))
            break;
        uint64_t i = atomic_fetch_add(&b->next, 1);
        if (i >= b->count)
            break;
        /* o_i = (offset + i * step) mod size for i >= 1 (o_0 = offset) */
        uint64_t off = b->offset;
        if (i > 0 && b->image_size)
            off = (uint64_t)(((unsigned __int128)b->offset + (unsigned __int128)i * b->step) %
                             b->image_size);
        int r;
        if (off > b->image_size || b->bufsize > b->image_size - off)
            r = -EIO;                  /* as qemu: out-of-range request fails */
        else
            r = b->write ? pms_pwrite(b->dev, buf, b->bufsize, off)
                         : pms_pread(b->dev, buf, b->bufsize, off);
        if (r < 0) {
            fail(b, r);
            break;
        }
        uint64_t done = atomic_fetch_add(&b->completed, 1) + 1;
        if (b->flush_interval && done % b->flush_interval == 0) {
            r = pms_flush(b->dev);
            if (r < 0) {
                fail(b, r);
                break;
            }
        }
    }
    free(buf);
    return NULL;
}

static int bad(const char *what)
{
    errorf("%s", what);
    return 1;
}

int cmd_bench(int argc, char **argv)
{
    enum { OPT_PATTERN = 300, OPT_FLUSH, OPT_NODRAIN, OPT_FORCE };
    static const struct option lo[] = {
        { "pattern", required_argument, NULL, OPT_PATTERN },
        { "flush-interval", required_argument, NULL, OPT_FLUSH },
        { "no-drain", no_argument, NULL, OPT_NODRAIN },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL;
    uint64_t count = 75000, depth = 64, bufsize = 4096, step = 0, offset = 0, fi = 0, v;
    int pattern = 0, cache = PMS_CACHE_WRITEBACK, quiet = 0, write = 0, force = 0, ch;
    bool has_pattern = false, has_fi = false;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":c:d:f:ni:o:qs:S:t:wU", lo, NULL)) != -1) {
        switch (ch) {
        case 'c':
            if (parse_uint(optarg, &count) < 0 || count > INT32_MAX)
                return bad("Invalid request count specified");
            break;
        case 'd':
            if (parse_uint(optarg, &depth) < 0 || depth < 1 || depth > INT32_MAX)
                return bad("Invalid queue depth specified");
            break;
        case 'f': fmt = optarg; break;
        case 'n': cache = PMS_CACHE_NONE; break;
        case 'i':
            if (strcmp(optarg, "threads") && strcmp(optarg, "native") &&
                strcmp(optarg, "io_uring")) {
                errorf("Invalid aio option: %s", optarg);
                return 1;
            }
            break;
        case 'o':
            if (parse_size(optarg, &offset) < 0 || offset > INT64_MAX)
                return bad("Invalid offset specified");
            break;
        case 'q': quiet = 1; break;    /* accepted; qemu-img bench prints anyway */
        case 's':
            if (parse_size(optarg, &bufsize) < 0 || bufsize > INT32_MAX)
                return bad("Invalid buffer size specified");
            break;
        case 'S':
            if (parse_size(optarg, &step) < 0 || step > INT32_MAX)
                return bad("Invalid step size specified");
            break;
        case 't':
            if (parse_cache_mode(optarg, &cache) < 0)
                return bad("Invalid cache mode");
            break;
        case 'w': write = 1; break;
        case 'U': force = 1; break;
        case OPT_PATTERN:
            if (parse_uint(optarg, &v) < 0 || v > 0xff)
                return bad("Invalid pattern byte specified");
            pattern = (int)v;
            has_pattern = true;
            break;
        case OPT_FLUSH:
            if (parse_uint(optarg, &fi) < 0 || fi > INT32_MAX)
                return bad("Invalid flush interval specified");
            has_fi = true;
            break;
        case OPT_NODRAIN: break;       /* our flushes never drain other requests */
        case OPT_FORCE: break;
        case ':':
        default: return getopt_error("bench", ch, argv, lo);
        }
    }
    if (optind != argc - 1)
        return usage_error("Expecting one image file name");
    if (has_fi && !write)
        return bad("--flush-interval is only available in write tests");
    if (has_pattern && !write)
        return bad("--pattern is only available in write tests");
    if (fi && fi < depth)
        return bad("Flush interval can't be smaller than depth");
    if (write && force)
        return bad("--force-share/-U is not allowed with -w");
    if (!step)
        step = bufsize;
    const char *file = argv[optind];
    pms_dev *dev = open_image(file, fmt, !write, cache, false, force);
    if (!dev)
        return 1;
    struct bench b = {
        .dev = dev, .count = count, .bufsize = bufsize, .step = step, .offset = offset,
        .image_size = (uint64_t)pms_size(dev), .flush_interval = fi, .write = write,
        .pattern = pattern,
    };
    pthread_mutex_init(&b.lock, NULL);
    (void)quiet;
    {
        printf("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
               " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64 ")\n",
               count, write ? "write" : "read", bufsize, depth, offset, step);
        if (fi)
            printf("Sending flush every %" PRIu64 " requests\n", fi);
        fflush(stdout);
    }
    int nw = depth < MAX_WORKERS ? (int)depth : MAX_WORKERS;
    if ((uint64_t)nw > count) nw = count ? (int)count : 1;
    pthread_t th[MAX_WORKERS];
    struct timeval t1, t2;
    gettimeofday(&t1, NULL);
    int started = 0;
    if (nw == 1)
        worker(&b);
    else
        for (; started < nw; started++)
            if (pthread_create(&th[started], NULL, worker, &b) != 0) {
                fail(&b, -EAGAIN);
                break;
            }
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    gettimeofday(&t2, NULL);
    int rc = 0;
    if (atomic_load(&b.failed)) {
        errorf("Failed request: %s", b.errmsg);
        rc = 1;
    } else
        printf("Run completed in %3.3f seconds.\n",
               (double)(t2.tv_sec - t1.tv_sec) + (double)(t2.tv_usec - t1.tv_usec) / 1e6);
    pthread_mutex_destroy(&b.lock);
    return close_after(dev, rc);
}
