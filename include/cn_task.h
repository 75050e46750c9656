/*
 * cn_task: the task record of bucket cnapi_tasks (proto/tasks.md, "The task
 * record") and the pure rules that change it. The tasks actor
 * (actors/cn_tasks.c) reads a record, applies one of these, and writes it
 * back conditionally on the etag it read; every rule here is idempotent so
 * that a retry after a conflict, or the same agent frame sent twice, changes
 * nothing the second time.
 *
 * Rules every change obeys: status goes "active" -> "complete" | "failure"
 * and never back; an ended record never changes again; an agent frame is
 * applied only when its seq is above last_seq.
 */
#ifndef CN_TASK_H
#define CN_TASK_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "cn_moray.h"

#define CN_BUCKET_TASKS "cnapi_tasks"
/* "<task id> <status>" after every write that ends a task */
#define CN_TASKS_CHANNEL "cnapi:tasks"

extern const cn_mindex_t cn_task_index[];
extern const size_t cn_task_nindex;

typedef struct {
    const char *id;           /* task id (uuid) */
    const char *req_id;
    const char *task;         /* machine_create, ... */
    const char *server_uuid;
    const char *vm_uuid;      /* may be NULL */
    const json_t *params;     /* what the agent gets (may be NULL: {}) */
    const char *instance;
    const char *instance_boot;
    int64_t now_ms;
} cn_task_spec_t;

/* A new active record (new reference). */
json_t *cn_task_new (const cn_task_spec_t *spec);

/* true when rec's status is "active". */
bool cn_task_active (const json_t *rec);

/* task_event: append {name, timestamp, event} to history, last_seq = seq,
 * dispatched = true (the agent has the task). 1 changed; 0 when the task
 * ended or seq <= last_seq. */
int cn_task_apply_event (json_t *rec, uint64_t seq, const char *name, int64_t time_ms,
                         const json_t *event);

/* task_end (status "complete" or "failure"; result / error may be NULL):
 * the end, dispatched = true. 1 changed; 0 when the task ended already or seq <= last_seq;
 * -1 when status is neither. */
int cn_task_apply_end (json_t *rec, uint64_t seq, const char *status, int64_t time_ms,
                       const json_t *result, const json_t *error);

/* End an active task "failure" with error {code, message} (dispatch
 * failures, the sweep). 1 changed, 0 when it ended already. */
int cn_task_fail (json_t *rec, const char *code, const char *message, int64_t now_ms);

/* The API view (GET /tasks/:id): the record without params,
 * instance_boot, last_seq (new reference). */
json_t *cn_task_view (const json_t *rec);

/* ms since the epoch from the record's ISO 8601 timestamp; 0 when absent
 * or unreadable. */
int64_t cn_task_created_ms (const json_t *rec);

/* GET /tasks/:id/wait's timeout parameter: NULL (absent) -> 3600; a string
 * or an integer holding a whole number 1..3600 -> that. 0 with *out set, -1
 * when it is anything else. */
int cn_task_parse_timeout (const json_t *v, int *out);

/* vm_action's action -> the task name; NULL when unknown. */
const char *cn_task_action_task (const char *action);

/* ISO 8601 UTC (as cn_iso8601 writes it, milliseconds optional) -> ms; -1
 * when unreadable. */
int64_t cn_iso8601_parse (const char *s);

#endif
