// SPDX-License-Identifier: GPL-2.0
/*
 * agctl approval: statements (and requests) that a `then: approve` rule holds until a human
 * decides. `list` and `show` read the daemon's table; `approve` and `deny` decide, as the user
 * agctl runs as (the daemon authorizes by the socket's peer credentials: an approver of the
 * policy, never the uid of the agent itself); `watch` follows every change as it happens. These
 * are the only commands a non-root user may run against agentgated.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "approval.h"
#include "main.h"
#include "policy.h"

static const char *or_null(const char *s)
{
	return s && *s ? s : NULL;
}

/* The daemon's answer as the library's approval, for its one JSON writer. */
static void approval_json(struct jsonw *w, const Agentgate__Ctl__Approval *m)
{
	struct ag_approval_info a = { 0 };

	snprintf(a.id, sizeof(a.id), "%s", m->id);
	a.session = m->session;
	a.agent_uid = m->agent_uid;
	snprintf(a.agent, sizeof(a.agent), "%s", m->agent);
	snprintf(a.target, sizeof(a.target), "%s", m->target);
	snprintf(a.protocol, sizeof(a.protocol), "%s", m->protocol);
	snprintf(a.statement, sizeof(a.statement), "%s", m->statement);
	snprintf(a.rule, sizeof(a.rule), "%s", m->rule);
	a.fingerprint = m->fingerprint;
	a.requested_ns = m->requested_at_ns;
	a.expires_ns = m->expires_at_ns;
	a.decided_ns = m->decided_at_ns;
	a.timeout_ms = m->timeout_ms;
	if (ag_approval_state_parse(m->state, &a.state))
		a.state = AG_APPROVAL_PENDING;
	snprintf(a.decided_by, sizeof(a.decided_by), "%s", m->decided_by);
	snprintf(a.reason, sizeof(a.reason), "%s", m->reason);
	ag_approval_scope_parse(m->scope, &a.scope);
	a.ttl_ms = m->ttl_ms;
	ag_approval_to_json(&a, w);
}

static void approvals_plain(Agentgate__Ctl__Approval **as, size_t n)
{
	static const char *const hdr[] = { "ID",    "SESSION",	 "AGENT",   "TARGET",	"RULE",
					   "STATE", "REQUESTED", "EXPIRES", "STATEMENT" };
	struct table *t = table_new(hdr, ARRAY_SIZE(hdr));

	for (size_t i = 0; i < n; i++) {
		const Agentgate__Ctl__Approval *a = as[i];
		char sess[24], req[32], exp[32], stmt[64];

		snprintf(sess, sizeof(sess), "%" PRIu64, a->session);
		snprintf(stmt, sizeof(stmt), "%.60s%s", a->statement,
			 strlen(a->statement) > 60 ? "..." : "");
		table_add(t, a->id, sess, a->agent, a->target, a->rule, a->state,
			  fmt_start(a->requested_at_ns, req, sizeof(req)),
			  !strcmp(a->state, "pending")
				  ? fmt_start(a->expires_at_ns, exp, sizeof(exp))
				  : NULL,
			  stmt);
	}
	table_print(t, stdout);
	table_free(t);
}

static void approval_plain(const Agentgate__Ctl__Approval *a)
{
	char when[64];

	printf("id: %s\n", a->id);
	printf("state: %s\n", a->state);
	printf("session: %" PRIu64 "\n", a->session);
	printf("agent: %s (uid %u)\n", a->agent, a->agent_uid);
	printf("target: %s\n", a->target);
	printf("protocol: %s\n", a->protocol);
	printf("rule: %s\n", a->rule);
	printf("statement: %s\n", a->statement);
	if (a->fingerprint)
		printf("fingerprint: %016" PRIx64 "\n", a->fingerprint);
	printf("requested_at: %s\n", ag_format_time(a->requested_at_ns, when, sizeof(when)));
	printf("expires_at: %s\n", ag_format_time(a->expires_at_ns, when, sizeof(when)));
	if (or_null(a->decided_by)) {
		printf("decided_by: %s\n", a->decided_by);
		printf("decided_at: %s\n", ag_format_time(a->decided_at_ns, when, sizeof(when)));
	}
	if (or_null(a->reason))
		printf("reason: %s\n", a->reason);
	if (or_null(a->scope)) {
		printf("scope: %s", a->scope);
		if (!strcmp(a->scope, "fingerprint"))
			printf(" (ttl %" PRIu64 " s)", a->ttl_ms / 1000);
		printf("\n");
	}
}

