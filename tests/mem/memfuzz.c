/* memfuzz: differential fuzzer of the memory device and both snapshot kinds
 * through the public API, against a model (one buffer per snapshot and for
 * the live state) and QEMU's tools (qemu-img check of every file, qemu-img
 * convert of the live image, of every internal snapshot and every layer).
 * A seed picks the image (qemu-img made: 16-100 MiB, sizes off the page and
 * cluster grid, 4 KiB-2 MiB clusters, extended L2, lazy refcounts, a
 * backing file, qemu-io data/zero/discard/compressed writes, an internal
 * snapshot) and a sequence of operations: stores from one or two threads,
 * persist, snapshots of both kinds (some taken while a writer runs, checked
 * for atomicity), revert, delete, pread/pwrite/zeroes/discard beside the
 * mapping, unmap and map again with other options (caps down to 1/32 of the
 * image, every dirty mode, chunk sizes, writeback periods, prefetch), close
 * and reopen.  Written by a test helper as a bug hunt (it found the stalls
 * under the smallest cap, see mem-fuzz.sh); kept as a test.
 * usage: memfuzz SEED DIR [NOPS]
 * env: MF_VERBOSE=1 prints every op; MF_ONLY=i,j,.. runs only these ops,
 * MF_SKIP=i,j,.. all but these; MF_CRASH=0|1 (SIGKILL mode; default: the
 * seed decides); MF_TINYCAP=N caps at N chunks; MF_SIZE=BYTES;
 * PMEMSNAP: the CLI (the crash mode's reopen). */
#include <pmemsnap.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>
#include <time.h>
#include <signal.h>

static uint64_t rs;
static uint64_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static uint64_t rn(uint64_t n) { return n ? rnd() % n : 0; }
static uint64_t mix(uint64_t x) { x += 0x9e3779b97f4a7c15ull; x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull; return x ^ (x >> 31); }

static const char *D;
static char IMG[512], BASE[512];
static uint64_t SZ, CL;
static int has_base, verbose, EL2;
static unsigned long long seed;
static int opno;

#define MAXS 64
struct snap { char name[32]; int kind; uint8_t *data; int owner; int parent; int alive; };
static struct snap S[MAXS];
static int ns;
static int live_parent = -1;
static uint8_t *live;

static pms_dev *dev;
static uint8_t *map;
static size_t maplen;
static struct pms_open_opts oo;
static struct pms_map_opts mo;

static void fail(const char *fmt, ...)
{
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "BUG seed=%llu op=%d: ", seed, opno);
    vfprintf(stderr, fmt, ap); fprintf(stderr, "\n"); va_end(ap);
    fflush(stderr);
    _exit(1);
}
static void vlog(const char *fmt, ...)
{
    if (!verbose) return;
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "[%d] ", opno); vfprintf(stderr, fmt, ap); fprintf(stderr, "\n"); va_end(ap);
}
static int sh(const char *fmt, ...)
{
    char cmd[4096]; va_list ap; va_start(ap, fmt); vsnprintf(cmd, sizeof cmd, fmt, ap); va_end(ap);
    int r = system(cmd);
    return WIFEXITED(r) ? WEXITSTATUS(r) : 128;
}
static uint8_t *slurp(const char *f, size_t want)
{
    FILE *fp = fopen(f, "rb"); if (!fp) fail("cannot read %s", f);
    uint8_t *b = calloc(1, want); size_t n = fread(b, 1, want, fp);
    if (n != want) fail("%s: %zu bytes, want %zu", f, n, want);
    fclose(fp); return b;
}
static void cmpbuf(const uint8_t *got, const uint8_t *want, size_t n, uint64_t base, const char *what)
{
    if (!memcmp(got, want, n)) return;
    size_t i = 0; while (got[i] == want[i]) i++;
    size_t j = n; while (got[j-1] == want[j-1]) j--;
    size_t cnt = 0; for (size_t k = i; k < j; k++) cnt += got[k] != want[k];
    fail("%s differs at 0x%llx..0x%llx (%zu bytes): got %02x want %02x", what,
         (unsigned long long)(base + i), (unsigned long long)(base + j), cnt, got[i], want[i]);
}
/* content of an image (optionally an internal snapshot) per qemu-img */
static uint8_t *qread(const char *img, const char *snap)
{
    char out[600]; snprintf(out, sizeof out, "%s/q.raw", D);
    unlink(out);
    int r;
    if (snap) r = sh("qemu-img convert -U -l snapshot.name=%s -O raw '%s' '%s'", snap, img, out);
    else r = sh("qemu-img convert -U -O raw '%s' '%s'", img, out);
    if (r) fail("qemu-img convert %s %s failed", img, snap ? snap : "");
    uint8_t *b = slurp(out, SZ); unlink(out); return b;
}
static int allow_dirty;
static void qcheck(const char *img)
{
    if (allow_dirty) { sh("qemu-img check -U '%s' >/dev/null 2>&1", img); return; }
    int r = sh("qemu-img check -U '%s' >%s/chk.out 2>&1", img, D);
    if (r != 0 && r != 3) { sh("cat %s/chk.out >&2", D); fail("qemu-img check %s exit %d", img, r); }
    if (r == 3) { fprintf(stderr, "WARN seed=%llu op=%d leaks in %s\n", seed, opno, img); sh("head -3 %s/chk.out >&2", D); }
}
static void layer(char *buf, int e) { sprintf(buf, "%s@%s", IMG, S[e].name); }

