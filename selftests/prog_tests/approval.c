// SPDX-License-Identifier: GPL-2.0
/*
 * Human approval on the PostgreSQL data path. A `then: approve` rule holds a DDL statement: the
 * agent (running as nobody) is told with a NoticeResponse naming the approval, nothing of the
 * statement reaches the server, and `agctl approval approve` (root) lets it run — or `deny`
 * refuses it with 42501 naming the approver and the reason, or the policy's timeout does. The
 * agent's own uid cannot approve even when listed, a user who is not listed cannot either, and
 * non-root users get nothing but the approval commands. Fingerprint and session scopes let later
 * statements pass; other sessions run while one waits; a held Parse in a pipeline; the notify
 * hook gets the request as JSON (in a clean environment, with no fd of the daemon's), and a
 * failing or hanging hook holds nothing up; after a policy reload only the approvers it lists
 * decide (a held request stays pending, a dropped approver's watch ends); killing a held
 * session, the agent's CancelRequest (57014) or the agent leaving cancels its approval. Also:
 * psql shows the notice then the result, `approval watch` streams changes to a non-root user,
 * and a 4 MiB backlog behind a held statement waits, then runs in order.
 */
#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "buf.h"
#include "ctl.h"
#include "pgwire.h"
#include "../pg.h"
#include "../test_progs.h"

#define NOBODY 65534
#define DAEMON_UID 1 /* a user who is no approver */
#define BIN_UID 2    /* an approver as a member of group:bin */

#define AP_SQL                                                                                     \
	"    sql:\n"                                                                               \
	"      - { name: no-drop, when: { command: [drop] }, then: deny }\n"                       \
	"      - { name: ddl-review, when: { command: [ddl] }, then: approve }\n"                  \
	"      - { name: rw, when: { command: [select, insert, update, delete, begin, commit,"     \
	" rollback, set, show] }, then: allow }\n"

struct ap_ctx {
	struct th_pg_gate g;
	char dir[128]; /* notify scripts and their output */
	char notify_log[256];
};

static int write_script(const char *path, const char *body)
{
	FILE *f = fopen(path, "w");

	if (!f)
		return -errno;
	fprintf(f, "#!/bin/sh\n%s\n", body);
	fclose(f);
	return chmod(path, 0755) ? -errno : 0;
}

/* The rules plus an approvals: line with this timeout and notify script (NULL: none). */
static void rules(struct ap_ctx *c, char *buf, size_t len, const char *timeout, const char *notify)
{
	char n[300] = "";

	if (notify)
		snprintf(n, sizeof(n), ", notify: \"%s/%s\"", c->dir, notify);
	snprintf(buf, len,
		 AP_SQL "approvals: { approvers: [root, nobody, \"group:bin\"], timeout: %s%s }\n",
		 timeout, n);
}

/*
 * build/agctl -S <socket> ARGS (fmt split on spaces) as uid (0: root, else through setpriv),
 * stdout and stderr captured. Its exit code.
 */
static int agctl_as(struct ap_ctx *c, uid_t uid, char *out, size_t outlen, char *err, size_t errlen,
		    const char *fmt, ...)
{
	char args[512], bin[256], ru[32], rg[32], *argv[48], *save = NULL, *tok;
	char o[8192], e[4096];
	int n = 0, rc;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(args, sizeof(args), fmt, ap);
	va_end(ap);
	snprintf(bin, sizeof(bin), "%s/agctl", th_build_dir());
	if (uid) {
		snprintf(ru, sizeof(ru), "--reuid=%u", uid);
		snprintf(rg, sizeof(rg), "--regid=%u", uid == NOBODY ? 65534 : uid);
		argv[n++] = "/usr/bin/setpriv";
		argv[n++] = ru;
		argv[n++] = rg;
		argv[n++] = "--clear-groups";
	}
	argv[n++] = bin;
	argv[n++] = "-S";
	argv[n++] = c->g.d.socket;
	for (tok = strtok_r(args, " ", &save); tok && n < 46; tok = strtok_r(NULL, " ", &save))
		argv[n++] = tok;
	argv[n] = NULL;
	rc = th_pg_exec(NULL, argv, NULL, out ? out : o, out ? outlen : sizeof(o), err ? err : e,
			err ? errlen : sizeof(e), 15000);
	if (test__verbose())
		printf("agctl(uid %u) %s%s -> %d: %s%s", uid, fmt, "", rc, err ? err : e,
		       out ? out : o);
	return rc;
}

/* A raw connection of the tagged agent, made by uid nobody; started up. */
static int connect_nobody(struct ap_ctx *c)
{
	return th_pg_raw_connect_as(&c->g, NOBODY, 65534);
}

static int send_query(int fd, const char *sql)
{
	struct ag_buf b = { 0 };
	int rc;

	pg_put_query(&b, sql);
	rc = th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000);
	ag_buf_free(&b);
	return rc;
}

/* Reads the NoticeResponse of a hold: its approval id into id; true when it was one. */
static bool read_hold(int fd, const char *rule, char *id, size_t idlen)
{
	struct th_pg_msg m;
	const char *msg, *p;
	char want[128];

	if (!ASSERT_OK(th_pg_read_msg(fd, &m, 10000), "a message while held"))
		return false;
	if (!ASSERT_EQ(m.type, 'N', "a NoticeResponse first")) {
		if (m.type == 'E')
			printf("error: %s\n", th_pg_err_field(&m, 'M'));
		th_pg_msg_free(&m);
		return false;
	}
	msg = th_pg_err_field(&m, 'M');
	snprintf(want, sizeof(want), "(rule %s)", rule);
	ASSERT_HAS_SUBSTR(msg, want, "the notice names the rule");
	p = strstr(msg, "agentgate: waiting for approval ap-");
	if (!ASSERT_OK_PTR(p, "agentgate: waiting for approval <id>")) {
		th_pg_msg_free(&m);
		return false;
	}
	p += strlen("agentgate: waiting for approval ");
	snprintf(id, idlen, "%.*s", (int)strcspn(p, " "), p);
	th_pg_msg_free(&m);
	return true;
}

/* Nothing more from the gateway on fd right now (the held statement did not run). */
static bool quiet(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, 0) == 0;
}

static bool table_exists(struct ap_ctx *c, const char *name)
{
	char sql[128], out[64] = "";

	snprintf(sql, sizeof(sql), "SELECT to_regclass('public.%s') IS NOT NULL", name);
	th_pg_admin(&c->g.pg, sql, out, sizeof(out));
	return out[0] == 't';
}

/* agctl -j approval show ID, parsed. */
static yajl_val show(struct ap_ctx *c, const char *id)
{
	char out[8192];

	if (agctl_as(c, 0, out, sizeof(out), NULL, 0, "-j approval show %s", id))
		return NULL;
	return th_json_parse(out);
}

static bool state_is(struct ap_ctx *c, const char *id, const char *state)
{
	yajl_val v = show(c, id);
	const char *s = v ? th_json_str(v, "state") : NULL;
	bool ok = s && !strcmp(s, state);

	if (!ok)
		printf("approval %s: state %s, expected %s\n", id, s ? s : "?", state);
	if (v)
		yajl_tree_free(v);
	return ok;
}

/* Polls approval show until it is in state (the change happens on another thread). */
static bool wait_state(struct ap_ctx *c, const char *id, const char *state)
{
	for (int i = 0; i < 100; i++) {
		yajl_val v = show(c, id);
		const char *s = v ? th_json_str(v, "state") : NULL;
		bool ok = s && !strcmp(s, state);

		if (v)
			yajl_tree_free(v);
		if (ok)
			return true;
		usleep(100000);
	}
	return state_is(c, id, state);
}

