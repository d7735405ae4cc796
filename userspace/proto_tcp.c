// SPDX-License-Identifier: GPL-2.0
/* protocol: tcp — a plain relay: every byte passed on as it came, FINs passed on as well. */
#include <errno.h>
#include "proto.h"
#include "proto_http.h"
#include "proto_pg.h"
#include "session.h"

static long tcp_input(struct ag_session *s, enum ag_side from, const uint8_t *data, size_t len)
{
	enum ag_side to = from == AG_SIDE_AGENT ? AG_SIDE_UPSTREAM : AG_SIDE_AGENT;
	int rc = ag_session_send(s, to, data, len);

	if (rc) {
		ag_session_fail(s, true, "relay to %s: %s", to == AG_SIDE_AGENT ? "agent" : "upstream",
				rc == -EPIPE ? "peer closed" : "write failed");
		return -1;
	}
	return len;
}

const struct ag_proto_ops ag_proto_tcp = {
	.name = "tcp",
	.raw = true,
	.input = tcp_input,
};

const struct ag_proto_ops *ag_proto_lookup(enum ag_proto p)
{
	switch (p) {
	case AG_PROTO_TCP:
		return &ag_proto_tcp;
	case AG_PROTO_POSTGRES:
		return &ag_proto_pg;
	case AG_PROTO_HTTP:
		return &ag_proto_http;
	default:
		return NULL;
	}
}
