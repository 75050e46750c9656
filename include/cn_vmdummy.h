/*
 * cn_vmdummy: the "dummy" VM backend of the agent, and the VM event format.
 *
 * VMs are kept in memory, and optionally as JSON files in a directory (one
 * file per VM, <dir>/<vm_uuid>.json, vmadm-like keys). Operations change them
 * at once or after a configurable delay; every change bumps the VM's `seq`
 * and is reported through the event callback (the agent publishes it on AMQP
 * and sends it on its session; docs/vm-events.md).
 *
 * There is no clock or timer in here: operations take the current time, and
 * cn_vmdummy_advance (b, now) completes the transitions that are due and says
 * when the next one is. The owner arms a timer for that (lib/cn_agent.c), and
 * a unit test simply passes made-up times.
 *
 *   cn_vmdummy_t *b = cn_vmdummy_new (NULL, &delays, on_event, arg, err, sizeof err);
 *   cn_vmdummy_create (b, params, now, uuid, err, sizeof err);   // event "create"
 *   int64_t next = cn_vmdummy_advance (b, now + 500);             // event "state"
 *   cn_vmdummy_destroy (&b);
 *
 * Transitions (delay 0 = at once, only the final event):
 *   create   provisioning ... running           events create, state
 *   start    stopped ... running                event state
 *   stop     running -> stopping ... stopped    events state, state
 *   reboot   running -> stopping ... running    events state, state
 *   destroy  any ... gone                       event destroy
 *   update   at once (ram, quota, alias, owner_uuid, image_uuid, other keys)  event update
 *   kill     running/stopping -> stopped at once                              event state
 * An operation on a VM with a transition pending fails ("busy").
 */
#ifndef CN_VMDUMMY_H
#define CN_VMDUMMY_H

#include <jansson.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    CN_VM_EV_CREATE,
    CN_VM_EV_STATE,
    CN_VM_EV_UPDATE,
    CN_VM_EV_DESTROY
} cn_vm_event_t;

/* "create", "state", "update", "destroy" */
const char *cn_vm_event_name (cn_vm_event_t ev);

enum { CN_VM_OP_NONE, CN_VM_OP_CREATE, CN_VM_OP_START, CN_VM_OP_STOP, CN_VM_OP_REBOOT,
       CN_VM_OP_DESTROY };

typedef struct {
    char uuid[37];
    char owner_uuid[37];      /* "" when unknown */
    char image_uuid[37];
    char brand[24];
    char state[24];
    char *alias;              /* NULL when none */
    int64_t ram;              /* MiB */
    int64_t quota;            /* GiB */
    int64_t last_modified;    /* ms since the epoch */
    uint64_t seq;             /* grows with every change */
    json_t *extra;            /* other keys, kept as they are (NULL when none) */
    int op;                   /* CN_VM_OP_*: the pending transition */
    int64_t due_ms;           /* when it completes */
    bool op_stopped;          /* a delayed create ends stopped */
} cn_vm_t;

/* zone_state as vmadm reports it for a VM state. */
const char *cn_vm_zone_state (const char *state);
/* The VM object as JSON (new reference): every key above except op/due, plus
 * zone_state; last_modified as ISO 8601. */
json_t *cn_vm_to_json (const cn_vm_t *vm);
/* The same object as a msgpack map. */
void cn_vm_pack (msgpack_packer *pk, const cn_vm_t *vm);

/* VM events on AMQP (docs/vm-events.md). Routing key
 * vm.event.<server_uuid>.<vm_uuid> into out; false if it does not fit. */
bool cn_vm_event_rk (const char *server_uuid, const char *vm_uuid, char *out, size_t len);
/* Binding keys: one CN's events, every CN's events. */
bool cn_vm_event_binding (const char *server_uuid, char *out, size_t len);
#define CN_VM_EVENT_BINDING_ALL "vm.event.#"
/* The JSON body {server_uuid, vm_uuid, event, seq, time_ms, vm}; vm is
 * absent on destroy. Caller frees; *len set. */
