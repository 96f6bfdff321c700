/* pms-testtool: a small driver of the library for the block tests, with the
 * same command syntax as the pmemsnap CLI (which follows qemu-img/qemu-io),
 * so the shell tests can use either.  Only what the tests need:
 *
 *   create [-f fmt] [-o k=v,...] [-b BACKING] [-F FMT] FILE [SIZE]
 *   io [-f fmt] [-U] [-n] -c CMD [-c CMD...] FILE
 *        CMD: read [-P 0xNN] [-q] OFF LEN | write [-P 0xNN] OFF LEN |
 *             write -z [-u] OFF LEN | discard OFF LEN | flush
 *   convert [-f fmt] -O raw SRC DST     (raw output only)
 *   read-raw FILE OUT                   (same as convert -O raw)
 *   snapshot -l | -c NAME | -a NAME | -d NAME  FILE
 *   info [--output=json] FILE
 *   check [-r leaks|all] FILE           (exit 0 clean, 2 corrupt, 3 leaks, 1 error)
 *   map [--output=json] FILE
 *   batch [-f fmt] [-m MODE] [-r REF] [-b N] [-t] [-L L2_CACHE_BYTES] RUNS FILE
 *        writes the runs listed in RUNS (lines "OFF LEN PATTERN", sorted,
 *        not overlapping) with bdev_pwrite_batch, N runs per batch (all),
 *        then flushes.  MODE says what the fill callback does:
 *          none     no callback
 *          ref      the bytes of REF (a raw file holding the device's
 *                   content, mapped and populated: resident memory, as the
 *                   memory device holds it)
 *          partial  like ref, but only for ranges whose 4 KiB pages all have
 *                   an index not divisible by 3 (partly resident memory)
 *          false    always "not held"
 *          marker   0xee bytes for everything (a test's proof that no old
 *                   data was read back: every byte the batch does not cover
 *                   but writes comes from fill)
 *          pwrite   no batch: one bdev_pwrite per run (the old path)
 *        -t prints the time the writes and the flush took.
 *
 * Exit status: 0 ok, 1 on any error or pattern mismatch.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "pmemsnap.h"
#include "util/size.h"
#include "block/block.h"

static const char *prog = "pms-testtool";

static int die(const char *what)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, pms_errmsg());
    return 1;
}

static int parse_num(const char *s, uint64_t *v)
{
    if (pms_parse_size(s, v) < 0) {
        fprintf(stderr, "%s: bad number '%s'\n", prog, s);
        return -1;
    }
    return 0;
}

static int open_img(const char *file, const char *fmt, bool ro, pms_dev **dev)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = ro;
    o.format = fmt;
    if (pms_open(file, &o, dev) < 0)
        return die(file);
    return 0;
}

/* ---- create ----------------------------------------------------------- */

static int cmd_create(int argc, char **argv)
{
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    const char *opts = NULL;
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "f:o:b:F:")) != -1) {
        switch (c) {
        case 'f': co.format = optarg; break;
        case 'o': opts = optarg; break;
        case 'b': co.backing_file = optarg; break;
        case 'F': co.backing_format = optarg; break;
        default: return 1;
        }
    }
    if (optind >= argc) { fprintf(stderr, "%s: create: no file\n", prog); return 1; }
    const char *file = argv[optind];
    uint64_t size = 0;
    if (optind + 1 < argc && parse_num(argv[optind + 1], &size) < 0) return 1;
    char *dup = opts ? strdup(opts) : NULL, *save = NULL;
    for (char *t = dup ? strtok_r(dup, ",", &save) : NULL; t; t = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(t, '=');
        if (!eq) { fprintf(stderr, "%s: bad option '%s'\n", prog, t); free(dup); return 1; }
        *eq++ = '\0';
        uint64_t v = 0;
        if (!strcmp(t, "cluster_size")) { if (parse_num(eq, &v) < 0) { free(dup); return 1; } co.cluster_size = v; }
        else if (!strcmp(t, "extended_l2")) co.extended_l2 = !strcmp(eq, "on");
        else if (!strcmp(t, "refcount_bits")) co.refcount_bits = atoi(eq);
        else if (!strcmp(t, "compat")) co.compat_v2 = !strcmp(eq, "0.10");
        else if (!strcmp(t, "lazy_refcounts")) co.lazy_refcounts = !strcmp(eq, "on");
        else { fprintf(stderr, "%s: unknown option '%s'\n", prog, t); free(dup); return 1; }
    }
    int r = pms_create(file, size, &co);
    free(dup);
    if (r < 0) return die("create");
    return 0;
}

