// SPDX-License-Identifier: GPL-2.0
/*
 * The policy loader as a user meets it: the shipped policies load, every bad input a user could
 * write is refused with one "FILE:LINE:COL: problem (hint)" line pointing at the right node,
 * lookups pick the right agent and target, and `agctl policy show -j` output (the JSON
 * rendering) parses back with the same content. No daemon, no BPF, no network (hosts are IP
 * literals, "localhost" or under .invalid, which never resolves).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yajl/yajl_tree.h>

#include "jsonw.h"
#include "policy.h"
#include "../test_progs.h"

#define API "apiVersion: agentgate/v1\n"
#define AGENT_CI "agents: [{ name: ci, cgroup: /agents.slice }]\n"
#define PG_DB "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:5432\" }]\n"
#define HTTP_WEB "targets: [{ name: web, protocol: http, address: \"127.0.0.2:80\" }]\n"

struct bad_case {
	const char *name;
	const char *yaml;
	const char *pos;  /* "bad.yaml:LINE:COL:" */
	const char *word; /* a word of the problem */
};

static const struct bad_case bad_cases[] = {
	{ "bad_api_version", "apiVersion: agentgate/v2\n", "bad.yaml:1:13:", "agentgate/v2" },
	{ "missing_api_version", AGENT_CI, "bad.yaml:1:1:", "missing apiVersion" },
	{ "unknown_top_key", API "agent: []\n", "bad.yaml:2:1:", "unknown key \"agent\"" },
	{ "missing_agent_name", API "agents:\n  - cgroup: /a\n", "bad.yaml:3:5:", "no name" },
	{ "duplicate_agent",
	  API "agents:\n  - name: ci\n    cgroup: /a\n  - name: ci\n    cgroup: /b\n",
	  "bad.yaml:5:11:", "duplicate agent" },
	{ "bad_agent_name", API "agents: [{ name: \"c i\", cgroup: /a }]\n",
	  "bad.yaml:2:18:", "bad agent name" },
	{ "missing_cgroup", API "agents: [{ name: ci }]\n", "bad.yaml:2:10:", "no cgroup" },
	{ "root_cgroup", API "agents:\n  - name: ci\n    cgroup: /\n",
	  "bad.yaml:4:13:", "cgroup root" },
	{ "root_cgroup_dots", API "agents: [{ name: ci, cgroup: //./ }]\n",
	  "bad.yaml:2:30:", "cgroup root" },
	{ "dotdot_cgroup", API "agents:\n  - name: ci\n    cgroup: /a/../b\n",
	  "bad.yaml:4:13:", "\"..\"" },
	{ "sysfs_cgroup", API "agents: [{ name: ci, cgroup: /sys/fs/cgroup/a }]\n",
	  "bad.yaml:2:30:", "relative to the cgroup2 mount" },
	{ "same_cgroup_twice", API "agents: [{ name: a, cgroup: /x }, { name: b, cgroup: /x/ }]\n",
	  "bad.yaml:2:54:", "already agent \"a\"" },
	{ "bad_mode", API "agents: [{ name: ci, cgroup: /a, mode: block }]\n",
	  "bad.yaml:2:40:", "unknown mode \"block\"" },
	{ "bad_protocol",
	  API "targets:\n  - name: db\n    protocol: psql\n    address: 127.0.0.2:5432\n",
	  "bad.yaml:4:15:", "unknown protocol \"psql\" (expected postgres, http or tcp)" },
	{ "missing_protocol", API "targets: [{ name: db, address: \"127.0.0.2:1\" }]\n",
	  "bad.yaml:2:11:", "no protocol" },
	{ "bad_address_no_port",
	  API "targets:\n  - { name: db, protocol: tcp, address: 127.0.0.2 }\n",
	  "bad.yaml:3:41:", "no port" },
	{ "bad_port_range",
	  API "targets:\n  - { name: db, protocol: tcp, address: \"127.0.0.2:70000\" }\n",
	  "bad.yaml:3:41:", "out of range" },
	{ "bad_port_zero", API "targets: [{ name: db, protocol: tcp, address: \"127.0.0.2:0\" }]\n",
	  "bad.yaml:2:47:", "out of range" },
	{ "bad_port_text",
	  API "targets: [{ name: db, protocol: tcp, address: \"127.0.0.2:pg\" }]\n",
	  "bad.yaml:2:47:", "bad port" },
	{ "ipv6_without_brackets",
	  API "targets: [{ name: db, protocol: tcp, address: \"::1:5432\" }]\n",
	  "bad.yaml:2:47:", "brackets" },
	{ "bad_ipv6", API "targets: [{ name: db, protocol: tcp, address: \"[::g]:5432\" }]\n",
	  "bad.yaml:2:47:", "bad IPv6 address" },
	{ "unresolvable_host",
	  API "targets:\n  - { name: db, protocol: tcp, address: \"nowhere.invalid:5432\" }\n",
	  "bad.yaml:3:41:", "cannot resolve host \"nowhere.invalid\"" },
	{ "duplicate_target",
	  API "targets:\n  - { name: db, protocol: tcp, address: \"127.0.0.2:1\" }\n"
	      "  - { name: db, protocol: tcp, address: \"127.0.0.2:2\" }\n",
	  "bad.yaml:4:13:", "duplicate target" },
	{ "overlapping_targets",
	  API "targets:\n  - { name: a, protocol: tcp, address: \"127.0.0.2:1\" }\n"
	      "  - { name: b, protocol: tcp, address: \"[::ffff:127.0.0.2]:1\" }\n",
	  "bad.yaml:4:40:", "also target \"a\"" },
	{ "kubernetes_on_tcp",
	  API "targets: [{ name: k, protocol: tcp, address: \"127.0.0.2:1\", kubernetes: true }]\n",
	  "bad.yaml:2:73:", "needs protocol http" },
	{ "bad_bool",
	  API "targets: [{ name: k, protocol: http, address: \"127.0.0.2:1\", kubernetes: yes }]\n",
	  "bad.yaml:2:74:", "true or false" },
	{ "bad_tls_mode",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            tls: { client: terminate, upstream: verify } }]\n",
	  "bad.yaml:3:49:", "unknown value \"verify\" for tls.upstream" },
	{ "unknown_tls_key",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            tls: { ca: /x } }]\n",
	  "bad.yaml:3:20:", "unknown key \"ca\" in tls" },
	{ "credential_without_provider",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            credential: { ttl: 5m } }]\n",
	  "bad.yaml:3:25:", "no provider" },
	{ "bad_provider",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            credential: { provider: vault } }]\n",
	  "bad.yaml:3:37:", "unknown value \"vault\" for credential.provider" },
	{ "provider_needs_secret",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            credential: { provider: pg-jit-role } }]\n",
	  "bad.yaml:3:25:", "needs admin_secret" },
	{ "jwt_on_postgres",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            credential: { provider: jwt, key_file: /k } }]\n",
	  "bad.yaml:3:25:", "needs an http target" },
	{ "bad_duration",
	  API "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:1\",\n"
	      "            credential: { provider: pg-jit-role, admin_secret: /s, ttl: 10 } }]\n",
	  "bad.yaml:3:73:", "bad duration \"10\"" },
	{ "bad_approval_timeout", API "approvals: { timeout: 5x }\n",
	  "bad.yaml:2:23:", "bad duration \"5x\"" },
	{ "unknown_approvals_key", API "approvals: { approver: [root] }\n",
	  "bad.yaml:2:14:", "unknown key \"approver\"" },
	{ "bad_approver", API "approvals: { approvers: [root, \"uid:x1\"] }\n",
	  "bad.yaml:2:12:", "\"uid:x1\" is not a user" },
	{ "rule_unknown_agent", API PG_DB "rules:\n  - { agent: bob, target: db }\n",
	  "bad.yaml:4:14:", "unknown agent \"bob\"" },
	{ "rule_unknown_target", API AGENT_CI "rules:\n  - { agent: ci, target: nope }\n",
	  "bad.yaml:4:26:", "unknown target \"nope\"" },
	{ "rule_without_agent", API AGENT_CI PG_DB "rules:\n  - { target: db }\n",
	  "bad.yaml:5:5:", "no agent" },
	{ "bad_then",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { name: r, then: permit }\n",
	  "bad.yaml:8:26:", "unknown action \"permit\"" },
	{ "missing_then",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { name: r, when: { command: select } }\n",
	  "bad.yaml:8:9:", "no then" },
	{ "missing_rule_name",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { then: deny }\n",
	  "bad.yaml:8:9:", "no name" },
	{ "duplicate_rule_name",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { name: r, then: deny }\n      - { name: r, then: allow }\n",
	  "bad.yaml:9:17:", "duplicate sql rule \"r\"" },
	{ "unknown_when_key",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { name: r, when: { comand: [drop] }, then: deny }\n",
	  "bad.yaml:8:28:", "unknown key \"comand\" in when" },
	{ "unknown_sql_command",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { name: r, when: { command: [drop, dorp] }, then: deny }\n",
	  "bad.yaml:8:44:", "unknown value \"dorp\" for when.command" },
	{ "bad_where",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql:\n"
			     "      - { name: r, when: { where: none }, then: deny }\n",
	  "bad.yaml:8:35:", "unknown value \"none\" for when.where" },
	{ "unknown_kubernetes_key",
	  API AGENT_CI
	  "targets: [{ name: k, protocol: http, address: \"127.0.0.2:1\", kubernetes: true }]\n"
	  "rules:\n  - agent: ci\n    target: k\n    http:\n"
	  "      - { name: r, when: { kubernetes: { kind: [Pod] } }, then: deny }\n",
	  "bad.yaml:8:42:", "unknown key \"kind\" in when.kubernetes" },
	{ "kubernetes_when_on_plain_http",
	  API AGENT_CI HTTP_WEB
	  "rules:\n  - agent: ci\n    target: web\n    http:\n"
	  "      - { name: r, when: { kubernetes: { verb: [get] } }, then: deny }\n",
	  "bad.yaml:8:28:", "kubernetes: true" },
	{ "sql_on_http_target",
	  API AGENT_CI HTTP_WEB "rules:\n  - agent: ci\n    target: web\n    sql:\n"
				"      - { name: r, then: deny }\n",
	  "bad.yaml:7:5:", "sql rules on target \"web\"" },
	{ "http_on_postgres_target",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    http:\n"
			     "      - { name: r, then: deny }\n",
	  "bad.yaml:7:5:", "http rules on target \"db\"" },
	{ "bad_detector",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n"
			     "    mask: { detectors: [email, iban] }\n",
	  "bad.yaml:7:32:", "unknown value \"iban\" for mask.detectors" },
	{ "bad_mask_style",
	  API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n"
			     "    mask: { style: blur }\n",
	  "bad.yaml:7:20:", "unknown value \"blur\" for mask.style" },
	{ "bad_default", API "default: allow\n", "bad.yaml:2:10:", "unknown default \"allow\"" },
	{ "unknown_gateway_key", API "gateway: { sockmap: true }\n",
	  "bad.yaml:2:12:", "unknown key \"sockmap\"" },
	{ "agents_not_a_list", API "agents: { name: ci }\n",
	  "bad.yaml:2:9:", "agents must be a list" },
	{ "yaml_syntax_error", API "agents:\n  - name: ci\n   cgroup: /a\n",
	  "bad.yaml:4:4:", "YAML syntax error" },
	{ "yaml_unclosed_flow", API "agents: [{ name: ci, cgroup: /a }\n",
	  "bad.yaml:3:1:", "YAML syntax error" },
	{ "yaml_tab_indent", API "agents:\n\t- name: ci\n", "bad.yaml:3:1:", "tab" },
	{ "undefined_alias", API "agents: *nope\n", "bad.yaml:2:9:", "undefined alias" },
	{ "not_utf8", API "agents: \xff\n", "bad.yaml:2:9:", "UTF-8" },
	{ "empty_file", "", "bad.yaml:1:1:", "empty policy" },
	{ "only_comments", "# nothing here\n\n", "bad.yaml:1:1:", "empty policy" },
	{ "not_a_mapping", "- apiVersion\n- agents\n", "bad.yaml:1:1:", "must be a mapping" },
	{ "duplicate_key", API "default: deny\ndefault: passthrough\n",
	  "bad.yaml:3:1:", "duplicate key \"default\"" },
	{ "duplicate_key_in_agent", API "agents: [{ name: ci, cgroup: /a, name: x }]\n",
	  "bad.yaml:2:34:", "duplicate key \"name\"" },
	{ "two_documents", API "---\n" API, "bad.yaml:2:1:", "second YAML document" },
	{ "deep_nesting",
	  API "gateway: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]"
	      "]]]]]]]]]]]]]]]]\n",
	  "bad.yaml:2:41:", "deeper than" },
};

