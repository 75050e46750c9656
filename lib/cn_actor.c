/* cn_actor: see include/cn_actor.h. */
#include "cn_actor.h"

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
