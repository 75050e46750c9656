/*
 * cn_server: the server record, derived from sysinfo, and its API views.
 * See include/cn_server.h for the contract and docs/server-record.md for the
 * record's fields.
 *
 * Theory of operation
 *
 *   sysinfo text --cn_sysinfo_parse--> checked JSON object
 *        |
 *        v
 *   cn_server_apply_sysinfo (existing record or NULL)
 *        1. another machine?  The stored sysinfo and the new one have
 *           disjoint MAC sets (or, lacking MACs, different hostnames):
 *           keep the first machine's record, add a report to
 *           uuid_conflicts (rate limited), CN_SRV_CONFLICT.
 *        2. older than the stored sysinfo_ms?  CN_SRV_STALE.
 *        3. copy the existing record (operator fields survive), fill
 *           missing defaults, derive the sysinfo fields.
 *        4. equal to the existing record apart from last_sysinfo and
 *           sysinfo_ms, and last_sysinfo fresh enough?  CN_SRV_UNCHANGED.
 *        5. else CN_SRV_WRITE with last_sysinfo = now.
 *
 *   cn_server_list_query: GET /servers parameters -> filter, paging, extras
 *   cn_server_render: record -> API object (status, last_heartbeat,
 *       capacity, extras, fields)
 *   cn_server_update: POST /servers/:uuid parameters -> checked -> record
 *
 * Everything here is pure: no I/O, no clocks (callers pass the time), so
 * the same inputs give the same record on every instance.
 */
#include "cn_server.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cn_util.h"

/* ---- bucket indexes (the reference's cnapi_servers bucket) ---- */

const cn_mindex_t cn_server_index[] = {
    { "datacenter", CN_MIDX_STRING, false },
    { "headnode", CN_MIDX_BOOLEAN, false },
    { "hostname", CN_MIDX_STRING, false },
    { "overprovision_ratios", CN_MIDX_STRING, false },
    { "reserved", CN_MIDX_BOOLEAN, false },
    { "reservoir", CN_MIDX_BOOLEAN, false },
    { "setup", CN_MIDX_BOOLEAN, false },
    { "uuid", CN_MIDX_STRING, true },
};
const size_t cn_server_nindex = sizeof cn_server_index / sizeof cn_server_index[0];

#define S_MIB 1048576.0
#define S_DEFAULT_AGENT_PORT 5309
#define S_MAX_EPOCH_S 253402300799LL     /* 9999-12-31T23:59:59Z */
#define S_MAX_MIB (1LL << 40)
#define S_MAX_CONFLICTS 16               /* reports kept per record */
#define S_LIST_MAX_LIMIT 1000
#define S_LIST_MIN_LIMIT 1
#define S_MAX_FIELDS 64
#define S_MAX_UUIDS 1000

/* ---- API errors ---- */

void
cn_apierr_set (cn_apierr_t *e, int status, const char *code, const char *fmt, ...)
{
    va_list ap;
    e->status = status;
    e->code = code;
    va_start (ap, fmt);
    vsnprintf (e->message, sizeof e->message, fmt, ap);
    va_end (ap);
}

void
cn_apierr_fini (cn_apierr_t *e)
{
    if (!e)
        return;
    json_decref (e->errors);
    e->errors = NULL;
}

char *
cn_apierr_body (const cn_apierr_t *e)
{
    json_t *o = json_object ();
    json_object_set_new (o, "code", json_string (e->code ? e->code : "InternalError"));
    json_object_set_new (o, "message", json_string (e->message));
    if (e->errors)
        json_object_set (o, "errors", e->errors);
    char *s = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    return s;
}

/* Fill e as the reference's rule failure: 500 InvalidParameters (or the
 * given status) with errors[] taking ownership of errs. */
static void
s_invalid_params (cn_apierr_t *e, int status, json_t *errs)
{
    cn_apierr_set (e, status, "InvalidParameters", "Request parameters failed validation");
    json_decref (e->errors);
    e->errors = errs;
}

void
cn_apierr_invalid (json_t *errs, const char *field, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (msg, sizeof msg, fmt, ap);
    va_end (ap);
    json_array_append_new (errs, json_pack ("{s:s, s:s, s:s}", "field", field,
                                            "code", "Invalid", "message", msg));
}

/* ---- small helpers ---- */

/* An integer from a JSON integer, an integral real, or a decimal string
 * (optionally signed, nothing else around it). */
static bool
s_intish (const json_t *v, int64_t *out)
{
    if (json_is_integer (v)) {
        *out = (int64_t) json_integer_value (v);
        return true;
    }
    if (json_is_real (v)) {
        double d = json_real_value (v);
        if (!isfinite (d) || d != floor (d) || fabs (d) > 9.0e15)
            return false;
        *out = (int64_t) d;
        return true;
    }
    if (json_is_string (v)) {
        const char *s = json_string_value (v);
        if (!*s)
            return false;
        const char *p = s;
        if (*p == '-' || *p == '+')
            p++;
        if (!*p)
            return false;
        for (const char *q = p; *q; q++)
            if (!isdigit ((unsigned char) *q))
                return false;
        errno = 0;
        long long n = strtoll (s, NULL, 10);
        if (errno)
            return false;
        *out = (int64_t) n;
        return true;
    }
    return false;
}

/* A number from a JSON number or a numeric string (strtod, whole string). */
static bool
s_numberish (const json_t *v, double *out)
{
    if (json_is_number (v)) {
        *out = json_number_value (v);
        return isfinite (*out);
    }
    if (json_is_string (v)) {
        const char *s = json_string_value (v);
        char *end;
        if (!*s || isspace ((unsigned char) *s))
            return false;
        errno = 0;
        double d = strtod (s, &end);
        if (errno || *end || !isfinite (d))
            return false;
        *out = d;
        return true;
    }
    return false;
}

/* "true"/"false" in any case, or a JSON boolean; -1 when neither. */
static int
s_boolish (const json_t *v)
{
    if (json_is_boolean (v))
        return json_is_true (v) ? 1 : 0;
    if (json_is_string (v)) {
        const char *s = json_string_value (v);
        if (strcasecmp (s, "true") == 0)
            return 1;
        if (strcasecmp (s, "false") == 0)
            return 0;
    }
    return -1;
}

static const char *
s_str (const json_t *o, const char *key)
{
    return json_string_value (json_object_get (o, key));
}

static void
s_set_iso (json_t *o, const char *key, int64_t ms)
{
    char buf[32];
    json_object_set_new (o, key, json_string (cn_iso8601 (ms, buf, sizeof buf)));
}

/* Equal apart from the keys in skip (NULL-terminated). */
static bool
s_equal_except (const json_t *a, const json_t *b, const char *const *skip)
{
    size_t na = 0, nb = 0;
    const char *k;
    json_t *v;
    json_object_foreach ((json_t *) a, k, v) {
        bool skipped = false;
        for (const char *const *s = skip; *s; s++)
            if (strcmp (k, *s) == 0)
                skipped = true;
        if (skipped)
            continue;
        na++;
        json_t *w = json_object_get (b, k);
        if (!w || !json_equal (v, w))
            return false;
    }
    json_object_foreach ((json_t *) b, k, v) {
        bool skipped = false;
        for (const char *const *s = skip; *s; s++)
            if (strcmp (k, *s) == 0)
                skipped = true;
        if (!skipped)
            nb++;
    }
    return na == nb;
}

/* ---- sysinfo parsing ---- */

typedef enum {
    S_T_STR,        /* string */
    S_T_BOOLISH,    /* true/false or "true"/"false" */
    S_T_INTISH,     /* integer or decimal string, >= 0 */
    S_T_EPOCH,      /* seconds since the epoch, intish */
    S_T_PORT,       /* intish 1..65535 */
    S_T_OBJ,        /* object */
    S_T_ARR         /* array */
} s_stype_t;

