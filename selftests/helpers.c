// SPDX-License-Identifier: GPL-2.0
/*
 * Helpers of the end-to-end tests; see helpers.h. Everything here logs to stdout (the test's
 * captured log) and returns an error instead of asserting. Forked children always leave with
 * _exit() so that the atexit cleanup runs only in the test process that registered it.
 */
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cgroup.h"
#include "ctl.h"
#include "helpers.h"
#include "test_progs.h"

#define th_log(fmt, ...) fprintf(stdout, "helpers: " fmt "\n", ##__VA_ARGS__)

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* ---- cgroups ---- */

static char cg_mount[PATH_MAX];
static char cg_base[64];
static pid_t cg_owner;

const char *th_cgroup_mount(void)
{
	return cg_mount;
}

int th_cgroup_setup(void)
{
	static bool registered;
	int err;

	if (cg_owner == getpid())
		return 0;
	err = ag_cgroup2_root(cg_mount, sizeof(cg_mount));
	if (err) {
		th_log("no cgroup2 mount in /proc/mounts: %s", strerror(-err));
		return err;
	}
	snprintf(cg_base, sizeof(cg_base), "/agentgate-test-%d", getpid());
	err = ag_cgroup_create(cg_mount, cg_base);
	if (err) {
		th_log("cannot create cgroup %s%s: %s", cg_mount, cg_base, strerror(-err));
		return err;
	}
	cg_owner = getpid();
	if (!registered) {
		atexit(th_cgroup_cleanup);
		registered = true;
	}
	return 0;
}

int th_cgroup_create(const char *name, char *rel, size_t len)
{
	int err = th_cgroup_setup();

	if (err)
		return err;
	if (!name || !*name || strstr(name, "..")) {
		th_log("bad test cgroup name '%s'", name ? name : "(null)");
		return -EINVAL;
	}
	if ((size_t)snprintf(rel, len, "%s/%s", cg_base, name) >= len)
		return -ENAMETOOLONG;
	err = ag_cgroup_create(cg_mount, rel);
	if (err)
		th_log("cannot create cgroup %s%s: %s", cg_mount, rel, strerror(-err));
	return err;
}

int th_cgroup_abs(const char *rel, char *out, size_t len)
{
	if (!cg_mount[0] && ag_cgroup2_root(cg_mount, sizeof(cg_mount)))
		return -ENOENT;
	return ag_cgroup_abs(cg_mount, rel, out, len);
}

int th_cgroup_id(const char *rel, uint64_t *id)
{
	int err;

	if (!cg_mount[0] && ag_cgroup2_root(cg_mount, sizeof(cg_mount)))
		return -ENOENT;
	err = ag_cgroup_id(cg_mount, rel, id);
	if (err)
		th_log("no cgroup id for %s: %s", rel, strerror(-err));
	return err;
}

/* SIGKILLs every process in path and below; the number of processes found. */
static int kill_cgroup_procs(const char *path)
{
	char sub[PATH_MAX], line[32];
	struct dirent *de;
	int found = 0;
	DIR *d;
	FILE *f;

	snprintf(sub, sizeof(sub), "%s/cgroup.procs", path);
	f = fopen(sub, "re");
	if (f) {
		while (fgets(line, sizeof(line), f)) {
			pid_t pid = atoi(line);

			if (pid > 0 && pid != getpid()) {
				kill(pid, SIGKILL);
				found++;
			}
		}
		fclose(f);
	}
	d = opendir(path);
	if (!d)
		return found;
	while ((de = readdir(d))) {
		if (de->d_type != DT_DIR || !strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(sub, sizeof(sub), "%s/%s", path, de->d_name);
		found += kill_cgroup_procs(sub);
	}
	closedir(d);
	return found;
}

int th_cgroup_reap(pid_t owner)
{
	char mount[PATH_MAX], rel[64], abs[PATH_MAX];
	struct stat st;
	int err;

	if (ag_cgroup2_root(mount, sizeof(mount)))
		return -ENOENT;
	snprintf(rel, sizeof(rel), "/agentgate-test-%d", owner);
	if (ag_cgroup_abs(mount, rel, abs, sizeof(abs)) || stat(abs, &st))
		return 0;
	/* Killed processes leave cgroup.procs only once reaped: bounded retries. */
	for (int i = 0; i < 200 && kill_cgroup_procs(abs); i++) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		sleep_ms(10);
	}
	err = ag_cgroup_destroy(mount, rel);
	if (err)
		th_log("cannot remove cgroup %s: %s", abs, strerror(-err));
	return err;
}

void th_cgroup_cleanup(void)
{
	if (cg_owner != getpid() || !cg_base[0])
		return;
	th_cgroup_reap(cg_owner);
	cg_owner = 0;
}

/* ---- processes ---- */

pid_t th_spawn_in_cgroup(const char *rel, int (*fn)(void *), void *arg)
{
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		th_log("fork: %s", strerror(errno));
		return -errno;
	}
	if (pid == 0) {
		int err = ag_cgroup_move(cg_mount, rel, 0), ret;

		if (err) {
			th_log("child %d: cannot move into %s: %s", getpid(), rel, strerror(-err));
			fflush(NULL);
			_exit(127);
		}
		ret = fn(arg);
		fflush(NULL);
		_exit(ret & 0xff);
	}
	return pid;
}

int th_wait(pid_t pid, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;
	int status;

	for (;;) {
		pid_t w = waitpid(pid, &status, WNOHANG);

		if (w == pid)
			break;
		if (w < 0) {
			if (errno == EINTR)
				continue;
			th_log("waitpid(%d): %s", pid, strerror(errno));
			return -errno;
		}
		if (now_ms() >= deadline) {
			th_log("process %d still runs after %d ms: killing it", pid, timeout_ms);
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			return -ETIMEDOUT;
		}
		sleep_ms(2);
	}
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

void *th_shared_alloc(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		th_log("mmap %zu bytes: %s", len, strerror(errno));
		return NULL;
	}
	return p;
}

void th_shared_free(void *p, size_t len)
{
	if (p)
		munmap(p, len);
}

const char *th_build_dir(void)
{
	static char dir[PATH_MAX];
	ssize_t n;
	char *slash;

	if (dir[0])
		return dir;
	n = readlink("/proc/self/exe", dir, sizeof(dir) - 1);
	if (n <= 0) {
		snprintf(dir, sizeof(dir), "build");
		return dir;
	}
	dir[n] = '\0';
	slash = strrchr(dir, '/');
	if (slash)
		*slash = '\0';
	return dir;
}

#define MAX_ARGS 64

static int split_args(char *s, char **argv, int max)
{
	int n = 0;

	for (char *save = NULL, *tok = strtok_r(s, " ", &save); tok;
	     tok = strtok_r(NULL, " ", &save)) {
		if (n >= max - 1)
			return -E2BIG;
		argv[n++] = tok;
	}
	argv[n] = NULL;
	return n;
}

