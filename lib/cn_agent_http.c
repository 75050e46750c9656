/*
 * cn_agent_http: the agent endpoint of a set of CNs (one listener for all of
 * them, on loop 0), routed by the x-server-uuid header. See docs/agent.md.
 *
 *   GET    /health            without x-server-uuid: the whole set; with: one CN
 *   GET    /vms               the CN's VMs
 *   POST   /vms               create (JSON body: uuid?, brand?, alias?, ram?, ...)
 *   GET    /vms/:uuid
 *   POST   /vms/:uuid         update (JSON body)
 *   DELETE /vms/:uuid         destroy
 *   POST   /vms/:uuid/start|stop|reboot
 *   POST   /tasks             {task, params} (proto/tasks.md; lib/cn_agent_tasks.c):
 *                             202 {id} with x-cnapi-task-id, else held until the end
 *   GET    /tasks/:id         the agent's view of a task
 *   GET    /history           the last 100 tasks, newest first
 *   POST   /pause, /resume    204
 * The task routes answer 409 when x-server-uuid is not one of our CNs (it
 * may be left out when the set has one CN).
 *
 * A CN is only touched by its own loop thread: when it lives on another loop
 * the operation travels there as a message and the answer comes back as
 * one. The waiting request is remembered by id in a table; an entry
 * allocated in the request's pool leaves the table when the request goes
 * (client gone), so a late answer is simply dropped.
 */
#include "cn_agent_int.h"

#include "cn_log.h"
#include "cn_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define COMPONENT "agent-http"
#define S_PENDING_BUCKETS 1024

typedef struct pend {
    struct pend *next;
    cn_agent_http_t *h;
    h2o_req_t *req;
    uint64_t id;
    bool in_table;
} pend_t;

typedef struct aconn {
    struct aconn *prev, *next;
    cn_agent_http_t *h;
    h2o_socket_t *sock;
} aconn_t;

typedef struct {
    h2o_handler_t super;
    cn_agent_http_t *h;
} ahandler_t;

struct cn_agent_http {
    aloop_t *l;
    h2o_globalconf_t gconf;
    h2o_context_t ctx;
    h2o_accept_ctx_t actx;
    h2o_socket_t *listener;
    aconn_t conns;
    pend_t *table[S_PENDING_BUCKETS];
    uint64_t next_id;
};

static h2o_generator_t s_generator = { NULL, NULL };

static void
s_respond (h2o_req_t *req, int status, json_t *body)
{
    if (status == 204) {
        json_decref (body);
        req->res.status = 204;
        req->res.reason = "No Content";
        h2o_start_response (req, &s_generator);
        h2o_send (req, NULL, 0, H2O_SEND_STATE_FINAL);
        return;
    }
    char *text = body ? json_dumps (body, JSON_COMPACT) : NULL;
    json_decref (body);
    if (!text)
        text = strdup ("{}");
    if (!text)
        abort ();
    size_t len = strlen (text);
    req->res.status = status;
    req->res.reason = status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
    h2o_add_header (&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                    H2O_STRLIT ("application/json"));
    req->res.content_length = len;
    h2o_start_response (req, &s_generator);
    h2o_iovec_t buf = h2o_strdup (&req->pool, text, len);
    free (text);
    if (h2o_memis (req->method.base, req->method.len, H2O_STRLIT ("HEAD")))
        h2o_send (req, NULL, 0, H2O_SEND_STATE_FINAL);
    else
        h2o_send (req, &buf, 1, H2O_SEND_STATE_FINAL);
}

static void
s_error (h2o_req_t *req, int status, const char *code, const char *msg)
{
    s_respond (req, status, json_pack ("{s:s,s:s}", "code", code, "message", msg));
}

static void
s_pend_remove (pend_t *p)
{
    if (!p->in_table)
        return;
    pend_t **pp = &p->h->table[p->id & (S_PENDING_BUCKETS - 1)];
    while (*pp && *pp != p)
        pp = &(*pp)->next;
    if (*pp)
        *pp = p->next;
    p->in_table = false;
}

