/*
 * cn_amqp: shared AMQP setup and delivery helpers. See include/cn_amqp.h.
 *
 * librabbitmq 0.11 sockets are non-blocking inside the library: every wait
 * is a poll with a deadline. We set the handshake and RPC timeouts on each
 * connection so that login, declare, bind, qos, consume and close can never
 * block longer than the caller's timeout (an RPC that times out closes the
 * socket, which is what we want: the caller drops the connection).
 */
#include "cn_amqp.h"

#include "cn_util.h"

#include <amqp_tcp_socket.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

const char *const cn_amqp_sysinfo_keys[] = { "ur.sysinfo.#", "ur.startup.#", NULL };

/* A source time outside (0, year 3000) is not a time we trust. */
#define S_MAX_PLAUSIBLE_MS INT64_C(32503680000000)

int
cn_amqp_url_parse (const char *url, cn_amqp_url_t *u, char *err, size_t errlen)
{
    memset (u, 0, sizeof *u);
    if (!url || !*url) {
        snprintf (err, errlen, "empty AMQP URL");
        return -1;
    }
    /* amqp_parse_url rewrites its input in place and points into it. */
    char *copy = strdup (url);
    if (!copy) {
        snprintf (err, errlen, "out of memory");
        return -1;
    }
    struct amqp_connection_info ci;
    amqp_default_connection_info (&ci);
    int rc = amqp_parse_url (copy, &ci);
    if (rc != AMQP_STATUS_OK) {
        free (copy);
        snprintf (err, errlen, "bad AMQP URL (expected amqp://user:pass@host:port/vhost)");
        return -1;
    }
    if (ci.ssl) {
        free (copy);
        snprintf (err, errlen, "amqps:// is not supported");
        return -1;
    }
    if (ci.port <= 0 || ci.port > 65535 || !ci.host || !*ci.host) {
        free (copy);
        snprintf (err, errlen, "bad AMQP URL: no host or bad port");
        return -1;
    }
    u->host = strdup (ci.host);
    u->port = ci.port;
    u->user = strdup (ci.user ? ci.user : "guest");
    u->password = strdup (ci.password ? ci.password : "guest");
    /* RFC-wise "amqp://h/" names the vhost "", which no RabbitMQ has by
     * default; it is nearly always a typo for the default vhost. */
    u->vhost = strdup (ci.vhost && *ci.vhost ? ci.vhost : "/");
    free (copy);
    if (!u->host || !u->user || !u->password || !u->vhost) {
        cn_amqp_url_fini (u);
        snprintf (err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

void
cn_amqp_url_fini (cn_amqp_url_t *u)
{
    if (!u)
        return;
    free (u->host);
    free (u->user);
    if (u->password)
        memset (u->password, 0, strlen (u->password));
    free (u->password);
    free (u->vhost);
    memset (u, 0, sizeof *u);
}

const char *
cn_amqp_reply_str (amqp_rpc_reply_t r, const char *what, char *buf, size_t len)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        snprintf (buf, len, "%s: ok", what);
        break;
    case AMQP_RESPONSE_NONE:
        snprintf (buf, len, "%s: no reply", what);
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf (buf, len, "%s: %s", what, amqp_error_string2 (r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD && r.reply.decoded) {
            const amqp_connection_close_t *m = r.reply.decoded;
            snprintf (buf, len, "%s: connection closed by broker: %u %.*s", what,
                      m->reply_code, (int) m->reply_text.len,
                      (const char *) m->reply_text.bytes);
        }
        else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD && r.reply.decoded) {
            const amqp_channel_close_t *m = r.reply.decoded;
            snprintf (buf, len, "%s: channel closed by broker: %u %.*s", what,
                      m->reply_code, (int) m->reply_text.len,
                      (const char *) m->reply_text.bytes);
        }
        else
            snprintf (buf, len, "%s: unexpected broker method 0x%08x", what,
                      (unsigned) r.reply.id);
        break;
    default:
        snprintf (buf, len, "%s: unknown reply type", what);
    }
    return buf;
}

/* Fill err from the connection's last RPC reply; -1 unless it was normal. */
static int
s_check (amqp_connection_state_t c, const char *what, char *err, size_t errlen)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    cn_amqp_reply_str (r, what, err, errlen);
    return -1;
}

