/* Memory-device micro benchmarks, driven by bench/20-mem.sh.
 *
 *   mem-bench warm IMG MB          warm loads+stores: mapping vs anonymous memory
 *   mem-bench seqread IMG          first-touch sequential read through the mapping
 *   mem-bench seqread-mmap FILE    the same loop over mmap(FILE) (e.g. a FUSE export)
 *   mem-bench snap IMG DIRTY_MB    snapshot time with DIRTY_MB dirtied (64 KiB runs)
 *   mem-bench wb IMG MB            writeback throughput: store MB, pms_persist it
 *   mem-bench pwrite IMG MB        the same bytes through pms_pwrite (no mapping)
 * Prints "key value" lines.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"

#define TRY(c) do { if ((c) < 0) { fprintf(stderr, "%s: %s\n", #c, pms_errmsg()); exit(1); } } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint8_t *map_img(const char *img, pms_dev **d, size_t *len, unsigned interval)
{
    TRY(pms_open(img, NULL, d));
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.writeback_interval_ms = interval;
    void *a;
    TRY(pms_map(*d, &mo, &a, len));
    return a;
}

static uint64_t sweep(volatile uint64_t *p, size_t words, int store)
{
    uint64_t s = 0;
    for (size_t i = 0; i < words; i++) {
        s += p[i];
        if (store) p[i] = s;
    }
    return s;
}

static double warm_loop(uint8_t *p, size_t len)
{
    sweep((volatile uint64_t *)p, len / 8, 1);          /* make resident */
    double t0 = now(), t;
    int r = 0;
    do {                                /* >= WARM_SECS (3 s): spans writeback rounds */
        sweep((volatile uint64_t *)p, len / 8, 1);
        r++;
    } while ((t = now() - t0) < (getenv("WARM_SECS") ? atof(getenv("WARM_SECS")) : 3.0));
    return (double)r * len / t / 1e9;
}

static int warm(const char *img, size_t mb)
{
    pms_dev *d;
    size_t len;
    uint8_t *p = map_img(img, &d, &len, getenv("WB_MS") ? atoi(getenv("WB_MS")) : 0);
    size_t n = mb << 20 < len ? mb << 20 : len;
    double gm = warm_loop(p, n);
    uint8_t *a = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    double ga = warm_loop(a, n);
    /* the mapping uses 4 KiB pages (uffd); the same without THP for anon */
    uint8_t *b = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(b, n, MADV_NOHUGEPAGE);
    double gb = warm_loop(b, n);
    struct pms_stats st = { .size = sizeof st };
    TRY(pms_stats(d, &st));
    printf("warm_mapping_GBps %.3f\nwarm_anon_GBps %.3f\nwarm_anon4k_GBps %.3f\n"
           "warm_written_back_MiB %llu\n", gm, ga, gb,
           (unsigned long long)(st.bytes_written_back >> 20));
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

static double seq(const uint8_t *p, size_t len)
{
    double t0 = now();
    volatile uint64_t s = sweep((volatile uint64_t *)p, len / 8, 0);
    (void)s;
    return len / (now() - t0) / 1e9;
}

static int seqread(const char *img)
{
    pms_dev *d;
    size_t len;
    TRY(pms_open(img, NULL, &d));
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.prefetch = getenv("PREFETCH") != NULL;
    void *a;
    TRY(pms_map(d, &mo, &a, &len));
    uint8_t *p = a;
    printf("seqread_mapping_GBps %.3f\n", seq(p, len));
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

static int seqread_mmap(const char *file)
{
    int fd = open(file, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) { perror(file); return 1; }
    uint8_t *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    printf("seqread_mmap_GBps %.3f\n", seq(p, (size_t)st.st_size));
    return 0;
}

static int snap(const char *img, size_t dirty_mb)
{
    pms_dev *d;
    size_t len;
    uint8_t *p = map_img(img, &d, &len, 0);
    /* the same offsets whatever the region size: 64 KiB runs spread over
     * the first GiB, so image metadata work is identical */
    size_t runs = dirty_mb * 16, stride = (len < (1ul << 30) ? len : (1ul << 30)) / runs;
    for (int s = 0; s < 2; s++) {        /* s0 allocates, s1 is the measured one */
        for (size_t i = 0; i < runs; i++)
            memset(p + i * (stride & ~(size_t)65535), s + 1, 65536);
        char name[8];
        snprintf(name, sizeof name, "b%d", s);
        TRY(pms_snapshot_create(d, name));
    }
    struct pms_stats st = { .size = sizeof st };
    TRY(pms_stats(d, &st));
    printf("snap_ms %.2f\nsnap_pause_ms %.3f\nsnap_bytes %" PRIu64 "\n", st.last_snapshot_ns / 1e6,
           st.last_snapshot_pause_ns / 1e6, st.last_snapshot_bytes);
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

static int wb(const char *img, size_t mb)
{
    pms_dev *d;
    size_t len;
    uint8_t *p = map_img(img, &d, &len, 100000);     /* no background rounds */
    size_t n = mb << 20;
    memset(p, 0x5a, n);
    double t0 = now();
    TRY(pms_persist(d, p, n));
    double t = now() - t0;
    printf("writeback_MBps %.1f\n", n / t / 1e6);
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return 0;
}

/* The block layer alone (no mapping): separates engine cost from ours. */
static int bpwrite(const char *img, size_t mb)
{
    pms_dev *d;
    TRY(pms_open(img, NULL, &d));
    size_t n = mb << 20;
    uint8_t *buf = malloc(n);
    memset(buf, 0x5a, n);
    double t0 = now();
    TRY(pms_pwrite(d, buf, n, 0));
    TRY(pms_flush(d));
    printf("pwrite_MBps %.1f\n", n / (now() - t0) / 1e6);
    free(buf);
    TRY(pms_close(d));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "pwrite")) return bpwrite(argv[2], strtoul(argv[3], 0, 0));
    if (argc >= 4 && !strcmp(argv[1], "warm")) return warm(argv[2], strtoul(argv[3], 0, 0));
    if (argc >= 3 && !strcmp(argv[1], "seqread")) return seqread(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "seqread-mmap")) return seqread_mmap(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "snap")) return snap(argv[2], strtoul(argv[3], 0, 0));
    if (argc >= 4 && !strcmp(argv[1], "wb")) return wb(argv[2], strtoul(argv[3], 0, 0));
    fprintf(stderr, "usage: see mem-bench.c\n");
    return 2;
}
