/*
 * cn_gateway: the HTTP gateway actor (include/cn_gateway.h).
 *
 * Theory of operation
 *
 * Three kinds of thread take part:
 *
 *   the actor thread   a zloop on the pipe, the control socket and the Redis
 *                      invalidation subscription. START builds everything;
 *                      $TERM takes it down.
 *   the h2o thread     h2o's evloop: accepts, parses, routes, answers. It
 *                      owns every h2o object and the PUSH socket to the
 *                      backends, and never waits on anything but its own
 *                      sockets.
 *   backend actors     (cn_backend) do the blocking work: store, cache,
 *                      writer. The gateway makes the list-view cache they
 *                      share (lib/cn_listcache.c, GET /servers rows) before
 *                      it starts them and frees it after they are gone.
 *
 * A request that needs the store becomes one msgpack frame (proto/backend.md)
 * pushed with ZMQ_DONTWAIT to CN_BACKEND_ENDPOINT; a full queue answers 503
 * at once. The answer comes back as a cn_backend_reply_t through h2o's
 * multithread queue (the only safe way into h2o's loop from another thread:
 * it wakes the loop through a pipe; ZeroMQ descriptors cannot be polled by
 * h2o, whose sockets read their own descriptors).
 *
 * Clients may go away before their answer: each waiting request has an entry
 * in a table keyed by a 64-bit id, allocated in the request's pool with a
 * dispose callback that takes it out of the table. A reply whose id is no
 * longer there is dropped. A timer answers 503 if no reply comes in time.
 *
 * Near cache (GET /servers/:uuid). A thread hand-off costs ~45 us, so the hot
 * read is answered inside the h2o thread from a bounded LRU of
 * uuid -> {full view without "status", version, status inputs}; the status is
 * computed per response (it depends on the time). Entries are filled from
 * backend replies and invalidated by messages on the Redis channel
 * cnapi:invalidate ("<uuid> <version>"), which the actor thread subscribes to
 * and forwards through a second multithread queue receiver. While that
 * subscription is down nothing can tell us about other instances' writes, so
 * the cache is flushed and bypassed. A fill is accepted only if no
 * invalidation for its uuid arrived after the fill was requested (unless the
 * fill is newer than every such invalidation): each invalidation bumps a
 * sequence number that requests remember.
 *
 * Responses h2o makes on its own (413 for a body over http_max_body, 400 for
 * a broken request) pass through a filter that turns them into our JSON
 * error form with our headers.
 */
#include "cn_gateway.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <h2o.h>
#include <h2o/http1.h>

#include "cn_actor.h"
#include "cn_backend.h"
#include "cn_config.h"
#include "cn_hub.h"
#include "cn_liveness.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_redis.h"
#include "cn_redis_sub.h"
#include "cn_server.h"
#include "cn_tasks.h"
#include "cn_ur.h"
#include "cn_util.h"
#include "cn_waitlist.h"

#define COMPONENT "gateway"
#define CT_JSON "application/json"

#define NC_MAX_ENTRIES 100000
#define NC_MAX_BYTES ((size_t) 256 * 1024 * 1024)
#define NC_TTL_MS 30000         /* safety net for a lost invalidation */
#define NC_BUCKETS 131072       /* power of two */
#define PENDING_BUCKETS 16384   /* power of two */
#define SHUTDOWN_GRACE_MS 2000

/* Where a request goes: the backends, or one of the services the gateway
 * starts (each a zactor taking a cn_backend_args_t, with a PULL connected to
 * its endpoint; fn NULL: not in this build, the route answers 501). */
typedef struct {
    const char *name;
    const char *endpoint;
    zactor_fn *fn;
} gw_service_t;

enum { SVC_BACKEND, SVC_TASKS, SVC_UR, SVC_WAITLIST, SVC_COUNT };

static const gw_service_t s_services[SVC_COUNT] = {
    [SVC_BACKEND] = { "backend", CN_BACKEND_ENDPOINT, NULL },   /* started apart */
    [SVC_TASKS] = { "tasks", CN_TASKS_ENDPOINT, cn_tasks_actor },
    [SVC_UR] = { "ur", CN_UR_ENDPOINT, cn_ur_actor },
    [SVC_WAITLIST] = { "waitlist", CN_WAITLIST_ENDPOINT, cn_waitlist_actor },
};

typedef struct gw gw_t;

/* A request waiting for a backend reply; lives in the request's pool. */
typedef struct pending {
    struct pending *next;       /* hash chain */
    gw_t *gw;
    h2o_req_t *req;
    uint64_t id;
    h2o_iovec_t req_id;
    uint64_t start_ms;          /* loop time */
    int64_t start_us;
    h2o_timeout_entry_t timeout;
    bool in_table;
    bool fill;                  /* near-cache fill requested */
    bool write;                 /* a write: invalidate uuid when it succeeds */
    uint64_t seq;               /* invalidation sequence at request time */
    char uuid[37];              /* normalised :server_uuid, "" if none */
} pending_t;

/* A near-cache entry; view NULL = a marker that only remembers an
 * invalidation. */
typedef struct nc_entry {
    struct nc_entry *hnext;
    struct nc_entry *lprev, *lnext;   /* LRU, head = most recent */
    char uuid[37];
    int64_t version;
    int64_t min_version;        /* newest invalidation version seen */
    uint64_t inval_seq;         /* seq of the newest invalidation */
    uint64_t filled_ms;
    char *view;                 /* h2o shared memory: each response in flight
                                 * holds a reference from its pool */
    size_t view_len;
    cn_status_inputs_t status_in;
} nc_entry_t;

/* Invalidation traffic from the actor thread to the h2o thread. */
enum { INV_ONE, INV_ALL, INV_UP, INV_DOWN };
typedef struct {
    h2o_multithread_message_t super;
    int kind;
    char uuid[37];
    int64_t version;
} inval_msg_t;

/* An accepted connection (to count them and to close them at shutdown). */
typedef struct conn {
    struct conn *prev, *next;
    gw_t *gw;
    h2o_socket_t *sock;
} conn_t;

typedef struct {
    h2o_handler_t super;
    gw_t *gw;
} gw_handler_t;

typedef struct {
    h2o_filter_t super;
    gw_t *gw;
} gw_filter_t;

struct gw {
    const cn_config_t *cfg;
    zsock_t *pipe;
    zsock_t *ctl;
    zloop_t *loop;
    bool started;
    char listen[128];

    /* h2o (built by the actor thread in START, then the h2o thread's) */
    h2o_globalconf_t gconf;
    h2o_context_t ctx;
    h2o_accept_ctx_t accept_ctx;
    h2o_evloop_t *evloop;
    h2o_socket_t *listener;
    bool h2o_ready;
    h2o_multithread_receiver_t reply_rx;
    h2o_multithread_receiver_t inval_rx;
    bool rx_registered;
    h2o_timeout_t req_timeout;
    bool timeout_ready;
    pthread_t thread;
    bool thread_running;
    atomic_bool stop;
    zsock_t *push;
    void *push_handle;

    /* the other services (s_services; index SVC_BACKEND unused) */
    zsock_t *svc_push[SVC_COUNT];
    void *svc_push_handle[SVC_COUNT];
    zactor_t *svc_actor[SVC_COUNT];
    cn_backend_args_t svc_args[SVC_COUNT];
    h2o_timeout_t wait_timeout;

    /* backends */
    zactor_t **backends;
    cn_backend_args_t *bargs;
    int nbackends;

    /* agent sessions (cn_hub: upgraded here, then in the hub's thread) and
     * the status table */
    cn_hub_t *hub;
    cn_liveness_t *live;
    cn_listcache_t *lcache;     /* the backends' GET /servers rows (shared) */

    /* h2o thread only */
    pending_t *ptable[PENDING_BUCKETS];
    uint64_t next_id;
    size_t npending;
    conn_t conns;               /* list head */
    nc_entry_t **nc_table;
    nc_entry_t nc_lru;          /* list head */
    size_t nc_count, nc_bytes;
    bool nc_enabled;
    uint64_t nc_seq, nc_min_fill_seq, nc_evicted_seq;

    /* counters: written by the h2o thread, read by the actor thread */
    atomic_uint_fast64_t n_requests, n_2xx, n_4xx, n_5xx, n_conns, n_in_flight;
    atomic_uint_fast64_t n_hits, n_misses, n_busy, n_timeouts, n_fills, n_invals;
    atomic_bool sub_up_flag;

    /* invalidation subscription (actor thread) */
    cn_redis_sub_t *sub;
    int sub_timer;
};

static h2o_generator_t s_generator = { NULL, NULL };

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */

static const char *
s_reason (int status)
{
    switch (status) {
        case 200: return "OK";
        case 201: return "Created";
        case 202: return "Accepted";
        case 204: return "No Content";
        case 400: return "Bad Request";
        case 404: return "Not Found";
        case 405: return "Method Not Allowed";
        case 409: return "Conflict";
        case 413: return "Request Entity Too Large";
        case 415: return "Unsupported Media Type";
        case 500: return "Internal Server Error";
        case 503: return "Service Unavailable";
        case 504: return "Gateway Timeout";
        default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
    }
}

