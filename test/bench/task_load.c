/*
 * task-load: the load generator of test/bench/tasks.sh's dispatch and max
 * runs, in C: the same requests, pacing and output as tasks_tool.py's
 * `dispatch` / `max`, at a fraction of the CPU (sixteen Python processes
 * took ~15% of one of the machine's two cores at 1,000 requests/s, which
 * the system under test then waited for).
 *
 *   task-load --host H --port P --prefix HEX8 --cns N [--vms V] --seconds S
 *             (--rate R | --closed) [--threads T] [--out FILE]
 *
 * Sender k of T (a thread, one keep-alive connection) sends requests k,
 * k+T, ... : POST /servers/<prefix>-0000-4000-8000-<i>/vms/<vm>/update with
 * body {}, i = n % N, the VM j = (n / N) % V (tasks_tool.py's server_uuid
 * and vm_uuid). Paced (--rate): request n is due at t0 + n / R; a sender
 * more than 5 ms late sends at once and counts a late send. Closed: as fast
 * as answers come, for S seconds. --out: one line per request "<id>
 * <send_ms> <answer_ms> <status>" (wall clock ms, 3 decimals; id "-" when
 * not 200), sorted by send time. stdout: one JSON line, the same keys as
 * tasks_tool.py (mode, target_rate, threads, sent, ok, errors, late_sends,
 * achieved_rate, answer_ms {n, p50, p90, p99, max}).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    char id[40];
    double ts, ta;
    int status;
} row_t;

typedef struct {
    int k;
    row_t *rows;
    size_t nrows, cap;
    long late, errors;
} sender_t;

static const char *s_host = "127.0.0.1";
static int s_port, s_cns, s_vms = 10, s_threads = 16;
static double s_rate, s_seconds;
static bool s_closed;
static const char *s_prefix;
static double s_t0_ms, s_end_ms;

static double
s_now_ms (void)
{
    struct timespec t;
    clock_gettime (CLOCK_REALTIME, &t);
    return (double) t.tv_sec * 1000.0 + (double) t.tv_nsec / 1e6;
}

static int
s_connect (void)
{
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons ((uint16_t) s_port) };
    int one = 1;
    struct timeval tv = { .tv_sec = 30 };
    setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt (fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (inet_pton (AF_INET, s_host, &a.sin_addr) != 1
        || connect (fd, (struct sockaddr *) &a, sizeof a) != 0) {
        close (fd);
        return -1;
    }
    return fd;
}

/* One request on *fd (connected on demand); the status (0 on an I/O
 * error, the connection then closed) and the task id from the body. */