/* fork + exec argv, stdout into out; bounded by timeout_ms. */
static int run_argv(char *const argv[], char *out, size_t len, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;
	size_t used = 0;
	int pfd[2], status;
	pid_t pid;

	if (out && len)
		out[0] = '\0';
	if (pipe2(pfd, O_CLOEXEC))
		return -errno;
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		close(pfd[0]);
		close(pfd[1]);
		return -errno;
	}
	if (pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		execv(argv[0], argv);
		fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	close(pfd[1]);
	for (;;) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		char buf[4096];
		long left = deadline - now_ms();
		ssize_t n;

		if (left <= 0) {
			th_log("%s: still runs after %d ms: killing it", argv[0], timeout_ms);
			kill(pid, SIGKILL);
			break;
		}
		if (poll(&p, 1, (int)left) <= 0)
			continue;
		n = read(pfd[0], buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (out && used + 1 < len) {
			size_t c = (size_t)n < len - 1 - used ? (size_t)n : len - 1 - used;

			memcpy(out + used, buf, c);
			used += c;
			out[used] = '\0';
		}
	}
	close(pfd[0]);
	if (waitpid(pid, &status, 0) < 0)
		return -errno;
	if (WIFSIGNALED(status))
		return now_ms() >= deadline ? -ETIMEDOUT : 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

static int run_fmt(const char *prefix[], int nprefix, char *out, size_t len, const char *fmt,
		   va_list ap)
{
	char cmd[4096], *argv[MAX_ARGS + 8];
	int n;

	if (vsnprintf(cmd, sizeof(cmd), fmt, ap) >= (int)sizeof(cmd))
		return -E2BIG;
	for (n = 0; n < nprefix; n++)
		argv[n] = (char *)prefix[n];
	if (split_args(cmd, argv + n, MAX_ARGS) < 0)
		return -E2BIG;
	if (test__verbose()) {
		printf("helpers: run");
		for (int i = 0; argv[i]; i++)
			printf(" %s", argv[i]);
		printf("\n");
	}
	return run_argv(argv, out, len, 60000);
}

int th_run(char *out, size_t len, const char *fmt, ...)
{
	char cmd[4096], *argv[MAX_ARGS + 1], path[PATH_MAX];
	va_list ap;

	va_start(ap, fmt);
	if (vsnprintf(cmd, sizeof(cmd), fmt, ap) >= (int)sizeof(cmd)) {
		va_end(ap);
		return -E2BIG;
	}
	va_end(ap);
	if (split_args(cmd, argv, MAX_ARGS) <= 0)
		return -EINVAL;
	/* execv() needs a path: look bare names up in the usual places. */
	if (!strchr(argv[0], '/')) {
		static const char *const dirs[] = { "/usr/local/sbin", "/usr/local/bin",
						    "/usr/sbin",       "/usr/bin",
						    "/sbin",	       "/bin" };
		bool found = false;

		for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
			snprintf(path, sizeof(path), "%s/%s", dirs[i], argv[0]);
			if (!access(path, X_OK)) {
				found = true;
				break;
			}
		}
		if (!found) {
			th_log("%s: not found", argv[0]);
			return -ENOENT;
		}
		argv[0] = path;
	}
	return run_argv(argv, out, len, 60000);
}

/* ---- deterministic data and hashes ---- */

void th_prng_init(struct th_prng *p, uint64_t seed)
{
	p->state = seed ? seed : 0x9e3779b97f4a7c15ull;
	p->left = 0;
}

static uint64_t prng_next(struct th_prng *p)
{
	uint64_t x = p->state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	p->state = x;
	return x * 0x2545f4914f6cdd1dull;
}

void th_prng_fill(struct th_prng *p, void *buf, size_t len)
{
	uint8_t *b = buf;

	while (len && p->left) {
		*b++ = (uint8_t)p->word;
		p->word >>= 8;
		p->left--;
		len--;
	}
	while (len >= 8) {
		uint64_t w = prng_next(p);

		/* Little-endian byte order, the same as the tail path below. */
		for (int i = 0; i < 8; i++)
			b[i] = (uint8_t)(w >> (8 * i));
		b += 8;
		len -= 8;
	}
	if (len) {
		p->word = prng_next(p);
		p->left = 8;
		while (len) {
			*b++ = (uint8_t)p->word;
			p->word >>= 8;
			p->left--;
			len--;
		}
	}
}

int th_prng_sha256(uint64_t seed, uint64_t n, uint8_t out[32])
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	struct th_prng p;
	uint8_t buf[65536];
	unsigned int olen;
	int err = 0;

	if (!ctx)
		return -ENOMEM;
	th_prng_init(&p, seed);
	if (!EVP_DigestInit_ex(ctx, EVP_sha256(), NULL)) {
		err = -EINVAL;
		goto out;
	}
	while (n) {
		size_t c = n < sizeof(buf) ? n : sizeof(buf);

		th_prng_fill(&p, buf, c);
		EVP_DigestUpdate(ctx, buf, c);
		n -= c;
	}
	if (!EVP_DigestFinal_ex(ctx, out, &olen))
		err = -EINVAL;
out:
	EVP_MD_CTX_free(ctx);
	return err;
}

int th_sha256(const void *buf, size_t len, uint8_t out[32])
{
	unsigned int olen;

	return EVP_Digest(buf, len, out, &olen, EVP_sha256(), NULL) ? 0 : -EINVAL;
}

void th_hex(const uint8_t *in, size_t len, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < len; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * len] = '\0';
}

/* ---- servers ---- */

#define SRV_BUF (256 * 1024)
#define SRV_MAX_PEERS 4096

struct srv_conn {
	int fd;
	bool rd_eof, wr_done;
	uint8_t *buf; /* SRV_BUF: pending echo / sink output / reply */
	size_t len, off;
	EVP_MD_CTX *in, *out;
	struct th_report rep;
	uint64_t out_left;
	struct th_prng prng;
	uint32_t events;
};

struct th_server {
	enum th_server_kind kind;
	int family;
	int lfd, efd, stopfd;
	int port;
	pthread_t thread;
	bool thread_started;
	uint64_t send_bytes, seed;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	int accepted;
	int peer_ports[SRV_MAX_PEERS];
	struct th_report *reports;
	int nreports, capreports;
	struct srv_conn **conns; /* live ones, for stop */
	int nconns, capconns;
};

static void srv_track(struct th_server *s, struct srv_conn *c, bool add)
{
	if (add) {
		if (s->nconns == s->capconns) {
			int cap = s->capconns ? 2 * s->capconns : 64;
			struct srv_conn **n = realloc(s->conns, cap * sizeof(*n));

			if (!n)
				return;
			s->conns = n;
			s->capconns = cap;
		}
		s->conns[s->nconns++] = c;
		return;
	}
	for (int i = 0; i < s->nconns; i++) {
		if (s->conns[i] == c) {
			s->conns[i] = s->conns[--s->nconns];
			return;
		}
	}
}

