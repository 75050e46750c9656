/* cn_actor: see include/cn_actor.h. */
#include "cn_actor.h"

#include <pthread.h>
#include <string.h>

void
cn_thread_name (const char *name)
{
    char buf[16];
    size_t n = strlen (name);
    if (n > 15)
        n = 15;
    memcpy (buf, name, n);
    buf[n] = 0;
    pthread_setname_np (pthread_self (), buf);
}

zsock_t *
cn_ctl_bind (const char *name)
{
    zsock_t *rep = zsock_new (ZMQ_REP);
    if (!rep)
        return NULL;
    if (zsock_bind (rep, CN_CTL_FMT, name) != 0) {
        zsock_destroy (&rep);
        return NULL;
    }
    return rep;
}

static size_t
s_tag_hash (const void *key)
{
    uint64_t x = (uint64_t) (uintptr_t) key;
    x ^= x >> 33;
    x *= UINT64_C (0xff51afd7ed558ccd);
    x ^= x >> 33;
    return (size_t) x;
}

static int
s_tag_cmp (const void *a, const void *b)
{
    uintptr_t x = (uintptr_t) a, y = (uintptr_t) b;
    return x == y ? 0 : (x < y ? -1 : 1);
}

void
cn_tag_keys (zhashx_t *h)
{
    zhashx_set_key_duplicator (h, NULL);
    zhashx_set_key_destructor (h, NULL);
    zhashx_set_key_hasher (h, s_tag_hash);
    zhashx_set_key_comparator (h, s_tag_cmp);
}
