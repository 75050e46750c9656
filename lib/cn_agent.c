/*
 * cn_agent: see include/cn_agent.h.
 *
 * Theory of operation
 *
 * Threads. T loop threads, each an h2o evloop hosting a share of the CNs
 * (CN i lives on loop i % T and is touched only by that thread); a resolver
 * thread (cn_resolver); a publisher thread (cn_publisher); the caller's
 * thread, which only reads counters (atomics) and sends messages. Messages
 * into a loop go through h2o's multithread queue (it wakes the loop through
 * a pipe): stop, DNS answers, the event rate, VM operations from the HTTP
 * listener of loop 0.
 *
 * Timers. Fixed durations (heartbeat, silence, open timeout, sysinfo period,
 * the 10 ms event tick) are h2o_timeout_t's: one per distinct duration per
 * loop (tmos[]), so linking and unlinking is O(1) for 10,000 CNs. Jittered
 * delays (backoff, quick retry, goaway, ramp, VM transitions) sit in a
 * binary heap per loop, run after every h2o_evloop_run, whose wait is
 * bounded by the heap's earliest deadline.
 *
 * One CN's session (states in cn_sess_state_t):
 *
 *   IDLE --ramp--> RESOLVING --answer--> CONNECTING --101--> HELLO --welcome--> UP
 *     ^                 |                  |                   |                 |
 *     |           no answer           refused/timeout      close/timeout    close/EOF/
 *     |                 v                  v                   v           silence/goaway
 *     +---------------------------------- WAIT <-----------------------------------+
 *                          (cn_retry_next: same address or re-resolve, delay)
 *
 * The open timeout covers connect, upgrade and welcome. Once UP, any bytes
 * from the instance push the silence deadline (3 x the instance's heartbeat
 * interval) back; heartbeats go out every heartbeat_ms from HELLO on. A
 * session we leave is closed politely in the background (detached, with a
 * 1 s linger) while the CN already moves on.
 *
 * VM events are sent on the session in HELLO and UP: an event after the
 * hello was queued is not in the hello, and the instance may bind its AMQP
 * queue only after our publish; the session copy closes that gap.
 */
#include "cn_agent_int.h"

#include "cn_amqp.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <wslay/wslay.h>

#define COMPONENT "agent"
#define S_MAX_MSG (1024 * 1024)
#define S_GEN_TICK_MS 10
#define S_LINGER_MS 1000

/* ------------------------------------------------------------------ */
/* The reconnect policy                                                 */

cn_next_t
cn_retry_next (cn_retry_t *r, cn_loss_t loss, int64_t up_ms, const cn_retry_cfg_t *cfg,
               uint32_t rnd_a, uint32_t rnd_b)
{
    cn_next_t n = { .same = false, .delay_ms = 0 };
    if (up_ms >= cfg->stable_ms) {
        /* the lost session proved itself: start over */
        r->attempt = 0;
        r->quick_ok = true;
    }
    switch (loss) {
    case CN_LOSS_GOAWAY:
        r->quick_ok = false;
        n.delay_ms = cfg->goaway_ms > 0 ? (int) (rnd_a % (uint32_t) (cfg->goaway_ms + 1)) : 0;
        return n;
    case CN_LOSS_TRANSIENT:
        if (r->quick_ok) {
            r->quick_ok = false;
            n.same = true;
            n.delay_ms = cfg->quick_ms > 0 ? (int) (rnd_a % (uint32_t) (cfg->quick_ms + 1)) : 0;
            return n;
        }
        break;
    case CN_LOSS_SILENT:
    case CN_LOSS_FAILED:
        break;
    }
    r->quick_ok = false;
    /* full jitter: uniform in [0, min(cap, base * 2^attempt)] */
    long long ceiling = cfg->base_ms > 0 ? cfg->base_ms : 1;
    for (int i = 0; i < r->attempt && ceiling < cfg->cap_ms; i++)
        ceiling *= 2;
    if (ceiling > cfg->cap_ms)
        ceiling = cfg->cap_ms;
    n.delay_ms = (int) (rnd_b % (uint32_t) (ceiling + 1));
    if (r->attempt < 30)
        r->attempt++;
    return n;
}

int
cn_retry_pick (const uint32_t *addrs, size_t n, uint32_t last, uint32_t rnd)
{
    if (n == 0)
        return -1;
    size_t others = 0;
    for (size_t i = 0; i < n; i++)
        if (addrs[i] != last)
            others++;
    if (others == 0)
        return (int) (rnd % n);
    size_t k = rnd % others;
    for (size_t i = 0; i < n; i++)
        if (addrs[i] != last && k-- == 0)
            return (int) i;
    abort ();
}

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */

const char *
cn_sess_state_name (cn_sess_state_t s)
{
    switch (s) {
    case CN_SESS_IDLE: return "idle";
    case CN_SESS_WAIT: return "wait";
    case CN_SESS_RESOLVING: return "resolving";
    case CN_SESS_CONNECTING: return "connecting";
    case CN_SESS_HELLO: return "hello";
    case CN_SESS_UP: return "up";
    case CN_SESS_STOPPED: return "stopped";
    }
    return "unknown";
}

void
cn_agents_cfg_defaults (cn_agents_cfg_t *c)
{
    memset (c, 0, sizeof *c);
    c->datacenter_name = "dc1";
    c->dns_domain = "example.com";
    c->cnapi_port = 8080;
    c->resolve_cache_ms = 1000;
    c->heartbeat_ms = 1000;
    c->open_timeout_ms = 5000;
    c->retry.base_ms = 100;
    c->retry.cap_ms = 5000;
    c->retry.quick_ms = 100;
    c->retry.goaway_ms = 100;
    c->retry.stable_ms = 5000;
    c->agent = "provisioner/" CNAPI_VERSION;
    c->amqp_window = 1000;
    c->amqp_buffer = 100000;
    c->sysinfo_interval_s = 60;
    c->threads = 1;
    c->session_log_level = CN_LOG_INFO;
    c->tasks_max = 1000;
    c->task_timeout_ms = 600000;
}

static uint64_t
s_rand (aloop_t *l)
{
    uint64_t x = l->rng[0], y = l->rng[1];
    l->rng[0] = y;
    x ^= x << 23;
    l->rng[1] = x ^ y ^ (x >> 17) ^ (y >> 26);
    return l->rng[1] + y;
}

static int64_t
s_now (aloop_t *l)
{
    return (int64_t) h2o_now (l->evloop);
}

static void
s_addr_str (uint32_t addr, int port, char *out, size_t len)
{
    char ip[INET_ADDRSTRLEN] = "";
    struct in_addr a = { .s_addr = addr };
    inet_ntop (AF_INET, &a, ip, sizeof ip);
    snprintf (out, len, "%s:%d", ip, port);
}

static int
s_intern (cn_agents_t *a, const char *name, size_t len)
{
    if (len >= 64)
        len = 63;
    int n = atomic_load (&a->ninst);
    for (int i = 0; i < n; i++)
        if (strlen (a->inst[i]) == len && memcmp (a->inst[i], name, len) == 0)
            return i;
    pthread_mutex_lock (&a->inst_mu);
    n = atomic_load (&a->ninst);
    int id = -1;
    for (int i = 0; i < n; i++)
        if (strlen (a->inst[i]) == len && memcmp (a->inst[i], name, len) == 0)
            id = i;
    if (id < 0 && n < CN_AGENTS_MAX_INSTANCES) {
        memcpy (a->inst[n], name, len);
        a->inst[n][len] = '\0';
        id = n;
        atomic_store (&a->ninst, n + 1);
    }
    pthread_mutex_unlock (&a->inst_mu);
    return id < 0 ? CN_AGENTS_MAX_INSTANCES - 1 : id;
}

/* ------------------------------------------------------------------ */
/* Timers                                                               */

static void
s_heap_swap (aloop_t *l, size_t i, size_t j)
{
    atimer_t *t = l->heap[i];
    l->heap[i] = l->heap[j];
    l->heap[j] = t;
    l->heap[i]->pos = i + 1;
    l->heap[j]->pos = j + 1;
}

static void
s_heap_up (aloop_t *l, size_t i)
{
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (l->heap[p]->due <= l->heap[i]->due)
            break;
        s_heap_swap (l, i, p);
        i = p;
    }
}

