/* Child and checker for tests/mem/kill-snap.sh (SIGKILL during stores,
 * persists and live snapshots).
 *
 *   kill-snap-child probe IMG MODE          map once; exit 77 without userfaultfd
 *   kill-snap-child run IMG ROUND SEED MODE LOG
 *       map IMG and run until killed: thread W stores generations into the
 *       W slots, thread X persists W slots, the main thread stores and
 *       persists the P slots and creates/deletes snapshots.  Every promise
 *       is logged (one write(2) per line, O_APPEND) AFTER the call returned.
 *   kill-snap-child verify LOG RAW          check the active image (raw dump made
 *       by qemu-img convert); prints qemu-io "read -P" commands for P slots
 *       whose last persisted pattern is their only possible content
 *   kill-snap-child verify-snap LOG RAW NAME [RAW NAME]...   check snapshot dumps
 *   kill-snap-child state LOG IMG           dirty bit, last log line, "present NAME"
 *       (reported created) / "absent NAME" (reported deleted) lines
 *
 * Layout (image >= 8 MiB; the script writes a 4 KiB marker at 7 MiB):
 *   W slots: NW x 16 KiB at 0.  Every 8-byte word of a slot holds
 *            gen<<24 | slot<<12 | chk(gen, slot); W writes a whole slot per
 *            generation, word by word, in increasing address order.
 *            gen = ROUND<<24 | n, so generations grow across rounds.
 *   P slots: NP x 64 KiB at 4 MiB, one byte pattern each, written and
 *            persisted by the main thread only.
 * Log lines:
 *   round R seed S mode M        start of a run
 *   wp S G        W slot S persisted while its last completed store was G
 *   ps K B        P slot K is about to be filled with B;  pp K B: persisted
 *   sc NAME       pms_snapshot_create(NAME) is about to be called
 *   sn NAME HI LO0..LO(NW-1)   it returned 0; HI = last generation started by
 *                 then, LOi = last generation completed in slot i before the call
 *   sf NAME RC MSG  it failed
 *   sd NAME       pms_snapshot_delete(NAME) about to be called; sD NAME: returned 0;
 *   sdf NAME RC MSG failed
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"

/* KILL_SNAP_KIND=external: the snapshots are external (layer files). */
static unsigned snap_flags(void)
{
    const char *k = getenv("KILL_SNAP_KIND");
    return k && !strcmp(k, "external") ? PMS_SNAP_EXTERNAL : 0;
}
#include "kfeat.h"

#define NW      256
#define WSLOT   (16u << 10)
#define WWORDS  (WSLOT / 8)
#define NP      16
#define PSLOT   (64u << 10)
#define POFF    ((uint64_t)NW * WSLOT)
#define DUMPLEN (POFF + (uint64_t)NP * PSLOT)   /* what the checker reads */
#define MINSIZE (8u << 20)
#define MAXLIVE 3              /* snapshots kept by the child */

static uint64_t mix(uint64_t x)
{
    x ^= x >> 31; x *= 0x7fb5d329728ea185ull;
    x ^= x >> 27; x *= 0x81dadef4bc2dd44dull;
    return x ^ (x >> 33);
}
static uint64_t chk(uint64_t gen, uint64_t slot) { return mix(gen * 4099 + slot + 1) & 0xfff; }
static uint64_t enc(uint64_t gen, uint64_t slot) { return gen << 24 | slot << 12 | chk(gen, slot); }
/* decode: 0 = never written (gen 0); -1 = not a word W ever stored into `slot` */
static int64_t dec(uint64_t w, uint64_t slot)
{
    if (w == 0) return 0;
    uint64_t g = w >> 24;
    if (((w >> 12) & 0xfff) != slot || chk(g, slot) != (w & 0xfff) || g == 0) return -1;
    return (int64_t)g;
}

/* ---- the child ---------------------------------------------------------- */
static int g_log = -1;
static pms_dev *g_dev;
static uint8_t *g_p;
static uint64_t g_round;
static _Atomic uint64_t g_started;
static _Atomic uint64_t g_done[NW];

