/*
 * cn_wsclient: see include/cn_wsclient.h.
 *
 * Theory of operation
 *
 *   CONNECTING  h2o_socket_connect; on success the upgrade request is written
 *   UPGRADING   bytes are collected in the socket's input buffer until the
 *               response header ends (at most 8 KiB); 101 with the right
 *               Upgrade, Connection and Sec-WebSocket-Accept opens the
 *               connection, anything else ends it (HANDSHAKE). Bytes after
 *               the header are the first WebSocket bytes.
 *   OPEN        wslay's recv callback reads straight from the socket's input
 *               buffer; its send callback appends to `out`. After every
 *               event the connection flushes: `out` becomes the buffer being
 *               written (h2o allows one write at a time) and a new `out`
 *               starts on the next send.
 *   DONE        the socket is closed; the object is freed when no callback
 *               of ours is on the stack (`depth`).
 *
 * The connection is finished when wslay wants neither to read nor to write
 * (both close frames went) and nothing is being written.
 */
#include "cn_wsclient.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <wslay/wslay.h>

#define S_MAX_RESPONSE_HEADER 8192
static const char s_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

enum { S_CONNECTING, S_UPGRADING, S_OPEN, S_DONE };

struct cn_wsc {
    struct cn_wsc *prev, *next;  /* every connection of this thread */
    h2o_socket_t *sock;
    wslay_event_context_ptr ctx;
    const cn_wsc_cb_t *cb;
    void *arg;
    int state;
    int depth;
    bool detached;
    bool dead;                  /* ended: free at depth 0 */
    bool close_started;
    uint16_t close_code_sent;
    uint16_t proto_code;        /* wslay closed because the peer broke the protocol */
    size_t max_msg;
    char accept[29];
    uint8_t *out;
    size_t out_len, out_cap;
    uint8_t *wbuf;              /* being written */
    bool writing;
    h2o_timeout_entry_t linger;
};

static __thread size_t s_live;
static __thread cn_wsc_t *s_all;
static __thread uint64_t s_rng[2];

size_t
cn_wsc_live (void)
{
    return s_live;
}

const char *
cn_wsc_end_name (cn_wsc_end_t why)
{
    switch (why) {
    case CN_WSC_END_CLOSED: return "closed";
    case CN_WSC_END_EOF: return "eof";
    case CN_WSC_END_ERROR: return "error";
    case CN_WSC_END_CONNECT: return "connect";
    case CN_WSC_END_HANDSHAKE: return "handshake";
    case CN_WSC_END_PROTOCOL: return "protocol";
    }
    return "unknown";
}

/* xorshift128+: masks need to be unpredictable to intermediaries, not secret. */
static uint64_t
s_rand (void)
{
    if (!s_rng[0] && !s_rng[1]) {
        if (getrandom (s_rng, sizeof s_rng, 0) != (ssize_t) sizeof s_rng || (!s_rng[0] && !s_rng[1])) {
            s_rng[0] = 0x9e3779b97f4a7c15ULL ^ (uint64_t) (uintptr_t) &s_rng;
            s_rng[1] = 0xbf58476d1ce4e5b9ULL;
        }
    }
    uint64_t x = s_rng[0], y = s_rng[1];
    s_rng[0] = y;
    x ^= x << 23;
    s_rng[1] = x ^ y ^ (x >> 17) ^ (y >> 26);
    return s_rng[1] + y;
}

void
cn_wsc_accept_key (const char *key, char out[29])
{
    unsigned char md[SHA_DIGEST_LENGTH];
    size_t kl = strlen (key);
    char buf[256];
    if (kl > sizeof buf - sizeof s_guid)
        kl = sizeof buf - sizeof s_guid;
    memcpy (buf, key, kl);
    memcpy (buf + kl, s_guid, sizeof s_guid - 1);
    SHA1 ((const unsigned char *) buf, kl + sizeof s_guid - 1, md);
    EVP_EncodeBlock ((unsigned char *) out, md, SHA_DIGEST_LENGTH);
    out[28] = '\0';
}

/* ---- life cycle ---- */

