/* `pmemsnap io`: a qemu-io work-alike, so QEMU iotests-style scripts run
 * unchanged against pmemsnap's engine (QEMU 7.2's own iotests run with it
 * as $QEMU_IO_PROG: tests/iotests, `make iotests`).
 *
 * Command line: io [-f FMT] [-r] [-n] [-t CACHE] [-i AIO] [-U] [-k] [-d MODE]
 * [-s] [-C] [--image-opts] [-c CMD]... [FILE].  The -c commands run in
 * order; without -c, lines are read from stdin with a "qemu-io> " prompt,
 * as qemu-io does.  A failing command does not stop the following ones; the
 * exit status is 1 if any command failed (qemu-io 7.2 behaviour), and
 * `quit` stops early.
 *
 * Images are named as QEMU names them (blkopts.c): a path, `json:{...}`,
 * `blkdebug:[CONF]:FILE`, key=value lists (`open -o`, `--image-opts`);
 * -s writes to a temporary overlay, -C copies up from the backing file on
 * reads (cor_fill), `reopen` changes options with QEMU's checks.
 *
 * Commands: read, write (-b: the VM state area, -z [-u]: zero writes with or
 * without unmap), readv, writev, discard, flush (aio_flush), map, alloc,
 * length, info, truncate, open, reopen, close, sigraise, abort, sleep, help,
 * quit.  Each parses its arguments with getopt (argv[0] = command name, so
 * getopt's messages match qemu-io's), and prints qemu-io's lines: the
 * "wrote N/N bytes at offset O" report and its timing line, "Pattern
 * verification failed at offset O, N bytes", hexdumps (-v), "Parsing
 * error: ..." and the usage line on bad arguments.  What qemu-io prints on
 * stdout we print on stdout, what it prints on stderr we print on stderr
 * with the program name ("pmemsnap: ", or "qemu-io: " when run through a
 * link of that name).  Single threaded.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <stdint.h>
#include "util/size.h"
#include "blkopts.h"
#include "cli.h"

#define REQ_MAX 2147483136ULL      /* BDRV_REQUEST_MAX_BYTES */

struct io {
    pms_dev *dev;
    char *file;                    /* the name given (may be NULL: -o only) */
    struct blkopts opts;           /* the options it was opened with (reopen) */
    bool image_opts;               /* --image-opts: the name is key=value,... */
    bool snapshot;                 /* -s: writes go to a temporary overlay */
    bool cor_flag;                 /* -C: copy-on-read asked on the command line */
    struct bo_target cor;          /* .cor: reads copy from the backing file;
                                      .cor_rule: blkdebug's cor_write rule */
    uint64_t zero_align;           /* blkdebug on top with opt-write-zero: parts of a
                                      zero write not covering whole units of this
                                      are written as data (blkdebug refuses them) */
    bool readonly;
    bool raw;                      /* raw format: everything "allocated" */
    int cache_mode;
    bool force_share;
    const char *fmt;
    bool quit;
};

/* A write through QEMU's compress filter: the filter's requests are cluster
 * aligned, so the clusters the range touches are read, merged with the new
 * bytes and written compressed (the image's last cluster may be partial). */
static int filter_compressed(struct io *io, const uint8_t *buf, uint64_t len, uint64_t off)
{
    struct pms_info info = { .size = sizeof info };
    int r = pms_info(io->dev, &info);
    if (r < 0) return r;
    uint64_t cs = info.cluster_size;
    int64_t size = pms_size(io->dev);
    if (!cs || size < 0) return -ENOTSUP;
    if (!len) return 0;
    uint64_t a = off / cs * cs, e = (off + len + cs - 1) / cs * cs;
    if (e > (uint64_t)size) e = (uint64_t)size;
    uint8_t *b = malloc(e - a);
    if (!b) return -ENOMEM;
    r = 0;
    if (off > a)
        r = pms_pread(io->dev, b, (size_t)(e - a < cs ? e - a : cs), a);
    uint64_t last = (e - 1) / cs * cs;
    if (r == 0 && off + len < e && (last > a || off == a))
        r = pms_pread(io->dev, b + (last - a), (size_t)(e - last), last);
    if (r == 0) {
        memcpy(b + (off - a), buf, (size_t)len);
        r = pms_pwrite_compressed(io->dev, b, (size_t)(e - a), a);
    }
    free(b);
    return r;
}

/* A failed operation that found the image corrupt: the qcow2 driver words
 * it as QEMU does ("qcow2: Marking image as corrupt: ..."), printed on
 * stderr before the operation's own line as qemu-io prints it.  The driver
 * signals once per open image; the copy keeps a stale message from being
 * printed again by a later failure that set none. */
static void corrupt_note(void)
{
    static char last[600];
    const char *m = libmsg();
    if (strncmp(m, "qcow2: ", 7) != 0 || strncmp(m, last, sizeof last) == 0)
        return;
    snprintf(last, sizeof last, "%s", m);
    fflush(stdout);
    fprintf(stderr, "%s\n", m);
}

/* The name in "<name> failed: ..." lines: readv/writev run read/write. */
static const char *fail_read = "read", *fail_write = "write";

/* Temporary overlays of -s live here, as QEMU's (get_tmp_filename). */
#define SNAPSHOT_TMPDIR "/var/tmp"

struct iocmd {
    const char *name, *alt;
    int (*fn)(struct io *, int, char **);
    int argmin, argmax;            /* argmax -1 = unlimited */
    bool need_file, write;
    const char *args, *oneline, *help;
};

static const struct iocmd *find_cmd(const char *name);
static void cmd_usage(const struct iocmd *c)
{
    printf("%s %s -- %s\n", c->name, c->args, c->oneline);
}

/* ---- qemu-io output helpers ------------------------------------------------ */

static double tdiv(double v, struct timespec t)
{
    return v / ((double)t.tv_sec + (double)t.tv_nsec / 1e9);
}

static struct timespec tsub(struct timespec a, struct timespec b)
{
    struct timespec r = { a.tv_sec - b.tv_sec, a.tv_nsec - b.tv_nsec };
    if (r.tv_nsec < 0) { r.tv_sec--; r.tv_nsec += 1000000000L; }
    return r;
}

static void timestr(struct timespec t, char *ts, size_t n, bool fixed)
{
    double frac = (double)t.tv_nsec / 1e9;
    if (fixed || t.tv_sec >= 3600)
        snprintf(ts, n, "%u:%02u:%05.2f", (unsigned)(t.tv_sec / 3600),
                 (unsigned)((t.tv_sec % 3600) / 60), (double)(t.tv_sec % 60) + frac);
    else
        snprintf(ts, n, "%05.2f sec", (double)t.tv_sec + frac);
}

static void report(const char *op, struct timespec t, int64_t off, int64_t count,
                   int64_t total, int cnt, bool C)
{
    char s1[64], s2[64], ts[64];
    timestr(t, ts, sizeof ts, C);
    if (!C) {
        cvtstr((double)total, s1, sizeof s1);
        cvtstr(tdiv((double)total, t), s2, sizeof s2);
        printf("%s %" PRId64 "/%" PRId64 " bytes at offset %" PRId64 "\n", op, total, count,
               off);
        printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt, ts, s2,
               tdiv((double)cnt, t));
    } else
        printf("%" PRId64 ",%d,%s,%.3f,%.3f\n", total, cnt, ts, tdiv((double)total, t),
               tdiv((double)cnt, t));
}

static void dump_buffer(const uint8_t *p, int64_t off, int64_t len)
{
    for (int64_t i = 0; i < len; i += 16) {
        printf("%08" PRIx64 ":  ", (uint64_t)(off + i));
        for (int j = 0; j < 16 && i + j < len; j++)
            printf("%02x ", p[i + j]);
        printf(" ");
        for (int j = 0; j < 16 && i + j < len; j++)
            putchar(isalnum(p[i + j]) ? p[i + j] : '.');
        printf("\n");
    }
}

