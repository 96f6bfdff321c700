/* The daemon's control socket, in QMP's wire format.
 *
 * A client gets the greeting {"QMP": {...}}, must send qmp_capabilities,
 * then sends {"execute": CMD, "arguments": {...}, "id": ANY} objects (with or
 * without newlines between them) and gets {"return": ...} or {"error":
 * {"class", "desc"}} back (with the id echoed), and events {"event", "data",
 * "timestamp"} in between.  Each message we send ends with "\r\n" as QEMU's.
 *
 * Invariants: a bad message (malformed JSON, not an object, unknown command,
 * wrong or missing arguments, longer than SERVE_MAX_CMD_BYTES) gets an error
 * reply and the connection goes on (the message is discarded whole: see
 * struct framer); nothing a client sends can stop
 * the daemon except `quit`.  A client that disconnects mid-command does not
 * stop the command: it completes and its reply is dropped; nor the
 * commands after it that were already read.
 *
 * Threads: the main thread accepts; each connection has its own detached
 * thread (at most SERVE_MAX_CLIENTS).  clients_lock guards the client list;
 * each client's wlock serialises writes to its socket (replies from its own
 * thread, events from any).  A reply may wait for its client (SO_SNDTIMEO,
 * CLIENT_SEND_TIMEOUT_S, then the client is dropped).  An event never
 * waits: it is sent without blocking, after at most EVENT_LOCK_MS for a
 * reply in progress to the same client, and a client whose socket cannot
 * take it (it stopped reading) is dropped; the broadcast runs under
 * clients_lock and often under the daemon's op_lock, so one client that
 * never reads must not hold up the others or the operations.
 */
#include <errno.h>
#include <stdarg.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include "serve.h"

/* A reply to one client may block this long (s) before the client is dropped. */
#define CLIENT_SEND_TIMEOUT_S 5
/* How long an event waits for a reply being sent to the same client (ms). */
#define EVENT_LOCK_MS 20

struct client {
    int fd;
    bool negotiated;
    atomic_bool dead;            /* set by any sender (under wlock), read by the reader */
    pthread_mutex_t wlock;
    struct client *next;
};

static struct srv *g_srv;
static pthread_mutex_t clients_lock = PTHREAD_MUTEX_INITIALIZER;
static struct client *clients;
static int nclients;
static atomic_bool stopping;

/* Drop a client: no more sends; its reader wakes up and frees it.  Any
 * thread (dead is atomic, shutdown thread-safe). */
static void drop(struct client *c)
{
    c->dead = true;
    shutdown(c->fd, SHUT_RDWR);
}

/* Length of the valid UTF-8 sequence at p (n bytes left), 0 if invalid
 * (overlong forms, surrogates and code points past U+10FFFF included). */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
    if (p[0] < 0x80) return 1;
    size_t len = p[0] >= 0xc2 && p[0] <= 0xdf ? 2 : p[0] >= 0xe0 && p[0] <= 0xef ? 3
               : p[0] >= 0xf0 && p[0] <= 0xf4 ? 4 : 0;
    if (!len || len > n) return 0;
    for (size_t i = 1; i < len; i++)
        if ((p[i] & 0xc0) != 0x80) return 0;
    if ((p[0] == 0xe0 && p[1] < 0xa0) || (p[0] == 0xed && p[1] > 0x9f) ||
        (p[0] == 0xf0 && p[1] < 0x90) || (p[0] == 0xf4 && p[1] > 0x8f))
        return 0;
    return len;
}

/* s with every byte that is not part of valid UTF-8 replaced by U+FFFD, or
 * NULL when s is valid (or out of memory: then s goes as it is).  Names
 * and messages we send come also from images and file names, which need
 * not be UTF-8; JSON text must be.  The serialised text is ASCII outside
 * strings, so fixing it after serialisation fixes only string content. */
