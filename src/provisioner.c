/*
 * provisioner: the compute-node agent for one CN (docs/agent.md).
 *
 *   provisioner [-f CONFIG] [--sysinfo FILE] [--print-sysinfo] [--print-config]
 *               [--no-ur]
 *
 * Configuration: include/cn_agent_config.h (JSON file, CNAPI_AGENT_*
 * overrides). The work is lib/cn_agent.c's, shared with mockcloud: the
 * session with a cnapid instance, sysinfo and VM events on AMQP, the dummy
 * VM backend, the agent endpoint; and Ur execute (lib/cn_agent_ur.c, docs/ur.md:
 * scripts from cnapid run on this host; --no-ur turns it off).
 *
 * Signals: SIGTERM / SIGINT close the session cleanly (close frame 1000),
 * flush AMQP (bounded) and exit 0. SIGHUP re-reads nothing yet (logged).
 */
#include "cn_agent.h"
#include "cn_agent_ur.h"
#include "cn_agent_config.h"
#include "cn_agent_sysinfo.h"
#include "cn_log.h"
#include "cn_util.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define COMPONENT "provisioner"

typedef struct {
    const cn_agent_config_t *cfg;
    const char *sysinfo_file;
} s_ctx_t;

/* Sysinfo: the file (read again every time: an edit is a change), or this
 * machine. Runs on the loop thread. */