/* qemu_strtosz(): number with optional fraction and B/K/M/G/T/P/E suffix. */
static int64_t cvtnum(const char *s)
{
    uint64_t v;
    int r = pms_parse_size_ex(s, &v, true);
    if (r < 0)
        return r;
    if (v > INT64_MAX)
        return -ERANGE;
    return (int64_t)v;
}

static void cvtnum_err(int64_t rc, const char *arg)
{
    if (rc == -EINVAL)
        printf("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
               arg);
    else if (rc == -ERANGE)
        printf("Parsing error: argument too large -- %s\n", arg);
    else
        printf("Parsing error: %s\n", arg);
}

/* The OFF LEN pair every data command ends with. */
static int off_len(char **args, int64_t *off, int64_t *count)
{
    *off = cvtnum(args[0]);
    if (*off < 0) { cvtnum_err(*off, args[0]); return -EINVAL; }
    *count = cvtnum(args[1]);
    if (*count < 0) { cvtnum_err(*count, args[1]); return -EINVAL; }
    return 0;
}

/* off_len plus the request-size limit of read and discard. */
static int off_len_limited(char **args, int64_t *off, int64_t *count)
{
    if (off_len(args, off, count) < 0) return -EINVAL;
    if ((uint64_t)*count > REQ_MAX) {
        printf("length cannot exceed %" PRIu64 ", given %s\n", (uint64_t)REQ_MAX, args[1]);
        return -EINVAL;
    }
    return 0;
}

static int parse_pattern(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || end == s || *end || v < 0 || v > 0xff) {
        printf("%s is not a valid pattern byte\n", s);
        return -1;
    }
    return (int)v;
}

static int range_check(struct io *io, int64_t off, int64_t count)
{
    int64_t size = pms_size(io->dev);
    if (off < 0 || count < 0 || off > size || count > size - off)
        return -EIO;
    return 0;
}

static uint8_t *io_alloc(size_t n, int pattern)
{
    uint8_t *b = malloc(n ? n : 1);
    if (b)
        memset(b, pattern, n);
    return b;
}

/* ---- commands -------------------------------------------------------------- */

/* Bytes a copy-on-read step reads and writes at most (QEMU's bounce
 * buffer, MAX_BOUNCE_BUFFER: 16 MiB). */
#define COR_CHUNK (16ULL << 20)

/* Copy-on-read as QEMU's block layer: the clusters the read touches that
 * the top image does not hold are copied up from the backing chain, zeroes
 * as zero clusters (no unmap), data as data; clusters it holds are not
 * rewritten. */
static int cor_fill(struct io *io, uint64_t off, uint64_t len)
{
    struct pms_info info = { .size = sizeof info };
    int r = pms_info(io->dev, &info);
    if (r < 0) return r;
    uint64_t cs = info.cluster_size ? info.cluster_size : 512;
    uint64_t size = (uint64_t)pms_size(io->dev);
    uint64_t cur = off / cs * cs, end = (off + len + cs - 1) / cs * cs;
    if (end > size) end = size;
    uint8_t *b = NULL;
    while (cur < end && r == 0) {
        struct pms_extent e;
        uint64_t n = end - cur < COR_CHUNK ? end - cur : COR_CHUNK;
        r = pms_block_status(io->dev, cur, n, &e);
        if (r < 0) break;
        if (e.length < n) n = e.length;
        if ((e.flags & PMS_BLOCK_ALLOCATED) && e.depth == 0) {
            cur += n;
            continue;
        }
        if (io->cor.cor_rule && (io->cor.cor_sector < 0 ||
            ((uint64_t)io->cor.cor_sector * 512 >= cur &&
             (uint64_t)io->cor.cor_sector * 512 < cur + n))) {
            if (io->cor.cor_once) io->cor.cor_rule = false;
            r = -(io->cor.cor_errno ? io->cor.cor_errno : EIO);
            break;
        }
        if (!b && !(b = malloc(COR_CHUNK))) { r = -ENOMEM; break; }
        r = pms_pread(io->dev, b, (size_t)n, cur);
        if (r < 0) break;
        bool zero = true;
        for (uint64_t i = 0; i < n && zero; i++) zero = b[i] == 0;
        r = zero ? pms_write_zeroes_ex(io->dev, (size_t)n, cur, 0)
                 : pms_pwrite(io->dev, b, (size_t)n, cur);
        cur += n;
    }
    free(b);
    return r < 0 ? r : 0;
}

static int do_read(struct io *io, int argc, char **argv)
{
    bool C = false, q = false, v = false, P = false, vm = false;
    int pattern = 0, ch;
    int64_t poff = 0, pcount = -1;
    optind = 0;
    while ((ch = getopt(argc, argv, "bCl:pP:qs:v")) != -1) {
        switch (ch) {
        case 'b': vm = true; break;
        case 'C': C = true; break;
        case 'p': break;
        case 'q': q = true; break;
        case 'v': v = true; break;
        case 'P':
            P = true;
            if ((pattern = parse_pattern(optarg)) < 0) return -EINVAL;
            break;
        case 'l':
            if ((pcount = cvtnum(optarg)) < 0) { cvtnum_err(pcount, optarg); return -EINVAL; }
            break;
        case 's':
            if ((poff = cvtnum(optarg)) < 0) { cvtnum_err(poff, optarg); return -EINVAL; }
            break;
        default:
            cmd_usage(find_cmd("read"));
            return -EINVAL;
        }
    }
    if (optind != argc - 2) {
        cmd_usage(find_cmd("read"));
        return -EINVAL;
    }
    int64_t off, count;
    if (off_len_limited(argv + optind, &off, &count) < 0) return -EINVAL;
    if (!P && (poff || pcount >= 0)) {
        cmd_usage(find_cmd("read"));
        return -EINVAL;
    }
    if (pcount < 0)
        pcount = count - poff;
    if (poff > count || pcount < 0 || pcount > count - poff) {
        printf("pattern verification range exceeds end of read data\n");
        return -EINVAL;
    }
    uint8_t *buf = io_alloc((size_t)count, 0xab);
    if (!buf) {
        printf("read failed: %s\n", strerror(ENOMEM));
        return -ENOMEM;
    }
    struct timespec t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int r = vm ? 0 : range_check(io, off, count);
    if (r == 0 && !vm && io->cor.cor && count)
        r = cor_fill(io, (uint64_t)off, (uint64_t)count);
    if (r == 0)
        r = vm ? pms_vmstate_pread(io->dev, buf, (size_t)count, (uint64_t)off)
               : pms_pread(io->dev, buf, (size_t)count, (uint64_t)off);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    if (r < 0) {
        corrupt_note();
        printf("%s failed: %s\n", fail_read, strerror(-r));
        free(buf);
        return r;
    }
    r = 0;
    if (P) {
        for (int64_t i = 0; i < pcount; i++)
            if (buf[poff + i] != (uint8_t)pattern) {
                printf("Pattern verification failed at offset %" PRId64 ", %" PRId64 " bytes\n",
                       off + poff, pcount);
                r = -EINVAL;
                break;
            }
    }
    if (!q) {
        if (v)
            dump_buffer(buf, off, count);
        report("read", tsub(t2, t1), off, count, count, 1, C);
    }
    free(buf);
    return r;
}

/* write -z: as QEMU's block layer splits it at blkdebug's zero-write
 * alignment, the unaligned head and tail become ordinary writes. */
