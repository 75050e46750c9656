/*
 * cn_sysinfo: see include/cn_sysinfo.h.
 *
 * The fast scan accepts a subset of what jansson accepts (never more): when
 * it gives up (escaped object keys, objects of more than S_MAX_KEYS members,
 * nesting deeper than S_MAX_DEPTH, integers beyond int64, reals it cannot
 * read back, \u0000, or anything invalid) cn_sysinfo_load hands the text to
 * cn_sysinfo_parse, which gives the verdict and the message; a text accepted
 * that way is kept without a hash and compared by parsing.
 *
 * The hash: a string hashes its decoded bytes; an integer its value; every
 * real the same (rare in sysinfo; equal hashes are checked by parsing
 * anyway); an array its elements in order; an object the sum of its members'
 * (key, value) hashes, so member order does not count. JSON-equal texts thus
 * hash equal; unequal texts almost never do.
 */
#include "cn_sysinfo.h"

#include "cn_json.h"
#include "cn_server.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define S_MAX_DEPTH 64
#define S_MAX_KEYS 256

/* The top-level members server records are derived from (cn_server.c:
 * the checks of cn_sysinfo_check, s_derive, s_admin_ip, s_macs). */
static const char *const s_wanted[] = {
    "UUID", "Hostname", "Setup", "Zpool", "Boot Parameters", "MiB of Memory",
    "CPU Total Cores", "Live Image", "Boot Time", "Zpool Creation", "SDC Agents",
    "CN Agent IP", "CN Agent Port", "Admin IP", "Admin NIC Tag", "Network Interfaces",
    "Virtual Network Interfaces",
};
#define S_NWANTED (sizeof s_wanted / sizeof s_wanted[0])
_Static_assert (S_NWANTED == CN_SYSINFO_NSUMMARY, "CN_SYSINFO_NSUMMARY");

typedef struct {
    const unsigned char *k;
    size_t len;
    uint64_t h;
} s_key_t;

typedef struct {
    s_key_t *keys;            /* a stack of the keys of the open objects */
    size_t nkeys, ckeys;
    bool want_spans;
    const unsigned char *span[S_NWANTED][2];
} s_scan_t;

