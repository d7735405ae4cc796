// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * sk_skb stream verdict on ag_relay_socks: the kernel relay of a raw (protocol: tcp) session.
 * Every skb that arrives on one of the daemon's two sockets of a session goes to the egress of
 * the other (the psock's backlog sends it), unless
 *   - bytes passed to the daemon earlier are not all written into the peer's socket yet
 *     (passed_bytes != relayed): a redirect would overtake them,
 *   - the peer's backlog is long (a slow reader: the skb stays here, charged to this socket's
 *     receive buffer, so TCP's window closes and memory stays bounded), or
 *   - the peer is gone from the sockhash.
 * Then the skb is passed to this socket's own ingress queue, which the daemon reads and relays
 * (userspace/krelay.c); before it writes them, it waits until every byte redirected before them
 * reached the peer's socket, so its writes never overtake a redirect either. Nothing is dropped
 * but empty skbs (a bare FIN, which TCP already noted on this socket).
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
	__u32 *slot, key, peer;

	slot = bpf_map_lookup_elem(&ag_relay_idx, &cookie);
	if (!slot)
		return SK_PASS;
	/*
	 * A FIN comes as an skb of its own, often empty: the FIN itself stays with this socket
	 * (the daemon passes it on, see krelay.h) and an empty skb must not reach the peer's
	 * backlog, whose send of zero bytes counts as a hard error (EPIPE on the peer).
	 */
	if (!skb->len)
		return SK_DROP;
	key = *slot;
	peer = key ^ 1;
	st = bpf_map_lookup_elem(&ag_relay_dirs, &key);
	if (!st)
		return SK_PASS;
	if (AG_READ_ONCE(st->passed_bytes) != AG_READ_ONCE(st->relayed))
		goto pass;
	if (ag_peer_backlogged(&peer)) {
		__sync_fetch_and_add(&st->backlogged, 1);
		goto pass;
	}
	if (bpf_sk_redirect_hash(skb, &ag_relay_socks, &peer, 0) == SK_PASS) {
		__sync_fetch_and_add(&st->bytes, skb->len);
		return SK_PASS;
	}
	/* The peer is not (or no longer) in the sockhash: the daemon relays. */
	__sync_fetch_and_add(&st->no_peer, 1);
pass:
	/* Verdicts of one socket run one at a time (its lock): a plain sum is exact. */
	AG_READ_ONCE(st->passed_bytes) += skb->len;
	__sync_fetch_and_add(&st->passed, 1);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