static void check_bad(const struct bad_case *bc)
{
	char err[512] = "";
	struct ag_policy *p;

	errno = 0;
	p = ag_policy_parse(bc->yaml, strlen(bc->yaml), "bad.yaml", err, sizeof(err));
	if (!ASSERT_FALSE(p, "refused")) {
		ag_policy_free(p);
		return;
	}
	ASSERT_EQ(errno, EINVAL, "errno");
	ASSERT_HAS_SUBSTR(err, bc->pos, "position");
	ASSERT_HAS_SUBSTR(err, bc->word, "problem");
	ASSERT_FALSE(strchr(err, '\n'), "one line");
	if (test__verbose())
		printf("%s: %s\n", bc->name, err);
}

static struct ag_policy *parse_str(const char *yaml, char *err, size_t len)
{
	return ag_policy_parse(yaml, strlen(yaml), "test.yaml", err, len);
}

static void v4(uint8_t out[16], const char *s)
{
	memset(out, 0, 16);
	out[10] = out[11] = 0xff;
	inet_pton(AF_INET, s, out + 12);
}

static void v6(uint8_t out[16], const char *s)
{
	inet_pton(AF_INET6, s, out);
}

static void subtest_example(void)
{
	const struct ag_policy_target *db, *kube;
	const struct ag_policy_rule *r;
	const struct ag_kv *kv;
	char err[512] = "";
	struct ag_policy *p;
	uint64_t ms;
	uint8_t a[16];

	p = ag_policy_load("policies/example.yaml", err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "load")) {
		printf("error: %s\n", err);
		return;
	}
	ASSERT_STREQ(p->path, "policies/example.yaml", "path");
	ASSERT_OK_PTR(p->source && strstr(p->source, "agentgate/v1") ? p : NULL, "source kept");
	ASSERT_EQ(p->nagents, 1, "agents");
	ASSERT_STREQ(p->agents[0].cgroup, "/agents.slice", "cgroup");
	ASSERT_EQ(p->ntargets, 2, "targets");
	ASSERT_EQ(p->nrules, 2, "rules");
	ASSERT_EQ(p->default_action, AG_DEFAULT_DENY, "default");
	ASSERT_FALSE(p->fastpath_set, "fastpath unset");

	db = ag_policy_target_by_name(p, "orders-db");
	kube = ag_policy_target_by_name(p, "kube");
	if (!ASSERT_OK_PTR(db, "orders-db") || !ASSERT_OK_PTR(kube, "kube"))
		goto out;
	ASSERT_EQ(db->protocol, AG_PROTO_POSTGRES, "db protocol");
	ASSERT_EQ(db->port, 5432, "db port");
	ASSERT_STREQ(db->host, "127.0.0.2", "db host");
	kv = ag_kv_get(db->credential, db->ncredential, "provider");
	ASSERT_STREQ(kv ? kv->value : NULL, "pg-jit-role", "db provider");
	kv = ag_kv_get(db->credential, db->ncredential, "grant");
	if (ASSERT_OK_PTR(kv, "grant") && ASSERT_EQ(kv->kind, AG_KV_LIST, "grant is a list") &&
	    ASSERT_EQ(kv->nlist, 1, "one grant"))
		ASSERT_STREQ(kv->list[0], "app_rw", "grant");
	kv = ag_kv_get(db->credential, db->ncredential, "ttl");
	if (ASSERT_OK_PTR(kv, "ttl") && ASSERT_OK(ag_parse_duration(kv->value, &ms), "ttl parses"))
		ASSERT_EQ(ms, 600000, "ttl 10m");
	kv = ag_kv_get(db->tls, db->ntls, "upstream");
	if (ASSERT_OK_PTR(kv, "tls upstream"))
		ASSERT_STREQ(kv->value, "verify-full", "tls upstream");
	ASSERT_TRUE(kube->kubernetes, "kube is kubernetes");
	ASSERT_EQ(kube->protocol, AG_PROTO_HTTP, "kube protocol");

	v4(a, "127.0.0.3");
	ASSERT_TRUE(ag_policy_target_by_addr(p, a, 6443) == kube, "kube by addr");

	r = &p->rules[0];
	ASSERT_STREQ(r->agent, "ci", "rule agent");
	ASSERT_STREQ(r->target, "orders-db", "rule target");
	if (ASSERT_EQ(r->nsql, 4, "sql rules")) {
		ASSERT_STREQ(r->sql[0].name, "no-drop", "first rule");
		ASSERT_EQ(r->sql[0].then, AG_ACT_DENY, "no-drop denies");
		ASSERT_EQ(r->sql[2].then, AG_ACT_APPROVE, "ddl approves");
		ASSERT_EQ(r->sql[3].then, AG_ACT_ALLOW, "reads allow");
		kv = ag_kv_get(r->sql[1].when, r->sql[1].nwhen, "where");
		if (ASSERT_OK_PTR(kv, "where"))
			ASSERT_STREQ(kv->value, "absent", "where absent");
	}
	kv = ag_kv_get(r->mask, r->nmask, "detectors");
	if (ASSERT_OK_PTR(kv, "detectors"))
		ASSERT_EQ(kv->nlist, 6, "six detectors");
	kv = ag_kv_get(r->mask, r->nmask, "style");
	if (ASSERT_OK_PTR(kv, "style"))
		ASSERT_STREQ(kv->value, "partial", "style");

	r = &p->rules[1];
	if (ASSERT_EQ(r->nhttp, 2, "http rules")) {
		kv = ag_kv_get(r->http[0].when, r->http[0].nwhen, "kubernetes");
		if (ASSERT_OK_PTR(kv, "kubernetes when") &&
		    ASSERT_EQ(kv->kind, AG_KV_MAP, "kubernetes is a mapping")) {
			kv = ag_kv_get(kv->map, kv->nmap, "subresource");
			if (ASSERT_OK_PTR(kv, "subresource") && ASSERT_EQ(kv->nlist, 3, "three"))
				ASSERT_STREQ(kv->list[0], "exec", "exec");
		}
	}
	kv = ag_kv_get(p->approvals, p->napprovals, "approvers");
	if (ASSERT_OK_PTR(kv, "approvers") && ASSERT_EQ(kv->nlist, 2, "two approvers"))
		ASSERT_STREQ(kv->list[1], "group:sre", "group approver");
