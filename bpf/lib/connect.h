/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The shared half of the connect4/connect6 hooks: who is calling, which agent they belong to,
 * whether the gateway is there to take the connection, and the record left on the socket.
 */
#pragma once

#include "common.h"

/* The nearest tagged cgroup at or above the caller's, or 0. */
static __always_inline __u64 ag_tag_of_current(void)
{
	for (int level = AG_MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (!id)
			continue;
		if (bpf_map_lookup_elem(&ag_tagged, &id))
			return id;
	}
	return 0;
}

/*
 * Is the gateway listening where we are about to send the caller? Looked up in the caller's own
 * netns: a tagged process in another netns has no gateway on its loopback and is refused. The
 * listener must carry the daemon's mark: a tagged process listening on the gateway port while
 * the daemon is down would otherwise be handed every agent's connections.
 */
static __always_inline bool ag_gateway_listening(struct bpf_sock_addr *ctx, bool v6)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *l;
	bool ok;

	if (v6) {
		t.ipv6.daddr[3] = bpf_htonl(1);
		t.ipv6.dport = bpf_htons(gw_port);
		l = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	} else {
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = bpf_htons(gw_port);
		l = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	if (!l)
		return false;
	ok = l->state == BPF_TCP_LISTEN && l->mark == daemon_mark;
	bpf_sk_release(l);
	return ok;
}

/* 127.0.0.1 (IPv4-mapped, as we store it), ::ffff:127.0.0.1 or ::1. */
static __always_inline bool ag_is_gateway_addr(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	if (w[0] || w[1])
		return false;
	if (w[2] == bpf_htonl(0xffff))
		return w[3] == bpf_htonl(0x7f000001);
	return !w[2] && w[3] == bpf_htonl(1);
}

static __always_inline int ag_refuse(__u32 reason, struct ag_conn_info *info)
{
	ag_stat_inc(AG_STAT_DENIED);
	ag_emit(AG_EV_DENY, reason, info, NULL);
	return AG_VERDICT_REFUSE;
}

static __always_inline void ag_fill_caller(struct ag_conn_info *info, __u64 tag)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();

	info->tgid = pid_tgid >> 32;
	info->tid = (__u32)pid_tgid;
	info->uid = (__u32)uid_gid;
	info->gid = uid_gid >> 32;
	info->cgroup_id = bpf_get_current_cgroup_id();
	info->tag_cgroup_id = tag;
	info->boot_ns = bpf_ktime_get_boot_ns();
	bpf_get_current_comm(info->comm, sizeof(info->comm));
}

/*
 * Common entry: decides whether this connect is ours, and if so fills the socket's identity
 * record. Returns 1 to redirect, 0 to let the connect proceed untouched, <0 for a refusal
 * (already counted and reported).
 */
static __always_inline int ag_intercept(struct bpf_sock_addr *ctx, const __u8 *dst,
					__u16 port, __u16 family, bool v6_listener)
{
	struct ag_conn_info *info, tmp = {};
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return 0;
	/*
	 * UDP (DNS) and ping sockets are not proxied. Only datagram sockets pass: an SCTP
	 * one-to-many socket (SOCK_SEQPACKET) is a connection all the same, refused below.
	 */
	if (ctx->type == SOCK_DGRAM)
		return 0;
	/*
	 * The daemon's own upstream sockets (it also never runs in a tagged cgroup): its mark, set
	 * by the daemon itself, which is up. A marked socket of anyone else is taken as any other.
	 */
	if (sk->mark == daemon_mark && daemon_tgid &&
	    bpf_get_current_pid_tgid() >> 32 == daemon_tgid &&
	    ag_gateway_listening(ctx, v6_listener))
		return 0;

	/*
	 * Nested tags: the hooks of a tagged cgroup and of a tagged ancestor both run for one
	 * connect, child first. The first one already redirected this socket; the next must not
	 * take the gateway for the destination.
	 */
	if (port == gw_port && ag_is_gateway_addr(dst)) {
		info = bpf_sk_storage_get(&ag_identity, sk, 0, 0);
		if (info && info->sock_cookie == bpf_get_socket_cookie(ctx))
			return 0;
	}

	ag_fill_caller(&tmp, ag_tag_of_current());
	__builtin_memcpy(tmp.orig_dst.addr, dst, 16);
	tmp.orig_dst.port = port;
	tmp.orig_dst.family = family;

	/* A stream socket that is not TCP cannot be relayed: refuse, never let it go direct. */
	if (ctx->protocol != IPPROTO_TCP)
		return ag_refuse(AG_DENY_PROTO, &tmp) - 1;
	if (!ag_gateway_listening(ctx, v6_listener))
		return ag_refuse(AG_DENY_NO_DAEMON, &tmp) - 1;

	info = bpf_sk_storage_get(&ag_identity, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!info)
		return ag_refuse(AG_DENY_NO_STORAGE, &tmp) - 1;
	tmp.sock_cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(info, &tmp, sizeof(tmp));
	ag_stat_inc(AG_STAT_REDIRECTED);
	return 1;
}
