/*
 * cn_resolver: see include/cn_resolver.h.
 *
 * Theory of operation. The c-ares channel belongs to the resolver thread
 * alone. Callers touch only the table of names (under the mutex): each name
 * has its last answer, whether a query is in flight, and the callbacks
 * waiting for that query. A lookup that needs a query appends the name to a
 * send list and wakes the thread through an eventfd; the thread sends the
 * queries, then polls c-ares' sockets and the eventfd. When an answer comes
 * back it is stored and every waiter is called on the resolver thread
 * (outside the mutex).
 *
 * The table only grows (an agent process resolves one or two names).
 */
#include "cn_resolver.h"

#include "cn_log.h"
#include "cn_util.h"

#include <ares.h>
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define COMPONENT "resolver"

typedef struct waiter {
    struct waiter *next;
    cn_resolver_cb_t *cb;
    void *arg;
} waiter_t;

typedef struct entry {
    struct entry *next;
    struct entry *send_next;    /* on the send list */
    cn_resolver_t *r;
    char *name;
    bool has_answer;
    bool inflight;
    cn_resolver_answer_t answer;
    waiter_t *waiters;
} entry_t;

struct cn_resolver {
    pthread_mutex_t mu;
    entry_t *entries;
    entry_t *to_send;
    int efd;
    atomic_bool stop;
    pthread_t thread;
    bool thread_started;
    ares_channel channel;
    atomic_uint_fast64_t queries;
};

static pthread_once_t s_ares_once = PTHREAD_ONCE_INIT;
static int s_ares_init_rc;

static void
s_ares_init (void)
{
    s_ares_init_rc = ares_library_init (ARES_LIB_INIT_ALL);
}

static int64_t
s_mono_ms (void)
{
    return cn_mono_us () / 1000;
}

bool
cn_resolver_server_csv (const char *server, char *out, size_t len)
{
    if (!server || !*server)
        return false;
    char host[64];
    const char *colon = strrchr (server, ':');
    size_t hlen = colon ? (size_t) (colon - server) : strlen (server);
    if (hlen == 0 || hlen >= sizeof host)
        return false;
    memcpy (host, server, hlen);
    host[hlen] = '\0';
    struct in_addr a;
    if (inet_pton (AF_INET, host, &a) != 1)
        return false;
    long port = 53;
    if (colon) {
        char *end;
        errno = 0;
        port = strtol (colon + 1, &end, 10);
        if (errno || end == colon + 1 || *end || port < 1 || port > 65535)
            return false;
    }
    int n = snprintf (out, len, "%s:%ld", host, port);
    return n > 0 && (size_t) n < len;
}

static void
s_wake (cn_resolver_t *r)
{
    uint64_t one = 1;
    ssize_t rc = write (r->efd, &one, sizeof one);
    (void) rc;                  /* a full counter still wakes the thread */
}

void
cn_resolver_lookup (cn_resolver_t *r, const char *name, int max_age_ms,
                    cn_resolver_cb_t *cb, void *arg)
{
    cn_resolver_answer_t ans;
    pthread_mutex_lock (&r->mu);
    entry_t *e = r->entries;
    while (e && strcmp (e->name, name) != 0)
        e = e->next;
    if (!e) {
        e = calloc (1, sizeof *e);
        if (!e || !(e->name = strdup (name)))
            abort ();
        e->r = r;
        e->next = r->entries;
        r->entries = e;
    }
    if (e->has_answer && s_mono_ms () - e->answer.fetched_ms <= max_age_ms) {
        ans = e->answer;
        pthread_mutex_unlock (&r->mu);
        cb (&ans, arg);
        return;
    }
    if (atomic_load (&r->stop)) {
        pthread_mutex_unlock (&r->mu);
        memset (&ans, 0, sizeof ans);
        ans.status = -1;
        snprintf (ans.error, sizeof ans.error, "resolver stopped");
        cb (&ans, arg);
        return;
    }
    waiter_t *w = malloc (sizeof *w);
    if (!w)
        abort ();
    w->cb = cb;
    w->arg = arg;
    w->next = e->waiters;
    e->waiters = w;
    bool wake = false;
    if (!e->inflight) {
        e->inflight = true;
        e->send_next = r->to_send;
        r->to_send = e;
        wake = true;
    }
    pthread_mutex_unlock (&r->mu);
    if (wake)
        s_wake (r);
}

