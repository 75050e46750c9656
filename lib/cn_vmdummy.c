/*
 * cn_vmdummy: see include/cn_vmdummy.h.
 *
 * VMs live in an array of pointers (a CN holds tens of VMs, rarely
 * thousands; a linear search is cheaper than any index at that size). With a
 * directory, every change is written before its event fires ("persist, then
 * report"): to <uuid>.json.tmp, then renamed over <uuid>.json, so a reader
 * never sees half a file.
 */
#include "cn_vmdummy.h"

#include "cn_log.h"
#include "cn_msg.h"
#include "cn_util.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define COMPONENT "vmdummy"

struct cn_vmdummy {
    char *dir;
    cn_vmdummy_delays_t delays;
    cn_vm_event_cb_t *cb;
    void *arg;
    cn_vm_t **vms;
    size_t n, cap;
};

/* Keys the struct holds; everything else goes to `extra`. */
static const char *const s_known[] = {
    "uuid", "owner_uuid", "image_uuid", "brand", "state", "alias", "ram", "quota",
    "last_modified", "seq", "zone_state", NULL
};

static bool
s_is_known (const char *key)
{
    for (int i = 0; s_known[i]; i++)
        if (strcmp (key, s_known[i]) == 0)
            return true;
    return false;
}

const char *
cn_vm_event_name (cn_vm_event_t ev)
{
    switch (ev) {
    case CN_VM_EV_CREATE: return "create";
    case CN_VM_EV_STATE: return "state";
    case CN_VM_EV_UPDATE: return "update";
    case CN_VM_EV_DESTROY: return "destroy";
    }
    return "unknown";
}

const char *
cn_vm_zone_state (const char *state)
{
    if (strcmp (state, "running") == 0)
        return "running";
    if (strcmp (state, "stopped") == 0 || strcmp (state, "provisioning") == 0)
        return "installed";
    if (strcmp (state, "stopping") == 0)
        return "shutting_down";
    return state;
}

/* ---- serialisation ---- */

json_t *
cn_vm_to_json (const cn_vm_t *vm)
{
    json_t *o = vm->extra ? json_deep_copy (vm->extra) : json_object ();
    if (!o)
        abort ();
    char iso[32];
    cn_iso8601 (vm->last_modified, iso, sizeof iso);
    json_object_set_new (o, "uuid", json_string (vm->uuid));
    json_object_set_new (o, "brand", json_string (vm->brand));
    json_object_set_new (o, "state", json_string (vm->state));
    json_object_set_new (o, "zone_state", json_string (cn_vm_zone_state (vm->state)));
    json_object_set_new (o, "ram", json_integer (vm->ram));
    json_object_set_new (o, "quota", json_integer (vm->quota));
    json_object_set_new (o, "alias", vm->alias ? json_string (vm->alias) : json_null ());
    json_object_set_new (o, "owner_uuid",
                         vm->owner_uuid[0] ? json_string (vm->owner_uuid) : json_null ());
    json_object_set_new (o, "image_uuid",
                         vm->image_uuid[0] ? json_string (vm->image_uuid) : json_null ());
    json_object_set_new (o, "last_modified", json_string (iso));
    json_object_set_new (o, "seq", json_integer ((json_int_t) vm->seq));
    return o;
}

static void
s_pack_str (msgpack_packer *pk, const char *s)
{
    size_t n = strlen (s);
    msgpack_pack_str (pk, n);
    msgpack_pack_str_body (pk, s, n);
}

static void
s_pack_kv (msgpack_packer *pk, const char *k, const char *v)
{
    s_pack_str (pk, k);
    if (v && *v)
        s_pack_str (pk, v);
    else
        msgpack_pack_nil (pk);
}

