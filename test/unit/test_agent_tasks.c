/*
 * test_agent_tasks: the agent side of tasks (proto/tasks.md,
 * lib/cn_agent_tasks.c), end to end on loopback: a set of agents with their
 * HTTP listener, a tiny DNS server and two fake cnapid instances that
 * record the task_event / task_end frames and send task_ack when told.
 *
 *   - bad requests: 409 for a server that is not ours, 400 bodies, 404
 *     unknown task / unknown id, 405;
 *   - the life of every machine_* task on the dummy backend (with delays):
 *     202, start event, vm_state events, task_end with the VM or an error
 *     (VmNotFound, VmExists, VmBadState), the agent's view and history;
 *     requests without a task id held until the end (200 / 500);
 *   - the same task id twice: 202 twice, run once;
 *   - pause / resume (503 "paused" in between, per CN);
 *   - the outbox: frames sent again in order after a welcome on another
 *     instance, trimmed by task_ack; nothing sent again once acknowledged;
 *   - the cap: 503 "outbox full" while everything is unacknowledged, the
 *     oldest acknowledged task forgotten once there is room to make.
 */
#include "cn_test.h"

#include "cn_agent.h"
#include "cn_agent_sysinfo.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_util.h"
#include "cn_wsclient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int64_t
s_ms (void)
{
    return cn_mono_us () / 1000;
}

#define WAIT_FOR(cond, ms) ({ \
    int64_t until_ = s_ms () + (ms); bool ok_ = false; \
    for (int n_ = 0; n_ < 100000; n_++) { \
        if (cond) { ok_ = true; break; } \
        if (s_ms () >= until_) break; \
        usleep (10000); } \
    ok_; })

/* ------------------------------------------------------------------ */
/* A DNS server answering every A query with the configured addresses   */

typedef struct {
    int fd, port;
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t mu;
    uint32_t addrs[4];
    int n;
} s_dns_t;

static void *
s_dns_thread (void *arg)
{
    s_dns_t *d = arg;
    while (!atomic_load (&d->stop)) {
        struct pollfd p = { .fd = d->fd, .events = POLLIN };
        if (poll (&p, 1, 20) <= 0)
            continue;
        unsigned char q[512], r[512];
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom (d->fd, q, sizeof q, 0, (struct sockaddr *) &from, &fl);
        if (n < 12)
            continue;
        size_t i = 12;
        while (i < (size_t) n && q[i])
            i += q[i] + 1;
        i += 5;
        if (i > (size_t) n)
            continue;
        memcpy (r, q, i);
        r[2] = 0x81;
        r[3] = 0x80;
        pthread_mutex_lock (&d->mu);
        int na = d->n;
        r[6] = 0;
        r[7] = (unsigned char) na;
        r[8] = r[9] = r[10] = r[11] = 0;
        size_t o = i;
        for (int k = 0; k < na; k++) {
            unsigned char rr[16] = { 0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4 };
            memcpy (rr + 12, &d->addrs[k], 4);
            memcpy (r + o, rr, 16);
            o += 16;
        }
        if (na == 0)
            r[3] = 0x83;
        pthread_mutex_unlock (&d->mu);
        sendto (d->fd, r, o, 0, (struct sockaddr *) &from, fl);
    }
    return NULL;
}

static bool
s_dns_start (s_dns_t *d, const char *a, const char *b)
{
    memset (d, 0, sizeof *d);
    pthread_mutex_init (&d->mu, NULL);
    if (a)
        inet_pton (AF_INET, a, &d->addrs[d->n++]);
    if (b)
        inet_pton (AF_INET, b, &d->addrs[d->n++]);
    d->fd = socket (AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET };
    inet_pton (AF_INET, "127.0.0.1", &sin.sin_addr);
    if (bind (d->fd, (struct sockaddr *) &sin, sizeof sin) != 0)
        return false;
    socklen_t sl = sizeof sin;
    getsockname (d->fd, (struct sockaddr *) &sin, &sl);
    d->port = ntohs (sin.sin_port);
    return pthread_create (&d->thread, NULL, s_dns_thread, d) == 0;
}

static void
s_dns_stop (s_dns_t *d)
{
    atomic_store (&d->stop, true);
    pthread_join (d->thread, NULL);
    close (d->fd);
    pthread_mutex_destroy (&d->mu);
}

/* ------------------------------------------------------------------ */
/* A fake cnapid instance: sessions, and a log of the task frames       */

#define S_MAX_FRAMES 4096
#define S_MAX_CONNS 64

typedef struct {
    char type[12];              /* task_event, task_end */
    char cn[37];
    char id[37];
    uint64_t seq;
    char name[24];              /* event name, or the end's status */
    char code[32];              /* the end's error code */
    char state[24];             /* result.state / event.state */
} s_frame_t;

typedef struct {
    int fd;
    bool upgraded, welcomed;
    char uuid[37];
    unsigned char *in;
    size_t in_len;
    int64_t last_hb;
} s_fconn_t;

typedef struct {
    char cn[37];
    char id[37];
    uint64_t seq;
} s_ack_t;

typedef struct {
    char name[32];
    char ip[16];
    int port;
    int lfd;
    pthread_t thread;
    atomic_bool stop, goaway, auto_ack;
    atomic_int sessions, bad;
    s_fconn_t conns[S_MAX_CONNS];
    int nconns;
    pthread_mutex_t mu;         /* frames, acks */
    s_frame_t frames[S_MAX_FRAMES];
    int nframes;
    s_ack_t acks[256];
    int nacks;
} s_fake_t;

static void
s_fwrite (int fd, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (int tries = 0; len && tries < 1000; tries++) {
        ssize_t w = write (fd, p, len);
        if (w > 0) {
            p += w;
            len -= (size_t) w;
        }
        else if (w < 0 && errno != EAGAIN && errno != EINTR)
            return;
        else
            usleep (100);
    }
}

static void
s_fframe (int fd, int opcode, const void *data, size_t len)
{
    unsigned char h[10];
    size_t hl = 2;
    h[0] = (unsigned char) (0x80 | opcode);
    if (len < 126)
        h[1] = (unsigned char) len;
    else if (len < 65536) {
        h[1] = 126;
        h[2] = (unsigned char) (len >> 8);
        h[3] = (unsigned char) len;
        hl = 4;
    }
    else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char) (len >> (56 - 8 * i));
        hl = 10;
    }
    s_fwrite (fd, h, hl);
    if (len)
        s_fwrite (fd, data, len);
}

