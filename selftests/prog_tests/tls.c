// SPDX-License-Identifier: GPL-2.0
/*
 * TLS through the gateway. A test CA made here with the openssl tool signs the servers'
 * certificates (a PostgreSQL 15 with ssl = on and hostssl in pg_hba, a python3 HTTPS server);
 * the daemon's own CA, created at its first start, signs what the agents see. Proven: psql
 * sslmode=verify-full with the gateway CA as root reaches a TLS-only server over TLS both ways;
 * an upstream certificate for another name, one from an unknown CA and a server answering 'N'
 * are refused with the reason told to psql and logged; curl and openssl s_client over HTTPS
 * through a tcp target (the leaf names the SNI and the address dialled; TLS 1.1 is refused);
 * a clear byte stream to the same kind of target still passes; a malformed ClientHello ends
 * only its own session; the CA key is 0600 in a 0700 dir and agctl ca show prints that CA.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "policy.h"
#include "tls.h"
#include "../gate.h"
#include "../pg.h"
#include "../test_progs.h"

#define PG_ADDR "127.0.0.41"
#define WEB_ADDR "127.0.0.42"
#define ECHO_ADDR "127.0.0.43"
#define WEBCA_ADDR "127.0.0.44"
#define WEBBAD_ADDR "127.0.0.45"
#define MTLS_ADDR "127.0.0.46"
#define BIG_BYTES (6 << 20)

/* The python3 HTTPS servers: as their target's tls: asks, and what each proves. */
enum { WEB = 0, WEB_CA, WEB_BAD, WEB_MTLS, NWEB };

static char out[65536], err[65536];

struct tls_env {
	struct th_pg_gate g;
	char dir[128]; /* test CA, certificates */
	char gw_ca[256];
	pid_t web_pid[NWEB];
	int web_port[NWEB];
	struct th_server *echo;
};

static int sh(const char *rel, const char *script, int timeout_ms)
{
	char *argv[] = { "/bin/sh", "-c", (char *)script, NULL };

	out[0] = err[0] = '\0';
	return th_pg_exec(rel, argv, NULL, out, sizeof(out), err, sizeof(err), timeout_ms);
}

/* Two CAs (ours, and one the gateway does not know) and the servers' certificates. */
static int make_certs(struct tls_env *e)
{
	return th_pg_make_certs(e->dir, sizeof(e->dir),
				"pg_ok IP:" PG_ADDR " testca\n"
				"pg_wrongname DNS:wrong.example testca\n"
				"pg_unknown IP:" PG_ADDR " otherca\n"
				"web IP:" WEB_ADDR ",DNS:web.test testca\n"
				"wrongname DNS:wrong.example testca\n"
				"mtls IP:" MTLS_ADDR " testca\n"
				"client DNS:agentgate.client testca\n");
}

/*
 * A python3 HTTPS server on addr with certificate `cert` (TLS 1.2+; with mtls, a client
 * certificate from the test CA is required). GET answers one line naming the path, GET /big
 * BIG_BYTES of a known pattern, POST the length and SHA-256 of the body it read.
 */
