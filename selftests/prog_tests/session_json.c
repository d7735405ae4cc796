// SPDX-License-Identifier: GPL-2.0
/*
 * What agctl prints about live sessions of the data path, as a script reads it: with -j (and
 * -p) stdout is one JSON document and nothing else, the session carries every SPEC field with
 * the values the kernel saw, prefixes work, and errors are {"error": ...} with exit 1. And
 * `agctl session kill ID` on a live PostgreSQL session: psql and a raw client see their
 * connection end, the server's backend goes, sessions.log records it closed with the reason.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../gate.h"
#include "../pg.h"
#include "../test_progs.h"

/* SPEC.md, "JSON field names": session. */
static const char *const session_fields[] = {
	"id",
	"agent",
	"cgroup",
	"pid",
	"comm",
	"uid",
	"target",
	"protocol",
	"orig_dst",
	"state",
	"started_at",
	"bytes_up",
	"bytes_down",
	"statements",
	"blocked",
	"masked_values",
	"pending_approvals",
};

/* RFC 3339 UTC: 2026-01-02T03:04:05[.fff]Z */
static bool rfc3339_utc(const char *s)
{
	static const char shape[] = "dddd-dd-ddTdd:dd:dd";
	size_t n;

	if (!s)
		return false;
	for (n = 0; shape[n]; n++) {
		if (!s[n])
			return false;
		if (shape[n] == 'd' ? !isdigit((unsigned char)s[n]) : s[n] != shape[n])
			return false;
	}
	return s[strlen(s) - 1] == 'Z';
}

static yajl_val find_session(yajl_val list, long long pid)
{
	if (!list || !YAJL_IS_ARRAY(list))
		return NULL;
	for (size_t i = 0; i < list->u.array.len; i++) {
		long long p;

		if (th_json_int(list->u.array.values[i], "pid", &p) && p == pid)
			return list->u.array.values[i];
	}
	return NULL;
}

static void check_session(struct th_gate *g, yajl_val s, const struct th_job *j)
{
	char dst[64];
	long long v;

	for (size_t i = 0; i < sizeof(session_fields) / sizeof(session_fields[0]); i++)
		if (!ASSERT_OK_PTR(th_json_get(s, session_fields[i]), "SPEC field present"))
			printf("missing field: %s\n", session_fields[i]);
	snprintf(dst, sizeof(dst), "127.0.0.2:%d", th_server_port(g->echo4));
	ASSERT_STREQ(th_json_str(s, "agent"), "t", "agent");
	ASSERT_STREQ(th_json_str(s, "cgroup"), g->tagged, "cgroup");
	ASSERT_STREQ(th_json_str(s, "comm"), "ag-json", "comm");
	ASSERT_TRUE(th_json_int(s, "uid", &v) && v == 2001, "uid");
	ASSERT_STREQ(th_json_str(s, "target"), "echo", "target");
	ASSERT_STREQ(th_json_str(s, "protocol"), "tcp", "protocol");
	ASSERT_STREQ(th_json_str(s, "orig_dst"), dst, "orig_dst");
	ASSERT_STREQ(th_json_str(s, "state"), "active", "state");
	ASSERT_TRUE(rfc3339_utc(th_json_str(s, "started_at")), "started_at is RFC 3339 UTC");
	ASSERT_TRUE(th_json_int(s, "id", &v) && v > 0, "id");
	ASSERT_TRUE(th_json_int(s, "bytes_up", &v) && v == (long long)j->x.bytes_out, "bytes_up");
	ASSERT_TRUE(th_json_int(s, "bytes_down", &v) && v == (long long)j->x.bytes_in,
		    "bytes_down");
	ASSERT_TRUE(th_json_int(s, "statements", &v), "statements is an integer");
	ASSERT_TRUE(th_json_int(s, "blocked", &v), "blocked is an integer");
	ASSERT_TRUE(th_json_int(s, "masked_values", &v), "masked_values is an integer");
	ASSERT_TRUE(th_json_int(s, "pending_approvals", &v), "pending_approvals is an integer");
}

