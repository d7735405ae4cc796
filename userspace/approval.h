/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Human approval on the data path: a daemon-wide table of approval requests and of the grants
 * decisions leave behind. A protocol handler that meets a `then: approve` rule asks
 * ag_approval_request() and holds the statement (or HTTP request); the decision — an approver
 * through agctl, or the policy's timeout — comes back on the session's worker thread through
 * ag_loop_call(). Expiry runs on a timer thread of this module and approvals.notify commands on
 * a notifier thread: nothing here blocks an event loop. Thread safe.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct ag_session;
struct ag_policy;
struct ag_approval;
struct jsonw;

#define AG_APPROVAL_ID_MAX 16
#define AG_APPROVAL_TEXT_MAX 1024
/* approvals.timeout when the policy has none. */
#define AG_APPROVAL_TIMEOUT_DEFAULT_MS (5 * 60 * 1000ULL)
/* A fingerprint grant without a ttl lasts this long. */
#define AG_APPROVAL_TTL_DEFAULT_MS (60 * 60 * 1000ULL)
/* The longest a fingerprint grant may last: a standing approval is a policy change. */
#define AG_APPROVAL_TTL_MAX_MS (7 * 24 * 60 * 60 * 1000ULL)

enum ag_approval_state {
	AG_APPROVAL_PENDING = 0,
	AG_APPROVAL_APPROVED,
	AG_APPROVAL_DENIED,
	AG_APPROVAL_EXPIRED,   /* nobody decided before the timeout */
	AG_APPROVAL_CANCELLED, /* the session ended (killed, the agent left) while it waited */
};

enum ag_approval_scope {
	AG_APPROVAL_ONCE = 0,	 /* this statement only */
	AG_APPROVAL_SESSION,	 /* the rule, for the rest of the session */
	AG_APPROVAL_FINGERPRINT, /* agent + target + statement fingerprint, for a ttl */
};

/* One approval as agctl and the hooks see it: a copy, taken under the table's lock. */
struct ag_approval_info {
	char id[AG_APPROVAL_ID_MAX];
	uint64_t session;
	uint32_t agent_uid; /* the kernel's uid of the agent process: it may never approve */
	char agent[128];
	char target[128];
	char protocol[16];
	char statement[AG_APPROVAL_TEXT_MAX]; /* the excerpt the agent sent (printable, bounded) */
	char rule[64];
	uint64_t fingerprint; /* libpg_query fingerprint (0: none) */
	int64_t requested_ns; /* unix time */
	int64_t expires_ns;
	int64_t decided_ns;
	uint64_t timeout_ms;
	enum ag_approval_state state;
	char decided_by[64]; /* user name of the approver ("timeout", "cancelled" otherwise) */
	uint32_t decided_uid;
	char reason[256];
	enum ag_approval_scope scope;
	uint64_t ttl_ms; /* of a fingerprint grant */
};

/*
 * Called on the session's worker thread with the decision (approved, denied, expired, or
 * cancelled by ag_approval_withdraw()) of a request, at most once; never after
 * ag_approval_cancel(). The handle is gone when it returns.
 */
typedef void (*ag_approval_fn)(struct ag_session *s, void *arg, const struct ag_approval_info *a);

/*
 * Opens an approval for session s (on its worker thread): protocol and the text the agent sent
 * (len bytes, kept as a bounded excerpt), the rule that asked for it and the statement's
 * fingerprint. Its timeout is the policy's approvals.timeout (s->pol) or the default; the
 * approvals.notify command, if any, is run with it. s->pending_approvals counts it until it is
 * decided or cancelled. The handle, or NULL with errno set. id (may be NULL) gets its id.
 */
struct ag_approval *ag_approval_request(struct ag_session *s, const char *protocol,
					const char *text, size_t len, const char *rule,
					uint64_t fingerprint, ag_approval_fn fn, void *arg,
					char id[AG_APPROVAL_ID_MAX]);
