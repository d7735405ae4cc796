// SPDX-License-Identifier: GPL-2.0
/*
 * agctl session: the daemon's intercepted connections. `list` is a table (or a JSON array of
 * session objects with the SPEC.md field names), `show ID` one session as key: value lines (or
 * one JSON object), `kill ID` ends a live session (the agent's connection closes, the session
 * stays listed as closed, reason "killed by agctl"). Everything comes from agentgated; nothing
 * is read locally.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "main.h"

static void str_or_null(struct jsonw *w, const char *name, const char *v)
{
	if (v && v[0])
		jsonw_string_field(w, name, v);
	else
		jsonw_null_field(w, name);
}

static void session_json(const Agentgate__Ctl__Session *s)
{
	jsonw_start_object(json_wtr);
	/* The contract fields (SPEC.md), in its order. */
	jsonw_uint_field(json_wtr, "id", s->id);
	jsonw_string_field(json_wtr, "agent", s->agent);
	jsonw_string_field(json_wtr, "cgroup", s->cgroup);
	jsonw_uint_field(json_wtr, "pid", s->pid);
	jsonw_string_field(json_wtr, "comm", s->comm);
	jsonw_uint_field(json_wtr, "uid", s->uid);
	jsonw_string_field(json_wtr, "target", s->target);
	jsonw_string_field(json_wtr, "protocol", s->protocol);
	jsonw_string_field(json_wtr, "orig_dst", s->orig_dst);
	jsonw_string_field(json_wtr, "state", s->state);
	jsonw_time_field(json_wtr, "started_at", s->started_at_ns);
	jsonw_uint_field(json_wtr, "bytes_up", s->bytes_up);
	jsonw_uint_field(json_wtr, "bytes_down", s->bytes_down);
	jsonw_uint_field(json_wtr, "statements", s->statements);
	jsonw_uint_field(json_wtr, "blocked", s->blocked);
	jsonw_uint_field(json_wtr, "masked_values", s->masked_values);
	jsonw_uint_field(json_wtr, "pending_approvals", s->pending_approvals);
	/* Extras. */
	jsonw_uint_field(json_wtr, "gid", s->gid);
	jsonw_uint_field(json_wtr, "tid", s->tid);
	jsonw_uint_field(json_wtr, "cgroup_id", s->cgroup_id);
	if (s->upstream && s->upstream[0])
		jsonw_string_field(json_wtr, "upstream", s->upstream);
	else
		jsonw_null_field(json_wtr, "upstream");
	jsonw_bool_field(json_wtr, "fastpath", s->fastpath);
	if (s->reason && s->reason[0])
		jsonw_string_field(json_wtr, "reason", s->reason);
	else
		jsonw_null_field(json_wtr, "reason");
	/* postgres: what the agent asked for; the credential injected upstream (its provider). */
	str_or_null(json_wtr, "db_user", s->db_user);
	str_or_null(json_wtr, "database", s->database);
	str_or_null(json_wtr, "credential", s->credential);
	jsonw_end_object(json_wtr);
}

static void sessions_plain(Agentgate__Ctl__Session **ss, size_t n)
{
	static const char *const hdr[] = { "ID",    "AGENT",	"PID",	 "COMM",    "UID", "TARGET",
					   "PROTO", "ORIG_DST", "STATE", "STARTED", "UP",  "DOWN" };
	struct table *t = table_new(hdr, ARRAY_SIZE(hdr));
	size_t i;

	for (i = 0; i < n; i++) {
		const Agentgate__Ctl__Session *s = ss[i];
		char id[24], pid[16], uid[16], start[32], up[16], down[16];

		snprintf(id, sizeof(id), "%" PRIu64, s->id);
		snprintf(pid, sizeof(pid), "%u", s->pid);
		snprintf(uid, sizeof(uid), "%u", s->uid);
		table_add(t, id, s->agent, pid, s->comm, uid, s->target, s->protocol, s->orig_dst,
			  s->state, fmt_start(s->started_at_ns, start, sizeof(start)),
			  fmt_bytes(s->bytes_up, up, sizeof(up)),
			  fmt_bytes(s->bytes_down, down, sizeof(down)));
	}
	table_print(t, stdout);
	table_free(t);
}

static const char *or_dash(const char *s)
{
	return s && *s ? s : "-";
}