static void
s_pend_dispose (void *arg)
{
    s_pend_remove (arg);
}

void
cn_agent_http_reply (cn_agent_http_t *h, amsg_t *m)
{
    pend_t *p = h->table[m->req_id & (S_PENDING_BUCKETS - 1)];
    while (p && p->id != m->req_id)
        p = p->next;
    if (!p)
        return;                 /* the client went away */
    s_pend_remove (p);
    json_t *body = m->body;
    m->body = NULL;
    s_respond (p->req, m->status, body);
}

static bool
s_path_is (h2o_iovec_t path, const char *want)
{
    size_t n = strlen (want);
    return path.len == n && memcmp (path.base, want, n) == 0;
}

static bool
s_method (h2o_req_t *req, const char *m)
{
    return h2o_memis (req->method.base, req->method.len, m, strlen (m));
}

static void
s_set_health (cn_agent_http_t *h, h2o_req_t *req)
{
    cn_agents_t *a = h->l->a;
    size_t connected = 0;
    for (size_t i = 0; i < a->ncns; i++)
        if (atomic_load_explicit (&a->cns[i]->state, memory_order_relaxed) == CN_SESS_UP)
            connected++;
    s_respond (req, 200, json_pack ("{s:b,s:I,s:I,s:s}", "ok", 1, "cns", (json_int_t) a->ncns,
                                    "connected", (json_int_t) connected,
                                    "agent", a->cfg.agent));
}

/* Hand a task request to the CN's loop (even when that is this loop: the
 * answer may come much later, by id, like any other). */
static void
s_forward (cn_agent_http_t *h, h2o_req_t *req, acn_t *cn, amsg_t *m)
{
    pend_t *pd = h2o_mem_alloc_shared (&req->pool, sizeof *pd, s_pend_dispose);
    memset (pd, 0, sizeof *pd);
    pd->h = h;
    pd->req = req;
    pd->id = ++h->next_id;
    size_t b = pd->id & (S_PENDING_BUCKETS - 1);
    pd->next = h->table[b];
    h->table[b] = pd;
    pd->in_table = true;
    m->kind = AM_TASK;
    m->home = h->l;
    m->req_id = pd->id;
    m->cn = cn;
    if (!cn_agent_post (cn->loop, m)) {
        s_pend_remove (pd);
        s_error (req, 503, "ServiceUnavailable", "the agent is stopping");
    }
}

static void
s_task_error (h2o_req_t *req, int status, const char *code, const char *msg)
{
    s_respond (req, status, json_pack ("{s:s,s:s,s:s}", "error", msg, "code", code,
                                       "message", msg));
}

static bool
s_header (h2o_req_t *req, const char *name, char *out, size_t outlen)
{
    ssize_t i = h2o_find_header_by_str (&req->headers, name, strlen (name), -1);
    if (i < 0)
        return false;
    h2o_iovec_t v = req->headers.entries[i].value;
    snprintf (out, outlen, "%.*s", (int) v.len, v.base);
    return true;
}