static char *utf8_fixed(const char *s, size_t n, size_t *outn)
{
    size_t i = 0, k;
    while (i < n && (k = utf8_seq((const unsigned char *)s + i, n - i)))
        i += k;
    if (i == n) return NULL;
    char *o = malloc(3 * n + 1);
    if (!o) return NULL;
    size_t j = 0;
    for (i = 0; i < n;) {
        if ((k = utf8_seq((const unsigned char *)s + i, n - i))) {
            memcpy(o + j, s + i, k);
            j += k;
            i += k;
        } else {
            memcpy(o + j, "\xef\xbf\xbd", 3);
            j += 3;
            i++;
        }
    }
    o[j] = '\0';
    *outn = j;
    return o;
}

/* Send o to c; event: without blocking (see the top). */
static void client_send(struct client *c, json_object *o, bool event)
{
    const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
    size_t n = strlen(s);
    char *fixed = utf8_fixed(s, n, &n);
    if (fixed)
        s = fixed;
    if (event) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += EVENT_LOCK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
        if (pthread_mutex_timedlock(&c->wlock, &ts) != 0) {
            drop(c);                 /* stuck in a reply: not reading */
            free(fixed);
            return;
        }
    } else
        pthread_mutex_lock(&c->wlock);
    if (!c->dead) {
        struct iovec iov[2] = { { (void *)s, n }, { "\r\n", 2 } };
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };
        size_t want = n + 2;
        while (want) {
            ssize_t k = sendmsg(c->fd, &mh, MSG_NOSIGNAL | (event ? MSG_DONTWAIT : 0));
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                drop(c);             /* gone, or not reading */
                break;
            }
            want -= (size_t)k;
            while (mh.msg_iovlen && (size_t)k >= mh.msg_iov->iov_len) {
                k -= (ssize_t)mh.msg_iov->iov_len;
                mh.msg_iov++;
                mh.msg_iovlen--;
            }
            if (mh.msg_iovlen) {
                mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + k;
                mh.msg_iov->iov_len -= (size_t)k;
            }
        }
    }
    pthread_mutex_unlock(&c->wlock);
    free(fixed);
}

static void send_error(struct client *c, json_object *id, const char *cls, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void send_error(struct client *c, json_object *id, const char *cls, const char *fmt, ...)
{
    char desc[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(desc, sizeof desc, fmt, ap);
    va_end(ap);
    json_object *o = json_object_new_object(), *e = json_object_new_object();
    json_object_object_add(e, "class", json_object_new_string(cls));
    json_object_object_add(e, "desc", json_object_new_string(desc));
    json_object_object_add(o, "error", e);
    if (id)
        json_object_object_add(o, "id", json_object_get(id));
    client_send(c, o, false);
    json_object_put(o);
}

static void send_return(struct client *c, json_object *id, json_object *ret)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "return", ret ? ret : json_object_new_object());
    if (id)
        json_object_object_add(o, "id", json_object_get(id));
    client_send(c, o, false);
    json_object_put(o);
}

void qmp_event(const char *name, json_object *data)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    json_object *o = json_object_new_object(), *ts = json_object_new_object();
    json_object_object_add(o, "event", json_object_new_string(name));
    if (data)
        json_object_object_add(o, "data", data);
    json_object_object_add(ts, "seconds", json_object_new_int64(tv.tv_sec));
    json_object_object_add(ts, "microseconds", json_object_new_int64(tv.tv_usec));
    json_object_object_add(o, "timestamp", ts);
    pthread_mutex_lock(&clients_lock);
    for (struct client *c = clients; c; c = c->next)
        if (c->negotiated)
            client_send(c, o, true);
    pthread_mutex_unlock(&clients_lock);
    json_object_put(o);
}

/* ---- commands ------------------------------------------------------------- */

/* Argument lookup: *out gets the string, or NULL when absent and optional.
 * Returns -1 (error sent) on a wrong type or a missing mandatory one. */
