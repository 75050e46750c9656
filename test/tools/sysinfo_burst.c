/*
 * sysinfo-burst: a fast, real AMQP publisher of SmartOS-like sysinfo for
 * tests, the demo and benchmarks; and the raw RabbitMQ baseline.
 *
 *   sysinfo-burst --url AMQP_URL --servers N --messages M [--size BYTES]
 *                 [--prefix HEX8] [--confirm-window W] [--startup]
 *                 [--setup] [--queue Q] [--rate MSG_PER_S] [--json-summary]
 *   sysinfo-burst --url AMQP_URL --bench-raw --messages M [--size BYTES]
 *                 [--queue-type classic|quorum] [--prefetch P] [--json-summary]
 *
 * Publish mode: M persistent messages on amq.topic, round-robin over N
 * servers. Server i (0-based) has UUID <prefix>-0000-4000-8000-<i as 12 hex
 * digits> and hostname cn-<i>; its k-th message (1-based) carries
 * "Burst Sequence": k, the header sent_ms (publish time in ms, strictly
 * increasing per server) and the routing key ur.sysinfo.<uuid>.<k>
 * (ur.startup.<uuid> for k = 1 with --startup). Publisher confirms with at
 * most W unconfirmed messages; messages are published mandatory, so an
 * unroutable one comes back. Exit 1 if any message is nacked or returned or
 * the connection fails; 2 on bad usage. --queue Q first declares the sysinfo
 * queue Q and its bindings exactly as cnapid does (so messages published
 * before any cnapid runs are kept).
 *
 * Bench mode (--bench-raw): publish M persistent messages of --size bytes
 * to a scratch queue with confirms, then consume them with manual acks (one
 * basic.ack per message, prefetch P, default 1000), as the listener does, and
 * print both rates. The scratch queue is deleted at the end.
 *
 * Summary on stdout: "published M messages for N servers in S s (R msg/s)",
 * and with --json-summary one JSON line {published, seconds, rate, ...}.
 */
#include "cn_amqp.h"

#include "cn_util.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <time.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#define S_TIMEOUT_MS 10000        /* connect and RPCs */
#define S_WAIT_S 30               /* no confirm/delivery for this long: give up */

typedef struct {
    const char *url;
    long servers;
    long messages;
    long size;
    const char *prefix;
    long window;
    bool startup;
    bool setup;
    bool json;
    const char *queue;
    bool bench_raw;
    cn_amqp_qtype_t qtype;
    long prefetch;
    long rate;                /* messages per second, 0 = as fast as possible */
} s_opts_t;

typedef struct {
    amqp_connection_state_t conn;
    uint64_t published;       /* = last delivery tag used */
    uint64_t confirmed;       /* acked + nacked */
    uint64_t nacked;
    uint64_t returned;
    unsigned char *done;      /* per delivery tag: confirmed yet? */
    uint64_t low;             /* every tag below this is confirmed */
    /* skipping the content of a basic.return */
    bool in_return;
    bool return_header;
    uint64_t return_left;
    char error[512];
} s_pub_t;

static double
s_now_s (void)
{
    return cn_mono_us () / 1e6;
}

static void
s_usage (FILE *f)
{
    fprintf (f,
             "usage: sysinfo-burst --url AMQP_URL --servers N --messages M [--size BYTES]\n"
             "                     [--prefix HEX8] [--confirm-window W] [--startup] [--setup]\n"
             "                     [--queue Q] [--rate MSG_PER_S] [--json-summary]\n"
             "       sysinfo-burst --url AMQP_URL --bench-raw --messages M [--size BYTES]\n"
             "                     [--queue-type classic|quorum] [--prefetch P] [--json-summary]\n");
}

/* ---- sysinfo bodies ---- */

static void
s_uuid (const s_opts_t *o, long i, char out[37])
{
    /* i < 10^8 (checked in main), so 12 hex digits always suffice. */
    char tmp[64];
    snprintf (tmp, sizeof tmp, "%.8s-0000-4000-8000-%012lx", o->prefix,
              (unsigned long) i & 0xffffffffffffUL);
    memcpy (out, tmp, 36);
    out[36] = '\0';
}

