// SPDX-License-Identifier: GPL-2.0
/*
 * The sockmap fast path (--fastpath on) end to end. For non-blocking agents it must carry every
 * byte, in order, both ways at once, across half-closes from either end, for many sessions at
 * once and behind a slow reader — and really be taken (the sk_msg redirect counter moves). An
 * agent on a blocking socket must keep plain TCP semantics: tcp_bpf's receive path would turn a
 * signal or its own FIN's ACK into EAGAIN on a blocking recv() (bpf/lib/fastpath.h), so such a
 * socket never joins the sockhash, or leaves it when it turns blocking after connect.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "agentgate.h"
#include "pins.h"
#include "../gate.h"
#include "../test_progs.h"

#define MB (1024ull * 1024)
#define FP_MAX_CONNS 64
#define FP_BUF (256 * 1024)

/* One client run, in shared memory: what to do, and what each connection saw. */
struct fp_run {
	/* in */
	int family;
	char addr[64];
	int port;
	int nconns;
	uint64_t up_bytes; /* per connection, of the stream of seed + i */
	uint64_t seed;
	size_t max_chunk; /* 0: large writes; else each send() 1..max_chunk bytes */
	bool blocking;	  /* a blocking socket from socket() on */
	bool flip;	  /* connect non-blocking, then clear O_NONBLOCK (connect with a timeout) */
	bool signals;	  /* SIGALRM every millisecond, no SA_RESTART */
	bool read_after;  /* read nothing before all is sent and SHUT_WR (half-close first) */
	int read_delay_us; /* sleep between reads: a slow reader */
	int timeout_ms;
	/* out */
	int done; /* connections that finished their exchange */
	int err;  /* first errno that ended one (EAGAIN on a blocking socket is the bug) */
	char what[96];
	uint64_t bytes_in[FP_MAX_CONNS];
	uint8_t sha_in[FP_MAX_CONNS][32];
	bool eof_while_sending[FP_MAX_CONNS];
};

struct fp_conn {
	int fd;
	uint64_t sent;
	bool shut, eof;
	struct th_prng prng;
	EVP_MD_CTX *in;
	uint8_t *obuf;
	size_t olen, ooff;
};

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000ULL + ts.tv_nsec / 1000000;
}

static void on_alarm(int sig)
{
	(void)sig;
}

static int fp_fail(struct fp_run *r, int err, const char *what)
{
	if (!r->err) {
		r->err = err;
		snprintf(r->what, sizeof(r->what), "%s", what);
	}
	return 1;
}

static int fp_connect(struct fp_run *r, bool nonblock)
{
	struct sockaddr_storage ss = {};
	socklen_t sl;
	int fd, one = 1;

	if (r->family == AF_INET) {
		struct sockaddr_in *in = (void *)&ss;

		in->sin_family = AF_INET;
		in->sin_port = htons(r->port);
		inet_pton(AF_INET, r->addr, &in->sin_addr);
		sl = sizeof(*in);
	} else {
		struct sockaddr_in6 *in6 = (void *)&ss;

		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(r->port);
		inet_pton(AF_INET6, r->addr, &in6->sin6_addr);
		sl = sizeof(*in6);
	}
	fd = socket(r->family, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	while (connect(fd, (struct sockaddr *)&ss, sl)) {
		if (errno == EINTR)
			continue;
		if (errno == EINPROGRESS) {
			struct pollfd p = { .fd = fd, .events = POLLOUT };
			int soerr = 0;
			socklen_t el = sizeof(soerr);

			if (poll(&p, 1, 10000) != 1 ||
			    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &el) || soerr) {
				close(fd);
				return soerr ? -soerr : -ETIMEDOUT;
			}
			break;
		}
		close(fd);
		return -errno;
	}
	return fd;
}

