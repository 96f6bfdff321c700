/* pmemsnap serve: declarations shared by the daemon's files.
 *
 *   serve.c   options, daemonizing, the FUSE export, snapshot/revert/flush
 *             operations and shutdown (struct srv, one per process)
 *   qmp.c     the QMP control socket (server side)
 *   vmqmp.c   a small QMP client for the VM's own QMP socket (--qmp) and
 *             for `pmemsnap snapshot --socket` / `pmemsnap stats`
 *   flusher.c the helper process that writes the FUSE file's page cache
 *             back (a daemon thread must never wait on that itself)
 *   held.c    writes the image could not take for want of space, kept
 *             until it can (fsync fails meanwhile)
 *
 * Threads: the main thread accepts control connections and waits for a
 * shutdown request; libfuse's worker threads serve the FUSE file; one thread
 * per control connection parses and runs commands.  Operations that change
 * the image's snapshot state run one at a time under srv.op_lock; see
 * serve.c's design comment for the I/O lock.
 */
#ifndef PMS_SERVE_H
#define PMS_SERVE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <json-c/json.h>
#include "pmemsnap.h"

/* Longest command a control client may send (bytes).  QMP commands are a
 * few hundred bytes; anything near this is garbage or an attack. */
#define SERVE_MAX_CMD_BYTES (1u << 20)
/* Control connections served at once; more are refused with an error. */
#define SERVE_MAX_CLIENTS 32
/* Nesting depth accepted in a command (json-c tokener depth). */
#define SERVE_MAX_JSON_DEPTH 32
/* How long the daemon waits for the VM's QMP socket to answer one ordinary
 * command (ms), and for a snapshot-save/-load job to finish (ms). */
#define VMQMP_TIMEOUT_MS 10000
#define VMQMP_JOB_TIMEOUT_MS 600000

struct srv_stats {
    atomic_uint_fast64_t reads, writes, bytes_read, bytes_written, flushes, zeroes;
    atomic_uint_fast64_t read_us, write_us, flush_us;   /* time inside the image calls */
    atomic_uint_fast64_t snapshots, reverts;
    atomic_uint_fast64_t last_snapshot_us, last_precopy_us, last_final_us,
                         last_commit_us, last_vm_paused_us, last_vm_state_us;
};

struct srv;

/* Held writes (held.c). */
struct held_write;
struct held {
    pthread_mutex_t mu;
    struct held_write *v;             /* in arrival order (mu) */
    size_t n, cap;
    atomic_uint_fast64_t bytes;       /* sum of v[].len; read lock-free */
};
void held_init(struct held *h);
void held_destroy(struct held *h);
bool held_any(struct held *h);
uint64_t held_bytes(struct held *h);
/* pms_pwrite, behind the held writes (retried first) while any are; a
 * write there is no room for (ENOSPC, EDQUOT) is held.  0 = stored or held. */
int held_pwrite(struct held *h, pms_dev *dev, const void *buf, size_t len, uint64_t off);
/* Store the held writes; 0 when none is left, else the error of the first
 * that still failed. */
int held_drain(struct held *h, pms_dev *dev);
/* pms_pread with the held bytes laid over it. */
int held_pread(struct held *h, pms_dev *dev, void *buf, size_t len, uint64_t off);
/* Drop them all (a revert); returns the bytes dropped. */
uint64_t held_clear(struct held *h);

/* In an error's desc: the operation was done, but the guest it stopped
 * could not be resumed (the client then does not say "Could not ..."). */
#define DONE_BUT_PAUSED ", but the VM could not be resumed and is paused"

/* Result of a control operation: 0, or -errno with a message and QMP error
 * class in err/eclass. */
struct srv_err {
    char msg[512];
    const char *eclass;           /* "GenericError" unless said otherwise */
};

int  srv_snapshot_create(struct srv *s, const char *name, bool external, bool vm,
                         struct srv_err *e);
int  srv_snapshot_revert(struct srv *s, const char *name, bool vm, struct srv_err *e);
int  srv_snapshot_delete(struct srv *s, const char *name, bool vm, struct srv_err *e);
int  srv_snapshot_list(struct srv *s, json_object **out, struct srv_err *e);
int  srv_flush(struct srv *s, struct srv_err *e);
json_object *srv_query_stats(struct srv *s);
void srv_request_quit(struct srv *s);

/* qmp.c: serve the control socket on listen fd lfd until srv_request_quit;
 * returns when the server is told to stop (qmp_stop). */
int  qmp_server_start(struct srv *s, int lfd);
void qmp_server_stop(void);
/* Broadcast an event to every negotiated client. */
void qmp_event(const char *name, json_object *data);

/* vmqmp.c: a blocking QMP client with timeouts. */
struct vmqmp;
int  vmqmp_connect(const char *path, int timeout_ms, struct vmqmp **out, char *err, size_t errlen);
void vmqmp_close(struct vmqmp *q);
/* While *cancel is set, vmqmp_job stops waiting (the job is cancelled and
 * dismissed, -ECANCELED). */
void vmqmp_set_cancel(struct vmqmp *q, const atomic_bool *cancel);
/* Run one command; *ret gets the "return" value (caller puts it) or, on an
 * "error" reply, -EIO with desc in err.  Events read meanwhile are passed to
 * on_event when set.  args is consumed. */
int  vmqmp_exec(struct vmqmp *q, const char *cmd, json_object *args, json_object **ret,
                int timeout_ms, char *err, size_t errlen);
/* Run a job command (snapshot-save/-load/-delete) and wait for it to
 * conclude: cmd_timeout_ms bounds each command's answer, timeout_ms the job. */
int  vmqmp_job(struct vmqmp *q, const char *cmd, json_object *args, int cmd_timeout_ms,
               int timeout_ms, char *err, size_t errlen);
/* Member key of o when o is an object and the member a string (or a
 * boolean), else NULL (dflt): replies of a peer are checked before use. */
const char *json_member_str(json_object *o, const char *key);
bool json_member_bool(json_object *o, const char *key, bool dflt);

/* flusher.c: the write-back helper process (see there).  The calls return 0
 * or -errno. */
struct flusher {
    pthread_mutex_t mu;
    int sk;                       /* our end of the socket pair, -1 = none */
    pid_t pid;                    /* the helper, -1 = none */
    const char *path;             /* the FUSE file; NULL = not started */
    dev_t dev;                    /* its device (the mount's), learnt at the first start */
};
int  flusher_start(struct flusher *f, const char *path);
int  flusher_write(struct flusher *f);    /* write back every dirty page, wait */
/* The same if no other command is in flight, else -EBUSY at once (the
 * helper is not restarted here either: -EPIPE). */
int  flusher_try_write(struct flusher *f);
int  flusher_fsync(struct flusher *f);    /* fsync the FUSE file */
void flusher_stop(struct flusher *f);

/* CLI entry points (tools/pmemsnap.c dispatches here). */
int cmd_serve(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_snapshot_remote(int argc, char **argv);

#endif
