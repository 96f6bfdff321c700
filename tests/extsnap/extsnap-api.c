/* External snapshots through the public API on one open device.
 *
 *   extsnap-api switch DIR      create/revert/delete on an open pms_dev while
 *                               reader threads read it (the node is switched
 *                               in place under them); every read is checked
 *                               against a model of the content; the files are
 *                               left in DIR for the caller's QEMU checks
 *                               (DIR/ref-NAME.raw: expected content of NAME).
 *   extsnap-api prep DIR        the block layer's two-step create: prepare
 *                               changes nothing visible, abort removes the
 *                               overlay, commit switches the node; the
 *                               content read through the node never changes.
 *   extsnap-api faulty DIR      delete of the live image's backing snapshot
 *                               (a stream into the live image) over the
 *                               fault-injecting driver: power lost at the
 *                               K-th write (torn or dropped writes), for many
 *                               K; reopened, the live image must read as
 *                               before and be qemu-img check clean (leaks
 *                               allowed), and the snapshot still be there.
 *   extsnap-api limit DIR       external snapshots until the chain limit: the
 *                               one past it is refused (EMLINK), the image
 *                               still opens with its whole chain.
 *   extsnap-api busy DIR        deletes of each kind (stream into a layer,
 *                               commit, stream into the live image) while
 *                               two threads write the live image and one
 *                               checks what it reads (every page holds a
 *                               version it had during the read); each delete
 *                               must let writes complete while it runs (the
 *                               merges run beside the live chain); files left
 *                               in DIR for QEMU's checks (ref-c.raw,
 *                               ref-live.raw).
 *   extsnap-api chain DIR SIZE_MIB LAYERS
 *                               a fully written image, then LAYERS external
 *                               snapshots with 16 random 4 KiB writes between
 *                               them; the same writes applied to a one-layer
 *                               image; then first-touch reads of the whole
 *                               image through both (pms_pread in 64 KiB
 *                               pieces, and through pms_map when userfaultfd
 *                               works), checked page by page; prints the
 *                               times.  With PMS_CHAIN_MAX_RATIO=R it fails
 *                               when the chain is more than R times slower.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "block/extsnap.h"
#include <sys/stat.h>
#include <sys/wait.h>

#define PG 4096u
static int fails;
#define FAIL(...) do { fprintf(stderr, "FAIL: " __VA_ARGS__); fputc('\n', stderr); fails++; } while (0)
#define CHECK(expr) do { int r_ = (expr); if (r_ < 0) { \
    fprintf(stderr, "FAIL: %s: %s\n", #expr, pms_errmsg()); exit(1); } } while (0)

#include <sys/resource.h>
static double cpu_now(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Page p holding version v: every 8-byte word derives from (p, v). */
static void fill_page(uint8_t *buf, uint64_t p, uint32_t v)
{
    uint64_t x = p * 0x9E3779B97F4A7C15ull ^ ((uint64_t)v << 40 | 0x5555);
    for (unsigned i = 0; i < PG; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
}

static int check_page(const uint8_t *buf, uint64_t p, uint32_t v)
{
    uint8_t want[PG];
    fill_page(want, p, v);
    return memcmp(buf, want, PG) == 0;
}

/* ---- switch: in-place node switch under readers ---------------------------- */

struct model { uint64_t npages; uint32_t *ver; };
static struct model cur;
static pms_dev *g_dev;
static atomic_int stop_readers;
static atomic_long reads_done;

static void *reader(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    uint8_t *buf = malloc(16 * PG);
    while (!atomic_load(&stop_readers)) {
        uint64_t p = (uint64_t)rand_r(&seed) % (cur.npages - 16);
        unsigned n = 1 + (unsigned)rand_r(&seed) % 16;
        if (pms_pread(g_dev, buf, (size_t)n * PG, p * PG) < 0) {
            FAIL("read during a switch: %s", pms_errmsg());
            break;
        }
        for (unsigned i = 0; i < n; i++)
            if (!check_page(buf + (size_t)i * PG, p + i, cur.ver[p + i])) {
                FAIL("page %llu read wrong during a switch", (unsigned long long)(p + i));
                break;
            }
        atomic_fetch_add(&reads_done, 1);
    }
    free(buf);
    return NULL;
}

static void write_pages(unsigned *seed, int n, uint32_t v)
{
    uint8_t buf[PG];
    for (int i = 0; i < n; i++) {
        uint64_t p = (uint64_t)rand_r(seed) % cur.npages;
        fill_page(buf, p, v);
        CHECK(pms_pwrite(g_dev, buf, PG, p * PG));
        cur.ver[p] = v;
    }
}

static void save_ref(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/ref-%s.raw", dir, name);
    FILE *f = fopen(path, "w");
    uint8_t buf[PG];
    for (uint64_t p = 0; p < cur.npages; p++) {
        fill_page(buf, p, cur.ver[p]);
        fwrite(buf, 1, PG, f);
    }
    fclose(f);
}

static void verify_all(const char *what)
{
    uint8_t *buf = malloc(64 * PG);
    for (uint64_t p = 0; p < cur.npages; p += 64) {
        unsigned n = cur.npages - p < 64 ? (unsigned)(cur.npages - p) : 64;
        CHECK(pms_pread(g_dev, buf, (size_t)n * PG, p * PG));
        for (unsigned i = 0; i < n; i++)
            if (!check_page(buf + (size_t)i * PG, p + i, cur.ver[p + i])) {
                FAIL("%s: page %llu wrong", what, (unsigned long long)(p + i));
                free(buf);
                return;
            }
    }
    free(buf);
}

/* run op with two readers checking the (unchanging) content meanwhile */
static void under_readers(int (*op)(void *), void *arg)
{
    pthread_t t[2];
    atomic_store(&stop_readers, 0);
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, reader, (void *)(uintptr_t)(i + 1));
    long before = atomic_load(&reads_done);
    while (atomic_load(&reads_done) < before + 20)
        usleep(1000);
    if (op(arg) < 0)
        FAIL("operation failed: %s", pms_errmsg());
    before = atomic_load(&reads_done);
    while (atomic_load(&reads_done) < before + 20)
        usleep(1000);
    atomic_store(&stop_readers, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
}

/* A new image DIR/img.qcow2 of size bytes, open as g_dev, its model empty. */
static void open_model(const char *dir, uint64_t size)
{
    char img[4096];
    snprintf(img, sizeof img, "%s/img.qcow2", dir);
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    CHECK(pms_create(img, size, &co));
    CHECK(pms_open(img, NULL, &g_dev));
    cur.npages = size / PG;
    cur.ver = calloc(cur.npages, sizeof *cur.ver);
}

static int op_create(void *name) { return pms_snapshot_create_ex(g_dev, name, PMS_SNAP_EXTERNAL); }
static int op_delete(void *name) { return pms_snapshot_delete(g_dev, name); }

static int do_switch(const char *dir)
{
    open_model(dir, 8u << 20);
    uint8_t buf[PG];
    for (uint64_t p = 0; p < cur.npages; p++) {
        fill_page(buf, p, 1);
        CHECK(pms_pwrite(g_dev, buf, PG, p * PG));
        cur.ver[p] = 1;
    }
    unsigned seed = 7;
    uint32_t *saved[8];
    const char *names[] = { "a", "b", "c", "d" };
    for (int i = 0; i < 4; i++) {
        save_ref(dir, names[i]);
        saved[i] = malloc(cur.npages * sizeof *cur.ver);
        memcpy(saved[i], cur.ver, cur.npages * sizeof *cur.ver);
        under_readers(op_create, (void *)names[i]);
        verify_all("after create");
        write_pages(&seed, 300, (uint32_t)(10 + i));
        verify_all("after writes into the overlay");
    }
    /* list: both kinds, with kind and layer file */
    CHECK(pms_snapshot_create(g_dev, "internal1"));
    struct pms_snapshot_info *l;
    size_t n;
    CHECK(pms_snapshot_list(g_dev, &l, &n));
    int ext = 0, in = 0;
    for (size_t i = 0; i < n; i++) {
        if (l[i].kind == PMS_SNAP_KIND_EXTERNAL && l[i].file && strstr(l[i].file, "img.qcow2@"))
            ext++;
        if (l[i].kind == PMS_SNAP_KIND_INTERNAL && !l[i].file && !strcmp(l[i].name, "internal1"))
            in++;
    }
    if (ext != 4 || in != 1 || n != 5)
        FAIL("list: %zu entries, %d external, %d internal", n, ext, in);
    pms_snapshot_list_free(l, n);
    if (pms_snapshot_create_ex(g_dev, "b", PMS_SNAP_EXTERNAL) != -EEXIST)
        FAIL("a second external 'b' was not refused with EEXIST");
    if (pms_snapshot_create(g_dev, "c") != -EEXIST)
        FAIL("an internal 'c' beside an external one was not refused");
    CHECK(pms_snapshot_delete(g_dev, "internal1"));

    /* revert to b: the content is b's; the same node goes on working */
    CHECK(pms_snapshot_revert(g_dev, "b"));
    memcpy(cur.ver, saved[1], cur.npages * sizeof *cur.ver);
    verify_all("after revert to b");
    write_pages(&seed, 200, 30);
    save_ref(dir, "live");
    /* delete the middle (b: parent of c and of the live image) and the oldest */
    under_readers(op_delete, "b");
    verify_all("after delete b");
    under_readers(op_delete, "a");
    verify_all("after delete a");
    CHECK(pms_flush(g_dev));
    CHECK(pms_close(g_dev));
    for (int i = 0; i < 4; i++)
        free(saved[i]);
    free(cur.ver);
    printf("switch: %ld checked reads during the switches\n", atomic_load(&reads_done));
    return fails ? 1 : 0;
}

/* ---- busy: deletes while the live image is written -------------------------- */

#define BUSY_MIN_WRITES 8          /* writes that must complete during each delete */
static _Atomic uint32_t *bver;     /* version of each page: set after its write */
static _Atomic uint32_t *bnext;    /* ... and before it (a read may see either) */
static atomic_long bwrites;
static _Atomic double bmaxlat;     /* longest write since busy_delete reset it (s) */
static atomic_int bstop;

struct bworker { int id; unsigned seed; };

static void *busy_writer(void *arg)
{
    struct bworker *w = arg;
    uint8_t buf[PG];
    while (!atomic_load(&bstop)) {
        uint64_t p = ((uint64_t)rand_r(&w->seed) % (cur.npages / 2)) * 2 + (uint64_t)w->id;
        uint32_t v = atomic_load(&bver[p]) + 1;   /* this thread alone writes p */
        fill_page(buf, p, v);
        atomic_store(&bnext[p], v);
        double t0 = now();
        if (pms_pwrite(g_dev, buf, PG, p * PG) < 0) {
            FAIL("write during a delete: %s", pms_errmsg());
            break;
        }
        double lat = now() - t0, m = atomic_load(&bmaxlat);
        while (lat > m && !atomic_compare_exchange_weak(&bmaxlat, &m, lat)) {}
        atomic_store(&bver[p], v);
        atomic_fetch_add(&bwrites, 1);
    }
    return NULL;
}

static void *busy_checker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    uint8_t buf[PG];
    while (!atomic_load(&bstop)) {
        uint64_t p = (uint64_t)rand_r(&seed) % cur.npages;
        uint32_t v0 = atomic_load(&bver[p]);
        if (pms_pread(g_dev, buf, PG, p * PG) < 0) {
            FAIL("read during a delete: %s", pms_errmsg());
            break;
        }
        uint32_t v1 = atomic_load(&bnext[p]), v = v0;
        while (v <= v1 && !check_page(buf, p, v)) v++;
        if (v > v1) {
            FAIL("page %llu read during a delete holds none of versions %u..%u",
                 (unsigned long long)p, v0, v1);
            break;
        }
        atomic_fetch_add(&reads_done, 1);
    }
    return NULL;
}

