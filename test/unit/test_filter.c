/*
 * test_filter: cn_filter_to_sql golden SQL and parameters, error messages,
 * injection attempts, and garbage input (no crash, no leak: run under ASan
 * or valgrind).
 */
#include <stdint.h>
#include <stdlib.h>

#include "cn_filter.h"
#include "cn_test.h"

static const cn_mindex_t s_index[] = {
    { "hostname", CN_MIDX_STRING, false },
    { "uuid", CN_MIDX_STRING, true },
    { "setup", CN_MIDX_BOOLEAN, false },
    { "ram", CN_MIDX_NUMBER, false },
    { "Datacenter", CN_MIDX_STRING, false },
    { "user", CN_MIDX_STRING, false },     /* an SQL keyword: must be quoted */
};
#define NINDEX (sizeof s_index / sizeof s_index[0])

/* Compile and compare with the expected SQL and parameters (NULL-ended). */
static int
s_golden (const char *filter, int first, const char *sql, const char *const *params)
{
    cn_sqlwhere_t w;
    char err[256];
    int bad = 0;
    if (cn_filter_to_sql (filter, s_index, NINDEX, first, &w, err, sizeof err) != 0) {
        printf ("  filter %s: unexpected error: %s\n", filter, err);
        return 1;
    }
    if (strcmp (w.sql, sql) != 0) {
        printf ("  filter %s:\n    sql  %s\n    want %s\n", filter, w.sql, sql);
        bad = 1;
    }
    int n = 0;
    while (params[n])
        n++;
    if (w.nparams != n) {
        printf ("  filter %s: %d params, want %d\n", filter, w.nparams, n);
        bad = 1;
    }
    for (int i = 0; i < n && i < w.nparams; i++)
        if (strcmp (w.params[i], params[i]) != 0) {
            printf ("  filter %s: param %d = [%s], want [%s]\n", filter, i + 1,
                    w.params[i], params[i]);
            bad = 1;
        }
    cn_sqlwhere_fini (&w);
    CHECK (w.sql == NULL && w.params == NULL && w.nparams == 0);
    return bad;
}

#define GOLDEN(f, first, sql, ...) do { \
    const char *p_[] = { __VA_ARGS__, NULL }; \
    if (s_golden ((f), (first), (sql), p_)) { cn_test_cur_failed++; \
        printf ("  FAIL %s:%d\n", __FILE__, __LINE__); } } while (0)
#define GOLDEN0(f, first, sql) do { \
    const char *p_[] = { NULL }; \
    if (s_golden ((f), (first), (sql), p_)) { cn_test_cur_failed++; \
        printf ("  FAIL %s:%d\n", __FILE__, __LINE__); } } while (0)

/* Expect an error whose message contains `want`. */
static int
s_error (const char *filter, const char *want)
{
    cn_sqlwhere_t w;
    char err[256] = "untouched";
    int rc = cn_filter_to_sql (filter, s_index, NINDEX, 1, &w, err, sizeof err);
    if (rc == 0) {
        printf ("  filter %s: compiled to %s, want an error\n", filter, w.sql);
        cn_sqlwhere_fini (&w);
        return 1;
    }
    if (w.sql || w.params || w.nparams) {
        printf ("  filter %s: output not cleared on error\n", filter);
        return 1;
    }
    if (!strstr (err, want)) {
        printf ("  filter %s: error \"%s\", want \"%s\"\n", filter, err, want);
        return 1;
    }
    return 0;
}

#define ERROR(f, want) do { if (s_error ((f), (want))) { cn_test_cur_failed++; \
    printf ("  FAIL %s:%d\n", __FILE__, __LINE__); } } while (0)

