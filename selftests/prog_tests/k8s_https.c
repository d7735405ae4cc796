// SPDX-License-Identifier: GPL-2.0
/*
 * HTTPS end to end for a Kubernetes target: the agent's client (curl, kubectl) trusts the
 * gateway's CA (agctl ca show) and holds no credential; the gateway terminates its TLS, verifies
 * the API server (verify-full against a test CA) and sends a JWT it minted (ES256, aud kube, a
 * short exp, a jti per session). The stand-in API server checks that token as an API server's
 * JWT authenticator would, so a replayed or expired token straight to it is refused.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../http.h"
#include "../pg.h"
#include "../test_progs.h"

#define HTTPS_ADDR "127.0.0.67"

#define HTTPS_RULES                                                                                \
	"    http:\n"                                                                              \
	"      - { name: no-exec, when: { kubernetes: { subresource: [exec, attach] } },"          \
	" then: deny }\n"                                                                          \
	"      - { name: reads, when: { kubernetes: { verb: [get, list, watch] } }, then: allow "  \
	"}\n"

struct https_env {
	struct th_http_gate g;
	char dir[128];
	char gwca[192];
};

static char out[256 * 1024], err[65536], logbuf[1 << 20];

/* /bin/sh -c script, not in the tagged cgroup: the exit code; output in out, err. */
static int sh(const char *script)
{
	char *argv[] = { "/bin/sh", "-c", (char *)script, NULL };

	return th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 60000);
}

/* A test CA, the API server's certificate for HTTPS_ADDR, the gateway's JWT key (0600). */
static int make_files(struct https_env *e)
{
	static const char fmt[] =
		"set -e; PATH=/usr/bin:/bin; cd %s\n"
		"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
		"-keyout testca.key -out testca.crt -subj /CN=testca -days 2 "
		"-addext basicConstraints=critical,CA:TRUE "
		"-addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null\n"
		"openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
		"-keyout api.key -out api.csr -subj /CN=api 2>/dev/null\n"
		"printf 'subjectAltName=IP:" HTTPS_ADDR "\\nbasicConstraints=CA:FALSE\\n"
		"extendedKeyUsage=serverAuth\\n' > api.ext\n"
		"openssl x509 -req -in api.csr -CA testca.crt -CAkey testca.key -CAcreateserial "
		"-days 2 -extfile api.ext -out api.crt 2>/dev/null\n"
		"openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out jwt.key\n"
		"chmod 0600 jwt.key\n"
		"openssl pkey -in jwt.key -pubout -out jwt.pub\n";
	char script[2048];

	snprintf(e->dir, sizeof(e->dir), "/tmp/agentgate-https-XXXXXX");
	if (!mkdtemp(e->dir))
		return -errno;
	chmod(e->dir, 0755);
	snprintf(script, sizeof(script), fmt, e->dir);
	if (sh(script)) {
		printf("making the test files: %s\n", err);
		return -EIO;
	}
	return 0;
}

static void target_extra(struct https_env *e, const char *ttl, char *buf, size_t len)
{
	snprintf(buf, len,
		 "    tls: { client: terminate, upstream: verify-full, ca_file: %s/testca.crt }\n"
		 "    credential: { provider: jwt, key_file: %s/jwt.key, audience: kube, ttl: %s }\n",
		 e->dir, e->dir, ttl);
}

/*
 * The gateway's CA as `agctl ca show` prints it, to a file; a kubeconfig with no credential: a
 * user name only (with none kubectl would prompt for a basic-auth login over HTTPS).
 */
static int client_files(struct https_env *e)
{
	char kc[1024];
	FILE *f;

	if (th_agctl(&e->g.d, out, sizeof(out), "ca show") || !strstr(out, "BEGIN CERTIFICATE"))
		return -EIO;
	snprintf(e->gwca, sizeof(e->gwca), "%s/gwca.crt", e->dir);
	f = fopen(e->gwca, "w");
	if (!f)
		return -errno;
	fputs(out, f);
	fclose(f);
	snprintf(kc, sizeof(kc),
		 "apiVersion: v1\nkind: Config\n"
		 "clusters: [{name: t, cluster: {server: \"https://%s:%d\", "
		 "certificate-authority: \"%s\"}}]\n"
		 "users: [{name: u, user: {username: agent}}]\n"
		 "contexts: [{name: c, context: {cluster: t, user: u, namespace: default}}]\n"
		 "current-context: c\n",
		 HTTPS_ADDR, e->g.port, e->gwca);
	/* in place of the harness's plain-HTTP one */
	f = fopen(e->g.kubeconfig, "w");
	if (!f)
		return -errno;
	fputs(kc, f);
	fclose(f);
	return 0;
}

