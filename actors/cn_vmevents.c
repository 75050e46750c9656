/*
 * cn_vmevents: see include/cn_vmevents.h. (First cut: keeps the bindings
 * and answers the pipe; the AMQP consumer follows.)
 */
#include "cn_vmevents.h"

#include "cn_actor.h"
#include "cn_log.h"
#include "cn_msg.h"

#define COMPONENT "vmevents"

typedef struct {
    const cn_config_t *cfg;
    zloop_t *loop;
    zhashx_t *bound;
    zsock_t *ctl;
    bool started;
    uint64_t binds, unbinds;
} self_t;

static zframe_t *
s_status (self_t *self)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 5);
    cn_msgw_str (&w, "actor", COMPONENT);
    cn_msgw_str (&w, "state", self->started ? "idle" : "stopped");
    cn_msgw_uint (&w, "bound", zhashx_size (self->bound));
    cn_msgw_uint (&w, "binds", self->binds);
    cn_msgw_uint (&w, "unbinds", self->unbinds);
    return cn_msgw_frame (&w);
}

static int
s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg)
{
    self_t *self = arg;
    char *cmd = zstr_recv (sock);
    zframe_t *f = s_status (self);
    zframe_send (&f, sock, 0);
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
    char *uuid = zmsg_popstr (msg);
    int rc = 0;
    if (!cmd || streq (cmd, "$TERM"))
        rc = -1;
    else if (streq (cmd, "START")) {
        if (!self->ctl && (self->ctl = cn_ctl_bind (COMPONENT)))
            zloop_reader (self->loop, self->ctl, s_on_ctl, self);
        self->started = true;
        zstr_send (pipe, "OK");
    }
    else if (streq (cmd, "BIND") && uuid) {
        self->binds++;
        zhashx_update (self->bound, uuid, (void *) 1);
    }
    else if (streq (cmd, "UNBIND") && uuid) {
        self->unbinds++;
        zhashx_delete (self->bound, uuid);
    }
    else if (streq (cmd, "STATUS")) {
        zframe_t *f = s_status (self);
        zframe_send (&f, pipe, 0);
    }
    zstr_free (&cmd);
    zstr_free (&uuid);
    zmsg_destroy (&msg);
    return rc;
}

void
cn_vmevents_actor (zsock_t *pipe, void *args)
{
    cn_vmevents_args_t *a = args;
    self_t *self = calloc (1, sizeof *self);
    if (!self)
        abort ();
    self->cfg = a->cfg;
    self->loop = zloop_new ();
    self->bound = zhashx_new ();
    zloop_set_nonstop (self->loop, true);
    zloop_reader (self->loop, pipe, s_on_pipe, self);
    zsock_signal (pipe, 0);
    zloop_start (self->loop);
    zsock_destroy (&self->ctl);
    zhashx_destroy (&self->bound);
    zloop_destroy (&self->loop);
    free (self);
}
