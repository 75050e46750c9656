/*
 * cn_hub: agent sessions in a thread of their own. See include/cn_hub.h,
 * proto/session.md (the wire protocol), proto/hub.md (messages to the
 * sessions actor) and docs/sessions.md (theory of operation).
 *
 * Theory of operation
 *
 * A session is born from GET /agent/session: the gateway checks the request
 * (upgrade headers, x-server-uuid) and calls cn_hub_on_req, which answers
 * 101 through h2o_http1_upgrade and, once those bytes are written, takes the
 * raw socket out of h2o (h2o_socket_export) and posts it, with any bytes
 * that came behind the request, to the hub's thread (ADOPT). The framing is ours
 * (lib/cn_ws.c), because wslay would add ~8.5 KiB of buffers per connection
 * and the budget is 16 KiB per session all told.
 *
 * Socket I/O. The session sockets are in an edge-triggered epoll, the one
 * thing the hub's thread ("sessions-io") waits on, with the mailbox's
 * eventfd: one wake-up handles every ready session. h2o's own epoll is
 * level-triggered, which polls each ready socket twice per event; with
 * 15,000 sessions each sending one frame a second that, and h2o's
 * per-socket bookkeeping, were a tenth of the thread (docs/benchmarks.md,
 * "Fifth round"). Nesting our epoll in h2o's loop (until the seventh round)
 * cost a second epoll_wait and h2o's timer bookkeeping per wake-up, and
 * shared the thread with the HTTP API. A ready socket
 * is read (recv) into one 64 KiB buffer shared by all sessions until the kernel
 * has no more (a short read, or end of file once the peer hung up); whole
 * frames are parsed in place, and only an incomplete frame's bytes are
 * copied into the session (ibuf). Writes are send() at once; what the
 * kernel does not take waits in wbuf for EPOLLOUT. An idle session holds no
 * buffer at all.
 *
 * A closed session's fd is closed at once, but the session is freed only at
 * the end of the loop's round (s_reap): the batch may still hold an event
 * for it, and a send can fail
 * inside s_send_frame, whose callers go on using s (fd -1 makes every later
 * step a no-op).
 *
 * States: HELLO (waiting for the agent's hello) -> CLAIM (the sessions actor
 * is taking ownership in the store) -> OWNED (welcome sent; heartbeats both
 * ways) -> CLOSING (close frame queued; the socket closes once it is written
 * and the peer answered or a short linger passed).
 *
 * Timers are two lists (tq_t) shared by all sessions, each a FIFO of
 * entries with one fixed delay, so arming and re-arming is O(1) and the loop
 * waits for the earliest entry: `beat` (1.5 heartbeat_ms: send hb) and
 * `dead` (dead_after_ms since the last byte heard: close 4002; in CLOSING
 * the same entry is the linger bound on `linger`). A third one-entry list
 * drives the periodic flush report. Timers and the hb pace run on the
 * monotonic clock (hub->mono: a wall-clock step must neither close every
 * session at once nor stall them); what leaves the hub (last heard, the
 * flush's now_ms, an hb's sent_ms) is the wall clock (hub->now). Both are
 * read once per round, in ms.
 *
 * Messages from the sessions and tasks actors and the gateway arrive in the
 * hub's mailbox (cn_hub_post: a locked list and an eventfd, drained by the
 * loop in arrival order) and name
 * their session by sid, a per-process counter; a message for a session that
 * is gone is dropped. Messages to the actor carry sid and uuid; the actor
 * learns every close by a "bye" (except closes it ordered itself and the
 * shutdown goaways, which must not release ownership), and every flush_ms
 * the list of live sessions with their last-heard times ("flush"), from
 * which it writes last_heartbeat and notices a bye it never got.
 */
#include "cn_hub.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <czmq.h>
#include <h2o/http1.h>

#include "cn_actor.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_sessions.h"
#include "cn_util.h"
#include "cn_ws.h"

#define COMPONENT "hub"
#define SESS_BUCKETS 16384          /* power of two */
#define LINGER_MS 1000              /* CLOSING: wait this long for the peer */
#define EP_EVENTS 256               /* sessions' epoll: events per epoll_wait */
#define READ_CHUNK 65536            /* bytes per read (one buffer for all sessions) */
#define SESS_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)   /* a session's epoll events */

enum { S_HELLO, S_CLAIM, S_OWNED, S_CLOSING };

/* Timers: FIFO lists of entries that share one delay (so arming is O(1) and
 * the loop waits for the first entry of each list only). */
typedef struct tent {
    h2o_linklist_t link;
    uint64_t at;                /* wall clock ms */
    void (*cb) (struct tent *e);
} tent_t;

typedef struct {
    h2o_linklist_t list;
    uint64_t delay;
} tq_t;

typedef struct sess {
    struct sess *hnext;         /* sid hash chain */
    h2o_linklist_t link;        /* hub->all */
    cn_hub_t *hub;
    int fd;                     /* -1 until the 101 is written, and once closed */
    size_t woff;                /* bytes of wbuf already sent */
    char *ibuf;                 /* an incomplete frame's bytes so far */
    size_t ilen, icap;
    uint64_t sid;
    uint64_t epoch;
    uint64_t hb_seq;
    uint64_t connected_ms;      /* wall clock */
    uint64_t last_heard;        /* hub->now (wall clock ms) */
    uint64_t last_beat;         /* hub->mono when our last hb went out */
    tent_t beat;
    tent_t dead;
    uint8_t state;
    bool writing;               /* wbuf is in flight */
    bool close_when_written;
    bool fin_sent;
    bool peer_gone;             /* the read side ended */
    bool quiet;                 /* the actor knows, or must not hear of it (no bye) */
    uint8_t frag_op;            /* a fragmented message is being assembled */
    char *wbuf;
    size_t wlen;
    char *obuf;
    size_t olen, ocap;
    char *frag;
    size_t frag_len;
    char uuid[37];
    char remote[48];
} sess_t;

struct cn_hub {
    const cn_config_t *cfg;
    cn_liveness_t *live;
    zsock_t *push;
    void *push_handle;
    zsock_t *tpush;             /* task frames to the tasks actor */
    void *tpush_handle;
    /* the mailbox: commands from the sessions and tasks actors and sessions
     * handed over by the gateway (cn_hub_post); the eventfd wakes the loop */
    pthread_mutex_t inbox_mu;
    h2o_linklist_t inbox;
    int inbox_fd;
    tq_t beat_to, dead_to, linger_to, flush_to;
    tent_t flush_entry;
    uint64_t now;               /* wall clock ms, read once per round */
    uint64_t mono;              /* monotonic ms, the same moment (timers) */
    /* the sessions' sockets: an edge-triggered epoll that the hub's own
     * thread waits on (docs/sessions.md, "Socket I/O") */
    int ep;
    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
    uint8_t *rbuf;              /* READ_CHUNK bytes, for every session's reads */
    h2o_linklist_t closing;     /* closed, to be freed (s_reap) */
    sess_t **table;
    h2o_linklist_t all;
    atomic_size_t count;        /* sessions in the table (read by the gateway) */
    atomic_size_t handing;      /* handed over by the gateway, not adopted yet */
    atomic_uint_fast64_t next_sid;
    bool shutting_down;
    zactor_t *actor;
    cn_sessions_args_t args;
    cn_hub_stats_t stats;
    char boot_id[37];
};

