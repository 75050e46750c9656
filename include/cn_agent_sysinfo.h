/*
 * cn_agent_sysinfo: the sysinfo an agent publishes (ur.startup / ur.sysinfo).
 *
 * Two sources:
 *   - generated, for simulated CNs (mockcloud; test/tools/sysinfo_burst.c
 *     could share it): deterministic from a UUID prefix and the CN's index,
 *     SmartOS-like keys, optionally padded to a size with Disks entries;
 *   - this machine (provisioner): hostname, memory (/proc/meminfo), CPUs
 *     (/proc/cpuinfo), NICs (/sys/class/net, with MAC and IPv4), boot time
 *     (/proc/stat btime).
 * The pure parsers are exposed for tests.
 *
 *   cn_sysinfo_gen_t g = { .prefix = "cafe0000", .index = 7, .setup = true,
 *                          .datacenter = "dc1", .admin_ip = "127.0.0.1",
 *                          .agent_port = 5309 };
 *   size_t len;
 *   char *text = cn_sysinfo_generate (&g, &len);
 */
#ifndef CN_AGENT_SYSINFO_H
#define CN_AGENT_SYSINFO_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *prefix;       /* 8 hex digits; NULL: "cafe0000" */
    uint64_t index;           /* the CN's index (< 2^48) */
    bool setup;               /* "Setup": "true" / "false" */
    const char *datacenter;   /* "Datacenter Name"; NULL: "dc1" */
    const char *admin_ip;     /* "Admin IP"; NULL: none */
    int agent_port;           /* "CN Agent Port"; 0: 5309 */
    size_t size;              /* pad with Disks up to about this size; 0: no padding */
    long sequence;            /* > 0: add "Burst Sequence": sequence */
    int64_t boot_time;        /* "Boot Time" (s); 0: derived from index */
} cn_sysinfo_gen_t;

/* The UUID of simulated CN index: <prefix>-0000-4000-8000-<index as 12 hex>
 * (the scheme sysinfo-burst uses). */
void cn_sysinfo_gen_uuid (const char *prefix, uint64_t index, char out[37]);
/* Generated sysinfo as compact JSON text (caller frees), *len set. */
char *cn_sysinfo_generate (const cn_sysinfo_gen_t *g, size_t *len);

typedef struct {
    const char *uuid;         /* "UUID" (required) */
    const char *datacenter;   /* "Datacenter Name"; NULL: omitted */
    const char *admin_ip;     /* "Admin IP" and the NIC tagged admin; NULL: the
                                 first NIC with an IPv4 address is tagged admin */
    int agent_port;           /* "CN Agent Port"; 0: 5309 */
    bool setup;               /* "Setup" */
    const char *root;         /* prefix for /proc and /sys (tests); NULL: "" */
} cn_sysinfo_local_t;

/* Sysinfo of the machine we run on (new reference), or NULL with err filled
 * when /proc cannot be read. */
json_t *cn_sysinfo_local (const cn_sysinfo_local_t *o, char *err, size_t errlen);

/* MemTotal of /proc/meminfo text in MiB; -1 when absent. */
int64_t cn_sysinfo_meminfo_mib (const char *text);
/* Logical CPUs ("processor" lines) of /proc/cpuinfo text, and the first
 * "model name" into model (may be NULL); 0 when none. */
int cn_sysinfo_cpuinfo (const char *text, char *model, size_t mlen);
/* btime of /proc/stat text (s since the epoch); -1 when absent. */
int64_t cn_sysinfo_btime (const char *text);

/* A sysinfo file (--sysinfo FILE): a JSON object. If uuid is given and the
 * file has no "UUID", it is set; a different "UUID" is an error. New
 * reference, or NULL with err filled. */
json_t *cn_sysinfo_load_file (const char *path, const char *uuid, char *err, size_t errlen);

/* "Setup" of a sysinfo: true for "true" or true. */
bool cn_sysinfo_is_setup (const json_t *si);

#endif
