// SPDX-License-Identifier: GPL-2.0
/*
 * agbench: the load tool behind make bench. It forks its own server on a loopback address (the
 * server stays in the caller's cgroup), optionally moves itself into a cgroup (a tagged one, so
 * that its connects are redirected through agentgated) and measures, as a client would see it:
 * bulk throughput up, down and both ways at once; request/response latency (ping-pong on one
 * connection, p50/p99); the rate of short connections (connect, one exchange, close); and what
 * an idle session costs the gateway (N connections held open after one exchange each: the
 * growth of a given process's resident memory, per connection).
 * Clients use non-blocking sockets with poll(), as Go, libuv, libpq or curl do. Results are
 * printed as "name value" lines for scripts/bench.sh; every wait is bounded.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE (256 * 1024)
#define IO_TIMEOUT_MS 20000
#define MSG_LEN 64

enum { CMD_UP = 'U', CMD_DOWN = 'D', CMD_BOTH = 'B', CMD_ECHO = 'E' };

struct opts {
	const char *addr;
	int port;
	const char *cgroup; /* absolute path of a cgroup to run the client in */
	uint64_t bytes;
	int rtts;
	int conns;
	int idle;	/* connections the idle test holds */
	int pid;	/* whose memory the idle test measures (0: none) */
	int duration_s; /* hard limit for the whole run */
	const char *tests;
};

static uint8_t zeros[BUF_SIZE];

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("agbench: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

/* --- the server: one thread per connection, blocking sockets ------------------------------- */

static int read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = recv(fd, (uint8_t *)buf + got, len - got, 0);

		if (n <= 0)
			return n < 0 && errno == EINTR ? 0 : -1;
		got += n;
	}
	return 0;
}

static int write_full(int fd, const void *buf, size_t len)
{
	size_t off = 0;

	while (off < len) {
		ssize_t n = send(fd, (const uint8_t *)buf + off, len - off, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		off += n;
	}
	return 0;
}

static uint64_t drain(int fd, uint8_t *buf)
{
	uint64_t total = 0;
	ssize_t n;

	while ((n = recv(fd, buf, BUF_SIZE, 0)) > 0 || (n < 0 && errno == EINTR))
		if (n > 0)
			total += n;
	return total;
}

static int send_zeros(int fd, uint64_t n)
{
	while (n) {
		size_t chunk = n < BUF_SIZE ? n : BUF_SIZE;

		if (write_full(fd, zeros, chunk))
			return -1;
		n -= chunk;
	}
	return 0;
}

struct both_arg {
	int fd;
	uint64_t n;
};

static void *both_sender(void *p)
{
	struct both_arg *a = p;

	send_zeros(a->fd, a->n);
	shutdown(a->fd, SHUT_WR);
	return NULL;
}

static void *serve_conn(void *p)
{
	int fd = (int)(intptr_t)p, one = 1;
	uint8_t *buf = malloc(BUF_SIZE);
	uint8_t cmd;
	uint64_t n;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (!buf || read_full(fd, &cmd, 1))
		goto out;
	switch (cmd) {
	case CMD_UP:
		n = drain(fd, buf);
		write_full(fd, &n, sizeof(n));
		break;
	case CMD_DOWN:
		if (read_full(fd, &n, sizeof(n)) || send_zeros(fd, n))
			break;
		shutdown(fd, SHUT_WR);
		drain(fd, buf);
		break;
	case CMD_BOTH: {
		struct both_arg a = { .fd = fd };
		pthread_t t;

		if (read_full(fd, &a.n, sizeof(a.n)) || pthread_create(&t, NULL, both_sender, &a))
			break;
		drain(fd, buf);
		pthread_join(t, NULL);
		break;
	}
	case CMD_ECHO:
		for (;;) {
			ssize_t r = recv(fd, buf, BUF_SIZE, 0);

			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0 || write_full(fd, buf, r))
				break;
		}
		shutdown(fd, SHUT_WR);
		break;
	}
out:
	free(buf);
	close(fd);
	return NULL;
}