static int
s_request (int *fd, const char *path, char *id, size_t idlen)
{
    static __thread char buf[65536];
    char req[512];
    int n = snprintf (req, sizeof req,
                      "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                      "Content-Length: 2\r\n\r\n{}", path, s_host, s_port);
    if (*fd < 0 && (*fd = s_connect ()) < 0)
        return 0;
    if (send (*fd, req, (size_t) n, MSG_NOSIGNAL) != n)
        goto fail;
    size_t have = 0;
    char *body = NULL;
    long clen = -1;
    for (int rounds = 0; rounds < 10000; rounds++) {       /* bounded */
        ssize_t r = recv (*fd, buf + have, sizeof buf - 1 - have, 0);
        if (r <= 0)
            goto fail;
        have += (size_t) r;
        buf[have] = 0;
        if (!body) {
            char *e = strstr (buf, "\r\n\r\n");
            if (!e)
                continue;
            body = e + 4;
            char *cl = strcasestr (buf, "\r\ncontent-length:");
            clen = cl && cl < e ? strtol (cl + 17, NULL, 10) : 0;
        }
        if (body && (size_t) (body - buf) + (size_t) clen <= have)
            break;
        if (have >= sizeof buf - 1)
            goto fail;
    }
    if (!body)
        goto fail;
    int status = atoi (buf + 9);
    id[0] = 0;
    char *p = strstr (body, "\"id\":\"");
    if (p) {
        p += 6;
        size_t i = 0;
        while (p[i] && p[i] != '"' && i + 1 < idlen) {
            id[i] = p[i];
            i++;
        }
        id[i] = 0;
    }
    if (strcasestr (buf, "\r\nconnection: close") && strcasestr (buf, "\r\nconnection: close") < body) {
        close (*fd);
        *fd = -1;
    }
    return status;
fail:
    close (*fd);
    *fd = -1;
    return 0;
}

static void
s_sleep_until_ms (double due)
{
    double d = due - s_now_ms ();
    if (d <= 0)
        return;
    struct timespec t = { .tv_sec = (time_t) (d / 1000.0),
                          .tv_nsec = (long) (fmod (d, 1000.0) * 1e6) };
    nanosleep (&t, NULL);
}

static void *
s_sender (void *arg)
{
    sender_t *s = arg;
    int fd = -1;
    long total = s_closed ? -1 : (long) (s_rate * s_seconds);
    for (long n = s->k;; n += s_threads) {
        if (s_closed) {
            if (s_now_ms () >= s_end_ms)
                break;
        }
        else {
            if (n >= total)
                break;
            double due = s_t0_ms + (double) n * 1000.0 / s_rate;
            double d = due - s_now_ms ();
            if (d > 0)
                s_sleep_until_ms (due);
            else if (d < -5)
                s->late++;
        }
        long i = n % s_cns, j = (n / s_cns) % s_vms;
        char path[160];
        snprintf (path, sizeof path,
                  "/servers/%s-0000-4000-8000-%012lx/vms/%s-%04lx-4000-a000-%012lx/update",
                  s_prefix, i, s_prefix, j, i);
        char id[40];
        double ts = s_now_ms ();
        int st = s_request (&fd, path, id, sizeof id);
        double ta = s_now_ms ();
        if (st == 0) {
            s->errors++;
            continue;
        }
        if (st != 200)
            s->errors++;
        if (s->nrows == s->cap) {
            s->cap = s->cap ? s->cap * 2 : 1024;
            s->rows = realloc (s->rows, s->cap * sizeof *s->rows);
            if (!s->rows)
                abort ();
        }
        row_t *r = &s->rows[s->nrows++];
        snprintf (r->id, sizeof r->id, "%s", st == 200 && id[0] ? id : "-");
        r->ts = ts;
        r->ta = ta;
        r->status = st;
    }
    if (fd >= 0)
        close (fd);
    return NULL;
}

static int
s_cmp_ts (const void *a, const void *b)
{
    double x = ((const row_t *) a)->ts, y = ((const row_t *) b)->ts;
    return x < y ? -1 : x > y;
}

static int
s_cmp_d (const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return x < y ? -1 : x > y;
}

/* tasks_tool.py's pct: sorted, index round (p/100 * n + 0.5) - 1, clamped */
static double
s_pct (const double *xs, size_t n, double p)
{
    long k = lround (p / 100.0 * (double) n + 0.5) - 1;
    if (k < 0)
        k = 0;
    if (k > (long) n - 1)
        k = (long) n - 1;
    return xs[k];
}

int
main (int argc, char **argv)
{
    const char *out = NULL;
    enum { O_HOST = 256, O_PORT, O_PREFIX, O_CNS, O_VMS, O_SECS, O_RATE, O_CLOSED, O_THR, O_OUT };
    static const struct option opts[] = {
        { "host", required_argument, NULL, O_HOST },
        { "port", required_argument, NULL, O_PORT },
        { "prefix", required_argument, NULL, O_PREFIX },
        { "cns", required_argument, NULL, O_CNS },
        { "vms", required_argument, NULL, O_VMS },
        { "seconds", required_argument, NULL, O_SECS },
        { "rate", required_argument, NULL, O_RATE },
        { "closed", no_argument, NULL, O_CLOSED },
        { "threads", required_argument, NULL, O_THR },
        { "out", required_argument, NULL, O_OUT },
        { NULL, 0, NULL, 0 }
    };
    int ch;
    while ((ch = getopt_long (argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_HOST: s_host = optarg; break;
        case O_PORT: s_port = atoi (optarg); break;
        case O_PREFIX: s_prefix = optarg; break;
        case O_CNS: s_cns = atoi (optarg); break;
        case O_VMS: s_vms = atoi (optarg); break;
        case O_SECS: s_seconds = atof (optarg); break;
        case O_RATE: s_rate = atof (optarg); break;
        case O_CLOSED: s_closed = true; break;
        case O_THR: s_threads = atoi (optarg); break;
        case O_OUT: out = optarg; break;
        default:
            fprintf (stderr, "usage: task-load --host H --port P --prefix HEX8 --cns N [--vms V] "
                             "--seconds S (--rate R | --closed) [--threads T] [--out FILE]\n");
            return 2;
        }
    }
    if (!s_port || !s_prefix || s_cns < 1 || s_vms < 1 || s_seconds <= 0 || s_threads < 1
        || s_threads > 256 || (!s_closed && s_rate <= 0)) {
        fprintf (stderr, "task-load: bad arguments\n");
        return 2;
    }
    s_t0_ms = s_now_ms () + 200.0;
    s_end_ms = s_t0_ms + s_seconds * 1000.0;
    sender_t *ss = calloc ((size_t) s_threads, sizeof *ss);
    pthread_t *th = calloc ((size_t) s_threads, sizeof *th);
    if (!ss || !th)
        abort ();
    for (int k = 0; k < s_threads; k++) {
        ss[k].k = k;
        pthread_create (&th[k], NULL, s_sender, &ss[k]);
    }
    size_t n = 0;
    long late = 0, errors = 0;
    for (int k = 0; k < s_threads; k++) {
        pthread_join (th[k], NULL);
        n += ss[k].nrows;
        late += ss[k].late;
        errors += ss[k].errors;
    }
    row_t *rows = calloc (n ? n : 1, sizeof *rows);
    double *lat = calloc (n ? n : 1, sizeof *lat);
    if (!rows || !lat)
        abort ();
    size_t m = 0, nok = 0;
    for (int k = 0; k < s_threads; k++) {
        memcpy (rows + m, ss[k].rows, ss[k].nrows * sizeof *rows);
        m += ss[k].nrows;
        free (ss[k].rows);
    }
    qsort (rows, n, sizeof *rows, s_cmp_ts);
    FILE *f = out ? fopen (out, "w") : NULL;
    if (out && !f) {
        fprintf (stderr, "task-load: %s: %s\n", out, strerror (errno));
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        if (f)
            fprintf (f, "%s %.3f %.3f %d\n", rows[i].id, rows[i].ts, rows[i].ta, rows[i].status);
        if (rows[i].status == 200)
            lat[nok++] = rows[i].ta - rows[i].ts;
    }
    if (f)
        fclose (f);
    qsort (lat, nok, sizeof *lat, s_cmp_d);
    double span = n > 1 ? (rows[n - 1].ts - rows[0].ts) / 1000.0 : 0;
    printf ("{\"mode\": \"%s\", \"target_rate\": ", s_closed ? "max" : "paced");
    if (s_closed)
        printf ("null");
    else
        printf ("%.1f", s_rate);
    printf (", \"threads\": %d, \"sent\": %zu, \"ok\": %zu, \"errors\": %ld, \"late_sends\": %ld, "
            "\"achieved_rate\": ", s_threads, n, nok, errors, late);
    if (span > 0)
        printf ("%.1f", (double) n / span);
    else
        printf ("null");
    if (nok)
        printf (", \"answer_ms\": {\"n\": %zu, \"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, "
                "\"max\": %.2f}, \"generator\": \"task-load\"}\n", nok, s_pct (lat, nok, 50),
                s_pct (lat, nok, 90), s_pct (lat, nok, 99), lat[nok - 1]);
    else
        printf (", \"answer_ms\": {\"n\": 0, \"p50\": null, \"p90\": null, \"p99\": null, "
                "\"max\": null}, \"generator\": \"task-load\"}\n");
    free (rows);
    free (lat);
    free (ss);
    free (th);
    return 0;
}