void
cn_vm_pack (msgpack_packer *pk, const cn_vm_t *vm)
{
    size_t nextra = 0;
    const char *k;
    json_t *v;
    if (vm->extra)
        json_object_foreach (vm->extra, k, v)
            if (!s_is_known (k))
                nextra++;
    msgpack_pack_map (pk, 11 + nextra);
    char iso[32];
    cn_iso8601 (vm->last_modified, iso, sizeof iso);
    s_pack_kv (pk, "uuid", vm->uuid);
    s_pack_kv (pk, "brand", vm->brand);
    s_pack_kv (pk, "state", vm->state);
    s_pack_kv (pk, "zone_state", cn_vm_zone_state (vm->state));
    s_pack_str (pk, "ram");
    msgpack_pack_int64 (pk, vm->ram);
    s_pack_str (pk, "quota");
    msgpack_pack_int64 (pk, vm->quota);
    s_pack_kv (pk, "alias", vm->alias);
    s_pack_kv (pk, "owner_uuid", vm->owner_uuid);
    s_pack_kv (pk, "image_uuid", vm->image_uuid);
    s_pack_kv (pk, "last_modified", iso);
    s_pack_str (pk, "seq");
    msgpack_pack_uint64 (pk, vm->seq);
    if (vm->extra)
        json_object_foreach (vm->extra, k, v) {
            if (s_is_known (k))
                continue;
            s_pack_str (pk, k);
            cn_msgpack_json (pk, v);
        }
}

bool
cn_vm_event_rk (const char *server_uuid, const char *vm_uuid, char *out, size_t len)
{
    int n = snprintf (out, len, "vm.event.%s.%s", server_uuid, vm_uuid);
    return n > 0 && (size_t) n < len;
}

bool
cn_vm_event_binding (const char *server_uuid, char *out, size_t len)
{
    int n = snprintf (out, len, "vm.event.%s.*", server_uuid);
    return n > 0 && (size_t) n < len;
}

char *
cn_vm_event_body (const char *server_uuid, const cn_vm_t *vm, cn_vm_event_t ev,
                  int64_t time_ms, size_t *len)
{
    json_t *o = json_pack ("{s:s,s:s,s:s,s:I,s:I}", "server_uuid", server_uuid,
                           "vm_uuid", vm->uuid, "event", cn_vm_event_name (ev),
                           "seq", (json_int_t) vm->seq, "time_ms", (json_int_t) time_ms);
    if (!o)
        abort ();
    if (ev != CN_VM_EV_DESTROY)
        json_object_set_new (o, "vm", cn_vm_to_json (vm));
    char *s = json_dumps (o, JSON_COMPACT);
    json_decref (o);
    if (!s)
        abort ();
    *len = strlen (s);
    return s;
}

/* ---- parsing a VM file ---- */

/* "2024-03-07T00:04:47.123Z" (fraction optional) -> ms; false otherwise. */
static bool
s_parse_iso (const char *s, int64_t *out)
{
    struct tm tm;
    memset (&tm, 0, sizeof tm);
    int ms = 0;
    char frac[8] = "";
    int n = 0;
    if (sscanf (s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &n) != 6)
        return false;
    const char *p = s + n;
    if (*p == '.') {
        p++;
        int k = 0;
        while (*p >= '0' && *p <= '9') {
            if (k < 3)
                frac[k++] = *p;
            p++;
        }
        while (k < 3)
            frac[k++] = '0';
        ms = atoi (frac);
    }
    if (*p != 'Z' || p[1])
        return false;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm (&tm);
    if (t == (time_t) -1)
        return false;
    *out = (int64_t) t * 1000 + ms;
    return true;
}

static void
s_copy (char *dst, size_t cap, const char *src)
{
    snprintf (dst, cap, "%s", src ? src : "");
}

static void
s_vm_free (cn_vm_t *vm)
{
    if (!vm)
        return;
    free (vm->alias);
    json_decref (vm->extra);
    free (vm);
}

