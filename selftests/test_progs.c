// SPDX-License-Identifier: GPL-2.0
/*
 * The selftest runner, after the kernel's tools/testing/selftests/bpf/test_progs.c. Every test
 * listed in the generated build/tests.h runs in a forked child (its own process group) so that a
 * crash or a hang fails that test only: the child reports subtest starts and results through a
 * pipe, its stdout/stderr go to a temp file that the parent shows only for failures (or all of it
 * with -v, where nothing is captured). After each child the parent removes what a killed test
 * could leave behind (its cgroups and bpffs pins), since the child's own cleanup did not run.
 * The closing line, alone, is "N passed, N failed, N skipped" for CI.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "helpers.h"
#include "test_progs.h"

#define DEFINE_TEST(name) extern void test_##name(void);
#include "tests.h"
#undef DEFINE_TEST

struct prog_test_def {
	const char *name;
	void (*fn)(void);
};

#define DEFINE_TEST(name) { #name, test_##name },
static const struct prog_test_def prog_tests[] = {
#include "tests.h"
};
#undef DEFINE_TEST

#define NTESTS (sizeof(prog_tests) / sizeof(prog_tests[0]))
#define DEFAULT_TIMEOUT_S 300

/* -t NAME[/SUB]: a test (and subtest) pattern; substring match, or fnmatch() with wildcards. */
struct filter {
	char *test;
	char *sub; /* NULL: every subtest */
};

static struct filter *filters;
static size_t nfilters;
static bool verbose;

enum msg_type { MSG_SUB_START = 1, MSG_SUB_END, MSG_TEST_END };
enum result { RES_OK = 0, RES_FAIL, RES_SKIP };

/* One record on the child→parent pipe; well under PIPE_BUF, so each write is atomic. */
struct msg {
	int type;
	int result;
	int sub_num;
	long log_off;  /* where the capture file stood when this was sent */
	bool top_fail; /* MSG_TEST_END: a failure outside any subtest */
	char name[128];
	char reason[256];
};

/* State of the test running in this (child) process. */
static struct {
	const struct prog_test_def *def;
	int pipe_fd;
	bool captured;
	int sub_num; /* subtests seen so far (filtered out ones included) */
	bool in_sub;
	bool sub_failed, sub_skipped;
	bool test_failed; /* anything failed, in a subtest or not */
	bool top_failed;  /* failed outside any subtest */
	bool top_skipped;
	int nsubs_run;
	char reason[256];
	char sub_reason[256];
} cur;

static const char *result_str(int r)
{
	return r == RES_OK ? "OK" : r == RES_FAIL ? "FAIL" : "SKIP";
}

static bool match(const char *pattern, const char *name)
{
	if (strpbrk(pattern, "*?["))
		return !fnmatch(pattern, name, 0);
	return strstr(name, pattern) != NULL;
}

static bool test_selected(const char *name)
{
	if (!nfilters)
		return true;
	for (size_t i = 0; i < nfilters; i++)
		if (match(filters[i].test, name))
			return true;
	return false;
}

static bool subtest_selected(const char *test, const char *sub)
{
	if (!nfilters)
		return true;
	for (size_t i = 0; i < nfilters; i++) {
		if (!match(filters[i].test, test))
			continue;
		if (!filters[i].sub || match(filters[i].sub, sub))
			return true;
	}
	return false;
}

static int add_filters(const char *arg)
{
	char *dup = strdup(arg), *save = NULL, *tok;

	if (!dup)
		return -ENOMEM;
	for (tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		struct filter *f, *nf = realloc(filters, (nfilters + 1) * sizeof(*filters));
		char *slash;

		if (!nf) {
			free(dup);
			return -ENOMEM;
		}
		filters = nf;
		f = &filters[nfilters++];
		slash = strchr(tok, '/');
		if (slash)
			*slash = '\0';
		f->test = strdup(tok);
		f->sub = slash ? strdup(slash + 1) : NULL;
		if (!f->test || (slash && !f->sub)) {
			free(dup);
			return -ENOMEM;
		}
	}
	free(dup);
	return 0;
}

/* ---- child side: the API of test_progs.h ---- */

