/*
 * test_listcache: list views rendered once and spliced per response give the
 * bytes of a full render (lib/cn_listcache.c), whatever the status, and the
 * cache keeps within its bound, matches versions exactly and survives
 * concurrent readers.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cn_listcache.h"
#include "cn_liveness.h"
#include "cn_server.h"
#include "cn_test.h"

/* as CN_BACKEND_JSON_FLAGS (include/cn_backend.h) */
#define FLAGS (JSON_COMPACT | JSON_REAL_PRECISION (16))
#define FRESH 90
#define T0 1718000100000LL

#define U1 "0c4b6a44-5f11-4d1e-9a1e-6a1f0c2b7d01"

/* A record as the writer makes it from a sysinfo, at T0. */
static json_t *
s_record_from_sysinfo (const char *uuid)
{
    char text[1024];
    snprintf (text, sizeof text,
              "{\"UUID\":\"%s\",\"Hostname\":\"cn-\\u00e9t\\u00e9\\\"q\\\"\","
              "\"Setup\":\"true\",\"Boot Time\":\"1717990000\","
              "\"Live Image\":\"20240307T000447Z\",\"System Type\":\"SunOS\","
              "\"MiB of Memory\":\"262144\",\"CPU Total Cores\":32,"
              "\"Datacenter Name\":\"dc1\",\"Zpool\":\"zones\","
              "\"Zpool Size in GiB\":3000,"
              "\"Network Interfaces\":{\"ixgbe0\":{\"MAC Address\":\"00:0c:29:aa:bb:cc\","
              "\"ip4addr\":\"10.0.0.9\",\"NIC Names\":[\"admin\"]}}}", uuid);
    json_t *si = NULL;
    char err[256] = "";
    if (cn_sysinfo_parse (text, strlen (text), NULL, &si, err, sizeof err) != 0) {
        printf ("  sysinfo rejected: %s\n", err);
        return NULL;
    }
    cn_sysinfo_ctx_t c = { .datacenter = "dc1", .now_ms = T0, .freshness_s = FRESH };
    json_t *rec = NULL;
    CHECK_INT (cn_server_apply_sysinfo (NULL, si, &c, &rec), CN_SRV_WRITE);
    json_decref (si);
    return rec;
}

/* The bytes the list answered before the cache: a full render. */
static char *
s_uncached (const json_t *rec, int64_t now, const cn_liveness_t *live)
{
    json_t *v = cn_server_render (rec, false, 0, NULL, 0, now, FRESH, live);
    char *text = json_dumps (v, FLAGS);
    json_decref (v);
    return text;
}

/* The bytes of the cached path: the view, its status spliced in. */
static char *
s_cached (const cn_lview_t *v, int64_t now, const cn_liveness_t *live)
{
    const char *st = cn_server_status_of (&v->in, now, FRESH, live, NULL);
    char *out = malloc (v->len + strlen (st) + CN_LVIEW_SPLICE_EXTRA);
    size_t n = cn_lview_splice (v, st, out);
    CHECK_INT (n, strlen (out));
    return out;
}

/* Both paths for rec at every kind of status: fresh, stale, rebooting, the
 * status table saying running and not running. */
static void
s_same_bytes (json_t *rec, const char *what)
{
    cn_lview_t *v = cn_lview_new (rec, "k", "abcd0123", 7, FLAGS);
    CHECK (v != NULL);
    if (!v)
        return;
    CHECK (strstr (v->text, "\"status\"") == NULL);
    cn_liveness_t *live = cn_liveness_new ();
    const char *uuid = json_string_value (json_object_get (rec, "uuid"));
    int64_t times[] = { T0 + 1000, T0 + FRESH * 1000 + 1 };
    for (int with_row = 0; with_row < 3; with_row++) {
        if (with_row && uuid) {
            cn_status_row_t r;
            memset (&r, 0, sizeof r);
            snprintf (r.uuid, sizeof r.uuid, "%s", uuid);
            r.running = with_row == 1;
            r.last_heartbeat_ms = T0 + 500;
            r.version = with_row;
            CHECK (cn_liveness_put (live, &r));
        }
        for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
            char *a = s_uncached (rec, times[i], live);
            char *b = s_cached (v, times[i], live);
            if (!a || !b || strcmp (a, b) != 0)
                printf ("  %s (row %d, t %zu):\n    uncached %s\n    cached   %s\n",
                        what, with_row, i, a ? a : "(null)", b ? b : "(null)");
            CHECK (a && b && strcmp (a, b) == 0);
            free (a);
            free (b);
        }
    }
    cn_liveness_destroy (&live);
    cn_lview_release (&v);
}