/* Store the answer and call the waiters (resolver thread). */
static void
s_complete (entry_t *e, const cn_resolver_answer_t *ans)
{
    cn_resolver_t *r = e->r;
    pthread_mutex_lock (&r->mu);
    e->answer = *ans;
    e->has_answer = true;       /* failures too: 10,000 retries share one */
    e->inflight = false;
    waiter_t *w = e->waiters;
    e->waiters = NULL;
    pthread_mutex_unlock (&r->mu);
    while (w) {
        waiter_t *next = w->next;
        w->cb (ans, w->arg);
        free (w);
        w = next;
    }
}

static void
s_on_reply (void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    entry_t *e = arg;
    cn_resolver_answer_t ans;
    memset (&ans, 0, sizeof ans);
    ans.fetched_ms = s_mono_ms ();
    if (status == ARES_SUCCESS) {
        struct ares_addrttl ttls[CN_RESOLVER_MAX_ADDRS];
        int n = CN_RESOLVER_MAX_ADDRS;
        status = ares_parse_a_reply (abuf, alen, NULL, ttls, &n);
        if (status == ARES_SUCCESS) {
            for (int i = 0; i < n; i++)
                ans.addrs[ans.n++] = ttls[i].ipaddr.s_addr;
        }
    }
    if (status == ARES_ENODATA) {
        status = ARES_SUCCESS;          /* the name exists, no A records */
        ans.n = 0;
    }
    if (status != ARES_SUCCESS) {
        ans.status = status;
        snprintf (ans.error, sizeof ans.error, "%s", ares_strerror (status));
    }
    s_complete (e, &ans);
}

static void *
s_thread (void *arg)
{
    cn_resolver_t *r = arg;
    while (!atomic_load (&r->stop)) {
        pthread_mutex_lock (&r->mu);
        entry_t *send = r->to_send;
        r->to_send = NULL;
        pthread_mutex_unlock (&r->mu);
        while (send) {
            entry_t *next = send->send_next;
            atomic_fetch_add (&r->queries, 1);
            ares_query (r->channel, send->name, ns_c_in, ns_t_a, s_on_reply, send);
            send = next;
        }

        struct pollfd pfd[ARES_GETSOCK_MAXNUM + 1];
        ares_socket_t socks[ARES_GETSOCK_MAXNUM];
        int bits = ares_getsock (r->channel, socks, ARES_GETSOCK_MAXNUM);
        int n = 0;
        for (int i = 0; i < ARES_GETSOCK_MAXNUM; i++) {
            short ev = 0;
            /* c-ares' own macros shift a signed 1 into the sign bit */
            if ((unsigned) bits & (1u << i))
                ev |= POLLIN;
            if ((unsigned) bits & (1u << (i + ARES_GETSOCK_MAXNUM)))
                ev |= POLLOUT;
            if (!ev)
                continue;
            pfd[n].fd = socks[i];
            pfd[n].events = ev;
            pfd[n].revents = 0;
            n++;
        }
        pfd[n].fd = r->efd;
        pfd[n].events = POLLIN;
        pfd[n].revents = 0;
        struct timeval maxtv = { 1, 0 }, tv;
        struct timeval *tvp = ares_timeout (r->channel, &maxtv, &tv);
        int wait_ms = (int) (tvp->tv_sec * 1000 + tvp->tv_usec / 1000);
        if (wait_ms < 1 && n > 0 && (tvp->tv_sec > 0 || tvp->tv_usec > 0))
            wait_ms = 1;
        int rc = poll (pfd, (nfds_t) n + 1, wait_ms);
        if (rc < 0 && errno != EINTR)
            CN_WARN (COMPONENT, "poll failed", "{s:s}", "error", strerror (errno));
        if (pfd[n].revents & POLLIN) {
            uint64_t v;
            ssize_t got = read (r->efd, &v, sizeof v);
            (void) got;
        }
        bool any = false;
        for (int i = 0; i < n; i++) {
            if (!pfd[i].revents)
                continue;
            any = true;
            ares_socket_t rfd = (pfd[i].revents & (POLLIN | POLLERR | POLLHUP))
                ? pfd[i].fd : ARES_SOCKET_BAD;
            ares_socket_t wfd = (pfd[i].revents & POLLOUT) ? pfd[i].fd : ARES_SOCKET_BAD;
            ares_process_fd (r->channel, rfd, wfd);
        }
        if (!any)
            ares_process_fd (r->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);  /* timeouts */
    }
    return NULL;
}

