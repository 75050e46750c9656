/* cn_health: see include/cn_health.h. */
#include "cn_health.h"

#include <stdatomic.h>
#include <string.h>

static atomic_int s_amqp, s_moray, s_redis;

static atomic_int *
s_flag (const char *dep)
{
    if (!dep)
        return NULL;
    if (strcmp (dep, "amqp") == 0)
        return &s_amqp;
    if (strcmp (dep, "moray") == 0)
        return &s_moray;
    if (strcmp (dep, "redis") == 0)
        return &s_redis;
    return NULL;
}

void
cn_health_set (const char *dep, bool up)
{
    atomic_int *f = s_flag (dep);
    if (f)
        atomic_store (f, up ? 1 : 0);
}

bool
cn_health_get (const char *dep)
{
    atomic_int *f = s_flag (dep);
    return f ? atomic_load (f) != 0 : false;
}
