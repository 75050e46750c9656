/*
 * cn_agent: the compute-node agent library: one implementation, two front
 * ends (src/provisioner.c runs one CN, src/mockcloud.c runs thousands).
 *
 * A cn_agents_t is a set of CNs spread over T event-loop threads (h2o's
 * evloop), sharing one DNS resolver thread (include/cn_resolver.h) and one
 * AMQP publisher thread (include/cn_publisher.h). Per CN:
 *
 *   - the session (proto/session.md): resolve cnapi.<dc>.<domain> (all A
 *     records), WebSocket to one address, hello with the full VM state,
 *     welcome, heartbeats both ways, the instance is dead after 3 of its
 *     heartbeat intervals of silence; reconnect per the policy below;
 *   - sysinfo on AMQP: ur.startup.<uuid> at start, ur.sysinfo.<uuid>.<n> when
 *     it changes and every sysinfo_interval_s while unsetup;
 *   - the dummy VM backend (include/cn_vmdummy.h): every change is published
 *     on AMQP (docs/vm-events.md) and sent on the session as vm_event;
 *   - counters (connects, reconnects, failovers, ...) readable from any thread.
 *
 * One HTTP listener (optional) serves the agent endpoint for every CN of the
 * set, routed by the x-server-uuid header: GET /health, the VM operations
 * of the dummy backend, and the task API of proto/tasks.md (POST /tasks,
 * GET /tasks/:id, GET /history, POST /pause, /resume; lib/cn_agent_tasks.c):
 * tasks run on the CN's dummy backend and report task_event / task_end on
 * the session from an outbox kept until the instance acknowledges them.
 *
 *   cn_agents_cfg_t cfg;
 *   cn_agents_cfg_defaults (&cfg);
 *   cfg.resolver = "127.0.0.1:5353";
 *   cn_agents_t *a = cn_agents_new (&cfg, err, sizeof err);
 *   cn_agent_spec_t s = { .server_uuid = uuid, .sysinfo = s_sysinfo, ... };
 *   cn_agents_add (a, &s, err, sizeof err);
 *   cn_agents_start (a, err, sizeof err);
 *   ...
 *   cn_agents_stop (a, 2000);        // close frames (1000), flush AMQP
 *   cn_agents_destroy (&a);
 *
 * Reconnect policy (ARCHITECTURE.md "Decisions: Reconnect"), as the pure
 * functions cn_retry_next and cn_retry_pick below:
 *   - a session that ended after it was up for stable_ms (a clean close, a
 *     reset, EOF: "transient") gets ONE quick retry to the same address,
 *     after uniform [0, quick_ms] of jitter;
 *   - goaway (or close 1001 / 4001): another address at once, after uniform
 *     [0, goaway_jitter_ms];
 *   - otherwise (the quick retry failed, connect refused or timed out,
 *     upgrade refused, heartbeat silence, a protocol error): re-resolve (a
 *     cached answer younger than resolve_cache_ms is shared by every CN of
 *     the process) and pick uniformly at random among the addresses other
 *     than the last one, after cn_backoff_ms (attempt, base, cap): exponential
 *     backoff with full jitter; the attempt count resets once a session has
 *     stayed up stable_ms.
 */
#ifndef CN_AGENT_H
#define CN_AGENT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cn_publisher.h"
#include "cn_vmdummy.h"

/* ---- the reconnect policy (pure) ---- */

typedef enum {
    CN_LOSS_TRANSIENT,        /* an established session ended: close, EOF, reset */
    CN_LOSS_SILENT,           /* heartbeat timeout: the instance is dead or cut off */
    CN_LOSS_GOAWAY,           /* goaway, close 1001 or 4001 */
    CN_LOSS_FAILED            /* an attempt that never got a welcome, or a protocol error */
} cn_loss_t;

typedef struct {
    int base_ms;              /* backoff base (100) */
    int cap_ms;               /* backoff cap (5000) */
    int quick_ms;             /* jitter of the quick retry (100) */
    int goaway_ms;            /* jitter after goaway (100) */
    int stable_ms;            /* a session up this long resets the backoff (5000) */
} cn_retry_cfg_t;

typedef struct {
    int attempt;              /* consecutive failures since the last stable session */
    bool quick_ok;            /* a quick retry is allowed (a stable session just ended) */
} cn_retry_t;

typedef struct {
    bool same;                /* retry the last address (no DNS) */
    int delay_ms;
} cn_next_t;

/* What to do after a loss; up_ms: how long the lost session had been up
 * (0 if it never was). Updates *r. rnd: a random number (the jitter). */
cn_next_t cn_retry_next (cn_retry_t *r, cn_loss_t loss, int64_t up_ms,
                         const cn_retry_cfg_t *cfg, uint32_t rnd_a, uint32_t rnd_b);
/* The index in addrs[0..n) to connect to: uniform among those != last (a
 * uniform pick among all when every address is last); -1 when n == 0. */
int cn_retry_pick (const uint32_t *addrs, size_t n, uint32_t last, uint32_t rnd);

/* ---- the set of agents ---- */

typedef struct cn_agents cn_agents_t;

