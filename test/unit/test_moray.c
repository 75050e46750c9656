/*
 * test_moray: cn_moray against a real PostgreSQL. The conninfo comes from
 * CNAPI_TEST_PG (the test runner provides a fresh database); without it
 * every test fails with a message saying so.
 *
 * A second, plain libpq connection ("admin") checks the layout with SQL and
 * plays the other party: terminates our backend, holds row locks.
 */
#include <ctype.h>
#include <inttypes.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "cn_filter.h"
#include "cn_log.h"
#include "cn_moray.h"
#include "cn_test.h"
#include "cn_util.h"

#define BA "t_moray_a"          /* the main test bucket */
#define BB "t_moray_b"          /* a second bucket for batches */
#define BC "t_moray_c"          /* index changes */

static const char *s_conninfo;
static PGconn *s_admin;

static const cn_mindex_t s_index[] = {
    { "hostname", CN_MIDX_STRING, false },
    { "setup", CN_MIDX_BOOLEAN, false },
    { "ram", CN_MIDX_NUMBER, false },
    { "serial", CN_MIDX_STRING, true },
};
#define NINDEX (sizeof s_index / sizeof s_index[0])

/* Bitwise CRC-32 (IEEE, reflected, as zlib): the independent reference. */
static uint32_t
s_crc32_ref (const char *s)
{
    uint32_t c = 0xffffffffu;
    for (; *s; s++) {
        c ^= (unsigned char) *s;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}

/* Run SQL on the admin connection; returns the first value of the first row
 * (static buffer) or NULL ("" for no rows). */
static const char *
s_sql (const char *sql, int n, const char *const *params)
{
    static char buf[4096];
    PGresult *r = PQexecParams (s_admin, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus (r);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        printf ("  admin SQL failed: %s: %s", sql, PQresultErrorMessage (r));
        PQclear (r);
        return NULL;
    }
    buf[0] = 0;
    if (st == PGRES_TUPLES_OK && PQntuples (r) > 0) {
        if (PQgetisnull (r, 0, 0))
            snprintf (buf, sizeof buf, "(null)");
        else
            snprintf (buf, sizeof buf, "%s", PQgetvalue (r, 0, 0));
    }
    PQclear (r);
    return buf;
}

static const char *
s_sql1 (const char *sql, const char *p1)
{
    const char *p[] = { p1 };
    return s_sql (sql, 1, p);
}

static void
s_drop_test_buckets (void)
{
    const char *names[] = { BA, BB, BC, "t_moray_user" };
    char q[256];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf (q, sizeof q, "DROP TABLE IF EXISTS \"%s\" CASCADE", names[i]);
        s_sql (q, 0, NULL);
        snprintf (q, sizeof q, "DROP SEQUENCE IF EXISTS \"%s_serial\"", names[i]);
        s_sql (q, 0, NULL);
    }
    if (strcmp (s_sql ("SELECT to_regclass ('buckets_config') IS NOT NULL", 0, NULL), "t") == 0)
        s_sql ("DELETE FROM buckets_config WHERE name LIKE 't\\_moray\\_%'", 0, NULL);
}

static cn_moray_t *
s_open (void)
{
    cn_moray_t *m = cn_moray_new (s_conninfo, 5000);
    if (cn_moray_put_bucket (m, BA, s_index, NINDEX) != CN_MORAY_OK)
        printf ("  put_bucket: %s\n", cn_moray_errmsg (m));
    return m;
}

/* --- tests --------------------------------------------------------------- */

static void
test_put_bucket (void)
{
    cn_moray_t *m = cn_moray_new (s_conninfo, 5000);
    CHECK (!cn_moray_connected (m));
    CHECK_INT (cn_moray_connect (m), CN_MORAY_OK);
    CHECK (cn_moray_connected (m));
    CHECK_INT (cn_moray_put_bucket (m, BA, s_index, NINDEX), CN_MORAY_OK);
    /* idempotent, also from another handle */
    CHECK_INT (cn_moray_put_bucket (m, BA, s_index, NINDEX), CN_MORAY_OK);
    cn_moray_t *m2 = cn_moray_new (s_conninfo, 5000);
    CHECK_INT (cn_moray_put_bucket (m2, BA, s_index, NINDEX), CN_MORAY_OK);
    cn_moray_destroy (&m2);
    CHECK (m2 == NULL);
    cn_moray_destroy (&m2);

    /* the buckets_config row, as Moray writes it */
    CHECK_STR (s_sql1 ("SELECT index FROM buckets_config WHERE name = $1", BA),
               "{\"hostname\":{\"type\":\"string\"},\"setup\":{\"type\":\"boolean\"},"
               "\"ram\":{\"type\":\"number\"},"
               "\"serial\":{\"type\":\"string\",\"unique\":true}}");
    CHECK_STR (s_sql1 ("SELECT pre || post FROM buckets_config WHERE name = $1", BA),
               "[][]");
    CHECK_STR (s_sql1 ("SELECT options FROM buckets_config WHERE name = $1", BA),
               "{\"version\":0}");
    CHECK_STR (s_sql1 ("SELECT count(*) FROM buckets_config WHERE name = $1 "
                       "AND mtime IS NOT NULL", BA), "1");

    /* the table's columns and types */
    CHECK_STR (s_sql1 ("SELECT string_agg (column_name || ':' || data_type, ',' "
                       "ORDER BY ordinal_position) FROM information_schema.columns "
                       "WHERE table_name = $1", BA),
               "_id:bigint,_txn_snap:integer,_key:text,_value:text,_etag:character,"
               "_mtime:bigint,_vnode:bigint,hostname:text,setup:boolean,"
               "ram:numeric,serial:text");
    CHECK_STR (s_sql1 ("SELECT character_maximum_length FROM information_schema.columns "
                       "WHERE table_name = $1 AND column_name = '_etag'", BA), "8");
    CHECK_STR (s_sql1 ("SELECT column_default FROM information_schema.columns "
                       "WHERE table_name = $1 AND column_name = '_id'", BA),
               "nextval('t_moray_a_serial'::regclass)");
    CHECK_STR (s_sql1 ("SELECT string_agg (indexname, ',' ORDER BY indexname) "
                       "FROM pg_indexes WHERE tablename = $1", BA),
               "t_moray_a__etag_idx,t_moray_a__id_idx,t_moray_a__mtime_idx,"
               "t_moray_a__vnode_idx,t_moray_a_hostname_idx,t_moray_a_pkey,"
               "t_moray_a_ram_idx,t_moray_a_serial_key,t_moray_a_setup_idx");
    CHECK_STR (s_sql1 ("SELECT indexdef FROM pg_indexes WHERE indexname = $1",
                       "t_moray_a_hostname_idx"),
               "CREATE INDEX t_moray_a_hostname_idx ON public.t_moray_a USING btree "
               "(hostname) WHERE (hostname IS NOT NULL)");

    /* values compressed with lz4 where the server has it; a table that still
     * has the default gets it at the next put_bucket */
    const char *lz4 = s_sql ("SELECT count(*) FROM pg_settings WHERE name = "
                             "'default_toast_compression' AND 'lz4' = ANY (enumvals)", 0, NULL);
    if (lz4 && strcmp (lz4, "1") == 0) {
        const char *q = "SELECT attcompression FROM pg_attribute WHERE attrelid = "
                        "to_regclass ($1) AND attname = '_value'";
        CHECK_STR (s_sql1 (q, BA), "l");
        s_sql ("ALTER TABLE " BA " ALTER COLUMN _value SET COMPRESSION pglz", 0, NULL);
        CHECK_STR (s_sql1 (q, BA), "p");
        cn_moray_t *m3 = cn_moray_new (s_conninfo, 5000);
        CHECK_INT (cn_moray_put_bucket (m3, BA, s_index, NINDEX), CN_MORAY_OK);
        cn_moray_destroy (&m3);
        CHECK_STR (s_sql1 (q, BA), "l");
    }
    else
        printf ("  (no lz4 in this PostgreSQL: compression not checked)\n");

    /* bad definitions */
    cn_mindex_t bad[] = { { "_id", CN_MIDX_STRING, false } };
    CHECK_INT (cn_moray_put_bucket (m, BC, bad, 1), CN_MORAY_EINVAL);
    bad[0].name = "moray_x";
    CHECK_INT (cn_moray_put_bucket (m, BC, bad, 1), CN_MORAY_EINVAL);
    bad[0].name = "a-b";
    CHECK_INT (cn_moray_put_bucket (m, BC, bad, 1), CN_MORAY_EINVAL);
    bad[0].name = "x";
    bad[0].type = (cn_midx_type_t) 42;
    CHECK_INT (cn_moray_put_bucket (m, BC, bad, 1), CN_MORAY_EINVAL);
    cn_mindex_t twice[] = { { "Name", CN_MIDX_STRING, false }, { "name", CN_MIDX_STRING, false } };
    CHECK_INT (cn_moray_put_bucket (m, BC, twice, 2), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put_bucket (m, "x; DROP TABLE y", NULL, 0), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put_bucket (m, "1abc", NULL, 0), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put_bucket (m, "buckets_config", NULL, 0), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put_bucket (m, "a1234567890123456789012345678901234567890123456789"
                                    "01234567890123", NULL, 0), CN_MORAY_EINVAL);
    CHECK (strlen (cn_moray_errmsg (m)) > 0);
    cn_moray_destroy (&m);
}

static int
s_count_cb (const cn_mobj_t *o, void *arg)
{
    (void) o;
    (*(int *) arg)++;
    return 0;
}