static long log_offset(void)
{
	off_t off;

	fflush(stdout);
	fflush(stderr);
	if (!cur.captured)
		return 0;
	off = lseek(STDOUT_FILENO, 0, SEEK_CUR);
	return off < 0 ? 0 : (long)off;
}

static void send_msg(struct msg *m)
{
	ssize_t n;

	m->log_off = log_offset();
	do {
		n = write(cur.pipe_fd, m, sizeof(*m));
	} while (n < 0 && errno == EINTR);
}

static void end_subtest(void)
{
	struct msg m = { .type = MSG_SUB_END, .sub_num = cur.sub_num };

	if (!cur.in_sub)
		return;
	m.result = cur.sub_failed ? RES_FAIL : cur.sub_skipped ? RES_SKIP : RES_OK;
	snprintf(m.reason, sizeof(m.reason), "%s", cur.sub_reason);
	cur.in_sub = false;
	send_msg(&m);
}

void test__end_subtest(void)
{
	end_subtest();
}

bool test__start_subtest(const char *name)
{
	struct msg m = { .type = MSG_SUB_START };

	end_subtest();
	cur.sub_num++;
	if (!subtest_selected(cur.def->name, name))
		return false;
	cur.in_sub = true;
	cur.sub_failed = cur.sub_skipped = false;
	cur.sub_reason[0] = '\0';
	cur.nsubs_run++;
	m.sub_num = cur.sub_num;
	snprintf(m.name, sizeof(m.name), "%s", name);
	send_msg(&m);
	return true;
}

void test__skip(const char *fmt, ...)
{
	char *reason = cur.in_sub ? cur.sub_reason : cur.reason;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(reason, sizeof(cur.reason), fmt, ap);
	va_end(ap);
	if (cur.in_sub)
		cur.sub_skipped = true;
	else
		cur.top_skipped = true;
}

void test__fail(void)
{
	cur.test_failed = true;
	if (cur.in_sub)
		cur.sub_failed = true;
	else
		cur.top_failed = true;
}

bool test__verbose(void)
{
	return verbose;
}

bool test__has_failed(void)
{
	return cur.in_sub ? cur.sub_failed || cur.top_failed : cur.test_failed;
}

