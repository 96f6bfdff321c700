/* qemu-img compatible image commands: create, info, check, snapshot, map,
 * convert.
 *
 * Output formats and exit codes are those of qemu-img 7.2 (see the test
 * suite tests/cli, which diffs against the real tool).  JSON goes through
 * the QDict-ordered writer in util.c; human output is printf-identical.
 * Images are opened read-only unless the command modifies them (check -r,
 * snapshot -c/-a/-d, convert's target).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "cli.h"
#include "util/buf.h"
#include "util/size.h"

/* Deepest backing chain followed (as the qcow2 driver's QCOW2_MAX_CHAIN_DEPTH:
 * external snapshots make one layer each). */
#define MAX_CHAIN 257               /* images: the top one and 256 backing files */

enum { OPT_OUTPUT = 256, OPT_START, OPT_MAXLEN, OPT_IMAGE_OPTS, OPT_CHAIN };

static int one_file(int argc, int optind_, const char **file)
{
    if (optind_ != argc - 1)
        return usage_error("Expecting one image file name");
    *file = NULL;
    return 0;
}

/* qemu's path_combine(): a relative backing name is relative to the
 * directory of the image that names it. */
static char *path_combine(const char *base, const char *name)
{
    if (name[0] == '/' || !strrchr(base, '/'))
        return strdup(name);
    size_t dl = (size_t)(strrchr(base, '/') - base) + 1;
    char *r = malloc(dl + strlen(name) + 1);
    if (!r) return NULL;
    memcpy(r, base, dl);
    strcpy(r + dl, name);
    return r;
}

/* ---- create option parsing (shared with convert) -------------------------- */

struct copts {
    struct pms_create_opts o;
    bool is_raw;
    bool has_size;
    uint64_t size;
    const char *compat;          /* as given */
    const char *prealloc;
    bool bad_prealloc;           /* refused after the "Formatting" line, as qemu-img */
    bool has_lazy, has_ext, has_cs, has_rb;
};

static int parse_bool_opt(const char *k, const char *v, int *out)
{
    if (strcmp(v, "on") == 0 || strcmp(v, "yes") == 0 || strcmp(v, "true") == 0) {
        *out = 1;
        return 0;
    }
    if (strcmp(v, "off") == 0 || strcmp(v, "no") == 0 || strcmp(v, "false") == 0) {
        *out = 0;
        return 0;
    }
    errorf("Parameter '%s' expects 'on' or 'off'", k);
    return -1;
}

static void print_create_help(bool raw)
{
    printf("Supported options:\n");
    if (!raw)
        printf("  backing_file=<str>     - File name of a base image\n"
               "  backing_fmt=<str>      - Image format of the base image\n"
               "  cluster_size=<size>    - qcow2 cluster size\n"
               "  compat=<str>           - Compatibility level (0.10 or 1.1)\n"
               "  compression_type=<str> - Compression method used for image cluster compression\n"
               "  extended_l2=<bool (on/off)> - Extended L2 tables\n"
               "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n");
    printf("  preallocation=<str>    - Preallocation mode (allowed values: %s)\n",
           raw ? "off, falloc, full" : "off, metadata, falloc, full");
    if (!raw)
        printf("  refcount_bits=<num>    - Width of a reference count entry in bits\n");
    printf("  size=<size>            - Virtual disk size\n");
}

/* Parse one -o string into c (may be called several times).  Returns 0,
 * 1 for "help" (printed), -1 on error (printed). */