static int web_start(struct tls_env *e, int idx, const char *addr, const char *cert, bool mtls)
{
	char script[4096], portfile[200], buf[32] = "";
	FILE *f;

	snprintf(portfile, sizeof(portfile), "%s/web%d.port", e->dir, idx);
	snprintf(script, sizeof(script),
		 "import http.server, ssl, hashlib, os\n"
		 "big = bytes(i %% 251 for i in range(%d))\n"
		 "class H(http.server.BaseHTTPRequestHandler):\n"
		 "    protocol_version = 'HTTP/1.1'\n"
		 "    def reply(self, b):\n"
		 "        self.send_response(200)\n"
		 "        self.send_header('Content-Length', str(len(b)))\n"
		 "        self.end_headers()\n"
		 "        self.wfile.write(b)\n"
		 "    def do_GET(self):\n"
		 "        if self.path == '/big':\n"
		 "            return self.reply(big)\n"
		 "        self.reply(b'hello from the tls server, path ' + self.path.encode() + "
		 "b'\\n')\n"
		 "    def do_POST(self):\n"
		 "        n = int(self.headers['Content-Length'])\n"
		 "        h = hashlib.sha256(); left = n\n"
		 "        while left:\n"
		 "            d = self.rfile.read(min(left, 65536))\n"
		 "            if not d: break\n"
		 "            h.update(d); left -= len(d)\n"
		 "        self.reply(('got %%d %%s\\n' %% (n - left, h.hexdigest())).encode())\n"
		 "    def log_message(self, *a):\n"
		 "        pass\n"
		 "s = http.server.ThreadingHTTPServer(('%s', 0), H)\n"
		 "c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
		 "c.load_cert_chain('%s/%s.crt', '%s/%s.key')\n"
		 "if %d:\n"
		 "    c.verify_mode = ssl.CERT_REQUIRED\n"
		 "    c.load_verify_locations('%s/testca.crt')\n"
		 "s.socket = c.wrap_socket(s.socket, server_side=True)\n"
		 "open('%s.tmp', 'w').write(str(s.server_address[1]))\n"
		 "os.rename('%s.tmp', '%s')\n"
		 "s.serve_forever()\n",
		 BIG_BYTES, addr, e->dir, cert, e->dir, cert, mtls, e->dir, portfile, portfile,
		 portfile);
	e->web_pid[idx] = fork();
	if (e->web_pid[idx] < 0)
		return -errno;
	if (!e->web_pid[idx]) {
		execl("/usr/bin/python3", "python3", "-c", script, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 200; i++) {
		f = fopen(portfile, "r");
		if (f) {
			if (fgets(buf, sizeof(buf), f))
				e->web_port[idx] = atoi(buf);
			fclose(f);
			if (e->web_port[idx] > 0)
				return 0;
		}
		usleep(50 * 1000);
	}
	return -ETIMEDOUT;
}

static int env_start(struct tls_env *e)
{
	struct th_pg_gate *g = &e->g;
	char path[2][256], tls[512], tls_ca[512], tls_mtls[768];
	int rc, n;

	memset(e, 0, sizeof(*e));
	rc = make_certs(e);
	if (rc)
		return rc;
	rc = th_cgroup_create("tls0", g->tagged, sizeof(g->tagged));
	if (rc)
		return rc;
	rc = th_pg_start(&g->pg, PG_ADDR, "trust");
	if (rc)
		return rc;
	snprintf(path[0], sizeof(path[0]), "%s/pg_ok.crt", e->dir);
	snprintf(path[1], sizeof(path[1]), "%s/pg_ok.key", e->dir);
	rc = th_pg_set_ssl(&g->pg, path[0], path[1]);
	if (rc)
		return rc;
	rc = web_start(e, WEB, WEB_ADDR, "web", false);
	if (!rc)
		rc = web_start(e, WEB_CA, WEBCA_ADDR, "wrongname", false);
	if (!rc)
		rc = web_start(e, WEB_BAD, WEBBAD_ADDR, "wrongname", false);
	if (!rc)
		rc = web_start(e, WEB_MTLS, MTLS_ADDR, "mtls", true);
	if (rc)
		return rc;
	e->echo = th_server_start(TH_SRV_ECHO, AF_INET, ECHO_ADDR);
	if (!e->echo)
		return -errno;
	snprintf(tls, sizeof(tls),
		 "    tls: { client: terminate, upstream: verify-full, ca_file: %s/testca.crt }\n",
		 e->dir);
	snprintf(tls_ca, sizeof(tls_ca),
		 "    tls: { client: terminate, upstream: verify-ca, ca_file: %s/testca.crt }\n",
		 e->dir);
	snprintf(tls_mtls, sizeof(tls_mtls),
		 "    tls: { client: terminate, upstream: verify-full, ca_file: %s/testca.crt,\n"
		 "           cert_file: %s/client.crt, key_file: %s/client.key }\n",
		 e->dir, e->dir, e->dir);
	n = snprintf(g->policy, sizeof(g->policy),
		     "apiVersion: agentgate/v1\n"
		     "agents:\n"
		     "  - name: t\n"
		     "    cgroup: %s\n"
		     "targets:\n"
		     "  - name: db\n"
		     "    protocol: postgres\n"
		     "    address: %s:%d\n%s"
		     "  - name: web\n"
		     "    protocol: tcp\n"
		     "    address: %s:%d\n%s"
		     "  - name: echo\n"
		     "    protocol: tcp\n"
		     "    address: %s:%d\n%s"
		     "  - name: webca\n"
		     "    protocol: tcp\n"
		     "    address: %s:%d\n%s"
		     "  - name: webbad\n"
		     "    protocol: tcp\n"
		     "    address: %s:%d\n%s"
		     "  - name: mtls\n"
		     "    protocol: tcp\n"
		     "    address: %s:%d\n%s"
		     "rules:\n"
		     "  - agent: t\n"
		     "    target: db\n"
		     "    sql:\n"
		     "      - { name: all, when: { command: [select, set, show] }, then: allow }\n"
		     "default: deny\n",
		     g->tagged, PG_ADDR, g->pg.port, tls, WEB_ADDR, e->web_port[WEB], tls,
		     ECHO_ADDR, th_server_port(e->echo), tls, WEBCA_ADDR, e->web_port[WEB_CA],
		     tls_ca, WEBBAD_ADDR, e->web_port[WEB_BAD], tls, MTLS_ADDR,
		     e->web_port[WEB_MTLS], tls_mtls);
	if (n < 0 || (size_t)n >= sizeof(g->policy))
		return -ENOSPC;
	rc = th_daemon_start(&g->d, g->policy, NULL);
	if (rc)
		return rc;
	snprintf(e->gw_ca, sizeof(e->gw_ca), "%s/ca/ca.crt", g->d.state_dir);
	return 0;
}

static void env_stop(struct tls_env *e)
{
	th_pg_gate_cleanup(&e->g);
	th_server_stop(e->echo);
	for (int i = 0; i < NWEB; i++) {
		if (e->web_pid[i] > 0) {
			kill(e->web_pid[i], SIGKILL);
			waitpid(e->web_pid[i], NULL, 0);
		}
	}
	if (e->dir[0])
		th_rm_rf(e->dir);
}

static int psql_tls(struct tls_env *e, const char *sql)
{
	char conn[600];
	char *argv[] = { "/usr/bin/psql", "-X", "-A", "-t", "-d", conn, "-c", (char *)sql, NULL };

	snprintf(conn, sizeof(conn),
		 "host=%s port=%d user=%s dbname=%s sslmode=verify-full sslrootcert=%s", PG_ADDR,
		 e->g.pg.port, TH_PG_USER, TH_PG_DB, e->gw_ca);
	out[0] = err[0] = '\0';
	return th_pg_exec(e->g.tagged, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
}

static bool log_has(struct tls_env *e, const char *needle)
{
	static char log[256 * 1024];

	for (int i = 0; i < 40; i++) {
		if (!th_daemon_read_log(&e->g.d, log, sizeof(log)) && strstr(log, needle))
			return true;
		usleep(50 * 1000);
	}
	return false;
}

static void subtest_pg_verify_full(struct tls_env *e)
{
	int rc = psql_tls(e, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");

	if (!ASSERT_EQ(rc, 0, "psql sslmode=verify-full through the gateway"))
		printf("stderr: %s\n", err);
	/* The server saw TLS from the gateway: the hostssl line let it in, pg_stat_ssl says so. */
	ASSERT_STREQ(out, "t\n", "the upstream leg is TLS");
	/* And psql's leg: a certificate for the address it dialled, from the gateway CA. */
	rc = psql_tls(e, "SELECT 'tls both ways'");
	ASSERT_EQ(rc, 0, "again (cached leaf)");
	ASSERT_STREQ(out, "tls both ways\n", "answered");
	/* The server takes the agent role over TLS only (hostssl): clear, direct, is refused. */
	{
		char conn[300];
		char *argv[] = { "/usr/bin/psql", "-X", "-A", "-t", "-d", conn, "-c",
				 "SELECT 1",	  NULL };

		snprintf(conn, sizeof(conn), "host=%s port=%d user=%s dbname=%s sslmode=disable",
			 PG_ADDR, e->g.pg.port, TH_PG_USER, TH_PG_DB);
		rc = th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
		ASSERT_NEQ(rc, 0, "direct without TLS refused by the server");
		ASSERT_HAS_SUBSTR(err, "no encryption", "by its hostssl line");
	}
}

/*
 * A TLS session with no traffic for two worker ticks (1 s each) gives back its record buffers
 * (session.c, tls_slim()): here while the server sleeps on a statement, both legs idle. The
 * answer, and the statements after it, come through the buffers OpenSSL allocates again.
 */
static void subtest_pg_idle_slim_resumes(struct tls_env *e)
{
	char conn[600];
	char *argv[] = { "/usr/bin/psql", "-X", "-A", "-t", "-d", conn,
			 "-c", "SELECT 'before'",
			 "-c", "SELECT 'slept ' || pg_sleep(2.6)::text",
			 "-c", "SELECT repeat('r', 100000) = repeat('r', 100000), 'after'",
			 NULL };
	int rc;

	snprintf(conn, sizeof(conn),
		 "host=%s port=%d user=%s dbname=%s sslmode=verify-full sslrootcert=%s", PG_ADDR,
		 e->g.pg.port, TH_PG_USER, TH_PG_DB, e->gw_ca);
	out[0] = err[0] = '\0';
	rc = th_pg_exec(e->g.tagged, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	if (!ASSERT_EQ(rc, 0, "psql over TLS both legs, idle in the middle"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "before\nslept \nt|after\n", "every answer, in order");
}

static void set_server_cert(struct tls_env *e, const char *name)
{
	char crt[256], key[256];

	snprintf(crt, sizeof(crt), "%s/%s.crt", e->dir, name);
	snprintf(key, sizeof(key), "%s/%s.key", e->dir, name);
	ASSERT_OK(th_pg_set_ssl(&e->g.pg, crt, key), name);
}

static void subtest_pg_wrong_name(struct tls_env *e)
{
	int rc;

	set_server_cert(e, "pg_wrongname");
	rc = psql_tls(e, "SELECT 1");
	ASSERT_NEQ(rc, 0, "refused");
	ASSERT_HAS_SUBSTR(err, "agentgate: upstream TLS verification failed", "psql is told");
	/* The target is an address: the certificate has no IP SAN for it. */
	ASSERT_HAS_SUBSTR(err, "IP address mismatch", "why");
	ASSERT_TRUE(log_has(e, "upstream TLS verification failed: IP address mismatch"),
		    "daemon log");
	set_server_cert(e, "pg_ok");
}

static void subtest_pg_unknown_ca(struct tls_env *e)
{
	int rc;

	set_server_cert(e, "pg_unknown");
	rc = psql_tls(e, "SELECT 1");
	ASSERT_NEQ(rc, 0, "refused");
	ASSERT_HAS_SUBSTR(err, "agentgate: upstream TLS verification failed", "psql is told");
	ASSERT_HAS_SUBSTR(err, "unable to get local issuer certificate", "why");
	ASSERT_TRUE(log_has(e, "unable to get local issuer certificate"), "daemon log");
	set_server_cert(e, "pg_ok");
}

static void subtest_pg_server_says_n(struct tls_env *e)
{
	int rc;

	ASSERT_OK(th_pg_set_ssl(&e->g.pg, NULL, NULL), "ssl off");
	rc = psql_tls(e, "SELECT 1");
	ASSERT_NEQ(rc, 0, "refused, never a downgrade to clear");
	ASSERT_HAS_SUBSTR(err, "upstream TLS refused: the server does not accept TLS", "told");
	ASSERT_TRUE(log_has(e, "does not accept TLS"), "daemon log");
	set_server_cert(e, "pg_ok");
	rc = psql_tls(e, "SELECT 'back'");
	ASSERT_EQ(rc, 0, "with TLS back on the server, it works again");
}

static void subtest_https_curl(struct tls_env *e)
{
	char script[1024];
	int rc;

	/* By address: the leaf's IP SAN; by name (SNI web.test): its DNS SAN. */
	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; curl -sS --max-time 20 --cacert %s https://%s:%d/one && "
		 "curl -sS --max-time 20 --cacert %s --resolve web.test:%d:%s "
		 "https://web.test:%d/two",
		 e->gw_ca, WEB_ADDR, e->web_port[WEB], e->gw_ca, e->web_port[WEB], WEB_ADDR,
		 e->web_port[WEB]);
	rc = sh(e->g.tagged, script, 60000);
	if (!ASSERT_EQ(rc, 0, "curl over HTTPS through the gateway"))
		printf("stderr: %s\n", err);
	ASSERT_HAS_SUBSTR(out, "hello from the tls server, path /one", "by address");
	ASSERT_HAS_SUBSTR(out, "hello from the tls server, path /two", "by name");
}

static void subtest_leaf_names(struct tls_env *e)
{
	char script[1024];
	int rc;

	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; echo | openssl s_client -connect %s:%d "
		 "-servername sni.example -CAfile %s -verify_return_error 2>/dev/null | "
		 "openssl x509 -noout -ext subjectAltName -issuer -dates",
		 WEB_ADDR, e->web_port[WEB], e->gw_ca);
	rc = sh(e->g.tagged, script, 30000);
	if (!ASSERT_EQ(rc, 0, "s_client"))
		printf("stderr: %s\n", err);
	printf("%s", out);
	ASSERT_HAS_SUBSTR(out, "DNS:sni.example", "the SNI asked for");
	ASSERT_HAS_SUBSTR(out, "IP Address:" WEB_ADDR, "the address dialled");
	ASSERT_HAS_SUBSTR(out, "agentgate local CA", "issued by the gateway CA");
}

static void subtest_tls11_refused(struct tls_env *e)
{
	char script[1024];
	int rc;

	/* SECLEVEL=0 lets this client offer TLS 1.1 at all: the refusal is the gateway's. */
	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; echo | openssl s_client -connect %s:%d -tls1_1 "
		 "-cipher DEFAULT@SECLEVEL=0 2>&1",
		 WEB_ADDR, e->web_port[WEB]);
	rc = sh(e->g.tagged, script, 30000);
	ASSERT_NEQ(rc, 0, "TLS 1.1 handshake fails");
	ASSERT_HAS_SUBSTR(out, "protocol version", "for its version");
	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; echo | openssl s_client -connect %s:%d -tls1_2 "
		 "-CAfile %s -verify_return_error 2>&1",
		 WEB_ADDR, e->web_port[WEB], e->gw_ca);
	rc = sh(e->g.tagged, script, 30000);
	ASSERT_EQ(rc, 0, "TLS 1.2 works");
	ASSERT_HAS_SUBSTR(out, "Protocol  : TLSv1.2", "negotiated 1.2");
}

static void subtest_clear_stream(struct tls_env *e)
{
	int fd = th_pg_connect_from(e->g.tagged, ECHO_ADDR, th_server_port(e->echo));
	char buf[64] = "";
	ssize_t n;

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	/* Not 0x16: no TLS either way, bytes relayed as they are. */
	ASSERT_OK(th_send_all(fd, "plain bytes\n", 12, 5000), "send");
	shutdown(fd, SHUT_WR);
	n = th_recv_all(fd, buf, sizeof(buf) - 1, 10000);
	ASSERT_EQ(n, 12, "echoed");
	ASSERT_STREQ(buf, "plain bytes\n", "unchanged");
	close(fd);
}

static void subtest_bad_client_hello(struct tls_env *e)
{
	static const char junk[] = "\x16\x03\x01\x00\x20this is not a client hello at all!!";
	int fd = th_pg_connect_from(e->g.tagged, WEB_ADDR, e->web_port[WEB]);
	char buf[256];
	ssize_t n;

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	ASSERT_OK(th_send_all(fd, junk, sizeof(junk) - 1, 5000), "send");
	n = th_recv_all(fd, buf, sizeof(buf), 10000);
	/* An alert at most, then the end: never the server's bytes. */
	ASSERT_LT(n, 16, "the session ended");
	close(fd);
	ASSERT_TRUE(log_has(e, "agent TLS: handshake failed"), "logged");
	ASSERT_TRUE(th_pg_gate_alive(&e->g), "the daemon lives on");
	subtest_https_curl(e);
}

/* Megabytes both ways through TLS on both legs: backpressure and partial TLS writes. */
static void subtest_bulk_both_ways(struct tls_env *e)
{
	char script[1024], want[128];
	int rc;

	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; curl -sS --max-time 60 --cacert %s https://%s:%d/big | "
		 "sha256sum | cut -c1-64; "
		 "head -c %d /dev/zero | tr '\\0' 'z' | curl -sS --max-time 60 --cacert %s "
		 "--data-binary @- https://%s:%d/up; "
		 "python3 -c \"import hashlib,sys; print(hashlib.sha256(bytes(i %% 251 for i in "
		 "range(%d))).hexdigest()); print(hashlib.sha256(b'z' * %d).hexdigest())\"",
		 e->gw_ca, WEB_ADDR, e->web_port[WEB], BIG_BYTES, e->gw_ca, WEB_ADDR,
		 e->web_port[WEB], BIG_BYTES, BIG_BYTES);
	rc = sh(e->g.tagged, script, 120000);
	if (!ASSERT_EQ(rc, 0, "curl down and up"))
		printf("stderr: %s\n", err);
	printf("%s", out);
	{
		char down[80] = "", got[200] = "", exp_down[80] = "", exp_up[80] = "";

		if (!ASSERT_EQ(
			    sscanf(out, "%79s\n%199[^\n]\n%79s\n%79s", down, got, exp_down, exp_up),
			    4, "four lines"))
			return;
		ASSERT_STREQ(down, exp_down, "6 MiB down, intact");
		snprintf(want, sizeof(want), "got %d %s", BIG_BYTES, exp_up);
		ASSERT_STREQ(got, want, "6 MiB up, intact");
	}
}

