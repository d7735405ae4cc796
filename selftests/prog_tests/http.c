// SPDX-License-Identifier: GPL-2.0
/*
 * protocol: http end to end, curl and raw sockets from a tagged cgroup against a local API
 * server: allowed reads, refusals (403 JSON, the connection still usable), the default deny,
 * pipelined requests answered in order (our refusals in their turn), chunked request bodies,
 * Expect: 100-continue (allowed: the server's 100 passes; refused: 403 and close), HEAD and
 * 204 without bodies, the agent's Authorization dropped and the gateway's credential sent in
 * its place, JSON bodies masked (plain and gzip) and counted on the session; and the streamed
 * JSON masker on its own.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "jsonmask.h"
#include "mask.h"
#include "../http.h"
#include "../test_progs.h"

#define HTTP_RULES                                                                                 \
	"    http:\n"                                                                              \
	"      - { name: no-admin, when: { path: [\"/admin/*\"] }, then: deny }\n"                 \
	"      - { name: review-patch, when: { method: [PATCH] }, then: approve }\n"               \
	"      - { name: reads, when: { method: [GET, HEAD] }, then: allow }\n"                    \
	"      - { name: echo-writes, when: { method: [POST, PUT], path: [\"/echo*\"] },"          \
	" then: allow }\n"                                                                         \
	"    mask:\n"                                                                              \
	"      keys: [card]\n"                                                                     \
	"      detectors: [email, credit-card]\n"                                                  \
	"      style: redact\n"                                                               \
	"approvals: { approvers: [nobody] }\n"

static char out[256 * 1024], buf[256 * 1024];

static void subtest_get_allowed(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/version", NULL), "curl"))
		return;
	ASSERT_HAS_SUBSTR(out, "\"gitVersion\":\"v1.29.0\"", "the server's answer");
}

static void subtest_denied_403_json(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/admin/users", "-i", NULL), "curl"))
		return;
	ASSERT_HAS_SUBSTR(out, "HTTP/1.1 403 Forbidden", "403");
	ASSERT_HAS_SUBSTR(out, "Content-Type: application/json", "json");
	ASSERT_HAS_SUBSTR(out, "\"message\":\"agentgate: blocked by rule no-admin\"", "rule named");
	/* percent-encoding of unreserved characters does not get around a path rule */
	if (ASSERT_OK(th_http_curl(g, out, sizeof(out), "/adm%69n/%75sers", "-i", NULL), "curl"))
		ASSERT_HAS_SUBSTR(out, "blocked by rule no-admin", "encoded path decided decoded");
	ASSERT_OK(th_http_srvlog(g, buf, sizeof(buf)), "server log");
	ASSERT_FALSE(strstr(buf, "/admin") || strstr(buf, "/adm%69n"),
		     "the refused requests never reached the server");
}

static void subtest_default_deny(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/echo", "-i", "-X", "DELETE", NULL),
		       "curl"))
		return;
	ASSERT_HAS_SUBSTR(out, "HTTP/1.1 403", "403");
	ASSERT_HAS_SUBSTR(out, "no rule allows this request", "default deny named");
}

/* A refusal leaves the connection usable: the next request on it is answered. */
static void subtest_keepalive_after_deny(struct th_http_gate *g)
{
	static const char req[] = "GET /admin/a HTTP/1.1\r\nHost: x\r\n\r\n"
				  "GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	bool closed;
	char *a, *b;

	ASSERT_GT(th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed), 0, "raw");
	a = strstr(out, "HTTP/1.1 403");
	b = strstr(out, "HTTP/1.1 200");
	ASSERT_TRUE(a && b && a < b, "403, then 200 on the same connection");
	ASSERT_TRUE(closed, "closed after Connection: close");
}