static int zero_write(struct io *io, uint64_t len, uint64_t off, bool unmap)
{
    uint64_t a = io->zero_align;
    while (len) {
        uint64_t n = len;
        bool data = false;
        if (a) {
            uint64_t head = off % a;
            if (head) n = a - head < len ? a - head : len;
            else if (len > a && len % a) n = len - len % a;
            data = n < a;
        }
        int r;
        if (data) {
            uint8_t *z = calloc(1, (size_t)n);
            if (!z) return -ENOMEM;
            r = pms_pwrite(io->dev, z, (size_t)n, off);
            free(z);
        } else
            r = pms_write_zeroes_ex(io->dev, (size_t)n, off, unmap ? PMS_ZERO_MAY_UNMAP : 0);
        if (r < 0) return r;
        off += n;
        len -= n;
    }
    return 0;
}

/* write_f()'s flag checks, in its order and words */
static bool write_flags_conflict(bool vm, bool compress, bool fua, bool nofallback,
                                 bool unmap, bool z)
{
    const char *msg =
        vm && z ? "-b and -z cannot be specified at the same time"
        : fua && (vm || compress) ? "-f and -b or -c cannot be specified at the same time"
        : nofallback && !z ? "-n requires -z to be specified"
        : unmap && !z ? "-u requires -z to be specified"
        : NULL;
    if (msg)
        printf("%s\n", msg);
    return msg != NULL;
}

static int do_write(struct io *io, int argc, char **argv)
{
    bool C = false, q = false, z = false, P = false, fua = false, unmap = false;
    bool nofallback = false, compress = false, vm = false;
    const char *src = NULL;
    int pattern = 0xcd, ch;
    optind = 0;
    while ((ch = getopt(argc, argv, "bcCfnpP:qs:uz")) != -1) {
        switch (ch) {
        case 'b': vm = true; break;
        case 'c': compress = true; break;
        case 'C': C = true; break;
        case 'f': fua = true; break;
        case 'n': nofallback = true; break;
        case 'p': break;
        case 'q': q = true; break;
        case 'u': unmap = true; break;
        case 'z': z = true; break;
        case 's': src = optarg; break;
        case 'P':
            P = true;
            if ((pattern = parse_pattern(optarg)) < 0) return -EINVAL;
            break;
        default:
            cmd_usage(find_cmd("write"));
            return -EINVAL;
        }
    }
    if (optind != argc - 2) {
        cmd_usage(find_cmd("write"));
        return -EINVAL;
    }
    if (write_flags_conflict(vm, compress, fua, nofallback, unmap, z))
        return -EINVAL;
    if ((int)z + (int)P + (src != NULL) > 1) {
        printf("Only one of -z, -P, and -s can be specified at the same time\n");
        return -EINVAL;
    }
    int64_t off, count;
    if (off_len(argv + optind, &off, &count) < 0) return -EINVAL;
    if ((uint64_t)count > REQ_MAX && !(z && nofallback)) {
        printf("length cannot exceed %" PRIu64 " without -n, given %s\n", (uint64_t)REQ_MAX,
               argv[optind + 1]);
        return -EINVAL;
    }
    uint8_t *buf = NULL;
    if (!z) {
        buf = io_alloc((size_t)count, pattern);
        if (!buf) {
            printf("write failed: %s\n", strerror(ENOMEM));
            return -ENOMEM;
        }
        if (src) {
            /* qemu_io_alloc_from_file(): perror() wording, and a file shorter
             * than the request is repeated to fill it */
            FILE *f = fopen(src, "r");
            if (!f) {
                fflush(stdout);
                fprintf(stderr, "%s: %s\n", src, strerror(errno));
                free(buf);
                return -EINVAL;
            }
            size_t got = fread(buf, 1, (size_t)count, f);
            int ferr = ferror(f);
            fclose(f);
            if (ferr || (got == 0 && count > 0)) {
                fflush(stdout);
                fprintf(stderr, "%s: %s\n", src, ferr ? strerror(EIO) : "file is empty");
                free(buf);
                return -EINVAL;
            }
            for (size_t k = got; got && k < (size_t)count; k++)
                buf[k] = buf[k % got];
        }
    }
    struct timespec t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int r = vm ? 0 : range_check(io, off, count);
    if (r == 0 && vm)
        r = z || compress ? -ENOTSUP : pms_vmstate_pwrite(io->dev, buf, (size_t)count,
                                                          (uint64_t)off);
    else if (r == 0)
        r = z ? zero_write(io, (uint64_t)count, (uint64_t)off, unmap)
              : compress ? pms_pwrite_compressed(io->dev, buf, (size_t)count, (uint64_t)off)
              : io->cor.compress ? filter_compressed(io, buf, (uint64_t)count, (uint64_t)off)
              : pms_pwrite(io->dev, buf, (size_t)count, (uint64_t)off);
    if (r >= 0 && fua)
        r = pms_flush(io->dev);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    free(buf);
    if (r < 0) {
        corrupt_note();
        printf("%s failed: %s\n", fail_write, strerror(-r));
        return r;
    }
    if (!q)
        report("wrote", tsub(t2, t1), off, count, count, 1, C);
    return 0;
}

static int do_discard(struct io *io, int argc, char **argv)
{
    bool C = false, q = false;
    int ch;
    optind = 0;
    while ((ch = getopt(argc, argv, "Cq")) != -1) {
        switch (ch) {
        case 'C': C = true; break;
        case 'q': q = true; break;
        default:
            cmd_usage(find_cmd("discard"));
            return -EINVAL;
        }
    }
    if (optind != argc - 2) {
        cmd_usage(find_cmd("discard"));
        return -EINVAL;
    }
    int64_t off, count;
    if (off_len_limited(argv + optind, &off, &count) < 0) return -EINVAL;
    struct timespec t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int r = range_check(io, off, count);
    if (r == 0)
        r = pms_discard(io->dev, (size_t)count, (uint64_t)off);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    if (r < 0) {
        corrupt_note();
        printf("discard failed: %s\n", strerror(-r));
        return r;
    }
    if (!q)
        report("discard", tsub(t2, t1), off, count, count, 1, C);
    return 0;
}

static int do_flush(struct io *io, int argc, char **argv)
{
    (void)argc; (void)argv;
    int r = pms_flush(io->dev);
    if (r < 0)
        fprintf(stderr, "%s: flush failed: %s\n", progname, libmsg());
    return r;
}

static int do_length(struct io *io, int argc, char **argv)
{
    (void)argc; (void)argv;
    int64_t size = pms_size(io->dev);
    char s[64];
    if (size < 0) {
        printf("getlength: %s\n", strerror((int)-size));
        return (int)size;
    }
    cvtstr((double)size, s, sizeof s);
    printf("%s\n", s);
    return 0;
}

/* qemu-io map: runs of "allocated in the top layer" vs not. */
static int is_alloc(struct io *io, uint64_t off, uint64_t len, uint64_t *num)
{
    int first = -1;
    uint64_t done = 0;
    while (done < len) {
        struct pms_extent e;
        uint64_t l = len - done;
        if (l > (1ULL << 30)) l = 1ULL << 30;
        int r = pms_block_status(io->dev, off + done, l, &e);
        if (r < 0)
            return r;
        int a = io->raw || ((e.flags & PMS_BLOCK_ALLOCATED) && e.depth == 0);
        if (first < 0) first = a;
        else if (a != first) break;
        done += e.length;
    }
    *num = done;
    return first;
}

static int do_map(struct io *io, int argc, char **argv)
{
    (void)argc; (void)argv;
    int64_t size = pms_size(io->dev);
    uint64_t off = 0, bytes = (uint64_t)size;
    char s1[64], s2[64];
    while (bytes) {
        uint64_t num;
        int r = is_alloc(io, off, bytes, &num);
        if (r < 0) {
            fprintf(stderr, "%s: Failed to get allocation status: %s\n", progname, libmsg());
            return r;
        }
        cvtstr((double)num, s1, sizeof s1);
        cvtstr((double)off, s2, sizeof s2);
        printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n", s1, num,
               r ? "    allocated" : "not allocated", s2, off);
        off += num;
        bytes -= num;
    }
    return 0;
}

