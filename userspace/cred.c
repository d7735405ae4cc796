// SPDX-License-Identifier: GPL-2.0
/*
 * Credential providers (cred.h). A struct ag_cred is one credential of one session: it is in the
 * daemon-wide table from the moment it is asked for until it is gone (a role dropped, a session
 * ended), reference-counted between the table, the session and the thread working on it.
 *
 * pg-jit-role: a thread connects to the target with libpq as the admin of the secret file and
 * creates `agentgate_s<session>_<agent>` with a random password (hashed client-side with
 * PQencryptPasswordConn, so the clear text never reaches the server or its logs), VALID UNTIL
 * now + ttl, IN ROLE the grant roles. The session's worker gets the login through ag_loop_call().
 * When the session ends, another thread terminates the role's backends and drops it, retrying;
 * a role whose drop never succeeded is found by the sweep at the next start.
 *
 * Who frees what when a session ends while its role is being minted: the minting thread checks
 * `gone` under the table lock before posting its result; if the session is gone, that thread
 * drops what it made. If the result was already posted, the session's end starts the drop.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <yajl/yajl_gen.h>

#include "clock.h"
#include "cred.h"
#include "keyfile.h"
#include "log.h"
#include "loop.h"
#include "policy.h"
#include "scram.h"
#include "session.h"

enum cred_state { CS_MINTING = 0, CS_ACTIVE, CS_REVOKING, CS_FAILED };

/*
 * Where and how the admin connects for a target: its address, the secret file, and libpq's TLS
 * settings from the target's tls: (upstream verify-full/verify-ca/require/off, ca_file,
 * cert_file, key_file). Copied out of the policy for the threads.
 */
struct admin_ep {
	char target[64];
	char secret_path[PATH_MAX];
	char host[256];
	char port[8];
	char sslmode[16];
	char sslrootcert[PATH_MAX];
	char sslcert[PATH_MAX];
	char sslkey[PATH_MAX];
};
static const char *const state_names[] = { "minting", "active", "revoking", "failed" };

struct ag_cred {
	int refs;
	struct ag_cred *next, *prev;
	uint64_t session;
	char target[64];
	char provider[16];
	char principal[320]; /* role name, JWT sub, static user */
	int64_t issued_ns, expires_ns;
	enum cred_state state;

	/* pg logins: on the session's worker */
	struct ag_session *s; /* NULL once the session ended */
	struct ag_loop *loop;
	ag_cred_done_fn done;
	bool gone;	 /* the session ended (under the lock) */
	bool posted;	 /* the result is on its way to the worker (under the lock) */
	bool role_made;	 /* a role exists on the server */

	/* what the thread needs, copied from the policy at the start */
	struct admin_ep ep;
	char **grant;
	size_t ngrant;
	uint64_t ttl_ms;
	char map_user[64];

	/* the result */
	int err;
	char sqlstate[6];
	char why[256];
	struct ag_cred_login login;
	char *bearer; /* http: "Bearer ...", cached for the session */
};

static pthread_mutex_t cred_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cred_cv = PTHREAD_COND_INITIALIZER;
static struct ag_cred *creds;
static int inflight; /* threads at work (minting, dropping, sweeping) */

/* --- secret files ----------------------------------------------------------------------------- */

/* The policy check of a secret file: the same open and checks as reading it. */
int ag_secret_check(const char *path, char *err, size_t errlen)
{
	int fd = ag_keyfile_open(path, "secret file", true, err, errlen);
	struct stat st;

	if (fd >= 0) {
		close(fd);
		return 0;
	}
	/*
	 * agctl policy check run by a user cannot open a file root keeps 0600: judge it by
	 * lstat() then (a check only: the daemon reads it through the fd checks above).
	 */
	if (fd == -EACCES && geteuid() && !lstat(path, &st) && S_ISREG(st.st_mode))
		return ag_keyfile_check(path, "secret file", &st, err, errlen);
	return fd;
}

/* Reads a whole small file after the ownership and mode checks. malloc'ed, NUL-terminated. */
static char *read_secret_file(const char *path, size_t *len, char *err, size_t errlen, int *rc)
{
	return ag_keyfile_read(path, "secret file", true, 64 * 1024, len, err, errlen, rc);
}

static void set_field(struct ag_secret *sec, const char *k, const char *v, size_t vlen)
{
	struct {
		const char *key;
		char *dst;
		size_t len;
	} f[] = {
		{ "user", sec->user, sizeof(sec->user) },
		{ "password", sec->password, sizeof(sec->password) },
		{ "token", sec->token, sizeof(sec->token) },
		{ "dbname", sec->dbname, sizeof(sec->dbname) },
		{ "host", sec->host, sizeof(sec->host) },
		{ "port", sec->port, sizeof(sec->port) },
		{ "sslmode", sec->sslmode, sizeof(sec->sslmode) },
	};

	for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
		if (strcmp(f[i].key, k))
			continue;
		if (vlen >= f[i].len)
			vlen = f[i].len - 1;
		memcpy(f[i].dst, v, vlen);
		f[i].dst[vlen] = '\0';
	}
}

/*
 * libpq's conninfo syntax: key = value pairs separated by white space, a value in single
 * quotes may hold spaces (\' and \\ escaped); lines starting with '#' are comments. Unknown keys
 * are ignored. Never echoes a value into err.
 */
static int parse_secret(const char *path, char *text, struct ag_secret *sec, char *err,
			size_t errlen)
{
	char *p = text;
	int line = 1;

	memset(sec, 0, sizeof(*sec));
	for (;;) {
		char key[32], *v, *w;
		size_t klen = 0;

		while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
			if (*p == '\n')
				line++;
			p++;
		}
		if (!*p)
			break;
		if (*p == '#') {
			while (*p && *p != '\n')
				p++;
			continue;
		}
		while ((*p >= 'a' && *p <= 'z') || *p == '_') {
			if (klen + 1 < sizeof(key))
				key[klen++] = *p;
			p++;
		}
		key[klen] = '\0';
		while (*p == ' ' || *p == '\t')
			p++;
		if (!klen || *p != '=') {
			snprintf(err, errlen,
				 "secret file %s:%d: expected key=value (user=... password=...)", path,
				 line);
			return -EINVAL;
		}
		p++;
		while (*p == ' ' || *p == '\t')
			p++;
		v = w = p;
		if (*p == '\'') {
			v = w = ++p;
			while (*p && *p != '\'') {
				if (*p == '\\' && p[1])
					p++;
				*w++ = *p++;
			}
			if (*p != '\'') {
				snprintf(err, errlen, "secret file %s:%d: unterminated quoted value",
					 path, line);
				return -EINVAL;
			}
			p++;
		} else {
			while (*p && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
				if (*p == '\\' && p[1])
					p++;
				*w++ = *p++;
			}
		}
		set_field(sec, key, v, w - v);
	}
	return 0;
}

