/*
 * cn_liveness: the status row codec and the status table. See
 * include/cn_liveness.h and docs/sessions.md.
 *
 * The table is a chained hash (FNV-1a of the uuid) that doubles when it holds
 * more rows than buckets, guarded by one pthread read-write lock. Readers
 * (h2o thread, backends) hold the read lock for one lookup and a copy of one
 * row; the writer (the sessions actor) takes the write lock per row or per
 * chunk of rows. A rehash happens under the write lock of the put that
 * triggers it (15,000 rows: well under a millisecond).
 */
#include "cn_liveness.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cn_util.h"

const cn_mindex_t cn_status_index[] = {
    { "owner", CN_MIDX_STRING, false },
    { "status", CN_MIDX_STRING, false },
};
const size_t cn_status_nindex = sizeof cn_status_index / sizeof cn_status_index[0];

const cn_mindex_t cn_instance_index[] = {
    { "boot_id", CN_MIDX_STRING, false },
};
const size_t cn_instance_nindex = sizeof cn_instance_index / sizeof cn_instance_index[0];

/* ---- the row -------------------------------------------------------- */

static void
s_copy (char *dst, size_t cap, const char *src)
{
    snprintf (dst, cap, "%s", src ? src : "");
}

int
cn_status_row_parse (const char *json, size_t len, cn_status_row_t *out)
{
    json_error_t jerr;
    json_t *o = json_loadb (json, len, 0, &jerr);
    int rc = -1;
    cn_status_row_t r;
    memset (&r, 0, sizeof r);
    if (!json_is_object (o))
        goto done;
    const char *uuid = json_string_value (json_object_get (o, "server_uuid"));
    json_t *epoch = json_object_get (o, "epoch");
    const char *status = json_string_value (json_object_get (o, "status"));
    if (!uuid || !cn_uuid_normalize (uuid, r.uuid) || !json_is_integer (epoch)
        || json_integer_value (epoch) < 0 || !status)
        goto done;
    r.epoch = (uint64_t) json_integer_value (epoch);
    r.running = strcmp (status, "running") == 0;
    const char *owner = json_string_value (json_object_get (o, "owner"));
    const char *boot = json_string_value (json_object_get (o, "owner_boot"));
    s_copy (r.owner, sizeof r.owner, owner);
    s_copy (r.owner_boot, sizeof r.owner_boot, boot);
    s_copy (r.agent_boot, sizeof r.agent_boot,
            json_string_value (json_object_get (o, "agent_boot")));
    (void) cn_iso8601_to_ms (json_string_value (json_object_get (o, "last_heartbeat")),
                        &r.last_heartbeat_ms);
    (void) cn_iso8601_to_ms (json_string_value (json_object_get (o, "since")), &r.since_ms);
    *out = r;
    rc = 0;
done:
    json_decref (o);
    return rc;
}

/* A JSON string (quoted, escaped as jansson would: '"', '\\' and the
 * control characters; UTF-8 passes through) or null for "". */
static void
s_json_str (char **p, const char *v)
{
    char *o = *p;
    if (!v[0]) {
        memcpy (o, "null", 4);
        *p = o + 4;
        return;
    }
    *o++ = '"';
    for (const unsigned char *c = (const unsigned char *) v; *c; c++) {
        if (*c == '"' || *c == '\\') {
            *o++ = '\\';
            *o++ = (char) *c;
        }
        else
        if (*c < 0x20) {
            static const char esc[] = "btn\0fr";     /* \b \t \n - \f \r */
            if (*c >= 8 && *c <= 13 && *c != 11) {
                *o++ = '\\';
                *o++ = esc[*c - 8];
            }
            else
                o += sprintf (o, "\\u%04X", *c);
        }
        else
            *o++ = (char) *c;
    }
    *o++ = '"';
    *p = o;
}

static void
s_json_lit (char **p, const char *lit)
{
    size_t n = strlen (lit);
    memcpy (*p, lit, n);
    *p += n;
}

/* Written by hand: the flush formats every owned row each flush_ms (15,000
 * rows at a time), where json_pack + json_dumps were a quarter of the
 * sessions actor's CPU (docs/benchmarks.md, "Fifth round"). The text is the
 * same jansson wrote (JSON_COMPACT, keys in this order); test_liveness
 * compares the two. */