typedef struct {
    /* discovery */
    const char *datacenter_name;  /* "dc1" */
    const char *dns_domain;       /* "example.com" */
    const char *resolver;         /* "a.b.c.d[:port]"; NULL: the system's */
    int cnapi_port;               /* port of every instance (8080) */
    int resolve_cache_ms;         /* 1000 */
    /* session */
    int heartbeat_ms;             /* 1000 */
    int open_timeout_ms;          /* connect + upgrade + welcome (5000) */
    cn_retry_cfg_t retry;
    int ramp_ms;                  /* first attempts spread uniformly over this (0) */
    const char *agent;            /* hello's agent ("provisioner/" CNAPI_VERSION) */
    /* AMQP (NULL url: no publishing) */
    const char *amqp_url;
    const char *amqp_name;        /* connection name shown by the broker */
    int amqp_window;              /* 1000 */
    size_t amqp_buffer;           /* 100000 */
    int sysinfo_interval_s;       /* 60 */
    /* VM backend */
    cn_vmdummy_delays_t delays;
    /* tasks (proto/tasks.md) */
    int tasks_max;                /* task records kept per CN (1000): the oldest ended and
                                     acknowledged go first; when none can go, POST /tasks
                                     answers 503 "outbox full" */
    int task_timeout_ms;          /* a task not ended by then fails "Timeout" (600000) */
    /* threads and the agent endpoint */
    int threads;                  /* 1 */
    const char *listen;           /* "addr:port"; NULL: no listener */
    /* per-session log lines at this level (info for one CN, debug for many) */
    int session_log_level;
} cn_agents_cfg_t;

void cn_agents_cfg_defaults (cn_agents_cfg_t *cfg);

/* A CN's sysinfo as JSON text (malloc'd), called on the CN's loop thread at
 * start and every sysinfo_interval_s; *setup: whether "Setup" is true.
 * NULL: nothing to publish now. */
typedef char *(cn_agent_sysinfo_fn_t) (void *arg, size_t index, size_t *len, bool *setup);

typedef struct {
    const char *server_uuid;      /* required */
    const char *admin_ip;         /* hello's admin_ip (may be NULL) */
    int agent_port;               /* hello's agent_port (0: 5309) */
    cn_agent_sysinfo_fn_t *sysinfo;  /* NULL: no sysinfo messages */
    void *sysinfo_arg;
    const char *vm_dir;           /* NULL: VMs in memory */
    size_t sim_vms;               /* start with this many simulated VMs */
    const char *sim_prefix;       /* their uuid prefix (8 hex) */
    uint64_t sim_index;           /* their CN index */
} cn_agent_spec_t;

/* NULL with err filled on a bad configuration (resolver, AMQP URL, listen
 * address). Nothing runs before cn_agents_start. */
cn_agents_t *cn_agents_new (const cn_agents_cfg_t *cfg, char *err, size_t errlen);
/* Add a CN (before start). Its index (0, 1, ...), or -1 with err filled
 * (bad or duplicate uuid, VM directory unusable). */
long cn_agents_add (cn_agents_t *a, const cn_agent_spec_t *spec, char *err, size_t errlen);
/* Bind the listener, start the resolver, the publisher and the loop threads.
 * 0, or -1 with err filled (nothing left running). */
int cn_agents_start (cn_agents_t *a, char *err, size_t errlen);
/* Every CN closes its session (close 1000 "agent stopping") within grace_ms,
 * the loops end, then the publisher gets what is left of grace_ms (at least
 * 1 s) to have everything confirmed. Idempotent. */
void cn_agents_stop (cn_agents_t *a, int grace_ms);
void cn_agents_destroy (cn_agents_t **p);

/* Random VM changes at this many events per second over all CNs (0: off).
 * Thread safe; takes effect within 10 ms. */
void cn_agents_set_event_rate (cn_agents_t *a, double per_s);

/* ---- counters ---- */

typedef enum {
    CN_SESS_IDLE, CN_SESS_WAIT, CN_SESS_RESOLVING, CN_SESS_CONNECTING,
    CN_SESS_HELLO, CN_SESS_UP, CN_SESS_STOPPED
} cn_sess_state_t;

const char *cn_sess_state_name (cn_sess_state_t s);

typedef struct {
    char server_uuid[37];
    cn_sess_state_t state;
    uint64_t attempts;            /* connection attempts */
    uint64_t connects;            /* sessions established (welcome) */
    uint64_t reconnects;          /* sessions after the first */
    uint64_t failovers;           /* sessions on another instance than the previous one */
    uint64_t failures;            /* attempts that never got a welcome */
    uint64_t losses;              /* established sessions lost */
    uint64_t goaways;
    uint64_t vm_events;
    uint64_t sysinfo_sent;
    uint64_t epoch;               /* from the last welcome */
    char instance[64];            /* the last welcome's instance ("" if none yet) */
    char address[24];             /* the current or last address, "ip:port" */
    size_t vms;
} cn_agent_info_t;

size_t cn_agents_count (const cn_agents_t *a);
/* Index of a server uuid (case-insensitive), or -1. */
long cn_agents_find (const cn_agents_t *a, const char *uuid);
/* A CN's counters; false when idx is out of range. Thread safe. */
bool cn_agents_info (cn_agents_t *a, size_t idx, cn_agent_info_t *out);
json_t *cn_agent_info_json (const cn_agent_info_t *i);

#define CN_AGENTS_MAX_INSTANCES 64

typedef struct {
    size_t cns;
    size_t connected;             /* in state up */
    size_t states[CN_SESS_STOPPED + 1];
    uint64_t attempts, connects, reconnects, failovers, failures, losses, goaways;
    uint64_t vm_events, sysinfo_sent;
    uint64_t dns_queries;
    bool amqp;
    cn_publisher_stats_t pub;
    size_t ninstances;            /* sessions up, per the instance that welcomed them */
    struct {
        char name[64];
        size_t sessions;
    } inst[CN_AGENTS_MAX_INSTANCES];
} cn_agents_stats_t;

void cn_agents_stats (cn_agents_t *a, cn_agents_stats_t *out);
/* One JSON object (the mockcloud --stats line). */
json_t *cn_agents_stats_json (const cn_agents_stats_t *s);

#endif