int ag_secret_read(const char *path, struct ag_secret *sec, char *err, size_t errlen)
{
	size_t len = 0;
	int rc = 0;
	char *text = read_secret_file(path, &len, err, errlen, &rc);

	if (!text)
		return rc;
	rc = parse_secret(path, text, sec, err, errlen);
	OPENSSL_cleanse(text, len);
	free(text);
	if (rc)
		ag_secret_wipe(sec);
	return rc;
}

void ag_secret_wipe(struct ag_secret *sec)
{
	OPENSSL_cleanse(sec, sizeof(*sec));
}

/* --- the policy ------------------------------------------------------------------------------ */

static const char *kv_value(const struct ag_policy_target *t, const char *key)
{
	const struct ag_kv *e = ag_kv_get(t->credential, t->ncredential, key);

	return e ? e->value : NULL;
}

const char *ag_cred_provider(const struct ag_policy_target *t)
{
	return t && t->credential ? kv_value(t, "provider") : NULL;
}

int ag_cred_check_policy(const struct ag_policy *p, char *err, size_t errlen, char *warn,
			 size_t warnlen)
{
	static const char *const keys[] = { "admin_secret", "secret_file", "key_file" };
	size_t wused = 0;

	if (warn && warnlen)
		warn[0] = '\0';
	for (size_t i = 0; i < p->ntargets; i++) {
		const struct ag_policy_target *t = &p->targets[i];

		for (size_t k = 0; t->credential && k < 3; k++) {
			const char *path = kv_value(t, keys[k]);
			char e[PATH_MAX + 200];
			int rc;

			if (!path)
				continue;
			rc = ag_secret_check(path, e, sizeof(e));
			if (rc == -ENOENT) {
				if (warn && wused < warnlen)
					wused += snprintf(warn + wused, warnlen - wused,
							  "%starget %s: credential.%s: %s",
							  wused ? "; " : "", t->name, keys[k], e);
				continue;
			}
			if (rc) {
				snprintf(err, errlen, "%s:%d: target %s: credential.%s: %s",
					 p->path ? p->path : "policy", t->line, t->name, keys[k],
					 e);
				return rc;
			}
		}
		/* The admin of a pg-jit-role target can create roles: say when it goes in clear. */
		if (t->credential && !t->tls && warn && wused < warnlen) {
			const char *prov = kv_value(t, "provider");

			if (prov && !strcmp(prov, "pg-jit-role"))
				wused += snprintf(warn + wused, warnlen - wused,
						  "%starget %s: pg-jit-role without tls: the admin "
						  "login and the roles it makes cross the network "
						  "unencrypted and unverified (add tls: { upstream: "
						  "verify-full })",
						  wused ? "; " : "", t->name);
		}
	}
	return 0;
}

/* --- the table -------------------------------------------------------------------------------- */

static struct ag_cred *cred_new(struct ag_session *s, const char *provider)
{
	struct ag_cred *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->refs = 1;
	c->session = s->id;
	snprintf(c->target, sizeof(c->target), "%s", s->target_name);
	snprintf(c->provider, sizeof(c->provider), "%s", provider);
	c->issued_ns = ag_unix_ns();
	c->s = s;
	return c;
}

/* Under cred_lock. */
static void table_link(struct ag_cred *c)
{
	c->refs++;
	c->next = creds;
	if (creds)
		creds->prev = c;
	creds = c;
}

static void table_unlink_locked(struct ag_cred *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else if (creds == c)
		creds = c->next;
	else
		return; /* not linked */
	if (c->next)
		c->next->prev = c->prev;
	c->next = c->prev = NULL;
	c->refs--;
}

static void cred_free(struct ag_cred *c)
{
	for (size_t i = 0; i < c->ngrant; i++)
		free(c->grant[i]);
	free(c->grant);
	if (c->bearer) {
		OPENSSL_cleanse(c->bearer, strlen(c->bearer));
		free(c->bearer);
	}
	OPENSSL_cleanse(&c->login, sizeof(c->login));
	free(c);
}

static void cred_put_locked(struct ag_cred *c)
{
	if (--c->refs == 0)
		cred_free(c);
}

static void cred_put(struct ag_cred *c)
{
	pthread_mutex_lock(&cred_lock);
	cred_put_locked(c);
	pthread_mutex_unlock(&cred_lock);
}

size_t ag_cred_list(void (*fn)(const struct ag_cred_info *ci, void *arg), void *arg)
{
	size_t n = 0;

	pthread_mutex_lock(&cred_lock);
	for (struct ag_cred *c = creds; c; c = c->next, n++) {
		struct ag_cred_info ci = { .session = c->session,
					   .issued_ns = c->issued_ns,
					   .expires_ns = c->expires_ns,
					   .state = state_names[c->state] };

		snprintf(ci.target, sizeof(ci.target), "%s", c->target);
		snprintf(ci.provider, sizeof(ci.provider), "%s", c->provider);
		snprintf(ci.principal, sizeof(ci.principal), "%s", c->principal);
		fn(&ci, arg);
	}
	pthread_mutex_unlock(&cred_lock);
	return n;
}

static bool principal_live_locked(const char *name)
{
	for (struct ag_cred *c = creds; c; c = c->next)
		if (!strcmp(c->principal, name))
			return true;
	return false;
}

/* --- threads ------------------------------------------------------------------------------------ */

static int spawn(void *(*fn)(void *), void *arg)
{
	pthread_attr_t attr;
	pthread_t t;
	int rc;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_mutex_lock(&cred_lock);
	inflight++;
	pthread_mutex_unlock(&cred_lock);
	rc = pthread_create(&t, &attr, fn, arg);
	pthread_attr_destroy(&attr);
	if (rc) {
		pthread_mutex_lock(&cred_lock);
		inflight--;
		pthread_mutex_unlock(&cred_lock);
	}
	return -rc;
}

static void thread_done(void)
{
	pthread_mutex_lock(&cred_lock);
	inflight--;
	pthread_cond_broadcast(&cred_cv);
	pthread_mutex_unlock(&cred_lock);
}