static void
s_fsend (int fd, cn_msgw_t *w)
{
    char *data;
    size_t size;
    cn_msgw_take (w, &data, &size);
    s_fframe (fd, 2, data, size);
    free (data);
}

static void
s_fsend_ack (int fd, const char *id, uint64_t seq)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "task_ack", 2);
    cn_msgw_str (&w, "id", id);
    cn_msgw_uint (&w, "seq", seq);
    s_fsend (fd, &w);
}

static void
s_copy_str (const cn_msg_t *m, const char *key, char *out, size_t cap)
{
    size_t l = 0;
    const char *s = cn_msg_str (m, key, &l);
    snprintf (out, cap, "%.*s", s ? (int) l : 0, s ? s : "");
}

/* A string inside a map value (e.g. result.state). */
static void
s_sub_str (const msgpack_object *map, const char *key, char *out, size_t cap)
{
    out[0] = '\0';
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == strlen (key)
            && memcmp (kv->key.via.str.ptr, key, kv->key.via.str.size) == 0
            && kv->val.type == MSGPACK_OBJECT_STR) {
            snprintf (out, cap, "%.*s", (int) kv->val.via.str.size, kv->val.via.str.ptr);
            return;
        }
    }
}

static void
s_on_task_frame (s_fake_t *f, s_fconn_t *c, const cn_msg_t *m)
{
    s_frame_t fr;
    memset (&fr, 0, sizeof fr);
    snprintf (fr.type, sizeof fr.type, "%.*s", (int) m->type_len, m->type);
    memcpy (fr.cn, c->uuid, 37);
    s_copy_str (m, "id", fr.id, sizeof fr.id);
    int64_t t;
    if (!cn_msg_uint (m, "seq", &fr.seq) || !fr.id[0] || !cn_msg_int (m, "time_ms", &t))
        atomic_fetch_add (&f->bad, 1);
    if (cn_msg_is (m, "task_event")) {
        s_copy_str (m, "name", fr.name, sizeof fr.name);
        s_sub_str (cn_msg_get (m, "event"), "state", fr.state, sizeof fr.state);
        if (!fr.name[0])
            atomic_fetch_add (&f->bad, 1);
    }
    else {
        s_copy_str (m, "status", fr.name, sizeof fr.name);
        s_sub_str (cn_msg_get (m, "result"), "state", fr.state, sizeof fr.state);
        s_sub_str (cn_msg_get (m, "error"), "code", fr.code, sizeof fr.code);
        bool ok = strcmp (fr.name, "complete") == 0;
        if ((ok && !cn_msg_get (m, "result")) || (!ok && !fr.code[0]))
            atomic_fetch_add (&f->bad, 1);
    }
    pthread_mutex_lock (&f->mu);
    if (f->nframes < S_MAX_FRAMES)
        f->frames[f->nframes++] = fr;
    pthread_mutex_unlock (&f->mu);
    if (atomic_load (&f->auto_ack))
        s_fsend_ack (c->fd, fr.id, fr.seq);
}

