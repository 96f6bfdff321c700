/* Memory-device test driver: one subcommand per scenario; the shell
 * scripts around it check the persisted bytes with QEMU's own tools.
 *
 *   mem-test basic   IMG MODE           lazy fault-in, stores, persist, coherence
 *   mem-test crash   IMG MODE           persist rounds forever (parent kill -9s us)
 *   mem-test atomic  IMG MODE NT NS     NT writer threads, NS live snapshots
 *   mem-test verify  RAW NT [PREVSUM]   check one snapshot's slots (converted raw)
 *   mem-test revert  IMG MODE           snapshot, store, revert, check
 *   mem-test revert-wb IMG MODE         reverts that meet a writeback round
 *                                       mid-way (failed part-way, or stopped)
 *   mem-test wberr   IMG MODE           write-backs that fail keep pages dirty
 *   mem-test cap     IMG MODE LIMIT_MB STORE_MB
 *   mem-test tinycap IMG MODE           stores under the smallest cap (4 chunks)
 *   mem-test capsnap IMG MODE LIMIT_MB SECS  random page stores under a cap
 *                                       while a thread takes an external
 *                                       snapshot every CAPSNAP_PERIOD_MS
 *                                       (the oldest beyond CAPSNAP_KEEP deleted)
 *   mem-test powerfail IMG MODE SPEC SEED  random page stores into a fresh
 *                                       image behind the fault-injecting driver
 *                                       (SPEC: its crash_after/mode), a persist
 *                                       every PF_PERSIST_EVERY rounds, until the
 *                                       simulated power loss (mem-powerfail.sh)
 *   mem-test sigbus  IMG OFF HOSTOFF    read error during fault-in -> SIGBUS
 *   mem-test ro      IMG                read-only mapping: loads work, stores SIGSEGV
 *   mem-test prefetch IMG               background prefetch fills the mapping
 *   mem-test blocked IMG                a thread blocks the stop signal: clean EAGAIN
 *   mem-test probe   MODE               exit 0, or 77 naming the kernel feature
 *                                       MODE (or "ro", a read-only mapping) lacks
 * MODE: auto | async | sync.  Exit 0 = pass, 1 = fail, 77 = the kernel
 * lacks a feature the scenario needs (kfeat.h; a library error never skips).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "kfeat.h"

#define PG 4096
#define FAIL(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                       fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) FAIL(__VA_ARGS__); } while (0)
/* Any error fails, -ENOTSUP included: the only skip is main()'s kernel
 * feature probe (kfeat.h) before a scenario starts. */
#define API(call) do { int r_ = (call); if (r_ < 0) \
        FAIL("%s = %d: %s", #call, r_, pms_errmsg()); } while (0)

static int mode_of(const char *s)
{
    if (strcmp(s, "async") == 0) return PMS_DIRTY_ASYNC_WP;
    if (strcmp(s, "sync") == 0) return PMS_DIRTY_SYNC_WP;
    return PMS_DIRTY_AUTO;
}

static int g_unsafe;   /* cache=unsafe: the cap test is about memory, not durability */

static pms_dev *open_img(const char *path, int ro, const char *fault)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    if (g_unsafe)
        o.cache_mode = PMS_CACHE_UNSAFE;
    o.readonly = ro;
    o.fault_spec = fault;
    pms_dev *d;
    API(pms_open(path, &o, &d));
    return d;
}

static uint8_t *map(pms_dev *d, const char *mode, uint64_t limit, size_t *len)
{
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = mode_of(mode);
    mo.mem_limit = limit;
    mo.writeback_interval_ms = 50;
    void *a;
    API(pms_map(d, &mo, &a, len));
    return a;
}