/* Fills c->obuf with the next piece of the connection's stream; false when all is out. */
static bool fp_next(struct fp_run *r, struct fp_conn *c)
{
	uint64_t left = r->up_bytes - c->sent;
	size_t n = left < FP_BUF ? left : FP_BUF;

	if (!left)
		return false;
	if (r->max_chunk) {
		if (n > r->max_chunk)
			n = r->max_chunk;
		n = 1 + rand() % n;
	}
	th_prng_fill(&c->prng, c->obuf, n);
	c->olen = n;
	c->ooff = 0;
	return true;
}

/* Many non-blocking connections at once, driven with poll() (as Go, libuv or libpq do). */
static int fp_run_nonblocking(struct fp_run *r)
{
	struct fp_conn c[FP_MAX_CONNS] = {};
	struct pollfd p[FP_MAX_CONNS];
	uint8_t *ibuf = malloc(FP_BUF);
	uint64_t deadline = mono_ms() + r->timeout_ms;
	int live = r->nconns, ret = 0;

	for (int i = 0; i < r->nconns; i++) {
		c[i].fd = fp_connect(r, true);
		if (c[i].fd < 0)
			return fp_fail(r, -c[i].fd, "connect");
		th_prng_init(&c[i].prng, r->seed + i);
		c[i].in = EVP_MD_CTX_new();
		c[i].obuf = malloc(FP_BUF);
		if (!c[i].in || !c[i].obuf || !ibuf)
			return fp_fail(r, ENOMEM, "alloc");
		EVP_DigestInit_ex(c[i].in, EVP_sha256(), NULL);
	}
	while (live && !ret) {
		int n;

		for (int i = 0; i < r->nconns; i++) {
			bool rd = !c[i].eof && (!r->read_after || c[i].shut);

			p[i].fd = c[i].eof && c[i].shut ? -1 : c[i].fd;
			p[i].events = (rd ? POLLIN : 0) | (c[i].shut ? 0 : POLLOUT);
		}
		n = poll(p, r->nconns, 1000);
		if (n < 0 && errno != EINTR)
			return fp_fail(r, errno, "poll");
		if (mono_ms() > deadline)
			return fp_fail(r, ETIMEDOUT, "exchange");
		for (int i = 0; n > 0 && i < r->nconns; i++) {
			struct fp_conn *k = &c[i];

			if (p[i].fd < 0 || !p[i].revents)
				continue;
			if (!k->shut && (p[i].revents & (POLLOUT | POLLERR))) {
				ssize_t w;

				if (k->ooff == k->olen && !fp_next(r, k)) {
					shutdown(k->fd, SHUT_WR);
					k->shut = true;
				} else if ((w = send(k->fd, k->obuf + k->ooff, k->olen - k->ooff,
						     MSG_NOSIGNAL)) > 0) {
					k->ooff += w;
					k->sent += w;
				} else if (w < 0 && errno != EAGAIN && errno != EINTR) {
					ret = fp_fail(r, errno, "send");
				}
			}
			if (!k->eof && (p[i].revents & (POLLIN | POLLHUP | POLLERR))) {
				ssize_t got = recv(k->fd, ibuf, FP_BUF, 0);

				if (got > 0) {
					EVP_DigestUpdate(k->in, ibuf, got);
					r->bytes_in[i] += got;
					if (r->read_delay_us)
						usleep(r->read_delay_us);
				} else if (got == 0) {
					k->eof = true;
					r->eof_while_sending[i] = !k->shut;
				} else if (errno != EAGAIN && errno != EINTR) {
					ret = fp_fail(r, errno, "recv");
				}
			}
			if (k->eof && k->shut) {
				unsigned int olen;

				EVP_DigestFinal_ex(k->in, r->sha_in[i], &olen);
				r->done++;
				live--;
			}
		}
	}
	for (int i = 0; i < r->nconns; i++) {
		close(c[i].fd);
		EVP_MD_CTX_free(c[i].in);
		free(c[i].obuf);
	}
	free(ibuf);
	return ret;
}

/*
 * The reported failure, as a plain blocking client writes it: send everything, SHUT_WR, then
 * recv() to EOF — with signals arriving all along. EINTR is retried as any program does; an
 * EAGAIN on this blocking socket is the bug.
 */
