/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The test of the BPF LSM guard (lsm_connect.bpf.c): is a task at or below a tagged cgroup
 * about to connect a socket that no tagged cgroup's connect hooks will ever see? A socket keeps
 * the cgroup it was made in (sk_cgrp_data), and the cgroup hooks run for that cgroup only.
 */
#pragma once

#include "connect.h"
#include <bpf/bpf_core_read.h>

#define EPERM		1
#define AF_UNSPEC	0
#define SOCK_RAW	3
#define TCP_CLOSE	7

/* The cgroup a socket was made in (sk_cgrp_data), as a cgroup id; 0 if it has none. */
static __always_inline __u64 ag_sock_cgroup_id(struct cgroup *cg)
{
	return cg ? BPF_CORE_READ(cg, kn, id) : 0;
}

/*
 * Is cg, or one of its ancestors, tagged? The same levels as ag_tag_of_current() looks at
 * (0 to AG_MAX_CGROUP_DEPTH - 1): ancestors[0] is the root, ancestors[level] cg itself.
 */
static __always_inline bool ag_cgroup_tagged(struct cgroup *cg)
{
	int level;

	if (!cg)
		return false;
	level = BPF_CORE_READ(cg, level);
	for (int i = 0; i < AG_MAX_CGROUP_DEPTH; i++) {
		struct cgroup *anc = NULL;
		__u64 id;

		if (i > level)
			break;
		bpf_core_read(&anc, sizeof(anc), &cg->ancestors[i]);
		if (!anc)
			continue;
		id = BPF_CORE_READ(anc, kn, id);
		if (id && bpf_map_lookup_elem(&ag_tagged, &id))
			return true;
	}
	return false;
}

/* Only IPv4/IPv6 sockets that make a connection (stream, SCTP one-to-many) are ours. */
static __always_inline bool ag_conn_socket(struct socket *sock, struct sock *sk)
{
	short type = sock->type;
	__u16 family;

	if (!sk || type == SOCK_DGRAM || type == SOCK_RAW)
		return false;
	family = sk->__sk_common.skc_family;
	return family == AF_INET || family == AF_INET6;
}

/* The destination as the caller wrote it, into info->orig_dst (left zero if unreadable). */
static __always_inline void ag_fill_dst(struct ag_conn_info *info, const void *addr, int len,
					__u16 family)
{
	if (family == AF_INET && len >= (int)sizeof(struct sockaddr_in)) {
		struct sockaddr_in sin = {};

		bpf_probe_read_kernel(&sin, sizeof(sin), addr);
		ag_v4mapped(info->orig_dst.addr, sin.sin_addr.s_addr);
		info->orig_dst.port = bpf_ntohs(sin.sin_port);
		info->orig_dst.family = AF_INET;
	} else if (family == AF_INET6 && len >= (int)sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 sin6 = {};

		bpf_probe_read_kernel(&sin6, sizeof(sin6), addr);
		__builtin_memcpy(info->orig_dst.addr, &sin6.sin6_addr, 16);
		info->orig_dst.port = bpf_ntohs(sin6.sin6_port);
		info->orig_dst.family = AF_INET6;
	}
}

/*
 * The common test, once the hook has seen a socket about to connect to addr (len bytes):
 * 0 to let it be, -EPERM when a tagged task is using a socket that no tagged cgroup's hooks
 * will ever see.
 */
static __always_inline int ag_guard(struct sock *sk, const void *addr, int len)
{
	struct ag_conn_info info = {};
	struct cgroup *cg;
	__u16 family = 0xffff;
	__u64 tag;

	/*
	 * The socket made where its caller lives: the cgroup hooks of that cgroup decide (the
	 * common case by far, and all of the host outside tagged cgroups that did not move).
	 */
	cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	if (ag_sock_cgroup_id(cg) == bpf_get_current_cgroup_id())
		return 0;
	tag = ag_tag_of_current();
	if (!tag)
		return 0;
	if (ag_cgroup_tagged(cg))
		return 0;
	/* A disconnect (AF_UNSPEC) connects nowhere. */
	if (len >= (int)sizeof(family)) {
		bpf_probe_read_kernel(&family, sizeof(family), addr);
		if (family == AF_UNSPEC)
			return 0;
	}
	/* The daemon's own sockets, as in the cgroup hooks (it never runs in a tagged cgroup). */
	if (daemon_tgid && bpf_get_current_pid_tgid() >> 32 == daemon_tgid &&
	    sk->sk_mark == daemon_mark)
		return 0;

	ag_fill_caller(&info, tag);
	ag_fill_dst(&info, addr, len, family);
	ag_stat_inc(AG_STAT_FOREIGN_SOCKET);
	ag_stat_inc(AG_STAT_DENIED);
	ag_emit(AG_EV_DENY, AG_DENY_FOREIGN_SOCKET, &info, NULL);
	return -EPERM;
}
