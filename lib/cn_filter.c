/*
 * cn_filter: Moray's LDAP filter language (RFC 4515) compiled to a
 * parameterised SQL WHERE clause.
 *
 * Theory of operation
 * -------------------
 * A recursive-descent parser walks the filter text once and writes SQL as it
 * goes. Every assertion value is decoded (\XX escapes), checked against the
 * attribute's type and appended to the parameter list; the SQL text only ever
 * holds column identifiers (from the bucket's index definition, quoted and
 * lower-cased like the columns cn_moray creates), operators and $N
 * placeholders. So no byte of the filter's values can reach the SQL text.
 *
 *   (&(setup=true)(hostname=cn*))
 *     -> ("setup" = $1::boolean AND "hostname" LIKE $2)   params: true, cn%
 *
 * LDAP semantics for a missing attribute: (a=1) is FALSE, so (!(a=1)) is
 * TRUE. SQL would give NULL for both; a negation is therefore emitted as
 * "((inner) IS NOT TRUE)", which is TRUE when the inner is FALSE or NULL.
 *
 * Limits: nesting depth CN_FILTER_MAX_DEPTH, CN_FILTER_MAX_PARAMS parameters.
 * Any input, however malformed, yields either SQL or an error message.
 */
#include "cn_filter.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CN_FILTER_MAX_DEPTH  32
#define CN_FILTER_MAX_PARAMS 10000

typedef enum {
    S_T_STRING, S_T_NUMBER, S_T_BOOLEAN, S_T_INT
} s_type_t;

typedef struct {
    char *data;
    size_t len, cap;
    bool oom;
} s_buf_t;

typedef struct {
    const char *s;
    size_t len, pos;
    const cn_mindex_t *index;
    size_t nindex;
    int first_param;
    s_buf_t sql;
    char **params;
    int nparams, cparams;
    char *err;
    size_t errlen;
    bool failed;
} s_parser_t;

/* --- small helpers --------------------------------------------------- */

