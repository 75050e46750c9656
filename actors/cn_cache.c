/*
 * cn_cache: the cache writer actor. See include/cn_cache.h.
 */
#include "cn_cache.h"

#include "cn_actor.h"

#include "cn_health.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_redis.h"
#include "cn_util.h"

#include <stdlib.h>
#include <string.h>

#define COMPONENT "cache"

typedef struct {
    const cn_config_t *cfg;
    cn_cache_stats_t *stats;
    zsock_t *pipe;            /* to the writer: "cache_done" */
    uint64_t done;            /* highest seq applied */
    uint64_t told;            /* highest seq the writer was sent */
    zsock_t *pull;
    cn_redis_t *redis;
    zhashx_t *dirty;          /* uuids whose cache update failed */
    bool dirty_all;
    int64_t hold_until_us;    /* cache_done waits for the drop until then (0: no hold) */
    bool gave_up;             /* the hold ran out: tell at once until a drop succeeds */
    zloop_t *loop;
    int hold_timer;           /* the 100 ms retry timer while holding (0: none) */
} self_t;

static int s_on_hold_tick (zloop_t *loop, int timer_id, void *arg);

static bool
s_dirty (const self_t *self)
{
    return self->dirty_all || zhashx_size (self->dirty) > 0;
}

static void
s_mark_dirty (self_t *self, const cn_cache_put_t *puts, size_t n)
{
    for (size_t k = 0; k < n && !self->dirty_all; k++) {
        if (zhashx_size (self->dirty) >= CN_CACHE_DIRTY_MAX) {
            self->dirty_all = true;
            zhashx_purge (self->dirty);
        }
        else
            zhashx_update (self->dirty, puts[k].uuid, (void *) 1);
    }
    if (!self->hold_until_us && !self->gave_up) {
        self->hold_until_us = cn_mono_us () + CN_CACHE_HOLD_MS * 1000LL;
        /* drop and tell again soon after Redis is back, not at the next
         * second's tick */
        if (!self->hold_timer && self->loop)
            self->hold_timer = zloop_timer (self->loop, 100, 0, s_on_hold_tick, self);
    }
    atomic_store (&self->stats->dirty, zhashx_size (self->dirty) + (self->dirty_all ? 1 : 0));
}

/* Drop what we could not update while Redis was away. */
static void
s_maintenance (self_t *self)
{
    if (!self->dirty_all && zhashx_size (self->dirty) == 0)
        return;
    if (!cn_redis_ok (self->redis))
        return;
    int rc;
    size_t count = zhashx_size (self->dirty);
    if (self->dirty_all)
        rc = cn_redis_cache_drop (self->redis, NULL, 0, true);
    else {
        zlistx_t *keys = zhashx_keys (self->dirty);
        size_t i = 0;
        const char **uuids = calloc (count ? count : 1, sizeof *uuids);
        for (const char *k = zlistx_first (keys); k; k = zlistx_next (keys))
            uuids[i++] = k;
        rc = cn_redis_cache_drop (self->redis, uuids, count, false);
        free (uuids);
        zlistx_destroy (&keys);
    }
    if (rc == 0) {
        CN_INFO (COMPONENT, "cache entries written while redis was down dropped", "{s:b,s:i}",
                 "all", self->dirty_all, "count", (int) count);
        self->dirty_all = false;
        zhashx_purge (self->dirty);
        atomic_store (&self->stats->dirty, 0);
        self->hold_until_us = 0;
        self->gave_up = false;
    }
}

/* One "cache_puts" message: {seq, items: [[uuid, version, json|nil], ...]}.
 * Returns its seq (0 when it has none). */
static uint64_t
s_apply (self_t *self, zframe_t *frame)
{
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, zframe_data (frame), zframe_size (frame), err, sizeof err) != 0
        || !cn_msg_is (&m, "cache_puts")) {
        CN_ERROR (COMPONENT, "bad cache_puts message", "{s:s}", "error", err);
        if (m.map)
            cn_msg_fini (&m);
        return 0;
    }
    const msgpack_object *sq = cn_msg_get (&m, "seq");
    uint64_t seq = sq && sq->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? sq->via.u64 : 0;
    const msgpack_object *items = cn_msg_get (&m, "items");
    size_t n = items && items->type == MSGPACK_OBJECT_ARRAY ? items->via.array.size : 0;
    cn_cache_put_t *puts = calloc (n ? n : 1, sizeof *puts);
    char (*uuids)[37] = calloc (n ? n : 1, sizeof *uuids);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const msgpack_object *it = &items->via.array.ptr[i];
        if (it->type != MSGPACK_OBJECT_ARRAY || it->via.array.size != 3)
            continue;
        const msgpack_object *u = &it->via.array.ptr[0], *v = &it->via.array.ptr[1],
                             *j = &it->via.array.ptr[2];
        if (u->type != MSGPACK_OBJECT_STR || u->via.str.size != 36
            || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            continue;
        memcpy (uuids[k], u->via.str.ptr, 36);
        uuids[k][36] = '\0';
        puts[k].uuid = uuids[k];
        puts[k].version = (int64_t) v->via.u64;
        if (j->type == MSGPACK_OBJECT_STR) {
            puts[k].json = j->via.str.ptr;
            puts[k].len = j->via.str.size;
        }
        k++;
    }
    atomic_fetch_add (&self->stats->batches, 1);
    atomic_fetch_add (&self->stats->records, k);
    if (k && cn_redis_cache_apply (self->redis, puts, k) != 0) {
        atomic_fetch_add (&self->stats->failures, 1);
        s_mark_dirty (self, puts, k);
    }
    atomic_store (&self->stats->connected, cn_redis_connected (self->redis));
    free (puts);
    free (uuids);
    cn_msg_fini (&m);
    return seq;
}

