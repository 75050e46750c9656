/*
 * cn_config: JSON file plus CNAPI_* environment overrides. See include/cn_config.h.
 *
 * One table names every key once: its JSON path, its type, where it lives in
 * cn_config_t and its default. The loader is lib/cn_conftab.c (defaults, file,
 * environment); adding a key is adding one row.
 */
#include "cn_config.h"

#include "cn_conftab.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define S(path, field, def) CN_CONF_S (cn_config_t, path, field, def)
#define SS(path, field, def) CN_CONF_SS (cn_config_t, path, field, def)
#define I(path, field, def, lo, hi) CN_CONF_I (cn_config_t, path, field, def, lo, hi)

static const cn_conf_key_t s_keys[] = {
    S ("instance", instance, NULL),
    S ("datacenter_name", datacenter_name, "dc1"),
    S ("dns_domain", dns_domain, "example.com"),
    S ("log_level", log_level, "info"),
    S ("http.address", http_address, "127.0.0.1"),
    I ("http.port", http_port, 8080, 0, 65535),
    I ("http.max_body", http_max_body, 1048576, 1024, 64 * 1048576),
    S ("admin.endpoint", admin_endpoint, NULL),
    SS ("amqp.url", amqp_url, "amqp://guest:guest@127.0.0.1:5672"),
    S ("amqp.queue", amqp_queue, "ur.cnapi"),
    I ("amqp.prefetch", amqp_prefetch, 1000, 1, 65535),
    I ("amqp.max_message", amqp_max_message, 4194304, 1024, 64 * 1048576),
    SS ("postgres.conninfo", pg_conninfo, "host=127.0.0.1 port=5432 dbname=cnapi user=postgres"),
    I ("postgres.timeout_ms", pg_timeout_ms, 5000, 100, 600000),
    SS ("redis.url", redis_url, "redis://127.0.0.1:6379"),
    I ("redis.timeout_ms", redis_timeout_ms, 500, 10, 60000),
    I ("sysinfo_freshness_s", sysinfo_freshness_s, 90, 1, 86400),
    I ("writer.max_batch", writer_max_batch, 500, 1, 10000),
    I ("writer.shards", writer_shards, 2, 1, CN_WRITER_MAX_SHARDS),
    I ("backend_threads", backend_threads, 2, 1, 64),
    I ("list_cache_mb", list_cache_mb, 256, 0, 65536),
    I ("session.heartbeat_ms", session_heartbeat_ms, 1000, 50, 60000),
    I ("session.dead_after_ms", session_dead_after_ms, 2500, 150, 300000),
    I ("session.flush_ms", session_flush_ms, 30000, 100, 600000),
    I ("session.owner_grace_ms", session_owner_grace_ms, 5000, 0, 600000),
    I ("session.close_grace_ms", session_close_grace_ms, 500, 0, 60000),
    I ("tasks.per_agent", tasks_per_agent, 8, 1, 1024),
    I ("tasks.agent_timeout_ms", tasks_agent_timeout_ms, 10000, 100, 600000),
    I ("tasks.sweep_ms", tasks_sweep_ms, 5000, 100, 3600000),
    I ("tasks.max_age_s", tasks_max_age_s, 3600, 1, 30 * 86400),
};
#define NKEYS (sizeof s_keys / sizeof s_keys[0])

static const cn_conftab_t s_tab = { .keys = s_keys, .nkeys = NKEYS, .env_prefix = "CNAPI_" };

cn_config_t *
cn_config_load (const char *path, char *err, size_t errlen)
{
    cn_config_t *c = calloc (1, sizeof *c);
    if (!c) {
        snprintf (err, errlen, "out of memory");
        return NULL;
    }
    if (cn_conftab_load (&s_tab, c, path, err, errlen) != 0) {
        cn_config_destroy (&c);
        return NULL;
    }
    if (!c->instance || !*c->instance) {
        char host[256] = "cnapi";
        gethostname (host, sizeof host);
        host[sizeof host - 1] = '\0';
        char buf[300];
        snprintf (buf, sizeof buf, "%s-%d", host, (int) getpid ());
        free (c->instance);
        c->instance = strdup (buf);
    }
    if (!c->admin_endpoint || !*c->admin_endpoint) {
        char buf[512];
        snprintf (buf, sizeof buf, "ipc:///tmp/cnapid-%s.sock", c->instance);
        free (c->admin_endpoint);
        c->admin_endpoint = strdup (buf);
    }
    return c;
}

void
cn_config_destroy (cn_config_t **p)
{
    if (!p || !*p)
        return;
    cn_conftab_free (&s_tab, *p);
    free (*p);
    *p = NULL;
}

char *
cn_config_dump (const cn_config_t *c)
{
    json_t *root = json_object ();
    for (size_t i = 0; i < NKEYS; i++) {
        const cn_conf_key_t *k = &s_keys[i];
        char buf[128];
        snprintf (buf, sizeof buf, "%s", k->path);
        json_t *obj = root;
        char *dot = strchr (buf, '.');
        const char *leaf = buf;
        if (dot) {
            *dot = '\0';
            obj = json_object_get (root, buf);
            if (!obj) {
                obj = json_object ();
                json_object_set_new (root, buf, obj);
            }
            leaf = dot + 1;
        }
        json_object_set_new (obj, leaf, cn_conftab_value (c, k));
    }
    char *text = json_dumps (root, JSON_INDENT (2) | JSON_SORT_KEYS);
    json_decref (root);
    return text;
}
