// SPDX-License-Identifier: GPL-2.0
/*
 * TLS and credentials together, end to end (issue 4's first test). A throwaway PostgreSQL that
 * requires both TLS and SCRAM: ssl = on, pg_hba only `hostssl all all 127.0.0.0/8 scram-sha-256`
 * over TCP (no plain host line: a clear connection is refused), password_encryption
 * scram-sha-256. The target's policy terminates the agent's TLS, verifies the server's
 * (verify-full against a test CA) and mints a pg-jit-role credential. Proven: psql with
 * sslmode=verify-full and the gateway CA as root, and no password anywhere in its environment,
 * is logged in as the role minted for its session, expiring within the ttl, over TLS upstream;
 * the role is gone after; the admin and minted passwords appear in no log and no agctl output;
 * a server certificate for another name (or from another CA) gives the agent the verification
 * error, not a login error, and no role is minted for that server.
 */
#include <errno.h>
#include <fcntl.h>
#include <regex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../pg.h"
#include "../test_progs.h"

#define PG_ADDR "127.0.0.49"
#define ADMIN_ROLE "gate_tls_admin"
#define ADMIN_PASSWORD "Tls-Adm1n-s3cret-Zq9"
#define TTL "2 minutes"

#define RULES                                                                                      \
	"    sql:\n"                                                                               \
	"      - { name: reads, when: { command: [select, set, show] }, then: allow }\n"

static char out[65536], err[65536];

struct tc_env {
	struct th_pg_gate g;
	char dir[128]; /* the test CA, the server's certificates, the admin secret */
	char secret[192];
	char gw_ca[256];
};

/* The test CA, another one, and the server's certificates: right, for another name, unknown. */
static int make_certs(struct tc_env *e)
{
	return th_pg_make_certs(e->dir, sizeof(e->dir),
				"pg_ok IP:" PG_ADDR " testca\n"
				"pg_wrongname DNS:wrong.example testca\n"
				"pg_unknown IP:" PG_ADDR " otherca\n");
}

/*
 * The server's certificate `name` from e->dir, then pg_hba as the issue asks: the unix socket
 * for the test's own checks, and over TCP TLS with SCRAM only (th_pg_set_ssl wrote host lines).
 */
static int server_cert(struct tc_env *e, const char *name)
{
	char crt[256], key[256], path[256];
	FILE *f;
	int rc;

	snprintf(crt, sizeof(crt), "%s/%s.crt", e->dir, name);
	snprintf(key, sizeof(key), "%s/%s.key", e->dir, name);
	rc = th_pg_set_ssl(&e->g.pg, crt, key);
	if (rc)
		return rc;
	snprintf(path, sizeof(path), "%s/pg_hba.conf", e->g.pg.data);
	f = fopen(path, "w");
	if (!f)
		return -errno;
	fputs("local all all trust\n"
	      "hostssl all all 127.0.0.0/8 scram-sha-256\n",
	      f);
	if (fclose(f))
		return -errno;
	return th_pg_reload(&e->g.pg);
}

static int before_daemon(struct th_pg_gate *g, void *arg)
{
	struct tc_env *e = arg;
	int rc;

	rc = th_pg_admin(&g->pg,
			 "CREATE ROLE app_ro NOLOGIN;\n"
			 "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_ro;\n"
			 "ALTER SYSTEM SET password_encryption = 'scram-sha-256';\n",
			 NULL, 0);
	if (rc)
		return -EIO;
	rc = th_pg_admin_role(&g->pg, ADMIN_ROLE, ADMIN_PASSWORD, "scram-sha-256", e->secret);
	if (rc)
		return rc;
	return server_cert(e, "pg_ok");
}

static int env_start(struct tc_env *e)
{
	char extra[1024];
	int rc;

	memset(e, 0, sizeof(*e));
	rc = make_certs(e);
	if (rc)
		return rc;
	snprintf(e->secret, sizeof(e->secret), "%s/admin.secret", e->dir);
	snprintf(extra, sizeof(extra),
		 "    tls: { client: terminate, upstream: verify-full, ca_file: %s/testca.crt }\n"
		 "    credential: { provider: pg-jit-role, admin_secret: %s, grant: [app_ro], "
		 "ttl: 2m }\n",
		 e->dir, e->secret);
	rc = th_pg_gate_start_ext(&e->g, PG_ADDR, "scram-sha-256", "enforce", RULES, extra,
				  before_daemon, e);
	if (rc)
		return rc;
	snprintf(e->gw_ca, sizeof(e->gw_ca), "%s/ca/ca.crt", e->g.d.state_dir);
	return 0;
}

static void env_stop(struct tc_env *e)
{
	th_pg_gate_cleanup(&e->g);
	if (e->dir[0])
		th_rm_rf(e->dir);
}

