/*
 * cn_backend_extra: capacity, platforms and boot parameters
 * (include/cn_backend_extra.h).
 *
 * Theory of operation
 *
 * These routes run on a backend thread, which may block on the store for
 * at most its timeout. Reads go to PostgreSQL directly (they scan or need
 * fields the cache may not be fresh for: boot parameters are read right
 * after they are written by any instance).
 *
 * Order of checks, as the reference: body (400), server uuid (409), the
 * server exists (404), parameter rules (500 InvalidParameters), boot
 * modules (409), the platform exists (500), then the write.
 *
 * Writes (PUT/POST /boot/...) lock the row, apply the change to the stored
 * object, write it with its etag as condition and commit; a conflict (only
 * possible when the default object is created by two instances at once) is
 * retried. A server record written here goes through to the Redis cache
 * with its new version (_id), so the cache never moves backwards and every
 * instance's near cache hears of the change (cnapi:invalidate).
 */
#include "cn_backend_extra.h"

#include <string.h>

#include "cn_boot.h"
#include "cn_filter.h"
#include "cn_log.h"
#include "cn_params.h"
#include "cn_server.h"
#include "cn_svc.h"
#include "cn_util.h"

#define WRITE_ATTEMPTS 5

typedef struct {
    cn_bextra_t *x;
    uint64_t id;
    const char *req_id;
} rq_t;

static void
s_fail (rq_t *q, cn_apierr_t *e)
{
    cn_svc_reply_apierr (q->x->rx, q->id, q->req_id, q->x->component, e);
    cn_apierr_fini (e);
}

static void
s_store_error (cn_apierr_t *e, cn_bextra_t *x, int rc)
{
    cn_apierr_set (e, 500, "InternalError", rc == CN_MORAY_EIO
                   ? "the store is unreachable: %s" : "store error: %s",
                   cn_moray_errmsg (x->moray));
}

/* ------------------------------------------------------------------ */
/* Scanning servers                                                     */

typedef struct {
    int (*fn) (const json_t *rec, const char *key, void *arg);
    void *arg;
    const char *component;
} scan_t;

static int
s_scan_row (const cn_mobj_t *obj, void *arg)
{
    scan_t *s = arg;
    json_error_t jerr;
    json_t *rec = json_loadb (obj->value, obj->value_len, 0, &jerr);
    if (!json_is_object (rec)) {
        CN_WARN (s->component, "stored server record is not a JSON object", "{s:s}",
                 "server_uuid", obj->key);
        if (rec)
            json_decref (rec);
        return 0;
    }
    int rc = s->fn (rec, obj->key, s->arg);
    json_decref (rec);
    return rc;
}

static int
s_scan (cn_bextra_t *x, const char *filter, int (*fn) (const json_t *, const char *, void *),
        void *arg)
{
    scan_t s = { fn, arg, x->component };
    cn_mfind_opts_t opts = { .sort = "_key" };
    return cn_moray_find (x->moray, CN_BUCKET_SERVERS, filter, &opts, s_scan_row, &s);
}

static int
s_platform_row (const json_t *rec, const char *key, void *arg)
{
    cn_platforms_add (arg, rec);
    return 0;
}

