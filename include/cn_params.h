/*
 * cn_params: a gateway request's parameters, as restify's queryParser and
 * bodyParser (mapParams) build them for the reference (proto/backend.md,
 * "Common fields"). Shared by every service behind the gateway (the
 * backends, ur, ...), so that all of them read parameters the same way.
 *
 *   cn_apierr_t e = { 0 };
 *   json_t *params = cn_params_parse (&msg, &e);      // NULL: e is a 400
 *   static const char *const allowed[] = { "script", "args", NULL };
 *   if (!cn_params_strict (params, allowed, &e)) ...  // e is a 409
 */
#ifndef CN_PARAMS_H
#define CN_PARAMS_H

#include <jansson.h>
#include <stdbool.h>

#include "cn_msg.h"
#include "cn_server.h"

/* The request's parameters: the query string (fields "query"), then the
 * body ("body", "ctype"): JSON when the content type is application/json,
 * any +json or absent; form-encoded for application/x-www-form-urlencoded;
 * ignored otherwise. A later source only fills a name whose earlier value
 * is falsy; a name repeated within one query string becomes an array. The
 * route's server_uuid is not included. New reference, or NULL with e set
 * (400 InvalidContent) when the body is not a JSON object. */
json_t *cn_params_parse (const cn_msg_t *m, cn_apierr_t *e);

/* Strict endpoints: true when every name of params is in allowed
 * (NULL-terminated; may be NULL) or is "server_uuid"; else false with e set
 * (409 InvalidArgument "<p> is not an explicitly defined parameter"). */
bool cn_params_strict (const json_t *params, const char *const *allowed, cn_apierr_t *e);

/* The route's :server_uuid (the frame's "uuid" field), lower case, into
 * uuid. false with e set (409 InvalidArgument "Invalid server UUID", with
 * ": <what was given>" when something was) when it is absent, too long or
 * not a UUID. */
bool cn_params_server_uuid (const cn_msg_t *m, char uuid[37], cn_apierr_t *e);

/* The start of every /servers/:uuid route: cn_params_parse, then
 * cn_params_server_uuid into uuid. The parameters (new reference), or NULL
 * with e set by whichever failed first. */
json_t *cn_params_parse_server (const cn_msg_t *m, char uuid[37], cn_apierr_t *e);

/* JavaScript truthiness of a parameter value (NULL is false). */
bool cn_params_truthy (const json_t *v);

#endif