/* QemuOpts booleans: on/off (yes/no, true/false from JSON). */
static int bool_opt(const struct blkopts *o, const char *key, int dflt, char *err, size_t n)
{
    const char *v = bo_get(o, key);
    if (!v) return dflt;
    if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "y"))
        return 1;
    if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false") || !strcmp(v, "n"))
        return 0;
    snprintf(err, n, "Parameter '%s' expects 'on' or 'off'", key);
    return -1;
}

static const char *const bool_keys[] = {
    "read-only", "auto-read-only", "cache.direct", "cache.no-flush", "force-share",
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
    "pass-discard-other", "discard-no-unref",
};

static int size_opt(const struct blkopts *o, const char *key, uint64_t *v, bool *set)
{
    const char *s = bo_get(o, key);
    *set = s != NULL;
    *v = 0;
    return s ? parse_size(s, v) : 0;
}

/* QEMU's qcow2 option checks (read_cache_sizes, qcow2_update_options_prepare),
 * in its order and wording; fills the cache sizes pms_open() takes. */
static int qcow2_opts(const struct blkopts *o, const struct pms_info *info,
                      struct pms_open_opts *po, char *err, size_t n)
{
    uint64_t cs, l2, rc, es;
    bool cs_set, l2_set, rc_set, es_set;
    if (size_opt(o, "cache-size", &cs, &cs_set) < 0 ||
        size_opt(o, "l2-cache-size", &l2, &l2_set) < 0 ||
        size_opt(o, "refcount-cache-size", &rc, &rc_set) < 0 ||
        size_opt(o, "l2-cache-entry-size", &es, &es_set) < 0) {
        snprintf(err, n, "Parameter expects a size");
        return -1;
    }
    uint64_t csz = info->cluster_size;
    if (!es_set) es = csz;
    if (cs_set) {
        if (l2_set && rc_set) {
            snprintf(err, n, "cache-size, l2-cache-size and refcount-cache-size may not be "
                     "set at the same time");
            return -1;
        }
        if (l2_set && l2 > cs) {
            snprintf(err, n, "l2-cache-size may not exceed cache-size");
            return -1;
        }
        if (rc > cs) {
            snprintf(err, n, "refcount-cache-size may not exceed cache-size");
            return -1;
        }
        if (l2_set) rc = cs - l2;
        else if (rc_set) l2 = cs - rc;
        else { l2 = cs; rc = 0; }   /* the default split gives L2 what it can use */
        l2_set = rc_set = true;
    }
    if (es < 512 || es > csz || (es & (es - 1))) {
        snprintf(err, n, "L2 cache entry size must be a power of two between 512 and the "
                 "cluster size (%" PRIu64 ")", csz);
        return -1;
    }
    if (l2_set && l2 / es > INT32_MAX) {
        snprintf(err, n, "L2 cache size too big");
        return -1;
    }
    if (rc_set && rc / csz > INT32_MAX) {
        snprintf(err, n, "Refcount cache size too big");
        return -1;
    }
    const char *ci = bo_get(o, "cache-clean-interval");
    uint64_t civ;
    if (ci && (parse_uint(ci, &civ) < 0 || civ > UINT32_MAX)) {
        snprintf(err, n, "Cache clean interval too big");
        return -1;
    }
    int lazy = bool_opt(o, "lazy-refcounts", 0, err, n);
    if (lazy < 0) return -1;
    if (lazy && info->qcow2_version < 3) {
        snprintf(err, n, "Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                 "compatibility level");
        return -1;
    }
    const char *ov = bo_get(o, "overlap-check"), *ovt = bo_get(o, "overlap-check.template");
    if (ov && ovt && strcmp(ov, ovt)) {
        snprintf(err, n, "Conflicting values for qcow2 options 'overlap-check' ('%s') and "
                 "'overlap-check.template' ('%s')", ov, ovt);
        return -1;
    }
    if (!ov) ov = ovt;
    if (ov && strcmp(ov, "none") && strcmp(ov, "constant") && strcmp(ov, "cached") &&
        strcmp(ov, "all")) {
        snprintf(err, n, "Unsupported value '%s' for qcow2 option 'overlap-check'. Allowed "
                 "are any of the following: none, constant, cached, all", ov);
        return -1;
    }
    if (po) {
        po->l2_cache_size = l2_set ? l2 : 0;
        po->refcount_cache_size = rc_set ? rc : 0;
        po->lazy_refcounts = bo_get(o, "lazy-refcounts") ? (lazy ? 1 : -1) : 0;
    }
    return 0;
}

/* -s: a temporary qcow2 overlay over the image, removed when closed. */
static int snapshot_overlay(struct io *io, const char *base, const char *fmt,
                            struct pms_open_opts *po, char *err, size_t n)
{
    char tmpl[] = SNAPSHOT_TMPDIR "/vl.XXXXXX";
    int fd = mkstemp(tmpl);
    if (fd < 0) {
        snprintf(err, n, "Could not get temporary filename: %s", strerror(errno));
        return -1;
    }
    close(fd);
    char *abs = realpath(base, NULL);
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    co.backing_file = abs ? abs : base;
    co.backing_format = fmt;
    int r = pms_create(tmpl, 0, &co);
    free(abs);
    if (r == 0) {
        struct pms_open_opts o2 = *po;
        o2.format = "qcow2";
        o2.readonly = 0;
        r = pms_open(tmpl, &o2, &io->dev);
    }
    unlink(tmpl);              /* the open file lives on until closed */
    if (r < 0)
        snprintf(err, n, "%s", libmsg());
    return r;
}

/* The report of the repair an open of a dirty image runs: on stderr, as
 * QEMU's qcow2 driver prints it. */
static void repair_line(void *opaque, const char *m)
{
    (void)opaque;
    fflush(stdout);
    fprintf(stderr, "%s\n", m);
}

/* Open `name` (NULL: the options name the image) with the options in *extra
 * (taken over), as qemu-io's openfile().  Prints qemu-io's error line. */
static int io_open_opts(struct io *io, const char *name, struct blkopts *extra)
{
    struct blkopts o = *extra;
    char err[1024] = "";
    struct bo_target t = { 0 };
    pms_dev *dev = NULL;
    *extra = (struct blkopts){ 0 };
    if (name && (io->image_opts ? bo_parse_keyval(&o, name, err, sizeof err)
                                : bo_parse_filename(&o, name, err, sizeof err)) < 0)
        goto fail;
    for (size_t i = 0; i < sizeof bool_keys / sizeof bool_keys[0]; i++)
        if (bool_opt(&o, bool_keys[i], 0, err, sizeof err) < 0)
            goto fail;
    if (bool_opt(&o, "read-only", 0, err, sizeof err) == 1)
        io->readonly = true;
    if (bool_opt(&o, "force-share", 0, err, sizeof err) == 1)
        io->force_share = true;
    if (bool_opt(&o, "cache.direct", 0, err, sizeof err) == 1)
        io->cache_mode = PMS_CACHE_NONE;
    if (io->force_share && !io->readonly) {
        snprintf(err, sizeof err, "force-share=on can only be used with read-only images");
        goto fail;
    }
    t.readonly = io->readonly;
    if (bo_resolve(&o, &t, err, sizeof err) < 0)
        goto fail;
    if (io->cor_flag && io->readonly) {
        snprintf(err, sizeof err, "Can't use copy-on-read on read-only device");
        goto fail;
    }
    if (t.cor && io->readonly) {
        snprintf(err, sizeof err, "Block node is read-only");
        goto fail;
    }
    const char *fmt = t.format ? t.format : io->fmt;
    if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
        snprintf(err, sizeof err, "Unknown driver '%s'", fmt);
        goto fail;
    }
    struct pms_open_opts po;
    pms_open_opts_init(&po);
    po.format = fmt;
    po.readonly = io->readonly || io->snapshot;
    po.cache_mode = io->cache_mode;
    po.force_share = io->force_share;
    po.repair_msg = repair_line;
    po.backing_format = bo_get(&o, "backing.driver");
    po.inject_l2_update = t.l2_update_errno;
    const char *bk = bo_get(&o, "backing");
    po.no_backing = bk && (!strcmp(bk, "null") || !*bk);
    if (pms_open(t.filename, &po, &dev) < 0) {
        snprintf(err, sizeof err, "%s", libmsg());
        goto fail;
    }
    struct pms_info info = { .size = sizeof info };
    pms_info(dev, &info);
    if (info.qcow2_version) {
        struct pms_open_opts po2 = po;
        if (qcow2_opts(&o, &info, &po2, err, sizeof err) < 0)
            goto fail;
        if (po2.l2_cache_size || po2.refcount_cache_size || po2.lazy_refcounts) {
            /* reopen with the caches (lazy refcounts) asked for */
            pms_close(dev);
            dev = NULL;
            po = po2;
            if (pms_open(t.filename, &po, &dev) < 0) {
                snprintf(err, sizeof err, "%s", libmsg());
                goto fail;
            }
        }
    } else if (bo_get(&o, "lazy-refcounts") || bo_get(&o, "cache-size") ||
               bo_get(&o, "l2-cache-size")) {
        const char *k = bo_get(&o, "lazy-refcounts") ? "lazy-refcounts" :
                        bo_get(&o, "cache-size") ? "cache-size" : "l2-cache-size";
        snprintf(err, sizeof err, "Block format 'raw' does not support the option '%s'", k);
        goto fail;
    }
    if (io->snapshot) {
        pms_close(dev);
        dev = NULL;
        if (snapshot_overlay(io, t.filename, info.format, &po, err, sizeof err) < 0)
            goto fail;
        dev = io->dev;
    }
    io->cor = t;
    io->cor.cor = t.cor || io->cor_flag;
    io->zero_align = 0;
    const char *top = bo_get(&o, "driver"), *owz = bo_get(&o, "opt-write-zero");
    uint64_t a = 0, ra = 0;
    if (top && !strcmp(top, "blkdebug") && owz && parse_size(owz, &a) == 0) {
        const char *al = bo_get(&o, "align");
        if (al && parse_size(al, &ra) == 0 && ra > a) a = ra;
        io->zero_align = a;
    }
    io->dev = dev;
    io->file = name ? strdup(name) : NULL;
    io->opts = o;
    io->raw = strcmp(info.format, "raw") == 0;
    return 0;
fail:
    if (dev)
        pms_close(dev);
    io->dev = NULL;
    bo_free(&o);
    fflush(stdout);
    fprintf(stderr, "%s: can't open%s%s: %s\n", progname, name ? " device " : "",
            name ? name : "", err);
    return -EINVAL;
}

