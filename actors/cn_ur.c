/*
 * cn_ur: the "ur" service (include/cn_ur.h, docs/ur.md, proto/ur.md).
 *
 * Theory of operation
 *
 * One thread, one zmq_poll over: the pipe (main), the control REP socket
 * (admin), the PULL of gateway requests (CN_UR_ENDPOINT) and the AMQP socket
 * as a raw fd. Nothing here waits for an execute to finish: a request is
 * checked, published, remembered in a bounded table keyed by its Ur request
 * id, and answered later, when its reply arrives, when its deadline passes,
 * or when the broker connection is lost.
 *
 * Replies reach the instance that asked. Each instance owns one exclusive,
 * auto-delete queue (cnapi-ur.<instance>.<random>), consumed without acks.
 * Per request it binds that queue on amq.topic to exactly
 * ur.execute-reply.<server_uuid>.<req_id> (queue.bind with nowait, so no
 * round trip), then publishes ur.execute.<server_uuid>.<req_id>. RabbitMQ
 * handles one channel's commands in order, so the binding exists before the
 * request is routed and no reply can be missed. When the request is done
 * (answered, timed out) the binding is removed (queue.unbind; its unbind-ok
 * is read and ignored). This is the reference's own key scheme (it bound a
 * queue per request), so any Ur agent answers correctly, and no instance
 * ever sees another's replies.
 *
 * The request is published with mandatory set: when no agent queue is bound
 * for that server the broker returns it (basic.return) and the caller gets
 * 503 at once rather than waiting for the timeout.
 *
 * Deadlines. The agent kills the script after `timeout` seconds and replies
 * with timed_out (answered 504 ExecuteTimeout). If nothing arrives within
 * timeout + S_GRACE_S, the caller gets 504 GatewayTimeout. Deadlines are
 * checked every S_TICK_MS.
 *
 * Blocking. Connecting (TCP, login, declare, consume) is done inline and
 * bounded by S_TIMEOUT_MS per step; while the broker is down requests are
 * answered 503 at once. The existence check of the server (404) reads the
 * status table first and the store only when the table does not know the
 * server (one point read bounded by postgres.timeout_ms). Reading a delivery
 * uses amqp_consume_message with a zero timeout: it waits only for the rest
 * of a message whose first frame is already here (bounded by the heartbeat).
 */
#include "cn_ur.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include <amqp.h>

#include "cn_actor.h"
#include "cn_amqp.h"
#include "cn_backend.h"
#include "cn_liveness.h"
#include "cn_log.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_params.h"
#include "cn_server.h"
#include "cn_svc.h"
#include "cn_urproto.h"
#include "cn_util.h"

#define COMPONENT "ur"
#define S_TIMEOUT_MS 2000         /* connect, login, each setup RPC */
#define S_HEARTBEAT_S 10
#define S_TICK_MS 200             /* deadlines and heartbeats */
#define S_GRACE_S 5               /* wait this much past the agent's timeout */
#define S_BACKOFF_BASE_MS 100
#define S_BACKOFF_CAP_MS 5000
#define S_STABLE_MS 10000
#define S_MAX_PENDING 10000
#define S_FRAME_BUDGET 256
#define S_MAX_REPLY (8 * 1024 * 1024)

typedef struct {
    uint64_t id;              /* the gateway's request id */
    char req_id[64];          /* x-request-id, for logs */
    char ur_id[CN_UR_REQID_MAX];
    char uuid[37];
    bool json;
    double timeout_s;
    int64_t start_us;
    int64_t deadline_us;
} s_exec_t;

typedef struct {
    const cn_config_t *cfg;
    cn_backend_args_t *args;
    zsock_t *pipe;
    zsock_t *ctl;
    zsock_t *pull;
    bool started;
    bool terminated;
    cn_moray_t *moray;

    cn_amqp_url_t url;
    amqp_connection_state_t conn;
    int fd;
    char queue[200];
    char conn_name[160];
    int attempt;
    int64_t retry_at_us;
    int64_t connected_us;
    int64_t next_tick_us;
    bool ever_connected;
    char last_error[200];

    zhashx_t *pending;        /* ur_id -> s_exec_t */

    /* counters for STATUS */
    uint64_t requests, published, replies, ok, exit_nonzero, agent_timeouts, timeouts,
             returned, broker_failed, rejected, late_replies, reconnects;
    uint64_t replies_2xx, replies_4xx, replies_5xx;
} self_t;

