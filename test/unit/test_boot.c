/* Unit tests: lib/cn_boot.c */
#include "cn_test.h"
#include "cn_boot.h"

#include <stdlib.h>

static void
test_check (void)
{
    cn_apierr_t e = { 0 };
    json_t *p = json_pack ("{s:s,s:{s:s}}", "platform", "20240101T000000Z", "kernel_args",
                           "a", "b");
    CHECK_INT (cn_boot_check (p, &e), 0);
    json_decref (p);
    p = json_pack ("{s:s,s:s,s:i}", "platform", " x", "kernel_args", "nope", "serial", 3);
    CHECK_INT (cn_boot_check (p, &e), -1);
    CHECK_INT (e.status, 500);
    CHECK_STR (e.code, "InvalidParameters");
    CHECK_INT (json_array_size (e.errors), 3);
    cn_apierr_fini (&e);
    json_decref (p);
    /* boot modules: 409 */
    p = json_pack ("{s:[{s:s,s:s},{s:s,s:s},{s:s}]}", "boot_modules", "path", "/a",
                   "content", "aGVsbG8=", "path", "/b", "content", "not base64!", "path", "/c");
    CHECK_INT (cn_boot_check (p, &e), -1);
    CHECK_INT (e.status, 409);
    CHECK_STR (e.code, "InvalidArgument");
    CHECK (strstr (e.message, "Contents for module /b must be base64 encoded") != NULL);
    CHECK (strstr (e.message, "Unexpected format for boot_module") != NULL);
    CHECK (strstr (e.message, "/a") == NULL);
    cn_apierr_fini (&e);
    json_decref (p);
    /* too big: 4 KiB + 3 bytes of content */
    size_t n = (4096 + 3) / 3 * 4;
    char *big = malloc (n + 1);
    memset (big, 'A', n);
    big[n] = 0;
    p = json_pack ("{s:[{s:s,s:s}]}", "boot_modules", "path", "/big", "content", big);
    CHECK_INT (cn_boot_check (p, &e), -1);
    CHECK (strstr (e.message, "exceeds the maximum allowed size") != NULL);
    cn_apierr_fini (&e);
    json_decref (p);
    free (big);
}

static void
test_apply (void)
{
    json_t *rec = json_pack ("{s:s,s:{s:s,s:s},s:{},s:s,s:s}", "hostname", "cn1",
                             "boot_params", "keep", "1", "drop", "2", "kernel_flags",
                             "boot_platform", "old", "serial", "ttya");
    /* POST merges; null deletes */
    json_t *p = json_pack ("{s:{s:s,s:n},s:{s:i}}", "kernel_args", "new", "3", "drop",
                           "kernel_flags", "f", 1);
    cn_boot_apply (rec, p, false, NULL, false);
    json_t *bp = json_object_get (rec, "boot_params");
    CHECK_STR (json_string_value (json_object_get (bp, "keep")), "1");
    CHECK_STR (json_string_value (json_object_get (bp, "new")), "3");
    CHECK (json_object_get (bp, "drop") == NULL);
    CHECK_STR (json_string_value (json_object_get (rec, "boot_platform")), "old");
    CHECK_STR (json_string_value (json_object_get (rec, "serial")), "ttya");
    json_decref (p);
    /* PUT replaces; no platform: the latest */
    p = json_pack ("{s:{s:s},s:[{s:s,s:s}]}", "kernel_args", "only", "x", "boot_modules",
                   "path", "/m", "content", "aGk=");
    cn_boot_apply (rec, p, true, "20250101T000000Z", false);
    bp = json_object_get (rec, "boot_params");
    CHECK_INT (json_object_size (bp), 1);
    CHECK_STR (json_string_value (json_object_get (rec, "boot_platform")), "20250101T000000Z");
    CHECK_STR (json_string_value (json_object_get (rec, "serial")), "ttyb");
    CHECK_STR (json_string_value (json_object_get (rec, "default_console")), "serial");
    CHECK_STR (json_string_value (json_object_get (
                   json_array_get (json_object_get (rec, "boot_modules"), 0), "type")), "base64");
    CHECK_INT (json_object_size (json_object_get (rec, "kernel_flags")), 0);
    json_decref (p);

    json_t *view = cn_boot_render (rec, false, "amqp://u:p@10.0.0.1:5673/v");
    json_t *ka = json_object_get (view, "kernel_args");
    CHECK_STR (json_string_value (json_object_get (ka, "rabbitmq")), "u:p:10.0.0.1:5673");
    CHECK_STR (json_string_value (json_object_get (ka, "hostname")), "cn1");
    CHECK_STR (json_string_value (json_object_get (ka, "only")), "x");
    CHECK_STR (json_string_value (json_object_get (view, "platform")), "20250101T000000Z");
    json_decref (view);
    json_decref (rec);

    json_t *def = json_object ();
    view = cn_boot_render (def, true, "amqp://localhost");
    CHECK_STR (json_string_value (json_object_get (view, "platform")), "latest");
    ka = json_object_get (view, "kernel_args");
    CHECK_STR (json_string_value (json_object_get (ka, "rabbitmq")), "guest:guest:localhost:5672");
    CHECK_STR (json_string_value (json_object_get (ka, "rabbitmq_dns")),
               "guest:guest:localhost:5672");
    json_decref (view);
    json_decref (def);
}

static void
test_platforms (void)
{
    json_t *set = json_object ();
    json_t *a = json_pack ("{s:s,s:s,s:{s:s}}", "current_platform", "20240101T000000Z",
                           "boot_platform", "20250101T000000Z", "sysinfo", "System Type",
                           "SunOS");
    json_t *b = json_pack ("{s:s,s:{s:s}}", "current_platform", "20230101T000000Z",
                           "sysinfo", "System Type", "Linux");
    json_t *c = json_pack ("{s:s}", "current_platform", "joyent_custom");
    cn_platforms_add (set, a);
    cn_platforms_add (set, b);
    cn_platforms_add (set, c);
    CHECK_INT (json_object_size (set), 4);
    CHECK_STR (cn_platforms_latest (set, NULL), "20250101T000000Z");
    CHECK_STR (cn_platforms_latest (set, "linux"), "20230101T000000Z");
    json_t *v = cn_platforms_view (set, NULL);
    CHECK_INT (json_object_size (v), 4);
    CHECK (json_is_true (json_object_get (json_object_get (v, "20250101T000000Z"), "latest")));
    CHECK_INT (json_object_size (json_object_get (v, "20240101T000000Z")), 0);
    json_decref (v);
    v = cn_platforms_view (set, "linux");
    CHECK_INT (json_object_size (v), 1);
    json_decref (v);
    v = cn_platforms_view (set, "plan9");
    CHECK_INT (json_object_size (v), 0);
    json_decref (v);
    json_decref (a);
    json_decref (b);
    json_decref (c);
    json_decref (set);
}

int
main (void)
{
    RUN (test_check);
    RUN (test_apply);
    RUN (test_platforms);
    return cn_test_done ();
}