void test_datapath_session_json(void)
{
	static char out[256 * 1024];
	struct th_job *j = NULL;
	yajl_val list = NULL, one = NULL;
	long long id = 0;
	struct th_gate g;
	pid_t pid = -1;
	int rc;

	if (!ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;
	j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g.echo4));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	snprintf(j->comm, sizeof(j->comm), "ag-json");
	j->uid = 2001;
	j->gid = 2001;
	j->hold_ms = 60000;
	pid = th_spawn_in_cgroup(g.tagged, th_job_run, j);
	if (!ASSERT_GT(pid, 0, "spawn"))
		goto out;
	for (int t = 0; t < 1000 && !j->ready; t++)
		usleep(10 * 1000);
	if (!ASSERT_TRUE(j->ready, "a live session"))
		goto out;

	if (test__start_subtest("session_list")) {
		rc = th_agctl(&g.d, out, sizeof(out), "-j session list");
		ASSERT_EQ(rc, 0, "exit 0");
		list = th_json_parse(out);
		if (ASSERT_OK_PTR(list, "stdout is one JSON document") &&
		    ASSERT_TRUE(YAJL_IS_ARRAY(list), "a list is an array")) {
			yajl_val s = find_session(list, pid);

			if (ASSERT_OK_PTR(s, "the live session is listed")) {
				check_session(&g, s, j);
				th_json_int(s, "id", &id);
			}
		}
		yajl_tree_free(list);
		list = NULL;
	}
	if (test__start_subtest("pretty_and_prefixes")) {
		rc = th_agctl(&g.d, out, sizeof(out), "-p s l");
		ASSERT_EQ(rc, 0, "exit 0");
		list = th_json_parse(out);
		ASSERT_OK_PTR(find_session(list, pid), "agctl -p s l lists it");
		yajl_tree_free(list);
		list = NULL;
		rc = th_agctl(&g.d, out, sizeof(out), "--json session");
		ASSERT_EQ(rc, 0, "list is the default command");
		list = th_json_parse(out);
		ASSERT_OK_PTR(find_session(list, pid), "agctl --json session lists it");
		yajl_tree_free(list);
		list = NULL;
	}
	if (test__start_subtest("session_show") && ASSERT_GT(id, 0, "an id from the list")) {
		long long v = 0;

		rc = th_agctl(&g.d, out, sizeof(out), "-j session show %lld", id);
		ASSERT_EQ(rc, 0, "exit 0");
		one = th_json_parse(out);
		if (ASSERT_OK_PTR(one, "stdout is one JSON document")) {
			/* bpftool prints one object for show ID; accept a one-element array. */
			yajl_val s = YAJL_IS_ARRAY(one) && one->u.array.len == 1
					     ? one->u.array.values[0]
					     : one;

			ASSERT_TRUE(YAJL_IS_OBJECT(s), "an object");
			ASSERT_TRUE(th_json_int(s, "id", &v) && v == id, "the session asked for");
			check_session(&g, s, j);
		}
		yajl_tree_free(one);
		one = NULL;
	}
	if (test__start_subtest("error_json")) {
		rc = th_agctl(&g.d, out, sizeof(out), "-j session show 999999999");
		ASSERT_EQ(rc, 1, "exit 1 for an unknown session");
		one = th_json_parse(out);
		if (ASSERT_OK_PTR(one, "the error is JSON"))
			ASSERT_OK_PTR(th_json_str(one, "error"), "{\"error\": ...}");
		yajl_tree_free(one);
		one = NULL;
	}
	if (test__start_subtest("prog_show")) {
		rc = th_agctl(&g.d, out, sizeof(out), "-j prog show");
		ASSERT_EQ(rc, 0, "exit 0");
		one = th_json_parse(out);
		ASSERT_OK_PTR(one, "prog show is JSON");
		yajl_tree_free(one);
		one = NULL;
	}
	if (test__start_subtest("conns_entry_while_live"))
		ASSERT_GE(th_pinned_map_entries(g.d.pin_root, "ag_conns"), 1,
			  "the live connection's identity is in ag_conns");
	if (test__start_subtest("ended_session_gone")) {
		yajl_val s = NULL;

		j->release = 1;
		ASSERT_EQ(th_wait(pid, 10000), 0, "job done");
		pid = -1;
		for (int t = 0; t < 50; t++) {
			rc = th_agctl(&g.d, out, sizeof(out), "-j session list");
			list = th_json_parse(out);
			s = find_session(list, j->pid);
			yajl_tree_free(list);
			list = NULL;
			if (!s)
				break;
			usleep(100 * 1000);
		}
		ASSERT_FALSE(s, "a closed session leaves the list");
	}
