/* The write-back helper of pmemsnap serve: a child process that writes the
 * FUSE file's page cache back on the daemon's behalf.
 *
 * Why a process: writing back the page cache of the FUSE file means waiting
 * for FUSE_WRITE requests that the daemon itself answers.  A daemon thread
 * waiting in that write-back may not be able to finish once the daemon is
 * being killed: its other threads, which would answer, are gone, and the
 * connection is not aborted while any thread of the daemon (holding the
 * /dev/fuse descriptor) is left.  Seen here with a daemon thread that
 * started write-back every 128 MiB of reads: after kill -9 the daemon did
 * not die.  The pre-copy's waits did not hang in six kill -9 tries during
 * snapshots (the daemon was gone within 2 s either way), but they are the
 * same kind of wait.  A separate process holds no /dev/fuse descriptor, so
 * when the daemon dies the kernel aborts the connection, the helper's wait
 * ends with an error, it reads EOF on its socket and exits.
 *
 * Protocol, over a SOCK_SEQPACKET socket pair (one byte per message):
 *   HELPER_WRITE    write every dirty page back and wait for it (the
 *                   pre-copy: sync_file_range WAIT_BEFORE|WRITE|WAIT_AFTER)
 *   HELPER_FSYNC    fsync(2) the file: every dirty page, then FUSE_FSYNC
 * Each is answered with an int: 0 or an errno value.
 *
 * The helper opens the file for each command and closes it after, so it
 * never holds the mount busy: `umount FILE` from outside works, and after
 * a lazy unmount the file system goes once its last user does (the FUSE
 * loop then ends and the daemon stops).  Each open is checked to be on the
 * mount's device (learnt at the first start): once the path names the
 * file under the mount instead, a command fails with ENODEV rather than
 * write back the wrong file's pages and report success.
 *
 * Not done here: starting the write-back early while mapped writers store
 * (a kick every 128 MiB of FUSE reads).  Measured 2026-12-07 against the
 * same build without it, alternated, 512 MiB first-touch write through an
 * mmap: 0.53-0.92 GB/s with, 0.70-0.97 GB/s without (the stores phase
 * doubled while the msync after it shrank).
 *
 * Threads: control threads and the main thread call flusher_write,
 * flusher_fsync and flusher_stop; a FUSE worker (lseek) calls only
 * flusher_try_write, which never waits for f->mu: a worker runs inside a
 * syscall of another process that may hold the file's inode lock, which the
 * helper's fsync for a control thread needs.  f->mu guards f->sk and f->pid and
 * serialises commands (one reply in flight).  A helper that died is started
 * again by the next command (the fork runs only async-signal-safe calls in
 * the child).
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "serve.h"

enum { HELPER_WRITE = 'w', HELPER_FSYNC = 'f' };
/* The helper's end of the socket, moved to this descriptor in the child. */
#define HELPER_FD 3

/* Open path read-only and check that it is on device dev (0: any); the
 * descriptor, or -errno. */
static int open_on(const char *path, dev_t dev)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0 || (dev && st.st_dev != dev)) {
        close(fd);
        return -ENODEV;
    }
    return fd;
}

static void helper_main(int sk, const char *path, dev_t dev)
{
    prctl(PR_SET_NAME, "pms-flusher", 0, 0, 0);
    if (sk != HELPER_FD && dup2(sk, HELPER_FD) < 0)
        _exit(1);
    /* no standard descriptors of the caller either: a pipe on the daemon's
     * stdout (out=$(pmemsnap serve ...)) must reach EOF once serve returns */
    int nul = open("/dev/null", O_RDWR);
    for (int i = 0; nul >= 0 && i < 3; i++)
        if (nul != i) dup2(nul, i);
    close_range(HELPER_FD + 1, ~0u, 0);     /* no /dev/fuse, no parent pipes */
    /* first reply: the open's result and the device */
    int fd = open_on(path, dev);
    struct stat st;
    struct { int r; int pad; uint64_t dev; } hello = { .r = fd < 0 ? -fd : 0 };
    if (fd >= 0 && fstat(fd, &st) == 0)
        hello.dev = (uint64_t)st.st_dev;
    if (fd >= 0)
        close(fd);
    if (send(HELPER_FD, &hello, sizeof hello, MSG_NOSIGNAL) != sizeof hello || hello.r)
        _exit(1);
    dev = (dev_t)hello.dev;
    for (;;) {
        char c;
        if (recv(HELPER_FD, &c, 1, 0) != 1)
            _exit(0);                       /* the daemon closed its end, or died */
        int r = 0;
        fd = open_on(path, dev);
        if (fd < 0)
            r = -fd;
        else {
            int k = c == HELPER_WRITE
                ? sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                            SYNC_FILE_RANGE_WAIT_AFTER)
                : c == HELPER_FSYNC ? fsync(fd) : (errno = EINVAL, -1);
            r = k < 0 ? errno : 0;
            close(fd);
        }
        if (send(HELPER_FD, &r, sizeof r, MSG_NOSIGNAL) != sizeof r)
            _exit(0);
    }
}