static void
test_splice_same_bytes (void)
{
    json_t *rec = s_record_from_sysinfo (U1);
    CHECK (rec != NULL);
    if (!rec)
        return;
    s_same_bytes (rec, "new record");

    /* what operators and agents add, and what the list view leaves out */
    json_t *r2 = json_deep_copy (rec);
    json_object_set_new (r2, "overprovision_ratios", json_string ("cpu=4&ram=1.5"));
    json_object_set_new (r2, "reservation_ratio", json_real (0.15));
    json_object_set_new (r2, "traits", json_pack ("{s:b,s:s}", "ssd", 1, "rack", "r\u00e9/1"));
    json_object_set_new (r2, "comments", json_string ("tab\there \"quoted\" \\ /"));
    json_object_set_new (r2, "vms", json_pack ("{s:{s:s}}", "vm1", "state", "running"));
    json_object_set_new (r2, "agents", json_pack ("[{s:s}]", "name", "cn-agent"));
    json_object_set_new (r2, "last_heartbeat", json_string ("2024-06-10T06:15:00.000Z"));
    json_object_set_new (r2, "vms_destroyed", json_pack ("{s:i}", "vm0", 3));
    json_object_set_new (r2, "sysinfo", json_pack ("{s:s}", "UUID", U1));
    s_same_bytes (r2, "record with operator fields");

    json_object_set_new (r2, "transitional_status", json_string ("rebooting"));
    s_same_bytes (r2, "rebooting");
    json_object_set_new (r2, "overprovision_ratios", json_object ());
    json_object_del (r2, "last_sysinfo");
    s_same_bytes (r2, "no last_sysinfo");

    /* a record with nothing the view keeps */
    json_t *bare = json_pack ("{s:i,s:{}}", "sysinfo_ms", 5, "sysinfo");
    s_same_bytes (bare, "bare record");
    json_decref (bare);

    /* a record with a member named status: not cacheable (its place is not
     * the end), the caller renders it whole */
    json_t *r3 = json_deep_copy (rec);
    json_t *r4 = json_object ();
    json_object_set_new (r4, "status", json_string ("bogus"));
    json_object_update (r4, r3);
    CHECK (cn_lview_new (r4, "k", "e", 1, FLAGS) == NULL);
    /* not an object, no key, a key too long */
    json_t *arr = json_array ();
    CHECK (cn_lview_new (arr, "k", "e", 1, FLAGS) == NULL);
    CHECK (cn_lview_new (rec, "", "e", 1, FLAGS) == NULL);
    char longkey[CN_LVIEW_KEY_MAX + 2];
    memset (longkey, 'a', sizeof longkey - 1);
    longkey[sizeof longkey - 1] = 0;
    CHECK (cn_lview_new (rec, longkey, "e", 1, FLAGS) == NULL);
    longkey[CN_LVIEW_KEY_MAX] = 0;
    cn_lview_t *v = cn_lview_new (rec, longkey, "e", 1, FLAGS);
    CHECK (v != NULL);
    cn_lview_release (&v);
    CHECK (v == NULL);
    cn_lview_release (&v);
    cn_lview_release (NULL);
    json_decref (arr);
    json_decref (r4);
    json_decref (r3);
    json_decref (r2);
    json_decref (rec);
}