static void
test_golden (void)
{
    GOLDEN ("(hostname=cn1)", 1, "\"hostname\" = $1", "cn1");
    GOLDEN ("(setup=true)", 1, "\"setup\" = $1::boolean", "true");
    GOLDEN ("(setup=FALSE)", 3, "\"setup\" = $3::boolean", "false");
    GOLDEN ("(&(setup=true)(hostname=cn*))", 1,
            "(\"setup\" = $1::boolean AND \"hostname\" LIKE $2)", "true", "cn%");
    GOLDEN ("(|(ram>=1024)(ram<=-2.5e3))", 1,
            "(\"ram\" >= $1::numeric OR \"ram\" <= $2::numeric)", "1024", "-2.5e3");
    GOLDEN ("(!(hostname=a))", 1, "((\"hostname\" = $1) IS NOT TRUE)", "a");
    GOLDEN0 ("(hostname=*)", 1, "\"hostname\" IS NOT NULL");
    GOLDEN0 ("(_key=*)", 1, "\"_key\" IS NOT NULL");
    GOLDEN ("(hostname=*mid*)", 1, "\"hostname\" LIKE $1", "%mid%");
    GOLDEN ("(hostname=*suf)", 1, "\"hostname\" LIKE $1", "%suf");
    GOLDEN ("(hostname=a*b*c)", 1, "\"hostname\" LIKE $1", "a%b%c");
    /* LIKE metacharacters in the value are escaped */
    GOLDEN ("(hostname=50%_off\\5c*)", 1, "\"hostname\" LIKE $1", "50\\%\\_off\\\\%");
    /* RFC 4515 escapes in an equality value: no LIKE escaping there */
    GOLDEN ("(hostname=a\\2ab\\28\\29\\5c%_)", 1, "\"hostname\" = $1", "a*b()\\%_");
    GOLDEN ("(hostname=)", 1, "\"hostname\" = $1", "");
    GOLDEN ("(_id>=42)", 1, "\"_id\" >= $1::bigint", "42");
    GOLDEN ("(_mtime<=1700000000000)", 1, "\"_mtime\" <= $1::bigint", "1700000000000");
    GOLDEN ("(_etag=ABCDEF01)", 1, "\"_etag\" = $1", "ABCDEF01");
    /* index names fold to lower-case columns; keywords are quoted */
    GOLDEN ("(datacenter=us-east-1)", 1, "\"datacenter\" = $1", "us-east-1");
    GOLDEN ("(Datacenter=x)", 1, "\"datacenter\" = $1", "x");
    GOLDEN ("(user=root)", 1, "\"user\" = $1", "root");
    /* whitespace between filters is tolerated, not inside values */
    GOLDEN (" (& (uuid=u1) (| (ram=1) (!(setup=true))) ) ", 1,
            "(\"uuid\" = $1 AND (\"ram\" = $2::numeric OR "
            "((\"setup\" = $3::boolean) IS NOT TRUE)))", "u1", "1", "true");
    GOLDEN ("(hostname= a b )", 1, "\"hostname\" = $1", " a b ");
    /* UTF-8 passes through; escaped UTF-8 bytes too */
    GOLDEN ("(hostname=h\xc3\xa9)", 1, "\"hostname\" = $1", "h\xc3\xa9");
    GOLDEN ("(hostname=h\\c3\\a9)", 1, "\"hostname\" = $1", "h\xc3\xa9");
    GOLDEN ("(&(hostname=a))", 1, "(\"hostname\" = $1)", "a");
}