static int parse_copts(struct copts *c, char *s, const char *file)
{
    /* qemu_opts_parse(): an empty list or an empty element is an error */
    size_t sl = strlen(s);
    if (sl == 0 || s[0] == ',' || s[sl - 1] == ',') {
        errorf("Invalid option list: %s", s);
        return -1;
    }
    char *save = NULL;
    for (char *kv = strtok_r(s, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *v = strchr(kv, '=');
        if (strcmp(kv, "help") == 0 || strcmp(kv, "?") == 0) {
            print_create_help(c->is_raw);
            return 1;
        }
        if (!v) {
            errorf("%s: Invalid parameter '%s'", file, kv);
            return -1;
        }
        *v++ = '\0';
        bool qcow_only = true;
        uint64_t n;
        if (strcmp(kv, "size") == 0) {
            qcow_only = false;
            if (parse_size(v, &n) < 0) {
                errorf("Parameter 'size' expects a non-negative number below 2^64");
                return -1;
            }
            if (n > INT64_MAX) {
                errorf("Invalid image size specified. Must be between 0 and %" PRId64 ".",
                       INT64_MAX);
                return -1;
            }
            c->has_size = true;
            c->size = n;
        } else if (strcmp(kv, "preallocation") == 0) {
            static const char *const modes[] = {
                [PMS_PREALLOC_OFF] = "off", [PMS_PREALLOC_METADATA] = "metadata",
                [PMS_PREALLOC_FALLOC] = "falloc", [PMS_PREALLOC_FULL] = "full",
            };
            qcow_only = false;
            c->prealloc = v;
            c->bad_prealloc = true;
            for (int m = PMS_PREALLOC_OFF; m <= PMS_PREALLOC_FULL; m++)
                if (strcmp(v, modes[m]) == 0) {
                    c->o.preallocation = m;
                    c->bad_prealloc = false;
                }
        } else if (c->is_raw) {
            errorf("%s: Invalid parameter '%s'", file, kv);
            return -1;
        } else if (strcmp(kv, "cluster_size") == 0) {
            if (parse_size(v, &n) < 0) {
                errorf("Parameter 'cluster_size' expects a size");
                return -1;
            }
            if (n < 512 || n > (2u << 20) || (n & (n - 1))) {
                errorf("%s: Cluster size must be a power of two between 512 and 2048k", file);
                return -1;
            }
            c->o.cluster_size = n;
            c->has_cs = true;
        } else if (strcmp(kv, "extended_l2") == 0) {
            if (parse_bool_opt(kv, v, &c->o.extended_l2) < 0) return -1;
            c->has_ext = true;
        } else if (strcmp(kv, "refcount_bits") == 0) {
            if (parse_uint(v, &n) < 0) {
                errorf("Parameter 'refcount_bits' expects a non-negative number below 2^64");
                return -1;
            }
            if (n == 0 || n > 64 || (n & (n - 1))) {
                errorf("%s: Refcount width must be a power of two and may not exceed 64 bits",
                       file);
                return -1;
            }
            c->o.refcount_bits = (int)n;
            c->has_rb = true;
        } else if (strcmp(kv, "compat") == 0) {
            if (strcmp(v, "0.10") == 0 || strcmp(v, "v2") == 0)
                c->o.compat_v2 = 1;
            else if (strcmp(v, "1.1") == 0 || strcmp(v, "v3") == 0)
                c->o.compat_v2 = 0;
            else {
                errorf("%s: Invalid parameter value for 'compat': '%s'", file, v);
                return -1;
            }
            c->compat = v;
        } else if (strcmp(kv, "backing_file") == 0) {
            c->o.backing_file = v;
        } else if (strcmp(kv, "backing_fmt") == 0) {
            c->o.backing_format = v;
        } else if (strcmp(kv, "lazy_refcounts") == 0) {
            if (parse_bool_opt(kv, v, &c->o.lazy_refcounts) < 0) return -1;
            c->has_lazy = true;
        } else if (strcmp(kv, "compression_type") == 0) {
            if (strcmp(v, "zlib") != 0 && strcmp(v, "zstd") != 0) {
                errorf("%s: Parameter 'compression-type' does not accept value '%s'", file, v);
                return -1;
            }
            c->o.compression_type = v;
        } else {
            errorf("%s: Invalid parameter '%s'", file, kv);
            return -1;
        }
        (void)qcow_only;
    }
    return 0;
}

/* Checks between options, once every -o is parsed (qemu-img's wording). */
static int check_copts(const struct copts *c, const char *file)
{
    if (c->is_raw)
        return 0;
    if (c->o.compat_v2 && c->o.lazy_refcounts) {
        errorf("%s: Lazy refcounts only supported with compatibility level 1.1 and above "
               "(use version=v3 or greater)", file);
        return -1;
    }
    if (c->o.compat_v2 && c->o.compression_type && strcmp(c->o.compression_type, "zlib")) {
        errorf("%s: Non-zlib compression type is only supported with compatibility level 1.1 "
               "and above (use version=v3 or greater)", file);
        return -1;
    }
    return 0;
}

static void print_formatting(const char *file, const struct copts *c, uint64_t size)
{
    if (c->is_raw) {
        printf("Formatting '%s', fmt=raw size=%" PRIu64 "%s%s\n", file, size,
               c->prealloc ? " preallocation=" : "", c->prealloc ? c->prealloc : "");
        return;
    }
    const struct pms_create_opts *o = &c->o;
    printf("Formatting '%s', fmt=qcow2 cluster_size=%" PRIu64 " extended_l2=%s", file,
           o->cluster_size, o->extended_l2 ? "on" : "off");
    if (c->prealloc)
        printf(" preallocation=%s", c->prealloc);
    printf(" compression_type=%s size=%" PRIu64,
           o->compression_type ? o->compression_type : "zlib", size);
    if (c->compat)
        printf(" compat=%s", c->compat);
    if (o->backing_file)
        printf(" backing_file=%s", o->backing_file);
    if (o->backing_format)
        printf(" backing_fmt=%s", o->backing_format);
    printf(" lazy_refcounts=%s refcount_bits=%d\n", o->lazy_refcounts ? "on" : "off",
           o->refcount_bits);
}

/* Size of the backing image named by a new image at `file`, or -1. */
static int64_t backing_size(const char *file, const char *backing, const char *fmt)
{
    char *full = path_combine(file, backing);
    if (!full) return -1;
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = 1;
    o.format = fmt;
    o.no_backing = 1;
    pms_dev *d = NULL;
    int64_t sz = -1;
    if (pms_open(full, &o, &d) < 0)
        errorf("%s: Could not open backing image '%s': %s", file, full, libmsg());
    else {
        sz = pms_size(d);
        pms_close(d);
    }
    free(full);
    return sz;
}

/* qemu-img's cvtnum(NAME, ARG): a size from 0 to INT64_MAX, in its words */
static int cvtnum(const char *name, const char *arg, uint64_t *out)
{
    int r = pms_parse_size(arg, out);
    if (r < 0 && r != -ERANGE) {
        errorf("Invalid %s specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
               "megabytes, gigabytes, terabytes, petabytes and exabytes.", name);
        return -1;
    }
    if (r < 0 || *out > INT64_MAX) {
        errorf("Invalid %s specified. Must be between 0 and %" PRId64 ".", name, INT64_MAX);
        return -1;
    }
    return 0;
}

int cmd_create(int argc, char **argv)
{
    static const struct option lo[] = {
        { "help", no_argument, NULL, 'h' },
        { "object", required_argument, NULL, 'O' + 1000 },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = "qcow2", *backing = NULL, *bfmt = NULL;
    char *optstrs[64];
    int nopts = 0, quiet = 0, unsafe = 0, ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":f:o:b:F:uqh", lo, NULL)) != -1) {
        switch (ch) {
        case 'f': fmt = optarg; break;
        case 'o':
            if (nopts == 64) return usage_error("too many -o options");
            optstrs[nopts++] = optarg;
            break;
        case 'b': backing = optarg; break;
        case 'F': bfmt = optarg; break;
        case 'u': unsafe = 1; break;
        case 'q': quiet = 1; break;
        case ':':
        default: return getopt_error("create", ch, argv, lo);
        }
    }
    if (strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
        errorf("Unknown file format '%s'", fmt);
        return 1;
    }
    /* -o help lists the options without a file name, as qemu-img's does */
    for (int i = 0; i < nopts && optind >= argc; i++) {
        struct copts h;
        memset(&h, 0, sizeof h);
        pms_create_opts_init(&h.o);
        h.is_raw = strcmp(fmt, "raw") == 0;
        if (strcmp(optstrs[i], "help") == 0 || strcmp(optstrs[i], "?") == 0)
            return parse_copts(&h, optstrs[i], "") > 0 ? 0 : 1;
    }
    if (optind >= argc)
        return usage_error("Expecting image file name");
    if (argc - optind > 2)
        return usage_error("Unexpected argument: %s", argv[optind + 2]);
    const char *file = argv[optind];

    struct copts c;
    memset(&c, 0, sizeof c);
    pms_create_opts_init(&c.o);
    c.is_raw = strcmp(fmt, "raw") == 0;
    c.o.format = c.is_raw ? "raw" : "qcow2";
    /* qemu-img reads the size argument before the -o list */
    uint64_t size_arg = 0;
    bool has_size_arg = optind + 1 < argc;
    if (has_size_arg && cvtnum("image size", argv[optind + 1], &size_arg) < 0)
        return 1;
    for (int i = 0; i < nopts; i++) {
        /* parsed in place: option values point into argv */
        int r = parse_copts(&c, optstrs[i], file);
        if (r != 0)
            return r > 0 ? 0 : 1;
    }
    if (has_size_arg && c.has_size) {
        errorf("%s: The image size must be specified only once", file);
        return 1;
    }
    if (has_size_arg) {
        c.size = size_arg;
        c.has_size = true;
    }
    if (check_copts(&c, file) < 0)
        return 1;
    if (backing) c.o.backing_file = backing;
    if (bfmt) c.o.backing_format = bfmt;
    if (c.is_raw && (c.o.backing_file || c.o.backing_format)) {
        errorf("%s: Invalid parameter 'backing_file'", file);
        return 1;
    }
    if (c.o.backing_format && !c.o.backing_file) {
        errorf("%s: backing_fmt given without backing_file", file);
        return 1;
    }
    if (c.o.backing_file && !c.o.backing_format && !unsafe) {
        errorf("%s: Backing file specified without backing format (use -F)", file);
        return 1;
    }
    if (c.o.backing_file) {
        /* an image backed by itself: qemu-img compares the names; the same
         * file under another name loops just as well */
        char *full = path_combine(file, c.o.backing_file);
        struct stat a, b;
        bool same = strcmp(file, c.o.backing_file) == 0 ||
                    (full && stat(full, &a) == 0 && stat(file, &b) == 0 &&
                     a.st_dev == b.st_dev && a.st_ino == b.st_ino);
        free(full);
        if (same) {
            errorf("%s: Error: Trying to create an image with the same filename as the "
                   "backing file", file);
            return 1;
        }
    }
    if (!c.has_size) {
        if (!c.o.backing_file || unsafe) {
            errorf("%s: Image creation needs a size parameter", file);
            return 1;
        }
        int64_t bs = backing_size(file, c.o.backing_file, c.o.backing_format);
        if (bs < 0)
            return 1;
        c.size = (uint64_t)bs;
    } else if (c.o.backing_file && !unsafe) {
        /* like qemu-img: the backing file must be openable */
        if (backing_size(file, c.o.backing_file, c.o.backing_format) < 0)
            return 1;
    }
    /* refuse before printing anything, with qemu-img's message (pms_create
     * checks QEMU's locks again itself) */
    if (target_in_use(file))
        return 1;
    c.o.backing_unchecked = unsafe;
    if (!quiet)
        print_formatting(file, &c, c.size);
    fflush(stdout);
    if (c.bad_prealloc) {            /* qemu-img's wording for each format */
        if (c.is_raw)
            errorf("%s: invalid parameter value: %s", file, c.prealloc);
        else
            errorf("%s: Parameter 'preallocation' does not accept value '%s'", file, c.prealloc);
        return 1;
    }
    if (pms_create(file, c.size, &c.o) < 0) {
        errorf("%s: %s", file, libmsg());
        return 1;
    }
    return 0;
}

