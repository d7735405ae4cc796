// SPDX-License-Identifier: GPL-2.0
/*
 * Credential injection: the agent holds no secret. Units first — the SCRAM-SHA-256 client
 * against RFC 7677's vectors (and a server whose signature is wrong), the md5 answer, secret
 * files (parsing; group-, world-readable, not root's, a symlink: refused with a clear error),
 * the policy's ttl bound, ES256 JWTs checked by an independent verifier (python cryptography).
 * Then end to end with a PostgreSQL that requires SCRAM over TCP: psql with no password in its
 * environment logs in through the gateway as a role minted for the session (expiring, member of
 * the grant roles), dropped after; leftovers swept at start; a wrong admin password or a secret
 * file gone group-readable gives the agent a clear FATAL and leaves the daemon alive; md5 and
 * static credentials; and no secret (admin password, minted password, token) appears in the
 * daemon's log, sessions.log or any agctl output.
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
#include <time.h>
#include <unistd.h>

#include "cred.h"
#include "pg_login.h"
#include "pgwire.h"
#include "policy.h"
#include "scram.h"
#include "session.h"
#include "../pg.h"
#include "../test_progs.h"

#define ADMIN_ROLE "gate_admin"
#define ADMIN_PASSWORD "Adm1n-s3cret-Xq7"

static char out[65536], err[16384];

/* --- SCRAM and md5 ------------------------------------------------------------------------------ */

#define RFC_NONCE "rOprNGfwEbeRWgbNEkqO"
#define RFC_SERVER_FIRST                                                                           \
	"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
#define RFC_CLIENT_FINAL                                                                           \
	"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"                             \
	"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
#define RFC_SERVER_FINAL "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

static void subtest_rfc7677(void)
{
	struct ag_scram sc;
	char buf[512];
	int n;

	n = ag_scram_client_first(&sc, "user", RFC_NONCE, buf, sizeof(buf));
	ASSERT_GE(n, 0, "client-first");
	ASSERT_STREQ(buf, "n,,n=user,r=" RFC_NONCE, "client-first-message");
	n = ag_scram_client_final(&sc, "pencil", RFC_SERVER_FIRST, strlen(RFC_SERVER_FIRST), buf,
				  sizeof(buf));
	ASSERT_GE(n, 0, "client-final");
	ASSERT_STREQ(buf, RFC_CLIENT_FINAL, "client-final-message with RFC 7677's proof");
	ASSERT_OK(ag_scram_verify_server(&sc, RFC_SERVER_FINAL, strlen(RFC_SERVER_FINAL)),
		  "RFC 7677's server signature verifies");
	ASSERT_FALSE(sc.used_pre, "PBKDF2 done here");
	ag_scram_free(&sc);

	/* The keys stretched beforehand (a minted role's) give the same proof, without PBKDF2. */
	{
		struct ag_scram_salted k;
		uint8_t salt[16];
		int sl = ag_b64_decode("W22ZaJ0SNY7soEsUEjb6gQ==", 24, salt, sizeof(salt));

		ASSERT_EQ(sl, 16, "salt");
		ASSERT_OK(ag_scram_salt_password("pencil", salt, sl, 4096, &k), "salt the password");
		ASSERT_STREQ(k.salt, "W22ZaJ0SNY7soEsUEjb6gQ==", "salt as the server sends it");
		ASSERT_GT(ag_scram_verifier(&k, buf, sizeof(buf)), 0, "verifier");
		ASSERT_EQ(strncmp(buf, "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$", 44), 0,
			  "PostgreSQL's verifier format");
		ag_scram_client_first(&sc, "user", RFC_NONCE, buf, sizeof(buf));
		ag_scram_use_salted(&sc, &k);
		ag_scram_client_final(&sc, "not-used", RFC_SERVER_FIRST, strlen(RFC_SERVER_FIRST),
				      buf, sizeof(buf));
		ASSERT_TRUE(sc.used_pre, "the precomputed keys were used");
		ASSERT_STREQ(buf, RFC_CLIENT_FINAL, "the same proof");
		ASSERT_OK(ag_scram_verify_server(&sc, RFC_SERVER_FINAL, strlen(RFC_SERVER_FINAL)),
			  "and the server verifies");
		ag_scram_free(&sc);
	}
}

static void subtest_wrong_server_signature(void)
{
	static const char bad[] = "v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
	struct ag_scram sc;
	char buf[512];

	ag_scram_client_first(&sc, "user", RFC_NONCE, buf, sizeof(buf));
	/* The right server signature, but for another password: the server did not know it. */
	ASSERT_GE(ag_scram_client_final(&sc, "pencil2", RFC_SERVER_FIRST,
					strlen(RFC_SERVER_FIRST), buf, sizeof(buf)),
		  0, "client-final");
	ASSERT_EQ(ag_scram_verify_server(&sc, RFC_SERVER_FINAL, strlen(RFC_SERVER_FINAL)),
		  -EACCES, "a signature made with another password is refused");
	ag_scram_free(&sc);

	ag_scram_client_first(&sc, "user", RFC_NONCE, buf, sizeof(buf));
	ag_scram_client_final(&sc, "pencil", RFC_SERVER_FIRST, strlen(RFC_SERVER_FIRST), buf,
			      sizeof(buf));
	ASSERT_EQ(ag_scram_verify_server(&sc, bad, strlen(bad)), -EACCES,
		  "a flipped signature is refused");
	ASSERT_EQ(ag_scram_verify_server(&sc, "e=other-error", 13), -EBADMSG,
		  "a server error is refused");
	ag_scram_free(&sc);
}

static void subtest_server_nonce(void)
{
	static const char other[] = "r=XXprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
	static const char same[] = "r=" RFC_NONCE ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
	static const char huge[] = "r=" RFC_NONCE "x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999999999";
	struct ag_scram sc;
	char buf[512];

	ag_scram_client_first(&sc, "", RFC_NONCE, buf, sizeof(buf));
	ASSERT_EQ(ag_scram_client_final(&sc, "p", other, strlen(other), buf, sizeof(buf)),
		  -EBADMSG, "a nonce that does not extend ours");
	ASSERT_EQ(ag_scram_client_final(&sc, "p", same, strlen(same), buf, sizeof(buf)), -EBADMSG,
		  "a nonce the server added nothing to");
	ASSERT_EQ(ag_scram_client_final(&sc, "p", huge, strlen(huge), buf, sizeof(buf)), -EBADMSG,
		  "an absurd iteration count");
	ag_scram_free(&sc);
	ag_scram_client_first(&sc, "", NULL, buf, sizeof(buf));
	ASSERT_EQ(strncmp(buf, "n,,n=,r=", 8), 0, "PostgreSQL's form: empty user");
	ASSERT_EQ(strlen(buf), 8 + 24, "18 random bytes of nonce, base64");
	ag_scram_free(&sc);
}

