/*
 * cn_httpc: a small non-blocking HTTP/1.1 client on a zloop (the tasks
 * actor's way to its agents, proto/tasks.md "Dispatch").
 *
 *   cn_httpc_t *c = cn_httpc_new (loop, 8, 10000);   // per host, timeout
 *   cn_httpc_request (c, "10.0.0.5", 5309, "POST", "/tasks",
 *                     "x-server-uuid: ...\r\n", body, len, s_on_done, arg);
 *   ... s_on_done (const cn_httpc_res_t *res, void *arg) runs later, once
 *   cn_httpc_destroy (&c);                            // no more callbacks
 *
 * Keep-alive connections per ip:port (an idle one carries the next request;
 * a request that finds it closed by the peer before any answer is sent again
 * once on a new connection, so requests must be safe to repeat), IPv4 addresses
 * only (admin_ip is an address, never a name: no resolver, nothing
 * blocks). At most per_host requests are in flight per ip:port; more wait
 * in that host's queue (in order). Each request must be answered within
 * timeout_ms from the moment its connection starts (connect, write and the
 * whole response), else it ends with err "timeout".
 *
 * Callbacks are never made from inside cn_httpc_request: even a request
 * that fails at once (a bad address) is reported from the loop. The
 * callback may start new requests. The client's sockets are zloop pollers
 * whose handler looks the connection up by descriptor, so a connection
 * ended during a loop pass can never be reached through a stale poll item.
 */
#ifndef CN_HTTPC_H
#define CN_HTTPC_H

#include <czmq.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_HTTPC_MAX_RESPONSE (8 * 1024 * 1024)
#define CN_HTTPC_QUEUE_MAX 100000   /* per host */

typedef struct {
    int status;               /* HTTP status; 0 when there is no response */
    const char *err;          /* NULL with a response; else a static string:
                                 "connect", "timeout", "closed", "bad response",
                                 "bad address", "queue full", "too large" */
    const char *body;         /* the (de-chunked) body; valid during the call */
    size_t len;
} cn_httpc_res_t;

typedef void (cn_httpc_cb) (const cn_httpc_res_t *res, void *arg);

typedef struct cn_httpc cn_httpc_t;

/* Allocates and starts a 50 ms timer on loop (for timeouts and deferred
 * reports). per_host >= 1, timeout_ms >= 1. */
cn_httpc_t *cn_httpc_new (zloop_t *loop, int per_host, int timeout_ms);
/* Close every connection, drop every queued request (no callbacks), end the
 * timer. *p becomes NULL. */
void cn_httpc_destroy (cn_httpc_t **p);

/* Queue one request. headers: complete lines ("Name: value\r\n"...) or
 * NULL; Host, Content-Length and Connection are added. body is copied (may
 * be NULL). cb (not NULL) is called exactly once, later, unless the client
 * is destroyed first. */
void cn_httpc_request (cn_httpc_t *c, const char *ip, int port, const char *method,
                       const char *path, const char *headers, const char *body, size_t len,
                       cn_httpc_cb *cb, void *arg);

/* Service the client's sockets now, without waiting for the loop: poll
 * them (no wait) and handle what is ready (sends, answers, callbacks), up
 * to rounds times while something was ready. For an owner whose loop pass
 * does long work (store writes): zloop handles one poller event per pass
 * when the poll set changes (every request changes it), so the owner calls
 * this between its batches. Returns the number of events handled. Not from
 * inside a callback of this client. */
int cn_httpc_pump (cn_httpc_t *c, int rounds);

/* Requests with a connection, and waiting in a queue. */
size_t cn_httpc_in_flight (const cn_httpc_t *c);
size_t cn_httpc_queued (const cn_httpc_t *c);

/* Parse an HTTP/1.1 response held in buf[0..len) (pure; exposed for the
 * unit tests). eof: the peer closed after these bytes. Returns 1 when
 * complete (*status set; *body / *blen the body, malloc'd when de-chunked:
 * then *owned true and the caller frees *body), 0 when more bytes are
 * needed, -1 when the bytes are not an HTTP response. */
int cn_httpc_parse (const char *buf, size_t len, bool eof, int *status, const char **body,
                    size_t *blen, bool *owned);

#endif