/* ---- info ------------------------------------------------------------------ */

/* One row of qemu-img's snapshot table, without the newline. */
static void snapshot_row_fmt(const struct pms_snapshot_info *sn, char *buf, size_t cap)
{
    char size[64], date[64] = "", clk[128], icount[64] = "";
    struct tm tm;
    time_t t = (time_t)sn->date_sec;
    if (localtime_r(&t, &tm))
        strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    uint64_t secs = sn->vm_clock_nsec / 1000000000ULL;
    snprintf(clk, sizeof clk, "%02d:%02d:%02d.%03d", (int)(secs / 3600),
             (int)((secs / 60) % 60), (int)(secs % 60),
             (int)((sn->vm_clock_nsec / 1000000) % 1000));
    size_to_str(sn->vm_state_size, size, sizeof size);
    if (sn->has_icount)
        snprintf(icount, sizeof icount, "%" PRId64,
                 (int64_t)(((uint64_t)sn->icount_hi << 32) | sn->icount_lo));
    snprintf(buf, cap, "%-9s %-16s %8s%20s%13s%11s", sn->id, sn->name ? sn->name : "", size,
             date, clk, icount);
}

static void snapshot_row(const struct pms_snapshot_info *sn)
{
    char row[512];
    snapshot_row_fmt(sn, row, sizeof row);
    printf("%s\n", row);
}

static void snapshot_table(const struct pms_snapshot_info *l, size_t n)
{
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
           "ICOUNT");
    for (size_t i = 0; i < n; i++)
        snapshot_row(&l[i]);
}

/* Drop the external snapshots from a list (freeing them); the new count. */
static size_t internal_only(struct pms_snapshot_info *l, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (l[i].kind == PMS_SNAP_KIND_EXTERNAL) {
            free(l[i].name);
            free(l[i].file);
        } else
            l[k++] = l[i];
    }
    return k;
}

/* snapshot -l with external snapshots: qemu-img's columns, then the kind and
 * the layer file.  Without external snapshots the table is qemu-img's. */
static void snapshot_table_kinds(const struct pms_snapshot_info *l, size_t n)
{
    bool ext = false;
    for (size_t i = 0; i < n; i++)
        ext |= l[i].kind == PMS_SNAP_KIND_EXTERNAL;
    if (!ext) {
        snapshot_table(l, n);
        return;
    }
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s  %-8s  %s\n", "ID", "TAG", "VM SIZE", "DATE",
           "VM CLOCK", "ICOUNT", "KIND", "LAYER");
    for (size_t i = 0; i < n; i++) {
        struct pms_snapshot_info r = l[i];
        if (r.kind == PMS_SNAP_KIND_EXTERNAL)
            snprintf(r.id, sizeof r.id, "-");
        char row[512];
        snapshot_row_fmt(&r, row, sizeof row);
        printf("%s  %-8s  %s\n", row, r.kind == PMS_SNAP_KIND_EXTERNAL ? "external" : "internal",
               r.file ? r.file : "-");
    }
}

struct delete_progress { bool on; double last; };

static void delete_progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    struct delete_progress *p = opaque;
    double pct = total ? (double)done * 100.0 / (double)total : 100.0;
    if (!p->on || (pct - p->last < 1.0 && pct < 100.0))
        return;
    p->last = pct;
    printf("    (%.2f/100%%)\r", pct);
    fflush(stdout);
}

/* Print the info of one image (JSON: into arr when chaining).  *next gets
 * the path of its backing file (malloc'd) and *next_fmt its format. */
static int info_one(const char *file, const char *fmt, bool force, bool json,
                    struct jval *arr, char **next, char *next_fmt, size_t nfl)
{
    pms_dev *dev = open_image(file, fmt, true, PMS_CACHE_WRITEBACK, true, force);
    if (!dev)
        return -1;
    struct pms_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    if (pms_info(dev, &info) < 0) {
        errorf("%s", libmsg());
        pms_close(dev);
        return -1;
    }
    struct pms_snapshot_info *sn = NULL;
    size_t nsn = 0;
    if (pms_snapshot_list(dev, &sn, &nsn) < 0) {
        errorf("%s", libmsg());
        pms_close(dev);
        return -1;
    }
    nsn = internal_only(sn, nsn);      /* info shows what qemu-img info shows */
    int64_t vsize = pms_size(dev);
    int64_t asize = host_allocated(file);
    bool qcow2 = strcmp(info.format, "qcow2") == 0;
    char *full = info.backing_file[0] ? path_combine(file, info.backing_file) : NULL;

