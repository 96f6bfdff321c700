/* The safepoint's signal and the application's own signal handlers; the
 * stop failing.
 *
 *   sp-signal CASE IMG       (one case per process: the choice is per process)
 *
 * own       the application has a handler on SIGRTMIN+6 before pms_map: it
 *           stays installed and keeps running; the library takes SIGRTMIN+7
 *           (the documented order) and live snapshots with a busy writer
 *           thread succeed
 * blocked   the main thread blocks SIGRTMIN+6 (e.g. for sigwait) before
 *           pms_map: the library takes SIGRTMIN+7, snapshots succeed
 * env       PMEMSNAP_SIGNAL=RTMAX-2 (set by the script): that signal is used
 * env-taken PMEMSNAP_SIGNAL=RTMIN+6 while the application has a handler
 *           there: pms_map fails with EBUSY and says so; its handler stays
 * env-bad   PMEMSNAP_SIGNAL=bogus: pms_map fails with EINVAL and says so
 * replaced  the application installs a handler on the library's signal
 *           after pms_map: the live snapshot fails at once with EBUSY and a
 *           message; PMS_SNAP_QUIESCED still works
 * procfail  getdents64 fails with EIO in the snapshotting thread (a seccomp
 *           filter): the live snapshot fails with EIO and says so (it used
 *           to take the error for "no more threads" and report success),
 *           the writer thread is left running
 * Exit 0 = pass, 1 = fail, 77 = no dirty tracking.
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "pmemsnap.h"
#include "kfeat.h"

#define FAIL(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                       fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) FAIL(__VA_ARGS__); } while (0)
#define API(call) do { int r_ = (call); if (r_ < 0) FAIL("%s: %s", #call, pms_errmsg()); } while (0)

static atomic_int g_hits, g_stop;
static atomic_ulong g_n;                 /* the writer's progress */
static volatile uint64_t *g_q;

static void app_handler(int sig)
{
    (void)sig;
    atomic_fetch_add(&g_hits, 1);
}

static void install_app(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = app_handler;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(sig, &sa, NULL) == 0, "sigaction: %s", strerror(errno));
}

static int is_app(int sig)
{
    struct sigaction cur;
    CHECK(sigaction(sig, NULL, &cur) == 0, "sigaction query");
    return !(cur.sa_flags & SA_SIGINFO) && cur.sa_handler == app_handler;
}

static int is_lib(int sig)    /* a handler that is neither ours nor default */
{
    struct sigaction cur;
    CHECK(sigaction(sig, NULL, &cur) == 0, "sigaction query");
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction != NULL;
}

static void *writer(void *arg)
{
    (void)arg;
    for (uint64_t n = 1; !atomic_load(&g_stop); n++) {
        g_q[(n * 512) % (1 << 17)] = n;
        atomic_store_explicit(&g_n, n, memory_order_relaxed);
    }
    return NULL;
}

static pms_dev *g_dev;

static int map_it(const char *img)
{
    struct pms_open_opts oo;
    pms_open_opts_init(&oo);
    API(pms_open(img, &oo, &g_dev));
    struct pms_map_opts mo;
    pms_map_opts_init(&mo);
    void *a;
    size_t len;
    kfeat_need("auto");         /* the only skip: a kernel without the feature */
    int r = pms_map(g_dev, &mo, &a, &len);
    g_q = a;
    return r;
}

/* getdents64 returns EIO in the calling thread from now on */
static void fail_getdents(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getdents64, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EIO),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { sizeof f / sizeof f[0], f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
        fprintf(stderr, "SKIP: seccomp: %s\n", strerror(errno));
        exit(77);
    }
}

static void snapshots(int n)
{
    pthread_t th;
    CHECK(pthread_create(&th, NULL, writer, NULL) == 0, "pthread_create");
    usleep(10000);
    for (int k = 0; k < n; k++) {
        char name[16];
        snprintf(name, sizeof name, "s%d", k);
        API(pms_snapshot_create(g_dev, name));
    }
    atomic_store(&g_stop, 1);
    pthread_join(th, NULL);
}

