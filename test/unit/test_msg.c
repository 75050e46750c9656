/* Unit tests: proto/cn_msg.c (the envelope and golden bytes). */
#include "cn_msg.h"
#include "cn_test.h"

static bool
s_bytes_eq (zframe_t *f, const unsigned char *want, size_t n)
{
    if (zframe_size (f) != n) {
        printf ("  size %zu, expected %zu\n", zframe_size (f), n);
        return false;
    }
    return memcmp (zframe_data (f), want, n) == 0;
}

static void
test_golden_result (void)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "result", 2);
    cn_msgw_uint (&w, "tag", 7);
    cn_msgw_bool (&w, "ok", true);
    zframe_t *f = cn_msgw_frame (&w);
    static const unsigned char want[] = {
        0x84, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e', 0xa6, 'r', 'e', 's', 'u', 'l', 't',
        0xa3, 't', 'a', 'g', 0x07, 0xa2, 'o', 'k', 0xc3
    };
    CHECK (s_bytes_eq (f, want, sizeof want));
    zframe_destroy (&f);
    cn_msgw_fini (&w);
}

static void
test_golden_sysinfo (void)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "sysinfo", 4);
    cn_msgw_uint (&w, "tag", 300);
    cn_msgw_str (&w, "uuid", "u");
    cn_msgw_strn (&w, "sysinfo", "{}", 2);
    cn_msgw_int (&w, "sent_ms", -1);
    zframe_t *f = cn_msgw_frame (&w);
    static const unsigned char want[] = {
        0x86, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e', 0xa7, 's', 'y', 's', 'i', 'n', 'f', 'o',
        0xa3, 't', 'a', 'g', 0xcd, 0x01, 0x2c,
        0xa4, 'u', 'u', 'i', 'd', 0xa1, 'u',
        0xa7, 's', 'y', 's', 'i', 'n', 'f', 'o', 0xa2, '{', '}',
        0xa7, 's', 'e', 'n', 't', '_', 'm', 's', 0xff
    };
    CHECK (s_bytes_eq (f, want, sizeof want));
    zframe_destroy (&f);
    cn_msgw_fini (&w);
}

static void
test_roundtrip (void)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "status", 6);
    cn_msgw_str (&w, "actor", "writer");
    cn_msgw_int (&w, "neg", -5);
    cn_msgw_uint (&w, "big", 1ULL << 40);
    cn_msgw_double (&w, "avg", 2.5);
    cn_msgw_nil (&w, "none");
    json_t *j = json_pack ("{s:[i,s,b],s:{s:n}}", "arr", 1, "two", 1, "obj", "x");
    cn_msgw_json (&w, "nested", j);
    char *data;
    size_t size;
    cn_msgw_take (&w, &data, &size);
    cn_msg_t m;
    char err[128];
    CHECK (cn_msg_parse (&m, data, size, err, sizeof err) == 0);
    CHECK (cn_msg_is (&m, "status"));
    CHECK (!cn_msg_is (&m, "statu"));
    size_t len;
    const char *s = cn_msg_str (&m, "actor", &len);
    CHECK (s && len == 6 && memcmp (s, "writer", 6) == 0);
    char *dup = cn_msg_strdup (&m, "actor");
    CHECK_STR (dup, "writer");
    free (dup);
    int64_t i;
    CHECK (cn_msg_int (&m, "neg", &i) && i == -5);
    uint64_t u;
    CHECK (cn_msg_uint (&m, "big", &u) && u == (1ULL << 40));
    CHECK (!cn_msg_uint (&m, "neg", &u));
    double d;
    CHECK (cn_msg_double (&m, "avg", &d) && d == 2.5);
    CHECK (cn_msg_get (&m, "none") && cn_msg_get (&m, "none")->type == MSGPACK_OBJECT_NIL);
    CHECK (cn_msg_get (&m, "absent") == NULL);
    bool b;
    CHECK (!cn_msg_bool (&m, "actor", &b));
    json_t *back = cn_msgpack_to_json (cn_msg_get (&m, "nested"));
    CHECK (json_equal (back, j));
    json_decref (back);
    json_decref (j);
    cn_msg_fini (&m);
    cn_msg_fini (&m); /* idempotent */
    free (data);
}