static struct pms_stats stats(pms_dev *d)
{
    struct pms_stats st = { .size = sizeof st };
    API(pms_stats(d, &st));
    return st;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- basic --------------------------------------------------------------- */
/* Expects the image to hold 0x5a in [1M, 2M) (written by qemu-io). */
static int t_basic(const char *img, const char *mode)
{
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint8_t *p = map(d, mode, 0, &len);
    struct pms_stats st = stats(d);
    CHECK(st.faults == 0 && st.bytes_faulted_in == 0, "map read data (faults=%" PRIu64 ")", st.faults);
    CHECK(p[1 << 20] == 0x5a && p[(2 << 20) - 1] == 0x5a, "pattern not faulted in");
    CHECK(p[0] == 0 && p[3 << 20] == 0, "zero region not zero");
    st = stats(d);
    CHECK(st.faults >= 2, "no faults counted");
    /* stores: 0x11 over [4M, 4M+256K), persist that range */
    memset(p + (4 << 20), 0x11, 256 << 10);
    API(pms_persist(d, p + (4 << 20), 256 << 10));
    st = stats(d);
    CHECK(st.bytes_written_back >= (256 << 10), "persist wrote %" PRIu64, st.bytes_written_back);
    /* coherence: pwrite seen by loads; stores seen by pread */
    uint8_t buf[8192];
    memset(buf, 0x22, sizeof buf);
    API(pms_pwrite(d, buf, sizeof buf, (5 << 20) + 100));
    CHECK(p[(5 << 20) + 100] == 0x22 && p[(5 << 20) + 100 + 8191] == 0x22 &&
          p[(5 << 20) + 99] == 0, "pwrite not visible in mapping");
    memset(p + (6 << 20), 0x33, 3 * PG);
    API(pms_pread(d, buf, sizeof buf, 6 << 20));
    CHECK(buf[0] == 0x33 && buf[8191] == 0x33, "store not visible to pread");
    API(pms_write_zeroes(d, PG, 1 << 20));
    CHECK(p[1 << 20] == 0 && p[(1 << 20) + PG] == 0x5a, "write_zeroes not visible");
    /* background writeback without persist: wait for it */
    memset(p + (7 << 20), 0x44, 64 << 10);
    uint64_t before = stats(d).bytes_written_back;
    for (int i = 0; i < 500 && stats(d).bytes_written_back < before + (64 << 10); i++)
        usleep(20000);
    CHECK(stats(d).bytes_written_back >= before + (64 << 10), "background writeback idle");
    st = stats(d);
    printf("mode=%d faults=%" PRIu64 " wp_faults=%" PRIu64 " in=%" PRIu64 " out=%" PRIu64 "\n",
           st.dirty_mode, st.faults, st.wp_faults, st.bytes_faulted_in, st.bytes_written_back);
    if (strcmp(mode, "sync") == 0)
        CHECK(st.dirty_mode == PMS_DIRTY_SYNC_WP && st.wp_faults > 0, "sync mode not in use");
    if (strcmp(mode, "async") == 0)
        CHECK(st.dirty_mode == PMS_DIRTY_ASYNC_WP, "async mode not in use");
    API(pms_unmap(d));
    /* after unmap the block path sees everything */
    API(pms_pread(d, buf, 16, (5 << 20) + 100));
    CHECK(buf[0] == 0x22, "pwrite lost at unmap");
    API(pms_close(d));
    return 0;
}

/* ---- crash --------------------------------------------------------------- */
/* Round k: fill [k*1M, (k+1)*1M) with 0x10+k, persist it, report; then keep
 * scribbling 0xee over the next round's range without persisting. */
static int t_crash(const char *img, const char *mode)
{
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint8_t *p = map(d, mode, 0, &len);
    for (unsigned k = 0; (k + 2) * (1u << 20) <= len; k++) {
        memset(p + ((size_t)k << 20), 0x10 + (int)k, 1 << 20);
        API(pms_persist(d, p + ((size_t)k << 20), 1 << 20));
        printf("persisted %u\n", k);
        fflush(stdout);
        for (int i = 0; i < 64; i++) {
            memset(p + ((size_t)(k + 1) << 20) + (size_t)(rand() % 256) * PG, 0xee, PG);
            usleep(500);
        }
    }
    for (;;)
        pause();
}

/* ---- power failure ------------------------------------------------------------ */
/* Rounds of PF_PAGES random page stores (each 64-bit word of page PAGE in
 * round G is G << 32 | PAGE), PF_ROUND_US apart so that the writeback's
 * rounds and its metadata checkpoints run between them, a pms_persist of
 * the whole mapping every PF_PERSIST_EVERY rounds, until a request fails
 * (the fault-injecting driver lost power after crash_after writes) or
 * PF_ROUNDS_MAX.  Prints "gen G PAGE" per store and "persisted G" after
 * every persist that returned 0; mem-powerfail.sh checks the image. */
#define PF_PAGES        24
#define PF_PERSIST_EVERY 4
#define PF_ROUND_US     4000
#define PF_ROUNDS_MAX   400
/* writeback rounds this often, so that they run beside the write-out
 * thread's checkpoints (every 50 ms at most) */
#define PF_WRITEBACK_MS 3

static int t_powerfail(const char *img, const char *mode, const char *spec, unsigned seed)
{
    pms_dev *d = open_img(img, 0, spec);
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = mode_of(mode);
    mo.writeback_interval_ms = PF_WRITEBACK_MS;
    void *a;
    size_t len;
    API(pms_map(d, &mo, &a, &len));
    uint8_t *p = a;
    srand(seed);
    unsigned g;
    for (g = 1; g <= PF_ROUNDS_MAX; g++) {
        for (int i = 0; i < PF_PAGES; i++) {
            uint64_t pg = (uint64_t)rand() % (len / PG);
            uint64_t *w = (uint64_t *)(p + pg * PG);
            for (size_t j = 0; j < PG / 8; j++)
                w[j] = (uint64_t)g << 32 | pg;
            printf("gen %u %" PRIu64 "\n", g, pg);
        }
        if (g % PF_PERSIST_EVERY == 0) {
            if (pms_persist(d, p, len) < 0)
                break;
            printf("persisted %u\n", g);
        }
        usleep(PF_ROUND_US);
    }
    printf("%s after round %u\n", g > PF_ROUNDS_MAX ? "nocrash" : "crashed", g);
    /* the device has lost power: these fail, and must neither hang nor
     * crash */
    (void)pms_unmap(d);
    (void)pms_close(d);
    return 0;
}

/* ---- atomic cut ------------------------------------------------------------ */
#define SLOTS 64        /* slots per thread, one per page (see slot_off) */
static uint8_t *g_p;
static atomic_int g_stop;
static atomic_int g_started;    /* writers that finished their first pass */

/* Pages between two slots (MEM_ATOMIC_STRIDE, default 1): a large stride
 * spreads the slots over a large mapping. */
static size_t stride(void)
{
    const char *e = getenv("MEM_ATOMIC_STRIDE");
    return e && atol(e) > 0 ? (size_t)atol(e) : 1;
}

/* Slot j of thread t: the threads' slots interleave (page j * nt + t, times
 * the stride), so each thread's slots span the whole range the slots
 * cover, and a part of a cut that missed a range shows as a thread whose
 * slots are not a prefix. */
static int g_nt = 1;
static size_t slot_off(size_t t, size_t j)
{
    return (j * (size_t)g_nt + t) * stride() * PG + 8 * t;
}

static void *writer(void *arg)
{
    uintptr_t t = (uintptr_t)arg;
    volatile uint64_t *slot[SLOTS];
    for (int j = 0; j < SLOTS; j++)
        slot[j] = (volatile uint64_t *)(g_p + slot_off(t, (size_t)j));
    for (uint64_t n = 1; !atomic_load_explicit(&g_stop, memory_order_relaxed); n++) {
        for (int j = 0; j < SLOTS; j++)
            *slot[j] = n;
        if (n == 1)
            atomic_fetch_add(&g_started, 1);
    }
    return NULL;
}

static int t_atomic(const char *img, const char *mode, int nt, int ns)
{
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    g_p = map(d, mode, 0, &len);
    g_nt = nt;
    CHECK(nt > 0 && slot_off((size_t)nt - 1, SLOTS - 1) + 8 <= len, "image too small");
    pthread_t th[64];
    for (int t = 0; t < nt; t++)
        pthread_create(&th[t], NULL, writer, (void *)(uintptr_t)t);
    /* every writer has stored before the first snapshot (a loaded machine
     * may not schedule one within a fixed delay) */
    for (int w = 0; atomic_load(&g_started) < nt; w++) {
        CHECK(w < 60000, "writers did not start within 60 s");
        usleep(1000);
    }
    usleep(50000);
    for (int s = 0; s < ns; s++) {
        char name[32];
        snprintf(name, sizeof name, "s%d", s);
        /* also dirty a spread of pages so the snapshot has work */
        for (int i = 0; i < 256; i++)
            g_p[(size_t)(nt * SLOTS + 16 + i * 3) * PG] = (uint8_t)s;
        const char *kind = getenv("MEM_SNAP_KIND");   /* external: layer files */
        API(pms_snapshot_create_ex(d, name, kind && !strcmp(kind, "external")
                                            ? PMS_SNAP_EXTERNAL : 0));
        struct pms_stats st = stats(d);
        printf("snapshot %s: %.2f ms, pause %.3f ms, %" PRIu64 " KiB\n", name,
               st.last_snapshot_ns / 1e6, st.last_snapshot_pause_ns / 1e6,
               st.last_snapshot_bytes >> 10);
        usleep(30000);
    }
    atomic_store(&g_stop, 1);
    for (int t = 0; t < nt; t++)
        pthread_join(th[t], NULL);
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

/* Checks a raw dump of one snapshot: per thread, slots read n..n,n-1..n-1. */
static int t_verify(const char *raw, int nt)
{
    g_nt = nt;
    FILE *f = fopen(raw, "rb");
    CHECK(f, "open %s", raw);
    uint64_t total = 0;
    for (int t = 0; t < nt; t++) {
        uint64_t v[SLOTS];
        for (int j = 0; j < SLOTS; j++) {
            fseek(f, (long)slot_off((size_t)t, (size_t)j), SEEK_SET);
            CHECK(fread(&v[j], 8, 1, f) == 1, "short read");
        }
        int drops = 0;
        for (int j = 1; j < SLOTS; j++) {
            if (v[j] == v[j - 1]) continue;
            CHECK(v[j] + 1 == v[j - 1] && !drops,
                  "thread %d not a prefix: slot %d=%" PRIu64 " slot %d=%" PRIu64, t, j - 1,
                  v[j - 1], j, v[j]);
            drops++;
        }
        CHECK(v[0] > 0, "thread %d never ran", t);
        total += v[0];
    }
    fclose(f);
    printf("%" PRIu64 "\n", total);
    return 0;
}

/* ---- revert ----------------------------------------------------------------- */
static int t_revert(const char *img, const char *mode)
{
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint8_t *p = map(d, mode, 0, &len);
    memset(p, 0xa1, 2 << 20);
    API(pms_snapshot_create_ex(d, "A", PMS_SNAP_QUIESCED));
    memset(p, 0xb2, 1 << 20);                 /* dirty, never written back */
    memset(p + (3 << 20), 0xb2, 1 << 20);
    API(pms_persist(d, p + (3 << 20), 1 << 20));     /* written back + flushed */
    API(pms_snapshot_revert(d, "A"));
    CHECK(p[0] == 0xa1 && p[(1 << 20) - 1] == 0xa1 && p[(2 << 20) - 1] == 0xa1,
          "revert: got %#x", p[0]);
    CHECK(p[3 << 20] == 0, "revert: persisted-after-snapshot data still visible");
    uint8_t b = 0;
    API(pms_pread(d, &b, 1, 100));
    CHECK(b == 0xa1, "pread after revert");
    memset(p + (5 << 20), 0xc3, 64 << 10);
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

/* Revert to a snapshot that has data where the live image reads as
 * zeroes and a fresh mapping has already seen those zeroes (its first fault
 * in the region learns which parts read as zero): the reverted bytes must
 * appear, for both kinds of snapshot.  Offsets: data at 8 MiB + 64 KiB,
 * the first fault at 8 MiB (the same 256 MiB region). */
static int t_revert_zero(const char *img, const char *mode)
{
    const uint64_t at = (8u << 20) + (64u << 10);
    for (int ext = 0; ext < 2; ext++) {
        char name[8];
        snprintf(name, sizeof name, "Z%d", ext);
        unsigned kind = PMS_SNAP_QUIESCED | (ext ? PMS_SNAP_EXTERNAL : 0);
        pms_dev *d = open_img(img, 0, NULL);
        size_t len;
        uint8_t *p = map(d, mode, 0, &len);
        memset(p + at, 0x5a, 64 << 10);
        API(pms_snapshot_create_ex(d, name, kind));
        API(pms_discard(d, 64 << 10, at));     /* the live image: zeroes */
        API(pms_unmap(d));
        API(pms_close(d));
        d = open_img(img, 0, NULL);
        p = map(d, mode, 0, &len);
        CHECK(p[8u << 20] == 0 && p[at] == 0 && p[at + 4096] == 0, "discarded range not zero");
        API(pms_snapshot_revert(d, name));
        for (uint64_t o = 0; o < (64u << 10); o += 4096)
            CHECK(p[at + o] == 0x5a, "revert to %s: offset %" PRIu64 " reads %#x, not 0x5a",
                  name, at + o, p[at + o]);
        API(pms_unmap(d));
        API(pms_close(d));
    }
    return 0;
}

/* ---- memory cap ------------------------------------------------------------ */
static uint64_t rss_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t v = 0;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, strlen(key)) == 0)
            v = strtoull(line + strlen(key) + 1, NULL, 10);
    if (f) fclose(f);
    return v;
}

