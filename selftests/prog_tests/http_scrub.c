// SPDX-License-Identifier: GPL-2.0
/*
 * The gateway's own credential never comes back to the agent (issues 4 and 6): an upstream that
 * reflects the Authorization header it got (JSON, text/plain with Content-Length, a response
 * header, gzip, chunked with the value cut across chunks written apart, close-delimited, and
 * after an exec upgrade in two writes) is answered to the agent with the value replaced by '*'
 * of the same length. For a static token and for a JWT: the raw response never holds the token,
 * the framing stays valid (curl reads it, Content-Length matches the body), the occurrences are
 * counted in the session's masked_values and noted in the session log, and `agctl audit export`
 * never holds the token either. In process: the scrubber fed in pieces of every size.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "scrub.h"
#include "../http.h"
#include "../test_progs.h"

#define SCRUB_RULES                                                                                \
	"    http:\n"                                                                              \
	"      - { name: exec, when: { method: [GET], upgrade: true }, then: allow }\n"            \
	"      - { name: reads, when: { method: [GET, HEAD] }, then: allow }\n"                    \
	"    mask:\n"                                                                              \
	"      detectors: [email]\n"                                                               \
	"      style: redact\n"

#define STATIC_TOKEN "gw-static-token-4d1c9e77b0"

static char out[256 * 1024], buf[1 << 20];

struct scrub_env {
	struct th_http_gate g;
	char tok[4096];	   /* the token the gateway sent upstream (from the server's log) */
	char stars[4200];  /* '*' as long as "Bearer <token>" */
	char dir[64];
};

/* The last bearer token the API server got (its request log). */
static int token_seen(struct scrub_env *e)
{
	static char slog[1 << 20];
	char *p, *end, *last = NULL;

	if (th_http_srvlog(&e->g, slog, sizeof(slog)))
		return -EIO;
	for (p = slog; (p = strstr(p, "auth=Bearer ")); p++)
		last = p + 12;
	if (!last)
		return -ENOENT;
	end = strchr(last, '\n');
	if (!end || end - last >= (long)sizeof(e->tok) || end - last < 8)
		return -EINVAL;
	memcpy(e->tok, last, end - last);
	e->tok[end - last] = '\0';
	memset(e->stars, '*', 7 + (end - last));
	e->stars[7 + (end - last)] = '\0';
	return 0;
}

/* No bearer token the API server ever got (its log) is in resp; the last one is learnt. */
static bool clean(struct scrub_env *e, const char *resp, size_t n)
{
	static char log[1 << 20];
	bool ok = true;
	char *p, *end;

	if (token_seen(e) || th_http_srvlog(&e->g, log, sizeof(log)))
		return false;
	for (p = log; (p = strstr(p, "auth=Bearer ")); p = end) {
		p += 12;
		end = strchr(p, '\n');
		if (!end)
			break;
		if (memmem(resp, n, p, end - p)) {
			printf("a token the server got (%.8s...) is in the response\n", p);
			ok = false;
		}
	}
	return ok;
}

static ssize_t raw_get(struct scrub_env *e, const char *path, const char *extra_hdr)
{
	char req[512];
	bool closed;

	snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n", path,
		 extra_hdr ? extra_hdr : "");
	return th_http_raw(&e->g, req, strlen(req), out, sizeof(out), 15000, &closed);
}

/* The first request: learns the token; JSON echo (through the JSON masker) is clean. */
static void subtest_json_echo(struct scrub_env *e)
{
	if (!ASSERT_OK(th_http_curl(&e->g, out, sizeof(out), "/echo", "-i", NULL), "curl"))
		return;
	if (!ASSERT_OK(token_seen(e), "the server got a bearer token"))
		return;
	ASSERT_TRUE(clean(e, out, strlen(out)), "the JSON echo holds no token");
	ASSERT_HAS_SUBSTR(out, "\"authorization\":\"", "the field is there");
	ASSERT_FALSE(strstr(out, "\"authorization\":\"Bearer "), "its value is not");
}

