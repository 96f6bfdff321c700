/* pmemsnap CLI helpers: errors, numbers, qemu-style formatting, open/close
 * and a JSON writer that reproduces QEMU 7.2's output byte for byte.
 *
 * QEMU prints JSON from a QDict: a 512-bucket hash table (tdb_hash) whose
 * iteration goes bucket by bucket, newest entry first inside a bucket.  The
 * pretty printer (qobject/json-writer.c) puts each member on its own line
 * indented by 4 per level, "key": value, and closes containers on a fresh
 * line.  We keep members in insertion order and sort at print time.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "util/size.h"
#include "block/block.h"
#include "pmemsnap.h"
#include "cli.h"

const char *progname = "pmemsnap";

/* "pmemsnap: MESSAGE" + tail on stderr, after whatever stdout holds.  The
 * message stays one line whatever it quotes (file names, arguments, library
 * text): control characters are printed escaped. */
static void __attribute__((format(printf, 1, 0), nonnull(1)))
vmsg(const char *fmt, va_list ap, const char *tail)
{
    char small[512], *buf = small;
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(small, sizeof small, fmt, aq);
    va_end(aq);
    if (n >= (int)sizeof small && (buf = malloc((size_t)n + 1)) != NULL)
        vsnprintf(buf, (size_t)n + 1, fmt, ap);
    else if (n < 0 || !buf) {
        buf = small;               /* truncated is better than nothing */
        if (n < 0) small[0] = '\0';
    }
    fflush(stdout);
    fprintf(stderr, "%s: ", progname);
    for (const unsigned char *p = (const unsigned char *)buf; *p; p++) {
        if (*p == '\n') fputs("\\n", stderr);
        else if (*p == '\r') fputs("\\r", stderr);
        else if (*p < 0x20 && *p != '\t') fprintf(stderr, "\\x%02x", *p);
        else fputc(*p, stderr);
    }
    fputs(tail, stderr);
    if (buf != small)
        free(buf);
}

void errorf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmsg(fmt, ap, "\n");
    va_end(ap);
}

int usage_error(const char *fmt, ...)
{
    char tail[64];
    snprintf(tail, sizeof tail, " (try '%s --help')\n", progname);
    va_list ap;
    va_start(ap, fmt);
    vmsg(fmt, ap, tail);
    va_end(ap);
    return 1;
}

int getopt_error(const char *cmd, int ch, char **argv, const struct option *lo)
{
    /* Long-option errors consume their whole argv element and leave the
     * option's val in optopt (0 when unknown); short ones leave the char. */
    const char *arg = optind > 0 ? argv[optind - 1] : "";
    if (strncmp(arg, "--", 2) == 0 && arg[2]) {
        size_t n = strcspn(arg + 2, "=");
        for (const struct option *o = lo; o && o->name; o++)
            if (o->val == optopt && strncmp(o->name, arg + 2, n) == 0)
                return ch == ':'
                    ? usage_error("%s: option '--%s' requires an argument", cmd, o->name)
                    : usage_error("%s: option '--%s' doesn't allow an argument", cmd, o->name);
        if (optopt == 0)
            return usage_error("%s: unrecognized option '%s'", cmd, arg);
    }
    if (optopt <= 0 || optopt > 0xff)
        return usage_error("%s: invalid option", cmd);
    return ch == ':' ? usage_error("%s: option requires an argument -- '%c'", cmd, optopt)
                     : usage_error("%s: invalid option -- '%c'", cmd, optopt);
}

const char *libmsg(void)
{
    const char *m = pms_errmsg();
    /* drop the "pms_func: " prefix the API layer adds */
    if (strncmp(m, "pms_", 4) == 0) {
        const char *c = strstr(m, ": ");
        if (c && !memchr(m, ' ', (size_t)(c - m)))
            m = c + 2;
    }
    return *m ? m : "unknown error";
}

int parse_size(const char *s, uint64_t *out)
{
    return pms_parse_size(s, out) < 0 ? -1 : 0;
}