static void expect_result(int fd, const char *types, const char *what)
{
	char got[64], st[8], msg[512];

	if (!ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), st, msg, sizeof(msg), 15000),
		       what))
		return;
	if (!ASSERT_STREQ(got, types, what))
		printf("%s: error %s %s\n", what, st, msg);
}

static void expect_error(int fd, const char *substr, const char *what)
{
	char got[64], st[8], msg[512];

	if (!ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), st, msg, sizeof(msg), 20000),
		       what))
		return;
	ASSERT_STREQ(got, "EZ", what);
	ASSERT_STREQ(st, "42501", "SQLSTATE 42501");
	ASSERT_HAS_SUBSTR(msg, substr, what);
}

/* --- subtests ------------------------------------------------------------------------------ */

static void subtest_approved_runs(struct ap_ctx *c)
{
	char id[32], out[16384];
	yajl_val v;
	long long n;
	int fd = connect_nobody(c);

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_approved (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	ASSERT_TRUE(quiet(fd), "nothing but the notice while held");
	ASSERT_FALSE(table_exists(c, "ap_approved"), "the statement did not run while held");

	v = show(c, id);
	if (ASSERT_OK_PTR(v, "approval show -j")) {
		ASSERT_STREQ(th_json_str(v, "id"), id, "id");
		ASSERT_STREQ(th_json_str(v, "state"), "pending", "state pending");
		ASSERT_STREQ(th_json_str(v, "agent"), "t", "agent");
		ASSERT_STREQ(th_json_str(v, "target"), "db", "target");
		ASSERT_STREQ(th_json_str(v, "protocol"), "postgres", "protocol");
		ASSERT_STREQ(th_json_str(v, "rule"), "ddl-review", "rule");
		ASSERT_STREQ(th_json_str(v, "statement"), "CREATE TABLE ap_approved (id int)",
			     "statement");
		ASSERT_TRUE(th_json_int(v, "session", &n) && n > 0, "session id");
		ASSERT_OK_PTR(th_json_str(v, "requested_at"), "requested_at");
		ASSERT_OK_PTR(th_json_str(v, "expires_at"), "expires_at");
		ASSERT_TRUE(th_json_int(v, "agent_uid", &n) && n == NOBODY, "agent uid nobody");
		yajl_tree_free(v);
	}
	/* The session counts it. */
	if (!agctl_as(c, 0, out, sizeof(out), NULL, 0, "-j session list")) {
		ASSERT_HAS_SUBSTR(out, "\"pending_approvals\":1", "pending_approvals 1");
	}
	if (!agctl_as(c, 0, out, sizeof(out), NULL, 0, "approval list"))
		ASSERT_HAS_SUBSTR(out, id, "listed");

	ASSERT_OK(agctl_as(c, 0, out, sizeof(out), NULL, 0, "approval approve %s", id),
		  "root approves");
	ASSERT_HAS_SUBSTR(out, "approved by root", "agctl says who approved");
	expect_result(fd, "CZ", "the held statement runs once approved");
	ASSERT_TRUE(table_exists(c, "ap_approved"), "the table exists");
	v = show(c, id);
	if (ASSERT_OK_PTR(v, "show after")) {
		ASSERT_STREQ(th_json_str(v, "state"), "approved", "state approved");
		ASSERT_STREQ(th_json_str(v, "decided_by"), "root", "decided_by root");
		ASSERT_STREQ(th_json_str(v, "scope"), "once", "scope once");
		yajl_tree_free(v);
	}
	/* Scope once: the next DDL is held again. */
	if (ASSERT_OK(send_query(fd, "CREATE TABLE ap_approved2 (id int)"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s", id);
		expect_error(fd, "agentgate: denied by root", "denied without a reason");
	}
	/* Deciding twice is refused. */
	ASSERT_EQ(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), 1,
		  "a decided approval cannot be decided again");
out:
	close(fd);
}

static void subtest_denied(struct ap_ctx *c)
{
	char id[32], out[4096];
	int fd = connect_nobody(c);

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_denied (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	ASSERT_OK(
		agctl_as(c, 0, out, sizeof(out), NULL, 0, "approval deny %s reason not today", id),
		"root denies");
	expect_error(fd, "agentgate: denied by root: not today", "the agent hears who and why");
	ASSERT_FALSE(table_exists(c, "ap_denied"), "the table does not exist");
	ASSERT_TRUE(state_is(c, id, "denied"), "state denied");
	/* The session goes on. */
	ASSERT_OK(send_query(fd, "SELECT count(*) FROM users"), "send");
	expect_result(fd, "TDCZ", "the session stays usable");
	/* Inside a transaction block: the denial aborts it, as a block does. */
	ASSERT_OK(send_query(fd, "BEGIN"), "begin");
	expect_result(fd, "CZ", "begin");
	ASSERT_OK(send_query(fd, "CREATE TABLE ap_denied_txn (id int)"), "send");
	if (read_hold(fd, "ddl-review", id, sizeof(id))) {
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s", id);
		expect_error(fd, "denied by root", "denied in a transaction");
		ASSERT_OK(send_query(fd, "SELECT 1"), "send");
		{
			char got[64], st[8], msg[256];

			th_pg_raw_collect(fd, 1, got, sizeof(got), st, msg, sizeof(msg), 10000);
			ASSERT_STREQ(st, "25P02", "the transaction is aborted");
		}
		ASSERT_OK(send_query(fd, "ROLLBACK"), "rollback");
		expect_result(fd, "CZ", "rollback");
	}
out:
	close(fd);
}

/*
 * Appends what an agctl watch writes on fd to buf (len so far) for up to tries × 100 ms, until
 * it holds want1 and want2 (NULL: no such condition) or the watch closes its end.
 */
static void read_watch(int fd, char *buf, size_t cap, size_t *len, const char *want1,
		       const char *want2, int tries)
{
	for (int i = 0; i < tries; i++) {
		struct pollfd pf = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&pf, 1, 100) == 1) {
			n = read(fd, buf + *len, cap - 1 - *len);
			if (n <= 0)
				break;
			*len += n;
			buf[*len] = '\0';
		}
		if ((want1 || want2) && (!want1 || strstr(buf, want1)) &&
		    (!want2 || strstr(buf, want2)))
			break;
	}
}

/* The fixture's policy again (notify.sh, timeout 5m) after a subtest changed it. */
static void policy_back(struct ap_ctx *c)
{
	char r[2048];

	rules(c, r, sizeof(r), "5m", "notify.sh");
	ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", r), "policy back");
}

static void subtest_timeout(struct ap_ctx *c)
{
	char r[2048], id[32], want[128];
	int fd;

	rules(c, r, sizeof(r), "2s", NULL);
	if (!ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", r), "policy with timeout 2s"))
		return;
	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		goto restore;
	if (ASSERT_OK(send_query(fd, "CREATE TABLE ap_late (id int)"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		snprintf(want, sizeof(want), "agentgate: approval %s timed out after 2s", id);
		expect_error(fd, want, "timed out");
		ASSERT_FALSE(table_exists(c, "ap_late"), "the table does not exist");
		ASSERT_TRUE(state_is(c, id, "expired"), "state expired");
		ASSERT_EQ(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), 1,
			  "too late to approve");
		ASSERT_OK(send_query(fd, "SELECT 1"), "send");
		expect_result(fd, "TDCZ", "the session stays usable");
	}
	close(fd);
restore:
	policy_back(c);
}

static void subtest_own_uid(struct ap_ctx *c)
{
	char id[32], err[4096];
	int fd = connect_nobody(c), rc;

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_self (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	/* nobody is an approver, and nobody runs the agent. */
	rc = agctl_as(c, NOBODY, NULL, 0, err, sizeof(err), "approval approve %s", id);
	ASSERT_EQ(rc, 1, "the agent's own uid cannot approve");
	ASSERT_HAS_SUBSTR(err, "separation of duties", "and is told why");
	rc = agctl_as(c, NOBODY, NULL, 0, err, sizeof(err), "approval deny %s", id);
	ASSERT_EQ(rc, 1, "nor deny");
	/* But may look. */
	ASSERT_OK(agctl_as(c, NOBODY, NULL, 0, NULL, 0, "approval show %s", id),
		  "the agent's uid may list");
	ASSERT_TRUE(state_is(c, id, "pending"), "still pending");
	ASSERT_TRUE(quiet(fd), "and still held");
	ASSERT_FALSE(table_exists(c, "ap_self"), "not run");
	agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s reason cleanup", id);
	expect_error(fd, "denied by root: cleanup", "root denies");
out:
	close(fd);
}

static void subtest_non_approver(struct ap_ctx *c)
{
	char id[32], err[4096], out[4096];
	int fd = connect_nobody(c), rc;

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_other (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	rc = agctl_as(c, DAEMON_UID, NULL, 0, err, sizeof(err), "approval approve %s", id);
	ASSERT_EQ(rc, 1, "a user who is no approver cannot approve");
	ASSERT_HAS_SUBSTR(err, "is not an approver", "and is told why");
	/* Nor read them: statements are for approvers' eyes. */
	rc = agctl_as(c, DAEMON_UID, out, sizeof(out), err, sizeof(err), "approval list");
	ASSERT_EQ(rc, 1, "a user who is no approver cannot list approvals");
	ASSERT_HAS_SUBSTR(err, "is not an approver", "list refused");
	ASSERT_FALSE(strstr(out, id), "and sees nothing");
	/* An approver who is not root gets the approval commands only. */
	ASSERT_OK(agctl_as(c, NOBODY, out, sizeof(out), NULL, 0, "approval list"),
		  "a non-root approver may list approvals");
	ASSERT_HAS_SUBSTR(out, id, "and sees the pending one");
	rc = agctl_as(c, NOBODY, NULL, 0, err, sizeof(err), "session list");
	ASSERT_EQ(rc, 1, "but not the sessions");
	ASSERT_HAS_SUBSTR(err, "permission denied", "permission denied");
	rc = agctl_as(c, NOBODY, NULL, 0, err, sizeof(err), "policy reload");
	ASSERT_EQ(rc, 1, "nor reload the policy");
	/* A session watch streams statements and rows from the audit log: root only. */
	rc = agctl_as(c, NOBODY, NULL, 0, err, sizeof(err), "session watch");
	ASSERT_EQ(rc, 1, "an approver may not watch sessions");
	ASSERT_HAS_SUBSTR(err, "permission denied", "session watch refused");
	rc = agctl_as(c, DAEMON_UID, NULL, 0, err, sizeof(err), "session watch");
	ASSERT_EQ(rc, 1, "nor may any other user");
	ASSERT_HAS_SUBSTR(err, "permission denied", "session watch refused to a non-approver");
	ASSERT_TRUE(state_is(c, id, "pending"), "still pending");
	ASSERT_OK(agctl_as(c, BIN_UID, out, sizeof(out), NULL, 0, "approval approve %s", id),
		  "a member of an approver group approves");
	ASSERT_HAS_SUBSTR(out, "approved by bin", "as bin");
	expect_result(fd, "CZ", "runs");
out:
	close(fd);
}

/*
 * The control socket is open to local users, but one uid gets at most 8 connections at once:
 * idle connections of one user cannot take every slot from the approvers. The child (as
 * nobody) opens 9; exit code 0 when the first 8 stay open and the 9th is closed by the daemon.
 */
static void subtest_per_uid_cap(struct ap_ctx *c)
{
	pid_t pid = fork();
	int status = -1;

	if (pid == 0) {
		struct sockaddr_un sun = { .sun_family = AF_UNIX };
		int fds[9], open_ok = 0;
		struct pollfd p;

		snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", c->g.d.socket);
		if (setgid(NOBODY) || setuid(NOBODY))
			_exit(10);
		for (int i = 0; i < 9; i++) {
			fds[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
			if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&sun, sizeof(sun)))
				_exit(11);
			usleep(50000); /* accepted in order */
		}
		usleep(300000);
		for (int i = 0; i < 9; i++) {
			p = (struct pollfd){ .fd = fds[i], .events = POLLIN };
			if (poll(&p, 1, 0) == 0)
				open_ok |= 1 << i; /* nothing to read, no hang-up: still open */
		}
		_exit(open_ok == 0xff ? 0 : 12);
	}
	if (!ASSERT_GT(pid, 0, "fork"))
		return;
	waitpid(pid, &status, 0);
	ASSERT_TRUE(WIFEXITED(status), "the child exited");
	ASSERT_EQ(WEXITSTATUS(status), 0, "8 connections kept, the 9th closed");
	ASSERT_OK(agctl_as(c, NOBODY, NULL, 0, NULL, 0, "approval list"),
		  "the user connects again once those are gone");
}

static void subtest_fingerprint(struct ap_ctx *c)
{
	char id[32], out[4096], err[4096];
	int fd = connect_nobody(c), fd2 = -1;

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(th_pg_admin(&c->g.pg,
				   "CREATE TABLE ap_fp (x int); ALTER TABLE ap_fp OWNER TO agent",
				   NULL, 0),
		       "setup"))
		goto out;
	if (!ASSERT_OK(send_query(fd, "ALTER TABLE ap_fp ALTER COLUMN x SET DEFAULT 1"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	/* A standing grant is a policy change, not an approval: the ttl is bounded. */
	ASSERT_EQ(agctl_as(c, 0, NULL, 0, err, sizeof(err),
			   "approval approve %s scope fingerprint ttl 30d", id),
		  1, "a fingerprint grant of 30 days is refused");
	ASSERT_HAS_SUBSTR(err, "at most 7d", "and says the bound");
	ASSERT_OK(agctl_as(c, 0, out, sizeof(out), NULL, 0,
			   "approval approve %s scope fingerprint ttl 1h", id),
		  "approve for the fingerprint");
	expect_result(fd, "CZ", "runs");
	/* The same shape with another literal: no hold, here and in another session. */
	ASSERT_OK(send_query(fd, "alter table ap_fp alter column x set default 2"), "send");
	expect_result(fd, "CZ", "the same shape passes without a hold");
	fd2 = connect_nobody(c);
	if (ASSERT_GE(fd2, 0, "second connection")) {
		ASSERT_OK(send_query(fd2, "ALTER TABLE ap_fp ALTER COLUMN x SET DEFAULT 3"),
			  "send");
		expect_result(fd2, "CZ", "and in another session of the agent");
	}
	/* Another shape is held. */
	if (ASSERT_OK(send_query(fd, "ALTER TABLE ap_fp ADD COLUMN y int"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s", id);
		expect_error(fd, "denied by root", "another shape is held");
	}
out:
	if (fd2 >= 0)
		close(fd2);
	close(fd);
}

static void subtest_session_scope(struct ap_ctx *c)
{
	char id[32];
	int fd = connect_nobody(c), fd2 = -1;

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_s1 (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s scope session", id),
		  "approve for the session");
	expect_result(fd, "CZ", "runs");
	ASSERT_OK(send_query(fd, "CREATE TABLE ap_s2 (id int, note text)"), "send");
	expect_result(fd, "CZ", "the rule's next statement passes in this session");
	ASSERT_TRUE(table_exists(c, "ap_s2"), "ap_s2 exists");
	fd2 = connect_nobody(c);
	if (ASSERT_GE(fd2, 0, "second connection")) {
		ASSERT_OK(send_query(fd2, "CREATE TABLE ap_s3 (id int)"), "send");
		if (read_hold(fd2, "ddl-review", id, sizeof(id))) {
			agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s", id);
			expect_error(fd2, "denied by root", "not in another session");
		}
	}
out:
	if (fd2 >= 0)
		close(fd2);
	close(fd);
}

static void subtest_others_run(struct ap_ctx *c)
{
	char id[32];
	int fd = connect_nobody(c), fd2 = -1;

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_wait (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	/* What the agent sends after the held statement waits behind it, unforwarded. */
	ASSERT_OK(send_query(fd, "INSERT INTO ap_wait VALUES (1)"), "pipelined after the hold");
	fd2 = connect_nobody(c);
	if (!ASSERT_GE(fd2, 0, "second connection"))
		goto out;
	for (int i = 0; i < 50; i++) {
		ASSERT_OK(send_query(fd2, "SELECT count(*) FROM orders"), "send");
		expect_result(fd2, "TDCZ", "another session runs while one waits");
		if (test__has_failed())
			break;
	}
	ASSERT_TRUE(quiet(fd), "the held session got nothing meanwhile");
	ASSERT_TRUE(state_is(c, id, "pending"), "still pending");
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), "approve");
	expect_result(fd, "CZ", "the held statement");
	expect_result(fd, "CZ", "then what followed it");
	{
		char out[64] = "";

		th_pg_admin(&c->g.pg, "SELECT count(*) FROM ap_wait", out, sizeof(out));
		ASSERT_STREQ(out, "1\n", "the insert after it ran too");
	}
out:
	if (fd2 >= 0)
		close(fd2);
	close(fd);
}

static void subtest_extended(struct ap_ctx *c)
{
	struct ag_buf b = { 0 };
	char id[32], got[64], st[8], msg[256];
	int fd = connect_nobody(c);

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	/*
	 * An allowed statement (flushed, so the server answers it now), then the held Parse, its
	 * Bind/Execute and Sync, pipelined.
	 */
	pg_put_parse(&b, "", "SELECT 1");
	th_pg_m_bind(&b, "", "", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'H');
	pg_put_parse(&b, "", "CREATE TABLE ap_ext (id int)");
	th_pg_m_bind(&b, "", "", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	if (!ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000), "send pipeline"))
		goto out;
	ag_buf_free(&b);
	/* The SELECT's answers come (the server's side keeps flowing) around the notice. */
	{
		char types[16] = "";
		size_t nt = 0;

		id[0] = '\0';
		while (nt < 5) {
			struct th_pg_msg m;

			if (!ASSERT_OK(th_pg_read_msg(fd, &m, 10000), "read"))
				goto out;
			types[nt++] = m.type;
			if (m.type == 'N') {
				const char *p = strstr(th_pg_err_field(&m, 'M'), "approval ap-");

				if (p)
					snprintf(id, sizeof(id), "%.*s", (int)strcspn(p + 9, " "),
						 p + 9);
			}
			th_pg_msg_free(&m);
		}
		ASSERT_TRUE(strchr(types, 'N') && strstr(types, "12") && strchr(types, 'C'),
			    "ParseComplete, BindComplete, the row and its CommandComplete, and the "
			    "notice");
		if (test__verbose())
			printf("before the decision: %s\n", types);
	}
	if (!ASSERT_TRUE(id[0], "the notice named an approval"))
		goto out;
	ASSERT_TRUE(quiet(fd), "the held Parse is not answered");
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), "approve");
	expect_result(fd, "12CZ", "the held Parse, Bind, Execute and Sync");
	ASSERT_TRUE(table_exists(c, "ap_ext"), "the table exists");

	/* Denied: the Parse is refused and everything up to Sync skipped. */
	pg_put_parse(&b, "s1", "CREATE TABLE ap_ext2 (id int)");
	th_pg_m_bind(&b, "", "s1", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000), "send");
	ag_buf_free(&b);
	if (read_hold(fd, "ddl-review", id, sizeof(id))) {
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s reason no", id);
		expect_error(fd, "denied by root: no", "a denied Parse");
		ASSERT_FALSE(table_exists(c, "ap_ext2"), "not created");
	}
	/* The connection goes on. */
	pg_put_parse(&b, "", "SELECT 2");
	th_pg_m_bind(&b, "", "", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000), "send");
	ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), st, msg, sizeof(msg), 10000), "read");
	ASSERT_STREQ(got, "12DCZ", "next pipeline");