/* Pipelined requests: answers in the order asked, our 403 in its turn. */
static void subtest_pipelined_in_order(struct th_http_gate *g)
{
	static const char req[] =
		"GET /echo/first HTTP/1.1\r\nHost: x\r\n\r\n"
		"GET /admin/second HTTP/1.1\r\nHost: x\r\n\r\n"
		"POST /echo/third HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
		"GET /echo/fourth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	char *p1, *p2, *p3, *p4;
	bool closed;

	ASSERT_GT(th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed), 0, "raw");
	p1 = strstr(out, "/echo/first");
	p2 = strstr(out, "blocked by rule no-admin");
	p3 = strstr(out, "/echo/third");
	p4 = strstr(out, "/echo/fourth");
	if (!ASSERT_TRUE(p1 && p2 && p3 && p4, "four answers"))
		printf("%s\n", out);
	else
		ASSERT_TRUE(p1 < p2 && p2 < p3 && p3 < p4, "in the order asked");
	ASSERT_HAS_SUBSTR(out, "\"body_len\":5", "the body of the third");
	ASSERT_TRUE(closed, "closed after the last");
}

/*
 * A pipeline deeper than the gateway's queue of owed answers (1024): it stops reading the agent
 * for a while, then takes the rest up; every answer comes, in order, none lost.
 */
static void subtest_pipeline_deeper_than_queue(struct th_http_gate *g)
{
	static const char one[] = "GET /version HTTP/1.1\r\nHost: x\r\n\r\n";
	static const char last[] =
		"GET /echo/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	const int n = 1500;
	size_t total = n * (sizeof(one) - 1) + sizeof(last) - 1, sent = 0, got = 0;
	char *req = malloc(total), *resp = malloc(4 << 20);
	int fd = th_http_connect(g), answers = 0;
	bool eof = false;

	if (!ASSERT_OK_PTR(req, "malloc") || !ASSERT_OK_PTR(resp, "malloc") ||
	    !ASSERT_GE(fd, 0, "connect"))
		goto out;
	for (int i = 0; i < n; i++)
		memcpy(req + i * (sizeof(one) - 1), one, sizeof(one) - 1);
	memcpy(req + n * (sizeof(one) - 1), last, sizeof(last) - 1);
	fcntl(fd, F_SETFL, O_NONBLOCK);
	for (int idle = 0; !eof && idle < 300;) {
		struct pollfd p = { .fd = fd, .events = POLLIN | (sent < total ? POLLOUT : 0) };
		ssize_t r;

		if (poll(&p, 1, 100) <= 0) {
			idle++;
			continue;
		}
		idle = 0;
		if ((p.revents & POLLOUT) && sent < total) {
			r = send(fd, req + sent, total - sent, MSG_NOSIGNAL);
			if (r > 0)
				sent += r;
		}
		if (p.revents & (POLLIN | POLLHUP)) {
			r = recv(fd, resp + got, (4 << 20) - 1 - got, 0);
			if (r == 0)
				eof = true;
			if (r > 0)
				got += r;
		}
	}
	resp[got] = '\0';
	for (const char *q = resp; (q = strstr(q, "HTTP/1.1 200")); q++)
		answers++;
	ASSERT_EQ(sent, total, "all sent");
	ASSERT_EQ(answers, n + 1, "every request answered");
	ASSERT_TRUE(got > 0 && strstr(resp, "/echo/last") > strstr(resp, "gitVersion"),
		    "the last answer last");
	ASSERT_TRUE(eof, "closed after the last");
	if (!th_daemon_read_log(&g->d, resp, 4 << 20))
		ASSERT_HAS_SUBSTR(resp, "answers owed: the agent waits", "the queue filled up");
out:
	if (fd >= 0)
		close(fd);
	free(req);
	free(resp);
}

/* The agent sends, then half-closes: every answer still comes, then the FIN. */
static void subtest_half_close_after_requests(struct th_http_gate *g)
{
	static const char req[] = "GET /echo/one HTTP/1.1\r\nHost: x\r\n\r\n"
				  "GET /admin/two HTTP/1.1\r\nHost: x\r\n\r\n";
	bool closed;
	int fd = th_http_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	th_send_all(fd, req, sizeof(req) - 1, 5000);
	shutdown(fd, SHUT_WR);
	th_http_read_until(fd, out, sizeof(out), NULL, 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "/echo/one", "the first answer");
	ASSERT_HAS_SUBSTR(out, "blocked by rule no-admin", "our 403 after it, whole");
	ASSERT_TRUE(closed, "then the FIN");
	close(fd);
}

