/*
 * cn_waitlist: the waitlist service (include/cn_waitlist.h, docs/waitlist.md).
 *
 * Theory of operation
 *
 * One actor per instance, a zloop on: the PULL of gateway requests, the
 * pipe, the control socket, a Redis subscription, and timers. It blocks on
 * PostgreSQL for at most the store's timeout per call, never on a client.
 *
 * Strictly one active ticket per queue (server, scope, id), leader-free.
 * Every change of a queue (create, release, delete, expiry) is one
 * transaction that first locks the queue's row in cnapi_waitlist_queues
 * (SELECT ... FOR UPDATE; the row is inserted with "must not exist" the
 * first time, a lost race just means it exists), then reads the queue's
 * queued and active tickets in seq order, changes them in memory
 * (cn_ticket_settle: expired ones expire, and when none is active the
 * first queued one becomes active), writes what changed and commits. Two
 * instances changing one queue therefore serialise on the row lock, and
 * each sees the other's committed state: no two tickets of a queue are
 * ever active at once. The queue row also holds the counter that gives
 * each new ticket its seq, so the order is creation (commit) order, the
 * same on every instance.
 *
 * After the commit every changed ticket is announced on the Redis channel
 * cnapi:tickets ("<ticket_uuid> <status>"). Held waits (GET
 * /tickets/:t/wait) are kept in memory per ticket; a notice for a held
 * ticket (from any instance, or our own commit) triggers a store read of
 * that ticket, and the store's answer decides: active -> 204, expired or
 * finished or gone -> the error, queued -> keep waiting. A notice is only
 * a hint, so a lost one costs latency, not correctness: held tickets are
 * polled every POLL_UP_MS while the subscription is up, every POLL_DOWN_MS
 * while it is down.
 *
 * Expiry: every instance runs a sweep every SWEEP_MS that finds queued or
 * active tickets past expires_at and settles their queues with the same
 * locked transaction, so it does not matter how many instances see it.
 */
#include "cn_waitlist.h"

#include <inttypes.h>
#include <string.h>

#include "cn_actor.h"
#include "cn_backend.h"
#include "cn_filter.h"
#include "cn_log.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_params.h"
#include "cn_redis.h"
#include "cn_redis_sub.h"
#include "cn_server.h"
#include "cn_svc.h"
#include "cn_ticket.h"
#include "cn_util.h"

#define COMPONENT "waitlist"
#define TICK_MS 100
#define POLL_UP_MS 2000
#define POLL_DOWN_MS 250
#define SWEEP_MS 1000
#define SUB_RETRY_MS 1000
#define TXN_ATTEMPTS 5
#define SWEEP_BATCH 200
#define LIST_LIMIT 1000

typedef struct {
    uint64_t id;              /* the gateway's request id */
    char req_id[64];
    int64_t deadline_ms;
} waiter_t;

typedef struct {
    const cn_config_t *cfg;
    cn_backend_args_t *args;
    zsock_t *pipe;
    zsock_t *pull;
    zsock_t *ctl;
    zloop_t *loop;
    bool started;
    cn_moray_t *moray;
    cn_redis_t *redis;        /* commands: PUBLISH */
    cn_redis_sub_t *sub;      /* the subscription */
    bool buckets_ready;
    zhashx_t *waiters;        /* ticket uuid -> zlistx_t of waiter_t* */
    size_t nwaiters;
    int64_t last_poll_ms, last_sweep_ms, last_sub_try_ms, last_redis_try_ms;
    /* counters for STATUS */
    uint64_t requests, created, released, deleted, expired, activated, notices, polls,
        publish_failed, conflicts, wait_timeouts, replies_2xx, replies_4xx, replies_5xx;
} self_t;

typedef struct {
    uint64_t id;
    const char *req_id;
    char req_id_buf[64];
} rctx_t;

/* ------------------------------------------------------------------ */
/* Replies                                                              */

static void
s_count (self_t *self, int status)
{
    if (status >= 500)
        self->replies_5xx++;
    else if (status >= 400)
        self->replies_4xx++;
    else
        self->replies_2xx++;
}

static void
s_json (self_t *self, uint64_t id, int status, json_t *o)
{
    s_count (self, cn_svc_reply_json (self->args->receiver, id, status, o));
}

static void
s_fail (self_t *self, const rctx_t *c, cn_apierr_t *e)
{
    s_count (self, cn_svc_reply_apierr (self->args->receiver, c->id, c->req_id, COMPONENT, e));
    cn_apierr_fini (e);
}

#define S_ERROR(self, id, req_id, status, code, ...) \
    s_count ((self), cn_svc_reply_error ((self)->args->receiver, (id), (req_id), COMPONENT, \
                                         (status), (code), __VA_ARGS__))

static void
s_store_error (self_t *self, cn_apierr_t *e, int rc)
{
    cn_apierr_set (e, 500, "InternalError", rc == CN_MORAY_EIO
                   ? "the store is unreachable: %s" : "store error: %s",
                   cn_moray_errmsg (self->moray));
}

/* ------------------------------------------------------------------ */
/* Store                                                                */

