/* Unit tests: lib/cn_urproto.c (execute parameters, routing keys, output
 * capping, JSON-safe text) and cn_agent_ur_reply_body (lib/cn_agent_ur.c). */
#include "cn_test.h"
#include "cn_agent_ur.h"
#include "cn_urproto.h"

#include <stdlib.h>
#include <sys/wait.h>

/* 0 when params (JSON text) pass; else the 409 message into msg. */
static int
s_check (const char *params, cn_ur_req_t *r, char *msg, size_t len)
{
    json_t *p = json_loads (params, 0, NULL);
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    int rc = cn_ur_params_check (p, r, &e);
    if (rc != 0) {
        if (e.status != 409 || strcmp (e.code, "InvalidArgument") != 0)
            rc = -2;
        snprintf (msg, len, "%s", e.message);
    }
    cn_apierr_fini (&e);
    json_decref (p);
    return rc;
}

static void
test_params_ok (void)
{
    cn_ur_req_t r;
    char msg[256];
    CHECK_INT (s_check ("{\"script\":\"echo hi\"}", &r, msg, sizeof msg), 0);
    CHECK (r.timeout_s == CN_UR_DEFAULT_TIMEOUT_S);
    CHECK (!r.json);
    CHECK_INT (json_array_size (r.args), 0);
    CHECK_INT (json_object_size (r.env), 0);
    size_t len;
    char *body = cn_ur_req_body (&r, &len);
    json_t *b = json_loads (body, 0, NULL);
    CHECK_STR (json_string_value (json_object_get (b, "type")), "script");
    CHECK_STR (json_string_value (json_object_get (b, "script")), "echo hi");
    CHECK (json_is_array (json_object_get (b, "args")));
    CHECK (json_is_object (json_object_get (b, "env")));
    CHECK (json_number_value (json_object_get (b, "timeout")) == 60);
    json_decref (b);
    free (body);
    cn_ur_req_fini (&r);

    CHECK_INT (s_check ("{\"script\":\"x\",\"args\":[\"a\",\"b c\"],\"env\":{\"A\":\"1\"},"
                        "\"json\":true,\"timeout\":2.5}", &r, msg, sizeof msg), 0);
    CHECK (r.json);
    CHECK (r.timeout_s == 2.5);
    CHECK_INT (json_array_size (r.args), 2);
    CHECK_STR (json_string_value (json_object_get (r.env, "A")), "1");
    cn_ur_req_fini (&r);

    /* from a query string: strings */
    CHECK_INT (s_check ("{\"script\":\"x\",\"args\":\"one\",\"json\":\"true\",\"timeout\":\"10\"}",
                        &r, msg, sizeof msg), 0);
    CHECK (r.json);
    CHECK (r.timeout_s == 10);
    CHECK_INT (json_array_size (r.args), 1);
    cn_ur_req_fini (&r);
    CHECK_INT (s_check ("{\"script\":\"x\",\"timeout\":3600,\"json\":false,\"args\":null}",
                        &r, msg, sizeof msg), 0);
    cn_ur_req_fini (&r);
}

static void
test_params_bad (void)
{
    cn_ur_req_t r;
    char msg[256];
    CHECK_INT (s_check ("{}", &r, msg, sizeof msg), -1);
    CHECK_STR (msg, "script is required");
    CHECK (r.script == NULL && r.args == NULL);
    CHECK_INT (s_check ("{\"script\":42}", &r, msg, sizeof msg), -1);
    CHECK_STR (msg, "script must be a string");
    CHECK_INT (s_check ("{\"script\":\"x\",\"args\":[1]}", &r, msg, sizeof msg), -1);
    CHECK_STR (msg, "args must be an array of strings");
    CHECK_INT (s_check ("{\"script\":\"x\",\"args\":{}}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"env\":[]}", &r, msg, sizeof msg), -1);
    CHECK_STR (msg, "env must be an object of strings");
    CHECK_INT (s_check ("{\"script\":\"x\",\"env\":{\"A\":1}}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"env\":{\"A=B\":\"1\"}}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"timeout\":0}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"timeout\":-1}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"timeout\":3601}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"timeout\":\"soon\"}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"timeout\":true}", &r, msg, sizeof msg), -1);
    CHECK_INT (s_check ("{\"script\":\"x\",\"json\":\"yes\"}", &r, msg, sizeof msg), -1);
    CHECK_STR (msg, "json must be a boolean");
}

