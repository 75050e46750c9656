/*
 * cn_tasks: the tasks service (include/cn_tasks.h, proto/tasks.md).
 *
 * Theory of operation
 *
 * Creating a task (vm_create, vm_action, vm_destroy, sysinfo_refresh): the
 * request is checked (body, server uuid, VM uuid, payload), the server
 * record read (404), the status table asked whether the server has a live
 * session anywhere (409 ServerNotRunning), then the task record is inserted
 * ("must not exist") and only after that commit does the client get its
 * 200 {id}: persist, then reply. Group commit: the creations taken from
 * the gateway in one loop pass (at most PASS_MAX; each server read once a
 * pass) are inserted in one transaction, and each is answered after that
 * one commit (a failed commit answers each 503/500). The POST to the
 * agent follows on the non-blocking HTTP client (at most tasks.per_agent
 * in flight per agent, each bounded by tasks.agent_timeout_ms). A 202 is
 * counted; the record says "dispatched" once the agent's first frame about
 * the task is written (wherever its session is); anything else ends it
 * "failure" with AgentUnreachable,
 * AgentPaused or AgentRefused.
 *
 * Results never travel in that HTTP request: the agent runs the task and
 * sends task_event / task_end over its session, to whichever instance holds
 * it. The hub forwards them here. The frames taken in one loop pass (at
 * most PASS_MAX) are applied together: their records locked in one
 * statement (key order, so two batches anywhere cannot deadlock), every
 * frame applied in memory in arrival order (idempotent by seq, an ended
 * task never changes), each changed record written once, one commit; only
 * after it (or when the record already covers the frame, or there is no
 * such task) is task_ack sent back through the hub. A batch that fails
 * for the store is retried every second for a while; the agent also sends
 * unacknowledged frames again after every welcome.
 *
 * Every write that ends a task publishes "<id> <status>" on cnapi:tasks.
 * Waits (task_wait) live in memory keyed by task id: a message on the
 * channel for a waited id triggers a store read, and the waiters are
 * answered only with what the store says (the message alone proves
 * nothing). While the subscription is down the waited ids are read every
 * second (and every 5 s anyway, against a lost publish); at its deadline a
 * wait is answered with the record as it is.
 *
 * The sweep (every tasks.sweep_ms, on every instance, no leader): active
 * tasks whose dispatching instance incarnation is dead, or older than
 * tasks.max_age_s, are checked with the agent (GET /tasks/:id): ended ->
 * write the end; running -> leave it; 404 -> DispatchLost; unreachable past
 * max_age_s -> AgentUnreachable. All writes are conditional, so sweepers
 * and late agent results cannot both end a task.
 */
#include "cn_tasks.h"

#include <inttypes.h>
#include <string.h>

#include "cn_actor.h"
#include "cn_hub.h"
#include "cn_httpc.h"
#include "cn_liveness.h"
#include "cn_log.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_params.h"
#include "cn_redis.h"
#include "cn_redis_sub.h"
#include "cn_server.h"
#include "cn_svc.h"
#include "cn_util.h"

#define COMPONENT "tasks"
#define TICK_MS 100
/* Group commit (issue 4): the requests taken from the gateway in one loop
 * pass (at most PASS_MAX) have their task records inserted in one
 * transaction, answered after its commit; the agent frames taken in one
 * pass (at most PASS_MAX) are applied under one lock of their records and
 * written in one transaction, acked after its commit. Then the loop goes
 * back to its sockets (the dispatches). */
#define PASS_MAX 500
#define CAS_ATTEMPTS 8
#define POLL_DOWN_MS 1000           /* waits: store reads while the channel is down */
#define POLL_SAFETY_MS 5000         /* ... and this often anyway */
#define FRAME_RETRY_MS 1000
#define FRAME_RETRY_MAX 120
#define FRAME_RETRY_QUEUE 100000
#define SWEEP_BATCH 1000
#define CHECKS_MAX 1000             /* sweep checks in flight */
/* A server's agent address (admin IP, agent port) is read from the store
 * at most once per SRV_TTL_MS per instance: it changes only with a new
 * sysinfo, and the read cost a store round trip and the parse of a whole
 * record per pass (issue 4 benchmarks). Whether the server is running is
 * still asked of the status table on every request; a server that is not
 * found is never remembered. */
#define SRV_TTL_MS 1000
#define SRV_ADDR_MAX 100000

enum { H_DISPATCH, H_LOAD, H_CHECK };

typedef struct self self_t;

/* One agent request in flight (the HTTP client's callback argument). */
typedef struct hctx {
    struct hctx *prev, *next;
    self_t *self;
    int kind;
    char id[37];                /* task id (DISPATCH, CHECK) */
    char uuid[37];              /* server uuid */
    char vm[37];                /* LOAD */
    uint64_t req;               /* LOAD: the gateway request */
    char req_id[64];
    char ip[64];
    int port;
    int64_t created_ms;         /* CHECK */
} hctx_t;

typedef struct {
    uint64_t req;
    int64_t deadline_ms;
    char req_id[64];
} waiter_t;

/* An agent frame waiting to be applied (now or on a retry). */
typedef struct {
    uint64_t sid;
    char uuid[37];
    zframe_t *frame;
    int attempts;
    int64_t next_ms;
} fretry_t;

/* A task creation checked and waiting for the pass's commit. */
typedef struct {
    uint64_t req;
    char req_id[64];
    char tid[37];
    char uuid[37];
    char vm[37];
    const char *task;           /* static */
    bool create;
    json_t *agent_params;
    char *text;                 /* the record */
    char ip[64];
    int port;
} pcreate_t;

/* A server as the requests of one pass see it: an address, or the error
 * to answer (status != 0). */
typedef struct {
    int status;
    const char *code;
    char msg[256];
    char ip[64];
    int port;
    int64_t read_ms;            /* when it was read from the store */
} srv_t;

struct self {
    const cn_config_t *cfg;
    cn_backend_args_t *args;
    zsock_t *pipe;
    zsock_t *pull;              /* gateway requests */
    zsock_t *fsock;             /* task frames from the hub */
    zsock_t *ctl;
    zloop_t *loop;
    bool started;
    bool bucket_ready;
    cn_moray_t *moray;
    cn_redis_t *redis;
    cn_redis_sub_t *sub;
    cn_httpc_t *http;
    hctx_t hctx;                /* list anchor of requests in flight */
    zhashx_t *waits;            /* task id -> zlistx_t of waiter_t */
    size_t nwaiters;
    zhashx_t *checking;         /* task ids with a sweep check in flight */
    zlistx_t *retry;            /* fretry_t */
    pcreate_t *pc;              /* creations of this pass (PASS_MAX) */
    size_t npc;
    zhashx_t *srv;              /* server uuid -> srv_t, for one pass */
    zhashx_t *addr;             /* server uuid -> srv_t: agent addresses read
                                 * within SRV_TTL_MS (found servers only) */
    uint64_t addr_hits;
    int64_t next_poll_ms, next_safety_ms, next_sweep_ms, next_sub_check_ms;

    /* counters */
    uint64_t requests, created, dispatched, dispatch_failures, completed, failed, loads,
        waits_total, wait_timeouts, frames, acks, frame_retries, frames_dropped, sweeps,
        swept, checks, store_failures, publish_failures, conflicts;
    /* creation passes: how many, and the time they spent reading servers,
     * checking the requests and committing (us) */
    uint64_t create_passes, create_pass_requests, pass_read_us, pass_check_us, pass_commit_us;
    char last_error[160];
};

/* ------------------------------------------------------------------ */
/* Replies                                                              */

static void
s_set_error (self_t *self, const char *what, const char *err)
{
    snprintf (self->last_error, sizeof self->last_error, "%s: %s", what, err ? err : "");
}

/* Reply with body (taken over; may be NULL). */
static void
s_reply (self_t *self, uint64_t id, int status, char *body)
{
    cn_svc_reply (self->args->receiver, id, status, body, body ? strlen (body) : 0);
}

/* j is not taken over */
static void
s_reply_json (self_t *self, uint64_t id, int status, const json_t *j)
{
    cn_svc_reply_json (self->args->receiver, id, status, json_incref ((json_t *) j));
}

static void
s_reply_apierr (self_t *self, uint64_t id, const char *req_id, const cn_apierr_t *e)
{
    cn_svc_reply_apierr (self->args->receiver, id, req_id, COMPONENT, e);
}

#define s_reply_error(self, id, req_id, status, code, ...) \
    cn_svc_reply_error ((self)->args->receiver, (id), (req_id), COMPONENT, (status), (code), \
                        __VA_ARGS__)

/* ------------------------------------------------------------------ */
/* The store                                                            */

static bool
s_bucket (self_t *self)
{
    if (self->bucket_ready)
        return true;
    if (cn_moray_put_bucket (self->moray, CN_BUCKET_TASKS, cn_task_index, cn_task_nindex)
        != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "bucket", cn_moray_errmsg (self->moray));
        return false;
    }
    self->bucket_ready = true;
    return true;
}

/* Read a task record: CN_MORAY_OK with *rec (and etag), or an error code. */
static int
s_get (self_t *self, const char *id, json_t **rec, char etag[9])
{
    *rec = NULL;
    if (!s_bucket (self))
        return CN_MORAY_EIO;
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_TASKS, id, &o);
    if (rc != CN_MORAY_OK) {
        if (rc != CN_MORAY_NOTFOUND) {
            self->store_failures++;
            s_set_error (self, "read", cn_moray_errmsg (self->moray));
        }
        return rc;
    }
    json_error_t jerr;
    json_t *r = json_loadb (o.value, o.value_len, 0, &jerr);
    if (etag)
        memcpy (etag, o.etag, 9);
    cn_mobj_fini (&o);
    if (!json_is_object (r)) {
        json_decref (r);
        CN_ERROR (COMPONENT, "stored task is not a JSON object", "{s:s}", "task_id", id);
        return CN_MORAY_EINVAL;
    }
    *rec = r;
    return CN_MORAY_OK;
}

static void
s_publish (self_t *self, const char *id, const char *status)
{
    if (!cn_redis_ok (self->redis)) {
        self->publish_failures++;
        return;
    }
    char msg[128];
    snprintf (msg, sizeof msg, "%s %s", id, status);
    redisReply *r = cn_redis_cmd (self->redis, "PUBLISH %s %s", CN_TASKS_CHANNEL, msg);
    if (!r || r->type == REDIS_REPLY_ERROR) {
        self->publish_failures++;
        s_set_error (self, "publish", r && r->str ? r->str : "no answer");
    }
    if (r)
        freeReplyObject (r);
}

