/* The safepoint with many threads (internal API, lib/mem/mem-int.h).
 *
 *   sp-threads NT NX
 *
 * NT application threads and NX "library" threads (registered with
 * pms_sp_exempt, more than one chunk of the exempt table) all wait in poll()
 * on a pipe.  pms_sp_stop must park every application thread (each one's
 * /proc/self/task/TID/syscall shows futex, the handler's wait, instead of
 * poll) and none of the exempt ones (still in poll); after pms_sp_release
 * all are back in poll.  NT above 8192 exceeds the fixed table the
 * safepoint used to have, whose overflow threads were silently left running.
 * Exit 0 = pass, 1 = fail, 77 = cannot create that many threads.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "mem/mem-int.h"
#include "pmemsnap.h"

#define FAIL(...) do { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                       fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)
#define CHECK(c, ...) do { if (!(c)) FAIL(__VA_ARGS__); } while (0)

#define STACK (128u << 10)

static int g_pipe[2];
static pid_t *g_tids;
static atomic_int g_ready;

struct arg { int i, exempt; };

static void *body(void *p)
{
    struct arg *a = p;
    if (a->exempt)
        CHECK(pms_sp_exempt(1) == 0, "pms_sp_exempt: %s", pms_errmsg());
    g_tids[a->i] = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&g_ready, 1);
    /* poll, not read: ThreadSanitizer runs a handler at once only in calls
     * it knows to block; one arriving in its read() waits for the return */
    struct pollfd pf = { g_pipe[0], POLLIN, 0 };
    while (poll(&pf, 1, -1) < 0 && errno == EINTR)
        ;
    if (a->exempt)
        pms_sp_exempt(0);
    return NULL;
}

/* system call number the thread sits in, -1 if running or unreadable */
static long in_syscall(pid_t t)
{
    char p[64], buf[128];
    snprintf(p, sizeof p, "/proc/self/task/%d/syscall", (int)t);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    long nr = -1;
    if (fgets(buf, sizeof buf, f))
        nr = strtol(buf, NULL, 10);
    fclose(f);
    return nr;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* every thread in [from, to) sits in syscall nr (waits up to 10 s for it) */
static int all_in(int from, int to, long nr)
{
    for (int i = from; i < to; i++)
        for (int tries = 0; in_syscall(g_tids[i]) != nr; tries++) {
            if (tries > 10000)
                return i;
            usleep(1000);
        }
    return -1;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s NT NX\n", argv[0]);
        return 2;
    }
    int nt = atoi(argv[1]), nx = atoi(argv[2]), n = nt + nx;
    CHECK(nt > 0 && nx >= 0, "bad counts");
    CHECK(pipe(g_pipe) == 0, "pipe");
    g_tids = calloc((size_t)n, sizeof *g_tids);
    pthread_t *th = calloc((size_t)n, sizeof *th);
    struct arg *args = calloc((size_t)n, sizeof *args);
    CHECK(g_tids && th && args, "calloc");
    CHECK(pms_sp_init() == 0, "pms_sp_init: %s", pms_errmsg());
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, STACK);
    for (int i = 0; i < n; i++) {
        args[i] = (struct arg){ i, i >= nt };
        int r = pthread_create(&th[i], &at, body, &args[i]);
        if (r == EAGAIN) {
            fprintf(stderr, "SKIP: cannot create thread %d of %d (%s)\n", i, n, strerror(r));
            return 77;
        }
        CHECK(r == 0, "pthread_create %d: %s", i, strerror(r));
    }
    while (atomic_load(&g_ready) < n)
        usleep(1000);
    int bad = all_in(0, n, SYS_poll);
    CHECK(bad < 0, "thread %d never blocked in poll", bad);

    uint64_t t0 = now_ns();
    int r = pms_sp_stop(20000);
    uint64_t t1 = now_ns();
    CHECK(r == 0, "pms_sp_stop with %d threads: %s", n, pms_errmsg());
    int parked = 0, missed = -1, wrong = -1;
    for (int i = 0; i < nt; i++) {
        if (in_syscall(g_tids[i]) == SYS_futex)
            parked++;
        else if (missed < 0)
            missed = i;
    }
    for (int i = nt; i < n && wrong < 0; i++)
        if (in_syscall(g_tids[i]) != SYS_poll)
            wrong = i;
    pms_sp_release();
    CHECK(missed < 0, "pms_sp_stop returned 0 but %d of %d threads were not parked "
          "(first: #%d, tid %d)", nt - parked, nt, missed, (int)g_tids[missed]);
    CHECK(wrong < 0, "exempt thread #%d (tid %d) was stopped", wrong, (int)g_tids[wrong]);
    bad = all_in(0, n, SYS_poll);
    CHECK(bad < 0, "thread %d did not resume its poll after release", bad);

    /* a second stop reuses the grown list */
    uint64_t t2 = now_ns();
    CHECK(pms_sp_stop(20000) == 0, "second stop: %s", pms_errmsg());
    uint64_t t3 = now_ns();
    pms_sp_release();

    CHECK(close(g_pipe[1]) == 0, "close");  /* EOF: every reader returns */
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    printf("%d threads parked, %d exempt left running; stop took %.1f ms, again %.1f ms\n",
           nt, nx, (t1 - t0) / 1e6, (t3 - t2) / 1e6);
    free(g_tids);
    free(th);
    free(args);
    return 0;
}
