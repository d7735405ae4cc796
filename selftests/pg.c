// SPDX-License-Identifier: GPL-2.0
/* PostgreSQL for the end-to-end tests; see pg.h. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cgroup.h"
#include "pg.h"
#include "pgwire.h"
#include "test_progs.h"

#define pg_log(fmt, ...) fprintf(stdout, "pg: " fmt "\n", ##__VA_ARGS__)

static int pg_counter;

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000;
}

/* --- running programs ------------------------------------------------------------------------ */

struct capture {
	int fd;
	char *buf;
	size_t len, used;
};

static void capture_read(struct capture *c)
{
	char tmp[4096];
	ssize_t n = read(c->fd, tmp, sizeof(tmp));

	if (n <= 0) {
		close(c->fd);
		c->fd = -1;
		return;
	}
	if (c->buf && c->used + 1 < c->len) {
		size_t k = (size_t)n < c->len - 1 - c->used ? (size_t)n : c->len - 1 - c->used;

		memcpy(c->buf + c->used, tmp, k);
		c->used += k;
		c->buf[c->used] = '\0';
	}
}

/*
 * fork + exec with pipes for stdin, stdout, stderr; the child moves into cgroup rel first and
 * takes uid/gid when as_uid is not 0 (for initdb/pg_ctl, which refuse root).
 */
static int exec_full(const char *rel, uid_t as_uid, gid_t as_gid, char *const argv[],
		     char *const env_add[], const char *in, char *out, size_t outlen, char *err,
		     size_t errlen, int timeout_ms)
{
	int pin[2] = { -1, -1 }, pout[2] = { -1, -1 }, perr[2] = { -1, -1 }, status;
	struct capture co = { .buf = out, .len = outlen }, ce = { .buf = err, .len = errlen };
	size_t inlen = in ? strlen(in) : 0, inoff = 0;
	long deadline = now_ms() + timeout_ms;
	bool killed = false;
	pid_t pid;

	if (out && outlen)
		out[0] = '\0';
	if (err && errlen)
		err[0] = '\0';
	if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC)) {
		int e = -errno;

		for (int i = 0; i < 2; i++) {
			if (pin[i] >= 0)
				close(pin[i]);
			if (pout[i] >= 0)
				close(pout[i]);
			if (perr[i] >= 0)
				close(perr[i]);
		}
		return e;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		dup2(pin[0], STDIN_FILENO);
		dup2(pout[1], STDOUT_FILENO);
		dup2(perr[1], STDERR_FILENO);
		if (rel && ag_cgroup_move(th_cgroup_mount(), rel, 0)) {
			fprintf(stderr, "cannot move into cgroup %s\n", rel);
			_exit(127);
		}
		for (int i = 0; env_add && env_add[i]; i++)
			putenv(env_add[i]);
		signal(SIGPIPE, SIG_DFL);
		if (as_uid && (setgroups(0, NULL) || setgid(as_gid) || setuid(as_uid))) {
			fprintf(stderr, "cannot become uid %u: %s\n", as_uid, strerror(errno));
			_exit(127);
		}
		execv(argv[0], argv);
		fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	close(pin[0]);
	close(pout[1]);
	close(perr[1]);
	co.fd = pout[0];
	ce.fd = perr[0];
	if (!inlen) {
		close(pin[1]);
		pin[1] = -1;
	} else {
		fcntl(pin[1], F_SETFL, O_NONBLOCK);
	}
	while (co.fd >= 0 || ce.fd >= 0) {
		struct pollfd p[3];
		int n = 0, left = (int)(deadline - now_ms());

		if (left <= 0) {
			pg_log("%s: still runs after %d ms: killing it", argv[0], timeout_ms);
			kill(pid, SIGKILL);
			killed = true;
			break;
		}
		if (co.fd >= 0)
			p[n++] = (struct pollfd){ .fd = co.fd, .events = POLLIN };
		if (ce.fd >= 0)
			p[n++] = (struct pollfd){ .fd = ce.fd, .events = POLLIN };
		if (pin[1] >= 0)
			p[n++] = (struct pollfd){ .fd = pin[1], .events = POLLOUT };
		if (poll(p, n, left) <= 0)
			continue;
		for (int i = 0; i < n; i++) {
			if (!p[i].revents)
				continue;
			if (p[i].fd == co.fd)
				capture_read(&co);
			else if (p[i].fd == ce.fd)
				capture_read(&ce);
			else if (p[i].fd == pin[1]) {
				ssize_t w = write(pin[1], in + inoff, inlen - inoff);

				if (w > 0)
					inoff += w;
				if (w < 0 || inoff == inlen) {
					close(pin[1]);
					pin[1] = -1;
				}
			}
		}
	}
	if (pin[1] >= 0)
		close(pin[1]);
	if (co.fd >= 0)
		close(co.fd);
	if (ce.fd >= 0)
		close(ce.fd);
	if (waitpid(pid, &status, 0) < 0)
		return -errno;
	if (killed)
		return -ETIMEDOUT;
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

int th_pg_exec_nopw(const char *rel, char *const argv[], const char *in, char *out,
		    size_t outlen, char *err, size_t errlen, int timeout_ms)
{
	/* putenv() of a bare name removes it: whatever the runner's environment held. */
	static char pw[] = "PGPASSWORD", pf[] = "PGPASSFILE=/nonexistent", tz[] = "PGTZ=UTC",
		    ct[] = "PGCONNECT_TIMEOUT=10";
	char *const env[] = { pw, pf, tz, ct, NULL };

	return exec_full(rel, 0, 0, argv, env, in, out, outlen, err, errlen, timeout_ms);
}

int th_pg_exec(const char *rel, char *const argv[], const char *in, char *out, size_t outlen,
	       char *err, size_t errlen, int timeout_ms)
{
	static char pw[] = "PGPASSWORD=" TH_PG_PASSWORD, tz[] = "PGTZ=UTC",
		    ct[] = "PGCONNECT_TIMEOUT=10";
	char *const env[] = { pw, tz, ct, NULL };

	return exec_full(rel, 0, 0, argv, env, in, out, outlen, err, errlen, timeout_ms);
}

static int postgres_ids(uid_t *uid, gid_t *gid)
{
	struct passwd *pw = getpwnam("postgres");

	if (!pw) {
		pg_log("no postgres user on this machine");
		return -ENOENT;
	}
	*uid = pw->pw_uid;
	*gid = pw->pw_gid;
	return 0;
}

/* As the postgres user, in the server's cgroup; stderr into the test log on failure. */
static int as_postgres(const struct th_pg *pg, char *const argv[], char *out, size_t outlen)
{
	char err[4096];
	uid_t uid;
	gid_t gid;
	int rc = postgres_ids(&uid, &gid);

	if (rc)
		return rc;
	rc = exec_full(pg->cgroup[0] ? pg->cgroup : NULL, uid, gid, argv, NULL, NULL, out, outlen,
		       err, sizeof(err), 120000);
	if (rc)
		pg_log("%s exited with %d: %s", argv[0], rc, err);
	return rc;
}

/* --- the server ------------------------------------------------------------------------------ */

static int free_port(const char *addr)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port = -1;

	if (fd < 0)
		return -errno;
	inet_pton(AF_INET, addr, &sin.sin_addr);
	if (!bind(fd, (struct sockaddr *)&sin, sizeof(sin)) &&
	    !getsockname(fd, (struct sockaddr *)&sin, &sl))
		port = ntohs(sin.sin_port);
	close(fd);
	return port > 0 ? port : -EADDRNOTAVAIL;
}