static int fp_run_blocking(struct fp_run *r)
{
	struct fp_conn c = {};
	uint8_t *ibuf = malloc(FP_BUF);
	struct sigaction sa = { .sa_handler = on_alarm }; /* no SA_RESTART */
	struct itimerval it = { { 0, 1000 }, { 0, 1000 } };
	unsigned int olen;
	int ret = 0;

	c.fd = fp_connect(r, r->flip);
	if (c.fd < 0)
		return fp_fail(r, -c.fd, "connect");
	if (r->flip)
		fcntl(c.fd, F_SETFL, fcntl(c.fd, F_GETFL) & ~O_NONBLOCK);
	th_prng_init(&c.prng, r->seed);
	c.in = EVP_MD_CTX_new();
	c.obuf = malloc(FP_BUF);
	if (!c.in || !c.obuf || !ibuf)
		return fp_fail(r, ENOMEM, "alloc");
	EVP_DigestInit_ex(c.in, EVP_sha256(), NULL);
	if (r->signals) {
		sigaction(SIGALRM, &sa, NULL);
		setitimer(ITIMER_REAL, &it, NULL);
	}
	while (!ret && (c.ooff < c.olen || fp_next(r, &c))) {
		ssize_t w = send(c.fd, c.obuf + c.ooff, c.olen - c.ooff, MSG_NOSIGNAL);

		if (w > 0) {
			c.ooff += w;
			c.sent += w;
		} else if (w < 0 && errno != EINTR) {
			ret = fp_fail(r, errno, "send (blocking)");
		}
	}
	while (!ret && shutdown(c.fd, SHUT_WR) && errno == EINTR)
		;
	while (!ret) {
		ssize_t got = recv(c.fd, ibuf, FP_BUF, 0);

		if (got > 0) {
			EVP_DigestUpdate(c.in, ibuf, got);
			r->bytes_in[0] += got;
		} else if (got == 0) {
			EVP_DigestFinal_ex(c.in, r->sha_in[0], &olen);
			r->done = 1;
			break;
		} else if (errno != EINTR) {
			ret = fp_fail(r, errno, "recv (blocking)");
		}
	}
	if (r->signals) {
		memset(&it, 0, sizeof(it));
		setitimer(ITIMER_REAL, &it, NULL);
	}
	close(c.fd);
	EVP_MD_CTX_free(c.in);
	free(c.obuf);
	free(ibuf);
	return ret;
}

static int fp_child(void *arg)
{
	struct fp_run *r = arg;

	srand(r->seed);
	return r->blocking || r->flip ? fp_run_blocking(r) : fp_run_nonblocking(r);
}

static struct fp_run *fp_new(int family, const char *addr, int port)
{
	struct fp_run *r = th_shared_alloc(sizeof(*r));

	if (!r)
		return NULL;
	memset(r, 0, sizeof(*r));
	r->family = family;
	snprintf(r->addr, sizeof(r->addr), "%s", addr);
	r->port = port;
	r->nconns = 1;
	r->timeout_ms = 60000;
	return r;
}

/* Runs r in the gate's tagged cgroup: true when every connection finished without error. */
static bool fp_go(struct th_gate *g, struct fp_run *r)
{
	pid_t pid = th_spawn_in_cgroup(g->tagged, fp_child, r);
	int rc = pid > 0 ? th_wait(pid, r->timeout_ms + 10000) : pid;

	if (r->err)
		printf("fastpath: client failed in %s: %s\n", r->what, strerror(r->err));
	return ASSERT_EQ(rc, 0, "client exit") && ASSERT_EQ(r->err, 0, "client errno") &&
	       ASSERT_EQ(r->done, r->nconns, "connections finished");
}

static uint64_t fp_redirects(struct th_gate *g)
{
	uint64_t stats[AG_STAT_MAX] = { 0 };

	if (!ASSERT_OK(ag_pins_stats(g->d.pin_root, stats, AG_STAT_MAX), "pinned stats"))
		return 0;
	return stats[AG_STAT_FASTPATH_REDIRECTS];
}

