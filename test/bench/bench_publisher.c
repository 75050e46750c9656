/*
 * bench-publisher: the confirmed VM-event publish rate of the agents'
 * publisher library (lib/cn_publisher.c), on the same path mockcloud and
 * provisioner use: simulated VMs (lib/cn_vmdummy.c) change at random, each
 * change becomes the AMQP VM event of docs/vm-events.md (routing key
 * vm.event.<server>.<vm>, JSON body, persistent, amq.topic) handed to ONE
 * cn_publisher (its own thread, publisher confirms, a window of unconfirmed
 * messages), as one agent process does.
 *
 *   bench-publisher --url AMQP_URL [--messages M] [--threads T] [--servers S]
 *                   [--vms V] [--window W] [--queue Q] [--keep-queue]
 *                   [--instances K] [--publishers P] [--declare-only | --delete-only]
 *
 * --queue Q (default bench.vmevents) is declared durable (classic) and bound
 * to vm.event.# first, so every event is routed to a queue and written by the
 * broker, as when a consumer (VMAPI) binds all CNs' events; it is deleted at
 * the end unless --keep-queue. --queue "" binds nothing (unroutable events
 * are confirmed without being stored). --declare-only declares and binds, then
 * exits (for a mockcloud run against the same queue); --delete-only deletes
 * the queue and exits. --instances K: instead of that one queue, K queues
 * <Q>.<k> as K cnapid instances hold them: not durable, each bound by
 * per-server keys (vm.event.<server>.*) to the servers it owns (server i to
 * instance i % K), so every event goes to its owner's queue only.
 * --first-server N numbers the servers from N (several bench-publishers,
 * each its own connection as each CN has, on disjoint servers and queues).
 *
 * --publishers P (default 1): P cn_publishers, each its own connection and
 * thread, as P agent processes (each CN has its own connection); sender
 * thread t uses publisher t % P (T defaults to P), so the servers are split
 * between them. One clock for all: the rate is every publisher's confirms
 * over the time from the first send until the last publisher's last confirm.
 *
 * --consume (with --instances K): K consumer threads, each its own
 * connection, drain queue <Q>.<k> while the events are published (prefetch
 * 1000, one basic.ack multiple per 100 deliveries), as the K cnapid
 * instances consume their queues; the run ends when every event has been
 * consumed, and "consumed" and "consumed_per_s" (first send until the last
 * delivery) join the output.
 *
 * T sender threads (default 1) each own S/T servers with V VMs each and make
 * M/T changes as fast as they can, pausing while more than 50,000 messages
 * wait in the publisher's buffer (so nothing is dropped). Rate = M / (time
 * from the first send until the last confirm). --pregen makes all M events
 * first and starts the clock after (the library and the broker alone, without
 * the cost of making the events, which shares the same 2 cores otherwise). One JSON line on stdout:
 * {messages, seconds, confirmed_per_s, sent_per_s, avg_body, published,
 *  confirmed, nacked, dropped, republished}.
 */
#include "cn_amqp.h"
#include "cn_publisher.h"
#include "cn_util.h"
#include "cn_vmdummy.h"

#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define S_BUFFER_HIGH 50000

typedef struct {
    cn_publisher_t *pub;
    long messages;
    long servers;
    long vms;
    long first;                /* first server index */
    char (*uuids)[48];
    atomic_uint_fast64_t *bytes;
} s_thread_t;

typedef struct {
    char *rk;
    char *body;
    size_t len;
    int64_t time_ms;
    cn_publisher_t *pub;
} s_ev_t;

/* --pregen: events are made first (all threads), then sent by one thread */
static s_ev_t *s_evs;
static atomic_size_t s_nevs;

typedef struct {
    cn_publisher_t *pub;
    const char *server_uuid;
    atomic_uint_fast64_t *bytes;
} s_cn_t;