static void subtest_verify_ca_and_mtls(struct tls_env *e)
{
	char script[1024], path[300];
	int rc;

	/* verify-ca: the chain only, so a certificate for another name passes. */
	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; curl -sS --max-time 20 --cacert %s https://%s:%d/ca",
		 e->gw_ca, WEBCA_ADDR, e->web_port[WEB_CA]);
	rc = sh(e->g.tagged, script, 30000);
	if (!ASSERT_EQ(rc, 0, "verify-ca accepts another name"))
		printf("stderr: %s\n", err);
	ASSERT_HAS_SUBSTR(out, "path /ca", "answered");
	/* verify-full: the same certificate is refused; the agent's TLS ends, the log says why. */
	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; curl -sS --max-time 20 --cacert %s https://%s:%d/bad",
		 e->gw_ca, WEBBAD_ADDR, e->web_port[WEB_BAD]);
	rc = sh(e->g.tagged, script, 30000);
	ASSERT_NEQ(rc, 0, "verify-full refuses it");
	ASSERT_TRUE(!strstr(out, "path /bad"), "nothing from the server");
	ASSERT_TRUE(log_has(e, "upstream TLS: certificate verify failed: IP address mismatch"),
		    "logged with the reason");
	/* mTLS: the server requires a client certificate; the gateway shows tls.cert_file. */
	snprintf(script, sizeof(script),
		 "PATH=/usr/bin:/bin; curl -sS --max-time 20 --cacert %s https://%s:%d/mtls",
		 e->gw_ca, MTLS_ADDR, e->web_port[WEB_MTLS]);
	/* Its key as the daemon's own keys: root's and 0600, or no session (and why). */
	snprintf(path, sizeof(path), "%s/client.key", e->dir);
	if (ASSERT_OK(chmod(path, 0644), "client key 0644")) {
		rc = sh(e->g.tagged, script, 30000);
		ASSERT_NEQ(rc, 0, "a group/other-readable client key: refused");
		ASSERT_TRUE(log_has(e, "client.key: must be owned by root and mode 0600 (is 0644)"),
			    "logged with the fix");
		ASSERT_OK(chmod(path, 0600), "0600 again");
	}
	rc = sh(e->g.tagged, script, 30000);
	if (!ASSERT_EQ(rc, 0, "mTLS upstream"))
		printf("stderr: %s\n", err);
	ASSERT_HAS_SUBSTR(out, "path /mtls", "answered");
}