static void
test_rejects (void)
{
    cn_msg_t m;
    char err[128];
    /* not msgpack at all / truncated */
    CHECK (cn_msg_parse (&m, "\xc1", 1, err, sizeof err) == -1);
    CHECK (cn_msg_parse (&m, "\x84\xa1", 2, err, sizeof err) == -1);
    CHECK (cn_msg_parse (&m, "", 0, err, sizeof err) == -1);
    /* an array, not a map */
    CHECK (cn_msg_parse (&m, "\x91\x01", 2, err, sizeof err) == -1);
    CHECK_STR (err, "message is not a map");
    /* map without version */
    static const unsigned char nov[] = { 0x81, 0xa4, 't', 'y', 'p', 'e', 0xa1, 'x' };
    CHECK (cn_msg_parse (&m, nov, sizeof nov, err, sizeof err) == -1);
    CHECK_STR (err, "message has no version");
    /* unknown major version */
    static const unsigned char v2[] = { 0x82, 0xa1, 'v', 0x02, 0xa4, 't', 'y', 'p', 'e', 0xa1, 'x' };
    CHECK (cn_msg_parse (&m, v2, sizeof v2, err, sizeof err) == -1);
    CHECK_STR (err, "unsupported message version");
    /* no type */
    static const unsigned char not[] = { 0x81, 0xa1, 'v', 0x01 };
    CHECK (cn_msg_parse (&m, not, sizeof not, err, sizeof err) == -1);
    CHECK_STR (err, "message has no type");
    /* trailing garbage */
    static const unsigned char trail[] = { 0x82, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e', 0xa1, 'x', 0x00 };
    CHECK (cn_msg_parse (&m, trail, sizeof trail, err, sizeof err) == -1);
    /* unknown keys are ignored */
    static const unsigned char extra[] = { 0x83, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e', 0xa1, 'x',
                                           0xa3, 'z', 'z', 'z', 0xc0 };
    CHECK (cn_msg_parse (&m, extra, sizeof extra, err, sizeof err) == 0);
    CHECK (cn_msg_is (&m, "x"));
    cn_msg_fini (&m);
}

/* The heartbeat without allocations: the same bytes as cn_msgw, and the
 * recogniser true for exactly those. */
static void
test_heartbeat (void)
{
    const uint64_t seqs[] = { 0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295ULL,
                              4294967296ULL, UINT64_MAX };
    const int64_t times[] = { 0, 5, 1795000000123LL, INT64_MAX, -1, -200, INT64_MIN };
    for (size_t i = 0; i < sizeof seqs / sizeof seqs[0]; i++)
        for (size_t j = 0; j < sizeof times / sizeof times[0]; j++) {
            cn_msgw_t w;
            cn_msgw_init (&w, "hb", 2);
            cn_msgw_uint (&w, "seq", seqs[i]);
            cn_msgw_int (&w, "sent_ms", times[j]);
            char *want = NULL;
            size_t wn = 0;
            cn_msgw_take (&w, &want, &wn);
            uint8_t got[CN_MSG_HB_MAX];
            size_t n = cn_msg_hb_write (got, seqs[i], times[j]);
            CHECK_INT (n, wn);
            CHECK (memcmp (got, want, n) == 0);
            /* plain exactly when sent_ms packs as an unsigned */
            CHECK (cn_msg_is_plain_hb (got, n) == (times[j] >= 0));
            cn_msg_t m;
            CHECK_INT (cn_msg_parse (&m, got, n, NULL, 0), 0);
            CHECK (cn_msg_is (&m, "hb"));
            uint64_t seq = 0;
            CHECK (cn_msg_uint (&m, "seq", &seq));
            CHECK (seq == seqs[i]);
            cn_msg_fini (&m);
            /* cut short or with a byte more: not plain */
            CHECK (!cn_msg_is_plain_hb (got, n - 1));
            got[n] = 0;
            CHECK (!cn_msg_is_plain_hb (got, n + 1));
            free (want);
        }
    /* the same fields in another order, another type, another version */
    cn_msgw_t w;
    cn_msgw_init (&w, "hb", 2);
    cn_msgw_int (&w, "sent_ms", 5);
    cn_msgw_uint (&w, "seq", 1);
    zframe_t *f = cn_msgw_frame (&w);
    CHECK (!cn_msg_is_plain_hb (zframe_data (f), zframe_size (f)));
    zframe_destroy (&f);
    cn_msgw_init (&w, "hx", 2);
    cn_msgw_uint (&w, "seq", 1);
    cn_msgw_int (&w, "sent_ms", 5);
    f = cn_msgw_frame (&w);
    CHECK (!cn_msg_is_plain_hb (zframe_data (f), zframe_size (f)));
    zframe_destroy (&f);
    uint8_t b[CN_MSG_HB_MAX];
    size_t n = cn_msg_hb_write (b, 1, 5);
    CHECK (cn_msg_is_plain_hb (b, n));
    b[3] = CN_MSG_VERSION + 1;
    CHECK (!cn_msg_is_plain_hb (b, n));
    /* a seq that is not an integer (a string in its place) */
    n = cn_msg_hb_write (b, 1, 5);
    b[16] = 0xa1;
    CHECK (!cn_msg_is_plain_hb (b, n));
    CHECK (!cn_msg_is_plain_hb (NULL, 0));
}

int
main (void)
{
    RUN (test_golden_result);
    RUN (test_golden_sysinfo);
    RUN (test_roundtrip);
    RUN (test_rejects);
    RUN (test_heartbeat);
    return cn_test_done ();
}
