/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The ABI between agentgate's BPF programs and userspace: event and map value layouts.
 * Only fixed-width __u* types here, so the same header compiles against vmlinux.h (BPF side)
 * and <linux/types.h> (userspace). Changing a layout here means bumping AG_ABI_VERSION, so a
 * daemon never reuses pinned maps of another layout.
 */
#pragma once

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

#define AG_ABI_VERSION		2
#define AG_COMM_LEN		16
#define AG_MAX_CGROUP_DEPTH	32
/* Marks the daemon's own upstream sockets (SO_MARK); the connect hooks let them through. */
#define AG_DEFAULT_MARK		0x41474754 /* "AGGT" */

enum ag_event_kind {
	AG_EV_CONNECT = 1, /* a tagged connect was redirected to the daemon */
	AG_EV_DENY = 2,	   /* a tagged connect was refused in the kernel (see ag_deny_reason) */
	AG_EV_CLOSE = 3,   /* a redirected socket closed */
};

enum ag_deny_reason {
	AG_DENY_NONE = 0,
	AG_DENY_NO_DAEMON = 1, /* nothing listens on the gateway port in the caller's netns */
	AG_DENY_PROTO = 2,     /* not TCP (SCTP, any socket type); MPTCP connects on TCP subflows */
	AG_DENY_NO_STORAGE = 3, /* could not record the caller: refuse rather than lose identity */
	/*
	 * BPF LSM: a tagged task connecting a socket made outside every tagged cgroup (before it
	 * moved in, or received over SCM_RIGHTS), which the cgroup hooks never see.
	 */
	AG_DENY_FOREIGN_SOCKET = 4,
};

/* Counters in the per-CPU "stats" array. */
enum ag_stat {
	AG_STAT_REDIRECTED = 0,
	AG_STAT_DENIED,
	AG_STAT_EVENTS_DROPPED, /* ring buffer reservation failed */
	AG_STAT_CONNS_LINKED,	/* sockops linked an identity to a 4-tuple */
	AG_STAT_CONNS_UNLINKED,
	AG_STAT_FASTPATH_REDIRECTS,
	AG_STAT_FASTPATH_FALLBACKS,
	AG_STAT_FOREIGN_SOCKET, /* refused by the LSM guard (AG_DENY_FOREIGN_SOCKET); in DENIED too */
	AG_STAT_MAX
};

/*
 * One end of a TCP connection. IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d) so that
 * one key type serves both families; ports are in host order.
 */
struct ag_endpoint {
	__u8 addr[16];
	__u16 port;
	__u16 family; /* AF_INET or AF_INET6, of the original destination */
	__u32 pad;
};

/* Key of the "conns" map: the agent's side of the agent↔gateway leg, plus its netns. */
struct ag_conn_key {
	__u64 netns_cookie;
	__u8 addr[16];
	__u16 port;
	__u16 pad[3];
};

/* Who connected and where to; recorded by the connect hook, read by the daemon at accept. */
struct ag_conn_info {
	struct ag_endpoint orig_dst;
	__u64 sock_cookie;
	__u64 cgroup_id;     /* the caller's own cgroup */
	__u64 tag_cgroup_id; /* the nearest tagged ancestor (or itself): selects the agent */
	__u64 boot_ns;	     /* bpf_ktime_get_boot_ns() at connect */
	__u32 tgid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	char comm[AG_COMM_LEN];
};

struct ag_event {
	__u32 kind;   /* enum ag_event_kind */
	__u32 reason; /* enum ag_deny_reason for AG_EV_DENY */
	struct ag_conn_info info;
	struct ag_conn_key key; /* zero for AG_EV_DENY */
};

/* Key of the fast-path sockhash: a socket's local and remote ends (same netns assumed). */
struct ag_sock_key {
	__u8 local[16];
	__u8 remote[16];
	__u16 lport;
	__u16 rport;
	__u32 pad;
};

/* Value of the "config" array (index 0): settings userspace may change at run time. */
struct ag_config {
	__u32 fastpath; /* 1: agent↔gateway leg through sk_msg redirect */
	__u32 pad;
};

/*
 * The kernel relay of raw sessions (bpf/sk_skb.bpf.c): per direction, keyed by the slot of the
 * receiving socket in ag_relay_socks (2n: the agent's socket, 2n + 1: the upstream's; the peer
 * is key ^ 1). Shared with the daemon through an mmap of ag_relay_dirs.
 */
#define AG_RELAY_SLOTS 32768
struct ag_relay_dir {
	__u64 bytes;	    /* redirected to the peer's egress by the program */
	__u64 passed_bytes; /* left in this socket's ingress queue for the daemon */
	__u64 relayed;	    /* of those, written into the peer's socket by the daemon */
	__u32 passed;	    /* skbs passed, of which: */
	__u32 backlogged;   /* the peer's backlog was long */
	__u32 no_peer;	    /* the peer was not in the sockhash */
	__u32 pad;
};
