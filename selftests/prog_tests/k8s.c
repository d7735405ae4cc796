// SPDX-License-Identifier: GPL-2.0
/*
 * Kubernetes API targets: request attributes as the API server derives them (a table of paths),
 * and end to end with kubectl and curl against the stand-in API server: reads allowed, a denied
 * verb printed by kubectl as "Error from server (Forbidden)", exec refused via POST and via
 * GET+Upgrade (Status objects), an exec a rule allows relayed after 101, impersonation and
 * nodes/proxy needing rules of their own, secret data masked (get, list, watch, the
 * last-applied annotation), a watch streamed event by event, and the agent's token replaced by
 * the gateway's.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "httprule.h"
#include "k8s.h"
#include "policy.h"
#include "../http.h"
#include "../test_progs.h"

struct k8s_case {
	const char *method, *target;
	const char *verb, *group, *resource, *subresource, *ns, *name;
	bool resource_request, connect;
};

static const struct k8s_case cases[] = {
	{ "GET", "/api/v1/namespaces/default/pods", "list", "", "pods", "", "default", "", true },
	{ "GET", "/api/v1/namespaces/default/pods?watch=true", "watch", "", "pods", "", "default",
	  "", true },
	{ "GET", "/api/v1/namespaces/default/pods?watch=1&resourceVersion=5", "watch", "", "pods",
	  "", "default", "", true },
	{ "GET", "/api/v1/watch/namespaces/default/pods", "watch", "", "pods", "", "default", "",
	  true },
	{ "GET", "/api/v1/watch/namespaces/default/pods/web", "watch", "", "pods", "", "default",
	  "web", true },
	{ "GET", "/api/v1/namespaces/default/pods/web", "get", "", "pods", "", "default", "web",
	  true },
	{ "HEAD", "/api/v1/namespaces/default/pods/web", "get", "", "pods", "", "default", "web",
	  true },
	{ "POST", "/api/v1/namespaces/default/pods", "create", "", "pods", "", "default", "",
	  true },
	{ "PUT", "/api/v1/namespaces/default/pods/web", "update", "", "pods", "", "default", "web",
	  true },
	{ "PATCH", "/api/v1/namespaces/default/pods/web/status", "patch", "", "pods", "status",
	  "default", "web", true },
	{ "DELETE", "/api/v1/namespaces/default/pods/web", "delete", "", "pods", "", "default",
	  "web", true },
	{ "DELETE", "/api/v1/namespaces/default/pods", "deletecollection", "", "pods", "",
	  "default", "", true },
	{ "POST", "/api/v1/namespaces/default/pods/web/exec?command=sh", "create", "", "pods",
	  "exec", "default", "web", true, true },
	{ "GET", "/api/v1/namespaces/default/pods/web/exec?command=sh", "get", "", "pods", "exec",
	  "default", "web", true, true },
	{ "POST", "/api/v1/namespaces/default/pods/web/attach", "create", "", "pods", "attach",
	  "default", "web", true, true },
	{ "POST", "/api/v1/namespaces/default/pods/web/portforward", "create", "", "pods",
	  "portforward", "default", "web", true, true },
	{ "GET", "/api/v1/nodes/n1/proxy/metrics", "get", "", "nodes", "proxy", "", "n1", true,
	  true },
	{ "GET", "/api/v1/proxy/namespaces/default/pods/web", "proxy", "", "pods", "", "default",
	  "web", true, true },
	{ "GET", "/api/v1/namespaces", "list", "", "namespaces", "", "", "", true },
	{ "GET", "/api/v1/namespaces/kube-system", "get", "", "namespaces", "", "kube-system",
	  "kube-system", true },
	{ "PUT", "/api/v1/namespaces/team/finalize", "update", "", "namespaces", "finalize", "team",
	  "team", true },
	{ "GET", "/api/v1/nodes", "list", "", "nodes", "", "", "", true },
	{ "GET", "/apis/apps/v1/namespaces/prod/deployments/api", "get", "apps", "deployments", "",
	  "prod", "api", true },
	{ "PATCH", "/apis/apps/v1/namespaces/prod/deployments/api/scale", "patch", "apps",
	  "deployments", "scale", "prod", "api", true },
	{ "GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", "list",
	  "rbac.authorization.k8s.io", "clusterroles", "", "", "", true },
	{ "GET", "/api/v1/namespaces/default/secrets?fieldSelector=metadata.name%3Ddb", "list", "",
	  "secrets", "", "default", "db", true },
	{ "GET", "/api", "get", "", "", "", "", "", false },
	{ "GET", "/api/v1", "get", "", "", "", "", "", false },
	{ "GET", "/apis/apps/v1", "get", "", "", "", "", "", false },
	{ "GET", "/version", "get", "", "", "", "", "", false },
	{ "POST", "/healthz", "post", "", "", "", "", "", false },
};

void test_k8s_request_info(void)
{
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct k8s_case *c = &cases[i];
		struct ag_k8s_req r;
		char what[600];

		snprintf(what, sizeof(what), "%s %s", c->method, c->target);
		ag_k8s_parse(c->method, c->target, strlen(c->target), &r);
		ASSERT_EQ(r.resource_request, c->resource_request, what);
		ASSERT_STREQ(r.verb, c->verb, what);
		ASSERT_STREQ(r.group, c->group, what);
		ASSERT_STREQ(r.resource, c->resource, what);
		ASSERT_STREQ(r.subresource, c->subresource, what);
		ASSERT_STREQ(r.ns, c->ns, what);
		ASSERT_STREQ(r.name, c->name, what);
		ASSERT_EQ(r.connect, c->connect, what);
	}
}

#define K8S_RULES                                                                                  \
	"    http:\n"                                                                              \
	"      - { name: debug-exec, when: { kubernetes: { subresource: [exec], name: "            \
	"[debug-pod] }"                                                                            \
	" }, then: allow }\n"                                                                      \
	"      - { name: no-exec, when: { kubernetes: { subresource: [exec, attach, portforward] " \
	"}"                                                                                        \
	" }, then: deny }\n"                                                                       \
	"      - { name: no-delete, when: { kubernetes: { verb: [delete, deletecollection] } },"   \
	" then: deny }\n"                                                                          \
	"      - { name: secrets-read, when: { kubernetes: { verb: [get, list, watch],"            \
	" resource: [secrets] } }, then: allow }\n"                                                \
	"      - { name: reads, when: { kubernetes: { verb: [get, list, watch] } }, then: allow "  \
	"}\n"

static char out[256 * 1024], err[65536], logbuf[1 << 20];

static int kubectl(struct th_http_gate *g, const char *a1, const char *a2, const char *a3,
		   const char *a4)
{
	return th_http_kubectl(g, out, sizeof(out), err, sizeof(err), a1, a2, a3, a4);
}

static void subtest_kubectl_get_pods(struct th_http_gate *g)
{
	int rc = kubectl(g, "get", "pods", "-o", "name");

	if (!ASSERT_OK(rc, "kubectl get pods"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "pod/web-1\npod/web-2\n", "the pods");
}

static void subtest_kubectl_forbidden(struct th_http_gate *g)
{
	int rc = kubectl(g, "delete", "pod", "web-1", NULL);

	ASSERT_NEQ(rc, 0, "kubectl delete fails");
	ASSERT_HAS_SUBSTR(err, "Error from server (Forbidden)", "kubectl prints a Forbidden error");
	ASSERT_HAS_SUBSTR(err, "blocked by rule no-delete", "the rule named");
	ASSERT_OK(th_http_srvlog(g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "DELETE "), "no DELETE reached the server");
}

static void check_status_403(const char *resp, const char *rule)
{
	const char *body = strstr(resp, "\r\n\r\n");
	yajl_val v;
	long long code = 0;

	if (!ASSERT_OK_PTR(body, "a body"))
		return;
	ASSERT_TRUE(!strncmp(resp, "HTTP/1.1 403", 12), "403");
	v = th_json_parse(body + 4);
	if (!ASSERT_OK_PTR(v, "JSON"))
		return;
	ASSERT_STREQ(th_json_str(v, "kind"), "Status", "kind Status");
	ASSERT_STREQ(th_json_str(v, "apiVersion"), "v1", "apiVersion v1");
	ASSERT_STREQ(th_json_str(v, "status"), "Failure", "status Failure");
	ASSERT_STREQ(th_json_str(v, "reason"), "Forbidden", "reason Forbidden");
	ASSERT_TRUE(th_json_int(v, "code", &code) && code == 403, "code 403");
	ASSERT_HAS_SUBSTR(th_json_str(v, "message") ? th_json_str(v, "message") : "", rule,
			  "message names the rule");
	yajl_tree_free(v);
}

static void subtest_exec_denied_post(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out),
				    "/api/v1/namespaces/default/pods/web-1/exec?command=sh", "-i",
				    "-X", "POST", NULL),
		       "curl"))
		return;
	check_status_403(out, "blocked by rule no-exec");
	ASSERT_OK(th_http_srvlog(g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "web-1/exec"), "exec never reached the server");
}

static void subtest_exec_denied_get_upgrade(struct th_http_gate *g)
{
	static const char req[] =
		"GET /api/v1/namespaces/default/pods/web-1/exec?command=sh&stdin=true HTTP/1.1\r\n"
		"Host: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
		"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n";
	bool closed;

	th_http_raw(g, req, sizeof(req) - 1, out, sizeof(out), 5000, &closed);
	check_status_403(out, "blocked by rule no-exec");
	ASSERT_FALSE(strstr(out, "101"), "no switch");
	ASSERT_OK(th_http_srvlog(g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "web-1/exec"), "exec never reached the server");
}

/* An exec a rule allows by name: after 101 the connection relays both ways. */
/* kubectl exec (websocket GET+Upgrade, then SPDY POST): refused, and kubectl says why. */
static void subtest_kubectl_exec_refused(struct th_http_gate *g)
{
	int rc = kubectl(g, "exec", "web-1", "--", "true");

	ASSERT_NEQ(rc, 0, "kubectl exec fails");
	if (!ASSERT_TRUE(strstr(err, "Error from server (Forbidden): agentgate: blocked by rule "
				     "no-exec"),
			 "kubectl prints the Status") ||
	    test__verbose())
		printf("kubectl exec: %s\n", err);
	ASSERT_OK(th_http_srvlog(g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "web-1/exec"), "exec never reached the server");
}