static bool fp_stream_is(uint64_t seed, uint64_t n, uint64_t got, const uint8_t sha[32],
			 const char *name)
{
	uint8_t want[32];

	th_prng_sha256(seed, n, want);
	return ASSERT_EQ(got, n, name) && ASSERT_OK(memcmp(sha, want, 32), name);
}

/* The reply of a TH_SRV_HALFCLOSE server to n bytes of seed's stream. */
static bool fp_halfclose_reply_ok(struct fp_run *r, uint64_t seed, uint64_t n)
{
	char hex[65], reply[128];
	uint8_t sha[32], want[32];

	th_prng_sha256(seed, n, sha);
	th_hex(sha, 32, hex);
	snprintf(reply, sizeof(reply), "ok %llu %s\n", (unsigned long long)n, hex);
	th_sha256(reply, strlen(reply), want);
	return ASSERT_EQ(r->bytes_in[0], strlen(reply), "reply length") &&
	       ASSERT_OK(memcmp(r->sha_in[0], want, 32), "reply names every byte sent");
}

/* Both ways at once, hash-compared at both ends. */
static void subtest_bulk(struct th_gate *g, struct th_server *sink, uint64_t up, uint64_t down,
			 uint64_t down_seed)
{
	struct fp_run *r = fp_new(AF_INET, "127.0.0.2", th_server_port(sink));
	int before = th_server_accepted(sink);
	struct th_report rep;

	if (!ASSERT_OK_PTR(r, "run"))
		return;
	r->up_bytes = up;
	r->seed = 1001;
	r->timeout_ms = 120000;
	if (fp_go(g, r) &&
	    ASSERT_OK(th_server_wait_reports(sink, before + 1, 10000), "sink report") &&
	    ASSERT_OK(th_server_report(sink, before, &rep), "report")) {
		fp_stream_is(down_seed, down, r->bytes_in[0], r->sha_in[0], "download intact");
		fp_stream_is(1001, up, rep.bytes_in, rep.sha_in, "upload intact");
	}
	th_shared_free(r, sizeof(*r));
}

static void subtest_echo(struct th_gate *g, int family, const char *addr, int port, int nconns,
			 uint64_t bytes, size_t max_chunk, int read_delay_us)
{
	struct fp_run *r = fp_new(family, addr, port);

	if (!ASSERT_OK_PTR(r, "run"))
		return;
	r->nconns = nconns;
	r->up_bytes = bytes;
	r->seed = 7000 + nconns;
	r->max_chunk = max_chunk;
	r->read_delay_us = read_delay_us;
	r->timeout_ms = 120000;
	if (fp_go(g, r))
		for (int i = 0; i < nconns; i++)
			if (!fp_stream_is(r->seed + i, bytes, r->bytes_in[i], r->sha_in[i],
					  "echo intact and in order"))
				break;
	th_shared_free(r, sizeof(*r));
}

/* The agent sends everything and SHUT_WR before reading; the reply follows its EOF. */
static void subtest_halfclose_agent(struct th_gate *g, struct th_server *hc, bool blocking,
				    bool flip)
{
	struct fp_run *r = fp_new(AF_INET, "127.0.0.2", th_server_port(hc));

	if (!ASSERT_OK_PTR(r, "run"))
		return;
	r->up_bytes = blocking || flip ? 32 * MB : 4 * MB;
	r->seed = 4242;
	r->read_after = true;
	r->blocking = blocking;
	r->flip = flip;
	r->signals = blocking || flip;
	if (fp_go(g, r))
		fp_halfclose_reply_ok(r, 4242, r->up_bytes);
	th_shared_free(r, sizeof(*r));
}

