/* SPDX-License-Identifier: GPL-2.0 */
/*
 * PostgreSQL for the end-to-end tests: a throwaway PostgreSQL 15 (initdb as the postgres user
 * into a temp dir, listening only on one 127.0.0.x address and a free port, its processes in a
 * cgroup of their own so that nothing outlives the run), a test database "agentdb" owned by the
 * role "agent" with a users and an orders table, pg_hba per test (trust, password, md5,
 * scram-sha-256), and clients — psql, pgbench, python3 with psycopg2, and a raw protocol client
 * — run directly or from a tagged cgroup through the gateway. Helpers log and return errors;
 * the tests assert. Everything is removed by th_pg_stop(), which is safe to call twice.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "helpers.h"

#define TH_PG_BIN "/usr/lib/postgresql/15/bin"
#define TH_PG_USER "agent"
#define TH_PG_PASSWORD "agent-pw-42"
#define TH_PG_DB "agentdb"

struct th_pg {
	char dir[128]; /* temp dir (owned by postgres): data/, the socket, the log */
	char data[192];
	char log[192];
	char cgroup[256]; /* where the server's processes live */
	char addr[32];	  /* 127.0.0.x */
	char auth[32];	  /* pg_hba method for the agent role over TCP */
	int port;
	bool ssl; /* ssl = on, and the agent role's pg_hba line is hostssl */
	bool running;
	bool initialized;
};

/*
 * initdb, start on addr and a free port, create the agent role, agentdb and its tables (users:
 * 3 rows of personal data; orders: 5 rows). auth: trust | password | md5 | scram-sha-256.
 * 0 or -errno (the server log is shown when it failed).
 */
int th_pg_start(struct th_pg *pg, const char *addr, const char *auth);
/* Rewrites pg_hba for the agent role (and its password's encryption) and reloads. */
int th_pg_set_auth(struct th_pg *pg, const char *auth);
/* Has the server reread its configuration files, and waits until new backends run with it. */
int th_pg_reload(struct th_pg *pg);
/*
 * TLS on the server: cert and key (PEM files, copied into the data dir) with ssl = on and the
 * agent role's pg_hba line hostssl (its method kept); cert NULL turns ssl off again (host).
 * Reloads. 0 or -errno.
 */
int th_pg_set_ssl(struct th_pg *pg, const char *cert, const char *key);
/*
 * Test certificates with the openssl tool in a new temp dir (path into dir, mode 0755, files
 * 0644 but the CA keys, 0600 as agentgated wants a CA key it is given; th_rm_rf it after): two
 * CAs, testca and otherca (NAME.crt, NAME.key), and one leaf per
 * line of `leaves`, "NAME SAN CA" (SAN as openssl writes it: IP:127.0.0.9,DNS:x.test), EC P-256,
 * for serverAuth and clientAuth. 0 or -errno (openssl's complaint printed).
 */
int th_pg_make_certs(char *dir, size_t len, const char *leaves);
/* Stops the server (immediate), removes its files. Idempotent. */
void th_pg_stop(struct th_pg *pg);
/* A libpq connection string for the agent role (host, port, user, dbname, password). */
void th_pg_conninfo(const struct th_pg *pg, char *buf, size_t len, const char *extra);

/*
 * Runs argv (argv[0] a full path) with the stdin text given (may be NULL), stdout and stderr
 * captured (NUL-terminated, either may be NULL), in cgroup rel (NULL: the test's own, i.e.
 * direct), with PGPASSWORD set. Its exit code, 128 + signal, or -errno / -ETIMEDOUT.
 */
int th_pg_exec(const char *rel, char *const argv[], const char *in, char *out, size_t outlen,
	       char *err, size_t errlen, int timeout_ms);
/* th_pg_exec() without a password: PGPASSWORD unset, no password file. */
int th_pg_exec_nopw(const char *rel, char *const argv[], const char *in, char *out,
		    size_t outlen, char *err, size_t errlen, int timeout_ms);
/*
 * An admin role for the gateway's credentials (LOGIN CREATEROLE, pg_signal_backend), its
 * password stored with encryption (scram-sha-256 | md5, also what it hashes new roles with),
 * and a libpq-style secret file for it at secret_path (mode 0600). 0 or -errno.
 */
int th_pg_admin_role(const struct th_pg *pg, const char *role, const char *password,
		     const char *encryption, const char *secret_path);
/* psql -X -A -t -q -v ON_ERROR_STOP=1 with sql on stdin (-c not used: \copy works). */
int th_pg_psql(const struct th_pg *pg, const char *rel, const char *sql, char *out, size_t outlen,
	       char *err, size_t errlen);
/* As the superuser over the unix socket, for setup and checks. */
int th_pg_admin(const struct th_pg *pg, const char *sql, char *out, size_t outlen);
/*
 * /usr/bin/python3 -c script, with PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE set for the
 * agent role (psycopg2.connect("") picks them up).
 */
