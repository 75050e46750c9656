/*
 * cn_agent_ur: see include/cn_agent_ur.h.
 *
 * Theory of operation
 *
 * One thread owns the AMQP connection and every child. Its loop:
 *
 *   1. not connected: connect (bounded by timeout_ms), declare a
 *      server-named exclusive auto-delete queue, bind it to
 *      ur.execute.<uuid>.* for each CN, consume without acks (an exclusive
 *      queue dies with the connection anyway, and a request is only worth
 *      running while its caller waits); on failure back off (cn_backoff_ms);
 *   2. poll: the stop eventfd, the broker socket, each child's stdout and
 *      stderr pipes and its pidfd; the timeout is the nearest child deadline
 *      (at most 1 s, so librabbitmq's heartbeats are serviced);
 *   3. read deliveries without waiting; a valid request becomes a job,
 *      queued; jobs start while fewer than max_running run;
 *   4. drain pipes (capped), reap exited children (waitpid on a readable
 *      pidfd), kill groups past their deadline, and publish each finished
 *      job's reply (a lost connection loses the reply: the caller's own
 *      queue went with the broker too, and it answers 503 or 504).
 *
 * A job is finished when its child was reaped and both pipes reached EOF,
 * or, when a grandchild keeps a pipe open after the child exited, at the
 * deadline (the group is killed and the pipes closed).
 */
#include "cn_agent_ur.h"

#include "cn_amqp.h"
#include "cn_log.h"
#include "cn_urproto.h"
#include "cn_util.h"

#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define COMPONENT "agent-ur"
#define S_HEARTBEAT_S 10
#define S_MAX_REQUEST (4 * 1024 * 1024)
#define S_DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

extern char **environ;

typedef struct job {
    struct job *next;
    char uuid[37];
    char req_id[CN_UR_REQID_MAX];
    char **argv;              /* NULL-terminated, owned strings */
    char **envp;
    int64_t timeout_ms;
    /* running */
    pid_t pid;
    int pidfd, out_fd, err_fd;
    int64_t deadline_us;
    bool reaped, timed_out, truncated;
    int wstatus;
    char *out, *err;
    size_t out_len, err_len, out_cap, err_cap;
} job_t;

struct cn_agent_ur {
    cn_amqp_url_t url;
    char *name;
    char *shell;
    int max_running, max_queued;
    size_t max_output;
    int timeout_ms;
    char (*uuids)[37];
    size_t nuuids;
    zhashx_t *uuid_set;

    int efd;
    atomic_bool stop;
    pthread_t thread;
    bool thread_started;

    /* thread only */
    amqp_connection_state_t conn;
    int attempt;
    int64_t retry_at_us;
    int64_t connected_us;
    job_t *queue_head, *queue_tail;
    size_t nqueued;
    job_t **running;          /* max_running slots */
    size_t nrunning;

    pthread_mutex_t mu;
    cn_agent_ur_stats_t st;
};

/* ---- jobs ---- */

static void
s_strv_free (char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free (*p);
    free (v);
}

static void
s_job_free (job_t *j)
{
    if (!j)
        return;
    s_strv_free (j->argv);
    s_strv_free (j->envp);
    if (j->out_fd >= 0)
        close (j->out_fd);
    if (j->err_fd >= 0)
        close (j->err_fd);
    if (j->pidfd >= 0)
        close (j->pidfd);
    free (j->out);
    free (j->err);
    free (j);
}

static char *
s_xstrdup (const char *s)
{
    char *d = strdup (s);
    if (!d)
        abort ();
    return d;
}

static void
s_stat_add (cn_agent_ur_t *u, uint64_t *field, uint64_t n)
{
    pthread_mutex_lock (&u->mu);
    *field += n;
    pthread_mutex_unlock (&u->mu);
}

static void
s_error (cn_agent_ur_t *u, const char *msg)
{
    pthread_mutex_lock (&u->mu);
    snprintf (u->st.last_error, sizeof u->st.last_error, "%s", msg);
    pthread_mutex_unlock (&u->mu);
}

