/*
 * cn_agent_config: JSON file plus CNAPI_AGENT_* environment overrides. See
 * include/cn_agent_config.h.
 *
 * One table names every key once (path, type, field, default, bounds); the
 * loader is lib/cn_conftab.c (defaults, file, environment).
 */
#include "cn_agent_config.h"

#include "cn_conftab.h"
#include "cn_util.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S(path, field, def) CN_CONF_S (cn_agent_config_t, path, field, def)
#define SS(path, field, def) CN_CONF_SS (cn_agent_config_t, path, field, def)
#define I(path, field, def, lo, hi) CN_CONF_I (cn_agent_config_t, path, field, def, lo, hi)

static const cn_conf_key_t s_keys[] = {
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

/* strings are never NULL; integers also take true/false */
static const cn_conftab_t s_tab = { .keys = s_keys, .nkeys = NKEYS,
                                    .env_prefix = "CNAPI_AGENT_", .never_null = true,
                                    .booleans = true };

cn_agent_config_t *
cn_agent_config_load (const char *path, char *err, size_t errlen)
{
    cn_agent_config_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    if (cn_conftab_load (&s_tab, c, path, err, errlen) != 0) {
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
    cn_conftab_free (&s_tab, *p);
    free (*p);
    *p = NULL;
}

char *
cn_agent_config_dump (const cn_agent_config_t *c)
{
    json_t *root = json_object ();
    for (size_t i = 0; i < NKEYS; i++)
        json_object_set_new (root, s_keys[i].path, cn_conftab_value (c, &s_keys[i]));
    char *text = json_dumps (root, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref (root);
    return text;
}