char *
cn_status_row_format (const cn_status_row_t *r)
{
    char hb[32], since[32];
    /* every string field at most 6 bytes per input byte (\u00XX), plus keys */
    size_t cap = 256 + 6 * (sizeof r->uuid + sizeof r->owner + sizeof r->owner_boot
                            + sizeof r->agent_boot + sizeof hb + sizeof since);
    char *text = malloc (cap), *p = text;
    if (!text)
        abort ();
    s_json_lit (&p, "{\"server_uuid\":");
    s_json_str (&p, r->uuid);
    s_json_lit (&p, ",\"owner\":");
    s_json_str (&p, r->owner);
    s_json_lit (&p, ",\"owner_boot\":");
    s_json_str (&p, r->owner_boot);
    s_json_lit (&p, ",\"agent_boot\":");
    s_json_str (&p, r->agent_boot);
    p += sprintf (p, ",\"epoch\":%" PRIu64, r->epoch);
    s_json_lit (&p, r->running ? ",\"status\":\"running\"" : ",\"status\":\"unknown\"");
    s_json_lit (&p, ",\"last_heartbeat\":");
    s_json_str (&p, r->last_heartbeat_ms > 0 ? cn_iso8601 (r->last_heartbeat_ms, hb, sizeof hb) : "");
    s_json_lit (&p, ",\"since\":");
    s_json_str (&p, cn_iso8601 (r->since_ms, since, sizeof since));
    *p++ = '}';
    *p = 0;
    return text;
}

char *
cn_status_row_message (const cn_status_row_t *r, char *buf, size_t len)
{
    snprintf (buf, len, "%s %s %s %" PRIu64 " %" PRId64, r->uuid,
              r->running ? "running" : "unknown", r->owner[0] ? r->owner : "-",
              r->epoch, r->version);
    return buf;
}

int
cn_status_message_parse (const char *msg, cn_status_row_t *out)
{
    char uuid[40], status[16], owner[80];
    unsigned long long epoch = 0;
    long long version = 0;
    int n = msg ? sscanf (msg, "%39s %15s %79s %llu %lld", uuid, status, owner, &epoch,
                          &version) : 0;
    cn_status_row_t r;
    memset (&r, 0, sizeof r);
    if (n < 4 || !cn_uuid_normalize (uuid, r.uuid))
        return -1;
    if (strcmp (status, "running") == 0)
        r.running = true;
    else if (strcmp (status, "unknown") != 0)
        return -1;
    if (strcmp (owner, "-") != 0) {
        if (strlen (owner) >= sizeof r.owner)
            return -1;
        s_copy (r.owner, sizeof r.owner, owner);
    }
    r.epoch = epoch;
    r.version = n == 5 ? version : 0;
    *out = r;
    return 0;
}

/* ---- the table ------------------------------------------------------ */

typedef struct node {
    struct node *next;
    cn_status_row_t row;
} node_t;

typedef struct {
    cn_owner_t who;
    int64_t ms;
} vouch_t;

/* The same owner incarnation (name and boot id)? */
static bool
s_same_owner (const char *owner, const char *boot, const char *owner2, const char *boot2)
{
    return strcmp (owner, owner2) == 0 && strcmp (boot, boot2) == 0;
}

struct cn_liveness {
    pthread_rwlock_t lock;
    vouch_t vouch[CN_LIVENESS_VOUCH_MAX];   /* owners seen alive, and when */
    size_t nvouch;
    node_t **buckets;
    size_t nbuckets;          /* power of two */
    size_t count;
    size_t running;
    uint64_t owners_gen;      /* bumped when a row's owner, boot or running changes */
    atomic_bool loaded;
};

static size_t
s_hash (const char *uuid)
{
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < 36 && uuid[i]; i++) {
        h ^= (unsigned char) uuid[i];
        h *= 1099511628211ULL;
    }
    return (size_t) h;
}

cn_liveness_t *
cn_liveness_new (void)
{
    cn_liveness_t *t = calloc (1, sizeof *t);
    if (!t)
        abort ();
    t->nbuckets = 1024;
    t->buckets = calloc (t->nbuckets, sizeof *t->buckets);
    if (!t->buckets)
        abort ();
    pthread_rwlock_init (&t->lock, NULL);
    return t;
}

void
cn_liveness_destroy (cn_liveness_t **p)
{
    if (!p || !*p)
        return;
    cn_liveness_t *t = *p;
    for (size_t i = 0; i < t->nbuckets; i++) {
        node_t *n = t->buckets[i];
        while (n) {
            node_t *next = n->next;
            free (n);
            n = next;
        }
    }
    free (t->buckets);
    pthread_rwlock_destroy (&t->lock);
    free (t);
    *p = NULL;
}