/* A change to apply to a record: 1 changed, 0 nothing to write. */
typedef int (apply_fn) (json_t *rec, void *arg);

/* Read, apply, write conditionally on the etag read; retry on conflict.
 * CN_MORAY_OK (written or nothing to do; *changed says which), or the
 * store's error (CN_MORAY_NOTFOUND: no such task). A write that ends the
 * task is published. *out (may be NULL) receives the record as stored. */
static int
s_update (self_t *self, const char *id, apply_fn *fn, void *arg, bool *changed, json_t **out)
{
    if (changed)
        *changed = false;
    if (out)
        *out = NULL;
    for (int attempt = 0; attempt < CAS_ATTEMPTS; attempt++) {
        json_t *rec = NULL;
        char etag[9];
        int rc = s_get (self, id, &rec, etag);
        if (rc != CN_MORAY_OK)
            return rc;
        bool was_active = cn_task_active (rec);
        if (fn (rec, arg) <= 0) {
            if (out)
                *out = rec;
            else
                json_decref (rec);
            return CN_MORAY_OK;
        }
        char *text = json_dumps (rec, JSON_COMPACT);
        if (!text)
            abort ();
        rc = cn_moray_put (self->moray, CN_BUCKET_TASKS, id, text, etag, NULL, NULL);
        free (text);
        if (rc == CN_MORAY_CONFLICT) {
            self->conflicts++;
            json_decref (rec);
            continue;
        }
        if (rc != CN_MORAY_OK) {
            self->store_failures++;
            s_set_error (self, "write", cn_moray_errmsg (self->moray));
            json_decref (rec);
            return rc;
        }
        if (changed)
            *changed = true;
        if (was_active && !cn_task_active (rec)) {
            const char *st = json_string_value (json_object_get (rec, "status"));
            if (st && strcmp (st, "complete") == 0)
                self->completed++;
            else
                self->failed++;
            s_publish (self, id, st ? st : "failure");
        }
        if (out)
            *out = rec;
        else
            json_decref (rec);
        return CN_MORAY_OK;
    }
    s_set_error (self, "write", "too many conflicts");
    return CN_MORAY_CONFLICT;
}

typedef struct {
    const char *code;
    const char *message;
} fail_arg_t;

static int
s_apply_fail (json_t *rec, void *arg)
{
    fail_arg_t *a = arg;
    return cn_task_fail (rec, a->code, a->message, cn_now_ms ());
}

/* Service the agent connections between store batches (cn_httpc_pump). */
#define PUMP_ROUNDS 4
static void
s_pump (self_t *self)
{
    if (self->http)
        cn_httpc_pump (self->http, PUMP_ROUNDS);
}

static void
s_fail_task (self_t *self, const char *id, const char *code, const char *message)
{
    fail_arg_t a = { code, message };
    bool changed = false;
    int rc = s_update (self, id, s_apply_fail, &a, &changed, NULL);
    if (rc != CN_MORAY_OK)
        CN_ERROR (COMPONENT, "cannot end a failed task; the sweep will", "{s:s,s:s,s:s}",
                  "task_id", id, "code", code, "error", cn_moray_errmsg (self->moray));
    else
    if (changed)
        CN_INFO (COMPONENT, "task failed", "{s:s,s:s,s:s}", "task_id", id, "code", code,
                 "message", message);
}

/* ------------------------------------------------------------------ */
/* Waits                                                                */

static void
s_waitlist_free (void **item)
{
    zlistx_t *l = *item;
    zlistx_destroy (&l);
    *item = NULL;
}

static void
s_waiter_free (void **item)
{
    free (*item);
    *item = NULL;
}

/* Answer every waiter of id with status/body (rec NULL: 404), forget them. */
static void
s_answer_waiters (self_t *self, const char *id, const json_t *rec)
{
    zlistx_t *l = zhashx_lookup (self->waits, id);
    if (!l)
        return;
    char *text = NULL;
    if (rec) {
        json_t *v = cn_task_view (rec);
        text = json_dumps (v, CN_BACKEND_JSON_FLAGS);
        json_decref (v);
    }
    for (waiter_t *w = zlistx_first (l); w; w = zlistx_next (l)) {
        if (text)
            s_reply (self, w->req, 200, strdup (text));
        else
            s_reply_error (self, w->req, w->req_id, 404, "ResourceNotFound",
                           "Task %s not found", id);
        self->nwaiters--;
    }
    free (text);
    zhashx_delete (self->waits, id);
}

/* The store says whether id ended: answer its waiters if so (or when
 * force: at their deadline). */
static void
s_check_waits (self_t *self, const char *id)
{
    json_t *rec = NULL;
    int rc = s_get (self, id, &rec, NULL);
    if (rc == CN_MORAY_NOTFOUND)
        s_answer_waiters (self, id, NULL);
    else
    if (rc == CN_MORAY_OK && !cn_task_active (rec))
        s_answer_waiters (self, id, rec);
    json_decref (rec);
}

static void
s_check_all_waits (self_t *self)
{
    zlistx_t *keys = zhashx_keys (self->waits);
    for (char *k = zlistx_first (keys); k; k = zlistx_next (keys))
        s_check_waits (self, k);
    zlistx_destroy (&keys);
}

/* Waiters past their deadline: answer with the record as it is. */
static void
s_expire_waits (self_t *self, int64_t now)
{
    zlistx_t *keys = zhashx_keys (self->waits);
    for (char *k = zlistx_first (keys); k; k = zlistx_next (keys)) {
        zlistx_t *l = zhashx_lookup (self->waits, k);
        bool due = false;
        for (waiter_t *w = zlistx_first (l); w && !due; w = zlistx_next (l))
            due = now >= w->deadline_ms;
        if (!due)
            continue;
        json_t *rec = NULL;
        int rc = s_get (self, k, &rec, NULL);
        if (rc == CN_MORAY_NOTFOUND || (rc == CN_MORAY_OK && !cn_task_active (rec))) {
            s_answer_waiters (self, k, rec);
            json_decref (rec);
            continue;
        }
        char *text = NULL;
        if (rec) {
            json_t *v = cn_task_view (rec);
            text = json_dumps (v, CN_BACKEND_JSON_FLAGS);
            json_decref (v);
        }
        zlistx_t *keep = zlistx_new ();
        zlistx_set_destructor (keep, s_waiter_free);
        waiter_t *w;
        while ((w = zlistx_detach (l, NULL))) {
            if (now < w->deadline_ms) {
                zlistx_add_end (keep, w);
                continue;
            }
            self->wait_timeouts++;
            if (text)
                s_reply (self, w->req, 200, strdup (text));
            else
                s_reply_error (self, w->req, w->req_id, 503, "ServiceUnavailable",
                               "the store is unreachable");
            self->nwaiters--;
            free (w);
        }
        free (text);
        json_decref (rec);
        if (zlistx_size (keep))
            zhashx_update (self->waits, k, keep);   /* frees l (empty now) */
        else {
            zlistx_destroy (&keep);
            zhashx_delete (self->waits, k);
        }
    }
    zlistx_destroy (&keys);
}

/* ------------------------------------------------------------------ */
/* Agents over HTTP                                                     */

static hctx_t *
s_hctx_new (self_t *self, int kind, const char *ip, int port)
{
    hctx_t *h = calloc (1, sizeof *h);
    if (!h)
        abort ();
    h->self = self;
    h->kind = kind;
    snprintf (h->ip, sizeof h->ip, "%s", ip ? ip : "");
    h->port = port;
    h->next = self->hctx.next;
    h->prev = &self->hctx;
    self->hctx.next->prev = h;
    self->hctx.next = h;
    return h;
}

static void
s_hctx_free (hctx_t *h)
{
    h->prev->next = h->next;
    h->next->prev = h->prev;
    free (h);
}

/* A short, printable copy of an agent's body for error messages. */
static void
s_snippet (const cn_httpc_res_t *res, char *out, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < res->len && k + 1 < n; i++) {
        char c = res->body[i];
        out[k++] = (c >= 32 && c < 127) ? c : ' ';
    }
    out[k] = 0;
}

static void s_on_http (const cn_httpc_res_t *res, void *arg);

/* Headers for a request to the agent; req_id is cleaned of control bytes. */
static void
s_headers (char *buf, size_t n, const char *uuid, const char *task_id, const char *req_id,
           bool json)
{
    char rid[64];
    size_t k = 0;
    for (const char *p = req_id ? req_id : ""; *p && k + 1 < sizeof rid; p++)
        if ((unsigned char) *p >= 32 && *p != 127)
            rid[k++] = *p;
    rid[k] = 0;
    int len = snprintf (buf, n, "x-server-uuid: %s\r\n", uuid);
    if (task_id)
        len += snprintf (buf + len, n - (size_t) len, "x-cnapi-task-id: %s\r\n", task_id);
    if (rid[0])
        len += snprintf (buf + len, n - (size_t) len, "x-request-id: %s\r\n", rid);
    if (json)
        snprintf (buf + len, n - (size_t) len, "content-type: application/json\r\n");
}

static void
s_post_task (self_t *self, hctx_t *h, const char *task, const json_t *params)
{
    json_t *body = json_pack ("{s:s,s:O}", "task", task, "params", params);
    char *text = json_dumps (body, JSON_COMPACT);
    json_decref (body);
    if (!text)
        abort ();
    char hdrs[512];
    s_headers (hdrs, sizeof hdrs, h->uuid, h->kind == H_DISPATCH ? h->id : NULL, h->req_id,
               true);
    cn_httpc_request (self->http, h->ip, h->port, "POST", "/tasks", hdrs, text, strlen (text),
                      s_on_http, h);
    free (text);
}

static void
s_on_dispatch (self_t *self, hctx_t *h, const cn_httpc_res_t *res)
{
    char msg[256], snip[120];
    if (!res->err && res->status == 202) {
        self->dispatched++;
        /* "dispatched" is written with the agent's first frame (B's frames
         * pass), not here: a separate write of the same row from this
         * instance cost PostgreSQL transactions and row-lock waits against
         * the frames (issue 4 benchmarks) */
        return;
    }
    self->dispatch_failures++;
    const char *code = "AgentRefused";
    if (res->err) {
        code = "AgentUnreachable";
        if (strcmp (res->err, "timeout") == 0)
            snprintf (msg, sizeof msg, "the agent at %s:%d did not answer within %d ms", h->ip,
                      h->port, self->cfg->tasks_agent_timeout_ms);
        else
            snprintf (msg, sizeof msg, "cannot reach the agent at %s:%d (%s)", h->ip, h->port,
                      res->err);
    }
    else
    if (res->status == 503) {
        code = "AgentPaused";
        snprintf (msg, sizeof msg, "the agent at %s:%d is paused", h->ip, h->port);
    }
    else {
        s_snippet (res, snip, sizeof snip);
        snprintf (msg, sizeof msg, "the agent at %s:%d refused the task: %d %s", h->ip, h->port,
                  res->status, snip);
    }
    CN_WARN (COMPONENT, "dispatch failed", "{s:s,s:s,s:s,s:s}", "task_id", h->id,
             "server_uuid", h->uuid, "code", code, "message", msg);
    s_fail_task (self, h->id, code, msg);
}