/* Append printf output to buf (len so far in *n, capacity cap); false when full. */
static bool __attribute__ ((format (printf, 4, 5)))
s_add (char *buf, size_t *n, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start (ap, fmt);
    int w = vsnprintf (buf + *n, cap - *n, fmt, ap);
    va_end (ap);
    if (w < 0 || (size_t) w >= cap - *n)
        return false;
    *n += (size_t) w;
    return true;
}

/* A SmartOS-like sysinfo of about o->size bytes for server i, message k.
 * Returns its length, or 0 when buf is too small. */
static size_t
s_sysinfo (const s_opts_t *o, long i, long k, char *buf, size_t cap)
{
    char uuid[37];
    s_uuid (o, i, uuid);
    unsigned long v = (unsigned long) i + 1;
    size_t n = 0;
    bool ok = s_add (buf, &n, cap,
        "{\"Live Image\":\"20240307T000447Z\",\"System Type\":\"SunOS\","
        "\"Boot Time\":\"%ld\",\"Datacenter Name\":\"dc1\",\"SDC Version\":\"7.0\","
        "\"Manufacturer\":\"Joyent\",\"Product\":\"Joyent-Compute-Platform-3302\","
        "\"Serial Number\":\"JPC%08lX\",\"SKU Number\":\"600-0042-01 Rev 1\","
        "\"HW Version\":\"S2600WF\",\"HW Family\":\"Joyent-Compute-Platform\","
        "\"Setup\":\"%s\",\"VM Capable\":true,\"Bhyve Capable\":true,"
        "\"Bhyve Max Vcpus\":96,\"HVM API\":true,"
        "\"CPU Type\":\"Intel(R) Xeon(R) Gold 6252 CPU @ 2.10GHz\","
        "\"CPU Virtualization\":\"vmx\",\"CPU Physical Cores\":2,"
        "\"UUID\":\"%s\",\"Hostname\":\"cn-%ld\",\"CPU Total Cores\":96,"
        "\"MiB of Memory\":\"392931\",\"Zpool\":\"zones\","
        "\"Zpool Disks\":\"c0t5000CCA0AB12C3D4d0,c0t5000CCA0AB12C3D5d0\","
        "\"Zpool Profile\":\"mirror\",\"Zpool Creation\":%ld,\"Zpool Size in GiB\":14208,"
        "\"Boot Parameters\":{\"rabbitmq\":\"guest:guest:rabbitmq.dc1.example.com:5672\","
        "\"rabbitmq_dns\":\"guest:guest:rabbitmq.dc1.example.com:5672\","
        "\"console\":\"ttyb\",\"ttyb-mode\":\"115200,8,n,1,-\",\"headnode\":\"false\","
        "\"boot_args\":\"\",\"bootargs\":\"\"},"
        "\"SDC Agents\":[{\"name\":\"cn-agent\",\"version\":\"2.13.1\"},"
        "{\"name\":\"vm-agent\",\"version\":\"1.10.0\"},"
        "{\"name\":\"net-agent\",\"version\":\"2.4.0\"},"
        "{\"name\":\"config-agent\",\"version\":\"1.11.0\"}],"
        "\"Network Interfaces\":{\"ixgbe0\":{\"MAC Address\":\"02:08:20:%02lx:%02lx:%02lx\","
        "\"ip4addr\":\"10.%lu.%lu.%lu\",\"Link Status\":\"up\",\"NIC Names\":[\"admin\"]},"
        "\"ixgbe1\":{\"MAC Address\":\"02:08:21:%02lx:%02lx:%02lx\",\"ip4addr\":\"\","
        "\"Link Status\":\"up\",\"NIC Names\":[\"external\"]}},"
        "\"Virtual Network Interfaces\":{},\"Link Aggregations\":{},"
        "\"Admin NIC Tag\":\"admin\",\"CN Agent Port\":5309,"
        "\"Burst Sequence\":%ld,\"Disks\":{",
        1709769600L + (long) (i % 86400), (unsigned long) i, o->setup ? "true" : "false",
        uuid, i, 1546300800L + (long) (i % 100000),
        (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff,
        (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff,
        (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff, k);
    if (!ok)
        return 0;
    /* Realistic padding: disks, until the next one would pass the size. */
    const size_t tail = 2;    /* "}}" */
    for (int d = 0;; d++) {
        char disk[160];
        int w = snprintf (disk, sizeof disk,
                          "%s\"c0t5000CCA0%08lX%04Xd0\":{\"Size in GB\":4000,"
                          "\"PID\":\"HUS726040ALS210\",\"VID\":\"HGST\",\"SSD\":false}",
                          d ? "," : "", (unsigned long) i, d);
        if (n + (size_t) w + tail > (size_t) o->size && d >= 1)
            break;
        if (!s_add (buf, &n, cap, "%s", disk))
            return 0;
    }
    /* Whitespace makes up the rest, as a pretty-printer's would. */
    while (n + tail < (size_t) o->size && n + tail + 1 < cap)
        buf[n++] = ' ';
    if (!s_add (buf, &n, cap, "}}"))
        return 0;
    return n;
}

/* ---- publisher confirms ---- */

static void
s_confirm (s_pub_t *p, uint64_t tag, bool multiple, bool nack)
{
    if (tag == 0 || tag > p->published)
        return;
    uint64_t from = multiple ? p->low : tag;
    for (uint64_t t = from; t <= tag; t++) {
        if (!p->done[t]) {
            p->done[t] = 1;
            p->confirmed++;
            if (nack)
                p->nacked++;
        }
    }
    while (p->low <= p->published && p->done[p->low])
        p->low++;
}

/* Handle one incoming frame. false on a fatal event (error filled). */
static bool
s_pub_frame (s_pub_t *p, const amqp_frame_t *fr)
{
    if (p->in_return) {
        if (fr->frame_type == AMQP_FRAME_HEADER && p->return_header) {
            p->return_header = false;
            p->return_left = fr->payload.properties.body_size;
            p->in_return = p->return_left > 0;
            return true;
        }
        if (fr->frame_type == AMQP_FRAME_BODY && !p->return_header) {
            size_t n = fr->payload.body_fragment.len;
            p->return_left = n >= p->return_left ? 0 : p->return_left - n;
            p->in_return = p->return_left > 0;
            return true;
        }
    }
    if (fr->frame_type != AMQP_FRAME_METHOD)
        return true;
    switch (fr->payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *m = fr->payload.method.decoded;
        s_confirm (p, m->delivery_tag, m->multiple, false);
        return true;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *m = fr->payload.method.decoded;
        s_confirm (p, m->delivery_tag, m->multiple, true);
        return true;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        const amqp_basic_return_t *m = fr->payload.method.decoded;
        if (p->returned == 0)
            fprintf (stderr, "sysinfo-burst: message returned: %u %.*s (routing key %.*s)\n",
                     m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes,
                     (int) m->routing_key.len, (char *) m->routing_key.bytes);
        p->returned++;
        p->in_return = true;
        p->return_header = true;
        return true;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *m = fr->payload.method.decoded;
        snprintf (p->error, sizeof p->error, "channel closed by broker: %u %.*s",
                  m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes);
        return false;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        const amqp_connection_close_t *m = fr->payload.method.decoded;
        snprintf (p->error, sizeof p->error, "connection closed by broker: %u %.*s",
                  m->reply_code, (int) m->reply_text.len, (char *) m->reply_text.bytes);
        return false;
    }
    default:
        return true;
    }
}

/* Read frames: all that are ready, or (wait) at least one within S_WAIT_S. */
static bool
s_pub_read (s_pub_t *p, bool wait)
{
    struct timeval zero = { 0, 0 }, patience = { S_WAIT_S, 0 };
    bool first = true;
    while (true) {
        amqp_frame_t fr;
        int rc = amqp_simple_wait_frame_noblock (p->conn, &fr,
                                                 wait && first ? &patience : &zero);
        if (rc == AMQP_STATUS_TIMEOUT) {
            if (wait && first) {
                snprintf (p->error, sizeof p->error, "no publisher confirm for %d s", S_WAIT_S);
                return false;
            }
            break;
        }
        if (rc != AMQP_STATUS_OK) {
            snprintf (p->error, sizeof p->error, "%s", amqp_error_string2 (rc));
            return false;
        }
        first = false;
        if (!s_pub_frame (p, &fr))
            return false;
    }
    if (!p->in_return) {
        amqp_maybe_release_buffers_on_channel (p->conn, CN_AMQP_CHANNEL);
        amqp_maybe_release_buffers_on_channel (p->conn, 0);
    }
    return true;
}

static bool
s_pub_init (s_pub_t *p, amqp_connection_state_t c, long messages)
{
    memset (p, 0, sizeof *p);
    p->conn = c;
    p->low = 1;
    p->done = calloc ((size_t) messages + 2, 1);
    if (!p->done)
        return false;
    amqp_confirm_select (c, CN_AMQP_CHANNEL);
    amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        cn_amqp_reply_str (r, "confirm.select", p->error, sizeof p->error);
        return false;
    }
    return true;
}

/* Publish one message, keeping at most window unconfirmed. */
static bool
s_publish (s_pub_t *p, long window, const char *exchange, const char *rk,
           const char *body, size_t len, int64_t sent_ms)
{
    while (p->published - p->confirmed >= (uint64_t) window)
        if (!s_pub_read (p, true))
            return false;
    amqp_table_entry_t h[1];
    h[0].key = amqp_cstring_bytes (CN_AMQP_SENT_MS_HEADER);
    h[0].value.kind = AMQP_FIELD_KIND_I64;
    h[0].value.value.i64 = sent_ms;
    amqp_basic_properties_t props;
    memset (&props, 0, sizeof props);
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG
        | AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_TIMESTAMP_FLAG;
    props.content_type = amqp_cstring_bytes ("application/json");
    props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    props.headers.num_entries = 1;
    props.headers.entries = h;
    props.timestamp = (uint64_t) (sent_ms / 1000);
    amqp_bytes_t b = { .len = len, .bytes = (void *) body };
    int rc = amqp_basic_publish (p->conn, CN_AMQP_CHANNEL, amqp_cstring_bytes (exchange),
                                 amqp_cstring_bytes (rk), /* mandatory */ 1,
                                 /* immediate */ 0, &props, b);
    if (rc != AMQP_STATUS_OK) {
        snprintf (p->error, sizeof p->error, "basic.publish: %s", amqp_error_string2 (rc));
        return false;
    }
    p->published++;
    /* Take the confirms that are already here so the window keeps moving. */
    if (amqp_data_in_buffer (p->conn) || amqp_frames_enqueued (p->conn)
        || (p->published & 63) == 0)
        return s_pub_read (p, false);
    return true;
}

static bool
s_pub_finish (s_pub_t *p)
{
    while (p->confirmed < p->published)
        if (!s_pub_read (p, true))
            return false;
    /* A return precedes its ack; it may still be in the buffer. */
    return s_pub_read (p, false);
}

/* ---- modes ---- */

static amqp_connection_state_t
s_connect (const s_opts_t *o)
{
    char err[512];
    cn_amqp_url_t u;
    if (cn_amqp_url_parse (o->url, &u, err, sizeof err) != 0) {
        fprintf (stderr, "sysinfo-burst: %s\n", err);
        return NULL;
    }
    amqp_connection_state_t c = cn_amqp_connect (&u, S_TIMEOUT_MS, 0, "sysinfo-burst",
                                                 err, sizeof err);
    cn_amqp_url_fini (&u);
    if (!c)
        fprintf (stderr, "sysinfo-burst: %s\n", err);
    return c;
}

static int
s_burst (const s_opts_t *o)
{
    amqp_connection_state_t c = s_connect (o);
    if (!c)
        return 1;
    char err[512];
    if (o->queue && cn_amqp_queue_declare (c, o->queue, CN_AMQP_QUEUE_AUTO,
                                           cn_amqp_sysinfo_keys, err, sizeof err) != 0) {
        fprintf (stderr, "sysinfo-burst: %s\n", err);
        cn_amqp_destroy (&c);
        return 1;
    }
    s_pub_t p;
    if (!s_pub_init (&p, c, o->messages)) {
        fprintf (stderr, "sysinfo-burst: %s\n", p.error[0] ? p.error : "out of memory");
        free (p.done);
        cn_amqp_destroy (&c);
        return 1;
    }
    size_t cap = (size_t) o->size + 8192;
    char *body = malloc (cap);
    int64_t *last_sent = calloc ((size_t) o->servers, sizeof *last_sent);
    long *seq = calloc ((size_t) o->servers, sizeof *seq);
    if (!body || !last_sent || !seq) {
        fprintf (stderr, "sysinfo-burst: out of memory\n");
        return 1;
    }
    bool ok = true;
    double t0 = s_now_s ();
    for (long m = 0; m < o->messages && ok; m++) {
        if (o->rate > 0) {
            /* pace: message m is due at t0 + m / rate (a rate limiter for
             * latency benchmarks, not synchronisation) */
            double due = t0 + (double) m / (double) o->rate, now = s_now_s ();
            if (due > now) {
                struct timespec ts = { (time_t) (due - now),
                                       (long) ((due - now - (double) (time_t) (due - now)) * 1e9) };
                nanosleep (&ts, NULL);
            }
        }
        long i = m % o->servers;
        long k = ++seq[i];
        size_t len = s_sysinfo (o, i, k, body, cap);
        if (len == 0) {
            snprintf (p.error, sizeof p.error, "cannot build a sysinfo body");
            ok = false;
            break;
        }
        int64_t sent = cn_now_ms ();
        if (sent <= last_sent[i])
            sent = last_sent[i] + 1;
        last_sent[i] = sent;
        char uuid[37], rk[128];
        s_uuid (o, i, uuid);
        if (k == 1 && o->startup)
            snprintf (rk, sizeof rk, "ur.startup.%s", uuid);
        else
            snprintf (rk, sizeof rk, "ur.sysinfo.%s.%ld", uuid, k);
        ok = s_publish (&p, o->window, CN_AMQP_EXCHANGE, rk, body, len, sent);
    }
    if (ok)
        ok = s_pub_finish (&p);
    double secs = s_now_s () - t0;
    double rate = secs > 0 ? (double) p.published / secs : 0;
    int rc = 0;
    if (!ok) {
        fprintf (stderr, "sysinfo-burst: %s (published %" PRIu64 ", confirmed %" PRIu64 ")\n",
                 p.error, p.published, p.confirmed);
        rc = 1;
    }
    if (p.nacked || p.returned) {
        fprintf (stderr, "sysinfo-burst: %" PRIu64 " nacked, %" PRIu64 " returned (unroutable)\n",
                 p.nacked, p.returned);
        rc = 1;
    }
    printf ("published %" PRIu64 " messages for %ld servers in %.3f s (%.0f msg/s)\n",
            p.published, o->servers, secs, rate);
    if (o->json)
        printf ("{\"published\":%" PRIu64 ",\"servers\":%ld,\"seconds\":%.6f,\"rate\":%.1f,"
                "\"nacked\":%" PRIu64 ",\"returned\":%" PRIu64 ",\"ok\":%s}\n",
                p.published, o->servers, secs, rate, p.nacked, p.returned,
                rc == 0 ? "true" : "false");
    if (ok)
        cn_amqp_close (&c);
    else
        cn_amqp_destroy (&c);
    free (p.done);
    free (body);
    free (last_sent);
    free (seq);
    return rc;
}

static int
s_bench_raw (const s_opts_t *o)
{
    amqp_connection_state_t c = s_connect (o);
    if (!c)
        return 1;
    char err[512], queue[64];
    snprintf (queue, sizeof queue, "cnapi.bench.raw.%d", (int) getpid ());
    const char *qtype = o->qtype == CN_AMQP_QUEUE_QUORUM ? "quorum" : "classic";
    if (cn_amqp_queue_declare (c, queue, o->qtype, NULL, err, sizeof err) != 0) {
        fprintf (stderr, "sysinfo-burst: %s\n", err);
        cn_amqp_destroy (&c);
        return 1;
    }
    s_pub_t p;
    if (!s_pub_init (&p, c, o->messages)) {
        fprintf (stderr, "sysinfo-burst: %s\n", p.error[0] ? p.error : "out of memory");
        cn_amqp_destroy (&c);
        return 1;
    }
    size_t cap = (size_t) o->size + 8192;
    char *body = malloc (cap);
    size_t len = body ? s_sysinfo (o, 0, 1, body, cap) : 0;
    if (!len) {
        fprintf (stderr, "sysinfo-burst: cannot build a body\n");
        return 1;
    }
    if (o->size >= 16 && (size_t) o->size < len) {
        /* smaller than any sysinfo (e.g. a VM event's size): a JSON
         * object of exactly --size bytes */
        len = (size_t) o->size;
        memcpy (body, "{\"pad\":\"", 8);
        memset (body + 8, 'x', len - 10);
        memcpy (body + len - 2, "\"}", 2);
    }
    /* Publish: default exchange, routing key = queue. */
    bool ok = true;
    double t0 = s_now_s ();
    for (long m = 0; m < o->messages && ok; m++)
        ok = s_publish (&p, o->window, "", queue, body, len, cn_now_ms ());
    if (ok)
        ok = s_pub_finish (&p);
    double pub_s = s_now_s () - t0;
    if (!ok || p.nacked || p.returned) {
        fprintf (stderr, "sysinfo-burst: publish failed: %s (nacked %" PRIu64
                 ", returned %" PRIu64 ")\n", p.error, p.nacked, p.returned);
        cn_amqp_destroy (&c);
        return 1;
    }

    /* Consume with one ack per message, like the listener. */
    if (cn_amqp_consume (c, queue, (int) o->prefetch, "bench", err, sizeof err) != 0) {
        fprintf (stderr, "sysinfo-burst: %s\n", err);
        cn_amqp_destroy (&c);
        return 1;
    }
    long got = 0;
    size_t bytes = 0;
    struct timeval patience = { S_WAIT_S, 0 };
    double t1 = s_now_s ();
    while (got < o->messages) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers (c);
        amqp_rpc_reply_t r = amqp_consume_message (c, &env, &patience, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "consume", err, sizeof err);
            fprintf (stderr, "sysinfo-burst: %s after %ld messages\n", err, got);
            cn_amqp_destroy (&c);
            return 1;
        }
        bytes += env.message.body.len;
        int rc = amqp_basic_ack (c, CN_AMQP_CHANNEL, env.delivery_tag, 0);
        amqp_destroy_envelope (&env);
        if (rc != AMQP_STATUS_OK) {
            fprintf (stderr, "sysinfo-burst: basic.ack: %s\n", amqp_error_string2 (rc));
            cn_amqp_destroy (&c);
            return 1;
        }
        got++;
    }
    double con_s = s_now_s () - t1;
    amqp_queue_delete (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue), 0, 0);
    double pub_rate = pub_s > 0 ? o->messages / pub_s : 0;
    double con_rate = con_s > 0 ? got / con_s : 0;
    printf ("raw publish (%s queue, persistent, confirms, %zu bytes): %ld messages in %.3f s (%.0f msg/s)\n",
            qtype, len, o->messages, pub_s, pub_rate);
    printf ("raw consume (%s queue, prefetch %ld, one ack each): %ld messages in %.3f s (%.0f msg/s)\n",
            qtype, o->prefetch, got, con_s, con_rate);
    if (o->json)
        printf ("{\"queue_type\":\"%s\",\"size\":%zu,\"messages\":%ld,"
                "\"publish_seconds\":%.6f,\"publish_rate\":%.1f,"
                "\"consume_seconds\":%.6f,\"consume_rate\":%.1f,\"prefetch\":%ld}\n",
                qtype, len, o->messages, pub_s, pub_rate, con_s, con_rate, o->prefetch);
    cn_amqp_close (&c);
    free (p.done);
    free (body);
    return 0;
}