static int write_file(const char *path, const char *text, bool append)
{
	FILE *f = fopen(path, append ? "a" : "w");

	if (!f)
		return -errno;
	fputs(text, f);
	return fclose(f) ? -errno : 0;
}

static void show_server_log(const struct th_pg *pg)
{
	char buf[8192] = "";
	FILE *f = fopen(pg->log, "r");
	size_t n;

	if (!f)
		return;
	fseek(f, 0, SEEK_END);
	if (ftell(f) > (long)sizeof(buf) - 1)
		fseek(f, -(long)sizeof(buf) + 1, SEEK_END);
	else
		fseek(f, 0, SEEK_SET);
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	printf("---- postgresql log (%s) ----\n%s---- end ----\n", pg->log, buf);
}

int th_pg_admin(const struct th_pg *pg, const char *sql, char *out, size_t outlen)
{
	char port[16], err[4096];
	char *argv[] = {
		"/usr/bin/psql", "-X", "-A", "-t", "-q",       "-v", "ON_ERROR_STOP=1", "-h",
		(char *)pg->dir, "-p", port, "-U", "postgres", "-d", TH_PG_DB,		NULL
	};
	int rc;

	snprintf(port, sizeof(port), "%d", pg->port);
	rc = exec_full(NULL, 0, 0, argv, NULL, sql, out, outlen, err, sizeof(err), 60000);
	if (rc)
		pg_log("admin psql exited with %d: %s", rc, err);
	return rc;
}

static const char *password_encryption(const char *auth)
{
	return !strcmp(auth, "md5") ? "md5" : "scram-sha-256";
}

int th_pg_reload(struct th_pg *pg)
{
	char before[64] = "", now[64];
	int rc;

	rc = th_pg_admin(pg, "SELECT pg_conf_load_time();", before, sizeof(before));
	if (!rc)
		rc = th_pg_admin(pg, "SELECT pg_reload_conf();", NULL, 0);
	if (rc)
		return rc > 0 ? -EIO : rc;
	/*
	 * The postmaster rereads its files (pg_hba, SSL certificates) in its SIGHUP handler and
	 * forks backends only after it: one that reports a new load time was forked after the
	 * reload. A deadline, not a timing assumption.
	 */
	for (int i = 0; i < 300; i++) {
		if (!th_pg_admin(pg, "SELECT pg_conf_load_time();", now, sizeof(now)) &&
		    strcmp(now, before))
			return 0;
		usleep(50 * 1000);
	}
	pg_log("the server did not reload its configuration within 15 s");
	return -ETIMEDOUT;
}

