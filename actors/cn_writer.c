/*
 * cn_writer: the state writer actor. See include/cn_writer.h and proto/writer.md.
 *
 * Theory of operation.
 *
 * Group commit. The actor reads every request waiting on its ROUTER (up to
 * writer_max_batch) and applies them in one transaction: it locks the rows of
 * every server the batch touches (SELECT ... FOR UPDATE), folds the requests
 * into those records in arrival order in memory, writes each changed record
 * once, commits, and only then answers. While a transaction runs, new requests
 * queue up in ZeroMQ, so the busier it gets the bigger the batches become.
 *
 * Shards. cnapid runs writer.shards of these actors (writer-0, writer-1,
 * ...); clients send each request to the shard of its server's uuid
 * (cn_writer_shard), so a server is only ever written by one shard of an
 * instance, in the order its client sent the requests, and its parsed record
 * stays in that shard's cache. The shards share nothing but PostgreSQL and
 * Redis: while one waits on its transaction the other does its CPU work.
 *
 * Races between instances. Rows that exist are locked, so two instances
 * writing the same server serialise. A server that does not exist yet is
 * inserted with the "must not exist" condition; if another instance inserted
 * it first the batch fails with a conflict and is simply run again (the row
 * now exists and gets locked). Sysinfo carries its source time (sent_ms); an
 * older sysinfo than the stored one is acknowledged and ignored, so
 * round-robin delivery to several instances cannot move a record backwards.
 *
 * Failure. PostgreSQL unreachable: requests from AMQP are kept, in order, and
 * retried with backoff (their messages stay unacked, so a crash loses nothing:
 * the broker redelivers). Requests from HTTP are answered 500 at once.
 *
 * Cache. After the commit, the changed records (with their version, _id) go
 * to the cache writer child actor (actors/cn_cache.c), which writes them
 * through to Redis on its own thread: Redis is never on the commit path.
 * Answers to HTTP writes wait for the cache writer's "cache_done" covering
 * their batch (s_answer_http), so a read right after the answer finds the
 * new version in Redis; answers to AMQP and session traffic never wait.
 *
 * CPU per sysinfo. A sysinfo is ~3 KB of which a record derives ~17 members;
 * it is checked in one pass and kept as its text plus a small tree of those
 * members (cn_sysinfo_t), never as a full jansson tree. Records are held
 * without their sysinfo (s_row_t.rec, .si); the stored text is the record
 * with the sysinfo's text spliced in (s_record_text). The records this writer
 * committed stay parsed (records, keyed by uuid, with their etag): the locking
 * read asks PostgreSQL to leave out values whose etag we hold. A new sysinfo
 * shares the parsed members whose text did not change with the previous one.
 * While PostgreSQL runs a statement, the writer reads and decodes the
 * requests of the next batch (cn_moray_set_idle, at most one batch ahead):
 * they join the next batch in arrival order.
 */
#include "cn_writer.h"

#include "cn_actor.h"
#include "cn_config.h"
#include "cn_health.h"
#include "cn_liveness.h"
#include "cn_log.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_cache.h"
#include "cn_server.h"
#include "cn_util.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define LAT_SAMPLES 8192
#define RECORD_CACHE_MAX 50000
#define COMPONENT self->name  /* "writer-<shard>" */

typedef enum { REQ_SYSINFO, REQ_UPDATE, REQ_DELETE, REQ_VMS, REQ_VM_EVENT } s_kind_t;

typedef struct {
    zframe_t *identity;       /* the client's ROUTER identity */
    s_kind_t kind;
    uint64_t tag;
    char uuid[37];
    bool from_http;
    int64_t sent_ms;
    int64_t received_ms;
    json_t *body;             /* update params, vms map, or VM */
    cn_sysinfo_t *si;         /* sysinfo: the text as received, checked */
    uint64_t epoch;           /* vms: the session's ownership epoch */
    uint64_t seq;             /* vm_event */
    char vm_uuid[37];         /* vm_event */
    char event[16];           /* vm_event */
} s_req_t;

typedef struct {
    /* reply */
    bool ok;
    int status;
    const char *outcome;
    const char *code;
    char message[256];
    json_t *errors;
    bool retry;
} s_res_t;

typedef struct {
    const cn_config_t *cfg;
    int shard;
    char name[16];            /* "writer-<shard>": STATUS, control socket, thread */
    zsock_t *pipe;
    zsock_t *router;
    zsock_t *ctl;
    zloop_t *loop;
    cn_moray_t *moray;
    zactor_t *cache;          /* child: writes committed records to Redis */
    zsock_t *cache_push;
    cn_cache_stats_t cache_stats;
    uint64_t cache_sent;      /* seq of the last "cache_puts" sent */
    uint64_t cache_done;      /* seq the cache writer reported done */
    zlistx_t *held;           /* s_held_t*: HTTP answers waiting for cache_done */
    uint64_t held_total;
    bool started;
    bool bucket_ready;

    zlistx_t *retry;          /* s_req_t* from AMQP waiting for PostgreSQL */
    zlistx_t *ahead;          /* s_req_t* decoded while PostgreSQL worked */
    int ahead_timer;
    int retry_attempt;
    int retry_timer;
    zhashx_t *records;        /* uuid -> s_cached_t: parsed records we wrote */
    uint64_t record_hits, record_misses;

    /* counters */
    uint64_t received, batches, rows_written, unchanged, stale, conflicts, rejected,
        failures, requests_failed_fast, retries, max_batch_seen, total_batched,
        stale_from_memory;
    uint64_t last_batch;
    double last_commit_ms;
    /* publish-to-commit latency of the last LAT_SAMPLES sysinfo messages that
     * carried their source time (sent_ms) */
    float lat_ms[LAT_SAMPLES];
    size_t lat_n, lat_next;
} self_t;

static void
s_req_destroy (s_req_t **p)
{
    if (!p || !*p)
        return;
    zframe_destroy (&(*p)->identity);
    json_decref ((*p)->body);
    cn_sysinfo_unref (&(*p)->si);
    free (*p);
    *p = NULL;
}

