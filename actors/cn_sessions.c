/*
 * cn_sessions: the sessions actor. See include/cn_sessions.h, proto/hub.md
 * and docs/sessions.md (the theory of operation, with the timings).
 *
 * Theory of operation (short; docs/sessions.md has the long form)
 *
 * Ownership. A hello from the hub becomes a claim: in one transaction the
 * status rows of every waiting hello are locked (SELECT ... FOR UPDATE) and
 * rewritten with owner = this instance, owner_boot = this process's boot id,
 * epoch + 1, status running; a row that did not exist is inserted with the
 * "must not exist" condition (a race with another instance's insert is
 * retried). Only after the commit does the hub send welcome with the epoch.
 * Then the change is published on cnapi:status, the hello's VM state goes to
 * the state writer ("vms"), and the VM events actor binds the server's events.
 *
 * Fencing. Every other write of a row we own is conditional on the etag of
 * our last write: the batched last_heartbeat flush (every flush_ms, the hub
 * reports every live session with its last-heard time) and the release. A
 * failed condition means another instance took the server over: the session
 * gets goaway "fenced" and close 4001, and nothing is written. The channel
 * usually tells us sooner: a message with a higher epoch for a server we hold
 * closes our side at once.
 *
 * Release. A session that ends (closed by the agent: after close_grace_ms, so
 * a quick reconnect to us or anywhere else never shows "unknown"; silent or
 * broken: at once) is released: owner null, status unknown, conditional on
 * our etag (a takeover wins). A graceful shutdown releases nothing: the
 * agents reconnect elsewhere at once and the new owners take over.
 *
 * Liveness and the sweep. Every second this instance sets its Redis key
 * cnapi:instance:<name> = boot id (PX dead_after_ms) and rewrites its row in
 * cnapi_instances. Every second it also looks at the owners of the running
 * rows in its status table: an owner incarnation is alive while its Redis key
 * holds its boot id or its instance row keeps changing (the row alone carries
 * it through a Redis outage). Once one has been dead for owner_grace_ms, its
 * rows still running are marked unknown, conditionally (whichever instance
 * gets there first wins; the others' writes find the row changed). The grace
 * is what lets a failover never show "unknown": the dead instance's agents
 * reconnect and are re-owned well within it.
 *
 * The status table (lib/cn_liveness.c) is loaded from the store at START,
 * fed by the cnapi:status channel, resynced from the store (changed rows
 * every 5 s, every second while the subscription is down, all rows every
 * minute and whenever the subscription comes back), and by our own writes.
 */
#include "cn_sessions.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cn_actor.h"
#include "cn_filter.h"
#include "cn_log.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_redis.h"
#include "cn_redis_sub.h"
#include "cn_server.h"
#include "cn_util.h"
#include "cn_vmevents.h"
#include "cn_ws.h"

#define COMPONENT "sessions"
#define TICK_MS 100
#define CHUNK 500                   /* rows per statement */
#define CLAIM_ATTEMPTS 5            /* insert races before giving up for this round */
#define DRAIN_MAX 4096              /* hub messages per wake-up */
#define HELD_EVENTS_MAX 10000       /* VM events held while a claim waits */
#define FULL_RESYNC_MS 60000
#define RESYNC_MS 5000
#define RESYNC_DOWN_MS 1000         /* while the subscription is down */
#define RESYNC_LOOKBACK_MS 3000     /* _mtime comes from the writers' clocks */
#define SNAPSHOT_TIMEOUT_MS 1500
#define VMS_RETRY_MAX_MS 30000

typedef enum { O_CLAIMING, O_OWNED, O_LINGER } ostate_t;

typedef struct {
    char uuid[37];
    uint64_t sid;
    ostate_t state;
    uint64_t epoch;
    char etag[9];
    int64_t version;
    int64_t since_ms;
    int64_t last_heard_ms;
    int64_t connected_ms;
    int64_t claim_first_ms;     /* CLAIMING: when the hello came */
    int64_t linger_until_ms;    /* LINGER: release then */
    int claim_attempts;
    uint64_t replaces_sid;      /* an older session of this server here */
    char agent_boot[37];        /* the hello's boot_id ("" = not given) */
    char remote[48];
    zframe_t *hello;            /* CLAIMING: the agent's hello (msgpack) */
    zlistx_t *held;             /* CLAIMING: vm_event frames that came meanwhile */
    json_t *pending;            /* no server record yet: {vms, vms_destroyed} */
    bool vms_in_flight;
    int vms_attempts;
    int64_t vms_next_ms;
    bool bound;
} owned_t;

enum { W_VMS = 1, W_EVENT };

typedef struct {
    int kind;
    char uuid[37];
    uint64_t sid;
    json_t *data;               /* VMS: the vms map; EVENT: {vm_uuid, event, seq, vm} */
    bool applied_locally;
} wctx_t;

typedef struct {
    char boot_id[37];
    bool stopped;
    int64_t id;                 /* the row's _id when we last saw it change */
    int64_t changed_ms;         /* our clock when it last changed */
    int64_t last_seen_ms;       /* its own clock, from the row */
    bool seen;                  /* in the last read */
} inst_t;

typedef struct {
    const cn_config_t *cfg;
    cn_sessions_args_t *args;
    zsock_t *pipe;
    zsock_t *pull;
    zsock_t *writer;
    zsock_t *ctl;
    zloop_t *loop;
    bool started;
    bool buckets_ready;
    cn_moray_t *moray;
    cn_redis_t *redis;
    cn_liveness_t *live;
    zactor_t *vmevents;
    cn_vmevents_args_t *vmevents_args;

    /* subscription to cnapi:status */
    cn_redis_sub_t *sub;
    bool resync_full_due;
    bool release_due;           /* a bye made a LINGER entry due now */
    bool walk_needed;           /* some session may be LINGER or hold pending VM state */

    zhashx_t *owned;            /* uuid -> owned_t */
    zhashx_t *wpending;         /* tag -> wctx_t */
    uint64_t next_tag;
    zlistx_t *batch;            /* owned_t* whose claims run next */

    zhashx_t *instances;        /* name -> inst_t */
    zhashx_t *dead_since;       /* "name boot" -> int64_t* (our clock) */

    int64_t next_beat_ms, next_sweep_ms, next_resync_ms, next_full_resync_ms;
    cn_owner_t *owners;         /* the sweep's distinct owner incarnations, cached */
    size_t nowners;
    uint64_t owners_gen;        /* cn_liveness_owners_gen when they were read */
    int64_t last_resync_start_ms;
    int64_t claim_retry_ms;
    int claim_backoff;
    int64_t started_ms;

    /* SESSIONS on the control socket, waiting for the hub */
    bool snap_waiting;
    uint64_t snap_req;
    int64_t snap_deadline_ms;

    /* counters */
    uint64_t hellos, claims, takeovers, fenced, releases, swept, claim_failures,
        flushes, flush_rows, lost_byes, resyncs, full_resyncs, channel_msgs, vms_writes,
        vm_events, writer_failures, publish_failures, store_failures, duplicates;
    double last_flush_ms;
    char last_error[160];
} self_t;

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */

static void
s_wctx_free (void **item)
{
    wctx_t *c = *item;
    if (c) {
        json_decref (c->data);
        free (c);
    }
    *item = NULL;
}

static void
s_owned_free (void **item)
{
    owned_t *o = *item;
    if (o) {
        zframe_destroy (&o->hello);
        zlistx_destroy (&o->held);
        json_decref (o->pending);
        free (o);
    }
    *item = NULL;
}

static void
s_set_error (self_t *self, const char *what, const char *err)
{
    snprintf (self->last_error, sizeof self->last_error, "%s: %s", what, err ? err : "");
}

/* A command to the hub's mailbox. */
static void
s_hub_close (self_t *self, uint64_t sid, uint16_t code, const char *reason, const char *goaway)
{
    cn_hub_cmd_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = CN_HUB_CLOSE;
    c->sid = sid;
    c->code = code;
    snprintf (c->reason, sizeof c->reason, "%s", reason);
    snprintf (c->goaway, sizeof c->goaway, "%s", goaway ? goaway : "");
    cn_hub_post (self->args->hub, c);
}

static void
s_hub_welcome (self_t *self, uint64_t sid, uint64_t epoch)
{
    cn_hub_cmd_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = CN_HUB_WELCOME;
    c->sid = sid;
    c->epoch = epoch;
    cn_hub_post (self->args->hub, c);
}

static void
s_bind (self_t *self, owned_t *o, bool on)
{
    if (!self->vmevents || o->bound == on)
        return;
    o->bound = on;
    zstr_sendx (self->vmevents, on ? "BIND" : "UNBIND", o->uuid, NULL);
}

static bool
s_buckets (self_t *self)
{
    if (self->buckets_ready)
        return true;
    if (cn_moray_put_bucket (self->moray, CN_BUCKET_STATUS, cn_status_index,
                             cn_status_nindex) != CN_MORAY_OK
        || cn_moray_put_bucket (self->moray, CN_BUCKET_INSTANCES, cn_instance_index,
                                cn_instance_nindex) != CN_MORAY_OK) {
        s_set_error (self, "buckets", cn_moray_errmsg (self->moray));
        return false;
    }
    self->buckets_ready = true;
    return true;
}

/* The row we write for a server we own. */
static void
s_row_owned (self_t *self, const owned_t *o, cn_status_row_t *r)
{
    memset (r, 0, sizeof *r);
    memcpy (r->uuid, o->uuid, 37);
    r->running = true;
    snprintf (r->owner, sizeof r->owner, "%s", self->cfg->instance);
    memcpy (r->owner_boot, self->args->boot_id, 37);
    memcpy (r->agent_boot, o->agent_boot, 37);
    r->epoch = o->epoch;
    r->last_heartbeat_ms = o->last_heard_ms;
    r->since_ms = o->since_ms;
}