int th_pg_python(const struct th_pg *pg, const char *rel, const char *script, char *out,
		 size_t outlen, char *err, size_t errlen, int timeout_ms);
/*
 * The same script started in cgroup rel and left running, its stdin a pipe whose write end goes
 * to *stdin_fd (close it to let a script waiting on stdin end). Its pid (th_wait() it), or
 * -errno.
 */
pid_t th_pg_python_held(const struct th_pg *pg, const char *rel, const char *script,
			int *stdin_fd);

/*
 * A TCP connection made from cgroup rel (so that it is redirected when rel is tagged), handed
 * back to the test through SCM_RIGHTS: the test then speaks raw protocol on it. -errno.
 */
int th_pg_connect_from(const char *rel, const char *addr, int port);
/* The same, made by a process that became uid/gid first (its identity in the kernel's eyes). */
int th_pg_connect_as(const char *rel, const char *addr, int port, uid_t uid, gid_t gid);

/* ---- a raw protocol client ---- */

struct th_pg_msg {
	char type;
	uint32_t len; /* body length */
	uint8_t *body;
};

/* Reads one message (body malloc'ed; th_pg_msg_free). 0, -ETIMEDOUT, -ECONNRESET, -EPIPE (EOF). */
int th_pg_read_msg(int fd, struct th_pg_msg *m, int timeout_ms);
void th_pg_msg_free(struct th_pg_msg *m);
/* Field `code` of an ErrorResponse/NoticeResponse ("" when absent); static storage. */
const char *th_pg_err_field(const struct th_pg_msg *m, char code);
/*
 * StartupMessage for user/db, trust, cleartext or md5 password; reads up to ReadyForQuery.
 * The BackendKeyData into pid/key when not NULL. 0/-err.
 */
int th_pg_raw_startup(int fd, const char *user, const char *db, const char *password);
int th_pg_raw_startup_key(int fd, const char *user, const char *db, const char *password,
			  uint32_t *pid, uint32_t *key);
/*
 * Reads messages up to and including the n-th ReadyForQuery; their types into types (NUL-
 * terminated; at most len - 1 kept). The first ErrorResponse's SQLSTATE and message, if any,
 * into sqlstate (6 bytes) and msg. 0 or -errno.
 */
int th_pg_raw_collect(int fd, int n_ready, char *types, size_t len, char *sqlstate, char *msg,
		      size_t msglen, int timeout_ms);

/* ---- the gateway in front of it ---- */

struct th_pg_gate {
	struct th_daemon d;
	struct th_pg pg;
	char tagged[256];
	char tagged2[256]; /* agent "u" (below tagged): no rules, every statement denied */
	char policy[16384];
	char target_extra[1024]; /* YAML lines added to target "db" (a credential:) */
};

/*
 * Creates a tagged cgroup, starts PostgreSQL on addr with auth, and agentgated with a policy:
 * agent "t" (mode: enforce or observe) on the tagged cgroup, agent "u" on a cgroup below it,
 * target "db" (protocol postgres) at the server, and `rules` as the YAML of rule t→db's body
 * (sql: and mask: lines, indented by four spaces), default deny. 0 or -errno;
 * th_pg_gate_cleanup() in every case.
 */
int th_pg_gate_start(struct th_pg_gate *g, const char *addr, const char *auth, const char *mode,
		     const char *rules);
/*
 * th_pg_gate_start() with YAML lines for target "db" (target_extra, indented by four spaces;
 * NULL: none) and a hook run after PostgreSQL is up and before the daemon starts (NULL: none).
 */
int th_pg_gate_start_ext(struct th_pg_gate *g, const char *addr, const char *auth,
			 const char *mode, const char *rules, const char *target_extra,
			 int (*before_daemon)(struct th_pg_gate *g, void *arg), void *arg);
/* Rewrites the policy with other rules and reloads the daemon (waits for it to apply). */
int th_pg_gate_rules(struct th_pg_gate *g, const char *mode, const char *rules);
void th_pg_gate_cleanup(struct th_pg_gate *g);
/* A raw protocol connection from g's tagged cgroup, started up as the agent role; fd or -errno. */
int th_pg_raw_connect(struct th_pg_gate *g);
/* The same, made by a process running as uid/gid (the agent's identity in the kernel). */
int th_pg_raw_connect_as(struct th_pg_gate *g, uid_t uid, gid_t gid);

/* ---- raw protocol messages, appended to b ---- */

struct ag_buf;
/*
 * Bind portal to stmt with nparams text parameters; result_format >= 0 sends one result
 * format code for every column, < 0 sends none (all text).
 */
void th_pg_m_bind(struct ag_buf *b, const char *portal, const char *stmt, int nparams,
		  const char *const *params, int result_format);
void th_pg_m_execute(struct ag_buf *b, const char *portal);
/* A message with no body: Sync ('S'), Flush ('H'), Terminate ('X'). */
void th_pg_m_simple(struct ag_buf *b, char type);
/* The daemon is still alive and answers agctl. */
bool th_pg_gate_alive(struct th_pg_gate *g);