/* Apply one known key from JSON; false on a wrong type. */
static bool
s_apply_key (cn_vm_t *vm, const char *k, const json_t *v, bool allow_identity)
{
    if (strcmp (k, "ram") == 0 || strcmp (k, "quota") == 0) {
        if (!json_is_integer (v) || json_integer_value (v) < 0)
            return false;
        if (k[0] == 'r')
            vm->ram = json_integer_value (v);
        else
            vm->quota = json_integer_value (v);
        return true;
    }
    if (strcmp (k, "alias") == 0) {
        if (!json_is_string (v) && !json_is_null (v))
            return false;
        free (vm->alias);
        vm->alias = json_is_string (v) ? strdup (json_string_value (v)) : NULL;
        return true;
    }
    if (strcmp (k, "owner_uuid") == 0 || strcmp (k, "image_uuid") == 0) {
        char *dst = k[0] == 'o' ? vm->owner_uuid : vm->image_uuid;
        if (json_is_null (v)) {
            dst[0] = '\0';
            return true;
        }
        return json_is_string (v) && cn_uuid_normalize (json_string_value (v), dst);
    }
    if (strcmp (k, "brand") == 0) {
        if (!json_is_string (v) || !*json_string_value (v)
            || strlen (json_string_value (v)) >= sizeof vm->brand)
            return false;
        s_copy (vm->brand, sizeof vm->brand, json_string_value (v));
        return true;
    }
    if (!allow_identity)
        return false;
    if (strcmp (k, "uuid") == 0)
        return json_is_string (v) && cn_uuid_normalize (json_string_value (v), vm->uuid);
    if (strcmp (k, "state") == 0) {
        if (!json_is_string (v) || !*json_string_value (v)
            || strlen (json_string_value (v)) >= sizeof vm->state)
            return false;
        s_copy (vm->state, sizeof vm->state, json_string_value (v));
        return true;
    }
    if (strcmp (k, "seq") == 0) {
        if (!json_is_integer (v) || json_integer_value (v) < 0)
            return false;
        vm->seq = (uint64_t) json_integer_value (v);
        return true;
    }
    if (strcmp (k, "last_modified") == 0) {
        if (json_is_integer (v))
            vm->last_modified = json_integer_value (v);
        else if (!json_is_string (v) || !s_parse_iso (json_string_value (v), &vm->last_modified))
            return false;
        return true;
    }
    return true;                /* zone_state: derived */
}

/* ---- files ---- */

static int
s_write (cn_vmdummy_t *b, const cn_vm_t *vm, char *err, size_t errlen)
{
    if (!b->dir)
        return 0;
    char path[4096], tmp[4200];
    snprintf (path, sizeof path, "%s/%s.json", b->dir, vm->uuid);
    snprintf (tmp, sizeof tmp, "%s.tmp", path);
    json_t *o = cn_vm_to_json (vm);
    int rc = json_dump_file (o, tmp, JSON_INDENT (2) | JSON_SORT_KEYS);
    json_decref (o);
    if (rc != 0 || rename (tmp, path) != 0) {
        snprintf (err, errlen, "cannot write %s: %s", path, strerror (errno));
        unlink (tmp);
        return -1;
    }
    return 0;
}

static int
s_unlink (cn_vmdummy_t *b, const char *uuid, char *err, size_t errlen)
{
    if (!b->dir)
        return 0;
    char path[4096];
    snprintf (path, sizeof path, "%s/%s.json", b->dir, uuid);
    if (unlink (path) != 0 && errno != ENOENT) {
        snprintf (err, errlen, "cannot remove %s: %s", path, strerror (errno));
        return -1;
    }
    return 0;
}

static void
s_add (cn_vmdummy_t *b, cn_vm_t *vm)
{
    if (b->n == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 8;
        b->vms = realloc (b->vms, b->cap * sizeof *b->vms);
        if (!b->vms)
            abort ();
    }
    b->vms[b->n++] = vm;
}

static ssize_t
s_index (const cn_vmdummy_t *b, const char *uuid)
{
    for (size_t i = 0; i < b->n; i++)
        if (strcasecmp (b->vms[i]->uuid, uuid) == 0)
            return (ssize_t) i;
    return -1;
}

