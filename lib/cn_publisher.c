/*
 * cn_publisher: see include/cn_publisher.h.
 *
 * Theory of operation
 *
 * Senders append to a FIFO under a mutex and, only when the publisher thread
 * says it is about to sleep, poke an eventfd (so a busy publisher costs the
 * senders no system call). The thread owns the librabbitmq connection:
 *
 *   1. not connected: connect (bounded by timeout_ms), confirm.select; on
 *      failure wait cn_backoff_ms (polling the eventfd only to notice stop);
 *   2. publish from the FIFO while the span of unconfirmed delivery tags is
 *      below the window; each published message moves to the in-flight ring,
 *      slot tag % window;
 *   3. read every frame that is ready, without waiting: basic.ack/nack
 *      (multiple or not) free ring slots; the lowest unconfirmed tag advances
 *      past freed slots;
 *   4. nothing to do: poll the broker socket and the eventfd (at most 1 s, so
 *      librabbitmq's heartbeat bookkeeping runs at least once a second).
 *
 * A lost connection puts the ring's messages back at the head of the FIFO in
 * tag order (they are republished: at least once). The FIFO is bounded by
 * max_buffer; the oldest message goes when a newer one does not fit.
 */
#include "cn_publisher.h"

#include "cn_amqp.h"
#include "cn_log.h"
#include "cn_util.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define COMPONENT "publisher"
#define S_STABLE_MS 10000
#define S_DROP_WARN_MS 10000

typedef struct pmsg {
    struct pmsg *next;
    int64_t sent_ms;
    uint32_t rk_len;
    uint32_t len;
    char data[];              /* routing key, NUL, body */
} pmsg_t;

struct cn_publisher {
    cn_amqp_url_t url;
    char *name;
    char *exchange;
    int window;
    size_t max_buffer;
    int timeout_ms;
    int heartbeat_s;

    pthread_mutex_t mu;
    pthread_cond_t drained;     /* signalled when buffered + inflight reaches 0 */
    pmsg_t *head, *tail;
    size_t count;
    size_t inflight_n;          /* mirror of the thread's ring count, under mu */
    int efd;
    atomic_bool sleeping;
    atomic_bool stop;
    pthread_t thread;
    bool thread_started;
    int64_t last_drop_warn_ms;
    uint64_t drops_since_warn;

    /* thread only */
    amqp_connection_state_t conn;
    pmsg_t **ring;
    uint64_t next_tag;          /* the tag the next publish gets */
    uint64_t low;               /* lowest unconfirmed tag */
    size_t ring_n;
    int attempt;
    int64_t connected_ms;

    atomic_uint_fast64_t n_sent, n_published, n_confirmed, n_nacked, n_dropped,
        n_republished, n_connects, n_failures;
    atomic_bool connected;
    pthread_mutex_t err_mu;
    char last_error[160];
};

static int64_t
s_mono_ms (void)
{
    return cn_mono_us () / 1000;
}

static void
s_set_error (cn_publisher_t *p, const char *e)
{
    pthread_mutex_lock (&p->err_mu);
    snprintf (p->last_error, sizeof p->last_error, "%.159s", e);
    pthread_mutex_unlock (&p->err_mu);
}

static void
s_wake (cn_publisher_t *p)
{
    uint64_t one = 1;
    ssize_t rc = write (p->efd, &one, sizeof one);
    (void) rc;
}

static void
s_drain_efd (cn_publisher_t *p)
{
    uint64_t v;
    ssize_t rc = read (p->efd, &v, sizeof v);
    (void) rc;
}