static void
test_index_change (void)
{
    int n = 0;
    cn_moray_t *m = cn_moray_new (s_conninfo, 5000);
    cn_mindex_t v1[] = { { "hostname", CN_MIDX_STRING, false },
                         { "ram", CN_MIDX_STRING, false } };
    CHECK_INT (cn_moray_put_bucket (m, BC, v1, 2), CN_MORAY_OK);
    char key[16], val[128];
    for (int i = 0; i < 1203; i++) {       /* more than one backfill chunk */
        snprintf (key, sizeof key, "k%04d", i);
        snprintf (val, sizeof val, "{\"hostname\":\"h%d\",\"ram\":%d,\"dc\":\"dc%d\","
                  "\"Flag\":%s}", i, i * 2, i % 3, i % 2 ? "true" : "false");
        if (cn_moray_put (m, BC, key, val, NULL, NULL, NULL) != CN_MORAY_OK) {
            CHECK (0);
            break;
        }
    }
    const char *before = s_sql ("SELECT max(_id) FROM " BC, 0, NULL);
    char maxid[32];
    snprintf (maxid, sizeof maxid, "%s", before ? before : "");
    /* add dc and Flag, change ram to a number, drop hostname */
    cn_mindex_t v2[] = { { "ram", CN_MIDX_NUMBER, false },
                         { "dc", CN_MIDX_STRING, false },
                         { "Flag", CN_MIDX_BOOLEAN, false } };
    CHECK_INT (cn_moray_put_bucket (m, BC, v2, 3), CN_MORAY_OK);
    CHECK_STR (s_sql1 ("SELECT string_agg (column_name || ':' || data_type, ',' "
                       "ORDER BY column_name) FROM information_schema.columns "
                       "WHERE table_name = $1 AND column_name NOT LIKE '\\_%'", BC),
               "dc:text,flag:boolean,ram:numeric");
    CHECK_STR (s_sql ("SELECT count(*) FROM " BC " WHERE dc IS NOT NULL "
                      "AND ram IS NOT NULL AND flag IS NOT NULL", 0, NULL), "1203");
    CHECK_STR (s_sql ("SELECT dc || ' ' || ram || ' ' || flag FROM " BC
                      " WHERE _key = 'k1202'", 0, NULL), "dc2 2404 false");
    /* a backfill is not a write: versions and etags stay */
    CHECK_STR (s_sql ("SELECT max(_id) FROM " BC, 0, NULL), maxid);
    CHECK_STR (s_sql ("SELECT index FROM buckets_config WHERE name = 't_moray_c'", 0, NULL),
               "{\"ram\":{\"type\":\"number\"},\"dc\":{\"type\":\"string\"},"
               "\"Flag\":{\"type\":\"boolean\"}}");
    /* finds use the new definition at once */
    CHECK_INT (cn_moray_find (m, BC, "(&(dc=dc1)(Flag=true)(ram<=100))", NULL,
                              s_count_cb, &n), CN_MORAY_OK);
    /* dc1: i%3==1; Flag true: i odd; ram=2i<=100: i<=50 -> i in {1,7,13,...,49} */
    CHECK_INT (n, 9);
    cn_moray_destroy (&m);
}

static void
test_put_get (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT ((int) s_crc32_ref ("hello"), (int) 0x3610a686u);   /* the reference */
    const char *val = "{\"hostname\":\"cn1\",\"setup\":true,\"ram\":1024,\"uni\":\"\xc3\xa9\"}";
    char etag[9] = "";
    int64_t id = 0;
    int64_t t0 = cn_now_ms ();
    CHECK_INT (cn_moray_put (m, BA, "k1", val, NULL, etag, &id), CN_MORAY_OK);
    char want[9];
    snprintf (want, sizeof want, "%08X", s_crc32_ref (val));
    CHECK_STR (etag, want);
    CHECK (id > 0);
    cn_mobj_t o;
    CHECK_INT (cn_moray_get (m, BA, "k1", &o), CN_MORAY_OK);
    CHECK_STR (o.key, "k1");
    CHECK_STR (o.value, val);
    CHECK_INT (o.value_len, strlen (val));
    CHECK_STR (o.etag, want);
    CHECK_INT (o.id, id);
    CHECK (o.mtime >= t0 - 1000 && o.mtime <= cn_now_ms () + 1000);
    cn_mobj_fini (&o);
    CHECK (o.key == NULL && o.value == NULL);
    cn_mobj_fini (&o);
    /* what the row holds: Moray's etag, no _txn_snap, no _vnode */
    char row[64];
    snprintf (row, sizeof row, "%s true true", want);
    CHECK_STR (s_sql ("SELECT _etag || ' ' || (_txn_snap IS NULL) || ' ' || "
                      "(_vnode IS NULL) FROM " BA " WHERE _key = 'k1'", 0, NULL), row);
    cn_moray_destroy (&m);
}

static void
test_conditional (void)
{
    cn_moray_t *m = s_open ();
    char e1[9], e2[9], e3[9];
    int64_t id;
    /* must not exist */
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":1}", CN_MORAY_ETAG_NULL, e1, &id),
               CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":2}", "", e2, NULL), CN_MORAY_CONFLICT);
    CHECK_STR (s_sql ("SELECT _value FROM " BA " WHERE _key = 'c1'", 0, NULL), "{\"v\":1}");
    /* mismatch: nothing written */
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":3}", "DEADBEEF", e2, NULL),
               CN_MORAY_CONFLICT);
    CHECK_STR (s_sql ("SELECT _value FROM " BA " WHERE _key = 'c1'", 0, NULL), "{\"v\":1}");
    /* match */
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":4}", e1, e2, NULL), CN_MORAY_OK);
    CHECK (strcmp (e1, e2) != 0);
    CHECK_STR (s_sql ("SELECT _value FROM " BA " WHERE _key = 'c1'", 0, NULL), "{\"v\":4}");
    /* the old etag no longer matches */
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":5}", e1, e3, NULL), CN_MORAY_CONFLICT);
    /* etag on an absent key: conflict, nothing created */
    CHECK_INT (cn_moray_put (m, BA, "c-absent", "{\"v\":1}", e2, e3, NULL),
               CN_MORAY_CONFLICT);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'c-absent'", 0, NULL), "0");
    /* blind */
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":6}", NULL, e3, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "c2", "{\"v\":6}", NULL, e3, NULL), CN_MORAY_OK);
    /* a too-long etag is just a mismatch */
    CHECK_INT (cn_moray_put (m, BA, "c1", "{\"v\":7}", "0123456789ABCDEF", NULL, NULL),
               CN_MORAY_CONFLICT);
    /* etag is the same for the same value */
    CHECK_STR (e3, s_sql ("SELECT _etag FROM " BA " WHERE _key = 'c2'", 0, NULL));
    cn_moray_destroy (&m);
}

static void
test_delete (void)
{
    cn_moray_t *m = s_open ();
    char e[9];
    int64_t id = 0, did = 0;
    CHECK_INT (cn_moray_put (m, BA, "d1", "{\"v\":1}", NULL, e, &id), CN_MORAY_OK);
    CHECK_INT (cn_moray_del (m, BA, "d1", "00000000", &did), CN_MORAY_CONFLICT);
    CHECK_INT (cn_moray_del (m, BA, "d1", "", &did), CN_MORAY_CONFLICT);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'd1'", 0, NULL), "1");
    CHECK_INT (cn_moray_del (m, BA, "d1", e, &did), CN_MORAY_OK);
    CHECK (did > id);                   /* a tombstone version above the last write */
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'd1'", 0, NULL), "0");
    CHECK_INT (cn_moray_del (m, BA, "d1", NULL, NULL), CN_MORAY_NOTFOUND);
    CHECK_INT (cn_moray_del (m, BA, "d1", e, NULL), CN_MORAY_NOTFOUND);
    CHECK_INT (cn_moray_del (m, BA, "d1", "", NULL), CN_MORAY_NOTFOUND);
    cn_mobj_t o;
    CHECK_INT (cn_moray_get (m, BA, "d1", &o), CN_MORAY_NOTFOUND);
    CHECK (o.key == NULL);
    /* re-created after delete: a higher version again */
    int64_t id2 = 0;
    CHECK_INT (cn_moray_put (m, BA, "d1", "{\"v\":2}", "", NULL, &id2), CN_MORAY_OK);
    CHECK (id2 > did);
    CHECK_INT (cn_moray_del (m, BA, "d1", NULL, NULL), CN_MORAY_OK);
    cn_moray_destroy (&m);
}

static void
test_id_grows (void)
{
    cn_moray_t *m = s_open ();
    int64_t last = 0;
    char e[9] = "";
    for (int i = 0; i < 5; i++) {
        int64_t id = 0;
        char v[32];
        snprintf (v, sizeof v, "{\"n\":%d}", i);
        /* alternate blind and etag-conditional updates */
        CHECK_INT (cn_moray_put (m, BA, "g1", v, i % 2 && e[0] ? e : NULL, e, &id),
                   CN_MORAY_OK);
        CHECK (id > last);
        last = id;
    }
    char want[24];
    snprintf (want, sizeof want, "%" PRId64, last);
    CHECK_STR (s_sql ("SELECT _id FROM " BA " WHERE _key = 'g1'", 0, NULL), want);
    /* another key's writes interleave; g1's version is still the newest of g1 */
    int64_t other = 0;
    CHECK_INT (cn_moray_put (m, BA, "g2", "{}", NULL, NULL, &other), CN_MORAY_OK);
    CHECK (other > last);
    cn_moray_destroy (&m);
}

