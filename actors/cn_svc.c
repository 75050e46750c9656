/* cn_svc: see include/cn_svc.h. */
#include "cn_svc.h"

#include <stdarg.h>
#include <string.h>

#include "cn_log.h"

int
cn_svc_reply (h2o_multithread_receiver_t *rx, uint64_t id, int status, char *body, size_t len)
{
    cn_backend_reply_t *r = cn_backend_reply_new (id);
    r->status = status;
    r->body = body;
    r->len = body ? len : 0;
    r->ctype = body ? "application/json" : NULL;
    h2o_multithread_send_message (rx, &r->super);
    return status;
}

int
cn_svc_reply_json (h2o_multithread_receiver_t *rx, uint64_t id, int status, json_t *o)
{
    char *text = o ? json_dumps (o, CN_BACKEND_JSON_FLAGS | JSON_ENCODE_ANY) : NULL;
    if (o)
        json_decref (o);
    if (o && !text)
        abort ();
    return cn_svc_reply (rx, id, status, text, text ? strlen (text) : 0);
}

int
cn_svc_reply_apierr (h2o_multithread_receiver_t *rx, uint64_t id, const char *req_id,
                     const char *component, const cn_apierr_t *e)
{
    if (e->status >= 500)
        CN_WARN (component, "request failed", "{s:s?,s:i,s:s?,s:s}", "req_id", req_id,
                 "status", e->status, "code", e->code, "message", e->message);
    char *body = cn_apierr_body (e);
    return cn_svc_reply (rx, id, e->status, body, body ? strlen (body) : 0);
}

int
cn_svc_reply_error (h2o_multithread_receiver_t *rx, uint64_t id, const char *req_id,
                    const char *component, int status, const char *code, const char *fmt, ...)
{
    cn_apierr_t e;
    memset (&e, 0, sizeof e);
    e.status = status;
    e.code = code;
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (e.message, sizeof e.message, fmt, ap);
    va_end (ap);
    return cn_svc_reply_apierr (rx, id, req_id, component, &e);
}
