// SPDX-License-Identifier: GPL-2.0
/*
 * The audit log covers HTTP: through a Kubernetes target one agent connection reads a secret
 * (allowed, data masked) and asks for an exec (refused, 403). `agctl session replay` shows both
 * requests in order with their decisions, rules and Kubernetes attributes, the 403's message,
 * the status codes and the masked body the agent got; `-j` and `audit export` carry the body
 * whole. Neither the secret's values, the agent's token nor the gateway's credential appear in
 * the exported (decompressed) log, and `audit verify` passes. A Kubernetes watch is recorded
 * as streamed (masked) when it ends, and `agctl session watch` follows an HTTP session live.
 * In process: a body past 64 KiB keeps its first 64 KiB, flagged as cut, with its whole length.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <openssl/sha.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "audit.h"
#include "audit.pb-c.h"
#include "httprule.h"
#include "session.h"
#include "../http.h"
#include "../test_progs.h"

#define AH_RULES                                                                                   \
	"    http:\n"                                                                              \
	"      - { name: no-exec, when: { kubernetes: { subresource: [exec] } }, then: deny }\n"   \
	"      - { name: secrets-read, when: { kubernetes: { verb: [get, list, watch],"            \
	" resource: [secrets] } }, then: allow }\n"

#define AGENT_TOKEN "agent-own-token-5150"
#define GATE_TOKEN "gateway-audit-token-77"

static char out[256 * 1024], exp_buf[1 << 20];

/* base64 of hunter2-secret-pw and admin-user-name, and the stringData value */
static const char *const secret_values[] = { "aHVudGVyMi1zZWNyZXQtcHc", "YWRtaW4tdXNlci1uYW1l",
					     "plain-token-value-123", "hunter2-secret-pw",
					     AGENT_TOKEN, GATE_TOKEN };

/* agctl audit export of the daemon's log (decompressed JSON lines) into exp_buf. */
static int export(struct th_http_gate *g)
{
	char cmd[1024], path[256];
	FILE *f;
	size_t n;
	int rc;

	snprintf(path, sizeof(path), "%s/export.jsonl", g->d.dir);
	snprintf(cmd, sizeof(cmd), "'%s/agctl' audit export '%s/audit' > '%s'", th_build_dir(),
		 g->d.state_dir, path);
	rc = system(cmd);
	rc = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
	exp_buf[0] = '\0';
	f = fopen(path, "r");
	if (!f)
		return -1;
	n = fread(exp_buf, 1, sizeof(exp_buf) - 1, f);
	exp_buf[n] = '\0';
	fclose(f);
	return rc;
}

/* The session id of the export line holding marker, or 0. */
static unsigned long long session_of(const char *marker)
{
	const char *p = strstr(exp_buf, marker), *line, *s;

	if (!p)
		return 0;
	for (line = p; line > exp_buf && line[-1] != '\n'; line--)
		;
	s = strstr(line, "\"session\":");
	return s && s < p ? strtoull(s + 10, NULL, 10) : 0;
}

static unsigned long long sid;

static void subtest_requests_recorded(struct th_http_gate *g)
{
	char url2[256];

	snprintf(url2, sizeof(url2), "http://%s:%d/api/v1/namespaces/default/secrets/db-pass",
		 g->addr, g->port);
	/* one connection: the secret, then the exec (curl reuses it for the second URL) */
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/api/v1/namespaces/default/pods/web/exec",
				    "-H", "Authorization: Bearer " AGENT_TOKEN, url2, NULL),
		       "curl"))
		return;
	ASSERT_HAS_SUBSTR(out, "\"name\":\"db-pass\"", "the secret came back");
	ASSERT_FALSE(strstr(out, "aHVudGVyMi1zZWNyZXQtcHc"), "masked for the agent");
	ASSERT_HAS_SUBSTR(out, "blocked by rule no-exec", "the exec refused");
	for (int i = 0; i < 50; i++) {
		/* the writer thread writes in batches: wait until the session's end is there */
		if (!export(g) && (sid = session_of("\"text\":\"GET /api/v1/namespaces/default/"
						    "secrets/db-pass\"")) &&
		    strstr(exp_buf, "\"kind\":\"session_end\""))
			break;
		usleep(100000);
	}
	ASSERT_GT(sid, 0, "the request is in the log");
}