static void
test_rk (void)
{
    char uuid[37], id[CN_UR_REQID_MAX];
    const char *k = "ur.execute-reply.930896AF-bf8c-48d4-885c-6573a94b1853.abc-123_x";
    CHECK (cn_ur_rk_parse (k, strlen (k), CN_UR_REPLY_PREFIX, uuid, id));
    CHECK_STR (uuid, "930896af-bf8c-48d4-885c-6573a94b1853");
    CHECK_STR (id, "abc-123_x");
    CHECK (!cn_ur_rk_parse (k, strlen (k), CN_UR_EXECUTE_PREFIX, uuid, id));
    k = "ur.execute.930896af-bf8c-48d4-885c-6573a94b1853.r1";
    CHECK (cn_ur_rk_parse (k, strlen (k), CN_UR_EXECUTE_PREFIX, uuid, id));
    CHECK_STR (id, "r1");
    k = "ur.execute.930896af-bf8c-48d4-885c-6573a94b1853.";
    CHECK (!cn_ur_rk_parse (k, strlen (k), CN_UR_EXECUTE_PREFIX, uuid, id));
    k = "ur.execute.930896af-bf8c-48d4-885c-6573a94b1853.a.b";
    CHECK (!cn_ur_rk_parse (k, strlen (k), CN_UR_EXECUTE_PREFIX, uuid, id));
    k = "ur.execute.not-a-uuid-at-all-xxxxxxxxxxxxxxxxxxxxxxxxx.r";
    CHECK (!cn_ur_rk_parse (k, strlen (k), CN_UR_EXECUTE_PREFIX, uuid, id));
    CHECK (!cn_ur_rk_parse ("ur.execute.", 11, CN_UR_EXECUTE_PREFIX, uuid, id));
}

static void
test_cap (void)
{
    char buf[10];
    size_t len = 0;
    bool tr = false;
    CHECK_INT (cn_ur_cap_append (buf, &len, sizeof buf, "hello", 5, &tr), 5);
    CHECK (!tr);
    CHECK_INT (cn_ur_cap_append (buf, &len, sizeof buf, "world!!", 7, &tr), 5);
    CHECK (tr);
    CHECK_INT (len, 10);
    CHECK (memcmp (buf, "helloworld", 10) == 0);
    CHECK_INT (cn_ur_cap_append (buf, &len, sizeof buf, "x", 1, &tr), 0);
    CHECK_INT (len, 10);
}

static void
test_text (void)
{
    json_t *j = cn_ur_json_text ("plain é", strlen ("plain é"));
    CHECK_STR (json_string_value (j), "plain é");
    json_decref (j);
    /* a bad byte and a cut sequence become U+FFFD */
    j = cn_ur_json_text ("a\xff" "b\xc3", 4);
    CHECK_STR (json_string_value (j), "a\xEF\xBF\xBD" "b\xEF\xBF\xBD");
    json_decref (j);
    j = cn_ur_json_text ("a\0b", 3);
    CHECK_INT (json_string_length (j), 3);
    json_decref (j);
    j = cn_ur_json_text (NULL, 0);
    CHECK_STR (json_string_value (j), "");
    json_decref (j);
}

static void
test_reply_body (void)
{
    size_t len;
    char *b = cn_agent_ur_reply_body (3 << 8, "out", 3, "err", 3, false, false, &len);
    json_t *o = json_loads (b, 0, NULL);
    CHECK_INT (json_integer_value (json_object_get (o, "exit_status")), 3);
    CHECK_STR (json_string_value (json_object_get (o, "stdout")), "out");
    CHECK_STR (json_string_value (json_object_get (o, "stderr")), "err");
    CHECK (!json_object_get (o, "truncated"));
    CHECK (!json_object_get (o, "timed_out"));
    json_decref (o);
    free (b);
    b = cn_agent_ur_reply_body (9 /* SIGKILL */, "", 0, "", 0, true, true, &len);
    o = json_loads (b, 0, NULL);
    CHECK_INT (json_integer_value (json_object_get (o, "exit_status")), 137);
    CHECK_INT (json_integer_value (json_object_get (o, "signal")), 9);
    CHECK (json_is_true (json_object_get (o, "truncated")));
    CHECK (json_is_true (json_object_get (o, "timed_out")));
    json_decref (o);
    free (b);
}

int
main (void)
{
    RUN (test_params_ok);
    RUN (test_params_bad);
    RUN (test_rk);
    RUN (test_cap);
    RUN (test_text);
    RUN (test_reply_body);
    return cn_test_done ();
}