/* ---- io ----------------------------------------------------------------- */

static int io_one(pms_dev *dev, const char *cmdline, bool *mismatch)
{
    char *dup = strdup(cmdline), *save = NULL;
    char *av[16];
    int ac = 0;
    for (char *t = strtok_r(dup, " \t", &save); t && ac < 15; t = strtok_r(NULL, " \t", &save))
        av[ac++] = t;
    av[ac] = NULL;
    int ret = 0;
    if (ac == 0) goto out;
    const char *op = av[0];
    int pattern = -1;
    bool zero = false, unmap = false;
    int i = 1;
    for (; i < ac && av[i][0] == '-'; i++) {
        if (!strcmp(av[i], "-P") && i + 1 < ac) pattern = (int)strtol(av[++i], NULL, 0);
        else if (!strcmp(av[i], "-z")) zero = true;
        else if (!strcmp(av[i], "-u")) unmap = true;
        else if (!strcmp(av[i], "-q")) ;
        else { fprintf(stderr, "%s: io: unknown flag %s\n", prog, av[i]); ret = -1; goto out; }
    }
    if (!strcmp(op, "flush")) {
        if (pms_flush(dev) < 0) { die("flush"); ret = -1; }
        goto out;
    }
    uint64_t off, len;
    if (i + 2 != ac || parse_num(av[i], &off) < 0 || parse_num(av[i + 1], &len) < 0) {
        fprintf(stderr, "%s: io: bad command '%s'\n", prog, cmdline);
        ret = -1;
        goto out;
    }
    (void)unmap;
    if (!strcmp(op, "read")) {
        uint8_t *b = malloc(len ? len : 1);
        if (pms_pread(dev, b, len, off) < 0) { die("read"); ret = -1; }
        else if (pattern >= 0) {
            for (uint64_t k = 0; k < len; k++)
                if (b[k] != (uint8_t)pattern) {
                    printf("Pattern verification failed at offset %llu, %llu bytes\n",
                           (unsigned long long)(off + k), (unsigned long long)len);
                    *mismatch = true;
                    break;
                }
        }
        free(b);
    } else if (!strcmp(op, "write")) {
        if (zero) {
            if (pms_write_zeroes(dev, len, off) < 0) { die("write -z"); ret = -1; }
        } else {
            uint8_t *b = malloc(len ? len : 1);
            memset(b, pattern >= 0 ? pattern : 0xcd, len);
            if (pms_pwrite(dev, b, len, off) < 0) { die("write"); ret = -1; }
            free(b);
        }
    } else if (!strcmp(op, "discard")) {
        if (pms_discard(dev, len, off) < 0) { die("discard"); ret = -1; }
    } else {
        fprintf(stderr, "%s: io: unknown command '%s'\n", prog, op);
        ret = -1;
    }
out:
    free(dup);
    return ret;
}

static int cmd_io(int argc, char **argv)
{
    const char *fmt = NULL;
    const char *cmds[256];
    int ncmd = 0, c;
    bool ro = false;
    optind = 1;
    while ((c = getopt(argc, argv, "f:c:Urn")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'c': if (ncmd < 256) cmds[ncmd++] = optarg; break;
        case 'r': ro = true; break;
        case 'U': case 'n': break;
        default: return 1;
        }
    }
    if (optind >= argc) { fprintf(stderr, "%s: io: no file\n", prog); return 1; }
    pms_dev *dev;
    if (open_img(argv[optind], fmt, ro, &dev)) return 1;
    bool mismatch = false;
    int ret = 0;
    for (int i = 0; i < ncmd; i++)
        if (io_one(dev, cmds[i], &mismatch) < 0) ret = 1;
    if (pms_close(dev) < 0) ret = die("close");
    return ret || mismatch;
}

/* ---- convert / read-raw -------------------------------------------------- */

static int dump_raw(const char *src, const char *fmt, const char *dst)
{
    pms_dev *dev;
    if (open_img(src, fmt, true, &dev)) return 1;
    int64_t size = pms_size(dev);
    int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(dst); pms_close(dev); return 1; }
    size_t chunk = 1 << 20;
    uint8_t *b = malloc(chunk);
    int ret = 0;
    for (int64_t off = 0; off < size; off += (int64_t)chunk) {
        size_t n = (size_t)(size - off) < chunk ? (size_t)(size - off) : chunk;
        if (pms_pread(dev, b, n, (uint64_t)off) < 0) { ret = die("read"); break; }
        if (pwrite(fd, b, n, off) != (ssize_t)n) { perror("write"); ret = 1; break; }
    }
    free(b);
    if (ftruncate(fd, size) < 0) ret = 1;
    close(fd);
    if (pms_close(dev) < 0) ret = die("close");
    return ret;
}

