/* Live snapshots while io_uring moves data into and out of the mapping.
 *
 *   sp-iouring IMG MODE NS DIR
 *
 * io_uring runs requests in kernel threads of our own thread group
 * (iou-wrk-*, forced with IOSQE_ASYNC; iou-sqp-* for an SQPOLL ring) that
 * never run signal handlers, so the safepoint must not wait for them.
 * Three sources of traffic run while NS live snapshots s0..s{NS-1} are taken:
 *  - an application thread storing a counter into [0, 1 MiB);
 *  - a thread keeping 8 buffered reads (file DIR/data -> mapping) and writes
 *    (mapping -> DIR/out) in flight on a ring with IOSQE_ASYNC, and 8 more
 *    on an SQPOLL ring, each completed read checked against the file;
 *  - before snapshot k, the main thread reads 64 KiB block k of DIR/pat
 *    (every byte k+1) into MARK + k*64K through io_uring (IOSQE_ASYNC) and
 *    waits for its completion: snapshot k must hold blocks 0..k, and no
 *    later block (checked by sp-iouring.sh with qemu-img/qemu-io).
 * Afterwards the traffic is stopped, snapshot "final" is taken (workers are
 * still alive), the mapping is dumped to DIR/mem.raw and unmapped: the
 * script compares "final" and the image itself with the dump.
 * Exit 0 = pass, 1 = fail, 77 = io_uring or a dirty-tracking mode missing.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "kfeat.h"

#define FAIL(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                       fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) FAIL(__VA_ARGS__); } while (0)
#define API(call) do { int r_ = (call); if (r_ < 0) FAIL("%s: %s", #call, pms_errmsg()); } while (0)

#define MIB        (1u << 20)
#define BLK        (64u << 10)          /* one marker block / one I/O */
#define STORE_OFF  0u                   /* application stores: [0, 1 MiB) */
#define IO_OFF     (2 * MIB)            /* in-flight I/O slots: 16 x 256 KiB */
#define SLOT       (256u << 10)
#define NSLOT      16
#define DATA_LEN   (4 * MIB)            /* DIR/data, read into the slots */
#define MARK_OFF   (8 * MIB)            /* marker blocks */

static uint8_t *g_map;
static uint8_t *g_data;                 /* copy of DIR/data */
static atomic_int g_stop;
static int g_fd_data, g_fd_out, g_fd_pat;
static atomic_ulong g_reads, g_writes, g_stores;

static void *storer(void *arg)
{
    (void)arg;
    volatile uint64_t *q = (volatile uint64_t *)(g_map + STORE_OFF);
    for (uint64_t n = 1; !atomic_load(&g_stop); n++) {
        q[(n * 512) % (MIB / 8)] = n;
        atomic_fetch_add_explicit(&g_stores, 1, memory_order_relaxed);
    }
    return NULL;
}

/* slot state: even round = a read in flight, odd = a write */
struct slot { unsigned round; uint64_t src; };

static void prep(struct io_uring *r, struct slot *s, int i, unsigned flags, unsigned seed)
{
    struct io_uring_sqe *e = io_uring_get_sqe(r);
    CHECK(e, "no sqe");
    uint8_t *buf = g_map + IO_OFF + (uint64_t)i * SLOT;
    if (s->round % 2 == 0) {
        s->src = ((uint64_t)(seed * 2654435761u + s->round * 40503u) % (DATA_LEN / BLK)) * BLK;
        if (s->src + SLOT > DATA_LEN)
            s->src = DATA_LEN - SLOT;
        io_uring_prep_read(e, g_fd_data, buf, SLOT, s->src);
    } else
        io_uring_prep_write(e, g_fd_out, buf, SLOT, (uint64_t)i * SLOT);
    e->flags |= flags;
    io_uring_sqe_set_data64(e, (uint64_t)i);
}

static void complete(struct io_uring_cqe *c, struct slot *slots)
{
    int i = (int)io_uring_cqe_get_data64(c);
    struct slot *s = &slots[i];
    CHECK(c->res == (int)SLOT, "slot %d round %u: %s (res %d)", i, s->round,
          c->res < 0 ? strerror(-c->res) : "short", c->res);
    if (s->round % 2 == 0) {
        CHECK(memcmp(g_map + IO_OFF + (uint64_t)i * SLOT, g_data + s->src, SLOT) == 0,
              "slot %d: data read by io_uring differs from the file", i);
        atomic_fetch_add(&g_reads, 1);
    } else
        atomic_fetch_add(&g_writes, 1);
    s->round++;
}