/* text/plain, Content-Length passed on: the count still matches the body. */
static void subtest_plain_content_length(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/echo-plain", NULL);
	const char *cl, *body;

	if (!ASSERT_GT(n, 0, "response") || !e->tok[0])
		return;
	ASSERT_TRUE(clean(e, out, n), "no token in the raw response");
	cl = strcasestr(out, "\r\nContent-Length: ");
	body = strstr(out, "\r\n\r\n");
	if (ASSERT_TRUE(cl && body, "Content-Length and a body"))
		ASSERT_EQ(atol(cl + 18), (long)(out + n - body - 4), "Content-Length matches");
	ASSERT_HAS_SUBSTR(out, e->stars, "same-length filler");
	if (ASSERT_OK(th_http_curl(&e->g, out, sizeof(out), "/echo-plain", NULL), "curl reads it"))
		ASSERT_TRUE(clean(e, out, strlen(out)), "no token through curl");
}

static void subtest_header_echo(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/echo-header", NULL);
	char want[4300];

	if (!ASSERT_GT(n, 0, "response") || !e->tok[0])
		return;
	ASSERT_TRUE(clean(e, out, n), "no token in the response head");
	snprintf(want, sizeof(want), "X-Echo-Authorization: %s\r\n", e->stars);
	ASSERT_HAS_SUBSTR(out, want, "the header kept, its value filled");
	ASSERT_OK(th_http_curl(&e->g, out, sizeof(out), "/echo-header", "-i", NULL), "curl reads it");
}

static void subtest_gzip_echo(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/echo-gzip", "Accept-Encoding: gzip\r\n");

	if (!ASSERT_GT(n, 0, "response") || !e->tok[0])
		return;
	ASSERT_TRUE(clean(e, out, n), "no token in the raw response");
	ASSERT_FALSE(strcasestr(out, "Content-Encoding: gzip"), "inflated: sent on as identity");
	ASSERT_HAS_SUBSTR(out, e->stars, "filled in the inflated body");
	if (ASSERT_OK(th_http_curl(&e->g, out, sizeof(out), "/echo-gzip", "--compressed", NULL),
		      "curl --compressed reads it"))
		ASSERT_TRUE(clean(e, out, strlen(out)) && strstr(out, e->stars), "clean, filled");
}

/* The value cut across 7-byte chunks written apart: caught whole, chunked framing valid. */
static void subtest_chunked_split(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/echo-chunked", NULL);
	char want[4400];

	if (!ASSERT_GT(n, 0, "response") || !e->tok[0])
		return;
	ASSERT_TRUE(clean(e, out, n), "no token in the raw response");
	ASSERT_HAS_SUBSTR(out, "Transfer-Encoding: chunked", "chunked");
	if (!ASSERT_OK(th_http_curl(&e->g, out, sizeof(out), "/echo-chunked", NULL),
		       "curl reads it"))
		return;
	ASSERT_TRUE(clean(e, out, strlen(out)), "no token through curl");
	snprintf(want, sizeof(want), "you sent Authorization: %s\nagain: %s\n", e->stars, e->stars);
	ASSERT_STREQ(out, want, "the whole body, both occurrences filled");
}

static void subtest_close_delimited(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/echo-close", NULL);
	char want[4400];

	if (!ASSERT_GT(n, 0, "response") || !e->tok[0])
		return;
	ASSERT_TRUE(clean(e, out, n), "no token in the raw response");
	snprintf(want, sizeof(want), "\r\n\r\nyou sent Authorization: %s\nagain: %s\n", e->stars,
		 e->stars);
	ASSERT_HAS_SUBSTR(out, want, "the body to the close, filled");
}

/* After an allowed 101, the upstream's answer (in two writes) is scrubbed too. */
static void subtest_upgrade_tunnel(struct scrub_env *e)
{
	static const char req[] =
		"GET /api/v1/namespaces/default/pods/web-1/exec?command=sh HTTP/1.1\r\n"
		"Host: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n";
	char want[4300];
	bool closed;
	int fd = th_http_connect(&e->g);

	if (!ASSERT_GE(fd, 0, "connect") || !e->tok[0]) {
		if (fd >= 0)
			close(fd);
		return;
	}
	th_send_all(fd, req, sizeof(req) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "\r\n\r\n", 15000, &closed);
	if (!ASSERT_TRUE(!strncmp(out, "HTTP/1.1 101", 12), "101") || test__verbose())
		printf("upgrade answer: %.300s\n", out);
	if (strncmp(out, "HTTP/1.1 101", 12)) {
		close(fd);
		return;
	}
	token_seen(e);
	th_send_all(fd, "whoami\n", 7, 5000);
	/* a relay holds back only what may begin the token: "Bearer " may go out before it */
	snprintf(want, sizeof(want), "%s\n", e->stars + 7);
	th_http_read_until(fd, out, sizeof(out), want, 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "you are ", "the answer's start");
	ASSERT_TRUE(clean(e, out, strlen(out)), "no token through the tunnel");
	ASSERT_HAS_SUBSTR(out, want, "filled, nothing lost");
	close(fd);
}

