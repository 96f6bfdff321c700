/* Crash consistency of the qcow2 engine, judged by QEMU.
 *
 * For each seed: qemu-img makes a fresh image (cluster size, version,
 * refcount width, extended L2 and an initial qemu snapshot chosen by the
 * seed); we open it through the fault-injecting driver
 * ("seed=S,crash_after=K,mode=drop|tear") and run a random workload of
 * writes, batched writes (bdev_pwrite_batch with a fill callback answering
 * from the model, or declining), compressed writes (16+-bit refcounts), zero
 * writes, discards,
 * snapshot creates/deletes and flushes.  The
 * model remembers the content as of the last successful flush and which
 * bytes were touched after it.  When an operation fails with EIO the device
 * has "lost power": we close it and then require
 *   - qemu-img check exits 0 or 3 (leaks allowed, corruption not);
 *   - qemu-io read -P (every run of clean bytes) and our own reader see
 *     the flushed content for every byte not touched since that flush;
 *   - the image stays usable: our writes after reopening keep qemu-img check
 *     at 0 or 3 and every clean byte intact;
 *   - snapshots created/deleted before the last flush are there / gone, and
 *     the ones there hold the content they were created with.
 *
 * usage: block-crash [-n NSEEDS] [-s FIRST] [-v] [-k] [SEED...]
 *   NSEEDS defaults to $PMS_CRASH_SEEDS or 40 (24 under ASan).  -k keeps failing images.
 *   Each failure prints the seed; `block-crash SEED` reproduces it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "pms-dev.h"          /* dev->bs, for bdev_pwrite_batch */

static bool verbose, keep;
static char tmpdir[256];

/* ---- helpers -------------------------------------------------------------- */

static uint64_t rng_state;
static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint64_t rnd_range(uint64_t lo, uint64_t hi) { return lo + rnd() % (hi - lo + 1); }

/* Run argv; collect stdout+stderr into out (truncated).  Returns the exit
 * status, or -1 if it could not run / was killed. */
static int run_argv(char *const argv[], char *out, size_t outlen)
{
    int p[2];
    if (pipe(p) < 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(p[1], 1);
        dup2(p[1], 2);
        close(p[0]);
        close(p[1]);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(p[1]);
    size_t n = 0;
    char buf[4096];
    ssize_t k;
    while ((k = read(p[0], buf, sizeof buf)) > 0) {
        if (out && n + 1 < outlen) {
            size_t c = (size_t)k < outlen - 1 - n ? (size_t)k : outlen - 1 - n;
            memcpy(out + n, buf, c);
            n += c;
        }
    }
    if (out && outlen) out[n] = '\0';
    close(p[0]);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) ;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int runf(char *out, size_t outlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Run a command given as a printf-formatted, space-separated word list
 * (no quoting: the words never contain spaces). */
static int runf(char *out, size_t outlen, const char *fmt, ...)
{
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    char *argv[64];
    int ac = 0;
    char *save = NULL;
    for (char *t = strtok_r(line, " ", &save); t && ac < 63; t = strtok_r(NULL, " ", &save))
        argv[ac++] = t;
    argv[ac] = NULL;
    return run_argv(argv, out, outlen);
}

static int copy_file(const char *from, const char *to)
{
    int a = open(from, O_RDONLY), b = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (a < 0 || b < 0) { if (a >= 0) close(a); if (b >= 0) close(b); return -1; }
    char buf[65536];
    ssize_t n;
    int r = 0;
    while ((n = read(a, buf, sizeof buf)) > 0)
        if (write(b, buf, (size_t)n) != n) { r = -1; break; }
    close(a);
    close(b);
    return r;
}

static uint8_t *read_file(const char *path, size_t want)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) return NULL;
    uint8_t *b = calloc(1, want);
    size_t got = 0;
    ssize_t n;
    while (got < want && (n = pread(fd, b + got, want - got, (off_t)got)) > 0) got += (size_t)n;
    close(fd);
    return b;
}

/* ---- one seed -------------------------------------------------------------- */

struct snap {
    char name[16];
    uint8_t *content;           /* content at creation (NULL for unknown) */
    int state;                  /* 0 absent, 1 present */
    int stable_state;           /* as of the last successful flush; -1 ambiguous */
};

struct cfg {
    unsigned cs;
    bool v2, ext_l2, qsnap;
    int rb;
    uint64_t size;
    bool tear;
    uint64_t crash_after;
    int nops;
};

#define MAXSNAP 16