static int arg_str(struct client *c, json_object *id, json_object *args, const char *key,
                   bool mandatory, const char **out)
{
    json_object *v;
    *out = NULL;
    if (!args || !json_object_object_get_ex(args, key, &v)) {
        if (!mandatory)
            return 0;
        send_error(c, id, "GenericError", "Parameter '%s' is missing", key);
        return -1;
    }
    if (!json_object_is_type(v, json_type_string)) {
        send_error(c, id, "GenericError", "Invalid parameter type for '%s', expected: string", key);
        return -1;
    }
    if ((size_t)json_object_get_string_len(v) != strlen(json_object_get_string(v))) {
        send_error(c, id, "GenericError", "Parameter '%s' contains a NUL character", key);
        return -1;
    }
    *out = json_object_get_string(v);
    return 0;
}

static int arg_bool(struct client *c, json_object *id, json_object *args, const char *key,
                    bool *out)
{
    json_object *v;
    *out = false;
    if (!args || !json_object_object_get_ex(args, key, &v))
        return 0;
    if (!json_object_is_type(v, json_type_boolean)) {
        send_error(c, id, "GenericError", "Invalid parameter type for '%s', expected: boolean", key);
        return -1;
    }
    *out = json_object_get_boolean(v);
    return 0;
}

/* Every key of args must be one of the NULL-terminated list. */
static int only_args(struct client *c, json_object *id, json_object *args, const char *const *ok)
{
    if (!args)
        return 0;
    json_object_object_foreach(args, k, v) {
        (void)v;
        bool found = false;
        for (const char *const *p = ok; *p; p++)
            found |= strcmp(*p, k) == 0;
        if (!found) {
            send_error(c, id, "GenericError", "Parameter '%s' is unexpected", k);
            return -1;
        }
    }
    return 0;
}

static void reply_op(struct client *c, json_object *id, int r, struct srv_err *e, json_object *ret)
{
    if (r < 0) {
        json_object_put(ret);
        send_error(c, id, e->eclass ? e->eclass : "GenericError", "%s", e->msg);
    } else
        send_return(c, id, ret);
}

static void run(struct client *c, const char *cmd, json_object *args, json_object *id)
{
    struct srv_err e = { "", NULL };
    int r;
    if (strcmp(cmd, "qmp_capabilities") == 0) {
        if (c->negotiated) {
            send_error(c, id, "CommandNotFound",
                       "Capabilities negotiation is already complete, command ignored");
            return;
        }
        static const char *const ok[] = { "enable", NULL };
        if (only_args(c, id, args, ok) < 0)
            return;
        pthread_mutex_lock(&clients_lock);
        c->negotiated = true;
        pthread_mutex_unlock(&clients_lock);
        send_return(c, id, NULL);
        return;
    }
    if (!c->negotiated) {
        send_error(c, id, "CommandNotFound",
                   "Expecting capabilities negotiation with 'qmp_capabilities'");
        return;
    }
    if (strcmp(cmd, "snapshot-create") == 0 || strcmp(cmd, "snapshot-revert") == 0 ||
        strcmp(cmd, "snapshot-delete") == 0) {
        static const char *const okc[] = { "name", "kind", "vm", NULL };
        static const char *const oko[] = { "name", "vm", NULL };
        bool create = cmd[9] == 'c';
        const char *name, *kind;
        bool vm;
        if (only_args(c, id, args, create ? okc : oko) < 0 ||
            arg_str(c, id, args, "name", true, &name) < 0 ||
            arg_str(c, id, args, "kind", false, &kind) < 0 ||
            arg_bool(c, id, args, "vm", &vm) < 0)
            return;
        if (!*name) {
            send_error(c, id, "GenericError", "Parameter 'name' is empty");
            return;
        }
        if (kind && strcmp(kind, "internal") && strcmp(kind, "external")) {
            send_error(c, id, "GenericError",
                       "Parameter 'kind' does not accept value '%s' (internal, external)", kind);
            return;
        }
        if (create)
            r = srv_snapshot_create(g_srv, name, kind && strcmp(kind, "external") == 0, vm, &e);
        else if (cmd[9] == 'r')
            r = srv_snapshot_revert(g_srv, name, vm, &e);
        else
            r = srv_snapshot_delete(g_srv, name, vm, &e);
        reply_op(c, id, r, &e, NULL);
        return;
    }
    static const char *const none[] = { NULL };
    if (strcmp(cmd, "snapshot-list") == 0) {
        json_object *l = NULL;
        if (only_args(c, id, args, none) < 0)
            return;
        r = srv_snapshot_list(g_srv, &l, &e);
        reply_op(c, id, r, &e, l);
    } else if (strcmp(cmd, "flush") == 0) {
        if (only_args(c, id, args, none) < 0)
            return;
        r = srv_flush(g_srv, &e);
        reply_op(c, id, r, &e, NULL);
    } else if (strcmp(cmd, "query-stats") == 0) {
        if (only_args(c, id, args, none) < 0)
            return;
        send_return(c, id, srv_query_stats(g_srv));
    } else if (strcmp(cmd, "query-commands") == 0) {
        if (only_args(c, id, args, none) < 0)
            return;
        static const char *const names[] = {
            "qmp_capabilities", "query-commands", "snapshot-create", "snapshot-list",
            "snapshot-revert", "snapshot-delete", "flush", "query-stats", "quit", NULL };
        json_object *l = json_object_new_array();
        for (const char *const *p = names; *p; p++) {
            json_object *o = json_object_new_object();
            json_object_object_add(o, "name", json_object_new_string(*p));
            json_object_array_add(l, o);
        }
        send_return(c, id, l);
    } else if (strcmp(cmd, "quit") == 0) {
        if (only_args(c, id, args, none) < 0)
            return;
        send_return(c, id, NULL);
        srv_request_quit(g_srv);
    } else
        send_error(c, id, "CommandNotFound", "The command %s has not been found", cmd);
}

