// SPDX-License-Identifier: GPL-2.0
/*
 * The data path end to end: processes in a tagged cgroup (and below it, even in cgroups made
 * after the daemon started) are redirected into agentgated, which reports who they are and
 * where they were going exactly as the kernel saw it; untagged processes are untouched; the
 * relay keeps bytes intact under load, for large transfers and across half-closes; refusal and
 * reset upstream reach the agent; the daemon's own upstream sockets never loop back into it.
 * Each test runs its own daemon, cgroups and loopback servers (see gate.h).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/io_uring.h>
#include <linux/types.h>
#include <bpf/bpf.h>

#include "agentgate.h"
#include "cgroup.h"
#include "pins.h"
#include "../gate.h"
#include "../test_progs.h"

#define MB (1024ull * 1024)

/* A port on addr that nothing listens on (bound once, then closed). */
static int closed_port(const char *addr)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	inet_pton(AF_INET, addr, &sin.sin_addr);
	if (fd < 0)
		return -1;
	if (!bind(fd, (struct sockaddr *)&sin, sizeof(sin)) &&
	    !getsockname(fd, (struct sockaddr *)&sin, &sl))
		port = ntohs(sin.sin_port);
	close(fd);
	return port;
}

/*
 * Runs one short echo exchange from cgroup cg and tells whether it went through the gateway:
 * the server saw a peer port other than the client's own (1), the same (0), or none (-1).
 */
static int via_gateway(struct th_server *srv, const char *cg, struct th_job *j)
{
	int before = th_server_accepted(srv), rc, peer;

	rc = th_job_in(cg, j, 10000);
	if (!ASSERT_EQ(rc, 0, "echo exchange"))
		return -1;
	if (!ASSERT_EQ(th_server_accepted(srv), before + 1, "server accepted one connection"))
		return -1;
	peer = th_server_peer_port(srv, before);
	return peer != j->local_port;
}

static void subtest_tagged(struct th_gate *g, int family, const char *addr, struct th_server *srv,
			   const char *target, const char *orig_dst, const char *orig_dst_alt,
			   const char *comm)
{
	struct th_job *j = th_job_new(family, addr, th_server_port(srv));
	yajl_val end = NULL;
	long long up = -1, down = -1;

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	snprintf(j->comm, sizeof(j->comm), "%s", comm);
	j->uid = 4242;
	j->gid = 4343;
	if (!ASSERT_EQ(via_gateway(srv, g->tagged, j), 1, "redirected through the gateway"))
		goto out;
	th_check_session_start(g, j->pid, target, orig_dst, orig_dst_alt, g->tagged, comm, 4242);

	/* The end record counts what the relay carried: the one line each way. */
	end = th_daemon_wait_event(&g->d, "end", "pid", j->pid, 0, 5000);
	if (ASSERT_OK_PTR(end, "session end logged")) {
		ASSERT_TRUE(th_json_int(end, "bytes_up", &up), "bytes_up");
		ASSERT_TRUE(th_json_int(end, "bytes_down", &down), "bytes_down");
		ASSERT_EQ(up, j->x.bytes_out, "bytes_up counts what the agent sent");
		ASSERT_EQ(down, j->x.bytes_in, "bytes_down counts what the agent got");
	}
	yajl_tree_free(end);
out:
	th_job_free(j);
}

static void subtest_untagged(struct th_gate *g)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	ASSERT_EQ(via_gateway(g->echo4, g->untagged, j), 0, "untagged goes direct");
	/* The daemon never heard of it (give a wrongly redirected one time to show up). */
	usleep(300 * 1000);
	ASSERT_EQ(th_daemon_count_events(&g->d, "start", "pid", j->pid), 0, "no session");
	ASSERT_EQ(th_daemon_count_events(&g->d, "deny", "pid", j->pid), 0, "no deny");
	th_job_free(j);
}

static void subtest_child_cgroup(struct th_gate *g)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
	struct th_cg_progs progs;
	char late[512], name[300], dst[64];

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	/* Made now, after the daemon attached to its ancestor: inherited, nothing attached. */
	snprintf(name, sizeof(name), "%s/late/deeper", strrchr(g->tagged, '/') + 1);
	if (!ASSERT_OK(th_cgroup_create(name, late, sizeof(late)), "create child cgroup"))
		goto out;
	snprintf(j->comm, sizeof(j->comm), "ag-late");
	if (!ASSERT_EQ(via_gateway(g->echo4, late, j), 1, "child cgroup redirected"))
		goto out;
	snprintf(dst, sizeof(dst), "127.0.0.2:%d", th_server_port(g->echo4));
	th_check_session_start(g, j->pid, "echo", dst, NULL, late, "ag-late", 0);
	if (ASSERT_OK(th_cgroup_progs(late, &progs), "bpftool cgroup show"))
		ASSERT_EQ(progs.total, 0, "nothing attached to the child itself");
out:
	th_job_free(j);
}

/* The agent must see a reset: ECONNRESET on read, or EPIPE when its write came after it. */
static void expect_reset(struct th_gate *g, const char *what, const char *addr, int port)
{
	struct th_job *j = th_job_new(AF_INET, addr, port);
	int rc;

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	snprintf(j->comm, sizeof(j->comm), "ag-%s", what);
	rc = th_job_in(g->tagged, j, 15000);
	ASSERT_EQ(rc, 1, "exchange failed");
	/* The reset may already be there when a non-blocking connect is checked. */
	ASSERT_TRUE(j->connect_err == 0 || j->connect_err == -ECONNRESET,
		    "connect reached the gateway");
	if (j->first_error == EBADMSG)
		printf("%s: the agent got a clean EOF, not a reset\n", what);
	ASSERT_TRUE(j->first_error == ECONNRESET || j->first_error == EPIPE,
		    "agent sees the reset");
	th_job_free(j);
}

static void subtest_unknown_target(struct th_gate *g)
{
	struct th_server *other = th_server_start(TH_SRV_ECHO, AF_INET, "127.0.0.3");
	struct th_job *j = NULL;
	yajl_val ev = NULL;

	if (!ASSERT_OK_PTR(other, "server outside the policy"))
		return;
	j = th_job_new(AF_INET, "127.0.0.3", th_server_port(other));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	ASSERT_EQ(th_job_in(g->tagged, j, 15000), 1, "exchange refused");
	ASSERT_TRUE(j->first_error == ECONNRESET || j->first_error == EPIPE, "agent sees a reset");
	ASSERT_EQ(th_server_accepted(other), 0, "nothing reached the server");
	ev = th_daemon_wait_event(&g->d, "deny", "pid", j->pid, 0, 5000);
	if (ASSERT_OK_PTR(ev, "deny logged"))
		ASSERT_OK_PTR(th_json_str(ev, "reason"), "deny has a reason");
	yajl_tree_free(ev);
out:
	th_job_free(j);
	th_server_stop(other);
}

/* Straight at the gateway's own listener: from a tagged cgroup it is no target (no loop); from
 * an untagged one there is no kernel identity. Either way nothing is relayed. */
static void subtest_to_listener(struct th_gate *g, const char *cg, bool tagged)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.1", g->d.port);
	yajl_val ev = NULL;

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	snprintf(j->comm, sizeof(j->comm), "ag-direct");
	ASSERT_NEQ(th_job_in(cg, j, 15000), 0, "refused");
	ASSERT_TRUE(j->first_error == ECONNRESET || j->first_error == EPIPE,
		    "the agent sees a reset");
	if (tagged) {
		ev = th_daemon_wait_event(&g->d, "deny", "pid", j->pid, 0, 5000);
		ASSERT_OK_PTR(ev, "deny logged");
		ASSERT_EQ(th_daemon_count_events(&g->d, "start", "pid", j->pid), 0,
			  "no session started");
		yajl_tree_free(ev);
	}
	ASSERT_OK(kill(g->d.pid, 0), "daemon still runs");
	/* And it still serves. */
	j->first_error = j->bad = 0;
	j->port = th_server_port(g->echo4);
	snprintf(j->addr, sizeof(j->addr), "127.0.0.2");
	ASSERT_EQ(th_job_in(g->tagged, j, 15000), 0, "gateway still relays");
	th_job_free(j);
}

/* Ways around connect(): TCP Fast Open (sendto) and an MPTCP socket. */
struct bypass {
	int port;
	int protocol; /* IPPROTO_TCP or IPPROTO_MPTCP */
	bool fastopen;
	int socket_err;
	int connect_err;
	int local_port;
	bool echoed;
};

static int bypass_child(void *arg)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	struct bypass *b = arg;
	char msg[] = "around?", back[sizeof(msg)];
	socklen_t sl = sizeof(sin);
	int fd;

	sin.sin_port = htons(b->port);
	inet_pton(AF_INET, "127.0.0.2", &sin.sin_addr);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, b->protocol);
	if (fd < 0) {
		b->socket_err = -errno;
		return 0;
	}
	if (b->fastopen) {
		if (sendto(fd, msg, sizeof(msg), MSG_FASTOPEN, (struct sockaddr *)&sin,
			   sizeof(sin)) < 0) {
			b->connect_err = -errno;
			goto out;
		}
	} else {
		if (connect(fd, (struct sockaddr *)&sin, sizeof(sin))) {
			b->connect_err = -errno;
			goto out;
		}
		if (th_send_all(fd, msg, sizeof(msg), 5000))
			goto out;
	}
	if (!getsockname(fd, (struct sockaddr *)&sin, &sl))
		b->local_port = ntohs(sin.sin_port);
	b->echoed = th_recv_all(fd, back, sizeof(back), 5000) == sizeof(back) &&
		    !memcmp(back, msg, sizeof(msg));
out:
	close(fd);
	return 0;
}