int th_pg_set_auth(struct th_pg *pg, const char *auth)
{
	char path[256], hba[1024], sql[256], method[sizeof(pg->auth)];
	int rc;

	/* auth may be pg->auth itself (th_pg_set_ssl keeps the method). */
	snprintf(method, sizeof(method), "%s", auth);
	auth = method;
	snprintf(pg->auth, sizeof(pg->auth), "%s", auth);
	snprintf(path, sizeof(path), "%s/pg_hba.conf", pg->data);
	snprintf(hba, sizeof(hba),
		 "local all all trust\n"
		 "host all postgres 127.0.0.0/8 trust\n"
		 "%s all %s 127.0.0.0/8 %s\n"
		 "%s all all 127.0.0.0/8 %s\n",
		 pg->ssl ? "hostssl" : "host", TH_PG_USER, auth, pg->ssl ? "hostssl" : "host", auth);
	rc = write_file(path, hba, false);
	if (rc)
		return rc;
	/* The password kept the way the method reads it (md5 needs an md5 hash). */
	snprintf(sql, sizeof(sql), "SET password_encryption = '%s'; ALTER ROLE %s PASSWORD '%s';",
		 password_encryption(auth), TH_PG_USER, TH_PG_PASSWORD);
	rc = th_pg_admin(pg, sql, NULL, 0);
	if (rc)
		return rc > 0 ? -EIO : rc;
	return th_pg_reload(pg);
}

/* Copies src into the data dir as name, the server's own and 0600 (it refuses a readable key). */
static int copy_private(const struct th_pg *pg, const char *src, const char *name, char *dst,
			size_t len)
{
	char buf[16384];
	size_t n;
	uid_t uid;
	gid_t gid;
	FILE *in, *out;
	int rc = postgres_ids(&uid, &gid);

	if (rc)
		return rc;
	snprintf(dst, len, "%s/%s", pg->data, name);
	in = fopen(src, "r");
	if (!in)
		return -errno;
	out = fopen(dst, "w");
	if (!out) {
		rc = -errno;
		fclose(in);
		return rc;
	}
	while ((n = fread(buf, 1, sizeof(buf), in)))
		fwrite(buf, 1, n, out);
	fclose(in);
	if (fchown(fileno(out), uid, gid) || fchmod(fileno(out), 0600))
		rc = -errno;
	if (fclose(out))
		rc = -errno;
	return rc;
}

int th_pg_set_ssl(struct th_pg *pg, const char *cert, const char *key)
{
	char crt[256], k[256], sql[700];
	int rc;

	if (cert) {
		rc = copy_private(pg, cert, "server.crt", crt, sizeof(crt));
		if (!rc)
			rc = copy_private(pg, key, "server.key", k, sizeof(k));
		if (rc) {
			pg_log("server certificate: %s", strerror(-rc));
			return rc;
		}
		snprintf(sql, sizeof(sql),
			 "ALTER SYSTEM SET ssl_cert_file = '%s';\n"
			 "ALTER SYSTEM SET ssl_key_file = '%s';\n"
			 "ALTER SYSTEM SET ssl = on;\n",
			 crt, k);
	} else {
		snprintf(sql, sizeof(sql), "ALTER SYSTEM SET ssl = off;\n");
	}
	rc = th_pg_admin(pg, sql, NULL, 0);
	if (rc)
		return rc > 0 ? -EIO : rc;
	pg->ssl = cert != NULL;
	return th_pg_set_auth(pg, pg->auth);
}

int th_pg_make_certs(char *dir, size_t len, const char *leaves)
{
	static const char script_fmt[] =
		"set -e; PATH=/usr/bin:/bin; cd %s\n"
		"ca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
		"-keyout $1.key -out $1.crt -subj /CN=$1 -days 2 "
		"-addext basicConstraints=critical,CA:TRUE "
		"-addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null; }\n"
		"leaf() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
		"-keyout $1.key -out $1.csr -subj /CN=$1 2>/dev/null\n"
		"  printf 'subjectAltName=%%s\\nbasicConstraints=CA:FALSE\\n"
		"extendedKeyUsage=serverAuth,clientAuth\\n' $2 > $1.ext\n"
		"  openssl x509 -req -in $1.csr -CA $3.crt -CAkey $3.key -CAcreateserial -days 2 "
		"-extfile $1.ext -out $1.crt 2>/dev/null; }\n"
		"ca testca; ca otherca\n"
		"while read name san ca; do [ -n \"$name\" ] && leaf $name $san $ca </dev/null; done\n"
		"chmod 0644 *.crt; chmod 0600 *.key\n";
	char *script, err[4096];
	char *argv[] = { "/bin/sh", "-c", NULL, NULL };
	int rc;

	snprintf(dir, len, "/tmp/agentgate-certs-%d-XXXXXX", getpid());
	if (!mkdtemp(dir)) {
		rc = -errno;
		dir[0] = '\0';
		return rc;
	}
	chmod(dir, 0755);
	if (asprintf(&script, script_fmt, dir) < 0)
		return -ENOMEM;
	argv[2] = script;
	rc = exec_full(NULL, 0, 0, argv, NULL, leaves, NULL, 0, err, sizeof(err), 60000);
	free(script);
	if (rc) {
		pg_log("making certificates: %d: %s", rc, err);
		return rc > 0 ? -EIO : rc;
	}
	return 0;
}

