/* SPDX-License-Identifier: GPL-2.0 */
/*
 * cgroup v2 helpers: find the cgroup2 mount (never assumed), map paths to ids and back, create
 * and remove cgroups, move processes. Paths given to and returned by these helpers are relative
 * to the cgroup2 mount and start with "/" ("/" itself is the root).
 */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* The cgroup2 mount point from /proc/mounts into buf. 0, or -ENOENT when there is none. */
int ag_cgroup2_root(char *buf, size_t len);
/* Normalizes a user-given path ("agents.slice/x/", "/a//b") into "/a/b"; -EINVAL on "..". */
int ag_cgroup_normalize(const char *in, char *out, size_t len);
/* Absolute filesystem path of a cgroup. */
int ag_cgroup_abs(const char *root, const char *rel, char *out, size_t len);
/* cgroup id (kernfs node id, as bpf_get_current_cgroup_id() reports it) of a cgroup path. */
int ag_cgroup_id(const char *root, const char *rel, uint64_t *id);
/* Path of a cgroup id (via open_by_handle_at); -ENOENT if it is gone. */
int ag_cgroup_path_of_id(const char *root, uint64_t id, char *out, size_t len);
/* mkdir -p below the root; 0 if it already exists. */
int ag_cgroup_create(const char *root, const char *rel);
/* rmdir, after moving any process left in it to its parent; children removed first. */
int ag_cgroup_destroy(const char *root, const char *rel);
/* Moves pid (0: the caller) into the cgroup. */
int ag_cgroup_move(const char *root, const char *rel, pid_t pid);
/* The cgroup v2 path of a process (from /proc/PID/cgroup, the "0::" line). */
int ag_cgroup_of_pid(pid_t pid, char *out, size_t len);
/* Is `rel` equal to or below `ancestor`? */
int ag_cgroup_is_within(const char *rel, const char *ancestor);
