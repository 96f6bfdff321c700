/* QEMU's ways of naming an image, for `pmemsnap io` (qemu-io).
 *
 * qemu-io accepts block-layer options in three spellings, all reduced here
 * to one flat list of dotted keys ("file.filename", "file.image.driver"):
 *   - key=value lists: `open -o k=v,...`, `reopen -o ...` and the filename
 *     of `--image-opts` (",," is a literal comma, as QEMU's QemuOpts);
 *   - `json:{...}` filenames: nested objects flatten to dotted keys, array
 *     members to "key.N."; strings may use single quotes (QEMU's JSON
 *     parser accepts them), scalars keep their text;
 *   - `blkdebug:[CONFIG]:FILE` filenames (blkdebug node over FILE).
 * bo_resolve() then walks the node graph from the top: format drivers
 * (qcow2, raw) over protocol/filter nodes (file, host_device, blkdebug)
 * and yields what pms_open() can do — one format over one file.  Anything
 * else (a format over a format, error injection, other drivers) is refused
 * with a clear message rather than ignored.  blkdebug's request limits
 * (align, max-transfer, ...) change how QEMU splits requests, not what the
 * image holds, so they are accepted.
 *
 * Single threaded (the CLI); every function returns 0 or -1 with the
 * message in the caller's buffer.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "blkopts.h"

static int add(struct blkopts *o, const char *k, size_t klen, const char *v, size_t vlen)
{
    struct bo_kv *n = realloc(o->v, (o->n + 1) * sizeof *n);
    if (!n) return -1;
    o->v = n;
    n[o->n].key = strndup(k, klen);
    n[o->n].val = strndup(v, vlen);
    if (!n[o->n].key || !n[o->n].val) {
        free(n[o->n].key);
        free(n[o->n].val);
        return -1;
    }
    o->n++;
    return 0;
}

int bo_set(struct blkopts *o, const char *key, const char *val)
{
    for (size_t i = 0; i < o->n; i++)
        if (strcmp(o->v[i].key, key) == 0) {
            char *d = strdup(val);
            if (!d) return -1;
            free(o->v[i].val);
            o->v[i].val = d;
            return 0;
        }
    return add(o, key, strlen(key), val, strlen(val));
}

const char *bo_get(const struct blkopts *o, const char *key)
{
    for (size_t i = o->n; i-- > 0;)       /* the last one given wins */
        if (strcmp(o->v[i].key, key) == 0)
            return o->v[i].val;
    return NULL;
}

bool bo_has_prefix(const struct blkopts *o, const char *prefix)
{
    size_t l = strlen(prefix);
    for (size_t i = 0; i < o->n; i++)
        if (strncmp(o->v[i].key, prefix, l) == 0)
            return true;
    return false;
}

void bo_free(struct blkopts *o)
{
    for (size_t i = 0; i < o->n; i++) {
        free(o->v[i].key);
        free(o->v[i].val);
    }
    free(o->v);
    o->v = NULL;
    o->n = 0;
}

/* ---- key=value lists ------------------------------------------------------ */

int bo_parse_keyval(struct blkopts *o, const char *s, char *err, size_t errlen)
{
    while (*s) {
        const char *k = s;
        while (*s && *s != '=' && *s != ',') s++;
        size_t klen = (size_t)(s - k);
        if (*s != '=') {
            /* "flag" alone: QemuOpts reads it as flag=on ("noflag" = off) */
            if (klen == 0) { s++; continue; }
            if (add(o, k, klen, "on", 2) < 0) goto oom;
            if (*s) s++;
            continue;
        }
        s++;
        char *v = malloc(strlen(s) + 1);
        size_t vl = 0;
        if (!v) goto oom;
        while (*s) {
            if (*s == ',') {
                if (s[1] != ',') break;
                s++;               /* ",," is a literal comma */
            }
            v[vl++] = *s++;
        }
        int r = add(o, k, klen, v, vl);
        free(v);
        if (r < 0) goto oom;
        if (*s) s++;
    }
    return 0;
oom:
    snprintf(err, errlen, "%s", strerror(ENOMEM));
    return -1;
}

/* ---- json:{...} ---------------------------------------------------------- */

/* Nesting deeper than this is refused (recursion bound; QEMU's parser
 * stops at 1024, no real block graph is more than a few levels deep). */