static uint64_t
s_mix (uint64_t x)
{
    x ^= x >> 30;
    x *= UINT64_C (0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C (0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

static uint64_t
s_bytes (const unsigned char *p, size_t n, uint64_t seed)
{
    uint64_t h = UINT64_C (1469598103934665603) ^ seed;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * UINT64_C (1099511628211);
    return s_mix (h ^ n);
}

enum { T_STR = 1, T_INT, T_REAL, T_TRUE, T_FALSE, T_NULL, T_ARR, T_OBJ };

/* A string at p: its end, or NULL (invalid, or \u0000); *h its hash. */
static const unsigned char *
s_string (const unsigned char *p, const unsigned char *e, uint64_t *h, bool *esc)
{
    const unsigned char *t = cn_json_scan_string (p, e, esc);
    if (!t)
        return NULL;
    if (!*esc) {
        *h = s_bytes (p + 1, (size_t) (t - p - 2), T_STR);
        return t;
    }
    char *d = cn_json_unescape (p + 1, t - 1);
    if (!d)
        return NULL;
    *h = s_bytes ((const unsigned char *) d, strlen (d), T_STR);
    free (d);
    return t;
}

static const unsigned char *
s_value (s_scan_t *sc, const unsigned char *p, const unsigned char *e, int depth, uint64_t *h);

static const unsigned char *
s_object (s_scan_t *sc, const unsigned char *p, const unsigned char *e, int depth, uint64_t *h)
{
    size_t base = sc->nkeys;
    uint64_t sum = 0, n = 0;
    p = cn_json_scan_ws (p + 1, e);
    if (p < e && *p == '}') {
        *h = s_mix (T_OBJ);
        return p + 1;
    }
    for (;;) {
        if (p >= e || *p != '"')
            return NULL;
        bool esc;
        uint64_t kh, vh;
        const unsigned char *k = p;
        p = s_string (p, e, &kh, &esc);
        if (!p || esc)
            return NULL;            /* escaped keys: left to jansson */
        size_t klen = (size_t) (p - k - 2);
        for (size_t i = base; i < sc->nkeys; i++)
            if (sc->keys[i].h == kh && sc->keys[i].len == klen
                && memcmp (sc->keys[i].k, k + 1, klen) == 0)
                return NULL;        /* duplicate key */
        if (sc->nkeys - base >= S_MAX_KEYS)
            return NULL;
        if (sc->nkeys == sc->ckeys) {
            size_t c = sc->ckeys ? 2 * sc->ckeys : 64;
            s_key_t *nk = realloc (sc->keys, c * sizeof *nk);
            if (!nk)
                return NULL;
            sc->keys = nk;
            sc->ckeys = c;
        }
        sc->keys[sc->nkeys++] = (s_key_t) { k + 1, klen, kh };
        p = cn_json_scan_ws (p, e);
        if (p >= e || *p != ':')
            return NULL;
        p = cn_json_scan_ws (p + 1, e);
        const unsigned char *vs = p;
        p = s_value (sc, p, e, depth + 1, &vh);
        if (!p)
            return NULL;
        if (depth == 0 && sc->want_spans)
            for (size_t w = 0; w < S_NWANTED; w++)
                if (strlen (s_wanted[w]) == klen && memcmp (s_wanted[w], k + 1, klen) == 0) {
                    sc->span[w][0] = vs;
                    sc->span[w][1] = p;
                }
        sum += s_mix (kh * UINT64_C (0x9e3779b97f4a7c15) ^ vh);
        n++;
        p = cn_json_scan_ws (p, e);
        if (p < e && *p == ',') {
            p = cn_json_scan_ws (p + 1, e);
            continue;
        }
        if (p < e && *p == '}')
            break;
        return NULL;
    }
    sc->nkeys = base;
    *h = s_mix (sum ^ s_mix (T_OBJ + n));
    return p + 1;
}

static const unsigned char *
s_value (s_scan_t *sc, const unsigned char *p, const unsigned char *e, int depth, uint64_t *h)
{
    if (p >= e || depth > S_MAX_DEPTH)
        return NULL;
    bool esc, integer;
    switch (*p) {
    case '"':
        return s_string (p, e, h, &esc);
    case '{':
        return s_object (sc, p, e, depth, h);
    case '[': {
        uint64_t a = s_mix (T_ARR);
        p = cn_json_scan_ws (p + 1, e);
        if (p < e && *p == ']') {
            *h = a;
            return p + 1;
        }
        for (;;) {
            uint64_t vh;
            p = s_value (sc, p, e, depth + 1, &vh);
            if (!p)
                return NULL;
            a = s_mix (a * UINT64_C (31) + vh);
            p = cn_json_scan_ws (p, e);
            if (p < e && *p == ',') {
                p = cn_json_scan_ws (p + 1, e);
                continue;
            }
            if (p < e && *p == ']')
                break;
            return NULL;
        }
        *h = a;
        return p + 1;
    }
    case 't':
        if (e - p < 4 || memcmp (p, "true", 4) != 0)
            return NULL;
        *h = s_mix (T_TRUE);
        return p + 4;
    case 'f':
        if (e - p < 5 || memcmp (p, "false", 5) != 0)
            return NULL;
        *h = s_mix (T_FALSE);
        return p + 5;
    case 'n':
        if (e - p < 4 || memcmp (p, "null", 4) != 0)
            return NULL;
        *h = s_mix (T_NULL);
        return p + 4;
    default: {
        const unsigned char *t = cn_json_scan_number (p, e, &integer);
        if (!t)
            return NULL;
        char buf[64];
        size_t n = (size_t) (t - p);
        if (n >= sizeof buf)
            return NULL;           /* left to jansson */
        memcpy (buf, p, n);
        buf[n] = 0;
        errno = 0;
        if (integer) {
            long long v = strtoll (buf, NULL, 10);
            if (errno)
                return NULL;       /* jansson: too big integer */
            *h = s_mix ((uint64_t) v ^ s_mix (T_INT));
        }
        else {
            (void) strtod (buf, NULL);
            if (errno)
                return NULL;       /* jansson: real number overflow */
            *h = s_mix (T_REAL);
        }
        return t;
    }
    }
}

/* Scan a whole document: true with *h when the fast scan accepts it. */
static bool
s_scan (s_scan_t *sc, const char *text, size_t len, uint64_t *h)
{
    const unsigned char *p = (const unsigned char *) text, *e = p + len;
    p = cn_json_scan_ws (p, e);
    p = s_value (sc, p, e, 0, h);
    if (p)
        p = cn_json_scan_ws (p, e);
    free (sc->keys);
    sc->keys = NULL;
    return p == e;
}

bool
cn_sysinfo_hash_text (const char *text, size_t len, uint64_t *hash)
{
    s_scan_t sc;
    memset (&sc, 0, sizeof sc);
    return text && s_scan (&sc, text, len, hash);
}

static cn_sysinfo_t *
s_new (const char *text, size_t len)
{
    cn_sysinfo_t *si = calloc (1, sizeof *si);
    if (!si)
        return NULL;
    si->refs = 1;
    si->text = malloc (len + 1);
    if (!si->text) {
        free (si);
        return NULL;
    }
    memcpy (si->text, text, len);
    si->text[len] = 0;
    si->len = len;
    return si;
}

/* The summary of a full tree: its wanted members, shared. */
static json_t *
s_summary_of (const json_t *tree)
{
    if (!json_is_object (tree))
        return NULL;
    json_t *sum = json_object ();
    for (size_t w = 0; sum && w < S_NWANTED; w++) {
        json_t *v = json_object_get (tree, s_wanted[w]);
        if (v)
            json_object_set (sum, s_wanted[w], v);
    }
    return sum;
}

int
cn_sysinfo_load (const char *body, size_t len, const char *expect_uuid,
                 cn_sysinfo_t **out, char *err, size_t errlen)
{
    return cn_sysinfo_load_like (body, len, expect_uuid, NULL, out, err, errlen);
}

int
cn_sysinfo_load_like (const char *body, size_t len, const char *expect_uuid,
                      const cn_sysinfo_t *like, cn_sysinfo_t **out, char *err, size_t errlen)
{
    *out = NULL;
    s_scan_t sc;
    memset (&sc, 0, sizeof sc);
    sc.want_spans = true;
    uint64_t h = 0;
    bool fast = body && len > 0 && len <= CN_SYSINFO_MAX_BYTES
                && *(const unsigned char *) cn_json_scan_ws ((const unsigned char *) body,
                                                             (const unsigned char *) body + len) == '{'
                && s_scan (&sc, body, len, &h);
    json_t *sum = NULL;
    if (fast) {
        sum = json_object ();
        for (size_t w = 0; sum && w < S_NWANTED; w++) {
            if (!sc.span[w][0])
                continue;
            size_t n = (size_t) (sc.span[w][1] - sc.span[w][0]);
            if (like && like->hashed && like->span[w].len == n
                && memcmp (like->text + like->span[w].off, sc.span[w][0], n) == 0) {
                json_t *v = json_object_get (like->summary, s_wanted[w]);
                if (v) {
                    json_object_set (sum, s_wanted[w], v);
                    continue;
                }
            }
            json_error_t jerr;
            json_t *v = json_loadb ((const char *) sc.span[w][0],
                                    (size_t) (sc.span[w][1] - sc.span[w][0]),
                                    JSON_DECODE_ANY, &jerr);
            if (!v) {
                fast = false;      /* cannot happen: the scan accepted it */
                break;
            }
            json_object_set_new (sum, s_wanted[w], v);
        }
        if (!sum)
            fast = false;
    }
    if (fast) {
        if (cn_sysinfo_check (sum, expect_uuid, err, errlen) != 0) {
            json_decref (sum);
            return -1;
        }
    }
    else {
        json_decref (sum);
        json_t *tree = NULL;
        if (cn_sysinfo_parse (body, len, expect_uuid, &tree, err, errlen) != 0)
            return -1;
        sum = s_summary_of (tree);
        json_decref (tree);
    }
    cn_sysinfo_t *si = sum ? s_new (body, len) : NULL;
    if (!si) {
        json_decref (sum);
        snprintf (err, errlen, "out of memory");
        return -1;
    }
    si->summary = sum;
    si->hashed = fast;
    si->hash = h;
    for (size_t w = 0; fast && w < S_NWANTED; w++)
        if (sc.span[w][0]) {
            si->span[w].off = (uint32_t) (sc.span[w][0] - (const unsigned char *) body);
            si->span[w].len = (uint32_t) (sc.span[w][1] - sc.span[w][0]);
        }
    *out = si;
    return 0;
}

cn_sysinfo_t *
cn_sysinfo_from_json (const json_t *value)
{
    char *text = json_dumps (value, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text)
        return NULL;
    cn_sysinfo_t *si = s_new (text, strlen (text));
    free (text);
    if (!si)
        return NULL;
    s_scan_t sc;
    memset (&sc, 0, sizeof sc);
    sc.want_spans = true;
    si->hashed = s_scan (&sc, si->text, si->len, &si->hash);
    for (size_t w = 0; si->hashed && w < S_NWANTED; w++)
        if (sc.span[w][0]) {
            si->span[w].off = (uint32_t) (sc.span[w][0] - (const unsigned char *) si->text);
            si->span[w].len = (uint32_t) (sc.span[w][1] - sc.span[w][0]);
        }
    si->summary = s_summary_of (value);
    return si;
}

json_t *
cn_sysinfo_tree (const cn_sysinfo_t *si)
{
    json_error_t jerr;
    return si ? json_loadb (si->text, si->len, JSON_DECODE_ANY, &jerr) : NULL;
}

cn_sysinfo_t *
cn_sysinfo_ref (cn_sysinfo_t *si)
{
    if (si)
        si->refs++;
    return si;
}

void
cn_sysinfo_unref (cn_sysinfo_t **p)
{
    if (!p || !*p)
        return;
    cn_sysinfo_t *si = *p;
    *p = NULL;
    if (--si->refs > 0)
        return;
    json_decref (si->summary);
    free (si->text);
    free (si);
}

bool
cn_sysinfo_equal (const cn_sysinfo_t *a, const cn_sysinfo_t *b)
{
    if (a == b)
        return true;
    if (!a || !b)
        return false;
    if (a->len == b->len && memcmp (a->text, b->text, a->len) == 0)
        return true;
    if (a->hashed && b->hashed && a->hash != b->hash)
        return false;
    json_t *x = cn_sysinfo_tree (a), *y = cn_sysinfo_tree (b);
    bool eq = x && y && json_equal (x, y);
    json_decref (x);
    json_decref (y);
    return eq;
}
