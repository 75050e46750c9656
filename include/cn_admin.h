/*
 * cn_admin: the operator socket actor.
 *
 *   zactor_t *a = zactor_new (cn_admin_actor, (void *) cfg);
 *   zstr_sendx (a, "START", "writer", "listener", "gateway", NULL);  -> "OK" | "ERROR" <reason>
 *
 * Binds a ROUTER at admin_endpoint (tcp on loopback or ipc). Requests are
 * one frame of text; replies one frame of JSON:
 *   "STATUS"          {instance, version, pid, uptime_s, actors:{name: status}}
 *   "ACTORS"          the same actors map alone
 *   "LOGLEVEL" [lvl]  {"level": "<name>"} (sets it when lvl is given)
 *   "CONFIG"          the effective configuration (secrets masked)
 *   "SESSIONS" [offset] [limit]
 *                     {instance, total, offset, sessions: [{server_uuid, epoch,
 *                     heartbeat_age_ms, connected_s, remote, state}]}: this
 *                     instance's agent sessions by server_uuid, a page of at
 *                     most limit (default 1000, at most 5000)
 * Actors are asked over their control sockets (cn_actor.h) with a 1 s timeout;
 * an actor that does not answer shows {"error": "timeout"}.
 */
#ifndef CN_ADMIN_H
#define CN_ADMIN_H

#include <czmq.h>

void cn_admin_actor (zsock_t *pipe, void *args);

#endif
