/* Memory-device API contract and edge cases: pms_map/persist/unmap/stats,
 * snapshots and block calls while mapped, odd image sizes and layouts,
 * read-only and force-share mappings.  QEMU's tools are the data oracle:
 * the mapping is compared byte for byte with `qemu-img convert -O raw`,
 * persisted bytes are read back with `qemu-io -c "read -P ..."` (with -U
 * while we still hold the image), and every image ends `qemu-img check`
 * clean.
 *
 *   mem-api CASE DIR [MODE]     CASE: see main(); DIR: scratch directory
 *
 * MODE: auto | async | sync (dirty tracking).  Exit 0 = pass, 1 = fail,
 * 77 = the kernel lacks a feature MODE needs (kfeat.h's probe; an error
 * from the library, -ENOTSUP included, never skips).  (mem-api.sh can park cases that expose a
 * known, unfixed library bug in its KNOWN_BUGS list; none is open.)
 *
 * Expectations where the header is silent (the demanding user): a negative
 * errno and a pms_errmsg() starting with "pms_<function>: ", never a crash,
 * a hang, or an image that qemu-img check complains about.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "kfeat.h"

#define PG 4096
static int g_bad;
#define BAD(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                      fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); g_bad++; } while (0)
#define FAIL(...) do { BAD(__VA_ARGS__); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) BAD(__VA_ARGS__); } while (0)
/* Any error fails, -ENOTSUP included: the only skip is main()'s kernel
 * feature probe (kfeat.h) before a case starts. */
#define API(call) do { int r_ = (call); if (r_ < 0) \
        FAIL("%s = %d: %s", #call, r_, pms_errmsg()); } while (0)

static const char *D;          /* scratch directory */
static int g_mode;             /* dirty tracking */

/* ---- helpers ---------------------------------------------------------------- */

static char *P(const char *name)        /* D/name, a few rotating buffers */
{
    static char buf[8][4096];
    static int i;
    char *b = buf[i++ & 7];
    snprintf(b, sizeof buf[0], "%s/%s", D, name);
    return b;
}

static int sh(const char *fmt, ...)
{
    char *cmd;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&cmd, fmt, ap) < 0)
        abort();
    va_end(ap);
    fflush(NULL);
    int st = system(cmd);
    int rc = st == -1 ? -1 : WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (getenv("MEMAPI_DEBUG"))
        fprintf(stderr, "[%d] %s\n", rc, cmd);
    free(cmd);
    return rc;
}
#define MUST(...) do { if (sh(__VA_ARGS__) != 0) FAIL("command failed"); } while (0)

/* qemu-io with -U -r (we may still hold the image); cmds NULL-terminated.
 * Fails on a non-zero exit or any "fail"/"error" in the output. */
static int qio(const char *fmt, const char *img, ...)
{
    char cmd[8192];
    int n = snprintf(cmd, sizeof cmd, "qemu-io -U -r -f %s", fmt);
    va_list ap;
    va_start(ap, img);
    for (const char *c; (c = va_arg(ap, const char *)); )
        n += snprintf(cmd + n, sizeof cmd - (size_t)n, " -c '%s'", c);
    va_end(ap);
    snprintf(cmd + n, sizeof cmd - (size_t)n, " '%s' 2>&1", img);
    fflush(NULL);
    FILE *f = popen(cmd, "r");
    if (!f)
        FAIL("popen");
    char line[1024];
    int bad = 0;
    while (fgets(line, sizeof line, f))
        if (strcasestr(line, "fail") || strcasestr(line, "error")) {
            bad = 1;
            fprintf(stderr, "  qemu-io: %s", line);
        }
    int st = pclose(f);
    if (bad || st != 0) {
        BAD("qemu-io check failed: %s", cmd);
        return -1;
    }
    return 0;
}

static uint8_t *slurp(const char *file, size_t *n)
{
    FILE *f = fopen(file, "rb");
    if (!f)
        FAIL("cannot read %s", file);
    fseek(f, 0, SEEK_END);
    long l = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)l + 1);
    if (fread(b, 1, (size_t)l, f) != (size_t)l)
        FAIL("short read %s", file);
    fclose(f);
    *n = (size_t)l;
    return b;
}

static void spew(const char *file, const void *b, size_t n)
{
    FILE *f = fopen(file, "wb");
    if (!f || fwrite(b, 1, n, f) != n || fclose(f) != 0)
        FAIL("cannot write %s", file);
}

/* QEMU's view of the image (or of snapshot SNAP) as raw bytes. */
static uint8_t *oracle(const char *img, const char *fmt, const char *snap, size_t *n)
{
    char *out = P("oracle.raw");
    unlink(out);
    char sn[512] = "";
    if (snap)
        snprintf(sn, sizeof sn, "-l snapshot.name=%s", snap);
    MUST("qemu-img convert -U -f %s %s -O raw '%s' '%s'", fmt, sn, img, out);
    return slurp(out, n);
}

static void check_clean(const char *img)
{
    int rc = sh("qemu-img check -q '%s' >/dev/null 2>&1", img);
    if (rc != 0) {
        sh("qemu-img check '%s' >&2", img);
        BAD("qemu-img check %s exit %d (want 0)", img, rc);
    }
}

/* r must be -err (or -err2 when non-zero) and the message must start with "fn: ". */
static void expect_err2(int r, int err, int err2, const char *fn, const char *what)
{
    const char *m = pms_errmsg();
    size_t l = strlen(fn);
    if (!(r == -err || (err2 && r == -err2)))
        BAD("%s: %s returned %d (%s), want -%d%s (msg '%s')", what, fn, r,
            r < 0 ? strerror(-r) : "success", err, err2 ? " or other" : "", m);
    else if (strncmp(m, fn, l) != 0 || m[l] != ':')
        BAD("%s: message '%s' does not start with '%s:'", what, m, fn);
}
static void expect_err(int r, int err, const char *fn, const char *what)
{
    expect_err2(r, err, 0, fn, what);
}
/* any negative errno with a prefixed message */
static void expect_fail(int r, const char *fn, const char *what)
{
    const char *m = pms_errmsg();
    size_t l = strlen(fn);
    if (r >= 0)
        BAD("%s: %s succeeded (%d), want an error", what, fn, r);
    else if (strncmp(m, fn, l) != 0 || m[l] != ':')
        BAD("%s: message '%s' does not start with '%s:'", what, m, fn);
}

static pms_dev *open_img(const char *path, const char *fmt, int ro, int share)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = ro;
    o.force_share = share;
    o.format = fmt;
    pms_dev *d;
    API(pms_open(path, &o, &d));
    return d;
}

static uint8_t *map(pms_dev *d, size_t *len, unsigned wb_ms)
{
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = g_mode;
    mo.writeback_interval_ms = wb_ms;
    void *a;
    API(pms_map(d, &mo, &a, len));
    return a;
}

/* A fresh 1 MiB qcow2 image (qemu-img), opened writable and mapped. */
static pms_dev *fresh_mapped(const char *img, unsigned wb_ms, uint8_t **pp)
{
    MUST("qemu-img create -q -f qcow2 '%s' 1M", img);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    size_t len;
    *pp = map(d, &len, wb_ms);
    return d;
}

static int cmp_mem(const uint8_t *p, const uint8_t *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != want[i]) {
            BAD("%s: byte %zu is 0x%02x, QEMU says 0x%02x", what, i, p[i], want[i]);
            return -1;
        }
    return 0;
}

/* SIGBUS/SIGSEGV while touching the mapping become a failure, not a crash. */
static sigjmp_buf g_jb;
static volatile sig_atomic_t g_sig;
static void on_sig(int s) { g_sig = s; siglongjmp(g_jb, 1); }
static void catch_faults(int on)
{
    struct sigaction sa = { .sa_handler = on ? on_sig : SIG_DFL };
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGSEGV, &sa, NULL);
}

