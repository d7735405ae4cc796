/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The daemon's top-level context. It owns the BPF side, the main loop (signals, control socket,
 * events), the workers (one epoll loop and one pair of listeners each), the active policy, the
 * cgroup tags and the table of live sessions, and tears them down once, in reverse order.
 */
#pragma once

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "loop.h"
#include "policy.h"

struct ag_bpf;
struct ag_session;
struct ag_worker;

#define AG_DEFAULT_CONFIG "/etc/agentgate/policy.yaml"
#define AG_DEFAULT_STATE_DIR "/var/lib/agentgate"
#define AG_DEFAULT_PORT 7830

/* A policy shared by the sessions started under it; freed with its last reference. */
struct ag_policy_ref {
	struct ag_policy *p;
	int refs;
};

struct ag_tag {
	char path[PATH_MAX]; /* relative to the cgroup2 mount */
	char agent[128];
	uint64_t cgid;
	bool from_policy;
	bool attached;
};

struct ag_daemon_opts {
	const char *config;
	const char *state_dir;
	const char *socket;
	const char *pin_root;
	const char *ca_cert; /* with ca_key: the CA to use instead of STATE/ca/ */
	const char *ca_key;
	uint16_t port;
	uint32_t mark;
	int fastpath; /* -1: policy decides (default off), 0 off, 1 on */
	int kernel_relay; /* raw sessions relayed in the kernel (krelay.c): 0 off, 1 on */
	int workers;
	bool foreground;
};

struct ag_daemon {
	struct ag_daemon_opts opts;
	char cg_root[PATH_MAX];
	char self_cgroup[PATH_MAX];
	struct ag_bpf *bpf;
	struct ag_loop *loop;
	struct ag_io sig_io, ctl_io, ev_io;
	int64_t started_ns;
	uint64_t netns_cookie;
	bool fastpath;
	bool kernel_relay;
	bool draining;

	pthread_mutex_t pol_lock;
	struct ag_policy_ref *pol;
	uint64_t policy_gen; /* bumped on every swap: live sessions compare it to pick reloads up */

	pthread_rwlock_t tag_lock;
	struct ag_tag *tags;
	size_t ntags;

	struct ag_worker **workers;
	int nworkers;

	pthread_mutex_t sess_lock;
	struct ag_session *sessions; /* live, linked through s->next/s->prev */
	uint64_t next_session_id;
	uint64_t seq_reserved;
	uint64_t sessions_total;
	uint64_t sessions_denied;
	uint64_t events_received;
	size_t nsessions;

	int slog_fd; /* sessions.log */
};

extern struct ag_daemon *ag_d;

struct ag_policy_ref *ag_policy_get(struct ag_daemon *d);
void ag_policy_put(struct ag_policy_ref *r);
/* Applies a newly loaded policy (tags, fastpath); the old one stays referenced by its sessions. */
int ag_daemon_set_policy(struct ag_daemon *d, struct ag_policy *p, char *err, size_t errlen);
int ag_daemon_reload(struct ag_daemon *d, char *err, size_t errlen);
/* Runtime tags (agctl cgroup tag/untag), persisted under the state dir. */
int ag_daemon_tag(struct ag_daemon *d, const char *path, const char *agent, char *err, size_t errlen);
int ag_daemon_untag(struct ag_daemon *d, const char *path, char *err, size_t errlen);
int ag_daemon_detach_all(struct ag_daemon *d, char *err, size_t errlen);
/* Agent name for a tagged cgroup id (copied into out); false when unknown. */
bool ag_daemon_agent_of(struct ag_daemon *d, uint64_t tag_cgid, const char *cgroup_path, char *out,
			size_t len);

/* Session ids, unique across restarts (reserved in blocks under the state dir). */
int ag_daemon_seq_init(struct ag_daemon *d);
void ag_daemon_seq_tick(struct ag_daemon *d);
void ag_daemon_seq_fini(struct ag_daemon *d);

/* Workers (session.c). */
int ag_workers_start(struct ag_daemon *d, char *err, size_t errlen);
void ag_workers_stop(struct ag_daemon *d);
void ag_workers_close_listeners(struct ag_daemon *d);
int ag_session_kill_by_id(struct ag_daemon *d, uint64_t id);

/* Control socket (ctl_server.c). */
int ag_ctl_server_start(struct ag_daemon *d, char *err, size_t errlen);
void ag_ctl_server_stop(struct ag_daemon *d);
/* A reloaded policy: control clients whose rights came from the old one are judged again. */
void ag_ctl_policy_changed(struct ag_daemon *d);

/* sessions.log (sessionlog.c). */
int ag_slog_open(struct ag_daemon *d, char *err, size_t errlen);
void ag_slog_close(struct ag_daemon *d);
void ag_slog_session(struct ag_daemon *d, const char *event, const struct ag_session *s);
/* A noteworthy event inside a session (event "note", what, detail); never a secret. */
void ag_slog_note(struct ag_daemon *d, const struct ag_session *s, const char *what,
		  const char *detail);
struct ag_event;
void ag_slog_kernel_deny(struct ag_daemon *d, const struct ag_event *ev, const char *reason,
			 int64_t when_ns, const char *orig_dst);