/* Wait for a helper that is gone, or going: its socket is closed. */
static void reap(struct flusher *f)
{
    if (f->pid > 0) {
        while (waitpid(f->pid, NULL, 0) < 0 && errno == EINTR) {}
        f->pid = -1;
    }
}

/* Close our end (the helper reads EOF and exits) and reap it.  f->mu held. */
static void drop(struct flusher *f)
{
    if (f->sk >= 0)
        close(f->sk);
    f->sk = -1;
    reap(f);
}

/* f->mu held. */
static int start(struct flusher *f)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        return -e;
    }
    if (pid == 0)
        helper_main(sv[1], f->path, f->dev);
    close(sv[1]);
    struct { int r; int pad; uint64_t dev; } hello = { 0 };
    ssize_t n;
    while ((n = recv(sv[0], &hello, sizeof hello, 0)) < 0 && errno == EINTR) {}   /* its open */
    if (n != sizeof hello || hello.r) {
        close(sv[0]);
        f->pid = pid;
        reap(f);
        return n == sizeof hello ? -hello.r : -ECHILD;
    }
    f->sk = sv[0];
    f->pid = pid;
    f->dev = (dev_t)hello.dev;
    return 0;
}

int flusher_start(struct flusher *f, const char *path)
{
    f->sk = -1;
    f->pid = -1;
    f->path = path;
    f->dev = 0;
    pthread_mutex_init(&f->mu, NULL);
    pthread_mutex_lock(&f->mu);
    int r = start(f);
    pthread_mutex_unlock(&f->mu);
    return r;
}

/* One command and its reply; -EPIPE when the helper is gone (f->mu held). */
static int call_once(struct flusher *f, char c)
{
    if (f->sk < 0)
        return -EPIPE;
    if (send(f->sk, &c, 1, MSG_NOSIGNAL) != 1)
        return -EPIPE;
    int r;
    ssize_t n;
    while ((n = recv(f->sk, &r, sizeof r, 0)) < 0 && errno == EINTR) {}
    if (n != sizeof r)
        return -EPIPE;
    return -r;
}

static int call(struct flusher *f, char c)
{
    pthread_mutex_lock(&f->mu);
    int r = call_once(f, c);
    if (r == -EPIPE) {                      /* the helper died: a new one, once */
        drop(f);
        r = start(f);
        if (r == 0)
            r = call_once(f, c);
    }
    pthread_mutex_unlock(&f->mu);
    return r;
}

int flusher_write(struct flusher *f) { return call(f, HELPER_WRITE); }

int flusher_try_write(struct flusher *f)
{
    if (pthread_mutex_trylock(&f->mu) != 0)
        return -EBUSY;
    int r = call_once(f, HELPER_WRITE);
    pthread_mutex_unlock(&f->mu);
    return r;
}
int flusher_fsync(struct flusher *f) { return call(f, HELPER_FSYNC); }

void flusher_stop(struct flusher *f)
{
    if (!f->path)
        return;
    pthread_mutex_lock(&f->mu);
    drop(f);
    pthread_mutex_unlock(&f->mu);
    pthread_mutex_destroy(&f->mu);
    f->path = NULL;
}
