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
/* The state writer runs as cfg->writer_shards actors; shard k binds
 * CN_WRITER_FMT with k and writes the servers cn_writer_shard maps to k. */
#define CN_WRITER_FMT "inproc://cnapi-writer-%d"
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

/* Bind a REP socket at CN_CTL_FMT for name; NULL on failure. It runs in
 * the actor's thread, so it also names that thread (cn_thread_name). */
zsock_t *cn_ctl_bind (const char *name);

/* Name the calling thread (its first 15 bytes), as top -H, ps -L and perf
 * show it. */
void cn_thread_name (const char *name);

/* The writer shard of a server uuid (any case): a hash of its 32 hex
 * digits modulo shards, so every request for a server reaches the same
 * shard, in the order its client sent them. */
int cn_writer_shard (const char *uuid, int shards);

/* A client's socket to every writer shard (proto/writer.md): a ROUTER that
 * connected to shard k under the routing id "w<k>" (ROUTER_MANDATORY: a
 * request no shard can take fails instead of vanishing). hwm 0: unbounded.
 * NULL (reason in err) on failure. */
zsock_t *cn_writer_client (int shards, int sndhwm, int rcvhwm, char *err, size_t errlen);

/* Send one request frame to the shard of uuid; 0 or -1 (errno). The frame
 * is taken either way (*frame is NULL after). */
int cn_writer_send (zsock_t *client, int shards, const char *uuid, zframe_t **frame,
                    bool dontwait);

/* One answer frame from any shard (its routing frame dropped); NULL when
 * none is waiting (dontwait) or on error. */
zframe_t *cn_writer_recv (zsock_t *client, bool dontwait);

/* A zhashx keyed by uint64 tags held in the key pointer itself (no
 * allocation per key): cn_tag_keys (h) once, then CN_TAG_KEY (tag) as key. */
void cn_tag_keys (zhashx_t *h);
#define CN_TAG_KEY(tag) ((void *) (uintptr_t) (tag))

#endif