struct ctx {
    uint64_t seed;
    struct cfg c;
    char img[512];
    uint8_t *cur, *stable, *dirty, *init;
    struct snap snaps[MAXSNAP];
    int nsnap;
    int failures;
    bool snap_since_flush;      /* a snapshot op started after the last good flush */
    bool resize_at_crash;       /* the crash hit a shrink + regrow pair */
    char desc[256];
};

static int notes;
static bool strict;

static void failf(struct ctx *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void failf(struct ctx *x, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL seed=%llu (%s): ", (unsigned long long)x->seed, x->desc);
    vprintf(fmt, ap);
    printf("\n     reproduce: block-crash %llu   (tests/block/crash.c)\n", (unsigned long long)x->seed);
    va_end(ap);
    fflush(stdout);
    x->failures++;
}

static void pick_cfg(uint64_t seed, struct cfg *c)
{
    rng_state = seed * 0x2545F4914F6CDD1DULL + 1;
    static const unsigned css[] = { 512, 4096, 4096, 65536, 65536, 65536, 1048576 };
    c->cs = css[rnd() % 7];
    c->v2 = rnd() % 5 == 0;
    static const int rbs[] = { 16, 16, 8, 64, 1 };
    c->rb = c->v2 ? 16 : rbs[rnd() % 5];
    c->ext_l2 = !c->v2 && c->cs >= 16384 && rnd() % 3 == 0;
    c->qsnap = c->rb > 1 && rnd() % 3 == 0;
    c->size = c->cs >= 1048576 ? 8 << 20 : 4 << 20;
    c->tear = rnd() & 1;
    c->crash_after = rnd_range(1, rnd() % 4 == 0 ? 600 : 150);
    c->nops = (int)rnd_range(10, 60);
}

static void model_write(struct ctx *x, uint64_t off, uint64_t len, int pat)
{
    memset(x->cur + off, pat, len);
    memset(x->dirty + off, 1, len);
}

/* Fill callback of the batched writes: the device's bytes are the model's
 * (as the memory device's resident pages are); mode 2 declines ranges with
 * an odd 4 KiB page (partly resident memory). */
struct bfill { struct ctx *x; int mode; };
static bool batch_fill(void *opaque, void *buf, uint64_t len, uint64_t off)
{
    struct bfill *f = opaque;
    if (f->mode == 2)
        for (uint64_t pg = off / 4096; pg <= (off + len - 1) / 4096; pg++)
            if (pg & 1) return false;
    memcpy(buf, f->x->cur + off, len);
    return true;
}

/* A template image per configuration, made by qemu-img (and qemu-io). */
static int make_image(struct ctx *x)
{
    struct cfg *c = &x->c;
    char tmpl[512], out[4096];
    snprintf(tmpl, sizeof tmpl, "%s/tmpl-%u-%d-%d-%d-%d.qcow2", tmpdir, c->cs, c->v2, c->rb,
             c->ext_l2, c->qsnap);
    memset(x->init, 0, c->size);
    if (c->qsnap) {
        /* deterministic initial content per template */
        memset(x->init + 1000, 0xa1, 100000);
        memset(x->init + 2 * 1048576 + 5, 0xa2, 70000);
    }
    memcpy(x->cur, x->init, c->size);
    if (c->qsnap) memset(x->cur + 3 * 1048576, 0xa3, 4096);
    if (access(tmpl, F_OK) != 0) {
        char part[600];
        snprintf(part, sizeof part, "%s.part", tmpl);
        unlink(part);
        if (runf(out, sizeof out,
                 "qemu-img create -q -f qcow2 -o cluster_size=%u,compat=%s,refcount_bits=%d%s %s %llu",
                 c->cs, c->v2 ? "0.10" : "1.1", c->rb, c->ext_l2 ? ",extended_l2=on" : "", part,
                 (unsigned long long)c->size) != 0) {
            failf(x, "qemu-img create failed: %s", out);
            return -1;
        }
        if (c->qsnap) {
            char *av1[] = { "qemu-io", "-c", "write -P 0xa1 1000 100000",
                            "-c", "write -P 0xa2 2097157 70000", part, NULL };
            char *av2[] = { "qemu-img", "snapshot", "-c", "base", part, NULL };
            char *av3[] = { "qemu-io", "-c", "write -P 0xa3 3145728 4096", part, NULL };
            if (run_argv(av1, out, sizeof out) || run_argv(av2, out, sizeof out) ||
                run_argv(av3, out, sizeof out)) {
                failf(x, "preparing template: %s", out);
                return -1;
            }
        }
        if (rename(part, tmpl) < 0) return -1;
    }
    if (copy_file(tmpl, x->img) < 0) {
        failf(x, "copy of template failed");
        return -1;
    }
    return 0;
}

/* Compare content with the model: bytes not dirty must equal stable. */
static int compare(struct ctx *x, const uint8_t *got, const char *who)
{
    uint64_t n = x->c.size;
    for (uint64_t i = 0; i < n; i++) {
        if (x->dirty[i] || got[i] == x->stable[i]) continue;
        uint64_t j = i;
        while (j < n && !x->dirty[j] && got[j] != x->stable[j]) j++;
        failf(x, "%s: flushed data lost at [%llu, %llu): expected 0x%02x, got 0x%02x",
              who, (unsigned long long)i, (unsigned long long)j, x->stable[i], got[i]);
        return -1;
    }
    return 0;
}

static int verify_qemu_io(struct ctx *x)
{
    /* one qemu-io run with a read -P per run of equal, clean bytes */
    size_t cap = 64, ac = 0;
    char **av = malloc(cap * sizeof *av);
    av[ac++] = strdup("qemu-io");
    av[ac++] = strdup("-r");
    uint64_t n = x->c.size;
    for (uint64_t i = 0; i < n; ) {
        if (x->dirty[i]) { i++; continue; }
        uint64_t j = i;
        while (j < n && !x->dirty[j] && x->stable[j] == x->stable[i]) j++;
        if (ac + 4 >= cap) { cap *= 2; av = realloc(av, cap * sizeof *av); }
        char cmd[128];
        snprintf(cmd, sizeof cmd, "read -q -P 0x%02x %llu %llu", x->stable[i],
                 (unsigned long long)i, (unsigned long long)(j - i));
        av[ac++] = strdup("-c");
        av[ac++] = strdup(cmd);
        i = j;
    }
    av[ac++] = strdup(x->img);
    av[ac] = NULL;
    char out[8192];
    int rc = run_argv(av, out, sizeof out);
    for (size_t i = 0; i < ac; i++) free(av[i]);
    free(av);
    if (rc != 0) {
        char *l = strstr(out, "Pattern verification failed");
        failf(x, "qemu-io read -P: exit %d: %.300s", rc, l ? l : out);
        return -1;
    }
    return 0;
}

/* qemu-img check output whose only errors are OFLAG_COPIED mismatches that
 * are harmless: the flag missing at refcount 1 (writes will copy), or set at
 * refcount > 1 on a cluster that qemu-img also reports as leaked with one
 * reference (nothing else shares it).  A flag set on a really shared cluster
 * would let a write change a snapshot: not harmless. */
static bool copied_only(const char *out, unsigned cs)
{
    bool any = false;
    for (const char *l = out; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        if (!strncmp(l, "ERROR OFLAG_COPIED", 18)) {
            const char *e = strstr(l, "_entry=");
            const char *rc = strstr(l, "refcount=");
            if (!e || !rc) return false;
            unsigned long long ent = strtoull(e + 7, NULL, 16);
            long refc = strtol(rc + 9, NULL, 10);
            if (refc > 1) {
                char want[96];
                snprintf(want, sizeof want, "Leaked cluster %llu refcount=%ld reference=1\n",
                         (ent & 0x00fffffffffffe00ULL) / cs, refc);
                if (!strstr(out, want)) return false;
            }
            any = true;
            continue;
        }
        if (!strncmp(l, "ERROR", 5) || !strncmp(l, "Warning", 7)) return false;
    }
    return any;
}

static char chk_out[1 << 20];    /* qemu-img check lists every cluster: can be long */

/* Is the qcow2 v3 "dirty" bit (incompatible feature bit 0) set? */
static bool image_dirty(const char *img)
{
    uint8_t h[80];
    int fd = open(img, O_RDONLY);
    if (fd < 0) return false;
    ssize_t n = pread(fd, h, sizeof h, 0);
    close(fd);
    if (n != (ssize_t)sizeof h || h[7] < 3) return false;
    return h[79] & 1;
}

/* The engine brackets snapshot create/apply/delete with the dirty bit: a
 * crash inside leaves a dirty image whose refcounts the next writable open
 * rebuilds (QEMU does so too).  Repair it the way a user would get it
 * repaired: by QEMU's writable open on odd seeds, by ours on even ones. */
static int repair_dirty(struct ctx *x)
{
    char o2[4096];
    if (x->seed & 1) {
        char *av[] = { "qemu-io", "-c", "read 0 512", x->img, NULL };
        if (run_argv(av, o2, sizeof o2) != 0) {
            failf(x, "qemu-io could not open the dirty image writable: %.500s", o2);
            return -1;
        }
    } else {
        struct pms_open_opts o;
        pms_open_opts_init(&o);
        pms_dev *dev;
        if (pms_open(x->img, &o, &dev) < 0) {
            failf(x, "our writable open of the dirty image: %s", pms_errmsg());
            return -1;
        }
        if (pms_close(dev) < 0) {
            failf(x, "closing the repaired dirty image: %s", pms_errmsg());
            return -1;
        }
    }
    if (image_dirty(x->img)) {
        failf(x, "image still dirty after a writable open by %s", x->seed & 1 ? "qemu-io" : "us");
        return -1;
    }
    return 0;
}

static void verify_image(struct ctx *x, bool crashed)
{
    if (crashed && image_dirty(x->img)) {
        if (!x->snap_since_flush) {
            failf(x, "dirty bit set after a crash outside any snapshot operation");
            return;
        }
        printf("NOTE seed=%llu (%s): dirty image after a crash inside a snapshot operation; "
               "repaired by %s writable open\n", (unsigned long long)x->seed, x->desc,
               x->seed & 1 ? "QEMU's" : "our");
        notes++;
        if (repair_dirty(x) < 0) return;
    }
    /* 1. qemu-img check: leaks allowed, corruption not */
    int rc = runf(chk_out, sizeof chk_out, "qemu-img check %s", x->img);
    if (rc == 2 && crashed && x->snap_since_flush && !strict && copied_only(chk_out, x->c.cs)) {
        /* A snapshot create/delete raises/lowers refcounts and flips
         * QCOW_OFLAG_COPIED in L1/L2 in two steps; a crash in between leaves
         * "OFLAG_COPIED ... refcount=N" errors (as QEMU itself can).  They are
         * harmless (no cluster has more references than its refcount); note
         * them, repair with qemu-img, and require a clean image after. */
        printf("NOTE seed=%llu (%s): qemu-img check exit 2, only OFLAG_COPIED errors after a crash "
               "during a snapshot operation; repairing with qemu-img check -r all "
               "(PMS_CRASH_STRICT=1 fails instead)\n", (unsigned long long)x->seed, x->desc);
        notes++;
        runf(chk_out, sizeof chk_out, "qemu-img check -r all %s", x->img);
        rc = runf(chk_out, sizeof chk_out, "qemu-img check %s", x->img);
        if (rc != 0) {
            failf(x, "qemu-img check exit %d after qemu-img check -r all:\n%.1500s", rc, chk_out);
            return;
        }
    }
    if (rc != 0 && rc != 3) {
        failf(x, "qemu-img check exit %d%s:\n%.1500s", rc, crashed ? " after crash" : " after clean close", chk_out);
        return;
    }
    if (!crashed && rc == 3)
        failf(x, "qemu-img check reports leaks after a clean close:\n%.800s", chk_out);

    /* A crash between the shrink and the regrow leaves the short size:
     * grow it back with qemu-img (the tail is unconstrained in the model). */
    if (x->resize_at_crash) {
        rc = runf(chk_out, sizeof chk_out, "qemu-img resize %s %llu", x->img,
                  (unsigned long long)x->c.size);
        if (rc != 0) {
            failf(x, "qemu-img resize after a crash during resize: exit %d:\n%.800s", rc, chk_out);
            return;
        }
    }

    /* 2. qemu's reading: read -P of every clean run (covers every clean byte) */
    char raw[600];
    if (verify_qemu_io(x) < 0) return;

    /* 3. our reader */
    pms_dev *dev;
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = 1;
    if (pms_open(x->img, &o, &dev) < 0) {
        failf(x, "our open after crash: %s", pms_errmsg());
        return;
    }
    uint8_t *b = malloc(x->c.size);
    if (pms_pread(dev, b, x->c.size, 0) < 0)
        failf(x, "our read after crash: %s", pms_errmsg());
    else
        compare(x, b, "our reader");
    free(b);
    struct pms_check_result res = { .size = sizeof res };
    if (pms_check(dev, 0, &res, NULL, NULL) < 0)
        failf(x, "our check failed: %s", pms_errmsg());
    else if (res.corruptions)
        failf(x, "our check reports %llu corruptions where qemu-img check reports none",
              (unsigned long long)res.corruptions);
    struct pms_snapshot_info *l = NULL;
    size_t nl = 0;
    if (pms_snapshot_list(dev, &l, &nl) < 0)
        failf(x, "our snapshot list failed: %s", pms_errmsg());
    pms_close(dev);

    /* 4. snapshots: present/absent as of the last flush, with their content */
    if (x->nsnap == 0) {
        pms_snapshot_list_free(l, nl);
        if (nl) failf(x, "our list shows %zu snapshots, none was made", nl);
        return;
    }
    char *av[] = { "qemu-img", "snapshot", "-l", x->img, NULL };
    run_argv(av, chk_out, sizeof chk_out);
    for (int i = 0; i < x->nsnap; i++) {
        struct snap *s = &x->snaps[i];
        if (s->stable_state < 0) continue;
        char pat[32];
        snprintf(pat, sizeof pat, " %s ", s->name);
        bool q_has = strstr(chk_out, pat) != NULL;
        bool p_has = false;
        for (size_t k = 0; k < nl; k++) if (!strcmp(l[k].name, s->name)) p_has = true;
        if (q_has != (s->stable_state == 1))
            failf(x, "snapshot %s should be %s after the crash (qemu-img snapshot -l)", s->name,
                  s->stable_state ? "present" : "absent");
        if (p_has != q_has)
            failf(x, "snapshot %s: our list and qemu-img's disagree", s->name);
        if (q_has && s->stable_state == 1 && s->content) {
            snprintf(raw, sizeof raw, "%s.snap.raw", x->img);
            char arg[64];
            snprintf(arg, sizeof arg, "snapshot.name=%s", s->name);
            char *cv[] = { "qemu-img", "convert", "-O", "raw", "-l", arg, x->img, raw, NULL };
            char o2[4096];
            if (run_argv(cv, o2, sizeof o2) != 0) { failf(x, "qemu-img convert -l %s: %s", arg, o2); continue; }
            uint8_t *sb = read_file(raw, x->c.size);
            unlink(raw);
            if (sb && memcmp(sb, s->content, x->c.size)) {
                uint64_t k = 0;
                while (sb[k] == s->content[k]) k++;
                failf(x, "snapshot %s content differs at %llu: expected 0x%02x got 0x%02x", s->name,
                      (unsigned long long)k, s->content[k], sb[k]);
            }
            free(sb);
        }
    }
    pms_snapshot_list_free(l, nl);
}

/* The image after the crash must stay usable: open it writable, write a few
 * ranges, close; qemu-img check still 0 or 3 and every clean byte intact. */
static void reuse_after_crash(struct ctx *x)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    pms_dev *dev;
    if (pms_open(x->img, &o, &dev) < 0) {
        failf(x, "reopen for writing after the crash: %s", pms_errmsg());
        return;
    }
    uint8_t *b = malloc(300000);
    for (int i = 0; i < 4; i++) {
        uint64_t off = rnd() % x->c.size, len = rnd_range(1, 300000);
        if (off + len > x->c.size) len = x->c.size - off;
        int pat = (int)rnd_range(1, 255);
        memset(b, pat, len);
        if (pms_pwrite(dev, b, len, off) < 0) {
            failf(x, "write after the crash (write -P 0x%02x %llu %llu): %s", pat,
                  (unsigned long long)off, (unsigned long long)len, pms_errmsg());
            break;
        }
        memset(x->stable + off, pat, len);
        memset(x->dirty + off, 0, len);
    }
    free(b);
    if (pms_close(dev) < 0) {
        failf(x, "close after writing to the crashed image: %s", pms_errmsg());
        return;
    }
    char out[8192];
    int rc = runf(out, sizeof out, "qemu-img check %s", x->img);
    if (rc != 0 && rc != 3) {
        failf(x, "qemu-img check exit %d after writing to the crashed image:\n%.1500s", rc, out);
        return;
    }
    verify_qemu_io(x);
}