static int write_blob(const char *path, size_t n)
{
	FILE *f = fopen(path, "w");

	if (!f)
		return -errno;
	for (size_t i = 0; i < n; i++)
		fputc('a' + i % 26, f);
	return fclose(f);
}

static void subtest_chunked_request_body(struct th_http_gate *g)
{
	char file[256], at[260];

	snprintf(file, sizeof(file), "%s/blob", g->dir);
	snprintf(at, sizeof(at), "@%s", file);
	if (!ASSERT_OK(write_blob(file, 300000), "blob"))
		return;
	chmod(g->dir, 0755);
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/echo", "-H",
				    "Transfer-Encoding: chunked", "--data-binary", at, NULL),
		       "curl"))
		return;
	ASSERT_HAS_SUBSTR(out, "\"body_len\":300000", "the whole body, re-chunked");
}

static void subtest_expect_100_continue(struct th_http_gate *g)
{
	static const char head[] = "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
				   "Expect: 100-continue\r\nConnection: close\r\n\r\n";
	char file[256], at[260];
	bool closed;
	ssize_t n;
	int fd;

	snprintf(file, sizeof(file), "%s/blob2", g->dir);
	snprintf(at, sizeof(at), "@%s", file);
	if (!ASSERT_OK(write_blob(file, 2000000), "blob"))
		return;
	chmod(g->dir, 0755);
	if (ASSERT_OK(th_http_curl(g, out, sizeof(out), "/echo", "-H", "Expect: 100-continue",
				   "--data-binary", at, NULL),
		      "curl"))
		ASSERT_HAS_SUBSTR(out, "\"body_len\":2000000", "curl's body after 100");
	/* raw: the server's 100 Continue reaches us before we send the body */
	fd = th_http_connect(g);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	th_send_all(fd, head, sizeof(head) - 1, 5000);
	n = th_http_read_until(fd, out, sizeof(out), "\r\n\r\n", 15000, &closed);
	if (ASSERT_GT(n, 0, "interim answer"))
		ASSERT_HAS_SUBSTR(out, "HTTP/1.1 100 Continue", "100 before the body");
	th_send_all(fd, "hello world", 11, 5000);
	n = th_http_read_until(fd, out, sizeof(out), NULL, 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "\"body_len\":11", "the body after 100");
	close(fd);
}

/* Refused with the body not sent (Expect): 403 and the connection closed, framing unknown. */
static void subtest_expect_refused_closes(struct th_http_gate *g)
{
	static const char req[] = "PUT /admin/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
				  "Expect: 100-continue\r\n\r\n";
	bool closed;

	th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "HTTP/1.1 403", "403");
	ASSERT_FALSE(strstr(out, "100 Continue"), "no 100 for a refused request");
	ASSERT_HAS_SUBSTR(out, "Connection: close", "says it closes");
	ASSERT_TRUE(closed, "closed");
}

static void subtest_head_and_204(struct th_http_gate *g)
{
	static const char req[] = "HEAD /plain HTTP/1.1\r\nHost: x\r\n\r\n"
				  "GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\n"
				  "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	bool closed;
	char *a;

	ASSERT_GT(th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed), 0, "raw");
	a = strstr(out, "plain text body");
	ASSERT_TRUE(a && !strstr(a + 1, "plain text body"), "one body: HEAD's has none");
	ASSERT_HAS_SUBSTR(out, "HTTP/1.1 204", "204 passed");
	ASSERT_TRUE(closed, "closed after the last");
}

/* The agent's Authorization never reaches the server; the gateway's credential does. */
static void subtest_authorization_replaced(struct th_http_gate *g)
{
	char slog[512];
	int fd;
	ssize_t n;

	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/echo", "-H",
				    "Authorization: Bearer agent-secret-token", NULL),
		       "curl"))
		return;
	/* the echo of it comes back filled (http_scrub.c covers that in full) */
	ASSERT_HAS_SUBSTR(out, "\"authorization\":\"***************************\"",
			  "the gateway's credential, never shown to the agent");
	ASSERT_OK(th_http_srvlog(g, buf, sizeof(buf)), "server log");
	ASSERT_HAS_SUBSTR(buf, "GET /echo auth=Bearer gateway-minted-token\n",
			  "the gateway's credential reached the server");
	ASSERT_FALSE(strstr(buf, "agent-secret-token"), "the agent's token never arrived");
	snprintf(slog, sizeof(slog), "%s/sessions.log", g->d.state_dir);
	fd = open(slog, O_RDONLY | O_CLOEXEC);
	if (!ASSERT_GE(fd, 0, "sessions.log"))
		return;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	ASSERT_HAS_SUBSTR(buf, "\"what\":\"authorization_dropped\"", "noted in the session log");
	ASSERT_FALSE(strstr(buf, "agent-secret-token"), "the token is not logged");
}