    if (json) {
        struct jval *o = jobj();
        /* insertion order = QAPI ImageInfo field order (tie-break only) */
        jadd(o, "filename", jstr(file));
        jadd(o, "format", jstr(info.format));
        jadd(o, "dirty-flag", jbool(info.dirty_flag));
        if (asize >= 0)
            jadd(o, "actual-size", jint(asize));
        jadd(o, "virtual-size", jint(vsize));
        if (info.cluster_size)
            jadd(o, "cluster-size", jint((int64_t)info.cluster_size));
        if (info.backing_file[0]) {
            jadd(o, "backing-filename", jstr(info.backing_file));
            if (full)
                jadd(o, "full-backing-filename", jstr(full));
            if (info.backing_format[0])
                jadd(o, "backing-filename-format", jstr(info.backing_format));
        }
        if (nsn) {
            struct jval *a = jadd(o, "snapshots", jarr());
            for (size_t i = 0; i < nsn; i++) {
                struct jval *s = jadd(a, NULL, jobj());
                jadd(s, "id", jstr(sn[i].id));
                jadd(s, "name", jstr(sn[i].name));
                jadd(s, "vm-state-size", jint((int64_t)sn[i].vm_state_size));
                jadd(s, "date-sec", jint(sn[i].date_sec));
                jadd(s, "date-nsec", jint(sn[i].date_nsec));
                jadd(s, "vm-clock-sec", jint((int64_t)(sn[i].vm_clock_nsec / 1000000000ULL)));
                jadd(s, "vm-clock-nsec", jint((int64_t)(sn[i].vm_clock_nsec % 1000000000ULL)));
                if (sn[i].has_icount)
                    jadd(s, "icount", jint((int64_t)(((uint64_t)sn[i].icount_hi << 32) |
                                                     sn[i].icount_lo)));
            }
        }
        if (qcow2) {
            struct jval *fs = jadd(o, "format-specific", jobj());
            jadd(fs, "type", jstr("qcow2"));
            struct jval *d = jadd(fs, "data", jobj());
            jadd(d, "compat", jstr(info.qcow2_version >= 3 ? "1.1" : "0.10"));
            if (info.qcow2_version >= 3) {
                jadd(d, "lazy-refcounts", jbool(info.lazy_refcounts));
                jadd(d, "corrupt", jbool(info.corrupt));
            }
            jadd(d, "refcount-bits", jint(info.refcount_bits));
            if (info.qcow2_version >= 3)
                jadd(d, "extended-l2", jbool(info.extended_l2));
            jadd(d, "compression-type",
                 jstr(info.compression_type[0] ? info.compression_type : "zlib"));
        }
        if (arr)
            jadd(arr, NULL, o);
        else {
            jprint(stdout, o);
            jfree(o);
        }
    } else {
        char vs[64], ds[64];
        size_to_str((uint64_t)vsize, vs, sizeof vs);
        printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRId64 " bytes)\n", file,
               info.format, vs, vsize);
        if (asize >= 0) {
            size_to_str((uint64_t)asize, ds, sizeof ds);
            printf("disk size: %s\n", ds);
        } else
            printf("disk size: unavailable\n");
        if (info.cluster_size)
            printf("cluster_size: %" PRIu64 "\n", info.cluster_size);
        if (info.dirty_flag)
            printf("cleanly shut down: no\n");
        if (info.backing_file[0]) {
            printf("backing file: %s", info.backing_file);
            if (!full)
                printf(" (cannot determine actual path)");
            else if (strcmp(full, info.backing_file))
                printf(" (actual path: %s)", full);
            printf("\n");
            if (info.backing_format[0])
                printf("backing file format: %s\n", info.backing_format);
        }
        if (nsn)
            snapshot_table(sn, nsn);
        if (qcow2) {
            print_qcow2_specific(&info);
        }
    }
    if (next)
        *next = full ? strdup(full) : NULL;
    if (next_fmt)
        snprintf(next_fmt, nfl, "%s", info.backing_format);
    free(full);
    pms_snapshot_list_free(sn, nsn);
    return close_image(dev) < 0 ? -1 : 0;
}

int cmd_info(int argc, char **argv)
{
    static const struct option lo[] = {
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "force-share", no_argument, NULL, 'U' },
        { "format", required_argument, NULL, 'f' },
        { "backing-chain", no_argument, NULL, OPT_CHAIN },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL;
    int json = 0, force = 0, chain = 0, ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":f:U", lo, NULL)) != -1) {
        switch (ch) {
        case 'f': fmt = optarg; break;
        case 'U': force = 1; break;
        case OPT_CHAIN: chain = 1; break;
        case OPT_OUTPUT:
            if ((json = parse_output(optarg)) < 0)
                return 1;
            break;
        case ':':
        default: return getopt_error("info", ch, argv, lo);
        }
    }
    if (optind != argc - 1)
        return usage_error("Expecting one image file name");
    if (!chain)
        return info_one(argv[optind], fmt, force, json, NULL, NULL, NULL, 0) < 0 ? 1 : 0;
    /* like qemu-img: open the whole chain first (the library finds loops
     * and chains too deep), print nothing if it breaks */
    pms_dev *whole = open_image(argv[optind], fmt, true, PMS_CACHE_WRITEBACK, false, force);
    if (!whole)
        return 1;
    pms_close(whole);
    struct jval *arr = json ? jarr() : NULL;
    char *cur = strdup(argv[optind]), bfmt[64] = "";
    int rc = 0, n = 0;
    while (cur && rc == 0) {
        char *next = NULL;
        if (n++ && !json)
            printf("\n");
        if (n > MAX_CHAIN) {
            errorf("backing chain too long (loop?)");
            rc = 1;
            break;
        }
        if (info_one(cur, n == 1 ? fmt : (bfmt[0] ? bfmt : NULL), force, json, arr, &next,
                     bfmt, sizeof bfmt) < 0)
            rc = 1;
        free(cur);
        cur = next;
    }
    free(cur);
    if (arr) {
        if (rc == 0)
            jprint(stdout, arr);
        jfree(arr);
    }
    return rc;
}

/* ---- check ----------------------------------------------------------------- */

static void check_msg(void *opaque, const char *msg)
{
    (void)opaque;
    size_t n = strlen(msg);
    fflush(stdout);
    fprintf(stderr, "%s%s", msg, n && msg[n - 1] == '\n' ? "" : "\n");
}

static void check_human(const struct pms_check_result *r)
{
    if (!(r->corruptions || r->leaks || r->check_errors))
        printf("No errors were found on the image.\n");
    else {
        if (r->corruptions)
            printf("\n%" PRIu64 " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n",
                   r->corruptions);
        if (r->leaks)
            printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n", r->leaks);
        if (r->check_errors)
            printf("\n%" PRIu64 " internal errors have occurred during the check.\n",
                   r->check_errors);
    }
    if (r->total_clusters && r->allocated_clusters)
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, "
               "%0.2f%% compressed clusters\n", r->allocated_clusters, r->total_clusters,
               (double)r->allocated_clusters * 100.0 / (double)r->total_clusters,
               (double)r->fragmented_clusters * 100.0 / (double)r->allocated_clusters,
               (double)r->compressed_clusters * 100.0 / (double)r->allocated_clusters);
    if (r->image_end_offset)
        printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

