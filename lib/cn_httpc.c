/*
 * cn_httpc: a non-blocking HTTP/1.1 client on a zloop. See include/cn_httpc.h.
 *
 * Theory of operation
 *
 * A request is first queued on its host (ip:port). A host starts queued
 * requests while fewer than per_host of its requests hold a connection.
 * Starting one: a non-blocking socket, connect (EINPROGRESS), the request
 * bytes written as the socket accepts them, then the response read until
 * cn_httpc_parse says it is complete (or the peer closes). Each socket is a
 * zloop poller whose argument is the client; the handler finds the
 * connection by descriptor in a table, so a poll item left over from a
 * connection that ended earlier in the same loop pass finds nothing (or
 * the new connection on that descriptor, which simply tries its I/O and
 * gets EAGAIN).
 *
 * Keep-alive: a response framed by its Content-Length (or without a body)
 * that does not say "Connection: close" leaves its connection idle on the
 * host (at most per_host, polled for the peer's close, closed after
 * IDLE_MS); the host's next request takes the newest idle connection
 * instead of connecting. A request on a reused connection that fails
 * before any byte of an answer is sent again once on a new connection.
 *
 * A 50 ms timer ends connections past their deadline and delivers reports
 * that are due (requests that failed before they had a socket): callbacks
 * never run inside cn_httpc_request.
 */
#include "cn_httpc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cn_util.h"

#define TICK_MS 50
#define READ_CHUNK 16384
/* An idle keep-alive connection is closed after this long (under h2o's
 * 10 s request timeout, the agents' server, so we close first). */
#define IDLE_MS 5000

typedef struct host host_t;

typedef struct req {
    struct req *next;           /* host queue, or the client's done list */
    host_t *host;
    cn_httpc_cb *cb;
    void *arg;
    char *out;                  /* the request bytes */
    size_t out_len, out_off;
    char *in;
    size_t in_len, in_cap;
    int fd;
    int events;                 /* registered poll events (0 = none) */
    bool connected;
    bool reused;                /* on a kept-alive connection */
    bool fresh;                 /* retried: a new connection only */
    int64_t deadline_ms;
    const char *err;            /* done list: the failure to report */
} req_t;

/* An idle kept-alive connection. */
typedef struct idle {
    struct idle *next;
    int fd;
    int64_t since_ms;
} idle_t;

struct host {
    host_t *next;
    char ip[64];
    int port;
    struct sockaddr_in sin;
    bool addr_ok;
    int active;
    size_t queued;
    req_t *qhead, *qtail;
    idle_t *idle;               /* newest first */
    int nidle;
};

struct cn_httpc {
    zloop_t *loop;
    int timer;
    int per_host;
    int timeout_ms;
    host_t *hosts;
    req_t **byfd;               /* fd -> request holding it */
    host_t **idlefd;            /* fd -> host whose idle connection it is */
    size_t nfd;
    size_t in_flight, queued;
    req_t *done_head, *done_tail;   /* failed before a socket: report on the tick */
    struct pollfd *pfd;         /* cn_httpc_pump's poll set (nfd entries) */
};

/* ------------------------------------------------------------------ */
/* Response parsing                                                     */

static const char *
s_find_crlf (const char *p, const char *end)
{
    for (; p + 1 < end; p++)
        if (p[0] == '\r' && p[1] == '\n')
            return p;
    return NULL;
}

static const char *
s_find_hdr_end (const char *p, size_t len)
{
    for (size_t i = 0; i + 3 < len; i++)
        if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r' && p[i + 3] == '\n')
            return p + i;
    return NULL;
}

static bool
s_hdr_is (const char *name, size_t nlen, const char *want)
{
    return nlen == strlen (want) && strncasecmp (name, want, nlen) == 0;
}