static void
test_index_columns (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_put (m, BA, "i1", "{\"hostname\":\"cn-1\",\"setup\":false,"
                             "\"ram\":2048.5,\"serial\":\"S1\",\"vnode\":7}", NULL, NULL, NULL),
               CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT hostname || '|' || setup || '|' || ram || '|' || serial || '|' "
                      "|| _vnode FROM " BA " WHERE _key = 'i1'", 0, NULL),
               "cn-1|false|2048.5|S1|7");
    /* missing and mistyped fields are NULL; strings take numbers as text;
     * numbers take numeric strings; booleans take "true"/"false" strings */
    CHECK_INT (cn_moray_put (m, BA, "i2", "{\"hostname\":5,\"setup\":\"maybe\","
                             "\"ram\":\"abc\",\"other\":1}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT hostname || '|' || (setup IS NULL) || '|' || (ram IS NULL) "
                      "|| '|' || (serial IS NULL) FROM " BA " WHERE _key = 'i2'", 0, NULL),
               "5|true|true|true");
    CHECK_INT (cn_moray_put (m, BA, "i3", "{\"hostname\":{\"a\":1},\"setup\":\"TRUE\","
                             "\"ram\":\"-1.5e3\",\"serial\":null}", NULL, NULL, NULL),
               CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT (hostname IS NULL) || '|' || setup || '|' || ram || '|' || "
                      "(serial IS NULL) FROM " BA " WHERE _key = 'i3'", 0, NULL),
               "true|true|-1500|true");
    /* an update rewrites the columns: a field removed from the value goes NULL */
    CHECK_INT (cn_moray_put (m, BA, "i1", "{\"setup\":true}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT (hostname IS NULL) || '|' || setup || '|' || (_vnode IS NULL) "
                      "FROM " BA " WHERE _key = 'i1'", 0, NULL), "true|true|true");
    /* unique index: a second object with the same serial is refused */
    CHECK_INT (cn_moray_put (m, BA, "u1", "{\"serial\":\"SAME\"}", NULL, NULL, NULL),
               CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "u2", "{\"serial\":\"SAME\"}", NULL, NULL, NULL),
               CN_MORAY_EINVAL);
    CHECK (strstr (cn_moray_errmsg (m), "unique") != NULL);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'u2'", 0, NULL), "0");
    cn_moray_destroy (&m);
}

static void
test_bad_input (void)
{
    cn_moray_t *m = s_open ();
    cn_mobj_t o;
    CHECK_INT (cn_moray_put (m, BA, "b1", "[1,2]", NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, "b1", "{\"a\":", NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, "b1", "\"str\"", NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, "b1", NULL, NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, "b1", "{\"a\":\"\xff\"}", NULL, NULL, NULL),
               CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, "", "{}", NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, NULL, "{}", NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, BA, "k\xc3", "{}", NULL, NULL, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_put (m, "t_moray_nope", "k", "{}", NULL, NULL, NULL),
               CN_MORAY_EINVAL);
    CHECK (strstr (cn_moray_errmsg (m), "does not exist") != NULL);
    CHECK_INT (cn_moray_get (m, "bad name", "k", &o), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_get (m, BA, "k", NULL), CN_MORAY_EINVAL);
    /* keys with quotes, backslashes, braces, commas: values, never SQL */
    const char *odd = "a'b\"c\\d{e},f NULL";
    CHECK_INT (cn_moray_put (m, BA, odd, "{\"hostname\":\"x'); DROP TABLE t;--\"}", NULL,
                             NULL, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_get (m, BA, odd, &o), CN_MORAY_OK);
    CHECK_STR (o.key, odd);
    cn_mobj_fini (&o);
    /* a value with \u0000 inside a string is valid JSON and is stored */
    CHECK_INT (cn_moray_put (m, BA, "nul", "{\"hostname\":\"a\\u0000b\"}", NULL, NULL, NULL),
               CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT hostname IS NULL FROM " BA " WHERE _key = 'nul'", 0, NULL), "t");
    cn_moray_destroy (&m);
}


/* --- the value scanner: hand cases, then a differential fuzz vs jansson --- */

static void
test_json_values (void)
{
    cn_moray_t *m = s_open ();
    const char *valid[] = {
        "{}", " \t\r\n{ } \n", "{\"a\":[]}", "{\"a\":{}}",
        "{\"a\":[1,2,{\"b\":[true,false,null,\"x\"]}],\"c\":{\"d\":{\"e\":[]}}}",
        "{\"a\":\"\\u00e9\\ud83d\\ude00 \xc3\xa9 \xf0\x9f\x98\x80\"}",
        "{\"a\":-0.5e+10,\"b\":0,\"c\":1E-2,\"d\":-0}",
        "{\"a\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"}",
        "{\"a\":1e400}",            /* jansson says overflow; numeric is fine */
    };
    for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++) {
        int rc = cn_moray_put (m, BA, "j", valid[i], NULL, NULL, NULL);
        if (rc != CN_MORAY_OK)
            printf ("  valid value refused: %s: %s\n", valid[i], cn_moray_errmsg (m));
        CHECK_INT (rc, CN_MORAY_OK);
    }
    const char *invalid[] = {
        "", " ", "[]", "\"x\"", "1", "null", "{", "}", "{\"a\"}", "{\"a\":}",
        "{\"a\":1,}", "{,}", "{\"a\":01}", "{\"a\":1.}", "{\"a\":.5}", "{\"a\":+1}",
        "{\"a\":1e}", "{\"a\":-}", "{\"a\":tru}", "{\"a\":nul}", "{\"a\":True}",
        "{\"a\":\"\x01\"}", "{\"a\":\"\\ud800\"}", "{\"a\":\"\\udc00\"}",
        "{\"a\":\"\\ud800\\u0041\"}", "{\"a\":\"\\q\"}", "{\"a\":\"\\u12G4\"}",
        "{\"a\":\"\\u12\"}", "{\"a\":\"abc}", "{\"a\":1} x", "{\"a\":1}}", "{\"a\":[1}",
        "{\"a\":{]}", "{'a':1}", "{\"a\":\"\xc3\x28\"}", "{\"a\":\"\xed\xa0\x80\"}",
        "{\"a\":\"\xf4\x90\x80\x80\"}", "{\"a\":\"\xc0\x80\"}", "{\"a\":\"\xff\"}",
        "{\"a\" 1}", "{\"a\":1 \"b\":2}", "{\"a\":[1 2]}", "{\"a\":[,1]}",
        "{1:2}", "{\"a\":\"\\", "{\"a\":\"\\u", "{\"a\":}", "{\"a\":]",
    };
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++) {
        int rc = cn_moray_put (m, BA, "j", invalid[i], NULL, NULL, NULL);
        if (rc != CN_MORAY_EINVAL)
            printf ("  invalid value accepted: [%s]\n", invalid[i]);
        CHECK_INT (rc, CN_MORAY_EINVAL);
    }
    /* depth: 1000 nested arrays are fine, 1100 are refused */
    static char deep[2300];
    for (int depth = 1000; depth <= 1100; depth += 100) {
        int o = snprintf (deep, sizeof deep, "{\"a\":");
        for (int i = 1; i < depth; i++)
            deep[o++] = '[';
        for (int i = 1; i < depth; i++)
            deep[o++] = ']';
        strcpy (deep + o, "}");
        CHECK_INT (cn_moray_put (m, BA, "j", deep, NULL, NULL, NULL),
                   depth == 1000 ? CN_MORAY_OK : CN_MORAY_EINVAL);
    }
    /* escaped key names, duplicates (last wins), nested fields don't count */
    CHECK_INT (cn_moray_put (m, BA, "j", "{\"ho\\u0073tname\":\"esc\",\"ram\":1,\"ram\":2,"
                             "\"x\":{\"setup\":true},\"setup\":false,\"serial\":[1],"
                             "\"vnode\":-12}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT hostname || ram || setup || (serial IS NULL) || _vnode "
                      "FROM " BA " WHERE _key = 'j'", 0, NULL), "esc2falsetrue-12");
    CHECK_INT (cn_moray_put (m, BA, "j", "{\"hostname\":\"a\\\"b\\u00e9\\ud83d\\ude00\","
                             "\"ram\":\"12.50\",\"setup\":\"False\",\"vnode\":1.5}",
                             NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT hostname || ' ' || ram || ' ' || setup || ' ' || "
                      "(_vnode IS NULL) FROM " BA " WHERE _key = 'j'", 0, NULL),
               "a\"b\xc3\xa9\xf0\x9f\x98\x80 12.50 false true");
    /* an object replaced later by a scalar, and the other way round */
    CHECK_INT (cn_moray_put (m, BA, "j", "{\"hostname\":{\"a\":1},\"hostname\":\"s\","
                             "\"ram\":3,\"ram\":[3]}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT hostname || (ram IS NULL) FROM " BA " WHERE _key = 'j'",
                      0, NULL), "strue");
    /* numbers numeric can't hold are NULL, not an error */
    CHECK_INT (cn_moray_put (m, BA, "j", "{\"ram\":1e999999}", NULL, NULL, NULL),
               CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT ram IS NULL FROM " BA " WHERE _key = 'j'", 0, NULL), "t");
    cn_moray_destroy (&m);
}

