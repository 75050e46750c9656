/*
 * cn_config: the cnapid configuration.
 *
 * A JSON file (deploy/cnapid.example.json) with environment overrides:
 * each key path, upper-cased with '.' as '_', prefixed CNAPI_, e.g.
 * http.port -> CNAPI_HTTP_PORT, amqp.url -> CNAPI_AMQP_URL. The environment wins.
 * Every key has a default, so an empty file (or none) is valid.
 */
#ifndef CN_CONFIG_H
#define CN_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#define CN_WRITER_MAX_SHARDS 16

typedef struct {
    char *instance;           /* instance name; default: hostname-pid */
    char *datacenter_name;    /* "dc1" */
    char *dns_domain;         /* "example.com" */
    char *log_level;          /* "info" */

    char *http_address;       /* "127.0.0.1" */
    int   http_port;          /* 8080 */
    int   http_max_body;      /* bytes, 1 MiB */

    char *admin_endpoint;     /* "ipc:///tmp/cnapid-<instance>.sock" */

    char *amqp_url;           /* "amqp://guest:guest@127.0.0.1:5672" */
    char *amqp_queue;         /* "ur.cnapi" */
    int   amqp_prefetch;      /* 1000 */
    int   amqp_max_message;   /* bytes, 4 MiB: larger sysinfo is rejected */

    char *pg_conninfo;        /* "host=127.0.0.1 port=5432 dbname=cnapi user=postgres" */
    int   pg_timeout_ms;      /* 5000: connect and statement timeout */

    char *redis_url;          /* "redis://127.0.0.1:6379" */
    int   redis_timeout_ms;   /* 500 */

    int   sysinfo_freshness_s;/* 90: unsetup servers go unknown after this */
    int   writer_max_batch;   /* 500 messages per transaction */
    int   writer_shards;      /* 2 state writers (at most CN_WRITER_MAX_SHARDS), by server uuid */
    int   backend_threads;    /* 2 read workers for the HTTP gateway */
    int   list_cache_mb;      /* 256: bound of the backends' list-view cache; 0 = off */

    /* agent sessions (docs/sessions.md) */
    int   session_heartbeat_ms;   /* 1000: hb to each agent this often */
    int   session_dead_after_ms;  /* 2500: silence that ends a session */
    int   session_flush_ms;       /* 30000: batched last_heartbeat writes */
    int   session_owner_grace_ms; /* 5000: a dead instance's servers go unknown
                                     after this, unless their agents came back */
    int   session_close_grace_ms; /* 500: a closed session is released after this,
                                     unless its agent is back (quick retry) */

    /* tasks (proto/tasks.md) */
    int   tasks_per_agent;        /* 8: requests in flight per agent */
    int   tasks_agent_timeout_ms; /* 10000: connect + answer bound per request */
    int   tasks_sweep_ms;         /* 5000: look for orphaned active tasks */
    int   tasks_max_age_s;        /* 3600: an active task older than this is checked */
} cn_config_t;

/* Load path (NULL: defaults only), then apply CNAPI_* overrides.
 * Returns NULL and fills err on a bad file or a bad value. */
cn_config_t *cn_config_load (const char *path, char *err, size_t errlen);
void cn_config_destroy (cn_config_t **p);
/* The effective configuration as JSON text (caller frees); secrets masked. */
char *cn_config_dump (const cn_config_t *c);

#endif