out:
	ag_policy_free(p);
}

static void subtest_default(void)
{
	const struct ag_policy_agent *a;
	char err[512] = "";
	struct ag_policy *p;

	p = ag_policy_load("policies/default.yaml", err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "load")) {
		printf("error: %s\n", err);
		return;
	}
	a = ag_policy_agent_by_name(p, "ci");
	if (ASSERT_OK_PTR(a, "agent ci")) {
		ASSERT_STREQ(a->cgroup, "/agentgate.slice/agents", "cgroup");
		ASSERT_EQ(a->mode, AG_MODE_ENFORCE, "enforce");
	}
	ASSERT_EQ(p->default_action, AG_DEFAULT_DENY, "default deny");
	/* The policy a fresh `make run` uses must not reach any real host. */
	for (size_t i = 0; i < p->ntargets; i++) {
		const struct ag_policy_target *t = &p->targets[i];

		for (size_t j = 0; j < t->naddrs; j++) {
			static const uint8_t mapped[12] = { [10] = 0xff, [11] = 0xff };
			bool loop4 = !memcmp(t->addrs[j], mapped, 12) && t->addrs[j][12] == 127;
			uint8_t loop6[16];

			v6(loop6, "::1");
			ASSERT_TRUE(loop4 || !memcmp(t->addrs[j], loop6, 16), t->name);
		}
	}
	ag_policy_free(p);
}