static void
s_reply (self_t *self, s_req_t *req, const s_res_t *res)
{
    uint32_t n = 4;
    if (res->outcome)
        n++;
    if (res->code)
        n++;
    if (res->message[0])
        n++;
    if (res->errors)
        n++;
    if (res->retry)
        n++;
    cn_msgw_t w;
    cn_msgw_init (&w, "result", n);
    cn_msgw_uint (&w, "tag", req->tag);
    cn_msgw_bool (&w, "ok", res->ok);
    cn_msgw_uint (&w, "status", (uint64_t) res->status);
    cn_msgw_str (&w, "uuid", req->uuid);
    if (res->outcome)
        cn_msgw_str (&w, "outcome", res->outcome);
    if (res->code)
        cn_msgw_str (&w, "code", res->code);
    if (res->message[0])
        cn_msgw_str (&w, "message", res->message);
    if (res->errors)
        cn_msgw_json (&w, "errors", res->errors);
    if (res->retry)
        cn_msgw_bool (&w, "retry", true);
    zframe_t *body = cn_msgw_frame (&w);
    zframe_t *id = zframe_dup (req->identity);
    zframe_send (&id, self->router, ZFRAME_MORE);
    zframe_send (&body, self->router, 0);
}

static void s_req_destroy (s_req_t **p);

/* Answer *reqp and be done with it: the request and res->errors are freed. */
static void
s_finish (self_t *self, s_req_t **reqp, s_res_t *res)
{
    s_reply (self, *reqp, res);
    json_decref (res->errors);
    res->errors = NULL;
    s_req_destroy (reqp);
}

/* An HTTP write's answer held until Redis has every record committed
 * before it (s_answer_http): a read right after the answer, on any
 * instance, must not find the previous version in the shared cache. */
typedef struct {
    uint64_t seq;
    s_req_t *req;
    s_res_t res;
} s_held_t;

static void
s_held_release (self_t *self, uint64_t upto)
{
    s_held_t *h;
    while ((h = zlistx_first (self->held)) && h->seq <= upto) {
        zlistx_detach (self->held, NULL);
        s_finish (self, &h->req, &h->res);
        free (h);
    }
}

/* Answer an HTTP request of a committed batch; takes *reqp and res->errors. */
static void
s_answer_http (self_t *self, s_req_t **reqp, s_res_t *res)
{
    if (self->cache_done >= self->cache_sent) {
        s_finish (self, reqp, res);
        return;
    }
    s_held_t *h = malloc (sizeof *h);
    if (!h)
        abort ();
    h->seq = self->cache_sent;
    h->req = *reqp;
    h->res = *res;
    *reqp = NULL;
    zlistx_add_end (self->held, h);
    self->held_total++;
}

static int
s_on_cache (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    /* everything waiting: seqs are cumulative, the highest is enough */
    zframe_t *f;
    while ((f = zframe_recv_nowait (sock)) != NULL) {
        cn_msg_t m;
        char err[128];
        if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) == 0) {
            uint64_t seq = 0;
            if (cn_msg_is (&m, "cache_done") && cn_msg_uint (&m, "seq", &seq)
                && seq > self->cache_done)
                self->cache_done = seq;
            cn_msg_fini (&m);
        }
        zframe_destroy (&f);
    }
    s_held_release (self, self->cache_done);
    return 0;
}

static void
s_fail (s_res_t *res, int status, const char *code, const char *outcome, const char *fmt, ...)
{
    res->ok = false;
    res->status = status;
    res->code = code;
    res->outcome = outcome;
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (res->message, sizeof res->message, fmt, ap);
    va_end (ap);
}

static const cn_sysinfo_t *s_cached_si (self_t *self, const char *uuid);