char *
cn_agent_ur_reply_body (int wstatus, const char *out, size_t out_len, const char *err,
                        size_t err_len, bool truncated, bool timed_out, size_t *len)
{
    int code = 1, sig = 0;
    if (WIFEXITED (wstatus))
        code = WEXITSTATUS (wstatus);
    else if (WIFSIGNALED (wstatus)) {
        sig = WTERMSIG (wstatus);
        code = 128 + sig;
    }
    json_t *o = json_pack ("{s:i,s:o,s:o}", "exit_status", code,
                           "stdout", cn_ur_json_text (out, out_len),
                           "stderr", cn_ur_json_text (err, err_len));
    if (!o)
        abort ();
    if (sig)
        json_object_set_new (o, "signal", json_integer (sig));
    if (truncated)
        json_object_set_new (o, "truncated", json_true ());
    if (timed_out)
        json_object_set_new (o, "timed_out", json_true ());
    char *text = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    if (!text)
        abort ();
    *len = strlen (text);
    return text;
}

static void
s_publish_reply (cn_agent_ur_t *u, const char *uuid, const char *req_id, const char *body,
                 size_t len)
{
    if (!u->conn) {
        s_stat_add (u, &u->st.reply_failures, 1);
        CN_WARN (COMPONENT, "reply lost: broker not connected", "{s:s,s:s}",
                 "server_uuid", uuid, "ur_req_id", req_id);
        return;
    }
    char key[256];
    snprintf (key, sizeof key, CN_UR_REPLY_PREFIX "%s.%s", uuid, req_id);
    amqp_basic_properties_t props;
    memset (&props, 0, sizeof props);
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.content_type = amqp_cstring_bytes ("application/json");
    props.delivery_mode = 1;
    amqp_bytes_t b = { len, (void *) body };
    int rc = amqp_basic_publish (u->conn, CN_AMQP_CHANNEL, amqp_cstring_bytes (CN_AMQP_EXCHANGE),
                                 amqp_cstring_bytes (key), 0, 0, &props, b);
    if (rc != AMQP_STATUS_OK) {
        s_stat_add (u, &u->st.reply_failures, 1);
        CN_WARN (COMPONENT, "reply publish failed", "{s:s,s:s}", "server_uuid", uuid,
                 "error", amqp_error_string2 (rc));
        return;
    }
    s_stat_add (u, &u->st.replies, 1);
}

/* A reply for a request that never ran. */
static void
s_reply_error (cn_agent_ur_t *u, const char *uuid, const char *req_id, int code,
               const char *msg)
{
    size_t len;
    char *body = cn_agent_ur_reply_body (code << 8, "", 0, msg, strlen (msg), false, false,
                                         &len);
    s_publish_reply (u, uuid, req_id, body, len);
    free (body);
}