out:
	ag_buf_free(&b);
	close(fd);
}

/* Waits for the file to contain s; its text into buf. */
static bool wait_file(const char *path, const char *s, char *buf, size_t len)
{
	for (int i = 0; i < 150; i++) {
		FILE *f = fopen(path, "r");
		size_t n = 0;

		if (f) {
			n = fread(buf, 1, len - 1, f);
			fclose(f);
		}
		buf[n] = '\0';
		if (strstr(buf, s))
			return true;
		usleep(100000);
	}
	return false;
}

static void subtest_notify(struct ap_ctx *c)
{
	char id[32], buf[16384], want[64];
	yajl_val v = NULL;
	int fd = connect_nobody(c);

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_notified (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	snprintf(want, sizeof(want), "\"id\":\"%s\"", id);
	if (ASSERT_TRUE(wait_file(c->notify_log, want, buf, sizeof(buf)),
			"the notify command got the request")) {
		char *line = strstr(buf, want);

		while (line && line > buf && line[-1] != '\n')
			line--;
		if (line) {
			char *nl = strchr(line, '\n');

			if (nl)
				*nl = '\0';
			v = th_json_parse(line);
		}
		if (ASSERT_OK_PTR(v, "as JSON")) {
			ASSERT_STREQ(th_json_str(v, "state"), "pending", "state");
			ASSERT_STREQ(th_json_str(v, "rule"), "ddl-review", "rule");
			ASSERT_STREQ(th_json_str(v, "agent"), "t", "agent");
			ASSERT_STREQ(th_json_str(v, "target"), "db", "target");
			ASSERT_STREQ(th_json_str(v, "protocol"), "postgres", "protocol");
			ASSERT_STREQ(th_json_str(v, "statement"),
				     "CREATE TABLE ap_notified (id int)", "statement");
			ASSERT_OK_PTR(th_json_str(v, "expires_at"), "expires_at");
			yajl_tree_free(v);
		}
	}
	agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id);
	expect_result(fd, "CZ", "runs");
out:
	close(fd);
}