static void session_plain(const Agentgate__Ctl__Session *s)
{
	char when[64];

	printf("id: %" PRIu64 "\n", s->id);
	printf("agent: %s\n", or_dash(s->agent));
	printf("state: %s\n", or_dash(s->state));
	if (s->reason && s->reason[0])
		printf("reason: %s\n", s->reason);
	printf("target: %s\n", or_dash(s->target));
	printf("protocol: %s\n", or_dash(s->protocol));
	printf("orig_dst: %s\n", or_dash(s->orig_dst));
	printf("upstream: %s\n", or_dash(s->upstream));
	printf("pid: %u (tid %u)\n", s->pid, s->tid);
	printf("comm: %s\n", or_dash(s->comm));
	printf("uid: %u\n", s->uid);
	printf("gid: %u\n", s->gid);
	printf("cgroup: %s (id %" PRIu64 ")\n", or_dash(s->cgroup), s->cgroup_id);
	printf("started_at: %s\n",
	       s->started_at_ns ? ag_format_time(s->started_at_ns, when, sizeof(when)) : "-");
	printf("bytes_up: %" PRIu64 "\n", s->bytes_up);
	printf("bytes_down: %" PRIu64 "\n", s->bytes_down);
	printf("statements: %" PRIu64 "\n", s->statements);
	printf("blocked: %" PRIu64 "\n", s->blocked);
	printf("masked_values: %" PRIu64 "\n", s->masked_values);
	printf("pending_approvals: %u\n", s->pending_approvals);
	printf("fastpath: %s\n", s->fastpath ? "yes" : "no");
	if (s->db_user && s->db_user[0])
		printf("db_user: %s\n", s->db_user);
	if (s->database && s->database[0])
		printf("database: %s\n", s->database);
	printf("credential: %s\n", or_dash(s->credential));
}

static int list_all(void)
{
	ag_ctl_response *resp;
	size_t i;

	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_SESSION_LIST);
	if (!resp)
		return -1;
	if (json_output) {
		jsonw_start_array(json_wtr);
		for (i = 0; i < resp->n_sessions; i++)
			session_json(resp->sessions[i]);
		jsonw_end_array(json_wtr);
	} else {
		sessions_plain(resp->sessions, resp->n_sessions);
	}
	ag_ctl_response_free(resp);
	return 0;
}

static int parse_id(const char *s, uint64_t *id)
{
	char *end;

	errno = 0;
	*id = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-') {
		p_err("invalid session id '%s'", s);
		return -1;
	}
	return 0;
}

/* `list` and `show` are one command, as in bpftool: with an ID, one session; without, all. */
static int do_show(int argc, char **argv)
{
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	ag_ctl_response *resp;
	uint64_t id;

	if (!argc)
		return list_all();
	if (parse_id(*argv, &id))
		return -1;
	NEXT_ARG();
	if (!NO_MORE_ARGS())
		return -1;
	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_SESSION_SHOW;
	req.session_show = id;
	resp = ctl_request(&req);
	if (!resp)
		return -1;
	if (!resp->n_sessions) {
		p_err("no session %" PRIu64, id);
		ag_ctl_response_free(resp);
		return -1;
	}
	if (json_output)
		session_json(resp->sessions[0]);
	else
		session_plain(resp->sessions[0]);
	ag_ctl_response_free(resp);
	return 0;
}

/* replay ID [--dir DIR]: the session from the audit log, in order. */
static int do_replay(int argc, char **argv)
{
	const char *dir = NULL;
	uint64_t id;

	if (!REQ_ARGS(1) || parse_id(*argv, &id))
		return -1;
	NEXT_ARG();
	if (argc >= 2 && (!strcmp(*argv, "--dir") || !strcmp(*argv, "dir"))) {
		NEXT_ARG();
		dir = GET_ARG();
	}
	if (!NO_MORE_ARGS())
		return -1;
	return audit_replay(id, dir);
}

/* watch [ID]: live sessions' events as the audit log writes them, until interrupted. */
static int do_watch(int argc, char **argv)
{
	uint64_t id = 0;

	if (argc) {
		if (parse_id(*argv, &id))
			return -1;
		NEXT_ARG();
	}
	if (!NO_MORE_ARGS())
		return -1;
	return audit_watch(id);
}

static void kill_fields(const ag_ctl_response *resp, const void *arg)
{
	jsonw_uint_field(json_wtr, "id", *(const uint64_t *)arg);
	jsonw_bool_field(json_wtr, "killed", true);
}

static int do_kill(int argc, char **argv)
{
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	ag_ctl_response *resp;
	char msg[64];
	uint64_t id;

	if (!REQ_ARGS(1))
		return -1;
	if (parse_id(*argv, &id))
		return -1;
	NEXT_ARG();
	if (!NO_MORE_ARGS())
		return -1;
	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_SESSION_KILL;
	req.session_kill = id;
	resp = ctl_request(&req);
	if (!resp)
		return -1;
	snprintf(msg, sizeof(msg), "session %" PRIu64 " killed", id);
	print_change(resp, msg, kill_fields, &id);
	ag_ctl_response_free(resp);
	return 0;
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %1$s %2$s { list | show } [ID]\n"
		"       %1$s %2$s replay ID [--dir DIR]\n"
		"       %1$s %2$s watch [ID]\n"
		"       %1$s %2$s kill ID\n"
		"       %1$s %2$s help\n"
		"\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "session");
	return 0;
}

static const struct cmd cmds[] = {
	{ "list", do_show },
	{ "show", do_show },
	{ "replay", do_replay },
	{ "watch", do_watch },
	{ "kill", do_kill },
	{ "help", do_help },
	{ 0 }
};

int do_session(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