static void logline(const char *fmt, ...)
{
    static __thread char buf[NW * 20 + 512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || n >= (int)sizeof buf - 1) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    if (write(g_log, buf, (size_t)n) != n) _exit(4);
}

static void die(const char *what, int r)
{
    fprintf(stderr, "kill-snap-child: %s failed (%d): %s\n", what, r, pms_errmsg());
    logline("fatal %s %d %s", what, r, pms_errmsg());
    _exit(3);
}

static uint64_t rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return mix(*s);
}

static void *w_thread(void *arg)
{
    uint64_t seed = (uintptr_t)arg;
    for (uint64_t n = 1; n < (1u << 24); n++) {
        uint64_t g = g_round << 24 | n;
        uint64_t s = rnd(&seed) % NW;
        atomic_store(&g_started, g);
        volatile uint64_t *q = (volatile uint64_t *)(g_p + s * WSLOT);
        uint64_t w = enc(g, s);
        for (unsigned i = 0; i < WWORDS; i++)
            q[i] = w;
        atomic_store_explicit(&g_done[s], g, memory_order_release);
        if ((n & 3) == 0)
            usleep(500);
    }
    for (;;) pause();
    return NULL;
}

static void *x_thread(void *arg)
{
    uint64_t seed = (uintptr_t)arg;
    for (;;) {
        uint64_t s = rnd(&seed) % NW;
        uint64_t g = atomic_load_explicit(&g_done[s], memory_order_acquire);
        if (g == 0) { usleep(100); continue; }
        int r = pms_persist(g_dev, g_p + s * WSLOT, WSLOT);
        if (r < 0) die("pms_persist(W)", r);
        logline("wp %" PRIu64 " %" PRIu64, s, g);
        usleep(300 + (unsigned)(rnd(&seed) % 700));
    }
    return NULL;
}

static int open_map(const char *img, const char *mode, int *rc)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    int r = pms_open(img, &o, &g_dev);
    if (r < 0) { fprintf(stderr, "pms_open: %s\n", pms_errmsg()); *rc = 2; return -1; }
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = !strncmp(mode, "async", 5) ? PMS_DIRTY_ASYNC_WP
                      : !strncmp(mode, "sync", 4) ? PMS_DIRTY_SYNC_WP : PMS_DIRTY_AUTO;
    /* "-cap": a 2 MiB resident cap on the 8 MiB image, so clean pages are
     * dropped and dirty ones written back early while the kills land */
    if (strstr(mode, "-cap")) mo.mem_limit = 2 << 20;
    mo.writeback_interval_ms = 20;
    void *a;
    size_t len;
    /* skip only where the kernel probe says the mode's feature is absent;
     * any error from the library is a failure */
    const char *missing = kfeat_missing(mode);
    if (missing) {
        fprintf(stderr, "SKIP: %s\n", missing);
        *rc = 77;
        return -1;
    }
    r = pms_map(g_dev, &mo, &a, &len);
    if (r < 0) { fprintf(stderr, "pms_map: %s\n", pms_errmsg()); *rc = 2; return -1; }
    if (len < MINSIZE) { fprintf(stderr, "image smaller than 8 MiB\n"); *rc = 2; return -1; }
    g_p = a;
    return 0;
}

static int probe(const char *img, const char *mode)
{
    int rc = 0;
    if (open_map(img, mode, &rc) < 0) return rc;
    if (pms_unmap(g_dev) < 0 || pms_close(g_dev) < 0) {
        fprintf(stderr, "unmap/close: %s\n", pms_errmsg());
        return 2;
    }
    return 0;
}

static uint8_t g_pat;
static uint8_t new_pat(void) { g_pat = (uint8_t)(g_pat % 254 + 1); return g_pat; }  /* 1..254 */

