/*
 * cn_actor: conventions every cnapid actor follows.
 *
 * Pipe commands (from main, which owns the actor):
 *   "$TERM"            leave the loop and exit.
 *   "START" [args...]  do the I/O that can fail (bind, connect); reply
 *                      "OK" or "ERROR" <reason>. Until START nothing is opened.
 *   "STATUS"           reply one frame: a msgpack map {v, type:"status",
 *                      actor:<name>, ...counters} (see proto/status.md).
 *
 * Control socket: after START every actor also binds a ZMQ_REP socket at
 * CN_CTL_ENDPOINT(<name>) and answers the same "STATUS" there, so the admin
 * actor can ask from its own thread (pipes belong to main).
 */
#ifndef CN_ACTOR_H
#define CN_ACTOR_H

#include <czmq.h>

#define CN_CTL_FMT "inproc://cnapi-ctl-%s"
#define CN_WRITER_ENDPOINT "inproc://cnapi-writer"
#define CN_BACKEND_ENDPOINT "inproc://cnapi-backend"
/* Services behind the gateway besides the backends (proto/backend.md framing,
 * answers through the gateway's reply receiver; actors/cn_gateway.c starts
 * them with a cn_backend_args_t) */
#define CN_TASKS_ENDPOINT "inproc://cnapi-tasks"
#define CN_UR_ENDPOINT "inproc://cnapi-ur"
#define CN_WAITLIST_ENDPOINT "inproc://cnapi-waitlist"
/* the longest wait a client may ask for (GET /tasks/:id/wait?timeout=N,
 * tickets, execute), seconds */
#define CN_WAIT_MAX_S 3600

/* Name the calling thread (at most 15 characters are kept) so that top -H,
 * perf and /proc/PID/task/TID/comm tell the actors apart. */
void cn_thread_name (const char *name);

/* Bind a REP socket at CN_CTL_FMT for name; NULL on failure. */
zsock_t *cn_ctl_bind (const char *name);

/* A zhashx keyed by uint64 tags held in the key pointer itself (no
 * allocation per key): cn_tag_keys (h) once, then CN_TAG_KEY (tag) as key. */
void cn_tag_keys (zhashx_t *h);
#define CN_TAG_KEY(tag) ((void *) (uintptr_t) (tag))

#endif