/* The reply code of a channel.close in the last reply, or 0. */
static int
s_channel_close_code (amqp_connection_state_t c)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION
        && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD && r.reply.decoded)
        return ((const amqp_channel_close_t *) r.reply.decoded)->reply_code;
    return 0;
}

/* After the broker closed our channel: confirm, and open it again. */
static int
s_reopen_channel (amqp_connection_state_t c, char *err, size_t errlen)
{
    amqp_channel_close_ok_t ok = { 0 };
    int rc = amqp_send_method (c, CN_AMQP_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
    if (rc != AMQP_STATUS_OK) {
        snprintf (err, errlen, "channel.close-ok: %s", amqp_error_string2 (rc));
        return -1;
    }
    amqp_channel_open (c, CN_AMQP_CHANNEL);
    return s_check (c, "channel.open", err, errlen);
}

amqp_connection_state_t
cn_amqp_connect (const cn_amqp_url_t *u, int timeout_ms, int heartbeat_s,
                 const char *name, char *err, size_t errlen)
{
    struct timeval tv = { .tv_sec = timeout_ms / 1000,
                          .tv_usec = (timeout_ms % 1000) * 1000 };
    amqp_connection_state_t c = amqp_new_connection ();
    if (!c) {
        snprintf (err, errlen, "out of memory");
        return NULL;
    }
    amqp_socket_t *sock = amqp_tcp_socket_new (c);
    if (!sock) {
        snprintf (err, errlen, "cannot create a TCP socket");
        amqp_destroy_connection (c);
        return NULL;
    }
    int rc = amqp_socket_open_noblock (sock, u->host, u->port, &tv);
    if (rc != AMQP_STATUS_OK) {
        /* For a refused connection librabbitmq says "a socket error
         * occurred" (the real error stays in SO_ERROR of a closed socket). */
        snprintf (err, errlen, "connect to %s:%d: %s", u->host, u->port,
                  amqp_error_string2 (rc));
        amqp_destroy_connection (c);
        return NULL;
    }
    amqp_set_handshake_timeout (c, &tv);
    amqp_set_rpc_timeout (c, &tv);

    /* consumer_cancel_notify: without it a deleted queue silently leaves us
     * a consumer of nothing; with it the broker sends basic.cancel.
     * connection.blocked: publishers learn about resource alarms. librabbitmq
     * merges these into its default capabilities. */
    amqp_table_entry_t caps[2];
    caps[0].key = amqp_cstring_bytes ("consumer_cancel_notify");
    caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[0].value.value.boolean = 1;
    caps[1].key = amqp_cstring_bytes ("connection.blocked");
    caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[1].value.value.boolean = 1;
    amqp_table_entry_t props[2];
    amqp_table_t ptable = { .num_entries = 1, .entries = props };
    props[0].key = amqp_cstring_bytes ("capabilities");
    props[0].value.kind = AMQP_FIELD_KIND_TABLE;
    props[0].value.value.table.num_entries = 2;
    props[0].value.value.table.entries = caps;
    if (name) {
        props[1].key = amqp_cstring_bytes ("connection_name");
        props[1].value.kind = AMQP_FIELD_KIND_UTF8;
        props[1].value.value.bytes = amqp_cstring_bytes (name);
        ptable.num_entries = 2;
    }
    amqp_rpc_reply_t r = amqp_login_with_properties (
        c, u->vhost, 0, AMQP_DEFAULT_FRAME_SIZE, heartbeat_s, &ptable,
        AMQP_SASL_METHOD_PLAIN, u->user, u->password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        cn_amqp_reply_str (r, "login", err, errlen);
        amqp_destroy_connection (c);
        return NULL;
    }
    amqp_channel_open (c, CN_AMQP_CHANNEL);
    if (s_check (c, "channel.open", err, errlen) != 0) {
        amqp_destroy_connection (c);
        return NULL;
    }
    return c;
}

static int
s_declare (amqp_connection_state_t c, const char *queue, bool passive,
           cn_amqp_qtype_t type, char *err, size_t errlen)
{
    amqp_table_entry_t args[1];
    amqp_table_t table = { .num_entries = 0, .entries = args };
    if (!passive && type == CN_AMQP_QUEUE_QUORUM) {
        args[0].key = amqp_cstring_bytes ("x-queue-type");
        args[0].value.kind = AMQP_FIELD_KIND_UTF8;
        args[0].value.value.bytes = amqp_cstring_bytes ("quorum");
        table.num_entries = 1;
    }
    amqp_queue_declare (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue), passive,
                        /* durable */ 1, /* exclusive */ 0, /* auto_delete */ 0, table);
    return s_check (c, passive ? "queue.declare (passive)" : "queue.declare",
                    err, errlen);
}