static int run(const char *img, uint64_t round, uint64_t seed, const char *mode, const char *log)
{
    g_log = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (g_log < 0) { perror(log); return 2; }
    g_round = round;
    g_pat = (uint8_t)(seed % 254);
    logline("round %" PRIu64 " seed %" PRIu64 " mode %s pid %d", round, seed, mode, (int)getpid());
    int rc = 0;
    if (open_map(img, mode, &rc) < 0) {
        logline("fatal open/map %d", rc);
        return rc;
    }
    /* snapshots left by earlier runs, oldest first */
    char *live[64];
    int nlive = 0;
    struct pms_snapshot_info *sl;
    size_t n;
    int r = pms_snapshot_list(g_dev, &sl, &n);
    if (r < 0) die("pms_snapshot_list", r);
    for (size_t i = 0; i < n && nlive < 48; i++)
        live[nlive++] = strdup(sl[i].name);
    pms_snapshot_list_free(sl, n);
    /* every P slot gets a known, persisted content first */
    uint8_t cur[NP];
    for (int k = 0; k < NP; k++) {
        cur[k] = new_pat();
        logline("ps %d %d", k, cur[k]);
        memset(g_p + POFF + (uint64_t)k * PSLOT, cur[k], PSLOT);
    }
    r = pms_persist(g_dev, g_p + POFF, (size_t)NP * PSLOT);
    if (r < 0) die("pms_persist(P all)", r);
    for (int k = 0; k < NP; k++)
        logline("pp %d %d", k, cur[k]);
    pthread_t tw, tx;
    pthread_create(&tw, NULL, w_thread, (void *)(uintptr_t)(seed * 3 + 1));
    pthread_create(&tx, NULL, x_thread, (void *)(uintptr_t)(seed * 5 + 2));
    char *lobuf = malloc(NW * 20 + 64);
    for (unsigned it = 0;; it++) {
        int k = (int)(rnd(&seed) % NP);
        cur[k] = new_pat();
        logline("ps %d %d", k, cur[k]);
        memset(g_p + POFF + (uint64_t)k * PSLOT, cur[k], PSLOT);
        r = pms_persist(g_dev, g_p + POFF + (uint64_t)k * PSLOT, PSLOT);
        if (r < 0) die("pms_persist(P)", r);
        logline("pp %d %d", k, cur[k]);

        char name[32];
        snprintf(name, sizeof name, "r%" PRIu64 "n%u", round, it);
        size_t pos = 0;
        for (int s = 0; s < NW; s++)
            pos += (size_t)sprintf(lobuf + pos, " %" PRIu64,
                                   atomic_load_explicit(&g_done[s], memory_order_acquire));
        logline("sc %s", name);
        r = pms_snapshot_create_ex(g_dev, name, snap_flags());
        uint64_t hi = atomic_load(&g_started);
        if (r == 0) {
            logline("sn %s %" PRIu64 "%s", name, hi, lobuf);
            if (nlive < 64) live[nlive++] = strdup(name);
        } else {
            logline("sf %s %d %s", name, r, pms_errmsg());
            fprintf(stderr, "snapshot %s: %s\n", name, pms_errmsg());
        }
        while (nlive > MAXLIVE) {
            logline("sd %s", live[0]);
            r = pms_snapshot_delete(g_dev, live[0]);
            if (r == 0)
                logline("sD %s", live[0]);
            else {
                logline("sdf %s %d %s", live[0], r, pms_errmsg());
                fprintf(stderr, "delete %s: %s\n", live[0], pms_errmsg());
            }
            free(live[0]);
            memmove(live, live + 1, (size_t)--nlive * sizeof *live);
        }
        usleep(1000 + (unsigned)(rnd(&seed) % 3000));
    }
}

/* ---- the checker -------------------------------------------------------- */
struct snaprec {
    char name[32];
    int state;                  /* 1 creating, 2 created, 3 deleting, 4 deleted, 5 failed */
    uint64_t round, seed, hi;
    uint64_t pers[NW], lo[NW];  /* at "sc" / from "sn" */
    int pexact[NP];             /* pattern every P byte must hold, -1 = unknown */
};