/* Publish rows on cnapi:status, pipelined. */
static void
s_publish (self_t *self, const cn_status_row_t *rows, size_t n)
{
    if (n == 0 || !cn_redis_ok (self->redis))
        return;
    redisContext *ctx = cn_redis_ctx (self->redis);
    for (size_t i = 0; i < n; i++) {
        char msg[256];
        cn_status_row_message (&rows[i], msg, sizeof msg);
        size_t len = strlen (msg);
        /* the owner's boot id rides along (sixth field) for the sweep, and
         * the row's times (last_heartbeat, since: ms, 0 = none) for the
         * API: another instance learning a claim or a release here has
         * no other way to them until the row changes again */
        snprintf (msg + len, sizeof msg - len, " %s %" PRId64 " %" PRId64,
                  rows[i].owner_boot[0] ? rows[i].owner_boot : "-",
                  rows[i].last_heartbeat_ms, rows[i].since_ms);
        redisAppendCommand (ctx, "PUBLISH %s %s", CN_STATUS_CHANNEL, msg);
    }
    for (size_t i = 0; i < n; i++) {
        void *reply = NULL;
        if (redisGetReply (ctx, &reply) != REDIS_OK) {
            self->publish_failures++;
            cn_redis_failed (self->redis, ctx->errstr[0] ? ctx->errstr : "publish failed");
            return;
        }
        freeReplyObject (reply);
    }
}

/* ------------------------------------------------------------------ */
/* Writer requests                                                      */

static void
s_writer_send (self_t *self, cn_msgw_t *w, wctx_t *c, uint64_t tag)
{
    zhashx_insert (self->wpending, CN_TAG_KEY (tag), c);
    zframe_t *f = cn_msgw_frame (w);
    if (cn_writer_send (self->writer, self->cfg->writer_shards, c->uuid, &f, false) != 0) {
        /* not expected (the shards are bound before this actor starts):
         * counted as a failed write; VM state is sent again by the next
         * hello, a VM event is lost from the record until then */
        self->writer_failures++;
        CN_ERROR (COMPONENT, "cannot hand a request to the writer", "{s:s,s:s}", "server_uuid",
                  c->uuid, "error", zmq_strerror (zmq_errno ()));
        owned_t *o = zhashx_lookup (self->owned, c->uuid);
        if (c->kind == W_VMS && o && o->sid == c->sid)
            o->vms_in_flight = false;
        zhashx_delete (self->wpending, CN_TAG_KEY (tag));
    }
}

static void
s_send_vms (self_t *self, owned_t *o, json_t *vms)
{
    char *text = json_dumps (vms, JSON_COMPACT);
    if (!text)
        abort ();
    uint64_t tag = ++self->next_tag;
    cn_msgw_t w;
    cn_msgw_init (&w, "vms", 4);
    cn_msgw_uint (&w, "tag", tag);
    cn_msgw_str (&w, "uuid", o->uuid);
    cn_msgw_str (&w, "vms", text);
    cn_msgw_uint (&w, "epoch", o->epoch);
    free (text);
    wctx_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = W_VMS;
    memcpy (c->uuid, o->uuid, 37);
    c->sid = o->sid;
    c->data = json_incref (vms);
    o->vms_in_flight = true;
    self->vms_writes++;
    s_writer_send (self, &w, c, tag);
}

/* ev: {vm_uuid, event, seq, vm?} */
static void
s_send_event (self_t *self, owned_t *o, json_t *ev, bool applied_locally)
{
    uint64_t tag = ++self->next_tag;
    json_t *vm = json_object_get (ev, "vm");
    char *vm_text = json_is_object (vm) ? json_dumps (vm, JSON_COMPACT) : NULL;
    cn_msgw_t w;
    cn_msgw_init (&w, "vm_event", 6);
    cn_msgw_uint (&w, "tag", tag);
    cn_msgw_str (&w, "uuid", o->uuid);
    cn_msgw_str (&w, "vm_uuid", json_string_value (json_object_get (ev, "vm_uuid")));
    cn_msgw_str (&w, "event", json_string_value (json_object_get (ev, "event")));
    cn_msgw_uint (&w, "seq", (uint64_t) json_integer_value (json_object_get (ev, "seq")));
    cn_msgw_str (&w, "vm", vm_text);
    free (vm_text);
    wctx_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = W_EVENT;
    memcpy (c->uuid, o->uuid, 37);
    c->sid = o->sid;
    c->data = json_incref (ev);
    c->applied_locally = applied_locally;
    self->vm_events++;
    s_writer_send (self, &w, c, tag);
}

/* Apply an event to the VM state kept while the server has no record. */
static void
s_apply_pending (owned_t *o, json_t *ev)
{
    (void) cn_server_apply_vm_event (o->pending,
                                     json_string_value (json_object_get (ev, "vm_uuid")),
                                     json_string_value (json_object_get (ev, "event")),
                                     (uint64_t) json_integer_value (json_object_get (ev, "seq")),
                                     json_object_get (ev, "vm"), cn_now_ms ());
}

/* A vm_event frame from the agent (already checked by the hub) as
 * {vm_uuid, event, seq, vm?}; NULL when it does not decode. */
static json_t *
s_event_json (const void *data, size_t size)
{
    cn_msg_t m;
    char err[64];
    if (cn_msg_parse (&m, data, size, err, sizeof err) != 0)
        return NULL;
    json_t *all = cn_msgpack_to_json (m.map);
    cn_msg_fini (&m);
    json_t *vm_uuid = json_object_get (all, "vm_uuid");
    json_t *event = json_object_get (all, "event");
    json_t *seq = json_object_get (all, "seq");
    json_t *out = NULL;
    if (json_is_string (vm_uuid) && json_is_string (event) && json_is_integer (seq)) {
        out = json_pack ("{s:O,s:O,s:O}", "vm_uuid", vm_uuid, "event", event, "seq", seq);
        json_t *vm = json_object_get (all, "vm");
        if (json_is_object (vm))
            json_object_set (out, "vm", vm);
    }
    json_decref (all);
    return out;
}

static void
s_event (self_t *self, owned_t *o, json_t *ev)
{
    if (o->pending) {
        s_apply_pending (o, ev);
        if (o->vms_in_flight)
            s_send_event (self, o, ev, true);
        return;
    }
    s_send_event (self, o, ev, false);
}

static void
s_on_writer (self_t *self)
{
    for (int k = 0; k < DRAIN_MAX; k++) {
        zframe_t *f = cn_writer_recv (self->writer, true);
        if (!f)
            break;
        cn_msg_t m;
        char err[64];
        if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
            zframe_destroy (&f);
            continue;
        }
        uint64_t tag = 0, status = 0;
        bool ok = false;
        cn_msg_uint (&m, "tag", &tag);
        cn_msg_bool (&m, "ok", &ok);
        cn_msg_uint (&m, "status", &status);
        char *message = cn_msg_strdup (&m, "message");
        cn_msg_fini (&m);
        zframe_destroy (&f);
        wctx_t *c = zhashx_lookup (self->wpending, CN_TAG_KEY (tag));
        if (!c) {
            free (message);
            continue;
        }
        owned_t *o = zhashx_lookup (self->owned, c->uuid);
        if (o && o->sid != c->sid)
            o = NULL;
        if (c->kind == W_VMS && o) {
            o->vms_in_flight = false;
            if (ok) {
                if (o->pending)
                    CN_INFO (COMPONENT, "VM state written after the server record appeared",
                             "{s:s}", "server_uuid", o->uuid);
                json_decref (o->pending);
                o->pending = NULL;
                o->vms_attempts = 0;
            }
            else
            if (status == 404) {
                /* no server record yet (no sysinfo): keep the state here,
                 * apply the agent's events to it, and try again */
                if (!o->pending) {
                    o->pending = json_pack ("{s:O,s:{}}", "vms", c->data, "vms_destroyed");
                    self->walk_needed = true;
                    CN_INFO (COMPONENT, "no server record yet; keeping the VM state until "
                             "sysinfo arrives", "{s:s}", "server_uuid", o->uuid);
                }
                int delay = 1000 << (o->vms_attempts < 5 ? o->vms_attempts : 5);
                o->vms_attempts++;
                o->vms_next_ms = cn_now_ms () + (delay < VMS_RETRY_MAX_MS ? delay
                                                                          : VMS_RETRY_MAX_MS);
            }
            else
            if (status == 409) {
                /* fenced: a later epoch owns the server; the resync or the
                 * status channel closes this session */
                CN_DEBUG (COMPONENT, "VM state not written: the server was taken over",
                          "{s:s}", "server_uuid", o->uuid);
            }
            else {
                self->writer_failures++;
                CN_WARN (COMPONENT, "VM state not written", "{s:s,s:i,s:s?}", "server_uuid",
                         o->uuid, "status", (int) status, "message", message);
            }
        }
        else
        if (c->kind == W_EVENT && o && !ok && status == 404) {
            if (o->pending && !c->applied_locally)
                s_apply_pending (o, c->data);
        }
        else
        if (!ok && status == 409 && c->kind == W_VMS) {
            /* the writer refused it for a later epoch: another instance
             * took the server over meanwhile (outcome "fenced"), as it
             * should; not a failure */
            CN_DEBUG (COMPONENT, "VM state not written: the server was taken over", "{s:s}",
                      "server_uuid", c->uuid);
        }
        else
        if (!ok && status != 404) {
            self->writer_failures++;
            CN_WARN (COMPONENT, "VM write failed", "{s:s,s:i,s:s?}", "server_uuid", c->uuid,
                     "status", (int) status, "message", message);
        }
        free (message);
        zhashx_delete (self->wpending, CN_TAG_KEY (tag));
    }
}

/* ------------------------------------------------------------------ */
/* The status table                                                     */

typedef struct {
    cn_status_row_t *rows;
    size_t n, cap;
    const cn_liveness_t *skip_held; /* resync: skip rows the table holds at this version */
} rowvec_t;