static void
s_on_load (self_t *self, hctx_t *h, const cn_httpc_res_t *res)
{
    char snip[160];
    if (res->err) {
        if (strcmp (res->err, "timeout") == 0)
            s_reply_error (self, h->req, h->req_id, 504, "AgentTimeout",
                           "the agent of server %s did not answer within %d ms", h->uuid,
                           self->cfg->tasks_agent_timeout_ms);
        else
            s_reply_error (self, h->req, h->req_id, 500, "AgentUnreachable",
                           "cannot reach the agent of server %s at %s:%d (%s)", h->uuid, h->ip,
                           h->port, res->err);
        return;
    }
    if (res->status == 200) {
        json_error_t jerr;
        json_t *vm = json_loadb (res->body ? res->body : "", res->len, 0, &jerr);
        if (json_is_object (vm)) {
            s_reply_json (self, h->req, 200, vm);
            json_decref (vm);
            return;
        }
        json_decref (vm);
        s_reply_error (self, h->req, h->req_id, 500, "AgentError",
                       "the agent answered a VM that is not a JSON object");
        return;
    }
    if (res->status == 404) {
        s_reply_error (self, h->req, h->req_id, 404, "VmNotFound", "VM %s not found", h->vm);
        return;
    }
    if (res->status == 409) {
        s_reply_error (self, h->req, h->req_id, 409, "ServerNotRunning",
                       "the agent at %s:%d does not serve server %s", h->ip, h->port, h->uuid);
        return;
    }
    s_snippet (res, snip, sizeof snip);
    s_reply_error (self, h->req, h->req_id, 500, res->status == 503 ? "AgentPaused" : "AgentError",
                   "the agent answered %d: %s", res->status, snip);
}

/* The sweep's GET /tasks/:id. */
typedef struct {
    const char *status;
    const json_t *result, *error;
    const json_t *events;
} view_arg_t;

static int
s_apply_view (json_t *rec, void *arg)
{
    view_arg_t *a = arg;
    int changed = 0;
    int64_t now = cn_now_ms ();
    size_t i;
    json_t *e;
    json_array_foreach (a->events, i, e) {
        json_t *seq = json_object_get (e, "seq");
        const char *name = json_string_value (json_object_get (e, "name"));
        json_t *tm = json_object_get (e, "time_ms");
        if (json_is_integer (seq) && json_integer_value (seq) > 0 && name)
            changed |= cn_task_apply_event (rec, (uint64_t) json_integer_value (seq), name,
                                            json_is_integer (tm) ? json_integer_value (tm) : now,
                                            json_object_get (e, "event")) > 0;
    }
    /* the end: above every seq we hold */
    json_t *ls = json_object_get (rec, "last_seq");
    uint64_t seq = (json_is_integer (ls) && json_integer_value (ls) > 0
                    ? (uint64_t) json_integer_value (ls) : 0) + 1;
    changed |= cn_task_apply_end (rec, seq, a->status, now, a->result, a->error) > 0;
    return changed;
}

static void
s_on_check (self_t *self, hctx_t *h, const cn_httpc_res_t *res)
{
    zhashx_delete (self->checking, h->id);
    int64_t age_ms = cn_now_ms () - h->created_ms;
    bool too_old = age_ms > (int64_t) self->cfg->tasks_max_age_s * 1000;
    if (!res->err && res->status == 200) {
        json_error_t jerr;
        json_t *v = json_loadb (res->body ? res->body : "", res->len, 0, &jerr);
        const char *st = json_string_value (json_object_get (v, "status"));
        if (st && (strcmp (st, "complete") == 0 || strcmp (st, "failure") == 0)) {
            view_arg_t a = { st, json_object_get (v, "result"), json_object_get (v, "error"),
                             json_object_get (v, "events") };
            bool changed = false;
            if (s_update (self, h->id, s_apply_view, &a, &changed, NULL) == CN_MORAY_OK
                && changed) {
                self->swept++;
                CN_INFO (COMPONENT, "orphaned task ended from the agent's record",
                         "{s:s,s:s,s:s}", "task_id", h->id, "server_uuid", h->uuid,
                         "status", st);
            }
        }
        json_decref (v);
        return;                 /* running: its result comes over the session */
    }
    if (!res->err && res->status == 404) {
        self->swept++;
        s_fail_task (self, h->id, "DispatchLost",
                     "the agent never received the task (its dispatching instance died "
                     "before sending it)");
        return;
    }
    if (too_old) {
        char msg[256];
        if (res->err)
            snprintf (msg, sizeof msg, "the agent at %s:%d is unreachable (%s) and the task is "
                      "older than %d s", h->ip, h->port, res->err, self->cfg->tasks_max_age_s);
        else
            snprintf (msg, sizeof msg, "the agent at %s:%d answered %d and the task is older "
                      "than %d s", h->ip, h->port, res->status, self->cfg->tasks_max_age_s);
        self->swept++;
        s_fail_task (self, h->id, "AgentUnreachable", msg);
    }
}

static void
s_on_http (const cn_httpc_res_t *res, void *arg)
{
    hctx_t *h = arg;
    self_t *self = h->self;
    if (h->kind == H_DISPATCH)
        s_on_dispatch (self, h, res);
    else
    if (h->kind == H_LOAD)
        s_on_load (self, h, res);
    else
        s_on_check (self, h, res);
    s_hctx_free (h);
}

/* ------------------------------------------------------------------ */
/* Requests                                                             */

typedef struct {
    uint64_t id;
    char req_id[64];
    char uuid[37];              /* the normalised server uuid */
    char sub[64];
    char action[16];
} rctx_t;

static void
s_copy_str (const cn_msg_t *m, const char *key, char *out, size_t n)
{
    size_t len = 0;
    const char *s = cn_msg_str (m, key, &len);
    if (!s || len >= n)
        len = 0;
    if (s && len)
        memcpy (out, s, len);
    out[len] = 0;
}

static void
s_srv_free (void **item)
{
    free (*item);
    *item = NULL;
}

/* *out from the stored server record's text: its agent address, or the
 * error a request for it is answered with. */
static void
s_server_from (self_t *self, const char *uuid, const char *value, size_t value_len, srv_t *out)
{
    memset (out, 0, sizeof *out);
    json_error_t jerr;
    json_t *rec = json_loadb (value, value_len, 0, &jerr);
    if (!json_is_object (rec)) {
        json_decref (rec);
        *out = (srv_t) { .status = 500, .code = "InternalError" };
        snprintf (out->msg, sizeof out->msg, "stored server record is not a JSON object");
        return;
    }
    /* running: a live session anywhere (the status table); before the
     * table is loaded, the record's own freshness */
    cn_status_row_t row;
    bool running;
    if (cn_liveness_get (self->args->live, uuid, &row))
        running = row.running;
    else
    if (!cn_liveness_loaded (self->args->live)) {
        const char *st = cn_server_status (rec, cn_now_ms (), self->cfg->sysinfo_freshness_s,
                                           self->args->live);
        running = st && strcmp (st, "running") == 0;
    }
    else
        running = false;
    const char *a = json_string_value (json_object_get (rec, "admin_ip"));
    json_t *p = json_object_get (rec, "agent_port");
    if (!running) {
        *out = (srv_t) { .status = 409, .code = "ServerNotRunning" };
        snprintf (out->msg, sizeof out->msg, "Server %s is not running", uuid);
    }
    else
    if (!a || !*a) {
        *out = (srv_t) { .status = 500, .code = "InternalError" };
        snprintf (out->msg, sizeof out->msg,
                  "Server %s has no admin_ip: its agent cannot be reached", uuid);
    }
    else {
        snprintf (out->ip, sizeof out->ip, "%s", a);
        out->port = json_is_integer (p) && json_integer_value (p) > 0
                    && json_integer_value (p) < 65536 ? (int) json_integer_value (p) : 5309;
    }
    json_decref (rec);
}

static void
s_server_notfound (const char *uuid, srv_t *out)
{
    memset (out, 0, sizeof *out);
    *out = (srv_t) { .status = 404, .code = "ResourceNotFound" };
    snprintf (out->msg, sizeof out->msg, "Server %.36s not found", uuid);
}

/* Look the server up: *out gets its agent address, or the error a request
 * for it is answered with. */
static void
s_server_lookup (self_t *self, const char *uuid, srv_t *out)
{
    memset (out, 0, sizeof *out);
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_SERVERS, uuid, &o);
    if (rc == CN_MORAY_NOTFOUND) {
        s_server_notfound (uuid, out);
        return;
    }
    if (rc != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "server read", cn_moray_errmsg (self->moray));
        *out = (srv_t) { .status = 503, .code = "ServiceUnavailable" };
        snprintf (out->msg, sizeof out->msg, "the store is unreachable: %s",
                  cn_moray_errmsg (self->moray));
        return;
    }
    s_server_from (self, uuid, o.value, o.value_len, out);
    cn_mobj_fini (&o);
}

/* Keep a found server's address for SRV_TTL_MS. */
static void
s_addr_remember (self_t *self, const char *uuid, const srv_t *sv)
{
    if (sv->status != 0)
        return;
    if (zhashx_size (self->addr) >= SRV_ADDR_MAX)
        zhashx_purge (self->addr);
    srv_t *copy = malloc (sizeof *copy);
    if (!copy)
        abort ();
    *copy = *sv;
    copy->read_ms = cn_now_ms ();
    zhashx_update (self->addr, uuid, copy);
}

/* A remembered address still fresh enough: copied into the pass's table,
 * and that copy returned; else NULL. */
static srv_t *
s_addr_recall (self_t *self, const char *uuid)
{
    srv_t *a = zhashx_lookup (self->addr, uuid);
    if (!a)
        return NULL;
    if (cn_now_ms () - a->read_ms >= SRV_TTL_MS) {
        zhashx_delete (self->addr, uuid);
        return NULL;
    }
    srv_t *sv = malloc (sizeof *sv);
    if (!sv)
        abort ();
    *sv = *a;
    zhashx_insert (self->srv, uuid, sv);
    self->addr_hits++;
    return sv;
}