/* Every platform the servers report: 0 with *set (new reference). */
static int
s_platform_set (cn_bextra_t *x, json_t **set, cn_apierr_t *e)
{
    *set = json_object ();
    int rc = s_scan (x, "(_key=*)", s_platform_row, *set);
    if (rc != CN_MORAY_OK) {
        json_decref (*set);
        *set = NULL;
        s_store_error (e, x, rc);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* POST /capacity                                                       */

typedef struct {
    json_t *caps;
    int64_t now;
    int fresh;
} cap_t;

static int
s_capacity_row (const json_t *rec, const char *key, void *arg)
{
    cap_t *c = arg;
    static char *fields[] = { "unreserved_cpu", "unreserved_ram", "unreserved_disk" };
    json_t *view = cn_server_render (rec, false, CN_EXTRA_CAPACITY, fields, 3, c->now,
                                     c->fresh, NULL);
    if (!view)
        return 0;
    json_t *one = json_object ();
    static const char *const names[] = { "cpu", "ram", "disk" };
    for (int i = 0; i < 3; i++) {
        json_t *v = json_object_get (view, fields[i]);
        if (json_is_number (v))
            json_object_set (one, names[i], v);
    }
    json_decref (view);
    json_object_set_new (c->caps, key, one);
    return 0;
}

static void
s_capacity (rq_t *q, const cn_msg_t *m)
{
    cn_apierr_t e = { 0 };
    json_t *params = cn_params_parse (m, &e);
    if (!params) {
        s_fail (q, &e);
        return;
    }
    json_t *servers = json_object_get (params, "servers");
    const char *bad = NULL;
    if (servers && !json_is_null (servers) && !json_is_array (servers))
        bad = "value was not an array";
    size_t i;
    json_t *v;
    if (!bad && json_is_array (servers))
        json_array_foreach (servers, i, v)
            if (!json_is_string (v) || !cn_uuid_valid (json_string_value (v)))
                bad = "invalid server UUID";
    if (bad) {
        cn_apierr_set (&e, 500, "InvalidParameters", "Request parameters failed validation");
        e.errors = json_pack ("[{s:s,s:s,s:s}]", "field", "servers", "code", "Invalid",
                              "message", bad);
        json_decref (params);
        s_fail (q, &e);
        return;
    }
    /* the filter: every server, or (|(uuid=a)(uuid=b)...) */
    size_t n = json_is_array (servers) ? json_array_size (servers) : 0;
    char *filter = malloc (n * 48 + 16);
    if (!filter)
        abort ();
    if (n == 0)
        strcpy (filter, "(_key=*)");
    else {
        char *o = filter + sprintf (filter, "(|");
        json_array_foreach (servers, i, v) {
            char u[37];
            cn_uuid_normalize (json_string_value (v), u);
            o += sprintf (o, "(uuid=%s)", u);
        }
        strcpy (o, ")");
    }
    json_decref (params);
    cap_t c = { json_object (), cn_now_ms (), q->x->cfg->sysinfo_freshness_s };
    int rc = s_scan (q->x, filter, s_capacity_row, &c);
    free (filter);
    if (rc != CN_MORAY_OK) {
        json_decref (c.caps);
        s_store_error (&e, q->x, rc);
        s_fail (q, &e);
        return;
    }
    cn_svc_reply_json (q->x->rx, q->id, 200,
                       json_pack ("{s:o,s:{}}", "capacities", c.caps, "errors"));
}

/* ------------------------------------------------------------------ */
/* GET /platforms                                                       */

static void
s_platforms (rq_t *q, const cn_msg_t *m)
{
    cn_apierr_t e = { 0 };
    json_t *params = cn_params_parse (m, &e);
    json_t *set = NULL;
    if (!params || s_platform_set (q->x, &set, &e) != 0) {
        if (params)
            json_decref (params);
        s_fail (q, &e);
        return;
    }
    const char *os = json_string_value (json_object_get (params, "os"));
    json_t *view = cn_platforms_view (set, os && *os ? os : NULL);
    json_decref (set);
    json_decref (params);
    cn_svc_reply_json (q->x->rx, q->id, 200, view);
}

/* ------------------------------------------------------------------ */
/* Boot parameters                                                      */

/* The path's :server_uuid: "default" (*is_default) or a server uuid into
 * uuid. false with e set (409) otherwise. */
static bool
s_boot_target (const cn_msg_t *m, char uuid[37], bool *is_default, cn_apierr_t *e)
{
    size_t len = 0;
    const char *raw = cn_msg_str (m, "uuid", &len);
    char tmp[64] = "";
    if (raw && len < sizeof tmp) {
        memcpy (tmp, raw, len);
        tmp[len] = 0;
    }
    *is_default = strcmp (tmp, "default") == 0;
    if (*is_default) {
        strcpy (uuid, "default");
        return true;
    }
    if (!cn_uuid_normalize (tmp, uuid)) {
        cn_apierr_set (e, 409, "InvalidArgument", "Invalid server UUID: %s", tmp);
        return false;
    }
    return true;
}

static int
s_boot_bucket (cn_bextra_t *x, cn_apierr_t *e)
{
    if (x->boot_bucket_ready)
        return 0;
    int rc = cn_moray_put_bucket (x->moray, CN_BUCKET_BOOT, cn_boot_index, cn_boot_nindex);
    if (rc != CN_MORAY_OK) {
        s_store_error (e, x, rc);
        return -1;
    }
    x->boot_bucket_ready = true;
    return 0;
}

/* Read the object a boot route works on: the server record (404 when
 * absent) or the default (an empty object when never written). */
static json_t *
s_boot_read (cn_bextra_t *x, const char *uuid, bool is_default, cn_apierr_t *e)
{
    if (is_default && s_boot_bucket (x, e) != 0)
        return NULL;
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (x->moray, is_default ? CN_BUCKET_BOOT : CN_BUCKET_SERVERS,
                           is_default ? CN_BOOT_DEFAULT_KEY : uuid, &o);
    if (rc == CN_MORAY_NOTFOUND) {
        if (is_default)
            return json_object ();
        cn_apierr_set (e, 404, "ResourceNotFound", "Server %s not found", uuid);
        return NULL;
    }
    if (rc != CN_MORAY_OK) {
        s_store_error (e, x, rc);
        return NULL;
    }
    json_error_t jerr;
    json_t *obj = json_loadb (o.value, o.value_len, 0, &jerr);
    cn_mobj_fini (&o);
    if (!json_is_object (obj)) {
        if (obj)
            json_decref (obj);
        cn_apierr_set (e, 500, "InternalError", "the stored %s is not a JSON object",
                       is_default ? "default boot parameters object" : "server record");
        return NULL;
    }
    return obj;
}

static void
s_boot_get (rq_t *q, const cn_msg_t *m)
{
    cn_apierr_t e = { 0 };
    char uuid[37];
    bool is_default = false;
    json_t *params = cn_params_parse (m, &e);
    json_t *obj = NULL;
    if (!params || !s_boot_target (m, uuid, &is_default, &e)
        || !(obj = s_boot_read (q->x, uuid, is_default, &e))) {
        if (params)
            json_decref (params);
        s_fail (q, &e);
        return;
    }
    json_decref (params);
    json_t *body = cn_boot_render (obj, is_default, q->x->cfg->amqp_url);
    json_decref (obj);
    cn_svc_reply_json (q->x->rx, q->id, 200, body);
}

/* One locked read-modify-write of the object; 0, or -1 with e set. */
static int
s_boot_write (cn_bextra_t *x, const char *uuid, bool is_default, const json_t *params,
              bool put, const char *latest, cn_apierr_t *e)
{
    const char *bucket = is_default ? CN_BUCKET_BOOT : CN_BUCKET_SERVERS;
    const char *key = is_default ? CN_BOOT_DEFAULT_KEY : uuid;
    for (int attempt = 0; attempt < WRITE_ATTEMPTS; attempt++) {
        cn_mobj_t o;
        memset (&o, 0, sizeof o);
        const char *keys[] = { key };
        int rc = cn_moray_begin (x->moray);
        if (rc == CN_MORAY_OK)
            rc = cn_moray_get_many_locked (x->moray, bucket, keys, 1, &o);
        if (rc != CN_MORAY_OK) {
            cn_moray_rollback (x->moray);
            s_store_error (e, x, rc);
            return -1;
        }
        json_t *obj = NULL;
        char etag[9] = CN_MORAY_ETAG_NULL;
        bool found = o.key != NULL;
        if (found) {
            json_error_t jerr;
            obj = json_loadb (o.value, o.value_len, 0, &jerr);
            memcpy (etag, o.etag, sizeof etag);
        }
        else if (is_default)
            obj = json_object ();
        cn_mobj_fini (&o);
        if (!json_is_object (obj)) {
            cn_moray_rollback (x->moray);
            if (obj)
                json_decref (obj);
            if (!found && !is_default)
                cn_apierr_set (e, 404, "ResourceNotFound", "Server %s not found", uuid);
            else
                cn_apierr_set (e, 500, "InternalError", "the stored object is not JSON");
            return -1;
        }
        cn_boot_apply (obj, params, put, latest, is_default);
        char *text = json_dumps (obj, JSON_COMPACT);
        json_decref (obj);
        if (!text)
            abort ();
        cn_mop_t op = { CN_MOP_PUT, bucket, key, text, etag, "", 0 };
        rc = cn_moray_batch (x->moray, &op, 1, NULL);
        if (rc == CN_MORAY_OK)
            rc = cn_moray_commit (x->moray);
        else
            cn_moray_rollback (x->moray);
        if (rc == CN_MORAY_CONFLICT) {
            free (text);
            continue;
        }
        if (rc != CN_MORAY_OK) {
            free (text);
            s_store_error (e, x, rc);
            return -1;
        }
        x->boot_writes++;
        if (!is_default && cn_redis_ok (x->redis)) {
            /* write-through; on failure drop the entry so nobody reads
             * the old record from the cache */
            cn_cache_put_t cp = { uuid, op.out_id, text, strlen (text), false };
            if (cn_redis_cache_apply (x->redis, &cp, 1) != 0) {
                const char *u[] = { uuid };
                if (cn_redis_cache_drop (x->redis, u, 1, false) != 0)
                    CN_WARN (x->component, "cache not updated after a boot write",
                             "{s:s}", "server_uuid", uuid);
            }
        }
        free (text);
        return 0;
    }
    cn_apierr_set (e, 500, "InternalError", "the write kept conflicting, try again");
    return -1;
}

static void
s_boot_put_post (rq_t *q, const cn_msg_t *m, bool put)
{
    cn_apierr_t e = { 0 };
    char uuid[37];
    bool is_default = false;
    json_t *params = cn_params_parse (m, &e);
    json_t *obj = NULL, *set = NULL;
    if (!params || !s_boot_target (m, uuid, &is_default, &e))
        goto fail;
    /* the server must exist before anything else is looked at */
    if (!is_default) {
        if (!(obj = s_boot_read (q->x, uuid, false, &e)))
            goto fail;
        json_decref (obj);
        obj = NULL;
    }
    if (cn_boot_check (params, &e) != 0)
        goto fail;
    const char *platform = cn_boot_platform_param (params);
    const char *latest = NULL;
    /* the platform list is needed to check a named platform, and for PUT on
     * a server, to pick the latest when none is named */
    if (platform || (put && !is_default)) {
        if (s_platform_set (q->x, &set, &e) != 0)
            goto fail;
        if (platform && !json_object_get (set, platform)) {
            cn_apierr_set (&e, 500, "InternalError", "Platform '%s' does not exist", platform);
            goto fail;
        }
        latest = cn_platforms_latest (set, NULL);
    }
    if (s_boot_write (q->x, uuid, is_default, params, put, is_default ? NULL : latest, &e) != 0)
        goto fail;
    if (set)
        json_decref (set);
    json_decref (params);
    CN_INFO (q->x->component, "boot parameters written", "{s:s?,s:s,s:s}", "req_id",
             q->req_id, "server_uuid", uuid, "mode", put ? "replace" : "merge");
    cn_svc_reply (q->x->rx, q->id, 204, NULL, 0);
    return;
fail:
    if (set)
        json_decref (set);
    if (params)
        json_decref (params);
    s_fail (q, &e);
}

/* ------------------------------------------------------------------ */

bool
cn_backend_extra (cn_bextra_t *x, const cn_msg_t *m, uint64_t id, const char *req_id)
{
    rq_t q = { x, id, req_id };
    if (cn_msg_is (m, "capacity"))
        s_capacity (&q, m);
    else if (cn_msg_is (m, "platforms"))
        s_platforms (&q, m);
    else if (cn_msg_is (m, "boot_get"))
        s_boot_get (&q, m);
    else if (cn_msg_is (m, "boot_set"))
        s_boot_put_post (&q, m, true);
    else if (cn_msg_is (m, "boot_update"))
        s_boot_put_post (&q, m, false);
    else
        return false;
    x->requests++;
    return true;
}
