/*
 * cn_msg: the msgpack envelope. See include/cn_msg.h and proto/README.md.
 */
#include <assert.h>
#include "cn_msg.h"

#include <stdlib.h>
#include <string.h>

static void
s_pack_str (msgpack_packer *pk, const char *s, size_t len)
{
    msgpack_pack_str (pk, len);
    msgpack_pack_str_body (pk, s, len);
}

void
cn_msgw_init (cn_msgw_t *w, const char *type, uint32_t nfields)
{
    msgpack_sbuffer_init (&w->sbuf);
    msgpack_packer_init (&w->pk, &w->sbuf, msgpack_sbuffer_write);
    w->want = nfields;
    w->have = 0;
    msgpack_pack_map (&w->pk, nfields + 2);
    s_pack_str (&w->pk, "v", 1);
    msgpack_pack_uint32 (&w->pk, CN_MSG_VERSION);
    s_pack_str (&w->pk, "type", 4);
    s_pack_str (&w->pk, type, strlen (type));
}

void
cn_msgw_key (cn_msgw_t *w, const char *key)
{
    w->have++;
    s_pack_str (&w->pk, key, strlen (key));
}

void
cn_msgw_str (cn_msgw_t *w, const char *key, const char *val)
{
    cn_msgw_key (w, key);
    if (val)
        s_pack_str (&w->pk, val, strlen (val));
    else
        msgpack_pack_nil (&w->pk);
}

void
cn_msgw_strn (cn_msgw_t *w, const char *key, const char *val, size_t len)
{
    cn_msgw_key (w, key);
    s_pack_str (&w->pk, val ? val : "", val ? len : 0);
}

void
cn_msgw_int (cn_msgw_t *w, const char *key, int64_t val)
{
    cn_msgw_key (w, key);
    msgpack_pack_int64 (&w->pk, val);
}

void
cn_msgw_uint (cn_msgw_t *w, const char *key, uint64_t val)
{
    cn_msgw_key (w, key);
    msgpack_pack_uint64 (&w->pk, val);
}

void
cn_msgw_bool (cn_msgw_t *w, const char *key, bool val)
{
    cn_msgw_key (w, key);
    if (val)
        msgpack_pack_true (&w->pk);
    else
        msgpack_pack_false (&w->pk);
}

void
cn_msgw_double (cn_msgw_t *w, const char *key, double val)
{
    cn_msgw_key (w, key);
    msgpack_pack_double (&w->pk, val);
}

void
cn_msgw_nil (cn_msgw_t *w, const char *key)
{
    cn_msgw_key (w, key);
    msgpack_pack_nil (&w->pk);
}

void
cn_msgpack_json (msgpack_packer *pk, const json_t *val)
{
    switch (val ? json_typeof (val) : JSON_NULL) {
        case JSON_OBJECT: {
            msgpack_pack_map (pk, json_object_size (val));
            const char *k;
            json_t *v;
            json_object_foreach ((json_t *) val, k, v) {
                s_pack_str (pk, k, strlen (k));
                cn_msgpack_json (pk, v);
            }
            break;
        }
        case JSON_ARRAY: {
            msgpack_pack_array (pk, json_array_size (val));
            size_t i;
            json_t *v;
            json_array_foreach (val, i, v)
                cn_msgpack_json (pk, v);
            break;
        }
        case JSON_STRING:
            s_pack_str (pk, json_string_value (val), json_string_length (val));
            break;
        case JSON_INTEGER:
            msgpack_pack_int64 (pk, json_integer_value (val));
            break;
        case JSON_REAL:
            msgpack_pack_double (pk, json_real_value (val));
            break;
        case JSON_TRUE:
            msgpack_pack_true (pk);
            break;
        case JSON_FALSE:
            msgpack_pack_false (pk);
            break;
        case JSON_NULL:
        default:
            msgpack_pack_nil (pk);
            break;
    }
}

void
cn_msgw_json (cn_msgw_t *w, const char *key, const json_t *val)
{
    cn_msgw_key (w, key);
    cn_msgpack_json (&w->pk, val);
}

zframe_t *
cn_msgw_frame (cn_msgw_t *w)
{
    /* a map that promises more or fewer pairs than it holds is unreadable */
    assert (w->have == w->want);
    zframe_t *f = zframe_new (w->sbuf.data, w->sbuf.size);
    msgpack_sbuffer_destroy (&w->sbuf);
    msgpack_sbuffer_init (&w->sbuf);
    return f;
}

void
cn_msgw_take (cn_msgw_t *w, char **data, size_t *size)
{
    assert (w->have == w->want);
    *size = w->sbuf.size;
    *data = msgpack_sbuffer_release (&w->sbuf);
    if (!*data) {
        *data = malloc (1);
        *size = 0;
    }
}

