// SPDX-License-Identifier: GPL-2.0
/* The HTTP selftest harness (http.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "pg.h"
#include "test_progs.h"

#define http_log(fmt, ...) fprintf(stdout, "http: " fmt "\n", ##__VA_ARGS__)

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int free_port(const char *addr)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	if (fd < 0)
		return -errno;
	inet_pton(AF_INET, addr, &sin.sin_addr);
	if (!bind(fd, (struct sockaddr *)&sin, sizeof(sin)) &&
	    !getsockname(fd, (struct sockaddr *)&sin, &sl))
		port = ntohs(sin.sin_port);
	close(fd);
	return port > 0 ? port : -EADDRNOTAVAIL;
}

static int server_start(struct th_http_gate *g)
{
	char script[512], port[16], line[64] = "";
	int pfd[2];
	long deadline;
	size_t got = 0;

	snprintf(script, sizeof(script), "%s/../selftests/k8s_api.py", th_build_dir());
	snprintf(port, sizeof(port), "%d", g->port);
	if (pipe2(pfd, O_CLOEXEC))
		return -errno;
	g->srv = fork();
	if (g->srv < 0)
		return -errno;
	if (!g->srv) {
		char *argv[] = { "/usr/bin/python3", script, g->addr,	   port,      g->srvlog,
				 g->srv_cert,	     g->srv_key, g->jwt_pub, g->jwt_aud, NULL };

		if (!g->srv_cert[0])
			argv[5] = NULL;
		else if (!g->jwt_pub[0])
			argv[7] = NULL;

		dup2(pfd[1], STDOUT_FILENO);
		execv(argv[0], argv);
		_exit(127);
	}
	close(pfd[1]);
	deadline = now_ms() + 15000;
	while (got < sizeof(line) - 1 && !strstr(line, "ready\n")) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		int left = (int)(deadline - now_ms());
		ssize_t n;

		if (left <= 0 || poll(&p, 1, left) <= 0)
			break;
		n = read(pfd[0], line + got, sizeof(line) - 1 - got);
		if (n <= 0)
			break;
		got += n;
		line[got] = '\0';
	}
	/* kept open until the server is stopped: it must never write into a closed pipe */
	g->srv_out = pfd[0];
	if (!strstr(line, "ready\n")) {
		http_log("the API server did not start (%s)", script);
		return -EIO;
	}
	return 0;
}

static int write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	if (!f)
		return -errno;
	fputs(text, f);
	return fclose(f) ? -errno : 0;
}

int th_http_gate_start(struct th_http_gate *g, const char *addr, bool k8s, const char *target_extra,
		       const char *rules)
{
	return th_http_gate_start_mode(g, addr, k8s, target_extra, rules, "enforce");
}

static int gate_start(struct th_http_gate *g, const char *addr, bool k8s, const char *target_extra,
		      const char *rules, const char *mode, const struct th_http_tls *tls);

int th_http_gate_start_mode(struct th_http_gate *g, const char *addr, bool k8s,
			    const char *target_extra, const char *rules, const char *mode)
{
	return gate_start(g, addr, k8s, target_extra, rules, mode, NULL);
}

int th_http_gate_start_tls(struct th_http_gate *g, const char *addr, bool k8s,
			   const char *target_extra, const char *rules,
			   const struct th_http_tls *tls)
{
	return gate_start(g, addr, k8s, target_extra, rules, "enforce", tls);
}

