/*
 * cn_json: see include/cn_json.h.
 *
 * The scanner walks the top level of an object only: strings are skipped
 * honouring backslash escapes, nested objects and arrays by bracket depth
 * (inside strings brackets do not count). It does not validate values;
 * callers that need a valid document still hand the rest to jansson.
 */
#include "cn_json.h"

#include <ctype.h>
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

/* ---- validating scanner pieces (RFC 8259) ---- */

const unsigned char *
cn_json_scan_ws (const unsigned char *p, const unsigned char *e)
{
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

static int
s_hex4 (const unsigned char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    return v;
}

/* One UTF-8 sequence at p (p < e, *p >= 0x80): its length, 0 if invalid. */
static size_t
s_utf8_seq (const unsigned char *p, const unsigned char *e)
{
    unsigned c = *p, min;
    size_t k;
    if ((c & 0xe0) == 0xc0) { k = 1; min = 0x80; c &= 0x1f; }
    else if ((c & 0xf0) == 0xe0) { k = 2; min = 0x800; c &= 0x0f; }
    else if ((c & 0xf8) == 0xf0) { k = 3; min = 0x10000; c &= 0x07; }
    else return 0;
    if ((size_t) (e - p) <= k)
        return 0;
    for (size_t j = 1; j <= k; j++) {
        if ((p[j] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (p[j] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    return k + 1;
}

/* A string at p (*p == '"'): the byte after its closing quote, NULL if
 * invalid. *esc: it holds escapes. */
const unsigned char *
cn_json_scan_string (const unsigned char *p, const unsigned char *e, bool *esc)
{
    *esc = false;
    p++;
    while (p < e) {
        unsigned char c = *p;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            p++;
            continue;
        }
        if (c == '"')
            return p + 1;
        if (c < 0x20)
            return NULL;
        if (c >= 0x80) {
            size_t k = s_utf8_seq (p, e);
            if (!k)
                return NULL;
            p += k;
            continue;
        }
        /* backslash */
        *esc = true;
        if (e - p < 2)
            return NULL;
        c = p[1];
        if (c == 'u') {
            if (e - p < 6)
                return NULL;
            int u = s_hex4 (p + 2);
            if (u < 0 || (u >= 0xdc00 && u <= 0xdfff))
                return NULL;
            p += 6;
            if (u >= 0xd800 && u <= 0xdbff) {
                /* a high surrogate needs its low one */
                if (e - p < 6 || p[0] != '\\' || p[1] != 'u')
                    return NULL;
                int l = s_hex4 (p + 2);
                if (l < 0xdc00 || l > 0xdfff)
                    return NULL;
                p += 6;
            }
            continue;
        }
        if (!strchr ("\"\\/bfnrt", c) || !c)
            return NULL;
        p += 2;
    }
    return NULL;
}

/* Decode a string span [p, e) (between the quotes, already validated).
 * Returns a fresh string, or NULL if it holds a NUL (\u0000) or on OOM. */
char *
cn_json_unescape (const unsigned char *p, const unsigned char *e)
{
    char *out = malloc ((size_t) (e - p) + 1), *o = out;
    if (!out)
        return NULL;
    while (p < e) {
        if (*p != '\\') {
            *o++ = (char) *p++;
            continue;
        }
        unsigned char c = p[1];
        p += 2;
        switch (c) {
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned u = (unsigned) s_hex4 (p);
            p += 4;
            if (u >= 0xd800 && u <= 0xdbff) {
                unsigned l = (unsigned) s_hex4 (p + 2);
                p += 6;
                u = 0x10000 + ((u - 0xd800) << 10) + (l - 0xdc00);
            }
            if (u == 0) {
                free (out);
                return NULL;
            }
            if (u < 0x80)
                *o++ = (char) u;
            else if (u < 0x800) {
                *o++ = (char) (0xc0 | (u >> 6));
                *o++ = (char) (0x80 | (u & 0x3f));
            }
            else if (u < 0x10000) {
                *o++ = (char) (0xe0 | (u >> 12));
                *o++ = (char) (0x80 | ((u >> 6) & 0x3f));
                *o++ = (char) (0x80 | (u & 0x3f));
            }
            else {
                *o++ = (char) (0xf0 | (u >> 18));
                *o++ = (char) (0x80 | ((u >> 12) & 0x3f));
                *o++ = (char) (0x80 | ((u >> 6) & 0x3f));
                *o++ = (char) (0x80 | (u & 0x3f));
            }
            break;
        }
        default:  *o++ = (char) c; break;     /* " \ / */
        }
    }
    *o = 0;
    return out;
}

/* A number at p: the byte after it, NULL if invalid. *integer: no fraction
 * and no exponent. */
const unsigned char *
cn_json_scan_number (const unsigned char *p, const unsigned char *e, bool *integer)
{
    *integer = true;
    if (p < e && *p == '-')
        p++;
    if (p >= e || !isdigit (*p))
        return NULL;
    if (*p == '0')
        p++;
    else
        while (p < e && isdigit (*p))
            p++;
    if (p < e && *p == '.') {
        *integer = false;
        p++;
        if (p >= e || !isdigit (*p))
            return NULL;
        while (p < e && isdigit (*p))
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        *integer = false;
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p >= e || !isdigit (*p))
            return NULL;
        while (p < e && isdigit (*p))
            p++;
    }
    return p;
}