static bool
s_fprocess (s_fake_t *f, s_fconn_t *c)
{
    if (!c->upgraded) {
        unsigned char *end = memmem (c->in, c->in_len, "\r\n\r\n", 4);
        if (!end)
            return c->in_len < 8192;
        *end = 0;
        char *key = strcasestr ((char *) c->in, "Sec-WebSocket-Key:");
        char *su = strcasestr ((char *) c->in, "x-server-uuid:");
        if (!key || !su)
            return false;
        key += 18;
        while (*key == ' ')
            key++;
        char k[64];
        snprintf (k, sizeof k, "%.*s", (int) strcspn (key, "\r\n"), key);
        su += 14;
        while (*su == ' ')
            su++;
        snprintf (c->uuid, sizeof c->uuid, "%.36s", su);
        char acc[29], resp[256];
        cn_wsc_accept_key (k, acc);
        int n = snprintf (resp, sizeof resp,
                          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
        s_fwrite (c->fd, resp, (size_t) n);
        size_t used = (size_t) (end - c->in) + 4;
        memmove (c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
        c->upgraded = true;
    }
    for (;;) {
        if (c->in_len < 2)
            return true;
        unsigned char *p = c->in;
        int op = p[0] & 0x0f;
        size_t len = p[1] & 0x7f, hl = 2;
        if (len == 126) {
            if (c->in_len < 4)
                return true;
            len = ((size_t) p[2] << 8) | p[3];
            hl = 4;
        }
        else if (len == 127) {
            if (c->in_len < 10)
                return true;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = (len << 8) | p[2 + i];
            hl = 10;
        }
        if (c->in_len < hl + 4 + len)
            return true;
        unsigned char *mask = p + hl, *data = p + hl + 4;
        for (size_t i = 0; i < len; i++)
            data[i] ^= mask[i % 4];
        if (op == 8) {
            unsigned char cb[2] = { 0x03, 0xe8 };
            s_fframe (c->fd, 8, cb, 2);
            return false;
        }
        if (op == 2) {
            cn_msg_t m;
            char err[64];
            if (cn_msg_parse (&m, data, len, err, sizeof err) == 0) {
                if (cn_msg_is (&m, "hello")) {
                    cn_msgw_t w;
                    cn_msgw_init (&w, "welcome", 3);
                    cn_msgw_str (&w, "instance", f->name);
                    cn_msgw_uint (&w, "epoch", 1);
                    cn_msgw_uint (&w, "heartbeat_ms", 100);
                    s_fsend (c->fd, &w);
                    c->welcomed = true;
                    atomic_fetch_add (&f->sessions, 1);
                }
                else if (cn_msg_is (&m, "task_event") || cn_msg_is (&m, "task_end")) {
                    if (!c->welcomed)
                        atomic_fetch_add (&f->bad, 1);   /* only after a welcome */
                    s_on_task_frame (f, c, &m);
                }
                cn_msg_fini (&m);
            }
            else
                atomic_fetch_add (&f->bad, 1);
        }
        size_t used = hl + 4 + len;
        memmove (c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
}

static void
s_fclose_conn (s_fake_t *f, int i)
{
    s_fconn_t *c = &f->conns[i];
    struct linger lg = { 1, 0 };
    setsockopt (c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    if (c->welcomed)
        atomic_fetch_sub (&f->sessions, 1);
    close (c->fd);
    free (c->in);
    f->conns[i] = f->conns[--f->nconns];
}

static void *
s_fake_thread (void *arg)
{
    s_fake_t *f = arg;
    while (!atomic_load (&f->stop)) {
        struct pollfd p[S_MAX_CONNS + 1];
        p[0].fd = f->lfd;
        p[0].events = POLLIN;
        int nc = f->nconns;
        for (int i = 0; i < nc; i++) {
            p[i + 1].fd = f->conns[i].fd;
            p[i + 1].events = POLLIN;
        }
        int n = poll (p, (nfds_t) nc + 1, 10);
        int64_t now = s_ms ();
        bool goaway = atomic_exchange (&f->goaway, false);
        /* manual acks queued by the test */
        pthread_mutex_lock (&f->mu);
        for (int k = 0; k < f->nacks; k++)
            for (int i = 0; i < f->nconns; i++)
                if (f->conns[i].welcomed && strcmp (f->conns[i].uuid, f->acks[k].cn) == 0)
                    s_fsend_ack (f->conns[i].fd, f->acks[k].id, f->acks[k].seq);
        f->nacks = 0;
        pthread_mutex_unlock (&f->mu);
        for (int i = nc - 1; i >= 0; i--) {
            s_fconn_t *c = &f->conns[i];
            bool keep = true;
            if (n > 0 && (p[i + 1].revents & (POLLIN | POLLHUP | POLLERR))) {
                unsigned char buf[8192];
                ssize_t r = read (c->fd, buf, sizeof buf);
                if (r <= 0)
                    keep = false;
                else {
                    c->in = realloc (c->in, c->in_len + (size_t) r);
                    memcpy (c->in + c->in_len, buf, (size_t) r);
                    c->in_len += (size_t) r;
                    keep = s_fprocess (f, c);
                }
            }
            if (keep && c->welcomed && goaway) {
                cn_msgw_t w;
                cn_msgw_init (&w, "goaway", 1);
                cn_msgw_str (&w, "reason", "shutdown");
                s_fsend (c->fd, &w);
            }
            if (keep && c->welcomed && now - c->last_hb >= 100) {
                c->last_hb = now;
                cn_msgw_t w;
                cn_msgw_init (&w, "hb", 2);
                cn_msgw_uint (&w, "seq", 1);
                cn_msgw_int (&w, "sent_ms", cn_now_ms ());
                s_fsend (c->fd, &w);
            }
            if (!keep)
                s_fclose_conn (f, i);
        }
        if (n > 0 && (p[0].revents & POLLIN) && f->nconns < S_MAX_CONNS) {
            int fd = accept (f->lfd, NULL, NULL);
            if (fd >= 0) {
                s_fconn_t *c = &f->conns[f->nconns++];
                memset (c, 0, sizeof *c);
                c->fd = fd;
            }
        }
    }
    while (f->nconns)
        s_fclose_conn (f, f->nconns - 1);
    close (f->lfd);
    return NULL;
}

static bool
s_fake_start (s_fake_t *f, const char *name, const char *ip, int port)
{
    memset (f, 0, sizeof *f);
    pthread_mutex_init (&f->mu, NULL);
    snprintf (f->name, sizeof f->name, "%s", name);
    snprintf (f->ip, sizeof f->ip, "%s", ip);
    f->lfd = socket (AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt (f->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons ((uint16_t) port) };
    inet_pton (AF_INET, ip, &sin.sin_addr);
    if (bind (f->lfd, (struct sockaddr *) &sin, sizeof sin) != 0 || listen (f->lfd, 64) != 0) {
        close (f->lfd);
        return false;
    }
    socklen_t sl = sizeof sin;
    getsockname (f->lfd, (struct sockaddr *) &sin, &sl);
    f->port = ntohs (sin.sin_port);
    return pthread_create (&f->thread, NULL, s_fake_thread, f) == 0;
}

static void
s_fake_kill (s_fake_t *f)
{
    atomic_store (&f->stop, true);
    pthread_join (f->thread, NULL);
    pthread_mutex_destroy (&f->mu);
}

static void
s_fake_ack (s_fake_t *f, const char *cn, const char *id, uint64_t seq)
{
    pthread_mutex_lock (&f->mu);
    if (f->nacks < 256) {
        s_ack_t *a = &f->acks[f->nacks++];
        snprintf (a->cn, sizeof a->cn, "%.*s", (int) sizeof a->cn - 1, cn);
        snprintf (a->id, sizeof a->id, "%.*s", (int) sizeof a->id - 1, id);
        a->seq = seq;
    }
    pthread_mutex_unlock (&f->mu);
}

/* The frames of one task, in arrival order (at most max). */
static int
s_frames_of (s_fake_t *f, const char *id, s_frame_t *out, int max)
{
    int n = 0;
    pthread_mutex_lock (&f->mu);
    for (int i = 0; i < f->nframes && n < max; i++)
        if (strcmp (f->frames[i].id, id) == 0)
            out[n++] = f->frames[i];
    pthread_mutex_unlock (&f->mu);
    return n;
}

/* The frames of one CN, in arrival order (at most max). */
static int
s_frames_cn (s_fake_t *f, const char *cn, s_frame_t *out, int max)
{
    int n = 0;
    pthread_mutex_lock (&f->mu);
    for (int i = 0; i < f->nframes && n < max; i++)
        if (strcmp (f->frames[i].cn, cn) == 0)
            out[n++] = f->frames[i];
    pthread_mutex_unlock (&f->mu);
    return n;
}

static int
s_nframes (s_fake_t *f)
{
    pthread_mutex_lock (&f->mu);
    int n = f->nframes;
    pthread_mutex_unlock (&f->mu);
    return n;
}

/* The task_end of id on either instance (copied to *end); false if none. */
static bool
s_ended (s_fake_t **fs, int nf, const char *id, s_frame_t *end)
{
    for (int k = 0; k < nf; k++) {
        if (!fs[k])
            continue;
        s_frame_t fr[128];
        int n = s_frames_of (fs[k], id, fr, 128);
        for (int i = 0; i < n; i++)
            if (strcmp (fr[i].type, "task_end") == 0) {
                if (end)
                    *end = fr[i];
                return true;
            }
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* A blocking HTTP/1.1 client                                            */

typedef struct {
    int status;
    json_t *body;               /* NULL when not JSON or empty */
} s_resp_t;

static s_resp_t
s_http (int port, const char *method, const char *path, const char *server,
        const char *task_id, const char *body)
{
    s_resp_t r = { 0, NULL };
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons ((uint16_t) port) };
    inet_pton (AF_INET, "127.0.0.1", &sin.sin_addr);
    if (connect (fd, (struct sockaddr *) &sin, sizeof sin) != 0) {
        close (fd);
        return r;
    }
    char req[8192];
    int n = snprintf (req, sizeof req,
                      "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s%s%s%s%s%s"
                      "x-request-id: test\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\n\r\n%s",
                      method, path, server ? "x-server-uuid: " : "", server ? server : "",
                      server ? "\r\n" : "", task_id ? "x-cnapi-task-id: " : "",
                      task_id ? task_id : "", task_id ? "\r\n" : "",
                      body ? strlen (body) : 0, body ? body : "");
    s_fwrite (fd, req, (size_t) n);
    char *buf = NULL;
    size_t len = 0;
    int64_t until = s_ms () + 15000;
    while (s_ms () < until) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll (&p, 1, 100) <= 0)
            continue;
        char tmp[4096];
        ssize_t k = read (fd, tmp, sizeof tmp);
        if (k <= 0)
            break;
        buf = realloc (buf, len + (size_t) k + 1);
        memcpy (buf + len, tmp, (size_t) k);
        len += (size_t) k;
        buf[len] = '\0';
    }
    close (fd);
    if (buf && len > 12 && strncmp (buf, "HTTP/1.1 ", 9) == 0) {
        r.status = atoi (buf + 9);
        char *b = strstr (buf, "\r\n\r\n");
        if (b && b[4]) {
            json_error_t jerr;
            r.body = json_loads (b + 4, 0, &jerr);
        }
    }
    free (buf);
    return r;
}

static const char *
s_jstr (const json_t *o, const char *path)
{
    /* "a.b": one level of nesting is enough here */
    char k[64];
    const char *dot = strchr (path, '.');
    if (!dot)
        return json_string_value (json_object_get (o, path));
    snprintf (k, sizeof k, "%.*s", (int) (dot - path), path);
    return json_string_value (json_object_get (json_object_get (o, k), dot + 1));
}

/* ------------------------------------------------------------------ */
/* The fixture                                                          */

#define S_NCN 3

typedef struct {
    s_dns_t dns;
    s_fake_t *fa, *fb;
    cn_agents_t *a;
    int port;
    char cn[S_NCN][37];
} s_env_t;

static int
s_free_port (void)
{
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET };
    inet_pton (AF_INET, "127.0.0.1", &sin.sin_addr);
    bind (fd, (struct sockaddr *) &sin, sizeof sin);
    socklen_t sl = sizeof sin;
    getsockname (fd, (struct sockaddr *) &sin, &sl);
    close (fd);
    return ntohs (sin.sin_port);
}

static bool
s_env_start (s_env_t *e, int delay_ms, int tasks_max)
{
    memset (e, 0, sizeof *e);
    e->fa = calloc (1, sizeof *e->fa);
    e->fb = calloc (1, sizeof *e->fb);
    if (!s_fake_start (e->fa, "inst-a", "127.0.0.2", 0))
        return false;
    bool ok = false;
    for (int i = 0; i < 20 && !ok; i++) {
        ok = s_fake_start (e->fb, "inst-b", "127.0.0.3", e->fa->port);
        if (!ok) {
            s_fake_kill (e->fa);
            if (!s_fake_start (e->fa, "inst-a", "127.0.0.2", 0))
                return false;
        }
    }
    if (!ok || !s_dns_start (&e->dns, "127.0.0.2", "127.0.0.3"))
        return false;
    cn_agents_cfg_t cfg;
    cn_agents_cfg_defaults (&cfg);
    char resolver[32], listen[32];
    snprintf (resolver, sizeof resolver, "127.0.0.1:%d", e->dns.port);
    cfg.resolver = resolver;
    cfg.cnapi_port = e->fa->port;
    cfg.heartbeat_ms = 100;
    cfg.open_timeout_ms = 1000;
    cfg.resolve_cache_ms = 50;
    cfg.retry = (cn_retry_cfg_t) { .base_ms = 20, .cap_ms = 200, .quick_ms = 20,
                                   .goaway_ms = 20, .stable_ms = 300 };
    cfg.threads = 2;                 /* CN 0 shares loop 0 with the listener, CN 1 does not */
    cfg.session_log_level = CN_LOG_DEBUG;
    cfg.delays = (cn_vmdummy_delays_t) { delay_ms, delay_ms, delay_ms, delay_ms, delay_ms };
    cfg.tasks_max = tasks_max;
    e->port = s_free_port ();
    snprintf (listen, sizeof listen, "127.0.0.1:%d", e->port);
    cfg.listen = listen;
    char err[256];
    e->a = cn_agents_new (&cfg, err, sizeof err);
    if (!e->a)
        return false;
    for (size_t i = 0; i < S_NCN; i++) {
        cn_sysinfo_gen_uuid ("7a5c0000", i, e->cn[i]);
        cn_agent_spec_t s = { .server_uuid = e->cn[i], .sim_vms = 2, .sim_prefix = "7a5c0000",
                              .sim_index = i };
        if (cn_agents_add (e->a, &s, err, sizeof err) != (long) i)
            return false;
    }
    if (cn_agents_start (e->a, err, sizeof err) != 0) {
        printf ("  start: %s\n", err);
        return false;
    }
    /* every CN up somewhere */
    return WAIT_FOR (({
        size_t up = 0;
        for (size_t i = 0; i < S_NCN; i++) {
            cn_agent_info_t in;
            cn_agents_info (e->a, i, &in);
            up += in.state == CN_SESS_UP;
        }
        up == S_NCN; }), 5000);
}

static void
s_env_stop (s_env_t *e)
{
    cn_agents_stop (e->a, 1000);
    cn_agents_destroy (&e->a);
    if (e->fa)
        s_fake_kill (e->fa);
    if (e->fb)
        s_fake_kill (e->fb);
    s_dns_stop (&e->dns);
    free (e->fa);
    free (e->fb);
}

/* The fake a CN's session is on right now (NULL if none). */
static s_fake_t *
s_holder (s_env_t *e, size_t i)
{
    cn_agent_info_t in;
    cn_agents_info (e->a, i, &in);
    if (in.state != CN_SESS_UP)
        return NULL;
    if (e->fa && strcmp (in.instance, e->fa->name) == 0)
        return e->fa;
    if (e->fb && strcmp (in.instance, e->fb->name) == 0)
        return e->fb;
    return NULL;
}

/* POST /tasks with a task id; 202 expected. */
static void
s_dispatch (s_env_t *e, size_t cn, const char *id, const char *task, const char *params)
{
    char body[2048];
    snprintf (body, sizeof body, "{\"task\":\"%s\",\"params\":%s}", task, params);
    s_resp_t r = s_http (e->port, "POST", "/tasks", e->cn[cn], id, body);
    CHECK_INT (r.status, 202);
    CHECK_STR (s_jstr (r.body, "id"), id);
    json_decref (r.body);
}

/* Dispatch and wait for the end; *end gets the task_end frame. */
static bool
s_run_task (s_env_t *e, size_t cn, const char *task, const char *params, s_frame_t *end)
{
    char id[37];
    cn_uuid_new (id);
    s_dispatch (e, cn, id, task, params);
    s_fake_t *fs[2] = { e->fa, e->fb };
    bool ok = WAIT_FOR (s_ended (fs, 2, id, end), 5000);
    if (!ok)
        printf ("  no task_end for %s %s\n", task, params);
    return ok;
}

/* ------------------------------------------------------------------ */
/* Tests                                                                */

static void
test_tasks_bad_requests (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 0, 1000));
    const char *cn = e.cn[1];
    const char *ok_body = "{\"task\":\"server_sysinfo\",\"params\":{}}";
    char id[37];
    cn_uuid_new (id);
    s_resp_t r;
    /* not one of ours (or none with several CNs): 409 */
    r = s_http (e.port, "POST", "/tasks", NULL, id, ok_body);
    CHECK_INT (r.status, 409);
    json_decref (r.body);
    r = s_http (e.port, "POST", "/tasks", "00000000-0000-4000-8000-000000000999", id, ok_body);
    CHECK_INT (r.status, 409);
    json_decref (r.body);
    r = s_http (e.port, "GET", "/history", "nope", NULL, NULL);
    CHECK_INT (r.status, 409);
    json_decref (r.body);
    /* bad bodies: 400 */
    const char *bad[] = {
        "", "not json", "[1]", "{\"task\":5}", "{\"params\":{}}",
        "{\"task\":\"machine_boot\",\"params\":[]}",
        "{\"task\":\"machine_boot\",\"params\":{}}",
        "{\"task\":\"machine_boot\",\"params\":{\"uuid\":\"xyz\"}}",
        "{\"task\":\"machine_create\",\"params\":{\"uuid\":17}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        r = s_http (e.port, "POST", "/tasks", cn, id, bad[i]);
        if (r.status != 400)
            printf ("  body %s -> %d\n", bad[i], r.status);
        CHECK_INT (r.status, 400);
        CHECK (s_jstr (r.body, "error") != NULL);
        json_decref (r.body);
    }
    r = s_http (e.port, "POST", "/tasks", cn, "not-a-uuid", ok_body);
    CHECK_INT (r.status, 400);
    json_decref (r.body);
    /* unknown task: 404 {"error": "unknown task"} */
    r = s_http (e.port, "POST", "/tasks", cn, id, "{\"task\":\"machine_fly\",\"params\":{}}");
    CHECK_INT (r.status, 404);
    CHECK_STR (s_jstr (r.body, "error"), "unknown task");
    json_decref (r.body);
    /* unknown ids, wrong methods */
    r = s_http (e.port, "GET", "/tasks/6f2d7b0a-1c54-4f6b-9d8e-0a1b2c3d4e5f", cn, NULL, NULL);
    CHECK_INT (r.status, 404);
    json_decref (r.body);
    r = s_http (e.port, "GET", "/tasks/abc", cn, NULL, NULL);
    CHECK_INT (r.status, 404);
    json_decref (r.body);
    r = s_http (e.port, "GET", "/tasks", cn, NULL, NULL);
    CHECK_INT (r.status, 405);
    json_decref (r.body);
    r = s_http (e.port, "GET", "/pause", cn, NULL, NULL);
    CHECK_INT (r.status, 405);
    json_decref (r.body);
    /* machine_load: 404 for an unknown VM, 200 the VM */
    r = s_http (e.port, "POST", "/tasks", cn, NULL,
                "{\"task\":\"machine_load\",\"params\":{\"uuid\":\"6f2d7b0a-1c54-4f6b-9d8e-0a1b2c3d4e5f\"}}");
    CHECK_INT (r.status, 404);
    CHECK_STR (s_jstr (r.body, "error.code"), "VmNotFound");
    json_decref (r.body);
    r = s_http (e.port, "POST", "/tasks", cn, NULL,
                "{\"task\":\"machine_load\",\"params\":{\"uuid\":\"7a5c0000-0001-4000-a000-000000000001\"}}");
    CHECK_INT (r.status, 200);
    CHECK_STR (s_jstr (r.body, "uuid"), "7a5c0000-0001-4000-a000-000000000001");
    json_decref (r.body);
    /* nothing ran */
    r = s_http (e.port, "GET", "/history", cn, NULL, NULL);
    CHECK_INT (r.status, 200);
    CHECK (json_is_array (r.body) && json_array_size (r.body) == 0);
    json_decref (r.body);
    CHECK_INT (s_nframes (e.fa) + s_nframes (e.fb), 0);
    s_env_stop (&e);
}

static void
test_tasks_lifecycle (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 100, 1000));
    atomic_store (&e.fa->auto_ack, true);
    atomic_store (&e.fb->auto_ack, true);
    s_fake_t *fs[2] = { e.fa, e.fb };
    const char *vm = "6f2d7b0a-1c54-4f6b-9d8e-0a1b2c3d4e5f";
    char p[256];
    snprintf (p, sizeof p, "{\"uuid\":\"%s\"}", vm);
    s_frame_t end;

    for (size_t cn = 0; cn < 2; cn++) {     /* loop 0 (the listener's) and loop 1 */
        /* create: 202, start, vm_state provisioning, vm_state running, end */
        char id[37];
        cn_uuid_new (id);
        char cp[256];
        snprintf (cp, sizeof cp, "{\"uuid\":\"%s\",\"alias\":\"web0\",\"ram\":2048}", vm);
        int64_t t0 = s_ms ();
        s_dispatch (&e, cn, id, "machine_create", cp);
        CHECK (s_ms () - t0 < 90);            /* answered before the VM is ready */
        CHECK (WAIT_FOR (s_ended (fs, 2, id, &end), 5000));
        CHECK_STR (end.name, "complete");
        CHECK_STR (end.state, "running");
        s_frame_t fr[32];
        int n = s_frames_of (s_holder (&e, cn), id, fr, 32);
        CHECK (n >= 4);
        CHECK_STR (fr[0].type, "task_event");
        CHECK_STR (fr[0].name, "start");
        CHECK_STR (fr[1].name, "vm_state");
        CHECK_STR (fr[1].state, "provisioning");
        CHECK_STR (fr[n - 2].state, "running");
        CHECK_STR (fr[n - 1].type, "task_end");
        for (int i = 0; i < n; i++) {
            CHECK_INT (fr[i].seq, i + 1);
            CHECK_STR (fr[i].cn, e.cn[cn]);
        }
        /* the agent's view */
        char path[128];
        snprintf (path, sizeof path, "/tasks/%s", id);
        s_resp_t r = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
        CHECK_INT (r.status, 200);
        CHECK_STR (s_jstr (r.body, "status"), "complete");
        CHECK_STR (s_jstr (r.body, "task"), "machine_create");
        CHECK_STR (s_jstr (r.body, "result.uuid"), vm);
        CHECK_STR (s_jstr (r.body, "result.alias"), "web0");
        CHECK_INT (json_array_size (json_object_get (r.body, "events")), n - 1);
        CHECK (s_jstr (r.body, "finished_at") != NULL);
        json_decref (r.body);
        /* acked by the instance: nothing left unacknowledged */
        CHECK (WAIT_FOR (({ s_resp_t q = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
                            bool z = json_integer_value (json_object_get (q.body, "unacked")) == 0;
                            json_decref (q.body); z; }), 2000));

        /* the rest of a VM's life */
        CHECK (s_run_task (&e, cn, "machine_shutdown", p, &end));
        CHECK_STR (end.name, "complete");
        CHECK_STR (end.state, "stopped");
        CHECK (s_run_task (&e, cn, "machine_shutdown", p, &end));
        CHECK_STR (end.name, "failure");
        CHECK_STR (end.code, "VmBadState");
        CHECK (s_run_task (&e, cn, "machine_boot", p, &end));
        CHECK_STR (end.name, "complete");
        CHECK_STR (end.state, "running");
        CHECK (s_run_task (&e, cn, "machine_reboot", p, &end));
        CHECK_STR (end.name, "complete");
        CHECK_STR (end.state, "running");
        CHECK (s_run_task (&e, cn, "machine_kill", p, &end));
        CHECK_STR (end.name, "complete");
        CHECK_STR (end.state, "stopped");
        char up[256];
        snprintf (up, sizeof up, "{\"uuid\":\"%s\",\"ram\":4096,\"alias\":\"web9\"}", vm);
        CHECK (s_run_task (&e, cn, "machine_update", up, &end));
        CHECK_STR (end.name, "complete");
        char cp2[256];
        snprintf (cp2, sizeof cp2, "{\"uuid\":\"%s\"}", vm);
        CHECK (s_run_task (&e, cn, "machine_create", cp2, &end));
        CHECK_STR (end.name, "failure");
        CHECK_STR (end.code, "VmExists");
        CHECK (s_run_task (&e, cn, "machine_create", "{\"ram\":\"lots\"}", &end));
        CHECK_STR (end.code, "InvalidArgument");

        /* held requests (no task id): 200 the result, 500 {error} */
        char lb[256];
        snprintf (lb, sizeof lb, "{\"task\":\"machine_load\",\"params\":{\"uuid\":\"%s\"}}", vm);
        s_resp_t r2 = s_http (e.port, "POST", "/tasks", e.cn[cn], NULL, lb);
        CHECK_INT (r2.status, 200);
        CHECK_INT (json_integer_value (json_object_get (r2.body, "ram")), 4096);
        CHECK_STR (s_jstr (r2.body, "state"), "stopped");
        json_decref (r2.body);
        char bb[256];
        snprintf (bb, sizeof bb, "{\"task\":\"machine_boot\",\"params\":{\"uuid\":\"%s\"}}", vm);
        t0 = s_ms ();
        r2 = s_http (e.port, "POST", "/tasks", e.cn[cn], NULL, bb);
        CHECK_INT (r2.status, 200);
        CHECK (s_ms () - t0 >= 90);           /* held for the transition */
        CHECK_STR (s_jstr (r2.body, "state"), "running");
        json_decref (r2.body);
        r2 = s_http (e.port, "POST", "/tasks", e.cn[cn], NULL, bb);
        CHECK_INT (r2.status, 500);
        CHECK_STR (s_jstr (r2.body, "error.code"), "VmBadState");
        json_decref (r2.body);

        /* destroy: the VM as it was, state destroyed; then it is gone */
        CHECK (s_run_task (&e, cn, "machine_destroy", p, &end));
        CHECK_STR (end.name, "complete");
        CHECK_STR (end.state, "destroyed");
        r2 = s_http (e.port, "POST", "/tasks", e.cn[cn], NULL, lb);
        CHECK_INT (r2.status, 404);
        json_decref (r2.body);
        CHECK (s_run_task (&e, cn, "machine_boot", p, &end));
        CHECK_STR (end.name, "failure");
        CHECK_STR (end.code, "VmNotFound");
        /* no AMQP here: server_sysinfo fails, and says why */
        CHECK (s_run_task (&e, cn, "server_sysinfo", "{}", &end));
        CHECK_STR (end.name, "failure");
        CHECK_STR (end.code, "SysinfoUnavailable");

        /* history: newest first, the held tasks included, machine_load not */
        r2 = s_http (e.port, "GET", "/history", e.cn[cn], NULL, NULL);
        CHECK_INT (r2.status, 200);
        CHECK_INT (json_array_size (r2.body), 14);
        CHECK_STR (s_jstr (json_array_get (r2.body, 0), "task"), "server_sysinfo");
        CHECK_STR (s_jstr (json_array_get (r2.body, 13), "id"), id);
        CHECK_STR (s_jstr (json_array_get (r2.body, 13), "status"), "complete");
        json_decref (r2.body);
    }
    CHECK_INT (atomic_load (&e.fa->bad) + atomic_load (&e.fb->bad), 0);
    /* CN 2 saw none of it */
    s_resp_t r = s_http (e.port, "GET", "/history", e.cn[2], NULL, NULL);
    CHECK_INT (json_array_size (r.body), 0);
    json_decref (r.body);
    s_env_stop (&e);
}

