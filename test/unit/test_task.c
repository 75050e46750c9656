/* Unit tests: lib/cn_task.c (the task record's rules) and lib/cn_httpc.c
 * (response parsing, and requests against a local listener). */
#include "cn_httpc.h"
#include "cn_task.h"
#include "cn_test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define T1 "930896af-bf8c-48d4-885c-6573a94b1853"
#define S1 "0ce1f2a4-9b5d-4d0e-9a3e-1c2b3d4e5f60"

static json_t *
s_new (void)
{
    json_t *p = json_pack ("{s:s}", "uuid", S1);
    cn_task_spec_t sp = { T1, "req-1", "machine_boot", S1, S1, p, "cnapi-1", T1,
                          1795000000123LL };
    json_t *rec = cn_task_new (&sp);
    json_decref (p);
    return rec;
}

static void
test_record (void)
{
    json_t *rec = s_new ();
    CHECK (cn_task_active (rec));
    CHECK_STR (json_string_value (json_object_get (rec, "timestamp")), "2026-11-18T11:06:40.123Z");
    CHECK_INT (cn_task_created_ms (rec), 1795000000123LL);
    /* not dispatched until the agent's first frame is applied */
    CHECK (json_is_false (json_object_get (rec, "dispatched")));

    json_t *ev = json_pack ("{s:i}", "pct", 50);
    CHECK_INT (cn_task_apply_event (rec, 1, "start", 1795000001000LL, NULL), 1);
    CHECK (json_is_true (json_object_get (rec, "dispatched")));
    CHECK_INT (cn_task_apply_event (rec, 2, "progress", 1795000002000LL, ev), 1);
    /* the same seq again, and an older one: nothing */
    CHECK_INT (cn_task_apply_event (rec, 2, "progress", 1795000002000LL, ev), 0);
    CHECK_INT (cn_task_apply_event (rec, 1, "start", 1795000001000LL, NULL), 0);
    CHECK_INT (json_array_size (json_object_get (rec, "history")), 2);
    CHECK_INT (json_integer_value (json_object_get (rec, "last_seq")), 2);
    /* an end at or below last_seq is stale */
    CHECK_INT (cn_task_apply_end (rec, 2, "complete", 1795000003000LL, NULL, NULL), 0);
    CHECK_INT (cn_task_apply_end (rec, 3, "bogus", 1795000003000LL, NULL, NULL), -1);
    json_t *res = json_pack ("{s:s}", "state", "running");
    CHECK_INT (cn_task_apply_end (rec, 3, "complete", 1795000003000LL, res, NULL), 1);
    CHECK (!cn_task_active (rec));
    CHECK_STR (json_string_value (json_object_get (rec, "status")), "complete");
    CHECK (json_equal (json_object_get (rec, "result"), res));
    CHECK_STR (json_string_value (json_object_get (rec, "finished_at")),
               "2026-11-18T11:06:43.000Z");
    CHECK_INT (json_array_size (json_object_get (rec, "history")), 3);
    /* ended: nothing changes it again */
    CHECK_INT (cn_task_apply_event (rec, 9, "late", 1795000009000LL, NULL), 0);
    CHECK_INT (cn_task_apply_end (rec, 9, "failure", 1795000009000LL, NULL, NULL), 0);
    CHECK_INT (cn_task_fail (rec, "DispatchLost", "x", 1795000009000LL), 0);
    {
        json_t *r2 = s_new ();
        CHECK_INT (cn_task_apply_end (r2, 1, "failure", 1795000001000LL, NULL, NULL), 1);
        CHECK (json_is_true (json_object_get (r2, "dispatched")));
        json_decref (r2);
    }
    CHECK_STR (json_string_value (json_object_get (rec, "status")), "complete");

    json_t *v = cn_task_view (rec);
    CHECK (!json_object_get (v, "params"));
    CHECK (!json_object_get (v, "instance_boot"));
    CHECK (!json_object_get (v, "last_seq"));
    CHECK (json_object_get (v, "history") != NULL);
    CHECK (json_object_get (rec, "params") != NULL);
    json_decref (v);
    json_decref (res);
    json_decref (ev);
    json_decref (rec);

    /* failure without an error gets one; cn_task_fail sets code/message */
    rec = s_new ();
    CHECK_INT (cn_task_apply_end (rec, 1, "failure", 1795000003000LL, NULL, NULL), 1);
    CHECK_STR (json_string_value (json_object_get (json_object_get (rec, "error"), "code")),
               "TaskFailed");
    json_decref (rec);
    rec = s_new ();
    CHECK_INT (cn_task_fail (rec, "AgentPaused", "paused", 1795000003000LL), 1);
    CHECK_STR (json_string_value (json_object_get (rec, "status")), "failure");
    CHECK_STR (json_string_value (json_object_get (json_object_get (rec, "error"), "code")),
               "AgentPaused");
    CHECK_INT (cn_task_fail (rec, "AgentUnreachable", "again", 1795000004000LL), 0);
    json_decref (rec);
}