#define JSON_MAX_DEPTH 64

struct jp {
    const char *s;
    struct blkopts *o;
    char *err;
    size_t errlen;
    int depth;
};

static void ws(struct jp *p)
{
    while (isspace((unsigned char)*p->s)) p->s++;
}

static int jerr(struct jp *p, const char *what)
{
    if (!p->err[0])
        snprintf(p->err, p->errlen, "Could not parse JSON: %s", what);
    return -1;
}

/* A string in '...' or "...": its unescaped text in *out (malloc'd). */
static int jstring(struct jp *p, char **out)
{
    char q = *p->s++;
    size_t cap = strlen(p->s) + 1, n = 0;
    char *b = malloc(cap);
    if (!b) return jerr(p, "out of memory");
    while (*p->s && *p->s != q) {
        char c = *p->s++;
        if (c == '\\') {
            c = *p->s++;
            switch (c) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case '\0': free(b); return jerr(p, "unterminated string");
            default: break;    /* \" \' \\ \/ ; \u is not needed here */
            }
        }
        b[n++] = c;
    }
    if (*p->s != q) { free(b); return jerr(p, "unterminated string"); }
    p->s++;
    b[n] = '\0';
    *out = b;
    return 0;
}

static int jvalue(struct jp *p, const char *key);

static int jmember_key(char **full, const char *prefix, const char *k)
{
    size_t l = strlen(prefix) + strlen(k) + 2;
    *full = malloc(l);
    if (!*full) return -1;
    snprintf(*full, l, "%s%s%s", prefix, *prefix ? "." : "", k);
    return 0;
}

