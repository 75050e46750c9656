/*
 * cn_backend: a worker behind the HTTP gateway (include/cn_backend.h).
 *
 * Theory of operation
 *
 * The gateway's h2o thread must never wait on anything but its own sockets,
 * so everything that touches the store, the cache or the state writer happens
 * here. A backend is a plain zloop actor with three sockets:
 *
 *   PULL    requests from the gateway (proto/backend.md), round-robined by
 *           ZeroMQ between the backends;
 *   DEALER  to the state writer (proto/writer.md) for writes;
 *   pipe    main's commands.
 *
 * Reads (ping, GET /servers, GET /servers/:uuid) are answered at once: this
 * thread blocks on PostgreSQL or Redis for at most their configured timeouts.
 * Writes are checked here first (everything the reference checks before it
 * touches the store: the body, the uuid, that the server exists, the
 * parameters), then handed to the writer with a tag; the writer answers with
 * a "result" after the commit, and only then does the HTTP caller get its
 * answer ("persist, then reply"). A write the writer has not answered within
 * a bound is answered 503 so no caller is held forever.
 *
 * GET /servers without extras or fields (the list sdc-clients pages through)
 * is served from views rendered once per record version: the list-view
 * cache (lib/cn_listcache.c), one for all the backends, keyed by the
 * record's _key and matched against its _etag and _id. A request reads the
 * page's keys, etags and versions (no values) and takes each row's view
 * from the cache; only when some are missing does it read the page again,
 * with the values of just those (the store leaves out the ones held), and
 * render them. Each row's status, the one part of a list view that depends
 * on the time and the status table, is spliced in per response from the
 * view's status inputs, so the bytes are those of a full render. The
 * versions are checked against the store on every request: the cache
 * never answers a version the store no longer has. Other list queries
 * render every record from its value, as before.
 *
 * Parameter handling follows restify as the reference uses it: the route's
 * :server_uuid first, then the query string, then a JSON body; a later source
 * only fills a name whose earlier value is falsy (JavaScript truthiness).
 */
#include "cn_backend.h"

#include <inttypes.h>
#include <string.h>

#include "cn_actor.h"
#include "cn_health.h"
#include "cn_log.h"
#include "cn_json.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_params.h"
#include "cn_backend_extra.h"
#include "cn_redis.h"
#include "cn_server.h"
#include "cn_svc.h"
#include "cn_util.h"

#define COMPONENT "backend"
#define CT_JSON "application/json"

/* A write waiting for the writer's "result". */
typedef struct {
    uint64_t tag;
    uint64_t id;              /* the gateway's request id */
    int64_t sent_us;
    char req_id[64];
    char uuid[37];
    const char *op;           /* static: "update_server", ... */
} wreq_t;

typedef struct {
    const cn_config_t *cfg;
    cn_backend_args_t *args;
    zsock_t *pipe;
    zsock_t *pull;
    zsock_t *writer;
    zloop_t *loop;
    int sweep_timer;
    bool started;
    cn_moray_t *moray;
    cn_redis_t *redis;
    cn_bextra_t extra;        /* capacity, platforms, boot (cn_backend_extra.c) */
    zhashx_t *wpending;       /* "tag" -> wreq_t */
    uint64_t next_tag;
    int64_t write_timeout_us;
    char component[32];
    /* counters for STATUS */
    uint64_t requests, replies_2xx, replies_4xx, replies_5xx;
    uint64_t cache_hits, cache_misses, store_reads, writes_sent, write_timeouts;
    uint64_t list_rows_cached, list_rows_rendered, list_refetches;
} backend_t;

/* ------------------------------------------------------------------ */
/* Replies                                                              */

cn_backend_reply_t *
cn_backend_reply_new (uint64_t id)
{
    cn_backend_reply_t *r = calloc (1, sizeof *r);
    if (!r)
        abort ();
    r->id = id;
    return r;
}

void
cn_backend_reply_free (cn_backend_reply_t **p)
{
    if (!p || !*p)
        return;
    cn_backend_reply_t *r = *p;
    free (r->body);
    free (r->view);
    free (r);
    *p = NULL;
}

size_t
cn_backend_view_head (char *out, const char *status, int64_t last_heartbeat_ms, size_t view_len)
{
    char *o = out;
    o = stpcpy (o, "{\"status\":\"");
    o = stpcpy (o, status);
    if (last_heartbeat_ms > 0) {
        char iso[32];
        o = stpcpy (o, "\",\"last_heartbeat\":\"");
        o = stpcpy (o, cn_iso8601 (last_heartbeat_ms, iso, sizeof iso));
        *o++ = '"';
    }
    else
        o = stpcpy (o, "\",\"last_heartbeat\":null");
    *o++ = view_len > 2 ? ',' : '}';
    *o = 0;
    return (size_t) (o - out);
}

size_t
cn_backend_splice_view (char *out, const char *status, int64_t last_heartbeat_ms,
                        const char *view, size_t view_len)
{
    size_t n = cn_backend_view_head (out, status, last_heartbeat_ms, view_len);
    if (view_len > 2) {
        memcpy (out + n, view + 1, view_len - 1);
        n += view_len - 1;
    }
    out[n] = 0;
    return n;
}

