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
 *    socket whose file is O_NONBLOCK joins; one that turns blocking later (a connect with a
 *    timeout, then blocking I/O) gets no more redirected bytes and leaves the sockhash (its
 *    psock dropped, tcp_prot back) from sockops as soon as its ingress queue is empty: sk_msg
 *    programs may not delete from a sockhash, so the agent's sends switch to TCP, and the
 *    packets it then transmits run sockops (BPF_SOCK_OPS_HDR_OPT_LEN_CB). The daemon's own
 *    socket is non-blocking and reads with MSG_DONTWAIT: EAGAIN is harmless there.
 * 2. bpf_tcp_ingress() charges the receiver but never looks at its receive buffer: redirected
 *    bytes pile up without bound behind a slow reader (and end in -ENOMEM for the sender under
 *    memory pressure). A sender therefore falls back to loopback TCP, which has flow control,
 *    while the peer holds more than its receive buffer.
 * 3. tcp_bpf_recvmsg() reads the psock's ingress queue before the TCP receive queue. Going
 *    from redirect to TCP keeps the order (the older bytes are the ones read first); going from
 *    TCP to redirect is only safe once the peer has read every byte sent over TCP
 *    (ag_fp_drained()), else newer redirected bytes would overtake older ones.
 *    A sender that streams without pause never gets there (it always has bytes in flight), and
 *    neither does an agent that sent before the gateway joined and does not know yet where the
 *    gateway's socket lives (it learns that from a redirect or from the gateway's first send).
 *    Its sends would pay for tcp_bpf and gain nothing: an agent that sent AG_FP_SOLO_MAX bytes
 *    over TCP in a row leaves the sockhash (rule 4) for plain TCP.
 * 4. Dropping a socket's psock (leaving the sockhash) frees what waits in its ingress queue, so
 *    an agent only leaves while that queue is empty and the one socket that could redirect into
 *    it is settled on TCP (a cmpxchg on its state) — all under the agent's socket lock, which
 *    a redirect into it needs too.
 *
 * Kernel sockets are only ever read here, with fault-safe loads (bpf_rdonly_cast(), probes). The
 * addresses in ag_fastpath are not references: they are those of the leg's two live sockets,
 * published by each socket itself (or learnt from the redirect), and go with the leg — its
 * entries are deleted when the agent's socket closes, and a new leg on the same 4-tuple
 * replaces them when its agent socket joins.
 */
#pragma once

#include <bpf/bpf_core_read.h>
#include "common.h"

#define AG_O_NONBLOCK 04000
/* include/net/sock.h: flag bits in the low bits of sk_user_data. */
#define AG_SK_USER_DATA_FLAGS 7UL
#define AG_SK_USER_DATA_PSOCK 4UL
/* A receiver may hold this much redirected data even when its receive buffer is smaller. */
#define AG_FP_QUEUE_MIN (1U << 20)
/* TCP bytes in a row after which an agent gives up on the redirect (rule 3). */
#define AG_FP_SOLO_MAX (1ULL << 20)

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

/*
 * Redirected bytes waiting in the socket's ingress queue (0 when it is in no sockmap). Read
 * with a probe: only sk_msg may use kfuncs, the linker cannot merge them across objects.
 */
static __always_inline __u32 ag_fp_queued(struct tcp_sock *tp)
{
	__u64 ud = (__u64)tp->inet_conn.icsk_inet.sk.sk_user_data; /* low bits: flags */
	struct sk_psock *psock = (void *)(ud & ~AG_SK_USER_DATA_FLAGS);

	if (!(ud & AG_SK_USER_DATA_PSOCK))
		return 0;
	return BPF_CORE_READ(psock, msg_tot_len);
}

static __always_inline bool ag_fp_backlogged(struct tcp_sock *peer)
{
	int lim = peer->inet_conn.icsk_inet.sk.sk_rcvbuf;

	if (lim < (int)AG_FP_QUEUE_MIN)
		lim = AG_FP_QUEUE_MIN;
	return ag_fp_queued(peer) >= (__u32)lim;
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
 * Settles the gateway's side of the leg on TCP for good, unless it is FAST: then bytes may be
 * on their way into the agent's ingress queue and the agent must not leave yet.
 */
static __always_inline bool ag_fp_claim_off(struct ag_sock_key *gw)
{
	struct ag_fp_entry off = { .state = AG_FP_OFF }, *ge;

	if (!bpf_map_update_elem(&ag_fastpath, gw, &off, BPF_NOEXIST))
		return true;
	ge = bpf_map_lookup_elem(&ag_fastpath, gw);
	return ge && ag_fp_settle(&ge->state, AG_FP_OFF);
}
