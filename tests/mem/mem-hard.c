/* Memory-device hardening scenarios (issue 6): what a real application hits
 * that the basic scenarios do not.  The shell script around each checks the
 * image with QEMU's tools.
 *
 *   mem-hard swap    IMG MB          store MB of pages, let the kernel swap them
 *                                    out (run in a small memory cgroup, or
 *                                    MADV_PAGEOUT), persist: nothing skipped
 *   mem-hard eio     IMG OFF HOSTOFF pms_pread/pms_pwrite of a page whose
 *                                    fault-in fails: -EIO, never SIGBUS
 *   mem-hard discard IMG             pms_discard while mapped drops the pages
 *                                    and discards them in the image
 *   mem-hard eintr   IMG             eviction under a memory cap never interrupts
 *                                    the application's poll/nanosleep/epoll
 *   mem-hard revert  IMG MODE        revert while mapped drops only what differs:
 *                                    every byte equals the snapshot's afterwards
 *   mem-hard storeread IMG SECONDS   stores faulting pages in while threads
 *                                   pms_pread (no deadlock, all succeed)
 *   mem-hard race    IMG SECONDS     threads racing pread/pwrite/persist/
 *                                    snapshot/stats/map/unmap on one handle
 *                                    (built with ThreadSanitizer in CI)
 * Exit 0 = pass, 1 = fail, 77 = a kernel feature the scenario needs is absent.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "kfeat.h"

#define PG 4096
#define FAIL(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                       fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) FAIL(__VA_ARGS__); } while (0)
#define API(call) do { int r_ = (call); if (r_ < 0) FAIL("%s: %s", #call, pms_errmsg()); } \
                  while (0)

static pms_dev *open_img(const char *path, const char *fault)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.fault_spec = fault;
    pms_dev *d;
    API(pms_open(path, &o, &d));
    return d;
}

/* Map, or exit 77 when the kernel probe (kfeat.h) says the kernel lacks
 * userfaultfd write protection; any error from pms_map fails. */
static uint8_t *map(pms_dev *d, unsigned interval_ms, size_t *len)
{
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.writeback_interval_ms = interval_ms;
    void *a;
    kfeat_need("auto");
    int r = pms_map(d, &mo, &a, len);
    API(r);
    return a;
}

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
    return *s;
}