cn_resolver_t *
cn_resolver_new (const char *server, int timeout_ms, char *err, size_t errlen)
{
    pthread_once (&s_ares_once, s_ares_init);
    if (s_ares_init_rc != ARES_SUCCESS) {
        snprintf (err, errlen, "c-ares: %s", ares_strerror (s_ares_init_rc));
        return NULL;
    }
    char csv[96] = "";
    if (server && *server && !cn_resolver_server_csv (server, csv, sizeof csv)) {
        snprintf (err, errlen, "bad resolver address \"%s\" (expected a.b.c.d[:port])", server);
        return NULL;
    }
    cn_resolver_t *r = calloc (1, sizeof *r);
    if (!r)
        abort ();
    pthread_mutex_init (&r->mu, NULL);
    r->efd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->efd < 0) {
        snprintf (err, errlen, "eventfd: %s", strerror (errno));
        goto fail;
    }
    struct ares_options opts;
    memset (&opts, 0, sizeof opts);
    if (timeout_ms < 100)
        timeout_ms = 100;
    /* Two tries within the caller's bound. */
    opts.timeout = timeout_ms / 2;
    opts.tries = 2;
    opts.flags = ARES_FLAG_NOSEARCH | ARES_FLAG_NOALIASES;
    int optmask = ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS;
    int rc = ares_init_options (&r->channel, &opts, optmask);
    if (rc != ARES_SUCCESS) {
        snprintf (err, errlen, "c-ares: %s", ares_strerror (rc));
        r->channel = NULL;
        goto fail;
    }
    if (*csv) {
        rc = ares_set_servers_ports_csv (r->channel, csv);
        if (rc != ARES_SUCCESS) {
            snprintf (err, errlen, "c-ares servers \"%s\": %s", csv, ares_strerror (rc));
            goto fail;
        }
    }
    if (pthread_create (&r->thread, NULL, s_thread, r) != 0) {
        snprintf (err, errlen, "cannot start the resolver thread");
        goto fail;
    }
    r->thread_started = true;
    return r;
fail:
    if (r->channel)
        ares_destroy (r->channel);
    if (r->efd >= 0)
        close (r->efd);
    pthread_mutex_destroy (&r->mu);
    free (r);
    return NULL;
}

void
cn_resolver_destroy (cn_resolver_t **p)
{
    if (!p || !*p)
        return;
    cn_resolver_t *r = *p;
    atomic_store (&r->stop, true);
    if (r->thread_started) {
        s_wake (r);
        pthread_join (r->thread, NULL);
    }
    /* Queries in flight end with ARES_EDESTRUCTION through s_on_reply. */
    ares_destroy (r->channel);
    /* Names queued but never sent still have waiters. */
    cn_resolver_answer_t stopped;
    memset (&stopped, 0, sizeof stopped);
    stopped.status = -1;
    snprintf (stopped.error, sizeof stopped.error, "resolver stopped");
    for (entry_t *e = r->entries; e; e = e->next)
        if (e->waiters)
            s_complete (e, &stopped);
    entry_t *e = r->entries;
    while (e) {
        entry_t *next = e->next;
        free (e->name);
        free (e);
        e = next;
    }
    close (r->efd);
    pthread_mutex_destroy (&r->mu);
    free (r);
    *p = NULL;
}

uint64_t
cn_resolver_queries (cn_resolver_t *r)
{
    return atomic_load (&r->queries);
}