/* Whatever the way, a tagged connection is refused or goes through the gateway, never direct. */
static void subtest_bypass(struct th_gate *g, int protocol, bool fastopen)
{
	struct bypass *b = th_shared_alloc(sizeof(*b));
	int before = th_server_accepted(g->echo4);
	pid_t pid;

	if (!ASSERT_OK_PTR(b, "shared"))
		return;
	memset(b, 0, sizeof(*b));
	b->port = th_server_port(g->echo4);
	b->protocol = protocol;
	b->fastopen = fastopen;
	pid = th_spawn_in_cgroup(g->tagged, bypass_child, b);
	ASSERT_EQ(th_wait(pid, 20000), 0, "child");
	if (b->socket_err) {
		test__skip("socket: %s", strerror(-b->socket_err));
		goto out;
	}
	printf("connect %d (%s), echoed %d, local port %d, server peers:", b->connect_err,
	       strerror(-b->connect_err), b->echoed, b->local_port);
	for (int i = before; i < th_server_accepted(g->echo4); i++)
		printf(" %d", th_server_peer_port(g->echo4, i));
	printf("\n");
	for (int i = before; i < th_server_accepted(g->echo4); i++)
		ASSERT_NEQ(th_server_peer_port(g->echo4, i), b->local_port, "not direct");
	if (b->connect_err)
		ASSERT_TRUE(b->connect_err == -EPERM || b->connect_err == -ECONNREFUSED,
			    "refused in the kernel");
	else if (ASSERT_TRUE(b->echoed, "relayed"))
		ASSERT_EQ(th_server_accepted(g->echo4), before + 1, "through the gateway");
out:
	th_shared_free(b, sizeof(*b));
}

/*
 * The SO_MARK check on its own: the daemon moved into a tagged cgroup (which it refuses to tag
 * at start) still reaches the target directly, once per agent connection.
 */
static void subtest_own_upstream(struct th_gate *g)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
	char gw[512], name[300], home[512] = "";
	int before;

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	snprintf(name, sizeof(name), "%s/gw", strrchr(g->tagged, '/') + 1);
	if (!ASSERT_OK(th_cgroup_create(name, gw, sizeof(gw)), "gateway cgroup"))
		goto out;
	if (!ASSERT_OK(ag_cgroup_of_pid(g->d.pid, home, sizeof(home)), "daemon's cgroup"))
		goto out;
	if (!ASSERT_OK(ag_cgroup_move(th_cgroup_mount(), gw, g->d.pid), "move daemon"))
		goto out;
	before = th_server_accepted(g->echo4);
	j->nconns = 3;
	ASSERT_EQ(th_job_in(g->tagged, j, 15000), 0, "echo through a tagged daemon");
	ASSERT_EQ(th_server_accepted(g->echo4), before + 3, "one upstream per connection");
	usleep(300 * 1000);
	ASSERT_EQ(th_daemon_count_events(&g->d, "start", "pid", j->pid), 3, "three sessions");
	ASSERT_EQ(th_daemon_count_events(&g->d, "start", "pid", g->d.pid), 0,
		  "none from the daemon itself");
	ASSERT_EQ(th_daemon_count_events(&g->d, "deny", "pid", g->d.pid), 0,
		  "no deny of the daemon itself");
out:
	if (home[0])
		ag_cgroup_move(th_cgroup_mount(), home, g->d.pid);
	th_job_free(j);
}

void test_datapath_redirect(void)
{
	struct th_gate g;
	char dst[64], dst_alt[64];
	int p4;

	if (!ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;
	p4 = th_server_port(g.echo4);

	if (test__start_subtest("tagged_ipv4")) {
		snprintf(dst, sizeof(dst), "127.0.0.2:%d", p4);
		subtest_tagged(&g, AF_INET, "127.0.0.2", g.echo4, "echo", dst, NULL, "ag-v4");
	}
	if (test__start_subtest("tagged_ipv6")) {
		snprintf(dst, sizeof(dst), "[::1]:%d", th_server_port(g.echo6));
		subtest_tagged(&g, AF_INET6, "::1", g.echo6, "echo6", dst, NULL, "ag-v6");
	}
	if (test__start_subtest("tagged_ipv4_mapped")) {
		/* Either spelling is the truth; the target must be the IPv4 one either way. */
		snprintf(dst, sizeof(dst), "127.0.0.2:%d", p4);
		snprintf(dst_alt, sizeof(dst_alt), "[::ffff:127.0.0.2]:%d", p4);
		subtest_tagged(&g, AF_INET6, "::ffff:127.0.0.2", g.echo4, "echo", dst, dst_alt,
			       "ag-mapped");
	}
	if (test__start_subtest("untagged_untouched"))
		subtest_untagged(&g);
	if (test__start_subtest("child_cgroup_after_start"))
		subtest_child_cgroup(&g);
	if (test__start_subtest("unknown_target_denied"))
		subtest_unknown_target(&g);
	if (test__start_subtest("tcp_fastopen_not_direct"))
		subtest_bypass(&g, IPPROTO_TCP, true);
	if (test__start_subtest("mptcp_not_direct"))
		subtest_bypass(&g, IPPROTO_MPTCP, false);
	if (test__start_subtest("tagged_to_listener_no_loop"))
		subtest_to_listener(&g, g.tagged, true);
	if (test__start_subtest("untagged_to_listener_refused"))
		subtest_to_listener(&g, g.untagged, false);
	if (test__start_subtest("own_upstream_not_looped"))
		subtest_own_upstream(&g);
out:
	test__end_subtest();
	th_gate_cleanup(&g);
}

/* ---- the relay ---- */

#define NJOBS 4
#define CONNS_PER_JOB 50

static void subtest_concurrent(struct th_gate *g, uint64_t bytes, size_t max_chunk)
{
	struct th_job *jobs[NJOBS] = { 0 };
	pid_t pids[NJOBS];
	int before = th_server_accepted(g->echo4), total = 0;

	for (int i = 0; i < NJOBS; i++) {
		jobs[i] = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
		if (!ASSERT_OK_PTR(jobs[i], "job"))
			goto out;
		jobs[i]->nconns = CONNS_PER_JOB;
		jobs[i]->up_bytes = bytes;
		jobs[i]->max_chunk = max_chunk;
		jobs[i]->seed = 1000 * (i + 1);
		jobs[i]->timeout_ms = 120000;
		jobs[i]->hold_ms = 0;
	}
	/* All jobs at once: NJOBS * CONNS_PER_JOB sessions open together. */
	for (int i = 0; i < NJOBS; i++)
		pids[i] = th_spawn_in_cgroup(g->tagged, th_job_run, jobs[i]);
	for (int i = 0; i < NJOBS; i++) {
		int rc = pids[i] > 0 ? th_wait(pids[i], 150000) : pids[i];

		if (!ASSERT_EQ(rc, 0, "job"))
			printf("job %d: %d connected, %d bad, first error %s\n", i,
			       jobs[i]->nconnected, jobs[i]->bad, strerror(jobs[i]->first_error));
		total += jobs[i]->nconnected - jobs[i]->bad;
	}
	ASSERT_EQ(total, NJOBS * CONNS_PER_JOB, "connections intact");
	ASSERT_EQ(th_server_accepted(g->echo4) - before, NJOBS * CONNS_PER_JOB,
		  "server accepted each once");
	for (int i = 0; i < NJOBS; i++) {
		int n = 0;

		for (int t = 0; t < 50 && n < CONNS_PER_JOB; t++) {
			n = th_daemon_count_events(&g->d, "end", "pid", jobs[i]->pid);
			if (n < CONNS_PER_JOB)
				usleep(100 * 1000);
		}
		ASSERT_EQ(n, CONNS_PER_JOB, "sessions logged per process");
	}
out:
	for (int i = 0; i < NJOBS; i++)
		th_job_free(jobs[i]);
}

/* Open descriptors of process pid, or -1. */
static int fd_count(pid_t pid)
{
	char path[64];
	struct dirent *e;
	int n = 0;
	DIR *dir;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	dir = opendir(path);
	if (!dir)
		return -1;
	while ((e = readdir(dir)))
		n += e->d_name[0] != '.';
	closedir(dir);
	return n;
}

#define IDLE_CONNS 300

/*
 * Sessions that moved data and went idle hold their two sockets and nothing else: a raw
 * relay's pipes go back to the worker once empty (10,000 idle sessions must fit in 20,000
 * open files). They are taken again when data flows.
 */
static void subtest_idle_no_pipes(struct th_gate *g)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
	int base = fd_count(g->d.pid), held = -1, rc;
	pid_t pid;

	if (!ASSERT_OK_PTR(j, "job") || !ASSERT_GT(base, 0, "daemon fds"))
		goto out;
	j->nconns = IDLE_CONNS;
	j->expect_echo = true; /* a line each way, spliced through the relay's pipes */
	j->hold_ms = 30000;
	j->again = true;
	j->timeout_ms = 60000;
	pid = th_spawn_in_cgroup(g->tagged, th_job_run, j);
	if (!ASSERT_GT(pid, 0, "spawn"))
		goto out;
	for (int t = 0; t < 3000 && !j->ready; t++)
		usleep(10 * 1000);
	if (ASSERT_EQ(j->ready, 1, "all exchanged, holding")) {
		/* The last sessions' pipes are given back as their echoes finish. */
		for (int t = 0; t < 100; t++) {
			held = fd_count(g->d.pid);
			if (held <= base + 2 * IDLE_CONNS + 32 + 16)
				break;
			usleep(50 * 1000);
		}
		if (!ASSERT_LE(held, base + 2 * IDLE_CONNS + 32 + 16,
			       "idle sessions hold two fds each (plus the worker's pipes)"))
			printf("daemon fds: %d before, %d with %d idle sessions\n", base, held,
			       IDLE_CONNS);
	}
	j->release = 1;
	rc = th_wait(pid, 90000);
	if (!ASSERT_EQ(rc, 0, "every connection echoes again after the idle time"))
		printf("%d bad, first error %s\n", j->bad, strerror(j->first_error));
out:
	th_job_free(j);
}

