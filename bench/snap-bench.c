/* Snapshot benchmarks on allocated images, driven by bench/40-snap.sh and
 * bench/41-scale.sh (issue 8).  Prints "key value" lines; a kind that the
 * library refuses prints "na <message>" and exits 0 so the table can say so.
 *
 *   snap-bench snap KIND IMG DIRTY_MB REPS [revert]
 *       fill every page of IMG with pms_pwrite, flush; map; first snapshot
 *       (the state a user is in); then REPS times: DIRTY_MB of stores to
 *       distinct random 4 KiB pages, snapshot.  With "revert": then the same
 *       amount of stores again, pms_snapshot_revert to the last snapshot,
 *       and the stored pages plus a random sample are read back and
 *       compared; IMG.gen receives the expected generation of every page
 *       (for verify-raw).
 *   snap-bench chain KIND IMG N DIRTY_KB
 *       fill IMG and a second image IMG.onelayer alike; map IMG, then N
 *       snapshots with DIRTY_KB of random page stores before each; then a
 *       first-touch read of the whole region from a fresh open and map of
 *       each image in turn (best of 3 each), and every page of the chain
 *       compared.
 *   snap-bench fullcopy FILE MB
 *       the full-copy reference: MB written with pwrite to a new FILE, then
 *       fdatasync.
 *   snap-bench cap IMG CAP_MB STORE_MB SECS
 *   snap-bench cap-mmap FILE STORE_MB SECS
 *       STORE_MB of whole-page stores to random pages (stopping after SECS),
 *       then a persist (pms_persist / msync+fdatasync): MB/s and peak RSS.
 *       SNAPBENCH_SEQ=1 stores the pages in order instead.
 *   snap-bench scale KIND IMG CAP_MB SECS
 *   snap-bench scale-mmap FILE SECS
 *       two threads storing whole pages at random for SECS; with an image, a
 *       snapshot every second and the oldest of three deleted.
 *   snap-bench probe KIND IMG
 *       whether KIND works at all (a first snapshot of a small mapped IMG):
 *       prints "ok" or "na <message>", so unavailable rows skip their setup.
 *   snap-bench fsfloor DIR PAGES
 *       what the file system charges for the layout random page stores get
 *       in a fresh extended-L2 overlay (one 4 KiB page per 64 KiB cluster,
 *       so one extent per page) against the same pages written contiguously:
 *       per page, the pwrite, the write-out (fdatasync) and the freeing of
 *       the file (close + unlink), each in wall and CPU microseconds.
 *   snap-bench verify-raw RAW GENFILE
 *       every page of a raw file (e.g. qemu-img convert of the image) holds
 *       the pattern of the generation recorded in GENFILE.
 *
 * KIND is "internal" or "external" (PMS_SNAP_EXTERNAL); "KIND-unmapped" does
 * the stores, snapshots and reverts of snap and chain without a mapping
 * (pms_pwrite/pms_pread; the chain is still read back through a mapping).
 * Page p of generation g holds the 64-bit word (g << 40 | p) in each of its
 * 512 words, so any page read back can be checked.  Random choices come from a
 * fixed seed: the image and the mmap reference see the same offsets.
 *
 * Threads: the store threads of cap/scale touch the mapping only; the main
 * thread makes every pms_* call; the RSS sampler reads /proc/self/statm.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"

#define PG 4096ull
#define FILL_CHUNK (4ull << 20)      /* bytes per pms_pwrite while filling */
#define REVERT_SAMPLE 20000          /* random pages read back after a revert */
#define RSS_SAMPLE_US 10000          /* RSS sampler period: 10 ms */
#define SNAP_PERIOD_S 1.0            /* scale: one snapshot per second */
#define SCALE_KEEP 3                 /* scale: snapshots kept (oldest deleted) */
/* Background writeback period (SNAPBENCH_WB_MS): unset or 0 is the
 * library's default, what a user has; 40-snap.sh's "no writeback" rows set
 * 100000 (no round during a measurement: the call carries every page). */