static bool
s_is_method (const h2o_req_t *req, const char *m, size_t len)
{
    return h2o_memis (req->method.base, req->method.len, m, len);
}

/* A random (v4) UUID without a system call per request: xoshiro256** per
 * thread, seeded from the kernel once (cn_uuid_new reads getrandom each
 * time, which shows on the hot path). Request ids need uniqueness, not
 * secrecy. */
static __thread uint64_t s_rng[4];
static __thread bool s_rng_seeded;

static inline uint64_t
s_rotl (uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t
s_rand64 (void)
{
    if (!s_rng_seeded) {
        char seed[37];
        for (int i = 0; i < 4; i++) {
            cn_uuid_new (seed);
            uint64_t h = 1469598103934665603ULL;
            for (int k = 0; k < 36; k++)
                h = (h ^ (unsigned char) seed[k]) * 1099511628211ULL;
            s_rng[i] = h ^ ((uint64_t) cn_mono_us () << (i * 7));
        }
        s_rng_seeded = true;
    }
    uint64_t *r = s_rng;
    uint64_t result = s_rotl (r[1] * 5, 7) * 9;
    uint64_t t = r[1] << 17;
    r[2] ^= r[0];
    r[3] ^= r[1];
    r[1] ^= r[2];
    r[0] ^= r[3];
    r[2] ^= t;
    r[3] = s_rotl (r[3], 45);
    return result;
}

static void
s_fast_uuid (char out[37])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    uint64_t a = s_rand64 (), c = s_rand64 ();
    memcpy (b, &a, 8);
    memcpy (b + 8, &c, 8);
    b[6] = (unsigned char) ((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char) ((b[8] & 0x3f) | 0x80);
    char *o = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[b[i] >> 4];
        *o++ = hex[b[i] & 15];
    }
    *o = 0;
}

/* The request's id: its own x-request-id (or request-id) header when that
 * is a sane token, else a new uuid. */
static h2o_iovec_t
s_request_id (h2o_req_t *req)
{
    static const char *names[] = { "x-request-id", "request-id" };
    for (size_t n = 0; n < 2; n++) {
        ssize_t i = h2o_find_header_by_str (&req->headers, names[n], strlen (names[n]), -1);
        if (i >= 0) {
            h2o_iovec_t v = req->headers.entries[i].value;
            bool ok = v.len > 0 && v.len <= 128;
            for (size_t k = 0; ok && k < v.len; k++)
                ok = v.base[k] > 0x20 && v.base[k] < 0x7f;
            if (ok)
                return v;
        }
    }
    char *buf = h2o_mem_alloc_pool (&req->pool, 37);
    s_fast_uuid (buf);
    return h2o_iovec_init (buf, 36);
}

