/* serve-test: what a mapped user of `pmemsnap serve`'s FUSE file does, for
 * the serve tests.  Every mapping is mmap(MAP_SHARED) of the FUSE file.
 *
 *   fill FILE OFF LEN BYTE [msync]  store BYTE into [OFF, OFF+LEN) through
 *                                   the mapping; no msync unless asked; exit
 *   writer FILE LEN                 store generation 1 into every 8-byte word
 *                                   of [0, LEN), print "ready", then keep
 *                                   storing generations 2, 3, ... until stdin
 *                                   closes; print the last generation begun
 *   reader FILE OFF BYTE            map, check the page at OFF holds BYTE,
 *                                   print "mapped", wait for a line on stdin,
 *                                   then print the byte now at OFF and whether
 *                                   the whole page holds it
 *   gens FILE LEN                   (a raw copy) every 8-byte word of [0, LEN)
 *                                   must hold a generation >= 1 and not torn;
 *                                   prints "min MAX max N"
 *   seek FILE                       print the SEEK_DATA/SEEK_HOLE extents
 *                                   "data START END" of FILE
 */
#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void *map(const char *file, size_t len, int *fdp)
{
    int fd = open(file, O_RDWR);
    if (fd < 0)
        err(1, "%s", file);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        err(1, "mmap %s", file);
    *fdp = fd;
    return p;
}

static uint64_t num(const char *s)
{
    char *e;
    uint64_t v = strtoull(s, &e, 0);
    if (*e == 'k') v <<= 10;
    else if (*e == 'M') v <<= 20;
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        errx(2, "usage: see the comment at the top");
    const char *cmd = argv[1], *file = argv[2];
    int fd;
    if (strcmp(cmd, "fill") == 0 && argc >= 6) {
        uint64_t off = num(argv[3]), len = num(argv[4]);
        int byte = (int)num(argv[5]);
        char *p = map(file, off + len, &fd);
        memset(p + off, byte, len);
        if (argc > 6 && msync(p, off + len, MS_SYNC) < 0)
            err(1, "msync");
        return 0;
    }
    if (strcmp(cmd, "writer") == 0 && argc >= 4) {
        uint64_t len = num(argv[3]);
        volatile uint64_t *w = map(file, len, &fd);
        uint64_t n = len / 8, gen;
        for (uint64_t i = 0; i < n; i++)
            w[i] = 1;
        printf("ready\n");
        fflush(stdout);
        for (gen = 2;; gen++) {
            struct pollfd pf = { .fd = 0, .events = POLLIN };
            if (poll(&pf, 1, 0) > 0)
                break;
            for (uint64_t i = 0; i < n; i += 512 / 8 * 3)   /* a few words per page */
                w[i] = gen;
        }
        printf("%llu\n", (unsigned long long)gen);
        return 0;
    }
    if (strcmp(cmd, "reader") == 0 && argc >= 5) {
        uint64_t off = num(argv[3]);
        int byte = (int)num(argv[4]);
        unsigned char *p = map(file, off + 4096, &fd);
        if (p[off] != byte)
            errx(1, "before: byte 0x%02x at %llu, expected 0x%02x", p[off],
                 (unsigned long long)off, byte);
        printf("mapped\n");
        fflush(stdout);
        char line[64];
        if (!fgets(line, sizeof line, stdin))
            errx(1, "no go");
        int same = 1;
        for (int i = 0; i < 4096; i++)
            same &= p[off + i] == p[off];
        printf("0x%02x %s\n", p[off], same ? "whole" : "mixed");
        return 0;
    }
    if (strcmp(cmd, "gens") == 0 && argc >= 4) {
        uint64_t len = num(argv[3]);
        int rfd = open(file, O_RDONLY);
        if (rfd < 0)
            err(1, "%s", file);
        uint64_t *w = mmap(NULL, len, PROT_READ, MAP_PRIVATE, rfd, 0);
        if (w == MAP_FAILED)
            err(1, "mmap");
        uint64_t lo = UINT64_MAX, hi = 0;
        for (uint64_t i = 0; i < len / 8; i++) {
            if (w[i] == 0 || w[i] > (1ull << 40))
                errx(1, "word %llu holds %llu", (unsigned long long)i, (unsigned long long)w[i]);
            lo = w[i] < lo ? w[i] : lo;
            hi = w[i] > hi ? w[i] : hi;
        }
        printf("min %llu max %llu\n", (unsigned long long)lo, (unsigned long long)hi);
        return 0;
    }
    if (strcmp(cmd, "seek") == 0) {
        int rfd = open(file, O_RDONLY);
        if (rfd < 0)
            err(1, "%s", file);
        struct stat st;
        fstat(rfd, &st);
        off_t pos = 0;
        for (;;) {
            off_t d = lseek(rfd, pos, SEEK_DATA);
            if (d < 0 && errno == ENXIO)
                break;
            if (d < 0)
                err(1, "SEEK_DATA");
            off_t h = lseek(rfd, d, SEEK_HOLE);
            if (h < 0)
                err(1, "SEEK_HOLE");
            printf("data %lld %lld\n", (long long)d, (long long)h);
            if (h >= st.st_size)
                break;
            pos = h;
        }
        return 0;
    }
    errx(2, "unknown command %s", cmd);
}