/* ---- answers ---- */

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

/* o taken over */
static void
s_reply_json (self_t *self, uint64_t id, int status, json_t *o)
{
    s_count (self, cn_svc_reply_json (self->args->receiver, id, status, o));
}

static void
s_reply_apierr (self_t *self, uint64_t id, const char *req_id, const cn_apierr_t *e)
{
    s_count (self, cn_svc_reply_apierr (self->args->receiver, id, req_id, COMPONENT, e));
}

#define s_reply_error(self, id, req_id, status, code, ...) \
    s_count ((self), cn_svc_reply_error ((self)->args->receiver, (id), (req_id), COMPONENT, \
                                         (status), (code), __VA_ARGS__))

/* ---- the broker ---- */

static void
s_set_error (self_t *self, const char *err)
{
    snprintf (self->last_error, sizeof self->last_error, "%s", err ? err : "");
}

static void
s_unbind (self_t *self, const s_exec_t *x)
{
    if (!self->conn)
        return;
    char key[256];
    snprintf (key, sizeof key, CN_UR_REPLY_PREFIX "%s.%s", x->uuid, x->ur_id);
    amqp_queue_unbind_t m = {
        .queue = amqp_cstring_bytes (self->queue),
        .exchange = amqp_cstring_bytes (CN_AMQP_EXCHANGE),
        .routing_key = amqp_cstring_bytes (key),
        .arguments = amqp_empty_table,
    };
    /* unbind-ok comes back later and is ignored; a failure closes the
     * channel, which s_amqp_service notices */
    amqp_send_method (self->conn, CN_AMQP_CHANNEL, AMQP_QUEUE_UNBIND_METHOD, &m);
}

/* Fail every pending execute (the connection that would carry their replies
 * is gone: the exclusive queue went with it). */
static void
s_fail_all (self_t *self, int status, const char *code, const char *why)
{
    zlistx_t *keys = zhashx_keys (self->pending);
    for (char *k = zlistx_first (keys); k; k = zlistx_next (keys)) {
        s_exec_t *x = zhashx_lookup (self->pending, k);
        if (!x)
            continue;
        self->broker_failed++;
        s_reply_error (self, x->id, x->req_id, status, code, "%s (server %s)", why, x->uuid);
    }
    zlistx_destroy (&keys);
    zhashx_purge (self->pending);
}

static void
s_drop (self_t *self, const char *reason)
{
    s_set_error (self, reason);
    CN_WARN (COMPONENT, "broker connection lost", "{s:s,s:I}", "reason", reason,
             "pending", (json_int_t) zhashx_size (self->pending));
    cn_amqp_destroy (&self->conn);
    self->fd = -1;
    s_fail_all (self, 503, "ServiceUnavailable",
                "the message broker connection was lost before the reply came");
    if ((cn_mono_us () - self->connected_us) / 1000 >= S_STABLE_MS)
        self->attempt = 0;
    int ms = cn_backoff_ms (self->attempt, S_BACKOFF_BASE_MS, S_BACKOFF_CAP_MS);
    if (self->attempt < 30)
        self->attempt++;
    self->retry_at_us = cn_mono_us () + 1000LL * ms;
}

