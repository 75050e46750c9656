/* Unit tests: lib/cn_liveness.c (status rows, the status table) and the
 * session-aware status in lib/cn_server.c. */
#include "cn_liveness.h"
#include "cn_server.h"
#include "cn_test.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "cn_util.h"

#define U1 "930896af-bf8c-48d4-885c-6573a94b1853"
#define U2 "0ce1f2a4-9b5d-4d0e-9a3e-1c2b3d4e5f60"

static cn_status_row_t
s_row (const char *uuid, bool running, const char *owner, uint64_t epoch, int64_t version)
{
    cn_status_row_t r;
    memset (&r, 0, sizeof r);
    snprintf (r.uuid, sizeof r.uuid, "%s", uuid);
    r.running = running;
    snprintf (r.owner, sizeof r.owner, "%s", owner ? owner : "");
    if (owner)
        snprintf (r.owner_boot, sizeof r.owner_boot, "%s", U2);
    r.epoch = epoch;
    r.last_heartbeat_ms = 1795000000123LL;
    r.since_ms = 1795000000000LL;
    r.version = version;
    return r;
}

/* What jansson writes for the row (the format's text before it was written
 * by hand): the stored rows must not change. */
static char *
s_jansson_text (const cn_status_row_t *r)
{
    char hb[32], since[32];
    json_t *o = json_pack ("{s:s,s:s?,s:s?,s:s?,s:I,s:s,s:s?,s:s}",
                           "server_uuid", r->uuid,
                           "owner", r->owner[0] ? r->owner : NULL,
                           "owner_boot", r->owner_boot[0] ? r->owner_boot : NULL,
                           "agent_boot", r->agent_boot[0] ? r->agent_boot : NULL,
                           "epoch", (json_int_t) r->epoch,
                           "status", r->running ? "running" : "unknown",
                           "last_heartbeat", r->last_heartbeat_ms > 0
                               ? cn_iso8601 (r->last_heartbeat_ms, hb, sizeof hb) : NULL,
                           "since", cn_iso8601 (r->since_ms, since, sizeof since));
    char *text = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    return text;
}

static void
test_row_format_as_jansson (void)
{
    cn_status_row_t rows[4];
    rows[0] = s_row (U1, true, "cnapi-1", 7, 0);
    snprintf (rows[0].agent_boot, sizeof rows[0].agent_boot, "%s", U2);
    rows[1] = s_row (U1, false, NULL, 0, 0);
    rows[1].last_heartbeat_ms = 0;
    rows[2] = s_row (U2, true, "we\"ird\\na\tme\x01\x1f/\xc3\xa9\b\f\n\r\v", 18446744073709ULL, 3);
    rows[3] = s_row (U2, true, "x", 1, 0);
    rows[3].since_ms = 0;
    for (size_t i = 0; i < 4; i++) {
        char *mine = cn_status_row_format (&rows[i]), *theirs = s_jansson_text (&rows[i]);
        CHECK_STR (mine, theirs);
        cn_status_row_t back;
        CHECK_INT (cn_status_row_parse (mine, strlen (mine), &back), 0);
        CHECK_STR (back.owner, rows[i].owner);
        free (mine);
        free (theirs);
    }
}

static void
test_row_codec (void)
{
    cn_status_row_t r = s_row (U1, true, "cnapi-1", 7, 0), back;
    char *text = cn_status_row_format (&r);
    CHECK (strstr (text, "\"status\":\"running\"") != NULL);
    CHECK (strstr (text, "\"last_heartbeat\":\"2026-11-18T") != NULL);
    CHECK_INT (cn_status_row_parse (text, strlen (text), &back), 0);
    CHECK_STR (back.uuid, U1);
    CHECK (back.running);
    CHECK_STR (back.owner, "cnapi-1");
    CHECK_STR (back.owner_boot, U2);
    CHECK_INT (back.epoch, 7);
    CHECK_INT (back.last_heartbeat_ms, r.last_heartbeat_ms);
    CHECK_INT (back.since_ms, r.since_ms);
    free (text);

    r = s_row (U1, false, NULL, 8, 0);
    r.last_heartbeat_ms = 0;
    text = cn_status_row_format (&r);
    CHECK (strstr (text, "\"owner\":null") != NULL);
    CHECK (strstr (text, "\"last_heartbeat\":null") != NULL);
    CHECK_INT (cn_status_row_parse (text, strlen (text), &back), 0);
    CHECK (!back.running);
    CHECK_STR (back.owner, "");
    CHECK_INT (back.last_heartbeat_ms, 0);
    free (text);

    CHECK_INT (cn_status_row_parse ("{}", 2, &back), -1);
    CHECK_INT (cn_status_row_parse ("[1]", 3, &back), -1);
    const char *bad = "{\"server_uuid\":\"x\",\"epoch\":1,\"status\":\"running\"}";
    CHECK_INT (cn_status_row_parse (bad, strlen (bad), &back), -1);
}