/* ------------------------------------------------------------------ */
/* Timers                                                               */

static void
s_tinit (tq_t *q, uint64_t delay)
{
    h2o_linklist_init_anchor (&q->list);
    q->delay = delay;
}

static bool
s_tlinked (tent_t *e)
{
    return h2o_linklist_is_linked (&e->link);
}

static void
s_tunlink (tent_t *e)
{
    if (h2o_linklist_is_linked (&e->link))
        h2o_linklist_unlink (&e->link);
}

static void
s_tlink (cn_hub_t *hub, tq_t *q, tent_t *e)
{
    s_tunlink (e);
    e->at = hub->mono + q->delay;
    h2o_linklist_insert (&q->list, &e->link);
}

/* Fire the entries that are due; a callback may link entries again (at
 * now + delay: later than now, so the walk ends). */
static void
s_trun (cn_hub_t *hub, tq_t *q)
{
    while (!h2o_linklist_is_empty (&q->list)) {
        tent_t *e = H2O_STRUCT_FROM_MEMBER (tent_t, link, q->list.next);
        if (e->at > hub->mono)
            break;
        h2o_linklist_unlink (&e->link);
        e->cb (e);
    }
}

/* ms until the first entry of q is due (wait at most cap) */
static int
s_twait (const cn_hub_t *hub, tq_t *q, int cap)
{
    if (h2o_linklist_is_empty (&q->list))
        return cap;
    const tent_t *e = H2O_STRUCT_FROM_MEMBER (tent_t, link, q->list.next);
    if (e->at <= hub->mono)
        return 0;
    return e->at - hub->mono < (uint64_t) cap ? (int) (e->at - hub->mono) : cap;
}


/* ------------------------------------------------------------------ */
/* Table                                                                */

static size_t
s_bucket (uint64_t sid)
{
    return (size_t) ((sid * 0x9E3779B97F4A7C15ULL) >> 40) & (SESS_BUCKETS - 1);
}

static sess_t *
s_find (cn_hub_t *hub, uint64_t sid)
{
    for (sess_t *s = hub->table[s_bucket (sid)]; s; s = s->hnext)
        if (s->sid == sid)
            return s;
    return NULL;
}

static void
s_table_add (cn_hub_t *hub, sess_t *s)
{
    size_t b = s_bucket (s->sid);
    s->hnext = hub->table[b];
    hub->table[b] = s;
    h2o_linklist_insert (&hub->all, &s->link);
    hub->count++;
}

static void
s_table_remove (cn_hub_t *hub, sess_t *s)
{
    sess_t **pp = &hub->table[s_bucket (s->sid)];
    while (*pp && *pp != s)
        pp = &(*pp)->hnext;
    if (*pp) {
        *pp = s->hnext;
        hub->count--;
    }
    if (h2o_linklist_is_linked (&s->link))
        h2o_linklist_unlink (&s->link);
}

/* ------------------------------------------------------------------ */
/* To the sessions actor                                                */

static void
s_push (cn_hub_t *hub, cn_msgw_t *w)
{
    char *data = NULL;
    size_t size = 0;
    cn_msgw_take (w, &data, &size);
    if (zmq_send (hub->push_handle, data, size, ZMQ_DONTWAIT) < 0) {
        atomic_fetch_add_explicit (&hub->stats.busy, 1, memory_order_relaxed);
        CN_WARN (COMPONENT, "sessions actor queue full; message dropped", NULL);
    }
    free (data);
}

static void
s_bye (sess_t *s, const char *reason)
{
    if (s->quiet || s->state == S_HELLO)
        return;
    s->quiet = true;
    cn_msgw_t w;
    cn_msgw_init (&w, "bye", 4);
    cn_msgw_uint (&w, "sid", s->sid);
    cn_msgw_str (&w, "uuid", s->uuid);
    cn_msgw_str (&w, "reason", reason);
    cn_msgw_uint (&w, "heard", s->last_heard);
    s_push (s->hub, &w);
}

/* ------------------------------------------------------------------ */
/* Output                                                               */

static void s_free (sess_t *s);

/* Free the sessions closed since the last time (at the end of each round
 * of the loop). */
static void
s_reap (cn_hub_t *hub)
{
    while (!h2o_linklist_is_empty (&hub->closing)) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, hub->closing.next);
        s_free (s);
    }
}

/* Close the socket: no more input or output. s itself is freed later, at
 * the end of the loop's round (the caller, an epoll batch holding an event for s,
 * or a send failing inside s_send_frame, may still look at it: fd is -1). */
static void
s_close_socket (sess_t *s)
{
    cn_hub_t *hub = s->hub;
    if (s->fd >= 0) {
        close (s->fd);          /* (also leaves the epoll set) */
        s->fd = -1;
        atomic_fetch_sub_explicit (&hub->stats.open, 1, memory_order_relaxed);
    }
    s->state = S_CLOSING;       /* nothing more is parsed or sent */
    if (s_tlinked (&s->beat))
        s_tunlink (&s->beat);
    if (s_tlinked (&s->dead))
        s_tunlink (&s->dead);
    s_table_remove (hub, s);        /* commands no longer find it */
    if (!h2o_linklist_is_linked (&s->link))
        h2o_linklist_insert (&hub->closing, &s->link);
}

static void s_on_sent (sess_t *s, int res);

/* Send what is left of wbuf; an EAGAIN waits for EPOLLOUT. */
static void
s_try_send (sess_t *s)
{
    while (s->woff < s->wlen) {
        ssize_t n = send (s->fd, s->wbuf + s->woff, s->wlen - s->woff, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            s->woff += (size_t) n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        s_on_sent (s, n < 0 ? -errno : -EPIPE);
        return;
    }
    s_on_sent (s, (int) s->wlen);
}

/* Write what is queued when nothing is in flight. */
static void
s_flush_out (sess_t *s)
{
    if (s->writing || s->fd < 0)
        return;
    if (s->olen == 0) {
        if (s->close_when_written && !s->fin_sent) {
            /* our close frame is out: half-close and wait (bounded by the
             * linger timer) for the peer to close its side */
            s->fin_sent = true;
            shutdown (s->fd, SHUT_WR);
        }
        return;
    }
    s->wbuf = s->obuf;
    s->wlen = s->olen;
    s->woff = 0;
    s->obuf = NULL;
    s->olen = s->ocap = 0;
    s->writing = true;
    s_try_send (s);
}

/* wbuf is out (res >= 0) or the send failed (-errno). */
static void
s_on_sent (sess_t *s, int res)
{
    free (s->wbuf);
    s->wbuf = NULL;
    s->wlen = s->woff = 0;
    s->writing = false;
    if (res < 0 || (s->peer_gone && s->olen == 0)) {
        s_bye (s, "closed");
        s_close_socket (s);
        return;
    }
    s_flush_out (s);
}

/* Queue one final frame. */
static void
s_send_frame (sess_t *s, uint8_t opcode, const void *payload, size_t len)
{
    if (s->fd < 0 || s->close_when_written)
        return;
    s->obuf = cn_grow (s->obuf, &s->ocap, s->olen + CN_WS_MAX_HEADER + len, 1, 64);
    s->olen += cn_ws_header ((uint8_t *) s->obuf + s->olen, opcode, len);
    if (len)
        memcpy (s->obuf + s->olen, payload, len);
    s->olen += len;
    s_flush_out (s);
}

static void
s_send_msg (sess_t *s, cn_msgw_t *w)
{
    char *data = NULL;
    size_t size = 0;
    cn_msgw_take (w, &data, &size);
    s_send_frame (s, CN_WS_OP_BINARY, data, size);
    free (data);
}

/* Queue a close frame and enter CLOSING; the socket closes once the frame
 * is written and the peer answered, or after the linger. */
static void
s_close (sess_t *s, uint16_t code, const char *reason)
{
    if (s->state == S_CLOSING)
        return;
    uint8_t payload[128];
    size_t n = cn_ws_close_payload (payload, code, reason);
    s_send_frame (s, CN_WS_OP_CLOSE, payload, n);
    s->state = S_CLOSING;
    s->close_when_written = true;
    if (s_tlinked (&s->beat))
        s_tunlink (&s->beat);
    if (s_tlinked (&s->dead))
        s_tunlink (&s->dead);
    s_tlink (s->hub, &s->hub->linger_to, &s->dead);
    s_flush_out (s);
}

/* A protocol error: close with code and reason; nothing reaches the store. */
static void
s_fail (sess_t *s, uint16_t code, const char *reason)
{
    atomic_fetch_add_explicit (&s->hub->stats.bad_frames, 1, memory_order_relaxed);
    CN_WARN (COMPONENT, "session closed: protocol error", "{s:s,s:i,s:s,s:s}",
             "server_uuid", s->uuid, "code", (int) code, "reason", reason,
             "remote", s->remote);
    s_bye (s, "error");
    s_close (s, code, reason);
}

static void
s_send_goaway (sess_t *s, const char *reason)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "goaway", 1);
    cn_msgw_str (&w, "reason", reason);
    s_send_msg (s, &w);
}

