/*
 * cn_agent_int: what lib/cn_agent.c and lib/cn_agent_http.c share. Not a
 * public header.
 */
#ifndef CN_AGENT_INT_H
#define CN_AGENT_INT_H

#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>

#include <h2o.h>

#include "cn_agent.h"
#include "cn_resolver.h"
#include "cn_wsclient.h"

#define CN_AGENT_MAX_TMOS 32

typedef struct aloop aloop_t;
typedef struct acn acn_t;

/* A timer with an arbitrary deadline (h2o_timeout_t only does fixed
 * durations): a binary heap per loop, run after every h2o_evloop_run. */
typedef struct atimer {
    int64_t due;                /* loop ms (h2o_now) */
    size_t pos;                 /* 1-based heap slot; 0 = not armed */
    void (*cb) (struct atimer *t);
} atimer_t;

struct acn {
    aloop_t *loop;
    cn_agents_t *a;
    size_t index;
    char uuid[37];
    char boot_id[37];
    char *admin_ip;
    int agent_port;
    cn_agent_sysinfo_fn_t *sysinfo;
    void *sysinfo_arg;
    cn_vmdummy_t *vms;
    atimer_t vm_timer;

    /* session (loop thread) */
    cn_wsc_t *ws;
    cn_retry_t retry;
    bool want_same;
    uint32_t last_addr;         /* network order; 0 = none yet */
    int64_t up_since;
    uint64_t hb_seq;
    int prev_instance;          /* instance id of the previous session, -1 */
    atimer_t wait_timer;
    h2o_timeout_entry_t open_tmo, hb_tmo, dead_tmo, sysinfo_tmo;
    h2o_timeout_t *dead_t;
    acn_t *rnext;               /* waiting for the loop's DNS answer */
    bool rwaiting;
    uint32_t sysinfo_crc;
    bool sysinfo_have;
    uint64_t sysinfo_n;

    /* read by other threads */
    atomic_int state;
    atomic_uint_fast64_t attempts, connects, reconnects, failovers, failures, losses,
        goaways, vm_events, sysinfo_sent, epoch;
    atomic_int instance;        /* interned name of the last welcome, -1 */
    atomic_uint addr;           /* current/last address */
    atomic_size_t nvms;

    struct atasks *tasks;       /* lib/cn_agent_tasks.c (loop thread); NULL until used */
};

typedef struct cn_agent_http cn_agent_http_t;

struct aloop {
    cn_agents_t *a;
    int index;
    pthread_t thread;
    bool thread_started;
    sem_t ready;
    int start_rc;
    char start_err[256];

    h2o_evloop_t *evloop;
    h2o_multithread_queue_t *queue;
    h2o_multithread_receiver_t rx;
    pthread_mutex_t post_mu;
    bool closed;                /* no more messages accepted (teardown) */

    atimer_t **heap;
    size_t hn, hcap;
    struct {
        uint64_t ms;
        h2o_timeout_t t;
    } tmos[CN_AGENT_MAX_TMOS];
    size_t ntmos;

    acn_t **cns;
    size_t ncns;

    /* DNS: one lookup in flight per loop, shared by its CNs */
    bool resolving;
    acn_t *rhead;
    cn_resolver_answer_t answer;
    bool have_answer;

    /* stop */
    bool stopping;
    int64_t stop_deadline;      /* loop ms */

    /* random VM changes */
    h2o_timeout_entry_t gen_tmo;
    uint64_t gen_last;
    double gen_budget;

    uint64_t rng[2];
    cn_agent_http_t *http;      /* loop 0, with a listener */
};

struct cn_agents {
    cn_agents_cfg_t cfg;        /* strings below are our copies */
    char *s_dc, *s_domain, *s_resolver, *s_agent, *s_amqp_url, *s_amqp_name, *s_listen;
    char *dns_name;
    acn_t **cns;
    size_t ncns, cap;
    long *hash;                 /* uuid -> index, open addressing, -1 empty */
    size_t hcap;
    aloop_t *loops;
    int nloops;
    cn_resolver_t *resolver;
    cn_publisher_t *pub;
    bool had_pub;
    cn_publisher_stats_t last_pub;  /* the publisher's counters when it stopped */
    int listen_fd;
    bool started, stopped;
    atomic_uint_fast64_t rate_milli;   /* events/s x 1000 */
    pthread_mutex_t inst_mu;
    char inst[CN_AGENTS_MAX_INSTANCES][64];
    atomic_int ninst;
};