/* The upstream is done first: its EOF reaches the agent while the agent still sends. */
static void subtest_halfclose_upstream(struct th_gate *g, struct th_server *small, uint64_t seed)
{
	struct fp_run *r = fp_new(AF_INET, "127.0.0.2", th_server_port(small));
	int before = th_server_accepted(small);
	struct th_report rep;

	if (!ASSERT_OK_PTR(r, "run"))
		return;
	r->up_bytes = 64 * MB;
	r->seed = 99;
	if (fp_go(g, r)) {
		ASSERT_TRUE(r->eof_while_sending[0], "EOF arrived while the agent was sending");
		fp_stream_is(seed, 64 * 1024, r->bytes_in[0], r->sha_in[0], "download intact");
		if (ASSERT_OK(th_server_wait_reports(small, before + 1, 10000), "report") &&
		    ASSERT_OK(th_server_report(small, before, &rep), "report"))
			fp_stream_is(99, 64 * MB, rep.bytes_in, rep.sha_in, "upload intact");
	}
	th_shared_free(r, sizeof(*r));
}

void test_fastpath(void)
{
	struct th_server *sink = th_server_sink(AF_INET, "127.0.0.2", 100 * MB, 555);
	struct th_server *small = th_server_sink(AF_INET, "127.0.0.2", 64 * 1024, 556);
	struct th_server *hc = th_server_start(TH_SRV_HALFCLOSE, AF_INET, "127.0.0.2");
	char a_sink[64], a_small[64], a_hc[64];
	const char *extra[] = { "sink", a_sink, "small", a_small, "hc", a_hc, NULL };
	uint64_t r0, r1;
	struct th_gate g;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK_PTR(sink, "sink") || !ASSERT_OK_PTR(small, "small sink") ||
	    !ASSERT_OK_PTR(hc, "half-close server"))
		goto out;
	snprintf(a_sink, sizeof(a_sink), "127.0.0.2:%d", th_server_port(sink));
	snprintf(a_small, sizeof(a_small), "127.0.0.2:%d", th_server_port(small));
	snprintf(a_hc, sizeof(a_hc), "127.0.0.2:%d", th_server_port(hc));
	if (!ASSERT_OK(th_gate_start(&g, "--fastpath on", extra), "gate"))
		goto out;
	r0 = fp_redirects(&g);

	if (test__start_subtest("bulk_100mb_both_ways"))
		subtest_bulk(&g, sink, 100 * MB, 100 * MB, 555);
	if (test__start_subtest("small_writes_in_order"))
		subtest_echo(&g, AF_INET, "127.0.0.2", th_server_port(g.echo4), 1, 8 * MB, 1500, 0);
	if (test__start_subtest("ipv6"))
		subtest_echo(&g, AF_INET6, "::1", th_server_port(g.echo6), 1, 16 * MB, 0, 0);
	if (test__start_subtest("half_close_agent_first"))
		subtest_halfclose_agent(&g, hc, false, false);
	if (test__start_subtest("half_close_upstream_first"))
		subtest_halfclose_upstream(&g, small, 556);
	if (test__start_subtest("concurrent_50"))
		subtest_echo(&g, AF_INET, "127.0.0.2", th_server_port(g.echo4), 50, 1 * MB, 16384,
			     0);
	if (test__start_subtest("slow_reader"))
		/* The redirected queue is bounded: the gateway falls back to TCP, bytes stay. */
		subtest_echo(&g, AF_INET, "127.0.0.2", th_server_port(g.echo4), 1, 16 * MB, 0,
			     2000);
	if (test__start_subtest("used")) {
		r1 = fp_redirects(&g);
		printf("fastpath: %llu sk_msg redirects\n", (unsigned long long)(r1 - r0));
		ASSERT_GT(r1, r0, "the fast path carried the non-blocking agents' bytes");
	}
	if (test__start_subtest("blocking_agent_keeps_tcp")) {
		r0 = fp_redirects(&g);
		subtest_halfclose_agent(&g, hc, true, false);
		ASSERT_EQ(fp_redirects(&g), r0, "a blocking agent is never redirected");
	}
	if (test__start_subtest("agent_turns_blocking")) {
		r0 = fp_redirects(&g);
		subtest_halfclose_agent(&g, hc, false, true);
		ASSERT_EQ(fp_redirects(&g), r0, "an agent gone blocking is not redirected");
	}
	if (test__start_subtest("state_released")) {
		int n = -1;

		/* Each leg's entries go when the agent's socket closes. */
		for (int i = 0; i < 50 && n; i++) {
			n = th_pinned_map_entries(g.d.pin_root, "ag_fastpath");
			if (n)
				usleep(100 * 1000);
		}
		ASSERT_EQ(n, 0, "ag_fastpath empty once every connection closed");
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
	th_server_stop(sink);
	th_server_stop(small);
	th_server_stop(hc);
}