static void srv_report(struct th_server *s, struct th_report *r)
{
	pthread_mutex_lock(&s->lock);
	if (s->nreports == s->capreports) {
		int cap = s->capreports ? 2 * s->capreports : 64;
		struct th_report *n = realloc(s->reports, cap * sizeof(*n));

		if (n) {
			s->reports = n;
			s->capreports = cap;
		}
	}
	if (s->nreports < s->capreports)
		s->reports[s->nreports++] = *r;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

static void conn_free(struct th_server *s, struct srv_conn *c)
{
	epoll_ctl(s->efd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	EVP_MD_CTX_free(c->in);
	EVP_MD_CTX_free(c->out);
	free(c->buf);
	srv_track(s, c, false);
	free(c);
}

/* The connection ended (error or both directions done): report and free it. */
static void conn_end(struct th_server *s, struct srv_conn *c, int error)
{
	unsigned int olen;

	if (s->kind == TH_SRV_SINK || s->kind == TH_SRV_HALFCLOSE) {
		c->rep.error = error;
		EVP_DigestFinal_ex(c->in, c->rep.sha_in, &olen);
		EVP_DigestFinal_ex(c->out, c->rep.sha_out, &olen);
		srv_report(s, &c->rep);
	}
	conn_free(s, c);
}

static void conn_want(struct th_server *s, struct srv_conn *c, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };

	if (events == c->events)
		return;
	c->events = events;
	epoll_ctl(s->efd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Writes buf[off..len); true when all is out, false when it would block. -errno on error. */
static int conn_flush(struct srv_conn *c)
{
	while (c->off < c->len) {
		ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 0;
			return -errno;
		}
		c->off += n;
	}
	c->off = c->len = 0;
	return 1;
}

/* Reads what is there; hashes it; 0 at EOF, 1 when it would block, -errno on error. */
static int conn_read(struct srv_conn *c, uint8_t *tmp, size_t tmplen, bool echo)
{
	for (;;) {
		uint8_t *dst = echo ? c->buf + c->len : tmp;
		size_t room = echo ? SRV_BUF - c->len : tmplen;
		ssize_t n;

		if (!room)
			return 1;
		n = recv(c->fd, dst, room, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 1;
			return -errno;
		}
		if (n == 0)
			return 0;
		c->rep.bytes_in += n;
		if (c->in)
			EVP_DigestUpdate(c->in, dst, n);
		if (echo)
			c->len += n;
	}
}

/* Writes what c holds: true when it is all out; else c has ended or waits to write. */
static bool conn_flushed(struct th_server *s, struct srv_conn *c)
{
	int r = conn_flush(c);

	if (r < 0)
		conn_end(s, c, -r);
	else if (!r)
		conn_want(s, c, EPOLLOUT);
	return r > 0;
}

static void echo_event(struct th_server *s, struct srv_conn *c, uint32_t ev)
{
	int r;

	if (c->len && !conn_flushed(s, c))
		return;
	if (!c->rd_eof) {
		r = conn_read(c, NULL, 0, true);
		if (r < 0)
			return conn_end(s, c, -r);
		if (r == 0)
			c->rd_eof = true;
		if (c->len && !conn_flushed(s, c))
			return;
	}
	if (c->rd_eof && !c->len) {
		shutdown(c->fd, SHUT_WR);
		return conn_end(s, c, 0);
	}
	conn_want(s, c, EPOLLIN);
}

static void sink_event(struct th_server *s, struct srv_conn *c, uint32_t ev)
{
	uint8_t tmp[65536];
	int r;

	if (!c->rd_eof) {
		r = conn_read(c, tmp, sizeof(tmp), false);
		if (r < 0)
			return conn_end(s, c, -r);
		if (r == 0)
			c->rd_eof = true;
	}
	while (!c->wr_done) {
		if (!c->len) {
			size_t n = c->out_left < SRV_BUF ? c->out_left : SRV_BUF;

			if (!n) {
				shutdown(c->fd, SHUT_WR);
				c->wr_done = true;
				break;
			}
			th_prng_fill(&c->prng, c->buf, n);
			EVP_DigestUpdate(c->out, c->buf, n);
			c->len = n;
			c->off = 0;
			c->out_left -= n;
			c->rep.bytes_out += n;
		}
		r = conn_flush(c);
		if (r < 0)
			return conn_end(s, c, -r);
		if (!r)
			break;
	}
	if (c->rd_eof && c->wr_done)
		return conn_end(s, c, 0);
	conn_want(s, c, (c->rd_eof ? 0 : EPOLLIN) | (c->wr_done ? 0 : EPOLLOUT));
}

static void halfclose_event(struct th_server *s, struct srv_conn *c, uint32_t ev)
{
	uint8_t tmp[65536];
	int r;

	if (!c->rd_eof) {
		r = conn_read(c, tmp, sizeof(tmp), false);
		if (r < 0)
			return conn_end(s, c, -r);
		if (r > 0)
			return conn_want(s, c, EPOLLIN);
		c->rd_eof = true;
		{
			EVP_MD_CTX *copy = EVP_MD_CTX_new();
			uint8_t sha[32];
			char hex[65];
			unsigned int olen;

			/* The reply names the hash so far; the report keeps its own final. */
			EVP_MD_CTX_copy_ex(copy, c->in);
			EVP_DigestFinal_ex(copy, sha, &olen);
			EVP_MD_CTX_free(copy);
			th_hex(sha, 32, hex);
			c->len = snprintf((char *)c->buf, SRV_BUF, "ok %llu %s\n",
					  (unsigned long long)c->rep.bytes_in, hex);
			c->off = 0;
			EVP_DigestUpdate(c->out, c->buf, c->len);
			c->rep.bytes_out = c->len;
		}
	}
	if (!conn_flushed(s, c))
		return;
	shutdown(c->fd, SHUT_WR);
	conn_end(s, c, 0);
}

static void srv_accept(struct th_server *s)
{
	for (;;) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		struct epoll_event ev;
		struct srv_conn *c;
		int fd = accept4(s->lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		int port = 0;

		if (fd < 0)
			return;
		if (ss.ss_family == AF_INET)
			port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
		else if (ss.ss_family == AF_INET6)
			port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
		pthread_mutex_lock(&s->lock);
		if (s->accepted < SRV_MAX_PEERS)
			s->peer_ports[s->accepted] = port;
		s->accepted++;
		pthread_cond_broadcast(&s->cond);
		pthread_mutex_unlock(&s->lock);

		if (s->kind == TH_SRV_RESET) {
			struct linger l = { .l_onoff = 1, .l_linger = 0 };

			setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
			close(fd);
			continue;
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->buf = malloc(SRV_BUF);
		c->in = EVP_MD_CTX_new();
		c->out = EVP_MD_CTX_new();
		if (!c->buf || !c->in || !c->out) {
			conn_free(s, c); /* not tracked nor watched yet: that part is a no-op */
			continue;
		}
		EVP_DigestInit_ex(c->in, EVP_sha256(), NULL);
		EVP_DigestInit_ex(c->out, EVP_sha256(), NULL);
		c->rep.peer_port = port;
		if (ss.ss_family == AF_INET)
			inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, c->rep.peer,
				  sizeof(c->rep.peer));
		else
			inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, c->rep.peer,
				  sizeof(c->rep.peer));
		c->out_left = s->send_bytes;
		th_prng_init(&c->prng, s->seed);
		c->events = EPOLLIN | (s->kind == TH_SRV_SINK ? EPOLLOUT : 0);
		ev.events = c->events;
		ev.data.ptr = c;
		if (epoll_ctl(s->efd, EPOLL_CTL_ADD, fd, &ev)) {
			conn_free(s, c);
			continue;
		}
		srv_track(s, c, true);
	}
}

static void *srv_thread(void *arg)
{
	struct th_server *s = arg;
	struct epoll_event evs[64];

	for (;;) {
		int n = epoll_wait(s->efd, evs, 64, 1000);

		for (int i = 0; i < n; i++) {
			struct srv_conn *c = evs[i].data.ptr;

			if (c == (void *)&s->lfd) {
				srv_accept(s);
				continue;
			}
			if (c == (void *)&s->stopfd)
				return NULL;
			switch (s->kind) {
			case TH_SRV_ECHO:
				echo_event(s, c, evs[i].events);
				break;
			case TH_SRV_SINK:
				sink_event(s, c, evs[i].events);
				break;
			case TH_SRV_HALFCLOSE:
				halfclose_event(s, c, evs[i].events);
				break;
			case TH_SRV_RESET:
				break;
			}
		}
	}
	return NULL;
}

static int make_sockaddr(int family, const char *addr, int port, struct sockaddr_storage *ss,
			 socklen_t *sl)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;

		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1)
			return -EINVAL;
		*sl = sizeof(*sin);
		return 0;
	}
	if (family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		if (inet_pton(AF_INET6, addr, &sin6->sin6_addr) != 1)
			return -EINVAL;
		*sl = sizeof(*sin6);
		return 0;
	}
	return -EAFNOSUPPORT;
}