static const struct {
    const char *key;
    s_stype_t type;
} s_sysinfo_checks[] = {
    { "Hostname", S_T_STR },
    { "Live Image", S_T_STR },
    { "Setup", S_T_BOOLISH },
    { "MiB of Memory", S_T_INTISH },
    { "CPU Total Cores", S_T_INTISH },
    { "Boot Time", S_T_EPOCH },
    { "Zpool Creation", S_T_EPOCH },
    { "CN Agent Port", S_T_PORT },
    { "CN Agent IP", S_T_STR },
    { "Admin IP", S_T_STR },
    { "Admin NIC Tag", S_T_STR },
    { "Boot Parameters", S_T_OBJ },
    { "Network Interfaces", S_T_OBJ },
    { "Virtual Network Interfaces", S_T_OBJ },
    { "SDC Agents", S_T_ARR },
};

static const char *
s_stype_what (s_stype_t t)
{
    switch (t) {
    case S_T_STR: return "must be a string";
    case S_T_BOOLISH: return "must be true, false, \"true\" or \"false\"";
    case S_T_INTISH: return "must be a non-negative integer or a string of one";
    case S_T_EPOCH: return "must be seconds since the epoch (an integer or a string of one)";
    case S_T_PORT: return "must be a port number (1-65535)";
    case S_T_OBJ: return "must be an object";
    case S_T_ARR: return "must be an array";
    }
    abort ();
}

static bool
s_stype_ok (const json_t *v, s_stype_t t)
{
    int64_t n;
    switch (t) {
    case S_T_STR: return json_is_string (v);
    case S_T_BOOLISH: return s_boolish (v) >= 0;
    case S_T_INTISH: return s_intish (v, &n) && n >= 0 && n <= S_MAX_MIB;
    case S_T_EPOCH: return s_intish (v, &n) && n >= 0 && n <= S_MAX_EPOCH_S;
    case S_T_PORT: return s_intish (v, &n) && n >= 1 && n <= 65535;
    case S_T_OBJ: return json_is_object (v);
    case S_T_ARR: return json_is_array (v);
    }
    abort ();
}

/* Check one "Network Interfaces"-like object: each entry an object, with
 * string "MAC Address"/"ip4addr" and an array of strings "NIC Names". */
static bool
s_check_nics (const json_t *nics, const char *what, char *err, size_t errlen)
{
    const char *name;
    json_t *nic;
    json_object_foreach ((json_t *) nics, name, nic) {
        if (!json_is_object (nic)) {
            snprintf (err, errlen, "sysinfo \"%s\".\"%.64s\" must be an object", what, name);
            return false;
        }
        static const char *const strs[] = { "MAC Address", "ip4addr", "Host Interface" };
        for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
            json_t *v = json_object_get (nic, strs[i]);
            if (v && !json_is_string (v)) {
                snprintf (err, errlen, "sysinfo \"%s\".\"%.64s\".\"%s\" must be a string",
                          what, name, strs[i]);
                return false;
            }
        }
        json_t *names = json_object_get (nic, "NIC Names");
        if (names) {
            bool ok = json_is_array (names);
            size_t i;
            json_t *n;
            if (ok)
                json_array_foreach (names, i, n)
                    if (!json_is_string (n))
                        ok = false;
            if (!ok) {
                snprintf (err, errlen,
                          "sysinfo \"%s\".\"%.64s\".\"NIC Names\" must be an array of strings",
                          what, name);
                return false;
            }
        }
    }
    return true;
}

int
cn_sysinfo_parse (const char *body, size_t len, const char *expect_uuid,
                  json_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!body || len == 0) {
        snprintf (err, errlen, "sysinfo is empty");
        return -1;
    }
    if (len > CN_SYSINFO_MAX_BYTES) {
        snprintf (err, errlen, "sysinfo is too large (%zu bytes, the limit is %d)", len,
                  CN_SYSINFO_MAX_BYTES);
        return -1;
    }
    json_error_t jerr;
    json_t *si = json_loadb (body, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
    if (!si) {
        snprintf (err, errlen, "sysinfo is not valid JSON: %s (line %d, column %d)",
                  jerr.text, jerr.line, jerr.column);
        return -1;
    }
    if (cn_sysinfo_check (si, expect_uuid, err, errlen) != 0) {
        json_decref (si);
        return -1;
    }
    *out = si;
    return 0;
}

int
cn_sysinfo_check (const json_t *si, const char *expect_uuid, char *err, size_t errlen)
{
    if (!json_is_object (si)) {
        snprintf (err, errlen, "sysinfo must be a JSON object");
        goto fail;
    }
    json_t *u = json_object_get (si, "UUID");
    if (!u) {
        snprintf (err, errlen, "sysinfo has no \"UUID\"");
        goto fail;
    }
    if (!json_is_string (u)) {
        snprintf (err, errlen, "sysinfo \"UUID\" must be a string");
        goto fail;
    }
    char uuid[37];
    if (!cn_uuid_normalize (json_string_value (u), uuid)) {
        snprintf (err, errlen, "sysinfo \"UUID\" is not a valid UUID: \"%.40s\"",
                  json_string_value (u));
        goto fail;
    }
    if (expect_uuid && strcasecmp (uuid, expect_uuid) != 0) {
        snprintf (err, errlen, "sysinfo \"UUID\" %s does not match the server UUID %.40s",
                  uuid, expect_uuid);
        goto fail;
    }
    for (size_t i = 0; i < sizeof s_sysinfo_checks / sizeof s_sysinfo_checks[0]; i++) {
        json_t *v = json_object_get (si, s_sysinfo_checks[i].key);
        if (v && !s_stype_ok (v, s_sysinfo_checks[i].type)) {
            snprintf (err, errlen, "sysinfo \"%s\" %s", s_sysinfo_checks[i].key,
                      s_stype_what (s_sysinfo_checks[i].type));
            goto fail;
        }
    }
    json_t *bp = json_object_get (si, "Boot Parameters");
    json_t *hn = bp ? json_object_get (bp, "headnode") : NULL;
    if (hn && !json_is_string (hn) && !json_is_boolean (hn)) {
        snprintf (err, errlen, "sysinfo \"Boot Parameters\".\"headnode\" must be a string or a boolean");
        goto fail;
    }
    json_t *nics = json_object_get (si, "Network Interfaces");
    if (nics && !s_check_nics (nics, "Network Interfaces", err, errlen))
        goto fail;
    nics = json_object_get (si, "Virtual Network Interfaces");
    if (nics && !s_check_nics (nics, "Virtual Network Interfaces", err, errlen))
        goto fail;
    return 0;
fail:
    return -1;
}

/* ---- sysinfo -> record ---- */

/* The set of MAC addresses over "Network Interfaces", lower case, sorted,
 * without duplicates or empties: a new array. */
static json_t *
s_macs (const json_t *sysinfo)
{
    json_t *out = json_array ();
    json_t *nics = json_object_get (sysinfo, "Network Interfaces");
    const char *name;
    json_t *nic;
    if (!json_is_object (nics))
        return out;
    json_object_foreach (nics, name, nic) {
        const char *mac = json_is_object (nic) ? s_str (nic, "MAC Address") : NULL;
        if (!mac || !*mac)
            continue;
        char low[64];
        snprintf (low, sizeof low, "%s", mac);
        for (char *p = low; *p; p++)
            *p = (char) tolower ((unsigned char) *p);
        /* insert sorted, skipping duplicates */
        size_t i, n = json_array_size (out);
        int c = 1;
        for (i = 0; i < n; i++) {
            c = strcmp (low, json_string_value (json_array_get (out, i)));
            if (c <= 0)
                break;
        }
        if (i < n && c == 0)
            continue;
        json_array_insert_new (out, i, json_string (low));
    }
    return out;
}

static bool
s_disjoint (const json_t *a, const json_t *b)
{
    size_t i, j;
    json_t *x, *y;
    json_array_foreach (a, i, x)
        json_array_foreach (b, j, y)
            if (json_equal (x, y))
                return false;
    return true;
}

/* Is the machine that sent new_si another one than the one that sent old_si?
 * Disjoint MAC sets when both have MACs; otherwise different hostnames. A
 * renamed host with the same NICs is the same machine. */