/* Does MADV_DONTNEED of an empty 2 MiB block free its page table here
 * (CONFIG_PT_RECLAIM)?  64 blocks touched once each, then dropped. */
static bool kernel_frees_page_tables(void)
{
    size_t len = 128u << 20;
    uint8_t *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return false;
    uint8_t *b = (uint8_t *)(((uintptr_t)a + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1));
    for (int i = 0; i < 60; i++) b[(size_t)i << 21] = 1;
    uint64_t before = rss_kb("VmPTE:");
    madvise(b, (size_t)60 << 21, MADV_DONTNEED);
    uint64_t after = rss_kb("VmPTE:");
    munmap(a, len);
    return before >= after + 200;      /* 60 tables are 240 KiB */
}

static int t_cap(const char *img, const char *mode, uint64_t limit_mb, uint64_t store_mb)
{
    g_unsafe = 1;
    bool pt_reclaim = kernel_frees_page_tables();
    uint64_t base_pte = rss_kb("VmPTE:"), maxpte = 0;
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint64_t base_rss = rss_kb("RssAnon:");
    uint8_t *p = map(d, mode, limit_mb << 20, &len);
    uint64_t nblk = len / (64 << 10), n = store_mb * 16, seed = 12345, maxrss = 0;
    uint64_t t0 = now_ns();
    uint64_t *offs = malloc(n * sizeof *offs);
    for (uint64_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t b = (seed >> 20) % nblk;
        offs[i] = b;
        uint64_t *q = (uint64_t *)(p + b * (64 << 10));
        for (int j = 0; j < (64 << 10) / 8; j += 512)
            q[j] = b * 1000 + (uint64_t)j;         /* one store per page */
        memset(q + 1, (int)(b & 0xff), 64);
        if ((i & 255) == 0) {
            uint64_t r = rss_kb("RssAnon:"), t = rss_kb("VmPTE:");
            if (r > maxrss) maxrss = r;
            if (t > maxpte) maxpte = t;
        }
    }
    double secs = (now_ns() - t0) / 1e9;
    /* read back everything: evicted pages come back from the image */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t b = offs[i], *q = (uint64_t *)(p + b * (64 << 10));
        for (int j = 0; j < (64 << 10) / 8; j += 512)
            CHECK(q[j] == b * 1000 + (uint64_t)j, "block %" PRIu64 " page %d lost", b, j / 512);
        if ((i & 255) == 0) {
            uint64_t r = rss_kb("RssAnon:");
            if (r > maxrss) maxrss = r;
        }
    }
    struct pms_stats st = stats(d);
    uint64_t used = maxrss > base_rss ? maxrss - base_rss : 0;
    printf("cap %" PRIu64 " MiB: %" PRIu64 " MiB stored in %.2f s, peak RssAnon growth %" PRIu64
           " MiB, evicted %" PRIu64 " MiB, written back %" PRIu64 " MiB\n",
           limit_mb, store_mb, secs, used >> 10, (st.pages_evicted * PG) >> 20,
           st.bytes_written_back >> 20);
    uint64_t slack = getenv("PMS_CAP_SLACK_MB") ? strtoull(getenv("PMS_CAP_SLACK_MB"), NULL, 0) : 64;
    CHECK(used <= (limit_mb + slack) << 10, "RSS %" PRIu64 " MiB over cap %" PRIu64 " + %" PRIu64,
          used >> 10, limit_mb, slack);
    CHECK(st.pages_evicted > 0, "nothing evicted");
    /* Page tables: at most one per resident 64 KiB block, so a cap's worth
     * of blocks needs limit/16 of tables; without reclaim every 2 MiB block
     * ever touched keeps its table. */
    uint64_t pte = maxpte > base_pte ? maxpte - base_pte : 0,
             pte_cap = (limit_mb << 10) / 16 + (slack << 10) / 16;   /* sanitizers map shadow too */
    printf("peak VmPTE growth %" PRIu64 " KiB (bound %" PRIu64 " KiB)%s\n", pte, pte_cap,
           pt_reclaim ? "" : "; not checked: this kernel does not free empty page tables "
                             "on MADV_DONTNEED (CONFIG_PT_RECLAIM)");
    if (pt_reclaim)
        CHECK(pte <= pte_cap, "page tables grew by %" PRIu64 " KiB, over %" PRIu64 " KiB: "
              "eviction does not free them", pte, pte_cap);
    API(pms_unmap(d));
    API(pms_close(d));
    free(offs);
    return 0;
}