/*
 * psql from the tagged cgroup with sslmode=verify-full and the gateway CA as root; one -c per
 * statement, all in one session. Its environment is checked first: no PGPASSWORD, no password.
 */
static int psql_tls(struct tc_env *e, const char *const *sql)
{
	char script[4096];
	char *argv[] = { "/bin/sh", "-c", script, NULL };
	int n;

	n = snprintf(script, sizeof(script),
		     "if env | grep -q -e PGPASSWORD= -e '%s' -e '%s'; then "
		     "echo 'a password in the environment' >&2; exit 97; fi\n"
		     "exec /usr/bin/psql -X -A -t -q -v ON_ERROR_STOP=1 -d 'host=%s port=%d user=%s "
		     "dbname=%s sslmode=verify-full sslrootcert=%s application_name=tls-cred'",
		     TH_PG_PASSWORD, ADMIN_PASSWORD, PG_ADDR, e->g.pg.port, TH_PG_USER, TH_PG_DB,
		     e->gw_ca);
	for (; *sql && n > 0 && (size_t)n < sizeof(script); sql++)
		n += snprintf(script + n, sizeof(script) - n, " -c \"%s\"", *sql);
	if (n < 0 || (size_t)n >= sizeof(script))
		return -ENOSPC;
	out[0] = err[0] = '\0';
	return th_pg_exec_nopw(e->g.tagged, argv, NULL, out, sizeof(out), err, sizeof(err), 60000);
}

static int role_count(struct tc_env *e, const char *like)
{
	char sql[256], o[64];

	snprintf(sql, sizeof(sql), "SELECT count(*) FROM pg_roles WHERE rolname LIKE '%s';", like);
	if (th_pg_admin(&e->g.pg, sql, o, sizeof(o)))
		return -1;
	return atoi(o);
}

/* Polls until no role named like `like` is left (a deadline, not a timing assertion). */
static bool roles_gone(struct tc_env *e, const char *like, int deadline_s)
{
	for (int i = 0; i < deadline_s * 5; i++) {
		if (role_count(e, like) == 0)
			return true;
		usleep(200 * 1000);
	}
	return false;
}

static void subtest_verify_full_jit_role(struct tc_env *e)
{
	static const char *const sql[] = {
		"SELECT current_user, (SELECT rolvaliduntil FROM pg_roles WHERE rolname = "
		"current_user), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
		"SELECT rolvaliduntil > now(), rolvaliduntil <= now() + interval '" TTL "', "
		"pg_has_role(current_user, 'app_ro', 'member'), (SELECT count(*) FROM users) "
		"FROM pg_roles WHERE rolname = current_user",
		NULL
	};
	static char log[256 * 1024];
	char role[128] = "", until[64] = "", ssl[8] = "", checks[64] = "", want[256];
	int rc;

	rc = psql_tls(e, sql);
	if (!ASSERT_EQ(rc, 0, "psql verify-full, no password, through the gateway"))
		printf("stderr: %s\n", err);
	if (!ASSERT_EQ(sscanf(out, "%127[^|]|%63[^|]|%7[^\n]\n%63[^\n]", role, until, ssl, checks),
		       4, "two rows"))
		printf("out: %s\n", out);
	ASSERT_EQ(strncmp(role, "agentgate_s", 11), 0, "current_user is a role minted for it");
	ASSERT_NEQ(strcmp(role, TH_PG_USER), 0, "not the user it asked for");
	ASSERT_TRUE(until[0] && strcmp(until, "infinity"), "the role has an expiry");
	ASSERT_STREQ(ssl, "t", "the server's session is TLS (pg_stat_ssl)");
	ASSERT_STREQ(checks, "t|t|t|3", "expiry after now and within the ttl; member of the grant; "
		     "reads through it");
	/* The daemon logged in with the verifier it wrote (SCRAM), over the verified TLS. */
	th_daemon_read_log(&e->g.d, log, sizeof(log));
	snprintf(want, sizeof(want), "logged in upstream as %s (pg-jit-role, SCRAM-SHA-256", role);
	ASSERT_HAS_SUBSTR(log, want, "SCRAM upstream as the minted role");
	/* In that order: the server's TLS verified and up, then the role minted for it. */
	{
		unsigned long long sid = 0;
		char up[96], made[96];
		const char *pu, *pm;

		sscanf(role, "agentgate_s%llu_", &sid);
		snprintf(up, sizeof(up), "session %llu: upstream TLS up", sid);
		snprintf(made, sizeof(made), "session %llu: role %s created", sid, role);
		pu = strstr(log, up);
		pm = strstr(log, made);
		ASSERT_TRUE(pu && pm && pu < pm, "upstream TLS up before the role is created");
	}
	ASSERT_TRUE(role[0] && roles_gone(e, role, 60), "the role is dropped after the session");
	ASSERT_TRUE(!strstr(log, "upstream TLS failed") &&
			    !strstr(log, "upstream TLS verification failed"),
		    "no upstream TLS problem logged");
}