static void
s_heap_down (aloop_t *l, size_t i)
{
    for (;;) {
        size_t c = 2 * i + 1, m = i;
        if (c < l->hn && l->heap[c]->due < l->heap[m]->due)
            m = c;
        if (c + 1 < l->hn && l->heap[c + 1]->due < l->heap[m]->due)
            m = c + 1;
        if (m == i)
            return;
        s_heap_swap (l, i, m);
        i = m;
    }
}

static void
s_timer_stop (aloop_t *l, atimer_t *t)
{
    if (!t->pos)
        return;
    size_t i = t->pos - 1;
    t->pos = 0;
    l->hn--;
    if (i == l->hn)
        return;
    l->heap[i] = l->heap[l->hn];
    l->heap[i]->pos = i + 1;
    s_heap_down (l, i);
    s_heap_up (l, i);
}

static void
s_timer_start (aloop_t *l, atimer_t *t, int64_t delay_ms)
{
    s_timer_stop (l, t);
    if (l->hn == l->hcap) {
        l->hcap = l->hcap ? l->hcap * 2 : 1024;
        l->heap = realloc (l->heap, l->hcap * sizeof *l->heap);
        if (!l->heap)
            abort ();
    }
    t->due = s_now (l) + (delay_ms > 0 ? delay_ms : 0);
    l->heap[l->hn] = t;
    t->pos = ++l->hn;
    s_heap_up (l, l->hn - 1);
}

void
cn_agent_timer_start (aloop_t *l, atimer_t *t, int64_t delay_ms)
{
    s_timer_start (l, t, delay_ms);
}

void
cn_agent_timer_stop (aloop_t *l, atimer_t *t)
{
    s_timer_stop (l, t);
}

/* Runs the heap timers that are due; returns how many ran. */
static size_t
s_timers_run (aloop_t *l)
{
    int64_t now = s_now (l);
    /* bounded: timers armed by callbacks now fire at the earliest next round
     * only if their due time is already past; a callback re-arming itself
     * with delay 0 would spin, so cap the round */
    size_t n = 0;
    for (; l->hn && l->heap[0]->due <= now && n < 100000; n++) {
        atimer_t *t = l->heap[0];
        s_timer_stop (l, t);
        t->cb (t);
    }
    return n;
}

/* The loop's h2o_timeout_t for a duration (created on first use). */
static h2o_timeout_t *
s_tmo (aloop_t *l, uint64_t ms)
{
    for (size_t i = 0; i < l->ntmos; i++)
        if (l->tmos[i].ms == ms)
            return &l->tmos[i].t;
    if (l->ntmos == CN_AGENT_MAX_TMOS)
        return NULL;
    size_t i = l->ntmos++;
    l->tmos[i].ms = ms;
    h2o_timeout_init (l->evloop, &l->tmos[i].t, ms);
    return &l->tmos[i].t;
}

static void
s_link (aloop_t *l, uint64_t ms, h2o_timeout_entry_t *e)
{
    if (h2o_timeout_is_linked (e))
        h2o_timeout_unlink (e);
    h2o_timeout_t *t = s_tmo (l, ms);
    if (!t)
        abort ();               /* durations come from configuration: a handful */
    h2o_timeout_link (l->evloop, t, e);
}

static void
s_unlink (h2o_timeout_entry_t *e)
{
    if (h2o_timeout_is_linked (e))
        h2o_timeout_unlink (e);
}

/* ------------------------------------------------------------------ */
/* Loop messages                                                        */

bool
cn_agent_post (aloop_t *l, amsg_t *m)
{
    pthread_mutex_lock (&l->post_mu);
    bool open = !l->closed;
    if (open)
        h2o_multithread_send_message (&l->rx, &m->super);
    pthread_mutex_unlock (&l->post_mu);
    if (!open) {
        json_decref (m->params);
        json_decref (m->body);
        free (m);
    }
    return open;
}

static amsg_t *
s_msg (int kind)
{
    amsg_t *m = calloc (1, sizeof *m);
    if (!m)
        abort ();
    m->kind = kind;
    return m;
}

/* ------------------------------------------------------------------ */
/* Session                                                              */

#define SLOG(cn, msg, fmt, ...) \
    cn_log ((cn)->a->cfg.session_log_level, COMPONENT, msg, "{s:s," fmt "}", \
            "server_uuid", (cn)->uuid, __VA_ARGS__)

static void s_attempt (acn_t *cn);
static void s_after_loss (acn_t *cn, cn_loss_t loss);

static void
s_set_state (acn_t *cn, cn_sess_state_t s)
{
    atomic_store_explicit (&cn->state, (int) s, memory_order_relaxed);
}

static cn_sess_state_t
s_state (acn_t *cn)
{
    return (cn_sess_state_t) atomic_load_explicit (&cn->state, memory_order_relaxed);
}

static void
s_count (atomic_uint_fast64_t *c)
{
    atomic_fetch_add_explicit (c, 1, memory_order_relaxed);
}

/* Leave the current connection: politely (close frame, 1 s linger, no
 * callbacks) when it is open, else drop it. */
static void
s_drop_ws (acn_t *cn, uint16_t code, const char *reason)
{
    if (!cn->ws)
        return;
    cn_wsc_t *ws = cn->ws;
    cn->ws = NULL;
    if (cn_wsc_is_open (ws))
        cn_wsc_close (ws, code, reason, s_tmo (cn->loop, S_LINGER_MS), true);
    else
        cn_wsc_abort (ws);
}

static int
s_send_msg (acn_t *cn, cn_msgw_t *w)
{
    char *data;
    size_t size;
    cn_msgw_take (w, &data, &size);
    int rc = cn->ws ? cn_wsc_send (cn->ws, data, size) : -1;
    free (data);
    return rc;
}

static void
s_send_hello (acn_t *cn)
{
    cn_agents_t *a = cn->a;
    cn_msgw_t w;
    uint32_t nf = 6 + (cn->admin_ip ? 1 : 0);
    cn_msgw_init (&w, "hello", nf);
    cn_msgw_str (&w, "server_uuid", cn->uuid);
    cn_msgw_str (&w, "agent", a->cfg.agent);
    cn_msgw_str (&w, "boot_id", cn->boot_id);
    cn_msgw_uint (&w, "heartbeat_ms", (uint64_t) a->cfg.heartbeat_ms);
    if (cn->admin_ip)
        cn_msgw_str (&w, "admin_ip", cn->admin_ip);
    cn_msgw_uint (&w, "agent_port", (uint64_t) (cn->agent_port > 0 ? cn->agent_port : 5309));
    cn_msgw_key (&w, "vms");
    size_t n = cn_vmdummy_count (cn->vms);
    msgpack_pack_map (&w.pk, n);
    for (size_t i = 0; i < n; i++) {
        const cn_vm_t *vm = cn_vmdummy_at (cn->vms, i);
        msgpack_pack_str (&w.pk, 36);
        msgpack_pack_str_body (&w.pk, vm->uuid, 36);
        cn_vm_pack (&w.pk, vm);
    }
    s_send_msg (cn, &w);
}

static void
s_send_hb (acn_t *cn)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "hb", 2);
    cn_msgw_uint (&w, "seq", ++cn->hb_seq);
    cn_msgw_int (&w, "sent_ms", cn_now_ms ());
    s_send_msg (cn, &w);
}

static void
s_on_hb_tmo (h2o_timeout_entry_t *e)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, hb_tmo, e);
    cn_sess_state_t st = s_state (cn);
    if (cn->ws && (st == CN_SESS_HELLO || st == CN_SESS_UP)) {
        s_send_hb (cn);
        s_link (cn->loop, (uint64_t) cn->a->cfg.heartbeat_ms, &cn->hb_tmo);
    }
}

static void
s_on_dead_tmo (h2o_timeout_entry_t *e)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, dead_tmo, e);
    char addr[24];
    s_addr_str (cn->last_addr, cn->a->cfg.cnapi_port, addr, sizeof addr);
    SLOG (cn, "instance silent, session dropped", "s:s,s:I", "address", addr,
          "silence_ms", (json_int_t) (cn->dead_t ? cn->dead_t->timeout : 0));
    s_drop_ws (cn, 4002, "heartbeat timeout");
    s_after_loss (cn, CN_LOSS_SILENT);
}

static void
s_on_open_tmo (h2o_timeout_entry_t *e)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, open_tmo, e);
    char addr[24];
    s_addr_str (cn->last_addr, cn->a->cfg.cnapi_port, addr, sizeof addr);
    SLOG (cn, "session open timed out", "s:s,s:s", "address", addr,
          "state", cn_sess_state_name (s_state (cn)));
    s_count (&cn->failures);
    if (cn->ws) {
        cn_wsc_abort (cn->ws);
        cn->ws = NULL;
    }
    s_after_loss (cn, CN_LOSS_FAILED);
}

