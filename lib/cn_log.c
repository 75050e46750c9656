/*
 * cn_log: bunyan JSON lines. See include/cn_log.h.
 *
 * Each line is built in memory and written with one write(2), so lines from
 * different threads never interleave. CZMQ's zsys log goes through a stdio
 * cookie stream that turns each of its lines ("I: 26-11-25 10:49:56 text")
 * into a bunyan line with component "czmq".
 */
#include "cn_log.h"

#include "cn_util.h"

#include <czmq.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_int s_level = CN_LOG_INFO;
static atomic_int s_fd = 2;
static char s_name[64] = "cnapi";
static char s_hostname[256] = "localhost";
static json_t *s_globals;          /* set before threads start */
static pthread_mutex_t s_globals_lock = PTHREAD_MUTEX_INITIALIZER;

static const struct { int level; const char *name; } s_levels[] = {
    { CN_LOG_TRACE, "trace" }, { CN_LOG_DEBUG, "debug" }, { CN_LOG_INFO, "info" },
    { CN_LOG_WARN, "warn" },   { CN_LOG_ERROR, "error" }, { CN_LOG_FATAL, "fatal" },
};

int
cn_log_parse_level (const char *s)
{
    if (!s || !*s)
        return -1;
    for (size_t i = 0; i < sizeof s_levels / sizeof s_levels[0]; i++)
        if (strcasecmp (s, s_levels[i].name) == 0)
            return s_levels[i].level;
    char *end;
    long v = strtol (s, &end, 10);
    if (*end == '\0' && v >= 1 && v <= 60)
        return (int) v;
    return -1;
}

const char *
cn_log_level_name (int level)
{
    const char *name = "trace";
    for (size_t i = 0; i < sizeof s_levels / sizeof s_levels[0]; i++)
        if (level >= s_levels[i].level)
            name = s_levels[i].name;
    return name;
}

void cn_log_set_level (int level) { atomic_store (&s_level, level); }
int cn_log_level (void) { return atomic_load (&s_level); }
void cn_log_set_fd (int fd) { atomic_store (&s_fd, fd); }

void
cn_log_set_global (const char *key, const char *value)
{
    pthread_mutex_lock (&s_globals_lock);
    if (!s_globals)
        s_globals = json_object ();
    json_object_set_new (s_globals, key, json_string (value));
    pthread_mutex_unlock (&s_globals_lock);
}

static void
s_emit (int level, const char *component, const char *msg, json_t *fields)
{
    json_t *line = json_object ();
    json_object_set_new (line, "name", json_string (s_name));
    json_object_set_new (line, "hostname", json_string (s_hostname));
    json_object_set_new (line, "pid", json_integer (getpid ()));
    if (component)
        json_object_set_new (line, "component", json_string (component));
    json_object_set_new (line, "level", json_integer (level));
    pthread_mutex_lock (&s_globals_lock);
    if (s_globals)
        json_object_update (line, s_globals);
    pthread_mutex_unlock (&s_globals_lock);
    if (fields)
        json_object_update (line, fields);
    json_object_set_new (line, "msg", json_string (msg ? msg : ""));
    char tbuf[32];
    json_object_set_new (line, "time", json_string (cn_iso8601 (cn_now_ms (), tbuf, sizeof tbuf)));
    json_object_set_new (line, "v", json_integer (0));
    char *text = json_dumps (line, JSON_COMPACT);
    json_decref (line);
    if (!text)
        return;
    size_t len = strlen (text);
    char *buf = realloc (text, len + 2);
    if (!buf) {
        free (text);
        return;
    }
    buf[len] = '\n';
    buf[len + 1] = '\0';
    ssize_t off = 0;
    int fd = atomic_load (&s_fd);
    while (off < (ssize_t) len + 1) {
        ssize_t n = write (fd, buf + off, len + 1 - off);
        if (n <= 0)
            break;
        off += n;
    }
    free (buf);
}

void
cn_log (int level, const char *component, const char *msg, const char *fields_fmt, ...)
{
    if (level < atomic_load (&s_level))
        return;
    json_t *fields = NULL;
    if (fields_fmt) {
        va_list ap;
        va_start (ap, fields_fmt);
        json_error_t jerr;
        fields = json_vpack_ex (&jerr, 0, fields_fmt, ap);
        va_end (ap);
        if (!fields) {
            fields = json_pack ("{s:s,s:s}", "log_error", "bad log fields",
                                "log_format", fields_fmt);
        }
    }
    s_emit (level, component, msg, fields);
    json_decref (fields);
}

/* CZMQ's log lines, e.g. "I: 26-11-25 10:49:56 some text\n". */
static ssize_t
s_czmq_write (void *cookie, const char *buf, size_t size)
{
    (void) cookie;
    const char *p = buf, *end = buf + size;
    while (p < end) {
        const char *nl = memchr (p, '\n', (size_t) (end - p));
        size_t n = nl ? (size_t) (nl - p) : (size_t) (end - p);
        if (n > 0) {
            int level = CN_LOG_INFO;
            const char *text = p;
            size_t tlen = n;
            if (n >= 3 && p[1] == ':' && p[2] == ' ') {
                switch (p[0]) {
                    case 'E': level = CN_LOG_ERROR; break;
                    case 'W': level = CN_LOG_WARN; break;
                    case 'N': level = CN_LOG_INFO; break;
                    case 'I': level = CN_LOG_INFO; break;
                    case 'D': level = CN_LOG_DEBUG; break;
                    default: break;
                }
                text = p + 3;
                tlen = n - 3;
                /* skip "YY-MM-DD HH:MM:SS " when present */
                if (tlen > 18 && text[2] == '-' && text[5] == '-' && text[8] == ' ') {
                    text += 18;
                    tlen -= 18;
                }
            }
            if (level >= atomic_load (&s_level)) {
                json_t *f = json_pack ("{s:s%}", "czmq_text", text, tlen);
                s_emit (level, "czmq", "czmq log", f);
                json_decref (f);
            }
        }
        p += n + (nl ? 1 : 0);
    }
    return (ssize_t) size;
}

void
cn_log_init (const char *name, int level)
{
    if (name)
        snprintf (s_name, sizeof s_name, "%s", name);
    if (gethostname (s_hostname, sizeof s_hostname) != 0)
        snprintf (s_hostname, sizeof s_hostname, "localhost");
    s_hostname[sizeof s_hostname - 1] = '\0';
    if (level > 0)
        cn_log_set_level (level);
    static FILE *czmq_stream;
    if (!czmq_stream) {
        cookie_io_functions_t io = { .write = s_czmq_write };
        czmq_stream = fopencookie (NULL, "w", io);
        if (czmq_stream) {
            setvbuf (czmq_stream, NULL, _IOLBF, 0);
            zsys_set_logstream (czmq_stream);
            zsys_set_logsystem (false);
        }
    }
}
