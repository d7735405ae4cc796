// SPDX-License-Identifier: GPL-2.0
/*
 * The runner's and helpers' own checks, with no daemon and no BPF: if these fail, every
 * end-to-end result after them is suspect. Cgroups are made and removed (leftover processes
 * killed), and each loopback server is checked against a plain client.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cgroup.h"
#include "../helpers.h"
#include "../test_progs.h"

struct cg_check {
	char rel[256];
};

/* Runs in the spawned child: is it really in the cgroup it was spawned into? */
static int check_own_cgroup(void *arg)
{
	struct cg_check *c = arg;
	char mine[256];

	if (ag_cgroup_of_pid(0, mine, sizeof(mine)))
		return 2;
	return strcmp(mine, c->rel) ? 1 : 0;
}

static int sleep_forever(void *arg)
{
	for (int i = 0; i < 600; i++)
		sleep(1);
	return 0;
}

static void subtest_cgroup(void)
{
	struct cg_check c;
	char abs[512], base[512];
	struct stat st;
	pid_t pid;
	int rc;

	if (!ASSERT_OK(th_cgroup_create("smoke/nested", c.rel, sizeof(c.rel)), "create"))
		return;
	if (!ASSERT_OK(th_cgroup_abs(c.rel, abs, sizeof(abs)), "abs"))
		return;
	ASSERT_OK(stat(abs, &st), "cgroup dir exists");
	ASSERT_HAS_SUBSTR(c.rel, "/agentgate-test-", "per-run root");

	pid = th_spawn_in_cgroup(c.rel, check_own_cgroup, &c);
	if (!ASSERT_GT(pid, 0, "spawn"))
		return;
	rc = th_wait(pid, 5000);
	ASSERT_EQ(rc, 0, "child runs in its cgroup");

	/* A process left behind is killed by the cleanup, and every dir goes. */
	pid = th_spawn_in_cgroup(c.rel, sleep_forever, NULL);
	if (!ASSERT_GT(pid, 0, "spawn sleeper"))
		return;
	usleep(50000);
	snprintf(base, sizeof(base), "%s", abs);
	*strstr(base, "/smoke") = '\0';
	th_cgroup_cleanup();
	ASSERT_ERR(stat(abs, &st), "cgroup removed");
	ASSERT_ERR(stat(base, &st), "per-run root removed");
	rc = th_wait(pid, 5000);
	ASSERT_EQ(rc, 128 + SIGKILL, "leftover process killed");
	th_cgroup_cleanup(); /* idempotent */
}

static void subtest_prng(void)
{
	uint8_t a[1000], b[1000], h1[32], h2[32];
	struct th_prng p;
	size_t off = 0, step = 1;

	th_prng_init(&p, 42);
	th_prng_fill(&p, a, sizeof(a));
	th_prng_init(&p, 42);
	while (off < sizeof(b)) {
		size_t n = step < sizeof(b) - off ? step : sizeof(b) - off;

		th_prng_fill(&p, b + off, n);
		off += n;
		step = step % 13 + 1;
	}
	ASSERT_OK(memcmp(a, b, sizeof(a)), "same stream however cut");
	ASSERT_OK(th_sha256(a, sizeof(a), h1), "sha256");
	ASSERT_OK(th_prng_sha256(42, sizeof(a), h2), "prng sha256");
	ASSERT_OK(memcmp(h1, h2, 32), "hashes agree");
}

static void echo_roundtrip(int family, const char *addr)
{
	struct th_server *s = th_server_start(TH_SRV_ECHO, family, addr);
	struct th_xfer x;
	char msg[] = "hello, agentgate", buf[64] = "";
	int fd = -1;

	if (!ASSERT_OK_PTR(s, "echo server"))
		return;
	fd = th_connect(family, addr, th_server_port(s), 2000);
	if (!ASSERT_GE(fd, 0, "connect"))
		goto out;
	ASSERT_OK(th_send_all(fd, msg, sizeof(msg), 2000), "send");
	ASSERT_EQ(th_recv_all(fd, buf, sizeof(msg), 2000), sizeof(msg), "recv");
	ASSERT_STREQ(buf, msg, "echoed");
	close(fd);

	fd = th_connect(family, addr, th_server_port(s), 2000);
	if (!ASSERT_GE(fd, 0, "connect 2"))
		goto out;
	if (ASSERT_OK(th_xfer(fd, 8 << 20, 7, 20000, &x), "8 MB through echo")) {
		ASSERT_EQ(x.bytes_out, 8 << 20, "sent");
		ASSERT_EQ(x.bytes_in, 8 << 20, "received");
		ASSERT_OK(memcmp(x.sha_in, x.sha_out, 32), "same bytes back");
	}
	ASSERT_EQ(th_server_accepted(s), 2, "accepted");
out:
	if (fd >= 0)
		close(fd);
	th_server_stop(s);
}