static bool
s_long (const char *s, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol (s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return false;
    *out = v;
    return true;
}

int
main (int argc, char **argv)
{
    setvbuf (stdout, NULL, _IOLBF, 0);
    const char *env_url = getenv ("CNAPI_AMQP_URL");
    s_opts_t o = {
        .url = env_url && *env_url ? env_url : "amqp://guest:guest@127.0.0.1:5672",
        .servers = 1, .messages = -1, .size = 3000, .prefix = "cafe0000",
        .window = 500, .qtype = CN_AMQP_QUEUE_CLASSIC, .prefetch = 1000,
    };
    enum { O_URL = 256, O_SERVERS, O_MESSAGES, O_SIZE, O_PREFIX, O_WINDOW, O_STARTUP,
           O_SETUP, O_JSON, O_QUEUE, O_BENCH, O_QTYPE, O_PREFETCH, O_RATE, O_HELP };
    static const struct option opts[] = {
        { "url", required_argument, NULL, O_URL },
        { "servers", required_argument, NULL, O_SERVERS },
        { "messages", required_argument, NULL, O_MESSAGES },
        { "size", required_argument, NULL, O_SIZE },
        { "prefix", required_argument, NULL, O_PREFIX },
        { "confirm-window", required_argument, NULL, O_WINDOW },
        { "startup", no_argument, NULL, O_STARTUP },
        { "setup", no_argument, NULL, O_SETUP },
        { "json-summary", no_argument, NULL, O_JSON },
        { "queue", required_argument, NULL, O_QUEUE },
        { "bench-raw", no_argument, NULL, O_BENCH },
        { "queue-type", required_argument, NULL, O_QTYPE },
        { "prefetch", required_argument, NULL, O_PREFETCH },
        { "rate", required_argument, NULL, O_RATE },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 }
    };
    int ch;
    bool bad = false;
    while ((ch = getopt_long (argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_URL: o.url = optarg; break;
        case O_SERVERS: bad |= !s_long (optarg, 1, 100000000, &o.servers); break;
        case O_MESSAGES: bad |= !s_long (optarg, 0, 1000000000, &o.messages); break;
        case O_SIZE: bad |= !s_long (optarg, 1, 4 * 1024 * 1024, &o.size); break;
        case O_WINDOW: bad |= !s_long (optarg, 1, 1000000, &o.window); break;
        case O_PREFETCH: bad |= !s_long (optarg, 1, 65535, &o.prefetch); break;
        case O_RATE: bad |= !s_long (optarg, 1, 10000000, &o.rate); break;
        case O_PREFIX:
            o.prefix = optarg;
            bad |= strlen (optarg) != 8;
            for (const char *q = optarg; *q; q++)
                bad |= !isxdigit ((unsigned char) *q);
            break;
        case O_STARTUP: o.startup = true; break;
        case O_SETUP: o.setup = true; break;
        case O_JSON: o.json = true; break;
        case O_QUEUE: o.queue = optarg; break;
        case O_BENCH: o.bench_raw = true; break;
        case O_QTYPE:
            if (strcmp (optarg, "classic") == 0)
                o.qtype = CN_AMQP_QUEUE_CLASSIC;
            else if (strcmp (optarg, "quorum") == 0)
                o.qtype = CN_AMQP_QUEUE_QUORUM;
            else
                bad = true;
            break;
        case O_HELP: s_usage (stdout); return 0;
        default: bad = true;
        }
    }
    if (bad || optind < argc) {
        s_usage (stderr);
        return 2;
    }
    if (o.messages < 0)
        o.messages = o.bench_raw ? 100000 : o.servers;
    return o.bench_raw ? s_bench_raw (&o) : s_burst (&o);
}
