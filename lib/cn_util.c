/* cn_util: see include/cn_util.h. */
#include "cn_util.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <zlib.h>

int64_t
cn_now_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t
cn_mono_us (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

char *
cn_iso8601 (int64_t ms, char *buf, size_t len)
{
    /* No gmtime_r: glibc takes its timezone lock for it, and the gateway
     * formats a timestamp per response. Days to civil date after Howard
     * Hinnant's "chrono-compatible low-level date algorithms". */
    int64_t secs = ms / 1000;
    int millis = (int) (ms % 1000);
    if (millis < 0) {
        millis += 1000;
        secs -= 1;
    }
    int64_t days = secs / 86400;
    int64_t sod = secs % 86400;
    if (sod < 0) {
        sod += 86400;
        days -= 1;
    }
    int64_t z = days + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int day = (int) (doy - (153 * mp + 2) / 5 + 1);
    int month = (int) (mp < 10 ? mp + 3 : mp - 9);
    int64_t year = yoe + era * 400 + (month <= 2);
    if (year < 0 || year > 9999 || len < 25) {
        snprintf (buf, len, "%04" PRId64 "-%02d-%02dT%02d:%02d:%02d.%03dZ", year, month, day,
                  (int) (sod / 3600), (int) (sod / 60 % 60), (int) (sod % 60), millis);
        return buf;
    }
    int f[7] = { (int) year, month, day, (int) (sod / 3600), (int) (sod / 60 % 60),
                 (int) (sod % 60), millis };
    static const char seps[7] = { '-', '-', 'T', ':', ':', '.', 'Z' };
    static const int widths[7] = { 4, 2, 2, 2, 2, 2, 3 };
    char *o = buf;
    for (int i = 0; i < 7; i++) {
        for (int k = widths[i] - 1; k >= 0; k--) {
            o[k] = (char) ('0' + f[i] % 10);
            f[i] /= 10;
        }
        o += widths[i];
        *o++ = seps[i];
    }
    *o = 0;
    return buf;
}

bool
cn_iso8601_to_ms (const char *s, int64_t *out)
{
    struct tm tm;
    memset (&tm, 0, sizeof tm);
    int ms = 0, n = 0;
    if (!s || sscanf (s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
                      &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6)
        return false;
    const char *p = s + n;
    if (*p == '.') {
        p++;
        int digits = 0;
        while (isdigit ((unsigned char) *p)) {
            if (digits < 3)
                ms = ms * 10 + (*p - '0');
            digits++;
            p++;
        }
        for (; digits < 3; digits++)
            ms *= 10;
    }
    if (strcmp (p, "Z") != 0)
        return false;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    *out = (int64_t) timegm (&tm) * 1000 + ms;
    return true;
}

bool
cn_uuid_valid (const char *s)
{
    if (!s)
        return false;
    for (int i = 0; i < 36; i++) {
        char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return false;
        }
        else if (!isxdigit ((unsigned char) c))
            return false;
    }
    return s[36] == '\0';
}

bool
cn_uuid_normalize (const char *s, char out[37])
{
    if (!cn_uuid_valid (s))
        return false;
    for (int i = 0; i < 36; i++)
        out[i] = (char) tolower ((unsigned char) s[i]);
    out[36] = '\0';
    return true;
}

void
cn_uuid_new (char out[37])
{
    unsigned char b[16];
    if (getrandom (b, sizeof b, 0) != (ssize_t) sizeof b) {
        /* getrandom on Linux does not fail for 16 bytes once the pool is up;
         * fall back to rand() mixed with time rather than abort. */
        for (size_t i = 0; i < sizeof b; i++)
            b[i] = (unsigned char) (rand () ^ (cn_mono_us () >> (i % 8)));
    }
    b[6] = (unsigned char) ((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char) ((b[8] & 0x3f) | 0x80);
    snprintf (out, 37,
              "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
              b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
              b[12], b[13], b[14], b[15]);
}

void *
cn_grow (void *p, size_t *cap, size_t need, size_t elem, size_t min)
{
    if (need <= *cap)
        return p;
    size_t c = *cap ? *cap * 2 : min;
    while (c < need)
        c *= 2;
    void *q = realloc (p, c * elem);
    if (!q)
        abort ();
    *cap = c;
    return q;
}

uint32_t
cn_crc32 (const void *data, size_t len)
{
    uLong crc = crc32 (0L, Z_NULL, 0);
    const Bytef *p = data;
    /* zlib's length is uInt: feed large buffers in pieces. */
    while (len > 0) {
        uInt n = len > 0x40000000u ? 0x40000000u : (uInt) len;
        crc = crc32 (crc, p, n);
        p += n;
        len -= n;
    }
    return (uint32_t) crc;
}

void
cn_etag (const char *value, size_t len, char out[9])
{
    snprintf (out, 9, "%08X", cn_crc32 (value, len));
}

int
cn_backoff_ms (int attempt, int base_ms, int cap_ms)
{
    if (attempt < 0)
        attempt = 0;
    long long ceiling = base_ms;
    for (int i = 0; i < attempt && ceiling < cap_ms; i++)
        ceiling *= 2;
    if (ceiling > cap_ms)
        ceiling = cap_ms;
    uint32_t r;
    if (getrandom (&r, sizeof r, GRND_NONBLOCK) != (ssize_t) sizeof r)
        r = (uint32_t) rand ();
    return (int) (r % (uint32_t) (ceiling + 1));
}
