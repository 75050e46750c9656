/*
 * test_listener: the pure parts of the sysinfo listener (lib/cn_amqp.c):
 * routing key -> server UUID, headers -> source time, AMQP URL parsing.
 * With CNAPI_TEST_AMQP (a broker URL, as test/run provides) also the shared
 * connection code against the real broker: connect errors, the queue
 * declaration (quorum, passive reuse, type mismatch), and a publish/consume
 * round trip through amq.topic reading sent_ms back. Without it those are
 * skipped (the pure tests still run).
 */
#include "cn_amqp.h"

#include "cn_test.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define U "564d9a6c-5a4b-4f2e-9c11-0123456789ab"
#define UU "564D9A6C-5A4B-4F2E-9C11-0123456789AB"

static bool
s_rk (const char *rk, char out[37])
{
    return cn_amqp_rk_uuid (rk, strlen (rk), out);
}

static void
test_rk_good (void)
{
    char out[37];
    CHECK (s_rk ("ur.startup." U, out));
    CHECK_STR (out, U);
    memset (out, 0, sizeof out);
    CHECK (s_rk ("ur.sysinfo." U ".42", out));
    CHECK_STR (out, U);
    CHECK (s_rk ("ur.sysinfo." U ".0c5e1f3a-req", out));
    CHECK_STR (out, U);
    CHECK (s_rk ("ur.sysinfo." U, out));
    CHECK_STR (out, U);
    /* Upper case is accepted and normalised. */
    CHECK (s_rk ("ur.startup." UU, out));
    CHECK_STR (out, U);
    CHECK (s_rk ("ur.sysinfo." UU ".7", out));
    CHECK_STR (out, U);
}

static void
test_rk_bad (void)
{
    char out[37] = "unchanged";
    CHECK (!s_rk ("", out));
    CHECK (!s_rk ("ur.startup.", out));
    CHECK (!s_rk ("ur.sysinfo.", out));
    CHECK (!s_rk ("ur.startup.not-a-uuid", out));
    CHECK (!s_rk ("ur.startup." U "x", out));          /* trailing junk */
    CHECK (!s_rk ("ur.sysinfo." U ".", out));          /* empty id */
    CHECK (!s_rk ("ur.sysinfo." U "-1", out));
    CHECK (!s_rk ("ur.sysinfo.564d9a6c-5a4b-4f2e-9c11-0123456789a", out)); /* 35 */
    CHECK (!s_rk ("ur.sysinfo.564d9a6c_5a4b-4f2e-9c11-0123456789ab.1", out));
    CHECK (!s_rk ("ur.sysinfo.564d9a6cz5a4b-4f2e-9c11-0123456789ab.1", out));
    CHECK (!s_rk ("ur.sysinfo.g64d9a6c-5a4b-4f2e-9c11-0123456789ab.1", out));
    CHECK (!s_rk ("ur.execute." U ".1", out));
    CHECK (!s_rk ("ur.sysinfoX" U ".1", out));
    CHECK (!s_rk ("UR.SYSINFO." U ".1", out));
    CHECK (!s_rk ("xur.sysinfo." U ".1", out));
    CHECK (!cn_amqp_rk_uuid (NULL, 0, out));
    CHECK_STR (out, "unchanged");
    /* The length is honoured: bytes past len are not part of the key. */
    const char *k = "ur.startup." U ".1";
    CHECK (cn_amqp_rk_uuid (k, strlen ("ur.startup." U), out));
    CHECK_STR (out, U);
    CHECK (!cn_amqp_rk_uuid (k, strlen ("ur.startup." U) - 1, out));
    /* An embedded NUL is not a UUID character. */
    char nul[] = "ur.startup." U;
    nul[20] = '\0';
    CHECK (!cn_amqp_rk_uuid (nul, sizeof nul - 1, out));
}

static amqp_basic_properties_t
s_props (amqp_table_entry_t *e, int n)
{
    amqp_basic_properties_t p;
    memset (&p, 0, sizeof p);
    if (n > 0) {
        p._flags |= AMQP_BASIC_HEADERS_FLAG;
        p.headers.num_entries = n;
        p.headers.entries = e;
    }
    return p;
}

static amqp_table_entry_t
s_entry (const char *key, uint8_t kind)
{
    amqp_table_entry_t e;
    memset (&e, 0, sizeof e);
    e.key = amqp_cstring_bytes (key);
    e.value.kind = kind;
    return e;
}

