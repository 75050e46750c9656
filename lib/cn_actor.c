/* cn_actor: see include/cn_actor.h. */
#include "cn_actor.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

zsock_t *
cn_ctl_bind (const char *name)
{
    cn_thread_name (name);
    zsock_t *rep = zsock_new (ZMQ_REP);
    if (!rep)
        return NULL;
    if (zsock_bind (rep, CN_CTL_FMT, name) != 0) {
        zsock_destroy (&rep);
        return NULL;
    }
    return rep;
}

void
cn_thread_name (const char *name)
{
    char n[16];
    snprintf (n, sizeof n, "%s", name);     /* the kernel keeps 15 bytes */
    pthread_setname_np (pthread_self (), n);
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

int
cn_writer_shard (const char *uuid, int shards)
{
    if (shards <= 1 || !uuid)
        return 0;
    /* FNV-1a over the hex digits, case folded: "ABC-..." and "abc..." agree */
    uint32_t h = 2166136261u;
    for (const char *p = uuid; *p; p++) {
        if (*p == '-')
            continue;
        h ^= (uint32_t) tolower ((unsigned char) *p);
        h *= 16777619u;
    }
    return (int) (h % (uint32_t) shards);
}

zsock_t *
cn_writer_client (int shards, int sndhwm, int rcvhwm, char *err, size_t errlen)
{
    zsock_t *s = zsock_new (ZMQ_ROUTER);
    if (!s) {
        snprintf (err, errlen, "cannot create the writer socket");
        return NULL;
    }
    zsock_set_sndhwm (s, sndhwm);
    zsock_set_rcvhwm (s, rcvhwm);
    zsock_set_linger (s, 0);
    zsock_set_router_mandatory (s, 1);
    for (int k = 0; k < shards; k++) {
        char rid[16];
        snprintf (rid, sizeof rid, "w%d", k);
        if (zmq_setsockopt (zsock_resolve (s), ZMQ_CONNECT_ROUTING_ID, rid, strlen (rid)) != 0
            || zsock_connect (s, CN_WRITER_FMT, k) != 0) {
            snprintf (err, errlen, "connect " CN_WRITER_FMT ": %s", k, zmq_strerror (zmq_errno ()));
            zsock_destroy (&s);
            return NULL;
        }
    }
    return s;
}

int
cn_writer_send (zsock_t *client, int shards, const char *uuid, zframe_t **frame, bool dontwait)
{
    char rid[16];
    int n = snprintf (rid, sizeof rid, "w%d", cn_writer_shard (uuid, shards));
    void *sock = zsock_resolve (client);
    int flags = dontwait ? ZMQ_DONTWAIT : 0;
    if (zmq_send (sock, rid, (size_t) n, flags | ZMQ_SNDMORE) != n) {
        zframe_destroy (frame);
        return -1;
    }
    /* after the routing frame the message is committed to that pipe */
    if (zframe_send (frame, client, 0) != 0) {
        zframe_destroy (frame);         /* (only as the context ends) */
        return -1;
    }
    return 0;
}

zframe_t *
cn_writer_recv (zsock_t *client, bool dontwait)
{
    void *sock = zsock_resolve (client);
    zmq_msg_t rid;
    zmq_msg_init (&rid);
    if (zmq_msg_recv (&rid, sock, dontwait ? ZMQ_DONTWAIT : 0) < 0) {
        zmq_msg_close (&rid);
        return NULL;
    }
    bool more = zmq_msg_more (&rid);
    zmq_msg_close (&rid);
    if (!more)
        return NULL;
    return zframe_recv (client);
}