static void
s_count (backend_t *self, int status)
{
    if (status >= 500)
        self->replies_5xx++;
    else if (status >= 400)
        self->replies_4xx++;
    else
        self->replies_2xx++;
}

/* Hand r to the gateway's loop; the gateway owns it from here. */
static void
s_send (backend_t *self, cn_backend_reply_t *r)
{
    s_count (self, r->status);
    h2o_multithread_send_message (self->args->receiver, &r->super);
}

/* Reply with body (taken over; may be NULL). */
static void
s_reply (backend_t *self, uint64_t id, int status, char *body, size_t len)
{
    s_count (self, cn_svc_reply (self->args->receiver, id, status, body, len));
}

static void
s_reply_apierr (backend_t *self, uint64_t id, const char *req_id, const cn_apierr_t *e)
{
    s_count (self, cn_svc_reply_apierr (self->args->receiver, id, req_id, self->component, e));
}

#define s_reply_error(self, id, req_id, status, code, ...) \
    s_count ((self), cn_svc_reply_error ((self)->args->receiver, (id), (req_id), \
                                         (self)->component, (status), (code), __VA_ARGS__))

/* ------------------------------------------------------------------ */
/* Parameters: query string, then body (restify's queryParser and        */
/* bodyParser with mapParams)                                            */

/* (cn_params_parse, cn_params_strict: lib/cn_params.c) */

/* ------------------------------------------------------------------ */
/* Loading one server: the Redis cache, then the store                  */

/* 0 with *rec (and *version) set; -1 with e set (404, 500). */
static int
s_load (backend_t *self, const char *uuid, json_t **rec, int64_t *version,
        cn_apierr_t *e)
{
    bool cache_ok = false;
    *rec = NULL;
    if (cn_redis_ok (self->redis)) {
        char *json = NULL;
        size_t len = 0;
        int64_t v = 0;
        int rc = cn_redis_cache_get (self->redis, uuid, &json, &len, &v);
        if (rc == 1) {
            json_error_t jerr;
            json_t *r = json_loadb (json, len, 0, &jerr);
            free (json);
            if (r && json_is_object (r)) {
                self->cache_hits++;
                *rec = r;
                *version = v;
                return 0;
            }
            if (r)
                json_decref (r);
            CN_WARN (self->component, "cached server record is not a JSON object",
                     "{s:s,s:s}", "server_uuid", uuid, "error", jerr.text);
        }
        else
        if (rc == 2) {
            self->cache_hits++;
            cn_apierr_set (e, 404, "ResourceNotFound", "Server %s not found", uuid);
            return -1;
        }
        cache_ok = rc == 0;
    }
    self->cache_misses++;
    self->store_reads++;

    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_SERVERS, uuid, &o);
    if (rc == CN_MORAY_NOTFOUND) {
        cn_apierr_set (e, 404, "ResourceNotFound", "Server %s not found", uuid);
        return -1;
    }
    if (rc == CN_MORAY_EIO) {
        cn_apierr_set (e, 500, "InternalError", "the store is unreachable: %s",
                       cn_moray_errmsg (self->moray));
        return -1;
    }
    if (rc != CN_MORAY_OK) {
        cn_apierr_set (e, 500, "InternalError", "store error: %s",
                       cn_moray_errmsg (self->moray));
        return -1;
    }
    json_error_t jerr;
    json_t *r = json_loadb (o.value, o.value_len, 0, &jerr);
    if (!r || !json_is_object (r)) {
        if (r)
            json_decref (r);
        cn_apierr_set (e, 500, "InternalError", "stored server record is not a JSON object");
        cn_mobj_fini (&o);
        return -1;
    }
    /* Refill the shared cache; the version (_id) keeps a late fill from
     * overwriting a newer write (the cache's apply script compares). */
    if (cache_ok) {
        cn_cache_put_t put = { uuid, o.id, o.value, o.value_len };
        if (cn_redis_cache_apply (self->redis, &put, 1) != 0)
            CN_DEBUG (self->component, "cache refill failed", "{s:s}", "server_uuid", uuid);
    }
    *rec = r;
    *version = o.id;
    cn_mobj_fini (&o);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Operations                                                           */

typedef struct {
    uint64_t id;
    const char *req_id;       /* points into the message */
    char req_id_buf[64];
    char uuid[37];
} rctx_t;

/* Common start for /servers/:uuid routes: params, then the uuid.
 * Returns params or NULL when an answer was already sent. */
static json_t *
s_begin_server (backend_t *self, const cn_msg_t *m, rctx_t *c)
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

static void
s_op_ping (backend_t *self, const cn_msg_t *m, rctx_t *c)
{
    /* moray: a real round trip (a point read) bounded by the statement
     * timeout; only "unreachable" counts as offline. */
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_SERVERS, "00000000-0000-0000-0000-000000000000", &o);
    if (rc == CN_MORAY_OK)
        cn_mobj_fini (&o);
    bool moray = rc != CN_MORAY_EIO;

    bool redis = false;
    if (cn_redis_ok (self->redis)) {
        redisReply *r = cn_redis_cmd (self->redis, "PING");
        if (r) {
            redis = r->type == REDIS_REPLY_STATUS && r->str && strcmp (r->str, "PONG") == 0;
            freeReplyObject (r);
        }
    }
    bool amqp = cn_health_get ("amqp");

    json_t *body = json_pack ("{s:b,s:{s:s,s:s,s:s}}",
                              "ready", moray && amqp && redis,
                              "services",
                              "moray", moray ? "online" : "offline",
                              "amqp", amqp ? "online" : "offline",
                              "redis", redis ? "online" : "offline");
    char *text = json_dumps (body, CN_BACKEND_JSON_FLAGS);
    json_decref (body);
    s_reply (self, c->id, 200, text, text ? strlen (text) : 0);
}

