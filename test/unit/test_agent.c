/*
 * test_agent: the agent library (include/cn_agent.h and its parts).
 *
 *   - the reconnect policy (pure): which address next, backoff bounds,
 *     goaway -> another address at once;
 *   - the WebSocket accept key (RFC 6455's example);
 *   - the dummy VM backend: transitions, delays, seq growth, files;
 *   - sysinfo: /proc parsing on this machine, the generator;
 *   - VM event JSON shape and routing keys;
 *   - sessions end to end against fake instances (a tiny WebSocket server
 *     and a tiny DNS server in this file, on loopback): hello/welcome,
 *     heartbeats, goaway, an instance killed, an instance gone silent,
 *     vm_event frames, the clean close at stop;
 *   - with CNAPI_TEST_AMQP (test/run sets it): the publisher and the VM
 *     event bindings (one CN's events, all CNs' events) on a real broker.
 */
#include "cn_test.h"

#include "cn_agent.h"
#include "cn_agent_sysinfo.h"
#include "cn_amqp.h"
#include "cn_log.h"
#include "cn_msg.h"
#include "cn_publisher.h"
#include "cn_resolver.h"
#include "cn_util.h"
#include "cn_vmdummy.h"
#include "cn_wsclient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

static int64_t
s_ms (void)
{
    return cn_mono_us () / 1000;
}

/* Poll cond every 10 ms for at most ms; true when it became true. */
#define WAIT_FOR(cond, ms) ({ \
    int64_t until_ = s_ms () + (ms); bool ok_ = false; \
    for (int n_ = 0; n_ < 100000; n_++) { \
        if (cond) { ok_ = true; break; } \
        if (s_ms () >= until_) break; \
        usleep (10000); } \
    ok_; })

/* ------------------------------------------------------------------ */
/* Reconnect policy                                                     */

static const cn_retry_cfg_t s_rcfg = {
    .base_ms = 100, .cap_ms = 5000, .quick_ms = 100, .goaway_ms = 100, .stable_ms = 5000
};

static void
test_retry_quick_then_other (void)
{
    cn_retry_t r = { 0 };
    /* A long session ends cleanly: one quick retry to the same address. */
    cn_next_t n = cn_retry_next (&r, CN_LOSS_TRANSIENT, 60000, &s_rcfg, 77, 5);
    CHECK (n.same);
    CHECK (n.delay_ms >= 0 && n.delay_ms <= 100);
    CHECK_INT (r.attempt, 0);
    /* The quick retry fails (refused): another address, backoff attempt 0. */
    n = cn_retry_next (&r, CN_LOSS_FAILED, 0, &s_rcfg, 1, 999999);
    CHECK (!n.same);
    CHECK (n.delay_ms >= 0 && n.delay_ms <= 100);
    CHECK_INT (r.attempt, 1);
    /* Failing again: the ceiling doubles. */
    n = cn_retry_next (&r, CN_LOSS_FAILED, 0, &s_rcfg, 1, 200);
    CHECK (!n.same);
    CHECK_INT (n.delay_ms, 200);        /* 200 % (200 + 1) */
    n = cn_retry_next (&r, CN_LOSS_FAILED, 0, &s_rcfg, 1, 400);
    CHECK_INT (n.delay_ms, 400);
    /* A transient loss of a short session gets no quick retry. */
    n = cn_retry_next (&r, CN_LOSS_TRANSIENT, 100, &s_rcfg, 1, 3);
    CHECK (!n.same);
}

static void
test_retry_bounds (void)
{
    cn_retry_t r = { 0 };
    for (int k = 0; k < 40; k++) {
        for (uint32_t rnd = 0; rnd < 50000; rnd += 997) {
            cn_retry_t c = r;
            cn_next_t n = cn_retry_next (&c, CN_LOSS_FAILED, 0, &s_rcfg, rnd, rnd * 7919u);
            long long ceil = 100;
            for (int i = 0; i < k && ceil < 5000; i++)
                ceil *= 2;
            if (ceil > 5000)
                ceil = 5000;
            CHECK (n.delay_ms >= 0 && n.delay_ms <= ceil);
            CHECK (!n.same);
        }
        cn_retry_next (&r, CN_LOSS_FAILED, 0, &s_rcfg, 0, 0);
    }
    /* The maximum is reachable: jitter is full, not a fixed cap. */
    cn_retry_t c = { .attempt = 20 };
    cn_next_t n = cn_retry_next (&c, CN_LOSS_FAILED, 0, &s_rcfg, 0, 5000);
    CHECK_INT (n.delay_ms, 5000);
    /* A stable session resets the backoff. */
    c.attempt = 12;
    n = cn_retry_next (&c, CN_LOSS_SILENT, 6000, &s_rcfg, 0, 4000000);
    CHECK (!n.same);                   /* silence: never the same address */
    CHECK (n.delay_ms <= 100);
    CHECK_INT (c.attempt, 1);
}

static void
test_retry_goaway (void)
{
    cn_retry_t r = { .attempt = 9 };
    cn_next_t n = cn_retry_next (&r, CN_LOSS_GOAWAY, 60000, &s_rcfg, 12345, 99999);
    CHECK (!n.same);
    CHECK (n.delay_ms >= 0 && n.delay_ms <= 100);
    CHECK_INT (n.delay_ms, 12345 % 101);
    /* goaway uses up the quick retry: a later clean loss goes elsewhere */
    n = cn_retry_next (&r, CN_LOSS_TRANSIENT, 10, &s_rcfg, 1, 1);
    CHECK (!n.same);
    /* goaway is at once even after many failures */
    r.attempt = 25;
    n = cn_retry_next (&r, CN_LOSS_GOAWAY, 0, &s_rcfg, 50, 4000);
    CHECK_INT (n.delay_ms, 50);
}

static void
test_retry_pick (void)
{
    uint32_t addrs[3] = { 0x0200007f, 0x0300007f, 0x0400007f };
    CHECK_INT (cn_retry_pick (addrs, 0, 0, 5), -1);
    int counts[3] = { 0 };
    for (uint32_t rnd = 0; rnd < 3000; rnd++) {
        int i = cn_retry_pick (addrs, 3, addrs[1], rnd * 2654435761u);
        CHECK (i == 0 || i == 2);
        if (i >= 0)
            counts[i]++;
    }
    CHECK_INT (counts[1], 0);
    CHECK (counts[0] > 1300 && counts[2] > 1300);   /* uniform among the others */
    /* No last address: uniform among all. */
    int all[3] = { 0 };
    for (uint32_t rnd = 0; rnd < 3000; rnd++)
        all[cn_retry_pick (addrs, 3, 0, rnd)]++;
    CHECK (all[0] == 1000 && all[1] == 1000 && all[2] == 1000);
    /* Only the last address left: use it. */
    uint32_t one[1] = { 0x0200007f };
    CHECK_INT (cn_retry_pick (one, 1, one[0], 42), 0);
}

