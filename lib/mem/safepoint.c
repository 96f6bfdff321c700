/* Safepoint: stop every application thread of the process for a moment.
 *
 * Used by the atomic snapshot cut.  Garbage-collector style: a real-time
 * signal goes to each thread listed in /proc/self/task except the caller,
 * the library's own threads (registered with pms_sp_exempt) and threads
 * that never run signal handlers; the handler acknowledges and parks on a
 * futex until pms_sp_release.  The task list is re-read until a pass finds
 * no new thread (a thread that was running may have created one).
 *
 * The signal (pms_sp_signal) is chosen once, by pms_sp_init: PMEMSNAP_SIGNAL
 * from the environment if set (a number, RTMIN+n or RTMAX-n; refused if that
 * signal already has a handler), else the first real-time signal, trying
 * SIGRTMIN+6, +7 .. SIGRTMAX then SIGRTMIN+5 .. SIGRTMIN, whose disposition
 * is SIG_DFL and which the calling thread does not block.  The handler is
 * installed with one sigaction() call that also returns the old disposition,
 * so a handler installed concurrently is put back, not lost.  Each stop
 * checks that our handler is still installed and says so if not.
 *
 * Threads that are not waited for:
 *  - kernel-side threads of our thread group: io_uring workers (iou-wrk-*,
 *    iou-sqp-*: PF_IO_WORKER) and user workers such as vhost (PF_USER_WORKER),
 *    told apart by the flags field of /proc/self/task/TID/stat.  They
 *    block every signal and run no user code; what they write into the
 *    mapping during a cut is described in lib/mem/README.md;
 *  - zombies (a thread group leader that called pthread_exit) and threads
 *    that exit meanwhile;
 *  - in a ThreadSanitizer build only, threads that block every signal and
 *    sleep in nanosleep (its background thread does).  Under ThreadSanitizer a handler runs at once
 *    only in calls it knows to block (poll, nanosleep, futex waits...); a
 *    thread inside another intercepted call (read) parks when it returns.
 * Reading a stat file costs ~12 us (test VM), too much to pay per thread
 * per stop, so it is read lazily: every thread is signalled, and those
 * that have not parked SP_GRACE_NS later are classified; a thread found
 * to be a worker or a zombie is remembered (sp.suspect, by thread id) and
 * from the next stop on classified before it would be signalled, so it is
 * signalled at most once in its life (a signal it blocks stays queued and
 * counts against RLIMIT_SIGPENDING until it exits).  A remembered id
 * reused by a new application thread is found ordinary and signalled.
 *
 * Each signal carries (round << 32 | index) as its value
 * (rt_tgsigqueueinfo): the handler acknowledges with one compare-and-swap
 * on its own entry (round, state, thread id in one word), so it costs O(1)
 * and a signal left over from an earlier stop changes nothing, even when
 * its entry was reused.  The stop list grows in mmap'd chunks (kept for
 * later stops) up to every possible thread id; a bitmap indexed by thread
 * id (mmap'd, 512 KiB of address space, touched where ids fall) answers
 * "already listed" in O(1).  The exempt table is a linked list of
 * chunks that grows the same way; registration can only fail for want of
 * memory, and says so; the thread then blocks the signal and every stop
 * fails with ENOMEM while it lives (parked, it could hold a lock the cut
 * needs).
 *
 * Invariants:
 *  - between pms_sp_stop() returning 0 and pms_sp_release() no
 *    non-exempt thread other than the caller executes user code (kernel
 *    workers may still write into memory, see above); the handler runs
 *    with every signal blocked, so no other handler runs on a parked
 *    thread;
 *  - pms_sp_stop/pms_sp_release never call malloc or take a lock a parked
 *    thread could hold (parked threads may sit inside malloc): they use
 *    system calls (mmap to grow the list) and string functions that do
 *    not allocate; messages are formatted after the threads are released;
 *    the caller must not either, in between;
 *  - one stop at a time per process: sp.mu, a plain mutex taken only by
 *    pms_sp_stop and dropped by pms_sp_release, guards the stop list, the
 *    bitmaps and sp.stuck.  The handler only reads sp.active, sp.round,
 *    sp.gen and the list (all atomics) and writes its own entry's state.
 * Every failure releases the threads parked so far and returns -errno with
 * a message: -EAGAIN when a thread did not park within the timeout (it
 * blocks the signal, or sits in an uninterruptible kernel wait; its id is
 * kept for pms_sp_stuck_tid), -EBUSY when the handler was replaced, -ENOMEM,
 * or the error of reading /proc/self/task.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "mem-int.h"
#include "util/error.h"

#if defined(__SANITIZE_THREAD__)
#define SP_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SP_TSAN 1
#endif
#endif

/* Stop list: SP_CHUNK entries per mmap'd chunk, SP_NCHUNK chunks, so that
 * every thread id the kernel can hand out (PID_MAX_LIMIT, 2^22 on 64-bit)
 * fits; a chunk is 32 KiB. */