static void handle(struct client *c, json_object *m)
{
    json_object *id = NULL, *ex = NULL, *args = NULL;
    if (!json_object_is_type(m, json_type_object)) {
        send_error(c, NULL, "GenericError", "QMP input must be a JSON object");
        return;
    }
    json_object_object_get_ex(m, "id", &id);
    json_object_object_foreach(m, k, v) {
        (void)v;
        if (strcmp(k, "execute") && strcmp(k, "arguments") && strcmp(k, "id")) {
            send_error(c, id, "GenericError", "QMP input member '%s' is unexpected", k);
            return;
        }
    }
    if (!json_object_object_get_ex(m, "execute", &ex)) {
        send_error(c, id, "GenericError", "QMP input lacks member 'execute'");
        return;
    }
    if (!json_object_is_type(ex, json_type_string) ||
        (size_t)json_object_get_string_len(ex) != strlen(json_object_get_string(ex))) {
        send_error(c, id, "GenericError", "QMP input member 'execute' must be a string");
        return;
    }
    if (json_object_object_get_ex(m, "arguments", &args) &&
        !json_object_is_type(args, json_type_object)) {
        send_error(c, id, "GenericError", "QMP input member 'arguments' must be an object");
        return;
    }
    run(c, json_object_get_string(ex), args, id);
}