/* Build a job from a request body; NULL with why set. */
static job_t *
s_job_new (cn_agent_ur_t *u, const char *body, size_t len, char *why, size_t wlen)
{
    json_error_t jerr;
    json_t *o = json_loadb (body, len, 0, &jerr);
    if (!o || !json_is_object (o)) {
        snprintf (why, wlen, "the request is not a JSON object");
        json_decref (o);
        return NULL;
    }
    const char *type = json_string_value (json_object_get (o, "type"));
    json_t *script = json_object_get (o, "script");
    json_t *args = json_object_get (o, "args");
    json_t *env = json_object_get (o, "env");
    json_t *tmo = json_object_get (o, "timeout");
    if (type && strcmp (type, "script") != 0) {
        snprintf (why, wlen, "unsupported request type %s (only script)", type);
        json_decref (o);
        return NULL;
    }
    if (!json_is_string (script) || (args && !json_is_array (args) && !json_is_null (args))
        || (env && !json_is_object (env) && !json_is_null (env))) {
        snprintf (why, wlen, "the request needs script (string), args (array), env (object)");
        json_decref (o);
        return NULL;
    }
    size_t nargs = json_is_array (args) ? json_array_size (args) : 0;
    size_t nenv = json_is_object (env) ? json_object_size (env) : 0;
    job_t *j = calloc (1, sizeof *j);
    if (!j)
        abort ();
    j->pid = -1;
    j->pidfd = j->out_fd = j->err_fd = -1;
    j->argv = calloc (nargs + 5, sizeof (char *));
    j->envp = calloc (nenv + 2, sizeof (char *));
    if (!j->argv || !j->envp)
        abort ();
    size_t a = 0;
    j->argv[a++] = s_xstrdup (u->shell);
    j->argv[a++] = s_xstrdup ("-c");
    j->argv[a++] = s_xstrdup (json_string_value (script));
    j->argv[a++] = s_xstrdup ("ur");
    for (size_t i = 0; i < nargs; i++) {
        const char *s = json_string_value (json_array_get (args, i));
        if (!s) {
            snprintf (why, wlen, "args must be strings");
            s_job_free (j);
            json_decref (o);
            return NULL;
        }
        j->argv[a++] = s_xstrdup (s);
    }
    size_t e = 0;
    bool have_path = false;
    const char *k;
    json_t *v;
    if (nenv)
        json_object_foreach (env, k, v) {
            if (!json_is_string (v) || !*k || strchr (k, '=')) {
                snprintf (why, wlen, "env must map names to strings");
                s_job_free (j);
                json_decref (o);
                return NULL;
            }
            char *kv;
            if (asprintf (&kv, "%s=%s", k, json_string_value (v)) < 0)
                abort ();
            j->envp[e++] = kv;
            have_path |= strcmp (k, "PATH") == 0;
        }
    if (!have_path)
        j->envp[e++] = s_xstrdup (S_DEFAULT_PATH);
    double t = CN_UR_DEFAULT_TIMEOUT_S;
    if (json_is_number (tmo) && json_number_value (tmo) > 0
        && json_number_value (tmo) <= CN_UR_MAX_TIMEOUT_S)
        t = json_number_value (tmo);
    j->timeout_ms = (int64_t) (t * 1000);
    json_decref (o);
    return j;
}

static void
s_enqueue (cn_agent_ur_t *u, const amqp_envelope_t *env)
{
    char uuid[37], req_id[CN_UR_REQID_MAX];
    s_stat_add (u, &u->st.received, 1);
    if (!cn_ur_rk_parse (env->routing_key.bytes, env->routing_key.len, CN_UR_EXECUTE_PREFIX,
                         uuid, req_id) || !zhashx_lookup (u->uuid_set, uuid)) {
        s_stat_add (u, &u->st.rejected, 1);
        CN_WARN (COMPONENT, "execute request with a bad routing key dropped", "{s:s%}",
                 "routing_key", (const char *) env->routing_key.bytes, env->routing_key.len);
        return;
    }
    char why[200];
    job_t *j = env->message.body.len > S_MAX_REQUEST ? NULL
               : s_job_new (u, env->message.body.bytes, env->message.body.len, why, sizeof why);
    if (!j) {
        if (env->message.body.len > S_MAX_REQUEST)
            snprintf (why, sizeof why, "the request is larger than %d bytes", S_MAX_REQUEST);
        s_stat_add (u, &u->st.rejected, 1);
        CN_WARN (COMPONENT, "bad execute request", "{s:s,s:s}", "server_uuid", uuid,
                 "error", why);
        s_reply_error (u, uuid, req_id, 2, why);
        return;
    }
    if (u->nqueued >= (size_t) u->max_queued) {
        s_stat_add (u, &u->st.busy, 1);
        s_reply_error (u, uuid, req_id, 1, "the agent is busy: too many scripts waiting");
        s_job_free (j);
        return;
    }
    memcpy (j->uuid, uuid, sizeof j->uuid);
    memcpy (j->req_id, req_id, sizeof j->req_id);
    if (u->queue_tail)
        u->queue_tail->next = j;
    else
        u->queue_head = j;
    u->queue_tail = j;
    u->nqueued++;
}

