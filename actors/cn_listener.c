/*
 * cn_listener: the sysinfo listener actor. See include/cn_listener.h and
 * docs/amqp.md.
 *
 * Theory of operation
 *
 * One thread, one AMQP connection, one channel (1), one consumer on the shared
 * durable queue cfg->amqp_queue ("ur.cnapi"). Every instance consumes the same
 * queue; the broker round-robins deliveries among them.
 *
 * The thread serves four things with one zmq_poll: the pipe (main), the
 * control REP socket (admin), the DEALER to the state writer, and the AMQP
 * socket as a raw fd. librabbitmq reads the socket in large chunks and keeps
 * whole frames in its own buffer, so a readable fd is not the only sign of
 * work: whenever amqp_data_in_buffer() or amqp_frames_enqueued() is true the
 * poll timeout is 0. Frames are pulled one at a time with
 * amqp_simple_wait_frame_noblock() and a zero timeout, and a delivery
 * (basic.deliver, then a content header, then body frames) is assembled here
 * rather than with amqp_consume_message(), whose header and body reads block
 * (bounded only by the heartbeat timeout). Each service pass handles at most
 * S_FRAME_BUDGET frames and stops after ~20 ms, so the writer's results and
 * the pipe are never starved. The same zero-timeout call sends our
 * heartbeats when due and detects a silent broker (no frame for two
 * heartbeat intervals), so the AMQP side is serviced at least once a second
 * even when idle.
 *
 * Delivery -> writer -> ack. A delivery whose routing key has no valid UUID
 * or whose body is too large is rejected without requeue and logged. The
 * body is checked by the writer (cn_sysinfo_parse), which answers ok=false
 * without retry for a body that is not sysinfo. Any other goes to the writer as a "sysinfo"
 * request (proto/writer.md) with tag = generation << 48 | delivery tag and is
 * remembered in the in-flight table. It is acked only when the writer's
 * "result" for that tag says ok; ok=false without retry is a permanent
 * failure (reject, no requeue); ok=false with retry (the writer normally
 * retries amqp-sourced writes itself) is requeued with a nack after a backoff.
 *
 * Connections and generations. Each connection has a generation (1..65535,
 * wrapping, never 0 so no tag is 0). Losing the connection for any reason
 * (socket error, missed heartbeats, connection.close or channel.close from
 * the broker, consumer cancelled) voids every in-flight delivery of that
 * generation: the table is emptied, and a later writer result whose tag is
 * not in the table is ignored. Delivery tags belong to a channel, so acking
 * an old tag on a new connection would ack the wrong message or kill the
 * channel; the broker redelivers the unacked ones anyway (redelivered=true),
 * and rewriting a sysinfo is harmless.
 *
 * Connecting (TCP connect, login, channel, queue declare, bindings, qos,
 * consume) is a chain of blocking librabbitmq calls, each bounded by
 * S_TIMEOUT_MS. It runs in a short-lived helper actor so that this thread
 * keeps answering STATUS meanwhile; the helper hands the ready connection
 * over by pointer. Failed attempts and lost connections are retried after
 * cn_backoff_ms() (full jitter, 100 ms doubling to 5 s); the attempt counter
 * resets once a connection has stayed up for S_STABLE_MS, so a broker that
 * accepts and drops at once does not get hammered.
 */
#include "cn_listener.h"
#include "cn_vmevents.h"

#include "cn_actor.h"
#include "cn_amqp.h"
#include "cn_config.h"
#include "cn_health.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_server.h"
#include "cn_util.h"

#include <errno.h>
#include <jansson.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define S_COMPONENT (self->vm ? "vmevents" : "listener")
#define S_WHAT (self->vm ? "vm event" : "sysinfo")
#define S_TIMEOUT_MS 3000         /* connect, login, each setup RPC, close */
#define S_HEARTBEAT_S 10
#define S_TICK_MS 1000            /* service AMQP (heartbeats) at least this often */
#define S_BACKOFF_BASE_MS 100
#define S_BACKOFF_CAP_MS 5000
#define S_STABLE_MS 10000         /* up this long: the next failure starts backoff afresh */
#define S_FRAME_BUDGET 2048       /* frames per AMQP service pass ... */
#define S_PASS_US 20000           /* ... or this much time, whichever ends first */
#define S_RESULT_BUDGET 2048      /* writer results per pass */
#define S_ACK_DEFER_US 100000     /* settled deliveries wait this long for a multiple ack */
#define S_TAG_BITS 48
#define S_TAG_MASK ((UINT64_C(1) << S_TAG_BITS) - 1)
#define S_RK_MAX 256              /* shortstr: at most 255 bytes */
#define S_KEEP_BUF (1024 * 1024)  /* keep a body buffer up to this size between messages */

typedef enum { S_IDLE, S_CONNECTING, S_CONNECTED, S_BACKOFF } s_conn_t;
typedef enum { M_NONE, M_HEADER, M_BODY } s_asm_t;

/* A delivery the writer settled, waiting for its ack (s_flush_acks). */
typedef struct {
    uint64_t dtag;
    int64_t at_us;            /* when its result came */
} s_settled_t;

/* A delivery handed to the writer, waiting for its result. */
typedef struct {
    uint64_t dtag;
    bool redelivered;
    int64_t requeue_at_us;    /* 0, or when to nack it back (writer said retry) */
    char uuid[37];
    char rk[S_RK_MAX];        /* printable copy, for logs */
} s_flight_t;

/* What the connector helper needs; lives in self_t, outlives the helper. */
typedef struct {
    cn_amqp_url_t url;
    const char *queue;
    bool vm;                  /* the VM events queue: private, bound per server */
    char vm_queue[160];       /* its name (a fresh suffix per connection) */
    int prefetch;
    char name[128];
    char consumer_tag[128];
} s_conn_args_t;

