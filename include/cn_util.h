/*
 * cn_util: small helpers shared by every module.
 */
#ifndef CN_UTIL_H
#define CN_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Wall clock in milliseconds since the epoch. */
int64_t cn_now_ms (void);
/* Monotonic clock in microseconds (for durations). */
int64_t cn_mono_us (void);
/* ISO 8601 UTC with milliseconds, e.g. 2026-11-25T10:49:56.123Z; buf >= 25. */
char *cn_iso8601 (int64_t ms, char *buf, size_t len);
/* Parse cn_iso8601's format back to ms ("YYYY-MM-DDTHH:MM:SS[.mmm]Z", any
 * number of fraction digits, the first three count); false (out unchanged)
 * when s is NULL or not that. */
bool cn_iso8601_to_ms (const char *s, int64_t *out);

/* True when s is a canonical 36-character UUID (hex, either case). */
bool cn_uuid_valid (const char *s);
/* Lower-case copy of a valid UUID into out[37]; false when s is not a UUID. */
bool cn_uuid_normalize (const char *s, char out[37]);
/* A fresh random (v4) UUID, lower case, into out[37]. */
void cn_uuid_new (char out[37]);

/* Room for at least `need` elements of `elem` bytes in p, whose capacity
 * (in elements) is *cap: returns p, or p reallocated to a capacity doubled
 * from `min` until it holds need (*cap updated). Aborts on out of memory. */
void *cn_grow (void *p, size_t *cap, size_t need, size_t elem, size_t min);

/* CRC32 (IEEE, as zlib) of data, as Moray computes its _etag. */
uint32_t cn_crc32 (const void *data, size_t len);
/* The etag of a value: CRC32 as 8 upper-case hex digits, out[9]. */
void cn_etag (const char *value, size_t len, char out[9]);

/* Backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)] ms. */
int cn_backoff_ms (int attempt, int base_ms, int cap_ms);

#endif