static void check_json(const char *file, const char *fmt, const struct pms_check_result *r)
{
    struct jval *o = jobj();
    jadd(o, "filename", jstr(file));
    jadd(o, "format", jstr(fmt));
    jadd(o, "check-errors", jint((int64_t)r->check_errors));
    if (r->image_end_offset) jadd(o, "image-end-offset", jint((int64_t)r->image_end_offset));
    if (r->corruptions) jadd(o, "corruptions", jint((int64_t)r->corruptions));
    if (r->leaks) jadd(o, "leaks", jint((int64_t)r->leaks));
    if (r->corruptions_fixed)
        jadd(o, "corruptions-fixed", jint((int64_t)r->corruptions_fixed));
    if (r->leaks_fixed) jadd(o, "leaks-fixed", jint((int64_t)r->leaks_fixed));
    if (r->total_clusters) jadd(o, "total-clusters", jint((int64_t)r->total_clusters));
    if (r->allocated_clusters)
        jadd(o, "allocated-clusters", jint((int64_t)r->allocated_clusters));
    if (r->fragmented_clusters)
        jadd(o, "fragmented-clusters", jint((int64_t)r->fragmented_clusters));
    if (r->compressed_clusters)
        jadd(o, "compressed-clusters", jint((int64_t)r->compressed_clusters));
    jprint(stdout, o);
    jfree(o);
}

int cmd_check(int argc, char **argv)
{
    static const struct option lo[] = {
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "repair", required_argument, NULL, 'r' },
        { "force-share", no_argument, NULL, 'U' },
        { "format", required_argument, NULL, 'f' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL;
    int json = 0, force = 0, quiet = 0, ch;
    unsigned flags = 0;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":f:r:T:qU", lo, NULL)) != -1) {
        switch (ch) {
        case 'f': fmt = optarg; break;
        case 'U': force = 1; break;
        case 'q': quiet = 1; break;
        case 'T': break;               /* source cache mode: accepted */
        case 'r':
            if (strcmp(optarg, "leaks") == 0) flags = PMS_CHECK_REPAIR_LEAKS;
            else if (strcmp(optarg, "all") == 0) flags = PMS_CHECK_REPAIR_ALL;
            else {
                errorf("Unknown option value for -r (expecting 'leaks' or 'all'): %s", optarg);
                return 1;
            }
            break;
        case OPT_OUTPUT:
            if ((json = parse_output(optarg)) < 0)
                return 1;
            break;
        case ':':
        default: return getopt_error("check", ch, argv, lo);
        }
    }
    const char *file;
    if (one_file(argc, optind, &file)) return 1;
    file = argv[optind];
    if (flags && force) {
        errorf("--force-share/-U is not allowed with -r");
        return 1;
    }
    open_for_check = true;
    /* with its backing chain: qemu-img check fails when a backing file is missing */
    pms_dev *dev = open_image(file, fmt, flags == 0, PMS_CACHE_WRITEBACK, false, force);
    if (!dev)
        return 1;
    struct pms_info info = { .size = sizeof info };
    pms_info(dev, &info);
    struct pms_check_result r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    int ret = pms_check(dev, flags, &r, check_msg, NULL);
    if (ret == -ENOTSUP) {
        errorf("This image format does not support checks");
        pms_close(dev);
        return 63;
    }
    if (ret == 0 && (r.corruptions_fixed || r.leaks_fixed)) {
        uint64_t cf = r.corruptions_fixed, lf = r.leaks_fixed;
        if (!json && !quiet)
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %" PRIu64 " leaked clusters\n"
                   "    %" PRIu64 " corruptions\n\n"
                   "Double checking the fixed image now...\n", lf, cf);
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        ret = pms_check(dev, 0, &r, check_msg, NULL);
        /* qemu-img reports the first pass's *-fixed counts with the re-check */
        r.corruptions_fixed = cf;
        r.leaks_fixed = lf;
    }
    if (ret == 0 && !quiet) {
        if (json)
            check_json(file, info.format, &r);
        else
            check_human(&r);
    }
    int rc;
    if (ret < 0 || r.check_errors) {
        if (ret < 0)
            errorf("Check failed: %s", libmsg());
        else
            errorf("Check failed");
        rc = 1;
    } else if (r.corruptions)
        rc = 2;
    else if (r.leaks)
        rc = 3;
    else
        rc = 0;
    if (close_image(dev) < 0 && rc == 0)
        rc = 1;
    return rc;
}

/* ---- snapshot ---------------------------------------------------------------- */

/* qemu-img snapshot opens the backing chain, so a missing backing file fails
 * every action before anything is written.  The action itself opens the image
 * alone: a writable open with the chain would finish an interrupted external
 * snapshot operation that snapshot -d finishes itself (extsnap.c). */
static bool backing_chain_opens(const char *file, const char *fmt)
{
    pms_dev *dev = open_image(file, fmt, true, PMS_CACHE_WRITEBACK, false, true);
    if (dev)
        pms_close(dev);
    return dev != NULL;
}

int cmd_snapshot(int argc, char **argv)
{
    static const struct option lo[] = {
        { "force-share", no_argument, NULL, 'U' },
        { "format", required_argument, NULL, 'f' },
        { "external", no_argument, NULL, 'E' },
        { "progress", no_argument, NULL, 'p' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *name = NULL;
    int action = 0, force = 0, quiet = 0, ch, external = 0, prog = -1;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":la:c:d:f:qUp", lo, NULL)) != -1) {
        switch (ch) {
        case 'f': fmt = optarg; break;
        case 'E': external = 1; break;
        case 'p': prog = 1; break;
        case 'U': force = 1; break;
        case 'q': quiet = 1; break;
        case 'l': case 'a': case 'c': case 'd':
            if (action)
                return usage_error("Cannot mix '-l', '-a', '-c', '-d'");
            action = ch;
            name = optarg;
            break;
        case ':':
        default: return getopt_error("snapshot", ch, argv, lo);
        }
    }
    (void)quiet;
    const char *file;
    if (one_file(argc, optind, &file)) return 1;
    file = argv[optind];
    if (!action)
        action = 'l';
    if (action != 'l' && force) {
        errorf("--force-share/-U is only valid with -l");
        return 1;
    }
    if (external && action != 'c') {
        errorf("--external is only valid with -c");
        return 1;
    }
    if (!backing_chain_opens(file, fmt))
        return 1;
    pms_dev *dev = open_image(file, fmt, action == 'l', PMS_CACHE_WRITEBACK, true, force);
    if (!dev)
        return 1;
    int rc = 0;
    switch (action) {
    case 'l': {
        struct pms_snapshot_info *l = NULL;
        size_t n = 0;
        if (pms_snapshot_list(dev, &l, &n) < 0) {
            errorf("%s", libmsg());
            rc = 1;
        } else if (n)
            snapshot_table_kinds(l, n);
        pms_snapshot_list_free(l, n);
        break;
    }
    case 'c':
        if (pms_snapshot_create_ex(dev, name, external ? PMS_SNAP_EXTERNAL : 0) < 0) {
            errorf("Could not create snapshot '%s': %s", name, libmsg());
            rc = 1;
        }
        break;
    case 'a':
        if (pms_snapshot_revert(dev, name) < 0) {
            errorf("Could not apply snapshot '%s': %s", name, libmsg());
            rc = 1;
        }
        break;
    case 'd':
    {
        struct delete_progress dp = { prog > 0 || (prog < 0 && isatty(STDOUT_FILENO)), 0 };
        dp.on = dp.on && !quiet;
        if (pms_snapshot_delete_ex(dev, name, 0, delete_progress_cb, &dp) < 0) {
            if (dp.on) printf("\n");
            errorf("Could not delete snapshot '%s': %s", name, libmsg());
            rc = 1;
        } else if (dp.on) {
            if (dp.last < 100.0)
                delete_progress_cb(&dp, 1, 1);
            printf("\n");
        }
    }
        break;
    }
    return close_after(dev, rc);
}