static int
s_buckets (self_t *self, cn_apierr_t *e)
{
    if (self->buckets_ready)
        return 0;
    int rc = cn_moray_put_bucket (self->moray, CN_BUCKET_TICKETS, cn_ticket_index,
                                  cn_ticket_nindex);
    if (rc == CN_MORAY_OK)
        rc = cn_moray_put_bucket (self->moray, CN_BUCKET_TICKET_QUEUES, cn_ticket_queue_index,
                                  cn_ticket_queue_nindex);
    if (rc != CN_MORAY_OK) {
        s_store_error (self, e, rc);
        return -1;
    }
    self->buckets_ready = true;
    return 0;
}

/* Read one ticket: 1 found (*out), 0 absent, -1 error (e set). */
static int
s_ticket_read (self_t *self, const char *uuid, json_t **out, cn_apierr_t *e)
{
    *out = NULL;
    if (s_buckets (self, e) != 0)
        return -1;
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_TICKETS, uuid, &o);
    if (rc == CN_MORAY_NOTFOUND)
        return 0;
    if (rc != CN_MORAY_OK) {
        s_store_error (self, e, rc);
        return -1;
    }
    json_error_t jerr;
    json_t *t = json_loadb (o.value, o.value_len, 0, &jerr);
    cn_mobj_fini (&o);
    if (!cn_ticket_valid (t)) {
        if (t)
            json_decref (t);
        cn_apierr_set (e, 500, "InternalError", "stored ticket %s is not a ticket", uuid);
        return -1;
    }
    *out = t;
    return 1;
}

static int
s_collect (const cn_mobj_t *obj, void *arg)
{
    json_error_t jerr;
    json_t *t = json_loadb (obj->value, obj->value_len, 0, &jerr);
    if (cn_ticket_valid (t))
        json_array_append_new (arg, t);
    else {
        CN_WARN (COMPONENT, "stored ticket is not a ticket", "{s:s}", "ticket", obj->key);
        if (t)
            json_decref (t);
    }
    return 0;
}

