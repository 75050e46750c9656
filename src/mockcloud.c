/*
 * mockcloud: N simulated compute nodes in one process, on the same agent
 * library as provisioner (lib/cn_agent.c). See docs/agent.md.
 *
 *   mockcloud --count N [--threads T] [--heartbeat-ms MS] [--vms-per-cn V]
 *             [--event-rate R] [--prefix HEX8] [--amqp URL|none]
 *             [--resolver A.B.C.D:PORT] [--dc DC] [--domain DOMAIN]
 *             [--cnapi-port P] [--listen ADDR:PORT] [--ramp-ms MS]
 *             [--vm-delay-ms MS] [--tasks-max N] [--unsetup] [--sysinfo-size BYTES]
 *             [--open-timeout-ms MS] [--stats] [--run-for SECONDS]
 *             [--log-level LEVEL] [--no-ur]
 *
 * CN i (0-based) has UUID <prefix>-0000-4000-8000-<i as 12 hex digits> (the
 * sysinfo-burst scheme) and V VMs <prefix>-<j>-4000-a000-<i>. Defaults:
 * --amqp $CNAPI_AMQP_URL (none when unset), --resolver $CNAPI_DNS_SERVER
 * (the system's when unset), dc1, example.com, port 8080, 1 thread.
 *
 * Tasks (proto/tasks.md) come to the --listen endpoint, routed by
 * x-server-uuid, and run on the CN's dummy VM backend: every VM transition
 * takes --vm-delay-ms (0: at once). --tasks-max: task records kept per CN
 * (1000; the outbox cap).
 *
 * --stats prints one JSON line per second on stdout (connected, sessions per
 * instance from the last welcome, reconnects, failovers, VM events, AMQP
 * counters); a last line with "type":"final" at exit. Logs go to stderr
 * (per-session lines at debug level). SIGTERM/SIGINT or --run-for end it:
 * every session closes (1000), AMQP is flushed (bounded), exit 0.
 *
 * Ur execute (docs/ur.md): with AMQP, one consumer connection for the whole
 * process (lib/cn_agent_ur.c) runs the scripts sent to any of its CNs FOR
 * REAL on this host, as this user; --no-ur turns it off. Its counters are
 * the "ur" member of the --stats lines.
 */
#include "cn_agent.h"
#include "cn_agent_ur.h"
#include "cn_agent_sysinfo.h"
#include "cn_log.h"
#include "cn_util.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define COMPONENT "mockcloud"

typedef struct {
    const char *prefix;
    const char *dc;
    const char *admin_ip;
    int agent_port;
    bool setup;
    size_t size;
} s_gen_t;

static char *
s_sysinfo (void *arg, size_t index, size_t *len, bool *setup)
{
    const s_gen_t *g = arg;
    cn_sysinfo_gen_t o = {
        .prefix = g->prefix, .index = index, .setup = g->setup, .datacenter = g->dc,
        .admin_ip = g->admin_ip, .agent_port = g->agent_port, .size = g->size,
    };
    *setup = g->setup;
    return cn_sysinfo_generate (&o, len);
}

static void
s_usage (FILE *f)
{
    fprintf (f,
             "usage: mockcloud --count N [--threads T] [--heartbeat-ms MS] [--vms-per-cn V]\n"
             "                 [--event-rate R] [--prefix HEX8] [--amqp URL|none]\n"
             "                 [--resolver A.B.C.D:PORT] [--dc DC] [--domain DOMAIN]\n"
             "                 [--cnapi-port P] [--listen ADDR:PORT] [--ramp-ms MS]\n"
             "                 [--vm-delay-ms MS] [--tasks-max N] [--unsetup] [--sysinfo-size BYTES]\n"
             "                 [--open-timeout-ms MS] [--stats] [--run-for SECONDS]\n"
             "                 [--log-level LEVEL] [--no-ur]\n");
}