/* ------------------------------------------------------------------ */
/* WebSocket accept key                                                 */

static void
test_ws_accept_key (void)
{
    char out[29];
    cn_wsc_accept_key ("dGhlIHNhbXBsZSBub25jZQ==", out);
    CHECK_STR (out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

/* ------------------------------------------------------------------ */
/* Dummy VM backend                                                     */

typedef struct {
    int n;
    char events[64][16];
    uint64_t seqs[64];
    char states[64][24];
} s_evlog_t;

static void
s_log_event (const cn_vm_t *vm, cn_vm_event_t ev, int64_t t, void *arg)
{
    s_evlog_t *l = arg;
    if (l->n < 64) {
        snprintf (l->events[l->n], 16, "%s", cn_vm_event_name (ev));
        l->seqs[l->n] = vm->seq;
        snprintf (l->states[l->n], 24, "%s", vm->state);
        l->n++;
    }
}

static void
test_vmdummy_transitions (void)
{
    char err[256];
    s_evlog_t log = { 0 };
    cn_vmdummy_delays_t d = { .create_ms = 1000, .start_ms = 300, .stop_ms = 200,
                              .reboot_ms = 500, .destroy_ms = 100 };
    cn_vmdummy_t *b = cn_vmdummy_new (NULL, &d, s_log_event, &log, err, sizeof err);
    CHECK (b);
    int64_t t = 1700000000000;
    char uuid[37];
    json_t *p = json_pack ("{s:s,s:i,s:s,s:s}", "alias", "web0", "ram", 2048, "brand", "bhyve",
                           "customer_metadata", "x");
    CHECK_INT (cn_vmdummy_create (b, p, t, uuid, err, sizeof err), 0);
    json_decref (p);
    CHECK (cn_uuid_valid (uuid));
    const cn_vm_t *vm = cn_vmdummy_find (b, uuid);
    CHECK_STR (vm->state, "provisioning");
    CHECK_INT (vm->seq, 1);
    CHECK_INT (vm->ram, 2048);
    CHECK_STR (vm->brand, "bhyve");
    CHECK_INT (log.n, 1);
    CHECK_STR (log.events[0], "create");
    /* busy while provisioning */
    CHECK_INT (cn_vmdummy_stop (b, uuid, t, err, sizeof err), -1);
    CHECK_INT (cn_vmdummy_advance (b, t + 999), t + 1000);
    CHECK_INT (log.n, 1);
    CHECK_INT (cn_vmdummy_advance (b, t + 1000), -1);
    CHECK_STR (vm->state, "running");
    CHECK_INT (vm->seq, 2);
    CHECK_STR (log.events[1], "state");
    /* stop: stopping now, stopped later */
    t += 2000;
    CHECK_INT (cn_vmdummy_stop (b, uuid, t, err, sizeof err), 0);
    CHECK_STR (vm->state, "stopping");
    CHECK_STR (cn_vm_zone_state (vm->state), "shutting_down");
    CHECK_INT (vm->seq, 3);
    CHECK_INT (cn_vmdummy_advance (b, t + 200), -1);
    CHECK_STR (vm->state, "stopped");
    CHECK_INT (vm->seq, 4);
    /* wrong state */
    CHECK_INT (cn_vmdummy_stop (b, uuid, t, err, sizeof err), -1);
    CHECK_INT (cn_vmdummy_reboot (b, uuid, t, err, sizeof err), -1);
    /* start */
    CHECK_INT (cn_vmdummy_start (b, uuid, t, err, sizeof err), 0);
    CHECK_STR (vm->state, "stopped");        /* no intermediate state */
    CHECK_INT (cn_vmdummy_advance (b, t + 300), -1);
    CHECK_STR (vm->state, "running");
    CHECK_INT (vm->seq, 5);
    /* reboot: stopping, then running */
    CHECK_INT (cn_vmdummy_reboot (b, uuid, t, err, sizeof err), 0);
    CHECK_STR (vm->state, "stopping");
    cn_vmdummy_advance (b, t + 500);
    CHECK_STR (vm->state, "running");
    CHECK_INT (vm->seq, 7);
    /* update */
    json_t *ch = json_pack ("{s:i,s:s,s:n}", "ram", 4096, "alias", "web1", "customer_metadata");
    CHECK_INT (cn_vmdummy_update (b, uuid, ch, t, err, sizeof err), 0);
    json_decref (ch);
    CHECK_INT (vm->ram, 4096);
    CHECK_STR (vm->alias, "web1");
    CHECK (!vm->extra || !json_object_get (vm->extra, "customer_metadata"));
    CHECK_INT (vm->seq, 8);
    ch = json_pack ("{s:s}", "state", "stopped");
    CHECK_INT (cn_vmdummy_update (b, uuid, ch, t, err, sizeof err), -1);   /* not settable */
    json_decref (ch);
    ch = json_pack ("{s:s}", "ram", "lots");
    CHECK_INT (cn_vmdummy_update (b, uuid, ch, t, err, sizeof err), -1);
    json_decref (ch);
    CHECK_INT (vm->seq, 8);
    /* seq grew by one with every event */
    for (int i = 0; i < log.n; i++)
        CHECK_INT (log.seqs[i], i + 1);
    /* destroy */
    CHECK_INT (cn_vmdummy_destroy_vm (b, uuid, t, err, sizeof err), 0);
    CHECK_INT (cn_vmdummy_count (b), 1);
    cn_vmdummy_advance (b, t + 100);
    CHECK_INT (cn_vmdummy_count (b), 0);
    CHECK_STR (log.events[log.n - 1], "destroy");
    CHECK_INT (log.seqs[log.n - 1], 9);
    CHECK_INT (cn_vmdummy_start (b, uuid, t, err, sizeof err), -1);
    cn_vmdummy_destroy (&b);
    CHECK (b == NULL);
}

static void
test_vmdummy_dir (void)
{
    char err[256];
    char dir[] = "/tmp/test_agent_vms_XXXXXX";
    CHECK (mkdtemp (dir) != NULL);
    cn_vmdummy_t *b = cn_vmdummy_new (dir, NULL, NULL, NULL, err, sizeof err);
    CHECK (b);
    char u1[37], u2[37];
    json_t *p = json_pack ("{s:s,s:s,s:s}", "uuid", "6f2d7b0a-1c54-4f6b-9d8e-0a1b2c3d4e5f",
                           "alias", "db0", "tags", "keep-me");
    CHECK_INT (cn_vmdummy_create (b, p, 1700000000000, u1, err, sizeof err), 0);
    json_decref (p);
    CHECK_INT (cn_vmdummy_create (b, NULL, 1700000000001, u2, err, sizeof err), 0);
    CHECK_INT (cn_vmdummy_stop (b, u2, 1700000000002, err, sizeof err), 0);
    /* the same uuid twice */
    p = json_pack ("{s:s}", "uuid", u1);
    CHECK_INT (cn_vmdummy_create (b, p, 1700000000003, u2, err, sizeof err), -1);
    json_decref (p);
    cn_vmdummy_destroy (&b);
    char path[512];
    snprintf (path, sizeof path, "%s/%s.json", dir, u1);
    struct stat st;
    CHECK (stat (path, &st) == 0);
    /* a junk file is skipped */
    snprintf (path, sizeof path, "%s/00000000-0000-4000-8000-000000000000.json", dir);
    FILE *f = fopen (path, "w");
    fputs ("{not json", f);
    fclose (f);
    b = cn_vmdummy_new (dir, NULL, NULL, NULL, err, sizeof err);
    CHECK (b);
    CHECK_INT (cn_vmdummy_count (b), 2);
    const cn_vm_t *v1 = cn_vmdummy_find (b, "6F2D7B0A-1C54-4F6B-9D8E-0A1B2C3D4E5F");
    CHECK (v1);
    if (v1) {
        CHECK_STR (v1->alias, "db0");
        CHECK_INT (v1->seq, 1);
        CHECK_INT (v1->last_modified, 1700000000000);
        CHECK (v1->extra && json_is_string (json_object_get (v1->extra, "tags")));
    }
    const cn_vm_t *v2 = cn_vmdummy_find (b, u2);
    CHECK (v2 && strcmp (v2->state, "stopped") == 0 && v2->seq == 2);
    CHECK_INT (cn_vmdummy_destroy_vm (b, u1, 1700000000100, err, sizeof err), 0);
    snprintf (path, sizeof path, "%s/%s.json", dir, u1);
    CHECK (stat (path, &st) != 0);
    cn_vmdummy_destroy (&b);
    char cmd[600];
    snprintf (cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK_INT (system (cmd), 0);
}

static void
test_vmdummy_sim (void)
{
    char err[128];
    s_evlog_t log = { 0 };
    cn_vmdummy_t *b = cn_vmdummy_new (NULL, NULL, s_log_event, &log, err, sizeof err);
    cn_vmdummy_populate (b, "cafe0000", 7, 5, 1700000000000);
    CHECK_INT (cn_vmdummy_count (b), 5);
    CHECK_INT (log.n, 0);                     /* no events for the initial state */
    CHECK (cn_vmdummy_find (b, "cafe0000-0003-4000-a000-000000000007"));
    uint64_t seqsum = 0;
    for (size_t i = 0; i < 5; i++)
        seqsum += cn_vmdummy_at (b, i)->seq;
    for (int i = 0; i < 40; i++)
        cn_vmdummy_random_change (b, (uint64_t) i * 0x9e3779b97f4a7c15ULL, 1700000000000 + i);
    CHECK_INT (log.n, 40);                    /* exactly one event each */
    uint64_t seqsum2 = 0;
    for (size_t i = 0; i < 5; i++)
        seqsum2 += cn_vmdummy_at (b, i)->seq;
    CHECK_INT (seqsum2 - seqsum, 40);
    cn_vmdummy_destroy (&b);
}

/* ------------------------------------------------------------------ */
/* VM events                                                            */

static void
test_vm_event_shape (void)
{
    char err[128], uuid[37];
    cn_vmdummy_t *b = cn_vmdummy_new (NULL, NULL, NULL, NULL, err, sizeof err);
    json_t *p = json_pack ("{s:s,s:s}", "alias", "a\"b", "owner_uuid",
                           "930896AF-BF8C-48D4-885C-000000000001");
    cn_vmdummy_create (b, p, 1700000000123, uuid, err, sizeof err);
    json_decref (p);
    const cn_vm_t *vm = cn_vmdummy_find (b, uuid);
    const char *server = "cafe0000-0000-4000-8000-000000000001";
    size_t len;
    char *body = cn_vm_event_body (server, vm, CN_VM_EV_CREATE, 1700000000123, &len);
    CHECK_INT (len, strlen (body));
    json_error_t jerr;
    json_t *o = json_loads (body, 0, &jerr);
    CHECK (json_is_object (o));
    CHECK_STR (json_string_value (json_object_get (o, "server_uuid")), server);
    CHECK_STR (json_string_value (json_object_get (o, "vm_uuid")), uuid);
    CHECK_STR (json_string_value (json_object_get (o, "event")), "create");
    CHECK_INT (json_integer_value (json_object_get (o, "seq")), 1);
    CHECK_INT (json_integer_value (json_object_get (o, "time_ms")), 1700000000123);
    json_t *v = json_object_get (o, "vm");
    CHECK (json_is_object (v));
    CHECK_STR (json_string_value (json_object_get (v, "uuid")), uuid);
    CHECK_STR (json_string_value (json_object_get (v, "state")), "running");
    CHECK_STR (json_string_value (json_object_get (v, "zone_state")), "running");
    CHECK_STR (json_string_value (json_object_get (v, "alias")), "a\"b");
    CHECK_STR (json_string_value (json_object_get (v, "owner_uuid")),
               "930896af-bf8c-48d4-885c-000000000001");
    CHECK_STR (json_string_value (json_object_get (v, "last_modified")), "2023-11-14T22:13:20.123Z");
    CHECK (json_is_integer (json_object_get (v, "ram")));
    CHECK (json_is_integer (json_object_get (v, "quota")));
    CHECK (json_object_get (v, "brand") && json_object_get (v, "image_uuid"));
    CHECK_INT (json_integer_value (json_object_get (v, "seq")), 1);
    json_decref (o);
    free (body);
    body = cn_vm_event_body (server, vm, CN_VM_EV_DESTROY, 1, &len);
    o = json_loads (body, 0, &jerr);
    CHECK (o && !json_object_get (o, "vm"));
    CHECK_STR (json_string_value (json_object_get (o, "event")), "destroy");
    json_decref (o);
    free (body);

    /* msgpack form == JSON form */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init (&sb);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sb, msgpack_sbuffer_write);
    cn_vm_pack (&pk, vm);
    msgpack_unpacked up;
    msgpack_unpacked_init (&up);
    CHECK (msgpack_unpack_next (&up, sb.data, sb.size, NULL) == MSGPACK_UNPACK_SUCCESS);
    json_t *fromp = cn_msgpack_to_json (&up.data);
    json_t *fromj = cn_vm_to_json (vm);
    CHECK (json_equal (fromp, fromj));
    json_decref (fromp);
    json_decref (fromj);
    msgpack_unpacked_destroy (&up);
    msgpack_sbuffer_destroy (&sb);
    cn_vmdummy_destroy (&b);
}

static void
test_routing_keys (void)
{
    char rk[128];
    CHECK (cn_vm_event_rk ("cafe0000-0000-4000-8000-000000000001",
                           "cafe0000-0001-4000-a000-000000000001", rk, sizeof rk));
    CHECK_STR (rk, "vm.event.cafe0000-0000-4000-8000-000000000001.cafe0000-0001-4000-a000-000000000001");
    CHECK (cn_vm_event_binding ("cafe0000-0000-4000-8000-000000000001", rk, sizeof rk));
    CHECK_STR (rk, "vm.event.cafe0000-0000-4000-8000-000000000001.*");
    CHECK_STR (CN_VM_EVENT_BINDING_ALL, "vm.event.#");
    CHECK (!cn_vm_event_rk ("x", "y", rk, 5));
}

/* ------------------------------------------------------------------ */
/* Sysinfo                                                              */

static void
test_sysinfo_parsers (void)
{
    CHECK_INT (cn_sysinfo_meminfo_mib ("MemTotal:       16303428 kB\nMemFree: 1 kB\n"), 15921);
    CHECK_INT (cn_sysinfo_meminfo_mib ("nothing here"), -1);
    char model[64];
    const char *cpu = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU\nflags : x\n\n"
                      "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU\n";
    CHECK_INT (cn_sysinfo_cpuinfo (cpu, model, sizeof model), 2);
    CHECK_STR (model, "Intel(R) Xeon(R) CPU");
    CHECK_INT (cn_sysinfo_btime ("cpu 1 2 3\nintr 5\nbtime 1709769600\nprocesses 9\n"), 1709769600);
    CHECK_INT (cn_sysinfo_btime ("cpu 1\n"), -1);
}

static void
test_sysinfo_local (void)
{
    char err[256];
    cn_sysinfo_local_t o = { .uuid = "564d1234-5678-4abc-8def-0123456789ab", .datacenter = "dc1",
                             .agent_port = 5309, .setup = false };
    json_t *si = cn_sysinfo_local (&o, err, sizeof err);
    CHECK (si);
    if (!si)
        return;
    CHECK_STR (json_string_value (json_object_get (si, "UUID")), o.uuid);
    const char *host = json_string_value (json_object_get (si, "Hostname"));
    CHECK (host && *host);
    const char *mib = json_string_value (json_object_get (si, "MiB of Memory"));
    CHECK (mib && atol (mib) > 0);
    CHECK (json_integer_value (json_object_get (si, "CPU Total Cores")) >= 1);
    const char *bt = json_string_value (json_object_get (si, "Boot Time"));
    CHECK (bt && atol (bt) > 1000000000);
    CHECK_STR (json_string_value (json_object_get (si, "Setup")), "false");
    CHECK (!cn_sysinfo_is_setup (si));
    CHECK (json_is_object (json_object_get (si, "Network Interfaces")));
    /* what cnapid's parser needs */
    char *text = json_dumps (si, JSON_COMPACT);
    json_error_t jerr;
    json_t *back = json_loads (text, 0, &jerr);
    CHECK (back);
    json_decref (back);
    free (text);
    json_decref (si);
}

static void
test_sysinfo_generated (void)
{
    cn_sysinfo_gen_t g = { .prefix = "beef0001", .index = 300, .setup = true, .datacenter = "dc9",
                           .admin_ip = "127.0.0.1", .agent_port = 7001 };
    size_t len, len2;
    char *a = cn_sysinfo_generate (&g, &len);
    char *b = cn_sysinfo_generate (&g, &len2);
    CHECK (len == len2 && memcmp (a, b, len) == 0);       /* deterministic */
    json_error_t jerr;
    json_t *si = json_loadb (a, len, 0, &jerr);
    CHECK (json_is_object (si));
    char uuid[37];
    cn_sysinfo_gen_uuid ("beef0001", 300, uuid);
    CHECK_STR (uuid, "beef0001-0000-4000-8000-00000000012c");
    CHECK_STR (json_string_value (json_object_get (si, "UUID")), uuid);
    CHECK_STR (json_string_value (json_object_get (si, "Setup")), "true");
    CHECK (cn_sysinfo_is_setup (si));
    CHECK_STR (json_string_value (json_object_get (si, "Admin IP")), "127.0.0.1");
    CHECK_INT (json_integer_value (json_object_get (si, "CN Agent Port")), 7001);
    CHECK_STR (json_string_value (json_object_get (si, "Datacenter Name")), "dc9");
    CHECK_STR (json_string_value (json_object_get (si, "Hostname")), "cn-300");
    json_t *nic = json_object_get (json_object_get (si, "Network Interfaces"), "ixgbe0");
    CHECK_STR (json_string_value (json_object_get (nic, "MAC Address")), "02:08:20:00:01:2d");
    json_decref (si);
    free (a);
    free (b);
    g.size = 3000;
    a = cn_sysinfo_generate (&g, &len);
    CHECK (len >= 2900 && len <= 3100);
    si = json_loadb (a, len, 0, &jerr);
    CHECK (si);
    json_decref (si);
    free (a);
}

static void
test_resolver_csv (void)
{
    char out[64];
    CHECK (cn_resolver_server_csv ("127.0.0.1:5353", out, sizeof out));
    CHECK_STR (out, "127.0.0.1:5353");
    CHECK (cn_resolver_server_csv ("10.0.0.1", out, sizeof out));
    CHECK_STR (out, "10.0.0.1:53");
    CHECK (!cn_resolver_server_csv ("dns.example.com:53", out, sizeof out));
    CHECK (!cn_resolver_server_csv ("127.0.0.1:0", out, sizeof out));
    CHECK (!cn_resolver_server_csv ("127.0.0.1:x", out, sizeof out));
    CHECK (!cn_resolver_server_csv ("", out, sizeof out));
}

/* ------------------------------------------------------------------ */
/* A fake DNS server: answers every A query with the current list       */

typedef struct {
    int fd;
    int port;
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t mu;
    uint32_t addrs[8];
    int n;
    atomic_int queries;
} s_dns_t;

static void *
s_dns_thread (void *arg)
{
    s_dns_t *d = arg;
    while (!atomic_load (&d->stop)) {
        struct pollfd p = { .fd = d->fd, .events = POLLIN };
        if (poll (&p, 1, 20) <= 0)
            continue;
        unsigned char q[512], r[512];
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom (d->fd, q, sizeof q, 0, (struct sockaddr *) &from, &fl);
        if (n < 12)
            continue;
        atomic_fetch_add (&d->queries, 1);
        /* the question ends after the name (labels) + type + class */
        size_t i = 12;
        while (i < (size_t) n && q[i])
            i += q[i] + 1;
        i += 5;
        if (i > (size_t) n)
            continue;
        memcpy (r, q, i);
        r[2] = 0x81;
        r[3] = 0x80;
        pthread_mutex_lock (&d->mu);
        int na = d->n;
        r[6] = 0;
        r[7] = (unsigned char) na;
        r[8] = r[9] = r[10] = r[11] = 0;
        size_t o = i;
        for (int k = 0; k < na; k++) {
            unsigned char rr[16] = { 0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4 };
            memcpy (rr + 12, &d->addrs[k], 4);
            memcpy (r + o, rr, 16);
            o += 16;
        }
        if (na == 0)
            r[3] = 0x83;                    /* NXDOMAIN */
        pthread_mutex_unlock (&d->mu);
        sendto (d->fd, r, o, 0, (struct sockaddr *) &from, fl);
    }
    return NULL;
}

static void
s_dns_set (s_dns_t *d, const char *a, const char *b)
{
    pthread_mutex_lock (&d->mu);
    d->n = 0;
    if (a)
        inet_pton (AF_INET, a, &d->addrs[d->n++]);
    if (b)
        inet_pton (AF_INET, b, &d->addrs[d->n++]);
    pthread_mutex_unlock (&d->mu);
}

static bool
s_dns_start (s_dns_t *d)
{
    memset (d, 0, sizeof *d);
    pthread_mutex_init (&d->mu, NULL);
    d->fd = socket (AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET };
    inet_pton (AF_INET, "127.0.0.1", &sin.sin_addr);
    if (bind (d->fd, (struct sockaddr *) &sin, sizeof sin) != 0)
        return false;
    socklen_t sl = sizeof sin;
    getsockname (d->fd, (struct sockaddr *) &sin, &sl);
    d->port = ntohs (sin.sin_port);
    return pthread_create (&d->thread, NULL, s_dns_thread, d) == 0;
}

static void
s_dns_stop (s_dns_t *d)
{
    atomic_store (&d->stop, true);
    pthread_join (d->thread, NULL);
    close (d->fd);
    pthread_mutex_destroy (&d->mu);
}

/* ------------------------------------------------------------------ */
/* A fake cnapid instance: the session endpoint, nothing else           */

enum { FS_NORMAL, FS_SILENT };

typedef struct {
    int fd;
    bool upgraded;
    bool gone;                  /* close frame exchanged */
    char uuid[37];
    unsigned char *in;
    size_t in_len;
    int64_t last_hb;
} s_fconn_t;

typedef struct {
    char name[32];
    char ip[16];
    int port;
    int lfd;
    pthread_t thread;
    atomic_bool stop;           /* kill: close everything abruptly */
    atomic_int mode;
    atomic_bool goaway;
    atomic_int hellos, sessions, hbs, vm_events, closes_1000, bad;
    s_fconn_t conns[256];
    int nconns;
} s_fake_t;

static void
s_fwrite (int fd, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (int tries = 0; len && tries < 1000; tries++) {
        ssize_t w = write (fd, p, len);
        if (w > 0) {
            p += w;
            len -= (size_t) w;
        }
        else if (w < 0 && errno != EAGAIN && errno != EINTR)
            return;
        else
            usleep (100);
    }
}

static void
s_fframe (int fd, int opcode, const void *data, size_t len)
{
    unsigned char h[10];
    size_t hl = 2;
    h[0] = (unsigned char) (0x80 | opcode);
    if (len < 126)
        h[1] = (unsigned char) len;
    else if (len < 65536) {
        h[1] = 126;
        h[2] = (unsigned char) (len >> 8);
        h[3] = (unsigned char) len;
        hl = 4;
    }
    else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char) (len >> (56 - 8 * i));
        hl = 10;
    }
    s_fwrite (fd, h, hl);
    if (len)
        s_fwrite (fd, data, len);
}