static void
test_errors (void)
{
    ERROR ("", "expected '('");
    ERROR ("hostname=x", "expected '('");
    ERROR ("(hostname=x", "missing ')'");
    ERROR ("(hostname=x))", "trailing characters");
    ERROR ("(hostname=x)(ram=1)", "trailing characters");
    ERROR ("(foo=bar)", "attribute 'foo' is not indexed");
    ERROR ("(&(hostname=a)(nope=1))", "attribute 'nope' is not indexed");
    ERROR ("(ram=abc)", "invalid number 'abc' for attribute 'ram'");
    ERROR ("(ram=1.)", "invalid number");
    ERROR ("(ram=0x10)", "invalid number");
    ERROR ("(setup=yes)", "invalid boolean 'yes'");
    ERROR ("(_id=1.5)", "invalid integer");
    ERROR ("(_id=99999999999999999999)", "invalid integer");
    ERROR ("(ram=1*)", "substring match on non-string attribute 'ram'");
    ERROR ("(setup=t*)", "substring match on non-string");
    ERROR ("(hostname~=x)", "approximate match");
    ERROR ("(hostname:caseExactMatch:=x)", "extensible match");
    ERROR ("(hostname>x)", "invalid operator");
    ERROR ("(hostname)", "missing operator");
    ERROR ("(=x)", "missing attribute name");
    ERROR ("(host-name=x)", "invalid attribute name");
    ERROR ("(1host=x)", "invalid attribute name");
    ERROR ("(hostname=a(b)", "unescaped '('");
    ERROR ("(hostname>=a*)", "unescaped '*'");
    ERROR ("(hostname=\\2)", "invalid escape");
    ERROR ("(hostname=\\zz)", "invalid escape");
    ERROR ("(hostname=a\\)", "missing ')'");
    ERROR ("(hostname=\\00)", "NUL");
    ERROR ("(hostname=\\ff)", "not valid UTF-8");
    ERROR ("(hostname=\xc3)", "not valid UTF-8");
    ERROR ("(&)", "empty '&'");
    ERROR ("(|)", "empty '|'");
    ERROR ("(!)", "expected '('");
    ERROR ("(!(hostname=1)(uuid=2))", "expected ')'");
    ERROR ("(&(hostname=a)", "missing ')'");
    ERROR ("(", "unexpected end");
    ERROR ("()", "missing attribute name");

    /* NULL arguments */
    cn_sqlwhere_t w;
    char err[64];
    CHECK (cn_filter_to_sql (NULL, s_index, NINDEX, 1, &w, err, sizeof err) == -1);
    CHECK (cn_filter_to_sql ("(a=1)", NULL, 0, 1, &w, NULL, 0) == -1);
    CHECK (cn_filter_to_sql ("(_key=1)", NULL, 0, 1, &w, NULL, 0) == 0);
    cn_sqlwhere_fini (&w);
    cn_sqlwhere_fini (NULL);
    CHECK (cn_filter_to_sql ("(_key=1)", NULL, 0, 0, &w, err, sizeof err) == -1);
}

static void
test_depth (void)
{
    char f[256], buf[300];
    size_t o = 0;
    for (int i = 0; i < 31; i++)
        f[o++] = '(', f[o++] = '!';
    o += (size_t) sprintf (f + o, "(hostname=x)");
    for (int i = 0; i < 31; i++)
        f[o++] = ')';
    f[o] = 0;
    cn_sqlwhere_t w;
    char err[256];
    CHECK (cn_filter_to_sql (f, s_index, NINDEX, 1, &w, err, sizeof err) == 0);
    cn_sqlwhere_fini (&w);
    snprintf (buf, sizeof buf, "(!%s)", f);
    CHECK (s_error (buf, "nested deeper than 32") == 0);

    /* A very deep input must fail fast without recursing through it all */
    size_t n = 200000;
    char *deep = malloc (2 * n + 20);
    o = 0;
    for (size_t i = 0; i < n; i++)
        deep[o++] = '(', deep[o++] = '&';
    deep[o] = 0;
    CHECK (s_error (deep, "nested deeper") == 0);
    free (deep);
}

static void
test_injection (void)
{
    const char *attacks[] = {
        "(hostname=x'\\29; DROP TABLE x;--)",
        "(hostname=x\" OR 1=1 --)",
        "(hostname=$1)",
        "(hostname=*'; DELETE FROM cnapi_servers; --*)",
        "(hostname=\\27\\3b DROP TABLE x)",
    };
    for (size_t i = 0; i < sizeof attacks / sizeof attacks[0]; i++) {
        cn_sqlwhere_t w;
        char err[256];
        int rc = cn_filter_to_sql (attacks[i], s_index, NINDEX, 1, &w, err, sizeof err);
        CHECK (rc == 0);
        if (rc != 0)
            continue;
        /* the SQL is a column, an operator and $1: nothing from the value */
        CHECK (strcmp (w.sql, "\"hostname\" = $1") == 0
               || strcmp (w.sql, "\"hostname\" LIKE $1") == 0);
        CHECK_INT (w.nparams, 1);
        CHECK (strchr (w.sql, '\'') == NULL && strchr (w.sql, ';') == NULL);
        cn_sqlwhere_fini (&w);
    }
    GOLDEN ("(hostname=x'\\29; DROP TABLE x;--)", 1, "\"hostname\" = $1",
            "x'); DROP TABLE x;--");
    /* unescaped, the ')' ends the value: the rest is a syntax error, never SQL */
    ERROR ("(hostname=x'); DROP TABLE x;--)", "trailing characters");
    /* an attribute can't smuggle SQL: it must be an indexed name */
    ERROR ("(hostname;DROP=x)", "invalid attribute name");
    ERROR ("(\"hostname\"=x)", "invalid attribute name");
}

