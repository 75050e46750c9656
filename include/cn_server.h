/*
 * cn_server: the server record, derived from sysinfo, and its API views.
 *
 * A record is the JSON object stored as _value in bucket cnapi_servers: the
 * API's server object (docs/api.md) without the derived `status`, plus
 * internal fields the API never shows:
 *   sysinfo_ms      source time of the stored sysinfo (orders racing writers)
 *   last_sysinfo    ms when sysinfo was last received (freshness, see below)
 *   uuid_conflicts  shown in the API: other machines that reported this UUID
 * and two fields of ours the API does show: admin_ip and agent_port, where
 * the task router reaches the server's agent (docs/server-record.md).
 *
 * Freshness: unchanged sysinfo writes nothing, except that last_sysinfo is
 * rewritten once it is older than freshness/3, so the stored value is never
 * more than a third of the window behind.
 */
#ifndef CN_SERVER_H
#define CN_SERVER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cn_liveness.h"
#include "cn_moray.h"
#include "cn_sysinfo.h"

#define CN_BUCKET_SERVERS "cnapi_servers"
#define CN_SYSINFO_MAX_BYTES (4 * 1024 * 1024)

extern const cn_mindex_t cn_server_index[];
extern const size_t cn_server_nindex;

/* An API error: HTTP status, code, message, and for InvalidParameters the
 * list [{field, code:"Invalid", message}]. Zero-initialise before first use;
 * cn_apierr_set leaves errors alone, cn_apierr_fini releases it (idempotent). */
typedef struct {
    int status;
    const char *code;         /* static string, e.g. "InvalidArgument" */
    char message[256];
    json_t *errors;           /* owned, may be NULL */
} cn_apierr_t;

void cn_apierr_set (cn_apierr_t *e, int status, const char *code, const char *fmt, ...);
void cn_apierr_fini (cn_apierr_t *e);
/* {"code":..., "message":..., ["errors":...]} as JSON text; caller frees. */
char *cn_apierr_body (const cn_apierr_t *e);
/* Append {field, code:"Invalid", message} to errs (an InvalidParameters
 * list). */
void cn_apierr_invalid (json_t *errs, const char *field, const char *fmt, ...)
    __attribute__ ((format (printf, 3, 4)));
/* Object.prototype.toString's name for a JSON value ("[object String]", ...;
 * NULL is "[object Undefined]"), as the reference's messages show it. */
const char *cn_js_type (const json_t *v);

/* Parse and check a sysinfo document: a JSON object of at most
 * CN_SYSINFO_MAX_BYTES with a valid "UUID" (equal to expect_uuid when that is
 * not NULL) and the right JSON types for the keys we derive fields from.
 * 0 with *out set, or -1 with err filled. */
int cn_sysinfo_parse (const char *body, size_t len, const char *expect_uuid,
                      json_t **out, char *err, size_t errlen);
/* The checks of cn_sysinfo_parse after the JSON parse, on a parsed value (or
 * any object holding at least its members the checks look at: those of
 * cn_sysinfo_t's summary). 0, or -1 with err filled. */
int cn_sysinfo_check (const json_t *si, const char *expect_uuid, char *err, size_t errlen);

typedef struct {
    const char *datacenter;   /* from config */
    int64_t now_ms;           /* receipt time */
    int64_t sent_ms;          /* source time of this sysinfo; 0 = unknown (use now) */
    int freshness_s;          /* sysinfo freshness window */
} cn_sysinfo_ctx_t;

typedef enum {
    CN_SRV_WRITE,             /* *out is the record to store */
    CN_SRV_UNCHANGED,         /* nothing to write */
    CN_SRV_STALE,             /* older than what is stored: nothing to write */
    CN_SRV_CONFLICT           /* another machine claims this UUID; *out is the
                                 existing record with the report added, or NULL
                                 when there is nothing new to record */
} cn_srv_result_t;

/* Merge a parsed sysinfo into the existing record (NULL for a new server).
 * Operator-set fields (reserved, traits, comments, ...) are kept. */
cn_srv_result_t cn_server_apply_sysinfo (const json_t *existing, const json_t *sysinfo,
                                         const cn_sysinfo_ctx_t *ctx, json_t **out);
/* The same for a record kept apart from its sysinfo (the state writer's way:
 * the stored text is the record with "sysinfo": the sysinfo's text added):
 * existing has no "sysinfo" member (one there is ignored), old_si is its
 * sysinfo (NULL: none), and *out has no "sysinfo" member either: its sysinfo
 * is si on CN_SRV_WRITE, old_si on CN_SRV_CONFLICT. Same results as
 * cn_server_apply_sysinfo on the joined records. */
cn_srv_result_t cn_server_apply_sysinfo_si (const json_t *existing, const cn_sysinfo_t *old_si,
                                            const cn_sysinfo_t *si,
                                            const cn_sysinfo_ctx_t *ctx, json_t **out);