/* The same policy written in flow and in block style renders the same. */
static void subtest_flow_and_block(void)
{
	static const char *const block =
		API "agents:\n  - name: ci\n    cgroup: agents.slice/ci/\n    mode: observe\n"
		    "targets:\n  - name: web\n    protocol: http\n    address: \"[::1]:8080\"\n"
		    "    kubernetes: true\n    tls:\n      client: terminate\n      upstream: off\n"
		    "rules:\n  - agent: \"*\"\n    target: web\n    http:\n      - name: no-exec\n"
		    "        when:\n          method: POST\n          kubernetes:\n"
		    "            subresource:\n              - exec\n        then: deny\n"
		    "approvals:\n  approvers:\n    - root\n  timeout: 90s\n"
		    "default: passthrough\ngateway:\n  fastpath: false\n";
	static const char *const flow =
		"{ apiVersion: agentgate/v1,\n"
		"  agents: [{ name: ci, cgroup: /agents.slice/ci, mode: observe }],\n"
		"  targets: [{ name: web, protocol: http, address: \"[::1]:8080\", kubernetes: "
		"true,\n"
		"              tls: { client: terminate, upstream: off } }],\n"
		"  rules: [{ agent: \"*\", target: web, http: [{ name: no-exec,\n"
		"     when: { method: [POST], kubernetes: { subresource: [exec] } }, then: deny }] "
		"}],\n"
		"  approvals: { approvers: [root], timeout: 90s },\n"
		"  default: passthrough, gateway: { fastpath: false } }\n";
	char err[512] = "", *jb = NULL, *jf = NULL;
	struct ag_policy *pb = NULL, *pf = NULL;
	size_t lb = 0, lf = 0;
	struct jsonw *w;
	FILE *f;

	pb = ag_policy_parse(block, strlen(block), "same.yaml", err, sizeof(err));
	if (!ASSERT_OK_PTR(pb, "block")) {
		printf("error: %s\n", err);
		goto out;
	}
	pf = ag_policy_parse(flow, strlen(flow), "same.yaml", err, sizeof(err));
	if (!ASSERT_OK_PTR(pf, "flow")) {
		printf("error: %s\n", err);
		goto out;
	}
	ASSERT_EQ(pb->agents[0].mode, AG_MODE_OBSERVE, "observe");
	ASSERT_STREQ(pb->agents[0].cgroup, "/agents.slice/ci", "cgroup normalized");
	ASSERT_EQ(pb->default_action, AG_DEFAULT_PASSTHROUGH, "passthrough");
	ASSERT_TRUE(pb->fastpath_set, "fastpath set");
	ASSERT_FALSE(pb->fastpath, "fastpath false");

	f = open_memstream(&jb, &lb);
	w = jsonw_new(f, false);
	ag_policy_to_json(pb, w);
	jsonw_destroy(&w);
	fclose(f);
	f = open_memstream(&jf, &lf);
	w = jsonw_new(f, false);
	ag_policy_to_json(pf, w);
	jsonw_destroy(&w);
	fclose(f);
	ASSERT_STREQ(jf, jb, "same JSON");
out:
	free(jb);
	free(jf);
	ag_policy_free(pb);
	ag_policy_free(pf);
}