char *cn_vm_event_body (const char *server_uuid, const cn_vm_t *vm, cn_vm_event_t ev,
                        int64_t time_ms, size_t *len);

typedef struct cn_vmdummy cn_vmdummy_t;

typedef struct {
    int create_ms, start_ms, stop_ms, reboot_ms, destroy_ms;
} cn_vmdummy_delays_t;

/* Called for every change, after it is applied (and written, with a
 * directory). vm is valid during the call only (on destroy too). The callback
 * must not call into the backend. */
typedef void (cn_vm_event_cb_t) (const cn_vm_t *vm, cn_vm_event_t ev, int64_t time_ms,
                                 void *arg);

/* A backend; dir NULL keeps VMs in memory only, else the directory is created
 * if needed and every <uuid>.json in it is loaded (a file that does not parse
 * or names another uuid is skipped with a warning). delays NULL: all 0.
 * NULL with err filled when the directory cannot be used. */
cn_vmdummy_t *cn_vmdummy_new (const char *dir, const cn_vmdummy_delays_t *delays,
                              cn_vm_event_cb_t *cb, void *arg, char *err, size_t errlen);
void cn_vmdummy_destroy (cn_vmdummy_t **p);

size_t cn_vmdummy_count (const cn_vmdummy_t *b);
/* The i-th VM (order changes when VMs are destroyed), or NULL. */
const cn_vm_t *cn_vmdummy_at (const cn_vmdummy_t *b, size_t i);
const cn_vm_t *cn_vmdummy_find (const cn_vmdummy_t *b, const char *uuid);

/* Operations: 0, or -1 with err filled and nothing changed (unknown VM, busy,
 * wrong state, bad parameter, or a file that cannot be written). */
/* params: {uuid?, brand?, alias?, ram?, quota?, owner_uuid?, image_uuid?,
 * state? ("stopped" creates it stopped), other keys kept}; out_uuid gets the
 * (possibly new) uuid. */
int cn_vmdummy_create (cn_vmdummy_t *b, const json_t *params, int64_t now_ms,
                       char out_uuid[37], char *err, size_t errlen);
int cn_vmdummy_start (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen);
int cn_vmdummy_stop (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen);
int cn_vmdummy_reboot (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen);
/* Stop at once (vmadm kill): a running or stopping VM is stopped now, a
 * pending stop or reboot is dropped; one event (state). */
int cn_vmdummy_kill (cn_vmdummy_t *b, const char *uuid, int64_t now_ms, char *err, size_t errlen);
int cn_vmdummy_destroy_vm (cn_vmdummy_t *b, const char *uuid, int64_t now_ms,
                           char *err, size_t errlen);
/* changes: {ram?, quota?, alias?, owner_uuid?, image_uuid?, brand?, other keys
 * (null removes one)}; uuid, state, seq, zone_state and last_modified cannot
 * be set. */
int cn_vmdummy_update (cn_vmdummy_t *b, const char *uuid, const json_t *changes,
                       int64_t now_ms, char *err, size_t errlen);

/* Complete the transitions due at now_ms (events fire). Returns the time of
 * the next pending transition, or -1 when none is pending. */
int64_t cn_vmdummy_advance (cn_vmdummy_t *b, int64_t now_ms);

/* Simulation helpers for mockcloud (no directory writes needed: memory mode).
 * Add n VMs at once without events (the initial state a hello reports); VM j
 * of CN index i gets uuid <prefix>-<j:4 hex>-4000-a000-<i:12 hex>. */
void cn_vmdummy_populate (cn_vmdummy_t *b, const char *prefix, uint64_t cn_index,
                          size_t n, int64_t now_ms);
/* One random change right now (exactly one event): a VM without a pending
 * transition goes running <-> stopped, or gets an update; with no VM, one is
 * created. rnd: any random number. */
void cn_vmdummy_random_change (cn_vmdummy_t *b, uint64_t rnd, int64_t now_ms);

#endif