static int cmd_convert(int argc, char **argv)
{
    const char *fmt = NULL, *ofmt = "raw";
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "f:O:")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': ofmt = optarg; break;
        default: return 1;
        }
    }
    if (strcmp(ofmt, "raw") || optind + 2 != argc) {
        fprintf(stderr, "%s: convert: only -O raw SRC DST\n", prog);
        return 1;
    }
    return dump_raw(argv[optind], fmt, argv[optind + 1]);
}

/* ---- snapshot ------------------------------------------------------------ */

static int cmd_snapshot(int argc, char **argv)
{
    char op = 0;
    const char *name = NULL;
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "lc:a:d:")) != -1) {
        switch (c) {
        case 'l': op = 'l'; break;
        case 'c': case 'a': case 'd': op = (char)c; name = optarg; break;
        default: return 1;
        }
    }
    if (!op || optind >= argc) { fprintf(stderr, "%s: snapshot: usage\n", prog); return 1; }
    pms_dev *dev;
    if (open_img(argv[optind], NULL, op == 'l', &dev)) return 1;
    int r = 0, ret = 0;
    if (op == 'l') {
        struct pms_snapshot_info *l;
        size_t n;
        r = pms_snapshot_list(dev, &l, &n);
        if (r < 0) ret = die("snapshot list");
        else {
            for (size_t i = 0; i < n; i++)
                printf("%s\t%s\t%llu\n", l[i].id, l[i].name,
                       (unsigned long long)l[i].vm_state_size);
            pms_snapshot_list_free(l, n);
        }
    } else {
        if (op == 'c') r = pms_snapshot_create(dev, name);
        else if (op == 'a') r = pms_snapshot_revert(dev, name);
        else r = pms_snapshot_delete(dev, name);
        if (r < 0) ret = die("snapshot");
    }
    if (pms_close(dev) < 0) ret = die("close");
    return ret;
}

/* ---- info ------------------------------------------------------------------ */

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

static int cmd_info(int argc, char **argv)
{
    const char *file = argv[argc - 1];
    if (argc < 2) return 1;
    pms_dev *dev;
    if (open_img(file, NULL, true, &dev)) return 1;
    struct pms_info in = { .size = sizeof in };
    if (pms_info(dev, &in) < 0) { die("info"); pms_close(dev); return 1; }
    printf("{\n    \"virtual-size\": %llu,\n    \"filename\": ", (unsigned long long)in.virtual_size);
    json_str(file);
    printf(",\n    \"format\": ");
    json_str(in.format);
    if (in.cluster_size)
        printf(",\n    \"cluster-size\": %llu", (unsigned long long)in.cluster_size);
    if (in.backing_file[0]) {
        printf(",\n    \"backing-filename\": ");
        json_str(in.backing_file);
        if (in.backing_format[0]) {
            printf(",\n    \"backing-filename-format\": ");
            json_str(in.backing_format);
        }
    }
    if (!strcmp(in.format, "qcow2")) {
        printf(",\n    \"format-specific\": {\"type\": \"qcow2\", \"data\": {\"compat\": \"%s\"",
               in.qcow2_version >= 3 ? "1.1" : "0.10");
        if (in.qcow2_version >= 3)
            printf(", \"compression-type\": \"%s\", \"lazy-refcounts\": %s, \"refcount-bits\": %d, "
                   "\"corrupt\": %s, \"extended-l2\": %s",
                   in.compression_type[0] ? in.compression_type : "zlib",
                   in.lazy_refcounts ? "true" : "false", in.refcount_bits,
                   in.corrupt ? "true" : "false", in.extended_l2 ? "true" : "false");
        else
            printf(", \"compression-type\": \"zlib\", \"refcount-bits\": %d", in.refcount_bits);
        printf("}}");
    }
    printf(",\n    \"dirty-flag\": %s\n}\n", in.dirty_flag ? "true" : "false");
    pms_close(dev);
    return 0;
}

/* ---- check ----------------------------------------------------------------- */