static void
s_on_event (const cn_vm_t *vm, cn_vm_event_t ev, int64_t time_ms, void *arg)
{
    s_cn_t *cn = arg;
    char rk[128];
    size_t len;
    cn_vm_event_rk (cn->server_uuid, vm->uuid, rk, sizeof rk);
    char *body = cn_vm_event_body (cn->server_uuid, vm, ev, time_ms, &len);
    atomic_fetch_add_explicit (cn->bytes, len, memory_order_relaxed);
    if (s_evs) {
        size_t i = atomic_fetch_add (&s_nevs, 1);
        s_evs[i] = (s_ev_t) { strdup (rk), body, len, time_ms, cn->pub };
        return;
    }
    cn_publisher_send (cn->pub, rk, body, len, time_ms);
    free (body);
}

static void *
s_sender (void *arg)
{
    s_thread_t *t = arg;
    s_cn_t *cns = calloc ((size_t) t->servers, sizeof *cns);
    cn_vmdummy_t **b = calloc ((size_t) t->servers, sizeof *b);
    if (!cns || !b)
        abort ();
    char err[256];
    for (long i = 0; i < t->servers; i++) {
        cns[i] = (s_cn_t) { t->pub, t->uuids[t->first + i], t->bytes };
        b[i] = cn_vmdummy_new (NULL, NULL, s_on_event, &cns[i], err, sizeof err);
        if (!b[i]) {
            fprintf (stderr, "bench-publisher: %s\n", err);
            exit (1);
        }
        cn_vmdummy_populate (b[i], "beef0000", (uint64_t) (t->first + i), (size_t) t->vms,
                             cn_now_ms ());
    }
    uint64_t x = 0x9E3779B97F4A7C15ULL ^ (uint64_t) t->first;
    for (long k = 0; k < t->messages; k++) {
        if ((k & 255) == 0 && !s_evs) {
            for (int spin = 0; spin < 100000; spin++) {     /* bounded: 100 s */
                cn_publisher_stats_t st;
                cn_publisher_stats (t->pub, &st);
                if (st.buffered < S_BUFFER_HIGH)
                    break;
                usleep (1000);
            }
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cn_vmdummy_random_change (b[x % (uint64_t) t->servers], x >> 16, cn_now_ms ());
    }
    for (long i = 0; i < t->servers; i++)
        cn_vmdummy_destroy (&b[i]);
    free (b);
    free (cns);
    return NULL;
}

static long s_first_server;     /* --first-server: the uuid of server 0 */

/* --consume: one thread per instance queue */
typedef struct {
    const char *url;
    char queue[256];
    atomic_long *consumed;      /* shared: all consumers */
    long total;                 /* stop when consumed reaches it */
    atomic_llong *last_us;      /* the latest delivery, any consumer */
    atomic_bool *ready;
    int rc;
} s_consumer_t;

static void *
s_consumer (void *arg)
{
    s_consumer_t *k = arg;
    char err[256];
    cn_amqp_url_t u;
    amqp_connection_state_t c = NULL;
    if (cn_amqp_url_parse (k->url, &u, err, sizeof err) == 0) {
        c = cn_amqp_connect (&u, 10000, 0, "bench-consumer", err, sizeof err);
        cn_amqp_url_fini (&u);
    }
    if (!c || cn_amqp_consume (c, k->queue, 1000, NULL, err, sizeof err) != 0) {
        fprintf (stderr, "bench-publisher: consume %s: %s\n", k->queue, err);
        atomic_store (k->ready, true);
        k->rc = 1;
        if (c)
            cn_amqp_destroy (&c);
        return NULL;
    }
    atomic_store (k->ready, true);
    long mine = 0;
    uint64_t unacked = 0, last_tag = 0;
    /* bounded: stops at the total, or after 10 s without a delivery */
    while (atomic_load (k->consumed) < k->total) {
        amqp_envelope_t env;
        struct timeval patience = { 0, 200000 };
        amqp_maybe_release_buffers (c);
        amqp_rpc_reply_t r = amqp_consume_message (c, &env, &patience, 0);
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
            && r.library_error == AMQP_STATUS_TIMEOUT) {
            if (cn_mono_us () - atomic_load (k->last_us) > 10000000) {
                fprintf (stderr, "bench-publisher: %s: nothing for 10 s\n", k->queue);
                k->rc = 1;
                break;
            }
            continue;
        }
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "consume", err, sizeof err);
            fprintf (stderr, "bench-publisher: %s: %s after %ld\n", k->queue, err, mine);
            k->rc = 1;
            break;
        }
        last_tag = env.delivery_tag;
        amqp_destroy_envelope (&env);
        mine++;
        atomic_store (k->last_us, cn_mono_us ());
        atomic_fetch_add (k->consumed, 1);
        if (++unacked >= 100) {
            amqp_basic_ack (c, CN_AMQP_CHANNEL, last_tag, 1);
            unacked = 0;
        }
    }
    if (unacked)
        amqp_basic_ack (c, CN_AMQP_CHANNEL, last_tag, 1);
    cn_amqp_close (&c);
    return NULL;
}

