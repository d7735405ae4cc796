// SPDX-License-Identifier: GPL-2.0
/* HTTP and Kubernetes request rules (httprule.h): first match wins, default deny. */
#include <fnmatch.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "httprule.h"
#include "k8s.h"
#include "sql.h"

const struct ag_policy_rule *ag_http_rule_for(const struct ag_policy *p, const char *agent,
					      const char *target)
{
	return ag_sql_rule_for(p, agent, target);
}

bool ag_http_header(const struct ag_http_hdr *hdrs, size_t n, const char *name, const char **val,
		    size_t *vlen)
{
	size_t len = strlen(name);

	for (size_t i = 0; i < n; i++)
		if (hdrs[i].nlen == len && !strncasecmp(hdrs[i].name, name, len)) {
			if (val)
				*val = hdrs[i].val;
			if (vlen)
				*vlen = hdrs[i].vlen;
			return true;
		}
	return false;
}

static void kv_items(const struct ag_kv *kv, char *const **items, size_t *n)
{
	static char *none;

	if (kv->value) {
		*items = &kv->value;
		*n = 1;
	} else if (kv->list) {
		*items = kv->list;
		*n = kv->nlist;
	} else {
		*items = &none;
		*n = 0;
	}
}

/* Does any glob of kv match s? */
static bool any_glob(const struct ag_kv *kv, const char *s, int flags)
{
	char *const *items;
	size_t n;

	kv_items(kv, &items, &n);
	for (size_t i = 0; i < n; i++)
		if (!fnmatch(items[i], s, flags))
			return true;
	return false;
}

/* Does kv list s literally (no glob standing in for it)? */
static bool names(const struct ag_kv *kv, const char *s)
{
	char *const *items;
	size_t n;

	if (!kv)
		return false;
	kv_items(kv, &items, &n);
	for (size_t i = 0; i < n; i++)
		if (!strcmp(items[i], s))
			return true;
	return false;
}

static bool kv_true(const struct ag_kv *kv)
{
	return kv && kv->value && !strcasecmp(kv->value, "true");
}

static bool header_matches(const struct ag_http_req *r, const struct ag_kv *want)
{
	for (size_t i = 0; i < r->nhdrs; i++) {
		char val[1024];
		const struct ag_http_hdr *h = &r->hdrs[i];

		if (h->nlen != strlen(want->key) || strncasecmp(h->name, want->key, h->nlen))
			continue;
		if (h->vlen >= sizeof(val))
			continue;
		if (h->vlen)
			memcpy(val, h->val, h->vlen);
		val[h->vlen] = '\0';
		if (any_glob(want, val, 0))
			return true;
	}
	return false;
}

static bool k8s_matches(const struct ag_http_req *r, const struct ag_kv *k, size_t nk)
{
	const struct ag_k8s_req *q = r->k8s;

	if (!q)
		return false;
	for (size_t i = 0; i < nk; i++) {
		const struct ag_kv *kv = &k[i];
		const char *field = NULL;

		if (!strcmp(kv->key, "impersonate")) {
			if (kv_true(kv) != r->impersonate)
				return false;
			continue;
		}
		if (!strcmp(kv->key, "verb")) {
			/* connect: any stream to a pod or node (exec, attach, portforward, proxy) */
			if (q->connect && names(kv, "connect"))
				continue;
			field = q->verb;
		} else if (!q->resource_request) {
			return false;
		} else if (!strcmp(kv->key, "group")) {
			field = q->group;
		} else if (!strcmp(kv->key, "version")) {
			field = q->version;
		} else if (!strcmp(kv->key, "resource")) {
			char rs[200];

			/*
			 * As in RBAC: "pods" is the resource without subresources; pods/log must
			 * be named, as pods/log or a glob that matches it, unless the rule says
			 * subresource: (which then decides the subresource).
			 */
			if (q->subresource[0] && !ag_kv_get(k, nk, "subresource")) {
				snprintf(rs, sizeof(rs), "%s/%s", q->resource, q->subresource);
				if (!any_glob(kv, rs, 0))
					return false;
				continue;
			}
			field = q->resource;
		} else if (!strcmp(kv->key, "subresource")) {
			field = q->subresource;
		} else if (!strcmp(kv->key, "namespace")) {
			field = q->ns;
		} else if (!strcmp(kv->key, "name")) {
			field = q->name;
		} else {
			return false;
		}
		if (!any_glob(kv, field, 0))
			return false;
	}
	return true;
}