void ag_cred_shutdown(int timeout_ms)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&cred_lock);
	while (inflight > 0)
		if (pthread_cond_timedwait(&cred_cv, &cred_lock, &ts) == ETIMEDOUT)
			break;
	if (inflight > 0)
		pr_warn("credentials: %d role drop(s) still running at exit; the next start sweeps "
			"what they leave",
			inflight);
	pthread_mutex_unlock(&cred_lock);
}

/* --- PostgreSQL admin connections ---------------------------------------------------------------- */

/* One line of libpq's error, without its trailing newline. */
static void pq_error(PGconn *conn, const PGresult *res, char *out, size_t len)
{
	const char *m = res ? PQresultErrorMessage(res) : PQerrorMessage(conn);
	size_t n;

	if (!m || !*m)
		m = "unknown error";
	snprintf(out, len, "%s", m);
	n = strcspn(out, "\n");
	out[n] = '\0';
}

/* The target's tls: as libpq parameters; no tls: prefer TLS, as libpq does. */
static void admin_ep_fill(struct admin_ep *ep, const struct ag_policy_target *t,
			  const char *secret_path)
{
	const struct ag_kv *up = ag_kv_get(t->tls, t->ntls, "upstream");
	const struct ag_kv *ca = ag_kv_get(t->tls, t->ntls, "ca_file");
	const struct ag_kv *cert = ag_kv_get(t->tls, t->ntls, "cert_file");
	const struct ag_kv *key = ag_kv_get(t->tls, t->ntls, "key_file");
	const char *mode = up && up->value ? up->value : NULL;

	memset(ep, 0, sizeof(*ep));
	snprintf(ep->target, sizeof(ep->target), "%s", t->name);
	snprintf(ep->secret_path, sizeof(ep->secret_path), "%s", secret_path ? secret_path : "");
	snprintf(ep->host, sizeof(ep->host), "%s", t->host);
	snprintf(ep->port, sizeof(ep->port), "%u", t->port);
	snprintf(ep->sslmode, sizeof(ep->sslmode), "%s",
		 !mode && !t->tls	 ? "prefer"
		 : !mode		 ? "verify-full" /* tls: present, as on the data path */
		 : !strcmp(mode, "off") ? "disable"
					: mode); /* verify-full, verify-ca, require: libpq's names */
	if (ca && ca->value)
		snprintf(ep->sslrootcert, sizeof(ep->sslrootcert), "%s", ca->value);
	else if (mode && !strncmp(mode, "verify-", 7))
		/* libpq 15 has no sslrootcert=system: the system store's bundle. */
		snprintf(ep->sslrootcert, sizeof(ep->sslrootcert),
			 "/etc/ssl/certs/ca-certificates.crt");
	if (cert && cert->value)
		snprintf(ep->sslcert, sizeof(ep->sslcert), "%s", cert->value);
	if (key && key->value)
		snprintf(ep->sslkey, sizeof(ep->sslkey), "%s", key->value);
}

/*
 * Admin connections open at once, daemon-wide: a burst of new sessions queues here instead of
 * taking every connection slot of the server.
 */
#define ADMIN_CONN_MAX 8
static sem_t admin_slots;
static pthread_once_t admin_slots_once = PTHREAD_ONCE_INIT;

static void admin_slots_init(void)
{
	sem_init(&admin_slots, 0, ADMIN_CONN_MAX);
}

static void admin_close(PGconn *conn)
{
	PQfinish(conn);
	sem_post(&admin_slots);
}

static PGconn *admin_connect(const struct admin_ep *ep, const struct ag_secret *sec, char *err,
			     size_t errlen, bool *conn_failed)
{
	const char *keys[12] = { "host",	    "port",	       "dbname",
				 "user",	    "password",	       "sslmode",
				 "connect_timeout", "application_name", "options" };
	const char *vals[12] = { sec->host[0] ? sec->host : ep->host,
				 sec->port[0] ? sec->port : ep->port,
				 sec->dbname[0] ? sec->dbname : "postgres",
				 sec->user,
				 sec->password,
				 sec->sslmode[0] ? sec->sslmode : ep->sslmode,
				 "10",
				 "agentgate",
				 /* Creating or dropping a role waiting on a lock must not hang. */
				 "-c statement_timeout=15000 -c lock_timeout=10000" };
	int n = 9;
	PGconn *conn;

	pthread_once(&admin_slots_once, admin_slots_init);
	while (sem_wait(&admin_slots) && errno == EINTR)
		;
	if (ep->sslrootcert[0]) {
		keys[n] = "sslrootcert";
		vals[n++] = ep->sslrootcert;
	}
	if (ep->sslcert[0] && ep->sslkey[0]) {
		keys[n] = "sslcert";
		vals[n++] = ep->sslcert;
		keys[n] = "sslkey";
		vals[n++] = ep->sslkey;
	}
	keys[n] = vals[n] = NULL;

	*conn_failed = false;
	if (!sec->user[0]) {
		snprintf(err, errlen, "the admin secret names no user");
		sem_post(&admin_slots);
		return NULL;
	}
	conn = PQconnectdbParams(keys, vals, 0);
	if (!conn) {
		snprintf(err, errlen, "out of memory");
		sem_post(&admin_slots);
		return NULL;
	}
	if (PQstatus(conn) != CONNECTION_OK) {
		char e[256];

		pq_error(conn, NULL, e, sizeof(e));
		/* A refused login is a credential problem; anything else, a connection one. */
		*conn_failed = !strstr(e, "authentication failed") && !strstr(e, "password") &&
			       !strstr(e, "pg_hba.conf") && !strstr(e, "does not exist");
		snprintf(err, errlen, "admin login as \"%s\" failed: %s", sec->user, e);
		admin_close(conn);
		return NULL;
	}
	return conn;
}

/* Terminates the role's backends (best effort) and drops it. 0 or -EIO with err set. */
static int drop_role(PGconn *conn, const char *role, char *err, size_t errlen)
{
	const char *params[1] = { role };
	PGresult *res;
	char *id;
	char sql[256];
	int rc = 0;

	res = PQexecParams(conn,
			   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
			   "usename = $1 AND pid <> pg_backend_pid()",
			   1, NULL, params, NULL, NULL, 0);
	PQclear(res);
	id = PQescapeIdentifier(conn, role, strlen(role));
	if (!id) {
		pq_error(conn, NULL, err, errlen);
		return -EIO;
	}
	snprintf(sql, sizeof(sql), "DROP ROLE IF EXISTS %s", id);
	PQfreemem(id);
	res = PQexec(conn, sql);
	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		pq_error(conn, res, err, errlen);
		rc = -EIO;
	}
	PQclear(res);
	return rc;
}