static int jvalue(struct jp *p, const char *key)
{
    ws(p);
    char c = *p->s;
    if (c == '{' || c == '[') {
        bool obj = c == '{';
        if (++p->depth > JSON_MAX_DEPTH) return jerr(p, "nesting too deep");
        p->s++;
        ws(p);
        if (*p->s == (obj ? '}' : ']')) { p->s++; p->depth--; return 0; }
        for (int idx = 0;; idx++) {
            char *k = NULL, *full = NULL, num[16];
            ws(p);
            if (obj) {
                if (*p->s != '"' && *p->s != '\'') return jerr(p, "expected a key");
                if (jstring(p, &k) < 0) return -1;
                ws(p);
                if (*p->s++ != ':') { free(k); return jerr(p, "expected ':'"); }
            } else {
                snprintf(num, sizeof num, "%d", idx);
            }
            int r = jmember_key(&full, key, obj ? k : num);
            free(k);
            if (r < 0) return jerr(p, "out of memory");
            r = jvalue(p, full);
            free(full);
            if (r < 0) return -1;
            ws(p);
            if (*p->s == ',') { p->s++; continue; }
            if (*p->s == (obj ? '}' : ']')) { p->s++; p->depth--; return 0; }
            return jerr(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    if (c == '"' || c == '\'') {
        char *v;
        if (jstring(p, &v) < 0) return -1;
        int r = add(p->o, key, strlen(key), v, strlen(v));
        free(v);
        return r < 0 ? jerr(p, "out of memory") : 0;
    }
    const char *b = p->s;
    while (*p->s && (isalnum((unsigned char)*p->s) || strchr("+-.", *p->s))) p->s++;
    if (p->s == b) return jerr(p, "unexpected character");
    if (add(p->o, key, strlen(key), b, (size_t)(p->s - b)) < 0)
        return jerr(p, "out of memory");
    return 0;
}

int bo_parse_json(struct blkopts *o, const char *s, char *err, size_t errlen)
{
    struct jp p = { s, o, err, errlen, 0 };
    err[0] = '\0';
    ws(&p);
    if (*p.s != '{') return jerr(&p, "expected an object");
    if (jvalue(&p, "") < 0) return -1;
    ws(&p);
    if (*p.s) return jerr(&p, "trailing characters");
    return 0;
}

/* ---- filenames -------------------------------------------------------------- */

int bo_parse_filename(struct blkopts *o, const char *name, char *err, size_t errlen)
{
    if (strncmp(name, "json:", 5) == 0)
        return bo_parse_json(o, name + 5, err, errlen);
    if (strncmp(name, "blkdebug:", 9) == 0) {
        const char *c = name + 9, *colon = strchr(c, ':');
        const char *top = bo_get(o, "driver");
        bool here = top && strcmp(top, "blkdebug") == 0;
        if (!colon) {
            snprintf(err, errlen, "Invalid filename format");
            return -1;
        }
        if ((colon > c && add(o, here ? "config" : "file.config", here ? 6 : 11, c,
                              (size_t)(colon - c)) < 0) ||
            (!here && bo_set(o, "file.driver", "blkdebug") < 0) ||
            bo_set(o, here ? "image.filename" : "file.image.filename", colon + 1) < 0) {
            snprintf(err, errlen, "%s", strerror(ENOMEM));
            return -1;
        }
        return 0;
    }
    if (bo_set(o, "filename", name) < 0) {
        snprintf(err, errlen, "%s", strerror(ENOMEM));
        return -1;
    }
    return 0;
}

/* ---- resolution ------------------------------------------------------------- */

static bool is_format(const char *d)
{
    return strcmp(d, "qcow2") == 0 || strcmp(d, "raw") == 0;
}

/* A blkdebug config file: rules for events inside the engine cannot be
 * honoured, so they are refused; a rule on "cor_write" (copy-on-read
 * writes, which the tool makes) is taken into *t. */
static int blkdebug_config(const char *path, struct bo_target *t, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "Could not read blkdebug config file: %s", strerror(errno));
        return -1;
    }
    char line[256], section[64] = "", event[128] = "";
    int r = 0;
    int64_t sector = -1;
    int eno = EIO;
    bool once = false, any = false;
    for (bool more = true; more && r == 0;) {
        more = fgets(line, sizeof line, f) != NULL;
        char *l = line;
        while (more && isspace((unsigned char)*l)) l++;
        if (!more || *l == '[') {       /* end of a section: judge it */
            if (any && !strcmp(section, "inject-error") && !strcmp(event, "l2_update") &&
                !once && sector < 0) {
                t->l2_update_errno = eno;      /* the qcow2 driver's L2 write-back */
            } else if (any && (strcmp(section, "inject-error") || strcmp(event, "cor_write"))) {
                snprintf(err, errlen, "blkdebug error injection is not supported "
                         "(only on events cor_write and l2_update)");
                r = -1;
            } else if (any) {
                t->cor_rule = true;
                t->cor_sector = sector;
                t->cor_errno = eno;
                t->cor_once = once;
            }
            if (!more) break;
            any = true;
            sscanf(l, "[%63[^]]", section);
            event[0] = '\0';
            sector = -1;
            eno = EIO;
            once = false;
            continue;
        }
        char key[64], val[128];
        if (sscanf(l, "%63[^ =] = \"%127[^\"]\"", key, val) == 2 ||
            sscanf(l, "%63[^ =] = %127s", key, val) == 2) {
            if (!strcmp(key, "event")) snprintf(event, sizeof event, "%s", val);
            else if (!strcmp(key, "sector")) sector = strtoll(val, NULL, 0);
            else if (!strcmp(key, "errno")) eno = atoi(val);
            else if (!strcmp(key, "once")) once = !strcmp(val, "on");
        }
    }
    fclose(f);
    return r;
}

/* The node whose keys start with prefix ("" top, "file." ...). */
static int resolve_node(const struct blkopts *o, const char *prefix, struct bo_target *t,
                        bool below_format, char *err, size_t errlen)
{
    char k[256];
    if (strlen(prefix) > sizeof k - 32) {    /* keys would not fit: refuse */
        snprintf(err, errlen, "block graph too deep");
        return -1;
    }
    snprintf(k, sizeof k, "%sdriver", prefix);
    const char *drv = bo_get(o, k);
    snprintf(k, sizeof k, "%sfile.", prefix);
    bool children = bo_has_prefix(o, k);
    if ((drv && is_format(drv)) || (!drv && !*prefix && children)) {
        if (below_format) {
            snprintf(err, errlen, "nested image formats ('%s' over '%s') are not supported",
                     t->format, drv);
            return -1;
        }
        if (drv)
            t->format = drv;
        snprintf(k, sizeof k, "%sfile", prefix);
        const char *f = bo_get(o, k);
        if (f) { t->filename = f; return 0; }
        snprintf(k, sizeof k, "%sfile.", prefix);
        if (bo_has_prefix(o, k)) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s", k);
            return resolve_node(o, sub, t, true, err, errlen);
        }
        snprintf(k, sizeof k, "%sfilename", prefix);
        t->filename = bo_get(o, k);
        return 0;
    }
    if (drv && strcmp(drv, "blkdebug") == 0) {
        static const char *const bad[] = { "inject-error", "set-state" };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            char kd[sizeof k + 1];
            snprintf(k, sizeof k, "%s%s", prefix, bad[i]);
            snprintf(kd, sizeof kd, "%s.", k);
            if (bo_get(o, k) || bo_has_prefix(o, kd)) {
                snprintf(err, errlen, "blkdebug error injection is not supported");
                return -1;
            }
        }
        snprintf(k, sizeof k, "%sconfig", prefix);
        const char *conf = bo_get(o, k);
        if (conf && *conf && blkdebug_config(conf, t, err, errlen) < 0)
            return -1;
        snprintf(k, sizeof k, "%simage", prefix);
        const char *img = bo_get(o, k);
        if (img) { t->filename = img; return 0; }
        snprintf(k, sizeof k, "%simage.", prefix);
        char sub[256];
        snprintf(sub, sizeof sub, "%s", k);
        return resolve_node(o, sub, t, below_format, err, errlen);
    }
    if (drv && strcmp(drv, "compress") == 0) {
        /* QEMU's compress filter: over a format node, whose writes it makes
         * compressed (cluster aligned: the tool reads and merges the rest) */
        t->compress = true;
        char sub[256];
        snprintf(sub, sizeof sub, "%sfile.", prefix);
        if (!bo_has_prefix(o, sub)) {
            snprintf(err, errlen, "The compress filter needs a format node below it");
            return -1;
        }
        return resolve_node(o, sub, t, below_format, err, errlen);
    }
    if (drv && strcmp(drv, "copy-on-read") == 0) {
        t->cor = true;
        snprintf(k, sizeof k, "%sfile", prefix);
        const char *f = bo_get(o, k);
        if (f) { t->filename = f; return 0; }
        char sub[256];
        snprintf(sub, sizeof sub, "%sfile.", prefix);
        return resolve_node(o, sub, t, below_format, err, errlen);
    }
    if (drv && strcmp(drv, "file") && strcmp(drv, "host_device") &&
        strcmp(drv, "host_cdrom")) {
        snprintf(err, errlen, "Unknown driver '%s'", drv);
        return -1;
    }
    snprintf(k, sizeof k, "%sfilename", prefix);
    const char *fn = bo_get(o, k);
    if (!fn)                   /* the name given to the top passes down */
        fn = bo_get(o, "filename");
    if (drv && fn) {
        struct stat st;
        if (stat(fn, &st) == 0) {
            bool file = strcmp(drv, "file") == 0;
            if (file && !S_ISREG(st.st_mode) && !(S_ISDIR(st.st_mode) && !t->readonly)) {
                snprintf(err, errlen, "'file' driver requires '%s' to be a regular file", fn);
                return -1;
            }
            if (!file && !S_ISCHR(st.st_mode) && !S_ISBLK(st.st_mode) &&
                !(S_ISDIR(st.st_mode) && !t->readonly)) {
                snprintf(err, errlen, "'%s' driver requires '%s' to be either a character "
                         "or block device", drv, fn);
                return -1;
            }
            if (S_ISDIR(st.st_mode)) {
                snprintf(err, errlen, "Could not open '%s': %s", fn, strerror(EISDIR));
                return -1;
            }
            if (!file && !t->format)
                t->format = "raw";         /* a device: its bytes are the disk */
        }
    }
    if (!fn && below_format) {
        snprintf(err, errlen, "A block device must be specified for \"filename\"");
        return -1;
    }
    t->filename = fn;
    return 0;
}

int bo_resolve(const struct blkopts *o, struct bo_target *t, char *err, size_t errlen)
{
    err[0] = '\0';
    if (resolve_node(o, "", t, false, err, errlen) < 0)
        return -1;
    if (!t->filename)          /* a name given to a filter or format passes down */
        t->filename = bo_get(o, "filename");
    if (!t->filename) {
        snprintf(err, errlen, "A block device must be specified for \"filename\"");
        return -1;
    }
    return 0;
}