static int io_open(struct io *io, const char *file)
{
    struct blkopts none = { 0 };
    return io_open_opts(io, file, &none);
}

static int io_close(struct io *io)
{
    int r = 0;
    if (io->dev && pms_close(io->dev) < 0) {
        fprintf(stderr, "%s: %s\n", progname, libmsg());
        r = -EIO;
    }
    io->dev = NULL;
    free(io->file);
    io->file = NULL;
    bo_free(&io->opts);
    return r;
}

static int do_open(struct io *io, int argc, char **argv)
{
    int ch;
    struct blkopts o = { 0 };
    char err[512];
    if (io->dev) {
        fprintf(stderr, "%s: file open already, try 'help close'\n", progname);
        return -EBUSY;
    }
    io->readonly = false;
    io->force_share = false;
    io->snapshot = false;
    io->cor_flag = false;
    io->fmt = NULL;
    optind = 0;
    while ((ch = getopt(argc, argv, "snCro:kt:d:U")) != -1) {
        switch (ch) {
        case 'r': io->readonly = true; break;
        case 'C': io->cor_flag = true; break;
        case 's': io->snapshot = true; break;
        case 'n': io->cache_mode = PMS_CACHE_NONE; break;
        case 'U': io->force_share = true; break;
        case 't':
            if (parse_cache_mode(optarg, &io->cache_mode) < 0) {
                fprintf(stderr, "%s: Invalid cache option: %s\n", progname, optarg);
                bo_free(&o);
                return -EINVAL;
            }
            break;
        case 'k': case 'd': break;
        case 'o':
            if (bo_parse_keyval(&o, optarg, err, sizeof err) < 0) {
                fprintf(stderr, "%s: %s\n", progname, err);
                bo_free(&o);
                return -EINVAL;
            }
            break;
        default:
            cmd_usage(find_cmd("open"));
            bo_free(&o);
            return -EINVAL;
        }
    }
    if (optind != argc - 1 && !(optind == argc && o.n)) {
        cmd_usage(find_cmd("open"));
        bo_free(&o);
        return -EINVAL;
    }
    return io_open_opts(io, optind < argc ? argv[optind] : NULL, &o);
}

/* The options after a reopen: the old ones QEMU keeps (qcow2_join_options:
 * new overlap-check options replace all old ones, a new cache-size the old
 * partial sizes), then the new ones. */
static int join_opts(struct blkopts *dst, const struct blkopts *old, const struct blkopts *nw,
                     bool drop_filename)
{
    bool new_ov = bo_get(nw, "overlap-check") || bo_get(nw, "overlap-check.template");
    bool new_cs = bo_get(nw, "cache-size") != NULL;
    for (size_t i = 0; i < old->n; i++) {
        const char *k = old->v[i].key;
        if ((drop_filename && !strcmp(k, "filename")) ||
            (new_ov && !strncmp(k, "overlap-check", 13)) ||
            (new_cs && (!strcmp(k, "l2-cache-size") || !strcmp(k, "refcount-cache-size"))))
            continue;
        if (bo_set(dst, k, old->v[i].val) < 0) return -1;
    }
    for (size_t i = 0; i < nw->n; i++)
        if (bo_set(dst, nw->v[i].key, nw->v[i].val) < 0) return -1;
    if (!new_cs && bo_get(dst, "cache-size") && bo_get(dst, "l2-cache-size") &&
        bo_get(dst, "refcount-cache-size")) {
        /* all three set after the merge: the old total gives way */
        struct blkopts t = { 0 };
        for (size_t i = 0; i < dst->n; i++)
            if (strcmp(dst->v[i].key, "cache-size") &&
                bo_set(&t, dst->v[i].key, dst->v[i].val) < 0) { bo_free(&t); return -1; }
        bo_free(dst);
        *dst = t;
    }
    return 0;
}

/* reopen [-d] [-r|-w] [-c cache] [-o options]: the image again with changed
 * options; what cannot change is refused with QEMU's messages and the image
 * stays open as it was. */
