/*
 * cn_redis: see include/cn_redis.h.
 *
 * Theory of operation. One blocking hiredis context with connect and command
 * timeouts, so a dead Redis costs at most timeout_ms per call. After an I/O
 * error the context is freed and nothing is attempted until a backoff delay
 * (full jitter, 100 ms .. 5 s) has passed; cn_redis_ok() is the only place that
 * reconnects. Callers treat "down" as a cache miss: Redis is never the source
 * of truth.
 */
#include "cn_redis.h"

#include "cn_log.h"
#include "cn_util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Several records per call (one Lua invocation, one round trip for a whole
 * chunk): KEYS[i] the key of record i; ARGV[5i-4 .. 5i]: version, json,
 * tombstone ("1"/"0"), uuid, announce ("1"/"0"). A record is stored only if
 * newer than the cached one. Returns how many were stored. */
static const char s_put_script[] =
    "local stored = 0\n"
    "for i = 1, #KEYS do\n"
    "  local b = 5 * (i - 1)\n"
    "  local cur = redis.call('HGET', KEYS[i], 'v')\n"
    "  if not cur or tonumber(cur) < tonumber(ARGV[b + 1]) then\n"
    "    redis.call('DEL', KEYS[i])\n"
    "    if ARGV[b + 3] == '1' then\n"
    "      redis.call('HSET', KEYS[i], 'v', ARGV[b + 1], 'd', '1')\n"
    "      redis.call('EXPIRE', KEYS[i], 3600)\n"
    "    else\n"
    "      redis.call('HSET', KEYS[i], 'v', ARGV[b + 1], 'j', ARGV[b + 2])\n"
    "    end\n"
    "    if ARGV[b + 5] == '1' then\n"
    "      redis.call('PUBLISH', '" CN_REDIS_INVALIDATE_CHANNEL "', ARGV[b + 4] .. ' ' .. ARGV[b + 1])\n"
    "    end\n"
    "    stored = stored + 1\n"
    "  end\n"
    "end\n"
    "return stored\n";

/* records per EVALSHA in cn_redis_cache_apply */
#define S_PUT_CHUNK 64

struct cn_redis {
    char *host;
    int port;
    int db;
    char *password;
    int timeout_ms;
    char component[32];
    redisContext *ctx;
    char sha[41];
    int attempt;
    int64_t next_try_us;
    uint64_t errors;
    bool logged_down;
};

static void
s_parse_url (cn_redis_t *r, const char *url)
{
    /* redis://[:password@]host[:port][/db] */
    const char *p = url;
    if (strncmp (p, "redis://", 8) == 0)
        p += 8;
    const char *at = strchr (p, '@');
    if (at) {
        const char *colon = memchr (p, ':', (size_t) (at - p));
        const char *pw = colon ? colon + 1 : p;
        r->password = strndup (pw, (size_t) (at - pw));
        p = at + 1;
    }
    const char *slash = strchr (p, '/');
    const char *hend = slash ? slash : p + strlen (p);
    const char *colon = memchr (p, ':', (size_t) (hend - p));
    r->host = strndup (p, (size_t) ((colon ? colon : hend) - p));
    r->port = colon ? atoi (colon + 1) : 6379;
    r->db = slash ? atoi (slash + 1) : 0;
    if (!*r->host) {
        free (r->host);
        r->host = strdup ("127.0.0.1");
    }
}

cn_redis_t *
cn_redis_new (const char *url, int timeout_ms, const char *component)
{
    cn_redis_t *r = calloc (1, sizeof *r);
    if (!r)
        return NULL;
    s_parse_url (r, url ? url : "redis://127.0.0.1:6379");
    r->timeout_ms = timeout_ms > 0 ? timeout_ms : 500;
    snprintf (r->component, sizeof r->component, "%s", component ? component : "redis");
    return r;
}

void
cn_redis_destroy (cn_redis_t **p)
{
    if (!p || !*p)
        return;
    cn_redis_t *r = *p;
    if (r->ctx)
        redisFree (r->ctx);
    free (r->host);
    free (r->password);
    free (r);
    *p = NULL;
}

void
cn_redis_failed (cn_redis_t *r, const char *why_in)
{
    /* why may point into the context we are about to free */
    char why[128];
    snprintf (why, sizeof why, "%s", why_in ? why_in : "");
    if (r->ctx) {
        redisFree (r->ctx);
        r->ctx = NULL;
    }
    r->errors++;
    int delay = cn_backoff_ms (r->attempt++, 100, 5000);
    r->next_try_us = cn_mono_us () + (int64_t) delay * 1000;
    if (!r->logged_down) {
        CN_WARN (r->component, "redis unavailable", "{s:s,s:s,s:i}", "error", why,
                 "host", r->host, "port", r->port);
        r->logged_down = true;
    }
}