/* The session no longer waits (it ends): state cancelled if undecided; fn will not be called. */
void ag_approval_cancel(struct ag_approval *a);
/*
 * The agent itself gave up waiting (a PostgreSQL CancelRequest), from any thread: the pending
 * approvals of session are cancelled and their handlers told (state cancelled, decided_by
 * "agent", reason why). How many there were.
 */
int ag_approval_withdraw(uint64_t session, const char *why);
/* The session ended: its session-scope grants go. */
void ag_approval_session_end(uint64_t session);
/*
 * Does an earlier decision let this statement pass without asking again? A session grant of
 * the rule, or an unexpired fingerprint grant for the session's agent and target. The grant's
 * approval id into id (may be NULL).
 */
bool ag_approval_granted(const struct ag_session *s, const char *rule, uint64_t fingerprint,
			 char id[AG_APPROVAL_ID_MAX]);

/*
 * Is uid listed in approvals.approvers of p (a user name, "group:NAME" or "uid:N"; root when
 * the policy names none)? Its user name (or "uid:N") into who either way.
 */
bool ag_approval_is_approver(const struct ag_policy *p, uid_t uid, char *who, size_t wholen);
/*
 * A policy reload leaves pending requests as they were asked: one whose rule no longer says
 * approve still waits for its decision or its timeout (the agent was told it waits; a reload
 * neither runs nor refuses its statement behind a human's back). Who may decide is always
 * judged by the policy in force when the decision comes: callers pass the current one here.
 *
 * May the peer uid decide approval id under policy p? It must be listed in approvals.approvers
 * (a user name, "group:NAME" or "uid:N"; root when the policy names none) and must not be the
 * uid the agent runs as. 0 and the approver's name in who, or -EPERM/-ENOENT and why in err.
 */
int ag_approval_authorize(const struct ag_policy *p, uid_t uid, const char *id, char *who,
			  size_t wholen, char *err, size_t errlen);
/*
 * Decides a pending approval (any thread): approve with a scope (ttl_ms for fingerprint; 0: the
 * default), or deny with a reason (may be NULL). who/uid name the approver, already authorized.
 * 0, or -ENOENT (no such approval), -EALREADY (decided), -EINVAL with a message in err.
 */
int ag_approval_decide(const char *id, bool approve, enum ag_approval_scope scope, uint64_t ttl_ms,
		       const char *who, uid_t uid, const char *reason, char *err, size_t errlen);

/* Every approval kept (pending first, then the latest decided), malloc'ed; count in n. */
struct ag_approval_info *ag_approval_list(size_t *n);
/* One approval by id: 0, or -ENOENT. */
int ag_approval_get(const char *id, struct ag_approval_info *out);

/*
 * Observers of every change (requested, approved, denied, expired, cancelled), called from the
 * thread that made it with the table's lock dropped; they must not block. The audit log sets
 * ag_approval_event_hook; the control socket's watchers use ag_approval_watch_hook.
 */
extern void (*ag_approval_event_hook)(const struct ag_approval_info *a);
extern void (*ag_approval_watch_hook)(const struct ag_approval_info *a);

const char *ag_approval_state_name(enum ag_approval_state s);
const char *ag_approval_scope_name(enum ag_approval_scope s);
/* "once", "session", "fingerprint" (prefixes too) → scope; -EINVAL otherwise. */
int ag_approval_scope_parse(const char *s, enum ag_approval_scope *out);
/* "5m", "2s", "1h30m", "500ms": a duration for messages. */
char *ag_approval_fmt_duration(uint64_t ms, char *buf, size_t len);
/* "pending", ... → state; -EINVAL otherwise. */
int ag_approval_state_parse(const char *s, enum ag_approval_state *out);
/*
 * The approval as JSON: the SPEC.md fields (id, session, agent, target, protocol, statement,
 * rule, requested_at, expires_at, state), then decided_by, decided_at, reason, scope (null
 * while pending), ttl_ms (fingerprint scope), agent_uid, timeout_ms, fingerprint (hex).
 * agctl's -j output and the approvals.notify input.
 */
void ag_approval_to_json(const struct ag_approval_info *a, struct jsonw *w);