static char *
s_sysinfo (void *arg, size_t index, size_t *len, bool *setup)
{
    s_ctx_t *c = arg;
    char err[512];
    json_t *si;
    if (c->sysinfo_file)
        si = cn_sysinfo_load_file (c->sysinfo_file, c->cfg->server_uuid, err, sizeof err);
    else {
        cn_sysinfo_local_t lo = {
            .uuid = c->cfg->server_uuid,
            .datacenter = c->cfg->datacenter_name,
            .admin_ip = *c->cfg->admin_ip ? c->cfg->admin_ip : NULL,
            .agent_port = c->cfg->agent_port,
            .setup = c->cfg->setup != 0,
        };
        si = cn_sysinfo_local (&lo, err, sizeof err);
    }
    if (!si) {
        CN_WARN (COMPONENT, "sysinfo unavailable", "{s:s}", "error", err);
        return NULL;
    }
    *setup = cn_sysinfo_is_setup (si);
    char *text = json_dumps (si, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref (si);
    if (!text)
        return NULL;
    *len = strlen (text);
    return text;
}

static void
s_usage (FILE *f)
{
    fprintf (f, "usage: provisioner [-f CONFIG] [--sysinfo FILE] [--print-sysinfo] "
                "[--print-config] [--no-ur]\n"
                "configuration keys and CNAPI_AGENT_* overrides: docs/agent.md\n");
}

int
main (int argc, char **argv)
{
    setvbuf (stdout, NULL, _IOLBF, 0);
    const char *config = NULL, *sysinfo_file = NULL;
    bool print_sysinfo = false, print_config = false, no_ur = false;
    enum { O_SYSINFO = 256, O_PRINT_SYSINFO, O_PRINT_CONFIG, O_NOUR, O_HELP };
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'f' },
        { "sysinfo", required_argument, NULL, O_SYSINFO },
        { "print-sysinfo", no_argument, NULL, O_PRINT_SYSINFO },
        { "print-config", no_argument, NULL, O_PRINT_CONFIG },
        { "no-ur", no_argument, NULL, O_NOUR },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 }
    };
    int ch;
    while ((ch = getopt_long (argc, argv, "f:", opts, NULL)) != -1) {
        switch (ch) {
        case 'f': config = optarg; break;
        case O_SYSINFO: sysinfo_file = optarg; break;
        case O_PRINT_SYSINFO: print_sysinfo = true; break;
        case O_PRINT_CONFIG: print_config = true; break;
        case O_NOUR: no_ur = true; break;
        case O_HELP: s_usage (stdout); return 0;
        default: s_usage (stderr); return 2;
        }
    }
    if (optind < argc) {
        s_usage (stderr);
        return 2;
    }
    char err[512];
    cn_agent_config_t *cfg = cn_agent_config_load (config, err, sizeof err);
    if (!cfg) {
        fprintf (stderr, "provisioner: %s\n", err);
        return 2;
    }
    if (!sysinfo_file && *cfg->sysinfo_file)
        sysinfo_file = cfg->sysinfo_file;
    int level = cn_log_parse_level (cfg->log_level);
    cn_log_init ("provisioner", level < 0 ? CN_LOG_INFO : level);
    cn_log_set_global ("server_uuid", cfg->server_uuid);
    s_ctx_t ctx = { .cfg = cfg, .sysinfo_file = sysinfo_file };

    if (print_config) {
        char *text = cn_agent_config_dump (cfg);
        printf ("%s\n", text);
        free (text);
        cn_agent_config_destroy (&cfg);
        return 0;
    }
    if (print_sysinfo) {
        size_t len;
        bool setup;
        char *text = s_sysinfo (&ctx, 0, &len, &setup);
        if (!text) {
            cn_agent_config_destroy (&cfg);
            return 1;
        }
        printf ("%s\n", text);
        free (text);
        cn_agent_config_destroy (&cfg);
        return 0;
    }

    /* Signals are taken by this thread only (sigtimedwait); block them
     * before any thread starts so every thread inherits the mask. */
    sigset_t sigs;
    sigemptyset (&sigs);
    sigaddset (&sigs, SIGTERM);
    sigaddset (&sigs, SIGINT);
    sigaddset (&sigs, SIGHUP);
    pthread_sigmask (SIG_BLOCK, &sigs, NULL);
    signal (SIGPIPE, SIG_IGN);

    cn_agents_cfg_t ac;
    cn_agents_cfg_defaults (&ac);
    ac.datacenter_name = cfg->datacenter_name;
    ac.dns_domain = cfg->dns_domain;
    ac.resolver = *cfg->resolver ? cfg->resolver : NULL;
    ac.cnapi_port = cfg->cnapi_port;
    ac.resolve_cache_ms = cfg->resolve_cache_ms;
    ac.heartbeat_ms = cfg->heartbeat_ms;
    ac.open_timeout_ms = cfg->open_timeout_ms;
    ac.retry.base_ms = cfg->backoff_base_ms;
    ac.retry.cap_ms = cfg->backoff_cap_ms;
    ac.agent = "provisioner/" CNAPI_VERSION;
    ac.amqp_url = *cfg->amqp_url ? cfg->amqp_url : NULL;
    char amqp_name[80];
    snprintf (amqp_name, sizeof amqp_name, "provisioner %s", cfg->server_uuid);
    ac.amqp_name = amqp_name;
    ac.amqp_window = cfg->amqp_window;
    ac.amqp_buffer = (size_t) cfg->amqp_buffer;
    ac.sysinfo_interval_s = cfg->sysinfo_interval_s;
    ac.delays.create_ms = cfg->vm_create_ms;
    ac.delays.start_ms = cfg->vm_start_ms;
    ac.delays.stop_ms = cfg->vm_stop_ms;
    ac.delays.reboot_ms = cfg->vm_reboot_ms;
    ac.delays.destroy_ms = cfg->vm_destroy_ms;
    ac.threads = 1;
    ac.session_log_level = CN_LOG_INFO;
    char listen[96] = "";
    if (*cfg->listen && strcmp (cfg->listen, "none") != 0)
        snprintf (listen, sizeof listen, "%s", cfg->listen);
    else if (!*cfg->listen && *cfg->admin_ip)
        snprintf (listen, sizeof listen, "%s:%d", cfg->admin_ip, cfg->agent_port);
    ac.listen = *listen ? listen : NULL;

    int rc = 1;
    cn_agent_ur_t *ur = NULL;
    cn_agents_t *a = cn_agents_new (&ac, err, sizeof err);
    if (!a) {
        CN_FATAL (COMPONENT, "bad configuration", "{s:s}", "error", err);
        cn_agent_config_destroy (&cfg);
        return 2;
    }
    cn_agent_spec_t spec = {
        .server_uuid = cfg->server_uuid,
        .admin_ip = *cfg->admin_ip ? cfg->admin_ip : NULL,
        .agent_port = cfg->agent_port,
        .sysinfo = s_sysinfo,
        .sysinfo_arg = &ctx,
        .vm_dir = *cfg->vm_dir ? cfg->vm_dir : NULL,
    };
    if (cn_agents_add (a, &spec, err, sizeof err) < 0
        || cn_agents_start (a, err, sizeof err) != 0) {
        CN_FATAL (COMPONENT, "cannot start", "{s:s}", "error", err);
        goto done;
    }
    if (ac.amqp_url && !no_ur) {
        const char *uuids[] = { cfg->server_uuid };
        char ur_name[80];
        snprintf (ur_name, sizeof ur_name, "provisioner %s ur", cfg->server_uuid);
        cn_agent_ur_cfg_t uc = { .url = ac.amqp_url, .name = ur_name };
        ur = cn_agent_ur_new (&uc, uuids, 1, err, sizeof err);
        if (!ur) {
            CN_FATAL (COMPONENT, "cannot start", "{s:s}", "error", err);
            goto done;
        }
    }
    char *dump = cn_agent_config_dump (cfg);
    json_error_t jerr;
    json_t *cj = json_loads (dump, 0, &jerr);
    CN_INFO (COMPONENT, "provisioner started", "{s:o?,s:s?}", "config", cj,
             "sysinfo_file", sysinfo_file);
    free (dump);

    for (;;) {
        struct timespec ts = { 1, 0 };
        int sig = sigtimedwait (&sigs, NULL, &ts);
        if (sig == SIGTERM || sig == SIGINT) {
            CN_INFO (COMPONENT, "stopping", "{s:s}", "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
            break;
        }
        if (sig == SIGHUP)
            CN_INFO (COMPONENT, "SIGHUP ignored", NULL);
        if (sig < 0 && errno != EAGAIN && errno != EINTR) {
            CN_ERROR (COMPONENT, "sigtimedwait failed", "{s:s}", "error", strerror (errno));
            break;
        }
    }
    cn_agents_stop (a, 3000);
    rc = 0;
done:
    cn_agent_ur_destroy (&ur);
    cn_agents_destroy (&a);
    cn_agent_config_destroy (&cfg);
    CN_INFO (COMPONENT, "provisioner stopped", NULL);
    return rc;
}