/* A reply that is an error or missing marks nothing; only I/O errors do. */
static redisReply *
s_command (cn_redis_t *r, const char *fmt, ...)
{
    va_list ap;
    va_start (ap, fmt);
    redisReply *rep = redisvCommand (r->ctx, fmt, ap);
    va_end (ap);
    if (!rep)
        cn_redis_failed (r, r->ctx && r->ctx->errstr[0] ? r->ctx->errstr : "no reply");
    return rep;
}

static bool
s_connect (cn_redis_t *r)
{
    struct timeval tv = { r->timeout_ms / 1000, (r->timeout_ms % 1000) * 1000 };
    r->ctx = redisConnectWithTimeout (r->host, r->port, tv);
    if (!r->ctx || r->ctx->err) {
        cn_redis_failed (r, r->ctx ? r->ctx->errstr : "cannot allocate context");
        return false;
    }
    redisSetTimeout (r->ctx, tv);
    redisEnableKeepAlive (r->ctx);
    redisReply *rep;
    if (r->password) {
        rep = s_command (r, "AUTH %s", r->password);
        if (!rep)
            return false;
        bool bad = rep->type == REDIS_REPLY_ERROR;
        freeReplyObject (rep);
        if (bad) {
            cn_redis_failed (r, "AUTH refused");
            return false;
        }
    }
    if (r->db) {
        rep = s_command (r, "SELECT %d", r->db);
        if (!rep)
            return false;
        bool bad = rep->type == REDIS_REPLY_ERROR;
        freeReplyObject (rep);
        if (bad) {
            cn_redis_failed (r, "SELECT refused");
            return false;
        }
    }
    rep = s_command (r, "SCRIPT LOAD %s", s_put_script);
    if (!rep)
        return false;
    if (rep->type != REDIS_REPLY_STRING || rep->len != 40) {
        freeReplyObject (rep);
        cn_redis_failed (r, "SCRIPT LOAD failed");
        return false;
    }
    memcpy (r->sha, rep->str, 40);
    r->sha[40] = '\0';
    freeReplyObject (rep);
    if (r->logged_down || r->attempt > 0)
        CN_INFO (r->component, "redis connected", "{s:s,s:i}", "host", r->host, "port", r->port);
    r->attempt = 0;
    r->logged_down = false;
    return true;
}

bool
cn_redis_ok (cn_redis_t *r)
{
    if (r->ctx)
        return true;
    if (cn_mono_us () < r->next_try_us)
        return false;
    return s_connect (r);
}

redisContext *cn_redis_ctx (cn_redis_t *r) { return r->ctx; }
uint64_t cn_redis_errors (const cn_redis_t *r) { return r->errors; }
bool cn_redis_connected (const cn_redis_t *r) { return r->ctx != NULL; }

redisReply *
cn_redis_cmd (cn_redis_t *r, const char *fmt, ...)
{
    if (!cn_redis_ok (r))
        return NULL;
    va_list ap;
    va_start (ap, fmt);
    redisReply *rep = redisvCommand (r->ctx, fmt, ap);
    va_end (ap);
    if (!rep)
        cn_redis_failed (r, r->ctx && r->ctx->errstr[0] ? r->ctx->errstr : "no reply");
    return rep;
}