static int
s_prefetch_row (const cn_mobj_t *obj, void *arg)
{
    self_t *self = arg;
    if (!obj->key || zhashx_lookup (self->srv, obj->key))
        return 0;
    srv_t *sv = calloc (1, sizeof *sv);
    if (!sv)
        abort ();
    s_server_from (self, obj->key, obj->value, obj->value_len, sv);
    zhashx_insert (self->srv, obj->key, sv);
    s_addr_remember (self, obj->key, sv);
    return 0;
}

/* Read the servers of a pass's requests (uuids, normalised, n of them,
 * not yet in self->srv) in one statement: (|(_key=a)(_key=b)...). Those
 * not returned are not found. A failed read leaves self->srv as it was
 * (each request then reads its server alone, answering 503 as before). */
static void
s_prefetch_servers (self_t *self, char (*uuids)[37], size_t n)
{
    if (n == 0)
        return;
    size_t cap = 16 + n * 50;
    char *filter = malloc (cap);
    if (!filter)
        abort ();
    size_t len = 0;
    if (n > 1)
        len += (size_t) snprintf (filter + len, cap - len, "(|");
    for (size_t i = 0; i < n; i++)
        len += (size_t) snprintf (filter + len, cap - len, "(_key=%s)", uuids[i]);
    if (n > 1)
        snprintf (filter + len, cap - len, ")");
    int rc = cn_moray_find (self->moray, CN_BUCKET_SERVERS, filter, NULL, s_prefetch_row, self);
    free (filter);
    if (rc != CN_MORAY_OK && rc != CN_MORAY_EIO)
        return;                 /* each request reads its own server */
    if (rc == CN_MORAY_EIO) {
        /* as each single read would have answered (without waiting for
         * the store once per server) */
        self->store_failures++;
        s_set_error (self, "server read", cn_moray_errmsg (self->moray));
    }
    for (size_t i = 0; i < n; i++) {
        if (zhashx_lookup (self->srv, uuids[i]))
            continue;
        srv_t *sv = calloc (1, sizeof *sv);
        if (!sv)
            abort ();
        if (rc == CN_MORAY_EIO) {
            *sv = (srv_t) { .status = 503, .code = "ServiceUnavailable" };
            snprintf (sv->msg, sizeof sv->msg, "the store is unreachable: %s",
                      cn_moray_errmsg (self->moray));
        }
        else
            s_server_notfound (uuids[i], sv);
        zhashx_insert (self->srv, uuids[i], sv);
    }
}

/* The server of a /servers/:uuid route: exists, has an agent address, and
 * a live session somewhere. 0 with *ip, *port; -1 when answered. Read once
 * per loop pass (self->srv, emptied at the end of the pass). */
static int
s_server (self_t *self, rctx_t *c, char *ip, size_t iplen, int *port)
{
    srv_t *sv = zhashx_lookup (self->srv, c->uuid);
    if (!sv)
        sv = s_addr_recall (self, c->uuid);
    if (!sv) {
        sv = calloc (1, sizeof *sv);
        if (!sv)
            abort ();
        s_server_lookup (self, c->uuid, sv);
        zhashx_insert (self->srv, c->uuid, sv);
        s_addr_remember (self, c->uuid, sv);
    }
    if (sv->status) {
        s_reply_error (self, c->id, c->req_id, sv->status, sv->code, "%s", sv->msg);
        return -1;
    }
    snprintf (ip, iplen, "%s", sv->ip);
    *port = sv->port;
    return 0;
}

/* Common start of the /servers/:uuid routes: params, then the uuid. NULL
 * when answered. */
static json_t *
s_begin_server (self_t *self, const cn_msg_t *m, rctx_t *c)
{
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    json_t *params = cn_params_parse_server (m, c->uuid, &e);
    if (!params) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
    }
    return params;
}

/* Check the VM payload of vm_create / vm_action update: the uuid (when
 * given) and the types of the fields the agent reads. 0, or -1 answered. */
static int
s_check_payload (self_t *self, rctx_t *c, json_t *params, char vm[37], bool create)
{
    json_t *u = json_object_get (params, "uuid");
    if (create) {
        if (u && !json_is_null (u)) {
            if (!json_is_string (u) || !cn_uuid_normalize (json_string_value (u), vm)) {
                s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument",
                               "Invalid VM UUID: uuid must be a UUID");
                return -1;
            }
        }
        else
            cn_uuid_new (vm);
        json_object_set_new (params, "uuid", json_string (vm));
    }
    static const char *const strs[] = { "brand", "alias", "owner_uuid", "image_uuid",
                                        "billing_id", "hostname", NULL };
    static const char *const nums[] = { "ram", "max_physical_memory", "quota", "cpu_cap",
                                        "max_swap", "vcpus", NULL };
    for (size_t i = 0; strs[i]; i++) {
        json_t *v = json_object_get (params, strs[i]);
        if (v && !json_is_string (v) && !json_is_null (v)) {
            s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument",
                           "%s must be a string", strs[i]);
            return -1;
        }
    }
    for (size_t i = 0; nums[i]; i++) {
        json_t *v = json_object_get (params, nums[i]);
        bool ok = !v || json_is_null (v) || json_is_number (v);
        if (v && json_is_string (v)) {
            /* form and query values are strings: digits are a number */
            const char *s = json_string_value (v);
            ok = *s != 0;
            for (; *s && ok; s++)
                ok = *s >= '0' && *s <= '9';
        }
        if (!ok) {
            s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument",
                           "%s must be a number", nums[i]);
            return -1;
        }
    }
    return 0;
}

/* vm_create, vm_action, vm_destroy, sysinfo_refresh: commit, answer,
 * dispatch. */
static void
s_op_task (self_t *self, const cn_msg_t *m, rctx_t *c, const char *op)
{
    json_t *params = s_begin_server (self, m, c);
    if (!params)
        return;
    char vm[37] = "";
    const char *task = NULL;
    json_t *agent_params = NULL;
    bool create = strcmp (op, "vm_create") == 0;
    if (create) {
        if (s_check_payload (self, c, params, vm, true) != 0)
            goto done;
        task = "machine_create";
        agent_params = json_incref (params);
    }
    else
    if (strcmp (op, "sysinfo_refresh") == 0) {
        task = "server_sysinfo";
        agent_params = json_object ();
    }
    else {
        if (!cn_uuid_normalize (c->sub, vm)) {
            s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument",
                           "Invalid VM UUID: %s", c->sub);
            goto done;
        }
        if (strcmp (op, "vm_destroy") == 0)
            task = "machine_destroy";
        else {
            task = cn_task_action_task (c->action);
            if (!task) {
                s_reply_error (self, c->id, c->req_id, 404, "ResourceNotFound",
                               "unknown action %s", c->action);
                goto done;
            }
        }
        if (strcmp (task, "machine_update") == 0) {
            if (s_check_payload (self, c, params, vm, false) != 0)
                goto done;
            agent_params = json_incref (params);
        }
        else
            agent_params = json_object ();
        json_object_set_new (agent_params, "uuid", json_string (vm));
    }

    char ip[64];
    int port = 0;
    if (s_server (self, c, ip, sizeof ip, &port) != 0)
        goto done;
    if (!s_bucket (self)) {
        s_reply_error (self, c->id, c->req_id, 503, "ServiceUnavailable",
                       "the store is unreachable: %s", cn_moray_errmsg (self->moray));
        goto done;
    }
    pcreate_t *pc = &self->pc[self->npc++];
    memset (pc, 0, sizeof *pc);
    cn_uuid_new (pc->tid);
    pc->req = c->id;
    snprintf (pc->req_id, sizeof pc->req_id, "%s", c->req_id);
    memcpy (pc->uuid, c->uuid, sizeof pc->uuid);
    memcpy (pc->vm, vm, sizeof pc->vm);
    pc->task = task;
    pc->create = create;
    snprintf (pc->ip, sizeof pc->ip, "%s", ip);
    pc->port = port;
    cn_task_spec_t spec = {
        .id = pc->tid, .req_id = c->req_id, .task = task, .server_uuid = c->uuid,
        .vm_uuid = vm[0] ? vm : NULL, .params = agent_params, .instance = self->cfg->instance,
        .instance_boot = self->args->boot_id ? self->args->boot_id : "",
        .now_ms = cn_now_ms (),
    };
    json_t *rec = cn_task_new (&spec);
    pc->text = json_dumps (rec, JSON_COMPACT);
    json_decref (rec);
    if (!pc->text)
        abort ();
    pc->agent_params = agent_params;    /* taken over */
    agent_params = NULL;
done:
    json_decref (agent_params);
    json_decref (params);
}

/* The creations of this pass: one insert per record ("must not exist"),
 * all in one transaction; after its commit each is answered 200 and
 * dispatched. A failed commit answers each as a single failed insert did
 * (503 when the store is unreachable, else 500). */
static void
s_flush_creates (self_t *self)
{
    size_t n = self->npc;
    if (n == 0)
        return;
    cn_mop_t *ops = calloc (n, sizeof *ops);
    bool *applied = calloc (n, sizeof *applied);
    if (!ops || !applied)
        abort ();
    for (size_t i = 0; i < n; i++)
        ops[i] = (cn_mop_t) { .kind = CN_MOP_PUT, .bucket = CN_BUCKET_TASKS,
                              .key = self->pc[i].tid, .value = self->pc[i].text,
                              .etag = CN_MORAY_ETAG_NULL };
    int rc = cn_moray_batch_partial (self->moray, ops, n, applied);
    if (rc != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "create", cn_moray_errmsg (self->moray));
    }
    for (size_t i = 0; i < n; i++) {
        pcreate_t *pc = &self->pc[i];
        if (rc != CN_MORAY_OK)
            s_reply_error (self, pc->req, pc->req_id, rc == CN_MORAY_EIO ? 503 : 500,
                           rc == CN_MORAY_EIO ? "ServiceUnavailable" : "InternalError",
                           "cannot record the task: %s", cn_moray_errmsg (self->moray));
        else
        if (!applied[i]) {
            /* a drawn id that exists: a single insert failed so too */
            self->store_failures++;
            s_set_error (self, "create", "task id exists");
            s_reply_error (self, pc->req, pc->req_id, 500, "InternalError",
                           "cannot record the task: task %s exists", pc->tid);
        }
        else {
            self->created++;
            /* committed: answer, then dispatch */
            json_t *ans = pc->create
                          ? json_pack ("{s:s,s:s}", "id", pc->tid, "vm_uuid", pc->vm)
                          : json_pack ("{s:s}", "id", pc->tid);
            s_reply_json (self, pc->req, 200, ans);
            json_decref (ans);
            CN_INFO (COMPONENT, "task created", "{s:s,s:s,s:s,s:s?,s:s}", "task_id", pc->tid,
                     "task", pc->task, "server_uuid", pc->uuid,
                     "vm_uuid", pc->vm[0] ? pc->vm : NULL, "req_id", pc->req_id);
            hctx_t *h = s_hctx_new (self, H_DISPATCH, pc->ip, pc->port);
            memcpy (h->id, pc->tid, sizeof h->id);
            memcpy (h->uuid, pc->uuid, sizeof h->uuid);
            snprintf (h->req_id, sizeof h->req_id, "%s", pc->req_id);
            s_post_task (self, h, pc->task, pc->agent_params);
        }
        free (pc->text);
        json_decref (pc->agent_params);
    }
    self->npc = 0;
    free (ops);
    free (applied);
}