static long status_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':')
            v = strtol(line + n + 1, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

/* ---- swap ------------------------------------------------------------------- */
static int t_swap(const char *img, uint64_t mb)
{
    pms_dev *d = open_img(img, NULL);
    size_t len;
    /* no background writeback: every page is still dirty when it is swapped */
    uint8_t *p = map(d, 3600 * 1000, &len);
    uint64_t n = mb << 20;
    CHECK(n <= len, "image too small");
    for (uint64_t o = 0; o < n; o += PG)
        memset(p + o, (int)(0x10 + (o >> 20) % 0xe0), PG);
    if (getenv("SWAP_PAGEOUT"))
        madvise(p, n, MADV_PAGEOUT);
    long swapped = 0;
    for (int i = 0; i < 100 && (swapped = status_kb("VmSwap")) < (long)(n >> 10) / 4; i++)
        usleep(50 * 1000);
    if (swapped < (long)(n >> 10) / 4) {
        fprintf(stderr, "SKIP: only %ld KiB of %llu KiB went to swap (no swap, or no memory "
                "pressure)\n", swapped, (unsigned long long)(n >> 10));
        exit(77);
    }
    printf("swapped out: %ld KiB of %llu KiB stored\n", swapped, (unsigned long long)(n >> 10));
    API(pms_persist(d, p, n));
    struct pms_stats st = { .size = sizeof st };
    API(pms_stats(d, &st));
    CHECK(st.bytes_written_back >= n, "persist wrote %" PRIu64 " of %" PRIu64 " bytes",
          st.bytes_written_back, n);
    API(pms_close(d));
    return 0;
}

/* ---- EIO instead of SIGBUS ------------------------------------------------------ */
static void on_bus(int s)
{
    (void)s;
    static const char m[] = "FAIL: SIGBUS in the caller\n";
    if (write(2, m, sizeof m - 1) < 0) { }
    _exit(1);
}

static int t_eio(const char *img, uint64_t off, uint64_t host)
{
    char spec[64];
    snprintf(spec, sizeof spec, "read_error_at=%" PRIu64, host);
    pms_dev *d = open_img(img, spec);
    size_t len;
    uint8_t *p = map(d, 50, &len);
    struct sigaction sa = { .sa_handler = on_bus };
    sigaction(SIGBUS, &sa, NULL);
    uint8_t buf[PG];
    /* the page was never touched: the read faults it in and fails */
    int r = pms_pread(d, buf, sizeof buf, off);
    CHECK(r == -EIO, "pread of an unreadable page: %d (%s)", r, pms_errmsg());
    printf("pread: %s\n", pms_errmsg());
    CHECK(strstr(pms_errmsg(), "pms_pread"), "message lacks the function: %s", pms_errmsg());
    /* a write over it, and a read into a buffer inside the mapping */
    memset(buf, 1, sizeof buf);
    r = pms_pwrite(d, buf, 100, off + 10);
    CHECK(r == -EIO, "pwrite into an unreadable page: %d (%s)", r, pms_errmsg());
    r = pms_pread(d, p + (4 << 20), PG, off);
    CHECK(r == -EIO, "pread into the mapping: %d", r);
    /* the rest of the device still works, through both paths */
    API(pms_pwrite(d, "abc", 3, off + (1 << 20)));
    CHECK(memcmp(p + off + (1 << 20), "abc", 3) == 0, "pwrite not visible in memory");
    API(pms_pread(d, buf, 3, off + (1 << 20)));
    CHECK(memcmp(buf, "abc", 3) == 0, "pread of a good page");
    p[off + (2 << 20)] = 9;
    API(pms_persist(d, p, len));
    API(pms_close(d));
    return 0;
}

/* ---- discard while mapped --------------------------------------------------------- */
static int t_discard(const char *img)
{
    pms_dev *d = open_img(img, NULL);
    size_t len;
    uint8_t *p = map(d, 50, &len);
    CHECK(len >= (8 << 20), "image too small");
    memset(p, 0x77, 8 << 20);
    API(pms_persist(d, p, 8 << 20));
    /* dirty pages inside the range are discarded with it */
    memset(p + (2 << 20), 0x66, 1 << 20);
    API(pms_discard(d, 4 << 20, 1 << 20));
    for (uint64_t o = 1 << 20; o < (5 << 20); o += PG)
        CHECK(p[o] == 0 && p[o + PG - 1] == 0, "byte at %" PRIu64 " is %d after discard", o,
              p[o]);
    CHECK(p[(1 << 20) - 1] == 0x77 && p[5 << 20] == 0x77, "bytes outside the range changed");
    /* a discard smaller than a cluster leaves the image as it is (QEMU's
     * qcow2 ignores it too), and memory must agree with the image */
    API(pms_discard(d, 3 * PG, (6 << 20) + 100));
    for (uint64_t o = (6 << 20); o < (6 << 20) + 4 * PG; o++)
        CHECK(p[o] == 0x77, "byte at %" PRIu64 " is %d after a sub-cluster discard", o, p[o]);
    struct pms_extent e;
    API(pms_block_status(d, 1 << 20, 4 << 20, &e));
    CHECK(e.flags & PMS_BLOCK_ZERO, "discarded range is not zero in the image (flags %x)",
          e.flags);
    API(pms_close(d));
    return 0;
}

/* ---- eviction does not disturb sleeping threads ---------------------------------- */
static atomic_bool g_sleep_stop;
static atomic_ulong g_eintr, g_sleeps;

static void *sleeper(void *arg)
{
    int ep = epoll_create1(0);
    while (!atomic_load(&g_sleep_stop)) {
        struct timespec ts = { 0, 2 * 1000 * 1000 };
        struct epoll_event ev;
        if (nanosleep(&ts, NULL) < 0 && errno == EINTR)
            atomic_fetch_add(&g_eintr, 1);
        if (poll(NULL, 0, 2) < 0 && errno == EINTR)
            atomic_fetch_add(&g_eintr, 1);
        if (epoll_wait(ep, &ev, 1, 2) < 0 && errno == EINTR)
            atomic_fetch_add(&g_eintr, 1);
        atomic_fetch_add(&g_sleeps, 3);
    }
    close(ep);
    return arg;
}

static int t_eintr(const char *img)
{
    pms_dev *d = open_img(img, NULL);
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.writeback_interval_ms = 20;
    mo.mem_limit = 16 << 20;
    void *a;
    size_t len;
    kfeat_need("auto");
    int r = pms_map(d, &mo, &a, &len);
    API(r);
    struct pms_stats st = { .size = sizeof st };
    API(pms_stats(d, &st));
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, sleeper, NULL);
    uint8_t *p = a;
    uint64_t seed = 42;
    for (int i = 0; i < 40000; i++)
        p[(rnd(&seed) % (len / PG)) * PG] = (uint8_t)i;
    API(pms_persist(d, p, len));
    atomic_store(&g_sleep_stop, true);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    API(pms_stats(d, &st));
    printf("eintr: mode %d, %" PRIu64 " pages evicted, %lu sleeps, %lu EINTR\n", st.dirty_mode,
           st.pages_evicted, (unsigned long)atomic_load(&g_sleeps),
           (unsigned long)atomic_load(&g_eintr));
    CHECK(st.pages_evicted > 0, "nothing was evicted: the scenario tested nothing");
    CHECK(atomic_load(&g_eintr) == 0, "%lu sleeps of the application were interrupted",
          (unsigned long)atomic_load(&g_eintr));
    /* staging memory of a snapshot counts against the cap (issue 6, item 8) */
    for (int i = 0; i < 2000; i++)
        p[(rnd(&seed) % (len / PG)) * PG] = (uint8_t)i;
    API(pms_snapshot_create(d, "s"));
    usleep(300 * 1000);               /* a few writeback/eviction rounds */
    API(pms_stats(d, &st));
    printf("after a snapshot: %" PRIu64 " resident + %" PRIu64 " staging pages, cap %u\n",
           st.resident_pages, st.staging_pages, (16u << 20) / PG);
    CHECK(st.staging_pages > 0, "no staging pages reported after a snapshot");
    CHECK(st.resident_pages + st.staging_pages <= (16u << 20) / PG,
          "resident + staging exceed the cap");
    API(pms_close(d));
    return 0;
}