static void
s_load (cn_vmdummy_t *b)
{
    DIR *d = opendir (b->dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir (d))) {
        size_t nl = strlen (de->d_name);
        if (nl != 36 + 5 || strcmp (de->d_name + 36, ".json") != 0)
            continue;
        char want[37], path[4096];
        memcpy (want, de->d_name, 36);
        want[36] = '\0';
        snprintf (path, sizeof path, "%s/%s", b->dir, de->d_name);
        json_error_t jerr;
        json_t *o = json_load_file (path, 0, &jerr);
        cn_vm_t *vm = calloc (1, sizeof *vm);
        if (!vm)
            abort ();
        bool ok = json_is_object (o);
        const char *k;
        json_t *v;
        if (ok)
            json_object_foreach (o, k, v) {
                if (!s_is_known (k)) {
                    if (!vm->extra)
                        vm->extra = json_object ();
                    json_object_set (vm->extra, k, v);
                }
                else if (!s_apply_key (vm, k, v, true)) {
                    ok = false;
                    break;
                }
            }
        if (ok && (strcasecmp (vm->uuid, want) != 0 || !vm->brand[0] || !vm->state[0]))
            ok = false;
        if (ok && s_index (b, vm->uuid) >= 0)
            ok = false;
        if (!ok) {
            CN_WARN (COMPONENT, "VM file skipped", "{s:s,s:s}", "path", path,
                     "reason", o ? "bad or mismatched keys" : jerr.text);
            s_vm_free (vm);
        }
        else {
            /* A transition cut short by a restart ends where it was going. */
            if (strcmp (vm->state, "provisioning") == 0)
                s_copy (vm->state, sizeof vm->state, "running");
            else if (strcmp (vm->state, "stopping") == 0)
                s_copy (vm->state, sizeof vm->state, "stopped");
            s_add (b, vm);
        }
        json_decref (o);
    }
    closedir (d);
}

cn_vmdummy_t *
cn_vmdummy_new (const char *dir, const cn_vmdummy_delays_t *delays, cn_vm_event_cb_t *cb,
                void *arg, char *err, size_t errlen)
{
    cn_vmdummy_t *b = calloc (1, sizeof *b);
    if (!b)
        abort ();
    if (delays)
        b->delays = *delays;
    b->cb = cb;
    b->arg = arg;
    if (dir && *dir) {
        if (mkdir (dir, 0755) != 0 && errno != EEXIST) {
            snprintf (err, errlen, "cannot create %s: %s", dir, strerror (errno));
            free (b);
            return NULL;
        }
        if (access (dir, W_OK | X_OK) != 0) {
            snprintf (err, errlen, "cannot use %s: %s", dir, strerror (errno));
            free (b);
            return NULL;
        }
        b->dir = strdup (dir);
        s_load (b);
    }
    return b;
}

void
cn_vmdummy_destroy (cn_vmdummy_t **p)
{
    if (!p || !*p)
        return;
    cn_vmdummy_t *b = *p;
    for (size_t i = 0; i < b->n; i++)
        s_vm_free (b->vms[i]);
    free (b->vms);
    free (b->dir);
    free (b);
    *p = NULL;
}

size_t
cn_vmdummy_count (const cn_vmdummy_t *b)
{
    return b->n;
}

const cn_vm_t *
cn_vmdummy_at (const cn_vmdummy_t *b, size_t i)
{
    return i < b->n ? b->vms[i] : NULL;
}

const cn_vm_t *
cn_vmdummy_find (const cn_vmdummy_t *b, const char *uuid)
{
    ssize_t i = s_index (b, uuid);
    return i >= 0 ? b->vms[i] : NULL;
}

/* Bump seq, stamp, persist, report. -1 (nothing reported) when the write
 * fails; the in-memory change stays (the next change writes it again). */
