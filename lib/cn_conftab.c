/*
 * cn_conftab: see include/cn_conftab.h.
 */
#include "cn_conftab.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char **
s_str (void *conf, const cn_conf_key_t *k)
{
    return (char **) ((char *) conf + k->offset);
}

static int *
s_int (void *conf, const cn_conf_key_t *k)
{
    return (int *) ((char *) conf + k->offset);
}

static int
s_set_int (void *conf, const cn_conf_key_t *k, long long v, const char *from, char *err,
           size_t errlen)
{
    if (v < k->min || v > k->max) {
        snprintf (err, errlen, "%s: %s must be between %d and %d", from, k->path, k->min, k->max);
        return -1;
    }
    *s_int (conf, k) = (int) v;
    return 0;
}

static void
s_set_str (const cn_conftab_t *t, void *conf, const cn_conf_key_t *k, const char *v)
{
    char **p = s_str (conf, k);
    free (*p);
    if (t->never_null) {
        *p = strdup (v ? v : "");
        if (!*p)
            abort ();
    }
    else
        *p = v ? strdup (v) : NULL;
}

/* Look up "a.b" in a JSON object. */
static json_t *
s_lookup (json_t *root, const char *path)
{
    char buf[128];
    snprintf (buf, sizeof buf, "%s", path);
    json_t *cur = root;
    char *save = NULL;
    for (char *part = strtok_r (buf, ".", &save); part; part = strtok_r (NULL, ".", &save)) {
        if (!json_is_object (cur))
            return NULL;
        cur = json_object_get (cur, part);
        if (!cur)
            return NULL;
    }
    return cur;
}

static int
s_apply_file (const cn_conftab_t *t, void *conf, const char *path, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file (path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf (err, errlen, "%s:%d: %s", path, jerr.line, jerr.text);
        return -1;
    }
    int rc = 0;
    if (!json_is_object (root)) {
        snprintf (err, errlen, "%s: the configuration must be a JSON object", path);
        rc = -1;
    }
    for (size_t i = 0; rc == 0 && i < t->nkeys; i++) {
        const cn_conf_key_t *k = &t->keys[i];
        json_t *v = s_lookup (root, k->path);
        if (!v || json_is_null (v))
            continue;
        if (k->kind == CN_CONF_STR) {
            if (!json_is_string (v)) {
                snprintf (err, errlen, "%s: %s must be a string", path, k->path);
                rc = -1;
            }
            else
                s_set_str (t, conf, k, json_string_value (v));
        }
        else if (t->booleans && json_is_boolean (v))
            rc = s_set_int (conf, k, json_is_true (v), path, err, errlen);
        else if (!json_is_integer (v)) {
            snprintf (err, errlen, "%s: %s must be an integer", path, k->path);
            rc = -1;
        }
        else
            rc = s_set_int (conf, k, json_integer_value (v), path, err, errlen);
    }
    json_decref (root);
    return rc;
}

static void
s_env_name (const char *prefix, const char *path, char *out, size_t len)
{
    size_t n = (size_t) snprintf (out, len, "%s", prefix);
    for (const char *p = path; *p && n + 1 < len; p++)
        out[n++] = *p == '.' ? '_' : (char) toupper ((unsigned char) *p);
    out[n] = '\0';
}

static int
s_apply_env (const cn_conftab_t *t, void *conf, char *err, size_t errlen)
{
    for (size_t i = 0; i < t->nkeys; i++) {
        const cn_conf_key_t *k = &t->keys[i];
        char name[96];
        s_env_name (t->env_prefix, k->path, name, sizeof name);
        const char *v = getenv (name);
        if (!v)
            continue;
        if (k->kind == CN_CONF_STR)
            s_set_str (t, conf, k, v);
        else {
            char *end;
            errno = 0;
            long long x = strtoll (v, &end, 10);
            if (t->booleans && strcmp (v, "true") == 0)
                x = 1, end = (char *) v + 4;
            else if (t->booleans && strcmp (v, "false") == 0)
                x = 0, end = (char *) v + 5;
            if (errno || end == v || *end) {
                snprintf (err, errlen, "%s: not an integer: %s", name, v);
                return -1;
            }
            if (s_set_int (conf, k, x, name, err, errlen) != 0)
                return -1;
        }
    }
    return 0;
}

int
cn_conftab_load (const cn_conftab_t *t, void *conf, const char *path, char *err, size_t errlen)
{
    for (size_t i = 0; i < t->nkeys; i++) {
        if (t->keys[i].kind == CN_CONF_STR)
            s_set_str (t, conf, &t->keys[i], t->keys[i].def_str);
        else
            *s_int (conf, &t->keys[i]) = t->keys[i].def_int;
    }
    if (path && s_apply_file (t, conf, path, err, errlen) != 0)
        return -1;
    return s_apply_env (t, conf, err, errlen);
}

void
cn_conftab_free (const cn_conftab_t *t, void *conf)
{
    for (size_t i = 0; i < t->nkeys; i++)
        if (t->keys[i].kind == CN_CONF_STR) {
            free (*s_str (conf, &t->keys[i]));
            *s_str (conf, &t->keys[i]) = NULL;
        }
}

/* amqp://user:pass@host -> amqp://user:***@host; conninfo password=x -> *** */
static char *
s_mask (const char *v)
{
    char *out = strdup (v ? v : "");
    if (!out)
        abort ();
    char *scheme = strstr (out, "://");
    if (scheme) {
        char *at = strchr (scheme + 3, '@');
        char *colon = strchr (scheme + 3, ':');
        if (at && colon && colon < at)
            memset (colon + 1, '*', (size_t) (at - colon - 1));
    }
    char *pw = strstr (out, "password=");
    if (pw)
        for (char *p = pw + 9; *p && *p != ' '; p++)
            *p = '*';
    return out;
}

json_t *
cn_conftab_value (const void *conf, const cn_conf_key_t *k)
{
    if (k->kind == CN_CONF_INT)
        return json_integer (*s_int ((void *) conf, k));
    const char *v = *s_str ((void *) conf, k);
    if (k->secret) {
        char *m = s_mask (v);
        json_t *j = json_string (m);
        free (m);
        return j;
    }
    return v ? json_string (v) : json_null ();
}