static bool
s_other_machine (const json_t *old_si, const json_t *new_si)
{
    json_t *a = s_macs (old_si);
    /* the same NICs (a sysinfo shares unchanged members with the previous
     * one, cn_sysinfo_load_like): the same MAC set */
    json_t *nics = json_object_get (old_si, "Network Interfaces");
    json_t *b = nics && nics == json_object_get (new_si, "Network Interfaces")
        ? json_incref (a) : s_macs (new_si);
    bool other;
    if (json_array_size (a) > 0 && json_array_size (b) > 0)
        other = a != b && s_disjoint (a, b);
    else {
        const char *ha = s_str (old_si, "Hostname"), *hb = s_str (new_si, "Hostname");
        other = ha && hb && strcmp (ha, hb) != 0;
    }
    json_decref (a);
    json_decref (b);
    return other;
}

/* The agent's address, as the reference finds it: "CN Agent IP", then
 * "Admin IP", then the first NIC (physical, then virtual) tagged with the
 * admin NIC tag ("Admin NIC Tag", default "admin") that has an ip4addr. */
static const char *
s_admin_ip (const json_t *si)
{
    const char *ip = s_str (si, "CN Agent IP");
    if (ip && *ip)
        return ip;
    ip = s_str (si, "Admin IP");
    if (ip && *ip)
        return ip;
    const char *tag = s_str (si, "Admin NIC Tag");
    if (!tag || !*tag)
        tag = "admin";
    static const char *const sets[] = { "Network Interfaces", "Virtual Network Interfaces" };
    for (size_t s = 0; s < 2; s++) {
        json_t *nics = json_object_get (si, sets[s]);
        const char *name;
        json_t *nic;
        if (!json_is_object (nics))
            continue;
        json_object_foreach (nics, name, nic) {
            json_t *names = json_object_get (nic, "NIC Names");
            const char *addr = s_str (nic, "ip4addr");
            size_t i;
            json_t *n;
            if (!addr || !*addr || !json_is_array (names))
                continue;
            json_array_foreach (names, i, n)
                if (json_is_string (n) && strcmp (json_string_value (n), tag) == 0)
                    return addr;
        }
    }
    return NULL;
}

/* memory_provisionable_bytes as the reference keeps it: total memory less
 * the reservation, less the VMs' max_physical_memory (MiB). Needs ram. */
static void
s_recompute_provisionable (json_t *rec)
{
    json_t *ram = json_object_get (rec, "ram");
    json_t *rr = json_object_get (rec, "reservation_ratio");
    if (!json_is_integer (ram) || !json_is_number (rr))
        return;
    double total = (double) json_integer_value (ram) * S_MIB;
    double p = total - total * json_number_value (rr);
    json_t *vms = json_object_get (rec, "vms");
    const char *k;
    json_t *vm;
    if (json_is_object (vms))
        json_object_foreach (vms, k, vm) {
            json_t *m = json_object_get (vm, "max_physical_memory");
            if (json_is_number (m))
                p -= json_number_value (m) * S_MIB;
        }
    json_object_set_new (rec, "memory_provisionable_bytes", json_integer ((json_int_t) floor (p)));
}

/* Defaults for any field a record lacks (a new server lacks all). */
static void
s_fill_defaults (json_t *rec, const cn_sysinfo_ctx_t *ctx)
{
    if (!json_object_get (rec, "agents"))
        json_object_set_new (rec, "agents", json_array ());
    if (!json_object_get (rec, "boot_params"))
        json_object_set_new (rec, "boot_params", json_object ());
    if (!json_object_get (rec, "comments"))
        json_object_set_new (rec, "comments", json_string (""));
    if (!json_is_string (json_object_get (rec, "datacenter")) && ctx->datacenter)
        json_object_set_new (rec, "datacenter", json_string (ctx->datacenter));
    if (!json_object_get (rec, "default_console"))
        json_object_set_new (rec, "default_console", json_string ("serial"));
    if (!json_object_get (rec, "kernel_flags"))
        json_object_set_new (rec, "kernel_flags", json_object ());
    if (!json_object_get (rec, "rack_identifier"))
        json_object_set_new (rec, "rack_identifier", json_string (""));
    if (!json_is_number (json_object_get (rec, "reservation_ratio")))
        json_object_set_new (rec, "reservation_ratio", json_real (0.15));
    if (!json_object_get (rec, "reserved"))
        json_object_set_new (rec, "reserved", json_false ());
    if (!json_object_get (rec, "reservoir"))
        json_object_set_new (rec, "reservoir", json_false ());
    if (!json_object_get (rec, "serial"))
        json_object_set_new (rec, "serial", json_string ("ttyb"));
    if (!json_object_get (rec, "traits"))
        json_object_set_new (rec, "traits", json_object ());
    if (!json_object_get (rec, "vms"))
        json_object_set_new (rec, "vms", json_object ());
}

/* Derive the sysinfo fields into rec (see docs/server-record.md). */
static void
s_derive (json_t *rec, const json_t *si, const cn_sysinfo_ctx_t *ctx)
{
    char uuid[37];
    int64_t n;
    json_t *v;

    if (cn_uuid_normalize (s_str (si, "UUID"), uuid))
        json_object_set_new (rec, "uuid", json_string (uuid));

    if ((v = json_object_get (si, "Hostname")) && json_is_string (v))
        json_object_set (rec, "hostname", v);

    v = json_object_get (si, "Setup");
    if (v && s_boolish (v) >= 0)
        json_object_set_new (rec, "setup", json_boolean (s_boolish (v)));
    else if (!json_is_boolean (json_object_get (rec, "setup")))
        /* old platforms: no "Setup" key; a zpool means set up */
        json_object_set_new (rec, "setup", json_boolean (json_object_get (si, "Zpool") != NULL));

    json_t *bp = json_object_get (si, "Boot Parameters");
    if (json_is_object (bp)) {
        json_t *hn = json_object_get (bp, "headnode");
        bool head = json_is_true (hn) ||
                    (json_is_string (hn) && strcmp (json_string_value (hn), "true") == 0);
        json_object_set_new (rec, "headnode", json_boolean (head));
    }
    else if (!json_is_boolean (json_object_get (rec, "headnode")))
        json_object_set_new (rec, "headnode", json_false ());

    if (s_intish (json_object_get (si, "MiB of Memory"), &n) && n >= 0) {
        /* memory_total_bytes: the agent's measured figure when it has sent
         * one; otherwise (absent, or still the figure we derived from the
         * old ram) the sysinfo size */
        json_t *old_ram = json_object_get (rec, "ram");
        json_t *total = json_object_get (rec, "memory_total_bytes");
        if (!total || (json_is_integer (old_ram) && json_is_integer (total) &&
                       json_integer_value (total) == json_integer_value (old_ram) * 1048576))
            json_object_set_new (rec, "memory_total_bytes", json_integer (n * 1048576));
        json_object_set_new (rec, "ram", json_integer (n));
    }

    if ((v = json_object_get (si, "Live Image")) && json_is_string (v)) {
        json_object_set (rec, "current_platform", v);
        const char *bplat = s_str (rec, "boot_platform");
        if (!bplat || !*bplat)
            json_object_set (rec, "boot_platform", v);
    }

    const char *old_boot = s_str (rec, "last_boot");
    char *old_boot_copy = old_boot ? strdup (old_boot) : NULL;
    if (s_intish (json_object_get (si, "Boot Time"), &n) && n >= 0 && n <= S_MAX_EPOCH_S)
        s_set_iso (rec, "last_boot", n * 1000);
    /* A new boot time ends a reboot: clear the transitional status. */
    const char *new_boot = s_str (rec, "last_boot");
    if (json_object_get (rec, "transitional_status") && old_boot_copy && new_boot &&
        strcmp (old_boot_copy, new_boot) != 0)
        json_object_del (rec, "transitional_status");
    free (old_boot_copy);

    if (!json_is_string (json_object_get (rec, "created"))) {
        if (s_intish (json_object_get (si, "Zpool Creation"), &n) && n > 0 && n <= S_MAX_EPOCH_S)
            s_set_iso (rec, "created", n * 1000);
        else
            s_set_iso (rec, "created", ctx->now_ms);
    }

    json_t *agents = json_object_get (rec, "agents");
    json_t *sdc_agents = json_object_get (si, "SDC Agents");
    if (json_is_array (sdc_agents) &&
        (!json_is_array (agents) || json_array_size (agents) == 0))
        json_object_set_new (rec, "agents", json_deep_copy (sdc_agents));

    const char *ip = s_admin_ip (si);
    if (ip)
        json_object_set_new (rec, "admin_ip", json_string (ip));
    else
        json_object_del (rec, "admin_ip");
    int64_t port = S_DEFAULT_AGENT_PORT;
    if (s_intish (json_object_get (si, "CN Agent Port"), &n) && n >= 1 && n <= 65535)
        port = n;
    json_object_set_new (rec, "agent_port", json_integer (port));

    /* Shared, not copied: nothing modifies a sysinfo once parsed, and copying
     * ~3 KB of tree per message was a large part of the ingest cost. */
    json_object_set (rec, "sysinfo", (json_t *) si);
    s_recompute_provisionable (rec);
}