/* /tasks, /tasks/:id, /history, /pause, /resume */
static void
s_on_task_req (cn_agent_http_t *h, h2o_req_t *req, h2o_iovec_t path)
{
    cn_agents_t *a = h->l->a;
    top_kind_t top;
    char id[37] = "";
    if (s_path_is (path, "/tasks") || s_path_is (path, "/tasks/")) {
        if (!s_method (req, "POST")) {
            s_task_error (req, 405, "BadMethod", "POST");
            return;
        }
        top = TOP_POST;
    }
    else if (path.len > 7 && memcmp (path.base, "/tasks/", 7) == 0) {
        char raw[64];
        snprintf (raw, sizeof raw, "%.*s", (int) (path.len - 7), path.base + 7);
        if (!s_method (req, "GET") && !s_method (req, "HEAD")) {
            s_task_error (req, 405, "BadMethod", "GET");
            return;
        }
        if (path.len - 7 != 36 || !cn_uuid_normalize (raw, id)) {
            s_task_error (req, 404, "ResourceNotFound", "no such task");
            return;
        }
        top = TOP_GET;
    }
    else if (s_path_is (path, "/history")) {
        if (!s_method (req, "GET") && !s_method (req, "HEAD")) {
            s_task_error (req, 405, "BadMethod", "GET");
            return;
        }
        top = TOP_HISTORY;
    }
    else {
        if (!s_method (req, "POST")) {
            s_task_error (req, 405, "BadMethod", "POST");
            return;
        }
        top = s_path_is (path, "/pause") ? TOP_PAUSE : TOP_RESUME;
    }

    char su[64];
    acn_t *cn = NULL;
    if (s_header (req, "x-server-uuid", su, sizeof su))
        cn = cn_agent_lookup (a, su, strlen (su));
    else if (a->ncns == 1)
        cn = a->cns[0];
    if (!cn) {
        s_task_error (req, 409, "InvalidArgument",
                      "x-server-uuid is not one of this agent's servers");
        return;
    }

    amsg_t *m = calloc (1, sizeof *m);
    if (!m)
        abort ();
    m->top = top;
    memcpy (m->task_id, id, sizeof id);
    s_header (req, "x-request-id", m->xreq, sizeof m->xreq);
    if (top == TOP_POST) {
        char tid[64];
        if (s_header (req, "x-cnapi-task-id", tid, sizeof tid)
            && !cn_uuid_normalize (tid, m->task_id)) {
            free (m);
            s_task_error (req, 400, "InvalidArgument", "x-cnapi-task-id is not a UUID");
            return;
        }
        json_error_t jerr;
        json_t *body = req->entity.base && req->entity.len
            ? json_loadb (req->entity.base, req->entity.len, 0, &jerr) : NULL;
        const char *why = NULL;
        const json_t *params = json_object_get (body, "params");
        tkind_t kind = TK_NONE;
        if (!json_is_object (body))
            why = "the body must be a JSON object {task, params}";
        else if (!json_is_string (json_object_get (body, "task")))
            why = "task must be a string";
        else if (params && !json_is_object (params))
            why = "params must be an object";
        else if ((kind = cn_agent_task_kind (json_string_value (json_object_get (body, "task"))))
                 == TK_NONE) {
            json_decref (body);
            free (m);
            s_task_error (req, 404, "ResourceNotFound", "unknown task");
            return;
        }
        else {
            const json_t *u = json_object_get (params, "uuid");
            char vm[37];
            bool need = kind != TK_CREATE && kind != TK_SYSINFO;
            if ((u || need) && (!json_is_string (u) || !cn_uuid_normalize (json_string_value (u), vm)))
                why = "params.uuid must be a VM UUID";
        }
        if (why) {
            json_decref (body);
            free (m);
            s_task_error (req, 400, "InvalidContent", why);
            return;
        }
        m->params = body;
    }
    s_forward (h, req, cn, m);
}