/* Decode a chunked body at p..end. 1 complete (*out malloc'd), 0 more, -1 bad. */
static int
s_dechunk (const char *p, const char *end, char **out, size_t *olen)
{
    size_t cap = (size_t) (end - p) + 1, n = 0;
    char *o = malloc (cap);
    if (!o)
        abort ();
    for (;;) {
        const char *eol = s_find_crlf (p, end);
        if (!eol) {
            free (o);
            return (size_t) (end - p) > 64 ? -1 : 0;
        }
        size_t size = 0;
        const char *q = p;
        int digits = 0;
        for (; q < eol; q++) {
            int c = (unsigned char) *q, v;
            if (c >= '0' && c <= '9')
                v = c - '0';
            else if (c >= 'a' && c <= 'f')
                v = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F')
                v = c - 'A' + 10;
            else
                break;
            if (size > (SIZE_MAX >> 4) || ++digits > 15) {
                free (o);
                return -1;
            }
            size = size * 16 + (size_t) v;
        }
        if (!digits || (q < eol && *q != ';' && *q != ' ' && *q != '\t')) {
            free (o);
            return -1;
        }
        p = eol + 2;
        if (size == 0) {
            /* trailers, then an empty line */
            for (;;) {
                const char *t = s_find_crlf (p, end);
                if (!t) {
                    free (o);
                    return 0;
                }
                if (t == p)
                    break;
                p = t + 2;
            }
            o[n] = 0;
            *out = o;
            *olen = n;
            return 1;
        }
        if ((size_t) (end - p) < size + 2) {
            free (o);
            return 0;
        }
        if (p[size] != '\r' || p[size + 1] != '\n') {
            free (o);
            return -1;
        }
        memcpy (o + n, p, size);
        n += size;
        p += size + 2;
    }
}

/* cn_httpc_parse, and *keep: the response was framed by its length (or
 * had no body), ended exactly at len, and did not say "Connection: close":
 * the connection may carry the next request. */
static int
s_parse (const char *buf, size_t len, bool eof, int *status, const char **body,
         size_t *blen, bool *owned, bool *keep)
{
    *keep = false;
    *owned = false;
    *body = NULL;
    *blen = 0;
    const char *p = buf, *end = buf + len;
    for (;;) {
        const char *he = s_find_hdr_end (p, (size_t) (end - p));
        if (!he)
            return eof || (size_t) (end - p) > 65536 ? -1 : 0;
        /* status line: HTTP/1.x NNN reason */
        const char *eol = s_find_crlf (p, he + 2);
        if (!eol || eol - p < 12 || memcmp (p, "HTTP/1.", 7) != 0 || p[8] != ' '
            || p[9] < '1' || p[9] > '5' || p[10] < '0' || p[10] > '9' || p[11] < '0'
            || p[11] > '9' || (eol - p > 12 && p[12] != ' '))
            return -1;
        int st = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
        bool chunked = false, have_cl = false, close = false;
        size_t cl = 0;
        const char *l = eol + 2;
        while (l < he + 2) {
            const char *le = s_find_crlf (l, he + 2);
            if (!le)
                break;
            const char *colon = memchr (l, ':', (size_t) (le - l));
            if (!colon)
                return -1;
            size_t nlen = (size_t) (colon - l);
            const char *v = colon + 1;
            while (v < le && (*v == ' ' || *v == '\t'))
                v++;
            if (s_hdr_is (l, nlen, "content-length")) {
                cl = 0;
                if (v == le)
                    return -1;
                for (const char *d = v; d < le && *d != ' '; d++) {
                    if (*d < '0' || *d > '9' || cl > (size_t) CN_HTTPC_MAX_RESPONSE)
                        return -1;
                    cl = cl * 10 + (size_t) (*d - '0');
                }
                have_cl = true;
            }
            else
            if (s_hdr_is (l, nlen, "connection")) {
                for (const char *d = v; d + 5 <= le; d++)
                    if (strncasecmp (d, "close", 5) == 0)
                        close = true;
            }
            else
            if (s_hdr_is (l, nlen, "transfer-encoding")) {
                for (const char *d = v; d + 7 <= le; d++)
                    if (strncasecmp (d, "chunked", 7) == 0)
                        chunked = true;
            }
            l = le + 2;
        }
        const char *b = he + 4;
        if (st >= 100 && st < 200) {
            p = b;              /* an interim response: the real one follows */
            continue;
        }
        *status = st;
        if (st == 204 || st == 304) {
            *keep = !close && !eof && b == end;
            return 1;
        }
        if (chunked) {
            char *o = NULL;
            size_t n = 0;
            int rc = s_dechunk (b, end, &o, &n);
            if (rc == 0 && eof)
                return -1;
            if (rc == 1) {
                *body = o;
                *blen = n;
                *owned = true;
            }
            return rc;
        }
        if (have_cl) {
            if ((size_t) (end - b) < cl)
                return eof ? -1 : 0;
            *body = b;
            *blen = cl;
            *keep = !close && !eof && (size_t) (end - b) == cl;
            return 1;
        }
        if (!eof)
            return 0;
        *body = b;
        *blen = (size_t) (end - b);
        return 1;
    }
}