int
cn_publisher_send (cn_publisher_t *p, const char *rk, const void *body, size_t len,
                   int64_t sent_ms)
{
    if (atomic_load_explicit (&p->stop, memory_order_relaxed))
        return -1;
    size_t rk_len = strlen (rk);
    if (rk_len > 255 || len > UINT32_MAX)
        return -1;
    pmsg_t *m = malloc (sizeof *m + rk_len + 1 + len);
    if (!m)
        abort ();
    m->next = NULL;
    m->sent_ms = sent_ms;
    m->rk_len = (uint32_t) rk_len;
    m->len = (uint32_t) len;
    memcpy (m->data, rk, rk_len + 1);
    if (len)
        memcpy (m->data + rk_len + 1, body, len);

    pmsg_t *dropped = NULL;
    bool warn = false;
    uint64_t warn_n = 0;
    pthread_mutex_lock (&p->mu);
    if (p->tail)
        p->tail->next = m;
    else
        p->head = m;
    p->tail = m;
    p->count++;
    if (p->count > p->max_buffer) {
        dropped = p->head;
        p->head = dropped->next;
        if (!p->head)
            p->tail = NULL;
        p->count--;
        p->drops_since_warn++;
        int64_t now = s_mono_ms ();
        if (p->last_drop_warn_ms == 0 || now - p->last_drop_warn_ms >= S_DROP_WARN_MS) {
            warn = true;
            warn_n = p->drops_since_warn;
            p->drops_since_warn = 0;
            p->last_drop_warn_ms = now;
        }
    }
    pthread_mutex_unlock (&p->mu);
    atomic_fetch_add_explicit (&p->n_sent, 1, memory_order_relaxed);
    if (dropped) {
        atomic_fetch_add_explicit (&p->n_dropped, 1, memory_order_relaxed);
        free (dropped);
        if (warn)
            CN_WARN (COMPONENT, "publish buffer full, oldest messages dropped",
                     "{s:I,s:I,s:I}", "dropped", (json_int_t) warn_n,
                     "dropped_total", (json_int_t) atomic_load (&p->n_dropped),
                     "max_buffer", (json_int_t) p->max_buffer);
    }
    if (atomic_load (&p->sleeping))
        s_wake (p);
    return 0;
}

/* ---- the thread ---- */

static void
s_conn_lost (cn_publisher_t *p, const char *why)
{
    cn_amqp_destroy (&p->conn);
    atomic_store (&p->connected, false);
    atomic_fetch_add (&p->n_failures, 1);
    s_set_error (p, why);
    /* Unconfirmed messages go back to the head of the FIFO in tag order. */
    pmsg_t *first = NULL, *last = NULL;
    size_t n = 0;
    for (uint64_t t = p->low; t < p->next_tag; t++) {
        pmsg_t **slot = &p->ring[t % (uint64_t) p->window];
        if (!*slot)
            continue;
        pmsg_t *m = *slot;
        *slot = NULL;
        m->next = NULL;
        if (last)
            last->next = m;
        else
            first = m;
        last = m;
        n++;
    }
    p->ring_n = 0;
    p->next_tag = p->low = 1;
    if (n) {
        atomic_fetch_add (&p->n_republished, n);
        pthread_mutex_lock (&p->mu);
        last->next = p->head;
        p->head = first;
        if (!p->tail)
            p->tail = last;
        p->count += n;
        p->inflight_n = 0;
        pthread_mutex_unlock (&p->mu);
    }
    else {
        pthread_mutex_lock (&p->mu);
        p->inflight_n = 0;
        pthread_mutex_unlock (&p->mu);
    }
    if (p->connected_ms && s_mono_ms () - p->connected_ms >= S_STABLE_MS)
        p->attempt = 0;
    p->connected_ms = 0;
    CN_WARN (COMPONENT, "broker connection lost", "{s:s,s:I}", "error", why,
             "requeued", (json_int_t) n);
}

static bool
s_connect (cn_publisher_t *p)
{
    char err[256];
    amqp_connection_state_t c = cn_amqp_connect (&p->url, p->timeout_ms, p->heartbeat_s,
                                                 p->name, err, sizeof err);
    if (!c) {
        atomic_fetch_add (&p->n_failures, 1);
        s_set_error (p, err);
        return false;
    }
    amqp_confirm_select (c, CN_AMQP_CHANNEL);
    amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        cn_amqp_reply_str (r, "confirm.select", err, sizeof err);
        cn_amqp_destroy (&c);
        atomic_fetch_add (&p->n_failures, 1);
        s_set_error (p, err);
        return false;
    }
    p->conn = c;
    p->next_tag = p->low = 1;
    p->ring_n = 0;
    p->connected_ms = s_mono_ms ();
    atomic_store (&p->connected, true);
    atomic_fetch_add (&p->n_connects, 1);
    CN_INFO (COMPONENT, "broker connected", "{s:s,s:i,s:s,s:i}", "host", p->url.host,
             "port", p->url.port, "vhost", p->url.vhost, "window", p->window);
    return true;
}