int th_pg_admin_role(const struct th_pg *pg, const char *role, const char *password,
		     const char *encryption, const char *secret_path)
{
	char sql[512], text[512];
	int fd, n, rc;

	snprintf(sql, sizeof(sql),
		 "SET password_encryption = '%s';\n"
		 "CREATE ROLE %s LOGIN CREATEROLE PASSWORD '%s';\n"
		 "GRANT pg_signal_backend TO %s;\n"
		 "ALTER ROLE %s SET password_encryption = '%s';\n",
		 encryption, role, password, role, role, encryption);
	rc = th_pg_admin(pg, sql, NULL, 0);
	if (rc)
		return rc > 0 ? -EIO : rc;
	n = snprintf(text, sizeof(text), "# the gateway's admin for the test server\n"
		     "user=%s password='%s' dbname=%s\n", role, password, TH_PG_DB);
	fd = open(secret_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	rc = write(fd, text, n) == n ? 0 : -EIO;
	if (!rc && fchmod(fd, 0600))
		rc = -errno;
	close(fd);
	return rc;
}

static const char setup_sql[] =
	"CREATE TABLE users (id int PRIMARY KEY, email text, ssn text, card text, phone text,\n"
	"                    note text);\n"
	"INSERT INTO users VALUES\n"
	" (1, 'alice@example.com', '123-45-6789', '4111 1111 1111 1111', '+1 555 123 4567',\n"
	"  'likes cats'),\n"
	" (2, 'bob@example.org', '321-54-9876', '5500 0000 0000 0004', '(555) 987-6543',\n"
	"  'reach me at bob.personal@gmail.com'),\n"
	" (3, 'carol@example.net', '078-05-1120', '3400 000000 00009', '555-000-1111',\n"
	"  'nothing to see');\n"
	"CREATE TABLE orders (id int PRIMARY KEY, user_id int REFERENCES users, amount "
	"numeric(10,2),\n"
	"                     item text, created date);\n"
	"INSERT INTO orders VALUES (1, 1, 10.50, 'book', '2024-01-02'),\n"
	" (2, 1, 99.99, 'lamp', '2024-02-03'), (3, 2, 5.00, 'pen', '2024-03-04'),\n"
	" (4, 3, 250.00, 'chair', '2024-04-05'), (5, 3, 1.25, 'clip', '2024-05-06');\n";

int th_pg_start(struct th_pg *pg, const char *addr, const char *auth)
{
	char name[64], conf[1024], path[256], port[16], opts[64];
	uid_t uid;
	gid_t gid;
	int rc;

	memset(pg, 0, sizeof(*pg));
	rc = postgres_ids(&uid, &gid);
	if (rc)
		return rc;
	if (access(TH_PG_BIN "/initdb", X_OK)) {
		pg_log("%s/initdb: %s", TH_PG_BIN, strerror(errno));
		return -ENOENT;
	}
	snprintf(pg->dir, sizeof(pg->dir), "/tmp/agentgate-pg-%d-XXXXXX", getpid());
	if (!mkdtemp(pg->dir)) {
		pg_log("mkdtemp: %s", strerror(errno));
		return -errno;
	}
	pg->initialized = true;
	if (chown(pg->dir, uid, gid) || chmod(pg->dir, 0700)) {
		pg_log("chown %s: %s", pg->dir, strerror(errno));
		return -errno;
	}
	snprintf(name, sizeof(name), "pg%d", pg_counter++);
	rc = th_cgroup_create(name, pg->cgroup, sizeof(pg->cgroup));
	if (rc)
		return rc;
	snprintf(pg->data, sizeof(pg->data), "%s/data", pg->dir);
	snprintf(pg->log, sizeof(pg->log), "%s/server.log", pg->dir);
	snprintf(pg->addr, sizeof(pg->addr), "%s", addr);
	pg->port = free_port(addr);
	if (pg->port < 0)
		return pg->port;
	{
		char *argv[] = {
			TH_PG_BIN "/initdb", "-D", pg->data, "-A",	   "trust",	"-U",
			"postgres",	     "-E", "UTF8",   "--locale=C", "--no-sync", NULL
		};

		rc = as_postgres(pg, argv, NULL, 0);
		if (rc)
			return rc > 0 ? -EIO : rc;
	}
	snprintf(conf, sizeof(conf),
		 "listen_addresses = '%s'\n"
		 "port = %d\n"
		 "unix_socket_directories = '%s'\n"
		 "max_connections = 60\n"
		 "shared_buffers = 32MB\n"
		 "fsync = off\n"
		 "synchronous_commit = off\n"
		 "full_page_writes = off\n"
		 "log_min_messages = warning\n"
		 "password_encryption = 'scram-sha-256'\n"
		 "log_min_error_statement = error\n",
		 addr, pg->port, pg->dir);
	snprintf(path, sizeof(path), "%s/postgresql.conf", pg->data);
	rc = write_file(path, conf, true);
	if (rc)
		return rc;
	snprintf(port, sizeof(port), "%d", pg->port);
	snprintf(opts, sizeof(opts), "-c port=%d", pg->port);
	{
		char *argv[] = { TH_PG_BIN "/pg_ctl",
				 "start",
				 "-w",
				 "-s",
				 "-t",
				 "60",
				 "-D",
				 pg->data,
				 "-l",
				 pg->log,
				 "-o",
				 opts,
				 NULL };

		rc = as_postgres(pg, argv, NULL, 0);
		if (rc) {
			show_server_log(pg);
			return rc > 0 ? -EIO : rc;
		}
	}
	pg->running = true;
	{
		char *argv[] = { "/usr/bin/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
				 pg->dir,	  "-p", port, "-U", "postgres",	       "-d",
				 "postgres",	  NULL };
		char sql[256], err[2048];

		snprintf(sql, sizeof(sql), "CREATE ROLE %s LOGIN; CREATE DATABASE %s OWNER %s;\n",
			 TH_PG_USER, TH_PG_DB, TH_PG_USER);
		rc = exec_full(NULL, 0, 0, argv, NULL, sql, NULL, 0, err, sizeof(err), 60000);
		if (rc) {
			pg_log("creating the role and database: %d: %s", rc, err);
			return -EIO;
		}
	}
	{
		char *argv[] = { "/usr/bin/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
				 pg->dir,	  "-p", port, "-U", TH_PG_USER,	       "-d",
				 TH_PG_DB,	  NULL };
		char err[2048];

		rc = exec_full(NULL, 0, 0, argv, NULL, setup_sql, NULL, 0, err, sizeof(err), 60000);
		if (rc) {
			pg_log("creating the tables: %d: %s", rc, err);
			return -EIO;
		}
	}
	return th_pg_set_auth(pg, auth);
}

void th_pg_stop(struct th_pg *pg)
{
	if (!pg || !pg->initialized)
		return;
	if (pg->running) {
		char *argv[] = { TH_PG_BIN "/pg_ctl",
				 "stop",
				 "-s",
				 "-m",
				 "immediate",
				 "-w",
				 "-D",
				 pg->data,
				 NULL };

		if (test__has_failed())
			show_server_log(pg);
		as_postgres(pg, argv, NULL, 0);
		pg->running = false;
	}
	if (pg->cgroup[0]) {
		/* Whatever is left of the server: killed with the cgroup. */
		char abs[512], procs[600];
		FILE *f;

		if (!th_cgroup_abs(pg->cgroup, abs, sizeof(abs))) {
			snprintf(procs, sizeof(procs), "%s/cgroup.procs", abs);
			f = fopen(procs, "r");
			if (f) {
				int p;

				while (fscanf(f, "%d", &p) == 1)
					kill(p, SIGKILL);
				fclose(f);
			}
		}
	}
	th_rm_rf(pg->dir);
	pg->initialized = false;
}

void th_pg_conninfo(const struct th_pg *pg, char *buf, size_t len, const char *extra)
{
	snprintf(buf, len, "host=%s port=%d user=%s dbname=%s password=%s%s%s", pg->addr, pg->port,
		 TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD, extra ? " " : "", extra ? extra : "");
}

int th_pg_psql(const struct th_pg *pg, const char *rel, const char *sql, char *out, size_t outlen,
	       char *err, size_t errlen)
{
	char conn[256];
	char *argv[] = { "/usr/bin/psql",   "-X", "-A", "-t", "-q", "-v",
			 "ON_ERROR_STOP=1", "-d", conn, NULL };

	th_pg_conninfo(pg, conn, sizeof(conn), NULL);
	return th_pg_exec(rel, argv, sql, out, outlen, err, errlen, 60000);
}

int th_pg_python(const struct th_pg *pg, const char *rel, const char *script, char *out,
		 size_t outlen, char *err, size_t errlen, int timeout_ms)
{
	char host[64], port[32], user[64], pw[64], db[64];
	char *const env[] = { host, port, user, pw, db, NULL };
	char *argv[] = { "/usr/bin/python3", "-c", (char *)script, NULL };

	snprintf(host, sizeof(host), "PGHOST=%s", pg->addr);
	snprintf(port, sizeof(port), "PGPORT=%d", pg->port);
	snprintf(user, sizeof(user), "PGUSER=%s", TH_PG_USER);
	snprintf(pw, sizeof(pw), "PGPASSWORD=%s", TH_PG_PASSWORD);
	snprintf(db, sizeof(db), "PGDATABASE=%s", TH_PG_DB);
	return exec_full(rel, 0, 0, argv, env, NULL, out, outlen, err, errlen, timeout_ms);
}

pid_t th_pg_python_held(const struct th_pg *pg, const char *rel, const char *script,
			int *stdin_fd)
{
	int pfd[2];
	pid_t pid;

	if (pipe(pfd))
		return -errno;
	pid = fork();
	if (pid == 0) {
		char *argv[] = { "/usr/bin/python3", "-c", (char *)script, NULL };
		char port[16];

		close(pfd[1]);
		dup2(pfd[0], 0);
		if (ag_cgroup_move(th_cgroup_mount(), rel, 0))
			_exit(127);
		snprintf(port, sizeof(port), "%d", pg->port);
		setenv("PGHOST", pg->addr, 1);
		setenv("PGPORT", port, 1);
		setenv("PGUSER", TH_PG_USER, 1);
		setenv("PGPASSWORD", TH_PG_PASSWORD, 1);
		setenv("PGDATABASE", TH_PG_DB, 1);
		execv(argv[0], argv);
		_exit(127);
	}
	close(pfd[0]);
	if (pid < 0) {
		close(pfd[1]);
		return -errno;
	}
	*stdin_fd = pfd[1];
	return pid;
}

/* --- a connection made in another cgroup ------------------------------------------------------ */

static int send_fd(int sock, int fd, int err)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { .iov_base = &err, .iov_len = sizeof(err) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;

	if (fd >= 0) {
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	return sendmsg(sock, &mh, 0) < 0 ? -errno : 0;
}

struct connect_job {
	int sock;
	const char *addr;
	int port;
	uid_t uid; /* 0: stays root */
	gid_t gid;
};

static int connect_child(void *arg)
{
	struct connect_job *j = arg;
	int fd;

	if (j->uid && (setgroups(0, NULL) || setgid(j->gid) || setuid(j->uid))) {
		send_fd(j->sock, -1, -errno);
		return 1;
	}
	fd = th_connect(AF_INET, j->addr, j->port, 10000);

	send_fd(j->sock, fd, fd < 0 ? fd : 0);
	return 0;
}

int th_pg_connect_from(const char *rel, const char *addr, int port)
{
	return th_pg_connect_as(rel, addr, port, 0, 0);
}

int th_pg_connect_as(const char *rel, const char *addr, int port, uid_t uid, gid_t gid)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	int sv[2], err = -EIO, fd = -1;
	struct connect_job j = { .addr = addr, .port = port, .uid = uid, .gid = gid };
	struct iovec iov = { .iov_base = &err, .iov_len = sizeof(err) };
	struct msghdr mh = { .msg_iov = &iov,
			     .msg_iovlen = 1,
			     .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv))
		return -errno;
	j.sock = sv[1];
	pid = th_spawn_in_cgroup(rel, connect_child, &j);
	if (pid < 0) {
		close(sv[0]);
		close(sv[1]);
		return pid;
	}
	close(sv[1]);
	{
		struct pollfd p = { .fd = sv[0], .events = POLLIN };

		if (poll(&p, 1, 15000) == 1 && recvmsg(sv[0], &mh, 0) > 0) {
			cm = CMSG_FIRSTHDR(&mh);
			if (cm && cm->cmsg_type == SCM_RIGHTS)
				memcpy(&fd, CMSG_DATA(cm), sizeof(int));
		}
	}
	close(sv[0]);
	th_wait(pid, 5000);
	if (fd >= 0)
		return fd;
	return err ? err : -EIO;
}