static void
s_connect (self_t *self)
{
    char err[256] = "";
    amqp_connection_state_t c = cn_amqp_connect (&self->url, S_TIMEOUT_MS, S_HEARTBEAT_S,
                                                 self->conn_name, err, sizeof err);
    if (c) {
        amqp_queue_declare_ok_t *ok = amqp_queue_declare (
            c, CN_AMQP_CHANNEL, amqp_cstring_bytes (self->queue), 0, 0, 1, 1, amqp_empty_table);
        amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
        if (!ok || r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "queue.declare", err, sizeof err);
            cn_amqp_destroy (&c);
        }
    }
    if (c) {
        amqp_basic_consume (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (self->queue),
                            amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
        amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "basic.consume", err, sizeof err);
            cn_amqp_destroy (&c);
        }
    }
    if (!c) {
        s_set_error (self, err);
        int ms = cn_backoff_ms (self->attempt, S_BACKOFF_BASE_MS, S_BACKOFF_CAP_MS);
        if (self->attempt < 30)
            self->attempt++;
        self->retry_at_us = cn_mono_us () + 1000LL * ms;
        CN_WARN (COMPONENT, "broker connection failed", "{s:s,s:i,s:i}", "error", err,
                 "attempt", self->attempt, "retry_ms", ms);
        return;
    }
    self->conn = c;
    self->fd = amqp_get_sockfd (c);
    self->connected_us = cn_mono_us ();
    if (self->ever_connected)
        self->reconnects++;
    self->ever_connected = true;
    CN_INFO (COMPONENT, "broker connected", "{s:s,s:i,s:s}", "host", self->url.host,
             "port", self->url.port, "queue", self->queue);
}

/* ---- replies from agents ---- */

/* A new reference: v, or "" when absent. */
static json_t *
s_text (json_t *v)
{
    return v ? json_incref (v) : json_string ("");
}

static void
s_on_reply (self_t *self, const amqp_envelope_t *env)
{
    char uuid[37], ur_id[CN_UR_REQID_MAX];
    if (!cn_ur_rk_parse (env->routing_key.bytes, env->routing_key.len, CN_UR_REPLY_PREFIX,
                         uuid, ur_id)) {
        self->rejected++;
        CN_WARN (COMPONENT, "reply with a bad routing key dropped", "{s:s%}", "routing_key",
                 (const char *) env->routing_key.bytes, env->routing_key.len);
        return;
    }
    s_exec_t *x = zhashx_lookup (self->pending, ur_id);
    if (!x || strcmp (x->uuid, uuid) != 0) {
        self->late_replies++;
        CN_DEBUG (COMPONENT, "reply for no pending execute", "{s:s,s:s}", "server_uuid", uuid,
                  "ur_req_id", ur_id);
        return;
    }
    self->replies++;
    json_error_t jerr;
    json_t *b = env->message.body.len <= S_MAX_REPLY
        ? json_loadb (env->message.body.bytes, env->message.body.len, 0, &jerr) : NULL;
    json_t *st = b ? json_object_get (b, "exit_status") : NULL;
    json_t *out = b ? json_object_get (b, "stdout") : NULL;
    json_t *err = b ? json_object_get (b, "stderr") : NULL;
    if (!b || !json_is_object (b) || !json_is_integer (st)
        || (out && !json_is_string (out)) || (err && !json_is_string (err))) {
        self->rejected++;
        s_reply_error (self, x->id, x->req_id, 502, "BadGateway",
                       "the Ur reply from server %s is not {exit_status, stdout, stderr}",
                       x->uuid);
        json_decref (b);
        s_unbind (self, x);
        zhashx_delete (self->pending, ur_id);
        return;
    }
    json_int_t code = json_integer_value (st);
    const char *so = out ? json_string_value (out) : "";
    size_t so_len = out ? json_string_length (out) : 0;
    bool truncated = json_is_true (json_object_get (b, "truncated"));
    bool timed_out = json_is_true (json_object_get (b, "timed_out"));
    json_t *o = NULL;
    int status;
    if (timed_out) {
        self->agent_timeouts++;
        status = 504;
        char msg[200];
        snprintf (msg, sizeof msg, "the script did not finish within %g seconds on server %s "
                  "and was killed", x->timeout_s, x->uuid);
        o = json_pack ("{s:s,s:s,s:n,s:o,s:o,s:f}", "code", "ExecuteTimeout", "message", msg,
                       "exitCode", "stdout", s_text (out), "stderr", s_text (err),
                       "timeout", x->timeout_s);
    }
    else
    if (x->json) {
        status = 200;
        o = json_pack ("{s:I,s:o,s:o}", "exitCode", code, "stdout", s_text (out),
                       "stderr", s_text (err));
    }
    else
    if (code == 0) {
        /* the reference answers res.send (stdout.trim ()): restify sends a
         * string as a JSON string, and sdc-clients parses JSON */
        status = 200;
        size_t a = 0, e = so_len;
        while (a < e && strchr (" \t\n\r\v\f", so[a]))
            a++;
        while (e > a && strchr (" \t\n\r\v\f", so[e - 1]))
            e--;
        o = json_stringn (so + a, e - a);
        if (!o)
            o = json_string ("");
    }
    else {
        status = 500;
        char msg[160];
        snprintf (msg, sizeof msg, "the script exited with status %" JSON_INTEGER_FORMAT, code);
        o = json_pack ("{s:s,s:s,s:I,s:o,s:o}", "code", "InternalError", "message", msg,
                       "exitCode", code, "stderr", s_text (err), "stdout", s_text (out));
    }
    if (o) {
        if (truncated)
            json_object_set_new (o, "truncated", json_true ());
        s_reply_json (self, x->id, status, o);
    }
    else
    if (status != 200 || x->json)
        abort ();
    if (code == 0 && !timed_out)
        self->ok++;
    else if (!timed_out)
        self->exit_nonzero++;
    CN_INFO (COMPONENT, "execute answered", "{s:s,s:s,s:I,s:i,s:b,s:f}", "req_id", x->req_id,
             "server_uuid", x->uuid, "exit_status", (json_int_t) code, "status", status,
             "timed_out", timed_out, "ms", (cn_mono_us () - x->start_us) / 1000.0);
    json_decref (b);
    s_unbind (self, x);
    zhashx_delete (self->pending, ur_id);
}

