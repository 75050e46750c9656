/*
 * cn_log: bunyan JSON-line logging (the Triton convention).
 *
 * Every line: {"name","hostname","pid","component","level","msg","time","v":0, ...fields}.
 * `msg` is a fixed sentence; data goes in fields, given as a jansson json_pack
 * format and its arguments (use "s?" for strings that may be NULL).
 *
 *   CN_INFO ("writer", "batch committed", "{s:i,s:f}", "rows", n, "ms", ms);
 *   CN_WARN ("listener", "broker connection lost", NULL);
 *
 * Thread safe: each line is one write(2) to the log fd (stderr by default).
 * CZMQ's own zsys log is routed into the same format (component "czmq").
 */
#ifndef CN_LOG_H
#define CN_LOG_H

#include <stdbool.h>

enum {
    CN_LOG_TRACE = 10, CN_LOG_DEBUG = 20, CN_LOG_INFO = 30,
    CN_LOG_WARN = 40, CN_LOG_ERROR = 50, CN_LOG_FATAL = 60
};

/* Set the program name and minimum level; route CZMQ's zsys log here. */
void cn_log_init (const char *name, int level);
/* Write to this fd instead of stderr (the caller keeps ownership). */
void cn_log_set_fd (int fd);
void cn_log_set_level (int level);
int cn_log_level (void);
/* "trace".."fatal" or a number -> level; -1 when unknown. */
int cn_log_parse_level (const char *s);
const char *cn_log_level_name (int level);
/* Add a field to every line from now on (e.g. "instance"). */
void cn_log_set_global (const char *key, const char *value);

/* Emit one line if level >= current. fields_fmt may be NULL. */
void cn_log (int level, const char *component, const char *msg,
             const char *fields_fmt, ...);

#define CN_TRACE(c, m, ...) cn_log (CN_LOG_TRACE, (c), (m), __VA_ARGS__)
#define CN_DEBUG(c, m, ...) cn_log (CN_LOG_DEBUG, (c), (m), __VA_ARGS__)
#define CN_INFO(c, m, ...)  cn_log (CN_LOG_INFO,  (c), (m), __VA_ARGS__)
#define CN_WARN(c, m, ...)  cn_log (CN_LOG_WARN,  (c), (m), __VA_ARGS__)
#define CN_ERROR(c, m, ...) cn_log (CN_LOG_ERROR, (c), (m), __VA_ARGS__)
#define CN_FATAL(c, m, ...) cn_log (CN_LOG_FATAL, (c), (m), __VA_ARGS__)

#endif
