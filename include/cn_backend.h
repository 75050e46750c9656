/*
 * cn_backend: a read/write worker behind the HTTP gateway.
 *
 *   cn_backend_args_t a = { cfg, &receiver, 0 };      // outlives the actor
 *   zactor_t *b = zactor_new (cn_backend_actor, &a);
 *   zstr_send (b, "START");  -> "OK" | "ERROR" <reason>
 *
 * The gateway's h2o thread binds a PUSH at CN_BACKEND_ENDPOINT; every backend
 * connects a PULL there (ZeroMQ round-robins requests between them). One
 * request is one msgpack frame (proto/backend.md). A backend owns its own
 * store connection (cn_moray_t, reads), its own cache connection (cn_redis_t)
 * and a cn_writer_client socket to the state writer shards (proto/writer.md) for
 * writes; it may block on those (bounded by their timeouts), which is why it
 * runs apart from the h2o thread.
 *
 * Answers go back into the h2o event loop through h2o's multithread queue:
 * the backend mallocs a cn_backend_reply_t and passes it to
 * h2o_multithread_send_message (args->receiver). From then on the gateway owns
 * it and releases it with cn_backend_reply_free. That queue is the one way to
 * wake h2o's loop from another thread (it writes to a pipe the loop polls).
 *
 * Pipe: $TERM, START, STATUS (proto/status.md, actor "backend").
 */
#ifndef CN_BACKEND_H
#define CN_BACKEND_H

#include <czmq.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include <h2o.h>

#include "cn_config.h"
#include "cn_listcache.h"
#include "cn_liveness.h"
#include "cn_server.h"

typedef struct {
    const cn_config_t *cfg;
    h2o_multithread_receiver_t *receiver;   /* the gateway's reply queue */
    int index;                              /* 0..backend_threads-1, for logs */
    const cn_liveness_t *live;              /* the status table (may be NULL) */
    cn_listcache_t *lcache;                 /* the list views, shared by the
                                               backends (NULL: none) */
    /* services only (actors/cn_gateway.c s_services): the session hub's
     * mailbox (include/cn_hub.h, cn_hub_post, CN_HUB_SEND) and this
     * instance's boot id */
    struct cn_hub *hub;
    const char *boot_id;
} cn_backend_args_t;

/* One answer to one gateway request. */
typedef struct {
    h2o_multithread_message_t super;   /* first: the queue links it */
    uint64_t id;                       /* the request's id (proto/backend.md) */
    int status;                        /* HTTP status */
    const char *ctype;                 /* static string; NULL when no body */
    char *body;                        /* malloc'd, len bytes; may be NULL */
    size_t len;
    /* Near-cache fill: only for "server_get" requests with fill=true that
     * answered 200. view is the full server view as JSON text without its
     * "status" and "last_heartbeat" members; status_in holds the record's
     * inputs to them (include/cn_server.h). */
    bool fill;
    char uuid[37];
    int64_t version;
    char *view;
    size_t view_len;
    cn_status_inputs_t status_in;
} cn_backend_reply_t;

/* A zeroed reply for id (abort on out of memory). */
cn_backend_reply_t *cn_backend_reply_new (uint64_t id);
/* Free a reply and everything it holds; *p becomes NULL. */
void cn_backend_reply_free (cn_backend_reply_t **p);

/* JSON encoding for API bodies: compact, and doubles with 16 significant
 * digits so that 0.15 reads 0.15 (as JavaScript prints it), not
 * 0.14999999999999999. */
#define CN_BACKEND_JSON_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION (16))

/* Write {"status":"<status>","last_heartbeat":<ISO string or null>,<view
 * without its leading '{'> into out (room for view_len + strlen (status) +
 * 64 bytes); last_heartbeat_ms <= 0 writes null. view is a JSON object's
 * text starting with '{' and holding neither member. The backend builds
 * GET /servers/:uuid bodies with this and the gateway's near cache sends
 * cn_backend_view_head's part and then the view, so both answer the same
 * bytes. Returns the length written (NUL-terminated). */
size_t cn_backend_splice_view (char *out, const char *status, int64_t last_heartbeat_ms,
                               const char *view, size_t view_len);

/* The first part of that body: everything before view + 1 (the status,
 * last_heartbeat and a ',' when the view has members, else '}'), into out
 * (room for strlen (status) + 64 bytes). The rest is the view's text from
 * its second byte, which the near cache sends from its own copy. */
#define CN_BACKEND_VIEW_HEAD_MAX 64
size_t cn_backend_view_head (char *out, const char *status, int64_t last_heartbeat_ms,
                             size_t view_len);


void cn_backend_actor (zsock_t *pipe, void *args);

#endif