static int
s_on_req (h2o_handler_t *self, h2o_req_t *req)
{
    cn_agent_http_t *h = ((ahandler_t *) self)->h;
    h2o_iovec_t path = req->path_normalized;
    ssize_t hi = h2o_find_header_by_str (&req->headers, H2O_STRLIT ("x-server-uuid"), -1);
    h2o_iovec_t su = hi >= 0 ? req->headers.entries[hi].value : h2o_iovec_init (NULL, 0);

    if (s_path_is (path, "/health") || s_path_is (path, "/ping")) {
        if (!s_method (req, "GET") && !s_method (req, "HEAD")) {
            s_error (req, 405, "BadMethod", "GET only");
            return 0;
        }
        if (hi < 0) {
            s_set_health (h, req);
            return 0;
        }
    }
    else if ((path.len >= 6 && memcmp (path.base, "/tasks", 6) == 0
              && (path.len == 6 || path.base[6] == '/'))
             || s_path_is (path, "/history") || s_path_is (path, "/pause")
             || s_path_is (path, "/resume")) {
        s_on_task_req (h, req, path);
        return 0;
    }
    else if (!(path.len >= 4 && memcmp (path.base, "/vms", 4) == 0
               && (path.len == 4 || path.base[4] == '/'))) {
        s_error (req, 404, "ResourceNotFound", "no such route");
        return 0;
    }

    /* Everything below is about one CN. */
    if (hi < 0) {
        s_error (req, 400, "MissingParameter", "the x-server-uuid header is required");
        return 0;
    }
    acn_t *cn = cn_agent_lookup (h->l->a, su.base, su.len);
    if (!cn) {
        s_error (req, 404, "ResourceNotFound", "no such server here");
        return 0;
    }
    vmop_kind_t op;
    char vm[37] = "";
    bool need_body = false;
    if (s_path_is (path, "/health") || s_path_is (path, "/ping"))
        op = VMOP_HEALTH;
    else if (s_path_is (path, "/vms") || s_path_is (path, "/vms/")) {
        if (s_method (req, "GET"))
            op = VMOP_LIST;
        else if (s_method (req, "POST")) {
            op = VMOP_CREATE;
            need_body = true;
        }
        else {
            s_error (req, 405, "BadMethod", "GET or POST");
            return 0;
        }
    }
    else {
        /* /vms/<uuid>[/<action>] */
        const char *p = path.base + 5;
        size_t left = path.len - 5;
        if (left < 36) {
            s_error (req, 404, "ResourceNotFound", "no such route");
            return 0;
        }
        memcpy (vm, p, 36);
        vm[36] = '\0';
        if (!cn_uuid_normalize (vm, vm)) {
            s_error (req, 404, "ResourceNotFound", "not a VM uuid");
            return 0;
        }
        p += 36;
        left -= 36;
        if (left == 0 || (left == 1 && *p == '/')) {
            if (s_method (req, "GET"))
                op = VMOP_GET;
            else if (s_method (req, "DELETE"))
                op = VMOP_DESTROY;
            else if (s_method (req, "POST") || s_method (req, "PUT")) {
                op = VMOP_UPDATE;
                need_body = true;
            }
            else {
                s_error (req, 405, "BadMethod", "GET, POST or DELETE");
                return 0;
            }
        }
        else {
            if (!s_method (req, "POST")) {
                s_error (req, 405, "BadMethod", "POST");
                return 0;
            }
            if (left == 6 && memcmp (p, "/start", 6) == 0)
                op = VMOP_START;
            else if (left == 5 && memcmp (p, "/stop", 5) == 0)
                op = VMOP_STOP;
            else if (left == 7 && memcmp (p, "/reboot", 7) == 0)
                op = VMOP_REBOOT;
            else {
                s_error (req, 404, "ResourceNotFound", "no such action");
                return 0;
            }
        }
    }
    json_t *params = NULL;
    if (need_body && req->entity.base && req->entity.len) {
        json_error_t jerr;
        params = json_loadb (req->entity.base, req->entity.len, 0, &jerr);
        if (!json_is_object (params)) {
            json_decref (params);
            s_error (req, 400, "InvalidArgument", "the body must be a JSON object");
            return 0;
        }
    }
    if (op == VMOP_UPDATE && !params) {
        s_error (req, 400, "InvalidArgument", "the body must be a JSON object of changes");
        return 0;
    }
    if (cn->loop == h->l) {
        json_t *body = NULL;
        int status = cn_agent_vmop (cn, op, vm, params, &body);
        json_decref (params);
        s_respond (req, status, body);
        return 0;
    }
    pend_t *pd = h2o_mem_alloc_shared (&req->pool, sizeof *pd, s_pend_dispose);
    memset (pd, 0, sizeof *pd);
    pd->h = h;
    pd->req = req;
    pd->id = ++h->next_id;
    size_t b = pd->id & (S_PENDING_BUCKETS - 1);
    pd->next = h->table[b];
    h->table[b] = pd;
    pd->in_table = true;
    amsg_t *m = calloc (1, sizeof *m);
    if (!m)
        abort ();
    m->kind = AM_VMOP;
    m->home = h->l;
    m->req_id = pd->id;
    m->cn = cn;
    m->op = op;
    memcpy (m->vm, vm, sizeof vm);
    m->params = params;
    if (!cn_agent_post (cn->loop, m)) {
        s_pend_remove (pd);
        s_error (req, 503, "ServiceUnavailable", "the agent is stopping");
    }
    return 0;
}