/* ---- memory cap with snapshots -------------------------------------------- */
/* The scale run in small: a snapshot every second, three kept, so
 * layers (each with its metadata caches) come and go and every delete merges. */
#define CAPSNAP_PERIOD_MS 1000
#define CAPSNAP_KEEP 3

struct capsnap {
    pms_dev *d;
    atomic_bool stop;
    atomic_uint_fast64_t maxrss;
    int taken;
};

static void note_rss(struct capsnap *c)
{
    uint64_t r = rss_kb("RssAnon:"), m = atomic_load(&c->maxrss);
    while (r > m && !atomic_compare_exchange_weak(&c->maxrss, &m, r)) {}
}

static void *capsnap_main(void *arg)
{
    struct capsnap *c = arg;
    char name[32];
    while (!atomic_load(&c->stop)) {
        for (int i = 0; i < CAPSNAP_PERIOD_MS / 10 && !atomic_load(&c->stop); i++) {
            usleep(10000);
            note_rss(c);
        }
        snprintf(name, sizeof name, "s%d", c->taken);
        API(pms_snapshot_create_ex(c->d, name, PMS_SNAP_EXTERNAL));
        if (c->taken >= CAPSNAP_KEEP) {
            snprintf(name, sizeof name, "s%d", c->taken - CAPSNAP_KEEP);
            API(pms_snapshot_delete(c->d, name));
        }
        c->taken++;
        note_rss(c);
    }
    return NULL;
}

