/*
 * cn_agent_config: the provisioner's configuration.
 *
 * A JSON file (deploy/provisioner.example.json) with environment overrides:
 * each key path upper-cased with '.' as '_', prefixed CNAPI_AGENT_, e.g.
 * server_uuid -> CNAPI_AGENT_SERVER_UUID, amqp.url -> CNAPI_AGENT_AMQP_URL.
 * The environment wins. Every key but server_uuid has a default.
 */
#ifndef CN_AGENT_CONFIG_H
#define CN_AGENT_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    char *server_uuid;        /* required (lower-cased) */
    char *datacenter_name;    /* "dc1" */
    char *dns_domain;         /* "example.com" */
    char *resolver;           /* "" = the system's; else "a.b.c.d[:port]" */
    int   cnapi_port;         /* 8080 */
    char *admin_ip;           /* "" = none */
    int   agent_port;         /* 5309 */
    char *listen;             /* "" = admin_ip:agent_port when admin_ip is set, else none;
                                 "none" = no listener */
    int   heartbeat_ms;       /* 1000 */
    int   open_timeout_ms;    /* 5000 */
    int   backoff_base_ms;    /* 100 */
    int   backoff_cap_ms;     /* 5000 */
    int   resolve_cache_ms;   /* 1000 */
    char *vm_dir;             /* "" = VMs in memory only */
    int   vm_create_ms, vm_start_ms, vm_stop_ms, vm_reboot_ms, vm_destroy_ms;
    char *amqp_url;           /* "amqp://guest:guest@127.0.0.1:5672"; "" = no AMQP */
    int   amqp_window;        /* 1000 */
    int   amqp_buffer;        /* 100000 */
    char *sysinfo_file;       /* "" = this machine */
    int   sysinfo_interval_s; /* 60 */
    int   setup;              /* 0/1: "Setup" of the machine's sysinfo (0) */
    char *log_level;          /* "info" */
} cn_agent_config_t;

/* Load path (NULL: defaults only), then apply CNAPI_AGENT_* overrides.
 * NULL with err filled on a bad file, a bad value or no valid server_uuid. */
cn_agent_config_t *cn_agent_config_load (const char *path, char *err, size_t errlen);
void cn_agent_config_destroy (cn_agent_config_t **p);
/* The effective configuration as JSON text (caller frees); secrets masked. */
char *cn_agent_config_dump (const cn_agent_config_t *c);

#endif
