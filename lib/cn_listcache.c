/*
 * cn_listcache: rendered list views of server records (include/cn_listcache.h).
 *
 * Theory of operation
 *
 * GET /servers spends nearly all of its CPU turning stored records into list
 * views (parse, render, dump), although a record changes seldom compared to
 * how often it is listed. A view is therefore rendered once per record
 * version and kept here, keyed by the record's _key and matched against its
 * _etag and _id: the backend asks PostgreSQL for the page's keys, etags and
 * versions first, takes every view it finds here, and fetches (and renders)
 * only the others. A view never outlives its version's usefulness: a changed
 * record has a new _id, so nothing stale can match; the old view waits to be
 * replaced by the next fill for that key, or to be evicted.
 *
 * The table is a chained hash on the key with an LRU list through the same
 * nodes; one mutex guards both. Work under the mutex is a hash lookup and a
 * few pointer moves; rendering, and splicing a view's status per response,
 * happen outside it, on views that are immutable and reference counted (the
 * cache holds one reference; each reader takes its own), so an eviction
 * never pulls a view from under a reader.
 *
 * The bound is in bytes (the view's text, its struct and the node); the
 * slots grow with the entries (one per entry at most, doubling).
 */
#include "cn_listcache.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define S_SLOTS_MIN 1024

typedef struct s_node {
    struct s_node *hnext;
    struct s_node *lprev, *lnext;   /* LRU: head most recent */
    cn_lview_t *v;
    size_t cost;
} s_node_t;

struct cn_listcache {
    pthread_mutex_t mu;
    s_node_t **slots;
    size_t nslots;                  /* power of two */
    s_node_t *head, *tail;
    size_t entries, bytes, max_bytes;
    uint64_t hits, misses, puts, evictions;
};

/* ------------------------------------------------------------------ */
/* Views                                                                */

cn_lview_t *
cn_lview_new (const json_t *rec, const char *key, const char *etag, int64_t version,
              size_t json_flags)
{
    size_t klen = key ? strlen (key) : 0;
    if (!json_is_object (rec) || klen == 0 || klen > CN_LVIEW_KEY_MAX)
        return NULL;
    /* status and last_heartbeat do not matter here (status is taken out,
     * last_heartbeat is not in a list view) */
    json_t *view = cn_server_render (rec, false, 0, NULL, 0, 0, 1, NULL);
    if (!view)
        return NULL;
    /* The view must end with status (cn_server_render adds it last, unless
     * the record had a member of that name, whose place it takes): that is
     * where the splice puts it back. */
    const char *last = NULL;
    for (void *it = json_object_iter (view); it; it = json_object_iter_next (view, it))
        last = json_object_iter_key (it);
    if (!last || strcmp (last, "status") != 0) {
        json_decref (view);
        return NULL;
    }
    json_object_del (view, "status");
    char *text = json_dumps (view, json_flags);
    json_decref (view);
    size_t len = text ? strlen (text) : 0;
    if (len < 2 || text[0] != '{' || text[len - 1] != '}') {
        free (text);
        return NULL;
    }
    cn_lview_t *v = malloc (sizeof *v + len + 1);
    if (!v)
        abort ();
    atomic_init (&v->refs, 1);
    memcpy (v->key, key, klen + 1);
    snprintf (v->etag, sizeof v->etag, "%s", etag ? etag : "");
    v->version = version;
    cn_server_status_inputs (rec, &v->in);
    v->len = len;
    memcpy (v->text, text, len + 1);
    free (text);
    return v;
}

size_t
cn_lview_splice (const cn_lview_t *v, const char *status, char *out)
{
    /* {"a":1} -> {"a":1,"status":"running"}; {} -> {"status":"running"} */
    char *o = out;
    memcpy (o, v->text, v->len - 1);
    o += v->len - 1;
    if (v->len > 2)
        *o++ = ',';
    o = stpcpy (o, "\"status\":\"");
    o = stpcpy (o, status);
    *o++ = '"';
    *o++ = '}';
    *o = 0;
    return (size_t) (o - out);
}

static cn_lview_t *
s_ref (cn_lview_t *v)
{
    atomic_fetch_add_explicit (&v->refs, 1, memory_order_relaxed);
    return v;
}

void
cn_lview_release (cn_lview_t **p)
{
    if (!p || !*p)
        return;
    cn_lview_t *v = *p;
    *p = NULL;
    if (atomic_fetch_sub_explicit (&v->refs, 1, memory_order_acq_rel) == 1)
        free (v);
}

/* ------------------------------------------------------------------ */
/* The table                                                            */

static uint64_t
s_hash (const char *key)
{
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *s = (const unsigned char *) key; *s; s++)
        h = (h ^ *s) * 1099511628211ULL;
    return h ^ (h >> 31);
}