static int
s_pidfd_open (pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int) syscall (SYS_pidfd_open, pid, 0);
#else
    (void) pid;
    errno = ENOSYS;
    return -1;
#endif
}

static bool
s_spawn (cn_agent_ur_t *u, job_t *j)
{
    int outp[2], errp[2];
    if (pipe2 (outp, O_CLOEXEC) != 0)
        return false;
    if (pipe2 (errp, O_CLOEXEC) != 0) {
        close (outp[0]);
        close (outp[1]);
        return false;
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init (&fa);
    posix_spawn_file_actions_addopen (&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2 (&fa, outp[1], 1);
    posix_spawn_file_actions_adddup2 (&fa, errp[1], 2);
    /* the agent's sockets (thousands in mockcloud) stay out of the script */
    posix_spawn_file_actions_addclosefrom_np (&fa, 3);
    posix_spawnattr_init (&at);
    sigset_t none, all;
    sigemptyset (&none);
    sigfillset (&all);
    posix_spawnattr_setflags (&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK
                                   | POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setpgroup (&at, 0);
    posix_spawnattr_setsigmask (&at, &none);     /* the agent blocks SIGTERM & co. */
    posix_spawnattr_setsigdefault (&at, &all);   /* and ignores SIGPIPE */
    pid_t pid;
    int rc = posix_spawn (&pid, u->shell, &fa, &at, j->argv, j->envp);
    posix_spawn_file_actions_destroy (&fa);
    posix_spawnattr_destroy (&at);
    close (outp[1]);
    close (errp[1]);
    if (rc != 0) {
        close (outp[0]);
        close (errp[0]);
        errno = rc;
        return false;
    }
    j->pid = pid;
    j->out_fd = outp[0];
    j->err_fd = errp[0];
    fcntl (j->out_fd, F_SETFL, O_NONBLOCK);
    fcntl (j->err_fd, F_SETFL, O_NONBLOCK);
    j->pidfd = s_pidfd_open (pid);
    j->deadline_us = cn_mono_us () + j->timeout_ms * 1000;
    return true;
}

static void
s_start_jobs (cn_agent_ur_t *u)
{
    while (u->queue_head && u->nrunning < (size_t) u->max_running) {
        job_t *j = u->queue_head;
        u->queue_head = j->next;
        if (!u->queue_head)
            u->queue_tail = NULL;
        u->nqueued--;
        j->next = NULL;
        if (!s_spawn (u, j)) {
            char why[200];
            snprintf (why, sizeof why, "cannot start %s: %s", u->shell, strerror (errno));
            s_stat_add (u, &u->st.failed_start, 1);
            CN_WARN (COMPONENT, "script start failed", "{s:s,s:s}", "server_uuid", j->uuid,
                     "error", why);
            s_reply_error (u, j->uuid, j->req_id, 127, why);
            s_job_free (j);
            continue;
        }
        s_stat_add (u, &u->st.started, 1);
        u->running[u->nrunning++] = j;
    }
}

/* Read what a pipe has; EOF or an error closes it. */
static void
s_drain (cn_agent_ur_t *u, job_t *j, bool is_out)
{
    int *fd = is_out ? &j->out_fd : &j->err_fd;
    char **buf = is_out ? &j->out : &j->err;
    size_t *len = is_out ? &j->out_len : &j->err_len;
    size_t *cap = is_out ? &j->out_cap : &j->err_cap;
    char tmp[65536];
    for (int i = 0; i < 64 && *fd >= 0; i++) {
        ssize_t n = read (*fd, tmp, sizeof tmp);
        if (n > 0) {
            size_t want = *len + (size_t) n;
            if (want > u->max_output)
                want = u->max_output;
            if (want > *cap) {
                size_t nc = *cap ? *cap * 2 : 65536;
                while (nc < want)
                    nc *= 2;
                if (nc > u->max_output)
                    nc = u->max_output;
                char *nb = realloc (*buf, nc);
                if (!nb)
                    abort ();
                *buf = nb;
                *cap = nc;
            }
            cn_ur_cap_append (*buf, len, *cap, tmp, (size_t) n, &j->truncated);
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        close (*fd);
        *fd = -1;
    }
}

static void
s_reap (job_t *j)
{
    if (j->reaped || j->pid <= 0)
        return;
    int st;
    pid_t r = waitpid (j->pid, &st, WNOHANG);
    if (r == j->pid) {
        j->reaped = true;
        j->wstatus = st;
    }
}

static void
s_finish (cn_agent_ur_t *u, size_t slot)
{
    job_t *j = u->running[slot];
    u->running[slot] = u->running[--u->nrunning];
    size_t len;
    char *body = cn_agent_ur_reply_body (j->wstatus, j->out, j->out_len, j->err, j->err_len,
                                         j->truncated, j->timed_out, &len);
    s_publish_reply (u, j->uuid, j->req_id, body, len);
    free (body);
    pthread_mutex_lock (&u->mu);
    u->st.completed++;
    u->st.timed_out += j->timed_out;
    u->st.truncated += j->truncated;
    pthread_mutex_unlock (&u->mu);
    CN_DEBUG (COMPONENT, "script finished", "{s:s,s:s,s:i,s:b,s:b}", "server_uuid", j->uuid,
              "ur_req_id", j->req_id, "wstatus", j->wstatus, "timed_out", j->timed_out,
              "truncated", j->truncated);
    s_job_free (j);
}

/* The whole group: it may outlive its leader (a background grandchild). */
static void
s_kill_group (job_t *j)
{
    if (j->pid > 0)
        kill (-j->pid, SIGKILL);
}

/* Pipes, exits, deadlines of every running job. */
static void
s_service_jobs (cn_agent_ur_t *u)
{
    int64_t now = cn_mono_us ();
    for (size_t i = 0; i < u->nrunning;) {
        job_t *j = u->running[i];
        s_drain (u, j, true);
        s_drain (u, j, false);
        s_reap (j);
        if (now >= j->deadline_us) {
            if (!j->reaped || j->out_fd >= 0 || j->err_fd >= 0) {
                if (!j->reaped)
                    j->timed_out = true;
                s_kill_group (j);
                if (!j->reaped) {
                    /* SIGKILL: the exit is immediate, wait for it */
                    int st;
                    if (waitpid (j->pid, &st, 0) == j->pid) {
                        j->reaped = true;
                        j->wstatus = st;
                    }
                }
                s_drain (u, j, true);
                s_drain (u, j, false);
                if (j->out_fd >= 0) {
                    close (j->out_fd);
                    j->out_fd = -1;
                }
                if (j->err_fd >= 0) {
                    close (j->err_fd);
                    j->err_fd = -1;
                }
            }
        }
        if (j->reaped && j->out_fd < 0 && j->err_fd < 0) {
            s_finish (u, i);
            continue;
        }
        i++;
    }
}

/* ---- the broker ---- */

static void
s_drop (cn_agent_ur_t *u, const char *why)
{
    s_error (u, why);
    CN_WARN (COMPONENT, "broker connection lost", "{s:s}", "reason", why);
    cn_amqp_destroy (&u->conn);
    pthread_mutex_lock (&u->mu);
    u->st.connected = u->st.ready = false;
    pthread_mutex_unlock (&u->mu);
    if ((cn_mono_us () - u->connected_us) / 1000 >= 10000)
        u->attempt = 0;
    u->retry_at_us = cn_mono_us () + 1000LL * cn_backoff_ms (u->attempt, 100, 5000);
    if (u->attempt < 30)
        u->attempt++;
}

static void
s_connect (cn_agent_ur_t *u)
{
    char err[256] = "";
    amqp_connection_state_t c = cn_amqp_connect (&u->url, u->timeout_ms, S_HEARTBEAT_S,
                                                 u->name, err, sizeof err);
    amqp_bytes_t qname = amqp_empty_bytes;
    if (c) {
        amqp_queue_declare_ok_t *ok = amqp_queue_declare (c, CN_AMQP_CHANNEL, amqp_empty_bytes,
                                                          0, 0, 1, 1, amqp_empty_table);
        amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
        if (!ok || r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "queue.declare", err, sizeof err);
            cn_amqp_destroy (&c);
        }
        else
            qname = amqp_bytes_malloc_dup (ok->queue);
    }
    for (size_t i = 0; c && i < u->nuuids && !atomic_load (&u->stop); i++) {
        char key[128];
        snprintf (key, sizeof key, CN_UR_EXECUTE_PREFIX "%s.*", u->uuids[i]);
        amqp_queue_bind (c, CN_AMQP_CHANNEL, qname, amqp_cstring_bytes (CN_AMQP_EXCHANGE),
                         amqp_cstring_bytes (key), amqp_empty_table);
        amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "queue.bind", err, sizeof err);
            cn_amqp_destroy (&c);
        }
        if (c)
            amqp_maybe_release_buffers (c);
    }
    if (c && atomic_load (&u->stop))
        cn_amqp_destroy (&c);
    if (c) {
        amqp_basic_consume (c, CN_AMQP_CHANNEL, qname, amqp_empty_bytes, 0, 1, 1,
                            amqp_empty_table);
        amqp_rpc_reply_t r = amqp_get_rpc_reply (c);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            cn_amqp_reply_str (r, "basic.consume", err, sizeof err);
            cn_amqp_destroy (&c);
        }
    }
    amqp_bytes_free (qname);
    if (!c) {
        if (atomic_load (&u->stop))
            return;
        s_error (u, err);
        int ms = cn_backoff_ms (u->attempt, 100, 5000);
        if (u->attempt < 30)
            u->attempt++;
        u->retry_at_us = cn_mono_us () + 1000LL * ms;
        CN_WARN (COMPONENT, "broker connection failed", "{s:s,s:i}", "error", err,
                 "retry_ms", ms);
        return;
    }
    u->conn = c;
    u->connected_us = cn_mono_us ();
    pthread_mutex_lock (&u->mu);
    u->st.connected = u->st.ready = true;
    u->st.connects++;
    pthread_mutex_unlock (&u->mu);
    CN_INFO (COMPONENT, "consuming execute requests", "{s:s,s:i,s:I}", "host", u->url.host,
             "port", u->url.port, "servers", (json_int_t) u->nuuids);
}

