/*
 * cn_resolver: DNS A-record lookups off the caller's thread, with a shared
 * short-lived cache (c-ares).
 *
 * The agent finds cnapid instances by resolving cnapi.<dc>.<domain> (all A
 * records) through a configured resolver. One resolver thread serves every
 * agent loop of a process: a lookup that a fresh enough cached answer can
 * satisfy is answered at once; otherwise concurrent lookups of one name share
 * one query. So 10,000 simulated CNs failing over together send one query,
 * not 10,000.
 *
 *   cn_resolver_t *r = cn_resolver_new ("127.0.0.1:5353", 2000, err, sizeof err);
 *   cn_resolver_lookup (r, "cnapi.dc1.example.com", 1000, s_on_answer, arg);
 *   ...
 *   cn_resolver_destroy (&r);
 *
 * The callback runs either on the calling thread before cn_resolver_lookup
 * returns (a cached answer), or later on the resolver thread: a caller on an
 * event loop forwards the answer to its own thread (lib/cn_agent.c does this
 * through h2o's multithread queue). It must not call back into the resolver.
 */
#ifndef CN_RESOLVER_H
#define CN_RESOLVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_RESOLVER_MAX_ADDRS 32

typedef struct cn_resolver cn_resolver_t;

typedef struct {
    int status;               /* 0: ok (n may still be 0: no records) */
    char error[96];           /* when status != 0 */
    size_t n;
    uint32_t addrs[CN_RESOLVER_MAX_ADDRS];   /* IPv4, network byte order, as answered */
    int64_t fetched_ms;       /* monotonic ms when the answer arrived */
} cn_resolver_answer_t;

typedef void (cn_resolver_cb_t) (const cn_resolver_answer_t *ans, void *arg);

/* Start the resolver thread. server: "host:port" (or "host", port 53) of the
 * DNS server to ask, or NULL/"" for the system's (/etc/resolv.conf).
 * timeout_ms bounds one query (c-ares retries within it). NULL with err
 * filled on a bad server string or when c-ares cannot start. */
cn_resolver_t *cn_resolver_new (const char *server, int timeout_ms,
                                char *err, size_t errlen);
/* Stop the thread; pending lookups get status -1 "resolver stopped".
 * *p is NULL afterwards; safe on NULL. */
void cn_resolver_destroy (cn_resolver_t **p);

/* Look up name's A records. A cached answer (ok or not) younger than
 * max_age_ms is used as it is; otherwise a query is sent, or joined if one is
 * in flight. cb gets the answer exactly once. Thread safe. */
void cn_resolver_lookup (cn_resolver_t *r, const char *name, int max_age_ms,
                         cn_resolver_cb_t *cb, void *arg);

/* Queries sent to the DNS server so far (a benchmark and test figure). */
uint64_t cn_resolver_queries (cn_resolver_t *r);

/* Parse "a.b.c.d:port" or "a.b.c.d" into a c-ares server CSV entry; false on
 * anything else. Exposed for tests. */
bool cn_resolver_server_csv (const char *server, char *out, size_t len);

#endif