/* Tickets matching filter, sorted by sort (an index) ascending. */
static int
s_find (self_t *self, const char *filter, const char *sort, int64_t limit, json_t **out)
{
    *out = json_array ();
    cn_mfind_opts_t opts = { .limit = limit, .sort = sort };
    int rc = cn_moray_find (self->moray, CN_BUCKET_TICKETS, filter, &opts, s_collect, *out);
    if (rc != CN_MORAY_OK) {
        json_decref (*out);
        *out = NULL;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Notices and waits                                                    */

static void
s_publish (self_t *self, const char *uuid, const char *status)
{
    if (!cn_redis_ok (self->redis)) {
        self->publish_failed++;
        return;
    }
    redisReply *r = cn_redis_cmd (self->redis, "PUBLISH %s %s %s", CN_TICKETS_CHANNEL, uuid,
                                  status);
    if (!r)
        self->publish_failed++;
    else
        freeReplyObject (r);
}

/* Answer every waiter of ticket with status (and an error when not 204). */
static void
s_answer_waiters (self_t *self, const char *ticket, int status, const char *code,
                  const char *message)
{
    zlistx_t *l = zhashx_lookup (self->waiters, ticket);
    if (!l)
        return;
    for (waiter_t *w = zlistx_first (l); w; w = zlistx_next (l)) {
        if (status == 204)
            s_count (self, cn_svc_reply (self->args->receiver, w->id, 204, NULL, 0));
        else
            S_ERROR (self, w->id, w->req_id, status, code, "%s", message);
        self->nwaiters--;
    }
    zhashx_delete (self->waiters, ticket);
}

/* The store says what ticket is now; answer its waiters if it is decided.
 * A store error leaves them waiting (the next poll tries again). */
static void
s_check (self_t *self, const char *ticket)
{
    if (!zhashx_lookup (self->waiters, ticket))
        return;
    cn_apierr_t e = { 0 };
    json_t *t = NULL;
    int rc = s_ticket_read (self, ticket, &t, &e);
    char msg[128];
    if (rc < 0) {
        CN_DEBUG (COMPONENT, "ticket check failed", "{s:s,s:s}", "ticket", ticket,
                  "error", e.message);
        cn_apierr_fini (&e);
        return;
    }
    if (rc == 0) {
        snprintf (msg, sizeof msg, "no such ticket %s", ticket);
        s_answer_waiters (self, ticket, 404, "ResourceNotFound", msg);
        return;
    }
    const char *st = json_string_value (json_object_get (t, "status"));
    if (strcmp (st, "active") == 0)
        s_answer_waiters (self, ticket, 204, NULL, NULL);
    else if (strcmp (st, "expired") == 0)
        s_answer_waiters (self, ticket, 500, "InternalError", "ticket has expired");
    else if (strcmp (st, "finished") == 0) {
        snprintf (msg, sizeof msg, "ticket %s is finished", ticket);
        s_answer_waiters (self, ticket, 500, "InternalError", msg);
    }
    json_decref (t);
}

/* After our own commit: announce, and settle our own waiters at once. */
static void
s_announce (self_t *self, const json_t *changed, const char *deleted)
{
    size_t i;
    json_t *t;
    json_array_foreach (changed, i, t) {
        const char *u = json_string_value (json_object_get (t, "uuid"));
        const char *st = json_string_value (json_object_get (t, "status"));
        if (!u || !st)
            continue;
        if (strcmp (st, "active") == 0)
            self->activated++;
        else if (strcmp (st, "expired") == 0)
            self->expired++;
        s_publish (self, u, st);
        s_check (self, u);
    }
    if (deleted) {
        s_publish (self, deleted, "deleted");
        s_check (self, deleted);
    }
}

/* ------------------------------------------------------------------ */
/* The queue transaction                                                */

typedef enum { Q_CREATE, Q_RELEASE, Q_DELETE, Q_SETTLE } qop_t;

/* Change one queue under its row lock (see the top of the file).
 * ticket: the new ticket (Q_CREATE, its seq is set here) or the target
 * (Q_RELEASE, Q_DELETE; as read before). On success 0; *queue_out (may be
 * NULL) gets the queue's open tickets after the change (new reference) and
 * changed the tickets written. -1 with e set on failure (nothing written). */
static int
s_queue_txn (self_t *self, qop_t op, json_t *ticket, json_t **queue_out, json_t *changed,
             cn_apierr_t *e)
{
    const char *qkey = json_string_value (json_object_get (ticket, "queue"));
    const char *server = json_string_value (json_object_get (ticket, "server_uuid"));
    const char *target = json_string_value (json_object_get (ticket, "uuid"));
    if (s_buckets (self, e) != 0)
        return -1;
    char *fq = cn_filter_escape (qkey);
    size_t flen = strlen (fq) + 64;
    char *filter = malloc (flen);
    if (!filter)
        abort ();
    snprintf (filter, flen, "(&(queue=%s)(|(status=active)(status=queued)))", fq);
    free (fq);
    int rc = CN_MORAY_OK;
    for (int attempt = 0; attempt < TXN_ATTEMPTS; attempt++) {
        json_array_clear (changed);
        cn_mobj_t qo;
        memset (&qo, 0, sizeof qo);
        const char *keys[] = { qkey };
        rc = cn_moray_begin (self->moray);
        if (rc == CN_MORAY_OK)
            rc = cn_moray_get_many_locked (self->moray, CN_BUCKET_TICKET_QUEUES, keys, 1, &qo);
        if (rc != CN_MORAY_OK) {
            cn_moray_rollback (self->moray);
            break;
        }
        if (!qo.key) {
            /* the queue's first ticket: make its row, then lock it */
            cn_moray_rollback (self->moray);
            json_t *q = json_pack ("{s:s,s:i}", "server_uuid", server, "next", 0);
            char *qtext = json_dumps (q, JSON_COMPACT);
            json_decref (q);
            rc = cn_moray_put (self->moray, CN_BUCKET_TICKET_QUEUES, qkey, qtext,
                               CN_MORAY_ETAG_NULL, NULL, NULL);
            free (qtext);
            if (rc != CN_MORAY_OK && rc != CN_MORAY_CONFLICT)
                break;
            continue;
        }
        json_error_t jerr;
        json_t *queue = json_loadb (qo.value, qo.value_len, 0, &jerr);
        char qetag[9];
        memcpy (qetag, qo.etag, sizeof qetag);
        cn_mobj_fini (&qo);
        if (!json_is_object (queue)) {
            if (queue)
                json_decref (queue);
            queue = json_pack ("{s:s,s:i}", "server_uuid", server, "next", 0);
        }
        json_t *open = NULL;
        rc = s_find (self, filter, "seq", 0, &open);
        if (rc != CN_MORAY_OK) {
            json_decref (queue);
            cn_moray_rollback (self->moray);
            break;
        }
        int64_t now = cn_now_ms ();
        bool queue_dirty = false, del = false;
        size_t i;
        json_t *t;
        if (op == Q_CREATE) {
            char iso[32];
            cn_iso8601 (now, iso, sizeof iso);
            json_object_set_new (ticket, "status", json_string ("queued"));
            /* created at the lock: creation order = seq order everywhere */
            json_object_set_new (ticket, "created_at", json_string (iso));
            json_object_set_new (ticket, "updated_at", json_string (iso));
            json_int_t next = json_integer_value (json_object_get (queue, "next")) + 1;
            json_object_set_new (queue, "next", json_integer (next));
            json_object_set_new (ticket, "seq", json_integer (next));
            json_array_append (open, ticket);
            json_array_append (changed, ticket);
            queue_dirty = true;
        }
        else if (op == Q_RELEASE || op == Q_DELETE) {
            json_array_foreach (open, i, t) {
                if (strcmp (json_string_value (json_object_get (t, "uuid")), target) != 0)
                    continue;
                if (op == Q_RELEASE) {
                    char iso[32];
                    json_object_set_new (t, "status", json_string ("finished"));
                    json_object_set_new (t, "updated_at",
                                         json_string (cn_iso8601 (now, iso, sizeof iso)));
                    json_array_append (changed, t);
                }
                else
                    json_array_remove (open, i);
                break;
            }
            del = op == Q_DELETE;
        }
        cn_ticket_settle (open, now, changed);

        /* the writes: changed tickets, the queue row, the deletion */
        size_t n = json_array_size (changed);
        cn_mop_t *ops = calloc (n + 2, sizeof *ops);
        char **texts = calloc (n + 2, sizeof *texts);
        if (!ops || !texts)
            abort ();
        size_t k = 0;
        json_array_foreach (changed, i, t) {
            /* a deleted ticket is not written back */
            if (del && strcmp (json_string_value (json_object_get (t, "uuid")), target) == 0)
                continue;
            texts[k] = json_dumps (t, JSON_COMPACT);
            ops[k] = (cn_mop_t) { CN_MOP_PUT, CN_BUCKET_TICKETS,
                                  json_string_value (json_object_get (t, "uuid")),
                                  texts[k], NULL, "", 0 };
            k++;
        }
        if (queue_dirty) {
            texts[k] = json_dumps (queue, JSON_COMPACT);
            ops[k] = (cn_mop_t) { CN_MOP_PUT, CN_BUCKET_TICKET_QUEUES, qkey, texts[k], qetag,
                                  "", 0 };
            k++;
        }
        if (del) {
            ops[k] = (cn_mop_t) { CN_MOP_DEL, CN_BUCKET_TICKETS, target, NULL, NULL, "", 0 };
            k++;
        }
        rc = k ? cn_moray_batch (self->moray, ops, k, NULL) : CN_MORAY_OK;
        if (rc == CN_MORAY_OK)
            rc = cn_moray_commit (self->moray);
        else
            cn_moray_rollback (self->moray);
        for (size_t j = 0; j < k; j++)
            free (texts[j]);
        free (texts);
        free (ops);
        json_decref (queue);
        if (rc == CN_MORAY_OK) {
            if (queue_out)
                *queue_out = open;
            else
                json_decref (open);
            free (filter);
            return 0;
        }
        json_decref (open);
        if (rc == CN_MORAY_NOTFOUND && del) {
            /* deleted by someone else meanwhile: nothing left to do */
            free (filter);
            return 0;
        }
        if (rc != CN_MORAY_CONFLICT)
            break;
        self->conflicts++;
    }
    free (filter);
    if (rc == CN_MORAY_OK || rc == CN_MORAY_CONFLICT)
        cn_apierr_set (e, 500, "InternalError", "the queue kept changing, try again");
    else
        s_store_error (self, e, rc);
    return -1;
}

/* ------------------------------------------------------------------ */
/* Requests                                                             */

/* The server of /servers/:uuid/tickets: "default" or an existing server.
 * false with e set (409, 404, 500). */
static bool
s_server (self_t *self, const cn_msg_t *m, char uuid[37], cn_apierr_t *e)
{
    size_t len = 0;
    const char *raw = cn_msg_str (m, "uuid", &len);
    if (raw && len == 7 && memcmp (raw, "default", 7) == 0) {
        strcpy (uuid, "default");
        return true;
    }
    if (!cn_params_server_uuid (m, uuid, e))
        return false;
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_SERVERS, uuid, &o);
    if (rc == CN_MORAY_OK) {
        cn_mobj_fini (&o);
        return true;
    }
    if (rc == CN_MORAY_NOTFOUND)
        cn_apierr_set (e, 404, "ResourceNotFound", "Server %s not found", uuid);
    else
        s_store_error (self, e, rc);
    return false;
}

/* The :ticket_uuid path segment, lower-cased; false when not a uuid. */
static bool
s_ticket_id (const cn_msg_t *m, char uuid[37], char *raw_out, size_t rawlen)
{
    size_t len = 0;
    const char *raw = cn_msg_str (m, "sub", &len);
    snprintf (raw_out, rawlen, "%.*s", raw ? (int) (len < 64 ? len : 64) : 0, raw ? raw : "");
    return cn_uuid_normalize (raw_out, uuid);
}

static json_t *
s_views (const json_t *tickets)
{
    json_t *out = json_array ();
    size_t i;
    json_t *t;
    json_array_foreach (tickets, i, t)
        json_array_append_new (out, cn_ticket_view (t));
    return out;
}

static void
s_op_create (self_t *self, const cn_msg_t *m, const rctx_t *c)
{
    cn_apierr_t e = { 0 };
    char server[37];
    json_t *params = cn_params_parse (m, &e);
    if (!params || !s_server (self, m, server, &e)) {
        if (params)
            json_decref (params);
        s_fail (self, c, &e);
        return;
    }
    char uuid[37];
    cn_uuid_new (uuid);
    json_t *t = cn_ticket_new (server, params, c->req_id, cn_now_ms (), uuid, &e);
    json_decref (params);
    if (!t) {
        s_fail (self, c, &e);
        return;
    }
    json_t *queue = NULL, *changed = json_array ();
    if (s_queue_txn (self, Q_CREATE, t, &queue, changed, &e) != 0) {
        json_decref (t);
        json_decref (changed);
        s_fail (self, c, &e);
        return;
    }
    self->created++;
    CN_INFO (COMPONENT, "ticket created", "{s:s?,s:s,s:s,s:O}", "req_id", c->req_id,
             "ticket", uuid, "server_uuid", server, "status", json_object_get (t, "status"));
    json_t *body = json_pack ("{s:s,s:o}", "uuid", uuid, "queue", s_views (queue));
    s_json (self, c->id, 202, body);
    s_announce (self, changed, NULL);
    json_decref (queue);
    json_decref (changed);
    json_decref (t);
}

static void
s_op_list (self_t *self, const cn_msg_t *m, const rctx_t *c)
{
    cn_apierr_t e = { 0 };
    char server[37];
    json_t *params = cn_params_parse (m, &e);
    if (!params || !s_server (self, m, server, &e) || s_buckets (self, &e) != 0) {
        if (params)
            json_decref (params);
        s_fail (self, c, &e);
        return;
    }
    json_decref (params);
    char filter[80];
    snprintf (filter, sizeof filter, "(server_uuid=%s)", server);
    json_t *list = NULL;
    int rc = s_find (self, filter, "created_at", LIST_LIMIT, &list);
    if (rc != CN_MORAY_OK) {
        s_store_error (self, &e, rc);
        s_fail (self, c, &e);
        return;
    }
    s_json (self, c->id, 200, s_views (list));
    json_decref (list);
}

static void
s_op_delete_all (self_t *self, const cn_msg_t *m, const rctx_t *c)
{
    cn_apierr_t e = { 0 };
    char server[37];
    json_t *params = cn_params_parse (m, &e);
    if (!params || !s_server (self, m, server, &e) || s_buckets (self, &e) != 0) {
        if (params)
            json_decref (params);
        s_fail (self, c, &e);
        return;
    }
    json_t *force = json_object_get (params, "force");
    bool ok = json_is_true (force)
              || (json_is_string (force) && strcmp (json_string_value (force), "true") == 0);
    json_decref (params);
    if (!ok) {
        S_ERROR (self, c->id, c->req_id, 412, "PreconditionFailed",
                 "Will not delete all tickets without ?force=true");
        return;
    }
    char filter[80];
    snprintf (filter, sizeof filter, "(server_uuid=%s)", server);
    /* bounded: at most 100 rounds of LIST_LIMIT tickets, each ticket
     * through its queue's transaction so no queue is left without an
     * active ticket by a half-seen deletion */
    for (int round = 0; round < 100; round++) {
        json_t *list = NULL;
        int rc = s_find (self, filter, "created_at", LIST_LIMIT, &list);
        if (rc != CN_MORAY_OK) {
            s_store_error (self, &e, rc);
            s_fail (self, c, &e);
            return;
        }
        size_t n = json_array_size (list), i;
        json_t *t;
        json_array_foreach (list, i, t) {
            json_t *changed = json_array ();
            if (s_queue_txn (self, Q_DELETE, t, NULL, changed, &e) != 0) {
                json_decref (changed);
                json_decref (list);
                s_fail (self, c, &e);
                return;
            }
            self->deleted++;
            s_announce (self, changed, json_string_value (json_object_get (t, "uuid")));
            json_decref (changed);
        }
        json_decref (list);
        if (n == 0)
            break;
    }
    s_count (self, cn_svc_reply (self->args->receiver, c->id, 204, NULL, 0));
}

/* Common start for /tickets/:t routes: the ticket (404 when not there). */
static json_t *
s_begin_ticket (self_t *self, const cn_msg_t *m, const rctx_t *c, char uuid[37],
                json_t **params_out, const char *notfound_fmt)
{
    cn_apierr_t e = { 0 };
    char raw[80];
    json_t *params = cn_params_parse (m, &e);
    if (!params) {
        s_fail (self, c, &e);
        return NULL;
    }
    json_t *t = NULL;
    int rc = 0;
    if (s_ticket_id (m, uuid, raw, sizeof raw))
        rc = s_ticket_read (self, uuid, &t, &e);
    if (rc < 0) {
        json_decref (params);
        s_fail (self, c, &e);
        return NULL;
    }
    if (rc == 0) {
        json_decref (params);
        S_ERROR (self, c->id, c->req_id, 404, "ResourceNotFound", notfound_fmt, raw);
        return NULL;
    }
    if (params_out)
        *params_out = params;
    else
        json_decref (params);
    return t;
}

static void
s_op_get (self_t *self, const cn_msg_t *m, const rctx_t *c)
{
    char uuid[37];
    json_t *t = s_begin_ticket (self, m, c, uuid, NULL, "ticket %s not found");
    if (!t)
        return;
    s_json (self, c->id, 200, cn_ticket_view (t));
    json_decref (t);
}

static void
s_op_release_delete (self_t *self, const cn_msg_t *m, const rctx_t *c, bool del)
{
    char uuid[37];
    json_t *t = s_begin_ticket (self, m, c, uuid, NULL, "ticket %s not found");
    if (!t)
        return;
    cn_apierr_t e = { 0 };
    json_t *changed = json_array ();
    if (s_queue_txn (self, del ? Q_DELETE : Q_RELEASE, t, NULL, changed, &e) != 0) {
        json_decref (changed);
        json_decref (t);
        s_fail (self, c, &e);
        return;
    }
    if (del)
        self->deleted++;
    else
        self->released++;
    CN_INFO (COMPONENT, del ? "ticket deleted" : "ticket released", "{s:s?,s:s}",
             "req_id", c->req_id, "ticket", uuid);
    s_count (self, cn_svc_reply (self->args->receiver, c->id, 204, NULL, 0));
    s_announce (self, changed, del ? uuid : NULL);
    json_decref (changed);
    json_decref (t);
}

static void
s_op_wait (self_t *self, const cn_msg_t *m, const rctx_t *c)
{
    char uuid[37];
    json_t *params = NULL;
    json_t *t = s_begin_ticket (self, m, c, uuid, &params, "no such ticket %s");
    if (!t)
        return;
    /* optional timeout (seconds, ours: the reference has none) */
    int64_t timeout_ms = (int64_t) CN_WAIT_MAX_S * 1000;
    json_t *to = json_object_get (params, "timeout");
    if (to && !json_is_null (to)) {
        double d = -1;
        if (json_is_number (to))
            d = json_number_value (to);
        else if (json_is_string (to)) {
            char *end = NULL;
            d = strtod (json_string_value (to), &end);
            if (!end || *end || end == json_string_value (to))
                d = -1;
        }
        if (!(d > 0)) {
            json_decref (params);
            json_decref (t);
            cn_apierr_t e = { 0 };
            cn_apierr_set (&e, 500, "InvalidParameters", "Request parameters failed validation");
            e.errors = json_pack ("[{s:s,s:s,s:s}]", "field", "timeout", "code", "Invalid",
                                  "message", "timeout must be a number of seconds above 0");
            s_fail (self, c, &e);
            return;
        }
        if (d < CN_WAIT_MAX_S)
            timeout_ms = (int64_t) (d * 1000) > 0 ? (int64_t) (d * 1000) : 1;
    }
    json_decref (params);
    const char *st = json_string_value (json_object_get (t, "status"));
    if (strcmp (st, "active") == 0)
        s_count (self, cn_svc_reply (self->args->receiver, c->id, 204, NULL, 0));
    else if (strcmp (st, "expired") == 0)
        S_ERROR (self, c->id, c->req_id, 500, "InternalError", "ticket %s is expired", uuid);
    else if (strcmp (st, "finished") == 0)
        S_ERROR (self, c->id, c->req_id, 500, "InternalError", "ticket %s is finished", uuid);
    else {
        waiter_t *w = calloc (1, sizeof *w);
        if (!w)
            abort ();
        w->id = c->id;
        snprintf (w->req_id, sizeof w->req_id, "%s", c->req_id ? c->req_id : "");
        w->deadline_ms = cn_now_ms () + timeout_ms;
        zlistx_t *l = zhashx_lookup (self->waiters, uuid);
        if (!l) {
            l = zlistx_new ();
            zlistx_set_destructor (l, (zlistx_destructor_fn *) zstr_free);
            zhashx_insert (self->waiters, uuid, l);
        }
        zlistx_add_end (l, w);
        self->nwaiters++;
    }
    json_decref (t);
}

static int
s_on_request (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    zframe_t *f = zframe_recv (sock);
    if (!f)
        return 0;
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_ERROR (COMPONENT, "bad request from the gateway", "{s:s}", "error", err);
        zframe_destroy (&f);
        return 0;
    }
    rctx_t c;
    memset (&c, 0, sizeof c);
    if (!cn_msg_uint (&m, "id", &c.id)) {
        CN_ERROR (COMPONENT, "gateway request without an id", NULL);
        cn_msg_fini (&m);
        zframe_destroy (&f);
        return 0;
    }
    size_t rlen = 0;
    const char *rid = cn_msg_str (&m, "req_id", &rlen);
    if (rid) {
        if (rlen >= sizeof c.req_id_buf)
            rlen = sizeof c.req_id_buf - 1;
        memcpy (c.req_id_buf, rid, rlen);
        c.req_id = c.req_id_buf;
    }
    self->requests++;
    if (cn_msg_is (&m, "ticket_create"))
        s_op_create (self, &m, &c);
    else if (cn_msg_is (&m, "ticket_list"))
        s_op_list (self, &m, &c);
    else if (cn_msg_is (&m, "ticket_delete_all"))
        s_op_delete_all (self, &m, &c);
    else if (cn_msg_is (&m, "ticket_get"))
        s_op_get (self, &m, &c);
    else if (cn_msg_is (&m, "ticket_delete"))
        s_op_release_delete (self, &m, &c, true);
    else if (cn_msg_is (&m, "ticket_release"))
        s_op_release_delete (self, &m, &c, false);
    else if (cn_msg_is (&m, "ticket_wait"))
        s_op_wait (self, &m, &c);
    else {
        CN_ERROR (COMPONENT, "unknown gateway request type", "{s:s%}", "type", m.type,
                  m.type_len);
        S_ERROR (self, c.id, c.req_id, 500, "InternalError", "unknown request type");
    }
    cn_msg_fini (&m);
    zframe_destroy (&f);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Subscription                                                         */

static void
s_sub_up (void *arg)
{
    CN_INFO (COMPONENT, "ticket notice subscription up", "{s:s}", "channel",
             CN_TICKETS_CHANNEL);
}

static void
s_sub_down (void *arg, const char *why)
{
    CN_WARN (COMPONENT, "ticket notice subscription lost; polling", "{s:s}", "reason", why);
}

static void
s_sub_message (void *arg, const char *payload)
{
    self_t *self = arg;
    char raw[40], uuid[37];
    if (sscanf (payload, "%39s", raw) != 1 || !cn_uuid_normalize (raw, uuid))
        return;
    self->notices++;
    s_check (self, uuid);
}

/* ------------------------------------------------------------------ */
/* Timers: deadlines, polling, the expiry sweep, resubscribing          */

static void
s_sweep (self_t *self)
{
    cn_apierr_t e = { 0 };
    if (s_buckets (self, &e) != 0) {
        cn_apierr_fini (&e);
        return;
    }
    char filter[128];
    snprintf (filter, sizeof filter,
              "(&(|(status=active)(status=queued))(expires_ms<=%" PRId64 "))", cn_now_ms ());
    json_t *list = NULL;
    if (s_find (self, filter, "seq", SWEEP_BATCH, &list) != CN_MORAY_OK)
        return;
    zhashx_t *done = zhashx_new ();
    size_t i;
    json_t *t;
    json_array_foreach (list, i, t) {
        const char *q = json_string_value (json_object_get (t, "queue"));
        if (zhashx_lookup (done, q))
            continue;
        zhashx_insert (done, q, (void *) 1);
        json_t *changed = json_array ();
        if (s_queue_txn (self, Q_SETTLE, t, NULL, changed, &e) == 0)
            s_announce (self, changed, NULL);
        else {
            CN_WARN (COMPONENT, "expiry sweep failed", "{s:s}", "error", e.message);
            cn_apierr_fini (&e);
        }
        json_decref (changed);
    }
    zhashx_destroy (&done);
    json_decref (list);
}

static int
s_on_tick (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    int64_t now = cn_now_ms ();
    /* deadlines */
    if (self->nwaiters) {
        zlistx_t *keys = zhashx_keys (self->waiters);
        for (char *k = zlistx_first (keys); k; k = zlistx_next (keys)) {
            zlistx_t *l = zhashx_lookup (self->waiters, k);
            /* rotate the list once: expired waiters are answered, the
             * others go back to the end in the same order */
            size_t n = zlistx_size (l);
            for (size_t i = 0; i < n; i++) {
                waiter_t *w = zlistx_detach (l, NULL);
                if (w->deadline_ms > now) {
                    zlistx_add_end (l, w);
                    continue;
                }
                self->wait_timeouts++;
                S_ERROR (self, w->id, w->req_id, 500, "InternalError",
                         "timed out waiting for ticket %s to become active", k);
                free (w);
                self->nwaiters--;
            }
            if (zlistx_size (l) == 0)
                zhashx_delete (self->waiters, k);
        }
        zlistx_destroy (&keys);
    }
    /* resubscribe */
    if (!cn_redis_sub_up (self->sub) && now - self->last_sub_try_ms >= SUB_RETRY_MS) {
        self->last_sub_try_ms = now;
        cn_redis_sub_try (self->sub);
    }
    /* the command connection too (within cn_redis's backoff), so that STATUS
     * says "redis" from the start, not from the first publish */
    if (now - self->last_redis_try_ms >= SUB_RETRY_MS) {
        self->last_redis_try_ms = now;
        (void) cn_redis_ok (self->redis);
    }
    /* poll the held tickets */
    int64_t every = cn_redis_sub_up (self->sub) ? POLL_UP_MS : POLL_DOWN_MS;
    if (self->nwaiters && now - self->last_poll_ms >= every) {
        self->last_poll_ms = now;
        self->polls++;
        zlistx_t *keys = zhashx_keys (self->waiters);
        for (char *k = zlistx_first (keys); k; k = zlistx_next (keys))
            s_check (self, k);
        zlistx_destroy (&keys);
    }
    if (now - self->last_sweep_ms >= SWEEP_MS) {
        self->last_sweep_ms = now;
        s_sweep (self);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Actor                                                                */

static void
s_status (self_t *self, zsock_t *dest)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 20);
    cn_msgw_str (&w, "actor", "waitlist");
    bool sub_up = cn_redis_sub_up (self->sub);
    cn_msgw_str (&w, "state", self->started ? (sub_up ? "running" : "polling") : "stopped");
    cn_msgw_bool (&w, "pg", self->moray && cn_moray_connected (self->moray));
    cn_msgw_bool (&w, "redis", self->redis && cn_redis_connected (self->redis));
    cn_msgw_bool (&w, "sub", sub_up);
    cn_msgw_uint (&w, "requests", self->requests);
    cn_msgw_uint (&w, "waiters", self->nwaiters);
    cn_msgw_uint (&w, "created", self->created);
    cn_msgw_uint (&w, "released", self->released);
    cn_msgw_uint (&w, "deleted", self->deleted);
    cn_msgw_uint (&w, "expired", self->expired);
    cn_msgw_uint (&w, "activated", self->activated);
    cn_msgw_uint (&w, "notices", self->notices);
    cn_msgw_uint (&w, "polls", self->polls);
    cn_msgw_uint (&w, "publish_failed", self->publish_failed);
    cn_msgw_uint (&w, "conflicts", self->conflicts);
    cn_msgw_uint (&w, "wait_timeouts", self->wait_timeouts);
    cn_msgw_uint (&w, "responses_2xx", self->replies_2xx);
    cn_msgw_uint (&w, "responses_4xx", self->replies_4xx);
    cn_msgw_uint (&w, "responses_5xx", self->replies_5xx);
    zframe_t *f = cn_msgw_frame (&w);
    zframe_send (&f, dest, 0);
}

static int
s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    char *cmd = zstr_recv (sock);
    if (cmd && streq (cmd, "STATUS"))
        s_status (self, sock);
    else
        zstr_send (sock, "ERROR unknown command");
    zstr_free (&cmd);
    return 0;
}

