/* SPDX-License-Identifier: GPL-2.0 */
/*
 * HTTP selftest harness: the stand-in Kubernetes API server (selftests/k8s_api.py, plain HTTP on
 * 127.0.0.x and a free port), a daemon whose policy has one http target for it, a tagged cgroup,
 * and clients run from that cgroup (curl, kubectl, raw sockets).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "helpers.h"

struct th_http_gate {
	struct th_daemon d;
	char tagged[256];
	char dir[128]; /* temp: the server's request log, kubeconfig, kubectl cache */
	char srvlog[192];
	char kubeconfig[192];
	char addr[32];
	int port;
	pid_t srv;
	int srv_out; /* the server's stdout */
	char policy[16384];
	/* th_http_gate_start_tls(): the server's HTTPS certificate and key, its JWT check */
	char srv_cert[256], srv_key[256], jwt_pub[256], jwt_aud[64];
};

/* What the API server of th_http_gate_start_tls() serves and checks. */
struct th_http_tls {
	const char *cert, *key; /* HTTPS with this certificate (PEM files) */
	const char *jwt_pub;	/* NULL, or a PEM EC public key: bearer tokens are checked */
	const char *jwt_aud;	/* the audience they must name */
};

/*
 * Starts the API server on addr, a daemon with target "api" (kubernetes: true when k8s) and
 * rules (YAML lines under "- agent: t / target: api"), and a tagged cgroup for agent t.
 * target_extra: more YAML lines under the target (credential: ...), or NULL.
 */
int th_http_gate_start(struct th_http_gate *g, const char *addr, bool k8s, const char *target_extra,
		       const char *rules);
/* The same with agent t in mode (enforce | observe). */
int th_http_gate_start_mode(struct th_http_gate *g, const char *addr, bool k8s,
			    const char *target_extra, const char *rules, const char *mode);
/*
 * The same with an HTTPS API server (tls), and when tls->jwt_pub is set one that checks every
 * bearer token (ES256 by that key, aud, exp; a jti on one connection only) and answers 401
 * otherwise. The kubeconfig is left for the test to write.
 */
int th_http_gate_start_tls(struct th_http_gate *g, const char *addr, bool k8s,
			   const char *target_extra, const char *rules,
			   const struct th_http_tls *tls);
void th_http_gate_cleanup(struct th_http_gate *g);

/* Runs argv in the tagged cgroup (argv[0] an absolute path); the exit code, or -errno. */
int th_http_run(struct th_http_gate *g, char *const argv[], char *out, size_t outlen, char *err,
		size_t errlen);
/*
 * kubectl (with g->kubeconfig, a cache in g->dir) from the tagged cgroup with up to four
 * arguments (NULL ends them); the exit code.
 */
int th_http_kubectl(struct th_http_gate *g, char *out, size_t outlen, char *err, size_t errlen,
		    const char *a1, const char *a2, const char *a3, const char *a4);
/* curl -sS from the tagged cgroup with args (NULL-terminated), URL path appended to the base. */
int th_http_curl(struct th_http_gate *g, char *out, size_t outlen, const char *path, ...)
	__attribute__((sentinel));
/*
 * Sends req on a fresh connection from the tagged cgroup, then reads until the peer closes or
 * timeout_ms pass: the bytes read (resp NUL-terminated), or -errno. *closed: the peer closed.
 */
ssize_t th_http_raw(struct th_http_gate *g, const void *req, size_t len, char *resp, size_t rlen,
		    int timeout_ms, bool *closed);
/* Connects from the tagged cgroup: a socket, or -errno. */
int th_http_connect(struct th_http_gate *g);
/* Reads from fd until `until` appears, the peer closes or timeout_ms pass: bytes read. */
ssize_t th_http_read_until(int fd, char *buf, size_t len, const char *until, int timeout_ms,
			   bool *closed);
/* The daemon runs and a fresh allowed request (GET /version) is answered 200. */
bool th_http_alive(struct th_http_gate *g);
/* The API server's request log ("METHOD PATH auth=..." lines). */
int th_http_srvlog(struct th_http_gate *g, char *buf, size_t len);
/*
 * The id of a pending approval whose statement has needle ("" any), polled for 15 s at most
 * through agctl -j approval list; true when one came.
 */
bool th_http_wait_approval(struct th_http_gate *g, const char *needle, char *id, size_t idlen);
/*
 * agctl approval VERB ID [ARGS...] (NULL-terminated) run as nobody, the approver: the agent runs
 * as root in these tests and may not decide its own approvals. Call chmod(g->d.dir, 0711) once
 * first so that nobody reaches the socket. The exit code.
 */
int th_http_decide(struct th_http_gate *g, const char *verb, const char *id, ...)
	__attribute__((sentinel));