static void subtest_sink(void)
{
	const uint64_t down = 5 << 20, up = 3 << 20;
	struct th_server *s = th_server_sink(AF_INET, "127.0.0.3", down, 1234);
	uint8_t want_in[32], want_out[32];
	struct th_report r;
	struct th_xfer x;
	int fd = -1;

	if (!ASSERT_OK_PTR(s, "sink server"))
		return;
	fd = th_connect(AF_INET, "127.0.0.3", th_server_port(s), 2000);
	if (!ASSERT_GE(fd, 0, "connect"))
		goto out;
	if (!ASSERT_OK(th_xfer(fd, up, 99, 20000, &x), "xfer"))
		goto out;
	th_prng_sha256(1234, down, want_in);
	th_prng_sha256(99, up, want_out);
	ASSERT_EQ(x.bytes_in, down, "client received");
	ASSERT_OK(memcmp(x.sha_in, want_in, 32), "client got the sink's stream");
	ASSERT_OK(memcmp(x.sha_out, want_out, 32), "client sent its stream");
	if (!ASSERT_OK(th_server_wait_reports(s, 1, 5000), "report"))
		goto out;
	ASSERT_OK(th_server_report(s, 0, &r), "report 0");
	ASSERT_EQ(r.error, 0, "no error");
	ASSERT_EQ(r.bytes_in, up, "sink received");
	ASSERT_OK(memcmp(r.sha_in, want_out, 32), "sink hash");
	ASSERT_EQ(r.bytes_out, down, "sink sent");
	ASSERT_OK(memcmp(r.sha_out, want_in, 32), "sink sent its stream");
	ASSERT_STREQ(r.peer, "127.0.0.1", "peer address");
out:
	if (fd >= 0)
		close(fd);
	th_server_stop(s);
}

static void subtest_halfclose(void)
{
	struct th_server *s = th_server_start(TH_SRV_HALFCLOSE, AF_INET6, "::1");
	char buf[256] = "", want[256], hex[65];
	uint8_t data[1000], sha[32];
	ssize_t n;
	int fd = -1;

	if (!ASSERT_OK_PTR(s, "half-close server"))
		return;
	memset(data, 'x', sizeof(data));
	th_sha256(data, sizeof(data), sha);
	th_hex(sha, 32, hex);
	snprintf(want, sizeof(want), "ok 1000 %s\n", hex);
	fd = th_connect(AF_INET6, "::1", th_server_port(s), 2000);
	if (!ASSERT_GE(fd, 0, "connect"))
		goto out;
	ASSERT_OK(th_send_all(fd, data, sizeof(data), 2000), "send");
	ASSERT_OK(shutdown(fd, SHUT_WR), "shutdown");
	n = th_recv_all(fd, buf, sizeof(buf) - 1, 5000);
	ASSERT_EQ(n, strlen(want), "reply length");
	ASSERT_STREQ(buf, want, "reply after EOF");
out:
	if (fd >= 0)
		close(fd);
	th_server_stop(s);
}

static void subtest_reset_refused(void)
{
	struct th_server *s = th_server_start(TH_SRV_RESET, AF_INET, "127.0.0.2");
	char buf[16];
	int fd, port;
	ssize_t n;

	if (!ASSERT_OK_PTR(s, "reset server"))
		return;
	/* The reset may come before the connect is checked (SO_ERROR), or at the first read. */
	fd = th_connect(AF_INET, "127.0.0.2", th_server_port(s), 2000);
	if (fd == -ECONNRESET) {
		ASSERT_EQ(fd, -ECONNRESET, "reset seen at connect");
	} else if (ASSERT_GE(fd, 0, "connect")) {
		n = th_recv_all(fd, buf, sizeof(buf), 5000);
		ASSERT_EQ(n, -ECONNRESET, "reset seen");
		close(fd);
	}
	port = th_server_port(s);
	th_server_stop(s);
	/* Nobody listens there any more. */
	fd = th_connect(AF_INET, "127.0.0.2", port, 2000);
	ASSERT_EQ(fd, -ECONNREFUSED, "refused");
	if (fd >= 0)
		close(fd);
}

static void subtest_run(void)
{
	char out[64];

	ASSERT_EQ(th_run(out, sizeof(out), "echo hi"), 0, "echo");
	ASSERT_STREQ(out, "hi\n", "stdout captured");
	ASSERT_EQ(th_run(NULL, 0, "false"), 1, "exit code");
}

static void subtest_json(void)
{
	yajl_val v = th_json_parse("{\"a\": \"b\", \"n\": 42, \"o\": {\"x\": [1]}}");
	long long n = 0;

	if (!ASSERT_OK_PTR(v, "parse"))
		return;
	ASSERT_STREQ(th_json_str(v, "a"), "b", "string");
	ASSERT_TRUE(th_json_int(v, "n", &n) && n == 42, "integer");
	ASSERT_OK_PTR(th_json_get(v, "o"), "object");
	ASSERT_FALSE(th_json_str(v, "n"), "not a string");
	yajl_tree_free(v);
}

void test_runner_selftest(void)
{
	if (test__start_subtest("cgroup"))
		subtest_cgroup();
	if (test__start_subtest("prng"))
		subtest_prng();
	if (test__start_subtest("echo_ipv4"))
		echo_roundtrip(AF_INET, "127.0.0.2");
	if (test__start_subtest("echo_ipv6"))
		echo_roundtrip(AF_INET6, "::1");
	if (test__start_subtest("sink_hash"))
		subtest_sink();
	if (test__start_subtest("half_close"))
		subtest_halfclose();
	if (test__start_subtest("reset_refused"))
		subtest_reset_refused();
	if (test__start_subtest("run"))
		subtest_run();
	if (test__start_subtest("json"))
		subtest_json();
	th_cgroup_cleanup();
}