static void subtest_exec_allowed_relays(struct th_http_gate *g)
{
	static const char req[] =
		"POST /api/v1/namespaces/default/pods/debug-pod/exec?command=sh HTTP/1.1\r\n"
		"Host: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n";
	bool closed;
	int fd = th_http_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	th_send_all(fd, req, sizeof(req) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "\r\n\r\n", 15000, &closed);
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 101", 12), "101 Switching Protocols");
	th_send_all(fd, "ping-1", 6, 5000);
	th_http_read_until(fd, out, sizeof(out), "exec-echo:ping-1", 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "exec-echo:ping-1", "raw bytes relayed both ways");
	close(fd);
}

static void subtest_impersonation_own_target(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out), "/api/v1/namespaces/default/pods", "-i",
				    "-H", "Impersonate-User: cluster-admin", NULL),
		       "curl"))
		return;
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 403", 12), "a read with Impersonate-User refused");
	ASSERT_HAS_SUBSTR(out, "\"reason\":\"Forbidden\"", "Status");
}

static void subtest_nodes_proxy_own_target(struct th_http_gate *g)
{
	if (!ASSERT_OK(
		    th_http_curl(g, out, sizeof(out), "/api/v1/nodes/n1/proxy/metrics", "-i", NULL),
		    "curl"))
		return;
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 403", 12), "nodes/proxy not covered by reads");
}