/* ---- sizes: odd sizes and layouts, mapping == QEMU's bytes ----------------- */

static void gen(uint8_t *b, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)   /* compressible but position dependent */
        b[i] = (uint8_t)(((i >> 9) * 31 + seed) ^ ((i & 0x1ff) < 64 ? i : 0));
}

/* Map IMG, compare every byte with QEMU, store into the last (partial) page
 * and persist it, check it with qemu-io (shared) before and after close. */
static void verify_img(const char *img, const char *fmt)
{
    fprintf(stderr, "  %s (%s)\n", img, fmt);
    struct stat st0;
    stat(img, &st0);
    size_t on;
    uint8_t *want = oracle(img, fmt, NULL, &on);
    pms_dev *d = open_img(img, fmt, 0, 0);
    int64_t size = pms_size(d);
    /* QEMU counts whole sectors: a raw file of 1000 bytes is 1024 to it */
    CHECK((uint64_t)size == on || (strcmp(fmt, "raw") == 0 && (uint64_t)size < on &&
          on == (((uint64_t)size + 511) & ~511ull)),
          "%s: pms_size %" PRId64 " != qemu %zu", img, size, on);
    for (size_t i = (size_t)size; i < on; i++)
        CHECK(want[i] == 0, "QEMU's padding not zero");
    if ((uint64_t)size < on)
        on = (size_t)size;
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    mo.dirty_tracking = g_mode;
    mo.writeback_interval_ms = 3600000;   /* only persist writes */
    void *a = NULL;
    size_t len = 12345;
    int r = pms_map(d, &mo, &a, &len);
    if (size == 0) {
        /* an empty image: refuse clearly, or map nothing */
        if (r < 0)
            expect_err2(r, EINVAL, ENOTSUP, "pms_map", "empty image");
        else {
            CHECK(len == 0, "empty image mapped with len %zu", len);
            API(pms_unmap(d));
        }
        API(pms_close(d));
        if (strcmp(fmt, "qcow2") == 0)
            check_clean(img);
        free(want);
        return;
    }
    if (r < 0)
        FAIL("pms_map %s = %d: %s", img, r, pms_errmsg());
    uint8_t *p = a;
    CHECK(len == (size_t)size, "%s: len %zu != size %" PRId64, img, len, size);
    catch_faults(1);
    if (sigsetjmp(g_jb, 1) == 0) {
        cmp_mem(p, want, len < on ? len : on, img);
        /* pread while mapped agrees too, at odd offsets */
        uint8_t buf[777];
        for (size_t off = 0; off < len; off += len / 7 + 1) {
            size_t n = len - off < sizeof buf ? len - off : sizeof buf;
            API(pms_pread(d, buf, n, off));
            if (memcmp(buf, want + off, n) != 0) {
                BAD("%s: pms_pread at %zu differs", img, off);
                break;
            }
        }
        /* the last partial page: store the final bytes and persist them */
        size_t n = len < 300 ? len : 300, off = len - n;
        memset(p + off, 0xc3, n);
        API(pms_persist(d, p + off, n));
    } else
        BAD("%s: signal %d touching the mapping", img, (int)g_sig);
    catch_faults(0);
    size_t n = len < 300 ? len : 300, off = len - n;
    char c1[128];
    snprintf(c1, sizeof c1, "read -P 0xc3 %zu %zu", off, n);
    qio(fmt, img, c1, NULL);          /* durable on return of persist */
    API(pms_close(d));
    /* nothing else changed: QEMU's bytes are the old ones but the tail */
    size_t on2;
    uint8_t *now = oracle(img, fmt, NULL, &on2);
    CHECK(on2 == on || (on2 > on && on2 == ((on + 511) & ~(size_t)511)),
          "%s: size changed %zu -> %zu", img, on, on2);
    memset(want + off, 0xc3, n);
    cmp_mem(now, want, on2 < on ? on2 : on, "after close");
    if (strcmp(fmt, "raw") == 0) {
        struct stat st1;
        stat(img, &st1);
        /* the disk is the file in whole sectors, and the stores above
         * reached its last one: the file may grow to it, as under QEMU */
        CHECK(st1.st_size == st0.st_size || st1.st_size == ((st0.st_size + 511) & ~(off_t)511),
              "%s: raw file grew %lld -> %lld", img,
              (long long)st0.st_size, (long long)st1.st_size);
    } else
        check_clean(img);
    free(want);
    free(now);
}

/* sync mode runs the images marked full only (time) */
static int g_full;
#define VERIFY(img, fmt, full) do { if (g_full || (full)) verify_img(img, fmt); } while (0)

static int t_sizes(int part)
{
    g_full = g_mode != PMS_DIRTY_SYNC_WP;
    if (part == 2)
        goto part2;
    char *q0 = P("q0.qcow2"), *q512 = P("q512.qcow2"), *q4608 = P("q4608.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 0", q0);
    VERIFY(q0, "qcow2", 0);
    MUST("qemu-img create -q -f qcow2 '%s' 512 && qemu-io -f qcow2 -c 'write -P 0x5a 0 512' '%s' >/dev/null", q512, q512);
    VERIFY(q512, "qcow2", 1);
    MUST("qemu-img create -q -f qcow2 '%s' 4608 && qemu-io -f qcow2 -c 'write -P 0x11 0 4096' "
         "-c 'write -P 0x22 4096 512' '%s' >/dev/null", q4608, q4608);
    VERIFY(q4608, "qcow2", 1);
    /* 1000 bytes: qcow2 rounds it up to 1024 */
    char *q1000 = P("q1000.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1000 && qemu-io -f qcow2 -c 'write -P 0x31 512 512' '%s' >/dev/null", q1000, q1000);
    VERIFY(q1000, "qcow2", 0);
    /* 512-byte clusters: zero/unallocated/data extents end inside pages */
    char *qc = P("qc512.qcow2");
    MUST("qemu-img create -q -f qcow2 -o cluster_size=512 '%s' 12800 && qemu-io -f qcow2 "
         "-c 'write -P 0x33 512 512' -c 'write -P 0x44 4608 1024' -c 'write -z 8192 512' "
         "-c 'write -P 0x45 8704 1536' -c 'write -P 0x46 12288 512' '%s' >/dev/null", qc, qc);
    VERIFY(qc, "qcow2", 1);
    /* extended L2: subclusters of 2 KiB inside 64 KiB clusters */
    char *qx = P("qx.qcow2");
    MUST("qemu-img create -q -f qcow2 -o extended_l2=on '%s' 205312 && qemu-io -f qcow2 "
         "-c 'write -P 0x51 2048 2048' -c 'write -P 0x52 67584 6144' -c 'write -z 73728 2048' "
         "-c 'write -P 0x53 204800 512' '%s' >/dev/null", qx, qx);
    VERIFY(qx, "qcow2", 0);
    return 0;
part2:;
    /* raw: 1000, 4097, 4608, 8191 bytes of data */
    static uint8_t rb[3 << 20];
    gen(rb, sizeof rb, 7);
    const size_t rsz[] = { 1000, 4097, 4608, 8191 };
    for (size_t i = 0; i < sizeof rsz / sizeof *rsz; i++) {
        char name[64];
        snprintf(name, sizeof name, "r%zu.raw", rsz[i]);
        spew(P(name), rb + i * 999, rsz[i]);
        VERIFY(P(name), "raw", rsz[i] == 4097);
    }
    /* backing chain: qcow2 base of 1M+512, raw base of 3000 bytes */
    char *base = P("base.qcow2"), *ov = P("ov.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1049088 && qemu-io -f qcow2 -c 'write -P 0x61 0 1049088' "
         "-c 'write -P 0x62 1048576 512' '%s' >/dev/null", base, base);
    MUST("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' 2101760 && qemu-io -f qcow2 "
         "-c 'write -P 0x63 4196 200' -c 'write -P 0x64 2097152 4608' -c 'write -z 65536 4096' '%s' >/dev/null",
         base, ov, ov);
    VERIFY(ov, "qcow2", 1);
    char *rbase = P("rbase.raw"), *rov = P("rov.qcow2");
    spew(rbase, rb + 5, 3000);
    MUST("qemu-img create -q -f qcow2 -b '%s' -F raw '%s' 12800 && qemu-io -f qcow2 "
         "-c 'write -P 0x65 2048 512' '%s' >/dev/null", rbase, rov, rov);
    VERIFY(rov, "qcow2", 0);
    /* compressed clusters (64 KiB and 4 KiB clusters), last cluster partial */
    char *src = P("csrc.raw");
    spew(src, rb, (1 << 20) - 65536 + 512);
    char *c64 = P("c64.qcow2"), *c4 = P("c4.qcow2");
    MUST("qemu-img convert -c -f raw -O qcow2 '%s' '%s'", src, c64);
    MUST("qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 '%s' '%s'", src, c4);
    MUST("qemu-img map --output=json '%s' | grep -q '\"compressed\": true' || "
         "qemu-img check '%s' | grep -q compressed", c64, c64);
    VERIFY(c64, "qcow2", 0);
    VERIFY(c4, "qcow2", 1);
    /* compressed with a backing file under it */
    char *cov = P("cov.qcow2");
    MUST("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' && qemu-io -f qcow2 -c 'write -P 0x66 100000 70000' '%s' >/dev/null",
         c64, cov, cov);
    VERIFY(cov, "qcow2", 0);
    return 0;
}