/* ------------------------------------------------------------------ */
/* Timers                                                               */

/* Our hb, and the fallback timer re-armed behind it (written without an
 * allocation: one per session-second). */
static void
s_beat (sess_t *s)
{
    uint8_t buf[CN_MSG_HB_MAX];
    size_t n = cn_msg_hb_write (buf, ++s->hb_seq, (int64_t) s->hub->now);
    s_send_frame (s, CN_WS_OP_BINARY, buf, n);
    s->last_beat = s->hub->mono;
    atomic_fetch_add_explicit (&s->hub->stats.hb_sent, 1, memory_order_relaxed);
    if (s_tlinked (&s->beat))
        s_tunlink (&s->beat);
    s_tlink (s->hub, &s->hub->beat_to, &s->beat);
}

/* The fallback: the agent's hbs came slower than ours should go (its
 * interval is longer than ours, or it is late), so send one anyway. */
static void
s_on_beat (tent_t *entry)
{
    sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, beat, entry);
    if (s->state != S_OWNED)
        return;
    s_beat (s);
}

static void s_on_ready (cn_hub_t *hub, sess_t *s, uint32_t ev);

static void
s_on_dead (tent_t *entry)
{
    sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, dead, entry);
    if (s->state == S_CLOSING) {
        /* the linger is over */
        s_close_socket (s);
        return;
    }
    /* Bytes the kernel holds for us are not silence. With thousands of
     * sessions and a thread that fell behind (CPU starved), a heartbeat can
     * wait unread for seconds behind the other ready sockets: without this
     * check thousands of live sessions were closed at once
     * (docs/benchmarks.md, "Sessions (issue 3)"). Read them now (to the end
     * of file, should the peer have gone meanwhile) and look again one
     * interval later. */
    int unread = 0;
    if (s->fd >= 0 && ioctl (s->fd, FIONREAD, &unread) == 0 && unread > 0) {
        s_on_ready (s->hub, s, EPOLLIN | EPOLLRDHUP);
        if (s->fd >= 0 && s->state != S_CLOSING && !s_tlinked (&s->dead))
            s_tlink (s->hub, &s->hub->dead_to, &s->dead);
        return;
    }
    atomic_fetch_add_explicit (&s->hub->stats.timeouts, 1, memory_order_relaxed);
    CN_INFO (COMPONENT, "session silent; closing", "{s:s,s:I,s:s}", "server_uuid",
             s->uuid, "silent_ms", (json_int_t) (s->hub->now - s->last_heard),
             "remote", s->remote);
    s_bye (s, "timeout");
    s_close (s, CN_WS_CLOSE_TIMEOUT, "heartbeat timeout");
}

static void
s_on_flush (tent_t *entry)
{
    cn_hub_t *hub = H2O_STRUCT_FROM_MEMBER (cn_hub_t, flush_entry, entry);
    /* every live session the actor knows of, with when we last heard it */
    size_t n = 0;
    for (h2o_linklist_t *l = hub->all.next; l != &hub->all; l = l->next) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, l);
        n += s->state == S_CLAIM || s->state == S_OWNED;
    }
    cn_msgw_t w;
    cn_msgw_init (&w, "flush", 2);
    cn_msgw_int (&w, "now_ms", (int64_t) hub->now);
    cn_msgw_key (&w, "sessions");
    msgpack_pack_array (&w.pk, (uint32_t) n);
    for (h2o_linklist_t *l = hub->all.next; l != &hub->all; l = l->next) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, l);
        if (s->state != S_CLAIM && s->state != S_OWNED)
            continue;
        msgpack_pack_array (&w.pk, 2);
        msgpack_pack_uint64 (&w.pk, s->sid);
        msgpack_pack_uint64 (&w.pk, s->last_heard);
    }
    s_push (hub, &w);
    if (!hub->shutting_down)
        s_tlink (hub, &hub->flush_to, &hub->flush_entry);
}

/* ------------------------------------------------------------------ */
/* Input                                                                */

static bool
s_str_eq (const msgpack_object *o, const char *s)
{
    size_t n = strlen (s);
    return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n
           && memcmp (o->via.str.ptr, s, n) == 0;
}

static bool
s_is_uint (const msgpack_object *o)
{
    return o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
}

static bool
s_is_int (const msgpack_object *o)
{
    return o && (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER
                 || o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER);
}

/* o is a string holding a UUID (36 characters, either case). */
static bool
s_is_uuid (const msgpack_object *o)
{
    char tmp[37], out[37];
    if (!o || o->type != MSGPACK_OBJECT_STR || o->via.str.size != 36)
        return false;
    memcpy (tmp, o->via.str.ptr, 36);
    tmp[36] = 0;
    return cn_uuid_normalize (tmp, out);
}

static void
s_forward (sess_t *s, const char *type, const void *payload, size_t len)
{
    cn_msgw_t w;
    cn_msgw_init (&w, type, 4);
    cn_msgw_uint (&w, "sid", s->sid);
    cn_msgw_str (&w, "uuid", s->uuid);
    cn_msgw_str (&w, "remote", s->remote);
    cn_msgw_key (&w, "frame");
    msgpack_pack_bin (&w.pk, len);
    msgpack_pack_bin_body (&w.pk, payload, len);
    s_push (s->hub, &w);
}

/* task_event / task_end (proto/tasks.md): checked here, written by the
 * tasks actor, which answers task_ack through the mailbox (CN_HUB_SEND). */