static struct {
    uint64_t round, seed;
    uint64_t pers[NW];
    int pp[NP];                 /* last persisted pattern, -1 none */
    uint8_t pend[NP][256];      /* patterns stored since that persist */
    int npend[NP];
    int last[NP];               /* last stored pattern */
    uint64_t last_round[NP];
    struct snaprec *snaps;
    int nsnaps;
    char last_tok[16];
    int fatal;
} L;

static struct snaprec *find_snap(const char *name, int create)
{
    for (int i = L.nsnaps - 1; i >= 0; i--)
        if (!strcmp(L.snaps[i].name, name)) return &L.snaps[i];
    if (!create) return NULL;
    L.snaps = realloc(L.snaps, (size_t)(L.nsnaps + 1) * sizeof *L.snaps);
    struct snaprec *sr = &L.snaps[L.nsnaps++];
    memset(sr, 0, sizeof *sr);
    snprintf(sr->name, sizeof sr->name, "%s", name);
    return sr;
}

static void parse_log(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); exit(2); }
    for (int k = 0; k < NP; k++) L.pp[k] = L.last[k] = -1;
    size_t cap = NW * 24 + 1024;
    char *line = malloc(cap);
    while (fgets(line, (int)cap, f)) {
        char tok[16], name[64];
        uint64_t a = 0, b = 0;
        int k, pat;
        if (sscanf(line, "%15s", tok) != 1) continue;
        memcpy(L.last_tok, tok, sizeof tok);
        if (!strcmp(tok, "fatal")) L.fatal++;
        if (!strcmp(tok, "round") &&
            sscanf(line, "round %" SCNu64 " seed %" SCNu64, &a, &b) == 2) {
            L.round = a;
            L.seed = b;
        }
        else if (!strcmp(tok, "wp") && sscanf(line, "wp %" SCNu64 " %" SCNu64, &a, &b) == 2) {
            if (a < NW && b > L.pers[a]) L.pers[a] = b;
        } else if (!strcmp(tok, "ps") && sscanf(line, "ps %d %d", &k, &pat) == 2 &&
                   k >= 0 && k < NP) {
            L.pend[k][L.npend[k]++ & 255] = (uint8_t)pat;
            L.last[k] = pat;
            L.last_round[k] = L.round;
        } else if (!strcmp(tok, "pp") && sscanf(line, "pp %d %d", &k, &pat) == 2 &&
                   k >= 0 && k < NP) {
            L.pp[k] = pat;
            L.npend[k] = 0;
        } else if (sscanf(line, "%*s %63s", name) != 1) {
            continue;
        } else if (!strcmp(tok, "sc")) {
            struct snaprec *sr = find_snap(name, 1);
            sr->state = 1;
            sr->round = L.round;
            sr->seed = L.seed;
            memcpy(sr->pers, L.pers, sizeof L.pers);
            for (k = 0; k < NP; k++)
                sr->pexact[k] = L.last_round[k] == L.round ? L.last[k] : -1;
        } else if (!strcmp(tok, "sn")) {
            struct snaprec *sr = find_snap(name, 1);
            sr->state = 2;
            char *p = line + 3 + strlen(name) + 1;
            sr->hi = strtoull(p, &p, 10);
            for (int s = 0; s < NW; s++)
                sr->lo[s] = strtoull(p, &p, 10);
        } else if (!strcmp(tok, "sf")) {
            find_snap(name, 1)->state = 5;
        } else if (!strcmp(tok, "sd") || !strcmp(tok, "sdf")) {
            find_snap(name, 1)->state = 3;
        } else if (!strcmp(tok, "sD")) {
            find_snap(name, 1)->state = 4;
        }
    }
    free(line);
    fclose(f);
}

static uint8_t *load_raw(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    static uint8_t *buf;
    if (!buf) buf = malloc(DUMPLEN);
    *len = fread(buf, 1, DUMPLEN, f);
    fclose(f);
    if (*len < DUMPLEN) { fprintf(stderr, "%s: short dump\n", path); exit(2); }
    return buf;
}

static int nerr;
#define BAD(...) do { if (nerr++ < 20) { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