#define TRY(c) do { if ((c) < 0) { fprintf(stderr, "%s: %s\n", #c, pms_errmsg()); exit(1); } } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint64_t rnd(uint64_t *s)
{
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

static inline uint64_t word(uint64_t page, unsigned gen) { return (uint64_t)gen << 40 | page; }

static void put(uint8_t *pg, uint64_t w)
{
    uint64_t *q = (uint64_t *)pg;
    for (int i = 0; i < (int)(PG / 8); i++) q[i] = w;
}

static int good(const uint8_t *pg, uint64_t w)
{
    const volatile uint64_t *q = (const volatile uint64_t *)pg;
    for (int i = 0; i < (int)(PG / 8); i++)
        if (q[i] != w) return 0;
    return 1;
}

/* KIND-unmapped: the same work without a mapping (pms_pwrite/pms_pread,
 * as the CLI and block-level callers do). */
static int unmapped;

/* Page p := word w, through the mapping or (unmapped) with pms_pwrite. */
static void store(pms_dev *d, uint8_t *map, uint64_t p, uint64_t w)
{
    static uint8_t buf[PG] __attribute__((aligned(4096)));
    if (map) {
        put(map + p * PG, w);
        return;
    }
    put(buf, w);
    TRY(pms_pwrite(d, buf, PG, p * PG));
}

static int check(pms_dev *d, const uint8_t *map, uint64_t p, uint64_t w)
{
    static uint8_t buf[PG] __attribute__((aligned(4096)));
    if (map) return good(map + p * PG, w);
    TRY(pms_pread(d, buf, PG, p * PG));
    return good(buf, w);
}

static unsigned kind_flags(const char *kind)
{
    const char *u = strstr(kind, "-unmapped");
    unmapped = u && !u[9];
    size_t n = u ? (size_t)(u - kind) : strlen(kind);
    if (!strncmp(kind, "internal", n) && n == 8) return 0;
    if (!strncmp(kind, "external", n) && n == 8) return PMS_SNAP_EXTERNAL;
    fprintf(stderr, "unknown snapshot kind '%s' (internal or external, optionally -unmapped)\n", kind);
    exit(2);
}

/* NULL if snapshot name is of the kind flags asked for, else why not. */
static const char *wrong_kind(pms_dev *d, const char *name, unsigned flags)
{
    struct pms_snapshot_info *l;
    size_t n;
    int want = flags & PMS_SNAP_EXTERNAL ? PMS_SNAP_KIND_EXTERNAL : PMS_SNAP_KIND_INTERNAL;
    const char *why = "pms_snapshot_list does not show the new snapshot";
    if (pms_snapshot_list(d, &l, &n) < 0) return pms_errmsg();
    for (size_t i = 0; i < n; i++)
        if (l[i].name && !strcmp(l[i].name, name))
            why = l[i].kind == want ? NULL
                  : want == PMS_SNAP_KIND_EXTERNAL
                      ? "pms_snapshot_create_ex(PMS_SNAP_EXTERNAL) on a mapped image made an internal snapshot"
                      : "an internal snapshot was asked for, the list shows another kind";
    pms_snapshot_list_free(l, n);
    return why;
}

/* The kind is not available: say why and stop (the caller prints n/a). */
static void snap_or_na(pms_dev *d, const char *name, unsigned flags)
{
    const char *why;
    if (pms_snapshot_create_ex(d, name, flags) < 0) {
        printf("na %s\n", pms_errmsg());
        exit(0);
    }
    if ((why = wrong_kind(d, name, flags))) {
        printf("na %s\n", why);
        exit(0);
    }
}

/* /proc/self/io: bytes this process moved through read/write syscalls
 * (page-cache hits included), i.e. what our engine asked for. */
static void proc_io(uint64_t *rchar, uint64_t *wchar)
{
    FILE *f = fopen("/proc/self/io", "r");
    char k[32];
    unsigned long long v;
    *rchar = *wchar = 0;
    if (!f) return;
    while (fscanf(f, "%31[^:]: %llu\n", k, &v) == 2) {
        if (!strcmp(k, "rchar")) *rchar = v;
        if (!strcmp(k, "wchar")) *wchar = v;
    }
    fclose(f);
}

/* Apparent size and disk usage (du) of every regular file in dir. */
static void dir_usage(const char *dir, uint64_t *apparent, uint64_t *disk)
{
    DIR *dp = opendir(dir);
    struct dirent *e;
    *apparent = *disk = 0;
    if (!dp) return;
    while ((e = readdir(dp))) {
        struct stat st;
        if (fstatat(dirfd(dp), e->d_name, &st, 0) == 0 && S_ISREG(st.st_mode)) {
            *apparent += st.st_size;
            *disk += (uint64_t)st.st_blocks * 512;
        }
    }
    closedir(dp);
}

static char *dir_of(const char *path)
{
    char *d = strdup(path), *s = strrchr(d, '/');
    if (!s) { free(d); return strdup("."); }
    *s = 0;
    return d;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n)
{
    double *c = malloc(n * sizeof *c);
    memcpy(c, v, n * sizeof *c);
    qsort(c, n, sizeof *c, cmp_d);
    double m = n % 2 ? c[n / 2] : (c[n / 2 - 1] + c[n / 2]) / 2;
    free(c);
    return m;
}

static double maxof(const double *v, int n)
{
    double m = v[0];
    for (int i = 1; i < n; i++)
        m = v[i] > m ? v[i] : m;
    return m;
}

/* ---- peak RSS, sampled (VmHWM cannot be reset between phases) ---------- */

static atomic_int rss_run;
static atomic_ullong rss_max;
static pthread_t rss_thr;

static uint64_t rss_now(void)
{
    unsigned long long sz, res = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%llu %llu", &sz, &res) != 2) res = 0;
        fclose(f);
    }
    return res * (uint64_t)sysconf(_SC_PAGESIZE);
}