static int do_show(int argc, char **argv)
{
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	Agentgate__Ctl__Empty empty = AGENTGATE__CTL__EMPTY__INIT;
	ag_ctl_response *resp;
	const char *id = NULL;

	if (argc) {
		id = GET_ARG();
		if (!NO_MORE_ARGS())
			return -1;
		req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_APPROVAL_SHOW;
		req.approval_show = (char *)id;
	} else {
		req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_APPROVAL_LIST;
		req.approval_list = &empty;
	}
	resp = ctl_request(&req);
	if (!resp)
		return -1;
	if (id && !resp->n_approvals) {
		p_err("no approval %s", id);
		ag_ctl_response_free(resp);
		return -1;
	}
	if (id) {
		if (json_output)
			approval_json(json_wtr, resp->approvals[0]);
		else
			approval_plain(resp->approvals[0]);
	} else if (json_output) {
		jsonw_start_array(json_wtr);
		for (size_t i = 0; i < resp->n_approvals; i++)
			approval_json(json_wtr, resp->approvals[i]);
		jsonw_end_array(json_wtr);
	} else {
		approvals_plain(resp->approvals, resp->n_approvals);
	}
	ag_ctl_response_free(resp);
	return 0;
}

struct decided {
	const char *id;
	const char *state;
	const char *scope;
};

static void decided_fields(const ag_ctl_response *resp, const void *arg)
{
	const struct decided *d = arg;

	jsonw_string_field(json_wtr, "id", d->id);
	jsonw_string_field(json_wtr, "state", d->state);
	if (d->scope)
		jsonw_string_field(json_wtr, "scope", d->scope);
	else
		jsonw_null_field(json_wtr, "scope");
}

static int decide(Agentgate__Ctl__ApprovalDecision *dec)
{
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	struct decided d = { .id = dec->id,
			     .state = dec->approve ? "approved" : "denied",
			     .scope = dec->approve ? dec->scope : NULL };
	ag_ctl_response *resp;

	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_APPROVAL_DECIDE;
	req.approval_decide = dec;
	resp = ctl_request(&req);
	if (!resp)
		return -1;
	print_change(resp, dec->approve ? "approved" : "denied", decided_fields, &d);
	ag_ctl_response_free(resp);
	return 0;
}

/* approve ID [scope { once | session | fingerprint [ttl DURATION] }] */
static int do_approve(int argc, char **argv)
{
	Agentgate__Ctl__ApprovalDecision dec = AGENTGATE__CTL__APPROVAL_DECISION__INIT;
	enum { S_ONCE, S_SESSION, S_FP } scope = S_ONCE;
	static const char *const names[] = { "once", "session", "fingerprint" };

	if (!REQ_ARGS(1))
		return -1;
	dec.id = GET_ARG();
	dec.approve = true;
	while (argc) {
		if (is_prefix(*argv, "scope")) {
			NEXT_ARG();
			if (!REQ_ARGS(1))
				return -1;
			if (is_prefix(*argv, "once"))
				scope = S_ONCE;
			else if (is_prefix(*argv, "session"))
				scope = S_SESSION;
			else if (is_prefix(*argv, "fingerprint"))
				scope = S_FP;
			else
				return BAD_ARG();
			NEXT_ARG();
		} else if (is_prefix(*argv, "ttl")) {
			uint64_t ms;

			NEXT_ARG();
			if (!REQ_ARGS(1))
				return -1;
			if (scope != S_FP) {
				p_err("ttl goes with scope fingerprint");
				return -1;
			}
			if (ag_parse_duration(*argv, &ms)) {
				p_err("invalid duration '%s' (30s, 10m, 1h, 1h30m)", *argv);
				return -1;
			}
			dec.ttl_ms = ms;
			NEXT_ARG();
		} else {
			return BAD_ARG();
		}
	}
	dec.scope = (char *)names[scope];
	return decide(&dec);
}