/* Decode one request. Returns NULL (after replying, when possible) on bad input. */
static s_req_t *
s_decode (self_t *self, zframe_t *identity, zframe_t *frame)
{
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, zframe_data (frame), zframe_size (frame), err, sizeof err) != 0) {
        CN_WARN (COMPONENT, "request dropped", "{s:s}", "reason", err);
        self->rejected++;
        zframe_destroy (&identity);
        return NULL;
    }
    s_req_t *req = calloc (1, sizeof *req);
    req->identity = identity;
    req->received_ms = cn_now_ms ();
    const char *why = NULL;
    if (!cn_msg_uint (&m, "tag", &req->tag))
        why = "request has no tag";
    else if (cn_msg_is (&m, "sysinfo"))
        req->kind = REQ_SYSINFO;
    else if (cn_msg_is (&m, "update_server"))
        req->kind = REQ_UPDATE;
    else if (cn_msg_is (&m, "delete_server"))
        req->kind = REQ_DELETE;
    else if (cn_msg_is (&m, "vms"))
        req->kind = REQ_VMS;
    else if (cn_msg_is (&m, "vm_event"))
        req->kind = REQ_VM_EVENT;
    else
        why = "unknown request type";
    size_t len = 0;
    const char *uuid = why ? NULL : cn_msg_str (&m, "uuid", &len);
    if (!why) {
        char tmp[37] = "";
        if (uuid && len == 36)
            memcpy (tmp, uuid, 36);
        if (!cn_uuid_normalize (tmp, req->uuid))
            why = "request has no valid uuid";
    }
    size_t slen = 0;
    const char *source = cn_msg_str (&m, "source", &slen);
    /* update_server and delete_server only ever come from the HTTP API */
    req->from_http = (source && slen == 4 && memcmp (source, "http", 4) == 0)
                     || req->kind == REQ_UPDATE || req->kind == REQ_DELETE;
    cn_msg_int (&m, "sent_ms", &req->sent_ms);
    s_res_t res = { 0 };
    if (!why && req->kind == REQ_SYSINFO) {
        const char *body = cn_msg_str (&m, "sysinfo", &len);
        char perr[256];
        if (!body)
            why = "request has no sysinfo";
        else if (cn_sysinfo_load_like (body, len, req->uuid, s_cached_si (self, req->uuid),
                                       &req->si, perr, sizeof perr) != 0) {
            s_fail (&res, 400, "InvalidArgument", "rejected", "%s", perr);
        }
    }
    else if (!why && req->kind == REQ_UPDATE) {
        const char *body = cn_msg_str (&m, "params", &len);
        json_error_t jerr;
        req->body = body ? json_loadb (body, len, 0, &jerr) : NULL;
        if (!json_is_object (req->body))
            why = "request has no params object";
    }
    else if (!why && req->kind == REQ_VMS) {
        const char *body = cn_msg_str (&m, "vms", &len);
        json_error_t jerr;
        req->body = body ? json_loadb (body, len, 0, &jerr) : NULL;
        if (!json_is_object (req->body))
            why = "request has no vms object";
        else if (!cn_msg_uint (&m, "epoch", &req->epoch))
            why = "request has no epoch";
    }
    else if (!why && req->kind == REQ_VM_EVENT) {
        size_t vlen = 0, elen = 0;
        const char *vm_uuid = cn_msg_str (&m, "vm_uuid", &vlen);
        const char *event = cn_msg_str (&m, "event", &elen);
        const char *vm = cn_msg_str (&m, "vm", &len);
        char tmp[37] = "";
        if (vm_uuid && vlen == 36)
            memcpy (tmp, vm_uuid, 36);
        if (!cn_uuid_normalize (tmp, req->vm_uuid))
            why = "request has no valid vm_uuid";
        else if (!event || elen == 0 || elen >= sizeof req->event)
            why = "request has no event";
        else if (!cn_msg_uint (&m, "seq", &req->seq))
            why = "request has no seq";
        else {
            memcpy (req->event, event, elen);
            req->event[elen] = 0;
            json_error_t jerr;
            req->body = vm ? json_loadb (vm, len, 0, &jerr) : NULL;
            bool destroy = strcmp (req->event, "destroy") == 0;
            if (!destroy && strcmp (req->event, "create") != 0
                && strcmp (req->event, "state") != 0 && strcmp (req->event, "update") != 0)
                why = "unknown vm event";
            else if (!destroy && !json_is_object (req->body))
                why = "request has no vm object";
        }
    }
    cn_msg_fini (&m);
    if (why)
        s_fail (&res, 400, "InvalidArgument", "rejected", "%s", why);
    if (res.status) {
        self->rejected++;
        CN_WARN (COMPONENT, "request rejected", "{s:s,s:s}", "reason", res.message,
                 "server_uuid", req->uuid);
        s_finish (self, &req, &res);
    }
    return req;
}

/* A record this writer committed, kept parsed: when the locked row still
 * has this etag (nobody else wrote it since), the next batch reuses it instead
 * of parsing ~4 KB of JSON again. Records are held apart from their sysinfo
 * (rec has no "sysinfo" member; si is its text), see s_record_text. */
typedef struct {
    char etag[9];
    json_t *rec;
    cn_sysinfo_t *si;
} s_cached_t;

static void
s_cached_destroy (void **item)
{
    s_cached_t *c = *item;
    if (c) {
        json_decref (c->rec);
        cn_sysinfo_unref (&c->si);
        free (c);
    }
    *item = NULL;
}

/* The sysinfo of the record we last wrote for uuid, if we hold it: a new
 * sysinfo shares the parsed members that did not change with it. */
static const cn_sysinfo_t *
s_cached_si (self_t *self, const char *uuid)
{
    s_cached_t *c = zhashx_lookup (self->records, uuid);
    return c ? c->si : NULL;
}

static void
s_cache_record (self_t *self, const char *uuid, const char *etag, json_t *rec,
                cn_sysinfo_t *si)
{
    if (zhashx_size (self->records) >= RECORD_CACHE_MAX)
        zhashx_purge (self->records);    /* crude but bounded; refills on use */
    s_cached_t *c = malloc (sizeof *c);
    memcpy (c->etag, etag, 9);
    c->rec = json_incref (rec);
    c->si = cn_sysinfo_ref (si);
    zhashx_update (self->records, uuid, c);
}

/* Per-server state inside one batch. */
typedef struct {
    char *uuid;
    json_t *rec;              /* current record (NULL = absent), without "sysinfo" */
    cn_sysinfo_t *si;         /* its sysinfo (NULL = none) */
    char etag[9];             /* stored etag, "" when absent */
    bool existed;
    bool dirty;
    bool deleted;
    int64_t version;
    int64_t session_epoch;    /* vms: the cnapi_status row's epoch; -1 unknown */
} s_row_t;

/* The stored text of a record: the record, then "sysinfo": the sysinfo's
 * text as it came (a request's bytes, or a stored record's re-serialised),
 * instead of serialising ~3 KB of tree. */
static char *
s_record_text (const s_row_t *row)
{
    if (!row->si)
        return json_dumps (row->rec, JSON_COMPACT);
    char *head = json_dumps (row->rec, JSON_COMPACT);
    if (!head)
        return NULL;
    size_t hlen = strlen (head);              /* "{...}" */
    size_t rlen = row->si->len;
    char *out = malloc (hlen + rlen + 16);
    if (out) {
        size_t o = hlen - 1;                  /* drop the closing brace */
        memcpy (out, head, o);
        if (hlen > 2)
            out[o++] = ',';
        memcpy (out + o, "\"sysinfo\":", 10);
        o += 10;
        memcpy (out + o, row->si->text, rlen);
        o += rlen;
        out[o++] = '}';
        out[o] = '\0';
    }
    free (head);
    return out;
}

static s_row_t *
s_row_find (s_row_t *rows, size_t n, const char *uuid)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp (rows[i].uuid, uuid) == 0)
            return &rows[i];
    return NULL;
}