/* The server takes nothing in clear over TCP (the hostssl line only), even with the password. */
static void subtest_clear_refused(struct tc_env *e)
{
	char conn[300];
	char *argv[] = { "/usr/bin/psql", "-X", "-A", "-t", "-d", conn, "-c", "SELECT 1", NULL };
	int rc;

	snprintf(conn, sizeof(conn), "host=%s port=%d user=%s dbname=%s sslmode=disable", PG_ADDR,
		 e->g.pg.port, TH_PG_USER, TH_PG_DB);
	rc = th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	ASSERT_NEQ(rc, 0, "direct without TLS refused by the server");
	ASSERT_HAS_SUBSTR(err, "no encryption", "by its pg_hba (no host line)");
	/* Direct with TLS and the right password: SCRAM is what it asks for. */
	snprintf(conn, sizeof(conn), "host=%s port=%d user=%s dbname=%s sslmode=require",
		 PG_ADDR, e->g.pg.port, TH_PG_USER, TH_PG_DB);
	rc = th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	if (!ASSERT_EQ(rc, 0, "direct with TLS and the password"))
		printf("stderr: %s\n", err);
	ASSERT_OK(th_pg_admin(&e->g.pg, "SHOW password_encryption;", out, sizeof(out)), "show");
	ASSERT_STREQ(out, "scram-sha-256\n", "password_encryption");
}

/* Every output a person or a script sees: no admin password, no minted one. */
static void check_no_secrets(struct tc_env *e, const char *when)
{
	static char log[512 * 1024], buf[256 * 1024];
	static const char *const cmds[] = { "-j session list", "session list", "-j cred list",
					    "cred list",       "-j policy show", "policy show",
					    "-j status",       "status" };
	char path[256];
	regex_t re;
	int fd;
	ssize_t n;

	ASSERT_OK(th_daemon_read_log(&e->g.d, log, sizeof(log)), "daemon log");
	snprintf(path, sizeof(path), "%s/sessions.log", e->g.d.state_dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
	buf[n > 0 ? n : 0] = '\0';
	if (fd >= 0)
		close(fd);
	ASSERT_GT(strlen(buf), 0, "sessions.log has lines");
	/* Minted passwords: 32 random bytes in base64, 44 characters ending in '='. */
	ASSERT_OK(regcomp(&re, "[A-Za-z0-9+/]{43}=", REG_EXTENDED | REG_NOSUB), "regcomp");
	ASSERT_FALSE(strstr(log, ADMIN_PASSWORD), "the admin password in the daemon log");
	ASSERT_FALSE(strstr(buf, ADMIN_PASSWORD), "the admin password in sessions.log");
	ASSERT_NEQ(regexec(&re, log, 0, NULL, 0), 0, "a minted password in the daemon log");
	ASSERT_NEQ(regexec(&re, buf, 0, NULL, 0), 0, "a minted password in sessions.log");
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		buf[0] = '\0';
		th_agctl(&e->g.d, buf, sizeof(buf), "%s", cmds[i]);
		if (!ASSERT_FALSE(strstr(buf, ADMIN_PASSWORD), "the admin password in agctl") ||
		    !ASSERT_NEQ(regexec(&re, buf, 0, NULL, 0), 0, "a minted password in agctl"))
			printf("%s: agctl %s\n", when, cmds[i]);
	}
	regfree(&re);
}

/* The live session's role once agctl -j cred list has it active, or "" after a deadline. */
static void live_role(struct tc_env *e, char *role, size_t len)
{
	static char list[65536];

	role[0] = '\0';
	for (int t = 0; t < 300 && !role[0]; t++) {
		yajl_val root;

		if (!th_agctl(&e->g.d, list, sizeof(list), "-j cred list") &&
		    (root = th_json_parse(list))) {
			/* Listed from the start of the mint: wait until the role exists. */
			if (YAJL_IS_ARRAY(root) && root->u.array.len == 1 &&
			    !strcmp(th_json_str(root->u.array.values[0], "state") ?: "", "active"))
				snprintf(role, len, "%s",
					 th_json_str(root->u.array.values[0], "principal") ?: "");
			yajl_tree_free(root);
		}
		if (!role[0])
			usleep(100 * 1000);
	}
}

/*
 * A session held open (pg_sleep) while every output is read, then ended with agctl session
 * kill; then the same once more after it, with the role gone.
 */