static void
s_op_load (self_t *self, const cn_msg_t *m, rctx_t *c)
{
    json_t *params = s_begin_server (self, m, c);
    if (!params)
        return;
    char vm[37];
    char ip[64];
    int port = 0;
    if (!cn_uuid_normalize (c->sub, vm)) {
        s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument", "Invalid VM UUID: %s",
                       c->sub);
        json_decref (params);
        return;
    }
    json_decref (params);
    if (s_server (self, c, ip, sizeof ip, &port) != 0)
        return;
    self->loads++;
    hctx_t *h = s_hctx_new (self, H_LOAD, ip, port);
    h->req = c->id;
    memcpy (h->uuid, c->uuid, sizeof h->uuid);
    memcpy (h->vm, vm, sizeof h->vm);
    snprintf (h->req_id, sizeof h->req_id, "%s", c->req_id);
    json_t *p = json_pack ("{s:s}", "uuid", vm);
    s_post_task (self, h, "machine_load", p);
    json_decref (p);
}

static void
s_op_task_get (self_t *self, const cn_msg_t *m, rctx_t *c, bool wait)
{
    char id[37];
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    json_t *params = cn_params_parse (m, &e);
    if (!params) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        return;
    }
    int timeout_s = 3600;
    if (wait && cn_task_parse_timeout (json_object_get (params, "timeout"), &timeout_s) != 0) {
        json_decref (params);
        s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument",
                       "timeout must be a whole number of seconds from 1 to %d", CN_WAIT_MAX_S);
        return;
    }
    json_decref (params);
    if (!cn_uuid_normalize (c->sub, id)) {
        s_reply_error (self, c->id, c->req_id, 404, "ResourceNotFound", "Task %s not found",
                       c->sub);
        return;
    }
    json_t *rec = NULL;
    int rc = s_get (self, id, &rec, NULL);
    if (rc == CN_MORAY_NOTFOUND) {
        s_reply_error (self, c->id, c->req_id, 404, "ResourceNotFound", "Task %s not found", id);
        return;
    }
    if (rc != CN_MORAY_OK) {
        s_reply_error (self, c->id, c->req_id, rc == CN_MORAY_EIO ? 503 : 500,
                       rc == CN_MORAY_EIO ? "ServiceUnavailable" : "InternalError",
                       "cannot read the task: %s", cn_moray_errmsg (self->moray));
        return;
    }
    if (!wait || !cn_task_active (rec)) {
        json_t *v = cn_task_view (rec);
        s_reply_json (self, c->id, 200, v);
        json_decref (v);
        json_decref (rec);
        return;
    }
    json_decref (rec);
    /* hold it: answered from the channel, the polls or the deadline */
    waiter_t *w = calloc (1, sizeof *w);
    if (!w)
        abort ();
    w->req = c->id;
    w->deadline_ms = cn_now_ms () + (int64_t) timeout_s * 1000;
    snprintf (w->req_id, sizeof w->req_id, "%s", c->req_id);
    zlistx_t *l = zhashx_lookup (self->waits, id);
    if (!l) {
        l = zlistx_new ();
        zlistx_set_destructor (l, s_waiter_free);
        zhashx_insert (self->waits, id, l);
    }
    zlistx_add_end (l, w);
    self->nwaiters++;
    self->waits_total++;
}

static void
s_on_request (self_t *self, zframe_t *f)
{
    cn_msg_t m;
    char err[96];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_WARN (COMPONENT, "bad request frame from the gateway", "{s:s}", "error", err);
        return;
    }
    rctx_t c;
    memset (&c, 0, sizeof c);
    if (!cn_msg_uint (&m, "id", &c.id)) {
        cn_msg_fini (&m);
        return;
    }
    self->requests++;
    s_copy_str (&m, "req_id", c.req_id, sizeof c.req_id);
    s_copy_str (&m, "sub", c.sub, sizeof c.sub);
    s_copy_str (&m, "action", c.action, sizeof c.action);
    char op[32];
    snprintf (op, sizeof op, "%.*s", (int) (m.type_len < 31 ? m.type_len : 31), m.type);
    if (strcmp (op, "vm_create") == 0 || strcmp (op, "vm_action") == 0
        || strcmp (op, "vm_destroy") == 0 || strcmp (op, "sysinfo_refresh") == 0)
        s_op_task (self, &m, &c, op);
    else
    if (strcmp (op, "vm_load") == 0)
        s_op_load (self, &m, &c);
    else
    if (strcmp (op, "task_get") == 0 || strcmp (op, "task_wait") == 0)
        s_op_task_get (self, &m, &c, strcmp (op, "task_wait") == 0);
    else
        s_reply_error (self, c.id, c.req_id, 501, "NotImplemented", "%s is not a tasks request",
                       op);
    cn_msg_fini (&m);
}

/* The server uuid of a /servers/:uuid request frame (normalised into
 * out), for the pass's one read of its servers; false for other requests
 * or a uuid that is not one (answered by s_on_request). */
static bool
s_frame_server (zframe_t *f, char out[37])
{
    cn_msg_t m;
    char err[96];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0)
        return false;
    bool ok = false;
    if ((m.type_len == 9 && memcmp (m.type, "vm_create", 9) == 0)
        || (m.type_len == 9 && memcmp (m.type, "vm_action", 9) == 0)
        || (m.type_len == 10 && memcmp (m.type, "vm_destroy", 10) == 0)
        || (m.type_len == 15 && memcmp (m.type, "sysinfo_refresh", 15) == 0)
        || (m.type_len == 7 && memcmp (m.type, "vm_load", 7) == 0)) {
        size_t ulen = 0;
        const char *raw = cn_msg_str (&m, "uuid", &ulen);
        char tmp[64];
        if (raw && ulen < sizeof tmp) {
            memcpy (tmp, raw, ulen);
            tmp[ulen] = 0;
            ok = cn_uuid_normalize (tmp, out);
        }
    }
    cn_msg_fini (&m);
    return ok;
}