static void *rss_loop(void *arg)
{
    (void)arg;
    while (atomic_load(&rss_run)) {
        uint64_t r = rss_now();
        if (r > atomic_load(&rss_max)) atomic_store(&rss_max, r);
        usleep(RSS_SAMPLE_US);
    }
    return NULL;
}

static void rss_start(void)
{
    atomic_store(&rss_max, rss_now());
    atomic_store(&rss_run, 1);
    pthread_create(&rss_thr, NULL, rss_loop, NULL);
}

static uint64_t rss_stop(void)
{
    atomic_store(&rss_run, 0);
    pthread_join(rss_thr, NULL);
    return atomic_load(&rss_max);
}

/* ---- image setup --------------------------------------------------------- */

/* Every page stored once (generation 1) and flushed, before mapping. */
static void fill(pms_dev *d, uint64_t len)
{
    uint8_t *buf = aligned_alloc(PG, FILL_CHUNK);
    double t0 = now();
    for (uint64_t off = 0; off < len; off += FILL_CHUNK) {
        uint64_t n = len - off < FILL_CHUNK ? len - off : FILL_CHUNK;
        for (uint64_t o = 0; o < n; o += PG) put(buf + o, word((off + o) / PG, 1));
        TRY(pms_pwrite(d, buf, n, off));
    }
    TRY(pms_flush(d));
    printf("fill_s %.2f\n", now() - t0);
    free(buf);
}

static uint8_t *map_dev(pms_dev *d, size_t *len, uint64_t cap)
{
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.writeback_interval_ms = getenv("SNAPBENCH_WB_MS") ? atoi(getenv("SNAPBENCH_WB_MS")) : 0;
    mo.mem_limit = cap;
    if (getenv("SNAPBENCH_DIRTY")) mo.dirty_tracking = atoi(getenv("SNAPBENCH_DIRTY"));
    void *a;
    TRY(pms_map(d, &mo, &a, len));
    return a;
}

/* n distinct random pages out of npages (bitmap cleared again after). */
static void pick(uint64_t *out, size_t n, uint64_t npages, uint8_t *bm)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t p;
        do p = rnd(&rng_state) % npages; while (bm[p / 8] & (1 << (p % 8)));
        bm[p / 8] |= 1 << (p % 8);
        out[i] = p;
    }
    for (size_t i = 0; i < n; i++) bm[out[i] / 8] &= ~(1 << (out[i] % 8));
}

/* ---- snap: snapshot call cost, and revert ------------------------------- */

