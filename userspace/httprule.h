/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Deciding an HTTP request against a rule's http: list (first match wins; no match: deny).
 * Shared by the daemon's http handler and `agctl policy explain --http`.
 *
 * Some requests are their own rule targets: a Kubernetes secret, nodes/proxy, a connect-style
 * subresource (exec, attach, portforward, proxy), a request carrying Impersonate-* headers, and
 * any connection upgrade. A rule that allows or observes one of them must name it literally
 * (resource: [secrets], subresource: [exec], resource: [nodes/proxy], impersonate: true,
 * upgrade: true); a broader rule (no resource, a glob) does not cover them. Deny and approve
 * rules match them as written.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "policy.h"

struct ag_k8s_req;

struct ag_http_hdr {
	const char *name;
	size_t nlen;
	const char *val;
	size_t vlen;
};

struct ag_http_req {
	const char *method;
	const char *host; /* the Host header ("" when none) */
	const char *path; /* without the query */
	const struct ag_http_hdr *hdrs;
	size_t nhdrs;
	bool upgrade;		      /* Upgrade requested, or CONNECT */
	bool impersonate;	      /* an Impersonate-* header */
	const struct ag_k8s_req *k8s; /* NULL: the target is not kubernetes */
};

struct ag_http_decision {
	enum ag_action action;
	const char *rule; /* NULL: no rule matched (default deny) */
	char why[192];
};

/* The rule of an agent and target (the first of the policy's rules naming both, or "*"). */
const struct ag_policy_rule *ag_http_rule_for(const struct ag_policy *p, const char *agent,
					      const char *target);
void ag_http_decide(const struct ag_policy_rule *rule, const struct ag_http_req *r,
		    struct ag_http_decision *d);
/* Is header `name` (case-insensitive) among hdrs? Its first value in *val. */
bool ag_http_header(const struct ag_http_hdr *hdrs, size_t n, const char *name, const char **val,
		    size_t *vlen);