static void subtest_md5(void)
{
	static const uint8_t salt[4] = { 1, 2, 3, 4 };
	char ans[36];

	ASSERT_OK(ag_pg_md5_answer("agent", "agent-pw-42", salt, ans), "md5 answer");
	/* python3: 'md5' + md5(md5(pw + user).hexdigest() + salt) */
	ASSERT_STREQ(ans, "md5a6363a8332918e8d752904d440cffc1d", "the md5 method's answer");
}

/*
 * A role minted with a SCRAM verifier logs in by SCRAM only: a server that asks for its password
 * in clear or as md5, or lets it in unasked, is refused and gets nothing.
 */
static void subtest_minted_role_scram_only(void)
{
	static const uint8_t clear[] = { 'R', 0, 0, 0, 8, 0, 0, 0, 3 };
	static const uint8_t md5[] = { 'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4 };
	static const uint8_t ok[] = { 'R', 0, 0, 0, 8, 0, 0, 0, 0 };
	const uint8_t *msgs[] = { clear, md5, ok };
	const size_t lens[] = { sizeof(clear), sizeof(md5), sizeof(ok) };
	struct ag_scram_salted k = { 0 };

	for (size_t i = 0; i < 3; i++) {
		struct pg_login l;
		struct ag_buf reply = { 0 };
		char state[6] = "", why[256] = "";
		int rc;

		pg_login_init(&l, "agentgate_s1_ci", "minted-secret-password");
		pg_login_use_salted(&l, &k);
		rc = pg_login_server_msg(&l, msgs[i], lens[i], &reply, state, why, sizeof(why));
		ASSERT_LT(rc, 0, "refused");
		ASSERT_STREQ(state, "28000", "28000");
		ASSERT_EQ(ag_buf_len(&reply), 0, "nothing sent to the server");
		ASSERT_FALSE(strstr(why, "minted-secret-password"), "no secret in the reason");
		ag_buf_free(&reply);
		pg_login_fini(&l);
	}
}

void test_scram(void)
{
	if (test__start_subtest("minted_role_scram_only"))
		subtest_minted_role_scram_only();
	if (test__start_subtest("rfc7677_vectors"))
		subtest_rfc7677();
	if (test__start_subtest("wrong_server_signature_refused"))
		subtest_wrong_server_signature();
	if (test__start_subtest("server_nonce_checked"))
		subtest_server_nonce();
	if (test__start_subtest("md5_answer"))
		subtest_md5();
}

/* --- secret files and the policy ------------------------------------------------------------------ */

static int write_file(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	ssize_t n = (ssize_t)strlen(text);

	if (fd < 0)
		return -errno;
	if (write(fd, text, n) != n || fchmod(fd, mode)) {
		close(fd);
		return -EIO;
	}
	close(fd);
	return 0;
}

static void subtest_secret_parse(const char *dir)
{
	struct ag_secret sec;
	char path[256];

	snprintf(path, sizeof(path), "%s/ok", dir);
	write_file(path,
		   "# admin of orders-db\n"
		   "user=admin  password='it\\'s \\'quoted\\' with spaces'\n"
		   "dbname=orders host=db.internal port=6432 sslmode=require\n",
		   0600);
	if (!ASSERT_OK(ag_secret_read(path, &sec, err, sizeof(err)), "read"))
		printf("%s\n", err);
	ASSERT_STREQ(sec.user, "admin", "user");
	ASSERT_STREQ(sec.password, "it's 'quoted' with spaces", "quoted password");
	ASSERT_STREQ(sec.dbname, "orders", "dbname");
	ASSERT_STREQ(sec.host, "db.internal", "host");
	ASSERT_STREQ(sec.port, "6432", "port");
	ASSERT_STREQ(sec.sslmode, "require", "sslmode");
	ag_secret_wipe(&sec);

	write_file(path, "user=admin password=hunter2 garbage\n", 0600);
	ASSERT_EQ(ag_secret_read(path, &sec, err, sizeof(err)), -EINVAL, "a bare word");
	ASSERT_HAS_SUBSTR(err, ":1: expected key=value", "names the line");
	ASSERT_FALSE(strstr(err, "hunter2"), "the error does not echo the password");
}

static void subtest_secret_modes(const char *dir)
{
	struct ag_secret sec;
	char path[256], link[256];

	snprintf(path, sizeof(path), "%s/modes", dir);
	write_file(path, "user=a password=hunter2\n", 0640);
	ASSERT_EQ(ag_secret_read(path, &sec, err, sizeof(err)), -EACCES, "group-readable read");
	ASSERT_HAS_SUBSTR(err, "/modes: must be owned by root and mode 0600 (is 0640)",
			  "says what it must be and what it is");
	ASSERT_HAS_SUBSTR(err, "group-accessible", "says group-readable");
	ASSERT_HAS_SUBSTR(err, "chmod 600", "and the fix");
	ASSERT_EQ(ag_secret_check(path, err, sizeof(err)), -EACCES, "group-readable check");

	chmod(path, 0604);
	ASSERT_EQ(ag_secret_read(path, &sec, err, sizeof(err)), -EACCES, "world-readable");
	ASSERT_HAS_SUBSTR(err, "world-accessible", "says world-readable");

	chmod(path, 0600);
	if (!ASSERT_EQ(chown(path, 65534, 65534), 0, "chown nobody"))
		return;
	ASSERT_EQ(ag_secret_read(path, &sec, err, sizeof(err)), -EACCES, "not root's");
	ASSERT_HAS_SUBSTR(err, "(is 0600, owned by uid 65534, not root)", "says who owns it");
	ASSERT_EQ(chown(path, 0, 0), 0, "chown root");
	ASSERT_OK(ag_secret_read(path, &sec, err, sizeof(err)), "0600 root-owned is read");
	ag_secret_wipe(&sec);

	snprintf(link, sizeof(link), "%s/link", dir);
	ASSERT_OK(symlink(path, link), "symlink");
	ASSERT_EQ(ag_secret_read(link, &sec, err, sizeof(err)), -EACCES, "symlink refused");
	ASSERT_HAS_SUBSTR(err, "symbolic link", "says so");
	ASSERT_EQ(ag_secret_check(link, err, sizeof(err)), -EACCES, "symlink refused by the check");
	ASSERT_HAS_SUBSTR(err, "/link: is a symbolic link: refused", "names the path");
}

static void subtest_policy(const char *dir)
{
	char yaml[1024], path[256], warn[512];
	struct ag_policy *p;

	snprintf(yaml, sizeof(yaml),
		 "apiVersion: agentgate/v1\n"
		 "targets:\n"
		 "  - { name: db, protocol: postgres, address: 127.0.0.9:5432,\n"
		 "      credential: { provider: pg-jit-role, admin_secret: /s, ttl: 25h } }\n");
	p = ag_policy_parse(yaml, strlen(yaml), "bad.yaml", err, sizeof(err));
	ASSERT_FALSE(p, "ttl over 24h refused");
	ASSERT_HAS_SUBSTR(err, "credential ttl 25h is out of range (1s to 24h)", "and why");
	ag_policy_free(p);

	snprintf(yaml, sizeof(yaml),
		 "apiVersion: agentgate/v1\n"
		 "targets:\n"
		 "  - { name: kube, protocol: http, address: 127.0.0.9:6443,\n"
		 "      credential: { provider: jwt, key_file: /k } }\n");
	p = ag_policy_parse(yaml, strlen(yaml), "bad.yaml", err, sizeof(err));
	ASSERT_FALSE(p, "a jwt without audience refused");
	ASSERT_HAS_SUBSTR(err, "credential provider jwt needs audience", "and why");
	ag_policy_free(p);

	snprintf(path, sizeof(path), "%s/grp", dir);
	write_file(path, "user=a password=b\n", 0640);
	snprintf(yaml, sizeof(yaml),
		 "apiVersion: agentgate/v1\n"
		 "targets:\n"
		 "  - { name: db, protocol: postgres, address: 127.0.0.9:5432,\n"
		 "      credential: { provider: pg-jit-role, admin_secret: %s, ttl: 10m } }\n"
		 "  - { name: db2, protocol: postgres, address: 127.0.0.9:5433,\n"
		 "      credential: { provider: static, secret_file: %s/missing } }\n",
		 path, dir);
	p = ag_policy_parse(yaml, strlen(yaml), "p.yaml", err, sizeof(err));
	if (!ASSERT_OK_PTR(p, "parses"))
		return;
	ASSERT_EQ(ag_cred_check_policy(p, err, sizeof(err), warn, sizeof(warn)), -EACCES,
		  "a group-readable admin_secret refuses the policy");
	ASSERT_HAS_SUBSTR(err, "target db: credential.admin_secret", "names the target and key");
	ASSERT_HAS_SUBSTR(err, "group-accessible", "and the problem");
	chmod(path, 0600);
	ASSERT_OK(ag_cred_check_policy(p, err, sizeof(err), warn, sizeof(warn)),
		  "0600: accepted; a missing file is a warning");
	ASSERT_HAS_SUBSTR(warn, "target db2: credential.secret_file", "the warning names it");
	ag_policy_free(p);
}

void test_cred_secret(void)
{
	char dir[] = "/tmp/agentgate-cred-XXXXXX";

	if (!ASSERT_OK_PTR(mkdtemp(dir), "mkdtemp"))
		return;
	if (test__start_subtest("parse"))
		subtest_secret_parse(dir);
	if (test__start_subtest("bad_modes_refused"))
		subtest_secret_modes(dir);
	if (test__start_subtest("policy"))
		subtest_policy(dir);
	th_rm_rf(dir);
}

/* --- JWT ------------------------------------------------------------------------------------------ */

static const char verify_py[] =
	"import sys, json, base64, time, hashlib\n"
	"from cryptography.hazmat.primitives import hashes, serialization\n"
	"from cryptography.hazmat.primitives.asymmetric import ec, utils\n"
	"tok, pub, aud, ttl = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])\n"
	"def d(s): return base64.urlsafe_b64decode(s + '=' * (-len(s) % 4))\n"
	"h, c, s = tok.split('.')\n"
	"hdr, cl, sig = json.loads(d(h)), json.loads(d(c)), d(s)\n"
	"key = serialization.load_pem_public_key(open(pub, 'rb').read())\n"
	"assert len(sig) == 64, 'signature is not r||s'\n"
	"der = utils.encode_dss_signature(int.from_bytes(sig[:32], 'big'),\n"
	"                                 int.from_bytes(sig[32:], 'big'))\n"
	"key.verify(der, (h + '.' + c).encode(), ec.ECDSA(hashes.SHA256()))\n"
	"spki = key.public_bytes(serialization.Encoding.DER,\n"
	"                        serialization.PublicFormat.SubjectPublicKeyInfo)\n"
	"assert hdr == {'alg': 'ES256', 'typ': 'JWT', 'kid': hashlib.sha256(spki).hexdigest()[:16]}, hdr\n"
	"now = time.time()\n"
	"assert cl['aud'] == aud, 'aud'\n"
	"assert cl['iss'] == 'agentgate', 'iss'\n"
	"assert cl['exp'] > now, 'expired'\n"
	"assert cl['exp'] - cl['iat'] <= ttl and cl['exp'] <= now + ttl + 1, 'exp beyond ttl'\n"
	"assert cl['nbf'] <= now + 1, 'nbf'\n"
	"print(json.dumps(cl))\n";

/* A policy with one http target "kube" whose credential is a jwt signed with key. */
static struct ag_policy *jwt_policy(const char *key, const char *ttl)
{
	char yaml[1024];
	struct ag_policy *p;

	snprintf(yaml, sizeof(yaml),
		 "apiVersion: agentgate/v1\n"
		 "targets:\n"
		 "  - { name: kube, protocol: http, address: 127.0.0.9:6443,\n"
		 "      credential: { provider: jwt, key_file: %s, audience: kube%s%s } }\n",
		 key, ttl ? ", ttl: " : "", ttl ? ttl : "");
	p = ag_policy_parse(yaml, strlen(yaml), "p.yaml", err, sizeof(err));
	ASSERT_OK_PTR(p, "policy");
	return p;
}

static struct ag_session *fake_session(const struct ag_policy *p, uint64_t id)
{
	struct ag_session *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->id = id;
	s->target = ag_policy_target_by_name(p, "kube");
	snprintf(s->target_name, sizeof(s->target_name), "kube");
	snprintf(s->agent, sizeof(s->agent), "ci");
	snprintf(s->cgroup, sizeof(s->cgroup), "/agents.slice/job-\"42\"");
	snprintf(s->info.comm, sizeof(s->info.comm), "kubectl");
	s->info.uid = 1234;
	s->info.tgid = 4321;
	return s;
}

/* Runs fn with the process's stderr (the daemon library's log) into a file; its text in buf. */
static int bearer_logged(struct ag_session *s, char *tok, size_t toklen, char *log, size_t loglen)
{
	char path[] = "/tmp/agentgate-cred-log-XXXXXX";
	int fd = mkstemp(path), saved = dup(2), rc;
	ssize_t n;

	fflush(stderr);
	dup2(fd, 2);
	rc = ag_cred_bearer(s, tok, toklen, err, sizeof(err));
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	n = pread(fd, log, loglen - 1, 0);
	log[n > 0 ? n : 0] = '\0';
	close(fd);
	unlink(path);
	return rc;
}

static void subtest_jwt(const char *dir)
{
	char key[256], pub[256], tok[4096], tok2[4096], log[8192], *ttl = "300";
	char *argv[] = { "/usr/bin/python3", "-c", (char *)verify_py, tok, pub, "kube", ttl, NULL };
	struct ag_session *s = NULL, *s2 = NULL;
	struct ag_policy *p;
	int rc;

	snprintf(key, sizeof(key), "%s/jwt.key", dir);
	snprintf(pub, sizeof(pub), "%s/jwt.pub", dir);
	if (!ASSERT_OK(th_run(out, sizeof(out),
			      "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s",
			      key),
		       "openssl genpkey") ||
	    !ASSERT_OK(chmod(key, 0600), "chmod") ||
	    !ASSERT_OK(th_run(out, sizeof(out), "openssl pkey -in %s -pubout -out %s", key, pub),
		       "openssl pkey -pubout"))
		return;
	p = jwt_policy(key, "5m");
	if (!p)
		return;
	s = fake_session(p, 77);
	s2 = fake_session(p, 78);
	if (!ASSERT_OK_PTR(s, "session") || !ASSERT_OK_PTR(s2, "session"))
		goto out;
	rc = bearer_logged(s, tok2, sizeof(tok2), log, sizeof(log));
	if (!ASSERT_GT(rc, 7, "bearer"))
		goto out;
	ASSERT_EQ(strncmp(tok2, "Bearer ", 7), 0, "an Authorization value");
	memmove(tok, tok2 + 7, strlen(tok2 + 7) + 1);
	ASSERT_FALSE(strstr(log, tok), "the token is not in the log");
	ASSERT_HAS_SUBSTR(log, "jwt credential issued", "its issue is");

	rc = th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	if (!ASSERT_EQ(rc, 0, "the independent verifier accepts it"))
		printf("verifier: %s\n", err);
	ASSERT_HAS_SUBSTR(out, "\"sub\": \"agent:ci uid:1234 comm:kubectl cgroup:/agents.slice/job-\\\"42\\\"\"",
			  "sub names the kernel identity");
	ASSERT_HAS_SUBSTR(out, "\"jti\": \"s77-", "jti names the session");
	ASSERT_HAS_SUBSTR(out, "\"pid\": 4321", "and the pid");

	/* Cached for the session; another session gets its own jti. */
	ASSERT_GT(ag_cred_bearer(s, tok2, sizeof(tok2), err, sizeof(err)), 0, "again");
	ASSERT_STREQ(tok2 + 7, tok, "the same token for the same session");
	ASSERT_GT(ag_cred_bearer(s2, tok2, sizeof(tok2), err, sizeof(err)), 0, "other session");
	ASSERT_NEQ(strcmp(tok2 + 7, tok), 0, "another session, another token");

	/* A tampered token does not verify. */
	tok[strlen(tok) - 2] = tok[strlen(tok) - 2] == 'A' ? 'B' : 'A';
	rc = th_pg_exec(NULL, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	ASSERT_NEQ(rc, 0, "a tampered signature fails the verifier");

	/* Too short a buffer: refused, not truncated. */
	ASSERT_EQ(ag_cred_bearer(s, tok2, 16, err, sizeof(err)), -ENOSPC, "short buffer");
out:
	if (s)
		ag_cred_session_end(s);
	if (s2)
		ag_cred_session_end(s2);
	free(s);
	free(s2);
	ag_policy_free(p);
}

static void subtest_jwt_bad_keys(const char *dir)
{
	char key[256], tok[4096];
	struct ag_session *s = NULL;
	struct ag_policy *p;

	snprintf(key, sizeof(key), "%s/rsa.key", dir);
	if (!ASSERT_OK(th_run(out, sizeof(out),
			      "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out %s",
			      key),
		       "openssl genpkey rsa") ||
	    !ASSERT_OK(chmod(key, 0600), "chmod"))
		return;
	p = jwt_policy(key, NULL);
	if (!p)
		return;
	s = fake_session(p, 79);
	ASSERT_LT(ag_cred_bearer(s, tok, sizeof(tok), err, sizeof(err)), 0, "RSA key refused");
	ASSERT_HAS_SUBSTR(err, "not an EC P-256 private key", "says ES256 needs P-256");
	chmod(key, 0640);
	ASSERT_LT(ag_cred_bearer(s, tok, sizeof(tok), err, sizeof(err)), 0,
		  "group-readable key refused");
	ASSERT_HAS_SUBSTR(err, "group-accessible", "says why");
	ag_cred_session_end(s);
	free(s);
	ag_policy_free(p);
}

void test_cred_jwt(void)
{
	char dir[] = "/tmp/agentgate-jwt-XXXXXX";
	char *py[] = { "/usr/bin/python3", "-c", "import cryptography", NULL };

	if (!ASSERT_OK_PTR(mkdtemp(dir), "mkdtemp"))
		return;
	if (access("/usr/bin/python3", X_OK) ||
	    th_pg_exec(NULL, py, NULL, out, sizeof(out), err, sizeof(err), 30000)) {
		test__skip("python3 with cryptography is needed as the independent verifier");
		th_rm_rf(dir);
		return;
	}
	if (test__start_subtest("es256_verified_independently"))
		subtest_jwt(dir);
	if (test__start_subtest("bad_keys_refused"))
		subtest_jwt_bad_keys(dir);
	th_rm_rf(dir);
}

/* --- end to end with PostgreSQL -------------------------------------------------------------------- */

#define CRED_RULES                                                                                 \
	"    sql:\n"                                                                               \
	"      - { name: reads, when: { command: [select, set, show, begin, commit, rollback] },"  \
	" then: allow }\n"

struct cred_ctx {
	char dir[64];
	char secret[128];
	const char *encryption; /* the admin's and the minted roles' password hashing */
	bool leftover;		/* a role from a previous life, for the sweep */
};

/* A temp dir for the secret files; the admin's secret path in it. */
static bool ctx_init(struct cred_ctx *c, const char *encryption, bool leftover)
{
	memset(c, 0, sizeof(*c));
	c->encryption = encryption;
	c->leftover = leftover;
	snprintf(c->dir, sizeof(c->dir), "/tmp/agentgate-credpg-XXXXXX");
	if (!ASSERT_OK_PTR(mkdtemp(c->dir), "mkdtemp")) {
		c->dir[0] = '\0';
		return false;
	}
	snprintf(c->secret, sizeof(c->secret), "%s/admin.secret", c->dir);
	return true;
}

static int before_daemon(struct th_pg_gate *g, void *arg)
{
	struct cred_ctx *c = arg;
	int rc;

	rc = th_pg_admin(&g->pg,
			 "CREATE ROLE app_ro NOLOGIN; CREATE ROLE app_audit NOLOGIN;\n"
			 "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_ro;\n",
			 NULL, 0);
	if (rc)
		return -EIO;
	rc = th_pg_admin_role(&g->pg, ADMIN_ROLE, ADMIN_PASSWORD, c->encryption, c->secret);
	if (rc)
		return rc;
	if (c->leftover &&
	    th_pg_admin(&g->pg, "CREATE ROLE agentgate_s999999_old LOGIN; "
				"CREATE ROLE agentgate_keep_me NOLOGIN;", NULL, 0))
		return -EIO;
	return 0;
}

static void gate_down(struct th_pg_gate *g, struct cred_ctx *c)
{
	th_pg_gate_cleanup(g);
	if (c->dir[0])
		th_rm_rf(c->dir);
}

/* psql from the tagged cgroup, no password anywhere, as user agent (which it cannot log in as). */
static int psql_nopw(struct th_pg_gate *g, const char *sql)
{
	char conn[256];
	char *argv[] = { "/usr/bin/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
			 "-d",		  conn,	  NULL };

	snprintf(conn, sizeof(conn), "host=%s port=%d user=%s dbname=%s application_name=cred-test",
		 g->pg.addr, g->pg.port, TH_PG_USER, TH_PG_DB);
	return th_pg_exec_nopw(g->tagged, argv, sql, out, sizeof(out), err, sizeof(err), 60000);
}

static int role_count(struct th_pg_gate *g, const char *like)
{
	char sql[256], o[64];

	snprintf(sql, sizeof(sql), "SELECT count(*) FROM pg_roles WHERE rolname LIKE '%s';", like);
	if (th_pg_admin(&g->pg, sql, o, sizeof(o)))
		return -1;
	return atoi(o);
}

/* Polls until no role named like `like` is left (a deadline, not a timing assertion). */
static bool roles_gone(struct th_pg_gate *g, const char *like, int deadline_s)
{
	for (int i = 0; i < deadline_s * 5; i++) {
		if (role_count(g, like) == 0)
			return true;
		usleep(200 * 1000);
	}
	return false;
}

/* The secrets must be absent from every output. */
static void check_no_secrets(struct th_pg_gate *g, const char *const *secrets)
{
	static char log[512 * 1024], buf[256 * 1024];
	const char *cmds[] = { "-j session list", "session list", "-j cred list", "cred list",
			       "-j policy show", "policy show" };
	char path[256];
	regex_t re;
	int fd;
	ssize_t n;

	ASSERT_OK(th_daemon_read_log(&g->d, log, sizeof(log)), "daemon log");
	if (test__verbose())
		printf("daemon log:\n%s\n", log);
	snprintf(path, sizeof(path), "%s/sessions.log", g->d.state_dir);
	fd = open(path, O_RDONLY);
	n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
	buf[n > 0 ? n : 0] = '\0';
	if (fd >= 0)
		close(fd);
	ASSERT_GT(strlen(buf), 0, "sessions.log has lines");
	/* Minted passwords: 32 random bytes in base64, 44 characters ending in '='. */
	regcomp(&re, "[A-Za-z0-9+/]{43}=", REG_EXTENDED | REG_NOSUB);
	for (const char *const *s = secrets; *s; s++) {
		ASSERT_FALSE(strstr(log, *s), "a secret in the daemon log");
		ASSERT_FALSE(strstr(buf, *s), "a secret in sessions.log");
	}
	ASSERT_NEQ(regexec(&re, log, 0, NULL, 0), 0, "no minted password in the daemon log");
	ASSERT_NEQ(regexec(&re, buf, 0, NULL, 0), 0, "no minted password in sessions.log");
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		th_agctl(&g->d, buf, sizeof(buf), "%s", cmds[i]);
		for (const char *const *s = secrets; *s; s++)
			if (!ASSERT_FALSE(strstr(buf, *s), "a secret in agctl output"))
				printf("agctl %s\n", cmds[i]);
		if (!ASSERT_NEQ(regexec(&re, buf, 0, NULL, 0), 0, "a minted password in agctl"))
			printf("agctl %s\n", cmds[i]);
	}
	regfree(&re);
}

/* A raw connection: the gateway answers AuthenticationOk itself; no password is asked. */
static int raw_login(struct th_pg_gate *g, char *sqlstate, char *msg, size_t msglen)
{
	char types[64];
	static const char params[] = "user\0agent\0database\0" TH_PG_DB "\0application_name\0raw\0";
	int fd = th_pg_connect_from(g->tagged, g->pg.addr, g->pg.port), rc;
	struct ag_buf b = { 0 };
	uint8_t hdr[8];

	if (fd < 0)
		return fd;
	pg_put32(hdr + 4, PG_PROTO_V3);
	ag_buf_append(&b, hdr, 8);
	ag_buf_append(&b, params, sizeof(params)); /* the literal's own NUL ends the list */
	pg_put32(b.data, (uint32_t)ag_buf_len(&b));
	th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000);
	ag_buf_free(&b);
	sqlstate[0] = msg[0] = '\0';
	rc = th_pg_raw_collect(fd, 1, types, sizeof(types), sqlstate, msg, msglen, 60000);
	if (rc || sqlstate[0]) {
		close(fd);
		return rc ? rc : -EACCES;
	}
	return fd;
}

