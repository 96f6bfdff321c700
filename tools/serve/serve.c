/* pmemsnap serve: the live image as a regular file (FUSE), a QMP control
 * socket, complete snapshots of a file other processes have mapped, and
 * whole-VM snapshots through the VM's own QMP socket.
 *
 * The daemon never maps the image: the FUSE file *is* the live image, and
 * the kernel's page cache of that file holds what mapped users (a VM's
 * NVDIMM, a PMDK pool) stored and the kernel has not yet written back to us.
 * Every byte reaches the image through the public block API (pms_pread,
 * pms_pwrite, pms_write_zeroes, pms_flush, pms_block_status).
 *
 * Invariants
 * - A snapshot contains every byte written (write(2) or a store into a
 *   shared mapping) before the snapshot request arrived: the request first
 *   writes the file's dirty pages back through the FUSE mount itself
 *   (pre-copy, writers still running: sync_file_range by a helper process
 *   on its descriptor of the FUSE file, served by the daemon's FUSE
 *   threads; flusher.c says why no daemon thread waits on that), then
 *   fsync()s it (the short final flush), then commits under the exclusive
 *   I/O lock.  The snapshot is the image at the instant the lock is taken.
 *   Writers that keep writing during the call: each page they dirtied is in
 *   the snapshot either in a state it had at or after the request, or not
 *   newer than its last write-back -- exactly what a power cut at that
 *   instant leaves of a page-cache-backed file, which is what msync/fsync
 *   (PMDK's pmem_msync) users are built to survive.  With --qmp the guest
 *   is stopped around the final flush and the commit, so the snapshot is
 *   the guest's memory at one instant.
 * - Revert: the file's dirty pages are written back first, then the image is
 *   reverted with FUSE writes discarded (pages the kernel still writes back
 *   while it invalidates belong to the time before the revert), then the
 *   kernel's cached pages of the file are invalidated so mappers refault the
 *   snapshot's bytes.  Writers must be stopped for a revert to mean anything
 *   (--qmp stops the guest); a store racing a revert lands before it.
 * - The exported size never changes: a revert to a snapshot of another size
 *   is refused, truncate to another size is refused.
 *
 * Threads and locks
 * - libfuse worker threads (up to SERVE_FUSE_THREADS) run the FUSE ops; each
 *   holds io_lock shared while it touches the image.
 * - control threads (qmp.c, one per connection) run snapshot/flush ops; they
 *   take op_lock (one operation at a time) and io_lock exclusively only for
 *   the commit/revert itself -- never while waiting for a FUSE request of
 *   their own (that would deadlock).
 * - the main thread waits for a signal or `quit`, then shuts down: takes
 *   op_lock for good, flushes through the mount, stops the FUSE loop,
 *   unmounts, closes the image.
 */
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include "cli.h"
#include "serve.h"

/* Largest FUSE request (bytes): the kernel's max_pages (256 pages) limit. */
#define SERVE_MAX_IO (1u << 20)
/* FUSE worker threads: enough for the kernel's background writeback
 * (max_background) and a few readers; they are cheap when idle. */
#define SERVE_FUSE_THREADS 16
/* Attribute cache timeout (s): only the daemon changes the file, and it
 * never changes its size or times. */
#define SERVE_ATTR_TIMEOUT 3600.0
/* Pre-copy passes while writers run before the final flush. */
#define SERVE_PRECOPY_PASSES 2
/* A shutdown that finds writes held for want of space (held.c) keeps
 * serving and retries them this often (ms) until they are stored or a
 * second signal or quit gives them up: they exist nowhere else. */
#define SERVE_HELD_RETRY_MS 1000

struct srv {
    const char *image, *fuse_path, *sock_path, *qmp_path, *vmstate_node;
    const char *pidfile, *backing_dir, *format, *log;
    uint64_t cache_size;
    int qmp_timeout_ms;               /* --qmp-timeout: one VM QMP command */
    unsigned threads;                 /* --threads: FUSE worker threads */
    bool foreground, allow_other, wbcache;
    atomic_bool wb_on;                /* the kernel agreed to writeback caching */
    pms_dev *dev;
    uint64_t size;
    time_t mtime;
    struct fuse_session *se;
    pthread_t fuse_thr;
    bool fuse_running, created_mountpoint, mounted;
    atomic_bool fuse_ended;       /* the FUSE loop returned: unmounted from outside */
    struct flusher flusher;           /* writes the FUSE file's page cache back */
    pthread_rwlock_t io_lock;
    pthread_mutex_t op_lock;
    /* held by the one lseek that writes the page cache back (op_lseek) */
    pthread_mutex_t seek_mu;
    atomic_bool flusher_up;           /* between flusher_start and flusher_stop */
    atomic_bool discard_writes;
    atomic_bool quitting;             /* shutdown began: VM jobs stop waiting */
    int wake[2];                      /* quit requests -> main thread */
    struct held held;                 /* writes waiting for room (held.c) */
    struct srv_stats st;
    char bdi_note[256];
};

static pthread_key_t buf_key;

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static void seterr(struct srv_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void seterr(struct srv_err *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    if (!e->eclass)
        e->eclass = "GenericError";
}

/* ---- FUSE operations -------------------------------------------------------- */

static void fill_attr(struct srv *s, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = FUSE_ROOT_ID;
    st->st_mode = S_IFREG | (s->allow_other ? 0660 : 0600);
    st->st_nlink = 1;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_size = (off_t)s->size;
    st->st_blocks = (blkcnt_t)((s->size + 511) / 512);
    st->st_blksize = 65536;
    st->st_atime = st->st_mtime = st->st_ctime = s->mtime;
}

static void op_init(void *ud, struct fuse_conn_info *conn)
{
    struct srv *s = ud;
    conn->max_write = SERVE_MAX_IO;          /* libfuse derives max_pages from it */
    conn->max_readahead = SERVE_MAX_IO;
    conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA;   /* only we invalidate */
    if (conn->capable & FUSE_CAP_ASYNC_READ)
        conn->want |= FUSE_CAP_ASYNC_READ;
    if (s->wbcache && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) {
        conn->want |= FUSE_CAP_WRITEBACK_CACHE;
        s->wb_on = true;
    } else
        conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
    if (conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
    conn->max_background = 64;
    conn->congestion_threshold = 48;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    struct stat st;
    fill_attr(s, &st);
    fuse_reply_attr(req, &st, SERVE_ATTR_TIMEOUT);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != s->size) {
        fuse_reply_err(req, EPERM);          /* the image's size is fixed here */
        return;
    }
    if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_MODE)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    struct stat st;                          /* times: accepted, not kept */
    fill_attr(s, &st);
    fuse_reply_attr(req, &st, SERVE_ATTR_TIMEOUT);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fi->flags & O_TRUNC) {
        fuse_reply_err(req, EPERM);
        return;
    }
    fi->keep_cache = 1;                      /* the page cache stays valid across opens */
    fi->direct_io = 0;                       /* mmap(MAP_SHARED) needs the page cache */
    /* close() sends no FLUSH (nothing to do for it here): a daemon killed
     * while it had its own file open would otherwise hang in exit, waiting
     * for itself to answer that FLUSH. */
    fi->noflush = 1;
    fuse_reply_open(req, fi);
}