static void subtest_ca_files(struct tls_env *e)
{
	char path[300], pem[8192] = "";
	struct stat st;
	FILE *f;
	size_t n = 0;
	int rc;

	snprintf(path, sizeof(path), "%s/ca", e->g.d.state_dir);
	if (ASSERT_OK(stat(path, &st), "ca dir"))
		ASSERT_EQ(st.st_mode & 07777, 0700, "ca dir mode");
	snprintf(path, sizeof(path), "%s/ca/ca.key", e->g.d.state_dir);
	if (ASSERT_OK(stat(path, &st), "ca key"))
		ASSERT_EQ(st.st_mode & 07777, 0600, "ca key mode");
	f = fopen(e->gw_ca, "r");
	if (ASSERT_OK_PTR(f, "ca.crt")) {
		n = fread(pem, 1, sizeof(pem) - 1, f);
		pem[n] = '\0';
		fclose(f);
	}
	rc = th_agctl(&e->g.d, out, sizeof(out), "ca show");
	ASSERT_EQ(rc, 0, "agctl ca show");
	ASSERT_STREQ(out, pem, "prints the CA file");
	ASSERT_TRUE(!strstr(out, "PRIVATE"), "never a key");
	rc = th_agctl(&e->g.d, out, sizeof(out), "-j ca show");
	ASSERT_EQ(rc, 0, "agctl -j ca show");
	ASSERT_HAS_SUBSTR(out, "\"subject\":", "subject");
	ASSERT_HAS_SUBSTR(out, "\"not_after\":", "not_after");
	ASSERT_HAS_SUBSTR(out, "\"sha256\":", "sha256");
	ASSERT_HAS_SUBSTR(out, "BEGIN CERTIFICATE", "pem");
	/* The fingerprint is the file's. */
	{
		char script[512], fp[256];

		snprintf(script, sizeof(script),
			 "PATH=/usr/bin:/bin; openssl x509 -in %s -noout -fingerprint -sha256 | "
			 "sed 's/.*=//; s/://g' | tr A-F a-f",
			 e->gw_ca);
		snprintf(fp, sizeof(fp), "%s", out);
		if (ASSERT_EQ(sh(NULL, script, 10000), 0, "openssl fingerprint")) {
			out[strcspn(out, "\n")] = '\0';
			ASSERT_HAS_SUBSTR(fp, out, "the same sha256");
		}
	}
}