static int
s_start (self_t *self, char *reason, size_t rlen)
{
    if (self->started) {
        snprintf (reason, rlen, "already started");
        return -1;
    }
    self->pull = zsock_new (ZMQ_PULL);
    if (!self->pull) {
        snprintf (reason, rlen, "cannot create sockets");
        return -1;
    }
    zsock_set_rcvhwm (self->pull, 10000);
    if (zsock_connect (self->pull, "%s", CN_WAITLIST_ENDPOINT) != 0) {
        snprintf (reason, rlen, "connect %s: %s", CN_WAITLIST_ENDPOINT,
                  zmq_strerror (zmq_errno ()));
        return -1;
    }
    self->ctl = cn_ctl_bind ("waitlist");
    if (!self->ctl) {
        snprintf (reason, rlen, "cannot bind the control socket");
        return -1;
    }
    self->moray = cn_moray_new (self->cfg->pg_conninfo, self->cfg->pg_timeout_ms);
    self->redis = cn_redis_new (self->cfg->redis_url, self->cfg->redis_timeout_ms, COMPONENT);
    self->sub = cn_redis_sub_new (self->cfg->redis_url, self->cfg->redis_timeout_ms, COMPONENT,
                                  CN_TICKETS_CHANNEL);
    if (!self->moray || !self->redis || !self->sub) {
        snprintf (reason, rlen, "cannot allocate store or cache clients");
        return -1;
    }
    zloop_reader (self->loop, self->pull, s_on_request, self);
    zloop_reader (self->loop, self->ctl, s_on_ctl, self);
    zloop_timer (self->loop, TICK_MS, 0, s_on_tick, self);
    cn_redis_sub_attach (self->sub, self->loop, s_sub_message, s_sub_up, s_sub_down, self);
    cn_redis_sub_try (self->sub);
    self->last_sub_try_ms = cn_now_ms ();
    self->started = true;
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
    if (cmd && streq (cmd, "$TERM"))
        rc = -1;
    else if (cmd && streq (cmd, "START")) {
        char reason[256] = "";
        if (s_start (self, reason, sizeof reason) == 0)
            zstr_send (pipe, "OK");
        else {
            CN_ERROR (COMPONENT, "waitlist start failed", "{s:s}", "reason", reason);
            zstr_sendx (pipe, "ERROR", reason, NULL);
        }
    }
    else if (cmd && streq (cmd, "STATUS"))
        s_status (self, pipe);
    else if (cmd)
        CN_WARN (COMPONENT, "unknown pipe command", "{s:s}", "command", cmd);
    free (cmd);
    zmsg_destroy (&msg);
    return rc;
}

static void
s_list_free (void **item)
{
    zlistx_t *l = *item;
    zlistx_destroy (&l);
    *item = NULL;
}

void
cn_waitlist_actor (zsock_t *pipe, void *args)
{
    self_t *self = calloc (1, sizeof *self);
    if (!self)
        abort ();
    self->args = args;
    self->cfg = self->args->cfg;
    self->pipe = pipe;
    self->loop = zloop_new ();
    self->waiters = zhashx_new ();
    zhashx_set_destructor (self->waiters, s_list_free);
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);

    zloop_start (self->loop);

    /* held waits get an answer, not silence */
    zlistx_t *keys = zhashx_keys (self->waiters);
    for (char *k = zlistx_first (keys); k; k = zlistx_next (keys))
        s_answer_waiters (self, k, 503, "ServiceUnavailable", "the service is shutting down");
    zlistx_destroy (&keys);
    zhashx_destroy (&self->waiters);
    cn_redis_sub_destroy (&self->sub);
    zloop_destroy (&self->loop);
    zsock_destroy (&self->pull);
    zsock_destroy (&self->ctl);
    cn_moray_destroy (&self->moray);
    cn_redis_destroy (&self->redis);
    free (self);
}