/* up bytes to a sink that sends down bytes: both streams hash-compared at the far end. */
static void transfer_check(struct th_gate *g, uint64_t up, uint64_t down, size_t max_chunk,
			   bool early_eof, int timeout_ms)
{
	struct th_server *sink = th_server_sink(AF_INET, "127.0.0.3", down, 0xdecaf);
	uint8_t want_down[32], want_up[32];
	struct th_job *j = NULL;
	struct th_report r;
	yajl_val end = NULL;
	long long v = -1;

	if (!ASSERT_OK_PTR(sink, "sink"))
		return;
	/* The sink's port is only known now: extend the policy and reload. */
	{
		char port[32], pol[8192];
		const char *extra[] = { "sink", port, NULL };

		snprintf(port, sizeof(port), "127.0.0.3:%d", th_server_port(sink));
		if (!ASSERT_OK(th_gate_policy(g, pol, sizeof(pol), extra), "policy") ||
		    !ASSERT_OK(th_daemon_write_policy(&g->d, pol), "write policy") ||
		    !ASSERT_OK(th_daemon_reload(&g->d), "reload"))
			goto out;
	}
	j = th_job_new(AF_INET, "127.0.0.3", th_server_port(sink));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	j->up_bytes = up;
	j->seed = 0xfeed;
	j->max_chunk = max_chunk;
	j->expect_echo = false;
	j->timeout_ms = timeout_ms;
	/* The reload is asynchronous: the first try may still meet the old policy. */
	for (int t = 0; t < 50; t++) {
		j->bad = j->first_error = 0;
		if (!th_job_in(g->tagged, j, timeout_ms + 10000))
			break;
		if (th_server_accepted(sink))
			break; /* it got through: a real failure, not the reload */
		usleep(100 * 1000);
	}
	if (!ASSERT_EQ(j->bad, 0, "transfer"))
		goto out;
	th_prng_sha256(0xdecaf, down, want_down);
	th_prng_sha256(0xfeed, up, want_up);
	ASSERT_EQ(j->x.bytes_out, up, "agent sent all");
	ASSERT_EQ(j->x.bytes_in, down, "agent received all");
	ASSERT_OK(memcmp(j->x.sha_in, want_down, 32), "downstream bytes intact");
	if (early_eof)
		ASSERT_TRUE(j->x.eof_while_sending, "upstream's EOF reached the agent mid-send");
	if (!ASSERT_OK(th_server_wait_reports(sink, 1, 10000), "sink report"))
		goto out;
	th_server_report(sink, 0, &r);
	ASSERT_EQ(r.error, 0, "sink saw no error");
	ASSERT_EQ(r.bytes_in, up, "sink received all");
	ASSERT_OK(memcmp(r.sha_in, want_up, 32), "upstream bytes intact");
	end = th_daemon_wait_event(&g->d, "end", "pid", j->pid, 0, 5000);
	if (ASSERT_OK_PTR(end, "session end logged")) {
		ASSERT_TRUE(th_json_int(end, "bytes_up", &v) && (uint64_t)v == up, "bytes_up");
		ASSERT_TRUE(th_json_int(end, "bytes_down", &v) && (uint64_t)v == down,
			    "bytes_down");
	}
	yajl_tree_free(end);
out:
	th_job_free(j);
	th_server_stop(sink);
}

/* The agent half-closes first: the server reads to EOF, then answers with what it got. */
static void halfclose_agent_first(struct th_gate *g, uint64_t up, size_t max_chunk)
{
	struct th_server *hc = th_server_start(TH_SRV_HALFCLOSE, AF_INET6, "::1");
	char port[64], pol[8192], reply[128], hex[65];
	const char *extra[] = { "halfclose", port, NULL };
	uint8_t sha[32], want[32];
	struct th_job *j = NULL;

	if (!ASSERT_OK_PTR(hc, "half-close server"))
		return;
	snprintf(port, sizeof(port), "[::1]:%d", th_server_port(hc));
	if (!ASSERT_OK(th_gate_policy(g, pol, sizeof(pol), extra), "policy") ||
	    !ASSERT_OK(th_daemon_write_policy(&g->d, pol), "write policy") ||
	    !ASSERT_OK(th_daemon_reload(&g->d), "reload"))
		goto out;
	j = th_job_new(AF_INET6, "::1", th_server_port(hc));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	j->up_bytes = up;
	j->seed = 77;
	j->max_chunk = max_chunk;
	j->expect_echo = false;
	for (int t = 0; t < 50; t++) {
		j->bad = j->first_error = 0;
		if (!th_job_in(g->tagged, j, 40000) || th_server_accepted(hc))
			break;
		usleep(100 * 1000);
	}
	if (!ASSERT_EQ(j->bad, 0, "exchange"))
		goto out;
	th_prng_sha256(77, up, sha);
	th_hex(sha, 32, hex);
	snprintf(reply, sizeof(reply), "ok %llu %s\n", (unsigned long long)up, hex);
	th_sha256(reply, strlen(reply), want);
	ASSERT_EQ(j->x.bytes_in, strlen(reply), "reply length");
	ASSERT_OK(memcmp(j->x.sha_in, want, 32), "reply after the agent's EOF names its bytes");
out:
	th_job_free(j);
	th_server_stop(hc);
}

/*
 * Both ends said FIN, and the agent reads nothing more: the upstream's last bytes and its FIN
 * wait in the daemon (its side paused, its socket read-shut by the FIN and write-shut after the
 * agent's), which epoll reports as EPOLLHUP whatever the mask. The worker must sleep meanwhile,
 * not spin on that HUP.
 */
struct stalled_agent {
	int port;
	volatile int ready, release;
	int err;
};

static int stalled_agent_run(void *arg)
{
	struct stalled_agent *a = arg;
	struct sockaddr_in sin = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), small = 4096;

	sin.sin_port = htons(a->port);
	inet_pton(AF_INET, "127.0.0.3", &sin.sin_addr);
	/* A small window: what the upstream sends piles up in the daemon. */
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) ||
	    connect(fd, (struct sockaddr *)&sin, sizeof(sin)) || shutdown(fd, SHUT_WR)) {
		a->err = -errno;
		return 1;
	}
	a->ready = 1;
	for (int t = 0; t < 3000 && !a->release; t++)
		usleep(10 * 1000);
	close(fd);
	return 0;
}

/* CPU time (user + system, in clock ticks) of a process so far, or -1. */
static long cpu_ticks(pid_t pid)
{
	unsigned long ut, st;
	char path[64], buf[1024], *p;
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');
	/* After the name: state, then ten fields, then utime and stime. */
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut,
			 &st) != 2)
		return -1;
	return ut + st;
}

static int tcp_state(int fd)
{
	struct tcp_info ti = {};
	socklen_t l = sizeof(ti);

	return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) ? -1 : ti.tcpi_state;
}

/* Bytes received and not yet read on the IPv4 socket lport → rport (/proc/net/tcp), or -1. */
static long unread_bytes(int lport, int rport)
{
	char line[512];
	long ret = -1;
	FILE *f = fopen("/proc/net/tcp", "re");

	if (!f)
		return -1;
	while (ret < 0 && fgets(line, sizeof(line), f)) {
		unsigned int lp, rp;
		unsigned long tx, rx;

		if (sscanf(line, " %*d: %*x:%x %*x:%x %*x %lx:%lx", &lp, &rp, &tx, &rx) == 4 &&
		    (int)lp == lport && (int)rp == rport)
			ret = rx;
	}
	fclose(f);
	return ret;
}

/* Starts fn(a) as a tagged agent, accepts the daemon's upstream connection: its fd, or -1. */
static int stalled_start(struct th_gate *g, int lfd, int (*fn)(void *), struct stalled_agent *a,
			 pid_t *pid)
{
	struct pollfd pfd = { .fd = lfd, .events = POLLIN };
	int up;

	*pid = th_spawn_in_cgroup(g->tagged, fn, a);
	if (!ASSERT_GT(*pid, 0, "spawn") || !ASSERT_EQ(poll(&pfd, 1, 5000), 1, "upstream connect"))
		return -1;
	up = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	ASSERT_GE(up, 0, "accept");
	return up;
}

static void stalled_stop(struct stalled_agent *a, pid_t pid, int up)
{
	if (up >= 0)
		close(up);
	if (pid > 0) {
		a->release = 1;
		th_wait(pid, 15000);
	}
}

static void subtest_hup_no_spin(struct th_gate *g, int lfd, int port)
{
	struct stalled_agent *a = th_shared_alloc(sizeof(*a));
	static uint8_t chunk[16 * 1024];
	struct sockaddr_in peer;
	socklen_t pl = sizeof(peer);
	struct pollfd pfd;
	size_t sent = 0;
	long before, used;
	pid_t pid = -1;
	int up = -1;
	char c;

	if (!ASSERT_OK_PTR(a, "shared"))
		return;
	memset(a, 0, sizeof(*a));
	a->port = port;
	up = stalled_start(g, lfd, stalled_agent_run, a, &pid);
	if (up < 0)
		goto out;
	/* The agent's FIN first: the daemon shuts its write half to us. */
	pfd = (struct pollfd){ .fd = up, .events = POLLIN };
	if (!ASSERT_EQ(poll(&pfd, 1, 5000), 1, "agent's FIN") ||
	    !ASSERT_EQ(recv(up, &c, 1, 0), 0, "EOF from the daemon"))
		goto out;
	/*
	 * Then more than the agent's leg takes, until the daemon stops reading us (its queue to
	 * the agent is over the watermark), and our FIN right behind: it still fits the window.
	 */
	if (!ASSERT_OK(getpeername(up, (struct sockaddr *)&peer, &pl), "daemon's port"))
		goto out;
	while (sent < (64u << 20) && unread_bytes(ntohs(peer.sin_port), port) < 32 * 1024) {
		ssize_t n = send(up, chunk, sizeof(chunk), MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n > 0)
			sent += n;
		usleep(5 * 1000);
	}
	if (!ASSERT_OK(shutdown(up, SHUT_WR), "upstream FIN"))
		goto out;
	for (int t = 0; t < 300 && tcp_state(up) != TCP_CLOSE; t++)
		usleep(10 * 1000);
	if (!ASSERT_EQ(tcp_state(up), TCP_CLOSE, "the daemon got all of it and the FIN"))
		goto out;
	usleep(200 * 1000);
	before = cpu_ticks(g->d.pid);
	usleep(1000 * 1000);
	used = cpu_ticks(g->d.pid) - before;
	printf("sent %zu bytes; agentgated used %ld ticks in 1 s while the session waited\n", sent,
	       used);
	ASSERT_LT(used, sysconf(_SC_CLK_TCK) / 4, "the daemon sleeps while the session waits");
out:
	stalled_stop(a, pid, up);
	if (pid > 0 && up >= 0) {
		yajl_val end = th_daemon_wait_event(&g->d, "end", "pid", pid, 0, 5000);

		ASSERT_OK_PTR(end, "the session ended once the agent closed");
		yajl_tree_free(end);
	}
	th_shared_free(a, sizeof(*a));
}

