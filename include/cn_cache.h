/*
 * cn_cache: the cache writer actor, a child of the state writer.
 *
 * The state writer hands every committed batch of server records to this
 * actor (PUSH to CN_CACHE_FMT with the writer's shard, one "cache_puts" message per batch,
 * proto/writer.md) and goes on with the next transaction; this actor writes
 * them through to Redis (versioned, pipelined: cn_redis_cache_apply). Redis
 * is a cache: it is never on the commit path, and a slow or dead Redis never
 * holds a sysinfo ack. Each message carries a seq; after a round of them
 * (written, or remembered as dirty when Redis failed) the actor sends
 * "cache_done" {seq} on its pipe, and the writer answers the HTTP writes it
 * held until then (read your writes through the shared cache).
 *
 * Redis down: the uuids it could not update are remembered and dropped from
 * Redis when it comes back (readers then refill from PostgreSQL); past
 * CN_CACHE_DIRTY_MAX of them the whole server cache is dropped instead.
 * Until they are dropped Redis may still hold their previous versions, so
 * "cache_done" waits for the drop, for at most CN_CACHE_HOLD_MS from the
 * first failure; past that (Redis stays away) it is sent at once again
 * until a drop succeeds.
 *
 *   cn_cache_stats_t stats = { 0 };
 *   cn_cache_args_t args = { cfg, &stats, shard };
 *   zactor_t *c = zactor_new (cn_cache_actor, &args);   // binds, then signals
 *
 * Pipe: $TERM in; "cache_done" out. Counters are read from *stats (atomics) by the writer's STATUS.
 */
#ifndef CN_CACHE_H
#define CN_CACHE_H

#include <czmq.h>
#include <stdatomic.h>

#include "cn_config.h"

#define CN_CACHE_FMT "inproc://cnapi-cache-%d"
#define CN_CACHE_DIRTY_MAX 100000
#define CN_CACHE_HOLD_MS 3000     /* cache_done waits this long at most for a drop */

typedef struct {
    atomic_bool connected;
    atomic_ullong batches, records, failures, dirty, queued;
} cn_cache_stats_t;

typedef struct {
    const cn_config_t *cfg;
    cn_cache_stats_t *stats;
    int shard;                /* the writer shard it serves */
} cn_cache_args_t;

void cn_cache_actor (zsock_t *pipe, void *args);

#endif
