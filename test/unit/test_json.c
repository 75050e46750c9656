/* Unit tests: lib/cn_json.c */
#include "cn_json.h"
#include "cn_test.h"

#include <stdlib.h>

/* Parse text without key, compare with jansson's own answer. */
static bool
s_same_as_jansson (const char *text, const char *key)
{
    json_error_t jerr;
    json_t *want = json_loads (text, 0, &jerr);
    if (want)
        json_object_del (want, key);
    json_t *got = cn_json_load_without (text, strlen (text), key);
    bool same = (!want && !got) || (want && got && json_equal (want, got));
    if (!same) {
        char *a = got ? json_dumps (got, JSON_COMPACT) : NULL;
        printf ("  for %s without %s got %s\n", text, key, a ? a : "(null)");
        free (a);
    }
    json_decref (want);
    json_decref (got);
    return same;
}

static void
test_positions (void)
{
    CHECK (s_same_as_jansson ("{\"a\":1,\"sysinfo\":{\"x\":[1,{\"y\":\"}\"}]},\"b\":2}", "sysinfo"));
    CHECK (s_same_as_jansson ("{\"sysinfo\":{\"x\":1},\"b\":2}", "sysinfo"));      /* first */
    CHECK (s_same_as_jansson ("{\"a\":1,\"sysinfo\":{\"x\":1}}", "sysinfo"));      /* last */
    CHECK (s_same_as_jansson ("{\"sysinfo\":{\"x\":1}}", "sysinfo"));              /* only */
    CHECK (s_same_as_jansson ("{ \"a\" : 1 , \"sysinfo\" : \"s\" , \"b\" : [ ] }", "sysinfo"));
    CHECK (s_same_as_jansson ("{\"a\":1}", "sysinfo"));                          /* absent */
    CHECK (s_same_as_jansson ("{}", "sysinfo"));
}

static void
test_tricky_strings (void)
{
    /* the key text inside strings and nested objects is not the member */
    CHECK (s_same_as_jansson ("{\"c\":\",\\\"sysinfo\\\":1\",\"sysinfo\":2}", "sysinfo"));
    CHECK (s_same_as_jansson ("{\"t\":{\"sysinfo\":1},\"sysinfo\":{\"q\":\"\\\\\"}}", "sysinfo"));
    CHECK (s_same_as_jansson ("{\"t\":{\"sysinfo\":1}}", "sysinfo"));
    CHECK (s_same_as_jansson ("{\"a\":\"[{\",\"sysinfo\":null,\"z\":true}", "sysinfo"));
    size_t s, e, vs, ve;
    const char *t = "{\"a\":1,\"sysinfo\":{\"k\":\"v\"}}";
    CHECK (cn_json_member_span (t, strlen (t), "sysinfo", &s, &e, &vs, &ve));
    CHECK (ve - vs == 9 && memcmp (t + vs, "{\"k\":\"v\"}", 9) == 0);
}

static void
test_malformed (void)
{
    size_t s, e, vs, ve;
    const char *bad[] = { "", "[1]", "{", "{\"a\"", "{\"a\":", "{\"a\":1,", "{\"sysinfo\":{",
                          "{\"sysinfo\":\"unterminated}", "{a:1}", "{\"a\" 1}", NULL };
    for (int i = 0; bad[i]; i++) {
        CHECK (!cn_json_member_span (bad[i], strlen (bad[i]), "sysinfo", &s, &e, &vs, &ve));
        json_t *j = cn_json_load_without (bad[i], strlen (bad[i]), "sysinfo");
        CHECK (j == NULL);
        json_decref (j);
    }
}

int
main (void)
{
    RUN (test_positions);
    RUN (test_tricky_strings);
    RUN (test_malformed);
    return cn_test_done ();
}