static void verify(struct ctx *x, bool crashed)
{
    int before = x->failures;
    verify_image(x, crashed);
    if (crashed && x->failures == before)
        reuse_after_crash(x);
}

static int run_seed(uint64_t seed)
{
    struct ctx xx = { .seed = seed }, *x = &xx;
    struct cfg *c = &x->c;
    pick_cfg(seed, c);
    snprintf(x->desc, sizeof x->desc,
             "crash_after=%llu mode=%s cluster_size=%u compat=%s refcount_bits=%d extended_l2=%s qemu-snapshot=%s%s",
             (unsigned long long)c->crash_after, c->tear ? "tear" : "drop", c->cs,
             c->v2 ? "0.10" : "1.1", c->rb, c->ext_l2 ? "on" : "off", c->qsnap ? "yes" : "no",
             seed % 3 == 0 ? " small-caches" : "");
    snprintf(x->img, sizeof x->img, "%s/img-%llu.qcow2", tmpdir, (unsigned long long)seed);
    x->cur = malloc(c->size);
    x->stable = malloc(c->size);
    x->dirty = calloc(1, c->size);
    x->init = malloc(c->size);
    if (make_image(x) < 0) goto out;
    memcpy(x->stable, x->cur, c->size);
    if (c->qsnap) {
        struct snap *s = &x->snaps[x->nsnap++];
        strcpy(s->name, "base");
        s->content = malloc(c->size);
        memcpy(s->content, x->init, c->size);
        s->state = s->stable_state = 1;
    }

    char spec[128];
    snprintf(spec, sizeof spec, "seed=%llu,crash_after=%llu,mode=%s", (unsigned long long)seed,
             (unsigned long long)c->crash_after, c->tear ? "tear" : "drop");
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.format = "qcow2";
    o.fault_spec = spec;
    if (seed % 3 == 0) {
        /* the smallest caches (16 L2 tables, 8 refcount blocks): tables are
         * evicted, and written back, in the middle of the workload */
        o.l2_cache_size = 1;
        o.refcount_cache_size = 1;
    }
    pms_dev *dev;
    int r = pms_open(x->img, &o, &dev);
    if (r < 0) {
        failf(x, "pms_open with fault_spec %s: %s", spec, pms_errmsg());
        goto out;
    }
    bool crashed = false;
    char opdesc[128] = "";
    uint8_t *buf = malloc(c->size);
    int snapno = 0;
    for (int i = 0; i < c->nops && !crashed; i++) {
        unsigned kind = (unsigned)(rnd() % 100);
        uint64_t maxlen = (uint64_t)c->cs * 3;
        if (maxlen > 300000) maxlen = 300000;
        uint64_t off = rnd() % c->size;
        uint64_t len = rnd() % 4 == 0 ? rnd_range(1, 600) : rnd_range(1, maxlen);
        if (rnd() % 3 == 0) off -= off % c->cs;            /* cluster aligned sometimes */
        if (off + len > c->size) len = c->size - off;
        if (kind < 8 && c->rb >= 16) {
            /* compressed write of whole clusters (packed at byte granularity
             * into shared host clusters); a band of distinct bytes makes the
             * compressed sizes vary.  Narrow refcounts are left out: a host
             * cluster packed up to their maximum cannot take a snapshot's
             * extra reference (QEMU refuses that snapshot too). */
            int pat = (int)rnd_range(1, 255);
            off -= off % c->cs;
            len = (uint64_t)c->cs * rnd_range(1, c->cs >= 1048576 ? 1 : 3);
            if (off + len > c->size) len = c->size - off;
            memset(buf, pat, len);
            for (uint64_t co = 0; co < len; co += c->cs) {
                uint64_t band = rnd_range(0, 200 < c->cs / 2 ? 200 : c->cs / 2);
                uint64_t at = rnd_range(0, c->cs - band);
                for (uint64_t k = 0; k < band; k++) buf[co + at + k] = (uint8_t)(k * 7 + 1);
            }
            snprintf(opdesc, sizeof opdesc, "write -c (0x%02x + bands) %llu %llu", pat,
                     (unsigned long long)off, (unsigned long long)len);
            r = pms_pwrite_compressed(dev, buf, len, off);
            if (r == 0) {
                memcpy(x->cur + off, buf, len);
                memset(x->dirty + off, 1, len);
            }
        } else if (kind >= 38 && kind < 45) {
            /* a batch of runs, as the memory device writes back: sorted,
             * some touching, crossing clusters; the bytes of the clusters
             * they rewrite come from fill (the model) or are read back */
            struct bdev_wvec v[8];
            int pats[8], nr = (int)rnd_range(1, 8), k = 0;
            uint64_t pos = off, prev_end = 0;
            for (; k < nr && pos < c->size; k++) {
                uint64_t l = rnd() % 3 == 0 ? rnd_range(1, 600) : rnd_range(1, maxlen / 2 + 1);
                if (rnd() % 2 && pos - pos % 4096 >= prev_end) {
                    pos -= pos % 4096;
                    l = 4096 * rnd_range(1, 3);
                }
                if (k == 0) off = pos;
                if (pos + l > c->size) l = c->size - pos;
                pats[k] = (int)rnd_range(1, 255);
                memset(buf + pos, pats[k], l);
                v[k] = (struct bdev_wvec){ pos, l, buf + pos };
                prev_end = pos + l;
                pos += l + (rnd() % 3 == 0 ? 0 : rnd_range(1, 2 * (uint64_t)c->cs));
            }
            nr = k;
            len = v[nr - 1].off + v[nr - 1].len - off;
            struct bfill bf = { x, (int)(rnd() % 3) };
            snprintf(opdesc, sizeof opdesc, "batch of %d runs %llu..%llu (fill %s)", nr,
                     (unsigned long long)off, (unsigned long long)(off + len),
                     bf.mode == 0 ? "none" : bf.mode == 1 ? "model" : "odd pages declined");
            r = bdev_pwrite_batch(dev->bs, v, (size_t)nr, bf.mode ? batch_fill : NULL, &bf);
            if (r == 0)
                for (k = 0; k < nr; k++) model_write(x, v[k].off, v[k].len, pats[k]);
        } else if (kind < 45) {
            int pat = (int)rnd_range(1, 255);
            snprintf(opdesc, sizeof opdesc, "write -P 0x%02x %llu %llu", pat,
                     (unsigned long long)off, (unsigned long long)len);
            memset(buf, pat, len);
            r = pms_pwrite(dev, buf, len, off);
            if (r == 0) model_write(x, off, len, pat);
        } else if (kind < 55) {
            snprintf(opdesc, sizeof opdesc, "write -z %llu %llu", (unsigned long long)off,
                     (unsigned long long)len);
            r = pms_write_zeroes(dev, len, off);
            if (r == 0) model_write(x, off, len, 0);
        } else if (kind < 62) {
            snprintf(opdesc, sizeof opdesc, "discard %llu %llu", (unsigned long long)off,
                     (unsigned long long)len);
            r = pms_discard(dev, len, off);
            if (r == 0) {
                /* discard may zero or keep; adopt what reads back, which must be one of the two */
                r = pms_pread(dev, buf, len, off);
                if (r == 0) {
                    for (uint64_t k = 0; k < len; k++)
                        if (buf[k] != 0 && buf[k] != x->cur[off + k]) {
                            failf(x, "after %s byte %llu reads 0x%02x (neither old 0x%02x nor zero)",
                                  opdesc, (unsigned long long)(off + k), buf[k], x->cur[off + k]);
                            goto abandon;
                        }
                    memcpy(x->cur + off, buf, len);
                    memset(x->dirty + off, 1, len);
                }
            }
        } else if (kind < 64) {
            /* shrink, then grow back to the model's size: the whole
             * clusters past the short size read as zeroes afterwards, the
             * partial one keeps its bytes (QEMU's rule) */
            bool snaps = c->qsnap;
            for (int k = 0; k < x->nsnap; k++) snaps |= x->snaps[k].state != 0;
            if (c->v2 && snaps) continue;       /* refused, as QEMU does */
            uint64_t ns = off & ~511ull, from = (ns + c->cs - 1) / c->cs * c->cs;
            snprintf(opdesc, sizeof opdesc, "resize --shrink %llu, resize %llu",
                     (unsigned long long)ns, (unsigned long long)c->size);
            r = pms_truncate(dev, ns);
            if (r == 0) r = pms_truncate(dev, c->size);
            if (r == 0 && from < c->size) model_write(x, from, c->size - from, 0);
            if (r == -EIO) {
                memset(x->dirty + ns, 1, c->size - ns);
                x->resize_at_crash = true;
            }
        } else if (kind < 80) {
            snprintf(opdesc, sizeof opdesc, "flush");
            r = pms_flush(dev);
            if (r == 0) {
                memcpy(x->stable, x->cur, c->size);
                memset(x->dirty, 0, c->size);
                for (int k = 0; k < x->nsnap; k++) x->snaps[k].stable_state = x->snaps[k].state;
                x->snap_since_flush = false;
            }
        } else if (kind < 90) {
            if (c->rb == 1 || x->nsnap >= MAXSNAP) continue;
            struct snap *s = &x->snaps[x->nsnap];
            snprintf(s->name, sizeof s->name, "c%d", snapno++);
            snprintf(opdesc, sizeof opdesc, "snapshot -c %s", s->name);
            s->stable_state = -1;     /* ambiguous until the next flush */
            x->snap_since_flush = true;
            s->state = 0;
            x->nsnap++;
            r = pms_snapshot_create(dev, s->name);
            if (r == 0) {
                s->state = 1;
                s->content = malloc(c->size);
                memcpy(s->content, x->cur, c->size);
            } else if (r == -EIO) {
                s->state = -1;
            }
        } else {
            int live[MAXSNAP], nlive = 0;
            for (int k = 0; k < x->nsnap; k++) if (x->snaps[k].state == 1) live[nlive++] = k;
            if (!nlive) continue;
            struct snap *s = &x->snaps[live[rnd() % (unsigned)nlive]];
            snprintf(opdesc, sizeof opdesc, "snapshot -d %s", s->name);
            x->snap_since_flush = true;
            r = pms_snapshot_delete(dev, s->name);
            if (r == 0) {
                s->state = 0;
                if (s->stable_state != 0) s->stable_state = -1;   /* until the next flush */
            } else if (r == -EIO) {
                s->state = -1;
                s->stable_state = s->stable_state == 1 ? -1 : s->stable_state;
            }
        }
        if (verbose) printf("  seed %llu op %d: %s -> %d\n", (unsigned long long)seed, i, opdesc, r);
        if (r == -EIO) {
            crashed = true;
            /* the interrupted write/zero/discard may have reached the disk
             * in part: its range holds old or new bytes */
            if (kind < 62) memset(x->dirty + off, 1, len);
        }
        else if (r < 0) {
            failf(x, "op %d '%s' failed (not a crash): %s", i, opdesc, pms_errmsg());
            goto abandon;
        }
        /* a snapshot create in flight at the crash: unknown whether it exists */
        if (crashed && strncmp(opdesc, "snapshot -c", 11) == 0)
            x->snaps[x->nsnap - 1].stable_state = -1;
    }
    if (!crashed) {
        r = pms_flush(dev);
        if (r == 0) {
            r = pms_close(dev);
            dev = NULL;
            if (r == 0) {
                memcpy(x->stable, x->cur, c->size);
                memset(x->dirty, 0, c->size);
                for (int k = 0; k < x->nsnap; k++) x->snaps[k].stable_state = x->snaps[k].state;
            }
        }
        if (r < 0 && r != -EIO) failf(x, "final flush/close failed (not a crash): %s", pms_errmsg());
        crashed = r < 0;
    }
    if (dev) pms_close(dev);   /* error ignored: the device has crashed */
    dev = NULL;
    if (verbose) printf("  seed %llu: %s\n", (unsigned long long)seed, crashed ? "crashed" : "completed");
    verify(x, crashed);
    goto done;
abandon:
    if (dev) pms_close(dev);
done:
    free(buf);
out:
    if (x->failures && keep) {
        char dst[600];
        snprintf(dst, sizeof dst, "crash-fail-%llu.qcow2", (unsigned long long)seed);
        if (copy_file(x->img, dst) == 0) printf("     image kept as %s\n", dst);
    }
    unlink(x->img);
    for (int k = 0; k < x->nsnap; k++) free(x->snaps[k].content);
    free(x->cur); free(x->stable); free(x->dirty); free(x->init);
    return x->failures ? -1 : 0;
}

