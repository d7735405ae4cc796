// SPDX-License-Identifier: GPL-2.0
/*
 * then: approve for Kubernetes targets: a secret read is held until an approver decides from the
 * CLI. Approved: the request goes on and the (masked) secret comes back; denied: a 403 Status
 * naming the approver and the reason; nobody decides: a 403 naming the timeout. A fingerprint
 * grant lets the same kind of request through without asking again; other sessions carry on
 * while one waits; an agent that leaves cancels its approval.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../http.h"
#include "../test_progs.h"

#define AP_RULES                                                                                   \
	"    http:\n"                                                                              \
	"      - { name: secrets-review, when: { kubernetes: { verb: [get], resource: [secrets] }" \
	" }, then: approve }\n"                                                                    \
	"      - { name: reads, when: { kubernetes: { verb: [get, list, watch] } }, then: allow "  \
	"}\n"                                                                                      \
	"approvals: { approvers: [nobody], timeout: 8s }\n"

static char resp[256 * 1024], logbuf[1 << 20];
static struct th_agctl_result r;

static int send_get(struct th_http_gate *g, const char *path)
{
	char req[512];
	int fd = th_http_connect(g), n;

	if (fd < 0)
		return fd;
	n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
		     path);
	if (th_send_all(fd, req, n, 5000)) {
		close(fd);
		return -EIO;
	}
	return fd;
}

static const char *approval_state(struct th_http_gate *g, const char *id, char *buf, size_t len)
{
	yajl_val v;

	buf[0] = '\0';
	if (!TH_AGCTL(&r, "-S", g->d.socket, "-j", "approval", "show", id) &&
	    (v = th_json_parse(r.out))) {
		snprintf(buf, len, "%s", th_json_str(v, "state") ?: "");
		yajl_tree_free(v);
	}
	return buf;
}

static bool reached_server(struct th_http_gate *g, const char *path)
{
	char needle[256];

	snprintf(needle, sizeof(needle), "GET %s ", path);
	return !th_http_srvlog(g, logbuf, sizeof(logbuf)) && strstr(logbuf, needle);
}

static void no_secret_values(const char *s)
{
	static const char *const secrets[] = { "aHVudGVyMi1zZWNyZXQtcHc", "YWRtaW4tdXNlci1uYW1l",
					       "plain-token-value-123", "hunter2" };

	for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++)
		ASSERT_FALSE(strstr(s, secrets[i]), secrets[i]);
}

/* A 403 Kubernetes Status whose message has want. */
static void check_status_403(const char *s, const char *want)
{
	const char *body = strstr(s, "\r\n\r\n");
	yajl_val v;

	ASSERT_TRUE(!strncmp(s, "HTTP/1.1 403", 12), "403");
	if (!ASSERT_OK_PTR(body, "a body"))
		return;
	v = th_json_parse(body + 4);
	if (!ASSERT_OK_PTR(v, "a JSON body")) {
		printf("answer: %.600s\n", s);
		return;
	}
	ASSERT_STREQ(th_json_str(v, "kind"), "Status", "a Kubernetes Status");
	ASSERT_STREQ(th_json_str(v, "reason"), "Forbidden", "reason Forbidden");
	ASSERT_HAS_SUBSTR(th_json_str(v, "message") ?: "", want, "the message");
	yajl_tree_free(v);
}

static void subtest_secret_read_approved_from_cli(struct th_http_gate *g)
{
	static const char path[] = "/api/v1/namespaces/default/secrets/db-pass";
	char id[32], other[64 * 1024];
	bool closed;
	int fd = send_get(g, path);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	if (!ASSERT_TRUE(th_http_wait_approval(g, "secrets/db-pass", id, sizeof(id)), "held")) {
		close(fd);
		return;
	}
	ASSERT_FALSE(reached_server(g, path), "nothing reached the server while it waits");
	/* Other sessions carry on meanwhile. */
	if (ASSERT_OK(th_http_curl(g, other, sizeof(other), "/api/v1/namespaces/default/pods",
				   NULL),
		      "another session reads pods"))
		ASSERT_HAS_SUBSTR(other, "web-1", "and gets them");
	ASSERT_EQ(th_http_read_until(fd, resp, sizeof(resp), NULL, 300, &closed), 0,
		  "no answer before the decision");
	ASSERT_EQ(th_http_decide(g, "approve", id, NULL), 0,
		  "agctl approval approve");
	th_http_read_until(fd, resp, sizeof(resp), NULL, 20000, &closed);
	close(fd);
	ASSERT_TRUE(!strncmp(resp, "HTTP/1.1 200", 12), "200 once approved");
	ASSERT_HAS_SUBSTR(resp, "db-pass", "the secret came back");
	ASSERT_HAS_SUBSTR(resp, "REDACTED", "masked");
	no_secret_values(resp);
	ASSERT_TRUE(reached_server(g, path), "the request went on after the approval");
}

