/*
 * cn_moray: a Moray-layout object store in PostgreSQL.
 *
 * Theory of operation
 * -------------------
 * Layout (what Moray itself creates, see docs/store.md):
 *   buckets_config(name text PK, index text, pre text, post text,
 *                  options text, mtime timestamp)
 *   <bucket>_serial: the bucket's sequence
 *   <bucket>(_id bigint DEFAULT nextval('<bucket>_serial'), _txn_snap integer,
 *            _key text PK, _value text, _etag char(8), _mtime bigint,
 *            _vnode bigint, <one column per indexed field>)
 *   indexes <bucket>_<column>_idx (btree, WHERE column IS NOT NULL).
 * Table and column names are the lower-cased bucket and field names (what
 * PostgreSQL folds Moray's unquoted identifiers to); we always quote them.
 *
 * Versions: _id is drawn from the bucket's sequence on insert AND on every
 * update (deviation from Moray, which keeps _id on update). The draw happens
 * while the row lock is held, so per key it only grows, across processes.
 * A delete reports a fresh draw too: a tombstone version above every write.
 *
 * I/O: one libpq connection, non-blocking, every wait bounded by poll(2)
 * with a deadline (timeout_ms + 1 s; the server's statement_timeout is
 * timeout_ms, so the server normally gives up first). A connection error
 * drops the connection (CN_MORAY_EIO); the next call reconnects. If it died
 * inside the caller's transaction, every call answers EIO until
 * cn_moray_rollback (or cn_moray_begin) acknowledges the loss, so a caller
 * can't go on writing outside the transaction it believes is open.
 *
 * Values only ever travel as parameters. Identifiers (bucket and index names)
 * are checked against ^[a-zA-Z_][a-zA-Z0-9_]{0,62}$ before they get near SQL.
 *
 * Batches of puts are sent as one statement per bucket and kind of
 * condition, with every column as an array parameter (binary text[]) fed to
 * unnest(); keys in a batch must then be distinct, else the batch runs one
 * statement per op.
 */
#include "cn_moray.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "cn_filter.h"
#include "cn_json.h"
#include "cn_log.h"
#include "cn_util.h"

#define S_LOG               "moray"
#define S_DEFAULT_TIMEOUT   5000
#define S_GRACE_MS          1000
#define S_CACHE_TTL_US      (60LL * 1000000)
#define S_BACKFILL_CHUNK    500
#define S_OID_TEXT          25
#define S_OID_TEXTARRAY     1009
/* pg_advisory_xact_lock key serialising our DDL ("cnmoray\0") */
#define S_DDL_LOCK_KEY      "7165064480393966592"
/* fixed parameter layout of the put statements; index columns follow */
#define S_P_KEY   0
#define S_P_VAL   1
#define S_P_ETAG  2
#define S_P_MTIME 3
#define S_P_VNODE 4
#define S_P_COND  5
#define S_P_COLS  6

/* One cached bucket definition with its statements. */
typedef struct {
    char *name;                 /* as the caller spells it */
    char lname[64];             /* lower case: table name */
    char ident[70];             /* "lname" */
    cn_mindex_t *index;         /* names owned */
    size_t nindex;
    char (*colid)[70];          /* quoted lower-case column per index */
    int64_t loaded_us;
    bool stale;
    char *sql_get, *sql_put_blind, *sql_put_new, *sql_put_etag,
         *sql_del, *sql_del_etag, *sql_exists, *sql_exists_many,
         *sql_b_blind, *sql_b_new, *sql_b_etag, *sql_b_del, *sql_lock_many;
} s_bucket_t;

struct cn_moray {
    char *conninfo;
    int timeout_ms;
    PGconn *conn;
    bool in_txn;                /* a transaction is open on the connection */
    bool txn_lost;              /* the caller's transaction died with the connection */
    int connect_failures;
    bool busy;                  /* a find is delivering rows */
    bool begin_pending;         /* cn_moray_begin: BEGIN goes with the next statement */
    s_bucket_t **buckets;
    size_t nbuckets, cbuckets;
    char sqlstate[6];
    char errmsg[512];
    cn_moray_idle_fn *idle;     /* work to do while PostgreSQL works */
    void *idle_arg;
};

/* A put, ready to bind: index columns extracted, etag computed. */
typedef struct {
    char etag[9];
    bool has_vnode;
    char vnode[24];
    char **cols;                /* nindex entries, each owned or NULL */
    size_t ncols;
} s_prep_t;

/* --- small helpers ---------------------------------------------------- */

typedef struct {
    char *d;
    size_t len, cap;
    bool oom;
} s_sb_t;

static void
s_sb_add (s_sb_t *b, const void *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc (b->d, cap);
        if (!d) {
            b->oom = true;
            return;
        }
        b->d = d;
        b->cap = cap;
    }
    memcpy (b->d + b->len, s, n);
    b->len += n;
    b->d[b->len] = 0;
}

static void __attribute__ ((format (printf, 2, 3)))
s_sb_printf (s_sb_t *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start (ap, fmt);
    int n = vsnprintf (tmp, sizeof tmp, fmt, ap);
    va_end (ap);
    if (n < 0)
        b->oom = true;
    else if ((size_t) n < sizeof tmp)
        s_sb_add (b, tmp, (size_t) n);
    else {
        char *big = malloc ((size_t) n + 1);
        if (!big) {
            b->oom = true;
            return;
        }
        va_start (ap, fmt);
        vsnprintf (big, (size_t) n + 1, fmt, ap);
        va_end (ap);
        s_sb_add (b, big, (size_t) n);
        free (big);
    }
}

/* Finish a builder: the string, or NULL on OOM. */
static char *
s_sb_take (s_sb_t *b)
{
    if (b->oom) {
        free (b->d);
        return NULL;
    }
    return b->d ? b->d : strdup ("");
}

static void __attribute__ ((format (printf, 2, 3)))
s_err (cn_moray_t *m, const char *fmt, ...)
{
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (m->errmsg, sizeof m->errmsg, fmt, ap);
    va_end (ap);
    size_t n = strlen (m->errmsg);
    while (n && (m->errmsg[n - 1] == '\n' || m->errmsg[n - 1] == ' '))
        m->errmsg[--n] = 0;
}

static void
s_clear (cn_moray_t *m)
{
    m->errmsg[0] = 0;
    m->sqlstate[0] = 0;
}

/* Every entry point: the handle is not re-entrant (a find callback must not
 * use the handle that calls it). */
#define S_ENTER(m) do { \
    if (!(m)) return CN_MORAY_EINVAL; \
    if ((m)->busy) { \
        snprintf ((m)->errmsg, sizeof (m)->errmsg, "handle busy (called from a find callback)"); \
        return CN_MORAY_EINVAL; } \
    s_clear (m); } while (0)

/* ^[a-zA-Z_][a-zA-Z0-9_]{0,62}$ */
static bool
s_name_ok (const char *s)
{
    if (!s || !(isalpha ((unsigned char) s[0]) || s[0] == '_'))
        return false;
    size_t n = 0;
    for (; s[n]; n++)
        if (!(isalnum ((unsigned char) s[n]) || s[n] == '_') || n >= 63)
            return false;
    return true;
}

static void
s_lower (char *out, const char *s, size_t cap)
{
    size_t i = 0;
    for (; s[i] && i + 1 < cap; i++)
        out[i] = (char) tolower ((unsigned char) s[i]);
    out[i] = 0;
}

/* "lower(name)" for a name that passed s_name_ok */
static void
s_quote (char out[70], const char *name)
{
    char l[64];
    s_lower (l, name, sizeof l);
    snprintf (out, 70, "\"%s\"", l);
}

/* Moray's index name <table>_<column>_idx; when that would exceed
 * PostgreSQL's 63 bytes (and be truncated, possibly onto another index's
 * name), a prefix plus a CRC of the full name instead. Quoted. */
static void
s_index_name (char out[80], const char *table, const char *col)
{
    char full[160];
    snprintf (full, sizeof full, "%s_%s_idx", table, col);
    if (strlen (full) <= 63)
        snprintf (out, 80, "\"%.63s\"", full);
    else
        snprintf (out, 80, "\"%.50s_%08x\"", full, cn_crc32 (full, strlen (full)));
}

static bool
s_utf8_ok (const unsigned char *s)
{
    while (*s) {
        unsigned c = *s;
        size_t k;
        unsigned min;
        if (c < 0x80) {
            s++;
            continue;
        }
        else if ((c & 0xe0) == 0xc0) { k = 1; min = 0x80; c &= 0x1f; }
        else if ((c & 0xf0) == 0xe0) { k = 2; min = 0x800; c &= 0x0f; }
        else if ((c & 0xf8) == 0xf0) { k = 3; min = 0x10000; c &= 0x07; }
        else
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[j] & 0xc0) != 0x80)
                return false;
            c = (c << 6) | (s[j] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return false;
        s += k + 1;
    }
    return true;
}

static bool
s_key_ok (cn_moray_t *m, const char *key)
{
    if (!key || !*key) {
        s_err (m, "key must be a non-empty string");
        return false;
    }
    if (!s_utf8_ok ((const unsigned char *) key)) {
        s_err (m, "key is not valid UTF-8");
        return false;
    }
    return true;
}

static const char *
s_type_name (cn_midx_type_t t)
{
    switch (t) {
    case CN_MIDX_NUMBER:  return "number";
    case CN_MIDX_BOOLEAN: return "boolean";
    default:              return "string";
    }
}

static const char *
s_type_pg (cn_midx_type_t t)
{
    switch (t) {
    case CN_MIDX_NUMBER:  return "NUMERIC";
    case CN_MIDX_BOOLEAN: return "BOOLEAN";
    default:              return "TEXT";
    }
}

static const char *
s_type_cast (cn_midx_type_t t)
{
    switch (t) {
    case CN_MIDX_NUMBER:  return "::numeric";
    case CN_MIDX_BOOLEAN: return "::boolean";
    default:              return "";
    }
}

void
cn_mobj_fini (cn_mobj_t *o)
{
    if (!o)
        return;
    free (o->key);
    free (o->value);
    memset (o, 0, sizeof *o);
}

/* --- connection --------------------------------------------------------- */

static void
s_notice (void *arg, const char *message)
{
    (void) arg;
    CN_DEBUG (S_LOG, "postgres notice", "{s:s}", "notice", message);
}

/* Drop the connection. A transaction open on it is gone: if it was the
 * caller's, remember that until they acknowledge it. */
static void
s_reset (cn_moray_t *m)
{
    if (m->conn) {
        PQfinish (m->conn);
        m->conn = NULL;
    }
    if (m->in_txn) {
        m->in_txn = false;
        m->txn_lost = true;
    }
    m->begin_pending = false;
}

/* Wait until fd is ready for events or deadline (monotonic us) passes.
 * 0 ready, 1 timeout, -1 error. */