/* curl over HTTPS from the tagged cgroup (through the gateway), trusting the gateway's CA. */
static int curl_gw(struct https_env *e, const char *path, const char *hdr)
{
	char url[256];
	char *argv[] = { "/usr/bin/curl", "-sS", "-i",	     "--max-time", "30", "--cacert",
			 e->gwca,	  url,	 hdr ? "-H" : NULL, (char *)hdr, NULL };

	snprintf(url, sizeof(url), "https://%s:%d%s", HTTPS_ADDR, e->g.port, path);
	return th_http_run(&e->g, argv, out, sizeof(out), err, sizeof(err));
}

/* curl straight to the API server (not tagged: no gateway), with this Authorization. */
static int curl_direct(struct https_env *e, const char *path, const char *auth)
{
	char url[256], ca[256], hdr[4200];
	char *argv[] = { "/usr/bin/curl", "-sS", "-i", "--max-time", "30", "--cacert", ca,
			 "-H", hdr, url, NULL };

	snprintf(url, sizeof(url), "https://%s:%d%s", HTTPS_ADDR, e->g.port, path);
	snprintf(ca, sizeof(ca), "%s/testca.crt", e->dir);
	snprintf(hdr, sizeof(hdr), "Authorization: %s", auth);
	return th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
}

/* The Authorization value of the last request for path in the server's log ("" none). */
static void last_auth(struct https_env *e, const char *path, char *tok, size_t len)
{
	char needle[256];
	const char *p, *last = NULL;

	tok[0] = '\0';
	if (th_http_srvlog(&e->g, logbuf, sizeof(logbuf)))
		return;
	snprintf(needle, sizeof(needle), "GET %s auth=", path);
	for (p = logbuf; (p = strstr(p, needle)); p++)
		last = p + strlen(needle);
	if (last)
		snprintf(tok, len, "%.*s", (int)strcspn(last, "\n"), last);
}

static int kubectl(struct https_env *e, const char *a1, const char *a2, const char *a3,
		   const char *a4)
{
	return th_http_kubectl(&e->g, out, sizeof(out), err, sizeof(err), a1, a2, a3, a4);
}

static void subtest_read_with_gateway_token(struct https_env *e)
{
	static const char path[] = "/api/v1/namespaces/default/pods";
	char tok[4096];

	if (!ASSERT_OK(curl_gw(e, path, "Authorization: Bearer agent-own-token-XYZ"), "curl")) {
		th_http_srvlog(&e->g, logbuf, sizeof(logbuf));
		printf("server log:\n%s\n", logbuf);
		return;
	}
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 200", 12), "200 over HTTPS through the gateway");
	ASSERT_HAS_SUBSTR(out, "web-1", "the pods");
	last_auth(e, path, tok, sizeof(tok));
	ASSERT_TRUE(!strncmp(tok, "Bearer eyJ", 10), "a JWT reached the server");
	ASSERT_FALSE(strstr(logbuf, "agent-own-token-XYZ"), "the agent's token never did");
	ASSERT_HAS_SUBSTR(logbuf, "GET /api/v1/namespaces/default/pods jwt=ok",
			  "the server verified it (signature, aud kube, exp, jti)");
}

static void subtest_replayed_token_refused(struct https_env *e)
{
	char tok[4096];

	last_auth(e, "/api/v1/namespaces/default/pods", tok, sizeof(tok));
	if (!ASSERT_TRUE(!strncmp(tok, "Bearer eyJ", 10), "a token to replay"))
		return;
	ASSERT_OK(curl_direct(e, "/api/v1/namespaces/default/secrets", tok), "curl");
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 401", 12), "401");
	ASSERT_HAS_SUBSTR(out, "replayed jti", "the server saw a replay");
	ASSERT_OK(curl_direct(e, "/api/v1/namespaces/default/secrets",
			      "Bearer agent-own-token-XYZ"),
		  "curl");
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 401", 12), "and an agent's own token is no JWT");
}

/*
 * The client's Finished and 40 pipelined requests, each its own TLS record, in one write: the
 * gateway reads records ahead (tls.c), more than one read of the loop takes, with the socket
 * empty after the first read. Every request must still be answered.
 */