static void
s_signal_if_drained (cn_publisher_t *p)
{
    pthread_mutex_lock (&p->mu);
    p->inflight_n = p->ring_n;
    if (p->count == 0 && p->ring_n == 0)
        pthread_cond_broadcast (&p->drained);
    pthread_mutex_unlock (&p->mu);
}

static void
s_confirm (cn_publisher_t *p, uint64_t tag, bool multiple, bool nack)
{
    if (tag == 0 || tag >= p->next_tag)
        return;
    uint64_t from = multiple ? p->low : tag;
    uint64_t n = 0;
    for (uint64_t t = from; t <= tag; t++) {
        pmsg_t **slot = &p->ring[t % (uint64_t) p->window];
        if (!*slot)
            continue;
        if (nack && n == 0)
            CN_WARN (COMPONENT, "message nacked by the broker, dropped",
                     "{s:s}", "routing_key", (*slot)->data);
        free (*slot);
        *slot = NULL;
        p->ring_n--;
        n++;
    }
    if (nack)
        atomic_fetch_add (&p->n_nacked, n);
    else
        atomic_fetch_add (&p->n_confirmed, n);
    while (p->low < p->next_tag && !p->ring[p->low % (uint64_t) p->window])
        p->low++;
}

/* Read what is ready. false when the connection is gone. */
static bool
s_read (cn_publisher_t *p, int wait_ms)
{
    struct timeval tv = { wait_ms / 1000, (wait_ms % 1000) * 1000 };
    bool first = true;
    while (true) {
        amqp_frame_t fr;
        struct timeval zero = { 0, 0 };
        int rc = amqp_simple_wait_frame_noblock (p->conn, &fr, first ? &tv : &zero);
        first = false;
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            s_conn_lost (p, amqp_error_string2 (rc));
            return false;
        }
        if (fr.frame_type != AMQP_FRAME_METHOD)
            continue;
        switch (fr.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
            const amqp_basic_ack_t *m = fr.payload.method.decoded;
            s_confirm (p, m->delivery_tag, m->multiple, false);
            break;
        }
        case AMQP_BASIC_NACK_METHOD: {
            const amqp_basic_nack_t *m = fr.payload.method.decoded;
            s_confirm (p, m->delivery_tag, m->multiple, true);
            break;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            const amqp_channel_close_t *m = fr.payload.method.decoded;
            char why[200];
            snprintf (why, sizeof why, "channel closed by broker: %u %.*s", m->reply_code,
                      (int) m->reply_text.len, (const char *) m->reply_text.bytes);
            amqp_channel_close_ok_t ok = { 0 };
            amqp_send_method (p->conn, CN_AMQP_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
            s_conn_lost (p, why);
            return false;
        }
        case AMQP_CONNECTION_CLOSE_METHOD: {
            const amqp_connection_close_t *m = fr.payload.method.decoded;
            char why[200];
            snprintf (why, sizeof why, "connection closed by broker: %u %.*s", m->reply_code,
                      (int) m->reply_text.len, (const char *) m->reply_text.bytes);
            amqp_connection_close_ok_t ok = { 0 };
            amqp_send_method (p->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
            s_conn_lost (p, why);
            return false;
        }
        default:
            break;            /* connection.blocked/unblocked, returns: nothing to do */
        }
    }
    amqp_maybe_release_buffers (p->conn);
    return true;
}

