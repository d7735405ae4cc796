/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The standard fixture of the data-path tests: a tagged cgroup (agent "t") and an untagged
 * sibling, echo servers on 127.0.0.2 (target "echo") and ::1 (target "echo6"), any further tcp
 * targets a test names, and an agentgated enforcing that policy. Plus the small steps every
 * data-path test repeats: run a client job in a cgroup, find its session in the log.
 */
#pragma once

#include "helpers.h"

struct th_gate {
	struct th_daemon d;
	char tagged[256];
	char untagged[256];
	struct th_server *echo4;
	struct th_server *echo6;
	char policy[8192];
};

/*
 * Creates the cgroups and servers, writes the policy (echo, echo6, then the name/address pairs
 * of extra_targets, NULL-terminated; may be NULL) and starts the daemon with daemon_args.
 * 0 or -errno; th_gate_cleanup() in every case.
 */
int th_gate_start(struct th_gate *g, const char *daemon_args, const char *const *extra_targets);
/*
 * Stops and cleans up the daemon, stops the servers. Idempotent. A gate shared by subtests is
 * cleaned up after test__end_subtest(), so that its log shows when any of them failed.
 */
void th_gate_cleanup(struct th_gate *g);
/* Builds the gate's policy text again with other extra targets (for reload tests). */
int th_gate_policy(struct th_gate *g, char *buf, size_t len, const char *const *extra_targets);

/* A zeroed job in shared memory: family/addr/port set, echo checked, 30 s timeout. */
struct th_job *th_job_new(int family, const char *addr, int port);
void th_job_free(struct th_job *j);
/* Runs the job in cgroup rel and waits for it: its exit code (0: all went well) or -errno. */
int th_job_in(const char *rel, struct th_job *j, int timeout_ms);

/*
 * Looks for a session start in the log for pid and checks it names agent "t", the target, the
 * orig_dst (one of up to two accepted spellings), the cgroup path and the uid/comm given.
 * Returns true when everything matched (failures are reported as test failures).
 */
bool th_check_session_start(const struct th_gate *g, int pid, const char *target,
			    const char *orig_dst, const char *orig_dst_alt, const char *cgroup,
			    const char *comm, long long uid);

/* ---- the daemon's key files ---- */

/*
 * Key file key (one the stopped daemon d made; what names it in errors, "CA key") made 0644,
 * then a symbolic link to a copy of itself: each stops the next start with "<what> <key>: ..."
 * in the log (the rule and the mode; that it is a link). Then it is put back, 0600 and a plain
 * file, and d starts again. true when every step held (failures are test failures).
 */
bool th_key_file_refusals(struct th_daemon *d, const char *key, const char *what);