/* A client that starts a handshake and goes quiet is cut off (10 s), not kept forever. */
static void subtest_stalled_handshake(struct tls_env *e)
{
	int fd = th_pg_connect_from(e->g.tagged, WEB_ADDR, e->web_port[WEB]);
	char buf[64];
	ssize_t n;

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	ASSERT_OK(th_send_all(fd, "\x16\x03\x01", 3, 5000), "three bytes of a record header");
	n = th_recv_all(fd, buf, sizeof(buf), 40000);
	ASSERT_TRUE(n == 0 || n == -ECONNRESET, "the gateway ended it");
	close(fd);
	ASSERT_TRUE(log_has(e, "agent TLS: handshake timed out"), "and logged why");
}

/* --ca-cert/--ca-key: that CA is the one shown; a key of another CA stops the start. */
static void subtest_supplied_ca(struct tls_env *e)
{
	struct th_daemon d = {};
	char cg[256], policy[1024], args[600], file[300];
	int rc;

	if (!ASSERT_OK(th_cgroup_create("tls1", cg, sizeof(cg)), "cgroup") ||
	    !ASSERT_OK(th_policy_tcp(policy, sizeof(policy), cg, "x", "127.0.0.47:9", NULL),
		       "policy"))
		return;
	snprintf(args, sizeof(args), "--ca-cert %s/testca.crt --ca-key %s/testca.key", e->dir,
		 e->dir);
	rc = th_daemon_start(&d, policy, args);
	if (ASSERT_OK(rc, "daemon with a supplied CA")) {
		char script[400];

		ASSERT_EQ(th_agctl(&d, out, sizeof(out), "ca show"), 0, "agctl ca show");
		snprintf(file, sizeof(file), "%s/shown.crt", e->dir);
		{
			FILE *f = fopen(file, "w");

			if (f) {
				fputs(out, f);
				fclose(f);
			}
		}
		snprintf(script, sizeof(script), "/usr/bin/cmp %s %s/testca.crt", file, e->dir);
		ASSERT_EQ(sh(NULL, script, 10000), 0, "the supplied CA, byte for byte");
		snprintf(file, sizeof(file), "%s/ca/ca.key", d.state_dir);
		ASSERT_NEQ(access(file, F_OK), 0, "no CA created in the state dir");
	}
	th_daemon_cleanup(&d);
	snprintf(args, sizeof(args), "--ca-cert %s/testca.crt --ca-key %s/otherca.key", e->dir,
		 e->dir);
	rc = th_daemon_start(&d, policy, args);
	ASSERT_EQ(rc, -ECHILD, "a key that does not match refuses to start");
	if (rc == -ECHILD) {
		static char log[65536];

		th_daemon_read_log(&d, log, sizeof(log));
		ASSERT_HAS_SUBSTR(log, "does not match the certificate", "and says why");
	}
	th_daemon_cleanup(&d);
}

