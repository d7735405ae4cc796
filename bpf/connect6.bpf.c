// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * cgroup/connect6, attached to each tagged cgroup (inherited by every cgroup below it).
 * Contract: as connect4, for AF_INET6 sockets: IPv6 destinations go to the gateway on ::1, and
 * IPv4-mapped ones (::ffff:a.b.c.d, a dual-stack socket reaching an IPv4 host) to
 * ::ffff:127.0.0.1, recorded with their IPv4 family.
 */
#include "lib/connect.h"

SEC("cgroup/connect6")
int ag_connect6(struct bpf_sock_addr *ctx)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	bool mapped = !w0 && !w1 && w2 == bpf_htonl(0xffff);
	__u8 dst[16];
	int ret;

	ag_copy_ip6(dst, w0, w1, w2, w3);
	ret = ag_intercept(ctx, dst, bpf_ntohs((__u16)ctx->user_port), mapped ? AF_INET : AF_INET6,
			   !mapped);
	if (ret < 0)
		return AG_VERDICT_REFUSE;
	if (ret > 0) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(gw_port);
	}
	return AG_VERDICT_PROCEED;
}