static void
s_on_task_frame (sess_t *s, cn_msg_t *m, bool end, const void *payload, size_t len)
{
    const msgpack_object *id = cn_msg_get (m, "id");
    if (!id || id->type != MSGPACK_OBJECT_STR || id->via.str.size == 0
        || id->via.str.size > 64 || !s_is_uint (cn_msg_get (m, "seq"))
        || !s_is_int (cn_msg_get (m, "time_ms"))) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, end ? "task_end: id, seq or time_ms missing"
                                             : "task_event: id, seq or time_ms missing");
        return;
    }
    if (end) {
        const msgpack_object *st = cn_msg_get (m, "status");
        const msgpack_object *err = cn_msg_get (m, "error");
        if (!s_str_eq (st, "complete") && !s_str_eq (st, "failure")) {
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "task_end: status must be complete or failure");
            return;
        }
        if (err && err->type != MSGPACK_OBJECT_MAP && err->type != MSGPACK_OBJECT_NIL) {
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "task_end: error is not a map");
            return;
        }
    }
    else {
        const msgpack_object *name = cn_msg_get (m, "name");
        const msgpack_object *ev = cn_msg_get (m, "event");
        if (!name || name->type != MSGPACK_OBJECT_STR || name->via.str.size == 0) {
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "task_event: name missing");
            return;
        }
        if (ev && ev->type != MSGPACK_OBJECT_MAP && ev->type != MSGPACK_OBJECT_NIL) {
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "task_event: event is not a map");
            return;
        }
    }
    cn_msgw_t w;
    cn_msgw_init (&w, "task_frame", 3);
    cn_msgw_uint (&w, "sid", s->sid);
    cn_msgw_str (&w, "uuid", s->uuid);
    cn_msgw_key (&w, "frame");
    msgpack_pack_bin (&w.pk, len);
    msgpack_pack_bin_body (&w.pk, payload, len);
    char *data = NULL;
    size_t size = 0;
    cn_msgw_take (&w, &data, &size);
    if (!s->hub->tpush_handle || zmq_send (s->hub->tpush_handle, data, size, ZMQ_DONTWAIT) < 0) {
        /* not acked: the agent sends it again after its next welcome */
        atomic_fetch_add_explicit (&s->hub->stats.busy, 1, memory_order_relaxed);
        CN_WARN (COMPONENT, "tasks actor queue full; task frame dropped", "{s:s}",
                 "server_uuid", s->uuid);
    }
    free (data);
}

static void
s_on_hello (sess_t *s, cn_msg_t *m, const void *payload, size_t len)
{
    if (s->state != S_HELLO) {
        s_fail (s, CN_WS_CLOSE_POLICY, "second hello");
        return;
    }
    const msgpack_object *su = cn_msg_get (m, "server_uuid");
    char uuid[37] = "", tmp[37] = "";
    if (!su || su->type != MSGPACK_OBJECT_STR) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "hello: server_uuid missing");
        return;
    }
    if (su->via.str.size == 36)
        memcpy (tmp, su->via.str.ptr, 36);
    if (!cn_uuid_normalize (tmp, uuid) || strcmp (uuid, s->uuid) != 0) {
        s_fail (s, CN_WS_CLOSE_POLICY, "hello names another server than x-server-uuid");
        return;
    }
    const msgpack_object *agent = cn_msg_get (m, "agent");
    const msgpack_object *hb = cn_msg_get (m, "heartbeat_ms");
    const msgpack_object *vms = cn_msg_get (m, "vms");
    if (!agent || agent->type != MSGPACK_OBJECT_STR) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "hello: agent missing");
        return;
    }
    if (!s_is_uint (hb)) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "hello: heartbeat_ms missing");
        return;
    }
    if (!vms || vms->type != MSGPACK_OBJECT_MAP) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "hello: vms missing or not a map");
        return;
    }
    for (uint32_t i = 0; i < vms->via.map.size; i++) {
        const msgpack_object_kv *kv = &vms->via.map.ptr[i];
        if (!s_is_uuid (&kv->key) || kv->val.type != MSGPACK_OBJECT_MAP) {
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "hello: vms must map VM uuids to VM objects");
            return;
        }
    }
    s->state = S_CLAIM;
    s_forward (s, "hello", payload, len);
}

static void
s_on_vm_event (sess_t *s, cn_msg_t *m, const void *payload, size_t len)
{
    const msgpack_object *vm_uuid = cn_msg_get (m, "vm_uuid");
    const msgpack_object *event = cn_msg_get (m, "event");
    const msgpack_object *vm = cn_msg_get (m, "vm");
    if (!s_is_uuid (vm_uuid) || !s_is_uint (cn_msg_get (m, "seq"))
        || !s_is_int (cn_msg_get (m, "time_ms"))) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "vm_event: vm_uuid (a UUID), seq or time_ms missing");
        return;
    }
    bool destroy = s_str_eq (event, "destroy");
    if (!destroy && !s_str_eq (event, "create") && !s_str_eq (event, "state")
        && !s_str_eq (event, "update")) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "vm_event: unknown event");
        return;
    }
    if (!destroy && (!vm || vm->type != MSGPACK_OBJECT_MAP)) {
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "vm_event: vm missing or not a map");
        return;
    }
    s_forward (s, "vm_event", payload, len);
}

/* One whole binary message. */
static void s_on_hb (sess_t *s);

static void
s_on_message (sess_t *s, const uint8_t *payload, size_t len)
{
    /* the one message every session sends every second: no allocation */
    if (s->state != S_HELLO && cn_msg_is_plain_hb (payload, len)) {
        s_on_hb (s);
        return;
    }
    cn_msg_t m;
    char err[96], why[128];
    if (cn_msg_parse (&m, payload, len, err, sizeof err) != 0) {
        snprintf (why, sizeof why, "malformed message: %s", err);
        s_fail (s, CN_WS_CLOSE_PROTOCOL, why);
        return;
    }
    if (cn_msg_is (&m, "hello"))
        s_on_hello (s, &m, payload, len);
    else
    if (s->state == S_HELLO)
        s_fail (s, CN_WS_CLOSE_PROTOCOL, "the first message must be hello");
    else
    if (cn_msg_is (&m, "hb")) {
        if (!s_is_uint (cn_msg_get (&m, "seq")) || !s_is_int (cn_msg_get (&m, "sent_ms")))
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "hb: seq or sent_ms missing");
        else
            s_on_hb (s);
    }
    else
    if (cn_msg_is (&m, "vm_event"))
        s_on_vm_event (s, &m, payload, len);
    else
    if (cn_msg_is (&m, "task_event") || cn_msg_is (&m, "task_end"))
        s_on_task_frame (s, &m, cn_msg_is (&m, "task_end"), payload, len);
    else {
        snprintf (why, sizeof why, "unknown message type %.*s", (int) (m.type_len > 40 ? 40 : m.type_len),
                  m.type);
        s_fail (s, CN_WS_CLOSE_PROTOCOL, why);
    }
    cn_msg_fini (&m);
}

/* An agent's hb: answered at once, in the wake-up that read it
 * (proto/session.md), at most one per half interval whatever the agent's
 * pace. */