static void
test_sent_ms_header (void)
{
    int64_t ms = -1;
    amqp_table_entry_t e[2];

    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_I64);
    e[0].value.value.i64 = INT64_C (1764067796123);
    amqp_basic_properties_t p = s_props (e, 1);
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067796123));

    /* Other keys first; other integer kinds. */
    e[0] = s_entry ("x-other", AMQP_FIELD_KIND_UTF8);
    e[0].value.value.bytes = amqp_cstring_bytes ("hello");
    e[1] = s_entry ("sent_ms", AMQP_FIELD_KIND_U64);
    e[1].value.value.u64 = UINT64_C (1764067796124);
    p = s_props (e, 2);
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067796124));

    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_I32);
    e[0].value.value.i32 = 123456;
    p = s_props (e, 1);
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, 123456);

    /* A numeric string (what amqp-publish -H or a JSON-minded publisher sends). */
    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_UTF8);
    e[0].value.value.bytes = amqp_cstring_bytes ("1764067796125");
    p = s_props (e, 1);
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067796125));

    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_F64);
    e[0].value.value.f64 = 1764067796126.0;
    p = s_props (e, 1);
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067796126));
}

static void
test_sent_ms_bad (void)
{
    int64_t ms = 77;
    amqp_table_entry_t e[1];
    amqp_basic_properties_t p;

    CHECK (!cn_amqp_sent_ms (NULL, &ms));
    p = s_props (NULL, 0);
    CHECK (!cn_amqp_sent_ms (&p, &ms));

    const char *bad_strings[] = { "", "12a", "-5", " 12", "1.5", "0",
                                  "99999999999999999999999" };
    for (size_t i = 0; i < sizeof bad_strings / sizeof bad_strings[0]; i++) {
        e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_UTF8);
        e[0].value.value.bytes = amqp_cstring_bytes (bad_strings[i]);
        p = s_props (e, 1);
        CHECK (!cn_amqp_sent_ms (&p, &ms));
    }
    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_I64);
    e[0].value.value.i64 = -1;
    p = s_props (e, 1);
    CHECK (!cn_amqp_sent_ms (&p, &ms));
    e[0].value.value.i64 = 0;
    CHECK (!cn_amqp_sent_ms (&p, &ms));
    e[0].value.value.i64 = INT64_MAX;      /* far future: not plausible */
    CHECK (!cn_amqp_sent_ms (&p, &ms));

    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_BOOLEAN);
    e[0].value.value.boolean = 1;
    p = s_props (e, 1);
    CHECK (!cn_amqp_sent_ms (&p, &ms));

    e[0] = s_entry ("sent_msX", AMQP_FIELD_KIND_I64);
    e[0].value.value.i64 = 1000;
    p = s_props (e, 1);
    CHECK (!cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, 77);                     /* unchanged on false */
}

static void
test_sent_ms_timestamp (void)
{
    int64_t ms = 0;
    amqp_table_entry_t e[1];
    amqp_basic_properties_t p = s_props (NULL, 0);
    p._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    p.timestamp = 1764067796;               /* seconds */
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067796000));

    /* The header wins over the timestamp. */
    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_I64);
    e[0].value.value.i64 = INT64_C (1764067796999);
    p = s_props (e, 1);
    p._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    p.timestamp = 1764067796;
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067796999));

    /* A bad header falls back to the timestamp. */
    e[0] = s_entry ("sent_ms", AMQP_FIELD_KIND_UTF8);
    e[0].value.value.bytes = amqp_cstring_bytes ("soon");
    p = s_props (e, 1);
    p._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    p.timestamp = 1764067700;
    CHECK (cn_amqp_sent_ms (&p, &ms));
    CHECK_INT (ms, INT64_C (1764067700000));

    /* Zero and absurd timestamps are ignored. */
    p = s_props (NULL, 0);
    p._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    p.timestamp = 0;
    CHECK (!cn_amqp_sent_ms (&p, &ms));
    p.timestamp = UINT64_MAX;
    CHECK (!cn_amqp_sent_ms (&p, &ms));
}

