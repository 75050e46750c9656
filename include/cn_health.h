/*
 * cn_health: process-wide dependency health flags, set by the actor that
 * owns each connection and read by GET /ping. Lock-free (atomics).
 * Dependencies: "amqp" (listener), "moray" (writer), "redis" (writer).
 */
#ifndef CN_HEALTH_H
#define CN_HEALTH_H

#include <stdbool.h>

void cn_health_set (const char *dep, bool up);
/* false for an unknown dependency */
bool cn_health_get (const char *dep);

#endif