out:
	test__end_subtest();
	if (pid > 0) {
		j->release = 1;
		th_wait(pid, 10000);
	}
	th_job_free(j);
	th_gate_cleanup(&g);
}

/* --- agctl session kill ------------------------------------------------------------------------ */

#define KILL_RULES "    sql:\n      - { name: reads, when: { command: [select] }, then: allow }\n"

/* The id of the one live session of the gate (polled: it may be connecting still), or -1. */
static long long only_session(struct th_pg_gate *g, char *out, size_t len)
{
	long long id = -1;

	for (int t = 0; t < 300 && id < 0; t++) {
		yajl_val list;

		if (!th_agctl(&g->d, out, len, "-j session list") && (list = th_json_parse(out))) {
			if (YAJL_IS_ARRAY(list) && list->u.array.len == 1)
				th_json_int(list->u.array.values[0], "id", &id);
			yajl_tree_free(list);
		}
		if (id < 0)
			usleep(100 * 1000);
	}
	return id;
}

/* The server's backends of the agent role running pg_sleep (the gateway's upstream leg). */
static int sleepers(struct th_pg_gate *g)
{
	char o[32] = "";

	if (th_pg_admin(&g->pg,
			"SELECT count(*) FROM pg_stat_activity WHERE usename = '" TH_PG_USER
			"' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid();",
			o, sizeof(o)))
		return -1;
	return atoi(o);
}

/* sessions.log has the end of session id, closed, with reason. */
static bool slog_has_end(struct th_pg_gate *g, long long id, const char *reason)
{
	static char buf[256 * 1024];
	char path[300], idf[40];

	snprintf(path, sizeof(path), "%s/sessions.log", g->d.state_dir);
	snprintf(idf, sizeof(idf), "\"id\":%lld,", id);
	for (int t = 0; t < 100; t++) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;

		if (fd >= 0)
			close(fd);
		buf[n > 0 ? n : 0] = '\0';
		for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
			if (strstr(line, "\"event\":\"end\"") && strstr(line, idf) &&
			    strstr(line, "\"state\":\"closed\"") && strstr(line, reason))
				return true;
		usleep(100 * 1000);
	}
	return false;
}

/* psql blocked in pg_sleep(120) is killed from the CLI: it exits at once, not after 120 s. */
static void subtest_kill_psql(struct th_pg_gate *g)
{
	static char out[65536];
	char errpath[] = "/tmp/agentgate-kill-XXXXXX", perr[4096] = "";
	int efd = mkstemp(errpath), st = -1, t, rc;
	long long id;
	yajl_val one;
	pid_t pid;

	if (!ASSERT_GE(efd, 0, "mkstemp"))
		return;
	fflush(NULL);
	pid = fork();
	if (pid == 0) {
		static char o[4096], e[4096];

		rc = th_pg_psql(&g->pg, g->tagged, "SELECT pg_sleep(120);", o, sizeof(o), e,
				sizeof(e));
		if (write(efd, e, strlen(e)) < 0)
			rc = 99;
		_exit(rc < 0 || rc > 255 ? 98 : rc);
	}
	if (!ASSERT_GT(pid, 0, "fork"))
		goto out;
	id = only_session(g, out, sizeof(out));
	if (!ASSERT_GT(id, 0, "psql's live session"))
		goto out;
	for (t = 0; t < 300 && sleepers(g) < 1; t++)
		usleep(100 * 1000);
	ASSERT_EQ(sleepers(g), 1, "its query runs on the server");

	rc = th_agctl(&g->d, out, sizeof(out), "-j session kill %lld", id);
	ASSERT_EQ(rc, 0, "agctl -j session kill exits 0");
	one = th_json_parse(out);
	if (ASSERT_OK_PTR(one, "one JSON document")) {
		long long v = -1;
		yajl_val k = th_json_get(one, "killed");

		ASSERT_TRUE(th_json_int(one, "id", &v) && v == id, "\"id\": the session");
		ASSERT_TRUE(k && YAJL_IS_TRUE(k), "\"killed\": true");
		ASSERT_HAS_SUBSTR(th_json_str(one, "message") ?: "", "killed", "message");
	}
	yajl_tree_free(one);

	/* psql sees its connection end now (a deadline far below its 120 s sleep). */
	for (t = 0; t < 300; t++) {
		if (waitpid(pid, &st, WNOHANG) == pid)
			break;
		usleep(100 * 1000);
	}
	if (ASSERT_LT(t, 300, "psql ended well before its sleep")) {
		pid = -1;
		ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0, "psql failed");
		if (pread(efd, perr, sizeof(perr) - 1, 0) < 0)
			perr[0] = '\0';
		if (!ASSERT_TRUE(strstr(perr, "closed the connection") ||
					 strstr(perr, "connection to server was lost") ||
					 strstr(perr, "terminat"),
				 "psql says its connection ended"))
			printf("psql stderr: %s\n", perr);
	}
	/* The gateway closed its upstream leg too: the server's backend sees it and ends. */
	for (t = 0; t < 300 && sleepers(g) != 0; t++)
		usleep(100 * 1000);
	ASSERT_EQ(sleepers(g), 0, "the server's backend ended");
	ASSERT_TRUE(slog_has_end(g, id, "\"reason\":\"killed by agctl\""),
		    "sessions.log: closed, killed by agctl");
	/* Gone from the live list; a second kill is the daemon's error. */
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "-j session show %lld", id), 1,
		  "no longer shown as live");
	rc = th_agctl(&g->d, out, sizeof(out), "-j session kill %lld", id);
	ASSERT_EQ(rc, 1, "killing it again: exit 1");
	one = th_json_parse(out);
	if (ASSERT_OK_PTR(one, "the error is JSON"))
		ASSERT_HAS_SUBSTR(th_json_str(one, "error") ?: "", "no live session", "error");
	yajl_tree_free(one);