static void rmtree(const char *d)
{
    char *av[] = { "rm", "-rf", (char *)d, NULL };
    run_argv(av, NULL, 0);
}

int main(int argc, char **argv)
{
#ifdef __SANITIZE_ADDRESS__
    uint64_t defseeds = 24;       /* the sanitizer build runs the same seeds, fewer of them */
#else
    uint64_t defseeds = 40;
#endif
    uint64_t nseeds = getenv("PMS_CRASH_SEEDS") ? strtoull(getenv("PMS_CRASH_SEEDS"), NULL, 0) : defseeds;
    uint64_t first = 1;
    int opt;
    strict = getenv("PMS_CRASH_STRICT") && *getenv("PMS_CRASH_STRICT") == '1';
    while ((opt = getopt(argc, argv, "n:s:vk")) != -1) {
        switch (opt) {
        case 'n': nseeds = strtoull(optarg, NULL, 0); break;
        case 's': first = strtoull(optarg, NULL, 0); break;
        case 'v': verbose = true; break;
        case 'k': keep = true; break;
        default:
            fprintf(stderr, "usage: %s [-n NSEEDS] [-s FIRST] [-v] [-k] [SEED...]\n", argv[0]);
            return 2;
        }
    }
    snprintf(tmpdir, sizeof tmpdir, "%s/pms-crash.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 2; }
    int failed = 0, total = 0;
    if (optind < argc) {
        for (int i = optind; i < argc; i++, total++)
            if (run_seed(strtoull(argv[i], NULL, 0)) < 0) failed++;
    } else {
        for (uint64_t s = first; s < first + nseeds; s++, total++)
            if (run_seed(s) < 0) failed++;
    }
    rmtree(tmpdir);
    printf("# crash: %d seeds, %d failed, %d notes (crash inside a snapshot op: dirty image repaired, or OFLAG_COPIED-only)\n",
           total, failed, notes);
    return failed ? 1 : 0;
}
