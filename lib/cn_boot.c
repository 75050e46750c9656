/* cn_boot: see include/cn_boot.h. */
#include "cn_boot.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const cn_mindex_t cn_boot_index[] = {
    { "boot_platform", CN_MIDX_STRING, false },
};
const size_t cn_boot_nindex = sizeof cn_boot_index / sizeof cn_boot_index[0];

/* Canonical base64 (what Node re-encodes to the same text); *len gets the
 * decoded size. */
static bool
s_base64_canonical (const char *s, size_t *len)
{
    static const char *alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = strlen (s);
    if (n == 0 || n % 4 != 0)
        return false;
    size_t pad = 0;
    if (s[n - 1] == '=')
        pad++;
    if (s[n - 2] == '=')
        pad++;
    for (size_t i = 0; i < n - pad; i++)
        if (!s[i] || !strchr (alpha, s[i]))
            return false;
    /* the bits a padded group does not use must be zero */
    if (pad) {
        int v = (int) (strchr (alpha, s[n - pad - 1]) - alpha);
        if ((pad == 1 && (v & 0x3)) || (pad == 2 && (v & 0xf)))
            return false;
    }
    *len = n / 4 * 3 - pad;
    return true;
}

int
cn_boot_check (const json_t *params, cn_apierr_t *e)
{
    static const char *const strings[] = { "platform", "default_console", "serial", NULL };
    static const char *const objects[] = { "kernel_args", "kernel_flags", NULL };
    json_t *errs = json_array ();
    for (int i = 0; strings[i]; i++) {
        json_t *v = json_object_get (params, strings[i]);
        if (!v || json_is_null (v))
            continue;
        if (!json_is_string (v))
            cn_apierr_invalid (errs, strings[i], "value was not a string");
        else {
            const char *s = json_string_value (v);
            size_t n = strlen (s);
            if (n > 0 && (isspace ((unsigned char) s[0]) || isspace ((unsigned char) s[n - 1])))
                cn_apierr_invalid (errs, strings[i], "value contains leading or trailing whitespace");
        }
    }
    for (int i = 0; objects[i]; i++) {
        json_t *v = json_object_get (params, objects[i]);
        if (v && !json_is_null (v) && !json_is_object (v))
            cn_apierr_invalid (errs, objects[i], "value is not an object. (was: %s)", cn_js_type (v));
    }
    if (json_array_size (errs) > 0) {
        cn_apierr_set (e, 500, "InvalidParameters", "Request parameters failed validation");
        json_decref (e->errors);
        e->errors = errs;
        return -1;
    }
    json_decref (errs);

    json_t *mods = json_object_get (params, "boot_modules");
    if (!mods || json_is_null (mods) || json_is_false (mods))
        return 0;
    if (!json_is_array (mods)) {
        cn_apierr_set (e, 409, "InvalidArgument",
                       "Values provided for boot_modules contain errors: "
                       "boot_modules must be an array");
        return -1;
    }
    char msg[sizeof e->message] = "";
    size_t used = 0;
    size_t i;
    json_t *bm;
    json_array_foreach (mods, i, bm) {
        char one[200] = "";
        const char *path = json_string_value (json_object_get (bm, "path"));
        const char *content = json_string_value (json_object_get (bm, "content"));
        json_t *type = json_object_get (bm, "type");
        size_t size = 0;
        if (!json_is_object (bm) || !path || !*path || !content || !*content) {
            char *text = json_dumps (bm, JSON_COMPACT | JSON_ENCODE_ANY);
            snprintf (one, sizeof one, "Unexpected format for boot_module: %.120s",
                      text ? text : "?");
            free (text);
        }
        else if (type && !json_is_null (type)
                 && (!json_is_string (type) || strcmp (json_string_value (type), "base64") != 0))
            snprintf (one, sizeof one, "Unsupported type %.40s for module %.100s",
                      json_is_string (type) ? json_string_value (type) : cn_js_type (type), path);
        else if (!s_base64_canonical (content, &size))
            snprintf (one, sizeof one, "Contents for module %.100s must be base64 encoded", path);
        else if (size > CN_BOOT_MODULE_MAX)
            snprintf (one, sizeof one,
                      "Module %.100s exceeds the maximum allowed size of 4KBs", path);
        if (*one) {
            int n = snprintf (msg + used, sizeof msg - used, "%s%s", used ? ",\n" : "", one);
            if (n > 0)
                used = used + (size_t) n < sizeof msg ? used + (size_t) n : sizeof msg - 1;
        }
    }
    if (used) {
        cn_apierr_set (e, 409, "InvalidArgument",
                       "Values provided for boot_modules contain errors: %s", msg);
        return -1;
    }
    return 0;
}

