/* corrupt-open: drive the public API over (possibly corrupted) images with the
 * command syntax of the pmemsnap CLI (which follows qemu-img / qemu-io), so
 * that tests/block/corrupt.sh can run either.  Only what that suite needs:
 *
 *   info FILE
 *   check [-r leaks|all] [--output=json] FILE
 *        exit 0 clean, 1 check failed / check errors, 2 corruptions, 3 leaks
 *   map FILE
 *   snapshot -l FILE | snapshot -c NAME FILE
 *   io -c "read OFF LEN" | -c "write OFF LEN" FILE
 *   convert -O raw FILE OUT
 *
 * "-f FMT" is accepted anywhere (the image is always opened as qcow2), and
 * io takes -r (read-only open).  Errors print one line on stderr and exit 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "pmemsnap.h"

static int fail(const char *what)
{
    fprintf(stderr, "corrupt-open: %s: %s\n", what, pms_errmsg());
    return 1;
}

static int usage(void)
{
    fprintf(stderr, "corrupt-open: usage: info|check|map|snapshot|io|convert ... FILE\n");
    return 1;
}

static int open_img(const char *file, bool ro, pms_dev **dev)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = ro;
    o.format = "qcow2";
    return pms_open(file, &o, dev) < 0 ? fail(file) : 0;
}

static int close_img(pms_dev *dev, int ret)
{
    if (pms_close(dev) < 0 && ret == 0)
        return fail("close");
    return ret;
}

static uint64_t num(const char *s)
{
    char *end;
    uint64_t v = strtoull(s, &end, 0);
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return v;
}

static int cmd_info(const char *file)
{
    pms_dev *dev;
    if (open_img(file, true, &dev))
        return 1;
    struct pms_info in = { .size = sizeof in };
    int ret = 0;
    if (pms_info(dev, &in) < 0)
        ret = fail("info");
    else
        printf("image: %s\nfile format: %s\nvirtual size: %" PRIu64 "\ncluster_size: %"
               PRIu64 "\nversion: %d\nbacking file: %s\ncorrupt: %d\n", file, in.format,
               in.virtual_size, in.cluster_size, in.qcow2_version, in.backing_file,
               in.corrupt);
    return close_img(dev, ret);
}

static void check_msg(void *opaque, const char *m)
{
    (void)opaque;
    fprintf(stderr, "%s\n", m);
}

static int cmd_check(int argc, char **argv)
{
    unsigned flags = 0;
    bool json = false;
    int i;
    for (i = 0; i < argc - 1; i++) {
        if (!strcmp(argv[i], "-r") && i + 1 < argc - 1) {
            i++;
            flags = !strcmp(argv[i], "all") ? PMS_CHECK_REPAIR_ALL : PMS_CHECK_REPAIR_LEAKS;
        } else if (!strcmp(argv[i], "--output=json"))
            json = true;
        else
            return usage();
    }
    if (i != argc - 1)
        return usage();
    const char *file = argv[argc - 1];
    pms_dev *dev;
    if (open_img(file, flags == 0, &dev))
        return 1;
    struct pms_check_result r = { .size = sizeof r };
    int ret = pms_check(dev, flags, &r, check_msg, NULL);
    if (ret < 0) {
        fail("check");
        return close_img(dev, 1) ? 1 : 1;
    }
    if (flags && (r.leaks_fixed || r.corruptions_fixed)) {
        /* like qemu-img: report what the repaired image looks like now */
        struct pms_check_result r2 = { .size = sizeof r2 };
        if (pms_check(dev, 0, &r2, check_msg, NULL) < 0) {
            fail("check");
            return close_img(dev, 1) ? 1 : 1;
        }
        r2.leaks_fixed = r.leaks_fixed;
        r2.corruptions_fixed = r.corruptions_fixed;
        r = r2;
    }
    if (json)
        printf("{\n    \"image-end-offset\": %" PRIu64 ",\n    \"total-clusters\": %" PRIu64
               ",\n    \"check-errors\": %" PRIu64 ",\n    \"corruptions\": %" PRIu64
               ",\n    \"leaks\": %" PRIu64 ",\n    \"corruptions-fixed\": %" PRIu64
               ",\n    \"leaks-fixed\": %" PRIu64 ",\n    \"allocated-clusters\": %" PRIu64
               ",\n    \"fragmented-clusters\": %" PRIu64 ",\n    \"compressed-clusters\": %"
               PRIu64 "\n}\n", r.image_end_offset, r.total_clusters, r.check_errors,
               r.corruptions, r.leaks, r.corruptions_fixed, r.leaks_fixed,
               r.allocated_clusters, r.fragmented_clusters, r.compressed_clusters);
    else
        printf("corruptions: %" PRIu64 "\nleaks: %" PRIu64 "\ncheck errors: %" PRIu64
               "\nImage end offset: %" PRIu64 "\n", r.corruptions, r.leaks,
               r.check_errors, r.image_end_offset);
    ret = r.check_errors ? 1 : r.corruptions ? 2 : r.leaks ? 3 : 0;
    int c = close_img(dev, 0);
    return c ? 1 : ret;
}