typedef struct {
    const cn_config_t *cfg;
    bool vm;                  /* VM events mode (cn_vmevents_actor) */
    zhashx_t *bound;          /* VM events: server uuids to bind */
    uint64_t binds, unbinds, bind_failures;
    zsock_t *pipe;
    zsock_t *ctl;             /* REP, after START */
    zsock_t *writer;          /* cn_writer_client: every writer shard, after START */
    zactor_t *connector;      /* while connecting */
    s_conn_args_t args;
    bool started;
    bool terminated;

    s_conn_t state;
    amqp_connection_state_t conn;
    int fd;
    uint64_t gen;
    int attempt;
    int64_t retry_at_us;      /* S_BACKOFF: when to try again */
    int64_t connected_us;
    int64_t next_tick_us;
    bool ever_connected;

    /* The delivery being assembled from frames. */
    s_asm_t m_state;
    uint64_t m_dtag;
    bool m_redelivered;
    bool m_returned;          /* basic.return content: read and drop */
    bool m_oversize;
    bool m_have_sent;
    int64_t m_sent_ms;
    char m_rk[S_RK_MAX];
    size_t m_rklen;
    size_t m_size, m_got;
    char *buf;
    size_t buf_cap;

    zhashx_t *flights;        /* tag -> s_flight_t */
    s_settled_t *ackq;        /* deliveries settled ok, not yet acked */
    size_t nackq, capackq;
    int64_t ackq_since_us;    /* when the oldest of them was settled */
    uint64_t ack_frames;      /* basic.ack frames sent (one may ack many) */
    size_t requeue_pending;   /* flights with requeue_at_us set */
    int retry_attempt;

    uint64_t received, acked, rejected, requeued, reconnects, redelivered, voided;
    char last_error[256];
} self_t;

/* ---- in-flight table: uint64 tags as keys, no allocation per key ---- */

static void
s_flight_free (void **item)
{
    free (*item);
    *item = NULL;
}

static self_t *
s_new (zsock_t *pipe, const cn_config_t *cfg)
{
    self_t *self = calloc (1, sizeof *self);
    assert (self);
    self->cfg = cfg;
    self->pipe = pipe;
    self->fd = -1;
    self->state = S_IDLE;
    self->flights = zhashx_new ();
    assert (self->flights);
    cn_tag_keys (self->flights);
    zhashx_set_destructor (self->flights, s_flight_free);
    return self;
}

/* ---- small helpers ---- */

/* A printable ASCII copy of untrusted bytes (log fields must be UTF-8). */
static void
s_printable (const char *s, size_t len, char *out, size_t outlen)
{
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < outlen; i++) {
        unsigned char c = (unsigned char) s[i];
        out[n++] = (c >= 0x20 && c < 0x7f) ? (char) c : '?';
    }
    out[n] = '\0';
}

static void
s_set_error (self_t *self, const char *err)
{
    s_printable (err, strlen (err), self->last_error, sizeof self->last_error);
}

static const char *
s_conn_name (s_conn_t s)
{
    switch (s) {
    case S_CONNECTING: return "connecting";
    case S_CONNECTED:  return "connected";
    case S_BACKOFF:    return "backoff";
    default:           return "idle";
    }
}

/* ---- the connector helper actor ----
 * Pipe protocol: signals, does the blocking setup, sends "ssp" (status,
 * error, connection pointer), then waits. "TAKEN" transfers the connection
 * to the listener; $TERM ends it (closing the connection if not taken). */
static void
s_connector (zsock_t *pipe, void *argp)
{
    const s_conn_args_t *a = argp;
    zsock_signal (pipe, 0);
    char err[256] = "";
    amqp_connection_state_t c = cn_amqp_connect (&a->url, S_TIMEOUT_MS, S_HEARTBEAT_S,
                                                 a->name, err, sizeof err);
    /* VM events: a private queue, bound per server by the actor once the
     * connection is handed over */
    if (c && (a->vm ? cn_amqp_queue_declare_private (c, a->vm_queue, err, sizeof err)
                    : cn_amqp_queue_declare (c, a->queue, CN_AMQP_QUEUE_AUTO,
                                             cn_amqp_sysinfo_keys, err, sizeof err)) != 0)
        cn_amqp_destroy (&c);
    if (c && cn_amqp_consume (c, a->vm ? a->vm_queue : a->queue, a->prefetch,
                              a->consumer_tag, err, sizeof err) != 0)
        cn_amqp_destroy (&c);
    zsock_send (pipe, "ssp", c ? "OK" : "ERROR", err, (void *) c);
    bool owned = c != NULL;
    while (true) {
        char *cmd = zstr_recv (pipe);
        if (!cmd)
            break;
        bool term = streq (cmd, "$TERM");
        if (streq (cmd, "TAKEN"))
            owned = false;
        zstr_free (&cmd);
        if (term)
            break;
    }
    if (owned)
        cn_amqp_close (&c);
}

static void
s_start_connect (self_t *self)
{
    assert (!self->connector && !self->conn);
    if (self->vm) {
        /* a fresh name per connection: the old exclusive queue may linger
         * until the broker notices its connection is gone */
        char id[37];
        cn_uuid_new (id);
        const char *inst = self->cfg->instance && *self->cfg->instance
                           ? self->cfg->instance : "cnapid";
        snprintf (self->args.vm_queue, sizeof self->args.vm_queue, "cnapi.vmevents.%s.%.8s",
                  inst, id);
    }
    self->connector = zactor_new (s_connector, &self->args);
    if (!self->connector) {
        /* Out of threads or fds: try again later rather than give up. */
        s_set_error (self, "cannot start the connector thread");
        self->state = S_BACKOFF;
        self->retry_at_us = cn_mono_us ()
            + 1000LL * cn_backoff_ms (self->attempt++, S_BACKOFF_BASE_MS, S_BACKOFF_CAP_MS);
        return;
    }
    self->state = S_CONNECTING;
}

static void
s_schedule_retry (self_t *self)
{
    int ms = cn_backoff_ms (self->attempt, S_BACKOFF_BASE_MS, S_BACKOFF_CAP_MS);
    if (self->attempt < 30)
        self->attempt++;
    self->state = S_BACKOFF;
    self->retry_at_us = cn_mono_us () + 1000LL * ms;
}

static void
s_reset_delivery (self_t *self)
{
    self->m_state = M_NONE;
    self->m_returned = self->m_oversize = self->m_have_sent = false;
    self->m_size = self->m_got = 0;
    if (self->buf_cap > S_KEEP_BUF) {
        free (self->buf);
        self->buf = NULL;
        self->buf_cap = 0;
    }
}

/* Forget the connection: void its in-flight deliveries (the broker
 * redelivers them) and schedule a reconnect. */