static void client_free(struct client *c)
{
    pthread_mutex_lock(&clients_lock);
    for (struct client **p = &clients; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
    nclients--;
    pthread_mutex_unlock(&clients_lock);
    close(c->fd);
    pthread_mutex_destroy(&c->wlock);
    free(c);
}

/* Framing of the input into messages, before any parsing: a message that
 * starts with '{' or '[' ends where its brackets balance (outside strings),
 * anything else (a scalar, junk, NUL bytes) at the end of its line.  So a
 * message that is malformed, or longer than SERVE_MAX_CMD_BYTES, gets one
 * error and is discarded whole: nothing inside it can run as a command of
 * its own, and the next message starts where QMP's own framing would. */
struct framer {
    char *buf;
    size_t len;                  /* bytes kept of the current message */
    bool started, bare, in_str, esc, overlong;
    size_t depth;
};

enum { FRAME_MORE, FRAME_END, FRAME_OVERLONG };

/* Feed one byte: FRAME_END when it ends a message, FRAME_OVERLONG when the
 * message just grew past SERVE_MAX_CMD_BYTES (its error goes out at once;
 * the rest of it is then discarded up to its end). */
static int frame_byte(struct framer *f, char b)
{
    if (!f->started) {
        if (b == ' ' || b == '\t' || b == '\r' || b == '\n')
            return FRAME_MORE;   /* between messages */
        f->started = true;
        f->bare = b != '{' && b != '[';
    }
    int r = FRAME_MORE;
    if (f->len < SERVE_MAX_CMD_BYTES)
        f->buf[f->len++] = b;
    else if (!f->overlong) {
        f->overlong = true;
        r = FRAME_OVERLONG;
    }
    if (f->bare)
        return b == '\n' ? FRAME_END : r;
    if (f->in_str) {
        if (f->esc)
            f->esc = false;
        else if (b == '\\')
            f->esc = true;
        else if (b == '"')
            f->in_str = false;
        return r;
    }
    if (b == '"')
        f->in_str = true;
    else if (b == '{' || b == '[')
        f->depth++;
    else if ((b == '}' || b == ']') && --f->depth == 0)
        return FRAME_END;
    return r;
}

/* What json-c accepts even in strict mode and QMP must not: the bare words
 * NaN and Infinity (not JSON; echoed in an id they make our reply invalid
 * too), and integers past the 64-bit range (json-c clamps them, so an id
 * would come back changed).  A lexical scan of the message outside its
 * strings; NULL if it is clean, else what is wrong. */
static const char *lex_check(const char *b, size_t n)
{
    bool in_str = false, esc = false;
    for (size_t i = 0; i < n; i++) {
        char ch = b[i];
        if (in_str) {
            if (esc) esc = false;
            else if (ch == '\\') esc = true;
            else if (ch == '"') in_str = false;
            continue;
        }
        if (ch == '"') {
            in_str = true;
        } else if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')) {
            size_t j = i;
            while (j < n && ((b[j] >= 'a' && b[j] <= 'z') || (b[j] >= 'A' && b[j] <= 'Z')))
                j++;
            size_t l = j - i;
            if (!((l == 4 && !memcmp(b + i, "true", 4)) || (l == 5 && !memcmp(b + i, "false", 5)) ||
                  (l == 4 && !memcmp(b + i, "null", 4))))
                return "not a JSON value (NaN and Infinity are not JSON)";
            i = j - 1;
        } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
            size_t j = i + (ch == '-');
            bool integer = true;
            while (j < n && ((b[j] >= '0' && b[j] <= '9') || b[j] == '.' || b[j] == 'e' ||
                             b[j] == 'E' || b[j] == '+' || b[j] == '-')) {
                if (b[j] == '.' || b[j] == 'e' || b[j] == 'E') integer = false;
                j++;
            }
            if (j < n && ((b[j] >= 'a' && b[j] <= 'z') || (b[j] >= 'A' && b[j] <= 'Z')))
                return "not a JSON value (NaN and Infinity are not JSON)";
            if (integer) {
                char num[32];
                size_t l = j - i;
                if (l >= sizeof num)
                    return "integer out of the 64-bit range";
                memcpy(num, b + i, l);
                num[l] = '\0';
                errno = 0;
                if (num[0] == '-') (void)strtoll(num, NULL, 10);
                else (void)strtoull(num, NULL, 10);
                if (errno == ERANGE)
                    return "integer out of the 64-bit range";
            }
            i = j - 1;
        }
    }
    return NULL;
}

