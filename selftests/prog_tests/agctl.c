// SPDX-License-Identifier: GPL-2.0
/*
 * agctl as a user meets it, with no daemon: the version, the help grammar, bpftool's habits
 * (prefixes, `Error: ...` on stderr or {"error": ...} on stdout with -j, exit 1), the clean
 * message when agentgated is not running, and `policy check` on a good and a bad file. build/agctl
 * is run as a separate process with stdout and stderr captured apart.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
#include <yajl/yajl_tree.h>

#include "../helpers.h"
#include "../test_progs.h"

#define NO_DAEMON_SOCKET "/nonexistent/agentgate.sock"
#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))


#define AGCTL TH_AGCTL

/* stdout holds exactly one JSON object with a string "error". */
static void assert_json_error(const struct th_agctl_result *r, const char *substr, const char *what)
{
	static const char *path[] = { "error", NULL };
	char errbuf[256];
	yajl_val v, e;

	v = yajl_tree_parse(r->out, errbuf, sizeof(errbuf));
	if (!ASSERT_OK_PTR(v, what)) {
		fprintf(stdout, "not JSON (%s): '%s'\n", errbuf, r->out);
		return;
	}
	e = yajl_tree_get(v, path, yajl_t_string);
	if (ASSERT_OK_PTR(e, "error is a string") && substr)
		ASSERT_HAS_SUBSTR(YAJL_GET_STRING(e), substr, what);
	yajl_tree_free(v);
}

static void subtest_version(void)
{
	static const char *path[] = { "version", NULL };
	struct th_agctl_result *r = malloc(sizeof(*r));
	char errbuf[256];
	yajl_val v;

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	ASSERT_EQ(AGCTL(r, "-V"), 0, "-V exit");
	ASSERT_TRUE(!strncmp(r->out, "agctl ", 6), "-V prints 'agctl VERSION'");
	ASSERT_STREQ(r->err, "", "-V stderr");
	ASSERT_EQ(AGCTL(r, "--version"), 0, "--version exit");
	ASSERT_TRUE(!strncmp(r->out, "agctl ", 6), "--version prints 'agctl VERSION'");

	ASSERT_EQ(AGCTL(r, "-j", "version"), 0, "-j version exit");
	v = yajl_tree_parse(r->out, errbuf, sizeof(errbuf));
	if (ASSERT_OK_PTR(v, "-j version is JSON")) {
		ASSERT_OK_PTR(yajl_tree_get(v, path, yajl_t_string), "version field");
		yajl_tree_free(v);
	}
	free(r);
}

static void subtest_help_grammar(void)
{
	static const char *const objects[] = { "session", "cgroup", "policy",
					       "prog",	  "run",    "socket" };
	struct th_agctl_result *r = malloc(sizeof(*r));
	char want[64];

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	ASSERT_EQ(AGCTL(r, "help"), 0, "help exit");
	ASSERT_HAS_SUBSTR(r->out, "Usage: agctl [OPTIONS] OBJECT { COMMAND | help }", "usage line");
	ASSERT_HAS_SUBSTR(r->out, "OBJECT := {", "object grammar");
	ASSERT_HAS_SUBSTR(r->out, "OPTIONS := {", "options grammar");
	ASSERT_HAS_SUBSTR(r->out, "{-j|--json}", "-j documented");
	ASSERT_HAS_SUBSTR(r->out, "{-S|--socket PATH}", "-S documented");
	for (size_t i = 0; i < N_ELEMS(objects); i++)
		ASSERT_HAS_SUBSTR(r->out, objects[i], "object listed");

	/* Every object answers `help` with its own grammar. */
	for (size_t i = 0; i < N_ELEMS(objects); i++) {
		ASSERT_EQ(AGCTL(r, objects[i], "help"), 0, objects[i]);
		snprintf(want, sizeof(want), "Usage: agctl %s ", objects[i]);
		ASSERT_HAS_SUBSTR(r->out, want, "object usage");
	}
	ASSERT_EQ(AGCTL(r, "cgroup", "help"), 0, "cgroup help");
	ASSERT_HAS_SUBSTR(r->out, "tag PATH agent NAME", "cgroup tag grammar");
	ASSERT_EQ(AGCTL(r, "run", "help"), 0, "run help");
	ASSERT_HAS_SUBSTR(r->out, "[--agent NAME] -- CMD", "run grammar");

	/* -j help is a JSON null, as bpftool's. */
	ASSERT_EQ(AGCTL(r, "-j", "help"), 0, "-j help exit");
	ASSERT_STREQ(r->out, "null\n", "-j help output");
	free(r);
}