/* ---- map options ---------------------------------------------------------------- */

static uint8_t *map_ok(pms_dev *d, const struct pms_map_opts *o, size_t *len, const char *what)
{
    void *a = NULL;
    int r = pms_map(d, o, &a, len);
    if (r < 0) {
        BAD("%s: pms_map failed (%d): %s", what, r, pms_errmsg());
        return NULL;
    }
    return a;
}

static int t_opts(void)
{
    char *img = P("o.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write -P 0x7e 0 1M' '%s' >/dev/null", img, img);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    void *a = NULL;
    size_t len = 0;

    expect_err(pms_unmap(d), EINVAL, "pms_unmap", "unmap without map");
    expect_err(pms_persist(d, NULL, 0), EINVAL, "pms_persist", "persist without map");
    struct pms_stats st;
    memset(&st, 0xa5, sizeof st);
    st.size = sizeof st;
    API(pms_stats(d, &st));
    CHECK(st.faults == 0 && st.resident_pages == 0, "stats of an unmapped device not zero");

    struct pms_map_opts o;
    const uint64_t bad_chunks[] = { 1, 3, 512, 2048, 4095, 4097, 12288, 65536 + 4096, (1ull << 63) + 4096 };
    for (size_t i = 0; i < sizeof bad_chunks / sizeof *bad_chunks; i++) {
        pms_map_opts_init(&o);
        o.chunk_size = bad_chunks[i];
        a = (void *)1;
        char what[64];
        snprintf(what, sizeof what, "chunk_size %" PRIu64, bad_chunks[i]);
        expect_err(pms_map(d, &o, &a, &len), EINVAL, "pms_map", what);
    }
    const int bad_modes[] = { -1, 3, 99, (int)0x80000000 };
    for (size_t i = 0; i < sizeof bad_modes / sizeof *bad_modes; i++) {
        pms_map_opts_init(&o);
        o.dirty_tracking = bad_modes[i];
        char what[64];
        snprintf(what, sizeof what, "dirty_tracking %d", bad_modes[i]);
        expect_err(pms_map(d, &o, &a, &len), EINVAL, "pms_map", what);
    }
    pms_map_opts_init(&o);
    o.mem_limit = 4096;      /* below four chunks */
    expect_err(pms_map(d, &o, &a, &len), EINVAL, "pms_map", "mem_limit below four chunks");
    expect_err(pms_map(d, NULL, NULL, &len), EINVAL, "pms_map", "NULL addrp");

    /* the device is still usable after every refusal; NULL lenp is allowed */
    uint8_t *p = map_ok(d, NULL, NULL, "NULL opts, NULL lenp");
    if (p) {
        CHECK(p[0] == 0x7e && p[(1 << 20) - 1] == 0x7e, "data wrong after refusals");
        a = (void *)1;
        len = 77;
        expect_err(pms_map(d, NULL, &a, &len), EBUSY, "pms_map", "map twice");
        CHECK(a == (void *)1 || a == p, "failed map changed *addrp to %p", a);
        p[5] = 0x01;
        API(pms_unmap(d));
        expect_err(pms_unmap(d), EINVAL, "pms_unmap", "unmap twice");
        expect_err(pms_persist(d, p, 1), EINVAL, "pms_persist", "persist after unmap");
    }
    /* remap: the store made it; odd chunk sizes work and agree */
    const uint64_t good_chunks[] = { 4096, 8192, 1 << 20, 2 << 20, 64ull << 20 };
    for (size_t i = 0; i < sizeof good_chunks / sizeof *good_chunks; i++) {
        pms_map_opts_init(&o);
        o.chunk_size = good_chunks[i];
        o.dirty_tracking = g_mode;
        p = map_ok(d, &o, &len, "good chunk size");
        if (!p)
            continue;
        CHECK(len == 1 << 20, "len %zu", len);
        CHECK(p[5] == 0x01 && p[4] == 0x7e && p[6 + i] == 0x7e && p[(1 << 20) - 1] == 0x7e,
              "chunk %" PRIu64 ": wrong data", good_chunks[i]);
        for (size_t k = 0; k < i; k++)
            CHECK(p[6 + k] == 0x02, "chunk %" PRIu64 ": earlier store lost", good_chunks[i]);
        p[6 + i] = 0x02;
        API(pms_unmap(d));
    }
    /* prefetch on */
    pms_map_opts_init(&o);
    o.prefetch = 1;
    o.dirty_tracking = g_mode;
    if ((p = map_ok(d, &o, &len, "prefetch"))) {
        CHECK(p[len - 1] == 0x7e, "prefetch: wrong data");
        API(pms_unmap(d));
    }
    API(pms_close(d));
    qio("qcow2", img, "read -P 0x01 5 1", "read -P 0x02 6 5", "read -P 0x7e 11 1048565", NULL);
    check_clean(img);
    return 0;
}

/* huge chunk sizes: a power of two >= a page, but larger than any image */
static int t_chunk_huge(void)
{
    char *img = P("h.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write -P 0x7e 0 1M' '%s' >/dev/null", img, img);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    const uint64_t huge[] = { 1ull << 40, 1ull << 62, 1ull << 63 };
    for (size_t i = 0; i < 3; i++) {
        struct pms_map_opts o;
        pms_map_opts_init(&o);
        o.chunk_size = huge[i];
        void *a = NULL;
        size_t len;
        int r = pms_map(d, &o, &a, &len);
        char what[64];
        snprintf(what, sizeof what, "chunk_size 2^%d", i == 0 ? 40 : i == 1 ? 62 : 63);
        if (r == 0) {
            uint8_t *p = a;
            CHECK(p[0] == 0x7e && p[len - 1] == 0x7e, "%s: wrong data", what);
            API(pms_unmap(d));
        } else
            expect_err2(r, EINVAL, ENOMEM, "pms_map", what);
    }
    API(pms_close(d));
    check_clean(img);
    return 0;
}