/* A request the broker could not route: no agent queue is bound for it. */
static void
s_on_return (self_t *self, const amqp_basic_return_t *m)
{
    char uuid[37], ur_id[CN_UR_REQID_MAX];
    if (!cn_ur_rk_parse (m->routing_key.bytes, m->routing_key.len, CN_UR_EXECUTE_PREFIX,
                         uuid, ur_id))
        return;
    s_exec_t *x = zhashx_lookup (self->pending, ur_id);
    if (!x)
        return;
    self->returned++;
    s_reply_error (self, x->id, x->req_id, 503, "ServiceUnavailable",
                   "no Ur agent is listening for server %s", x->uuid);
    s_unbind (self, x);
    zhashx_delete (self->pending, ur_id);
}

static void
s_amqp_service (self_t *self)
{
    struct timeval zero = { 0, 0 };
    for (int i = 0; i < S_FRAME_BUDGET && self->conn; i++) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers (self->conn);
        amqp_rpc_reply_t r = amqp_consume_message (self->conn, &env, &zero, 0);
        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            s_on_reply (self, &env);
            amqp_destroy_envelope (&env);
            continue;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
            && r.library_error == AMQP_STATUS_TIMEOUT)
            return;
        if (r.reply_type != AMQP_RESPONSE_LIBRARY_EXCEPTION
            || r.library_error != AMQP_STATUS_UNEXPECTED_STATE) {
            char why[200];
            s_drop (self, cn_amqp_reply_str (r, "consume", why, sizeof why));
            return;
        }
        /* a frame other than a delivery: read it */
        amqp_frame_t fr;
        int rc = amqp_simple_wait_frame_noblock (self->conn, &fr, &zero);
        if (rc == AMQP_STATUS_TIMEOUT)
            return;
        if (rc != AMQP_STATUS_OK) {
            s_drop (self, amqp_error_string2 (rc));
            return;
        }
        if (fr.frame_type != AMQP_FRAME_METHOD)
            continue;
        char why[300];
        switch (fr.payload.method.id) {
        case AMQP_BASIC_RETURN_METHOD: {
            amqp_basic_return_t m = *(amqp_basic_return_t *) fr.payload.method.decoded;
            char rk[256];
            size_t n = m.routing_key.len < sizeof rk - 1 ? m.routing_key.len : sizeof rk - 1;
            memcpy (rk, m.routing_key.bytes, n);
            rk[n] = 0;
            amqp_message_t msg;
            amqp_rpc_reply_t rr = amqp_read_message (self->conn, fr.channel, &msg, 0);
            if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                s_drop (self, cn_amqp_reply_str (rr, "basic.return", why, sizeof why));
                return;
            }
            amqp_destroy_message (&msg);
            m.routing_key = amqp_cstring_bytes (rk);
            s_on_return (self, &m);
            break;
        }
        case AMQP_CONNECTION_CLOSE_METHOD: {
            const amqp_connection_close_t *m = fr.payload.method.decoded;
            snprintf (why, sizeof why, "connection closed by broker: %u %.*s", m->reply_code,
                      (int) m->reply_text.len, (const char *) m->reply_text.bytes);
            amqp_connection_close_ok_t ok = { 0 };
            amqp_send_method (self->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
            s_drop (self, why);
            return;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            const amqp_channel_close_t *m = fr.payload.method.decoded;
            snprintf (why, sizeof why, "channel closed by broker: %u %.*s", m->reply_code,
                      (int) m->reply_text.len, (const char *) m->reply_text.bytes);
            s_drop (self, why);
            return;
        }
        case AMQP_BASIC_CANCEL_METHOD:
            s_drop (self, "consumer cancelled by broker");
            return;
        default:
            break;        /* queue.unbind-ok and the like */
        }
    }
}