/* On one live session: both occurrences counted in masked_values. */
static void subtest_masked_counted(struct scrub_env *e)
{
	static const char req[] = "GET /echo-plain HTTP/1.1\r\nHost: x\r\n\r\n";
	long long st = -1, bl = -1, mv = -1;
	char want[4300];
	bool closed;
	int fd = th_http_connect(&e->g);

	if (!ASSERT_GE(fd, 0, "connect") || !e->tok[0]) {
		if (fd >= 0)
			close(fd);
		return;
	}
	th_send_all(fd, req, sizeof(req) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "again: ", 15000, &closed);
	token_seen(e); /* the server logged the request before it answered */
	snprintf(want, sizeof(want), "again: %s\n", e->stars);
	if (!strstr(out, want))
		th_http_read_until(fd, out + strlen(out), sizeof(out) - strlen(out), "*\n", 15000,
				   &closed);
	ASSERT_HAS_SUBSTR(out, want, "the whole body, filled");
	ASSERT_OK(th_daemon_counters(&e->g.d, -1, &st, &bl, &mv), "session list");
	ASSERT_EQ(mv, 2, "both occurrences counted");
	close(fd);
}

static void subtest_session_log_noted(struct scrub_env *e)
{
	char path[256];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/sessions.log", e->g.d.state_dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (!ASSERT_GE(fd, 0, "sessions.log"))
		return;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	ASSERT_HAS_SUBSTR(buf, "\"what\":\"credential_reflected\"", "noted");
	ASSERT_TRUE(!e->tok[0] || clean(e, buf, strlen(buf)), "the value is not logged");
}