static void
s_buf_add (s_buf_t *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 128;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc (b->data, cap);
        if (!d) {
            b->oom = true;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy (b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void
s_buf_str (s_buf_t *b, const char *s)
{
    s_buf_add (b, s, strlen (s));
}

static void
s_fail (s_parser_t *p, const char *fmt, ...)
{
    if (p->failed)
        return;                 /* keep the first (innermost) error */
    p->failed = true;
    if (p->err && p->errlen) {
        va_list ap;
        va_start (ap, fmt);
        vsnprintf (p->err, p->errlen, fmt, ap);
        va_end (ap);
    }
}

/* True when s[0..n) is well-formed UTF-8 (no overlongs, no surrogates). */
static bool
s_utf8_valid (const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned min;
        if (c < 0x80) {
            i++;
            continue;
        }
        else if ((c & 0xe0) == 0xc0) { k = 1; min = 0x80; c &= 0x1f; }
        else if ((c & 0xf0) == 0xe0) { k = 2; min = 0x800; c &= 0x0f; }
        else if ((c & 0xf8) == 0xf0) { k = 3; min = 0x10000; c &= 0x07; }
        else
            return false;
        if (i + k >= n)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80)
                return false;
            c = (c << 6) | (s[i + j] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

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

/* Decode RFC 4515 escapes of s[0..n) into a fresh NUL-terminated string.
 * at: offset of s in the filter, for messages. NULL on error. */
static char *
s_unescape (s_parser_t *p, const char *s, size_t n, size_t at)
{
    char *out = malloc (n + 1);
    if (!out) {
        s_fail (p, "out of memory");
        return NULL;
    }
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\') {
            out[o++] = s[i];
            continue;
        }
        int h = i + 1 < n ? s_hex ((unsigned char) s[i + 1]) : -1;
        int l = i + 2 < n ? s_hex ((unsigned char) s[i + 2]) : -1;
        if (h < 0 || l < 0) {
            s_fail (p, "invalid escape at offset %zu: '\\' must be followed by "
                    "two hex digits", at + i);
            free (out);
            return NULL;
        }
        int c = h * 16 + l;
        if (c == 0) {
            s_fail (p, "invalid escape at offset %zu: \\00 (NUL) is not allowed",
                    at + i);
            free (out);
            return NULL;
        }
        out[o++] = (char) c;
        i += 2;
    }
    out[o] = 0;
    if (!s_utf8_valid ((const unsigned char *) out, o)) {
        s_fail (p, "value at offset %zu is not valid UTF-8", at);
        free (out);
        return NULL;
    }
    return out;
}

/* Append value (owned) as the next parameter; writes "$N" to the SQL. */
static void
s_param (s_parser_t *p, char *value)
{
    if (p->failed) {
        free (value);
        return;
    }
    if (p->nparams >= CN_FILTER_MAX_PARAMS) {
        s_fail (p, "filter has too many terms (more than %d values)",
                CN_FILTER_MAX_PARAMS);
        free (value);
        return;
    }
    if (p->nparams == p->cparams) {
        int c = p->cparams ? p->cparams * 2 : 8;
        char **np = realloc (p->params, (size_t) c * sizeof (char *));
        if (!np) {
            s_fail (p, "out of memory");
            free (value);
            return;
        }
        p->params = np;
        p->cparams = c;
    }
    p->params[p->nparams++] = value;
    char num[24];
    snprintf (num, sizeof num, "$%d", p->first_param + p->nparams - 1);
    s_buf_str (&p->sql, num);
}

static void
s_skip_ws (s_parser_t *p)
{
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t'
                               || p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
        p->pos++;
}

/* The quoted, lower-cased column identifier for a field name already known
 * to match [A-Za-z_][A-Za-z0-9_]*. */
static void
s_ident (s_buf_t *b, const char *name)
{
    char tmp[72];
    size_t n = strlen (name);
    if (n > 63)
        n = 63;
    tmp[0] = '"';
    for (size_t i = 0; i < n; i++)
        tmp[i + 1] = (char) tolower ((unsigned char) name[i]);
    tmp[n + 1] = '"';
    tmp[n + 2] = 0;
    s_buf_str (b, tmp);
}

/* Resolve an attribute: internal columns first, then the bucket's index
 * (exact name, then case-insensitive, as the column names are folded). */
static bool
s_lookup (s_parser_t *p, const char *attr, s_type_t *type, const char **col)
{
    static const struct { const char *name; s_type_t type; } internal[] = {
        { "_key", S_T_STRING }, { "_etag", S_T_STRING },
        { "_id", S_T_INT }, { "_mtime", S_T_INT }
    };
    for (size_t i = 0; i < sizeof internal / sizeof internal[0]; i++)
        if (strcmp (attr, internal[i].name) == 0) {
            *type = internal[i].type;
            *col = internal[i].name;
            return true;
        }
    const cn_mindex_t *hit = NULL;
    for (size_t i = 0; i < p->nindex && !hit; i++)
        if (p->index[i].name && strcmp (p->index[i].name, attr) == 0)
            hit = &p->index[i];
    for (size_t i = 0; i < p->nindex && !hit; i++)
        if (p->index[i].name && strcasecmp (p->index[i].name, attr) == 0)
            hit = &p->index[i];
    if (!hit)
        return false;
    switch (hit->type) {
    case CN_MIDX_NUMBER:  *type = S_T_NUMBER; break;
    case CN_MIDX_BOOLEAN: *type = S_T_BOOLEAN; break;
    default:              *type = S_T_STRING; break;
    }
    *col = hit->name;
    return true;
}

/* A JSON-style decimal number: -?digits[.digits][e[+-]digits]. */
static bool
s_is_number (const char *v)
{
    const char *s = v;
    if (*s == '-')
        s++;
    if (!isdigit ((unsigned char) *s))
        return false;
    while (isdigit ((unsigned char) *s))
        s++;
    if (*s == '.') {
        s++;
        if (!isdigit ((unsigned char) *s))
            return false;
        while (isdigit ((unsigned char) *s))
            s++;
    }
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-')
            s++;
        if (!isdigit ((unsigned char) *s))
            return false;
        while (isdigit ((unsigned char) *s))
            s++;
    }
    return *s == 0 && s - v <= 1000;
}

static bool
s_is_int64 (const char *v)
{
    if (!*v)
        return false;
    char *end;
    errno = 0;
    (void) strtoll (v, &end, 10);
    return errno == 0 && *end == 0 && !isspace ((unsigned char) *v) && *v != '+';
}

/* Check and normalise value for type; takes ownership, returns the value to
 * bind (possibly replaced) or NULL after s_fail. */
static char *
s_typed_value (s_parser_t *p, s_type_t type, const char *attr, char *v)
{
    switch (type) {
    case S_T_NUMBER:
        if (!s_is_number (v)) {
            s_fail (p, "invalid number '%.64s' for attribute '%s'", v, attr);
            free (v);
            return NULL;
        }
        return v;
    case S_T_INT:
        if (!s_is_int64 (v)) {
            s_fail (p, "invalid integer '%.64s' for attribute '%s'", v, attr);
            free (v);
            return NULL;
        }
        return v;
    case S_T_BOOLEAN:
        if (strcasecmp (v, "true") == 0 || strcasecmp (v, "false") == 0) {
            for (char *c = v; *c; c++)
                *c = (char) tolower ((unsigned char) *c);
            return v;
        }
        s_fail (p, "invalid boolean '%.64s' for attribute '%s' (true or false)",
                v, attr);
        free (v);
        return NULL;
    default:
        return v;
    }
}

static const char *
s_cast (s_type_t type)
{
    switch (type) {
    case S_T_NUMBER:  return "::numeric";
    case S_T_BOOLEAN: return "::boolean";
    case S_T_INT:     return "::bigint";
    default:          return "";
    }
}

/* Append a LIKE-escaped copy of s (\, %, _ escaped with a backslash). */
static void
s_like_add (s_buf_t *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '%' || *s == '_')
            s_buf_add (b, "\\", 1);
        s_buf_add (b, s, 1);
    }
}

