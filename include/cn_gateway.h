/*
 * cn_gateway: the HTTP gateway actor (libh2o 2.2.5, evloop).
 *
 *   zactor_t *g = zactor_new (cn_gateway_actor, (void *) cfg);
 *   zstr_send (g, "START");  -> "OK" | "ERROR" <reason>  (bind happens here)
 *
 * The actor thread runs a zloop for its pipe and control socket; it starts a
 * second thread for h2o's event loop, which never blocks on the store or the
 * cache: reads go to backend worker actors (cn_backend) and writes through
 * them to the state writer; answers come back on an h2o multithread queue.
 *
 * Pipe: $TERM, START, STATUS (proto/status.md).
 */
#ifndef CN_GATEWAY_H
#define CN_GATEWAY_H

#include <czmq.h>

void cn_gateway_actor (zsock_t *pipe, void *args);

#endif