static void
s_op_server_get (backend_t *self, const cn_msg_t *m, rctx_t *c)
{
    json_t *params = s_begin_server (self, m, c);
    if (!params)
        return;
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    json_t *rec = NULL;
    int64_t version = 0;
    if (s_load (self, c->uuid, &rec, &version, &e) != 0
        || !cn_params_strict (params, NULL, &e)) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        json_decref (params);
        if (rec)
            json_decref (rec);
        return;
    }
    json_decref (params);

    int64_t now = cn_now_ms ();
    int fresh = self->cfg->sysinfo_freshness_s;
    const cn_liveness_t *live = self->args->live;
    json_t *view = cn_server_render (rec, true, 0, NULL, 0, now, fresh, live);
    cn_status_inputs_t in;
    cn_server_status_inputs (rec, &in);
    int64_t hb = 0;
    const char *st = cn_server_status_of (&in, now, fresh, live, &hb);
    char *text = NULL;
    if (view) {
        /* The body is built as the gateway's near cache builds it (status
         * and last_heartbeat first, then the rest of the view), so both
         * paths answer the same bytes. */
        json_object_del (view, "status");
        json_object_del (view, "last_heartbeat");
        text = json_dumps (view, CN_BACKEND_JSON_FLAGS);
    }
    if (!text || text[0] != '{' || !st) {
        free (text);
        if (view)
            json_decref (view);
        json_decref (rec);
        s_reply_error (self, c->id, c->req_id, 500, "InternalError",
                       "could not render server %s", c->uuid);
        return;
    }
    size_t vlen = strlen (text);
    cn_backend_reply_t *r = cn_backend_reply_new (c->id);
    r->status = 200;
    r->ctype = CT_JSON;
    r->body = malloc (vlen + strlen (st) + 64);
    if (!r->body)
        abort ();
    r->len = cn_backend_splice_view (r->body, st, hb, text, vlen);

    bool fill = false;
    if (cn_msg_bool (m, "fill", &fill) && fill) {
        /* The near cache keeps the view without status and last_heartbeat
         * and recomputes them per response from the same inputs. */
        r->fill = true;
        r->view = text;
        r->view_len = vlen;
        text = NULL;
        r->version = version;
        memcpy (r->uuid, c->uuid, sizeof r->uuid);
        r->status_in = in;
    }
    free (text);
    json_decref (view);
    json_decref (rec);
    s_send (self, r);
}

/* Growing text buffer for the list body. */
typedef struct {
    char *data;
    size_t len, cap;
} sbuf_t;

/* Room for n more bytes and a NUL. */
static void
s_sbuf_reserve (sbuf_t *b, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc (b->data, cap);
        if (!d)
            abort ();
        b->data = d;
        b->cap = cap;
    }
}

