/*
 * cn_vmevents: the VM events actor (design note step #5): this instance's
 * AMQP consumer of the VM events of the servers whose sessions it owns.
 *
 *   cn_vmevents_args_t a = { cfg };                    // outlives the actor
 *   zactor_t *v = zactor_new (cn_vmevents_actor, &a);
 *   zstr_send (v, "START");  -> "OK" | "ERROR" <reason>
 *   zstr_sendx (v, "BIND", server_uuid, NULL);         // no reply
 *   zstr_sendx (v, "UNBIND", server_uuid, NULL);       // no reply
 *
 * Implemented by the sysinfo listener's code in its VM events mode
 * (actors/cn_listener.c): the same connection handling, frame assembly,
 * writer hand-off and acks. One AMQP connection, one exclusive auto-delete
 * queue cnapi.vmevents.<instance>.<8 hex> (a fresh suffix per connection, so
 * a reconnect never trips over the old queue before the broker dropped it)
 * bound on amq.topic to vm.event.<server_uuid>.*
 * for every owned server (docs/vm-events.md has the routing scheme). Each
 * event body {server_uuid, vm_uuid, event, seq, time_ms, vm} becomes a
 * "vm_event" request to the state writer (proto/writer.md), and the message
 * is acked after the writer's result: the writer applies an event only when
 * its seq is newer than the stored VM's, so the same event arriving here and
 * over the session is applied once. A body that does not parse is rejected
 * without requeue. The broker going away: reconnect with backoff, declare
 * the queue again and bind every owned server again.
 *
 * Pipe: $TERM, START, BIND, UNBIND, STATUS (proto/status.md, "vmevents").
 * Control socket (CN_CTL_FMT "vmevents"): STATUS.
 */
#ifndef CN_VMEVENTS_H
#define CN_VMEVENTS_H

#include <czmq.h>

#include "cn_config.h"

typedef struct {
    const cn_config_t *cfg;
} cn_vmevents_args_t;

void cn_vmevents_actor (zsock_t *pipe, void *args);

#endif