static void subtest_notify_fails(struct ap_ctx *c)
{
	char r[2048], id[32], log[65536];
	int fd;

	/* A command that fails, then one that hangs: neither holds the approval up. */
	rules(c, r, sizeof(r), "5m", "fail.sh");
	if (!ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", r), "policy with a failing notify"))
		return;
	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		goto restore;
	if (ASSERT_OK(send_query(fd, "CREATE TABLE ap_nf1 (id int)"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id);
		expect_result(fd, "CZ", "approved despite a failing notify");
		for (int i = 0; i < 100; i++) {
			th_daemon_read_log(&c->g.d, log, sizeof(log));
			if (strstr(log, "fail.sh exited with 3"))
				break;
			usleep(100000);
		}
		ASSERT_HAS_SUBSTR(log, "fail.sh exited with 3", "the failure is logged");
	}
	close(fd);
	rules(c, r, sizeof(r), "5m", "hang.sh");
	if (!ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", r), "policy with a hanging notify"))
		goto restore;
	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		goto restore;
	if (ASSERT_OK(send_query(fd, "CREATE TABLE ap_nf2 (id int)"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id);
		expect_result(fd, "CZ", "approved while the notify hangs");
		/* A second one, queued behind the hanging command, is decided all the same. */
		ASSERT_OK(send_query(fd, "CREATE TABLE ap_nf3 (id int)"), "send");
		if (read_hold(fd, "ddl-review", id, sizeof(id))) {
			agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id);
			expect_result(fd, "CZ", "and the next one");
		}
	}
	close(fd);
restore:
	policy_back(c);
}

/*
 * approvals.notify gets a clean environment (PATH and LANG only: the daemon was started with
 * AG_TEST_SECRET in its own) and no fd of the daemon's but stdin, stdout and stderr.
 */
static void subtest_notify_env(struct ap_ctx *c)
{
	char r[2048], id[32], path[300], buf[16384];
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/environ", c->g.d.pid);
	{
		FILE *f = fopen(path, "r");
		size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;

		if (f)
			fclose(f);
		for (size_t i = 0; i < n; i++)
			buf[i] = buf[i] ? buf[i] : '\n';
		buf[n] = '\0';
		ASSERT_HAS_SUBSTR(buf, "AG_TEST_SECRET=xyz", "the daemon has the variable");
	}
	rules(c, r, sizeof(r), "5m", "envdump.sh");
	if (!ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", r), "policy with an env-dumping notify"))
		return;
	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		goto restore;
	if (ASSERT_OK(send_query(fd, "CREATE TABLE ap_env (id int)"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		bool ran = false;

		/* Behind hang.sh's commands, killed after 10 s each (notify_failure_never_blocks). */
		snprintf(path, sizeof(path), "%s/notify.done", c->dir);
		for (int i = 0; i < 3 && !ran; i++)
			ran = wait_file(path, "done", buf, sizeof(buf));
		if (ASSERT_TRUE(ran, "the notify command ran")) {
			snprintf(path, sizeof(path), "%s/notify.env", c->dir);
			wait_file(path, "PATH=", buf, sizeof(buf));
			ASSERT_FALSE(strstr(buf, "AG_TEST_SECRET"),
				     "the daemon's environment stays");
			ASSERT_HAS_SUBSTR(buf, "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n",
					  "a fixed PATH");
			ASSERT_HAS_SUBSTR(buf, "LANG=C\n", "LANG=C");
			snprintf(path, sizeof(path), "%s/notify.fds", c->dir);
			wait_file(path, "0", buf, sizeof(buf));
			/* ls lists its own directory fd (3) too: nothing above it. */
			for (char *l = strtok(buf, "\n"); l; l = strtok(NULL, "\n"))
				if (!ASSERT_LE(atoi(l), 3, "no daemon fd in the notify command"))
					printf("fd %s is open in it\n", l);
			/* Not the notifier thread's blocked signals, nor the daemon's SIG_IGN. */
			snprintf(path, sizeof(path), "%s/notify.sig", c->dir);
			wait_file(path, "SigIgn", buf, sizeof(buf));
			{
				const char *b = strstr(buf, "SigBlk:"), *i = strstr(buf, "SigIgn:");
				/* Signals 1..31; glibc keeps its own two RT signals (32, 33). */
				unsigned long long blk = b ? strtoull(b + 7, NULL, 16) : ~0ull;
				unsigned long long ign = i ? strtoull(i + 7, NULL, 16) : ~0ull;

				ASSERT_EQ(blk & 0x7fffffffull, 0, "no signal blocked");
				ASSERT_EQ(ign & 0x7fffffffull, 0, "no signal ignored (SIGPIPE)");
			}
		}
		agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id);
		expect_result(fd, "CZ", "runs");
	}
	close(fd);
restore:
	policy_back(c);
}

/*
 * A policy reload: who may decide is judged by the policy in force at the decision. A held
 * request stays pending although its rule no longer says approve (the agent was told it waits);
 * bin, dropped from approvals.approvers, can no longer decide it nor list it, and the approval
 * watch of nobody, dropped too, ends at the reload and never shows the next change. New
 * statements follow the new rules.
 */
static void subtest_reload_rechecks(struct ap_ctx *c)
{
	static const char reloaded[] =
		"    sql:\n"
		"      - { name: no-drop, when: { command: [drop] }, then: deny }\n"
		"      - { name: ddl-review, when: { command: [ddl] }, then: allow }\n"
		"      - { name: rw, when: { command: [select, insert, update, delete, begin, commit,"
		" rollback, set, show] }, then: allow }\n"
		"approvals: { approvers: [root], timeout: 5m }\n";
	char bin[256], id[32], err[4096], want[64], wbuf[16384] = "";
	size_t wlen = 0;
	int p[2], fd, rc, status = 0;
	pid_t pid = -1;

	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_reload (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)) || !ASSERT_OK(pipe(p), "pipe")) {
		close(fd);
		return;
	}
	snprintf(bin, sizeof(bin), "%s/agctl", th_build_dir());
	pid = fork();
	if (pid == 0) {
		dup2(p[1], 1);
		dup2(p[1], 2);
		close(p[0]);
		if (setgroups(0, NULL) || setgid(65534) || setuid(NOBODY))
			_exit(126);
		execl(bin, bin, "-S", c->g.d.socket, "-j", "approval", "watch", (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	if (!ASSERT_GT(pid, 0, "agctl approval watch as nobody"))
		goto out;
	/* The watch is on once it printed the pending request. */
	snprintf(want, sizeof(want), "\"id\":\"%s\"", id);
	read_watch(p[0], wbuf, sizeof(wbuf), &wlen, want, NULL, 150);
	if (!ASSERT_HAS_SUBSTR(wbuf, want, "nobody watches the pending request"))
		goto out;
	if (!ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", reloaded), "reload: root only"))
		goto out;
	/* Let go at the reload itself, not at the next change it would have been shown. */
	read_watch(p[0], wbuf, sizeof(wbuf), &wlen, "is no longer an approver", NULL, 150);
	ASSERT_HAS_SUBSTR(wbuf, "is no longer an approver", "the watch ends at the reload");
	rc = agctl_as(c, BIN_UID, NULL, 0, err, sizeof(err), "approval approve %s", id);
	ASSERT_EQ(rc, 1, "bin, dropped from the approvers, cannot approve any more");
	ASSERT_HAS_SUBSTR(err, "is not an approver", "and is told why");
	rc = agctl_as(c, BIN_UID, NULL, 0, err, sizeof(err), "approval deny %s", id);
	ASSERT_EQ(rc, 1, "nor deny");
	ASSERT_HAS_SUBSTR(err, "is not an approver", "denial refused: why");
	rc = agctl_as(c, BIN_UID, NULL, 0, err, sizeof(err), "approval list");
	ASSERT_EQ(rc, 1, "nor list the approvals");
	ASSERT_TRUE(state_is(c, id, "pending"), "the request waits as it was asked");
	ASSERT_TRUE(quiet(fd), "its statement did not run");
	ASSERT_FALSE(table_exists(c, "ap_reload"), "no table yet");
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), "root decides");
	expect_result(fd, "CZ", "then it runs");
	/* The approval changed: nobody's watch is told it ended and never shows the change. */
	read_watch(p[0], wbuf, sizeof(wbuf), &wlen, NULL, NULL, 150);
	ASSERT_HAS_SUBSTR(wbuf, "is no longer an approver", "the watch ends with the reason");
	ASSERT_FALSE(strstr(wbuf, "\"state\":\"approved\""), "and shows nothing after the reload");
	/* EOF on the pipe comes before the exit is reaped: a deadline, not a single look. */
	for (int i = 0; i < 100 && (rc = waitpid(pid, &status, WNOHANG)) == 0; i++)
		usleep(50 * 1000);
	if (ASSERT_EQ(rc, pid, "agctl approval watch exited")) {
		ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1, "exit 1");
		pid = -1;
	}
	/* A new statement follows the new rule. */
	ASSERT_OK(send_query(fd, "CREATE TABLE ap_reload2 (id int)"), "send");
	expect_result(fd, "CZ", "a DDL statement after the reload runs without approval");
out:
	close(fd);
	if (pid > 0) {
		kill(pid, SIGTERM);
		waitpid(pid, NULL, 0);
	}
	close(p[0]);
	policy_back(c);
}

static void subtest_kill_cancels(struct ap_ctx *c)
{
	Agentgate__Ctl__Request req = AGENTGATE__CTL__REQUEST__INIT;
	ag_ctl_response *resp;
	char id[32], err[256], out[8192];
	long long session = 0;
	yajl_val v;
	int fd = connect_nobody(c);

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_killed (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	v = show(c, id);
	if (v) {
		th_json_int(v, "session", &session);
		yajl_tree_free(v);
	}
	if (!ASSERT_GT(session, 0, "the approval names its session"))
		goto out;
	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_SESSION_KILL;
	req.session_kill = session;
	resp = ag_ctl_call(c->g.d.socket, &req, 10000, err, sizeof(err));
	if (ASSERT_OK_PTR(resp, "session kill"))
		ASSERT_STREQ(resp->error, "", "killed");
	ag_ctl_response_free(resp);
	ASSERT_TRUE(wait_state(c, id, "cancelled"), "the kill cancels the approval");
	ASSERT_EQ(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), 1,
		  "a cancelled approval cannot be approved");
	ASSERT_FALSE(table_exists(c, "ap_killed"), "not run");
	close(fd);

	/* The agent's CancelRequest withdraws it: 57014, as the server says for a cancel. */
	{
		uint32_t bpid = 0, bkey = 0;
		uint8_t pkt[16];
		char got[16], st[8], msg[256];
		int cfd;

		fd = th_pg_connect_as(c->g.tagged, c->g.pg.addr, c->g.pg.port, NOBODY, 65534);
		if (!ASSERT_GE(fd, 0, "agent connection") ||
		    !ASSERT_OK(th_pg_raw_startup_key(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD,
						     &bpid, &bkey),
			       "startup"))
			goto out;
		if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_cancelled (id int)"), "send") ||
		    !read_hold(fd, "ddl-review", id, sizeof(id)))
			goto out;
		pg_put32(pkt, 16);
		pg_put32(pkt + 4, 80877102);
		pg_put32(pkt + 8, bpid);
		pg_put32(pkt + 12, bkey);
		cfd = th_pg_connect_as(c->g.tagged, c->g.pg.addr, c->g.pg.port, NOBODY, 65534);
		if (ASSERT_GE(cfd, 0, "cancel connection")) {
			ASSERT_OK(th_send_all(cfd, pkt, sizeof(pkt), 5000), "CancelRequest");
			close(cfd);
		}
		ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), st, msg, sizeof(msg), 15000),
			  "answer");
		ASSERT_STREQ(got, "EZ", "the held statement is cancelled");
		ASSERT_STREQ(st, "57014", "query_canceled");
		ASSERT_TRUE(wait_state(c, id, "cancelled"), "the approval is cancelled");
		ASSERT_FALSE(table_exists(c, "ap_cancelled"), "not run");
		ASSERT_OK(send_query(fd, "SELECT 1"), "send");
		expect_result(fd, "TDCZ", "the session goes on");
		close(fd);
	}

	/* The agent leaves while held. */
	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (ASSERT_OK(send_query(fd, "CREATE TABLE ap_left (id int)"), "send") &&
	    read_hold(fd, "ddl-review", id, sizeof(id))) {
		close(fd);
		fd = -1;
		ASSERT_TRUE(wait_state(c, id, "cancelled"), "leaving cancels the approval");
		ASSERT_FALSE(table_exists(c, "ap_left"), "not run");
	}
	/* Nothing pending is left on any session. */
	if (!agctl_as(c, 0, out, sizeof(out), NULL, 0, "-j session list"))
		ASSERT_FALSE(strstr(out, "\"pending_approvals\":1"), "no session waits");
out:
	if (fd >= 0)
		close(fd);
}