static int do_reopen(struct io *io, int argc, char **argv)
{
    int ch, ro = -1, cache = -1;
    struct blkopts o = { 0 };
    char err[512] = "";
    optind = 0;
    while ((ch = getopt(argc, argv, "c:o:rw")) != -1) {
        switch (ch) {
        case 'c':
            if (parse_cache_mode(optarg, &cache) < 0) {
                fprintf(stderr, "%s: Invalid cache option: %s\n", progname, optarg);
                bo_free(&o);
                return -EINVAL;
            }
            break;
        case 'o':
            if (bo_parse_keyval(&o, optarg, err, sizeof err) < 0) {
                fprintf(stderr, "%s: %s\n", progname, err);
                bo_free(&o);
                return -EINVAL;
            }
            break;
        case 'r':
            if (ro == 0) goto both;
            ro = 1;
            break;
        case 'w':
            if (ro == 1) goto both;
            ro = 0;
            break;
        default:
            cmd_usage(find_cmd("reopen"));
            bo_free(&o);
            return -EINVAL;
        }
    }
    if (optind != argc) {
        cmd_usage(find_cmd("reopen"));
        bo_free(&o);
        return -EINVAL;
    }
    if (ro >= 0 && bo_get(&o, "read-only")) {
        snprintf(err, sizeof err, "Cannot set both -r/-w and 'read-only'");
        goto fail;
    }
    if (cache >= 0 && (bo_get(&o, "cache.direct") || bo_get(&o, "cache.no-flush"))) {
        snprintf(err, sizeof err, "Cannot set both -c and the cache options");
        goto fail;
    }
    struct pms_info cur = { .size = sizeof cur };
    pms_info(io->dev, &cur);
    /* what each node is when no option named it */
    const char *fixed[][2] = {
        { "node-name", NULL }, { "driver", cur.format },
        { "file.node-name", NULL }, { "file.driver", "file" },
        { "backing.node-name", NULL },
        { "backing.driver", cur.backing_format[0] ? cur.backing_format : "qcow2" },
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        const char *nv = bo_get(&o, fixed[i][0]), *ov = bo_get(&io->opts, fixed[i][0]);
        if (!ov) ov = fixed[i][1];
        if (nv && (!ov || strcmp(nv, ov))) {
            snprintf(err, sizeof err, "Cannot change the option '%s'",
                     strchr(fixed[i][0], '.') ? strchr(fixed[i][0], '.') + 1 : fixed[i][0]);
            goto fail;
        }
    }
    for (size_t i = 0; i < sizeof bool_keys / sizeof bool_keys[0]; i++)
        if (bool_opt(&o, bool_keys[i], 0, err, sizeof err) < 0)
            goto fail;
    /* options no node can change at runtime: QEMU refuses a new value */
    static const char *const runtime[] = {
        "read-only", "auto-read-only", "cache.direct", "cache.no-flush", "force-share",
        "discard", "detect-zeroes", "lazy-refcounts", "pass-discard-request",
        "pass-discard-snapshot", "pass-discard-other", "discard-no-unref", "cache-size",
        "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
        "cache-clean-interval", "overlap-check", "filename",
    };
    for (size_t i = 0; i < o.n; i++) {
        const char *k = o.v[i].key, *ov = bo_get(&io->opts, k);
        bool known = !strncmp(k, "overlap-check.", 14);
        for (size_t j = 0; j < sizeof fixed / sizeof fixed[0] && !known; j++)
            known = !strcmp(k, fixed[j][0]);
        for (size_t j = 0; j < sizeof runtime / sizeof runtime[0] && !known; j++)
            known = !strcmp(k, runtime[j]);
        if (!known && (!ov || strcmp(ov, o.v[i].val))) {
            snprintf(err, sizeof err, "Cannot change the option '%s'", k);
            goto fail;
        }
    }
    struct pms_info info = { .size = sizeof info };
    pms_info(io->dev, &info);
    /* the options in force after the reopen: the old ones, then the new */
    struct blkopts merged = { 0 };
    if (join_opts(&merged, &io->opts, &o, false) < 0) goto oom;
    if (info.qcow2_version && qcow2_opts(&merged, &info, NULL, err, sizeof err) < 0) {
        bo_free(&merged);
        goto fail;
    }
    bool readonly = ro >= 0 ? ro : bool_opt(&merged, "read-only", io->readonly, err, sizeof err);
    if (io->snapshot && !readonly) readonly = false;
    int cmode = cache >= 0 ? cache : io->cache_mode;
    /* the name and format stay: reopen what is open now */
    char *name = io->file ? strdup(io->file) : NULL;
    bool old_ro = io->readonly, snap = io->snapshot;
    if (snap) {                /* the overlay would be lost: only flags change */
        io->readonly = readonly;
        bo_free(&io->opts);
        io->opts = merged;
        free(name);
        bo_free(&o);
        return 0;
    }
    struct blkopts keep = { 0 };
    if (join_opts(&keep, &io->opts, &o, true) < 0) goto oom2;
    if (bo_get(&keep, "read-only"))
        bo_set(&keep, "read-only", readonly ? "on" : "off");
    struct blkopts fallback = { 0 };
    for (size_t i = 0; i < keep.n; i++)
        bo_set(&fallback, keep.v[i].key, keep.v[i].val);
    const char *fn = bo_get(&io->opts, "filename");
    char *fname = fn && !name ? strdup(fn) : NULL;
    if (fname) bo_set(&keep, "filename", fname);
    int r = io_close(io);
    io->readonly = readonly;
    io->cache_mode = cmode;
    io->force_share = io->force_share && readonly;
    if (r == 0)
        r = io_open_opts(io, name, &keep);
    if (r < 0) {               /* back to what was open */
        io->readonly = old_ro;
        if (fname) bo_set(&fallback, "filename", fname);
        io_open_opts(io, name, &fallback);
    }
    bo_free(&fallback);
    bo_free(&keep);
    bo_free(&merged);
    bo_free(&o);
    free(name);
    free(fname);
    return r;
oom2:
    bo_free(&keep);
oom:
    bo_free(&merged);
    snprintf(err, sizeof err, "%s", strerror(ENOMEM));
    goto fail;
both:
    snprintf(err, sizeof err, "Only one of -r and -w may be specified");
fail:
    bo_free(&o);
    fflush(stdout);
    fprintf(stderr, "%s: %s\n", progname, err);
    return -EINVAL;
}

/* sigraise SIGNUM: die by that signal with nothing flushed or closed, as
 * qemu-io (for tests of what an interrupted writer leaves behind). */
static int do_sigraise(struct io *io, int argc, char **argv)
{
    (void)io; (void)argc;
    char *end;
    long sig = strtol(argv[1], &end, 10);
    if (*end || sig < 0 || sig > NSIG) {
        printf("non-numeric signal number argument -- %s\n", argv[1]);
        return -EINVAL;
    }
    fflush(stdout);
    fflush(stderr);
    raise((int)sig);
    return 0;
}

static int do_close(struct io *io, int argc, char **argv)
{
    (void)argc; (void)argv;
    return io_close(io);
}

static int do_quit(struct io *io, int argc, char **argv)
{
    (void)argc; (void)argv;
    io->quit = true;
    return 0;
}

static int do_sleep(struct io *io, int argc, char **argv)
{
    (void)io; (void)argc;
    char *end;
    long ms = strtol(argv[1], &end, 10);
    if (ms < 0 || *end) {
        printf("%s is not a valid number\n", argv[1]);
        return -EINVAL;
    }
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
    return 0;
}