static void no_secret_values(const char *s, const char *what)
{
	/* base64 of hunter2-secret-pw and admin-user-name, and the stringData value */
	static const char *const secrets[] = { "aHVudGVyMi1zZWNyZXQtcHc", "YWRtaW4tdXNlci1uYW1l",
					       "plain-token-value-123", "hunter2" };

	for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++)
		if (!ASSERT_FALSE(strstr(s, secrets[i]), what))
			printf("%s went out in: %.400s\n", secrets[i], s);
}

static void subtest_secret_masked(struct th_http_gate *g)
{
	if (ASSERT_OK(th_http_curl(g, out, sizeof(out),
				   "/api/v1/namespaces/default/secrets/db-pass", NULL),
		      "get")) {
		no_secret_values(out, "get secret");
		ASSERT_HAS_SUBSTR(out, "\"password\":\"[REDACTED]\"", "data masked, keys kept");
		ASSERT_HAS_SUBSTR(out, "\"name\":\"db-pass\"", "metadata kept");
	}
	if (ASSERT_OK(th_http_curl(g, out, sizeof(out), "/api/v1/namespaces/default/secrets", NULL),
		      "list"))
		no_secret_values(out, "list secrets");
	if (ASSERT_OK(kubectl(g, "get", "secret", "db-pass", "-o=jsonpath={.data.password}"),
		      "kubectl get secret"))
		ASSERT_STREQ(out, "[REDACTED]", "kubectl sees the masked value");
}