static uint64_t s_rng = 0x2545f4914f6cdd1dULL;
static uint64_t
s_rand (void)
{
    s_rng ^= s_rng << 13;
    s_rng ^= s_rng >> 7;
    s_rng ^= s_rng << 17;
    return s_rng;
}

/* What a column should hold per the rules, from jansson's view of the value;
 * NULL for SQL NULL. For numbers the text is only compared numerically. */
static const char *
s_expect (json_t *o, const char *field, cn_midx_type_t type, char buf[64], bool *numeric)
{
    json_t *v = json_object_get (o, field);
    *numeric = false;
    if (!v)
        return NULL;
    if (json_is_string (v)) {
        const char *s = json_string_value (v);
        if (strlen (s) != json_string_length (v))
            return NULL;
        if (type == CN_MIDX_STRING)
            return s;
        if (type == CN_MIDX_BOOLEAN)
            return strcasecmp (s, "true") == 0 ? "t" : strcasecmp (s, "false") == 0 ? "f"
                                                                                     : NULL;
        /* JSON number grammar, written out differently from the library */
        const char *c = s;
        if (*c == '-')
            c++;
        if (*c == '0')
            c++;
        else if (*c >= '1' && *c <= '9')
            while (isdigit ((unsigned char) *c))
                c++;
        else
            return NULL;
        if (*c == '.' && isdigit ((unsigned char) c[1]))
            for (c++; isdigit ((unsigned char) *c); c++)
                ;
        if ((*c == 'e' || *c == 'E')) {
            c++;
            if (*c == '+' || *c == '-')
                c++;
            if (!isdigit ((unsigned char) *c))
                return NULL;
            while (isdigit ((unsigned char) *c))
                c++;
        }
        if (*c || strlen (s) > 100)
            return NULL;
        double d = strtod (s, NULL);
        *numeric = true;
        snprintf (buf, 64, "%.17g", d);
        return buf;
    }
    if (json_is_number (v)) {
        if (type == CN_MIDX_BOOLEAN)
            return NULL;
        *numeric = true;
        snprintf (buf, 64, "%.17g", json_number_value (v));
        return buf;
    }
    if (json_is_boolean (v))
        return type == CN_MIDX_NUMBER ? NULL
             : type == CN_MIDX_BOOLEAN ? (json_is_true (v) ? "t" : "f")
             : (json_is_true (v) ? "true" : "false");
    return NULL;
}

static void
test_json_fuzz (void)
{
    cn_moray_t *m = s_open ();
    const char *seeds[] = {
        "{\"hostname\":\"cn-1\",\"setup\":true,\"ram\":1024,\"serial\":\"S\\u00e91\","
        "\"x\":[1,{\"y\":null}],\"z\":\"a\\\"b\"}",
        "{\"ram\":\"2.5e3\",\"setup\":\"TRUE\",\"hostname\":7,\"n\":{\"a\":[]},\"e\":-0.25}",
        "{\"hostname\":\"\\ud83d\\ude00\",\"serial\":null,\"setup\":false,\"ram\":-3}",
    };
    const char alphabet[] = "{}[]\":,\\ntrufalse0123456789.-+eE \tu\xc3\xa9\x80xyz";
    int valid = 0, invalid = 0, mismatch = 0, skipped = 0;
    char doc[512];
    for (int round = 0; round < 6000 && mismatch < 5; round++) {
        const char *seed = seeds[s_rand () % 3];
        size_t n = strlen (seed);
        memcpy (doc, seed, n + 1);
        int muts = 1 + (int) (s_rand () % 2);
        for (int k = 0; k < muts; k++) {
            size_t at = s_rand () % n;
            switch (s_rand () % 3) {
            case 0:         /* replace */
                doc[at] = alphabet[s_rand () % (sizeof alphabet - 1)];
                break;
            case 1:         /* delete */
                memmove (doc + at, doc + at + 1, n - at);
                n--;
                break;
            default:        /* insert */
                if (n + 2 < sizeof doc) {
                    memmove (doc + at + 1, doc + at, n - at + 1);
                    doc[at] = alphabet[s_rand () % (sizeof alphabet - 1)];
                    n++;
                }
            }
        }
        doc[n] = 0;
        json_error_t jerr;
        json_t *o = json_loadb (doc, strlen (doc), JSON_ALLOW_NUL, &jerr);
        bool jok = json_is_object (o);
        if (!o && (strstr (jerr.text, "overflow") || strstr (jerr.text, "too big"))) {
            skipped++;          /* numbers beyond double: we accept, by design */
            continue;
        }
        int rc = cn_moray_put (m, BA, "fz", doc, NULL, NULL, NULL);
        if ((rc == CN_MORAY_OK) != jok || (rc != CN_MORAY_OK && rc != CN_MORAY_EINVAL)) {
            printf ("  verdict differs (jansson %s, rc %d): [%s] %s\n", jok ? "ok" : "bad",
                    rc, doc, cn_moray_errmsg (m));
            mismatch++;
            json_decref (o);
            continue;
        }
        if (!jok) {
            invalid++;
            json_decref (o);
            continue;
        }
        valid++;
        /* the columns, compared with the rules applied to jansson's tree */
        PGresult *r = PQexec (s_admin, "SELECT hostname, setup::text, ram::text, serial FROM "
                              BA " WHERE _key = 'fz'");
        for (size_t i = 0; i < NINDEX && PQntuples (r) == 1; i++) {
            char buf[64];
            bool numeric;
            const char *want = s_expect (o, s_index[i].name, s_index[i].type, buf, &numeric);
            const char *got = PQgetisnull (r, 0, (int) i) ? NULL : PQgetvalue (r, 0, (int) i);
            if (want && !strcmp (want, "t") && s_index[i].type == CN_MIDX_BOOLEAN)
                want = "true";
            if (want && !strcmp (want, "f") && s_index[i].type == CN_MIDX_BOOLEAN)
                want = "false";
            bool same = (!want && !got) || (want && got && (numeric
                          ? strtod (want, NULL) == strtod (got, NULL) : !strcmp (want, got)));
            if (!same) {
                printf ("  column %s: got [%s] want [%s] for [%s]\n", s_index[i].name,
                        got ? got : "NULL", want ? want : "NULL", doc);
                mismatch++;
            }
        }
        PQclear (r);
        json_decref (o);
    }
    printf ("  fuzz: %d valid, %d invalid, %d skipped\n", valid, invalid, skipped);
    CHECK_INT (mismatch, 0);
    CHECK (valid > 100 && invalid > 1000);
    cn_moray_destroy (&m);
}

typedef struct {
    int n;
    char keys[64][16];
    int stop_after;
} s_found_t;

static int
s_found_cb (const cn_mobj_t *o, void *arg)
{
    s_found_t *f = arg;
    if (f->n < 64)
        snprintf (f->keys[f->n], sizeof f->keys[0], "%s", o->key);
    f->n++;
    return f->stop_after && f->n >= f->stop_after;
}

static int
s_find (cn_moray_t *m, const char *filter, const cn_mfind_opts_t *o, s_found_t *f)
{
    memset (f, 0, sizeof *f);
    return cn_moray_find (m, BB, filter, o, s_found_cb, f);
}