static void
s_on_ws_open (cn_wsc_t *ws, void *arg)
{
    acn_t *cn = arg;
    s_set_state (cn, CN_SESS_HELLO);
    s_send_hello (cn);
    s_link (cn->loop, (uint64_t) cn->a->cfg.heartbeat_ms, &cn->hb_tmo);
}

static void
s_on_ws_rx (cn_wsc_t *ws, void *arg)
{
    acn_t *cn = arg;
    if (s_state (cn) == CN_SESS_UP && cn->dead_t) {
        s_unlink (&cn->dead_tmo);
        h2o_timeout_link (cn->loop->evloop, cn->dead_t, &cn->dead_tmo);
    }
}

/* A protocol problem on our side of the reading: close with code, go on. */
static void
s_protocol_close (acn_t *cn, uint16_t code, const char *why)
{
    cn_log (cn->a->cfg.session_log_level > CN_LOG_WARN ? cn->a->cfg.session_log_level
                                                       : CN_LOG_WARN,
            COMPONENT, "bad frame from the instance, session closed", "{s:s,s:s,s:i}",
            "server_uuid", cn->uuid, "reason", why, "code", code);
    if (s_state (cn) != CN_SESS_UP)
        s_count (&cn->failures);
    s_drop_ws (cn, code, why);
    s_after_loss (cn, CN_LOSS_FAILED);
}

static void
s_on_welcome (acn_t *cn, const cn_msg_t *m)
{
    size_t ilen = 0;
    const char *inst = cn_msg_str (m, "instance", &ilen);
    uint64_t epoch = 0, hb = 0;
    if (!inst || !ilen || !cn_msg_uint (m, "epoch", &epoch)
        || !cn_msg_uint (m, "heartbeat_ms", &hb)) {
        s_protocol_close (cn, 1002, "welcome without instance, epoch or heartbeat_ms");
        return;
    }
    cn_agents_t *a = cn->a;
    aloop_t *l = cn->loop;
    s_unlink (&cn->open_tmo);
    s_set_state (cn, CN_SESS_UP);
    cn->up_since = s_now (l);
    int id = s_intern (a, inst, ilen);
    uint64_t nconn = atomic_fetch_add (&cn->connects, 1) + 1;
    if (nconn > 1)
        s_count (&cn->reconnects);
    bool failover = cn->prev_instance >= 0 && cn->prev_instance != id;
    if (failover)
        s_count (&cn->failovers);
    cn->prev_instance = id;
    atomic_store (&cn->instance, id);
    atomic_store (&cn->epoch, epoch);
    if (hb < 100)
        hb = 100;
    if (hb > 60000)
        hb = 60000;
    cn->dead_t = s_tmo (l, 3 * hb);
    if (!cn->dead_t)
        cn->dead_t = s_tmo (l, 3 * (uint64_t) a->cfg.heartbeat_ms);
    h2o_timeout_link (l->evloop, cn->dead_t, &cn->dead_tmo);
    char addr[24];
    s_addr_str (cn->last_addr, a->cfg.cnapi_port, addr, sizeof addr);
    SLOG (cn, "session established", "s:s,s:s%,s:I,s:b,s:I", "address", addr, "instance", inst,
          ilen, "epoch", (json_int_t) epoch, "failover", failover,
          "attempts", (json_int_t) atomic_load (&cn->attempts));
    /* proto/tasks.md: every unacknowledged task frame again, in order */
    cn_agent_tasks_welcome (cn);
}

static void
s_on_ws_message (cn_wsc_t *ws, int opcode, const uint8_t *data, size_t len, void *arg)
{
    acn_t *cn = arg;
    if (opcode != WSLAY_BINARY_FRAME) {
        s_protocol_close (cn, 1002, "text frame");
        return;
    }
    cn_msg_t m;
    char err[128];
    if (cn_msg_parse (&m, data, len, err, sizeof err) != 0) {
        s_protocol_close (cn, 1002, "malformed msgpack");
        return;
    }
    cn_sess_state_t st = s_state (cn);
    if (cn_msg_is (&m, "welcome")) {
        if (st != CN_SESS_HELLO)
            s_protocol_close (cn, 1008, "unexpected welcome");
        else
            s_on_welcome (cn, &m);
    }
    else if (cn_msg_is (&m, "task_ack")) {
        size_t il = 0;
        uint64_t seq = 0;
        const char *id = cn_msg_str (&m, "id", &il);
        if (!id || !cn_msg_uint (&m, "seq", &seq)
            || cn_agent_tasks_ack (cn, id, il, seq) != 0)
            s_protocol_close (cn, 1002, "task_ack without a task id or seq");
    }
    else if (cn_msg_is (&m, "hb")) {
        /* proof of life only (on_rx already counted it) */
    }
    else if (cn_msg_is (&m, "goaway")) {
        size_t rl = 0;
        const char *reason = cn_msg_str (&m, "reason", &rl);
        s_count (&cn->goaways);
        SLOG (cn, "goaway from the instance", "s:s%", "reason", reason ? reason : "", rl);
        if (st != CN_SESS_UP)
            s_count (&cn->failures);
        s_drop_ws (cn, 1000, "goaway");
        s_after_loss (cn, CN_LOSS_GOAWAY);
    }
    else
        s_protocol_close (cn, 1002, "unknown message type");
    cn_msg_fini (&m);
}

static void
s_on_ws_end (cn_wsc_t *ws, cn_wsc_end_t why, int code, const char *detail, void *arg)
{
    acn_t *cn = arg;
    cn->ws = NULL;
    cn_sess_state_t st = s_state (cn);
    cn_loss_t loss;
    bool goaway = why == CN_WSC_END_CLOSED && (code == 1001 || code == 4001);
    if (goaway)
        loss = CN_LOSS_GOAWAY;
    else if (st != CN_SESS_UP)
        loss = CN_LOSS_FAILED;
    else if (why == CN_WSC_END_PROTOCOL
             || (why == CN_WSC_END_CLOSED && (code == 1002 || code == 1003 || code == 1007
                                              || code == 1008 || code == 1009)))
        loss = CN_LOSS_FAILED;
    else
        loss = CN_LOSS_TRANSIENT;
    if (st != CN_SESS_UP)
        s_count (&cn->failures);
    char addr[24];
    s_addr_str (cn->last_addr, cn->a->cfg.cnapi_port, addr, sizeof addr);
    SLOG (cn, st == CN_SESS_UP ? "session lost" : "session attempt failed",
          "s:s,s:s,s:i,s:s?,s:s", "address", addr, "end", cn_wsc_end_name (why), "code", code,
          "detail", detail, "state", cn_sess_state_name (st));
    s_after_loss (cn, loss);
}

static const cn_wsc_cb_t s_ws_cb = {
    .on_open = s_on_ws_open,
    .on_message = s_on_ws_message,
    .on_end = s_on_ws_end,
    .on_rx = s_on_ws_rx,
};

