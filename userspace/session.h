/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A session: one agent connection, its upstream, the protocol handler between them, and what
 * the kernel told us about the caller. Owned by one worker thread; the daemon's table links it so
 * agctl can list it (fields read from other threads are written once or are counters).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "agentgate.h"
#include "buf.h"
#include "loop.h"
#include "proto.h"

struct ag_worker;
struct ag_policy_ref;
struct ssl_st;

/* A side's TLS, driven by the session layer (ag_session_start_tls()). */
enum ag_tls_phase {
	AG_TLS_NONE = 0,  /* clear */
	AG_TLS_HOLD,	  /* reads in clear; writes past clear_out wait for the handshake */
	AG_TLS_HANDSHAKE, /* in progress, non-blocking (tls_want) */
	AG_TLS_UP,	  /* SSL_read/SSL_write; no splice */
};
struct ag_cred;
struct ag_audit_sess;
struct ag_krelay;

enum ag_session_state {
	AG_SESS_CONNECTING = 0,
	AG_SESS_ACTIVE,
	AG_SESS_CLOSING,
	AG_SESS_CLOSED,
	AG_SESS_DENIED,
};

struct ag_side_conn {
	struct ag_io io;
	struct ag_buf in;  /* received, not yet consumed by the handler */
	struct ag_buf out; /* to be written to this side */
	bool rd_eof;	   /* this side sent FIN */
	bool shut_pending; /* shut our write half once out drains */
	bool wr_shut;
	bool paused;	   /* reading stopped: the other side's out is over the watermark */
	size_t hold;	   /* set by the handler: it waits for a message this long; keep reading */
	int pipe[2];	   /* raw relays: bytes spliced from the other side, on their way here */
	size_t piped;	   /* bytes in that pipe */
	struct ssl_st *ssl; /* set once TLS is started on this side */
	uint8_t tls;	    /* enum ag_tls_phase */
	uint32_t tls_want;  /* epoll events the handshake (or an SSL_read) waits for */
	size_t clear_out;   /* head bytes of out still to go in clear before the handshake */
	uint64_t tls_deadline_ms; /* the handshake's end at the latest (monotonic) */
	bool tls_reading; /* in tls_readable(): it reads on by itself */
	bool tls_starved; /* the last SSL_read wanted bytes from the socket */
	bool tls_kicked;  /* a read of what OpenSSL read ahead is queued on the loop */
};

struct ag_session {
	uint64_t id;
	struct ag_worker *w;
	struct ag_session *next, *prev; /* the daemon's table */
	struct ag_side_conn side[2];
	const struct ag_proto_ops *proto;
	void *proto_state;
	struct ag_policy_ref *pol;
	const struct ag_policy_target *target; /* in pol; NULL for passthrough */

	struct ag_conn_info info;
	char agent[128];
	char cgroup[256];
	char target_name[128];
	char protocol[16];
	char orig_dst[64];
	char upstream[64];
	char reason[192];
	bool observe;
	bool io_seen;	/* an event since the worker's last tick (idle TLS sessions, see tls_slim()) */
	bool tls_slim;	/* its TLS record buffers given back since its last event */
	bool fastpath;
	bool krelay_want; /* raw, kernel relay on: engage once the upstream is up (krelay.h) */
	struct ag_krelay *krelay;
	bool tls_detect; /* the agent's first byte decides: 0x16 starts a TLS server handshake */
	bool in_table;
	int64_t started_ns;
	int64_t ended_ns;
	uint64_t connect_deadline_ms;
	volatile int state;

	uint64_t bytes_up, bytes_down;
	uint64_t statements, blocked, masked_values;
	uint32_t pending_approvals;

	/* credential injection (cred.c): what the agent asked for, and what we log in with */
	struct ag_cred *cred; /* NULL: the target has no credential, or none was needed yet */
	char credential[16];  /* provider, "" when none */
	char db_user[64];     /* the user name the agent's startup packet asked for */
	char database[64];
	struct ag_audit_sess *audit; /* audit.c: the current statement's result so far */
};

/* Queues bytes to be written to `to` (writing at once when nothing is queued). 0 or -errno. */
int ag_session_send(struct ag_session *s, enum ag_side to, const void *data, size_t len);
/* After everything queued for `to` is written, shut its write half (pass a FIN on). */
void ag_session_shutdown(struct ag_session *s, enum ag_side to);
/* Ends the session now; `reset` sends RSTs instead of FINs. reason is recorded. */
void ag_session_fail(struct ag_session *s, bool reset, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
const char *ag_session_state_name(int state);

/*
 * Side `side` will speak TLS: bytes already queued for it still go in clear (an SSLRequest,
 * an 'S'), later ones wait, in clear, until its handshake is done. Reads stay in clear until
 * ag_session_start_tls(). 0 or -errno.
 */
int ag_session_tls_hold(struct ag_session *s, enum ag_side side);
/*
 * Starts TLS on side (holding it first if not yet held): the agent side as the server (leaf
 * minted for its SNI and our original destination), the upstream side as the client with the
 * target's tls: settings and host name. The handshake runs from the event loop once the clear
 * bytes are out; the handler learns the outcome through proto->tls_done (a failure without that
 * callback ends the session with the reason). Bytes the handler left unconsumed on that side
 * when this is called are clear bytes sent after the TLS request: the session ends. 0, or
 * negative when the session has ended (reason recorded).
 */
int ag_session_start_tls(struct ag_session *s, enum ag_side side);
/* The side's TLS is established. */
bool ag_session_tls_up(const struct ag_session *s, enum ag_side side);
/* The worker loop a session lives on (for ag_loop_call() from other threads). */
struct ag_loop *ag_session_loop(const struct ag_session *s);
/*
 * On the session's thread, after the handler stopped consuming `from`'s input for a while (a
 * statement held for approval): presents what is buffered to the handler again and re-arms the
 * session's events.
 */
void ag_session_resume(struct ag_session *s, enum ag_side from);