static void
s_apply_one (self_t *self, s_req_t *req, s_row_t *row, s_res_t *res)
{
    memset (res, 0, sizeof *res);
    res->ok = true;
    res->status = 200;
    if (req->kind == REQ_SYSINFO) {
        cn_sysinfo_ctx_t ctx = {
            .datacenter = self->cfg->datacenter_name,
            .now_ms = req->received_ms,
            .sent_ms = req->sent_ms,
            .freshness_s = self->cfg->sysinfo_freshness_s,
        };
        json_t *out = NULL;
        cn_srv_result_t r = cn_server_apply_sysinfo_si (row->rec, row->si, req->si, &ctx, &out);
        switch (r) {
            case CN_SRV_WRITE:
                res->outcome = "written";
                break;
            case CN_SRV_UNCHANGED:
                res->outcome = "unchanged";
                self->unchanged++;
                break;
            case CN_SRV_STALE:
                res->outcome = "stale";
                self->stale++;
                break;
            case CN_SRV_CONFLICT:
                res->outcome = "conflict";
                self->conflicts++;
                json_t *hn = json_object_get (req->si->summary, "Hostname");
                CN_WARN (COMPONENT, "another machine reports this server uuid", "{s:s,s:s?}",
                         "server_uuid", req->uuid, "hostname",
                         json_is_string (hn) ? json_string_value (hn) : NULL);
                break;
        }
        if (out) {
            json_decref (row->rec);
            row->rec = out;
            row->dirty = true;
            row->deleted = false;
            if (r == CN_SRV_WRITE) {
                cn_sysinfo_unref (&row->si);
                row->si = cn_sysinfo_ref (req->si);
            }
        }
        return;
    }
    if (!row->rec) {
        s_fail (res, 404, "ResourceNotFound", "failed", "Server %s not found", req->uuid);
        return;
    }
    if (req->kind == REQ_VMS || req->kind == REQ_VM_EVENT) {
        /* a stale owner's state must not land after the new owner's */
        if (req->kind == REQ_VMS && row->session_epoch > (int64_t) req->epoch) {
            s_fail (res, 409, "Conflict", "fenced",
                    "epoch %llu is older than the session's epoch %lld",
                    (unsigned long long) req->epoch, (long long) row->session_epoch);
            return;
        }
        /* row->rec may be shared with the record cache: change a copy (top
         * level shared, the VM maps copied) */
        json_t *copy = json_copy (row->rec);
        const char *deep[] = { "vms", "vms_destroyed" };
        for (int k = 0; k < 2; k++) {
            json_t *v = json_object_get (copy, deep[k]);
            if (v)
                json_object_set_new (copy, deep[k], json_deep_copy (v));
        }
        cn_srv_result_t r = req->kind == REQ_VMS
            ? cn_server_apply_vms (copy, req->body, req->received_ms)
            : cn_server_apply_vm_event (copy, req->vm_uuid, req->event, req->seq,
                                        req->body, req->received_ms);
        if (r == CN_SRV_WRITE) {
            json_decref (row->rec);
            row->rec = copy;
            row->dirty = true;
            res->outcome = "written";
            return;
        }
        json_decref (copy);
        if (r == CN_SRV_STALE) {
            res->outcome = "stale";
            self->stale++;
        }
        else {
            res->outcome = "unchanged";
            self->unchanged++;
        }
        return;
    }
    if (req->kind == REQ_DELETE) {
        json_decref (row->rec);
        row->rec = NULL;
        cn_sysinfo_unref (&row->si);
        row->deleted = true;
        row->dirty = true;
        res->outcome = "written";
        return;
    }
    /* REQ_UPDATE: apply to a copy so a rejected update leaves the row alone. */
    json_t *copy = json_deep_copy (row->rec);
    cn_apierr_t aerr = { 0 };
    if (cn_server_update (copy, req->body, cn_now_ms (), &aerr) != 0) {
        json_decref (copy);
        s_fail (res, aerr.status ? aerr.status : 500, aerr.code ? aerr.code : "InternalError",
                "rejected", "%s", aerr.message);
        res->errors = aerr.errors ? json_incref (aerr.errors) : NULL;
        cn_apierr_fini (&aerr);
        return;
    }
    json_decref (row->rec);
    row->rec = copy;
    row->dirty = true;
    res->status = 204;
    res->outcome = "written";
}

typedef enum { RUN_OK, RUN_EIO, RUN_CONFLICT, RUN_ERROR } s_run_t;

/* Run one batch in one transaction. On RUN_OK, res[i] holds each answer and
 * the written rows are pushed to the cache. */