static void
s_sbuf_add (sbuf_t *b, const char *s, size_t n)
{
    s_sbuf_reserve (b, n);
    memcpy (b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

/* The list rendered from every record's value (any query). */
typedef struct {
    backend_t *self;
    const cn_server_query_t *q;
    sbuf_t out;
    size_t count;
    int64_t now;
} list_ctx_t;

/* A listed record's value as a JSON object, with its sysinfo only when
 * asked (the sysinfo is most of a record's text and a list view rarely shows
 * it: skipped without building its tree); NULL, logged, when it is not an
 * object. */
static json_t *
s_list_record (backend_t *self, const cn_mobj_t *obj, bool with_sysinfo)
{
    json_error_t jerr;
    json_t *rec = with_sysinfo ? json_loadb (obj->value, obj->value_len, 0, &jerr)
                               : cn_json_load_without (obj->value, obj->value_len, "sysinfo");
    if (!rec || !json_is_object (rec)) {
        if (rec)
            json_decref (rec);
        CN_WARN (self->component, "stored server record is not a JSON object",
                 "{s:s}", "server_uuid", obj->key);
        return NULL;
    }
    return rec;
}

/* One list row rendered whole: the view of rec (cn_server_render) as text;
 * NULL when it cannot be rendered. */
static char *
s_list_row_text (backend_t *self, json_t *rec, unsigned extras, char *const *fields,
                 size_t nfields, int64_t now)
{
    json_t *view = cn_server_render (rec, false, extras, fields, nfields, now,
                                     self->cfg->sysinfo_freshness_s, self->args->live);
    if (!view)
        return NULL;
    char *text = json_dumps (view, CN_BACKEND_JSON_FLAGS);
    json_decref (view);
    return text;
}

static int
s_list_row (const cn_mobj_t *obj, void *arg)
{
    list_ctx_t *lc = arg;
    /* the sysinfo is needed for itself, for capacity, or for a named field */
    bool need_sysinfo = lc->q->nfields > 0
                        || (lc->q->extras & (CN_EXTRA_SYSINFO | CN_EXTRA_CAPACITY));
    json_t *rec = s_list_record (lc->self, obj, need_sysinfo);
    if (!rec)
        return 0;
    char *text = s_list_row_text (lc->self, rec, lc->q->extras, lc->q->fields, lc->q->nfields,
                                  lc->now);
    json_decref (rec);
    if (text) {
        if (lc->count++)
            s_sbuf_add (&lc->out, ",", 1);
        s_sbuf_add (&lc->out, text, strlen (text));
        free (text);
    }
    return 0;
}

/* "[...]" into *out (the caller frees out->data); a cn_moray_rc. */
static int
s_list_render (backend_t *self, const cn_server_query_t *q, int64_t now, sbuf_t *out)
{
    list_ctx_t lc;
    memset (&lc, 0, sizeof lc);
    lc.self = self;
    lc.q = q;
    lc.now = now;
    s_sbuf_add (&lc.out, "[", 1);
    cn_mfind_opts_t opts = { .limit = q->limit, .offset = q->offset, .sort = "_key" };
    self->store_reads++;
    int rc = cn_moray_find (self->moray, CN_BUCKET_SERVERS,
                            q->filter ? q->filter : "(_key=*)", &opts, s_list_row, &lc);
    if (rc != CN_MORAY_OK) {
        free (lc.out.data);
        return rc;
    }
    s_sbuf_add (&lc.out, "]", 1);
    *out = lc.out;
    return rc;
}

/* The default list (no extras, no fields) from the shared list-view cache
 * (lib/cn_listcache.c). First the page's keys, etags and versions only;
 * every row whose view the cache holds for that version is taken from it.
 * When some are not, a second find (the same filter, limit and offset)
 * sends the values of only those: the held ones come back without their
 * value (cn_mfind_opts_t held_*), and the page is that statement's, one
 * snapshot as before. The new views are rendered and put in the cache.
 * Each row's status is spliced in at the end, computed now from the view's
 * status inputs and the status table, as a full render would. */
typedef struct {
    char key[CN_LVIEW_KEY_MAX + 1];  /* "" when too long to cache */
    char etag[9];
    int64_t version;
    cn_lview_t *view;                /* a reference, or NULL */
    char *text;                      /* rendered whole (not cacheable), or NULL */
} lrow_t;

typedef struct {
    backend_t *self;
    int64_t now;
    lrow_t *rows;
    size_t n, cap;
    size_t misses;
    /* the second find: the first's rows (their views move to rows) */
    lrow_t *held;
    size_t nheld, cursor;
    bool broken;
} lcached_t;

static lrow_t *
s_lrow_push (lcached_t *lc)
{
    lc->rows = cn_grow (lc->rows, &lc->cap, lc->n + 1, sizeof *lc->rows, 256);
    lrow_t *r = &lc->rows[lc->n++];
    memset (r, 0, sizeof *r);
    return r;
}

static void
s_lrows_free (lrow_t *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        cn_lview_release (&rows[i].view);
        free (rows[i].text);
    }
    free (rows);
}

/* First find: a row per key, with the cache's view when it has that version. */
static int
s_lc_key (const cn_mobj_t *obj, void *arg)
{
    lcached_t *lc = arg;
    lrow_t *r = s_lrow_push (lc);
    size_t klen = strlen (obj->key);
    if (klen <= CN_LVIEW_KEY_MAX) {
        memcpy (r->key, obj->key, klen + 1);
        memcpy (r->etag, obj->etag, sizeof r->etag);
        r->version = obj->id;
        r->view = cn_listcache_get (lc->self->args->lcache, obj->key, obj->etag, obj->id);
    }
    if (!r->view)
        lc->misses++;
    return 0;
}

/* The first find's row for a value the second left out: the next one in
 * order, normally (both are sorted alike), else anywhere. */
static lrow_t *
s_lc_held (lcached_t *lc, const cn_mobj_t *obj)
{
    for (size_t k = 0; k < lc->nheld; k++) {
        size_t i = (lc->cursor + k) % lc->nheld;
        lrow_t *h = &lc->held[i];
        if (h->view && h->version == obj->id && strcmp (h->key, obj->key) == 0
            && strcmp (h->etag, obj->etag) == 0) {
            lc->cursor = i + 1;
            return h;
        }
    }
    return NULL;
}

/* Second find: held rows come without a value; the others are rendered. */
static int
s_lc_row (const cn_mobj_t *obj, void *arg)
{
    lcached_t *lc = arg;
    backend_t *self = lc->self;
    if (!obj->value) {
        lrow_t *h = s_lc_held (lc, obj);
        if (!h) {
            lc->broken = true;      /* a value left out that we do not hold */
            return 1;
        }
        lrow_t *r = s_lrow_push (lc);
        *r = *h;
        h->view = NULL;
        self->list_rows_cached++;
        return 0;
    }
    json_t *rec = s_list_record (self, obj, false);
    if (!rec)
        return 0;
    lrow_t *r = s_lrow_push (lc);
    self->list_rows_rendered++;
    r->view = cn_lview_new (rec, obj->key, obj->etag, obj->id, CN_BACKEND_JSON_FLAGS);
    if (r->view)
        cn_listcache_put (self->args->lcache, r->view);
    else {
        /* not cacheable (see cn_lview_new): the whole row, as the other path */
        r->text = s_list_row_text (self, rec, 0, NULL, 0, lc->now);
    }
    json_decref (rec);
    return 0;
}

/* As s_list_render, for the default view; 1 when it could not (the caller
 * renders instead), else a cn_moray_rc. */
static int
s_list_cached (backend_t *self, const cn_server_query_t *q, int64_t now, sbuf_t *out)
{
    lcached_t lc;
    memset (&lc, 0, sizeof lc);
    lc.self = self;
    lc.now = now;
    const char *filter = q->filter ? q->filter : "(_key=*)";
    cn_mfind_opts_t opts = { .limit = q->limit, .offset = q->offset, .sort = "_key",
                             .no_values = true };
    self->store_reads++;
    int rc = cn_moray_find (self->moray, CN_BUCKET_SERVERS, filter, &opts, s_lc_key, &lc);
    if (rc == CN_MORAY_OK && lc.misses == 0)
        self->list_rows_cached += lc.n;
    if (rc == CN_MORAY_OK && lc.misses > 0) {
        /* the second find, holding the views found */
        lc.held = lc.rows;
        lc.nheld = lc.n;
        lc.rows = NULL;
        lc.n = lc.cap = 0;
        size_t nh = 0;
        const char **keys = calloc (lc.nheld + 1, sizeof *keys);
        const char **etags = calloc (lc.nheld + 1, sizeof *etags);
        int64_t *ids = calloc (lc.nheld + 1, sizeof *ids);
        if (!keys || !etags || !ids)
            abort ();
        for (size_t i = 0; i < lc.nheld; i++)
            if (lc.held[i].view) {
                keys[nh] = lc.held[i].key;
                etags[nh] = lc.held[i].etag;
                ids[nh++] = lc.held[i].version;
            }
        opts = (cn_mfind_opts_t) { .limit = q->limit, .offset = q->offset, .sort = "_key",
                                   .held_keys = keys, .held_etags = etags, .held_ids = ids,
                                   .nheld = nh };
        self->list_refetches++;
        self->store_reads++;
        rc = cn_moray_find (self->moray, CN_BUCKET_SERVERS, filter, &opts, s_lc_row, &lc);
        free (keys);
        free (etags);
        free (ids);
        s_lrows_free (lc.held, lc.nheld);
        if (rc == CN_MORAY_OK && lc.broken) {
            CN_ERROR (self->component, "the store left out a value not held; "
                      "rendering the list instead", NULL);
            s_lrows_free (lc.rows, lc.n);
            return 1;
        }
    }
    if (rc != CN_MORAY_OK) {
        s_lrows_free (lc.rows, lc.n);
        return rc;
    }
    sbuf_t b = { 0 };
    s_sbuf_add (&b, "[", 1);
    size_t count = 0;
    int fresh = self->cfg->sysinfo_freshness_s;
    for (size_t i = 0; i < lc.n; i++) {
        lrow_t *r = &lc.rows[i];
        if (!r->view && !r->text)
            continue;
        if (count++)
            s_sbuf_add (&b, ",", 1);
        if (r->text) {
            s_sbuf_add (&b, r->text, strlen (r->text));
            continue;
        }
        const char *st = cn_server_status_of (&r->view->in, now, fresh, self->args->live, NULL);
        s_sbuf_reserve (&b, r->view->len + strlen (st) + CN_LVIEW_SPLICE_EXTRA);
        b.len += cn_lview_splice (r->view, st, b.data + b.len);
    }
    s_sbuf_add (&b, "]", 1);
    s_lrows_free (lc.rows, lc.n);
    *out = b;
    return CN_MORAY_OK;
}

static void
s_op_server_list (backend_t *self, const cn_msg_t *m, rctx_t *c)
{
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    json_t *params = cn_params_parse (m, &e);
    cn_server_query_t q;
    memset (&q, 0, sizeof q);
    if (!params || cn_server_list_query (params, &q, &e) != 0) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        if (params)
            json_decref (params);
        cn_server_query_fini (&q);
        return;
    }
    json_decref (params);

    int64_t now = cn_now_ms ();
    sbuf_t out = { 0 };
    int rc = 1;
    if (self->args->lcache && q.extras == 0 && q.nfields == 0)
        rc = s_list_cached (self, &q, now, &out);
    if (rc == 1)
        rc = s_list_render (self, &q, now, &out);
    cn_server_query_fini (&q);
    if (rc == CN_MORAY_EIO) {
        s_reply_error (self, c->id, c->req_id, 500, "InternalError",
                       "the store is unreachable: %s", cn_moray_errmsg (self->moray));
        return;
    }
    if (rc != CN_MORAY_OK) {
        s_reply_error (self, c->id, c->req_id, 500, "InternalError",
                       "store error: %s", cn_moray_errmsg (self->moray));
        return;
    }
    s_reply (self, c->id, 200, out.data, out.len);
}