int
cn_httpc_parse (const char *buf, size_t len, bool eof, int *status, const char **body,
                size_t *blen, bool *owned)
{
    bool keep;
    return s_parse (buf, len, eof, status, body, blen, owned, &keep);
}

/* ------------------------------------------------------------------ */
/* Connections                                                          */

static int s_on_io (zloop_t *loop, zmq_pollitem_t *item, void *arg);
static void s_start_queued (cn_httpc_t *c, host_t *h);

static void
s_req_free (req_t *r)
{
    free (r->out);
    free (r->in);
    free (r);
}

static void
s_poll (cn_httpc_t *c, req_t *r, int events)
{
    if (r->events == events)
        return;
    zmq_pollitem_t item = { NULL, r->fd, 0, 0 };
    if (r->events)
        zloop_poller_end (c->loop, &item);
    r->events = events;
    if (events) {
        item.events = (short) events;
        if (zloop_poller (c->loop, &item, s_on_io, c) != 0)
            r->events = 0;
    }
}

static void s_begin (cn_httpc_t *c, req_t *r);

/* Keep fd open as an idle connection of h (polled for the peer's close);
 * closed instead when h has per_host idle already. */
static void
s_idle_put (cn_httpc_t *c, host_t *h, int fd)
{
    idle_t *i = h->nidle < c->per_host ? calloc (1, sizeof *i) : NULL;
    zmq_pollitem_t item = { NULL, fd, ZMQ_POLLIN, 0 };
    if (!i || zloop_poller (c->loop, &item, s_on_io, c) != 0) {
        free (i);
        close (fd);
        return;
    }
    i->fd = fd;
    i->since_ms = cn_now_ms ();
    i->next = h->idle;
    h->idle = i;
    h->nidle++;
    c->idlefd[fd] = h;
}

/* Forget idle connection fd of h (its poller ended); close it when asked. */
static void
s_idle_drop (cn_httpc_t *c, host_t *h, int fd, bool do_close)
{
    for (idle_t **pp = &h->idle; *pp; pp = &(*pp)->next) {
        if ((*pp)->fd != fd)
            continue;
        idle_t *i = *pp;
        *pp = i->next;
        free (i);
        h->nidle--;
        break;
    }
    zmq_pollitem_t item = { NULL, fd, 0, 0 };
    zloop_poller_end (c->loop, &item);
    c->idlefd[fd] = NULL;
    if (do_close)
        close (fd);
}

/* End r (with a response or an error), report, free, start what waits.
 * keep: the connection may carry the next request to the host. A request
 * on a reused connection that failed before any byte of an answer (the
 * agent closed the idle connection meanwhile) is sent again once, on a new
 * connection: every request here may be repeated (POST /tasks is
 * idempotent by x-cnapi-task-id; the others are reads). */
static void
s_finish_ex (cn_httpc_t *c, req_t *r, const char *err, int status, const char *body,
             size_t blen, bool keep)
{
    host_t *h = r->host;
    bool retry = err && r->reused && r->in_len == 0 && strcmp (err, "timeout") != 0;
    if (r->fd >= 0) {
        s_poll (c, r, 0);
        if ((size_t) r->fd < c->nfd && c->byfd[r->fd] == r)
            c->byfd[r->fd] = NULL;
        if (keep && !err)
            s_idle_put (c, h, r->fd);
        else
            close (r->fd);
        r->fd = -1;
        c->in_flight--;
        h->active--;
    }
    if (retry) {
        r->reused = false;
        r->fresh = true;
        r->connected = false;
        r->out_off = 0;
        s_begin (c, r);
        return;
    }
    cn_httpc_res_t res = { err ? 0 : status, err, body, err ? 0 : blen };
    r->cb (&res, r->arg);
    s_req_free (r);
    s_start_queued (c, h);
}

static void
s_finish (cn_httpc_t *c, req_t *r, const char *err, int status, const char *body, size_t blen)
{
    s_finish_ex (c, r, err, status, body, blen, false);
}