/* Another machine claims this UUID: record the report in a copy of the
 * existing record, at most once per third of the freshness window per
 * reporter. */
static cn_srv_result_t
s_conflict (const json_t *existing, const json_t *si, const cn_sysinfo_ctx_t *ctx,
            json_t **out)
{
    json_t *macs = s_macs (si);
    json_t *host = json_object_get (si, "Hostname");
    if (!json_is_string (host))
        host = json_null ();
    else
        json_incref (host);
    int64_t every_ms = (int64_t) ctx->freshness_s * 1000 / 3;

    json_t *rec = json_deep_copy (existing);
    json_t *list = json_object_get (rec, "uuid_conflicts");
    if (!json_is_array (list)) {
        list = json_array ();
        json_object_set_new (rec, "uuid_conflicts", list);
    }
    json_t *found = NULL;
    size_t i;
    json_t *r;
    json_array_foreach (list, i, r)
        if (json_equal (json_object_get (r, "hostname"), host) &&
            json_equal (json_object_get (r, "macs"), macs)) {
            found = r;
            break;
        }

    cn_srv_result_t rc = CN_SRV_CONFLICT;
    if (found) {
        int64_t last;
        if (cn_iso8601_to_ms (s_str (found, "last_seen"), &last) && ctx->now_ms - last < every_ms
            && ctx->now_ms >= last) {
            json_decref (rec);
            rec = NULL;
        }
        else {
            s_set_iso (found, "last_seen", ctx->now_ms);
            json_int_t count = json_integer_value (json_object_get (found, "count"));
            json_object_set_new (found, "count", json_integer (count + 1));
        }
    }
    else {
        json_t *rep = json_object ();
        json_object_set (rep, "hostname", host);
        json_object_set (rep, "macs", macs);
        s_set_iso (rep, "first_seen", ctx->now_ms);
        s_set_iso (rep, "last_seen", ctx->now_ms);
        json_object_set_new (rep, "count", json_integer (1));
        json_array_append_new (list, rep);
        /* bounded: drop the report seen least recently */
        while (json_array_size (list) > S_MAX_CONFLICTS) {
            size_t oldest = 0;
            int64_t oldest_ms = INT64_MAX;
            json_array_foreach (list, i, r) {
                int64_t t;
                if (!cn_iso8601_to_ms (s_str (r, "last_seen"), &t))
                    t = INT64_MIN;      /* unreadable: the first to go */
                if (t < oldest_ms) {
                    oldest = i;
                    oldest_ms = t;
                }
            }
            json_array_remove (list, oldest);
        }
    }
    json_decref (macs);
    json_decref (host);
    *out = rec;
    return rc;
}

cn_srv_result_t
cn_server_apply_sysinfo_si (const json_t *existing, const cn_sysinfo_t *old_si,
                            const cn_sysinfo_t *si, const cn_sysinfo_ctx_t *ctx, json_t **out)
{
    *out = NULL;
    if (existing && !json_is_object (existing))
        existing = NULL;       /* a broken row: rebuild it from sysinfo */
    if (!existing)
        old_si = NULL;
    int64_t ts = ctx->sent_ms > 0 ? ctx->sent_ms : ctx->now_ms;
    const json_t *new_sum = si->summary;

    if (existing) {
        const json_t *old_sum = old_si ? old_si->summary : NULL;
        /* an empty summary (no member records derive from) cannot tell
         * another machine: s_other_machine would say no */
        if (json_is_object (old_sum) && json_object_size (old_sum) > 0 &&
            s_other_machine (old_sum, new_sum)) {
            /* the report goes into a copy of the record without its sysinfo */
            json_t *bare = json_copy ((json_t *) existing);
            json_object_del (bare, "sysinfo");
            cn_srv_result_t r = s_conflict (bare, new_sum, ctx, out);
            json_decref (bare);
            return r;
        }
        json_t *ms = json_object_get (existing, "sysinfo_ms");
        if (json_is_integer (ms) && ts < json_integer_value (ms))
            return CN_SRV_STALE;
    }

    /* A shallow copy: s_fill_defaults and s_derive only set or delete
     * top-level fields, so nested values can be shared with the existing
     * record (which is const and may be cached by the caller). */
    json_t *rec = existing ? json_copy ((json_t *) existing) : json_object ();
    s_fill_defaults (rec, ctx);
    s_derive (rec, new_sum, ctx);
    json_object_del (rec, "sysinfo");

    if (existing) {
        static const char *const skip[] = { "last_sysinfo", "sysinfo_ms", "sysinfo", NULL };
        json_t *last = json_object_get (existing, "last_sysinfo");
        int64_t every_ms = (int64_t) ctx->freshness_s * 1000 / 3;
        if (json_is_integer (last) && ctx->now_ms - json_integer_value (last) < every_ms &&
            s_equal_except (rec, existing, skip) && cn_sysinfo_equal (old_si, si)) {
            json_decref (rec);
            return CN_SRV_UNCHANGED;
        }
    }
    json_object_set_new (rec, "last_sysinfo", json_integer (ctx->now_ms));
    json_object_set_new (rec, "sysinfo_ms", json_integer (ts));
    *out = rec;
    return CN_SRV_WRITE;
}

cn_srv_result_t
cn_server_apply_sysinfo (const json_t *existing, const json_t *sysinfo,
                         const cn_sysinfo_ctx_t *ctx, json_t **out)
{
    *out = NULL;
    if (existing && !json_is_object (existing))
        existing = NULL;
    json_t *old = existing ? json_object_get (existing, "sysinfo") : NULL;
    cn_sysinfo_t *old_si = old ? cn_sysinfo_from_json (old) : NULL;
    cn_sysinfo_t *si = cn_sysinfo_from_json (sysinfo);
    assert (si && (!old || old_si));
    cn_srv_result_t r = cn_server_apply_sysinfo_si (existing, old_si, si, ctx, out);
    if (*out) {
        json_t *v = r == CN_SRV_WRITE ? (json_t *) sysinfo : old;
        if (v)
            json_object_set (*out, "sysinfo", v);
    }
    cn_sysinfo_unref (&old_si);
    cn_sysinfo_unref (&si);
    return r;
}

/* ---- status ---- */

void
cn_server_status_inputs (const json_t *rec, cn_status_inputs_t *out)
{
    memset (out, 0, sizeof *out);
    const char *uuid = s_str (rec, "uuid");
    if (!uuid || !cn_uuid_normalize (uuid, out->uuid))
        out->uuid[0] = 0;
    json_t *last = json_object_get (rec, "last_sysinfo");
    if (json_is_integer (last)) {
        out->has_last_sysinfo = true;
        out->last_sysinfo = json_integer_value (last);
    }
    const char *ts = s_str (rec, "transitional_status");
    out->rebooting = ts && strcmp (ts, "rebooting") == 0;
}

