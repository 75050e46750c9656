/* cn_ticket: see include/cn_ticket.h. */
#include "cn_ticket.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cn_util.h"

const cn_mindex_t cn_ticket_index[] = {
    { "uuid", CN_MIDX_STRING, true },
    { "server_uuid", CN_MIDX_STRING, false },
    { "scope", CN_MIDX_STRING, false },
    { "id", CN_MIDX_STRING, false },
    { "status", CN_MIDX_STRING, false },
    { "queue", CN_MIDX_STRING, false },
    { "seq", CN_MIDX_NUMBER, false },
    { "expires_ms", CN_MIDX_NUMBER, false },
    { "created_at", CN_MIDX_STRING, false },
    { "updated_at", CN_MIDX_STRING, false },
};
const size_t cn_ticket_nindex = sizeof cn_ticket_index / sizeof cn_ticket_index[0];

const cn_mindex_t cn_ticket_queue_index[] = {
    { "server_uuid", CN_MIDX_STRING, false },
};
const size_t cn_ticket_queue_nindex =
    sizeof cn_ticket_queue_index / sizeof cn_ticket_queue_index[0];

/* ---- time ---- */

static bool
s_digits (const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit ((unsigned char) s[i]))
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* Days from 1970-01-01 to y-m-d (proleptic Gregorian). */
static int64_t
s_days (int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

bool
cn_ticket_parse_time (const char *s, int64_t *ms)
{
    int y, mo, d, h, mi, sec = 0, frac_ms = 0;
    if (!s || strlen (s) < 16 || strlen (s) > 40)
        return false;
    if (!s_digits (s, 4, &y) || s[4] != '-' || !s_digits (s + 5, 2, &mo) || s[7] != '-'
        || !s_digits (s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't' && s[10] != ' ')
        || !s_digits (s + 11, 2, &h) || s[13] != ':' || !s_digits (s + 14, 2, &mi))
        return false;
    const char *p = s + 16;
    if (*p == ':') {
        if (!s_digits (p + 1, 2, &sec))
            return false;
        p += 3;
        if (*p == '.') {
            p++;
            int n = 0, scale = 100;
            while (isdigit ((unsigned char) *p)) {
                frac_ms += (*p - '0') * scale;
                scale /= 10;
                p++;
                n++;
            }
            if (n == 0)
                return false;
        }
    }
    int tz_min = 0;
    if (*p == 'Z' || *p == 'z')
        p++;
    else if (*p == '+' || *p == '-') {
        int th, tm;
        if (!s_digits (p + 1, 2, &th) || p[3] != ':' || !s_digits (p + 4, 2, &tm)
            || th > 23 || tm > 59)
            return false;
        tz_min = (th * 60 + tm) * (*p == '-' ? -1 : 1);
        p += 6;
    }
    if (*p)
        return false;
    static const int mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    if (mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59)
        return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[mo - 1] + (mo == 2 && leap))
        return false;
    int64_t t = s_days (y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - tz_min * 60;
    *ms = t * 1000 + frac_ms;
    return true;
}

/* ---- building ---- */

char *
cn_ticket_queue_key (const char *server_uuid, const char *scope, const char *id)
{
    size_t n = strlen (server_uuid) + strlen (scope) + strlen (id) + 32;
    char *k = malloc (n);
    if (!k)
        abort ();
    snprintf (k, n, "%s:%zu:%s:%s", server_uuid, strlen (scope), scope, id);
    return k;
}

/* A required (or optional) string parameter of bounded length. */
static const char *
s_string_param (const json_t *params, const char *name, bool required, json_t *errs)
{
    json_t *v = json_object_get (params, name);
    if (!v || json_is_null (v)) {
        if (required)
            cn_apierr_invalid (errs, name, "%s is required", name);
        return NULL;
    }
    if (!json_is_string (v)) {
        cn_apierr_invalid (errs, name, "value was not a string");
        return NULL;
    }
    const char *s = json_string_value (v);
    if (required && !*s) {
        cn_apierr_invalid (errs, name, "%s is required", name);
        return NULL;
    }
    if (strlen (s) > CN_TICKET_MAX_FIELD || strlen (s) != json_string_length (v)) {
        cn_apierr_invalid (errs, name, "value must be at most %d bytes, without NUL",
                     CN_TICKET_MAX_FIELD);
        return NULL;
    }
    return s;
}

json_t *
cn_ticket_new (const char *server_uuid, const json_t *params, const char *reqid,
               int64_t now_ms, const char *uuid, cn_apierr_t *e)
{
    json_t *errs = json_array ();
    const char *scope = s_string_param (params, "scope", true, errs);
    const char *id = s_string_param (params, "id", true, errs);
    const char *exp = s_string_param (params, "expires_at", true, errs);
    const char *action = s_string_param (params, "action", false, errs);
    int64_t exp_ms = 0;
    if (exp && !cn_ticket_parse_time (exp, &exp_ms))
        cn_apierr_invalid (errs, "expires_at", "value is not an ISO 8601 date");
    json_t *extra = json_object_get (params, "extra");
    if (extra && !json_is_null (extra) && !json_is_object (extra))
        cn_apierr_invalid (errs, "extra", "value is not an object");
    if (json_array_size (errs) > 0) {
        cn_apierr_set (e, 500, "InvalidParameters", "Request parameters failed validation");
        json_decref (e->errors);
        e->errors = errs;
        return NULL;
    }
    json_decref (errs);
    char now_iso[32], exp_iso[32];
    cn_iso8601 (now_ms, now_iso, sizeof now_iso);
    cn_iso8601 (exp_ms, exp_iso, sizeof exp_iso);
    char *queue = cn_ticket_queue_key (server_uuid, scope, id);
    json_t *t = json_pack ("{s:s,s:s,s:s,s:s,s:s*,s:o,s:s*,s:s,s:s,s:s,s:s,s:s,s:i,s:I}",
                           "uuid", uuid, "server_uuid", server_uuid, "scope", scope,
                           "id", id, "action", action,
                           "extra", json_is_object (extra) ? json_incref (extra)
                                                           : json_object (),
                           "reqid", reqid, "expires_at", exp_iso, "created_at", now_iso,
                           "updated_at", now_iso, "status", "queued", "queue", queue,
                           "seq", 0, "expires_ms", (json_int_t) exp_ms);
    free (queue);
    if (!t)
        abort ();
    return t;
}

static const char *
s_str (const json_t *o, const char *k)
{
    return json_string_value (json_object_get (o, k));
}

bool
cn_ticket_valid (const json_t *t)
{
    static const char *const strs[] = { "uuid", "server_uuid", "scope", "id", "queue",
                                        "status", NULL };
    if (!json_is_object (t))
        return false;
    for (int i = 0; strs[i]; i++)
        if (!s_str (t, strs[i]))
            return false;
    const char *st = s_str (t, "status");
    if (strcmp (st, "queued") != 0 && strcmp (st, "active") != 0
        && strcmp (st, "finished") != 0 && strcmp (st, "expired") != 0)
        return false;
    return json_is_integer (json_object_get (t, "seq"))
           && json_is_integer (json_object_get (t, "expires_ms"));
}

/* ---- the queue ---- */

static void
s_set_status (json_t *t, const char *status, int64_t now_ms, json_t *changed)
{
    char iso[32];
    json_object_set_new (t, "status", json_string (status));
    json_object_set_new (t, "updated_at", json_string (cn_iso8601 (now_ms, iso, sizeof iso)));
    /* each ticket once, even if it changes twice */
    for (size_t i = 0; i < json_array_size (changed); i++)
        if (json_array_get (changed, i) == t)
            return;
    json_array_append (changed, t);
}

size_t
cn_ticket_settle (json_t *tickets, int64_t now_ms, json_t *changed)
{
    size_t before = json_array_size (changed);
    json_t *t;
    size_t i;
    bool have_active = false;
    json_array_foreach (tickets, i, t) {
        const char *st = s_str (t, "status");
        if (!st || (strcmp (st, "queued") != 0 && strcmp (st, "active") != 0))
            continue;
        json_t *exp = json_object_get (t, "expires_ms");
        if (json_is_integer (exp) && json_integer_value (exp) <= now_ms) {
            s_set_status (t, "expired", now_ms, changed);
            continue;
        }
        if (strcmp (st, "active") == 0) {
            if (have_active)
                s_set_status (t, "queued", now_ms, changed);
            have_active = true;
        }
    }
    if (!have_active)
        json_array_foreach (tickets, i, t) {
            const char *st = s_str (t, "status");
            if (st && strcmp (st, "queued") == 0) {
                s_set_status (t, "active", now_ms, changed);
                break;
            }
        }
    return json_array_size (changed) - before;
}

json_t *
cn_ticket_view (const json_t *t)
{
    json_t *v = json_copy ((json_t *) t);
    if (!v)
        abort ();
    json_object_del (v, "queue");
    json_object_del (v, "seq");
    json_object_del (v, "expires_ms");
    return v;
}