cn_listcache_t *
cn_listcache_new (size_t max_bytes)
{
    cn_listcache_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    pthread_mutex_init (&c->mu, NULL);
    c->max_bytes = max_bytes;
    c->nslots = S_SLOTS_MIN;
    c->slots = calloc (c->nslots, sizeof *c->slots);
    if (!c->slots)
        abort ();
    return c;
}

void
cn_listcache_destroy (cn_listcache_t **p)
{
    if (!p || !*p)
        return;
    cn_listcache_t *c = *p;
    for (s_node_t *n = c->head, *next; n; n = next) {
        next = n->lnext;
        cn_lview_release (&n->v);
        free (n);
    }
    free (c->slots);
    pthread_mutex_destroy (&c->mu);
    free (c);
    *p = NULL;
}

static s_node_t **
s_slot (cn_listcache_t *c, const char *key)
{
    s_node_t **pp = &c->slots[s_hash (key) & (c->nslots - 1)];
    while (*pp && strcmp ((*pp)->v->key, key) != 0)
        pp = &(*pp)->hnext;
    return pp;
}

static void
s_lru_unlink (cn_listcache_t *c, s_node_t *n)
{
    if (n->lprev)
        n->lprev->lnext = n->lnext;
    else
        c->head = n->lnext;
    if (n->lnext)
        n->lnext->lprev = n->lprev;
    else
        c->tail = n->lprev;
    n->lprev = n->lnext = NULL;
}

static void
s_lru_front (cn_listcache_t *c, s_node_t *n)
{
    n->lprev = NULL;
    n->lnext = c->head;
    if (c->head)
        c->head->lprev = n;
    c->head = n;
    if (!c->tail)
        c->tail = n;
}

/* Take n (found at *pp) out of the table and free it. */
static void
s_remove (cn_listcache_t *c, s_node_t **pp)
{
    s_node_t *n = *pp;
    *pp = n->hnext;
    s_lru_unlink (c, n);
    c->entries--;
    c->bytes -= n->cost;
    cn_lview_release (&n->v);
    free (n);
}

static void
s_grow (cn_listcache_t *c)
{
    size_t nslots = c->nslots * 2;
    s_node_t **slots = calloc (nslots, sizeof *slots);
    if (!slots)
        return;                     /* longer chains, still correct */
    for (size_t i = 0; i < c->nslots; i++)
        for (s_node_t *n = c->slots[i], *next; n; n = next) {
            next = n->hnext;
            s_node_t **head = &slots[s_hash (n->v->key) & (nslots - 1)];
            n->hnext = *head;
            *head = n;
        }
    free (c->slots);
    c->slots = slots;
    c->nslots = nslots;
}

cn_lview_t *
cn_listcache_get (cn_listcache_t *c, const char *key, const char *etag, int64_t version)
{
    cn_lview_t *v = NULL;
    pthread_mutex_lock (&c->mu);
    s_node_t *n = *s_slot (c, key);
    if (n && n->v->version == version && strcmp (n->v->etag, etag) == 0) {
        v = s_ref (n->v);
        s_lru_unlink (c, n);
        s_lru_front (c, n);
        c->hits++;
    }
    else
        c->misses++;
    pthread_mutex_unlock (&c->mu);
    return v;
}

void
cn_listcache_put (cn_listcache_t *c, cn_lview_t *v)
{
    size_t cost = sizeof (s_node_t) + sizeof *v + v->len + 1;
    pthread_mutex_lock (&c->mu);
    if (cost > c->max_bytes) {
        pthread_mutex_unlock (&c->mu);
        return;
    }
    s_node_t **pp = s_slot (c, v->key);
    if (*pp) {
        if ((*pp)->v->version > v->version) {
            pthread_mutex_unlock (&c->mu);
            return;                 /* a newer fill came first */
        }
        s_remove (c, pp);
    }
    s_node_t *n = calloc (1, sizeof *n);
    if (!n)
        abort ();
    n->v = s_ref (v);
    n->cost = cost;
    n->hnext = *pp;
    *pp = n;
    s_lru_front (c, n);
    c->entries++;
    c->bytes += cost;
    c->puts++;
    while (c->bytes > c->max_bytes && c->tail) {
        s_remove (c, s_slot (c, c->tail->v->key));
        c->evictions++;
    }
    if (c->entries > c->nslots)
        s_grow (c);
    pthread_mutex_unlock (&c->mu);
}

void
cn_listcache_stats (cn_listcache_t *c, cn_listcache_stats_t *out)
{
    pthread_mutex_lock (&c->mu);
    *out = (cn_listcache_stats_t) {
        .entries = c->entries, .bytes = c->bytes, .max_bytes = c->max_bytes,
        .hits = c->hits, .misses = c->misses, .puts = c->puts, .evictions = c->evictions,
    };
    pthread_mutex_unlock (&c->mu);
}