static void
s_free (cn_wsc_t *ws)
{
    if (h2o_timeout_is_linked (&ws->linger))
        h2o_timeout_unlink (&ws->linger);
    if (ws->ctx)
        wslay_event_context_free (ws->ctx);
    free (ws->out);
    free (ws->wbuf);
    if (ws->prev)
        ws->prev->next = ws->next;
    else
        s_all = ws->next;
    if (ws->next)
        ws->next->prev = ws->prev;
    free (ws);
    s_live--;
}

/* Leave a callback section; free if the connection ended meanwhile. */
static void
s_leave (cn_wsc_t *ws)
{
    if (--ws->depth == 0 && ws->dead)
        s_free (ws);
}

/* End the connection: close the socket, report once (unless detached). */
static void
s_end (cn_wsc_t *ws, cn_wsc_end_t why, int code, const char *detail)
{
    if (ws->state == S_DONE)
        return;
    ws->state = S_DONE;
    if (h2o_timeout_is_linked (&ws->linger))
        h2o_timeout_unlink (&ws->linger);
    if (ws->sock) {
        h2o_socket_close (ws->sock);
        ws->sock = NULL;
    }
    ws->depth++;
    if (!ws->detached && ws->cb->on_end)
        ws->cb->on_end (ws, why, code, detail, ws->arg);
    ws->dead = true;
    s_leave (ws);
}

/* Give the socket's input buffer back when it is empty (an idle session
 * would otherwise hold 8 KiB for nothing). */
static void
s_release_input (h2o_socket_t *sock)
{
    if (sock->input->size == 0 && sock->input->capacity != 0) {
        h2o_buffer_dispose (&sock->input);
        h2o_buffer_init (&sock->input, &h2o_socket_buffer_prototype);
    }
}

/* ---- writing ---- */

static void s_flush (cn_wsc_t *ws);

static bool
s_append (cn_wsc_t *ws, const void *data, size_t len)
{
    if (ws->out_len + len > ws->out_cap) {
        size_t cap = ws->out_cap ? ws->out_cap : 256;
        while (cap < ws->out_len + len)
            cap *= 2;
        uint8_t *p = realloc (ws->out, cap);
        if (!p)
            return false;
        ws->out = p;
        ws->out_cap = cap;
    }
    memcpy (ws->out + ws->out_len, data, len);
    ws->out_len += len;
    return true;
}

static void
s_check_done (cn_wsc_t *ws)
{
    if (ws->state != S_OPEN || ws->writing || ws->out_len)
        return;
    if (ws->proto_code) {
        /* our close frame is out; do not wait for a broken peer */
        s_end (ws, CN_WSC_END_PROTOCOL, ws->proto_code, "peer protocol error");
        return;
    }
    if (!wslay_event_want_read (ws->ctx) && !wslay_event_want_write (ws->ctx)) {
        int code = wslay_event_get_close_received (ws->ctx)
            ? wslay_event_get_status_code_received (ws->ctx) : 0;
        if (!wslay_event_get_close_received (ws->ctx))
            s_end (ws, CN_WSC_END_ERROR, 0, "no close from the peer");
        else
            s_end (ws, CN_WSC_END_CLOSED, code, NULL);
    }
}

static void
s_on_written (h2o_socket_t *sock, const char *err)
{
    cn_wsc_t *ws = sock->data;
    ws->depth++;
    free (ws->wbuf);
    ws->wbuf = NULL;
    ws->writing = false;
    if (err)
        s_end (ws, CN_WSC_END_ERROR, 0, err);
    else if (ws->state == S_OPEN || ws->state == S_UPGRADING) {
        s_flush (ws);
        s_check_done (ws);
    }
    s_leave (ws);
}

/* Hand what is in `out` to the socket if no write is in progress. */
static void
s_write_out (cn_wsc_t *ws)
{
    if (ws->writing || !ws->out_len || !ws->sock)
        return;
    ws->wbuf = ws->out;
    h2o_iovec_t buf = h2o_iovec_init (ws->wbuf, ws->out_len);
    ws->out = NULL;
    ws->out_len = ws->out_cap = 0;
    ws->writing = true;
    h2o_socket_write (ws->sock, &buf, 1, s_on_written);
}

static void
s_flush (cn_wsc_t *ws)
{
    if (ws->state == S_OPEN && wslay_event_want_write (ws->ctx)) {
        int rc = wslay_event_send (ws->ctx);
        if (rc != 0) {
            s_end (ws, CN_WSC_END_ERROR, 0, "wslay send failed");
            return;
        }
    }
    s_write_out (ws);
}