static void
test_find (void)
{
    cn_moray_t *m = cn_moray_new (s_conninfo, 5000);
    CHECK_INT (cn_moray_put_bucket (m, BB, s_index, NINDEX), CN_MORAY_OK);
    /* f0..f9: ram 100*i, setup on even, hostname cnI; f9 has no setup */
    for (int i = 0; i < 10; i++) {
        char k[8], v[128];
        snprintf (k, sizeof k, "f%d", i);
        if (i == 9)
            snprintf (v, sizeof v, "{\"hostname\":\"cn%d\",\"ram\":%d}", i, 100 * i);
        else
            snprintf (v, sizeof v, "{\"hostname\":\"%s%d\",\"ram\":%d,\"setup\":%s}",
                      i == 5 ? "h_x%" : "cn", i, 100 * i, i % 2 ? "false" : "true");
        CHECK_INT (cn_moray_put (m, BB, k, v, NULL, NULL, NULL), CN_MORAY_OK);
    }
    s_found_t f;
    CHECK_INT (s_find (m, "(setup=true)", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 5);
    CHECK_STR (f.keys[0], "f0");
    CHECK_STR (f.keys[4], "f8");
    CHECK_INT (s_find (m, "(hostname=cn*)", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 9);
    /* LIKE metacharacters in the value match literally */
    CHECK_INT (s_find (m, "(hostname=h_x%*)", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 1);
    CHECK_INT (s_find (m, "(hostname=h?x*)", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 0);
    CHECK_INT (s_find (m, "(&(setup=true)(ram>=400))", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 3);
    /* LDAP negation: f9 has no setup, so (!(setup=true)) matches it */
    CHECK_INT (s_find (m, "(!(setup=true))", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 5);
    CHECK_STR (f.keys[4], "f9");
    CHECK_INT (s_find (m, "(|(ram<=100)(hostname=cn9))", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 3);
    CHECK_INT (s_find (m, "(_key=*)", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 10);
    CHECK_INT (s_find (m, "(setup=*)", NULL, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 9);
    /* sort, limit, offset */
    cn_mfind_opts_t o = { .sort = "ram", .descending = true, .limit = 3, .offset = 1 };
    CHECK_INT (s_find (m, "(ram>=0)", &o, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 3);
    CHECK_STR (f.keys[0], "f8");
    CHECK_STR (f.keys[2], "f6");
    o = (cn_mfind_opts_t) { .sort = "_id" };
    CHECK_INT (s_find (m, "(_key=*)", &o, &f), CN_MORAY_OK);
    CHECK_STR (f.keys[0], "f0");
    o = (cn_mfind_opts_t) { .sort = "_mtime", .limit = 2 };
    CHECK_INT (s_find (m, "(_key=*)", &o, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 2);
    /* the callback stops early */
    f = (s_found_t) { 0 };
    f.stop_after = 2;
    CHECK_INT (cn_moray_find (m, BB, "(_key=*)", NULL, s_found_cb, &f), CN_MORAY_OK);
    CHECK_INT (f.n, 2);
    /* and the handle is usable again */
    cn_mobj_t obj;
    CHECK_INT (cn_moray_get (m, BB, "f1", &obj), CN_MORAY_OK);
    cn_mobj_fini (&obj);
    /* errors */
    o = (cn_mfind_opts_t) { .sort = "nothing" };
    CHECK_INT (s_find (m, "(_key=*)", &o, &f), CN_MORAY_EINVAL);
    CHECK_INT (s_find (m, "(nothing=1)", NULL, &f), CN_MORAY_EINVAL);
    CHECK (strstr (cn_moray_errmsg (m), "not indexed") != NULL);
    CHECK_INT (s_find (m, "(ram=abc)", NULL, &f), CN_MORAY_EINVAL);
    CHECK_INT (s_find (m, "(hostname=x", NULL, &f), CN_MORAY_EINVAL);
    o = (cn_mfind_opts_t) { .limit = -1 };
    CHECK_INT (s_find (m, "(_key=*)", &o, &f), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_find (m, BB, "(_key=*)", NULL, NULL, NULL), CN_MORAY_EINVAL);
    cn_moray_destroy (&m);
}

/* Rows of a find with what came of each value. */
typedef struct {
    int n;
    char keys[16][16];
    char etags[16][9];
    int64_t ids[16];
    bool has_value[16];
} s_rows_t;

static int
s_rows_cb (const cn_mobj_t *o, void *arg)
{
    s_rows_t *r = arg;
    if (r->n < 16) {
        snprintf (r->keys[r->n], sizeof r->keys[0], "%s", o->key);
        snprintf (r->etags[r->n], sizeof r->etags[0], "%s", o->etag);
        r->ids[r->n] = o->id;
        r->has_value[r->n] = o->value != NULL;
        if (o->value)
            CHECK (o->value_len > 0 && o->value[0] == '{');
        else
            CHECK_INT (o->value_len, 0);
    }
    r->n++;
    return 0;
}

static int
s_rows (cn_moray_t *m, const char *filter, const cn_mfind_opts_t *o, s_rows_t *r)
{
    memset (r, 0, sizeof *r);
    return cn_moray_find (m, BB, filter, o, s_rows_cb, r);
}

/* Held values and keys only: the same rows as a plain find, the values left
 * out exactly where the caller holds that version. */
static void
test_find_held (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_put_bucket (m, BB, s_index, NINDEX), CN_MORAY_OK);
    for (int i = 0; i < 6; i++) {
        char k[8], v[128];
        snprintf (k, sizeof k, "h%d", i);
        snprintf (v, sizeof v, "{\"hostname\":\"held%d\",\"ram\":%d,\"setup\":%s}", i,
                  1000 + 7 * (i % 3), i % 2 ? "false" : "true");
        CHECK_INT (cn_moray_put (m, BB, k, v, NULL, NULL, NULL), CN_MORAY_OK);
    }
    s_rows_t all, r;
    cn_mfind_opts_t o = { .sort = "_key" };
    CHECK_INT (s_rows (m, "(hostname=held*)", &o, &all), CN_MORAY_OK);
    CHECK_INT (all.n, 6);
    for (int i = 0; i < all.n; i++)
        CHECK (all.has_value[i]);

    /* keys only */
    o = (cn_mfind_opts_t) { .no_values = true };
    CHECK_INT (s_rows (m, "(hostname=held*)", &o, &r), CN_MORAY_OK);
    CHECK_INT (r.n, 6);
    for (int i = 0; i < r.n && i < all.n; i++) {
        CHECK_STR (r.keys[i], all.keys[i]);
        CHECK_STR (r.etags[i], all.etags[i]);
        CHECK_INT (r.ids[i], all.ids[i]);
        CHECK (!r.has_value[i]);
    }

    /* h1 and h4 held with their versions, h2 with a wrong etag, h3 with the
     * right etag but an old version, h0 twice, a key that is not there */
    const char *keys[] = { "h1", "h4", "h2", "h3", "h0", "h0", "nope" };
    const char *etags[] = { all.etags[1], all.etags[4], "00000000", all.etags[3],
                            all.etags[0], all.etags[0], "12345678" };
    int64_t ids[] = { all.ids[1], all.ids[4], all.ids[2], all.ids[3] - 1, all.ids[0],
                      all.ids[0], 1 };
    o = (cn_mfind_opts_t) { .held_keys = keys, .held_etags = etags, .held_ids = ids,
                            .nheld = 7 };
    CHECK_INT (s_rows (m, "(hostname=held*)", &o, &r), CN_MORAY_OK);
    CHECK_INT (r.n, 6);
    for (int i = 0; i < r.n && i < all.n; i++) {
        CHECK_STR (r.keys[i], all.keys[i]);
        CHECK_STR (r.etags[i], all.etags[i]);
        CHECK_INT (r.ids[i], all.ids[i]);
        CHECK_INT (r.has_value[i], !(i == 0 || i == 1 || i == 4));
    }
    /* etags alone (no versions): h3 is held too */
    o.held_ids = NULL;
    CHECK_INT (s_rows (m, "(hostname=held*)", &o, &r), CN_MORAY_OK);
    CHECK_INT (r.n, 6);
    for (int i = 0; i < r.n; i++)
        CHECK_INT (r.has_value[i], !(i == 0 || i == 1 || i == 3 || i == 4));

    /* a sort on an index, descending, limit and offset: the rows of the same
     * find without held values */
    s_rows_t plain;
    cn_mfind_opts_t p = { .sort = "ram", .descending = true, .limit = 3, .offset = 1 };
    CHECK_INT (s_rows (m, "(setup=*)", &p, &plain), CN_MORAY_OK);
    CHECK_INT (plain.n, 3);
    o.sort = p.sort;
    o.descending = true;
    o.limit = 3;
    o.offset = 1;
    o.held_ids = ids;
    CHECK_INT (s_rows (m, "(setup=*)", &o, &r), CN_MORAY_OK);
    CHECK_INT (r.n, plain.n);
    for (int i = 0; i < r.n && i < plain.n; i++) {
        CHECK_STR (r.keys[i], plain.keys[i]);
        bool held = strcmp (r.keys[i], "h0") == 0 || strcmp (r.keys[i], "h1") == 0
                    || strcmp (r.keys[i], "h4") == 0;
        CHECK_INT (r.has_value[i], !held);
    }

    /* a changed value is sent again */
    CHECK_INT (cn_moray_put (m, BB, "h1", "{\"hostname\":\"held1\",\"ram\":5}", NULL, NULL, NULL),
               CN_MORAY_OK);
    o = (cn_mfind_opts_t) { .held_keys = keys, .held_etags = etags, .held_ids = ids,
                            .nheld = 2 };
    CHECK_INT (s_rows (m, "(hostname=held*)", &o, &r), CN_MORAY_OK);
    CHECK_INT (r.n, 6);
    CHECK (r.has_value[1]);
    CHECK (!r.has_value[4]);

    /* errors */
    o = (cn_mfind_opts_t) { .held_keys = keys, .held_etags = etags, .nheld = 2,
                            .no_values = true };
    CHECK_INT (s_rows (m, "(_key=*)", &o, &r), CN_MORAY_EINVAL);
    o = (cn_mfind_opts_t) { .held_keys = keys, .nheld = 2 };
    CHECK_INT (s_rows (m, "(_key=*)", &o, &r), CN_MORAY_EINVAL);
    const char *empty[] = { "" };
    o = (cn_mfind_opts_t) { .held_keys = empty, .held_etags = etags, .nheld = 1 };
    CHECK_INT (s_rows (m, "(_key=*)", &o, &r), CN_MORAY_EINVAL);
    cn_moray_destroy (&m);
}

/* A callback that tries to use the handle it is called from. */
static int
s_reenter_cb (const cn_mobj_t *o, void *arg)
{
    cn_moray_t *m = arg;
    cn_mobj_t x;
    return cn_moray_get (m, BB, o->key, &x) == CN_MORAY_EINVAL ? 0 : 1;
}

static void
test_find_reentry (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_find (m, BB, "(_key=*)", NULL, s_reenter_cb, m), CN_MORAY_OK);
    cn_moray_destroy (&m);
}

static void
s_set_op (cn_mop_t *op, cn_mop_kind_t kind, const char *bucket, const char *key,
          const char *value, const char *etag)
{
    memset (op, 0, sizeof *op);
    op->kind = kind;
    op->bucket = bucket;
    op->key = key;
    op->value = value;
    op->etag = etag;
}

static void
test_batch (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_put_bucket (m, BB, s_index, NINDEX), CN_MORAY_OK);
    char e_x[9];
    CHECK_INT (cn_moray_put (m, BA, "bx", "{\"v\":0}", NULL, e_x, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "bdel", "{\"v\":0}", NULL, NULL, NULL), CN_MORAY_OK);

    /* grouped path (distinct keys): op 3 (index 2) conflicts -> nothing written */
    cn_mop_t ops[6];
    s_set_op (&ops[0], CN_MOP_PUT, BA, "b1", "{\"hostname\":\"b1\"}", NULL);
    s_set_op (&ops[1], CN_MOP_PUT, BB, "b2", "{\"hostname\":\"b2\"}", "");
    s_set_op (&ops[2], CN_MOP_PUT, BA, "bx", "{\"v\":1}", "");      /* exists */
    s_set_op (&ops[3], CN_MOP_PUT, BA, "b4", "{\"v\":1}", NULL);
    size_t failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 4, &failed), CN_MORAY_CONFLICT);
    CHECK_INT (failed, 2);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('b1', 'b4')", 0, NULL), "0");
    CHECK_STR (s_sql ("SELECT count(*) FROM " BB " WHERE _key = 'b2'", 0, NULL), "0");
    CHECK_STR (s_sql ("SELECT _value FROM " BA " WHERE _key = 'bx'", 0, NULL), "{\"v\":0}");
    CHECK (ops[0].out_id == 0 && ops[0].out_etag[0] == 0);

    /* the same batch with a duplicate key takes the one-by-one path */
    s_set_op (&ops[4], CN_MOP_PUT, BA, "b1", "{\"hostname\":\"b1-again\"}", NULL);
    failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 5, &failed), CN_MORAY_CONFLICT);
    CHECK_INT (failed, 2);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('b1', 'b4')", 0, NULL), "0");

    /* success, every kind of op, two buckets */
    s_set_op (&ops[2], CN_MOP_PUT, BA, "bx", "{\"v\":1,\"ram\":5}", e_x);   /* etag */
    s_set_op (&ops[4], CN_MOP_DEL, BA, "bdel", NULL, NULL);
    s_set_op (&ops[5], CN_MOP_PUT, BB, "b6", "{\"setup\":true}", NULL);
    failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 6, &failed), CN_MORAY_OK);
    CHECK_INT (failed, 99);
    for (int i = 0; i < 6; i++) {
        CHECK (ops[i].out_id > 0);
        if (ops[i].kind == CN_MOP_PUT) {
            char want[9];
            snprintf (want, sizeof want, "%08X", s_crc32_ref (ops[i].value));
            CHECK_STR (ops[i].out_etag, want);
        }
    }
    CHECK_STR (s_sql ("SELECT _value || ' ' || ram FROM " BA " WHERE _key = 'bx'", 0, NULL),
               "{\"v\":1,\"ram\":5} 5");
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'bdel'", 0, NULL), "0");
    CHECK_STR (s_sql ("SELECT hostname FROM " BB " WHERE _key = 'b2'", 0, NULL), "b2");
    char want_id[24];
    snprintf (want_id, sizeof want_id, "%" PRId64, ops[5].out_id);
    CHECK_STR (s_sql ("SELECT _id FROM " BB " WHERE _key = 'b6'", 0, NULL), want_id);

    /* delete failures: missing key -> NOTFOUND, wrong etag -> CONFLICT */
    s_set_op (&ops[0], CN_MOP_PUT, BA, "b7", "{}", NULL);
    s_set_op (&ops[1], CN_MOP_DEL, BA, "bdel", NULL, NULL);
    failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 2, &failed), CN_MORAY_NOTFOUND);
    CHECK_INT (failed, 1);
    s_set_op (&ops[1], CN_MOP_DEL, BA, "b1", NULL, "00000000");
    failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 2, &failed), CN_MORAY_CONFLICT);
    CHECK_INT (failed, 1);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('b7')", 0, NULL), "0");

    /* a bad value is refused before anything runs */
    s_set_op (&ops[1], CN_MOP_PUT, BA, "b8", "not json", NULL);
    failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 2, &failed), CN_MORAY_EINVAL);
    CHECK_INT (failed, 1);
    s_set_op (&ops[1], CN_MOP_PUT, "t_moray_nope", "b8", "{}", NULL);
    CHECK_INT (cn_moray_batch (m, ops, 2, &failed), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_batch (m, ops, 0, NULL), CN_MORAY_OK);

    /* inside the caller's transaction: a failed batch leaves the earlier
     * work of the transaction intact (savepoint) */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_begin (m), CN_MORAY_EINVAL);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "t1", "{}", NULL);
    s_set_op (&ops[1], CN_MOP_PUT, BA, "t2", "{}", NULL);
    CHECK_INT (cn_moray_batch (m, ops, 2, NULL), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "t3", "{}", NULL);
    s_set_op (&ops[1], CN_MOP_PUT, BA, "t1", "{}", "");        /* exists in the txn */
    failed = 99;
    CHECK_INT (cn_moray_batch (m, ops, 2, &failed), CN_MORAY_CONFLICT);
    CHECK_INT (failed, 1);
    /* not visible to others before commit */
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('t1','t2','t3')", 0, NULL),
               "0");
    CHECK_INT (cn_moray_commit (m), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT string_agg (_key, ',' ORDER BY _key) FROM " BA
                      " WHERE _key IN ('t1','t2','t3')", 0, NULL), "t1,t2");
    CHECK_INT (cn_moray_commit (m), CN_MORAY_EINVAL);

    /* rollback undoes */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "t4", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    cn_moray_rollback (m);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 't4'", 0, NULL), "0");
    cn_moray_rollback (m);          /* harmless */

    /* a failed statement aborts the caller's transaction: commit says so */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "t5", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "u3", "{\"serial\":\"SAME2\"}", NULL, NULL, NULL),
               CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "u4", "{\"serial\":\"SAME2\"}", NULL, NULL, NULL),
               CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_commit (m), CN_MORAY_ESQL);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 't5'", 0, NULL), "0");
    cn_moray_destroy (&m);
}

