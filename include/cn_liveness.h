/*
 * cn_liveness: who holds each server's agent session, and the status every
 * instance answers with (docs/sessions.md).
 *
 * 1. The status row: bucket cnapi_status, key = server uuid, value
 *      {server_uuid, owner, owner_boot, agent_boot, epoch, status, last_heartbeat,
 *       since}
 *    owner is the instance name holding the session (null when none),
 *    owner_boot that instance's boot id (a uuid drawn at start: a restarted
 *    instance of the same name is a different owner), epoch grows with every
 *    takeover, status is "running" or "unknown", last_heartbeat and since
 *    are ISO 8601 (since = when status last changed). Indexed: owner, status.
 *    Rows change only by etag-conditional writes (the sessions actor).
 *
 * 2. The status table: an in-memory map uuid -> row that every instance
 *    keeps (loaded from the store, fed by the cnapi:status channel and by
 *    resyncs). Readers are the HTTP gateway's h2o thread (near cache) and the
 *    backends; the one writer is the sessions actor. A read-write lock
 *    guards it; a reader holds it for one hash lookup and a copy, a writer
 *    for at most CN_LIVENESS_CHUNK rows, so the h2o thread never waits
 *    longer than that.
 *
 * An update is applied only when its version (the row's _id in the store,
 * which grows with every write of that row) is newer than the one held, so
 * a late resync or a late channel message never moves a server backwards.
 */
#ifndef CN_LIVENESS_H
#define CN_LIVENESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cn_moray.h"

#define CN_BUCKET_STATUS "cnapi_status"
#define CN_BUCKET_INSTANCES "cnapi_instances"
/* "<uuid> <running|unknown> <owner|-> <epoch> <version>" per change */
#define CN_STATUS_CHANNEL "cnapi:status"
/* instance liveness key: value = boot id, PX session.dead_after_ms */
#define CN_INSTANCE_KEY_PREFIX "cnapi:instance:"
#define CN_LIVENESS_CHUNK 256
#define CN_LIVENESS_VOUCH_MAX 64

extern const cn_mindex_t cn_status_index[];
extern const size_t cn_status_nindex;
extern const cn_mindex_t cn_instance_index[];
extern const size_t cn_instance_nindex;

typedef struct {
    char uuid[37];
    bool running;             /* status "running"; else "unknown" */
    char owner[64];           /* "" = none */
    char owner_boot[37];      /* "" = none */
    char agent_boot[37];      /* the agent's boot id from its hello ("" = not given):
                                 another agent with the same server uuid is a duplicate */
    uint64_t epoch;
    int64_t last_heartbeat_ms;/* 0 = never */
    int64_t since_ms;
    int64_t version;          /* the row's _id (0 = not from the store) */
} cn_status_row_t;

/* Parse a stored value. 0, or -1 when it is not a status row (missing or
 * mistyped server_uuid / epoch / status). version is left 0. */
int cn_status_row_parse (const char *json, size_t len, cn_status_row_t *out);
/* The stored value (JSON text, malloc'd; abort on out of memory). */
char *cn_status_row_format (const cn_status_row_t *r);
/* "<uuid> <status> <owner|-> <epoch> <version>" into buf; returns buf. */
char *cn_status_row_message (const cn_status_row_t *r, char *buf, size_t len);
/* Parse a channel message (4 or 5 fields; version 0 when absent).
 * 0, or -1 when malformed. */
int cn_status_message_parse (const char *msg, cn_status_row_t *out);

typedef struct cn_liveness cn_liveness_t;

cn_liveness_t *cn_liveness_new (void);
void cn_liveness_destroy (cn_liveness_t **p);

/* Apply r when its version is newer than the held one (or nothing is held).
 * true when applied. */
bool cn_liveness_put (cn_liveness_t *t, const cn_status_row_t *r);
/* The same for n rows, taking the lock at most CN_LIVENESS_CHUNK rows at a
 * time. Returns how many were applied. */
size_t cn_liveness_put_many (cn_liveness_t *t, const cn_status_row_t *rows, size_t n);
/* Drop uuid (a deleted row). */
void cn_liveness_del (cn_liveness_t *t, const char *uuid);

/* Copy uuid's row into *out; false when there is none (out unchanged).
 * t may be NULL (then false). uuid: 36 characters, lower case. */
bool cn_liveness_get (const cn_liveness_t *t, const char *uuid, cn_status_row_t *out);

/* Heartbeats are not written per heartbeat, nor per session every few
 * seconds: an instance closes a session whose agent is silent for
 * session.dead_after_ms, so while an owner incarnation is alive each of its
 * running rows has an agent heard within that. The sessions actor vouches
 * for every owner it sees alive (its sweep, once a second, and itself);
 * readers see a running row's last_heartbeat as the later of the stored one
 * and its owner's vouch (docs/sessions.md, "last_heartbeat").
 *
 * cn_liveness_get_seen: cn_liveness_get with that applied (what the API
 * shows). cn_liveness_vouch: (owner, owner_boot) seen alive at ms (kept if
 * later; at most CN_LIVENESS_VOUCH_MAX pairs, the one seen longest ago is
 * dropped for a new one). cn_liveness_vouched: its time, 0 when none. */
bool cn_liveness_get_seen (const cn_liveness_t *t, const char *uuid, cn_status_row_t *out);
void cn_liveness_vouch (cn_liveness_t *t, const char *owner, const char *owner_boot, int64_t ms);
int64_t cn_liveness_vouched (const cn_liveness_t *t, const char *owner, const char *owner_boot);

/* Loaded: the table has been read from the store at least once. Until then
 * readers fall back to the record's own freshness (cn_server_status). */
/* The held row's version (its _id; 0: not from the store), -1 when none. */
int64_t cn_liveness_version (const cn_liveness_t *t, const char *uuid);
void cn_liveness_set_loaded (cn_liveness_t *t, bool loaded);
bool cn_liveness_loaded (const cn_liveness_t *t);

/* Rows held and how many say running. */
size_t cn_liveness_count (const cn_liveness_t *t, size_t *running);

typedef struct {
    char owner[64];
    char owner_boot[37];
} cn_owner_t;
/* The distinct (owner, owner_boot) pairs of the running rows that name an
 * owner (for the sweep), in *out (malloc'd, caller frees); returns how
 * many. One walk under the read lock, no copy of the rows. */
size_t cn_liveness_owners (const cn_liveness_t *t, cn_owner_t **out);
/* Changes whenever cn_liveness_owners' answer may have changed (a row added,
 * deleted, or a change of its owner, owner_boot or running): the sweep
 * walks the table only then. */
uint64_t cn_liveness_owners_gen (const cn_liveness_t *t);

#endif