void
cn_msgw_fini (cn_msgw_t *w)
{
    msgpack_sbuffer_destroy (&w->sbuf);
    msgpack_sbuffer_init (&w->sbuf);
}

json_t *
cn_msgpack_to_json (const msgpack_object *o)
{
    switch (o->type) {
        case MSGPACK_OBJECT_NIL: return json_null ();
        case MSGPACK_OBJECT_BOOLEAN: return json_boolean (o->via.boolean);
        case MSGPACK_OBJECT_POSITIVE_INTEGER:
            return json_integer ((json_int_t) o->via.u64);
        case MSGPACK_OBJECT_NEGATIVE_INTEGER: return json_integer (o->via.i64);
        /* Peers (agents) choose these bytes: what JSON cannot hold (a
         * non-finite number, a string or bin that is not UTF-8) becomes null.
         * An unchecked string would make every later json_dumps of the tree
         * fail (cnapid aborted on such a hello). */
        case MSGPACK_OBJECT_FLOAT32:
        case MSGPACK_OBJECT_FLOAT64: {
            json_t *r = json_real (o->via.f64);
            return r ? r : json_null ();
        }
        case MSGPACK_OBJECT_STR:
        case MSGPACK_OBJECT_BIN: {
            const char *p = o->type == MSGPACK_OBJECT_STR ? o->via.str.ptr : o->via.bin.ptr;
            size_t n = o->type == MSGPACK_OBJECT_STR ? o->via.str.size : o->via.bin.size;
            json_t *s = json_stringn (p, n);
            return s ? s : json_null ();
        }
        case MSGPACK_OBJECT_ARRAY: {
            json_t *a = json_array ();
            for (uint32_t i = 0; i < o->via.array.size; i++)
                json_array_append_new (a, cn_msgpack_to_json (&o->via.array.ptr[i]));
            return a;
        }
        case MSGPACK_OBJECT_MAP: {
            json_t *m = json_object ();
            for (uint32_t i = 0; i < o->via.map.size; i++) {
                const msgpack_object *k = &o->via.map.ptr[i].key;
                char key[256];
                if (k->type == MSGPACK_OBJECT_STR) {
                    size_t n = k->via.str.size < sizeof key - 1 ? k->via.str.size : sizeof key - 1;
                    memcpy (key, k->via.str.ptr, n);
                    key[n] = '\0';
                }
                else
                    snprintf (key, sizeof key, "?");
                json_object_set_new (m, key, cn_msgpack_to_json (&o->via.map.ptr[i].val));
            }
            return m;
        }
        default: return json_null ();
    }
}

static bool
s_key_is (const msgpack_object *k, const char *key, size_t klen)
{
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == klen
           && memcmp (k->via.str.ptr, key, klen) == 0;
}

const msgpack_object *
cn_msg_get (const cn_msg_t *m, const char *key)
{
    size_t klen = strlen (key);
    const msgpack_object_map *map = &m->map->via.map;
    for (uint32_t i = 0; i < map->size; i++)
        if (s_key_is (&map->ptr[i].key, key, klen))
            return &map->ptr[i].val;
    return NULL;
}

int
cn_msg_parse (cn_msg_t *m, const void *data, size_t size, char *err, size_t errlen)
{
    memset (m, 0, sizeof *m);
    msgpack_unpacked_init (&m->up);
    size_t off = 0;
    msgpack_unpack_return rc = msgpack_unpack_next (&m->up, data, size, &off);
    const char *why = NULL;
    if (rc != MSGPACK_UNPACK_SUCCESS)
        why = "not a msgpack value";
    else if (off != size)
        why = "trailing bytes after the message";
    else if (m->up.data.type != MSGPACK_OBJECT_MAP)
        why = "message is not a map";
    if (!why) {
        m->map = &m->up.data;
        const msgpack_object *v = cn_msg_get (m, "v");
        const msgpack_object *t = cn_msg_get (m, "type");
        if (!v || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            why = "message has no version";
        else if (v->via.u64 != CN_MSG_VERSION)
            why = "unsupported message version";
        else if (!t || t->type != MSGPACK_OBJECT_STR)
            why = "message has no type";
        else {
            m->version = (int64_t) v->via.u64;
            m->type = t->via.str.ptr;
            m->type_len = t->via.str.size;
        }
    }
    if (why) {
        if (err && errlen)
            snprintf (err, errlen, "%s", why);
        msgpack_unpacked_destroy (&m->up);
        memset (m, 0, sizeof *m);
        return -1;
    }
    return 0;
}

void
cn_msg_fini (cn_msg_t *m)
{
    if (m->map) {
        msgpack_unpacked_destroy (&m->up);
        memset (m, 0, sizeof *m);
    }
}

bool
cn_msg_is (const cn_msg_t *m, const char *type)
{
    size_t n = strlen (type);
    return m->type && m->type_len == n && memcmp (m->type, type, n) == 0;
}

const char *
cn_msg_str (const cn_msg_t *m, const char *key, size_t *len)
{
    const msgpack_object *o = cn_msg_get (m, key);
    if (o && o->type == MSGPACK_OBJECT_STR) {
        if (len)
            *len = o->via.str.size;
        return o->via.str.ptr;
    }
    if (o && o->type == MSGPACK_OBJECT_BIN) {
        if (len)
            *len = o->via.bin.size;
        return o->via.bin.ptr;
    }
    return NULL;
}

char *
cn_msg_strdup (const cn_msg_t *m, const char *key)
{
    size_t len;
    const char *s = cn_msg_str (m, key, &len);
    if (!s)
        return NULL;
    char *out = malloc (len + 1);
    if (!out)
        return NULL;
    memcpy (out, s, len);
    out[len] = '\0';
    return out;
}

bool
cn_msg_int (const cn_msg_t *m, const char *key, int64_t *out)
{
    const msgpack_object *o = cn_msg_get (m, key);
    if (!o)
        return false;
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return true;
    }
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) {
        *out = (int64_t) o->via.u64;
        return true;
    }
    return false;
}