const char *
cn_server_status_of (const cn_status_inputs_t *in, int64_t now_ms, int freshness_s,
                     const cn_liveness_t *live, int64_t *hb)
{
    cn_status_row_t row;
    bool running;
    /* (the owner's vouch only matters for last_heartbeat) */
    if (live && in->uuid[0]
        && (hb ? cn_liveness_get_seen (live, in->uuid, &row)
               : cn_liveness_get (live, in->uuid, &row))) {
        running = row.running;
        if (hb)
            *hb = row.last_heartbeat_ms > 0 ? row.last_heartbeat_ms : 0;
    }
    else {
        running = in->has_last_sysinfo
                  && now_ms - in->last_sysinfo < (int64_t) freshness_s * 1000;
        if (hb)
            *hb = in->has_last_sysinfo ? in->last_sysinfo : 0;
    }
    if (running)
        return "running";
    return in->rebooting ? "rebooting" : "unknown";
}

const char *
cn_server_status (const json_t *rec, int64_t now_ms, int freshness_s,
                  const cn_liveness_t *live)
{
    cn_status_inputs_t in;
    cn_server_status_inputs (rec, &in);
    return cn_server_status_of (&in, now_ms, freshness_s, live, NULL);
}

/* ---- VMs ---- */

#define S_VM_TOMBSTONES_MAX 1000

/* A VM's seq: its "seq" member (integer >= 0), else -1. */
static int64_t
s_vm_seq (const json_t *vm)
{
    json_t *s = json_object_get (vm, "seq");
    return json_is_integer (s) && json_integer_value (s) >= 0 ? json_integer_value (s) : -1;
}

/* The seq of a remembered destroy of vm_uuid, else -1. */
static int64_t
s_tomb_seq (const json_t *rec, const char *vm_uuid)
{
    json_t *t = json_object_get (json_object_get (rec, "vms_destroyed"), vm_uuid);
    return s_vm_seq (t);
}

/* Remember a destroy; keep at most S_VM_TOMBSTONES_MAX (the oldest go). */
static void
s_tomb_add (json_t *rec, const char *vm_uuid, uint64_t seq, int64_t now_ms)
{
    json_t *d = json_object_get (rec, "vms_destroyed");
    if (!json_is_object (d)) {
        d = json_object ();
        json_object_set_new (rec, "vms_destroyed", d);
    }
    json_object_set_new (d, vm_uuid, json_pack ("{s:I,s:I}", "seq", (json_int_t) seq,
                                                "at", (json_int_t) now_ms));
    while (json_object_size (d) > S_VM_TOMBSTONES_MAX) {
        const char *k, *oldest = NULL;
        json_t *v;
        json_int_t oldest_at = 0;
        json_object_foreach (d, k, v) {
            json_int_t at = json_integer_value (json_object_get (v, "at"));
            if (!oldest || at < oldest_at) {
                oldest = k;
                oldest_at = at;
            }
        }
        if (!oldest)
            break;
        json_object_del (d, oldest);
    }
}

cn_srv_result_t
cn_server_apply_vms (json_t *rec, const json_t *vms, int64_t now_ms)
{
    (void) now_ms;
    json_t *old = json_object_get (rec, "vms");
    json_t *out = json_object ();
    const char *k;
    json_t *vm;
    if (!out)
        abort ();
    json_object_foreach ((json_t *) vms, k, vm) {
        if (!json_is_object (vm))
            continue;
        int64_t seq = s_vm_seq (vm);
        json_t *cur = json_object_get (old, k);
        if (cur && s_vm_seq (cur) > seq)
            json_object_set (out, k, cur);          /* we hold a newer one */
        else if (s_tomb_seq (rec, k) >= 0 && s_tomb_seq (rec, k) >= seq)
            continue;                               /* destroyed after this state */
        else
            json_object_set_new (out, k, json_deep_copy (vm));
    }
    if (json_is_object (old) && json_equal (old, out)) {
        json_decref (out);
        return CN_SRV_UNCHANGED;
    }
    json_object_set_new (rec, "vms", out);
    s_recompute_provisionable (rec);
    return CN_SRV_WRITE;
}

bool
cn_server_vm_event_stale (const json_t *rec, const char *vm_uuid, uint64_t seq)
{
    int64_t have = s_vm_seq (json_object_get (json_object_get (rec, "vms"), vm_uuid));
    int64_t tomb = s_tomb_seq (rec, vm_uuid);
    if (tomb > have)
        have = tomb;
    return (int64_t) seq <= have;
}

cn_srv_result_t
cn_server_apply_vm_event (json_t *rec, const char *vm_uuid, const char *event,
                          uint64_t seq, const json_t *vm, int64_t now_ms)
{
    json_t *vms = json_object_get (rec, "vms");
    if (!json_is_object (vms)) {
        vms = json_object ();
        json_object_set_new (rec, "vms", vms);
    }
    json_t *cur = json_object_get (vms, vm_uuid);
    if (cn_server_vm_event_stale (rec, vm_uuid, seq))
        return CN_SRV_STALE;
    if (strcmp (event, "destroy") == 0) {
        json_object_del (vms, vm_uuid);
        s_tomb_add (rec, vm_uuid, seq, now_ms);
        s_recompute_provisionable (rec);
        return CN_SRV_WRITE;
    }
    if (!json_is_object (vm))
        return CN_SRV_STALE;
    json_t *copy = json_deep_copy (vm);
    json_object_set_new (copy, "seq", json_integer ((json_int_t) seq));
    if (cur && json_equal (cur, copy)) {
        json_decref (copy);
        return CN_SRV_UNCHANGED;
    }
    json_object_set_new (vms, vm_uuid, copy);
    json_t *d = json_object_get (rec, "vms_destroyed");
    if (json_is_object (d))
        json_object_del (d, vm_uuid);
    s_recompute_provisionable (rec);
    return CN_SRV_WRITE;
}

/* ---- GET /servers ---- */

void
cn_server_query_fini (cn_server_query_t *q)
{
    if (!q)
        return;
    free (q->filter);
    for (size_t i = 0; i < q->nfields; i++)
        free (q->fields[i]);
    free (q->fields);
    memset (q, 0, sizeof *q);
}

/* A growing string. */
typedef struct {
    char *p;
    size_t len, cap;
} s_buf_t;

static void
s_buf_add (s_buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 128;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc (b->p, cap);
        if (!p)
            abort ();
        b->p = p;
        b->cap = cap;
    }
    memcpy (b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void
s_buf_puts (s_buf_t *b, const char *s)
{
    s_buf_add (b, s, strlen (s));
}

/* A value inside a filter, escaped as RFC 4515 (and the reference's
 * filterEscape): * ( ) \ NUL become \2a \28 \29 \5c \00. */
static void
s_buf_escaped (s_buf_t *b, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '*': s_buf_puts (b, "\\2a"); break;
        case '(': s_buf_puts (b, "\\28"); break;
        case ')': s_buf_puts (b, "\\29"); break;
        case '\\': s_buf_puts (b, "\\5c"); break;
        default: s_buf_add (b, s, 1); break;
        }
    }
}

/* Split a comma-separated list, trimming blanks around items; each item must
 * be non-empty and accepted by ok (may be NULL). Returns a new array of
 * strings, or NULL when an item is bad. */
static json_t *
s_split_csv (const char *s, bool (*ok) (const char *))
{
    json_t *out = json_array ();
    const char *p = s;
    for (;;) {
        const char *comma = strchr (p, ',');
        const char *end = comma ? comma : p + strlen (p);
        while (p < end && isspace ((unsigned char) *p))
            p++;
        const char *e = end;
        while (e > p && isspace ((unsigned char) e[-1]))
            e--;
        if (e == p)
            goto bad;
        char *item = strndup (p, (size_t) (e - p));
        if (ok && !ok (item)) {
            free (item);
            goto bad;
        }
        json_array_append_new (out, json_string (item));
        free (item);
        if (!comma)
            break;
        p = comma + 1;
    }
    return out;
bad:
    json_decref (out);
    return NULL;
}

static bool
s_word_ok (const char *s)
{
    for (; *s; s++)
        if (!isalpha ((unsigned char) *s) && *s != '_')
            return false;
    return true;
}

static bool
s_field_ok (const char *s)
{
    for (; *s; s++)
        if (!isalnum ((unsigned char) *s) && *s != '_')
            return false;
    return true;
}

static bool
s_uuid_ok (const char *s)
{
    return cn_uuid_valid (s);
}

