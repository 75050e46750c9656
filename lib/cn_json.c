/*
 * cn_json: see include/cn_json.h.
 *
 * The scanner walks the top level of an object only: strings are skipped
 * honouring backslash escapes, nested objects and arrays by bracket depth
 * (inside strings brackets do not count). It does not validate values;
 * callers that need a valid document still hand the rest to jansson.
 */
#include "cn_json.h"

#include <stdlib.h>
#include <string.h>

static size_t
s_ws (const char *t, size_t i, size_t len)
{
    while (i < len && (t[i] == ' ' || t[i] == '\t' || t[i] == '\n' || t[i] == '\r'))
        i++;
    return i;
}

/* t[i] == '"': index just past the closing quote, or len on error. */
static size_t
s_string (const char *t, size_t i, size_t len)
{
    for (i++; i < len; i++) {
        if (t[i] == '\\')
            i++;
        else if (t[i] == '"')
            return i + 1;
    }
    return len;
}

/* Skip one value starting at t[i]; index just past it, or len on error. */
static size_t
s_value (const char *t, size_t i, size_t len)
{
    if (i >= len)
        return len;
    if (t[i] == '"')
        return s_string (t, i, len);
    if (t[i] == '{' || t[i] == '[') {
        int depth = 0;
        for (; i < len; i++) {
            char c = t[i];
            if (c == '"') {
                i = s_string (t, i, len) - 1;
                continue;
            }
            if (c == '{' || c == '[')
                depth++;
            else if (c == '}' || c == ']') {
                if (--depth == 0)
                    return i + 1;
            }
        }
        return len;
    }
    /* number, true, false, null */
    while (i < len && t[i] != ',' && t[i] != '}' && t[i] != ']' && t[i] != ' ' && t[i] != '\t'
           && t[i] != '\n' && t[i] != '\r')
        i++;
    return i;
}

bool
cn_json_member_span (const char *t, size_t len, const char *key, size_t *start, size_t *end,
                     size_t *vstart, size_t *vend)
{
    size_t klen = strlen (key);
    size_t i = s_ws (t, 0, len);
    if (i >= len || t[i] != '{')
        return false;
    i = s_ws (t, i + 1, len);
    size_t prev_end = i;          /* where the previous member (and its comma) ended */
    bool first = true;
    while (i < len && t[i] != '}') {
        if (t[i] != '"')
            return false;
        size_t mstart = i;
        size_t kend = s_string (t, i, len);
        if (kend >= len)
            return false;
        bool match = kend - i - 2 == klen && memcmp (t + i + 1, key, klen) == 0;
        i = s_ws (t, kend, len);
        if (i >= len || t[i] != ':')
            return false;
        i = s_ws (t, i + 1, len);
        size_t vs = i;
        size_t ve = s_value (t, i, len);
        if (ve >= len || ve == vs)
            return false;
        i = s_ws (t, ve, len);
        if (match) {
            *vstart = vs;
            *vend = ve;
            if (i < len && t[i] == ',') {
                /* drop the member and the comma after it */
                *start = mstart;
                *end = s_ws (t, i + 1, len);
            }
            else if (!first) {
                /* last member: drop the comma before it */
                *start = prev_end;
                *end = i;
            }
            else {
                *start = mstart;
                *end = i;
            }
            return true;
        }
        if (i < len && t[i] == ',') {
            prev_end = i;
            i = s_ws (t, i + 1, len);
        }
        else if (i < len && t[i] != '}')
            return false;
        first = false;
    }
    return false;
}

json_t *
cn_json_load_without (const char *text, size_t len, const char *key)
{
    json_error_t jerr;
    size_t s, e, vs, ve;
    if (!cn_json_member_span (text, len, key, &s, &e, &vs, &ve)) {
        json_t *all = json_loadb (text, len, 0, &jerr);
        if (all && !json_is_object (all)) {
            json_decref (all);
            return NULL;
        }
        return all;
    }
    size_t n = len - (e - s);
    char *buf = malloc (n ? n : 1);
    if (!buf)
        return NULL;
    memcpy (buf, text, s);
    memcpy (buf + s, text + e, len - e);
    json_t *out = json_loadb (buf, n, 0, &jerr);
    free (buf);
    return out;
}