static void subtest_replay_shows_requests(struct th_http_gate *g)
{
	const char *a, *b, *ra, *rb;

	if (!ASSERT_GT(sid, 0, "session"))
		return;
	if (!ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "session replay %llu", sid), "replay"))
		return;
	a = strstr(out, "request   allow (rule secrets-read): GET "
			"/api/v1/namespaces/default/secrets/db-pass");
	b = strstr(out, "request   deny (rule no-exec): GET /api/v1/namespaces/default/pods/web/exec");
	ra = strstr(out, "result    HTTP 200");
	rb = strstr(out, "result    HTTP 403");
	if (!ASSERT_OK_PTR(a, "the allowed request") || !ASSERT_OK_PTR(b, "the denied request") ||
	    !ASSERT_OK_PTR(ra, "its 200") || !ASSERT_OK_PTR(rb, "the 403")) {
		printf("%s\n", out);
		return;
	}
	ASSERT_TRUE(a < ra && ra < b && b < rb, "request, answer, request, answer in order");
	ASSERT_HAS_SUBSTR(out, "verb=get version=v1 resource=secrets ns=default name=db-pass",
			  "the Kubernetes attributes");
	ASSERT_HAS_SUBSTR(out, "→ agentgate: blocked by rule no-exec", "the 403's reason");
	ASSERT_HAS_SUBSTR(ra, "\"name\":\"db-pass\"", "the body the agent got");
	ASSERT_HAS_SUBSTR(out, "\"kind\":\"Status\"", "the 403's Status body");
	if (ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "-j session replay %llu", sid),
		      "replay -j")) {
		ASSERT_HAS_SUBSTR(out, "\"http_status\":200", "-j status 200");
		ASSERT_HAS_SUBSTR(out, "\"http_status\":403", "-j status 403");
		ASSERT_HAS_SUBSTR(out, "\"decision\":\"deny\"", "-j deny");
		ASSERT_HAS_SUBSTR(out, "\"rule\":\"no-exec\"", "-j rule");
		ASSERT_HAS_SUBSTR(out, "\"body\":\"{", "-j the body as text");
	}
}

static void subtest_no_secret_in_log(struct th_http_gate *g)
{
	const char *p;
	unsigned long long masked;

	if (!ASSERT_OK(export(g), "export"))
		return;
	for (size_t i = 0; i < sizeof(secret_values) / sizeof(secret_values[0]); i++)
		if (!ASSERT_FALSE(strstr(exp_buf, secret_values[i]), "not in the log"))
			printf("%s is in the exported log\n", secret_values[i]);
	ASSERT_FALSE(strcasestr(exp_buf, "authorization"), "no Authorization header recorded");
	p = strstr(exp_buf, "\"http_status\":200");
	if (!ASSERT_OK_PTR(p, "the 200's result"))
		return;
	while (p > exp_buf && p[-1] != '\n')
		p--;
	p = strstr(p, "\"masked_values\":");
	masked = p ? strtoull(p + 16, NULL, 10) : 0;
	ASSERT_GT(masked, 0, "the result counts its masked values");
}

/* A watch: the events as streamed (masked) in one Result at the end of the response. */
static void subtest_watch_recorded(struct th_http_gate *g)
{
	unsigned long long wid = 0;
	const char *r;

	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out),
				    "/api/v1/namespaces/default/secrets?watch=true", NULL),
		       "curl watch"))
		return;
	ASSERT_HAS_SUBSTR(out, "\"type\":\"DELETED\"", "the whole stream came");
	for (int i = 0; i < 50 && !wid; i++) {
		if (!export(g))
			wid = session_of("\"text\":\"GET /api/v1/namespaces/default/secrets\"");
		if (!wid || !strstr(exp_buf, "\"type\\\":\\\"DELETED"))
			wid = 0;
		if (!wid)
			usleep(100000);
	}
	if (!ASSERT_GT(wid, 0, "the watch is in the log"))
		return;
	if (!ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "session replay %llu", wid), "replay"))
		return;
	ASSERT_HAS_SUBSTR(out, "verb=watch version=v1 resource=secrets ns=default", "a watch");
	r = strstr(out, "result    HTTP 200");
	if (!ASSERT_OK_PTR(r, "its result"))
		return;
	ASSERT_HAS_SUBSTR(r, "\"type\":\"ADDED\"", "the first event");
	ASSERT_HAS_SUBSTR(r, "\"type\":\"DELETED\"", "the last event");
	for (size_t i = 0; i < sizeof(secret_values) / sizeof(secret_values[0]); i++)
		ASSERT_FALSE(strstr(out, secret_values[i]), "masked in the recorded stream");
}

