// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * sk_msg verdict on ag_sockhash: the fast path of the agent↔gateway loopback leg.
 * Contract: a send on a socket of the sockhash goes straight into the peer's receive queue
 * (skipping the loopback TCP stack) when the peer is in the sockhash at the socket's first send;
 * otherwise that socket stays on the ordinary path for good. A message is never dropped here.
 */
#include "lib/common.h"

SEC("sk_msg")
int ag_sk_msg(struct sk_msg_md *msg)
{
	struct ag_sock_key self = {}, peer = {};
	__u32 *st, v;
	long ret;

	if (AG_CTX(msg->family) == AF_INET) {
		ag_v4mapped(self.local, AG_CTX(msg->local_ip4));
		ag_v4mapped(self.remote, AG_CTX(msg->remote_ip4));
	} else {
		ag_copy_ip6(self.local, AG_CTX(msg->local_ip6[0]), AG_CTX(msg->local_ip6[1]),
			    AG_CTX(msg->local_ip6[2]), AG_CTX(msg->local_ip6[3]));
		ag_copy_ip6(self.remote, AG_CTX(msg->remote_ip6[0]), AG_CTX(msg->remote_ip6[1]),
			    AG_CTX(msg->remote_ip6[2]), AG_CTX(msg->remote_ip6[3]));
	}
	self.lport = (__u16)AG_CTX(msg->local_port);
	self.rport = (__u16)bpf_ntohl(AG_CTX(msg->remote_port));
	__builtin_memcpy(peer.local, self.remote, 16);
	__builtin_memcpy(peer.remote, self.local, 16);
	peer.lport = self.rport;
	peer.rport = self.lport;

	st = bpf_map_lookup_elem(&ag_fpstate, &self);
	if (st && *st == AG_FP_SLOW)
		return SK_PASS;

	ret = bpf_msg_redirect_hash(msg, &ag_sockhash, &peer, BPF_F_INGRESS);
	if (!st) {
		v = ret == SK_PASS ? AG_FP_FAST : AG_FP_SLOW;
		bpf_map_update_elem(&ag_fpstate, &self, &v, BPF_NOEXIST);
	}
	ag_stat_inc(ret == SK_PASS ? AG_STAT_FASTPATH_REDIRECTS : AG_STAT_FASTPATH_FALLBACKS);
	/* On a failed redirect msg->sk_redir stays unset, so SK_PASS sends it the normal way. */
	return SK_PASS;
}