static struct th_server *server_new(enum th_server_kind kind, int family, const char *addr,
				    uint64_t send_bytes, uint64_t seed)
{
	struct th_server *s = calloc(1, sizeof(*s));
	struct sockaddr_storage ss;
	struct epoll_event ev;
	socklen_t sl;
	int one = 1, err;

	if (!s)
		return NULL;
	s->kind = kind;
	s->family = family;
	s->send_bytes = send_bytes;
	s->seed = seed;
	s->lfd = s->efd = s->stopfd = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);

	err = make_sockaddr(family, addr, 0, &ss, &sl);
	if (err) {
		th_log("server: bad address %s", addr);
		goto fail;
	}
	s->lfd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->lfd < 0)
		goto fail_errno;
	setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s->lfd, (struct sockaddr *)&ss, sl) || listen(s->lfd, 1024))
		goto fail_errno;
	sl = sizeof(ss);
	if (getsockname(s->lfd, (struct sockaddr *)&ss, &sl))
		goto fail_errno;
	s->port = ntohs(family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
					  : ((struct sockaddr_in6 *)&ss)->sin6_port);
	s->efd = epoll_create1(EPOLL_CLOEXEC);
	s->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->efd < 0 || s->stopfd < 0)
		goto fail_errno;
	ev.events = EPOLLIN;
	ev.data.ptr = &s->lfd;
	if (epoll_ctl(s->efd, EPOLL_CTL_ADD, s->lfd, &ev))
		goto fail_errno;
	ev.data.ptr = &s->stopfd;
	if (epoll_ctl(s->efd, EPOLL_CTL_ADD, s->stopfd, &ev))
		goto fail_errno;
	err = pthread_create(&s->thread, NULL, srv_thread, s);
	if (err) {
		errno = err;
		goto fail_errno;
	}
	s->thread_started = true;
	return s;

fail_errno:
	err = -errno;
	th_log("server on %s: %s", addr, strerror(errno));
fail:
	th_server_stop(s);
	errno = -err;
	return NULL;
}

struct th_server *th_server_start(enum th_server_kind kind, int family, const char *addr)
{
	return server_new(kind, family, addr, 0, 0);
}

struct th_server *th_server_sink(int family, const char *addr, uint64_t send_bytes, uint64_t seed)
{
	return server_new(TH_SRV_SINK, family, addr, send_bytes, seed);
}

int th_server_port(const struct th_server *s)
{
	return s ? s->port : -1;
}

int th_server_accepted(struct th_server *s)
{
	int n;

	pthread_mutex_lock(&s->lock);
	n = s->accepted;
	pthread_mutex_unlock(&s->lock);
	return n;
}

int th_server_peer_port(struct th_server *s, int i)
{
	int port = -1;

	pthread_mutex_lock(&s->lock);
	if (i >= 0 && i < s->accepted && i < SRV_MAX_PEERS)
		port = s->peer_ports[i];
	pthread_mutex_unlock(&s->lock);
	return port;
}

int th_server_wait_reports(struct th_server *s, int n, int timeout_ms)
{
	struct timespec ts;
	int err = 0;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&s->lock);
	while (s->nreports < n && !err)
		err = pthread_cond_timedwait(&s->cond, &s->lock, &ts);
	if (s->nreports >= n)
		err = 0;
	pthread_mutex_unlock(&s->lock);
	if (err)
		th_log("server :%d: %d of %d connections reported after %d ms", s->port,
		       s->nreports, n, timeout_ms);
	return err ? -ETIMEDOUT : 0;
}

int th_server_report(struct th_server *s, int i, struct th_report *r)
{
	int err = -ENOENT;

	pthread_mutex_lock(&s->lock);
	if (i >= 0 && i < s->nreports) {
		*r = s->reports[i];
		err = 0;
	}
	pthread_mutex_unlock(&s->lock);
	return err;
}

void th_server_stop(struct th_server *s)
{
	if (!s)
		return;
	if (s->thread_started) {
		uint64_t one = 1;

		if (write(s->stopfd, &one, sizeof(one)) < 0)
			th_log("server stop: %s", strerror(errno));
		pthread_join(s->thread, NULL);
	}
	while (s->nconns)
		conn_free(s, s->conns[0]);
	if (s->lfd >= 0)
		close(s->lfd);
	if (s->efd >= 0)
		close(s->efd);
	if (s->stopfd >= 0)
		close(s->stopfd);
	free(s->conns);
	free(s->reports);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	free(s);
}

/* ---- clients ---- */

int th_connect(int family, const char *addr, int port, int timeout_ms)
{
	struct sockaddr_storage ss;
	struct pollfd p;
	socklen_t sl;
	int fd, err, flags;

	err = make_sockaddr(family, addr, port, &ss, &sl);
	if (err)
		return err;
	fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&ss, sl)) {
		if (errno != EINPROGRESS) {
			err = -errno;
			goto fail;
		}
		p.fd = fd;
		p.events = POLLOUT;
		for (;;) {
			int r = poll(&p, 1, timeout_ms);

			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0) {
				err = r ? -errno : -ETIMEDOUT;
				goto fail;
			}
			break;
		}
		sl = sizeof(err);
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl)) {
			err = -errno;
			goto fail;
		}
		if (err) {
			err = -err;
			goto fail;
		}
	}
	flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
	return fd;
fail:
	close(fd);
	return err;
}

static int wait_fd(int fd, short events, long deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		long left = deadline - now_ms();
		int r;

		if (left <= 0)
			return -ETIMEDOUT;
		r = poll(&p, 1, (int)left);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r > 0)
			return 0;
	}
}