static int make_listener(const char *addr, int port, int *bound)
{
	struct sockaddr_in in = { .sin_family = AF_INET, .sin_port = htons(port) };
	socklen_t sl = sizeof(in);
	int fd, one = 1;

	if (inet_pton(AF_INET, addr, &in.sin_addr) != 1)
		die("--addr %s: not an IPv4 address", addr);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&in, sizeof(in)) || listen(fd, 4096))
		die("listening on %s:%d: %s", addr, port, strerror(errno));
	getsockname(fd, (struct sockaddr *)&in, &sl);
	*bound = ntohs(in.sin_port);
	return fd;
}

static void serve(int lfd)
{
	pthread_attr_t attr;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* A thread per connection: the idle test holds thousands of them. */
	pthread_attr_setstacksize(&attr, 128 * 1024);
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		pthread_t t;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE)
				continue;
			_exit(1);
		}
		if (pthread_create(&t, &attr, serve_conn, (void *)(intptr_t)fd))
			close(fd);
	}
}

/* --- the client: non-blocking sockets and poll() -------------------------------------------- */

static int wait_fd(int fd, short ev)
{
	struct pollfd p = { .fd = fd, .events = ev };
	int r;

	do
		r = poll(&p, 1, IO_TIMEOUT_MS);
	while (r < 0 && errno == EINTR);
	if (r == 0)
		die("no progress for %d s (is the gateway up?)", IO_TIMEOUT_MS / 1000);
	return r < 0 ? -1 : 0;
}

static int cli_connect(const struct opts *o)
{
	struct sockaddr_in in = { .sin_family = AF_INET, .sin_port = htons(o->port) };
	int fd, err = 0, one = 1;
	socklen_t el = sizeof(err);

	inet_pton(AF_INET, o->addr, &in.sin_addr);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&in, sizeof(in))) {
		if (errno != EINPROGRESS)
			die("connect %s:%d: %s", o->addr, o->port, strerror(errno));
		wait_fd(fd, POLLOUT);
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
		if (err)
			die("connect %s:%d: %s", o->addr, o->port, strerror(err));
	}
	return fd;
}

static void cli_send(int fd, const void *buf, size_t len)
{
	size_t off = 0;

	while (off < len) {
		ssize_t n = send(fd, (const uint8_t *)buf + off, len - off, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				wait_fd(fd, POLLOUT);
				continue;
			}
			die("send: %s", strerror(errno));
		}
		off += n;
	}
}

/* Reads exactly len bytes (len 0: until EOF); returns the count. */
static uint64_t cli_recv(int fd, void *buf, size_t bufsz, uint64_t len)
{
	uint64_t got = 0;

	while (!len || got < len) {
		size_t want = len && len - got < bufsz ? len - got : bufsz;
		ssize_t n = recv(fd, len ? (uint8_t *)buf + got : buf, want, 0);

		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				wait_fd(fd, POLLIN);
				continue;
			}
			die("recv: %s", strerror(errno));
		}
		if (n == 0) {
			if (len)
				die("early EOF after %llu of %llu bytes", (unsigned long long)got,
				    (unsigned long long)len);
			break;
		}
		got += n;
	}
	return got;
}

static double mbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (1024.0 * 1024.0) / ((double)ns / 1e9) : 0;
}

static void test_up(const struct opts *o)
{
	uint8_t cmd = CMD_UP;
	uint64_t t0 = now_ns(), left = o->bytes, count = 0;
	int fd = cli_connect(o);

	cli_send(fd, &cmd, 1);
	while (left) {
		size_t chunk = left < BUF_SIZE ? left : BUF_SIZE;

		cli_send(fd, zeros, chunk);
		left -= chunk;
	}
	shutdown(fd, SHUT_WR);
	cli_recv(fd, &count, sizeof(count), sizeof(count));
	if (count != o->bytes)
		die("bulk up: the server got %llu of %llu bytes", (unsigned long long)count,
		    (unsigned long long)o->bytes);
	printf("bulk_up_MBps %.1f\n", mbps(o->bytes, now_ns() - t0));
	close(fd);
}