static void subtest_unknown_object(void)
{
	struct th_agctl_result *r = malloc(sizeof(*r));

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	ASSERT_EQ(AGCTL(r, "frobnicate"), 1, "unknown object exit");
	ASSERT_TRUE(!strncmp(r->err, "Error: ", 7), "stderr starts with 'Error: '");
	ASSERT_HAS_SUBSTR(r->err, "frobnicate", "names the word");
	ASSERT_STREQ(r->out, "", "nothing on stdout");

	ASSERT_EQ(AGCTL(r, "session", "frobnicate"), 1, "unknown command exit");
	ASSERT_TRUE(!strncmp(r->err, "Error: ", 7), "command: 'Error: '");

	ASSERT_EQ(AGCTL(r, "--frobnicate", "session"), 1, "unknown option exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: unrecognized option '--frobnicate'", "unknown option");

	ASSERT_EQ(AGCTL(r, "session", "show", "x1"), 1, "bad session id exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: invalid session id 'x1'", "bad session id");
	ASSERT_EQ(AGCTL(r, "cgroup", "tag", "/x"), 1, "tag without agent exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: 'tag' needs at least 3 arguments", "tag arity");
	ASSERT_EQ(AGCTL(r, "run", "true"), 1, "run without -- exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: expected '--'", "run needs --");
	free(r);
}

static void subtest_json_error(void)
{
	struct th_agctl_result *r = malloc(sizeof(*r));

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	ASSERT_EQ(AGCTL(r, "-j", "session", "frobnicate"), 1, "-j unknown command exit");
	assert_json_error(r, "frobnicate", "-j error on stdout");
	ASSERT_STREQ(r->err, "", "nothing on stderr");

	ASSERT_EQ(AGCTL(r, "-p", "frobnicate"), 1, "-p unknown object exit");
	assert_json_error(r, "frobnicate", "-p error on stdout");

	/* -j after the object works too (options may stand anywhere before --). */
	ASSERT_EQ(AGCTL(r, "session", "frobnicate", "-j"), 1, "trailing -j exit");
	assert_json_error(r, NULL, "trailing -j");

	ASSERT_EQ(AGCTL(r, "-j", "policy", "check"), 1, "-j missing argument exit");
	assert_json_error(r, "needs at least 1 argument", "-j missing argument");
	free(r);
}

static void subtest_prefix_matching(void)
{
	struct th_agctl_result *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));

	if (!ASSERT_OK_PTR(a, "alloc") || !ASSERT_OK_PTR(b, "alloc"))
		goto out;
	ASSERT_EQ(AGCTL(a, "session", "help"), 0, "session help");
	ASSERT_EQ(AGCTL(b, "se", "he"), 0, "se he");
	ASSERT_STREQ(b->out, a->out, "se he = session help");

	/* `s l` is session list (table order decides between session and socket). */
	ASSERT_EQ(AGCTL(a, "-S", NO_DAEMON_SOCKET, "session", "list"), 1, "session list");
	ASSERT_EQ(AGCTL(b, "-S", NO_DAEMON_SOCKET, "s", "l"), 1, "s l");
	ASSERT_STREQ(b->err, a->err, "s l = session list");

	/* No command: the first row (list). */
	ASSERT_EQ(AGCTL(b, "-S", NO_DAEMON_SOCKET, "session"), 1, "session");
	ASSERT_STREQ(b->err, a->err, "session = session list");

	ASSERT_EQ(AGCTL(a, "cgroup", "help"), 0, "cgroup help");
	ASSERT_EQ(AGCTL(b, "c", "h"), 0, "c h");
	ASSERT_STREQ(b->out, a->out, "c h = cgroup help");

	/* A longer word than the command is not a prefix of it. */
	ASSERT_EQ(AGCTL(a, "sessions", "list"), 1, "sessions is no object");
out:
	free(a);
	free(b);
}