/* A caller built against an older header: opts->size covers a prefix only;
 * the fields past it must not be read (they are garbage, or not there). */
static int t_opts_size(void)
{
    char *img = P("os.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write -P 0x7e 0 1M' '%s' >/dev/null", img, img);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    const size_t prefixes[] = { offsetof(struct pms_map_opts, dirty_tracking),
                                offsetof(struct pms_map_opts, chunk_size),
                                offsetof(struct pms_map_opts, writeback_interval_ms),
                                offsetof(struct pms_map_opts, prefetch) };
    for (size_t i = 0; i < 4; i++) {
        union { struct pms_map_opts o; uint8_t b[sizeof(struct pms_map_opts)]; } u;
        memset(&u, 0xa5, sizeof u);     /* garbage past the prefix */
        u.o.size = prefixes[i];
        u.o.mem_limit = 0;
        if (prefixes[i] > offsetof(struct pms_map_opts, dirty_tracking))
            u.o.dirty_tracking = g_mode;
        if (prefixes[i] > offsetof(struct pms_map_opts, chunk_size))
            u.o.chunk_size = 0;
        if (prefixes[i] > offsetof(struct pms_map_opts, writeback_interval_ms))
            u.o.writeback_interval_ms = 0;
        void *a = NULL;
        size_t len = 0;
        int r = pms_map(d, &u.o, &a, &len);
        if (r < 0) {
            BAD("opts->size=%zu (older caller): pms_map failed: %s", prefixes[i], pms_errmsg());
            continue;
        }
        uint8_t *p = a;
        CHECK(p[0] == 0x7e && p[len - 1] == 0x7e, "older caller: wrong data");
        p[100] = 0x10 + (uint8_t)i;
        API(pms_unmap(d));
    }
    /* exactly-sized heap copy of the oldest struct: no read past it (ASan) */
    size_t sz = offsetof(struct pms_map_opts, dirty_tracking);
    uint8_t *ob = malloc(sz);
    memset(ob, 0, sz);
    memcpy(ob, &sz, sizeof sz);
    struct pms_map_opts *volatile o = (void *)ob;
    void *a;
    size_t len;
    if (pms_map(d, o, &a, &len) == 0)
        API(pms_unmap(d));
    else
        BAD("exact-size older opts: %s", pms_errmsg());
    free(ob);
    API(pms_close(d));
    check_clean(img);
    return 0;
}

/* pms_stats with a shorter (older) struct must not write past st->size */
static int t_stats_size(void)
{
    char *img = P("ss.qcow2");
    uint8_t *p;
    pms_dev *d = fresh_mapped(img, 0, &p);
    p[0] = 1;
    const size_t prefixes[] = { offsetof(struct pms_stats, faults) + 8,
                                offsetof(struct pms_stats, dirty_mode),
                                offsetof(struct pms_stats, io_errors),
                                offsetof(struct pms_stats, last_error) };
    for (size_t i = 0; i < 4; i++) {
        uint8_t buf[sizeof(struct pms_stats) + 64];
        memset(buf, 0xee, sizeof buf);
        struct pms_stats *st = (struct pms_stats *)buf;
        st->size = prefixes[i];
        API(pms_stats(d, st));
        for (size_t k = prefixes[i]; k < sizeof buf; k++)
            if (buf[k] != 0xee) {
                BAD("pms_stats with size %zu wrote byte %zu (past the caller's struct)",
                    prefixes[i], k);
                break;
            }
    }
    struct pms_stats st = { .size = sizeof st };
    API(pms_stats(d, &st));
    CHECK(st.dirty_mode == PMS_DIRTY_ASYNC_WP || st.dirty_mode == PMS_DIRTY_SYNC_WP,
          "dirty_mode %d", st.dirty_mode);
    CHECK(st.resident_pages >= 1 && st.faults >= 1, "stats: nothing faulted");
    API(pms_close(d));
    check_clean(img);
    return 0;
}

/* ---- persist ranges ------------------------------------------------------------- */

static int t_persist(void)
{
    char *img = P("p.qcow2");
    const size_t SZ = (256 << 10) + 512;
    MUST("qemu-img create -q -f qcow2 '%s' %zu", img, SZ);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    size_t len;
    uint8_t *p = map(d, &len, 3600000);   /* no background writeback */
    CHECK(len == SZ, "len %zu", len);
    expect_err(pms_persist(d, NULL, 0), EINVAL, "pms_persist", "NULL, 0");
    expect_err(pms_persist(d, NULL, 16), EINVAL, "pms_persist", "NULL, 16");
    API(pms_persist(d, p, 0));
    API(pms_persist(d, p + 5, 0));
    API(pms_persist(d, p + len, 0));
    expect_err(pms_persist(d, p + len, 1), EINVAL, "pms_persist", "one byte past the end");
    expect_err(pms_persist(d, p + len - 1, 2), EINVAL, "pms_persist", "straddles the end");
    expect_err(pms_persist(d, p - 1, 2), EINVAL, "pms_persist", "straddles the start");
    expect_err(pms_persist(d, p - PG, PG), EINVAL, "pms_persist", "page before");
    expect_err(pms_persist(d, p + len + PG, 10), EINVAL, "pms_persist", "fully after");
    expect_err(pms_persist(d, p + ((len + PG - 1) & ~(size_t)(PG - 1)), 1), EINVAL,
               "pms_persist", "after the last page");
    expect_err(pms_persist(d, p, SIZE_MAX), EINVAL, "pms_persist", "len SIZE_MAX");
    expect_err(pms_persist(d, p + 10, SIZE_MAX - 5), EINVAL, "pms_persist", "addr+len wraps");
    expect_err(pms_persist(d, (void *)(UINTPTR_MAX - 1), 4), EINVAL, "pms_persist", "top of address space");
    expect_err(pms_persist(d, p + 10, (size_t)0 - (uintptr_t)(p + 10)), EINVAL, "pms_persist",
               "addr+len == 0 (wraps exactly)");
    int x;
    expect_err(pms_persist(d, &x, sizeof x), EINVAL, "pms_persist", "unrelated stack address");

    /* unaligned ranges persist their covering pages */
    memset(p + 4090, 0x71, 10);               /* straddles pages 0 and 1 */
    memset(p + 3 * PG + 100, 0x72, 3000);     /* inside page 3 */
    memset(p + 9 * PG - 1, 0x73, 2 * PG + 2); /* pages 8..11 */
    memset(p + len - 3, 0x74, 3);             /* last partial page */
    API(pms_persist(d, p + 4095, 2));
    API(pms_persist(d, p + 3 * PG + 4000, 1));
    API(pms_persist(d, p + 9 * PG + 17, PG));  /* pages 9, 10: not 8, 11 */
    API(pms_persist(d, p + len - 1, 1));
    qio("qcow2", img, "read -P 0x71 4090 10", "read -P 0x72 12388 3000", "read -P 0x73 36864 4096",
        "read -P 0x73 40960 17", "read -P 0x74 262653 3", NULL);
    API(pms_persist(d, p + 8 * PG, 4 * PG));
    qio("qcow2", img, "read -P 0x73 36863 8194", NULL);
    /* the whole mapping, then again with nothing dirty */
    memset(p + 20 * PG, 0x75, 10 * PG);
    API(pms_persist(d, p, len));
    API(pms_persist(d, p, len));
    qio("qcow2", img, "read -P 0x75 81920 40960", NULL);
    struct pms_stats st = { .size = sizeof st };
    API(pms_stats(d, &st));
    CHECK(st.dirty_pages == 0, "dirty_pages %" PRIu64 " after persisting all", st.dirty_pages);
    API(pms_close(d));
    qio("qcow2", img, "read -P 0x71 4090 10", "read -P 0 0 4090", "read -P 0x75 81920 40960",
        "read -P 0x74 262653 3", "read -P 0 122880 139773", NULL);
    check_clean(img);
    return 0;
}