#define SP_CHUNK      4096u
#define SP_NCHUNK     1024u
#define SP_TID_LIMIT  (SP_CHUNK * SP_NCHUNK)
/* exempt threads per chunk: 3 per mapping, so the first chunk covers 42 */
#define SP_EX_CHUNK   128
/* waiting for acknowledgements: this many sched_yield()s, then sleeps of
 * SP_NAP_NS (a parked thread needs one wake-up and a handler entry) */
#define SP_SPINS      200
#define SP_NAP_NS     20000
/* threads that have not parked this long after the wait began are
 * classified from /proc (worker? zombie?), all at once, then the first of
 * them again every SP_RECHECK_NS.  An application thread on an idle CPU
 * parks within tens of microseconds; the grace is in time, not in spins,
 * because a sched_yield can cost a whole time slice on a busy machine. */
#define SP_GRACE_NS   200000ull
#define SP_RECHECK_NS 1000000ull
/* task flags (include/linux/sched.h): threads that never run handlers */
#define SP_PF_IO_WORKER   0x00000010u
#define SP_PF_USER_WORKER 0x00004000u

enum { ST_WAIT, ST_PARKED, ST_GONE, ST_WORKER };

/* An entry of the stop list is one word, round << 32 | state << 24 | tid
 * (thread ids stay below 2^22), so that the handler's acknowledgement is a
 * compare-and-swap that fails on an entry reused by a later stop. */
struct sp_ent {
    _Atomic uint64_t w;
};

static uint64_t ew(uint32_t round, int state, pid_t t)
{
    return (uint64_t)round << 32 | (uint64_t)state << 24 | (uint32_t)t;
}
static pid_t e_tid(struct sp_ent *e) { return (pid_t)(atomic_load(&e->w) & 0xffffff); }
static int e_state(struct sp_ent *e) { return (int)(atomic_load(&e->w) >> 24 & 0xff); }
/* WAIT -> state, unless the thread parked meanwhile */
static void e_set(struct sp_ent *e, int state)
{
    uint64_t w = atomic_load(&e->w);
    while ((w >> 24 & 0xff) == ST_WAIT &&
           !atomic_compare_exchange_weak(&e->w, &w, (w & ~0xff000000ull) | (uint64_t)state << 24))
        ;
}

struct sp_exchunk {
    _Atomic pid_t tid[SP_EX_CHUNK];
    struct sp_exchunk *_Atomic next;
};

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static struct {
    pthread_mutex_t mu;
    int sig;                              /* chosen by pms_sp_init */
    uid_t uid;                            /* for the signals' siginfo */
    _Atomic int active;
    _Atomic uint32_t gen;                 /* futex word; bumped by release */
    _Atomic uint32_t round;               /* bumped by each stop */
    struct sp_ent *_Atomic chunk[SP_NCHUNK];
    uint32_t n;                           /* entries listed in this stop */
    uint64_t *seen;                       /* bitmap by thread id: listed */
    uint64_t *suspect;                    /* bitmap by thread id: was a worker
                                             or zombie in an earlier stop */
    struct sp_exchunk ex;                 /* first exempt chunk; more linked */
    pid_t stuck;                          /* last thread that did not park */
    _Atomic pid_t unreg;                  /* a library thread whose
                                             registration failed, or 0 */
} sp = { .mu = PTHREAD_MUTEX_INITIALIZER };