out:
	if (pid > 0) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
	}
	close(efd);
	unlink(errpath);
}

/* A raw client mid-session: after the kill its next read is the end of the stream. */
static void subtest_kill_raw(struct th_pg_gate *g)
{
	static char out[65536];
	struct th_pg_msg m;
	long long id;
	int fd = th_pg_raw_connect(g), rc;

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	id = only_session(g, out, sizeof(out));
	if (!ASSERT_GT(id, 0, "its session"))
		goto out;
	rc = th_agctl(&g->d, out, sizeof(out), "session kill %lld", id);
	ASSERT_EQ(rc, 0, "agctl session kill exits 0");
	{
		char want[64];

		snprintf(want, sizeof(want), "session %lld killed\n", id);
		ASSERT_STREQ(out, want, "plain output");
	}
	/* Whatever the gateway says last (at most an error), then EOF or a reset. */
	for (int i = 0; i < 10; i++) {
		rc = th_pg_read_msg(fd, &m, 20000);
		if (rc)
			break;
		th_pg_msg_free(&m);
	}
	ASSERT_TRUE(rc == -EPIPE || rc == -ECONNRESET, "the connection ended");
	ASSERT_TRUE(slog_has_end(g, id, "killed by agctl"), "sessions.log says why");
out:
	close(fd);
}

static void subtest_kill_bad_args(struct th_pg_gate *g)
{
	static char out[4096];
	yajl_val one;

	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "-j session kill"), 1, "no ID: exit 1");
	one = th_json_parse(out);
	ASSERT_TRUE(one && th_json_str(one, "error"), "{\"error\": ...}");
	yajl_tree_free(one);
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "-j session kill x1"), 1, "a bad ID");
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "-j session kill 999999999"), 1,
		  "an unknown ID");
	one = th_json_parse(out);
	ASSERT_HAS_SUBSTR(one ? th_json_str(one, "error") ?: "" : "", "no live session 999999999",
			  "the daemon's error");
	yajl_tree_free(one);
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
}

void test_agctl_session_kill(void)
{
	static struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.24", "trust", "enforce", KILL_RULES),
		       "gate"))
		goto out;
	/* A backend in pg_sleep notices its client's socket closed only when it looks. */
	if (!ASSERT_OK(th_pg_admin(&g.pg,
				   "ALTER SYSTEM SET client_connection_check_interval = '200ms';",
				   NULL, 0),
		       "client_connection_check_interval") ||
	    !ASSERT_OK(th_pg_reload(&g.pg), "reload"))
		goto out;
	if (test__start_subtest("psql_connection_ends"))
		subtest_kill_psql(&g);
	if (test__start_subtest("raw_client_sees_eof"))
		subtest_kill_raw(&g);
	if (test__start_subtest("bad_or_unknown_id"))
		subtest_kill_bad_args(&g);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}
