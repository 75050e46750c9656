/*
 * cn_urproto: see include/cn_urproto.h.
 */
#include "cn_urproto.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cn_util.h"

void
cn_ur_req_fini (cn_ur_req_t *r)
{
    if (!r)
        return;
    json_decref (r->script);
    json_decref (r->args);
    json_decref (r->env);
    memset (r, 0, sizeof *r);
}

static int
s_bad (cn_ur_req_t *r, cn_apierr_t *e, const char *msg)
{
    cn_ur_req_fini (r);
    cn_apierr_set (e, 409, "InvalidArgument", "%s", msg);
    return -1;
}

/* A positive number of seconds from a JSON number or a decimal string. */
static bool
s_seconds (const json_t *v, double *out)
{
    double d;
    if (json_is_integer (v))
        d = (double) json_integer_value (v);
    else
    if (json_is_real (v))
        d = json_real_value (v);
    else
    if (json_is_string (v)) {
        const char *s = json_string_value (v);
        char *end;
        if (!*s || isspace ((unsigned char) *s))
            return false;
        d = strtod (s, &end);
        if (*end)
            return false;
    }
    else
        return false;
    if (!isfinite (d) || d <= 0 || d > CN_UR_MAX_TIMEOUT_S)
        return false;
    *out = d;
    return true;
}

int
cn_ur_params_check (const json_t *params, cn_ur_req_t *r, cn_apierr_t *e)
{
    memset (r, 0, sizeof *r);
    const json_t *v = json_object_get (params, "script");
    if (!v || json_is_null (v))
        return s_bad (r, e, "script is required");
    if (!json_is_string (v))
        return s_bad (r, e, "script must be a string");
    r->script = json_incref ((json_t *) v);

    v = json_object_get (params, "args");
    r->args = json_array ();
    if (v && json_is_string (v))
        json_array_append (r->args, (json_t *) v);   /* a form field: one argument */
    else
    if (v && json_is_array (v)) {
        size_t i;
        json_t *a;
        json_array_foreach (v, i, a) {
            if (!json_is_string (a))
                return s_bad (r, e, "args must be an array of strings");
            json_array_append (r->args, a);
        }
    }
    else
    if (v && !json_is_null (v))
        return s_bad (r, e, "args must be an array of strings");

    v = json_object_get (params, "env");
    r->env = json_object ();
    if (v && json_is_object (v)) {
        const char *k;
        json_t *a;
        json_object_foreach ((json_t *) v, k, a) {
            if (!json_is_string (a))
                return s_bad (r, e, "env must be an object of strings");
            if (!*k || strchr (k, '='))
                return s_bad (r, e, "env names must be non-empty and without '='");
            json_object_set (r->env, k, a);
        }
    }
    else
    if (v && !json_is_null (v))
        return s_bad (r, e, "env must be an object of strings");

    r->timeout_s = CN_UR_DEFAULT_TIMEOUT_S;
    v = json_object_get (params, "timeout");
    if (v && !json_is_null (v) && !s_seconds (v, &r->timeout_s))
        return s_bad (r, e, "timeout must be a number of seconds greater than 0 and at most 3600");

    v = json_object_get (params, "json");
    if (v && json_is_boolean (v))
        r->json = json_is_true (v);
    else
    if (v && json_is_string (v) && (strcmp (json_string_value (v), "true") == 0
                                    || strcmp (json_string_value (v), "false") == 0))
        r->json = strcmp (json_string_value (v), "true") == 0;
    else
    if (v && !json_is_null (v))
        return s_bad (r, e, "json must be a boolean");
    return 0;
}

char *
cn_ur_req_body (const cn_ur_req_t *r, size_t *len)
{
    json_t *o = json_pack ("{s:s,s:O,s:O,s:O,s:f}", "type", "script", "script", r->script,
                           "args", r->args, "env", r->env, "timeout", r->timeout_s);
    if (!o)
        abort ();
    char *text = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    if (!text)
        abort ();
    *len = strlen (text);
    return text;
}

static bool
s_word_char (int c)
{
    return isalnum (c) || c == '-' || c == '_';
}

bool
cn_ur_rk_parse (const char *rk, size_t len, const char *prefix, char uuid[37],
                char req_id[CN_UR_REQID_MAX])
{
    size_t pl = strlen (prefix);
    if (!rk || len < pl + 36 + 2 || memcmp (rk, prefix, pl) != 0 || rk[pl + 36] != '.')
        return false;
    char tmp[37];
    memcpy (tmp, rk + pl, 36);
    tmp[36] = 0;
    char norm[37];
    if (!cn_uuid_normalize (tmp, norm))
        return false;
    size_t rl = len - pl - 37;
    if (rl < 1 || rl >= CN_UR_REQID_MAX)
        return false;
    const char *q = rk + pl + 37;
    for (size_t i = 0; i < rl; i++)
        if (!s_word_char ((unsigned char) q[i]))
            return false;
    memcpy (uuid, norm, 37);
    memcpy (req_id, q, rl);
    req_id[rl] = 0;
    return true;
}

size_t
cn_ur_cap_append (char *buf, size_t *len, size_t cap, const void *data, size_t n,
                  bool *truncated)
{
    size_t room = *len < cap ? cap - *len : 0;
    size_t take = n < room ? n : room;
    if (take)
        memcpy (buf + *len, data, take);
    *len += take;
    if (take < n)
        *truncated = true;
    return take;
}

/* Length of a valid UTF-8 sequence at s (at most n bytes), or 0. */
static size_t
s_utf8_len (const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t need;
    unsigned min;
    if (c >= 0xC2 && c <= 0xDF) { need = 2; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { need = 3; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 4; min = 0x10000; }
    else return 0;
    if (n < need)
        return 0;
    unsigned cp = c & (need == 2 ? 0x1F : need == 3 ? 0x0F : 0x07);
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return need;
}

json_t *
cn_ur_json_text (const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *) s;
    size_t i = 0;
    /* the common case: already valid */
    while (i < n) {
        size_t l = s_utf8_len (u + i, n - i);
        if (!l)
            break;
        i += l;
    }
    if (i == n) {
        json_t *j = json_stringn (s ? s : "", n);
        if (!j)
            abort ();
        return j;
    }
    char *out = malloc (n * 3 + 1);
    if (!out)
        abort ();
    size_t o = 0;
    for (i = 0; i < n;) {
        size_t l = s_utf8_len (u + i, n - i);
        if (l) {
            memcpy (out + o, u + i, l);
            o += l;
            i += l;
        }
        else {
            memcpy (out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    json_t *j = json_stringn (out, o);
    free (out);
    if (!j)
        abort ();
    return j;
}
