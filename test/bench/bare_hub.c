/*
 * bare-hub: the floor the sessions hub is measured against.
 *
 *   bare-hub ADDRESS PORT [HEARTBEAT_MS]
 *
 * The least a server can do to hold agent sessions as proto/session.md
 * has them, with the same client (mockcloud): one thread, one
 * edge-triggered epoll, the WebSocket upgrade, `welcome` for every `hello`
 * (no ownership, no store, no Redis, no other thread), and an `hb` back for
 * every agent `hb` unless ours went out less than half an interval ago (the
 * hub's rule). Reads go into one shared buffer as in the hub; sends are one
 * send() per frame. No timers: mockcloud's agents beat every interval, so
 * every hb of ours is an answer (as nearly all of cnapid's are). A session
 * that misbehaves is just closed. Runs until killed (SIGINT/SIGTERM exit at
 * once). What it costs per session-second is the kernel's TCP and epoll
 * work plus the framing: docs/benchmarks.md compares cnapid with it.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cn_msg.h"
#include "cn_ws.h"

#define READ_CHUNK 65536
#define MAX_EVENTS 256
#define MAX_HEADER 8192

typedef struct {
    int fd;
    bool ws;                /* upgraded */
    uint64_t hb_seq;
    uint64_t last_beat;     /* ms */
    uint8_t *pend;          /* bytes of an incomplete request or frame */
    size_t plen, pcap;
} conn_t;

static uint8_t s_rbuf[READ_CHUNK];
static uint64_t s_now;
static uint64_t s_hb_ms = 1000;

static uint64_t
s_clock_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

static void
s_close (conn_t *c)
{
    close (c->fd);          /* also leaves the epoll */
    free (c->pend);
    free (c);
}

/* One frame, header and payload in one send(). False: drop the session. */
static bool
s_send_frame (conn_t *c, uint8_t opcode, const void *data, size_t len)
{
    uint8_t buf[256];       /* hb and welcome: well under this */
    if (len > sizeof buf - CN_WS_MAX_HEADER)
        return false;
    size_t h = cn_ws_header (buf, opcode, len);
    memcpy (buf + h, data, len);
    ssize_t n = send (c->fd, buf, h + len, MSG_NOSIGNAL);
    return n == (ssize_t) (h + len);    /* a floor: a full send buffer ends it */
}

static bool
s_on_message (conn_t *c, const uint8_t *p, size_t len)
{
    if (cn_msg_is_plain_hb (p, len)) {
        if (s_now - c->last_beat < s_hb_ms / 2)
            return true;
        uint8_t hb[CN_MSG_HB_MAX];
        size_t n = cn_msg_hb_write (hb, ++c->hb_seq, (int64_t) s_now);
        c->last_beat = s_now;
        return s_send_frame (c, CN_WS_OP_BINARY, hb, n);
    }
    cn_msg_t m;
    char err[96];
    if (cn_msg_parse (&m, p, len, err, sizeof err) != 0)
        return false;
    bool ok = true;
    if (cn_msg_is (&m, "hello")) {
        cn_msgw_t w;
        cn_msgw_init (&w, "welcome", 3);
        cn_msgw_str (&w, "instance", "bare-hub");
        cn_msgw_uint (&w, "epoch", 1);
        cn_msgw_uint (&w, "heartbeat_ms", s_hb_ms);
        char *data;
        size_t size;
        cn_msgw_take (&w, &data, &size);
        ok = s_send_frame (c, CN_WS_OP_BINARY, data, size);
        free (data);
        c->last_beat = s_now;
    }
    cn_msg_fini (&m);
    return ok;
}

/* Whole frames at buf[0..len): how many bytes they took, or -1 to close. */
static ssize_t
s_frames (conn_t *c, uint8_t *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        cn_ws_frame_t f;
        uint16_t code;
        const char *why;
        int r = cn_ws_parse (buf + off, len - off, CN_WS_MAX_MESSAGE, &f, &code, &why);
        if (r == 0)
            break;
        if (r < 0 || f.opcode == CN_WS_OP_CLOSE || !f.fin)
            return -1;
        if (f.opcode == CN_WS_OP_BINARY && !s_on_message (c, f.payload, f.len))
            return -1;
        off += f.size;
    }
    return (ssize_t) off;
}

