/*
 * cn_moray: a Moray-layout object store in PostgreSQL (libpq, synchronous,
 * every call bounded by the connect/statement timeout).
 *
 * Layout (what a Moray server pointed at the same database also sees):
 *   buckets_config(name text PK, index text, pre text, post text, options text,
 *                  mtime timestamp)
 *   one table per bucket: _id bigint, _txn_snap integer, _key text PK,
 *                  _value text, _etag char(8), _mtime bigint, _vnode bigint,
 *                  plus one typed column per indexed field.
 * _etag is the CRC32 of _value (cn_etag). _id comes from the bucket's
 * sequence on insert and is bumped on every update, so it is a per-key version
 * that only grows (the Redis cache orders writes by it). Indexed columns are
 * filled from the top-level fields of the value on every put.
 *
 * Conditional writes: etag NULL = blind write; etag "" (CN_MORAY_ETAG_NULL)
 * = the key must not exist; otherwise the stored etag must equal it. A failed
 * condition returns CN_MORAY_CONFLICT and writes nothing.
 *
 * Errors: every call returns CN_MORAY_OK (0) or a negative cn_moray_rc;
 * CN_MORAY_EIO means the database is unreachable or the connection broke
 * (the connection is reset and re-opened on the next call).
 */
#ifndef CN_MORAY_H
#define CN_MORAY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    CN_MORAY_OK = 0,
    CN_MORAY_NOTFOUND = -1,
    CN_MORAY_CONFLICT = -2,   /* etag condition failed */
    CN_MORAY_EIO = -3,        /* unreachable, timeout, connection lost */
    CN_MORAY_EINVAL = -4,     /* bad bucket, bad filter, bad value */
    CN_MORAY_ESQL = -5        /* any other database error */
} cn_moray_rc;

#define CN_MORAY_ETAG_NULL ""

typedef struct cn_moray cn_moray_t;

typedef enum { CN_MIDX_STRING, CN_MIDX_NUMBER, CN_MIDX_BOOLEAN } cn_midx_type_t;

typedef struct {
    const char *name;         /* field name in the value, also the column name */
    cn_midx_type_t type;
    bool unique;
} cn_mindex_t;

typedef struct {
    char *key;
    char *value;              /* JSON text */
    size_t value_len;
    char etag[9];
    int64_t id;               /* version, see above */
    int64_t mtime;            /* ms since epoch */
} cn_mobj_t;

void cn_mobj_fini (cn_mobj_t *o);

/* Allocates only; the first call connects. */
cn_moray_t *cn_moray_new (const char *conninfo, int timeout_ms);
void cn_moray_destroy (cn_moray_t **p);
/* Connect now if not connected; CN_MORAY_OK or CN_MORAY_EIO. */
int cn_moray_connect (cn_moray_t *m);
bool cn_moray_connected (const cn_moray_t *m);
/* The last error message (static until the next call). */
const char *cn_moray_errmsg (const cn_moray_t *m);

/* Create or update a bucket (table, indexes, buckets_config row). Idempotent. */
int cn_moray_put_bucket (cn_moray_t *m, const char *bucket,
                         const cn_mindex_t *index, size_t nindex);

int cn_moray_get (cn_moray_t *m, const char *bucket, const char *key, cn_mobj_t *out);
/* out_etag (may be NULL) receives the new etag, out_id (may be NULL) the version. */
int cn_moray_put (cn_moray_t *m, const char *bucket, const char *key,
                  const char *value, const char *etag, char out_etag[9], int64_t *out_id);
int cn_moray_del (cn_moray_t *m, const char *bucket, const char *key, const char *etag,
                  int64_t *out_id);

typedef struct {
    int64_t limit;            /* 0 = no limit */
    int64_t offset;
    const char *sort;         /* indexed field or "_key"/"_id"/"_mtime"; NULL = _key */
    bool descending;
    /* Values the caller holds already (cn_moray_lock_many's idea, for a
     * find): a row whose _key is held_keys[i] and whose _etag is
     * held_etags[i] (and, when held_ids is not NULL, whose _id is
     * held_ids[i]) comes with value NULL (value_len 0); PostgreSQL neither
     * reads nor sends it. nheld entries (0: none); the rows, their order,
     * limit and offset are those of the same find without them (one
     * statement, one snapshot). */
    const char *const *held_keys;
    const char *const *held_etags;
    const int64_t *held_ids;
    size_t nheld;
    /* Every row with value NULL: keys, etags, versions and mtimes only. Not
     * with held values (CN_MORAY_EINVAL). */
    bool no_values;
} cn_mfind_opts_t;

