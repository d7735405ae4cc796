/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Layout of agentgate's objects under the bpffs, shared by the daemon (which creates them) and
 * agctl (which shows and removes them, with or without a running daemon):
 *   <root>/<map name>                     every map (ag_conns, ag_tagged, ag_events, ...)
 *   <root>/links/<cgroup id>_<hook>        one bpf_link per tagged cgroup and hook
 *                                          (no dots: bpffs reserves them)
 *                                          (hook: connect4, connect6, sockops)
 *   <root>/progs/sk_msg                    the sk_msg program attached to ag_sockhash
 *   <root>/global/<hook>                   host-wide links, not tied to a cgroup (and so never
 *                                          pruned with the cgroup links): the BPF LSM guard
 *                                          against sockets made outside tagged cgroups
 *                                          (hook: lsm_connect, lsm_sendmsg); absent when the
 *                                          kernel has no BPF LSM, or before the first tag
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define AG_DEFAULT_PIN_ROOT "/sys/fs/bpf/agentgate"

struct ag_pinned_link {
	char pin[256];
	char hook[16];
	uint64_t cgroup_id; /* 0 for a global link */
	uint32_t link_id;
	uint32_t prog_id;
	uint32_t attach_type;
};

/*
 * Pinned per-cgroup links under root/links (malloc'ed array in *out). 0, or -errno. A missing
 * root is 0 links.
 */
int ag_pins_links(const char *root, struct ag_pinned_link **out, size_t *n);
/* The same for the host-wide links under root/global (cgroup_id 0). */
int ag_pins_global_links(const char *root, struct ag_pinned_link **out, size_t *n);
/* Sums the per-CPU ag_stats counters (AG_STAT_MAX of them) from the pinned map. */
int ag_pins_stats(const char *root, uint64_t *stats, size_t nstats);
/*
 * Removes enforcement: detaches every pinned link (per-cgroup and global), detaches the sk_msg
 * program, removes every pin and the folder. Reports progress and problems through err (last
 * problem). 0 or -errno.
 */
int ag_pins_detach_all(const char *root, char *err, size_t errlen);
/*
 * Makes sure a bpffs is mounted at /sys/fs/bpf (mounting one if missing) and root exists, with
 * its links, progs and global folders.
 */
int ag_pins_prepare(const char *root, char *err, size_t errlen);
