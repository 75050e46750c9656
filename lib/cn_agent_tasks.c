/*
 * cn_agent_tasks: the agent side of tasks (proto/tasks.md), one task table
 * and one outbox per CN.
 *
 * Theory of operation
 *
 * Threads. Everything here runs on the CN's own loop thread (the one that
 * runs its session and its VM backend), so nothing is locked. The HTTP
 * listener (lib/cn_agent_http.c, loop 0) validates what it can alone (the
 * route, the body's shape, the task name, params.uuid) and posts an AM_TASK
 * message to the CN's loop; the answer travels back as AM_VMOP_REPLY to the
 * listener's loop, where the waiting request is found by id (or is gone:
 * the answer is dropped).
 *
 * A task. POST /tasks creates a record, emits task_event "start", and starts
 * the operation on the dummy backend. Every VM change of the task's VM (the
 * backend's event callback, via lib/cn_agent.c) becomes a task_event
 * "vm_state"; the task ends when the VM has no pending transition any more
 * (destroy: when the VM is gone; update: at once), or with an error when the
 * backend refuses (VmNotFound, VmExists, VmBusy, VmBadState,
 * InvalidArgument, BackendError), or after task_timeout_ms ("Timeout").
 * With x-cnapi-task-id the request is answered 202 at once and the frames
 * go to the outbox; without it the request is held until the end (200
 * result / 500 {error}) and no frame is sent (nobody holds a record for an
 * id we drew ourselves).
 *
 * The outbox. Every task_event / task_end frame is encoded once and kept in
 * order (one list per CN, and per task) until a task_ack {id, seq} covers
 * it. It is sent at once while the session is UP, and all of it again
 * after every welcome (the instance may be another one: failover). The
 * instance writes before it acks, and seq makes a repeat harmless.
 *
 * Memory. At most tasks_max records per CN. A new task first makes room by
 * forgetting the oldest record that has ended with its outbox empty (every
 * frame acknowledged) and no request waiting on it (logged, at most once a
 * minute per CN); when every record is active or unacknowledged, the task
 * is refused: 503 "outbox full". A task has at most S_MAX_EVENTS events, so
 * a record and its frames are bounded too.
 */
#include "cn_agent_int.h"

#include "cn_log.h"
#include "cn_msg.h"
#include "cn_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COMPONENT "agent-tasks"
#define S_BUCKETS 64
#define S_MAX_EVENTS 64
#define S_HISTORY 100
#define S_DROP_LOG_MS 60000

enum { TS_ACTIVE, TS_COMPLETE, TS_FAILURE };

typedef struct atask atask_t;

typedef struct {
    h2o_linklist_t olink;       /* the CN's outbox, in order */
    h2o_linklist_t tlink;       /* the task's frames, in seq order */
    atask_t *task;
    uint64_t seq;
    size_t len;
    char *data;                 /* one msgpack frame */
} aentry_t;

struct atask {
    h2o_linklist_t link;        /* every record, oldest first */
    h2o_linklist_t alink;       /* active records */
    atask_t *hnext;
    acn_t *cn;
    char id[37];
    char vm[37];                /* "" when the task has no VM */
    char req[64];               /* x-request-id */
    tkind_t kind;
    int status;
    bool outbox;                /* frames go on the session (dispatched with an id) */
    bool launched;              /* the backend call returned: VM events may end it */
    bool saw_destroy;
    uint64_t seq;               /* the last seq given */
    int64_t started_ms, finished_ms;
    json_t *events;             /* [{seq, name, event, time_ms}] */
    json_t *result, *error;
    json_t *last_vm;            /* the VM as its last event showed it */
    h2o_linklist_t frames;      /* aentry_t.tlink */
    size_t pending;             /* frames not acknowledged */
    bool waiting;               /* a held request (no task id) */
    aloop_t *home;
    uint64_t req_id;
    atimer_t tmo;
};