static void
s_count_status (gw_t *gw, int status)
{
    if (status >= 500)
        atomic_fetch_add_explicit (&gw->n_5xx, 1, memory_order_relaxed);
    else
    if (status >= 400)
        atomic_fetch_add_explicit (&gw->n_4xx, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit (&gw->n_2xx, 1, memory_order_relaxed);
}

static void
s_common_headers (gw_t *gw, h2o_req_t *req, h2o_iovec_t req_id, uint64_t start_ms)
{
    char *t = h2o_mem_alloc_pool (&req->pool, 24);
    uint64_t now = h2o_now (gw->evloop);
    uint64_t ms = now >= start_ms ? now - start_ms : 0;
    char digits[24];
    int tl = 0;
    do {
        digits[tl++] = (char) ('0' + ms % 10);
        ms /= 10;
    } while (ms && tl < 20);
    for (int i = 0; i < tl; i++)
        t[i] = digits[tl - 1 - i];
    h2o_add_header_by_str (&req->pool, &req->res.headers, H2O_STRLIT ("x-request-id"), 0,
                           NULL, req_id.base, req_id.len);
    h2o_add_header_by_str (&req->pool, &req->res.headers, H2O_STRLIT ("x-response-time"), 0,
                           NULL, t, (size_t) tl);
    h2o_add_header_by_str (&req->pool, &req->res.headers, H2O_STRLIT ("x-server-name"), 0,
                           NULL, gw->cfg->instance, strlen (gw->cfg->instance));
}

static void
s_log_request (gw_t *gw, h2o_req_t *req, h2o_iovec_t req_id, int64_t start_us, int status)
{
    int level = status >= 500 ? CN_LOG_WARN : CN_LOG_DEBUG;
    if (cn_log_level () > level)
        return;
    size_t plen = req->input.query_at != SIZE_MAX ? req->input.query_at : req->input.path.len;
    cn_log (level, COMPONENT, "request handled", "{s:s%,s:s%,s:s%,s:i,s:f}",
            "req_id", req_id.base, req_id.len,
            "method", req->method.base, req->method.len,
            "path", req->input.path.base, plen,
            "status", status,
            "latency_ms", (cn_mono_us () - start_us) / 1000.0);
}

/* Send a complete response made of bufs, which stay valid until the
 * request's pool is cleared. */
static void
s_respond_iov (gw_t *gw, h2o_req_t *req, h2o_iovec_t req_id, uint64_t start_ms,
               int64_t start_us, int status, const char *ctype, h2o_iovec_t *bufs,
               size_t nbufs)
{
    size_t len = 0;
    for (size_t i = 0; i < nbufs; i++)
        len += bufs[i].len;
    req->res.status = status;
    req->res.reason = s_reason (status);
    if (ctype && len)
        h2o_add_header (&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                        ctype, strlen (ctype));
    s_common_headers (gw, req, req_id, start_ms);
    /* 204 and 304 carry no body and no Content-Length (RFC 9110 8.6) */
    req->res.content_length = status == 204 || status == 304 ? SIZE_MAX : len;
    h2o_start_response (req, &s_generator);
    if (len == 0 || s_is_method (req, H2O_STRLIT ("HEAD")))
        h2o_send (req, NULL, 0, H2O_SEND_STATE_FINAL);
    else
        h2o_send (req, bufs, nbufs, H2O_SEND_STATE_FINAL);
    s_count_status (gw, status);
    s_log_request (gw, req, req_id, start_us, status);
}

/* Send a complete response; body is copied unless it already lives in the
 * request's pool (in_pool). */
static void
s_respond (gw_t *gw, h2o_req_t *req, h2o_iovec_t req_id, uint64_t start_ms, int64_t start_us,
           int status, const char *ctype, const char *body, size_t len, bool in_pool)
{
    h2o_iovec_t buf = h2o_iovec_init (body, len);
    if (len && !in_pool)
        buf = h2o_strdup (&req->pool, body, len);
    s_respond_iov (gw, req, req_id, start_ms, start_us, status, ctype, &buf, 1);
}

/* {"code":..,"message":..} built in the request's pool. */
static void
s_respond_error (gw_t *gw, h2o_req_t *req, h2o_iovec_t req_id, uint64_t start_ms,
                 int64_t start_us, int status, const char *code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (msg, sizeof msg, fmt, ap);
    va_end (ap);
    json_t *o = json_pack ("{s:s,s:s}", "code", code, "message", msg);
    char *text = o ? json_dumps (o, CN_BACKEND_JSON_FLAGS) : NULL;
    json_decref (o);
    if (!text)
        abort ();
    s_respond (gw, req, req_id, start_ms, start_us, status, CT_JSON, text, strlen (text), false);
    free (text);
}

/* ------------------------------------------------------------------ */
/* Pending requests                                                     */

static size_t
s_pbucket (uint64_t id)
{
    return (size_t) ((id * 0x9E3779B97F4A7C15ULL) >> 50) & (PENDING_BUCKETS - 1);
}

static void
s_pending_remove (pending_t *p)
{
    if (!p->in_table)
        return;
    gw_t *gw = p->gw;
    pending_t **pp = &gw->ptable[s_pbucket (p->id)];
    while (*pp && *pp != p)
        pp = &(*pp)->next;
    if (*pp)
        *pp = p->next;
    p->in_table = false;
    gw->npending--;
    atomic_store_explicit (&gw->n_in_flight, gw->npending, memory_order_relaxed);
    if (h2o_timeout_is_linked (&p->timeout))
        h2o_timeout_unlink (&p->timeout);
}

static pending_t *
s_pending_find (gw_t *gw, uint64_t id)
{
    for (pending_t *p = gw->ptable[s_pbucket (id)]; p; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}

/* The request's pool is going away (answered, or the client left). */
static void
s_pending_dispose (void *arg)
{
    pending_t *p = arg;
    s_pending_remove (p);
    p->req = NULL;
}

static void
s_on_timeout (h2o_timeout_entry_t *entry)
{
    pending_t *p = H2O_STRUCT_FROM_MEMBER (pending_t, timeout, entry);
    gw_t *gw = p->gw;
    h2o_req_t *req = p->req;
    s_pending_remove (p);
    atomic_fetch_add_explicit (&gw->n_timeouts, 1, memory_order_relaxed);
    if (req)
        s_respond_error (gw, req, p->req_id, p->start_ms, p->start_us, 503,
                         "ServiceUnavailable", "no answer from a backend within %llu ms",
                         (unsigned long long) gw->req_timeout.timeout);
}

/* ------------------------------------------------------------------ */
/* Near cache (h2o thread only)                                         */

static size_t
s_nc_bucket (const char *uuid)
{
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < 36; i++) {
        h ^= (unsigned char) uuid[i];
        h *= 1099511628211ULL;
    }
    return (size_t) (h & (NC_BUCKETS - 1));
}

static nc_entry_t *
s_nc_find (gw_t *gw, const char *uuid)
{
    for (nc_entry_t *e = gw->nc_table[s_nc_bucket (uuid)]; e; e = e->hnext)
        if (memcmp (e->uuid, uuid, 36) == 0)
            return e;
    return NULL;
}

static void
s_nc_lru_unlink (nc_entry_t *e)
{
    e->lprev->lnext = e->lnext;
    e->lnext->lprev = e->lprev;
}

static void
s_nc_lru_front (gw_t *gw, nc_entry_t *e)
{
    e->lnext = gw->nc_lru.lnext;
    e->lprev = &gw->nc_lru;
    gw->nc_lru.lnext->lprev = e;
    gw->nc_lru.lnext = e;
}

static void
s_nc_drop_body (gw_t *gw, nc_entry_t *e)
{
    if (e->view) {
        gw->nc_bytes -= e->view_len;
        h2o_mem_release_shared (e->view);
        e->view = NULL;
        e->view_len = 0;
    }
}

static void
s_nc_remove (gw_t *gw, nc_entry_t *e)
{
    nc_entry_t **pp = &gw->nc_table[s_nc_bucket (e->uuid)];
    while (*pp && *pp != e)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = e->hnext;
    s_nc_lru_unlink (e);
    s_nc_drop_body (gw, e);
    gw->nc_count--;
    free (e);
}

static void
s_nc_flush (gw_t *gw)
{
    while (gw->nc_lru.lnext != &gw->nc_lru)
        s_nc_remove (gw, gw->nc_lru.lnext);
    gw->nc_evicted_seq = 0;
}

static void
s_nc_trim (gw_t *gw)
{
    while ((gw->nc_count > NC_MAX_ENTRIES || gw->nc_bytes > NC_MAX_BYTES)
           && gw->nc_lru.lprev != &gw->nc_lru) {
        nc_entry_t *victim = gw->nc_lru.lprev;
        if (victim->inval_seq > gw->nc_evicted_seq)
            gw->nc_evicted_seq = victim->inval_seq;
        s_nc_remove (gw, victim);
    }
}

static nc_entry_t *
s_nc_get_or_add (gw_t *gw, const char *uuid)
{
    nc_entry_t *e = s_nc_find (gw, uuid);
    if (e)
        return e;
    e = calloc (1, sizeof *e);
    if (!e)
        abort ();
    memcpy (e->uuid, uuid, 37);
    size_t b = s_nc_bucket (uuid);
    e->hnext = gw->nc_table[b];
    gw->nc_table[b] = e;
    s_nc_lru_front (gw, e);
    gw->nc_count++;
    return e;
}

static void
s_nc_invalidate (gw_t *gw, const char *uuid, int64_t version)
{
    nc_entry_t *e = s_nc_get_or_add (gw, uuid);
    s_nc_drop_body (gw, e);
    e->inval_seq = ++gw->nc_seq;
    /* version unknown (0): no fill requested before now may be taken */
    if (version <= 0)
        e->min_version = INT64_MAX;
    else
    if (version > e->min_version)
        e->min_version = version;
    s_nc_trim (gw);
}

/* Take a backend reply's view into the cache if nothing newer is known. */
static void
s_nc_fill (gw_t *gw, pending_t *p, cn_backend_reply_t *r)
{
    if (!gw->nc_enabled || p->seq < gw->nc_min_fill_seq)
        return;
    nc_entry_t *e = s_nc_find (gw, r->uuid);
    if (e) {
        if (e->inval_seq > p->seq && r->version <= e->min_version)
            return;             /* an invalidation arrived after the request */
        if (e->view && e->version > r->version)
            return;             /* already holds something newer */
    }
    else
    if (p->seq < gw->nc_evicted_seq)
        return;                 /* we may have forgotten an invalidation */
    e = s_nc_get_or_add (gw, r->uuid);
    s_nc_drop_body (gw, e);
    e->view = h2o_mem_alloc_shared (NULL, r->view_len, NULL);
    memcpy (e->view, r->view, r->view_len);
    e->view_len = r->view_len;
    e->status_in = r->status_in;
    e->version = r->version;
    e->filled_ms = h2o_now (gw->evloop);
    gw->nc_bytes += e->view_len;
    s_nc_lru_unlink (e);
    s_nc_lru_front (gw, e);
    atomic_fetch_add_explicit (&gw->n_fills, 1, memory_order_relaxed);
    s_nc_trim (gw);
}

/* Answer from the near cache; false when it cannot. */
static bool
s_nc_answer (gw_t *gw, h2o_req_t *req, const char *uuid, h2o_iovec_t req_id,
             uint64_t start_ms, int64_t start_us)
{
    nc_entry_t *e = s_nc_find (gw, uuid);
    uint64_t now = h2o_now (gw->evloop);
    if (!e || !e->view)
        return false;
    if (now - e->filled_ms > NC_TTL_MS) {
        s_nc_drop_body (gw, e);
        return false;
    }
    /* status and last_heartbeat are per response: the session status table
     * is read here (one hash lookup under its read lock); the body is that
     * head, then the cached view itself (no copy: the request's pool holds a
     * reference until the response is written). The view is cold (any of
     * thousands of servers): its reference count and first bytes start
     * loading now, so those misses overlap the status table's. */
    __builtin_prefetch (H2O_STRUCT_FROM_MEMBER (struct st_h2o_mem_pool_shared_entry_t, bytes,
                                                e->view), 1);
    __builtin_prefetch (e->view + 64, 0);
    int64_t hb = 0;
    const char *st = cn_server_status_of (&e->status_in, cn_now_ms (),
                                          gw->cfg->sysinfo_freshness_s, gw->live, &hb);
    char *head = h2o_mem_alloc_pool (&req->pool, strlen (st) + CN_BACKEND_VIEW_HEAD_MAX);
    h2o_iovec_t bufs[2];
    bufs[0] = h2o_iovec_init (head, cn_backend_view_head (head, st, hb, e->view_len));
    size_t nbufs = 1;
    if (e->view_len > 2) {
        h2o_mem_link_shared (&req->pool, e->view);
        bufs[nbufs++] = h2o_iovec_init (e->view + 1, e->view_len - 1);
    }
    s_nc_lru_unlink (e);
    s_nc_lru_front (gw, e);
    s_respond_iov (gw, req, req_id, start_ms, start_us, 200, CT_JSON, bufs, nbufs);
    return true;
}

/* ------------------------------------------------------------------ */
/* Messages from other threads                                          */

static void
s_on_replies (h2o_multithread_receiver_t *rx, h2o_linklist_t *messages)
{
    gw_t *gw = H2O_STRUCT_FROM_MEMBER (gw_t, reply_rx, rx);
    while (!h2o_linklist_is_empty (messages)) {
        cn_backend_reply_t *r = H2O_STRUCT_FROM_MEMBER (cn_backend_reply_t, super.link,
                                                        messages->next);
        h2o_linklist_unlink (&r->super.link);
        pending_t *p = s_pending_find (gw, r->id);
        if (p) {
            h2o_req_t *req = p->req;
            s_pending_remove (p);
            if (p->fill && r->fill && r->status == 200)
                s_nc_fill (gw, p, r);
            /* Read your own writes on this instance without waiting for the
             * change to come back over the Redis channel. */
            if (p->write && p->uuid[0] && r->status < 300)
                s_nc_invalidate (gw, p->uuid, 0);
            if (req)
                s_respond (gw, req, p->req_id, p->start_ms, p->start_us, r->status,
                           r->ctype, r->body, r->len, false);
        }
        cn_backend_reply_free (&r);
    }
}

static void
s_on_invals (h2o_multithread_receiver_t *rx, h2o_linklist_t *messages)
{
    gw_t *gw = H2O_STRUCT_FROM_MEMBER (gw_t, inval_rx, rx);
    while (!h2o_linklist_is_empty (messages)) {
        inval_msg_t *m = H2O_STRUCT_FROM_MEMBER (inval_msg_t, super.link, messages->next);
        h2o_linklist_unlink (&m->super.link);
        if (m->kind == INV_ONE) {
            atomic_fetch_add_explicit (&gw->n_invals, 1, memory_order_relaxed);
            s_nc_invalidate (gw, m->uuid, m->version);
        }
        else
        if (m->kind == INV_ALL) {
            atomic_fetch_add_explicit (&gw->n_invals, 1, memory_order_relaxed);
            s_nc_flush (gw);
            gw->nc_min_fill_seq = ++gw->nc_seq;
        }
        else {
            /* Up or down, whatever happened meanwhile is unknown: forget all
             * and refuse fills requested before this point. */
            s_nc_flush (gw);
            gw->nc_min_fill_seq = ++gw->nc_seq;
            gw->nc_enabled = m->kind == INV_UP;
            CN_INFO (COMPONENT, gw->nc_enabled ? "near cache enabled" : "near cache disabled",
                     NULL);
        }
        free (m);
    }
}

/* ------------------------------------------------------------------ */
/* Requests                                                             */

enum {
    R_NONE, R_PING, R_SESSION,
    R_SERVERS, R_SERVER, R_SERVER_SYSINFO, R_SERVER_SYSINFO_REFRESH, R_SERVER_EXECUTE,
    R_SERVER_VMS, R_SERVER_VM, R_SERVER_VM_ACTION, R_SERVER_TICKETS,
    R_TASK, R_TASK_WAIT, R_TICKET, R_TICKET_WAIT, R_TICKET_RELEASE,
    R_CAPACITY, R_PLATFORMS, R_BOOT
};

typedef struct {
    int route;
    char uuid[64];              /* decoded :server_uuid (or /boot/:uuid); may be invalid */
    bool uuid_too_long;
    bool has_uuid;
    char sub[64];               /* decoded :vm / :task / :ticket; may be invalid */
    bool has_sub;
    char action[16];            /* R_SERVER_VM_ACTION: start stop reboot kill update */
} route_t;

/* Percent-decode seg into out (size n); false when it does not fit. */
static bool
s_decode_seg (h2o_iovec_t seg, char *out, size_t n)
{
    size_t o = 0;
    for (size_t k = 0; k < seg.len; k++) {
        char c = seg.base[k];
        if (c == '%' && k + 2 < seg.len && isxdigit ((unsigned char) seg.base[k + 1])
            && isxdigit ((unsigned char) seg.base[k + 2])) {
            char hex[3] = { seg.base[k + 1], seg.base[k + 2], 0 };
            c = (char) strtol (hex, NULL, 16);
            k += 2;
        }
        if (o + 1 >= n) {
            out[o] = 0;
            return false;
        }
        out[o++] = c;
    }
    out[o] = 0;
    return true;
}

#define SEG_IS(i, lit) h2o_memis (seg[i].base, seg[i].len, H2O_STRLIT (lit))

/* Split the path (before '?') into segments, ignoring empty ones. */
static void
s_route (const h2o_req_t *req, route_t *rt)
{
    const char *p = req->input.path.base;
    size_t len = req->input.query_at != SIZE_MAX ? req->input.query_at : req->input.path.len;
    h2o_iovec_t seg[6];
    int n = 0;
    size_t i = 0;
    memset (rt, 0, sizeof *rt);
    while (i < len) {
        while (i < len && p[i] == '/')
            i++;
        if (i >= len)
            break;
        size_t s = i;
        while (i < len && p[i] != '/')
            i++;
        if (n == 6)
            return;             /* too deep: no route */
        seg[n++] = h2o_iovec_init (p + s, i - s);
    }
    if (n == 0)
        return;
    int uuid_seg = -1, sub_seg = -1;
    if (n == 1 && SEG_IS (0, "ping"))
        rt->route = R_PING;
    else if (n == 2 && SEG_IS (0, "agent") && SEG_IS (1, "session"))
        rt->route = R_SESSION;
    else if (n == 1 && SEG_IS (0, "capacity"))
        rt->route = R_CAPACITY;
    else if (n == 1 && SEG_IS (0, "platforms"))
        rt->route = R_PLATFORMS;
    else if (n == 2 && SEG_IS (0, "boot")) {
        rt->route = R_BOOT;
        uuid_seg = 1;
    }
    else if (SEG_IS (0, "tasks") && (n == 2 || (n == 3 && SEG_IS (2, "wait")))) {
        rt->route = n == 2 ? R_TASK : R_TASK_WAIT;
        sub_seg = 1;
    }
    else if (SEG_IS (0, "tickets") && n >= 2 && n <= 3) {
        rt->route = n == 2 ? R_TICKET : SEG_IS (2, "wait") ? R_TICKET_WAIT
                  : SEG_IS (2, "release") ? R_TICKET_RELEASE : R_NONE;
        sub_seg = 1;
    }
    else if (SEG_IS (0, "servers")) {
        if (n == 1)
            rt->route = R_SERVERS;
        else if (n == 2)
            rt->route = R_SERVER;
        else if (n == 3 && SEG_IS (2, "sysinfo"))
            rt->route = R_SERVER_SYSINFO;
        else if (n == 3 && SEG_IS (2, "sysinfo-refresh"))
            rt->route = R_SERVER_SYSINFO_REFRESH;
        else if (n == 3 && SEG_IS (2, "execute"))
            rt->route = R_SERVER_EXECUTE;
        else if (n == 3 && SEG_IS (2, "vms"))
            rt->route = R_SERVER_VMS;
        else if (n == 3 && SEG_IS (2, "tickets"))
            rt->route = R_SERVER_TICKETS;
        else if (n == 4 && SEG_IS (2, "vms")) {
            rt->route = R_SERVER_VM;
            sub_seg = 3;
        }
        else if (n == 5 && SEG_IS (2, "vms")
                 && (SEG_IS (4, "start") || SEG_IS (4, "stop") || SEG_IS (4, "reboot")
                     || SEG_IS (4, "kill") || SEG_IS (4, "update"))) {
            rt->route = R_SERVER_VM_ACTION;
            sub_seg = 3;
            memcpy (rt->action, seg[4].base, seg[4].len);
        }
        if (rt->route != R_NONE && rt->route != R_SERVERS)
            uuid_seg = 1;
    }
    if (rt->route == R_NONE)
        return;
    if (uuid_seg >= 0) {
        rt->has_uuid = true;
        rt->uuid_too_long = !s_decode_seg (seg[uuid_seg], rt->uuid, sizeof rt->uuid);
        if (rt->uuid_too_long)
            rt->uuid[0] = 0;
    }
    if (sub_seg >= 0) {
        rt->has_sub = true;
        if (!s_decode_seg (seg[sub_seg], rt->sub, sizeof rt->sub))
            rt->sub[0] = 0;     /* too long: the service answers as for a bad id */
    }
}

#undef SEG_IS

/* The methods a route takes, for 405 and Allow (restify's order). */
static const char *
s_allowed (int route)
{
    switch (route) {
        case R_PING: return "GET";
        case R_SERVERS: return "GET";
        case R_SERVER: return "GET, POST, DELETE";
        case R_SERVER_SYSINFO: return "POST";
        case R_SERVER_SYSINFO_REFRESH: return "POST";
        case R_SERVER_EXECUTE: return "POST";
        case R_SERVER_VMS: return "POST";
        case R_SERVER_VM: return "GET, DELETE";
        case R_SERVER_VM_ACTION: return "POST";
        case R_SERVER_TICKETS: return "GET, POST, DELETE";
        case R_TASK: return "GET";
        case R_TASK_WAIT: return "GET";
        case R_TICKET: return "GET, DELETE";
        case R_TICKET_WAIT: return "GET";
        case R_TICKET_RELEASE: return "PUT";
        case R_CAPACITY: return "POST";
        case R_PLATFORMS: return "GET";
        case R_BOOT: return "GET, PUT, POST";
        default: return "";
    }
}

/* The request type for route + method, or NULL (405); *svc: who answers it. */
static const char *
s_op (const h2o_req_t *req, int route, int *svc)
{
    bool get = s_is_method (req, H2O_STRLIT ("GET"));
    bool post = s_is_method (req, H2O_STRLIT ("POST"));
    bool put = s_is_method (req, H2O_STRLIT ("PUT"));
    bool del = s_is_method (req, H2O_STRLIT ("DELETE"));
    *svc = SVC_BACKEND;
    switch (route) {
        case R_PING: return get ? "ping" : NULL;
        case R_SERVERS: return get ? "server_list" : NULL;
        case R_SERVER: return get ? "server_get" : post ? "server_update"
                              : del ? "server_delete" : NULL;
        case R_SERVER_SYSINFO: return post ? "server_sysinfo" : NULL;
        case R_CAPACITY: return post ? "capacity" : NULL;
        case R_PLATFORMS: return get ? "platforms" : NULL;
        case R_BOOT: return get ? "boot_get" : put ? "boot_set" : post ? "boot_update" : NULL;
        default: break;
    }
    *svc = SVC_TASKS;
    switch (route) {
        case R_SERVER_SYSINFO_REFRESH: return post ? "sysinfo_refresh" : NULL;
        case R_SERVER_VMS: return post ? "vm_create" : NULL;
        case R_SERVER_VM: return get ? "vm_load" : del ? "vm_destroy" : NULL;
        case R_SERVER_VM_ACTION: return post ? "vm_action" : NULL;
        case R_TASK: return get ? "task_get" : NULL;
        case R_TASK_WAIT: return get ? "task_wait" : NULL;
        default: break;
    }
    *svc = SVC_UR;
    if (route == R_SERVER_EXECUTE)
        return post ? "execute" : NULL;
    *svc = SVC_WAITLIST;
    switch (route) {
        case R_SERVER_TICKETS: return post ? "ticket_create" : get ? "ticket_list"
                                      : del ? "ticket_delete_all" : NULL;
        case R_TICKET: return get ? "ticket_get" : del ? "ticket_delete" : NULL;
        case R_TICKET_WAIT: return get ? "ticket_wait" : NULL;
        case R_TICKET_RELEASE: return put ? "ticket_release" : NULL;
        default: return NULL;
    }
}

/* Requests that may be held open for a long time (their service answers by
 * the client's timeout, at most CN_WAIT_MAX_S): the long timeout list. */
static bool
s_is_wait (const char *op)
{
    return strcmp (op, "task_wait") == 0 || strcmp (op, "ticket_wait") == 0
           || strcmp (op, "execute") == 0;
}

/* GET /agent/session (proto/session.md): a WebSocket upgrade naming its
 * server in x-server-uuid; anything else on this path is a 400. */
static void
s_on_session (gw_t *gw, h2o_req_t *req, h2o_iovec_t req_id, uint64_t start_ms,
              int64_t start_us)
{
    const char *why = NULL;
    char uuid[37] = "";
    ssize_t ui = h2o_find_header_by_str (&req->headers, H2O_STRLIT ("x-server-uuid"), -1);
    ssize_t ki = h2o_find_header_by_str (&req->headers, H2O_STRLIT ("sec-websocket-key"), -1);
    ssize_t vi = h2o_find_header_by_str (&req->headers, H2O_STRLIT ("sec-websocket-version"), -1);
    h2o_iovec_t key = ki >= 0 ? req->headers.entries[ki].value : h2o_iovec_init (NULL, 0);
    if (!s_is_method (req, H2O_STRLIT ("GET")) || !req->upgrade.base
        || !h2o_lcstris (req->upgrade.base, req->upgrade.len, H2O_STRLIT ("websocket")))
        why = "this path takes a WebSocket upgrade only (GET, Connection: upgrade, "
              "Upgrade: websocket)";
    else if (req->version != 0x101)
        why = "a WebSocket upgrade needs HTTP/1.1";
    else if (vi < 0 || !h2o_memis (req->headers.entries[vi].value.base,
                                   req->headers.entries[vi].value.len, H2O_STRLIT ("13")))
        why = "sec-websocket-version must be 13";
    else if (ki < 0)
        why = "sec-websocket-key is missing";
    else if (ui < 0)
        why = "x-server-uuid is missing";
    else {
        h2o_iovec_t v = req->headers.entries[ui].value;
        char tmp[37] = "";
        if (v.len == 36)
            memcpy (tmp, v.base, 36);
        if (!cn_uuid_normalize (tmp, uuid))
            why = "x-server-uuid is not a UUID";
    }
    if (!why && !gw->hub)
        why = "sessions are not enabled";
    if (!why && cn_hub_on_req (gw->hub, req, uuid, key, &why) == 0) {
        s_count_status (gw, 101);
        s_log_request (gw, req, req_id, start_us, 101);
        return;
    }
    s_respond_error (gw, req, req_id, start_ms, start_us, 400, "BadRequest", "%s", why);
}

static int
s_on_req (h2o_handler_t *self, h2o_req_t *req)
{
    gw_t *gw = ((gw_handler_t *) self)->gw;
    uint64_t start_ms = h2o_now (gw->evloop);
    int64_t start_us = cn_mono_us ();
    h2o_iovec_t req_id = s_request_id (req);
    atomic_fetch_add_explicit (&gw->n_requests, 1, memory_order_relaxed);

    route_t rt;
    s_route (req, &rt);
    if (rt.route == R_SESSION) {
        s_on_session (gw, req, req_id, start_ms, start_us);
        return 0;
    }
    if (rt.route == R_NONE) {
        s_respond_error (gw, req, req_id, start_ms, start_us, 404, "ResourceNotFound",
                         "%.*s does not exist", (int) req->input.path.len, req->input.path.base);
        return 0;
    }
    int svc = SVC_BACKEND;
    const char *op = s_op (req, rt.route, &svc);
    if (!op) {
        const char *allow = s_allowed (rt.route);
        h2o_add_header (&req->pool, &req->res.headers, H2O_TOKEN_ALLOW, NULL, allow, strlen (allow));
        s_respond_error (gw, req, req_id, start_ms, start_us, 405, "MethodNotAllowed",
                         "%.*s is not allowed", (int) req->method.len, req->method.base);
        return 0;
    }
    if (svc != SVC_BACKEND && !gw->svc_push_handle[svc]) {
        s_respond_error (gw, req, req_id, start_ms, start_us, 501, "NotImplemented",
                         "%s is not available on this instance (no %s service)", op,
                         s_services[svc].name);
        return 0;
    }
    bool has_query = req->input.query_at != SIZE_MAX
                     && req->input.query_at + 1 < req->input.path.len;
    bool has_body = req->entity.base != NULL && req->entity.len > 0;

    /* The hot path: a plain GET /servers/:uuid from the near cache. */
    char uuid[37];
    bool plain_get = rt.route == R_SERVER && !has_query && !has_body && !rt.uuid_too_long
                     && strcmp (op, "server_get") == 0 && cn_uuid_normalize (rt.uuid, uuid);
    if (plain_get && gw->nc_enabled) {
        if (s_nc_answer (gw, req, uuid, req_id, start_ms, start_us)) {
            atomic_fetch_add_explicit (&gw->n_hits, 1, memory_order_relaxed);
            return 0;
        }
        atomic_fetch_add_explicit (&gw->n_misses, 1, memory_order_relaxed);
    }

    bool fill = plain_get && gw->nc_enabled;
    uint64_t id = ++gw->next_id;
    ssize_t cti = h2o_find_header (&req->headers, H2O_TOKEN_CONTENT_TYPE, -1);
    uint32_t nfields = 2 + rt.has_uuid + rt.has_sub + (rt.action[0] != 0) + has_query + has_body
                       + (has_body && cti >= 0) + fill;
    cn_msgw_t w;
    cn_msgw_init (&w, op, nfields);
    cn_msgw_uint (&w, "id", id);
    cn_msgw_strn (&w, "req_id", req_id.base, req_id.len);
    if (rt.has_uuid)
        cn_msgw_str (&w, "uuid", rt.uuid_too_long ? "" : rt.uuid);
    if (rt.has_sub)
        cn_msgw_str (&w, "sub", rt.sub);
    if (rt.action[0])
        cn_msgw_str (&w, "action", rt.action);
    if (has_query)
        cn_msgw_strn (&w, "query", req->input.path.base + req->input.query_at + 1,
                      req->input.path.len - req->input.query_at - 1);
    if (has_body)
        cn_msgw_strn (&w, "body", req->entity.base, req->entity.len);
    if (has_body && cti >= 0)
        cn_msgw_strn (&w, "ctype", req->headers.entries[cti].value.base,
                      req->headers.entries[cti].value.len);
    if (fill)
        cn_msgw_bool (&w, "fill", true);
    char *data = NULL;
    size_t size = 0;
    cn_msgw_take (&w, &data, &size);
    int rc = zmq_send (svc == SVC_BACKEND ? gw->push_handle : gw->svc_push_handle[svc], data,
                       size, ZMQ_DONTWAIT);
    free (data);
    if (rc < 0) {
        atomic_fetch_add_explicit (&gw->n_busy, 1, memory_order_relaxed);
        s_respond_error (gw, req, req_id, start_ms, start_us, 503, "ServiceUnavailable",
                         "the service is busy, try again");
        return 0;
    }

    pending_t *p = h2o_mem_alloc_shared (&req->pool, sizeof *p, s_pending_dispose);
    memset (p, 0, sizeof *p);
    p->gw = gw;
    p->req = req;
    p->id = id;
    p->req_id = req_id;
    p->start_ms = start_ms;
    p->start_us = start_us;
    p->fill = fill;
    p->seq = gw->nc_seq;
    p->write = strcmp (op, "server_update") == 0 || strcmp (op, "server_delete") == 0
               || strcmp (op, "server_sysinfo") == 0;
    if (plain_get || (p->write && !rt.uuid_too_long && cn_uuid_normalize (rt.uuid, uuid)))
        memcpy (p->uuid, uuid, sizeof p->uuid);
    p->timeout.cb = s_on_timeout;
    size_t b = s_pbucket (id);
    p->next = gw->ptable[b];
    gw->ptable[b] = p;
    p->in_table = true;
    gw->npending++;
    atomic_store_explicit (&gw->n_in_flight, gw->npending, memory_order_relaxed);
    h2o_timeout_link (gw->evloop, s_is_wait (op) ? &gw->wait_timeout : &gw->req_timeout,
                      &p->timeout);
    return 0;
}

/* ------------------------------------------------------------------ */
/* The filter that dresses h2o's own error responses                    */

typedef struct {
    h2o_ostream_t super;
    h2o_iovec_t body;
} replace_ostream_t;

static void
s_replace_send (h2o_ostream_t *self, h2o_req_t *req, h2o_iovec_t *bufs, size_t bufcnt,
                h2o_send_state_t state)
{
    replace_ostream_t *r = (replace_ostream_t *) self;
    if (!h2o_send_state_is_in_progress (state)) {
        h2o_iovec_t b = r->body;
        h2o_ostream_send_next (&r->super, req, &b, b.len ? 1 : 0, state);
    }
    else
        h2o_ostream_send_next (&r->super, req, NULL, 0, state);
}

static void
s_filter_setup (h2o_filter_t *self, h2o_req_t *req, h2o_ostream_t **slot)
{
    gw_t *gw = ((gw_filter_t *) self)->gw;
    if (h2o_find_header_by_str (&req->res.headers, H2O_STRLIT ("x-request-id"), -1) < 0) {
        /* Not ours: h2o answered by itself (413, 400, ...). */
        int status = req->res.status;
        const char *code = status == 413 ? "RequestEntityTooLarge"
                           : status == 400 ? "BadRequest"
                           : status == 404 ? "ResourceNotFound"
                           : status >= 500 ? "InternalError" : "BadRequest";
        char msg[160];
        if (status == 413)
            snprintf (msg, sizeof msg, "request body is larger than %d bytes",
                      gw->cfg->http_max_body);
        else
            snprintf (msg, sizeof msg, "%s", req->res.reason ? req->res.reason : "error");
        json_t *o = json_pack ("{s:s,s:s}", "code", code, "message", msg);
        char *text = json_dumps (o, CN_BACKEND_JSON_FLAGS);
        json_decref (o);
        h2o_iovec_t body = h2o_strdup (&req->pool, text, strlen (text));
        free (text);
        ssize_t ct;
        while ((ct = h2o_find_header (&req->res.headers, H2O_TOKEN_CONTENT_TYPE, -1)) >= 0)
            h2o_delete_header (&req->res.headers, ct);
        h2o_add_header (&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                        H2O_STRLIT (CT_JSON));
        s_common_headers (gw, req, s_request_id (req), h2o_now (gw->evloop));
        req->res.content_length = body.len;
        replace_ostream_t *r = (replace_ostream_t *) h2o_add_ostream (req, sizeof *r, slot);
        r->super.do_send = s_replace_send;
        r->body = body;
        slot = &r->super.next;
        s_count_status (gw, status);
        CN_DEBUG (COMPONENT, "request refused by the HTTP layer", "{s:i}", "status", status);
    }
    h2o_setup_next_ostream (req, slot);
}

/* ------------------------------------------------------------------ */
/* Connections                                                          */

static void
s_on_conn_close (void *data)
{
    conn_t *c = data;
    c->prev->next = c->next;
    c->next->prev = c->prev;
    atomic_fetch_sub_explicit (&c->gw->n_conns, 1, memory_order_relaxed);
    free (c);
}

static void
s_on_accept (h2o_socket_t *listener, const char *err)
{
    gw_t *gw = listener->data;
    if (err)
        return;
    for (int i = 0; i < 32; i++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept (listener);
        if (!sock)
            return;
        conn_t *c = calloc (1, sizeof *c);
        if (!c)
            abort ();
        c->gw = gw;
        c->sock = sock;
        c->next = gw->conns.next;
        c->prev = &gw->conns;
        gw->conns.next->prev = c;
        gw->conns.next = c;
        sock->on_close.cb = s_on_conn_close;
        sock->on_close.data = c;
        atomic_fetch_add_explicit (&gw->n_conns, 1, memory_order_relaxed);
        h2o_accept (&gw->accept_ctx, sock);
    }
}

/* ------------------------------------------------------------------ */
/* The h2o thread                                                       */

/* h2o keeps freed socket buffers in a per-thread recycle list; give them
 * back before the thread ends so nothing is left unreachable. */
static void
s_h2o_release_thread_buffers (void)
{
    h2o_mem_recycle_t *a = &h2o_socket_buffer_prototype.allocator;
    for (int i = 0; i < 100000 && a->cnt > 0; i++)
        free (h2o_mem_alloc_recycle (a, 1));

    /* The request pools' 4 KiB chunks are recycled the same way, in a
     * static thread-local list (at most 16) that no h2o 2.2.5 API empties:
     * draw them out through a scratch pool (allocations of 1008 bytes take
     * a fresh chunk every 4) and free them. Relies on a chunk's first word
     * being its `next` link, as in h2o's lib/common/memory.c. */
    h2o_mem_pool_t pool;
    h2o_mem_init_pool (&pool);
    for (int i = 0; i < 17 * 4; i++)
        h2o_mem_alloc_pool (&pool, 1008);
    void *chunk = pool.chunks;
    while (chunk) {
        void *next = *(void **) chunk;
        free (chunk);
        chunk = next;
    }
}

static void *
s_h2o_thread (void *arg)
{
    gw_t *gw = arg;
    cn_thread_name ("gateway-h2o");
    while (!atomic_load (&gw->stop))
        h2o_evloop_run (gw->evloop, 200);

    /* Stop accepting; ask every connection to go: shutting the socket down
     * makes its next read fail, so h2o closes it through its own path.
     * Requests still waiting on a backend get their answer meanwhile
     * (the backends are stopped only after this thread). */
    if (gw->listener) {
        h2o_socket_read_stop (gw->listener);
        h2o_socket_close (gw->listener);
        gw->listener = NULL;
    }
    /* No keep-alive from here on. (Not h2o_context_request_shutdown: its
     * HTTP/2 part links a timer that h2o_context_dispose then trips on, and
     * we speak HTTP/1 only.) */
    gw->ctx.shutdown_requested = 1;
    uint64_t deadline = h2o_now (gw->evloop) + SHUTDOWN_GRACE_MS;
    /* Agents first: goaway "shutdown" and close 1001, so they reconnect to
     * another instance at once; their sockets close once the close frame is
     * out and the agent answered (the hub's own lingering close). */
    if (gw->hub)
        cn_hub_shutdown (gw->hub);
    for (conn_t *c = gw->conns.next; c != &gw->conns; c = c->next)
        shutdown (h2o_socket_get_fd (c->sock), SHUT_RD);
    while ((gw->conns.next != &gw->conns || gw->npending || (gw->hub && cn_hub_count (gw->hub)))
           && h2o_now (gw->evloop) < deadline)
        h2o_evloop_run (gw->evloop, 10);
    if (gw->hub)
        cn_hub_finish (gw->hub);
    zsock_destroy (&gw->push);
    gw->push_handle = NULL;
    for (int k = 0; k < SVC_COUNT; k++) {
        zsock_destroy (&gw->svc_push[k]);
        gw->svc_push_handle[k] = NULL;
    }
    s_h2o_release_thread_buffers ();
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Invalidation subscription (actor thread)                             */

static void
s_inval_send (gw_t *gw, int kind, const char *uuid, int64_t version)
{
    if (!gw->rx_registered)
        return;
    inval_msg_t *m = calloc (1, sizeof *m);
    if (!m)
        abort ();
    m->kind = kind;
    if (uuid)
        memcpy (m->uuid, uuid, 37);
    m->version = version;
    h2o_multithread_send_message (&gw->inval_rx, &m->super);
}

static void
s_sub_up (void *arg)
{
    gw_t *gw = arg;
    atomic_store (&gw->sub_up_flag, true);
    s_inval_send (gw, INV_UP, NULL, 0);
    CN_INFO (COMPONENT, "invalidation subscription up", "{s:s}",
             "channel", CN_REDIS_INVALIDATE_CHANNEL);
}

static void
s_sub_down (void *arg, const char *why)
{
    gw_t *gw = arg;
    atomic_store (&gw->sub_up_flag, false);
    s_inval_send (gw, INV_DOWN, NULL, 0);
    CN_WARN (COMPONENT, "invalidation subscription lost", "{s:s}", "reason", why);
}

/* "<uuid> <version>" after an applied change, "<uuid>" after a key was
 * dropped, "*" after the whole cache was dropped. */
static void
s_sub_message (void *arg, const char *s)
{
    gw_t *gw = arg;
    char raw[40], uuid[37];
    long long version = 0;
    if (strcmp (s, "*") == 0) {
        s_inval_send (gw, INV_ALL, NULL, 0);
        return;
    }
    int n = sscanf (s, "%39s %lld", raw, &version);
    if (n < 1 || !cn_uuid_normalize (raw, uuid)) {
        CN_WARN (COMPONENT, "bad invalidation message", "{s:s}", "message", s);
        return;
    }
    s_inval_send (gw, INV_ONE, uuid, n == 2 ? version : 0);
}

/* Reconnect while down; while up, make sure the connection still answers. */
static int
s_on_sub_timer (zloop_t *loop, int timer_id, void *arg)
{
    gw_t *gw = arg;
    cn_redis_sub_check (gw->sub);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Start and stop (actor thread)                                        */

static int
s_listen (gw_t *gw, char *reason, size_t rlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    memset (&ss, 0, sizeof ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *) &ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *) &ss;
    const char *addr = gw->cfg->http_address ? gw->cfg->http_address : "127.0.0.1";
    if (inet_pton (AF_INET, addr, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons ((uint16_t) gw->cfg->http_port);
        sslen = sizeof *a4;
    }
    else
    if (inet_pton (AF_INET6, addr, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons ((uint16_t) gw->cfg->http_port);
        sslen = sizeof *a6;
    }
    else {
        snprintf (reason, rlen, "bad http address %s", addr);
        return -1;
    }
    int fd = socket (ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0) {
        snprintf (reason, rlen, "socket: %s", strerror (errno));
        return -1;
    }
    if (setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0
        || bind (fd, (struct sockaddr *) &ss, sslen) != 0
        || listen (fd, SOMAXCONN) != 0) {
        snprintf (reason, rlen, "listen on %s:%d: %s", addr, gw->cfg->http_port, strerror (errno));
        close (fd);
        return -1;
    }
    snprintf (gw->listen, sizeof gw->listen, "%s:%d", addr, gw->cfg->http_port);
    return fd;
}

static void
s_drain (h2o_multithread_receiver_t *rx, bool replies)
{
    while (!h2o_linklist_is_empty (&rx->_messages)) {
        h2o_linklist_t *l = rx->_messages.next;
        h2o_linklist_unlink (l);
        if (replies) {
            cn_backend_reply_t *r = H2O_STRUCT_FROM_MEMBER (cn_backend_reply_t, super.link, l);
            cn_backend_reply_free (&r);
        }
        else
            free (H2O_STRUCT_FROM_MEMBER (inval_msg_t, super.link, l));
    }
}

static void
s_stop (gw_t *gw)
{
    /* 1. the h2o thread: stop accepting, let connections go */
    if (gw->thread_running) {
        atomic_store (&gw->stop, true);
        h2o_multithread_send_message (&gw->reply_rx, NULL);   /* wake it */
        pthread_join (gw->thread, NULL);
        gw->thread_running = false;
    }
    /* 2. the services (the tasks actor sends to the hub's mailbox: it
     * goes first), then the sessions actor and what is left of the
     * sessions (the h2o thread is gone: this thread may touch its objects
     * now) */
    for (int k = 0; k < SVC_COUNT; k++)
        zactor_destroy (&gw->svc_actor[k]);
    cn_hub_destroy (&gw->hub);
    /* the subscription */
    if (gw->sub_timer > 0) {
        zloop_timer_end (gw->loop, gw->sub_timer);
        gw->sub_timer = 0;
    }
    cn_redis_sub_destroy (&gw->sub);
    /* 3. the services and the backends (nobody sends replies after this) */
    for (int k = 0; k < SVC_COUNT; k++) {
        zactor_destroy (&gw->svc_actor[k]);
        zsock_destroy (&gw->svc_push[k]);
        gw->svc_push_handle[k] = NULL;
    }
    for (int i = 0; i < gw->nbackends; i++)
        zactor_destroy (&gw->backends[i]);
    free (gw->backends);
    gw->backends = NULL;
    free (gw->bargs);
    gw->bargs = NULL;
    gw->nbackends = 0;
    cn_listcache_destroy (&gw->lcache);
    cn_liveness_destroy (&gw->live);
    zsock_destroy (&gw->push);
    if (gw->ctl) {
        zloop_reader_end (gw->loop, gw->ctl);
        zsock_destroy (&gw->ctl);
    }
    /* 4. h2o, unless a connection outlived the grace period (then its
     * memory still points into the context: leave it be, we are exiting) */
    bool clean = gw->conns.next == &gw->conns;
    if (gw->listener) {
        h2o_socket_close (gw->listener);
        gw->listener = NULL;
    }
    if (gw->h2o_ready && clean) {
        s_nc_flush (gw);
        if (gw->timeout_ready) {
            h2o_timeout_dispose (gw->evloop, &gw->req_timeout);
            h2o_timeout_dispose (gw->evloop, &gw->wait_timeout);
            gw->timeout_ready = false;
        }
        if (gw->rx_registered) {
            s_drain (&gw->reply_rx, true);
            s_drain (&gw->inval_rx, false);
            h2o_multithread_unregister_receiver (gw->ctx.queue, &gw->reply_rx);
            h2o_multithread_unregister_receiver (gw->ctx.queue, &gw->inval_rx);
            gw->rx_registered = false;
        }
        h2o_multithread_queue_t *queue = gw->ctx.queue;
        h2o_context_dispose (&gw->ctx);
        h2o_evloop_destroy (gw->evloop);
        /* h2o 2.2.5's evloop build destroys the queue without freeing it */
        free (queue);
        s_h2o_release_thread_buffers ();
        h2o_config_dispose (&gw->gconf);
        gw->evloop = NULL;
        gw->h2o_ready = false;
    }
    else
    if (gw->h2o_ready)
        CN_WARN (COMPONENT, "connections outlived the shutdown grace period", NULL);
    gw->started = false;
}

static int s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg);

static int
s_start (gw_t *gw, char *reason, size_t rlen)
{
    if (gw->started) {
        snprintf (reason, rlen, "already started");
        return -1;
    }
    const cn_config_t *cfg = gw->cfg;
    int fd = s_listen (gw, reason, rlen);
    if (fd < 0)
        return -1;

    gw->push = zsock_new (ZMQ_PUSH);
    if (!gw->push) {
        close (fd);
        snprintf (reason, rlen, "cannot create the backend socket");
        return -1;
    }
    zsock_set_sndhwm (gw->push, 10000);
    zsock_set_linger (gw->push, 0);
    if (zsock_bind (gw->push, "%s", CN_BACKEND_ENDPOINT) != 0) {
        snprintf (reason, rlen, "bind %s: %s", CN_BACKEND_ENDPOINT, zmq_strerror (zmq_errno ()));
        close (fd);
        zsock_destroy (&gw->push);
        return -1;
    }
    gw->push_handle = zsock_resolve (gw->push);

    /* h2o */
    h2o_config_init (&gw->gconf);
    gw->gconf.server_name = h2o_iovec_init (H2O_STRLIT ("cnapi/" CNAPI_VERSION));
    gw->gconf.max_request_entity_size = cfg->http_max_body > 0 ? (size_t) cfg->http_max_body
                                                                : 1024 * 1024;
    gw->gconf.http1.upgrade_to_http2 = 0;
    h2o_hostconf_t *host = h2o_config_register_host (&gw->gconf,
                                                     h2o_iovec_init (H2O_STRLIT ("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path (host, "/", 0);
    gw_handler_t *h = (gw_handler_t *) h2o_create_handler (path, sizeof *h);
    h->super.on_req = s_on_req;
    h->gw = gw;
    gw_filter_t *f = (gw_filter_t *) h2o_create_filter (path, sizeof *f);
    f->super.on_setup_ostream = s_filter_setup;
    f->gw = gw;
    f = (gw_filter_t *) h2o_create_filter (&host->fallback_path, sizeof *f);
    f->super.on_setup_ostream = s_filter_setup;
    f->gw = gw;

    gw->evloop = h2o_evloop_create ();
    h2o_context_init (&gw->ctx, gw->evloop, &gw->gconf);
    gw->h2o_ready = true;
    h2o_multithread_register_receiver (gw->ctx.queue, &gw->reply_rx, s_on_replies);
    h2o_multithread_register_receiver (gw->ctx.queue, &gw->inval_rx, s_on_invals);
    gw->rx_registered = true;
    gw->live = cn_liveness_new ();
    uint64_t tmo = 3 * (uint64_t) cfg->pg_timeout_ms + 2 * (uint64_t) cfg->redis_timeout_ms + 5000;
    h2o_timeout_init (gw->evloop, &gw->req_timeout, tmo);
    /* waits: the service answers by the client's timeout (at most
     * CN_WAIT_MAX_S); this only catches a service that never answers */
    h2o_timeout_init (gw->evloop, &gw->wait_timeout, (uint64_t) CN_WAIT_MAX_S * 1000 + tmo);
    gw->timeout_ready = true;
    gw->accept_ctx.ctx = &gw->ctx;
    gw->accept_ctx.hosts = gw->gconf.hosts;
    gw->listener = h2o_evloop_socket_create (gw->evloop, fd, H2O_SOCKET_FLAG_DONT_READ);
    gw->listener->data = gw;
    h2o_socket_read_start (gw->listener, s_on_accept);

    /* backends */
    if (cfg->list_cache_mb > 0)
        gw->lcache = cn_listcache_new ((size_t) cfg->list_cache_mb << 20);
    int n = cfg->backend_threads > 0 ? cfg->backend_threads : 1;
    gw->backends = calloc ((size_t) n, sizeof *gw->backends);
    gw->bargs = calloc ((size_t) n, sizeof *gw->bargs);
    if (!gw->backends || !gw->bargs)
        abort ();
    for (int i = 0; i < n; i++) {
        gw->bargs[i].cfg = cfg;
        gw->bargs[i].receiver = &gw->reply_rx;
        gw->bargs[i].index = i;
        gw->bargs[i].live = gw->live;
        gw->bargs[i].lcache = gw->lcache;
        gw->backends[i] = zactor_new (cn_backend_actor, &gw->bargs[i]);
        gw->nbackends = i + 1;
        if (!gw->backends[i]) {
            snprintf (reason, rlen, "cannot start backend %d", i);
            goto fail;
        }
        zstr_send (gw->backends[i], "START");
        char *ok = zstr_recv (gw->backends[i]);
        if (!ok || !streq (ok, "OK")) {
            char *why = ok ? zstr_recv (gw->backends[i]) : NULL;
            snprintf (reason, rlen, "backend %d: %s", i, why ? why : "no answer");
            free (why);
            free (ok);
            goto fail;
        }
        free (ok);
    }

    /* the hub exists before the services (the tasks actor answers agents
     * through its mailbox); it starts after them */
    gw->hub = cn_hub_new (cfg, gw->live);

    /* the services in this build: a PUSH each (bound before the actor's
     * PULL connects), then the actor */
    for (int k = 0; k < SVC_COUNT; k++) {
        if (k == SVC_BACKEND || !s_services[k].fn)
            continue;
        gw->svc_push[k] = zsock_new (ZMQ_PUSH);
        if (!gw->svc_push[k])
            abort ();
        zsock_set_sndhwm (gw->svc_push[k], 10000);
        zsock_set_linger (gw->svc_push[k], 0);
        if (zsock_bind (gw->svc_push[k], "%s", s_services[k].endpoint) != 0) {
            snprintf (reason, rlen, "bind %s: %s", s_services[k].endpoint,
                      zmq_strerror (zmq_errno ()));
            goto fail;
        }
        gw->svc_push_handle[k] = zsock_resolve (gw->svc_push[k]);
        gw->svc_args[k] = (cn_backend_args_t) {
            .cfg = cfg, .receiver = &gw->reply_rx, .index = 0, .live = gw->live,
            .hub = gw->hub, .boot_id = cn_hub_boot_id (gw->hub),
        };
        gw->svc_actor[k] = zactor_new (s_services[k].fn, &gw->svc_args[k]);
        if (!gw->svc_actor[k]) {
            snprintf (reason, rlen, "cannot start the %s service", s_services[k].name);
            goto fail;
        }
        zstr_send (gw->svc_actor[k], "START");
        char *ok = zstr_recv (gw->svc_actor[k]);
        if (!ok || !streq (ok, "OK")) {
            char *why = ok ? zstr_recv (gw->svc_actor[k]) : NULL;
            snprintf (reason, rlen, "%s: %s", s_services[k].name, why ? why : "no answer");
            free (why);
            free (ok);
            goto fail;
        }
        free (ok);
    }

    /* agent sessions: the hub's thread takes the sockets this thread
     * upgrades; its sessions actor loads the status table now (bounded by
     * the store's timeout) */
    if (cn_hub_start (gw->hub, reason, rlen) != 0)
        goto fail;

    /* invalidations for the near cache */
    gw->sub = cn_redis_sub_new (cfg->redis_url, cfg->redis_timeout_ms, "gateway",
                                CN_REDIS_INVALIDATE_CHANNEL);
    if (!gw->sub) {
        snprintf (reason, rlen, "out of memory");
        goto fail;
    }
    cn_redis_sub_attach (gw->sub, gw->loop, s_sub_message, s_sub_up, s_sub_down, gw);
    gw->sub_timer = zloop_timer (gw->loop, 1000, 0, s_on_sub_timer, gw);
    cn_redis_sub_try (gw->sub);

    /* the h2o thread (thread creation orders everything above before it) */
    atomic_store (&gw->stop, false);
    if (pthread_create (&gw->thread, NULL, s_h2o_thread, gw) != 0) {
        snprintf (reason, rlen, "cannot start the h2o thread");
        goto fail;
    }
    gw->thread_running = true;

    gw->ctl = cn_ctl_bind ("gateway");
    if (!gw->ctl) {
        snprintf (reason, rlen, "cannot bind the control socket");
        goto fail;
    }
    zloop_reader (gw->loop, gw->ctl, s_on_ctl, gw);
    gw->started = true;
    CN_INFO (COMPONENT, "listening", "{s:s,s:i}", "address", gw->listen, "backends", n);
    return 0;

fail:
    s_stop (gw);
    return -1;
}

static void
s_status (gw_t *gw, zsock_t *dest)
{
    cn_listcache_stats_t ls;
    memset (&ls, 0, sizeof ls);
    if (gw->lcache)
        cn_listcache_stats (gw->lcache, &ls);
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 23);
    cn_msgw_str (&w, "actor", "gateway");
    cn_msgw_str (&w, "state", gw->started ? "running" : "stopped");
    cn_msgw_str (&w, "listen", gw->listen);
#define U(k, v) cn_msgw_uint (&w, k, atomic_load_explicit (&gw->v, memory_order_relaxed))
    U ("connections", n_conns);
    U ("requests", n_requests);
    U ("responses_2xx", n_2xx);
    U ("responses_4xx", n_4xx);
    U ("responses_5xx", n_5xx);
    U ("in_flight", n_in_flight);
    U ("cache_hits", n_hits);
    U ("cache_misses", n_misses);
    U ("cache_fills", n_fills);
    U ("invalidations", n_invals);
    U ("busy", n_busy);
    U ("timeouts", n_timeouts);
#undef U
    cn_msgw_bool (&w, "near_cache", atomic_load (&gw->sub_up_flag));
    cn_msgw_int (&w, "backends", gw->nbackends);
    /* the backends' list views (lib/cn_listcache.c), rows not requests */
    cn_msgw_uint (&w, "list_cache_entries", ls.entries);
    cn_msgw_uint (&w, "list_cache_bytes", ls.bytes);
    cn_msgw_uint (&w, "list_cache_max_bytes", ls.max_bytes);
    cn_msgw_uint (&w, "list_cache_hits", ls.hits);
    cn_msgw_uint (&w, "list_cache_misses", ls.misses);
    cn_msgw_uint (&w, "list_cache_evictions", ls.evictions);
    zframe_t *f = cn_msgw_frame (&w);
    zframe_send (&f, dest, 0);
}

static int
s_on_ctl (zloop_t *loop, zsock_t *sock, void *arg)
{
    gw_t *gw = arg;
    char *cmd = zstr_recv (sock);
    if (!cmd)
        return 0;
    if (streq (cmd, "STATUS"))
        s_status (gw, sock);
    else
        zstr_sendx (sock, "ERROR", "unknown command", NULL);
    free (cmd);
    return 0;
}

static int
s_on_pipe (zloop_t *loop, zsock_t *pipe, void *arg)
{
    gw_t *gw = arg;
    zmsg_t *msg = zmsg_recv (pipe);
    if (!msg)
        return -1;
    char *cmd = zmsg_popstr (msg);
    int rc = 0;
    if (cmd && streq (cmd, "$TERM"))
        rc = -1;
    else
    if (cmd && streq (cmd, "START")) {
        char reason[256] = "";
        if (s_start (gw, reason, sizeof reason) == 0)
            zstr_send (pipe, "OK");
        else {
            CN_ERROR (COMPONENT, "gateway start failed", "{s:s}", "reason", reason);
            zstr_sendx (pipe, "ERROR", reason, NULL);
        }
    }
    else
    if (cmd && streq (cmd, "STATUS"))
        s_status (gw, pipe);
    else
        CN_WARN (COMPONENT, "unknown pipe command", "{s:s?}", "command", cmd);
    free (cmd);
    zmsg_destroy (&msg);
    return rc;
}

void
cn_gateway_actor (zsock_t *pipe, void *args)
{
    gw_t *gw = calloc (1, sizeof *gw);
    if (!gw)
        abort ();
    gw->cfg = args;
    gw->pipe = pipe;
    gw->conns.next = gw->conns.prev = &gw->conns;
    gw->nc_lru.lnext = gw->nc_lru.lprev = &gw->nc_lru;
    gw->nc_table = calloc (NC_BUCKETS, sizeof *gw->nc_table);
    gw->loop = zloop_new ();
    if (!gw->nc_table || !gw->loop)
        abort ();
    zloop_set_nonstop (gw->loop, true);
    zloop_reader (gw->loop, pipe, s_on_pipe, gw);
    zsock_signal (pipe, 0);

    zloop_start (gw->loop);

    s_stop (gw);
    zloop_destroy (&gw->loop);
    free (gw->nc_table);
    free (gw);
}
