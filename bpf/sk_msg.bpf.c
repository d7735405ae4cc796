// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * sk_msg verdict on ag_sockhash: the fast path of the agent↔gateway loopback leg.
 * Contract: each send of a socket in the sockhash goes either straight into the peer's ingress
 * queue or through loopback TCP, chosen per message so that the peer reads every byte in the
 * order it was sent, the reader's memory stays bounded, and an agent reading on a blocking
 * socket never meets tcp_bpf's receive path (the rules and why: lib/fastpath.h). A message is
 * never dropped here.
 */
#include "lib/fastpath.h"

static __always_inline void ag_msg_key(struct sk_msg_md *msg, struct ag_sock_key *k)
{
	if (AG_CTX(msg->family) == AF_INET) {
		ag_v4mapped(k->local, AG_CTX(msg->local_ip4));
		ag_v4mapped(k->remote, AG_CTX(msg->remote_ip4));
	} else {
		ag_copy_ip6(k->local, AG_CTX(msg->local_ip6[0]), AG_CTX(msg->local_ip6[1]),
			    AG_CTX(msg->local_ip6[2]), AG_CTX(msg->local_ip6[3]));
		ag_copy_ip6(k->remote, AG_CTX(msg->remote_ip6[0]), AG_CTX(msg->remote_ip6[1]),
			    AG_CTX(msg->remote_ip6[2]), AG_CTX(msg->remote_ip6[3]));
	}
	k->lport = (__u16)AG_CTX(msg->local_port);
	k->rport = (__u16)bpf_ntohl(AG_CTX(msg->remote_port));
}

SEC("sk_msg")
int ag_sk_msg(struct sk_msg_md *msg)
{
	struct ag_sock_key self = {}, peer = {};
	struct ag_fp_entry *me, *pe, init = {};
	struct tcp_sock *tp, *ptp;
	struct bpf_sock *sk = msg->sk;
	struct sk_msg *km;
	bool agent;
	__u64 st;

	if (!sk)
		return SK_PASS;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return SK_PASS;
	ag_msg_key(msg, &self);
	ag_fp_key_reverse(&self, &peer);
	/* The agent's socket is the one connected to the gateway's port. */
	agent = self.rport == gw_port;

	me = bpf_map_lookup_elem(&ag_fastpath, &self);
	if (!me) {
		init.sk = (__u64)tp;
		bpf_map_update_elem(&ag_fastpath, &self, &init, BPF_NOEXIST);
		me = bpf_map_lookup_elem(&ag_fastpath, &self);
		if (!me)
			goto slow;
	}
	st = me->state;
	if (st == AG_FP_OFF || st == AG_FP_LEAVE)
		goto slow;
	pe = bpf_map_lookup_elem(&ag_fastpath, &peer);
	ptp = ag_fp_sock_at(me->peer ? me->peer : pe ? pe->sk : 0);

	/*
	 * A blocking agent (it turned blocking after it joined) gets no more redirected bytes
	 * and sends over TCP itself: its packets run sockops, which takes it out of the
	 * sockhash once its ingress queue is empty (lib/fastpath.h, rules 1 and 4).
	 */
	if (agent && !ag_fp_nonblocking(tp)) {
		if (st == AG_FP_FAST)
			__sync_val_compare_and_swap(&me->state, AG_FP_FAST, AG_FP_SLOW);
		goto slow_state;
	}
	if (!agent && ptp && !ag_fp_nonblocking(ptp)) {
		if (st == AG_FP_FAST)
			__sync_val_compare_and_swap(&me->state, AG_FP_FAST, AG_FP_SLOW);
		else
			ag_fp_settle(&me->state, AG_FP_OFF);
		goto slow;
	}

	if (st == AG_FP_FAST) {
		if (ptp && ag_fp_backlogged(ptp)) {
			me->slow_mark = tp->bytes_sent;
			__sync_val_compare_and_swap(&me->state, AG_FP_FAST, AG_FP_SLOW);
			goto slow;
		}
		if (bpf_msg_redirect_hash(msg, &ag_sockhash, &peer, BPF_F_INGRESS) == SK_PASS)
			goto fast;
		/* The peer left the sockhash (it closed): TCP from here on. */
		__sync_val_compare_and_swap(&me->state, AG_FP_FAST, AG_FP_OFF);
		goto slow;
	}

	/* NEW or SLOW: redirect only once every byte sent over TCP has been read. */
	if (!ag_fp_drained(tp, ptp) || (ptp && ag_fp_backlogged(ptp))) {
		/* Streaming over TCP for good (lib/fastpath.h, rule 3): plain TCP serves it best. */
		if (agent && tp->bytes_sent - me->slow_mark > AG_FP_SOLO_MAX) {
			__sync_val_compare_and_swap(&me->state, st, AG_FP_LEAVE);
			goto slow;
		}
		goto slow_state;
	}
	if (__sync_val_compare_and_swap(&me->state, st, AG_FP_FAST) != st)
		goto slow; /* the agent settled this side on TCP meanwhile */
	if (bpf_msg_redirect_hash(msg, &ag_sockhash, &peer, BPF_F_INGRESS) == SK_PASS) {
		km = bpf_cast_to_kern_ctx(msg);
		me->peer = (__u64)km->sk_redir;
		goto fast;
	}
	/*
	 * Not in the sockhash: for the agent, the gateway has not accepted yet and may join
	 * later; for the gateway, the agent never joined (it was blocking) or has left.
	 */
	__sync_val_compare_and_swap(&me->state, AG_FP_FAST, agent ? AG_FP_SLOW : AG_FP_OFF);
	goto slow;

slow_state:
	if (st == AG_FP_NEW)
		__sync_val_compare_and_swap(&me->state, AG_FP_NEW, AG_FP_SLOW);
slow:
	/* msg->sk_redir is unset: SK_PASS sends it through loopback TCP. */
	ag_stat_inc(AG_STAT_FASTPATH_FALLBACKS);
	return SK_PASS;
fast:
	ag_stat_inc(AG_STAT_FASTPATH_REDIRECTS);
	return SK_PASS;
}