static int
s_collect_row (const cn_mobj_t *obj, void *arg)
{
    rowvec_t *v = arg;
    /* Rows we hold at this very version (mostly our own flush's: 15,000
     * every flush_ms) are not parsed again: parsing them was half of the
     * sessions actor's CPU. Every row put in the table was checked for
     * fencing when it was put, or is our own write. */
    if (v->skip_held && obj->key && obj->id > 0
        && cn_liveness_version (v->skip_held, obj->key) >= obj->id)
        return 0;
    cn_status_row_t r;
    if (cn_status_row_parse (obj->value, obj->value_len, &r) != 0)
        return 0;
    r.version = obj->id;
    v->rows = cn_grow (v->rows, &v->cap, v->n + 1, sizeof *v->rows, 1024);
    v->rows[v->n++] = r;
    return 0;
}

static void s_fence (self_t *self, owned_t *o, const char *why);

/* After the table changed: close our side of every session another owner
 * (or a later epoch) holds now. */
static void
s_check_fenced (self_t *self, const cn_status_row_t *r)
{
    owned_t *o = zhashx_lookup (self->owned, r->uuid);
    if (!o || o->state == O_CLAIMING)
        return;
    bool other = strcmp (r->owner, self->cfg->instance) != 0
                 || (r->owner_boot[0] && strcmp (r->owner_boot, self->args->boot_id) != 0);
    if (r->epoch > o->epoch || (r->version > o->version && (other || !r->running)))
        s_fence (self, o, r->epoch > o->epoch ? "a later epoch" : "the row changed");
}

