/*
 * cn_admin: the operator socket. See include/cn_admin.h.
 *
 * The admin actor asks the other actors for their STATUS over their control
 * sockets (pipes belong to main) and answers operators on a ROUTER bound at
 * admin_endpoint. A reply that arrives after its timeout is drained and
 * dropped before the next question, so answers never get out of step.
 */
#include "cn_admin.h"

#include "cn_actor.h"
#include "cn_config.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_util.h"

#include <jansson.h>
#include <stdlib.h>
#include <unistd.h>

#define COMPONENT "admin"
#define MAX_ACTORS 16

typedef struct {
    const cn_config_t *cfg;
    zsock_t *router;
    zsock_t *ctl;
    zloop_t *loop;
    char *names[MAX_ACTORS];
    zsock_t *peers[MAX_ACTORS];
    size_t npeers;
    int64_t started_ms;
    uint64_t requests, bad_requests;
} self_t;

static json_t *
s_ask (self_t *self, size_t i)
{
    zsock_t *d = self->peers[i];
    /* drop late answers to earlier questions */
    for (int k = 0; k < 64; k++) {
        zmsg_t *stale = zmsg_recv_nowait (d);
        if (!stale)
            break;
        zmsg_destroy (&stale);
    }
    zstr_sendm (d, "");
    zstr_send (d, "STATUS");
    zpoller_t *p = zpoller_new (d, NULL);
    void *ready = zpoller_wait (p, 1000);
    zpoller_destroy (&p);
    if (!ready)
        return json_pack ("{s:s}", "error", "timeout");
    zmsg_t *msg = zmsg_recv (d);
    zframe_t *empty = msg ? zmsg_pop (msg) : NULL;
    zframe_t *body = msg ? zmsg_pop (msg) : NULL;
    json_t *out = NULL;
    cn_msg_t m;
    char err[128];
    if (body && cn_msg_parse (&m, zframe_data (body), zframe_size (body), err, sizeof err) == 0) {
        out = cn_msgpack_to_json (m.map);
        json_object_del (out, "v");
        json_object_del (out, "type");
        cn_msg_fini (&m);
    }
    else
        out = json_pack ("{s:s}", "error", "unreadable status");
    zframe_destroy (&empty);
    zframe_destroy (&body);
    zmsg_destroy (&msg);
    return out;
}

/* SESSIONS [offset] [limit]: the sessions actor's page of this instance's
 * agent sessions (it asks the hub in the h2o thread; 2 s bound). */
static json_t *
s_sessions (self_t *self, const char *offset, const char *limit)
{
    size_t i = 0;
    while (i < self->npeers && !streq (self->names[i], "sessions"))
        i++;
    if (i == self->npeers)
        return json_pack ("{s:s}", "error", "no sessions actor");
    zsock_t *d = self->peers[i];
    for (int k = 0; k < 64; k++) {
        zmsg_t *stale = zmsg_recv_nowait (d);
        if (!stale)
            break;
        zmsg_destroy (&stale);
    }
    zstr_sendx (d, "", "SESSIONS", offset && *offset ? offset : "0",
                limit && *limit ? limit : "1000", NULL);
    zpoller_t *p = zpoller_new (d, NULL);
    void *ready = zpoller_wait (p, 2000);
    zpoller_destroy (&p);
    if (!ready)
        return json_pack ("{s:s}", "error", "timeout");
    char *empty = NULL, *text = NULL;
    zstr_recvx (d, &empty, &text, NULL);
    json_error_t jerr;
    json_t *out = text ? json_loads (text, 0, &jerr) : NULL;
    zstr_free (&empty);
    zstr_free (&text);
    return out ? out : json_pack ("{s:s}", "error", "unreadable answer");
}

static json_t *
s_own_status (self_t *self)
{
    return json_pack ("{s:s,s:s,s:s,s:I,s:I}", "actor", "admin", "state", "running",
                      "endpoint", self->cfg->admin_endpoint, "requests",
                      (json_int_t) self->requests, "bad_requests",
                      (json_int_t) self->bad_requests);
}

/* Our own STATUS as a status message: the envelope plus the fields. */
static zframe_t *
s_own_status_frame (self_t *self)
{
    json_t *st = s_own_status (self);
    cn_msgw_t w;
    cn_msgw_init (&w, "status", (uint32_t) json_object_size (st));
    const char *k;
    json_t *v;
    json_object_foreach (st, k, v)
        cn_msgw_json (&w, k, v);
    json_decref (st);
    return cn_msgw_frame (&w);
}

static json_t *
s_actors (self_t *self)
{
    json_t *a = json_object ();
    for (size_t i = 0; i < self->npeers; i++)
        json_object_set_new (a, self->names[i], s_ask (self, i));
    json_object_set_new (a, "admin", s_own_status (self));
    return a;
}