static void
test_tasks_idempotent (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 200, 1000));
    s_fake_t *fs[2] = { e.fa, e.fb };
    char id[37];
    cn_uuid_new (id);
    const char *p = "{\"alias\":\"once\"}";
    s_dispatch (&e, 1, id, "machine_create", p);
    s_dispatch (&e, 1, id, "machine_create", p);       /* while it runs */
    CHECK (WAIT_FOR (s_ended (fs, 2, id, NULL), 5000));
    s_dispatch (&e, 1, id, "machine_create", p);       /* after it ended */
    usleep (300000);
    s_frame_t fr[32];
    int n = s_frames_of (s_holder (&e, 1), id, fr, 32), starts = 0, ends = 0;
    for (int i = 0; i < n; i++) {
        starts += strcmp (fr[i].name, "start") == 0;
        ends += strcmp (fr[i].type, "task_end") == 0;
    }
    CHECK_INT (starts, 1);
    CHECK_INT (ends, 1);
    s_resp_t r = s_http (e.port, "GET", "/history", e.cn[1], NULL, NULL);
    CHECK_INT (json_array_size (r.body), 1);
    json_decref (r.body);
    cn_agent_info_t in;
    cn_agents_info (e.a, 1, &in);
    CHECK_INT (in.vms, 3);                  /* 2 simulated + 1 created once */
    s_env_stop (&e);
}