/* agctl session watch follows an HTTP session live: the request, its decision, the masked body. */
static void subtest_session_watch_live(struct th_http_gate *g)
{
	char path[256];
	bool seen = false;
	ssize_t n = 0;
	pid_t pid;

	snprintf(path, sizeof(path), "%s/watch-http.out", g->d.dir);
	pid = th_agctl_watch_start(&g->d, path);
	if (!ASSERT_GT(pid, 0, "agctl session watch"))
		return;
	ASSERT_OK(th_http_curl(g, out, sizeof(out), "/api/v1/namespaces/default/secrets/watched",
			       NULL),
		  "curl");
	for (int i = 0; i < 100 && !seen; i++) {
		int f = open(path, O_RDONLY | O_CLOEXEC);

		n = f >= 0 ? read(f, exp_buf, sizeof(exp_buf) - 1) : -1;
		if (f >= 0)
			close(f);
		exp_buf[n > 0 ? n : 0] = '\0';
		seen = strstr(exp_buf, "request   allow (rule secrets-read): GET "
				       "/api/v1/namespaces/default/secrets/watched") &&
		       strstr(exp_buf, "\"password\":\"[REDACTED]\"");
		if (!seen)
			usleep(100 * 1000);
	}
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	if (!ASSERT_TRUE(seen, "the request and its masked answer watched live"))
		printf("watch output:\n%s\n", exp_buf);
	ASSERT_HAS_SUBSTR(exp_buf, "result    HTTP 200", "the status");
	for (size_t i = 0; i < sizeof(secret_values) / sizeof(secret_values[0]); i++)
		ASSERT_FALSE(strstr(exp_buf, secret_values[i]), "masked in the watch");
}

static void subtest_verify(struct th_http_gate *g)
{
	char dir[256];
	struct th_agctl_result *r = calloc(1, sizeof(*r));

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	snprintf(dir, sizeof(dir), "%s/audit", g->d.state_dir);
	ASSERT_EQ(TH_AGCTL(r, "audit", "verify", dir), 0, "verify exit");
	free(r);
}

/* --- in process: the body cap ---------------------------------------------------------------- */

struct cap_ctx {
	int statements, results;
	bool start_first, capped, body_ok;
	uint64_t body_bytes;
	size_t body_len;
	char deny_reason[128];
	const uint8_t *fed;
	uint8_t sha[32]; /* of the whole body fed */
	bool sha_ok;
};

static int cap_cb(void *ctx, const struct ag_audit_entry *e)
{
	struct cap_ctx *c = ctx;
	Agentgate__Audit__Record *r = agentgate__audit__record__unpack(NULL, e->len, e->rec);

	if (!r)
		return -1;
	if (r->session == 77) {
		if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_SESSION_START)
			c->start_first = !c->statements;
		if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_STATEMENT) {
			c->statements++;
			if (!strcmp(r->statement->decision, "deny"))
				snprintf(c->deny_reason, sizeof(c->deny_reason), "%s",
					 r->statement->reason);
		}
		if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_RESULT &&
		    r->result->http_status == 200) {
			c->results++;
			c->capped = r->result->body_capped;
			c->body_bytes = r->result->body_bytes;
			c->body_len = r->result->body.len;
			c->body_ok = !memcmp(r->result->body.data, c->fed, r->result->body.len);
			c->sha_ok = r->result->body_sha256.len == 32 &&
				    !memcmp(r->result->body_sha256.data, c->sha, 32);
		}
	}
	agentgate__audit__record__free_unpacked(r, NULL);
	return 0;
}

/*
 * A 200 of 100 000 body bytes fed in pieces keeps its first audit.body_bytes (`keep`: NULL,
 * the default 256; else that value), says it was cut, how long it was and its SHA-256; a
 * refused request keeps the 403's message. Recorded by the hooks proto_http.c calls.
 */