int parse_uint(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

void size_to_str(uint64_t v, char *buf, size_t len)
{
    static const char *suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
    int i;
    frexp((double)v / (1000.0 / 1024.0), &i);
    i = (i - 1) / 10;
    if (i < 0) i = 0;
    if (i > 6) i = 6;
    uint64_t div = 1ULL << (i * 10);
    snprintf(buf, len, "%0.3g %sB", (double)v / (double)div, suffixes[i]);
}

void cvtstr(double v, char *buf, size_t len)
{
    static const struct { double f; const char *s; } u[] = {
        { 1152921504606846976.0, " EiB" }, { 1125899906842624.0, " PiB" },
        { 1099511627776.0, " TiB" }, { 1073741824.0, " GiB" },
        { 1048576.0, " MiB" }, { 1024.0, " KiB" },
    };
    const char *suffix = " bytes";
    size_t room = len - 6;
    int done = 0;
    for (size_t k = 0; k < sizeof u / sizeof u[0]; k++)
        if (v >= u[k].f) {
            snprintf(buf, len - 4, "%.3f", v / u[k].f);
            suffix = u[k].s;
            done = 1;
            break;
        }
    if (!done)
        snprintf(buf, room, "%f", v);
    char *trim = strstr(buf, ".000");
    if (trim)
        strcpy(trim, suffix);
    else
        strcat(buf, suffix);
}

int parse_cache_mode(const char *s, int *mode)
{
    static const struct { const char *n; int m; } t[] = {
        { "writeback", PMS_CACHE_WRITEBACK }, { "none", PMS_CACHE_NONE },
        { "off", PMS_CACHE_NONE }, { "writethrough", PMS_CACHE_WRITETHROUGH },
        { "unsafe", PMS_CACHE_UNSAFE }, { "directsync", PMS_CACHE_DIRECTSYNC },
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strcmp(s, t[i].n) == 0) {
            *mode = t[i].m;
            return 0;
        }
    return -1;
}

int parse_output(const char *s)
{
    if (strcmp(s, "human") == 0) return 0;
    if (strcmp(s, "json") == 0) return 1;
    errorf("--output must be used with human or json as argument.");
    return -1;
}

bool open_for_check;

pms_dev *open_quiet(const char *path, const char *fmt, bool readonly, int cache_mode,
                    bool no_backing, bool force_share)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.check = open_for_check;
    o.readonly = readonly;
    o.format = fmt;
    o.cache_mode = cache_mode;
    o.no_backing = no_backing;
    o.force_share = force_share;
    pms_dev *dev = NULL;
    if (pms_open(path, &o, &dev) < 0)
        return NULL;
    return dev;
}

pms_dev *open_image(const char *path, const char *fmt, bool readonly,
                    int cache_mode, bool no_backing, bool force_share)
{
    if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
        errorf("Unknown file format '%s'", fmt);
        return NULL;
    }
    pms_dev *dev = open_quiet(path, fmt, readonly, cache_mode, no_backing, force_share);
    if (!dev)
        errorf("Could not open '%s': %s", path, libmsg());
    return dev;
}

int close_image(pms_dev *dev)
{
    if (pms_close(dev) < 0) {
        errorf("%s", libmsg());
        return -1;
    }
    return 0;
}

int close_after(pms_dev *dev, int rc)
{
    if (rc) {
        pms_close(dev);
        return rc;
    }
    return close_image(dev) < 0 ? 1 : 0;
}

int target_in_use(const char *path)
{
    if (bdev_file_busy(path) == 0)
        return 0;
    errorf("%s: Failed to get \"write\" lock: is another process using the image?", path);
    return 1;
}

int64_t host_allocated(const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return -1;
    return (int64_t)st.st_blocks * 512;
}

/* ---- JSON ---------------------------------------------------------------- */

struct jval {
    enum jtype type;
    char *key;
    char *s;
    int64_t i;
    bool b;
    struct jval **kids;
    size_t n, cap;
    size_t seq;                 /* insertion order */
};

static struct jval *jnew(enum jtype t)
{
    struct jval *v = calloc(1, sizeof *v);
    if (!v) { errorf("out of memory"); exit(1); }
    v->type = t;
    return v;
}
struct jval *jobj(void) { return jnew(J_OBJ); }
struct jval *jarr(void) { return jnew(J_ARR); }
struct jval *jstr(const char *s)
{
    struct jval *v = jnew(J_STR);
    v->s = strdup(s ? s : "");
    return v;
}
struct jval *jint(int64_t i) { struct jval *v = jnew(J_INT); v->i = i; return v; }
struct jval *jbool(bool b) { struct jval *v = jnew(J_BOOL); v->b = b; return v; }

struct jval *jadd(struct jval *p, const char *key, struct jval *v)
{
    if (p->n == p->cap) {
        p->cap = p->cap ? p->cap * 2 : 8;
        p->kids = realloc(p->kids, p->cap * sizeof *p->kids);
        if (!p->kids) { errorf("out of memory"); exit(1); }
    }
    if (key)
        v->key = strdup(key);
    v->seq = p->n;
    p->kids[p->n++] = v;
    return v;
}

void jfree(struct jval *v)
{
    if (!v) return;
    for (size_t k = 0; k < v->n; k++)
        jfree(v->kids[k]);
    free(v->kids);
    free(v->key);
    free(v->s);
    free(v);
}