static void
s_amqp_service (cn_agent_ur_t *u)
{
    struct timeval zero = { 0, 0 };
    for (int i = 0; i < 256 && u->conn; i++) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers (u->conn);
        amqp_rpc_reply_t r = amqp_consume_message (u->conn, &env, &zero, 0);
        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            s_enqueue (u, &env);
            amqp_destroy_envelope (&env);
            continue;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
            && r.library_error == AMQP_STATUS_TIMEOUT)
            return;
        char why[300];
        if (r.reply_type != AMQP_RESPONSE_LIBRARY_EXCEPTION
            || r.library_error != AMQP_STATUS_UNEXPECTED_STATE) {
            s_drop (u, cn_amqp_reply_str (r, "consume", why, sizeof why));
            return;
        }
        amqp_frame_t fr;
        int rc = amqp_simple_wait_frame_noblock (u->conn, &fr, &zero);
        if (rc == AMQP_STATUS_TIMEOUT)
            return;
        if (rc != AMQP_STATUS_OK) {
            s_drop (u, amqp_error_string2 (rc));
            return;
        }
        if (fr.frame_type != AMQP_FRAME_METHOD)
            continue;
        switch (fr.payload.method.id) {
        case AMQP_CONNECTION_CLOSE_METHOD: {
            const amqp_connection_close_t *m = fr.payload.method.decoded;
            snprintf (why, sizeof why, "connection closed by broker: %u %.*s", m->reply_code,
                      (int) m->reply_text.len, (const char *) m->reply_text.bytes);
            amqp_connection_close_ok_t ok = { 0 };
            amqp_send_method (u->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
            s_drop (u, why);
            return;
        }
        case AMQP_CHANNEL_CLOSE_METHOD:
            s_drop (u, "channel closed by broker");
            return;
        case AMQP_BASIC_CANCEL_METHOD:
            s_drop (u, "consumer cancelled by broker");
            return;
        default:
            break;
        }
    }
}