/* ---- device ---- */
static void do_open(void)
{
    int r = pms_open(IMG, &oo, &dev);
    if (r < 0) fail("pms_open: %s", pms_errmsg());
}
static void do_map(void)
{
    void *a; size_t l;
    int r = pms_map(dev, &mo, &a, &l);
    if (r < 0) fail("pms_map (limit %llu chunk %llu mode %d): %s", (unsigned long long)mo.mem_limit,
                    (unsigned long long)mo.chunk_size, mo.dirty_tracking, pms_errmsg());
    map = a; maplen = l;
    if (l < SZ) fail("map len %zu < %llu", l, (unsigned long long)SZ);
}
static void pick_map_opts(void)
{
    pms_map_opts_init(&mo);
    static const uint64_t chunks[] = { 0, 4096, 16384, 65536, 1 << 20, 4 << 20 };
    mo.chunk_size = chunks[rn(6)];
    uint64_t ch = mo.chunk_size ? mo.chunk_size : (CL >= 4096 ? CL : 65536);
    static const int div[] = { 0, 2, 4, 8, 8, 16, 32 };
    int d = div[rn(7)];
    if (d) {
        mo.mem_limit = SZ / d;
        if (mo.mem_limit < 8 * ch) mo.mem_limit = 8 * ch;
        if (mo.mem_limit >= SZ) mo.mem_limit = 0;
    }
    if (getenv("MF_TINYCAP")) mo.mem_limit = atoi(getenv("MF_TINYCAP")) * ch;
    mo.dirty_tracking = rn(3);
    static const unsigned wb[] = { 0, 1, 5, 20, 100, 2000 };
    mo.writeback_interval_ms = wb[rn(6)];
    mo.prefetch = rn(4) == 0;
    vlog("map opts limit=%llu chunk=%llu mode=%d wb=%u prefetch=%d", (unsigned long long)mo.mem_limit,
         (unsigned long long)mo.chunk_size, mo.dirty_tracking, mo.writeback_interval_ms, mo.prefetch);
}
static void pick_open_opts(void)
{
    pms_open_opts_init(&oo);
    int k = rn(8);
    if (k == 0) oo.l2_cache_size = 65536;
    if (k == 1) oo.cache_mode = PMS_CACHE_NONE;
    if (k == 2) oo.cache_mode = PMS_CACHE_WRITETHROUGH;
    if (k == 3) oo.lazy_refcounts = 1;
    if (k == 4) oo.refcount_cache_size = 4096;
    vlog("open opts l2=%llu cache=%d lazy=%d", (unsigned long long)oo.l2_cache_size, oo.cache_mode, oo.lazy_refcounts);
}