/*
 * The agent half-closes, then dies with a reset while the upstream thinks: its side of the
 * session waits for nothing (read EOF, nothing to write), yet the reset must end the session
 * at once and reach the upstream.
 */
static int reset_agent_run(void *arg)
{
	struct stalled_agent *a = arg;
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	int fd = th_connect(AF_INET, "127.0.0.3", a->port, 5000);

	if (fd < 0 || th_send_all(fd, "x", 1, 5000) || shutdown(fd, SHUT_WR)) {
		a->err = fd < 0 ? fd : -errno;
		return 1;
	}
	a->ready = 1;
	for (int t = 0; t < 3000 && !a->release; t++)
		usleep(10 * 1000);
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
	return 0;
}

static void subtest_agent_reset_idle(struct th_gate *g, int lfd, int port)
{
	struct stalled_agent *a = th_shared_alloc(sizeof(*a));
	yajl_val end = NULL;
	struct pollfd pfd;
	pid_t pid = -1;
	int up = -1;
	char c[2];

	if (!ASSERT_OK_PTR(a, "shared"))
		return;
	memset(a, 0, sizeof(*a));
	a->port = port;
	up = stalled_start(g, lfd, reset_agent_run, a, &pid);
	if (up < 0)
		goto out;
	/* The agent's byte, then its FIN: the daemon has nothing to do on the agent's side. */
	pfd = (struct pollfd){ .fd = up, .events = POLLIN };
	if (!ASSERT_EQ(th_recv_all(up, c, sizeof(c), 5000), 1, "the agent's byte and FIN"))
		goto out;
	a->release = 1;
	end = th_daemon_wait_event(&g->d, "end", "pid", pid, 0, 3000);
	ASSERT_OK_PTR(end, "the session ended at the agent's reset");
	ASSERT_EQ(poll(&pfd, 1, 3000), 1, "the upstream hears of it");
	ASSERT_LE(recv(up, c, 1, MSG_DONTWAIT), 0, "no more data, a reset or EOF");
out:
	yajl_tree_free(end);
	stalled_stop(a, pid, up);
	th_shared_free(a, sizeof(*a));
}

/* Every closed connection left the kernel's tables: sockops deletes, LRU is only a backstop. */
static void maps_drained(struct th_gate *g, bool sockhash)
{
	int conns = -1, socks = 0;

	for (int t = 0; t < 50; t++) {
		conns = th_pinned_map_entries(g->d.pin_root, "ag_conns");
		if (sockhash)
			socks = th_pinned_map_entries(g->d.pin_root, "ag_sockhash");
		if (!conns && !socks)
			break;
		usleep(100 * 1000);
	}
	ASSERT_EQ(conns, 0, "ag_conns empty once every connection closed");
	if (sockhash)
		ASSERT_EQ(socks, 0, "ag_sockhash empty once every connection closed");
}

static void fastpath_stats(struct th_gate *g, uint64_t *redirects, uint64_t *fallbacks)
{
	uint64_t stats[AG_STAT_MAX] = { 0 };

	*redirects = *fallbacks = 0;
	if (!ASSERT_OK(ag_pins_stats(g->d.pin_root, stats, AG_STAT_MAX), "pinned stats"))
		return;
	*redirects = stats[AG_STAT_FASTPATH_REDIRECTS];
	*fallbacks = stats[AG_STAT_FASTPATH_FALLBACKS];
	printf("fast path: %llu redirects, %llu fallbacks\n", (unsigned long long)*redirects,
	       (unsigned long long)*fallbacks);
}

static void relay_suite(const char *daemon_args)
{
	char refused[64], reset_addr[64], stall_addr[64];
	const char *extra[] = { "refused", refused, "reset",	 reset_addr,
				"stall",   stall_addr, NULL };
	struct th_server *rst = th_server_start(TH_SRV_RESET, AF_INET, "127.0.0.3");
	int refused_port = closed_port("127.0.0.3");
	int stall_fd = -1, stall_port = -1;
	struct th_gate g;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK_PTR(rst, "reset server") || !ASSERT_GT(refused_port, 0, "closed port"))
		goto out;
	{
		struct sockaddr_in sin = { .sin_family = AF_INET };
		socklen_t sl = sizeof(sin);

		inet_pton(AF_INET, "127.0.0.3", &sin.sin_addr);
		stall_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (!ASSERT_GE(stall_fd, 0, "stall socket") ||
		    !ASSERT_OK(bind(stall_fd, (struct sockaddr *)&sin, sizeof(sin)), "bind") ||
		    !ASSERT_OK(listen(stall_fd, 8), "listen") ||
		    !ASSERT_OK(getsockname(stall_fd, (struct sockaddr *)&sin, &sl), "name"))
			goto out;
		stall_port = ntohs(sin.sin_port);
	}
	snprintf(refused, sizeof(refused), "127.0.0.3:%d", refused_port);
	snprintf(reset_addr, sizeof(reset_addr), "127.0.0.3:%d", th_server_port(rst));
	snprintf(stall_addr, sizeof(stall_addr), "127.0.0.3:%d", stall_port);
	if (!ASSERT_OK(th_gate_start(&g, daemon_args, extra), "gate"))
		goto out;

	if (test__start_subtest("upstream_refused"))
		expect_reset(&g, "refused", "127.0.0.3", refused_port);
	if (test__start_subtest("upstream_reset")) {
		expect_reset(&g, "reset", "127.0.0.3", th_server_port(rst));
		ASSERT_GE(th_server_accepted(rst), 1, "the daemon reached the server");
	}
	if (test__start_subtest("both_fin_upstream_stalled_no_spin"))
		subtest_hup_no_spin(&g, stall_fd, stall_port);
	if (test__start_subtest("agent_reset_while_upstream_idle"))
		subtest_agent_reset_idle(&g, stall_fd, stall_port);
	if (test__start_subtest("concurrent_200"))
		subtest_concurrent(&g, 64 * 1024, 0);
	if (test__start_subtest("idle_sessions_hold_no_pipes"))
		subtest_idle_no_pipes(&g);
	if (test__start_subtest("bulk_100mb_each_way"))
		transfer_check(&g, 100 * MB, 100 * MB, 0, false, 240000);
	if (test__start_subtest("half_close_agent_first"))
		halfclose_agent_first(&g, 4 * MB, 0);
	if (test__start_subtest("half_close_upstream_first"))
		/* The sink is done sending long before the agent is: EOF must reach the agent
		 * while its own stream still flows up. */
		transfer_check(&g, 64 * MB, 64 * 1024, 0, true, 60000);
	if (test__start_subtest("conns_map_drained"))
		maps_drained(&g, false);
	if (test__start_subtest("fastpath_off_unused")) {
		uint64_t redirects, fallbacks;

		fastpath_stats(&g, &redirects, &fallbacks);
		ASSERT_EQ(redirects, 0, "no sk_msg redirects with --fastpath off");
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
	th_server_stop(rst);
	if (stall_fd >= 0)
		close(stall_fd);
}

void test_datapath_relay(void)
{
	relay_suite("--fastpath off");
}

/* The same relay cases through the kernel relay of raw sessions (bpf/sk_skb.bpf.c). */
void test_datapath_relay_kernel(void)
{
	relay_suite("--fastpath off --kernel-relay on");
}

/*
 * Out of fds (a hard limit reached by many sessions): the daemon cannot accept what waits in
 * its backlog. It must wait for fds to come back, not spin on the listener that stays readable,
 * and accept again once sessions end.
 */
void test_datapath_out_of_fds(void)
{
	struct rlimit saved, low = { 96, 96 };
	struct th_job *j = NULL;
	struct th_gate g;
	long before, used;
	pid_t pid = -1;
	int rc;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK(getrlimit(RLIMIT_NOFILE, &saved), "getrlimit"))
		return;
	/* The daemon inherits the low limit; the test takes its own back. */
	rc = setrlimit(RLIMIT_NOFILE, &low);
	if (ASSERT_OK(rc, "setrlimit"))
		rc = th_gate_start(&g, "--workers 1 --fastpath off", NULL);
	setrlimit(RLIMIT_NOFILE, &saved);
	if (!ASSERT_OK(rc, "gate"))
		goto out;
	j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g.echo4));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	j->nconns = 80; /* two fds each in the daemon: more than it may open */
	j->timeout_ms = 4000;
	pid = th_spawn_in_cgroup(g.tagged, th_job_run, j);
	if (!ASSERT_GT(pid, 0, "spawn"))
		goto out;
	usleep(1000 * 1000);
	before = cpu_ticks(g.d.pid);
	usleep(1000 * 1000);
	used = cpu_ticks(g.d.pid) - before;
	printf("agentgated used %ld ticks in 1 s out of fds\n", used);
	ASSERT_LT(used, sysconf(_SC_CLK_TCK) / 4, "the daemon waits for fds, it does not spin");
	th_wait(pid, 15000);
	pid = -1;
	printf("job: %d connected, %d bad\n", j->nconnected, j->bad);
	ASSERT_GT(j->bad, 0, "the daemon did run out of fds");
	{
		static char log[1 << 20];
		int warned = 0;

		th_daemon_read_log(&g.d, log, sizeof(log));
		for (const char *p = strstr(log, "Too many open files"); p;
		     p = strstr(p + 1, "Too many open files"))
			warned++;
		printf("%d warnings about it\n", warned);
		ASSERT_LT(warned, 50, "a warning now and then, not a flood");
	}
	/* The sessions are gone: accepting again within a tick or two. */
	memset(j, 0, sizeof(*j));
	j->family = AF_INET;
	snprintf(j->addr, sizeof(j->addr), "127.0.0.2");
	j->port = th_server_port(g.echo4);
	j->expect_echo = true;
	j->timeout_ms = 10000;
	ASSERT_EQ(th_job_in(g.tagged, j, 15000), 0, "served again");
	ASSERT_OK(kill(g.d.pid, 0), "daemon alive");
out:
	if (pid > 0)
		th_wait(pid, 15000);
	th_job_free(j);
	th_gate_cleanup(&g);
}