static void
test_tasks_pause (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 0, 1000));
    const char *body = "{\"task\":\"machine_create\",\"params\":{}}";
    char id[37];
    s_resp_t r = s_http (e.port, "POST", "/pause", e.cn[0], NULL, NULL);
    CHECK_INT (r.status, 204);
    json_decref (r.body);
    cn_uuid_new (id);
    r = s_http (e.port, "POST", "/tasks", e.cn[0], id, body);
    CHECK_INT (r.status, 503);
    CHECK_STR (s_jstr (r.body, "error"), "paused");
    json_decref (r.body);
    r = s_http (e.port, "POST", "/tasks", e.cn[0], NULL, body);     /* held ones too */
    CHECK_INT (r.status, 503);
    json_decref (r.body);
    /* another CN is not paused */
    cn_uuid_new (id);
    s_dispatch (&e, 1, id, "machine_create", "{}");
    /* reads still work while paused */
    r = s_http (e.port, "GET", "/history", e.cn[0], NULL, NULL);
    CHECK_INT (r.status, 200);
    CHECK_INT (json_array_size (r.body), 0);
    json_decref (r.body);
    r = s_http (e.port, "POST", "/resume", e.cn[0], NULL, NULL);
    CHECK_INT (r.status, 204);
    json_decref (r.body);
    cn_uuid_new (id);
    s_dispatch (&e, 0, id, "machine_create", "{}");
    s_env_stop (&e);
}

