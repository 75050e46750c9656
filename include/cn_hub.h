/*
 * cn_hub: the agent sessions of one instance (proto/session.md,
 * docs/sessions.md). The HTTP gateway's h2o thread answers the upgrade and
 * hands the raw socket over; from then on the session lives in the hub's
 * own thread ("sessions-io"), one epoll loop for all of them.
 *
 * Every session is a small struct with its own state, its socket, its two
 * timer entries and its output queue; thousands live in the one thread
 * (no thread, no zactor per agent: ARCHITECTURE.md's figures). A session
 * talks to the rest of cnapid only by messages:
 *
 *   hub -> sessions actor   one msgpack frame each (proto/hub.md) pushed with
 *                           ZMQ_DONTWAIT to CN_SESSIONS_ENDPOINT: hello,
 *                           vm_event, bye, flush, sessions
 *   sessions actor -> hub   cn_hub_cmd_t posted to the hub's mailbox
 *                           (cn_hub_post): welcome, close, snapshot, send
 *
 * The hub never blocks: the store, Redis and the writer are the sessions
 * actor's (actors/cn_sessions.c), which the hub starts and owns.
 *
 * Life cycle (new, start and destroy from the gateway's actor thread):
 *
 *   cn_hub_t *hub = cn_hub_new (cfg, live);
 *   cn_hub_start (hub, reason, sizeof reason);   // binds, starts "sessions"
 *                                                // and the hub's thread
 *   ... h2o thread: cn_hub_on_req (hub, req, uuid) for GET /agent/session
 *   ... at shutdown (any thread): cn_hub_shutdown (hub); wait while
 *       cn_hub_count (hub) > 0 (bounded); cn_hub_finish (hub)
 *   cn_hub_destroy (&hub);
 */
#ifndef CN_HUB_H
#define CN_HUB_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <h2o.h>

#include "cn_config.h"
#include "cn_liveness.h"

#define CN_SESSIONS_ENDPOINT "inproc://cnapi-sessions"
/* task_event / task_end frames for the tasks actor (proto/tasks.md): the
 * tasks actor binds a PULL here, the hub connects a PUSH; one msgpack frame
 * {type: "task_frame", sid, uuid, frame: bin} per agent frame */
#define CN_TASKS_FRAMES_ENDPOINT "inproc://cnapi-tasks-frames"

/* Commands from the sessions actor to the hub (the sessions' mailbox). */
enum {
    CN_HUB_WELCOME = 1,       /* sid owns its server at epoch: send welcome */
    CN_HUB_CLOSE,             /* send goaway (when set), then close with code */
    CN_HUB_SNAPSHOT,          /* push a "sessions" page (offset, limit) */
    CN_HUB_WAKE,              /* nothing: wakes the loop (shutdown) */
    CN_HUB_SEND,              /* send data (a msgpack message) on session sid */
    CN_HUB_ADOPT,             /* (the gateway) sess: a session whose 101 is written */
    CN_HUB_SHUTDOWN           /* (the gateway) goaway to every session */
};

typedef struct {
    h2o_multithread_message_t super;   /* first: the queue links it */
    int kind;
    uint64_t sid;
    uint64_t epoch;
    uint16_t code;            /* CLOSE: WebSocket close code */
    char reason[96];          /* CLOSE: close reason text */
    char goaway[16];          /* CLOSE: goaway reason ("" = no goaway) */
    uint64_t req;             /* SNAPSHOT: request id to echo */
    uint64_t offset, limit;   /* SNAPSHOT: page */
    char *data;               /* SEND: malloc'd message bytes (the hub frees) */
    size_t len;               /* SEND: their length */
    void *sess;               /* ADOPT: the session */
} cn_hub_cmd_t;

/* Counters the hub keeps and the sessions actor reports. */
typedef struct {
    atomic_uint_fast64_t open;         /* sessions with a socket */
    atomic_uint_fast64_t upgrades;     /* WebSocket upgrades accepted */
    atomic_uint_fast64_t bad_frames;   /* sessions closed for a protocol error */
    atomic_uint_fast64_t timeouts;     /* sessions closed for silence (4002) */
    atomic_uint_fast64_t frames_in;    /* frames received */
    atomic_uint_fast64_t hb_sent;      /* heartbeats sent */
    atomic_uint_fast64_t busy;         /* messages the actor's queue refused */
} cn_hub_stats_t;

typedef struct cn_hub cn_hub_t;

/* Allocates only (no I/O). live: the status table the sessions actor
 * keeps. */
cn_hub_t *cn_hub_new (const cn_config_t *cfg, cn_liveness_t *live);
/* Bind the PUSH to the sessions actor, start the sessions actor (which
 * loads the status table), then the hub's thread. 0, or -1 with reason. */
int cn_hub_start (cn_hub_t *hub, char *reason, size_t rlen);
/* Stop the hub's thread (if cn_hub_finish did not) and the sessions actor,
 * free every session and command left. *p NULL. */
void cn_hub_destroy (cn_hub_t **p);

/* h2o thread: GET /agent/session that is a WebSocket upgrade with a valid
 * x-server-uuid (uuid, lower case) and Sec-WebSocket-Key (key): answer 101
 * and make the session. Returns 0 (the request is handled), or -1 with *why
 * (a static string) when the key is bad: the caller answers 400. */
int cn_hub_on_req (cn_hub_t *hub, h2o_req_t *req, const char *uuid, h2o_iovec_t key,
                   const char **why);

/* Any thread: stop taking sessions; send goaway "shutdown" and close 1001
 * to every session (in the hub's thread, soon after). The sockets close as
 * their last bytes are written. */
void cn_hub_shutdown (cn_hub_t *hub);
/* Any thread: sessions in the table (0 once every socket is closed).
 * Session sockets leave h2o's loop at the upgrade, so the gateway's own
 * connection list never holds them. */
size_t cn_hub_count (cn_hub_t *hub);
/* Last: stop the hub's thread, which closes the sessions' sockets that are
 * left. */
void cn_hub_finish (cn_hub_t *hub);

/* The hub's mailbox, from any thread: the sessions actor sends commands
 * here (and the tasks actor its CN_HUB_SEND task_acks). The hub frees c
 * (and c->data). */
void cn_hub_post (cn_hub_t *hub, cn_hub_cmd_t *c);
/* This instance's boot id (drawn by cn_hub_new). */
const char *cn_hub_boot_id (const cn_hub_t *hub);

#endif