/* A low soft fd limit (systemd's 1024) is raised to the hard one: sessions are two fds each. */
void test_datapath_nofile_raised(void)
{
	struct rlimit saved, low;
	struct th_job *j = NULL;
	struct th_gate g;
	int rc;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK(getrlimit(RLIMIT_NOFILE, &saved), "getrlimit"))
		return;
	if (saved.rlim_max < 1024) {
		test__skip("hard fd limit %llu", (unsigned long long)saved.rlim_max);
		return;
	}
	low = (struct rlimit){ 96, saved.rlim_max };
	rc = setrlimit(RLIMIT_NOFILE, &low);
	if (ASSERT_OK(rc, "setrlimit"))
		rc = th_gate_start(&g, "--workers 1 --fastpath off", NULL);
	setrlimit(RLIMIT_NOFILE, &saved);
	if (!ASSERT_OK(rc, "gate"))
		goto out;
	j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g.echo4));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	j->nconns = 200;
	j->timeout_ms = 20000;
	ASSERT_EQ(th_job_in(g.tagged, j, 30000), 0, "200 sessions under a soft limit of 96");
out:
	th_job_free(j);
	th_gate_cleanup(&g);
}

/*
 * The sockmap fast path (--fastpath on): sk_msg redirects on the agent<->gateway leg must keep
 * every byte, in order, for large transfers, many small writes, half-closes and many sessions
 * at once (that it is taken at all is fastpath.c's "redirects").
 */
void test_datapath_fastpath(void)
{
	struct th_gate g;

	if (!ASSERT_OK(th_gate_start(&g, "--fastpath on", NULL), "gate"))
		goto out;

	if (test__start_subtest("echo_small_writes_ordered")) {
		struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g.echo4));

		if (ASSERT_OK_PTR(j, "job")) {
			j->up_bytes = 8 * MB;
			j->max_chunk = 1500;
			j->seed = 31337;
			j->timeout_ms = 60000;
			ASSERT_EQ(th_job_in(g.tagged, j, 70000), 0, "8 MB in small writes echoed");
			ASSERT_EQ(j->x.bytes_in, 8 * MB, "all came back");
		}
		th_job_free(j);
	}
	if (test__start_subtest("echo_ipv6")) {
		struct th_job *j = th_job_new(AF_INET6, "::1", th_server_port(g.echo6));

		if (ASSERT_OK_PTR(j, "job")) {
			j->up_bytes = 16 * MB;
			j->seed = 4711;
			j->timeout_ms = 60000;
			ASSERT_EQ(th_job_in(g.tagged, j, 70000), 0, "16 MB echoed over IPv6");
		}
		th_job_free(j);
	}
	if (test__start_subtest("bulk_100mb_each_way"))
		transfer_check(&g, 100 * MB, 100 * MB, 0, false, 240000);
	if (test__start_subtest("half_close_agent_first"))
		halfclose_agent_first(&g, 4 * MB, 4096);
	if (test__start_subtest("half_close_upstream_first"))
		transfer_check(&g, 64 * MB, 64 * 1024, 0, true, 60000);
	if (test__start_subtest("many_sessions"))
		subtest_concurrent(&g, 256 * 1024, 16384);
	if (test__start_subtest("maps_drained"))
		maps_drained(&g, true);
	/*
	 * Whether redirects happen is fastpath.c's business ("redirects", and blocking agents
	 * staying on TCP): these clients turn blocking after connect, the one case where the
	 * kernel leaves the choice to a race (bpf/lib/fastpath.h).
	 */
out:
	test__end_subtest();
	th_gate_cleanup(&g);
}

/* ---- ways around the connect hooks, as a hostile agent would try them ---- */

enum probe_how {
	PROBE_MARK,	/* the daemon's SO_MARK set on the agent's own socket */
	PROBE_UNSPEC,	/* a relayed connect, an AF_UNSPEC disconnect, then a connect again */
	PROBE_ANY,	/* 0.0.0.0 or ::, which the kernel takes for the local host */
	PROBE_IO_URING, /* IORING_OP_CONNECT */
	PROBE_PRETAG,	/* a socket made before its cgroup was tagged */
	PROBE_MOVED,	/* a socket made in an untagged cgroup, connected after a move */
	PROBE_NETNS,	/* from a fresh network namespace (no gateway in it) */
	PROBE_PLAIN,	/* a plain connect (with type and protocol as given) */
};

enum probe_expect {
	EXPECT_RELAYED, /* through the gateway, echoed */
	EXPECT_REFUSED, /* refused in the kernel (EPERM / ECONNREFUSED) */
	EXPECT_DENIED,	/* reached the gateway, which refused it (never the server) */
};

struct probe {
	enum probe_how how;
	int family;
	char addr[64];
	int port;
	int type, protocol;	/* of the socket: SOCK_STREAM, 0 unless set */
	char move_to[256];	/* PROBE_MOVED */
	bool fastopen;		/* connect by sendto(MSG_FASTOPEN) rather than connect() */
	volatile int ready, go; /* PROBE_PRETAG: socket made / tagged, connect now */
	/* out */
	int socket_err;
	int connect_err;
	int local_port;
	bool echoed;
};

static int probe_sockaddr(const struct probe *p, struct sockaddr_storage *ss, socklen_t *sl)
{
	memset(ss, 0, sizeof(*ss));
	if (p->family == AF_INET) {
		struct sockaddr_in *in = (void *)ss;

		in->sin_family = AF_INET;
		in->sin_port = htons(p->port);
		*sl = sizeof(*in);
		return inet_pton(AF_INET, p->addr, &in->sin_addr) == 1 ? 0 : -EINVAL;
	} else {
		struct sockaddr_in6 *in6 = (void *)ss;

		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(p->port);
		*sl = sizeof(*in6);
		return inet_pton(AF_INET6, p->addr, &in6->sin6_addr) == 1 ? 0 : -EINVAL;
	}
}

/* connect() through io_uring, with the raw interface (one SQE, one CQE): 0 or -errno. */
static int uring_connect(int fd, const struct sockaddr *sa, socklen_t sl)
{
	struct io_uring_params prm = {};
	struct io_uring_sqe *sqes, *sqe;
	struct io_uring_cqe *cqe;
	size_t sq_len, cq_len;
	unsigned int *tail, idx;
	uint8_t *sq, *cq;
	int ring, rc;

	ring = syscall(__NR_io_uring_setup, 4, &prm);
	if (ring < 0)
		return -errno;
	sq_len = prm.sq_off.array + prm.sq_entries * sizeof(__u32);
	cq_len = prm.cq_off.cqes + prm.cq_entries * sizeof(struct io_uring_cqe);
	if (prm.features & IORING_FEAT_SINGLE_MMAP)
		sq_len = cq_len = sq_len > cq_len ? sq_len : cq_len;
	sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
		  IORING_OFF_SQ_RING);
	cq = prm.features & IORING_FEAT_SINGLE_MMAP ?
		     sq :
		     mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring,
			  IORING_OFF_CQ_RING);
	sqes = mmap(NULL, prm.sq_entries * sizeof(*sqes), PROT_READ | PROT_WRITE,
		    MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
	if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
		close(ring);
		return -ENOMEM;
	}
	tail = (unsigned int *)(sq + prm.sq_off.tail);
	idx = *tail & *(unsigned int *)(sq + prm.sq_off.ring_mask);
	sqe = &sqes[idx];
	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = IORING_OP_CONNECT;
	sqe->fd = fd;
	sqe->addr = (unsigned long)sa;
	sqe->off = sl;
	((unsigned int *)(sq + prm.sq_off.array))[idx] = idx;
	__atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
	rc = syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
	if (rc < 0) {
		rc = -errno;
	} else {
		unsigned int head = __atomic_load_n((unsigned int *)(cq + prm.cq_off.head),
						    __ATOMIC_ACQUIRE);

		cqe = (struct io_uring_cqe *)(cq + prm.cq_off.cqes) +
		      (head & *(unsigned int *)(cq + prm.cq_off.ring_mask));
		rc = cqe->res;
	}
	close(ring);
	return rc;
}

static int probe_local_port(int fd)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);

	if (getsockname(fd, (struct sockaddr *)&ss, &sl))
		return -1;
	return ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
					     : ((struct sockaddr_in6 *)&ss)->sin6_port);
}

static const char probe_msg[] = "around?";

/* Sends probe_msg (unless a TCP Fast Open connect already did) and expects it back. */
static bool probe_echo(int fd, bool send)
{
	char back[sizeof(probe_msg)];

	return (!send || !th_send_all(fd, probe_msg, sizeof(probe_msg), 5000)) &&
	       th_recv_all(fd, back, sizeof(back), 5000) == sizeof(back) &&
	       !memcmp(back, probe_msg, sizeof(back));
}

static int probe_child(void *arg)
{
	struct probe *p = arg;
	struct sockaddr_storage ss;
	socklen_t sl;
	int fd, rc;

	if (probe_sockaddr(p, &ss, &sl))
		return 2;
	if (p->how == PROBE_NETNS && unshare(CLONE_NEWNET)) {
		p->socket_err = -errno;
		return 0;
	}
	fd = socket(p->family, (p->type ? p->type : SOCK_STREAM) | SOCK_CLOEXEC, p->protocol);
	if (fd < 0) {
		p->socket_err = -errno;
		return 0;
	}
	switch (p->how) {
	case PROBE_MARK: {
		uint32_t mark = AG_DEFAULT_MARK;

		if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)))
			p->socket_err = -errno;
		break;
	}
	case PROBE_UNSPEC: {
		struct sockaddr unspec = { .sa_family = AF_UNSPEC };

		/* A first, honest connection through the gateway, then disconnect. */
		if (connect(fd, (struct sockaddr *)&ss, sl) || !probe_echo(fd, true) ||
		    connect(fd, &unspec, sizeof(unspec)))
			p->socket_err = -errno ? -errno : -EIO;
		break;
	}
	case PROBE_PRETAG:
		p->ready = 1;
		for (int t = 0; t < 10000 && !p->go; t++)
			usleep(1000);
		break;
	case PROBE_MOVED:
		rc = ag_cgroup_move(th_cgroup_mount(), p->move_to, 0);
		if (rc)
			p->socket_err = rc;
		break;
	default:
		break;
	}
	if (p->socket_err)
		goto out;
	if (p->how == PROBE_IO_URING)
		rc = uring_connect(fd, (struct sockaddr *)&ss, sl);
	else if (p->fastopen && sendto(fd, probe_msg, sizeof(probe_msg), MSG_FASTOPEN,
				       (struct sockaddr *)&ss, sl) < 0)
		rc = -errno;
	else if (p->fastopen)
		rc = 0;
	else
		rc = connect(fd, (struct sockaddr *)&ss, sl) ? -errno : 0;
	if (rc) {
		p->connect_err = rc;
		goto out;
	}
	p->local_port = probe_local_port(fd);
	p->echoed = probe_echo(fd, !p->fastopen);