static int
s_on_pull (zloop_t *loop, zsock_t *pull, void *arg)
{
    self_t *self = arg;
    /* at most PASS_MAX (the creations' capacity): the rest waits for the
     * next pass, after the sockets had their turn */
    zframe_t *fr[PASS_MAX];
    char uuids[PASS_MAX][37];
    size_t n = 0, nu = 0;
    while (n < PASS_MAX) {
        zframe_t *f = zframe_recv_nowait (pull);
        if (!f)
            break;
        fr[n++] = f;
        char u[37];
        if (s_frame_server (f, u) && !zhashx_lookup (self->srv, u) && !s_addr_recall (self, u)) {
            bool seen = false;
            for (size_t i = 0; i < nu && !seen; i++)
                seen = memcmp (uuids[i], u, 37) == 0;
            if (!seen)
                memcpy (uuids[nu++], u, 37);
        }
    }
    /* the pass's servers in one read (s_server finds them in self->srv) */
    int64_t t0 = cn_mono_us ();
    if (nu > 1)
        s_prefetch_servers (self, uuids, nu);
    int64_t t1 = cn_mono_us ();
    for (size_t i = 0; i < n; i++) {
        s_on_request (self, fr[i]);
        zframe_destroy (&fr[i]);
    }
    int64_t t2 = cn_mono_us ();
    size_t nc = self->npc;
    s_flush_creates (self);
    if (nc) {
        self->create_passes++;
        self->create_pass_requests += nc;
        self->pass_read_us += (uint64_t) (t1 - t0);
        self->pass_check_us += (uint64_t) (t2 - t1);
        self->pass_commit_us += (uint64_t) (cn_mono_us () - t2);
    }
    zhashx_purge (self->srv);
    /* send the POSTs just queued and read the answers that came meanwhile:
     * zloop handles one poller event per pass once the poll set changed
     * (each request changes it), and this reader, ahead of the pollers,
     * is ready again at 1,000 tasks/s */
    s_pump (self);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Task frames from the hub                                             */

static void
s_ack (self_t *self, uint64_t sid, const char *id, uint64_t seq)
{
    if (!self->args->hub)
        return;
    cn_msgw_t w;
    cn_msgw_init (&w, "task_ack", 2);
    cn_msgw_str (&w, "id", id);
    cn_msgw_uint (&w, "seq", seq);
    cn_hub_cmd_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = CN_HUB_SEND;
    c->sid = sid;
    cn_msgw_take (&w, &c->data, &c->len);
    cn_hub_post (self->args->hub, c);
    self->acks++;
}

typedef struct {
    bool end;
    const char *uuid;           /* the session's server */
    uint64_t seq;
    const char *name;
    const char *status;
    int64_t time_ms;
    json_t *event, *result, *error;
    bool foreign;               /* set: the task is another server's */
} frame_arg_t;

static int
s_apply_frame (json_t *rec, void *arg)
{
    frame_arg_t *a = arg;
    const char *su = json_string_value (json_object_get (rec, "server_uuid"));
    if (!su || strcmp (su, a->uuid) != 0) {
        a->foreign = true;
        return 0;
    }
    if (a->end)
        return cn_task_apply_end (rec, a->seq, a->status, a->time_ms, a->result, a->error);
    return cn_task_apply_event (rec, a->seq, a->name, a->time_ms, a->event);
}

static void
s_fretry_free (void **item)
{
    fretry_t *r = *item;
    if (r) {
        zframe_destroy (&r->frame);
        free (r);
    }
    *item = NULL;
}

/* One frame of a batch, parsed. */
typedef struct {
    fretry_t *src;
    cn_msg_t m;
    bool parsed;
    frame_arg_t a;
    char id[37];
    char *rawid, *name, *status;
    size_t rec;                 /* index in the batch's records */
    bool settled;               /* acked (or never to be) at parse time */
    bool changed;
} fitem_t;

/* One record of a batch. */
typedef struct {
    json_t *rec;                /* NULL: no such task */
    bool bad;                   /* stored, but not a JSON object */
    bool was_active;
    bool dirty;
} frec_t;

/* Parse it->src's frame. A frame that is not a message, or whose id is not
 * a UUID, is settled here (the latter acked). */
static void
s_fitem_parse (self_t *self, fitem_t *it)
{
    fretry_t *r = it->src;
    char err[96];
    if (cn_msg_parse (&it->m, zframe_data (r->frame), zframe_size (r->frame), err, sizeof err)
        != 0) {
        CN_WARN (COMPONENT, "bad task frame", "{s:s,s:s}", "server_uuid", r->uuid,
                 "error", err);
        it->settled = true;
        return;
    }
    it->parsed = true;
    frame_arg_t *a = &it->a;
    a->end = cn_msg_is (&it->m, "task_end");
    a->uuid = r->uuid;
    it->rawid = cn_msg_strdup (&it->m, "id");
    it->name = cn_msg_strdup (&it->m, "name");
    it->status = cn_msg_strdup (&it->m, "status");
    cn_msg_uint (&it->m, "seq", &a->seq);
    if (!cn_msg_int (&it->m, "time_ms", &a->time_ms))
        a->time_ms = cn_now_ms ();
    a->name = it->name;
    a->status = it->status;
    const msgpack_object *o;
    if ((o = cn_msg_get (&it->m, "event")) && o->type == MSGPACK_OBJECT_MAP)
        a->event = cn_msgpack_to_json (o);
    if ((o = cn_msg_get (&it->m, "result")))
        a->result = cn_msgpack_to_json (o);
    if ((o = cn_msg_get (&it->m, "error")) && o->type == MSGPACK_OBJECT_MAP)
        a->error = cn_msgpack_to_json (o);
    self->frames++;
    if (!it->rawid || !cn_uuid_normalize (it->rawid, it->id)) {
        CN_WARN (COMPONENT, "task frame for a task id that is not a UUID; acked",
                 "{s:s,s:s?}", "server_uuid", r->uuid, "task_id", it->rawid);
        if (it->rawid)
            s_ack (self, r->sid, it->rawid, a->seq);
        it->settled = true;
    }
}

static void
s_fitem_fini (fitem_t *it)
{
    json_decref (it->a.event);
    json_decref (it->a.result);
    json_decref (it->a.error);
    free (it->rawid);
    free (it->name);
    free (it->status);
    if (it->parsed)
        cn_msg_fini (&it->m);
}

/* Apply the agent frames v[0..n) (n <= PASS_MAX) together: lock their
 * records (one statement, in key order), apply every frame to its record
 * in memory in arrival order (idempotent by seq; an ended task never
 * changes), write each changed record once, commit once; then publish the
 * ends on cnapi:tasks and ack. settled[i] false: v[i] was not acked
 * because the store failed (or its stored record is unreadable); retry it. */
static void
s_frames_batch (self_t *self, fretry_t **v, size_t n, bool *settled)
{
    fitem_t *it = calloc (n, sizeof *it);
    frec_t *recs = calloc (n, sizeof *recs);
    const char **keys = calloc (n, sizeof *keys);
    cn_mobj_t *objs = calloc (n, sizeof *objs);
    cn_mop_t *ops = calloc (n, sizeof *ops);
    char **texts = calloc (n, sizeof *texts);
    zhashx_t *byid = zhashx_new ();
    if ((n && (!it || !recs || !keys || !objs || !ops || !texts)) || !byid)
        abort ();
    size_t nrec = 0;
    for (size_t i = 0; i < n; i++) {
        it[i].src = v[i];
        s_fitem_parse (self, &it[i]);
        if (it[i].settled)
            continue;
        uintptr_t k = (uintptr_t) zhashx_lookup (byid, it[i].id);
        if (!k) {
            keys[nrec] = it[i].id;
            k = ++nrec;
            zhashx_insert (byid, it[i].id, (void *) k);
        }
        it[i].rec = (size_t) k - 1;
    }
    int rc = CN_MORAY_OK;
    size_t nops = 0;
    if (nrec) {
        rc = s_bucket (self) ? cn_moray_begin (self->moray) : CN_MORAY_EIO;
        if (rc == CN_MORAY_OK)
            rc = cn_moray_get_many_locked (self->moray, CN_BUCKET_TASKS, keys, nrec, objs);
        if (rc == CN_MORAY_OK) {
            for (size_t k = 0; k < nrec; k++) {
                if (!objs[k].key)
                    continue;
                json_error_t jerr;
                json_t *r = json_loadb (objs[k].value, objs[k].value_len, 0, &jerr);
                if (!json_is_object (r)) {
                    json_decref (r);
                    CN_ERROR (COMPONENT, "stored task is not a JSON object", "{s:s}",
                              "task_id", keys[k]);
                    recs[k].bad = true;
                    continue;
                }
                recs[k].rec = r;
                recs[k].was_active = cn_task_active (r);
            }
            for (size_t i = 0; i < n; i++) {
                if (it[i].settled || !recs[it[i].rec].rec)
                    continue;
                if (s_apply_frame (recs[it[i].rec].rec, &it[i].a) > 0) {
                    recs[it[i].rec].dirty = true;
                    it[i].changed = true;
                }
            }
            for (size_t k = 0; k < nrec; k++) {
                if (!recs[k].dirty)
                    continue;
                texts[nops] = json_dumps (recs[k].rec, JSON_COMPACT);
                if (!texts[nops])
                    abort ();
                ops[nops] = (cn_mop_t) { .kind = CN_MOP_PUT, .bucket = CN_BUCKET_TASKS,
                                         .key = keys[k], .value = texts[nops],
                                         .etag = objs[k].etag };
                nops++;
            }
            if (nops)
                rc = cn_moray_batch (self->moray, ops, nops, NULL);
            if (rc == CN_MORAY_OK)
                rc = cn_moray_commit (self->moray);
        }
        if (rc != CN_MORAY_OK) {
            cn_moray_rollback (self->moray);
            self->store_failures++;
            if (rc == CN_MORAY_CONFLICT)
                self->conflicts++;
            s_set_error (self, "write", cn_moray_errmsg (self->moray));
        }
    }
    /* committed: the ends first, then the acks */
    for (size_t k = 0; rc == CN_MORAY_OK && k < nrec; k++) {
        if (!recs[k].dirty || !recs[k].was_active || cn_task_active (recs[k].rec))
            continue;
        const char *st = json_string_value (json_object_get (recs[k].rec, "status"));
        if (st && strcmp (st, "complete") == 0)
            self->completed++;
        else
            self->failed++;
        s_publish (self, keys[k], st ? st : "failure");
    }
    for (size_t i = 0; i < n; i++) {
        settled[i] = true;
        if (it[i].settled)
            continue;
        frec_t *fr = &recs[it[i].rec];
        const char *uuid = it[i].src->uuid;
        if (rc != CN_MORAY_OK || fr->bad) {
            settled[i] = false;
            continue;
        }
        if (!fr->rec)
            CN_WARN (COMPONENT, "task frame for an unknown task; acked", "{s:s,s:s}",
                     "server_uuid", uuid, "task_id", it[i].id);
        else
        if (it[i].a.foreign)
            CN_WARN (COMPONENT, "task frame from a server the task is not for; acked",
                     "{s:s,s:s}", "server_uuid", uuid, "task_id", it[i].id);
        else
        if (it[i].changed && it[i].a.end)
            CN_INFO (COMPONENT, "task ended", "{s:s,s:s,s:s}", "task_id", it[i].id,
                     "server_uuid", uuid, "status", it[i].status ? it[i].status : "");
        s_ack (self, it[i].src->sid, it[i].rawid, it[i].a.seq);
    }
    for (size_t i = 0; i < n; i++)
        s_fitem_fini (&it[i]);
    for (size_t k = 0; k < nrec; k++) {
        json_decref (recs[k].rec);
        cn_mobj_fini (&objs[k]);
    }
    for (size_t i = 0; i < nops; i++)
        free (texts[i]);
    zhashx_destroy (&byid);
    free (it);
    free (recs);
    free (keys);
    free (objs);
    free (ops);
    free (texts);
}

/* Apply a batch; what is not settled goes (back) to the retry queue, every
 * FRAME_RETRY_MS for up to FRAME_RETRY_MAX retries; then it is left to the
 * agent's resend after a welcome. */
static void
s_apply_frames (self_t *self, fretry_t **v, size_t n, bool retrying)
{
    if (n == 0)
        return;
    bool settled[PASS_MAX];
    s_frames_batch (self, v, n, settled);
    int64_t now = cn_now_ms ();
    for (size_t i = 0; i < n; i++) {
        void *item = v[i];
        if (settled[i]) {
            s_fretry_free (&item);
            continue;
        }
        if (retrying ? ++v[i]->attempts >= FRAME_RETRY_MAX
                     : zlistx_size (self->retry) >= FRAME_RETRY_QUEUE) {
            self->frames_dropped++;     /* the agent sends it again after a welcome */
            s_fretry_free (&item);
            continue;
        }
        v[i]->next_ms = now + FRAME_RETRY_MS;
        zlistx_add_end (self->retry, v[i]);
    }
}

/* A task_frame message from the hub: the agent frame to apply (NULL when
 * the message is not one). */
static fretry_t *
s_hub_frame (self_t *self, zframe_t *f)
{
    cn_msg_t m;
    char err[96] = "";
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_WARN (COMPONENT, "bad message from the hub", "{s:s}", "error", err);
        return NULL;
    }
    fretry_t *r = NULL;
    if (cn_msg_is (&m, "task_frame")) {
        uint64_t sid = 0;
        cn_msg_uint (&m, "sid", &sid);
        char uuid[37] = "";
        s_copy_str (&m, "uuid", uuid, sizeof uuid);
        const msgpack_object *fr = cn_msg_get (&m, "frame");
        if (fr && fr->type == MSGPACK_OBJECT_BIN && uuid[0]) {
            r = calloc (1, sizeof *r);
            if (!r)
                abort ();
            r->sid = sid;
            memcpy (r->uuid, uuid, sizeof r->uuid);
            r->frame = zframe_new (fr->via.bin.ptr, fr->via.bin.size);
        }
    }
    cn_msg_fini (&m);
    return r;
}