/* Queue a write for the writer; the answer comes with its "result". */
static void
s_write (backend_t *self, rctx_t *c, const char *op, const char *params_text,
         const char *sysinfo_text, size_t sysinfo_len)
{
    wreq_t *w = calloc (1, sizeof *w);
    if (!w)
        abort ();
    w->tag = ++self->next_tag;
    w->id = c->id;
    w->sent_us = cn_mono_us ();
    w->op = op;
    snprintf (w->req_id, sizeof w->req_id, "%s", c->req_id ? c->req_id : "");
    memcpy (w->uuid, c->uuid, sizeof w->uuid);

    cn_msgw_t mw;
    if (strcmp (op, "update_server") == 0) {
        cn_msgw_init (&mw, op, 3);
        cn_msgw_uint (&mw, "tag", w->tag);
        cn_msgw_str (&mw, "uuid", c->uuid);
        cn_msgw_str (&mw, "params", params_text);
    }
    else
    if (strcmp (op, "sysinfo") == 0) {
        cn_msgw_init (&mw, op, 4);
        cn_msgw_uint (&mw, "tag", w->tag);
        cn_msgw_str (&mw, "uuid", c->uuid);
        cn_msgw_strn (&mw, "sysinfo", sysinfo_text, sysinfo_len);
        cn_msgw_str (&mw, "source", "http");
    }
    else {
        cn_msgw_init (&mw, op, 2);
        cn_msgw_uint (&mw, "tag", w->tag);
        cn_msgw_str (&mw, "uuid", c->uuid);
    }
    zframe_t *f = cn_msgw_frame (&mw);
    if (cn_writer_send (self->writer, self->cfg->writer_shards, c->uuid, &f, true) != 0) {
        free (w);
        s_reply_error (self, c->id, c->req_id, 503, "ServiceUnavailable",
                       "the state writer is not accepting requests");
        return;
    }
    char key[24];
    snprintf (key, sizeof key, "%" PRIu64, w->tag);
    zhashx_insert (self->wpending, key, w);
    self->writes_sent++;
}

