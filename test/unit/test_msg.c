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

int
main (void)
{
    RUN (test_golden_result);
    RUN (test_golden_sysinfo);
    RUN (test_roundtrip);
    RUN (test_rejects);
    return cn_test_done ();
}