/*
 * The CA in the state dir is read only from root's own files: a CA key that is a symbolic link,
 * or that others may read, stops the start with an error naming the path; 0600 starts again.
 */
static void subtest_state_ca_refused(struct tls_env *e)
{
	struct th_daemon d = {};
	char cg[256], policy[1024], key[300];

	if (!ASSERT_OK(th_cgroup_create("tls2", cg, sizeof(cg)), "cgroup") ||
	    !ASSERT_OK(th_policy_tcp(policy, sizeof(policy), cg, "x", "127.0.0.47:9", NULL),
		       "policy"))
		return;
	if (!ASSERT_OK(th_daemon_start(&d, policy, NULL), "daemon makes its CA"))
		goto out;
	th_daemon_stop(&d);
	snprintf(key, sizeof(key), "%s/ca/ca.key", d.state_dir);
	if (th_key_file_refusals(&d, key, "CA key"))
		ASSERT_EQ(th_agctl(&d, out, sizeof(out), "ca show"), 0, "with the same CA");
out:
	th_daemon_cleanup(&d);
}

/* tls: keys as the session layer reads them. */
static void subtest_policy_modes(void)
{
	static const struct {
		const char *tls;
		bool terminate;
		enum ag_tls_upstream up;
	} cases[] = {
		{ "", false, AG_TLS_UP_NONE },
		{ "    tls: { client: terminate }\n", true, AG_TLS_UP_VERIFY_FULL },
		{ "    tls: { upstream: verify-ca }\n", false, AG_TLS_UP_VERIFY_CA },
		{ "    tls: { client: terminate, upstream: disable }\n", true, AG_TLS_UP_NONE },
		{ "    tls: { upstream: off }\n", false, AG_TLS_UP_NONE },
		{ "    tls: { upstream: require }\n", false, AG_TLS_UP_REQUIRE },
	};
	char yaml[1024], perr[512];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct ag_policy *p;
		const struct ag_policy_target *t;

		snprintf(yaml, sizeof(yaml),
			 "apiVersion: agentgate/v1\n"
			 "agents: [{ name: a, cgroup: /x }]\n"
			 "targets:\n"
			 "  - name: t\n"
			 "    protocol: tcp\n"
			 "    address: 127.0.0.9:443\n%s",
			 cases[i].tls);
		p = ag_policy_parse(yaml, strlen(yaml), "t.yaml", perr, sizeof(perr));
		if (!ASSERT_OK_PTR(p, cases[i].tls)) {
			printf("%s\n", perr);
			continue;
		}
		t = ag_policy_target_by_name(p, "t");
		ASSERT_EQ(ag_tls_client_terminates(t), cases[i].terminate, cases[i].tls);
		ASSERT_EQ(ag_tls_upstream_mode(t), cases[i].up, cases[i].tls);
		ag_policy_free(p);
	}
}