static pthread_once_t sp_once = PTHREAD_ONCE_INIT;
static int sp_init_err;
static char sp_init_msg[256];

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct sp_ent *ent(uint32_t i)
{
    struct sp_ent *c = i < SP_TID_LIMIT ? atomic_load(&sp.chunk[i / SP_CHUNK]) : NULL;
    return c ? &c[i % SP_CHUNK] : NULL;
}

static void handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)uc;
    int e = errno;
    uint32_t g = atomic_load(&sp.gen);
    if (si->si_code == SI_QUEUE && si->si_pid == getpid() && atomic_load(&sp.active)) {
        uint64_t v = (uint64_t)(uintptr_t)si->si_value.sival_ptr;
        uint32_t round = (uint32_t)(v >> 32);
        struct sp_ent *me = ent((uint32_t)v);
        uint64_t want = ew(round, ST_WAIT, my_tid());
        if (round == atomic_load(&sp.round) && me &&
            atomic_compare_exchange_strong(&me->w, &want, ew(round, ST_PARKED, my_tid())))
            while (atomic_load(&sp.gen) == g)
                syscall(SYS_futex, &sp.gen, FUTEX_WAIT_PRIVATE, g, NULL, NULL, 0);
    }
    errno = e;
}

/* "SIGRTMIN+n" for messages */
static const char *sig_name(int s, char *buf, size_t n)
{
    if (s >= SIGRTMIN && s <= SIGRTMAX)
        snprintf(buf, n, "SIGRTMIN+%d", s - SIGRTMIN);
    else
        snprintf(buf, n, "signal %d", s);
    return buf;
}

/* Install our handler on s if s has the default disposition; else put the
 * old one back and return -EBUSY. */
static int take(int s, const struct sigaction *sa)
{
    struct sigaction old;
    if (sigaction(s, sa, &old) < 0)
        return -errno;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL)
        return 0;
    sigaction(s, &old, NULL);
    return -EBUSY;
}

/* PMEMSNAP_SIGNAL: "N", "[SIG]RTMIN+n" or "[SIG]RTMAX-n"; 0 if malformed. */
static int parse_signal(const char *v)
{
    if (strncmp(v, "SIG", 3) == 0)
        v += 3;
    int base = 0, sign = 1;
    if (strncmp(v, "RTMIN", 5) == 0)
        base = SIGRTMIN, v += 5;
    else if (strncmp(v, "RTMAX", 5) == 0)
        base = SIGRTMAX, v += 5, sign = -1;
    if (base && *v == '\0')
        return base;
    if (base && *v != (sign > 0 ? '+' : '-'))
        return 0;
    if (base)
        v++;
    char *end;
    long n = strtol(v, &end, 10);
    if (end == v || *end || n < 0 || n > SIGRTMAX)
        return 0;
    return base ? base + sign * (int)n : (int)n;
}

static void sp_setup(void)
{
    char nb[32];
    sp.seen = mmap(NULL, SP_TID_LIMIT / 4, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (sp.seen == MAP_FAILED) {
        sp.seen = NULL;
        sp_init_err = -ENOMEM;
        snprintf(sp_init_msg, sizeof sp_init_msg, "safepoint: out of memory for its thread map");
        return;
    }
    sp.suspect = sp.seen + SP_TID_LIMIT / 64;
    sp.uid = getuid();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask);             /* no other handler on a parked thread */

    const char *env = getenv("PMEMSNAP_SIGNAL");
    if (env && *env) {
        int s = parse_signal(env);
        if (s < SIGRTMIN || s > SIGRTMAX) {
            sp_init_err = -EINVAL;
            snprintf(sp_init_msg, sizeof sp_init_msg,
                     "PMEMSNAP_SIGNAL=%s is not a real-time signal (%d..%d, RTMIN+n or "
                     "RTMAX-n)", env, SIGRTMIN, SIGRTMAX);
            return;
        }
        int r = take(s, &sa);
        if (r < 0) {
            sp_init_err = r;
            snprintf(sp_init_msg, sizeof sp_init_msg,
                     r == -EBUSY ? "PMEMSNAP_SIGNAL=%s: %s already has a handler"
                                 : "PMEMSNAP_SIGNAL=%s: cannot install a handler on %s",
                     env, sig_name(s, nb, sizeof nb));
            return;
        }
        sp.sig = s;
        return;
    }
    sigset_t blocked;
    pthread_sigmask(SIG_BLOCK, NULL, &blocked);
    int first = SIGRTMIN + PMS_SP_SIGNAL_DEFAULT_OFFSET;
    for (int i = 0; i <= SIGRTMAX - SIGRTMIN; i++) {
        /* first, first+1 .. SIGRTMAX, then first-1 .. SIGRTMIN */
        int s = first + i <= SIGRTMAX ? first + i : SIGRTMAX - i;
        if (sigismember(&blocked, s) || take(s, &sa) < 0)
            continue;
        sp.sig = s;
        return;
    }
    sp_init_err = -EBUSY;
    snprintf(sp_init_msg, sizeof sp_init_msg,
             "no real-time signal is free for the safepoint (every one has a handler or "
             "is blocked); set PMEMSNAP_SIGNAL");
}