int
cn_redis_cache_apply (cn_redis_t *r, const cn_cache_put_t *puts, size_t n)
{
    if (n == 0)
        return 0;
    if (!cn_redis_ok (r))
        return -1;
    size_t calls = 0;
    for (size_t base = 0; base < n; base += S_PUT_CHUNK) {
        size_t k = n - base < S_PUT_CHUNK ? n - base : S_PUT_CHUNK;
        const char *argv[3 + S_PUT_CHUNK * 6];
        size_t lens[3 + S_PUT_CHUNK * 6];
        char keys[S_PUT_CHUNK][64], vers[S_PUT_CHUNK][24], nkeys[8];
        size_t a = 0;
        snprintf (nkeys, sizeof nkeys, "%zu", k);
        argv[a] = "EVALSHA", lens[a++] = 7;
        argv[a] = r->sha, lens[a++] = 40;
        argv[a] = nkeys, lens[a++] = strlen (nkeys);
        for (size_t i = 0; i < k; i++) {
            snprintf (keys[i], sizeof keys[i], "cnapi:server:%s", puts[base + i].uuid);
            argv[a] = keys[i], lens[a++] = strlen (keys[i]);
        }
        for (size_t i = 0; i < k; i++) {
            const cn_cache_put_t *p = &puts[base + i];
            snprintf (vers[i], sizeof vers[i], "%lld", (long long) p->version);
            argv[a] = vers[i], lens[a++] = strlen (vers[i]);
            argv[a] = p->json ? p->json : "", lens[a++] = p->json ? p->len : 0;
            argv[a] = p->json ? "0" : "1", lens[a++] = 1;
            argv[a] = p->uuid, lens[a++] = strlen (p->uuid);
            argv[a] = p->fill ? "0" : "1", lens[a++] = 1;
        }
        if (redisAppendCommandArgv (r->ctx, (int) a, argv, lens) != REDIS_OK) {
            cn_redis_failed (r, "append failed");
            return -1;
        }
        calls++;
    }
    int rc = 0;
    for (size_t i = 0; i < calls; i++) {
        redisReply *rep = NULL;
        if (redisGetReply (r->ctx, (void **) &rep) != REDIS_OK || !rep) {
            cn_redis_failed (r, r->ctx->errstr[0] ? r->ctx->errstr : "no reply");
            return -1;
        }
        if (rep->type == REDIS_REPLY_ERROR) {
            if (rc == 0)
                CN_WARN (r->component, "redis cache write refused", "{s:s}", "error", rep->str);
            rc = -1;
        }
        freeReplyObject (rep);
    }
    return rc;
}

int
cn_redis_cache_drop (cn_redis_t *r, const char *const *uuids, size_t n, bool all)
{
    if (!cn_redis_ok (r))
        return -1;
    if (all) {
        /* SCAN in bounded pages; UNLINK what matches. */
        char cursor[32] = "0";
        for (int page = 0; page < 100000; page++) {
            redisReply *rep = s_command (r, "SCAN %s MATCH cnapi:server:* COUNT 1000", cursor);
            if (!rep)
                return -1;
            if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2) {
                freeReplyObject (rep);
                return -1;
            }
            snprintf (cursor, sizeof cursor, "%s", rep->element[0]->str);
            redisReply *keys = rep->element[1];
            for (size_t i = 0; i < keys->elements; i++)
                redisAppendCommand (r->ctx, "UNLINK %s", keys->element[i]->str);
            size_t nkeys = keys->elements;
            freeReplyObject (rep);
            for (size_t i = 0; i < nkeys; i++) {
                redisReply *x = NULL;
                if (redisGetReply (r->ctx, (void **) &x) != REDIS_OK) {
                    cn_redis_failed (r, "UNLINK failed");
                    return -1;
                }
                freeReplyObject (x);
            }
            if (strcmp (cursor, "0") == 0)
                break;
        }
        redisReply *rep = s_command (r, "PUBLISH %s *", CN_REDIS_INVALIDATE_CHANNEL);
        if (!rep)
            return -1;
        freeReplyObject (rep);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        redisAppendCommand (r->ctx, "UNLINK cnapi:server:%s", uuids[i]);
        redisAppendCommand (r->ctx, "PUBLISH %s %s", CN_REDIS_INVALIDATE_CHANNEL, uuids[i]);
    }
    for (size_t i = 0; i < 2 * n; i++) {
        redisReply *x = NULL;
        if (redisGetReply (r->ctx, (void **) &x) != REDIS_OK) {
            cn_redis_failed (r, "UNLINK failed");
            return -1;
        }
        freeReplyObject (x);
    }
    return 0;
}

int
cn_redis_cache_get (cn_redis_t *r, const char *uuid, char **json, size_t *len, int64_t *version)
{
    *json = NULL;
    *len = 0;
    if (!cn_redis_ok (r))
        return -1;
    redisReply *rep = s_command (r, "HMGET cnapi:server:%s v j d", uuid);
    if (!rep)
        return -1;
    int rc = 0;
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 3)
        rc = -1;
    else if (rep->element[0]->type != REDIS_REPLY_STRING)
        rc = 0;
    else {
        if (version)
            *version = strtoll (rep->element[0]->str, NULL, 10);
        if (rep->element[2]->type == REDIS_REPLY_STRING)
            rc = 2;
        else if (rep->element[1]->type == REDIS_REPLY_STRING) {
            *json = malloc (rep->element[1]->len + 1);
            if (*json) {
                memcpy (*json, rep->element[1]->str, rep->element[1]->len);
                (*json)[rep->element[1]->len] = '\0';
                *len = rep->element[1]->len;
                rc = 1;
            }
            else
                rc = -1;
        }
    }
    freeReplyObject (rep);
    return rc;
}
