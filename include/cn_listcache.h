/*
 * cn_listcache: the default list views of server records (GET /servers
 * without extras or fields), rendered once per record version and shared
 * by the backend workers.
 *
 *   cn_listcache_t *c = cn_listcache_new (128 << 20);       // byte bound
 *   cn_lview_t *v = cn_listcache_get (c, key, etag, id);    // a reference, or NULL
 *   if (!v && (v = cn_lview_new (rec, key, etag, id, flags)))
 *       cn_listcache_put (c, v);                            // the cache takes its own
 *   const char *st = cn_server_status_of (&v->in, now, fresh, live, NULL);
 *   n = cn_lview_splice (v, st, out);                       // the row's bytes
 *   cn_lview_release (&v);
 *   cn_listcache_destroy (&c);
 *
 * A view is the record's list view as JSON text without its "status", the
 * only member of that view that depends on the time and the status table
 * (last_heartbeat is not in it); status is spliced back per response, at
 * the end, where cn_server_render puts it, from the status inputs kept with
 * the text (what the gateway's near cache does for GET /servers/:uuid, at
 * the head there). The bytes are those of json_dumps (cn_server_render (rec,
 * false, 0, NULL, 0, ...), flags), status included.
 *
 * An entry is keyed by the record's _key and matches only its _etag and _id
 * (version): a record that changed has a new _id, so its old view is never
 * used again; it is replaced by the next fill for that key, or evicted.
 * Views are immutable and reference counted: a reader keeps using a view
 * the cache has since replaced or evicted until it releases it.
 *
 * Memory: the entries' bytes (text, struct, key) are kept at or under
 * max_bytes by evicting the least recently used; views that readers still
 * hold after eviction are not counted (each backend holds at most one page,
 * 1,000 views, at a time). The hash table itself grows with the entries (8
 * bytes a slot, one slot per entry). max_bytes 0: nothing is ever cached.
 *
 * Thread safety: every cn_listcache_* call takes the cache's mutex; views
 * are read without it.
 */
#ifndef CN_LISTCACHE_H
#define CN_LISTCACHE_H

#include <jansson.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "cn_server.h"

#define CN_LVIEW_KEY_MAX 63         /* longer keys are never cached */
/* Room cn_lview_splice needs beyond the view's len and the status. */
#define CN_LVIEW_SPLICE_EXTRA 16

typedef struct {
    atomic_int refs;                /* private */
    char key[CN_LVIEW_KEY_MAX + 1];
    char etag[9];
    int64_t version;                /* the record's _id */
    cn_status_inputs_t in;          /* what its status derives from */
    size_t len;
    char text[];                    /* '{' ... '}' without "status", NUL-terminated */
} cn_lview_t;

/* The view of rec (a record as stored, sysinfo may be left out: the list
 * view does not show it) for key, etag and version, text dumped with
 * json_flags; one reference, the caller's. NULL when rec is not an object,
 * key is empty or longer than CN_LVIEW_KEY_MAX, or the rendered view's
 * "status" is not its last member (a record carrying a member named
 * status: the caller renders it whole instead). */
cn_lview_t *cn_lview_new (const json_t *rec, const char *key, const char *etag,
                          int64_t version, size_t json_flags);
/* Write the view with "status":"<status>" as its last member into out (room
 * for v->len + strlen (status) + CN_LVIEW_SPLICE_EXTRA), NUL-terminated;
 * returns the length. */
size_t cn_lview_splice (const cn_lview_t *v, const char *status, char *out);
/* Drop a reference; *p becomes NULL. NULL and *p NULL are fine. */
void cn_lview_release (cn_lview_t **p);

typedef struct cn_listcache cn_listcache_t;

typedef struct {
    uint64_t entries, bytes, max_bytes;
    uint64_t hits, misses, puts, evictions;
} cn_listcache_stats_t;

/* Allocates only (abort on out of memory). */
cn_listcache_t *cn_listcache_new (size_t max_bytes);
/* Release every entry; views still held elsewhere live on. *p becomes NULL. */
void cn_listcache_destroy (cn_listcache_t **p);
/* A new reference to key's view if it is of etag and version, else NULL
 * (counted as a hit or a miss). */
cn_lview_t *cn_listcache_get (cn_listcache_t *c, const char *key, const char *etag,
                              int64_t version);
/* Keep v for its key (the cache takes a reference of its own; the caller's
 * stays the caller's), replacing the key's entry unless that one is of a
 * newer version; then evict the least recently used until within
 * max_bytes. */
void cn_listcache_put (cn_listcache_t *c, cn_lview_t *v);
void cn_listcache_stats (cn_listcache_t *c, cn_listcache_stats_t *out);

#endif