static node_t *
s_find (const cn_liveness_t *t, const char *uuid)
{
    for (node_t *n = t->buckets[s_hash (uuid) & (t->nbuckets - 1)]; n; n = n->next)
        if (memcmp (n->row.uuid, uuid, 36) == 0)
            return n;
    return NULL;
}

static void
s_grow (cn_liveness_t *t)
{
    size_t nb = t->nbuckets * 2;
    node_t **b = calloc (nb, sizeof *b);
    if (!b)
        return;                 /* keep the longer chains */
    for (size_t i = 0; i < t->nbuckets; i++) {
        node_t *n = t->buckets[i];
        while (n) {
            node_t *next = n->next;
            size_t k = s_hash (n->row.uuid) & (nb - 1);
            n->next = b[k];
            b[k] = n;
            n = next;
        }
    }
    free (t->buckets);
    t->buckets = b;
    t->nbuckets = nb;
}

/* Under the write lock. */
static bool
s_put (cn_liveness_t *t, const cn_status_row_t *r)
{
    node_t *n = s_find (t, r->uuid);
    if (n) {
        if (r->version <= n->row.version)
            return false;
        if (n->row.running)
            t->running--;
        if (n->row.running != r->running
            || !s_same_owner (n->row.owner, n->row.owner_boot, r->owner, r->owner_boot))
            t->owners_gen++;
        n->row = *r;
        if (r->running)
            t->running++;
        return true;
    }
    n = malloc (sizeof *n);
    if (!n)
        abort ();
    n->row = *r;
    t->owners_gen++;
    size_t k = s_hash (r->uuid) & (t->nbuckets - 1);
    n->next = t->buckets[k];
    t->buckets[k] = n;
    t->count++;
    if (r->running)
        t->running++;
    if (t->count > t->nbuckets)
        s_grow (t);
    return true;
}

bool
cn_liveness_put (cn_liveness_t *t, const cn_status_row_t *r)
{
    pthread_rwlock_wrlock (&t->lock);
    bool ok = s_put (t, r);
    pthread_rwlock_unlock (&t->lock);
    return ok;
}

size_t
cn_liveness_put_many (cn_liveness_t *t, const cn_status_row_t *rows, size_t n)
{
    size_t applied = 0;
    for (size_t i = 0; i < n; i += CN_LIVENESS_CHUNK) {
        size_t end = i + CN_LIVENESS_CHUNK < n ? i + CN_LIVENESS_CHUNK : n;
        pthread_rwlock_wrlock (&t->lock);
        for (size_t k = i; k < end; k++)
            applied += s_put (t, &rows[k]);
        pthread_rwlock_unlock (&t->lock);
    }
    return applied;
}

void
cn_liveness_del (cn_liveness_t *t, const char *uuid)
{
    pthread_rwlock_wrlock (&t->lock);
    node_t **pp = &t->buckets[s_hash (uuid) & (t->nbuckets - 1)];
    while (*pp && memcmp ((*pp)->row.uuid, uuid, 36) != 0)
        pp = &(*pp)->next;
    if (*pp) {
        node_t *n = *pp;
        *pp = n->next;
        if (n->row.running)
            t->running--;
        t->count--;
        t->owners_gen++;
        free (n);
    }
    pthread_rwlock_unlock (&t->lock);
}

/* The vouch for (owner, boot), or NULL. Under the lock. */
static const vouch_t *
s_vouch_find (const cn_liveness_t *t, const char *owner, const char *owner_boot)
{
    for (size_t i = 0; i < t->nvouch; i++)
        if (s_same_owner (t->vouch[i].who.owner, t->vouch[i].who.owner_boot, owner, owner_boot))
            return &t->vouch[i];
    return NULL;
}

/* uuid's row into *out; seen: with its owner's vouch applied */
static bool
s_get (const cn_liveness_t *ct, const char *uuid, cn_status_row_t *out, bool seen)
{
    if (!ct || !uuid)
        return false;
    cn_liveness_t *t = (cn_liveness_t *) ct;
    pthread_rwlock_rdlock (&t->lock);
    node_t *n = s_find (t, uuid);
    if (n) {
        *out = n->row;
        if (seen && out->running && out->owner[0]) {
            const vouch_t *v = s_vouch_find (t, out->owner, out->owner_boot);
            if (v && v->ms > out->last_heartbeat_ms)
                out->last_heartbeat_ms = v->ms;
        }
    }
    pthread_rwlock_unlock (&t->lock);
    return n != NULL;
}

bool
cn_liveness_get (const cn_liveness_t *t, const char *uuid, cn_status_row_t *out)
{
    return s_get (t, uuid, out, false);
}

