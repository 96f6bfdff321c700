/* serve-bench: what a mapped user (a VM's NVDIMM, a PMDK pool) sees of a
 * FUSE-exported image, for bench/30-serve.sh.  The same program runs against
 * `pmemsnap serve` and `qemu-storage-daemon --export type=fuse`.
 *
 *   serve-bench read FILE SIZE    first-touch read: map, load one word per
 *                                 4 KiB page, in order (cold page cache)
 *   serve-bench write FILE SIZE   first-touch write: store every byte of
 *                                 every page of an unallocated image, msync;
 *                                 then a warm rewrite (pages resident) and
 *                                 its msync
 *   serve-bench evict FILE        drop FILE's pages from the host page cache
 * Prints "NAME GB/s" lines (GB = 1e9 bytes).
 */
#include <err.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        errx(2, "usage: serve-bench read|write FILE SIZE | evict FILE");
    if (strcmp(argv[1], "evict") == 0) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0 || posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0)
            err(1, "%s", argv[2]);
        return 0;
    }
    if (argc < 4)
        errx(2, "SIZE missing");
    size_t size = strtoull(argv[3], NULL, 0) << 20;   /* MiB */
    int fd = open(argv[2], O_RDWR);
    if (fd < 0)
        err(1, "%s", argv[2]);
    uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        err(1, "mmap");
    if (strcmp(argv[1], "read") == 0) {
        double t0 = now();
        uint64_t sum = 0;
        for (size_t i = 0; i < size; i += 4096)
            sum += *(volatile uint64_t *)(p + i);
        double dt = now() - t0;
        printf("first-touch-read %.2f GB/s (%.2f s, sum %llu)\n", size / dt / 1e9, dt,
               (unsigned long long)(sum & 0xff));
        return 0;
    }
    if (strcmp(argv[1], "write") == 0) {
        double t0 = now();
        for (size_t i = 0; i < size; i += 4096)
            memset(p + i, 0x5a, 4096);
        double t1 = now();
        if (msync(p, size, MS_SYNC) < 0)
            err(1, "msync");
        double t2 = now();
        printf("first-touch-write %.2f GB/s (stores %.2f s + msync %.2f s)\n",
               size / (t2 - t0) / 1e9, t1 - t0, t2 - t1);
        t0 = now();
        for (size_t i = 0; i < size; i += 4096)
            memset(p + i, 0xa5, 4096);
        t1 = now();
        if (msync(p, size, MS_SYNC) < 0)
            err(1, "msync");
        t2 = now();
        printf("warm-rewrite %.2f GB/s (%.2f s)\n", size / (t1 - t0) / 1e9, t1 - t0);
        printf("msync %.2f GB/s (%.2f s)\n", size / (t2 - t1) / 1e9, t2 - t1);
        return 0;
    }
    errx(2, "unknown command %s", argv[1]);
}