/* Publish from the FIFO while the window allows. false on a lost connection. */
static bool
s_publish_some (cn_publisher_t *p, bool *did)
{
    amqp_bytes_t exchange = amqp_cstring_bytes (p->exchange);
    int burst = 0;
    while (p->next_tag - p->low < (uint64_t) p->window && burst < 256) {
        pthread_mutex_lock (&p->mu);
        pmsg_t *m = p->head;
        if (m) {
            p->head = m->next;
            if (!p->head)
                p->tail = NULL;
            p->count--;
            p->inflight_n++;
        }
        pthread_mutex_unlock (&p->mu);
        if (!m)
            break;
        amqp_table_entry_t h[1];
        h[0].key = amqp_cstring_bytes (CN_AMQP_SENT_MS_HEADER);
        h[0].value.kind = AMQP_FIELD_KIND_I64;
        h[0].value.value.i64 = m->sent_ms;
        amqp_basic_properties_t props;
        memset (&props, 0, sizeof props);
        props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG
            | AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_TIMESTAMP_FLAG;
        props.content_type = amqp_cstring_bytes ("application/json");
        props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
        props.headers.num_entries = 1;
        props.headers.entries = h;
        props.timestamp = (uint64_t) (m->sent_ms / 1000);
        amqp_bytes_t rk = { .len = m->rk_len, .bytes = m->data };
        amqp_bytes_t body = { .len = m->len, .bytes = m->data + m->rk_len + 1 };
        uint64_t tag = p->next_tag++;
        p->ring[tag % (uint64_t) p->window] = m;
        p->ring_n++;
        int rc = amqp_basic_publish (p->conn, CN_AMQP_CHANNEL, exchange, rk,
                                     /* mandatory */ 0, /* immediate */ 0, &props, body);
        if (rc != AMQP_STATUS_OK) {
            char why[160];
            snprintf (why, sizeof why, "basic.publish: %s", amqp_error_string2 (rc));
            s_conn_lost (p, why);
            return false;
        }
        atomic_fetch_add_explicit (&p->n_published, 1, memory_order_relaxed);
        *did = true;
        burst++;
    }
    return true;
}

static bool
s_fifo_empty (cn_publisher_t *p)
{
    pthread_mutex_lock (&p->mu);
    bool empty = p->head == NULL;
    pthread_mutex_unlock (&p->mu);
    return empty;
}

static void *
s_thread (void *arg)
{
    cn_publisher_t *p = arg;
    while (!atomic_load (&p->stop)) {
        if (!p->conn) {
            if (!s_connect (p)) {
                int ms = cn_backoff_ms (p->attempt++, 100, 5000);
                char err[160];
                pthread_mutex_lock (&p->err_mu);
                snprintf (err, sizeof err, "%s", p->last_error);
                pthread_mutex_unlock (&p->err_mu);
                CN_WARN (COMPONENT, "broker connection failed", "{s:s,s:i,s:i}",
                         "error", err, "attempt", p->attempt, "retry_ms", ms);
                struct pollfd pfd = { .fd = p->efd, .events = POLLIN };
                int64_t until = s_mono_ms () + ms;
                while (!atomic_load (&p->stop)) {
                    int64_t left = until - s_mono_ms ();
                    if (left <= 0)
                        break;
                    atomic_store (&p->sleeping, true);
                    if (poll (&pfd, 1, (int) left) > 0)
                        s_drain_efd (p);
                    atomic_store (&p->sleeping, false);
                }
                continue;
            }
        }
        bool did = false;
        if (!s_publish_some (p, &did))
            continue;
        if (!s_read (p, 0))
            continue;
        s_signal_if_drained (p);
        if (did)
            continue;
        /* Idle: sleep on the socket and the eventfd. */
        atomic_store (&p->sleeping, true);
        bool window_open = p->next_tag - p->low < (uint64_t) p->window;
        if ((window_open && !s_fifo_empty (p)) || amqp_frames_enqueued (p->conn)
            || amqp_data_in_buffer (p->conn)) {
            atomic_store (&p->sleeping, false);
            continue;
        }
        struct pollfd pfd[2] = {
            { .fd = amqp_get_sockfd (p->conn), .events = POLLIN },
            { .fd = p->efd, .events = POLLIN },
        };
        int rc = poll (pfd, 2, 1000);
        atomic_store (&p->sleeping, false);
        if (rc > 0 && (pfd[1].revents & POLLIN))
            s_drain_efd (p);
    }
    if (p->conn) {
        cn_amqp_close (&p->conn);
        atomic_store (&p->connected, false);
    }
    return NULL;
}

