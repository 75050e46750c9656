/*
 * cn_ur: the "ur" service behind the HTTP gateway: POST /servers/:uuid/execute
 * through Ur over AMQP (docs/ur.md, proto/ur.md).
 *
 *   cn_backend_args_t a = { cfg, &receiver, 0, live };   // outlives the actor
 *   zactor_t *u = zactor_new (cn_ur_actor, &a);
 *   zstr_send (u, "START");  -> "OK" | "ERROR" <reason>
 *
 * The gateway starts it (s_services[SVC_UR]) and pushes "execute" requests
 * (proto/backend.md framing) to CN_UR_ENDPOINT; the answers go back as
 * cn_backend_reply_t through the gateway's reply queue. One AMQP connection;
 * the broker being down is not a START failure (the actor reconnects with
 * backoff, and executes are answered 503 meanwhile).
 *
 * Pipe: $TERM, START, STATUS (proto/status.md, actor "ur"). Control socket:
 * CN_CTL_FMT "ur" answers STATUS.
 */
#ifndef CN_UR_H
#define CN_UR_H

#include <czmq.h>

void cn_ur_actor (zsock_t *pipe, void *args);

#endif
