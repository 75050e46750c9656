/*
 * cn_urproto: the pure parts of Ur execute (docs/ur.md, proto/ur.md), shared
 * by cnapid's ur service (actors/cn_ur.c) and the agent's Ur consumer
 * (lib/cn_agent_ur.c): parameter checks, routing keys, output capping and
 * JSON-safe output strings. No I/O.
 *
 *   cn_ur_req_t r;
 *   cn_apierr_t e = { 0 };
 *   if (cn_ur_params_check (params, &r, &e) != 0) ... e: 409 InvalidArgument
 *   char *body = cn_ur_req_body (&r);   // {type:"script", script, args, env, timeout}
 *   cn_ur_req_fini (&r);
 */
#ifndef CN_URPROTO_H
#define CN_URPROTO_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cn_server.h"

#define CN_UR_EXECUTE_PREFIX "ur.execute."
#define CN_UR_REPLY_PREFIX "ur.execute-reply."
#define CN_UR_DEFAULT_TIMEOUT_S 60
#define CN_UR_MAX_TIMEOUT_S 3600          /* CN_WAIT_MAX_S */
#define CN_UR_MAX_OUTPUT ((size_t) 1024 * 1024)   /* per stream, agent side */
#define CN_UR_REQID_MAX 64

/* A checked execute request. */
typedef struct {
    json_t *script;           /* string */
    json_t *args;             /* array of strings (maybe empty) */
    json_t *env;              /* object of strings (maybe empty) */
    double timeout_s;         /* 0 < t <= CN_UR_MAX_TIMEOUT_S */
    bool json;                /* answer {exitCode, stdout, stderr} */
} cn_ur_req_t;

/* Check POST /servers/:uuid/execute parameters (cn_params_parse's object):
 * script (string, required), args (array of strings; a single string from a
 * form is one argument), env (object of string values), timeout (seconds,
 * a positive number or decimal string, at most CN_UR_MAX_TIMEOUT_S; default
 * CN_UR_DEFAULT_TIMEOUT_S), json (boolean or "true"/"false"). 0 with *r
 * filled (new references: cn_ur_req_fini), or -1 with e set (409
 * InvalidArgument) and *r zeroed. */
int cn_ur_params_check (const json_t *params, cn_ur_req_t *r, cn_apierr_t *e);
void cn_ur_req_fini (cn_ur_req_t *r);

/* The execute request body (JSON text, malloc'd): {type:"script", script,
 * args, env, timeout}. */
char *cn_ur_req_body (const cn_ur_req_t *r, size_t *len);

/* "<prefix><uuid>.<req_id>" parsed: prefix is CN_UR_EXECUTE_PREFIX or
 * CN_UR_REPLY_PREFIX. true with uuid (lower case) and req_id (one word, 1..
 * CN_UR_REQID_MAX-1 chars of [A-Za-z0-9_-]) set; false otherwise. */
bool cn_ur_rk_parse (const char *rk, size_t len, const char *prefix, char uuid[37],
                     char req_id[CN_UR_REQID_MAX]);

/* Append n bytes to buf (which holds *len bytes and has room for cap) up to
 * cap; the rest is counted as dropped and *truncated set. Returns the bytes
 * kept. */
size_t cn_ur_cap_append (char *buf, size_t *len, size_t cap, const void *data, size_t n,
                         bool *truncated);

/* A JSON string of n bytes: invalid UTF-8 sequences become U+FFFD, NUL
 * bytes are kept (\u0000). New reference. */
json_t *cn_ur_json_text (const char *s, size_t n);

#endif