static int t_capsnap(const char *img, const char *mode, uint64_t limit_mb, unsigned secs)
{
    g_unsafe = 1;
    uint64_t seed = 4242, n = 0, cap_n = 1u << 20;
    uint64_t *offs = malloc(cap_n * sizeof *offs);
    CHECK(offs, "out of memory");
    memset(offs, 0, cap_n * sizeof *offs);      /* the test's own memory is in the base */
    uint64_t base_rss = rss_kb("RssAnon:");
    struct capsnap c = { .d = open_img(img, 0, NULL) };
    size_t len;
    uint8_t *p = map(c.d, mode, limit_mb << 20, &len);
    uint64_t npg = len / PG;
    pthread_t th;
    CHECK(pthread_create(&th, NULL, capsnap_main, &c) == 0, "pthread_create");
    uint64_t t0 = now_ns(), end = t0 + secs * 1000000000ull;
    while (n < cap_n && ((n & 255) || now_ns() < end)) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t pg = (seed >> 16) % npg;
        *(uint64_t *)(p + pg * PG) = pg * 2654435761u + 1;
        offs[n++] = pg;
        if ((n & 255) == 0) note_rss(&c);
    }
    atomic_store(&c.stop, true);
    pthread_join(th, NULL);
    /* everything stored comes back, evicted or not */
    for (uint64_t i = 0; i < n; i++)
        CHECK(*(uint64_t *)(p + offs[i] * PG) == offs[i] * 2654435761u + 1,
              "page %" PRIu64 " lost", offs[i]);
    uint64_t used = atomic_load(&c.maxrss) > base_rss ? atomic_load(&c.maxrss) - base_rss : 0;
    uint64_t slack = getenv("PMS_CAP_SLACK_MB") ? strtoull(getenv("PMS_CAP_SLACK_MB"), NULL, 0) : 0;
    uint64_t bound = limit_mb + limit_mb / 10 + slack;
    printf("cap %" PRIu64 " MiB, %d external snapshots: %" PRIu64 " pages stored in %.1f s, "
           "peak RssAnon growth %" PRIu64 " MiB (bound %" PRIu64 ")\n", limit_mb, c.taken, n,
           (now_ns() - t0) / 1e9, used >> 10, bound);
    CHECK(c.taken >= CAPSNAP_KEEP + 1, "only %d snapshots taken: no delete ran", c.taken);
    /* the live image and its layers hold table caches: the cap counts them */
    struct pms_stats st = stats(c.d);
    printf("metadata held now: %.1f MiB\n", st.metadata_bytes / 1048576.0);
    CHECK(st.metadata_bytes >= (64u << 10), "pms_stats metadata_bytes %" PRIu64
          " with %d layers open", st.metadata_bytes, CAPSNAP_KEEP);
    CHECK(used <= bound << 10, "RSS %" PRIu64 " MiB over cap %" PRIu64 " + 10%%", used >> 10, limit_mb);
    API(pms_unmap(c.d));
    API(pms_close(c.d));
    free(offs);
    return 0;
}

