/*
 * cn_sessions: the sessions actor: ownership of agent sessions in the store,
 * fencing, the instance's liveness, the status table, and the writes the
 * sessions cause (docs/sessions.md).
 *
 *   cn_sessions_args_t a = { cfg, live, hub, &stats, boot_id };
 *   zactor_t *s = zactor_new (cn_sessions_actor, &a);    // a outlives it
 *   zstr_send (s, "START");  -> "OK" | "ERROR" <reason>
 *
 * The hub (include/cn_hub.h, its own thread) binds a PUSH at
 * CN_SESSIONS_ENDPOINT; this actor connects a PULL there and gets the hub's
 * messages (proto/hub.md): hello, vm_event, bye, flush, sessions. It answers
 * through the hub's mailbox (cn_hub_post) with cn_hub_cmd_t (welcome, close,
 * snapshot). It owns its own store connection (cn_moray_t), two Redis
 * connections (commands, and the cnapi:status subscription), a DEALER to the
 * state writer (proto/writer.md: vms, vm_event) and the VM events actor
 * (include/cn_vmevents.h), which it starts.
 *
 * START loads the status table from the store (bounded by the store's
 * timeout; a store that is down is not fatal: the load is retried).
 *
 * Pipe: $TERM, START, STATUS (proto/status.md, actor "sessions").
 * Control socket (CN_CTL_FMT "sessions"): STATUS, and
 *   "SESSIONS" <offset> <limit>  -> one frame of JSON
 *        {total, offset, sessions: [{server_uuid, epoch, heartbeat_age_ms,
 *         connected_s, remote, state}]}, sorted by server_uuid; limit <= 5000.
 */
#ifndef CN_SESSIONS_H
#define CN_SESSIONS_H

#include <czmq.h>
#include <h2o.h>

#include "cn_config.h"
#include "cn_hub.h"
#include "cn_liveness.h"

#define CN_SESSIONS_PAGE_MAX 5000

typedef struct {
    const cn_config_t *cfg;
    cn_liveness_t *live;                 /* the status table: we are its writer */
    struct cn_hub *hub;                  /* the hub (its mailbox: cn_hub_post) */
    cn_hub_stats_t *stats;               /* the hub's counters (read only) */
    char boot_id[37];                    /* this instance's boot id */
} cn_sessions_args_t;

void cn_sessions_actor (zsock_t *pipe, void *args);

#endif