/* ---- store ops ---- */
struct span { uint64_t off, len; int kind; uint8_t val; uint64_t srcoff; };
static uint8_t *srcbuf;           /* random source for memcpy, SRCLEN bytes */
#define SRCLEN (4u << 20)
static void gen_span(struct span *s, uint64_t lo, uint64_t hi)
{
    uint64_t maxlen;
    switch (rn(4)) { case 0: maxlen = 64; break; case 1: maxlen = 8192; break; case 2: maxlen = 300000; break; default: maxlen = 2 << 20; }
    s->len = 1 + rn(maxlen);
    if (s->len > hi - lo) s->len = hi - lo;
    if (rn(3) == 0) {   /* page crossing */
        uint64_t p = lo + (rn((hi - lo) / 4096) * 4096);
        s->off = p > lo + 17 ? p - 1 - rn(16) : lo;
    } else s->off = lo + rn(hi - lo - s->len + 1);
    if (s->off + s->len > hi) s->len = hi - s->off;
    s->kind = rn(2);
    s->val = rnd();
    s->srcoff = rn(SRCLEN - (s->len > SRCLEN ? SRCLEN : s->len) + 1);
}
static void apply_span(uint8_t *dst, const struct span *s)
{
    if (s->kind == 0) memset(dst + s->off, s->val, s->len);
    else {
        uint64_t done = 0;
        while (done < s->len) {
            uint64_t n = s->len - done; if (n > SRCLEN - s->srcoff) n = SRCLEN - s->srcoff;
            memcpy(dst + s->off + done, srcbuf + s->srcoff, n); done += n;
        }
    }
}
struct tjob { struct span sp[64]; int n; atomic_int started, completed; atomic_int go; uint64_t W; int par; };
static void apply_striped(uint8_t *dst, const struct span *s, uint64_t W, int par)
{
    if (!W) { apply_span(dst, s); return; }
    for (uint64_t a = s->off; a < s->off + s->len; ) {
        uint64_t e = (a / W + 1) * W; if (e > s->off + s->len) e = s->off + s->len;
        if ((int)((a / W) & 1) == par) {
            if (s->kind == 0) memset(dst + a, s->val, e - a);
            else for (uint64_t x = a; x < e; x++) dst[x] = srcbuf[(s->srcoff + x - s->off) % SRCLEN];
        }
        a = e;
    }
}

static void *tstore(void *a)
{
    struct tjob *j = a;
    while (!atomic_load(&j->go)) ;
    for (int i = 0; i < j->n; i++) {
        atomic_store(&j->started, i + 1);
        apply_striped(map, &j->sp[i], j->W, j->par);
        atomic_store(&j->completed, i + 1);
        if (j->n > 8) usleep(200);
    }
    return NULL;
}

static void spot_check(int full)
{
    if (!map) return;
    if (full) { cmpbuf(map, live, SZ, 0, "mapping (full)"); return; }
    for (int i = 0; i < 4; i++) {
        uint64_t len = 1 + rn(65536), off = rn(SZ - len);
        cmpbuf(map + off, live + off, len, off, "mapping (spot)");
    }
}

/* ---- model helpers ---- */
static int is_desc(int x, int e) { for (; x >= 0; x = S[x].parent) if (x == e) return 1; return 0; }
static int live_has_internal(void) { for (int i = 0; i < ns; i++) if (S[i].alive && S[i].kind == 0 && S[i].owner == -1) return 1; return 0; }
static int visible(int i) { return S[i].alive && (S[i].kind == 1 || S[i].owner == -1); }

static void check_list(void)
{
    struct pms_snapshot_info *l; size_t n;
    if (pms_snapshot_list(dev, &l, &n) < 0) fail("pms_snapshot_list: %s", pms_errmsg());
    int want = 0;
    for (int i = 0; i < ns; i++) if (visible(i)) {
        want++;
        size_t k; for (k = 0; k < n; k++) if (!strcmp(l[k].name, S[i].name)) break;
        if (k == n) fail("snapshot %s missing from list", S[i].name);
        if (l[k].kind != S[i].kind) fail("snapshot %s kind %d want %d", S[i].name, l[k].kind, S[i].kind);
    }
    if ((int)n != want) {
        for (size_t k = 0; k < n; k++) fprintf(stderr, "  listed %s kind %d\n", l[k].name, l[k].kind);
        fail("list has %zu snapshots, model %d", n, want);
    }
    pms_snapshot_list_free(l, n);
}

static void verify_all(const char *why)
{
    vlog("verify (%s)", why);
    char lp[600];
    qcheck(IMG);
    if (has_base) qcheck(BASE);
    uint8_t *b = qread(IMG, NULL); cmpbuf(b, live, SZ, 0, "qemu live image"); free(b);
    for (int i = 0; i < ns; i++) {
        if (!S[i].alive) continue;
        if (S[i].kind == 1) {
            layer(lp, i); qcheck(lp);
            b = qread(lp, NULL);
            char w[100]; snprintf(w, sizeof w, "qemu external layer %s", S[i].name);
            cmpbuf(b, S[i].data, SZ, 0, w); free(b);
        } else {
            if (S[i].owner == -1) snprintf(lp, sizeof lp, "%s", IMG); else layer(lp, S[i].owner);
            b = qread(lp, S[i].name);
            char w[100]; snprintf(w, sizeof w, "qemu internal snapshot %s", S[i].name);
            cmpbuf(b, S[i].data, SZ, 0, w); free(b);
        }
    }
    /* no stray layer files */
    DIR *dd = opendir(D); struct dirent *de; const char *bn = strrchr(IMG, '/') + 1;
    while ((de = readdir(dd))) {
        if (strncmp(de->d_name, bn, strlen(bn)) || de->d_name[strlen(bn)] != '@') continue;
        const char *nm = de->d_name + strlen(bn) + 1; int ok = 0;
        for (int i = 0; i < ns; i++) if (S[i].alive && S[i].kind == 1 && !strcmp(S[i].name, nm)) ok = 1;
        if (!ok) fail("stray layer file %s", de->d_name);
    }
    closedir(dd);
}

