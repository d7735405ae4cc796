// SPDX-License-Identifier: GPL-2.0
/*
 * Kubernetes request attributes, following k8s.io/apiserver/pkg/endpoints/request/requestinfo.go
 * (RequestInfoFactory.NewRequestInfo) step by step, so that a rule written against RBAC verbs and
 * resources means here what it means to the API server.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "k8s.h"

#define K8S_MAX_PARTS 16

static void copy(char *dst, size_t n, const char *src, size_t len)
{
	if (len >= n)
		len = n - 1;
	memcpy(dst, src, len);
	dst[len] = '\0';
}

/* The value of query parameter `key` (not decoded), or NULL. */
static const char *query_param(const char *q, size_t qlen, const char *key, size_t *vlen)
{
	size_t klen = strlen(key);
	const char *end = q + qlen;

	while (q < end) {
		const char *amp = memchr(q, '&', end - q);
		const char *pe = amp ? amp : end;

		if ((size_t)(pe - q) > klen && !memcmp(q, key, klen) && q[klen] == '=') {
			*vlen = pe - q - klen - 1;
			return q + klen + 1;
		}
		if ((size_t)(pe - q) == klen && !memcmp(q, key, klen)) {
			*vlen = 0;
			return pe;
		}
		q = pe + 1;
	}
	return NULL;
}

/* strconv.ParseBool, as the API server's query decoding uses it. */
static bool parse_bool(const char *v, size_t n)
{
	static const char *const yes[] = { "1", "t", "T", "true", "TRUE", "True" };

	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
		if (strlen(yes[i]) == n && !memcmp(v, yes[i], n))
			return true;
	return false;
}

static const char *method_verb(const char *m)
{
	if (!strcmp(m, "POST"))
		return "create";
	if (!strcmp(m, "GET") || !strcmp(m, "HEAD"))
		return "get";
	if (!strcmp(m, "PUT"))
		return "update";
	if (!strcmp(m, "PATCH"))
		return "patch";
	if (!strcmp(m, "DELETE"))
		return "delete";
	return "";
}

int ag_k8s_parse(const char *method, const char *target, size_t len, struct ag_k8s_req *r)
{
	const char *parts[K8S_MAX_PARTS], *q = memchr(target, '?', len), *v;
	size_t plen[K8S_MAX_PARTS], n = 0, i = 0, pathlen = q ? (size_t)(q - target) : len, vlen;
	const char *p = target, *end = target + pathlen;

	memset(r, 0, sizeof(*r));
	copy(r->path, sizeof(r->path), target, pathlen);
	for (size_t k = 0; method[k] && k + 1 < sizeof(r->verb); k++)
		r->verb[k] = tolower((unsigned char)method[k]);
	if (!len || target[0] != '/')
		return -EINVAL;
	/* strings.Split(strings.Trim(path, "/"), "/") */
	while (p < end && *p == '/')
		p++;
	while (end > p && end[-1] == '/')
		end--;
	while (p < end) {
		const char *s = memchr(p, '/', end - p);
		const char *e = s ? s : end;

		if (n == K8S_MAX_PARTS)
			break;
		parts[n] = p;
		plen[n++] = e - p;
		p = s ? s + 1 : end;
	}
#define IS(k, lit) (plen[k] == sizeof(lit) - 1 && !memcmp(parts[k], lit, sizeof(lit) - 1))
	/* fewer than 3 parts (/api/v1), or 4 for a named group: discovery, not a resource */
	if (n < 3 || !(IS(0, "api") || IS(0, "apis")))
		return 0;
	if (IS(0, "api")) {
		copy(r->version, sizeof(r->version), parts[1], plen[1]);
		i = 2;
	} else {
		if (n < 4)
			return 0;
		copy(r->group, sizeof(r->group), parts[1], plen[1]);
		copy(r->version, sizeof(r->version), parts[2], plen[2]);
		i = 3;
	}
	r->resource_request = true;
	snprintf(r->verb, sizeof(r->verb), "%s", method_verb(method));
	/* /watch/... and /proxy/...: the verb is in the path */
	if (i < n && (IS(i, "watch") || IS(i, "proxy"))) {
		if (n - i < 2) {
			r->resource_request = false;
			return 0;
		}
		copy(r->verb, sizeof(r->verb), parts[i], plen[i]);
		i++;
	}
	if (i < n && IS(i, "namespaces")) {
		if (n - i > 1) {
			copy(r->ns, sizeof(r->ns), parts[i + 1], plen[i + 1]);
			/* namespaces/NAME/status and /finalize are subresources of the namespace */
			if (n - i > 2 && !IS(i + 2, "status") && !IS(i + 2, "finalize"))
				i += 2;
		}
	}
	/* resource/name/subresource/... */
	if (n - i >= 3 && strcmp(r->verb, "proxy"))
		copy(r->subresource, sizeof(r->subresource), parts[i + 2], plen[i + 2]);
	if (n - i >= 2)
		copy(r->name, sizeof(r->name), parts[i + 1], plen[i + 1]);
	if (n - i >= 1)
		copy(r->resource, sizeof(r->resource), parts[i], plen[i]);
#undef IS
	if (!r->name[0] && !strcmp(r->verb, "get")) {
		v = q ? query_param(q + 1, len - pathlen - 1, "watch", &vlen) : NULL;
		snprintf(r->verb, sizeof(r->verb), "%s",
			 v && parse_bool(v, vlen) ? "watch" : "list");
		/* fieldSelector=metadata.name=X names the object (metadata.name%3DX encoded) */
		v = q ? query_param(q + 1, len - pathlen - 1, "fieldSelector", &vlen) : NULL;
		if (v && vlen > 16 && !strncmp(v, "metadata.name%3D", 16) && !memchr(v, ',', vlen))
			copy(r->name, sizeof(r->name), v + 16, vlen - 16);
		else if (v && vlen > 14 && !strncmp(v, "metadata.name=", 14) &&
			 !memchr(v, ',', vlen))
			copy(r->name, sizeof(r->name), v + 14, vlen - 14);
	}
	if (!r->name[0] && !strcmp(r->verb, "delete"))
		snprintf(r->verb, sizeof(r->verb), "deletecollection");
	r->connect = !strcmp(r->verb, "proxy") || !strcmp(r->subresource, "exec") ||
		     !strcmp(r->subresource, "attach") || !strcmp(r->subresource, "portforward") ||
		     !strcmp(r->subresource, "proxy");
	return 0;
}