/* deny ID [reason TEXT] — the words after reason make the text. */
static int do_deny(int argc, char **argv)
{
	Agentgate__Ctl__ApprovalDecision dec = AGENTGATE__CTL__APPROVAL_DECISION__INIT;
	char reason[256] = "";
	size_t off = 0;

	if (!REQ_ARGS(1))
		return -1;
	dec.id = GET_ARG();
	if (argc) {
		if (!is_prefix(*argv, "reason"))
			return BAD_ARG();
		NEXT_ARG();
		if (!REQ_ARGS(1))
			return -1;
		while (argc && off < sizeof(reason) - 1) {
			off += snprintf(reason + off, sizeof(reason) - off, "%s%s", off ? " " : "",
					*argv);
			NEXT_ARG();
		}
		dec.reason = reason;
	}
	return decide(&dec);
}

static void watch_print(const Agentgate__Ctl__Approval *a)
{
	char when[64];

	if (json_output) {
		struct jsonw *w = jsonw_new(stdout, pretty_output);

		if (!w)
			return;
		approval_json(w, a);
		jsonw_destroy(&w);
	} else {
		int64_t t = a->decided_at_ns && strcmp(a->state, "pending") ? a->decided_at_ns
									    : a->requested_at_ns;

		printf("%s %s %s session %" PRIu64 " agent %s target %s rule %s",
		       ag_format_time(t, when, sizeof(when)), a->id, a->state, a->session, a->agent,
		       a->target, a->rule);
		if (or_null(a->decided_by) && strcmp(a->state, "pending"))
			printf(" by %s", a->decided_by);
		if (or_null(a->scope))
			printf(" scope %s", a->scope);
		if (or_null(a->reason))
			printf(" reason \"%s\"", a->reason);
		printf(": %s\n", a->statement);
	}
	fflush(stdout);
}

/* The pending approvals, then every change, until interrupted or the daemon goes away. */
static int do_watch(int argc, char **argv)
{
	Agentgate__Ctl__Empty empty = AGENTGATE__CTL__EMPTY__INIT;
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	uint8_t *buf = NULL;
	size_t len;
	bool first = true;
	int fd, rc;

	if (!NO_MORE_ARGS())
		return -1;
	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_APPROVAL_WATCH;
	req.approval_watch = &empty;
	fd = ag_ctl_connect(ctl_socket);
	if (fd < 0) {
		p_err("agentgated is not running (no daemon on %s): %s", ctl_socket, strerror(-fd));
		return -1;
	}
	len = agentgate__ctl__request__get_packed_size(&req);
	buf = malloc(len ? len : 1);
	if (!buf) {
		close(fd);
		p_err("out of memory");
		return -1;
	}
	agentgate__ctl__request__pack(&req, buf);
	rc = ag_ctl_write_frame(fd, buf, len, 10000);
	free(buf);
	/* With -j every event is one JSON object on its own line: the shared writer is not used. */
	jsonw_destroy(&json_wtr);
	while (!rc) {
		ag_ctl_response *resp;

		buf = NULL;
		rc = ag_ctl_read_frame(fd, &buf, &len, -1);
		if (rc)
			break;
		resp = agentgate__ctl__response__unpack(NULL, len, buf);
		free(buf);
		if (!resp) {
			rc = -EPROTO;
			break;
		}
		if (resp->error && resp->error[0]) {
			p_err("%s", resp->error);
			ag_ctl_response_free(resp);
			close(fd);
			return -1;
		}
		for (size_t i = 0; i < resp->n_approvals; i++)
			if (!first || !strcmp(resp->approvals[i]->state, "pending"))
				watch_print(resp->approvals[i]);
		first = false;
		ag_ctl_response_free(resp);
	}
	close(fd);
	p_err("watching approvals: %s",
	      rc == -ECONNRESET ? "agentgated closed the connection" : strerror(-rc));
	return -1;
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %1$s %2$s { list | show } [ID]\n"
		"       %1$s %2$s approve ID [scope SCOPE]\n"
		"       %1$s %2$s deny ID [reason TEXT]\n"
		"       %1$s %2$s watch\n"
		"       %1$s %2$s help\n"
		"\n"
		"       SCOPE := { once | session | fingerprint [ttl DURATION] }\n"
		"       " HELP_SPEC_OPTIONS " }\n"
		"\n"
		"Approvers: approvals.approvers of the policy (NAME, group:NAME, uid:N);\n"
		"the uid an agent runs as never decides its own requests.\n",
		bin_name, "approval");
	return 0;
}

static const struct cmd cmds[] = {
	{ "list", do_show },
	{ "show", do_show },
	{ "approve", do_approve },
	{ "deny", do_deny },
	{ "watch", do_watch },
	{ "help", do_help },
	{ 0 }
};

int do_approval(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