int pms_sp_init(void)
{
    pthread_once(&sp_once, sp_setup);
    if (sp_init_err < 0)
        return pms_err(-sp_init_err, "%s", sp_init_msg);
    return 0;
}

int pms_sp_signal(void)
{
    return sp.sig;
}

int pms_sp_exempt(int add)
{
    pid_t t = my_tid(), want;
    struct sp_exchunk *c = &sp.ex, *last = c;
    for (; c; last = c, c = atomic_load(&c->next))
        for (int i = 0; i < SP_EX_CHUNK; i++) {
            want = add ? 0 : t;
            if (atomic_compare_exchange_strong(&c->tid[i], &want, add ? t : 0))
                return 0;
        }
    if (!add) {                           /* was not registered */
        want = t;
        atomic_compare_exchange_strong(&sp.unreg, &want, 0);
        return 0;
    }
    struct sp_exchunk *nc = mmap(NULL, sizeof *nc, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (nc == MAP_FAILED) {
        /* Parked, this thread could hold a lock the cut needs.  Block the
         * signal in it (a stop then cannot park it) and make stops refuse
         * while it runs. */
        sigset_t set;
        sigemptyset(&set);
        if (sp.sig)
            sigaddset(&set, sp.sig);
        pthread_sigmask(SIG_BLOCK, &set, NULL);
        atomic_store(&sp.unreg, t);
        return pms_err(ENOMEM, "out of memory registering library thread %d with the "
                       "safepoint", (int)t);
    }
    atomic_store(&nc->tid[0], t);
    struct sp_exchunk *expect = NULL;
    while (!atomic_compare_exchange_strong(&last->next, &expect, nc)) {
        last = expect;
        expect = NULL;
    }
    return 0;
}

static int is_exempt(pid_t t)
{
    for (struct sp_exchunk *c = &sp.ex; c; c = atomic_load(&c->next))
        for (int i = 0; i < SP_EX_CHUNK; i++)
            if (atomic_load(&c->tid[i]) == t)
                return 1;
    return 0;
}

/* State ('R', 'S', 'Z', ...) and flags of a thread from its stat file;
 * -ENOENT if it is gone. */
static int task_stat(int taskfd, pid_t t, char *state, unsigned long *flags)
{
    char path[32], buf[256];
    snprintf(path, sizeof path, "%d/stat", (int)t);
    int fd = openat(taskfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = errno;
    close(fd);
    if (n <= 0)
        return n == 0 ? -ENOENT : -e;     /* ESRCH: exited meanwhile */
    buf[n] = '\0';
    /* "tid (comm) S ppid pgrp session tty_nr tpgid flags ..."; comm may hold
     * anything, so parse from the last ')' */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ' || !p[2])
        return -EIO;
    *state = p[2];
    p += 3;
    for (int f = 0; f < 5; f++) {         /* skip ppid .. tpgid */
        p = strchr(p + 1, ' ');
        if (!p)
            return -EIO;
    }
    unsigned long v = 0;
    for (p++; *p >= '0' && *p <= '9'; p++)
        v = v * 10 + (unsigned long)(*p - '0');
    *flags = v;
    return 0;
}

static int bit(const uint64_t *b, uint32_t t) { return b[t / 64] >> (t % 64) & 1; }
static void bset(uint64_t *b, uint32_t t) { b[t / 64] |= 1ull << (t % 64); }
static void bclr(uint64_t *b, uint32_t t) { b[t / 64] &= ~(1ull << (t % 64)); }

/* The thread's blocked-signal mask (SigBlk of its status file) in *mask
 * (bit n-1 = signal n); -errno if unreadable. */
static int sig_mask(pid_t t, uint64_t *mask)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/self/task/%d/status", (int)t);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = '\0';
    char *p = strstr(buf, "SigBlk:");
    if (!p)
        return -EIO;
    for (p += 7; *p == ' ' || *p == '\t'; p++)
        ;
    uint64_t v = 0;
    for (;; p++) {
        int d = *p >= '0' && *p <= '9' ? *p - '0' : *p >= 'a' && *p <= 'f' ? *p - 'a' + 10 : -1;
        if (d < 0)
            break;
        v = v << 4 | (uint64_t)d;
    }
    *mask = v;
    return 0;
}

#ifdef SP_TSAN
/* the thread sits in nanosleep or clock_nanosleep (/proc/.../syscall) */
static int in_nanosleep(pid_t t)
{
    char path[64], buf[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", (int)t);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    long nr = strtol(buf, NULL, 10);
    return nr == SYS_nanosleep || nr == SYS_clock_nanosleep;
}
#endif

/* ST_WAIT for an application thread, ST_WORKER, ST_GONE (exited or zombie,
 * the latter two remembered in sp.suspect), or -errno. */
static int classify(int taskfd, pid_t t)
{
    char st = 0;
    unsigned long fl = 0;
    int r = task_stat(taskfd, t, &st, &fl);
    if (r == -ENOENT || r == -ESRCH)
        return ST_GONE;
    if (r < 0)
        return r;
    int worker = (fl & (SP_PF_IO_WORKER | SP_PF_USER_WORKER)) != 0;
#ifdef SP_TSAN
    /* ThreadSanitizer's own background thread blocks every signal, sleeps
     * in nanosleep and never touches the application's memory; in such a
     * build only, an application thread doing the same is taken for it.
     * (A thread running our handler blocks every signal too, but is not
     * in nanosleep before it acknowledges.) */
    uint64_t mask = 0;
    if (!worker && in_nanosleep(t) && sig_mask(t, &mask) == 0) {
        sigset_t all;
        sigfillset(&all);
        int full = 1;
        for (int s = 1; s <= 64 && full; s++)
            if (s != SIGKILL && s != SIGSTOP && sigismember(&all, s) == 1 &&
                !(mask >> (s - 1) & 1))
                full = 0;
        worker = full;
    }
#endif
    if (st != 'Z' && st != 'X' && !worker) {
        bclr(sp.suspect, (uint32_t)t);
        return ST_WAIT;
    }
    bset(sp.suspect, (uint32_t)t);
    return (st == 'Z' || st == 'X') ? ST_GONE : ST_WORKER;
}

static int list_add(pid_t t, int state, uint32_t *idx)
{
    if (sp.n >= SP_TID_LIMIT)
        return -ENOMEM;
    if (!atomic_load(&sp.chunk[sp.n / SP_CHUNK])) {
        void *c = mmap(NULL, SP_CHUNK * sizeof(struct sp_ent), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c == MAP_FAILED)
            return -ENOMEM;
        atomic_store(&sp.chunk[sp.n / SP_CHUNK], c);
    }
    atomic_store(&ent(sp.n)->w, ew(atomic_load(&sp.round), state, t));
    *idx = sp.n++;
    return 0;
}

static int sp_send(pid_t pid, pid_t t, uint32_t idx)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = sp.sig;
    si.si_code = SI_QUEUE;
    si.si_pid = pid;
    si.si_uid = sp.uid;
    si.si_value.sival_ptr = (void *)(uintptr_t)((uint64_t)atomic_load(&sp.round) << 32 | idx);
    return syscall(SYS_rt_tgsigqueueinfo, pid, t, sp.sig, &si) < 0 ? -errno : 0;
}

/* Failure details, formatted once the threads are released. */
struct why {
    int err;
    const char *what;
    pid_t tid;
};

/* Signal the threads not yet listed; *fresh = how many were new. */
static int enumerate(pid_t self, pid_t pid, int *fresh, struct why *w)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *w = (struct why){ errno, "cannot open /proc/self/task", 0 };
        return -w->err;
    }
    char buf[4096] __attribute__((aligned(8)));
    int r = 0;
    *fresh = 0;
    for (;;) {
        long nb = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (nb < 0) {
            *w = (struct why){ errno, "reading /proc/self/task failed", 0 };
            r = -w->err;
            break;
        }
        if (nb == 0)
            break;
        for (long o = 0; o < nb && r == 0; ) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + o);
            o += d->d_reclen;
            if (d->d_name[0] < '0' || d->d_name[0] > '9')
                continue;
            uint64_t t = 0;
            for (const char *p = d->d_name; *p >= '0' && *p <= '9' && t < SP_TID_LIMIT; p++)
                t = t * 10 + (uint64_t)(*p - '0');
            if (t == 0 || t >= SP_TID_LIMIT) {
                *w = (struct why){ ERANGE, "unexpected thread id in /proc/self/task", 0 };
                r = -ERANGE;
                break;
            }
            if ((pid_t)t == self || bit(sp.seen, (uint32_t)t) || is_exempt((pid_t)t))
                continue;
            int state = bit(sp.suspect, (uint32_t)t) ? classify(fd, (pid_t)t) : ST_WAIT;
            if (state < 0) {
                *w = (struct why){ -state, "cannot read the stat file of thread", (pid_t)t };
                r = state;
                break;
            }
            uint32_t idx;
            if (list_add((pid_t)t, state, &idx) < 0) {
                *w = (struct why){ ENOMEM, "out of memory for the list of threads", 0 };
                r = -ENOMEM;
                break;
            }
            bset(sp.seen, (uint32_t)t);
            if (state != ST_WAIT)
                continue;
            (*fresh)++;
            int sr2 = sp_send(pid, (pid_t)t, idx);
            if (sr2 == -ESRCH)
                e_set(ent(idx), ST_GONE);
            else if (sr2 < 0) {
                *w = (struct why){ -sr2, sr2 == -EAGAIN ? "cannot signal thread (the queue "
                                   "of pending signals is full, RLIMIT_SIGPENDING)"
                                   : "cannot signal thread", (pid_t)t };
                r = sr2;
            }
        }
        if (r < 0)
            break;
    }
    close(fd);
    return r;
}

