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
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/types.h>

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

void test_datapath_relay(void)
{
	char refused[64], reset_addr[64];
	const char *extra[] = { "refused", refused, "reset", reset_addr, NULL };
	struct th_server *rst = th_server_start(TH_SRV_RESET, AF_INET, "127.0.0.3");
	int refused_port = closed_port("127.0.0.3");
	struct th_gate g;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK_PTR(rst, "reset server") || !ASSERT_GT(refused_port, 0, "closed port"))
		goto out;
	snprintf(refused, sizeof(refused), "127.0.0.3:%d", refused_port);
	snprintf(reset_addr, sizeof(reset_addr), "127.0.0.3:%d", th_server_port(rst));
	if (!ASSERT_OK(th_gate_start(&g, "--fastpath off", extra), "gate"))
		goto out;

	if (test__start_subtest("upstream_refused"))
		expect_reset(&g, "refused", "127.0.0.3", refused_port);
	if (test__start_subtest("upstream_reset")) {
		expect_reset(&g, "reset", "127.0.0.3", th_server_port(rst));
		ASSERT_GE(th_server_accepted(rst), 1, "the daemon reached the server");
	}
	if (test__start_subtest("concurrent_200"))
		subtest_concurrent(&g, 64 * 1024, 0);
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
}

/*
 * The sockmap fast path (--fastpath on): sk_msg redirects on the agent<->gateway leg must keep
 * every byte, in order, for large transfers, many small writes, half-closes and many sessions
 * at once, and must actually be used.
 */
void test_datapath_fastpath(void)
{
	uint64_t redirects = 0, fallbacks = 0;
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
	if (test__start_subtest("used")) {
		fastpath_stats(&g, &redirects, &fallbacks);
		ASSERT_GT(redirects, 0, "sk_msg redirects happened");
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
}
