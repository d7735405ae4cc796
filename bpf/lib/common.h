/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Small helpers shared by agentgate's BPF programs: counters, events, address forms. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#define AF_INET		2
#define AF_INET6	10
#define SOCK_STREAM	1
#define SOCK_DGRAM	2

#define AG_VERDICT_REFUSE	0 /* connect() fails with EPERM */
#define AG_VERDICT_PROCEED	1

/* Set by the loader before load (skel->rodata). */
const volatile __u16 gw_port __weak = 0;		/* the daemon's listener, host order */
const volatile __u32 daemon_mark __weak = AG_DEFAULT_MARK; /* SO_MARK of the daemon's sockets */
/*
 * The daemon's tgid: the mark alone is no proof, an agent with CAP_NET_ADMIN can set it too.
 * 0 (not set) exempts nobody.
 */
const volatile __u32 daemon_tgid __weak = 0;

/*
 * Reads a context field into a register the compiler cannot fold: clang otherwise turns
 * "family == AF_INET ? ctx->a : ctx->b" into arithmetic on the ctx pointer, which the verifier
 * refuses.
 */
#define AG_CTX(field)                                                                          \
	({                                                                                     \
		__u32 ___v = (field);                                                          \
		asm volatile("" : "+r"(___v));                                                 \
		___v;                                                                          \
	})

static __always_inline void ag_stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ag_stats, &idx);

	if (v)
		*v += 1;
}

/* Events are best effort: a full ring is counted, never a reason to change a verdict. */
static __always_inline void ag_emit(__u32 kind, __u32 reason, const struct ag_conn_info *info,
				    const struct ag_conn_key *key)
{
	struct ag_event *ev;

	ev = bpf_ringbuf_reserve(&ag_events, sizeof(*ev), 0);
	if (!ev) {
		ag_stat_inc(AG_STAT_EVENTS_DROPPED);
		return;
	}
	ev->kind = kind;
	ev->reason = reason;
	if (info)
		__builtin_memcpy(&ev->info, info, sizeof(ev->info));
	else
		__builtin_memset(&ev->info, 0, sizeof(ev->info));
	if (key)
		__builtin_memcpy(&ev->key, key, sizeof(ev->key));
	else
		__builtin_memset(&ev->key, 0, sizeof(ev->key));
	bpf_ringbuf_submit(ev, 0);
}

/* ::ffff:a.b.c.d from an IPv4 address in network order. */
static __always_inline void ag_v4mapped(__u8 *dst, __u32 ip4)
{
	__u32 *w = (__u32 *)dst;

	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0xffff);
	w[3] = ip4;
}

static __always_inline void ag_copy_ip6(__u8 *dst, const __u32 w0, const __u32 w1,
					const __u32 w2, const __u32 w3)
{
	__u32 *w = (__u32 *)dst;

	w[0] = w0;
	w[1] = w1;
	w[2] = w2;
	w[3] = w3;
}