/* ---- the thread ---- */

static void *
s_thread (void *arg)
{
    cn_agent_ur_t *u = arg;
    size_t maxfds = 2 + 3 * (size_t) u->max_running;
    struct pollfd *pfd = calloc (maxfds, sizeof *pfd);
    if (!pfd)
        abort ();
    while (!atomic_load (&u->stop)) {
        int64_t now = cn_mono_us ();
        if (!u->conn && now >= u->retry_at_us) {
            s_connect (u);
            continue;
        }
        size_t n = 0;
        pfd[n++] = (struct pollfd) { .fd = u->efd, .events = POLLIN };
        if (u->conn)
            pfd[n++] = (struct pollfd) { .fd = amqp_get_sockfd (u->conn), .events = POLLIN };
        int64_t until = now + 1000000;
        if (!u->conn && u->retry_at_us < until)
            until = u->retry_at_us;
        bool poll_children = false;
        for (size_t i = 0; i < u->nrunning; i++) {
            job_t *j = u->running[i];
            if (j->out_fd >= 0)
                pfd[n++] = (struct pollfd) { .fd = j->out_fd, .events = POLLIN };
            if (j->err_fd >= 0)
                pfd[n++] = (struct pollfd) { .fd = j->err_fd, .events = POLLIN };
            if (j->pidfd >= 0 && !j->reaped)
                pfd[n++] = (struct pollfd) { .fd = j->pidfd, .events = POLLIN };
            else if (!j->reaped)
                poll_children = true;      /* no pidfd: look again soon */
            if (j->deadline_us < until)
                until = j->deadline_us;
        }
        if (poll_children && now + 50000 < until)
            until = now + 50000;
        int timeout = (u->conn && (amqp_data_in_buffer (u->conn) || amqp_frames_enqueued (u->conn)))
                      ? 0 : (int) ((until - now + 999) / 1000);
        if (timeout < 0)
            timeout = 0;
        int rc = poll (pfd, n, timeout);
        if (rc < 0 && errno != EINTR)
            break;
        if (pfd[0].revents & POLLIN) {
            uint64_t v;
            if (read (u->efd, &v, sizeof v) < 0) { /* nothing: just woken */ }
        }
        if (atomic_load (&u->stop))
            break;
        if (u->conn)
            s_amqp_service (u);
        s_start_jobs (u);
        s_service_jobs (u);
        pthread_mutex_lock (&u->mu);
        u->st.running = u->nrunning;
        u->st.queued = u->nqueued;
        pthread_mutex_unlock (&u->mu);
    }
    /* leave: no script outlives the agent */
    for (size_t i = 0; i < u->nrunning; i++) {
        job_t *j = u->running[i];
        if (j->pid > 0) {
            kill (-j->pid, SIGKILL);
            if (!j->reaped)
                waitpid (j->pid, NULL, 0);
        }
        s_job_free (j);
    }
    u->nrunning = 0;
    while (u->queue_head) {
        job_t *j = u->queue_head;
        u->queue_head = j->next;
        s_job_free (j);
    }
    u->queue_tail = NULL;
    if (u->conn)
        cn_amqp_close (&u->conn);
    free (pfd);
    return NULL;
}

