/*
 * cnapid: the Compute Node API daemon. Run several; they share nothing but
 * RabbitMQ, PostgreSQL and Redis.
 *
 *   cnapid [-c config.json] [-v]
 *
 * main loads the configuration, starts the actors in order (state writer,
 * HTTP gateway, sysinfo listener, admin), waits for SIGTERM/SIGINT, and stops
 * them in reverse order. Only main handles signals.
 */
#include "cn_actor.h"
#include "cn_admin.h"
#include "cn_config.h"
#include "cn_gateway.h"
#include "cn_listener.h"
#include "cn_log.h"
#include "cn_writer.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct {
    const char *name;
    zactor_fn *fn;
    zactor_t *actor;
    void *args;               /* NULL: the configuration */
} s_actor_t;

static volatile sig_atomic_t s_stop;

static void
s_on_signal (int sig)
{
    (void) sig;
    s_stop = 1;
}

static void
s_usage (void)
{
    fprintf (stderr,
             "usage: cnapid [-c config.json] [-v]\n"
             "  -c FILE  configuration (JSON); CNAPI_* environment variables override it\n"
             "  -v       print the version and exit\n");
}

/* Start one actor and wait for its START answer. */
static int
s_start (s_actor_t *a, const cn_config_t *cfg, s_actor_t *all, size_t nall)
{
    a->actor = zactor_new (a->fn, a->args ? a->args : (void *) cfg);
    if (!a->actor)
        return -1;
    zmsg_t *msg = zmsg_new ();
    zmsg_addstr (msg, "START");
    if (a->fn == cn_admin_actor) {
        for (size_t i = 0; i < nall; i++)
            if (all[i].fn != cn_admin_actor)
                zmsg_addstr (msg, all[i].name);
        /* actors the gateway starts (sessions) and the sessions actor
         * starts (vmevents): they bind control sockets too */
        zmsg_addstr (msg, "sessions");
        zmsg_addstr (msg, "vmevents");
        zmsg_addstr (msg, "tasks");
        zmsg_addstr (msg, "ur");              /* the gateway starts it */
        zmsg_addstr (msg, "waitlist");        /* the gateway starts it */
    }
    zmsg_send (&msg, a->actor);
    zsock_set_rcvtimeo (a->actor, 30000);
    char *status = NULL, *reason = NULL;
    if (zstr_recvx (a->actor, &status, &reason, NULL) < 1) {
        CN_FATAL ("main", "actor did not answer START", "{s:s}", "actor", a->name);
        return -1;
    }
    int rc = streq (status, "OK") ? 0 : -1;
    if (rc != 0)
        CN_FATAL ("main", "actor failed to start", "{s:s,s:s?}", "actor", a->name, "reason",
                  reason);
    zstr_free (&status);
    zstr_free (&reason);
    zsock_set_rcvtimeo (a->actor, -1);
    return rc;
}

int
main (int argc, char **argv)
{
    const char *config_path = NULL;
    int opt;
    while ((opt = getopt (argc, argv, "c:vh")) != -1) {
        switch (opt) {
            case 'c': config_path = optarg; break;
            case 'v': printf ("cnapid %s\n", CNAPI_VERSION); return 0;
            default: s_usage (); return opt == 'h' ? 0 : 2;
        }
    }
    /* Signals are ours: keep CZMQ from installing its own handler. */
    zsys_handler_set (NULL);
    zsys_set_linger (0);
    cn_log_init ("cnapid", CN_LOG_INFO);

    char err[512];
    cn_config_t *cfg = cn_config_load (config_path, err, sizeof err);
    if (!cfg) {
        CN_FATAL ("main", "bad configuration", "{s:s}", "error", err);
        return 2;
    }
    int level = cn_log_parse_level (cfg->log_level);
    if (level < 0) {
        CN_FATAL ("main", "bad configuration", "{s:s,s:s}", "error", "unknown log_level",
                  "log_level", cfg->log_level);
        cn_config_destroy (&cfg);
        return 2;
    }
    cn_log_set_level (level);
    cn_log_set_global ("instance", cfg->instance);

    struct sigaction sa = { .sa_handler = s_on_signal };
    sigemptyset (&sa.sa_mask);
    sigaction (SIGTERM, &sa, NULL);
    sigaction (SIGINT, &sa, NULL);
    signal (SIGPIPE, SIG_IGN);

    /* the writer shards first: every other actor connects to them */
    s_actor_t actors[CN_WRITER_MAX_SHARDS + 3];
    cn_writer_args_t wargs[CN_WRITER_MAX_SHARDS];
    char wnames[CN_WRITER_MAX_SHARDS][24];
    size_t nactors = 0;
    for (int k = 0; k < cfg->writer_shards; k++) {
        wargs[k] = (cn_writer_args_t) { cfg, k };
        snprintf (wnames[k], sizeof wnames[k], "writer-%d", k);
        actors[nactors++] = (s_actor_t) { wnames[k], cn_writer_actor, NULL, &wargs[k] };
    }
    actors[nactors++] = (s_actor_t) { "gateway", cn_gateway_actor, NULL, NULL };
    actors[nactors++] = (s_actor_t) { "listener", cn_listener_actor, NULL, NULL };
    actors[nactors++] = (s_actor_t) { "admin", cn_admin_actor, NULL, NULL };
    CN_INFO ("main", "starting", "{s:s,s:s,s:i,s:s}", "version", CNAPI_VERSION, "http_address",
             cfg->http_address, "http_port", cfg->http_port, "admin", cfg->admin_endpoint);
    int rc = 0;
    size_t started = 0;
    for (; started < nactors; started++)
        if (s_start (&actors[started], cfg, actors, nactors) != 0) {
            rc = 1;
            started++;
            break;
        }
    if (rc == 0)
        CN_INFO ("main", "ready", NULL);

    while (rc == 0 && !s_stop) {
        /* Wake on a signal (EINTR) or now and then to notice a dead actor. */
        zpoller_t *poller = zpoller_new (NULL);
        for (size_t i = 0; i < nactors; i++)
            zpoller_add (poller, actors[i].actor);
        void *which = zpoller_wait (poller, 1000);
        if (which) {
            /* An actor speaking unasked means it died or failed. */
            for (size_t i = 0; i < nactors; i++)
                if (which == actors[i].actor) {
                    char *m = zstr_recv (actors[i].actor);
                    CN_ERROR ("main", "actor reported a failure", "{s:s,s:s?}", "actor",
                              actors[i].name, "message", m);
                    zstr_free (&m);
                }
        }
        zpoller_destroy (&poller);
    }
    CN_INFO ("main", "stopping", "{s:b}", "signal", s_stop != 0);
    while (started > 0) {
        started--;
        zactor_destroy (&actors[started].actor);
    }
    CN_INFO ("main", "stopped", NULL);
    cn_config_destroy (&cfg);
    zsys_shutdown ();
    return rc;
}