static void
test_message_codec (void)
{
    cn_status_row_t r = s_row (U1, true, "cnapi-2", 12, 345), back;
    char msg[256];
    cn_status_row_message (&r, msg, sizeof msg);
    CHECK_STR (msg, U1 " running cnapi-2 12 345");
    CHECK_INT (cn_status_message_parse (msg, &back), 0);
    CHECK_STR (back.uuid, U1);
    CHECK (back.running);
    CHECK_STR (back.owner, "cnapi-2");
    CHECK_INT (back.epoch, 12);
    CHECK_INT (back.version, 345);
    CHECK_INT (cn_status_message_parse (U1 " unknown - 3", &back), 0);
    CHECK (!back.running);
    CHECK_STR (back.owner, "");
    CHECK_INT (back.version, 0);
    CHECK_INT (cn_status_message_parse (U1 " sleeping x 3", &back), -1);
    CHECK_INT (cn_status_message_parse ("nope running x 3", &back), -1);
    CHECK_INT (cn_status_message_parse (NULL, &back), -1);
}

static void
test_table_versions (void)
{
    cn_liveness_t *t = cn_liveness_new ();
    cn_status_row_t r = s_row (U1, true, "a", 1, 10), out;
    CHECK (!cn_liveness_get (t, U1, &out));
    CHECK_INT (cn_liveness_version (t, U1), -1);
    CHECK (cn_liveness_put (t, &r));
    CHECK (cn_liveness_get (t, U1, &out));
    CHECK_STR (out.owner, "a");
    CHECK_INT (cn_liveness_version (t, U1), 10);
    CHECK_INT (cn_liveness_version (t, U2), -1);
    CHECK_INT (cn_liveness_version (NULL, U1), -1);
    /* older or equal versions never move it back */
    cn_status_row_t old = s_row (U1, false, NULL, 1, 9);
    CHECK (!cn_liveness_put (t, &old));
    CHECK (!cn_liveness_put (t, &r));
    cn_liveness_get (t, U1, &out);
    CHECK (out.running);
    cn_status_row_t newer = s_row (U1, false, NULL, 1, 11);
    CHECK (cn_liveness_put (t, &newer));
    cn_liveness_get (t, U1, &out);
    CHECK (!out.running);
    size_t running = 99;
    CHECK_INT (cn_liveness_count (t, &running), 1);
    CHECK_INT (running, 0);
    cn_liveness_del (t, U1);
    CHECK (!cn_liveness_get (t, U1, &out));
    CHECK (!cn_liveness_get (NULL, U1, &out));
    cn_liveness_destroy (&t);
    CHECK (t == NULL);
}

static void
test_table_many (void)
{
    cn_liveness_t *t = cn_liveness_new ();
    size_t n = 20000;
    cn_status_row_t *rows = calloc (n, sizeof *rows);
    for (size_t i = 0; i < n; i++) {
        char u[37];
        snprintf (u, sizeof u, "%08zx-0000-4000-8000-000000000000", i);
        rows[i] = s_row (u, i % 3 != 0, "x", 1, 1);
    }
    CHECK_INT (cn_liveness_put_many (t, rows, n), n);
    size_t running = 0;
    CHECK_INT (cn_liveness_count (t, &running), n);
    CHECK_INT (running, n - (n + 2) / 3);
    /* every row is there under its own uuid */
    size_t found = 0;
    for (size_t i = 0; i < n; i++) {
        cn_status_row_t got;
        found += cn_liveness_get (t, rows[i].uuid, &got) && strcmp (got.uuid, rows[i].uuid) == 0;
    }
    CHECK_INT (found, n);
    cn_status_row_t out;
    CHECK (cn_liveness_get (t, rows[12345].uuid, &out));
    CHECK_STR (out.uuid, rows[12345].uuid);
    free (rows);
    cn_liveness_destroy (&t);
}

/* The sweep's distinct owner incarnations: running rows with an owner only,
 * each (owner, boot) pair once, whatever the order of the rows. */