static void subtest_jit_role(struct th_pg_gate *g)
{
	static char list[65536];
	char role[128] = "", sqlstate[8], msg[512], like[160];
	long long sid = -1;
	yajl_val root;
	int rc, fd;

	rc = psql_nopw(g, "SELECT current_user, rolvaliduntil > now(), "
			  "rolvaliduntil <= now() + interval '10 minutes', "
			  "pg_has_role(current_user, 'app_ro', 'member'), "
			  "pg_has_role(current_user, 'app_audit', 'member'), "
			  "current_setting('application_name'), "
			  "(SELECT count(*) FROM users) "
			  "FROM pg_roles WHERE rolname = current_user;");
	if (!ASSERT_EQ(rc, 0, "psql with no password through the gateway"))
		printf("stderr: %s\n", err);
	ASSERT_EQ(strncmp(out, "agentgate_s", 11), 0, "logged in as a role minted for the session");
	ASSERT_HAS_SUBSTR(out, "_t|t|t|t|t|cred-test|3\n",
			  "named for agent t, expiring within the ttl, member of both grant "
			  "roles, the agent's application_name, reading through app_ro");
	sscanf(out, "%127[^|]", role);
	ASSERT_TRUE(roles_gone(g, role, 60), "the role is dropped after the session");
	th_daemon_read_log(&g->d, out, sizeof(out));
	ASSERT_HAS_SUBSTR(out, "(pg-jit-role, SCRAM-SHA-256, keys stretched off the loop)",
			  "SCRAM with the verifier the gateway wrote: no PBKDF2 on the loop");
	ASSERT_HAS_SUBSTR(out, "pg-jit-role without tls: the admin login",
			  "a pg-jit-role target without tls: is warned about at start");

	/* psycopg2 too: its password (PGPASSWORD is set for it) is never asked for. */
	rc = th_pg_python(&g->pg, g->tagged,
			  "import psycopg2\n"
			  "c = psycopg2.connect('')\n"
			  "cur = c.cursor()\n"
			  "cur.execute('SELECT current_user, count(*) FROM orders')\n"
			  "print('%s|%d' % cur.fetchone())\n",
			  out, sizeof(out), err, sizeof(err), 30000);
	if (!ASSERT_EQ(rc, 0, "psycopg2"))
		printf("stderr: %s\n", err);
	ASSERT_EQ(strncmp(out, "agentgate_s", 11), 0, "psycopg2 as a minted role");
	ASSERT_HAS_SUBSTR(out, "_t|5\n", "reading orders through app_ro");

	/* A live session: its credential is listed (no secret), the session names it. */
	fd = raw_login(g, sqlstate, msg, sizeof(msg));
	if (!ASSERT_GE(fd, 0, "raw login without a password")) {
		printf("%s %s\n", sqlstate, msg);
		return;
	}
	ASSERT_OK(th_agctl(&g->d, list, sizeof(list), "-j cred list"), "agctl -j cred list");
	root = th_json_parse(list);
	if (ASSERT_TRUE(root && YAJL_IS_ARRAY(root) && YAJL_GET_ARRAY(root)->len == 1,
			"one live credential")) {
		yajl_val c = YAJL_GET_ARRAY(root)->values[0];

		ASSERT_STREQ(th_json_str(c, "provider"), "pg-jit-role", "provider");
		ASSERT_STREQ(th_json_str(c, "target"), "db", "target");
		ASSERT_STREQ(th_json_str(c, "state"), "active", "state");
		ASSERT_TRUE(th_json_str(c, "expires_at"), "expires_at");
		ASSERT_TRUE(th_json_str(c, "issued_at"), "issued_at");
		snprintf(role, sizeof(role), "%s", th_json_str(c, "principal") ?: "");
		th_json_int(c, "session", &sid);
	}
	yajl_tree_free(root);
	ASSERT_EQ(strncmp(role, "agentgate_s", 11), 0, "principal is the role");
	ASSERT_EQ(role_count(g, role), 1, "the role exists while the session lives");
	ASSERT_OK(th_agctl(&g->d, list, sizeof(list), "-j session show %lld", sid), "session show");
	ASSERT_HAS_SUBSTR(list, "\"db_user\":\"agent\"", "db_user recorded");
	ASSERT_HAS_SUBSTR(list, "\"database\":\"" TH_PG_DB "\"", "database recorded");
	ASSERT_HAS_SUBSTR(list, "\"credential\":\"pg-jit-role\"", "credential provider");
	ASSERT_OK(th_agctl(&g->d, list, sizeof(list), "cred list"), "agctl cred list");
	ASSERT_HAS_SUBSTR(list, role, "the plain table names the role");
	close(fd);
	snprintf(like, sizeof(like), "%s", role);
	ASSERT_TRUE(roles_gone(g, like, 60), "dropped after the raw session too");
	for (int i = 0; i < 100; i++) {
		th_agctl(&g->d, list, sizeof(list), "-j cred list");
		if (!strcmp(list, "[]\n") || !strcmp(list, "[]"))
			break;
		usleep(100 * 1000);
	}
	ASSERT_HAS_SUBSTR(list, "[]", "no live credential after");
}