static void
s_drop (self_t *self, const char *reason)
{
    size_t lost = zhashx_size (self->flights);
    int64_t up_ms = (cn_mono_us () - self->connected_us) / 1000;
    s_set_error (self, reason);
    CN_WARN (S_COMPONENT, "broker connection lost", "{s:s,s:i,s:I,s:I}",
             "reason", self->last_error, "generation", (int) self->gen,
             "in_flight", (json_int_t) lost, "up_ms", (json_int_t) up_ms);
    cn_amqp_destroy (&self->conn);
    self->fd = -1;
    self->voided += lost + self->nackq;
    self->nackq = 0;
    zhashx_purge (self->flights);
    self->requeue_pending = 0;
    s_reset_delivery (self);
    if (!self->vm)
        cn_health_set ("amqp", false);
    if (up_ms >= S_STABLE_MS)
        self->attempt = 0;
    s_schedule_retry (self);
}

/* VM events: bind or unbind one server's events on our queue (a bounded
 * RPC; deliveries that arrive meanwhile are queued by librabbitmq and read
 * by the next service pass). false when the connection was dropped. */
static bool
s_bind (self_t *self, const char *uuid, bool bind)
{
    char key[80], err[256];
    snprintf (key, sizeof key, "vm.event.%s.*", uuid);
    if (cn_amqp_bind (self->conn, self->args.vm_queue, key, bind, err, sizeof err) != 0) {
        self->bind_failures++;
        s_drop (self, err);
        return false;
    }
    if (bind)
        self->binds++;
    else
        self->unbinds++;
    return true;
}

/* VM events: a new connection binds every owned server. */
static void
s_bind_all (self_t *self)
{
    zlistx_t *keys = zhashx_keys (self->bound);
    size_t n = 0;
    for (const char *k = zlistx_first (keys); k && self->conn; k = zlistx_next (keys))
        n += s_bind (self, k, true);
    zlistx_destroy (&keys);
    if (self->conn)
        CN_INFO (S_COMPONENT, "servers bound", "{s:I,s:s}", "servers", (json_int_t) n,
                 "queue", self->args.vm_queue);
}

/* The connector finished: take the connection or schedule another try. */
static void
s_connector_done (self_t *self)
{
    char *status = NULL, *err = NULL;
    void *ptr = NULL;
    if (zsock_recv (self->connector, "ssp", &status, &err, &ptr) != 0) {
        zactor_destroy (&self->connector);
        s_set_error (self, "connector thread failed");
        s_schedule_retry (self);
        return;
    }
    bool ok = status && streq (status, "OK") && ptr;
    if (ok)
        zstr_send (self->connector, "TAKEN");
    zactor_destroy (&self->connector);

    if (!ok) {
        s_set_error (self, err && *err ? err : "connect failed");
        s_schedule_retry (self);
        CN_WARN (S_COMPONENT, "broker connection failed", "{s:s,s:s,s:i,s:i,s:I}",
                 "error", self->last_error, "host", self->args.url.host,
                 "port", self->args.url.port, "attempt", self->attempt,
                 "retry_ms", (json_int_t) ((self->retry_at_us - cn_mono_us ()) / 1000));
    }
    else {
        self->conn = ptr;
        self->fd = amqp_get_sockfd (self->conn);
        self->gen = (self->gen % 0xffff) + 1;
        self->state = S_CONNECTED;
        self->connected_us = cn_mono_us ();
        self->next_tick_us = self->connected_us;
        if (self->ever_connected)
            self->reconnects++;
        self->ever_connected = true;
        s_reset_delivery (self);
        if (!self->vm)
            cn_health_set ("amqp", true);
        CN_INFO (S_COMPONENT, "broker connected", "{s:s,s:i,s:s,s:s,s:i,s:i,s:i}",
                 "host", self->args.url.host, "port", self->args.url.port,
                 "vhost", self->args.url.vhost,
                 "queue", self->vm ? self->args.vm_queue : self->args.queue,
                 "prefetch", self->args.prefetch,
                 "heartbeat_s", amqp_get_heartbeat (self->conn),
                 "generation", (int) self->gen);
        if (self->vm)
            s_bind_all (self);
    }
    zstr_free (&status);
    zstr_free (&err);
}

/* ---- acks ---- */

/* basic.ack of dtag, or of every outstanding delivery up to it (multiple);
 * covers: how many deliveries that is. false when the connection dropped. */
static bool
s_ack (self_t *self, uint64_t dtag, bool multiple, size_t covers)
{
    int rc = amqp_basic_ack (self->conn, CN_AMQP_CHANNEL, dtag, multiple);
    if (rc != AMQP_STATUS_OK) {
        char reason[128];
        snprintf (reason, sizeof reason, "basic.ack: %s", amqp_error_string2 (rc));
        s_drop (self, reason);
        return false;
    }
    self->acked += covers;
    self->ack_frames++;
    return true;
}

static int
s_cmp_settled (const void *a, const void *b)
{
    uint64_t x = ((const s_settled_t *) a)->dtag, y = ((const s_settled_t *) b)->dtag;
    return x < y ? -1 : x > y;
}

/* Ack what the writer's results settled. A multiple ack covers every
 * outstanding delivery up to its tag, so it goes only as far as the lowest
 * delivery still unsettled (in flight, or waiting to be requeued): after a
 * committed batch that is usually all of them, in one frame instead of one
 * per message (RabbitMQ's CPU per message, issue 2 benchmarks). With several
 * writer shards one shard's commit settles deliveries interleaved with the
 * other's, still in flight: those wait (S_ACK_DEFER_US at most, and at most
 * half the prefetch window) for the other shard's commit, whose multiple ack
 * then covers both; past either bound they are acked one by one. A wait
 * loses nothing: an unacked delivery is redelivered, and writing the same
 * sysinfo twice changes nothing. */