typedef struct atasks {
    h2o_linklist_t all, active, outbox;
    atask_t *hash[S_BUCKETS];
    size_t ntasks, nframes;
    bool paused;
    uint64_t forgotten;
    int64_t last_drop_log;
} atasks_t;

static const struct {
    const char *name;
    tkind_t kind;
} s_names[] = {
    { "machine_create", TK_CREATE },
    { "machine_boot", TK_BOOT },
    { "machine_shutdown", TK_SHUTDOWN },
    { "machine_reboot", TK_REBOOT },
    { "machine_kill", TK_KILL },
    { "machine_update", TK_UPDATE },
    { "machine_destroy", TK_DESTROY },
    { "server_sysinfo", TK_SYSINFO },
    { "machine_load", TK_LOAD },
};

tkind_t
cn_agent_task_kind (const char *name)
{
    if (!name)
        return TK_NONE;
    for (size_t i = 0; i < sizeof s_names / sizeof s_names[0]; i++)
        if (strcmp (name, s_names[i].name) == 0)
            return s_names[i].kind;
    return TK_NONE;
}

static const char *
s_kind_name (tkind_t k)
{
    for (size_t i = 0; i < sizeof s_names / sizeof s_names[0]; i++)
        if (s_names[i].kind == k)
            return s_names[i].name;
    return "unknown";
}

static const char *
s_status_name (int st)
{
    return st == TS_ACTIVE ? "active" : st == TS_COMPLETE ? "complete" : "failure";
}

static int
s_level (acn_t *cn)
{
    return cn->a->cfg.session_log_level;
}

static atasks_t *
s_table (acn_t *cn)
{
    if (!cn->tasks) {
        atasks_t *ts = calloc (1, sizeof *ts);
        if (!ts)
            abort ();
        h2o_linklist_init_anchor (&ts->all);
        h2o_linklist_init_anchor (&ts->active);
        h2o_linklist_init_anchor (&ts->outbox);
        cn->tasks = ts;
    }
    return cn->tasks;
}

static size_t
s_bucket (const char *id)
{
    return cn_crc32 (id, strlen (id)) & (S_BUCKETS - 1);
}

static atask_t *
s_find (atasks_t *ts, const char *id)
{
    for (atask_t *t = ts->hash[s_bucket (id)]; t; t = t->hnext)
        if (strcmp (t->id, id) == 0)
            return t;
    return NULL;
}

static json_t *
s_errobj (const char *code, const char *msg)
{
    return json_pack ("{s:s,s:s}", "code", code, "message", msg);
}

/* The error bodies of the routes: {error, code, message} (proto/tasks.md
 * names `error`; the other two match the rest of the agent endpoint). */
static json_t *
s_errbody (const char *code, const char *msg)
{
    return json_pack ("{s:s,s:s,s:s}", "error", msg, "code", code, "message", msg);
}

/* ------------------------------------------------------------------ */
/* The outbox                                                           */

static void
s_send (acn_t *cn, const aentry_t *e)
{
    if (cn->ws && atomic_load_explicit (&cn->state, memory_order_relaxed) == CN_SESS_UP)
        cn_wsc_send (cn->ws, e->data, e->len);
}

static void
s_emit (acn_t *cn, atask_t *t, cn_msgw_t *w)
{
    atasks_t *ts = cn->tasks;
    aentry_t *e = calloc (1, sizeof *e);
    if (!e)
        abort ();
    cn_msgw_take (w, &e->data, &e->len);
    e->task = t;
    e->seq = t->seq;
    h2o_linklist_insert (&ts->outbox, &e->olink);
    h2o_linklist_insert (&t->frames, &e->tlink);
    t->pending++;
    ts->nframes++;
    s_send (cn, e);
}

static void
s_entry_free (atasks_t *ts, aentry_t *e)
{
    h2o_linklist_unlink (&e->olink);
    h2o_linklist_unlink (&e->tlink);
    e->task->pending--;
    ts->nframes--;
    free (e->data);
    free (e);
}

