// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * cgroup/connect4, attached to each tagged cgroup (inherited by every cgroup below it).
 * Contract: every TCP connect of the cgroup is either rewritten to the gateway's listener on
 * 127.0.0.1 with the caller's identity and original destination left on the socket, or refused
 * (EPERM) — it never reaches its destination directly. Non-stream sockets pass untouched.
 */
#include "lib/connect.h"

SEC("cgroup/connect4")
int ag_connect4(struct bpf_sock_addr *ctx)
{
	__u8 dst[16];
	int ret;

	ag_v4mapped(dst, ctx->user_ip4);
	ret = ag_intercept(ctx, dst, bpf_ntohs((__u16)ctx->user_port), AF_INET, false);
	if (ret < 0)
		return AG_VERDICT_REFUSE;
	if (ret > 0) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(gw_port);
	}
	return AG_VERDICT_PROCEED;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