static void
s_op_server_update (backend_t *self, const cn_msg_t *m, rctx_t *c)
{
    json_t *params = s_begin_server (self, m, c);
    if (!params)
        return;
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    json_t *rec = NULL;
    int64_t version = 0;
    /* The reference loads the server first (404), then checks parameters
     * (409 unknown, 500 InvalidParameters); check on a scratch copy so
     * nothing reaches the writer that it would refuse anyway. */
    if (s_load (self, c->uuid, &rec, &version, &e) != 0
        || cn_server_update (rec, params, cn_now_ms (), &e) != 0) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        json_decref (params);
        if (rec)
            json_decref (rec);
        return;
    }
    json_decref (rec);
    char *text = json_dumps (params, JSON_COMPACT);
    json_decref (params);
    s_write (self, c, "update_server", text, NULL, 0);
    free (text);
}

static void
s_op_server_delete (backend_t *self, const cn_msg_t *m, rctx_t *c)
{
    json_t *params = s_begin_server (self, m, c);
    if (!params)
        return;
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    json_t *rec = NULL;
    int64_t version = 0;
    if (s_load (self, c->uuid, &rec, &version, &e) != 0
        || !cn_params_strict (params, NULL, &e)) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        json_decref (params);
        if (rec)
            json_decref (rec);
        return;
    }
    json_decref (rec);
    json_decref (params);
    s_write (self, c, "delete_server", NULL, NULL, 0);
}

static void
s_op_server_sysinfo (backend_t *self, const cn_msg_t *m, rctx_t *c)
{
    static const char *const allowed[] = { "sysinfo", NULL };
    json_t *params = s_begin_server (self, m, c);
    if (!params)
        return;
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    if (!cn_params_strict (params, allowed, &e)) {
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        json_decref (params);
        return;
    }
    json_t *si = json_object_get (params, "sysinfo");
    if (!json_is_object (si)) {
        cn_apierr_set (&e, 500, "InvalidParameters", "Request parameters failed validation");
        char msg[96];
        snprintf (msg, sizeof msg, "value is not an object. (was: %s)", cn_js_type (si));
        e.errors = json_pack ("[{s:s,s:s,s:s}]", "field", "sysinfo", "code", "Invalid",
                              "message", msg);
        s_reply_apierr (self, c->id, c->req_id, &e);
        cn_apierr_fini (&e);
        json_decref (params);
        return;
    }
    char *text = json_dumps (si, JSON_COMPACT);
    json_decref (params);
    if (!text) {
        s_reply_error (self, c->id, c->req_id, 500, "InternalError", "out of memory");
        return;
    }
    size_t len = strlen (text);
    json_t *parsed = NULL;
    char err[256] = "";
    if (cn_sysinfo_parse (text, len, c->uuid, &parsed, err, sizeof err) != 0) {
        free (text);
        s_reply_error (self, c->id, c->req_id, 409, "InvalidArgument", "%s", err);
        return;
    }
    json_decref (parsed);
    s_write (self, c, "sysinfo", NULL, text, len);
    free (text);
}

/* ------------------------------------------------------------------ */
/* Sockets                                                              */