/* --- the parser -------------------------------------------------------- */

static void s_filter (s_parser_t *p, int depth);

/* item: attr op value, up to (not including) the closing ')'. */
static void
s_item (s_parser_t *p)
{
    size_t astart = p->pos;
    while (p->pos < p->len && strchr ("=<>~:()", p->s[p->pos]) == NULL)
        p->pos++;
    size_t alen = p->pos - astart;
    if (p->pos >= p->len) {
        s_fail (p, "unexpected end of filter at offset %zu: missing operator", p->pos);
        return;
    }
    if (alen == 0) {
        s_fail (p, "missing attribute name at offset %zu", astart);
        return;
    }
    char attr[64];
    bool ok = alen <= 63 && (isalpha ((unsigned char) p->s[astart]) || p->s[astart] == '_');
    for (size_t i = 0; ok && i < alen; i++) {
        unsigned char c = (unsigned char) p->s[astart + i];
        ok = isalnum (c) || c == '_';
    }
    if (!ok) {
        s_fail (p, "invalid attribute name at offset %zu: '%.*s'", astart,
                (int) (alen > 64 ? 64 : alen), p->s + astart);
        return;
    }
    memcpy (attr, p->s + astart, alen);
    attr[alen] = 0;

    char op = p->s[p->pos];
    if (op == ':') {
        s_fail (p, "extensible match (':=') is not supported at offset %zu", p->pos);
        return;
    }
    if (op == '(' || op == ')') {
        s_fail (p, "missing operator after attribute '%s' at offset %zu", attr, p->pos);
        return;
    }
    if (op == '~' || op == '<' || op == '>') {
        if (p->pos + 1 >= p->len || p->s[p->pos + 1] != '=') {
            s_fail (p, "invalid operator at offset %zu (expected =, >= or <=)", p->pos);
            return;
        }
        if (op == '~') {
            s_fail (p, "approximate match ('~=') is not supported at offset %zu", p->pos);
            return;
        }
        p->pos += 2;
    }
    else
        p->pos += 1;        /* '=' */

    /* The raw value runs to the next unescaped ')'. */
    size_t vstart = p->pos;
    size_t nstars = 0;
    while (p->pos < p->len && p->s[p->pos] != ')') {
        char c = p->s[p->pos];
        if (c == '(') {
            s_fail (p, "unescaped '(' in value at offset %zu (write \\28)", p->pos);
            return;
        }
        if (c == '*')
            nstars++;
        if (c == '\\' && p->pos + 1 < p->len)
            p->pos++;       /* skip the escaped character; checked later */
        p->pos++;
    }
    if (p->pos >= p->len) {
        s_fail (p, "unexpected end of filter: missing ')' after value at offset %zu",
                vstart);
        return;
    }
    size_t vlen = p->pos - vstart;
    const char *raw = p->s + vstart;

    s_type_t type;
    const char *col;
    if (!s_lookup (p, attr, &type, &col)) {
        s_fail (p, "attribute '%s' is not indexed in this bucket", attr);
        return;
    }

    if (op == '=' && vlen == 1 && raw[0] == '*') {
        s_ident (&p->sql, col);
        s_buf_str (&p->sql, " IS NOT NULL");
        return;
    }
    if (op != '=' && nstars > 0) {
        s_fail (p, "unescaped '*' in value at offset %zu (write \\2a)", vstart);
        return;
    }
    if (nstars == 0) {
        char *v = s_unescape (p, raw, vlen, vstart);
        if (!v)
            return;
        v = s_typed_value (p, type, attr, v);
        if (!v)
            return;
        s_ident (&p->sql, col);
        s_buf_str (&p->sql, op == '=' ? " = " : op == '>' ? " >= " : " <= ");
        s_param (p, v);
        s_buf_str (&p->sql, s_cast (type));
        return;
    }

    /* Substrings: initial*any*...*final, each part unescaped then
     * LIKE-escaped, joined with %. */
    if (type != S_T_STRING) {
        s_fail (p, "substring match on non-string attribute '%s'", attr);
        return;
    }
    s_buf_t pat = { 0 };
    size_t seg = 0, i = 0;
    bool first = true;
    for (;;) {
        bool end = i >= vlen;
        if (!end && raw[i] == '\\') {
            i += (i + 2 < vlen) ? 3 : vlen - i;
            continue;
        }
        if (end || raw[i] == '*') {
            if (!first)
                s_buf_add (&pat, "%", 1);
            first = false;
            if (i > seg) {
                char *part = s_unescape (p, raw + seg, i - seg, vstart + seg);
                if (!part) {
                    free (pat.data);
                    return;
                }
                s_like_add (&pat, part);
                free (part);
            }
            if (end)
                break;
            seg = i + 1;
        }
        i++;
    }
    if (pat.oom) {
        free (pat.data);
        s_fail (p, "out of memory");
        return;
    }
    s_ident (&p->sql, col);
    s_buf_str (&p->sql, " LIKE ");
    s_param (p, pat.data ? pat.data : strdup (""));
}