static void subtest_gzip_json_masked(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/gzip", "-i", NULL), "curl"))
		return;
	ASSERT_FALSE(strstr(out, "alice@example.com"), "email masked");
	ASSERT_FALSE(strstr(out, "4111 1111"), "card masked by key");
	ASSERT_FALSE(strstr(out, "Content-Encoding: gzip"), "sent on as identity");
	ASSERT_HAS_SUBSTR(out, "Transfer-Encoding: chunked", "re-framed");
	ASSERT_HAS_SUBSTR(out, "\"name\":\"alice\"", "the rest as it was");
	ASSERT_HAS_SUBSTR(out, "[REDACTED", "redacted");
	/* and with curl asking for gzip itself */
	if (ASSERT_OK(th_http_curl(g, out, sizeof(out), "/gzip", "--compressed", NULL), "curl"))
		ASSERT_FALSE(strstr(out, "bob@example.org"), "email masked (--compressed)");
}

/* A JSON body in an encoding we cannot inflate: 502 in its place, nothing of it passed on. */
static void subtest_unmaskable_encoding_refused(struct th_http_gate *g)
{
	static const char req[] = "GET /brotli HTTP/1.1\r\nHost: x\r\n\r\n";
	bool closed;

	th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed);
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 502", 12), "502");
	ASSERT_HAS_SUBSTR(out, "cannot be masked", "says why");
	ASSERT_FALSE(strstr(out, "carol@"), "the body not passed on");
	ASSERT_TRUE(closed, "closed after it");
}

/* An HTTP/1.0 agent: a masked (re-framed) answer comes close-delimited, not chunked. */
static void subtest_http10_agent(struct th_http_gate *g)
{
	static const char req[] = "GET /gzip HTTP/1.0\r\n\r\n";
	bool closed;

	th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed);
	ASSERT_TRUE(!strncmp(out, "HTTP/1.", 7) && strstr(out, " 200 "), "200");
	ASSERT_FALSE(strstr(out, "Transfer-Encoding"), "no chunked framing to HTTP/1.0");
	ASSERT_HAS_SUBSTR(out, "\r\n\r\n{\"users\":", "the body follows the head as is");
	ASSERT_FALSE(strstr(out, "alice@example.com"), "masked");
	ASSERT_TRUE(closed, "ended by the close");
}

static void subtest_masked_counted(struct th_http_gate *g)
{
	static const char req[] = "GET /gzip HTTP/1.1\r\nHost: x\r\n\r\n";
	long long st = -1, bl = -1, mv = -1;
	bool closed;
	int fd = th_http_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	th_send_all(fd, req, sizeof(req) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "0\r\n\r\n", 15000, &closed);
	ASSERT_OK(th_daemon_counters(&g->d, -1, &st, &bl, &mv), "session list");
	ASSERT_EQ(st, 1, "one request");
	ASSERT_GE(mv, 3, "masked values counted");
	close(fd);
}

/*
 * approve: a PATCH with a body is held (nothing reaches the server) until an approver decides
 * from the CLI; then it goes on with its body whole.
 */
