/*
 * cn_wsclient: a WebSocket client connection (RFC 6455) on an h2o evloop,
 * framed by wslay: TCP connect, the HTTP/1.1 upgrade (Sec-WebSocket-Key and
 * the Accept check: SHA-1 + base64), binary messages, the close handshake.
 * Everything happens on the loop's thread; nothing blocks.
 *
 *   static const cn_wsc_cb_t cb = { s_on_open, s_on_message, s_on_end, s_on_rx };
 *   cn_wsc_t *ws = cn_wsc_connect (loop, &sin, "/agent/session",
 *                                  "x-server-uuid: ...\r\n", 1 << 20, &cb, arg);
 *   ... on_open: cn_wsc_send (ws, bytes, len);
 *   cn_wsc_close (ws, 1000, "bye", &linger);     // on_end (CLOSED) follows
 *
 * Life cycle: on_end is called exactly once (unless the owner aborted or
 * detached first) and the object is freed right after it returns. Inside
 * any callback the owner may send, close, detach or abort; the object stays
 * valid until the callback returns. A detached connection makes no more
 * callbacks and frees itself once its close handshake ends (or the linger
 * timeout fires).
 *
 * Memory: the socket's input buffer is given back whenever it is empty and
 * output buffers exist only while bytes wait to be written, so an idle
 * connection holds its wslay context (about 9 KiB) and little else.
 */
#ifndef CN_WSCLIENT_H
#define CN_WSCLIENT_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <h2o.h>

typedef struct cn_wsc cn_wsc_t;

typedef enum {
    CN_WSC_END_CLOSED,        /* close handshake done; code = the peer's status */
    CN_WSC_END_EOF,           /* the peer closed TCP without a close handshake */
    CN_WSC_END_ERROR,         /* socket error, reset, or close/linger timeout */
    CN_WSC_END_CONNECT,       /* TCP connect failed */
    CN_WSC_END_HANDSHAKE,     /* the upgrade was refused or wrong; code = HTTP status (0 if none) */
    CN_WSC_END_PROTOCOL       /* the peer broke RFC 6455 (code = the status we sent) */
} cn_wsc_end_t;

const char *cn_wsc_end_name (cn_wsc_end_t why);

typedef struct {
    void (*on_open) (cn_wsc_t *ws, void *arg);
    /* opcode: WSLAY_BINARY_FRAME or WSLAY_TEXT_FRAME; data valid during the call */
    void (*on_message) (cn_wsc_t *ws, int opcode, const uint8_t *data, size_t len, void *arg);
    void (*on_end) (cn_wsc_t *ws, cn_wsc_end_t why, int code, const char *detail, void *arg);
    /* bytes arrived (any frame, even partial): proof of life; may be NULL */
    void (*on_rx) (cn_wsc_t *ws, void *arg);
} cn_wsc_cb_t;

/* Start connecting to sin and upgrading at path; extra_headers (may be NULL)
 * are complete header lines ("Name: value\r\n"...). Messages over max_msg
 * bytes make the connection close with 1009. NULL when the socket cannot
 * even be created (e.g. out of descriptors; no callback then). */
cn_wsc_t *cn_wsc_connect (h2o_evloop_t *loop, const struct sockaddr_in *sin, const char *path,
                          const char *extra_headers, size_t max_msg,
                          const cn_wsc_cb_t *cb, void *arg);

/* Queue one binary message (copied). 0, or -1 when not open. */
int cn_wsc_send (cn_wsc_t *ws, const void *data, size_t len);
/* Start the close handshake with code/reason. When linger is not NULL the
 * handshake must end within linger's timeout, else the socket is dropped
 * (on_end ERROR). detach: no callback from now on (not even on_end); the
 * object frees itself when the handshake ends. Before the upgrade is done
 * the socket is simply dropped (on_end ERROR unless detached). */
void cn_wsc_close (cn_wsc_t *ws, uint16_t code, const char *reason, h2o_timeout_t *linger,
                   bool detach);
/* Drop the socket now; no callbacks; freed. */
void cn_wsc_abort (cn_wsc_t *ws);
bool cn_wsc_is_open (const cn_wsc_t *ws);

/* Connections alive on the calling thread (detached ones included). */
size_t cn_wsc_live (void);
/* Drop every connection of the calling thread (loop teardown); no callbacks. */
void cn_wsc_abort_all (void);

/* Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64 (SHA-1 (key + GUID)),
 * 28 characters + NUL. */
void cn_wsc_accept_key (const char *key, char out[29]);

#endif