static char *thread_buf(size_t len)
{
    struct tb { size_t cap; char data[]; } *b = pthread_getspecific(buf_key);
    if (!b || b->cap < len) {
        free(b);
        size_t cap = len < SERVE_MAX_IO ? SERVE_MAX_IO : len;
        b = malloc(sizeof *b + cap);
        if (b)
            b->cap = cap;
        pthread_setspecific(buf_key, b);
        if (!b)
            return NULL;
    }
    return b->data;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    if (off < 0 || (uint64_t)off >= s->size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (size > s->size - (uint64_t)off)
        size = s->size - (uint64_t)off;
    char *buf = thread_buf(size);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    uint64_t t0 = now_us();
    pthread_rwlock_rdlock(&s->io_lock);
    int r = held_pread(&s->held, s->dev, buf, size, (uint64_t)off);
    pthread_rwlock_unlock(&s->io_lock);
    s->st.read_us += now_us() - t0;
    if (r < 0) {
        fuse_reply_err(req, -r);
        return;
    }
    s->st.reads++;
    s->st.bytes_read += size;
    fuse_reply_buf(req, buf, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    if (off < 0 || (uint64_t)off >= s->size) {
        fuse_reply_err(req, off >= 0 && (uint64_t)off == s->size ? ENOSPC : EFBIG);
        return;
    }
    /* The file's size is the image's: a write that crosses the end writes
     * what fits and is short, as write(2) at the end of a full device is
     * (with the writeback cache the kernel may send a page past the end
     * together with pages inside it; those must not be lost with it). */
    if (size > s->size - (uint64_t)off)
        size = (size_t)(s->size - (uint64_t)off);
    if (s->discard_writes) {                 /* write-back racing a revert */
        fuse_reply_write(req, size);
        return;
    }
    uint64_t t0 = now_us();
    pthread_rwlock_rdlock(&s->io_lock);
    int r = s->discard_writes ? 0 : held_pwrite(&s->held, s->dev, buf, size, (uint64_t)off);
    pthread_rwlock_unlock(&s->io_lock);
    s->st.write_us += now_us() - t0;
    if (r < 0) {
        fuse_reply_err(req, -r);
        return;
    }
    s->st.writes++;
    s->st.bytes_written += size;
    fuse_reply_write(req, size);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    uint64_t t0 = now_us();
    pthread_rwlock_rdlock(&s->io_lock);
    /* nothing held is ever reported durable */
    int r = held_drain(&s->held, s->dev);
    if (r == 0)
        r = pms_flush(s->dev);
    pthread_rwlock_unlock(&s->io_lock);
    s->st.flush_us += now_us() - t0;
    s->st.flushes++;
    fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);                  /* close(): nothing to do; fsync makes durable */
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    if (off < 0 || len <= 0 || len > INT64_MAX - off) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    uint64_t start = (uint64_t)off, end = (uint64_t)off + (uint64_t)len;
    if (end > s->size) {
        if (!(mode & (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE))) {
            fuse_reply_err(req, EFBIG);      /* the size is the image's */
            return;
        }
        end = s->size;                       /* keep-size: up to the end only */
    }
    int r = 0;
    if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE)
        r = 0;                               /* space is the image's business */
    else if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) ||
             mode == FALLOC_FL_ZERO_RANGE || mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
        if (start < end) {
            pthread_rwlock_rdlock(&s->io_lock);
            r = held_drain(&s->held, s->dev);     /* a held write must not land over the zeroes */
            if (r == 0)
                r = pms_write_zeroes(s->dev, (size_t)(end - start), start);
            pthread_rwlock_unlock(&s->io_lock);
            s->st.zeroes++;
        }
    } else
        r = -EOPNOTSUPP;
    fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    struct srv *s = fuse_req_userdata(req);
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (off < 0 || (uint64_t)off >= s->size) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    /* Pages stored through a mapping (or cached with --writeback-cache)
     * are data the image does not have yet: the page cache is written back
     * first (by the helper; no lock of ours held, as the FUSE writes it
     * makes need other workers and io_lock).  One lseek at a time does
     * that, when the helper is free and another worker can answer those
     * writes; otherwise it answers as if the file had no holes, which is
     * always correct (holes may be reported as data). */
    if (!atomic_load(&s->flusher_up) || s->threads < 2 ||
        pthread_mutex_trylock(&s->seek_mu) != 0) {
        fuse_reply_lseek(req, whence == SEEK_DATA ? off : (off_t)s->size);
        return;
    }
    /* flusher_stop waits for seek_mu: the helper stays up meanwhile.  The
     * helper busy with a control thread's command (an fsync may wait for
     * the inode lock our caller holds) or gone: no holes either. */
    int fr = atomic_load(&s->flusher_up) ? flusher_try_write(&s->flusher) : -EBUSY;
    pthread_mutex_unlock(&s->seek_mu);
    if (fr < 0) {
        fuse_reply_lseek(req, whence == SEEK_DATA ? off : (off_t)s->size);
        return;
    }
    uint64_t pos = (uint64_t)off;
    pthread_rwlock_rdlock(&s->io_lock);
    int r = 0;
    while (pos < s->size) {
        struct pms_extent ext;
        r = pms_block_status(s->dev, pos, s->size - pos, &ext);
        if (r < 0 || ext.length == 0)
            break;
        bool data = (ext.flags & PMS_BLOCK_DATA) && !(ext.flags & PMS_BLOCK_ZERO);
        if (data == (whence == SEEK_DATA))
            break;
        pos = ext.start + ext.length;
    }
    pthread_rwlock_unlock(&s->io_lock);
    if (r < 0)
        fuse_reply_err(req, -r);
    else if (pos >= s->size && whence == SEEK_DATA)
        fuse_reply_err(req, ENXIO);
    else
        fuse_reply_lseek(req, (off_t)(pos < s->size ? pos : s->size));
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct srv *s = fuse_req_userdata(req);
    struct statvfs sv = { .f_bsize = 4096, .f_frsize = 4096,
                          .f_blocks = s->size / 4096, .f_namemax = 255 };
    fuse_reply_statfs(req, &sv);
}

static const struct fuse_lowlevel_ops fuse_ops = {
    .init = op_init,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .fallocate = op_fallocate,
    .lseek = op_lseek,
    .statfs = op_statfs,
};

static void *fuse_main_thr(void *arg)
{
    struct srv *s = arg;
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(cfg, s->threads);
    fuse_loop_cfg_set_idle_threads(cfg, 4);
    fuse_session_loop_mt(s->se, cfg);
    fuse_loop_cfg_destroy(cfg);
    atomic_store(&s->fuse_ended, true);
    srv_request_quit(s);                     /* unmounted from outside: stop too */
    return NULL;
}

static void on_usr1(int sig) { (void)sig; }

/* ---- flushing through the mount -------------------------------------------- */

/* Write back the FUSE file's dirty pages (pre-copy: writers keep running).
 * The helper process does it: see flusher.c for why no daemon thread may. */
static int precopy(struct srv *s, struct srv_err *e)
{
    for (int i = 0; i < SERVE_PRECOPY_PASSES; i++) {
        int r = flusher_write(&s->flusher);
        if (r < 0) {
            seterr(e, "writing back the page cache of %s: %s", s->fuse_path, strerror(-r));
            return r;
        }
    }
    return 0;
}

/* The final flush: every dirty page, then the image (FUSE_FSYNC). */
static int final_flush(struct srv *s, struct srv_err *e)
{
    int r = flusher_fsync(&s->flusher);
    if (r < 0)
        seterr(e, "flushing %s: %s", s->fuse_path, strerror(-r));
    return r;
}

/* The shutdown's final flush.  If writes are held (no space), they are not
 * dropped by the shutdown: the mount and the control socket stay up, the
 * flush is retried every SERVE_HELD_RETRY_MS, and the loop ends when it
 * succeeds, the file is unmounted, or a second signal in quitset or quit
 * request gives the held writes up.  op_lock held (released while
 * waiting, so `query-stats` and other commands are answered). */
static int final_flush_shutdown(struct srv *s, const sigset_t *quitset, struct srv_err *e)
{
    int r = final_flush(s, e);
    if (r == 0 || !held_any(&s->held))
        return r;
    fprintf(stderr, "pmemsnap: %llu bytes of writes are held (no space for them in %s's file "
            "system): still serving %s; free space to store them, or signal again (or quit) "
            "to stop and lose them\n", (unsigned long long)held_bytes(&s->held), s->image,
            s->fuse_path);
    char c;
    while (read(s->wake[0], &c, 1) == 1)
        ;                                    /* the quit that got us here */
    for (;;) {
        pthread_mutex_unlock(&s->op_lock);
        struct pollfd p = { .fd = s->wake[0], .events = POLLIN };
        bool woke = poll(&p, 1, SERVE_HELD_RETRY_MS) > 0;
        struct timespec zero = { 0, 0 };
        int sig = sigtimedwait(quitset, NULL, &zero);
        pthread_mutex_lock(&s->op_lock);
        if (atomic_load(&s->fuse_ended))
            return 0;                        /* unmounted: the page cache went back through
                                                us; the caller's last drain says what is lost */
        if (woke || sig > 0)
            return r;                        /* given up: the caller reports the loss */
        e->msg[0] = 0;
        r = final_flush(s, e);
        if (r == 0 || !held_any(&s->held)) {
            if (r == 0)
                fprintf(stderr, "pmemsnap: the held writes are stored, shutting down\n");
            return r;
        }
    }
}