static void
s_connect (acn_t *cn, uint32_t addr)
{
    cn_agents_t *a = cn->a;
    aloop_t *l = cn->loop;
    cn->last_addr = addr;
    atomic_store (&cn->addr, addr);
    s_count (&cn->attempts);
    s_set_state (cn, CN_SESS_CONNECTING);
    struct sockaddr_in sin;
    memset (&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons ((uint16_t) a->cfg.cnapi_port);
    sin.sin_addr.s_addr = addr;
    char headers[256];
    snprintf (headers, sizeof headers, "x-server-uuid: %s\r\nUser-Agent: %s\r\n", cn->uuid,
              a->cfg.agent);
    cn->ws = cn_wsc_connect (l->evloop, &sin, "/agent/session", headers, S_MAX_MSG, &s_ws_cb, cn);
    if (!cn->ws) {
        char as[24];
        s_addr_str (addr, a->cfg.cnapi_port, as, sizeof as);
        SLOG (cn, "session attempt failed", "s:s,s:s,s:s", "address", as, "end", "connect",
              "detail", strerror (errno));
        s_count (&cn->failures);
        s_after_loss (cn, CN_LOSS_FAILED);
        return;
    }
    s_link (l, (uint64_t) a->cfg.open_timeout_ms, &cn->open_tmo);
}

static void
s_on_answer (acn_t *cn, const cn_resolver_answer_t *ans)
{
    if (s_state (cn) != CN_SESS_RESOLVING)
        return;
    if (ans->status != 0 || ans->n == 0) {
        SLOG (cn, "cnapi name did not resolve", "s:s,s:s", "name", cn->a->dns_name,
              "error", ans->status ? ans->error : "no A records");
        s_count (&cn->failures);
        s_after_loss (cn, CN_LOSS_FAILED);
        return;
    }
    int i = cn_retry_pick (ans->addrs, ans->n, cn->last_addr, (uint32_t) s_rand (cn->loop));
    s_connect (cn, ans->addrs[i]);
}

static void
s_resolver_cb (const cn_resolver_answer_t *ans, void *arg)
{
    aloop_t *l = arg;
    amsg_t *m = s_msg (AM_RESOLVED);
    m->answer = *ans;
    cn_agent_post (l, m);
}

static void
s_resolve (acn_t *cn)
{
    aloop_t *l = cn->loop;
    cn_agents_t *a = cn->a;
    s_set_state (cn, CN_SESS_RESOLVING);
    int64_t now = cn_mono_us () / 1000;
    if (l->have_answer && now - l->answer.fetched_ms <= a->cfg.resolve_cache_ms) {
        cn_resolver_answer_t ans = l->answer;
        s_on_answer (cn, &ans);
        return;
    }
    if (!cn->rwaiting) {
        cn->rwaiting = true;
        cn->rnext = l->rhead;
        l->rhead = cn;
    }
    if (!l->resolving) {
        l->resolving = true;
        cn_resolver_lookup (a->resolver, a->dns_name, a->cfg.resolve_cache_ms, s_resolver_cb, l);
    }
}

static void
s_on_resolved (aloop_t *l, const cn_resolver_answer_t *ans)
{
    l->resolving = false;
    l->answer = *ans;
    l->have_answer = true;
    acn_t *cn = l->rhead;
    l->rhead = NULL;
    while (cn) {
        acn_t *next = cn->rnext;
        cn->rnext = NULL;
        cn->rwaiting = false;
        if (!l->stopping)
            s_on_answer (cn, ans);
        cn = next;
    }
}

static void
s_attempt (acn_t *cn)
{
    if (cn->loop->stopping)
        return;
    if (cn->want_same && cn->last_addr)
        s_connect (cn, cn->last_addr);
    else
        s_resolve (cn);
}

static void
s_on_wait_timer (atimer_t *t)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, wait_timer, t);
    s_attempt (cn);
}

static void
s_after_loss (acn_t *cn, cn_loss_t loss)
{
    aloop_t *l = cn->loop;
    s_unlink (&cn->open_tmo);
    s_unlink (&cn->hb_tmo);
    s_unlink (&cn->dead_tmo);
    if (cn->ws)
        s_drop_ws (cn, 1000, "leaving");
    cn_sess_state_t st = s_state (cn);
    int64_t up_ms = 0;
    if (st == CN_SESS_UP) {
        up_ms = s_now (l) - cn->up_since;
        s_count (&cn->losses);
    }
    if (l->stopping) {
        s_set_state (cn, CN_SESS_STOPPED);
        return;
    }
    cn_next_t n = cn_retry_next (&cn->retry, loss, up_ms, &cn->a->cfg.retry,
                                 (uint32_t) s_rand (l), (uint32_t) s_rand (l));
    cn->want_same = n.same && cn->last_addr;
    s_set_state (cn, CN_SESS_WAIT);
    s_timer_start (l, &cn->wait_timer, n.delay_ms);
}

/* ------------------------------------------------------------------ */
/* VM events and sysinfo                                                */

static void
s_on_vm_event (const cn_vm_t *vm, cn_vm_event_t ev, int64_t time_ms, void *arg)
{
    acn_t *cn = arg;
    cn_agents_t *a = cn->a;
    s_count (&cn->vm_events);
    atomic_store_explicit (&cn->nvms, cn_vmdummy_count (cn->vms), memory_order_relaxed);
    if (a->pub) {
        char rk[128];
        size_t len;
        cn_vm_event_rk (cn->uuid, vm->uuid, rk, sizeof rk);
        char *body = cn_vm_event_body (cn->uuid, vm, ev, time_ms, &len);
        cn_publisher_send (a->pub, rk, body, len, time_ms);
        free (body);
    }
    cn_sess_state_t st = s_state (cn);
    if (cn->ws && (st == CN_SESS_HELLO || st == CN_SESS_UP)) {
        cn_msgw_t w;
        bool gone = ev == CN_VM_EV_DESTROY;
        cn_msgw_init (&w, "vm_event", gone ? 4 : 5);
        cn_msgw_str (&w, "vm_uuid", vm->uuid);
        cn_msgw_str (&w, "event", cn_vm_event_name (ev));
        cn_msgw_uint (&w, "seq", vm->seq);
        cn_msgw_int (&w, "time_ms", time_ms);
        if (!gone) {
            cn_msgw_key (&w, "vm");
            cn_vm_pack (&w.pk, vm);
        }
        s_send_msg (cn, &w);
    }
    cn_agent_tasks_vm_event (cn, vm, ev, time_ms);
}

static void s_vm_sched (acn_t *cn);

void
cn_agent_vm_sched (acn_t *cn)
{
    s_vm_sched (cn);
}

static void
s_vm_sched (acn_t *cn)
{
    int64_t now = cn_now_ms ();
    int64_t next = cn_vmdummy_advance (cn->vms, now);
    if (next < 0)
        s_timer_stop (cn->loop, &cn->vm_timer);
    else
        s_timer_start (cn->loop, &cn->vm_timer, next - now);
}

static void
s_on_vm_timer (atimer_t *t)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, vm_timer, t);
    s_vm_sched (cn);
}

/* force: publish even when nothing changed (a server_sysinfo task). */
static bool
s_publish_sysinfo_x (acn_t *cn, bool startup, bool force)
{
    cn_agents_t *a = cn->a;
    if (!a->pub || !cn->sysinfo)
        return false;
    size_t len = 0;
    bool setup = false;
    char *text = cn->sysinfo (cn->sysinfo_arg, cn->index, &len, &setup);
    if (!text)
        return false;
    uint32_t crc = cn_crc32 (text, len);
    bool changed = !cn->sysinfo_have || crc != cn->sysinfo_crc;
    cn->sysinfo_crc = crc;
    cn->sysinfo_have = true;
    char rk[128];
    if (startup)
        snprintf (rk, sizeof rk, "ur.startup.%s", cn->uuid);
    else if (changed || !setup || force)
        snprintf (rk, sizeof rk, "ur.sysinfo.%s.%llu", cn->uuid,
                  (unsigned long long) ++cn->sysinfo_n);
    else {
        free (text);
        return true;
    }
    cn_publisher_send (a->pub, rk, text, len, cn_now_ms ());
    s_count (&cn->sysinfo_sent);
    free (text);
    return true;
}

static void
s_publish_sysinfo (acn_t *cn, bool startup)
{
    s_publish_sysinfo_x (cn, startup, false);
}

int
cn_agent_sysinfo_now (acn_t *cn, char *err, size_t errlen)
{
    if (!cn->a->pub) {
        snprintf (err, errlen, "this agent publishes nothing (no AMQP URL)");
        return -1;
    }
    if (!s_publish_sysinfo_x (cn, false, true)) {
        snprintf (err, errlen, "no sysinfo to publish");
        return -1;
    }
    return 0;
}

static void
s_on_sysinfo_tmo (h2o_timeout_entry_t *e)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, sysinfo_tmo, e);
    if (cn->loop->stopping)
        return;
    s_publish_sysinfo (cn, false);
    s_link (cn->loop, (uint64_t) cn->a->cfg.sysinfo_interval_s * 1000, &cn->sysinfo_tmo);
}

/* The CN boots: startup sysinfo, first session attempt. */
static void
s_on_boot (atimer_t *t)
{
    acn_t *cn = H2O_STRUCT_FROM_MEMBER (acn_t, wait_timer, t);
    cn->wait_timer.cb = s_on_wait_timer;
    s_publish_sysinfo (cn, true);
    if (cn->a->pub && cn->sysinfo)
        s_link (cn->loop, (uint64_t) cn->a->cfg.sysinfo_interval_s * 1000, &cn->sysinfo_tmo);
    s_vm_sched (cn);
    cn->want_same = false;
    s_attempt (cn);
}

