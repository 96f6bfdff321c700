/* Safepoint: stop every application thread of the process for a moment.
 *
 * Used by the atomic snapshot cut and by eviction under async write
 * protection (where the kernel resolves stores itself, so dropping a clean
 * page is only safe while no thread can store).  Garbage-collector style:
 * a real-time signal (PMS_SP_SIGNAL) goes to each thread listed in
 * /proc/self/task except the caller and the library's own threads
 * (registered with pms_sp_exempt); the handler acknowledges and parks on a
 * futex until pms_sp_release.  The task list is re-read until a pass finds
 * no new thread (a thread that was running may have created one).
 *
 * Invariants:
 *  - between pms_sp_stop() returning 0 and pms_sp_release() no
 *    non-exempt thread other than the caller executes user code;
 *  - pms_sp_stop/pms_sp_release never call malloc or take a lock a parked
 *    thread could hold (parked threads may sit inside malloc); the caller
 *    must not either, in between;
 *  - one stop at a time per process (sp.mu, a plain mutex taken only here).
 * A thread that blocks the signal or sits in an uninterruptible wait is not
 * parked within the timeout: pms_sp_stop releases everyone and returns
 * -EAGAIN, and records the offending thread id for the caller's message.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "mem-int.h"

#define SP_MAX      8192
#define SP_EXEMPT   128

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static struct {
    pthread_mutex_t mu;
    _Atomic int active;
    _Atomic uint32_t gen;                 /* futex word; bumped by release */
    pid_t tids[SP_MAX];
    _Atomic int acked[SP_MAX];
    _Atomic int n;
    _Atomic pid_t exempt[SP_EXEMPT];
    pid_t stuck;                           /* last thread that did not park */
} sp = { .mu = PTHREAD_MUTEX_INITIALIZER };

static pthread_once_t sp_once = PTHREAD_ONCE_INIT;
static int sp_init_err;

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)si; (void)uc;
    int e = errno;
    uint32_t g = atomic_load(&sp.gen);
    if (!atomic_load(&sp.active)) {
        errno = e;
        return;
    }
    pid_t self = my_tid();
    int n = atomic_load(&sp.n);
    for (int i = 0; i < n; i++)
        if (sp.tids[i] == self)
            atomic_store(&sp.acked[i], 1);
    while (atomic_load(&sp.gen) == g)
        syscall(SYS_futex, &sp.gen, FUTEX_WAIT_PRIVATE, g, NULL, NULL, 0);
    errno = e;
}

static void sp_setup(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(PMS_SP_SIGNAL, &sa, NULL) < 0)
        sp_init_err = -errno;
}

int pms_sp_init(void)
{
    pthread_once(&sp_once, sp_setup);
    return sp_init_err;
}

void pms_sp_exempt(int add)
{
    pid_t t = my_tid();
    for (int i = 0; i < SP_EXEMPT; i++) {
        pid_t want = add ? 0 : t;
        if (atomic_compare_exchange_strong(&sp.exempt[i], &want, add ? t : 0))
            return;
    }
}

static int is_exempt(pid_t t)
{
    for (int i = 0; i < SP_EXEMPT; i++)
        if (atomic_load(&sp.exempt[i]) == t)
            return 1;
    return 0;
}

static int known(pid_t t, int n)
{
    for (int i = 0; i < n; i++)
        if (sp.tids[i] == t)
            return 1;
    return 0;
}

/* Signal threads not yet signalled; returns how many were new, or -1. */
static int enumerate(pid_t self, pid_t pid)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[4096] __attribute__((aligned(8)));
    int fresh = 0;
    for (;;) {
        long nb = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (nb <= 0)
            break;
        for (long o = 0; o < nb; ) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + o);
            o += d->d_reclen;
            if (d->d_name[0] < '0' || d->d_name[0] > '9')
                continue;
            pid_t t = 0;
            for (const char *p = d->d_name; *p; p++)
                t = t * 10 + (*p - '0');
            int n = atomic_load(&sp.n);
            if (t == self || is_exempt(t) || known(t, n) || n >= SP_MAX)
                continue;
            sp.tids[n] = t;
            atomic_store(&sp.acked[n], 0);
            atomic_store(&sp.n, n + 1);
            if (syscall(SYS_tgkill, pid, t, PMS_SP_SIGNAL) < 0)
                atomic_store(&sp.acked[n], 1);       /* already gone */
            fresh++;
        }
    }
    close(fd);
    return fresh;
}

int pms_sp_stop(unsigned timeout_ms)
{
    int r = pms_sp_init();
    if (r < 0)
        return r;
    pthread_mutex_lock(&sp.mu);
    pid_t self = my_tid(), pid = getpid();
    atomic_store(&sp.n, 0);
    atomic_store(&sp.active, 1);
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int fresh = enumerate(self, pid);
        if (fresh < 0) {
            pms_sp_release();
            return -EIO;
        }
        /* wait for every signalled thread to park (or to have exited) */
        for (int spins = 0;; spins++) {
            int n = atomic_load(&sp.n), waiting = 0;
            for (int i = 0; i < n; i++) {
                if (atomic_load(&sp.acked[i]))
                    continue;
                if (syscall(SYS_tgkill, pid, sp.tids[i], 0) < 0 && errno == ESRCH) {
                    atomic_store(&sp.acked[i], 1);
                    continue;
                }
                waiting = 1;
                sp.stuck = sp.tids[i];
                break;
            }
            if (!waiting)
                break;
            if (now_ns() > deadline) {
                pms_sp_release();
                return -EAGAIN;
            }
            if (spins < 200)
                sched_yield();
            else {
                struct timespec ts = { 0, 20000 };
                nanosleep(&ts, NULL);
            }
        }
        if (fresh == 0)
            return 0;
    }
}

void pms_sp_release(void)
{
    atomic_store(&sp.active, 0);
    atomic_fetch_add(&sp.gen, 1);
    syscall(SYS_futex, &sp.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    pthread_mutex_unlock(&sp.mu);
}

int pms_sp_stuck_tid(void)
{
    return sp.stuck;
}