static void subtest_wrong_admin_password(struct th_pg_gate *g, struct cred_ctx *c)
{
	char sqlstate[8], msg[512];
	int fd;

	ASSERT_OK(th_pg_admin(&g->pg, "ALTER ROLE " ADMIN_ROLE " PASSWORD 'changed-behind-us';",
			      NULL, 0),
		  "the admin password changes");
	fd = raw_login(g, sqlstate, msg, sizeof(msg));
	ASSERT_LT(fd, 0, "the agent is refused");
	ASSERT_STREQ(sqlstate, "28000", "invalid authorization");
	ASSERT_HAS_SUBSTR(msg, "agentgate: no credential for target db: admin login as "
			  "\"" ADMIN_ROLE "\" failed", "names the reason");
	ASSERT_FALSE(strstr(msg, ADMIN_PASSWORD), "without the password");
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
	ASSERT_OK(th_pg_admin(&g->pg, "ALTER ROLE " ADMIN_ROLE " PASSWORD '" ADMIN_PASSWORD "';",
			      NULL, 0),
		  "restored");
	/* And the secret file made readable to all after the load: refused at use. */
	chmod(c->secret, 0644);
	fd = raw_login(g, sqlstate, msg, sizeof(msg));
	ASSERT_LT(fd, 0, "world-readable secret: refused");
	ASSERT_HAS_SUBSTR(msg, ": must be owned by root and mode 0600 (is 0644)", "says why");
	/* A reload is refused for the same reason; the running policy stays. */
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "policy reload"), 1, "reload refused");
	th_daemon_read_log(&g->d, out, sizeof(out));
	ASSERT_HAS_SUBSTR(out, "policy reload refused, the previous policy stays", "logged");
	chmod(c->secret, 0600);
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
	ASSERT_EQ(psql_nopw(g, "SELECT 1;"), 0, "and it works again");
}

