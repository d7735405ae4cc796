/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A session: one agent connection, its upstream, the protocol handler between them, and what
 * the kernel told us about the caller. Owned by one worker thread; the daemon's table links it so
 * agctl can list it (fields read from other threads are written once or are counters).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "agentgate.h"
#include "buf.h"
#include "loop.h"
#include "proto.h"

struct ag_worker;
struct ag_policy_ref;
struct ag_audit_sess;

enum ag_session_state {
	AG_SESS_CONNECTING = 0,
	AG_SESS_ACTIVE,
	AG_SESS_CLOSING,
	AG_SESS_CLOSED,
	AG_SESS_DENIED,
};

struct ag_side_conn {
	struct ag_io io;
	struct ag_buf in;  /* received, not yet consumed by the handler */
	struct ag_buf out; /* to be written to this side */
	bool rd_eof;	   /* this side sent FIN */
	bool shut_pending; /* shut our write half once out drains */
	bool wr_shut;
	bool paused;	   /* reading stopped: the other side's out is over the watermark */
	size_t hold;	   /* set by the handler: it waits for a message this long; keep reading */
	int pipe[2];	   /* raw relays: bytes spliced from the other side, on their way here */
	size_t piped;	   /* bytes in that pipe */
};

struct ag_session {
	uint64_t id;
	struct ag_worker *w;
	struct ag_session *next, *prev; /* the daemon's table */
	struct ag_side_conn side[2];
	const struct ag_proto_ops *proto;
	void *proto_state;
	struct ag_policy_ref *pol;
	const struct ag_policy_target *target; /* in pol; NULL for passthrough */

	struct ag_conn_info info;
	char agent[128];
	char cgroup[256];
	char target_name[128];
	char protocol[16];
	char orig_dst[64];
	char upstream[64];
	char reason[192];
	bool observe;
	bool fastpath;
	bool in_table;
	int64_t started_ns;
	int64_t ended_ns;
	uint64_t connect_deadline_ms;
	volatile int state;

	uint64_t bytes_up, bytes_down;
	uint64_t statements, blocked, masked_values;
	uint32_t pending_approvals;
	struct ag_audit_sess *audit; /* audit.c: the current statement's result so far */
};

/* Queues bytes to be written to `to` (writing at once when nothing is queued). 0 or -errno. */
int ag_session_send(struct ag_session *s, enum ag_side to, const void *data, size_t len);
/* After everything queued for `to` is written, shut its write half (pass a FIN on). */
void ag_session_shutdown(struct ag_session *s, enum ag_side to);
/* Ends the session now; `reset` sends RSTs instead of FINs. reason is recorded. */
void ag_session_fail(struct ag_session *s, bool reset, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
const char *ag_session_state_name(int state);