/* Classify the entries from lo on that have not parked yet (all of them,
 * or only the first); -errno if /proc cannot be read. */
static int sweep(uint32_t lo, int all, struct why *w)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *w = (struct why){ errno, "cannot open /proc/self/task", 0 };
        return -w->err;
    }
    int r = 0;
    for (uint32_t i = lo; i < sp.n; i++) {
        struct sp_ent *e = ent(i);
        if (e_state(e) != ST_WAIT)
            continue;
        pid_t t = e_tid(e);
        int c = classify(fd, t);
        if (c < 0) {
            *w = (struct why){ -c, "cannot read the stat file of thread", t };
            r = c;
            break;
        }
        if (c != ST_WAIT)
            e_set(e, c);
        if (!all)
            break;
    }
    close(fd);
    return r;
}

/* Wait until every listed thread parked, is gone or turns out to be a
 * worker; -EAGAIN at the deadline. */
static int await(pid_t pid, uint64_t deadline, uint32_t *lo, struct why *w)
{
    uint64_t recheck = 0, t0 = now_ns();
    for (int spins = 0;; spins++) {
        while (*lo < sp.n) {
            struct sp_ent *e = ent(*lo);
            if (e_state(e) != ST_WAIT) {
                (*lo)++;
                continue;
            }
            pid_t t = e_tid(e);
            if (syscall(SYS_tgkill, pid, t, 0) < 0 && errno == ESRCH) {
                e_set(e, ST_GONE);
                continue;
            }
            sp.stuck = t;
            break;
        }
        if (*lo == sp.n)
            return 0;
        uint64_t now = now_ns();
        if (now > deadline)
            return -EAGAIN;
        if (now - t0 >= SP_GRACE_NS && now > recheck) {
            /* all slow ones once, then the first every SP_RECHECK_NS */
            int r = sweep(*lo, recheck == 0, w);
            if (r < 0)
                return r;
            recheck = now + SP_RECHECK_NS;
            continue;
        }
        if (spins < SP_SPINS)
            sched_yield();
        else {
            struct timespec ts = { 0, SP_NAP_NS };
            nanosleep(&ts, NULL);
        }
    }
}