/* cn_moray_batch_partial: a failed condition skips its op, the others are
 * written; the same outside a transaction (one statement, no BEGIN) and
 * inside the caller's (a savepoint). */
static void
test_batch_partial (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_put (m, BA, "p0", "{\"v\":0}", NULL, NULL, NULL), CN_MORAY_OK);
    cn_mop_t ops[3];
    bool applied[3];
    s_set_op (&ops[0], CN_MOP_PUT, BA, "p1", "{\"v\":1}", "");
    s_set_op (&ops[1], CN_MOP_PUT, BA, "p0", "{\"v\":2}", "");     /* exists */
    s_set_op (&ops[2], CN_MOP_PUT, BA, "p2", "{\"v\":3}", "");
    CHECK_INT (cn_moray_batch_partial (m, ops, 3, applied), CN_MORAY_OK);
    CHECK (applied[0] && !applied[1] && applied[2]);
    CHECK (ops[0].out_id > 0 && ops[1].out_id == 0 && ops[2].out_id > 0);
    CHECK_STR (s_sql ("SELECT string_agg (_key || '=' || _value, ',' ORDER BY _key) FROM " BA
                      " WHERE _key IN ('p0','p1','p2')", 0, NULL),
               "p0={\"v\":0},p1={\"v\":1},p2={\"v\":3}");
    /* the connection is usable afterwards, with no transaction left open */
    CHECK_INT (cn_moray_commit (m), CN_MORAY_EINVAL);

    /* inside the caller's transaction: written only at its commit */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "p3", "{}", "");
    s_set_op (&ops[1], CN_MOP_PUT, BA, "p1", "{}", "");              /* exists */
    CHECK_INT (cn_moray_batch_partial (m, ops, 2, applied), CN_MORAY_OK);
    CHECK (applied[0] && !applied[1]);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'p3'", 0, NULL), "0");
    CHECK_INT (cn_moray_commit (m), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'p3'", 0, NULL), "1");

    /* every op skipped: still OK, nothing written */
    s_set_op (&ops[0], CN_MOP_PUT, BA, "p0", "{}", "");
    s_set_op (&ops[1], CN_MOP_PUT, BA, "p1", "{}", "");
    CHECK_INT (cn_moray_batch_partial (m, ops, 2, applied), CN_MORAY_OK);
    CHECK (!applied[0] && !applied[1]);
    CHECK_INT (cn_moray_batch_partial (m, ops, 2, NULL), CN_MORAY_EINVAL);
    cn_moray_destroy (&m);
}

static int s_kill_backends (void);

/* cn_moray_batch_final: the batch ends the caller's transaction; with it
 * goes the BEGIN, sent together with the transaction's first statement
 * (one round trip): what the transaction did before is committed with it,
 * or undone with it. */