struct drop_job {
	struct ag_cred *c; /* NULL for a sweep */
	struct admin_ep ep;
};

static void *drop_main(void *arg)
{
	struct drop_job *j = arg;
	struct ag_cred *c = j->c;
	int delay = 1;

	for (int attempt = 1; attempt <= 4; attempt++) {
		struct ag_secret sec;
		char err[512] = "";
		bool conn_failed;
		PGconn *conn = NULL;
		int rc = ag_secret_read(j->ep.secret_path, &sec, err, sizeof(err));

		if (!rc) {
			conn = admin_connect(&j->ep, &sec, err, sizeof(err), &conn_failed);
			ag_secret_wipe(&sec);
		}
		if (conn) {
			rc = drop_role(conn, c->principal, err, sizeof(err));
			admin_close(conn);
			if (!rc) {
				pr_info("session %llu: role %s dropped (target %s)",
					(unsigned long long)c->session, c->principal, j->ep.target);
				break;
			}
		}
		pr_warn("session %llu: dropping role %s (target %s), attempt %d: %s",
			(unsigned long long)c->session, c->principal, j->ep.target, attempt, err);
		if (attempt == 4) {
			pr_err("session %llu: role %s left on target %s (it expires by itself; the "
			       "next start sweeps it)",
			       (unsigned long long)c->session, c->principal, j->ep.target);
			break;
		}
		sleep(delay);
		delay *= 2;
	}
	pthread_mutex_lock(&cred_lock);
	table_unlink_locked(c);
	cred_put_locked(c);
	pthread_mutex_unlock(&cred_lock);
	free(j);
	thread_done();
	return NULL;
}

/* Starts dropping c's role; takes over the caller's reference. Under no lock. */
static void start_drop(struct ag_cred *c)
{
	struct drop_job *j = calloc(1, sizeof(*j));

	pthread_mutex_lock(&cred_lock);
	c->state = CS_REVOKING;
	pthread_mutex_unlock(&cred_lock);
	if (j) {
		j->c = c;
		j->ep = c->ep;
		if (!spawn(drop_main, j))
			return;
		free(j);
	}
	pr_err("session %llu: cannot start dropping role %s: out of resources",
	       (unsigned long long)c->session, c->principal);
	pthread_mutex_lock(&cred_lock);
	table_unlink_locked(c);
	cred_put_locked(c);
	pthread_mutex_unlock(&cred_lock);
}

/* --- minting ------------------------------------------------------------------------------------ */