/* ---- the VM (--qmp) ---------------------------------------------------------- */

static int vm_connect(struct srv *s, struct vmqmp **q, struct srv_err *e)
{
    char m[400];
    int r = vmqmp_connect(s->qmp_path, s->qmp_timeout_ms, q, m, sizeof m);
    if (r < 0)
        seterr(e, "VM QMP socket %s: %s", s->qmp_path, m);
    else
        vmqmp_set_cancel(*q, &s->quitting);
    return r;
}

/* Resume a guest we stopped (or may have: a `stop` that got no clear
 * answer).  A connection that timed out or broke is replaced first: its
 * state is unknown, and a guest left paused is the one outcome that must
 * not follow from a QMP hiccup. */
static int vm_cont(struct srv *s, struct vmqmp **q, struct srv_err *e)
{
    char m[400];
    int r = vmqmp_exec(*q, "cont", NULL, NULL, s->qmp_timeout_ms, m, sizeof m);
    if (r < 0 && r != -EIO) {            /* no answer (-EIO: QEMU refused) */
        vmqmp_close(*q);
        *q = NULL;
        struct srv_err e2 = { "", NULL };
        if (vm_connect(s, q, &e2) < 0) {
            seterr(e, "VM: cont: %s; reconnecting: %s", m, e2.msg);
            return r;
        }
        r = vmqmp_exec(*q, "cont", NULL, NULL, s->qmp_timeout_ms, m, sizeof m);
    }
    if (r < 0)
        seterr(e, "VM: cont: %s", m);
    return r;
}

/* After an operation that stopped the guest: resume it, and say in e what
 * state it is left in when that fails.  what: the operation, r its result. */
static int vm_resume(struct srv *s, struct vmqmp **q, int r, const char *what, struct srv_err *e)
{
    struct srv_err e2 = { "", NULL };
    int r2 = vm_cont(s, q, &e2);
    if (r2 == 0)
        return r;
    if (r == 0)
        seterr(e, "%s" DONE_BUT_PAUSED " (%s): resume it with 'cont' on its monitor", what,
               e2.msg);
    else {
        size_t n = strlen(e->msg);
        snprintf(e->msg + n, sizeof e->msg - n, "; the VM could not be resumed and is paused "
                 "(%s)", e2.msg);
    }
    return r < 0 ? r : r2;
}

/* `stop` failed: did QEMU refuse it (still running), or is the answer
 * unknown (timeout, broken connection, garbage: it may have stopped)? */
static bool stop_refused(int r)
{
    return r == -EIO;
}

static int vm_simple(struct srv *s, struct vmqmp *q, const char *cmd, json_object *args, struct srv_err *e)
{
    char m[400];
    int r = vmqmp_exec(q, cmd, args, NULL, s->qmp_timeout_ms, m, sizeof m);
    if (r < 0)
        seterr(e, "VM: %s: %s", cmd, m);
    return r;
}

/* Is the guest running?  1 yes, 0 no, <0 error. */
static int vm_running(struct srv *s, struct vmqmp *q, struct srv_err *e)
{
    json_object *ret = NULL;
    char m[400];
    int r = vmqmp_exec(q, "query-status", NULL, &ret, s->qmp_timeout_ms, m, sizeof m);
    if (r < 0) {
        seterr(e, "VM: query-status: %s", m);
        return r;
    }
    json_object *v;
    if (!json_object_is_type(ret, json_type_object) || !json_object_object_get_ex(ret, "running", &v) ||
        !json_object_is_type(v, json_type_boolean)) {
        json_object_put(ret);
        seterr(e, "VM: query-status returned no boolean 'running'");
        return -EPROTO;
    }
    r = json_object_get_boolean(v);
    json_object_put(ret);
    return r;
}

/* The VM's block nodes for its own state: --vmstate, or every writable qcow2
 * format node (the first one holds the vmstate).  Returns the devices array;
 * *vmstate points into it. */
static json_object *vm_nodes(struct srv *s, struct vmqmp *q, const char **vmstate,
                             struct srv_err *e)
{
    json_object *args = json_object_new_object(), *ret = NULL;
    json_object_object_add(args, "flat", json_object_new_boolean(1));
    char m[400];
    if (vmqmp_exec(q, "query-named-block-nodes", args, &ret, s->qmp_timeout_ms, m, sizeof m) < 0) {
        seterr(e, "VM: query-named-block-nodes: %s", m);
        return NULL;
    }
    if (!json_object_is_type(ret, json_type_array)) {
        json_object_put(ret);
        seterr(e, "VM: query-named-block-nodes returned something that is not a list");
        return NULL;
    }
    json_object *devs = json_object_new_array();
    if (s->vmstate_node)
        json_object_array_add(devs, json_object_new_string(s->vmstate_node));
    for (size_t i = 0; i < json_object_array_length(ret); i++) {
        json_object *n = json_object_array_get_idx(ret, i);
        const char *drv = json_member_str(n, "drv"), *name = json_member_str(n, "node-name");
        if (drv && strcmp(drv, "qcow2") == 0 && !json_member_bool(n, "ro", true) && name &&
            (!s->vmstate_node || strcmp(s->vmstate_node, name)))
            json_object_array_add(devs, json_object_new_string(name));
    }
    json_object_put(ret);
    if (json_object_array_length(devs) == 0) {
        json_object_put(devs);
        seterr(e, "VM has no writable qcow2 block node to hold its state "
                  "(add a -blockdev qcow2 node or name one with --vmstate)");
        return NULL;
    }
    *vmstate = json_object_get_string(json_object_array_get_idx(devs, 0));
    return devs;
}

static int vm_job(struct srv *s, struct vmqmp *q, const char *cmd, const char *tag, const char *vmstate,
                  json_object *devs, struct srv_err *e)
{
    json_object *a = json_object_new_object();
    json_object_object_add(a, "tag", json_object_new_string(tag));
    if (vmstate)
        json_object_object_add(a, "vmstate", json_object_new_string(vmstate));
    json_object_object_add(a, "devices", json_object_get(devs));
    char m[400];
    int r = vmqmp_job(q, cmd, a, s->qmp_timeout_ms, VMQMP_JOB_TIMEOUT_MS, m, sizeof m);
    if (r < 0)
        seterr(e, "VM: %s: %s", cmd, m);
    return r;
}

static int vm_ignore_shared(struct srv *s, struct vmqmp *q, struct srv_err *e)
{
    json_object *a = json_tokener_parse(
        "{\"capabilities\": [{\"capability\": \"x-ignore-shared\", \"state\": true}]}");
    return vm_simple(s, q, "migrate-set-capabilities", a, e);
}

/* ---- operations (control threads) ------------------------------------------- */

static bool snapshot_exists(struct srv *s, const char *name, uint64_t *disk_size)
{
    struct pms_snapshot_info *l = NULL;
    size_t n = 0;
    bool found = false;
    if (pms_snapshot_list(s->dev, &l, &n) == 0)
        for (size_t i = 0; i < n && !found; i++)
            if ((l[i].name && strcmp(l[i].name, name) == 0) || strcmp(l[i].id, name) == 0) {
                found = true;
                if (disk_size)
                    *disk_size = l[i].disk_size;
            }
    pms_snapshot_list_free(l, n);
    return found;
}