/* One parenthesised filter. */
static void
s_filter (s_parser_t *p, int depth)
{
    if (p->failed)
        return;
    s_skip_ws (p);
    if (p->pos >= p->len) {
        s_fail (p, "unexpected end of filter at offset %zu: expected '('", p->pos);
        return;
    }
    if (p->s[p->pos] != '(') {
        s_fail (p, "expected '(' at offset %zu, found '%c'", p->pos, p->s[p->pos]);
        return;
    }
    if (depth >= CN_FILTER_MAX_DEPTH) {
        s_fail (p, "filter nested deeper than %d levels at offset %zu",
                CN_FILTER_MAX_DEPTH, p->pos);
        return;
    }
    p->pos++;
    if (p->pos >= p->len) {
        s_fail (p, "unexpected end of filter at offset %zu", p->pos);
        return;
    }
    char c = p->s[p->pos];
    if (c == '&' || c == '|') {
        size_t at = p->pos;
        p->pos++;
        s_buf_str (&p->sql, "(");
        int n = 0;
        for (;;) {
            s_skip_ws (p);
            if (p->failed || p->pos >= p->len || p->s[p->pos] == ')')
                break;
            if (n++)
                s_buf_str (&p->sql, c == '&' ? " AND " : " OR ");
            s_filter (p, depth + 1);
        }
        if (p->failed)
            return;
        if (n == 0) {
            s_fail (p, "empty '%c' filter at offset %zu", c, at);
            return;
        }
        s_buf_str (&p->sql, ")");
    }
    else if (c == '!') {
        p->pos++;
        s_buf_str (&p->sql, "((");
        s_filter (p, depth + 1);
        s_buf_str (&p->sql, ") IS NOT TRUE)");
        s_skip_ws (p);
    }
    else
        s_item (p);
    if (p->failed)
        return;
    if (p->pos >= p->len) {
        s_fail (p, "unexpected end of filter: missing ')' at offset %zu", p->pos);
        return;
    }
    if (p->s[p->pos] != ')') {
        s_fail (p, "expected ')' at offset %zu, found '%c'", p->pos, p->s[p->pos]);
        return;
    }
    p->pos++;
}