/* Try to complete the response; true when r was finished. */
static bool
s_try_parse (cn_httpc_t *c, req_t *r, bool eof)
{
    int status = 0;
    const char *body = NULL;
    size_t blen = 0;
    bool owned = false, keep = false;
    int rc = s_parse (r->in ? r->in : "", r->in_len, eof, &status, &body, &blen, &owned, &keep);
    if (rc == 0)
        return false;
    if (rc < 0) {
        s_finish (c, r, eof && r->in_len == 0 ? "closed" : "bad response", 0, NULL, 0);
        return true;
    }
    char *mine = owned ? (char *) body : NULL;
    s_finish_ex (c, r, NULL, status, body, blen, keep);
    free (mine);
    return true;
}

static void
s_io (cn_httpc_t *c, req_t *r, int revents)
{
    if (!r->connected) {
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        if (getsockopt (r->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
            soerr = errno;
        if (soerr == EINPROGRESS || soerr == EALREADY)
            return;
        if (soerr) {
            s_finish (c, r, "connect", 0, NULL, 0);
            return;
        }
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        if (getpeername (r->fd, (struct sockaddr *) &peer, &pl) != 0)
            return;             /* still connecting (a leftover poll item woke us) */
        r->connected = true;
    }
    while (r->out_off < r->out_len) {
        ssize_t n = send (r->fd, r->out + r->out_off, r->out_len - r->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                s_poll (c, r, ZMQ_POLLOUT);
                return;
            }
            if (errno == EINTR)
                continue;
            s_finish (c, r, "closed", 0, NULL, 0);
            return;
        }
        r->out_off += (size_t) n;
    }
    s_poll (c, r, ZMQ_POLLIN);
    for (int k = 0; k < 64; k++) {
        if (r->in_cap - r->in_len < READ_CHUNK) {
            size_t cap = r->in_cap ? r->in_cap * 2 : READ_CHUNK * 2;
            if (cap > CN_HTTPC_MAX_RESPONSE + READ_CHUNK * 2) {
                s_finish (c, r, "too large", 0, NULL, 0);
                return;
            }
            char *p = realloc (r->in, cap);
            if (!p)
                abort ();
            r->in = p;
            r->in_cap = cap;
        }
        ssize_t n = recv (r->fd, r->in + r->in_len, r->in_cap - r->in_len - 1, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                s_try_parse (c, r, false);
                return;
            }
            if (!s_try_parse (c, r, true))
                s_finish (c, r, "closed", 0, NULL, 0);
            return;
        }
        if (n == 0) {
            s_try_parse (c, r, true);
            return;
        }
        r->in_len += (size_t) n;
        if (r->in_len > CN_HTTPC_MAX_RESPONSE) {
            s_finish (c, r, "too large", 0, NULL, 0);
            return;
        }
    }
    s_try_parse (c, r, false);
}