static void
s_flush_acks (self_t *self, int64_t now_us)
{
    size_t n = self->nackq;
    if (n == 0 || !self->conn)
        return;
    qsort (self->ackq, n, sizeof *self->ackq, s_cmp_settled);
    uint64_t low = UINT64_MAX;
    for (s_flight_t *fl = zhashx_first (self->flights); fl; fl = zhashx_next (self->flights))
        if (fl->dtag < low)
            low = fl->dtag;
    size_t below = 0;
    while (below < n && self->ackq[below].dtag < low)
        below++;
    if (below > 0 && !s_ack (self, self->ackq[below - 1].dtag, below > 1, below))
        return;
    size_t rest = n - below;
    int64_t since = INT64_MAX;
    for (size_t i = below; i < n; i++)
        if (self->ackq[i].at_us < since)
            since = self->ackq[i].at_us;
    if (rest > 0 && rest * 2 < (size_t) self->args.prefetch && now_us - since < S_ACK_DEFER_US) {
        memmove (self->ackq, self->ackq + below, rest * sizeof *self->ackq);
        self->nackq = rest;
        self->ackq_since_us = since;
        return;
    }
    self->nackq = 0;
    for (size_t i = below; i < n; i++)
        if (!s_ack (self, self->ackq[i].dtag, false, 1))
            return;
}

static void
s_reject (self_t *self, uint64_t dtag, bool requeue)
{
    int rc = requeue
        ? amqp_basic_nack (self->conn, CN_AMQP_CHANNEL, dtag, 0, 1)
        : amqp_basic_reject (self->conn, CN_AMQP_CHANNEL, dtag, 0);
    if (rc != AMQP_STATUS_OK) {
        char reason[128];
        snprintf (reason, sizeof reason, "basic.%s: %s", requeue ? "nack" : "reject",
                  amqp_error_string2 (rc));
        s_drop (self, reason);
        return;
    }
    if (requeue)
        self->requeued++;
    else
        self->rejected++;
}

/* ---- deliveries ---- */

static void
s_reject_bad (self_t *self, const char *reason, const char *rk)
{
    CN_WARN (S_COMPONENT, self->vm ? "vm event rejected" : "sysinfo rejected", "{s:s,s:s,s:I,s:b}",
             "reason", reason, "routing_key", rk,
             "delivery_tag", (json_int_t) self->m_dtag,
             "redelivered", self->m_redelivered);
    s_reject (self, self->m_dtag, false);
}

static void s_hand_over (self_t *self, cn_msgw_t *w, uint64_t tag, const char *uuid,
                         const char *rk);

/* VM events: the body (docs/vm-events.md) checked and handed to the writer
 * as a "vm_event" request (proto/writer.md); it applies only a newer seq,
 * so the same event from the session and from here is applied once. */
static void
s_vm_delivery (self_t *self, const char *rk)
{
    json_error_t jerr;
    json_t *ev = json_loadb (self->buf ? self->buf : "", self->m_size, 0, &jerr);
    const char *why = NULL;
    char uuid[37] = "", vm_uuid[37] = "", tmp[37];
    const char *su = json_string_value (json_object_get (ev, "server_uuid"));
    const char *vu = json_string_value (json_object_get (ev, "vm_uuid"));
    const char *event = json_string_value (json_object_get (ev, "event"));
    json_t *seq = json_object_get (ev, "seq");
    json_t *vm = json_object_get (ev, "vm");
    if (!ev)
        why = "body is not JSON";
    else if (!su || strlen (su) != 36 || !cn_uuid_normalize (memcpy (tmp, su, 37), uuid))
        why = "server_uuid is missing or not a UUID";
    else if (!vu || strlen (vu) != 36 || !cn_uuid_normalize (memcpy (tmp, vu, 37), vm_uuid))
        why = "vm_uuid is missing or not a UUID";
    else if (!event || (!streq (event, "create") && !streq (event, "state")
                        && !streq (event, "update") && !streq (event, "destroy")))
        why = "event is not create, state, update or destroy";
    else if (!json_is_integer (seq) || json_integer_value (seq) < 0)
        why = "seq is not a non-negative integer";
    else if (!streq (event, "destroy") && !json_is_object (vm))
        why = "vm is missing or not an object";
    else {
        char want[100];
        snprintf (want, sizeof want, "vm.event.%s.%s", uuid, vm_uuid);
        if (strcasecmp (want, rk) != 0)
            why = "routing key does not match server_uuid and vm_uuid";
    }
    if (why) {
        json_decref (ev);
        s_reject_bad (self, why, rk);
        return;
    }
    if (self->m_dtag == 0 || self->m_dtag > S_TAG_MASK) {
        json_decref (ev);
        s_drop (self, "delivery tag space exhausted");
        return;
    }
    char *vm_text = json_is_object (vm) ? json_dumps (vm, JSON_COMPACT) : NULL;
    uint64_t tag = (self->gen << S_TAG_BITS) | self->m_dtag;
    cn_msgw_t w;
    cn_msgw_init (&w, "vm_event", 6);
    cn_msgw_uint (&w, "tag", tag);
    cn_msgw_str (&w, "uuid", uuid);
    cn_msgw_str (&w, "vm_uuid", vm_uuid);
    cn_msgw_str (&w, "event", event);
    cn_msgw_uint (&w, "seq", (uint64_t) json_integer_value (seq));
    cn_msgw_str (&w, "vm", vm_text);
    free (vm_text);
    json_decref (ev);
    s_hand_over (self, &w, tag, uuid, rk);
}

/* A whole delivery is in: check it and hand it to the writer. */
static void
s_delivery (self_t *self)
{
    char rk[S_RK_MAX];
    s_printable (self->m_rk, self->m_rklen, rk, sizeof rk);
    if (self->m_returned) {
        CN_WARN (S_COMPONENT, "unexpected basic.return ignored", "{s:s}",
                 "routing_key", rk);
        return;
    }
    self->received++;
    if (self->m_redelivered)
        self->redelivered++;

    char uuid[37];
    char err[256];
    if (self->vm && !self->m_oversize) {
        s_vm_delivery (self, rk);
        return;
    }
    if (self->m_oversize) {
        snprintf (err, sizeof err, "message of %zu bytes is larger than amqp_max_message",
                  self->m_size);
        s_reject_bad (self, err, rk);
        return;
    }
    if (!cn_amqp_rk_uuid (self->m_rk, self->m_rklen, uuid)) {
        s_reject_bad (self, "routing key has no valid server UUID", rk);
        return;
    }
    /* The body itself (JSON, UUID, types) is checked once, by the state
     * writer, which has to parse it anyway: a body it refuses comes back as
     * ok=false without retry and is rejected below, logged the same way.
     * Parsing ~3 KB of JSON twice was most of the ingest CPU. */
    const char *body = self->buf ? self->buf : "";

    if (self->m_dtag == 0 || self->m_dtag > S_TAG_MASK) {
        /* 2^48 deliveries on one channel: start a fresh one. */
        s_drop (self, "delivery tag space exhausted");
        return;
    }
    uint64_t tag = (self->gen << S_TAG_BITS) | self->m_dtag;
    cn_msgw_t w;
    cn_msgw_init (&w, "sysinfo", self->m_have_sent ? 5 : 4);
    cn_msgw_uint (&w, "tag", tag);
    cn_msgw_str (&w, "uuid", uuid);
    cn_msgw_strn (&w, "sysinfo", body, self->m_size);
    cn_msgw_str (&w, "source", "amqp");
    if (self->m_have_sent)
        cn_msgw_int (&w, "sent_ms", self->m_sent_ms);
    s_hand_over (self, &w, tag, uuid, rk);
}