void
cn_agent_tasks_welcome (acn_t *cn)
{
    atasks_t *ts = cn->tasks;
    if (!ts || h2o_linklist_is_empty (&ts->outbox))
        return;
    size_t n = 0;
    for (h2o_linklist_t *l = ts->outbox.next; l != &ts->outbox; l = l->next) {
        s_send (cn, H2O_STRUCT_FROM_MEMBER (aentry_t, olink, l));
        n++;
    }
    cn_log (s_level (cn), COMPONENT, "task frames sent again after welcome", "{s:s,s:I}",
            "server_uuid", cn->uuid, "frames", (json_int_t) n);
}

int
cn_agent_tasks_ack (acn_t *cn, const char *id, size_t idlen, uint64_t seq)
{
    if (idlen == 0 || idlen > 64)
        return -1;
    atasks_t *ts = cn->tasks;
    char key[65];
    memcpy (key, id, idlen);
    key[idlen] = '\0';
    atask_t *t = ts ? s_find (ts, key) : NULL;
    if (!t) {
        /* forgotten or never ours: nothing to trim */
        cn_log (CN_LOG_DEBUG, COMPONENT, "task_ack for an unknown task", "{s:s,s:s,s:I}",
                "server_uuid", cn->uuid, "task_id", key, "seq", (json_int_t) seq);
        return 0;
    }
    while (!h2o_linklist_is_empty (&t->frames)) {
        aentry_t *e = H2O_STRUCT_FROM_MEMBER (aentry_t, tlink, t->frames.next);
        if (e->seq > seq)
            break;
        s_entry_free (ts, e);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Records                                                              */

static void
s_task_free (atasks_t *ts, atask_t *t)
{
    while (!h2o_linklist_is_empty (&t->frames))
        s_entry_free (ts, H2O_STRUCT_FROM_MEMBER (aentry_t, tlink, t->frames.next));
    atask_t **pp = &ts->hash[s_bucket (t->id)];
    while (*pp && *pp != t)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = t->hnext;
    h2o_linklist_unlink (&t->link);
    if (h2o_linklist_is_linked (&t->alink))
        h2o_linklist_unlink (&t->alink);
    ts->ntasks--;
    json_decref (t->events);
    json_decref (t->result);
    json_decref (t->error);
    json_decref (t->last_vm);
    free (t);
}

/* Room for one more record: forget the oldest ended, fully acknowledged,
 * unwatched one when at the cap. false: everything left must stay. */
static bool
s_make_room (acn_t *cn, atasks_t *ts)
{
    size_t cap = cn->a->cfg.tasks_max > 0 ? (size_t) cn->a->cfg.tasks_max : 1;
    size_t dropped = 0;
    for (h2o_linklist_t *l = ts->all.next; ts->ntasks >= cap && l != &ts->all;) {
        atask_t *t = H2O_STRUCT_FROM_MEMBER (atask_t, link, l);
        l = l->next;
        if (t->status != TS_ACTIVE && t->pending == 0 && !t->waiting) {
            s_task_free (ts, t);
            dropped++;
        }
    }
    if (dropped) {
        ts->forgotten += dropped;
        int64_t now = cn_mono_us () / 1000;
        if (!ts->last_drop_log || now - ts->last_drop_log >= S_DROP_LOG_MS) {
            ts->last_drop_log = now;
            CN_INFO (COMPONENT, "task cap reached: the oldest ended and acknowledged tasks are "
                     "forgotten", "{s:s,s:i,s:I}", "server_uuid", cn->uuid,
                     "tasks_max", cn->a->cfg.tasks_max, "forgotten", (json_int_t) ts->forgotten);
        }
    }
    return ts->ntasks < cap;
}

static void s_on_tmo (atimer_t *tm);

static atask_t *
s_task_new (acn_t *cn, atasks_t *ts, const char *id, tkind_t kind, const char *vm,
            const char *req)
{
    atask_t *t = calloc (1, sizeof *t);
    if (!t)
        abort ();
    t->cn = cn;
    snprintf (t->id, sizeof t->id, "%s", id);
    snprintf (t->vm, sizeof t->vm, "%s", vm ? vm : "");
    snprintf (t->req, sizeof t->req, "%s", req ? req : "");
    t->kind = kind;
    t->status = TS_ACTIVE;
    t->started_ms = cn_now_ms ();
    t->events = json_array ();
    h2o_linklist_init_anchor (&t->frames);
    h2o_linklist_insert (&ts->all, &t->link);
    h2o_linklist_insert (&ts->active, &t->alink);
    size_t b = s_bucket (t->id);
    t->hnext = ts->hash[b];
    ts->hash[b] = t;
    ts->ntasks++;
    t->tmo.cb = s_on_tmo;
    if (cn->a->cfg.task_timeout_ms > 0)
        cn_agent_timer_start (cn->loop, &t->tmo, cn->a->cfg.task_timeout_ms);
    return t;
}

/* Record an event (and send it when the task reports on the session).
 * Takes detail (may be NULL). */
static void
s_event (acn_t *cn, atask_t *t, const char *name, json_t *detail, int64_t time_ms)
{
    if (json_array_size (t->events) >= S_MAX_EVENTS) {
        json_decref (detail);
        return;
    }
    uint64_t seq = ++t->seq;
    json_t *ev = json_pack ("{s:I,s:s,s:I}", "seq", (json_int_t) seq, "name", name,
                            "time_ms", (json_int_t) time_ms);
    if (detail)
        json_object_set (ev, "event", detail);
    json_array_append_new (t->events, ev);
    if (t->outbox) {
        cn_msgw_t w;
        cn_msgw_init (&w, "task_event", detail ? 5 : 4);
        cn_msgw_str (&w, "id", t->id);
        cn_msgw_uint (&w, "seq", seq);
        cn_msgw_str (&w, "name", name);
        if (detail)
            cn_msgw_json (&w, "event", detail);
        cn_msgw_int (&w, "time_ms", time_ms);
        s_emit (cn, t, &w);
    }
    json_decref (detail);
}

/* Answer a held request (AM_VMOP_REPLY to the listener's loop). */
static void
s_answer (atask_t *t, int status, json_t *body)
{
    amsg_t *m = calloc (1, sizeof *m);
    if (!m)
        abort ();
    m->kind = AM_VMOP_REPLY;
    m->home = t->home;
    m->req_id = t->req_id;
    m->status = status;
    m->body = body;
    cn_agent_post (t->home, m);
}

/* The end: takes result and error (either may be NULL). */
static void
s_end (acn_t *cn, atask_t *t, bool ok, json_t *result, json_t *error)
{
    if (t->status != TS_ACTIVE) {
        json_decref (result);
        json_decref (error);
        return;
    }
    t->status = ok ? TS_COMPLETE : TS_FAILURE;
    t->finished_ms = cn_now_ms ();
    t->result = ok ? (result ? result : json_object ()) : NULL;
    t->error = ok ? NULL : error;
    if (ok)
        json_decref (error);
    else
        json_decref (result);
    cn_agent_timer_stop (cn->loop, &t->tmo);
    if (h2o_linklist_is_linked (&t->alink))
        h2o_linklist_unlink (&t->alink);
    json_decref (t->last_vm);
    t->last_vm = NULL;
    if (t->outbox) {
        cn_msgw_t w;
        cn_msgw_init (&w, "task_end", 5);
        cn_msgw_str (&w, "id", t->id);
        cn_msgw_uint (&w, "seq", ++t->seq);
        cn_msgw_str (&w, "status", s_status_name (t->status));
        if (ok)
            cn_msgw_json (&w, "result", t->result);
        else
            cn_msgw_json (&w, "error", t->error);
        cn_msgw_int (&w, "time_ms", t->finished_ms);
        s_emit (cn, t, &w);
    }
    else
        t->seq++;
    if (t->waiting) {
        t->waiting = false;
        if (ok)
            s_answer (t, 200, json_incref (t->result));
        else
            s_answer (t, 500, json_pack ("{s:O}", "error", t->error));
    }
    cn_log (s_level (cn), COMPONENT, "task ended", "{s:s,s:s,s:s,s:s,s:s,s:I,s:O?}",
            "server_uuid", cn->uuid, "task_id", t->id, "task", s_kind_name (t->kind),
            "req_id", t->req, "status", s_status_name (t->status),
            "duration_ms", (json_int_t) (t->finished_ms - t->started_ms), "error", t->error);
}

static void
s_fail (acn_t *cn, atask_t *t, const char *code, const char *msg)
{
    s_end (cn, t, false, NULL, s_errobj (code, msg));
}

static void
s_on_tmo (atimer_t *tm)
{
    atask_t *t = H2O_STRUCT_FROM_MEMBER (atask_t, tmo, tm);
    s_fail (t->cn, t, "Timeout", "the task did not end in time");
}

/* The result for a VM (new reference); destroyed: the VM as it last was. */
static json_t *
s_vm_result (const cn_vm_t *vm, bool destroyed)
{
    json_t *o = cn_vm_to_json (vm);
    if (destroyed) {
        json_object_set_new (o, "state", json_string ("destroyed"));
        json_object_set_new (o, "zone_state", json_string ("destroyed"));
    }
    return o;
}

/* Has the task's operation finished? vm: the task's VM right now (NULL:
 * look it up; it may be gone). */
static void
s_check (acn_t *cn, atask_t *t, const cn_vm_t *vm)
{
    if (t->status != TS_ACTIVE || !t->launched)
        return;
    if (t->kind == TK_DESTROY) {
        if (t->saw_destroy) {
            json_t *r = t->last_vm ? json_incref (t->last_vm)
                                   : json_pack ("{s:s,s:s}", "uuid", t->vm, "state", "destroyed");
            s_end (cn, t, true, r, NULL);
        }
        return;
    }
    if (!vm)
        vm = cn_vmdummy_find (cn->vms, t->vm);
    if (!vm) {
        s_fail (cn, t, "VmNotFound", "the VM went away while the task ran");
        return;
    }
    if (t->kind == TK_UPDATE || vm->op == CN_VM_OP_NONE)
        s_end (cn, t, true, s_vm_result (vm, false), NULL);
}

void
cn_agent_tasks_vm_event (acn_t *cn, const cn_vm_t *vm, cn_vm_event_t ev, int64_t time_ms)
{
    atasks_t *ts = cn->tasks;
    if (!ts)
        return;
    for (h2o_linklist_t *l = ts->active.next; l != &ts->active;) {
        atask_t *t = H2O_STRUCT_FROM_MEMBER (atask_t, alink, l);
        l = l->next;            /* t may end (and leave the list) below */
        if (!t->vm[0] || strcmp (t->vm, vm->uuid) != 0)
            continue;
        bool gone = ev == CN_VM_EV_DESTROY;
        s_event (cn, t, "vm_state",
                 json_pack ("{s:s,s:s,s:s,s:I}", "event", cn_vm_event_name (ev),
                            "state", gone ? "destroyed" : vm->state,
                            "zone_state", gone ? "destroyed" : cn_vm_zone_state (vm->state),
                            "vm_seq", (json_int_t) vm->seq),
                 time_ms);
        json_decref (t->last_vm);
        t->last_vm = s_vm_result (vm, gone);
        if (gone)
            t->saw_destroy = true;
        if (gone && t->kind != TK_DESTROY) {
            if (t->launched)
                s_fail (cn, t, "VmNotFound", "the VM was destroyed while the task ran");
            continue;
        }
        s_check (cn, t, gone ? NULL : vm);
    }
}

/* ------------------------------------------------------------------ */
/* Running a task                                                       */

/* Check the VM can take the operation; false (and the task failed) if not. */
static bool
s_precheck (acn_t *cn, atask_t *t, const cn_vm_t *vm)
{
    char msg[160];
    if (!vm) {
        snprintf (msg, sizeof msg, "VM %s not found", t->vm);
        s_fail (cn, t, "VmNotFound", msg);
        return false;
    }
    if (t->kind == TK_UPDATE)
        return true;
    bool busy = vm->op != CN_VM_OP_NONE;
    if (t->kind == TK_KILL)
        busy = busy && vm->op != CN_VM_OP_STOP && vm->op != CN_VM_OP_REBOOT;
    if (busy) {
        snprintf (msg, sizeof msg, "VM %s is busy (%s)", t->vm, vm->state);
        s_fail (cn, t, "VmBusy", msg);
        return false;
    }
    const char *want = NULL;
    switch (t->kind) {
    case TK_BOOT: want = "stopped"; break;
    case TK_SHUTDOWN:
    case TK_REBOOT: want = "running"; break;
    case TK_KILL:
        if (strcmp (vm->state, "stopping") == 0)
            return true;
        want = "running";
        break;
    default: break;
    }
    if (want && strcmp (vm->state, want) != 0) {
        snprintf (msg, sizeof msg, "VM %s is %s, not %s", t->vm, vm->state, want);
        s_fail (cn, t, "VmBadState", msg);
        return false;
    }
    return true;
}

static void
s_run (acn_t *cn, atask_t *t, const json_t *params)
{
    int64_t now = cn_now_ms ();
    s_event (cn, t, "start", t->vm[0] ? json_pack ("{s:s,s:s}", "task", s_kind_name (t->kind),
                                                    "vm_uuid", t->vm)
                                      : json_pack ("{s:s}", "task", s_kind_name (t->kind)),
             now);
    char err[256] = "";
    int rc = 0;
    if (t->kind == TK_SYSINFO) {
        if (cn_agent_sysinfo_now (cn, err, sizeof err) != 0)
            s_fail (cn, t, "SysinfoUnavailable", err);
        else
            s_end (cn, t, true, json_pack ("{s:s}", "server_uuid", cn->uuid), NULL);
        return;
    }
    const cn_vm_t *vm = cn_vmdummy_find (cn->vms, t->vm);
    if (t->kind == TK_CREATE) {
        if (vm) {
            snprintf (err, sizeof err, "VM %s exists", t->vm);
            s_fail (cn, t, "VmExists", err);
            return;
        }
        /* the uuid is ours already (drawn when absent), so the backend's
         * events during the call find this task */
        json_t *p = json_is_object (params) ? json_copy ((json_t *) params) : json_object ();
        json_object_set_new (p, "uuid", json_string (t->vm));
        char out[37];
        rc = cn_vmdummy_create (cn->vms, p, now, out, err, sizeof err);
        json_decref (p);
        if (rc != 0) {
            s_fail (cn, t, "InvalidArgument", err);
            return;
        }
    }
    else {
        if (!s_precheck (cn, t, vm))
            return;
        switch (t->kind) {
        case TK_BOOT: rc = cn_vmdummy_start (cn->vms, t->vm, now, err, sizeof err); break;
        case TK_SHUTDOWN: rc = cn_vmdummy_stop (cn->vms, t->vm, now, err, sizeof err); break;
        case TK_REBOOT: rc = cn_vmdummy_reboot (cn->vms, t->vm, now, err, sizeof err); break;
        case TK_KILL: rc = cn_vmdummy_kill (cn->vms, t->vm, now, err, sizeof err); break;
        case TK_DESTROY: rc = cn_vmdummy_destroy_vm (cn->vms, t->vm, now, err, sizeof err); break;
        case TK_UPDATE: {
            json_t *ch = json_copy ((json_t *) params);
            json_object_del (ch, "uuid");
            rc = cn_vmdummy_update (cn->vms, t->vm, ch, now, err, sizeof err);
            json_decref (ch);
            if (rc != 0) {
                s_fail (cn, t, "InvalidArgument", err);
                return;
            }
            break;
        }
        default: abort ();
        }
        if (rc != 0) {
            s_fail (cn, t, "BackendError", err);
            return;
        }
    }
    atomic_store (&cn->nvms, cn_vmdummy_count (cn->vms));
    cn_agent_vm_sched (cn);
    t->launched = true;
    s_check (cn, t, NULL);
}

/* ------------------------------------------------------------------ */
/* Requests                                                             */

static json_t *
s_view (const atask_t *t)
{
    char sa[32], fa[32];
    json_t *o = json_pack ("{s:s,s:s,s:s,s:O,s:s,s:I}", "id", t->id, "task", s_kind_name (t->kind),
                           "status", s_status_name (t->status), "events", t->events,
                           "started_at", cn_iso8601 (t->started_ms, sa, sizeof sa),
                           "unacked", (json_int_t) t->pending);
    json_object_set_new (o, "finished_at", t->finished_ms
                         ? json_string (cn_iso8601 (t->finished_ms, fa, sizeof fa))
                         : json_null ());
    if (t->vm[0])
        json_object_set_new (o, "vm_uuid", json_string (t->vm));
    if (t->result)
        json_object_set (o, "result", t->result);
    if (t->error)
        json_object_set (o, "error", t->error);
    return o;
}

static json_t *
s_history (atasks_t *ts)
{
    json_t *arr = json_array ();
    if (!ts)
        return arr;
    size_t n = 0;
    for (h2o_linklist_t *l = ts->all.prev; l != &ts->all && n < S_HISTORY; l = l->prev, n++) {
        const atask_t *t = H2O_STRUCT_FROM_MEMBER (atask_t, link, l);
        char sa[32], fa[32];
        json_array_append_new (arr, json_pack ("{s:s,s:s,s:s,s:s,s:o}", "id", t->id,
                                               "task", s_kind_name (t->kind),
                                               "status", s_status_name (t->status),
                                               "started_at", cn_iso8601 (t->started_ms, sa, sizeof sa),
                                               "finished_at", t->finished_ms
                                               ? json_string (cn_iso8601 (t->finished_ms, fa,
                                                                          sizeof fa))
                                               : json_null ()));
    }
    return arr;
}

static bool
s_reply (amsg_t *m, int status, json_t *body)
{
    json_decref (m->params);
    m->params = NULL;
    m->status = status;
    m->body = body;
    return true;
}

static bool
s_post (acn_t *cn, amsg_t *m)
{
    /* the listener checked the shape: {task: known name, params: object?},
     * params.uuid a UUID where the task needs one */
    const json_t *body = m->params;
    tkind_t kind = cn_agent_task_kind (json_string_value (json_object_get (body, "task")));
    const json_t *params = json_object_get (body, "params");
    const char *pu = json_string_value (json_object_get (params, "uuid"));
    char vm[37] = "";
    if (pu && !cn_uuid_normalize (pu, vm))
        vm[0] = '\0';
    if (kind == TK_NONE)
        return s_reply (m, 404, s_errbody ("ResourceNotFound", "unknown task"));

    if (kind == TK_LOAD) {
        /* a read: answered at once, no record */
        const cn_vm_t *v = cn_vmdummy_find (cn->vms, vm);
        if (!v) {
            char msg[80];
            snprintf (msg, sizeof msg, "VM %s not found", vm);
            return s_reply (m, 404, json_pack ("{s:o,s:s,s:s}", "error",
                                               s_errobj ("VmNotFound", msg),
                                               "code", "VmNotFound", "message", msg));
        }
        return s_reply (m, 200, cn_vm_to_json (v));
    }

    atasks_t *ts = s_table (cn);
    if (m->task_id[0] && s_find (ts, m->task_id)) {
        /* the same id again (a retried dispatch): accepted, not run twice */
        return s_reply (m, 202, json_pack ("{s:s}", "id", m->task_id));
    }
    if (ts->paused)
        return s_reply (m, 503, s_errbody ("ServiceUnavailable", "paused"));
    if (!s_make_room (cn, ts)) {
        CN_WARN (COMPONENT, "task refused: the outbox is full", "{s:s,s:s,s:i,s:I}",
                 "server_uuid", cn->uuid, "task_id", m->task_id, "tasks_max",
                 cn->a->cfg.tasks_max, "unacked_frames", (json_int_t) ts->nframes);
        return s_reply (m, 503, s_errbody ("ServiceUnavailable", "outbox full"));
    }
    char id[37];
    if (m->task_id[0])
        memcpy (id, m->task_id, sizeof id);
    else
        cn_uuid_new (id);
    if (kind == TK_CREATE && !vm[0])
        cn_uuid_new (vm);
    atask_t *t = s_task_new (cn, ts, id, kind, kind == TK_SYSINFO ? NULL : vm, m->xreq);
    t->outbox = m->task_id[0] != '\0';
    if (!t->outbox) {
        t->waiting = true;
        t->home = m->home;
        t->req_id = m->req_id;
    }
    cn_log (s_level (cn), COMPONENT, "task started", "{s:s,s:s,s:s,s:s,s:s,s:b}",
            "server_uuid", cn->uuid, "task_id", t->id, "task", s_kind_name (kind),
            "vm_uuid", t->vm, "req_id", t->req, "held", !t->outbox);
    s_run (cn, t, params);
    if (t->outbox)
        return s_reply (m, 202, json_pack ("{s:s}", "id", t->id));
    /* held: s_end answers (it may have already) */
    return false;
}

bool
cn_agent_tasks_msg (acn_t *cn, amsg_t *m)
{
    switch (m->top) {
    case TOP_POST:
        return s_post (cn, m);
    case TOP_GET: {
        atask_t *t = cn->tasks ? s_find (cn->tasks, m->task_id) : NULL;
        if (!t)
            return s_reply (m, 404, s_errbody ("ResourceNotFound", "no such task"));
        return s_reply (m, 200, s_view (t));
    }
    case TOP_HISTORY:
        return s_reply (m, 200, s_history (cn->tasks));
    case TOP_PAUSE:
    case TOP_RESUME: {
        atasks_t *ts = s_table (cn);
        bool pause = m->top == TOP_PAUSE;
        if (ts->paused != pause)
            CN_INFO (COMPONENT, pause ? "tasks paused" : "tasks resumed", "{s:s}",
                     "server_uuid", cn->uuid);
        ts->paused = pause;
        return s_reply (m, 204, NULL);
    }
    }
    return s_reply (m, 400, s_errbody ("BadRequest", "unknown operation"));
}

void
cn_agent_tasks_stop (acn_t *cn)
{
    atasks_t *ts = cn->tasks;
    if (!ts)
        return;
    for (h2o_linklist_t *l = ts->active.next; l != &ts->active; l = l->next) {
        atask_t *t = H2O_STRUCT_FROM_MEMBER (atask_t, alink, l);
        if (t->waiting) {
            t->waiting = false;
            s_answer (t, 503, s_errbody ("ServiceUnavailable", "the agent is stopping"));
        }
    }
}

void
cn_agent_tasks_free (acn_t *cn)
{
    atasks_t *ts = cn->tasks;
    if (!ts)
        return;
    while (!h2o_linklist_is_empty (&ts->all))
        s_task_free (ts, H2O_STRUCT_FROM_MEMBER (atask_t, link, ts->all.next));
    free (ts);
    cn->tasks = NULL;
}