static void
s_server_uuid (long i, char out[48])
{
    snprintf (out, 48, "beef0000-0000-4000-8000-%012lx", (unsigned long) (s_first_server + i));
}

/* instances = 0: queue is one durable classic queue bound to every event.
 * instances = K: K queues <queue>.<k>, not durable (as each cnapid's own VM
 * events queue), server i bound to queue i % K by its own key
 * vm.event.<server>.* (as the instance that owns it binds it). */
static int
s_declare (const char *url, const char *queue, bool delete, long instances, long servers,
           char *err, size_t errlen)
{
    cn_amqp_url_t u;
    if (cn_amqp_url_parse (url, &u, err, errlen) != 0)
        return -1;
    amqp_connection_state_t c = cn_amqp_connect (&u, 10000, 0, "bench-publisher", err, errlen);
    cn_amqp_url_fini (&u);
    if (!c)
        return -1;
    int rc = 0;
    for (long k = 0; k < (instances ? instances : 1) && rc == 0; k++) {
        char name[256];
        if (instances)
            snprintf (name, sizeof name, "%s.%ld", queue, k);
        else
            snprintf (name, sizeof name, "%s", queue);
        if (delete) {
            amqp_queue_delete (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (name), 0, 0);
            amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
            if (r.reply_type != AMQP_RESPONSE_NORMAL) {
                cn_amqp_reply_str (r, "queue.delete", err, errlen);
                rc = -1;
            }
        }
        else
        if (!instances) {
            const char *keys[] = { CN_VM_EVENT_BINDING_ALL, NULL };
            rc = cn_amqp_queue_declare (c, name, CN_AMQP_QUEUE_CLASSIC, keys, err, errlen);
        }
        else {
            amqp_queue_declare (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (name), 0, 0, 0, 0,
                                amqp_empty_table);
            amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
            if (r.reply_type != AMQP_RESPONSE_NORMAL) {
                cn_amqp_reply_str (r, "queue.declare", err, errlen);
                rc = -1;
            }
            for (long i = k; i < servers && rc == 0; i += instances) {
                char uuid[48], key[128];
                s_server_uuid (i, uuid);
                snprintf (key, sizeof key, "vm.event.%s.*", uuid);
                rc = cn_amqp_bind (c, name, key, true, err, errlen);
            }
        }
    }
    cn_amqp_close (&c);
    return rc;
}