bool
cn_msg_uint (const cn_msg_t *m, const char *key, uint64_t *out)
{
    const msgpack_object *o = cn_msg_get (m, key);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return false;
    *out = o->via.u64;
    return true;
}

bool
cn_msg_bool (const cn_msg_t *m, const char *key, bool *out)
{
    const msgpack_object *o = cn_msg_get (m, key);
    if (!o || o->type != MSGPACK_OBJECT_BOOLEAN)
        return false;
    *out = o->via.boolean;
    return true;
}

bool
cn_msg_double (const cn_msg_t *m, const char *key, double *out)
{
    const msgpack_object *o = cn_msg_get (m, key);
    if (!o)
        return false;
    switch (o->type) {
        case MSGPACK_OBJECT_FLOAT32:
        case MSGPACK_OBJECT_FLOAT64: *out = o->via.f64; return true;
        case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double) o->via.u64; return true;
        case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double) o->via.i64; return true;
        default: return false;
    }
}

/* ---- the heartbeat --------------------------------------------------- */

static const uint8_t s_hb_head[] = { 0x84, 0xa1, 'v', CN_MSG_VERSION, 0xa4, 't', 'y', 'p', 'e',
                                     0xa2, 'h', 'b', 0xa3, 's', 'e', 'q' };
static const uint8_t s_hb_mid[] = { 0xa7, 's', 'e', 'n', 't', '_', 'm', 's' };

typedef struct {
    uint8_t *p;
    size_t n, cap;
} s_fixed_t;

static int
s_fixed_write (void *data, const char *buf, size_t len)
{
    s_fixed_t *f = data;
    if (f->n + len > f->cap)
        return -1;
    memcpy (f->p + f->n, buf, len);
    f->n += len;
    return 0;
}

size_t
cn_msg_hb_write (uint8_t *out, uint64_t seq, int64_t sent_ms)
{
    s_fixed_t f = { out, 0, CN_MSG_HB_MAX };
    msgpack_packer pk;
    msgpack_packer_init (&pk, &f, s_fixed_write);
    (void) s_fixed_write (&f, (const char *) s_hb_head, sizeof s_hb_head);
    msgpack_pack_uint64 (&pk, seq);
    (void) s_fixed_write (&f, (const char *) s_hb_mid, sizeof s_hb_mid);
    msgpack_pack_int64 (&pk, sent_ms);
    return f.n;
}

/* A msgpack unsigned integer at p (any width): the byte after it, or NULL. */
static const uint8_t *
s_mp_uint (const uint8_t *p, const uint8_t *e)
{
    if (p >= e)
        return NULL;
    size_t w = *p <= 0x7f ? 0 : *p == 0xcc ? 1 : *p == 0xcd ? 2 : *p == 0xce ? 4 : *p == 0xcf ? 8 : 99;
    return w != 99 && (size_t) (e - p) > w ? p + 1 + w : NULL;
}

bool
cn_msg_is_plain_hb (const void *data, size_t len)
{
    const uint8_t *p = data, *e = p + len;
    if (!data || len < sizeof s_hb_head || memcmp (p, s_hb_head, sizeof s_hb_head) != 0)
        return false;
    p = s_mp_uint (p + sizeof s_hb_head, e);
    if (!p || (size_t) (e - p) < sizeof s_hb_mid || memcmp (p, s_hb_mid, sizeof s_hb_mid) != 0)
        return false;
    p = s_mp_uint (p + sizeof s_hb_mid, e);
    return p == e;
}