static void
test_timeout_param (void)
{
    int t = 0;
    CHECK_INT (cn_task_parse_timeout (NULL, &t), 0);
    CHECK_INT (t, 3600);
    json_t *v;
#define TRY(json, rc, want) do { v = json; CHECK_INT (cn_task_parse_timeout (v, &t), rc); \
        if (rc == 0) { CHECK_INT (t, want); } json_decref (v); } while (0)
    TRY (json_string ("1"), 0, 1);
    TRY (json_string ("3600"), 0, 3600);
    TRY (json_integer (30), 0, 30);
    TRY (json_string ("0"), -1, 0);
    TRY (json_string ("3601"), -1, 0);
    TRY (json_string ("-5"), -1, 0);
    TRY (json_string ("abc"), -1, 0);
    TRY (json_string ("1.5"), -1, 0);
    TRY (json_string (""), -1, 0);
    TRY (json_string ("99999999999999"), -1, 0);
    TRY (json_pack ("[s,s]", "1", "2"), -1, 0);
    TRY (json_true (), -1, 0);
#undef TRY
    CHECK_STR (cn_task_action_task ("start"), "machine_boot");
    CHECK_STR (cn_task_action_task ("stop"), "machine_shutdown");
    CHECK_STR (cn_task_action_task ("reboot"), "machine_reboot");
    CHECK_STR (cn_task_action_task ("kill"), "machine_kill");
    CHECK_STR (cn_task_action_task ("update"), "machine_update");
    CHECK (cn_task_action_task ("explode") == NULL);
    CHECK_INT (cn_iso8601_parse ("2026-11-18T11:06:40Z"), 1795000000000LL);
    CHECK_INT (cn_iso8601_parse ("2026-11-18T11:06:40.5Z"), 1795000000500LL);
    CHECK_INT (cn_iso8601_parse ("yesterday"), -1);
}

static void
test_parse (void)
{
    int st = 0;
    const char *body;
    size_t blen;
    bool owned;
    const char *r1 = "HTTP/1.1 202 Accepted\r\nContent-Length: 8\r\n\r\n{\"id\":1}";
    CHECK_INT (cn_httpc_parse (r1, strlen (r1), false, &st, &body, &blen, &owned), 1);
    CHECK_INT (st, 202);
    CHECK_INT (blen, 8);
    CHECK (!owned && memcmp (body, "{\"id\":1}", 8) == 0);
    /* incomplete */
    CHECK_INT (cn_httpc_parse (r1, strlen (r1) - 1, false, &st, &body, &blen, &owned), 0);
    CHECK_INT (cn_httpc_parse (r1, strlen (r1) - 1, true, &st, &body, &blen, &owned), -1);
    CHECK_INT (cn_httpc_parse (r1, 10, false, &st, &body, &blen, &owned), 0);
    /* chunked */
    const char *r2 = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
    CHECK_INT (cn_httpc_parse (r2, strlen (r2), false, &st, &body, &blen, &owned), 1);
    CHECK_INT (st, 200);
    CHECK_INT (blen, 9);
    CHECK (owned && memcmp (body, "Wikipedia", 9) == 0);
    if (owned)
        free ((char *) body);
    CHECK_INT (cn_httpc_parse (r2, strlen (r2) - 2, false, &st, &body, &blen, &owned), 0);
    /* no length: to EOF */
    const char *r3 = "HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nnope";
    CHECK_INT (cn_httpc_parse (r3, strlen (r3), false, &st, &body, &blen, &owned), 0);
    CHECK_INT (cn_httpc_parse (r3, strlen (r3), true, &st, &body, &blen, &owned), 1);
    CHECK_INT (st, 404);
    CHECK_INT (blen, 4);
    /* interim 100, then 204 */
    const char *r4 = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
    CHECK_INT (cn_httpc_parse (r4, strlen (r4), false, &st, &body, &blen, &owned), 1);
    CHECK_INT (st, 204);
    CHECK_INT (blen, 0);
    /* garbage */
    const char *r5 = "SSH-2.0-OpenSSH\r\n\r\n";
    CHECK_INT (cn_httpc_parse (r5, strlen (r5), false, &st, &body, &blen, &owned), -1);
    const char *r6 = "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
    CHECK_INT (cn_httpc_parse (r6, strlen (r6), false, &st, &body, &blen, &owned), -1);
}