/* ---- map ------------------------------------------------------------------------ */


struct chain {
    int n;
    char *name[MAX_CHAIN];      /* filename of each layer, as qemu prints it */
    bool raw[MAX_CHAIN];
    int fd[MAX_CHAIN];          /* the layer's host file, for hole queries */
    bool recurse[MAX_CHAIN];    /* qemu asks the host file about holes: raw
                                   layers, and qcow2 ones that look metadata-
                                   preallocated (pms_info) */
};

/* Is [off, off+len) of the host file a hole?  *n = length of the run with
 * the same answer (<= len).  Unknown (fd < 0, errors) = not a hole. */
static bool host_hole(int fd, uint64_t off, uint64_t len, uint64_t *n)
{
    *n = len;
    if (fd < 0)
        return false;
    off_t d = lseek(fd, (off_t)off, SEEK_DATA);
    if (d < 0)
        return errno == ENXIO;          /* hole up to EOF (or past EOF) */
    if ((uint64_t)d > off) {
        if ((uint64_t)d - off < len) *n = (uint64_t)d - off;
        return true;
    }
    off_t h = lseek(fd, (off_t)off, SEEK_HOLE);
    if (h > (off_t)off && (uint64_t)h - off < len)
        *n = (uint64_t)h - off;
    return false;
}

static void chain_load(struct chain *c, const char *file, const char *fmt)
{
    memset(c, 0, sizeof *c);
    char *cur = strdup(file);
    const char *f = fmt;
    while (cur && c->n < MAX_CHAIN) {
        c->name[c->n] = cur;
        struct pms_open_opts o;
        pms_open_opts_init(&o);
        o.readonly = 1;
        o.no_backing = 1;
        o.format = f;
        o.force_share = 1;
        pms_dev *d = NULL;
        if (pms_open(cur, &o, &d) < 0)
            break;
        struct pms_info info = { .size = sizeof info };
        pms_info(d, &info);
        pms_close(d);
        c->raw[c->n] = strcmp(info.format, "raw") == 0;
        c->recurse[c->n] = c->raw[c->n] || info.metadata_preallocated;
        c->fd[c->n] = open(cur, O_RDONLY | O_CLOEXEC);
        c->n++;
        cur = info.backing_file[0] ? path_combine(cur, info.backing_file) : NULL;
        f = info.backing_format[0] ? NULL : NULL;
    }
    if (cur && (c->n >= MAX_CHAIN || c->name[c->n] == cur)) {
        free(cur);                     /* not opened, or past the deepest chain kept */
        if (c->n < MAX_CHAIN)
            c->name[c->n] = NULL;
    }
}

static void chain_free(struct chain *c)
{
    for (int i = 0; i < c->n; i++) {
        free(c->name[i]);
        if (c->fd[i] >= 0)
            close(c->fd[i]);
    }
}

struct mapent {
    uint64_t start, length, offset;
    int depth;
    bool present, zero, data, has_offset;
};

static bool mergeable(const struct mapent *a, const struct mapent *b)
{
    if (a->length == 0) return false;
    if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
        a->present != b->present || a->has_offset != b->has_offset)
        return false;
    if (a->has_offset && a->offset + a->length != b->offset)
        return false;
    return true;
}

static int dump_ent(struct mapent *e, struct mapent *next, bool json, const struct chain *c)
{
    if (json) {
        printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d,"
               " \"present\": %s, \"zero\": %s, \"data\": %s", e->start, e->length, e->depth,
               e->present ? "true" : "false", e->zero ? "true" : "false",
               e->data ? "true" : "false");
        if (e->has_offset)
            printf(", \"offset\": %" PRIu64, e->offset);
        putchar('}');
        if (next)
            puts(",");
        return 0;
    }
    if (e->data && !e->has_offset) {
        errorf("File contains external, encrypted or compressed clusters.");
        return -1;
    }
    if (e->data && !e->zero) {
        const char *fn = e->depth < c->n ? c->name[e->depth] : "";
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
               e->offset, fn);
    }
    if (next && (!next->data || next->zero) && (!e->data || e->zero)) {
        next->data = false;
        next->zero = true;
    }
    return 0;
}

int cmd_map(int argc, char **argv)
{
    static const struct option lo[] = {
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "start-offset", required_argument, NULL, 's' },
        { "max-length", required_argument, NULL, 'l' },
        { "force-share", no_argument, NULL, 'U' },
        { "format", required_argument, NULL, 'f' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL;
    int json = 0, force = 0, ch;
    uint64_t start = 0, maxlen = UINT64_MAX;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":f:s:l:U", lo, NULL)) != -1) {
        switch (ch) {
        case 'f': fmt = optarg; break;
        case 'U': force = 1; break;
        case 's':
            if (cvtnum("start offset", optarg, &start) < 0) return 1;
            break;
        case 'l':
            if (cvtnum("max length", optarg, &maxlen) < 0) return 1;
            break;
        case OPT_OUTPUT:
            if ((json = parse_output(optarg)) < 0)
                return 1;
            break;
        case ':':
        default: return getopt_error("map", ch, argv, lo);
        }
    }
    const char *file;
    if (one_file(argc, optind, &file)) return 1;
    file = argv[optind];
    pms_dev *dev = open_image(file, fmt, true, PMS_CACHE_WRITEBACK, false, force);
    if (!dev)
        return 1;
    struct chain c;
    chain_load(&c, file, fmt);
    uint64_t size = (uint64_t)pms_size(dev);
    uint64_t end = maxlen < size - (start < size ? start : size) ? start + maxlen : size;
    uint64_t asked = start;          /* qemu-img's empty entry says where it was asked */
    if (start > size) start = size;

    int rc = 0;
    struct mapent cur = { 0 }, nx;
    bool have = false;
    if (json)
        putchar('[');
    else
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    if (start == end && json) {     /* qemu prints one empty entry */
        struct mapent e = { .start = asked > start ? asked : start };
        dump_ent(&e, NULL, true, &c);
    }
    for (uint64_t off = start; off < end;) {
        struct pms_extent x;
        uint64_t len = end - off;
        if (len > (1ULL << 30)) len = 1ULL << 30;
        if (pms_block_status(dev, off, len, &x) < 0) {
            errorf("Could not read file metadata: %s", libmsg());
            rc = 1;
            break;
        }
        nx = (struct mapent){
            .start = off, .length = x.length, .depth = x.depth,
            .data = !!(x.flags & PMS_BLOCK_DATA), .zero = !!(x.flags & PMS_BLOCK_ZERO),
            .has_offset = !!(x.flags & PMS_BLOCK_OFFSET), .offset = x.host_offset,
            .present = (x.flags & PMS_BLOCK_ALLOCATED) ||
                       (x.depth < c.n && c.raw[x.depth]),
        };
        if (!nx.has_offset) nx.offset = 0;
        off += x.length;
        /* like qemu (want_zero): ask the host file whether data clusters
         * are holes there; such ranges are reported "zero": true too */
        uint64_t done = 0;
        while (done < x.length && rc == 0) {
            struct mapent piece = nx;
            piece.start += done;
            piece.offset += done;
            piece.length = x.length - done;
            if (nx.data && nx.has_offset && !nx.zero && nx.depth < c.n && c.recurse[nx.depth])
                piece.zero = host_hole(c.fd[nx.depth], piece.offset, piece.length,
                                       &piece.length);
            done += piece.length;
            if (have && mergeable(&cur, &piece)) {
                cur.length += piece.length;
                continue;
            }
            if (have && dump_ent(&cur, &piece, json, &c) < 0) {
                rc = 1;
                break;
            }
            cur = piece;
            have = true;
        }
        if (rc)
            break;
    }
    if (rc == 0 && have && dump_ent(&cur, NULL, json, &c) < 0)
        rc = 1;
    if (json)
        printf("]\n");
    chain_free(&c);
    return close_after(dev, rc);
}