static void subtest_defaults_and_normalizing(void)
{
	static const char *const yaml = API
		"agents:\n  - name: ci\n    cgroup: /a\n" PG_DB
		"rules:\n  - agent: ci\n    target: db\n    sql:\n"
		"      - { name: one, when: { command: SELECT, tables: orders }, then: allow }\n"
		"      - { name: rest, then: deny }\n"
		"    mask: { style: null }\n";
	const struct ag_policy_stmt_rule *r;
	const struct ag_kv *kv;
	char err[512] = "";
	struct ag_policy *p;

	p = parse_str(yaml, err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "parse")) {
		printf("error: %s\n", err);
		return;
	}
	ASSERT_EQ(p->agents[0].mode, AG_MODE_ENFORCE, "mode defaults to enforce");
	ASSERT_EQ(p->default_action, AG_DEFAULT_DENY, "default defaults to deny");
	ASSERT_FALSE(p->fastpath_set, "fastpath unset");
	ASSERT_FALSE(p->approvals, "no approvals");
	ASSERT_FALSE(p->targets[0].tls, "no tls");
	ASSERT_FALSE(p->targets[0].credential, "no credential");
	r = p->rules[0].sql;
	kv = ag_kv_get(r[0].when, r[0].nwhen, "command");
	if (ASSERT_OK_PTR(kv, "command") && ASSERT_EQ(kv->kind, AG_KV_LIST, "scalar made a list") &&
	    ASSERT_EQ(kv->nlist, 1, "one command"))
		ASSERT_STREQ(kv->list[0], "select", "lower-cased");
	kv = ag_kv_get(r[0].when, r[0].nwhen, "tables");
	if (ASSERT_OK_PTR(kv, "tables") && ASSERT_EQ(kv->nlist, 1, "one table"))
		ASSERT_STREQ(kv->list[0], "orders", "table");
	ASSERT_EQ(r[1].nwhen, 0, "catch-all has no when");
	ASSERT_EQ(r[1].line, 11, "rule line");
	kv = ag_kv_get(p->rules[0].mask, p->rules[0].nmask, "style");
	if (ASSERT_OK_PTR(kv, "style"))
		ASSERT_STREQ(kv->value, "null", "style null is a style, not YAML null");
	ag_policy_free(p);
}

static void subtest_missing_file(void)
{
	char err[512] = "";
	struct ag_policy *p;

	errno = 0;
	p = ag_policy_load("policies/does-not-exist.yaml", err, sizeof(err));
	ASSERT_FALSE(p, "refused");
	ASSERT_EQ(errno, ENOENT, "errno");
	ASSERT_HAS_SUBSTR(err, "policies/does-not-exist.yaml:", "names the file");
	ASSERT_HAS_SUBSTR(err, "No such file", "problem");
	ag_policy_free(p);

	p = ag_policy_load("policies", err, sizeof(err));
	ASSERT_FALSE(p, "a directory is refused");
	ASSERT_HAS_SUBSTR(err, "directory", "directory problem");
	ag_policy_free(p);
}