int th_send_all(int fd, const void *buf, size_t len, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;
	const uint8_t *b = buf;

	while (len) {
		ssize_t n;
		int err = wait_fd(fd, POLLOUT, deadline);

		if (err)
			return err;
		n = send(fd, b, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		b += n;
		len -= n;
	}
	return 0;
}

ssize_t th_recv_all(int fd, void *buf, size_t len, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;
	uint8_t *b = buf;
	size_t got = 0;

	while (got < len) {
		ssize_t n;
		int err = wait_fd(fd, POLLIN, deadline);

		if (err)
			return err;
		n = recv(fd, b + got, len - got, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		got += n;
	}
	return got;
}

int th_xfer(int fd, uint64_t up_bytes, uint64_t up_seed, int timeout_ms, struct th_xfer *x)
{
	return th_xfer_chunked(fd, up_bytes, up_seed, 0, timeout_ms, x);
}

int th_xfer_chunked(int fd, uint64_t up_bytes, uint64_t up_seed, size_t max_chunk, int timeout_ms,
		    struct th_xfer *x)
{
	struct th_prng sizes;
	long deadline = now_ms() + timeout_ms;
	EVP_MD_CTX *in = EVP_MD_CTX_new(), *out = EVP_MD_CTX_new();
	size_t bufsz = 256 * 1024, olen = 0, ooff = 0;
	uint8_t *obuf = malloc(bufsz), *ibuf = malloc(bufsz);
	uint64_t left = up_bytes;
	bool wr_done = false, rd_done = false;
	struct th_prng prng;
	unsigned int dlen;
	int err = 0;

	memset(x, 0, sizeof(*x));
	if (!in || !out || !obuf || !ibuf) {
		err = -ENOMEM;
		goto out;
	}
	EVP_DigestInit_ex(in, EVP_sha256(), NULL);
	EVP_DigestInit_ex(out, EVP_sha256(), NULL);
	th_prng_init(&prng, up_seed);
	th_prng_init(&sizes, up_seed ^ 0x5a5a5a5a);
	while (!wr_done || !rd_done) {
		struct pollfd p = { .fd = fd };
		long tl = deadline - now_ms();
		int r;

		if (!wr_done && !olen) {
			size_t n = left < bufsz ? left : bufsz;

			if (!n) {
				shutdown(fd, SHUT_WR);
				wr_done = true;
				continue;
			}
			th_prng_fill(&prng, obuf, n);
			EVP_DigestUpdate(out, obuf, n);
			olen = n;
			ooff = 0;
			left -= n;
		}
		if (tl <= 0) {
			err = -ETIMEDOUT;
			break;
		}
		p.events = (wr_done ? 0 : POLLOUT) | (rd_done ? 0 : POLLIN);
		r = poll(&p, 1, (int)tl);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			err = -errno;
			break;
		}
		if (!r)
			continue;
		if (!rd_done && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t n = recv(fd, ibuf, bufsz, MSG_DONTWAIT);

			if (n > 0) {
				EVP_DigestUpdate(in, ibuf, n);
				x->bytes_in += n;
			} else if (n == 0) {
				rd_done = true;
				x->eof_while_sending = !wr_done;
			} else if (errno != EAGAIN && errno != EINTR) {
				err = -errno;
				break;
			}
		}
		if (!wr_done && (p.revents & (POLLOUT | POLLERR))) {
			size_t want = olen - ooff;
			ssize_t n;

			if (max_chunk) {
				uint32_t r32;

				th_prng_fill(&sizes, &r32, sizeof(r32));
				if (want > r32 % max_chunk + 1)
					want = r32 % max_chunk + 1;
			}
			n = send(fd, obuf + ooff, want, MSG_NOSIGNAL | MSG_DONTWAIT);

			if (n > 0) {
				ooff += n;
				x->bytes_out += n;
				if (ooff == olen)
					olen = ooff = 0;
			} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
				err = -errno;
				break;
			}
		}
	}
	EVP_DigestFinal_ex(in, x->sha_in, &dlen);
	EVP_DigestFinal_ex(out, x->sha_out, &dlen);
out:
	x->error = -err;
	EVP_MD_CTX_free(in);
	EVP_MD_CTX_free(out);
	free(obuf);
	free(ibuf);
	return err;
}

/* ---- client jobs ---- */

static int job_conn_exchange(struct th_job *j, int fd, int i, long deadline, struct th_xfer *x)
{
	long left = deadline - now_ms();
	int err;

	if (left <= 0)
		return -ETIMEDOUT;
	if (j->up_bytes) {
		err = th_xfer_chunked(fd, j->up_bytes, j->seed + i, j->max_chunk, (int)left, x);
		if (err)
			return err;
		if (j->expect_echo &&
		    (x->bytes_in != x->bytes_out || memcmp(x->sha_in, x->sha_out, 32)))
			return -EBADMSG;
		return 0;
	}
	{
		char line[64], back[64];
		size_t n = snprintf(line, sizeof(line), "hello %d/%d\n", getpid(), i);
		ssize_t r;

		err = th_send_all(fd, line, n, (int)left);
		if (err)
			return err;
		x->bytes_out = n;
		if (!j->expect_echo)
			return 0;
		r = th_recv_all(fd, back, n, (int)(deadline - now_ms()));
		if (r < 0)
			return (int)r;
		x->bytes_in = r;
		if ((size_t)r != n || memcmp(line, back, n))
			return -EBADMSG;
		return 0;
	}
}

int th_job_run(void *arg)
{
	struct th_job *j = arg;
	int n = j->nconns > 0 ? j->nconns : 1, *fds, err;
	long deadline = now_ms() + (j->timeout_ms ? j->timeout_ms : 30000);

	j->pid = getpid();
	if (j->comm[0])
		prctl(PR_SET_NAME, j->comm, 0, 0, 0);
	if (j->gid && setresgid(j->gid, j->gid, j->gid))
		return 3;
	if (j->uid && setresuid(j->uid, j->uid, j->uid))
		return 3;
	fds = calloc(n, sizeof(*fds));
	if (!fds)
		return 4;
	for (int i = 0; i < n; i++) {
		long left = deadline - now_ms();

		fds[i] = th_connect(j->family, j->addr, j->port, left > 0 ? (int)left : 1);
		if (i == 0)
			j->connect_err = fds[i] < 0 ? fds[i] : 0;
		if (fds[i] < 0) {
			if (!j->first_error)
				j->first_error = -fds[i];
			j->bad++;
			continue;
		}
		j->nconnected++;
		if (i == 0) {
			struct sockaddr_storage ss;
			socklen_t sl = sizeof(ss);

			if (!getsockname(fds[i], (struct sockaddr *)&ss, &sl))
				j->local_port =
					ntohs(ss.ss_family == AF_INET
						      ? ((struct sockaddr_in *)&ss)->sin_port
						      : ((struct sockaddr_in6 *)&ss)->sin6_port);
		}
	}
	/* All are open at once; now the exchanges, one after another. */
	for (int i = 0; i < n; i++) {
		struct th_xfer x = { 0 };

		if (fds[i] < 0)
			continue;
		err = job_conn_exchange(j, fds[i], i, deadline, &x);
		if (i == 0)
			j->x = x;
		if (err) {
			if (!j->first_error)
				j->first_error = -err;
			j->bad++;
		}
	}
	if (j->hold_ms) {
		long until = now_ms() + j->hold_ms;

		j->ready = 1;
		while (!j->release && now_ms() < until)
			sleep_ms(10);
		for (int i = 0; j->again && i < n; i++) {
			struct th_xfer x = { 0 };

			if (fds[i] < 0)
				continue;
			err = job_conn_exchange(j, fds[i], i, now_ms() + 10000, &x);
			if (err) {
				if (!j->first_error)
					j->first_error = -err;
				j->bad++;
			}
		}
	}
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free(fds);
	return j->bad ? 1 : 0;
}

/* ---- policies and attached programs ---- */

int th_policy_tcp(char *buf, size_t len, const char *cgroup, ...)
{
	size_t off = 0;
	const char *name;
	va_list ap;
	int n;

	n = snprintf(buf, len,
		     "apiVersion: agentgate/v1\n"
		     "agents:\n"
		     "  - name: t\n"
		     "    cgroup: %s\n"
		     "targets:\n",
		     cgroup);
	if (n < 0 || (size_t)n >= len)
		return -ENOSPC;
	off = n;
	va_start(ap, cgroup);
	while ((name = va_arg(ap, const char *))) {
		const char *addr = va_arg(ap, const char *);

		n = snprintf(buf + off, len - off,
			     "  - name: %s\n"
			     "    protocol: tcp\n"
			     "    address: \"%s\"\n",
			     name, addr);
		if (n < 0 || (size_t)n >= len - off) {
			va_end(ap);
			return -ENOSPC;
		}
		off += n;
	}
	va_end(ap);
	n = snprintf(buf + off, len - off, "default: deny\n");
	return n < 0 || (size_t)n >= len - off ? -ENOSPC : 0;
}