/* Read rows changed since `since_ms` (0: all) into the table. */
static int
s_resync (self_t *self, int64_t since_ms)
{
    if (!s_buckets (self))
        return -1;
    char filter[256];
    char *esc = since_ms > 0 && cn_redis_sub_up (self->sub)
                ? cn_filter_escape (self->cfg->instance) : NULL;
    if (esc && strlen (esc) < 150) {
        /* Rows that say "running, owned by us" are written by us alone
         * (claims, the flush: 15,000 rows every flush_ms); leave them out.
         * What another instance writes over our rows says otherwise: a
         * takeover names its owner, a sweep says unknown. A second process
         * under our name is caught by the channel (every claim is announced)
         * and by the full resync. Without the channel: everything. */
        snprintf (filter, sizeof filter,
                  "(&(_mtime>=%" PRId64 ")(!(&(owner=%s)(status=running))))", since_ms, esc);
    }
    else
    if (since_ms > 0)
        snprintf (filter, sizeof filter, "(_mtime>=%" PRId64 ")", since_ms);
    else
        snprintf (filter, sizeof filter, "(_key=*)");
    free (esc);
    rowvec_t v = { .skip_held = self->live };
    int64_t start = cn_now_ms ();
    int rc = cn_moray_find (self->moray, CN_BUCKET_STATUS, filter, NULL, s_collect_row, &v);
    if (rc != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "resync", cn_moray_errmsg (self->moray));
        free (v.rows);
        return -1;
    }
    cn_liveness_put_many (self->live, v.rows, v.n);
    for (size_t i = 0; i < v.n; i++) {
        cn_status_row_t cur;
        if (cn_liveness_get (self->live, v.rows[i].uuid, &cur))
            s_check_fenced (self, &cur);
    }
    free (v.rows);
    self->last_resync_start_ms = start;
    if (since_ms > 0)
        self->resyncs++;
    else {
        self->full_resyncs++;
        if (!cn_liveness_loaded (self->live)) {
            size_t running = 0, n = cn_liveness_count (self->live, &running);
            CN_INFO (COMPONENT, "status table loaded", "{s:i,s:i}", "rows", (int) n,
                     "running", (int) running);
        }
        cn_liveness_set_loaded (self->live, true);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Claims                                                               */

/* Take o out of the claim batch (before it is freed). */
static void
s_batch_remove (self_t *self, owned_t *o)
{
    void *h = zlistx_first (self->batch) ? zlistx_cursor (self->batch) : NULL;
    while (h) {
        void *next = zlistx_next (self->batch) ? zlistx_cursor (self->batch) : NULL;
        if (zlistx_handle_item (h) == o)
            zlistx_delete (self->batch, h);
        h = next;
    }
}

static void
s_owned_remove (self_t *self, owned_t *o)
{
    s_bind (self, o, false);
    if (o->state == O_CLAIMING)
        s_batch_remove (self, o);
    zhashx_delete (self->owned, o->uuid);
}

static bool s_alive (self_t *self, const char *owner, const char *boot, const char *redis_val,
                     bool redis_ok, int64_t now, int64_t *seen);
static void s_duplicate (self_t *self, uint64_t sid, const char *uuid, const char *remote,
                         const char *agent_boot, const char *holder);

/* The stored row says another agent (another boot id) holds this server
 * on another live instance: o is a duplicate, not a failover (a failover
 * is the same agent, the same boot id, coming back elsewhere). */
static bool
s_held_by_another_agent (self_t *self, const owned_t *o, const cn_status_row_t *old,
                         int64_t now)
{
    if (!old->running || !old->owner[0] || !old->agent_boot[0] || !o->agent_boot[0]
        || strcmp (old->agent_boot, o->agent_boot) == 0)
        return false;
    if (strcmp (old->owner, self->cfg->instance) == 0
        && strcmp (old->owner_boot, self->args->boot_id) == 0)
        return false;           /* ours: s_hello decided (that session had ended) */
    /* the owner's liveness key in Redis is the freshest word */
    if (cn_redis_ok (self->redis)) {
        redisReply *r = cn_redis_cmd (self->redis, "GET %s%s", CN_INSTANCE_KEY_PREFIX, old->owner);
        if (r) {
            bool answered = r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_NIL;
            bool alive = r->type == REDIS_REPLY_STRING
                         && (!old->owner_boot[0] || strcmp (r->str, old->owner_boot) == 0);
            freeReplyObject (r);
            if (answered)
                return alive;
        }
    }
    int64_t seen;
    return s_alive (self, old->owner, old->owner_boot, NULL, false, now, &seen);
}

static void
s_claimed (self_t *self, owned_t *o, const cn_status_row_t *old, const cn_mop_t *op,
           cn_status_row_t *pub)
{
    o->state = O_OWNED;
    memcpy (o->etag, op->out_etag, 9);
    o->version = op->out_id;
    self->claims++;
    bool takeover = old && old->running
                    && (strcmp (old->owner, self->cfg->instance) != 0
                        || strcmp (old->owner_boot, self->args->boot_id) != 0);
    if (takeover || o->replaces_sid)
        self->takeovers++;
    if (o->replaces_sid) {
        s_hub_close (self, o->replaces_sid, CN_WS_CLOSE_FENCED,
                     "a newer session of this server took over", "fenced");
        o->replaces_sid = 0;
    }
    s_row_owned (self, o, pub);
    pub->version = o->version;
    cn_liveness_put (self->live, pub);
    s_hub_welcome (self, o->sid, o->epoch);
    CN_DEBUG (COMPONENT, "session owned", "{s:s,s:I,s:b,s:s?}", "server_uuid", o->uuid,
              "epoch", (json_int_t) o->epoch, "takeover", takeover,
              "previous_owner", old && old->owner[0] ? old->owner : NULL);
    s_bind (self, o, true);

    /* the agent's VM state, then whatever events came meanwhile */
    cn_msg_t m;
    char err[64];
    if (o->hello && cn_msg_parse (&m, zframe_data (o->hello), zframe_size (o->hello),
                                  err, sizeof err) == 0) {
        const msgpack_object *vms = cn_msg_get (&m, "vms");
        json_t *j = vms ? cn_msgpack_to_json (vms) : NULL;
        if (json_is_object (j))
            s_send_vms (self, o, j);
        json_decref (j);
        cn_msg_fini (&m);
    }
    zframe_destroy (&o->hello);
    if (o->held) {
        for (zframe_t *f = zlistx_first (o->held); f; f = zlistx_next (o->held)) {
            json_t *ev = s_event_json (zframe_data (f), zframe_size (f));
            if (ev)
                s_event (self, o, ev);
            json_decref (ev);
        }
        zlistx_destroy (&o->held);
    }
}

/* Claim every session in self->batch (CLAIMING entries). */
static void
s_claim_run (self_t *self)
{
    size_t n = zlistx_size (self->batch);
    if (n == 0)
        return;
    owned_t **v = calloc (n, sizeof *v);
    size_t k = 0;
    for (owned_t *o = zlistx_first (self->batch); o; o = zlistx_next (self->batch))
        /* still waiting (not gone, not replaced by a newer hello) */
        if (zhashx_lookup (self->owned, o->uuid) == o && o->state == O_CLAIMING) {
            bool dup = false;
            for (size_t i = 0; i < k && !dup; i++)
                dup = v[i] == o;
            if (!dup)
                v[k++] = o;
        }
    zlistx_purge (self->batch);
    int64_t now = cn_now_ms ();
    for (size_t start = 0; start < k; start += CHUNK) {
        size_t m = k - start < CHUNK ? k - start : CHUNK;
        owned_t **c = v + start;
        const char **keys = calloc (m, sizeof *keys);
        cn_mobj_t *objs = calloc (m, sizeof *objs);
        cn_status_row_t *old = calloc (m, sizeof *old), *pub = calloc (m, sizeof *pub);
        bool *had = calloc (m, sizeof *had), *applied = calloc (m, sizeof *applied);
        bool *dup = calloc (m, sizeof *dup);
        size_t *idx = calloc (m, sizeof *idx);
        cn_mop_t *ops = calloc (m, sizeof *ops);
        char **texts = calloc (m, sizeof *texts);
        for (size_t i = 0; i < m; i++)
            keys[i] = c[i]->uuid;
        int rc = s_buckets (self) ? cn_moray_begin (self->moray) : CN_MORAY_EIO;
        if (rc == CN_MORAY_OK)
            rc = cn_moray_get_many_locked (self->moray, CN_BUCKET_STATUS, keys, m, objs);
        size_t nops = 0;
        if (rc == CN_MORAY_OK) {
            for (size_t i = 0; i < m; i++) {
                owned_t *o = c[i];
                had[i] = objs[i].key
                         && cn_status_row_parse (objs[i].value, objs[i].value_len, &old[i]) == 0;
                if (had[i] && s_held_by_another_agent (self, o, &old[i], now)) {
                    dup[i] = true;
                    continue;
                }
                o->epoch = (had[i] ? old[i].epoch : 0) + 1;
                o->since_ms = had[i] && old[i].running ? old[i].since_ms : now;
                o->last_heard_ms = now;
                cn_status_row_t r;
                s_row_owned (self, o, &r);
                texts[i] = cn_status_row_format (&r);
                cn_mop_t *op = &ops[nops];
                idx[nops++] = i;
                op->kind = CN_MOP_PUT;
                op->bucket = CN_BUCKET_STATUS;
                op->key = o->uuid;
                op->value = texts[i];
                /* locked: the etag holds; absent: must still be absent */
                op->etag = objs[i].key ? objs[i].etag : CN_MORAY_ETAG_NULL;
            }
            if (nops)
                rc = cn_moray_batch_partial (self->moray, ops, nops, applied);
            if (rc == CN_MORAY_OK)
                rc = cn_moray_commit (self->moray);
        }
        if (rc != CN_MORAY_OK) {
            cn_moray_rollback (self->moray);
            self->store_failures++;
            s_set_error (self, "claim", cn_moray_errmsg (self->moray));
            /* keep waiting, up to the deadline; then tell the agent to try
             * elsewhere */
            int64_t deadline = 2 * (int64_t) self->cfg->pg_timeout_ms + 2000;
            for (size_t i = 0; i < m; i++) {
                owned_t *o = c[i];
                if (now - o->claim_first_ms > deadline) {
                    self->claim_failures++;
                    s_hub_close (self, o->sid, CN_WS_CLOSE_INTERNAL, "store unavailable", NULL);
                    s_owned_remove (self, o);
                }
                else
                    zlistx_add_end (self->batch, o);
            }
            if (zlistx_size (self->batch)) {
                self->claim_retry_ms = now + cn_backoff_ms (self->claim_backoff++, 100, 2000);
            }
        }
        else {
            self->claim_backoff = 0;
            size_t npub = 0;
            for (size_t i = 0; i < m; i++)
                if (dup[i]) {
                    owned_t *o = c[i];
                    s_duplicate (self, o->sid, o->uuid, o->remote, o->agent_boot, old[i].owner);
                    s_owned_remove (self, o);
                }
            for (size_t k = 0; k < nops; k++) {
                size_t i = idx[k];
                owned_t *o = c[i];
                if (applied[k])
                    s_claimed (self, o, had[i] ? &old[i] : NULL, &ops[k], &pub[npub++]);
                else
                if (++o->claim_attempts < CLAIM_ATTEMPTS)
                    zlistx_add_end (self->batch, o);      /* an insert race: again */
                else {
                    self->claim_failures++;
                    s_hub_close (self, o->sid, CN_WS_CLOSE_INTERNAL, "could not take ownership",
                                 NULL);
                    s_owned_remove (self, o);
                }
            }
            s_publish (self, pub, npub);
            if (zlistx_size (self->batch))
                self->claim_retry_ms = now;
        }
        for (size_t i = 0; i < m; i++) {
            cn_mobj_fini (&objs[i]);
            free (texts[i]);
        }
        free (keys);
        free (objs);
        free (old);
        free (pub);
        free (had);
        free (applied);
        free (dup);
        free (idx);
        free (ops);
        free (texts);
    }
    free (v);
}

/* ------------------------------------------------------------------ */
/* Fencing, release, flush                                              */

static void
s_fence (self_t *self, owned_t *o, const char *why)
{
    self->fenced++;
    CN_INFO (COMPONENT, "session fenced: another instance owns the server now", "{s:s,s:s,s:I}",
             "server_uuid", o->uuid, "why", why, "epoch", (json_int_t) o->epoch);
    if (o->state == O_OWNED)
        s_hub_close (self, o->sid, CN_WS_CLOSE_FENCED, "another instance took this server over",
                     "fenced");
    s_owned_remove (self, o);
}

/* Release sessions (owner null, status unknown), each conditional on our
 * etag. Entries whose write fails for reachability stay (LINGER) and are
 * tried again; the others are removed. */
static void
s_release (self_t *self, owned_t **v, size_t k)
{
    int64_t now = cn_now_ms ();
    for (size_t start = 0; start < k; start += CHUNK) {
        size_t m = k - start < CHUNK ? k - start : CHUNK;
        owned_t **c = v + start;
        cn_mop_t *ops = calloc (m, sizeof *ops);
        char **texts = calloc (m, sizeof *texts);
        bool *applied = calloc (m, sizeof *applied);
        cn_status_row_t *rows = calloc (m, sizeof *rows);
        for (size_t i = 0; i < m; i++) {
            cn_status_row_t *r = &rows[i];
            s_row_owned (self, c[i], r);
            r->running = false;
            r->owner[0] = 0;
            r->owner_boot[0] = 0;
            r->since_ms = now;
            texts[i] = cn_status_row_format (r);
            ops[i].kind = CN_MOP_PUT;
            ops[i].bucket = CN_BUCKET_STATUS;
            ops[i].key = c[i]->uuid;
            ops[i].value = texts[i];
            ops[i].etag = c[i]->etag;
        }
        int rc = cn_moray_batch_partial (self->moray, ops, m, applied);
        if (rc != CN_MORAY_OK) {
            self->store_failures++;
            s_set_error (self, "release", cn_moray_errmsg (self->moray));
            for (size_t i = 0; i < m; i++)
                c[i]->linger_until_ms = now + 1000;
        }
        else {
            size_t npub = 0;
            for (size_t i = 0; i < m; i++) {
                if (applied[i]) {
                    self->releases++;
                    rows[i].version = ops[i].out_id;
                    cn_liveness_put (self->live, &rows[i]);
                    rows[npub++] = rows[i];
                    CN_DEBUG (COMPONENT, "session released", "{s:s}", "server_uuid",
                              c[i]->uuid);
                }
                s_owned_remove (self, c[i]);
            }
            s_publish (self, rows, npub);
        }
        for (size_t i = 0; i < m; i++)
            free (texts[i]);
        free (texts);
        free (ops);
        free (applied);
        free (rows);
    }
}

/* Release every lingering session that is due, in one batch (at the end of
 * a wake-up in which a bye asked for a release now). */
static void
s_release_due (self_t *self)
{
    self->release_due = false;
    int64_t now = cn_now_ms ();
    size_t n = zhashx_size (self->owned), k = 0;
    owned_t **due = calloc (n ? n : 1, sizeof *due);
    if (!due)
        abort ();
    for (owned_t *o = zhashx_first (self->owned); o; o = zhashx_next (self->owned))
        if (o->state == O_LINGER && now >= o->linger_until_ms)
            due[k++] = o;
    if (k)
        s_release (self, due, k);
    free (due);
}

/* flush {now_ms, sessions: [[sid, last_heard_ms], ...]} */
typedef struct {
    uint64_t sid, t;
} heard_t;

static int
s_heard_cmp (const void *a, const void *b)
{
    uint64_t x = ((const heard_t *) a)->sid, y = ((const heard_t *) b)->sid;
    return x < y ? -1 : x > y;
}

static void
s_flush (self_t *self, const cn_msg_t *m)
{
    const msgpack_object *list = cn_msg_get (m, "sessions");
    if (!list || list->type != MSGPACK_OBJECT_ARRAY)
        return;
    int64_t t0 = cn_mono_us ();
    /* sid -> last heard: one sorted array (15,000 entries every flush_ms;
     * a hash with an allocation per entry was a tenth of the actor) */
    uint32_t nh = 0;
    heard_t *heard = calloc (list->via.array.size ? list->via.array.size : 1, sizeof *heard);
    if (!heard)
        abort ();
    for (uint32_t i = 0; i < list->via.array.size; i++) {
        const msgpack_object *e = &list->via.array.ptr[i];
        if (e->type != MSGPACK_OBJECT_ARRAY || e->via.array.size != 2
            || e->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER
            || e->via.array.ptr[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            continue;
        uint64_t t = e->via.array.ptr[1].via.u64;
        heard[nh].sid = e->via.array.ptr[0].via.u64;
        heard[nh].t = t ? t : 1;
        nh++;
    }
    qsort (heard, nh, sizeof *heard, s_heard_cmp);
    size_t n = zhashx_size (self->owned), k = 0, nlost = 0;
    owned_t **v = calloc (n ? n : 1, sizeof *v), **lost = calloc (n ? n : 1, sizeof *lost);
    for (owned_t *o = zhashx_first (self->owned); o; o = zhashx_next (self->owned)) {
        if (o->state != O_OWNED)
            continue;
        heard_t key = { .sid = o->sid }, *h = bsearch (&key, heard, nh, sizeof *heard, s_heard_cmp);
        uint64_t t = h ? h->t : 0;
        if (!t) {
            lost[nlost++] = o;      /* a bye we never got */
            continue;
        }
        o->last_heard_ms = (int64_t) t;
        v[k++] = o;
    }
    free (heard);
    for (size_t i = 0; i < nlost; i++) {
        self->lost_byes++;
        CN_WARN (COMPONENT, "session gone without a bye; releasing", "{s:s}", "server_uuid",
                 lost[i]->uuid);
    }
    if (nlost)
        s_release (self, lost, nlost);
    free (lost);

    size_t rows_written = 0;
    bool failed = false;
    for (size_t start = 0; start < k && !failed; start += CHUNK) {
        size_t m2 = k - start < CHUNK ? k - start : CHUNK;
        owned_t **c = v + start;
        cn_mop_t *ops = calloc (m2, sizeof *ops);
        char **texts = calloc (m2, sizeof *texts);
        bool *applied = calloc (m2, sizeof *applied);
        cn_status_row_t *rows = calloc (m2, sizeof *rows);
        for (size_t i = 0; i < m2; i++) {
            s_row_owned (self, c[i], &rows[i]);
            texts[i] = cn_status_row_format (&rows[i]);
            ops[i].kind = CN_MOP_PUT;
            ops[i].bucket = CN_BUCKET_STATUS;
            ops[i].key = c[i]->uuid;
            ops[i].value = texts[i];
            ops[i].etag = c[i]->etag;
        }
        int rc = cn_moray_batch_partial (self->moray, ops, m2, applied);
        if (rc != CN_MORAY_OK) {
            failed = true;
            self->store_failures++;
            s_set_error (self, "flush", cn_moray_errmsg (self->moray));
        }
        else
            for (size_t i = 0; i < m2; i++) {
                if (applied[i]) {
                    memcpy (c[i]->etag, ops[i].out_etag, 9);
                    c[i]->version = ops[i].out_id;
                    rows[i].version = ops[i].out_id;
                    rows_written++;
                }
                else
                    s_fence (self, c[i], "flush condition failed");
            }
        if (rc == CN_MORAY_OK) {
            /* our own rows in the table: last_heartbeat moves on */
            size_t w = 0;
            for (size_t i = 0; i < m2; i++)
                if (applied[i])
                    rows[w++] = rows[i];
            cn_liveness_put_many (self->live, rows, w);
        }
        for (size_t i = 0; i < m2; i++)
            free (texts[i]);
        free (texts);
        free (ops);
        free (applied);
        free (rows);
    }
    free (v);
    self->flushes++;
    self->flush_rows += rows_written;
    self->last_flush_ms = (double) (cn_mono_us () - t0) / 1000.0;
}

/* ------------------------------------------------------------------ */
/* Messages from the hub                                                */

/* The boot_id of a hello frame (lower case) into out ("" when absent). */
static void
s_hello_boot (zframe_t *frame, char out[37])
{
    cn_msg_t m;
    char err[64];
    out[0] = 0;
    if (!frame || cn_msg_parse (&m, zframe_data (frame), zframe_size (frame), err, sizeof err))
        return;
    size_t len = 0;
    const char *b = cn_msg_str (&m, "boot_id", &len);
    char tmp[37] = "";
    if (b && len == 36) {
        memcpy (tmp, b, 36);
        if (!cn_uuid_normalize (tmp, out))
            out[0] = 0;
    }
    cn_msg_fini (&m);
}

/* Refuse a session: another agent (another boot id) holds this server
 * uuid (bogus SMBIOS uuids happen). The agent backs off and tries again, so
 * it gets the server once the first one is really gone. */
static void
s_duplicate (self_t *self, uint64_t sid, const char *uuid, const char *remote,
             const char *agent_boot, const char *holder)
{
    self->duplicates++;
    CN_WARN (COMPONENT, "duplicate server uuid: another agent holds this server; session refused",
             "{s:s,s:s,s:s,s:s}", "server_uuid", uuid, "remote", remote ? remote : "",
             "agent_boot", agent_boot, "held_by", holder);
    s_hub_close (self, sid, CN_WS_CLOSE_DUPLICATE,
                 "duplicate: another agent with this server uuid is connected", NULL);
}

static void
s_hello (self_t *self, uint64_t sid, const char *uuid, const char *remote, zframe_t **frame)
{
    self->hellos++;
    owned_t *prev = zhashx_lookup (self->owned, uuid);
    char agent_boot[37] = "";
    s_hello_boot (*frame, agent_boot);
    if (prev && prev->sid != sid && prev->state == O_OWNED && prev->agent_boot[0]
        && agent_boot[0] && strcmp (prev->agent_boot, agent_boot) != 0) {
        /* a live session here from another agent (another boot id) with
         * the same server uuid: keep the first, refuse this one */
        s_duplicate (self, sid, uuid, remote, agent_boot, self->cfg->instance);
        return;
    }
    uint64_t replaces = 0;
    if (prev && prev->sid != sid && (prev->state == O_OWNED || prev->state == O_CLAIMING))
        replaces = prev->sid;
    if (prev && prev->state == O_CLAIMING && prev->replaces_sid)
        s_hub_close (self, prev->replaces_sid, CN_WS_CLOSE_FENCED,
                     "a newer session of this server took over", "fenced");
    if (prev) {
        s_bind (self, prev, false);
        if (prev->state == O_CLAIMING)
            s_batch_remove (self, prev);
    }
    owned_t *o = calloc (1, sizeof *o);
    if (!o)
        abort ();
    memcpy (o->uuid, uuid, 37);
    o->sid = sid;
    o->state = O_CLAIMING;
    o->claim_first_ms = o->connected_ms = cn_now_ms ();
    o->replaces_sid = replaces;
    memcpy (o->agent_boot, agent_boot, 37);
    snprintf (o->remote, sizeof o->remote, "%s", remote ? remote : "");
    o->hello = *frame;
    *frame = NULL;
    /* replaces (and frees) any previous entry: its claim, linger or
     * release is void; a newer claim bumps the epoch past it */
    zhashx_update (self->owned, o->uuid, o);
    zlistx_add_end (self->batch, o);
}

static void
s_bye (self_t *self, uint64_t sid, const char *uuid, const char *reason, int64_t heard)
{
    owned_t *o = zhashx_lookup (self->owned, uuid);
    if (!o || o->sid != sid)
        return;
    if (heard > o->last_heard_ms)
        o->last_heard_ms = heard;   /* the release writes it as last_heartbeat */
    if (o->state == O_CLAIMING) {
        /* nothing written yet; if the claim is running it is void */
        s_owned_remove (self, o);
        return;
    }
    if (o->state != O_OWNED)
        return;
    if (streq (reason, "closed") && self->cfg->session_close_grace_ms > 0) {
        /* the agent may come straight back (ARCHITECTURE.md: one quick
         * retry); release only if it does not */
        o->state = O_LINGER;
        o->linger_until_ms = cn_now_ms () + self->cfg->session_close_grace_ms;
        self->walk_needed = true;
        return;
    }
    /* released at the end of this wake-up together with every other
     * session that ended meanwhile: one statement per CHUNK rows. One
     * statement per session held this actor for seconds when thousands
     * timed out at once (docs/benchmarks.md, "Sessions (issue 3)") */
    o->state = O_LINGER;
    o->linger_until_ms = 0;
    self->release_due = true;
    self->walk_needed = true;
}

static void
s_vm_event (self_t *self, uint64_t sid, const char *uuid, zframe_t **frame)
{
    owned_t *o = zhashx_lookup (self->owned, uuid);
    if (!o || o->sid != sid)
        return;
    if (o->state == O_CLAIMING) {
        if (!o->held) {
            o->held = zlistx_new ();
            zlistx_set_destructor (o->held, (zlistx_destructor_fn *) zframe_destroy);
        }
        if (zlistx_size (o->held) < HELD_EVENTS_MAX) {
            zlistx_add_end (o->held, *frame);
            *frame = NULL;
        }
        return;
    }
    if (o->state != O_OWNED)
        return;
    json_t *ev = s_event_json (zframe_data (*frame), zframe_size (*frame));
    if (ev)
        s_event (self, o, ev);
    json_decref (ev);
}

static void s_snapshot_reply (self_t *self, const cn_msg_t *m);

static void
s_on_hub_msg (self_t *self, zframe_t *f)
{
    cn_msg_t m;
    char err[64];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_WARN (COMPONENT, "bad message from the hub", "{s:s}", "error", err);
        return;
    }
    uint64_t sid = 0;
    cn_msg_uint (&m, "sid", &sid);
    size_t ulen = 0;
    const char *u = cn_msg_str (&m, "uuid", &ulen);
    char uuid[37] = "";
    if (u && ulen == 36)
        memcpy (uuid, u, 36);
    bool hello = cn_msg_is (&m, "hello");
    /* keep order: a claim batch runs before anything else is handled */
    if (!hello)
        s_claim_run (self);
    if (hello || cn_msg_is (&m, "vm_event")) {
        const msgpack_object *fr = cn_msg_get (&m, "frame");
        if (fr && fr->type == MSGPACK_OBJECT_BIN && uuid[0]) {
            zframe_t *inner = zframe_new (fr->via.bin.ptr, fr->via.bin.size);
            if (hello) {
                size_t rlen = 0;
                const char *r = cn_msg_str (&m, "remote", &rlen);
                char remote[48] = "";
                if (r)
                    snprintf (remote, sizeof remote, "%.*s", (int) rlen, r);
                s_hello (self, sid, uuid, remote, &inner);
            }
            else
                s_vm_event (self, sid, uuid, &inner);
            zframe_destroy (&inner);
        }
    }
    else
    if (cn_msg_is (&m, "bye")) {
        char *reason = cn_msg_strdup (&m, "reason");
        int64_t heard = 0;
        cn_msg_int (&m, "heard", &heard);
        s_bye (self, sid, uuid, reason ? reason : "closed", heard);
        free (reason);
    }
    else
    if (cn_msg_is (&m, "flush"))
        s_flush (self, &m);
    else
    if (cn_msg_is (&m, "sessions"))
        s_snapshot_reply (self, &m);
    cn_msg_fini (&m);
}

static int
s_on_pull (zloop_t *loop, zsock_t *pull, void *arg)
{
    self_t *self = arg;
    for (int k = 0; k < DRAIN_MAX; k++) {
        zframe_t *f = zframe_recv_nowait (pull);
        if (!f)
            break;
        s_on_hub_msg (self, f);
        zframe_destroy (&f);
    }
    s_claim_run (self);
    if (self->release_due)
        s_release_due (self);
    return 0;
}

static int
s_on_writer_sock (zloop_t *loop, zsock_t *sock, void *arg)
{
    s_on_writer (arg);
    return 0;
}

/* ------------------------------------------------------------------ */
/* The subscription to cnapi:status                                     */

static void
s_sub_up (void *arg)
{
    self_t *self = arg;
    /* whatever happened while we were not listening: read it all */
    self->resync_full_due = true;
    CN_INFO (COMPONENT, "status subscription up", "{s:s}", "channel", CN_STATUS_CHANNEL);
}

static void
s_sub_down (void *arg, const char *why)
{
    CN_WARN (COMPONENT, "status subscription lost; resyncing from the store every second",
             "{s:s}", "reason", why);
}

static void
s_sub_message (void *arg, const char *s)
{
    self_t *self = arg;
    cn_status_row_t row;
    if (cn_status_message_parse (s, &row) != 0) {
        CN_WARN (COMPONENT, "bad status message", "{s:s}", "message", s);
        return;
    }
    /* sixth field: the owner's boot id; seventh and eighth: last_heartbeat
     * and since (ms, 0 = none; absent from older instances) */
    const char *p = s;
    for (int i = 0; i < 5 && p; i++) {
        p = strchr (p, ' ');
        if (p)
            p++;
    }
    char boot[40] = "";
    long long hb = 0, since = 0;
    int nf = p ? sscanf (p, "%39s %lld %lld", boot, &hb, &since) : 0;
    if (nf >= 1 && strcmp (boot, "-") != 0 && strlen (boot) < sizeof row.owner_boot)
        snprintf (row.owner_boot, sizeof row.owner_boot, "%s", boot);
    self->channel_msgs++;
    cn_status_row_t cur;
    bool held = cn_liveness_get (self->live, row.uuid, &cur);
    if (nf == 3 && hb >= 0 && since > 0) {
        row.last_heartbeat_ms = hb;
        row.since_ms = since;
    }
    else
    if (held) {
        /* no times in the message: keep the ones we hold */
        row.last_heartbeat_ms = cur.last_heartbeat_ms;
        row.since_ms = row.running == cur.running ? cur.since_ms : cn_now_ms ();
    }
    else
        row.since_ms = cn_now_ms ();
    if (cn_liveness_put (self->live, &row))
        s_check_fenced (self, &row);
}

/* ------------------------------------------------------------------ */
/* Liveness of instances, and the sweep                                 */

static void
s_beat (self_t *self)
{
    int64_t now = cn_now_ms ();
    if (cn_redis_ok (self->redis)) {
        redisReply *r = cn_redis_cmd (self->redis, "SET %s%s %s PX %d", CN_INSTANCE_KEY_PREFIX,
                                      self->cfg->instance, self->args->boot_id,
                                      self->cfg->session_dead_after_ms);
        if (r)
            freeReplyObject (r);
    }
    if (!s_buckets (self))
        return;
    char iso[32], started[32];
    json_t *o = json_pack ("{s:s,s:s,s:s,s:s,s:I,s:s,s:i,s:b}", "instance", self->cfg->instance,
                           "boot_id", self->args->boot_id,
                           "started", cn_iso8601 (self->started_ms, started, sizeof started),
                           "last_seen", cn_iso8601 (now, iso, sizeof iso),
                           "last_seen_ms", (json_int_t) now,
                           "http_address", self->cfg->http_address ? self->cfg->http_address : "",
                           "http_port", self->cfg->http_port, "stopped", 0);
    char *text = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    if (cn_moray_put (self->moray, CN_BUCKET_INSTANCES, self->cfg->instance, text, NULL, NULL,
                      NULL) != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "instance row", cn_moray_errmsg (self->moray));
    }
    free (text);
}

static int
s_collect_instance (const cn_mobj_t *obj, void *arg)
{
    self_t *self = arg;
    json_error_t jerr;
    json_t *o = json_loadb (obj->value, obj->value_len, 0, &jerr);
    const char *boot = json_string_value (json_object_get (o, "boot_id"));
    if (boot && strlen (boot) < 37) {
        int64_t now = cn_now_ms ();
        inst_t *i = zhashx_lookup (self->instances, obj->key);
        if (!i) {
            i = calloc (1, sizeof *i);
            if (!i)
                abort ();
            i->changed_ms = now;          /* first sight: as if it just changed */
            i->id = obj->id;
            zhashx_insert (self->instances, obj->key, i);
        }
        if (i->id != obj->id || strcmp (i->boot_id, boot) != 0) {
            i->id = obj->id;
            i->changed_ms = now;
        }
        snprintf (i->boot_id, sizeof i->boot_id, "%s", boot);
        json_t *ls = json_object_get (o, "last_seen_ms");
        i->last_seen_ms = json_is_integer (ls) ? json_integer_value (ls) : 0;
        i->stopped = json_is_true (json_object_get (o, "stopped"));
        i->seen = true;
    }
    json_decref (o);
    return 0;
}

/* Is (owner, boot) alive? redis_val: its Redis key's value, NULL when
 * absent; redis_ok false when Redis could not be asked. *seen: when it was
 * last known alive, for last_heartbeat (now for ourselves or a live Redis
 * key; the instance row's own last_seen_ms otherwise: a row we only just
 * came across is given the benefit of the doubt for dead_after_ms, but not
 * a made-up time). */
static bool
s_alive (self_t *self, const char *owner, const char *boot, const char *redis_val,
         bool redis_ok, int64_t now, int64_t *seen)
{
    *seen = 0;
    if (strcmp (owner, self->cfg->instance) == 0
        && (!boot[0] || strcmp (boot, self->args->boot_id) == 0)) {
        *seen = now;
        return true;
    }
    if (redis_ok && redis_val && (!boot[0] || strcmp (redis_val, boot) == 0)) {
        *seen = now;
        return true;
    }
    inst_t *i = zhashx_lookup (self->instances, owner);
    if (i && !i->stopped && (!boot[0] || strcmp (i->boot_id, boot) == 0)
        && now - i->changed_ms <= self->cfg->session_dead_after_ms) {
        *seen = i->last_seen_ms < now ? i->last_seen_ms : now;
        return true;
    }
    return false;
}

/* Mark the rows of a dead owner incarnation unknown (those still running). */
static void
s_mark_unknown (self_t *self, const char *owner, const char *boot)
{
    char *esc = cn_filter_escape (owner);
    char filter[256];
    snprintf (filter, sizeof filter, "(&(owner=%s)(status=running))", esc ? esc : "");
    free (esc);
    rowvec_t v = { 0 };
    cn_mfind_opts_t opts = { .limit = 2000 };
    if (cn_moray_find (self->moray, CN_BUCKET_STATUS, filter, &opts, s_collect_row, &v)
        != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "sweep", cn_moray_errmsg (self->moray));
        free (v.rows);
        return;
    }
    size_t k = 0;
    for (size_t i = 0; i < v.n; i++)
        if (!boot[0] || strcmp (v.rows[i].owner_boot, boot) == 0)
            v.rows[k++] = v.rows[i];
    int64_t now = cn_now_ms ();
    for (size_t start = 0; start < k; start += CHUNK) {
        size_t m = k - start < CHUNK ? k - start : CHUNK;
        cn_status_row_t *c = v.rows + start;
        const char **keys = calloc (m, sizeof *keys);
        cn_mobj_t *objs = calloc (m, sizeof *objs);
        cn_mop_t *ops = calloc (m, sizeof *ops);
        char **texts = calloc (m, sizeof *texts);
        bool *applied = calloc (m, sizeof *applied);
        cn_status_row_t *rows = calloc (m, sizeof *rows);
        size_t nops = 0;
        for (size_t i = 0; i < m; i++)
            keys[i] = c[i].uuid;
        int rc = cn_moray_begin (self->moray);
        if (rc == CN_MORAY_OK)
            rc = cn_moray_get_many_locked (self->moray, CN_BUCKET_STATUS, keys, m, objs);
        if (rc == CN_MORAY_OK) {
            for (size_t i = 0; i < m; i++) {
                cn_status_row_t r;
                /* re-check under the lock: re-owned meanwhile? */
                if (!objs[i].key || cn_status_row_parse (objs[i].value, objs[i].value_len, &r) != 0
                    || !r.running || strcmp (r.owner, owner) != 0
                    || (boot[0] && strcmp (r.owner_boot, boot) != 0))
                    continue;
                /* the last time the dead owner was seen vouching for it */
                int64_t seen = cn_liveness_vouched (self->live, r.owner, r.owner_boot);
                if (seen > r.last_heartbeat_ms)
                    r.last_heartbeat_ms = seen;
                r.running = false;
                r.owner[0] = 0;
                r.owner_boot[0] = 0;
                r.since_ms = now;
                rows[nops] = r;
                texts[nops] = cn_status_row_format (&r);
                ops[nops].kind = CN_MOP_PUT;
                ops[nops].bucket = CN_BUCKET_STATUS;
                ops[nops].key = objs[i].key;
                ops[nops].value = texts[nops];
                ops[nops].etag = objs[i].etag;
                nops++;
            }
            rc = nops ? cn_moray_batch_partial (self->moray, ops, nops, applied) : CN_MORAY_OK;
            if (rc == CN_MORAY_OK)
                rc = cn_moray_commit (self->moray);
        }
        if (rc != CN_MORAY_OK) {
            cn_moray_rollback (self->moray);
            self->store_failures++;
            s_set_error (self, "sweep", cn_moray_errmsg (self->moray));
        }
        else {
            size_t npub = 0;
            for (size_t i = 0; i < nops; i++)
                if (applied[i]) {
                    rows[i].version = ops[i].out_id;
                    rows[npub++] = rows[i];
                }
            cn_liveness_put_many (self->live, rows, npub);
            s_publish (self, rows, npub);
            self->swept += npub;
            if (npub)
                CN_INFO (COMPONENT, "servers of a dead instance marked unknown",
                         "{s:s,s:s,s:i}", "owner", owner, "owner_boot", boot,
                         "servers", (int) npub);
        }
        for (size_t i = 0; i < m; i++) {
            cn_mobj_fini (&objs[i]);
            free (texts[i]);
        }
        free (keys);
        free (objs);
        free (ops);
        free (texts);
        free (applied);
        free (rows);
    }
    free (v.rows);
}

