// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * sockops, attached to each tagged cgroup next to the connect hooks.
 * Contract: at TCP_CONNECT_CB — the local port is bound and no SYN has left yet, so before the
 * daemon can accept — the identity the connect hook left on the socket is published under the
 * socket's 4-tuple (+ netns) in ag_conns; when the socket reaches TCP_CLOSE the entry is deleted
 * and a close event emitted. With the fast path on, the established agent socket joins the
 * sockhash so sk_msg can hand its sends straight to the daemon's socket — if it is non-blocking
 * (lib/fastpath.h says why a blocking one must never meet tcp_bpf's receive path).
 */
#include "lib/fastpath.h"

static __always_inline void ag_local_key(struct bpf_sock_ops *skops, struct ag_conn_key *key)
{
	key->netns_cookie = bpf_get_netns_cookie(skops);
	if (AG_CTX(skops->family) == AF_INET)
		ag_v4mapped(key->addr, AG_CTX(skops->local_ip4));
	else
		ag_copy_ip6(key->addr, AG_CTX(skops->local_ip6[0]), AG_CTX(skops->local_ip6[1]),
			    AG_CTX(skops->local_ip6[2]), AG_CTX(skops->local_ip6[3]));
	key->port = (__u16)AG_CTX(skops->local_port);
}

static __always_inline void ag_sock_key_of(struct bpf_sock_ops *skops, struct ag_sock_key *k)
{
	if (AG_CTX(skops->family) == AF_INET) {
		ag_v4mapped(k->local, AG_CTX(skops->local_ip4));
		ag_v4mapped(k->remote, AG_CTX(skops->remote_ip4));
	} else {
		ag_copy_ip6(k->local, AG_CTX(skops->local_ip6[0]), AG_CTX(skops->local_ip6[1]),
			    AG_CTX(skops->local_ip6[2]), AG_CTX(skops->local_ip6[3]));
		ag_copy_ip6(k->remote, AG_CTX(skops->remote_ip6[0]), AG_CTX(skops->remote_ip6[1]),
			    AG_CTX(skops->remote_ip6[2]), AG_CTX(skops->remote_ip6[3]));
	}
	k->lport = (__u16)AG_CTX(skops->local_port);
	k->rport = (__u16)bpf_ntohl(AG_CTX(skops->remote_port));
}

static __always_inline struct ag_conn_info *ag_identity_of(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return NULL;
	return bpf_sk_storage_get(&ag_identity, sk, 0, 0);
}

static __always_inline void ag_link(struct bpf_sock_ops *skops)
{
	struct ag_conn_info *info = ag_identity_of(skops);
	struct ag_conn_key key = {};

	if (!info)
		return; /* not redirected (e.g. the daemon's own socket) */
	ag_local_key(skops, &key);
	if (bpf_map_update_elem(&ag_conns, &key, info, BPF_ANY) == 0)
		ag_stat_inc(AG_STAT_CONNS_LINKED);
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	ag_emit(AG_EV_CONNECT, 0, info, &key);
}

static __always_inline void ag_unlink(struct bpf_sock_ops *skops)
{
	struct ag_conn_info *info = ag_identity_of(skops);
	struct ag_conn_key key = {};
	struct ag_sock_key sk = {}, peer = {};

	if (!info)
		return;
	ag_local_key(skops, &key);
	if (bpf_map_delete_elem(&ag_conns, &key) == 0)
		ag_stat_inc(AG_STAT_CONNS_UNLINKED);
	ag_sock_key_of(skops, &sk);
	ag_fp_key_reverse(&sk, &peer);
	bpf_map_delete_elem(&ag_fastpath, &sk);
	bpf_map_delete_elem(&ag_fastpath, &peer);
	ag_emit(AG_EV_CLOSE, 0, info, &key);
}

static __always_inline void ag_fastpath_join(struct bpf_sock_ops *skops)
{
	struct ag_fp_entry e = { .state = AG_FP_NEW };
	struct ag_sock_key k = {}, gw = {};
	struct bpf_sock *sk = skops->sk;
	struct tcp_sock *tp;
	__u32 zero = 0;
	struct ag_config *cfg = bpf_map_lookup_elem(&ag_config, &zero);

	if (!cfg || !cfg->fastpath || !sk || !ag_identity_of(skops))
		return;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp || !ag_fp_nonblocking(tp))
		return; /* a blocking agent keeps plain TCP on both directions */
	ag_sock_key_of(skops, &k);
	/* Published before the socket can send: the gateway's side checks it (lib/fastpath.h). */
	e.sk = (__u64)tp;
	if (bpf_map_update_elem(&ag_fastpath, &k, &e, BPF_ANY))
		return;
	/* Whatever an earlier connection of this 4-tuple left for the gateway's side. */
	ag_fp_key_reverse(&k, &gw);
	bpf_map_delete_elem(&ag_fastpath, &gw);
	if (bpf_sock_hash_update(skops, &ag_sockhash, &k, BPF_NOEXIST)) {
		bpf_map_delete_elem(&ag_fastpath, &k);
		return;
	}
	/* Every packet it sends from now on runs ag_fastpath_check(). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

/*
 * A packet of a joined agent socket is leaving (it reserves no option space). If the agent
 * turned blocking, or sk_msg gave up on it (AG_FP_LEAVE), it leaves the sockhash here once
 * nothing waits in its ingress queue and the gateway's side is settled on TCP (lib/fastpath.h,
 * rules 1, 3 and 4). The socket is locked here — by its owner in sendmsg or in softirq for an
 * ACK — so no redirect into it can land meanwhile.
 */
static __always_inline void ag_fastpath_check(struct bpf_sock_ops *skops)
{
	struct ag_sock_key k = {}, gw = {};
	struct bpf_sock *sk = skops->sk;
	struct ag_fp_entry *me;
	struct tcp_sock *tp;

	if (!sk)
		return;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	ag_sock_key_of(skops, &k);
	me = bpf_map_lookup_elem(&ag_fastpath, &k);
	if (ag_fp_nonblocking(tp) && (!me || me->state != AG_FP_LEAVE))
		return;
	if (ag_fp_queued(tp))
		return;
	ag_fp_key_reverse(&k, &gw);
	if (!ag_fp_claim_off(&gw))
		return;
	if (me)
		me->state = AG_FP_OFF;
	bpf_map_delete_elem(&ag_sockhash, &k);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
						 ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

SEC("sockops")
int ag_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		ag_link(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		ag_fastpath_join(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		ag_fastpath_check(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			ag_unlink(skops);
		break;
	default:
		break;
	}
	return 1;
}
