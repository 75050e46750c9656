/*
 * cn_agent_config: JSON file plus CNAPI_AGENT_* environment overrides. See
 * include/cn_agent_config.h.
 *
 * One table names every key once (path, type, field, default, bounds);
 * loading walks it three times: defaults, file, environment.
 */
#include "cn_agent_config.h"

#include "cn_util.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { K_STR, K_INT } s_kind_t;

typedef struct {
    const char *path;
    s_kind_t kind;
    size_t offset;
    const char *def_str;
    int def_int, min, max;
    bool secret;
} s_key_t;

#define S(path, field, def) { path, K_STR, offsetof (cn_agent_config_t, field), def, 0, 0, 0, false }
#define SS(path, field, def) { path, K_STR, offsetof (cn_agent_config_t, field), def, 0, 0, 0, true }
#define I(path, field, def, lo, hi) { path, K_INT, offsetof (cn_agent_config_t, field), NULL, def, lo, hi, false }

static const s_key_t s_keys[] = {
    S ("server_uuid", server_uuid, ""),
    S ("datacenter_name", datacenter_name, "dc1"),
    S ("dns_domain", dns_domain, "example.com"),
    S ("resolver", resolver, ""),
    I ("cnapi_port", cnapi_port, 8080, 1, 65535),
    S ("admin_ip", admin_ip, ""),
    I ("agent_port", agent_port, 5309, 1, 65535),
    S ("listen", listen, ""),
    I ("heartbeat_ms", heartbeat_ms, 1000, 50, 60000),
    I ("open_timeout_ms", open_timeout_ms, 5000, 100, 600000),
    I ("backoff.base_ms", backoff_base_ms, 100, 1, 60000),
    I ("backoff.cap_ms", backoff_cap_ms, 5000, 1, 600000),
    I ("resolve_cache_ms", resolve_cache_ms, 1000, 0, 600000),
    S ("vm.dir", vm_dir, ""),
    I ("vm.create_ms", vm_create_ms, 1000, 0, 3600000),
    I ("vm.start_ms", vm_start_ms, 500, 0, 3600000),
    I ("vm.stop_ms", vm_stop_ms, 500, 0, 3600000),
    I ("vm.reboot_ms", vm_reboot_ms, 1000, 0, 3600000),
    I ("vm.destroy_ms", vm_destroy_ms, 500, 0, 3600000),
    SS ("amqp.url", amqp_url, "amqp://guest:guest@127.0.0.1:5672"),
    I ("amqp.window", amqp_window, 1000, 1, 100000),
    I ("amqp.buffer", amqp_buffer, 100000, 1, 10000000),
    S ("sysinfo.file", sysinfo_file, ""),
    I ("sysinfo.interval_s", sysinfo_interval_s, 60, 1, 86400),
    I ("setup", setup, 0, 0, 1),
    S ("log_level", log_level, "info"),
};
#define NKEYS (sizeof s_keys / sizeof s_keys[0])

static char **
s_str (cn_agent_config_t *c, const s_key_t *k)
{
    return (char **) ((char *) c + k->offset);
}

static int *
s_int (cn_agent_config_t *c, const s_key_t *k)
{
    return (int *) ((char *) c + k->offset);
}

static int
s_set_int (cn_agent_config_t *c, const s_key_t *k, long long v, const char *from,
           char *err, size_t errlen)
{
    if (v < k->min || v > k->max) {
        snprintf (err, errlen, "%s: %s must be between %d and %d", from, k->path, k->min, k->max);
        return -1;
    }
    *s_int (c, k) = (int) v;
    return 0;
}

static void
s_set_str (cn_agent_config_t *c, const s_key_t *k, const char *v)
{
    free (*s_str (c, k));
    *s_str (c, k) = strdup (v ? v : "");
    if (!*s_str (c, k))
        abort ();
}

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
s_apply_file (cn_agent_config_t *c, const char *path, char *err, size_t errlen)
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
        else if (json_is_boolean (v))
            rc = s_set_int (c, k, json_is_true (v), path, err, errlen);
        else if (!json_is_integer (v)) {
            snprintf (err, errlen, "%s: %s must be an integer", path, k->path);
            rc = -1;
        }
        else
            rc = s_set_int (c, k, json_integer_value (v), path, err, errlen);
    }
    json_decref (root);
    return rc;
}