static int write_file_of_size(char *path, size_t size, const char *head)
{
	static const char line[] = "# padding padding padding padding padding padding padding\n";
	size_t n = strlen(head);
	int fd = mkstemp(path);
	FILE *f;

	if (fd < 0)
		return -errno;
	f = fdopen(fd, "w");
	if (!f) {
		close(fd);
		return -errno;
	}
	fputs(head, f);
	while (n + sizeof(line) - 1 <= size) {
		fputs(line, f);
		n += sizeof(line) - 1;
	}
	for (; n < size - 1; n++)
		fputc(' ', f);
	if (n < size)
		fputc('\n', f);
	return fclose(f) ? -errno : 0;
}

static void subtest_oversize_file(void)
{
	char path[] = "/tmp/agentgate-policy-XXXXXX";
	char err[512] = "";
	struct ag_policy *p;

	if (!ASSERT_OK(write_file_of_size(path, AG_POLICY_MAX_SIZE + 1, API AGENT_CI), "write"))
		return;
	errno = 0;
	p = ag_policy_load(path, err, sizeof(err));
	ASSERT_FALSE(p, "refused");
	ASSERT_EQ(errno, EFBIG, "errno");
	ASSERT_HAS_SUBSTR(err, path, "names the file");
	ASSERT_HAS_SUBSTR(err, "4 MiB", "problem");
	ag_policy_free(p);
	unlink(path);

	/* Exactly at the limit still loads. */
	strcpy(path, "/tmp/agentgate-policy-XXXXXX");
	if (!ASSERT_OK(write_file_of_size(path, AG_POLICY_MAX_SIZE, API AGENT_CI), "write max"))
		return;
	p = ag_policy_load(path, err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "4 MiB loads"))
		printf("error: %s\n", err);
	ag_policy_free(p);
	unlink(path);
}

static void subtest_alias_bomb(void)
{
	/* Shared nodes make a small file walk like a huge one; the walk is bounded. */
	size_t cap = 256 * 1024, n = 0;
	char *y = malloc(cap), err[512] = "";
	struct ag_policy *p;

	if (!ASSERT_OK_PTR(y, "malloc"))
		return;
	n += snprintf(y + n, cap - n,
		      API AGENT_CI PG_DB "rules:\n  - agent: ci\n    target: db\n    sql: &s\n"
					 "      - { name: r0, when: { command: &c [select");
	for (int i = 0; i < 1000; i++)
		n += snprintf(y + n, cap - n, ", select");
	n += snprintf(y + n, cap - n, "] }, then: deny }\n");
	for (int i = 1; i < 1000; i++)
		n += snprintf(y + n, cap - n,
			      "      - { name: r%d, when: { command: *c }, then: deny }\n", i);
	for (int i = 0; i < 1000; i++)
		n += snprintf(y + n, cap - n, "  - { agent: ci, target: db, sql: *s }\n");
	if (!ASSERT_LE(n, cap - 1, "fits"))
		goto out;
	p = ag_policy_parse(y, n, "bomb.yaml", err, sizeof(err));
	ASSERT_FALSE(p, "refused");
	ASSERT_HAS_SUBSTR(err, "too many nodes", "problem");
	ag_policy_free(p);
out:
	free(y);
}

void test_policy_parse(void)
{
	if (test__start_subtest("example"))
		subtest_example();
	if (test__start_subtest("default"))
		subtest_default();
	if (test__start_subtest("flow_and_block"))
		subtest_flow_and_block();
	if (test__start_subtest("defaults_and_normalizing"))
		subtest_defaults_and_normalizing();
	for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++)
		if (test__start_subtest(bad_cases[i].name))
			check_bad(&bad_cases[i]);
	if (test__start_subtest("oversize_file"))
		subtest_oversize_file();
	if (test__start_subtest("missing_file"))
		subtest_missing_file();
	if (test__start_subtest("alias_bomb"))
		subtest_alias_bomb();
	if (test__start_subtest("free_null"))
		ag_policy_free(NULL);
}

static void subtest_agent_by_cgroup(void)
{
	static const char *const yaml =
		API "agents:\n  - { name: outer, cgroup: /a }\n  - { name: inner, cgroup: /a/b }\n"
		    "  - { name: other, cgroup: /c.slice }\n";
	static const struct {
		const char *cgroup;
		const char *agent; /* NULL: none */
	} cases[] = {
		{ "/a", "outer" },
		{ "/a/x", "outer" },
		{ "/a/bc", "outer" },
		{ "/a/b", "inner" },
		{ "/a/b/c/d", "inner" },
		{ "a/b/c/", "inner" },
		{ "/c.slice/job", "other" },
		{ "/c", NULL },
		{ "/ab", NULL },
		{ "/", NULL },
		{ "/d", NULL },
	};
	const struct ag_policy_agent *a;
	char err[512] = "";
	struct ag_policy *p;

	p = parse_str(yaml, err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "parse")) {
		printf("error: %s\n", err);
		return;
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		a = ag_policy_agent_by_cgroup(p, cases[i].cgroup);
		if (cases[i].agent)
			ASSERT_STREQ(a ? a->name : NULL, cases[i].agent, cases[i].cgroup);
		else
			ASSERT_FALSE(a, cases[i].cgroup);
	}
	ASSERT_STREQ(ag_policy_agent_by_name(p, "inner")->cgroup, "/a/b", "by name");
	ASSERT_FALSE(ag_policy_agent_by_name(p, "nobody"), "unknown name");
	ag_policy_free(p);
}

