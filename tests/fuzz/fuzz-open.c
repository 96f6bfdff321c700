/* libFuzzer target: open an arbitrary file as a disk image (read-only, as
 * qcow2 and probed), read a few ranges, ask block status and info, list the
 * snapshots, run the consistency check, close.  Any crash, sanitizer report,
 * leak or time-out is a bug: the engine must reject bad images cleanly.
 * Build and run: tests/fuzz/run.sh [SECONDS]. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "pmemsnap.h"

static char path[128];
static int fd = -1;

static void cleanup(void)
{
    if (path[0]) unlink(path);
}

static void exercise(const char *format)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = 1;
    o.format = format;
    o.no_backing = 1;                 /* never follow a fuzzed backing path */
    o.l2_cache_size = 65536;
    pms_dev *dev;
    if (pms_open(path, &o, &dev) < 0)
        return;
    int64_t size = pms_size(dev);
    static uint8_t buf[65536];
    if (size > 0) {
        uint64_t s = (uint64_t)size;
        uint64_t offs[] = { 0, 512, 65536 - 100, 1 << 20, s / 2, s / 3 + 7, s - 1, s - 4096 };
        for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
            uint64_t off = offs[i];
            if (off >= s) continue;
            uint64_t len = s - off < sizeof buf ? s - off : sizeof buf;
            if (i & 1) len = len > 3000 ? 3000 : len;
            pms_pread(dev, buf, len, off);
            struct pms_extent e;
            pms_block_status(dev, off, s - off, &e);
        }
    }
    struct pms_info info = { .size = sizeof info };
    pms_info(dev, &info);
    struct pms_snapshot_info *list;
    size_t n;
    if (pms_snapshot_list(dev, &list, &n) == 0)
        pms_snapshot_list_free(list, n);
    struct pms_check_result res = { .size = sizeof res };
    pms_check(dev, 0, &res, NULL, NULL);
    pms_close(dev);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fd < 0) {
        const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        snprintf(path, sizeof path, "%s/pms-fuzz-%d.img", dir, (int)getpid());
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (fd < 0) { perror(path); abort(); }
        atexit(cleanup);
    }
    if (ftruncate(fd, 0) < 0) abort();
    for (size_t done = 0; done < size; ) {
        ssize_t k = pwrite(fd, data + done, size - done, (off_t)done);
        if (k <= 0) abort();
        done += (size_t)k;
    }
    exercise("qcow2");
    exercise(NULL);
    return 0;
}