static void
s_on_hb (sess_t *s)
{
    if (s->state == S_OWNED
        && s->hub->mono - s->last_beat >= (uint64_t) s->hub->cfg->session_heartbeat_ms / 2)
        s_beat (s);
}

/* One frame; false when the session stopped reading (closing). */
static void
s_on_frame (sess_t *s, const cn_ws_frame_t *f)
{
    atomic_fetch_add_explicit (&s->hub->stats.frames_in, 1, memory_order_relaxed);
    switch (f->opcode) {
        case CN_WS_OP_TEXT:
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "text frames are not allowed (binary msgpack only)");
            return;
        case CN_WS_OP_BINARY:
            if (s->frag_op) {
                s_fail (s, CN_WS_CLOSE_PROTOCOL, "new message inside a fragmented one");
                return;
            }
            if (f->fin) {
                s_on_message (s, f->payload, f->len);
                return;
            }
            s->frag = malloc (f->len ? f->len : 1);
            if (!s->frag)
                abort ();
            memcpy (s->frag, f->payload, f->len);
            s->frag_len = f->len;
            s->frag_op = CN_WS_OP_BINARY;
            return;
        case CN_WS_OP_CONT: {
            if (!s->frag_op) {
                s_fail (s, CN_WS_CLOSE_PROTOCOL, "continuation without a message");
                return;
            }
            if (s->frag_len + f->len > CN_WS_MAX_MESSAGE) {
                s_fail (s, CN_WS_CLOSE_TOO_BIG, "message larger than 1 MiB");
                return;
            }
            char *p = realloc (s->frag, s->frag_len + f->len + 1);
            if (!p)
                abort ();
            memcpy (p + s->frag_len, f->payload, f->len);
            s->frag = p;
            s->frag_len += f->len;
            if (f->fin) {
                char *msg = s->frag;
                size_t n = s->frag_len;
                s->frag = NULL;
                s->frag_len = 0;
                s->frag_op = 0;
                s_on_message (s, (uint8_t *) msg, n);
                free (msg);
            }
            return;
        }
        case CN_WS_OP_PING:
            s_send_frame (s, CN_WS_OP_PONG, f->payload, f->len);
            return;
        case CN_WS_OP_PONG:
            return;
        case CN_WS_OP_CLOSE: {
            /* the agent closes: answer in kind (RFC 6455 5.5.1) */
            uint16_t code = f->len >= 2 ? (uint16_t) ((f->payload[0] << 8) | f->payload[1])
                                        : CN_WS_CLOSE_NORMAL;
            CN_DEBUG (COMPONENT, "agent closed the session", "{s:s,s:i}", "server_uuid",
                      s->uuid, "code", (int) code);
            s_bye (s, "closed");
            s_close (s, CN_WS_CLOSE_NORMAL, "");
            return;
        }
        default:
            s_fail (s, CN_WS_CLOSE_PROTOCOL, "unknown opcode");
    }
}

/* The read side ended (EOF, reset, or an error). */
static void
s_on_peer_gone (sess_t *s)
{
    s_bye (s, "closed");
    if (s->writing && s->state == S_CLOSING) {
        /* let our close frame go out first; the linger bounds it */
        s->peer_gone = true;
        return;
    }
    s_close_socket (s);
}

/* Parse the frames in p[0..n) (unmasked in place); returns the bytes of an
 * incomplete frame left at the end. */
static size_t
s_parse (sess_t *s, uint8_t *p, size_t n, size_t *used)
{
    size_t off = 0;
    while (off < n && s->state != S_CLOSING && s->fd >= 0) {
        cn_ws_frame_t f;
        uint16_t code = 0;
        const char *why = NULL;
        int rc = cn_ws_parse (p + off, n - off, CN_WS_MAX_MESSAGE, &f, &code, &why);
        if (rc == 0)
            break;
        if (rc < 0) {
            s_fail (s, code, why);
            off = n;
            break;
        }
        s_on_frame (s, &f);
        /* s may be CLOSING now, never freed here (a session closed in an
         * epoll batch is freed at the end of the batch) */
        off += f.size;
    }
    if (s->state == S_CLOSING || s->fd < 0)
        off = n;                /* after our close frame: discard */
    *used = off;
    return n - off;
}

/* Bytes from the agent. */
static void
s_on_bytes (sess_t *s, uint8_t *p, size_t n)
{
    if (s->fd < 0 || s->state == S_CLOSING || n == 0)
        return;
    s->last_heard = s->hub->now;
    s_tunlink (&s->dead);
    s_tlink (s->hub, &s->hub->dead_to, &s->dead);
    size_t used = 0, left;
    if (s->ilen == 0) {
        /* the usual case: whole frames, parsed where the kernel put them */
        left = s_parse (s, p, n, &used);
        if (left) {
            s->ibuf = cn_grow (s->ibuf, &s->icap, left, 1, 256);
            memcpy (s->ibuf, p + used, left);
        }
    }
    else {
        s->ibuf = cn_grow (s->ibuf, &s->icap, s->ilen + n, 1, 256);
        memcpy (s->ibuf + s->ilen, p, n);
        s->ilen += n;
        left = s_parse (s, (uint8_t *) s->ibuf, s->ilen, &used);
        if (left && used)
            memmove (s->ibuf, s->ibuf + used, left);
    }
    s->ilen = left;
    if (!left && s->icap > 4096) {
        /* a large message went through: give its buffer back */
        free (s->ibuf);
        s->ibuf = NULL;
        s->icap = 0;
    }
}

/* Readiness of one session's socket (edge-triggered: read until the
 * kernel has nothing more; a short read means that, unless the peer also
 * hung up, when the read must go on to the end of file). */
static void
s_on_ready (cn_hub_t *hub, sess_t *s, uint32_t ev)
{
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        bool hup = (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
        int round = 0;
        for (; s->fd >= 0 && !s->peer_gone && round < 64; round++) {
            /* recv, not read: the socket call skips the file layer
             * (rw_verify_area, fsnotify), ~5% of this thread at 15,000
             * sessions (docs/benchmarks.md, "Sixth round") */
            ssize_t n = recv (s->fd, hub->rbuf, READ_CHUNK, MSG_DONTWAIT);
            if (n > 0) {
                s_on_bytes (s, hub->rbuf, (size_t) n);
                if ((size_t) n < READ_CHUNK && !hup)
                    break;
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            s_on_peer_gone (s);     /* 0: end of file; < 0: reset or error */
            break;
        }
        if (round == 64 && s->fd >= 0 && !s->peer_gone) {
            /* 4 MiB in one go: let the others have their turn. The edge is
             * spent, so ask epoll to report the socket again if it still
             * has bytes (or an end of file) for us. */
            struct epoll_event again = { .events = SESS_EVENTS, .data.ptr = s };
            (void) epoll_ctl (hub->ep, EPOLL_CTL_MOD, s->fd, &again);
        }
    }
    if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && s->fd >= 0 && s->writing)
        s_try_send (s);
}

/* ------------------------------------------------------------------ */
/* Commands from the sessions actor                                     */

static int
s_cmp_uuid (const void *a, const void *b)
{
    const sess_t *x = *(sess_t *const *) a, *y = *(sess_t *const *) b;
    int c = strcmp (x->uuid, y->uuid);
    return c ? c : x->sid < y->sid ? -1 : x->sid > y->sid;
}