static void
s_sweep (self_t *self)
{
    if (!cn_liveness_loaded (self->live) || !s_buckets (self))
        return;
    int64_t now = cn_now_ms ();
    /* this instance is alive: the hub closes a session silent for
     * dead_after_ms, so every running row we own had its agent heard
     * within that (what last_heartbeat shows, cn_liveness_vouch) */
    cn_liveness_vouch (self->live, self->cfg->instance, self->args->boot_id, now);
    /* the instance rows (a handful) */
    for (inst_t *i = zhashx_first (self->instances); i; i = zhashx_next (self->instances))
        i->seen = false;
    if (cn_moray_find (self->moray, CN_BUCKET_INSTANCES, "(_key=*)", NULL, s_collect_instance,
                       self) != CN_MORAY_OK) {
        self->store_failures++;
        s_set_error (self, "instances", cn_moray_errmsg (self->moray));
        return;                 /* without the store nothing can be marked anyway */
    }
    /* distinct owner incarnations of running rows (a walk under the read
     * lock, no copy of the table: the copy and a key per row were most of
     * the sweep at 15,000 rows) */
    uint64_t gen = cn_liveness_owners_gen (self->live);
    if (!self->owners || gen != self->owners_gen) {
        free (self->owners);
        self->nowners = cn_liveness_owners (self->live, &self->owners);
        self->owners_gen = gen;     /* read before the walk: a change meanwhile walks again */
    }
    const cn_owner_t *own = self->owners;   /* distinct pairs */
    size_t no = self->nowners;
    /* their Redis keys, in one round trip */
    char **vals = calloc (no ? no : 1, sizeof *vals);
    bool redis_ok = false;
    if (no && cn_redis_ok (self->redis)) {
        redisContext *ctx = cn_redis_ctx (self->redis);
        for (size_t i = 0; i < no; i++)
            redisAppendCommand (ctx, "GET %s%s", CN_INSTANCE_KEY_PREFIX, own[i].owner);
        redis_ok = true;
        for (size_t i = 0; i < no; i++) {
            redisReply *r = NULL;
            if (redisGetReply (ctx, (void **) &r) != REDIS_OK) {
                cn_redis_failed (self->redis, ctx->errstr[0] ? ctx->errstr : "GET failed");
                redis_ok = false;
                break;
            }
            if (r->type == REDIS_REPLY_STRING)
                vals[i] = strdup (r->str);
            freeReplyObject (r);
        }
    }
    zhashx_t *present = zhashx_new ();      /* "name boot" of every incarnation */
    for (size_t i = 0; i < no; i++) {
        const char *name = own[i].owner, *boot = own[i].owner_boot;
        char key[128];
        snprintf (key, sizeof key, "%s %s", name, boot);
        zhashx_insert (present, key, (void *) 1);
        int64_t *since = zhashx_lookup (self->dead_since, key);
        int64_t seen = 0;
        if (s_alive (self, name, boot, vals[i], redis_ok, now, &seen)) {
            /* its running rows' agents were heard within dead_after_ms */
            if (seen > 0)
                cn_liveness_vouch (self->live, name, boot, seen);
            if (since)
                zhashx_delete (self->dead_since, key);
            continue;
        }
        if (!since) {
            since = malloc (sizeof *since);
            if (!since)
                abort ();
            *since = now;
            zhashx_insert (self->dead_since, key, since);
            CN_INFO (COMPONENT, "instance looks dead; its servers go unknown after the grace "
                     "unless their agents come back", "{s:s,s:s,s:i}", "owner", name,
                     "owner_boot", boot, "grace_ms", self->cfg->session_owner_grace_ms);
        }
        if (now - *since >= self->cfg->session_owner_grace_ms)
            s_mark_unknown (self, name, boot);
    }
    /* forget incarnations that own nothing running any more */
    zlistx_t *keys = zhashx_keys (self->dead_since);
    for (char *k = zlistx_first (keys); k; k = zlistx_next (keys))
        if (!zhashx_lookup (present, k))
            zhashx_delete (self->dead_since, k);
    zlistx_destroy (&keys);
    for (size_t i = 0; i < no; i++)
        free (vals[i]);
    free (vals);
    zhashx_destroy (&present);
}

