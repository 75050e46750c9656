/*
 * cnapictl: the operator's command line for cnapid.
 *
 *   cnapictl [-e ENDPOINT | -c CONFIG] [-j] [-t MS] COMMAND [ARG]
 *
 * Commands (asked over the instance's admin socket):
 *   status          instance summary and every actor's state (table)
 *   actors          every actor's state and counters (table)
 *   loglevel [L]    show or set the log level (trace..fatal)
 *   config          the effective configuration (secrets masked)
 *   sessions [OFFSET [LIMIT]]
 *                   this instance's agent sessions: server uuid, epoch,
 *                   heartbeat age, connected time, remote address (table; a
 *                   page of LIMIT, default 1000, at most 5000, by uuid)
 * -j prints the JSON reply instead of a table. The endpoint comes from -e,
 * else from the config file's admin.endpoint (-c), else CNAPI_ADMIN_ENDPOINT.
 * Exit status: 0 ok, 1 no answer or an error reply, 2 usage.
 */
#include "cn_config.h"

#include <czmq.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void
s_usage (void)
{
    fprintf (stderr,
             "usage: cnapictl [-e ENDPOINT | -c CONFIG] [-j] [-t MS] COMMAND [ARG]\n"
             "commands:\n"
             "  status         instance summary and each actor's state\n"
             "  actors         each actor's state and counters\n"
             "  loglevel [L]   show or set the log level\n"
             "  config         the effective configuration\n"
             "  sessions [OFFSET [LIMIT]]  agent sessions held by the instance\n"
             "options:\n"
             "  -e ENDPOINT    admin socket (e.g. ipc:///tmp/cnapid-x.sock, tcp://127.0.0.1:9100)\n"
             "  -c CONFIG      read admin.endpoint from this cnapid config\n"
             "  -j             print JSON\n"
             "  -t MS          reply timeout (default 5000)\n");
}

static void
s_print_value (const json_t *v)
{
    if (json_is_string (v))
        printf ("%s", json_string_value (v));
    else if (json_is_real (v))
        printf ("%.2f", json_real_value (v));
    else {
        char *t = json_dumps (v, JSON_COMPACT | JSON_ENCODE_ANY);
        printf ("%s", t ? t : "?");
        free (t);
    }
}

static void
s_print_sessions (const json_t *j)
{
    const json_t *list = json_object_get (j, "sessions");
    printf ("%-36s %6s %10s %11s  %-21s %s\n", "SERVER_UUID", "EPOCH", "HB_AGE_MS",
            "CONNECTED_S", "REMOTE", "STATE");
    size_t i;
    const json_t *e;
    json_array_foreach (list, i, e) {
        const char *st = json_string_value (json_object_get (e, "state"));
        printf ("%-36s %6lld %10lld %11lld  %-21s %s\n",
                json_string_value (json_object_get (e, "server_uuid")),
                (long long) json_integer_value (json_object_get (e, "epoch")),
                (long long) json_integer_value (json_object_get (e, "heartbeat_age_ms")),
                (long long) json_integer_value (json_object_get (e, "connected_s")),
                json_string_value (json_object_get (e, "remote")), st ? st : "");
    }
    printf ("%zu shown (from %lld) of %lld sessions on %s\n", json_array_size (list),
            (long long) json_integer_value (json_object_get (j, "offset")),
            (long long) json_integer_value (json_object_get (j, "total")),
            json_string_value (json_object_get (j, "instance")));
}

static void
s_print_actors (const json_t *actors)
{
    printf ("%-10s %-11s %s\n", "ACTOR", "STATE", "DETAILS");
    const char *name;
    json_t *st;
    json_object_foreach ((json_t *) actors, name, st) {
        const char *state = json_string_value (json_object_get (st, "state"));
        const char *error = json_string_value (json_object_get (st, "error"));
        printf ("%-10s %-11s", name, state ? state : error ? "ERROR" : "?");
        const char *k;
        json_t *v;
        int col = 23;
        json_object_foreach (st, k, v) {
            if (streq (k, "actor") || streq (k, "state"))
                continue;
            char buf[160];
            char *val = json_is_string (v) ? strdup (json_string_value (v))
                                           : json_dumps (v, JSON_COMPACT | JSON_ENCODE_ANY);
            if (json_is_real (v)) {
                free (val);
                val = malloc (32);
                snprintf (val, 32, "%.2f", json_real_value (v));
            }
            int n = snprintf (buf, sizeof buf, " %s=%s", k, val ? val : "?");
            free (val);
            if (col + n > 100) {
                printf ("\n%23s", "");
                col = 23;
            }
            printf ("%s", buf);
            col += n;
        }
        printf ("\n");
    }
}