/* ---- snapshots while mapped --------------------------------------------------------- */

static int nsnaps(pms_dev *d)
{
    struct pms_snapshot_info *l;
    size_t n;
    if (pms_snapshot_list(d, &l, &n) < 0) {
        BAD("pms_snapshot_list: %s", pms_errmsg());
        return -1;
    }
    pms_snapshot_list_free(l, n);
    return (int)n;
}

static int t_snapnames(void)
{
    char *img = P("s.qcow2");
    uint8_t *p;
    pms_dev *d = fresh_mapped(img, 0, &p);
    memset(p, 0x11, 64 << 10);
    expect_err(pms_snapshot_create(d, ""), EINVAL, "pms_snapshot_create", "empty name");
    expect_err(pms_snapshot_create(d, NULL), EINVAL, "pms_snapshot_create", "NULL name");
    expect_err(pms_snapshot_create_ex(d, "", PMS_SNAP_QUIESCED), EINVAL, "pms_snapshot_create_ex", "empty name");
    expect_err(pms_snapshot_revert(d, ""), EINVAL, "pms_snapshot_revert", "empty name");
    expect_err(pms_snapshot_revert(d, NULL), EINVAL, "pms_snapshot_revert", "NULL name");
    expect_err(pms_snapshot_delete(d, ""), EINVAL, "pms_snapshot_delete", "empty name");
    expect_err(pms_snapshot_delete(d, NULL), EINVAL, "pms_snapshot_delete", "NULL name");
    CHECK(nsnaps(d) == 0, "a refused create made a snapshot");
    API(pms_snapshot_create(d, "A"));
    memset(p, 0x22, 64 << 10);
    expect_err(pms_snapshot_create(d, "A"), EEXIST, "pms_snapshot_create", "duplicate name");
    expect_err(pms_snapshot_create_ex(d, "A", PMS_SNAP_QUIESCED), EEXIST, "pms_snapshot_create_ex", "duplicate name");
    expect_err(pms_snapshot_create(d, "1"), EEXIST, "pms_snapshot_create", "name equal to an id");
    CHECK(nsnaps(d) == 1, "duplicate create changed the list");
    /* a failed revert leaves the mapping alone */
    expect_err(pms_snapshot_revert(d, "nope"), ENOENT, "pms_snapshot_revert", "unknown name");
    expect_err(pms_snapshot_delete(d, "nope"), ENOENT, "pms_snapshot_delete", "unknown name");
    CHECK(p[0] == 0x22 && p[(64 << 10) - 1] == 0x22, "failed revert changed the mapping");
    API(pms_snapshot_create_ex(d, "B", PMS_SNAP_QUIESCED));
    /* long names: 65535 bytes fits the qcow2 field; 65536 and 1 MiB do not */
    size_t big = 1 << 20;
    char *name = malloc(big + 1);
    memset(name, 'n', big);
    name[65535] = 0;
    memset(p + (128 << 10), 0x33, PG);
    API(pms_snapshot_create(d, name));
    name[65535] = 'n';
    name[65536] = 0;
    expect_err(pms_snapshot_create(d, name), EINVAL, "pms_snapshot_create", "65536-byte name");
    expect_err(pms_snapshot_revert(d, name), ENOENT, "pms_snapshot_revert", "65536-byte unknown name");
    expect_err(pms_snapshot_delete(d, name), ENOENT, "pms_snapshot_delete", "65536-byte unknown name");
    name[big] = 0;
    expect_err(pms_snapshot_create(d, name), EINVAL, "pms_snapshot_create", "1 MiB name");
    CHECK(nsnaps(d) == 3, "long-name creates: %d snapshots", nsnaps(d));
    /* revert by name and by id, while mapped */
    memset(p, 0x44, 64 << 10);
    API(pms_snapshot_revert(d, "A"));
    CHECK(p[0] == 0x11 && p[(64 << 10) - 1] == 0x11 && p[128 << 10] == 0,
          "after revert A: 0x%02x 0x%02x", p[0], p[128 << 10]);
    uint8_t b[4];
    API(pms_pread(d, b, 4, 100));
    CHECK(b[0] == 0x11 && b[3] == 0x11, "pread after revert");
    API(pms_snapshot_revert(d, "2"));      /* id of B */
    CHECK(p[0] == 0x22 && p[128 << 10] == 0, "after revert to id 2: 0x%02x", p[0]);
    name[65535] = 0;
    API(pms_snapshot_revert(d, name));
    CHECK(p[0] == 0x22 && p[128 << 10] == 0x33, "after revert long");
    API(pms_snapshot_delete(d, name));
    API(pms_snapshot_delete(d, "B"));
    expect_err(pms_snapshot_delete(d, "B"), ENOENT, "pms_snapshot_delete", "deleted twice");
    CHECK(nsnaps(d) == 1, "after deletes");
    /* stores after all this persist on close */
    memset(p + (256 << 10), 0x55, PG);
    API(pms_close(d));
    free(name);
    check_clean(img);
    qio("qcow2", img, "read -P 0x22 0 64k", "read -P 0x33 128k 4k", "read -P 0x55 256k 4k",
        "read -P 0 260k 764k", NULL);
    size_t n;
    uint8_t *s = oracle(img, "qcow2", "A", &n);
    CHECK(n == 1 << 20 && s[0] == 0x11 && s[65535] == 0x11 && s[65536] == 0 && s[128 << 10] == 0,
          "snapshot A per QEMU");
    free(s);
    CHECK(sh("qemu-img snapshot -l '%s' | grep -qw A", img) == 0, "qemu-img does not list A");
    return 0;
}

/* unknown flag bits of pms_snapshot_create_ex */
static int t_snapflags(void)
{
    char *img = P("sf.qcow2");
    uint8_t *p;
    pms_dev *d = fresh_mapped(img, 0, &p);
    p[0] = 1;
    expect_err(pms_snapshot_create_ex(d, "X", 0x80), EINVAL, "pms_snapshot_create_ex", "unknown flag 0x80");
    expect_err(pms_snapshot_create_ex(d, "Y", ~0u), EINVAL, "pms_snapshot_create_ex", "flags ~0");
    API(pms_close(d));
    check_clean(img);
    return 0;
}

/* Snapshot data while mapped, checked against qemu-img convert -l */
static int t_snapdata(void)
{
    char *img = P("sd.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' %d", img, (4 << 20) + 512);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    size_t len;
    uint8_t *p = map(d, &len, 50);
    memset(p, 0x11, len);
    API(pms_snapshot_create(d, "s1"));
    memset(p + PG, 0x22, len - PG);
    API(pms_pwrite(d, "\x99\x98", 2, len - 2));
    API(pms_snapshot_create(d, "s2"));
    memset(p, 0x33, 8 * PG);                 /* never persisted: revert drops it */
    API(pms_snapshot_revert(d, "s1"));
    CHECK(p[0] == 0x11 && p[len - 1] == 0x11, "revert s1");
    API(pms_write_zeroes(d, 3 * PG, 2 * PG));
    API(pms_close(d));
    check_clean(img);
    size_t n;
    uint8_t *s = oracle(img, "qcow2", "s2", &n);
    CHECK(n == len && s[0] == 0x11 && s[PG] == 0x22 && s[len - 3] == 0x22 &&
          s[len - 2] == 0x99 && s[len - 1] == 0x98, "snapshot s2 per QEMU");
    free(s);
    s = oracle(img, "qcow2", "s1", &n);
    for (size_t i = 0; i < n; i++)
        if (s[i] != 0x11) { BAD("snapshot s1 byte %zu = 0x%02x", i, s[i]); break; }
    free(s);
    qio("qcow2", img, "read -P 0x11 0 8k", "read -P 0 8k 12k", "read -P 0x11 20k 4174336", NULL);
    return 0;
}