static bool
s_amqp_buffered (self_t *self)
{
    return self->conn
        && (amqp_data_in_buffer (self->conn) || amqp_frames_enqueued (self->conn));
}

/* ---- requests from the gateway ---- */

/* Does the server exist? 1 yes, 0 no, -1 store error (e set). */
static int
s_exists (self_t *self, const char *uuid, cn_apierr_t *e)
{
    cn_status_row_t row;
    if (cn_liveness_get (self->args->live, uuid, &row))
        return 1;
    cn_mobj_t o;
    memset (&o, 0, sizeof o);
    int rc = cn_moray_get (self->moray, CN_BUCKET_SERVERS, uuid, &o);
    if (rc == CN_MORAY_OK) {
        cn_mobj_fini (&o);
        return 1;
    }
    if (rc == CN_MORAY_NOTFOUND)
        return 0;
    cn_apierr_set (e, 500, "InternalError", "the store is unreachable: %s",
                   cn_moray_errmsg (self->moray));
    return -1;
}

static void
s_execute (self_t *self, const cn_msg_t *m, uint64_t id, const char *req_id)
{
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    char uuid[37];
    json_t *params = cn_params_parse_server (m, uuid, &e);
    if (!params) {
        s_reply_apierr (self, id, req_id, &e);
        cn_apierr_fini (&e);
        return;
    }
    int ex = s_exists (self, uuid, &e);
    if (ex <= 0) {
        json_decref (params);
        if (ex == 0)
            s_reply_error (self, id, req_id, 404, "ResourceNotFound", "Server %s not found",
                           uuid);
        else
            s_reply_apierr (self, id, req_id, &e);
        cn_apierr_fini (&e);
        return;
    }
    cn_ur_req_t r;
    if (cn_ur_params_check (params, &r, &e) != 0) {
        json_decref (params);
        s_reply_apierr (self, id, req_id, &e);
        cn_apierr_fini (&e);
        return;
    }
    json_decref (params);
    if (!self->conn) {
        cn_ur_req_fini (&r);
        self->broker_failed++;
        s_reply_error (self, id, req_id, 503, "ServiceUnavailable",
                       "the message broker is unreachable: %s",
                       self->last_error[0] ? self->last_error : "not connected");
        return;
    }
    if (zhashx_size (self->pending) >= S_MAX_PENDING) {
        cn_ur_req_fini (&r);
        s_reply_error (self, id, req_id, 503, "ServiceUnavailable",
                       "too many executes in progress (%d), try again", S_MAX_PENDING);
        return;
    }

    s_exec_t *x = calloc (1, sizeof *x);
    if (!x)
        abort ();
    x->id = id;
    snprintf (x->req_id, sizeof x->req_id, "%s", req_id ? req_id : "");
    cn_uuid_new (x->ur_id);
    memcpy (x->uuid, uuid, sizeof x->uuid);
    x->json = r.json;
    x->timeout_s = r.timeout_s;
    x->start_us = cn_mono_us ();
    x->deadline_us = x->start_us + (int64_t) ((r.timeout_s + S_GRACE_S) * 1e6);

    char key[256];
    snprintf (key, sizeof key, CN_UR_REPLY_PREFIX "%s.%s", uuid, x->ur_id);
    amqp_queue_bind_t bind = {
        .queue = amqp_cstring_bytes (self->queue),
        .exchange = amqp_cstring_bytes (CN_AMQP_EXCHANGE),
        .routing_key = amqp_cstring_bytes (key),
        .nowait = 1,
        .arguments = amqp_empty_table,
    };
    int rc = amqp_send_method (self->conn, CN_AMQP_CHANNEL, AMQP_QUEUE_BIND_METHOD, &bind);
    size_t blen = 0;
    char *body = cn_ur_req_body (&r, &blen);
    cn_ur_req_fini (&r);
    if (rc == AMQP_STATUS_OK) {
        snprintf (key, sizeof key, CN_UR_EXECUTE_PREFIX "%s.%s", uuid, x->ur_id);
        amqp_basic_properties_t props;
        memset (&props, 0, sizeof props);
        props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG
                       | AMQP_BASIC_TIMESTAMP_FLAG;
        props.content_type = amqp_cstring_bytes ("application/json");
        props.delivery_mode = 1;
        props.timestamp = (uint64_t) (cn_now_ms () / 1000);
        amqp_bytes_t b = { blen, body };
        rc = amqp_basic_publish (self->conn, CN_AMQP_CHANNEL,
                                 amqp_cstring_bytes (CN_AMQP_EXCHANGE),
                                 amqp_cstring_bytes (key), 1, 0, &props, b);
    }
    free (body);
    if (rc != AMQP_STATUS_OK) {
        free (x);
        self->broker_failed++;
        char why[160];
        snprintf (why, sizeof why, "publish: %s", amqp_error_string2 (rc));
        s_reply_error (self, id, req_id, 503, "ServiceUnavailable",
                       "the message broker is unreachable: %s", why);
        s_drop (self, why);
        return;
    }
    self->published++;
    zhashx_insert (self->pending, x->ur_id, x);
    CN_DEBUG (COMPONENT, "execute published", "{s:s,s:s,s:s,s:f}", "req_id", x->req_id,
              "server_uuid", x->uuid, "ur_req_id", x->ur_id, "timeout_s", x->timeout_s);
}