bool
cn_publisher_flush (cn_publisher_t *p, int timeout_ms)
{
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long) (timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    s_wake (p);
    pthread_mutex_lock (&p->mu);
    int rc = 0;
    while ((p->count || p->inflight_n) && rc == 0)
        rc = pthread_cond_timedwait (&p->drained, &p->mu, &ts);
    bool done = !p->count && !p->inflight_n;
    pthread_mutex_unlock (&p->mu);
    return done;
}

cn_publisher_t *
cn_publisher_new (const cn_publisher_cfg_t *cfg, char *err, size_t errlen)
{
    cn_publisher_t *p = calloc (1, sizeof *p);
    if (!p)
        abort ();
    if (cn_amqp_url_parse (cfg->url, &p->url, err, errlen) != 0) {
        free (p);
        return NULL;
    }
    p->name = cfg->name ? strdup (cfg->name) : NULL;
    p->exchange = strdup (cfg->exchange ? cfg->exchange : CN_AMQP_EXCHANGE);
    p->window = cfg->window > 0 ? cfg->window : 1000;
    p->max_buffer = cfg->max_buffer > 0 ? cfg->max_buffer : 100000;
    p->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 3000;
    p->heartbeat_s = cfg->heartbeat_s > 0 ? cfg->heartbeat_s : 10;
    p->ring = calloc ((size_t) p->window, sizeof *p->ring);
    if (!p->exchange || !p->ring)
        abort ();
    p->next_tag = p->low = 1;
    pthread_mutex_init (&p->mu, NULL);
    pthread_mutex_init (&p->err_mu, NULL);
    pthread_cond_init (&p->drained, NULL);
    p->efd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->efd < 0 || pthread_create (&p->thread, NULL, s_thread, p) != 0) {
        snprintf (err, errlen, "cannot start the publisher thread");
        if (p->efd >= 0)
            close (p->efd);
        cn_amqp_url_fini (&p->url);
        free (p->ring);
        free (p->name);
        free (p->exchange);
        free (p);
        return NULL;
    }
    p->thread_started = true;
    return p;
}

void
cn_publisher_destroy (cn_publisher_t **pp)
{
    if (!pp || !*pp)
        return;
    cn_publisher_t *p = *pp;
    atomic_store (&p->stop, true);
    if (p->thread_started) {
        s_wake (p);
        pthread_join (p->thread, NULL);
    }
    for (int i = 0; i < p->window; i++)
        free (p->ring[i]);
    pmsg_t *m = p->head;
    while (m) {
        pmsg_t *next = m->next;
        free (m);
        m = next;
    }
    free (p->ring);
    close (p->efd);
    cn_amqp_url_fini (&p->url);
    pthread_mutex_destroy (&p->mu);
    pthread_mutex_destroy (&p->err_mu);
    pthread_cond_destroy (&p->drained);
    free (p->name);
    free (p->exchange);
    free (p);
    *pp = NULL;
}

void
cn_publisher_stats (cn_publisher_t *p, cn_publisher_stats_t *o)
{
    memset (o, 0, sizeof *o);
    o->sent = atomic_load (&p->n_sent);
    o->published = atomic_load (&p->n_published);
    o->confirmed = atomic_load (&p->n_confirmed);
    o->nacked = atomic_load (&p->n_nacked);
    o->dropped = atomic_load (&p->n_dropped);
    o->republished = atomic_load (&p->n_republished);
    o->connects = atomic_load (&p->n_connects);
    o->failures = atomic_load (&p->n_failures);
    o->connected = atomic_load (&p->connected);
    pthread_mutex_lock (&p->mu);
    o->buffered = p->count;
    o->inflight = p->inflight_n;
    pthread_mutex_unlock (&p->mu);
    pthread_mutex_lock (&p->err_mu);
    snprintf (o->last_error, sizeof o->last_error, "%s", p->last_error);
    pthread_mutex_unlock (&p->err_mu);
}