int srv_snapshot_create(struct srv *s, const char *name, bool external, bool vm,
                        struct srv_err *e)
{
    if (vm && !s->qmp_path) {
        seterr(e, "a whole-VM snapshot needs the VM's QMP socket (serve --qmp)");
        return -EINVAL;
    }
    pthread_mutex_lock(&s->op_lock);
    uint64_t t0 = now_us(), t1, t2, t3, tpause = 0, tstate = 0;
    struct vmqmp *q = NULL;
    json_object *devs = NULL;
    const char *vmstate = NULL;
    int was_running = 0, r;
    bool committed = false;
    if (snapshot_exists(s, name, NULL)) {
        seterr(e, "a snapshot named '%s' already exists", name);
        r = -EEXIST;
        goto out;
    }
    if (s->qmp_path) {
        if ((r = vm_connect(s, &q, e)) < 0 || (r = was_running = vm_running(s, q, e)) < 0)
            goto out;
        if (vm && ((r = vm_ignore_shared(s, q, e)) < 0 || !(devs = vm_nodes(s, q, &vmstate, e)))) {
            r = r < 0 ? r : -EINVAL;
            goto out;
        }
    }
    if ((r = precopy(s, e)) < 0)
        goto out;
    t1 = now_us();
    if (q && was_running && (r = vm_simple(s, q, "stop", NULL, e)) < 0) {
        if (stop_refused(r))
            goto out;
        goto resume;                     /* it may have stopped */
    }
    tpause = now_us();
    if ((r = final_flush(s, e)) < 0)
        goto resume;
    t2 = now_us();
    if (vm) {
        uint64_t ts = now_us();
        if ((r = vm_job(s, q, "snapshot-save", name, vmstate, devs, e)) < 0)
            goto resume;
        tstate = now_us() - ts;
    }
    pthread_rwlock_wrlock(&s->io_lock);
    r = pms_snapshot_create_ex(s->dev, name, external ? PMS_SNAP_EXTERNAL : 0);
    if (r == 0)
        r = pms_flush(s->dev);
    pthread_rwlock_unlock(&s->io_lock);
    t3 = now_us();
    if (r < 0) {
        seterr(e, "%s", pms_errmsg());
        if (vm) {                            /* take QEMU's half back */
            struct srv_err e2 = { "", NULL };
            vm_job(s, q, "snapshot-delete", name, NULL, devs, &e2);
        }
        goto resume;
    }
    s->st.snapshots++;
    s->st.last_precopy_us = t1 - t0;
    s->st.last_final_us = t2 - tpause;
    s->st.last_commit_us = t3 - t2 - tstate;
    s->st.last_vm_state_us = tstate;
    committed = true;
resume:
    if (q && was_running) {
        char what[320];
        snprintf(what, sizeof what, "snapshot '%s' was created", name);
        r = vm_resume(s, &q, r, what, e);
    }
    if (committed) {
        uint64_t t4 = now_us();
        s->st.last_vm_paused_us = q && was_running ? t4 - tpause : 0;
        s->st.last_snapshot_us = t4 - t0;
        json_object *d = json_object_new_object();
        json_object_object_add(d, "name", json_object_new_string(name));
        json_object_object_add(d, "kind", json_object_new_string(external ? "external" : "internal"));
        json_object_object_add(d, "vm", json_object_new_boolean(vm));
        json_object_object_add(d, "time-us", json_object_new_int64((int64_t)(t4 - t0)));
        qmp_event("SNAPSHOT_CREATED", d);
    }
out:
    json_object_put(devs);
    vmqmp_close(q);
    pthread_mutex_unlock(&s->op_lock);
    return r;
}

int srv_snapshot_revert(struct srv *s, const char *name, bool vm, struct srv_err *e)
{
    if (vm && !s->qmp_path) {
        seterr(e, "a whole-VM revert needs the VM's QMP socket (serve --qmp)");
        return -EINVAL;
    }
    pthread_mutex_lock(&s->op_lock);
    struct vmqmp *q = NULL;
    json_object *devs = NULL;
    const char *vmstate = NULL;
    int was_running = 0, r;
    uint64_t dsize = 0;
    if (!snapshot_exists(s, name, &dsize)) {
        seterr(e, "no snapshot named '%s'", name);
        r = -ENOENT;
        goto out;
    }
    if (dsize != s->size) {
        seterr(e, "snapshot '%s' has size %" PRIu64 ", the exported file %" PRIu64
                  "; revert it with the daemon stopped", name, dsize, s->size);
        r = -EBUSY;
        goto out;
    }
    if (s->qmp_path) {
        if ((r = vm_connect(s, &q, e)) < 0 || (r = was_running = vm_running(s, q, e)) < 0)
            goto out;
        if (vm && ((r = vm_ignore_shared(s, q, e)) < 0 || !(devs = vm_nodes(s, q, &vmstate, e)))) {
            r = r < 0 ? r : -EINVAL;
            goto out;
        }
        if (was_running && (r = vm_simple(s, q, "stop", NULL, e)) < 0) {
            if (stop_refused(r))
                goto out;
            goto resume;                 /* it may have stopped */
        }
    }
    if ((r = final_flush(s, e)) < 0)
        goto resume;
    if (vm && (r = vm_job(s, q, "snapshot-load", name, vmstate, devs, e)) < 0)
        goto resume;
    /* From here until the cached pages are dropped, FUSE writes are
     * discarded: a page the kernel still writes back predates the revert.
     * Set under the exclusive lock, so no write is in flight. */
    pthread_rwlock_wrlock(&s->io_lock);
    s->discard_writes = true;
    r = pms_snapshot_revert(s->dev, name);
    bool reverted = r == 0;
    if (!reverted)
        s->discard_writes = false;       /* nothing changed: keep every write */
    else {
        held_clear(&s->held);            /* any held since the final flush predate the revert */
        r = pms_flush(s->dev);
    }
    pthread_rwlock_unlock(&s->io_lock);
    if (r < 0)
        seterr(e, "%s", pms_errmsg());
    if (!reverted && vm) {
        /* QEMU already loaded its state: running the guest now would pair
         * the snapshot's RAM with the current NVDIMM.  Leave it paused. */
        size_t n = strlen(e->msg);
        snprintf(e->msg + n, sizeof e->msg - n, "; the VM is left paused: its RAM and devices "
                 "are at the snapshot but its NVDIMM is not (revert again, or load another state)");
        was_running = 0;
        goto out;
    }
    int ri = 0;
    if (reverted) {
        /* Drop every cached page: dirty ones the kernel writes back first
         * are discarded, mapped ones are unmapped and refault. */
        ri = fuse_lowlevel_notify_inval_inode(s->se, FUSE_ROOT_ID, 0, 0);
        s->discard_writes = false;
    }
    if (ri < 0 && ri != -ENOENT && r == 0) {
        seterr(e, "invalidating the kernel's cached pages: %s", strerror(-ri));
        r = ri;
    }
    if (r == 0) {
        s->st.reverts++;
        json_object *d = json_object_new_object();
        json_object_object_add(d, "name", json_object_new_string(name));
        json_object_object_add(d, "vm", json_object_new_boolean(vm));
        qmp_event("SNAPSHOT_REVERTED", d);
    }
resume:
    if (q && was_running) {
        char what[320];
        snprintf(what, sizeof what, "reverted to snapshot '%s'", name);
        r = vm_resume(s, &q, r, what, e);
    }
out:
    json_object_put(devs);
    vmqmp_close(q);
    pthread_mutex_unlock(&s->op_lock);
    return r;
}

int srv_snapshot_delete(struct srv *s, const char *name, bool vm, struct srv_err *e)
{
    if (vm && !s->qmp_path) {
        seterr(e, "deleting a whole-VM snapshot needs the VM's QMP socket (serve --qmp)");
        return -EINVAL;
    }
    pthread_mutex_lock(&s->op_lock);
    struct vmqmp *q = NULL;
    json_object *devs = NULL;
    const char *vmstate = NULL;
    int r;
    if (!snapshot_exists(s, name, NULL)) {
        seterr(e, "no snapshot named '%s'", name);
        r = -ENOENT;
        goto out;
    }
    if (vm && ((r = vm_connect(s, &q, e)) < 0 || !(devs = vm_nodes(s, q, &vmstate, e)) ||
               (r = vm_job(s, q, "snapshot-delete", name, NULL, devs, e)) < 0)) {
        r = r < 0 ? r : -EINVAL;
        goto out;
    }
    pthread_rwlock_wrlock(&s->io_lock);
    r = pms_snapshot_delete(s->dev, name);
    if (r == 0)
        r = pms_flush(s->dev);
    pthread_rwlock_unlock(&s->io_lock);
    if (r < 0)
        seterr(e, "%s", pms_errmsg());
out:
    json_object_put(devs);
    vmqmp_close(q);
    pthread_mutex_unlock(&s->op_lock);
    return r;
}