/* Tell the writer how far Redis has been brought: the HTTP writes it holds
 * up to there can be answered. A failed write leaves the previous version
 * in Redis until s_maintenance drops it, so while uuids are dirty this
 * waits, for at most CN_CACHE_HOLD_MS from the first failure (readers
 * elsewhere must not find the old record after the answer; a Redis that
 * stays away must not hold every write). Never blocks: while the writer is
 * busy (and perhaps blocked sending to us) the pipe may be full; the seq is
 * cumulative, so the next pull or tick says it again. */
static void
s_tell (self_t *self)
{
    if (self->done <= self->told)
        return;
    if (s_dirty (self) && !self->gave_up) {
        if (cn_mono_us () < self->hold_until_us)
            return;
        self->gave_up = true;
        CN_WARN (COMPONENT, "redis entries not dropped in time; answering writes anyway",
                 "{s:i}", "hold_ms", CN_CACHE_HOLD_MS);
    }
    cn_msgw_t w;
    cn_msgw_init (&w, "cache_done", 1);
    cn_msgw_uint (&w, "seq", self->done);
    zframe_t *f = cn_msgw_frame (&w);
    if (zframe_send (&f, self->pipe, ZFRAME_DONTWAIT) == 0)
        self->told = self->done;
    else
        zframe_destroy (&f);
}

/* After each batch and on each timer: drop what failed, tell the writer,
 * and stop the retry timer once nothing is held any more. */
static void
s_catch_up (self_t *self)
{
    s_maintenance (self);
    s_tell (self);
    if (self->hold_timer && (!s_dirty (self) || self->gave_up)) {
        zloop_timer_end (self->loop, self->hold_timer);
        self->hold_timer = 0;
    }
}

static int
s_on_pull (zloop_t *loop, zsock_t *pull, void *arg)
{
    self_t *self = arg;
    for (int i = 0; i < 64; i++) {
        zframe_t *f = zframe_recv_nowait (pull);
        if (!f)
            break;
        uint64_t seq = s_apply (self, f);
        if (seq > self->done)
            self->done = seq;
        zframe_destroy (&f);
        atomic_fetch_sub (&self->stats->queued, 1);
    }
    s_catch_up (self);
    return 0;
}

static int
s_on_hold_tick (zloop_t *loop, int timer_id, void *arg)
{
    s_catch_up (arg);
    return 0;
}

static int
s_on_tick (zloop_t *loop, int timer_id, void *arg)
{
    self_t *self = arg;
    s_catch_up (self);
    bool up = cn_redis_ok (self->redis);
    if (up) {
        redisReply *rep = cn_redis_cmd (self->redis, "PING");
        up = rep != NULL;
        if (rep)
            freeReplyObject (rep);
    }
    cn_health_set ("redis", up);
    atomic_store (&self->stats->connected, up);
    return 0;
}

static int
s_on_pipe (zloop_t *loop, zsock_t *pipe, void *arg)
{
    char *cmd = zstr_recv (pipe);
    int rc = !cmd || streq (cmd, "$TERM") ? -1 : 0;
    zstr_free (&cmd);
    return rc;
}

void
cn_cache_actor (zsock_t *pipe, void *args)
{
    const cn_cache_args_t *a = args;
    char name[16];
    snprintf (name, sizeof name, "cache-%d", a->shard);
    cn_thread_name (name);
    self_t *self = calloc (1, sizeof *self);
    self->cfg = a->cfg;
    self->stats = a->stats;
    self->pipe = pipe;
    self->dirty = zhashx_new ();
    self->redis = cn_redis_new (self->cfg->redis_url, self->cfg->redis_timeout_ms, COMPONENT);
    self->pull = zsock_new (ZMQ_PULL);
    zsock_set_rcvhwm (self->pull, 1000);
    if (!self->pull || zsock_bind (self->pull, CN_CACHE_FMT, a->shard) != 0) {
        /* The writer sees this as a failed START. */
        zsock_signal (pipe, 1);
        zsock_destroy (&self->pull);
        cn_redis_destroy (&self->redis);
        zhashx_destroy (&self->dirty);
        free (self);
        return;
    }
    zloop_t *loop = zloop_new ();
    zloop_set_nonstop (loop, true);
    zloop_reader (loop, pipe, s_on_pipe, self);
    zloop_reader (loop, self->pull, s_on_pull, self);
    self->loop = loop;
    zloop_timer (loop, 1000, 0, s_on_tick, self);
    bool up = cn_redis_ok (self->redis);
    cn_health_set ("redis", up);
    atomic_store (&self->stats->connected, up);
    zsock_signal (pipe, 0);
    zloop_start (loop);
    zloop_destroy (&loop);
    zsock_destroy (&self->pull);
    cn_redis_destroy (&self->redis);
    zhashx_destroy (&self->dirty);
    free (self);
}