/* Keeps 8 requests in flight on each of two rings until g_stop, then drains. */
static void *io_main(void *arg)
{
    struct io_uring *rings = arg;        /* [0] IOSQE_ASYNC, [1] SQPOLL */
    struct slot slots[NSLOT] = { { 0, 0 } };
    for (int i = 0; i < NSLOT; i++)
        prep(&rings[i / 8], &slots[i], i, i < 8 ? IOSQE_ASYNC : 0, (unsigned)i);
    int inflight[2] = { 8, 8 };
    for (int k = 0; k < 2; k++)
        CHECK(io_uring_submit(&rings[k]) >= 1, "submit");
    while (inflight[0] + inflight[1] > 0) {
        for (int k = 0; k < 2; k++) {
            struct io_uring_cqe *c;
            if (!inflight[k])
                continue;
            struct __kernel_timespec ts = { 0, 1000000 };
            int r = io_uring_wait_cqe_timeout(&rings[k], &c, &ts);
            if (r == -ETIME || r == -EINTR)
                continue;
            CHECK(r == 0, "wait_cqe: %s", strerror(-r));
            int i = (int)io_uring_cqe_get_data64(c);
            complete(c, slots);
            io_uring_cqe_seen(&rings[k], c);
            inflight[k]--;
            if (!atomic_load(&g_stop)) {
                prep(&rings[k], &slots[i], i, k == 0 ? IOSQE_ASYNC : 0, (unsigned)i);
                int n_ = io_uring_submit(&rings[k]);
                CHECK(n_ >= 1, "resubmit on ring %d: %d", k, n_);
                inflight[k]++;
            }
        }
    }
    return NULL;
}

/* Count io_uring kernel threads of ours by name: iou-wrk-* and iou-sqp-*. */
static void count_workers(int *wrk, int *sqp)
{
    DIR *d = opendir("/proc/self/task");
    CHECK(d, "/proc/self/task: %s", strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        char p[300], comm[32] = "";
        snprintf(p, sizeof p, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(p, "r");
        if (!f)
            continue;
        if (fgets(comm, sizeof comm, f)) {
            *wrk += strncmp(comm, "iou-wrk-", 8) == 0;
            *sqp += strncmp(comm, "iou-sqp-", 8) == 0;
        }
        fclose(f);
    }
    closedir(d);
}

static int open_in(const char *dir, const char *name, int flags)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, flags | O_CLOEXEC, 0644);
    CHECK(fd >= 0, "%s: %s", p, strerror(errno));
    return fd;
}