static int
s_on_frames (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    fretry_t *v[PASS_MAX];
    size_t n = 0;
    while (n < PASS_MAX) {
        zframe_t *f = zframe_recv_nowait (sock);
        if (!f)
            break;
        fretry_t *r = s_hub_frame (self, f);
        zframe_destroy (&f);
        if (r)
            v[n++] = r;
    }
    s_apply_frames (self, v, n, false);
    s_pump (self);
    return 0;
}

static void
s_retry_frames (self_t *self, int64_t now)
{
    /* one pass over the queue, in order (detached from the front; what is
     * not due or not settled goes back at the end), in batches */
    fretry_t *v[PASS_MAX];
    size_t nb = 0;
    size_t n = zlistx_size (self->retry);
    for (size_t i = 0; i < n; i++) {
        fretry_t *r = zlistx_detach (self->retry, NULL);
        if (!r)
            break;
        if (now < r->next_ms) {
            zlistx_add_end (self->retry, r);
            continue;
        }
        self->frame_retries++;
        v[nb++] = r;
        if (nb == PASS_MAX) {
            s_apply_frames (self, v, nb, true);
            nb = 0;
        }
    }
    s_apply_frames (self, v, nb, true);
}

/* ------------------------------------------------------------------ */
/* The subscription to cnapi:tasks                                      */

static void
s_sub_up (void *arg)
{
    self_t *self = arg;
    /* whatever ended while we were not listening */
    s_check_all_waits (self);
    CN_INFO (COMPONENT, "tasks subscription up", "{s:s}", "channel", CN_TASKS_CHANNEL);
}

static void
s_sub_down (void *arg, const char *why)
{
    CN_WARN (COMPONENT, "tasks subscription lost; polling waited tasks every second",
             "{s:s}", "reason", why);
}

static void
s_sub_message (void *arg, const char *s)
{
    self_t *self = arg;
    char id[64];
    const char *sp = strchr (s, ' ');
    size_t n = sp ? (size_t) (sp - s) : strlen (s);
    if (n >= sizeof id)
        return;
    memcpy (id, s, n);
    id[n] = 0;
    if (zhashx_lookup (self->waits, id))
        s_check_waits (self, id);       /* the store confirms */
}

/* ------------------------------------------------------------------ */
/* The sweep                                                            */

typedef struct {
    char boot_id[37];
    bool stopped;
    int64_t last_seen_ms;
} irow_t;

typedef struct {
    self_t *self;
    zhashx_t *instances;        /* name -> irow_t */
    zlistx_t *tasks;            /* json_t* active records */
} sweep_t;

static int
s_collect_instance (const cn_mobj_t *obj, void *arg)
{
    sweep_t *sw = arg;
    json_error_t jerr;
    json_t *o = json_loadb (obj->value, obj->value_len, 0, &jerr);
    const char *boot = json_string_value (json_object_get (o, "boot_id"));
    if (boot && strlen (boot) < 37) {
        irow_t *r = calloc (1, sizeof *r);
        if (!r)
            abort ();
        snprintf (r->boot_id, sizeof r->boot_id, "%s", boot);
        r->stopped = json_is_true (json_object_get (o, "stopped"));
        json_t *ls = json_object_get (o, "last_seen_ms");
        r->last_seen_ms = json_is_integer (ls) ? json_integer_value (ls) : 0;
        zhashx_update (sw->instances, obj->key, r);
    }
    json_decref (o);
    return 0;
}

static int
s_collect_task (const cn_mobj_t *obj, void *arg)
{
    sweep_t *sw = arg;
    json_error_t jerr;
    json_t *o = json_loadb (obj->value, obj->value_len, 0, &jerr);
    if (json_is_object (o) && cn_task_active (o))
        zlistx_add_end (sw->tasks, o);
    else
        json_decref (o);
    return 0;
}

/* Is the incarnation (name, boot) of a dispatching instance alive? */
static bool
s_instance_alive (self_t *self, sweep_t *sw, zhashx_t *redis_vals, const char *name,
                  const char *boot, int64_t now)
{
    if (strcmp (name, self->cfg->instance) == 0 && self->args->boot_id
        && strcmp (boot, self->args->boot_id) == 0)
        return true;
    const char *v = zhashx_lookup (redis_vals, name);
    if (v && strcmp (v, boot) == 0)
        return true;
    irow_t *r = zhashx_lookup (sw->instances, name);
    return r && !r->stopped && strcmp (r->boot_id, boot) == 0
           && now - r->last_seen_ms <= self->cfg->session_owner_grace_ms;
}

static void
s_json_free (void **item)
{
    json_t *j = *item;
    json_decref (j);
    *item = NULL;
}

static void
s_sweep (self_t *self)
{
    if (!s_bucket (self))
        return;
    self->sweeps++;
    int64_t now = cn_now_ms ();
    sweep_t sw = { self, zhashx_new (), zlistx_new () };
    zhashx_set_destructor (sw.instances, (zhashx_destructor_fn *) zstr_free);
    zlistx_set_destructor (sw.tasks, s_json_free);
    cn_mfind_opts_t opts = { .limit = SWEEP_BATCH, .sort = "_mtime" };
    if (cn_moray_find (self->moray, CN_BUCKET_TASKS, "(status=active)", &opts, s_collect_task,
                       &sw) != CN_MORAY_OK
        || (zlistx_size (sw.tasks)
            && cn_moray_find (self->moray, CN_BUCKET_INSTANCES, "(_key=*)", NULL,
                              s_collect_instance, &sw) != CN_MORAY_OK)) {
        self->store_failures++;
        s_set_error (self, "sweep", cn_moray_errmsg (self->moray));
        goto out;
    }
    if (!zlistx_size (sw.tasks))
        goto out;
    /* the dispatchers' Redis keys, in one round trip */
    zhashx_t *vals = zhashx_new ();
    zhashx_set_destructor (vals, (zhashx_destructor_fn *) zstr_free);
    zlistx_t *names = zlistx_new ();
    zlistx_set_duplicator (names, (zlistx_duplicator_fn *) strdup);
    zlistx_set_destructor (names, (zlistx_destructor_fn *) zstr_free);
    zlistx_set_comparator (names, (zlistx_comparator_fn *) strcmp);
    for (json_t *t = zlistx_first (sw.tasks); t; t = zlistx_next (sw.tasks)) {
        const char *in = json_string_value (json_object_get (t, "instance"));
        if (in && strcmp (in, self->cfg->instance) != 0 && !zlistx_find (names, (void *) in))
            zlistx_add_end (names, (void *) in);
    }
    if (zlistx_size (names) && cn_redis_ok (self->redis)) {
        redisContext *ctx = cn_redis_ctx (self->redis);
        for (const char *n = zlistx_first (names); n; n = zlistx_next (names))
            redisAppendCommand (ctx, "GET %s%s", CN_INSTANCE_KEY_PREFIX, n);
        for (const char *n = zlistx_first (names); n; n = zlistx_next (names)) {
            redisReply *r = NULL;
            if (redisGetReply (ctx, (void **) &r) != REDIS_OK) {
                cn_redis_failed (self->redis, ctx->errstr[0] ? ctx->errstr : "GET failed");
                break;
            }
            if (r->type == REDIS_REPLY_STRING)
                zhashx_update (vals, n, strdup (r->str));
            freeReplyObject (r);
        }
    }
    zlistx_destroy (&names);

    zhashx_t *servers = zhashx_new ();     /* uuid -> "ip port" */
    zhashx_set_destructor (servers, (zhashx_destructor_fn *) zstr_free);
    for (json_t *t = zlistx_first (sw.tasks); t; t = zlistx_next (sw.tasks)) {
        const char *id = json_string_value (json_object_get (t, "id"));
        const char *in = json_string_value (json_object_get (t, "instance"));
        const char *boot = json_string_value (json_object_get (t, "instance_boot"));
        const char *su = json_string_value (json_object_get (t, "server_uuid"));
        int64_t created = cn_task_created_ms (t);
        if (!id || strlen (id) != 36 || !su || zhashx_lookup (self->checking, id))
            continue;
        bool too_old = created > 0 && now - created > (int64_t) self->cfg->tasks_max_age_s * 1000;
        bool dead = !in || !boot || !s_instance_alive (self, &sw, vals, in, boot, now);
        if (!too_old && !dead)
            continue;
        if (zhashx_size (self->checking) >= CHECKS_MAX)
            break;
        /* where its agent is */
        char *addr = zhashx_lookup (servers, su);
        if (!addr) {
            cn_mobj_t o;
            memset (&o, 0, sizeof o);
            int rc = cn_moray_get (self->moray, CN_BUCKET_SERVERS, su, &o);
            if (rc == CN_MORAY_NOTFOUND) {
                self->swept++;
                s_fail_task (self, id, "AgentUnreachable", "the task's server no longer exists");
                continue;
            }
            if (rc != CN_MORAY_OK)
                break;
            json_error_t jerr;
            json_t *rec = json_loadb (o.value, o.value_len, 0, &jerr);
            cn_mobj_fini (&o);
            const char *ip = json_string_value (json_object_get (rec, "admin_ip"));
            json_t *p = json_object_get (rec, "agent_port");
            char buf[96];
            snprintf (buf, sizeof buf, "%s %d", ip ? ip : "-",
                      json_is_integer (p) ? (int) json_integer_value (p) : 5309);
            json_decref (rec);
            zhashx_insert (servers, su, strdup (buf));
            addr = zhashx_lookup (servers, su);
        }
        char ip[64] = "";
        int port = 0;
        if (sscanf (addr, "%63s %d", ip, &port) != 2)
            continue;
        CN_INFO (COMPONENT, "checking an orphaned task with its agent", "{s:s,s:s,s:s?,s:b}",
                 "task_id", id, "server_uuid", su, "instance", in, "too_old", too_old);
        self->checks++;
        zhashx_insert (self->checking, id, (void *) 1);
        hctx_t *h = s_hctx_new (self, H_CHECK, strcmp (ip, "-") == 0 ? "" : ip, port);
        snprintf (h->id, sizeof h->id, "%s", id);
        snprintf (h->uuid, sizeof h->uuid, "%s", su);
        h->created_ms = created > 0 ? created : now;
        char hdrs[256], path[64];
        s_headers (hdrs, sizeof hdrs, su, NULL, NULL, false);
        snprintf (path, sizeof path, "/tasks/%s", id);
        cn_httpc_request (self->http, h->ip, h->port, "GET", path, hdrs, NULL, 0, s_on_http, h);
    }
    zhashx_destroy (&servers);
    zhashx_destroy (&vals);
out:
    zhashx_destroy (&sw.instances);
    zlistx_destroy (&sw.tasks);
}