static void
s_snapshot (cn_hub_t *hub, const cn_hub_cmd_t *c)
{
    size_t n = 0, total = 0;
    for (h2o_linklist_t *l = hub->all.next; l != &hub->all; l = l->next) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, l);
        total += s->state == S_CLAIM || s->state == S_OWNED;
    }
    sess_t **v = malloc ((total ? total : 1) * sizeof *v);
    if (!v)
        abort ();
    for (h2o_linklist_t *l = hub->all.next; l != &hub->all; l = l->next) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, l);
        if (s->state == S_CLAIM || s->state == S_OWNED)
            v[n++] = s;
    }
    qsort (v, n, sizeof *v, s_cmp_uuid);
    size_t from = c->offset < n ? (size_t) c->offset : n;
    size_t count = n - from < c->limit ? n - from : (size_t) c->limit;
    uint64_t now = hub->now;
    cn_msgw_t w;
    cn_msgw_init (&w, "sessions", 5);
    cn_msgw_uint (&w, "req", c->req);
    cn_msgw_uint (&w, "total", n);
    cn_msgw_uint (&w, "offset", from);
    cn_msgw_int (&w, "now_ms", (int64_t) now);
    cn_msgw_key (&w, "sessions");
    msgpack_pack_array (&w.pk, (uint32_t) count);
    for (size_t i = from; i < from + count; i++) {
        sess_t *s = v[i];
        msgpack_pack_map (&w.pk, 6);
#define K(k) do { msgpack_pack_str (&w.pk, strlen (k)); msgpack_pack_str_body (&w.pk, k, strlen (k)); } while (0)
        K ("server_uuid");
        msgpack_pack_str (&w.pk, 36);
        msgpack_pack_str_body (&w.pk, s->uuid, 36);
        K ("epoch");
        msgpack_pack_uint64 (&w.pk, s->epoch);
        K ("heartbeat_age_ms");
        msgpack_pack_uint64 (&w.pk, now >= s->last_heard ? now - s->last_heard : 0);
        K ("connected_s");
        msgpack_pack_uint64 (&w.pk, now >= s->connected_ms ? (now - s->connected_ms) / 1000 : 0);
        K ("remote");
        msgpack_pack_str (&w.pk, strlen (s->remote));
        msgpack_pack_str_body (&w.pk, s->remote, strlen (s->remote));
        K ("state");
        const char *st = s->state == S_OWNED ? "owned" : "claiming";
        msgpack_pack_str (&w.pk, strlen (st));
        msgpack_pack_str_body (&w.pk, st, strlen (st));
#undef K
    }
    free (v);
    s_push (hub, &w);
}

static void s_adopt (cn_hub_t *hub, sess_t *s);
static void s_shutdown (cn_hub_t *hub);

static void
s_on_cmds (cn_hub_t *hub, h2o_linklist_t *messages)
{
    while (!h2o_linklist_is_empty (messages)) {
        cn_hub_cmd_t *c = H2O_STRUCT_FROM_MEMBER (cn_hub_cmd_t, super.link, messages->next);
        h2o_linklist_unlink (&c->super.link);
        if (c->kind == CN_HUB_ADOPT) {
            s_adopt (hub, c->sess);
            free (c);
            continue;
        }
        if (c->kind == CN_HUB_SHUTDOWN)
            s_shutdown (hub);
        sess_t *s = c->kind == CN_HUB_WELCOME || c->kind == CN_HUB_CLOSE
                    || c->kind == CN_HUB_SEND ? s_find (hub, c->sid) : NULL;
        if (c->kind == CN_HUB_WELCOME && s && s->state == S_CLAIM) {
            s->epoch = c->epoch;
            s->state = S_OWNED;
            cn_msgw_t w;
            cn_msgw_init (&w, "welcome", 3);
            cn_msgw_str (&w, "instance", hub->cfg->instance);
            cn_msgw_uint (&w, "epoch", c->epoch);
            cn_msgw_uint (&w, "heartbeat_ms", (uint64_t) hub->cfg->session_heartbeat_ms);
            s_send_msg (s, &w);
            s->last_beat = hub->mono;
            if (!s_tlinked (&s->beat))
                s_tlink (hub, &hub->beat_to, &s->beat);
        }
        else
        if (c->kind == CN_HUB_CLOSE && s && s->state != S_CLOSING) {
            s->quiet = true;        /* the actor ordered it: no bye */
            CN_INFO (COMPONENT, "session closed by the sessions actor", "{s:s,s:i,s:s,s:s}",
                     "server_uuid", s->uuid, "code", (int) c->code, "reason", c->reason,
                     "goaway", c->goaway);
            if (c->goaway[0])
                s_send_goaway (s, c->goaway);
            s_close (s, c->code, c->reason);
        }
        else
        if (c->kind == CN_HUB_SEND && s && s->state == S_OWNED && c->data)
            s_send_frame (s, CN_WS_OP_BINARY, c->data, c->len);
        else
        if (c->kind == CN_HUB_SNAPSHOT)
            s_snapshot (hub, c);
        free (c->data);
        free (c);
    }
}

/* ------------------------------------------------------------------ */
/* Upgrade                                                              */

static void
s_free (sess_t *s)
{
    cn_hub_t *hub = s->hub;
    s_tunlink (&s->beat);
    s_tunlink (&s->dead);
    s_table_remove (hub, s);
    if (h2o_linklist_is_linked (&s->link))
        h2o_linklist_unlink (&s->link);
    free (s->wbuf);
    free (s->obuf);
    free (s->frag);
    free (s->ibuf);
    free (s);
}

/* The hub's thread: a session handed over by the gateway (its fd, and in
 * ibuf the bytes that came with the request). */
static void
s_adopt (cn_hub_t *hub, sess_t *s)
{
    s_table_add (hub, s);
    atomic_fetch_sub (&hub->handing, 1);      /* (after: the count never dips) */
    struct epoll_event ev = { .events = SESS_EVENTS, .data.ptr = s };
    if (epoll_ctl (hub->ep, EPOLL_CTL_ADD, s->fd, &ev) != 0) {
        CN_ERROR (COMPONENT, "cannot watch a session socket", "{s:s,s:s}", "server_uuid",
                  s->uuid, "error", strerror (errno));
        close (s->fd);
        s->fd = -1;
        s_free (s);
        return;
    }
    atomic_fetch_add_explicit (&hub->stats.open, 1, memory_order_relaxed);
    s->last_heard = hub->now;
    s->connected_ms = s->last_heard;
    s_tlink (hub, &hub->dead_to, &s->dead);
    uint8_t *early = (uint8_t *) s->ibuf;
    size_t n = s->ilen;
    s->ibuf = NULL;
    s->ilen = s->icap = 0;
    if (hub->shutting_down) {
        s->quiet = true;
        s_send_goaway (s, "shutdown");
        s_close (s, CN_WS_CLOSE_GOING_AWAY, "instance shutting down");
    }
    else
    /* bytes that came with the request (a hello sent without waiting) */
    if (n > 0)
        s_on_bytes (s, early, n);
    free (early);
}