static void subtest_secrets_absent(struct tc_env *e)
{
	static const char *const sql[] = { "SELECT pg_sleep(60)", NULL };
	static char list[65536];
	char role[128];
	long long id = -1;
	int st = -1, t;
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid == 0)
		_exit(psql_tls(e, sql) ? 1 : 0);
	if (!ASSERT_GT(pid, 0, "fork"))
		return;
	live_role(e, role, sizeof(role));
	if (ASSERT_EQ(strncmp(role, "agentgate_s", 11), 0, "a live session with a minted role")) {
		ASSERT_EQ(role_count(e, role), 1, "its role exists");
		check_no_secrets(e, "live session");
	}
	if (!th_agctl(&e->g.d, list, sizeof(list), "-j session list")) {
		yajl_val root = th_json_parse(list);

		if (root && YAJL_IS_ARRAY(root) && root->u.array.len == 1)
			th_json_int(root->u.array.values[0], "id", &id);
		yajl_tree_free(root);
	}
	if (ASSERT_GT(id, 0, "its session")) {
		ASSERT_EQ(th_agctl(&e->g.d, list, sizeof(list), "-j session kill %lld", id), 0,
			  "agctl session kill");
		ASSERT_FALSE(strstr(list, ADMIN_PASSWORD), "not in kill's output either");
	}
	for (t = 0; t < 300 && waitpid(pid, &st, WNOHANG) != pid; t++)
		usleep(100 * 1000);
	if (!ASSERT_LT(t, 300, "psql ended")) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
	}
	ASSERT_TRUE(role[0] && roles_gone(e, role, 60), "its role dropped after the kill");
	check_no_secrets(e, "after");
}

/*
 * The server presents a certificate `cert` verify-full refuses: psql hears the verification
 * error (not a login or credential error), and no role is minted for that server.
 */
static void refused_upstream(struct tc_env *e, const char *cert, const char *why)
{
	static const char *const sql[] = { "SELECT current_user", NULL };
	static char log[256 * 1024];
	int rc;

	if (!ASSERT_OK(server_cert(e, cert), cert))
		return;
	rc = psql_tls(e, sql);
	ASSERT_NEQ(rc, 0, "refused");
	ASSERT_HAS_SUBSTR(err, "agentgate: upstream TLS verification failed", "psql is told");
	ASSERT_HAS_SUBSTR(err, why, "why");
	ASSERT_FALSE(strstr(err, "no credential"), "not a credential error");
	ASSERT_FALSE(strstr(err, "login"), "not a login error");
	ASSERT_FALSE(strstr(err, "password"), "not a password error");
	ASSERT_TRUE(roles_gone(e, "agentgate\\_s%", 60), "no role left behind");
	th_daemon_read_log(&e->g.d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, why, "the daemon log says why");
	ASSERT_TRUE(th_pg_gate_alive(&e->g), "daemon alive");
	ASSERT_OK(server_cert(e, "pg_ok"), "the right certificate again");
	rc = psql_tls(e, sql);
	if (!ASSERT_EQ(rc, 0, "and it works again"))
		printf("stderr: %s\n", err);
	ASSERT_EQ(strncmp(out, "agentgate_s", 11), 0, "as a minted role");
	ASSERT_TRUE(roles_gone(e, "agentgate\\_s%", 60), "dropped after");
}

/* How many roles the daemon's log says it created. */
static int roles_created(struct tc_env *e)
{
	static char log[256 * 1024];
	int n = 0;

	th_daemon_read_log(&e->g.d, log, sizeof(log));
	for (const char *p = log; (p = strstr(p, " created on target ")); p++)
		n++;
	return n;
}

/* No role was ever made for a refused server: the mint waits for the verified handshake. */
static void subtest_no_mint_for_unverified(struct tc_env *e)
{
	int before = roles_created(e);

	refused_upstream(e, "pg_wrongname", "IP address mismatch");
	/* One only: for the session after the certificate was put right. */
	ASSERT_EQ(roles_created(e) - before, 1, "no role created for the refused server");
}

void test_tls_cred(void)
{
	static struct tc_env e;

	if (!ASSERT_OK(env_start(&e), "setup"))
		goto out;
	if (test__start_subtest("server_requires_tls_and_scram"))
		subtest_clear_refused(&e);
	if (test__start_subtest("verify_full_jit_role_expiry_ssl"))
		subtest_verify_full_jit_role(&e);
	if (test__start_subtest("secrets_absent_live_and_after"))
		subtest_secrets_absent(&e);
	if (test__start_subtest("wrong_upstream_name_verification_error"))
		subtest_no_mint_for_unverified(&e);
	if (test__start_subtest("unknown_upstream_ca_verification_error"))
		refused_upstream(&e, "pg_unknown", "unable to get local issuer certificate");
out:
	test__end_subtest();
	env_stop(&e);
}