static int
s_on_io (zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    cn_httpc_t *c = arg;
    if (item->fd < 0 || (size_t) item->fd >= c->nfd)
        return 0;
    req_t *r = c->byfd[item->fd];
    if (!r && c->idlefd[item->fd]) {
        /* an idle connection readable: the peer closed it (or sent what
         * nobody asked for); a leftover poll item finds nothing to read */
        char b;
        ssize_t n = recv (item->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            s_idle_drop (c, c->idlefd[item->fd], item->fd, true);
        return 0;
    }
    if (!r)
        return 0;               /* a leftover poll item of a finished request */
    s_io (c, r, item->revents);
    return 0;
}

/* Put r on the done list (reported on the next tick). */
static void
s_defer_fail (cn_httpc_t *c, req_t *r, const char *err)
{
    r->err = err;
    r->next = NULL;
    if (c->done_tail)
        c->done_tail->next = r;
    else
        c->done_head = r;
    c->done_tail = r;
}

static void
s_begin (cn_httpc_t *c, req_t *r)
{
    host_t *h = r->host;
    if (h->idle && !r->fresh) {
        int fd = h->idle->fd;
        s_idle_drop (c, h, fd, false);
        r->fd = fd;
        c->byfd[fd] = r;
        c->in_flight++;
        h->active++;
        r->reused = true;
        r->connected = true;
        r->deadline_ms = cn_now_ms () + c->timeout_ms;
        s_poll (c, r, ZMQ_POLLOUT);
        if (r->events == 0)
            s_finish (c, r, "closed", 0, NULL, 0);     /* retried on a new connection */
        return;
    }
    int fd = socket (AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        s_defer_fail (c, r, "connect");
        return;
    }
    int one = 1;
    setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if ((size_t) fd >= c->nfd) {
        size_t n = c->nfd ? c->nfd : 256;
        while (n <= (size_t) fd)
            n *= 2;
        req_t **t = realloc (c->byfd, n * sizeof *t);
        host_t **it = realloc (c->idlefd, n * sizeof *it);
        if (!t || !it)
            abort ();
        memset (t + c->nfd, 0, (n - c->nfd) * sizeof *t);
        memset (it + c->nfd, 0, (n - c->nfd) * sizeof *it);
        c->byfd = t;
        c->idlefd = it;
        c->nfd = n;
        free (c->pfd);          /* cn_httpc_pump allocates it again, nfd long */
        c->pfd = NULL;
    }
    r->fd = fd;
    c->byfd[fd] = r;
    c->in_flight++;
    h->active++;
    r->deadline_ms = cn_now_ms () + c->timeout_ms;
    int rc = connect (fd, (struct sockaddr *) &h->sin, sizeof h->sin);
    if (rc != 0 && errno != EINPROGRESS) {
        s_poll (c, r, 0);
        c->byfd[fd] = NULL;
        close (fd);
        r->fd = -1;
        c->in_flight--;
        h->active--;
        s_defer_fail (c, r, "connect");
        return;
    }
    s_poll (c, r, ZMQ_POLLOUT);
    if (r->events == 0) {
        c->byfd[fd] = NULL;
        close (fd);
        r->fd = -1;
        c->in_flight--;
        h->active--;
        s_defer_fail (c, r, "connect");
    }
}

static void
s_start_queued (cn_httpc_t *c, host_t *h)
{
    while (h->qhead && h->active < c->per_host) {
        req_t *r = h->qhead;
        h->qhead = r->next;
        if (!h->qhead)
            h->qtail = NULL;
        r->next = NULL;
        h->queued--;
        c->queued--;
        s_begin (c, r);
    }
}

static int
s_on_tick (zloop_t *loop, int timer_id, void *arg)
{
    cn_httpc_t *c = arg;
    int64_t now = cn_now_ms ();
    for (size_t fd = 0; fd < c->nfd; fd++) {
        req_t *r = c->byfd[fd];
        if (r && now >= r->deadline_ms)
            s_finish (c, r, "timeout", 0, NULL, 0);
    }
    for (host_t *h = c->hosts; h; h = h->next) {
        idle_t **pp = &h->idle;
        while (*pp) {
            idle_t *i = *pp;
            if (now - i->since_ms < IDLE_MS) {
                pp = &i->next;
                continue;
            }
            s_idle_drop (c, h, i->fd, true);    /* unlinks i */
        }
    }
    /* reports due (a callback may add more: those wait for the next tick) */
    req_t *d = c->done_head;
    c->done_head = c->done_tail = NULL;
    while (d) {
        req_t *next = d->next;
        cn_httpc_res_t res = { 0, d->err, NULL, 0 };
        host_t *h = d->host;
        d->cb (&res, d->arg);
        s_req_free (d);
        s_start_queued (c, h);
        d = next;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* API                                                                  */

cn_httpc_t *
cn_httpc_new (zloop_t *loop, int per_host, int timeout_ms)
{
    cn_httpc_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->loop = loop;
    c->per_host = per_host > 0 ? per_host : 1;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 1;
    c->timer = zloop_timer (loop, TICK_MS, 0, s_on_tick, c);
    return c;
}

void
cn_httpc_destroy (cn_httpc_t **p)
{
    if (!p || !*p)
        return;
    cn_httpc_t *c = *p;
    for (size_t fd = 0; fd < c->nfd; fd++) {
        req_t *r = c->byfd[fd];
        if (r) {
            s_poll (c, r, 0);
            close (r->fd);
            s_req_free (r);
        }
    }
    free (c->byfd);
    while (c->hosts) {
        host_t *h = c->hosts;
        c->hosts = h->next;
        while (h->idle)
            s_idle_drop (c, h, h->idle->fd, true);
        while (h->qhead) {
            req_t *r = h->qhead;
            h->qhead = r->next;
            s_req_free (r);
        }
        free (h);
    }
    while (c->done_head) {
        req_t *r = c->done_head;
        c->done_head = r->next;
        s_req_free (r);
    }
    free (c->idlefd);
    free (c->pfd);
    if (c->timer >= 0)
        zloop_timer_end (c->loop, c->timer);
    free (c);
    *p = NULL;
}

static host_t *
s_host (cn_httpc_t *c, const char *ip, int port)
{
    for (host_t *h = c->hosts; h; h = h->next)
        if (h->port == port && strcmp (h->ip, ip) == 0)
            return h;
    host_t *h = calloc (1, sizeof *h);
    if (!h)
        abort ();
    snprintf (h->ip, sizeof h->ip, "%s", ip);
    h->port = port;
    h->sin.sin_family = AF_INET;
    h->sin.sin_port = htons ((uint16_t) port);
    h->addr_ok = port > 0 && port < 65536 && strlen (ip) < sizeof h->ip
                 && inet_pton (AF_INET, ip, &h->sin.sin_addr) == 1;
    h->next = c->hosts;
    c->hosts = h;
    return h;
}

void
cn_httpc_request (cn_httpc_t *c, const char *ip, int port, const char *method,
                  const char *path, const char *headers, const char *body, size_t len,
                  cn_httpc_cb *cb, void *arg)
{
    req_t *r = calloc (1, sizeof *r);
    if (!r)
        abort ();
    r->fd = -1;
    r->cb = cb;
    r->arg = arg;
    host_t *h = s_host (c, ip ? ip : "", port);
    r->host = h;
    size_t hl = headers ? strlen (headers) : 0;
    size_t cap = strlen (method) + strlen (path) + strlen (h->ip) + hl + len + 160;
    r->out = malloc (cap);
    if (!r->out)
        abort ();
    int n = snprintf (r->out, cap,
                      "%s %s HTTP/1.1\r\nHost: %s:%d\r\n%sContent-Length: %zu\r\n"
                      "Connection: keep-alive\r\n\r\n", method, path, h->ip, port,
                      headers ? headers : "", len);
    r->out_len = (size_t) n;
    if (len) {
        memcpy (r->out + r->out_len, body, len);
        r->out_len += len;
    }
    if (!h->addr_ok) {
        s_defer_fail (c, r, "bad address");
        return;
    }
    if (h->queued >= CN_HTTPC_QUEUE_MAX) {
        s_defer_fail (c, r, "queue full");
        return;
    }
    if (h->qtail)
        h->qtail->next = r;
    else
        h->qhead = r;
    h->qtail = r;
    h->queued++;
    c->queued++;
    s_start_queued (c, h);
}

int
cn_httpc_pump (cn_httpc_t *c, int rounds)
{
    int handled = 0;
    for (int round = 0; round < rounds; round++) {
        if (!c->nfd)
            break;
        if (!c->pfd) {
            c->pfd = calloc (c->nfd, sizeof *c->pfd);
            if (!c->pfd)
                abort ();
        }
        size_t n = 0;
        for (size_t fd = 0; fd < c->nfd; fd++) {
            short ev = 0;
            req_t *r = c->byfd[fd];
            if (r && r->fd == (int) fd && r->events)
                ev = (short) ((r->events & ZMQ_POLLIN ? POLLIN : 0)
                              | (r->events & ZMQ_POLLOUT ? POLLOUT : 0));
            else
            if (!r && c->idlefd[fd])
                ev = POLLIN;
            if (ev)
                c->pfd[n++] = (struct pollfd) { .fd = (int) fd, .events = ev };
        }
        if (n == 0)
            break;
        int rc = poll (c->pfd, n, 0);
        if (rc <= 0)
            break;
        /* the handlers may grow the tables (new connections): copy the
         * ready descriptors first */
        int ready[256];
        size_t nready = 0;
        for (size_t i = 0; i < n && nready < sizeof ready / sizeof *ready; i++)
            if (c->pfd[i].revents)
                ready[nready++] = c->pfd[i].fd;
        for (size_t i = 0; i < nready; i++) {
            /* as a zloop poll item would: a descriptor whose request ended
             * meanwhile (or was taken by a new one) is harmless, as with a
             * stale poll item */
            zmq_pollitem_t item = { NULL, ready[i], 0, ZMQ_POLLIN | ZMQ_POLLOUT };
            s_on_io (c->loop, &item, c);
        }
        handled += (int) nready;
    }
    return handled;
}

size_t
cn_httpc_in_flight (const cn_httpc_t *c)
{
    return c->in_flight;
}

size_t
cn_httpc_queued (const cn_httpc_t *c)
{
    return c->queued;
}
