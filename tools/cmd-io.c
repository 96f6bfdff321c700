/* `pmemsnap io`: a qemu-io work-alike, so QEMU iotests-style scripts run
 * unchanged against pmemsnap's engine.
 *
 * Command line: io [-f FMT] [-r] [-n] [-t CACHE] [-i AIO] [-U] [-k] [-d MODE]
 * [-c CMD]... [FILE].  The -c commands run in order; without -c, lines are
 * read from stdin with a "qemu-io> " prompt, as qemu-io does.  A failing
 * command does not stop the following ones; the exit status is 1 if any
 * command failed (qemu-io 7.2 behaviour), and `quit` stops early.
 *
 * Commands: read, write, discard, flush (aio_flush), map, length, open,
 * close, sleep, help, quit.  Each parses its arguments with getopt (argv[0]
 * = command name, so getopt's messages match qemu-io's), and prints
 * qemu-io's lines: the "wrote N/N bytes at offset O" report and its timing
 * line, "Pattern verification failed at offset O, N bytes", hexdumps (-v),
 * "Parsing error: ..." and the usage line on bad arguments.  What qemu-io
 * prints on stdout we print on stdout, what it prints on stderr (with its
 * program name) we print on stderr with "pmemsnap: ".
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "util/size.h"
#include "cli.h"

#define REQ_MAX 2147483136ULL      /* BDRV_REQUEST_MAX_BYTES */

struct io {
    pms_dev *dev;
    char *file;
    bool readonly;
    bool raw;                      /* raw format: everything "allocated" */
    int cache_mode;
    bool force_share;
    const char *fmt;
    bool quit;
};

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

static int do_read(struct io *io, int argc, char **argv)
{
    bool C = false, q = false, v = false, P = false;
    int pattern = 0, ch;
    int64_t poff = 0, pcount = -1;
    optind = 0;
    while ((ch = getopt(argc, argv, "bCl:pP:qs:v")) != -1) {
        switch (ch) {
        case 'b':
            printf("reading the VM state (-b) is not supported\n");
            return -ENOTSUP;
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
    int r = range_check(io, off, count);
    if (r == 0)
        r = pms_pread(io->dev, buf, (size_t)count, (uint64_t)off);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    if (r < 0) {
        printf("read failed: %s\n", strerror(-r));
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

static int do_write(struct io *io, int argc, char **argv)
{
    bool C = false, q = false, z = false, P = false, fua = false, unmap = false;
    bool nofallback = false, compress = false;
    const char *src = NULL;
    int pattern = 0xcd, ch;
    optind = 0;
    while ((ch = getopt(argc, argv, "bcCfnpP:qs:uz")) != -1) {
        switch (ch) {
        case 'b':
            printf("writing the VM state (-b) is not supported\n");
            return -ENOTSUP;
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
    (void)unmap;
    if (optind != argc - 2) {
        cmd_usage(find_cmd("write"));
        return -EINVAL;
    }
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
    int r = range_check(io, off, count);
    if (r == 0)
        r = z ? pms_write_zeroes(io->dev, (size_t)count, (uint64_t)off)
              : compress ? pms_pwrite_compressed(io->dev, buf, (size_t)count, (uint64_t)off)
              : pms_pwrite(io->dev, buf, (size_t)count, (uint64_t)off);
    if (r >= 0 && fua)
        r = pms_flush(io->dev);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    free(buf);
    if (r < 0) {
        printf("write failed: %s\n", strerror(-r));
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

static int io_open(struct io *io, const char *file)
{
    io->dev = open_quiet(file, io->fmt, io->readonly, io->cache_mode, false, io->force_share);
    if (!io->dev) {
        fprintf(stderr, "%s: can't open device %s: %s\n", progname, file, libmsg());
        return -EINVAL;
    }
    io->file = strdup(file);
    struct pms_info info = { .size = sizeof info };
    pms_info(io->dev, &info);
    io->raw = strcmp(info.format, "raw") == 0;
    return 0;
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
    return r;
}

static int do_open(struct io *io, int argc, char **argv)
{
    int ch;
    if (io->dev) {
        fprintf(stderr, "%s: file open already, try 'help close'\n", progname);
        return -EBUSY;
    }
    io->readonly = false;
    io->force_share = false;
    io->fmt = NULL;
    optind = 0;
    while ((ch = getopt(argc, argv, "snCro:kt:d:U")) != -1) {
        switch (ch) {
        case 'r': io->readonly = true; break;
        case 'n': io->cache_mode = PMS_CACHE_NONE; break;
        case 'U': io->force_share = true; break;
        case 't':
            if (parse_cache_mode(optarg, &io->cache_mode) < 0) {
                fprintf(stderr, "%s: Invalid cache option: %s\n", progname, optarg);
                return -EINVAL;
            }
            break;
        case 's': case 'C': case 'k': case 'd': break;
        case 'o':
            if (strncmp(optarg, "driver=", 7) == 0 &&
                (!strcmp(optarg + 7, "raw") || !strcmp(optarg + 7, "qcow2"))) {
                io->fmt = strcmp(optarg + 7, "raw") ? "qcow2" : "raw";
                break;
            }
            fprintf(stderr, "%s: open -o: only driver=raw|qcow2 is supported\n", progname);
            return -EINVAL;
        default:
            cmd_usage(find_cmd("open"));
            return -EINVAL;
        }
    }
    if (optind != argc - 1) {
        cmd_usage(find_cmd("open"));
        return -EINVAL;
    }
    if (io->force_share && !io->readonly) {
        fprintf(stderr, "%s: can't open device %s: force-share=on can only be used with "
                "read-only images\n", progname, argv[optind]);
        return -EINVAL;
    }
    return io_open(io, argv[optind]);
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
    return write ? do_write(io, n, nargv) : do_read(io, n, nargv);
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
    while ((ch = getopt_long(argc, argv, ":c:f:rnt:i:kd:Ums", lo, NULL)) != -1) {
        switch (ch) {
        case 'c': cmds[ncmds++] = optarg; break;
        case 'f': io.fmt = optarg; break;
        case 'r': io.readonly = true; break;
        case 'n': io.cache_mode = PMS_CACHE_NONE; break;
        case 'U': io.force_share = true; break;
        case 'k': case 'm': break;
        case 's':
            free(cmds);
            errorf("-s (snapshot mode) is not supported");
            return 1;
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
    if (io.fmt && strcmp(io.fmt, "qcow2") && strcmp(io.fmt, "raw")) {
        free(cmds);
        errorf("Unknown file format '%s'", io.fmt);
        return 1;
    }
    if (io.force_share && !io.readonly && optind < argc) {
        free(cmds);
        errorf("can't open device %s: force-share=on can only be used with read-only images",
               argv[optind]);
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
