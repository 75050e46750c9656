/*
 * cn_sysinfo: a server's sysinfo kept as the text it came as, with a small
 * tree of the members a server record is derived from.
 *
 * The state writer handles thousands of ~3 KB sysinfo documents a second and
 * needs only ~17 of their members (docs/server-record.md): the rest is
 * stored as it came. A full jansson tree per message (parse, compare, copy,
 * free) was most of its CPU. cn_sysinfo_load checks the text in one pass
 * without building a tree (full JSON grammar, UTF-8, duplicate keys, the
 * same verdicts and messages as cn_sysinfo_parse), parses only the members
 * records derive from into summary, and computes a hash under which
 * JSON-equal documents are equal (object members in any order, escapes
 * decoded), so two sysinfo are compared by their bytes, then by their hash,
 * and only when both fail to decide by parsing both.
 *
 * A cn_sysinfo_t is immutable and reference counted (one thread at a time).
 */
#ifndef CN_SYSINFO_H
#define CN_SYSINFO_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_SYSINFO_NSUMMARY 17    /* members a record derives from */

typedef struct {
    int refs;
    char *text;               /* the JSON text, NUL-terminated */
    size_t len;
    bool hashed;              /* hash is valid (the fast scan accepted text) */
    uint64_t hash;
    json_t *summary;          /* object of the derived-from members; NULL when
                                 the sysinfo is not an object */
    /* where each derived-from member's value is in text (in the order of
     * cn_sysinfo.c's list; len 0: absent, or not known when !hashed) */
    struct { uint32_t off, len; } span[CN_SYSINFO_NSUMMARY];
} cn_sysinfo_t;

/* Check a sysinfo as received (same rules, verdicts and messages as
 * cn_sysinfo_parse in cn_server.h). 0 with *out set (the text copied), or -1
 * with err filled and *out NULL. */
int cn_sysinfo_load (const char *body, size_t len, const char *expect_uuid,
                     cn_sysinfo_t **out, char *err, size_t errlen);
/* The same, with the server's previous sysinfo at hand (like, may be NULL):
 * summary members whose text is byte for byte like's are shared with like's
 * summary instead of parsed again (an agent resends mostly the same). */
int cn_sysinfo_load_like (const char *body, size_t len, const char *expect_uuid,
                          const cn_sysinfo_t *like, cn_sysinfo_t **out, char *err,
                          size_t errlen);

/* From a parsed value (e.g. a stored record's "sysinfo"), which may be any
 * JSON value; no checks. NULL only when out of memory. */
cn_sysinfo_t *cn_sysinfo_from_json (const json_t *value);

/* The value as a tree (a full parse); NULL when out of memory. */
json_t *cn_sysinfo_tree (const cn_sysinfo_t *si);

cn_sysinfo_t *cn_sysinfo_ref (cn_sysinfo_t *si);
/* Drop a reference; NULLs *p (idempotent). */
void cn_sysinfo_unref (cn_sysinfo_t **p);

/* JSON-equal (jansson's json_equal on the two trees). NULL equals only NULL. */
bool cn_sysinfo_equal (const cn_sysinfo_t *a, const cn_sysinfo_t *b);

/* The hash of a JSON text as cn_sysinfo_t keeps it; false when the fast scan
 * does not accept the text (then compare by parsing). For tests. */
bool cn_sysinfo_hash_text (const char *text, size_t len, uint64_t *hash);

#endif