static void
s_fsend (int fd, cn_msgw_t *w)
{
    char *data;
    size_t size;
    cn_msgw_take (w, &data, &size);
    s_fframe (fd, 2, data, size);
    free (data);
}

static void
s_fclose_conn (s_fake_t *f, int i, bool rst)
{
    s_fconn_t *c = &f->conns[i];
    if (rst) {
        struct linger lg = { 1, 0 };
        setsockopt (c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    if (c->upgraded && !c->gone)
        atomic_fetch_sub (&f->sessions, 1);
    close (c->fd);
    free (c->in);
    f->conns[i] = f->conns[--f->nconns];
}

/* Handle what is buffered; false when the connection must go. */
static bool
s_fprocess (s_fake_t *f, s_fconn_t *c)
{
    if (!c->upgraded) {
        unsigned char *end = memmem (c->in, c->in_len, "\r\n\r\n", 4);
        if (!end)
            return c->in_len < 8192;
        *end = 0;
        char *key = strcasestr ((char *) c->in, "Sec-WebSocket-Key:");
        char *su = strcasestr ((char *) c->in, "x-server-uuid:");
        if (!key || !su || strncmp ((char *) c->in, "GET /agent/session ", 19) != 0) {
            atomic_fetch_add (&f->bad, 1);
            return false;
        }
        key += 18;
        while (*key == ' ')
            key++;
        char k[64];
        size_t kl = strcspn (key, "\r\n");
        snprintf (k, sizeof k, "%.*s", (int) kl, key);
        su += 14;
        while (*su == ' ')
            su++;
        snprintf (c->uuid, sizeof c->uuid, "%.36s", su);
        char acc[29], resp[256];
        cn_wsc_accept_key (k, acc);
        int n = snprintf (resp, sizeof resp,
                          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
        s_fwrite (c->fd, resp, (size_t) n);
        size_t used = (size_t) (end - c->in) + 4;
        memmove (c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
        c->upgraded = true;
    }
    for (;;) {
        if (c->in_len < 2)
            return true;
        unsigned char *p = c->in;
        int op = p[0] & 0x0f;
        size_t len = p[1] & 0x7f, hl = 2;
        if (!(p[1] & 0x80))
            return false;               /* clients must mask */
        if (len == 126) {
            if (c->in_len < 4)
                return true;
            len = ((size_t) p[2] << 8) | p[3];
            hl = 4;
        }
        else if (len == 127) {
            if (c->in_len < 10)
                return true;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = (len << 8) | p[2 + i];
            hl = 10;
        }
        if (c->in_len < hl + 4 + len)
            return true;
        unsigned char *mask = p + hl, *data = p + hl + 4;
        for (size_t i = 0; i < len; i++)
            data[i] ^= mask[i % 4];
        if (op == 8) {
            int code = len >= 2 ? (data[0] << 8) | data[1] : 0;
            if (code == 1000)
                atomic_fetch_add (&f->closes_1000, 1);
            unsigned char cb[2] = { (unsigned char) (code >> 8), (unsigned char) code };
            s_fframe (c->fd, 8, cb, 2);
            if (c->upgraded && !c->gone)
                atomic_fetch_sub (&f->sessions, 1);
            c->gone = true;
            return false;
        }
        if (op == 2) {
            cn_msg_t m;
            char err[64];
            if (cn_msg_parse (&m, data, len, err, sizeof err) == 0) {
                if (cn_msg_is (&m, "hello")) {
                    atomic_fetch_add (&f->hellos, 1);
                    size_t ul;
                    const char *u = cn_msg_str (&m, "server_uuid", &ul);
                    const msgpack_object *vms = cn_msg_get (&m, "vms");
                    if (!u || ul != 36 || memcmp (u, c->uuid, 36) != 0 || !vms
                        || vms->type != MSGPACK_OBJECT_MAP)
                        atomic_fetch_add (&f->bad, 1);
                    if (atomic_load (&f->mode) == FS_NORMAL) {
                        cn_msgw_t w;
                        cn_msgw_init (&w, "welcome", 3);
                        cn_msgw_str (&w, "instance", f->name);
                        cn_msgw_uint (&w, "epoch", 1);
                        cn_msgw_uint (&w, "heartbeat_ms", 100);
                        s_fsend (c->fd, &w);
                        atomic_fetch_add (&f->sessions, 1);
                    }
                }
                else if (cn_msg_is (&m, "hb"))
                    atomic_fetch_add (&f->hbs, 1);
                else if (cn_msg_is (&m, "vm_event"))
                    atomic_fetch_add (&f->vm_events, 1);
                cn_msg_fini (&m);
            }
            else
                atomic_fetch_add (&f->bad, 1);
        }
        size_t used = hl + 4 + len;
        memmove (c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
}

static void *
s_fake_thread (void *arg)
{
    s_fake_t *f = arg;
    while (!atomic_load (&f->stop)) {
        struct pollfd p[257];
        p[0].fd = f->lfd;
        p[0].events = POLLIN;
        for (int i = 0; i < f->nconns; i++) {
            p[i + 1].fd = f->conns[i].fd;
            p[i + 1].events = POLLIN;
        }
        int n = poll (p, (nfds_t) f->nconns + 1, 10);
        if (n > 0 && (p[0].revents & POLLIN) && f->nconns < 256) {
            int fd = accept (f->lfd, NULL, NULL);
            if (fd >= 0) {
                s_fconn_t *c = &f->conns[f->nconns++];
                memset (c, 0, sizeof *c);
                c->fd = fd;
            }
        }
        int64_t now = s_ms ();
        bool goaway = atomic_exchange (&f->goaway, false);
        for (int i = f->nconns - 1; i >= 0; i--) {
            s_fconn_t *c = &f->conns[i];
            bool keep = true;
            if (i + 1 < (int) (sizeof p / sizeof p[0]) && i < n + 1000 && p[i + 1].fd == c->fd
                && (p[i + 1].revents & (POLLIN | POLLHUP | POLLERR))) {
                unsigned char buf[4096];
                ssize_t r = read (c->fd, buf, sizeof buf);
                if (r <= 0)
                    keep = false;
                else {
                    c->in = realloc (c->in, c->in_len + (size_t) r);
                    memcpy (c->in + c->in_len, buf, (size_t) r);
                    c->in_len += (size_t) r;
                    keep = s_fprocess (f, c);
                }
            }
            if (keep && c->upgraded && goaway) {
                cn_msgw_t w;
                cn_msgw_init (&w, "goaway", 1);
                cn_msgw_str (&w, "reason", "shutdown");
                s_fsend (c->fd, &w);
            }
            if (keep && c->upgraded && atomic_load (&f->mode) == FS_NORMAL
                && now - c->last_hb >= 100) {
                c->last_hb = now;
                cn_msgw_t w;
                cn_msgw_init (&w, "hb", 2);
                cn_msgw_uint (&w, "seq", 1);
                cn_msgw_int (&w, "sent_ms", cn_now_ms ());
                s_fsend (c->fd, &w);
            }
            if (!keep)
                s_fclose_conn (f, i, false);
        }
    }
    /* killed: everything goes at once, with resets */
    while (f->nconns)
        s_fclose_conn (f, f->nconns - 1, true);
    close (f->lfd);
    return NULL;
}

static bool
s_fake_start (s_fake_t *f, const char *name, const char *ip, int port)
{
    memset (f, 0, sizeof *f);
    snprintf (f->name, sizeof f->name, "%s", name);
    snprintf (f->ip, sizeof f->ip, "%s", ip);
    f->lfd = socket (AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt (f->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons ((uint16_t) port) };
    inet_pton (AF_INET, ip, &sin.sin_addr);
    if (bind (f->lfd, (struct sockaddr *) &sin, sizeof sin) != 0 || listen (f->lfd, 256) != 0) {
        close (f->lfd);
        return false;
    }
    socklen_t sl = sizeof sin;
    getsockname (f->lfd, (struct sockaddr *) &sin, &sl);
    f->port = ntohs (sin.sin_port);
    return pthread_create (&f->thread, NULL, s_fake_thread, f) == 0;
}

static void
s_fake_kill (s_fake_t *f)
{
    atomic_store (&f->stop, true);
    pthread_join (f->thread, NULL);
}

/* CNs up on the instance named `name`, from the agents' point of view. */
static size_t
s_up_on (cn_agents_t *a, const char *name)
{
    size_t n = 0;
    for (size_t i = 0; i < cn_agents_count (a); i++) {
        cn_agent_info_t in;
        cn_agents_info (a, i, &in);
        if (in.state == CN_SESS_UP && (!name || strcmp (in.instance, name) == 0))
            n++;
    }
    return n;
}

static size_t
s_up (cn_agents_t *a)
{
    return s_up_on (a, NULL);
}

static void
test_sessions_end_to_end (void)
{
    const size_t N = 20;
    s_dns_t dns;
    CHECK (s_dns_start (&dns));
    s_fake_t *fa = calloc (1, sizeof *fa), *fb = calloc (1, sizeof *fb);
    CHECK (s_fake_start (fa, "inst-a", "127.0.0.2", 0));
    bool ok = false;
    for (int i = 0; i < 20 && !ok; i++) {
        ok = s_fake_start (fb, "inst-b", "127.0.0.3", fa->port);
        if (!ok) {
            s_fake_kill (fa);
            CHECK (s_fake_start (fa, "inst-a", "127.0.0.2", 0));
        }
    }
    CHECK (ok);
    if (!ok)
        return;
    int port = fa->port;
    s_dns_set (&dns, "127.0.0.2", "127.0.0.3");

    cn_agents_cfg_t cfg;
    cn_agents_cfg_defaults (&cfg);
    char resolver[32];
    snprintf (resolver, sizeof resolver, "127.0.0.1:%d", dns.port);
    cfg.resolver = resolver;
    cfg.cnapi_port = port;
    cfg.heartbeat_ms = 100;
    cfg.open_timeout_ms = 1000;
    cfg.resolve_cache_ms = 50;
    cfg.retry = (cn_retry_cfg_t) { .base_ms = 20, .cap_ms = 200, .quick_ms = 20,
                                   .goaway_ms = 20, .stable_ms = 300 };
    cfg.threads = 2;
    cfg.session_log_level = CN_LOG_DEBUG;
    char err[256];
    cn_agents_t *a = cn_agents_new (&cfg, err, sizeof err);
    CHECK (a);
    for (size_t i = 0; i < N; i++) {
        char uuid[37];
        cn_sysinfo_gen_uuid ("e2e00000", i, uuid);
        cn_agent_spec_t s = { .server_uuid = uuid, .sim_vms = 3, .sim_prefix = "e2e00000",
                              .sim_index = i };
        CHECK (cn_agents_add (a, &s, err, sizeof err) == (long) i);
    }
    cn_agent_spec_t dup = { .server_uuid = "E2E00000-0000-4000-8000-000000000001" };
    CHECK (cn_agents_add (a, &dup, err, sizeof err) == -1);
    CHECK_INT (cn_agents_find (a, "e2e00000-0000-4000-8000-000000000013"), 19);
    CHECK_INT (cn_agents_start (a, err, sizeof err), 0);

    /* 1. everyone up, spread over both instances, full hellos */
    CHECK (WAIT_FOR (s_up (a) == N, 5000));
    CHECK (s_up_on (a, "inst-a") > 0 && s_up_on (a, "inst-b") > 0);
    CHECK_INT (atomic_load (&fa->sessions) + atomic_load (&fb->sessions), N);
    CHECK_INT (atomic_load (&fa->bad) + atomic_load (&fb->bad), 0);
    CHECK (WAIT_FOR (atomic_load (&fa->hbs) + atomic_load (&fb->hbs) > (int) N * 3, 3000));
    cn_agents_stats_t st;
    cn_agents_stats (a, &st);
    CHECK_INT (st.connected, N);
    CHECK_INT (st.ninstances, 2);
    CHECK (st.dns_queries >= 1 && st.dns_queries <= 4);     /* shared, not one per CN */

    /* 2. goaway from a: its CNs are on b at once */
    atomic_store (&fa->goaway, true);
    int64_t t0 = s_ms ();
    CHECK (WAIT_FOR (s_up_on (a, "inst-b") == N, 3000));
    int64_t took = s_ms () - t0;
    CHECK (took < 1000);
    cn_agents_stats (a, &st);
    CHECK (st.goaways > 0);
    CHECK (st.failovers == st.goaways);
    printf ("  goaway: %zu CNs moved in %lld ms\n", (size_t) st.goaways, (long long) took);

    /* 3. b killed (resets): everyone reconnects to a */
    s_fake_kill (fb);
    t0 = s_ms ();
    CHECK (WAIT_FOR (s_up_on (a, "inst-a") == N, 5000));
    printf ("  kill: %zu CNs moved in %lld ms\n", N, (long long) (s_ms () - t0));

    /* 4. b back, a goes silent: its CNs notice within ~3 heartbeats and move */
    CHECK (s_fake_start (fb, "inst-b", "127.0.0.3", port));
    atomic_store (&fa->mode, FS_SILENT);
    t0 = s_ms ();
    CHECK (WAIT_FOR (s_up_on (a, "inst-b") == N, 5000));
    took = s_ms () - t0;
    CHECK (took >= 250);                     /* 3 x 100 ms of silence first */
    printf ("  silence: %zu CNs moved in %lld ms\n", N, (long long) took);
    atomic_store (&fa->mode, FS_NORMAL);

    /* 5. VM events travel on the session */
    int before = atomic_load (&fb->vm_events);
    cn_agents_set_event_rate (a, 200);
    CHECK (WAIT_FOR (atomic_load (&fb->vm_events) - before >= 50, 3000));
    cn_agents_set_event_rate (a, 0);
    cn_agents_stats (a, &st);
    CHECK (st.vm_events >= 50);

    /* 6. DNS drops b: nothing moves until b goes; then they pick a */
    s_dns_set (&dns, "127.0.0.2", NULL);
    s_fake_kill (fb);
    CHECK (WAIT_FOR (s_up_on (a, "inst-a") == N, 5000));

    /* 7. stop: every session closes with 1000 */
    int closes = atomic_load (&fa->closes_1000);
    cn_agents_stop (a, 2000);
    CHECK (WAIT_FOR (atomic_load (&fa->closes_1000) - closes == (int) N, 2000));
    cn_agents_stats (a, &st);
    CHECK_INT (st.states[CN_SESS_STOPPED], N);
    cn_agents_destroy (&a);
    s_fake_kill (fa);
    s_dns_stop (&dns);
    free (fa);
    free (fb);
}

/* ------------------------------------------------------------------ */
/* Against a real broker                                                */

static amqp_connection_state_t
s_consumer (const char *url, const char *key, char *queue, size_t qlen)
{
    char err[256];
    cn_amqp_url_t u;
    if (cn_amqp_url_parse (url, &u, err, sizeof err) != 0)
        return NULL;
    amqp_connection_state_t c = cn_amqp_connect (&u, 3000, 0, "test_agent", err, sizeof err);
    cn_amqp_url_fini (&u);
    if (!c)
        return NULL;
    amqp_queue_declare_ok_t *ok = amqp_queue_declare (c, CN_AMQP_CHANNEL, amqp_empty_bytes, 0, 0,
                                                      1, 1, amqp_empty_table);
    if (!ok) {
        cn_amqp_destroy (&c);
        return NULL;
    }
    snprintf (queue, qlen, "%.*s", (int) ok->queue.len, (char *) ok->queue.bytes);
    amqp_queue_bind (c, CN_AMQP_CHANNEL, amqp_cstring_bytes (queue),
                     amqp_cstring_bytes (CN_AMQP_EXCHANGE), amqp_cstring_bytes (key),
                     amqp_empty_table);
    if (amqp_get_rpc_reply (c).reply_type != AMQP_RESPONSE_NORMAL) {
        cn_amqp_destroy (&c);
        return NULL;
    }
    return c;
}

/* Messages in the queue (passive declare). */
static long
s_depth (amqp_connection_state_t c, const char *queue)
{
    amqp_queue_declare_ok_t *ok = amqp_queue_declare (c, CN_AMQP_CHANNEL,
                                                      amqp_cstring_bytes (queue), 1, 0, 1, 1,
                                                      amqp_empty_table);
    return ok ? (long) ok->message_count : -1;
}

static void
test_publisher_bindings (void)
{
    const char *url = getenv ("CNAPI_TEST_AMQP");
    if (!url || !*url) {
        printf ("  CNAPI_TEST_AMQP is not set: broker tests skipped\n");
        return;
    }
    const char *s1 = "cafe0000-0000-4000-8000-0000000000a1";
    const char *s2 = "cafe0000-0000-4000-8000-0000000000a2";
    char q1[128], qall[128], bind1[128];
    cn_vm_event_binding (s1, bind1, sizeof bind1);
    amqp_connection_state_t c1 = s_consumer (url, bind1, q1, sizeof q1);
    amqp_connection_state_t call = s_consumer (url, CN_VM_EVENT_BINDING_ALL, qall, sizeof qall);
    CHECK (c1 && call);
    if (!c1 || !call)
        return;
    char err[256];
    cn_publisher_cfg_t pc = { .url = url, .name = "test_agent", .window = 256 };
    cn_publisher_t *p = cn_publisher_new (&pc, err, sizeof err);
    CHECK (p);
    char ed[128];
    cn_vmdummy_t *b = cn_vmdummy_new (NULL, NULL, NULL, NULL, ed, sizeof ed);
    cn_vmdummy_populate (b, "cafe0000", 1, 1, cn_now_ms ());
    const cn_vm_t *vm = cn_vmdummy_at (b, 0);
    const int n = 3000;
    int64_t t0 = cn_mono_us ();
    for (int i = 0; i < n; i++) {
        const char *s = i % 3 == 0 ? s1 : s2;
        char rk[128];
        size_t len;
        cn_vm_event_rk (s, vm->uuid, rk, sizeof rk);
        char *body = cn_vm_event_body (s, vm, CN_VM_EV_UPDATE, cn_now_ms (), &len);
        CHECK_INT (cn_publisher_send (p, rk, body, len, cn_now_ms ()), 0);
        free (body);
    }
    CHECK (cn_publisher_flush (p, 20000));
    double secs = (cn_mono_us () - t0) / 1e6;
    cn_publisher_stats_t ps;
    cn_publisher_stats (p, &ps);
    CHECK_INT (ps.confirmed, n);
    CHECK_INT (ps.nacked + ps.dropped, 0);
    printf ("  published %d persistent events with confirms in %.3f s (%.0f/s)\n", n, secs,
            n / secs);
    CHECK (WAIT_FOR (s_depth (c1, q1) == n / 3, 5000));
    CHECK (WAIT_FOR (s_depth (call, qall) == n, 5000));
    cn_publisher_destroy (&p);
    cn_vmdummy_destroy (&b);
    cn_amqp_close (&c1);
    cn_amqp_close (&call);

    /* A broker that is not there: messages wait (bounded), oldest dropped. */
    cn_publisher_cfg_t dead = { .url = "amqp://guest:guest@127.0.0.1:1", .max_buffer = 10 };
    p = cn_publisher_new (&dead, err, sizeof err);
    CHECK (p);
    for (int i = 0; i < 25; i++)
        cn_publisher_send (p, "vm.event.x.y", "{}", 2, cn_now_ms ());
    cn_publisher_stats (p, &ps);
    CHECK_INT (ps.buffered, 10);
    CHECK_INT (ps.dropped, 15);
    CHECK (!cn_publisher_flush (p, 100));
    cn_publisher_destroy (&p);
}

int
main (void)
{
    cn_log_init ("test_agent", getenv ("TEST_LOG") ? CN_LOG_DEBUG : CN_LOG_FATAL);
    RUN (test_retry_quick_then_other);
    RUN (test_retry_bounds);
    RUN (test_retry_goaway);
    RUN (test_retry_pick);
    RUN (test_ws_accept_key);
    RUN (test_vmdummy_transitions);
    RUN (test_vmdummy_dir);
    RUN (test_vmdummy_sim);
    RUN (test_vm_event_shape);
    RUN (test_routing_keys);
    RUN (test_sysinfo_parsers);
    RUN (test_sysinfo_local);
    RUN (test_sysinfo_generated);
    RUN (test_resolver_csv);
    RUN (test_sessions_end_to_end);
    RUN (test_publisher_bindings);
    return cn_test_done ();
}