/* --- the raw client --------------------------------------------------------------------------- */

static int read_exact(int fd, void *buf, size_t len, int timeout_ms)
{
	long deadline = now_ms() + timeout_ms;
	size_t off = 0;

	while (off < len) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int left = (int)(deadline - now_ms());
		ssize_t n;

		if (left <= 0)
			return -ETIMEDOUT;
		if (poll(&p, 1, left) <= 0)
			continue;
		n = recv(fd, (char *)buf + off, len - off, 0);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (!n)
			return -EPIPE;
		off += n;
	}
	return 0;
}

int th_pg_read_msg(int fd, struct th_pg_msg *m, int timeout_ms)
{
	uint8_t hdr[5];
	int rc;

	memset(m, 0, sizeof(*m));
	rc = read_exact(fd, hdr, 5, timeout_ms);
	if (rc)
		return rc;
	m->type = hdr[0];
	m->len = pg_get32(hdr + 1);
	if (m->len < 4 || m->len > (1u << 30))
		return -EPROTO;
	m->len -= 4;
	m->body = malloc(m->len + 1);
	if (!m->body)
		return -ENOMEM;
	rc = read_exact(fd, m->body, m->len, timeout_ms);
	m->body[m->len] = 0;
	if (rc)
		th_pg_msg_free(m);
	return rc;
}