static int
s_on_router (zloop_t *loop, zsock_t *router, void *arg)
{
    self_t *self = arg;
    zmsg_t *msg = zmsg_recv (router);
    if (!msg)
        return 0;
    zframe_t *id = zmsg_pop (msg);
    char *cmd = zmsg_popstr (msg);
    char *param = zmsg_popstr (msg);
    json_t *reply = NULL;
    self->requests++;
    if (cmd && streq (cmd, "STATUS")) {
        reply = json_pack ("{s:s,s:s,s:i,s:I,s:s,s:o}", "instance", self->cfg->instance,
                           "version", CNAPI_VERSION, "pid", (int) getpid (), "uptime_s",
                           (json_int_t) ((cn_now_ms () - self->started_ms) / 1000), "http",
                           self->cfg->http_address, "actors", s_actors (self));
        json_object_set_new (reply, "http_port", json_integer (self->cfg->http_port));
    }
    else if (cmd && streq (cmd, "ACTORS"))
        reply = s_actors (self);
    else if (cmd && streq (cmd, "LOGLEVEL")) {
        if (param && *param) {
            int level = cn_log_parse_level (param);
            if (level < 0)
                reply = json_pack ("{s:s}", "error", "unknown log level");
            else {
                cn_log_set_level (level);
                CN_INFO (COMPONENT, "log level changed", "{s:s}", "level",
                         cn_log_level_name (level));
            }
        }
        if (!reply)
            reply = json_pack ("{s:s}", "level", cn_log_level_name (cn_log_level ()));
    }
    else if (cmd && streq (cmd, "SESSIONS")) {
        char *limit = zmsg_popstr (msg);
        reply = s_sessions (self, param, limit);
        zstr_free (&limit);
    }
    else if (cmd && streq (cmd, "CONFIG")) {
        char *text = cn_config_dump (self->cfg);
        json_error_t jerr;
        reply = text ? json_loads (text, 0, &jerr) : NULL;
        free (text);
    }
    if (!reply) {
        self->bad_requests++;
        reply = json_pack ("{s:s,s:s}", "error", "unknown command", "commands",
                           "STATUS ACTORS LOGLEVEL [level] CONFIG SESSIONS [offset] [limit]");
    }
    char *text = json_dumps (reply, JSON_COMPACT);
    json_decref (reply);
    zframe_send (&id, router, ZFRAME_MORE);
    zstr_send (router, text ? text : "{}");
    free (text);
    zstr_free (&cmd);
    zstr_free (&param);
    zmsg_destroy (&msg);
    return 0;
}

static int
s_on_ctl (zloop_t *loop, zsock_t *ctl, void *arg)
{
    self_t *self = arg;
    char *cmd = zstr_recv (ctl);
    zframe_t *f = s_own_status_frame (self);
    zframe_send (&f, ctl, 0);
    zstr_free (&cmd);
    return 0;
}

static int
s_on_pipe (zloop_t *loop, zsock_t *pipe, void *arg)
{
    self_t *self = arg;
    zmsg_t *msg = zmsg_recv (pipe);
    if (!msg)
        return -1;
    char *cmd = zmsg_popstr (msg);
    int rc = 0;
    if (!cmd || streq (cmd, "$TERM"))
        rc = -1;
    else if (streq (cmd, "START") && !self->router) {
        for (char *name = zmsg_popstr (msg); name && self->npeers < MAX_ACTORS;
             name = zmsg_popstr (msg)) {
            zsock_t *d = zsock_new (ZMQ_DEALER);
            zsock_set_linger (d, 0);
            zsock_connect (d, CN_CTL_FMT, name);
            self->names[self->npeers] = name;
            self->peers[self->npeers++] = d;
        }
        self->router = zsock_new (ZMQ_ROUTER);
        if (!self->router || zsock_bind (self->router, "%s", self->cfg->admin_endpoint) < 0) {
            zsock_destroy (&self->router);
            zstr_sendx (pipe, "ERROR", "cannot bind the admin endpoint", NULL);
            CN_ERROR (COMPONENT, "cannot bind the admin endpoint", "{s:s}", "endpoint",
                      self->cfg->admin_endpoint);
        }
        else {
            self->ctl = cn_ctl_bind ("admin");
            zloop_reader (self->loop, self->router, s_on_router, self);
            if (self->ctl)
                zloop_reader (self->loop, self->ctl, s_on_ctl, self);
            self->started_ms = cn_now_ms ();
            CN_INFO (COMPONENT, "admin socket bound", "{s:s}", "endpoint",
                     self->cfg->admin_endpoint);
            zstr_send (pipe, "OK");
        }
    }
    else if (streq (cmd, "START"))
        zstr_send (pipe, "OK");
    else if (streq (cmd, "STATUS")) {
        zframe_t *f = s_own_status_frame (self);
        zframe_send (&f, pipe, 0);
    }
    zstr_free (&cmd);
    zmsg_destroy (&msg);
    return rc;
}

void
cn_admin_actor (zsock_t *pipe, void *args)
{
    self_t *self = calloc (1, sizeof *self);
    self->cfg = args;
    self->loop = zloop_new ();
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);
    zloop_start (self->loop);
    for (size_t i = 0; i < self->npeers; i++) {
        zsock_destroy (&self->peers[i]);
        zstr_free (&self->names[i]);
    }
    zsock_destroy (&self->router);
    zsock_destroy (&self->ctl);
    zloop_destroy (&self->loop);
    free (self);
}