static int
s_on_request (zloop_t *loop, zsock_t *sock, void *arg)
{
    backend_t *self = arg;
    zframe_t *f = zframe_recv (sock);
    if (!f)
        return 0;
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_ERROR (self->component, "bad request from the gateway", "{s:s}", "error", err);
        zframe_destroy (&f);
        return 0;
    }
    rctx_t c;
    memset (&c, 0, sizeof c);
    uint64_t id = 0;
    if (!cn_msg_uint (&m, "id", &id)) {
        CN_ERROR (self->component, "gateway request without an id", NULL);
        cn_msg_fini (&m);
        zframe_destroy (&f);
        return 0;
    }
    c.id = id;
    size_t rlen = 0;
    const char *rid = cn_msg_str (&m, "req_id", &rlen);
    if (rid) {
        if (rlen >= sizeof c.req_id_buf)
            rlen = sizeof c.req_id_buf - 1;
        memcpy (c.req_id_buf, rid, rlen);
        c.req_id_buf[rlen] = 0;
        c.req_id = c.req_id_buf;
    }
    self->requests++;

    if (cn_msg_is (&m, "server_get"))
        s_op_server_get (self, &m, &c);
    else
    if (cn_msg_is (&m, "server_list"))
        s_op_server_list (self, &m, &c);
    else
    if (cn_msg_is (&m, "ping"))
        s_op_ping (self, &m, &c);
    else
    if (cn_msg_is (&m, "server_update"))
        s_op_server_update (self, &m, &c);
    else
    if (cn_msg_is (&m, "server_delete"))
        s_op_server_delete (self, &m, &c);
    else
    if (cn_msg_is (&m, "server_sysinfo"))
        s_op_server_sysinfo (self, &m, &c);
    else
    if (cn_backend_extra (&self->extra, &m, c.id, c.req_id))
        ;
    else {
        CN_ERROR (self->component, "unknown gateway request type", "{s:s%}",
                  "type", m.type, m.type_len);
        s_reply_error (self, c.id, c.req_id, 500, "InternalError", "unknown request type");
    }
    cn_msg_fini (&m);
    zframe_destroy (&f);
    return 0;
}

static int
s_on_writer (zloop_t *loop, zsock_t *sock, void *arg)
{
    backend_t *self = arg;
    zframe_t *f = cn_writer_recv (sock, false);
    if (!f)
        return 0;
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_ERROR (self->component, "bad message from the writer", "{s:s}", "error", err);
        zframe_destroy (&f);
        return 0;
    }
    uint64_t tag = 0;
    char key[24];
    wreq_t *w = NULL;
    if (cn_msg_is (&m, "result") && cn_msg_uint (&m, "tag", &tag)) {
        snprintf (key, sizeof key, "%" PRIu64, tag);
        w = zhashx_lookup (self->wpending, key);
    }
    if (!w) {
        /* timed out already, or not ours */
        cn_msg_fini (&m);
        zframe_destroy (&f);
        return 0;
    }
    bool ok = false;
    uint64_t status = 500;
    cn_msg_bool (&m, "ok", &ok);
    cn_msg_uint (&m, "status", &status);
    if (status < 100 || status > 599)
        status = ok ? 200 : 500;
    if (ok)
        s_reply (self, w->id, (int) status, NULL, 0);
    else {
        cn_apierr_t e;
        memset (&e, 0, sizeof e);
        e.status = (int) status;
        char *code = cn_msg_strdup (&m, "code");
        char *msg = cn_msg_strdup (&m, "message");
        e.code = code ? code : "InternalError";
        snprintf (e.message, sizeof e.message, "%s", msg ? msg : "the write failed");
        const msgpack_object *errs = cn_msg_get (&m, "errors");
        if (errs && errs->type == MSGPACK_OBJECT_ARRAY)
            e.errors = cn_msgpack_to_json (errs);
        s_reply_apierr (self, w->id, w->req_id, &e);
        e.code = NULL;
        cn_apierr_fini (&e);
        free (code);
        free (msg);
    }
    CN_DEBUG (self->component, "write answered", "{s:s,s:s,s:s,s:i,s:f}",
              "req_id", w->req_id, "op", w->op, "server_uuid", w->uuid,
              "status", (int) status, "ms", (cn_mono_us () - w->sent_us) / 1000.0);
    zhashx_delete (self->wpending, key);
    cn_msg_fini (&m);
    zframe_destroy (&f);
    return 0;
}

/* Answer writes the writer has not answered in time. */
static int
s_on_sweep (zloop_t *loop, int timer_id, void *arg)
{
    backend_t *self = arg;
    int64_t now = cn_mono_us ();
    zlistx_t *keys = zhashx_keys (self->wpending);
    for (char *key = zlistx_first (keys); key; key = zlistx_next (keys)) {
        wreq_t *w = zhashx_lookup (self->wpending, key);
        if (w && now - w->sent_us > self->write_timeout_us) {
            self->write_timeouts++;
            s_reply_error (self, w->id, w->req_id, 503, "ServiceUnavailable",
                           "the state writer did not answer in time");
            zhashx_delete (self->wpending, key);
        }
    }
    zlistx_destroy (&keys);
    return 0;
}

static void
s_wreq_free (void **item)
{
    free (*item);
    *item = NULL;
}

/* ------------------------------------------------------------------ */
/* Actor                                                                */

