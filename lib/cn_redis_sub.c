/*
 * cn_redis_sub: see include/cn_redis_sub.h.
 *
 * Theory of operation. SUBSCRIBE is sent synchronously (bounded by the
 * connection's timeout); after that the context is only read when the zloop
 * says its fd is readable (redisBufferRead does not block then), and every
 * reply hiredis has buffered is drained at once, including the ones that came
 * with the SUBSCRIBE answer. A quiet channel is normal, so liveness is checked
 * with PING (a subscribed connection answers it with a "pong" array): any
 * reply counts as traffic.
 */
#include "cn_redis_sub.h"

#include "cn_redis.h"
#include "cn_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IDLE_PING_MS 3000       /* silence before a PING */
#define DRAIN_MAX 100000        /* replies handled per read, at most */

struct cn_redis_sub {
    cn_redis_t *redis;
    char *channel;
    int timeout_ms;
    zloop_t *loop;
    cn_redis_sub_message_fn *on_message;
    cn_redis_sub_up_fn *on_up;
    cn_redis_sub_down_fn *on_down;
    void *arg;
    bool up;
    int fd;
    int64_t last_rx_ms;
    bool ping_sent;
    int64_t ping_ms;
};

cn_redis_sub_t *
cn_redis_sub_new (const char *url, int timeout_ms, const char *component, const char *channel)
{
    cn_redis_sub_t *self = calloc (1, sizeof *self);
    if (!self)
        return NULL;
    self->redis = cn_redis_new (url, timeout_ms, component);
    self->channel = strdup (channel);
    if (!self->redis || !self->channel) {
        cn_redis_destroy (&self->redis);
        free (self->channel);
        free (self);
        return NULL;
    }
    self->timeout_ms = timeout_ms;
    self->fd = -1;
    return self;
}

static void
s_poller_end (cn_redis_sub_t *self)
{
    zmq_pollitem_t item = { NULL, self->fd, ZMQ_POLLIN, 0 };
    zloop_poller_end (self->loop, &item);
    self->up = false;
    self->fd = -1;
}

void
cn_redis_sub_destroy (cn_redis_sub_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    cn_redis_sub_t *self = *self_p;
    if (self->up)
        s_poller_end (self);
    cn_redis_destroy (&self->redis);
    free (self->channel);
    free (self);
    *self_p = NULL;
}

void
cn_redis_sub_attach (cn_redis_sub_t *self, zloop_t *loop, cn_redis_sub_message_fn *on_message,
                     cn_redis_sub_up_fn *on_up, cn_redis_sub_down_fn *on_down, void *arg)
{
    self->loop = loop;
    self->on_message = on_message;
    self->on_up = on_up;
    self->on_down = on_down;
    self->arg = arg;
}

bool
cn_redis_sub_up (const cn_redis_sub_t *self)
{
    return self && self->up;
}

static void
s_down (cn_redis_sub_t *self, const char *why_in)
{
    if (!self->up)
        return;
    /* why_in may point into the context that cn_redis_failed frees */
    char why[128];
    snprintf (why, sizeof why, "%s", why_in ? why_in : "error");
    s_poller_end (self);
    cn_redis_failed (self->redis, why);
    if (self->on_down)
        self->on_down (self->arg, why);
}

static void
s_reply (cn_redis_sub_t *self, redisReply *r)
{
    self->last_rx_ms = cn_now_ms ();
    self->ping_sent = false;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3
        || r->element[0]->type != REDIS_REPLY_STRING
        || strcmp (r->element[0]->str, "message") != 0
        || r->element[2]->type != REDIS_REPLY_STRING)
        return;                 /* subscribe confirmations, pongs */
    self->on_message (self->arg, r->element[2]->str);
}

/* Handle every reply hiredis has buffered; -1 on a protocol error. */
static int
s_drain (cn_redis_sub_t *self)
{
    redisContext *ctx = cn_redis_ctx (self->redis);
    for (int i = 0; i < DRAIN_MAX; i++) {
        void *reply = NULL;
        if (redisGetReplyFromReader (ctx, &reply) != REDIS_OK)
            return -1;
        if (!reply)
            break;
        s_reply (self, reply);
        freeReplyObject (reply);
    }
    return 0;
}

static int
s_on_readable (zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    cn_redis_sub_t *self = arg;
    if (!self->up)
        return 0;
    redisContext *ctx = cn_redis_ctx (self->redis);
    /* poll said readable: this read does not block */
    if (redisBufferRead (ctx) != REDIS_OK) {
        s_down (self, ctx->errstr[0] ? ctx->errstr : "read failed");
        return 0;
    }
    if (s_drain (self) != 0)
        s_down (self, "protocol error");
    return 0;
}

bool
cn_redis_sub_try (cn_redis_sub_t *self)
{
    if (!self || !self->loop)
        return false;
    if (self->up || !cn_redis_ok (self->redis))
        return self->up;
    redisContext *ctx = cn_redis_ctx (self->redis);
    redisReply *r = redisCommand (ctx, "SUBSCRIBE %s", self->channel);
    bool ok = r && r->type == REDIS_REPLY_ARRAY && r->elements >= 1
              && r->element[0]->type == REDIS_REPLY_STRING
              && strcmp (r->element[0]->str, "subscribe") == 0;
    if (r)
        freeReplyObject (r);
    if (!ok) {
        cn_redis_failed (self->redis, "SUBSCRIBE failed");
        return false;
    }
    self->fd = ctx->fd;
    zmq_pollitem_t item = { NULL, self->fd, ZMQ_POLLIN, 0 };
    if (zloop_poller (self->loop, &item, s_on_readable, self) != 0) {
        self->fd = -1;
        cn_redis_failed (self->redis, "cannot poll the subscription");
        return false;
    }
    self->up = true;
    self->last_rx_ms = cn_now_ms ();
    self->ping_sent = false;
    if (self->on_up)
        self->on_up (self->arg);
    /* messages that arrived with the SUBSCRIBE answer are already buffered */
    if (s_drain (self) != 0)
        s_down (self, "protocol error");
    return self->up;
}

void
cn_redis_sub_check (cn_redis_sub_t *self)
{
    if (!self || !self->up) {
        cn_redis_sub_try (self);
        return;
    }
    int64_t now = cn_now_ms ();
    int64_t limit = 4 * (int64_t) self->timeout_ms;
    if (limit < 2000)
        limit = 2000;
    if (self->ping_sent && now - self->ping_ms > limit) {
        s_down (self, "no answer to PING");
        return;
    }
    if (now - self->last_rx_ms > IDLE_PING_MS && !self->ping_sent) {
        redisContext *ctx = cn_redis_ctx (self->redis);
        int done = 0;
        if (redisAppendCommand (ctx, "PING") != REDIS_OK) {
            s_down (self, "PING failed");
            return;
        }
        for (int i = 0; i < 16 && !done; i++)
            if (redisBufferWrite (ctx, &done) != REDIS_OK) {
                s_down (self, "PING failed");
                return;
            }
        self->ping_sent = true;
        self->ping_ms = now;
    }
}
