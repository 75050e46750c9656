/*
 * cn_backend_extra: the backend's capacity, platform and boot-parameter
 * routes (proto/backend.md types "capacity", "platforms", "boot_get",
 * "boot_set", "boot_update"; docs/api.md). Called from a backend actor's
 * thread with that backend's own store and cache connections; answers go
 * straight to the gateway's reply queue (include/cn_svc.h).
 *
 *   cn_bextra_t x = { cfg, receiver, moray, redis, "backend" };
 *   if (!cn_backend_extra (&x, &msg, id, req_id)) ... not one of ours
 *
 * Boot parameter writes are read-modify-write transactions on the locked
 * row (SELECT ... FOR UPDATE), like the state writer's, followed by a
 * versioned write-through to the Redis cache (which announces the change
 * to every instance's near cache).
 */
#ifndef CN_BACKEND_EXTRA_H
#define CN_BACKEND_EXTRA_H

#include <stdbool.h>
#include <stdint.h>

#include "cn_backend.h"
#include "cn_config.h"
#include "cn_moray.h"
#include "cn_msg.h"
#include "cn_redis.h"

typedef struct {
    const cn_config_t *cfg;
    h2o_multithread_receiver_t *rx;   /* the gateway's reply queue */
    cn_moray_t *moray;                /* borrowed */
    cn_redis_t *redis;                /* borrowed */
    const char *component;            /* for logs */
    bool boot_bucket_ready;           /* cnapi_boot exists (created on first use) */
    uint64_t requests, boot_writes;   /* counters */
} cn_bextra_t;

/* Handle m when its type is one of ours and answer it: true. false (and
 * nothing sent) when the type is not ours. */
bool cn_backend_extra (cn_bextra_t *x, const cn_msg_t *m, uint64_t id, const char *req_id);

#endif