/* ---- revert drops what differs and keeps the rest -------------------------------- */
/* n small stores at random places of the first half of [p, p+len): the
 * second half's clusters stay unchanged, so a revert has something to keep */
static void stores(uint8_t *p, size_t len, uint64_t *seed, int n)
{
    len /= 2;
    for (int i = 0; i < n; i++) {
        uint64_t o = rnd(seed) % (len - 64);
        memset(p + o, (int)(rnd(seed) & 0xff), 1 + rnd(seed) % 64);
    }
}

static int t_revert(const char *img, const char *mode)
{
    pms_dev *d = open_img(img, NULL);
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = !strcmp(mode, "sync") ? PMS_DIRTY_SYNC_WP : PMS_DIRTY_AUTO;
    mo.writeback_interval_ms = 30;
    void *a;
    size_t len;
    kfeat_need(!strcmp(mode, "sync") ? "sync" : "auto");
    int r = pms_map(d, &mo, &a, &len);
    API(r);
    uint8_t *p = a, *refa = malloc(len), *refb = malloc(len);
    uint64_t seed = 7;
    for (size_t o = 0; o < len; o += PG)          /* every page resident and allocated */
        memset(p + o, (int)(o / PG % 251), PG);
    API(pms_snapshot_create(d, "a"));
    memcpy(refa, p, len);
    stores(p, len, &seed, 300);
    usleep(100 * 1000);                            /* some of it written back */
    stores(p, len, &seed, 300);
    API(pms_snapshot_create(d, "b"));
    memcpy(refb, p, len);
    stores(p, len, &seed, 200);
    usleep(100 * 1000);
    stores(p, len, &seed, 200);                   /* some of it still dirty */
    API(pms_snapshot_revert(d, "a"));
    struct pms_stats st = { .size = sizeof st };
    API(pms_stats(d, &st));
    printf("revert %s: %" PRIu64 " of %zu pages still resident after the revert\n", mode,
           st.resident_pages, len / PG);
    CHECK(st.resident_pages > 0 && st.resident_pages < len / PG,
          "revert kept %" PRIu64 " of %zu pages", st.resident_pages, len / PG);
    CHECK(memcmp(p, refa, len) == 0, "memory differs from snapshot a after revert");
    stores(p, len, &seed, 100);
    API(pms_snapshot_revert(d, "b"));
    CHECK(memcmp(p, refb, len) == 0, "memory differs from snapshot b after revert");
    /* again to the snapshot reverted to last: the mapping knows exactly
     * which pages changed since (written back, dirty, discarded) */
    stores(p, len, &seed, 200);
    API(pms_persist(d, p, len));
    stores(p, len, &seed, 100);
    API(pms_discard(d, 1 << 20, 2 << 20));
    API(pms_snapshot_revert(d, "b"));
    CHECK(memcmp(p, refb, len) == 0, "memory differs from snapshot b after a second revert");
    API(pms_snapshot_create(d, "c"));
    stores(p, len, &seed, 300);
    usleep(100 * 1000);
    API(pms_snapshot_revert(d, "c"));
    CHECK(memcmp(p, refb, len) == 0, "memory differs from snapshot c after revert");
    API(pms_close(d));
    free(refa);
    free(refb);
    return 0;
}