/* ---- ops ---- */
static void op_store(int threads)
{
    if (!map) return;
    if (threads == 1) {
        int n = 1 + rn(8);
        for (int i = 0; i < n; i++) { struct span s; gen_span(&s, 0, SZ); apply_span(map, &s); apply_span(live, &s); }
        vlog("store %d spans", n);
        return;
    }
    static struct tjob j[2];
    pthread_t t[2];
    uint64_t W = rn(2) ? 0 : 1 + rn(9000);
    for (int k = 0; k < 2; k++) {
        memset(&j[k], 0, sizeof j[k]);
        j[k].n = 1 + rn(8); j[k].W = W; j[k].par = k;
        for (int i = 0; i < j[k].n; i++) {
            if (W) gen_span(&j[k].sp[i], 0, SZ);
            else gen_span(&j[k].sp[i], k * (SZ / 2), (k + 1) * (SZ / 2));
        }
        pthread_create(&t[k], NULL, tstore, &j[k]);
    }
    atomic_store(&j[0].go, 1); atomic_store(&j[1].go, 1);
    /* the main thread works beside them sometimes */
    int side = rn(4);
    if (side == 1) { int r = pms_persist(dev, map, maplen); if (r < 0) fail("pms_persist beside stores: %s", pms_errmsg()); }
    for (int k = 0; k < 2; k++) pthread_join(t[k], NULL);
    for (int k = 0; k < 2; k++) for (int i = 0; i < j[k].n; i++) apply_striped(live, &j[k].sp[i], W, k);
    if (W) vlog("store2 striped W=%llu side=%d", (unsigned long long)W, side);
    vlog("store2 %d+%d spans", j[0].n, j[1].n);
}
static void op_persist(void)
{
    if (!map) return;
    uint64_t len = 1 + rn(rn(2) ? 65536 : SZ), off = rn(SZ - len + 1);
    if (rn(4) == 0) { off = 0; len = maplen; }
    int r = pms_persist(dev, map + off, len);
    vlog("persist 0x%llx+0x%llx = %d", (unsigned long long)off, (unsigned long long)len, r);
    if (r < 0) fail("pms_persist: %s", pms_errmsg());
    if (rn(3) == 0) {   /* durability oracle: qemu reads the persisted range */
        uint8_t *b = qread(IMG, NULL);
        cmpbuf(b + off, live + off, len, off, "qemu read of persisted range");
        free(b);
    }
}
static int new_snap(int kind)
{
    if (ns >= MAXS) return -1;
    int i = ns++;
    snprintf(S[i].name, sizeof S[i].name, "s%d", i);
    S[i].kind = kind; S[i].alive = 1; S[i].owner = -1; S[i].parent = -1;
    S[i].data = malloc(SZ);
    return i;
}
static void snap_commit(int i)
{
    if (S[i].kind == 1) {
        for (int k = 0; k < ns; k++) if (S[k].alive && S[k].kind == 0 && S[k].owner == -1) S[k].owner = i;
        S[i].parent = live_parent; live_parent = i;
    }
}
static void op_snap(int concurrent)
{
    int kind = rn(2);
    int nalive = 0; for (int i = 0; i < ns; i++) nalive += S[i].alive;
    if (ns >= MAXS || nalive > 12) return;
    int i = new_snap(kind);
    unsigned fl = kind ? PMS_SNAP_EXTERNAL : 0;
    if (!concurrent || !map) {
        if (map && rn(2)) fl |= PMS_SNAP_QUIESCED;
        memcpy(S[i].data, live, SZ);
        int r = pms_snapshot_create_ex(dev, S[i].name, fl);
        vlog("snapshot %s %s = %d", S[i].name, kind ? "external" : "internal", r);
        if (r < 0) fail("pms_snapshot_create_ex %s: %s", S[i].name, pms_errmsg());
        snap_commit(i);
        check_list();
        return;
    }
    /* live snapshot with a writer running: bytes of spans completed before the
     * call are new, of spans started after the return old, others either */
    static struct tjob j;
    memset(&j, 0, sizeof j);
    /* disjoint spans: sequential regions */
    j.n = 16 + rn(40);
    uint64_t pos = rn(SZ / 4);
    for (int k = 0; k < j.n; k++) {
        uint64_t len = 1 + rn(rn(2) ? 5000 : 100000);
        if (pos + len > SZ) { j.n = k; break; }
        j.sp[k].off = pos; j.sp[k].len = len; j.sp[k].kind = 0; j.sp[k].val = rnd();
        pos += len + rn(20000);
    }
    if (j.n == 0) { ns--; free(S[i].data); return; }
    uint8_t *before = malloc(SZ); memcpy(before, live, SZ);
    pthread_t t; pthread_create(&t, NULL, tstore, &j);
    int waitfor = rn(j.n);
    atomic_store(&j.go, 1);
    while (atomic_load(&j.completed) < waitfor) ;
    int c0 = atomic_load(&j.completed);
    int r = pms_snapshot_create_ex(dev, S[i].name, fl);
    int s1 = atomic_load(&j.started);
    pthread_join(t, NULL);
    vlog("live snapshot %s %s = %d (spans %d, done-before %d, started-by-return %d)", S[i].name,
         kind ? "external" : "internal", r, j.n, c0, s1);
    if (r < 0) fail("pms_snapshot_create_ex %s: %s", S[i].name, pms_errmsg());
    for (int k = 0; k < j.n; k++) apply_span(live, &j.sp[k]);
    char lp[600];
    uint8_t *got;
    if (kind) { layer(lp, i); got = qread(lp, NULL); } else got = qread(IMG, S[i].name);
    for (int k = 0; k < j.n; k++) {
        uint64_t o = j.sp[k].off, l = j.sp[k].len;
        if (k < c0) cmpbuf(got + o, live + o, l, o, "live snapshot: span completed before the call");
        else if (k >= s1) cmpbuf(got + o, before + o, l, o, "live snapshot: span started after the return");
        else for (uint64_t b = o; b < o + l; b++)
            if (got[b] != before[b] && got[b] != live[b]) fail("live snapshot: torn byte at 0x%llx", (unsigned long long)b);
    }
    /* everything outside the spans must be the before state */
    {
        uint8_t *w = malloc(SZ); memcpy(w, before, SZ);
        for (int k = 0; k < j.n; k++) memcpy(w + j.sp[k].off, got + j.sp[k].off, j.sp[k].len);
        cmpbuf(got, w, SZ, 0, "live snapshot outside the spans");
        free(w);
    }
    memcpy(S[i].data, got, SZ);
    free(got); free(before);
    snap_commit(i);
    check_list();
}
static void op_revert(void)
{
    int cand[MAXS], n = 0;
    for (int i = 0; i < ns; i++) if (visible(i)) cand[n++] = i;
    if (!n) return;
    int i = cand[rn(n)];
    int r = pms_snapshot_revert(dev, S[i].name);
    vlog("revert %s (%s) = %d %s", S[i].name, S[i].kind ? "ext" : "int", r, r < 0 ? pms_errmsg() : "");
    if (S[i].kind == 1 && live_has_internal()) {
        if (r >= 0) fail("revert to external %s succeeded while live holds internal snapshots", S[i].name);
        if (strchr(pms_errmsg(), '\n')) fail("multi-line error: %s", pms_errmsg());
        return;
    }
    if (r < 0) fail("pms_snapshot_revert %s: %s", S[i].name, pms_errmsg());
    memcpy(live, S[i].data, SZ);
    if (S[i].kind == 1) live_parent = i;
    spot_check(rn(4) == 0);
    check_list();
}
static void op_delete(void)
{
    int cand[MAXS], n = 0;
    for (int i = 0; i < ns; i++) if (visible(i)) cand[n++] = i;
    if (!n) return;
    int i = cand[rn(n)];
    if (rn(2)) for (int k = 0; k < n; k++) if (S[cand[k]].kind == 0) { i = cand[k]; break; }
    static struct tjob j; pthread_t t; int conc = map && rn(2);
    if (conc) {
        memset(&j, 0, sizeof j); j.n = 20 + rn(40); j.W = 1 + rn(5000); j.par = 0;
        for (int k = 0; k < j.n; k++) { gen_span(&j.sp[k], 0, SZ); if (j.sp[k].len > 100000) j.sp[k].len = 100000; }
        pthread_create(&t, NULL, tstore, &j); atomic_store(&j.go, 1);
    }
    int r = pms_snapshot_delete(dev, S[i].name);
    if (conc) { pthread_join(t, NULL); for (int k = 0; k < j.n; k++) apply_striped(live, &j.sp[k], j.W, 0); }
    vlog("delete %s (%s) = %d %s", S[i].name, S[i].kind ? "ext" : "int", r, r < 0 ? pms_errmsg() : "");
    if (S[i].kind == 1) {
        int busy = 0;
        for (int k = 0; k < ns; k++) {
            if (!S[k].alive || S[k].kind != 0) continue;
            /* its own, or a direct child's (the code's rule, extsnap.c keeps_internal) */
            int o = S[k].owner;
            if (o == i || (o == -1 ? live_parent == i : S[o].parent == i)) busy = 1;
        }
        if (busy) {
            if (r >= 0) fail("delete of external %s succeeded though internal snapshots read through it", S[i].name);
            if (r != -EBUSY) fail("delete of external %s: %d (want EBUSY): %s", S[i].name, r, pms_errmsg());
            return;
        }
        if (r < 0) fail("pms_snapshot_delete %s: %s", S[i].name, pms_errmsg());
        for (int k = 0; k < ns; k++) if (S[k].alive && S[k].kind == 1 && S[k].parent == i) S[k].parent = S[i].parent;
        if (live_parent == i) live_parent = S[i].parent;
    } else if (r < 0) fail("pms_snapshot_delete %s: %s", S[i].name, pms_errmsg());
    S[i].alive = 0; free(S[i].data); S[i].data = NULL;
    spot_check(0);
    check_list();
}
static void op_blockio(void)
{
    uint64_t len = 1 + rn(rn(2) ? 9000 : 600000), off = rn(SZ - len + 1);
    uint8_t *b = malloc(len);
    int k = rn(3);
    if (k == 0) {
        int r = pms_pread(dev, b, len, off);
        vlog("pread 0x%llx+0x%llx = %d", (unsigned long long)off, (unsigned long long)len, r);
        if (r < 0) fail("pms_pread: %s", pms_errmsg());
        cmpbuf(b, live + off, len, off, "pms_pread");
    } else if (k == 1) {
        for (uint64_t x = 0; x < len; x++) b[x] = srcbuf[(x + off) % SRCLEN] ^ opno;
        int r = pms_pwrite(dev, b, len, off);
        vlog("pwrite 0x%llx+0x%llx = %d", (unsigned long long)off, (unsigned long long)len, r);
        if (r < 0) fail("pms_pwrite: %s", pms_errmsg());
        memcpy(live + off, b, len);
        if (map) cmpbuf(map + off, live + off, len, off, "mapping after pms_pwrite");
    } else if (rn(2)) {
        uint8_t *old = malloc(len); memcpy(old, live + off, len);
        int r = pms_discard(dev, len, off);
        vlog("discard 0x%llx+0x%llx = %d", (unsigned long long)off, (unsigned long long)len, r);
        if (r < 0) fail("pms_discard: %s", pms_errmsg());
        r = pms_pread(dev, b, len, off);
        if (r < 0) fail("pms_pread after discard: %s", pms_errmsg());
        for (uint64_t x = 0; x < len; x++)
            if (b[x] != old[x] && b[x] != 0) fail("discard: byte 0x%llx reads %02x, neither old %02x nor 0",
                                                 (unsigned long long)(off + x), b[x], old[x]);
        memcpy(live + off, b, len);
        if (map) cmpbuf(map + off, live + off, len, off, "mapping after pms_discard");
        free(old);
    } else {
        int r = rn(2) ? pms_write_zeroes(dev, len, off) : pms_write_zeroes_ex(dev, len, off, 0);
        vlog("write_zeroes 0x%llx+0x%llx = %d", (unsigned long long)off, (unsigned long long)len, r);
        if (r < 0) fail("pms_write_zeroes: %s", pms_errmsg());
        memset(live + off, 0, len);
        if (map) cmpbuf(map + off, live + off, len, off, "mapping after pms_write_zeroes");
    }
    free(b);
}
static void op_remap(void)
{
    if (map) {
        int r = pms_unmap(dev);
        vlog("unmap = %d", r);
        if (r < 0) fail("pms_unmap: %s", pms_errmsg());
        map = NULL;
        if (rn(3) == 0) return;  /* stay unmapped for a while */
    }
    pick_map_opts();
    do_map();
    spot_check(0);
}
static void op_reopen(int verify)
{
    if (map && verbose) { struct pms_stats st = { .size = sizeof st };
        if (pms_stats(dev, &st) == 0) vlog("stats faults=%llu evicted=%llu wb=%llu mode=%d resident=%llu",
            (unsigned long long)st.faults, (unsigned long long)st.pages_evicted, (unsigned long long)st.bytes_written_back, st.dirty_mode, (unsigned long long)st.resident_pages); }
    int r = pms_close(dev);
    vlog("close = %d", r);
    if (r < 0) fail("pms_close: %s", pms_errmsg());
    dev = NULL; map = NULL;
    if (verify) verify_all("checkpoint");
    pick_open_opts();
    do_open();
    check_list();
    if (rn(5)) { pick_map_opts(); do_map(); }
    spot_check(0);
}