static void subtest_target_by_addr(void)
{
	static const char *const yaml =
		API "targets:\n"
		    "  - { name: four, protocol: postgres, address: \"127.0.0.2:5432\" }\n"
		    "  - { name: six, protocol: postgres, address: \"[::1]:5432\" }\n"
		    "  - { name: mapped, protocol: http, address: \"[::ffff:127.0.0.5]:80\" }\n"
		    "  - { name: named, protocol: tcp, address: \"localhost:7000\" }\n";
	const struct ag_policy_target *t;
	char err[512] = "";
	struct ag_policy *p;
	uint8_t a[16];

	p = parse_str(yaml, err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "parse")) {
		printf("error: %s\n", err);
		return;
	}
	v4(a, "127.0.0.2");
	t = ag_policy_target_by_addr(p, a, 5432);
	ASSERT_STREQ(t ? t->name : NULL, "four", "IPv4 as mapped");
	ASSERT_FALSE(ag_policy_target_by_addr(p, a, 5433), "other port");
	v6(a, "::1");
	t = ag_policy_target_by_addr(p, a, 5432);
	ASSERT_STREQ(t ? t->name : NULL, "six", "IPv6");
	v6(a, "::ffff:127.0.0.5");
	t = ag_policy_target_by_addr(p, a, 80);
	ASSERT_STREQ(t ? t->name : NULL, "mapped", "written mapped, looked up mapped");
	v4(a, "127.0.0.5");
	t = ag_policy_target_by_addr(p, a, 80);
	ASSERT_STREQ(t ? t->name : NULL, "mapped", "written mapped, looked up as IPv4");
	v6(a, "::2");
	ASSERT_FALSE(ag_policy_target_by_addr(p, a, 5432), "other address");

	t = ag_policy_target_by_name(p, "named");
	if (ASSERT_OK_PTR(t, "named") && ASSERT_GE(t->naddrs, 1, "resolved")) {
		ASSERT_STREQ(t->host, "localhost", "host kept");
		ASSERT_EQ(t->port, 7000, "port");
		ASSERT_TRUE(ag_policy_target_by_addr(p, t->addrs[0], 7000) == t,
			    "by a resolved address");
	}
	ASSERT_FALSE(ag_policy_target_by_name(p, "nothing"), "unknown name");
	ag_policy_free(p);
}

void test_policy_lookup(void)
{
	if (test__start_subtest("agent_by_cgroup"))
		subtest_agent_by_cgroup();
	if (test__start_subtest("target_by_addr"))
		subtest_target_by_addr();
}

static const char *jstr(yajl_val v, const char **path)
{
	yajl_val s = yajl_tree_get(v, path, yajl_t_string);

	return s ? YAJL_GET_STRING(s) : NULL;
}

static const char *jval_str(yajl_val v)
{
	return YAJL_IS_STRING(v) ? YAJL_GET_STRING(v) : NULL;
}

static yajl_val jidx(yajl_val arr, size_t i)
{
	return YAJL_IS_ARRAY(arr) && i < YAJL_GET_ARRAY(arr)->len ? YAJL_GET_ARRAY(arr)->values[i]
								  : NULL;
}