static void
s_on_conn_close (void *data)
{
    aconn_t *c = data;
    c->prev->next = c->next;
    c->next->prev = c->prev;
    free (c);
}

static void
s_on_accept (h2o_socket_t *listener, const char *err)
{
    cn_agent_http_t *h = listener->data;
    if (err)
        return;
    for (int i = 0; i < 32; i++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept (listener);
        if (!sock)
            return;
        aconn_t *c = calloc (1, sizeof *c);
        if (!c)
            abort ();
        c->h = h;
        c->sock = sock;
        c->next = h->conns.next;
        c->prev = &h->conns;
        h->conns.next->prev = c;
        h->conns.next = c;
        sock->on_close.cb = s_on_conn_close;
        sock->on_close.data = c;
        h2o_accept (&h->actx, sock);
    }
}

cn_agent_http_t *
cn_agent_http_start (aloop_t *l, int fd, char *err, size_t errlen)
{
    cn_agent_http_t *h = calloc (1, sizeof *h);
    if (!h)
        abort ();
    h->l = l;
    h->conns.next = h->conns.prev = &h->conns;
    h2o_config_init (&h->gconf);
    h->gconf.server_name = h2o_iovec_init (H2O_STRLIT ("cnapi-agent/" CNAPI_VERSION));
    h->gconf.max_request_entity_size = 1024 * 1024;
    h->gconf.http1.upgrade_to_http2 = 0;
    h2o_hostconf_t *host = h2o_config_register_host (&h->gconf,
                                                     h2o_iovec_init (H2O_STRLIT ("default")), 65535);
    h2o_pathconf_t *pc = h2o_config_register_path (host, "/", 0);
    ahandler_t *hd = (ahandler_t *) h2o_create_handler (pc, sizeof *hd);
    hd->super.on_req = s_on_req;
    hd->h = h;
    h2o_context_init (&h->ctx, l->evloop, &h->gconf);
    h->actx.ctx = &h->ctx;
    h->actx.hosts = h->gconf.hosts;
    h->listener = h2o_evloop_socket_create (l->evloop, fd, H2O_SOCKET_FLAG_DONT_READ);
    if (!h->listener) {
        snprintf (err, errlen, "cannot watch the listening socket");
        h2o_context_dispose (&h->ctx);
        h2o_config_dispose (&h->gconf);
        free (h);
        return NULL;
    }
    h->listener->data = h;
    h2o_socket_read_start (h->listener, s_on_accept);
    return h;
}

void
cn_agent_http_shutdown (cn_agent_http_t *h)
{
    if (h->listener) {
        h2o_socket_read_stop (h->listener);
        h2o_socket_close (h->listener);
        h->listener = NULL;
    }
    h->ctx.shutdown_requested = 1;
    /* shutting the read side makes h2o see EOF and close through its own path */
    for (aconn_t *c = h->conns.next; c != &h->conns; c = c->next)
        shutdown (h2o_socket_get_fd (c->sock), SHUT_RD);
}

bool
cn_agent_http_idle (cn_agent_http_t *h)
{
    return h->conns.next == &h->conns;
}

void
cn_agent_http_destroy (cn_agent_http_t **p, bool clean)
{
    if (!p || !*p)
        return;
    cn_agent_http_t *h = *p;
    if (h->listener) {
        h2o_socket_close (h->listener);
        h->listener = NULL;
    }
    if (clean) {
        h2o_multithread_queue_t *queue = h->ctx.queue;
        h2o_context_dispose (&h->ctx);
        free (queue);           /* h2o 2.2.5's evloop build does not free it */
        h2o_config_dispose (&h->gconf);
        free (h);
    }
    else
        CN_WARN (COMPONENT, "connections outlived the shutdown grace period", NULL);
    *p = NULL;
}