/* readv/writev: several lengths, one request of their sum (same report). */
static int do_vec(struct io *io, int argc, char **argv, bool write)
{
    const char *name = write ? "writev" : "readv";
    const char *C = NULL, *f = NULL, *q = NULL, *v = NULL, *pat = NULL;
    char *nargv[16], tot[32];
    int n = 0, ch;
    optind = 0;
    while ((ch = getopt(argc, argv, write ? "CfqP:" : "CqvP:")) != -1) {
        switch (ch) {                  /* repeated flags count once */
        case 'C': C = "-C"; break;
        case 'f': f = "-f"; break;
        case 'q': q = "-q"; break;
        case 'v': v = "-v"; break;
        case 'P': pat = optarg; break;
        default:
            cmd_usage(find_cmd(name));
            return -EINVAL;
        }
    }
    if (optind > argc - 2) {
        cmd_usage(find_cmd(name));
        return -EINVAL;
    }
    uint64_t total = 0;
    for (int i = optind + 1; i < argc; i++) {
        int64_t l = cvtnum(argv[i]);
        if (l < 0) { cvtnum_err(l, argv[i]); return -EINVAL; }
        if ((uint64_t)l > REQ_MAX) {   /* qemu-io's create_iovec() */
            printf("Argument '%s' exceeds maximum size %" PRIu64 "\n", argv[i],
                   (uint64_t)REQ_MAX);
            return -EINVAL;
        }
        total += (uint64_t)l;          /* < 62 * 2^31: no overflow */
    }
    if (total > REQ_MAX) {
        printf("length cannot exceed %" PRIu64 ", given %" PRIu64 "\n", (uint64_t)REQ_MAX,
               total);
        return -EINVAL;
    }
    snprintf(tot, sizeof tot, "%" PRIu64, total);
    nargv[n++] = write ? "write" : "read";
    if (C) nargv[n++] = (char *)C;
    if (f) nargv[n++] = (char *)f;
    if (q) nargv[n++] = (char *)q;
    if (v) nargv[n++] = (char *)v;
    if (pat) { nargv[n++] = "-P"; nargv[n++] = (char *)pat; }
    nargv[n++] = argv[optind];
    nargv[n++] = tot;
    nargv[n] = NULL;                   /* at most 10 of 16 */
    fail_read = "readv";
    fail_write = "writev";
    int r = write ? do_write(io, n, nargv) : do_read(io, n, nargv);
    fail_read = "read";
    fail_write = "write";
    return r;
}
static int do_readv(struct io *io, int argc, char **argv) { return do_vec(io, argc, argv, false); }
static int do_writev(struct io *io, int argc, char **argv) { return do_vec(io, argc, argv, true); }

/* alloc OFF [LEN]: bytes allocated in the top layer, LEN clipped to the
 * end of the image (default 512), as qemu-io prints it. */
static int do_alloc(struct io *io, int argc, char **argv)
{
    int64_t off = cvtnum(argv[1]), count = 512;
    if (off < 0) { cvtnum_err(off, argv[1]); return -EINVAL; }
    if (argc == 3) {
        count = cvtnum(argv[2]);
        if (count < 0) { cvtnum_err(count, argv[2]); return -EINVAL; }
    }
    int64_t size = pms_size(io->dev);
    if (size < 0) size = 0;
    int64_t rem = off >= size ? 0 : (count < size - off ? count : size - off);
    uint64_t sum = 0, cur = (uint64_t)off;
    int64_t total = rem;
    while (rem > 0) {
        uint64_t num;
        int r = is_alloc(io, cur, (uint64_t)rem, &num);
        if (r < 0) {
            printf("is_allocated failed: %s\n", strerror(-r));
            return r;
        }
        if (num == 0) break;
        if (r) sum += num;
        cur += num;
        rem -= (int64_t)num;
    }
    char s1[64];
    cvtstr((double)off, s1, sizeof s1);
    printf("%" PRIu64 "/%" PRId64 " bytes allocated at offset %s\n", sum, total, s1);
    return 0;
}

/* truncate [-m prealloc] SIZE: grows or shrinks the image; the
 * preallocation mode is accepted and ignored (new space reads as zeroes). */
static int do_truncate(struct io *io, int argc, char **argv)
{
    int ch;
    optind = 1;
    while ((ch = getopt(argc, argv, "m:")) != -1)
        if (ch != 'm')
            return -EINVAL;
    if (optind != argc - 1) {
        printf("truncate [-m prealloc_mode] off -- truncates the current file at the given "
               "offset\n");
        return -EINVAL;
    }
    int64_t size = cvtnum(argv[optind]);
    if (size < 0) { cvtnum_err(size, argv[optind]); return -EINVAL; }
    int r = pms_truncate(io->dev, (uint64_t)size);
    if (r < 0)
        fprintf(stderr, "%s: %s\n", progname, libmsg());
    return r;
}

/* info: the same facts as qemu-io's, format-specific part as qemu-img info. */
static int do_info(struct io *io, int argc, char **argv)
{
    (void)argc; (void)argv;
    struct pms_info info = { .size = sizeof info };
    int r = pms_info(io->dev, &info);
    if (r < 0) {
        fprintf(stderr, "%s: %s\n", progname, libmsg());
        return r;
    }
    uint64_t vmoff = 0;
    if (info.cluster_size && info.qcow2_version) {
        /* QEMU's vm state lives past the last guest L2 table's coverage */
        uint64_t cov = info.cluster_size * (info.cluster_size / (info.extended_l2 ? 16 : 8));
        vmoff = (info.virtual_size + cov - 1) / cov * cov;
    }
    char s1[64], s2[64];
    cvtstr((double)info.cluster_size, s1, sizeof s1);
    cvtstr((double)vmoff, s2, sizeof s2);
    printf("format name: %s\ncluster size: %s\nvm state offset: %s\n", info.format, s1, s2);
    if (info.qcow2_version)
        print_qcow2_specific(&info);
    return 0;
}

static int do_abort(struct io *io, int argc, char **argv)
{
    (void)io; (void)argc; (void)argv;
    fflush(stdout);
    abort();                   /* a crash, as qemu-io's: nothing is closed */
}

static int do_help(struct io *io, int argc, char **argv);

static const struct iocmd iocmds[] = {
    { "read", "r", do_read, 2, -1, true, false,
      "[-abCqv] [-P pattern [-s off] [-l len]] off len",
      "reads a number of bytes at a specified offset",
      " reads a range of bytes from the given offset\n\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -l, -- length for pattern verification (only with -P)\n"
      " -p, -- ignored for backwards compatibility\n"
      " -P, -- use a pattern to verify read data\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      " -s, -- start offset for pattern verification (only with -P)\n"
      " -v, -- dump buffer to standard output\n" },
    { "write", "w", do_write, 2, -1, true, true,
      "[-bcCfnquz] [-P pattern | -s source_file] off len",
      "writes a number of bytes at a specified offset",
      " writes a range of bytes from the given offset\n\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -f, -- flush after the write (forced unit access)\n"
      " -P, -- use different pattern to fill file (default 0xcd)\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      " -s, -- use the contents of a file as the data\n"
      " -u, -- with -z, allow unmapping\n"
      " -z, -- write zeroes\n" },
    { "aio_read", NULL, do_read, 2, -1, true, false, "[-Cqv] [-P pattern] off len",
      "reads a number of bytes (run synchronously)", NULL },
    { "aio_write", NULL, do_write, 2, -1, true, true, "[-Cfquz] [-P pattern] off len",
      "writes a number of bytes (run synchronously)", NULL },
    { "alloc", "a", do_alloc, 1, 2, true, false, "offset [count]",
      "checks if offset is allocated in the file", NULL },
    { "truncate", "t", do_truncate, 1, 3, true, true, "[-m prealloc_mode] off",
      "truncates the current file at the given offset", NULL },
    { "info", "i", do_info, 0, 0, true, false, "", "prints information about the current file",
      NULL },
    { "abort", NULL, do_abort, 0, 0, false, false, "",
      "simulate a program crash using abort(3)", NULL },
    { "readv", NULL, do_readv, 2, -1, true, false, "[-Cqv] [-P pattern] off len [len..]",
      "reads a number of bytes at a specified offset", NULL },
    { "writev", NULL, do_writev, 2, -1, true, true, "[-Cfq] [-P pattern] off len [len..]",
      "writes a number of bytes at a specified offset", NULL },
    { "discard", "d", do_discard, 2, -1, true, true, "[-Cq] off len",
      "discards a number of bytes at a specified offset",
      " discards a range of bytes from the given offset\n\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -q, -- quiet mode, do not show I/O statistics\n" },
    { "flush", "f", do_flush, 0, 0, true, false, "",
      "flush all in-core file state to disk", NULL },
    { "aio_flush", NULL, do_flush, 0, 0, true, false, "",
      "completes all outstanding aio requests and flushes", NULL },
    { "map", NULL, do_map, 0, 0, true, false, "",
      "prints the allocated areas of a file", NULL },
    { "length", "l", do_length, 0, 0, true, false, "",
      "gets the length of the current file", NULL },
    { "open", "o", do_open, 1, -1, false, false,
      "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", "open the file specified by path",
      NULL },
    { "close", "c", do_close, 0, 0, true, false, "", "close the current open file", NULL },
    { "reopen", NULL, do_reopen, 0, -1, true, false, "[-d] [-r|-w] [-c cache] [-o options]",
      "reopens an image with new options", NULL },
    { "sigraise", NULL, do_sigraise, 1, 1, false, false, "signal",
      "raises a signal", NULL },
    { "sleep", NULL, do_sleep, 1, 1, false, false, "milliseconds",
      "waits for the given value in milliseconds", NULL },
    { "help", "?", do_help, 0, 1, false, false, "[command]",
      "help for one or all commands", NULL },
    { "quit", "q", do_quit, 0, 0, false, false, "", "exit the program", NULL },
};

