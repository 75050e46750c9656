/*
 * bench_moray: cn_moray write throughput, printed (never asserted).
 *
 *   bench_moray [conninfo] [rows] [value bytes]
 *
 * conninfo defaults to $CNAPI_BENCH_PG, then $CNAPI_TEST_PG; rows to 50000;
 * value size to ~3000 bytes (JSON objects shaped like a server record with
 * five indexed fields; the size is padded with a string member). Uses the
 * bucket "bench_moray"; rows left by an earlier run are deleted first.
 *
 * Scenarios:
 *   single      one cn_moray_put per row, each its own commit
 *   batch-new   cn_moray_batch of 500 put-if-absent (etag ""), own transaction
 *   batch-blind cn_moray_batch of 500 blind upserts over existing rows
 *   writer      the state writer's pattern: begin, get_many_locked (500),
 *               batch of 500 puts conditional on the locked etags, commit
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cn_log.h"
#include "cn_moray.h"
#include "cn_util.h"

#define BUCKET "bench_moray"
#define BATCH  500

static const cn_mindex_t s_index[] = {
    { "uuid", CN_MIDX_STRING, false },
    { "hostname", CN_MIDX_STRING, false },
    { "setup", CN_MIDX_BOOLEAN, false },
    { "ram", CN_MIDX_NUMBER, false },
    { "datacenter", CN_MIDX_STRING, false },
};

static char **s_keys, **s_vals;
static int s_size = 3000;

static void
s_make (int n, int gen)
{
    int padn = s_size > 250 ? s_size - 200 : 50;
    char *pad = malloc ((size_t) padn + 1);
    memset (pad, 'x', (size_t) padn);
    pad[padn] = 0;
    for (int i = 0; i < n; i++) {
        size_t cap = (size_t) padn + 400;
        char *v = malloc (cap);
        snprintf (v, cap,
                  "{\"uuid\":\"%s\",\"hostname\":\"cn%06d\",\"setup\":%s,\"ram\":%d,"
                  "\"datacenter\":\"us-east-1\",\"gen\":%d,\"status\":\"running\","
                  "\"sysinfo\":{\"Boot Time\":\"1700000000\",\"pad\":\"%s\"}}",
                  s_keys[i], i, i % 2 ? "true" : "false", 65536 + i, gen, pad);
        free (s_vals[i]);
        s_vals[i] = v;
    }
    free (pad);
}

static double
s_rate (int rows, int64_t us)
{
    return us > 0 ? rows * 1e6 / (double) us : 0;
}

int
main (int argc, char **argv)
{
    const char *ci = argc > 1 ? argv[1] : getenv ("CNAPI_BENCH_PG");
    if (!ci)
        ci = getenv ("CNAPI_TEST_PG");
    int rows = argc > 2 ? atoi (argv[2]) : 50000;
    if (argc > 3)
        s_size = atoi (argv[3]);
    if (!ci || rows < BATCH) {
        fprintf (stderr, "usage: bench_moray conninfo [rows >= %d] [value bytes] "
                 "(or set CNAPI_BENCH_PG)\n", BATCH);
        return 2;
    }
    rows -= rows % BATCH;
    cn_log_set_level (CN_LOG_WARN);
    cn_moray_t *m = cn_moray_new (ci, 30000);
    if (cn_moray_connect (m) != CN_MORAY_OK) {
        fprintf (stderr, "connect: %s\n", cn_moray_errmsg (m));
        return 1;
    }
    if (cn_moray_put_bucket (m, BUCKET, s_index, sizeof s_index / sizeof s_index[0])) {
        fprintf (stderr, "put_bucket: %s\n", cn_moray_errmsg (m));
        return 1;
    }
    s_keys = calloc ((size_t) rows, sizeof *s_keys);
    s_vals = calloc ((size_t) rows, sizeof *s_vals);
    for (int i = 0; i < rows; i++) {
        s_keys[i] = malloc (37);
        snprintf (s_keys[i], 37, "%08x-0000-4000-8000-%012d", (unsigned) i, i);
    }
    cn_mop_t *ops = calloc (BATCH, sizeof *ops);
    cn_mobj_t *got = calloc (BATCH, sizeof *got);
    char (*etags)[9] = calloc (BATCH, sizeof *etags);

    /* clear what an earlier run left */
    for (int b = 0; b < rows; b += BATCH) {
        int n = 0;
        for (int i = 0; i < BATCH; i++) {
            cn_mobj_t o;
            if (cn_moray_get (m, BUCKET, s_keys[b + i], &o) == CN_MORAY_OK) {
                ops[n] = (cn_mop_t) { .kind = CN_MOP_DEL, .bucket = BUCKET,
                                      .key = s_keys[b + i] };
                n++;
                cn_mobj_fini (&o);
            }
        }
        if (n && cn_moray_batch (m, ops, (size_t) n, NULL) != CN_MORAY_OK) {
            fprintf (stderr, "cleanup: %s\n", cn_moray_errmsg (m));
            return 1;
        }
    }

    s_make (rows, 0);
    printf ("bench_moray: %d rows of ~%zu bytes, batches of %d\n", rows, strlen (s_vals[0]),
            BATCH);

    /* single: a slice only, it is slow */
    int single = rows < 2000 ? rows : 2000;
    int64_t t0 = cn_mono_us ();
    for (int i = 0; i < single; i++)
        if (cn_moray_put (m, BUCKET, s_keys[i], s_vals[i], NULL, NULL, NULL)) {
            fprintf (stderr, "put: %s\n", cn_moray_errmsg (m));
            return 1;
        }
    int64_t us = cn_mono_us () - t0;
    printf ("  single       %7d rows %8.0f rows/s\n", single, s_rate (single, us));
    for (int i = 0; i < single; i += BATCH) {
        int n = 0;
        for (int j = i; j < single && n < BATCH; j++, n++)
            ops[n] = (cn_mop_t) { .kind = CN_MOP_DEL, .bucket = BUCKET, .key = s_keys[j] };
        cn_moray_batch (m, ops, (size_t) n, NULL);
    }

    /* batch-new */
    t0 = cn_mono_us ();
    for (int b = 0; b < rows; b += BATCH) {
        for (int i = 0; i < BATCH; i++)
            ops[i] = (cn_mop_t) { .kind = CN_MOP_PUT, .bucket = BUCKET, .key = s_keys[b + i],
                                  .value = s_vals[b + i], .etag = CN_MORAY_ETAG_NULL };
        size_t failed = 0;
        if (cn_moray_batch (m, ops, BATCH, &failed)) {
            fprintf (stderr, "batch-new: %s (op %zu)\n", cn_moray_errmsg (m), failed);
            return 1;
        }
    }
    us = cn_mono_us () - t0;
    printf ("  batch-new    %7d rows %8.0f rows/s\n", rows, s_rate (rows, us));

    /* batch-blind */
    s_make (rows, 1);
    t0 = cn_mono_us ();
    for (int b = 0; b < rows; b += BATCH) {
        for (int i = 0; i < BATCH; i++)
            ops[i] = (cn_mop_t) { .kind = CN_MOP_PUT, .bucket = BUCKET, .key = s_keys[b + i],
                                  .value = s_vals[b + i] };
        if (cn_moray_batch (m, ops, BATCH, NULL)) {
            fprintf (stderr, "batch-blind: %s\n", cn_moray_errmsg (m));
            return 1;
        }
    }
    us = cn_mono_us () - t0;
    printf ("  batch-blind  %7d rows %8.0f rows/s\n", rows, s_rate (rows, us));

    /* writer */
    s_make (rows, 2);
    int64_t lock_us = 0, batch_us = 0;
    t0 = cn_mono_us ();
    for (int b = 0; b < rows; b += BATCH) {
        int64_t t1 = cn_mono_us ();
        if (cn_moray_begin (m)
            || cn_moray_get_many_locked (m, BUCKET, (const char *const *) s_keys + b, BATCH,
                                         got)) {
            fprintf (stderr, "writer: %s\n", cn_moray_errmsg (m));
            return 1;
        }
        int64_t t2 = cn_mono_us ();
        for (int i = 0; i < BATCH; i++) {
            snprintf (etags[i], sizeof etags[i], "%s", got[i].key ? got[i].etag : "");
            cn_mobj_fini (&got[i]);
            ops[i] = (cn_mop_t) { .kind = CN_MOP_PUT, .bucket = BUCKET, .key = s_keys[b + i],
                                  .value = s_vals[b + i], .etag = etags[i] };
        }
        if (cn_moray_batch (m, ops, BATCH, NULL) || cn_moray_commit (m)) {
            fprintf (stderr, "writer: %s\n", cn_moray_errmsg (m));
            return 1;
        }
        lock_us += t2 - t1;
        batch_us += cn_mono_us () - t2;
    }
    us = cn_mono_us () - t0;
    printf ("  writer       %7d rows %8.0f rows/s  (get_many_locked %.1f ms, "
            "batch+commit %.1f ms per %d)\n", rows, s_rate (rows, us),
            lock_us / 1e3 / (rows / BATCH), batch_us / 1e3 / (rows / BATCH), BATCH);

    for (int i = 0; i < rows; i++) {
        free (s_keys[i]);
        free (s_vals[i]);
    }
    free (s_keys);
    free (s_vals);
    free (ops);
    free (got);
    free (etags);
    cn_moray_destroy (&m);
    return 0;
}
