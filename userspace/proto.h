/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The protocol handler interface. The session layer owns sockets, buffers and backpressure; a
 * handler sees the bytes each side sent, decides, and forwards (possibly rewritten) bytes with
 * ag_session_send(). A new protocol is a new proto_<name>.c and a row in ag_proto_lookup().
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "policy.h"

struct ag_session;

enum ag_side { AG_SIDE_AGENT = 0, AG_SIDE_UPSTREAM = 1 };

struct ag_proto_ops {
	const char *name;
	/*
	 * Bytes pass unchanged both ways once the upstream is connected: the session layer then
	 * moves them socket → pipe → socket with splice(2), never through userspace, and input()
	 * only sees what arrived before the upstream was up.
	 */
	bool raw;
	/* The session was accepted and its target decided; 0 or -errno (refuses the session). */
	int (*init)(struct ag_session *s);
	/*
	 * `len` bytes arrived from `from`. Returns how many were consumed; the rest is kept and
	 * presented again, with more, on the next call (a partial message). Negative: end the
	 * session (the handler has said why through ag_session_fail()).
	 */
	long (*input)(struct ag_session *s, enum ag_side from, const uint8_t *data, size_t len);
	/* `from` finished sending (FIN). NULL: half-close is passed on to the other side. */
	void (*eof)(struct ag_session *s, enum ag_side from);
	void (*fini)(struct ag_session *s);
	/*
	 * A TLS handshake that ag_session_start_tls() began on `side` ended: err NULL (up), or why
	 * it failed ("certificate verify failed: hostname mismatch"); after a failure
	 * the session ends when this returns (the handler may tell the agent first). Optional.
	 */
	void (*tls_done)(struct ag_session *s, enum ag_side side, const char *err);
};

/* The handler for a target protocol, or NULL when this build has none for it. */
const struct ag_proto_ops *ag_proto_lookup(enum ag_proto p);

extern const struct ag_proto_ops ag_proto_tcp;