/* How many startup sweeps the daemon's log reports. */
static int sweeps_logged(struct th_pg_gate *g)
{
	static char log[256 * 1024];
	int n = 0;

	th_daemon_read_log(&g->d, log, sizeof(log));
	for (const char *p = log; (p = strstr(p, "startup sweep dropped")); p++)
		n++;
	return n;
}

/* A role someone is logged in as (another gateway's, live) is not swept. */
static void subtest_sweep_spares_busy(struct th_pg_gate *g)
{
	char port[16], o[64];
	char *argv[] = { "/usr/bin/psql", "-X", "-q", "-h", g->pg.dir, "-p", port, "-U",
			 "agentgate_s999997_busy", "-d", TH_PG_DB, "-c", "SELECT pg_sleep(60)",
			 NULL };
	int before, i;
	pid_t pid;

	snprintf(port, sizeof(port), "%d", g->pg.port);
	if (!ASSERT_OK(th_pg_admin(&g->pg, "CREATE ROLE agentgate_s999997_busy LOGIN;", NULL, 0),
		       "a busy role"))
		return;
	fflush(NULL);
	pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);

		dup2(null, 1);
		dup2(null, 2);
		execv(argv[0], argv); /* over the unix socket: trust */
		_exit(127);
	}
	if (!ASSERT_GT(pid, 0, "fork"))
		return;
	for (i = 0; i < 100; i++) {
		th_pg_admin(&g->pg,
			    "SELECT count(*) FROM pg_stat_activity WHERE usename = "
			    "'agentgate_s999997_busy';",
			    o, sizeof(o));
		if (atoi(o) > 0)
			break;
		usleep(100 * 1000);
	}
	ASSERT_LT(i, 100, "logged in as it");
	before = sweeps_logged(g);
	ASSERT_OK(th_daemon_restart(&g->d), "restart");
	for (i = 0; i < 300 && sweeps_logged(g) <= before; i++)
		usleep(100 * 1000);
	ASSERT_GT(sweeps_logged(g), before, "the sweep ran");
	ASSERT_EQ(role_count(g, "agentgate\\_s999997\\_busy"), 1, "the busy role is left alone");
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	th_pg_admin(&g->pg,
		    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = "
		    "'agentgate_s999997_busy';",
		    NULL, 0);
	for (i = 0; i < 100 && role_count(g, "agentgate\\_s999997\\_busy") == 1; i++) {
		if (!th_pg_admin(&g->pg, "DROP ROLE IF EXISTS agentgate_s999997_busy;", NULL, 0))
			break;
		usleep(100 * 1000);
	}
}

