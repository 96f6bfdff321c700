/* pmemsnap demo: a word-count hash table living in persistent memory.
 *
 *   pms-demo run IMAGE        create IMAGE, map it, let two threads count
 *                             words into the table while snapshots are taken,
 *                             then revert to snap-2 and print its state
 *   pms-demo inspect RAWFILE  print the state stored in a raw dump (made by
 *                             qemu-img from a snapshot) the same way
 *
 * Layout of the mapped image: a header page, one counter page per thread
 * (operations done), and at 1 MiB an open-addressing table of
 * {key, count} buckets.  A thread bumps a key's count and then its own
 * operation counter, so in any instant  ops <= sum(counts) <= ops + 1.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"

#define IMG_SIZE   (1ull << 30)
#define TABLE_OFF  (1ull << 20)
#define NBUCKETS   (1ull << 21)          /* 32 MiB of buckets */
#define NTHREADS   2
#define MAGIC      0x504d454d534e4150ull  /* "PMEMSNAP" */

struct bucket { uint64_t key, count; };
struct header { uint64_t magic, nbuckets; };

static uint8_t *g_base;
static atomic_int g_stop;

static struct bucket *table(uint8_t *b) { return (struct bucket *)(b + TABLE_OFF); }
static uint64_t *ops(uint8_t *b, int t) { return (uint64_t *)(b + 4096 * (uint64_t)(1 + t)); }

static void *worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    uint64_t x = 88172645463325252ull + (uint64_t)t;
    struct bucket *tab = table(g_base);
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        /* a "word": one of 15 stems with a numeric suffix */
        uint64_t w = x % 15, n = (x >> 8) % 50000;
        uint64_t key = ((uint64_t)(t + 1) << 56) | (w << 32) | n;
        uint64_t h = (key * 0x9e3779b97f4a7c15ull) >> 43;
        for (uint64_t i = 0;; i++) {
            struct bucket *b = &tab[(h + i) & (NBUCKETS - 1)];
            uint64_t k = __atomic_load_n(&b->key, __ATOMIC_ACQUIRE);
            if (k == 0 && __atomic_compare_exchange_n(&b->key, &k, key, 0, __ATOMIC_ACQ_REL,
                                                      __ATOMIC_ACQUIRE))
                k = key;
            if (k == key) {
                __atomic_add_fetch(&b->count, 1, __ATOMIC_RELAXED);
                break;
            }
        }
        __atomic_add_fetch(ops(g_base, t), 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Prints the state of a table and returns 0 if it is consistent. */
static int summary(const char *who, uint8_t *b)
{
    const struct header *hd = (const struct header *)b;
    if (hd->magic != MAGIC) {
        printf("%s: no table (magic %#" PRIx64 ")\n", who, hd->magic);
        return 1;
    }
    uint64_t keys = 0, sum[NTHREADS] = { 0 }, fp = 1469598103934665603ull;
    const struct bucket *tab = table(b);
    for (uint64_t i = 0; i < NBUCKETS; i++) {
        if (!tab[i].key) continue;
        keys++;
        int t = (int)(tab[i].key >> 56) - 1;
        if (t >= 0 && t < NTHREADS) sum[t] += tab[i].count;
        fp = (fp ^ tab[i].key ^ (tab[i].count << 1)) * 1099511628211ull;
    }
    int ok = 1;
    printf("%s: %" PRIu64 " distinct words, fingerprint %016" PRIx64 "\n", who, keys, fp);
    for (int t = 0; t < NTHREADS; t++) {
        uint64_t o = *ops(b, t);
        int good = o <= sum[t] && sum[t] <= o + 1;
        ok &= good;
        printf("    thread %d: %" PRIu64 " words counted, op counter %" PRIu64 "  %s\n",
               t, sum[t], o, good ? "(consistent)" : "(INCONSISTENT)");
    }
    return ok ? 0 : 1;
}

#define TRY(call) do { if ((call) < 0) { fprintf(stderr, "%s\n", pms_errmsg()); exit(1); } } while (0)

static double ms(uint64_t ns) { return ns / 1e6; }

static int run(const char *img)
{
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    TRY(pms_create(img, IMG_SIZE, &co));
    pms_dev *d;
    TRY(pms_open(img, NULL, &d));
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    void *addr;
    size_t len;
    TRY(pms_map(d, &mo, &addr, &len));
    g_base = addr;
    struct pms_stats st = { .size = sizeof st };
    TRY(pms_stats(d, &st));
    printf("mapped %zu MiB of %s at %p (dirty tracking: %s), nothing read yet\n",
           len >> 20, img, addr, st.dirty_mode == PMS_DIRTY_ASYNC_WP ? "async write-protect + PAGEMAP_SCAN"
                                                               : "synchronous write-protect faults");
    struct header *hd = addr;
    hd->nbuckets = NBUCKETS;
    hd->magic = MAGIC;
    TRY(pms_persist(d, hd, sizeof *hd));

    pthread_t th[NTHREADS];
    for (int t = 0; t < NTHREADS; t++)
        pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
    printf("\n%d threads are counting words into the table; taking live snapshots:\n", NTHREADS);
    for (int s = 0; s < 5; s++) {
        usleep(300000);
        char name[16];
        snprintf(name, sizeof name, "snap-%d", s);
        TRY(pms_snapshot_create(d, name));
        TRY(pms_stats(d, &st));
        printf("  %s: took %6.1f ms, threads paused %5.2f ms, wrote %5" PRIu64 " KiB "
               "(region is %zu MiB)\n", name, ms(st.last_snapshot_ns), ms(st.last_snapshot_pause_ns),
               st.last_snapshot_bytes >> 10, len >> 20);
    }
    atomic_store(&g_stop, 1);
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    TRY(pms_stats(d, &st));
    printf("\nstats: %" PRIu64 " page-fault batches, %" PRIu64 " MiB faulted in, %" PRIu64
           " MiB written back, %" PRIu64 " pages resident\n", st.faults, st.bytes_faulted_in >> 20,
           st.bytes_written_back >> 20, st.resident_pages);
    summary("live memory now", g_base);
    printf("\nreverting to snap-2 (the mapping is dropped and faults back in from the image)\n");
    TRY(pms_snapshot_revert(d, "snap-2"));
    int r = summary("memory after revert", g_base);
    TRY(pms_unmap(d));
    TRY(pms_close(d));
    return r;
}

static int inspect(const char *raw)
{
    FILE *f = fopen(raw, "rb");
    if (!f) { perror(raw); return 1; }
    uint8_t *b = calloc(1, TABLE_OFF + NBUCKETS * sizeof(struct bucket));
    size_t n = fread(b, 1, TABLE_OFF + NBUCKETS * sizeof(struct bucket), f);
    fclose(f);
    (void)n;
    int r = summary("qemu-img's copy of snap-2", b);
    free(b);
    return r;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "run")) return run(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "inspect")) return inspect(argv[2]);
    fprintf(stderr, "usage: pms-demo run IMAGE | inspect RAWFILE\n");
    return 2;
}