int srv_snapshot_list(struct srv *s, json_object **out, struct srv_err *e)
{
    struct pms_snapshot_info *l = NULL;
    size_t n = 0;
    pthread_rwlock_rdlock(&s->io_lock);
    int r = pms_snapshot_list(s->dev, &l, &n);
    pthread_rwlock_unlock(&s->io_lock);
    if (r < 0) {
        seterr(e, "%s", pms_errmsg());
        return r;
    }
    json_object *a = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(l[i].id));
        json_object_object_add(o, "name", json_object_new_string(l[i].name ? l[i].name : ""));
        json_object_object_add(o, "vm-state-size", json_object_new_int64((int64_t)l[i].vm_state_size));
        json_object_object_add(o, "date-sec", json_object_new_int64(l[i].date_sec));
        json_object_object_add(o, "date-nsec", json_object_new_int64(l[i].date_nsec));
        json_object_object_add(o, "vm-clock-sec",
                               json_object_new_int64((int64_t)(l[i].vm_clock_nsec / 1000000000)));
        json_object_object_add(o, "vm-clock-nsec",
                               json_object_new_int64((int64_t)(l[i].vm_clock_nsec % 1000000000)));
        json_object_object_add(o, "disk-size", json_object_new_int64((int64_t)l[i].disk_size));
        json_object_object_add(o, "kind", json_object_new_string(
                                   l[i].kind == PMS_SNAP_KIND_EXTERNAL ? "external" : "internal"));
        if (l[i].file)
            json_object_object_add(o, "file", json_object_new_string(l[i].file));
        json_object_array_add(a, o);
    }
    pms_snapshot_list_free(l, n);
    *out = a;
    return 0;
}

int srv_flush(struct srv *s, struct srv_err *e)
{
    pthread_mutex_lock(&s->op_lock);
    int r = final_flush(s, e);
    pthread_mutex_unlock(&s->op_lock);
    return r;
}

json_object *srv_query_stats(struct srv *s)
{
    json_object *o = json_object_new_object();
#define ADD(k, v) json_object_object_add(o, k, json_object_new_int64((int64_t)(v)))
    json_object_object_add(o, "image", json_object_new_string(s->image));
    json_object_object_add(o, "fuse", json_object_new_string(s->fuse_path));
    ADD("size", s->size);
    ADD("reads", s->st.reads);
    ADD("writes", s->st.writes);
    ADD("bytes-read", s->st.bytes_read);
    ADD("bytes-written", s->st.bytes_written);
    ADD("flushes", s->st.flushes);
    ADD("read-us", s->st.read_us);
    ADD("write-us", s->st.write_us);
    ADD("flush-us", s->st.flush_us);
    ADD("zero-ranges", s->st.zeroes);
    ADD("snapshots", s->st.snapshots);
    ADD("reverts", s->st.reverts);
    ADD("last-snapshot-us", s->st.last_snapshot_us);
    ADD("last-precopy-us", s->st.last_precopy_us);
    ADD("last-final-flush-us", s->st.last_final_us);
    ADD("last-commit-us", s->st.last_commit_us);
    ADD("last-vm-state-us", s->st.last_vm_state_us);
    ADD("last-vm-paused-us", s->st.last_vm_paused_us);
#undef ADD
    json_object_object_add(o, "held-write-bytes", json_object_new_int64((int64_t)held_bytes(&s->held)));
    json_object_object_add(o, "writeback-cache", json_object_new_boolean(s->wb_on));
    json_object_object_add(o, "bdi", json_object_new_string(s->bdi_note));
    return o;
}

void srv_request_quit(struct srv *s)
{
    char c = 'q';
    if (write(s->wake[1], &c, 1) < 0) { /* pipe full: a quit is already pending */ }
}

/* ---- setup -------------------------------------------------------------------- */

/* Is path (resolved) inside directory dir (resolved)? */
static bool under(const char *path, const char *dir)
{
    size_t n = strlen(dir);
    if (n == 0)
        return false;
    if (n == 1 && dir[0] == '/')
        return true;
    return strncmp(path, dir, n) == 0 && path[n] == '/';
}

/* The path pms_open opens for the backing file `name` of the layer opened
 * at path `layer` (lib/block/drivers/qcow2.c, open_backing): an absolute
 * name as it is, a relative one joined to the directory part of `layer` as
 * written (not resolved: the kernel resolves the joined path). */
static int backing_open_path(const char *layer, const char *name, char *buf, size_t cap)
{
    const char *sl = strrchr(layer, '/');
    int n = name[0] == '/' || !sl ? snprintf(buf, cap, "%s", name)
                                  : snprintf(buf, cap, "%.*s/%s", (int)(sl - layer), layer, name);
    return n >= 0 && (size_t)n < cap ? 0 : -1;
}

/* Would the file at dir/name (the --fuse file, resolved directory) be one
 * of the names the image's external snapshots use beside it: the image
 * itself, IMG@NAME, .IMG.extsnap-tmp, .IMG@NAME.deleting?  img: a path of
 * the image. */
static bool snapshot_name(const char *fdir, const char *fname, const char *img)
{
    char t1[PATH_MAX], t2[PATH_MAX], idir[PATH_MAX];
    snprintf(t1, sizeof t1, "%s", img);
    snprintf(t2, sizeof t2, "%s", img);
    if (!realpath(dirname(t1), idir) || strcmp(idir, fdir))
        return false;
    const char *base = basename(t2);
    size_t bl = strlen(base);
    return !strcmp(fname, base) || (!strncmp(fname, base, bl) && fname[bl] == '@') ||
           (fname[0] == '.' && !strncmp(fname + 1, base, bl) &&
            (fname[bl + 1] == '@' || fname[bl + 1] == '.'));
}

/* The files of the served chain (the image first), as check_chain found
 * them: what no file the daemon creates may be. */
struct chain_files {
    struct stat st[PMS_MAX_BACKING_DEPTH + 1];
    int n;
};

/* Resolved form of path for comparisons: realpath of its directory, then
 * its last component ("" if the directory does not resolve). */
static void resolved_name(const char *path, char *buf, size_t cap)
{
    char t1[PATH_MAX], t2[PATH_MAX], dir[PATH_MAX];
    snprintf(t1, sizeof t1, "%s", path);
    snprintf(t2, sizeof t2, "%s", path);
    if (!realpath(dirname(t1), dir)) {
        buf[0] = '\0';
        return;
    }
    int n = snprintf(buf, cap, "%s/%s", strcmp(dir, "/") ? dir : "", basename(t2));
    if (n < 0 || (size_t)n >= cap)
        buf[0] = '\0';
}

/* No file the daemon creates or mounts on (--fuse, --socket, --pidfile,
 * --log) may be the image or one of its backing files, a name the image's
 * external snapshots use, or another of these files: the mount would hide
 * the file served from, a pid file or log written over the image would
 * wreck it (and be unlinked at exit), two of them over each other lose one. */