static bool
s_long (const char *s, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol (s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return false;
    *out = v;
    return true;
}

static cn_agent_ur_t *s_ur;     /* NULL: no Ur consumer */

static void
s_print_stats (cn_agents_t *a, const char *type)
{
    cn_agents_stats_t st;
    cn_agents_stats (a, &st);
    json_t *o = cn_agents_stats_json (&st);
    if (s_ur) {
        cn_agent_ur_stats_t us;
        cn_agent_ur_stats (s_ur, &us);
        json_object_set_new (o, "ur", cn_agent_ur_stats_json (&us));
    }
    json_object_set_new (o, "type", json_string (type));
    char *text = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    if (text) {
        printf ("%s\n", text);
        free (text);
    }
}

int
main (int argc, char **argv)
{
    setvbuf (stdout, NULL, _IOLBF, 0);
    long tasks_max = 1000;
    long count = -1, threads = 1, hb = 1000, vms = 0, ramp = -1, vm_delay = 0, run_for = 0,
         cnapi_port = 8080, size = 0, open_timeout = 5000;
    double rate = 0;
    const char *env_amqp = getenv ("CNAPI_AMQP_URL");
    const char *env_dns = getenv ("CNAPI_DNS_SERVER");
    const char *amqp = env_amqp && *env_amqp ? env_amqp : NULL;
    const char *resolver = env_dns && *env_dns ? env_dns : NULL;
    const char *prefix = "cafe0000", *dc = "dc1", *domain = "example.com", *listen = NULL,
               *log_level = "info";
    bool stats = false, unsetup = false, bad = false, no_ur = false;
    enum { O_COUNT = 256, O_THREADS, O_HB, O_VMS, O_RATE, O_PREFIX, O_AMQP, O_RESOLVER, O_DC,
           O_DOMAIN, O_PORT, O_LISTEN, O_RAMP, O_VMDELAY, O_UNSETUP, O_SIZE, O_OPEN, O_STATS,
           O_RUNFOR, O_LOG, O_NOUR, O_HELP, O_TASKSMAX };
    static const struct option opts[] = {
        { "count", required_argument, NULL, O_COUNT },
        { "threads", required_argument, NULL, O_THREADS },
        { "heartbeat-ms", required_argument, NULL, O_HB },
        { "vms-per-cn", required_argument, NULL, O_VMS },
        { "event-rate", required_argument, NULL, O_RATE },
        { "prefix", required_argument, NULL, O_PREFIX },
        { "amqp", required_argument, NULL, O_AMQP },
        { "resolver", required_argument, NULL, O_RESOLVER },
        { "dc", required_argument, NULL, O_DC },
        { "domain", required_argument, NULL, O_DOMAIN },
        { "cnapi-port", required_argument, NULL, O_PORT },
        { "listen", required_argument, NULL, O_LISTEN },
        { "ramp-ms", required_argument, NULL, O_RAMP },
        { "vm-delay-ms", required_argument, NULL, O_VMDELAY },
        { "tasks-max", required_argument, NULL, O_TASKSMAX },
        { "unsetup", no_argument, NULL, O_UNSETUP },
        { "sysinfo-size", required_argument, NULL, O_SIZE },
        { "open-timeout-ms", required_argument, NULL, O_OPEN },
        { "stats", no_argument, NULL, O_STATS },
        { "run-for", required_argument, NULL, O_RUNFOR },
        { "log-level", required_argument, NULL, O_LOG },
        { "no-ur", no_argument, NULL, O_NOUR },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 }
    };
    int ch;
    while ((ch = getopt_long (argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_COUNT: bad |= !s_long (optarg, 0, 1000000, &count); break;
        case O_THREADS: bad |= !s_long (optarg, 1, 64, &threads); break;
        case O_HB: bad |= !s_long (optarg, 50, 60000, &hb); break;
        case O_VMS: bad |= !s_long (optarg, 0, 65535, &vms); break;
        case O_RATE: {
            char *end;
            rate = strtod (optarg, &end);
            bad |= *end || end == optarg || rate < 0;
            break;
        }
        case O_PREFIX:
            prefix = optarg;
            bad |= strlen (optarg) != 8;
            for (const char *q = optarg; *q; q++)
                bad |= !isxdigit ((unsigned char) *q);
            break;
        case O_AMQP: amqp = strcmp (optarg, "none") == 0 ? NULL : optarg; break;
        case O_RESOLVER: resolver = optarg; break;
        case O_DC: dc = optarg; break;
        case O_DOMAIN: domain = optarg; break;
        case O_PORT: bad |= !s_long (optarg, 1, 65535, &cnapi_port); break;
        case O_LISTEN: listen = optarg; break;
        case O_RAMP: bad |= !s_long (optarg, 0, 3600000, &ramp); break;
        case O_VMDELAY: bad |= !s_long (optarg, 0, 3600000, &vm_delay); break;
        case O_TASKSMAX: bad |= !s_long (optarg, 100, 1000000, &tasks_max); break;
        case O_UNSETUP: unsetup = true; break;
        case O_SIZE: bad |= !s_long (optarg, 0, 4 * 1024 * 1024, &size); break;
        case O_OPEN: bad |= !s_long (optarg, 100, 600000, &open_timeout); break;
        case O_STATS: stats = true; break;
        case O_RUNFOR: bad |= !s_long (optarg, 0, 100000000, &run_for); break;
        case O_LOG: log_level = optarg; bad |= cn_log_parse_level (optarg) < 0; break;
        case O_NOUR: no_ur = true; break;
        case O_HELP: s_usage (stdout); return 0;
        default: bad = true;
        }
    }
    if (bad || optind < argc || count < 0) {
        s_usage (stderr);
        return 2;
    }
    cn_log_init ("mockcloud", cn_log_parse_level (log_level));

    /* 10,000 CNs are 10,000 sockets: take every descriptor we may. */
    struct rlimit rl;
    if (getrlimit (RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit (RLIMIT_NOFILE, &rl);
    }
    getrlimit (RLIMIT_NOFILE, &rl);
    if ((rlim_t) count + 100 > rl.rlim_cur)
        CN_WARN (COMPONENT, "more CNs than descriptors", "{s:I,s:I}", "count", (json_int_t) count,
                 "nofile", (json_int_t) rl.rlim_cur);

    sigset_t sigs;
    sigemptyset (&sigs);
    sigaddset (&sigs, SIGTERM);
    sigaddset (&sigs, SIGINT);
    pthread_sigmask (SIG_BLOCK, &sigs, NULL);
    signal (SIGPIPE, SIG_IGN);

    cn_agents_cfg_t ac;
    cn_agents_cfg_defaults (&ac);
    ac.datacenter_name = dc;
    ac.dns_domain = domain;
    ac.resolver = resolver;
    ac.cnapi_port = (int) cnapi_port;
    ac.heartbeat_ms = (int) hb;
    ac.open_timeout_ms = (int) open_timeout;
    ac.ramp_ms = ramp >= 0 ? (int) ramp : (count > 1000 ? 2000 : count > 100 ? 500 : 0);
    ac.agent = "mockcloud/" CNAPI_VERSION;
    ac.amqp_url = amqp;
    ac.amqp_name = "mockcloud";
    ac.threads = (int) threads;
    ac.listen = listen;
    ac.delays.create_ms = ac.delays.start_ms = ac.delays.stop_ms = (int) vm_delay;
    ac.delays.reboot_ms = ac.delays.destroy_ms = (int) vm_delay;
    ac.tasks_max = (int) tasks_max;
    ac.session_log_level = CN_LOG_DEBUG;

    /* The agent endpoint every CN reports: the listener's address. */
    char admin_ip[64] = "";
    int agent_port = 5309;
    if (listen) {
        const char *colon = strrchr (listen, ':');
        if (colon && (size_t) (colon - listen) < sizeof admin_ip) {
            memcpy (admin_ip, listen, (size_t) (colon - listen));
            admin_ip[colon - listen] = '\0';
            agent_port = atoi (colon + 1);
        }
    }
    s_gen_t gen = { .prefix = prefix, .dc = dc, .admin_ip = *admin_ip ? admin_ip : NULL,
                    .agent_port = agent_port, .setup = !unsetup, .size = (size_t) size };

    char err[512];
    cn_agents_t *a = cn_agents_new (&ac, err, sizeof err);
    if (!a) {
        fprintf (stderr, "mockcloud: %s\n", err);
        return 2;
    }
    int rc = 1;
    int64_t t0 = cn_mono_us ();
    for (long i = 0; i < count; i++) {
        char uuid[37];
        cn_sysinfo_gen_uuid (prefix, (uint64_t) i, uuid);
        cn_agent_spec_t spec = {
            .server_uuid = uuid,
            .admin_ip = gen.admin_ip,
            .agent_port = agent_port,
            .sysinfo = s_sysinfo,
            .sysinfo_arg = &gen,
            .sim_vms = (size_t) vms,
            .sim_prefix = prefix,
            .sim_index = (uint64_t) i,
        };
        if (cn_agents_add (a, &spec, err, sizeof err) < 0) {
            fprintf (stderr, "mockcloud: %s\n", err);
            goto done;
        }
    }
    if (cn_agents_start (a, err, sizeof err) != 0) {
        fprintf (stderr, "mockcloud: %s\n", err);
        goto done;
    }
    cn_agents_set_event_rate (a, rate);
    if (amqp && !no_ur && count > 0) {
        /* one consumer for every CN of the process */
        char (*uu)[37] = calloc ((size_t) count, sizeof *uu);
        const char **up = calloc ((size_t) count, sizeof *up);
        if (!uu || !up)
            abort ();
        for (long i = 0; i < count; i++) {
            cn_sysinfo_gen_uuid (prefix, (uint64_t) i, uu[i]);
            up[i] = uu[i];
        }
        cn_agent_ur_cfg_t uc = { .url = amqp, .name = "mockcloud ur" };
        s_ur = cn_agent_ur_new (&uc, up, (size_t) count, err, sizeof err);
        free (up);
        free (uu);
        if (!s_ur) {
            fprintf (stderr, "mockcloud: %s\n", err);
            goto done;
        }
    }
    CN_INFO (COMPONENT, "mockcloud started", "{s:I,s:i,s:I,s:f,s:s?,s:s?,s:s?,s:f}",
             "count", (json_int_t) count, "threads", (int) threads,
             "vms_per_cn", (json_int_t) vms, "event_rate", rate, "amqp", amqp ? "on" : NULL,
             "resolver", resolver, "listen", listen, "setup_s", (cn_mono_us () - t0) / 1e6);

    int64_t start = cn_mono_us (), next = start + 1000000;
    for (;;) {
        int64_t now = cn_mono_us ();
        if (run_for > 0 && now - start >= run_for * 1000000LL)
            break;
        int64_t wait = next - now;
        if (wait < 0)
            wait = 0;
        struct timespec ts = { (time_t) (wait / 1000000), (long) (wait % 1000000) * 1000 };
        int sig = sigtimedwait (&sigs, NULL, &ts);
        if (sig == SIGTERM || sig == SIGINT) {
            CN_INFO (COMPONENT, "stopping", "{s:s}", "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
            break;
        }
        if (cn_mono_us () >= next) {
            if (stats)
                s_print_stats (a, "stats");
            next += 1000000;
            if (next < cn_mono_us ())
                next = cn_mono_us () + 1000000;
        }
    }
    cn_agents_set_event_rate (a, 0);
    cn_agents_stop (a, 3000);
    if (stats)
        s_print_stats (a, "final");
    rc = 0;
done:
    cn_agent_ur_destroy (&s_ur);        /* running scripts are killed */
    cn_agents_destroy (&a);
    return rc;
}