/* Progress of a delete's merge: the first call waits (at most
 * BUSY_WAIT_S) for BUSY_MIN_WRITES writes to complete, which they cannot
 * if the merge holds the live image.  Later calls return at once. */
#define BUSY_WAIT_S 3.0
static int busy_progress_calls;
static double busy_stalled;        /* > 0: seconds the writers made no progress */

static void busy_progress(void *opaque, uint64_t done, uint64_t total)
{
    (void)opaque; (void)done; (void)total;
    if (busy_progress_calls++)
        return;
    long w0 = atomic_load(&bwrites);
    double t0 = now();
    while (atomic_load(&bwrites) < w0 + BUSY_MIN_WRITES && now() - t0 < BUSY_WAIT_S)
        usleep(1000);
    if (atomic_load(&bwrites) < w0 + BUSY_MIN_WRITES)
        busy_stalled = now() - t0;
}

static void busy_delete(const char *name)
{
    long w0 = atomic_load(&bwrites), r0 = atomic_load(&reads_done);
    atomic_store(&bmaxlat, 0.0);
    busy_progress_calls = 0;
    busy_stalled = 0;
    double t0 = now();
    if (pms_snapshot_delete_ex(g_dev, name, 0, busy_progress, NULL) < 0)
        FAIL("delete %s: %s", name, pms_errmsg());
    if (!busy_progress_calls)
        FAIL("delete %s: no progress reported", name);
    if (busy_stalled > 0)
        FAIL("delete %s: no writes completed in %.1f s in the middle of its merge: it holds "
             "the live image", name, busy_stalled);
    double t = now() - t0;
    long w = atomic_load(&bwrites) - w0, r = atomic_load(&reads_done) - r0;
    double lat = atomic_load(&bmaxlat);
    printf("busy: delete %s took %.1f ms; %ld writes and %ld checked reads completed "
           "meanwhile, the longest write %.1f ms\n", name, t * 1e3, w, r, lat * 1e3);
    if (w < BUSY_MIN_WRITES)
        FAIL("delete %s: only %ld writes completed while it ran (%.1f ms): it held the "
             "live image", name, w, t * 1e3);
}