static int gate_start(struct th_http_gate *g, const char *addr, bool k8s, const char *target_extra,
		      const char *rules, const char *mode, const struct th_http_tls *tls)
{
	static int seq;
	char name[64], kc[1024];
	int rc, n;

	memset(g, 0, sizeof(*g));
	if (tls) {
		snprintf(g->srv_cert, sizeof(g->srv_cert), "%s", tls->cert);
		snprintf(g->srv_key, sizeof(g->srv_key), "%s", tls->key);
		snprintf(g->jwt_pub, sizeof(g->jwt_pub), "%s", tls->jwt_pub ? tls->jwt_pub : "");
		snprintf(g->jwt_aud, sizeof(g->jwt_aud), "%s", tls->jwt_aud ? tls->jwt_aud : "");
	}
	g->srv = -1;
	g->srv_out = -1;
	snprintf(g->addr, sizeof(g->addr), "%s", addr);
	snprintf(g->dir, sizeof(g->dir), "/tmp/agentgate-http-XXXXXX");
	if (!mkdtemp(g->dir))
		return -errno;
	snprintf(g->srvlog, sizeof(g->srvlog), "%s/requests.log", g->dir);
	snprintf(g->kubeconfig, sizeof(g->kubeconfig), "%s/kubeconfig", g->dir);
	close(open(g->srvlog, O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
	snprintf(name, sizeof(name), "http%d", seq++);
	rc = th_cgroup_create(name, g->tagged, sizeof(g->tagged));
	if (rc)
		return rc;
	g->port = free_port(addr);
	if (g->port < 0)
		return g->port;
	rc = server_start(g);
	if (rc)
		return rc;
	snprintf(kc, sizeof(kc),
		 "apiVersion: v1\nkind: Config\n"
		 "clusters: [{name: t, cluster: {server: \"http://%s:%d\"}}]\n"
		 "users: [{name: u, user: {token: agent-own-token-XYZ}}]\n"
		 "contexts: [{name: c, context: {cluster: t, user: u, namespace: default}}]\n"
		 "current-context: c\n",
		 addr, g->port);
	rc = write_file(g->kubeconfig, kc);
	if (rc)
		return rc;
	n = snprintf(g->policy, sizeof(g->policy),
		     "apiVersion: agentgate/v1\n"
		     "agents:\n"
		     "  - name: t\n"
		     "    cgroup: %s\n"
		     "    mode: %s\n"
		     "targets:\n"
		     "  - name: api\n"
		     "    protocol: http\n"
		     "    address: %s:%d\n"
		     "    kubernetes: %s\n"
		     "%s"
		     "rules:\n"
		     "  - agent: t\n"
		     "    target: api\n"
		     "%s"
		     "default: deny\n",
		     g->tagged, mode, addr, g->port, k8s ? "true" : "false",
		     target_extra ? target_extra : "", rules);
	if (n < 0 || (size_t)n >= sizeof(g->policy))
		return -ENOSPC;
	if (test__verbose())
		printf("http gate: policy:\n%s", g->policy);
	return th_daemon_start(&g->d, g->policy, NULL);
}

void th_http_gate_cleanup(struct th_http_gate *g)
{
	th_daemon_cleanup(&g->d);
	if (g->srv > 0) {
		kill(g->srv, SIGKILL);
		waitpid(g->srv, NULL, 0);
		g->srv = -1;
	}
	if (g->srv_out >= 0)
		close(g->srv_out);
	g->srv_out = -1;
	if (g->dir[0])
		th_rm_rf(g->dir);
	g->dir[0] = '\0';
}

int th_http_run(struct th_http_gate *g, char *const argv[], char *out, size_t outlen, char *err,
		size_t errlen)
{
	return th_pg_exec(g->tagged, argv, NULL, out, outlen, err, errlen, 60000);
}

int th_http_kubectl(struct th_http_gate *g, char *out, size_t outlen, char *err, size_t errlen,
		    const char *a1, const char *a2, const char *a3, const char *a4)
{
	char kc[256], cache[256];
	char *argv[] = { "/usr/bin/env",     kc,	 "HOME=/tmp",
			 "/usr/bin/kubectl", cache,	 "--request-timeout=20s",
			 (char *)a1,	     (char *)a2, (char *)a3,
			 (char *)a4,	     NULL };

	snprintf(kc, sizeof(kc), "KUBECONFIG=%s", g->kubeconfig);
	snprintf(cache, sizeof(cache), "--cache-dir=%s/kcache", g->dir);
	return th_http_run(g, argv, out, outlen, err, errlen);
}

int th_http_curl(struct th_http_gate *g, char *out, size_t outlen, const char *path, ...)
{
	char url[512], err[4096];
	char *argv[64];
	int n = 0, rc;
	va_list ap;

	snprintf(url, sizeof(url), "http://%s:%d%s", g->addr, g->port, path);
	argv[n++] = "/usr/bin/curl";
	argv[n++] = "-sS";
	argv[n++] = "--max-time";
	argv[n++] = "30";
	va_start(ap, path);
	for (const char *a; n < 60 && (a = va_arg(ap, const char *));)
		argv[n++] = (char *)a;
	va_end(ap);
	argv[n++] = url;
	argv[n] = NULL;
	rc = th_http_run(g, argv, out, outlen, err, sizeof(err));
	if (rc)
		http_log("curl %s: exit %d: %s", path, rc, err);
	return rc;
}

int th_http_connect(struct th_http_gate *g)
{
	return th_pg_connect_from(g->tagged, g->addr, g->port);
}

ssize_t th_http_read_until(int fd, char *buf, size_t len, const char *until, int timeout_ms,
			   bool *closed)
{
	long deadline = now_ms() + timeout_ms;
	size_t off = 0;

	if (closed)
		*closed = false;
	buf[0] = '\0';
	while (off + 1 < len) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int left = (int)(deadline - now_ms());
		ssize_t n;

		if (until && strstr(buf, until))
			break;
		if (left <= 0 || poll(&p, 1, left) <= 0)
			break;
		n = recv(fd, buf + off, len - 1 - off, 0);
		if (n <= 0) {
			if (n < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (closed)
				*closed = true;
			break;
		}
		off += n;
		buf[off] = '\0';
	}
	return off;
}

ssize_t th_http_raw(struct th_http_gate *g, const void *req, size_t len, char *resp, size_t rlen,
		    int timeout_ms, bool *closed)
{
	int fd = th_http_connect(g);
	ssize_t n;

	if (fd < 0)
		return fd;
	if (th_send_all(fd, req, len, 10000)) {
		/* the gateway may close before all was sent: read what it said */
		http_log("raw: send incomplete: %s", strerror(errno));
	}
	n = th_http_read_until(fd, resp, rlen, NULL, timeout_ms, closed);
	close(fd);
	return n;
}

bool th_http_alive(struct th_http_gate *g)
{
	static const char req[] = "GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	char resp[4096];
	bool closed;

	if (g->d.pid <= 0 || kill(g->d.pid, 0))
		return false;
	if (th_http_raw(g, req, sizeof(req) - 1, resp, sizeof(resp), 10000, &closed) <= 0)
		return false;
	return !strncmp(resp, "HTTP/1.1 200", 12) && strstr(resp, "gitVersion");
}

int th_http_srvlog(struct th_http_gate *g, char *buf, size_t len)
{
	int fd = open(g->srvlog, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = read(fd, buf, len - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return 0;
}

bool th_http_wait_approval(struct th_http_gate *g, const char *needle, char *id, size_t idlen)
{
	static struct th_agctl_result r;

	for (int i = 0; i < 150; i++) {
		yajl_val v;

		if (!TH_AGCTL(&r, "-S", g->d.socket, "-j", "approval", "list") &&
		    (v = th_json_parse(r.out))) {
			for (size_t k = 0; YAJL_IS_ARRAY(v) && k < v->u.array.len; k++) {
				yajl_val a = v->u.array.values[k];
				const char *st = th_json_str(a, "state");
				const char *stmt = th_json_str(a, "statement");

				if (st && !strcmp(st, "pending") && stmt && strstr(stmt, needle)) {
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

int th_http_decide(struct th_http_gate *g, const char *verb, const char *id, ...)
{
	char bin[256], o[8192], e[4096];
	char *argv[24] = { "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
			   bin, "-S", g->d.socket, "approval", (char *)verb, (char *)id };
	int n = 10, rc;
	va_list ap;

	va_start(ap, id);
	for (const char *a; n < 23 && (a = va_arg(ap, const char *));)
		argv[n++] = (char *)a;
	va_end(ap);
	argv[n] = NULL;
	snprintf(bin, sizeof(bin), "%s/agctl", th_build_dir());
	rc = th_pg_exec(NULL, argv, NULL, o, sizeof(o), e, sizeof(e), 15000);
	if (rc)
		http_log("agctl approval %s %s: exit %d: %s%s", verb, id, rc, o, e);
	return rc;
}