static void role_name(const struct ag_session *s, char *out, size_t len)
{
	size_t n = snprintf(out, len, AG_CRED_ROLE_PREFIX "%llu_", (unsigned long long)s->id);

	for (const char *a = s->agent; *a && n + 1 < len && n < 63; a++) {
		char ch = *a;

		if (ch >= 'A' && ch <= 'Z')
			ch += 'a' - 'A';
		out[n++] = (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ? ch : '_';
	}
	out[n] = '\0';
}

static void fail(struct ag_cred *c, int err, const char *sqlstate, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void fail(struct ag_cred *c, int err, const char *sqlstate, const char *fmt, ...)
{
	va_list ap;

	c->err = err;
	snprintf(c->sqlstate, sizeof(c->sqlstate), "%s", sqlstate);
	va_start(ap, fmt);
	vsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
}

/* Does the server hash new passwords with SCRAM-SHA-256 (its password_encryption)? */
static bool scram_server(PGconn *conn)
{
	PGresult *res = PQexec(conn, "SHOW password_encryption");
	bool yes = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
		   !strcmp(PQgetvalue(res, 0, 0), "scram-sha-256");

	PQclear(res);
	return yes;
}

static void mint_role(struct ag_cred *c)
{
	struct ag_secret sec;
	char err[512], ts[64], pwd[64], verifier[256], *id = NULL, *lit_pw = NULL, *lit_ts = NULL;
	char *enc = NULL;
	uint8_t raw[32];
	struct ag_buf sql = { 0 };
	PGresult *res;
	PGconn *conn;
	bool conn_failed;
	time_t until;
	struct tm tm;
	int rc;

	rc = ag_secret_read(c->ep.secret_path, &sec, err, sizeof(err));
	if (rc) {
		fail(c, rc, "28000", "%s", err);
		return;
	}
	conn = admin_connect(&c->ep, &sec, err, sizeof(err), &conn_failed);
	ag_secret_wipe(&sec);
	if (!conn) {
		fail(c, -EACCES, conn_failed ? "08006" : "28000", "%s", err);
		return;
	}
	if (RAND_bytes(raw, sizeof(raw)) != 1) {
		fail(c, -EIO, "28000", "no random bytes for the role's password");
		goto out;
	}
	ag_b64_encode(raw, sizeof(raw), pwd, sizeof(pwd));
	OPENSSL_cleanse(raw, sizeof(raw));
	until = (c->expires_ns / 1000000000LL);
	gmtime_r(&until, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%d %H:%M:%S+00", &tm);

	/*
	 * Hashed here, in the form the server keeps (its password_encryption). For SCRAM the
	 * gateway writes the verifier itself, so that it knows the salt and has done the PBKDF2
	 * work now, on this thread, instead of on the event loop at login.
	 */
	if (scram_server(conn)) {
		if (!ag_scram_salt_password(pwd, NULL, 0, 4096, &c->login.scram) &&
		    ag_scram_verifier(&c->login.scram, verifier, sizeof(verifier)) > 0)
			c->login.has_scram = true;
	}
	enc = c->login.has_scram ? NULL : PQencryptPasswordConn(conn, pwd, c->principal, NULL);
	id = PQescapeIdentifier(conn, c->principal, strlen(c->principal));
	lit_pw = enc ? PQescapeLiteral(conn, enc, strlen(enc))
	       : c->login.has_scram ? PQescapeLiteral(conn, verifier, strlen(verifier))
				    : NULL;
	lit_ts = PQescapeLiteral(conn, ts, strlen(ts));
	if (!id || !lit_pw || !lit_ts) {
		pq_error(conn, NULL, err, sizeof(err));
		fail(c, -EIO, "28000", "preparing the role: %s", err);
		goto out;
	}
	if (ag_buf_append(&sql, "CREATE ROLE ", 12) || ag_buf_append(&sql, id, strlen(id)) ||
	    ag_buf_append(&sql, " LOGIN PASSWORD ", 16) ||
	    ag_buf_append(&sql, lit_pw, strlen(lit_pw)) ||
	    ag_buf_append(&sql, " VALID UNTIL ", 13) || ag_buf_append(&sql, lit_ts, strlen(lit_ts)))
		goto oom;
	for (size_t i = 0; i < c->ngrant; i++) {
		char *g = PQescapeIdentifier(conn, c->grant[i], strlen(c->grant[i]));

		if (!g)
			goto oom;
		rc = ag_buf_append(&sql, i ? ", " : " IN ROLE ", i ? 2 : 9) ||
		     ag_buf_append(&sql, g, strlen(g));
		PQfreemem(g);
		if (rc)
			goto oom;
	}
	if (ag_buf_append(&sql, "", 1))
		goto oom;
	res = PQexec(conn, (const char *)ag_buf_head(&sql));
	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		pq_error(conn, res, err, sizeof(err));
		fail(c, -EACCES, "28000", "creating role %s: %s", c->principal, err);
	} else {
		c->role_made = true;
		snprintf(c->login.user, sizeof(c->login.user), "%s", c->principal);
		snprintf(c->login.password, sizeof(c->login.password), "%s", pwd);
		pr_info("session %llu: role %s created on target %s (valid until %s, %zu grant "
			"role%s)",
			(unsigned long long)c->session, c->principal, c->target, ts, c->ngrant,
			c->ngrant == 1 ? "" : "s");
	}
	PQclear(res);
	goto out;
oom:
	fail(c, -ENOMEM, "28000", "out of memory");
out:
	if (ag_buf_len(&sql))
		OPENSSL_cleanse((void *)ag_buf_head(&sql), ag_buf_len(&sql));
	ag_buf_free(&sql);
	OPENSSL_cleanse(pwd, sizeof(pwd));
	OPENSSL_cleanse(verifier, sizeof(verifier));
	if (enc) {
		OPENSSL_cleanse(enc, strlen(enc));
		PQfreemem(enc);
	}
	if (lit_pw) {
		OPENSSL_cleanse(lit_pw, strlen(lit_pw));
		PQfreemem(lit_pw);
	}
	PQfreemem(id);
	PQfreemem(lit_ts);
	admin_close(conn);
}

static void read_static(struct ag_cred *c)
{
	struct ag_secret sec;
	char err[512];
	int rc = ag_secret_read(c->ep.secret_path, &sec, err, sizeof(err));

	if (rc) {
		fail(c, rc, "28000", "%s", err);
		return;
	}
	snprintf(c->login.user, sizeof(c->login.user), "%s",
		 sec.user[0] ? sec.user : c->map_user);
	snprintf(c->login.password, sizeof(c->login.password), "%s", sec.password);
	ag_secret_wipe(&sec);
	pthread_mutex_lock(&cred_lock);
	snprintf(c->principal, sizeof(c->principal), "%s", c->login.user);
	pthread_mutex_unlock(&cred_lock);
}

/* On the session's worker: hand the result over, unless the session has gone meanwhile. */
static void mint_done_cb(void *arg)
{
	struct ag_cred *c = arg;
	struct ag_session *s = c->s;

	if (!c->gone && s) {
		pthread_mutex_lock(&cred_lock);
		c->state = c->err ? CS_FAILED : CS_ACTIVE;
		pthread_mutex_unlock(&cred_lock);
		c->done(s, c->err, c->sqlstate, c->why, &c->login);
	}
	OPENSSL_cleanse(&c->login, sizeof(c->login));
	cred_put(c);
}

static void *mint_main(void *arg)
{
	struct ag_cred *c = arg;
	bool drop = false;

	if (!strcmp(c->provider, "pg-jit-role"))
		mint_role(c);
	else
		read_static(c);
	pthread_mutex_lock(&cred_lock);
	if (c->gone) {
		/* The session ended while we worked: what we made is ours to undo. */
		drop = c->role_made;
		if (!drop)
			table_unlink_locked(c);
	} else {
		c->posted = true;
		c->refs++;
		if (ag_loop_call(c->loop, mint_done_cb, c)) {
			c->refs--;
			c->posted = false;
			drop = c->role_made;
		}
	}
	if (!c->posted)
		OPENSSL_cleanse(&c->login, sizeof(c->login)); /* else the worker's to wipe */
	pthread_mutex_unlock(&cred_lock);
	if (drop)
		start_drop(c); /* takes our reference */
	else
		cred_put(c);
	thread_done();
	return NULL;
}

int ag_cred_pg_login(struct ag_session *s, const char *db_user, ag_cred_done_fn done)
{
	const struct ag_policy_target *t = s->target;
	const char *prov = ag_cred_provider(t), *ttl, *path;
	const struct ag_kv *grant;
	struct ag_cred *c;
	int rc;

	if (!prov)
		return -ENOENT;
	if (strcmp(prov, "pg-jit-role") && strcmp(prov, "static"))
		return -EPROTONOSUPPORT;
	c = cred_new(s, prov);
	if (!c)
		return -ENOMEM;
	c->loop = ag_session_loop(s);
	c->done = done;
	path = kv_value(t, !strcmp(prov, "static") ? "secret_file" : "admin_secret");
	admin_ep_fill(&c->ep, t, path);
	snprintf(c->map_user, sizeof(c->map_user), "%s",
		 kv_value(t, "user") ? kv_value(t, "user") : db_user);
	c->ttl_ms = AG_CRED_TTL_DEFAULT_MS;
	ttl = kv_value(t, "ttl");
	if (ttl && ag_parse_duration(ttl, &c->ttl_ms))
		c->ttl_ms = AG_CRED_TTL_DEFAULT_MS;
	grant = ag_kv_get(t->credential, t->ncredential, "grant");
	if (grant && grant->nlist) {
		c->grant = calloc(grant->nlist, sizeof(*c->grant));
		if (!c->grant)
			goto oom;
		for (size_t i = 0; i < grant->nlist; i++, c->ngrant++)
			if (!(c->grant[i] = strdup(grant->list[i])))
				goto oom;
	}
	if (!strcmp(prov, "pg-jit-role")) {
		role_name(s, c->principal, sizeof(c->principal));
		c->expires_ns = c->issued_ns + (int64_t)c->ttl_ms * 1000000LL;
	}
	snprintf(s->credential, sizeof(s->credential), "%s", prov);
	pthread_mutex_lock(&cred_lock);
	table_link(c);
	c->refs++; /* the thread's */
	pthread_mutex_unlock(&cred_lock);
	s->cred = c; /* the session's: the first reference */
	rc = spawn(mint_main, c);
	if (rc) {
		pthread_mutex_lock(&cred_lock);
		table_unlink_locked(c);
		c->refs--;
		pthread_mutex_unlock(&cred_lock);
		s->cred = NULL;
		cred_put(c);
		return rc;
	}
	return 0;
oom:
	cred_free(c);
	return -ENOMEM;
}

void ag_cred_session_end(struct ag_session *s)
{
	struct ag_cred *c = s->cred;
	bool drop = false;

	if (!c)
		return;
	s->cred = NULL;
	pthread_mutex_lock(&cred_lock);
	c->gone = true;
	c->s = NULL;
	if (c->state == CS_MINTING && !c->posted) {
		/* The minting thread sees `gone` and undoes what it made. */
		cred_put_locked(c);
		pthread_mutex_unlock(&cred_lock);
		return;
	}
	drop = c->role_made;
	if (!drop)
		table_unlink_locked(c);
	pthread_mutex_unlock(&cred_lock);
	if (drop)
		start_drop(c);
	else
		cred_put(c);
}

/* --- the startup sweep ---------------------------------------------------------------------------- */

static void *sweep_main(void *arg)
{
	struct drop_job *j = arg;
	struct ag_secret sec;
	char err[512] = "";
	bool conn_failed;
	PGconn *conn = NULL;
	PGresult *res = NULL;
	int dropped = 0, failed = 0, rows;

	if (!ag_secret_read(j->ep.secret_path, &sec, err, sizeof(err))) {
		conn = admin_connect(&j->ep, &sec, err, sizeof(err), &conn_failed);
		ag_secret_wipe(&sec);
	}
	if (!conn) {
		pr_warn("credentials: target %s: cannot sweep leftover roles: %s", j->ep.target, err);
		goto out;
	}
	/*
	 * A role someone is logged in as may be another gateway's, live (several gateways in
	 * front of one server): left alone unless it has expired.
	 */
	res = PQexec(conn, "SELECT rolname FROM pg_roles r WHERE rolname LIKE 'agentgate\\_s%' "
			   "AND (rolvaliduntil < now() OR NOT EXISTS (SELECT 1 FROM "
			   "pg_stat_activity a WHERE a.usename = r.rolname)) ORDER BY 1");
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		pq_error(conn, res, err, sizeof(err));
		pr_warn("credentials: target %s: listing leftover roles: %s", j->ep.target, err);
		goto out;
	}
	rows = PQntuples(res);
	for (int i = 0; i < rows; i++) {
		const char *name = PQgetvalue(res, i, 0);
		bool live;

		pthread_mutex_lock(&cred_lock);
		live = principal_live_locked(name);
		pthread_mutex_unlock(&cred_lock);
		if (live)
			continue;
		if (drop_role(conn, name, err, sizeof(err))) {
			pr_warn("credentials: target %s: leftover role %s: %s", j->ep.target, name,
				err);
			failed++;
		} else {
			pr_info("credentials: target %s: leftover role %s dropped", j->ep.target,
				name);
			dropped++;
		}
	}
	pr_info("credentials: target %s: startup sweep dropped %d leftover role%s%s", j->ep.target,
		dropped, dropped == 1 ? "" : "s", failed ? " (some could not be dropped)" : "");
out:
	PQclear(res);
	if (conn)
		admin_close(conn);
	free(j);
	thread_done();
	return NULL;
}

void ag_cred_sweep(const struct ag_policy *p)
{
	for (size_t i = 0; i < p->ntargets; i++) {
		const struct ag_policy_target *t = &p->targets[i];
		const char *prov = ag_cred_provider(t), *path;
		struct drop_job *j;

		if (!prov || strcmp(prov, "pg-jit-role"))
			continue;
		path = kv_value(t, "admin_secret");
		j = calloc(1, sizeof(*j));
		if (!j || !path) {
			free(j);
			continue;
		}
		admin_ep_fill(&j->ep, t, path);
		if (spawn(sweep_main, j)) {
			pr_warn("credentials: target %s: cannot start the sweep", t->name);
			free(j);
		}
	}
}

/* --- JWT (ES256) ------------------------------------------------------------------------------------ */

struct jwt_key {
	struct jwt_key *next;
	char path[PATH_MAX];
	dev_t dev;
	ino_t ino;
	struct timespec mtime;
	EVP_PKEY *pkey;
	char kid[17];
};

static pthread_mutex_t key_lock = PTHREAD_MUTEX_INITIALIZER;
static struct jwt_key *keys;

static void b64url(const uint8_t *in, size_t n, char *out, size_t outlen)
{
	int len = ag_b64_encode(in, n, out, outlen);

	if (len < 0) {
		out[0] = '\0';
		return;
	}
	while (len && out[len - 1] == '=')
		len--;
	out[len] = '\0';
	for (char *p = out; *p; p++)
		*p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
}

static EVP_PKEY *load_key(const char *path, char *err, size_t errlen)
{
	char group[64] = "";
	size_t glen = 0;
	size_t len = 0;
	int rc = 0;
	char *pem = read_secret_file(path, &len, err, errlen, &rc);
	EVP_PKEY *pkey = NULL;
	BIO *bio;

	if (!pem)
		return NULL;
	bio = BIO_new_mem_buf(pem, (int)len);
	if (bio)
		pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
	BIO_free(bio);
	OPENSSL_cleanse(pem, len);
	free(pem);
	if (!pkey) {
		snprintf(err, errlen, "key file %s holds no PEM private key", path);
		return NULL;
	}
	if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_EC ||
	    !EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group,
					    sizeof(group), &glen) ||
	    strcmp(group, "prime256v1")) {
		snprintf(err, errlen,
			 "key file %s is not an EC P-256 private key (ES256 needs one: openssl "
			 "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)",
			 path);
		EVP_PKEY_free(pkey);
		return NULL;
	}
	return pkey;
}