static cn_lview_t *
s_view (const char *key, const char *etag, int64_t version, int pad)
{
    json_t *rec = json_pack ("{s:s,s:s}", "uuid", key, "comments", "");
    if (pad > 0) {
        char *s = malloc ((size_t) pad + 1);
        memset (s, 'x', (size_t) pad);
        s[pad] = 0;
        json_object_set_new (rec, "comments", json_string (s));
        free (s);
    }
    cn_lview_t *v = cn_lview_new (rec, key, etag, version, FLAGS);
    json_decref (rec);
    CHECK (v != NULL);
    return v;
}

static void
test_cache_versions (void)
{
    cn_listcache_t *c = cn_listcache_new (1 << 20);
    CHECK (cn_listcache_get (c, "a", "e1", 1) == NULL);
    cn_lview_t *v = s_view ("a", "e1", 1, 0);
    cn_listcache_put (c, v);
    cn_lview_t *g = cn_listcache_get (c, "a", "e1", 1);
    CHECK (g == v);
    cn_lview_release (&g);
    /* another etag or version of the key is not a match */
    CHECK (cn_listcache_get (c, "a", "e2", 1) == NULL);
    CHECK (cn_listcache_get (c, "a", "e1", 2) == NULL);
    CHECK (cn_listcache_get (c, "b", "e1", 1) == NULL);
    /* a newer version replaces; an older one does not */
    cn_lview_t *v2 = s_view ("a", "e2", 2, 0);
    cn_listcache_put (c, v2);
    CHECK (cn_listcache_get (c, "a", "e1", 1) == NULL);
    cn_listcache_put (c, v);
    g = cn_listcache_get (c, "a", "e2", 2);
    CHECK (g == v2);
    cn_lview_release (&g);
    /* the replaced view is still the caller's */
    CHECK_STR (v->etag, "e1");
    cn_listcache_stats_t st;
    cn_listcache_stats (c, &st);
    CHECK_INT (st.entries, 1);
    CHECK_INT (st.hits, 2);
    CHECK_INT (st.misses, 5);
    CHECK_INT (st.puts, 2);
    cn_lview_release (&v);
    cn_lview_release (&v2);
    cn_listcache_destroy (&c);
    CHECK (c == NULL);
    cn_listcache_destroy (&c);
}

static void
test_cache_bound (void)
{
    /* what one entry costs; then a bound that holds 10 */
    cn_listcache_t *c = cn_listcache_new (1 << 20);
    cn_lview_t *held = s_view ("k0", "e", 1, 900);
    cn_listcache_put (c, held);
    cn_listcache_stats_t st;
    cn_listcache_stats (c, &st);
    size_t cost = st.bytes, bound = cost * 10 + cost / 2;
    CHECK (cost > 900 && cost < 1300);
    cn_lview_release (&held);
    cn_listcache_destroy (&c);
    c = cn_listcache_new (bound);
    for (int i = 0; i < 10; i++) {
        char k[8];
        snprintf (k, sizeof k, "k%d", i);
        cn_lview_t *v = s_view (k, "e", 1, 900);
        cn_listcache_put (c, v);
        if (i == 0)
            held = v;               /* a reader keeps k0's view */
        else
            cn_lview_release (&v);
    }
    cn_listcache_stats (c, &st);
    CHECK_INT (st.entries, 10);
    CHECK (st.bytes <= bound);
    /* k1 used: k0 is now the least recently used, then k2 */
    cn_lview_t *g = cn_listcache_get (c, "k1", "e", 1);
    CHECK (g != NULL);
    cn_lview_release (&g);
    cn_lview_t *v = s_view ("k10", "e", 1, 900);
    cn_listcache_put (c, v);
    cn_lview_release (&v);
    v = s_view ("k11", "e", 1, 900);
    cn_listcache_put (c, v);
    cn_lview_release (&v);
    cn_listcache_stats (c, &st);
    CHECK (st.bytes <= bound);
    CHECK_INT (st.entries, 10);
    CHECK_INT (st.evictions, 2);
    CHECK (cn_listcache_get (c, "k0", "e", 1) == NULL);
    CHECK (cn_listcache_get (c, "k2", "e", 1) == NULL);
    g = cn_listcache_get (c, "k1", "e", 1);
    CHECK (g != NULL);
    cn_lview_release (&g);
    /* the evicted view a reader held is still whole */
    CHECK_STR (held->key, "k0");
    CHECK (held->text[held->len - 1] == '}');
    cn_lview_release (&held);
    /* larger than the whole bound: not kept */
    v = s_view ("big", "e", 1, (int) bound);
    cn_listcache_put (c, v);
    CHECK (cn_listcache_get (c, "big", "e", 1) == NULL);
    cn_lview_release (&v);
    cn_listcache_destroy (&c);

    /* 0: nothing is kept */
    c = cn_listcache_new (0);
    v = s_view ("a", "e", 1, 0);
    cn_listcache_put (c, v);
    CHECK (cn_listcache_get (c, "a", "e", 1) == NULL);
    cn_lview_release (&v);
    cn_listcache_destroy (&c);
}