/* Revert while mapped to a snapshot taken at another size.  DIR/rs.qcow2
 * and DIR/rg.qcow2 are prepared by the script: "small" at 1M (0x11) with the
 * image now 3M; "big" at 3M (0x22) with the image now 1M (0x33). */
static int revert_resized(const char *img, const char *snap, uint64_t snapsz, int pat, uint64_t cursz, int curpat)
{
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    size_t len;
    uint8_t *p = map(d, &len, 50);
    CHECK(len == cursz, "len %zu", len);
    p[0] = 0x44;                       /* dirty, discarded by a revert */
    int r = pms_snapshot_revert(d, snap);
    int reverted = r == 0;
    if (r < 0) {
        fprintf(stderr, "  revert to %s refused: %s\n", snap, pms_errmsg());
        expect_fail(r, "pms_snapshot_revert", "revert to another size");
        CHECK((uint64_t)pms_size(d) == cursz, "refused revert changed the size");
    } else {
        CHECK((uint64_t)pms_size(d) == snapsz, "size after revert %" PRId64, pms_size(d));
        catch_faults(1);
        if (sigsetjmp(g_jb, 1) == 0) {
            uint64_t n = snapsz < len ? snapsz : len;
            for (uint64_t i = 0; i < n; i++)
                if (p[i] != pat) { BAD("after revert to %s: byte %" PRIu64 " = 0x%02x", snap, i, p[i]); break; }
            memset(p + 8192, 0x55, 100);
            {
                uint8_t b[16];
                r = pms_pread(d, b, sizeof b, snapsz - sizeof b);
                if (r < 0)
                    BAD("pms_pread of the reverted image's last 16 bytes (size %" PRId64 "): %s",
                        pms_size(d), pms_errmsg());
                else
                    CHECK(b[15] == pat, "pread tail after revert");
            }
            /* the part of the mapping past the reverted size: no signal */
            if (n < len)
                for (uint64_t i = n; i < len; i += PG)
                    (void)*(volatile uint8_t *)(p + i);
        } else
            BAD("revert to %s: signal %d touching the mapping", snap, (int)g_sig);
        catch_faults(0);
    }
    r = pms_close(d);
    if (r < 0)
        BAD("pms_close after revert to %s: %s", snap, pms_errmsg());
    check_clean(img);
    char c1[128], c2[128];
    if (reverted) {
        snprintf(c1, sizeof c1, "read -P 0x%02x 0 8192", pat);
        snprintf(c2, sizeof c2, "read -P 0x%02x 8292 %" PRIu64, pat, snapsz - 8292);
        qio("qcow2", img, c1, "read -P 0x55 8192 100", c2, NULL);
        int64_t sz = -1;
        pms_dev *d2 = open_img(img, "qcow2", 1, 0);
        sz = pms_size(d2);
        pms_close(d2);
        CHECK((uint64_t)sz == snapsz, "size after reopen %" PRId64, sz);
    } else {
        snprintf(c1, sizeof c1, "read -P 0x44 0 1");
        snprintf(c2, sizeof c2, "read -P 0x%02x 1 %" PRIu64, curpat, cursz - 1);
        qio("qcow2", img, c1, c2, NULL);
    }
    return 0;
}

static int t_revert_size(void)
{
    revert_resized(P("rs.qcow2"), "small", 1 << 20, 0x11, 3 << 20, 0x11);
    revert_resized(P("rg.qcow2"), "big", 3 << 20, 0x22, 1 << 20, 0x33);
    return 0;
}

/* ---- block calls while mapped ---------------------------------------------------- */

/* A qcow2 image of SZ bytes filled with 0x5a by qemu-io, opened and mapped
 * (background writeback practically off). */
#define SZ ((size_t)(1 << 20) + 4608)
static pms_dev *mapped_5a(const char *img, uint8_t **pp)
{
    MUST("qemu-img create -q -f qcow2 '%s' %zu && qemu-io -f qcow2 -c 'write -P 0x5a 0 %zu' '%s' >/dev/null",
         img, SZ, SZ, img);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    size_t len;
    *pp = map(d, &len, 3600000);
    return d;
}

static int t_blockio(void)
{
    char *img = P("b.qcow2");
    uint8_t *p;
    pms_dev *d = mapped_5a(img, &p);
    uint8_t buf[8192];
    expect_err(pms_truncate(d, 2 << 20), EBUSY, "pms_truncate", "grow while mapped");
    expect_err(pms_truncate(d, 4096), EBUSY, "pms_truncate", "shrink while mapped");
    expect_err(pms_truncate(d, SZ), EBUSY, "pms_truncate", "same size while mapped");
    CHECK((size_t)pms_size(d) == SZ, "size changed");
    expect_err(pms_pread(d, buf, 2, SZ - 1), EINVAL, "pms_pread", "past the end");
    expect_err(pms_pread(d, buf, 1, SZ), EINVAL, "pms_pread", "at the end");
    expect_err(pms_pread(d, buf, 16, UINT64_MAX - 7), EINVAL, "pms_pread", "offset wraps");
    expect_err(pms_pwrite(d, buf, 16, UINT64_MAX - 7), EINVAL, "pms_pwrite", "offset wraps");
    expect_err(pms_pwrite(d, buf, SIZE_MAX, 16), EINVAL, "pms_pwrite", "len SIZE_MAX");
    expect_err(pms_write_zeroes(d, 2, SZ - 1), EINVAL, "pms_write_zeroes", "past the end");
    expect_err(pms_discard(d, 2, SZ - 1), EINVAL, "pms_discard", "past the end");
    API(pms_pread(d, buf, 0, SZ));
    API(pms_pwrite(d, buf, 0, SZ));
    API(pms_pread(d, buf, 1, SZ - 1));
    CHECK(buf[0] == 0x5a, "last byte");
    (void)p;
    API(pms_close(d));
    check_clean(img);
    return 0;
}

static int t_blockio2(void)
{
    char *img = P("b2.qcow2");
    uint8_t *p;
    pms_dev *d = mapped_5a(img, &p);
    static uint8_t buf[16384];
    memset(buf, 0x61, sizeof buf);
    expect_err(pms_pwrite(d, buf, sizeof buf, SZ - 100), EINVAL, "pms_pwrite", "straddles the end");
    CHECK(p[SZ - 1] == 0x5a, "a refused pwrite wrote");
    API(pms_pwrite(d, buf, 100, SZ - 100));
    API(pms_pwrite(d, buf, 3 * PG + 1, 5 * PG - 1));
    API(pms_write_zeroes(d, 1000, 100000));
    API(pms_discard(d, 64 << 10, 256 << 10));   /* advisory */
    memset(p + (512 << 10), 0x62, 10000);
    API(pms_flush(d));                           /* durable: all of it */
    qio("qcow2", img, "read -P 0x61 1053084 100", "read -P 0x61 20479 12289", "read -P 0 100000 1000",
        "read -P 0x62 512k 10000", "read -P 0x5a 1053083 1", NULL);
    /* pread sees stores, loads see pwrite */
    API(pms_pread(d, buf, 4, 512 << 10));
    CHECK(buf[0] == 0x62, "pread does not see a store");
    /* close while mapped persists and unmaps */
    memset(p + (700 << 10), 0x63, 5000);
    API(pms_pwrite(d, "\x64", 1, 0));
    API(pms_close(d));
    qio("qcow2", img, "read -P 0x63 700k 5000", "read -P 0x64 0 1", "read -P 0x5a 1 20478",
        "read -P 0x5a 32768 67232", NULL);
    check_clean(img);
    /* truncate works again once unmapped; a new map sees the new size */
    size_t len;
    d = open_img(img, "qcow2", 0, 0);
    p = map(d, &len, 0);
    API(pms_unmap(d));
    API(pms_truncate(d, SZ + 4096));
    p = map(d, &len, 0);
    CHECK(len == SZ + 4096 && p[len - 1] == 0 && p[SZ - 1] == 0x61, "map after grow");
    p[len - 1] = 0x65;
    API(pms_close(d));
    check_clean(img);
    qio("qcow2", img, "read -P 0x65 1057279 1", "read -P 0 1053184 4095", NULL);
    return 0;
}