static void
s_on_request (self_t *self)
{
    zframe_t *f = zframe_recv (self->pull);
    if (!f)
        return;
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) != 0) {
        CN_ERROR (COMPONENT, "bad request from the gateway", "{s:s}", "error", err);
        zframe_destroy (&f);
        return;
    }
    uint64_t id = 0;
    if (!cn_msg_uint (&m, "id", &id)) {
        CN_ERROR (COMPONENT, "gateway request without an id", NULL);
        cn_msg_fini (&m);
        zframe_destroy (&f);
        return;
    }
    char req_id[64] = "";
    size_t rlen = 0;
    const char *rid = cn_msg_str (&m, "req_id", &rlen);
    if (rid) {
        if (rlen >= sizeof req_id)
            rlen = sizeof req_id - 1;
        memcpy (req_id, rid, rlen);
        req_id[rlen] = 0;
    }
    self->requests++;
    if (cn_msg_is (&m, "execute"))
        s_execute (self, &m, id, req_id);
    else
        s_reply_error (self, id, req_id, 500, "InternalError", "unknown request type");
    cn_msg_fini (&m);
    zframe_destroy (&f);
}

/* Answer the executes whose deadline passed. */
static void
s_sweep (self_t *self, int64_t now)
{
    zlistx_t *keys = NULL;
    for (s_exec_t *x = zhashx_first (self->pending); x; x = zhashx_next (self->pending))
        if (now >= x->deadline_us) {
            if (!keys) {
                keys = zlistx_new ();
                zlistx_set_duplicator (keys, (czmq_duplicator *) strdup);
                zlistx_set_destructor (keys, (czmq_destructor *) zstr_free);
            }
            zlistx_add_end (keys, (void *) zhashx_cursor (self->pending));
        }
    if (!keys)
        return;
    for (const char *k = zlistx_first (keys); k; k = zlistx_next (keys)) {
        s_exec_t *x = zhashx_lookup (self->pending, k);
        if (!x)
            continue;
        self->timeouts++;
        s_reply_error (self, x->id, x->req_id, 504, "GatewayTimeout",
                       "no reply from server %s within %g seconds", x->uuid,
                       x->timeout_s + S_GRACE_S);
        s_unbind (self, x);
        zhashx_delete (self->pending, k);
    }
    zlistx_destroy (&keys);
}