static void
test_batch_final (void)
{
    cn_moray_t *m = s_open ();
    cn_mop_t ops[2];
    /* no transaction: refused */
    s_set_op (&ops[0], CN_MOP_PUT, BA, "f1", "{}", NULL);
    CHECK_INT (cn_moray_batch_final (m, ops, 1, NULL), CN_MORAY_EINVAL);

    /* an earlier statement of the transaction, then the final batch */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "f0", "{\"v\":0}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'f0'", 0, NULL), "0");
    s_set_op (&ops[0], CN_MOP_PUT, BA, "f1", "{\"v\":1}", "");
    s_set_op (&ops[1], CN_MOP_PUT, BA, "f2", "{\"v\":2}", "");
    CHECK_INT (cn_moray_batch_final (m, ops, 2, NULL), CN_MORAY_OK);
    CHECK (ops[0].out_id > 0 && ops[1].out_id > 0 && ops[0].out_etag[0]);
    CHECK_STR (s_sql ("SELECT string_agg (_key, ',' ORDER BY _key) FROM " BA
                      " WHERE _key IN ('f0','f1','f2')", 0, NULL), "f0,f1,f2");
    CHECK_INT (cn_moray_commit (m), CN_MORAY_EINVAL);     /* it is over */

    /* a failed condition: everything the transaction did is undone */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "f3", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "f4", "{}", "");
    s_set_op (&ops[1], CN_MOP_PUT, BA, "f1", "{}", "");       /* exists */
    size_t failed = 99;
    CHECK_INT (cn_moray_batch_final (m, ops, 2, &failed), CN_MORAY_CONFLICT);
    CHECK_INT (failed, 1);
    CHECK_INT (cn_moray_commit (m), CN_MORAY_EINVAL);     /* over */
    cn_moray_rollback (m);                                /* a no-op */
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('f3','f4')", 0, NULL), "0");

    /* a bad op is refused before any statement: the transaction ends too */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "f5", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "f6", "not json", NULL);
    CHECK_INT (cn_moray_batch_final (m, ops, 1, NULL), CN_MORAY_EINVAL);
    CHECK_INT (cn_moray_commit (m), CN_MORAY_EINVAL);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('f5','f6')", 0, NULL), "0");

    /* a transaction whose first statement is the final batch (BEGIN goes
     * with it), and an empty transaction (nothing sent at all) */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "f7", "{}", "");
    CHECK_INT (cn_moray_batch_final (m, ops, 1, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'f7'", 0, NULL), "1");
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_commit (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    cn_moray_rollback (m);
    CHECK_INT (cn_moray_put (m, BA, "f8", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'f8'", 0, NULL), "1");

    /* no ops: the transaction still ends (committed) */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "f9", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_batch_final (m, ops, 0, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key = 'f9'", 0, NULL), "1");
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);          /* none was left open */
    cn_moray_rollback (m);

    /* refused: the reason stays readable after the rollback it did */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "fa", "not json", NULL);
    CHECK_INT (cn_moray_batch_final (m, ops, 1, NULL), CN_MORAY_EINVAL);
    CHECK (cn_moray_errmsg (m) && *cn_moray_errmsg (m));
    /* a conflict's reason too, and after the caller's own rollback */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "f1", "{}", "");   /* exists */
    CHECK_INT (cn_moray_batch_final (m, ops, 1, NULL), CN_MORAY_CONFLICT);
    cn_moray_rollback (m);
    CHECK (cn_moray_errmsg (m) && strstr (cn_moray_errmsg (m), "exists"));

    /* the connection lost inside the transaction: EIO (retry later), not
     * EINVAL; usable again after the rollback */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "fb", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK (s_kill_backends () >= 1);
    cn_mobj_t o;
    CHECK_INT (cn_moray_get (m, BA, "fb", &o), CN_MORAY_EIO);
    s_set_op (&ops[0], CN_MOP_PUT, BA, "fc", "{}", NULL);
    CHECK_INT (cn_moray_batch_final (m, ops, 1, NULL), CN_MORAY_EIO);
    cn_moray_rollback (m);
    CHECK_INT (cn_moray_put (m, BA, "fd", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT string_agg (_key, ',' ORDER BY _key) FROM " BA
                      " WHERE _key IN ('fb','fc','fd')", 0, NULL), "fd");
    cn_moray_destroy (&m);
}

static void
test_batch_large (void)
{
    /* 500 puts in one statement, then 500 conditional updates */
    cn_moray_t *m = s_open ();
    enum { N = 500 };
    static cn_mop_t ops[N];
    static char keys[N][16], vals[N][128];
    for (int i = 0; i < N; i++) {
        snprintf (keys[i], sizeof keys[i], "L%03d", i);
        snprintf (vals[i], sizeof vals[i], "{\"hostname\":\"h%d\",\"ram\":%d,"
                  "\"setup\":%s,\"q\":\"a\\\"b\"}", i, i, i % 2 ? "true" : "false");
        s_set_op (&ops[i], CN_MOP_PUT, BA, keys[i], vals[i], "");
    }
    CHECK_INT (cn_moray_batch (m, ops, N, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key LIKE 'L%' AND hostname = "
                      "'h' || ram AND setup = (ram % 2 = 1)", 0, NULL), "500");
    static char etags[N][9];
    for (int i = 0; i < N; i++) {
        memcpy (etags[i], ops[i].out_etag, 9);
        snprintf (vals[i], sizeof vals[i], "{\"hostname\":\"h%d\",\"ram\":%d}", i, i + 1);
        s_set_op (&ops[i], CN_MOP_PUT, BA, keys[i], vals[i], etags[i]);
    }
    CHECK_INT (cn_moray_batch (m, ops, N, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key LIKE 'L%' AND ram = "
                      "substr (hostname, 2)::int + 1 AND setup IS NULL", 0, NULL), "500");
    /* ids of one batch: each fresh and above the first batch's */
    cn_mobj_t *got = calloc (N, sizeof *got);
    const char *kp[N];
    for (int i = 0; i < N; i++)
        kp[i] = keys[i];
    CHECK_INT (cn_moray_get_many_locked (m, BA, kp, N, got), CN_MORAY_OK);
    int same = 0;
    for (int i = 0; i < N; i++) {
        same += got[i].id == ops[i].out_id && strcmp (got[i].etag, ops[i].out_etag) == 0;
        cn_mobj_fini (&got[i]);
    }
    CHECK_INT (same, N);
    free (got);
    /* all deleted in one statement */
    for (int i = 0; i < N; i++)
        s_set_op (&ops[i], CN_MOP_DEL, BA, keys[i], NULL, NULL);
    CHECK_INT (cn_moray_batch (m, ops, N, NULL), CN_MORAY_OK);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key LIKE 'L%'", 0, NULL), "0");
    cn_moray_destroy (&m);
}

static void
test_get_many_locked (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_put (m, BA, "ma", "{\"v\":\"a\"}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "mb", "{\"v\":\"b\"}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    const char *keys[] = { "mb", "m-missing", "ma", "mb", "x\"y{z}\\" };
    cn_mobj_t out[5];
    CHECK_INT (cn_moray_get_many_locked (m, BA, keys, 5, out), CN_MORAY_OK);
    CHECK_STR (out[0].key, "mb");
    CHECK_STR (out[0].value, "{\"v\":\"b\"}");
    CHECK (out[1].key == NULL && out[1].value == NULL);
    CHECK_STR (out[2].key, "ma");
    CHECK_STR (out[3].key, "mb");
    CHECK (out[4].key == NULL);
    CHECK (out[0].id > 0 && strlen (out[0].etag) == 8);
    for (int i = 0; i < 5; i++)
        cn_mobj_fini (&out[i]);
    /* the rows are locked against another connection */
    s_sql ("SET lock_timeout = '100ms'", 0, NULL);
    PGresult *r = PQexec (s_admin, "SELECT 1 FROM " BA " WHERE _key = 'ma' FOR UPDATE NOWAIT");
    CHECK (PQresultStatus (r) == PGRES_FATAL_ERROR);
    CHECK_STR (PQresultErrorField (r, PG_DIAG_SQLSTATE), "55P03");
    PQclear (r);
    r = PQexec (s_admin, "SELECT 1 FROM " BA " WHERE _key = 'm-missing' FOR UPDATE NOWAIT");
    CHECK (PQresultStatus (r) == PGRES_TUPLES_OK);
    PQclear (r);
    cn_moray_rollback (m);
    r = PQexec (s_admin, "SELECT 1 FROM " BA " WHERE _key = 'ma' FOR UPDATE NOWAIT");
    CHECK (PQresultStatus (r) == PGRES_TUPLES_OK);
    PQclear (r);
    CHECK_INT (cn_moray_get_many_locked (m, BA, keys, 0, NULL), CN_MORAY_OK);
    const char *badk[] = { "ok", "" };
    CHECK_INT (cn_moray_get_many_locked (m, BA, badk, 2, out), CN_MORAY_EINVAL);

    /* lock_many: the values whose etag the caller names are left out */
    cn_mobj_t cur;
    CHECK_INT (cn_moray_get (m, BA, "ma", &cur), CN_MORAY_OK);
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    const char *etags[] = { "00000000", NULL, cur.etag, "", NULL };
    CHECK_INT (cn_moray_lock_many (m, BA, keys, etags, 5, out), CN_MORAY_OK);
    CHECK_STR (out[0].value, "{\"v\":\"b\"}");        /* another etag */
    CHECK (out[1].key == NULL);
    CHECK_STR (out[2].key, "ma");                        /* the caller's etag */
    CHECK (out[2].value == NULL && out[2].value_len == 0);
    CHECK_STR (out[2].etag, cur.etag);
    CHECK (out[2].id == cur.id);
    CHECK_STR (out[3].value, "{\"v\":\"b\"}");        /* "": none */
    CHECK (out[4].key == NULL);
    for (int i = 0; i < 5; i++)
        cn_mobj_fini (&out[i]);
    r = PQexec (s_admin, "SELECT 1 FROM " BA " WHERE _key = 'ma' FOR UPDATE NOWAIT");
    CHECK (PQresultStatus (r) == PGRES_FATAL_ERROR);
    PQclear (r);
    cn_moray_rollback (m);
    cn_mobj_fini (&cur);
    cn_moray_destroy (&m);
}

/* The idle function runs while the server works: here the statement waits
 * for a row lock that only the idle function's third call releases. */
static int s_idle_calls;

static bool
s_idle_fn (void *arg)
{
    (void) arg;
    if (++s_idle_calls == 3)
        PQclear (PQexec (s_admin, "COMMIT"));
    return s_idle_calls < 3;
}

static void
test_idle (void)
{
    cn_moray_t *m = s_open ();
    CHECK_INT (cn_moray_put (m, BA, "idle", "{\"v\":1}", NULL, NULL, NULL), CN_MORAY_OK);
    PQclear (PQexec (s_admin, "BEGIN"));
    CHECK_STR (s_sql ("SELECT _key FROM " BA " WHERE _key = 'idle' FOR UPDATE", 0, NULL),
               "idle");
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    s_idle_calls = 0;
    cn_moray_set_idle (m, s_idle_fn, NULL);
    const char *keys[] = { "idle" };
    cn_mobj_t o;
    CHECK_INT (cn_moray_get_many_locked (m, BA, keys, 1, &o), CN_MORAY_OK);
    CHECK (s_idle_calls >= 3);
    CHECK_STR (o.value, "{\"v\":1}");
    cn_mobj_fini (&o);
    cn_moray_set_idle (m, NULL, NULL);
    int before = s_idle_calls;
    cn_moray_rollback (m);
    CHECK_INT (s_idle_calls, before);
    cn_moray_destroy (&m);
}

/* Terminate the store's backend: every other client backend of this (test)
 * database but the admin connection. Waits until they are gone. */
static int
s_kill_backends (void)
{
    const char *n = s_sql ("SELECT count(pg_terminate_backend (pid, 5000)) FROM pg_stat_activity "
                           "WHERE datname = current_database () AND pid <> pg_backend_pid () "
                           "AND backend_type = 'client backend' "
                           "AND application_name <> 'cnapi_test_admin'", 0, NULL);
    return n ? atoi (n) : -1;
}

static void
test_eio (void)
{
    cn_moray_t *m = s_open ();
    cn_mobj_t o;
    CHECK_INT (cn_moray_put (m, BA, "e1", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK (s_kill_backends () >= 1);
    CHECK_INT (cn_moray_get (m, BA, "e1", &o), CN_MORAY_EIO);
    CHECK (!cn_moray_connected (m));
    CHECK (strlen (cn_moray_errmsg (m)) > 0);
    CHECK_INT (cn_moray_get (m, BA, "e1", &o), CN_MORAY_OK);
    cn_mobj_fini (&o);
    CHECK (cn_moray_connected (m));

    /* inside a transaction: the loss is sticky until rollback */
    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, BA, "e2", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    CHECK (s_kill_backends () >= 1);
    CHECK_INT (cn_moray_put (m, BA, "e3", "{}", NULL, NULL, NULL), CN_MORAY_EIO);
    CHECK_INT (cn_moray_get (m, BA, "e1", &o), CN_MORAY_EIO);
    CHECK_INT (cn_moray_commit (m), CN_MORAY_EIO);
    CHECK_INT (cn_moray_get (m, BA, "e1", &o), CN_MORAY_OK);
    cn_mobj_fini (&o);
    CHECK_STR (s_sql ("SELECT count(*) FROM " BA " WHERE _key IN ('e2','e3')", 0, NULL), "0");

    CHECK_INT (cn_moray_begin (m), CN_MORAY_OK);
    CHECK (s_kill_backends () >= 1);
    cn_mop_t op;
    s_set_op (&op, CN_MOP_PUT, BA, "e4", "{}", NULL);
    CHECK_INT (cn_moray_batch (m, &op, 1, NULL), CN_MORAY_EIO);
    CHECK_INT (cn_moray_get (m, BA, "e1", &o), CN_MORAY_EIO);
    cn_moray_rollback (m);
    CHECK_INT (cn_moray_get (m, BA, "e1", &o), CN_MORAY_OK);
    cn_mobj_fini (&o);

    /* outside a transaction a batch's own transaction is simply gone */
    CHECK (s_kill_backends () >= 1);
    CHECK_INT (cn_moray_batch (m, &op, 1, NULL), CN_MORAY_EIO);
    CHECK_INT (cn_moray_batch (m, &op, 1, NULL), CN_MORAY_OK);
    /* find */
    CHECK (s_kill_backends () >= 1);
    s_found_t f;
    CHECK_INT (cn_moray_find (m, BA, "(_key=*)", NULL, s_found_cb, &f), CN_MORAY_EIO);
    CHECK_INT (cn_moray_find (m, BA, "(_key=e1)", NULL, s_found_cb, (f.n = 0, &f)),
               CN_MORAY_OK);
    cn_moray_destroy (&m);

    /* nothing listening: EIO, bounded */
    cn_moray_t *dead = cn_moray_new ("host=127.0.0.1 port=1 dbname=x", 1000);
    int64_t t0 = cn_mono_us ();
    CHECK_INT (cn_moray_connect (dead), CN_MORAY_EIO);
    CHECK_INT (cn_moray_get (dead, BA, "k", &o), CN_MORAY_EIO);
    CHECK (cn_mono_us () - t0 < 3000000);
    CHECK (strlen (cn_moray_errmsg (dead)) > 0);
    cn_moray_destroy (&dead);
    /* an unroutable address (no answer at all): bounded by timeout_ms */
    dead = cn_moray_new ("host=10.255.255.1 port=5432 dbname=x", 700);
    t0 = cn_mono_us ();
    CHECK_INT (cn_moray_connect (dead), CN_MORAY_EIO);
    CHECK (cn_mono_us () - t0 < 2500000);
    cn_moray_destroy (&dead);
}

static void
test_timeout (void)
{
    /* a row lock held elsewhere: the statement times out -> EIO, and the
     * connection stays usable */
    cn_moray_t *m = cn_moray_new (s_conninfo, 500);
    CHECK_INT (cn_moray_put (m, BA, "lk", "{}", NULL, NULL, NULL), CN_MORAY_OK);
    s_sql ("BEGIN", 0, NULL);
    s_sql ("SELECT 1 FROM " BA " WHERE _key = 'lk' FOR UPDATE", 0, NULL);
    int64_t t0 = cn_mono_us ();
    CHECK_INT (cn_moray_put (m, BA, "lk", "{\"v\":1}", NULL, NULL, NULL), CN_MORAY_EIO);
    int64_t took = cn_mono_us () - t0;
    CHECK (took >= 400000 && took < 2000000);
    s_sql ("ROLLBACK", 0, NULL);
    CHECK_INT (cn_moray_put (m, BA, "lk", "{\"v\":2}", NULL, NULL, NULL), CN_MORAY_OK);
    cn_moray_destroy (&m);
}

static void
test_keyword_names (void)
{
    /* bucket and field names that are SQL keywords work (quoted) */
    cn_moray_t *m = cn_moray_new (s_conninfo, 5000);
    cn_mindex_t idx[] = { { "user", CN_MIDX_STRING, false }, { "order", CN_MIDX_NUMBER, false } };
    CHECK_INT (cn_moray_put_bucket (m, "t_moray_user", idx, 2), CN_MORAY_OK);
    CHECK_INT (cn_moray_put (m, "t_moray_user", "k", "{\"user\":\"u\",\"order\":3}",
                             NULL, NULL, NULL), CN_MORAY_OK);
    s_found_t f = { 0 };
    cn_mfind_opts_t o = { .sort = "order" };
    CHECK_INT (cn_moray_find (m, "t_moray_user", "(&(user=u)(order>=3))", &o, s_found_cb, &f),
               CN_MORAY_OK);
    CHECK_INT (f.n, 1);
    cn_moray_destroy (&m);
}

static void
s_no_pg (void)
{
    printf ("  CNAPI_TEST_PG is not set: these tests need a PostgreSQL database\n"
            "  (e.g. CNAPI_TEST_PG='host=127.0.0.1 port=5432 dbname=cnapi_unit user=postgres')\n");
    cn_test_cur_failed++;
}

int
main (void)
{
    cn_log_set_level (CN_LOG_ERROR);    /* expected failures log warnings */
    s_conninfo = getenv ("CNAPI_TEST_PG");
    if (!s_conninfo || !*s_conninfo) {
        printf ("CNAPI_TEST_PG is not set: cannot run the PostgreSQL tests\n");
        RUN (s_no_pg);
        return cn_test_done ();
    }
    s_admin = PQconnectdb (s_conninfo);
    if (PQstatus (s_admin) != CONNECTION_OK) {
        printf ("cannot connect to CNAPI_TEST_PG: %s", PQerrorMessage (s_admin));
        PQfinish (s_admin);
        RUN (s_no_pg);
        return cn_test_done ();
    }
    s_sql ("SET application_name = 'cnapi_test_admin'", 0, NULL);
    s_sql ("SET client_min_messages = warning", 0, NULL);
    s_drop_test_buckets ();

    RUN (test_put_bucket);
    RUN (test_index_change);
    RUN (test_put_get);
    RUN (test_conditional);
    RUN (test_delete);
    RUN (test_id_grows);
    RUN (test_index_columns);
    RUN (test_bad_input);
    RUN (test_json_values);
    RUN (test_json_fuzz);
    RUN (test_find);
    RUN (test_find_reentry);
    RUN (test_find_held);
    RUN (test_batch);
    RUN (test_batch_partial);
    RUN (test_batch_final);
    RUN (test_batch_large);
    RUN (test_get_many_locked);
    RUN (test_idle);
    RUN (test_eio);
    RUN (test_timeout);
    RUN (test_keyword_names);

    s_drop_test_buckets ();
    PQfinish (s_admin);
    return cn_test_done ();
}