static int check_outputs(struct srv *s, const struct chain_files *cf, char *err, size_t errlen)
{
    char imgreal[PATH_MAX];
    if (!realpath(s->image, imgreal))
        imgreal[0] = '\0';
    const char *opt[] = { "--fuse", "--socket", "--pidfile", "--log" };
    const char *path[] = { s->fuse_path, s->sock_path, s->pidfile, s->log };
    char res[4][PATH_MAX];
    struct stat st[4];
    bool exists[4] = { false };
    for (int i = 0; i < 4; i++) {
        if (!path[i])
            continue;
        resolved_name(path[i], res[i], sizeof res[i]);
        exists[i] = stat(path[i], &st[i]) == 0;
        char fdir[PATH_MAX];
        strcpy(fdir, res[i]);
        char *sl = strrchr(fdir, '/');
        const char *fname = sl ? sl + 1 : fdir;
        if (sl)
            *sl = '\0';
        if (res[i][0] && (snapshot_name(fdir[0] ? fdir : "/", fname, s->image) ||
                          (imgreal[0] && snapshot_name(fdir[0] ? fdir : "/", fname, imgreal)))) {
            snprintf(err, errlen, "%s %.300s: that is the image's own name or one its "
                     "snapshots use; pick another file", opt[i], path[i]);
            return -1;
        }
        if (exists[i])
            for (int k = 0; k < cf->n; k++)
                if (st[i].st_dev == cf->st[k].st_dev && st[i].st_ino == cf->st[k].st_ino) {
                    snprintf(err, errlen, "%s %.300s is %s; pick another file", opt[i], path[i],
                             k ? "a backing file of the image" : "the image itself");
                    return -1;
                }
        for (int j = 0; j < i; j++) {
            if (path[j] && ((res[i][0] && !strcmp(res[i], res[j])) ||
                            (exists[i] && exists[j] && st[i].st_dev == st[j].st_dev &&
                             st[i].st_ino == st[j].st_ino))) {
                snprintf(err, errlen, "%s and %s name the same file (%.300s)", opt[j], opt[i],
                         path[i]);
                return -1;
            }
        }
    }
    return 0;
}

/* Refuse chains whose backing files leave the image's directory (that of
 * the file, and that of the path given, if it is a symbolic link) or
 * --backing-dir; cf gets the chain's files.  What is judged is the
 * resolved form of exactly the path the library will open at each level.
 * Each layer is opened without its backing file, only to read the name of
 * the next. */
static int check_chain(struct srv *s, struct chain_files *cf, char *err, size_t errlen)
{
    char imgreal[PATH_MAX], dir[PATH_MAX], gdir[PATH_MAX] = "", bdir[PATH_MAX] = "";
    if (!realpath(s->image, imgreal)) {
        snprintf(err, errlen, "%.300s: %s", s->image, strerror(errno));
        return -1;
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", imgreal);
    snprintf(dir, sizeof dir, "%s", dirname(tmp));
    snprintf(tmp, sizeof tmp, "%s", s->image);
    if (!realpath(dirname(tmp), gdir))
        gdir[0] = '\0';
    if (s->backing_dir && !realpath(s->backing_dir, bdir)) {
        snprintf(err, errlen, "--backing-dir %.300s: %s", s->backing_dir, strerror(errno));
        return -1;
    }
    cf->n = 0;
    char cur[PATH_MAX];
    snprintf(cur, sizeof cur, "%s", s->image);
    const char *fmt = s->format;
    char fmtbuf[sizeof ((struct pms_info *)0)->backing_format];
    for (int depth = 0;; depth++) {
        if (stat(cur, &cf->st[cf->n]) == 0)
            cf->n++;
        struct pms_open_opts o;
        pms_open_opts_init(&o);
        o.readonly = 1;
        o.no_backing = 1;
        o.force_share = 1;
        o.format = fmt;
        pms_dev *d;
        if (pms_open(cur, &o, &d) < 0) {
            snprintf(err, errlen, "%.300s: %s", cur, libmsg());
            return -1;
        }
        struct pms_info info = { .size = sizeof info };
        int r = pms_info(d, &info);
        pms_close(d);
        if (r < 0) {
            snprintf(err, errlen, "%.300s: %s", cur, libmsg());
            return -1;
        }
        if (!info.backing_file[0])
            return 0;
        if (depth == PMS_MAX_BACKING_DEPTH) {
            snprintf(err, errlen, "%.300s: backing chain deeper than %d images", s->image,
                     PMS_MAX_BACKING_DEPTH);
            return -1;
        }
        if (strncmp(info.backing_file, "json:", 5) == 0 || strstr(info.backing_file, "://")) {
            snprintf(err, errlen, "refusing %.300s: backing file '%.300s' is not a local file",
                     cur, info.backing_file);
            return -1;
        }
        char next[PATH_MAX], real[PATH_MAX];
        if (backing_open_path(cur, info.backing_file, next, sizeof next) < 0) {
            snprintf(err, errlen, "backing file %.300s of %.300s: %s", info.backing_file, cur,
                     strerror(ENAMETOOLONG));
            return -1;
        }
        if (!realpath(next, real)) {
            snprintf(err, errlen, "backing file %.300s of %.300s: %s", info.backing_file, cur,
                     strerror(errno));
            return -1;
        }
        if (!under(real, dir) && !(gdir[0] && under(real, gdir)) &&
            !(bdir[0] && under(real, bdir))) {
            bool two = gdir[0] && strcmp(gdir, dir);
            snprintf(err, errlen,
                     "refusing %.200s: its backing chain names %.200s, outside %.200s%s%.200s"
                     "%s%.200s (name the directory with --backing-dir DIR to allow it)",
                     s->image, real, dir, two ? " and " : "", two ? gdir : "",
                     bdir[0] ? " and " : "", bdir);
            return -1;
        }
        snprintf(cur, sizeof cur, "%s", next);
        snprintf(fmtbuf, sizeof fmtbuf, "%s", info.backing_format);
        fmt = fmtbuf[0] ? fmtbuf : NULL;
    }
}

/* The kernel gives a FUSE mount a strict 1% share of the dirty-page budget
 * (bdi strict_limit + max_ratio), which throttles mapped writers; lift it
 * when we may. */
static void tune_bdi(struct srv *s)
{
    struct stat st;
    if (stat(s->fuse_path, &st) < 0) {
        snprintf(s->bdi_note, sizeof s->bdi_note, "stat: %s", strerror(errno));
        return;
    }
    char p[128];
    /* read_ahead_kb: the kernel caps a FUSE mount's readahead (and a mapping's
     * fault read-around) at its 128 KiB default whatever max_readahead says */
    char ra[32];
    snprintf(ra, sizeof ra, "%u", SERVE_MAX_IO / 1024);
    const char *knobs[][2] = { { "strict_limit", "0" }, { "max_ratio", "100" },
                               { "read_ahead_kb", ra } };
    int ok = 0;
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "/sys/class/bdi/%u:%u/%s", major(st.st_dev), minor(st.st_dev),
                 knobs[i][0]);
        int fd = open(p, O_WRONLY | O_CLOEXEC);
        if (fd >= 0 && write(fd, knobs[i][1], strlen(knobs[i][1])) > 0)
            ok++;
        if (fd >= 0)
            close(fd);
    }
    snprintf(s->bdi_note, sizeof s->bdi_note, ok == 3
             ? "bdi %u:%u: strict_limit=0 max_ratio=100 read_ahead_kb=1024 (lifted)"
             : "bdi %u:%u: could not lift strict_limit/max_ratio/read_ahead_kb (needs root): "
               "mapped writers are throttled to 1%% of the dirty budget",
             major(st.st_dev), minor(st.st_dev));
}

static int listen_socket(const char *path, char *err, size_t errlen)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path) {
        snprintf(err, errlen, "socket path too long: %s", path);
        return -1;
    }
    strcpy(a.sun_path, path);
    /* A socket file nobody listens on is a leftover: replace it. */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof a) == 0) {
        close(probe);
        snprintf(err, errlen, "%s: a daemon is already listening there", path);
        return -1;
    }
    if (probe >= 0)
        close(probe);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(err, errlen, "%s exists and is not a socket", path);
            return -1;
        }
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    mode_t old = umask(0177);                /* the socket is born 0600 */
    int r = fd < 0 ? -1 : bind(fd, (struct sockaddr *)&a, sizeof a);
    umask(old);
    if (r < 0 || listen(fd, 16) < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    chmod(path, 0600);
    return fd;
}

/* Is path (stat st) mounted over: on another device than its directory
 * (the directory of where it resolves to: a symlink to a file elsewhere is
 * not a mount point)? */