/* The upgrade request is whole in buf[0..len] (NUL-terminated). */
static bool
s_upgrade (conn_t *c, char *req)
{
    const char *key = NULL;
    size_t klen = 0;
    for (char *line = strstr (req, "\r\n"); line && line[2] != '\r'; line = strstr (line + 2, "\r\n")) {
        char *h = line + 2;
        if (strncasecmp (h, "sec-websocket-key:", 18) == 0) {
            key = h + 18;
            while (*key == ' ')
                key++;
            klen = strcspn (key, "\r\n ");
        }
    }
    char accept[29];
    if (!key || !cn_ws_accept_key (key, klen, accept))
        return false;
    char resp[256];
    int n = snprintf (resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    c->ws = true;
    return send (c->fd, resp, (size_t) n, MSG_NOSIGNAL) == n;
}

static bool
s_keep (conn_t *c, const uint8_t *p, size_t n)
{
    if (c->plen + n + 1 > c->pcap) {
        size_t cap = c->pcap ? c->pcap : 256;
        while (cap < c->plen + n + 1)
            cap *= 2;
        uint8_t *np = realloc (c->pend, cap);
        if (!np)
            return false;
        c->pend = np;
        c->pcap = cap;
    }
    memcpy (c->pend + c->plen, p, n);
    c->plen += n;
    c->pend[c->plen] = 0;
    return true;
}

/* New bytes: false closes the session. */
static bool
s_on_bytes (conn_t *c, uint8_t *p, size_t n)
{
    if (!c->ws) {
        if (!s_keep (c, p, n) || c->plen > MAX_HEADER)
            return false;
        char *end = strstr ((char *) c->pend, "\r\n\r\n");
        if (!end)
            return true;
        size_t used = (size_t) (end + 4 - (char *) c->pend);
        *end = 0;
        if (!s_upgrade (c, (char *) c->pend))
            return false;
        c->plen -= used;
        memmove (c->pend, c->pend + used, c->plen);
        n = 0;          /* frames sent right behind the request: in pend */
    }
    if (c->plen) {          /* an incomplete frame before these bytes */
        if (n && !s_keep (c, p, n))
            return false;
        ssize_t used = s_frames (c, c->pend, c->plen);
        if (used < 0)
            return false;
        c->plen -= (size_t) used;
        memmove (c->pend, c->pend + used, c->plen);
        return true;
    }
    ssize_t used = s_frames (c, p, n);
    if (used < 0)
        return false;
    return (size_t) used == n || s_keep (c, p + used, n - (size_t) used);
}

static void
s_on_ready (conn_t *c)
{
    for (;;) {
        ssize_t n = recv (c->fd, s_rbuf, READ_CHUNK, 0);
        if (n > 0) {
            if (!s_on_bytes (c, s_rbuf, (size_t) n)) {
                s_close (c);
                return;
            }
            if (n < READ_CHUNK)
                return;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        s_close (c);        /* end of file, reset */
        return;
    }
}

static void
s_on_signal (int sig)
{
    (void) sig;
    _exit (0);
}

int
main (int argc, char **argv)
{
    if (argc < 3) {
        fprintf (stderr, "usage: bare-hub ADDRESS PORT [HEARTBEAT_MS]\n");
        return 2;
    }
    if (argc > 3)
        s_hb_ms = strtoull (argv[3], NULL, 10);
    signal (SIGINT, s_on_signal);
    signal (SIGTERM, s_on_signal);
    signal (SIGPIPE, SIG_IGN);
    int lfd = socket (AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt (lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons ((uint16_t) atoi (argv[2])) };
    if (inet_pton (AF_INET, argv[1], &sa.sin_addr) != 1
        || bind (lfd, (struct sockaddr *) &sa, sizeof sa) != 0 || listen (lfd, 4096) != 0) {
        fprintf (stderr, "bare-hub: cannot listen on %s:%s: %s\n", argv[1], argv[2], strerror (errno));
        return 1;
    }
    int ep = epoll_create1 (EPOLL_CLOEXEC);
    struct epoll_event lev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl (ep, EPOLL_CTL_ADD, lfd, &lev);
    fprintf (stderr, "bare-hub: listening on %s:%s\n", argv[1], argv[2]);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait (ep, evs, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR)
            return 1;
        s_now = s_clock_ms ();
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c) {
                s_on_ready (c);
                continue;
            }
            for (int k = 0; k < 64; k++) {     /* accept what is waiting */
                int fd = accept4 (lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    break;
                setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                conn_t *nc = calloc (1, sizeof *nc);
                if (!nc) {
                    close (fd);
                    continue;
                }
                nc->fd = fd;
                struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = nc };
                if (epoll_ctl (ep, EPOLL_CTL_ADD, fd, &ev) != 0)
                    s_close (nc);
            }
        }
    }
}
