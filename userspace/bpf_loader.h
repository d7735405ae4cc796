/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel side from the daemon's seat: opens the skeleton with its maps pinned (reusing the
 * pins of a previous daemon), loads it, attaches the hooks to tagged cgroups as pinned links
 * (replacing the programs of existing links in place, so a restart never duplicates them) and
 * reads connection identities and events.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agentgate.h"

struct ag_bpf;

struct ag_bpf_opts {
	const char *pin_root;
	uint16_t port;	/* the gateway's listener */
	uint32_t mark;	/* SO_MARK of the daemon's listeners and upstream sockets */
	bool fastpath;
};

typedef int (*ag_bpf_event_fn)(void *ctx, const struct ag_event *ev);

struct ag_bpf *ag_bpf_load(const struct ag_bpf_opts *opts, ag_bpf_event_fn fn, void *ctx,
			   char *err, size_t errlen);
/* Frees userspace state only: pinned links and maps stay, so enforcement outlives the daemon. */
void ag_bpf_free(struct ag_bpf *b);

/*
 * Attaches (or re-points) connect4, connect6 and sockops on the cgroup; marks it tagged. The
 * host-wide BPF LSM guard (sockets made outside tagged cgroups) comes with the first tag, if
 * the kernel runs BPF LSM programs; a daemon finding a previous one's re-points it at load.
 */
int ag_bpf_tag(struct ag_bpf *b, const char *cg_root, const char *rel, uint64_t *cgid, char *err,
	       size_t errlen);
/* Detaches and unpins the cgroup's links; untags it. */
int ag_bpf_untag(struct ag_bpf *b, uint64_t cgid);
/* Detaches every pinned link whose cgroup id is not in keep[] (stale from an older policy). */
int ag_bpf_prune(struct ag_bpf *b, const uint64_t *keep, size_t nkeep);
/* Are the three hooks attached to cgid? */
bool ag_bpf_is_attached(struct ag_bpf *b, uint64_t cgid);

int ag_bpf_lookup_conn(struct ag_bpf *b, const struct ag_conn_key *key, struct ag_conn_info *info);
int ag_bpf_set_fastpath(struct ag_bpf *b, bool on);
/*
 * Adds the daemon's end of an agent↔gateway leg to the sockhash (fast path); -ENOENT when the
 * agent's end is not there (a blocking agent keeps plain TCP).
 */
int ag_bpf_sockhash_add(struct ag_bpf *b, int fd, const struct ag_sock_key *key);

/*
 * The kernel relay (userspace/krelay.c): the shared per-direction state (NULL if it could not be
 * mapped), adding the daemon's socket fd (cookie: its SO_COOKIE) under key, removing it.
 */
struct ag_relay_dir *ag_bpf_relay_dirs(struct ag_bpf *b);
int ag_bpf_relay_add(struct ag_bpf *b, uint32_t key, int fd, uint64_t cookie);
void ag_bpf_relay_del(struct ag_bpf *b, uint32_t key, uint64_t cookie);

int ag_bpf_events_fd(struct ag_bpf *b);
/* Consumes pending events (calls fn for each); returns the count or -errno. */
int ag_bpf_events_consume(struct ag_bpf *b);
const char *ag_bpf_pin_root(struct ag_bpf *b);
/* Boot-time ns (bpf_ktime_get_boot_ns) → unix ns. */
int64_t ag_boot_to_unix_ns(uint64_t boot_ns);