static void __attribute__((noreturn))
run_child(const struct prog_test_def *def, int pipe_fd, int log_fd)
{
	struct msg m = { .type = MSG_TEST_END };
	int null_fd;

	setpgid(0, 0);
	signal(SIGPIPE, SIG_IGN);
	null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (null_fd >= 0) {
		dup2(null_fd, STDIN_FILENO);
		close(null_fd);
	}
	if (log_fd >= 0) {
		dup2(log_fd, STDOUT_FILENO);
		dup2(log_fd, STDERR_FILENO);
		close(log_fd);
		cur.captured = true;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	setvbuf(stderr, NULL, _IONBF, 0);
	cur.def = def;
	cur.pipe_fd = pipe_fd;

	def->fn();

	end_subtest();
	if (cur.nsubs_run)
		m.result = cur.test_failed ? RES_FAIL : RES_OK;
	else
		m.result = cur.test_failed ? RES_FAIL : cur.top_skipped ? RES_SKIP : RES_OK;
	if (cur.nsubs_run && !cur.test_failed && cur.top_skipped)
		m.result = RES_SKIP;
	m.top_fail = cur.top_failed;
	snprintf(m.reason, sizeof(m.reason), "%s", cur.reason);
	send_msg(&m);
	/* exit(), not _exit(): atexit handlers (helpers' cleanup) must run. */
	fflush(NULL);
	exit(0);
}

/* ---- parent side ---- */

struct counts {
	int passed, failed, skipped;
};

static void count(struct counts *c, int r)
{
	if (r == RES_OK)
		c->passed++;
	else if (r == RES_FAIL)
		c->failed++;
	else
		c->skipped++;
}

/* Copies bytes [from, to) of the capture file (to < 0: up to its end) to stdout. */
static void dump_log(int log_fd, long from, long to)
{
	char buf[65536];
	long off = from;

	if (log_fd < 0)
		return;
	while (to < 0 || off < to) {
		size_t want = sizeof(buf);
		ssize_t n;

		if (to >= 0 && (size_t)(to - off) < want)
			want = to - off;
		n = pread(log_fd, buf, want, off);
		if (n <= 0)
			break;
		fwrite(buf, 1, n, stdout);
		off += n;
	}
	if (off > from && off > 0) {
		char last;

		if (pread(log_fd, &last, 1, off - 1) == 1 && last != '\n')
			fputc('\n', stdout);
	}
}

/*
 * The failures again, at the end of the run just above the closing line, where a CI log cut to
 * its tail still shows them: each failed test and subtest, with its assertions that failed.
 */
static FILE *summary;
static char *summary_buf;
static size_t summary_len;

static void summary_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void summary_printf(const char *fmt, ...)
{
	va_list ap;

	if (!summary)
		summary = open_memstream(&summary_buf, &summary_len);
	if (!summary)
		return;
	va_start(ap, fmt);
	vfprintf(summary, fmt, ap);
	va_end(ap);
	fputc('\n', summary);
}

static void summary_line(const char *line, size_t len)
{
	summary_printf("  %.*s", (int)len, line);
}

static bool summary_wanted(const char *line)
{
	return strstr(line, ": FAIL ") || !strncmp(line, "runner:", 7);
}

/*
 * The assertion lines (": FAIL ") and runner lines of bytes [from, to) of the capture file. A
 * line longer than the buffer (an assertion prints its whole haystack) is kept cut, its head
 * naming the assertion, and the rest of it skipped.
 */
static void summary_collect(int log_fd, long from, long to)
{
	char buf[8192];
	size_t have = 0;
	long off = from;
	bool skip = false; /* in the tail of a line too long for buf */

	if (log_fd < 0)
		return;
	for (;;) {
		ssize_t n = 0;
		size_t want = sizeof(buf) - 1 - have, start = 0;

		if (to >= 0 && (size_t)(to - off) < want)
			want = to - off;
		if (want)
			n = pread(log_fd, buf + have, want, off);
		if (n <= 0) {
			buf[have] = '\0';
			if (have && !skip && summary_wanted(buf))
				summary_line(buf, have);
			return;
		}
		off += n;
		have += n;
		for (size_t i = 0; i < have; i++) {
			if (buf[i] != '\n')
				continue;
			buf[i] = '\0';
			if (!skip && summary_wanted(buf + start))
				summary_line(buf + start, i - start);
			skip = false;
			start = i + 1;
		}
		if (start == 0 && have == sizeof(buf) - 1) {
			buf[have] = '\0';
			if (!skip && summary_wanted(buf))
				summary_printf("  %.*s ...", 400, buf);
			skip = true;
			start = have;
		}
		memmove(buf, buf + start, have - start);
		have -= start;
	}
}

/*
 * What a test killed mid-way leaves behind: its bpffs pins (removing the last reference to a
 * bpf_link detaches it) and its per-run cgroup. Names follow helpers.c.
 */
static void reap_leftovers(pid_t child)
{
	static const struct {
		const char *dir, *fmt;
	} places[] = {
		{ "/sys/fs/bpf", "agentgate-test-%d-" },
		{ "/tmp", "agentgate-test-%d-" },
	};

	for (size_t i = 0; i < sizeof(places) / sizeof(places[0]); i++) {
		char prefix[64];
		struct dirent *de;
		DIR *d = opendir(places[i].dir);

		if (!d)
			continue;
		snprintf(prefix, sizeof(prefix), places[i].fmt, child);
		while ((de = readdir(d))) {
			char path[PATH_MAX];

			if (strncmp(de->d_name, prefix, strlen(prefix)))
				continue;
			snprintf(path, sizeof(path), "%s/%s", places[i].dir, de->d_name);
			printf("runner: removing leftover %s\n", path);
			th_rm_rf(path);
		}
		closedir(d);
	}
	th_cgroup_reap(child);
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000;
}

static int make_log_file(void)
{
	char path[] = "/tmp/agentgate-test-log-XXXXXX";
	int fd = mkostemp(path, O_CLOEXEC);

	if (fd < 0)
		return -1;
	unlink(path);
	return fd;
}

/* Shows the parts of a failed test's log that no subtest line showed: setup and teardown. */
static void dump_outside_subtests(int log_fd, int nsubs, long first_start, long last_end)
{
	if (!nsubs) {
		dump_log(log_fd, 0, -1);
		return;
	}
	dump_log(log_fd, 0, first_start);
	dump_log(log_fd, last_end, -1);
}

static void summary_outside_subtests(int log_fd, int nsubs, long first_start, long last_end)
{
	if (!nsubs) {
		summary_collect(log_fd, 0, -1);
		return;
	}
	summary_collect(log_fd, 0, first_start);
	summary_collect(log_fd, last_end, -1);
}

static void run_one(int num, const struct prog_test_def *def, long timeout_ms, struct counts *c)
{
	long sub_start = 0, first_start = 0, last_end = 0, deadline;
	int pfd[2], log_fd = -1, status = 0, nsubs = 0;
	bool in_sub = false, got_end = false, reaped = false;
	struct msg m, sub = { 0 }, end = { 0 };
	char why[128] = "";
	pid_t pid;

	if (!verbose) {
		log_fd = make_log_file();
		if (log_fd < 0)
			fprintf(stderr, "runner: cannot create a capture file: %s\n",
				strerror(errno));
	}
	if (pipe2(pfd, O_CLOEXEC)) {
		fprintf(stderr, "runner: pipe: %s\n", strerror(errno));
		goto fail_early;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "runner: fork: %s\n", strerror(errno));
		close(pfd[0]);
		close(pfd[1]);
		goto fail_early;
	}
	if (pid == 0) {
		close(pfd[0]);
		run_child(def, pfd[1], log_fd);
	}
	setpgid(pid, pid);
	close(pfd[1]);

	deadline = now_ms() + timeout_ms;
	for (;;) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		long left = deadline - now_ms();
		ssize_t n;
		int r;

		if (left <= 0) {
			snprintf(why, sizeof(why), "timed out after %ld s", timeout_ms / 1000);
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			break;
		}
		r = poll(&p, 1, left > 200 ? 200 : (int)left);
		if (r < 0)
			continue;
		if (r == 0) {
			/*
			 * Processes the test forked may hold the pipe open after it died: once
			 * it is reaped, read only what is already there.
			 */
			if (reaped)
				break;
			if (waitpid(pid, &status, WNOHANG) == pid)
				reaped = true;
			continue;
		}
		n = read(pfd[0], &m, sizeof(m));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break; /* the child is gone */
		if (n != sizeof(m))
			continue;
		if (m.type == MSG_SUB_START) {
			sub = m;
			in_sub = true;
			sub_start = m.log_off;
			if (!nsubs)
				first_start = m.log_off;
		} else if (m.type == MSG_SUB_END && in_sub) {
			in_sub = false;
			nsubs++;
			last_end = m.log_off;
			if (m.result == RES_FAIL) {
				dump_log(log_fd, sub_start, m.log_off);
				summary_printf("#%d/%d %s/%s:FAIL", num, sub.sub_num, def->name,
					       sub.name);
				summary_collect(log_fd, sub_start, m.log_off);
			}
			printf("#%d/%d %s/%s:%s%s%s\n", num, sub.sub_num, def->name, sub.name,
			       result_str(m.result), m.reason[0] ? " " : "", m.reason);
			count(c, m.result);
		} else if (m.type == MSG_TEST_END) {
			end = m;
			got_end = true;
			break;
		}
	}
	close(pfd[0]);

	/* After TEST_END the child still runs its atexit cleanup: bounded by the same deadline. */
	while (!reaped) {
		pid_t w = waitpid(pid, &status, WNOHANG);

		if (w == pid || (w < 0 && errno != EINTR))
			break;
		if (now_ms() >= deadline) {
			if (!why[0])
				snprintf(why, sizeof(why), "timed out after %ld s (in cleanup)",
					 timeout_ms / 1000);
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			break;
		}
		usleep(5000);
	}
	/* Whatever the test spawned and left running in its process group goes too. */
	kill(-pid, SIGKILL);

	if (!why[0]) {
		if (WIFSIGNALED(status))
			snprintf(why, sizeof(why), "crashed: %s", strsignal(WTERMSIG(status)));
		else if (WIFEXITED(status) && WEXITSTATUS(status))
			snprintf(why, sizeof(why), "exited with status %d", WEXITSTATUS(status));
		else if (!got_end)
			snprintf(why, sizeof(why), "exited before finishing");
	}

	if (!why[0]) {
		if (end.result == RES_FAIL) {
			dump_outside_subtests(log_fd, nsubs, first_start, last_end);
			if (!nsubs || end.top_fail) {
				summary_printf("#%d %s:FAIL", num, def->name);
				summary_outside_subtests(log_fd, nsubs, first_start, last_end);
			}
		}
		printf("#%d %s:%s%s%s\n", num, def->name, result_str(end.result),
		       end.reason[0] ? " " : "", end.reason);
		if (!nsubs)
			count(c, end.result);
		else if (end.top_fail)
			c->failed++; /* a failure outside every subtest is one more result */
		goto out;
	}

	/* Crashed, hung, or died in cleanup: the subtest cut short fails, and so does the test. */
	if (in_sub) {
		if (!nsubs)
			dump_log(log_fd, 0, sub_start);
		dump_log(log_fd, sub_start, -1);
		printf("#%d/%d %s/%s:FAIL\n", num, sub.sub_num, def->name, sub.name);
		summary_printf("#%d/%d %s/%s:FAIL (%s)", num, sub.sub_num, def->name, sub.name,
			       why);
		summary_collect(log_fd, sub_start, -1);
		count(c, RES_FAIL);
		nsubs++;
	} else {
		dump_outside_subtests(log_fd, nsubs, first_start, last_end);
		summary_printf("#%d %s:FAIL (%s)", num, def->name, why);
		summary_outside_subtests(log_fd, nsubs, first_start, last_end);
		if (nsubs)
			c->failed++;
	}
	printf("runner: %s: %s\n", def->name, why);
	printf("#%d %s:FAIL\n", num, def->name);
	if (!nsubs)
		c->failed++;
	reap_leftovers(pid);