static int snap(const char *kind, const char *img, size_t dirty_mb, int reps, int do_revert)
{
    unsigned flags = kind_flags(kind);
    char *dir = dir_of(img);
    pms_dev *d;
    TRY(pms_open(img, NULL, &d));
    uint64_t len = (uint64_t)pms_size(d), npages = len / PG;
    fill(d, len);
    size_t maplen;
    uint8_t *p = unmapped ? NULL : map_dev(d, &maplen, 0);
    uint8_t *gen = malloc(npages), *bm = calloc(npages / 8 + 1, 1);
    memset(gen, 1, npages);
    snap_or_na(d, "s0", flags);
    size_t n = dirty_mb * (1 << 20) / PG;
    uint64_t *pages = malloc(n * sizeof *pages);
    double *call = calloc(reps, sizeof(double)), *lib = calloc(reps, sizeof(double)),
           *pause = calloc(reps, sizeof(double)), *sbytes = calloc(reps, sizeof(double)),
           *fgrow = calloc(reps, sizeof(double)), *dgrow = calloc(reps, sizeof(double)),
           *rb = calloc(reps, sizeof(double)), *wb = calloc(reps, sizeof(double)),
           *stms = calloc(reps, sizeof(double)), *bgb = calloc(reps, sizeof(double));
    for (int r = 0; r < reps; r++) {
        uint64_t a0, d0, a1, d1, rc0, wc0, rc1, wc1;
        pick(pages, n, npages, bm);
        dir_usage(dir, &a0, &d0);
        struct pms_stats s0 = { .size = sizeof s0 };
        TRY(pms_stats(d, &s0));
        double t0 = now();
        for (size_t i = 0; i < n; i++) {
            gen[pages[i]] = (uint8_t)(r + 2);
            store(d, p, pages[i], word(pages[i], r + 2));
        }
        double t1 = now();
        char name[16];
        snprintf(name, sizeof name, "s%d", r + 1);
        struct pms_stats s1 = { .size = sizeof s1 };
        TRY(pms_stats(d, &s1));
        proc_io(&rc0, &wc0);
        double t2 = now();
        TRY(pms_snapshot_create_ex(d, name, flags));
        double t3 = now();
        proc_io(&rc1, &wc1);
        struct pms_stats st = { .size = sizeof st };
        TRY(pms_stats(d, &st));
        dir_usage(dir, &a1, &d1);
        call[r] = (t3 - t2) * 1e3;
        lib[r] = unmapped ? -1 : st.last_snapshot_ns / 1e6;     /* -1: no memory device */
        pause[r] = unmapped ? -1 : st.last_snapshot_pause_ns / 1e6;
        sbytes[r] = unmapped ? -1 : (double)st.last_snapshot_bytes;
        fgrow[r] = (double)a1 - a0;
        dgrow[r] = (double)d1 - d0;
        rb[r] = rc1 - rc0;
        wb[r] = wc1 - wc0;
        stms[r] = (t1 - t0) * 1e3;
        /* written back by the background thread while the stores ran */
        bgb[r] = unmapped ? -1 : (double)(s1.bytes_written_back - s0.bytes_written_back);
        printf("rep %d stores_ms %.1f call_ms %.1f snap_ms %.1f pause_ms %.3f snap_bytes %.0f "
               "file_growth %.0f du_growth %.0f read_bytes %.0f write_bytes %.0f bg_bytes %.0f\n",
               r + 1, stms[r], call[r], lib[r], pause[r], sbytes[r], fgrow[r],
               dgrow[r], rb[r], wb[r], bgb[r]);
    }
    printf("dirty_bytes %llu\ncall_ms %.1f\nsnap_ms %.1f\npause_ms %.3f\nsnap_bytes %.0f\n"
           "file_growth %.0f\ndu_growth %.0f\nread_bytes %.0f\nwrite_bytes %.0f\n"
           "stores_ms %.1f\nbg_bytes %.0f\ncall_ms_max %.1f\n",
           (unsigned long long)(n * PG), median(call, reps), median(lib, reps), median(pause, reps),
           median(sbytes, reps), median(fgrow, reps), median(dgrow, reps), median(rb, reps),
           median(wb, reps), median(stms, reps), median(bgb, reps), maxof(call, reps));
    if (do_revert) {
        /* the same amount changed since the last snapshot, then revert */
        uint8_t *want = malloc(npages);
        memcpy(want, gen, npages);
        pick(pages, n, npages, bm);
        for (size_t i = 0; i < n; i++) store(d, p, pages[i], word(pages[i], reps + 2));
        char name[16];
        snprintf(name, sizeof name, "s%d", reps);
        double t0 = now();
        TRY(pms_snapshot_revert(d, name));
        double t1 = now();
        uint64_t bad = 0, checked = 0;
        for (size_t i = 0; i < n; i++, checked++)
            bad += !check(d, p, pages[i], word(pages[i], want[pages[i]]));
        for (int i = 0; i < REVERT_SAMPLE; i++, checked++) {
            uint64_t q = rnd(&rng_state) % npages;
            bad += !check(d, p, q, word(q, want[q]));
        }
        double t2 = now();
        printf("revert_ms %.1f\nrefault_check_ms %.1f\nrevert_checked %" PRIu64
               "\nrevert_bad %" PRIu64 "\n", (t1 - t0) * 1e3, (t2 - t1) * 1e3, checked, bad);
        char gf[4096];
        snprintf(gf, sizeof gf, "%s.gen", img);
        FILE *f = fopen(gf, "w");
        if (!f || fwrite(want, 1, npages, f) != npages || fclose(f)) { perror(gf); return 1; }
        free(want);
    }
    if (p) TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

/* ---- chain: first-touch read through N layers ---------------------------- */

static double touch_all(const uint8_t *p, uint64_t len)
{
    double t0 = now();
    volatile uint64_t s = 0;
    for (uint64_t o = 0; o < len; o += 512) s += *(const volatile uint64_t *)(p + o);
    (void)s;
    return len / (now() - t0) / 1e9;
}

/* First-touch read of a freshly opened and mapped image (nothing resident). */
#define READ_TRIES 3                 /* chain: best of 3, alternating images */
static double read_fresh(const char *img, uint64_t len)
{
    pms_dev *d;
    size_t l;
    TRY(pms_open(img, NULL, &d));
    uint8_t *p = map_dev(d, &l, 0);
    double g = touch_all(p, len);
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return g;
}

static int chain(const char *kind, const char *img, int nsnap, size_t dirty_kb)
{
    unsigned flags = kind_flags(kind);
    pms_dev *d;
    TRY(pms_open(img, NULL, &d));
    uint64_t len = (uint64_t)pms_size(d), npages = len / PG;
    fill(d, len);
    /* the one-layer reference: a second image with the same content */
    char one[4096];
    snprintf(one, sizeof one, "%s.onelayer", img);
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    TRY(pms_create(one, len, &co));
    pms_dev *o;
    TRY(pms_open(one, NULL, &o));
    fill(o, len);
    TRY(pms_close(o));
    size_t maplen;
    uint8_t *p = unmapped ? NULL : map_dev(d, &maplen, 0);
    uint8_t *gen = malloc(npages), *bm = calloc(npages / 8 + 1, 1);
    memset(gen, 1, npages);
    size_t n = dirty_kb * 1024 / PG;
    uint64_t *pages = malloc((n ? n : 1) * sizeof *pages);
    double t0 = now(), worst = 0;
    for (int s = 0; s < nsnap; s++) {
        pick(pages, n, npages, bm);
        for (size_t i = 0; i < n; i++) {
            gen[pages[i]] = (uint8_t)(s % 250 + 2);
            store(d, p, pages[i], word(pages[i], gen[pages[i]]));
        }
        char name[16];
        snprintf(name, sizeof name, "c%d", s);
        double ts = now();
        if (s == 0) snap_or_na(d, name, flags);
        else TRY(pms_snapshot_create_ex(d, name, flags));
        if (now() - ts > worst) worst = now() - ts;
    }
    printf("chain_build_s %.2f\nchain_snap_max_ms %.1f\n", now() - t0, worst * 1e3);
    if (p) TRY(pms_unmap(d));
    TRY(pms_close(d));
    /* alternate the two, READ_TRIES each, so that load changes hit both */
    double g1 = 0, gc = 0;
    for (int i = 0; i < READ_TRIES; i++) {
        double a = read_fresh(one, len), b = read_fresh(img, len);
        g1 = a > g1 ? a : g1;
        gc = b > gc ? b : gc;
    }
    printf("onelayer_GBps %.3f\nchain_GBps %.3f\n", g1, gc);
    TRY(pms_open(img, NULL, &d));
    p = map_dev(d, &maplen, 0);
    uint64_t bad = 0;
    for (uint64_t q = 0; q < npages; q++) bad += !good(p + q * PG, word(q, gen[q]));
    printf("chain_bad_pages %" PRIu64 "\n", bad);
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

/* ---- full copy reference --------------------------------------------------- */

static int fullcopy(const char *file, size_t mb)
{
    uint8_t *buf = aligned_alloc(PG, FILL_CHUNK);
    for (uint64_t o = 0; o < FILL_CHUNK; o += PG) put(buf + o, word(o / PG, 1));
    int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(file); return 1; }
    double t0 = now();
    for (uint64_t off = 0; off < (uint64_t)mb << 20; off += FILL_CHUNK) {
        buf[0] ^= 1;                    /* not the same buffer every time */
        if (pwrite(fd, buf, FILL_CHUNK, off) != (ssize_t)FILL_CHUNK) { perror("pwrite"); return 1; }
    }
    if (fdatasync(fd) < 0) { perror("fdatasync"); return 1; }
    printf("fullcopy_ms %.1f\n", (now() - t0) * 1e3);
    close(fd);
    return 0;
}

/* Make every store durable: pms_persist, or msync + fdatasync for the mmap
 * reference.  A failure is reported as persist_error (a file system may
 * refuse to write back a sparse file's dirty pages) and the run goes on. */
static int persist_all(pms_dev *d, uint8_t *p, uint64_t len, int fd)
{
    if (d ? pms_persist(d, p, len) < 0 : msync(p, len, MS_SYNC) < 0 || fdatasync(fd) < 0) {
        printf("persist_error %s\n", d ? pms_errmsg() : strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- image larger than memory ---------------------------------------------- */

static int cap_run(const char *path, int is_img, uint64_t cap_mb, uint64_t store_mb, double secs)
{
    pms_dev *d = NULL;
    uint8_t *p;
    uint64_t len;
    int fd = -1;
    rss_start();
    if (is_img) {
        size_t l;
        TRY(pms_open(path, NULL, &d));
        p = map_dev(d, &l, cap_mb << 20);
        len = l;
    } else {
        struct stat st;
        fd = open(path, O_RDWR);
        if (fd < 0 || fstat(fd, &st) < 0) { perror(path); return 1; }
        len = st.st_size;
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 1; }
    }
    uint64_t npages = len / PG, want = (store_mb << 20) / PG, done = 0;
    double t0 = now(), stop = t0 + secs;
    int seq = getenv("SNAPBENCH_SEQ") != NULL;     /* pages in order instead */
    while (done < want) {
        uint64_t q = seq ? done % npages : rnd(&rng_state) % npages;
        put(p + q * PG, word(q, 3));
        if (++done % 256 == 0 && now() > stop) break;
    }
    double t1 = now();
    printf("stored_MiB %.1f\nstore_s %.2f\n", done * PG / 1048576.0, t1 - t0);
    fflush(stdout);
    if (persist_all(d, p, len, fd) == 0) {
        double t2 = now();
        printf("persist_s %.2f\nMBps %.1f\n", t2 - t1, done * PG / (t2 - t0) / 1e6);
    }
    printf("rss_max_MiB %.1f\n", rss_stop() / 1048576.0);
    if (is_img) {
        TRY(pms_unmap(d));
        TRY(pms_close(d));
    } else {
        munmap(p, len);
        close(fd);
    }
    return 0;
}

/* ---- at scale: two store threads, a snapshot every second ----------------- */

struct worker {
    pthread_t t;
    uint8_t *p;
    uint64_t npages, seed;
    atomic_ullong stores;
};
static atomic_int workers_run;

static void *store_loop(void *arg)
{
    struct worker *w = arg;
    while (atomic_load_explicit(&workers_run, memory_order_relaxed)) {
        uint64_t q = rnd(&w->seed) % w->npages;
        put(w->p + q * PG, word(q, 5));
        atomic_fetch_add_explicit(&w->stores, 1, memory_order_relaxed);
    }
    return NULL;
}

static int scale(const char *kind, const char *path, uint64_t cap_mb, double secs)
{
    int is_img = kind != NULL;
    unsigned flags = is_img ? kind_flags(kind) : 0;
    pms_dev *d = NULL;
    uint8_t *p;
    uint64_t len;
    int fd = -1;
    rss_start();
    if (is_img) {
        size_t l;
        TRY(pms_open(path, NULL, &d));
        p = map_dev(d, &l, cap_mb << 20);   /* a live run: the library's writeback period */
        len = l;
    } else {
        struct stat st;
        fd = open(path, O_RDWR);
        if (fd < 0 || fstat(fd, &st) < 0) { perror(path); return 1; }
        len = st.st_size;
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 1; }
    }
    struct worker w[2];
    atomic_store(&workers_run, 1);
    for (int i = 0; i < 2; i++) {
        w[i].p = p;
        w[i].npages = len / PG;
        w[i].seed = 0x9E3779B97F4A7C15ull * (i + 1);
        atomic_store(&w[i].stores, 0);
        pthread_create(&w[i].t, NULL, store_loop, &w[i]);
    }
    double t0 = now(), csum = 0, cmax = 0, dsum = 0, dmax = 0;
    int made = 0, deleted = 0, oldest = 0, failed = 0;
    char firsterr[200] = "";
    /* SNAPBENCH_SCALE_PERIOD: seconds between snapshots (0: none, to see
     * what the stores cost without them) */
    const char *pe = getenv("SNAPBENCH_SCALE_PERIOD");
    double period = pe && *pe ? atof(pe) : SNAP_PERIOD_S;
    /* SNAPBENCH_SCALE_KEEP: snapshots kept before the oldest is deleted
     * (a long chain shows what each layer costs) */
    const char *ke = getenv("SNAPBENCH_SCALE_KEEP");
    int keep = ke && *ke ? atoi(ke) : SCALE_KEEP;
    while (now() - t0 < secs) {
        double next = t0 + (made + failed + 1) * (period > 0 ? period : secs);
        if (next > t0 + secs) next = t0 + secs;
        if (now() < next) usleep((useconds_t)((next - now()) * 1e6));
        if (!is_img) { made++; continue; }
        if (period <= 0) continue;
        char name[24];
        snprintf(name, sizeof name, "t%d", made + failed);
        double a = now();
        if (pms_snapshot_create_ex(d, name, flags) < 0) {
            if (!failed++) snprintf(firsterr, sizeof firsterr, "%s", pms_errmsg());
            if (made == 0 && failed == 1) {      /* the kind is not available */
                atomic_store(&workers_run, 0);
                for (int i = 0; i < 2; i++) pthread_join(w[i].t, NULL);
                printf("na %s\n", firsterr);
                exit(0);
            }
            continue;
        }
        double c = now() - a;
        const char *why;
        if (made == 0 && (why = wrong_kind(d, name, flags))) {
            atomic_store(&workers_run, 0);
            for (int i = 0; i < 2; i++) pthread_join(w[i].t, NULL);
            printf("na %s\n", why);
            exit(0);
        }
        csum += c; if (c > cmax) cmax = c;
        made++;
        if (made - deleted > keep) {
            /* names are t<index>; skip indices that failed */
            for (;;) {
                snprintf(name, sizeof name, "t%d", oldest++);
                a = now();
                if (pms_snapshot_delete(d, name) == 0) break;
                if (oldest > made + failed) { fprintf(stderr, "delete: %s\n", pms_errmsg()); return 1; }
            }
            double dd = now() - a;
            dsum += dd; if (dd > dmax) dmax = dd;
            deleted++;
        }
    }
    double el = now() - t0;
    atomic_store(&workers_run, 0);
    uint64_t stores = 0;
    for (int i = 0; i < 2; i++) {
        pthread_join(w[i].t, NULL);
        stores += atomic_load(&w[i].stores);
    }
    printf("secs %.1f\nstores %" PRIu64 "\nstores_per_s %.0f\nstored_MiB %.1f\n", el, stores,
           stores / el, stores * PG / 1048576.0);
    fflush(stdout);
    double u0 = now();
    if (persist_all(d, p, len, fd) == 0) printf("final_persist_s %.2f\n", now() - u0);
    printf("rss_max_MiB %.1f\n", rss_stop() / 1048576.0);
    if (is_img) {
        printf("snapshots %d\nsnap_failed %d\nsnap_mean_ms %.1f\nsnap_max_ms %.1f\n"
               "deletes %d\ndelete_mean_ms %.1f\ndelete_max_ms %.1f\n", made, failed,
               made ? csum / made * 1e3 : 0, cmax * 1e3, deleted,
               deleted ? dsum / deleted * 1e3 : 0, dmax * 1e3);
        if (failed) printf("snap_first_error %s\n", firsterr);
        TRY(pms_close(d));
    } else {
        munmap(p, len);
        close(fd);
    }
    return 0;
}

/* ---- oracle side: a raw conversion made by qemu-img ---------------------- */

static int verify_raw(const char *raw, const char *genfile)
{
    int fd = open(raw, O_RDONLY), gf = open(genfile, O_RDONLY);
    struct stat st;
    if (fd < 0 || gf < 0 || fstat(fd, &st) < 0) { perror("open"); return 1; }
    uint64_t npages = st.st_size / PG, bad = 0;
    uint8_t *gen = malloc(npages), *buf = aligned_alloc(PG, FILL_CHUNK);
    if (read(gf, gen, npages) != (ssize_t)npages) { fprintf(stderr, "%s: short\n", genfile); return 1; }
    for (uint64_t off = 0; off < (uint64_t)st.st_size; off += FILL_CHUNK) {
        ssize_t n = pread(fd, buf, FILL_CHUNK, off);
        if (n <= 0) { perror("pread"); return 1; }
        for (ssize_t o = 0; o < n; o += PG)
            bad += !good(buf + o, word((off + o) / PG, gen[(off + o) / PG]));
    }
    printf("raw_pages %" PRIu64 "\nraw_bad_pages %" PRIu64 "\n", npages, bad);
    return bad != 0;
}

/* ---- the file system's cost of scattered pages ----------------------------- */

/* CPU seconds of this process (user + system). */
static double cpu_s(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

/* Stride between the pages of the scattered layout: a 64 KiB cluster, as a
 * fresh extended-L2 overlay places random 4 KiB stores. */
#define FLOOR_STRIDE 65536u

static int fsfloor(const char *dir, uint64_t pages)
{
    static const char *const name[2] = { "scattered", "contiguous" };
    uint8_t buf[PG];
    memset(buf, 0x5a, sizeof buf);
    for (int lay = 0; lay < 2; lay++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/fsfloor-%s", dir, name[lay]);
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) { perror(path); return 1; }
        double w0 = now(), c0 = cpu_s();
        for (uint64_t i = 0; i < pages; i++) {
            off_t at = (off_t)(lay ? i * PG : i * FLOOR_STRIDE + (rnd(&rng_state) % (FLOOR_STRIDE / PG)) * PG);
            if (pwrite(fd, buf, PG, at) != PG) { perror("pwrite"); return 1; }
        }
        double w1 = now(), c1 = cpu_s();
        if (fdatasync(fd) < 0) { perror("fdatasync"); return 1; }
        double w2 = now(), c2 = cpu_s();
        close(fd);
        unlink(path);
        double w3 = now(), c3 = cpu_s(), k = 1e6 / (double)pages;
        printf("%s_write_us %.2f %.2f\n%s_writeout_us %.2f %.2f\n%s_free_us %.2f %.2f\n",
               name[lay], (w1 - w0) * k, (c1 - c0) * k, name[lay], (w2 - w1) * k, (c2 - c1) * k,
               name[lay], (w3 - w2) * k, (c3 - c2) * k);
    }
    return 0;
}

static int probe(const char *kind, const char *img)
{
    unsigned flags = kind_flags(kind);
    pms_dev *d;
    TRY(pms_open(img, NULL, &d));
    size_t len;
    uint8_t *p = map_dev(d, &len, 0);
    p[0] = 1;
    snap_or_na(d, "probe", flags);
    printf("ok\n");
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    if (argc >= 6 && !strcmp(c, "snap"))
        return snap(argv[2], argv[3], strtoul(argv[4], 0, 0), atoi(argv[5]),
                    argc > 6 && !strcmp(argv[6], "revert"));
    if (argc >= 6 && !strcmp(c, "chain"))
        return chain(argv[2], argv[3], atoi(argv[4]), strtoul(argv[5], 0, 0));
    if (argc >= 4 && !strcmp(c, "fullcopy")) return fullcopy(argv[2], strtoul(argv[3], 0, 0));
    if (argc >= 6 && !strcmp(c, "cap"))
        return cap_run(argv[2], 1, strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0), atof(argv[5]));
    if (argc >= 5 && !strcmp(c, "cap-mmap"))
        return cap_run(argv[2], 0, 0, strtoull(argv[3], 0, 0), atof(argv[4]));
    if (argc >= 6 && !strcmp(c, "scale"))
        return scale(argv[2], argv[3], strtoull(argv[4], 0, 0), atof(argv[5]));
    if (argc >= 4 && !strcmp(c, "scale-mmap")) return scale(NULL, argv[2], 0, atof(argv[3]));
    if (argc >= 4 && !strcmp(c, "probe")) return probe(argv[2], argv[3]);
    if (argc >= 4 && !strcmp(c, "fsfloor")) return fsfloor(argv[2], strtoull(argv[3], 0, 0));
    if (argc >= 4 && !strcmp(c, "verify-raw")) return verify_raw(argv[2], argv[3]);
    fprintf(stderr, "usage: see the top of bench/snap-bench.c\n");
    return 2;
}