static void write_all(int fd, const void *b, size_t n)
{
    CHECK(write(fd, b, n) == (ssize_t)n, "write: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s IMG auto|async|sync NS DIR\n", argv[0]);
        return 2;
    }
    const char *img = argv[1], *mode = argv[2], *dir = argv[4];
    int ns = atoi(argv[3]);
    CHECK(ns > 0 && ns < 64, "NS %d out of range", ns);

    /* the files io_uring reads: DIR/data (pseudo-random) and DIR/pat */
    g_data = malloc(DATA_LEN);
    CHECK(g_data, "malloc");
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < DATA_LEN; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        g_data[i] = (uint8_t)x;
    }
    g_fd_data = open_in(dir, "data", O_RDWR | O_CREAT | O_TRUNC);
    write_all(g_fd_data, g_data, DATA_LEN);
    g_fd_pat = open_in(dir, "pat", O_RDWR | O_CREAT | O_TRUNC);
    uint8_t *blk = malloc(BLK);
    CHECK(blk, "malloc");
    for (int k = 0; k < ns; k++) {
        memset(blk, k + 1, BLK);
        write_all(g_fd_pat, blk, BLK);
    }
    free(blk);
    g_fd_out = open_in(dir, "out", O_RDWR | O_CREAT | O_TRUNC);

    struct io_uring rings[3];            /* [0] async, [1] sqpoll, [2] markers */
    int r = io_uring_queue_init(16, &rings[0], 0);
    if (r < 0) {
        fprintf(stderr, "SKIP: io_uring_queue_init: %s\n", strerror(-r));
        return 77;
    }
    struct io_uring_params prm = { .flags = IORING_SETUP_SQPOLL, .sq_thread_idle = 2000 };
    r = io_uring_queue_init_params(16, &rings[1], &prm);
    if (r < 0) {
        fprintf(stderr, "SKIP: io_uring SQPOLL: %s\n", strerror(-r));
        return 77;
    }
    CHECK(io_uring_queue_init(4, &rings[2], 0) == 0, "io_uring_queue_init");

    struct pms_open_opts oo;
    pms_open_opts_init(&oo);
    pms_dev *d;
    API(pms_open(img, &oo, &d));
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = strcmp(mode, "async") == 0 ? PMS_DIRTY_ASYNC_WP :
                        strcmp(mode, "sync") == 0 ? PMS_DIRTY_SYNC_WP : PMS_DIRTY_AUTO;
    mo.writeback_interval_ms = 50;
    void *a;
    size_t len;
    const char *missing = kfeat_missing(mode);   /* the only skip */
    if (missing) {
        fprintf(stderr, "SKIP: %s\n", missing);
        return 77;
    }
    r = pms_map(d, &mo, &a, &len);
    CHECK(r == 0, "pms_map: %s", pms_errmsg());
    CHECK(len >= MARK_OFF + (uint64_t)ns * BLK, "image too small (%zu bytes)", len);
    g_map = a;

    pthread_t st, io;
    CHECK(pthread_create(&st, NULL, storer, NULL) == 0, "pthread_create");
    CHECK(pthread_create(&io, NULL, io_main, rings) == 0, "pthread_create");
    int wrk_max = 0, sqp_max = 0;
    uint64_t pause_max = 0;
    for (int k = 0; k < ns; k++) {
        /* marker block k, through an io_uring worker, completed before the cut */
        struct io_uring_sqe *e = io_uring_get_sqe(&rings[2]);
        io_uring_prep_read(e, g_fd_pat, g_map + MARK_OFF + (uint64_t)k * BLK, BLK,
                           (uint64_t)k * BLK);
        e->flags |= IOSQE_ASYNC;
        CHECK(io_uring_submit(&rings[2]) == 1, "submit marker");
        struct io_uring_cqe *c;
        CHECK(io_uring_wait_cqe(&rings[2], &c) == 0, "wait marker");
        CHECK(c->res == (int)BLK, "marker read %d: res %d", k, c->res);
        io_uring_cqe_seen(&rings[2], c);
        usleep(20000 + (unsigned)(k * 7919 % 30000));
        int wrk = 0, sqp = 0;
        count_workers(&wrk, &sqp);
        wrk_max = wrk > wrk_max ? wrk : wrk_max;
        sqp_max = sqp > sqp_max ? sqp : sqp_max;
        char name[16];
        snprintf(name, sizeof name, "s%d", k);
        uint64_t reads = atomic_load(&g_reads);
        r = pms_snapshot_create(d, name);
        CHECK(r == 0, "live snapshot %s with %d iou-wrk and %d iou-sqp threads: %s",
              name, wrk, sqp, pms_errmsg());
        struct pms_stats sts = { .size = sizeof sts };
        API(pms_stats(d, &sts));
        if (sts.last_snapshot_pause_ns > pause_max)
            pause_max = sts.last_snapshot_pause_ns;
        printf("%s: pause %.2f ms, %d iou-wrk, %d iou-sqp\n", name,
               sts.last_snapshot_pause_ns / 1e6, wrk, sqp);
        (void)reads;
    }
    CHECK(wrk_max > 0 && sqp_max > 0, "the test ran no io_uring worker threads "
          "(iou-wrk %d, iou-sqp %d): it proves nothing", wrk_max, sqp_max);
    CHECK(atomic_load(&g_reads) > 0 && atomic_load(&g_writes) > 0, "no I/O completed");
    atomic_store(&g_stop, 1);
    pthread_join(st, NULL);
    pthread_join(io, NULL);

    /* all quiet, io_uring threads still alive: one more live snapshot */
    API(pms_snapshot_create(d, "final"));
    int fd = open_in(dir, "mem.raw", O_WRONLY | O_CREAT | O_TRUNC);
    write_all(fd, g_map, len);
    CHECK(fsync(fd) == 0 && close(fd) == 0, "mem.raw");
    API(pms_unmap(d));
    API(pms_close(d));
    for (int k = 0; k < 3; k++)
        io_uring_queue_exit(&rings[k]);
    printf("%d live snapshots with up to %d iou-wrk and %d iou-sqp threads; "
           "%lu reads, %lu writes, %lu stores; longest pause %.2f ms\n",
           ns, wrk_max, sqp_max, atomic_load(&g_reads), atomic_load(&g_writes),
           atomic_load(&g_stores), pause_max / 1e6);
    free(g_data);
    return 0;
}