/* The gateway's h2o thread: the 101 is written; hand the raw socket over. */
static void
s_on_upgraded (void *user_data, h2o_socket_t *sock, size_t reqsize)
{
    sess_t *s = user_data;
    if (!sock) {
        free (s);               /* not in the hub's tables yet */
        return;
    }
    cn_hub_t *hub = s->hub;
    h2o_buffer_consume (&sock->input, reqsize);
    /* from here on the socket is ours, out of h2o's loop */
    h2o_socket_export_t info;
    if (h2o_socket_export (sock, &info) != 0) {
        free (s);
        return;
    }
    s->fd = info.fd;
    if (info.input->size > 0) {
        s->ibuf = malloc (info.input->size);
        if (!s->ibuf)
            abort ();
        memcpy (s->ibuf, info.input->bytes, info.input->size);
        s->ilen = s->icap = info.input->size;
    }
    h2o_buffer_dispose (&info.input);
    cn_hub_cmd_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = CN_HUB_ADOPT;
    c->sess = s;
    /* counted from now on: the gateway's shutdown waits for it too */
    atomic_fetch_add (&hub->handing, 1);
    cn_hub_post (hub, c);
}

int
cn_hub_on_req (cn_hub_t *hub, h2o_req_t *req, const char *uuid, h2o_iovec_t key,
               const char **why)
{
    char accept[29];
    if (key.len >= 32 || !cn_ws_accept_key (key.base, key.len, accept)) {
        *why = "bad sec-websocket-key";
        return -1;
    }
    sess_t *s = calloc (1, sizeof *s);
    if (!s)
        abort ();
    s->hub = hub;
    s->fd = -1;
    s->sid = atomic_fetch_add (&hub->next_sid, 1) + 1;
    memcpy (s->uuid, uuid, 36);
    s->beat.cb = s_on_beat;
    s->dead.cb = s_on_dead;
    struct sockaddr_storage ss;
    socklen_t sl = req->conn->callbacks->get_peername (req->conn, (struct sockaddr *) &ss);
    char host[NI_MAXHOST];
    size_t hl = sl ? h2o_socket_getnumerichost ((struct sockaddr *) &ss, sl, host) : SIZE_MAX;
    if (hl != SIZE_MAX)
        snprintf (s->remote, sizeof s->remote, "%.*s:%d", (int) hl, host,
                  h2o_socket_getport ((struct sockaddr *) &ss));
    atomic_fetch_add_explicit (&hub->stats.upgrades, 1, memory_order_relaxed);

    req->res.status = 101;
    req->res.reason = "Switching Protocols";
    h2o_add_header (&req->pool, &req->res.headers, H2O_TOKEN_UPGRADE, NULL,
                    H2O_STRLIT ("websocket"));
    h2o_add_header_by_str (&req->pool, &req->res.headers, H2O_STRLIT ("sec-websocket-accept"),
                           0, NULL, accept, strlen (accept));
    h2o_add_header_by_str (&req->pool, &req->res.headers, H2O_STRLIT ("x-server-name"), 0,
                           NULL, hub->cfg->instance, strlen (hub->cfg->instance));
    h2o_http1_upgrade (req, NULL, 0, s_on_upgraded, s);
    return 0;
}

/* The hub's thread: every agent is told to go elsewhere. */
static void
s_shutdown (cn_hub_t *hub)
{
    hub->shutting_down = true;
    s_tunlink (&hub->flush_entry);
    size_t n = 0;
    for (h2o_linklist_t *l = hub->all.next; l != &hub->all; ) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, l);
        l = l->next;
        if (s->fd < 0 || s->state == S_CLOSING)
            continue;
        /* no bye: the rows stay ours until another instance takes them
         * over (docs/sessions.md, "Shutdown") */
        s->quiet = true;
        s_send_goaway (s, "shutdown");
        s_close (s, CN_WS_CLOSE_GOING_AWAY, "instance shutting down");
        n++;
    }
    CN_INFO (COMPONENT, "sessions told to go elsewhere", "{s:i}", "sessions", (int) n);
}

/* ------------------------------------------------------------------ */
/* The hub's thread                                                     */

void
cn_hub_post (cn_hub_t *hub, cn_hub_cmd_t *c)
{
    pthread_mutex_lock (&hub->inbox_mu);
    bool was_empty = h2o_linklist_is_empty (&hub->inbox);
    h2o_linklist_insert (&hub->inbox, &c->super.link);
    pthread_mutex_unlock (&hub->inbox_mu);
    if (was_empty) {
        uint64_t one = 1;
        ssize_t rc = write (hub->inbox_fd, &one, sizeof one);
        (void) rc;              /* a full counter still wakes the loop */
    }
}

static void
s_drain_inbox (cn_hub_t *hub)
{
    uint64_t n;
    ssize_t rc = read (hub->inbox_fd, &n, sizeof n);
    (void) rc;
    h2o_linklist_t got;
    h2o_linklist_init_anchor (&got);
    pthread_mutex_lock (&hub->inbox_mu);
    h2o_linklist_insert_list (&got, &hub->inbox);
    pthread_mutex_unlock (&hub->inbox_mu);
    s_on_cmds (hub, &got);
}

static void
s_clock (cn_hub_t *hub)
{
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    hub->now = (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    hub->mono = (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

static void *
s_thread (void *arg)
{
    cn_hub_t *hub = arg;
    cn_thread_name ("sessions-io");
    struct epoll_event evs[EP_EVENTS];
    while (!atomic_load (&hub->stop)) {
        s_clock (hub);
        int wait = 1000;
        wait = s_twait (hub, &hub->dead_to, wait);
        wait = s_twait (hub, &hub->beat_to, wait);
        wait = s_twait (hub, &hub->linger_to, wait);
        wait = s_twait (hub, &hub->flush_to, wait);
        int n = epoll_wait (hub->ep, evs, EP_EVENTS, wait);
        s_clock (hub);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &hub->inbox) {
                s_drain_inbox (hub);
                continue;
            }
            sess_t *s = evs[i].data.ptr;
            if (s->fd >= 0)
                s_on_ready (hub, s, evs[i].events);
        }
        s_trun (hub, &hub->dead_to);
        s_trun (hub, &hub->beat_to);
        s_trun (hub, &hub->linger_to);
        s_trun (hub, &hub->flush_to);
        s_reap (hub);
    }
    /* cn_hub_finish: the gateway's grace is over; close what is left */
    s_drain_inbox (hub);
    for (h2o_linklist_t *l = hub->all.next; l != &hub->all; ) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, l);
        l = l->next;
        if (s->fd >= 0)
            s_close_socket (s);
    }
    s_reap (hub);
    return NULL;
}

void
cn_hub_shutdown (cn_hub_t *hub)
{
    cn_hub_cmd_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = CN_HUB_SHUTDOWN;
    cn_hub_post (hub, c);
}

void
cn_hub_finish (cn_hub_t *hub)
{
    /* (a session whose 101 is still being written is h2o's until then: the
     * upgrade callback frees it; if the gateway's grace ends first, it is
     * left to the process exit, as h2o's connection is) */
    if (!hub->thread_started)
        return;
    atomic_store (&hub->stop, true);
    cn_hub_cmd_t *c = calloc (1, sizeof *c);
    if (!c)
        abort ();
    c->kind = CN_HUB_WAKE;
    cn_hub_post (hub, c);
    pthread_join (hub->thread, NULL);
    hub->thread_started = false;
}

size_t
cn_hub_count (cn_hub_t *hub)
{
    return atomic_load (&hub->count) + atomic_load (&hub->handing);
}