static bool is_mount_point(const char *path, const struct stat *st)
{
    char dir[PATH_MAX];
    if (!realpath(path, dir))
        return false;
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    struct stat ds;
    return stat(dir, &ds) == 0 && ds.st_dev != st->st_dev;
}

static int mount_fuse(struct srv *s, char *err, size_t errlen)
{
    struct stat st;
    /* (forced to ask the file system: a dead FUSE mount answers a plain
     * stat from its attribute cache for a while) */
    struct statx stx;
    if (statx(AT_FDCWD, s->fuse_path, AT_STATX_FORCE_SYNC, STATX_TYPE, &stx) < 0 &&
        errno == ENOTCONN) {
        snprintf(err, errlen, "%.300s: a dead FUSE mount is still there (a killed daemon's?); "
                 "unmount it first: umount -l %.300s", s->fuse_path, s->fuse_path);
        return -1;
    }
    if (stat(s->fuse_path, &st) < 0) {
        int fd = open(s->fuse_path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
        if (fd < 0) {
            snprintf(err, errlen, "%s: %s", s->fuse_path, strerror(errno));
            return -1;
        }
        close(fd);
        s->created_mountpoint = true;
    } else if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: the mount point must be a regular file", s->fuse_path);
        return -1;
    } else if (is_mount_point(s->fuse_path, &st)) {
        /* another daemon's live export: mounting over it would hide it, and
         * the first daemon's unmount would then take ours away */
        snprintf(err, errlen, "%.300s is already a mount point (another pmemsnap serve?); "
                 "pick another file or unmount it first", s->fuse_path);
        return -1;
    }
    char opts[256];
    snprintf(opts, sizeof opts, "fsname=pmemsnap,subtype=pmemsnap,default_permissions%s",
             s->allow_other ? ",allow_other" : "");
    char *argv[] = { "pmemsnap", "-o", opts, NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    s->se = fuse_session_new(&args, &fuse_ops, sizeof fuse_ops, s);
    fuse_opt_free_args(&args);               /* libfuse may have copied them */
    if (!s->se) {
        snprintf(err, errlen, "cannot create the FUSE session");
        return -1;
    }
    if (fuse_session_mount(s->se, s->fuse_path) != 0) {
        snprintf(err, errlen, "cannot mount FUSE on %s (is /dev/fuse there, fusermount3 installed?)",
                 s->fuse_path);
        fuse_session_destroy(s->se);
        s->se = NULL;
        return -1;
    }
    s->mounted = true;
    if (pthread_create(&s->fuse_thr, NULL, fuse_main_thr, s) != 0) {
        snprintf(err, errlen, "cannot start the FUSE threads");
        return -1;
    }
    s->fuse_running = true;
    return 0;
}

static void teardown(struct srv *s)
{
    atomic_store(&s->flusher_up, false);
    pthread_mutex_lock(&s->seek_mu);         /* no lseek in the helper any more */
    pthread_mutex_unlock(&s->seek_mu);
    flusher_stop(&s->flusher);               /* its close is answered by the loop */
    if (s->fuse_running) {
        fuse_session_exit(s->se);
        pthread_kill(s->fuse_thr, SIGUSR1);
        pthread_join(s->fuse_thr, NULL);
        s->fuse_running = false;
    }
    if (s->mounted)
        fuse_session_unmount(s->se);
    if (s->se)
        fuse_session_destroy(s->se);
    s->se = NULL;
    if (s->created_mountpoint)
        unlink(s->fuse_path);
}

static void usage(void)
{
    printf("Usage: pmemsnap serve IMAGE --fuse FILE --socket SOCK [--qmp VM_QMP_SOCK]\n"
           "         [--vmstate NODE] [--qmp-timeout MS] [--threads N] [-f FMT] [--cache-size SIZE] [--backing-dir DIR]\n"
           "         [--allow-other] [--writeback-cache] [--foreground] [--pidfile F] [--log F]\n"
           "Exports IMAGE as the regular file FILE (FUSE) and answers QMP commands on SOCK.\n"
           "See pmemsnap(1) and docs/serve.md.\n");
}

/* The child tells the parent "ok" or the error through this pipe. */
static int ready_fd = -1;

/* Write our pid to path (0 or -1 with a message). */
static int write_pidfile(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "we");
    if (!f) {
        snprintf(err, errlen, "--pidfile %s: %s", path, strerror(errno));
        return -1;
    }
    bool ok = fprintf(f, "%d\n", (int)getpid()) >= 0;
    int e = errno;
    if (fclose(f) != 0 && ok) {
        ok = false;
        e = errno;
    }
    if (ok)
        return 0;
    unlink(path);
    snprintf(err, errlen, "--pidfile %s: %s", path, strerror(e ? e : EIO));
    return -1;
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    char m[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof m, fmt, ap);
    va_end(ap);
    if (ready_fd >= 0) {
        if (write(ready_fd, m, strlen(m)) < 0) { /* parent gone */ }
        close(ready_fd);
        ready_fd = -1;
    } else
        errorf("%s", m);
    return 1;
}

