/*
 * cn_svc: answering a gateway request from a service thread (the backends,
 * the waitlist, ...): build a cn_backend_reply_t and hand it to the
 * gateway's reply queue (include/cn_backend.h, "The reply").
 *
 *   cn_svc_reply_json (receiver, id, 200, json_pack ("{s:b}", "ok", 1));
 *   cn_svc_reply_error (receiver, id, req_id, "waitlist", 404, "ResourceNotFound",
 *                       "ticket %s not found", t);
 *
 * Every function returns the HTTP status it sent (for the caller's counters).
 */
#ifndef CN_SVC_H
#define CN_SVC_H

#include <jansson.h>

#include "cn_backend.h"
#include "cn_server.h"

/* body (malloc'd, taken over; NULL = no body) as application/json. */
int cn_svc_reply (h2o_multithread_receiver_t *rx, uint64_t id, int status, char *body,
                  size_t len);
/* o (taken over; NULL = no body) encoded with CN_BACKEND_JSON_FLAGS. */
int cn_svc_reply_json (h2o_multithread_receiver_t *rx, uint64_t id, int status, json_t *o);
/* {code, message[, errors]}; 5xx answers are logged at warn under component. */
int cn_svc_reply_apierr (h2o_multithread_receiver_t *rx, uint64_t id, const char *req_id,
                         const char *component, const cn_apierr_t *e);
int cn_svc_reply_error (h2o_multithread_receiver_t *rx, uint64_t id, const char *req_id,
                        const char *component, int status, const char *code,
                        const char *fmt, ...) __attribute__ ((format (printf, 7, 8)));

#endif