/* Callback per row; return non-zero to stop early. The object is only valid
 * during the call; its value is NULL only where the options above left it
 * out. */
typedef int (*cn_mfind_cb) (const cn_mobj_t *obj, void *arg);

/* Find by an LDAP filter on indexed fields (Moray's filter language, see
 * cn_filter.h), e.g. "(&(setup=true)(hostname=cn*))"; "(_key=*)" = all. */
int cn_moray_find (cn_moray_t *m, const char *bucket, const char *filter,
                   const cn_mfind_opts_t *opts, cn_mfind_cb cb, void *arg);

/* Work for the caller's thread while a statement runs on the server: fn is
 * called (again and again, while no answer has arrived) until it returns
 * false (it has nothing to do). It must not use m, and each call should be
 * short: the answer waits for it. NULL fn: none (the default). */
typedef bool (cn_moray_idle_fn) (void *arg);
void cn_moray_set_idle (cn_moray_t *m, cn_moray_idle_fn *fn, void *arg);

/* Transactions, for read-modify-write batches (the state writer's group commit).
 * cn_moray_rollback leaves the last error readable (cn_moray_errmsg). */
int cn_moray_begin (cn_moray_t *m);
int cn_moray_commit (cn_moray_t *m);
void cn_moray_rollback (cn_moray_t *m);
/* Read keys[0..n-1] with FOR UPDATE inside a transaction; out[i].key NULL when absent. */
int cn_moray_get_many_locked (cn_moray_t *m, const char *bucket, const char *const *keys,
                              size_t n, cn_mobj_t *out);
/* The same, for a caller that keeps the values it wrote: where etags[i] (etags
 * may be NULL, an entry NULL or "") equals the stored etag, out[i].value is
 * NULL (value_len 0) and the rest of out[i] is filled: the caller holds that
 * version already, and the value is neither read nor sent by PostgreSQL. */
int cn_moray_lock_many (cn_moray_t *m, const char *bucket, const char *const *keys,
                        const char *const *etags, size_t n, cn_mobj_t *out);

/* Batch: several puts/deletes in one transaction; all or nothing. */
typedef enum { CN_MOP_PUT, CN_MOP_DEL } cn_mop_kind_t;
typedef struct {
    cn_mop_kind_t kind;
    const char *bucket;
    const char *key;
    const char *value;        /* PUT only */
    const char *etag;         /* condition, as above */
    char out_etag[9];         /* filled on success */
    int64_t out_id;           /* filled on success */
} cn_mop_t;
/* Runs inside the caller's transaction if one is open, else in its own.
 * On CN_MORAY_CONFLICT, *failed (may be NULL) is the index of the op. */
int cn_moray_batch (cn_moray_t *m, cn_mop_t *ops, size_t n, size_t *failed);
/* The same as the last work of the caller's open transaction, which it
 * ends: committed when every op was written, else rolled back (the
 * transaction is over either way; cn_moray_rollback after it is a no-op).
 * Two round trips fewer than cn_moray_batch + cn_moray_commit (no
 * savepoint). CN_MORAY_EINVAL without an open transaction. */
int cn_moray_batch_final (cn_moray_t *m, cn_mop_t *ops, size_t n, size_t *failed);
/* The same, but each op's condition is its own: an op whose etag condition
 * fails (or a delete of a missing object) is skipped and the others are
 * still written. applied[i] (n entries) tells which ops were written (their
 * out_etag/out_id set). CN_MORAY_OK even when some were skipped; any other
 * code means nothing was written (applied all false). The fencing writes of
 * the sessions actor use it: one statement for many rows, each guarded. */
int cn_moray_batch_partial (cn_moray_t *m, cn_mop_t *ops, size_t n, bool *applied);

#endif
