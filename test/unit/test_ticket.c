/* Unit tests: lib/cn_ticket.c */
#include "cn_test.h"
#include "cn_ticket.h"
#include "cn_util.h"

#include <stdlib.h>

static void
test_parse_time (void)
{
    int64_t ms = 0;
    CHECK (cn_ticket_parse_time ("1970-01-01T00:00:00.000Z", &ms));
    CHECK_INT (ms, 0);
    CHECK (cn_ticket_parse_time ("2026-11-25T10:49:56.123Z", &ms));
    char iso[32];
    CHECK_STR (cn_iso8601 (ms, iso, sizeof iso), "2026-11-25T10:49:56.123Z");
    CHECK (cn_ticket_parse_time ("2026-11-25T10:49:56Z", &ms));
    CHECK_STR (cn_iso8601 (ms, iso, sizeof iso), "2026-11-25T10:49:56.000Z");
    CHECK (cn_ticket_parse_time ("2026-11-25T12:49:56+02:00", &ms));
    CHECK_STR (cn_iso8601 (ms, iso, sizeof iso), "2026-11-25T10:49:56.000Z");
    CHECK (cn_ticket_parse_time ("2024-02-29T00:00Z", &ms));
    CHECK (!cn_ticket_parse_time ("2023-02-29T00:00:00Z", &ms));
    CHECK (!cn_ticket_parse_time ("2026-13-01T00:00:00Z", &ms));
    CHECK (!cn_ticket_parse_time ("tomorrow", &ms));
    CHECK (!cn_ticket_parse_time ("", &ms));
    CHECK (!cn_ticket_parse_time (NULL, &ms));
    CHECK (!cn_ticket_parse_time ("2026-11-25T10:49:56.Z", &ms));
    CHECK (!cn_ticket_parse_time ("2026-11-25T10:49:56Zjunk", &ms));
}

static void
test_queue_key (void)
{
    char *a = cn_ticket_queue_key ("s", "a/b", "c");
    char *b = cn_ticket_queue_key ("s", "a", "b/c");
    CHECK (strcmp (a, b) != 0);
    CHECK_STR (a, "s:3:a/b:c");
    free (a);
    free (b);
}

static void
test_new (void)
{
    cn_apierr_t e = { 0 };
    json_t *p = json_pack ("{s:s,s:s,s:s,s:s,s:{s:i}}", "scope", "vm", "id", "abc",
                           "expires_at", "2030-01-01T00:00:00Z", "action", "provision",
                           "extra", "n", 1);
    json_t *t = cn_ticket_new ("srv", p, "req-1", 1000, "11111111-1111-4111-8111-111111111111",
                               &e);
    CHECK (t != NULL);
    CHECK (cn_ticket_valid (t));
    CHECK_STR (json_string_value (json_object_get (t, "status")), "queued");
    CHECK_STR (json_string_value (json_object_get (t, "expires_at")),
               "2030-01-01T00:00:00.000Z");
    CHECK_STR (json_string_value (json_object_get (t, "queue")), "srv:2:vm:abc");
    CHECK_STR (json_string_value (json_object_get (t, "reqid")), "req-1");
    CHECK_INT (json_integer_value (json_object_get (json_object_get (t, "extra"), "n")), 1);
    json_t *v = cn_ticket_view (t);
    CHECK (json_object_get (v, "queue") == NULL);
    CHECK (json_object_get (v, "seq") == NULL);
    CHECK (json_object_get (v, "expires_ms") == NULL);
    CHECK (json_object_get (v, "uuid") != NULL);
    json_decref (v);
    json_decref (t);
    json_decref (p);

    /* missing scope and id, bad expires_at: every failure listed */
    p = json_pack ("{s:s}", "expires_at", "soon");
    t = cn_ticket_new ("srv", p, NULL, 1000, "11111111-1111-4111-8111-111111111111", &e);
    CHECK (t == NULL);
    CHECK_INT (e.status, 500);
    CHECK_STR (e.code, "InvalidParameters");
    CHECK_INT (json_array_size (e.errors), 3);
    cn_apierr_fini (&e);
    json_decref (p);
    p = json_pack ("{s:s,s:i,s:s,s:s}", "scope", "", "id", 5, "expires_at",
                   "2030-01-01T00:00:00Z", "extra", "x");
    t = cn_ticket_new ("srv", p, NULL, 1000, "11111111-1111-4111-8111-111111111111", &e);
    CHECK (t == NULL);
    CHECK_INT (json_array_size (e.errors), 3);
    cn_apierr_fini (&e);
    json_decref (p);
}

static json_t *
s_t (const char *uuid, const char *status, int64_t exp)
{
    return json_pack ("{s:s,s:s,s:I}", "uuid", uuid, "status", status, "expires_ms",
                      (json_int_t) exp);
}

static const char *
s_st (json_t *a, size_t i)
{
    return json_string_value (json_object_get (json_array_get (a, i), "status"));
}

static void
test_settle (void)
{
    json_t *q = json_array (), *ch = json_array ();
    json_array_append_new (q, s_t ("a", "queued", 100));
    json_array_append_new (q, s_t ("b", "queued", 100));
    CHECK_INT (cn_ticket_settle (q, 10, ch), 1);
    CHECK_STR (s_st (q, 0), "active");
    CHECK_STR (s_st (q, 1), "queued");
    /* nothing to do the second time */
    json_array_clear (ch);
    CHECK_INT (cn_ticket_settle (q, 10, ch), 0);
    /* the active one expires: the next becomes active */
    CHECK_INT (cn_ticket_settle (q, 100, ch), 2);
    CHECK_STR (s_st (q, 0), "expired");
    CHECK_STR (s_st (q, 1), "expired");
    json_decref (q);
    json_decref (ch);

    q = json_array ();
    ch = json_array ();
    json_array_append_new (q, s_t ("a", "active", 50));
    json_array_append_new (q, s_t ("b", "queued", 500));
    json_array_append_new (q, s_t ("c", "queued", 500));
    CHECK_INT (cn_ticket_settle (q, 60, ch), 2);
    CHECK_STR (s_st (q, 0), "expired");
    CHECK_STR (s_st (q, 1), "active");
    CHECK_STR (s_st (q, 2), "queued");
    CHECK (json_object_get (json_array_get (q, 1), "updated_at") != NULL);
    json_decref (q);
    json_decref (ch);

    /* two active (never written by us): the later one goes back to queued */
    q = json_array ();
    ch = json_array ();
    json_array_append_new (q, s_t ("a", "active", 500));
    json_array_append_new (q, s_t ("b", "active", 500));
    CHECK_INT (cn_ticket_settle (q, 60, ch), 1);
    CHECK_STR (s_st (q, 0), "active");
    CHECK_STR (s_st (q, 1), "queued");
    json_decref (q);
    json_decref (ch);
}

int
main (void)
{
    RUN (test_parse_time);
    RUN (test_queue_key);
    RUN (test_new);
    RUN (test_settle);
    return cn_test_done ();
}