int th_cgroup_progs(const char *rel, struct th_cg_progs *c)
{
	static char out[65536];
	char abs[PATH_MAX];
	yajl_val v;
	int rc;

	memset(c, 0, sizeof(*c));
	rc = th_cgroup_abs(rel, abs, sizeof(abs));
	if (rc)
		return rc;
	rc = th_run(out, sizeof(out), "bpftool -j cgroup show %s", abs);
	if (rc) {
		th_log("bpftool cgroup show %s exited with %d", abs, rc);
		return rc < 0 ? rc : -EIO;
	}
	if (!out[strspn(out, " \n")])
		return 0; /* nothing attached: bpftool prints nothing */
	v = th_json_parse(out);
	if (!v || !YAJL_IS_ARRAY(v)) {
		yajl_tree_free(v);
		return -EBADMSG;
	}
	for (size_t i = 0; i < v->u.array.len; i++) {
		const char *t = th_json_str(v->u.array.values[i], "attach_type");

		c->total++;
		if (!t)
			continue;
		if (!strcmp(t, "cgroup_inet4_connect") || !strcmp(t, "connect4"))
			c->connect4++;
		else if (!strcmp(t, "cgroup_inet6_connect") || !strcmp(t, "connect6"))
			c->connect6++;
		else if (!strcmp(t, "cgroup_sock_ops") || !strcmp(t, "sock_ops"))
			c->sockops++;
	}
	yajl_tree_free(v);
	return 0;
}

int th_pinned_map_entries(const char *pin_root, const char *name)
{
	struct bpf_map_info info = { 0 };
	__u32 ilen = sizeof(info);
	char path[PATH_MAX];
	uint8_t *key = NULL, *next = NULL;
	int fd, n = 0, err;

	snprintf(path, sizeof(path), "%s/%s", pin_root, name);
	fd = bpf_obj_get(path);
	if (fd < 0) {
		err = -errno;
		th_log("bpf_obj_get %s: %s", path, strerror(errno));
		return err;
	}
	err = bpf_obj_get_info_by_fd(fd, &info, &ilen);
	if (err)
		goto out;
	key = calloc(1, info.key_size);
	next = calloc(1, info.key_size);
	if (!key || !next) {
		err = -ENOMEM;
		goto out;
	}
	/* Bounded by the map's size: a map changing under us cannot keep this going. */
	for (err = bpf_map_get_next_key(fd, NULL, next); !err && n <= (int)info.max_entries;
	     err = bpf_map_get_next_key(fd, key, next)) {
		n++;
		memcpy(key, next, info.key_size);
	}
	err = err == -ENOENT || errno == ENOENT ? 0 : -errno;
out:
	free(key);
	free(next);
	close(fd);
	return err ? err : n;
}

/* Does the program of id use the map of id map_id? Its name into name. */
static bool prog_uses_map(uint32_t id, uint32_t map_id, char *name, size_t len)
{
	struct bpf_prog_info info = { 0 };
	__u32 ilen = sizeof(info), ids[64];
	bool found = false;
	int fd = bpf_prog_get_fd_by_id(id);

	name[0] = '\0';
	if (fd < 0)
		return false;
	info.nr_map_ids = sizeof(ids) / sizeof(ids[0]);
	info.map_ids = (uintptr_t)ids;
	if (!bpf_obj_get_info_by_fd(fd, &info, &ilen)) {
		snprintf(name, len, "%s", info.name);
		for (__u32 i = 0; i < info.nr_map_ids && i < sizeof(ids) / sizeof(ids[0]); i++)
			found |= ids[i] == map_id;
	}
	close(fd);
	return found;
}

int th_pinned_map_id(const char *pin_root, const char *name)
{
	struct bpf_map_info info = { 0 };
	__u32 ilen = sizeof(info);
	char path[PATH_MAX];
	int fd, rc;

	snprintf(path, sizeof(path), "%s/%s", pin_root, name);
	fd = bpf_obj_get(path);
	if (fd < 0) {
		rc = -errno;
		th_log("bpf_obj_get %s: %s", path, strerror(errno));
		return rc;
	}
	rc = bpf_obj_get_info_by_fd(fd, &info, &ilen) ? -errno : (int)info.id;
	close(fd);
	return rc;
}

int th_bpf_links(uint32_t map_id, const char *prog_name)
{
	static char out[1 << 20];
	char name[64];
	int rc, n = 0;
	yajl_val v;

	rc = th_run(out, sizeof(out), "bpftool -j link show");
	if (rc) {
		th_log("bpftool link show exited with %d", rc);
		return rc < 0 ? rc : -EIO;
	}
	if (!out[strspn(out, " \n")])
		return 0;
	v = th_json_parse(out);
	if (!v || !YAJL_IS_ARRAY(v)) {
		yajl_tree_free(v);
		return -EBADMSG;
	}
	for (size_t i = 0; i < v->u.array.len; i++) {
		long long prog_id;

		if (!th_json_int(v->u.array.values[i], "prog_id", &prog_id))
			continue;
		if (prog_uses_map(prog_id, map_id, name, sizeof(name)) && !strcmp(name, prog_name))
			n++;
	}
	yajl_tree_free(v);
	return n;
}

/* ---- the daemon ---- */

static int daemon_counter;

static int write_text(const char *path, const char *text, mode_t mode)
{
	size_t len = strlen(text), off = 0;
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);

	if (fd < 0)
		return -errno;
	while (off < len) {
		ssize_t n = write(fd, text + off, len - off);

		if (n < 0) {
			int err = -errno;

			close(fd);
			return err;
		}
		off += n;
	}
	return close(fd) ? -errno : 0;
}