static void subtest_sweep(struct th_pg_gate *g)
{
	static char log[256 * 1024];

	/* before_daemon made agentgate_s999999_old: the start swept it, and only it. */
	ASSERT_TRUE(roles_gone(g, "agentgate\\_s999999\\_old", 60), "leftover swept at start");
	ASSERT_EQ(role_count(g, "agentgate\\_keep\\_me"), 1, "a role without the s prefix stays");
	th_daemon_read_log(&g->d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "leftover role agentgate_s999999_old dropped", "logged");
	/* A restart sweeps again. */
	ASSERT_OK(th_pg_admin(&g->pg, "CREATE ROLE agentgate_s999998_old2 LOGIN;", NULL, 0),
		  "another leftover");
	ASSERT_OK(th_daemon_restart(&g->d), "restart");
	ASSERT_TRUE(roles_gone(g, "agentgate\\_s999998\\_old2", 60), "swept at the restart");
	subtest_sweep_spares_busy(g);
}

/* The daemon dies (SIGKILL) with a session's role alive: the next start drops it. */
static void subtest_crash_then_sweep(struct th_pg_gate *g)
{
	char sqlstate[8], msg[512];
	int fd = raw_login(g, sqlstate, msg, sizeof(msg));

	if (!ASSERT_GE(fd, 0, "a live session"))
		return;
	ASSERT_EQ(role_count(g, "agentgate\\_s%"), 1, "its role exists");
	ASSERT_EQ(th_daemon_kill(&g->d), 128 + SIGKILL, "SIGKILL the daemon");
	close(fd);
	ASSERT_EQ(role_count(g, "agentgate\\_s%"), 1, "the role outlived the daemon");
	ASSERT_OK(th_daemon_restart(&g->d), "restart");
	ASSERT_TRUE(roles_gone(g, "agentgate\\_s%", 60), "the restart swept it");
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
}

