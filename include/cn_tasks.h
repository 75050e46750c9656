/*
 * cn_tasks: the tasks service behind the HTTP gateway (proto/tasks.md).
 *
 *   cn_backend_args_t a = { cfg, &receiver, 0, live, hub_mailbox, boot_id };
 *   zactor_t *t = zactor_new (cn_tasks_actor, &a);     // a outlives it
 *   zstr_send (t, "START");  -> "OK" | "ERROR" <reason>
 *
 * The gateway binds a PUSH at CN_TASKS_ENDPOINT and hands this actor one
 * msgpack frame per request (proto/backend.md framing plus uuid, sub,
 * action): vm_create, vm_load, vm_destroy, vm_action, sysinfo_refresh,
 * task_get, task_wait. Answers are cn_backend_reply_t through the gateway's
 * reply receiver. The actor binds a PULL at CN_TASKS_FRAMES_ENDPOINT for the
 * agents' task_event / task_end frames from the session hub, and answers
 * task_ack through the hub's mailbox (CN_HUB_SEND).
 *
 * It owns a store connection (bucket cnapi_tasks, created at START), two
 * Redis connections (commands and the cnapi:tasks subscription), and a
 * non-blocking HTTP client to the agents (lib/cn_httpc.c). Nothing here
 * waits on an agent or a waiting client: waits are held in memory and
 * answered from the loop.
 *
 * Pipe: $TERM, START, STATUS (proto/status.md, actor "tasks").
 * Control socket (CN_CTL_FMT "tasks"): STATUS.
 */
#ifndef CN_TASKS_H
#define CN_TASKS_H

#include <czmq.h>

#include "cn_backend.h"
#include "cn_task.h"

void cn_tasks_actor (zsock_t *pipe, void *args);

#endif