static int
s_apply_env (cn_agent_config_t *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < NKEYS; i++) {
        const s_key_t *k = &s_keys[i];
        char name[96];
        size_t n = (size_t) snprintf (name, sizeof name, "CNAPI_AGENT_");
        for (const char *p = k->path; *p && n + 1 < sizeof name; p++)
            name[n++] = *p == '.' ? '_' : (char) toupper ((unsigned char) *p);
        name[n] = '\0';
        const char *v = getenv (name);
        if (!v)
            continue;
        if (k->kind == K_STR)
            s_set_str (c, k, v);
        else {
            char *end;
            errno = 0;
            long long x = strtoll (v, &end, 10);
            if (strcmp (v, "true") == 0)
                x = 1, end = (char *) v + 4;
            else if (strcmp (v, "false") == 0)
                x = 0, end = (char *) v + 5;
            if (errno || end == v || *end) {
                snprintf (err, errlen, "%s: not an integer: %s", name, v);
                return -1;
            }
            if (s_set_int (c, k, x, name, err, errlen) != 0)
                return -1;
        }
    }
    return 0;
}

cn_agent_config_t *
cn_agent_config_load (const char *path, char *err, size_t errlen)
{
    cn_agent_config_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    for (size_t i = 0; i < NKEYS; i++) {
        if (s_keys[i].kind == K_STR)
            s_set_str (c, &s_keys[i], s_keys[i].def_str);
        else
            *s_int (c, &s_keys[i]) = s_keys[i].def_int;
    }
    if ((path && s_apply_file (c, path, err, errlen) != 0) || s_apply_env (c, err, errlen) != 0) {
        cn_agent_config_destroy (&c);
        return NULL;
    }
    char u[37];
    if (!cn_uuid_normalize (c->server_uuid, u)) {
        snprintf (err, errlen, "server_uuid must be a UUID (got \"%s\")", c->server_uuid);
        cn_agent_config_destroy (&c);
        return NULL;
    }
    memcpy (c->server_uuid, u, 37);
    if (c->backoff_cap_ms < c->backoff_base_ms) {
        snprintf (err, errlen, "backoff.cap_ms must be >= backoff.base_ms");
        cn_agent_config_destroy (&c);
        return NULL;
    }
    return c;
}

void
cn_agent_config_destroy (cn_agent_config_t **p)
{
    if (!p || !*p)
        return;
    cn_agent_config_t *c = *p;
    for (size_t i = 0; i < NKEYS; i++)
        if (s_keys[i].kind == K_STR)
            free (*s_str (c, &s_keys[i]));
    free (c);
    *p = NULL;
}

static char *
s_mask (const char *v)
{
    char *out = strdup (v ? v : "");
    if (!out)
        abort ();
    char *scheme = strstr (out, "://");
    if (scheme) {
        char *at = strchr (scheme + 3, '@');
        char *colon = strchr (scheme + 3, ':');
        if (at && colon && colon < at)
            memset (colon + 1, '*', (size_t) (at - colon - 1));
    }
    return out;
}

char *
cn_agent_config_dump (const cn_agent_config_t *c)
{
    json_t *root = json_object ();
    for (size_t i = 0; i < NKEYS; i++) {
        const s_key_t *k = &s_keys[i];
        json_t *v;
        if (k->kind == K_STR) {
            const char *s = *(char *const *) ((const char *) c + k->offset);
            if (k->secret) {
                char *m = s_mask (s);
                v = json_string (m);
                free (m);
            }
            else
                v = json_string (s);
        }
        else
            v = json_integer (*(const int *) ((const char *) c + k->offset));
        json_object_set_new (root, k->path, v);
    }
    char *text = json_dumps (root, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref (root);
    return text;
}