/* "running", "unknown" or "rebooting" (from transitional_status).
 * When live (the status table, may be NULL) holds a row for the record's
 * uuid, the agent session decides: running while the row says running.
 * Otherwise (no session row: an unsetup server, or no table) running while
 * last_sysinfo is within the freshness window. When not running: "rebooting"
 * when transitional_status is "rebooting" (as the reference, it only
 * explains an unreachable server), else "unknown". */
const char *cn_server_status (const json_t *rec, int64_t now_ms, int freshness_s,
                              const cn_liveness_t *live);

/* Everything a server's status and last heartbeat derive from in its
 * record, taken out once: the gateway's near cache keeps this instead of
 * the record and computes each response's status without touching JSON. */
typedef struct {
    char uuid[37];             /* normalised; "" when the record has none */
    bool has_last_sysinfo;
    int64_t last_sysinfo;      /* ms */
    bool rebooting;            /* transitional_status is "rebooting" */
} cn_status_inputs_t;

void cn_server_status_inputs (const json_t *rec, cn_status_inputs_t *out);

/* cn_server_status of the record in (same rules); when hb is not NULL it
 * also receives the record's last heartbeat in ms, 0 when there is none:
 * the session row's last_heartbeat when live holds a row for it, else
 * last_sysinfo. */
const char *cn_server_status_of (const cn_status_inputs_t *in, int64_t now_ms, int freshness_s,
                                 const cn_liveness_t *live, int64_t *hb);

/* VM state from the agent (docs/server-record.md, "VMs"). Each VM carries
 * its own "seq" (grows with every change of that VM); a change older than
 * what the record holds (the VM's seq, or the seq of its remembered destroy
 * in the internal vms_destroyed) is ignored, so the same event arriving
 * over AMQP and over the session is applied once, in order.
 *
 * cn_server_apply_vms: the agent's full state (hello): every VM it reports
 * replaces the stored one unless the stored one is newer; stored VMs it
 * does not report are dropped. CN_SRV_WRITE when rec changed (rec is
 * changed in place), else CN_SRV_UNCHANGED. vms must be an object of
 * objects (other members are skipped). */
cn_srv_result_t cn_server_apply_vms (json_t *rec, const json_t *vms, int64_t now_ms);

/* Whether an event of vm_uuid with seq is no newer than what rec holds (the
 * VM's seq, or its remembered destroy's): cn_server_apply_vm_event would
 * answer CN_SRV_STALE. Seqs only grow, so a stale event against an older
 * copy of a record is stale against the stored one too. */
bool cn_server_vm_event_stale (const json_t *rec, const char *vm_uuid, uint64_t seq);

/* One VM event: event "destroy" removes the VM (and remembers the seq);
 * "create", "state", "update" store vm (an object, required) with its seq.
 * CN_SRV_WRITE (rec changed in place), CN_SRV_STALE (seq not newer), or
 * CN_SRV_UNCHANGED (same VM object already stored). */
cn_srv_result_t cn_server_apply_vm_event (json_t *rec, const char *vm_uuid, const char *event,
                                          uint64_t seq, const json_t *vm, int64_t now_ms);

enum {
    CN_EXTRA_AGENTS = 1, CN_EXTRA_VMS = 2, CN_EXTRA_MEMORY = 4, CN_EXTRA_DISK = 8,
    CN_EXTRA_SYSINFO = 16, CN_EXTRA_CAPACITY = 32, CN_EXTRA_ALL = 63
};

/* GET /servers query -> what to fetch. params: object of query/body values
 * (NULL = none). On error q is left zeroed (cn_server_query_fini is safe). */
typedef struct {
    char *filter;             /* LDAP filter on cnapi_servers' indexes */
    int64_t limit, offset;
    unsigned extras;
    char **fields;            /* NULL = all; else nfields names */
    size_t nfields;
} cn_server_query_t;
int cn_server_list_query (const json_t *params, cn_server_query_t *q, cn_apierr_t *err);
void cn_server_query_fini (cn_server_query_t *q);

/* The API view of a record (new reference): full = GET /servers/:uuid,
 * otherwise the list view with extras and fields applied. Adds status.
 * nfields > 0 picks exactly those fields from the full view. NULL when rec
 * is not an object. */
json_t *cn_server_render (const json_t *rec, bool full, unsigned extras,
                          char *const *fields, size_t nfields,
                          int64_t now_ms, int freshness_s, const cn_liveness_t *live);

/* POST /servers/:uuid: check params strictly and apply them to rec.
 * 0 on success; -1 with err set (409 InvalidArgument for an unknown
 * parameter, 500 InvalidParameters with errors[] for a bad value). */
int cn_server_update (json_t *rec, const json_t *params, int64_t now_ms, cn_apierr_t *err);

#endif