/* ------------------------------------------------------------------ */
/* The tick                                                             */

static void s_snapshot_timeout (self_t *self);

static int
s_on_tick (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    int64_t now = cn_now_ms ();

    /* claims waiting for the store */
    if (zlistx_size (self->batch) && now >= self->claim_retry_ms)
        s_claim_run (self);

    /* lingering sessions whose agent did not come back; VM state retries.
     * Only while there may be some: walking 15,000 owned sessions ten
     * times a second for nothing was the sessions actor's largest cost
     * (docs/benchmarks.md, "Sessions (issue 3)") */
    if (self->walk_needed) {
        size_t n = zhashx_size (self->owned), k = 0, left = 0;
        owned_t **due = calloc (n ? n : 1, sizeof *due);
        for (owned_t *o = zhashx_first (self->owned); o; o = zhashx_next (self->owned)) {
            left += o->state == O_LINGER || o->pending != NULL;
            if (o->state == O_LINGER && now >= o->linger_until_ms)
                due[k++] = o;
            else
            if (o->state == O_OWNED && o->pending && !o->vms_in_flight
                && now >= o->vms_next_ms) {
                json_t *vms = json_object_get (o->pending, "vms");
                if (json_is_object (vms))
                    s_send_vms (self, o, vms);
            }
        }
        if (k)
            s_release (self, due, k);
        free (due);
        /* the released ones were counted: one more walk clears the flag */
        self->walk_needed = left > 0;
    }

    if (now >= self->next_beat_ms) {
        self->next_beat_ms = now + 1000;
        s_beat (self);
        cn_redis_sub_check (self->sub);
    }
    if (now >= self->next_resync_ms || self->resync_full_due
        || !cn_liveness_loaded (self->live)) {
        bool full = self->resync_full_due || now >= self->next_full_resync_ms
                    || !cn_liveness_loaded (self->live);
        int64_t since = full ? 0 : self->last_resync_start_ms - RESYNC_LOOKBACK_MS;
        if (s_resync (self, since) == 0 && full) {
            self->resync_full_due = false;
            self->next_full_resync_ms = now + FULL_RESYNC_MS;
        }
        self->next_resync_ms = now + (cn_redis_sub_up (self->sub) ? RESYNC_MS : RESYNC_DOWN_MS);
    }
    if (now >= self->next_sweep_ms) {
        self->next_sweep_ms = now + 1000;
        s_sweep (self);
    }
    if (self->snap_waiting && now >= self->snap_deadline_ms)
        s_snapshot_timeout (self);
    return 0;
}