static const char *const s_list_params[] = {
    "uuids", "setup", "headnode", "reserved", "reservoir", "hostname",
    "extras", "fields", "limit", "offset", NULL
};

/* The reference's isInt: an optionally negative decimal integer (or a JSON
 * integer). */
static bool
s_isint (const json_t *v, int64_t *out)
{
    if (json_is_integer (v)) {
        *out = (int64_t) json_integer_value (v);
        return true;
    }
    if (!json_is_string (v))
        return false;
    const char *s = json_string_value (v), *p = s;
    if (*p == '-')
        p++;
    if (!*p || (*p == '0' && p[1]))
        return false;
    for (; *p; p++)
        if (!isdigit ((unsigned char) *p))
            return false;
    errno = 0;
    long long n = strtoll (s, NULL, 10);
    if (errno)
        return false;
    *out = (int64_t) n;
    return true;
}

int
cn_server_list_query (const json_t *params, cn_server_query_t *q, cn_apierr_t *err)
{
    memset (q, 0, sizeof *q);
    q->limit = S_LIST_MAX_LIMIT;
    if (params && !json_is_object (params)) {
        cn_apierr_set (err, 409, "InvalidArgument", "parameters must be an object");
        return -1;
    }

    /* strict: the reference answers an unknown parameter with 409 */
    const char *k;
    json_t *v;
    if (params)
        json_object_foreach ((json_t *) params, k, v) {
            bool known = false;
            for (const char *const *p = s_list_params; *p; p++)
                if (strcmp (k, *p) == 0)
                    known = true;
            if (!known) {
                cn_apierr_set (err, 409, "InvalidArgument",
                               "%.200s is not an explicitly defined parameter", k);
                return -1;
            }
        }

    json_t *errs = json_array ();
    json_t *uuids = NULL, *extras = NULL, *fields = NULL;
    int flags[4] = { -1, -1, -1, -1 };
    static const char *const bools[4] = { "setup", "headnode", "reserved", "reservoir" };
    const char *hostname = NULL;
    int64_t limit = 0, offset = 0;
    bool have_limit = false, have_offset = false;

    for (int i = 0; i < 4; i++) {
        v = json_object_get (params, bools[i]);
        if (v && (flags[i] = s_boolish (v)) < 0)
            cn_apierr_invalid (errs, bools[i], "Invalid value for param '%s'", bools[i]);
    }
    v = json_object_get (params, "extras");
    if (v) {
        if (!json_is_string (v) || !(extras = s_split_csv (json_string_value (v), s_word_ok)))
            cn_apierr_invalid (errs, "extras", "Invalid value for param 'extras'");
    }
    v = json_object_get (params, "fields");
    if (v) {
        if (!json_is_string (v) || !(fields = s_split_csv (json_string_value (v), s_field_ok))
            || json_array_size (fields) > S_MAX_FIELDS)
            cn_apierr_invalid (errs, "fields", "Invalid value for param 'fields'");
    }
    v = json_object_get (params, "hostname");
    if (v) {
        if (!json_is_string (v))
            cn_apierr_invalid (errs, "hostname", "value was not a string");
        else if (!*(hostname = json_string_value (v)))
            cn_apierr_invalid (errs, "hostname", "value is empty");
        else if (isspace ((unsigned char) hostname[0]) ||
                 isspace ((unsigned char) hostname[strlen (hostname) - 1]))
            cn_apierr_invalid (errs, "hostname", "value contains leading or trailing whitespace");
    }
    v = json_object_get (params, "limit");
    if (v) {
        if (!s_isint (v, &limit))
            cn_apierr_invalid (errs, "limit", "Invalid value for param 'limit'");
        have_limit = true;
    }
    v = json_object_get (params, "offset");
    if (v) {
        if (!s_isint (v, &offset))
            cn_apierr_invalid (errs, "offset", "Invalid value for param 'offset'");
        have_offset = true;
    }
    v = json_object_get (params, "uuids");
    if (v) {
        if (json_is_string (v))
            uuids = s_split_csv (json_string_value (v), s_uuid_ok);
        else if (json_is_array (v)) {
            size_t i;
            json_t *u;
            uuids = json_array ();
            json_array_foreach (v, i, u)
                if (!json_is_string (u) || !cn_uuid_valid (json_string_value (u))) {
                    json_decref (uuids);
                    uuids = NULL;
                    break;
                }
                else
                    json_array_append (uuids, u);
            if (uuids && json_array_size (uuids) == 0) {
                json_decref (uuids);
                uuids = NULL;
            }
        }
        if (!uuids || json_array_size (uuids) > S_MAX_UUIDS)
            cn_apierr_invalid (errs, "uuids", "Invalid value for param 'uuids' "
                         "(a comma-separated list of UUIDs)");
    }

    if (json_array_size (errs) > 0) {
        s_invalid_params (err, 500, errs);
        goto fail;
    }
    /* the range checks come after the rules, with 400, as the reference */
    if (have_limit && (limit < S_LIST_MIN_LIMIT || limit > S_LIST_MAX_LIMIT)) {
        cn_apierr_invalid (errs, "limit", "limit must be in the range %d-%d (inclusive)",
                     S_LIST_MIN_LIMIT, S_LIST_MAX_LIMIT);
        s_invalid_params (err, 400, errs);
        goto fail;
    }
    if (have_offset && offset < 0) {
        cn_apierr_invalid (errs, "offset", "offset must be 0 or more");
        s_invalid_params (err, 400, errs);
        goto fail;
    }
    json_decref (errs);
    errs = NULL;
    if (have_limit)
        q->limit = limit;
    q->offset = offset;

    if (extras) {
        size_t i;
        json_array_foreach (extras, i, v) {
            const char *w = json_string_value (v);
            if (strcasecmp (w, "agents") == 0) q->extras |= CN_EXTRA_AGENTS;
            else if (strcasecmp (w, "vms") == 0) q->extras |= CN_EXTRA_VMS;
            else if (strcasecmp (w, "memory") == 0) q->extras |= CN_EXTRA_MEMORY;
            else if (strcasecmp (w, "disk") == 0) q->extras |= CN_EXTRA_DISK;
            else if (strcasecmp (w, "sysinfo") == 0) q->extras |= CN_EXTRA_SYSINFO;
            else if (strcasecmp (w, "capacity") == 0) q->extras |= CN_EXTRA_CAPACITY;
            else if (strcasecmp (w, "all") == 0) q->extras |= CN_EXTRA_ALL;
            /* other words (status, last_heartbeat, ...) are accepted and
             * ignored, as the reference does */
        }
        json_decref (extras);
        extras = NULL;
    }
    if (fields) {
        q->nfields = json_array_size (fields);
        q->fields = calloc (q->nfields, sizeof *q->fields);
        if (!q->fields)
            abort ();
        for (size_t i = 0; i < q->nfields; i++)
            q->fields[i] = strdup (json_string_value (json_array_get (fields, i)));
        json_decref (fields);
        fields = NULL;
    }

    /* the filter: the uuid part, then the indexed conditions; the reference
     * keeps its 'default' boot-parameters object in the same bucket, so it
     * is always left out */
    s_buf_t b = { 0 };
    s_buf_puts (&b, "(&");
    if (uuids) {
        size_t n = json_array_size (uuids), i;
        if (n > 1)
            s_buf_puts (&b, "(|");
        json_array_foreach (uuids, i, v) {
            char low[37];
            cn_uuid_normalize (json_string_value (v), low);
            s_buf_puts (&b, "(uuid=");
            s_buf_puts (&b, low);
            s_buf_puts (&b, ")");
        }
        if (n > 1)
            s_buf_puts (&b, ")");
        json_decref (uuids);
        uuids = NULL;
    }
    else
        s_buf_puts (&b, "(uuid=*)");
    for (int i = 0; i < 4; i++)
        if (flags[i] >= 0) {
            s_buf_puts (&b, "(");
            s_buf_puts (&b, bools[i]);
            s_buf_puts (&b, flags[i] ? "=true)" : "=false)");
        }
    if (hostname) {
        s_buf_puts (&b, "(hostname=");
        s_buf_escaped (&b, hostname);
        s_buf_puts (&b, ")");
    }
    s_buf_puts (&b, "(!(uuid=default)))");
    q->filter = b.p;
    return 0;

fail:
    json_decref (uuids);
    json_decref (extras);
    json_decref (fields);
    cn_server_query_fini (q);
    return -1;
}