int
main (int argc, char **argv)
{
    setvbuf (stdout, NULL, _IOLBF, 0);
    const char *url = NULL, *queue = "bench.vmevents";
    long messages = 200000, threads = 0, servers = 1000, vms = 10, window = 1000, instances = 0;
    long publishers = 1;
    bool keep = false, declare_only = false, delete_only = false, pregen = false, consume = false;
    enum { O_URL = 256, O_MSG, O_THR, O_SRV, O_VMS, O_WIN, O_Q, O_KEEP, O_DECL, O_DEL, O_PRE,
           O_INST, O_FIRST, O_PUBS, O_CONS };
    static const struct option opts[] = {
        { "url", required_argument, NULL, O_URL },
        { "messages", required_argument, NULL, O_MSG },
        { "threads", required_argument, NULL, O_THR },
        { "servers", required_argument, NULL, O_SRV },
        { "vms", required_argument, NULL, O_VMS },
        { "window", required_argument, NULL, O_WIN },
        { "queue", required_argument, NULL, O_Q },
        { "keep-queue", no_argument, NULL, O_KEEP },
        { "declare-only", no_argument, NULL, O_DECL },
        { "delete-only", no_argument, NULL, O_DEL },
        { "pregen", no_argument, NULL, O_PRE },
        { "instances", required_argument, NULL, O_INST },
        { "first-server", required_argument, NULL, O_FIRST },
        { "publishers", required_argument, NULL, O_PUBS },
        { "consume", no_argument, NULL, O_CONS },
        { NULL, 0, NULL, 0 }
    };
    int ch;
    while ((ch = getopt_long (argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_URL: url = optarg; break;
        case O_MSG: messages = atol (optarg); break;
        case O_THR: threads = atol (optarg); break;
        case O_SRV: servers = atol (optarg); break;
        case O_VMS: vms = atol (optarg); break;
        case O_WIN: window = atol (optarg); break;
        case O_Q: queue = optarg; break;
        case O_KEEP: keep = true; break;
        case O_DECL: declare_only = true; break;
        case O_DEL: delete_only = true; break;
        case O_PRE: pregen = true; break;
        case O_INST: instances = atol (optarg); break;
        case O_FIRST: s_first_server = atol (optarg); break;
        case O_PUBS: publishers = atol (optarg); break;
        case O_CONS: consume = true; break;
        default:
            fprintf (stderr, "usage: bench-publisher --url AMQP_URL [--messages M] [--threads T] "
                             "[--servers S] [--vms V] [--window W] [--queue Q] [--keep-queue] "
                             "[--pregen] [--instances K] [--first-server N] [--publishers P] [--consume] "
                             "[--declare-only | --delete-only]\n");
            return 2;
        }
    }
    if (threads == 0)
        threads = publishers;
    if (!url || messages < 1 || threads < 1 || threads > 16 || servers < threads || vms < 1
        || window < 1 || instances < 0 || instances > 64 || publishers < 1
        || publishers > threads || (consume && !instances)) {
        fprintf (stderr, "bench-publisher: bad arguments\n");
        return 2;
    }
    char err[512];
    if (delete_only) {
        if (*queue && s_declare (url, queue, true, instances, servers, err, sizeof err) != 0) {
            fprintf (stderr, "bench-publisher: delete %s: %s\n", queue, err);
            return 1;
        }
        return 0;
    }
    if (*queue && s_declare (url, queue, false, instances, servers, err, sizeof err) != 0) {
        fprintf (stderr, "bench-publisher: declare %s: %s\n", queue, err);
        return 1;
    }
    if (declare_only)
        return 0;

    /* --consume: the consumers are attached before the clock starts */
    atomic_long consumed = 0;
    atomic_llong last_us = 0;
    atomic_bool cready[64];
    s_consumer_t cons[64];
    pthread_t ctid[64];
    for (long k = 0; consume && k < instances; k++) {
        atomic_init (&cready[k], false);
        cons[k] = (s_consumer_t) { .url = url, .consumed = &consumed, .total = messages,
                                   .last_us = &last_us, .ready = &cready[k] };
        snprintf (cons[k].queue, sizeof cons[k].queue, "%s.%ld", queue, k);
        pthread_create (&ctid[k], NULL, s_consumer, &cons[k]);
    }
    for (long k = 0; consume && k < instances; k++)
        for (int i = 0; i < 1000 && !atomic_load (&cready[k]); i++)     /* bounded: 10 s */
            usleep (10000);
    cn_publisher_cfg_t pc = { .url = url, .name = "bench-publisher", .window = (int) window,
                              .max_buffer = 1000000 };
    cn_publisher_t *pubs[16];
    for (long p = 0; p < publishers; p++)
        if (!(pubs[p] = cn_publisher_new (&pc, err, sizeof err))) {
            fprintf (stderr, "bench-publisher: %s\n", err);
            return 1;
        }
    /* wait for the connections (bounded) so the clock measures publishing */
    for (long p = 0; p < publishers; p++)
        for (int i = 0; i < 1000; i++) {
            cn_publisher_stats_t st;
            cn_publisher_stats (pubs[p], &st);
            if (st.connected)
                break;
            usleep (10000);
        }
    char (*uuids)[48] = calloc ((size_t) servers, sizeof *uuids);
    if (!uuids)
        abort ();
    for (long i = 0; i < servers; i++)
        s_server_uuid (i, uuids[i]);
    atomic_uint_fast64_t bytes = 0;
    pthread_t tid[16];
    s_thread_t ts[16];
    if (pregen && !(s_evs = calloc ((size_t) messages, sizeof *s_evs)))
        abort ();
    int64_t t0 = cn_mono_us ();
    long per_s = servers / threads, per_m = messages / threads;
    for (long t = 0; t < threads; t++) {
        ts[t] = (s_thread_t) { pubs[t % publishers], t == threads - 1 ? messages - per_m * (threads - 1) : per_m,
                               t == threads - 1 ? servers - per_s * (threads - 1) : per_s,
                               vms, per_s * t, uuids, &bytes };
        pthread_create (&tid[t], NULL, s_sender, &ts[t]);
    }
    for (long t = 0; t < threads; t++)
        pthread_join (tid[t], NULL);
    if (s_evs) {
        /* made; now the clock runs for sending and confirming only */
        size_t n = atomic_load (&s_nevs);
        t0 = cn_mono_us ();
        for (size_t i = 0; i < n; i++) {
            if ((i & 255) == 0)
                for (int spin = 0; spin < 100000; spin++) {     /* bounded: 100 s */
                    cn_publisher_stats_t st;
                    cn_publisher_stats (s_evs[i].pub, &st);
                    if (st.buffered < S_BUFFER_HIGH)
                        break;
                    usleep (1000);
                }
            cn_publisher_send (s_evs[i].pub, s_evs[i].rk, s_evs[i].body, s_evs[i].len, s_evs[i].time_ms);
            free (s_evs[i].rk);
            free (s_evs[i].body);
        }
        free (s_evs);
        s_evs = NULL;
    }
    int64_t t_sent = cn_mono_us ();
    bool done = true;
    for (long p = 0; p < publishers; p++)
        done = cn_publisher_flush (pubs[p], 120000) && done;
    int64_t t1 = cn_mono_us ();
    cn_publisher_stats_t st = { 0 };
    for (long p = 0; p < publishers; p++) {
        cn_publisher_stats_t one;
        cn_publisher_stats (pubs[p], &one);
        st.published += one.published;
        st.confirmed += one.confirmed;
        st.nacked += one.nacked;
        st.dropped += one.dropped;
        st.republished += one.republished;
        cn_publisher_destroy (&pubs[p]);
    }
    double secs = (double) (t1 - t0) / 1e6;
    int crc = 0;
    for (long k = 0; consume && k < instances; k++) {
        pthread_join (ctid[k], NULL);
        crc |= cons[k].rc;
    }
    if (consume)
        printf ("{\"consumed\":%ld,\"consumed_per_s\":%.0f,\"consumers\":%ld}\n",
                atomic_load (&consumed),
                (double) atomic_load (&consumed) / ((double) (atomic_load (&last_us) - t0) / 1e6),
                instances);
    printf ("{\"messages\":%ld,\"seconds\":%.3f,\"confirmed_per_s\":%.0f,\"sent_per_s\":%.0f,"
            "\"avg_body\":%.0f,\"published\":%llu,\"confirmed\":%llu,\"nacked\":%llu,"
            "\"dropped\":%llu,\"republished\":%llu,\"flushed\":%s,\"queue\":\"%s\","
            "\"window\":%ld,\"threads\":%ld,\"publishers\":%ld,\"pregen\":%s}\n",
            messages, secs, (double) st.confirmed / secs,
            (double) messages / ((double) (t_sent - t0) / 1e6),
            (double) atomic_load (&bytes) / (double) messages,
            (unsigned long long) st.published, (unsigned long long) st.confirmed,
            (unsigned long long) st.nacked, (unsigned long long) st.dropped,
            (unsigned long long) st.republished, done ? "true" : "false", queue, window,
            threads, publishers, pregen ? "true" : "false");
    free (uuids);
    if (*queue && !keep && s_declare (url, queue, true, instances, servers, err, sizeof err) != 0)
        fprintf (stderr, "bench-publisher: delete %s: %s\n", queue, err);
    return done && !crc ? 0 : 1;
}