static const struct iocmd *find_cmd(const char *name)
{
    for (size_t i = 0; i < sizeof iocmds / sizeof iocmds[0]; i++)
        if (strcmp(iocmds[i].name, name) == 0 ||
            (iocmds[i].alt && strcmp(iocmds[i].alt, name) == 0))
            return &iocmds[i];
    return NULL;
}

static int do_help(struct io *io, int argc, char **argv)
{
    (void)io;
    if (argc == 2) {
        const struct iocmd *c = find_cmd(argv[1]);
        if (!c) {
            printf("command %s not found\n", argv[1]);
            return -EINVAL;
        }
        cmd_usage(c);
        if (c->help)
            printf("\n%s\n", c->help);
        return 0;
    }
    for (size_t i = 0; i < sizeof iocmds / sizeof iocmds[0]; i++)
        cmd_usage(&iocmds[i]);
    printf("\nUse 'help commandname' for extended help.\n");
    return 0;
}

/* Split on blanks (qemu-io splits on spaces). */
static int run_line(struct io *io, char *line)
{
    char *argv[64];
    int argc = 0;
    for (char *save = NULL, *t = strtok_r(line, " \t\r\n", &save); t;
         t = strtok_r(NULL, " \t\r\n", &save)) {
        if (argc == 63) {
            fprintf(stderr, "%s: too many arguments\n", progname);
            return -EINVAL;
        }
        argv[argc++] = t;
    }
    argv[argc] = NULL;
    if (argc == 0)
        return 0;
    const struct iocmd *c = find_cmd(argv[0]);
    if (!c) {
        fprintf(stderr, "command \"%s\" not found\n", argv[0]);
        return -EINVAL;
    }
    int nargs = argc - 1;
    if (nargs < c->argmin || (c->argmax >= 0 && nargs > c->argmax)) {
        if (c->argmax == -1)
            fprintf(stderr, "bad argument count %d to %s, expected at least %d arguments\n",
                    nargs, c->name, c->argmin);
        else if (c->argmin == c->argmax)
            fprintf(stderr, "bad argument count %d to %s, expected %d arguments\n", nargs,
                    c->name, c->argmin);
        else
            fprintf(stderr, "bad argument count %d to %s, expected between %d and %d "
                    "arguments\n", nargs, c->name, c->argmin, c->argmax);
        return -EINVAL;
    }
    if (c->need_file && !io->dev) {
        fprintf(stderr, "no file open, try 'help open'\n");
        return -EINVAL;
    }
    if (c->write && io->readonly) {
        fprintf(stderr, "%s: Block node is read-only\n", progname);
        return -EACCES;
    }
    int r = c->fn(io, argc, argv);
    fflush(stdout);
    return r;
}

int cmd_io(int argc, char **argv)
{
    static const struct option lo[] = {
        { "cmd", required_argument, NULL, 'c' },
        { "format", required_argument, NULL, 'f' },
        { "read-only", no_argument, NULL, 'r' },
        { "nocache", no_argument, NULL, 'n' },
        { "cache", required_argument, NULL, 't' },
        { "aio", required_argument, NULL, 'i' },
        { "native-aio", no_argument, NULL, 'k' },
        { "discard", required_argument, NULL, 'd' },
        { "force-share", no_argument, NULL, 'U' },
        { "misalign", no_argument, NULL, 'm' },
        { "snapshot", no_argument, NULL, 's' },
        { "image-opts", no_argument, NULL, 'I' },
        { "copy-on-read", no_argument, NULL, 'C' },
        { NULL, 0, NULL, 0 },
    };
    struct io io = { .cache_mode = PMS_CACHE_WRITEBACK };
    char **cmds = calloc((size_t)argc + 1, sizeof *cmds);
    int ncmds = 0, ch;
    if (!cmds) {
        errorf("out of memory");
        return 1;
    }
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":c:f:rnt:i:kd:UmsC", lo, NULL)) != -1) {
        switch (ch) {
        case 'c': cmds[ncmds++] = optarg; break;
        case 'f': io.fmt = optarg; break;
        case 'r': io.readonly = true; break;
        case 'n': io.cache_mode = PMS_CACHE_NONE; break;
        case 'U': io.force_share = true; break;
        case 'k': case 'm': break;
        case 's': io.snapshot = true; break;
        case 'I': io.image_opts = true; break;
        case 'C': io.cor_flag = true; break;
        case 'd':
            if (strcmp(optarg, "ignore") && strcmp(optarg, "off") && strcmp(optarg, "unmap") &&
                strcmp(optarg, "on")) {
                free(cmds);
                errorf("Invalid discard option: %s", optarg);
                return 1;
            }
            break;
        case 't':
            if (parse_cache_mode(optarg, &io.cache_mode) < 0) {
                free(cmds);
                errorf("Invalid cache option: %s", optarg);
                return 1;
            }
            break;
        case 'i':
            if (strcmp(optarg, "threads") && strcmp(optarg, "native") &&
                strcmp(optarg, "io_uring")) {
                free(cmds);
                errorf("Invalid aio option: %s", optarg);
                return 1;
            }
            break;
        case ':':
        default:
            free(cmds);
            return getopt_error("io", ch, argv, lo);
        }
    }
    if (argc - optind > 1) {
        free(cmds);
        return usage_error("too many arguments");
    }
    if (io.image_opts && io.fmt) {
        free(cmds);
        errorf("--image-opts and -f are mutually exclusive");
        return 1;
    }

    if (optind < argc && io_open(&io, argv[optind]) < 0) {
        free(cmds);
        return 1;
    }
    int last = 0;
    if (ncmds) {
        for (int i = 0; i < ncmds && !io.quit; i++) {
            char *line = strdup(cmds[i]);
            int r = line ? run_line(&io, line) : -ENOMEM;
            free(line);
            if (r < 0)
                last = r;
        }
    } else {
        char *line = NULL;
        size_t cap = 0;
        while (!io.quit) {
            printf("qemu-io> ");
            fflush(stdout);
            if (getline(&line, &cap, stdin) < 0)
                break;
            int r = run_line(&io, line);
            if (r < 0)
                last = r;
        }
        free(line);
    }
    free(cmds);
    if (io_close(&io) < 0)
        last = -EIO;
    return last ? 1 : 0;
}