/* W slot s of buf: every word a store of W into s with lo <= gen <= hi;
 * returns 1 if the slot is not uniform. */
static int check_wslot(const uint8_t *buf, uint64_t s, uint64_t lo, uint64_t hi, const char *what)
{
    const uint64_t *q = (const uint64_t *)(buf + s * WSLOT);
    int torn = 0;
    for (unsigned i = 0; i < WWORDS; i++) {
        int64_t g = dec(q[i], s);
        if (g < 0) {
            BAD("%s: W slot %" PRIu64 " word %u = %#" PRIx64 " was never stored there", what, s, i,
                q[i]);
            return 0;
        }
        if ((uint64_t)g < lo || (uint64_t)g > hi) {
            BAD("%s: W slot %" PRIu64 " word %u holds generation %" PRId64 " (round %" PRId64
                "), outside [%" PRIu64 ", %" PRIu64 "] (lower bound: persisted/completed before)",
                what, s, i, g, g >> 24, lo, hi);
            return 0;
        }
        if (q[i] != q[0]) torn = 1;
    }
    return torn;
}

static int verify(const char *log, const char *raw)
{
    parse_log(log);
    size_t len;
    uint8_t *buf = load_raw(raw, &len);
    uint64_t hi = ((L.round + 1) << 24) - 1;
    int npers = 0;
    for (uint64_t s = 0; s < NW; s++) {
        check_wslot(buf, s, L.pers[s], hi, "active image");
        npers += L.pers[s] > 0;
    }
    int exact = 0, loose = 0;
    for (int k = 0; k < NP; k++) {
        if (L.pp[k] < 0) continue;
        const uint8_t *p = buf + POFF + (uint64_t)k * PSLOT;
        uint8_t ok[256] = { 0 };
        ok[L.pp[k]] = 1;
        for (int j = 0; j < L.npend[k] && j < 256; j++) ok[L.pend[k][j]] = 1;
        if (L.npend[k] == 0) {
            printf("read -P 0x%02x %" PRIu64 " %u\n", L.pp[k], POFF + (uint64_t)k * PSLOT, PSLOT);
            exact++;
        } else
            loose++;
        for (unsigned i = 0; i < PSLOT; i++)
            if (!ok[p[i]]) {
                BAD("active image: P slot %d byte %u = %#x; persisted %#x, stored since: %d patterns",
                    k, i, p[i], L.pp[k], L.npend[k]);
                break;
            }
    }
    fprintf(stderr, "verify: %d W slots with a persisted generation, P slots %d exact + %d "
            "in flight: %s\n", npers, exact, loose, nerr ? "FAILED" : "ok");
    return nerr ? 1 : 0;
}