static s_run_t
s_run_batch (self_t *self, s_req_t **reqs, size_t n, s_res_t *res)
{
    if (!self->bucket_ready) {
        int rc = cn_moray_put_bucket (self->moray, CN_BUCKET_SERVERS, cn_server_index,
                                      cn_server_nindex);
        if (rc != CN_MORAY_OK)
            return rc == CN_MORAY_EIO ? RUN_EIO : RUN_ERROR;
        self->bucket_ready = true;
    }
    /* distinct uuids, in first-seen order */
    const char **keys = calloc (n, sizeof *keys);
    s_row_t *rows = calloc (n, sizeof *rows);
    size_t nrows = 0;
    for (size_t i = 0; i < n; i++) {
        if (!s_row_find (rows, nrows, reqs[i]->uuid)) {
            rows[nrows].uuid = reqs[i]->uuid;
            keys[nrows] = reqs[i]->uuid;
            nrows++;
        }
    }
    cn_mobj_t *objs = calloc (nrows, sizeof *objs);
    /* the etags of the records we hold parsed: PostgreSQL leaves those values
     * out when they are still current */
    const char **etags = calloc (nrows, sizeof *etags);
    for (size_t i = 0; i < nrows; i++) {
        s_cached_t *c = zhashx_lookup (self->records, rows[i].uuid);
        etags[i] = c ? c->etag : NULL;
    }
    s_run_t out = RUN_OK;
    int rc = cn_moray_begin (self->moray);
    if (rc == CN_MORAY_OK)
        rc = cn_moray_lock_many (self->moray, CN_BUCKET_SERVERS, keys, etags, nrows, objs);
    free (etags);
    if (rc != CN_MORAY_OK) {
        out = rc == CN_MORAY_EIO ? RUN_EIO : RUN_ERROR;
        goto done;
    }
    /* the session epochs of servers that get a VM state (fencing) */
    for (size_t i = 0; i < nrows; i++)
        rows[i].session_epoch = -1;
    for (size_t i = 0; i < n; i++) {
        s_row_t *row = s_row_find (rows, nrows, reqs[i]->uuid);
        if (reqs[i]->kind != REQ_VMS || row->session_epoch >= 0)
            continue;
        cn_mobj_t so;
        memset (&so, 0, sizeof so);
        int src = cn_moray_get (self->moray, CN_BUCKET_STATUS, row->uuid, &so);
        if (src == CN_MORAY_OK) {
            cn_status_row_t sr;
            if (cn_status_row_parse (so.value, so.value_len, &sr) == 0)
                row->session_epoch = (int64_t) sr.epoch;
            cn_mobj_fini (&so);
        }
        else if (src == CN_MORAY_EIO) {
            out = RUN_EIO;
            goto done;
        }
        /* no bucket yet, no row: nobody else can have claimed it */
    }
    for (size_t i = 0; i < nrows; i++) {
        if (objs[i].key) {
            json_error_t jerr;
            s_cached_t *c = zhashx_lookup (self->records, rows[i].uuid);
            jerr.text[0] = 0;
            if (!objs[i].value && c && strcmp (c->etag, objs[i].etag) == 0) {
                rows[i].rec = json_incref (c->rec);
                rows[i].si = cn_sysinfo_ref (c->si);
                self->record_hits++;
            }
            else if (objs[i].value) {
                rows[i].rec = json_loadb (objs[i].value, objs[i].value_len, 0, &jerr);
                json_t *si = json_object_get (rows[i].rec, "sysinfo");
                if (si) {
                    rows[i].si = cn_sysinfo_from_json (si);
                    if (!rows[i].si) {
                        CN_FATAL (COMPONENT, "out of memory", "{s:s}", "server_uuid",
                                  rows[i].uuid);
                        abort ();
                    }
                    json_object_del (rows[i].rec, "sysinfo");
                }
                self->record_misses++;
            }
            else {
                /* cannot happen: no value only when our etag matched */
                CN_FATAL (COMPONENT, "store left out a value we do not hold", "{s:s}",
                          "server_uuid", rows[i].uuid);
                abort ();
            }
            if (!rows[i].rec)
                CN_ERROR (COMPONENT, "stored server record is not JSON; replacing it",
                          "{s:s,s:s}", "server_uuid", rows[i].uuid, "error", jerr.text);
            memcpy (rows[i].etag, objs[i].etag, 9);
            rows[i].existed = true;
            rows[i].version = objs[i].id;
        }
    }
    for (size_t i = 0; i < n; i++)
        s_apply_one (self, reqs[i], s_row_find (rows, nrows, reqs[i]->uuid), &res[i]);

    /* one op per changed row */
    cn_mop_t *ops = calloc (nrows, sizeof *ops);
    char **texts = calloc (nrows, sizeof *texts);
    size_t *opmap = calloc (nrows, sizeof *opmap);
    size_t nops = 0;
    for (size_t i = 0; i < nrows; i++) {
        if (!rows[i].dirty)
            continue;
        if (rows[i].deleted && !rows[i].existed)
            continue;
        cn_mop_t *op = &ops[nops];
        op->bucket = CN_BUCKET_SERVERS;
        op->key = rows[i].uuid;
        op->etag = rows[i].existed ? rows[i].etag : CN_MORAY_ETAG_NULL;
        if (rows[i].deleted)
            op->kind = CN_MOP_DEL;
        else {
            op->kind = CN_MOP_PUT;
            texts[i] = s_record_text (&rows[i]);
            op->value = texts[i];
        }
        opmap[nops++] = i;
    }
    size_t failed = 0;
    /* the batch ends the transaction (commit, or rollback on failure) */
    rc = nops ? cn_moray_batch_final (self->moray, ops, nops, &failed)
              : cn_moray_commit (self->moray);
    if (rc != CN_MORAY_OK) {
        out = rc == CN_MORAY_EIO ? RUN_EIO : rc == CN_MORAY_CONFLICT ? RUN_CONFLICT : RUN_ERROR;
        if (out == RUN_ERROR)
            CN_ERROR (COMPONENT, "batch failed", "{s:s,s:i}", "error",
                      cn_moray_errmsg (self->moray), "requests", (int) n);
    }
    else {
        self->rows_written += nops;
        /* hand the committed records to the cache writer: one message,
         * {items: [[uuid, version, json|nil], ...]} */
        cn_msgw_t w;
        cn_msgw_init (&w, "cache_puts", 2);
        cn_msgw_uint (&w, "seq", ++self->cache_sent);
        cn_msgw_key (&w, "items");
        msgpack_pack_array (&w.pk, nops);
        for (size_t k = 0; k < nops; k++) {
            size_t i = opmap[k];
            if (ops[k].kind == CN_MOP_PUT)
                s_cache_record (self, rows[i].uuid, ops[k].out_etag, rows[i].rec, rows[i].si);
            else
                zhashx_delete (self->records, rows[i].uuid);
            msgpack_pack_array (&w.pk, 3);
            msgpack_pack_str (&w.pk, 36);
            msgpack_pack_str_body (&w.pk, rows[i].uuid, 36);
            msgpack_pack_uint64 (&w.pk, (uint64_t) ops[k].out_id);
            if (texts[i]) {
                size_t len = strlen (texts[i]);
                msgpack_pack_str (&w.pk, len);
                msgpack_pack_str_body (&w.pk, texts[i], len);
            }
            else
                msgpack_pack_nil (&w.pk);
        }
        zframe_t *f = cn_msgw_frame (&w);
        atomic_fetch_add (&self->cache_stats.queued, 1);
        /* blocking send: if the cache writer falls 1000 batches behind, the
         * writer waits rather than let the cache go stale */
        zframe_send (&f, self->cache_push, 0);
    }
    for (size_t i = 0; i < nrows; i++)
        free (texts[i]);
    free (texts);
    free (ops);
    free (opmap);
done:
    if (out != RUN_OK) {
        cn_moray_rollback (self->moray);
        for (size_t i = 0; i < n; i++)
            json_decref (res[i].errors);
        memset (res, 0, n * sizeof *res);
    }
    for (size_t i = 0; i < nrows; i++) {
        json_decref (rows[i].rec);
        cn_sysinfo_unref (&rows[i].si);
        cn_mobj_fini (&objs[i]);
    }
    free (objs);
    free (rows);
    free (keys);
    return out;
}

