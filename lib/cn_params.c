/*
 * cn_params: see include/cn_params.h. Moved here from actors/cn_backend.c so
 * that every service behind the gateway parses parameters one way.
 */
#include "cn_params.h"

#include "cn_util.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int
s_hex (int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode (and '+' -> ' ') into a fresh string. */
static char *
s_urldecode (const char *s, size_t len)
{
    char *out = malloc (len + 1);
    size_t o = 0;
    if (!out)
        abort ();
    for (size_t i = 0; i < len; i++) {
        int hi, lo;
        if (s[i] == '+')
            out[o++] = ' ';
        else
        if (s[i] == '%' && i + 2 < len
            && (hi = s_hex (s[i + 1])) >= 0 && (lo = s_hex (s[i + 2])) >= 0) {
            out[o++] = (char) (hi * 16 + lo);
            i += 2;
        }
        else
            out[o++] = s[i];
    }
    out[o] = 0;
    return out;
}

/* JavaScript truthiness of a parameter value. */
bool
cn_params_truthy (const json_t *v)
{
    if (!v || json_is_null (v) || json_is_false (v))
        return false;
    if (json_is_string (v))
        return json_string_length (v) > 0;
    if (json_is_integer (v))
        return json_integer_value (v) != 0;
    if (json_is_real (v))
        return json_real_value (v) != 0.0;
    return true;
}

/* Set key unless a truthy value is already there; a repeated name within
 * one query string becomes an array of its values (as qs does). */
static void
s_param_set (json_t *params, const char *key, json_t *val, bool same_source)
{
    json_t *cur = json_object_get (params, key);
    if (cur && same_source) {
        if (json_is_array (cur))
            json_array_append_new (cur, val);
        else {
            json_t *arr = json_array ();
            json_array_append (arr, cur);
            json_array_append_new (arr, val);
            json_object_set_new (params, key, arr);
        }
        return;
    }
    if (cur && cn_params_truthy (cur)) {
        json_decref (val);
        return;
    }
    json_object_set_new (params, key, val);
}

/* Parse a=b&c=d into params. */
static void
s_parse_form (json_t *params, const char *q, size_t len)
{
    json_t *seen = json_object ();      /* names set by this source */
    size_t i = 0;
    while (i < len) {
        size_t j = i;
        while (j < len && q[j] != '&')
            j++;
        if (j > i) {
            const char *eq = memchr (q + i, '=', j - i);
            size_t klen = eq ? (size_t) (eq - (q + i)) : j - i;
            char *key = s_urldecode (q + i, klen);
            char *val = eq ? s_urldecode (eq + 1, (size_t) (q + j - eq - 1)) : strdup ("");
            if (*key) {
                bool again = json_object_get (seen, key) != NULL;
                s_param_set (params, key, json_string (val), again);
                json_object_set_new (seen, key, json_true ());
            }
            free (key);
            free (val);
        }
        i = j + 1;
    }
    json_decref (seen);
}

static bool
s_ctype_is (const char *ctype, size_t len, const char *want)
{
    size_t n = strlen (want);
    if (len < n || strncasecmp (ctype, want, n) != 0)
        return false;
    return len == n || ctype[n] == ';' || ctype[n] == ' ';
}

static bool
s_ctype_json (const char *ctype, size_t len)
{
    if (!ctype)
        return true;            /* no Content-Type: take the body as JSON */
    if (s_ctype_is (ctype, len, "application/json"))
        return true;
    /* application/<something>+json */
    size_t end = 0;
    while (end < len && ctype[end] != ';')
        end++;
    while (end > 0 && ctype[end - 1] == ' ')
        end--;
    return end >= 5 && strncasecmp (ctype + end - 5, "+json", 5) == 0;
}

/* The request's parameters: query, then body. NULL with e set (400) when
 * the body is not acceptable JSON. The route's server_uuid is not included
 * (it wins over any other source, as in restify). */
json_t *
cn_params_parse (const cn_msg_t *m, cn_apierr_t *e)
{
    json_t *params = json_object ();
    size_t qlen = 0, blen = 0, clen = 0;
    const char *q = cn_msg_str (m, "query", &qlen);
    const char *body = cn_msg_str (m, "body", &blen);
    const char *ctype = cn_msg_str (m, "ctype", &clen);
    if (!params)
        abort ();
    if (q && qlen)
        s_parse_form (params, q, qlen);

    if (body && blen) {
        if (s_ctype_json (ctype, clen)) {
            json_error_t jerr;
            json_t *b = json_loadb (body, blen, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
            if (!b) {
                cn_apierr_set (e, 400, "InvalidContent", "Invalid JSON: %s", jerr.text);
                json_decref (params);
                return NULL;
            }
            if (!json_is_object (b)) {
                cn_apierr_set (e, 400, "InvalidContent",
                               "Invalid JSON: the body must be a JSON object");
                json_decref (b);
                json_decref (params);
                return NULL;
            }
            const char *key;
            json_t *val;
            json_object_foreach (b, key, val)
                s_param_set (params, key, json_incref (val), false);
            json_decref (b);
        }
        else
        if (s_ctype_is (ctype, clen, "application/x-www-form-urlencoded"))
            s_parse_form (params, body, blen);
        /* any other content type: the body is not parameters (restify) */
    }
    json_object_del (params, "server_uuid");
    return params;
}

/* Strict endpoints: any name outside allowed -> 409 InvalidArgument. */
bool
cn_params_strict (const json_t *params, const char *const *allowed, cn_apierr_t *e)
{
    const char *key;
    json_t *val;
    json_object_foreach ((json_t *) params, key, val) {
        bool ok = strcmp (key, "server_uuid") == 0;
        for (size_t i = 0; !ok && allowed && allowed[i]; i++)
            ok = strcmp (key, allowed[i]) == 0;
        if (!ok) {
            cn_apierr_set (e, 409, "InvalidArgument",
                           "%s is not an explicitly defined parameter", key);
            return false;
        }
    }
    return true;
}

bool
cn_params_server_uuid (const cn_msg_t *m, char uuid[37], cn_apierr_t *e)
{
    size_t len = 0;
    const char *raw = cn_msg_str (m, "uuid", &len);
    char tmp[64] = "";
    if (raw && len < sizeof tmp) {
        memcpy (tmp, raw, len);
        tmp[len] = 0;
    }
    if (cn_uuid_normalize (tmp, uuid))
        return true;
    cn_apierr_set (e, 409, "InvalidArgument", "Invalid server UUID%s%s", *tmp ? ": " : "", tmp);
    return false;
}

json_t *
cn_params_parse_server (const cn_msg_t *m, char uuid[37], cn_apierr_t *e)
{
    json_t *params = cn_params_parse (m, e);
    if (params && !cn_params_server_uuid (m, uuid, e)) {
        json_decref (params);
        params = NULL;
    }
    return params;
}