static void subtest_approve_holds_then_forwards_body(struct th_http_gate *g)
{
	static const char req[] = "PATCH /echo/patched HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
				  "Content-Length: 11\r\n\r\nhello=world";
	char id[32] = "";
	bool closed;
	int fd = th_http_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	ASSERT_OK(th_send_all(fd, req, sizeof(req) - 1, 5000), "send");
	th_http_wait_approval(g, "PATCH /echo/patched", id, sizeof(id));
	if (!ASSERT_TRUE(id[0], "held for approval")) {
		close(fd);
		return;
	}
	ASSERT_OK(th_http_srvlog(g, buf, sizeof(buf)), "server log");
	ASSERT_FALSE(strstr(buf, "/echo/patched"), "held requests do not reach the server");
	ASSERT_EQ(th_http_decide(g, "approve", id, NULL), 0, "agctl approval approve");
	th_http_read_until(fd, out, sizeof(out), NULL, 20000, &closed);
	close(fd);
	ASSERT_HAS_SUBSTR(out, "HTTP/1.1 200", "200 once approved");
	ASSERT_HAS_SUBSTR(out, "\"body_len\":11", "the body went on whole");
	ASSERT_HAS_SUBSTR(out, "\"method\":\"PATCH\"", "as a PATCH");
}

static int reloads_logged(struct th_http_gate *g)
{
	int n = 0;

	if (th_daemon_read_log(&g->d, buf, sizeof(buf)))
		return -1;
	for (const char *p = buf; (p = strstr(p, " reloaded (")); p++)
		n++;
	return n;
}

/* A reload reaches a live keep-alive session at its next request. */
static void subtest_policy_reload_live(struct th_http_gate *g)
{
	static const char req1[] = "GET /echo/before HTTP/1.1\r\nHost: x\r\n\r\n";
	static const char req2[] = "GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n";
	char *pol = strdup(g->policy), *p;
	int fd = th_http_connect(g), before = reloads_logged(g);
	bool closed;

	if (!ASSERT_GE(fd, 0, "connect") || !ASSERT_OK_PTR(pol, "policy"))
		goto out;
	th_send_all(fd, req1, sizeof(req1) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "0\r\n\r\n", 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "/echo/before", "allowed before");
	p = strstr(pol, "path: [\"/admin/*\"]");
	if (!ASSERT_OK_PTR(p, "rule to change"))
		goto out;
	memcpy(p, "path: [\"/echo/*\"] ", 18);
	if (!ASSERT_OK(th_daemon_write_policy(&g->d, pol), "write") ||
	    !ASSERT_OK(th_daemon_reload(&g->d), "reload"))
		goto out;
	for (int t = 0; t < 100 && reloads_logged(g) <= before; t++)
		usleep(50 * 1000);
	th_send_all(fd, req2, sizeof(req2) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "}\n", 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "HTTP/1.1 403", "refused after the reload, same connection");
	ASSERT_HAS_SUBSTR(out, "blocked by rule no-admin", "by the changed rule");
out:
	if (fd >= 0)
		close(fd);
	free(pol);
}

void test_http(void)
{
	static const char cred_fmt[] = "    credential: { provider: static, secret_file: %s }\n";
	struct th_http_gate g;
	char extra[512], secret[256];
	int fd;

	memset(&g, 0, sizeof(g));
	snprintf(secret, sizeof(secret), "/tmp/agentgate-http-cred-%d", getpid());
	fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, "token=gateway-minted-token\n", 27) != 27) {
		test__skip("cannot write the credential file");
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	snprintf(extra, sizeof(extra), cred_fmt, secret);
	if (!ASSERT_OK(th_http_gate_start(&g, "127.0.0.61", false, extra, HTTP_RULES), "gate"))
		goto out;
	/* Non-root agctl (the approver) reaches the socket in the daemon's temp dir. */
	chmod(g.d.dir, 0711);
	if (test__start_subtest("get_allowed"))
		subtest_get_allowed(&g);
	if (test__start_subtest("denied_403_json"))
		subtest_denied_403_json(&g);
	if (test__start_subtest("default_deny"))
		subtest_default_deny(&g);
	if (test__start_subtest("keepalive_after_deny"))
		subtest_keepalive_after_deny(&g);
	if (test__start_subtest("pipelined_in_order"))
		subtest_pipelined_in_order(&g);
	if (test__start_subtest("pipeline_deeper_than_queue"))
		subtest_pipeline_deeper_than_queue(&g);
	if (test__start_subtest("half_close_after_requests"))
		subtest_half_close_after_requests(&g);
	if (test__start_subtest("chunked_request_body"))
		subtest_chunked_request_body(&g);
	if (test__start_subtest("expect_100_continue"))
		subtest_expect_100_continue(&g);
	if (test__start_subtest("expect_refused_closes"))
		subtest_expect_refused_closes(&g);
	if (test__start_subtest("head_and_204_without_body"))
		subtest_head_and_204(&g);
	if (test__start_subtest("authorization_replaced"))
		subtest_authorization_replaced(&g);
	if (test__start_subtest("gzip_json_masked"))
		subtest_gzip_json_masked(&g);
	if (test__start_subtest("unmaskable_encoding_refused"))
		subtest_unmaskable_encoding_refused(&g);
	if (test__start_subtest("http10_agent_close_delimited"))
		subtest_http10_agent(&g);
	if (test__start_subtest("masked_values_counted"))
		subtest_masked_counted(&g);
	if (test__start_subtest("approve_holds_then_forwards_body"))
		subtest_approve_holds_then_forwards_body(&g);
	ASSERT_TRUE(th_http_alive(&g), "daemon alive at the end");
	if (test__start_subtest("policy_reload_reaches_live_session"))
		subtest_policy_reload_live(&g);
out:
	th_http_gate_cleanup(&g);
	unlink(secret);
}