static void
test_url (void)
{
    char err[256];
    cn_amqp_url_t u;

    CHECK_INT (cn_amqp_url_parse ("amqp://guest:guest@127.0.0.1:5672/myvhost", &u,
                                  err, sizeof err), 0);
    CHECK_STR (u.host, "127.0.0.1");
    CHECK_INT (u.port, 5672);
    CHECK_STR (u.user, "guest");
    CHECK_STR (u.password, "guest");
    CHECK_STR (u.vhost, "myvhost");
    cn_amqp_url_fini (&u);
    CHECK (u.host == NULL);

    /* No path: the default vhost; a trailing slash: also "/" (not ""). */
    CHECK_INT (cn_amqp_url_parse ("amqp://guest:guest@127.0.0.1:5672", &u, err, sizeof err), 0);
    CHECK_STR (u.vhost, "/");
    cn_amqp_url_fini (&u);
    CHECK_INT (cn_amqp_url_parse ("amqp://h:1/", &u, err, sizeof err), 0);
    CHECK_STR (u.vhost, "/");
    CHECK_STR (u.user, "guest");
    cn_amqp_url_fini (&u);

    /* Percent-decoding of user, password and vhost. */
    CHECK_INT (cn_amqp_url_parse ("amqp://u%40x:p%2Fw@h:1/%2Fprod", &u, err, sizeof err), 0);
    CHECK_STR (u.user, "u@x");
    CHECK_STR (u.password, "p/w");
    CHECK_STR (u.vhost, "/prod");
    cn_amqp_url_fini (&u);

    CHECK_INT (cn_amqp_url_parse ("amqp://h", &u, err, sizeof err), 0);
    CHECK_INT (u.port, 5672);
    cn_amqp_url_fini (&u);

    const char *bad[] = { "", "http://h", "amqp://h:port", "amqp://h/a/b", "amqps://h",
                          "amqp://h:0" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        int rc = cn_amqp_url_parse (bad[i], &u, err, sizeof err);
        CHECK_INT (rc, -1);
        CHECK (err[0] != '\0');
        CHECK (u.host == NULL);
        if (rc == 0)
            cn_amqp_url_fini (&u);
    }
    CHECK_INT (cn_amqp_url_parse (NULL, &u, err, sizeof err), -1);
}

static void
test_keys (void)
{
    CHECK_STR (cn_amqp_sysinfo_keys[0], "ur.sysinfo.#");
    CHECK_STR (cn_amqp_sysinfo_keys[1], "ur.startup.#");
    CHECK (cn_amqp_sysinfo_keys[2] == NULL);
}

/* ---- against a real broker (CNAPI_TEST_AMQP) ---- */

static const char *s_url;

static amqp_connection_state_t
s_connect (char *err, size_t errlen)
{
    cn_amqp_url_t u;
    if (cn_amqp_url_parse (s_url, &u, err, errlen) != 0)
        return NULL;
    amqp_connection_state_t c = cn_amqp_connect (&u, 5000, 10, "test_listener", err, errlen);
    cn_amqp_url_fini (&u);
    return c;
}

static void
s_delete_queue (const char *q)
{
    char err[256];
    amqp_connection_state_t c = s_connect (err, sizeof err);
    if (c) {
        amqp_queue_delete (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (q), 0, 0);
        cn_amqp_close (&c);
    }
}

static void
test_broker_connect_errors (void)
{
    char err[256] = "";
    cn_amqp_url_t u;
    /* Nothing listens on port 1. */
    CHECK_INT (cn_amqp_url_parse ("amqp://guest:guest@127.0.0.1:1", &u, err, sizeof err), 0);
    amqp_connection_state_t c = cn_amqp_connect (&u, 2000, 10, NULL, err, sizeof err);
    CHECK (c == NULL);
    CHECK (strstr (err, "connect to 127.0.0.1:1") != NULL);
    cn_amqp_url_fini (&u);

    /* Wrong password, unknown vhost: login fails with a reason. */
    CHECK_INT (cn_amqp_url_parse (s_url, &u, err, sizeof err), 0);
    free (u.password);
    u.password = strdup ("wrong-password");
    err[0] = '\0';
    c = cn_amqp_connect (&u, 5000, 10, NULL, err, sizeof err);
    CHECK (c == NULL);
    CHECK (strstr (err, "login") != NULL);
    cn_amqp_url_fini (&u);

    CHECK_INT (cn_amqp_url_parse (s_url, &u, err, sizeof err), 0);
    free (u.vhost);
    u.vhost = strdup ("no-such-vhost");
    err[0] = '\0';
    c = cn_amqp_connect (&u, 5000, 10, NULL, err, sizeof err);
    CHECK (c == NULL);
    CHECK (err[0] != '\0');
    cn_amqp_url_fini (&u);
}