const char *
cn_hub_boot_id (const cn_hub_t *hub)
{
    return hub->boot_id;
}

/* ------------------------------------------------------------------ */
/* Life cycle                                                           */

cn_hub_t *
cn_hub_new (const cn_config_t *cfg, cn_liveness_t *live)
{
    cn_hub_t *hub = calloc (1, sizeof *hub);
    if (!hub)
        abort ();
    hub->cfg = cfg;
    hub->live = live;
    hub->table = calloc (SESS_BUCKETS, sizeof *hub->table);
    if (!hub->table)
        abort ();
    h2o_linklist_init_anchor (&hub->all);
    h2o_linklist_init_anchor (&hub->closing);
    h2o_linklist_init_anchor (&hub->inbox);
    pthread_mutex_init (&hub->inbox_mu, NULL);
    hub->ep = -1;
    /* here, not in start: a post before the thread runs must still wake it */
    hub->inbox_fd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
    cn_uuid_new (hub->boot_id);
    return hub;
}

/* The sessions' epoll, edge-triggered, so each ready socket is looked at
 * once per event (h2o's own level-triggered epoll polls each ready socket
 * twice: docs/benchmarks.md, "Fifth round"); the mailbox's eventfd is in it
 * too. */
static int
s_ep_setup (cn_hub_t *hub, char *reason, size_t rlen)
{
    hub->rbuf = malloc (READ_CHUNK);
    if (!hub->rbuf) {
        snprintf (reason, rlen, "sessions' read buffer: out of memory");
        return -1;
    }
    if (hub->inbox_fd < 0) {
        snprintf (reason, rlen, "sessions' mailbox: no eventfd");
        return -1;
    }
    hub->ep = epoll_create1 (EPOLL_CLOEXEC);
    if (hub->ep < 0) {
        snprintf (reason, rlen, "sessions' epoll: %s", strerror (errno));
        return -1;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &hub->inbox };
    if (epoll_ctl (hub->ep, EPOLL_CTL_ADD, hub->inbox_fd, &ev) != 0) {
        snprintf (reason, rlen, "sessions' mailbox: %s", strerror (errno));
        return -1;
    }
    return 0;
}

int
cn_hub_start (cn_hub_t *hub, char *reason, size_t rlen)
{
    const cn_config_t *cfg = hub->cfg;
    hub->push = zsock_new (ZMQ_PUSH);
    if (!hub->push) {
        snprintf (reason, rlen, "cannot create the sessions socket");
        return -1;
    }
    zsock_set_sndhwm (hub->push, 1000000);
    zsock_set_linger (hub->push, 0);
    if (zsock_bind (hub->push, "%s", CN_SESSIONS_ENDPOINT) != 0) {
        snprintf (reason, rlen, "bind %s: %s", CN_SESSIONS_ENDPOINT, zmq_strerror (zmq_errno ()));
        zsock_destroy (&hub->push);
        return -1;
    }
    hub->push_handle = zsock_resolve (hub->push);
    /* task frames: the tasks actor binds (when this build has one) */
    hub->tpush = zsock_new (ZMQ_PUSH);
    if (!hub->tpush) {
        snprintf (reason, rlen, "cannot create the task frames socket");
        return -1;
    }
    zsock_set_sndhwm (hub->tpush, 100000);
    zsock_set_linger (hub->tpush, 0);
    if (zsock_connect (hub->tpush, "%s", CN_TASKS_FRAMES_ENDPOINT) != 0) {
        snprintf (reason, rlen, "connect %s: %s", CN_TASKS_FRAMES_ENDPOINT,
                  zmq_strerror (zmq_errno ()));
        return -1;
    }
    hub->tpush_handle = zsock_resolve (hub->tpush);
    if (s_ep_setup (hub, reason, rlen) != 0)
        return -1;
    /* the fallback beat: the agent's own hbs (answered at once) normally
     * come first; 1.5 intervals keeps the agent's 3-interval limit far */
    s_tinit (&hub->beat_to, (uint64_t) cfg->session_heartbeat_ms * 3 / 2);
    s_tinit (&hub->dead_to, (uint64_t) cfg->session_dead_after_ms);
    s_tinit (&hub->linger_to, LINGER_MS);
    s_tinit (&hub->flush_to, (uint64_t) cfg->session_flush_ms);
    hub->flush_entry.cb = s_on_flush;
    s_clock (hub);
    s_tlink (hub, &hub->flush_to, &hub->flush_entry);

    hub->args.cfg = cfg;
    hub->args.live = hub->live;
    hub->args.hub = hub;
    hub->args.stats = &hub->stats;
    memcpy (hub->args.boot_id, hub->boot_id, sizeof hub->boot_id);
    hub->actor = zactor_new (cn_sessions_actor, &hub->args);
    if (!hub->actor) {
        snprintf (reason, rlen, "cannot start the sessions actor");
        return -1;
    }
    zstr_send (hub->actor, "START");
    char *ok = zstr_recv (hub->actor);
    if (!ok || !streq (ok, "OK")) {
        char *why = ok ? zstr_recv (hub->actor) : NULL;
        snprintf (reason, rlen, "sessions: %s", why ? why : "no answer");
        free (why);
        free (ok);
        return -1;
    }
    free (ok);
    if (pthread_create (&hub->thread, NULL, s_thread, hub) != 0) {
        snprintf (reason, rlen, "cannot start the sessions' thread");
        return -1;
    }
    hub->thread_started = true;
    return 0;
}

void
cn_hub_destroy (cn_hub_t **p)
{
    if (!p || !*p)
        return;
    cn_hub_t *hub = *p;
    cn_hub_finish (hub);        /* (the gateway normally did) */
    /* the actor first: nothing is posted to the mailbox after this */
    zactor_destroy (&hub->actor);
    zsock_destroy (&hub->push);
    hub->push_handle = NULL;
    zsock_destroy (&hub->tpush);
    hub->tpush_handle = NULL;
    while (!h2o_linklist_is_empty (&hub->inbox)) {
        cn_hub_cmd_t *c = H2O_STRUCT_FROM_MEMBER (cn_hub_cmd_t, super.link, hub->inbox.next);
        h2o_linklist_unlink (&c->super.link);
        if (c->kind == CN_HUB_ADOPT) {
            sess_t *s = c->sess;
            if (s->fd >= 0)
                close (s->fd);
            free (s->ibuf);
            free (s);
            atomic_fetch_sub (&hub->handing, 1);
        }
        free (c->data);
        free (c);
    }
    /* sessions left (the thread closed them if it ran) */
    while (!h2o_linklist_is_empty (&hub->all)) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, hub->all.next);
        if (s->fd >= 0)
            close (s->fd);
        s->fd = -1;
        s_free (s);
    }
    while (!h2o_linklist_is_empty (&hub->closing)) {
        sess_t *s = H2O_STRUCT_FROM_MEMBER (sess_t, link, hub->closing.next);
        s_free (s);
    }
    if (hub->ep >= 0)
        close (hub->ep);
    if (hub->inbox_fd >= 0)
        close (hub->inbox_fd);
    pthread_mutex_destroy (&hub->inbox_mu);
    free (hub->rbuf);
    free (hub->table);
    free (hub);
    *p = NULL;
}
