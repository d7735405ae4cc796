// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * sk_skb stream verdict on ag_relay_socks: the kernel relay of a raw (protocol: tcp) session.
 * Every skb that arrives on one of the daemon's two sockets of a session goes to the egress of
 * the other (the psock's backlog sends it), unless the daemon relays that direction itself for
 * the moment (pending), bytes the daemon must relay first are waiting in this socket's ingress
 * queue, or the peer's backlog is long (a slow reader: the skb stays here, charged to this
 * socket's receive buffer, so TCP's window closes and memory stays bounded). Such an skb is
 * passed to this socket's ingress queue and the direction is handed to the daemon (pending),
 * which hands it back once it has written everything (userspace/krelay.c). Never dropped.
 *
 * Order: the program reads this socket's queue before pending; the daemon sets pending before
 * it reads and clears it only after it wrote what it read. A redirect thus never overtakes a
 * passed byte (krelay.c has the argument).
 */
#include <bpf/bpf_core_read.h>
#include "lib/common.h"

#define AG_SK_USER_DATA_FLAGS 7UL
#define AG_SK_USER_DATA_PSOCK 4UL
/* skbs waiting in the peer's backlog above which the daemon takes over (a slow reader). */
#define AG_RELAY_BACKLOG_MAX 32

#define AG_READ_ONCE(x) (*(volatile typeof(x) *)&(x))

static __always_inline struct sk_psock *ag_psock_of(struct bpf_sock *bsk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(bsk);
	__u64 ud;

	if (!tp)
		return NULL;
	ud = (__u64)tp->inet_conn.icsk_inet.sk.sk_user_data;
	if (!(ud & AG_SK_USER_DATA_PSOCK))
		return NULL;
	return (struct sk_psock *)(ud & ~AG_SK_USER_DATA_FLAGS);
}

/* Bytes waiting in this socket's own ingress queue, or skbs in its backlog. */
static __always_inline bool ag_self_queued(struct bpf_sock *bsk)
{
	struct sk_psock *psock = ag_psock_of(bsk);

	if (!psock)
		return false;
	return BPF_CORE_READ(psock, msg_tot_len) || BPF_CORE_READ(psock, ingress_skb.qlen);
}

static __always_inline bool ag_peer_backlogged(__u32 *peer)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&ag_relay_socks, peer);
	struct sk_psock *psock;
	bool full = false;

	if (!sk)
		return false;
	psock = ag_psock_of(sk);
	if (psock)
		full = BPF_CORE_READ(psock, ingress_skb.qlen) > AG_RELAY_BACKLOG_MAX;
	bpf_sk_release(sk);
	return full;
}

SEC("sk_skb/stream_verdict")
int ag_sk_skb(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct ag_relay_dir *st;
	struct bpf_sock *self;
	__u32 *slot, key, peer;
	bool queued;

	slot = bpf_map_lookup_elem(&ag_relay_idx, &cookie);
	if (!slot)
		return SK_PASS;
	key = *slot;
	peer = key ^ 1;
	st = bpf_map_lookup_elem(&ag_relay_dirs, &key);
	if (!st)
		return SK_PASS;
	self = skb->sk;
	if (!self)
		goto pass;
	queued = ag_self_queued(self);
	/* The queue before pending (see above): the compiler may not swap the two reads. */
	asm volatile("" ::: "memory");
	if (queued || AG_READ_ONCE(st->pending))
		goto pass;
	if (ag_peer_backlogged(&peer)) {
		AG_READ_ONCE(st->pending) = 1;
		goto pass;
	}
	if (bpf_sk_redirect_hash(skb, &ag_relay_socks, &peer, 0) == SK_PASS) {
		__sync_fetch_and_add(&st->bytes, skb->len);
		return SK_PASS;
	}
	/* The peer is not (or no longer) in the sockhash: the daemon relays. */
	AG_READ_ONCE(st->pending) = 1;
pass:
	__sync_fetch_and_add(&st->passed, 1);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