out:
	close(fd);
	return 0;
}

/* Runs probe p from cgroup cg against srv; asserts it never reached srv directly. */
static void run_probe(struct th_server *srv, const char *cg, struct probe *p,
		      enum probe_expect expect)
{
	int before = th_server_accepted(srv);
	pid_t pid = th_spawn_in_cgroup(cg, probe_child, p);

	if (!ASSERT_GT(pid, 0, "spawn") || !ASSERT_EQ(th_wait(pid, 30000), 0, "probe"))
		return;
	printf("probe %d: socket %d, connect %d (%s), echoed %d, local port %d; server peers:",
	       p->how, p->socket_err, p->connect_err, strerror(-p->connect_err), p->echoed,
	       p->local_port);
	for (int i = before; i < th_server_accepted(srv); i++)
		printf(" %d", th_server_peer_port(srv, i));
	printf("\n");
	if (!ASSERT_EQ(p->socket_err, 0, "probe set up"))
		return;
	for (int i = before; i < th_server_accepted(srv); i++)
		ASSERT_NEQ(th_server_peer_port(srv, i), p->local_port, "not direct");
	switch (expect) {
	case EXPECT_RELAYED:
		ASSERT_EQ(p->connect_err, 0, "connected");
		ASSERT_TRUE(p->echoed, "relayed");
		ASSERT_GE(th_server_accepted(srv), before + 1, "through the gateway");
		break;
	case EXPECT_REFUSED:
		ASSERT_TRUE(p->connect_err == -EPERM || p->connect_err == -ECONNREFUSED,
			    "refused in the kernel");
		break;
	case EXPECT_DENIED:
		ASSERT_FALSE(p->echoed, "nothing relayed");
		break;
	}
}

static struct probe *probe_new(enum probe_how how, int family, const char *addr, int port)
{
	struct probe *p = th_shared_alloc(sizeof(*p));

	if (!p)
		return NULL;
	memset(p, 0, sizeof(*p));
	p->how = how;
	p->family = family;
	snprintf(p->addr, sizeof(p->addr), "%s", addr);
	p->port = port;
	return p;
}

static void probe_simple(struct th_gate *g, enum probe_how how, int family, const char *addr,
			 struct th_server *srv, enum probe_expect expect)
{
	struct probe *p = probe_new(how, family, addr, th_server_port(srv));

	if (ASSERT_OK_PTR(p, "probe"))
		run_probe(srv, g->tagged, p, expect);
	th_shared_free(p, sizeof(*p));
}

/* SCTP connects (stream and one-to-many sockets) are refused: the gateway relays TCP only. */
static void subtest_sctp(struct th_gate *g, int type)
{
	struct probe *p = probe_new(PROBE_PLAIN, AF_INET, "127.0.0.2", 9);
	pid_t pid;

	if (!ASSERT_OK_PTR(p, "probe"))
		return;
	p->type = type;
	p->protocol = IPPROTO_SCTP;
	pid = th_spawn_in_cgroup(g->tagged, probe_child, p);
	if (ASSERT_GT(pid, 0, "spawn") && ASSERT_EQ(th_wait(pid, 30000), 0, "probe")) {
		if (p->socket_err)
			test__skip("no SCTP here: %s", strerror(-p->socket_err));
		else
			ASSERT_EQ(p->connect_err, -EPERM, "refused in the kernel");
	}
	th_shared_free(p, sizeof(*p));
}

/* A socket made while its cgroup was not tagged yet is still taken once it is. */
static void subtest_pretag(struct th_gate *g)
{
	struct probe *p = probe_new(PROBE_PRETAG, AF_INET, "127.0.0.2", th_server_port(g->echo4));
	int before = th_server_accepted(g->echo4);
	char cg[256], out[4096];
	pid_t pid = -1;

	if (!ASSERT_OK_PTR(p, "probe") ||
	    !ASSERT_OK(th_cgroup_create("pretag", cg, sizeof(cg)), "cgroup"))
		goto out;
	pid = th_spawn_in_cgroup(cg, probe_child, p);
	if (!ASSERT_GT(pid, 0, "spawn"))
		goto out;
	for (int t = 0; t < 1000 && !p->ready; t++)
		usleep(10 * 1000);
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "cgroup tag %s agent t", cg), 0, "tag");
	p->go = 1;
	ASSERT_EQ(th_wait(pid, 30000), 0, "probe");
	pid = -1;
	ASSERT_EQ(p->connect_err, 0, "connected");
	ASSERT_TRUE(p->echoed, "relayed");
	ASSERT_EQ(th_server_accepted(g->echo4), before + 1, "one connection");
	ASSERT_NEQ(th_server_peer_port(g->echo4, before), p->local_port, "through the gateway");
	th_agctl(&g->d, out, sizeof(out), "cgroup untag %s", cg);
out:
	if (pid > 0) {
		p->go = 1;
		th_wait(pid, 30000);
	}
	th_shared_free(p, sizeof(*p));
}

/* ---- sockets made outside the tagged cgroups: the BPF LSM guard (bpf/lsm_connect.bpf.c) ---- */

/*
 * Is the daemon's BPF LSM guard attached? Only a kernel that refuses BPF LSM programs excuses
 * its absence, and the daemon says so ("BPF LSM not active: ..."), which goes into why: a
 * guard missing without that warning, or because our programs did not load where the kernel
 * takes BPF LSM programs, is a failure, not a skip.
 */
static bool lsm_guard(const struct th_daemon *d, char *why, size_t len)
{
	static char log[256 * 1024];
	char pin[256];
	const char *w, *e;

	snprintf(pin, sizeof(pin), "%s/global/lsm_connect", d->pin_root);
	if (!access(pin, F_OK))
		return true;
	th_daemon_read_log(d, log, sizeof(log));
	w = strstr(log, "BPF LSM not active");
	if (!ASSERT_OK_PTR(w, "no guard pinned, and the daemon warned why")) {
		snprintf(why, len, "%s missing", pin);
		return false;
	}
	e = strchr(w, '\n');
	snprintf(why, len, "%.*s", e ? (int)(e - w) : (int)strlen(w), w);
	ASSERT_FALSE(strstr(why, "failed to load"), "the guard's programs load where LSM works");
	return false;
}

static uint64_t stat_of(const struct th_daemon *d, enum ag_stat which)
{
	uint64_t stats[AG_STAT_MAX] = { 0 };

	ag_pins_stats(d->pin_root, stats, AG_STAT_MAX);
	return stats[which];
}

/*
 * A connect the guard refused: EPERM, nothing reached the server, counted as foreign_socket
 * (and denied), and logged as a kernel deny of pid naming the reason.
 */
static void expect_foreign_refused(struct th_gate *g, pid_t pid, int connect_err, int before,
				   uint64_t foreign_before, uint64_t denied_before)
{
	yajl_val ev;

	ASSERT_EQ(connect_err, -EPERM, "refused in the kernel (EPERM)");
	usleep(100 * 1000);
	ASSERT_EQ(th_server_accepted(g->echo4), before, "nothing reached the server");
	ASSERT_GE(stat_of(&g->d, AG_STAT_FOREIGN_SOCKET), foreign_before + 1,
		  "counted as foreign_socket");
	ASSERT_GE(stat_of(&g->d, AG_STAT_DENIED), denied_before + 1, "counted as denied");
	ev = th_daemon_wait_event(&g->d, "deny", "pid", pid, 0, 5000);
	if (ASSERT_OK_PTR(ev, "kernel deny logged")) {
		ASSERT_STREQ(th_json_str(ev, "by"), "kernel", "denied by the kernel");
		ASSERT_HAS_SUBSTR(th_json_str(ev, "reason"), "outside the tagged cgroups",
				  "the reason names the foreign socket");
	}
	yajl_tree_free(ev);
}

/*
 * A socket keeps the cgroup it was made in: made in an untagged cgroup, it never runs the
 * tagged cgroup's hooks, whoever connects it. The BPF LSM guard refuses it to a tagged task.
 */
static void subtest_moved(struct th_gate *g, bool fastopen)
{
	struct probe *p = probe_new(PROBE_MOVED, AF_INET, "127.0.0.2", th_server_port(g->echo4));
	int before = th_server_accepted(g->echo4);
	uint64_t foreign = stat_of(&g->d, AG_STAT_FOREIGN_SOCKET);
	uint64_t denied = stat_of(&g->d, AG_STAT_DENIED);
	char why[512];
	bool guard = lsm_guard(&g->d, why, sizeof(why));
	pid_t pid;

	if (!ASSERT_OK_PTR(p, "probe"))
		return;
	p->fastopen = fastopen;
	snprintf(p->move_to, sizeof(p->move_to), "%s", g->tagged);
	pid = th_spawn_in_cgroup(g->untagged, probe_child, p);
	if (!ASSERT_GT(pid, 0, "spawn") || !ASSERT_EQ(th_wait(pid, 30000), 0, "probe") ||
	    !ASSERT_EQ(p->socket_err, 0, "socket made, then moved"))
		goto out;
	printf("connect %d (%s), echoed %d, local port %d\n", p->connect_err,
	       strerror(-p->connect_err), p->echoed, p->local_port);
	if (guard)
		expect_foreign_refused(g, pid, p->connect_err, before, foreign, denied);
	else if (th_server_accepted(g->echo4) == before + 1 &&
		 th_server_peer_port(g->echo4, before) == p->local_port)
		test__skip("known bypass without the BPF LSM guard, connected directly: %s", why);
out:
	th_shared_free(p, sizeof(*p));
}

/* A fresh TCP socket handed from an untagged process to a tagged one over SCM_RIGHTS. */
struct scm {
	int sv[2]; /* AF_UNIX socketpair: the sender writes [0], the receiver reads [1] */
	int port;
	int send_err;
	int recv_err;
	int connect_err;
	int local_port;
	bool echoed;
};