/* ---- SIGBUS on read error ----------------------------------------------------- */
static sigjmp_buf g_jb;
static volatile sig_atomic_t g_sig;
static void on_sig(int s) { g_sig = s; siglongjmp(g_jb, 1); }

static int t_sigbus(const char *img, uint64_t off, uint64_t host)
{
    char spec[64];
    snprintf(spec, sizeof spec, "read_error_at=%" PRIu64, host);
    pms_dev *d = open_img(img, 0, spec);
    size_t len;
    uint8_t *p = map(d, "auto", 0, &len);
    struct sigaction sa = { .sa_handler = on_sig };
    sigaction(SIGBUS, &sa, NULL);
    volatile uint8_t v = 0;
    if (sigsetjmp(g_jb, 1) == 0) {
        v = p[off];
        FAIL("no SIGBUS reading offset %" PRIu64 " (got %d)", off, v);
    }
    CHECK(g_sig == SIGBUS, "signal %d", g_sig);
    struct pms_stats st = stats(d);
    CHECK(st.io_errors >= 1 && strstr(st.last_error, "read error"), "error not reported: '%s'",
          st.last_error);
    printf("SIGBUS ok; io_errors=%" PRIu64 ": %s\n", st.io_errors, st.last_error);
    /* the rest of the device still works */
    v = p[off + (1 << 20)];
    p[off + (1 << 20)] = 7;
    CHECK(p[off + (1 << 20)] == 7, "store after error");
    (void)v;
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

/* A writer that blocks the safepoint signal: the live snapshot must fail
 * cleanly (EAGAIN, message), and PMS_SNAP_QUIESCED must still work. */
static void *blocked_writer(void *arg)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN + 6);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    volatile uint64_t *q = arg;
    while (!atomic_load(&g_stop))
        (*q)++;
    return NULL;
}