/* ---- rendering ---- */

/* overprovision_ratios is stored as the reference stores it, a query string
 * ("cpu=4&ram=1", so Moray can index it as a string); the API shows an
 * object of numbers. A new object, or NULL when there is nothing. */
static json_t *
s_ratios_object (const json_t *stored)
{
    if (json_is_object (stored))
        return json_object_size (stored) ? json_deep_copy (stored) : NULL;
    const char *s = json_string_value (stored);
    if (!s || !*s)
        return NULL;
    json_t *o = json_object ();
    char *copy = strdup (s), *save = NULL;
    for (char *kv = strtok_r (copy, "&", &save); kv; kv = strtok_r (NULL, "&", &save)) {
        char *eq = strchr (kv, '=');
        if (!eq || eq == kv)
            continue;
        *eq = '\0';
        char *end;
        double d = strtod (eq + 1, &end);
        if (end == eq + 1 || *end || !isfinite (d))
            json_object_set_new (o, kv, json_null ());
        else if (d == floor (d) && fabs (d) < 9.0e15)
            json_object_set_new (o, kv, json_integer ((json_int_t) d));
        else
            json_object_set_new (o, kv, json_real (d));
    }
    free (copy);
    if (json_object_size (o) == 0) {
        json_decref (o);
        return NULL;
    }
    return o;
}

static double
s_num_or (const json_t *o, const char *key, double dflt)
{
    json_t *v = json_object_get (o, key);
    return json_is_number (v) ? json_number_value (v) : dflt;
}

/* unreserved_cpu (cpu_cap units), unreserved_ram and unreserved_disk (MiB),
 * following the allocator's calculation (sdc-designation's
 * calculate-server-unreserved). A field that cannot be derived is left out. */
static void
s_capacity (json_t *out, const json_t *rec)
{
    const json_t *si = json_object_get (rec, "sysinfo");
    if (!json_is_object (si) || json_object_size (si) == 0) {
        json_object_set_new (out, "unreserved_cpu", json_integer (0));
        json_object_set_new (out, "unreserved_ram", json_integer (0));
        json_object_set_new (out, "unreserved_disk", json_integer (0));
        return;
    }
    json_t *ratios = s_ratios_object (json_object_get (rec, "overprovision_ratios"));
    if (!ratios)
        ratios = json_pack ("{s:f}", "ram", 1.0);
    double op_cpu = s_num_or (ratios, "cpu", 0), op_ram = s_num_or (ratios, "ram", 0);
    double op_disk = s_num_or (ratios, "disk", 0);
    json_t *vms = json_object_get (rec, "vms");

    int64_t cores;
    bool have_cpu = s_intish (json_object_get (si, "CPU Total Cores"), &cores);
    double cpu = have_cpu ? (double) cores * 100 : 0;

    double total_mib = -1;
    if (json_is_number (json_object_get (rec, "memory_total_bytes")))
        total_mib = json_number_value (json_object_get (rec, "memory_total_bytes")) / S_MIB;
    else if (json_is_integer (json_object_get (rec, "ram")))
        total_mib = (double) json_integer_value (json_object_get (rec, "ram"));
    double ram = total_mib * (1 - s_num_or (rec, "reservation_ratio", 0.15));

    int nkvm = 0;
    const char *k;
    json_t *vm;
    if (json_is_object (vms))
        json_object_foreach (vms, k, vm) {
            const char *state = s_str (vm, "state");
            const char *brand = s_str (vm, "brand");
            bool failed = state && strcmp (state, "failed") == 0;
            bool kvm = brand && strcmp (brand, "kvm") == 0;
            if (kvm)
                nkvm++;
            json_t *cap = json_object_get (vm, "cpu_cap");
            if (json_is_number (cap) && json_number_value (cap) != 0) {
                if (op_cpu > 0 && !failed)
                    cpu -= json_number_value (cap) / op_cpu;
            }
            else
                cpu = 0;
            double m = s_num_or (vm, "max_physical_memory", 0);
            if (op_ram > 0 && !failed) {
                if (!kvm)
                    m /= op_ram;
                ram -= m;
            }
        }
    if (have_cpu)
        json_object_set_new (out, "unreserved_cpu", json_integer ((json_int_t) floor (cpu)));
    if (total_mib >= 0)
        json_object_set_new (out, "unreserved_ram", json_integer ((json_int_t) floor (ram)));

    if (json_is_number (json_object_get (rec, "disk_pool_size_bytes"))) {
        double d = s_num_or (rec, "disk_pool_size_bytes", 0) -
                   s_num_or (rec, "disk_installed_images_used_bytes", 0) -
                   s_num_or (rec, "disk_cores_quota_used_bytes", 0);
        if (op_disk > 0)
            d -= s_num_or (rec, "disk_zone_quota_bytes", 0) / op_disk +
                 s_num_or (rec, "disk_kvm_zvol_volsize_bytes", 0) +
                 nkvm * 10.0 * 1024 * S_MIB;
        json_object_set_new (out, "unreserved_disk",
                             json_integer ((json_int_t) floor (d / S_MIB)));
    }
    json_decref (ratios);
}

/* Delete every key starting with prefix. */
static void
s_del_prefix (json_t *o, const char *prefix)
{
    size_t n = strlen (prefix);
    const char *k;
    json_t *v;
    void *tmp;
    json_object_foreach_safe (o, tmp, k, v)
        if (strncmp (k, prefix, n) == 0)
            json_object_del (o, k);
}

json_t *
cn_server_render (const json_t *rec, bool full, unsigned extras,
                  char *const *fields, size_t nfields,
                  int64_t now_ms, int freshness_s, const cn_liveness_t *live)
{
    if (!json_is_object (rec))
        return NULL;
    if (nfields > 0)
        full = true;            /* a named field is shown whatever the extras */
    if (full)
        extras = CN_EXTRA_ALL;

    json_t *out = json_deep_copy (rec);
    json_object_del (out, "sysinfo_ms");
    json_object_del (out, "last_sysinfo");

    json_object_del (out, "vms_destroyed");

    /* status and last heartbeat from one look at the record and the table */
    cn_status_inputs_t in;
    cn_server_status_inputs (rec, &in);
    int64_t last = 0;
    json_object_set_new (out, "status",
                         json_string (cn_server_status_of (&in, now_ms, freshness_s, live, &last)));
    if (full || extras) {
        if (last != 0)
            s_set_iso (out, "last_heartbeat", last);
        else
            json_object_set_new (out, "last_heartbeat", json_null ());
    }
    else
        json_object_del (out, "last_heartbeat");

    json_t *ratios = s_ratios_object (json_object_get (rec, "overprovision_ratios"));
    if (ratios)
        json_object_set_new (out, "overprovision_ratios", ratios);
    else
        json_object_del (out, "overprovision_ratios");

    if (extras & CN_EXTRA_CAPACITY)
        s_capacity (out, rec);
    if (!(extras & CN_EXTRA_SYSINFO))
        json_object_del (out, "sysinfo");
    if (!(extras & CN_EXTRA_VMS))
        json_object_del (out, "vms");
    if (!(extras & CN_EXTRA_AGENTS))
        json_object_del (out, "agents");
    if (!(extras & CN_EXTRA_MEMORY))
        s_del_prefix (out, "memory_");
    if (!(extras & CN_EXTRA_DISK))
        s_del_prefix (out, "disk_");

    if (nfields > 0) {
        json_t *picked = json_object ();
        for (size_t i = 0; i < nfields; i++) {
            json_t *v = json_object_get (out, fields[i]);
            if (v)
                json_object_set (picked, fields[i], v);
        }
        json_decref (out);
        out = picked;
    }
    return out;
}

/* ---- POST /servers/:uuid ---- */

typedef enum {
    S_U_ARRAY, S_U_OBJECT, S_U_STRING, S_U_NUMBER, S_U_BOOL, S_U_IGNORED_NUMBER,
    S_U_IGNORED_STRING
} s_utype_t;