static int scm_sender(void *arg)
{
	struct scm *m = arg;
	char c = 'x', cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { .iov_base = &c, .iov_len = 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			      .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	close(m->sv[1]);
	if (fd < 0) {
		m->send_err = -errno;
		return 0;
	}
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(fd));
	if (sendmsg(m->sv[0], &msg, 0) != 1)
		m->send_err = -errno;
	close(fd);
	return 0;
}

static int scm_receiver(void *arg)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	struct scm *m = arg;
	char c, cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { .iov_base = &c, .iov_len = 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			      .msg_controllen = sizeof(cbuf) };
	struct pollfd pfd = { .fd = m->sv[1], .events = POLLIN };
	struct cmsghdr *cm;
	int fd;

	close(m->sv[0]);
	errno = 0;
	if (poll(&pfd, 1, 10000) != 1 || recvmsg(m->sv[1], &msg, MSG_CMSG_CLOEXEC) != 1) {
		m->recv_err = errno ? -errno : -ETIMEDOUT;
		return 0;
	}
	cm = CMSG_FIRSTHDR(&msg);
	if (!cm || cm->cmsg_type != SCM_RIGHTS) {
		m->recv_err = -EBADMSG;
		return 0;
	}
	memcpy(&fd, CMSG_DATA(cm), sizeof(fd));
	sin.sin_port = htons(m->port);
	inet_pton(AF_INET, "127.0.0.2", &sin.sin_addr);
	if (connect(fd, (struct sockaddr *)&sin, sizeof(sin))) {
		m->connect_err = -errno;
	} else {
		m->local_port = probe_local_port(fd);
		m->echoed = probe_echo(fd, true);
	}
	close(fd);
	return 0;
}

/* The socket made in from_cg, connected in to_cg: the result in *m (shared memory). */
static int scm_pass(struct th_gate *g, const char *from_cg, const char *to_cg, struct scm *m,
		    pid_t *receiver)
{
	pid_t snd, rcv;
	int rc = 0;

	memset(m, 0, sizeof(*m));
	m->port = th_server_port(g->echo4);
	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, m->sv))
		return -errno;
	rcv = th_spawn_in_cgroup(to_cg, scm_receiver, m);
	snd = th_spawn_in_cgroup(from_cg, scm_sender, m);
	close(m->sv[0]);
	close(m->sv[1]);
	if (snd > 0 && th_wait(snd, 10000))
		rc = -EIO;
	if (rcv > 0 && th_wait(rcv, 30000))
		rc = -EIO;
	if (snd < 0 || rcv < 0)
		rc = snd < 0 ? snd : rcv;
	*receiver = rcv;
	if (!rc && (m->send_err || m->recv_err))
		rc = m->send_err ? m->send_err : m->recv_err;
	return rc;
}

static void subtest_scm_rights(struct th_gate *g)
{
	struct scm *m = th_shared_alloc(sizeof(*m));
	int before = th_server_accepted(g->echo4);
	uint64_t foreign = stat_of(&g->d, AG_STAT_FOREIGN_SOCKET);
	uint64_t denied = stat_of(&g->d, AG_STAT_DENIED);
	char why[512];
	bool guard = lsm_guard(&g->d, why, sizeof(why));
	pid_t pid = -1;

	if (!ASSERT_OK_PTR(m, "shared"))
		return;
	if (!ASSERT_OK(scm_pass(g, g->untagged, g->tagged, m, &pid), "socket passed"))
		goto out;
	printf("connect %d (%s), echoed %d, local port %d\n", m->connect_err,
	       strerror(-m->connect_err), m->echoed, m->local_port);
	if (guard)
		expect_foreign_refused(g, pid, m->connect_err, before, foreign, denied);
	else if (th_server_accepted(g->echo4) == before + 1 &&
		 th_server_peer_port(g->echo4, before) == m->local_port)
		test__skip("known bypass without the BPF LSM guard, connected directly: %s", why);
out:
	th_shared_free(m, sizeof(*m));
}

/*
 * The guard runs for every connect and send on the host: outside the tagged cgroups nothing
 * changes, not even for sockets that moved between untagged cgroups or came over a Unix socket.
 */
static void subtest_untagged_unaffected(struct th_gate *g)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
	struct probe *p = probe_new(PROBE_MOVED, AF_INET, "127.0.0.2", th_server_port(g->echo4));
	struct scm *m = th_shared_alloc(sizeof(*m));
	uint64_t foreign = stat_of(&g->d, AG_STAT_FOREIGN_SOCKET);
	char other[256], why[512];
	bool guard = lsm_guard(&g->d, why, sizeof(why));
	int before, fd;
	pid_t pid;

	if (!ASSERT_OK_PTR(j, "job") || !ASSERT_OK_PTR(p, "probe") || !ASSERT_OK_PTR(m, "shared") ||
	    !ASSERT_OK(th_cgroup_create("untagged-other", other, sizeof(other)), "cgroup"))
		goto out;

	/* The test process itself (an untagged cgroup of the host). */
	fd = th_connect(AF_INET, "127.0.0.2", th_server_port(g->echo4), 5000);
	if (ASSERT_GE(fd, 0, "the host connects"))
		ASSERT_TRUE(probe_echo(fd, true), "and talks");
	if (fd >= 0)
		close(fd);
	ASSERT_EQ(via_gateway(g->echo4, g->untagged, j), 0, "an untagged job goes direct");

	/* Made in one untagged cgroup, connected from another: connect() and Fast Open. */
	for (int tfo = 0; tfo <= 1; tfo++) {
		memset(p, 0, sizeof(*p));
		p->how = PROBE_MOVED;
		p->family = AF_INET;
		snprintf(p->addr, sizeof(p->addr), "127.0.0.2");
		p->port = th_server_port(g->echo4);
		p->fastopen = tfo;
		snprintf(p->move_to, sizeof(p->move_to), "%s", other);
		before = th_server_accepted(g->echo4);
		pid = th_spawn_in_cgroup(g->untagged, probe_child, p);
		if (!ASSERT_GT(pid, 0, "spawn") || !ASSERT_EQ(th_wait(pid, 30000), 0, "probe"))
			continue;
		ASSERT_EQ(p->connect_err, 0, tfo ? "moved socket, Fast Open" : "moved socket");
		ASSERT_TRUE(p->echoed, "echoed");
		if (ASSERT_EQ(th_server_accepted(g->echo4), before + 1, "one connection"))
			ASSERT_EQ(th_server_peer_port(g->echo4, before), p->local_port, "direct");
	}

	/* Passed from one untagged process to another. */
	before = th_server_accepted(g->echo4);
	if (ASSERT_OK(scm_pass(g, g->untagged, other, m, &pid), "socket passed")) {
		ASSERT_EQ(m->connect_err, 0, "passed socket connects");
		ASSERT_TRUE(m->echoed, "echoed");
		if (ASSERT_EQ(th_server_accepted(g->echo4), before + 1, "one connection"))
			ASSERT_EQ(th_server_peer_port(g->echo4, before), m->local_port, "direct");
	}
	ASSERT_EQ(stat_of(&g->d, AG_STAT_FOREIGN_SOCKET), foreign, "nothing counted as foreign");
	if (!guard && !test__has_failed())
		test__skip("untagged traffic fine, but with no BPF LSM guard to stay out of its "
			   "way: %s",
			   why);
out:
	th_job_free(j);
	th_shared_free(p, sizeof(*p));
	th_shared_free(m, sizeof(*m));
}

/*
 * 0.0.0.0 is the local host to the kernel: under default: passthrough, a connect to it must
 * still meet the rules of the target on 127.0.0.1, not be relayed as a plain unknown address.
 */
static void subtest_any_addr_passthrough(struct th_gate *g, struct th_server *local4)
{
	struct probe *p = probe_new(PROBE_ANY, AF_INET, "0.0.0.0", th_server_port(local4));
	char pol[2048], out[4096];
	yajl_val ev = NULL;
	pid_t pid;

	snprintf(pol, sizeof(pol),
		 "apiVersion: agentgate/v1\n"
		 "agents:\n  - name: t\n    cgroup: %s\n"
		 "targets:\n  - name: local\n    protocol: http\n    address: 127.0.0.1:%d\n"
		 "default: passthrough\n",
		 g->tagged, th_server_port(local4));
	if (!ASSERT_OK_PTR(p, "probe") ||
	    !ASSERT_OK(th_daemon_write_policy(&g->d, pol), "policy") ||
	    !ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "policy reload"), 0, "reload"))
		goto out;
	pid = th_spawn_in_cgroup(g->tagged, probe_child, p);
	if (!ASSERT_GT(pid, 0, "spawn") || !ASSERT_EQ(th_wait(pid, 30000), 0, "probe"))
		goto out;
	ev = th_daemon_wait_event(&g->d, "deny", "pid", pid, 0, 2000);
	if (!ev)
		ev = th_daemon_wait_event(&g->d, "start", "pid", pid, 0, 2000);
	if (ASSERT_OK_PTR(ev, "session logged")) {
		ASSERT_STREQ(th_json_str(ev, "target"), "local", "the target on 127.0.0.1");
		ASSERT_HAS_SUBSTR(th_json_str(ev, "orig_dst"), "0.0.0.0:", "orig_dst as asked");
	}
out:
	yajl_tree_free(ev);
	th_shared_free(p, sizeof(*p));
	th_daemon_write_policy(&g->d, g->policy);
	th_agctl(&g->d, out, sizeof(out), "policy reload");
}

/*
 * The gateway port squatted while the daemon is down: another tagged process must not be
 * redirected into the squatter's listener (it would read every agent's traffic).
 */
struct squat {
	int port;
	volatile int ready, stop;
	int err;
	int accepted;
};

static int squat_child(void *arg)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	struct squat *s = arg;
	int fd, one = 1;

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons(s->port);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, (struct sockaddr *)&sin, sizeof(sin)) || listen(fd, 16)) {
		s->err = -errno;
		s->ready = 1;
		return 0;
	}
	s->ready = 1;
	while (!s->stop) {
		int c = accept(fd, NULL, NULL);

		if (c >= 0) {
			s->accepted++;
			close(c);
		}
		usleep(1000);
	}
	close(fd);
	return 0;
}

