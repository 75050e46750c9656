/*
 * cn_writer: the state writer actor. Owns the PostgreSQL (Moray layout)
 * connection for writes and the Redis write-through of server records.
 *
 *   cn_writer_args_t a = { cfg, k };                              // both outlive it
 *   zactor_t *w = zactor_new (cn_writer_actor, &a);
 *   zstr_send (w, "START");  -> "OK" | "ERROR" <reason>
 *
 * cnapid runs cfg->writer_shards of them ("writer-0", "writer-1", ...): shard
 * k writes the servers cn_writer_shard (uuid) maps to k, with its own
 * PostgreSQL connection, record cache and cache writer, so one shard's CPU
 * work overlaps another's wait on PostgreSQL. After START shard k binds a
 * ROUTER at CN_WRITER_FMT (k). Clients hold one cn_writer_client socket
 * (include/cn_actor.h) and send one-frame msgpack requests (proto/writer.md: "sysinfo",
 * "update_server", "delete_server"); each gets one "result" frame back, sent
 * only after the transaction that holds its write has committed (or the
 * request failed for good). Requests are group-committed: everything waiting
 * is taken in one transaction, up to writer_max_batch.
 *
 * Source "amqp" requests are retried with backoff while PostgreSQL is down
 * (the message stays unacked meanwhile); source "http" requests fail fast
 * with a 500 so an API caller is never held.
 *
 * Pipe: $TERM, START, STATUS (proto/status.md).
 */
#ifndef CN_WRITER_H
#define CN_WRITER_H

#include <czmq.h>

#include "cn_config.h"

typedef struct {
    const cn_config_t *cfg;
    int shard;                /* 0 .. cfg->writer_shards - 1 */
} cn_writer_args_t;

void cn_writer_actor (zsock_t *pipe, void *args);

#endif
