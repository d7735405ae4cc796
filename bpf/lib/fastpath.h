/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The sockmap fast path of the agent↔gateway loopback leg: which agent sockets may join the
 * sockhash (sockops) and, per message, whether a send goes straight into the peer's ingress
 * queue or through loopback TCP (sk_msg). The rules come from how tcp_bpf behaves (kernel 6.x,
 * net/ipv4/tcp_bpf.c and net/core/skmsg.c), not from taste:
 *
 * 1. A socket in a sockmap gets tcp_bpf_recvmsg(). With nothing queued, a blocking read waits
 *    once (tcp_msg_wait_data()) and returns -EAGAIN after any wake-up that brought no data: a
 *    signal, the ACK of the socket's own FIN (FIN_WAIT1 -> FIN_WAIT2 wakes the socket), a
 *    write-space wake-up. An unmodified agent doing sendall(); shutdown(SHUT_WR); recv() on a
 *    blocking socket then fails with EAGAIN. Agents are arbitrary programs, so only an agent
 *    socket whose file is O_NONBLOCK joins, and one found blocking later leaves again (its
 *    psock dropped, tcp_prot back) as soon as no redirected byte can be queued for it. The
 *    daemon's own socket is non-blocking and reads with MSG_DONTWAIT: EAGAIN is harmless there.
 * 2. bpf_tcp_ingress() charges the receiver but never looks at its receive buffer: redirected
 *    bytes pile up without bound behind a slow reader (and end in -ENOMEM for the sender under
 *    memory pressure). A sender therefore falls back to loopback TCP, which has flow control,
 *    while the peer holds more than its receive buffer.
 * 3. tcp_bpf_recvmsg() reads the psock's ingress queue before the TCP receive queue. Going
 *    from redirect to TCP keeps the order (the older bytes are the ones read first); going from
 *    TCP to redirect is only safe once the peer has read every byte sent over TCP
 *    (ag_fp_drained()), else newer redirected bytes would overtake older ones.
 * 4. Dropping a socket's psock (leaving the sockhash) frees what waits in its ingress queue, so
 *    a socket only leaves while its receive memory is empty and the one socket that could
 *    redirect into it is settled on TCP (a cmpxchg on its state, see ag_fp_agent_leave()).
 *
 * Kernel sockets are only ever read here (bpf_rdonly_cast() loads are fault-safe); the
 * addresses in ag_fastpath are not references and a stale one can only make a send take TCP.
 */
#pragma once

#include <bpf/bpf_core_read.h>
#include "common.h"

#define AG_O_NONBLOCK 04000
/* A receiver may hold this much redirected data even when its receive buffer is smaller. */
#define AG_FP_QUEUE_MIN (1U << 20)

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline struct tcp_sock *ag_fp_sock_at(__u64 addr)
{
	if (!addr)
		return NULL;
	return bpf_rdonly_cast((void *)addr, bpf_core_type_id_kernel(struct tcp_sock));
}

static __always_inline bool ag_fp_nonblocking(struct tcp_sock *tp)
{
	struct socket *sock = tp->inet_conn.icsk_inet.sk.sk_socket;
	struct file *file;

	if (!sock)
		return false;
	file = sock->file;
	return file && (file->f_flags & AG_O_NONBLOCK);
}

/* Bytes queued for the socket's reader (ingress queue and TCP receive queue). */
static __always_inline int ag_fp_rmem(struct tcp_sock *tp)
{
	return tp->inet_conn.icsk_inet.sk.sk_backlog.rmem_alloc.counter;
}

static __always_inline bool ag_fp_backlogged(struct tcp_sock *peer)
{
	int lim = peer->inet_conn.icsk_inet.sk.sk_rcvbuf;

	if (lim < (int)AG_FP_QUEUE_MIN)
		lim = AG_FP_QUEUE_MIN;
	return ag_fp_rmem(peer) >= lim;
}

/*
 * Has the peer read every byte self ever sent over TCP? Everything self queued is acked (so
 * it is below the peer's rcv_nxt) and the peer's reader has caught up with rcv_nxt. Self's
 * snd_una can only be stale-low here (ACKs wait in the backlog while self is locked): that
 * errs on the side of TCP.
 */
static __always_inline bool ag_fp_drained(struct tcp_sock *self, struct tcp_sock *peer)
{
	if (self->snd_una != self->write_seq)
		return false;
	if (!self->bytes_sent)
		return true;
	return peer && peer->copied_seq == peer->rcv_nxt;
}

static __always_inline void ag_fp_key_reverse(const struct ag_sock_key *k, struct ag_sock_key *r)
{
	__builtin_memcpy(r->local, k->remote, 16);
	__builtin_memcpy(r->remote, k->local, 16);
	r->lport = k->rport;
	r->rport = k->lport;
}

/* Moves *state from one of NEW/SLOW to to; false if it was FAST (or changed meanwhile). */
static __always_inline bool ag_fp_settle(__u64 *state, __u64 to)
{
	__u64 cur = *state;

	if (cur == to)
		return true;
	if (cur != AG_FP_NEW && cur != AG_FP_SLOW)
		return false;
	return __sync_val_compare_and_swap(state, cur, to) == cur;
}

/*
 * The agent's socket turned blocking after it joined: take it out of the sockhash (rule 1)
 * once that is safe (rule 4). Runs in the agent's own sendmsg, so its lock is held and no
 * redirect into it can complete meanwhile. gw is the gateway socket's key.
 */
static __always_inline bool ag_fp_agent_leave(struct ag_fp_entry *me, struct tcp_sock *self,
					      struct ag_sock_key *self_key,
					      struct ag_sock_key *gw)
{
	struct ag_fp_entry off = { .state = AG_FP_OFF }, *ge;

	if (ag_fp_rmem(self))
		return false;
	/* The gateway's side settles on TCP for good, unless it is redirecting right now. */
	if (bpf_map_update_elem(&ag_fastpath, gw, &off, BPF_NOEXIST)) {
		ge = bpf_map_lookup_elem(&ag_fastpath, gw);
		if (!ge || !ag_fp_settle(&ge->state, AG_FP_OFF))
			return false;
	}
	me->state = AG_FP_OFF;
	bpf_map_delete_elem(&ag_sockhash, self_key);
	return true;
}