static int
s_changed (cn_vmdummy_t *b, cn_vm_t *vm, cn_vm_event_t ev, int64_t now_ms,
           char *err, size_t errlen)
{
    vm->seq++;
    vm->last_modified = now_ms;
    if (s_write (b, vm, err, errlen) != 0)
        return -1;
    if (b->cb)
        b->cb (vm, ev, now_ms, b->arg);
    return 0;
}

static cn_vm_t *
s_get (cn_vmdummy_t *b, const char *uuid, bool idle, char *err, size_t errlen)
{
    ssize_t i = uuid ? s_index (b, uuid) : -1;
    if (i < 0) {
        snprintf (err, errlen, "no such VM: %s", uuid ? uuid : "(null)");
        return NULL;
    }
    cn_vm_t *vm = b->vms[i];
    if (idle && vm->op != CN_VM_OP_NONE) {
        snprintf (err, errlen, "VM %s is busy", vm->uuid);
        return NULL;
    }
    return vm;
}

int
cn_vmdummy_create (cn_vmdummy_t *b, const json_t *params, int64_t now_ms, char out_uuid[37],
                   char *err, size_t errlen)
{
    if (params && !json_is_object (params)) {
        snprintf (err, errlen, "parameters must be an object");
        return -1;
    }
    cn_vm_t *vm = calloc (1, sizeof *vm);
    if (!vm)
        abort ();
    s_copy (vm->brand, sizeof vm->brand, "joyent");
    vm->ram = 1024;
    vm->quota = 25;
    bool stopped = false;
    const char *k;
    json_t *v;
    if (params)
        json_object_foreach ((json_t *) params, k, v) {
            if (strcmp (k, "uuid") == 0) {
                if (!json_is_string (v) || !cn_uuid_normalize (json_string_value (v), vm->uuid)) {
                    snprintf (err, errlen, "uuid: not a UUID");
                    s_vm_free (vm);
                    return -1;
                }
            }
            else if (strcmp (k, "state") == 0) {
                if (!json_is_string (v) || (strcmp (json_string_value (v), "stopped") != 0
                                            && strcmp (json_string_value (v), "running") != 0)) {
                    snprintf (err, errlen, "state: must be \"running\" or \"stopped\"");
                    s_vm_free (vm);
                    return -1;
                }
                stopped = strcmp (json_string_value (v), "stopped") == 0;
            }
            else if (strcmp (k, "seq") == 0 || strcmp (k, "zone_state") == 0
                     || strcmp (k, "last_modified") == 0)
                continue;
            else if (s_is_known (k)) {
                if (!s_apply_key (vm, k, v, false)) {
                    snprintf (err, errlen, "%s: bad value", k);
                    s_vm_free (vm);
                    return -1;
                }
            }
            else if (!json_is_null (v)) {
                if (!vm->extra)
                    vm->extra = json_object ();
                json_object_set (vm->extra, k, v);
            }
        }
    if (!vm->uuid[0])
        cn_uuid_new (vm->uuid);
    if (s_index (b, vm->uuid) >= 0) {
        snprintf (err, errlen, "VM %s exists", vm->uuid);
        s_vm_free (vm);
        return -1;
    }
    bool delayed = b->delays.create_ms > 0;
    s_copy (vm->state, sizeof vm->state, delayed ? "provisioning" : stopped ? "stopped" : "running");
    if (delayed) {
        vm->op = CN_VM_OP_CREATE;
        vm->due_ms = now_ms + b->delays.create_ms;
        vm->op_stopped = stopped;
    }
    vm->last_modified = now_ms;
    vm->seq = 0;
    s_add (b, vm);
    if (s_changed (b, vm, CN_VM_EV_CREATE, now_ms, err, errlen) != 0) {
        b->n--;
        s_vm_free (vm);
        return -1;
    }
    memcpy (out_uuid, vm->uuid, 37);
    return 0;
}