/* Parse and run one framed message. */
static void frame_done(struct client *c, struct framer *f, json_tokener *tok)
{
    if (!f->overlong) {                 /* (an overlong one had its error) */
        json_tokener_reset(tok);
        json_object *m = json_tokener_parse_ex(tok, f->buf, (int)f->len);
        enum json_tokener_error je = json_tokener_get_error(tok);
        size_t end = je == json_tokener_success ? json_tokener_get_parse_end(tok) : 0;
        while (end < f->len && (f->buf[end] == ' ' || f->buf[end] == '\t' ||
                                f->buf[end] == '\r' || f->buf[end] == '\n'))
            end++;
        const char *bad = je == json_tokener_success && end == f->len ? lex_check(f->buf, f->len)
                                                                      : NULL;
        if (bad)
            send_error(c, NULL, "GenericError", "JSON parse error, %s", bad);
        else if (je == json_tokener_success && end == f->len)
            handle(c, m);
        else if (je == json_tokener_success || je == json_tokener_continue)
            send_error(c, NULL, "GenericError", "JSON parse error, %s",
                       je == json_tokener_success ? "trailing characters after a value"
                                                  : "unexpected end of input");
        else
            send_error(c, NULL, "GenericError", "JSON parse error, %s",
                       json_tokener_error_desc(je));
        json_object_put(m);
    }
    f->len = 0;
    f->started = f->bare = f->in_str = f->esc = f->overlong = false;
    f->depth = 0;
}

static void *client_main(void *arg)
{
    struct client *c = arg;
    json_object *g = json_tokener_parse(
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7},"
        " \"package\": \"pmemsnap " "serve\"}, \"capabilities\": []}}");
    client_send(c, g, false);
    json_object_put(g);
    json_tokener *tok = json_tokener_new_ex(SERVE_MAX_JSON_DEPTH);
    /* JSON as RFC 8259 has it (no single quotes, trailing commas, leading
     * zeroes) in UTF-8, as QEMU's parser wants */
    if (tok)
        json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    struct framer f = { .buf = malloc(SERVE_MAX_CMD_BYTES) };
    char buf[65536];
    while (tok && f.buf && !stopping) {
        ssize_t n = read(c->fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        /* what was received runs even if the client is gone (a reply
         * failed): a client may send commands and close at once */
        for (ssize_t i = 0; i < n; i++) {
            int fr = frame_byte(&f, buf[i]);
            if (fr == FRAME_OVERLONG)
                send_error(c, NULL, "GenericError",
                           "JSON message longer than %u bytes, discarded", SERVE_MAX_CMD_BYTES);
            else if (fr == FRAME_END)
                frame_done(c, &f, tok);
        }
    }
    free(f.buf);
    json_tokener_free(tok);
    client_free(c);
    return NULL;
}

static void *accept_main(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    while (!stopping) {
        struct pollfd p = { .fd = lfd, .events = POLLIN };
        if (poll(&p, 1, 200) <= 0)
            continue;
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        struct timeval tv = { CLIENT_SEND_TIMEOUT_S, 0 };
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        struct client *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        pthread_mutex_init(&c->wlock, NULL);
        pthread_mutex_lock(&clients_lock);
        bool full = nclients >= SERVE_MAX_CLIENTS;
        if (!full) {
            c->next = clients;
            clients = c;
            nclients++;
        }
        pthread_mutex_unlock(&clients_lock);
        if (full) {
            send_error(c, NULL, "GenericError", "too many control connections (%d)",
                       SERVE_MAX_CLIENTS);
            close(fd);
            pthread_mutex_destroy(&c->wlock);
            free(c);
            continue;
        }
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &at, client_main, c) != 0) {
            client_free(c);
        }
        pthread_attr_destroy(&at);
    }
    return NULL;
}

static pthread_t accept_thr;

int qmp_server_start(struct srv *s, int lfd)
{
    g_srv = s;
    int r = pthread_create(&accept_thr, NULL, accept_main, (void *)(intptr_t)lfd);
    return -r;
}

/* Stop accepting, wake every client thread, wait a little for them. */
void qmp_server_stop(void)
{
    stopping = true;
    pthread_join(accept_thr, NULL);
    pthread_mutex_lock(&clients_lock);
    for (struct client *c = clients; c; c = c->next)
        shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&clients_lock);
    for (int i = 0; i < 100; i++) {      /* up to 1 s */
        pthread_mutex_lock(&clients_lock);
        int n = nclients;
        pthread_mutex_unlock(&clients_lock);
        if (!n)
            break;
        usleep(10000);
    }
}