int cmd_serve(int argc, char **argv)
{
    static const struct option lo[] = {
        { "fuse", required_argument, NULL, 'F' },
        { "socket", required_argument, NULL, 's' },
        { "qmp", required_argument, NULL, 'Q' },
        { "vmstate", required_argument, NULL, 'V' },
        { "cache-size", required_argument, NULL, 'C' },
        { "backing-dir", required_argument, NULL, 'B' },
        { "allow-other", no_argument, NULL, 'A' },
        { "writeback-cache", no_argument, NULL, 'W' },
        { "foreground", no_argument, NULL, 'g' },
        { "pidfile", required_argument, NULL, 'P' },
        { "log", required_argument, NULL, 'L' },
        { "format", required_argument, NULL, 'f' },
        { "qmp-timeout", required_argument, NULL, 'T' },
        { "threads", required_argument, NULL, 'N' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    static struct srv srv;
    struct srv *s = &srv;
    s->qmp_timeout_ms = VMQMP_TIMEOUT_MS;
    s->threads = SERVE_FUSE_THREADS;
    int ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":f:h", lo, NULL)) != -1) {
        switch (ch) {
        case 'F': s->fuse_path = optarg; break;
        case 's': s->sock_path = optarg; break;
        case 'Q': s->qmp_path = optarg; break;
        case 'V': s->vmstate_node = optarg; break;
        case 'C':
            if (parse_size(optarg, &s->cache_size) < 0)
                return usage_error("invalid --cache-size '%s'", optarg);
            break;
        case 'B': s->backing_dir = optarg; break;
        case 'A': s->allow_other = true; break;
        case 'W': s->wbcache = true; break;
        case 'g': s->foreground = true; break;
        case 'P': s->pidfile = optarg; break;
        case 'L': s->log = optarg; break;
        case 'f': s->format = optarg; break;
        case 'T': {
            uint64_t v;
            if (parse_uint(optarg, &v) < 0 || v == 0 || v > 3600000)
                return usage_error("invalid --qmp-timeout '%s' (milliseconds, 1..3600000)", optarg);
            s->qmp_timeout_ms = (int)v;
            break;
        }
        case 'N': {
            uint64_t v;
            if (parse_uint(optarg, &v) < 0 || v == 0 || v > 256)
                return usage_error("invalid --threads '%s' (1..256)", optarg);
            s->threads = (unsigned)v;
            break;
        }
        case 'h': usage(); return 0;
        default: return getopt_error("serve", ch, argv, lo);
        }
    }
    if (optind != argc - 1)
        return usage_error(optind >= argc ? "serve: expecting an image file name"
                                          : "serve: unexpected argument '%s'", argv[optind + 1]);
    s->image = argv[optind];
    if (!s->fuse_path)
        return usage_error("serve: --fuse FILE is required");
    if (!s->sock_path)
        return usage_error("serve: --socket SOCK is required");
    /* daemonizing chdir()s to /: keep every path we use later absolute */
    static char abs_paths[6][PATH_MAX];
    const char **rel[6] = { &s->fuse_path, &s->sock_path, &s->pidfile, &s->image,
                            &s->qmp_path, &s->log };
    for (int i = 0; i < 6; i++) {
        const char *p = *rel[i];
        if (!p || p[0] == '/')
            continue;
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd) ||
            snprintf(abs_paths[i], PATH_MAX, "%s/%s", cwd, p) >= PATH_MAX)
            return fail("%s: path too long", p);
        *rel[i] = abs_paths[i];
    }
    if (access("/dev/fuse", R_OK | W_OK) < 0)
        return fail("/dev/fuse: %s (FUSE is not available here)", strerror(errno));
    char err[1024];
    static struct chain_files cf;
    if (check_chain(s, &cf, err, sizeof err) < 0 || check_outputs(s, &cf, err, sizeof err) < 0)
        return fail("%s", err);
    /* the log is opened now, so that a log we cannot write is an error
     * here and not silence later */
    int log_fd = -1;
    if (s->log && (log_fd = open(s->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600)) < 0)
        return fail("--log %s: %s", s->log, strerror(errno));
    if (s->foreground && log_fd >= 0) {     /* messages go to stderr */
        close(log_fd);
        log_fd = -1;
    }

    if (!s->foreground) {
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0)
            return fail("pipe: %s", strerror(errno));
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0)
            return fail("fork: %s", strerror(errno));
        if (pid > 0) {                       /* parent: wait for "serving" */
            close(p[1]);
            char m[1024];
            ssize_t n = read(p[0], m, sizeof m - 1);
            if (n < 0)
                n = 0;
            m[n] = '\0';
            if (n == 2 && strcmp(m, "ok") == 0)
                return 0;
            errorf("%s", n ? m : "the daemon died while starting");
            return 1;
        }
        close(p[0]);
        ready_fd = p[1];
        setsid();
    }

    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.format = s->format;
    o.l2_cache_size = s->cache_size;
    /* FUSE write-back comes in large writes, and an fsync follows soon:
     * the image's write-out starts with each (msync of 512 MiB after a warm
     * rewrite: 0.43-0.47 -> 0.16-0.26 s here) */
    o.eager_writeout = 1;
    if (pms_open(s->image, &o, &s->dev) < 0)
        return fail("%s: %s", s->image, libmsg());
    int64_t sz = pms_size(s->dev);
    if (sz <= 0) {
        pms_close(s->dev);
        return fail("%s: the image is empty", s->image);
    }
    s->size = (uint64_t)sz;
    s->mtime = time(NULL);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->io_lock, &ra);
    held_init(&s->held);
    pthread_mutex_init(&s->op_lock, NULL);
    pthread_mutex_init(&s->seek_mu, NULL);
    pthread_key_create(&buf_key, free);
    if (pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        pms_close(s->dev);
        return fail("pipe: %s", strerror(errno));
    }

    /* Signals: SIGTERM/SIGINT/SIGHUP arrive through signalfd-like sigwait in
     * the main thread only; SIGUSR1 only interrupts the FUSE loop's wait. */
    struct sigaction sa = { .sa_handler = on_usr1 };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t quitset;
    sigemptyset(&quitset);
    sigaddset(&quitset, SIGTERM);
    sigaddset(&quitset, SIGINT);
    sigaddset(&quitset, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &quitset, NULL);

    int lfd = listen_socket(s->sock_path, err, sizeof err);
    if (lfd < 0) {
        pms_close(s->dev);
        return fail("%s", err);
    }
    if (mount_fuse(s, err, sizeof err) < 0) {
        teardown(s);
        close(lfd);
        unlink(s->sock_path);
        pms_close(s->dev);
        return fail("%s", err);
    }
    /* With writeback caching the kernel keeps its own i_size of a regular
     * file and ignores ours (the root inode starts at 0): set it once.  The
     * stat waits for the kernel's INIT, which decides wb_on. */
    struct stat wst;
    stat(s->fuse_path, &wst);
    if (s->wb_on && truncate(s->fuse_path, (off_t)s->size) < 0) {
        int e = errno;
        teardown(s);
        close(lfd);
        unlink(s->sock_path);
        pms_close(s->dev);
        return fail("setting the size of %s: %s", s->fuse_path, strerror(e));
    }
    tune_bdi(s);
    int fr = flusher_start(&s->flusher, s->fuse_path);
    atomic_store(&s->flusher_up, fr == 0);
    if (fr < 0) {
        teardown(s);
        close(lfd);
        unlink(s->sock_path);
        pms_close(s->dev);
        return fail("starting the write-back helper on %s: %s", s->fuse_path, strerror(-fr));
    }
    if (s->pidfile && write_pidfile(s->pidfile, err, sizeof err) < 0) {
        teardown(s);
        close(lfd);
        unlink(s->sock_path);
        pms_close(s->dev);
        return fail("%s", err);
    }
    if (qmp_server_start(s, lfd) < 0) {
        teardown(s);
        close(lfd);
        unlink(s->sock_path);
        if (s->pidfile)
            unlink(s->pidfile);
        pms_close(s->dev);
        return fail("cannot start the control socket thread");
    }
    if (s->foreground)
        fprintf(stderr, "pmemsnap: serving %s as %s, control socket %s; %s\n", s->image,
                s->fuse_path, s->sock_path, s->bdi_note);
    if (ready_fd >= 0) {
        int nfd = open("/dev/null", O_RDWR | O_CLOEXEC);
        int lg = log_fd;
        log_fd = -1;
        if (nfd >= 0) {
            dup2(nfd, 0);
            dup2(nfd, 1);
            dup2(lg >= 0 ? lg : nfd, 2);
            close(nfd);
        }
        if (lg >= 0)
            close(lg);
        if (chdir("/") < 0) { /* nothing relies on the cwd from here */ }
        if (write(ready_fd, "ok", 2) < 0) { /* parent gone */ }
        close(ready_fd);
        ready_fd = -1;
    }

    /* Wait for a signal or a quit request. */
    int sig = 0;
    for (;;) {
        struct pollfd p = { .fd = s->wake[0], .events = POLLIN };
        if (poll(&p, 1, 100) > 0)
            break;
        struct timespec zero = { 0, 0 };
        sig = sigtimedwait(&quitset, NULL, &zero);
        if (sig > 0)
            break;
    }
    bool unmounted = atomic_load(&s->fuse_ended);
    if (sig > 0)
        fprintf(stderr, "pmemsnap: %s received, shutting down\n", strsignal(sig));
    else if (unmounted)
        fprintf(stderr, "pmemsnap: %s was unmounted, shutting down\n", s->fuse_path);
    json_object *d = json_object_new_object();
    json_object_object_add(d, "guest", json_object_new_boolean(0));
    json_object_object_add(d, "reason", json_object_new_string(sig ? "host-signal" : "host-qmp-quit"));
    qmp_event("SHUTDOWN", d);

    s->quitting = true;                      /* a VM job in progress stops waiting */
    pthread_mutex_lock(&s->op_lock);         /* no operation after this one */
    int rc = 0;
    struct srv_err e = { "", NULL };
    /* (unmounted: the kernel's page cache of the file went with the mount,
     * after writing back through FUSE what it held) */
    if (s->fuse_running && !unmounted && final_flush_shutdown(s, &quitset, &e) < 0) {
        fprintf(stderr, "pmemsnap: %s\n", e.msg);
        rc = 1;
    }
    teardown(s);
    qmp_server_stop();
    close(lfd);
    unlink(s->sock_path);
    if (held_drain(&s->held, s->dev) < 0) {   /* (unmounted: nothing adds to them now) */
        fprintf(stderr, "pmemsnap: %llu bytes of writes could not be stored in %s (%s) and are "
                "lost\n", (unsigned long long)held_bytes(&s->held), s->image, libmsg());
        rc = 1;
    }
    held_destroy(&s->held);
    if (pms_close(s->dev) < 0) {
        fprintf(stderr, "pmemsnap: closing %s: %s\n", s->image, libmsg());
        rc = 1;
    }
    if (s->pidfile)
        unlink(s->pidfile);
    return rc;
}