/* Usage errors are caught before the daemon is asked; unknown ids are its error. */
static void subtest_usage(struct ap_ctx *c)
{
	static const struct {
		const char *args, *err;
	} cases[] = {
		{ "approval approve", "'approve' needs at least 1 argument" },
		{ "approval approve ap-x scope bogus", "what is 'bogus'?" },
		{ "approval approve ap-x ttl 1h", "ttl goes with scope fingerprint" },
		{ "approval approve ap-x scope fingerprint ttl 5x", "invalid duration '5x'" },
		{ "approval deny ap-x because", "what is 'because'?" },
		{ "approval deny ap-x reason", "'reason' needs at least 1 argument" },
		{ "approval show ap-x extra", "what is 'extra'?" },
		{ "approval bogus", "unknown command 'bogus'" },
		{ "approval approve ap-nosuch", "no approval ap-nosuch" },
		{ "approval deny ap-nosuch", "no approval ap-nosuch" },
		{ "approval show ap-nosuch", "no approval ap-nosuch" },
	};
	char out[4096], err[4096];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = agctl_as(c, 0, out, sizeof(out), err, sizeof(err), "%s", cases[i].args);

		ASSERT_EQ(rc, 1, cases[i].args);
		ASSERT_HAS_SUBSTR(err, cases[i].err, cases[i].args);
	}
	ASSERT_EQ(agctl_as(c, 0, out, sizeof(out), err, sizeof(err), "-j approval show ap-nosuch"),
		  1, "-j error");
	ASSERT_HAS_SUBSTR(out, "{\"error\":\"no approval ap-nosuch\"}", "as JSON");
	ASSERT_OK(agctl_as(c, 0, out, sizeof(out), NULL, 0, "a l"), "prefixes: a l");
	ASSERT_HAS_SUBSTR(out, "ID", "a table");
}