static int verify_snap(const char *raw, const char *name)
{
    struct snaprec *sr = find_snap(name, 0);
    if (!sr || sr->state < 2 || sr->state == 5) {
        BAD("verify-snap: %s was never reported created", name);
        return 1;
    }
    size_t len;
    uint8_t *buf = load_raw(raw, &len);
    char what[64];
    snprintf(what, sizeof what, "snapshot %s", name);
    int torn = 0, e0 = nerr;
    /* W had not started a store of this run yet: any earlier run's */
    uint64_t hi = sr->hi ? sr->hi : (sr->round << 24) - 1;
    for (uint64_t s = 0; s < NW; s++) {
        uint64_t lo = sr->lo[s] > sr->pers[s] ? sr->lo[s] : sr->pers[s];
        int t = check_wslot(buf, s, lo, hi, what);
        if (t && sr->lo[s] >> 24 == sr->round) torn++;   /* rewritten in this run: whole */
    }
    if (torn > 1)
        BAD("%s: %d W slots torn (at most the one being stored at the cut may be)", what, torn);
    /* The exact cut: W's slot sequence follows from the run's seed.  With G
     * the newest generation of this run in the dump, every slot must hold
     * its last store up to G, the slot of G a prefix of G over that. */
    uint64_t G = 0;
    for (uint64_t s = 0; s < NW; s++) {
        const uint64_t *q = (const uint64_t *)(buf + s * WSLOT);
        for (unsigned i = 0; i < WWORDS; i++) {
            int64_t g = dec(q[i], s);
            if (g > 0 && (uint64_t)g >> 24 == sr->round && (uint64_t)g > G) G = (uint64_t)g;
        }
    }
    if (G && nerr == e0) {
        uint64_t lastn[NW] = { 0 }, seed = sr->seed * 3 + 1, nG = G & 0xffffff, sG = 0;
        for (uint64_t n = 1; n <= nG; n++) {
            uint64_t s = rnd(&seed) % NW;
            if (n < nG) lastn[s] = n; else sG = s;
        }
        for (uint64_t s = 0; s < NW && nerr == e0; s++) {
            const uint64_t *q = (const uint64_t *)(buf + s * WSLOT);
            unsigned i = 0;
            if (s == sG) {
                while (i < WWORDS && q[i] == enc(G, s)) i++;
                if (i == 0) BAD("%s: slot %" PRIu64 " of generation %" PRIu64 " does not start with it",
                                what, s, G);
            }
            uint64_t want = lastn[s] ? enc(sr->round << 24 | lastn[s], s) : 0;
            for (; i < WWORDS; i++) {
                int64_t g = dec(q[i], s);
                if (lastn[s] ? q[i] != want : (uint64_t)g >> 24 == sr->round) {
                    BAD("%s: not a cut at generation %" PRIu64 ": W slot %" PRIu64 " word %u holds "
                        "%" PRId64 ", its last store up to the cut was %" PRIu64 " (0 = none this run)",
                        what, G, s, i, g, lastn[s] ? (sr->round << 24 | lastn[s]) : 0);
                    break;
                }
            }
        }
    }
    for (int k = 0; k < NP; k++) {
        if (sr->pexact[k] < 0) continue;
        const uint8_t *p = buf + POFF + (uint64_t)k * PSLOT;
        for (unsigned i = 0; i < PSLOT; i++)
            if (p[i] != sr->pexact[k]) {
                BAD("%s: P slot %d byte %u = %#x, memory held %#x at the snapshot", what, k, i,
                    p[i], sr->pexact[k]);
                break;
            }
    }
    fprintf(stderr, "verify-snap %s: %s\n", name, nerr > e0 ? "FAILED" : "ok");
    return nerr > e0;
}

/* For the script, in one process: the header's dirty bit, the kind of the
 * last log line, the round it belongs to, whether the child logged a fatal
 * error, then the snapshots that must be listed / must be gone. */
static int state(const char *log, const char *img)
{
    parse_log(log);
    FILE *f = fopen(img, "rb");
    uint8_t hdr[80];
    if (!f || fread(hdr, 1, sizeof hdr, f) != sizeof hdr) { perror(img); return 2; }
    fclose(f);
    printf("dirty %d\nlast %s\nround %" PRIu64 "\nfatal %d\n", hdr[79] & 1,
           L.last_tok[0] ? L.last_tok : "none", L.round, L.fatal);
    for (int i = 0; i < L.nsnaps; i++) {
        if (L.snaps[i].state == 2) printf("present %s\n", L.snaps[i].name);
        if (L.snaps[i].state == 4) printf("absent %s\n", L.snaps[i].name);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "probe") && argc == 4) return probe(argv[2], argv[3]);
    if (!strcmp(cmd, "run") && argc == 7)
        return run(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0), argv[5],
                   argv[6]);
    if (!strcmp(cmd, "verify") && argc == 4) return verify(argv[2], argv[3]);
    if (!strcmp(cmd, "verify-snap") && argc >= 5 && argc % 2 == 1) {
        parse_log(argv[2]);
        int bad = 0;
        for (int i = 3; i < argc; i += 2)
            bad |= verify_snap(argv[i], argv[i + 1]);
        return bad;
    }
    if (!strcmp(cmd, "state") && argc == 4) return state(argv[2], argv[3]);
    fprintf(stderr, "usage: see the comment at the top of kill-snap-child.c\n");
    return 2;
}