/* ---- the class ---- */

cn_agent_ur_t *
cn_agent_ur_new (const cn_agent_ur_cfg_t *cfg, const char *const *uuids, size_t n,
                 char *err, size_t errlen)
{
    if (!cfg || !cfg->url) {
        snprintf (err, errlen, "ur: no AMQP URL");
        return NULL;
    }
    cn_agent_ur_t *u = calloc (1, sizeof *u);
    if (!u)
        abort ();
    u->efd = -1;
    pthread_mutex_init (&u->mu, NULL);
    char perr[256];
    if (cn_amqp_url_parse (cfg->url, &u->url, perr, sizeof perr) != 0) {
        snprintf (err, errlen, "ur: %s", perr);
        cn_agent_ur_destroy (&u);
        return NULL;
    }
    u->name = s_xstrdup (cfg->name ? cfg->name : "agent ur");
    u->shell = s_xstrdup (cfg->shell ? cfg->shell : "/bin/sh");
    u->max_running = cfg->max_running > 0 ? cfg->max_running : 32;
    u->max_queued = cfg->max_queued > 0 ? cfg->max_queued : 1000;
    u->max_output = cfg->max_output > 0 ? cfg->max_output : CN_UR_MAX_OUTPUT;
    u->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 3000;
    u->uuids = calloc (n ? n : 1, sizeof *u->uuids);
    u->running = calloc ((size_t) u->max_running, sizeof *u->running);
    u->uuid_set = zhashx_new ();
    if (!u->uuids || !u->running || !u->uuid_set)
        abort ();
    for (size_t i = 0; i < n; i++) {
        if (!cn_uuid_normalize (uuids[i], u->uuids[i])) {
            snprintf (err, errlen, "ur: bad server uuid %s", uuids[i]);
            cn_agent_ur_destroy (&u);
            return NULL;
        }
        zhashx_insert (u->uuid_set, u->uuids[i], u->uuids[i]);
    }
    u->nuuids = n;
    u->efd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0) {
        snprintf (err, errlen, "ur: eventfd: %s", strerror (errno));
        cn_agent_ur_destroy (&u);
        return NULL;
    }
    u->retry_at_us = cn_mono_us ();
    if (pthread_create (&u->thread, NULL, s_thread, u) != 0) {
        snprintf (err, errlen, "ur: cannot start the thread");
        cn_agent_ur_destroy (&u);
        return NULL;
    }
    u->thread_started = true;
    return u;
}