/* mode: observe records the hold in the log and lets the statement run. */
static void subtest_observe(struct ap_ctx *c)
{
	char r[2048], out[4096], log[65536];
	int fd;

	rules(c, r, sizeof(r), "5m", "notify.sh");
	if (!ASSERT_OK(th_pg_gate_rules(&c->g, "observe", r), "observe mode"))
		return;
	fd = connect_nobody(c);
	if (ASSERT_GE(fd, 0, "agent connection")) {
		ASSERT_OK(send_query(fd, "CREATE TABLE ap_observed (id int)"), "send");
		expect_result(fd, "CZ", "runs without a hold");
		ASSERT_TRUE(table_exists(c, "ap_observed"), "the table exists");
		close(fd);
	}
	th_daemon_read_log(&c->g.d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "observe mode, would hold by rule ddl-review", "recorded");
	if (!agctl_as(c, 0, out, sizeof(out), NULL, 0, "approval list"))
		ASSERT_FALSE(strstr(out, "ap_observed"), "no approval asked");
	ASSERT_OK(th_pg_gate_rules(&c->g, "enforce", r), "back to enforce");
}

/* The first pending approval's id in agctl -j approval list (polled); true when one came. */
static bool wait_pending(struct ap_ctx *c, const char *needle, char *id, size_t idlen)
{
	for (int i = 0; i < 150; i++) {
		char out[65536];
		yajl_val v;

		if (!agctl_as(c, 0, out, sizeof(out), NULL, 0, "-j approval list") &&
		    (v = th_json_parse(out))) {
			for (size_t k = 0; YAJL_IS_ARRAY(v) && k < v->u.array.len; k++) {
				yajl_val a = v->u.array.values[k];
				const char *st = th_json_str(a, "state");
				const char *sql = th_json_str(a, "statement");

				if (st && !strcmp(st, "pending") && sql && strstr(sql, needle)) {
					snprintf(id, idlen, "%s", th_json_str(a, "id"));
					yajl_tree_free(v);
					return true;
				}
			}
			yajl_tree_free(v);
		}
		usleep(100000);
	}
	return false;
}