static void
test_tasks_outbox_resend (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 50, 1000));
    size_t cn = 1;
    s_fake_t *first = s_holder (&e, cn);
    CHECK (first != NULL);
    if (!first) {
        s_env_stop (&e);
        return;
    }
    s_fake_t *other = first == e.fa ? e.fb : e.fa;
    /* three tasks, nobody acks */
    char ids[3][37];
    s_fake_t *fs[2] = { e.fa, e.fb };
    for (int i = 0; i < 3; i++) {
        cn_uuid_new (ids[i]);
        s_dispatch (&e, cn, ids[i], "machine_create", "{}");
    }
    for (int i = 0; i < 3; i++)
        CHECK (WAIT_FOR (s_ended (fs, 2, ids[i], NULL), 5000));
    s_frame_t a[64], b[64];
    int na = s_frames_cn (first, e.cn[cn], a, 64);
    CHECK (na >= 12);
    /* partial ack: the first task's start event only */
    s_fake_ack (first, e.cn[cn], ids[0], 1);
    char path[128];
    snprintf (path, sizeof path, "/tasks/%s", ids[0]);
    CHECK (WAIT_FOR (({ s_resp_t q = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
                        bool z = json_integer_value (json_object_get (q.body, "unacked"))
                                 == (json_int_t) s_frames_of (first, ids[0], b, 64) - 1;
                        json_decref (q.body); z; }), 2000));
    /* the instance dies: the CN fails over and sends everything again, in order */
    int before = s_nframes (other);
    if (first == e.fa) {
        s_fake_kill (e.fa);
        free (e.fa);
        e.fa = NULL;
    }
    else {
        s_fake_kill (e.fb);
        free (e.fb);
        e.fb = NULL;
    }
    CHECK (WAIT_FOR (s_holder (&e, cn) == other, 5000));
    CHECK (WAIT_FOR (s_nframes (other) - before >= na - 1, 3000));
    usleep (100000);
    int nb = s_frames_cn (other, e.cn[cn], b, 64);
    CHECK_INT (nb, na - 1);                 /* all but the acknowledged one */
    /* same frames, same order: the first instance's minus the acknowledged one */
    for (int i = 0, k = 0; i < nb && k < na; i++, k++) {
        if (strcmp (a[k].id, ids[0]) == 0 && a[k].seq == 1)
            k++;
        CHECK_STR (b[i].id, a[k].id);
        CHECK_INT (b[i].seq, a[k].seq);
        CHECK_STR (b[i].type, a[k].type);
    }
    /* the new instance acks every end: the outbox empties */
    for (int i = 0; i < 3; i++) {
        s_frame_t end = { .seq = 0 };
        CHECK (s_ended (&other, 1, ids[i], &end));
        s_fake_ack (other, e.cn[cn], ids[i], end.seq);
    }
    for (int i = 0; i < 3; i++) {
        snprintf (path, sizeof path, "/tasks/%s", ids[i]);
        CHECK (WAIT_FOR (({ s_resp_t q = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
                            bool z = json_integer_value (json_object_get (q.body, "unacked")) == 0;
                            json_decref (q.body); z; }), 2000));
    }
    /* another failover (goaway, to a restarted first instance): nothing sent again */
    s_fake_t *back = calloc (1, sizeof *back);
    CHECK (s_fake_start (back, "inst-c", e.fa ? "127.0.0.3" : "127.0.0.2", other->port));
    if (e.fa)
        e.fb = back;
    else
        e.fa = back;
    atomic_store (&other->goaway, true);
    CHECK (WAIT_FOR (({ cn_agent_info_t in; cn_agents_info (e.a, cn, &in);
                        in.state == CN_SESS_UP && strcmp (in.instance, "inst-c") == 0; }), 5000));
    usleep (300000);
    CHECK_INT (s_nframes (back), 0);
    CHECK_INT (atomic_load (&other->bad) + atomic_load (&back->bad), 0);
    s_env_stop (&e);
}

