/*
 * cn_ticket: waitlist tickets (docs/waitlist.md), the pure part: building
 * and checking a ticket, the queue a ticket belongs to, and deciding which
 * ticket of a queue is active. No I/O here; actors/cn_waitlist.c does the
 * store and the waiting.
 *
 * A ticket is stored as _value in bucket cnapi_waitlist_tickets: the API's
 * Ticket object {uuid, server_uuid, scope, id, action, extra, reqid,
 * expires_at, created_at, updated_at, status} plus internal fields the API
 * never shows:
 *   queue        the queue key (cn_ticket_queue_key), indexed
 *   seq          the ticket's place in its queue (from the queue row's
 *                counter), indexed; creation order within the queue
 *   expires_ms   expires_at in ms since the epoch, indexed (the sweep)
 * status is one of queued, active, finished, expired.
 *
 *   cn_apierr_t e = { 0 };
 *   json_t *t = cn_ticket_new (server_uuid, params, req_id, now, uuid, &e);
 *   ...
 *   json_t *view = cn_ticket_view (t);       // what the API shows
 */
#ifndef CN_TICKET_H
#define CN_TICKET_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cn_moray.h"
#include "cn_server.h"

#define CN_BUCKET_TICKETS "cnapi_waitlist_tickets"
#define CN_BUCKET_TICKET_QUEUES "cnapi_waitlist_queues"
/* Redis channel: "<ticket_uuid> <status>" after every committed change */
#define CN_TICKETS_CHANNEL "cnapi:tickets"
/* the longest scope / id / action we take (bytes) */
#define CN_TICKET_MAX_FIELD 256

extern const cn_mindex_t cn_ticket_index[];
extern const size_t cn_ticket_nindex;
extern const cn_mindex_t cn_ticket_queue_index[];
extern const size_t cn_ticket_queue_nindex;

/* Parse an ISO 8601 date-time: YYYY-MM-DDTHH:MM[:SS[.fff...]] followed by
 * Z or +HH:MM / -HH:MM (or nothing: UTC), with a real calendar date.
 * true with *ms set; false (ms untouched) otherwise. */
bool cn_ticket_parse_time (const char *s, int64_t *ms);

/* The queue key of (server_uuid, scope, id): unambiguous for any strings
 * ("<server_uuid>:<strlen (scope)>:<scope>:<id>"). Caller frees. */
char *cn_ticket_queue_key (const char *server_uuid, const char *scope, const char *id);

/* A new ticket (status "queued", seq 0) from POST /servers/:uuid/tickets
 * parameters: scope and id (non-empty strings), expires_at (an ISO 8601
 * string, stored as cn_iso8601 gives it), action (optional string), extra
 * (optional object). On a rule failure NULL with e set: 500
 * InvalidParameters with one {field, code: "Invalid", message} per bad
 * parameter. uuid is the new ticket's uuid. */
json_t *cn_ticket_new (const char *server_uuid, const json_t *params, const char *reqid,
                       int64_t now_ms, const char *uuid, cn_apierr_t *e);

/* True when the stored value looks like a ticket we can work with (uuid,
 * server_uuid, scope, id, queue strings; status one of the four; seq and
 * expires_ms numbers). */
bool cn_ticket_valid (const json_t *t);

/* Settle one queue: tickets is the array of the queue's tickets that are
 * "queued" or "active", in seq order. Every one whose expires_ms <= now_ms
 * becomes "expired"; then, when none is active, the first queued one
 * becomes "active". updated_at is set on every ticket changed, and each
 * changed ticket is appended to changed (a reference). Returns the number
 * changed. Invariant on return: at most one ticket of the array is active
 * (if the input held several active ones, the later ones are put back to
 * "queued": the earliest keeps the resource). */
size_t cn_ticket_settle (json_t *tickets, int64_t now_ms, json_t *changed);

/* The API's Ticket object: a copy without the internal fields. */
json_t *cn_ticket_view (const json_t *t);

#endif