/* ---- racing API calls on one handle ------------------------------------------------ */
static pms_dev *g_dev;
static atomic_bool g_stop;
static atomic_ulong g_ops;
static uint64_t g_size;

static void *io_thread(void *arg)
{
    uint64_t seed = (uintptr_t)arg * 0x9e3779b97f4a7c15ull + 1;
    uint8_t buf[8192];
    while (!atomic_load(&g_stop)) {
        uint64_t off = rnd(&seed) % (g_size - sizeof buf);
        int r;
        switch (rnd(&seed) % 4) {
        case 0: r = pms_pread(g_dev, buf, sizeof buf, off); break;
        case 1: memset(buf, (int)(seed & 0xff), sizeof buf);
                r = pms_pwrite(g_dev, buf, sizeof buf, off); break;
        case 2: r = pms_write_zeroes(g_dev, 4096, off); break;
        default: r = pms_flush(g_dev); break;
        }
        CHECK(r >= 0, "I/O: %s", pms_errmsg());
        atomic_fetch_add(&g_ops, 1);
    }
    return NULL;
}

static void *ctl_thread(void *arg)
{
    int kind = (int)(uintptr_t)arg;
    unsigned i = 0;
    while (!atomic_load(&g_stop)) {
        struct pms_stats st = { .size = sizeof st };
        char name[32];
        int r = 0;
        switch (kind) {
        case 0:
            API(pms_stats(g_dev, &st));
            break;
        case 1:   /* snapshots: the writers are API calls, stopped by the quiesce */
            snprintf(name, sizeof name, "s%u", i % 3);
            pms_snapshot_delete(g_dev, name);       /* may not exist yet */
            r = pms_snapshot_create_ex(g_dev, name, PMS_SNAP_QUIESCED);
            CHECK(r == 0, "snapshot: %s", pms_errmsg());
            break;
        case 2: { /* map / persist / unmap cycles racing everything */
            void *a;
            size_t len;
            struct pms_map_opts mo;
            pms_map_opts_init(&mo);
            mo.writeback_interval_ms = 20;
            r = pms_map(g_dev, &mo, &a, &len);
            CHECK(r == 0, "map: %s", pms_errmsg());
            uint8_t b = (uint8_t)i;   /* through the API: a plain store would race
                                         the I/O threads' copies in this test */
            r = pms_pwrite(g_dev, &b, 1, (i * 4096ull) % len);
            CHECK(r == 0, "pwrite while mapped: %s", pms_errmsg());
            r = pms_persist(g_dev, a, len);
            CHECK(r == 0, "persist: %s", pms_errmsg());
            usleep(2000);
            r = pms_unmap(g_dev);
            CHECK(r == 0, "unmap: %s", pms_errmsg());
            break;
        }
        }
        i++;
        atomic_fetch_add(&g_ops, 1);
    }
    return NULL;
}

static int t_race(const char *img, unsigned seconds)
{
    g_dev = open_img(img, NULL);
    g_size = (uint64_t)pms_size(g_dev);
    /* probe the kernel once (skip cleanly where userfaultfd WP is absent) */
    size_t len;
    map(g_dev, 50, &len);
    API(pms_unmap(g_dev));
    pthread_t th[6];
    for (uintptr_t i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, io_thread, (void *)i);
    for (uintptr_t i = 0; i < 3; i++)
        pthread_create(&th[3 + i], NULL, ctl_thread, (void *)i);
    sleep(seconds);
    atomic_store(&g_stop, true);
    for (int i = 0; i < 6; i++)
        pthread_join(th[i], NULL);
    printf("race: %lu operations\n", (unsigned long)atomic_load(&g_ops));
    API(pms_close(g_dev));
    return 0;
}

/* storeread: one thread stores straight into the mapping (page after page,
 * so every store is a missing fault at first) while three call pms_pread
 * at random pages.  A reader fills missing pages itself under the device's
 * lock; the fault thread's per-fault state must not leak into that fill
 * (it did: the reader installed one page of a zero extent and faulted on
 * its own while holding the lock, and both threads waited for good). */