static void subtest_no_daemon_error(void)
{
	struct th_agctl_result *r = malloc(sizeof(*r));
	const char *nl;

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	ASSERT_EQ(AGCTL(r, "-S", NO_DAEMON_SOCKET, "session", "list"), 1, "exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: agentgated is not running", "clean error");
	ASSERT_HAS_SUBSTR(r->err, NO_DAEMON_SOCKET, "names the socket");
	nl = strchr(r->err, '\n');
	ASSERT_TRUE(nl && !nl[1], "one line");
	ASSERT_STREQ(r->out, "", "nothing on stdout");

	ASSERT_EQ(AGCTL(r, "-j", "--socket", NO_DAEMON_SOCKET, "cgroup", "list"), 1, "-j exit");
	assert_json_error(r, "agentgated is not running", "-j no daemon");
	ASSERT_STREQ(r->err, "", "-j: nothing on stderr");

	ASSERT_EQ(AGCTL(r, "-S", NO_DAEMON_SOCKET, "run", "--", "true"), 1, "run exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: agentgated is not running", "run: clean error");

	/* audit status asks the daemon (verify and export read the files themselves). */
	ASSERT_EQ(AGCTL(r, "-S", NO_DAEMON_SOCKET, "audit", "status"), 1, "audit status exit");
	ASSERT_HAS_SUBSTR(r->err, "Error: agentgated is not running", "audit status: clean error");
	ASSERT_EQ(AGCTL(r, "-S", NO_DAEMON_SOCKET, "audit", "status", "extra"), 1,
		  "audit status takes no argument");
	ASSERT_HAS_SUBSTR(r->err, "Error: ", "audit status extra: an error");
	free(r);
}

static void subtest_policy_check_ok(void)
{
	static const char *path[] = { "ok", NULL };
	struct th_agctl_result *r = malloc(sizeof(*r));
	char file[PATH_MAX], want[PATH_MAX + 16], errbuf[256];
	yajl_val v;

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	snprintf(file, sizeof(file), "%s/../policies/example.yaml", th_build_dir());
	if (access(file, R_OK)) {
		test__skip("%s: %s", file, strerror(errno));
		free(r);
		return;
	}
	ASSERT_EQ(AGCTL(r, "policy", "check", file), 0, "exit");
	snprintf(want, sizeof(want), "%s: ok (", file);
	ASSERT_HAS_SUBSTR(r->out, want, "FILE: ok (...)");
	ASSERT_HAS_SUBSTR(r->out, " agent", "counts agents");

	ASSERT_EQ(AGCTL(r, "-j", "policy", "check", file), 0, "-j exit");
	v = yajl_tree_parse(r->out, errbuf, sizeof(errbuf));
	if (ASSERT_OK_PTR(v, "-j is JSON")) {
		ASSERT_TRUE(YAJL_IS_TRUE(yajl_tree_get(v, path, yajl_t_any)), "ok: true");
		yajl_tree_free(v);
	}
	free(r);
}

static void subtest_policy_check_bad(void)
{
	static const char bad[] = "apiVersion: agentgate/v1\n"
				  "agents:\n"
				  "  - name: ci\n"
				  "    cgroupp: /agents.slice\n";
	struct th_agctl_result *r = malloc(sizeof(*r));
	char file[] = "/tmp/agctl-bad-XXXXXX.yaml", want[64];
	int fd;

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	fd = mkstemps(file, 5);
	if (!ASSERT_GE(fd, 0, "mkstemps"))
		goto out;
	ASSERT_EQ(write(fd, bad, sizeof(bad) - 1), (long long)sizeof(bad) - 1, "write");
	close(fd);

	ASSERT_EQ(AGCTL(r, "policy", "check", file), 1, "exit");
	snprintf(want, sizeof(want), "Error: %s:4:5: ", file);
	ASSERT_HAS_SUBSTR(r->err, want, "file:line:col");
	ASSERT_HAS_SUBSTR(r->err, "cgroupp", "names the key");
	ASSERT_STREQ(r->out, "", "nothing on stdout");

	ASSERT_EQ(AGCTL(r, "-j", "policy", "check", file), 1, "-j exit");
	assert_json_error(r, ":4:5:", "-j file:line:col");

	ASSERT_EQ(AGCTL(r, "policy", "check", "/nonexistent/policy.yaml"), 1, "missing file exit");
	ASSERT_HAS_SUBSTR(r->err, "/nonexistent/policy.yaml", "names the missing file");
	unlink(file);
out:
	free(r);
}

void test_agctl_cli(void)
{
	if (test__start_subtest("version"))
		subtest_version();
	if (test__start_subtest("help_grammar"))
		subtest_help_grammar();
	if (test__start_subtest("unknown_object"))
		subtest_unknown_object();
	if (test__start_subtest("json_error"))
		subtest_json_error();
	if (test__start_subtest("prefix_matching"))
		subtest_prefix_matching();
	if (test__start_subtest("no_daemon_error"))
		subtest_no_daemon_error();
	if (test__start_subtest("policy_check_ok"))
		subtest_policy_check_ok();
	if (test__start_subtest("policy_check_bad"))
		subtest_policy_check_bad();
}