/* A secret in a form we cannot mask (YAML): 502 in its place. */
static void subtest_secret_not_json_refused(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out),
				    "/api/v1/namespaces/default/secrets/db-pass?as=yaml", "-i",
				    NULL),
		       "curl"))
		return;
	ASSERT_TRUE(!strncmp(out, "HTTP/1.1 502", 12), "502");
	no_secret_values(out, "yaml secret");
}

static void subtest_secret_watch_masked(struct th_http_gate *g)
{
	if (!ASSERT_OK(th_http_curl(g, out, sizeof(out),
				    "/api/v1/namespaces/default/secrets?watch=true", NULL),
		       "watch"))
		return;
	no_secret_values(out, "watch secrets");
	ASSERT_HAS_SUBSTR(out, "\"type\":\"DELETED\"", "all events");
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Events arrive one by one, not the stream buffered whole. */
static void subtest_watch_streams(struct th_http_gate *g)
{
	static const char req[] = "GET /api/v1/namespaces/default/pods?watch=true HTTP/1.1\r\n"
				  "Host: x\r\n\r\n";
	bool closed;
	int fd = th_http_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	th_send_all(fd, req, sizeof(req) - 1, 5000);
	th_http_read_until(fd, out, sizeof(out), "\"ADDED\"", 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "\"ADDED\"", "the first event");
	ASSERT_FALSE(strstr(out, "\"DELETED\""), "before the last was sent");
	th_http_read_until(fd, out, sizeof(out), "0\r\n\r\n", 15000, &closed);
	ASSERT_HAS_SUBSTR(out, "\"DELETED\"", "the last event, later");
	close(fd);
	(void)now_ms;
}

static void subtest_agent_token_replaced(struct th_http_gate *g)
{
	if (!ASSERT_OK(kubectl(g, "get", "namespaces", "-o", "name"), "kubectl"))
		return;
	ASSERT_OK(th_http_srvlog(g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "agent-own-token-XYZ"), "the agent's token never arrived");
	ASSERT_HAS_SUBSTR(logbuf,
			  "GET /api/v1/namespaces?limit=500&timeout=20s auth=Bearer "
			  "gateway-k8s-token",
			  "the gateway's token did");
}

void test_k8s(void)
{
	static const char cred_fmt[] = "    credential: { provider: static, secret_file: %s }\n";
	struct th_http_gate g;
	char extra[512], secret[256];
	bool have_kubectl = !access("/usr/bin/kubectl", X_OK);
	int fd;

	memset(&g, 0, sizeof(g));
	snprintf(secret, sizeof(secret), "/tmp/agentgate-k8s-cred-%d", getpid());
	fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, "token=gateway-k8s-token\n", 24) != 24) {
		if (fd >= 0)
			close(fd);
		test__skip("cannot write the credential file");
		return;
	}
	close(fd);
	snprintf(extra, sizeof(extra), cred_fmt, secret);
	if (!ASSERT_OK(th_http_gate_start(&g, "127.0.0.63", true, extra, K8S_RULES), "gate"))
		goto out;
	if (have_kubectl && test__start_subtest("kubectl_get_pods"))
		subtest_kubectl_get_pods(&g);
	if (have_kubectl && test__start_subtest("kubectl_forbidden_verb"))
		subtest_kubectl_forbidden(&g);
	if (test__start_subtest("exec_denied_post"))
		subtest_exec_denied_post(&g);
	if (test__start_subtest("exec_denied_get_upgrade"))
		subtest_exec_denied_get_upgrade(&g);
	if (have_kubectl && test__start_subtest("kubectl_exec_refused"))
		subtest_kubectl_exec_refused(&g);
	if (test__start_subtest("exec_allowed_relays_after_101"))
		subtest_exec_allowed_relays(&g);
	if (test__start_subtest("impersonation_own_rule_target"))
		subtest_impersonation_own_target(&g);
	if (test__start_subtest("nodes_proxy_own_rule_target"))
		subtest_nodes_proxy_own_target(&g);
	if (have_kubectl && test__start_subtest("secret_data_masked"))
		subtest_secret_masked(&g);
	if (test__start_subtest("secret_not_json_refused"))
		subtest_secret_not_json_refused(&g);
	if (test__start_subtest("secret_watch_masked"))
		subtest_secret_watch_masked(&g);
	if (test__start_subtest("watch_streams_event_by_event"))
		subtest_watch_streams(&g);
	if (have_kubectl && test__start_subtest("agent_token_replaced"))
		subtest_agent_token_replaced(&g);
	if (!have_kubectl)
		printf("kubectl not installed: its subtests skipped\n");
	ASSERT_TRUE(th_http_alive(&g), "daemon alive at the end");