void th_pg_msg_free(struct th_pg_msg *m)
{
	free(m->body);
	m->body = NULL;
}

const char *th_pg_err_field(const struct th_pg_msg *m, char code)
{
	static char val[1024];
	const char *v = pg_error_field(m->body, m->len, code);

	snprintf(val, sizeof(val), "%s", v ? v : "");
	return val;
}

/* "md5" + hex(md5(hex(md5(password + user)) + salt)), the md5 method's answer. */
static void md5_answer(const char *user, const char *password, const uint8_t salt[4], char out[36])
{
	uint8_t d[16];
	char hex[33], buf[512];
	unsigned int n;

	snprintf(buf, sizeof(buf), "%s%s", password, user);
	EVP_Digest(buf, strlen(buf), d, &n, EVP_md5(), NULL);
	th_hex(d, 16, hex);
	memcpy(buf, hex, 32);
	memcpy(buf + 32, salt, 4);
	EVP_Digest(buf, 36, d, &n, EVP_md5(), NULL);
	th_hex(d, 16, hex);
	snprintf(out, 36, "md5%s", hex);
}

int th_pg_raw_startup(int fd, const char *user, const char *db, const char *password)
{
	return th_pg_raw_startup_key(fd, user, db, password, NULL, NULL);
}

int th_pg_raw_startup_key(int fd, const char *user, const char *db, const char *password,
			  uint32_t *pid, uint32_t *key)
{
	struct ag_buf b = { 0 };
	struct pg_wr w;
	uint8_t *p;
	int rc;

	/* The startup packet has no type byte: build it as a message and drop the byte. */
	pg_wr_begin(&w, &b, 0);
	pg_wr_u32(&w, PG_PROTO_V3);
	pg_wr_str(&w, "user");
	pg_wr_str(&w, user);
	pg_wr_str(&w, "database");
	pg_wr_str(&w, db);
	pg_wr_u8(&w, 0);
	if (pg_wr_end(&w))
		return -ENOMEM;
	p = (uint8_t *)ag_buf_head(&b);
	rc = th_send_all(fd, p + 1, ag_buf_len(&b) - 1, 5000);
	ag_buf_free(&b);
	if (rc)
		return rc;
	for (;;) {
		struct th_pg_msg m;

		rc = th_pg_read_msg(fd, &m, 10000);
		if (rc)
			return rc;
		if (m.type == 'E') {
			pg_log("startup refused: %s", th_pg_err_field(&m, 'M'));
			th_pg_msg_free(&m);
			return -EACCES;
		}
		if (m.type == 'K' && m.len >= 8) {
			if (pid)
				*pid = pg_get32(m.body);
			if (key)
				*key = pg_get32(m.body + 4);
		}
		if (m.type == 'R' && m.len >= 4 && pg_get32(m.body) == 3 && password) {
			pg_wr_begin(&w, &b, 'p');
			pg_wr_str(&w, password);
			pg_wr_end(&w);
			rc = th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
			ag_buf_free(&b);
		} else if (m.type == 'R' && m.len >= 8 && pg_get32(m.body) == 5 && password) {
			char ans[36];

			md5_answer(user, password, m.body + 4, ans);
			pg_wr_begin(&w, &b, 'p');
			pg_wr_str(&w, ans);
			pg_wr_end(&w);
			rc = th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
			ag_buf_free(&b);
		} else if (m.type == 'R' && m.len >= 4 && pg_get32(m.body) != 0) {
			pg_log("unsupported authentication request %u", pg_get32(m.body));
			rc = -ENOTSUP;
		}
		th_pg_msg_free(&m);
		if (rc)
			return rc;
		if (m.type == 'Z')
			return 0;
	}
}

