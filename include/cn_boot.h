/*
 * cn_boot: boot parameters and platforms (docs/api.md, "Boot parameters",
 * "GET /platforms"), the pure part. No I/O: the backend reads and writes the
 * objects (actors/cn_backend_extra.c).
 *
 * Boot parameters live in two kinds of object with the same field names:
 *   a server record (bucket cnapi_servers):  boot_platform, boot_params
 *       (the kernel arguments), kernel_flags, boot_modules, default_console,
 *       serial;
 *   the default (bucket cnapi_boot, key "default"): the same fields, used by
 *       GET /boot/default for servers that have never booted.
 *
 * Platforms are the ones servers report: every server record's
 * current_platform (sysinfo "Live Image") and boot_platform, with the OS
 * from sysinfo "System Type" (SunOS: smartos, Linux: linux).
 */
#ifndef CN_BOOT_H
#define CN_BOOT_H

#include <jansson.h>
#include <stdbool.h>

#include "cn_server.h"

#define CN_BUCKET_BOOT "cnapi_boot"
#define CN_BOOT_DEFAULT_KEY "default"
/* a boot module's decoded content may be at most this many bytes */
#define CN_BOOT_MODULE_MAX 4096

extern const cn_mindex_t cn_boot_index[];
extern const size_t cn_boot_nindex;

/* Check PUT/POST /boot/... parameters, in the reference's order: the rules
 * (platform, default_console, serial: strings without surrounding blanks;
 * kernel_args, kernel_flags: objects) -> 500 InvalidParameters with
 * errors[]; then boot_modules (an array of {path, content, type?} with
 * base64 content of at most CN_BOOT_MODULE_MAX bytes) -> 409
 * InvalidArgument. 0 when acceptable; -1 with e set. */
int cn_boot_check (const json_t *params, cn_apierr_t *e);

/* The platform the request names (params "platform", a non-empty string),
 * or NULL. */
const char *cn_boot_platform_param (const json_t *params);

/* Apply checked params to obj (a server record or the default) in place.
 * put: replace everything (PUT): kernel_args (or boot_params) -> boot_params,
 *      kernel_flags, boot_modules (type "base64" filled in), default_console
 *      and serial; a missing value becomes empty ({} / []), or for a server
 *      the record default ("serial", "ttyb"), or for the default object is
 *      removed; boot_platform = platform, else latest (may be NULL: then a
 *      server keeps its boot_platform and the default loses it).
 * !put: merge (POST): only what is given changes; in kernel_args (or
 *      params) and kernel_flags a null value deletes that key; a null
 *      default_console or serial becomes "".
 * is_default: obj is the default object. */
void cn_boot_apply (json_t *obj, const json_t *params, bool put, const char *latest,
                    bool is_default);

/* GET /boot/... body (new reference): {platform, kernel_args, kernel_flags,
 * boot_modules, default_console, serial}. kernel_args holds rabbitmq
 * ("user:password:host:port" from amqp_url; for a host "localhost" also
 * rabbitmq_dns), for a server its hostname, then the stored boot_params.
 * The default's platform is "latest" when none is set. */
json_t *cn_boot_render (const json_t *obj, bool is_default, const char *amqp_url);

/* Platforms. set is an object version -> {"os": "smartos"|"linux"}; add the
 * platforms of one server record (current_platform, boot_platform). */
void cn_platforms_add (json_t *set, const json_t *rec);

/* The newest version of set (with os, or any when os is NULL) whose name
 * has the form YYYYMMDDTHHMMSSZ somewhere in it (sorted by name, as the
 * reference), or NULL. Points into set. */
const char *cn_platforms_latest (const json_t *set, const char *os);

/* GET /platforms body (new reference): {"<version>": {}} for each version of
 * set (only those of os when os is not NULL), {"latest": true} on the one
 * cn_platforms_latest names. */
json_t *cn_platforms_view (const json_t *set, const char *os);

#endif