static int free_port(void)
{
	struct sockaddr_in sin = { .sin_family = AF_INET,
				   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	if (fd < 0)
		return -errno;
	if (!bind(fd, (struct sockaddr *)&sin, sizeof(sin)) &&
	    !getsockname(fd, (struct sockaddr *)&sin, &sl))
		port = ntohs(sin.sin_port);
	close(fd);
	return port > 0 ? port : -EADDRNOTAVAIL;
}

void th_rm_rf(const char *path)
{
	struct dirent *de;
	DIR *d = opendir(path);

	if (!d) {
		unlink(path);
		return;
	}
	while ((de = readdir(d))) {
		char sub[PATH_MAX];

		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(sub, sizeof(sub), "%s/%s", path, de->d_name);
		if (de->d_type == DT_DIR)
			th_rm_rf(sub);
		else
			unlink(sub);
	}
	closedir(d);
	rmdir(path);
}

static int daemon_init(struct th_daemon *d, const char *policy_yaml, const char *extra_args)
{
	int err, port;

	memset(d, 0, sizeof(*d));
	snprintf(d->dir, sizeof(d->dir), "/tmp/agentgate-test-%d-XXXXXX", getpid());
	if (!mkdtemp(d->dir)) {
		th_log("mkdtemp: %s", strerror(errno));
		return -errno;
	}
	snprintf(d->config, sizeof(d->config), "%s/policy.yaml", d->dir);
	snprintf(d->state_dir, sizeof(d->state_dir), "%s/state", d->dir);
	snprintf(d->socket, sizeof(d->socket), "%s/ctl.sock", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/agentgated.log", d->dir);
	snprintf(d->pin_root, sizeof(d->pin_root), "/sys/fs/bpf/agentgate-test-%d-%d", getpid(),
		 daemon_counter++);
	snprintf(d->extra, sizeof(d->extra), "%s", extra_args ? extra_args : "");
	d->initialized = true;
	if (mkdir(d->state_dir, 0700)) {
		th_log("mkdir %s: %s", d->state_dir, strerror(errno));
		return -errno;
	}
	err = write_text(d->config, policy_yaml, 0600);
	if (err) {
		th_log("write %s: %s", d->config, strerror(-err));
		return err;
	}
	port = free_port();
	if (port < 0) {
		th_log("no free port: %s", strerror(-port));
		return port;
	}
	d->port = port;
	return 0;
}

/*
 * Up once it answers a request, not once its socket accepts: the socket listens early in the
 * start, before the gateway's listeners and the tags, and before a failing start has exited.
 */
static bool ctl_answers(const char *path)
{
	char err[256];
	ag_ctl_response *resp = ag_ctl_call_simple(path, AGENTGATE__CTL__REQUEST__CMD_STATUS,
						   2000, err, sizeof(err));

	ag_ctl_response_free(resp);
	return resp != NULL;
}

static int decode_status(int status)
{
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

static int daemon_spawn(struct th_daemon *d)
{
	char bin[PATH_MAX], port[16], extra[sizeof(d->extra)], *argv[MAX_ARGS + 24];
	long deadline;
	int n = 0, status;
	pid_t pid;

	snprintf(bin, sizeof(bin), "%s/agentgated", th_build_dir());
	if (access(bin, X_OK)) {
		th_log("%s: %s", bin, strerror(errno));
		return -errno;
	}
	snprintf(port, sizeof(port), "%d", d->port);
	snprintf(extra, sizeof(extra), "%s", d->extra);
	argv[n++] = bin;
	argv[n++] = "--foreground";
	argv[n++] = "--config";
	argv[n++] = d->config;
	argv[n++] = "--state-dir";
	argv[n++] = d->state_dir;
	argv[n++] = "--socket";
	argv[n++] = d->socket;
	argv[n++] = "--bpffs";
	argv[n++] = d->pin_root;
	argv[n++] = "--port";
	argv[n++] = port;
	argv[n++] = "--log-level";
	argv[n++] = "debug";
	if (split_args(extra, argv + n, MAX_ARGS) < 0)
		return -E2BIG;

	if (test__verbose()) {
		printf("helpers: starting");
		for (int i = 0; argv[i]; i++)
			printf(" %s", argv[i]);
		printf("\n");
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
		int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
		sigset_t all;

		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		if (null_fd >= 0)
			dup2(null_fd, STDIN_FILENO);
		sigemptyset(&all);
		sigprocmask(SIG_SETMASK, &all, NULL);
		signal(SIGPIPE, SIG_DFL);
		execv(bin, argv);
		fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
		_exit(127);
	}
	d->pid = pid;
	d->exit_code = -1;

	deadline = now_ms() + 10000;
	while (now_ms() < deadline) {
		pid_t w = waitpid(pid, &status, WNOHANG);

		if (w == pid) {
			d->pid = 0;
			d->exit_code = decode_status(status);
			th_log("agentgated exited with status %d while starting", d->exit_code);
			return -ECHILD;
		}
		if (ctl_answers(d->socket))
			return 0;
		sleep_ms(20);
	}
	th_log("agentgated's control socket %s does not answer after 10 s", d->socket);
	return -ETIMEDOUT;
}

int th_daemon_start(struct th_daemon *d, const char *policy_yaml, const char *extra_args)
{
	int err = daemon_init(d, policy_yaml, extra_args);

	if (err)
		return err;
	return daemon_spawn(d);
}

static int daemon_signal_wait(struct th_daemon *d, int sig, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;
	int status;

	if (d->pid <= 0)
		return d->exit_code;
	kill(d->pid, sig);
	for (;;) {
		pid_t w = waitpid(d->pid, &status, WNOHANG);

		if (w == d->pid)
			break;
		if (w < 0 && errno != EINTR) {
			d->pid = 0;
			return -errno;
		}
		if (now_ms() >= deadline) {
			th_log("agentgated (%d) still runs %d ms after signal %d: SIGKILL", d->pid,
			       timeout_ms, sig);
			kill(d->pid, SIGKILL);
			waitpid(d->pid, &status, 0);
			break;
		}
		sleep_ms(5);
	}
	d->pid = 0;
	d->exit_code = decode_status(status);
	return d->exit_code;
}

int th_daemon_stop(struct th_daemon *d)
{
	return daemon_signal_wait(d, SIGTERM, 10000);
}

int th_daemon_kill(struct th_daemon *d)
{
	return daemon_signal_wait(d, SIGKILL, 5000);
}

int th_daemon_restart(struct th_daemon *d)
{
	if (!d->initialized)
		return -EINVAL;
	if (d->pid > 0)
		th_daemon_stop(d);
	return daemon_spawn(d);
}

int th_daemon_write_policy(struct th_daemon *d, const char *policy_yaml)
{
	char tmp[256];
	int err;

	/* Written aside and renamed, so a reload never reads half a file. */
	snprintf(tmp, sizeof(tmp), "%s.new", d->config);
	err = write_text(tmp, policy_yaml, 0600);
	if (!err && rename(tmp, d->config))
		err = -errno;
	if (err)
		th_log("write %s: %s", d->config, strerror(-err));
	return err;
}

int th_daemon_reload(struct th_daemon *d)
{
	if (d->pid <= 0)
		return -ESRCH;
	return kill(d->pid, SIGHUP) ? -errno : 0;
}

static int read_tail(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	off_t size, from;
	ssize_t n;

	if (!len)
		return -EINVAL;
	buf[0] = '\0';
	if (fd < 0)
		return -errno;
	size = lseek(fd, 0, SEEK_END);
	from = size > (off_t)(len - 1) ? size - (off_t)(len - 1) : 0;
	n = pread(fd, buf, len - 1, from);
	close(fd);
	if (n < 0)
		return -errno;
	buf[n] = '\0';
	return 0;
}

int th_daemon_read_log(const struct th_daemon *d, char *buf, size_t len)
{
	return read_tail(d->log, buf, len);
}

/* Shows the end of a file in the test's log (what a failed test needs to be understood). */
static void dump_tail(const char *path, const char *what)
{
	static char buf[256 * 1024];

	if (read_tail(path, buf, sizeof(buf)))
		return;
	printf("---- %s (%s; the last %zu bytes at most) ----\n%s", what, path, sizeof(buf) - 1,
	       buf);
	if (buf[0] && buf[strlen(buf) - 1] != '\n')
		printf("\n");
	printf("---- end of %s ----\n", what);
}

void th_daemon_cleanup(struct th_daemon *d)
{
	char out[4096];
	struct stat st;

	if (!d || !d->initialized)
		return;
	if (d->pid > 0)
		th_daemon_stop(d);
	if (!stat(d->pin_root, &st)) {
		int rc = th_agctl(d, out, sizeof(out), "prog detach");

		if (rc)
			th_log("agctl prog detach exited with %d: %s", rc, out);
		/* Whatever is still pinned: dropping a link's last reference detaches it. */
		if (!stat(d->pin_root, &st)) {
			th_log("removing leftover pins under %s", d->pin_root);
			th_rm_rf(d->pin_root);
		}
	}
	if (test__has_failed()) {
		char path[256];

		dump_tail(d->log, "agentgated log");
		snprintf(path, sizeof(path), "%s/sessions.log", d->state_dir);
		dump_tail(path, "sessions.log");
	}
	th_rm_rf(d->dir);
	d->initialized = false;
}

int th_agctl(const struct th_daemon *d, char *out, size_t len, const char *fmt, ...)
{
	char bin[PATH_MAX];
	const char *prefix[5];
	int n = 0, rc;
	va_list ap;

	snprintf(bin, sizeof(bin), "%s/agctl", th_build_dir());
	prefix[n++] = bin;
	if (d) {
		prefix[n++] = "-S";
		prefix[n++] = d->socket;
		prefix[n++] = "-B";
		prefix[n++] = d->pin_root;
	}
	va_start(ap, fmt);
	rc = run_fmt(prefix, n, out, len, fmt, ap);
	va_end(ap);
	return rc;
}

pid_t th_agctl_watch_start(const struct th_daemon *d, const char *out_path)
{
	char agctl[PATH_MAX];
	pid_t pid;
	int fd;

	snprintf(agctl, sizeof(agctl), "%s/agctl", th_build_dir());
	fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	pid = fork();
	if (pid == 0) {
		dup2(fd, 1);
		dup2(fd, 2);
		execl(agctl, agctl, "-S", d->socket, "session", "watch", (char *)NULL);
		_exit(127);
	}
	close(fd);
	if (pid < 0)
		return -errno;
	usleep(300 * 1000); /* subscribed */
	return pid;
}

/* ---- the session log ---- */

static bool event_matches(yajl_val v, const char *event, const char *key, long long val)
{
	const char *e = th_json_str(v, "event");
	long long got;

	if (!e || strcmp(e, event))
		return false;
	if (!key)
		return true;
	return th_json_int(v, key, &got) && got == val;
}

/* Calls back on each matching line until cb returns true (then *out keeps it). Count or -errno. */
static int scan_events(const struct th_daemon *d, const char *event, const char *key, long long val,
		       int nth, yajl_val *out)
{
	char path[256], *line = NULL;
	size_t cap = 0;
	int found = 0;
	FILE *f;

	snprintf(path, sizeof(path), "%s/sessions.log", d->state_dir);
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (getline(&line, &cap, f) > 0) {
		char err[128];
		yajl_val v;

		if (line[0] != '{')
			continue;
		v = yajl_tree_parse(line, err, sizeof(err));
		if (!v)
			continue; /* a line being written */
		if (!event_matches(v, event, key, val)) {
			yajl_tree_free(v);
			continue;
		}
		if (out && found == nth) {
			*out = v;
			found++;
			break;
		}
		found++;
		yajl_tree_free(v);
	}
	free(line);
	fclose(f);
	return found;
}

yajl_val th_daemon_wait_event(const struct th_daemon *d, const char *event, const char *key,
			      long long val, int nth, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;

	for (;;) {
		yajl_val v = NULL;

		scan_events(d, event, key, val, nth, &v);
		if (v)
			return v;
		if (now_ms() >= deadline)
			break;
		sleep_ms(20);
	}
	if (key)
		th_log("no \"%s\" event #%d with %s=%lld in %s/sessions.log after %d ms", event,
		       nth, key, val, d->state_dir, timeout_ms);
	else
		th_log("no \"%s\" event #%d in %s/sessions.log after %d ms", event, nth,
		       d->state_dir, timeout_ms);
	return NULL;
}

int th_daemon_count_events(const struct th_daemon *d, const char *event, const char *key,
			   long long val)
{
	int n = scan_events(d, event, key, val, 0, NULL);

	return n == -ENOENT ? 0 : n;
}

/* ---- JSON ---- */

yajl_val th_json_parse(const char *text)
{
	char err[256];
	yajl_val v;

	if (!text)
		return NULL;
	v = yajl_tree_parse(text, err, sizeof(err));
	if (!v)
		th_log("JSON does not parse: %s\n---\n%s\n---", err, text);
	return v;
}

yajl_val th_json_get(yajl_val obj, const char *key)
{
	if (!obj || !YAJL_IS_OBJECT(obj))
		return NULL;
	for (size_t i = 0; i < obj->u.object.len; i++)
		if (!strcmp(obj->u.object.keys[i], key))
			return obj->u.object.values[i];
	return NULL;
}

const char *th_json_str(yajl_val obj, const char *key)
{
	yajl_val v = th_json_get(obj, key);

	return v && YAJL_IS_STRING(v) ? YAJL_GET_STRING(v) : NULL;
}

bool th_json_int(yajl_val obj, const char *key, long long *out)
{
	yajl_val v = th_json_get(obj, key);

	if (!v || !YAJL_IS_INTEGER(v))
		return false;
	*out = YAJL_GET_INTEGER(v);
	return true;
}

static void agctl_drain(int *fd, char *buf, size_t cap, size_t *len)
{
	ssize_t n;

	if (*len + 1 >= cap) {
		char sink[512];

		n = read(*fd, sink, sizeof(sink));
	} else {
		n = read(*fd, buf + *len, cap - 1 - *len);
		if (n > 0)
			*len += n;
	}
	if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) {
		close(*fd);
		*fd = -1;
	}
}

int th_agctl_run(struct th_agctl_result *r, const char *const *args)
{
	char bin[PATH_MAX], root[PATH_MAX];
	const char *argv[32];
	int out[2], err[2], n = 0, st;
	size_t olen = 0, elen = 0;
	time_t deadline;
	pid_t pid;

	memset(r, 0, sizeof(*r));
	snprintf(bin, sizeof(bin), "%s/agctl", th_build_dir());
	snprintf(root, sizeof(root), "%s/..", th_build_dir());
	if (access(bin, X_OK)) {
		r->status = -errno;
		fprintf(stdout, "%s: %s\n", bin, strerror(errno));
		return r->status;
	}
	argv[n++] = bin;
	while (*args && n < (int)(sizeof(argv) / sizeof(argv[0])) - 1)
		argv[n++] = *args++;
	argv[n] = NULL;

	if (pipe2(out, O_CLOEXEC))
		return r->status = -errno;
	if (pipe2(err, O_CLOEXEC)) {
		close(out[0]);
		close(out[1]);
		return r->status = -errno;
	}
	pid = fork();
	if (pid < 0) {
		r->status = -errno;
		close(out[0]);
		close(out[1]);
		close(err[0]);
		close(err[1]);
		return r->status;
	}
	if (pid == 0) {
		int devnull = open("/dev/null", O_RDONLY);

		dup2(devnull, 0);
		dup2(out[1], 1);
		dup2(err[1], 2);
		if (chdir(root))
			_exit(126);
		execv(bin, (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	deadline = time(NULL) + 10;
	while (out[0] >= 0 || err[0] >= 0) {
		struct pollfd p[2] = { { .fd = out[0], .events = POLLIN },
				       { .fd = err[0], .events = POLLIN } };

		if (time(NULL) > deadline) {
			kill(pid, SIGKILL);
			break;
		}
		if (poll(p, 2, 1000) < 0 && errno != EINTR)
			break;
		if (out[0] >= 0 && p[0].revents)
			agctl_drain(&out[0], r->out, sizeof(r->out), &olen);
		if (err[0] >= 0 && p[1].revents)
			agctl_drain(&err[0], r->err, sizeof(r->err), &elen);
	}
	if (out[0] >= 0)
		close(out[0]);
	if (err[0] >= 0)
		close(err[0]);
	r->out[olen] = '\0';
	r->err[elen] = '\0';
	while (waitpid(pid, &st, 0) < 0) {
		if (errno != EINTR)
			return r->status = -errno;
	}
	r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	if (test__verbose())
		fprintf(stdout, "agctl exit %d\n--- stdout\n%s--- stderr\n%s---\n", r->status,
			r->out, r->err);
	return r->status;
}

int th_daemon_counters(const struct th_daemon *d, int pid, long long *statements,
		       long long *blocked, long long *masked)
{
	static char out[256 * 1024];
	yajl_val root;
	int rc = -ENOENT;

	if (th_agctl(d, out, sizeof(out), "-j session list"))
		return -EIO;
	root = th_json_parse(out);
	if (!root)
		return -EIO;
	for (size_t i = 0; YAJL_IS_ARRAY(root) && i < YAJL_GET_ARRAY(root)->len; i++) {
		yajl_val s = YAJL_GET_ARRAY(root)->values[i];
		long long p = -1;

		if (pid >= 0 && (!th_json_int(s, "pid", &p) || p != pid))
			continue;
		th_json_int(s, "statements", statements);
		th_json_int(s, "blocked", blocked);
		th_json_int(s, "masked_values", masked);
		rc = 0;
		break;
	}
	yajl_tree_free(root);
	return rc;
}