static void
test_broker_declare (void)
{
    char err[256], q[64], qc[64];
    snprintf (q, sizeof q, "cnapi.test.%d.quorum", (int) getpid ());
    snprintf (qc, sizeof qc, "cnapi.test.%d.classic", (int) getpid ());
    amqp_connection_state_t c = s_connect (err, sizeof err);
    CHECK (c != NULL);
    if (!c) {
        printf ("  %s\n", err);
        return;
    }
    /* AUTO creates a quorum queue: declaring it again as quorum agrees. */
    CHECK_INT (cn_amqp_queue_declare (c, q, CN_AMQP_QUEUE_AUTO, NULL, err, sizeof err), 0);
    CHECK_INT (cn_amqp_queue_declare (c, q, CN_AMQP_QUEUE_QUORUM, NULL, err, sizeof err), 0);
    CHECK_INT (cn_amqp_queue_declare (c, q, CN_AMQP_QUEUE_AUTO, NULL, err, sizeof err), 0);
    /* Another type on an existing queue fails (406) and closes the channel. */
    CHECK_INT (cn_amqp_queue_declare (c, q, CN_AMQP_QUEUE_CLASSIC, NULL, err, sizeof err), -1);
    CHECK (strstr (err, "406") != NULL);
    cn_amqp_destroy (&c);

    /* An existing classic queue is used as it is by AUTO. */
    c = s_connect (err, sizeof err);
    CHECK (c != NULL);
    if (!c)
        return;
    CHECK_INT (cn_amqp_queue_declare (c, qc, CN_AMQP_QUEUE_CLASSIC, NULL, err, sizeof err), 0);
    CHECK_INT (cn_amqp_queue_declare (c, qc, CN_AMQP_QUEUE_AUTO, NULL, err, sizeof err), 0);
    CHECK_INT (cn_amqp_queue_declare (c, qc, CN_AMQP_QUEUE_CLASSIC, NULL, err, sizeof err), 0);
    cn_amqp_close (&c);
    CHECK (c == NULL);
    s_delete_queue (q);
    s_delete_queue (qc);
}

static void
test_broker_roundtrip (void)
{
    char err[256], q[64], key[96], bind[96];
    snprintf (q, sizeof q, "cnapi.test.%d.rt", (int) getpid ());
    snprintf (bind, sizeof bind, "cnapi.test.%d.#", (int) getpid ());
    snprintf (key, sizeof key, "cnapi.test.%d.ur.sysinfo." U ".9", (int) getpid ());
    const char *keys[] = { bind, NULL };
    amqp_connection_state_t c = s_connect (err, sizeof err);
    CHECK (c != NULL);
    if (!c)
        return;
    CHECK_INT (cn_amqp_queue_declare (c, q, CN_AMQP_QUEUE_AUTO, keys, err, sizeof err), 0);

    amqp_table_entry_t h[1];
    h[0].key = amqp_cstring_bytes (CN_AMQP_SENT_MS_HEADER);
    h[0].value.kind = AMQP_FIELD_KIND_I64;
    h[0].value.value.i64 = INT64_C (1764067796321);
    amqp_basic_properties_t props;
    memset (&props, 0, sizeof props);
    props._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    props.headers.num_entries = 1;
    props.headers.entries = h;
    CHECK_INT (amqp_basic_publish (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (CN_AMQP_EXCHANGE),
                                   amqp_cstring_bytes (key), 1, 0, &props,
                                   amqp_cstring_bytes ("{\"UUID\":\"" U "\"}")),
               AMQP_STATUS_OK);
    CHECK_INT (cn_amqp_consume (c, q, 10, "test", err, sizeof err), 0);

    amqp_envelope_t env;
    struct timeval tv = { 10, 0 };
    amqp_maybe_release_buffers (c);
    amqp_rpc_reply_t r = amqp_consume_message (c, &env, &tv, 0);
    CHECK_INT (r.reply_type, AMQP_RESPONSE_NORMAL);
    if (r.reply_type == AMQP_RESPONSE_NORMAL) {
        int64_t ms = 0;
        CHECK (cn_amqp_sent_ms (&env.message.properties, &ms));
        CHECK_INT (ms, INT64_C (1764067796321));
        /* The listener's key parser on the part after our test prefix. */
        size_t plen = strlen (bind) - 1;
        char out[37];
        CHECK (env.routing_key.len > plen);
        CHECK (cn_amqp_rk_uuid ((const char *) env.routing_key.bytes + plen,
                                env.routing_key.len - plen, out));
        CHECK_STR (out, U);
        CHECK_INT (amqp_basic_ack (c, CN_AMQP_CHANNEL, env.delivery_tag, 0), AMQP_STATUS_OK);
        amqp_destroy_envelope (&env);
    }
    cn_amqp_close (&c);
    s_delete_queue (q);
}

int
main (void)
{
    RUN (test_rk_good);
    RUN (test_rk_bad);
    RUN (test_sent_ms_header);
    RUN (test_sent_ms_bad);
    RUN (test_sent_ms_timestamp);
    RUN (test_url);
    RUN (test_keys);
    s_url = getenv ("CNAPI_TEST_AMQP");
    if (s_url && *s_url) {
        RUN (test_broker_connect_errors);
        RUN (test_broker_declare);
        RUN (test_broker_roundtrip);
    }
    else
        printf ("CNAPI_TEST_AMQP is not set: broker tests skipped\n");
    return cn_test_done ();
}