static void unmap_close(void)
{
    API(pms_unmap(g_dev));
    API(pms_close(g_dev));
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s own|blocked|env|env-taken|env-bad|replaced|procfail IMG\n", argv[0]);
        return 2;
    }
    const char *c = argv[1], *img = argv[2];
    int s6 = SIGRTMIN + 6, s7 = SIGRTMIN + 7;
    if (strcmp(c, "own") == 0) {
        install_app(s6);
        API(map_it(img));
        CHECK(is_app(s6), "pms_map replaced the application's handler on SIGRTMIN+6");
        CHECK(is_lib(s7), "the library did not take SIGRTMIN+7");
        CHECK(raise(s6) == 0 && atomic_load(&g_hits) == 1, "application handler did not run");
        snapshots(3);
        CHECK(raise(s6) == 0 && atomic_load(&g_hits) == 2, "application handler did not run");
        unmap_close();
        printf("own: the application's SIGRTMIN+6 handler kept; library on SIGRTMIN+7; "
               "3 live snapshots\n");
    } else if (strcmp(c, "blocked") == 0) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, s6);
        CHECK(pthread_sigmask(SIG_BLOCK, &set, NULL) == 0, "sigmask");
        API(map_it(img));
        CHECK(!is_lib(s6) && is_lib(s7), "the library did not move to SIGRTMIN+7");
        snapshots(3);     /* the writer inherits the mask blocking SIGRTMIN+6 */
        unmap_close();
        printf("blocked: SIGRTMIN+6 left alone, 3 live snapshots\n");
    } else if (strcmp(c, "env") == 0) {
        CHECK(getenv("PMEMSNAP_SIGNAL"), "PMEMSNAP_SIGNAL not set");
        API(map_it(img));
        CHECK(is_lib(SIGRTMAX - 2) && !is_lib(s6), "PMEMSNAP_SIGNAL=RTMAX-2 not honoured");
        snapshots(2);
        unmap_close();
        printf("env: SIGRTMAX-2 used, 2 live snapshots\n");
    } else if (strcmp(c, "env-taken") == 0) {
        install_app(s6);
        int r = map_it(img);
        CHECK(r == -EBUSY, "pms_map returned %d, want -EBUSY", r);
        CHECK(strstr(pms_errmsg(), "PMEMSNAP_SIGNAL") && strstr(pms_errmsg(), "handler"),
              "message: %s", pms_errmsg());
        CHECK(is_app(s6), "the application's handler was replaced");
        printf("env-taken refused: %s\n", pms_errmsg());
        API(pms_close(g_dev));
    } else if (strcmp(c, "env-bad") == 0) {
        int r = map_it(img);
        CHECK(r == -EINVAL, "pms_map returned %d, want -EINVAL", r);
        CHECK(strstr(pms_errmsg(), "PMEMSNAP_SIGNAL"), "message: %s", pms_errmsg());
        printf("env-bad refused: %s\n", pms_errmsg());
        API(pms_close(g_dev));
    } else if (strcmp(c, "replaced") == 0) {
        API(map_it(img));
        CHECK(is_lib(s6), "the library did not take SIGRTMIN+6");
        install_app(s6);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int r = pms_snapshot_create(g_dev, "live");
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        CHECK(r == -EBUSY, "snapshot after the handler was replaced returned %d", r);
        CHECK(strstr(pms_errmsg(), "replaced") && strstr(pms_errmsg(), "PMS_SNAP_QUIESCED"),
              "message: %s", pms_errmsg());
        CHECK(s < 0.5, "took %.2f s to refuse", s);
        printf("replaced refused in %.3f s: %s\n", s, pms_errmsg());
        API(pms_snapshot_create_ex(g_dev, "quiesced", PMS_SNAP_QUIESCED));
        unmap_close();
    } else if (strcmp(c, "procfail") == 0) {
        API(map_it(img));
        pthread_t th;
        CHECK(pthread_create(&th, NULL, writer, NULL) == 0, "pthread_create");
        usleep(10000);
        fail_getdents();
        int r = pms_snapshot_create(g_dev, "live");
        CHECK(r == -EIO, "snapshot with getdents64 failing returned %d (%s)", r,
              r < 0 ? pms_errmsg() : "success");
        CHECK(strstr(pms_errmsg(), "/proc/self/task"), "message: %s", pms_errmsg());
        uint64_t a = atomic_load(&g_n), b = a;
        for (int i = 0; i < 1000 && b == a; i++) {
            usleep(1000);
            b = atomic_load(&g_n);
        }
        CHECK(b != a, "the writer was left stopped after the failed stop");
        printf("procfail refused: %s\n", pms_errmsg());
        atomic_store(&g_stop, 1);
        pthread_join(th, NULL);
        API(pms_snapshot_create_ex(g_dev, "quiesced", PMS_SNAP_QUIESCED));
        unmap_close();
    } else {
        fprintf(stderr, "unknown case %s\n", c);
        return 2;
    }
    return 0;
}