/* The reference's ServerUpdate rules (lib/endpoints/servers.js), in its
 * order. Strings are also checked for surrounding blanks (isTrim). */
static const struct {
    const char *name;
    s_utype_t type;
} s_update_params[] = {
    { "agents", S_U_ARRAY },
    { "boot_params", S_U_OBJECT },
    { "boot_platform", S_U_STRING },
    { "comments", S_U_STRING },
    { "datacenter", S_U_STRING },
    { "default_console", S_U_STRING },
    { "etag_retries", S_U_IGNORED_NUMBER },
    { "next_reboot", S_U_STRING },
    { "overprovision_ratios", S_U_OBJECT },
    { "rack_identifier", S_U_STRING },
    { "reservation_ratio", S_U_NUMBER },
    { "reserved", S_U_BOOL },
    { "reservoir", S_U_BOOL },
    { "serial", S_U_STRING },
    { "server_uuid", S_U_IGNORED_STRING },
    { "setting_up", S_U_BOOL },
    { "setup", S_U_BOOL },
    { "traits", S_U_OBJECT },
    { "transitional_status", S_U_STRING },
};
#define S_NUPDATE (sizeof s_update_params / sizeof s_update_params[0])

const char *
cn_js_type (const json_t *v)
{
    if (!v)
        return "[object Undefined]";
    switch (json_typeof (v)) {
    case JSON_OBJECT: return "[object Object]";
    case JSON_ARRAY: return "[object Array]";
    case JSON_STRING: return "[object String]";
    case JSON_INTEGER:
    case JSON_REAL: return "[object Number]";
    case JSON_TRUE:
    case JSON_FALSE: return "[object Boolean]";
    case JSON_NULL: return "[object Null]";
    }
    return "[object Undefined]";
}

/* JS's new Date(s).toISOString() === s for the forms we accept:
 * YYYY-MM-DDTHH:MM:SS.mmmZ with a real calendar date. */
static bool
s_iso_exact (const char *s)
{
    int64_t ms;
    char back[32];
    if (strlen (s) != 24 || !cn_iso8601_to_ms (s, &ms))
        return false;
    return strcmp (cn_iso8601 (ms, back, sizeof back), s) == 0;
}

int
cn_server_update (json_t *rec, const json_t *params, int64_t now_ms, cn_apierr_t *err)
{
    const char *k;
    json_t *v;
    if (!json_is_object (params)) {
        cn_apierr_set (err, 409, "InvalidArgument", "parameters must be an object");
        return -1;
    }
    /* strict: the first unknown parameter is a 409 */
    json_object_foreach ((json_t *) params, k, v) {
        bool known = false;
        for (size_t i = 0; i < S_NUPDATE; i++)
            if (strcmp (k, s_update_params[i].name) == 0)
                known = true;
        if (!known) {
            cn_apierr_set (err, 409, "InvalidArgument",
                           "%.200s is not an explicitly defined parameter", k);
            return -1;
        }
    }

    /* every rule, collecting failures (500 InvalidParameters) */
    json_t *errs = json_array ();
    double ratio = 0;
    for (size_t i = 0; i < S_NUPDATE; i++) {
        const char *name = s_update_params[i].name;
        v = json_object_get (params, name);
        if (!v)
            continue;
        switch (s_update_params[i].type) {
        case S_U_ARRAY:
            if (!json_is_array (v))
                cn_apierr_invalid (errs, name, "value was not an array");
            break;
        case S_U_OBJECT:
            if (!json_is_object (v))
                cn_apierr_invalid (errs, name, "value is not an object. (was: %s)", cn_js_type (v));
            break;
        case S_U_STRING:
        case S_U_IGNORED_STRING:
            if (!json_is_string (v))
                cn_apierr_invalid (errs, name, "value was not a string");
            else {
                const char *s = json_string_value (v);
                size_t n = strlen (s);
                if (s_update_params[i].type == S_U_STRING && n > 0 &&
                    (isspace ((unsigned char) s[0]) || isspace ((unsigned char) s[n - 1])))
                    cn_apierr_invalid (errs, name, "value contains leading or trailing whitespace");
            }
            break;
        case S_U_NUMBER:
            if (!s_numberish (v, &ratio))
                cn_apierr_invalid (errs, name, "value was not a number");
            else if (ratio < 0 || ratio > 1)
                cn_apierr_invalid (errs, name, "value must be between 0 and 1");
            break;
        case S_U_IGNORED_NUMBER: {
            double d;
            if (!s_numberish (v, &d))
                cn_apierr_invalid (errs, name, "value was not a number");
            break;
        }
        case S_U_BOOL:
            if (s_boolish (v) < 0)
                cn_apierr_invalid (errs, name, "value was not true or false");
            break;
        }
    }
    if (json_array_size (errs) > 0) {
        s_invalid_params (err, 500, errs);
        return -1;
    }
    json_decref (errs);

    /* the reference's further checks, answered with 409 InvalidArgument */
    json_t *opr = json_object_get (params, "overprovision_ratios");
    if (opr) {
        static const char *const keys[] = { "cpu", "ram", "disk", "io", "net" };
        json_object_foreach (opr, k, v) {
            bool known = false;
            for (size_t i = 0; i < 5; i++)
                if (strcmp (k, keys[i]) == 0)
                    known = true;
            if (!known) {
                cn_apierr_set (err, 409, "InvalidArgument", "Invalid key %.100s", k);
                return -1;
            }
            if (!json_is_number (v)) {
                cn_apierr_set (err, 409, "InvalidArgument", "Invalid type for %s", k);
                return -1;
            }
            if (json_number_value (v) < 0) {
                cn_apierr_set (err, 409, "InvalidArgument", "Invalid value for %s", k);
                return -1;
            }
        }
    }
    const char *next = json_string_value (json_object_get (params, "next_reboot"));
    if (next && *next && !s_iso_exact (next)) {
        cn_apierr_set (err, 409, "InvalidArgument",
                       "Invalid date for next_reboot; not an ISO date format");
        return -1;
    }

    /* apply */
    for (size_t i = 0; i < S_NUPDATE; i++) {
        const char *name = s_update_params[i].name;
        v = json_object_get (params, name);
        if (!v)
            continue;
        switch (s_update_params[i].type) {
        case S_U_ARRAY:
        case S_U_STRING:
            json_object_set_new (rec, name, json_deep_copy (v));
            break;
        case S_U_OBJECT:
            if (strcmp (name, "overprovision_ratios") == 0) {
                s_buf_t b = { 0 };
                const char *rk;
                json_t *rv;
                s_buf_puts (&b, "");
                json_object_foreach (v, rk, rv) {
                    char num[64];
                    if (b.len)
                        s_buf_puts (&b, "&");
                    s_buf_puts (&b, rk);
                    s_buf_puts (&b, "=");
                    if (json_is_integer (rv))
                        snprintf (num, sizeof num, "%" JSON_INTEGER_FORMAT,
                                  json_integer_value (rv));
                    else
                        snprintf (num, sizeof num, "%.17g", json_real_value (rv));
                    /* the shortest form that reads back the same */
                    for (int prec = 1; prec <= 17 && json_is_real (rv); prec++) {
                        char t[64];
                        snprintf (t, sizeof t, "%.*g", prec, json_real_value (rv));
                        if (strtod (t, NULL) == json_real_value (rv)) {
                            snprintf (num, sizeof num, "%s", t);
                            break;
                        }
                    }
                    s_buf_puts (&b, num);
                }
                json_object_set_new (rec, name, json_string (b.p ? b.p : ""));
                free (b.p);
                break;
            }
            json_object_set_new (rec, name, json_deep_copy (v));
            break;
        case S_U_NUMBER:
            s_numberish (v, &ratio);
            json_object_set_new (rec, name, json_real (ratio));
            s_recompute_provisionable (rec);
            break;
        case S_U_BOOL:
            json_object_set_new (rec, name, json_boolean (s_boolish (v)));
            break;
        case S_U_IGNORED_NUMBER:
        case S_U_IGNORED_STRING:
            break;
        }
    }
    return 0;
}