/*
 * The admin's connection follows the target's tls: (this server speaks no TLS, so verify-full
 * must fail the minting, never fall back to clear text).
 */
static void subtest_admin_follows_tls(struct th_pg_gate *g)
{
	char saved[sizeof(g->target_extra)], sqlstate[8], msg[512];
	int fd;

	memcpy(saved, g->target_extra, sizeof(saved));
	snprintf(g->target_extra + strlen(g->target_extra),
		 sizeof(g->target_extra) - strlen(g->target_extra),
		 "    tls: { upstream: verify-full }\n");
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", CRED_RULES), "reload with tls"))
		goto out;
	fd = raw_login(g, sqlstate, msg, sizeof(msg));
	ASSERT_LT(fd, 0, "refused");
	if (!ASSERT_TRUE(strstr(msg, "SSL") || strstr(msg, "TLS"), "because of TLS"))
		printf("message: %s\n", msg);
	ASSERT_EQ(role_count(g, "agentgate\\_s%"), 0, "no role was made");
out:
	memcpy(g->target_extra, saved, sizeof(saved));
	ASSERT_OK(th_pg_gate_rules(g, "enforce", CRED_RULES), "reload without");
	ASSERT_EQ(psql_nopw(g, "SELECT 1;"), 0, "and it works again");
}

/* Sessions at once: each its own role (admin connections queue, daemon-wide), all dropped. */
static void subtest_parallel(struct th_pg_gate *g)
{
	enum { N = 12 };
	pid_t pids[N];
	int ok = 0;

	fflush(NULL); /* nothing buffered to be written twice by the children */
	for (int i = 0; i < N; i++) {
		pids[i] = fork();
		if (pids[i] == 0)
			_exit(psql_nopw(g, "SELECT current_user, pg_sleep(0.3);") ||
			      strncmp(out, "agentgate_s", 11));
	}
	for (int i = 0; i < N; i++) {
		int st = -1;

		if (pids[i] > 0 && waitpid(pids[i], &st, 0) == pids[i] && WIFEXITED(st) &&
		    !WEXITSTATUS(st))
			ok++;
	}
	ASSERT_EQ(ok, N, "every session logged in as a minted role");
	ASSERT_TRUE(roles_gone(g, "agentgate\\_s%", 90), "every role dropped");
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
}

/* The agent hangs up while its role is being minted: nothing is left behind. */
static void subtest_agent_leaves_during_mint(struct th_pg_gate *g)
{
	static const char params[] = "user\0agent\0database\0" TH_PG_DB "\0";
	uint8_t pkt[64];
	int fd;

	for (int i = 0; i < 5; i++) {
		fd = th_pg_connect_from(g->tagged, g->pg.addr, g->pg.port);
		if (!ASSERT_GE(fd, 0, "connect"))
			return;
		pg_put32(pkt, 8 + sizeof(params));
		pg_put32(pkt + 4, PG_PROTO_V3);
		memcpy(pkt + 8, params, sizeof(params));
		th_send_all(fd, pkt, 8 + sizeof(params), 10000);
		/* Now or a moment later: before or after the role exists. */
		if (i % 2)
			usleep(50 * 1000 * i);
		close(fd);
	}
	ASSERT_TRUE(roles_gone(g, "agentgate\\_s%", 60), "no role left behind");
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
	for (int i = 0; i < 100; i++) {
		static char list[4096];

		th_agctl(&g->d, list, sizeof(list), "-j cred list");
		if (strstr(list, "[]"))
			break;
		usleep(100 * 1000);
	}
	ASSERT_EQ(psql_nopw(g, "SELECT 1;"), 0, "and the next session works");
}

void test_cred_pg(void)
{
	static const char *const secrets[] = { ADMIN_PASSWORD, NULL };
	struct cred_ctx c;
	struct th_pg_gate g;
	char cred[512];
	int rc;

	if (!ctx_init(&c, "scram-sha-256", true))
		return;
	snprintf(cred, sizeof(cred),
		 "{ provider: pg-jit-role, admin_secret: %s, grant: [app_ro, app_audit], "
		 "ttl: 10m }",
		 c.secret);
	{
		char extra[768];

		snprintf(extra, sizeof(extra), "    credential: %s\n", cred);
		rc = th_pg_gate_start_ext(&g, "127.0.0.1", "scram-sha-256", "enforce", CRED_RULES,
					  extra, before_daemon, &c);
	}
	if (!ASSERT_OK(rc, "gate with pg-jit-role and SCRAM"))
		goto out;
	if (test__start_subtest("sweep_at_start"))
		subtest_sweep(&g);
	if (test__start_subtest("jit_role_scram"))
		subtest_jit_role(&g);
	if (test__start_subtest("wrong_admin_password_fatal"))
		subtest_wrong_admin_password(&g, &c);
	if (test__start_subtest("agent_leaves_during_mint"))
		subtest_agent_leaves_during_mint(&g);
	if (test__start_subtest("crash_then_sweep"))
		subtest_crash_then_sweep(&g);
	if (test__start_subtest("parallel_sessions"))
		subtest_parallel(&g);
	if (test__start_subtest("admin_follows_target_tls"))
		subtest_admin_follows_tls(&g);
	if (test__start_subtest("secrets_absent")) {
		/* One session more, so that the logs have something to hide. */
		ASSERT_EQ(psql_nopw(&g, "SELECT 1;"), 0, "a session");
		check_no_secrets(&g, secrets);
	}
	test__end_subtest();
out:
	gate_down(&g, &c);
}