static void test_down(const struct opts *o)
{
	uint8_t req[9] = { CMD_DOWN };
	uint8_t *buf = malloc(BUF_SIZE);
	uint64_t t0 = now_ns(), got;
	int fd = cli_connect(o);

	memcpy(req + 1, &o->bytes, 8);
	cli_send(fd, req, sizeof(req));
	got = cli_recv(fd, buf, BUF_SIZE, 0);
	if (got != o->bytes)
		die("bulk down: got %llu of %llu bytes", (unsigned long long)got,
		    (unsigned long long)o->bytes);
	printf("bulk_down_MBps %.1f\n", mbps(o->bytes, now_ns() - t0));
	close(fd);
	free(buf);
}

/* Both directions at once on one connection; the figure is the sum of both. */
static void test_both(const struct opts *o)
{
	uint8_t req[9] = { CMD_BOTH };
	uint8_t *buf = malloc(BUF_SIZE);
	uint64_t t0 = now_ns(), sent = 0, got = 0;
	bool eof = false, shut = false;
	int fd = cli_connect(o);

	memcpy(req + 1, &o->bytes, 8);
	cli_send(fd, req, sizeof(req));
	while (!eof || !shut) {
		struct pollfd p = { .fd = fd, .events = (eof ? 0 : POLLIN) | (shut ? 0 : POLLOUT) };
		int r = poll(&p, 1, IO_TIMEOUT_MS);

		if (r == 0)
			die("bulk both: no progress for %d s", IO_TIMEOUT_MS / 1000);
		if (r < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		if (!shut && (p.revents & (POLLOUT | POLLERR))) {
			uint64_t left = o->bytes - sent;
			ssize_t n =
				send(fd, zeros, left < BUF_SIZE ? left : BUF_SIZE, MSG_NOSIGNAL);

			if (n < 0 && errno != EAGAIN && errno != EINTR)
				die("send: %s", strerror(errno));
			if (n > 0)
				sent += n;
			if (sent == o->bytes) {
				shutdown(fd, SHUT_WR);
				shut = true;
			}
		}
		if (!eof && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t n = recv(fd, buf, BUF_SIZE, 0);

			if (n < 0 && errno != EAGAIN && errno != EINTR)
				die("recv: %s", strerror(errno));
			if (n == 0)
				eof = true;
			if (n > 0)
				got += n;
		}
	}
	if (got != o->bytes)
		die("bulk both: sent %llu, got %llu of %llu bytes", (unsigned long long)sent,
		    (unsigned long long)got, (unsigned long long)o->bytes);
	printf("bulk_both_MBps %.1f\n", mbps(2 * o->bytes, now_ns() - t0));
	close(fd);
	free(buf);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void test_rr(const struct opts *o)
{
	uint8_t msg[MSG_LEN], back[MSG_LEN], cmd = CMD_ECHO;
	uint64_t *lat = calloc(o->rtts, sizeof(*lat)), sum = 0;
	int fd = cli_connect(o), warm = o->rtts / 10 + 100;

	if (!lat)
		die("out of memory");
	memset(msg, 'x', sizeof(msg));
	cli_send(fd, &cmd, 1);
	for (int i = -warm; i < o->rtts; i++) {
		uint64_t t0 = now_ns();

		cli_send(fd, msg, sizeof(msg));
		cli_recv(fd, back, sizeof(back), sizeof(back));
		if (i >= 0)
			lat[i] = now_ns() - t0;
	}
	for (int i = 0; i < o->rtts; i++)
		sum += lat[i];
	qsort(lat, o->rtts, sizeof(*lat), cmp_u64);
	printf("rr_p50_us %.1f\n", lat[o->rtts / 2] / 1000.0);
	printf("rr_p99_us %.1f\n", lat[(int)(o->rtts * 0.99)] / 1000.0);
	printf("rr_mean_us %.1f\n", sum / (double)o->rtts / 1000.0);
	shutdown(fd, SHUT_WR);
	cli_recv(fd, back, sizeof(back), 0);
	close(fd);
	free(lat);
}

static void test_conn(const struct opts *o)
{
	uint8_t msg[1 + MSG_LEN], back[MSG_LEN];
	uint64_t t0 = now_ns();

	memset(msg, 'c', sizeof(msg));
	msg[0] = CMD_ECHO;
	for (int i = 0; i < o->conns; i++) {
		int fd = cli_connect(o);

		cli_send(fd, msg, sizeof(msg));
		cli_recv(fd, back, sizeof(back), sizeof(back));
		close(fd);
	}
	printf("conn_per_s %.0f\n", o->conns / ((double)(now_ns() - t0) / 1e9));
}

/* Resident memory of process pid in KiB (smaps_rollup: every mapping), or -1. */
static long rss_kib(int pid)
{
	char path[64], line[256];
	long kib = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Rss: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/*
 * o->idle connections, each up end to end (one echo through it), then all held at once: the
 * growth of o->pid's resident memory per connection once they are idle.
 */
static void test_idle(const struct opts *o)
{
	uint8_t msg[2] = { CMD_ECHO, 'i' }, back;
	int *fds = calloc(o->idle, sizeof(*fds));
	long before = o->pid ? rss_kib(o->pid) : -1, after;
	uint64_t t0 = now_ns();

	if (!fds)
		die("out of memory");
	if (o->pid && before < 0)
		die("cannot read the memory of pid %d", o->pid);
	for (int i = 0; i < o->idle; i++) {
		fds[i] = cli_connect(o);
		cli_send(fds[i], msg, sizeof(msg));
		cli_recv(fds[i], &back, 1, 1);
		if (i && i % 2000 == 0)
			fprintf(stderr, "agbench: idle: %d of %d connections up\n", i, o->idle);
	}
	/* Let the gateway finish what the last exchanges started (logs, buffers given back). */
	usleep(500 * 1000);
	/* Every one still up: an echo on each. */
	for (int i = 0; i < o->idle; i++) {
		cli_send(fds[i], msg + 1, 1);
		cli_recv(fds[i], &back, 1, 1);
	}
	after = o->pid ? rss_kib(o->pid) : -1;
	printf("idle_held %d\n", o->idle);
	printf("idle_setup_s %.2f\n", (double)(now_ns() - t0) / 1e9);
	if (o->pid)
		printf("idle_kib_per_session %.1f\n", (double)(after - before) / o->idle);
	for (int i = 0; i < o->idle; i++)
		close(fds[i]);
	free(fds);
}

/* Room for n connections in the client, and in the server (forked: it inherits the limit). */
static void raise_nofile(int n)
{
	struct rlimit rl;
	rlim_t want = (rlim_t)n + 256;

	if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur >= want)
		return;
	rl.rlim_cur = want;
	if (rl.rlim_max < want)
		rl.rlim_max = want; /* root: up to fs.nr_open */
	if (setrlimit(RLIMIT_NOFILE, &rl))
		die("cannot raise the open file limit to %llu: %s", (unsigned long long)want,
		    strerror(errno));
}

static void join_cgroup(const char *cg)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/cgroup.procs", cg);
	f = fopen(path, "w");
	if (!f || fprintf(f, "%d\n", getpid()) < 0 || fclose(f))
		die("joining cgroup %s: %s", cg, strerror(errno));
}

static void usage(void)
{
	fprintf(stderr,
		"Usage: agbench [--addr IP] [--port PORT] [--cgroup DIR] [--bytes N] [--rtts N]\n"
		"               [--conns N] [--idle N] [--pid PID] [--timeout SEC] [TEST,...]\n"
		"  TEST := { up | down | both | rr | conn | idle } (default: all but idle)\n"
		"  idle holds --idle connections (10000) open at once and reports the growth of\n"
		"  --pid's resident memory per connection.\n"
		"  Starts a server on IP:PORT (127.0.0.2, an ephemeral port), moves itself into\n"
		"  the cgroup DIR (absolute path) if given, and runs the tests against the "
		"server.\n");
	exit(2);
}

static void on_alarm(int sig)
{
	static const char m[] = "agbench: time limit reached\n";

	(void)sig;
	if (write(2, m, sizeof(m) - 1) < 0)
		_exit(1);
	_exit(1);
}

static bool wanted(const char *tests, const char *name)
{
	size_t l = strlen(name);

	for (const char *p = tests; p && *p;) {
		const char *e = strchr(p, ',');
		size_t n = e ? (size_t)(e - p) : strlen(p);

		if (n == l && !strncmp(p, name, l))
			return true;
		p = e ? e + 1 : NULL;
	}
	return false;
}

int main(int argc, char **argv)
{
	static const struct option lo[] = { { "addr", required_argument, NULL, 'a' },
					    { "port", required_argument, NULL, 'p' },
					    { "cgroup", required_argument, NULL, 'c' },
					    { "bytes", required_argument, NULL, 'b' },
					    { "rtts", required_argument, NULL, 'r' },
					    { "conns", required_argument, NULL, 'n' },
					    { "timeout", required_argument, NULL, 't' },
					    { "idle", required_argument, NULL, 'i' },
					    { "pid", required_argument, NULL, 'P' },
					    { "help", no_argument, NULL, 'h' },
					    { 0 } };
	struct opts o = { .addr = "127.0.0.2",
			  .bytes = 1ULL << 30,
			  .rtts = 20000,
			  .conns = 2000,
			  .idle = 10000,
			  .duration_s = 120,
			  .tests = "up,down,both,rr,conn" };
	int c, lfd, status;
	pid_t srv;

	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case 'a':
			o.addr = optarg;
			break;
		case 'p':
			o.port = atoi(optarg);
			break;
		case 'c':
			o.cgroup = optarg;
			break;
		case 'b':
			o.bytes = strtoull(optarg, NULL, 0);
			break;
		case 'r':
			o.rtts = atoi(optarg);
			break;
		case 'n':
			o.conns = atoi(optarg);
			break;
		case 't':
			o.duration_s = atoi(optarg);
			break;
		case 'i':
			o.idle = atoi(optarg);
			break;
		case 'P':
			o.pid = atoi(optarg);
			break;
		default:
			usage();
		}
	}
	if (optind < argc)
		o.tests = argv[optind];
	if (o.port < 0 || o.port > 65535 || !o.bytes || o.rtts < 1 || o.conns < 1 ||
	    o.idle < 1 || o.pid < 0 || o.duration_s < 1)
		usage();

	if (wanted(o.tests, "idle"))
		raise_nofile(o.idle);
	/* The server is forked before the client moves: it stays outside the tagged cgroup. */
	lfd = make_listener(o.addr, o.port, &o.port);
	srv = fork();
	if (srv < 0)
		die("fork: %s", strerror(errno));
	if (srv == 0)
		serve(lfd);
	close(lfd);
	signal(SIGALRM, on_alarm);
	alarm(o.duration_s);
	if (o.cgroup)
		join_cgroup(o.cgroup);
	setvbuf(stdout, NULL, _IOLBF, 0);

	if (wanted(o.tests, "up"))
		test_up(&o);
	if (wanted(o.tests, "down"))
		test_down(&o);
	if (wanted(o.tests, "both"))
		test_both(&o);
	if (wanted(o.tests, "rr"))
		test_rr(&o);
	if (wanted(o.tests, "conn"))
		test_conn(&o);
	if (wanted(o.tests, "idle"))
		test_idle(&o);

	kill(srv, SIGKILL);
	waitpid(srv, &status, 0);
	return 0;
}