static void subtest_audit_export_clean(struct scrub_env *e)
{
	char cmd[1024], path[256];
	size_t n = 0;
	FILE *f;
	int rc;

	snprintf(path, sizeof(path), "%s/export.jsonl", e->g.d.dir);
	snprintf(cmd, sizeof(cmd), "'%s/agctl' audit export '%s/audit' > '%s'", th_build_dir(),
		 e->g.d.state_dir, path);
	rc = system(cmd);
	if (!ASSERT_TRUE(WIFEXITED(rc) && !WEXITSTATUS(rc), "agctl audit export"))
		return;
	f = fopen(path, "r");
	if (f) {
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	ASSERT_HAS_SUBSTR(buf, "/echo-plain", "the requests are recorded");
	ASSERT_TRUE(e->tok[0] && clean(e, buf, n), "the token is nowhere in the audit log");
}

#define HOP_HEADERS                                                                                \
	"TE: gzip\r\nRange: bytes=0-5\r\nIf-Range: x\r\n"                                         \
	"Sec-WebSocket-Extensions: permessage-deflate\r\n"

/* The body of /echo-header-names has the line name (a header the server got). */
static bool got_header(const char *resp, const char *name)
{
	const char *body = strstr(resp, "\r\n\r\n");
	size_t l = strlen(name);

	if (!body)
		return false;
	for (const char *p = body + 4; *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : "")
		if (!strncmp(p, name, l) && p[l] == '\n')
			return true;
	return false;
}

/* With our credential upstream: no transfer coding, byte range or WebSocket compression asked. */
static void subtest_hop_headers_stripped(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/echo-header-names", HOP_HEADERS);

	if (!ASSERT_GT(n, 0, "response"))
		return;
	if (test__verbose())
		printf("headers the server got: %s\n", out);
	if (!ASSERT_TRUE(!strncmp(out, "HTTP/1.1 200", 12) && got_header(out, "authorization"),
			 "200, the server got our credential"))
		return;
	ASSERT_FALSE(got_header(out, "te"), "no TE");
	ASSERT_FALSE(got_header(out, "range"), "no Range");
	ASSERT_FALSE(got_header(out, "if-range"), "no If-Range");
	ASSERT_FALSE(got_header(out, "sec-websocket-extensions"), "no Sec-WebSocket-Extensions");
}

/* Transfer-Encoding: gzip, chunked: a 502, not the gzipped bytes; the daemon serves on. */
static void subtest_transfer_coding_refused(struct scrub_env *e)
{
	ssize_t n = raw_get(e, "/te-gzip-chunked", NULL);

	if (!ASSERT_GT(n, 0, "response"))
		return;
	if (!ASSERT_TRUE(!strncmp(out, "HTTP/1.1 502", 12), "502") || test__verbose())
		printf("answer: %.300s\n", out);
	ASSERT_FALSE(memmem(out, n, "\x1f\x8b", 2), "no gzip bytes");
	ASSERT_FALSE(strcasestr(out, "Transfer-Encoding: gzip"), "the coding is not passed on");
	ASSERT_TRUE(th_http_alive(&e->g), "the daemon is up, a next request answered");
}

static void run(struct scrub_env *e, const char *kind)
{
	static const struct {
		const char *name;
		void (*fn)(struct scrub_env *e);
	} subs[] = {
		{ "json_echo", subtest_json_echo },
		{ "plain_content_length_valid", subtest_plain_content_length },
		{ "response_header_echo", subtest_header_echo },
		{ "gzip_echo_inflated", subtest_gzip_echo },
		{ "chunked_token_split_across_chunks", subtest_chunked_split },
		{ "close_delimited", subtest_close_delimited },
		{ "upgrade_tunnel", subtest_upgrade_tunnel },
		{ "masked_values_counted", subtest_masked_counted },
		{ "session_log_noted", subtest_session_log_noted },
		{ "audit_export_clean", subtest_audit_export_clean },
		{ "hop_headers_stripped_with_credential", subtest_hop_headers_stripped },
		{ "response_transfer_coding_refused", subtest_transfer_coding_refused },
	};
	char name[128];

	for (size_t i = 0; i < sizeof(subs) / sizeof(subs[0]); i++) {
		snprintf(name, sizeof(name), "%s_%s", kind, subs[i].name);
		if (test__start_subtest(name))
			subs[i].fn(e);
	}
	test__end_subtest();
}

static void cat_emit(void *ctx, const void *p, size_t n)
{
	ag_buf_append(ctx, p, n);
}

/*
 * In process: a text holding the token (bare, with "Bearer ", JSON-escaped, at both ends) fed in
 * pieces of every size from 1 byte up comes out filled, of the same length, with every
 * occurrence counted; what is held back never exceeds the longest pattern minus one; a renewed
 * token is scrubbed along with the one before it.
 */
static void subtest_scrubber_every_split(void)
{
	static const char tok[] = "ab/cd\"ef-0123456789";
	char in[512], want[512];
	size_t n;
	bool ok = true;

	n = snprintf(in, sizeof(in), "%sx Authorization: Bearer %s\n{\"t\":\"ab\\/cd\\\"ef-0123456789\"}"
		     " ab/cd\"ef-012345678 %s", tok, tok, tok);
	memcpy(want, in, n + 1);
	/* what must come out: every occurrence filled */
	for (char *p = want; (p = strstr(p, "Bearer ab/cd")); p += 7)
		memset(p, '*', 7);
	for (char *p = want; (p = strstr(p, tok)); )
		memset(p, '*', strlen(tok));
	for (char *p = want; (p = strstr(p, "ab\\/cd\\\"ef-0123456789")); )
		memset(p, '*', strlen("ab\\/cd\\\"ef-0123456789"));
	for (size_t piece = 1; piece <= n && ok; piece++) {
		struct ag_scrub sc = { 0 };
		struct ag_buf o = { 0 };

		ag_scrub_set(&sc, "Bearer ab/cd\"ef-0123456789");
		for (size_t off = 0; off < n; off += piece) {
			ag_scrub_feed(&sc, in + off, off + piece > n ? n - off : piece, cat_emit, &o);
			if (ag_buf_len(&sc.work) >= sc.maxlen) {
				printf("held %zu bytes, more than %zu - 1\n", ag_buf_len(&sc.work),
				       sc.maxlen);
				ok = false;
			}
		}
		ag_scrub_flush(&sc, cat_emit, &o);
		if (ag_buf_len(&o) != n || memcmp(ag_buf_head(&o), want, n) ||
		    ag_scrub_take_hits(&sc) != 4) {
			printf("pieces of %zu: '%.*s'\n", piece, (int)ag_buf_len(&o),
			       (const char *)ag_buf_head(&o));
			ok = false;
		}
		ag_buf_free(&o);
		ag_scrub_free(&sc);
	}
	ASSERT_TRUE(ok, "every split: same length, all filled, 4 counted");

	/* a renewed token: the old one is still scrubbed, the one before it forgotten */
	{
		struct ag_scrub sc = { 0 };
		char t[] = "old-token-111 new-token-222 third-token-3";

		ag_scrub_set(&sc, "Bearer old-token-111");
		ag_scrub_set(&sc, "Bearer new-token-222");
		ASSERT_EQ(ag_scrub_buf(&sc, t, strlen(t)), 2, "the current and the one before");
		ASSERT_STREQ(t, "************* ************* third-token-3", "both filled");
		ag_scrub_set(&sc, "Bearer third-token-3");
		strcpy(t, "old-token-111 new-token-222 third-token-3");
		ASSERT_EQ(ag_scrub_buf(&sc, t, strlen(t)), 2, "the oldest forgotten");
		ag_scrub_free(&sc);
	}
}

static int sh(const char *cmd)
{
	int rc = system(cmd);

	return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

void test_http_scrub(void)
{
	static struct scrub_env e;
	char extra[1024], cmd[512];
	int fd;

	if (test__start_subtest("scrubber_every_split"))
		subtest_scrubber_every_split();
	test__end_subtest();
	memset(&e, 0, sizeof(e));
	snprintf(e.dir, sizeof(e.dir), "/tmp/agentgate-scrub-XXXXXX");
	if (!mkdtemp(e.dir)) {
		test__skip("mkdtemp");
		return;
	}
	chmod(e.dir, 0755);

	/* a static token */
	snprintf(cmd, sizeof(cmd), "%s/static", e.dir);
	fd = open(cmd, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, "token=" STATIC_TOKEN "\n", 33) != 33) {
		if (fd >= 0)
			close(fd);
		test__skip("cannot write the credential file");
		goto out;
	}
	close(fd);
	snprintf(extra, sizeof(extra), "    credential: { provider: static, secret_file: %s }\n",
		 cmd);
	if (ASSERT_OK(th_http_gate_start(&e.g, "127.0.0.81", false, extra, SCRUB_RULES),
		      "gate (static)")) {
		run(&e, "static");
		ASSERT_STREQ(e.tok, STATIC_TOKEN, "the static token was the one sent");
	}
	test__end_subtest();
	th_http_gate_cleanup(&e.g);

	/* a JWT the gateway mints */
	memset(&e.g, 0, sizeof(e.g));
	memset(e.tok, 0, sizeof(e.tok));
	snprintf(cmd, sizeof(cmd),
		 "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s/jwt.key "
		 ">/dev/null 2>&1 && chmod 0600 %s/jwt.key",
		 e.dir, e.dir);
	if (!ASSERT_OK(sh(cmd), "openssl genpkey"))
		goto out;
	snprintf(extra, sizeof(extra),
		 "    credential: { provider: jwt, key_file: %s/jwt.key, audience: kube, ttl: 10m }\n",
		 e.dir);
	if (ASSERT_OK(th_http_gate_start(&e.g, "127.0.0.82", false, extra, SCRUB_RULES),
		      "gate (jwt)")) {
		run(&e, "jwt");
		ASSERT_TRUE(!strncmp(e.tok, "eyJ", 3), "the token was a JWT");
	}
	test__end_subtest();
	th_http_gate_cleanup(&e.g);

	/* no credential: the agent's Range goes up as sent */
	if (test__start_subtest("hop_headers_forwarded_without_credential")) {
		if (ASSERT_OK(th_http_gate_start(&e.g, "127.0.0.83", false, NULL, SCRUB_RULES),
			      "gate (no credential)")) {
			ssize_t n = raw_get(&e, "/echo-header-names", HOP_HEADERS);

			if (ASSERT_GT(n, 0, "response") &&
			    ASSERT_TRUE(!strncmp(out, "HTTP/1.1 200", 12), "200"))
				ASSERT_TRUE(got_header(out, "range"), "Range arrives");
		}
		th_http_gate_cleanup(&e.g);
	}
	test__end_subtest();
out:
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e.dir);
	sh(cmd);
}