static int
s_begin (cn_vmdummy_t *b, cn_vm_t *vm, int op, int delay, const char *now_state,
         const char *final_state, int64_t now_ms, char *err, size_t errlen)
{
    if (delay <= 0) {
        char prev[24];
        s_copy (prev, sizeof prev, vm->state);
        s_copy (vm->state, sizeof vm->state, final_state);
        if (s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, errlen) != 0) {
            s_copy (vm->state, sizeof vm->state, prev);
            vm->seq--;
            return -1;
        }
        return 0;
    }
    vm->op = op;
    vm->due_ms = now_ms + delay;
    if (now_state && strcmp (now_state, vm->state) != 0) {
        char prev[24];
        s_copy (prev, sizeof prev, vm->state);
        s_copy (vm->state, sizeof vm->state, now_state);
        if (s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, errlen) != 0) {
            s_copy (vm->state, sizeof vm->state, prev);
            vm->seq--;
            vm->op = CN_VM_OP_NONE;
            return -1;
        }
    }
    return 0;
}

int
cn_vmdummy_start (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen)
{
    cn_vm_t *vm = s_get (b, uuid, true, err, errlen);
    if (!vm)
        return -1;
    if (strcmp (vm->state, "stopped") != 0) {
        snprintf (err, errlen, "VM %s is %s, not stopped", vm->uuid, vm->state);
        return -1;
    }
    return s_begin (b, vm, CN_VM_OP_START, b->delays.start_ms, NULL, "running",
                    now_ms, err, errlen);
}

int
cn_vmdummy_stop (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen)
{
    cn_vm_t *vm = s_get (b, uuid, true, err, errlen);
    if (!vm)
        return -1;
    if (strcmp (vm->state, "running") != 0) {
        snprintf (err, errlen, "VM %s is %s, not running", vm->uuid, vm->state);
        return -1;
    }
    return s_begin (b, vm, CN_VM_OP_STOP, b->delays.stop_ms, "stopping", "stopped",
                    now_ms, err, errlen);
}

int
cn_vmdummy_reboot (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen)
{
    cn_vm_t *vm = s_get (b, uuid, true, err, errlen);
    if (!vm)
        return -1;
    if (strcmp (vm->state, "running") != 0) {
        snprintf (err, errlen, "VM %s is %s, not running", vm->uuid, vm->state);
        return -1;
    }
    if (b->delays.reboot_ms <= 0) {
        /* no visible transition: the VM was restarted; report that */
        return s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, errlen);
    }
    return s_begin (b, vm, CN_VM_OP_REBOOT, b->delays.reboot_ms, "stopping", "running",
                    now_ms, err, errlen);
}

int
cn_vmdummy_kill (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen)
{
    cn_vm_t *vm = s_get (b, uuid, false, err, errlen);
    if (!vm)
        return -1;
    if (vm->op != CN_VM_OP_NONE && vm->op != CN_VM_OP_STOP && vm->op != CN_VM_OP_REBOOT) {
        snprintf (err, errlen, "VM %s is busy", vm->uuid);
        return -1;
    }
    if (strcmp (vm->state, "running") != 0 && strcmp (vm->state, "stopping") != 0) {
        snprintf (err, errlen, "VM %s is %s, not running", vm->uuid, vm->state);
        return -1;
    }
    /* a pending stop or reboot is overtaken: the VM is down now */
    int op = vm->op;
    int64_t due = vm->due_ms;
    char prev[24];
    s_copy (prev, sizeof prev, vm->state);
    vm->op = CN_VM_OP_NONE;
    s_copy (vm->state, sizeof vm->state, "stopped");
    if (s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, errlen) != 0) {
        s_copy (vm->state, sizeof vm->state, prev);
        vm->seq--;
        vm->op = op;
        vm->due_ms = due;
        return -1;
    }
    return 0;
}

