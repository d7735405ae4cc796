/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel relay of raw (protocol: tcp) sessions: once the upstream is connected, the
 * daemon's two sockets join ag_relay_socks and bpf/sk_skb.bpf.c sends what arrives on one out of
 * the other. The daemon keeps both sockets in its loop: it relays a direction itself whenever
 * the program hands it over (a slow reader, bytes left in a socket's own queue) and sees EOFs
 * and errors as before. Per direction, "pending" says who relays:
 *
 *   - the daemon sets it before it reads a socket (ag_krelay_take()), and reads only once every
 *     byte the program redirected that way has been written into the peer's socket (else its
 *     own writes would overtake them); a timer retries meanwhile;
 *   - it clears it (ag_krelay_give()) only when it has written all it read that way;
 *   - the program redirects only while it is clear and the socket's own ingress queue (bytes
 *     passed to the daemon) is empty, reading the queue first.
 *
 * So a redirected skb never overtakes a byte the daemon relays, and vice versa.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "session.h"

/*
 * Both legs up, nothing read from either socket yet: put them in the kernel relay, both
 * directions first held by the daemon. 0, or -errno (the session stays a userspace relay).
 * resume(s, side) is called when side may be read again after ag_krelay_take() said wait.
 */
struct ag_bpf;
int ag_krelay_engage(struct ag_session *s, struct ag_bpf *b,
		     void (*resume)(struct ag_session *, enum ag_side));
/* Before reading side i: the direction is the daemon's; false: wait, resume() comes later. */
bool ag_krelay_take(struct ag_session *s, enum ag_side i);
/* side i's direction back to the program (the caller checked that nothing is queued). */
void ag_krelay_give(struct ag_session *s, enum ag_side i);
/* Is the daemon holding side i's direction (pending set)? */
bool ag_krelay_held(const struct ag_session *s, enum ag_side i);
/* Waiting for side i's redirected bytes to reach the peer's socket? (no EPOLLIN then) */
bool ag_krelay_waiting(const struct ag_session *s, enum ag_side i);
/* Bytes the program relayed so far: agent → upstream and upstream → agent. */
void ag_krelay_bytes(const struct ag_session *s, uint64_t *up, uint64_t *down);
/* At the session's end: counters folded into bytes_up/down, the slot freed. */
void ag_krelay_end(struct ag_session *s);
/* With the session's memory (after the loop batch that ended it). */
void ag_krelay_free(struct ag_session *s);