static int cmd_map(const char *file)
{
    pms_dev *dev;
    if (open_img(file, true, &dev))
        return 1;
    int64_t size = pms_size(dev);
    int ret = 0;
    for (uint64_t off = 0; size > 0 && off < (uint64_t)size;) {
        struct pms_extent e;
        if (pms_block_status(dev, off, (uint64_t)size - off, &e) < 0) {
            ret = fail("map");
            break;
        }
        if (e.length == 0) {
            fprintf(stderr, "corrupt-open: map: empty extent at %" PRIu64 "\n", off);
            ret = 1;
            break;
        }
        printf("%" PRIu64 " %" PRIu64 " %u %d %" PRIu64 "\n", e.start, e.length, e.flags,
               e.depth, e.host_offset);
        off += e.length;
    }
    return close_img(dev, ret);
}

static int cmd_snapshot(int argc, char **argv)
{
    pms_dev *dev;
    int ret = 0;
    if (argc == 2 && !strcmp(argv[0], "-l")) {
        if (open_img(argv[1], true, &dev))
            return 1;
        struct pms_snapshot_info *l;
        size_t n;
        if (pms_snapshot_list(dev, &l, &n) < 0)
            ret = fail("snapshot -l");
        else {
            for (size_t i = 0; i < n; i++)
                printf("%s %s %" PRIu64 "\n", l[i].id, l[i].name, l[i].vm_state_size);
            pms_snapshot_list_free(l, n);
        }
    } else if (argc == 3 && !strcmp(argv[0], "-c")) {
        if (open_img(argv[2], false, &dev))
            return 1;
        if (pms_snapshot_create(dev, argv[1]) < 0)
            ret = fail("snapshot -c");
    } else
        return usage();
    return close_img(dev, ret);
}

static int cmd_io(int argc, char **argv)
{
    bool ro = false;
    if (argc == 4 && !strcmp(argv[0], "-r")) {
        ro = true;
        argc--;
        argv++;
    }
    if (argc != 3 || strcmp(argv[0], "-c"))
        return usage();
    char op[16];
    char a[32], b[32];
    if (sscanf(argv[1], "%15s %31s %31s", op, a, b) != 3)
        return usage();
    uint64_t off = num(a), len = num(b);
    bool wr = !strcmp(op, "write");
    if (!wr && strcmp(op, "read"))
        return usage();
    if (len > (64u << 20))
        return usage();
    pms_dev *dev;
    if (open_img(argv[2], ro || !wr, &dev))
        return 1;
    uint8_t *buf = malloc(len ? len : 1);
    int ret = 0;
    if (!buf)
        ret = 1;
    else if (wr) {
        memset(buf, 0xcd, len);
        if (pms_pwrite(dev, buf, len, off) < 0)
            ret = fail("write");
    } else {
        if (pms_pread(dev, buf, len, off) < 0)
            ret = fail("read");
        else if (fwrite(buf, 1, len, stdout) != len)
            ret = 1;
    }
    free(buf);
    return close_img(dev, ret);
}

static int cmd_convert(int argc, char **argv)
{
    if (argc != 4 || strcmp(argv[0], "-O") || strcmp(argv[1], "raw"))
        return usage();
    pms_dev *dev;
    if (open_img(argv[2], true, &dev))
        return 1;
    int64_t size = pms_size(dev);
    int fd = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int ret = 0;
    if (fd < 0 || size < 0) {
        fprintf(stderr, "corrupt-open: convert: cannot create %s\n", argv[3]);
        ret = 1;
    }
    size_t chunk = 1 << 20;
    uint8_t *buf = malloc(chunk);
    for (uint64_t off = 0; !ret && off < (uint64_t)size; off += chunk) {
        size_t n = (uint64_t)size - off < chunk ? (size_t)((uint64_t)size - off) : chunk;
        if (!buf || pms_pread(dev, buf, n, off) < 0)
            ret = fail("convert");
        else if (pwrite(fd, buf, n, (off_t)off) != (ssize_t)n)
            ret = 1;
    }
    if (fd >= 0 && !ret && ftruncate(fd, size) < 0)
        ret = 1;
    if (fd >= 0)
        close(fd);
    free(buf);
    return close_img(dev, ret);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return usage();
    const char *cmd = argv[1];
    argc -= 2;
    argv += 2;
    int n = 0;                      /* drop "-f FMT" */
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "-f") && i + 1 < argc)
            i++;
        else
            argv[n++] = argv[i];
    }
    argc = n;
    if (argc < 1)
        return usage();
    if (!strcmp(cmd, "info") && argc == 1)
        return cmd_info(argv[0]);
    if (!strcmp(cmd, "check"))
        return cmd_check(argc, argv);
    if (!strcmp(cmd, "map") && argc == 1)
        return cmd_map(argv[0]);
    if (!strcmp(cmd, "snapshot"))
        return cmd_snapshot(argc, argv);
    if (!strcmp(cmd, "io"))
        return cmd_io(argc, argv);
    if (!strcmp(cmd, "convert"))
        return cmd_convert(argc, argv);
    return usage();
}
