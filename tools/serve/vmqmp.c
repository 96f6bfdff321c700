/* A small blocking QMP client with timeouts.
 *
 * Used by the daemon to drive the VM's QEMU (--qmp: stop, cont,
 * snapshot-save/-load/-delete jobs) and by the CLI (`pmemsnap snapshot
 * --socket`, `pmemsnap stats`) to talk to the daemon.  QMP servers end every
 * message with a newline, so replies are read line by line; events read
 * while waiting for a reply are dropped, except JOB_STATUS_CHANGE, which
 * vmqmp_job waits for.  Every read and write is bounded by a timeout, so a
 * peer that never answers makes the call fail with ETIMEDOUT instead of
 * hanging the daemon; that includes the connect (a peer that listens but
 * never accepts fills its backlog, and a blocking connect would then wait
 * for good).  Replies are checked for shape (json_member_*) before use: a
 * peer that answers with the wrong types gets an error, not a crash.
 * Every command carries an "id" (a counter of the connection) and only the
 * reply with that id answers it: a stray reply, or the late answer to a
 * command that timed out, is skipped, never taken for the next one's.
 * Job ids are unique in the process (a counter shared by all connections
 * and the pid), and a job we started is dismissed (cancelled first if it
 * still runs) on every way out, so QEMU never keeps one that blocks the
 * next operation with "Job ID ... already in use".
 *
 * Threads: a struct vmqmp belongs to the thread that connected it; the
 * job counter is atomic; *cancel (vmqmp_set_cancel) is read lock-free.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "serve.h"

/* Longest line accepted from a peer (bytes): query replies of a big VM stay
 * far below it. */
#define VMQMP_MAX_LINE (16u << 20)
/* Pause between connect attempts while the peer's backlog is full (ms). */
#define CONNECT_RETRY_MS 5
/* Pause between query-jobs polls while a job runs (ms). */
#define JOB_POLL_MS 5
/* Bound of each clean-up command (job-cancel, job-dismiss) after a job
 * failed or was interrupted (ms): the peer may be the reason it failed. */
#define JOB_CLEANUP_MS 2000

struct vmqmp {
    int fd;
    char *buf;
    size_t len, cap;
    uint64_t cmd_seq;               /* id of the last command sent */
    const atomic_bool *cancel;      /* set: stop waiting for a job */
};

static atomic_uint job_seq;         /* job ids, unique in the process */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Next complete line as a parsed JSON object (caller puts it). */
static int read_msg(struct vmqmp *q, json_object **out, int64_t deadline, char *err, size_t errlen)
{
    for (;;) {
        char *nl = q->len ? memchr(q->buf, '\n', q->len) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - q->buf) + 1;
            *nl = '\0';
            enum json_tokener_error je;
            json_object *o = json_tokener_parse_verbose(q->buf, &je);
            memmove(q->buf, q->buf + n, q->len - n);
            q->len -= n;
            if (!o || !json_object_is_type(o, json_type_object)) {
                json_object_put(o);
                snprintf(err, errlen, "peer sent something that is not a JSON object");
                return -EPROTO;
            }
            *out = o;
            return 0;
        }
        if (q->len >= VMQMP_MAX_LINE) {
            snprintf(err, errlen, "peer sent a line longer than %u bytes", VMQMP_MAX_LINE);
            return -EPROTO;
        }
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            snprintf(err, errlen, "timed out waiting for an answer");
            return -ETIMEDOUT;
        }
        struct pollfd p = { .fd = q->fd, .events = POLLIN };
        int r = poll(&p, 1, (int)(left > 1000000 ? 1000000 : left));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(err, errlen, "poll: %s", strerror(errno));
            return -errno;
        }
        if (r == 0)
            continue;
        if (q->cap - q->len < 65536) {
            size_t nc = q->cap ? q->cap * 2 : 131072;
            char *nb = realloc(q->buf, nc);
            if (!nb) {
                snprintf(err, errlen, "out of memory");
                return -ENOMEM;
            }
            q->buf = nb;
            q->cap = nc;
        }
        ssize_t k = read(q->fd, q->buf + q->len, q->cap - q->len - 1);
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k <= 0) {
            snprintf(err, errlen, "connection closed by peer");
            return -ECONNRESET;
        }
        q->len += (size_t)k;
    }
}