#undef SZ

/* pms_pwrite from a buffer inside the mapping that overlaps the target */
static int t_overlap(void)
{
    char *img = P("ovl.qcow2");
    uint8_t *p;
    pms_dev *d = fresh_mapped(img, 0, &p);
    for (int i = 0; i < 8192; i++)
        p[i] = (uint8_t)i;
    API(pms_pwrite(d, p, 4096, 100));          /* memmove semantics expected */
    int ok = 1;
    for (int i = 0; i < 4096 && ok; i++)
        if (p[100 + i] != (uint8_t)i) { BAD("pwrite overlap: byte %d", i); ok = 0; }
    for (int i = 0; i < 8192; i++)
        p[i] = (uint8_t)i;
    API(pms_pread(d, p + 100, 4096, 0));
    for (int i = 0; i < 4096 && ok; i++)
        if (p[100 + i] != (uint8_t)i) { BAD("pread overlap: byte %d", i); ok = 0; }
    API(pms_close(d));
    check_clean(img);
    return 0;
}

/* ---- read-only device ------------------------------------------------------------- */

static int t_ro(void)
{
    char *img = P("ro.qcow2"), *copy = P("ro-copy.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' %d && qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' '%s' >/dev/null "
         "&& qemu-img snapshot -c S '%s' && cp '%s' '%s'", img, (1 << 20) + 512, img, img, img, copy);
    pms_dev *d = open_img(img, "qcow2", 1, 0);
    void *a;
    size_t len;
    struct pms_map_opts o;
    pms_map_opts_init(&o);
    o.dirty_tracking = g_mode;
    API(pms_map(d, &o, &a, &len));
    uint8_t *p = a;
    CHECK(p[0] == 0x5a && p[65535] == 0x5a && p[65536] == 0 && p[len - 1] == 0, "ro data");
    /* a store in a child: SIGSEGV or SIGBUS, never success */
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(10);
        signal(SIGSEGV, SIG_DFL);       /* not ASan's handler */
        signal(SIGBUS, SIG_DFL);
        ((volatile uint8_t *)p)[10] = 1;
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    CHECK(WIFSIGNALED(st) && (WTERMSIG(st) == SIGSEGV || WTERMSIG(st) == SIGBUS),
          "store to a read-only mapping: child %s %d", WIFSIGNALED(st) ? "signal" : "exit",
          WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    int r = pms_persist(d, p, len);
    if (r < 0)
        expect_fail(r, "pms_persist", "persist read-only");
    r = pms_flush(d);
    if (r < 0)
        expect_fail(r, "pms_flush", "flush read-only");
    uint8_t b[8] = { 0 };
    expect_err(pms_pwrite(d, b, 8, 0), EROFS, "pms_pwrite", "read-only");
    expect_err(pms_write_zeroes(d, 8, 0), EROFS, "pms_write_zeroes", "read-only");
    expect_err(pms_discard(d, 8, 0), EROFS, "pms_discard", "read-only");
    r = pms_truncate(d, 2 << 20);
    expect_err2(r, EBUSY, EROFS, "pms_truncate", "read-only mapped");
    expect_err(pms_snapshot_create(d, "T"), EROFS, "pms_snapshot_create", "read-only");
    expect_err(pms_snapshot_create_ex(d, "T", PMS_SNAP_QUIESCED), EROFS, "pms_snapshot_create_ex", "read-only");
    expect_err(pms_snapshot_revert(d, "S"), EROFS, "pms_snapshot_revert", "read-only");
    expect_err(pms_snapshot_delete(d, "S"), EROFS, "pms_snapshot_delete", "read-only");
    CHECK(nsnaps(d) == 1, "snapshot list read-only");
    struct pms_stats s = { .size = sizeof s };
    API(pms_stats(d, &s));
    CHECK(s.bytes_written_back == 0, "read-only wrote back %" PRIu64, s.bytes_written_back);
    API(pms_pread(d, b, 8, 65532));
    CHECK(b[0] == 0x5a && b[4] == 0, "ro pread");
    API(pms_unmap(d));
    API(pms_close(d));
    CHECK(sh("cmp -s '%s' '%s'", img, copy) == 0, "read-only map/close changed the file");
    check_clean(img);
    return 0;
}

/* ---- force share: a reader maps an image a writer has mapped ------------------------ */

static int t_share_reader(const char *img, int pat)
{
    /* a second writer is refused */
    pms_dev *d;
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    int r = pms_open(img, &o, &d);
    if (r == 0) {
        BAD("a second writable open of a mapped image succeeded");
        pms_close(d);
    } else
        expect_fail(r, "pms_open", "second writer");
    /* force_share without readonly is refused */
    o.force_share = 1;
    expect_err(pms_open(img, &o, &d), EINVAL, "pms_open", "force_share writable");
    d = open_img(img, "qcow2", 1, 1);
    size_t len;
    void *a;
    API(pms_map(d, NULL, &a, &len));
    uint8_t *p = a;
    for (size_t i = 0; i < 64 << 10; i++)
        if (p[i] != pat) { BAD("reader: byte %zu = 0x%02x, want 0x%02x", i, p[i], pat); break; }
    CHECK(p[len - 1] == 0, "reader tail");
    expect_err(pms_snapshot_create(d, "R"), EROFS, "pms_snapshot_create", "shared reader");
    API(pms_close(d));
    return g_bad ? 1 : 0;
}

static int t_share(const char *self)
{
    char *img = P("sh.qcow2");
    uint8_t *p;
    pms_dev *d = fresh_mapped(img, 3600000, &p);
    memset(p, 0x5e, 64 << 10);
    API(pms_persist(d, p, 64 << 10));
    /* a QEMU writer is refused, a shared QEMU reader sees the data */
    CHECK(sh("qemu-io -f qcow2 -c 'write -P 1 0 512' '%s' >/dev/null 2>&1", img) != 0,
          "qemu-io wrote to an image we have mapped");
    qio("qcow2", img, "read -P 0x5e 0 64k", NULL);
    CHECK(sh("'%s' share-reader '%s' 0x5e", self, D) == 0, "share reader (first)");
    memset(p, 0x6f, 64 << 10);
    API(pms_snapshot_create(d, "live"));
    CHECK(sh("'%s' share-reader '%s' 0x6f", self, D) == 0, "share reader (after snapshot)");
    API(pms_close(d));
    check_clean(img);
    qio("qcow2", img, "read -P 0x6f 0 64k", "read -P 0 64k 960k", NULL);
    return 0;
}

/* raw while mapped: no snapshots (ENOTSUP); a check-only handle cannot map */
static int t_rawsnap(void)
{
    char *img = P("rs.raw");
    MUST("truncate -s 1M '%s'", img);
    pms_dev *d = open_img(img, "raw", 0, 0);
    size_t len;
    uint8_t *p = map(d, &len, 0);
    p[0] = 0x77;
    expect_err(pms_snapshot_create(d, "a"), ENOTSUP, "pms_snapshot_create", "raw");
    expect_err(pms_snapshot_create_ex(d, "a", PMS_SNAP_QUIESCED), ENOTSUP, "pms_snapshot_create_ex", "raw");
    expect_err(pms_snapshot_revert(d, "a"), ENOTSUP, "pms_snapshot_revert", "raw");
    expect_err(pms_snapshot_delete(d, "a"), ENOTSUP, "pms_snapshot_delete", "raw");
    CHECK(nsnaps(d) == 0, "raw lists snapshots");
    API(pms_close(d));
    qio("raw", img, "read -P 0x77 0 1", "read -P 0 1 1048575", NULL);
    char *q = P("chk.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1M", q);
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.check = 1;
    API(pms_open(q, &o, &d));
    void *a;
    expect_err(pms_map(d, NULL, &a, &len), EPERM, "pms_map", "check-only handle");
    API(pms_close(d));
    check_clean(q);
    return 0;
}

/* Huge virtual sizes: map or refuse cleanly; the ends of the mapping work */
static int t_bigimg(void)
{
    const char *sizes[] = { "16T", "100T", "2000T" };
    for (int i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, "big%d.qcow2", i);
        char *img = P(name);
        MUST("qemu-img create -q -f qcow2 '%s' %s", img, sizes[i]);
        pms_dev *d = open_img(img, "qcow2", 0, 0);
        uint64_t size = (uint64_t)pms_size(d);
        struct pms_map_opts o;
        pms_map_opts_init(&o);
        o.dirty_tracking = g_mode;
        void *a;
        size_t len;
        int r = pms_map(d, &o, &a, &len);
        fprintf(stderr, "  %s: map %d %s\n", sizes[i], r, r < 0 ? pms_errmsg() : "");
        if (r < 0)
            expect_err2(r, ENOMEM, EFBIG, "pms_map", sizes[i]);
        else {
            uint8_t *p = a;
            CHECK(len == size, "len");
            CHECK(p[0] == 0 && p[len - 1] == 0, "ends not zero");
            p[len - 1] = 0x42;
            p[0] = 0x43;
            API(pms_persist(d, p + len - 1, 1));
            char c[128];
            snprintf(c, sizeof c, "read -P 0x42 %" PRIu64 " 1", size - 1);
            qio("qcow2", img, c, NULL);
        }
        API(pms_close(d));
        check_clean(img);
        if (r == 0)
            qio("qcow2", img, "read -P 0x43 0 1", NULL);
    }
    return 0;
}