static int t_blocked(const char *img)
{
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint8_t *p = map(d, "auto", 0, &len);
    pthread_t th;
    pthread_create(&th, NULL, blocked_writer, p + 8192);
    usleep(20000);
    uint64_t t0 = now_ns();
    int r = pms_snapshot_create(d, "live");
    double s = (now_ns() - t0) / 1e9;
    CHECK(r == -EAGAIN, "snapshot with a thread blocking the signal returned %d", r);
    CHECK(strstr(pms_errmsg(), "PMS_SNAP_QUIESCED"), "message: %s", pms_errmsg());
    CHECK(s < 5, "gave up after %.1f s", s);
    printf("refused after %.2f s: %s\n", s, pms_errmsg());
    atomic_store(&g_stop, 1);
    pthread_join(th, NULL);
    API(pms_snapshot_create_ex(d, "quiesced", PMS_SNAP_QUIESCED));
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

/* opts.prefetch streams the image in without any touch. */
static int t_prefetch(const char *img)
{
    pms_dev *d = open_img(img, 0, NULL);
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.prefetch = 1;
    void *a;
    size_t len;
    API(pms_map(d, &mo, &a, &len));
    struct pms_stats st = stats(d);
    for (int i = 0; i < 3000 && st.resident_pages < len / PG; i++) {
        usleep(10000);
        st = stats(d);
    }
    CHECK(st.resident_pages == len / PG, "prefetch left %" PRIu64 " of %zu pages",
          len / PG - st.resident_pages, len / PG);
    CHECK(st.faults == 0, "faults during prefetch without touching");
    uint8_t *p = a;
    CHECK(p[1 << 20] == 0x5a && p[0] == 0, "prefetched data");
    CHECK(stats(d).faults == 0, "touching prefetched pages faulted");
    API(pms_unmap(d));
    API(pms_close(d));
    printf("prefetch ok: %zu MiB resident without a fault\n", len >> 20);
    return 0;
}

static int t_ro(const char *img)
{
    pms_dev *d = open_img(img, 1, NULL);
    size_t len;
    uint8_t *p = map(d, "auto", 0, &len);
    CHECK(p[1 << 20] == 0x5a, "read-only load");
    struct sigaction sa = { .sa_handler = on_sig };
    sigaction(SIGSEGV, &sa, NULL);
    g_sig = 0;
    if (sigsetjmp(g_jb, 1) == 0) {
        p[1 << 20] = 1;
        FAIL("store to a read-only mapping succeeded");
    }
    CHECK(g_sig == SIGSEGV, "signal %d", g_sig);
    uint8_t b = 1;
    CHECK(pms_pwrite(d, &b, 1, 0) == -EROFS, "pwrite on read-only");
    CHECK(pms_snapshot_create(d, "x") < 0, "snapshot on read-only");
    API(pms_unmap(d));
    API(pms_close(d));
    printf("read-only ok\n");
    return 0;
}

/* ---- writeback failure (a full disk, here RLIMIT_FSIZE): nothing lost ------- */

/* Stores 8 MiB, then lets the image file grow no further: persist fails,
 * the background writeback fails too, and unmap fails and stays mapped.
 * The pages must stay dirty: once the file may grow again, persist and
 * unmap succeed and the script checks every byte with qemu-io. */
/* Let img's file grow by at most `extra` bytes (RLIMIT_FSIZE; *old gets
 * the limit to restore). */
static void limit_growth(const char *img, uint64_t extra, struct rlimit *old)
{
    struct stat sb;
    CHECK(stat(img, &sb) == 0, "stat");
    getrlimit(RLIMIT_FSIZE, old);
    struct rlimit lim = *old;
    lim.rlim_cur = (rlim_t)(sb.st_size + extra);
    CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0, "setrlimit");
}