/* Send a request for the delivery being read to the writer and remember it
 * in flight (or requeue it when the writer's queue refuses it). */
static void
s_hand_over (self_t *self, cn_msgw_t *w, uint64_t tag, const char *uuid, const char *rk)
{
    zframe_t *f = cn_msgw_frame (w);
    if (!f || cn_writer_send (self->writer, self->cfg->writer_shards, uuid, &f, true) != 0) {
        zframe_destroy (&f);
        CN_ERROR (S_COMPONENT, "cannot hand a message to the writer", "{s:s,s:s}",
                  "error", zmq_strerror (errno), "routing_key", rk);
        s_reject (self, self->m_dtag, true);
        return;
    }
    s_flight_t *fl = calloc (1, sizeof *fl);
    assert (fl);
    fl->dtag = self->m_dtag;
    fl->redelivered = self->m_redelivered;
    memcpy (fl->uuid, uuid, sizeof fl->uuid);
    snprintf (fl->rk, sizeof fl->rk, "%s", rk);
    int rc = zhashx_insert (self->flights, CN_TAG_KEY (tag), fl);
    if (rc != 0) {
        /* The broker never repeats a delivery tag on a channel. */
        CN_FATAL (S_COMPONENT, "duplicate delivery tag", "{s:I}", "tag", (json_int_t) tag);
        abort ();
    }
    CN_TRACE (S_COMPONENT, "handed to writer", "{s:s,s:I,s:b}",
              "server_uuid", uuid, "delivery_tag", (json_int_t) self->m_dtag,
              "redelivered", self->m_redelivered);
}

/* Grow the body buffer to hold n bytes (+1 for a terminating NUL). */
static bool
s_reserve (self_t *self, size_t n)
{
    if (self->buf_cap >= n + 1)
        return true;
    char *p = realloc (self->buf, n + 1);
    if (!p)
        return false;
    self->buf = p;
    self->buf_cap = n + 1;
    return true;
}