/* ---- convert ---------------------------------------------------------------------- */

struct progress { bool on; double last; };

static void progress_print(struct progress *p, double pct, bool force)
{
    if (!p->on) return;
    if (!force && pct - p->last < 1.0)
        return;
    p->last = pct;
    printf("    (%.2f/100%%)\r", pct);
    fflush(stdout);
}

/* Write the non-zero 4 KiB granules of buf at off (sparse target). */
static int write_sparse(pms_dev *dst, const uint8_t *buf, size_t n, uint64_t off, bool zero_fill)
{
    const size_t g = 4096;
    size_t i = 0;
    while (i < n) {
        size_t l = n - i < g ? n - i : g;
        bool z = pms_buf_is_zero(buf + i, l);
        size_t j = i + l;
        while (j < n) {
            size_t l2 = n - j < g ? n - j : g;
            if (pms_buf_is_zero(buf + j, l2) != z) break;
            j += l2;
        }
        int r = z ? (zero_fill ? pms_write_zeroes(dst, j - i, off + i) : 0)
                  : pms_pwrite(dst, buf + i, j - i, off + i);
        if (r < 0) return r;
        i = j;
    }
    return 0;
}

/* convert -c: every cluster holding data is written compressed (as
 * qemu-img convert -c: whole target clusters, zero clusters skipped, a
 * zero-length compressed write at the end rounds the file to a sector). */
static int convert_compressed(pms_dev *in, pms_dev *out, uint8_t *buf, size_t chunk,
                              uint64_t size, bool zero_fill, struct progress *p)
{
    struct pms_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    if (pms_info(out, &info) < 0 || !info.cluster_size || info.cluster_size > chunk) {
        errorf("Compression not supported for this file format");
        return 1;
    }
    uint64_t cs = info.cluster_size;
    for (uint64_t off = 0; off < size;) {
        uint64_t len = size - off < chunk ? size - off : chunk;
        struct pms_extent x;
        if (pms_block_status(in, off, len, &x) < 0) {
            errorf("error while reading block status at offset %" PRIu64 ": %s", off, libmsg());
            return 1;
        }
        uint64_t end = off + x.length;
        if (x.flags & PMS_BLOCK_ZERO) {
            /* whole clusters inside a zero extent are skipped */
            uint64_t next = end == size ? size : end & ~(cs - 1);
            if (next > off) {
                if (zero_fill && pms_write_zeroes(out, next - off, off) < 0) {
                    errorf("error while writing at byte %" PRIu64 ": %s", off, libmsg());
                    return 1;
                }
                off = next;
                progress_print(p, (double)off * 100.0 / (double)size, false);
                continue;
            }
        }
        /* the clusters this extent touches, read whole */
        end = (end + cs - 1) & ~(cs - 1);
        if (end > off + chunk) end = off + chunk;
        if (end > size) end = size;
        if (pms_pread(in, buf, end - off, off) < 0) {
            errorf("error while reading at byte %" PRIu64 ": %s", off, libmsg());
            return 1;
        }
        for (uint64_t o = off; o < end;) {
            /* a run of non-zero clusters goes in one call */
            uint64_t n = end - o < cs ? end - o : cs;
            bool z = pms_buf_is_zero(buf + (o - off), n);
            uint64_t e = o + n;
            while (e < end) {
                uint64_t n2 = end - e < cs ? end - e : cs;
                if (pms_buf_is_zero(buf + (e - off), n2) != z) break;
                e += n2;
            }
            int r = z ? (zero_fill ? pms_write_zeroes(out, e - o, o) : 0)
                      : pms_pwrite_compressed(out, buf + (o - off), e - o, o);
            if (r < 0) {
                errorf("error while compressing sector %" PRIu64 ": %s", o / 512, libmsg());
                return 1;
            }
            o = e;
        }
        off = end;
        progress_print(p, (double)off * 100.0 / (double)size, false);
    }
    if (pms_pwrite_compressed(out, NULL, 0, 0) < 0) {
        errorf("%s", libmsg());
        return 1;
    }
    return 0;
}