/* ---- setup: qemu-img makes the image ---- */
static int qio_first = 1;
static void qio(const char *img, uint64_t sz, uint64_t cl)
{
    int first = qio_first; if (img == IMG) qio_first = 0;
    char cmd[8192]; int p = 0;
    /* compressed writes only onto fresh clusters (QEMU refuses others) */
    if (rn(2) && !(EL2 && img == IMG) && (img != IMG || first)) {
        p = snprintf(cmd, sizeof cmd, "qemu-io -f qcow2");
        uint64_t pos = rn(sz / 4) & ~(cl - 1);
        int n = 1 + rn(4);
        for (int i = 0; i < n; i++) {
            uint64_t len = cl * (1 + rn(4));
            if (pos + len > sz) break;
            p += snprintf(cmd + p, sizeof cmd - p, " -c 'write -c -P %d %llu %llu'", (int)rn(256), (unsigned long long)pos, (unsigned long long)len);
            pos += len + cl * rn(8);
        }
        snprintf(cmd + p, sizeof cmd - p, " '%s' >/dev/null", img);
        if (sh("%s", cmd)) fail("prefill failed: %s", cmd);
    }
    int n = rn(12);
    p = snprintf(cmd, sizeof cmd, "qemu-io -f qcow2");
    for (int i = 0; i < n; i++) {
        uint64_t len = 1 + rn(rn(2) ? 70000 : 3 << 20), off = rn(sz - len);
        int k = rn(6);
        if (k == 0) p += snprintf(cmd + p, sizeof cmd - p, " -c 'write -z %llu %llu'", (unsigned long long)off, (unsigned long long)len);
        else if (k == 2) p += snprintf(cmd + p, sizeof cmd - p, " -c 'discard %llu %llu'", (unsigned long long)off, (unsigned long long)len);
        else p += snprintf(cmd + p, sizeof cmd - p, " -c 'write -P %d %llu %llu'", (int)rn(256), (unsigned long long)off, (unsigned long long)len);
    }
    snprintf(cmd + p, sizeof cmd - p, " '%s' >/dev/null", img);
    if (n && sh("%s", cmd)) fail("prefill failed: %s", cmd);
}