/* PMS_DIRTY_AUTO under a memory cap: synchronous tracking when the cap keeps
 * at most 1/256 of the mapping resident (no page-table walks over a sparse
 * mapping), asynchronous (when the kernel has it) otherwise; an explicit
 * mode is kept.  Random page stores persisted under the sparse cap read back
 * through qemu-io. */
static int t_automode(void)
{
    char *img = P("am.qcow2");
    MUST("qemu-img create -q -f qcow2 '%s' 1G", img);
    pms_dev *d = open_img(img, "qcow2", 0, 0);
    struct { uint64_t cap; int mode; int want; const char *what; } c[] = {
        { 0, PMS_DIRTY_AUTO, -1, "no cap" },
        { 8ull << 20, PMS_DIRTY_AUTO, -1, "cap 1/128 of the mapping" },
        { 4ull << 20, PMS_DIRTY_AUTO, PMS_DIRTY_SYNC_WP, "cap 1/256 of the mapping" },
        { 4ull << 20, PMS_DIRTY_ASYNC_WP, PMS_DIRTY_ASYNC_WP, "explicit async, cap 1/256" },
    };
    int base = -1;             /* what auto picks without a cap */
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        struct pms_map_opts o;
        pms_map_opts_init(&o);
        o.mem_limit = c[i].cap;
        o.dirty_tracking = c[i].mode;
        size_t len;
        void *a;
        int r = pms_map(d, &o, &a, &len);
        if (r < 0 && c[i].mode == PMS_DIRTY_ASYNC_WP && base != PMS_DIRTY_ASYNC_WP)
            continue;          /* kernel without WP_ASYNC: refused, as documented */
        if (r < 0) {
            BAD("%s: pms_map failed: %s", c[i].what, pms_errmsg());
            continue;
        }
        struct pms_stats st = { .size = sizeof st };
        API(pms_stats(d, &st));
        if (i == 0)
            base = st.dirty_mode;
        int want = c[i].want < 0 ? base : c[i].want;
        CHECK(st.dirty_mode == want, "%s: dirty mode %d, want %d", c[i].what, st.dirty_mode, want);
        uint8_t *p = a;
        for (unsigned k = 0; k < 64; k++) {    /* pages 16 MiB apart, pattern per case */
            uint64_t off = (uint64_t)k * (16u << 20) + (uint64_t)i * 4096;
            memset(p + off, 0x30 + (int)i, 4096);
        }
        API(pms_persist(d, p, len));
        API(pms_unmap(d));
    }
    API(pms_close(d));
    check_clean(img);
    for (size_t i = 0; i < sizeof c / sizeof *c; i++)
        for (unsigned k = 0; k < 64; k += 21) {
            char cmd[96];
            snprintf(cmd, sizeof cmd, "read -P 0x%x %" PRIu64 " 4096", 0x30 + (unsigned)i,
                     (uint64_t)k * (16u << 20) + (uint64_t)i * 4096);
            if (i == 3 && base != PMS_DIRTY_ASYNC_WP)
                continue;
            qio("qcow2", img, cmd, NULL);
        }
    return 0;
}

/* ---- main ---------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s CASE DIR [MODE]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    D = argv[2];
    const char *mode = argc > 3 ? argv[3] : "auto";
    g_mode = strcmp(mode, "async") == 0 ? PMS_DIRTY_ASYNC_WP :
             strcmp(mode, "sync") == 0 ? PMS_DIRTY_SYNC_WP : PMS_DIRTY_AUTO;
    const char *c = argv[1];
    int r;
    if (strcmp(c, "share-reader") != 0)    /* share-reader: share's child */
        kfeat_need(mode);
    if (strcmp(c, "sizes1") == 0) r = t_sizes(1);
    else if (strcmp(c, "sizes2") == 0) r = t_sizes(2);
    else if (strcmp(c, "opts") == 0) r = t_opts();
    else if (strcmp(c, "chunk-huge") == 0) r = t_chunk_huge();
    else if (strcmp(c, "opts-size") == 0) r = t_opts_size();
    else if (strcmp(c, "stats-size") == 0) r = t_stats_size();
    else if (strcmp(c, "persist") == 0) r = t_persist();
    else if (strcmp(c, "snapnames") == 0) r = t_snapnames();
    else if (strcmp(c, "snapflags") == 0) r = t_snapflags();
    else if (strcmp(c, "snapdata") == 0) r = t_snapdata();
    else if (strcmp(c, "revert-size") == 0) r = t_revert_size();
    else if (strcmp(c, "blockio") == 0) r = t_blockio();
    else if (strcmp(c, "blockio2") == 0) r = t_blockio2();
    else if (strcmp(c, "overlap") == 0) r = t_overlap();
    else if (strcmp(c, "ro") == 0) r = t_ro();
    else if (strcmp(c, "bigimg") == 0) r = t_bigimg();
    else if (strcmp(c, "automode") == 0) r = t_automode();
    else if (strcmp(c, "rawsnap") == 0) r = t_rawsnap();
    else if (strcmp(c, "share") == 0) r = t_share(argv[0]);
    else if (strcmp(c, "share-reader") == 0) {
        char img[4096];
        snprintf(img, sizeof img, "%s/sh.qcow2", D);
        return t_share_reader(img, argc > 3 ? (int)strtol(argv[3], NULL, 0) : 0);
    } else {
        fprintf(stderr, "unknown case %s\n", c);
        return 2;
    }
    return r || g_bad ? 1 : 0;
}
