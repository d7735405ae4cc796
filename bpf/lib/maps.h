/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Every map of agentgate, defined once. Each <hook>.bpf.c includes this header; the objects are
 * linked into one (bpftool gen object), where the __weak definitions collapse into one map each.
 * Maps are pinned by name under the daemon's bpffs folder so that enforcement and the identity
 * records outlive a daemon restart, and a restarted daemon picks the same maps up again.
 */
#pragma once

#include "agentgate.h"

enum ag_fp_state {
	AG_FP_NEW = 0,	 /* nothing decided yet: behaves as SLOW whose TCP bytes are all read */
	AG_FP_SLOW = 1,	 /* sends go through loopback TCP for now */
	AG_FP_FAST = 2,	 /* sends go straight into the peer's ingress queue */
	AG_FP_OFF = 3,	 /* loopback TCP for good */
	AG_FP_LEAVE = 4, /* the agent's socket: TCP for good, and out of the sockhash (sockops) */
};

struct ag_fp_entry {
	__u64 state;	 /* enum ag_fp_state; moved with cmpxchg where both ends may race */
	__u64 sk;	 /* this socket's struct sock, for the peer's checks (read-only casts) */
	__u64 peer;	 /* the peer's struct sock, learnt at the first redirect */
	__u64 slow_mark; /* the socket's bytes_sent when it last took TCP */
};

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

/* Both ends of each agent↔gateway leg while the fast path is on (see lib/fastpath.h). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct ag_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_sockhash SEC(".maps") __weak;

/*
 * Per sending socket of the sockhash: how its sends travel (enum ag_fp_state) and where the two
 * sockets live, for the checks of lib/fastpath.h. Twice the sockhash's size, so that the LRU
 * never evicts the entry of a live socket; entries go when the agent's socket closes.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ag_sock_key);
	__type(value, struct ag_fp_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ag_fastpath SEC(".maps") __weak;

/*
 * The kernel relay of raw sessions (sk_skb.bpf.c): the daemon's two sockets of a session, keyed
 * by slot (struct ag_relay_dir); their socket cookies → slot; per slot, the direction's state.
 * Not pinned: they belong to one daemon, and its sockets leave the sockhash as they close.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2 * AG_RELAY_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} ag_relay_socks SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * AG_RELAY_SLOTS);
	__type(key, __u64);
	__type(value, __u32);
} ag_relay_idx SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2 * AG_RELAY_SLOTS);
	__type(key, __u32);
	__type(value, struct ag_relay_dir);
} ag_relay_dirs SEC(".maps") __weak;
