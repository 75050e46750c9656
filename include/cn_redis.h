/*
 * cn_redis: a synchronous hiredis connection with timeouts and reconnect
 * backoff, plus the shared server cache operations.
 *
 * Cache layout (docs/design.md): hash cnapi:server:<uuid> {v: version, j: json}
 * or a tombstone {v: version, d: 1} after a delete (TTL 1 h). A write is applied
 * only when its version is newer than the cached one (a Lua script), so racing
 * writers and late cache fills never move the cache backwards. Every applied
 * change is announced on channel cnapi:invalidate as "<uuid> <version>".
 */
#ifndef CN_REDIS_H
#define CN_REDIS_H

#include <hiredis.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_REDIS_INVALIDATE_CHANNEL "cnapi:invalidate"

typedef struct cn_redis cn_redis_t;

cn_redis_t *cn_redis_new (const char *url, int timeout_ms, const char *component);
void cn_redis_destroy (cn_redis_t **p);
/* Connected, or reconnected now if the backoff allows; false while down. */
bool cn_redis_ok (cn_redis_t *r);
/* The live context after cn_redis_ok() returned true. */
redisContext *cn_redis_ctx (cn_redis_t *r);
/* Mark the connection broken (after an I/O error); reconnect after backoff. */
void cn_redis_failed (cn_redis_t *r, const char *why);
/* Run a command; NULL (and the connection marked broken) on I/O error. */
redisReply *cn_redis_cmd (cn_redis_t *r, const char *fmt, ...);
uint64_t cn_redis_errors (const cn_redis_t *r);
bool cn_redis_connected (const cn_redis_t *r);

/* One cache change for cn_redis_cache_apply. json NULL = tombstone (deleted). */
typedef struct {
    const char *uuid;
    int64_t version;
    const char *json;
    size_t len;
    bool fill;                /* a read-miss fill: nothing changed, don't announce */
} cn_cache_put_t;

/* Apply n changes pipelined in one round trip; 0 ok, -1 on error. */
int cn_redis_cache_apply (cn_redis_t *r, const cn_cache_put_t *puts, size_t n);
/* Look up a server: 1 hit (*json malloc'd), 0 miss, 2 tombstone, -1 error. */
/* Drop cached entries (after writes that could not reach Redis) and announce
 * them; n == 0 with all == true drops every cached server. */
int cn_redis_cache_drop (cn_redis_t *r, const char *const *uuids, size_t n, bool all);
int cn_redis_cache_get (cn_redis_t *r, const char *uuid, char **json, size_t *len,
                        int64_t *version);

#endif