/* ------------------------------------------------------------------ */
/* VM operations (from the HTTP listener), on the CN's loop             */

static json_t *
s_err (const char *code, const char *msg)
{
    return json_pack ("{s:s,s:s}", "code", code, "message", msg);
}

int
cn_agent_vmop (acn_t *cn, vmop_kind_t op, const char *vm, const json_t *params, json_t **body)
{
    char err[256] = "";
    int64_t now = cn_now_ms ();
    int status = 200;
    int rc = 0;
    switch (op) {
    case VMOP_HEALTH: {
        cn_agent_info_t info;
        cn_agents_info (cn->a, cn->index, &info);
        *body = cn_agent_info_json (&info);
        return 200;
    }
    case VMOP_LIST: {
        json_t *arr = json_array ();
        for (size_t i = 0; i < cn_vmdummy_count (cn->vms); i++)
            json_array_append_new (arr, cn_vm_to_json (cn_vmdummy_at (cn->vms, i)));
        *body = json_pack ("{s:s,s:o}", "server_uuid", cn->uuid, "vms", arr);
        return 200;
    }
    case VMOP_GET: {
        const cn_vm_t *v = cn_vmdummy_find (cn->vms, vm);
        if (!v) {
            *body = s_err ("ResourceNotFound", "no such VM");
            return 404;
        }
        *body = cn_vm_to_json (v);
        return 200;
    }
    case VMOP_CREATE: {
        char uuid[37];
        const json_t *u = params ? json_object_get (params, "uuid") : NULL;
        if (json_is_string (u) && cn_vmdummy_find (cn->vms, json_string_value (u))) {
            *body = s_err ("Conflict", "VM exists");
            return 409;
        }
        rc = cn_vmdummy_create (cn->vms, params, now, uuid, err, sizeof err);
        if (rc == 0) {
            *body = cn_vm_to_json (cn_vmdummy_find (cn->vms, uuid));
            status = 200;
        }
        else {
            *body = s_err ("InvalidArgument", err);
            status = 400;
        }
        break;
    }
    case VMOP_START:
    case VMOP_STOP:
    case VMOP_REBOOT:
    case VMOP_DESTROY:
    case VMOP_UPDATE:
        if (!cn_vmdummy_find (cn->vms, vm)) {
            *body = s_err ("ResourceNotFound", "no such VM");
            return 404;
        }
        if (op == VMOP_START)
            rc = cn_vmdummy_start (cn->vms, vm, now, err, sizeof err);
        else if (op == VMOP_STOP)
            rc = cn_vmdummy_stop (cn->vms, vm, now, err, sizeof err);
        else if (op == VMOP_REBOOT)
            rc = cn_vmdummy_reboot (cn->vms, vm, now, err, sizeof err);
        else if (op == VMOP_DESTROY)
            rc = cn_vmdummy_destroy_vm (cn->vms, vm, now, err, sizeof err);
        else
            rc = cn_vmdummy_update (cn->vms, vm, params, now, err, sizeof err);
        if (rc != 0) {
            *body = s_err (op == VMOP_UPDATE ? "InvalidArgument" : "Conflict", err);
            status = op == VMOP_UPDATE ? 400 : 409;
        }
        else {
            const cn_vm_t *v = cn_vmdummy_find (cn->vms, vm);
            *body = v ? cn_vm_to_json (v) : json_pack ("{s:s,s:b}", "uuid", vm, "destroyed", 1);
            status = op == VMOP_UPDATE ? 200 : 202;
        }
        break;
    }
    atomic_store (&cn->nvms, cn_vmdummy_count (cn->vms));
    s_vm_sched (cn);
    return status;
}

acn_t *
cn_agent_lookup (cn_agents_t *a, const char *uuid, size_t len)
{
    if (len != 36)
        return NULL;
    char u[37];
    memcpy (u, uuid, 36);
    u[36] = '\0';
    long i = cn_agents_find (a, u);
    return i >= 0 ? a->cns[i] : NULL;
}

/* ------------------------------------------------------------------ */
/* The loop thread                                                      */

static void s_gen_tick (h2o_timeout_entry_t *e);

static void
s_start_gen (aloop_t *l)
{
    if (l->stopping || h2o_timeout_is_linked (&l->gen_tmo) || !l->ncns)
        return;
    if (atomic_load (&l->a->rate_milli) == 0)
        return;
    l->gen_last = h2o_now (l->evloop);
    l->gen_budget = 0;
    s_link (l, S_GEN_TICK_MS, &l->gen_tmo);
}

static void
s_gen_tick (h2o_timeout_entry_t *e)
{
    aloop_t *l = H2O_STRUCT_FROM_MEMBER (aloop_t, gen_tmo, e);
    cn_agents_t *a = l->a;
    uint64_t milli = atomic_load (&a->rate_milli);
    if (milli == 0 || l->stopping || !l->ncns)
        return;
    double rate = (double) milli / 1000.0 * (double) l->ncns / (double) a->ncns;
    uint64_t now = h2o_now (l->evloop);
    double elapsed = (double) (now - l->gen_last) / 1000.0;
    l->gen_last = now;
    l->gen_budget += rate * elapsed;
    if (l->gen_budget > rate + 1)
        l->gen_budget = rate + 1;   /* behind: do not pile up more than 1 s */
    int64_t wall = cn_now_ms ();
    while (l->gen_budget >= 1.0) {
        l->gen_budget -= 1.0;
        uint64_t r = s_rand (l);
        acn_t *cn = l->cns[r % l->ncns];
        cn_vmdummy_random_change (cn->vms, s_rand (l), wall);
    }
    s_link (l, S_GEN_TICK_MS, &l->gen_tmo);
}

static void
s_stop_loop (aloop_t *l, int grace_ms)
{
    if (l->stopping)
        return;
    l->stopping = true;
    l->stop_deadline = s_now (l) + grace_ms;
    s_unlink (&l->gen_tmo);
    for (size_t i = 0; i < l->ncns; i++) {
        acn_t *cn = l->cns[i];
        s_timer_stop (l, &cn->wait_timer);
        s_timer_stop (l, &cn->vm_timer);
        s_unlink (&cn->open_tmo);
        s_unlink (&cn->hb_tmo);
        s_unlink (&cn->dead_tmo);
        s_unlink (&cn->sysinfo_tmo);
        s_drop_ws (cn, 1000, "agent stopping");
        s_set_state (cn, CN_SESS_STOPPED);
        cn_agent_tasks_stop (cn);
    }
    if (l->http)
        cn_agent_http_shutdown (l->http);
}

static void
s_on_msgs (h2o_multithread_receiver_t *rx, h2o_linklist_t *messages)
{
    aloop_t *l = H2O_STRUCT_FROM_MEMBER (aloop_t, rx, rx);
    while (!h2o_linklist_is_empty (messages)) {
        h2o_multithread_message_t *mm =
            H2O_STRUCT_FROM_MEMBER (h2o_multithread_message_t, link, messages->next);
        h2o_linklist_unlink (&mm->link);
        amsg_t *m = (amsg_t *) mm;
        switch (m->kind) {
        case AM_STOP:
            s_stop_loop (l, m->grace_ms);
            break;
        case AM_RESOLVED:
            s_on_resolved (l, &m->answer);
            break;
        case AM_RATE:
            s_start_gen (l);
            break;
        case AM_VMOP: {
            /* run here (the CN's loop), answer on the home loop */
            json_t *body = NULL;
            m->status = cn_agent_vmop (m->cn, m->op, m->vm, m->params, &body);
            json_decref (m->params);
            m->params = NULL;
            m->body = body;
            m->kind = AM_VMOP_REPLY;
            cn_agent_post (m->home, m);
            continue;           /* m is the reply now */
        }
        case AM_TASK:
            /* proto/tasks.md: on the CN's loop; the answer goes home now or later */
            if (cn_agent_tasks_msg (m->cn, m)) {
                m->kind = AM_VMOP_REPLY;
                cn_agent_post (m->home, m);
                continue;
            }
            break;
        case AM_VMOP_REPLY:
            if (l->http)
                cn_agent_http_reply (l->http, m);
            json_decref (m->body);
            break;
        }
        json_decref (m->params);
        free (m);
    }
}

/* h2o keeps freed socket buffers and request-pool chunks in per-thread
 * recycle lists; give them back before the thread ends (as the gateway
 * does; the pool trick relies on a chunk's first word being its link, as
 * in h2o 2.2.5's lib/common/memory.c). */
