/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Credentials the gateway injects upstream so that the agent holds no secret (a target's
 * credential: in the policy, SPEC.md): a PostgreSQL role minted per session (pg-jit-role), an
 * ES256 JWT per session (jwt), or a root-only secret file (static). Minting and dropping roles
 * talk to the server with libpq on threads of their own; results come back to the session's
 * worker through ag_loop_call(). The daemon keeps a table of live credentials for
 * `agctl cred list` — principal, times, state; never a secret.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "scram.h"

struct ag_session;
struct ag_policy;
struct ag_policy_target;
struct jsonw;

/* Prefix of every role the gateway mints; the startup sweep drops leftovers that carry it. */
#define AG_CRED_ROLE_PREFIX "agentgate_s"
/* A credential's ttl: default and upper bound (the policy refuses more). */
#define AG_CRED_TTL_DEFAULT_MS (10 * 60 * 1000ULL)
#define AG_CRED_TTL_MAX_MS (24 * 3600 * 1000ULL)

/* What a secret file (admin_secret, secret_file) holds: libpq-style key=value pairs. */
struct ag_secret {
	char user[64];
	char password[256];
	char token[2048]; /* static credential for http targets */
	char dbname[64];
	char host[256];
	char port[8];
	char sslmode[16];
};

/*
 * Checks that a secret or key file is a regular file owned by root and not readable, writable
 * or executable by group or others. 0, or -errno with one clear line in err (-ENOENT when it is
 * missing, -EACCES for bad ownership or mode).
 */
int ag_secret_check(const char *path, char *err, size_t errlen);
/* Reads and parses a secret file after the same check (no symlinks). 0 or -errno, err set. */
int ag_secret_read(const char *path, struct ag_secret *sec, char *err, size_t errlen);
void ag_secret_wipe(struct ag_secret *sec);

/*
 * Checks every secret and key file the policy names. A bad owner or mode is an error (-EACCES,
 * err names the file, the target and the fix); a missing file is not (the policy may be loaded
 * before the secrets are deployed: the session then fails), but is described in warn.
 */
int ag_cred_check_policy(const struct ag_policy *p, char *err, size_t errlen, char *warn,
			 size_t warnlen);

/* The provider name of a target's credential, or NULL when it has none. */
const char *ag_cred_provider(const struct ag_policy_target *t);

/* How the gateway logs in upstream for a PostgreSQL session. */
struct ag_cred_login {
	char user[64];
	char password[256];
	/* A minted role's SCRAM keys, stretched on the minting thread (has_scram: valid). */
	struct ag_scram_salted scram;
	bool has_scram;
};

/*
 * The result of ag_cred_pg_login(), on the session's worker. err 0: login holds the user and
 * password (copy them; they are wiped after the call). Otherwise why says what failed, without
 * a secret, and sqlstate is what to tell the agent (28000, 08006).
 */
typedef void (*ag_cred_done_fn)(struct ag_session *s, int err, const char *sqlstate,
				const char *why, const struct ag_cred_login *login);

/*
 * Starts getting the upstream login for a PostgreSQL session whose target has a pg-jit-role or
 * static credential: minted (or read) on a thread, done() called later on the session's worker
 * — never when the session ended first. db_user is the user the agent asked for (the static
 * provider falls back to it). 0, or -errno when nothing was started.
 */
int ag_cred_pg_login(struct ag_session *s, const char *db_user, ag_cred_done_fn done);

/*
 * The Authorization value ("Bearer <token>") for an http session whose target has a jwt or
 * static credential: minted once per session and cached. Runs on the caller's thread (ES256
 * signing; the key file is read once per path and kept). Its length, or -errno (-ENOENT: the
 * target has no credential; -ENOSPC: out too small); err says why.
 */
int ag_cred_bearer(struct ag_session *s, char *out, size_t outlen, char *err, size_t errlen);

/* The session ends (session layer, on its worker): a minted role is dropped, off the loop. */
void ag_cred_session_end(struct ag_session *s);

/*
 * At daemon start: for every pg-jit-role target, drop roles with AG_CRED_ROLE_PREFIX that no
 * live credential holds, on a thread (logged; startup does not wait).
 */
void ag_cred_sweep(const struct ag_policy *p);
/* At exit: waits up to timeout_ms for role drops in flight. */
void ag_cred_shutdown(int timeout_ms);

/* The live credentials as a JSON array (agctl cred list), or into a callback for ctl_server. */
struct ag_cred_info {
	uint64_t session;
	char target[64];
	char provider[16];
	char principal[320];
	int64_t issued_ns, expires_ns;
	const char *state;
};
size_t ag_cred_list(void (*fn)(const struct ag_cred_info *ci, void *arg), void *arg);

/* JWT pieces, exposed for the tests. */
int ag_jwt_sign(const char *key_file, const char *claims_json, char *out, size_t outlen, char *err,
		size_t errlen);