void test_cred_pg_md5(void)
{
	struct cred_ctx c;
	struct th_pg_gate g;
	static char log[256 * 1024];
	char role[128] = "";
	int rc;

	if (!ctx_init(&c, "md5", false))
		return;
	{
		char extra[768];

		snprintf(extra, sizeof(extra),
			 "    credential: { provider: pg-jit-role, admin_secret: %s, grant: [app_ro], "
			 "ttl: 2m }\n",
			 c.secret);
		rc = th_pg_gate_start_ext(&g, "127.0.0.1", "md5", "enforce", CRED_RULES, extra,
					  before_daemon, &c);
	}
	if (!ASSERT_OK(rc, "gate with md5"))
		goto out;
	rc = psql_nopw(&g, "SELECT current_user, rolvaliduntil <= now() + interval '2 minutes', 1 "
			   "FROM pg_roles WHERE rolname = current_user;");
	if (!ASSERT_EQ(rc, 0, "psql through the gateway, md5 upstream"))
		printf("stderr: %s\n", err);
	ASSERT_EQ(strncmp(out, "agentgate_s", 11), 0, "as the minted role");
	ASSERT_HAS_SUBSTR(out, "|t|", "expiring within 2m");
	sscanf(out, "%127[^|]", role);
	th_daemon_read_log(&g.d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "(pg-jit-role, md5)", "the server asked for md5");
	ASSERT_TRUE(roles_gone(&g, role, 60), "dropped after");
	test__end_subtest();
out:
	gate_down(&g, &c);
}

void test_cred_pg_static(void)
{
	static const char *const secrets[] = { TH_PG_PASSWORD, "Wr0ng-static-pw", NULL };
	struct cred_ctx c;
	struct th_pg_gate g;
	static char log[256 * 1024], list[8192];
	char extra[768], sqlstate[8], msg[512];
	int rc, fd;

	if (!ctx_init(&c, "scram-sha-256", false))
		return;
	snprintf(extra, sizeof(extra), "%s/static.secret", c.dir);
	ASSERT_OK(write_file(extra, "user=" TH_PG_USER " password=" TH_PG_PASSWORD "\n", 0600),
		  "static secret");
	snprintf(extra, sizeof(extra),
		 "    credential: { provider: static, secret_file: %s/static.secret }\n", c.dir);
	rc = th_pg_gate_start_ext(&g, "127.0.0.1", "scram-sha-256", "enforce", CRED_RULES, extra,
				  before_daemon, &c);
	if (!ASSERT_OK(rc, "gate with a static credential"))
		goto out;
	rc = psql_nopw(&g, "SELECT current_user;");
	if (!ASSERT_EQ(rc, 0, "psql with no password, static credential upstream"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, TH_PG_USER "\n", "logged in as the secret file's user");
	fd = raw_login(&g, sqlstate, msg, sizeof(msg));
	if (ASSERT_GE(fd, 0, "raw login")) {
		ASSERT_OK(th_agctl(&g.d, list, sizeof(list), "cred list"), "cred list");
		ASSERT_HAS_SUBSTR(list, "static", "marked static");
		ASSERT_HAS_SUBSTR(list, "never (static)", "no expiry");
		close(fd);
	}
	th_daemon_read_log(&g.d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "logged in upstream as agent (static, SCRAM-SHA-256)",
			  "SCRAM upstream with the static password");

	/* The server refuses the static password: its own SQLSTATE, no password in the text. */
	snprintf(extra, sizeof(extra), "%s/static.secret", c.dir);
	ASSERT_OK(write_file(extra, "user=" TH_PG_USER " password=Wr0ng-static-pw\n", 0600),
		  "a wrong static password");
	fd = raw_login(&g, sqlstate, msg, sizeof(msg));
	ASSERT_LT(fd, 0, "refused");
	ASSERT_STREQ(sqlstate, "28P01", "the server's invalid_password");
	ASSERT_HAS_SUBSTR(msg, "agentgate: upstream login as \"agent\" refused: password "
			  "authentication failed", "names the reason");
	ASSERT_FALSE(strstr(msg, "Wr0ng-static-pw"), "without the password");
	ASSERT_TRUE(th_pg_gate_alive(&g), "daemon alive");
	ASSERT_OK(write_file(extra, "user=" TH_PG_USER " password=" TH_PG_PASSWORD "\n", 0600),
		  "the right one again");
	ASSERT_EQ(psql_nopw(&g, "SELECT 1;"), 0, "works again");
	check_no_secrets(&g, secrets);
	test__end_subtest();
out:
	gate_down(&g, &c);
}

void test_cred_pg_refused(void)
{
	static char log[65536];
	struct cred_ctx c;
	struct th_pg_gate g;
	char extra[768];
	int rc;

	if (!ctx_init(&c, "scram-sha-256", false))
		return;
	ASSERT_OK(write_file(c.secret, "user=x password=" ADMIN_PASSWORD "\n", 0640), "secret");
	snprintf(extra, sizeof(extra),
		 "    credential: { provider: pg-jit-role, admin_secret: %s, grant: [app_ro] }\n",
		 c.secret);
	memset(&g, 0, sizeof(g));
	rc = th_pg_gate_start_ext(&g, "127.0.0.1", "scram-sha-256", "enforce", CRED_RULES, extra,
				  NULL, NULL);
	ASSERT_EQ(rc, -ECHILD, "the daemon refuses to start");
	th_daemon_read_log(&g.d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "credential.admin_secret: secret file", "names the key");
	ASSERT_HAS_SUBSTR(log,
			  ": must be owned by root and mode 0600 (is 0640), group-accessible: "
			  "only root may read it",
			  "and the problem");
	ASSERT_FALSE(strstr(log, ADMIN_PASSWORD), "without the secret");
	{
		struct th_agctl_result *r = calloc(1, sizeof(*r));

		if (r) {
			TH_AGCTL(r, "policy", "check", g.d.config);
			ASSERT_EQ(r->status, 1, "agctl policy check refuses it too");
			ASSERT_HAS_SUBSTR(r->err, "group-accessible", "with the reason");
			free(r);
		}
	}
	test__end_subtest();
	gate_down(&g, &c);
}