static void
test_tasks_outbox_cap (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 0, 3));
    size_t cn = 2;
    s_fake_t *fs[2] = { e.fa, e.fb };
    char ids[4][37];
    for (int i = 0; i < 3; i++) {
        cn_uuid_new (ids[i]);
        s_dispatch (&e, cn, ids[i], "machine_create", "{}");
        CHECK (WAIT_FOR (s_ended (fs, 2, ids[i], NULL), 5000));
    }
    /* three ended but unacknowledged: no room */
    cn_uuid_new (ids[3]);
    s_resp_t r = s_http (e.port, "POST", "/tasks", e.cn[cn], ids[3],
                         "{\"task\":\"machine_create\",\"params\":{}}");
    CHECK_INT (r.status, 503);
    CHECK_STR (s_jstr (r.body, "error"), "outbox full");
    json_decref (r.body);
    /* held requests are refused the same way */
    r = s_http (e.port, "POST", "/tasks", e.cn[cn], NULL, "{\"task\":\"machine_create\",\"params\":{}}");
    CHECK_INT (r.status, 503);
    json_decref (r.body);
    /* the first one acknowledged: it makes room */
    s_frame_t end;
    CHECK (s_ended (fs, 2, ids[0], &end));
    s_fake_ack (s_holder (&e, cn), e.cn[cn], ids[0], end.seq);
    char path[128];
    snprintf (path, sizeof path, "/tasks/%s", ids[0]);
    CHECK (WAIT_FOR (({ s_resp_t q = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
                        bool z = json_integer_value (json_object_get (q.body, "unacked")) == 0;
                        json_decref (q.body); z; }), 2000));
    s_dispatch (&e, cn, ids[3], "machine_create", "{}");
    r = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
    CHECK_INT (r.status, 404);               /* forgotten */
    json_decref (r.body);
    r = s_http (e.port, "GET", "/history", e.cn[cn], NULL, NULL);
    CHECK_INT (json_array_size (r.body), 3);
    CHECK_STR (s_jstr (json_array_get (r.body, 0), "id"), ids[3]);
    json_decref (r.body);
    /* the unacknowledged ones are still there */
    snprintf (path, sizeof path, "/tasks/%s", ids[1]);
    r = s_http (e.port, "GET", path, e.cn[cn], NULL, NULL);
    CHECK_INT (r.status, 200);
    CHECK (json_integer_value (json_object_get (r.body, "unacked")) > 0);
    json_decref (r.body);
    s_env_stop (&e);
}