static void check_msg(void *opaque, const char *msg)
{
    (void)opaque;
    printf("%s\n", msg);
}

static int cmd_check(int argc, char **argv)
{
    unsigned flags = 0;
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "r:f:")) != -1) {
        if (c == 'r') flags = !strcmp(optarg, "all") ? PMS_CHECK_REPAIR_ALL : PMS_CHECK_REPAIR_LEAKS;
        else if (c != 'f') return 1;
    }
    if (optind >= argc) return 1;
    pms_dev *dev;
    if (open_img(argv[optind], NULL, flags == 0, &dev)) return 1;
    struct pms_check_result res = { .size = sizeof res };
    int r = pms_check(dev, flags, &res, check_msg, NULL);
    pms_close(dev);
    if (r < 0) return die("check");
    printf("corruptions=%llu leaks=%llu check_errors=%llu fixed=%llu/%llu\n",
           (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
           (unsigned long long)res.check_errors, (unsigned long long)res.corruptions_fixed,
           (unsigned long long)res.leaks_fixed);
    if (res.check_errors) return 1;
    if (res.corruptions > res.corruptions_fixed) return 2;
    if (res.leaks > res.leaks_fixed) return 3;
    return 0;
}

/* ---- map -------------------------------------------------------------------- */

static int cmd_map(int argc, char **argv)
{
    if (argc < 2) return 1;
    pms_dev *dev;
    if (open_img(argv[argc - 1], NULL, true, &dev)) return 1;
    int64_t size = pms_size(dev);
    printf("[");
    bool first = true;
    for (uint64_t off = 0; off < (uint64_t)size; ) {
        struct pms_extent e;
        if (pms_block_status(dev, off, (uint64_t)size - off, &e) < 0) { pms_close(dev); return die("map"); }
        if (e.length == 0) break;
        printf("%s{ \"start\": %llu, \"length\": %llu, \"depth\": %d, \"zero\": %s, \"data\": %s",
               first ? "" : ",\n", (unsigned long long)e.start, (unsigned long long)e.length, e.depth,
               e.flags & PMS_BLOCK_ZERO ? "true" : "false", e.flags & PMS_BLOCK_DATA ? "true" : "false");
        if (e.flags & PMS_BLOCK_OFFSET) printf(", \"offset\": %llu", (unsigned long long)e.host_offset);
        printf("}");
        first = false;
        off = e.start + e.length;
    }
    printf("]\n");
    pms_close(dev);
    return 0;
}

/* ---- batch ------------------------------------------------------------------ */

struct fillctx {
    int mode;                /* 'r' ref, 'p' partial, 'f' false, 'm' marker */
    int ref;                 /* fd of the raw reference */
    const uint8_t *mem;      /* ... mapped and populated, as resident memory */
    size_t memlen;
    uint64_t calls, bytes;
};

static bool batch_fill(void *opaque, void *buf, uint64_t len, uint64_t off)
{
    struct fillctx *f = opaque;
    f->calls++;
    if (f->mode == 'f') return false;
    if (f->mode == 'm') {
        memset(buf, 0xee, len);
        f->bytes += len;
        return true;
    }
    if (f->mode == 'p')
        for (uint64_t pg = off / 4096; pg <= (off + len - 1) / 4096; pg++)
            if (pg % 3 == 0) return false;
    if (off + len > f->memlen) return false;
    memcpy(buf, f->mem + off, len);
    f->bytes += len;
    return true;
}