void test_tls(void)
{
	static struct tls_env e;

	if (!ASSERT_OK(env_start(&e), "setup"))
		goto out;
	if (test__start_subtest("ca_key_modes_and_agctl_ca_show"))
		subtest_ca_files(&e);
	if (test__start_subtest("pg_verify_full_both_legs"))
		subtest_pg_verify_full(&e);
	if (test__start_subtest("pg_idle_session_slims_and_resumes"))
		subtest_pg_idle_slim_resumes(&e);
	if (test__start_subtest("pg_upstream_wrong_name_refused"))
		subtest_pg_wrong_name(&e);
	if (test__start_subtest("pg_upstream_unknown_ca_refused"))
		subtest_pg_unknown_ca(&e);
	if (test__start_subtest("pg_upstream_answers_n_refused"))
		subtest_pg_server_says_n(&e);
	if (test__start_subtest("https_curl_through_tcp_target"))
		subtest_https_curl(&e);
	if (test__start_subtest("bulk_both_ways_through_tls"))
		subtest_bulk_both_ways(&e);
	if (test__start_subtest("upstream_verify_ca_verify_full_mtls"))
		subtest_verify_ca_and_mtls(&e);
	if (test__start_subtest("leaf_san_is_sni_and_orig_ip"))
		subtest_leaf_names(&e);
	if (test__start_subtest("tls11_refused"))
		subtest_tls11_refused(&e);
	if (test__start_subtest("clear_stream_to_terminate_target"))
		subtest_clear_stream(&e);
	if (test__start_subtest("malformed_client_hello_one_session"))
		subtest_bad_client_hello(&e);
	if (test__start_subtest("stalled_handshake_times_out"))
		subtest_stalled_handshake(&e);
	if (test__start_subtest("supplied_ca_cert_and_key"))
		subtest_supplied_ca(&e);
	if (test__start_subtest("state_ca_key_symlink_or_0644_refused"))
		subtest_state_ca_refused(&e);
	if (test__start_subtest("policy_tls_modes"))
		subtest_policy_modes();
out:
	test__end_subtest();
	env_stop(&e);
}