/* ------------------------------------------------------------------ */
/* STATUS and SESSIONS                                                  */

static zframe_t *
s_status (self_t *self)
{
    size_t owned = 0, claiming = 0, lingering = 0, pending = 0;
    for (owned_t *o = zhashx_first (self->owned); o; o = zhashx_next (self->owned)) {
        owned += o->state == O_OWNED;
        claiming += o->state == O_CLAIMING;
        lingering += o->state == O_LINGER;
        pending += o->pending != NULL;
    }
    size_t running = 0, rows = cn_liveness_count (self->live, &running);
    cn_hub_stats_t *h = self->args->stats;
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 40);
    cn_msgw_str (&w, "actor", "sessions");
    cn_msgw_str (&w, "state", !self->started ? "stopped"
                            : !cn_liveness_loaded (self->live) ? "loading" : "running");
    cn_msgw_str (&w, "boot_id", self->args->boot_id);
    cn_msgw_uint (&w, "sessions", owned);
    cn_msgw_uint (&w, "claiming", claiming);
    cn_msgw_uint (&w, "lingering", lingering);
    cn_msgw_uint (&w, "vms_waiting_for_record", pending);
#define A(k, f) cn_msgw_uint (&w, k, atomic_load_explicit (&h->f, memory_order_relaxed))
    A ("sockets", open);
    A ("upgrades", upgrades);
    A ("bad_frames", bad_frames);
    A ("timeouts", timeouts);
    A ("frames_in", frames_in);
    A ("hb_sent", hb_sent);
    A ("hub_busy", busy);
#undef A
    cn_msgw_uint (&w, "hellos", self->hellos);
    cn_msgw_uint (&w, "claims", self->claims);
    cn_msgw_uint (&w, "takeovers", self->takeovers);
    cn_msgw_uint (&w, "fenced", self->fenced);
    cn_msgw_uint (&w, "duplicates", self->duplicates);
    cn_msgw_uint (&w, "releases", self->releases);
    cn_msgw_uint (&w, "lost_byes", self->lost_byes);
    cn_msgw_uint (&w, "swept", self->swept);
    cn_msgw_uint (&w, "claim_failures", self->claim_failures);
    cn_msgw_uint (&w, "flushes", self->flushes);
    cn_msgw_uint (&w, "flush_rows", self->flush_rows);
    cn_msgw_double (&w, "last_flush_ms", self->last_flush_ms);
    cn_msgw_uint (&w, "resyncs", self->resyncs);
    cn_msgw_uint (&w, "full_resyncs", self->full_resyncs);
    cn_msgw_uint (&w, "channel_messages", self->channel_msgs);
    cn_msgw_uint (&w, "vms_writes", self->vms_writes);
    cn_msgw_uint (&w, "vm_events", self->vm_events);
    cn_msgw_uint (&w, "writer_failures", self->writer_failures);
    cn_msgw_uint (&w, "store_failures", self->store_failures);
    cn_msgw_uint (&w, "publish_failures", self->publish_failures);
    cn_msgw_uint (&w, "table_rows", rows);
    cn_msgw_uint (&w, "table_running", running);
    cn_msgw_bool (&w, "pg", cn_moray_connected (self->moray));
    cn_msgw_bool (&w, "redis", cn_redis_connected (self->redis));
    cn_msgw_bool (&w, "subscription", cn_redis_sub_up (self->sub));
    cn_msgw_str (&w, "last_error", self->last_error);
    return cn_msgw_frame (&w);
}

