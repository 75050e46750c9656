/*
 * cn_json: small helpers over JSON text that avoid building a tree.
 *
 * A server record is ~4 KB of which ~3 KB is its sysinfo; most reads (the
 * server list) do not show sysinfo. These helpers find a top-level member in
 * the text so the rest can be parsed without it.
 */
#ifndef CN_JSON_H
#define CN_JSON_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

/* Find the top-level member "key" of the JSON object in text[0..len). On
 * success *start..*end spans the member together with one adjacent comma, so
 * that removing it leaves a valid object, and *vstart..*vend spans its value.
 * False when text is not an object, is malformed, or has no such member. */
bool cn_json_member_span (const char *text, size_t len, const char *key, size_t *start,
                          size_t *end, size_t *vstart, size_t *vend);

/* Parse the object in text without its top-level member "key" (a plain parse
 * when there is no such member). NULL on malformed JSON or a non-object. */
json_t *cn_json_load_without (const char *text, size_t len, const char *key);

/* Pieces of a validating scanner over [p, e) (RFC 8259, UTF-8 checked).
 * Whitespace: the first byte after it. */
const unsigned char *cn_json_scan_ws (const unsigned char *p, const unsigned char *e);
/* A string at p (*p == '"'): the byte after its closing quote, NULL if invalid
 * (bad UTF-8, control character, bad escape, lone surrogate). *esc: it holds
 * escapes (\u0000 included: callers that refuse NUL must decode). */
const unsigned char *cn_json_scan_string (const unsigned char *p, const unsigned char *e,
                                          bool *esc);
/* A number at p: the byte after it, NULL if invalid. *integer: no fraction
 * and no exponent. */
const unsigned char *cn_json_scan_number (const unsigned char *p, const unsigned char *e,
                                          bool *integer);
/* Decode a string's span [p, e) (between the quotes, already validated): a
 * fresh NUL-terminated string, NULL if it holds \u0000 or on OOM. */
char *cn_json_unescape (const unsigned char *p, const unsigned char *e);

#endif
