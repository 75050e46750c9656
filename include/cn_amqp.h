/*
 * cn_amqp: the AMQP pieces shared by the sysinfo listener (actors/cn_listener.c)
 * and the sysinfo-burst publisher (test/tools/sysinfo_burst.c): URL parsing,
 * a bounded connect/login, the ur.cnapi queue declaration and bindings, and
 * the pure helpers the listener applies to each delivery (routing key ->
 * server UUID, headers -> source time). See docs/amqp.md.
 *
 *   cn_amqp_url_t u;
 *   if (cn_amqp_url_parse ("amqp://guest:guest@127.0.0.1:5672", &u, err, sizeof err))
 *       ...;
 *   amqp_connection_state_t c = cn_amqp_connect (&u, 2000, 10, "cnapid listener",
 *                                                err, sizeof err);
 *   cn_amqp_queue_declare (c, "ur.cnapi", CN_AMQP_QUEUE_AUTO, cn_amqp_sysinfo_keys,
 *                          err, sizeof err);
 *   cn_amqp_consume (c, "ur.cnapi", 1000, "cnapi-host-1", err, sizeof err);
 *   ...
 *   cn_amqp_close (&c);
 *   cn_amqp_url_fini (&u);
 *
 * Every call that talks to the broker is bounded: connect by timeout_ms, the
 * login handshake and every RPC by the same timeout (librabbitmq's handshake
 * and RPC timeouts are set on the connection). All use channel CN_AMQP_CHANNEL.
 */
#ifndef CN_AMQP_H
#define CN_AMQP_H

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_AMQP_CHANNEL 1
#define CN_AMQP_EXCHANGE "amq.topic"
/* The header our publishers set to the source time of a message (ms). */
#define CN_AMQP_SENT_MS_HEADER "sent_ms"

/* The binding keys of the sysinfo queue (NULL-terminated). */
extern const char *const cn_amqp_sysinfo_keys[];

typedef struct {
    char *host;
    int port;
    char *user;
    char *password;
    char *vhost;              /* URL-decoded; "" (a trailing slash) means "/" */
} cn_amqp_url_t;

/* Parse an amqp:// URL (amqps:// is refused: no TLS here). 0 with *u filled
 * (free with cn_amqp_url_fini), or -1 with err filled and *u zeroed. */
int cn_amqp_url_parse (const char *url, cn_amqp_url_t *u, char *err, size_t errlen);
void cn_amqp_url_fini (cn_amqp_url_t *u);

/* Open TCP (within timeout_ms), log in (heartbeat_s negotiated; 0 = none),
 * open channel CN_AMQP_CHANNEL. name is shown by the broker as the
 * connection_name (may be NULL). Leaves the handshake and RPC timeouts at
 * timeout_ms. Returns the connection, or NULL with err filled. */
amqp_connection_state_t cn_amqp_connect (const cn_amqp_url_t *u, int timeout_ms,
                                         int heartbeat_s, const char *name,
                                         char *err, size_t errlen);

typedef enum {
    CN_AMQP_QUEUE_AUTO,       /* use the queue as it exists, else create it quorum */
    CN_AMQP_QUEUE_QUORUM,     /* declare durable quorum (fails if it exists as classic) */
    CN_AMQP_QUEUE_CLASSIC     /* declare durable classic (fails if it exists as quorum) */
} cn_amqp_qtype_t;

/* Make sure the durable, shared (not exclusive, not auto-delete) queue exists
 * and is bound on CN_AMQP_EXCHANGE to each of keys (NULL-terminated; may be
 * NULL). AUTO first declares passively, so an existing queue of either type is
 * used as it is and instances never fight over its arguments. 0, or -1 with
 * err filled (the channel may then be closed: drop the connection). */
int cn_amqp_queue_declare (amqp_connection_state_t c, const char *queue,
                           cn_amqp_qtype_t type, const char *const *keys,
                           char *err, size_t errlen);

/* Declare a private queue: not durable, exclusive to this connection,
 * deleted with it (the VM events queue of one instance). 0, or -1. */
int cn_amqp_queue_declare_private (amqp_connection_state_t c, const char *queue,
                                   char *err, size_t errlen);
/* queue.bind / queue.unbind of queue on CN_AMQP_EXCHANGE with key. 0, or -1
 * with err filled (the channel may then be closed: drop the connection). */
int cn_amqp_bind (amqp_connection_state_t c, const char *queue, const char *key, bool bind,
                  char *err, size_t errlen);

/* basic.qos (per-consumer prefetch) and basic.consume with manual acks.
 * 0, or -1 with err filled. */
int cn_amqp_consume (amqp_connection_state_t c, const char *queue, int prefetch,
                     const char *consumer_tag, char *err, size_t errlen);

/* Close politely (channel, then connection; each bounded by the RPC timeout)
 * and free. *cp is NULL afterwards; safe on NULL. */
void cn_amqp_close (amqp_connection_state_t *cp);
/* Free without the close handshake (after a socket error or a broker close). */
void cn_amqp_destroy (amqp_connection_state_t *cp);

/* Describe an RPC reply that is not normal ("what: reason") into buf. */
const char *cn_amqp_reply_str (amqp_rpc_reply_t r, const char *what,
                               char *buf, size_t len);

/* The server UUID of a sysinfo routing key (not NUL-terminated: len bytes):
 * "ur.startup.<uuid>" or "ur.sysinfo.<uuid>", optionally followed by
 * ".<id>" with a non-empty id. The UUID is written lower case into out.
 * false (out unchanged) for any other key. */
bool cn_amqp_rk_uuid (const char *rk, size_t len, char out[37]);

/* The source time of a message in ms since the epoch: the header sent_ms
 * (any integer kind, a float, or a decimal string) if present and plausible,
 * else the timestamp property (seconds) x 1000. true with *out set, false
 * (*out unchanged) when neither is usable. p may be NULL. */
bool cn_amqp_sent_ms (const amqp_basic_properties_t *p, int64_t *out);

#endif