static int s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg);

static void
s_ctl_reply (self_t *self, const char *text)
{
    zstr_send (self->ctl, text);
    self->snap_waiting = false;
    zloop_reader (self->loop, self->ctl, s_on_ctl, self);
}

static void
s_snapshot_timeout (self_t *self)
{
    s_ctl_reply (self, "{\"error\":\"no answer from the sessions hub\"}");
}

static void
s_snapshot_reply (self_t *self, const cn_msg_t *m)
{
    uint64_t req = 0;
    cn_msg_uint (m, "req", &req);
    if (!self->snap_waiting || req != self->snap_req)
        return;
    json_t *j = cn_msgpack_to_json (m->map);
    json_object_del (j, "v");
    json_object_del (j, "type");
    json_object_del (j, "req");
    json_object_del (j, "now_ms");
    json_object_set_new (j, "instance", json_string (self->cfg->instance));
    char *text = json_dumps (j, JSON_COMPACT);
    json_decref (j);
    s_ctl_reply (self, text ? text : "{\"error\":\"out of memory\"}");
    free (text);
}

static int
s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    zmsg_t *msg = zmsg_recv (sock);
    if (!msg)
        return 0;
    char *cmd = zmsg_popstr (msg);
    if (cmd && streq (cmd, "SESSIONS")) {
        char *off = zmsg_popstr (msg), *lim = zmsg_popstr (msg);
        long long o = off ? atoll (off) : 0, l = lim ? atoll (lim) : 1000;
        free (off);
        free (lim);
        if (o < 0)
            o = 0;
        if (l <= 0 || l > CN_SESSIONS_PAGE_MAX)
            l = l <= 0 ? 1000 : CN_SESSIONS_PAGE_MAX;
        cn_hub_cmd_t *c = calloc (1, sizeof *c);
        if (!c)
            abort ();
        c->kind = CN_HUB_SNAPSHOT;
        c->req = ++self->snap_req;
        c->offset = (uint64_t) o;
        c->limit = (uint64_t) l;
        /* REP: the answer comes when the hub has listed its sessions */
        self->snap_waiting = true;
        self->snap_deadline_ms = cn_now_ms () + SNAPSHOT_TIMEOUT_MS;
        zloop_reader_end (self->loop, self->ctl);
        cn_hub_post (self->args->hub, c);
    }
    else {
        zframe_t *f = s_status (self);
        zframe_send (&f, sock, 0);
    }
    free (cmd);
    zmsg_destroy (&msg);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Start, stop                                                          */

static int
s_start (self_t *self, char *reason, size_t rlen)
{
    const cn_config_t *cfg = self->cfg;
    self->started_ms = cn_now_ms ();
    self->moray = cn_moray_new (cfg->pg_conninfo, cfg->pg_timeout_ms);
    self->redis = cn_redis_new (cfg->redis_url, cfg->redis_timeout_ms, COMPONENT);
    self->sub = cn_redis_sub_new (cfg->redis_url, cfg->redis_timeout_ms, "sessions-sub",
                                  CN_STATUS_CHANNEL);
    self->pull = zsock_new (ZMQ_PULL);
    if (!self->moray || !self->redis || !self->sub || !self->pull) {
        snprintf (reason, rlen, "out of memory");
        return -1;
    }
    zsock_set_rcvhwm (self->pull, 1000000);
    char werr[160];
    self->writer = cn_writer_client (cfg->writer_shards, 100000, 100000, werr, sizeof werr);
    if (!self->writer || zsock_connect (self->pull, "%s", CN_SESSIONS_ENDPOINT) != 0) {
        snprintf (reason, rlen, "cannot connect the hub or the writer");
        return -1;
    }
    self->ctl = cn_ctl_bind ("sessions");
    if (!self->ctl) {
        snprintf (reason, rlen, "cannot bind the control socket");
        return -1;
    }
    zloop_reader (self->loop, self->pull, s_on_pull, self);
    zloop_reader (self->loop, self->writer, s_on_writer_sock, self);
    zloop_reader (self->loop, self->ctl, s_on_ctl, self);
    zloop_timer (self->loop, TICK_MS, 0, s_on_tick, self);

    /* the table first: until it is loaded readers fall back to sysinfo
     * freshness, so load it now if the store answers */
    if (cn_moray_connect (self->moray) == CN_MORAY_OK && s_resync (self, 0) == 0)
        self->next_full_resync_ms = self->started_ms + FULL_RESYNC_MS;
    else
        CN_WARN (COMPONENT, "store unreachable at start; will load the status table later",
                 "{s:s}", "error", cn_moray_errmsg (self->moray));
    self->next_resync_ms = self->started_ms + RESYNC_MS;
    s_beat (self);
    self->next_beat_ms = self->started_ms + 1000;
    self->next_sweep_ms = self->started_ms + 1000;
    cn_redis_sub_attach (self->sub, self->loop, s_sub_message, s_sub_up, s_sub_down, self);
    cn_redis_sub_try (self->sub);

    cn_vmevents_args_t *va = calloc (1, sizeof *va);
    if (!va)
        abort ();
    va->cfg = cfg;
    self->vmevents = zactor_new (cn_vmevents_actor, va);
    if (self->vmevents) {
        zstr_send (self->vmevents, "START");
        char *ok = zstr_recv (self->vmevents);
        if (!ok || !streq (ok, "OK")) {
            char *why = ok ? zstr_recv (self->vmevents) : NULL;
            CN_WARN (COMPONENT, "VM events actor did not start; VM events come over the "
                     "sessions only", "{s:s?}", "reason", why);
            free (why);
            zactor_destroy (&self->vmevents);
        }
        free (ok);
    }
    self->vmevents_args = va;
    self->started = true;
    CN_INFO (COMPONENT, "sessions ready", "{s:s,s:i,s:i,s:i}", "boot_id", self->args->boot_id,
             "heartbeat_ms", cfg->session_heartbeat_ms, "dead_after_ms",
             cfg->session_dead_after_ms, "flush_ms", cfg->session_flush_ms);
    return 0;
}

/* Leaving (SIGTERM): release nothing (the agents were told to go elsewhere
 * and their new owners take over); drop our liveness key and say so in our
 * instance row, so the others count the grace from now. */
static void
s_stop (self_t *self)
{
    if (!self->started)
        return;
    if (cn_redis_ok (self->redis)) {
        char key[256];
        snprintf (key, sizeof key, "%s%s", CN_INSTANCE_KEY_PREFIX, self->cfg->instance);
        redisReply *r = cn_redis_cmd (self->redis,
                                      "EVAL %s 1 %s %s",
                                      "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                                      "return redis.call('DEL', KEYS[1]) end return 0",
                                      key, self->args->boot_id);
        if (r)
            freeReplyObject (r);
    }
    if (self->buckets_ready) {
        char iso[32];
        int64_t now = cn_now_ms ();
        json_t *o = json_pack ("{s:s,s:s,s:s,s:I,s:b}", "instance", self->cfg->instance,
                               "boot_id", self->args->boot_id,
                               "last_seen", cn_iso8601 (now, iso, sizeof iso),
                               "last_seen_ms", (json_int_t) now, "stopped", 1);
        char *text = json_dumps (o, JSON_COMPACT);
        json_decref (o);
        (void) cn_moray_put (self->moray, CN_BUCKET_INSTANCES, self->cfg->instance, text,
                             NULL, NULL, NULL);
        free (text);
    }
    size_t n = zhashx_size (self->owned);
    CN_INFO (COMPONENT, "sessions stopping; ownership stays until taken over",
             "{s:i}", "sessions", (int) n);
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
cn_sessions_actor (zsock_t *pipe, void *args)
{
    self_t *self = calloc (1, sizeof *self);
    if (!self)
        abort ();
    self->args = args;
    self->cfg = self->args->cfg;
    self->live = self->args->live;
    self->pipe = pipe;
    self->loop = zloop_new ();
    self->owned = zhashx_new ();
    zhashx_set_destructor (self->owned, s_owned_free);
    self->wpending = zhashx_new ();
    cn_tag_keys (self->wpending);
    zhashx_set_destructor (self->wpending, s_wctx_free);
    self->batch = zlistx_new ();
    self->instances = zhashx_new ();
    zhashx_set_destructor (self->instances, (zhashx_destructor_fn *) zstr_free);
    self->dead_since = zhashx_new ();
    zhashx_set_destructor (self->dead_since, (zhashx_destructor_fn *) zstr_free);
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);
    zloop_start (self->loop);

    s_stop (self);
    zactor_destroy (&self->vmevents);
    free (self->vmevents_args);
    cn_redis_sub_destroy (&self->sub);
    zloop_destroy (&self->loop);
    zsock_destroy (&self->pull);
    zsock_destroy (&self->writer);
    zsock_destroy (&self->ctl);
    zlistx_destroy (&self->batch);
    zhashx_destroy (&self->owned);
    zhashx_destroy (&self->wpending);
    zhashx_destroy (&self->instances);
    zhashx_destroy (&self->dead_since);
    free (self->owners);
    cn_moray_destroy (&self->moray);
    cn_redis_destroy (&self->redis);
    free (self);
}
