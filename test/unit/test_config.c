/* Unit tests: lib/cn_config.c */
#include "cn_config.h"
#include "cn_test.h"

#include <stdlib.h>
#include <unistd.h>

static char s_path[64];

static void
s_write (const char *text)
{
    snprintf (s_path, sizeof s_path, "/tmp/cn_config_test_%d.json", (int) getpid ());
    FILE *f = fopen (s_path, "w");
    fputs (text, f);
    fclose (f);
}

static void
test_defaults (void)
{
    char err[256];
    cn_config_t *c = cn_config_load (NULL, err, sizeof err);
    CHECK (c != NULL);
    CHECK_STR (c->amqp_queue, "ur.cnapi");
    CHECK_INT (c->http_port, 8080);
    CHECK_INT (c->sysinfo_freshness_s, 90);
    CHECK_INT (c->tasks_per_agent, 8);
    CHECK_INT (c->tasks_agent_timeout_ms, 10000);
    CHECK_INT (c->tasks_sweep_ms, 5000);
    CHECK_INT (c->tasks_max_age_s, 3600);
    CHECK (c->instance && *c->instance);
    CHECK (c->admin_endpoint && strstr (c->admin_endpoint, c->instance));
    cn_config_destroy (&c);
    CHECK (c == NULL);
    cn_config_destroy (&c);
}

static void
test_file_and_env (void)
{
    s_write ("{\"instance\":\"cnapi-7\",\"http\":{\"port\":9001,\"address\":\"127.0.0.3\"},"
             "\"amqp\":{\"url\":\"amqp://guest:secret@127.0.0.1:1\"},\"writer\":{\"max_batch\":64}}");
    setenv ("CNAPI_HTTP_PORT", "9002", 1);
    setenv ("CNAPI_REDIS_URL", "redis://127.0.0.1:7/3", 1);
    char err[256];
    cn_config_t *c = cn_config_load (s_path, err, sizeof err);
    CHECK (c != NULL);
    if (c) {
        CHECK_STR (c->instance, "cnapi-7");
        CHECK_INT (c->http_port, 9002);        /* environment wins */
        CHECK_STR (c->http_address, "127.0.0.3");
        CHECK_STR (c->redis_url, "redis://127.0.0.1:7/3");
        CHECK_INT (c->writer_max_batch, 64);
        char *dump = cn_config_dump (c);
        CHECK (dump && strstr (dump, "secret") == NULL);   /* masked */
        CHECK (dump && strstr (dump, "\"max_batch\": 64"));
        free (dump);
    }
    cn_config_destroy (&c);
    unsetenv ("CNAPI_HTTP_PORT");
    unsetenv ("CNAPI_REDIS_URL");
}

static void
test_errors (void)
{
    char err[256];
    s_write ("{\"http\":{\"port\":\"eighty\"}}");
    CHECK (cn_config_load (s_path, err, sizeof err) == NULL);
    CHECK (strstr (err, "http.port must be an integer"));
    s_write ("{\"http\":{\"port\":70000}}");
    CHECK (cn_config_load (s_path, err, sizeof err) == NULL);
    CHECK (strstr (err, "between"));
    s_write ("{\"http\":");
    CHECK (cn_config_load (s_path, err, sizeof err) == NULL);
    s_write ("[1]");
    CHECK (cn_config_load (s_path, err, sizeof err) == NULL);
    CHECK (cn_config_load ("/nonexistent/cnapid.json", err, sizeof err) == NULL);
    setenv ("CNAPI_AMQP_PREFETCH", "12x", 1);
    CHECK (cn_config_load (NULL, err, sizeof err) == NULL);
    CHECK (strstr (err, "CNAPI_AMQP_PREFETCH"));
    unsetenv ("CNAPI_AMQP_PREFETCH");
    s_write ("{\"tasks\":{\"per_agent\":0}}");
    CHECK (cn_config_load (s_path, err, sizeof err) == NULL);
    CHECK (strstr (err, "tasks.per_agent"));
    setenv ("CNAPI_TASKS_SWEEP_MS", "250", 1);
    cn_config_t *c = cn_config_load (NULL, err, sizeof err);
    CHECK (c && c->tasks_sweep_ms == 250);
    cn_config_destroy (&c);
    unsetenv ("CNAPI_TASKS_SWEEP_MS");
    unlink (s_path);
}

int
main (void)
{
    RUN (test_defaults);
    RUN (test_file_and_env);
    RUN (test_errors);
    return cn_test_done ();
}
