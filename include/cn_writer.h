/*
 * cn_writer: the state writer actor. Owns the PostgreSQL (Moray layout)
 * connection for writes and the Redis write-through of server records.
 *
 *   zactor_t *w = zactor_new (cn_writer_actor, (void *) cfg);   // cfg outlives it
 *   zstr_send (w, "START");  -> "OK" | "ERROR" <reason>
 *
 * After START it binds a ROUTER at CN_WRITER_ENDPOINT. Clients connect a
 * DEALER and send one-frame msgpack requests (proto/writer.md: "sysinfo",
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

void cn_writer_actor (zsock_t *pipe, void *args);

#endif