static int
s_start (backend_t *self, char *reason, size_t rlen)
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
    if (zsock_connect (self->pull, "%s", CN_BACKEND_ENDPOINT) != 0) {
        snprintf (reason, rlen, "connect %s: %s", CN_BACKEND_ENDPOINT, zmq_strerror (zmq_errno ()));
        return -1;
    }
    self->writer = cn_writer_client (self->cfg->writer_shards, 10000, 0, reason, rlen);
    if (!self->writer)
        return -1;
    self->moray = cn_moray_new (self->cfg->pg_conninfo, self->cfg->pg_timeout_ms);
    self->redis = cn_redis_new (self->cfg->redis_url, self->cfg->redis_timeout_ms,
                                self->component);
    self->extra = (cn_bextra_t) {
        .cfg = self->cfg, .rx = self->args->receiver, .moray = self->moray,
        .redis = self->redis, .component = self->component,
    };
    if (!self->moray || !self->redis) {
        snprintf (reason, rlen, "cannot allocate store or cache clients");
        return -1;
    }
    zloop_reader (self->loop, self->pull, s_on_request, self);
    zloop_reader (self->loop, self->writer, s_on_writer, self);
    self->sweep_timer = zloop_timer (self->loop, 1000, 0, s_on_sweep, self);
    self->started = true;
    return 0;
}

static void
s_status (backend_t *self, zsock_t *dest)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 18);
    cn_msgw_str (&w, "actor", "backend");
    cn_msgw_str (&w, "state", self->started ? "running" : "stopped");
    cn_msgw_int (&w, "index", self->args->index);
    cn_msgw_bool (&w, "pg", self->moray && cn_moray_connected (self->moray));
    cn_msgw_bool (&w, "redis", self->redis && cn_redis_connected (self->redis));
    cn_msgw_uint (&w, "requests", self->requests);
    cn_msgw_uint (&w, "responses_2xx", self->replies_2xx);
    cn_msgw_uint (&w, "responses_4xx", self->replies_4xx);
    cn_msgw_uint (&w, "responses_5xx", self->replies_5xx);
    cn_msgw_uint (&w, "cache_hits", self->cache_hits);
    cn_msgw_uint (&w, "cache_misses", self->cache_misses);
    cn_msgw_uint (&w, "store_reads", self->store_reads);
    cn_msgw_uint (&w, "writes_sent", self->writes_sent);
    cn_msgw_uint (&w, "writes_in_flight", zhashx_size (self->wpending));
    cn_msgw_uint (&w, "write_timeouts", self->write_timeouts);
    cn_msgw_uint (&w, "list_rows_cached", self->list_rows_cached);
    cn_msgw_uint (&w, "list_rows_rendered", self->list_rows_rendered);
    cn_msgw_uint (&w, "list_refetches", self->list_refetches);
    zframe_t *f = cn_msgw_frame (&w);
    zframe_send (&f, dest, 0);
}

static int
s_on_pipe (zloop_t *loop, zsock_t *pipe, void *arg)
{
    backend_t *self = arg;
    zmsg_t *msg = zmsg_recv (pipe);
    if (!msg)
        return -1;
    char *cmd = zmsg_popstr (msg);
    int rc = 0;
    if (!cmd)
        rc = 0;
    else
    if (streq (cmd, "$TERM"))
        rc = -1;
    else
    if (streq (cmd, "START")) {
        char reason[256] = "";
        if (s_start (self, reason, sizeof reason) == 0)
            zstr_send (pipe, "OK");
        else {
            CN_ERROR (self->component, "backend start failed", "{s:s}", "reason", reason);
            zstr_sendx (pipe, "ERROR", reason, NULL);
        }
    }
    else
    if (streq (cmd, "STATUS"))
        s_status (self, pipe);
    else
        CN_WARN (self->component, "unknown pipe command", "{s:s}", "command", cmd);
    free (cmd);
    zmsg_destroy (&msg);
    return rc;
}

void
cn_backend_actor (zsock_t *pipe, void *args)
{
    backend_t *self = calloc (1, sizeof *self);
    if (!self)
        abort ();
    self->args = args;
    self->cfg = self->args->cfg;
    self->pipe = pipe;
    snprintf (self->component, sizeof self->component, "%s", COMPONENT);
    char tname[16];
    snprintf (tname, sizeof tname, "backend-%d", self->args->index);
    cn_thread_name (tname);
    self->loop = zloop_new ();
    self->wpending = zhashx_new ();
    zhashx_set_destructor (self->wpending, s_wreq_free);
    self->write_timeout_us = ((int64_t) self->cfg->pg_timeout_ms * 2 + 2000) * 1000;
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);

    zloop_start (self->loop);

    /* Writes still waiting: their callers get an answer, not silence. */
    zlistx_t *keys = zhashx_keys (self->wpending);
    for (char *key = zlistx_first (keys); key; key = zlistx_next (keys)) {
        wreq_t *w = zhashx_lookup (self->wpending, key);
        if (w)
            s_reply_error (self, w->id, w->req_id, 503, "ServiceUnavailable",
                           "the service is shutting down");
    }
    zlistx_destroy (&keys);
    zhashx_destroy (&self->wpending);
    zloop_destroy (&self->loop);
    zsock_destroy (&self->pull);
    zsock_destroy (&self->writer);
    cn_moray_destroy (&self->moray);
    cn_redis_destroy (&self->redis);
    free (self);
}