/* The key for path (loaded once, again when the file changes), referenced; kid copied out. */
static EVP_PKEY *key_get(const char *path, char kid[17], char *err, size_t errlen)
{
	struct jwt_key *k;
	struct stat st;
	EVP_PKEY *pkey;

	/* lstat: a key file that became a symbolic link is loaded again, and so refused. */
	if (lstat(path, &st)) {
		snprintf(err, errlen, "key file %s: %s", path, strerror(errno));
		return NULL;
	}
	pthread_mutex_lock(&key_lock);
	for (k = keys; k; k = k->next) {
		if (strcmp(k->path, path))
			continue;
		if (k->dev == st.st_dev && k->ino == st.st_ino &&
		    k->mtime.tv_sec == st.st_mtim.tv_sec &&
		    k->mtime.tv_nsec == st.st_mtim.tv_nsec && S_ISREG(st.st_mode) &&
		    !ag_keyfile_check(path, "secret file", &st, err, errlen)) {
			EVP_PKEY_up_ref(k->pkey);
			memcpy(kid, k->kid, 17);
			pthread_mutex_unlock(&key_lock);
			return k->pkey;
		}
		break;
	}
	pkey = load_key(path, err, errlen);
	if (!pkey) {
		pthread_mutex_unlock(&key_lock);
		return NULL;
	}
	if (!k) {
		k = calloc(1, sizeof(*k));
		if (!k) {
			pthread_mutex_unlock(&key_lock);
			EVP_PKEY_free(pkey);
			snprintf(err, errlen, "out of memory");
			return NULL;
		}
		snprintf(k->path, sizeof(k->path), "%s", path);
		k->next = keys;
		keys = k;
	}
	EVP_PKEY_free(k->pkey);
	k->pkey = pkey;
	k->dev = st.st_dev;
	k->ino = st.st_ino;
	k->mtime = st.st_mtim;
	{
		/* kid: the first 8 bytes of SHA-256 over the public key's SubjectPublicKeyInfo. */
		unsigned char *der = NULL;
		uint8_t h[32];
		int dlen = i2d_PUBKEY(pkey, &der);

		k->kid[0] = '\0';
		if (dlen > 0) {
			SHA256(der, dlen, h);
			for (int i = 0; i < 8; i++)
				snprintf(k->kid + 2 * i, 3, "%02x", h[i]);
		}
		OPENSSL_free(der);
	}
	EVP_PKEY_up_ref(pkey);
	memcpy(kid, k->kid, 17);
	pthread_mutex_unlock(&key_lock);
	return pkey;
}

