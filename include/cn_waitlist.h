/*
 * cn_waitlist: the waitlist service behind the HTTP gateway (docs/waitlist.md).
 *
 *   cn_backend_args_t a = { cfg, &receiver, 0, live };   // outlives the actor
 *   zactor_t *w = zactor_new (cn_waitlist_actor, &a);
 *   zstr_send (w, "START");  -> "OK" | "ERROR" <reason>
 *
 * The gateway binds a PUSH at CN_WAITLIST_ENDPOINT; the actor connects a
 * PULL there. Requests are proto/backend.md frames of types ticket_create,
 * ticket_list, ticket_delete_all (field uuid: the server, or "default"),
 * ticket_get, ticket_delete, ticket_wait, ticket_release (field sub: the
 * ticket). Answers go back through the gateway's reply queue.
 *
 * Tickets live in bucket cnapi_waitlist_tickets (include/cn_ticket.h); one
 * row per queue (server, scope, id) in cnapi_waitlist_queues is the lock
 * that serialises every change of that queue across instances. Waits are
 * held in memory and answered when a change notice on Redis channel
 * cnapi:tickets, confirmed by a store read, shows the ticket active (or
 * gone); while that subscription is down the held tickets are polled.
 *
 * Pipe: $TERM, START, STATUS (actor "waitlist": waiters, created, released,
 * deleted, expired, activated, notices, polls, sub (bool), ...). START also
 * binds the control socket cn_ctl_bind ("waitlist").
 */
#ifndef CN_WAITLIST_H
#define CN_WAITLIST_H

#include <czmq.h>

void cn_waitlist_actor (zsock_t *pipe, void *args);

#endif
