/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The gateway's own PostgreSQL login, for a target with a credential: the agent is
 * authenticated by its kernel identity and its startup packet is not forwarded; the gateway
 * sends one of its own (user = the minted role or static user, database and other parameters
 * the agent's) and answers the server's authentication requests itself — SASL SCRAM-SHA-256
 * (the server's signature checked), MD5 and cleartext. Message level only: the caller moves
 * the bytes (so the upstream leg may be TLS or not).
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "scram.h"

struct pg_login {
	char user[64];
	char password[256];
	struct ag_scram sc;
	struct ag_scram_salted pre; /* keys stretched beforehand (a minted role), if have_pre */
	bool have_pre;
	const char *method; /* the one the server asked for: "SCRAM-SHA-256", "md5", ... */
	int sasl_step;	    /* 0 none, 1 first sent, 2 final sent, 3 server verified */
};

enum pg_login_result {
	PG_LOGIN_CONTINUE = 0, /* consumed; a reply may have been appended to reply */
	PG_LOGIN_OK = 1,       /* AuthenticationOk: pass it to the agent, then relay */
	PG_LOGIN_PASS = 2,     /* NoticeResponse, NegotiateProtocolVersion: pass it on */
};

void pg_login_init(struct pg_login *l, const char *user, const char *password);
/* SCRAM keys computed beforehand: no PBKDF2 at login when the server's salt matches. */
void pg_login_use_salted(struct pg_login *l, const struct ag_scram_salted *k);
/* Wipes the password and the SCRAM state. */
void pg_login_fini(struct pg_login *l);
/*
 * A StartupMessage for user and database, carrying the agent's other parameters from its own
 * startup packet (pkt, plen; NULL: none) except user, database, replication and _pq_.*.
 */
int pg_login_startup(struct ag_buf *b, const char *user, const char *database,
		     const uint8_t *pkt, size_t plen);
/*
 * One whole server message (type, length, body: total bytes) during the login. Returns a
 * pg_login_result, or a negative errno with sqlstate (6 bytes) and why filled for the agent's
 * FATAL: no secret is ever put in why.
 */
int pg_login_server_msg(struct pg_login *l, const uint8_t *m, size_t total, struct ag_buf *reply,
			char *sqlstate, char *why, size_t whylen);