static int s_retry_timer (zloop_t *loop, int timer_id, void *arg);
static int s_ahead_timer (zloop_t *loop, int timer_id, void *arg);

static void
s_schedule_retry (self_t *self)
{
    if (self->retry_timer)
        return;
    int delay = cn_backoff_ms (self->retry_attempt++, 100, 5000);
    self->retry_timer = zloop_timer (self->loop, (size_t) (delay > 0 ? delay : 1), 1,
                                     s_retry_timer, self);
}

/* Process reqs (taking ownership). AMQP requests that cannot be written now
 * go to the retry list; HTTP ones are answered with the failure. */
static void s_process_batch (self_t *self, s_req_t **reqs, size_t n);

static void
s_process (self_t *self, s_req_t **reqs, size_t n)
{
    s_process_batch (self, reqs, n);
    /* requests read ahead while this batch ran (s_read_ahead): the router
     * may have nothing left to wake the loop, so come back for them */
    if (zlistx_size (self->ahead) > 0 && !self->ahead_timer)
        self->ahead_timer = zloop_timer (self->loop, 1, 1, s_ahead_timer, self);
}

/* VM events already covered by the record this writer last committed for
 * their server are answered at once, without the store: each event comes
 * twice, on the agent's session and over AMQP, and the second is stale
 * (cn_server_vm_event_stale; seqs only grow, so what we committed is a
 * lower bound of what is stored). Returns how many requests are left, in
 * order, at the front of reqs. */
static size_t
s_answer_stale_events (self_t *self, s_req_t **reqs, size_t n)
{
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        s_req_t *req = reqs[i];
        s_cached_t *c = req->kind == REQ_VM_EVENT ? zhashx_lookup (self->records, req->uuid)
                                                  : NULL;
        if (c && c->rec && cn_server_vm_event_stale (c->rec, req->vm_uuid, req->seq)) {
            s_res_t res = { .ok = true, .status = 200, .outcome = "stale" };
            self->stale++;
            self->stale_from_memory++;
            s_finish (self, &reqs[i], &res);
            continue;
        }
        reqs[kept++] = req;
    }
    return kept;
}

static void
s_process_batch (self_t *self, s_req_t **reqs, size_t n)
{
    n = s_answer_stale_events (self, reqs, n);
    if (n == 0)
        return;
    s_res_t *res = calloc (n, sizeof *res);
    int64_t t0 = cn_mono_us ();
    s_run_t run = RUN_CONFLICT;
    /* A conflict means another instance inserted a server we thought new:
     * run again, the row is there now. Bounded. */
    for (int attempt = 0; attempt < 5 && run == RUN_CONFLICT; attempt++)
        run = s_run_batch (self, reqs, n, res);
    cn_health_set ("moray", run != RUN_EIO);
    if (run == RUN_OK) {
        self->batches++;
        self->last_batch = n;
        self->total_batched += n;
        if (n > self->max_batch_seen)
            self->max_batch_seen = n;
        self->last_commit_ms = (double) (cn_mono_us () - t0) / 1000.0;
        self->retry_attempt = 0;
        int64_t committed_ms = cn_now_ms ();
        for (size_t i = 0; i < n; i++) {
            if (reqs[i]->kind == REQ_SYSINFO && reqs[i]->sent_ms > 0 && !reqs[i]->from_http) {
                self->lat_ms[self->lat_next] = (float) (committed_ms - reqs[i]->sent_ms);
                self->lat_next = (self->lat_next + 1) % LAT_SAMPLES;
                if (self->lat_n < LAT_SAMPLES)
                    self->lat_n++;
            }
            if (reqs[i]->from_http) {
                s_answer_http (self, &reqs[i], &res[i]);
                continue;
            }
            s_finish (self, &reqs[i], &res[i]);
        }
        free (res);
        return;
    }
    self->failures++;
    const char *why = cn_moray_errmsg (self->moray);
    if (run == RUN_EIO)
        CN_WARN (COMPONENT, "store unreachable; will retry", "{s:s,s:i}", "error", why ? why : "",
                 "requests", (int) n);
    for (size_t i = 0; i < n; i++) {
        if (reqs[i]->from_http && run == RUN_ERROR && n > 1) {
            /* failed for a reason other than reachability, maybe another
             * request's: an HTTP request is run again alone, at once */
            s_process_batch (self, &reqs[i], 1);
            continue;
        }
        if (reqs[i]->from_http || run == RUN_ERROR) {
            /* HTTP callers are never held; a batch that fails for a reason
             * other than reachability is retried one request at a time so one
             * bad request cannot block the others. */
            if (!reqs[i]->from_http && n > 1) {
                zlistx_add_end (self->retry, reqs[i]);
                continue;
            }
            s_res_t r = { 0 };
            s_fail (&r, 500, "InternalError", "failed",
                    run == RUN_EIO ? "store unreachable: %s" : "store error: %s", why ? why : "");
            r.retry = run == RUN_EIO;
            if (!reqs[i]->from_http)
                self->rejected++;
            else
                self->requests_failed_fast++;
            s_finish (self, &reqs[i], &r);
        }
        else
            zlistx_add_end (self->retry, reqs[i]);
    }
    free (res);
    if (zlistx_size (self->retry))
        s_schedule_retry (self);
}