static int in_list(const char *l, int i)
{
    if (!l) return 0;
    char b[32]; snprintf(b, sizeof b, ",%d,", i);
    char *t; if (asprintf(&t, ",%s,", l) < 0) return 0;
    int r = strstr(t, b) != NULL; free(t); return r;
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: memfuzz SEED DIR [NOPS]\n"); return 2; }
    seed = strtoull(argv[1], NULL, 0); D = argv[2];
    int nops = argc > 3 ? atoi(argv[3]) : 60;
    verbose = getenv("MF_VERBOSE") != NULL;
    const char *skip = getenv("MF_SKIP"), *only = getenv("MF_ONLY");
    fprintf(stderr, "memfuzz seed=%llu\n", seed);
    rs = mix(seed) | 1;
    srcbuf = malloc(SRCLEN); for (size_t i = 0; i < SRCLEN; i++) srcbuf[i] = rnd();
    static const uint64_t sizes[] = { 16 << 20, 32 << 20, 64 << 20, 100 << 20 };
    SZ = sizes[rn(4)];
    if (getenv("MF_SIZE")) SZ = strtoull(getenv("MF_SIZE"), NULL, 0);
    if (rn(3) == 0) SZ += 4096 * rn(100);             /* not cluster aligned */
    if (rn(2) == 0) SZ += 512 * (1 + rn(7));          /* not page aligned */
    static const uint64_t cls[] = { 4096, 65536, 65536, 2 << 20, 16384 };
    CL = cls[rn(5)];
    int el2 = CL >= 16384 && rn(3) == 0; EL2 = el2;
    has_base = rn(3) == 0;
    int lazy = rn(4) == 0;
    snprintf(IMG, sizeof IMG, "%s/img.qcow2", D);
    snprintf(BASE, sizeof BASE, "%s/base.qcow2", D);
    fprintf(stderr, "config size=%llu cluster=%llu extended_l2=%d base=%d lazy=%d\n",
            (unsigned long long)SZ, (unsigned long long)CL, el2, has_base, lazy);
    if (has_base) {
        if (sh("qemu-img create -q -f qcow2 -o cluster_size=65536 '%s' %llu", BASE, (unsigned long long)SZ)) fail("create base");
        qio(BASE, SZ, 65536);
    }
    char bopt[700] = "";
    if (has_base) snprintf(bopt, sizeof bopt, "-b '%s' -F qcow2", BASE);
    if (sh("qemu-img create -q -f qcow2 -o cluster_size=%llu,extended_l2=%s,lazy_refcounts=%s %s '%s' %llu",
           (unsigned long long)CL, el2 ? "on" : "off", lazy ? "on" : "off", bopt, IMG, (unsigned long long)SZ)) fail("create img");
    qio(IMG, SZ, CL);
    if (rn(3) == 0) {   /* a qemu-made internal snapshot */
        int i = new_snap(0);
        if (sh("qemu-img snapshot -c %s '%s'", S[i].name, IMG)) fail("qemu-img snapshot");
        free(S[i].data); S[i].data = qread(IMG, S[i].name);
        qio(IMG, SZ, CL);
    }
    live = qread(IMG, NULL);

    pick_open_opts(); do_open(); check_list();
    pick_map_opts(); do_map();
    spot_check(1);
    for (opno = 1; opno <= nops; opno++) {
        uint64_t save = rs;
        rs = mix(seed * 1000003 + opno) | 1;
        int k = rn(100);
        if (in_list(skip, opno) || (only && !in_list(only, opno))) { rs = save; continue; }
        if (k < 25) op_store(1);
        else if (k < 40) op_store(2);
        else if (k < 47) op_persist();
        else if (k < 60) op_snap(0);
        else if (k < 66) op_snap(1);
        else if (k < 74) op_revert();
        else if (k < 80) op_delete();
        else if (k < 89) op_blockio();
        else if (k < 94) op_remap();
        else if (k < 97) op_reopen(0);
        else op_reopen(1);
        spot_check(rn(10) == 0);
        rs = save;
    }
    opno = nops + 1;
    if (map) spot_check(1);
    if (getenv("MF_CRASH") ? atoi(getenv("MF_CRASH")) : (int)rn(2)) {
        /* persist everything, then die by SIGKILL; a forked child checks with qemu */
        if (map) { int r = pms_persist(dev, map, maplen); if (r < 0) fail("final persist: %s", pms_errmsg()); }
        else { int r = pms_flush(dev); if (r < 0) fail("final flush: %s", pms_errmsg()); }
        pid_t par = getpid();
        fflush(stderr);
        pid_t c = fork();
        if (c == 0) {
            for (int fd = 3; fd < 4096; fd++) close(fd);
            while (getppid() == par) usleep(1000);
            usleep(20000);
            opno = 9999;
            allow_dirty = oo.lazy_refcounts > 0;   /* documented: refcounts held back */
            verify_all("after SIGKILL");
            allow_dirty = 0;
            /* our writable open of the crashed image, then qemu again */
            const char *pms = getenv("PMEMSNAP") ? getenv("PMEMSNAP") : "pmemsnap";
            if (sh("%s io -c 'write -P 0 0 0' '%s' >/dev/null 2>%s/reopen.err", pms, IMG, D)) {
                sh("cat %s/reopen.err >&2", D); fail("pmemsnap io open after SIGKILL failed");
            }
            opno = 10000;
            verify_all("after SIGKILL + reopen");
            fprintf(stderr, "memfuzz seed=%llu OK (crash)\n", seed);
            _exit(0);
        }
        { char pf[600]; snprintf(pf, sizeof pf, "%s/child.pid", D); FILE *f = fopen(pf, "w"); fprintf(f, "%d\n", c); fclose(f); }
        vlog("crash: SIGKILL now");
        kill(getpid(), SIGKILL);
    }
    int r = pms_close(dev);
    if (r < 0) fail("final pms_close: %s", pms_errmsg());
    verify_all("final");
    fprintf(stderr, "memfuzz seed=%llu OK\n", seed);
    return 0;
}
