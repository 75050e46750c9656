/* Unit tests: lib/cn_util.c */
#include "cn_test.h"
#include "cn_util.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static void
test_uuid (void)
{
    CHECK (cn_uuid_valid ("930896af-bf8c-48d4-885c-6573a94b1853"));
    CHECK (cn_uuid_valid ("930896AF-BF8C-48D4-885C-6573A94B1853"));
    CHECK (!cn_uuid_valid ("930896af-bf8c-48d4-885c-6573a94b185"));
    CHECK (!cn_uuid_valid ("930896af-bf8c-48d4-885c-6573a94b18534"));
    CHECK (!cn_uuid_valid ("930896afxbf8c-48d4-885c-6573a94b1853"));
    CHECK (!cn_uuid_valid ("g30896af-bf8c-48d4-885c-6573a94b1853"));
    CHECK (!cn_uuid_valid (""));
    CHECK (!cn_uuid_valid (NULL));
    char out[37];
    CHECK (cn_uuid_normalize ("930896AF-BF8C-48D4-885C-6573A94B1853", out));
    CHECK_STR (out, "930896af-bf8c-48d4-885c-6573a94b1853");
    CHECK (!cn_uuid_normalize ("nope", out));
    char a[37], b[37];
    cn_uuid_new (a);
    cn_uuid_new (b);
    CHECK (cn_uuid_valid (a));
    CHECK (strcmp (a, b) != 0);
    CHECK (a[14] == '4');
}

static void
test_crc32_etag (void)
{
    /* Known CRC32 (IEEE) values, independent of zlib. */
    CHECK_INT (cn_crc32 ("hello", 5), 0x3610a686u);
    CHECK_INT (cn_crc32 ("123456789", 9), 0xcbf43926u);
    CHECK_INT (cn_crc32 ("", 0), 0);
    char e[9];
    cn_etag ("123456789", 9, e);
    CHECK_STR (e, "CBF43926");
    cn_etag ("{}", 2, e);
    CHECK_INT (strlen (e), 8);
}

static void
test_iso8601 (void)
{
    char buf[32];
    CHECK_STR (cn_iso8601 (0, buf, sizeof buf), "1970-01-01T00:00:00.000Z");
    CHECK_STR (cn_iso8601 (1764067796123LL, buf, sizeof buf), "2025-11-25T10:49:56.123Z");
    CHECK_STR (cn_iso8601 (951782400000LL, buf, sizeof buf), "2000-02-29T00:00:00.000Z");
    CHECK_STR (cn_iso8601 (-1, buf, sizeof buf), "1969-12-31T23:59:59.999Z");
    CHECK_STR (cn_iso8601 (253402300799999LL, buf, sizeof buf), "9999-12-31T23:59:59.999Z");
    /* the hand-made calendar agrees with gmtime_r + strftime over 1900..2400,
     * in steps that land on every day of the year and every leap rule */
    int bad = 0;
    for (int64_t ms = -2208988800000LL; ms < 13569465600000LL; ms += 86400000LL * 7 + 3723004) {
        time_t t = (time_t) (ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
        struct tm tm;
        gmtime_r (&t, &tm);
        char want[40];
        size_t n = strftime (want, sizeof want, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf (want + n, sizeof want - n, ".%03dZ", (int) (((ms % 1000) + 1000) % 1000));
        if (strcmp (cn_iso8601 (ms, buf, sizeof buf), want) != 0 && bad++ < 3)
            fprintf (stderr, "cn_iso8601 (%lld): %s, want %s\n", (long long) ms, buf, want);
    }
    CHECK_INT (bad, 0);
}

static void
test_backoff (void)
{
    for (int attempt = 0; attempt < 20; attempt++) {
        int cap = 100;
        for (int i = 0; i < attempt && cap < 5000; i++)
            cap *= 2;
        if (cap > 5000)
            cap = 5000;
        for (int n = 0; n < 50; n++) {
            int v = cn_backoff_ms (attempt, 100, 5000);
            CHECK (v >= 0 && v <= cap);
        }
    }
    /* Full jitter spreads: over many draws not all equal. */
    int first = cn_backoff_ms (5, 100, 5000), differ = 0;
    for (int n = 0; n < 100; n++)
        differ |= cn_backoff_ms (5, 100, 5000) != first;
    CHECK (differ);
}

/* cn_grow: doubles from min until need fits, keeps the contents, leaves a
 * big enough buffer alone. */
static void
test_grow (void)
{
    size_t cap = 0;
    int *v = cn_grow (NULL, &cap, 1, sizeof *v, 8);
    CHECK (v != NULL);
    CHECK_INT (cap, 8);
    for (int i = 0; i < 8; i++)
        v[i] = i;
    int *same = cn_grow (v, &cap, 8, sizeof *v, 8);
    CHECK (same == v);
    CHECK_INT (cap, 8);
    v = cn_grow (v, &cap, 9, sizeof *v, 8);
    CHECK_INT (cap, 16);
    v = cn_grow (v, &cap, 100, sizeof *v, 8);
    CHECK_INT (cap, 128);
    int ok = 1;
    for (int i = 0; i < 8; i++)
        ok &= v[i] == i;
    CHECK (ok);
    free (v);
}

int
main (void)
{
    RUN (test_uuid);
    RUN (test_grow);
    RUN (test_crc32_etag);
    RUN (test_iso8601);
    RUN (test_backoff);
    return cn_test_done ();
}