static int cmd_batch(int argc, char **argv)
{
    const char *fmt = NULL, *mode = "none", *ref = NULL;
    size_t per = 0;
    bool timing = false;
    int c;
    optind = 1;
    uint64_t l2cache = 0;
    while ((c = getopt(argc, argv, "f:m:r:b:tL:")) != -1) {
        switch (c) {
        case 'L': l2cache = strtoull(optarg, NULL, 0); break;
        case 'f': fmt = optarg; break;
        case 'm': mode = optarg; break;
        case 'r': ref = optarg; break;
        case 'b': per = (size_t)strtoull(optarg, NULL, 0); break;
        case 't': timing = true; break;
        default: return 1;
        }
    }
    if (optind + 2 != argc) { fprintf(stderr, "%s: batch: usage\n", prog); return 1; }
    struct fillctx fc = { .ref = -1 };
    bool pw = !strcmp(mode, "pwrite");
    if (!strcmp(mode, "ref")) fc.mode = 'r';
    else if (!strcmp(mode, "partial")) fc.mode = 'p';
    else if (!strcmp(mode, "false")) fc.mode = 'f';
    else if (!strcmp(mode, "marker")) fc.mode = 'm';
    else if (strcmp(mode, "none") && !pw) {
        fprintf(stderr, "%s: batch: unknown fill mode '%s'\n", prog, mode);
        return 1;
    }
    if ((fc.mode == 'r' || fc.mode == 'p') &&
        (!ref || (fc.ref = open(ref, O_RDONLY)) < 0)) {
        fprintf(stderr, "%s: batch: fill mode %s needs -r REF\n", prog, mode);
        return 1;
    }
    if (fc.ref >= 0) {
        struct stat st;
        if (fstat(fc.ref, &st) < 0 || st.st_size == 0 ||
            (fc.mem = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE,
                           fc.ref, 0)) == MAP_FAILED) {
            fprintf(stderr, "%s: batch: cannot map %s\n", prog, ref);
            close(fc.ref);
            return 1;
        }
        fc.memlen = (size_t)st.st_size;
    }
    FILE *rf = fopen(argv[optind], "r");
    if (!rf) { perror(argv[optind]); return 1; }
    struct bdev_wvec *v = NULL;
    size_t n = 0, cap = 0;
    unsigned long long o, l;
    int pat;
    while (fscanf(rf, "%llu %llu %i", &o, &l, &pat) == 3) {
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            v = realloc(v, cap * sizeof *v);
            if (!v) { fclose(rf); return 1; }
        }
        uint8_t *b = malloc(l ? l : 1);
        if (!b) { fclose(rf); return 1; }
        memset(b, pat, l);
        v[n++] = (struct bdev_wvec){ o, l, b };
    }
    fclose(rf);
    struct pms_open_opts oo;
    pms_open_opts_init(&oo);
    oo.format = fmt;
    oo.l2_cache_size = l2cache;
    struct bdev *bs;
    int ret = 0;
    if (bdev_open(argv[optind + 1], &oo, &bs) < 0) {
        ret = die(argv[optind + 1]);
        goto out;
    }
    if (!per) per = n ? n : 1;
    struct timespec t0, t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i < n && !ret; i += per) {
        size_t k = n - i < per ? n - i : per;
        int r = 0;
        if (pw)
            for (size_t j = i; j < i + k && r == 0; j++)
                r = bdev_pwrite(bs, v[j].buf, v[j].len, v[j].off);
        else
            r = bdev_pwrite_batch(bs, v + i, k, fc.mode ? batch_fill : NULL, &fc);
        if (r < 0) ret = die("batch");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!ret && bdev_flush(bs) < 0) ret = die("flush");
    clock_gettime(CLOCK_MONOTONIC, &t2);
    bdev_close(bs);
    if (timing)
        printf("runs=%zu write_ms=%.1f flush_ms=%.1f fill_calls=%llu fill_bytes=%llu\n", n,
               (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6,
               (t2.tv_sec - t1.tv_sec) * 1e3 + (t2.tv_nsec - t1.tv_nsec) / 1e6,
               (unsigned long long)fc.calls, (unsigned long long)fc.bytes);
out:
    for (size_t i = 0; i < n; i++) free((void *)v[i].buf);
    free(v);
    if (fc.mem) munmap((void *)fc.mem, fc.memlen);
    if (fc.ref >= 0) close(fc.ref);
    return ret;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s create|io|convert|read-raw|snapshot|info|check|map|batch ...\n", prog);
        return 1;
    }
    const char *cmd = argv[1];
    argc--; argv++;
    if (!strcmp(cmd, "create")) return cmd_create(argc, argv);
    if (!strcmp(cmd, "io")) return cmd_io(argc, argv);
    if (!strcmp(cmd, "convert")) return cmd_convert(argc, argv);
    if (!strcmp(cmd, "read-raw")) return argc == 3 ? dump_raw(argv[1], NULL, argv[2]) : 1;
    if (!strcmp(cmd, "snapshot")) return cmd_snapshot(argc, argv);
    if (!strcmp(cmd, "info")) return cmd_info(argc, argv);
    if (!strcmp(cmd, "check")) return cmd_check(argc, argv);
    if (!strcmp(cmd, "map")) return cmd_map(argc, argv);
    if (!strcmp(cmd, "batch")) return cmd_batch(argc, argv);
    fprintf(stderr, "%s: unknown command '%s'\n", prog, cmd);
    return 1;
}