int th_pg_raw_collect(int fd, int n_ready, char *types, size_t len, char *sqlstate, char *msg,
		      size_t msglen, int timeout_ms)
{
	size_t nt = 0;
	int seen = 0;

	if (types && len)
		types[0] = '\0';
	if (sqlstate)
		sqlstate[0] = '\0';
	if (msg && msglen)
		msg[0] = '\0';
	while (seen < n_ready) {
		struct th_pg_msg m;
		int rc = th_pg_read_msg(fd, &m, timeout_ms);

		if (rc)
			return rc;
		if (types && nt + 1 < len) {
			types[nt++] = m.type;
			types[nt] = '\0';
		}
		if (m.type == 'E' && sqlstate && !sqlstate[0]) {
			snprintf(sqlstate, 6, "%s", th_pg_err_field(&m, 'C'));
			if (msg)
				snprintf(msg, msglen, "%s", th_pg_err_field(&m, 'M'));
		}
		if (m.type == 'Z')
			seen++;
		th_pg_msg_free(&m);
	}
	return 0;
}

/* --- the gateway ------------------------------------------------------------------------------ */

static int gate_policy(struct th_pg_gate *g, const char *mode, const char *rules)
{
	int n = snprintf(g->policy, sizeof(g->policy),
			 "apiVersion: agentgate/v1\n"
			 "agents:\n"
			 "  - name: t\n"
			 "    cgroup: %s\n"
			 "    mode: %s\n"
			 "  - name: u\n"
			 "    cgroup: %s\n"
			 "targets:\n"
			 "  - name: db\n"
			 "    protocol: postgres\n"
			 "    address: %s:%d\n"
			 "%s"
			 "rules:\n"
			 "  - agent: t\n"
			 "    target: db\n"
			 "%s"
			 "default: deny\n",
			 g->tagged, mode ? mode : "enforce", g->tagged2, g->pg.addr, g->pg.port,
			 g->target_extra, rules);

	return n < 0 || (size_t)n >= sizeof(g->policy) ? -ENOSPC : 0;
}