/* A listener answering each connection with one canned response (or
 * nothing, to test the timeout). */
typedef struct {
    int fd;
    int n;
    const char *answer;       /* NULL: read and never answer */
} srv_t;

static void *
s_server (void *arg)
{
    srv_t *s = arg;
    int held[16], nheld = 0;
    for (int i = 0; i < s->n; i++) {
        int c = accept (s->fd, NULL, NULL);
        if (c < 0)
            break;
        char buf[4096];
        ssize_t got = 0, r;
        /* read the request head and its body (Content-Length: small) */
        while ((r = recv (c, buf + got, sizeof buf - 1 - (size_t) got, 0)) > 0) {
            got += r;
            buf[got] = 0;
            char *e = strstr (buf, "\r\n\r\n");
            char *cl = strstr (buf, "Content-Length: ");
            if (e && (!cl || (size_t) (got - (e + 4 - buf)) >= (size_t) atoi (cl + 16)))
                break;
        }
        if (s->answer) {
            ssize_t w = send (c, s->answer, strlen (s->answer), MSG_NOSIGNAL);
            (void) w;
            close (c);
        }
        else
        if (nheld < 16)
            held[nheld++] = c;
    }
    /* hold the unanswered ones until the client gives up on them */
    for (int i = 0; i < nheld; i++) {
        char b[256];
        while (recv (held[i], b, sizeof b, 0) > 0)
            ;
        close (held[i]);
    }
    return NULL;
}

typedef struct {
    int done;
    int status[8];
    const char *err[8];
    char body[8][64];
    zloop_t *loop;
} results_t;

static results_t *s_res;

static void
s_cb (const cn_httpc_res_t *res, void *arg)
{
    int i = (int) (intptr_t) arg;
    s_res->status[i] = res->status;
    s_res->err[i] = res->err;
    snprintf (s_res->body[i], sizeof s_res->body[i], "%.*s", (int) res->len,
              res->body ? res->body : "");
    s_res->done++;
}

static int
s_stop_when_done (zloop_t *loop, int timer_id, void *arg)
{
    int *want = arg;
    return s_res->done >= *want ? -1 : 0;
}

static int
s_listen (int *port)
{
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET };
    sin.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
    bind (fd, (struct sockaddr *) &sin, sizeof sin);
    socklen_t sl = sizeof sin;
    getsockname (fd, (struct sockaddr *) &sin, &sl);
    listen (fd, 16);
    *port = ntohs (sin.sin_port);
    return fd;
}

static void
test_requests (void)
{
    results_t res;
    memset (&res, 0, sizeof res);
    s_res = &res;
    int port = 0;
    srv_t srv = { s_listen (&port), 3,
                  "HTTP/1.1 202 Accepted\r\nContent-Length: 9\r\n\r\n{\"id\":7}\n" };
    pthread_t th;
    pthread_create (&th, NULL, s_server, &srv);
    zloop_t *loop = zloop_new ();
    cn_httpc_t *c = cn_httpc_new (loop, 1, 2000);
    /* three through one slot (queued), one bad address, one refused */
    for (int i = 0; i < 3; i++)
        cn_httpc_request (c, "127.0.0.1", port, "POST", "/tasks", "x-a: b\r\n", "{}", 2, s_cb,
                          (void *) (intptr_t) i);
    CHECK_INT (cn_httpc_in_flight (c), 1);
    CHECK_INT (cn_httpc_queued (c), 2);
    cn_httpc_request (c, "not-an-ip", port, "GET", "/", NULL, NULL, 0, s_cb, (void *) 3);
    int dead = 0;
    int dfd = s_listen (&dead);
    close (dfd);                /* nothing listens there now */
    cn_httpc_request (c, "127.0.0.1", dead, "GET", "/", NULL, NULL, 0, s_cb, (void *) 4);
    CHECK_INT (res.done, 0);    /* never from inside the call */
    int want = 5;
    zloop_timer (loop, 10, 0, s_stop_when_done, &want);
    zloop_timer (loop, 5000, 1, s_stop_when_done, &(int) { 0 });
    zloop_start (loop);
    CHECK_INT (res.done, 5);
    for (int i = 0; i < 3; i++) {
        CHECK_INT (res.status[i], 202);
        CHECK (res.err[i] == NULL);
        CHECK_STR (res.body[i], "{\"id\":7}\n");
    }
    CHECK_STR (res.err[3], "bad address");
    CHECK_STR (res.err[4], "connect");
    pthread_join (th, NULL);
    close (srv.fd);

    /* a listener that never answers: timeout */
    memset (&res, 0, sizeof res);
    srv_t mute = { s_listen (&port), 1, NULL };
    pthread_create (&th, NULL, s_server, &mute);
    cn_httpc_destroy (&c);
    zloop_destroy (&loop);
    loop = zloop_new ();
    c = cn_httpc_new (loop, 4, 300);
    cn_httpc_request (c, "127.0.0.1", port, "GET", "/tasks/x", NULL, NULL, 0, s_cb, (void *) 0);
    want = 1;
    zloop_timer (loop, 10, 0, s_stop_when_done, &want);
    zloop_timer (loop, 5000, 1, s_stop_when_done, &(int) { 0 });
    zloop_start (loop);
    CHECK_INT (res.done, 1);
    CHECK_STR (res.err[0], "timeout");
    CHECK_INT (cn_httpc_in_flight (c), 0);
    /* destroy with a request outstanding: no callback, nothing leaks */
    cn_httpc_request (c, "127.0.0.1", port, "GET", "/", NULL, NULL, 0, s_cb, (void *) 1);
    cn_httpc_destroy (&c);
    CHECK_INT (res.done, 1);
    pthread_join (th, NULL);
    close (mute.fd);
    zloop_destroy (&loop);
}