/* ---- commands ---- */

static zframe_t *
s_status (self_t *self)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 21);
    cn_msgw_str (&w, "actor", "ur");
    cn_msgw_str (&w, "state", !self->started ? "stopped" : self->conn ? "running" : "backoff");
    cn_msgw_str (&w, "queue", self->queue[0] ? self->queue : NULL);
    cn_msgw_bool (&w, "connected", self->conn != NULL);
    cn_msgw_uint (&w, "pending", zhashx_size (self->pending));
    cn_msgw_uint (&w, "requests", self->requests);
    cn_msgw_uint (&w, "published", self->published);
    cn_msgw_uint (&w, "replies", self->replies);
    cn_msgw_uint (&w, "exit_zero", self->ok);
    cn_msgw_uint (&w, "exit_nonzero", self->exit_nonzero);
    cn_msgw_uint (&w, "agent_timeouts", self->agent_timeouts);
    cn_msgw_uint (&w, "timeouts", self->timeouts);
    cn_msgw_uint (&w, "returned", self->returned);
    cn_msgw_uint (&w, "broker_failed", self->broker_failed);
    cn_msgw_uint (&w, "bad_replies", self->rejected);
    cn_msgw_uint (&w, "late_replies", self->late_replies);
    cn_msgw_uint (&w, "reconnects", self->reconnects);
    cn_msgw_uint (&w, "responses_2xx", self->replies_2xx);
    cn_msgw_uint (&w, "responses_4xx", self->replies_4xx);
    cn_msgw_uint (&w, "responses_5xx", self->replies_5xx);
    cn_msgw_str (&w, "last_error", self->last_error[0] ? self->last_error : NULL);
    return cn_msgw_frame (&w);
}

static const char *
s_start (self_t *self, char *err, size_t errlen)
{
    if (self->started)
        return "already started";
    const cn_config_t *cfg = self->cfg;
    char perr[256];
    if (!cfg->amqp_url)
        return "no amqp_url configured";
    if (cn_amqp_url_parse (cfg->amqp_url, &self->url, perr, sizeof perr) != 0) {
        snprintf (err, errlen, "amqp_url: %s", perr);
        return err;
    }
    const char *inst = cfg->instance && *cfg->instance ? cfg->instance : "cnapid";
    char rnd[37];
    cn_uuid_new (rnd);
    rnd[8] = 0;
    snprintf (self->queue, sizeof self->queue, "cnapi-ur.%.120s.%s", inst, rnd);
    snprintf (self->conn_name, sizeof self->conn_name, "cnapid %.120s ur", inst);
    self->pull = zsock_new (ZMQ_PULL);
    if (!self->pull)
        return "cannot create the request socket";
    zsock_set_rcvhwm (self->pull, 10000);
    if (zsock_connect (self->pull, "%s", CN_UR_ENDPOINT) != 0) {
        snprintf (err, errlen, "connect %s: %s", CN_UR_ENDPOINT, zmq_strerror (zmq_errno ()));
        return err;
    }
    self->moray = cn_moray_new (cfg->pg_conninfo, cfg->pg_timeout_ms);
    if (!self->moray)
        return "cannot allocate the store client";
    self->ctl = cn_ctl_bind ("ur");
    if (!self->ctl)
        return "cannot bind the control socket";
    self->started = true;
    self->retry_at_us = cn_mono_us ();       /* connect on the first pass */
    return NULL;
}

static void
s_pipe_command (self_t *self)
{
    zmsg_t *msg = zmsg_recv (self->pipe);
    if (!msg) {
        self->terminated = true;
        return;
    }
    char *cmd = zmsg_popstr (msg);
    if (!cmd)
        ;
    else if (streq (cmd, "$TERM"))
        self->terminated = true;
    else if (streq (cmd, "START")) {
        char buf[320];
        const char *err = s_start (self, buf, sizeof buf);
        if (err) {
            CN_ERROR (COMPONENT, "ur service failed to start", "{s:s}", "error", err);
            zstr_sendx (self->pipe, "ERROR", err, NULL);
        }
        else
            zstr_send (self->pipe, "OK");
    }
    else if (streq (cmd, "STATUS")) {
        zframe_t *f = s_status (self);
        zframe_send (&f, self->pipe, 0);
    }
    else
        CN_WARN (COMPONENT, "unknown pipe command ignored", "{s:s}", "command", cmd);
    zstr_free (&cmd);
    zmsg_destroy (&msg);
}