const char *
cn_boot_platform_param (const json_t *params)
{
    const char *p = json_string_value (json_object_get (params, "platform"));
    return p && *p ? p : NULL;
}

/* JavaScript truthiness. */
static bool
s_truthy (const json_t *v)
{
    if (!v || json_is_null (v) || json_is_false (v))
        return false;
    if (json_is_string (v))
        return json_string_length (v) > 0;
    if (json_is_number (v))
        return json_number_value (v) != 0;
    return true;
}

/* boot_modules with type filled in (new reference). */
static json_t *
s_modules (const json_t *mods)
{
    json_t *out = json_array ();
    size_t i;
    json_t *bm;
    json_array_foreach (mods, i, bm) {
        json_t *c = json_deep_copy (bm);
        if (!json_is_string (json_object_get (c, "type")))
            json_object_set_new (c, "type", json_string ("base64"));
        json_array_append_new (out, c);
    }
    return out;
}

/* Merge src into the object obj[key] (created when absent); null deletes. */
static void
s_merge (json_t *obj, const char *key, const json_t *src)
{
    json_t *dst = json_object_get (obj, key);
    if (!json_is_object (dst)) {
        dst = json_object ();
        json_object_set_new (obj, key, dst);
    }
    const char *k;
    json_t *v;
    json_object_foreach ((json_t *) src, k, v) {
        if (json_is_null (v))
            json_object_del (dst, k);
        else
            json_object_set (dst, k, v);
    }
}

void
cn_boot_apply (json_t *obj, const json_t *params, bool put, const char *latest,
               bool is_default)
{
    const char *platform = cn_boot_platform_param (params);
    json_t *args = json_object_get (params, "kernel_args");
    json_t *flags = json_object_get (params, "kernel_flags");
    json_t *mods = json_object_get (params, "boot_modules");
    static const char *const names[] = { "default_console", "serial" };
    static const char *const defaults[] = { "serial", "ttyb" };
    if (put) {
        if (!s_truthy (args))
            args = json_object_get (params, "boot_params");
        json_object_set_new (obj, "boot_params",
                             json_is_object (args) ? json_deep_copy (args) : json_object ());
        json_object_set_new (obj, "kernel_flags",
                             json_is_object (flags) ? json_deep_copy (flags) : json_object ());
        json_object_set_new (obj, "boot_modules",
                             json_is_array (mods) ? s_modules (mods) : json_array ());
        for (int i = 0; i < 2; i++) {
            json_t *v = json_object_get (params, names[i]);
            if (json_is_string (v))
                json_object_set (obj, names[i], v);
            else if (is_default)
                json_object_del (obj, names[i]);
            else
                json_object_set_new (obj, names[i], json_string (defaults[i]));
        }
        if (!platform)
            platform = latest;
        if (platform)
            json_object_set_new (obj, "boot_platform", json_string (platform));
        else if (is_default)
            json_object_del (obj, "boot_platform");
        return;
    }
    if (platform)
        json_object_set_new (obj, "boot_platform", json_string (platform));
    if (!s_truthy (args))
        args = json_object_get (params, "params");
    if (json_is_object (args))
        s_merge (obj, "boot_params", args);
    if (json_is_object (flags))
        s_merge (obj, "kernel_flags", flags);
    if (json_is_array (mods))
        json_object_set_new (obj, "boot_modules", s_modules (mods));
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get (params, names[i]);
        if (v && json_is_null (v))
            json_object_set_new (obj, names[i], json_string (""));
        else if (s_truthy (v) && json_is_string (v))
            json_object_set (obj, names[i], v);
    }
}

/* "user:password:host:port" from amqp://user:password@host:port/vhost. */
static char *
s_rabbitmq (const char *url, bool *localhost)
{
    char user[128] = "guest", pass[128] = "guest", host[256] = "", port[16] = "5672";
    const char *p = url ? strstr (url, "://") : NULL;
    p = p ? p + 3 : (url ? url : "");
    const char *end = p + strcspn (p, "/?");
    const char *at = memchr (p, '@', (size_t) (end - p));
    if (at) {
        const char *colon = memchr (p, ':', (size_t) (at - p));
        size_t ul = (size_t) ((colon ? colon : at) - p);
        if (ul && ul < sizeof user)
            snprintf (user, sizeof user, "%.*s", (int) ul, p);
        if (colon && at - colon - 1 > 0 && (size_t) (at - colon - 1) < sizeof pass)
            snprintf (pass, sizeof pass, "%.*s", (int) (at - colon - 1), colon + 1);
        p = at + 1;
    }
    const char *colon = memchr (p, ':', (size_t) (end - p));
    size_t hl = (size_t) ((colon ? colon : end) - p);
    if (hl < sizeof host)
        snprintf (host, sizeof host, "%.*s", (int) hl, p);
    if (colon && end - colon - 1 > 0 && (size_t) (end - colon - 1) < sizeof port)
        snprintf (port, sizeof port, "%.*s", (int) (end - colon - 1), colon + 1);
    *localhost = strcmp (host, "localhost") == 0;
    char *out = malloc (strlen (user) + strlen (pass) + strlen (host) + strlen (port) + 4);
    if (!out)
        abort ();
    sprintf (out, "%s:%s:%s:%s", user, pass, host, port);
    return out;
}