static int send_all(int fd, const char *p, size_t n, int64_t deadline, char *err, size_t errlen)
{
    while (n) {
        int64_t left = deadline - now_ms();
        struct pollfd pf = { .fd = fd, .events = POLLOUT };
        int r = left > 0 ? poll(&pf, 1, (int)left) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(err, errlen, "timed out sending a command");
            return -ETIMEDOUT;
        }
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k < 0) {
            snprintf(err, errlen, "send: %s", strerror(errno));
            return -errno;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

const char *json_member_str(json_object *o, const char *key)
{
    json_object *v;
    if (!json_object_is_type(o, json_type_object) || !json_object_object_get_ex(o, key, &v) ||
        !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

bool json_member_bool(json_object *o, const char *key, bool dflt)
{
    json_object *v;
    if (!json_object_is_type(o, json_type_object) || !json_object_object_get_ex(o, key, &v) ||
        !json_object_is_type(v, json_type_boolean))
        return dflt;
    return json_object_get_boolean(v);
}

static const char *err_desc(json_object *o)
{
    json_object *e;
    const char *d = json_object_object_get_ex(o, "error", &e) ? json_member_str(e, "desc") : NULL;
    return d ? d : "unknown error";
}

/* Is m the reply to command id? */
static bool reply_to(json_object *m, uint64_t id)
{
    json_object *v;
    return json_object_object_get_ex(m, "id", &v) && json_object_is_type(v, json_type_int) &&
           (uint64_t)json_object_get_int64(v) == id;
}

int vmqmp_exec(struct vmqmp *q, const char *cmd, json_object *args, json_object **ret,
               int timeout_ms, char *err, size_t errlen)
{
    int64_t deadline = now_ms() + timeout_ms;
    uint64_t id = ++q->cmd_seq;
    json_object *o = json_object_new_object();
    json_object_object_add(o, "execute", json_object_new_string(cmd));
    if (args)
        json_object_object_add(o, "arguments", args);
    json_object_object_add(o, "id", json_object_new_int64((int64_t)id));
    const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
    char *line;
    int r = asprintf(&line, "%s\n", s) < 0 ? -ENOMEM : 0;
    json_object_put(o);
    if (r < 0) {
        snprintf(err, errlen, "out of memory");
        return r;
    }
    r = send_all(q->fd, line, strlen(line), deadline, err, errlen);
    free(line);
    if (r < 0)
        return r;
    for (;;) {
        json_object *m;
        if ((r = read_msg(q, &m, deadline, err, errlen)) < 0)
            return r;
        json_object *v;
        bool mine = reply_to(m, id);
        if (mine && json_object_object_get_ex(m, "return", &v)) {
            if (ret)
                *ret = json_object_get(v);
            json_object_put(m);
            return 0;
        }
        if (mine && json_object_object_get_ex(m, "error", &v)) {
            snprintf(err, errlen, "%s", err_desc(m));
            json_object_put(m);
            return -EIO;
        }
        json_object_put(m);      /* an event, or another command's reply */
    }
}

int vmqmp_connect(const char *path, int timeout_ms, struct vmqmp **out, char *err, size_t errlen)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path) {
        snprintf(err, errlen, "socket path too long: %s", path);
        return -ENAMETOOLONG;
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -errno;
    }
    /* A unix socket connects at once or fails with EAGAIN while the peer's
     * backlog is full: retried until the deadline. */
    int64_t deadline = now_ms() + timeout_ms;
    while (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        if ((e == EAGAIN || e == EINTR) && now_ms() < deadline) {
            struct timespec ts = { 0, CONNECT_RETRY_MS * 1000000L };
            nanosleep(&ts, NULL);
            continue;
        }
        if (e == EAGAIN)
            snprintf(err, errlen, "cannot connect to %s: the peer accepts no connection "
                     "(timed out after %d ms)", path, timeout_ms);
        else
            snprintf(err, errlen, "cannot connect to %s: %s", path, strerror(e));
        close(fd);
        return e == EAGAIN ? -ETIMEDOUT : -e;
    }
    struct vmqmp *q = calloc(1, sizeof *q);
    if (!q) {
        close(fd);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    q->fd = fd;
    json_object *g = NULL, *v;
    int r = read_msg(q, &g, deadline, err, errlen);
    if (r == 0 && !json_object_object_get_ex(g, "QMP", &v)) {
        snprintf(err, errlen, "the peer sent no QMP greeting");
        r = -EPROTO;
    }
    json_object_put(g);
    if (r == 0)
        r = vmqmp_exec(q, "qmp_capabilities", NULL, NULL, timeout_ms, err, errlen);
    if (r < 0) {
        vmqmp_close(q);
        return r;
    }
    *out = q;
    return 0;
}

void vmqmp_set_cancel(struct vmqmp *q, const atomic_bool *cancel)
{
    q->cancel = cancel;
}

void vmqmp_close(struct vmqmp *q)
{
    if (!q)
        return;
    close(q->fd);
    free(q->buf);
    free(q);
}

/* Job status of job-id id from query-jobs: 1 concluded (error copied), 0 not
 * yet, <0 failure. */
static int job_state(struct vmqmp *q, const char *id, int timeout_ms, char *jerr, size_t jerrlen,
                     char *err, size_t errlen)
{
    json_object *l = NULL;
    int r = vmqmp_exec(q, "query-jobs", NULL, &l, timeout_ms, err, errlen);
    if (r < 0)
        return r;
    if (!json_object_is_type(l, json_type_array)) {
        json_object_put(l);
        snprintf(err, errlen, "query-jobs returned something that is not a list");
        return -EPROTO;
    }
    int found = -ENOENT;
    for (size_t i = 0; i < json_object_array_length(l); i++) {
        json_object *j = json_object_array_get_idx(l, i);
        const char *jid = json_member_str(j, "id"), *st = json_member_str(j, "status");
        if (!jid || strcmp(jid, id))
            continue;
        found = 0;
        if (st && strcmp(st, "concluded") == 0) {
            found = 1;
            /* any error member is a failure, whatever its type */
            json_object *ev;
            if (json_object_object_get_ex(j, "error", &ev)) {
                const char *je = json_member_str(j, "error");
                snprintf(jerr, jerrlen, "%s", je && *je ? je : "the job failed (no reason given)");
            } else
                jerr[0] = '\0';
        }
    }
    json_object_put(l);
    if (found == -ENOENT)
        snprintf(err, errlen, "job %s vanished", id);
    return found;
}

/* A job command on job id (job-cancel, job-dismiss), best effort. */
static void job_cmd(struct vmqmp *q, const char *cmd, const char *id)
{
    json_object *a = json_object_new_object();
    json_object_object_add(a, "id", json_object_new_string(id));
    char e[200];
    (void)vmqmp_exec(q, cmd, a, NULL, JOB_CLEANUP_MS, e, sizeof e);
}

int vmqmp_job(struct vmqmp *q, const char *cmd, json_object *args, int cmd_timeout_ms,
              int timeout_ms, char *err, size_t errlen)
{
    char id[80];
    snprintf(id, sizeof id, "pmemsnap-%s-%d-%u", cmd, (int)getpid(),
             atomic_fetch_add(&job_seq, 1) + 1);
    json_object_object_add(args, "job-id", json_object_new_string(id));
    int r = vmqmp_exec(q, cmd, args, NULL, cmd_timeout_ms, err, errlen);
    if (r == -EIO)
        return r;                   /* refused: no job was made */
    int64_t deadline = now_ms() + timeout_ms;
    char jerr[400] = "";
    while (r == 0) {
        r = job_state(q, id, cmd_timeout_ms, jerr, sizeof jerr, err, errlen);
        if (r == 1) {
            r = 0;
            break;
        }
        if (r < 0)
            break;
        if (q->cancel && atomic_load(q->cancel)) {
            snprintf(err, errlen, "%s job interrupted: the daemon is shutting down", cmd);
            r = -ECANCELED;
        } else if (now_ms() > deadline) {
            snprintf(err, errlen, "%s job did not finish in %d ms", cmd, timeout_ms);
            r = -ETIMEDOUT;
        } else {
            struct timespec ts = { 0, JOB_POLL_MS * 1000000L };
            nanosleep(&ts, NULL);
        }
    }
    if (r < 0 && r != -ENOENT)      /* still running, or unknown: stop it */
        job_cmd(q, "job-cancel", id);
    if (r != -ENOENT)               /* (vanished: nothing to dismiss) */
        job_cmd(q, "job-dismiss", id);
    if (r == 0 && jerr[0]) {
        snprintf(err, errlen, "%s", jerr);
        return -EIO;
    }
    return r;
}