void
cn_agent_ur_destroy (cn_agent_ur_t **p)
{
    if (!p || !*p)
        return;
    cn_agent_ur_t *u = *p;
    if (u->thread_started) {
        atomic_store (&u->stop, true);
        uint64_t one = 1;
        if (write (u->efd, &one, sizeof one) < 0) { /* the thread polls it anyway */ }
        pthread_join (u->thread, NULL);
    }
    if (u->efd >= 0)
        close (u->efd);
    zhashx_destroy (&u->uuid_set);
    free (u->uuids);
    free (u->running);
    free (u->name);
    free (u->shell);
    cn_amqp_url_fini (&u->url);
    pthread_mutex_destroy (&u->mu);
    free (u);
    *p = NULL;
}

void
cn_agent_ur_stats (cn_agent_ur_t *u, cn_agent_ur_stats_t *out)
{
    pthread_mutex_lock (&u->mu);
    *out = u->st;
    pthread_mutex_unlock (&u->mu);
}

json_t *
cn_agent_ur_stats_json (const cn_agent_ur_stats_t *s)
{
    json_t *o = json_pack ("{s:b,s:b,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}",
                           "connected", s->connected, "ready", s->ready,
                           "connects", (json_int_t) s->connects,
                           "received", (json_int_t) s->received,
                           "started", (json_int_t) s->started,
                           "completed", (json_int_t) s->completed,
                           "failed_start", (json_int_t) s->failed_start,
                           "timed_out", (json_int_t) s->timed_out,
                           "truncated", (json_int_t) s->truncated,
                           "rejected", (json_int_t) s->rejected,
                           "busy", (json_int_t) s->busy,
                           "replies", (json_int_t) s->replies,
                           "reply_failures", (json_int_t) s->reply_failures,
                           "running", (json_int_t) s->running,
                           "queued", (json_int_t) s->queued);
    if (!o)
        abort ();
    if (s->last_error[0])
        json_object_set_new (o, "last_error", json_string (s->last_error));
    return o;
}