static void
s_process_retry_list (self_t *self)
{
    size_t max = (size_t) self->cfg->writer_max_batch;
    bool single = false;
    while (zlistx_size (self->retry) > 0) {
        size_t n = zlistx_size (self->retry);
        if (n > max)
            n = max;
        /* after a non-reachability failure, go one by one */
        if (single)
            n = 1;
        s_req_t **reqs = calloc (n, sizeof *reqs);
        for (size_t i = 0; i < n; i++)
            reqs[i] = zlistx_detach (self->retry, NULL);
        uint64_t failures = self->failures;
        self->retries++;
        s_process (self, reqs, n);
        free (reqs);
        if (self->failures != failures) {
            if (!cn_moray_connected (self->moray))
                return;   /* s_process re-queued them and scheduled a retry */
            single = true;
        }
    }
}

static int
s_retry_timer (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    self->retry_timer = 0;
    s_process_retry_list (self);
    return 0;
}

/* Read and decode one waiting request: false when none is waiting. *out is
 * NULL when it was refused (and answered). */
static bool
s_read_one (self_t *self, s_req_t **out)
{
    *out = NULL;
    zmsg_t *msg = zmsg_recv_nowait (self->router);
    if (!msg)
        return false;
    zframe_t *id = zmsg_pop (msg);
    zframe_t *body = zmsg_pop (msg);
    zmsg_destroy (&msg);
    if (!id || !body) {
        zframe_destroy (&id);
        zframe_destroy (&body);
        return true;
    }
    self->received++;
    *out = s_decode (self, id, body);
    zframe_destroy (&body);
    return true;
}

/* While PostgreSQL runs a batch, decode the requests of the next one (the
 * sysinfo check is most of a request's CPU): at most one batch ahead. */
static bool
s_read_ahead (void *arg)
{
    self_t *self = arg;
    if (zlistx_size (self->ahead) >= (size_t) self->cfg->writer_max_batch)
        return false;
    s_req_t *req;
    if (!s_read_one (self, &req))
        return false;
    if (req)
        zlistx_add_end (self->ahead, req);
    return true;
}

static int s_on_router (zloop_t *loop, zsock_t *router, void *arg);

static int
s_ahead_timer (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    self->ahead_timer = 0;
    return s_on_router (loop, self->router, self);
}

static int
s_on_router (zloop_t *loop, zsock_t *router, void *arg)
{
    self_t *self = arg;
    size_t max = (size_t) self->cfg->writer_max_batch;
    s_req_t **reqs = calloc (max, sizeof *reqs);
    size_t n = 0;
    /* those read ahead are older than any still waiting */
    while (n < max && zlistx_size (self->ahead) > 0)
        reqs[n++] = zlistx_detach (self->ahead, NULL);
    while (n < max) {
        s_req_t *req;
        if (!s_read_one (self, &req))
            break;
        if (req)
            reqs[n++] = req;
    }
    /* Keep order: while older AMQP requests wait for a retry, newer AMQP ones
     * wait behind them; HTTP ones are tried now (they fail fast if the store
     * is still down). */
    if (zlistx_size (self->retry) > 0) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            if (reqs[i]->from_http)
                reqs[k++] = reqs[i];
            else
                zlistx_add_end (self->retry, reqs[i]);
        }
        n = k;
    }
    s_process (self, reqs, n);
    free (reqs);
    return 0;
}

static int
s_on_tick (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    /* keep the health flag fresh when idle */
    if (zlistx_size (self->retry) == 0) {
        bool up = cn_moray_connected (self->moray) || cn_moray_connect (self->moray) == CN_MORAY_OK;
        cn_health_set ("moray", up);
    }
    return 0;
}

static int
s_cmp_float (const void *a, const void *b)
{
    float x = *(const float *) a, y = *(const float *) b;
    return x < y ? -1 : x > y ? 1 : 0;
}

/* p-th percentile (0..100) of the latency samples, 0 when none. */
static double
s_latency_pct (const self_t *self, double p)
{
    if (self->lat_n == 0)
        return 0.0;
    float *copy = malloc (self->lat_n * sizeof *copy);
    memcpy (copy, self->lat_ms, self->lat_n * sizeof *copy);
    qsort (copy, self->lat_n, sizeof *copy, s_cmp_float);
    size_t idx = (size_t) (p / 100.0 * (double) (self->lat_n - 1) + 0.5);
    double v = copy[idx];
    free (copy);
    return v;
}

static zframe_t *
s_status (self_t *self)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 30);
    cn_msgw_str (&w, "actor", self->name);
    cn_msgw_str (&w, "state", !self->started ? "stopped"
                            : zlistx_size (self->retry) ? "backoff" : "running");
    cn_msgw_bool (&w, "pg", cn_moray_connected (self->moray));
    cn_msgw_bool (&w, "redis", atomic_load (&self->cache_stats.connected));
    cn_msgw_uint (&w, "queue_depth", zlistx_size (self->retry));
    cn_msgw_uint (&w, "received", self->received);
    cn_msgw_uint (&w, "batches", self->batches);
    cn_msgw_uint (&w, "rows_written", self->rows_written);
    cn_msgw_uint (&w, "unchanged", self->unchanged);
    cn_msgw_uint (&w, "stale", self->stale);
    cn_msgw_uint (&w, "stale_from_memory", self->stale_from_memory);
    cn_msgw_uint (&w, "conflicts", self->conflicts);
    cn_msgw_uint (&w, "rejected", self->rejected);
    cn_msgw_uint (&w, "failures", self->failures);
    cn_msgw_uint (&w, "retries", self->retries);
    cn_msgw_uint (&w, "failed_fast", self->requests_failed_fast);
    cn_msgw_uint (&w, "last_batch", self->last_batch);
    cn_msgw_uint (&w, "max_batch", self->max_batch_seen);
    cn_msgw_double (&w, "avg_batch",
                    self->batches ? (double) self->total_batched / (double) self->batches : 0.0);
    cn_msgw_double (&w, "last_commit_ms", self->last_commit_ms);
    cn_msgw_uint (&w, "cache_dirty", atomic_load (&self->cache_stats.dirty));
    cn_msgw_uint (&w, "cache_queued", atomic_load (&self->cache_stats.queued));
    cn_msgw_uint (&w, "cache_failures", atomic_load (&self->cache_stats.failures));
    cn_msgw_uint (&w, "http_held", zlistx_size (self->held));
    cn_msgw_uint (&w, "http_held_total", self->held_total);
    cn_msgw_uint (&w, "latency_samples", self->lat_n);
    cn_msgw_uint (&w, "record_cache_hits", self->record_hits);
    cn_msgw_uint (&w, "record_cache_misses", self->record_misses);
    cn_msgw_double (&w, "publish_to_commit_p50_ms", s_latency_pct (self, 50));
    cn_msgw_double (&w, "publish_to_commit_p99_ms", s_latency_pct (self, 99));
    return cn_msgw_frame (&w);
}

