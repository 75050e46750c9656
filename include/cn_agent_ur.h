/*
 * cn_agent_ur: the agent's Ur consumer (docs/ur.md, proto/ur.md): runs the
 * scripts cnapid sends on ur.execute.<server_uuid>.<req_id> for a set of
 * CNs (one for provisioner, thousands for mockcloud) and publishes each
 * result on ur.execute-reply.<server_uuid>.<req_id>.
 *
 *   const char *uuids[] = { "...", NULL };
 *   cn_agent_ur_cfg_t c = { .url = "amqp://guest:guest@127.0.0.1:5672",
 *                           .name = "mockcloud ur" };
 *   cn_agent_ur_t *u = cn_agent_ur_new (&c, uuids, 1, err, sizeof err);
 *   ...
 *   cn_agent_ur_destroy (&u);     // kills running scripts, closes AMQP
 *
 * One thread of its own, one AMQP connection (apart from the agents'
 * publisher: consuming and replying need no confirms and no buffering), one
 * exclusive auto-delete queue bound once per CN to ur.execute.<uuid>.*.
 * Each script runs as `sh -c SCRIPT ur ARGS...` in a process group of its
 * own with the request's env (plus PATH when not given), stdin /dev/null;
 * stdout and stderr are captured up to max_output bytes each (the rest is
 * read and dropped, and the reply says truncated: true); after the
 * request's timeout the whole group gets SIGKILL and the reply says
 * timed_out: true. The thread never waits on a script: it polls the pipes
 * and a pidfd per child.
 *
 * SECURITY: scripts run for real, as the agent's user, on the agent's host.
 * For mockcloud that is the test host: anyone who can publish on the broker
 * can run commands there (docs/ur.md). --no-ur turns it off.
 */
#ifndef CN_AGENT_UR_H
#define CN_AGENT_UR_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct cn_agent_ur cn_agent_ur_t;

typedef struct {
    const char *url;          /* required */
    const char *name;         /* connection_name (may be NULL) */
    const char *shell;        /* "/bin/sh" */
    int max_running;          /* scripts at once: 32 */
    int max_queued;           /* waiting beyond that: 1000 (more: "busy" reply) */
    size_t max_output;        /* per stream: CN_UR_MAX_OUTPUT (1 MiB) */
    int timeout_ms;           /* connect and RPC bound: 3000 */
} cn_agent_ur_cfg_t;

typedef struct {
    bool connected;
    bool ready;               /* consuming: every binding is in place */
    uint64_t connects, received, started, completed, failed_start, timed_out, truncated,
             rejected, busy, replies, reply_failures;
    uint64_t running, queued;
    char last_error[160];
} cn_agent_ur_stats_t;

/* Start the thread (the broker is reached in the background). uuids: n
 * server uuids (copied). NULL with err filled on a bad URL or uuid. */
cn_agent_ur_t *cn_agent_ur_new (const cn_agent_ur_cfg_t *cfg, const char *const *uuids,
                                size_t n, char *err, size_t errlen);
/* Stop: running scripts' groups are killed and reaped; *p becomes NULL. */
void cn_agent_ur_destroy (cn_agent_ur_t **p);

void cn_agent_ur_stats (cn_agent_ur_t *u, cn_agent_ur_stats_t *out);
json_t *cn_agent_ur_stats_json (const cn_agent_ur_stats_t *s);

/* The reply body for a finished script (JSON text, malloc'd): exit_status
 * (the exit code; 128 + n when killed by signal n, and then signal: n),
 * stdout, stderr (invalid UTF-8 replaced), truncated and timed_out when
 * true. wstatus as from waitpid. */
char *cn_agent_ur_reply_body (int wstatus, const char *out, size_t out_len, const char *err,
                              size_t err_len, bool truncated, bool timed_out, size_t *len);

#endif
