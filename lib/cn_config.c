/*
 * cn_config: JSON file plus CNAPI_* environment overrides. See include/cn_config.h.
 *
 * One table names every key once: its JSON path, its type, where it lives in
 * cn_config_t and its default. Loading walks the table three times: defaults,
 * file, environment; so adding a key is adding one row.
 */
#include "cn_config.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef enum { K_STR, K_INT } s_kind_t;

typedef struct {
    const char *path;         /* "http.port" */
    s_kind_t kind;
    size_t offset;
    const char *def_str;
    int def_int, min, max;
    bool secret;
} s_key_t;

#define S(path, field, def) { path, K_STR, offsetof (cn_config_t, field), def, 0, 0, 0, false }
#define SS(path, field, def) { path, K_STR, offsetof (cn_config_t, field), def, 0, 0, 0, true }
#define I(path, field, def, lo, hi) { path, K_INT, offsetof (cn_config_t, field), NULL, def, lo, hi, false }

static const s_key_t s_keys[] = {
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
    I ("backend_threads", backend_threads, 2, 1, 64),
    I ("session.heartbeat_ms", session_heartbeat_ms, 1000, 50, 60000),
    I ("session.dead_after_ms", session_dead_after_ms, 3000, 150, 300000),
    I ("session.flush_ms", session_flush_ms, 5000, 100, 600000),
    I ("session.owner_grace_ms", session_owner_grace_ms, 5000, 0, 600000),
    I ("session.close_grace_ms", session_close_grace_ms, 500, 0, 60000),
    I ("tasks.per_agent", tasks_per_agent, 8, 1, 1024),
    I ("tasks.agent_timeout_ms", tasks_agent_timeout_ms, 10000, 100, 600000),
    I ("tasks.sweep_ms", tasks_sweep_ms, 5000, 100, 3600000),
    I ("tasks.max_age_s", tasks_max_age_s, 3600, 1, 30 * 86400),
};
#define NKEYS (sizeof s_keys / sizeof s_keys[0])

static char **
s_str (cn_config_t *c, const s_key_t *k)
{
    return (char **) ((char *) c + k->offset);
}

static int *
s_int (cn_config_t *c, const s_key_t *k)
{
    return (int *) ((char *) c + k->offset);
}

static int
s_set_int (cn_config_t *c, const s_key_t *k, long long v, const char *from, char *err, size_t errlen)
{
    if (v < k->min || v > k->max) {
        snprintf (err, errlen, "%s: %s must be between %d and %d", from, k->path, k->min, k->max);
        return -1;
    }
    *s_int (c, k) = (int) v;
    return 0;
}

static void
s_set_str (cn_config_t *c, const s_key_t *k, const char *v)
{
    free (*s_str (c, k));
    *s_str (c, k) = v ? strdup (v) : NULL;
}

/* Look up "a.b" in a JSON object. */
static json_t *
s_lookup (json_t *root, const char *path)
{
    char buf[128];
    snprintf (buf, sizeof buf, "%s", path);
    json_t *cur = root;
    char *save = NULL;
    for (char *part = strtok_r (buf, ".", &save); part; part = strtok_r (NULL, ".", &save)) {
        if (!json_is_object (cur))
            return NULL;
        cur = json_object_get (cur, part);
        if (!cur)
            return NULL;
    }
    return cur;
}

static int
s_apply_file (cn_config_t *c, const char *path, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file (path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf (err, errlen, "%s:%d: %s", path, jerr.line, jerr.text);
        return -1;
    }
    int rc = 0;
    if (!json_is_object (root)) {
        snprintf (err, errlen, "%s: the configuration must be a JSON object", path);
        rc = -1;
    }
    for (size_t i = 0; rc == 0 && i < NKEYS; i++) {
        const s_key_t *k = &s_keys[i];
        json_t *v = s_lookup (root, k->path);
        if (!v || json_is_null (v))
            continue;
        if (k->kind == K_STR) {
            if (!json_is_string (v)) {
                snprintf (err, errlen, "%s: %s must be a string", path, k->path);
                rc = -1;
            }
            else
                s_set_str (c, k, json_string_value (v));
        }
        else {
            if (!json_is_integer (v)) {
                snprintf (err, errlen, "%s: %s must be an integer", path, k->path);
                rc = -1;
            }
            else
                rc = s_set_int (c, k, json_integer_value (v), path, err, errlen);
        }
    }
    json_decref (root);
    return rc;
}

static void
s_env_name (const char *path, char *out, size_t len)
{
    size_t n = (size_t) snprintf (out, len, "CNAPI_");
    for (const char *p = path; *p && n + 1 < len; p++)
        out[n++] = *p == '.' ? '_' : (char) toupper ((unsigned char) *p);
    out[n] = '\0';
}

static int
s_apply_env (cn_config_t *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < NKEYS; i++) {
        const s_key_t *k = &s_keys[i];
        char name[96];
        s_env_name (k->path, name, sizeof name);
        const char *v = getenv (name);
        if (!v)
            continue;
        if (k->kind == K_STR)
            s_set_str (c, k, v);
        else {
            char *end;
            errno = 0;
            long long n = strtoll (v, &end, 10);
            if (errno || end == v || *end) {
                snprintf (err, errlen, "%s: not an integer: %s", name, v);
                return -1;
            }
            if (s_set_int (c, k, n, name, err, errlen) != 0)
                return -1;
        }
    }
    return 0;
}

cn_config_t *
cn_config_load (const char *path, char *err, size_t errlen)
{
    cn_config_t *c = calloc (1, sizeof *c);
    if (!c) {
        snprintf (err, errlen, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < NKEYS; i++) {
        if (s_keys[i].kind == K_STR)
            s_set_str (c, &s_keys[i], s_keys[i].def_str);
        else
            *s_int (c, &s_keys[i]) = s_keys[i].def_int;
    }
    if ((path && s_apply_file (c, path, err, errlen) != 0) || s_apply_env (c, err, errlen) != 0) {
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
    cn_config_t *c = *p;
    for (size_t i = 0; i < NKEYS; i++)
        if (s_keys[i].kind == K_STR)
            free (*s_str (c, &s_keys[i]));
    free (c);
    *p = NULL;
}

/* amqp://user:pass@host -> amqp://user:***@host; conninfo password=x -> *** */
static char *
s_mask (const char *v)
{
    char *out = strdup (v ? v : "");
    if (!out)
        return NULL;
    char *scheme = strstr (out, "://");
    if (scheme) {
        char *at = strchr (scheme + 3, '@');
        char *colon = strchr (scheme + 3, ':');
        if (at && colon && colon < at)
            memset (colon + 1, '*', (size_t) (at - colon - 1));
    }
    char *pw = strstr (out, "password=");
    if (pw)
        for (char *p = pw + 9; *p && *p != ' '; p++)
            *p = '*';
    return out;
}

char *
cn_config_dump (const cn_config_t *c)
{
    json_t *root = json_object ();
    for (size_t i = 0; i < NKEYS; i++) {
        const s_key_t *k = &s_keys[i];
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
        if (k->kind == K_INT)
            json_object_set_new (obj, leaf, json_integer (*s_int ((cn_config_t *) c, k)));
        else {
            const char *v = *s_str ((cn_config_t *) c, k);
            if (k->secret) {
                char *m = s_mask (v);
                json_object_set_new (obj, leaf, json_string (m));
                free (m);
            }
            else
                json_object_set_new (obj, leaf, v ? json_string (v) : json_null ());
        }
    }
    char *text = json_dumps (root, JSON_INDENT (2) | JSON_SORT_KEYS);
    json_decref (root);
    return text;
}