/* ------------------------------------------------------------------ */
/* The tick, STATUS                                                     */

static int
s_on_tick (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    int64_t now = cn_now_ms ();
    if (self->nwaiters)
        s_expire_waits (self, now);
    if (now >= self->next_sub_check_ms) {
        self->next_sub_check_ms = now + 1000;
        cn_redis_sub_check (self->sub);
        /* the command connection too (within cn_redis's backoff), so that
         * STATUS says "redis" from the start, not from the first publish */
        (void) cn_redis_ok (self->redis);
    }
    if (zhashx_size (self->waits)
        && (now >= self->next_safety_ms
            || (!cn_redis_sub_up (self->sub) && now >= self->next_poll_ms))) {
        s_check_all_waits (self);
        self->next_poll_ms = now + POLL_DOWN_MS;
        self->next_safety_ms = now + POLL_SAFETY_MS;
    }
    if (zlistx_size (self->retry))
        s_retry_frames (self, now);
    if (now >= self->next_sweep_ms) {
        self->next_sweep_ms = now + self->cfg->tasks_sweep_ms;
        s_sweep (self);
    }
    return 0;
}

static zframe_t *
s_status (self_t *self)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 36);
    cn_msgw_str (&w, "actor", "tasks");
    cn_msgw_str (&w, "state", !self->started ? "stopped"
                            : !self->bucket_ready ? "degraded" : "running");
    cn_msgw_uint (&w, "requests", self->requests);
    cn_msgw_uint (&w, "created", self->created);
    cn_msgw_uint (&w, "dispatched", self->dispatched);
    cn_msgw_uint (&w, "dispatch_failures", self->dispatch_failures);
    cn_msgw_uint (&w, "in_flight", self->http ? cn_httpc_in_flight (self->http) : 0);
    cn_msgw_uint (&w, "queued", self->http ? cn_httpc_queued (self->http) : 0);
    cn_msgw_uint (&w, "completed", self->completed);
    cn_msgw_uint (&w, "failed", self->failed);
    cn_msgw_uint (&w, "loads", self->loads);
    cn_msgw_uint (&w, "waits", self->nwaiters);
    cn_msgw_uint (&w, "waited_tasks", self->waits ? zhashx_size (self->waits) : 0);
    cn_msgw_uint (&w, "waits_total", self->waits_total);
    cn_msgw_uint (&w, "wait_timeouts", self->wait_timeouts);
    cn_msgw_uint (&w, "frames", self->frames);
    cn_msgw_uint (&w, "acks", self->acks);
    cn_msgw_uint (&w, "frame_retries", self->frame_retries);
    cn_msgw_uint (&w, "frames_pending", self->retry ? zlistx_size (self->retry) : 0);
    cn_msgw_uint (&w, "frames_dropped", self->frames_dropped);
    cn_msgw_uint (&w, "sweeps", self->sweeps);
    cn_msgw_uint (&w, "swept", self->swept);
    cn_msgw_uint (&w, "checks", self->checks);
    cn_msgw_uint (&w, "checks_in_flight", self->checking ? zhashx_size (self->checking) : 0);
    cn_msgw_uint (&w, "conflicts", self->conflicts);
    double passes = self->create_passes ? (double) self->create_passes : 1.0;
    cn_msgw_uint (&w, "address_hits", self->addr_hits);
    cn_msgw_double (&w, "create_batch_avg", (double) self->create_pass_requests / passes);
    cn_msgw_double (&w, "create_read_ms_avg", (double) self->pass_read_us / passes / 1000.0);
    cn_msgw_double (&w, "create_check_ms_avg", (double) self->pass_check_us / passes / 1000.0);
    cn_msgw_double (&w, "create_commit_ms_avg", (double) self->pass_commit_us / passes / 1000.0);
    cn_msgw_uint (&w, "store_failures", self->store_failures);
    cn_msgw_uint (&w, "publish_failures", self->publish_failures);
    cn_msgw_bool (&w, "pg", self->moray && cn_moray_connected (self->moray));
    cn_msgw_bool (&w, "redis", self->redis && cn_redis_connected (self->redis));
    cn_msgw_bool (&w, "subscription", cn_redis_sub_up (self->sub));
    cn_msgw_str (&w, "last_error", self->last_error);
    return cn_msgw_frame (&w);
}

static int
s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    zmsg_t *msg = zmsg_recv (sock);
    if (!msg)
        return 0;
    zframe_t *f = s_status (self);
    zframe_send (&f, sock, 0);
    zmsg_destroy (&msg);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Start, stop                                                          */

static int
s_start (self_t *self, char *reason, size_t rlen)
{
    const cn_config_t *cfg = self->cfg;
    self->moray = cn_moray_new (cfg->pg_conninfo, cfg->pg_timeout_ms);
    self->redis = cn_redis_new (cfg->redis_url, cfg->redis_timeout_ms, COMPONENT);
    self->sub = cn_redis_sub_new (cfg->redis_url, cfg->redis_timeout_ms, "tasks-sub",
                                  CN_TASKS_CHANNEL);
    self->pull = zsock_new (ZMQ_PULL);
    self->fsock = zsock_new (ZMQ_PULL);
    if (!self->moray || !self->redis || !self->sub || !self->pull || !self->fsock) {
        snprintf (reason, rlen, "out of memory");
        return -1;
    }
    zsock_set_rcvhwm (self->pull, 100000);
    zsock_set_rcvhwm (self->fsock, 100000);
    if (zsock_connect (self->pull, "%s", CN_TASKS_ENDPOINT) != 0) {
        snprintf (reason, rlen, "cannot connect %s", CN_TASKS_ENDPOINT);
        return -1;
    }
    if (zsock_bind (self->fsock, "%s", CN_TASKS_FRAMES_ENDPOINT) != 0) {
        snprintf (reason, rlen, "bind %s: %s", CN_TASKS_FRAMES_ENDPOINT,
                  zmq_strerror (zmq_errno ()));
        return -1;
    }
    self->ctl = cn_ctl_bind ("tasks");
    if (!self->ctl) {
        snprintf (reason, rlen, "cannot bind the control socket");
        return -1;
    }
    self->http = cn_httpc_new (self->loop, cfg->tasks_per_agent, cfg->tasks_agent_timeout_ms);
    zloop_reader (self->loop, self->pull, s_on_pull, self);
    zloop_reader (self->loop, self->fsock, s_on_frames, self);
    zloop_reader (self->loop, self->ctl, s_on_ctl, self);
    zloop_timer (self->loop, TICK_MS, 0, s_on_tick, self);
    /* the bucket now if the store answers; a store that is down is not
     * fatal (every use tries again) */
    if (!s_bucket (self))
        CN_WARN (COMPONENT, "store unreachable at start; will create the tasks bucket later",
                 "{s:s}", "error", cn_moray_errmsg (self->moray));
    cn_redis_sub_attach (self->sub, self->loop, s_sub_message, s_sub_up, s_sub_down, self);
    cn_redis_sub_try (self->sub);
    int64_t now = cn_now_ms ();
    self->next_sweep_ms = now + cfg->tasks_sweep_ms;
    self->next_sub_check_ms = now;      /* the first tick (100 ms) connects */
    self->started = true;
    CN_INFO (COMPONENT, "tasks ready", "{s:i,s:i,s:i,s:i}", "per_agent", cfg->tasks_per_agent,
             "agent_timeout_ms", cfg->tasks_agent_timeout_ms, "sweep_ms", cfg->tasks_sweep_ms,
             "max_age_s", cfg->tasks_max_age_s);
    return 0;
}

static int
s_on_pipe (zloop_t *loop, zsock_t *pipe, void *arg)
{
    self_t *self = arg;
    zmsg_t *msg = zmsg_recv (pipe);
    if (!msg)
        return -1;
    char *cmd = zmsg_popstr (msg);
    int rc = 0;
    if (!cmd || streq (cmd, "$TERM"))
        rc = -1;
    else if (streq (cmd, "START")) {
        char reason[256] = "";
        if (self->started || s_start (self, reason, sizeof reason) == 0)
            zstr_send (pipe, "OK");
        else
            zstr_sendx (pipe, "ERROR", reason, NULL);
    }
    else if (streq (cmd, "STATUS")) {
        zframe_t *f = s_status (self);
        zframe_send (&f, pipe, 0);
    }
    free (cmd);
    zmsg_destroy (&msg);
    return rc;
}

void
cn_tasks_actor (zsock_t *pipe, void *args)
{
    self_t *self = calloc (1, sizeof *self);
    if (!self)
        abort ();
    self->args = args;
    self->cfg = self->args->cfg;
    self->pipe = pipe;
    self->hctx.next = self->hctx.prev = &self->hctx;
    self->loop = zloop_new ();
    self->waits = zhashx_new ();
    zhashx_set_destructor (self->waits, s_waitlist_free);
    self->checking = zhashx_new ();
    zhashx_set_destructor (self->checking, NULL);
    zhashx_set_duplicator (self->checking, NULL);
    self->retry = zlistx_new ();
    zlistx_set_destructor (self->retry, s_fretry_free);
    self->pc = calloc (PASS_MAX, sizeof *self->pc);
    self->srv = zhashx_new ();
    self->addr = zhashx_new ();
    if (!self->pc || !self->srv || !self->addr)
        abort ();
    zhashx_set_destructor (self->srv, s_srv_free);
    zhashx_set_destructor (self->addr, s_srv_free);
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);
    zloop_start (self->loop);

    /* waits still held get no answer: the gateway is gone by now */
    cn_httpc_destroy (&self->http);
    while (self->hctx.next != &self->hctx)
        s_hctx_free (self->hctx.next);
    cn_redis_sub_destroy (&self->sub);
    zloop_destroy (&self->loop);
    zsock_destroy (&self->pull);
    zsock_destroy (&self->fsock);
    zsock_destroy (&self->ctl);
    zhashx_destroy (&self->waits);
    zhashx_destroy (&self->checking);
    zlistx_destroy (&self->retry);
    zhashx_destroy (&self->srv);
    zhashx_destroy (&self->addr);
    for (size_t i = 0; i < self->npc; i++) {
        free (self->pc[i].text);
        json_decref (self->pc[i].agent_params);
    }
    free (self->pc);
    cn_moray_destroy (&self->moray);
    cn_redis_destroy (&self->redis);
    free (self);
}