static void
test_escape (void)
{
    char *e = cn_filter_escape ("a*b(c)d\\e");
    CHECK_STR (e, "a\\2ab\\28c\\29d\\5ce");
    /* round trip: the escaped value compiles to an equality on itself */
    char f[256];
    snprintf (f, sizeof f, "(hostname=%s)", e);
    GOLDEN (f, 1, "\"hostname\" = $1", "a*b(c)d\\e");
    free (e);
    e = cn_filter_escape ("");
    CHECK_STR (e, "");
    free (e);
    CHECK (cn_filter_escape (NULL) == NULL);
}

/* xorshift: deterministic garbage */
static uint64_t s_rng = 0x9e3779b97f4a7c15ULL;
static uint64_t
s_rand (void)
{
    s_rng ^= s_rng << 13;
    s_rng ^= s_rng >> 7;
    s_rng ^= s_rng << 17;
    return s_rng;
}

static void
test_garbage (void)
{
    const char alphabet[] = "()&|!=*<>~:\\ 0123456789abcdefhostnamerupstu_\xc3\xa9\x80";
    char buf[256];
    int ok = 0, errs = 0;
    for (int round = 0; round < 200000; round++) {
        size_t n = s_rand () % (sizeof buf - 1);
        for (size_t i = 0; i < n; i++) {
            uint64_t r = s_rand ();
            buf[i] = (r & 0x100) ? (char) (1 + (r & 0xff) % 255)
                                 : alphabet[r % (sizeof alphabet - 1)];
        }
        buf[n] = 0;
        cn_sqlwhere_t w;
        char err[128];
        if (cn_filter_to_sql (buf, s_index, NINDEX, 1 + (int) (s_rand () % 5), &w,
                              err, sizeof err) == 0) {
            ok++;
            CHECK (w.sql != NULL);
            cn_sqlwhere_fini (&w);
        }
        else {
            errs++;
            CHECK (err[0] != 0);
        }
    }
    /* mutate valid filters: mostly errors, some still valid */
    const char *seeds[] = {
        "(&(setup=true)(hostname=cn*))", "(|(ram>=1024)(!(uuid=a\\2a)))",
        "(&(|(hostname=*x*)(_key=*))(_id<=5))"
    };
    for (int round = 0; round < 100000; round++) {
        const char *s = seeds[s_rand () % 3];
        size_t n = strlen (s);
        memcpy (buf, s, n + 1);
        int muts = 1 + (int) (s_rand () % 3);
        for (int k = 0; k < muts; k++) {
            size_t at = s_rand () % n;
            buf[at] = alphabet[s_rand () % (sizeof alphabet - 1)];
        }
        if (s_rand () % 4 == 0)
            buf[s_rand () % n] = 0;
        cn_sqlwhere_t w;
        char err[8];      /* tiny: messages are truncated, never overflow */
        if (cn_filter_to_sql (buf, s_index, NINDEX, 1, &w, err, sizeof err) == 0) {
            ok++;
            cn_sqlwhere_fini (&w);
        }
        else
            errs++;
    }
    printf ("  garbage: %d compiled, %d rejected\n", ok, errs);
    CHECK (errs > 0);
}

int
main (void)
{
    RUN (test_golden);
    RUN (test_errors);
    RUN (test_depth);
    RUN (test_injection);
    RUN (test_escape);
    RUN (test_garbage);
    return cn_test_done ();
}