/* --- API -------------------------------------------------------------- */

int
cn_filter_to_sql (const char *filter, const cn_mindex_t *index, size_t nindex,
                  int first_param, cn_sqlwhere_t *out, char *err, size_t errlen)
{
    s_parser_t p = { 0 };
    if (err && errlen)
        err[0] = 0;
    if (out)
        memset (out, 0, sizeof *out);
    p.err = err;
    p.errlen = errlen;
    if (!out) {
        s_fail (&p, "no output");
        return -1;
    }
    if (!filter) {
        s_fail (&p, "no filter");
        return -1;
    }
    if (first_param < 1 || first_param > 60000) {
        s_fail (&p, "first parameter number out of range");
        return -1;
    }
    p.s = filter;
    p.len = strlen (filter);
    p.index = index;
    p.nindex = index ? nindex : 0;
    p.first_param = first_param;

    s_filter (&p, 0);
    if (!p.failed) {
        s_skip_ws (&p);
        if (p.pos < p.len)
            s_fail (&p, "trailing characters after filter at offset %zu", p.pos);
    }
    if (!p.failed && p.sql.oom)
        s_fail (&p, "out of memory");
    if (p.failed) {
        for (int i = 0; i < p.nparams; i++)
            free (p.params[i]);
        free (p.params);
        free (p.sql.data);
        return -1;
    }
    out->sql = p.sql.data;
    out->params = p.params;
    out->nparams = p.nparams;
    return 0;
}

void
cn_sqlwhere_fini (cn_sqlwhere_t *w)
{
    if (!w)
        return;
    for (int i = 0; i < w->nparams; i++)
        free (w->params[i]);
    free (w->params);
    free (w->sql);
    memset (w, 0, sizeof *w);
}

char *
cn_filter_escape (const char *value)
{
    if (!value)
        return NULL;
    size_t n = 0;
    for (const char *s = value; *s; s++)
        n += strchr ("*()\\", *s) ? 3 : 1;
    char *out = malloc (n + 1);
    if (!out)
        return NULL;
    char *o = out;
    for (const char *s = value; *s; s++) {
        switch (*s) {
        case '*':  memcpy (o, "\\2a", 3); o += 3; break;
        case '(':  memcpy (o, "\\28", 3); o += 3; break;
        case ')':  memcpy (o, "\\29", 3); o += 3; break;
        case '\\': memcpy (o, "\\5c", 3); o += 3; break;
        default:   *o++ = *s;
        }
    }
    *o = 0;
    return out;
}
