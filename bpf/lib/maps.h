/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Every map of agentgate, defined once. Each <hook>.bpf.c includes this header; the objects are
 * linked into one (bpftool gen object), where the __weak definitions collapse into one map each.
 * Maps are pinned by name under the daemon's bpffs folder so that enforcement and the identity
 * records outlive a daemon restart, and a restarted daemon picks the same maps up again.
 */
#pragma once

#include "agentgate.h"

/* The identity recorded at connect, owned by the agent's socket (freed with it). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ag_conn_info);
} ag_identity SEC(".maps") __weak;

/*
 * The agent's 4-tuple (agent side) → identity, for the daemon's lookup at accept. Entries are
 * deleted when the socket closes; LRU only guards against a leak if a close is ever missed.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ag_conn_key);
	__type(value, struct ag_conn_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_conns SEC(".maps") __weak;

/* Tagged cgroup ids (value: reserved, 1). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_tagged SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_events SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AG_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_stats SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ag_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_config SEC(".maps") __weak;

/* Both ends of each agent↔gateway leg while the fast path is on. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct ag_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_sockhash SEC(".maps") __weak;

enum { AG_FP_SLOW = 1, AG_FP_FAST = 2 };

/*
 * Per sending socket, whether its first message went through the redirect (FAST) or through the
 * loopback stack (SLOW). A direction never switches path, so bytes can never be reordered between
 * the peer's TCP receive queue and its sk_msg ingress queue.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ag_sock_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_fpstate SEC(".maps") __weak;
