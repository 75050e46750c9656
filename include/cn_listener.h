/*
 * cn_listener: the sysinfo listener actor (design note step #1).
 *
 *   zactor_t *l = zactor_new (cn_listener_actor, (void *) cfg);
 *   zstr_send (l, "START");  -> "OK" | "ERROR" <reason>
 *
 * One AMQP connection. Declares the durable queue amqp_queue ("ur.cnapi")
 * bound on amq.topic to ur.sysinfo.# and ur.startup.#, consumes it with
 * prefetch amqp_prefetch and hands each message to the state writer
 * (proto/writer.md "sysinfo"). A message is acked only when the writer's
 * "result" says its write committed. A body that is not JSON, has no valid
 * UUID, or whose UUID disagrees with the routing key is rejected without
 * requeue and logged. The broker going away means reconnect with backoff;
 * unacked messages are redelivered by the broker and rewriting them is
 * harmless.
 *
 * Pipe: $TERM, START, STATUS (proto/status.md).
 */
#ifndef CN_LISTENER_H
#define CN_LISTENER_H

#include <czmq.h>

void cn_listener_actor (zsock_t *pipe, void *args);

#endif