static void subtest_squat(struct th_gate *g)
{
	struct squat *s = th_shared_alloc(sizeof(*s));
	struct probe *p = NULL;
	pid_t pid = -1;

	if (!ASSERT_OK_PTR(s, "shared"))
		return;
	memset(s, 0, sizeof(*s));
	s->port = g->d.port;
	if (!ASSERT_EQ(th_daemon_kill(&g->d), 128 + SIGKILL, "daemon killed"))
		goto out;
	pid = th_spawn_in_cgroup(g->tagged, squat_child, s);
	if (!ASSERT_GT(pid, 0, "spawn squatter"))
		goto out;
	for (int t = 0; t < 1000 && !s->ready; t++)
		usleep(10 * 1000);
	if (!ASSERT_EQ(s->err, 0, "squatter listens on the gateway port"))
		goto out;
	p = probe_new(PROBE_PLAIN, AF_INET, "127.0.0.2", th_server_port(g->echo4));
	if (!ASSERT_OK_PTR(p, "probe"))
		goto out;
	run_probe(g->echo4, g->tagged, p, EXPECT_REFUSED);
	usleep(100 * 1000);
	ASSERT_EQ(s->accepted, 0, "the squatter got nothing");
out:
	if (pid > 0) {
		s->stop = 1;
		th_wait(pid, 10000);
	}
	th_shared_free(p, sizeof(*p));
	th_shared_free(s, sizeof(*s));
	ASSERT_OK(th_daemon_restart(&g->d), "daemon back");
}

void test_datapath_bypass(void)
{
	struct th_server *local4 = th_server_start(TH_SRV_ECHO, AF_INET, "127.0.0.1");
	struct th_gate g;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK_PTR(local4, "server on 127.0.0.1") ||
	    !ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;

	if (test__start_subtest("so_mark_forged"))
		probe_simple(&g, PROBE_MARK, AF_INET, "127.0.0.2", g.echo4, EXPECT_RELAYED);
	if (test__start_subtest("af_unspec_reconnect"))
		probe_simple(&g, PROBE_UNSPEC, AF_INET, "127.0.0.2", g.echo4, EXPECT_RELAYED);
	if (test__start_subtest("any_addr_ipv4"))
		probe_simple(&g, PROBE_ANY, AF_INET, "0.0.0.0", local4, EXPECT_DENIED);
	if (test__start_subtest("any_addr_ipv6"))
		/* :: is ::1, where the echo6 target is: relayed as that target. */
		probe_simple(&g, PROBE_ANY, AF_INET6, "::", g.echo6, EXPECT_RELAYED);
	if (test__start_subtest("any_addr_mapped"))
		probe_simple(&g, PROBE_ANY, AF_INET6, "::ffff:0.0.0.0", local4, EXPECT_DENIED);
	if (test__start_subtest("any_addr_passthrough_keeps_target"))
		subtest_any_addr_passthrough(&g, local4);
	if (test__start_subtest("io_uring_connect"))
		probe_simple(&g, PROBE_IO_URING, AF_INET, "127.0.0.2", g.echo4, EXPECT_RELAYED);
	if (test__start_subtest("netns_no_gateway"))
		probe_simple(&g, PROBE_NETNS, AF_INET, "127.0.0.2", g.echo4, EXPECT_REFUSED);
	if (test__start_subtest("sctp_stream"))
		subtest_sctp(&g, SOCK_STREAM);
	if (test__start_subtest("sctp_one_to_many"))
		subtest_sctp(&g, SOCK_SEQPACKET);
	if (test__start_subtest("socket_made_before_tag"))
		subtest_pretag(&g);
	if (test__start_subtest("socket_made_outside_tagged_cgroup"))
		subtest_moved(&g, false);
	if (test__start_subtest("scm_rights_socket_from_untagged"))
		subtest_scm_rights(&g);
	if (test__start_subtest("tfo_outside_socket"))
		subtest_moved(&g, true);
	if (test__start_subtest("untagged_task_unaffected"))
		subtest_untagged_unaffected(&g);
	if (test__start_subtest("gateway_port_squatted"))
		subtest_squat(&g);
out:
	test__end_subtest();
	th_gate_cleanup(&g);
	th_server_stop(local4);
}

/* The pinned guard link's program id (hook lsm_connect or lsm_sendmsg), or -errno. */
static int lsm_link_prog(const struct th_daemon *d, const char *hook)
{
	struct bpf_link_info info = {};
	__u32 len = sizeof(info);
	char pin[256];
	int fd, err;

	snprintf(pin, sizeof(pin), "%s/global/%s", d->pin_root, hook);
	fd = bpf_obj_get(pin);
	if (fd < 0)
		return -errno;
	err = bpf_obj_get_info_by_fd(fd, &info, &len) ? -errno : (int)info.prog_id;
	close(fd);
	return err;
}

/* The LSM guard's links as `agctl -j prog show` lists them: how many, and both well formed. */
static int lsm_links_shown(struct th_gate *g)
{
	static char out[256 * 1024];
	yajl_val v, links, st;
	int n = 0;

	if (!ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "-j prog show"), 0, "prog show"))
		return -1;
	v = th_json_parse(out);
	links = th_json_get(v, "links");
	if (!ASSERT_TRUE(links && YAJL_IS_ARRAY(links), "links array")) {
		yajl_tree_free(v);
		return -1;
	}
	st = th_json_get(v, "stats");
	if (st && YAJL_IS_OBJECT(st)) {
		long long x;

		ASSERT_TRUE(th_json_int(st, "foreign_socket", &x), "stats.foreign_socket");
	}
	for (size_t i = 0; i < links->u.array.len; i++) {
		yajl_val l = links->u.array.values[i];
		const char *hook = th_json_str(l, "hook");
		yajl_val global = th_json_get(l, "global");
		char name[32];

		if (!hook || strncmp(hook, "lsm_", 4))
			continue;
		n++;
		snprintf(name, sizeof(name), "ag_%s", hook);
		ASSERT_STREQ(th_json_str(l, "prog_name"), name, "prog_name");
		ASSERT_STREQ(th_json_str(l, "attach_type"), "lsm_mac", "attach_type");
		ASSERT_TRUE(global && YAJL_IS_TRUE(global), "global");
		ASSERT_HAS_SUBSTR(th_json_str(l, "pin"), "/global/lsm_", "pinned under global/");
	}
	yajl_tree_free(v);
	return n;
}

/*
 * Exactly n links of each guard program of the daemon whose ag_tagged map has id map_id, on
 * the whole host (bpftool -j link show).
 */
static void expect_lsm_links(int map_id, int n)
{
	ASSERT_EQ(th_bpf_links(map_id, "ag_lsm_connect"), n, "ag_lsm_connect links");
	ASSERT_EQ(th_bpf_links(map_id, "ag_lsm_sendmsg"), n, "ag_lsm_sendmsg links");
}

/* A socket made outside, connected in the tagged cgroup: refused (the guard is at work). */
static void expect_guarding(struct th_gate *g)
{
	struct probe *p = probe_new(PROBE_MOVED, AF_INET, "127.0.0.2", th_server_port(g->echo4));
	pid_t pid;

	if (!ASSERT_OK_PTR(p, "probe"))
		return;
	snprintf(p->move_to, sizeof(p->move_to), "%s", g->tagged);
	pid = th_spawn_in_cgroup(g->untagged, probe_child, p);
	if (ASSERT_GT(pid, 0, "spawn") && ASSERT_EQ(th_wait(pid, 30000), 0, "probe"))
		ASSERT_EQ(p->connect_err, -EPERM, "a socket made outside is refused");
	th_shared_free(p, sizeof(*p));
}

/*
 * The guard's links: host-wide, pinned under <pin root>/global, listed by `agctl prog show`,
 * one of each however often the daemon restarts (a restart points them at its programs), gone
 * with `agctl prog detach` (daemon up or down) and back with the next tag.
 */
void test_datapath_lsm_guard(void)
{
	struct th_gate g;
	char why[512], out[4096];
	int maps; /* the id of the daemon's ag_tagged, which its programs use (and restarts keep) */
	bool guard;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;
	guard = lsm_guard(&g.d, why, sizeof(why));
	maps = th_pinned_map_id(g.d.pin_root, "ag_tagged");
	if (!ASSERT_GT(maps, 0, "ag_tagged pinned"))
		goto out;

	if (test__start_subtest("prog_show_lists_lsm_links")) {
		int n = lsm_links_shown(&g);

		/* The helper counting bpftool's links, on links every kernel has. */
		ASSERT_EQ(th_bpf_links(maps, "ag_connect4"), 1, "one connect4 link");
		if (guard) {
			ASSERT_EQ(n, 2, "lsm_connect and lsm_sendmsg listed");
			expect_lsm_links(maps, 1);
		} else {
			ASSERT_EQ(n, 0, "no guard, none listed");
			test__skip("%s", why);
		}
	}
	if (test__start_subtest("restart_one_lsm_link")) {
		int before = lsm_link_prog(&g.d, "lsm_connect");

		if (ASSERT_OK(th_daemon_restart(&g.d), "restart"))
			ASSERT_EQ(th_bpf_links(maps, "ag_connect4"), 1, "still one connect4 link");
		if (guard) {
			expect_lsm_links(maps, 1);
			ASSERT_NEQ(lsm_link_prog(&g.d, "lsm_connect"), before,
				   "the link runs the new daemon's program");
			expect_guarding(&g);
		}
		if (ASSERT_EQ(th_daemon_kill(&g.d), 128 + SIGKILL, "crash") &&
		    ASSERT_OK(th_daemon_restart(&g.d), "restart after a crash") && guard) {
			expect_lsm_links(maps, 1);
			expect_guarding(&g);
		}
		if (!guard)
			test__skip("%s", why);
	}
	if (test__start_subtest("prog_detach_removes_lsm_links")) {
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "prog detach"), 0, "detach (daemon up)");
		ASSERT_EQ(lsm_links_shown(&g), 0, "none listed");
		expect_lsm_links(maps, 0);
		/* A reload tags again, and the guard comes back with the tag. */
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "policy reload"), 0, "reload");
		if (guard) {
			expect_lsm_links(maps, 1);
			expect_guarding(&g);
		}
		ASSERT_OK(th_daemon_stop(&g.d), "stop");
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "prog detach"), 0,
			  "detach (daemon down)");
		printf("%s", out);
		expect_lsm_links(maps, 0);
		ASSERT_NEQ(access(g.d.pin_root, F_OK), 0, "pin root gone");
		if (!guard)
			test__skip("%s", why);
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
}