static void
s_release_thread_buffers (void)
{
    h2o_mem_recycle_t *r = &h2o_socket_buffer_prototype.allocator;
    for (int i = 0; i < 100000 && r->cnt > 0; i++)
        free (h2o_mem_alloc_recycle (r, 1));
    h2o_mem_pool_t pool;
    h2o_mem_init_pool (&pool);
    for (int i = 0; i < 17 * 4; i++)
        h2o_mem_alloc_pool (&pool, 1008);
    void *chunk = pool.chunks;
    while (chunk) {
        void *next = *(void **) chunk;
        free (chunk);
        chunk = next;
    }
}

static void *
s_loop_thread (void *arg)
{
    aloop_t *l = arg;
    cn_agents_t *a = l->a;
    l->evloop = h2o_evloop_create ();
    l->queue = h2o_multithread_create_queue (l->evloop);
    h2o_multithread_register_receiver (l->queue, &l->rx, s_on_msgs);
    if (getrandom (l->rng, sizeof l->rng, 0) != (ssize_t) sizeof l->rng || !(l->rng[0] | l->rng[1])) {
        l->rng[0] = (uint64_t) cn_mono_us () ^ 0x9e3779b97f4a7c15ULL;
        l->rng[1] = (uint64_t) (uintptr_t) l | 1;
    }
    l->gen_tmo.cb = s_gen_tick;
    if (l->index == 0 && a->listen_fd >= 0) {
        l->http = cn_agent_http_start (l, a->listen_fd, l->start_err, sizeof l->start_err);
        if (!l->http) {
            l->start_rc = -1;
            sem_post (&l->ready);
            goto teardown;
        }
        a->listen_fd = -1;      /* the listener owns it now */
    }
    for (size_t i = 0; i < l->ncns; i++) {
        acn_t *cn = l->cns[i];
        cn->open_tmo.cb = s_on_open_tmo;
        cn->hb_tmo.cb = s_on_hb_tmo;
        cn->dead_tmo.cb = s_on_dead_tmo;
        cn->sysinfo_tmo.cb = s_on_sysinfo_tmo;
        cn->vm_timer.cb = s_on_vm_timer;
        cn->wait_timer.cb = s_on_boot;
        int64_t delay = a->cfg.ramp_ms > 0 ? (int64_t) (s_rand (l) % (uint64_t) a->cfg.ramp_ms) : 0;
        s_timer_start (l, &cn->wait_timer, delay);
    }
    s_start_gen (l);
    l->start_rc = 0;
    sem_post (&l->ready);

    bool timers_ran = false;
    for (;;) {
        int64_t now = s_now (l);
        if (l->stopping) {
            bool http_idle = !l->http || cn_agent_http_idle (l->http);
            if ((cn_wsc_live () == 0 && http_idle) || now >= l->stop_deadline)
                break;
        }
        int32_t wait = 1000;
        if (l->hn) {
            int64_t d = l->heap[0]->due - now;
            wait = d < 0 ? 0 : d > 1000 ? 1000 : (int32_t) d;
        }
        /* Heap timers run outside h2o_evloop_run: what their callbacks did
         * to sockets (a write's completion, so the next queued frame of a
         * session goes out) is only finished by h2o's pending callbacks in
         * the next run, which would first sleep for up to the wait. Do not
         * sleep then (it held a task_end behind its vm_state for ~1 s). */
        if (timers_ran)
            wait = 0;
        if (l->stopping && wait > 50)
            wait = 50;
        h2o_evloop_run (l->evloop, wait);
        timers_ran = s_timers_run (l) > 0;
    }

teardown:
    cn_wsc_abort_all ();
    for (size_t i = 0; i < l->ncns; i++) {
        acn_t *cn = l->cns[i];
        cn->ws = NULL;
        s_unlink (&cn->open_tmo);
        s_unlink (&cn->hb_tmo);
        s_unlink (&cn->dead_tmo);
        s_unlink (&cn->sysinfo_tmo);
        s_timer_stop (l, &cn->wait_timer);
        s_timer_stop (l, &cn->vm_timer);
    }
    s_unlink (&l->gen_tmo);
    bool clean = true;
    if (l->http) {
        clean = cn_agent_http_idle (l->http);
        cn_agent_http_destroy (&l->http, clean);
    }
    /* let closed sockets be disposed */
    h2o_evloop_run (l->evloop, 0);
    for (size_t i = 0; i < l->ntmos; i++) {
        h2o_timeout_t *t = &l->tmos[i].t;
        while (!h2o_linklist_is_empty (&t->_entries)) {
            h2o_timeout_entry_t *e =
                H2O_STRUCT_FROM_MEMBER (h2o_timeout_entry_t, _link, t->_entries.next);
            h2o_timeout_unlink (e);
        }
        h2o_timeout_dispose (l->evloop, t);
    }
    l->ntmos = 0;
    /* No message can come in after this; deliver (and drop) what is queued. */
    pthread_mutex_lock (&l->post_mu);
    l->closed = true;
    pthread_mutex_unlock (&l->post_mu);
    l->stopping = true;
    for (int i = 0; i < 100 && !h2o_linklist_is_empty (&l->rx._messages); i++)
        h2o_evloop_run (l->evloop, 1);
    if (clean && h2o_linklist_is_empty (&l->rx._messages)) {
        h2o_multithread_unregister_receiver (l->queue, &l->rx);
        h2o_multithread_destroy_queue (l->queue);
        h2o_evloop_destroy (l->evloop);
        free (l->queue);        /* h2o 2.2.5's evloop build does not free it */
    }
    l->evloop = NULL;
    l->queue = NULL;
    s_release_thread_buffers ();
    free (l->heap);
    l->heap = NULL;
    l->hn = l->hcap = 0;
    return NULL;
}

/* ------------------------------------------------------------------ */
/* The set                                                              */

static char *
s_dup (const char *s)
{
    if (!s)
        return NULL;
    char *d = strdup (s);
    if (!d)
        abort ();
    return d;
}

