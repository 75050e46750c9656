/*
 * Unit tests: lib/cn_redis.c, the server cache write-through against a real
 * Redis: CNAPI_TEST_REDIS (the test runner provides one); without it every
 * test fails with a message saying so. Uses database 9 of that server and
 * FLUSHDB first.
 */
#include "cn_redis.h"
#include "cn_test.h"

#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

static char s_url[256];

static bool
s_need_redis (void)
{
    const char *u = getenv ("CNAPI_TEST_REDIS");
    if (!u || !*u) {
        printf ("  CNAPI_TEST_REDIS is not set: these tests need a Redis server\n"
                "  (e.g. CNAPI_TEST_REDIS=redis://127.0.0.1:6379)\n");
        cn_test_cur_failed++;
        return false;
    }
    /* our own database of that server */
    const char *slash = strchr (u + strlen ("redis://"), '/');
    snprintf (s_url, sizeof s_url, "%.*s/9", (int) (slash ? slash - u : (long) strlen (u)), u);
    return true;
}

static void
s_uuid (unsigned i, char out[37])
{
    snprintf (out, 37, "c0ffee00-0000-4000-8000-%012x", i);
}

/* 150 records in one call (three EVALSHA chunks): each stored with its
 * version, an older version refused, a tombstone, and one invalidation per
 * stored record that was not a read fill. */
static void
test_cache_apply_chunks (void)
{
    if (!s_need_redis ())
        return;
    cn_redis_t *r = cn_redis_new (s_url, 2000, "test");
    CHECK (r && cn_redis_ok (r));
    if (!r || !cn_redis_ok (r)) {
        cn_redis_destroy (&r);
        return;
    }
    redisReply *rep = cn_redis_cmd (r, "FLUSHDB");
    CHECK (rep && rep->type == REDIS_REPLY_STATUS);
    freeReplyObject (rep);

    /* a subscriber counts the announcements */
    redisContext *sub = NULL;
    {
        char host[128];
        int port = 0;
        CHECK (sscanf (s_url, "redis://%127[^:]:%d", host, &port) == 2);
        sub = redisConnect (host, port);
        CHECK (sub && !sub->err);
        redisReply *s = redisCommand (sub, "SUBSCRIBE %s", CN_REDIS_INVALIDATE_CHANNEL);
        CHECK (s && s->type == REDIS_REPLY_ARRAY);
        freeReplyObject (s);
    }

    enum { N = 150 };
    cn_cache_put_t puts[N];
    char uuids[N][37], json[N][64];
    for (unsigned i = 0; i < N; i++) {
        s_uuid (i, uuids[i]);
        int len = snprintf (json[i], sizeof json[i], "{\"uuid\":\"%s\",\"n\":%u}", uuids[i], i);
        puts[i] = (cn_cache_put_t) { .uuid = uuids[i], .version = 100 + i, .json = json[i],
                                     .len = (size_t) len, .fill = i % 10 == 0 };
    }
    CHECK_INT (cn_redis_cache_apply (r, puts, N), 0);
    for (unsigned i = 0; i < N; i++) {
        char *got = NULL;
        size_t len = 0;
        int64_t ver = 0;
        CHECK_INT (cn_redis_cache_get (r, uuids[i], &got, &len, &ver), 1);
        CHECK (got && len == strlen (json[i]) && memcmp (got, json[i], len) == 0);
        CHECK_INT (ver, 100 + i);
        free (got);
    }
    /* older versions change nothing; a newer tombstone replaces record 7 */
    cn_cache_put_t again[3] = {
        { .uuid = uuids[3], .version = 50, .json = "{\"old\":1}", .len = 9 },
        { .uuid = uuids[120], .version = 100 + 120, .json = "{\"same\":1}", .len = 10 },
        { .uuid = uuids[7], .version = 1000, .json = NULL, .len = 0 },
    };
    CHECK_INT (cn_redis_cache_apply (r, again, 3), 0);
    char *got = NULL;
    size_t len = 0;
    int64_t ver = 0;
    CHECK_INT (cn_redis_cache_get (r, uuids[3], &got, &len, &ver), 1);
    CHECK (got && strstr (got, "\"n\":3"));
    CHECK_INT (ver, 103);
    free (got);
    got = NULL;
    CHECK_INT (cn_redis_cache_get (r, uuids[120], &got, &len, &ver), 1);
    CHECK (got && strstr (got, "\"n\":120"));
    free (got);
    got = NULL;
    CHECK_INT (cn_redis_cache_get (r, uuids[7], &got, &len, &ver), 2);
    free (got);

    /* announced: the 135 stored records that were not fills, and the
     * tombstone; each "<uuid> <version>" */
    int announced = 0;
    bool tomb_seen = false;
    struct timeval tv = { 1, 0 };
    redisSetTimeout (sub, tv);
    for (int i = 0; i < N + 10; i++) {
        redisReply *m = NULL;
        if (redisGetReply (sub, (void **) &m) != REDIS_OK || !m)
            break;
        if (m->type == REDIS_REPLY_ARRAY && m->elements == 3) {
            announced++;
            char want[64];
            snprintf (want, sizeof want, "%s 1000", uuids[7]);
            if (strcmp (m->element[2]->str, want) == 0)
                tomb_seen = true;
        }
        freeReplyObject (m);
    }
    CHECK_INT (announced, N - N / 10 + 1);
    CHECK (tomb_seen);
    redisFree (sub);
    cn_redis_destroy (&r);
}

int
main (void)
{
    RUN (test_cache_apply_chunks);
    return cn_test_done ();
}