static int t_wberr(const char *img, const char *mode)
{
    signal(SIGXFSZ, SIG_IGN);          /* the write fails with EFBIG instead */
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint8_t *p = map(d, mode, 0, &len);
    CHECK(len >= (9u << 20), "image too small");
    struct rlimit old;
    limit_growth(img, 0, &old);          /* no cluster can be allocated */
    for (size_t i = 0; i < (8u << 20); i += PG)
        memset(p + (1u << 20) + i, (int)(0x40 + (i >> 20)), PG);
    int r = pms_persist(d, p + (1u << 20), 8u << 20);
    CHECK(r < 0, "persist succeeded although the file cannot grow");
    printf("persist refused: %s\n", pms_errmsg());
    usleep(300000);                    /* background rounds fail as well */
    r = pms_persist(d, p + (1u << 20), 8u << 20);
    CHECK(r < 0, "second persist succeeded although the file cannot grow");
    /* unmap cannot persist either: it must fail and leave the mapping */
    r = pms_unmap(d);
    CHECK(r < 0, "unmap succeeded although the file cannot grow");
    CHECK(p[1u << 20] == 0x40 && p[(9u << 20) - 1] == 0x47, "mapping gone after a failed unmap");
    CHECK(setrlimit(RLIMIT_FSIZE, &old) == 0, "setrlimit back");
    API(pms_persist(d, p + (1u << 20), 4u << 20));
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

/* The smallest cap pms_map accepts (four 4 KiB chunks), 8 MiB stored page
 * by page and persisted: every store must make progress (an eighth of the
 * cap as the dirty limit was less than a page, and each fault waited its
 * whole dirty wait: minutes for 2,048 pages). */
struct tiny_arg { uint8_t *p; int half; };

static void *tiny_store(void *arg)
{
    struct tiny_arg *t = arg;
    for (size_t off = (size_t)t->half * PG; off < (8u << 20); off += 2 * PG)
        memset(t->p + off, 0x60 + (int)((off >> 20) & 7), PG);
    return NULL;
}

static int t_tinycap(const char *img, const char *mode)
{
    pms_dev *d = open_img(img, 0, NULL);
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = mode_of(mode);
    mo.chunk_size = PG;
    mo.mem_limit = 4 * PG;
    mo.writeback_interval_ms = 1;
    mo.prefetch = 1;
    void *a;
    size_t len;
    API(pms_map(d, &mo, &a, &len));
    uint8_t *p = a;
    CHECK(len >= (8u << 20), "image too small");
    uint64_t t0 = now_ns();
    /* two threads: one stores while the other waits in a fault */
    struct tiny_arg ta[2] = { { p, 0 }, { p, 1 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&th[i], NULL, tiny_store, &ta[i]) == 0, "pthread_create");
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    API(pms_persist(d, p, 8u << 20));
    printf("tinycap %s: 2048 pages stored and persisted under a 16 KiB cap in %.2f s\n", mode,
           (now_ns() - t0) / 1e9);
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

/* Reverts that meet the writeback mid-round (IMG: 64 MiB, every byte 0x11).
 * 1. A round that fails part-way (the file may grow by a few clusters
 *    only) has written its first batches to the image: a revert to the
 *    snapshot must drop those pages as well as the ones left dirty.
 * 2. A revert right after the stores stops a background round at its next
 *    batch (the pages it had not written are dirty again): every stored
 *    page reads the snapshot's bytes afterwards. */
static void stores_spaced(uint8_t *p, size_t len, int v)
{
    for (size_t off = 0; off < len; off += 65536)   /* a page per 64 KiB cluster */
        memset(p + off + ((off >> 16) % 16) * PG, v, PG);
}

static void expect_spaced(const uint8_t *p, size_t len, int v, const char *what)
{
    for (size_t off = 0; off < len; off += 65536) {
        const uint8_t *q = p + off + ((off >> 16) % 16) * PG;
        for (size_t i = 0; i < PG; i++)
            CHECK(q[i] == v, "%s: offset %zu reads 0x%02x, not 0x%02x", what,
                  (size_t)(q - p) + i, q[i], v);
    }
}

static int t_revert_wb(const char *img, const char *mode)
{
    signal(SIGXFSZ, SIG_IGN);          /* the write fails with EFBIG instead */
    pms_dev *d = open_img(img, 0, NULL);
    size_t len;
    uint8_t *p = map(d, mode, 0, &len);
    CHECK(len >= (64u << 20), "image too small");
    API(pms_snapshot_create(d, "A"));
    struct rlimit old;
    limit_growth(img, 12u << 20, &old);   /* ~190 clusters of 1,024 */
    stores_spaced(p, len, 0x22);
    CHECK(pms_persist(d, p, len) < 0, "persist succeeded although the file cannot grow");
    CHECK(stats(d).bytes_written_back > 0, "nothing was written before the failure");
    CHECK(setrlimit(RLIMIT_FSIZE, &old) == 0, "setrlimit back");
    API(pms_snapshot_revert(d, "A"));
    expect_spaced(p, len, 0x11, "after a failed round and a revert");
    printf("revert after a partly failed round: ok\n");
    for (int i = 0; i < 8; i++) {
        stores_spaced(p, len, 0x30 + i);
        usleep((unsigned)(i * 3000));  /* meet the round at different points */
        API(pms_snapshot_revert(d, "A"));
        expect_spaced(p, len, 0x11, "after a revert during a round");
    }
    printf("reverts during background rounds: ok\n");
    API(pms_unmap(d));
    API(pms_close(d));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "probe")) {
        kfeat_need(argv[2]);
        return 0;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: see the comment at the top of mem-test.c\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *cmd = argv[1], *img = argv[2], *mode = argc > 3 ? argv[3] : "auto";
    /* every scenario but verify maps: skip only if the kernel lacks what
     * its mode needs */
    if (strcmp(cmd, "verify") != 0)
        kfeat_need(!strcmp(cmd, "ro") ? "ro" :
                   !strcmp(cmd, "sigbus") || !strcmp(cmd, "prefetch") || !strcmp(cmd, "blocked")
                   ? "auto" : mode);
    if (!strcmp(cmd, "basic")) return t_basic(img, mode);
    if (!strcmp(cmd, "crash")) return t_crash(img, mode);
    if (!strcmp(cmd, "atomic") && argc > 5) return t_atomic(img, mode, atoi(argv[4]), atoi(argv[5]));
    if (!strcmp(cmd, "verify")) return t_verify(img, atoi(argv[3]));
    if (!strcmp(cmd, "revert")) return t_revert(img, mode);
    if (!strcmp(cmd, "revert-zero")) return t_revert_zero(img, mode);
    if (!strcmp(cmd, "cap") && argc > 5)
        return t_cap(img, mode, strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0));
    if (!strcmp(cmd, "capsnap") && argc > 5)
        return t_capsnap(img, mode, strtoull(argv[4], NULL, 0), (unsigned)atoi(argv[5]));
    if (!strcmp(cmd, "powerfail") && argc > 5)
        return t_powerfail(img, mode, argv[4], (unsigned)atoi(argv[5]));
    if (!strcmp(cmd, "sigbus") && argc > 4)
        return t_sigbus(img, strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
    if (!strcmp(cmd, "ro")) return t_ro(img);
    if (!strcmp(cmd, "prefetch")) return t_prefetch(img);
    if (!strcmp(cmd, "blocked")) return t_blocked(img);
    if (!strcmp(cmd, "wberr")) return t_wberr(img, mode);
    if (!strcmp(cmd, "revert-wb")) return t_revert_wb(img, mode);
    if (!strcmp(cmd, "tinycap")) return t_tinycap(img, mode);
    fprintf(stderr, "unknown subcommand %s\n", cmd);
    return 2;
}