int th_pg_gate_start(struct th_pg_gate *g, const char *addr, const char *auth, const char *mode,
		     const char *rules)
{
	return th_pg_gate_start_ext(g, addr, auth, mode, rules, NULL, NULL, NULL);
}

int th_pg_gate_start_ext(struct th_pg_gate *g, const char *addr, const char *auth,
			 const char *mode, const char *rules, const char *target_extra,
			 int (*before_daemon)(struct th_pg_gate *g, void *arg), void *arg)
{
	static int n;
	char name[64], sub[300];
	int rc;

	memset(g, 0, sizeof(*g));
	snprintf(g->target_extra, sizeof(g->target_extra), "%s", target_extra ? target_extra : "");
	snprintf(name, sizeof(name), "pgt%d", n++);
	rc = th_cgroup_create(name, g->tagged, sizeof(g->tagged));
	if (rc)
		return rc;
	snprintf(sub, sizeof(sub), "%s/second", name);
	rc = th_cgroup_create(sub, g->tagged2, sizeof(g->tagged2));
	if (rc)
		return rc;
	rc = th_pg_start(&g->pg, addr, auth);
	if (rc)
		return rc;
	if (before_daemon) {
		rc = before_daemon(g, arg);
		if (rc)
			return rc;
	}
	rc = gate_policy(g, mode, rules);
	if (rc)
		return rc;
	if (test__verbose())
		printf("pg gate: policy:\n%s", g->policy);
	return th_daemon_start(&g->d, g->policy, NULL);
}

static int reloads_logged(struct th_pg_gate *g)
{
	static char log[256 * 1024];
	int n = 0;

	if (th_daemon_read_log(&g->d, log, sizeof(log)))
		return -1;
	for (const char *p = log; (p = strstr(p, " reloaded (")); p++)
		n++;
	return n;
}

int th_pg_gate_rules(struct th_pg_gate *g, const char *mode, const char *rules)
{
	int rc = gate_policy(g, mode, rules), before = reloads_logged(g);

	if (rc)
		return rc;
	rc = th_daemon_write_policy(&g->d, g->policy);
	if (!rc)
		rc = th_daemon_reload(&g->d);
	if (rc)
		return rc;
	/* The reload is asynchronous; its log line says when it applied. */
	for (int t = 0; t < 100; t++) {
		if (reloads_logged(g) > before)
			return 0;
		usleep(50 * 1000);
	}
	printf("pg gate: the policy reload was not logged\n");
	return -ETIMEDOUT;
}

void th_pg_gate_cleanup(struct th_pg_gate *g)
{
	th_daemon_cleanup(&g->d);
	th_pg_stop(&g->pg);
}

bool th_pg_gate_alive(struct th_pg_gate *g)
{
	char out[256];

	return g->d.pid > 0 && !kill(g->d.pid, 0) &&
	       th_agctl(&g->d, out, sizeof(out), "-j session list") == 0;
}

int th_pg_raw_connect(struct th_pg_gate *g)
{
	return th_pg_raw_connect_as(g, 0, 0);
}

int th_pg_raw_connect_as(struct th_pg_gate *g, uid_t uid, gid_t gid)
{
	int fd = th_pg_connect_as(g->tagged, g->pg.addr, g->pg.port, uid, gid);

	if (fd < 0)
		return fd;
	if (th_pg_raw_startup(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD)) {
		close(fd);
		return -EACCES;
	}
	return fd;
}

void th_pg_m_bind(struct ag_buf *b, const char *portal, const char *stmt, int nparams,
		  const char *const *params, int result_format)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, 'B');
	pg_wr_str(&w, portal);
	pg_wr_str(&w, stmt);
	pg_wr_u16(&w, 0); /* parameters in text */
	pg_wr_u16(&w, nparams);
	for (int i = 0; i < nparams; i++) {
		pg_wr_u32(&w, strlen(params[i]));
		pg_wr_bytes(&w, params[i], strlen(params[i]));
	}
	if (result_format < 0) {
		pg_wr_u16(&w, 0);
	} else {
		pg_wr_u16(&w, 1);
		pg_wr_u16(&w, result_format);
	}
	pg_wr_end(&w);
}

void th_pg_m_execute(struct ag_buf *b, const char *portal)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, 'E');
	pg_wr_str(&w, portal);
	pg_wr_u32(&w, 0);
	pg_wr_end(&w);
}

void th_pg_m_simple(struct ag_buf *b, char type)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, type);
	pg_wr_end(&w);
}