int
cn_amqp_queue_declare (amqp_connection_state_t c, const char *queue,
                       cn_amqp_qtype_t type, const char *const *keys,
                       char *err, size_t errlen)
{
    if (type == CN_AMQP_QUEUE_AUTO) {
        if (s_declare (c, queue, true, type, err, errlen) != 0) {
            if (s_channel_close_code (c) != AMQP_NOT_FOUND)
                return -1;
            /* Not there yet: create it as a quorum queue. */
            if (s_reopen_channel (c, err, errlen) != 0)
                return -1;
            if (s_declare (c, queue, false, CN_AMQP_QUEUE_QUORUM, err, errlen) != 0) {
                if (s_channel_close_code (c) != AMQP_PRECONDITION_FAILED)
                    return -1;
                /* Either another instance created it meanwhile with other
                 * arguments (use it), or this broker has no quorum queues
                 * (create a classic one). */
                if (s_reopen_channel (c, err, errlen) != 0)
                    return -1;
                if (s_declare (c, queue, true, type, err, errlen) != 0) {
                    if (s_channel_close_code (c) != AMQP_NOT_FOUND
                        || s_reopen_channel (c, err, errlen) != 0
                        || s_declare (c, queue, false, CN_AMQP_QUEUE_CLASSIC,
                                      err, errlen) != 0)
                        return -1;
                }
            }
        }
    }
    else if (s_declare (c, queue, false, type, err, errlen) != 0)
        return -1;

    for (size_t i = 0; keys && keys[i]; i++) {
        amqp_queue_bind (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue),
                         amqp_cstring_bytes (CN_AMQP_EXCHANGE),
                         amqp_cstring_bytes (keys[i]), amqp_empty_table);
        if (s_check (c, "queue.bind", err, errlen) != 0)
            return -1;
    }
    return 0;
}

int
cn_amqp_queue_declare_private (amqp_connection_state_t c, const char *queue,
                               char *err, size_t errlen)
{
    amqp_queue_declare (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue), /* passive */ 0,
                        /* durable */ 0, /* exclusive */ 1, /* auto_delete */ 1,
                        amqp_empty_table);
    return s_check (c, "queue.declare", err, errlen);
}

int
cn_amqp_bind (amqp_connection_state_t c, const char *queue, const char *key, bool bind,
              char *err, size_t errlen)
{
    if (bind)
        amqp_queue_bind (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue),
                         amqp_cstring_bytes (CN_AMQP_EXCHANGE), amqp_cstring_bytes (key),
                         amqp_empty_table);
    else
        amqp_queue_unbind (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue),
                           amqp_cstring_bytes (CN_AMQP_EXCHANGE), amqp_cstring_bytes (key),
                           amqp_empty_table);
    return s_check (c, bind ? "queue.bind" : "queue.unbind", err, errlen);
}

int
cn_amqp_consume (amqp_connection_state_t c, const char *queue, int prefetch,
                 const char *consumer_tag, char *err, size_t errlen)
{
    if (prefetch < 1)
        prefetch = 1;
    if (prefetch > 65535)
        prefetch = 65535;
    amqp_basic_qos (c, CN_AMQP_CHANNEL, 0, (uint16_t) prefetch, /* global */ 0);
    if (s_check (c, "basic.qos", err, errlen) != 0)
        return -1;
    amqp_basic_consume (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue),
                        consumer_tag ? amqp_cstring_bytes (consumer_tag) : amqp_empty_bytes,
                        /* no_local */ 0, /* no_ack */ 0, /* exclusive */ 0,
                        amqp_empty_table);
    return s_check (c, "basic.consume", err, errlen);
}

