/*
 * cn_publisher: one AMQP publishing connection, in its own thread, fed by a
 * queue from any number of threads (the agent loops). Persistent messages on
 * amq.topic with publisher confirms, a window of unconfirmed messages, and a
 * bounded buffer while the broker is away.
 *
 *   cn_publisher_cfg_t c = { .url = "amqp://guest:guest@127.0.0.1:5672",
 *                            .name = "mockcloud" };
 *   cn_publisher_t *p = cn_publisher_new (&c, err, sizeof err);
 *   cn_publisher_send (p, "vm.event.<server>.<vm>", body, len, cn_now_ms ());
 *   ...
 *   cn_publisher_flush (p, 2000);          // wait until all are confirmed
 *   cn_publisher_destroy (&p);
 *
 * Delivery is at least once: messages not yet confirmed when the connection
 * drops are published again (in order, ahead of newer ones) on the next
 * connection, so a consumer may see a message twice (VM events carry a
 * per-VM seq for that). A message the broker nacks is counted and dropped.
 * When the buffer is full the oldest buffered message is dropped, counted,
 * and a warning is logged (at most every 10 s).
 *
 * Reconnect: cn_backoff_ms (attempt, 100, 5000), full jitter; the attempt
 * count resets once a connection has stayed up 10 s. The thread never
 * sleeps blindly: it polls the broker socket and an eventfd that senders
 * signal when it is idle.
 */
#ifndef CN_PUBLISHER_H
#define CN_PUBLISHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cn_publisher cn_publisher_t;

typedef struct {
    const char *url;          /* amqp://user:pass@host:port/vhost */
    const char *name;         /* connection_name shown by the broker (may be NULL) */
    const char *exchange;     /* default "amq.topic" */
    int window;               /* unconfirmed messages at most; default 1000 */
    size_t max_buffer;        /* messages waiting at most; default 100000 */
    int timeout_ms;           /* connect and RPC bound; default 3000 */
    int heartbeat_s;          /* AMQP heartbeat; default 10 */
} cn_publisher_cfg_t;

typedef struct {
    uint64_t sent;            /* cn_publisher_send calls accepted */
    uint64_t published;       /* basic.publish done (republishes included) */
    uint64_t confirmed;       /* acked by the broker */
    uint64_t nacked;          /* nacked by the broker (dropped) */
    uint64_t dropped;         /* dropped from a full buffer */
    uint64_t republished;     /* unconfirmed at a connection loss, sent again */
    uint64_t connects;        /* successful connections */
    uint64_t failures;        /* failed connection attempts and lost connections */
    uint64_t buffered;        /* waiting to be published now */
    uint64_t inflight;        /* published, not yet confirmed */
    bool connected;
    char last_error[160];
} cn_publisher_stats_t;

/* Parse the URL and start the thread (the broker is reached in the
 * background: a broker that is down is not an error here). NULL with err
 * filled on a bad URL or configuration. */
cn_publisher_t *cn_publisher_new (const cn_publisher_cfg_t *cfg, char *err, size_t errlen);
/* Stop the thread (messages not yet confirmed are lost: flush first) and
 * close the connection. *p is NULL afterwards; safe on NULL. */
void cn_publisher_destroy (cn_publisher_t **p);

/* Queue one message (copied). sent_ms goes in the sent_ms header and the
 * timestamp property. Thread safe, never blocks on the broker. 0, or -1
 * when the publisher is stopping. */
int cn_publisher_send (cn_publisher_t *p, const char *routing_key,
                       const void *body, size_t len, int64_t sent_ms);

/* Wait until every message sent so far is confirmed (or dropped), at most
 * timeout_ms. true when nothing is left. */
bool cn_publisher_flush (cn_publisher_t *p, int timeout_ms);

void cn_publisher_stats (cn_publisher_t *p, cn_publisher_stats_t *out);

#endif
