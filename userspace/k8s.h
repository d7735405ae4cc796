/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Kubernetes API requests understood as the API server understands them (RequestInfoFactory in
 * k8s.io/apiserver): verb, API group and version, resource, subresource, namespace and name, for
 * the core group (/api/v1/...) and named groups (/apis/GROUP/VERSION/...), namespaced and
 * cluster scoped, the legacy /watch/ and /proxy/ prefixes and ?watch=true. Connect-style
 * subresources (exec, attach, portforward, proxy) are flagged whatever the method.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

struct ag_k8s_req {
	bool resource_request; /* false: discovery, /version, /healthz, ... */
	bool connect;	       /* exec, attach, portforward or proxy: a stream to a pod or node */
	char verb[24];	/* get list watch create update patch delete deletecollection proxy */
	char group[96]; /* "" for the core group */
	char version[32];
	char resource[96];
	char subresource[64];
	char ns[96];
	char name[256];
	char path[512]; /* the path without the query, percent-decoding untouched */
};

/*
 * Fills r from a request's method and target (origin-form "/api/v1/...?watch=true"). A
 * non-resource request gets the lower-case method as its verb. 0, or -EINVAL when the target is
 * not a path (r is still filled as a non-resource request).
 */
int ag_k8s_parse(const char *method, const char *target, size_t len, struct ag_k8s_req *r);
