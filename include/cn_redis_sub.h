/*
 * cn_redis_sub: one Redis pub/sub channel read from a zloop.
 *
 * The subscription has its own connection (a cn_redis_t). Once SUBSCRIBE is
 * answered its socket is polled by the owner's zloop; every message on the
 * channel goes to on_message. When the connection breaks (a read error, a
 * protocol error, a PING unanswered) the poller is removed, the connection is
 * marked failed (it reconnects after cn_redis's backoff) and on_down is told
 * why; the owner calls cn_redis_sub_try or cn_redis_sub_check from a timer to
 * subscribe again. Nothing here blocks longer than the Redis timeout.
 *
 * Used by the sessions (cnapi:status), tasks (cnapi:tasks), waitlist
 * (cnapi:tickets) and gateway (cnapi:invalidate) actors.
 */
#ifndef CN_REDIS_SUB_H
#define CN_REDIS_SUB_H

#include <czmq.h>
#include <stdbool.h>

typedef struct cn_redis_sub cn_redis_sub_t;

/* A message published on the channel (payload NUL-terminated). */
typedef void (cn_redis_sub_message_fn) (void *arg, const char *payload);
/* The subscription is up; called before the replies that came with the
 * SUBSCRIBE answer are handed to on_message. */
typedef void (cn_redis_sub_up_fn) (void *arg);
/* The subscription was lost; why is a copy that stays valid for the call. */
typedef void (cn_redis_sub_down_fn) (void *arg, const char *why);

/* A subscription to channel over its own connection (url, timeout_ms,
 * component as cn_redis_new). Connects nothing yet. NULL when out of memory. */
cn_redis_sub_t *cn_redis_sub_new (const char *url, int timeout_ms, const char *component,
                                  const char *channel);
/* Remove the poller (if up) and close the connection; *self_p becomes NULL.
 * Call it before the zloop it is attached to is destroyed. */
void cn_redis_sub_destroy (cn_redis_sub_t **self_p);
/* The loop that polls the connection and the callbacks (on_up and on_down
 * may be NULL); set once, before the first cn_redis_sub_try (which does
 * nothing until then). */
void cn_redis_sub_attach (cn_redis_sub_t *self, zloop_t *loop,
                          cn_redis_sub_message_fn *on_message, cn_redis_sub_up_fn *on_up,
                          cn_redis_sub_down_fn *on_down, void *arg);
/* When down: connect (if cn_redis's backoff allows) and SUBSCRIBE. Returns
 * whether the subscription is up afterwards. */
bool cn_redis_sub_try (cn_redis_sub_t *self);
/* For a timer (about every second): when down, cn_redis_sub_try; when up,
 * send a PING after 3 s of silence and go down when a PING stays unanswered
 * for max(4 * timeout_ms, 2 s). */
void cn_redis_sub_check (cn_redis_sub_t *self);
/* Whether the subscription is up (false for NULL). */
bool cn_redis_sub_up (const cn_redis_sub_t *self);

#endif