/* Messages into a loop (h2o multithread queue). */
enum { AM_STOP, AM_RESOLVED, AM_RATE, AM_VMOP, AM_VMOP_REPLY, AM_TASK };

/* AM_TASK requests (answered with AM_VMOP_REPLY, possibly much later). */
typedef enum { TOP_POST, TOP_GET, TOP_HISTORY, TOP_PAUSE, TOP_RESUME } top_kind_t;

typedef enum {
    VMOP_HEALTH, VMOP_LIST, VMOP_GET, VMOP_CREATE, VMOP_START, VMOP_STOP, VMOP_REBOOT,
    VMOP_DESTROY, VMOP_UPDATE
} vmop_kind_t;

typedef struct {
    h2o_multithread_message_t super;
    int kind;
    /* AM_STOP */
    int grace_ms;
    /* AM_RESOLVED */
    cn_resolver_answer_t answer;
    /* AM_VMOP / AM_VMOP_REPLY */
    aloop_t *home;
    uint64_t req_id;
    acn_t *cn;
    vmop_kind_t op;
    char vm[37];
    json_t *params;             /* owned */
    int status;                 /* reply */
    json_t *body;               /* reply, owned */
    /* AM_TASK (params: the POST body {task, params}) */
    top_kind_t top;
    char task_id[37];           /* x-cnapi-task-id, or the :id of GET; "" when none */
    char xreq[64];              /* x-request-id, "" when none */
} amsg_t;

/* cn_agent.c, for the HTTP side. Post a message to a loop; false (and the
 * message freed) when that loop is shutting down. Thread safe. */
bool cn_agent_post (aloop_t *l, amsg_t *m);
/* Run a VM operation on the CN's own loop thread; returns the HTTP status and
 * sets *body (new reference). */
int cn_agent_vmop (acn_t *cn, vmop_kind_t op, const char *vm, const json_t *params, json_t **body);
acn_t *cn_agent_lookup (cn_agents_t *a, const char *uuid, size_t len);

/* cn_agent.c, for the task side (the CN's loop thread). */
void cn_agent_timer_start (aloop_t *l, atimer_t *t, int64_t delay_ms);
void cn_agent_timer_stop (aloop_t *l, atimer_t *t);
/* Arm the CN's VM transition timer after an operation. */
void cn_agent_vm_sched (acn_t *cn);
/* Publish the CN's sysinfo now (ur.sysinfo.<uuid>.<n>, changed or not).
 * 0, or -1 with err filled (no AMQP, no sysinfo source). */
int cn_agent_sysinfo_now (acn_t *cn, char *err, size_t errlen);

/* cn_agent_tasks.c (proto/tasks.md), on the CN's loop thread unless said. */
typedef enum {
    TK_NONE = -1, TK_CREATE, TK_BOOT, TK_SHUTDOWN, TK_REBOOT, TK_KILL, TK_UPDATE,
    TK_DESTROY, TK_SYSINFO, TK_LOAD
} tkind_t;
/* The task kind of a name, TK_NONE when unknown. Any thread. */
tkind_t cn_agent_task_kind (const char *name);
/* An AM_TASK message. true: m holds the answer (status, body) to send home
 * now; false: the answer comes later (when the task ends) or never (the
 * caller frees m either way, and m->params when still set). */
bool cn_agent_tasks_msg (acn_t *cn, amsg_t *m);
/* A welcome arrived: send the whole outbox again, in order. */
void cn_agent_tasks_welcome (acn_t *cn);
/* A task_ack frame; -1 when malformed (the session is closed 1002). */
int cn_agent_tasks_ack (acn_t *cn, const char *id, size_t idlen, uint64_t seq);
/* Every VM change of the CN (from the backend's event callback). */
void cn_agent_tasks_vm_event (acn_t *cn, const cn_vm_t *vm, cn_vm_event_t ev, int64_t time_ms);
/* The loop is stopping: held requests get 503 now (tasks stay as they are). */
void cn_agent_tasks_stop (acn_t *cn);
/* Free everything (after the loops ended). */
void cn_agent_tasks_free (acn_t *cn);

/* cn_agent_http.c, on loop 0's thread */
cn_agent_http_t *cn_agent_http_start (aloop_t *l, int fd, char *err, size_t errlen);
void cn_agent_http_shutdown (cn_agent_http_t *h);          /* stop accepting, close conns */
bool cn_agent_http_idle (cn_agent_http_t *h);              /* no connection left */
void cn_agent_http_destroy (cn_agent_http_t **p, bool clean);
void cn_agent_http_reply (cn_agent_http_t *h, amsg_t *m);  /* AM_VMOP_REPLY */

#endif