typedef struct {
    int port;
    const char *cn;
    s_resp_t r;
} s_held_t;

static void *
s_held_thread (void *arg)
{
    s_held_t *h = arg;
    h->r = s_http (h->port, "POST", "/tasks", h->cn, NULL,
                   "{\"task\":\"machine_create\",\"params\":{}}");
    return NULL;
}

static void
test_tasks_held_at_stop (void)
{
    s_env_t e;
    CHECK (s_env_start (&e, 30000, 1000));
    /* a held request whose client goes away: the answer is dropped quietly */
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons ((uint16_t) e.port) };
    inet_pton (AF_INET, "127.0.0.1", &sin.sin_addr);
    CHECK (connect (fd, (struct sockaddr *) &sin, sizeof sin) == 0);
    char req[512];
    const char *body = "{\"task\":\"machine_create\",\"params\":{}}";
    int n = snprintf (req, sizeof req, "POST /tasks HTTP/1.1\r\nHost: x\r\nx-server-uuid: %s\r\n"
                      "Content-Length: %zu\r\n\r\n%s", e.cn[0], strlen (body), body);
    s_fwrite (fd, req, (size_t) n);
    usleep (100000);
    close (fd);
    /* held requests on both loops, then stop: 503 at once, not after the grace */
    s_held_t h[2] = { { e.port, e.cn[0], { 0, NULL } }, { e.port, e.cn[1], { 0, NULL } } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create (&th[i], NULL, s_held_thread, &h[i]);
    for (int i = 0; i < 2; i++)
        CHECK (WAIT_FOR (({ s_resp_t q = s_http (e.port, "GET", "/history", e.cn[i], NULL, NULL);
                            bool z = json_array_size (q.body) == (size_t) (i == 0 ? 2 : 1);
                            json_decref (q.body); z; }), 3000));
    int64_t t0 = s_ms ();
    cn_agents_stop (e.a, 5000);
    CHECK (s_ms () - t0 < 2000);
    for (int i = 0; i < 2; i++) {
        pthread_join (th[i], NULL);
        CHECK_INT (h[i].r.status, 503);
        json_decref (h[i].r.body);
    }
    s_env_stop (&e);
}

int
main (void)
{
    cn_log_init ("test_agent_tasks", getenv ("TEST_LOG") ? CN_LOG_DEBUG : CN_LOG_FATAL);
    RUN (test_tasks_bad_requests);
    RUN (test_tasks_lifecycle);
    RUN (test_tasks_idempotent);
    RUN (test_tasks_pause);
    RUN (test_tasks_outbox_resend);
    RUN (test_tasks_outbox_cap);
    RUN (test_tasks_held_at_stop);
    return cn_test_done ();
}
