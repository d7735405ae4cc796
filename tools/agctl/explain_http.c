// SPDX-License-Identifier: GPL-2.0
/*
 * agctl policy explain FILE --agent A --target T --http "METHOD PATH [Header: value]...": the
 * daemon's http decision on one request, locally: the Kubernetes attributes the request has
 * (for a kubernetes: true target), the rule that decides, and why.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "explain_http.h"
#include "httprule.h"
#include "jsonw.h"
#include "k8s.h"
#include "main.h"

int agctl_explain_http(const struct ag_policy *p, const char *agent,
		       const struct ag_policy_target *t, enum ag_agent_mode mode, const char *http)
{
	char method[32], *rest, *target, *sp, *copy = strdup(http);
	struct ag_http_hdr hdrs[32];
	struct ag_http_decision d;
	struct ag_http_req r = { 0 };
	struct ag_k8s_req k;
	size_t nh = 0;
	char path[2048];

	if (!copy) {
		p_err("%s", strerror(ENOMEM));
		return -1;
	}
	sp = strchr(copy, ' ');
	if (!sp || sp - copy >= (long)sizeof(method)) {
		p_err("--http needs \"METHOD PATH\" (e.g. \"GET "
		      "/api/v1/namespaces/default/pods\")");
		free(copy);
		return -1;
	}
	memcpy(method, copy, sp - copy);
	method[sp - copy] = '\0';
	target = sp + 1;
	rest = strchr(target, ' ');
	if (rest)
		*rest++ = '\0';
	/* optional headers after the path: "Name: value" separated by ';' */
	while (rest && *rest && nh < 32) {
		char *semi = strchr(rest, ';'), *colon = strchr(rest, ':');

		if (semi)
			*semi = '\0';
		if (colon) {
			*colon = '\0';
			hdrs[nh++] = (struct ag_http_hdr){ .name = rest,
							   .nlen = strlen(rest),
							   .val = colon + 1 + (colon[1] == ' '),
							   .vlen = strlen(colon + 1 +
									  (colon[1] == ' ')) };
		}
		rest = semi ? semi + 1 : NULL;
		while (rest && *rest == ' ')
			rest++;
	}
	snprintf(path, sizeof(path), "%.*s", (int)strcspn(target, "?"), target);
	r.method = method;
	r.path = path;
	r.hdrs = hdrs;
	r.nhdrs = nh;
	ag_http_header(hdrs, nh, "host", &r.host, NULL);
	if (!r.host)
		r.host = "";
	r.upgrade = ag_http_header(hdrs, nh, "upgrade", NULL, NULL) || !strcmp(method, "CONNECT");
	for (size_t i = 0; i < nh; i++)
		if (!strncasecmp(hdrs[i].name, "impersonate-", 12))
			r.impersonate = true;
	if (t->kubernetes) {
		ag_k8s_parse(method, target, strlen(target), &k);
		r.k8s = &k;
	}
	ag_http_decide(ag_http_rule_for(p, agent, t->name), &r, &d);
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "agent", agent);
		jsonw_string_field(json_wtr, "target", t->name);
		jsonw_string_field(json_wtr, "mode", ag_mode_name(mode));
		jsonw_string_field(json_wtr, "method", method);
		jsonw_string_field(json_wtr, "path", path);
		if (r.k8s) {
			jsonw_name(json_wtr, "kubernetes");
			jsonw_start_object(json_wtr);
			jsonw_bool_field(json_wtr, "resource_request", k.resource_request);
			jsonw_string_field(json_wtr, "verb", k.verb);
			jsonw_string_field(json_wtr, "group", k.group);
			jsonw_string_field(json_wtr, "version", k.version);
			jsonw_string_field(json_wtr, "resource", k.resource);
			jsonw_string_field(json_wtr, "subresource", k.subresource);
			jsonw_string_field(json_wtr, "namespace", k.ns);
			jsonw_string_field(json_wtr, "name", k.name);
			jsonw_bool_field(json_wtr, "connect", k.connect);
			jsonw_end_object(json_wtr);
		}
		jsonw_string_field(json_wtr, "decision", ag_action_name(d.action));
		if (d.rule)
			jsonw_string_field(json_wtr, "rule", d.rule);
		else
			jsonw_null_field(json_wtr, "rule");
		jsonw_string_field(json_wtr, "why", d.why);
		jsonw_end_object(json_wtr);
	} else {
		printf("agent %s (%s), target %s: %s %s\n", agent, ag_mode_name(mode), t->name,
		       method, path);
		if (r.k8s && k.resource_request)
			printf("  kubernetes: verb %s, group \"%s\", version %s, resource %s%s%s, "
			       "namespace \"%s\", name \"%s\"%s\n",
			       k.verb, k.group, k.version, k.resource, k.subresource[0] ? "/" : "",
			       k.subresource, k.ns, k.name, k.connect ? " (connect)" : "");
		else if (r.k8s)
			printf("  kubernetes: non-resource request, verb %s\n", k.verb);
		printf("  decision: %s by rule %s: %s\n", ag_action_name(d.action),
		       d.rule ? d.rule : "default", d.why);
	}
	free(copy);
	return 0;
}