struct psql_job {
	struct ap_ctx *c;
	int rc;
	char out[8192];
};

static int psql_child(void *arg)
{
	struct psql_job *j = arg;
	char cmd[1024], port[16];
	char *argv[] = { "/usr/bin/setpriv",
			 "--reuid=65534",
			 "--regid=65534",
			 "--clear-groups",
			 "/bin/sh",
			 "-c",
			 cmd,
			 NULL };

	snprintf(port, sizeof(port), "%d", j->c->g.pg.port);
	snprintf(cmd, sizeof(cmd),
		 "/usr/bin/psql -X -q -h %s -p %s -U %s -d %s "
		 "-c 'CREATE TABLE ap_psql (id int)' -c 'SELECT 40 + 2' 2>&1",
		 j->c->g.pg.addr, port, TH_PG_USER, TH_PG_DB);
	/* Already in the tagged cgroup: th_pg_exec with NULL stays there. */
	j->rc = th_pg_exec(NULL, argv, NULL, j->out, sizeof(j->out), NULL, 0, 60000);
	return 0;
}

static void subtest_psql(struct ap_ctx *c)
{
	struct psql_job *j = th_shared_alloc(sizeof(*j));
	char id[32];
	const char *n, *r;
	pid_t pid;

	if (!ASSERT_OK_PTR(j, "shared memory"))
		return;
	j->c = c;
	j->rc = -1;
	pid = th_spawn_in_cgroup(c->g.tagged, psql_child, j);
	if (!ASSERT_GT(pid, 0, "psql as nobody in the agent's cgroup"))
		goto out;
	if (ASSERT_TRUE(wait_pending(c, "ap_psql", id, sizeof(id)), "psql's statement is held"))
		ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), "approve");
	th_wait(pid, 60000);
	ASSERT_EQ(j->rc, 0, "psql succeeds");
	n = strstr(j->out, "NOTICE:  agentgate: waiting for approval ap-");
	r = strstr(j->out, "42\n");
	ASSERT_OK_PTR(n, "psql shows the notice");
	ASSERT_OK_PTR(r, "and the result of the next statement");
	ASSERT_TRUE(n && r && n < r, "the notice first, then the result");
	ASSERT_TRUE(table_exists(c, "ap_psql"), "the table exists");
	if (test__verbose() || test__has_failed())
		printf("psql said:\n%s", j->out);
out:
	th_shared_free(j, sizeof(*j));
}