out:
	th_http_gate_cleanup(&g);
	unlink(secret);
}

/* agctl policy explain --http: the attributes and the deciding rule, without a daemon. */
void test_k8s_policy_explain(void)
{
	static const char pol[] = "apiVersion: agentgate/v1\n"
				  "agents: [{ name: ci, cgroup: /agents.slice }]\n"
				  "targets: [{ name: kube, protocol: http, address: "
				  "127.0.0.3:6443, kubernetes: true }]\n"
				  "rules:\n"
				  "  - agent: ci\n"
				  "    target: kube\n"
				  "    http:\n"
				  "      - { name: no-exec, when: { kubernetes: { subresource: "
				  "[exec] } }, then: deny }\n"
				  "      - { name: reads, when: { kubernetes: { verb: [get, list, "
				  "watch] } }, then: allow }\n"
				  "default: deny\n";
	static struct th_agctl_result r;
	char path[] = "/tmp/agentgate-explain-XXXXXX";
	int fd = mkstemp(path);

	if (!ASSERT_GE(fd, 0, "mkstemp"))
		return;
	ASSERT_EQ(write(fd, pol, sizeof(pol) - 1), (ssize_t)sizeof(pol) - 1, "write");
	close(fd);
	TH_AGCTL(&r, "policy", "explain", path, "--agent", "ci", "--target", "kube", "--http",
		 "POST /api/v1/namespaces/default/pods/web/exec?command=sh");
	ASSERT_EQ(r.status, 0, "exit 0");
	ASSERT_HAS_SUBSTR(r.out, "resource pods/exec", "attributes");
	ASSERT_HAS_SUBSTR(r.out, "decision: deny by rule no-exec", "the deciding rule");
	TH_AGCTL(&r, "-j", "policy", "explain", path, "--agent", "ci", "--target", "kube", "--http",
		 "GET /api/v1/namespaces/default/secrets/db");
	ASSERT_EQ(r.status, 0, "exit 0");
	ASSERT_HAS_SUBSTR(r.out, "\"verb\":\"get\"", "verb");
	ASSERT_HAS_SUBSTR(r.out, "\"decision\":\"deny\"", "secrets not covered by reads");
	ASSERT_HAS_SUBSTR(r.out, "does not name secrets", "why");
	unlink(path);
}

/* A policy with agent ci and kubernetes target kube, up to the rule's own keys. */
#define K8S_POLICY_HEAD                                                                            \
	"apiVersion: agentgate/v1\n"                                                               \
	"agents: [{ name: ci, cgroup: /agents.slice }]\n"                                          \
	"targets: [{ name: kube, protocol: http, address: 127.0.0.3:6443, kubernetes: true }]\n"   \
	"rules:\n"                                                                                 \
	"  - agent: ci\n"                                                                          \
	"    target: kube\n"