static void
test_table_owners (void)
{
    cn_liveness_t *t = cn_liveness_new ();
    cn_owner_t *o = NULL;
    CHECK_INT (cn_liveness_owners (t, &o), 0);
    free (o);
    uint64_t g0 = cn_liveness_owners_gen (t);
    const char *names[] = { "a", "b", "a", "c" };
    const char *boots[] = { U1, U1, U2, U1 };
    for (size_t i = 0; i < 4000; i++) {
        char u[37];
        snprintf (u, sizeof u, "%08zx-0000-4000-8000-000000000000", i);
        size_t k = i % 4;
        /* c's rows are all unknown; every 7th row has no owner */
        cn_status_row_t r = s_row (u, k != 3, i % 7 == 0 ? NULL : names[k], 1, 1);
        if (i % 7 != 0)
            snprintf (r.owner_boot, sizeof r.owner_boot, "%s", boots[k]);
        cn_liveness_put (t, &r);
    }
    size_t n = cn_liveness_owners (t, &o);
    CHECK_INT (n, 3);
    int seen[3] = { 0 };
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < 3; k++)
            if (strcmp (o[i].owner, names[k]) == 0 && strcmp (o[i].owner_boot, boots[k]) == 0)
                seen[k]++;
    CHECK_INT (seen[0], 1);
    CHECK_INT (seen[1], 1);
    CHECK_INT (seen[2], 1);
    free (o);
    /* the generation moves with owners, boots, running and rows, not with
     * a heartbeat */
    uint64_t g1 = cn_liveness_owners_gen (t);
    CHECK (g1 != g0);
    cn_status_row_t r;
    CHECK (cn_liveness_get (t, "00000001-0000-4000-8000-000000000000", &r));
    r.version++;
    r.last_heartbeat_ms += 1000;
    CHECK (cn_liveness_put (t, &r));
    CHECK (cn_liveness_owners_gen (t) == g1);
    r.version++;
    snprintf (r.owner_boot, sizeof r.owner_boot, "%s", U2);
    CHECK (cn_liveness_put (t, &r));
    uint64_t g2 = cn_liveness_owners_gen (t);
    CHECK (g2 != g1);
    r.version++;
    r.running = !r.running;
    CHECK (cn_liveness_put (t, &r));
    CHECK (cn_liveness_owners_gen (t) != g2);
    g2 = cn_liveness_owners_gen (t);
    cn_liveness_del (t, r.uuid);
    CHECK (cn_liveness_owners_gen (t) != g2);
    cn_liveness_destroy (&t);
}

/* Readers on other threads while the writer updates: every copy a reader
 * gets is one whole row (U1's rows are written running with odd versions
 * and epochs equal to the version), never a mix of two writes. */
static cn_liveness_t *s_shared;
static atomic_int s_stop;
static atomic_long s_hits, s_torn;

static void *
s_reader (void *arg)
{
    (void) arg;
    while (!atomic_load (&s_stop)) {
        cn_status_row_t out;
        if (cn_liveness_get (s_shared, U1, &out) && strcmp (out.uuid, U1) == 0) {
            atomic_fetch_add (&s_hits, 1);
            if (!out.running || out.version % 2 != 1 || (int64_t) out.epoch != out.version)
                atomic_fetch_add (&s_torn, 1);
        }
    }
    return NULL;
}