static void subtest_watch(struct ap_ctx *c)
{
	char bin[256], id[32], buf[16384] = "", want1[64], want2[64];
	size_t len = 0;
	int p[2], fd = -1;
	pid_t pid;

	snprintf(bin, sizeof(bin), "%s/agctl", th_build_dir());
	if (!ASSERT_OK(pipe(p), "pipe"))
		return;
	pid = fork();
	if (pid == 0) {
		dup2(p[1], 1);
		close(p[0]);
		/* An approver who is not root: watch is open to it. */
		if (setgroups(0, NULL) || setgid(65534) || setuid(NOBODY))
			_exit(126);
		execl(bin, bin, "-S", c->g.d.socket, "-j", "approval", "watch", (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	if (!ASSERT_GT(pid, 0, "agctl approval watch"))
		goto out;
	fd = connect_nobody(c);
	if (!ASSERT_GE(fd, 0, "agent connection"))
		goto out;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_watched (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), "approve");
	expect_result(fd, "CZ", "runs");
	snprintf(want1, sizeof(want1), "\"id\":\"%s\"", id);
	snprintf(want2, sizeof(want2), "\"state\":\"approved\"");
	read_watch(p[0], buf, sizeof(buf), &len, want1, want2, 100);
	ASSERT_HAS_SUBSTR(buf, want1, "watch shows the request");
	ASSERT_HAS_SUBSTR(buf, "\"state\":\"pending\"", "pending");
	ASSERT_HAS_SUBSTR(buf, want2, "then the approval");
	ASSERT_HAS_SUBSTR(buf, "\"decided_by\":\"root\"", "by root");
out:
	if (fd >= 0)
		close(fd);
	if (pid > 0) {
		kill(pid, SIGTERM);
		waitpid(pid, NULL, 0);
	}
	close(p[0]);
}

struct flood_job {
	int fd;
	int n;
	int rc;
};

/* Sends n Queries of about 4 KiB each behind the held one, as fast as the gateway reads. */
static int flood_child(void *arg)
{
	struct flood_job *j = arg;
	struct ag_buf b = { 0 };
	char sql[4200];

	memset(sql, ' ', sizeof(sql));
	memcpy(sql, "SELECT 7", 8);
	sql[sizeof(sql) - 1] = '\0';
	for (int i = 0; i < j->n && !j->rc; i++) {
		pg_put_query(&b, sql);
		if (ag_buf_len(&b) > 65536 || i == j->n - 1) {
			j->rc = th_send_all(j->fd, ag_buf_head(&b), ag_buf_len(&b), 60000);
			b.start = b.end = 0;
		}
	}
	ag_buf_free(&b);
	return 0;
}

static void subtest_backlog(struct ap_ctx *c)
{
	struct flood_job *j = th_shared_alloc(sizeof(*j));
	char id[32];
	int fd = connect_nobody(c), done = 0;
	pid_t pid = -1;

	if (!ASSERT_OK_PTR(j, "shared memory") || !ASSERT_GE(fd, 0, "agent connection"))
		goto out;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_backlog (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	/* 4 MiB behind the held statement: more than the gateway buffers, so it stops reading. */
	j->fd = fd;
	j->n = 1000;
	pid = fork();
	if (pid == 0)
		_exit(flood_child(j));
	if (!ASSERT_GT(pid, 0, "writer"))
		goto out;
	ASSERT_TRUE(state_is(c, id, "pending"), "pending under the backlog");
	ASSERT_TRUE(th_pg_gate_alive(&c->g), "the daemon is fine");
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s", id), "approve");
	expect_result(fd, "CZ", "the held statement");
	for (done = 0; done < 1000; done++) {
		char got[16];

		if (th_pg_raw_collect(fd, 1, got, sizeof(got), NULL, NULL, 0, 30000) ||
		    strcmp(got, "TDCZ"))
			break;
	}
	ASSERT_EQ(done, 1000, "every query behind it ran, in order");
	th_wait(pid, 30000);
	pid = -1;
	ASSERT_OK(j->rc, "the writer got everything out");
out:
	if (pid > 0) {
		kill(pid, SIGKILL);
		th_wait(pid, 5000);
	}
	if (fd >= 0)
		close(fd);
	if (j)
		th_shared_free(j, sizeof(*j));
}

/*
 * The audit log: `session replay` shows the held statement, the approval requested and decided
 * by root with its scope, and a denied one with the approver's reason.
 */
static void subtest_replay_shows_approvals(struct ap_ctx *c)
{
	char id[32], id2[32], want[160], out[65536];
	long long sid = 0;
	yajl_val v;
	int fd = connect_nobody(c);

	if (!ASSERT_GE(fd, 0, "agent connection"))
		return;
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_replayed (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id, sizeof(id)))
		goto out;
	v = show(c, id);
	if (v) {
		th_json_int(v, "session", &sid);
		yajl_tree_free(v);
	}
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval approve %s scope once", id),
		  "root approves");
	expect_result(fd, "CZ", "runs once approved");
	if (!ASSERT_OK(send_query(fd, "CREATE TABLE ap_replay_denied (id int)"), "send") ||
	    !read_hold(fd, "ddl-review", id2, sizeof(id2)))
		goto out;
	ASSERT_OK(agctl_as(c, 0, NULL, 0, NULL, 0, "approval deny %s reason replay-check-no", id2),
		  "root denies");
	expect_error(fd, "replay-check-no", "denied");
	close(fd);
	fd = -1;
	if (!ASSERT_GT(sid, 0, "session id"))
		goto out;
	for (int i = 0; i < 50; i++) {
		/* the records reach the log from the writer thread: wait for the session's end */
		if (agctl_as(c, 0, out, sizeof(out), NULL, 0, "session replay %lld", sid) == 0 &&
		    strstr(out, "end "))
			break;
		usleep(100000);
	}
	ASSERT_HAS_SUBSTR(out, "CREATE TABLE ap_replayed (id int)", "the held statement");
	snprintf(want, sizeof(want), "approval  %s requested (rule ddl-review)", id);
	ASSERT_HAS_SUBSTR(out, want, "requested");
	snprintf(want, sizeof(want), "approval  %s approved (rule ddl-review) by root (uid 0) scope once",
		 id);
	ASSERT_HAS_SUBSTR(out, want, "approved by root, scope once");
	snprintf(want, sizeof(want), "approval  %s denied (rule ddl-review) by root (uid 0)", id2);
	ASSERT_HAS_SUBSTR(out, want, "denied by root");
	ASSERT_HAS_SUBSTR(out, "replay-check-no", "the denial's reason");
	ASSERT_TRUE(strstr(out, id) && strstr(out, id2) && strstr(out, id) < strstr(out, id2),
		    "in order");
	if (ASSERT_OK(agctl_as(c, 0, out, sizeof(out), NULL, 0, "-j session replay %lld", sid),
		      "replay -j")) {
		ASSERT_HAS_SUBSTR(out, "\"state\":\"approved\"", "-j approved");
		ASSERT_HAS_SUBSTR(out, "\"by\":\"root\"", "-j by root");
		ASSERT_HAS_SUBSTR(out, "\"scope\":\"once\"", "-j scope");
		ASSERT_HAS_SUBSTR(out, "\"reason\":\"replay-check-no\"", "-j reason");
	}
out:
	if (fd >= 0)
		close(fd);
}

void test_approval(void)
{
	struct ap_ctx *c = calloc(1, sizeof(*c));
	char r[2048], path[300];
	int rc;

	if (!ASSERT_OK_PTR(c, "alloc"))
		return;
	snprintf(c->dir, sizeof(c->dir), "/tmp/agentgate-approval.XXXXXX");
	if (!ASSERT_OK_PTR(mkdtemp(c->dir), "temp dir"))
		goto free;
	chmod(c->dir, 0755);
	snprintf(c->notify_log, sizeof(c->notify_log), "%s/notify.log", c->dir);
	snprintf(path, sizeof(path), "%s/notify.sh", c->dir);
	snprintf(r, sizeof(r), "cat >> %s; echo >> %s", c->notify_log, c->notify_log);
	write_script(path, r);
	snprintf(path, sizeof(path), "%s/fail.sh", c->dir);
	write_script(path, "cat > /dev/null; exit 3");
	snprintf(path, sizeof(path), "%s/hang.sh", c->dir);
	write_script(path, "exec sleep 60");
	snprintf(path, sizeof(path), "%s/envdump.sh", c->dir);
	snprintf(r, sizeof(r),
		 "cat > /dev/null; env > %1$s/notify.env; ls /proc/self/fd > %1$s/notify.fds; "
		 "grep -E '^Sig(Blk|Ign):' /proc/self/status > %1$s/notify.sig; "
		 "echo done > %1$s/notify.done",
		 c->dir);
	write_script(path, r);
	rules(c, r, sizeof(r), "5m", "notify.sh");
	/* Something of the daemon's environment that a notify command must not see. */
	setenv("AG_TEST_SECRET", "xyz", 1);
	rc = th_pg_gate_start(&c->g, "127.0.0.2", "md5", "enforce", r);
	unsetenv("AG_TEST_SECRET");
	if (!ASSERT_OK(rc, "gate"))
		goto out;
	/* Non-root agctl reaches the socket in the daemon's temp dir. */
	chmod(c->g.d.dir, 0711);
	if (test__start_subtest("approved_runs"))
		subtest_approved_runs(c);
	if (test__start_subtest("denied_42501_session_usable"))
		subtest_denied(c);
	if (test__start_subtest("timed_out"))
		subtest_timeout(c);
	if (test__start_subtest("own_uid_cannot_approve"))
		subtest_own_uid(c);
	if (test__start_subtest("non_approver_refused_group_approver_ok"))
		subtest_non_approver(c);
	if (test__start_subtest("control_socket_per_uid_cap"))
		subtest_per_uid_cap(c);
	if (test__start_subtest("fingerprint_scope"))
		subtest_fingerprint(c);
	if (test__start_subtest("session_scope"))
		subtest_session_scope(c);
	if (test__start_subtest("other_sessions_run_while_held"))
		subtest_others_run(c);
	if (test__start_subtest("extended_parse_held"))
		subtest_extended(c);
	if (test__start_subtest("psql_sees_notice_then_result"))
		subtest_psql(c);
	if (test__start_subtest("watch_streams_changes"))
		subtest_watch(c);
	if (test__start_subtest("backlog_behind_hold_then_runs"))
		subtest_backlog(c);
	if (test__start_subtest("agctl_usage_errors"))
		subtest_usage(c);
	if (test__start_subtest("observe_mode_records_only"))
		subtest_observe(c);
	if (test__start_subtest("notify_gets_json"))
		subtest_notify(c);
	if (test__start_subtest("notify_failure_never_blocks"))
		subtest_notify_fails(c);
	if (test__start_subtest("notify_clean_env_no_daemon_fds"))
		subtest_notify_env(c);
	if (test__start_subtest("reload_rechecks_approvers_pending_stays"))
		subtest_reload_rechecks(c);
	if (test__start_subtest("kill_cancelrequest_or_leave_cancels"))
		subtest_kill_cancels(c);
	if (test__start_subtest("replay_shows_approver_scope_and_denial"))
		subtest_replay_shows_approvals(c);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&c->g);
	th_rm_rf(c->dir);
free:
	free(c);
}