static int
s_on_ctl (zloop_t *loop, zsock_t *ctl, void *arg)
{
    self_t *self = arg;
    char *cmd = zstr_recv (ctl);
    if (!cmd)
        return 0;
    zframe_t *f = s_status (self);
    zframe_send (&f, ctl, 0);
    zstr_free (&cmd);
    return 0;
}

static int
s_start (self_t *self)
{
    self->moray = cn_moray_new (self->cfg->pg_conninfo, self->cfg->pg_timeout_ms);
    if (self->moray)
        cn_moray_set_idle (self->moray, s_read_ahead, self);
    cn_cache_args_t cargs = { self->cfg, &self->cache_stats, self->shard };
    self->cache = zactor_new (cn_cache_actor, &cargs);
    self->cache_push = zsock_new (ZMQ_PUSH);
    if (!self->cache || !self->cache_push
        || zsock_connect (self->cache_push, CN_CACHE_FMT, self->shard) != 0)
        return -1;
    zsock_set_sndhwm (self->cache_push, 1000);
    self->router = zsock_new (ZMQ_ROUTER);
    if (!self->moray || !self->router
        || zsock_bind (self->router, CN_WRITER_FMT, self->shard) != 0)
        return -1;
    zsock_set_rcvhwm (self->router, 100000);
    zsock_set_sndhwm (self->router, 100000);
    self->ctl = cn_ctl_bind (self->name);
    if (!self->ctl)
        return -1;
    zloop_reader (self->loop, self->router, s_on_router, self);
    zloop_reader (self->loop, self->ctl, s_on_ctl, self);
    zloop_reader (self->loop, zactor_sock (self->cache), s_on_cache, self);
    zloop_timer (self->loop, 1000, 0, s_on_tick, self);
    /* The store may be down at start: that is not fatal, we retry. */
    if (cn_moray_connect (self->moray) == CN_MORAY_OK) {
        int rc = cn_moray_put_bucket (self->moray, CN_BUCKET_SERVERS, cn_server_index,
                                      cn_server_nindex);
        self->bucket_ready = rc == CN_MORAY_OK;
        cn_health_set ("moray", true);
    }
    else
        CN_WARN (COMPONENT, "store unreachable at start; will retry", "{s:s}", "error",
                 cn_moray_errmsg (self->moray));
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
    if (!cmd || streq (cmd, "$TERM"))
        rc = -1;
    else if (streq (cmd, "START")) {
        if (self->started)
            zstr_send (pipe, "OK");
        else if (s_start (self) == 0)
            zstr_send (pipe, "OK");
        else
            zstr_sendx (pipe, "ERROR", "cannot bind the writer endpoint", NULL);
    }
    else if (streq (cmd, "STATUS")) {
        zframe_t *f = s_status (self);
        zframe_send (&f, pipe, 0);
    }
    else
        CN_WARN (COMPONENT, "unknown pipe command", "{s:s}", "command", cmd);
    zstr_free (&cmd);
    zmsg_destroy (&msg);
    return rc;
}

void
cn_writer_actor (zsock_t *pipe, void *args)
{
    const cn_writer_args_t *a = args;
    self_t *self = calloc (1, sizeof *self);
    self->cfg = a->cfg;
    self->shard = a->shard;
    snprintf (self->name, sizeof self->name, "writer-%d", a->shard);
    cn_thread_name (self->name);
    self->pipe = pipe;
    self->loop = zloop_new ();
    self->retry = zlistx_new ();
    self->ahead = zlistx_new ();
    self->held = zlistx_new ();
    self->records = zhashx_new ();
    zhashx_set_destructor (self->records, s_cached_destroy);
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);
    zloop_start (self->loop);

    /* Leaving: requests still waiting stay unacked at the broker, which
     * redelivers them to another instance. */
    if (zlistx_size (self->retry))
        CN_WARN (COMPONENT, "stopping with requests not written; the broker will redeliver",
                 "{s:i}", "requests", (int) zlistx_size (self->retry));
    for (s_req_t *r = zlistx_first (self->retry); r; r = zlistx_next (self->retry))
        s_req_destroy (&r);
    zlistx_destroy (&self->retry);
    for (s_req_t *r = zlistx_first (self->ahead); r; r = zlistx_next (self->ahead))
        s_req_destroy (&r);
    zlistx_destroy (&self->ahead);
    /* committed: answer what still waits for the cache */
    s_held_release (self, UINT64_MAX);
    zlistx_destroy (&self->held);
    zhashx_destroy (&self->records);
    zloop_destroy (&self->loop);
    zsock_destroy (&self->router);
    zsock_destroy (&self->ctl);
    cn_moray_destroy (&self->moray);
    zsock_destroy (&self->cache_push);
    zactor_destroy (&self->cache);
    free (self);
}