/* Streamed JSON masking on its own: byte-at-a-time input, key paths, Secrets, many values. */
static int jm_run(const struct ag_jmask_opts *o, const char *in, size_t step, char *res,
		  size_t reslen)
{
	struct ag_jmask *j = ag_jmask_new(o);
	struct ag_buf b = { 0 };
	size_t len = strlen(in);
	int n = 0, rc;

	if (!j)
		return -ENOMEM;
	for (size_t off = 0; off < len; off += step) {
		rc = ag_jmask_feed(j, (const uint8_t *)in + off,
				   off + step > len ? len - off : step, &b);
		if (rc < 0) {
			n = rc;
			goto out;
		}
		n += rc;
	}
	rc = ag_jmask_finish(j, &b);
	n = rc < 0 ? rc : n + rc;
out:
	snprintf(res, reslen, "%.*s", (int)ag_buf_len(&b), b.data ? (char *)ag_buf_head(&b) : "");
	ag_buf_free(&b);
	ag_jmask_free(j);
	return n;
}

void test_http_jsonmask(void)
{
	static char keys0[] = "ssn", keys1[] = "spec.*.token";
	static char *keys[] = { keys0, keys1 };
	static char det_email[] = "email";
	static char *dets[] = { det_email };
	static char any[] = "*";
	static char *anyl[] = { any };
	struct ag_kv kv[2] = {
		{ .key = "columns", .list = anyl, .nlist = 1, .kind = AG_KV_LIST },
		{ .key = "detectors", .list = dets, .nlist = 1, .kind = AG_KV_LIST },
	};
	struct ag_masker *m = ag_masker_new(kv, 2, NULL, 0);
	struct ag_jmask_opts o = { .m = m, .keys = keys, .nkeys = 2 };
	char res[4096];
	int n;

	if (!ASSERT_OK_PTR(m, "masker"))
		return;
	n = jm_run(&o,
		   "{\"a\": {\"ssn\": \"078-05-1120\", \"n\": 1.50e3}, \"spec\": {\"x\": "
		   "{\"token\": \"t0k\"}, \"token\": \"keep\"}, \"note\": \"mail bob@example.org\","
		   " \"list\": [true, null, \"x\"]}",
		   1, res, sizeof(res));
	ASSERT_EQ(n, 3, "three values masked");
	ASSERT_STREQ(res,
		     "{\"a\":{\"ssn\":\"[REDACTED]\",\"n\":1.50e3},\"spec\":{\"x\":{\"token\":"
		     "\"[REDACTED]\"},\"token\":\"keep\"},\"note\":\"mail [REDACTED:email]\","
		     "\"list\":[true,null,\"x\"]}\n",
		     "byte by byte, numbers kept as written");
	/* Secrets: kind marks the object; a SecretList's items; watch events one per line */
	o = (struct ag_jmask_opts){ .m = m, .secrets = true, .secret_objects = true };
	n = jm_run(
		&o,
		"{\"type\":\"ADDED\",\"object\":{\"kind\":\"Secret\",\"data\":{\"k\":\"djE=\"}}}\n"
		"{\"type\":\"DELETED\",\"object\":{\"metadata\":{\"name\":\"s\"},"
		"\"stringData\":{\"k\":\"v2\"}}}\n",
		7, res, sizeof(res));
	ASSERT_EQ(n, 2, "two secret values");
	ASSERT_STREQ(res,
		     "{\"type\":\"ADDED\",\"object\":{\"kind\":\"Secret\",\"data\":{\"k\":"
		     "\"[REDACTED]\"}}}\n{\"type\":\"DELETED\",\"object\":{\"metadata\":"
		     "{\"name\":\"s\"},\"stringData\":{\"k\":\"[REDACTED]\"}}}\n",
		     "watch events, each on its line");
	n = jm_run(&o, "{\"kind\":\"SecretList\",\"items\":[{\"data\":{\"a\":\"eA==\"}}]}", 3, res,
		   sizeof(res));
	ASSERT_EQ(n, 1, "list item masked");
	ASSERT_HAS_SUBSTR(res, "\"data\":{\"a\":\"[REDACTED]\"}", "items[*].data");
	/*
	 * The output is written as yajl's generator writes it: compact, the same string escapes
	 * (controls as \u00XX, a solidus as it is), arrays' and maps' separators, empty ones,
	 * several top-level values each on its line; fed byte by byte and in one piece alike.
	 */
	o = (struct ag_jmask_opts){ .m = m, .keys = keys, .nkeys = 2 };
	for (size_t step = 1; step <= 4096; step *= 4096) {
		n = jm_run(&o,
			   "{\"e\":\"q\\\"b\\\\s\\/c\\u0001\\u001f\\t\\n\\r\\b\\f\\u00e9 \x7f\","
			   "\"x\":[],\"y\":{},\"z\":[[1,{}],\"a\",-0.5e-3,true,false,null],"
			   "\"ssn\":{\"a\":[1,\"x\",{\"b\":true}]},\"n\":\"to bob@example.org\"}"
			   " 42 \"s\" [1,2]\n",
			   step, res, sizeof(res));
		ASSERT_EQ(n, 4, "masked: three under ssn, one e-mail");
		ASSERT_STREQ(res,
			     "{\"e\":\"q\\\"b\\\\s/c\\u0001\\u001F\\t\\n\\r\\b\\f\xc3\xa9 \x7f\","
			     "\"x\":[],\"y\":{},\"z\":[[1,{}],\"a\",-0.5e-3,true,false,null],"
			     "\"ssn\":{\"a\":[null,\"[REDACTED]\",{\"b\":null}]},"
			     "\"n\":\"to [REDACTED:email]\"}\n42\n\"s\"\n[1,2]\n",
			     "escapes, separators, top-level values as yajl_gen writes them");
	}
	/* not JSON: refused, never passed on as it is */
	n = jm_run(&o, "{\"data\": {\"a\": \"x\"} garbage", 4, res, sizeof(res));
	ASSERT_EQ(n, -EPROTO, "invalid JSON is an error");
	ASSERT_FALSE(strstr(res, "garbage"), "the bad part not emitted");
	ag_masker_free(m);
}

/* An agent in observe mode: every request decided and logged, none refused. */
void test_http_observe_mode(void)
{
	static const char req[] = "GET /admin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
	static const char bad[] = "GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
				  "Content-Length: 2\r\n\r\nab";
	struct th_http_gate g;
	bool closed;

	if (!ASSERT_OK(
		    th_http_gate_start_mode(&g, "127.0.0.64", false, NULL, HTTP_RULES, "observe"),
		    "gate"))
		goto out;
	th_http_raw(&g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed);
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 404", 12),
		    "passed to the server (which has no /admin)");
	ASSERT_OK(th_daemon_read_log(&g.d, buf, sizeof(buf)), "daemon log");
	ASSERT_HAS_SUBSTR(buf, "observe mode, would refuse GET /admin/x", "the refusal logged");
	/* malformed input is still refused: it cannot be decided at all */
	th_http_raw(&g, bad, sizeof(bad) - 1, out, sizeof(out), 15000, &closed);
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 400", 12), "400 even in observe mode");
out:
	th_http_gate_cleanup(&g);
}