bool
cn_liveness_get_seen (const cn_liveness_t *t, const char *uuid, cn_status_row_t *out)
{
    return s_get (t, uuid, out, true);
}

void
cn_liveness_vouch (cn_liveness_t *t, const char *owner, const char *owner_boot, int64_t ms)
{
    if (!owner || !owner[0] || !owner_boot)
        return;
    pthread_rwlock_wrlock (&t->lock);
    vouch_t *v = (vouch_t *) s_vouch_find (t, owner, owner_boot);
    if (!v) {
        if (t->nvouch < CN_LIVENESS_VOUCH_MAX)
            v = &t->vouch[t->nvouch++];
        else {
            /* full: the one seen longest ago goes (a dead incarnation) */
            v = &t->vouch[0];
            for (size_t i = 1; i < t->nvouch; i++)
                if (t->vouch[i].ms < v->ms)
                    v = &t->vouch[i];
        }
        snprintf (v->who.owner, sizeof v->who.owner, "%s", owner);
        snprintf (v->who.owner_boot, sizeof v->who.owner_boot, "%s", owner_boot);
        v->ms = 0;
    }
    if (ms > v->ms)
        v->ms = ms;
    pthread_rwlock_unlock (&t->lock);
}

int64_t
cn_liveness_vouched (const cn_liveness_t *ct, const char *owner, const char *owner_boot)
{
    if (!ct || !owner || !owner_boot)
        return 0;
    cn_liveness_t *t = (cn_liveness_t *) ct;
    pthread_rwlock_rdlock (&t->lock);
    const vouch_t *v = s_vouch_find (t, owner, owner_boot);
    int64_t ms = v ? v->ms : 0;
    pthread_rwlock_unlock (&t->lock);
    return ms;
}

int64_t
cn_liveness_version (const cn_liveness_t *ct, const char *uuid)
{
    if (!ct || !uuid)
        return -1;
    cn_liveness_t *t = (cn_liveness_t *) ct;
    pthread_rwlock_rdlock (&t->lock);
    node_t *n = s_find (t, uuid);
    int64_t v = n ? n->row.version : -1;
    pthread_rwlock_unlock (&t->lock);
    return v;
}

void
cn_liveness_set_loaded (cn_liveness_t *t, bool loaded)
{
    atomic_store (&t->loaded, loaded);
}

bool
cn_liveness_loaded (const cn_liveness_t *t)
{
    return t && atomic_load (&((cn_liveness_t *) t)->loaded);
}

size_t
cn_liveness_count (const cn_liveness_t *ct, size_t *running)
{
    cn_liveness_t *t = (cn_liveness_t *) ct;
    pthread_rwlock_rdlock (&t->lock);
    size_t n = t->count;
    if (running)
        *running = t->running;
    pthread_rwlock_unlock (&t->lock);
    return n;
}

uint64_t
cn_liveness_owners_gen (const cn_liveness_t *ct)
{
    cn_liveness_t *t = (cn_liveness_t *) ct;
    pthread_rwlock_rdlock (&t->lock);
    uint64_t g = t->owners_gen;
    pthread_rwlock_unlock (&t->lock);
    return g;
}

size_t
cn_liveness_owners (const cn_liveness_t *ct, cn_owner_t **out)
{
    cn_liveness_t *t = (cn_liveness_t *) ct;
    size_t n = 0, cap = 0;
    cn_owner_t *v = cn_grow (NULL, &cap, 1, sizeof *v, 8);
    size_t last = 0;            /* rows of one owner mostly come in runs */
    pthread_rwlock_rdlock (&t->lock);
    for (size_t i = 0; i < t->nbuckets; i++)
        for (node_t *nd = t->buckets[i]; nd; nd = nd->next) {
            const cn_status_row_t *r = &nd->row;
            if (!r->running || !r->owner[0])
                continue;
            if (n && s_same_owner (v[last].owner, v[last].owner_boot, r->owner, r->owner_boot))
                continue;
            size_t j = 0;
            while (j < n && !s_same_owner (v[j].owner, v[j].owner_boot, r->owner, r->owner_boot))
                j++;
            if (j == n) {
                v = cn_grow (v, &cap, n + 1, sizeof *v, 8);
                memcpy (v[n].owner, r->owner, sizeof v[n].owner);
                memcpy (v[n].owner_boot, r->owner_boot, sizeof v[n].owner_boot);
                n++;
            }
            last = j;
        }
    pthread_rwlock_unlock (&t->lock);
    *out = v;
    return n;
}