static void
test_cache_grows (void)
{
    cn_listcache_t *c = cn_listcache_new ((size_t) 64 << 20);
    enum { N = 5000 };
    for (int i = 0; i < N; i++) {
        char k[16];
        snprintf (k, sizeof k, "g%d", i);
        cn_lview_t *v = s_view (k, "e", i, 0);
        cn_listcache_put (c, v);
        cn_lview_release (&v);
    }
    int found = 0;
    for (int i = 0; i < N; i++) {
        char k[16];
        snprintf (k, sizeof k, "g%d", i);
        cn_lview_t *v = cn_listcache_get (c, k, "e", i);
        found += v != NULL && strcmp (v->key, k) == 0;
        cn_lview_release (&v);
    }
    CHECK_INT (found, N);
    cn_listcache_stats_t st;
    cn_listcache_stats (c, &st);
    CHECK_INT (st.entries, N);
    CHECK_INT (st.evictions, 0);
    cn_listcache_destroy (&c);
}

/* Two threads filling and reading the same keys of a cache that holds
 * about half of them (run under ASan in CI: no use after free). */
typedef struct {
    cn_listcache_t *c;
    int seed;
    int hits;
} s_worker_t;

static void *
s_worker (void *arg)
{
    s_worker_t *w = arg;
    unsigned r = (unsigned) w->seed;
    for (int i = 0; i < 20000; i++) {
        r = r * 1103515245u + 12345u;
        char k[16];
        snprintf (k, sizeof k, "w%u", (r >> 8) % 200);
        int64_t version = (r >> 20) % 3;
        cn_lview_t *v = cn_listcache_get (w->c, k, "e", version);
        if (!v) {
            v = s_view (k, "e", version, 100);
            cn_listcache_put (w->c, v);
        }
        else
            w->hits++;
        if (strcmp (v->key, k) != 0 || v->version != version || v->text[v->len - 1] != '}')
            w->hits = -1000000;
        cn_lview_release (&v);
    }
    return NULL;
}

static void
test_cache_threads (void)
{
    cn_listcache_t *c = cn_listcache_new (100 * 300);
    s_worker_t w[2] = { { c, 1, 0 }, { c, 2, 0 } };
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        CHECK_INT (pthread_create (&t[i], NULL, s_worker, &w[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join (t[i], NULL);
    CHECK (w[0].hits > 0 && w[1].hits > 0);
    cn_listcache_stats_t st;
    cn_listcache_stats (c, &st);
    CHECK (st.bytes <= 100 * 300);
    CHECK_INT (st.hits + st.misses, 40000);
    cn_listcache_destroy (&c);
}

int
main (void)
{
    RUN (test_splice_same_bytes);
    RUN (test_cache_versions);
    RUN (test_cache_bound);
    RUN (test_cache_grows);
    RUN (test_cache_threads);
    return cn_test_done ();
}