void
cn_amqp_close (amqp_connection_state_t *cp)
{
    if (!cp || !*cp)
        return;
    amqp_connection_state_t c = *cp;
    /* Each RPC is bounded by the RPC timeout set in cn_amqp_connect; a failed
     * channel close still lets us try the connection close. */
    amqp_channel_close (c, CN_AMQP_CHANNEL, AMQP_REPLY_SUCCESS);
    amqp_connection_close (c, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection (c);
    *cp = NULL;
}

void
cn_amqp_destroy (amqp_connection_state_t *cp)
{
    if (!cp || !*cp)
        return;
    amqp_destroy_connection (*cp);
    *cp = NULL;
}

bool
cn_amqp_rk_uuid (const char *rk, size_t len, char out[37])
{
    static const char *const prefixes[] = { "ur.startup.", "ur.sysinfo." };
    if (!rk)
        return false;
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        size_t plen = strlen (prefixes[i]);
        if (len < plen + 36 || memcmp (rk, prefixes[i], plen) != 0)
            continue;
        const char *u = rk + plen;
        size_t rest = len - plen - 36;
        /* Exactly the UUID, or the UUID then "." and a non-empty id. */
        if (rest != 0 && (rest < 2 || u[36] != '.'))
            return false;
        char buf[37];
        memcpy (buf, u, 36);
        buf[36] = '\0';
        return cn_uuid_normalize (buf, out);
    }
    return false;
}

static bool
s_plausible (int64_t ms)
{
    return ms > 0 && ms < S_MAX_PLAUSIBLE_MS;
}

/* A header value as ms; false when it is not a usable number. */
static bool
s_field_ms (const amqp_field_value_t *v, int64_t *out)
{
    int64_t ms;
    switch (v->kind) {
    case AMQP_FIELD_KIND_I8:  ms = v->value.i8; break;
    case AMQP_FIELD_KIND_U8:  ms = v->value.u8; break;
    case AMQP_FIELD_KIND_I16: ms = v->value.i16; break;
    case AMQP_FIELD_KIND_U16: ms = v->value.u16; break;
    case AMQP_FIELD_KIND_I32: ms = v->value.i32; break;
    case AMQP_FIELD_KIND_U32: ms = v->value.u32; break;
    case AMQP_FIELD_KIND_I64: ms = v->value.i64; break;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP:
        if (v->value.u64 > (uint64_t) INT64_MAX)
            return false;
        ms = (int64_t) v->value.u64;
        break;
    case AMQP_FIELD_KIND_F32:
    case AMQP_FIELD_KIND_F64: {
        double d = v->kind == AMQP_FIELD_KIND_F32 ? v->value.f32 : v->value.f64;
        if (!isfinite (d) || d <= 0 || d >= (double) S_MAX_PLAUSIBLE_MS)
            return false;
        ms = (int64_t) d;
        break;
    }
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
        /* A plain decimal number: 1..18 digits, nothing else. */
        const char *s = v->value.bytes.bytes;
        size_t n = v->value.bytes.len;
        if (n == 0 || n > 18 || !s)
            return false;
        ms = 0;
        for (size_t i = 0; i < n; i++) {
            if (!isdigit ((unsigned char) s[i]))
                return false;
            ms = ms * 10 + (s[i] - '0');
        }
        break;
    }
    default:
        return false;
    }
    if (!s_plausible (ms))
        return false;
    *out = ms;
    return true;
}

bool
cn_amqp_sent_ms (const amqp_basic_properties_t *p, int64_t *out)
{
    if (!p)
        return false;
    if ((p->_flags & AMQP_BASIC_HEADERS_FLAG) && p->headers.entries) {
        size_t klen = strlen (CN_AMQP_SENT_MS_HEADER);
        for (int i = 0; i < p->headers.num_entries; i++) {
            const amqp_table_entry_t *e = &p->headers.entries[i];
            if (e->key.len == klen && memcmp (e->key.bytes, CN_AMQP_SENT_MS_HEADER, klen) == 0) {
                if (s_field_ms (&e->value, out))
                    return true;
                break;            /* a bad header: fall back to timestamp */
            }
        }
    }
    if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG) {
        if (p->timestamp <= (uint64_t) (S_MAX_PLAUSIBLE_MS / 1000)) {
            int64_t ms = (int64_t) p->timestamp * 1000;
            if (s_plausible (ms)) {
                *out = ms;
                return true;
            }
        }
    }
    return false;
}