/* resource: [pods] does not cover pods/log (RBAC's reading); pods/log and globs for it do. */
void test_k8s_subresource_rbac(void)
{
	static const char head[] = K8S_POLICY_HEAD "    http:\n";
	static const struct {
		const char *rule, *req, *want;
	} rb[] = {
		{ "{ resource: [pods] }", "GET /api/v1/namespaces/d/pods/web", "allow" },
		{ "{ resource: [pods] }", "GET /api/v1/namespaces/d/pods/web/log", "deny" },
		{ "{ resource: [pods/log] }", "GET /api/v1/namespaces/d/pods/web/log", "allow" },
		{ "{ resource: [\"pods/*\"] }", "GET /api/v1/namespaces/d/pods/web/log", "allow" },
		{ "{ resource: [pods], subresource: [log] }", "GET /api/v1/namespaces/d/pods/w/log",
		  "allow" },
		{ "{ resource: [\"*\"] }", "PATCH /apis/apps/v1/namespaces/d/deployments/a/scale",
		  "allow" },
		{ "{ resource: [pods/log] }", "GET /api/v1/namespaces/d/pods/web", "deny" },
	};
	char text[2048], perr[512], want[64];

	for (size_t i = 0; i < sizeof(rb) / sizeof(rb[0]); i++) {
		struct ag_http_decision d;
		struct ag_http_req r = { 0 };
		struct ag_k8s_req k;
		struct ag_policy *p;
		char method[16], target[256];

		snprintf(text, sizeof(text),
			 "%s      - { name: r, when: { kubernetes: %s }, then: allow }\n"
			 "default: deny\n",
			 head, rb[i].rule);
		p = ag_policy_parse(text, strlen(text), "t.yaml", perr, sizeof(perr));
		if (!ASSERT_OK_PTR(p, "policy")) {
			printf("%s\n", perr);
			continue;
		}
		sscanf(rb[i].req, "%15s %255s", method, target);
		ag_k8s_parse(method, target, strlen(target), &k);
		r.method = method;
		r.host = "";
		r.path = k.path;
		r.k8s = &k;
		ag_http_decide(ag_http_rule_for(p, "ci", "kube"), &r, &d);
		snprintf(want, sizeof(want), "%s: %s", rb[i].rule, rb[i].req);
		ASSERT_STREQ(ag_action_name(d.action), rb[i].want, want);
		ag_policy_free(p);
	}
}

/* The http rule keys this target type adds are accepted, and their values checked. */
void test_k8s_policy_keys(void)
{
	static const char head[] = K8S_POLICY_HEAD;
	static const char *const good[] = {
		"    http:\n"
		"      - { name: a, when: { kubernetes: { group: [apps], version: [v1],"
		" impersonate: true } }, then: allow }\n"
		"      - { name: b, when: { upgrade: true, headers: { Impersonate-User: \"*\" } },"
		" then: allow }\n"
		"    mask: { keys: [email, \"spec.*.token\"], secrets: unmasked, style: hash }\n",
	};
	static const char *const bad[] = {
		"    mask: { secrets: maybe }\n",
		"    http:\n      - { name: a, when: { upgrade: sometimes }, then: allow }\n",
		"    http:\n      - { name: a, when: { kubernetes: { impersonate: [x] } }, then: "
		"allow }\n",
		"    http:\n      - { name: a, when: { kubernetes: { verbs: [get] } }, then: allow "
		"}\n",
	};
	char text[2048], perr[512];
	struct ag_policy *p;

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(text, sizeof(text), "%s%sdefault: deny\n", head, good[i]);
		p = ag_policy_parse(text, strlen(text), "good.yaml", perr, sizeof(perr));
		if (!ASSERT_OK_PTR(p, "accepted"))
			printf("%s\n", perr);
		ag_policy_free(p);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(text, sizeof(text), "%s%sdefault: deny\n", head, bad[i]);
		p = ag_policy_parse(text, strlen(text), "bad.yaml", perr, sizeof(perr));
		ASSERT_FALSE(p, "refused");
		ASSERT_HAS_SUBSTR(perr, "bad.yaml:", "error names the place");
		ag_policy_free(p);
	}
}