/* A listener that serves up to per requests on each of conns connections
 * (keep-alive), then closes that connection. */
typedef struct {
    int fd;
    int conns, per;
    int accepted, served;
} ka_t;

static void *
s_ka_server (void *arg)
{
    ka_t *s = arg;
    const char *answer = "HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok";
    for (int i = 0; i < s->conns; i++) {
        int c = accept (s->fd, NULL, NULL);
        if (c < 0)
            break;
        s->accepted++;
        for (int j = 0; j < s->per; j++) {
            char buf[4096];
            ssize_t got = 0, r = 0;
            while ((r = recv (c, buf + got, sizeof buf - 1 - (size_t) got, 0)) > 0) {
                got += r;
                buf[got] = 0;
                char *e = strstr (buf, "\r\n\r\n");
                char *cl = strstr (buf, "Content-Length: ");
                if (e && (!cl || (size_t) (got - (e + 4 - buf)) >= (size_t) atoi (cl + 16)))
                    break;
            }
            if (r <= 0)
                break;
            ssize_t w = send (c, answer, strlen (answer), MSG_NOSIGNAL);
            (void) w;
            s->served++;
        }
        close (c);
    }
    return NULL;
}

/* Keep-alive: requests to one host reuse its idle connection; one closed
 * by the peer meanwhile is replaced by a new connection, unseen by the
 * caller. */
static void
test_keepalive (void)
{
    results_t res;
    memset (&res, 0, sizeof res);
    s_res = &res;
    int port = 0;
    ka_t srv = { s_listen (&port), 2, 3, 0, 0 };
    pthread_t th;
    pthread_create (&th, NULL, s_ka_server, &srv);
    zloop_t *loop = zloop_new ();
    cn_httpc_t *c = cn_httpc_new (loop, 1, 2000);
    for (int i = 0; i < 3; i++)
        cn_httpc_request (c, "127.0.0.1", port, "POST", "/tasks", NULL, "{}", 2, s_cb,
                          (void *) (intptr_t) i);
    int want = 3;
    zloop_timer (loop, 10, 0, s_stop_when_done, &want);
    zloop_timer (loop, 5000, 1, s_stop_when_done, &(int) { 0 });
    zloop_start (loop);
    CHECK_INT (res.done, 3);
    for (int i = 0; i < 3; i++) {
        CHECK_INT (res.status[i], 202);
        CHECK_STR (res.body[i], "ok");
    }
    CHECK_INT (srv.accepted, 1);
    /* the server closed that connection after 3: the next one connects anew */
    cn_httpc_request (c, "127.0.0.1", port, "POST", "/tasks", NULL, "{}", 2, s_cb,
                      (void *) (intptr_t) 3);
    want = 4;
    zloop_timer (loop, 5000, 1, s_stop_when_done, &(int) { 0 });
    zloop_start (loop);
    CHECK_INT (res.done, 4);
    CHECK_INT (res.status[3], 202);
    CHECK (res.err[3] == NULL);
    CHECK_INT (srv.accepted, 2);
    CHECK_INT (srv.served, 4);
    cn_httpc_destroy (&c);      /* closes the idle connection: the server ends */
    zloop_destroy (&loop);
    close (srv.fd);
    pthread_join (th, NULL);
}

int
main (void)
{
    RUN (test_record);
    RUN (test_timeout_param);
    RUN (test_parse);
    RUN (test_requests);
    RUN (test_keepalive);
    return cn_test_done ();
}