void test_policy_json(void)
{
	static const char *const yaml = API
		"agents: [{ name: ci, cgroup: /agents.slice, mode: observe }]\n"
		"targets:\n  - name: db\n    protocol: postgres\n    address: \"127.0.0.2:5432\"\n"
		"    tls: { client: terminate, ca_file: /etc/ssl/ca.pem }\n"
		"    credential: { provider: pg-jit-role, admin_secret: /etc/agentgate/s,\n"
		"                  grant: [app_ro, app_rw], ttl: 10m }\n"
		"rules:\n  - agent: ci\n    target: db\n    sql:\n"
		"      - { name: no-unbounded, when: { command: [update], where: absent }, "
		"then: deny }\n"
		"    mask: { columns: [users.email], style: hash }\n"
		"approvals: { approvers: [root], timeout: 5m }\n"
		"default: deny\ngateway: { fastpath: true }\n";
	static const char *p_file[] = { "file", NULL }, *p_default[] = { "default", NULL },
			  *p_fast[] = { "gateway", "fastpath", NULL },
			  *p_agents[] = { "agents", NULL }, *p_targets[] = { "targets", NULL },
			  *p_rules[] = { "rules", NULL }, *p_name[] = { "name", NULL },
			  *p_cgroup[] = { "cgroup", NULL }, *p_mode[] = { "mode", NULL },
			  *p_proto[] = { "protocol", NULL }, *p_port[] = { "port", NULL },
			  *p_client[] = { "tls", "client", NULL },
			  *p_provider[] = { "credential", "provider", NULL },
			  *p_grant[] = { "credential", "grant", NULL },
			  *p_secret[] = { "credential", "admin_secret", NULL },
			  *p_sql[] = { "sql", NULL }, *p_where[] = { "when", "where", NULL },
			  *p_then[] = { "then", NULL }, *p_style[] = { "mask", "style", NULL },
			  *p_timeout[] = { "approvals", "timeout", NULL },
			  *p_addrs[] = { "addrs", NULL }, *p_kube[] = { "kubernetes", NULL };
	char err[512] = "", ebuf[256] = "", *json = NULL;
	yajl_val root = NULL, agent, target, rule, v;
	struct ag_policy *p;
	struct jsonw *w;
	size_t len = 0;
	FILE *f;

	p = parse_str(yaml, err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "parse")) {
		printf("error: %s\n", err);
		return;
	}
	f = open_memstream(&json, &len);
	if (!ASSERT_OK_PTR(f, "memstream"))
		goto out;
	w = jsonw_new(f, true);
	ag_policy_to_json(p, w);
	jsonw_destroy(&w);
	fclose(f);
	if (test__verbose())
		printf("%s", json);

	root = yajl_tree_parse(json, ebuf, sizeof(ebuf));
	if (!ASSERT_OK_PTR(root, "JSON parses")) {
		printf("yajl: %s\n%s\n", ebuf, json);
		goto out;
	}
	ASSERT_STREQ(jstr(root, p_file), "test.yaml", "file");
	ASSERT_STREQ(jstr(root, p_default), "deny", "default");
	ASSERT_TRUE(YAJL_IS_TRUE(yajl_tree_get(root, p_fast, yajl_t_true)), "fastpath");

	agent = jidx(yajl_tree_get(root, p_agents, yajl_t_array), 0);
	ASSERT_STREQ(jstr(agent, p_name), "ci", "agent name");
	ASSERT_STREQ(jstr(agent, p_cgroup), "/agents.slice", "agent cgroup");
	ASSERT_STREQ(jstr(agent, p_mode), "observe", "agent mode");

	target = jidx(yajl_tree_get(root, p_targets, yajl_t_array), 0);
	ASSERT_STREQ(jstr(target, p_name), "db", "target name");
	ASSERT_STREQ(jstr(target, p_proto), "postgres", "protocol");
	v = yajl_tree_get(target, p_port, yajl_t_number);
	ASSERT_TRUE(v && YAJL_IS_INTEGER(v) && YAJL_GET_INTEGER(v) == 5432, "port");
	ASSERT_TRUE(YAJL_IS_FALSE(yajl_tree_get(target, p_kube, yajl_t_false)), "kubernetes");
	ASSERT_STREQ(jval_str(jidx(yajl_tree_get(target, p_addrs, yajl_t_array), 0)), "127.0.0.2",
		     "resolved address");
	ASSERT_STREQ(jstr(target, p_client), "terminate", "tls client");
	ASSERT_STREQ(jstr(target, p_provider), "pg-jit-role", "provider");
	ASSERT_STREQ(jstr(target, p_secret), "/etc/agentgate/s", "secret path, not contents");
	v = yajl_tree_get(target, p_grant, yajl_t_array);
	ASSERT_STREQ(jval_str(jidx(v, 1)), "app_rw", "grant list");

	rule = jidx(yajl_tree_get(root, p_rules, yajl_t_array), 0);
	v = jidx(yajl_tree_get(rule, p_sql, yajl_t_array), 0);
	ASSERT_STREQ(jstr(v, p_name), "no-unbounded", "sql rule name");
	ASSERT_STREQ(jstr(v, p_where), "absent", "when.where");
	ASSERT_STREQ(jstr(v, p_then), "deny", "then");
	ASSERT_STREQ(jstr(rule, p_style), "hash", "mask style");
	ASSERT_STREQ(jstr(root, p_timeout), "5m", "approvals timeout");
out:
	yajl_tree_free(root);
	free(json);
	ag_policy_free(p);
}

void test_policy_helpers(void)
{
	static const struct {
		const char *s;
		int ret;
		uint64_t ms;
	} durations[] = {
		{ "30s", 0, 30000 },  { "10m", 0, 600000 },
		{ "1h", 0, 3600000 }, { "1h30m", 0, 5400000 },
		{ "500ms", 0, 500 },  { "2d", 0, 172800000 },
		{ "10", -EINVAL },    { "", -EINVAL },
		{ "m", -EINVAL },     { "5x", -EINVAL },
		{ "0s", -EINVAL },    { "-5s", -EINVAL },
		{ "1.5h", -EINVAL },  { "99999999999999999s", -ERANGE },
	};

	if (test__start_subtest("duration")) {
		for (size_t i = 0; i < sizeof(durations) / sizeof(durations[0]); i++) {
			uint64_t ms = 0;

			ASSERT_EQ(ag_parse_duration(durations[i].s, &ms), durations[i].ret,
				  durations[i].s);
			if (!durations[i].ret)
				ASSERT_EQ(ms, durations[i].ms, durations[i].s);
		}
	}
	if (test__start_subtest("names")) {
		ASSERT_STREQ(ag_proto_name(AG_PROTO_POSTGRES), "postgres", "postgres");
		ASSERT_STREQ(ag_proto_name(AG_PROTO_HTTP), "http", "http");
		ASSERT_STREQ(ag_proto_name(AG_PROTO_TCP), "tcp", "tcp");
		ASSERT_STREQ(ag_action_name(AG_ACT_APPROVE), "approve", "approve");
		ASSERT_STREQ(ag_action_name(AG_ACT_OBSERVE), "observe", "observe");
		ASSERT_STREQ(ag_mode_name(AG_MODE_OBSERVE), "observe", "mode");
		ASSERT_STREQ(ag_default_action_name(AG_DEFAULT_PASSTHROUGH), "passthrough",
			     "default");
	}
}