json_t *
cn_boot_render (const json_t *obj, bool is_default, const char *amqp_url)
{
    json_t *out = json_object ();
    json_t *args = json_object ();
    json_t *flags = json_object ();
    const char *plat = json_string_value (json_object_get (obj, "boot_platform"));
    if (plat)
        json_object_set_new (out, "platform", json_string (plat));
    else if (is_default)
        json_object_set_new (out, "platform", json_string ("latest"));
    if (!is_default) {
        json_t *hn = json_object_get (obj, "hostname");
        if (hn)
            json_object_set (args, "hostname", hn);
    }
    bool localhost = false;
    char *rabbit = s_rabbitmq (amqp_url, &localhost);
    json_object_set_new (args, "rabbitmq", json_string (rabbit));
    if (localhost)
        json_object_set_new (args, "rabbitmq_dns", json_string (rabbit));
    free (rabbit);
    const char *k;
    json_t *v;
    json_t *bp = json_object_get (obj, "boot_params");
    if (json_is_object (bp))
        json_object_foreach (bp, k, v)
            json_object_set (args, k, v);
    json_t *kf = json_object_get (obj, "kernel_flags");
    if (json_is_object (kf))
        json_object_foreach (kf, k, v)
            json_object_set (flags, k, v);
    json_object_set_new (out, "kernel_args", args);
    json_object_set_new (out, "kernel_flags", flags);
    json_t *mods = json_object_get (obj, "boot_modules");
    json_object_set_new (out, "boot_modules",
                         json_is_array (mods) ? json_deep_copy (mods) : json_array ());
    static const char *const names[] = { "default_console", "serial" };
    for (int i = 0; i < 2; i++) {
        v = json_object_get (obj, names[i]);
        if (json_is_string (v))
            json_object_set (out, names[i], v);
    }
    return out;
}

/* ---- platforms ---- */

static const char *
s_os_of (const json_t *rec)
{
    const char *t = json_string_value (json_object_get (json_object_get (rec, "sysinfo"),
                                                        "System Type"));
    return t && strcasecmp (t, "Linux") == 0 ? "linux" : "smartos";
}

void
cn_platforms_add (json_t *set, const json_t *rec)
{
    static const char *const keys[] = { "current_platform", "boot_platform" };
    const char *os = s_os_of (rec);
    for (int i = 0; i < 2; i++) {
        const char *p = json_string_value (json_object_get (rec, keys[i]));
        if (p && *p && strcmp (p, "latest") != 0 && !json_object_get (set, p))
            json_object_set_new (set, p, json_pack ("{s:s}", "os", os));
    }
}

/* YYYYMMDDTHHMMSSZ somewhere in name. */
static bool
s_stamped (const char *name)
{
    size_t n = strlen (name);
    for (size_t i = 0; i + 16 <= n; i++) {
        bool ok = true;
        for (size_t j = 0; j < 16 && ok; j++) {
            char c = name[i + j];
            ok = j == 8 ? c == 'T' : j == 15 ? c == 'Z' : isdigit ((unsigned char) c);
        }
        if (ok)
            return true;
    }
    return false;
}

static bool
s_os_match (const json_t *info, const char *os)
{
    if (!os)
        return true;
    const char *o = json_string_value (json_object_get (info, "os"));
    return o && strcmp (o, os) == 0;
}

const char *
cn_platforms_latest (const json_t *set, const char *os)
{
    const char *best = NULL;
    const char *k;
    json_t *v;
    json_object_foreach ((json_t *) set, k, v) {
        if (s_os_match (v, os) && s_stamped (k) && (!best || strcmp (k, best) > 0))
            best = k;
    }
    return best;
}

json_t *
cn_platforms_view (const json_t *set, const char *os)
{
    json_t *out = json_object ();
    const char *latest = cn_platforms_latest (set, os);
    const char *k;
    json_t *v;
    json_object_foreach ((json_t *) set, k, v) {
        if (!s_os_match (v, os))
            continue;
        json_object_set_new (out, k, latest && strcmp (k, latest) == 0
                                     ? json_pack ("{s:b}", "latest", 1) : json_object ());
    }
    return out;
}