static void subtest_body_capped(const char *keep, size_t want)
{
	struct ag_kv kv = { .key = "body_bytes", .value = (char *)keep };
	struct ag_audit_config cfg;
	struct ag_http_decision allow = { .action = AG_ACT_ALLOW, .rule = "reads" };
	struct ag_http_decision deny = { .action = AG_ACT_DENY, .rule = "no-admin" };
	struct cap_ctx c = { 0 };
	struct ag_session *s = calloc(1, sizeof(*s));
	uint8_t *body = malloc(100000);
	char dir[] = "/tmp/agentgate-audit-http.XXXXXX", adir[64], err[256];
	static const char local403[] = "HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\n{}";

	if (!ASSERT_OK_PTR(s, "alloc") || !ASSERT_OK_PTR(body, "alloc") ||
	    !ASSERT_OK_PTR(mkdtemp(dir), "temp dir"))
		goto out;
	for (size_t i = 0; i < 100000; i++)
		body[i] = 'a' + i % 26;
	if (!ASSERT_OK(ag_audit_config_parse(keep ? &kv : NULL, keep ? 1 : 0, &cfg, err,
					     sizeof(err)),
		       err))
		goto rm;
	SHA256(body, 100000, c.sha);
	if (!ASSERT_OK(ag_audit_open(dir, &cfg, err, sizeof(err)), err))
		goto rm;
	s->id = 77;
	snprintf(s->protocol, sizeof(s->protocol), "http");
	ag_audit_http_request(s, "GET", "/big", "h", NULL, &allow, false, "");
	ag_audit_http_request(s, "GET", "/admin", "h", NULL, &deny, true,
			      "agentgate: blocked by rule no-admin");
	ag_audit_http_response(s, 200);
	for (size_t off = 0; off < 100000; off += 10000)
		ag_audit_http_body(s, body + off, 10000);
	ag_audit_http_done(s);
	ag_audit_http_local(s, local403, strlen(local403));
	ag_audit_session_end(s);
	ag_audit_close();
	snprintf(adir, sizeof(adir), "%s/audit", dir);
	c.fed = body;
	ASSERT_OK(ag_audit_walk(adir, cap_cb, &c, err, sizeof(err)), "walk");
	ASSERT_TRUE(c.start_first, "the session's start comes first");
	ASSERT_EQ(c.statements, 2, "two requests");
	ASSERT_STREQ(c.deny_reason, "agentgate: blocked by rule no-admin", "the 403's message");
	ASSERT_EQ(c.results, 1, "one 200");
	ASSERT_EQ(c.body_len, want, "the first audit.body_bytes kept");
	ASSERT_TRUE(c.body_ok, "as fed");
	ASSERT_TRUE(c.capped, "body_capped");
	ASSERT_EQ(c.body_bytes, 100000, "body_bytes: the whole length");
	ASSERT_TRUE(c.sha_ok, "body_sha256: the whole body's");
rm:
	th_rm_rf(dir);
out:
	free(body);
	free(s);
}

/* audit.body_bytes: a size up to 1M; anything else is a policy error naming the key. */
static void subtest_body_bytes_bad(void)
{
	static const char *const bad[] = { "-1", "2M", "lots", "", "17179869184g" };
	struct ag_audit_config cfg;
	char err[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct ag_kv kv = { .key = "body_bytes", .value = (char *)bad[i] };

		err[0] = '\0';
		ASSERT_EQ(ag_audit_config_parse(&kv, 1, &cfg, err, sizeof(err)), -EINVAL, bad[i]);
		ASSERT_HAS_SUBSTR(err, "audit.body_bytes", "names the key");
	}
	{
		struct ag_kv kv = { .key = "body_bytes", .value = "0" };

		ASSERT_OK(ag_audit_config_parse(&kv, 1, &cfg, err, sizeof(err)), "0: no body");
		ASSERT_EQ(cfg.body_bytes, 0, "0");
	}
}

void test_audit_http(void)
{
	static const char cred_fmt[] = "    credential: { provider: static, secret_file: %s }\n";
	struct th_http_gate g;
	char extra[512], secret[256];
	int fd;

	if (test__start_subtest("body_capped_at_default_256"))
		subtest_body_capped(NULL, AG_AUDIT_DEFAULT_BODY);
	if (test__start_subtest("body_capped_at_policy_64k"))
		subtest_body_capped("64k", 64 << 10);
	if (test__start_subtest("body_bytes_bad_refused"))
		subtest_body_bytes_bad();
	memset(&g, 0, sizeof(g));
	snprintf(secret, sizeof(secret), "/tmp/agentgate-audit-http-cred-%d", getpid());
	fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, "token=" GATE_TOKEN "\n", 29) != 29) {
		if (fd >= 0)
			close(fd);
		test__skip("cannot write the credential file");
		return;
	}
	close(fd);
	snprintf(extra, sizeof(extra), cred_fmt, secret);
	/* Whole bodies in the log (the default keeps 256 bytes): the watch's last event too. */
	if (!ASSERT_OK(th_http_gate_start(&g, "127.0.0.67", true, extra,
					  AH_RULES "audit: { body_bytes: 64k }\n"),
		       "gate"))
		goto out;
	if (test__start_subtest("requests_recorded"))
		subtest_requests_recorded(&g);
	if (test__start_subtest("replay_shows_decisions_status_and_masked_body"))
		subtest_replay_shows_requests(&g);
	if (test__start_subtest("no_secret_value_or_credential_in_log"))
		subtest_no_secret_in_log(&g);
	if (test__start_subtest("watch_stream_recorded_masked"))
		subtest_watch_recorded(&g);
	if (test__start_subtest("session_watch_live"))
		subtest_session_watch_live(&g);
	if (test__start_subtest("verify_passes"))
		subtest_verify(&g);
out:
	test__end_subtest();
	th_http_gate_cleanup(&g);
	unlink(secret);
}