static void subtest_secret_read_denied_with_reason(struct th_http_gate *g)
{
	static const char path[] = "/api/v1/namespaces/default/secrets/api-key";
	char id[32];
	bool closed;
	int fd = send_get(g, path);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	if (!ASSERT_TRUE(th_http_wait_approval(g, "secrets/api-key", id, sizeof(id)), "held")) {
		close(fd);
		return;
	}
	ASSERT_EQ(th_http_decide(g, "deny", id, "reason", "not during the freeze", NULL),
		  0, "agctl approval deny");
	th_http_read_until(fd, resp, sizeof(resp), NULL, 20000, &closed);
	close(fd);
	check_status_403(resp, "not during the freeze");
	ASSERT_HAS_SUBSTR(resp, "denied by nobody", "names the approver");
	ASSERT_FALSE(reached_server(g, path), "a denied request never reaches the server");
}

static void subtest_secret_read_timed_out(struct th_http_gate *g)
{
	static const char path[] = "/api/v1/namespaces/default/secrets/nobody-decides";
	char id[32];
	bool closed;
	int fd = send_get(g, path);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	ASSERT_TRUE(th_http_wait_approval(g, "secrets/nobody-decides", id, sizeof(id)), "held");
	th_http_read_until(fd, resp, sizeof(resp), NULL, 40000, &closed);
	close(fd);
	check_status_403(resp, "timed out after 8s");
	ASSERT_FALSE(reached_server(g, path), "never reaches the server");
}

/* scope fingerprint: a get of another secret in the same namespace passes without asking. */
static void subtest_fingerprint_grant_covers_same_shape(struct th_http_gate *g)
{
	static const char p1[] = "/api/v1/namespaces/default/secrets/fp-one";
	static const char p2[] = "/api/v1/namespaces/default/secrets/fp-two";
	static const char p3[] = "/api/v1/namespaces/kube-system/secrets/fp-three";
	char id[32], st[32];
	bool closed;
	int fd = send_get(g, p1);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	if (!ASSERT_TRUE(th_http_wait_approval(g, "secrets/fp-one", id, sizeof(id)), "held")) {
		close(fd);
		return;
	}
	ASSERT_EQ(th_http_decide(g, "approve", id, "scope", "fingerprint", "ttl", "10m", NULL),
		  0, "approve, scope fingerprint");
	th_http_read_until(fd, resp, sizeof(resp), NULL, 20000, &closed);
	close(fd);
	ASSERT_TRUE(!strncmp(resp, "HTTP/1.1 200", 12), "200");
	/* the same shape: no new approval, answered at once */
	fd = send_get(g, p2);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	th_http_read_until(fd, resp, sizeof(resp), NULL, 20000, &closed);
	close(fd);
	ASSERT_TRUE(!strncmp(resp, "HTTP/1.1 200", 12), "the grant covers another secret");
	ASSERT_TRUE(reached_server(g, p2), "forwarded");
	/* another namespace is another shape: held again */
	fd = send_get(g, p3);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	if (ASSERT_TRUE(th_http_wait_approval(g, "secrets/fp-three", id, sizeof(id)),
			"another namespace asks again")) {
		close(fd);
		/* the agent left: its approval is cancelled */
		for (int i = 0; i < 100; i++) {
			if (!strcmp(approval_state(g, id, st, sizeof(st)), "cancelled"))
				break;
			usleep(100000);
		}
		ASSERT_STREQ(st, "cancelled", "an agent that leaves cancels its approval");
	} else {
		close(fd);
	}
	ASSERT_FALSE(reached_server(g, p3), "never reached the server");
}

void test_k8s_approval(void)
{
	struct th_http_gate g;

	if (!ASSERT_OK(th_http_gate_start(&g, "127.0.0.66", true, NULL, AP_RULES), "gate"))
		goto out;
	/* Non-root agctl (the approver) reaches the socket in the daemon's temp dir. */
	chmod(g.d.dir, 0711);
	if (test__start_subtest("secret_read_held_approved_from_cli"))
		subtest_secret_read_approved_from_cli(&g);
	if (test__start_subtest("secret_read_denied_403_names_reason"))
		subtest_secret_read_denied_with_reason(&g);
	if (test__start_subtest("secret_read_timed_out_403"))
		subtest_secret_read_timed_out(&g);
	if (test__start_subtest("fingerprint_grant_and_agent_leaving_cancels"))
		subtest_fingerprint_grant_covers_same_shape(&g);
	ASSERT_TRUE(th_http_alive(&g), "daemon alive at the end");
out:
	th_http_gate_cleanup(&g);
}