int
main (int argc, char **argv)
{
    const char *endpoint = NULL, *config = NULL;
    bool json_out = false;
    int timeout = 5000, opt;
    while ((opt = getopt (argc, argv, "e:c:jt:h")) != -1) {
        switch (opt) {
            case 'e': endpoint = optarg; break;
            case 'c': config = optarg; break;
            case 'j': json_out = true; break;
            case 't': timeout = atoi (optarg); break;
            default: s_usage (); return opt == 'h' ? 0 : 2;
        }
    }
    if (optind >= argc) {
        s_usage ();
        return 2;
    }
    const char *cmd = argv[optind];
    const char *arg = optind + 1 < argc ? argv[optind + 1] : NULL;
    const char *arg2 = optind + 2 < argc ? argv[optind + 2] : NULL;
    const char *wire = streq (cmd, "status") ? "STATUS"
                     : streq (cmd, "actors") ? "ACTORS"
                     : streq (cmd, "loglevel") ? "LOGLEVEL"
                     : streq (cmd, "config") ? "CONFIG"
                     : streq (cmd, "sessions") ? "SESSIONS" : NULL;
    if (!wire) {
        fprintf (stderr, "cnapictl: unknown command '%s'\n", cmd);
        s_usage ();
        return 2;
    }
    cn_config_t *cfg = NULL;
    if (!endpoint && (config || getenv ("CNAPI_ADMIN_ENDPOINT"))) {
        char err[256];
        cfg = cn_config_load (config, err, sizeof err);
        if (!cfg) {
            fprintf (stderr, "cnapictl: %s\n", err);
            return 2;
        }
        endpoint = cfg->admin_endpoint;
    }
    if (!endpoint) {
        fprintf (stderr, "cnapictl: no admin endpoint: give -e, -c or CNAPI_ADMIN_ENDPOINT\n");
        return 2;
    }
    zsys_handler_set (NULL);
    zsys_set_logstream (stderr);
    zsock_t *req = zsock_new (ZMQ_DEALER);
    zsock_set_linger (req, 0);
    zsock_set_rcvtimeo (req, timeout);
    if (zsock_connect (req, "%s", endpoint) != 0) {
        fprintf (stderr, "cnapictl: bad endpoint %s\n", endpoint);
        return 2;
    }
    zmsg_t *msg = zmsg_new ();
    zmsg_addstr (msg, wire);
    if (arg)
        zmsg_addstr (msg, arg);
    if (arg && arg2)
        zmsg_addstr (msg, arg2);
    zmsg_send (&msg, req);
    char *reply = zstr_recv (req);
    int rc = 0;
    if (!reply) {
        fprintf (stderr, "cnapictl: no answer from %s within %d ms (is cnapid running?)\n",
                 endpoint, timeout);
        rc = 1;
    }
    else {
        json_error_t jerr;
        json_t *j = json_loads (reply, 0, &jerr);
        if (!j) {
            fprintf (stderr, "cnapictl: unreadable reply: %s\n", reply);
            rc = 1;
        }
        else if (json_object_get (j, "error")) {
            fprintf (stderr, "cnapictl: %s\n", json_string_value (json_object_get (j, "error")));
            rc = 1;
        }
        else if (json_out || streq (wire, "CONFIG")) {
            char *t = json_dumps (j, JSON_INDENT (2) | JSON_SORT_KEYS);
            printf ("%s\n", t);
            free (t);
        }
        else if (streq (wire, "STATUS")) {
            printf ("instance %s  version %s  pid ", json_string_value (json_object_get (j, "instance")),
                    json_string_value (json_object_get (j, "version")));
            s_print_value (json_object_get (j, "pid"));
            printf ("  uptime ");
            s_print_value (json_object_get (j, "uptime_s"));
            printf ("s  http %s:", json_string_value (json_object_get (j, "http")));
            s_print_value (json_object_get (j, "http_port"));
            printf ("\n\n");
            s_print_actors (json_object_get (j, "actors"));
        }
        else if (streq (wire, "ACTORS"))
            s_print_actors (j);
        else if (streq (wire, "SESSIONS"))
            s_print_sessions (j);
        else if (streq (wire, "LOGLEVEL"))
            printf ("%s\n", json_string_value (json_object_get (j, "level")));
        json_decref (j);
        zstr_free (&reply);
    }
    zsock_destroy (&req);
    cn_config_destroy (&cfg);
    return rc;
}