/* Bytes the kernel relay redirected, summed over the "kernel relay" lines of the daemon's log. */
static uint64_t kr_redirected(struct th_gate *g)
{
	static char log[1 << 20];
	uint64_t sum = 0;
	char *p;

	if (th_daemon_read_log(&g->d, log, sizeof(log)) < 0)
		return 0;
	for (p = log; (p = strstr(p, "kernel relay ")); p++) {
		char *b = strchr(p, ':');

		if (b)
			sum += strtoull(b + 1, NULL, 10);
	}
	return sum;
}

/*
 * The kernel relay of raw sessions (--kernel-relay on, bpf/sk_skb.bpf.c): the same streams as
 * the fast path, every byte intact and in order, EOFs passed on after the bytes before them.
 */
void test_kernel_relay(void)
{
	struct th_server *sink = th_server_sink(AF_INET, "127.0.0.2", 64 * MB, 555);
	struct th_server *small = th_server_sink(AF_INET, "127.0.0.2", 64 * 1024, 556);
	struct th_server *hc = th_server_start(TH_SRV_HALFCLOSE, AF_INET, "127.0.0.2");
	char a_sink[64], a_small[64], a_hc[64];
	const char *extra[] = { "sink", a_sink, "small", a_small, "hc", a_hc, NULL };
	struct th_gate g;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK_PTR(sink, "sink") || !ASSERT_OK_PTR(small, "small sink") ||
	    !ASSERT_OK_PTR(hc, "half-close server"))
		goto out;
	snprintf(a_sink, sizeof(a_sink), "127.0.0.2:%d", th_server_port(sink));
	snprintf(a_small, sizeof(a_small), "127.0.0.2:%d", th_server_port(small));
	snprintf(a_hc, sizeof(a_hc), "127.0.0.2:%d", th_server_port(hc));
	if (!ASSERT_OK(th_gate_start(&g, "--kernel-relay on --log-level debug", extra), "gate"))
		goto out;

	if (test__start_subtest("bulk_64mb_both_ways"))
		subtest_bulk(&g, sink, 64 * MB, 64 * MB, 555);
	if (test__start_subtest("small_writes_in_order"))
		subtest_echo(&g, AF_INET, "127.0.0.2", th_server_port(g.echo4), 1, 8 * MB, 1500, 0);
	if (test__start_subtest("ipv6"))
		subtest_echo(&g, AF_INET6, "::1", th_server_port(g.echo6), 1, 16 * MB, 0, 0);
	if (test__start_subtest("half_close_agent_first"))
		subtest_halfclose_agent(&g, hc, false, false);
	if (test__start_subtest("half_close_upstream_first"))
		subtest_halfclose_upstream(&g, small, 556);
	if (test__start_subtest("blocking_agent"))
		subtest_halfclose_agent(&g, hc, true, false);
	if (test__start_subtest("concurrent_50"))
		subtest_echo(&g, AF_INET, "127.0.0.2", th_server_port(g.echo4), 50, 1 * MB, 16384,
			     0);
	if (test__start_subtest("slow_reader"))
		/* The peer's backlog is bounded: the daemon takes over, bytes stay in order. */
		subtest_echo(&g, AF_INET, "127.0.0.2", th_server_port(g.echo4), 1, 16 * MB, 0,
			     2000);
	if (test__start_subtest("used")) {
		uint64_t n = kr_redirected(&g);

		printf("kernel_relay: %llu bytes redirected in the kernel\n",
		       (unsigned long long)n);
		ASSERT_GT(n, 0, "the kernel relay carried bytes");
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
	th_server_stop(sink);
	th_server_stop(small);
	th_server_stop(hc);
}