/* QEMU qobject/qdict.c: tdb_hash() % QDICT_BUCKET_MAX */
static unsigned qdict_bucket(const char *name)
{
    unsigned value, i;
    for (value = 0x238F13AFu * (unsigned)strlen(name), i = 0; name[i]; i++)
        value = value + ((unsigned)((const unsigned char *)name)[i] << (i * 5 % 24));
    return (1103515243u * value + 12345u) % 512u;
}

static int qdict_cmp(const void *a, const void *b)
{
    const struct jval *x = *(struct jval *const *)a, *y = *(struct jval *const *)b;
    unsigned hx = qdict_bucket(x->key), hy = qdict_bucket(y->key);
    if (hx != hy)
        return hx < hy ? -1 : 1;
    return x->seq > y->seq ? -1 : 1;     /* newest first */
}

struct jw { FILE *f; int depth; bool need_comma; bool started; };

static void jquote(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    fputc('"', f);
    while (*p) {
        unsigned cp = *p;
        int n = 1;
        if (cp >= 0x80) {               /* decode UTF-8, invalid -> U+FFFD */
            int need = cp >= 0xF0 ? 3 : cp >= 0xE0 ? 2 : cp >= 0xC0 ? 1 : -1;
            if (need < 0) { cp = 0xFFFD; }
            else {
                cp &= 0x3Fu >> need;
                for (int k = 1; k <= need; k++) {
                    if ((p[k] & 0xC0) != 0x80) { cp = 0xFFFD; n = k; goto emit; }
                    cp = (cp << 6) | (p[k] & 0x3F);
                }
                n = need + 1;
            }
        }
    emit:
        switch (cp) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (cp > 0xFFFF)
                fprintf(f, "\\u%04X\\u%04X", 0xD800 + ((cp - 0x10000) >> 10),
                        0xDC00 + ((cp - 0x10000) & 0x3FF));
            else if (cp < 0x20 || cp >= 0x7F)
                fprintf(f, "\\u%04X", cp);
            else
                fputc((int)cp, f);
        }
        p += n;
    }
    fputc('"', f);
}

static void jnewline(struct jw *w) { fprintf(w->f, "\n%*s", 4 * w->depth, ""); }

static void jemit(struct jw *w, const struct jval *v, bool in_obj)
{
    if (w->need_comma) {
        fputc(',', w->f);
        jnewline(w);
    } else {
        if (w->started)
            jnewline(w);
        w->need_comma = true;
    }
    w->started = true;
    if (in_obj) {
        jquote(w->f, v->key);
        fputs(": ", w->f);
    }
    switch (v->type) {
    case J_STR: jquote(w->f, v->s); break;
    case J_INT: fprintf(w->f, "%" PRId64, v->i); break;
    case J_BOOL: fputs(v->b ? "true" : "false", w->f); break;
    case J_OBJ:
    case J_ARR: {
        struct jval **kids = malloc((v->n ? v->n : 1) * sizeof *kids);
        if (!kids) { errorf("out of memory"); exit(1); }
        memcpy(kids, v->kids, v->n * sizeof *kids);
        if (v->type == J_OBJ)
            qsort(kids, v->n, sizeof *kids, qdict_cmp);
        fputc(v->type == J_OBJ ? '{' : '[', w->f);
        w->depth++;
        w->need_comma = false;
        for (size_t k = 0; k < v->n; k++)
            jemit(w, kids[k], v->type == J_OBJ);
        w->depth--;
        jnewline(w);
        fputc(v->type == J_OBJ ? '}' : ']', w->f);
        w->need_comma = true;
        free(kids);
        break;
    }
    }
}

void jprint(FILE *f, const struct jval *v)
{
    struct jw w = { .f = f };
    jemit(&w, v, false);
    fputc('\n', f);
}

void print_qcow2_specific(const struct pms_info *info)
{
    /* same order as the QDict dump in qemu-img */
    printf("Format specific information:\n");
    printf("    compat: %s\n", info->qcow2_version >= 3 ? "1.1" : "0.10");
    printf("    compression type: %s\n",
           info->compression_type[0] ? info->compression_type : "zlib");
    if (info->qcow2_version >= 3)
        printf("    lazy refcounts: %s\n", info->lazy_refcounts ? "true" : "false");
    printf("    refcount bits: %d\n", info->refcount_bits);
    if (info->qcow2_version >= 3)
        printf("    corrupt: %s\n    extended l2: %s\n",
               info->corrupt ? "true" : "false", info->extended_l2 ? "true" : "false");
}