static bool
s_parse_listen (const char *s, struct sockaddr_in *sin)
{
    char host[64];
    const char *colon = strrchr (s, ':');
    if (!colon || colon == s || (size_t) (colon - s) >= sizeof host)
        return false;
    memcpy (host, s, (size_t) (colon - s));
    host[colon - s] = '\0';
    char *end;
    long port = strtol (colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535)
        return false;
    memset (sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    sin->sin_port = htons ((uint16_t) port);
    return inet_pton (AF_INET, host, &sin->sin_addr) == 1;
}

cn_agents_t *
cn_agents_new (const cn_agents_cfg_t *cfg, char *err, size_t errlen)
{
    if (cfg->heartbeat_ms < 50 || cfg->heartbeat_ms > 60000) {
        snprintf (err, errlen, "heartbeat_ms must be between 50 and 60000");
        return NULL;
    }
    if (cfg->threads < 1 || cfg->threads > 64) {
        snprintf (err, errlen, "threads must be between 1 and 64");
        return NULL;
    }
    if (cfg->cnapi_port < 1 || cfg->cnapi_port > 65535) {
        snprintf (err, errlen, "bad cnapi port %d", cfg->cnapi_port);
        return NULL;
    }
    if (cfg->open_timeout_ms < 100 || cfg->sysinfo_interval_s < 1
        || cfg->retry.cap_ms < cfg->retry.base_ms || cfg->retry.base_ms < 1) {
        snprintf (err, errlen, "bad timing configuration");
        return NULL;
    }
    char csv[96];
    if (cfg->resolver && *cfg->resolver && !cn_resolver_server_csv (cfg->resolver, csv, sizeof csv)) {
        snprintf (err, errlen, "bad resolver address \"%s\" (expected a.b.c.d[:port])", cfg->resolver);
        return NULL;
    }
    struct sockaddr_in sin;
    if (cfg->listen && *cfg->listen && !s_parse_listen (cfg->listen, &sin)) {
        snprintf (err, errlen, "bad listen address \"%s\" (expected a.b.c.d:port)", cfg->listen);
        return NULL;
    }
    if (cfg->amqp_url && *cfg->amqp_url) {
        cn_amqp_url_t u;
        if (cn_amqp_url_parse (cfg->amqp_url, &u, err, errlen) != 0)
            return NULL;
        cn_amqp_url_fini (&u);
    }
    cn_agents_t *a = calloc (1, sizeof *a);
    if (!a)
        abort ();
    a->cfg = *cfg;
    a->cfg.datacenter_name = a->s_dc = s_dup (cfg->datacenter_name ? cfg->datacenter_name : "dc1");
    a->cfg.dns_domain = a->s_domain = s_dup (cfg->dns_domain ? cfg->dns_domain : "example.com");
    a->cfg.resolver = a->s_resolver = s_dup (cfg->resolver);
    a->cfg.agent = a->s_agent = s_dup (cfg->agent ? cfg->agent : "provisioner/" CNAPI_VERSION);
    a->cfg.amqp_url = a->s_amqp_url = s_dup (cfg->amqp_url && *cfg->amqp_url ? cfg->amqp_url : NULL);
    a->cfg.amqp_name = a->s_amqp_name = s_dup (cfg->amqp_name);
    a->cfg.listen = a->s_listen = s_dup (cfg->listen && *cfg->listen ? cfg->listen : NULL);
    size_t nl = strlen (a->s_dc) + strlen (a->s_domain) + 8;
    a->dns_name = malloc (nl);
    if (!a->dns_name)
        abort ();
    snprintf (a->dns_name, nl, "cnapi.%s.%s", a->s_dc, a->s_domain);
    a->listen_fd = -1;
    pthread_mutex_init (&a->inst_mu, NULL);
    return a;
}

static void
s_hash_put (cn_agents_t *a, const char *uuid, long idx)
{
    size_t h = cn_crc32 (uuid, 36) & (a->hcap - 1);
    while (a->hash[h] >= 0)
        h = (h + 1) & (a->hcap - 1);
    a->hash[h] = idx;
}

long
cn_agents_find (const cn_agents_t *a, const char *uuid)
{
    char u[37];
    if (!a->hcap || !cn_uuid_normalize (uuid, u))
        return -1;
    size_t h = cn_crc32 (u, 36) & (a->hcap - 1);
    while (a->hash[h] >= 0) {
        if (strcmp (a->cns[a->hash[h]]->uuid, u) == 0)
            return a->hash[h];
        h = (h + 1) & (a->hcap - 1);
    }
    return -1;
}

long
cn_agents_add (cn_agents_t *a, const cn_agent_spec_t *spec, char *err, size_t errlen)
{
    if (a->started) {
        snprintf (err, errlen, "already started");
        return -1;
    }
    char u[37];
    if (!spec->server_uuid || !cn_uuid_normalize (spec->server_uuid, u)) {
        snprintf (err, errlen, "server_uuid is not a UUID");
        return -1;
    }
    if (cn_agents_find (a, u) >= 0) {
        snprintf (err, errlen, "server %s added twice", u);
        return -1;
    }
    acn_t *cn = calloc (1, sizeof *cn);
    if (!cn)
        abort ();
    cn->a = a;
    memcpy (cn->uuid, u, 37);
    cn_uuid_new (cn->boot_id);
    cn->admin_ip = s_dup (spec->admin_ip);
    cn->agent_port = spec->agent_port;
    cn->sysinfo = spec->sysinfo;
    cn->sysinfo_arg = spec->sysinfo_arg;
    cn->prev_instance = -1;
    atomic_init (&cn->instance, -1);
    cn->vms = cn_vmdummy_new (spec->vm_dir, &a->cfg.delays, s_on_vm_event, cn, err, errlen);
    if (!cn->vms) {
        free (cn->admin_ip);
        free (cn);
        return -1;
    }
    if (spec->sim_vms)
        cn_vmdummy_populate (cn->vms, spec->sim_prefix ? spec->sim_prefix : "cafe0000",
                             spec->sim_index, spec->sim_vms, cn_now_ms ());
    atomic_init (&cn->nvms, cn_vmdummy_count (cn->vms));
    if (a->ncns == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 16;
        a->cns = realloc (a->cns, a->cap * sizeof *a->cns);
        if (!a->cns)
            abort ();
    }
    cn->index = a->ncns;
    a->cns[a->ncns++] = cn;
    if (a->ncns * 2 > a->hcap) {
        free (a->hash);
        a->hcap = a->hcap ? a->hcap * 2 : 64;
        while (a->hcap < a->ncns * 2)
            a->hcap *= 2;
        a->hash = malloc (a->hcap * sizeof *a->hash);
        if (!a->hash)
            abort ();
        for (size_t i = 0; i < a->hcap; i++)
            a->hash[i] = -1;
        for (size_t i = 0; i < a->ncns; i++)
            s_hash_put (a, a->cns[i]->uuid, (long) i);
    }
    else
        s_hash_put (a, cn->uuid, (long) cn->index);
    return (long) cn->index;
}

int
cn_agents_start (cn_agents_t *a, char *err, size_t errlen)
{
    if (a->started) {
        snprintf (err, errlen, "already started");
        return -1;
    }
    if (a->cfg.listen) {
        struct sockaddr_in sin;
        s_parse_listen (a->cfg.listen, &sin);
        int fd = socket (AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        int one = 1;
        if (fd < 0 || setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0
            || bind (fd, (struct sockaddr *) &sin, sizeof sin) != 0 || listen (fd, 1024) != 0) {
            snprintf (err, errlen, "listen on %s: %s", a->cfg.listen, strerror (errno));
            if (fd >= 0)
                close (fd);
            return -1;
        }
        a->listen_fd = fd;
    }
    a->resolver = cn_resolver_new (a->cfg.resolver, 2000, err, errlen);
    if (!a->resolver)
        goto fail;
    if (a->cfg.amqp_url) {
        cn_publisher_cfg_t pc = {
            .url = a->cfg.amqp_url,
            .name = a->cfg.amqp_name ? a->cfg.amqp_name : a->cfg.agent,
            .window = a->cfg.amqp_window,
            .max_buffer = a->cfg.amqp_buffer,
        };
        a->pub = cn_publisher_new (&pc, err, errlen);
        if (!a->pub)
            goto fail;
    }
    a->nloops = a->cfg.threads;
    if ((size_t) a->nloops > a->ncns && a->ncns > 0)
        a->nloops = (int) a->ncns;
    a->loops = calloc ((size_t) a->nloops, sizeof *a->loops);
    if (!a->loops)
        abort ();
    for (int i = 0; i < a->nloops; i++) {
        aloop_t *l = &a->loops[i];
        l->a = a;
        l->index = i;
        size_t share = a->ncns / (size_t) a->nloops + 1;
        l->cns = calloc (share, sizeof *l->cns);
        if (!l->cns)
            abort ();
        sem_init (&l->ready, 0, 0);
        pthread_mutex_init (&l->post_mu, NULL);
    }
    for (size_t i = 0; i < a->ncns; i++) {
        aloop_t *l = &a->loops[i % (size_t) a->nloops];
        a->cns[i]->loop = l;
        l->cns[l->ncns++] = a->cns[i];
    }
    a->started = true;
    for (int i = 0; i < a->nloops; i++) {
        aloop_t *l = &a->loops[i];
        if (pthread_create (&l->thread, NULL, s_loop_thread, l) != 0) {
            snprintf (err, errlen, "cannot start loop thread %d", i);
            goto fail_loops;
        }
        l->thread_started = true;
        sem_wait (&l->ready);
        if (l->start_rc != 0) {
            snprintf (err, errlen, "%s", l->start_err);
            goto fail_loops;
        }
    }
    CN_INFO (COMPONENT, "agents started", "{s:I,s:i,s:s,s:s?,s:s?,s:i}",
             "cns", (json_int_t) a->ncns, "threads", a->nloops, "dns_name", a->dns_name,
             "resolver", a->cfg.resolver, "listen", a->cfg.listen,
             "heartbeat_ms", a->cfg.heartbeat_ms);
    return 0;

fail_loops:
    cn_agents_stop (a, 0);
    return -1;
fail:
    cn_resolver_destroy (&a->resolver);
    cn_publisher_destroy (&a->pub);
    if (a->listen_fd >= 0) {
        close (a->listen_fd);
        a->listen_fd = -1;
    }
    return -1;
}

void
cn_agents_stop (cn_agents_t *a, int grace_ms)
{
    if (!a || !a->started || a->stopped)
        return;
    a->stopped = true;
    int64_t t0 = cn_mono_us ();
    for (int i = 0; i < a->nloops; i++) {
        aloop_t *l = &a->loops[i];
        if (!l->thread_started)
            continue;
        amsg_t *m = s_msg (AM_STOP);
        m->grace_ms = grace_ms;
        cn_agent_post (l, m);
    }
    for (int i = 0; i < a->nloops; i++)
        if (a->loops[i].thread_started) {
            pthread_join (a->loops[i].thread, NULL);
            a->loops[i].thread_started = false;
        }
    if (a->pub) {
        int left = grace_ms - (int) ((cn_mono_us () - t0) / 1000);
        if (left < 1000)
            left = 1000;
        if (grace_ms <= 0)
            left = 0;
        if (left && !cn_publisher_flush (a->pub, left)) {
            cn_publisher_stats_t ps;
            cn_publisher_stats (a->pub, &ps);
            CN_WARN (COMPONENT, "AMQP messages left unconfirmed at stop", "{s:I,s:I}",
                     "buffered", (json_int_t) ps.buffered, "inflight", (json_int_t) ps.inflight);
        }
    }
    if (a->pub) {
        a->had_pub = true;
        cn_publisher_stats (a->pub, &a->last_pub);
    }
    cn_publisher_destroy (&a->pub);
    cn_resolver_destroy (&a->resolver);
    if (a->listen_fd >= 0) {
        close (a->listen_fd);
        a->listen_fd = -1;
    }
}

void
cn_agents_destroy (cn_agents_t **p)
{
    if (!p || !*p)
        return;
    cn_agents_t *a = *p;
    cn_agents_stop (a, 0);
    for (size_t i = 0; i < a->ncns; i++) {
        acn_t *cn = a->cns[i];
        cn_agent_tasks_free (cn);
        cn_vmdummy_destroy (&cn->vms);
        free (cn->admin_ip);
        free (cn);
    }
    free (a->cns);
    free (a->hash);
    for (int i = 0; i < a->nloops; i++) {
        free (a->loops[i].cns);
        sem_destroy (&a->loops[i].ready);
        pthread_mutex_destroy (&a->loops[i].post_mu);
    }
    free (a->loops);
    free (a->s_dc);
    free (a->s_domain);
    free (a->s_resolver);
    free (a->s_agent);
    free (a->s_amqp_url);
    free (a->s_amqp_name);
    free (a->s_listen);
    free (a->dns_name);
    pthread_mutex_destroy (&a->inst_mu);
    free (a);
    *p = NULL;
}

void
cn_agents_set_event_rate (cn_agents_t *a, double per_s)
{
    if (!(per_s > 0))
        per_s = 0;
    atomic_store (&a->rate_milli, (uint64_t) llround (per_s * 1000.0));
    if (!a->started || a->stopped)
        return;
    for (int i = 0; i < a->nloops; i++)
        if (a->loops[i].thread_started)
            cn_agent_post (&a->loops[i], s_msg (AM_RATE));
}

/* ------------------------------------------------------------------ */
/* Counters                                                             */

size_t
cn_agents_count (const cn_agents_t *a)
{
    return a->ncns;
}

bool
cn_agents_info (cn_agents_t *a, size_t idx, cn_agent_info_t *o)
{
    if (idx >= a->ncns)
        return false;
    acn_t *cn = a->cns[idx];
    memset (o, 0, sizeof *o);
    memcpy (o->server_uuid, cn->uuid, 37);
    o->state = s_state (cn);
#define L(f) o->f = atomic_load_explicit (&cn->f, memory_order_relaxed)
    L (attempts);
    L (connects);
    L (reconnects);
    L (failovers);
    L (failures);
    L (losses);
    L (goaways);
    L (vm_events);
    L (sysinfo_sent);
    L (epoch);
#undef L
    int id = atomic_load (&cn->instance);
    if (id >= 0 && id < atomic_load (&a->ninst))
        snprintf (o->instance, sizeof o->instance, "%s", a->inst[id]);
    uint32_t addr = atomic_load (&cn->addr);
    if (addr)
        s_addr_str (addr, a->cfg.cnapi_port, o->address, sizeof o->address);
    o->vms = atomic_load_explicit (&cn->nvms, memory_order_relaxed);
    return true;
}

json_t *
cn_agent_info_json (const cn_agent_info_t *i)
{
    return json_pack ("{s:s,s:s,s:s,s:I,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}",
                      "server_uuid", i->server_uuid, "state", cn_sess_state_name (i->state),
                      "instance", i->instance, "epoch", (json_int_t) i->epoch,
                      "address", i->address, "vms", (json_int_t) i->vms,
                      "attempts", (json_int_t) i->attempts,
                      "connects", (json_int_t) i->connects,
                      "reconnects", (json_int_t) i->reconnects,
                      "failovers", (json_int_t) i->failovers,
                      "failures", (json_int_t) i->failures,
                      "losses", (json_int_t) i->losses,
                      "goaways", (json_int_t) i->goaways,
                      "vm_events", (json_int_t) i->vm_events,
                      "sysinfo_sent", (json_int_t) i->sysinfo_sent);
}

void
cn_agents_stats (cn_agents_t *a, cn_agents_stats_t *o)
{
    memset (o, 0, sizeof *o);
    o->cns = a->ncns;
    size_t per[CN_AGENTS_MAX_INSTANCES] = { 0 };
    for (size_t i = 0; i < a->ncns; i++) {
        acn_t *cn = a->cns[i];
        cn_sess_state_t st = s_state (cn);
        if (st <= CN_SESS_STOPPED)
            o->states[st]++;
        if (st == CN_SESS_UP) {
            o->connected++;
            int id = atomic_load (&cn->instance);
            if (id >= 0 && id < CN_AGENTS_MAX_INSTANCES)
                per[id]++;
        }
#define L(f) o->f += atomic_load_explicit (&cn->f, memory_order_relaxed)
        L (attempts);
        L (connects);
        L (reconnects);
        L (failovers);
        L (failures);
        L (losses);
        L (goaways);
        L (vm_events);
        L (sysinfo_sent);
#undef L
    }
    int n = atomic_load (&a->ninst);
    for (int i = 0; i < n; i++) {
        snprintf (o->inst[o->ninstances].name, sizeof o->inst[0].name, "%s", a->inst[i]);
        o->inst[o->ninstances].sessions = per[i];
        o->ninstances++;
    }
    o->dns_queries = a->resolver ? cn_resolver_queries (a->resolver) : 0;
    if (a->pub) {
        o->amqp = true;
        cn_publisher_stats (a->pub, &o->pub);
    }
    else if (a->had_pub) {
        o->amqp = true;
        o->pub = a->last_pub;
    }
}

json_t *
cn_agents_stats_json (const cn_agents_stats_t *s)
{
    json_t *inst = json_object ();
    for (size_t i = 0; i < s->ninstances; i++)
        json_object_set_new (inst, s->inst[i].name, json_integer ((json_int_t) s->inst[i].sessions));
    json_t *states = json_object ();
    for (int i = 0; i <= CN_SESS_STOPPED; i++)
        if (s->states[i])
            json_object_set_new (states, cn_sess_state_name ((cn_sess_state_t) i),
                                 json_integer ((json_int_t) s->states[i]));
    json_t *o = json_pack ("{s:I,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:o,s:o}",
                           "time_ms", (json_int_t) cn_now_ms (), "type", "stats",
                           "cns", (json_int_t) s->cns, "connected", (json_int_t) s->connected,
                           "attempts", (json_int_t) s->attempts,
                           "connects", (json_int_t) s->connects,
                           "reconnects", (json_int_t) s->reconnects,
                           "failovers", (json_int_t) s->failovers,
                           "failures", (json_int_t) s->failures,
                           "losses", (json_int_t) s->losses,
                           "instances", inst, "states", states);
    json_object_set_new (o, "goaways", json_integer ((json_int_t) s->goaways));
    json_object_set_new (o, "vm_events", json_integer ((json_int_t) s->vm_events));
    json_object_set_new (o, "sysinfo_sent", json_integer ((json_int_t) s->sysinfo_sent));
    json_object_set_new (o, "dns_queries", json_integer ((json_int_t) s->dns_queries));
    if (s->amqp)
        json_object_set_new (o, "amqp", json_pack ("{s:b,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}",
                                                   "connected", s->pub.connected,
                                                   "sent", (json_int_t) s->pub.sent,
                                                   "published", (json_int_t) s->pub.published,
                                                   "confirmed", (json_int_t) s->pub.confirmed,
                                                   "nacked", (json_int_t) s->pub.nacked,
                                                   "dropped", (json_int_t) s->pub.dropped,
                                                   "republished", (json_int_t) s->pub.republished,
                                                   "buffered", (json_int_t) s->pub.buffered,
                                                   "inflight", (json_int_t) s->pub.inflight));
    return o;
}