static void subtest_records_read_ahead_all_answered(struct https_env *e)
{
	static const char script[] =
		"import socket, ssl, sys, time\n"
		"ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
		"ctx.maximum_version = ssl.TLSVersion.TLSv1_3\n"
		"s = socket.create_connection((sys.argv[2], int(sys.argv[3])))\n"
		"i, o = ssl.MemoryBIO(), ssl.MemoryBIO()\n"
		"t = ctx.wrap_bio(i, o, server_hostname=sys.argv[2])\n"
		"while True:\n"
		"    try:\n"
		"        t.do_handshake(); break\n"
		"    except ssl.SSLWantReadError:\n"
		"        s.sendall(o.read()); d = s.recv(65536)\n"
		"        if not d: sys.exit('closed in the handshake')\n"
		"        i.write(d)\n"
		"req = ('GET /api/v1/namespaces/default/pods HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n'\n"
		"       % sys.argv[2]).encode()\n"
		"for _ in range(40): t.write(req)\n"
		"s.sendall(o.read())\n"
		"got, end = b'', time.time() + 20\n"
		"s.settimeout(1)\n"
		"while got.count(b'HTTP/1.1 200') < 40 and time.time() < end:\n"
		"    try:\n"
		"        d = s.recv(65536)\n"
		"    except socket.timeout:\n"
		"        continue\n"
		"    if not d: break\n"
		"    i.write(d)\n"
		"    while True:\n"
		"        try:\n"
		"            got += t.read(65536)\n"
		"        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):\n"
		"            break\n"
		"print('answers=%d' % got.count(b'HTTP/1.1 200'))\n";
	char port[16];
	char *argv[] = { "/usr/bin/python3", "-c", (char *)script, e->gwca, HTTPS_ADDR, port, NULL };

	snprintf(port, sizeof(port), "%d", e->g.port);
	if (!ASSERT_OK(th_http_run(&e->g, argv, out, sizeof(out), err, sizeof(err)), "python")) {
		printf("%s\n", err);
		return;
	}
	ASSERT_HAS_SUBSTR(out, "answers=40", "every pipelined request answered");
	ASSERT_OK(kill(e->g.d.pid, 0), "daemon alive");
}