static void
s_ctl_command (self_t *self)
{
    zmsg_t *msg = zmsg_recv (self->ctl);
    if (!msg)
        return;
    char *cmd = zmsg_popstr (msg);
    if (cmd && streq (cmd, "STATUS")) {
        zframe_t *f = s_status (self);
        zframe_send (&f, self->ctl, 0);
    }
    else
        zstr_sendx (self->ctl, "ERROR", "unknown command", NULL);
    zstr_free (&cmd);
    zmsg_destroy (&msg);
}

static void
s_exec_free (void **item)
{
    free (*item);
    *item = NULL;
}

void
cn_ur_actor (zsock_t *pipe, void *args)
{
    self_t *self = calloc (1, sizeof *self);
    if (!self)
        abort ();
    self->args = args;
    self->cfg = self->args->cfg;
    self->pipe = pipe;
    self->fd = -1;
    self->pending = zhashx_new ();
    zhashx_set_destructor (self->pending, s_exec_free);
    zsock_signal (pipe, 0);

    while (!self->terminated) {
        zmq_pollitem_t items[4];
        int n = 0, i_ctl = -1, i_pull = -1, i_amqp = -1;
        items[n++] = (zmq_pollitem_t) { zsock_resolve (pipe), 0, ZMQ_POLLIN, 0 };
        if (self->ctl) {
            i_ctl = n;
            items[n++] = (zmq_pollitem_t) { zsock_resolve (self->ctl), 0, ZMQ_POLLIN, 0 };
        }
        if (self->pull) {
            i_pull = n;
            items[n++] = (zmq_pollitem_t) { zsock_resolve (self->pull), 0, ZMQ_POLLIN, 0 };
        }
        if (self->conn && self->fd >= 0) {
            i_amqp = n;
            items[n++] = (zmq_pollitem_t) { NULL, self->fd, ZMQ_POLLIN, 0 };
        }
        long timeout = s_amqp_buffered (self) ? 0 : S_TICK_MS;
        if (self->started && !self->conn) {
            int64_t left = (self->retry_at_us - cn_mono_us ()) / 1000;
            if (left < timeout)
                timeout = left < 0 ? 0 : (long) left;
        }
        int rc = zmq_poll (items, n, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (items[0].revents & ZMQ_POLLIN)
            s_pipe_command (self);
        if (self->terminated)
            break;
        if (i_ctl >= 0 && (items[i_ctl].revents & ZMQ_POLLIN))
            s_ctl_command (self);
        /* replies first: they finish requests */
        int64_t now = cn_mono_us ();
        bool readable = i_amqp >= 0 && (items[i_amqp].revents & (ZMQ_POLLIN | ZMQ_POLLERR));
        if (self->conn && (readable || s_amqp_buffered (self) || now >= self->next_tick_us)) {
            s_amqp_service (self);
            self->next_tick_us = now + 1000LL * S_TICK_MS;
        }
        if (i_pull >= 0 && (items[i_pull].revents & ZMQ_POLLIN))
            for (int k = 0; k < 256 && (zsock_events (self->pull) & ZMQ_POLLIN); k++)
                s_on_request (self);
        s_sweep (self, cn_mono_us ());
        if (self->started && !self->conn && cn_mono_us () >= self->retry_at_us)
            s_connect (self);
    }

    s_fail_all (self, 503, "ServiceUnavailable", "the service is shutting down");
    if (self->conn)
        cn_amqp_close (&self->conn);
    zhashx_destroy (&self->pending);
    zsock_destroy (&self->ctl);
    zsock_destroy (&self->pull);
    cn_moray_destroy (&self->moray);
    cn_amqp_url_fini (&self->url);
    free (self);
}