static void
test_table_threads (void)
{
    s_shared = cn_liveness_new ();
    atomic_store (&s_stop, 0);
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create (&th[i], NULL, s_reader, NULL);
    /* at least 20000 writes, and on until the readers have read a few
     * hundred rows (a loaded machine may not schedule them at once);
     * bounded by 50 million writes */
    for (int v = 1; v <= 50000000 && (v <= 20000 || atomic_load (&s_hits) < 500); v++) {
        cn_status_row_t r = s_row (v % 2 ? U1 : U2, v % 2, "w", (uint64_t) v, v);
        cn_liveness_put (s_shared, &r);
    }
    atomic_store (&s_stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join (th[i], NULL);
    CHECK (atomic_load (&s_hits) >= 500);
    CHECK_INT (atomic_load (&s_torn), 0);
    cn_liveness_destroy (&s_shared);
}

/* the last heartbeat cn_server_status_of reports for rec, 0 for none */
static int64_t
s_last_heartbeat (const json_t *rec, const cn_liveness_t *t)
{
    cn_status_inputs_t in;
    cn_server_status_inputs (rec, &in);
    int64_t hb = 0;
    cn_server_status_of (&in, 0, 90, t, &hb);
    return hb;
}

static void
test_server_status (void)
{
    /* a setup server whose sysinfo is stale: unknown without a session row,
     * whatever the row says with one */
    json_t *rec = json_pack ("{s:s,s:I}", "uuid", U1, "last_sysinfo", (json_int_t) 1000);
    int64_t now = 1000000;
    cn_liveness_t *t = cn_liveness_new ();
    CHECK_STR (cn_server_status (rec, now, 90, t), "unknown");
    CHECK_STR (cn_server_status (rec, 1000, 90, t), "running");      /* fresh sysinfo */
    cn_status_row_t r = s_row (U1, true, "a", 1, 1);
    cn_liveness_put (t, &r);
    CHECK_STR (cn_server_status (rec, now, 90, t), "running");
    CHECK_INT (s_last_heartbeat (rec, t), r.last_heartbeat_ms);
    r = s_row (U1, false, NULL, 1, 2);
    cn_liveness_put (t, &r);
    /* a row saying unknown wins over fresh sysinfo */
    CHECK_STR (cn_server_status (rec, 1000, 90, t), "unknown");
    json_object_set_new (rec, "transitional_status", json_string ("rebooting"));
    CHECK_STR (cn_server_status (rec, now, 90, t), "rebooting");
    /* without a table: the record alone */
    CHECK_STR (cn_server_status (rec, 1000, 90, NULL), "running");
    CHECK_INT (s_last_heartbeat (rec, NULL), 1000);
    json_t *v = cn_server_render (rec, true, 0, NULL, 0, now, 90, t);
    CHECK_STR (json_string_value (json_object_get (v, "status")), "rebooting");
    CHECK_STR (json_string_value (json_object_get (v, "last_heartbeat")),
               "2026-11-18T11:06:40.123Z");
    json_decref (v);
    json_decref (rec);
    cn_liveness_destroy (&t);
}

/* An owner's vouch moves its running rows' last_heartbeat forward (as the
 * API reads it), and nothing else's. */
static void
test_vouch (void)
{
    json_t *rec = json_pack ("{s:s,s:I}", "uuid", U1, "last_sysinfo", (json_int_t) 1000);
    cn_liveness_t *t = cn_liveness_new ();
    cn_status_row_t r = s_row (U1, true, "a", 1, 1), got;
    int64_t stored = r.last_heartbeat_ms;
    cn_liveness_put (t, &r);
    CHECK_INT (cn_liveness_vouched (t, "a", U2), 0);
    /* another owner, another incarnation of the same owner: no effect */
    cn_liveness_vouch (t, "b", U2, stored + 5000);
    cn_liveness_vouch (t, "a", U1, stored + 5000);
    CHECK_INT (s_last_heartbeat (rec, t), stored);
    /* an older vouch than the stored time: the stored time */
    cn_liveness_vouch (t, "a", U2, stored - 5000);
    CHECK_INT (s_last_heartbeat (rec, t), stored);
    cn_liveness_vouch (t, "a", U2, stored + 7000);
    CHECK_INT (s_last_heartbeat (rec, t), stored + 7000);
    CHECK (cn_liveness_get_seen (t, U1, &got));
    CHECK_INT (got.last_heartbeat_ms, stored + 7000);
    /* the raw row is left as stored */
    CHECK (cn_liveness_get (t, U1, &got));
    CHECK_INT (got.last_heartbeat_ms, stored);
    /* vouches only move forward */
    cn_liveness_vouch (t, "a", U2, stored + 6000);
    CHECK_INT (cn_liveness_vouched (t, "a", U2), stored + 7000);
    /* a released row (unknown, no owner) keeps its own time */
    r = s_row (U1, false, NULL, 1, 2);
    cn_liveness_put (t, &r);
    CHECK_INT (s_last_heartbeat (rec, t), stored);
    CHECK (!cn_liveness_get_seen (t, U2, &got));
    /* full: the incarnation seen longest ago makes room */
    for (int i = 0; i < CN_LIVENESS_VOUCH_MAX + 4; i++) {
        char name[16];
        snprintf (name, sizeof name, "n%d", i);
        cn_liveness_vouch (t, name, U2, stored + 10000 + i);
    }
    CHECK_INT (cn_liveness_vouched (t, "a", U2), 0);
    CHECK_INT (cn_liveness_vouched (t, "n0", U2), 0);
    CHECK_INT (cn_liveness_vouched (t, "n3", U2), 0);
    CHECK_INT (cn_liveness_vouched (t, "n4", U2), stored + 10004);
    CHECK_INT (cn_liveness_vouched (t, "n67", U2), stored + 10067);
    json_decref (rec);
    cn_liveness_destroy (&t);
}

int
main (void)
{
    RUN (test_vouch);
    RUN (test_row_codec);
    RUN (test_row_format_as_jansson);
    RUN (test_table_owners);
    RUN (test_message_codec);
    RUN (test_table_versions);
    RUN (test_table_many);
    RUN (test_table_threads);
    RUN (test_server_status);
    return cn_test_done ();
}
