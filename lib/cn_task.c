/* cn_task: the task record and its rules. See include/cn_task.h. */
#include "cn_task.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "cn_util.h"

const cn_mindex_t cn_task_index[] = {
    { "server_uuid", CN_MIDX_STRING, false },
    { "status", CN_MIDX_STRING, false },
    { "instance", CN_MIDX_STRING, false },
};
const size_t cn_task_nindex = sizeof cn_task_index / sizeof cn_task_index[0];

static json_t *
s_str_or_null (const char *s)
{
    return s ? json_string (s) : json_null ();
}

static json_t *
s_iso (int64_t ms)
{
    char buf[40];
    return json_string (cn_iso8601 (ms, buf, sizeof buf));
}

json_t *
cn_task_new (const cn_task_spec_t *sp)
{
    json_t *rec = json_object ();
    if (!rec)
        abort ();
    json_object_set_new (rec, "id", json_string (sp->id));
    json_object_set_new (rec, "req_id", s_str_or_null (sp->req_id));
    json_object_set_new (rec, "task", json_string (sp->task));
    json_object_set_new (rec, "server_uuid", json_string (sp->server_uuid));
    json_object_set_new (rec, "vm_uuid", s_str_or_null (sp->vm_uuid));
    json_object_set_new (rec, "params", sp->params ? json_deep_copy (sp->params) : json_object ());
    json_object_set_new (rec, "status", json_string ("active"));
    json_object_set_new (rec, "timestamp", s_iso (sp->now_ms));
    json_object_set_new (rec, "history", json_array ());
    json_object_set_new (rec, "instance", s_str_or_null (sp->instance));
    json_object_set_new (rec, "instance_boot", s_str_or_null (sp->instance_boot));
    json_object_set_new (rec, "dispatched", json_false ());
    json_object_set_new (rec, "error", json_null ());
    json_object_set_new (rec, "result", json_null ());
    json_object_set_new (rec, "last_seq", json_integer (0));
    json_object_set_new (rec, "finished_at", json_null ());
    return rec;
}

bool
cn_task_active (const json_t *rec)
{
    const char *st = json_string_value (json_object_get (rec, "status"));
    return st && strcmp (st, "active") == 0;
}

static uint64_t
s_last_seq (const json_t *rec)
{
    json_t *v = json_object_get (rec, "last_seq");
    return json_is_integer (v) && json_integer_value (v) > 0
           ? (uint64_t) json_integer_value (v) : 0;
}

static json_t *
s_history (json_t *rec)
{
    json_t *h = json_object_get (rec, "history");
    if (!json_is_array (h)) {
        h = json_array ();
        json_object_set_new (rec, "history", h);
    }
    return h;
}

int
cn_task_apply_event (json_t *rec, uint64_t seq, const char *name, int64_t time_ms,
                     const json_t *event)
{
    if (!cn_task_active (rec) || seq <= s_last_seq (rec))
        return 0;
    json_t *e = json_object ();
    json_object_set_new (e, "name", json_string (name ? name : ""));
    json_object_set_new (e, "timestamp", s_iso (time_ms));
    json_object_set_new (e, "event", event ? json_deep_copy (event) : json_object ());
    json_array_append_new (s_history (rec), e);
    json_object_set_new (rec, "last_seq", json_integer ((json_int_t) seq));
    json_object_set_new (rec, "dispatched", json_true ());
    return 1;
}

static void
s_end (json_t *rec, const char *status, int64_t time_ms, const json_t *result,
       const json_t *error)
{
    json_object_set_new (rec, "status", json_string (status));
    json_object_set_new (rec, "finished_at", s_iso (time_ms));
    json_object_set_new (rec, "result", result ? json_deep_copy (result) : json_null ());
    json_object_set_new (rec, "error", error ? json_deep_copy (error) : json_null ());
    json_t *e = json_object ();
    json_t *ev = json_pack ("{s:s}", "status", status);
    if (error)
        json_object_set_new (ev, "error", json_deep_copy (error));
    json_object_set_new (e, "name", json_string ("end"));
    json_object_set_new (e, "timestamp", s_iso (time_ms));
    json_object_set_new (e, "event", ev);
    json_array_append_new (s_history (rec), e);
}

int
cn_task_apply_end (json_t *rec, uint64_t seq, const char *status, int64_t time_ms,
                   const json_t *result, const json_t *error)
{
    if (!status || (strcmp (status, "complete") != 0 && strcmp (status, "failure") != 0))
        return -1;
    if (!cn_task_active (rec) || seq <= s_last_seq (rec))
        return 0;
    bool fail = strcmp (status, "failure") == 0;
    json_t *err = NULL;
    if (fail && !json_is_object (error))
        err = json_pack ("{s:s,s:s}", "code", "TaskFailed", "message", "the task failed");
    s_end (rec, status, time_ms, fail ? NULL : result,
           fail ? (err ? err : error) : NULL);
    json_decref (err);
    json_object_set_new (rec, "last_seq", json_integer ((json_int_t) seq));
    json_object_set_new (rec, "dispatched", json_true ());
    return 1;
}

int
cn_task_fail (json_t *rec, const char *code, const char *message, int64_t now_ms)
{
    if (!cn_task_active (rec))
        return 0;
    json_t *err = json_pack ("{s:s,s:s}", "code", code, "message", message ? message : "");
    s_end (rec, "failure", now_ms, NULL, err);
    json_decref (err);
    return 1;
}

json_t *
cn_task_view (const json_t *rec)
{
    json_t *v = json_deep_copy (rec);
    if (!v)
        abort ();
    json_object_del (v, "params");
    json_object_del (v, "instance_boot");
    json_object_del (v, "last_seq");
    return v;
}

int64_t
cn_iso8601_parse (const char *s)
{
    int64_t ms;
    return cn_iso8601_to_ms (s, &ms) ? ms : -1;
}

int64_t
cn_task_created_ms (const json_t *rec)
{
    int64_t ms = cn_iso8601_parse (json_string_value (json_object_get (rec, "timestamp")));
    return ms > 0 ? ms : 0;
}

int
cn_task_parse_timeout (const json_t *v, int *out)
{
    if (!v) {
        *out = 3600;
        return 0;
    }
    long long n = -1;
    if (json_is_integer (v))
        n = json_integer_value (v);
    else
    if (json_is_string (v)) {
        const char *s = json_string_value (v);
        size_t len = json_string_length (v);
        if (len == 0 || len > 9)
            return -1;
        n = 0;
        for (size_t i = 0; i < len; i++) {
            if (!isdigit ((unsigned char) s[i]))
                return -1;
            n = n * 10 + (s[i] - '0');
        }
    }
    if (n < 1 || n > 3600)
        return -1;
    *out = (int) n;
    return 0;
}

const char *
cn_task_action_task (const char *action)
{
    static const char *const map[][2] = {
        { "start", "machine_boot" }, { "stop", "machine_shutdown" },
        { "reboot", "machine_reboot" }, { "kill", "machine_kill" },
        { "update", "machine_update" },
    };
    for (size_t i = 0; action && i < sizeof map / sizeof map[0]; i++)
        if (strcmp (action, map[i][0]) == 0)
            return map[i][1];
    return NULL;
}