static int do_busy(const char *dir)
{
    const uint64_t size = 32u << 20;
    open_model(dir, size);
    bver = calloc(cur.npages, sizeof *bver);
    bnext = calloc(cur.npages, sizeof *bnext);
    const uint64_t chunk = 256;
    uint8_t *big = malloc(chunk * PG);
    for (uint64_t p = 0; p < cur.npages; p += chunk) {
        for (uint64_t i = 0; i < chunk; i++)
            fill_page(big + i * PG, p + i, 1);
        CHECK(pms_pwrite(g_dev, big, chunk * PG, p * PG));
    }
    free(big);
    for (uint64_t p = 0; p < cur.npages; p++)
        cur.ver[p] = 1;
    /* a (full image) <- b (300 pages) <- c (6,000) <- d (1,500) <- live:
     * deleting b streams it into c (the larger child), then a commits c into
     * a's file, then d streams into the live image */
    unsigned seed = 11;
    const char *names[] = { "a", "b", "c", "d" };
    const int writes[] = { 300, 6000, 1500, 100 };
    for (int i = 0; i < 4; i++) {
        save_ref(dir, names[i]);
        CHECK(pms_snapshot_create_ex(g_dev, names[i], PMS_SNAP_EXTERNAL));
        write_pages(&seed, writes[i], (uint32_t)(2 + i));
    }
    for (uint64_t p = 0; p < cur.npages; p++)
        atomic_store(&bver[p], cur.ver[p]), atomic_store(&bnext[p], cur.ver[p]);
    struct bworker w[2] = { { 0, 21 }, { 1, 22 } };
    pthread_t wt[2], ct;
    atomic_store(&bstop, 0);
    for (int i = 0; i < 2; i++)
        pthread_create(&wt[i], NULL, busy_writer, &w[i]);
    pthread_create(&ct, NULL, busy_checker, (void *)(uintptr_t)5);
    while (atomic_load(&bwrites) < 50)
        usleep(1000);
    busy_delete("b");
    busy_delete("a");
    busy_delete("d");
    atomic_store(&bstop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(wt[i], NULL);
    pthread_join(ct, NULL);
    for (uint64_t p = 0; p < cur.npages; p++)
        cur.ver[p] = atomic_load(&bver[p]);
    verify_all("after the deletes");
    save_ref(dir, "live");
    CHECK(pms_flush(g_dev));
    CHECK(pms_close(g_dev));
    free(cur.ver);
    free((void *)bver);
    free((void *)bnext);
    return fails ? 1 : 0;
}

/* ---- chain: first-touch reads through a deep chain ------------------------- */

static double last_cpu;    /* CPU seconds (all threads) of the last read_all */

static double read_all(const char *img, const uint32_t *ver, uint64_t npages, int mapped)
{
    pms_dev *dev;
    CHECK(pms_open(img, NULL, &dev));
    const size_t chunk = 65536;
    double t0 = now(), c0 = cpu_now();
    uint8_t *buf = NULL;
    void *addr = NULL;
    size_t len = 0;
    if (mapped) {
        struct pms_map_opts mo;
        pms_map_opts_init(&mo);
        int r = pms_map(dev, &mo, &addr, &len);
        if (r < 0) {
            pms_close(dev);
            return -1;
        }
        t0 = now();
        c0 = cpu_now();
        volatile uint8_t sink = 0;
        for (uint64_t off = 0; off < npages * PG; off += PG)
            sink ^= ((volatile uint8_t *)addr)[off];
        (void)sink;
    } else {
        buf = malloc(chunk);
        for (uint64_t off = 0; off < npages * PG; off += chunk) {
            CHECK(pms_pread(dev, buf, chunk, off));
            for (unsigned i = 0; i < chunk / PG; i++)
                if (off / PG + i < npages && !check_page(buf + (size_t)i * PG, off / PG + i,
                                                         ver[off / PG + i])) {
                    FAIL("%s: page %llu wrong", img, (unsigned long long)(off / PG + i));
                    break;
                }
        }
    }
    double t = now() - t0;
    last_cpu = cpu_now() - c0;
    if (mapped) {
        for (uint64_t p = 0; p < npages; p++)
            if (!check_page((uint8_t *)addr + p * PG, p, ver[p])) {
                FAIL("%s mapped: page %llu wrong", img, (unsigned long long)p);
                break;
            }
        CHECK(pms_unmap(dev));
    }
    free(buf);
    CHECK(pms_close(dev));
    return t;
}

static int do_chain(const char *dir, uint64_t mib, int layers)
{
    char img[4096], one[4096];
    snprintf(img, sizeof img, "%s/chain.qcow2", dir);
    snprintf(one, sizeof one, "%s/one.qcow2", dir);
    uint64_t size = mib << 20, npages = size / PG;
    uint32_t *ver = calloc(npages, sizeof *ver);
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    CHECK(pms_create(img, size, &co));
    CHECK(pms_create(one, size, &co));
    pms_dev *d, *o;
    CHECK(pms_open(img, NULL, &d));
    CHECK(pms_open(one, NULL, &o));
    const size_t big = 1 << 20;
    uint8_t *buf = malloc(big);
    for (uint64_t off = 0; off < size; off += big) {
        for (unsigned i = 0; i < big / PG; i++)
            fill_page(buf + (size_t)i * PG, off / PG + i, 1);
        CHECK(pms_pwrite(d, buf, big, off));
        CHECK(pms_pwrite(o, buf, big, off));
    }
    for (uint64_t p = 0; p < npages; p++)
        ver[p] = 1;
    unsigned seed = 3;
    double tsnap = 0;
    for (int l = 0; l < layers; l++) {
        char name[32];
        snprintf(name, sizeof name, "s%d", l);
        double t0 = now();
        CHECK(pms_snapshot_create_ex(d, name, PMS_SNAP_EXTERNAL));
        tsnap += now() - t0;
        for (int i = 0; i < 16; i++) {
            uint64_t p = (uint64_t)rand_r(&seed) % npages;
            fill_page(buf, p, (uint32_t)(l + 2));
            CHECK(pms_pwrite(d, buf, PG, p * PG));
            CHECK(pms_pwrite(o, buf, PG, p * PG));
            ver[p] = (uint32_t)(l + 2);
        }
    }
    CHECK(pms_close(d));
    CHECK(pms_close(o));
    free(buf);
    printf("chain: %llu MiB, %d layers; snapshot create mean %.2f ms\n",
           (unsigned long long)mib, layers, layers ? tsnap * 1e3 / layers : 0.0);
    double ratio_max = getenv("PMS_CHAIN_MAX_RATIO") ? atof(getenv("PMS_CHAIN_MAX_RATIO")) : 0;
    for (int mapped = 0; mapped < 2; mapped++) {
        /* one layer first, then the chain, then the one layer again (the
         * page cache is warm for both: what differs is the chain walk) */
        double a = read_all(one, ver, npages, mapped), ac = last_cpu;
        double c = read_all(img, ver, npages, mapped), cc = last_cpu;
        double a2 = read_all(one, ver, npages, mapped);
        if (a < 0 || c < 0) {
            printf("chain: mapped first touch skipped (pms_map: %s)\n", pms_errmsg());
            continue;
        }
        if (a2 < a) a = a2;
        if (last_cpu < ac) ac = last_cpu;
        printf("chain: first-touch read of %llu MiB, %s: one layer %.1f ms (cpu %.1f ms), "
               "%d layers %.1f ms (cpu %.1f ms): %.2fx wall, %.2fx cpu\n",
               (unsigned long long)mib, mapped ? "mapped (faults)" : "pms_pread 64 KiB",
               a * 1e3, ac * 1e3, layers + 1, c * 1e3, cc * 1e3, c / a, cc / ac);
        if (ratio_max > 0 && c / a > ratio_max)
            FAIL("chain read %.2fx slower than one layer (limit %.2fx)", c / a, ratio_max);
    }
    /* grow the live image after the chain map was built: the old range still
     * reads through the chain, the new range reads zeroes */
    CHECK(pms_open(img, NULL, &d));
    uint8_t *b2 = malloc(2 * PG);
    CHECK(pms_pread(d, b2, PG, 0));
    CHECK(pms_truncate(d, size + (1 << 20)));
    CHECK(pms_pread(d, b2, 2 * PG, size - PG));
    uint8_t zero[PG];
    memset(zero, 0, sizeof zero);
    if (!check_page(b2, npages - 1, ver[npages - 1]) || memcmp(b2 + PG, zero, PG))
        FAIL("read across the old end after growing the top of the chain");
    free(b2);
    CHECK(pms_close(d));
    free(ver);
    return fails ? 1 : 0;
}

static int do_prep(const char *dir)
{
    char img[4096], tmp[4096], layer[4096];
    snprintf(img, sizeof img, "%s/prep.qcow2", dir);
    snprintf(tmp, sizeof tmp, "%s/.prep.qcow2.extsnap-tmp", dir);
    snprintf(layer, sizeof layer, "%s/prep.qcow2@p1", dir);
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    CHECK(pms_create(img, 1 << 20, &co));
    struct bdev *bs;
    CHECK(bdev_open(img, NULL, &bs));
    uint8_t buf[PG], got[PG];
    fill_page(buf, 3, 1);
    CHECK(bdev_pwrite(bs, buf, PG, 3 * PG));
    struct stat st0, st;
    stat(img, &st0);
    struct bdev_extsnap_prep *x;
    CHECK(bdev_extsnap_prepare(bs, "p1", &x));
    if (stat(tmp, &st) < 0) FAIL("prepare made no overlay");
    if (stat(layer, &st) == 0) FAIL("prepare made the layer");
    if (stat(img, &st) < 0 || st.st_ino != st0.st_ino) FAIL("prepare switched the live file");
    bdev_extsnap_abort(x);
    if (stat(tmp, &st) == 0) FAIL("abort left the overlay");
    CHECK(bdev_extsnap_prepare(bs, "p1", &x));
    struct bdev_extsnap_prep *y;
    if (bdev_extsnap_prepare(bs, "bad/name", &y) != -EINVAL) FAIL("a bad name was prepared");
    /* writes between prepare and commit land in the state the snapshot keeps */
    fill_page(buf, 4, 1);
    CHECK(bdev_pwrite(bs, buf, PG, 4 * PG));
    struct bdev *before = bs;
    CHECK(bdev_extsnap_commit(x));
    if (bs != before || !bs->backing) FAIL("commit did not switch the node in place");
    if (stat(layer, &st) < 0 || st.st_ino != st0.st_ino) FAIL("the layer is not the old live file");
    if (stat(img, &st) < 0 || st.st_ino == st0.st_ino) FAIL("the live path is still the old file");
    for (uint64_t p = 3; p <= 4; p++) {
        CHECK(bdev_pread(bs, got, PG, p * PG));
        if (!check_page(got, p, 1)) FAIL("page %llu wrong after commit", (unsigned long long)p);
    }
    bdev_close(bs);
    printf("prep: prepare, abort and commit as documented\n");
    return fails ? 1 : 0;
}

static int sh(const char *fmt, const char *a, const char *b)
{
    char cmd[8192 + 64];
    if (snprintf(cmd, sizeof cmd, fmt, a, b) >= (int)sizeof cmd) return -1;
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int do_faulty(const char *dir)
{
    char img[1024], ref[1024];
    if (strlen(dir) > 900) return 2;
    snprintf(img, sizeof img, "%s/f.qcow2", dir);
    snprintf(ref, sizeof ref, "%s/f-ref.raw", dir);
    int kills = 0;
    for (int round = 0; round < 24; round++) {
        const char *mode = round % 2 ? "tear" : "drop";
        /* a written image, snapshot A, a few writes into the overlay */
        sh("rm -f %s %s@* && true", img, img);
        struct pms_create_opts co;
        pms_create_opts_init(&co);
        CHECK(pms_create(img, 4 << 20, &co));
        pms_dev *d;
        CHECK(pms_open(img, NULL, &d));
        uint8_t buf[PG];
        for (uint64_t p = 0; p < 1024; p++) {
            fill_page(buf, p, 1);
            CHECK(pms_pwrite(d, buf, PG, p * PG));
        }
        CHECK(pms_snapshot_create_ex(d, "A", PMS_SNAP_EXTERNAL));
        unsigned seed = (unsigned)round + 1;
        for (int i = 0; i < 40; i++) {
            uint64_t p = (uint64_t)rand_r(&seed) % 1024;
            fill_page(buf, p, 2);
            CHECK(pms_pwrite(d, buf, 1000, p * PG + 512));
        }
        CHECK(pms_close(d));
        if (sh("qemu-img convert -U -O raw %s %s", img, ref) != 0) FAIL("qemu-img convert");
        /* delete A (streams A's data into the live image) with power lost
         * at write K */
        struct pms_open_opts o;
        pms_open_opts_init(&o);
        char spec[128];
        snprintf(spec, sizeof spec, "seed=%d,crash_after=%d,mode=%s", round + 7, 1 + round * 5,
                 mode);
        o.fault_spec = spec;
        CHECK(pms_open(img, &o, &d));
        int r = pms_snapshot_delete(d, "A");
        pms_close(d);                   /* fails after the power loss */
        char layer[1100];
        snprintf(layer, sizeof layer, "%s@A", img);
        if (r < 0) {
            kills++;
            if (access(layer, F_OK) != 0) FAIL("round %d: A is gone after a failed delete", round);
        }
        int c = sh("qemu-img check -q %s >/dev/null 2>&1; test $? = 0 -o $? = 3%s", img, "");
        if (c != 0) FAIL("round %d (%s, %s): qemu-img check of the live image", round, spec,
                         r < 0 ? "interrupted" : "completed");
        if (sh("qemu-img compare -U -q %s -F raw %s", img, ref) != 0)
            FAIL("round %d (%s): the live image changed", round, spec);
        /* and it stays usable: the delete finishes on a normal open */
        if (r < 0) {
            CHECK(pms_open(img, NULL, &d));
            if (pms_snapshot_delete(d, "A") < 0) FAIL("round %d: delete after recovery: %s", round,
                                                      pms_errmsg());
            CHECK(pms_close(d));
            if (sh("qemu-img compare -U -q %s -F raw %s", img, ref) != 0)
                FAIL("round %d: the live image changed by the second delete", round);
            if (sh("qemu-img check -q %s%s", img, "") != 0) FAIL("round %d: check after delete", round);
        }
    }
    printf("faulty: 24 deletes over the fault injector, %d interrupted by a power loss\n", kills);
    if (kills < 8) FAIL("only %d of 24 deletes were interrupted", kills);
    return fails ? 1 : 0;
}

/* A new qcow2 image DIR/BASE of size bytes; its path in img (1024 bytes). */
static int new_image(const char *dir, const char *base, uint64_t size, char *img)
{
    if (strlen(dir) > 900) return 2;
    snprintf(img, 1024, "%s/%s", dir, base);
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    CHECK(pms_create(img, size, &co));
    return 0;
}

static int do_limit(const char *dir)
{
    char img[1024];
    if (new_image(dir, "lim.qcow2", 1 << 20, img)) return 2;
    pms_dev *d;
    CHECK(pms_open(img, NULL, &d));
    int i, r = 0;
    for (i = 0; i < 400; i++) {
        char name[16];
        snprintf(name, sizeof name, "l%d", i);
        uint8_t b = (uint8_t)i;
        CHECK(pms_pwrite(d, &b, 1, (uint64_t)i * 512));
        if ((r = pms_snapshot_create_ex(d, name, PMS_SNAP_EXTERNAL)) < 0)
            break;
    }
    if (r != -EMLINK) FAIL("snapshot %d: %d (%s), not EMLINK at the chain limit", i, r, pms_errmsg());
    else printf("limit: %d external snapshots, the next refused: %s\n", i, pms_errmsg());
    CHECK(pms_close(d));
    CHECK(pms_open(img, NULL, &d));            /* the whole chain still opens */
    uint8_t got[512 * 8];
    CHECK(pms_pread(d, got, sizeof got, 0));
    for (int k = 0; k < 8; k++)
        if (got[k * 512] != (uint8_t)k) FAIL("byte %d through the chain", k * 512);
    CHECK(pms_close(d));
    return fails ? 1 : 0;
}

/* Revert of a mapped device to an external snapshot of another size (the
 * image grew after it): refused with EBUSY, the mapping and the image left
 * as they were (it was accepted: the image shrank under the mapping, whose
 * tail then raised SIGBUS). */
static int do_resized(const char *dir)
{
    char img[1024];
    if (new_image(dir, "rsz.qcow2", 1 << 20, img)) return 2;
    pms_dev *d;
    CHECK(pms_open(img, NULL, &d));
    CHECK(pms_snapshot_create_ex(d, "small", PMS_SNAP_EXTERNAL));
    CHECK(pms_truncate(d, 4 << 20));
    uint8_t *p;
    size_t len;
    CHECK(pms_map(d, NULL, (void **)&p, &len));
    memset(p + (3 << 20), 'X', 4096);
    int r = pms_snapshot_revert(d, "small");
    if (r != -EBUSY) FAIL("revert to a 1 MiB external snapshot under a 4 MiB mapping: %d (%s)", r,
                          pms_errmsg());
    else printf("resized: refused: %s\n", pms_errmsg());
    if (pms_size(d) != 4 << 20) FAIL("the image is %lld bytes after the refused revert",
                                     (long long)pms_size(d));
    if (p[(3 << 20) + 100] != 'X') FAIL("the mapping's tail changed");
    CHECK(pms_close(d));
    return fails ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "resized"))
        return do_resized(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "limit"))
        return do_limit(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "faulty"))
        return do_faulty(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "prep"))
        return do_prep(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "busy"))
        return do_busy(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "switch"))
        return do_switch(argv[2]);
    if (argc >= 5 && !strcmp(argv[1], "chain"))
        return do_chain(argv[2], strtoull(argv[3], NULL, 0), atoi(argv[4]));
    fprintf(stderr, "usage: extsnap-api switch|busy|prep|faulty|limit|resized DIR | chain DIR SIZE_MIB LAYERS\n");
    return 2;
}