/* /proc/self/task/TID/comm into buf ("?" if unreadable) */
static const char *comm_of(pid_t t, char *buf, size_t n)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/comm", (int)t);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t k = fd >= 0 ? read(fd, buf, n - 1) : -1;
    if (fd >= 0)
        close(fd);
    if (k <= 0)
        k = snprintf(buf, n, "?");
    buf[k] = '\0';
    if (k > 0 && buf[k - 1] == '\n')
        buf[k - 1] = '\0';
    return buf;
}

int pms_sp_stop(unsigned timeout_ms)
{
    int r = pms_sp_init();
    if (r < 0)
        return r;
    char nb[32];
    struct sigaction cur;
    if (sigaction(sp.sig, NULL, &cur) == 0 &&
        (!(cur.sa_flags & SA_SIGINFO) || cur.sa_sigaction != handler))
        return pms_err(EBUSY, "the safepoint's handler on %s was replaced (by the "
                       "application?); set PMEMSNAP_SIGNAL to a signal nobody else uses",
                       sig_name(sp.sig, nb, sizeof nb));
    pid_t self = my_tid(), pid = getpid(), un = atomic_load(&sp.unreg);
    if (un && syscall(SYS_tgkill, pid, un, 0) == 0)
        return pms_err(ENOMEM, "library thread %d could not be registered with the "
                       "safepoint (out of memory): no live snapshot while it runs", (int)un);
    pthread_mutex_lock(&sp.mu);
    sp.n = 0;
    sp.stuck = 0;
    atomic_fetch_add(&sp.round, 1);
    atomic_store(&sp.active, 1);
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    uint32_t lo = 0;
    struct why w = { 0, NULL, 0 };
    for (;;) {
        int fresh;
        r = enumerate(self, pid, &fresh, &w);
        if (r == 0)
            r = await(pid, deadline, &lo, &w);
        if (r < 0 || fresh == 0)
            break;
    }
    if (r == 0)
        return 0;
    pid_t stuck = sp.stuck;
    pms_sp_release();
    char comm[32];
    if (r == -EAGAIN && !w.what) {
        uint64_t mask = 0;
        char st = 0;
        unsigned long fl;
        int tfd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (tfd >= 0) {
            task_stat(tfd, stuck, &st, &fl);
            close(tfd);
        }
        int blocks = sig_mask(stuck, &mask) == 0 && (mask >> (sp.sig - 1) & 1);
        const char *why = blocks ? "it blocks" : st == 'D' ?
            "it is in an uninterruptible wait (state D), it does not block" :
            "it blocked, or sat in an uninterruptible wait, it does not block now";
        return pms_err(EAGAIN, "thread %d (%s) did not stop within %u ms: %s %s", (int)stuck,
                       comm_of(stuck, comm, sizeof comm), timeout_ms, why,
                       sig_name(sp.sig, nb, sizeof nb));
    }
    if (w.tid)
        return pms_err(w.err, "safepoint: %s %d (%s): %s", w.what, (int)w.tid,
                       comm_of(w.tid, comm, sizeof comm), strerror(w.err));
    return pms_err(w.err, "safepoint: %s: %s", w.what, strerror(w.err));
}

void pms_sp_release(void)
{
    atomic_store(&sp.active, 0);
    atomic_fetch_add(&sp.gen, 1);
    syscall(SYS_futex, &sp.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    for (uint32_t i = 0; i < sp.n; i++)
        bclr(sp.seen, (uint32_t)e_tid(ent(i)));
    sp.n = 0;
    pthread_mutex_unlock(&sp.mu);
}

int pms_sp_stuck_tid(void)
{
    return sp.stuck;
}