static int
s_wait (PGconn *conn, short events, int64_t deadline)
{
    int fd = PQsocket (conn);
    if (fd < 0)
        return -1;
    for (;;) {
        int64_t left = deadline - cn_mono_us ();
        if (left <= 0)
            return 1;
        struct pollfd p = { .fd = fd, .events = events };
        int r = poll (&p, 1, (int) ((left + 999) / 1000));
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

static int s_exec (cn_moray_t *m, const char *sql, int n, const Oid *types,
                   const char *const *vals, const int *lens, const int *fmts,
                   PGresult **out);

static int
s_connect (cn_moray_t *m)
{
    char ct[16], idle[16], tut[16];
    int secs = (m->timeout_ms + 999) / 1000;
    snprintf (ct, sizeof ct, "%d", secs < 1 ? 1 : secs);
    snprintf (idle, sizeof idle, "%d", secs < 1 ? 1 : secs);
    snprintf (tut, sizeof tut, "%d", m->timeout_ms);
    /* later entries override what the conninfo string says */
    const char *kw[] = {
        "dbname", "connect_timeout", "keepalives", "keepalives_idle",
        "keepalives_interval", "keepalives_count", "tcp_user_timeout",
        "client_encoding", "fallback_application_name", NULL
    };
    const char *val[] = {
        m->conninfo, ct, "1", idle, "1", "3", tut, "UTF8", "cnapi", NULL
    };
    int64_t deadline = cn_mono_us () + (int64_t) m->timeout_ms * 1000;
    PGconn *c = PQconnectStartParams (kw, val, 1);
    if (!c) {
        s_err (m, "out of memory");
        return CN_MORAY_EIO;
    }
    PostgresPollingStatusType st = PQstatus (c) == CONNECTION_BAD
        ? PGRES_POLLING_FAILED : PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        int w = s_wait (c, st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline);
        if (w != 0) {
            s_err (m, "connect: %s", w > 0 ? "timed out" : "poll failed");
            st = PGRES_POLLING_FAILED;
            break;
        }
        st = PQconnectPoll (c);
    }
    if (st == PGRES_POLLING_FAILED) {
        if (!m->errmsg[0])
            s_err (m, "connect: %s", PQerrorMessage (c));
        PQfinish (c);
        if (m->connect_failures++ == 0)
            CN_WARN (S_LOG, "postgres connect failed", "{s:s}", "error", m->errmsg);
        else
            CN_DEBUG (S_LOG, "postgres connect failed", "{s:s,s:i}", "error", m->errmsg,
                      "attempt", m->connect_failures);
        return CN_MORAY_EIO;
    }
    PQsetNoticeProcessor (c, s_notice, m);
    if (PQsetnonblocking (c, 1) != 0) {
        s_err (m, "connect: cannot set non-blocking mode");
        PQfinish (c);
        return CN_MORAY_EIO;
    }
    m->conn = c;
    char to[16];
    snprintf (to, sizeof to, "%d", m->timeout_ms);
    const char *p[] = { to };
    PGresult *r = NULL;
    int rc = s_exec (m, "SELECT set_config('statement_timeout', $1, false)",
                     1, NULL, p, NULL, NULL, &r);
    PQclear (r);
    if (rc != CN_MORAY_OK) {
        s_reset (m);
        return CN_MORAY_EIO;
    }
    if (m->connect_failures)
        CN_INFO (S_LOG, "postgres connected", "{s:i}", "after_failures",
                 m->connect_failures);
    m->connect_failures = 0;
    return CN_MORAY_OK;
}

/* Ready to run a statement: connected, and no lost transaction pending. */
static int
s_ready (cn_moray_t *m)
{
    if (m->txn_lost) {
        s_err (m, "the transaction was lost with the connection; "
               "call cn_moray_rollback");
        return CN_MORAY_EIO;
    }
    if (m->conn && PQstatus (m->conn) == CONNECTION_OK)
        return CN_MORAY_OK;
    if (m->conn) {
        bool was = m->in_txn;
        s_reset (m);
        if (was) {
            s_err (m, "connection lost inside a transaction");
            return CN_MORAY_EIO;
        }
    }
    return s_connect (m);
}

/* Classify a failed result; resets the connection when it is broken. */
static int
s_fail_result (cn_moray_t *m, PGresult *r)
{
    const char *st = r ? PQresultErrorField (r, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = r ? PQresultErrorMessage (r) : NULL;
    if (!msg || !*msg)
        msg = m->conn ? PQerrorMessage (m->conn) : "no connection";
    snprintf (m->sqlstate, sizeof m->sqlstate, "%s", st ? st : "");
    s_err (m, "%s", msg);
    bool broken = !m->conn || PQstatus (m->conn) != CONNECTION_OK || !st
                  || strncmp (st, "08", 2) == 0 || strncmp (st, "57P0", 4) == 0;
    if (broken) {
        CN_WARN (S_LOG, "postgres connection lost", "{s:s,s:s}", "error", m->errmsg,
                 "sqlstate", m->sqlstate);
        s_reset (m);
        return CN_MORAY_EIO;
    }
    /* transient: statement timeout, lock timeout, serialization, deadlock,
     * resources. The connection stays; the transaction (if any) is aborted. */
    if (strcmp (st, "57014") == 0 || strcmp (st, "55P03") == 0
        || strcmp (st, "40001") == 0 || strcmp (st, "40P01") == 0
        || strncmp (st, "53", 2) == 0) {
        CN_WARN (S_LOG, "query failed (transient)", "{s:s,s:s}", "error", m->errmsg,
                 "sqlstate", st);
        return CN_MORAY_EIO;
    }
    /* a table or column we believe in is gone: reload definitions */
    if (strcmp (st, "42P01") == 0 || strcmp (st, "42703") == 0)
        for (size_t i = 0; i < m->nbuckets; i++)
            m->buckets[i]->stale = true;
    if (strcmp (st, "23505") == 0) {
        const char *d = PQresultErrorField (r, PG_DIAG_MESSAGE_DETAIL);
        s_err (m, "unique index violated%s%s", d ? ": " : "", d ? d : "");
        return CN_MORAY_EINVAL;
    }
    CN_WARN (S_LOG, "query failed", "{s:s,s:s}", "error", m->errmsg, "sqlstate", st);
    return CN_MORAY_ESQL;
}

static int s_cmd (cn_moray_t *m, const char *sql);
static int s_flush (cn_moray_t *m, int64_t deadline);
static int s_collect (cn_moray_t *m, int64_t deadline, PGresult **out);
static int s_exec_begun (cn_moray_t *m, const char *sql, int n, const Oid *types,
                         const char *const *vals, const int *lens, const int *fmts,
                         PGresult **out);

/* Send one statement and flush it, bounded. */
static int
s_send (cn_moray_t *m, const char *sql, int n, const Oid *types,
        const char *const *vals, const int *lens, const int *fmts, bool single_row,
        int64_t deadline)
{
    if (m->begin_pending) {
        /* a statement s_exec cannot pipeline with it (s_exec_begun) */
        m->begin_pending = false;
        int rc = s_cmd (m, "BEGIN");
        if (rc != CN_MORAY_OK)
            return rc;
    }
    /* without parameters: the simple protocol, which allows several
     * statements in one string (our DDL) */
    int sent = n == 0 && !single_row ? PQsendQuery (m->conn, sql)
             : PQsendQueryParams (m->conn, sql, n, types, vals, lens, fmts, 0);
    if (!sent)
        return s_fail_result (m, NULL);
    if (single_row && !PQsetSingleRowMode (m->conn))
        return s_fail_result (m, NULL);
    return s_flush (m, deadline);
}

/* Everything sent so far out to the server, bounded. */
static int
s_flush (cn_moray_t *m, int64_t deadline)
{
    for (;;) {
        int f = PQflush (m->conn);
        if (f == 0)
            return CN_MORAY_OK;
        if (f < 0)
            return s_fail_result (m, NULL);
        int w = s_wait (m->conn, POLLOUT | POLLIN, deadline);
        if (w != 0) {
            s_err (m, "%s", w > 0 ? "timed out sending to postgres" : "poll failed");
            CN_WARN (S_LOG, "postgres connection lost", "{s:s}", "error", m->errmsg);
            s_reset (m);
            return CN_MORAY_EIO;
        }
        if (!PQconsumeInput (m->conn))
            return s_fail_result (m, NULL);
    }
}

/* The next result of the statement in flight, bounded; *out NULL at the end. */
static int
s_next (cn_moray_t *m, int64_t deadline, PGresult **out)
{
    *out = NULL;
    while (PQisBusy (m->conn)) {
        /* the caller's own work first, while nothing has arrived (bounded:
         * the idle function says when it has none left) */
        if (m->idle) {
            struct pollfd p = { .fd = PQsocket (m->conn), .events = POLLIN };
            while (p.fd >= 0 && poll (&p, 1, 0) == 0 && cn_mono_us () < deadline
                   && m->idle (m->idle_arg))
                ;
        }
        int w = s_wait (m->conn, POLLIN, deadline);
        if (w != 0) {
            s_err (m, "%s", w > 0 ? "timed out waiting for postgres" : "poll failed");
            CN_WARN (S_LOG, "postgres connection lost", "{s:s}", "error", m->errmsg);
            s_reset (m);
            return CN_MORAY_EIO;
        }
        if (!PQconsumeInput (m->conn))
            return s_fail_result (m, NULL);
    }
    *out = PQgetResult (m->conn);
    return CN_MORAY_OK;
}

static int64_t
s_deadline (cn_moray_t *m)
{
    return cn_mono_us () + ((int64_t) m->timeout_ms + S_GRACE_MS) * 1000;
}

/* Run one statement (the connection must be ready). On success *out holds
 * a TUPLES_OK or COMMAND_OK result for the caller to PQclear. */
static int
s_exec (cn_moray_t *m, const char *sql, int n, const Oid *types,
        const char *const *vals, const int *lens, const int *fmts, PGresult **out)
{
    *out = NULL;
    if (!m->conn) {
        s_err (m, "not connected");
        return CN_MORAY_EIO;
    }
    if (m->begin_pending && n > 0)
        return s_exec_begun (m, sql, n, types, vals, lens, fmts, out);
    int64_t deadline = s_deadline (m);
    int rc = s_send (m, sql, n, types, vals, lens, fmts, false, deadline);
    if (rc != CN_MORAY_OK)
        return rc;
    return s_collect (m, deadline, out);
}

/* The results of one statement up to its end (NULL): its last result, or
 * its first error, into *out; a cn_moray_rc. */
static int
s_collect (cn_moray_t *m, int64_t deadline, PGresult **out)
{
    int rc;
    PGresult *keep = NULL;
    for (;;) {
        PGresult *r;
        rc = s_next (m, deadline, &r);
        if (rc != CN_MORAY_OK) {
            PQclear (keep);
            return rc;
        }
        if (!r)
            break;
        ExecStatusType s = PQresultStatus (r);
        if (keep && PQresultStatus (keep) != PGRES_TUPLES_OK
            && PQresultStatus (keep) != PGRES_COMMAND_OK) {
            PQclear (r);            /* keep the first error */
            continue;
        }
        PQclear (keep);
        keep = r;
        if (s == PGRES_COPY_IN || s == PGRES_COPY_OUT || s == PGRES_COPY_BOTH) {
            s_err (m, "unexpected COPY state");
            PQclear (keep);
            s_reset (m);
            return CN_MORAY_EIO;
        }
    }
    if (!keep) {
        s_err (m, "no result");
        return s_fail_result (m, NULL);
    }
    ExecStatusType s = PQresultStatus (keep);
    if (s != PGRES_TUPLES_OK && s != PGRES_COMMAND_OK) {
        rc = s_fail_result (m, keep);
        PQclear (keep);
        return rc;
    }
    *out = keep;
    return CN_MORAY_OK;
}

/* The first statement of a transaction (cn_moray_begin deferred its BEGIN):
 * BEGIN and the statement go in one pipeline (one round trip instead of
 * two), then a Sync. Results: BEGIN's, its end, the statement's up to their
 * end, the Sync's. */
static int
s_exec_begun (cn_moray_t *m, const char *sql, int n, const Oid *types,
              const char *const *vals, const int *lens, const int *fmts, PGresult **out)
{
    m->begin_pending = false;
    int64_t deadline = s_deadline (m);
    if (!PQenterPipelineMode (m->conn)) {
        int rc = s_cmd (m, "BEGIN");
        return rc != CN_MORAY_OK ? rc : s_exec (m, sql, n, types, vals, lens, fmts, out);
    }
    if (!PQsendQueryParams (m->conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0)
        || !PQsendQueryParams (m->conn, sql, n, types, vals, lens, fmts, 0)
        || !PQpipelineSync (m->conn)) {
        int rc = s_fail_result (m, NULL);
        if (m->conn)
            s_reset (m);    /* a half-sent pipeline: start afresh */
        return rc != CN_MORAY_OK ? rc : CN_MORAY_EIO;
    }
    int rc = s_flush (m, deadline);
    if (rc != CN_MORAY_OK)
        return rc;
    PGresult *begin = NULL, *end = NULL;
    rc = s_collect (m, deadline, &begin);
    PQclear (begin);
    if (rc == CN_MORAY_OK)
        rc = s_collect (m, deadline, out);
    else {
        /* the statement was skipped (PIPELINE_ABORTED): read past it */
        PGresult *skip = NULL;
        if (m->conn && s_collect (m, deadline, &skip) == CN_MORAY_OK)
            PQclear (skip);
    }
    if (!m->conn)
        return rc != CN_MORAY_OK ? rc : CN_MORAY_EIO;
    /* the Sync */
    int rs = s_next (m, deadline, &end);
    if (rs != CN_MORAY_OK) {
        PQclear (*out);
        *out = NULL;
        return rs;
    }
    bool synced = end && PQresultStatus (end) == PGRES_PIPELINE_SYNC;
    PQclear (end);
    if (!synced || !PQexitPipelineMode (m->conn)) {
        s_err (m, "pipeline did not end with its sync");
        PQclear (*out);
        *out = NULL;
        s_reset (m);
        return CN_MORAY_EIO;
    }
    return rc;
}

/* A statement without parameters whose result we don't need. */
static int
s_cmd (cn_moray_t *m, const char *sql)
{
    PGresult *r;
    int rc = s_exec (m, sql, 0, NULL, NULL, NULL, NULL, &r);
    PQclear (r);
    return rc;
}

/* --- units of work: our own transaction, or a savepoint in the caller's -- */

static int
s_unit_begin (cn_moray_t *m, bool *own)
{
    *own = !m->in_txn;
    if (!*own)
        return s_cmd (m, "SAVEPOINT cn_moray_unit");
    int rc = s_cmd (m, "BEGIN");
    if (rc == CN_MORAY_OK)
        m->in_txn = true;
    return rc;
}

/* Commit (rc OK) or undo the unit; returns the final rc. */
static int
s_unit_end (cn_moray_t *m, bool own, int rc)
{
    if (own) {
        if (m->conn && m->in_txn) {
            if (rc == CN_MORAY_OK) {
                PGresult *r;
                rc = s_exec (m, "COMMIT", 0, NULL, NULL, NULL, NULL, &r);
                if (rc == CN_MORAY_OK && strcmp (PQcmdStatus (r), "COMMIT") != 0) {
                    s_err (m, "transaction rolled back by the server");
                    rc = CN_MORAY_ESQL;
                }
                PQclear (r);
            }
            else {
                char keep[sizeof m->errmsg];
                memcpy (keep, m->errmsg, sizeof keep);
                (void) s_cmd (m, "ROLLBACK");
                memcpy (m->errmsg, keep, sizeof keep);
            }
        }
        m->in_txn = false;
        m->txn_lost = false;       /* it was ours, not the caller's */
        return rc;
    }
    if (!m->conn)
        return rc == CN_MORAY_OK ? CN_MORAY_EIO : rc;
    if (rc == CN_MORAY_OK)
        return s_cmd (m, "RELEASE SAVEPOINT cn_moray_unit");
    char keep[sizeof m->errmsg];
    memcpy (keep, m->errmsg, sizeof keep);
    if (s_cmd (m, "ROLLBACK TO SAVEPOINT cn_moray_unit") == CN_MORAY_OK)
        (void) s_cmd (m, "RELEASE SAVEPOINT cn_moray_unit");
    memcpy (m->errmsg, keep, sizeof keep);
    return rc;
}

/* --- bucket definitions ------------------------------------------------- */

static void
s_bucket_clear (s_bucket_t *b)
{
    for (size_t i = 0; i < b->nindex; i++)
        free ((char *) b->index[i].name);
    free (b->index);
    free (b->colid);
    char **sqls[] = {
        &b->sql_get, &b->sql_put_blind, &b->sql_put_new, &b->sql_put_etag,
        &b->sql_del, &b->sql_del_etag, &b->sql_exists, &b->sql_exists_many,
        &b->sql_b_blind, &b->sql_b_new, &b->sql_b_etag, &b->sql_b_del,
        &b->sql_lock_many
    };
    for (size_t i = 0; i < sizeof sqls / sizeof sqls[0]; i++) {
        free (*sqls[i]);
        *sqls[i] = NULL;
    }
    b->index = NULL;
    b->colid = NULL;
    b->nindex = 0;
}

static void
s_bucket_free (s_bucket_t **p)
{
    if (!*p)
        return;
    s_bucket_clear (*p);
    free ((*p)->name);
    free (*p);
    *p = NULL;
}

/* Build the statements of a bucket whose name and index are set. */
static bool
s_bucket_build (s_bucket_t *b)
{
    const char *t = b->ident;
    const char *cols = "_key, _value, _etag, _id, _mtime";
    char seq[100];
    snprintf (seq, sizeof seq, "nextval('\"%s_serial\"')", b->lname);
    s_sb_t s = { 0 };

    s_sb_printf (&s, "SELECT %s FROM %s WHERE _key = $1", cols, t);
    b->sql_get = s_sb_take (&s);
    s = (s_sb_t) { 0 };
    /* u.n: the position in the caller's keys; the value is left out where
     * the caller holds that version already (etag given and equal) */
    s_sb_printf (&s, "SELECT t._key, CASE WHEN t._etag = u.e THEN NULL ELSE t._value END, "
                 "t._etag, t._id, t._mtime, u.n FROM unnest ($1::text[], $2::text[]) "
                 "WITH ORDINALITY AS u (k, e, n) JOIN %s AS t ON t._key = u.k "
                 "ORDER BY t._key FOR UPDATE OF t", t);
    b->sql_lock_many = s_sb_take (&s);
    s = (s_sb_t) { 0 };
    s_sb_printf (&s, "SELECT 1 FROM %s WHERE _key = $1", t);
    b->sql_exists = s_sb_take (&s);
    s = (s_sb_t) { 0 };
    s_sb_printf (&s, "SELECT _key FROM %s WHERE _key = ANY ($1::text[])", t);
    b->sql_exists_many = s_sb_take (&s);
    s = (s_sb_t) { 0 };
    s_sb_printf (&s, "DELETE FROM %s WHERE _key = $1 RETURNING %s", t, seq);
    b->sql_del = s_sb_take (&s);
    s = (s_sb_t) { 0 };
    s_sb_printf (&s, "DELETE FROM %s WHERE _key = $1 AND _etag = $2 RETURNING %s", t, seq);
    b->sql_del_etag = s_sb_take (&s);
    s = (s_sb_t) { 0 };
    s_sb_printf (&s, "DELETE FROM %s AS t USING unnest ($1::text[], $2::text[]) "
                 "AS u (k, ce) WHERE t._key = u.k AND (u.ce IS NULL OR t._etag = u.ce) "
                 "RETURNING t._key, %s", t, seq);
    b->sql_b_del = s_sb_take (&s);

    /* column lists */
    s_sb_t ins = { 0 }, vals = { 0 }, upd = { 0 }, sel = { 0 }, uns = { 0 },
           als = { 0 }, set = { 0 }, uset = { 0 };
    s_sb_printf (&ins, "_key, _value, _etag, _mtime, _vnode");
    s_sb_printf (&vals, "$1, $2, $3, $4::bigint, $5::bigint");
    s_sb_printf (&upd, "_id = %s, _value = EXCLUDED._value, _etag = EXCLUDED._etag, "
                 "_mtime = EXCLUDED._mtime, _vnode = EXCLUDED._vnode", seq);
    s_sb_printf (&set, "_id = %s, _value = $2, _etag = $3, _mtime = $4::bigint, "
                 "_vnode = $5::bigint", seq);
    s_sb_printf (&sel, "u.k, u.v, u.e, $4::bigint, u.vn::bigint");
    s_sb_printf (&uns, "$1::text[], $2::text[], $3::text[], $5::text[], $6::text[]");
    s_sb_printf (&als, "k, v, e, vn, ce");
    s_sb_printf (&uset, "_id = %s, _value = u.v, _etag = u.e, _mtime = $4::bigint, "
                 "_vnode = u.vn::bigint", seq);
    for (size_t i = 0; i < b->nindex; i++) {
        const char *c = b->colid[i];
        const char *cast = s_type_cast (b->index[i].type);
        int pn = S_P_COLS + (int) i + 1;
        s_sb_printf (&ins, ", %s", c);
        s_sb_printf (&vals, ", $%d%s", pn, cast);
        s_sb_printf (&upd, ", %s = EXCLUDED.%s", c, c);
        s_sb_printf (&set, ", %s = $%d%s", c, pn, cast);
        s_sb_printf (&sel, ", u.c%zu%s", i, cast);
        s_sb_printf (&uns, ", $%d::text[]", pn);
        s_sb_printf (&als, ", c%zu", i);
        s_sb_printf (&uset, ", %s = u.c%zu%s", c, i, cast);
    }
    bool ok = !(ins.oom || vals.oom || upd.oom || set.oom || sel.oom || uns.oom
                || als.oom || uset.oom);
    if (ok) {
        s = (s_sb_t) { 0 };
        s_sb_printf (&s, "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (_key) DO UPDATE "
                     "SET %s RETURNING _id", t, ins.d, vals.d, upd.d);
        b->sql_put_blind = s_sb_take (&s);
        s = (s_sb_t) { 0 };
        s_sb_printf (&s, "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (_key) DO NOTHING "
                     "RETURNING _id", t, ins.d, vals.d);
        b->sql_put_new = s_sb_take (&s);
        s = (s_sb_t) { 0 };
        s_sb_printf (&s, "UPDATE %s SET %s WHERE _key = $1 AND _etag = $6 RETURNING _id",
                     t, set.d);
        b->sql_put_etag = s_sb_take (&s);
        /* batches: ORDER BY takes the row locks in key order (fewer deadlocks
         * between instances writing overlapping batches) */
        s = (s_sb_t) { 0 };
        s_sb_printf (&s, "INSERT INTO %s (%s) SELECT %s FROM unnest (%s) AS u (%s) "
                     "ORDER BY u.k ON CONFLICT (_key) DO UPDATE SET %s "
                     "RETURNING _key, _id", t, ins.d, sel.d, uns.d, als.d, upd.d);
        b->sql_b_blind = s_sb_take (&s);
        s = (s_sb_t) { 0 };
        s_sb_printf (&s, "INSERT INTO %s (%s) SELECT %s FROM unnest (%s) AS u (%s) "
                     "ORDER BY u.k ON CONFLICT (_key) DO NOTHING RETURNING _key, _id",
                     t, ins.d, sel.d, uns.d, als.d);
        b->sql_b_new = s_sb_take (&s);
        s = (s_sb_t) { 0 };
        s_sb_printf (&s, "UPDATE %s AS t SET %s FROM unnest (%s) AS u (%s) "
                     "WHERE t._key = u.k AND t._etag = u.ce RETURNING t._key, t._id",
                     t, uset.d, uns.d, als.d);
        b->sql_b_etag = s_sb_take (&s);
    }
    free (ins.d); free (vals.d); free (upd.d); free (set.d);
    free (sel.d); free (uns.d); free (als.d); free (uset.d);
    return ok && b->sql_get && b->sql_lock_many && b->sql_exists && b->sql_exists_many
           && b->sql_del && b->sql_del_etag && b->sql_b_del && b->sql_put_blind
           && b->sql_put_new && b->sql_put_etag && b->sql_b_blind && b->sql_b_new
           && b->sql_b_etag;
}

/* (Re)fill b from an index array; b->name is set. */
static bool
s_bucket_fill (s_bucket_t *b, const cn_mindex_t *index, size_t n)
{
    s_bucket_clear (b);
    s_lower (b->lname, b->name, sizeof b->lname);
    snprintf (b->ident, sizeof b->ident, "\"%s\"", b->lname);
    b->index = calloc (n ? n : 1, sizeof *b->index);
    b->colid = calloc (n ? n : 1, sizeof *b->colid);
    if (!b->index || !b->colid)
        return false;
    for (size_t i = 0; i < n; i++) {
        b->index[i].name = strdup (index[i].name);
        if (!b->index[i].name)
            return false;
        b->nindex = i + 1;
        b->index[i].type = index[i].type;
        b->index[i].unique = index[i].unique;
        s_quote (b->colid[i], index[i].name);
    }
    b->loaded_us = cn_mono_us ();
    b->stale = false;
    return s_bucket_build (b);
}

static bool s_reserved_index (const char *name);

/* Parse buckets_config.index JSON into an array (fields we can't serve are
 * skipped: unknown types such as Moray's "ip" or "[string]"). */
static int
s_parse_index (cn_moray_t *m, const char *bucket, const char *text,
               cn_mindex_t **out, size_t *nout)
{
    json_error_t jerr;
    json_t *o = json_loads (text ? text : "{}", 0, &jerr);
    *out = NULL;
    *nout = 0;
    if (!json_is_object (o)) {
        json_decref (o);
        s_err (m, "bucket %s: index definition is not a JSON object", bucket);
        return CN_MORAY_ESQL;
    }
    cn_mindex_t *idx = calloc (json_object_size (o) + 1, sizeof *idx);
    if (!idx) {
        json_decref (o);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    size_t n = 0;
    const char *k;
    json_t *v;
    json_object_foreach (o, k, v) {
        const char *type = json_string_value (json_object_get (v, "type"));
        cn_midx_type_t t;
        if (!type)
            type = "";
        if (strcmp (type, "string") == 0)
            t = CN_MIDX_STRING;
        else if (strcmp (type, "number") == 0)
            t = CN_MIDX_NUMBER;
        else if (strcmp (type, "boolean") == 0)
            t = CN_MIDX_BOOLEAN;
        else {
            CN_WARN (S_LOG, "index type not supported: field ignored",
                     "{s:s,s:s,s:s}", "bucket", bucket, "field", k, "type", type);
            continue;
        }
        if (!s_name_ok (k) || s_reserved_index (k)) {
            CN_WARN (S_LOG, "invalid index name: field ignored", "{s:s,s:s}",
                     "bucket", bucket, "field", k);
            continue;
        }
        idx[n].name = k;        /* borrowed until s_bucket_fill copies it */
        idx[n].type = t;
        idx[n].unique = json_is_true (json_object_get (v, "unique"));
        n++;
    }
    /* copy names out of the JSON before dropping it */
    for (size_t i = 0; i < n; i++) {
        idx[i].name = strdup (idx[i].name);
        if (!idx[i].name) {
            for (size_t j = 0; j < i; j++)
                free ((char *) idx[j].name);
            free (idx);
            json_decref (o);
            s_err (m, "out of memory");
            return CN_MORAY_ESQL;
        }
    }
    json_decref (o);
    *out = idx;
    *nout = n;
    return CN_MORAY_OK;
}

static void
s_index_free (cn_mindex_t *idx, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free ((char *) idx[i].name);
    free (idx);
}

static s_bucket_t *
s_cache_find (cn_moray_t *m, const char *name)
{
    for (size_t i = 0; i < m->nbuckets; i++)
        if (strcmp (m->buckets[i]->name, name) == 0)
            return m->buckets[i];
    return NULL;
}

/* Set the cached definition of name (create the entry if needed). */
static s_bucket_t *
s_cache_set (cn_moray_t *m, const char *name, const cn_mindex_t *index, size_t n)
{
    s_bucket_t *b = s_cache_find (m, name);
    if (!b) {
        if (m->nbuckets == m->cbuckets) {
            size_t c = m->cbuckets ? m->cbuckets * 2 : 8;
            s_bucket_t **nb = realloc (m->buckets, c * sizeof *nb);
            if (!nb)
                return NULL;
            m->buckets = nb;
            m->cbuckets = c;
        }
        b = calloc (1, sizeof *b);
        if (!b || !(b->name = strdup (name))) {
            free (b);
            return NULL;
        }
        m->buckets[m->nbuckets++] = b;
    }
    if (!s_bucket_fill (b, index, n)) {
        b->stale = true;
        return NULL;
    }
    return b;
}

/* The bucket's definition, from the cache or buckets_config. EINVAL for a bad
 * name or a bucket that does not exist. The pointer stays valid for the life
 * of the handle (entries are refilled in place). */
static int
s_bucket (cn_moray_t *m, const char *name, s_bucket_t **out)
{
    *out = NULL;
    if (!s_name_ok (name)) {
        s_err (m, "invalid bucket name");
        return CN_MORAY_EINVAL;
    }
    s_bucket_t *b = s_cache_find (m, name);
    if (b && !b->stale && cn_mono_us () - b->loaded_us < S_CACHE_TTL_US) {
        *out = b;
        return CN_MORAY_OK;
    }
    int rc = s_ready (m);
    if (rc != CN_MORAY_OK)
        return rc;
    /* to_regclass: no error (which would abort the caller's transaction)
     * when buckets_config does not exist yet */
    PGresult *r;
    rc = s_exec (m, "SELECT to_regclass ('buckets_config') IS NOT NULL",
                 0, NULL, NULL, NULL, NULL, &r);
    if (rc != CN_MORAY_OK)
        return rc;
    bool have = PQntuples (r) == 1 && PQgetvalue (r, 0, 0)[0] == 't';
    PQclear (r);
    if (!have) {
        s_err (m, "bucket %s does not exist (no buckets_config)", name);
        return CN_MORAY_EINVAL;
    }
    const char *p[] = { name };
    rc = s_exec (m, "SELECT index FROM buckets_config WHERE name = $1",
                 1, NULL, p, NULL, NULL, &r);
    if (rc != CN_MORAY_OK)
        return rc;
    if (PQntuples (r) != 1) {
        PQclear (r);
        s_err (m, "bucket %s does not exist", name);
        return CN_MORAY_EINVAL;
    }
    cn_mindex_t *idx;
    size_t n;
    rc = s_parse_index (m, name, PQgetisnull (r, 0, 0) ? "{}" : PQgetvalue (r, 0, 0),
                        &idx, &n);
    PQclear (r);
    if (rc != CN_MORAY_OK)
        return rc;
    b = s_cache_set (m, name, idx, n);
    s_index_free (idx, n);
    if (!b) {
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    *out = b;
    return CN_MORAY_OK;
}

/* --- values ------------------------------------------------------------- */

/*
 * A value must be a JSON object; the row needs a few of its top-level fields.
 * jansson builds a tree at ~20 MB/s (130 us for a 3 KB record, 65 ms for a
 * batch of 500), so values are checked by a single pass here instead: full
 * JSON grammar (RFC 8259), UTF-8, escapes and surrogate pairs, nesting up to
 * S_JSON_MAX_DEPTH; no tree, only the spans of top-level members whose names
 * we index. Same verdicts as jansson with JSON_ALLOW_NUL, except numbers too
 * large for a double, which jansson refuses and we accept.
 */
#define S_JSON_MAX_DEPTH 1024

typedef enum { S_J_STRING, S_J_NUMBER, S_J_TRUE, S_J_FALSE, S_J_NULL, S_J_OBJECT,
               S_J_ARRAY } s_jkind_t;

/* A decimal number PostgreSQL's numeric takes without overflow: JSON number
 * grammar, at most 100 characters, exponent within +-1000. */
static bool
s_numeric_text (const char *v)
{
    size_t n = strlen (v);
    bool integer;
    if (n == 0 || n > 100
        || cn_json_scan_number ((const unsigned char *) v, (const unsigned char *) v + n, &integer)
           != (const unsigned char *) v + n)
        return false;
    const char *x = strpbrk (v, "eE");
    return !x || labs (strtol (x + 1, NULL, 10)) <= 1000;
}

/* The column text of a top-level member (see docs/store.md):
 *   string:  strings as is; numbers as written; true/false
 *   number:  numbers; strings holding a decimal number
 *   boolean: true/false; strings "true"/"false" (any case)
 * Anything else (null, object, array, mismatched) is NULL. */
static char *
s_column_text (s_jkind_t kind, const unsigned char *v, const unsigned char *ve,
               bool esc, cn_midx_type_t type)
{
    switch (kind) {
    case S_J_STRING: {
        char *s = esc ? cn_json_unescape (v + 1, ve - 1) : strndup ((const char *) v + 1,
                                                              (size_t) (ve - v - 2));
        if (!s || type == CN_MIDX_STRING)
            return s;
        if (type == CN_MIDX_NUMBER) {
            if (s_numeric_text (s))
                return s;
        }
        else if (strcasecmp (s, "true") == 0 || strcasecmp (s, "false") == 0) {
            for (char *c = s; *c; c++)
                *c = (char) tolower ((unsigned char) *c);
            return s;
        }
        free (s);
        return NULL;
    }
    case S_J_NUMBER: {
        if (type == CN_MIDX_BOOLEAN)
            return NULL;
        char *s = strndup ((const char *) v, (size_t) (ve - v));
        if (s && type == CN_MIDX_NUMBER && !s_numeric_text (s)) {
            free (s);
            return NULL;
        }
        return s;
    }
    case S_J_TRUE:
        return type == CN_MIDX_NUMBER ? NULL : strdup ("true");
    case S_J_FALSE:
        return type == CN_MIDX_NUMBER ? NULL : strdup ("false");
    default:
        return NULL;
    }
}

/* Record top-level member key=value in p (last occurrence wins, as jansson). */
static void
s_member (const s_bucket_t *b, s_prep_t *p, const unsigned char *k, const unsigned char *ke,
          bool kesc, s_jkind_t kind, const unsigned char *v, const unsigned char *ve,
          bool vesc)
{
    char buf[72];
    size_t kn = (size_t) (ke - k);
    const char *key;
    char *tmp = NULL;
    if (kesc) {
        if (kn > 64 * 6)
            return;             /* longer than any index name */
        tmp = cn_json_unescape (k, ke);
        if (!tmp)
            return;
        key = tmp;
        kn = strlen (tmp);
    }
    else {
        if (kn >= sizeof buf)
            return;
        memcpy (buf, k, kn);
        buf[kn] = 0;
        key = buf;
    }
    if (kn == 5 && strcmp (key, "vnode") == 0) {
        /* Moray stores value.vnode in _vnode (Manta); NULL for everything else */
        p->has_vnode = false;
        if (kind == S_J_NUMBER && (size_t) (ve - v) < sizeof p->vnode) {
            bool integer;
            (void) cn_json_scan_number (v, ve, &integer);
            char num[24];
            memcpy (num, v, (size_t) (ve - v));
            num[ve - v] = 0;
            errno = 0;
            (void) strtoll (num, NULL, 10);
            if (integer && errno == 0) {
                memcpy (p->vnode, num, sizeof num);
                p->has_vnode = true;
            }
        }
    }
    for (size_t i = 0; i < b->nindex; i++)
        if (strcmp (b->index[i].name, key) == 0) {
            free (p->cols[i]);
            p->cols[i] = s_column_text (kind, v, ve, vesc, b->index[i].type);
        }
    free (tmp);
}

/* Check that text[0..n) is a JSON object and collect the members the row
 * needs into p (p->cols allocated). false with err set when invalid. */
static bool
s_json_scan (const char *text, size_t n, const s_bucket_t *b, s_prep_t *p,
             char *err, size_t errlen)
{
    const unsigned char *s = (const unsigned char *) text, *e = s + n, *q = s;
    char stk[S_JSON_MAX_DEPTH];
    int d = 0;
    bool need_key = false, first = false, esc;
    const unsigned char *k = NULL, *ke = NULL, *cstart = NULL, *t;
    bool kesc = false;

    q = cn_json_scan_ws (q, e);
    if (q >= e || *q != '{') {
        snprintf (err, errlen, "not a JSON object");
        return false;
    }
    stk[d++] = '{';
    q++;
    need_key = first = true;
    for (;;) {
        q = cn_json_scan_ws (q, e);
        if (q >= e)
            goto bad;
        bool closed = false;
        s_jkind_t kind = S_J_NULL;
        const unsigned char *v = q;
        bool vesc = false;
        if (first && *q == (stk[d - 1] == '{' ? '}' : ']')) {
            q++;                /* empty container */
            closed = true;
        }
        else if (stk[d - 1] == '{' && need_key) {
            if (*q != '"' || !(t = cn_json_scan_string (q, e, &esc)))
                goto bad;
            q = t;
            if (d == 1) {
                k = v + 1;
                ke = q - 1;
                kesc = esc;
            }
            q = cn_json_scan_ws (q, e);
            if (q >= e || *q != ':')
                goto bad;
            q++;
            need_key = false;
            first = false;      /* a value must follow, not a close */
            continue;
        }
        else {
            switch (*q) {
            case '{':
            case '[':
                if (d >= S_JSON_MAX_DEPTH) {
                    snprintf (err, errlen, "JSON nested deeper than %d", S_JSON_MAX_DEPTH);
                    return false;
                }
                if (d == 1)
                    cstart = q;
                stk[d++] = (char) *q++;
                need_key = stk[d - 1] == '{';
                first = true;
                continue;
            case '"':
                if (!(t = cn_json_scan_string (q, e, &vesc)))
                    goto bad;
                q = t;
                kind = S_J_STRING;
                break;
            case 't':
                if (e - q < 4 || memcmp (q, "true", 4) != 0)
                    goto bad;
                q += 4;
                kind = S_J_TRUE;
                break;
            case 'f':
                if (e - q < 5 || memcmp (q, "false", 5) != 0)
                    goto bad;
                q += 5;
                kind = S_J_FALSE;
                break;
            case 'n':
                if (e - q < 4 || memcmp (q, "null", 4) != 0)
                    goto bad;
                q += 4;
                kind = S_J_NULL;
                break;
            default: {
                bool integer;
                if (!(t = cn_json_scan_number (q, e, &integer)))
                    goto bad;
                q = t;
                kind = S_J_NUMBER;
            }
            }
            if (d == 1)
                s_member (b, p, k, ke, kesc, kind, v, q, vesc);
        }
        /* after a value, or a container's close (loop: a close may follow) */
        for (;;) {
            if (closed) {
                d--;
                if (d == 0) {
                    q = cn_json_scan_ws (q, e);
                    if (q != e)
                        goto bad;
                    return true;
                }
                if (d == 1)     /* a top-level member's object or array */
                    s_member (b, p, k, ke, kesc,
                              *cstart == '{' ? S_J_OBJECT : S_J_ARRAY, cstart, q, false);
            }
            q = cn_json_scan_ws (q, e);
            if (q >= e)
                goto bad;
            if (*q == ',') {
                q++;
                first = false;
                need_key = stk[d - 1] == '{';
                break;
            }
            if (*q == (stk[d - 1] == '{' ? '}' : ']')) {
                q++;
                closed = true;
                continue;
            }
            goto bad;
        }
    }
bad:
    snprintf (err, errlen, "invalid JSON at byte %zu", (size_t) (q - s));
    return false;
}

static void
s_prep_fini (s_prep_t *p)
{
    if (p->cols)
        for (size_t i = 0; i < p->ncols; i++)
            free (p->cols[i]);
    free (p->cols);
    memset (p, 0, sizeof *p);
}

/* Check a value and extract the columns of b's index into p. */
static bool
s_extract (const s_bucket_t *b, const char *value, size_t len, s_prep_t *p,
           char *err, size_t errlen)
{
    memset (p, 0, sizeof *p);
    p->cols = calloc (b->nindex ? b->nindex : 1, sizeof (char *));
    if (!p->cols) {
        snprintf (err, errlen, "out of memory");
        return false;
    }
    p->ncols = b->nindex;
    if (!s_json_scan (value, len, b, p, err, errlen)) {
        s_prep_fini (p);
        return false;
    }
    return true;
}

/* Validate a value (a JSON object) and extract what the row needs. */
static int
s_prep (cn_moray_t *m, const s_bucket_t *b, const char *value, s_prep_t *p)
{
    memset (p, 0, sizeof *p);
    if (!value) {
        s_err (m, "value is required");
        return CN_MORAY_EINVAL;
    }
    size_t len = strlen (value);
    char why[96];
    if (!s_extract (b, value, len, p, why, sizeof why)) {
        s_err (m, "bad value: %s", why);
        return strcmp (why, "out of memory") == 0 ? CN_MORAY_ESQL : CN_MORAY_EINVAL;
    }
    cn_etag (value, len, p->etag);
    return CN_MORAY_OK;
}

/* --- lifecycle ---------------------------------------------------------- */

cn_moray_t *
cn_moray_new (const char *conninfo, int timeout_ms)
{
    cn_moray_t *m = calloc (1, sizeof *m);
    if (!m)
        return NULL;
    m->conninfo = strdup (conninfo ? conninfo : "");
    if (!m->conninfo) {
        free (m);
        return NULL;
    }
    m->timeout_ms = timeout_ms > 0 ? timeout_ms : S_DEFAULT_TIMEOUT;
    return m;
}

void
cn_moray_destroy (cn_moray_t **p)
{
    if (!p || !*p)
        return;
    cn_moray_t *m = *p;
    if (m->conn)
        PQfinish (m->conn);
    for (size_t i = 0; i < m->nbuckets; i++)
        s_bucket_free (&m->buckets[i]);
    free (m->buckets);
    free (m->conninfo);
    free (m);
    *p = NULL;
}

void
cn_moray_set_idle (cn_moray_t *m, cn_moray_idle_fn *fn, void *arg)
{
    m->idle = fn;
    m->idle_arg = arg;
}

int
cn_moray_connect (cn_moray_t *m)
{
    S_ENTER (m);
    if (m->conn && PQstatus (m->conn) == CONNECTION_OK)
        return CN_MORAY_OK;
    if (m->conn)
        s_reset (m);
    return s_connect (m);
}

bool
cn_moray_connected (const cn_moray_t *m)
{
    return m && m->conn && PQstatus (m->conn) == CONNECTION_OK;
}

const char *
cn_moray_errmsg (const cn_moray_t *m)
{
    return m ? m->errmsg : "no handle";
}

/* --- buckets ------------------------------------------------------------ */

static const char *s_internal[] = {
    "_etag", "_id", "_key", "_atime", "_ctime", "_mtime", "_rver",
    "_txn_snap", "_value", "_vnode", "_idx"
};

static bool
s_reserved_index (const char *name)
{
    for (size_t i = 0; i < sizeof s_internal / sizeof s_internal[0]; i++)
        if (strcasecmp (name, s_internal[i]) == 0)
            return true;
    const char *s = name;
    while (*s == '_')
        s++;
    return strncasecmp (s, "moray", 5) == 0;
}

/* Does the stored index JSON describe exactly index[0..n)? */
static bool
s_index_same (const char *stored, const cn_mindex_t *index, size_t n)
{
    json_t *o = json_loads (stored ? stored : "", 0, NULL);
    bool same = json_is_object (o) && json_object_size (o) == n;
    for (size_t i = 0; same && i < n; i++) {
        json_t *v = json_object_get (o, index[i].name);
        const char *t = json_string_value (json_object_get (v, "type"));
        same = t && strcmp (t, s_type_name (index[i].type)) == 0
               && json_is_true (json_object_get (v, "unique")) == index[i].unique;
    }
    json_decref (o);
    return same;
}

/* Fill the index columns of rows in table b (keys from 'after' on) for the
 * columns flagged in todo, in chunks. */
static int
s_backfill (cn_moray_t *m, s_bucket_t *b, const bool *todo)
{
    int rc = CN_MORAY_OK;
    char *last = NULL;
    s_sb_t sel = { 0 };
    s_sb_printf (&sel, "SELECT _key, _value FROM %s WHERE $1::text IS NULL OR _key > $1 "
                 "ORDER BY _key LIMIT %d", b->ident, S_BACKFILL_CHUNK);
    s_sb_t upd = { 0 }, uns = { 0 }, als = { 0 };
    int np = 1;
    s_sb_printf (&uns, "$1::text[]");
    s_sb_printf (&als, "k");
    bool first = true;
    for (size_t i = 0; i < b->nindex; i++) {
        if (!todo[i])
            continue;
        np++;
        s_sb_printf (&upd, "%s%s = u.c%zu%s", first ? "" : ", ", b->colid[i], i,
                     s_type_cast (b->index[i].type));
        s_sb_printf (&uns, ", $%d::text[]", np);
        s_sb_printf (&als, ", c%zu", i);
        first = false;
    }
    s_sb_t q = { 0 };
    s_sb_printf (&q, "UPDATE %s AS t SET %s FROM unnest (%s) AS u (%s) WHERE t._key = u.k",
                 b->ident, upd.d ? upd.d : "", uns.d ? uns.d : "", als.d ? als.d : "");
    if (sel.oom || upd.oom || uns.oom || als.oom || q.oom || np == 1) {
        rc = np == 1 ? CN_MORAY_OK : CN_MORAY_ESQL;
        if (rc != CN_MORAY_OK)
            s_err (m, "out of memory");
        goto done;
    }
    for (;;) {
        PGresult *r;
        const char *p[] = { last };
        rc = s_exec (m, sel.d, 1, NULL, p, NULL, NULL, &r);
        if (rc != CN_MORAY_OK)
            break;
        int rows = PQntuples (r);
        if (rows == 0) {
            PQclear (r);
            break;
        }
        /* one text[] per column, built as text literals */
        s_sb_t *arr = calloc ((size_t) np, sizeof *arr);
        if (!arr) {
            PQclear (r);
            s_err (m, "out of memory");
            rc = CN_MORAY_ESQL;
            break;
        }
        for (int a = 0; a < np; a++)
            s_sb_add (&arr[a], "{", 1);
        for (int row = 0; row < rows; row++) {
            char **vals = calloc ((size_t) np, sizeof *vals);
            if (!vals) {
                for (int a = 0; a < np; a++)
                    arr[a].oom = true;
                break;
            }
            s_prep_t pr;
            char why[96];
            bool ok = s_extract (b, PQgetvalue (r, row, 1), (size_t) PQgetlength (r, row, 1),
                                 &pr, why, sizeof why);
            int nv = 0;
            vals[nv++] = strdup (PQgetvalue (r, row, 0));
            for (size_t i = 0; i < b->nindex && nv < np; i++)
                if (todo[i]) {
                    vals[nv++] = ok ? pr.cols[i] : NULL;
                    if (ok)
                        pr.cols[i] = NULL;
                }
            if (ok)
                s_prep_fini (&pr);
            for (int a = 0; a < np; a++) {
                if (row)
                    s_sb_add (&arr[a], ",", 1);
                if (!vals[a])
                    s_sb_add (&arr[a], "NULL", 4);
                else {
                    s_sb_add (&arr[a], "\"", 1);
                    for (const char *c = vals[a]; *c; c++) {
                        if (*c == '"' || *c == '\\')
                            s_sb_add (&arr[a], "\\", 1);
                        s_sb_add (&arr[a], c, 1);
                    }
                    s_sb_add (&arr[a], "\"", 1);
                }
                free (vals[a]);
            }
            free (vals);
        }
        free (last);
        last = strdup (PQgetvalue (r, rows - 1, 0));
        PQclear (r);
        const char **pv = calloc ((size_t) np, sizeof *pv);
        bool oom = !pv || !last;
        for (int a = 0; a < np; a++) {
            s_sb_add (&arr[a], "}", 1);
            oom = oom || arr[a].oom;
            if (pv)
                pv[a] = arr[a].d;
        }
        if (!oom) {
            rc = s_exec (m, q.d, np, NULL, pv, NULL, NULL, &r);
            PQclear (r);
        }
        else {
            s_err (m, "out of memory");
            rc = CN_MORAY_ESQL;
        }
        for (int a = 0; a < np; a++)
            free (arr[a].d);
        free (arr);
        free (pv);
        if (rc != CN_MORAY_OK || rows < S_BACKFILL_CHUNK)
            break;
    }
done:
    free (last);
    free (sel.d);
    free (upd.d);
    free (uns.d);
    free (als.d);
    free (q.d);
    return rc;
}

/* Values are JSON text of a few KB, which PostgreSQL compresses (TOAST):
 * with lz4 (PostgreSQL 14+, when built with it) rather than the default pglz
 * the server spends far less CPU per write. 1 when table lname exists and its
 * _value column should be switched to lz4, 0 when not, or an error code. Only
 * values written after the switch are compressed with lz4; older ones stay
 * readable as they are. */
static int
s_wants_lz4 (cn_moray_t *m, const char *lname)
{
    if (PQserverVersion (m->conn) < 140000)
        return 0;
    const char *p[] = { lname };
    PGresult *r;
    int rc = s_exec (m, "SELECT 1 FROM pg_attribute a WHERE a.attrelid = "
                     "to_regclass (quote_ident ($1)) AND a.attname = '_value' "
                     "AND a.attcompression <> 'l' AND EXISTS (SELECT 1 FROM pg_settings "
                     "WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals))",
                     1, NULL, p, NULL, NULL, &r);
    if (rc)
        return rc;
    rc = PQntuples (r) == 1 ? 1 : 0;
    PQclear (r);
    return rc;
}

/* The DDL of put_bucket, inside a unit of work. */
static int
s_put_bucket_ddl (cn_moray_t *m, const char *bucket, const cn_mindex_t *index,
                  size_t nindex, const char *json)
{
    PGresult *r;
    int rc;
    char lname[64], ident[70];
    s_lower (lname, bucket, sizeof lname);
    snprintf (ident, sizeof ident, "\"%s\"", lname);

    /* one DDL writer at a time across instances (CREATE ... IF NOT EXISTS is
     * not safe against a concurrent CREATE) */
    if ((rc = s_cmd (m, "SELECT pg_advisory_xact_lock (" S_DDL_LOCK_KEY ")")))
        return rc;
    if ((rc = s_cmd (m, "CREATE TABLE IF NOT EXISTS buckets_config ("
                     "name text PRIMARY KEY, index text NOT NULL, pre text NOT NULL, "
                     "post text NOT NULL, options text, "
                     "mtime timestamp without time zone DEFAULT now() NOT NULL)")))
        return rc;
    const char *pn[] = { bucket };
    rc = s_exec (m, "SELECT index FROM buckets_config WHERE name = $1 FOR UPDATE",
                 1, NULL, pn, NULL, NULL, &r);
    if (rc)
        return rc;
    cn_mindex_t *old = NULL;
    size_t nold = 0;
    bool had = PQntuples (r) == 1;
    if (had && !PQgetisnull (r, 0, 0)
        && s_parse_index (m, bucket, PQgetvalue (r, 0, 0), &old, &nold) != CN_MORAY_OK) {
        old = NULL;
        nold = 0;
    }
    PQclear (r);

    s_sb_t s = { 0 };
    s_sb_printf (&s, "CREATE SEQUENCE IF NOT EXISTS \"%s_serial\"", lname);
    s_sb_printf (&s, "; CREATE TABLE IF NOT EXISTS %s ("
                 "_id BIGINT DEFAULT nextval('\"%s_serial\"'), _txn_snap INTEGER, "
                 "_key TEXT PRIMARY KEY, _value TEXT NOT NULL, _etag CHAR(8) NOT NULL, "
                 "_mtime BIGINT DEFAULT CAST (EXTRACT (EPOCH FROM NOW ()) * 1000 AS BIGINT) "
                 "NOT NULL, _vnode BIGINT)", ident, lname);
    const char *base[] = { "_id", "_etag", "_mtime", "_vnode" };
    for (size_t i = 0; i < 4; i++) {
        char in[80];
        s_index_name (in, lname, base[i]);
        s_sb_printf (&s, "; CREATE INDEX IF NOT EXISTS %s ON %s USING BTREE (%s) "
                     "WHERE %s IS NOT NULL", in, ident, base[i], base[i]);
    }
    if (s.oom) {
        s_index_free (old, nold);
        free (s.d);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    /* a multi-statement simple query: no parameters, all identifiers checked */
    rc = s_cmd (m, s.d);
    free (s.d);
    if (rc) {
        s_index_free (old, nold);
        return rc;
    }

    const char *pt[] = { lname };
    if ((rc = s_wants_lz4 (m, lname)) < 0) {
        s_index_free (old, nold);
        return rc;
    }
    if (rc == 1) {
        char sql[160];
        snprintf (sql, sizeof sql, "ALTER TABLE %s ALTER COLUMN _value SET COMPRESSION lz4",
                  ident);
        if ((rc = s_cmd (m, sql))) {
            s_index_free (old, nold);
            return rc;
        }
    }

    /* what the table has: column -> type, unique */
    rc = s_exec (m, "SELECT a.attname, format_type (a.atttypid, a.atttypmod), "
                 "EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid "
                 "AND i.indisunique AND i.indnatts = 1 AND i.indkey[0] = a.attnum) "
                 "FROM pg_attribute a WHERE a.attrelid = to_regclass (quote_ident ($1)) "
                 "AND a.attnum > 0 AND NOT a.attisdropped", 1, NULL, pt, NULL, NULL, &r);
    if (rc) {
        s_index_free (old, nold);
        return rc;
    }
    bool *todo = calloc (nindex ? nindex : 1, sizeof *todo);
    s_sb_t ddl = { 0 };
    for (size_t i = 0; todo && i < nindex; i++) {
        char col[64], cid[70];
        s_lower (col, index[i].name, sizeof col);
        s_quote (cid, index[i].name);
        int found = -1;
        for (int row = 0; row < PQntuples (r); row++)
            if (strcmp (PQgetvalue (r, row, 0), col) == 0)
                found = row;
        const char *want = index[i].type == CN_MIDX_NUMBER ? "numeric"
                         : index[i].type == CN_MIDX_BOOLEAN ? "boolean" : "text";
        if (found >= 0 && (strcmp (PQgetvalue (r, found, 1), want) != 0
                           || (PQgetvalue (r, found, 2)[0] == 't') != index[i].unique)) {
            s_sb_printf (&ddl, "; ALTER TABLE %s DROP COLUMN %s", ident, cid);
            found = -1;
        }
        if (found < 0) {
            s_sb_printf (&ddl, "; ALTER TABLE %s ADD COLUMN %s %s%s", ident, cid,
                         s_type_pg (index[i].type), index[i].unique ? " UNIQUE" : "");
            todo[i] = true;
        }
        if (!index[i].unique) {
            char in[80];
            s_index_name (in, lname, col);
            s_sb_printf (&ddl, "; CREATE INDEX IF NOT EXISTS %s ON %s USING BTREE (%s) "
                         "WHERE %s IS NOT NULL", in, ident, cid, cid);
        }
    }
    /* fields dropped from the index lose their column, as with Moray */
    for (size_t j = 0; j < nold; j++) {
        bool keep = false;
        for (size_t i = 0; i < nindex && !keep; i++)
            keep = strcasecmp (old[j].name, index[i].name) == 0;
        if (!keep) {
            char cid[70];
            s_quote (cid, old[j].name);
            s_sb_printf (&ddl, "; ALTER TABLE %s DROP COLUMN IF EXISTS %s", ident, cid);
        }
    }
    PQclear (r);
    s_index_free (old, nold);
    if (!todo || ddl.oom) {
        free (todo);
        free (ddl.d);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    if (ddl.d) {
        rc = s_cmd (m, ddl.d + 2);      /* skip the leading "; " */
        free (ddl.d);
        if (rc) {
            free (todo);
            return rc;
        }
    }

    /* existing rows get the new columns filled */
    s_bucket_t tmp = { 0 };
    tmp.name = (char *) bucket;
    if (!s_bucket_fill (&tmp, index, nindex)) {
        s_bucket_clear (&tmp);
        free (todo);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    rc = s_backfill (m, &tmp, todo);
    s_bucket_clear (&tmp);
    free (todo);
    if (rc)
        return rc;

    const char *pc[] = { bucket, json };
    rc = s_exec (m, "INSERT INTO buckets_config (name, index, pre, post, options) "
                 "VALUES ($1, $2, '[]', '[]', '{\"version\":0}') "
                 "ON CONFLICT (name) DO UPDATE SET index = EXCLUDED.index, mtime = now ()",
                 2, NULL, pc, NULL, NULL, &r);
    PQclear (r);
    return rc;
}

int
cn_moray_put_bucket (cn_moray_t *m, const char *bucket,
                     const cn_mindex_t *index, size_t nindex)
{
    S_ENTER (m);
    if (!s_name_ok (bucket)) {
        s_err (m, "invalid bucket name (want [a-zA-Z_][a-zA-Z0-9_]{0,62})");
        return CN_MORAY_EINVAL;
    }
    if (strcasecmp (bucket, "buckets_config") == 0 || strcasecmp (bucket, "moray") == 0
        || strcasecmp (bucket, "search") == 0) {
        s_err (m, "bucket name %s is reserved", bucket);
        return CN_MORAY_EINVAL;
    }
    if (nindex && !index) {
        s_err (m, "no index array");
        return CN_MORAY_EINVAL;
    }
    json_t *def = json_object ();
    for (size_t i = 0; def && i < nindex; i++) {
        const char *k = index[i].name;
        if (!s_name_ok (k)) {
            s_err (m, "invalid index name (want [a-zA-Z_][a-zA-Z0-9_]{0,62})");
            json_decref (def);
            return CN_MORAY_EINVAL;
        }
        if (s_reserved_index (k)) {
            s_err (m, "index name %s is reserved", k);
            json_decref (def);
            return CN_MORAY_EINVAL;
        }
        if (index[i].type != CN_MIDX_STRING && index[i].type != CN_MIDX_NUMBER
            && index[i].type != CN_MIDX_BOOLEAN) {
            s_err (m, "index %s: invalid type", k);
            json_decref (def);
            return CN_MORAY_EINVAL;
        }
        for (size_t j = 0; j < i; j++)
            if (strcasecmp (index[j].name, k) == 0) {
                s_err (m, "index names %s and %s map to the same column",
                       index[j].name, k);
                json_decref (def);
                return CN_MORAY_EINVAL;
            }
        json_t *d = index[i].unique
            ? json_pack ("{s:s,s:b}", "type", s_type_name (index[i].type), "unique", 1)
            : json_pack ("{s:s}", "type", s_type_name (index[i].type));
        json_object_set_new (def, k, d);
    }
    char *json = def ? json_dumps (def, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref (def);
    if (!json) {
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    int rc = s_ready (m);
    if (rc) {
        free (json);
        return rc;
    }
    /* fast path: already there as wanted (the common case at every start) */
    PGresult *r;
    rc = s_exec (m, "SELECT to_regclass ('buckets_config') IS NOT NULL",
                 0, NULL, NULL, NULL, NULL, &r);
    bool have = rc == CN_MORAY_OK && PQntuples (r) == 1 && PQgetvalue (r, 0, 0)[0] == 't';
    PQclear (r);
    bool same = false;
    if (rc == CN_MORAY_OK && have) {
        const char *p[] = { bucket };
        rc = s_exec (m, "SELECT index, to_regclass (quote_ident (lower ($1))) IS NOT NULL "
                     "FROM buckets_config WHERE name = $1", 1, NULL, p, NULL, NULL, &r);
        same = rc == CN_MORAY_OK && PQntuples (r) == 1 && PQgetvalue (r, 0, 1)[0] == 't'
               && s_index_same (PQgetvalue (r, 0, 0), index, nindex);
        PQclear (r);
        if (same) {
            char lname[64];
            s_lower (lname, bucket, sizeof lname);
            int w = s_wants_lz4 (m, lname);
            if (w < 0)
                rc = w;
            same = w == 0;
        }
    }
    if (rc == CN_MORAY_OK && !same) {
        bool own;
        rc = s_unit_begin (m, &own);
        if (rc == CN_MORAY_OK) {
            rc = s_put_bucket_ddl (m, bucket, index, nindex, json);
            rc = s_unit_end (m, own, rc);
        }
        if (rc == CN_MORAY_OK)
            CN_INFO (S_LOG, "bucket created or updated", "{s:s,s:s}", "bucket", bucket,
                     "index", json);
    }
    free (json);
    if (rc != CN_MORAY_OK)
        return rc;
    if (!s_cache_set (m, bucket, index, nindex)) {
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    return CN_MORAY_OK;
}

/* --- objects ------------------------------------------------------------ */

static void
s_row_obj (PGresult *r, int row, cn_mobj_t *o, bool copy)
{
    o->key = copy ? strdup (PQgetvalue (r, row, 0)) : PQgetvalue (r, row, 0);
    if (PQgetisnull (r, row, 1)) {
        o->value = NULL;        /* left out by the query (lock_many) */
        o->value_len = 0;
    }
    else {
        o->value = copy ? strdup (PQgetvalue (r, row, 1)) : PQgetvalue (r, row, 1);
        o->value_len = (size_t) PQgetlength (r, row, 1);
    }
    snprintf (o->etag, sizeof o->etag, "%s", PQgetvalue (r, row, 2));
    for (size_t n = strlen (o->etag); n && o->etag[n - 1] == ' '; n--)
        o->etag[n - 1] = 0;     /* char(8) padding, should a row have less */
    o->id = PQgetisnull (r, row, 3) ? 0 : strtoll (PQgetvalue (r, row, 3), NULL, 10);
    o->mtime = strtoll (PQgetvalue (r, row, 4), NULL, 10);
}

int
cn_moray_get (cn_moray_t *m, const char *bucket, const char *key, cn_mobj_t *out)
{
    S_ENTER (m);
    if (out)
        memset (out, 0, sizeof *out);
    if (!out || !s_key_ok (m, key))
        return CN_MORAY_EINVAL;
    s_bucket_t *b;
    int rc = s_bucket (m, bucket, &b);
    if (rc)
        return rc;
    if ((rc = s_ready (m)))
        return rc;
    PGresult *r;
    const char *p[] = { key };
    rc = s_exec (m, b->sql_get, 1, NULL, p, NULL, NULL, &r);
    if (rc)
        return rc;
    if (PQntuples (r) != 1) {
        PQclear (r);
        s_err (m, "object not found");
        return CN_MORAY_NOTFOUND;
    }
    s_row_obj (r, 0, out, true);
    PQclear (r);
    if (!out->key || !out->value) {
        cn_mobj_fini (out);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    return CN_MORAY_OK;
}

/* One put statement for a prepared value. CONFLICT when the condition fails. */
static int
s_put_one (cn_moray_t *m, s_bucket_t *b, const char *key, const char *value,
           const char *etag, const s_prep_t *p, int64_t mtime,
           char out_etag[9], int64_t *out_id)
{
    int n = S_P_COLS + (int) b->nindex;
    const char **v = calloc ((size_t) n, sizeof *v);
    Oid *t = calloc ((size_t) n, sizeof *t);
    if (!v || !t) {
        free (v);
        free (t);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    char mt[24];
    snprintf (mt, sizeof mt, "%" PRId64, mtime);
    v[S_P_KEY] = key;
    v[S_P_VAL] = value;
    v[S_P_ETAG] = p->etag;
    v[S_P_MTIME] = mt;
    v[S_P_VNODE] = p->has_vnode ? p->vnode : NULL;
    v[S_P_COND] = etag && *etag ? etag : NULL;
    for (size_t i = 0; i < b->nindex; i++)
        v[S_P_COLS + i] = p->cols[i];
    for (int i = 0; i < n; i++)
        t[i] = S_OID_TEXT;
    const char *sql = !etag ? b->sql_put_blind : !*etag ? b->sql_put_new : b->sql_put_etag;
    PGresult *r;
    int rc = s_exec (m, sql, n, t, v, NULL, NULL, &r);
    free (v);
    free (t);
    if (rc)
        return rc;
    if (PQntuples (r) != 1) {
        PQclear (r);
        s_err (m, etag && *etag ? "etag mismatch (or no such object)"
                                : "object already exists");
        return CN_MORAY_CONFLICT;
    }
    if (out_id)
        *out_id = strtoll (PQgetvalue (r, 0, 0), NULL, 10);
    if (out_etag)
        memcpy (out_etag, p->etag, 9);
    PQclear (r);
    return CN_MORAY_OK;
}

/* 1 when key exists, 0 when not, <0 on error. */
static int
s_exists (cn_moray_t *m, s_bucket_t *b, const char *key)
{
    PGresult *r;
    const char *p[] = { key };
    int rc = s_exec (m, b->sql_exists, 1, NULL, p, NULL, NULL, &r);
    if (rc)
        return rc;
    int n = PQntuples (r);
    PQclear (r);
    return n > 0;
}

static int
s_del_one (cn_moray_t *m, s_bucket_t *b, const char *key, const char *etag,
           int64_t *out_id)
{
    PGresult *r;
    int rc;
    if (etag && !*etag) {
        /* "must not exist": nothing to delete either way */
        rc = s_exists (m, b, key);
        if (rc < 0)
            return rc;
        s_err (m, rc ? "object exists (etag condition: none)" : "object not found");
        return rc ? CN_MORAY_CONFLICT : CN_MORAY_NOTFOUND;
    }
    const char *p[] = { key, etag };
    rc = s_exec (m, etag ? b->sql_del_etag : b->sql_del, etag ? 2 : 1, NULL, p, NULL,
                 NULL, &r);
    if (rc)
        return rc;
    if (PQntuples (r) == 1) {
        if (out_id)
            *out_id = strtoll (PQgetvalue (r, 0, 0), NULL, 10);
        PQclear (r);
        return CN_MORAY_OK;
    }
    PQclear (r);
    if (!etag) {
        s_err (m, "object not found");
        return CN_MORAY_NOTFOUND;
    }
    rc = s_exists (m, b, key);
    if (rc < 0)
        return rc;
    s_err (m, rc ? "etag mismatch" : "object not found");
    return rc ? CN_MORAY_CONFLICT : CN_MORAY_NOTFOUND;
}

int
cn_moray_put (cn_moray_t *m, const char *bucket, const char *key,
              const char *value, const char *etag, char out_etag[9], int64_t *out_id)
{
    S_ENTER (m);
    if (!s_key_ok (m, key))
        return CN_MORAY_EINVAL;
    s_bucket_t *b;
    int rc = s_bucket (m, bucket, &b);
    if (rc)
        return rc;
    s_prep_t p;
    if ((rc = s_prep (m, b, value, &p)))
        return rc;
    if ((rc = s_ready (m)) == CN_MORAY_OK)
        rc = s_put_one (m, b, key, value, etag, &p, cn_now_ms (), out_etag, out_id);
    s_prep_fini (&p);
    return rc;
}

int
cn_moray_del (cn_moray_t *m, const char *bucket, const char *key, const char *etag,
              int64_t *out_id)
{
    S_ENTER (m);
    if (!s_key_ok (m, key))
        return CN_MORAY_EINVAL;
    s_bucket_t *b;
    int rc = s_bucket (m, bucket, &b);
    if (rc)
        return rc;
    if ((rc = s_ready (m)))
        return rc;
    return s_del_one (m, b, key, etag, out_id);
}

/* Binary text[] parameter (array_send format). */
typedef struct {
    s_sb_t b;
    bool hasnull;
} s_arr_t;

static void
s_arr_i32 (s_arr_t *a, int32_t v)
{
    uint32_t n = htonl ((uint32_t) v);
    s_sb_add (&a->b, &n, 4);
}

static void
s_arr_begin (s_arr_t *a, size_t n)
{
    memset (a, 0, sizeof *a);
    s_arr_i32 (a, 1);                   /* ndim */
    s_arr_i32 (a, 0);                   /* flags: has nulls, patched */
    s_arr_i32 (a, S_OID_TEXT);          /* element type */
    s_arr_i32 (a, (int32_t) n);         /* dimension */
    s_arr_i32 (a, 1);                   /* lower bound */
}

static void
s_arr_add (s_arr_t *a, const char *s)
{
    if (!s) {
        s_arr_i32 (a, -1);
        if (!a->hasnull && !a->b.oom) {
            a->hasnull = true;
            uint32_t one = htonl (1);
            memcpy (a->b.d + 4, &one, 4);
        }
        return;
    }
    size_t n = strlen (s);
    s_arr_i32 (a, (int32_t) n);
    s_sb_add (&a->b, s, n);
}

int
cn_moray_find (cn_moray_t *m, const char *bucket, const char *filter,
               const cn_mfind_opts_t *opts, cn_mfind_cb cb, void *arg)
{
    S_ENTER (m);
    cn_mfind_opts_t o = { 0 };
    if (opts)
        o = *opts;
    if (!filter || !cb || o.limit < 0 || o.offset < 0) {
        s_err (m, "find: filter and callback required; limit and offset >= 0");
        return CN_MORAY_EINVAL;
    }
    if (o.nheld && (!o.held_keys || !o.held_etags || o.no_values)) {
        s_err (m, "find: held values need keys and etags, and values asked for");
        return CN_MORAY_EINVAL;
    }
    for (size_t i = 0; i < o.nheld; i++)
        if (!s_key_ok (m, o.held_keys[i]))
            return CN_MORAY_EINVAL;
    s_bucket_t *b;
    int rc = s_bucket (m, bucket, &b);
    if (rc)
        return rc;

    char sort[70];
    if (!o.sort || strcmp (o.sort, "_key") == 0)
        snprintf (sort, sizeof sort, "_key");
    else if (strcmp (o.sort, "_id") == 0 || strcmp (o.sort, "_mtime") == 0)
        snprintf (sort, sizeof sort, "%s", o.sort);
    else {
        const char *col = NULL;
        for (size_t i = 0; i < b->nindex && !col; i++)
            if (strcmp (b->index[i].name, o.sort) == 0)
                col = b->colid[i];
        for (size_t i = 0; i < b->nindex && !col; i++)
            if (strcasecmp (b->index[i].name, o.sort) == 0)
                col = b->colid[i];
        if (!col) {
            s_err (m, "find: cannot sort on %.64s (not indexed)", o.sort);
            return CN_MORAY_EINVAL;
        }
        snprintf (sort, sizeof sort, "%s", col);
    }

    cn_sqlwhere_t w;
    char ferr[256];
    if (cn_filter_to_sql (filter, b->index, b->nindex, 1, &w, ferr, sizeof ferr) != 0) {
        s_err (m, "bad filter: %s", ferr);
        return CN_MORAY_EINVAL;
    }
    const char *dir = o.descending ? " DESC" : "";
    bool tie = strcmp (sort, "_key") != 0;
    s_sb_t s = { 0 };
    if (o.nheld == 0) {
        s_sb_printf (&s, "SELECT _key, %s, _etag, _id, _mtime FROM %s WHERE %s ORDER BY %s%s",
                     o.no_values ? "NULL::text" : "_value", b->ident, w.sql, sort, dir);
        if (tie)
            s_sb_printf (&s, ", _key%s", dir);
        s_sb_printf (&s, " LIMIT $%d OFFSET $%d", w.nparams + 1, w.nparams + 2);
    }
    else {
        /* The page first (the filter's plan, LIMIT on the sorted index),
         * then its rows joined to what the caller holds: a value is left
         * out (never read nor sent) where the stored etag, and version when
         * given, are the caller's. The page is sorted again by the same
         * keys (a join keeps no order); DISTINCT ON keeps a key the caller
         * named twice from doubling its row. */
        s_sb_printf (&s, "SELECT t._key, CASE WHEN t._etag = u.e AND (u.i IS NULL OR "
                     "t._id = u.i::bigint) THEN NULL ELSE t._value END, t._etag, t._id, "
                     "t._mtime FROM (SELECT _key, _value, _etag, _id, _mtime, %s AS _cn_sort "
                     "FROM %s WHERE %s ORDER BY %s%s", sort, b->ident, w.sql, sort, dir);
        if (tie)
            s_sb_printf (&s, ", _key%s", dir);
        s_sb_printf (&s, " LIMIT $%d OFFSET $%d) AS t LEFT JOIN (SELECT DISTINCT ON (k) k, e, i "
                     "FROM unnest ($%d::text[], $%d::text[], $%d::text[]) AS x (k, e, i)) "
                     "AS u ON u.k = t._key ORDER BY t._cn_sort%s", w.nparams + 1,
                     w.nparams + 2, w.nparams + 3, w.nparams + 4, w.nparams + 5, dir);
        if (tie)
            s_sb_printf (&s, ", t._key%s", dir);
    }
    int n = w.nparams + 2 + (o.nheld ? 3 : 0);
    const char **v = calloc ((size_t) n, sizeof *v);
    int *lens = calloc ((size_t) n, sizeof *lens);
    int *fmts = calloc ((size_t) n, sizeof *fmts);
    Oid *types = calloc ((size_t) n, sizeof *types);
    char lim[24], off[24];
    snprintf (lim, sizeof lim, "%" PRId64, o.limit);
    snprintf (off, sizeof off, "%" PRId64, o.offset);
    s_arr_t ak, ae, ai;
    memset (&ak, 0, sizeof ak);
    memset (&ae, 0, sizeof ae);
    memset (&ai, 0, sizeof ai);
    if (o.nheld) {
        s_arr_begin (&ak, o.nheld);
        s_arr_begin (&ae, o.nheld);
        s_arr_begin (&ai, o.nheld);
        for (size_t i = 0; i < o.nheld; i++) {
            char id[24];
            s_arr_add (&ak, o.held_keys[i]);
            s_arr_add (&ae, o.held_etags[i] && *o.held_etags[i] ? o.held_etags[i] : NULL);
            if (o.held_ids)
                snprintf (id, sizeof id, "%" PRId64, o.held_ids[i]);
            s_arr_add (&ai, o.held_ids ? id : NULL);
        }
    }
    if (s.oom || !v || !lens || !fmts || !types || ak.b.oom || ae.b.oom || ai.b.oom) {
        s_err (m, "out of memory");
        rc = CN_MORAY_ESQL;
        goto out;
    }
    for (int i = 0; i < w.nparams; i++)
        v[i] = w.params[i];
    v[w.nparams] = o.limit ? lim : NULL;       /* LIMIT NULL: no limit */
    v[w.nparams + 1] = off;
    if (o.nheld) {
        s_arr_t *arrs[3] = { &ak, &ae, &ai };
        for (int i = 0; i < 3; i++) {
            int k = w.nparams + 2 + i;
            v[k] = arrs[i]->b.d;
            lens[k] = (int) arrs[i]->b.len;
            fmts[k] = 1;
            types[k] = S_OID_TEXTARRAY;
        }
    }

    if ((rc = s_ready (m)) == CN_MORAY_OK) {
        int64_t deadline = s_deadline (m);
        rc = s_send (m, s.d, n, types, v, lens, fmts, true, deadline);
        m->busy = true;
        bool stop = false;
        int err = CN_MORAY_OK;
        while (rc == CN_MORAY_OK) {
            PGresult *r;
            rc = s_next (m, deadline, &r);
            if (rc != CN_MORAY_OK || !r)
                break;
            ExecStatusType st = PQresultStatus (r);
            if (st == PGRES_SINGLE_TUPLE) {
                if (!stop) {
                    cn_mobj_t obj;
                    s_row_obj (r, 0, &obj, false);
                    stop = cb (&obj, arg) != 0;
                }
                /* after a stop the rest is drained (bounded by LIMIT and the
                 * deadline); a cancel would need an unbounded connect */
            }
            else if (st != PGRES_TUPLES_OK && err == CN_MORAY_OK) {
                err = s_fail_result (m, r);
                if (!m->conn) {
                    PQclear (r);
                    rc = err;
                    break;
                }
            }
            PQclear (r);
        }
        m->busy = false;
        if (rc == CN_MORAY_OK)
            rc = err;
    }
out:
    free (s.d);
    free (v);
    free (lens);
    free (fmts);
    free (types);
    free (ak.b.d);
    free (ae.b.d);
    free (ai.b.d);
    cn_sqlwhere_fini (&w);
    return rc;
}

/* --- transactions ------------------------------------------------------- */

int
cn_moray_begin (cn_moray_t *m)
{
    S_ENTER (m);
    m->txn_lost = false;
    if (m->in_txn) {
        s_err (m, "a transaction is already open");
        return CN_MORAY_EINVAL;
    }
    int rc = s_ready (m);
    if (rc)
        return rc;
    /* BEGIN is sent with the first statement (s_exec_begun): one round
     * trip fewer per transaction */
    m->begin_pending = true;
    m->in_txn = true;
    return CN_MORAY_OK;
}

int
cn_moray_commit (cn_moray_t *m)
{
    S_ENTER (m);
    if (m->txn_lost) {
        m->txn_lost = false;
        s_err (m, "the transaction was lost with the connection");
        return CN_MORAY_EIO;
    }
    if (!m->in_txn) {
        s_err (m, "no transaction is open");
        return CN_MORAY_EINVAL;
    }
    if (m->begin_pending) {
        /* nothing was sent: nothing to commit */
        m->begin_pending = false;
        m->in_txn = false;
        return CN_MORAY_OK;
    }
    PGresult *r;
    int rc = s_exec (m, "COMMIT", 0, NULL, NULL, NULL, NULL, &r);
    if (rc == CN_MORAY_OK && strcmp (PQcmdStatus (r), "COMMIT") != 0) {
        s_err (m, "transaction aborted by an earlier error: rolled back");
        rc = CN_MORAY_ESQL;
    }
    PQclear (r);
    m->in_txn = false;
    m->txn_lost = false;        /* reported now */
    return rc;
}

void
cn_moray_rollback (cn_moray_t *m)
{
    if (!m || m->busy)
        return;
    m->txn_lost = false;
    if (!m->in_txn)
        return;
    /* the error that led here stays readable (cn_moray_errmsg) for the
     * caller's log line after the rollback */
    char keep[sizeof m->errmsg], keep_state[sizeof m->sqlstate];
    memcpy (keep, m->errmsg, sizeof keep);
    memcpy (keep_state, m->sqlstate, sizeof keep_state);
    if (m->begin_pending)
        m->begin_pending = false;       /* nothing was sent */
    else
    if (m->conn)
        (void) s_cmd (m, "ROLLBACK");
    memcpy (m->errmsg, keep, sizeof keep);
    memcpy (m->sqlstate, keep_state, sizeof keep_state);
    m->in_txn = false;
    m->txn_lost = false;
}

/* --- many keys ---------------------------------------------------------- */

/* Open-addressing map (bucket, key) -> op index, for a batch. */
typedef struct {
    size_t cap;
    size_t *slot;               /* op index + 1; 0 empty */
} s_map_t;

static uint64_t
s_hash (const void *bucket, const char *key)
{
    uint64_t h = 1469598103934665603ULL ^ (uint64_t) (uintptr_t) bucket;
    for (const unsigned char *s = (const unsigned char *) key; *s; s++)
        h = (h ^ *s) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static bool
s_map_init (s_map_t *mp, size_t n)
{
    mp->cap = 16;
    while (mp->cap < 2 * n)
        mp->cap *= 2;
    mp->slot = calloc (mp->cap, sizeof *mp->slot);
    return mp->slot != NULL;
}

/* Find (bucket, key): op index or SIZE_MAX; with insert_at, adds it when absent. */
static size_t
s_map_find (s_map_t *mp, s_bucket_t *const *ob, const cn_mop_t *ops,
            const s_bucket_t *b, const char *key, size_t insert_at)
{
    size_t i = (size_t) s_hash (b, key) & (mp->cap - 1);
    for (;;) {
        size_t s = mp->slot[i];
        if (!s) {
            if (insert_at != SIZE_MAX)
                mp->slot[i] = insert_at + 1;
            return SIZE_MAX;
        }
        if (ob[s - 1] == b && strcmp (ops[s - 1].key, key) == 0)
            return s - 1;
        i = (i + 1) & (mp->cap - 1);
    }
}

int
cn_moray_get_many_locked (cn_moray_t *m, const char *bucket, const char *const *keys,
                          size_t n, cn_mobj_t *out)
{
    return cn_moray_lock_many (m, bucket, keys, NULL, n, out);
}

int
cn_moray_lock_many (cn_moray_t *m, const char *bucket, const char *const *keys,
                    const char *const *etags, size_t n, cn_mobj_t *out)
{
    S_ENTER (m);
    if (n && (!keys || !out)) {
        s_err (m, "keys and out required");
        return CN_MORAY_EINVAL;
    }
    for (size_t i = 0; i < n; i++)
        memset (&out[i], 0, sizeof out[i]);
    for (size_t i = 0; i < n; i++)
        if (!s_key_ok (m, keys[i]))
            return CN_MORAY_EINVAL;
    s_bucket_t *b;
    int rc = s_bucket (m, bucket, &b);
    if (rc || n == 0)
        return rc;
    if ((rc = s_ready (m)))
        return rc;
    s_arr_t a, e;
    s_arr_begin (&a, n);
    s_arr_begin (&e, n);
    for (size_t i = 0; i < n; i++) {
        s_arr_add (&a, keys[i]);
        s_arr_add (&e, etags && etags[i] && *etags[i] ? etags[i] : NULL);
    }
    if (a.b.oom || e.b.oom) {
        free (a.b.d);
        free (e.b.d);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    const char *v[] = { a.b.d, e.b.d };
    int len[] = { (int) a.b.len, (int) e.b.len };
    int fmt[] = { 1, 1 };
    Oid t[] = { S_OID_TEXTARRAY, S_OID_TEXTARRAY };
    PGresult *r;
    rc = s_exec (m, b->sql_lock_many, 2, t, v, len, fmt, &r);
    free (a.b.d);
    free (e.b.d);
    if (rc)
        return rc;
    bool oom = false;
    for (int row = 0; row < PQntuples (r); row++) {
        long long pos = strtoll (PQgetvalue (r, row, 5), NULL, 10);
        if (pos < 1 || (size_t) pos > n || out[pos - 1].key)
            continue;
        cn_mobj_t *o = &out[pos - 1];
        s_row_obj (r, row, o, true);
        oom = oom || !o->key || (!o->value && !PQgetisnull (r, row, 1));
    }
    PQclear (r);
    if (oom) {
        for (size_t i = 0; i < n; i++)
            cn_mobj_fini (&out[i]);
        s_err (m, "out of memory");
        return CN_MORAY_ESQL;
    }
    return CN_MORAY_OK;
}

/* One grouped statement: ops idx[0..k) of bucket b, all of one class.
 * Fills out_id of those written; done[op] set for each written op. */
static int
s_batch_group (cn_moray_t *m, s_bucket_t *b, cn_mop_t *ops, s_prep_t *prep,
               const size_t *idx, size_t k, int cls, int64_t mtime,
               s_map_t *mp, s_bucket_t *const *ob, bool *done)
{
    int rc = CN_MORAY_OK;
    bool del = cls == 3;
    int np = del ? 2 : S_P_COLS + (int) b->nindex;
    s_arr_t *arr = calloc ((size_t) np, sizeof *arr);
    const char **v = calloc ((size_t) np, sizeof *v);
    int *len = calloc ((size_t) np, sizeof *len);
    int *fmt = calloc ((size_t) np, sizeof *fmt);
    Oid *t = calloc ((size_t) np, sizeof *t);
    char mt[24];
    snprintf (mt, sizeof mt, "%" PRId64, mtime);
    if (!arr || !v || !len || !fmt || !t) {
        s_err (m, "out of memory");
        rc = CN_MORAY_ESQL;
        goto done;
    }
    for (int a = 0; a < np; a++) {
        t[a] = S_OID_TEXTARRAY;
        fmt[a] = 1;
        s_arr_begin (&arr[a], k);
    }
    for (size_t j = 0; j < k; j++) {
        const cn_mop_t *op = &ops[idx[j]];
        const s_prep_t *p = &prep[idx[j]];
        if (del) {
            s_arr_add (&arr[0], op->key);
            s_arr_add (&arr[1], op->etag);
            continue;
        }
        s_arr_add (&arr[S_P_KEY], op->key);
        s_arr_add (&arr[S_P_VAL], op->value);
        s_arr_add (&arr[S_P_ETAG], p->etag);
        s_arr_add (&arr[S_P_VNODE], p->has_vnode ? p->vnode : NULL);
        s_arr_add (&arr[S_P_COND], cls == 2 ? op->etag : NULL);
        for (size_t i = 0; i < b->nindex; i++)
            s_arr_add (&arr[S_P_COLS + i], p->cols[i]);
    }
    for (int a = 0; a < np; a++) {
        if (arr[a].b.oom) {
            s_err (m, "out of memory");
            rc = CN_MORAY_ESQL;
            goto done;
        }
        v[a] = arr[a].b.d;
        len[a] = (int) arr[a].b.len;
    }
    if (!del) {
        /* $4 is the scalar mtime */
        v[S_P_MTIME] = mt;
        len[S_P_MTIME] = 0;
        fmt[S_P_MTIME] = 0;
        t[S_P_MTIME] = S_OID_TEXT;
    }
    const char *sql = del ? b->sql_b_del : cls == 0 ? b->sql_b_blind
                    : cls == 1 ? b->sql_b_new : b->sql_b_etag;
    PGresult *r;
    rc = s_exec (m, sql, np, t, v, len, fmt, &r);
    if (rc)
        goto done;
    for (int row = 0; row < PQntuples (r); row++) {
        size_t i = s_map_find (mp, ob, ops, b, PQgetvalue (r, row, 0), SIZE_MAX);
        if (i == SIZE_MAX)
            continue;
        done[i] = true;
        ops[i].out_id = strtoll (PQgetvalue (r, row, 1), NULL, 10);
        if (!del)
            memcpy (ops[i].out_etag, prep[i].etag, 9);
    }
    PQclear (r);
done:
    if (arr)
        for (int a = 0; a < np; a++)
            free (arr[a].b.d);
    free (arr);
    free (v);
    free (len);
    free (fmt);
    free (t);
    return rc;
}

/* The op classes of a grouped batch: 0 blind put, 1 put-if-absent,
 * 2 put-if-etag, 3 delete. */
static int
s_op_class (const cn_mop_t *op)
{
    if (op->kind == CN_MOP_DEL)
        return 3;
    return !op->etag ? 0 : !*op->etag ? 1 : 2;
}

/* The batch; applied != NULL: a failed condition (or a missing object to
 * delete) skips that op instead of failing the batch (cn_moray_batch_partial). */
static int
s_batch (cn_moray_t *m, cn_mop_t *ops, size_t n, size_t *failed, bool *applied, bool final)
{
    S_ENTER (m);
    if (applied)
        for (size_t i = 0; i < n; i++)
            applied[i] = false;
    if (n == 0)
        return CN_MORAY_OK;
    if (!ops) {
        s_err (m, "no ops");
        return CN_MORAY_EINVAL;
    }
    int rc = CN_MORAY_OK;
    size_t bad = SIZE_MAX;
    s_bucket_t **ob = calloc (n, sizeof *ob);
    s_prep_t *prep = calloc (n, sizeof *prep);
    bool *done = calloc (n, sizeof *done);
    s_map_t mp = { 0 };
    size_t *idx = calloc (n, sizeof *idx);
    if (!ob || !prep || !done || !idx || !s_map_init (&mp, n)) {
        s_err (m, "out of memory");
        rc = CN_MORAY_ESQL;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        ops[i].out_etag[0] = 0;
        ops[i].out_id = 0;
    }
    /* check everything before touching the database */
    for (size_t i = 0; i < n && rc == CN_MORAY_OK; i++) {
        if (ops[i].kind != CN_MOP_PUT && ops[i].kind != CN_MOP_DEL) {
            s_err (m, "op %zu: invalid kind", i);
            rc = CN_MORAY_EINVAL;
        }
        else if (!s_key_ok (m, ops[i].key))
            rc = CN_MORAY_EINVAL;
        else
            rc = s_bucket (m, ops[i].bucket, &ob[i]);
        if (rc == CN_MORAY_EINVAL)
            bad = i;
    }
    /* all buckets resolved (and refreshed) before any value is prepared, so
     * no definition changes under a prepared op */
    for (size_t i = 0; i < n && rc == CN_MORAY_OK; i++)
        if (ops[i].kind == CN_MOP_PUT
            && (rc = s_prep (m, ob[i], ops[i].value, &prep[i])) == CN_MORAY_EINVAL)
            bad = i;
    if (rc)
        goto out;
    bool dup = false;
    for (size_t i = 0; i < n && !dup; i++)
        dup = s_map_find (&mp, ob, ops, ob[i], ops[i].key, i) != SIZE_MAX;

    if ((rc = s_ready (m)))
        goto out;
    int64_t mtime = cn_now_ms ();
    /* A partial batch that is one grouped statement needs no transaction of
     * its own: the statement is atomic, and a failed condition skips its op
     * instead of undoing the others. Outside a caller's transaction that
     * saves the BEGIN and COMMIT round trips (task creations, issue 4). */
    bool one_statement = applied && n > 1 && !dup && !m->in_txn;
    for (size_t i = 1; i < n && one_statement; i++)
        one_statement = ob[i] == ob[0] && s_op_class (&ops[i]) == s_op_class (&ops[0]);
    bool own = false;
    if (final && m->in_txn)
        own = true;     /* the caller's transaction ends here: no savepoint */
    else
    if (!one_statement && (rc = s_unit_begin (m, &own)))
        goto out;
    if (n == 1 || dup) {
        /* one statement per op, in order */
        for (size_t i = 0; i < n && rc == CN_MORAY_OK; i++) {
            if (ops[i].kind == CN_MOP_PUT)
                rc = s_put_one (m, ob[i], ops[i].key, ops[i].value, ops[i].etag,
                                &prep[i], mtime, ops[i].out_etag, &ops[i].out_id);
            else
                rc = s_del_one (m, ob[i], ops[i].key, ops[i].etag, &ops[i].out_id);
            if (applied && (rc == CN_MORAY_CONFLICT || rc == CN_MORAY_NOTFOUND)) {
                /* a failed UPDATE/DELETE ... WHERE does not abort the
                 * transaction: go on with the next op */
                ops[i].out_etag[0] = 0;
                ops[i].out_id = 0;
                rc = CN_MORAY_OK;
                continue;
            }
            if (applied && rc == CN_MORAY_OK)
                applied[i] = true;
            if (rc == CN_MORAY_CONFLICT || rc == CN_MORAY_NOTFOUND || rc == CN_MORAY_EINVAL)
                bad = i;
        }
    }
    else {
        /* grouped: per bucket and class, one statement; keys are distinct so
         * the order of statements does not matter */
        for (size_t i = 0; i < n && rc == CN_MORAY_OK; i++) {
            int cls = s_op_class (&ops[i]);
            bool seen = false;
            for (size_t j = 0; j < i && !seen; j++)
                seen = ob[j] == ob[i] && s_op_class (&ops[j]) == cls;
            if (seen)
                continue;
            size_t k = 0;
            for (size_t j = i; j < n; j++)
                if (ob[j] == ob[i] && s_op_class (&ops[j]) == cls)
                    idx[k++] = j;
            rc = s_batch_group (m, ob[i], ops, prep, idx, k, cls, mtime, &mp, ob, done);
        }
        if (rc == CN_MORAY_OK && applied) {
            for (size_t i = 0; i < n; i++)
                applied[i] = done[i];
        }
        else
        if (rc == CN_MORAY_OK) {
            for (size_t i = 0; i < n && bad == SIZE_MAX; i++)
                if (!done[i])
                    bad = i;
            if (bad != SIZE_MAX) {
                rc = CN_MORAY_CONFLICT;
                if (ops[bad].kind == CN_MOP_DEL) {
                    int e = s_exists (m, ob[bad], ops[bad].key);
                    rc = e < 0 ? e : e ? CN_MORAY_CONFLICT : CN_MORAY_NOTFOUND;
                }
                if (rc == CN_MORAY_CONFLICT)
                    s_err (m, "op %zu: %s", bad, ops[bad].kind == CN_MOP_DEL
                           ? "etag mismatch" : !ops[bad].etag || *ops[bad].etag
                           ? "etag mismatch (or no such object)" : "object already exists");
                else if (rc == CN_MORAY_NOTFOUND)
                    s_err (m, "op %zu: object not found", bad);
                if (rc < 0 && rc != CN_MORAY_CONFLICT && rc != CN_MORAY_NOTFOUND)
                    bad = SIZE_MAX;
            }
        }
    }
    if (!one_statement)
        rc = s_unit_end (m, own, rc);
out:
    if (rc != CN_MORAY_OK) {
        for (size_t i = 0; i < n; i++) {
            ops[i].out_etag[0] = 0;
            ops[i].out_id = 0;
            if (applied)
                applied[i] = false;
        }
        if (failed && bad != SIZE_MAX)
            *failed = bad;
    }
    if (prep)
        for (size_t i = 0; i < n; i++)
            s_prep_fini (&prep[i]);
    free (prep);
    free (ob);
    free (done);
    free (idx);
    free (mp.slot);
    return rc;
}

int
cn_moray_batch (cn_moray_t *m, cn_mop_t *ops, size_t n, size_t *failed)
{
    return s_batch (m, ops, n, failed, NULL, false);
}

int
cn_moray_batch_final (cn_moray_t *m, cn_mop_t *ops, size_t n, size_t *failed)
{
    if (m && m->txn_lost)
        return cn_moray_commit (m);     /* reports the loss (EIO) */
    if (m && !m->in_txn) {
        s_err (m, "no transaction is open");
        return CN_MORAY_EINVAL;
    }
    if (m && n == 0)
        return cn_moray_commit (m);     /* nothing to write: the end all the same */
    int rc = s_batch (m, ops, n, failed, NULL, true);
    if (rc != CN_MORAY_OK && m && m->in_txn && !m->busy)
        cn_moray_rollback (m);          /* refused before any statement */
    return rc;
}

int
cn_moray_batch_partial (cn_moray_t *m, cn_mop_t *ops, size_t n, bool *applied)
{
    if (!applied)
        return CN_MORAY_EINVAL;
    return s_batch (m, ops, n, NULL, applied, false);
}