static int sign_es256(EVP_PKEY *pkey, const char *input, char *sig64, size_t siglen)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned char der[80], raw[64];
	const unsigned char *p = der;
	size_t dlen = sizeof(der);
	ECDSA_SIG *sig = NULL;
	const BIGNUM *r, *s;
	int rc = -EIO;

	if (!md || EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, pkey) != 1 ||
	    EVP_DigestSign(md, der, &dlen, (const unsigned char *)input, strlen(input)) != 1)
		goto out;
	/* JWS wants r || s, 32 bytes each, not the DER SEQUENCE OpenSSL produces. */
	sig = d2i_ECDSA_SIG(NULL, &p, (long)dlen);
	if (!sig)
		goto out;
	ECDSA_SIG_get0(sig, &r, &s);
	if (BN_bn2binpad(r, raw, 32) != 32 || BN_bn2binpad(s, raw + 32, 32) != 32)
		goto out;
	b64url(raw, 64, sig64, siglen);
	rc = 0;
out:
	ECDSA_SIG_free(sig);
	EVP_MD_CTX_free(md);
	return rc;
}

int ag_jwt_sign(const char *key_file, const char *claims_json, char *out, size_t outlen, char *err,
		size_t errlen)
{
	char kid[17], header[128], h64[256], sig[128], *c64, *input;
	size_t clen = strlen(claims_json), need;
	EVP_PKEY *pkey = key_get(key_file, kid, err, errlen);
	int rc = -EIO, n;

	if (!pkey)
		return -EACCES;
	snprintf(header, sizeof(header), "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid);
	b64url((const uint8_t *)header, strlen(header), h64, sizeof(h64));
	c64 = malloc(4 * (clen + 2) / 3 + 8);
	input = malloc(strlen(h64) + 4 * (clen + 2) / 3 + 16);
	if (!c64 || !input) {
		snprintf(err, errlen, "out of memory");
		rc = -ENOMEM;
		goto out;
	}
	b64url((const uint8_t *)claims_json, clen, c64, 4 * (clen + 2) / 3 + 8);
	sprintf(input, "%s.%s", h64, c64);
	if (sign_es256(pkey, input, sig, sizeof(sig))) {
		snprintf(err, errlen, "signing with %s failed", key_file);
		goto out;
	}
	need = strlen(input) + 1 + strlen(sig) + 1;
	if (need > outlen) {
		snprintf(err, errlen, "token too long");
		rc = -ENOSPC;
		goto out;
	}
	n = snprintf(out, outlen, "%s.%s", input, sig);
	rc = n;
out:
	free(c64);
	free(input);
	EVP_PKEY_free(pkey);
	return rc;
}

static void gen_str(yajl_gen g, const char *s)
{
	yajl_gen_string(g, (const unsigned char *)s, strlen(s));
}

/* The claims of a session's token (yajl, so agent-controlled text is escaped). malloc'ed. */
static char *jwt_claims(const struct ag_session *s, const char *iss, const char *aud,
			uint64_t ttl_ms, int64_t now, char *sub, size_t sublen, char *jti,
			size_t jtilen)
{
	uint8_t rnd[8];
	const unsigned char *buf;
	size_t len;
	char *out = NULL;
	yajl_gen g = yajl_gen_alloc(NULL);

	if (!g)
		return NULL;
	snprintf(sub, sublen, "agent:%s uid:%u comm:%s cgroup:%s", s->agent, s->info.uid,
		 s->info.comm, s->cgroup);
	if (RAND_bytes(rnd, sizeof(rnd)) != 1)
		memset(rnd, 0, sizeof(rnd));
	snprintf(jti, jtilen, "s%llu-%02x%02x%02x%02x%02x%02x%02x%02x", (unsigned long long)s->id,
		 rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
	yajl_gen_map_open(g);
	gen_str(g, "iss");
	gen_str(g, iss);
	gen_str(g, "sub");
	gen_str(g, sub);
	gen_str(g, "aud");
	gen_str(g, aud);
	gen_str(g, "iat");
	yajl_gen_integer(g, now);
	gen_str(g, "nbf");
	yajl_gen_integer(g, now);
	gen_str(g, "exp");
	yajl_gen_integer(g, now + (long long)(ttl_ms / 1000));
	gen_str(g, "jti");
	gen_str(g, jti);
	gen_str(g, "agentgate");
	yajl_gen_map_open(g);
	gen_str(g, "session");
	yajl_gen_integer(g, (long long)s->id);
	gen_str(g, "agent");
	gen_str(g, s->agent);
	gen_str(g, "uid");
	yajl_gen_integer(g, s->info.uid);
	gen_str(g, "pid");
	yajl_gen_integer(g, s->info.tgid);
	gen_str(g, "comm");
	gen_str(g, s->info.comm);
	gen_str(g, "cgroup");
	gen_str(g, s->cgroup);
	gen_str(g, "target");
	gen_str(g, s->target_name);
	yajl_gen_map_close(g);
	yajl_gen_map_close(g);
	if (yajl_gen_get_buf(g, &buf, &len) == yajl_gen_status_ok)
		out = strndup((const char *)buf, len);
	yajl_gen_free(g);
	return out;
}

static int make_bearer(struct ag_session *s, const char *prov, struct ag_cred *c, char *err,
		       size_t errlen)
{
	const struct ag_policy_target *t = s->target;
	char tok[4096], sub[320], jti[64];
	uint64_t ttl_ms = 5 * 60 * 1000ULL;
	int64_t now = ag_unix_ns() / 1000000000LL;
	const char *ttl = kv_value(t, "ttl"), *path;
	int rc;

	if (!strcmp(prov, "static")) {
		struct ag_secret sec;

		path = kv_value(t, "secret_file");
		rc = ag_secret_read(path ? path : "", &sec, err, errlen);
		if (rc)
			return rc;
		if (!sec.token[0]) {
			ag_secret_wipe(&sec);
			snprintf(err, errlen, "secret file %s has no token=", path);
			return -EINVAL;
		}
		rc = asprintf(&c->bearer, "Bearer %s", sec.token);
		ag_secret_wipe(&sec);
		if (rc < 0) {
			c->bearer = NULL;
			return -ENOMEM;
		}
		snprintf(c->principal, sizeof(c->principal), "static token");
		return 0;
	}
	if (ttl && ag_parse_duration(ttl, &ttl_ms))
		ttl_ms = 5 * 60 * 1000ULL;
	if (ttl_ms < 1000)
		ttl_ms = 1000;
	path = kv_value(t, "key_file");
	{
		const char *iss = kv_value(t, "issuer"), *aud = kv_value(t, "audience");
		char *claims = jwt_claims(s, iss ? iss : "agentgate", aud ? aud : "", ttl_ms, now,
					  sub, sizeof(sub), jti, sizeof(jti));

		if (!claims) {
			snprintf(err, errlen, "out of memory");
			return -ENOMEM;
		}
		rc = ag_jwt_sign(path ? path : "", claims, tok, sizeof(tok), err, errlen);
		free(claims);
	}
	if (rc < 0)
		return rc;
	rc = asprintf(&c->bearer, "Bearer %s", tok);
	OPENSSL_cleanse(tok, sizeof(tok));
	if (rc < 0) {
		c->bearer = NULL;
		return -ENOMEM;
	}
	snprintf(c->principal, sizeof(c->principal), "%s", sub);
	c->issued_ns = now * 1000000000LL;
	c->expires_ns = (now + (int64_t)(ttl_ms / 1000)) * 1000000000LL;
	return 0;
}

/*
 * A session's JWT is minted anew once three quarters of its life have passed (or less than 2 s
 * are left), so that a long keep-alive session never presents an expired token.
 */
static bool jwt_stale(const struct ag_cred *c)
{
	int64_t now = ag_unix_ns(), life = c->expires_ns - c->issued_ns;

	if (strcmp(c->provider, "jwt") || !c->expires_ns)
		return false;
	return now >= c->expires_ns - life / 4 || now >= c->expires_ns - 2000000000LL;
}

static int jwt_remint(struct ag_session *s, struct ag_cred *c, char *err, size_t errlen)
{
	struct ag_cred *fresh = calloc(1, sizeof(*fresh));
	char *old;
	int rc;

	if (!fresh) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	rc = make_bearer(s, "jwt", fresh, err, errlen);
	if (!rc) {
		pthread_mutex_lock(&cred_lock);
		old = c->bearer;
		c->bearer = fresh->bearer;
		fresh->bearer = old;
		memcpy(c->principal, fresh->principal, sizeof(c->principal));
		c->issued_ns = fresh->issued_ns;
		c->expires_ns = fresh->expires_ns;
		pthread_mutex_unlock(&cred_lock);
		pr_info("session %llu: jwt credential renewed before its expiry",
			(unsigned long long)s->id);
	}
	if (fresh->bearer) {
		OPENSSL_cleanse(fresh->bearer, strlen(fresh->bearer));
		free(fresh->bearer);
	}
	free(fresh);
	return rc;
}

int ag_cred_bearer(struct ag_session *s, char *out, size_t outlen, char *err, size_t errlen)
{
	const char *prov = ag_cred_provider(s->target);
	struct ag_cred *c = s->cred;
	size_t n;
	int rc;

	if (!prov || (strcmp(prov, "jwt") && strcmp(prov, "static"))) {
		snprintf(err, errlen, "target %s has no bearer credential", s->target_name);
		return -ENOENT;
	}
	if (!c) {
		c = cred_new(s, prov);
		if (!c) {
			snprintf(err, errlen, "out of memory");
			return -ENOMEM;
		}
		rc = make_bearer(s, prov, c, err, errlen);
		if (rc) {
			cred_free(c);
			return rc;
		}
		c->state = CS_ACTIVE;
		snprintf(s->credential, sizeof(s->credential), "%s", prov);
		pthread_mutex_lock(&cred_lock);
		table_link(c);
		pthread_mutex_unlock(&cred_lock);
		s->cred = c;
		pr_info("session %llu: %s credential issued for target %s (%s)",
			(unsigned long long)s->id, prov, s->target_name, c->principal);
	}
	if (!c->bearer) {
		snprintf(err, errlen, "the session's credential is not a bearer token");
		return -ENOENT;
	}
	if (jwt_stale(c)) {
		rc = jwt_remint(s, c, err, errlen);
		if (rc)
			return rc;
	}
	n = strlen(c->bearer);
	if (n + 1 > outlen) {
		snprintf(err, errlen, "token too long");
		return -ENOSPC;
	}
	memcpy(out, c->bearer, n + 1);
	return (int)n;
}
