/*
 * cn_conftab: a configuration struct loaded from a table of keys.
 *
 * One table names every key once: its JSON path ("http.port"), its type, where
 * it lives in the struct, its default and (for integers) its bounds. Loading
 * walks the table three times: defaults, the JSON file, the environment; so
 * adding a key is adding one row. The environment variable of a key is the
 * table's prefix plus the path upper-cased with '.' as '_' (prefix "CNAPI_":
 * http.port -> CNAPI_HTTP_PORT); the environment wins.
 *
 * Used by cn_config (cnapid, CNAPI_*) and cn_agent_config (the agent,
 * CNAPI_AGENT_*).
 */
#ifndef CN_CONFTAB_H
#define CN_CONFTAB_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

typedef enum { CN_CONF_STR, CN_CONF_INT } cn_conf_kind_t;

typedef struct {
    const char *path;           /* "http.port" */
    cn_conf_kind_t kind;
    size_t offset;              /* of the char * or the int in the struct */
    const char *def_str;
    int def_int, min, max;
    bool secret;                /* masked by cn_conftab_value */
} cn_conf_key_t;

/* Rows: a string, a secret string, an integer in [lo, hi]. */
#define CN_CONF_S(type, path, field, def) \
    { path, CN_CONF_STR, offsetof (type, field), def, 0, 0, 0, false }
#define CN_CONF_SS(type, path, field, def) \
    { path, CN_CONF_STR, offsetof (type, field), def, 0, 0, 0, true }
#define CN_CONF_I(type, path, field, def, lo, hi) \
    { path, CN_CONF_INT, offsetof (type, field), NULL, def, lo, hi, false }

typedef struct {
    const cn_conf_key_t *keys;
    size_t nkeys;
    const char *env_prefix;     /* "CNAPI_" */
    bool never_null;            /* strings are never NULL: NULL stands for "", and
                                   running out of memory aborts */
    bool booleans;              /* integer keys also take true/false (1/0), in
                                   the file and in the environment */
} cn_conftab_t;

/* Set every key of conf (a zeroed struct) to its default, then apply the file
 * at path (when not NULL), then the environment. 0 on success; -1 with err
 * filled on a bad file or value, conf then holding what was set so far (free
 * it with cn_conftab_free). Errors: "<file>:<line>: <jansson's text>",
 * "<file>: the configuration must be a JSON object", "<file>: <path> must be a
 * string", "<file>: <path> must be an integer", "<from>: <path> must be
 * between <min> and <max>" (from: the file or the variable), "<variable>: not
 * an integer: <value>". */
int cn_conftab_load (const cn_conftab_t *t, void *conf, const char *path, char *err,
                     size_t errlen);
/* Free the strings of conf (not conf itself). */
void cn_conftab_free (const cn_conftab_t *t, void *conf);
/* The value of key k in conf as a new JSON reference: an integer, a string
 * (a secret one with the password of a URL or a conninfo masked), or null. */
json_t *cn_conftab_value (const void *conf, const cn_conf_key_t *k);

#endif
