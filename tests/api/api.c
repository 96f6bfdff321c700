/* Public API contract tests: argument checks, error channel, read-only
 * handling, block status, create options.  Oracles: qemu-img / qemu-io run
 * on the images this test writes. */
#include <errno.h>
#include <stdarg.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "pmemsnap.h"

static int fails;
#define CHECK(cond, ...) do { if (!(cond)) { fails++; printf("FAIL %s:%d: ", __FILE__, __LINE__); \
    printf(__VA_ARGS__); printf("\n"); } } while (0)

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int r = system(cmd);
    return WIFEXITED(r) ? WEXITSTATUS(r) : 128;
}

int main(void)
{
    char dir[] = "/tmp/pms-api-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char img[256], ro[256];
    snprintf(img, sizeof img, "%s/a.qcow2", dir);
    snprintf(ro, sizeof ro, "%s/ro.qcow2", dir);
    pms_dev *d = NULL;

    /* open errors: message prefixed by the function, negative errno */
    int r = pms_open(img, NULL, &d);
    CHECK(r == -ENOENT, "open of a missing file returned %d", r);
    CHECK(strncmp(pms_errmsg(), "pms_open: ", 10) == 0, "message '%s' lacks the prefix", pms_errmsg());
    CHECK(d == NULL, "devp set on failure");

    struct pms_create_opts co;
    pms_create_opts_init(&co);
    co.cluster_size = 3000;
    r = pms_create(img, 1 << 20, &co);
    CHECK(r == -EINVAL, "cluster_size 3000 accepted (%d)", r);
    CHECK(strstr(pms_errmsg(), "pms_create: ") == pms_errmsg(), "bad prefix: %s", pms_errmsg());
    pms_create_opts_init(&co);
    co.format = "vmdk";
    CHECK(pms_create(img, 1 << 20, &co) == -EINVAL, "unknown format accepted");

    pms_create_opts_init(&co);
    co.cluster_size = 4096;
    r = pms_create(img, 8 << 20, &co);
    CHECK(r == 0, "create failed: %s", pms_errmsg());
    CHECK(sh("qemu-img check -q %s", img) == 0, "qemu-img check of a fresh image failed");
    CHECK(sh("qemu-img info %s | grep -q 'cluster_size: 4096'", img) == 0, "cluster size not 4096");

    r = pms_open(img, NULL, &d);
    CHECK(r == 0, "open: %s", pms_errmsg());
    if (r) return 1;
    CHECK(pms_size(d) == 8 << 20, "size %lld", (long long)pms_size(d));

    /* range checks happen before the driver */
    char buf[8192];
    memset(buf, 0x5c, sizeof buf);
    r = pms_pwrite(d, buf, 4096, (8 << 20) - 100);
    CHECK(r == -EINVAL, "write past the end returned %d", r);
    CHECK(strncmp(pms_errmsg(), "pms_pwrite: ", 12) == 0, "message '%s'", pms_errmsg());
    r = pms_pread(d, buf, 16, UINT64_MAX - 8);
    CHECK(r == -EINVAL, "overflowing read returned %d", r);
    CHECK(pms_pwrite(d, buf, 0, 8 << 20) == 0, "empty write at the end failed");

    /* unaligned write, zeroes, discard, flush; status */
    CHECK(pms_pwrite(d, buf, 5000, 12345) == 0, "write: %s", pms_errmsg());
    CHECK(pms_write_zeroes(d, 4096, 1 << 20) == 0, "zero: %s", pms_errmsg());
    CHECK(pms_flush(d) == 0, "flush: %s", pms_errmsg());
    struct pms_extent e;
    CHECK(pms_block_status(d, 12288, 4096, &e) == 0, "status: %s", pms_errmsg());
    CHECK((e.flags & PMS_BLOCK_DATA) && e.start == 12288, "status of written cluster: flags %#x", e.flags);
    CHECK(pms_block_status(d, 4 << 20, 1 << 20, &e) == 0 && !(e.flags & PMS_BLOCK_ALLOCATED) &&
          (e.flags & PMS_BLOCK_ZERO) && e.length == 1 << 20, "unallocated extent wrong");
    CHECK(pms_block_status(d, 0, 0, &e) < 0, "empty status range accepted");

    /* snapshots: names, missing, duplicate */
    CHECK(pms_snapshot_create(d, "") == -EINVAL, "empty snapshot name accepted");
    CHECK(pms_snapshot_create(d, "s1") == 0, "snapshot: %s", pms_errmsg());
    CHECK(pms_snapshot_create(d, "s1") == -EEXIST, "duplicate snapshot name accepted");
    CHECK(pms_snapshot_revert(d, "nope") == -ENOENT, "revert to a missing snapshot");
    CHECK(strncmp(pms_errmsg(), "pms_snapshot_revert: ", 21) == 0, "message '%s'", pms_errmsg());
    struct pms_snapshot_info *l;
    size_t n;
    CHECK(pms_snapshot_list(d, &l, &n) == 0 && n == 1 && strcmp(l[0].name, "s1") == 0 &&
          strcmp(l[0].id, "1") == 0 && l[0].disk_size == 8 << 20, "list wrong");
    if (n) pms_snapshot_list_free(l, n);
    memset(buf, 0x77, 4096);
    CHECK(pms_pwrite(d, buf, 4096, 12288) == 0, "write after snapshot: %s", pms_errmsg());
    CHECK(pms_unmap(d) == -EINVAL, "unmap of an unmapped device");
    CHECK(pms_close(d) == 0, "close: %s", pms_errmsg());

    CHECK(sh("qemu-img check -q %s", img) == 0, "qemu-img check after writes");
    CHECK(sh("qemu-io -c 'read -P 0 0 12288' -c 'read -P 0x77 12288 4096' "
             "-c 'read -P 0x5c 16384 961' -c 'read -P 0 17345 100' -c 'read -P 0 1M 4k' %s "
             "| grep -q failed", img) != 0, "qemu-io found wrong data");
    CHECK(sh("qemu-img snapshot -l %s | grep -q ' s1 '", img) == 0, "qemu-img does not list s1");
    CHECK(sh("cp %s %s && qemu-img snapshot -a s1 %s && qemu-io -c 'read -P 0x5c 12345 4039' %s "
             "| grep -q failed", img, ro, ro, ro) != 0, "snapshot content wrong");

    /* read-only: no write reaches the file */
    struct pms_open_opts oo;
    pms_open_opts_init(&oo);
    oo.readonly = 1;
    CHECK(pms_open(img, &oo, &d) == 0, "read-only open: %s", pms_errmsg());
    CHECK(pms_pwrite(d, buf, 512, 0) == -EROFS, "write to a read-only device");
    CHECK(pms_snapshot_create(d, "x") == -EROFS, "snapshot on a read-only device");
    CHECK(pms_discard(d, 4096, 0) == -EROFS, "discard on a read-only device");
    struct pms_info info = { .size = sizeof info };
    CHECK(pms_info(d, &info) == 0 && strcmp(info.format, "qcow2") == 0 && info.cluster_size == 4096 &&
          info.qcow2_version == 3 && info.refcount_bits == 16, "info wrong");
    CHECK(pms_close(d) == 0, "close");

    /* format forcing and unknown format */
    pms_open_opts_init(&oo);
    oo.format = "nope";
    CHECK(pms_open(img, &oo, &d) == -EINVAL, "unknown format accepted");
    oo.format = "raw";
    CHECK(pms_open(img, &oo, &d) == 0, "forced raw open");
    CHECK(pms_size(d) > 0 && pms_close(d) == 0, "raw view");

    /* check mode: a corrupt-flagged image opens writable for the check only,
     * and a repairing check clears the flag (oracle: qemu-img info/check) */
    CHECK(sh("printf '\\000\\000\\000\\000\\000\\000\\000\\002' | "
             "dd of=%s bs=1 seek=72 conv=notrunc status=none", img) == 0, "set corrupt bit");
    CHECK(pms_open(img, NULL, &d) == -EACCES, "writable open of a corrupt-flagged image");
    pms_open_opts_init(&oo);
    oo.check = 1;
    CHECK(pms_open(img, &oo, &d) == 0, "check-mode open: %s", pms_errmsg());
    if (d) {
        CHECK(pms_pwrite(d, buf, 512, 0) == -EPERM, "write on a check-mode device");
        CHECK(pms_snapshot_create(d, "y") == -EPERM, "snapshot on a check-mode device");
        void *a; size_t ml;
        CHECK(pms_map(d, NULL, &a, &ml) == -EPERM, "map of a check-mode device");
        struct pms_check_result cr = { .size = sizeof cr };
        CHECK(pms_check(d, PMS_CHECK_REPAIR_ALL, &cr, NULL, NULL) == 0 && cr.corruptions == 0,
              "repairing check: %s", pms_errmsg());
        CHECK(pms_close(d) == 0, "close");
    }
    CHECK(sh("qemu-img info %s | grep -q 'corrupt: false'", img) == 0, "corrupt flag not cleared");
    CHECK(sh("qemu-img check -q %s", img) == 0, "qemu-img check after the repair");

    /* a caller built against an older, shorter pms_info gets only its part */
    struct { struct pms_info i; char guard[64]; } small;
    memset(&small, 0xa5, sizeof small);
    small.i.size = 64;
    CHECK(pms_open(img, NULL, &d) == 0, "open");
    CHECK(pms_info(d, &small.i) == 0, "info with a short struct");
    const unsigned char *tail = (const unsigned char *)&small.i + 64;
    int touched = 0;
    for (size_t k = 0; k < sizeof small - 64; k++) touched |= tail[k] != 0xa5;
    CHECK(!touched, "pms_info wrote past the caller's size");
    /* the same for pms_check; a size of 0 and NULL pointers are errors */
    struct { struct pms_check_result c; char guard[64]; } smallc;
    memset(&smallc, 0xa5, sizeof smallc);
    smallc.c.size = 16;
    CHECK(pms_check(d, 0, &smallc.c, NULL, NULL) == 0, "check with a short struct");
    tail = (const unsigned char *)&smallc.c + 16;
    touched = 0;
    for (size_t k = 0; k < sizeof smallc - 16; k++) touched |= tail[k] != 0xa5;
    CHECK(!touched, "pms_check wrote past the caller's size");
    struct pms_check_result cr0 = { .size = sizeof cr0 };
    struct pms_info zero_size = { .size = 0 };
    CHECK(pms_info(d, &zero_size) == -EINVAL && strstr(pms_errmsg(), "pms_info: "),
          "info with size 0: %s", pms_errmsg());
    size_t nl;
    struct pms_snapshot_info *sl;
    CHECK(pms_info(d, NULL) == -EINVAL && pms_snapshot_list(d, NULL, &nl) == -EINVAL &&
          pms_snapshot_list(d, &sl, NULL) == -EINVAL && pms_block_status(d, 0, 512, NULL) == -EINVAL &&
          pms_pread(d, NULL, 512, 0) == -EINVAL && pms_flush(NULL) == -EINVAL,
          "NULL pointers: %s", pms_errmsg());
    CHECK(pms_check(d, 0x100, &cr0, NULL, NULL) == -EINVAL, "check with unknown flags accepted");
    {   /* every call that takes a device: NULL is EINVAL with the call's name */
        char b1[512] = { 0 };
        void *ma;
        size_t mlen;
        struct { int r; const char *fn; } nd[] = {
            { pms_write_zeroes(NULL, 512, 0), "pms_write_zeroes" },
            { pms_write_zeroes_ex(NULL, 512, 0, 0), "pms_write_zeroes_ex" },
            { pms_discard(NULL, 512, 0), "pms_discard" },
            { pms_truncate(NULL, 1 << 20), "pms_truncate" },
            { pms_vmstate_pread(NULL, b1, 512, 0), "pms_vmstate_pread" },
            { pms_vmstate_pwrite(NULL, b1, 512, 0), "pms_vmstate_pwrite" },
            { pms_pwrite_compressed(NULL, b1, 512, 0), "pms_pwrite_compressed" },
            { pms_snapshot_create(NULL, "s"), "pms_snapshot_create" },
            { pms_snapshot_create_ex(NULL, "s", 0), "pms_snapshot_create_ex" },
            { pms_snapshot_revert(NULL, "s"), "pms_snapshot_revert" },
            { pms_snapshot_delete(NULL, "s"), "pms_snapshot_delete" },
            { pms_snapshot_delete_ex(NULL, "s", 0, NULL, NULL), "pms_snapshot_delete_ex" },
            { pms_map(NULL, NULL, &ma, &mlen), "pms_map" },
            { pms_unmap(NULL), "pms_unmap" },
            { pms_persist(NULL, b1, 1), "pms_persist" },
        };
        for (size_t i = 0; i < sizeof nd / sizeof nd[0]; i++)
            CHECK(nd[i].r == -EINVAL, "%s(NULL) returned %d", nd[i].fn, nd[i].r);
        CHECK(strstr(pms_errmsg(), "pms_persist: ") != NULL, "message: %s", pms_errmsg());
    }
    CHECK(pms_close(d) == 0, "close");
    struct pms_open_opts bad;
    pms_open_opts_init(&bad);
    bad.cache_mode = 99;
    pms_dev *d2 = NULL;
    CHECK(pms_open(img, &bad, &d2) == -EINVAL && !d2, "open with cache_mode 99 accepted");
    struct pms_create_opts badc;
    pms_create_opts_init(&badc);
    badc.size = 1;
    char cpath[4200];
    snprintf(cpath, sizeof cpath, "%s/never.qcow2", dir);
    CHECK(pms_create(cpath, 1 << 20, &badc) == -EINVAL && access(cpath, F_OK) != 0,
          "create with opts->size 1 accepted");
    /* a NULL buffer is not zeroes: refused, the data stays */
    CHECK(pms_open(img, NULL, &d) == 0, "open");
    unsigned char before[512], after[512];
    CHECK(pms_pread(d, before, 512, 0) == 0, "read");
    CHECK(pms_pwrite(d, NULL, 512, 0) == -EINVAL, "pwrite of a NULL buffer accepted");
    CHECK(pms_pread(d, after, 512, 0) == 0 && memcmp(before, after, 512) == 0,
          "pwrite of a NULL buffer changed the data");
    CHECK(pms_close(d) == 0, "close");

    /* a failed flush stays failed: the device dropped what it held and
     * reported it once (as Linux's write-back does); a later flush must
     * not report success for the lost write */
    struct pms_open_opts fo;
    pms_open_opts_init(&fo);
    fo.fault_spec = "flush_error_at=1";
    CHECK(pms_open(img, &fo, &d) == 0, "open through the fault-injecting driver: %s", pms_errmsg());
    unsigned char pat[4096];
    memset(pat, 0x77, sizeof pat);
    CHECK(pms_pwrite(d, pat, sizeof pat, 0) == 0, "pwrite");
    CHECK(pms_flush(d) == -EIO, "first flush did not fail");
    r = pms_flush(d);
    CHECK(r == -EIO && strstr(pms_errmsg(), "an earlier flush"),
          "second flush after a lost write returned %d (%s)", r, pms_errmsg());
    (void)pms_close(d);

    sh("rm -rf %s", dir);
    printf("%d failed\n", fails);
    return fails ? 1 : 0;
}