static _Atomic(uint8_t *) g_map;
static void *store_thread(void *arg)
{
    (void)arg;
    uint8_t *p = atomic_load(&g_map);
    uint64_t pages = g_size / 4096;
    for (uint64_t g = 1; !atomic_load(&g_stop); g++)
        ((volatile uint64_t *)(p + (g % pages) * 4096))[0] = g;
    return NULL;
}
static void *pread_thread(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg + 1;
    uint64_t pages = g_size / 4096;
    while (!atomic_load(&g_stop)) {
        uint64_t v, pg = (uint64_t)rand_r(&seed) % pages;
        int r = pms_pread(g_dev, &v, sizeof v, pg * 4096 + 8);
        CHECK(r == 0, "pread while stores fault: %s", pms_errmsg());
        atomic_fetch_add(&g_ops, 1);
    }
    return NULL;
}
static int t_storeread(const char *img, unsigned seconds)
{
    g_dev = open_img(img, NULL);
    g_size = (uint64_t)pms_size(g_dev);
    size_t len;
    atomic_store(&g_map, map(g_dev, 0, &len));
    pthread_t th[4];
    pthread_create(&th[0], NULL, store_thread, NULL);
    for (uintptr_t i = 1; i < 4; i++)
        pthread_create(&th[i], NULL, pread_thread, (void *)i);
    sleep(seconds);
    atomic_store(&g_stop, true);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    printf("storeread: %lu reads\n", (unsigned long)atomic_load(&g_ops));
    API(pms_unmap(g_dev));
    API(pms_close(g_dev));
    return 0;
}

/* snapio: sync write-protect tracking, two threads storing at random, one
 * calling pms_pwrite/pms_pread, snapshots every 100 ms.  Two deadlocks:
 * a writeback re-protected pages between pwrite's un-protect and its copy
 * (the copy faulted holding mu, the fault thread waited for mu); and a
 * pwrite parked by the snapshot's safepoint while holding wp_mu, which the
 * cut takes. */
static void *rstore_thread(void *arg)
{
    uint64_t s = (uintptr_t)arg * 977 + 1;
    uint8_t *p = atomic_load(&g_map);
    while (!atomic_load(&g_stop))
        ((volatile uint64_t *)p)[rnd(&s) % (g_size / 8)] = s;
    return NULL;
}
static void *rio_thread(void *arg)
{
    (void)arg;
    uint64_t s = 5;
    static char b[300000];
    memset(b, 1, sizeof b);
    while (!atomic_load(&g_stop)) {
        size_t l = 1 + rnd(&s) % sizeof b;
        uint64_t o = (rnd(&s) >> 20) % (g_size - l);
        int r = (s & 1) ? pms_pread(g_dev, b, l, o) : pms_pwrite(g_dev, b, l, o);
        CHECK(r == 0, "pread/pwrite beside stores and snapshots: %s", pms_errmsg());
        atomic_fetch_add(&g_ops, 1);
    }
    return NULL;
}
static int t_snapio(const char *img, unsigned snaps)
{
    g_dev = open_img(img, NULL);
    g_size = (uint64_t)pms_size(g_dev);
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = PMS_DIRTY_SYNC_WP;
    kfeat_need("sync");
    void *a;
    size_t len;
    API(pms_map(g_dev, &mo, &a, &len));
    atomic_store(&g_map, (uint8_t *)a);
    pthread_t th[3];
    for (uintptr_t i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, rstore_thread, (void *)(i + 1));
    pthread_create(&th[2], NULL, rio_thread, NULL);
    for (unsigned i = 0; i < snaps; i++) {
        char n[32];
        usleep(100000);
        snprintf(n, sizeof n, "h%u", i);
        API(pms_snapshot_create(g_dev, n));
        if (i >= 2) {
            snprintf(n, sizeof n, "h%u", i - 2);
            API(pms_snapshot_delete(g_dev, n));
        }
    }
    atomic_store(&g_stop, true);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    printf("snapio: %u snapshots, %lu copies\n", snaps, (unsigned long)atomic_load(&g_ops));
    API(pms_close(g_dev));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "snapio"))
        return t_snapio(argv[2], (unsigned)strtoul(argv[3], NULL, 0));
    if (argc >= 4 && !strcmp(argv[1], "storeread"))
        return t_storeread(argv[2], (unsigned)strtoul(argv[3], NULL, 0));
    if (argc >= 4 && !strcmp(argv[1], "swap"))
        return t_swap(argv[2], strtoull(argv[3], NULL, 0));
    if (argc >= 5 && !strcmp(argv[1], "eio"))
        return t_eio(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
    if (argc >= 4 && !strcmp(argv[1], "revert"))
        return t_revert(argv[2], argv[3]);
    if (argc >= 3 && !strcmp(argv[1], "eintr"))
        return t_eintr(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "discard"))
        return t_discard(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "race"))
        return t_race(argv[2], (unsigned)strtoul(argv[3], NULL, 0));
    fprintf(stderr, "usage: see the comment at the top of %s\n", __FILE__);
    return 2;
}
