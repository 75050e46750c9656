/*
 * bare-h2o: the ceiling the gateway is measured against.
 *
 *   bare-h2o ADDRESS PORT [BODY_BYTES]
 *
 * One thread running h2o's evloop with the gateway's h2o setup (one host,
 * one path "/", HTTP/1.1 only, the same server name), answering every GET
 * with a fixed ~1 KB JSON body (padded to BODY_BYTES with a "sysinfo"
 * string when given, to match the size of the answer it is compared with)
 * and every other method with 405. Nothing
 * else: no routing, no headers beyond content-type, no hand-off. Runs until
 * killed (SIGINT/SIGTERM exit at once).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <h2o.h>
#include <h2o/http1.h>

static h2o_globalconf_t s_config;
static h2o_context_t s_ctx;
static h2o_accept_ctx_t s_accept_ctx;
static char *s_body;
static size_t s_body_len;

static int
s_on_req (h2o_handler_t *self, h2o_req_t *req)
{
    static h2o_generator_t generator = { NULL, NULL };
    if (!h2o_memis (req->method.base, req->method.len, H2O_STRLIT ("GET"))) {
        req->res.status = 405;
        req->res.reason = "Method Not Allowed";
        req->res.content_length = 0;
        h2o_start_response (req, &generator);
        h2o_send (req, NULL, 0, H2O_SEND_STATE_FINAL);
        return 0;
    }
    req->res.status = 200;
    req->res.reason = "OK";
    req->res.content_length = s_body_len;
    h2o_add_header (&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                    H2O_STRLIT ("application/json"));
    h2o_iovec_t buf = h2o_iovec_init (s_body, s_body_len);
    h2o_start_response (req, &generator);
    h2o_send (req, &buf, 1, H2O_SEND_STATE_FINAL);
    return 0;
}

static void
s_on_accept (h2o_socket_t *listener, const char *err)
{
    if (err)
        return;
    for (int i = 0; i < 32; i++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept (listener);
        if (!sock)
            return;
        h2o_accept (&s_accept_ctx, sock);
    }
}

static void
s_on_signal (int sig)
{
    (void) sig;
    _exit (0);
}

int
main (int argc, char **argv)
{
    if (argc != 3 && argc != 4) {
        fprintf (stderr, "usage: bare-h2o ADDRESS PORT [BODY_BYTES]\n");
        return 2;
    }
    size_t want = argc == 4 ? (size_t) strtoul (argv[3], NULL, 10) : 0;
    size_t cap = (want > 1200 ? want : 1200) + 64;
    s_body = malloc (cap);
    if (!s_body)
        return 1;
    signal (SIGPIPE, SIG_IGN);
    signal (SIGINT, s_on_signal);
    signal (SIGTERM, s_on_signal);

    /* ~1 KB of JSON shaped like a server object */
    int n = snprintf (s_body, cap,
        "{\"uuid\":\"564d1b2a-8f2e-4c1d-9a3b-2f6e7d8c9b0a\",\"hostname\":\"cn-bench-0001\","
        "\"datacenter\":\"dc1\",\"status\":\"running\",\"setup\":true,\"setting_up\":false,"
        "\"headnode\":false,\"reserved\":false,\"reservoir\":false,\"ram\":262144,"
        "\"reservation_ratio\":0.15,\"current_platform\":\"20240101T000000Z\","
        "\"boot_platform\":\"20240101T000000Z\",\"last_boot\":\"2024-01-01T00:00:00.000Z\","
        "\"created\":\"2023-06-01T12:00:00.000Z\",\"traits\":{},\"comments\":\"\","
        "\"rack_identifier\":\"\",\"default_console\":\"serial\",\"serial\":\"ttyb\","
        "\"last_heartbeat\":\"2024-01-01T00:00:10.000Z\",\"memory_available_bytes\":"
        "201863462912,\"memory_arc_bytes\":34359738368,\"memory_total_bytes\":274877906944,"
        "\"memory_provisionable_bytes\":196568252416,\"disk_kvm_zvol_used_bytes\":0,"
        "\"disk_kvm_zvol_volsize_bytes\":0,\"disk_kvm_quota_bytes\":0,"
        "\"disk_zone_quota_bytes\":0,\"disk_cores_quota_bytes\":0,"
        "\"disk_installed_images_used_bytes\":10737418240,\"disk_pool_size_bytes\":"
        "3985729650688,\"disk_pool_alloc_bytes\":214748364800,\"overprovision_ratios\":{},"
        "\"unreserved_cpu\":6400,\"unreserved_ram\":187500,\"unreserved_disk\":3500000,"
        "\"uuid_conflicts\":[],\"agents\":[],\"vms\":{},\"boot_params\":{}}");
    s_body_len = (size_t) n;
    if (want > s_body_len + 16) {
        /* ...,"sysinfo":"xxxx"} */
        s_body_len--;
        s_body_len += (size_t) sprintf (s_body + s_body_len, ",\"sysinfo\":\"");
        while (s_body_len < want - 2)
            s_body[s_body_len++] = 'x';
        memcpy (s_body + s_body_len, "\"}", 3);
        s_body_len += 2;
    }

    h2o_config_init (&s_config);
    s_config.server_name = h2o_iovec_init (H2O_STRLIT ("cnapi/bare"));
    s_config.http1.upgrade_to_http2 = 0;
    h2o_hostconf_t *host = h2o_config_register_host (&s_config,
                                                     h2o_iovec_init (H2O_STRLIT ("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path (host, "/", 0);
    h2o_handler_t *h = h2o_create_handler (path, sizeof *h);
    h->on_req = s_on_req;

    h2o_evloop_t *loop = h2o_evloop_create ();
    h2o_context_init (&s_ctx, loop, &s_config);
    s_accept_ctx.ctx = &s_ctx;
    s_accept_ctx.hosts = s_config.hosts;

    struct sockaddr_in addr;
    memset (&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons ((uint16_t) atoi (argv[2]));
    if (inet_pton (AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf (stderr, "bare-h2o: bad address %s\n", argv[1]);
        return 2;
    }
    int fd, one = 1;
    if ((fd = socket (AF_INET, SOCK_STREAM, 0)) < 0
        || setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0
        || bind (fd, (struct sockaddr *) &addr, sizeof addr) != 0
        || listen (fd, SOMAXCONN) != 0) {
        fprintf (stderr, "bare-h2o: listen on %s:%s: %s\n", argv[1], argv[2], strerror (errno));
        return 1;
    }
    h2o_socket_t *sock = h2o_evloop_socket_create (loop, fd, H2O_SOCKET_FLAG_DONT_READ);
    h2o_socket_read_start (sock, s_on_accept);
    printf ("bare-h2o listening on %s:%s, body %zu bytes\n", argv[1], argv[2], s_body_len);
    fflush (stdout);
    while (h2o_evloop_run (loop, INT32_MAX) == 0)
        ;
    return 1;
}
