/* Unit tests: lib/cn_actor.c (the writer shards' client side) */
#include "cn_actor.h"
#include "cn_config.h"
#include "cn_test.h"

#include <stdlib.h>

static void
s_uuid (unsigned i, char out[37])
{
    uint64_t x = 0x9E3779B97F4A7C15ULL * (i + 1);
    snprintf (out, 37, "%08x-%04x-4%03x-8%03x-%012llx", (unsigned) (x >> 32),
              (unsigned) (x >> 16) & 0xffff, (unsigned) x & 0xfff, (unsigned) (x >> 20) & 0xfff,
              (unsigned long long) (x * 31) & 0xffffffffffffULL);
}

static void
test_shard_of_uuid (void)
{
    /* one shard (or none): always 0 */
    CHECK_INT (cn_writer_shard ("a1a10000-0000-4000-8000-000000000001", 1), 0);
    CHECK_INT (cn_writer_shard (NULL, 4), 0);
    /* the same server in any case maps to the same shard */
    for (int shards = 2; shards <= CN_WRITER_MAX_SHARDS; shards++) {
        int a = cn_writer_shard ("ABCDEF00-1111-4222-8333-444455556666", shards);
        int b = cn_writer_shard ("abcdef00-1111-4222-8333-444455556666", shards);
        CHECK_INT (a, b);
        CHECK (a >= 0 && a < shards);
    }
    /* a spread: every shard gets its share of 10,000 servers (within 20%) */
    for (int shards = 2; shards <= 16; shards *= 2) {
        int count[16] = { 0 };
        for (unsigned i = 0; i < 10000; i++) {
            char u[37];
            s_uuid (i, u);
            count[cn_writer_shard (u, shards)]++;
        }
        int fair = 10000 / shards;
        for (int k = 0; k < shards; k++)
            CHECK (count[k] > fair * 8 / 10 && count[k] < fair * 12 / 10);
    }
}

/* Two fake shards bound where cnapid's writers bind: every request reaches
 * the shard of its uuid, in order, and the answers come back without the
 * routing frame. */
static void
test_client_routes_by_uuid (void)
{
    zsock_t *w[2];
    for (int k = 0; k < 2; k++) {
        w[k] = zsock_new (ZMQ_ROUTER);
        CHECK (w[k] && zsock_bind (w[k], CN_WRITER_FMT, k) == 0);
    }
    char err[160];
    zsock_t *c = cn_writer_client (2, 0, 0, err, sizeof err);
    CHECK (c != NULL);
    if (!c)
        return;
    int sent[2] = { 0 };
    for (unsigned i = 0; i < 200; i++) {
        char u[37];
        s_uuid (i, u);
        zframe_t *f = zframe_from (u);
        CHECK_INT (cn_writer_send (c, 2, u, &f, true), 0);
        CHECK (f == NULL);
        sent[cn_writer_shard (u, 2)]++;
    }
    CHECK (sent[0] > 0 && sent[1] > 0);
    zsock_set_rcvtimeo (w[0], 2000);
    zsock_set_rcvtimeo (w[1], 2000);
    for (int k = 0; k < 2; k++)
        for (int n = 0; n < sent[k]; n++) {
            zmsg_t *m = zmsg_recv (w[k]);
            CHECK (m && zmsg_size (m) == 2);
            if (!m)
                break;
            zframe_t *id = zmsg_pop (m);
            char *u = zmsg_popstr (m);
            CHECK (u && cn_writer_shard (u, 2) == k);
            /* answer: the client's identity, then the payload */
            zframe_send (&id, w[k], ZFRAME_MORE);
            zstr_send (w[k], u);
            free (u);
            zmsg_destroy (&m);
        }
    zsock_set_rcvtimeo (c, 2000);
    int got = 0;
    for (int n = 0; n < 200; n++) {
        zframe_t *f = cn_writer_recv (c, false);
        if (!f)
            break;
        CHECK_INT (zframe_size (f), 36);
        got++;
        zframe_destroy (&f);
    }
    CHECK_INT (got, 200);
    CHECK (cn_writer_recv (c, true) == NULL);     /* nothing more waiting */
    zsock_destroy (&c);
    zsock_destroy (&w[0]);
    zsock_destroy (&w[1]);
}

/* A request to a shard the client is not connected to fails at once
 * (ROUTER_MANDATORY) instead of vanishing. */
static void
test_client_unbound_shard_fails (void)
{
    char err[160];
    zsock_t *c = cn_writer_client (1, 0, 0, err, sizeof err);
    CHECK (c != NULL);
    /* a uuid of shard 1 of 2, sent through a one-shard client's socket */
    char u[37];
    unsigned i = 0;
    do
        s_uuid (i++, u);
    while (cn_writer_shard (u, 2) != 1 && i < 1000);
    zframe_t *f = zframe_from (u);
    CHECK_INT (cn_writer_send (c, 2, u, &f, true), -1);
    CHECK (f == NULL);
    zsock_destroy (&c);
}

static void
test_config_shards (void)
{
    char err[256];
    cn_config_t *c = cn_config_load (NULL, err, sizeof err);
    CHECK (c && c->writer_shards == 2);
    cn_config_destroy (&c);
    setenv ("CNAPI_WRITER_SHARDS", "17", 1);
    c = cn_config_load (NULL, err, sizeof err);
    CHECK (c == NULL);
    CHECK (strstr (err, "writer.shards") != NULL);
    cn_config_destroy (&c);
    setenv ("CNAPI_WRITER_SHARDS", "1", 1);
    c = cn_config_load (NULL, err, sizeof err);
    CHECK (c && c->writer_shards == 1);
    cn_config_destroy (&c);
    unsetenv ("CNAPI_WRITER_SHARDS");
}

int
main (void)
{
    zsys_init ();
    RUN (test_shard_of_uuid);
    RUN (test_client_routes_by_uuid);
    RUN (test_client_unbound_shard_fails);
    RUN (test_config_shards);
    zsys_shutdown ();
    return cn_test_done ();
}
