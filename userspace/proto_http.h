/* SPDX-License-Identifier: GPL-2.0 */
/* protocol: http (and Kubernetes API semantics for kubernetes: true targets). */
#pragma once

#include <stdbool.h>

#include "proto.h"

extern const struct ag_proto_ops ag_proto_http;

struct ag_session;

/*
 * The approval of a request held by http_approval_hold() came back; call it on the session's
 * worker loop. approved: the request goes upstream as it is; else it is answered 403 with msg
 * ("agentgate: …", naming the approver and reason). A no-op when nothing is held.
 */
void ag_http_approval_done(struct ag_session *s, bool approved, const char *msg);