/* ---- wslay callbacks ---- */

static ssize_t
s_wslay_recv (wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *user)
{
    cn_wsc_t *ws = user;
    h2o_buffer_t *in = ws->sock ? ws->sock->input : NULL;
    if (!in || in->size == 0) {
        wslay_event_set_error (ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = in->size < len ? in->size : len;
    memcpy (buf, in->bytes, n);
    h2o_buffer_consume (&ws->sock->input, n);
    return (ssize_t) n;
}

static ssize_t
s_wslay_send (wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
              void *user)
{
    cn_wsc_t *ws = user;
    if (!s_append (ws, data, len)) {
        wslay_event_set_error (ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t) len;
}

static int
s_wslay_genmask (wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
    while (len) {
        uint64_t r = s_rand ();
        size_t n = len < sizeof r ? len : sizeof r;
        memcpy (buf, &r, n);
        buf += n;
        len -= n;
    }
    return 0;
}

static void
s_wslay_msg (wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
             void *user)
{
    cn_wsc_t *ws = user;
    if (ws->detached || ws->state != S_OPEN)
        return;
    if (a->opcode == WSLAY_BINARY_FRAME || a->opcode == WSLAY_TEXT_FRAME)
        ws->cb->on_message (ws, a->opcode, a->msg, a->msg_length, ws->arg);
}

static const struct wslay_event_callbacks s_wslay_cbs = {
    .recv_callback = s_wslay_recv,
    .send_callback = s_wslay_send,
    .genmask_callback = s_wslay_genmask,
    .on_msg_recv_callback = s_wslay_msg,
};

/* ---- reading ---- */

/* Case-insensitive: does the comma-separated header value contain token? */
static bool
s_has_token (const char *v, size_t vl, const char *token)
{
    size_t tl = strlen (token);
    size_t i = 0;
    while (i < vl) {
        while (i < vl && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < vl && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tl && strncasecmp (v + s, token, tl) == 0)
            return true;
    }
    return false;
}

/* Parse the upgrade response in the input buffer. 1 = done and good (header
 * consumed), 0 = need more, -1 = refused (*code, detail filled). */
static int
s_parse_upgrade (cn_wsc_t *ws, int *code, char *detail, size_t dlen)
{
    h2o_buffer_t *in = ws->sock->input;
    const char *p = in->bytes;
    size_t n = in->size;
    const char *end = NULL;
    for (size_t i = 3; i < n; i++)
        if (p[i] == '\n' && p[i - 1] == '\r' && p[i - 2] == '\n' && p[i - 3] == '\r') {
            end = p + i + 1;
            break;
        }
    if (!end) {
        if (n > S_MAX_RESPONSE_HEADER) {
            *code = 0;
            snprintf (detail, dlen, "response header too large");
            return -1;
        }
        return 0;
    }
    *code = 0;
    if (end - p < 12 || strncmp (p, "HTTP/1.", 7) != 0 || p[8] != ' ') {
        snprintf (detail, dlen, "not an HTTP response");
        return -1;
    }
    int status = atoi (p + 9);
    *code = status;
    const char *eol = memchr (p, '\r', (size_t) (end - p));
    if (status != 101) {
        snprintf (detail, dlen, "%.*s", (int) (eol - p - 9 < 120 ? eol - p - 9 : 120), p + 9);
        return -1;
    }
    bool up = false, conn = false, acc = false;
    const char *line = eol + 2;
    while (line < end - 2) {
        const char *le = memchr (line, '\r', (size_t) (end - line));
        if (!le)
            break;
        const char *colon = memchr (line, ':', (size_t) (le - line));
        if (colon) {
            size_t nl = (size_t) (colon - line);
            const char *v = colon + 1;
            while (v < le && (*v == ' ' || *v == '\t'))
                v++;
            size_t vl = (size_t) (le - v);
            while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
                vl--;
            if (nl == 7 && strncasecmp (line, "upgrade", 7) == 0)
                up = s_has_token (v, vl, "websocket");
            else if (nl == 10 && strncasecmp (line, "connection", 10) == 0)
                conn = s_has_token (v, vl, "upgrade");
            else if (nl == 20 && strncasecmp (line, "sec-websocket-accept", 20) == 0)
                acc = vl == 28 && memcmp (v, ws->accept, 28) == 0;
        }
        line = le + 2;
    }
    if (!up || !conn || !acc) {
        snprintf (detail, dlen, "bad upgrade response (%s)",
                  !up ? "Upgrade" : !conn ? "Connection" : "Sec-WebSocket-Accept");
        return -1;
    }
    h2o_buffer_consume (&ws->sock->input, (size_t) (end - p));
    return 1;
}

static void
s_on_read (h2o_socket_t *sock, const char *err)
{
    cn_wsc_t *ws = sock->data;
    ws->depth++;
    if (err) {
        bool eof = err == h2o_socket_error_closed;
        if (ws->state == S_UPGRADING)
            s_end (ws, CN_WSC_END_HANDSHAKE, 0, eof ? "closed during the upgrade" : err);
        else
            s_end (ws, eof ? CN_WSC_END_EOF : CN_WSC_END_ERROR, 0, err);
        s_leave (ws);
        return;
    }
    if (ws->state == S_UPGRADING) {
        int code;
        char detail[160];
        int rc = s_parse_upgrade (ws, &code, detail, sizeof detail);
        if (rc < 0)
            s_end (ws, CN_WSC_END_HANDSHAKE, code, detail);
        else if (rc > 0) {
            ws->state = S_OPEN;
            if (!ws->detached && ws->cb->on_open)
                ws->cb->on_open (ws, ws->arg);
        }
    }
    if (ws->state == S_OPEN && ws->sock && ws->sock->input->size) {
        if (!ws->detached && ws->cb->on_rx)
            ws->cb->on_rx (ws, ws->arg);
        if (ws->state == S_OPEN && wslay_event_want_read (ws->ctx)) {
            if (wslay_event_recv (ws->ctx) != 0)
                s_end (ws, CN_WSC_END_ERROR, 0, "wslay receive failed");
        }
        else if (ws->state == S_OPEN)
            h2o_buffer_consume (&ws->sock->input, ws->sock->input->size);  /* after close: ignored */
        if (ws->state == S_OPEN) {
            s_flush (ws);
            /* wslay closes by itself on a protocol error (1002, bad UTF-8
             * 1007) or an oversized message (1009): the peer's fault. */
            if (ws->state == S_OPEN && !ws->close_started && !ws->proto_code
                && wslay_event_get_close_sent (ws->ctx)
                && !wslay_event_get_close_received (ws->ctx)) {
                ws->proto_code = wslay_event_get_status_code_sent (ws->ctx);
                if (!ws->proto_code)
                    ws->proto_code = 1002;
            }
            s_check_done (ws);
        }
    }
    if (ws->sock)
        s_release_input (ws->sock);
    s_leave (ws);
}

static void
s_on_connect (h2o_socket_t *sock, const char *err)
{
    cn_wsc_t *ws = sock->data;
    ws->depth++;
    if (err)
        s_end (ws, CN_WSC_END_CONNECT, 0, err);
    else {
        ws->state = S_UPGRADING;
        s_write_out (ws);       /* the upgrade request, prepared at connect */
        h2o_socket_read_start (sock, s_on_read);
    }
    s_leave (ws);
}

static void
s_on_linger (h2o_timeout_entry_t *entry)
{
    cn_wsc_t *ws = H2O_STRUCT_FROM_MEMBER (cn_wsc_t, linger, entry);
    ws->depth++;
    s_end (ws, CN_WSC_END_ERROR, 0, "close handshake timed out");
    s_leave (ws);
}

/* ---- API ---- */

cn_wsc_t *
cn_wsc_connect (h2o_evloop_t *loop, const struct sockaddr_in *sin, const char *path,
                const char *extra_headers, size_t max_msg, const cn_wsc_cb_t *cb, void *arg)
{
    cn_wsc_t *ws = calloc (1, sizeof *ws);
    if (!ws)
        abort ();
    ws->cb = cb;
    ws->arg = arg;
    ws->max_msg = max_msg;
    ws->linger.cb = s_on_linger;
    s_live++;
    ws->next = s_all;
    if (s_all)
        s_all->prev = ws;
    s_all = ws;
    if (wslay_event_context_client_init (&ws->ctx, &s_wslay_cbs, ws) != 0) {
        ws->ctx = NULL;
        s_free (ws);
        return NULL;
    }
    wslay_event_config_set_max_recv_msg_length (ws->ctx, max_msg);

    unsigned char nonce[16];
    uint64_t r1 = s_rand (), r2 = s_rand ();
    memcpy (nonce, &r1, 8);
    memcpy (nonce + 8, &r2, 8);
    char key[25];
    EVP_EncodeBlock ((unsigned char *) key, nonce, 16);
    key[24] = '\0';
    cn_wsc_accept_key (key, ws->accept);

    char host[INET_ADDRSTRLEN];
    inet_ntop (AF_INET, &sin->sin_addr, host, sizeof host);
    char req[1024];
    int n = snprintf (req, sizeof req,
                      "GET %s HTTP/1.1\r\nHost: %s:%u\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                      "Sec-WebSocket-Version: 13\r\n",
                      path, host, (unsigned) ntohs (sin->sin_port), key);
    if (n < 0 || (size_t) n >= sizeof req || !s_append (ws, req, (size_t) n)
        || (extra_headers && !s_append (ws, extra_headers, strlen (extra_headers)))
        || !s_append (ws, "\r\n", 2)) {
        s_free (ws);
        return NULL;
    }
    ws->sock = h2o_socket_connect (loop, (struct sockaddr *) sin, sizeof *sin, s_on_connect);
    if (!ws->sock) {
        s_free (ws);
        return NULL;
    }
    ws->sock->data = ws;
    ws->state = S_CONNECTING;
    return ws;
}

bool
cn_wsc_is_open (const cn_wsc_t *ws)
{
    return ws->state == S_OPEN && !ws->close_started;
}

int
cn_wsc_send (cn_wsc_t *ws, const void *data, size_t len)
{
    if (ws->state != S_OPEN || ws->close_started)
        return -1;
    struct wslay_event_msg m = { .opcode = WSLAY_BINARY_FRAME, .msg = data, .msg_length = len };
    if (wslay_event_queue_msg (ws->ctx, &m) != 0)
        return -1;
    if (ws->depth == 0) {
        ws->depth++;
        s_flush (ws);
        s_leave (ws);
    }
    else
        s_flush (ws);
    return 0;
}

void
cn_wsc_close (cn_wsc_t *ws, uint16_t code, const char *reason, h2o_timeout_t *linger,
              bool detach)
{
    if (ws->state == S_DONE)
        return;
    ws->depth++;
    if (detach)
        ws->detached = true;
    if (ws->state != S_OPEN)
        s_end (ws, CN_WSC_END_ERROR, 0, "closed before the upgrade");
    else if (!ws->close_started) {
        ws->close_started = true;
        ws->close_code_sent = code;
        const char *r = reason ? reason : "";
        size_t rl = strlen (r);
        if (rl > 123)
            rl = 123;
        wslay_event_queue_close (ws->ctx, code, (const uint8_t *) r, rl);
        if (linger && !h2o_timeout_is_linked (&ws->linger))
            h2o_timeout_link (h2o_socket_get_loop (ws->sock), linger, &ws->linger);
        s_flush (ws);
        s_check_done (ws);
    }
    else if (detach && !linger && !h2o_timeout_is_linked (&ws->linger))
        s_end (ws, CN_WSC_END_ERROR, 0, "detached");
    s_leave (ws);
}

void
cn_wsc_abort (cn_wsc_t *ws)
{
    ws->detached = true;
    ws->depth++;
    s_end (ws, CN_WSC_END_ERROR, 0, "aborted");
    s_leave (ws);
}

void
cn_wsc_abort_all (void)
{
    /* s_end frees each (depth 0), which unlinks it from the list */
    for (int guard = 0; s_all && guard < 10000000; guard++) {
        cn_wsc_t *ws = s_all;
        if (ws->depth) {
            abort ();           /* never called from inside a callback */
        }
        if (ws->state == S_DONE) {
            s_free (ws);        /* ended, waiting for depth 0: cannot happen at depth 0 */
            continue;
        }
        cn_wsc_abort (ws);
    }
}
