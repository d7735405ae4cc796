/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel relay of raw (protocol: tcp) sessions: once the upstream is connected, the
 * daemon's two sockets join ag_relay_socks and bpf/sk_skb.bpf.c sends what arrives on one out of
 * the other. The daemon keeps both sockets in its loop: it relays a direction itself whenever
 * the program leaves it skbs (a slow reader, a peer gone, bytes of its own still unsent) and
 * sees EOFs and errors as before. Order, per direction (bpf/sk_skb.bpf.c):
 *
 *   - the program redirects only while the daemon has written into the peer's socket every
 *     byte the program passed to it (relayed == passed_bytes): while passed bytes wait in the
 *     socket's queue or in our buffers, every skb is passed;
 *   - the daemon reads (and passes an EOF on) only once every byte the program redirected that
 *     way is in the peer's socket (ag_krelay_take()); a timer retries meanwhile;
 *   - it publishes what it wrote at once (ag_krelay_give(), from every send).
 *
 * So a redirected byte never overtakes a byte the daemon relays, and vice versa.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "session.h"

/*
 * Both legs up, nothing read from either socket yet: put them in the kernel relay. 0, or -errno (the session stays a userspace relay).
 * resume(s, side) is called when side may be read again after ag_krelay_take() said wait.
 * *sock_err: an error one of the sockets reported meanwhile (the session must end with it).
 */
struct ag_bpf;
int ag_krelay_engage(struct ag_session *s, struct ag_bpf *b,
		     void (*resume)(struct ag_session *, enum ag_side), int *sock_err);
/*
 * May side i be read, or (eof) its EOF passed on? false: wait, resume() comes later. An EOF
 * also waits for every byte the program left us to be read.
 */
bool ag_krelay_take(struct ag_session *s, enum ag_side i, bool eof);
/* After writing: what we wrote from side i published. */
void ag_krelay_give(struct ag_session *s, enum ag_side i);
/* Waiting for side i's redirected bytes to reach the peer's socket? (no EPOLLIN then) */
bool ag_krelay_waiting(const struct ag_session *s, enum ag_side i);
/* Bytes the program relayed so far: agent → upstream and upstream → agent. */
void ag_krelay_bytes(const struct ag_session *s, uint64_t *up, uint64_t *down);
/* At the session's end: counters folded into bytes_up/down, the slot freed. */
void ag_krelay_end(struct ag_session *s);
/* With the session's memory (after the loop batch that ended it). */
void ag_krelay_free(struct ag_session *s);
