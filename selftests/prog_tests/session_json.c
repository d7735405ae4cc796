// SPDX-License-Identifier: GPL-2.0
/*
 * What agctl prints about live sessions of the data path, as a script reads it: with -j (and
 * -p) stdout is one JSON document and nothing else, the session carries every SPEC field with
 * the values the kernel saw, prefixes work, and errors are {"error": ...} with exit 1.
 */
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../gate.h"
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