int cmd_convert(int argc, char **argv)
{
    static const struct option lo[] = {
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *ofmt = "raw";
    char *optstrs[64];
    int nopts = 0, prog = 0, quiet = 0, noc = 0, force = 0, compress = 0, ch;
    int tcache = PMS_CACHE_WRITEBACK, scache = PMS_CACHE_WRITEBACK;  /* durable on exit */
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":cf:O:o:pqnt:T:UWm:", lo, NULL)) != -1) {
        switch (ch) {
        case 'c': compress = 1; break;
        case 'f': fmt = optarg; break;
        case 'O': ofmt = optarg; break;
        case 'o':
            if (nopts == 64) return usage_error("too many -o options");
            optstrs[nopts++] = optarg;
            break;
        case 'p': prog = 1; break;
        case 'q': quiet = 1; break;
        case 'n': noc = 1; break;
        case 'U': force = 1; break;
        case 'W': case 'm': break;      /* parallelism knobs: accepted */
        case 't':
            if (parse_cache_mode(optarg, &tcache) < 0) {
                errorf("Invalid cache option: %s", optarg);
                return 1;
            }
            break;
        case 'T':
            if (parse_cache_mode(optarg, &scache) < 0) {
                errorf("Invalid source cache option: %s", optarg);
                return 1;
            }
            break;
        case ':':
        default: return getopt_error("convert", ch, argv, lo);
        }
    }
    if (argc - optind != 2)
        return usage_error("Expecting a source and a target image file name");
    if (strcmp(ofmt, "qcow2") && strcmp(ofmt, "raw")) {
        errorf("Unknown file format '%s'", ofmt);
        return 1;
    }
    if (noc && nopts) {
        errorf("-o has no effect when skipping image creation");
        return 1;
    }
    if (compress && strcmp(ofmt, "qcow2")) {
        errorf("Compression not supported for this file format");
        return 1;
    }
    const char *src = argv[optind], *dst = argv[optind + 1];
    struct copts c;
    memset(&c, 0, sizeof c);
    pms_create_opts_init(&c.o);
    c.is_raw = strcmp(ofmt, "raw") == 0;
    c.o.format = ofmt;
    for (int i = 0; i < nopts; i++) {
        int r = parse_copts(&c, optstrs[i], dst);
        if (r != 0)
            return r > 0 ? 0 : 1;
    }
    if (check_copts(&c, dst) < 0)
        return 1;
    if (c.bad_prealloc) {
        errorf("%s: Parameter 'preallocation' does not accept value '%s'", dst, c.prealloc);
        return 1;
    }
    pms_dev *in = open_image(src, fmt, true, scache, false, force);
    if (!in)
        return 1;
    uint64_t size = (uint64_t)pms_size(in);
    struct stat ss, ds;
    if (stat(src, &ss) == 0 && stat(dst, &ds) == 0 && ss.st_dev == ds.st_dev &&
        ss.st_ino == ds.st_ino) {
        errorf("%s: source and target are the same file", dst);
        pms_close(in);
        return 1;
    }
    /* our own open of the source (and its backing chain) holds QEMU-style
     * locks too, so this also refuses a target that is part of the chain */
    if (target_in_use(dst)) {
        pms_close(in);
        return 1;
    }
    if (!noc && pms_create(dst, size, &c.o) < 0) {
        errorf("%s: error while converting %s: %s", dst, ofmt, libmsg());
        pms_close(in);
        return 1;
    }
    pms_dev *out = open_image(dst, noc ? NULL : ofmt, false, tcache, true, false);
    if (!out) {
        pms_close(in);
        return 1;
    }
    if (noc && (uint64_t)pms_size(out) < size) {
        errorf("%s: target is smaller than the source", dst);
        pms_close(in);
        pms_close(out);
        return 1;
    }
    struct progress p = { .on = prog && !quiet, .last = 0 };
    progress_print(&p, 0, true);
    const size_t chunk = 2u << 20;
    uint8_t *buf = malloc(chunk);
    int rc = 0;
    if (!buf) {
        errorf("out of memory");
        rc = 1;
    }
    if (rc == 0 && compress)
        rc = convert_compressed(in, out, buf, chunk, size, noc, &p);
    for (uint64_t off = compress ? size : 0; rc == 0 && off < size;) {
        struct pms_extent x;
        uint64_t len = size - off;
        if (len > chunk) len = chunk;
        if (pms_block_status(in, off, len, &x) < 0) {
            errorf("error while reading block status at offset %" PRIu64 ": %s", off, libmsg());
            rc = 1;
            break;
        }
        if (x.flags & PMS_BLOCK_ZERO) {
            if (noc && pms_write_zeroes(out, x.length, off) < 0) {
                errorf("error while writing at byte %" PRIu64 ": %s", off, libmsg());
                rc = 1;
            }
        } else if (pms_pread(in, buf, x.length, off) < 0) {
            errorf("error while reading at byte %" PRIu64 ": %s", off, libmsg());
            rc = 1;
        } else if (write_sparse(out, buf, x.length, off, noc) < 0) {
            errorf("error while writing at byte %" PRIu64 ": %s", off, libmsg());
            rc = 1;
        }
        off += x.length;
        progress_print(&p, (double)off * 100.0 / (double)size, false);
    }
    free(buf);
    if (rc == 0) {
        progress_print(&p, 100.0, true);
        if (pms_flush(out) < 0) {
            errorf("%s", libmsg());
            rc = 1;
        }
    }
    if (p.on)
        printf("\n");
    rc = close_after(out, rc);
    pms_close(in);
    return rc;
}

/* ---- resize ------------------------------------------------------------------------ */

int cmd_resize(int argc, char **argv)
{
    enum { OPT_SHRINK = 400, OPT_PREALLOC };
    static const struct option lo[] = {
        { "shrink", no_argument, NULL, OPT_SHRINK },
        { "preallocation", required_argument, NULL, OPT_PREALLOC },
        { NULL, 0, NULL, 0 },
    };
    /* like qemu-img: take the size off argv first, so "-1G" is no option */
    if (argc < 3)
        return usage_error("Not enough arguments");
    const char *sizestr = argv[--argc];
    const char *fmt = NULL;
    int quiet = 0, shrink = 0, ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":f:q", lo, NULL)) != -1) {
        switch (ch) {
        case 'f': fmt = optarg; break;
        case 'q': quiet = 1; break;
        case OPT_SHRINK: shrink = 1; break;
        case OPT_PREALLOC:
            if (strcmp(optarg, "off")) {
                errorf("Preallocation mode '%s' is not supported (only 'off')", optarg);
                return 1;
            }
            break;
        case ':':
        default: return getopt_error("resize", ch, argv, lo);
        }
    }
    if (optind != argc - 1)
        return usage_error("Expecting image file name and size");
    const char *file = argv[optind];
    int rel = 0;
    if (sizestr[0] == '+' || sizestr[0] == '-')
        rel = sizestr[0] == '+' ? 1 : -1;
    uint64_t n;
    if (parse_size(sizestr + (rel != 0), &n) < 0) {
        errorf("Parameter 'size' expects a non-negative number below 2^64");
        return 1;
    }
    pms_dev *dev = open_image(file, fmt, false, PMS_CACHE_WRITEBACK, false, false);
    if (!dev)
        return 1;
    uint64_t cur = (uint64_t)pms_size(dev), want = n;
    if (rel > 0)
        want = cur + n;
    else if (rel < 0)
        want = n > cur ? 0 : cur - n;
    int rc = 0;
    if ((rel > 0 && (want < cur || want > INT64_MAX)) || (rel == 0 && n > INT64_MAX)) {
        errorf("New image size out of range");
        rc = 1;
    } else if (want == 0 || (rel < 0 && n >= cur)) {
        errorf("New image size must be positive");   /* qemu: total_size <= 0 */
        rc = 1;
    } else if (want < cur && !shrink) {
        errorf("Use the --shrink option to perform a shrink operation.");
        rc = 1;
    } else if (pms_truncate(dev, want) < 0) {   /* also to the same size, as qemu-img:
                                                   a raw file 4097 bytes long becomes 4608 */
        errorf("%s", libmsg());
        rc = 1;
    } else if (!quiet)
        printf("Image resized.\n");
    return close_after(dev, rc);
}