static int
s_remove (cn_vmdummy_t *b, cn_vm_t *vm, int64_t now_ms, char *err, size_t errlen)
{
    if (s_unlink (b, vm->uuid, err, errlen) != 0)
        return -1;
    ssize_t i = s_index (b, vm->uuid);
    b->vms[i] = b->vms[--b->n];
    vm->seq++;
    vm->last_modified = now_ms;
    if (b->cb)
        b->cb (vm, CN_VM_EV_DESTROY, now_ms, b->arg);
    s_vm_free (vm);
    return 0;
}

int
cn_vmdummy_destroy_vm (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err,
                       size_t errlen)
{
    cn_vm_t *vm = s_get (b, uuid, true, err, errlen);
    if (!vm)
        return -1;
    if (b->delays.destroy_ms <= 0)
        return s_remove (b, vm, now_ms, err, errlen);
    vm->op = CN_VM_OP_DESTROY;
    vm->due_ms = now_ms + b->delays.destroy_ms;
    return 0;
}

int
cn_vmdummy_update (cn_vmdummy_t *b, const char *uuid, const json_t *changes, int64_t now_ms,
                   char *err, size_t errlen)
{
    cn_vm_t *vm = s_get (b, uuid, false, err, errlen);
    if (!vm)
        return -1;
    if (!json_is_object (changes)) {
        snprintf (err, errlen, "changes must be an object");
        return -1;
    }
    /* Check everything first so a bad key changes nothing. */
    cn_vm_t probe = *vm;
    probe.alias = NULL;
    probe.extra = NULL;
    const char *k;
    json_t *v;
    json_object_foreach ((json_t *) changes, k, v) {
        if (strcmp (k, "uuid") == 0 || strcmp (k, "state") == 0 || strcmp (k, "seq") == 0
            || strcmp (k, "zone_state") == 0 || strcmp (k, "last_modified") == 0) {
            snprintf (err, errlen, "%s cannot be changed", k);
            return -1;
        }
        if (s_is_known (k) && !s_apply_key (&probe, k, v, false)) {
            free (probe.alias);
            snprintf (err, errlen, "%s: bad value", k);
            return -1;
        }
    }
    free (probe.alias);
    json_object_foreach ((json_t *) changes, k, v) {
        if (s_is_known (k))
            s_apply_key (vm, k, v, false);
        else if (json_is_null (v)) {
            if (vm->extra)
                json_object_del (vm->extra, k);
        }
        else {
            if (!vm->extra)
                vm->extra = json_object ();
            json_object_set (vm->extra, k, v);
        }
    }
    return s_changed (b, vm, CN_VM_EV_UPDATE, now_ms, err, errlen);
}

int64_t
cn_vmdummy_advance (cn_vmdummy_t *b, int64_t now_ms)
{
    int64_t next = -1;
    char err[256];
    /* Walk backwards: a destroy moves the last VM into the freed slot. */
    for (size_t i = b->n; i-- > 0;) {
        if (i >= b->n)
            continue;
        cn_vm_t *vm = b->vms[i];
        if (vm->op == CN_VM_OP_NONE)
            continue;
        if (vm->due_ms > now_ms) {
            if (next < 0 || vm->due_ms < next)
                next = vm->due_ms;
            continue;
        }
        int op = vm->op;
        vm->op = CN_VM_OP_NONE;
        int rc = 0;
        switch (op) {
        case CN_VM_OP_CREATE: {
            s_copy (vm->state, sizeof vm->state, vm->op_stopped ? "stopped" : "running");
            rc = s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, sizeof err);
            break;
        }
        case CN_VM_OP_START:
        case CN_VM_OP_REBOOT:
            s_copy (vm->state, sizeof vm->state, "running");
            rc = s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, sizeof err);
            break;
        case CN_VM_OP_STOP:
            s_copy (vm->state, sizeof vm->state, "stopped");
            rc = s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, sizeof err);
            break;
        case CN_VM_OP_DESTROY:
            rc = s_remove (b, vm, now_ms, err, sizeof err);
            break;
        default:
            abort ();
        }
        if (rc != 0) {
            CN_WARN (COMPONENT, "VM transition not persisted", "{s:s}", "error", err);
            if (op == CN_VM_OP_DESTROY) {
                /* try again a little later */
                vm->op = op;
                vm->due_ms = now_ms + 1000;
                if (next < 0 || vm->due_ms < next)
                    next = vm->due_ms;
            }
        }
    }
    return next;
}

