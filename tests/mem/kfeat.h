/* Kernel feature probe for the memory-device tests, independent of the
 * library: a test skips (exit 77, naming the missing feature) only when
 * this probe says the kernel lacks what the requested mode needs.  Any
 * error the library returns afterwards, -ENOTSUP included, is a failure:
 * a feature that silently stopped working must not read as "skipped".
 *
 *   dirty tracking  needs
 *   sync, auto      userfaultfd with UFFD_FEATURE_PAGEFAULT_FLAG_WP
 *   async           the above, UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN
 *   (read-only)     userfaultfd
 * Access to userfaultfd is probed as the library gets it: the syscall,
 * then /dev/userfaultfd, then user-mode-only faults. */
#ifndef PMS_TEST_KFEAT_H
#define PMS_TEST_KFEAT_H
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
/* the kernel ABI names newer than the installed headers (constants only) */
#include "mem/uffd-compat.h"

static inline int kfeat_uffd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0 || errno != EPERM)
        return fd;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
        if (fd >= 0)
            return fd;
    }
    return (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
}

/* NULL when the kernel has what dirty-tracking mode `mode` ("async",
 * "sync", "auto"; "ro" for a read-only mapping) needs, else a message
 * naming the missing feature. */
static inline const char *kfeat_missing(const char *mode)
{
    static char msg[256];
    int fd = kfeat_uffd();
    if (fd < 0) {
        snprintf(msg, sizeof msg, "userfaultfd unavailable (%s): needs CONFIG_USERFAULTFD and "
                 "root, vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd",
                 strerror(errno));
        return msg;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    int r = ioctl(fd, UFFDIO_API, &api);
    int e = errno;
    close(fd);
    if (r < 0) {
        snprintf(msg, sizeof msg, "UFFDIO_API failed (%s)", strerror(e));
        return msg;
    }
    if (strcmp(mode, "ro") == 0)
        return NULL;
    if (!(api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP))
        return "kernel lacks userfaultfd write protection (UFFD_FEATURE_PAGEFAULT_FLAG_WP)";
    if (strncmp(mode, "async", 5) != 0)
        return NULL;
    if (!(api.features & UFFD_FEATURE_WP_ASYNC))
        return "kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7+)";
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0)
        return "cannot open /proc/self/pagemap (needed by PAGEMAP_SCAN)";
    struct pm_scan_arg a = { .size = sizeof a };
    r = ioctl(pm, PAGEMAP_SCAN, &a);
    e = errno;
    close(pm);
    if (r < 0 && e == ENOTTY)
        return "kernel lacks the PAGEMAP_SCAN ioctl (Linux 6.7+)";
    return NULL;
}

/* exit 77 with the missing feature's name, or return */
static inline void kfeat_need(const char *mode)
{
    const char *m = kfeat_missing(mode);
    if (m) {
        fprintf(stderr, "SKIP (%s mode): %s\n", mode, m);
        exit(77);
    }
}
#endif