static bool when_matches(const struct ag_http_req *r, const struct ag_kv *w, size_t nw)
{
	for (size_t i = 0; i < nw; i++) {
		const struct ag_kv *kv = &w[i];

		if (!strcmp(kv->key, "method")) {
			if (!any_glob(kv, r->method, FNM_CASEFOLD))
				return false;
		} else if (!strcmp(kv->key, "host")) {
			char h[256];
			const char *colon;

			snprintf(h, sizeof(h), "%s", r->host);
			colon = strrchr(h, ':');
			if (colon && !strchr(colon, ']'))
				h[colon - h] = '\0';
			if (!any_glob(kv, r->host, FNM_CASEFOLD) && !any_glob(kv, h, FNM_CASEFOLD))
				return false;
		} else if (!strcmp(kv->key, "path")) {
			if (!any_glob(kv, r->path, 0))
				return false;
		} else if (!strcmp(kv->key, "headers")) {
			for (size_t j = 0; j < kv->nmap; j++)
				if (!header_matches(r, &kv->map[j]))
					return false;
		} else if (!strcmp(kv->key, "upgrade")) {
			if (kv_true(kv) != r->upgrade)
				return false;
		} else if (!strcmp(kv->key, "kubernetes")) {
			if (!k8s_matches(r, kv->map, kv->nmap))
				return false;
		} else {
			return false; /* a key this build does not know: never matches */
		}
	}
	return true;
}

/*
 * For an allow or observe rule: does it name every sensitive part of the request? Returns
 * NULL when it does, else what it leaves unnamed.
 */
static const char *unnamed(const struct ag_http_req *r, const struct ag_kv *w, size_t nw)
{
	const struct ag_kv *k = ag_kv_get(w, nw, "kubernetes");
	const struct ag_kv *res = k ? ag_kv_get(k->map, k->nmap, "resource") : NULL;
	const struct ag_kv *sub = k ? ag_kv_get(k->map, k->nmap, "subresource") : NULL;
	const struct ag_kv *verb = k ? ag_kv_get(k->map, k->nmap, "verb") : NULL;
	const struct ag_kv *hdrs = ag_kv_get(w, nw, "headers");
	const struct ag_k8s_req *q = r->k8s;

	if (r->impersonate) {
		bool named = k && kv_true(ag_kv_get(k->map, k->nmap, "impersonate"));

		for (size_t i = 0; !named && hdrs && i < hdrs->nmap; i++)
			named = !strncasecmp(hdrs->map[i].key, "impersonate-", 12);
		if (!named)
			return "impersonation (Impersonate-* headers)";
	}
	if (q && q->resource_request) {
		char rs[200];

		snprintf(rs, sizeof(rs), "%s/%s", q->resource, q->subresource);
		if (!strcmp(q->resource, "secrets") && !names(res, "secrets") && !names(res, rs))
			return "secrets";
		if (!strcmp(q->resource, "nodes") && !strcmp(q->subresource, "proxy") &&
		    !names(res, "nodes/proxy") && !(names(res, "nodes") && names(sub, "proxy")))
			return "nodes/proxy";
		if (q->connect && q->subresource[0] && !names(sub, q->subresource) &&
		    !names(res, rs) && !names(verb, "connect"))
			return q->subresource;
		if (q->connect && !q->subresource[0] && !names(verb, "proxy") &&
		    !names(verb, "connect"))
			return "proxy";
		if (q->connect)
			return NULL; /* a named connect subresource is an upgrade allowed */
	}
	if (r->upgrade && !kv_true(ag_kv_get(w, nw, "upgrade")))
		return "a connection upgrade";
	return NULL;
}

/*
 * d->why = "rule NAME (line N) matches", as snprintf() would write it (cut to fit), without
 * printf: once per request.
 */
static void why_matches(struct ag_http_decision *d, const char *name, int line)
{
	char num[16], *w = d->why, *end = d->why + sizeof(d->why) - 1;
	const char *parts[4] = { "rule ", name, " (line ", NULL };
	size_t i = sizeof(num);
	unsigned int v = line < 0 ? -(unsigned int)line : (unsigned int)line;

	num[--i] = '\0';
	do {
		num[--i] = '0' + v % 10;
		v /= 10;
	} while (v);
	if (line < 0)
		num[--i] = '-';
	parts[3] = num + i;
	for (int k = 0; k < 5; k++) {
		const char *p = k < 4 ? parts[k] : ") matches";

		while (*p && w < end)
			*w++ = *p++;
	}
	*w = '\0';
}

void ag_http_decide(const struct ag_policy_rule *rule, const struct ag_http_req *r,
		    struct ag_http_decision *d)
{
	const char *skipped = NULL, *skipped_rule = NULL;

	memset(d, 0, sizeof(*d));
	d->action = AG_ACT_DENY;
	for (size_t i = 0; rule && i < rule->nhttp; i++) {
		const struct ag_policy_stmt_rule *h = &rule->http[i];
		const char *miss;

		if (!when_matches(r, h->when, h->nwhen))
			continue;
		if (h->then == AG_ACT_ALLOW || h->then == AG_ACT_OBSERVE) {
			miss = unnamed(r, h->when, h->nwhen);
			if (miss) {
				if (!skipped) {
					skipped = miss;
					skipped_rule = h->name;
				}
				continue;
			}
		}
		d->action = h->then;
		d->rule = h->name;
		why_matches(d, h->name, h->line);
		return;
	}
	if (skipped)
		snprintf(d->why, sizeof(d->why),
			 "no rule matches: rule %s does not name %s, which must be allowed "
			 "explicitly (default deny)",
			 skipped_rule, skipped);
	else
		snprintf(d->why, sizeof(d->why), "no http rule matches (default deny)");
}