/* ---- simulation ---- */

static const char *const s_brands[] = { "joyent", "joyent-minimal", "lx", "bhyve", "kvm" };

static void
s_fill_sim (cn_vm_t *vm, const char *prefix, uint64_t cn_index, uint64_t j, int64_t now_ms)
{
    snprintf (vm->uuid, sizeof vm->uuid, "%.8s-%04x-4000-a000-%012llx", prefix,
              (unsigned) (j & 0xffff), (unsigned long long) (cn_index & 0xffffffffffffULL));
    snprintf (vm->owner_uuid, sizeof vm->owner_uuid, "930896af-bf8c-48d4-885c-%012llx",
              (unsigned long long) (cn_index % 7));
    snprintf (vm->image_uuid, sizeof vm->image_uuid, "2f1dc911-6401-4fa4-8e9d-%012llx",
              (unsigned long long) (j % 5));
    s_copy (vm->brand, sizeof vm->brand, s_brands[(cn_index + j) % 5]);
    s_copy (vm->state, sizeof vm->state, (cn_index + j) % 5 == 4 ? "stopped" : "running");
    char alias[48];
    snprintf (alias, sizeof alias, "vm-%llu-%llu", (unsigned long long) cn_index,
              (unsigned long long) j);
    vm->alias = strdup (alias);
    vm->ram = 1024 << ((cn_index + j) % 4);
    vm->quota = 25 * (1 + (int64_t) (j % 4));
    vm->last_modified = now_ms;
    vm->seq = 1;
}

void
cn_vmdummy_populate (cn_vmdummy_t *b, const char *prefix, uint64_t cn_index, size_t n,
                     int64_t now_ms)
{
    for (size_t j = 0; j < n; j++) {
        cn_vm_t *vm = calloc (1, sizeof *vm);
        if (!vm)
            abort ();
        s_fill_sim (vm, prefix, cn_index, j, now_ms);
        if (s_index (b, vm->uuid) >= 0) {
            s_vm_free (vm);
            continue;
        }
        s_add (b, vm);
        char err[64];
        if (s_write (b, vm, err, sizeof err) != 0)
            CN_WARN (COMPONENT, "VM not persisted", "{s:s}", "error", err);
    }
}

void
cn_vmdummy_random_change (cn_vmdummy_t *b, uint64_t rnd, int64_t now_ms)
{
    char err[256];
    if (b->n == 0) {
        char uuid[37];
        cn_vmdummy_delays_t saved = b->delays;
        b->delays.create_ms = 0;
        cn_vmdummy_create (b, NULL, now_ms, uuid, err, sizeof err);
        b->delays = saved;
        return;
    }
    cn_vm_t *vm = b->vms[rnd % b->n];
    uint64_t kind = (rnd >> 32) % 10;
    bool running = strcmp (vm->state, "running") == 0;
    bool stopped = strcmp (vm->state, "stopped") == 0;
    if (vm->op != CN_VM_OP_NONE || kind >= 8 || (!running && !stopped)) {
        vm->ram = vm->ram >= 65536 ? 1024 : vm->ram + 128;
        if (s_changed (b, vm, CN_VM_EV_UPDATE, now_ms, err, sizeof err) != 0)
            CN_WARN (COMPONENT, "VM change not persisted", "{s:s}", "error", err);
        return;
    }
    s_copy (vm->state, sizeof vm->state, running ? "stopped" : "running");
    if (s_changed (b, vm, CN_VM_EV_STATE, now_ms, err, sizeof err) != 0)
        CN_WARN (COMPONENT, "VM change not persisted", "{s:s}", "error", err);
}