static void
s_method (self_t *self, const amqp_frame_t *fr)
{
    amqp_method_number_t id = fr->payload.method.id;
    const void *d = fr->payload.method.decoded;
    char reason[400];

    if (id == AMQP_CONNECTION_CLOSE_METHOD) {
        const amqp_connection_close_t *m = d;
        snprintf (reason, sizeof reason, "connection closed by broker: %u %.*s",
                  m->reply_code, (int) m->reply_text.len, (const char *) m->reply_text.bytes);
        amqp_connection_close_ok_t ok = { 0 };
        amqp_send_method (self->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        s_drop (self, reason);
        return;
    }
    if (id == AMQP_CONNECTION_BLOCKED_METHOD || id == AMQP_CONNECTION_UNBLOCKED_METHOD) {
        /* Only publishers are blocked; we merely note it. */
        CN_INFO (S_COMPONENT, id == AMQP_CONNECTION_BLOCKED_METHOD
                 ? "broker blocked publishing" : "broker unblocked publishing", NULL);
        return;
    }
    if (fr->channel != CN_AMQP_CHANNEL)
        return;

    switch (id) {
    case AMQP_BASIC_DELIVER_METHOD:
    case AMQP_BASIC_RETURN_METHOD: {
        if (self->m_state != M_NONE) {
            s_drop (self, "protocol error: method frame inside a message");
            return;
        }
        amqp_bytes_t rkb;
        if (id == AMQP_BASIC_DELIVER_METHOD) {
            const amqp_basic_deliver_t *m = d;
            self->m_dtag = m->delivery_tag;
            self->m_redelivered = m->redelivered;
            self->m_returned = false;
            rkb = m->routing_key;
        }
        else {
            const amqp_basic_return_t *m = d;
            self->m_dtag = 0;
            self->m_redelivered = false;
            self->m_returned = true;
            rkb = m->routing_key;
        }
        self->m_rklen = rkb.len < S_RK_MAX ? rkb.len : S_RK_MAX - 1;
        memcpy (self->m_rk, rkb.bytes, self->m_rklen);
        self->m_rk[self->m_rklen] = '\0';
        self->m_state = M_HEADER;
        return;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *m = d;
        snprintf (reason, sizeof reason, "channel closed by broker: %u %.*s",
                  m->reply_code, (int) m->reply_text.len, (const char *) m->reply_text.bytes);
        amqp_channel_close_ok_t ok = { 0 };
        amqp_send_method (self->conn, CN_AMQP_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        s_drop (self, reason);
        return;
    }
    case AMQP_BASIC_CANCEL_METHOD:
        /* The queue was deleted or the node holding it went away: reconnect,
         * which declares the queue again. */
        s_drop (self, "consumer cancelled by broker");
        return;
    default:
        CN_DEBUG (S_COMPONENT, "unexpected method ignored", "{s:I}",
                  "method", (json_int_t) id);
        return;
    }
}

static void
s_frame (self_t *self, const amqp_frame_t *fr)
{
    switch (fr->frame_type) {
    case AMQP_FRAME_METHOD:
        s_method (self, fr);
        return;

    case AMQP_FRAME_HEADER: {
        if (fr->channel != CN_AMQP_CHANNEL)
            return;
        if (self->m_state != M_HEADER) {
            s_drop (self, "protocol error: unexpected content header");
            return;
        }
        self->m_size = (size_t) fr->payload.properties.body_size;
        self->m_got = 0;
        self->m_have_sent = cn_amqp_sent_ms (fr->payload.properties.decoded,
                                             &self->m_sent_ms);
        size_t max = self->cfg->amqp_max_message > 0
            ? (size_t) self->cfg->amqp_max_message : (size_t) CN_SYSINFO_MAX_BYTES;
        /* An oversize body is read and thrown away, never buffered. */
        self->m_oversize = fr->payload.properties.body_size > max;
        if (!self->m_oversize && !self->m_returned && !s_reserve (self, self->m_size))
            self->m_oversize = true;
        self->m_state = M_BODY;
        break;
    }

    case AMQP_FRAME_BODY: {
        if (fr->channel != CN_AMQP_CHANNEL)
            return;
        if (self->m_state != M_BODY) {
            s_drop (self, "protocol error: unexpected content body");
            return;
        }
        size_t n = fr->payload.body_fragment.len;
        if (n > self->m_size - self->m_got) {
            s_drop (self, "protocol error: body longer than announced");
            return;
        }
        if (!self->m_oversize && !self->m_returned)
            memcpy (self->buf + self->m_got, fr->payload.body_fragment.bytes, n);
        self->m_got += n;
        break;
    }

    default:
        return;
    }
    if (self->m_state == M_BODY && self->m_got == self->m_size) {
        if (self->buf && !self->m_oversize && !self->m_returned)
            self->buf[self->m_size] = '\0';
        s_delivery (self);
        if (self->conn)
            s_reset_delivery (self);
    }
}

/* Pull what librabbitmq has (and what the socket has) without waiting. This
 * also sends heartbeats when due and notices a silent broker. */
static void
s_amqp_service (self_t *self)
{
    struct timeval zero = { 0, 0 };
    int64_t deadline = cn_mono_us () + S_PASS_US;
    for (int i = 0; i < S_FRAME_BUDGET && self->conn; i++) {
        /* Big sysinfo take long to check: bound the pass in time too, so
         * the pipe, STATUS and the writer's results wait at most ~20 ms. */
        if (i > 0 && self->m_state == M_NONE && cn_mono_us () > deadline)
            break;
        amqp_frame_t fr;
        int rc = amqp_simple_wait_frame_noblock (self->conn, &fr, &zero);
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            char reason[128];
            snprintf (reason, sizeof reason, "%s", amqp_error_string2 (rc));
            s_drop (self, reason);
            return;
        }
        s_frame (self, &fr);
    }
    if (self->conn && self->m_state == M_NONE) {
        /* Everything needed from the frames was copied out. */
        amqp_maybe_release_buffers_on_channel (self->conn, CN_AMQP_CHANNEL);
        amqp_maybe_release_buffers_on_channel (self->conn, 0);
    }
}

static bool
s_amqp_buffered (self_t *self)
{
    return self->conn
        && (amqp_data_in_buffer (self->conn) || amqp_frames_enqueued (self->conn));
}

/* ---- writer results ---- */

static void
s_result (self_t *self, const void *data, size_t size)
{
    cn_msg_t m;
    char err[256];
    if (cn_msg_parse (&m, data, size, err, sizeof err) != 0) {
        CN_ERROR (S_COMPONENT, "bad message from writer", "{s:s}", "error", err);
        return;
    }
    uint64_t tag;
    bool ok = false, retry = false;
    if (!cn_msg_is (&m, "result") || !cn_msg_uint (&m, "tag", &tag)
        || !cn_msg_bool (&m, "ok", &ok)) {
        CN_ERROR (S_COMPONENT, "bad message from writer", "{s:s}",
                  "error", "not a result with tag and ok");
        cn_msg_fini (&m);
        return;
    }
    cn_msg_bool (&m, "retry", &retry);
    s_flight_t *fl = zhashx_lookup (self->flights, CN_TAG_KEY (tag));
    if (!fl || !self->conn || (tag >> S_TAG_BITS) != self->gen) {
        /* Its connection is gone; the broker has redelivered it. */
        CN_DEBUG (S_COMPONENT, "result for a void delivery ignored", "{s:I}",
                  "tag", (json_int_t) tag);
        cn_msg_fini (&m);
        return;
    }
    if (fl->requeue_at_us) {
        /* Already waiting to be requeued: a second result is a writer bug. */
        CN_ERROR (S_COMPONENT, "duplicate result from writer", "{s:I}",
                  "tag", (json_int_t) tag);
        cn_msg_fini (&m);
        return;
    }
    if (ok) {
        self->retry_attempt = 0;
        uint64_t dtag = fl->dtag;
        zhashx_delete (self->flights, CN_TAG_KEY (tag));
        if (self->nackq == self->capackq) {
            self->capackq = self->capackq ? self->capackq * 2 : 1024;
            self->ackq = realloc (self->ackq, self->capackq * sizeof *self->ackq);
            if (!self->ackq)
                abort ();
        }
        int64_t now_us = cn_mono_us ();
        if (self->nackq == 0)
            self->ackq_since_us = now_us;
        self->ackq[self->nackq++] = (s_settled_t) { dtag, now_us };
    }
    else if (!retry) {
        char *code = cn_msg_strdup (&m, "code");
        char *message = cn_msg_strdup (&m, "message");
        char *outcome = cn_msg_strdup (&m, "outcome");
        /* a VM event for a server without a record (no sysinfo yet) is
         * normal at first boot: the session keeps that state */
        int lvl = self->vm && code && streq (code, "ResourceNotFound") ? CN_LOG_DEBUG : CN_LOG_WARN;
        cn_log (lvl, S_COMPONENT, self->vm ? "vm event rejected" : "sysinfo rejected",
                 "{s:s,s:s,s:s?,s:s?,s:s?,s:I}",
                 "server_uuid", fl->uuid, "routing_key", fl->rk, "outcome", outcome,
                 "code", code, "message", message, "delivery_tag", (json_int_t) fl->dtag);
        free (code);
        free (message);
        free (outcome);
        uint64_t dtag = fl->dtag;
        zhashx_delete (self->flights, CN_TAG_KEY (tag));
        s_reject (self, dtag, false);
    }
    else {
        int ms = cn_backoff_ms (self->retry_attempt, S_BACKOFF_BASE_MS, S_BACKOFF_CAP_MS);
        if (self->retry_attempt < 30)
            self->retry_attempt++;
        fl->requeue_at_us = cn_mono_us () + 1000LL * ms;
        self->requeue_pending++;
        CN_WARN (S_COMPONENT, self->vm ? "writer asked to retry a vm event" : "writer asked to retry sysinfo", "{s:s,s:I,s:i}",
                 "server_uuid", fl->uuid, "delivery_tag", (json_int_t) fl->dtag,
                 "requeue_ms", ms);
    }
    cn_msg_fini (&m);
}

static void
s_writer_service (self_t *self)
{
    for (int i = 0; i < S_RESULT_BUDGET; i++) {
        zframe_t *f = cn_writer_recv (self->writer, true);
        if (!f)
            break;
        s_result (self, zframe_data (f), zframe_size (f));
        zframe_destroy (&f);
    }
    s_flush_acks (self, cn_mono_us ());
}

/* Nack (requeue) the deliveries the writer asked to retry, once due. */
static void
s_requeue_due (self_t *self, int64_t now_us)
{
    if (!self->requeue_pending || !self->conn)
        return;
    zlistx_t *keys = zhashx_keys (self->flights);
    for (void *k = zlistx_first (keys); k && self->conn; k = zlistx_next (keys)) {
        s_flight_t *fl = zhashx_lookup (self->flights, k);
        if (!fl || !fl->requeue_at_us || fl->requeue_at_us > now_us)
            continue;
        uint64_t dtag = fl->dtag;
        zhashx_delete (self->flights, k);
        self->requeue_pending--;
        s_reject (self, dtag, true);
    }
    zlistx_destroy (&keys);
}

static int64_t
s_next_requeue_us (self_t *self)
{
    int64_t first = 0;
    if (!self->requeue_pending)
        return 0;
    for (s_flight_t *fl = zhashx_first (self->flights); fl; fl = zhashx_next (self->flights))
        if (fl->requeue_at_us && (!first || fl->requeue_at_us < first))
            first = fl->requeue_at_us;
    return first;
}

/* ---- commands ---- */

static zframe_t *
s_status (self_t *self)
{
    const char *state = self->state == S_CONNECTED ? "running" : s_conn_name (self->state);
    cn_msgw_t w;
    cn_msgw_init (&w, "status", self->vm ? 20 : 17);
    cn_msgw_str (&w, "actor", S_COMPONENT);
    cn_msgw_str (&w, "state", state);
    cn_msgw_str (&w, "connection", s_conn_name (self->state));
    cn_msgw_uint (&w, "received", self->received);
    cn_msgw_uint (&w, "acked", self->acked);
    cn_msgw_uint (&w, "ack_frames", self->ack_frames);
    cn_msgw_uint (&w, "rejected", self->rejected);
    cn_msgw_uint (&w, "requeued", self->requeued);
    cn_msgw_uint (&w, "in_flight", zhashx_size (self->flights));
    cn_msgw_uint (&w, "reconnects", self->reconnects);
    cn_msgw_uint (&w, "redelivered", self->redelivered);
    cn_msgw_uint (&w, "voided", self->voided);
    cn_msgw_str (&w, "last_error", self->last_error[0] ? self->last_error : NULL);
    cn_msgw_str (&w, "queue", self->vm ? self->args.vm_queue : self->cfg->amqp_queue);
    if (self->vm) {
        cn_msgw_uint (&w, "bound", zhashx_size (self->bound));
        cn_msgw_uint (&w, "binds", self->binds);
        cn_msgw_uint (&w, "unbinds", self->unbinds);
    }
    cn_msgw_int (&w, "prefetch", self->args.prefetch);
    cn_msgw_uint (&w, "generation", self->gen);
    if (self->args.url.host) {
        char broker[300];
        snprintf (broker, sizeof broker, "%s:%d", self->args.url.host, self->args.url.port);
        cn_msgw_str (&w, "broker", broker);
    }
    else
        cn_msgw_nil (&w, "broker");
    return cn_msgw_frame (&w);
}

/* START: everything that can fail on our side; the broker itself may be
 * down (we keep retrying, see STATUS), that is not a START failure. */
static const char *
s_start (self_t *self, char *err, size_t errlen)
{
    if (self->started)
        return "already started";
    const cn_config_t *cfg = self->cfg;
    char perr[256];
    if (!cfg || !cfg->amqp_url || !cfg->amqp_queue || !*cfg->amqp_queue)
        return "no amqp_url or amqp_queue configured";
    if (cn_amqp_url_parse (cfg->amqp_url, &self->args.url, perr, sizeof perr) != 0) {
        snprintf (err, errlen, "amqp_url: %s", perr);
        return err;
    }
    self->args.queue = cfg->amqp_queue;
    self->args.prefetch = cfg->amqp_prefetch < 1 ? 1
        : cfg->amqp_prefetch > 65535 ? 65535 : cfg->amqp_prefetch;
    const char *inst = cfg->instance && *cfg->instance ? cfg->instance : "cnapid";
    self->args.vm = self->vm;
    snprintf (self->args.name, sizeof self->args.name, "cnapid %s %s", inst, S_COMPONENT);
    snprintf (self->args.consumer_tag, sizeof self->args.consumer_tag, "cnapid-%s%s", inst,
              self->vm ? "-vmevents" : "");

    /* In flight is bounded by the prefetch, so no HWM is needed (and a full
     * HWM would make a DONTWAIT send fail for no good reason). */
    char werr[160];
    self->writer = cn_writer_client (cfg->writer_shards, 0, 0, werr, sizeof werr);
    if (!self->writer) {
        CN_ERROR (S_COMPONENT, "cannot reach the writer", "{s:s}", "error", werr);
        cn_amqp_url_fini (&self->args.url);
        return "cannot connect to the writer";
    }
    self->ctl = cn_ctl_bind (S_COMPONENT);
    if (!self->ctl) {
        zsock_destroy (&self->writer);
        cn_amqp_url_fini (&self->args.url);
        return "cannot bind the control socket";
    }
    self->started = true;
    if (!self->vm)
        cn_health_set ("amqp", false);
    s_start_connect (self);
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
    if (!cmd) {
        zmsg_destroy (&msg);
        return;
    }
    if (streq (cmd, "$TERM"))
        self->terminated = true;
    else if (streq (cmd, "START")) {
        char buf[320];
        const char *err = s_start (self, buf, sizeof buf);
        if (err) {
            CN_ERROR (S_COMPONENT, "failed to start", "{s:s}", "error", err);
            zstr_sendx (self->pipe, "ERROR", err, NULL);
        }
        else
            zstr_send (self->pipe, "OK");
    }
    else if (streq (cmd, "STATUS")) {
        zframe_t *f = s_status (self);
        zframe_send (&f, self->pipe, 0);
    }
    else if (self->vm && (streq (cmd, "BIND") || streq (cmd, "UNBIND"))) {
        char *uuid = zmsg_popstr (msg);
        bool bind = streq (cmd, "BIND");
        if (uuid && strlen (uuid) == 36) {
            bool had = zhashx_lookup (self->bound, uuid) != NULL;
            if (bind && !had)
                zhashx_insert (self->bound, uuid, (void *) 1);
            else if (!bind && had)
                zhashx_delete (self->bound, uuid);
            /* while not connected, the next connection binds the set */
            if (bind != had && self->conn)
                (void) s_bind (self, uuid, bind);
        }
        zstr_free (&uuid);
    }
    else
        CN_WARN (S_COMPONENT, "unknown pipe command ignored", "{s:s}", "command", cmd);
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

/* ---- the loop ---- */

static long
s_poll_timeout_ms (self_t *self, int64_t now_us)
{
    if (s_amqp_buffered (self))
        return 0;
    int64_t until = now_us + 1000LL * S_TICK_MS;
    if (self->conn && self->next_tick_us < until)
        until = self->next_tick_us;
    if (self->state == S_BACKOFF && self->retry_at_us < until)
        until = self->retry_at_us;
    int64_t rq = s_next_requeue_us (self);
    if (rq && rq < until)
        until = rq;
    if (self->nackq && self->ackq_since_us + S_ACK_DEFER_US < until)
        until = self->ackq_since_us + S_ACK_DEFER_US;
    if (until <= now_us)
        return 0;
    return (long) ((until - now_us + 999) / 1000);
}

static void s_run (self_t *self);

void
cn_listener_actor (zsock_t *pipe, void *args)
{
    cn_thread_name ("listener");
    self_t *self = s_new (pipe, (const cn_config_t *) args);
    zsock_signal (pipe, 0);
    s_run (self);
}

void
cn_vmevents_actor (zsock_t *pipe, void *args)
{
    cn_thread_name ("vmevents");
    self_t *self = s_new (pipe, ((const cn_vmevents_args_t *) args)->cfg);
    self->vm = true;
    self->bound = zhashx_new ();
    assert (self->bound);
    zsock_signal (pipe, 0);
    s_run (self);
}

static void
s_run (self_t *self)
{
    zsock_t *pipe = self->pipe;

    while (!self->terminated) {
        zmq_pollitem_t items[5];
        int n = 0, i_pipe, i_ctl = -1, i_writer = -1, i_conn = -1, i_amqp = -1;
        i_pipe = n;
        items[n++] = (zmq_pollitem_t) { zsock_resolve (pipe), 0, ZMQ_POLLIN, 0 };
        if (self->ctl) {
            i_ctl = n;
            items[n++] = (zmq_pollitem_t) { zsock_resolve (self->ctl), 0, ZMQ_POLLIN, 0 };
        }
        if (self->writer) {
            i_writer = n;
            items[n++] = (zmq_pollitem_t) { zsock_resolve (self->writer), 0, ZMQ_POLLIN, 0 };
        }
        if (self->connector) {
            i_conn = n;
            items[n++] = (zmq_pollitem_t) { zsock_resolve (self->connector), 0, ZMQ_POLLIN, 0 };
        }
        if (self->conn && self->fd >= 0) {
            i_amqp = n;
            items[n++] = (zmq_pollitem_t) { NULL, self->fd, ZMQ_POLLIN, 0 };
        }
        long timeout = s_poll_timeout_ms (self, cn_mono_us ());
        int rc = zmq_poll (items, n, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            break;                /* ETERM: the context is going away */
        }
        if (items[i_pipe].revents & ZMQ_POLLIN)
            s_pipe_command (self);
        if (self->terminated)
            break;
        if (i_ctl >= 0 && (items[i_ctl].revents & ZMQ_POLLIN))
            s_ctl_command (self);
        if (i_conn >= 0 && (items[i_conn].revents & ZMQ_POLLIN))
            s_connector_done (self);
        if (i_writer >= 0 && (items[i_writer].revents & ZMQ_POLLIN))
            s_writer_service (self);

        int64_t now = cn_mono_us ();
        bool readable = i_amqp >= 0 && (items[i_amqp].revents & (ZMQ_POLLIN | ZMQ_POLLERR));
        if (self->conn && (readable || s_amqp_buffered (self) || now >= self->next_tick_us)) {
            s_amqp_service (self);
            self->next_tick_us = now + 1000LL * S_TICK_MS;
        }
        s_requeue_due (self, now);
        if (self->nackq && now >= self->ackq_since_us + S_ACK_DEFER_US)
            s_flush_acks (self, now);
        if (self->state == S_BACKOFF && now >= self->retry_at_us)
            s_start_connect (self);
    }

    /* Leave: a connect in progress finishes (bounded) and is closed by the
     * helper; our own connection is closed politely, which makes the broker
     * requeue whatever is still unacked. */
    zactor_destroy (&self->connector);
    if (self->conn) {
        CN_INFO (S_COMPONENT, "closing broker connection", "{s:I}",
                 "in_flight", (json_int_t) zhashx_size (self->flights));
        cn_amqp_close (&self->conn);
    }
    if (self->started && !self->vm)
        cn_health_set ("amqp", false);
    zhashx_destroy (&self->flights);
    free (self->ackq);
    zhashx_destroy (&self->bound);
    zsock_destroy (&self->ctl);
    zsock_destroy (&self->writer);
    cn_amqp_url_fini (&self->args.url);
    free (self->buf);
    free (self);
}
