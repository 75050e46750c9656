/*
 * cn_msg: the msgpack envelope every actor message uses.
 *
 * A message is one msgpack map: {"v": 1, "type": "<type>", ...fields}.
 * Decoders reject a message that is not a map, has no string "type", or whose
 * major version "v" is not CN_MSG_VERSION; unknown keys are ignored.
 * Each type is documented in proto/<type>.md.
 *
 *   cn_msgw_t w;
 *   cn_msgw_init (&w, "sysinfo", 3);          // 3 fields after v and type
 *   cn_msgw_uint (&w, "tag", 42);
 *   cn_msgw_str  (&w, "uuid", uuid);
 *   cn_msgw_strn (&w, "sysinfo", body, len);
 *   zframe_t *f = cn_msgw_frame (&w);          // w is empty again
 *
 *   cn_msg_t m;
 *   if (cn_msg_parse (&m, zframe_data (f), zframe_size (f), err, sizeof err) == 0) {
 *       if (cn_msg_is (&m, "sysinfo")) { uint64_t tag; cn_msg_uint (&m, "tag", &tag); ... }
 *       cn_msg_fini (&m);
 *   }
 */
#ifndef CN_MSG_H
#define CN_MSG_H

#include <czmq.h>
#include <jansson.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stdint.h>

#define CN_MSG_VERSION 1

typedef struct {
    msgpack_sbuffer sbuf;
    msgpack_packer pk;
    uint32_t want, have;      /* fields declared at init, keys written (asserted equal) */
} cn_msgw_t;

/* Start a message of `type` that will hold nfields more key/value pairs. */
void cn_msgw_init (cn_msgw_t *w, const char *type, uint32_t nfields);
void cn_msgw_str (cn_msgw_t *w, const char *key, const char *val);   /* NULL -> nil */
void cn_msgw_strn (cn_msgw_t *w, const char *key, const char *val, size_t len);
void cn_msgw_int (cn_msgw_t *w, const char *key, int64_t val);
void cn_msgw_uint (cn_msgw_t *w, const char *key, uint64_t val);
void cn_msgw_bool (cn_msgw_t *w, const char *key, bool val);
void cn_msgw_double (cn_msgw_t *w, const char *key, double val);
void cn_msgw_nil (cn_msgw_t *w, const char *key);
/* A jansson value as msgpack (objects -> maps, arrays -> arrays). */
void cn_msgw_json (cn_msgw_t *w, const char *key, const json_t *val);
/* Write just the key; the caller packs the value with msgpack_pack_* on &w->pk. */
void cn_msgw_key (cn_msgw_t *w, const char *key);
/* Hand the bytes over as a frame (w is left empty and may be reused with init). */
zframe_t *cn_msgw_frame (cn_msgw_t *w);
/* Hand the bytes over as malloc'd memory; caller frees. */
void cn_msgw_take (cn_msgw_t *w, char **data, size_t *size);
/* Free without sending. */
void cn_msgw_fini (cn_msgw_t *w);

/* Pack a jansson value on any packer. */
void cn_msgpack_json (msgpack_packer *pk, const json_t *val);
/* Convert a msgpack object to jansson (new reference). */
json_t *cn_msgpack_to_json (const msgpack_object *o);

/* The heartbeat, the one message every session carries every second, both
 * ways, without allocations. cn_msg_hb_write writes exactly the bytes
 * cn_msgw writes for {"v", "type": "hb", "seq", "sent_ms"} into out
 * (CN_MSG_HB_MAX bytes) and returns the length. cn_msg_is_plain_hb is true
 * for exactly that layout, one valid hb (sent_ms >= 0); an hb written any
 * other way still goes through cn_msg_parse, which applies the same rules. */
#define CN_MSG_HB_MAX 48
size_t cn_msg_hb_write (uint8_t *out, uint64_t seq, int64_t sent_ms);
bool cn_msg_is_plain_hb (const void *data, size_t len);

typedef struct {
    msgpack_unpacked up;
    const msgpack_object *map;
    const char *type;
    size_t type_len;
    int64_t version;
} cn_msg_t;

/* Parse one message; 0 on success, -1 with err filled (m needs no fini then). */
int cn_msg_parse (cn_msg_t *m, const void *data, size_t size, char *err, size_t errlen);
void cn_msg_fini (cn_msg_t *m);
bool cn_msg_is (const cn_msg_t *m, const char *type);
/* The value of key, or NULL when absent. */
const msgpack_object *cn_msg_get (const cn_msg_t *m, const char *key);
/* String value (not NUL-terminated; points into the message) or NULL. */
const char *cn_msg_str (const cn_msg_t *m, const char *key, size_t *len);
/* String value as a fresh NUL-terminated copy, or NULL. */
char *cn_msg_strdup (const cn_msg_t *m, const char *key);
/* Typed getters: true when present and of a compatible type. */
bool cn_msg_int (const cn_msg_t *m, const char *key, int64_t *out);
bool cn_msg_uint (const cn_msg_t *m, const char *key, uint64_t *out);
bool cn_msg_bool (const cn_msg_t *m, const char *key, bool *out);
bool cn_msg_double (const cn_msg_t *m, const char *key, double *out);

#endif