static void subtest_kubectl_get_pods(struct https_env *e)
{
	size_t before;

	ASSERT_OK(th_http_srvlog(&e->g, logbuf, sizeof(logbuf)), "server log");
	before = strlen(logbuf);
	if (!ASSERT_OK(kubectl(e, "get", "pods", "-o", "name"), "kubectl get pods"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "pod/web-1\npod/web-2\n", "the pods, over HTTPS, with no credential");
	ASSERT_OK(th_http_srvlog(&e->g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf + before, "auth=Basic"), "kubectl's user name never went on");
	ASSERT_FALSE(strstr(logbuf + before, "jwt=refused"), "every token it sent was good");
	ASSERT_HAS_SUBSTR(logbuf + before, "jwt=ok", "and checked");
}

static void subtest_kubectl_exec_forbidden(struct https_env *e)
{
	ASSERT_NEQ(kubectl(e, "exec", "web-1", "--", "true"), 0, "kubectl exec fails");
	if (!ASSERT_HAS_SUBSTR(err, "Error from server (Forbidden): agentgate: blocked by rule "
				    "no-exec",
			       "kubectl prints Forbidden"))
		printf("kubectl exec: %s\n", err);
	ASSERT_OK(th_http_srvlog(&e->g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "web-1/exec"), "exec never reached the server");
}

/*
 * With ttl: 3s the token the gateway minted for a session is refused by the server once
 * expired, even on a connection it was never seen on before (exp is checked before jti).
 */
static void subtest_expired_token_refused(struct https_env *e)
{
	static const char path[] = "/api/v1/namespaces/default/pods/web-2";
	char extra[1024], tok[4096], *pol;
	const char *p;

	target_extra(e, "3s", extra, sizeof(extra));
	pol = malloc(sizeof(e->g.policy));
	if (!ASSERT_OK_PTR(pol, "alloc"))
		return;
	p = strstr(e->g.policy, "    credential:");
	if (!ASSERT_OK_PTR(p, "policy")) {
		free(pol);
		return;
	}
	snprintf(pol, sizeof(e->g.policy), "%.*s%s%s", (int)(strstr(e->g.policy, "    tls:") -
							       e->g.policy),
		 e->g.policy, extra, strchr(p, '\n') + 1);
	if (!ASSERT_OK(th_daemon_write_policy(&e->g.d, pol), "policy ttl 3s") ||
	    !ASSERT_OK(th_daemon_reload(&e->g.d), "reload")) {
		free(pol);
		return;
	}
	free(pol);
	ASSERT_OK(curl_gw(e, path, NULL), "curl through the gateway");
	last_auth(e, path, tok, sizeof(tok));
	if (!ASSERT_TRUE(!strncmp(tok, "Bearer eyJ", 10), "the gateway sent a JWT"))
		return;
	sleep(4);
	ASSERT_OK(curl_direct(e, path, tok), "curl");
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 401", 12), "401");
	ASSERT_HAS_SUBSTR(out, "token expired", "the server saw it expired");
}

/*
 * A keep-alive session that outlives the token's ttl (3 s since the previous subtest): the
 * gateway mints a new one before the old one expires, so the server never sees an expired one.
 */
static void subtest_keepalive_token_renewed(struct https_env *e)
{
	static const char path[] = "/api/v1/namespaces/default/pods/web-2";
	char url[256];
	char *argv[] = { "/usr/bin/curl", "-sS", "-i", "--max-time", "30", "--rate", "15/m",
			 "--cacert", e->gwca, url, url, NULL };
	const char *p;
	int ok = 0;

	snprintf(url, sizeof(url), "https://%s:%d%s", HTTPS_ADDR, e->g.port, path);
	if (!ASSERT_OK(th_http_run(&e->g, argv, out, sizeof(out), err, sizeof(err)),
		       "two requests 4 s apart on one connection"))
		return;
	for (p = out; (p = strstr(p, "HTTP/1.1 200")); p++)
		ok++;
	ASSERT_EQ(ok, 2, "both answered 200");
	ASSERT_TRUE(!strstr(out, "token expired"), "no expired token reached the server");
	if (ASSERT_OK(th_daemon_read_log(&e->g.d, logbuf, sizeof(logbuf)), "daemon log"))
		ASSERT_HAS_SUBSTR(logbuf, "jwt credential renewed", "renewed before its expiry");
}

void test_k8s_https(void)
{
	struct https_env *e = calloc(1, sizeof(*e));
	struct th_http_tls tls;
	char extra[1024], cert[256], key[256], pub[256];
	bool have_kubectl = !access("/usr/bin/kubectl", X_OK);

	if (!ASSERT_OK_PTR(e, "alloc"))
		return;
	if (!ASSERT_OK(make_files(e), "test CA, server certificate, JWT key"))
		goto out;
	snprintf(cert, sizeof(cert), "%s/api.crt", e->dir);
	snprintf(key, sizeof(key), "%s/api.key", e->dir);
	snprintf(pub, sizeof(pub), "%s/jwt.pub", e->dir);
	tls = (struct th_http_tls){ .cert = cert, .key = key, .jwt_pub = pub, .jwt_aud = "kube" };
	target_extra(e, "5m", extra, sizeof(extra));
	if (!ASSERT_OK(th_http_gate_start_tls(&e->g, HTTPS_ADDR, true, extra, HTTPS_RULES, &tls),
		       "gate") ||
	    !ASSERT_OK(client_files(e), "gateway CA and kubeconfig"))
		goto out;
	if (test__start_subtest("curl_https_read_with_gateway_jwt"))
		subtest_read_with_gateway_token(e);
	if (test__start_subtest("replayed_token_refused_by_server"))
		subtest_replayed_token_refused(e);
	if (test__start_subtest("records_read_ahead_all_answered"))
		subtest_records_read_ahead_all_answered(e);
	if (have_kubectl && test__start_subtest("kubectl_https_get_pods_no_credential"))
		subtest_kubectl_get_pods(e);
	if (have_kubectl && test__start_subtest("kubectl_https_exec_forbidden"))
		subtest_kubectl_exec_forbidden(e);
	if (test__start_subtest("expired_token_refused_by_server"))
		subtest_expired_token_refused(e);
	if (test__start_subtest("keepalive_token_renewed_before_expiry"))
		subtest_keepalive_token_renewed(e);
	if (!have_kubectl)
		printf("kubectl not installed: its subtests skipped\n");
out:
	th_http_gate_cleanup(&e->g);
	if (e->dir[0])
		th_rm_rf(e->dir);
	free(e);
}