out:
	fflush(stdout);
	if (log_fd >= 0)
		close(log_fd);
	return;

fail_early:
	printf("#%d %s:FAIL\n", num, def->name);
	summary_printf("#%d %s:FAIL (could not start it)", num, def->name);
	c->failed++;
	if (log_fd >= 0)
		close(log_fd);
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"Usage: %s [-v] [-l] [-t NAME[/SUB][,...]]...\n"
		"  -t NAME[/SUB]  run tests (and subtests) whose name contains NAME (SUB);\n"
		"                 '*', '?' and '[' make it a glob; comma-separated, repeatable\n"
		"  -v             show all output, not only that of failures\n"
		"  -l             list the tests\n"
		"Environment: AG_TEST_TIMEOUT=SECONDS per test (default %d)\n",
		prog, DEFAULT_TIMEOUT_S);
}

int main(int argc, char **argv)
{
	struct counts c = { 0 };
	long timeout_ms = DEFAULT_TIMEOUT_S * 1000L;
	bool list = false;
	const char *env;
	int opt;

	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);
	while ((opt = getopt(argc, argv, "t:vlh")) != -1) {
		switch (opt) {
		case 't':
			if (add_filters(optarg)) {
				fprintf(stderr, "out of memory\n");
				return 1;
			}
			break;
		case 'v':
			verbose = true;
			break;
		case 'l':
			list = true;
			break;
		case 'h':
			usage(argv[0]);
			return 0;
		default:
			usage(argv[0]);
			return 1;
		}
	}
	if (optind < argc) {
		usage(argv[0]);
		return 1;
	}
	env = getenv("AG_TEST_TIMEOUT");
	if (env && *env) {
		char *end;
		long v = strtol(env, &end, 10);

		if (*end || v <= 0) {
			fprintf(stderr, "AG_TEST_TIMEOUT: not a positive number of seconds: %s\n",
				env);
			return 1;
		}
		timeout_ms = v * 1000L;
	}

	for (size_t i = 0; i < NTESTS; i++) {
		if (!test_selected(prog_tests[i].name))
			continue;
		if (list) {
			printf("%s\n", prog_tests[i].name);
			continue;
		}
		run_one((int)i + 1, &prog_tests[i], timeout_ms, &c);
	}
	if (list)
		return 0;
	if (summary && !fclose(summary) && summary_len)
		printf("---- failures ----\n%s", summary_buf);
	free(summary_buf);
	printf("%d passed, %d failed, %d skipped\n", c.passed, c.failed, c.skipped);
	return c.failed ? 1 : 0;
}
