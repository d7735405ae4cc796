// SPDX-License-Identifier: GPL-2.0
/*
 * The audit log end to end: a PostgreSQL session through the gateway is recorded (start, each
 * statement with its decision — a blocked one too —, the masked rows the agent received, end),
 * `agctl audit verify` passes, `session replay` shows exactly what the agent sent and got,
 * `session watch` shows a live statement, `audit export --since` filters. Then tampering with a
 * copy of the log — a record edited, deleted, reordered, the tail cut, the chain re-signed with
 * another key — makes verify exit 1 naming the first bad record. A kill -9 under load loses
 * nothing before the tail and the restart cuts a torn tail; a full disk refuses new sessions with
 * a clear error (`agctl audit status` says it is failing, and why) and loses no record. A
 * signing key that is a symbolic link or readable by others stops the start.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include "audit.h"
#include "audit.pb-c.h"
#include "buf.h"
#include "pgwire.h"
#include "session.h"
#include "../gate.h"
#include "../pg.h"
#include "../test_progs.h"

#define AUDIT_RULES                                                                                \
	"    sql:\n"                                                                               \
	"      - { name: no-drop, when: { command: [drop, truncate] }, then: deny }\n"             \
	"      - { name: reads, when: { command: [select, set, show, begin, commit] }, "           \
	"then: allow }\n"                                                                          \
	"    mask:\n"                                                                              \
	"      columns: [users.email]\n"                                                           \
	"      style: redact\n"

static char out[262144], err[16384];

static int psql(struct th_pg_gate *g, const char *sql)
{
	int rc = th_pg_psql(&g->pg, g->tagged, sql, out, sizeof(out), err, sizeof(err));

	if (rc)
		printf("psql: %d: %s\n", rc, err);
	return rc;
}

static void audit_dir(struct th_pg_gate *g, char *buf, size_t len)
{
	snprintf(buf, len, "%s/audit", g->d.state_dir);
}

/* The records of the log as JSON lines (agctl audit export [--since]) into xout. */
static char *xout;

static int export(struct th_pg_gate *g, const char *since)
{
	char cmd[1024], path[256], dir[256];
	struct stat st;
	FILE *f;
	int rc;

	audit_dir(g, dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/export.jsonl", g->d.dir);
	snprintf(cmd, sizeof(cmd), "'%s/agctl' audit export '%s'%s%s%s > '%s'", th_build_dir(),
		 dir, since ? " --since '" : "", since ? since : "", since ? "'" : "", path);
	rc = system(cmd);
	rc = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
	free(xout);
	xout = NULL;
	f = fopen(path, "r");
	if (f && !fstat(fileno(f), &st) && (xout = calloc(1, st.st_size + 1)))
		fread(xout, 1, st.st_size, f);
	if (f)
		fclose(f);
	if (!xout)
		xout = calloc(1, 1);
	if (rc)
		printf("agctl audit export: exit %d\n", rc);
	return rc;
}

/* Waits until the writer has the records of what ran (batch mode writes every few ms). */
static void settle(void)
{
	usleep(300 * 1000);
}

/* The session id of the first exported line that holds marker, or 0. */
static unsigned long long session_of(const char *marker)
{
	const char *p = strstr(xout, marker), *line, *s;

	if (!p)
		return 0;
	for (line = p; line > xout && line[-1] != '\n'; line--)
		;
	s = strstr(line, "\"session\":");
	return s && s < p ? strtoull(s + 10, NULL, 10) : 0;
}

static int verify(const char *dir, const char *key, struct th_agctl_result *r)
{
	return key ? TH_AGCTL(r, "audit", "verify", dir, "--key", key) :
		     TH_AGCTL(r, "audit", "verify", dir);
}

/* --- a session recorded ------------------------------------------------------------------- */

static unsigned long long sid;

static void subtest_records_pg_session(struct th_pg_gate *g)
{
	char sql[512];

	snprintf(sql, sizeof(sql),
		 "SELECT 'audit-marker-1' AS m;\n"
		 "SELECT id, email, note FROM users ORDER BY id;\n"
		 "\\set ON_ERROR_STOP 0\n"
		 "DROP TABLE orders;\n"
		 "SELECT count(*) FROM orders;\n");
	if (!ASSERT_OK(psql(g, sql), "psql"))
		return;
	ASSERT_HAS_SUBSTR(out, "1|[REDACTED]|likes cats", "masked read");
	ASSERT_HAS_SUBSTR(err, "blocked by rule no-drop", "blocked");
	settle();
	if (!ASSERT_OK(export(g, NULL), "export"))
		return;
	sid = session_of("audit-marker-1");
	if (!ASSERT_GT(sid, 0, "session of the marker"))
		return;
	ASSERT_HAS_SUBSTR(xout, "\"kind\":\"session_start\"", "start");
	ASSERT_HAS_SUBSTR(xout, "\"comm\":\"psql\"", "kernel identity: comm");
	ASSERT_HAS_SUBSTR(xout, "\"decision\":\"deny\",\"rule\":\"no-drop\"", "blocked decision");
	ASSERT_HAS_SUBSTR(xout, "\"text\":\"DROP TABLE orders;\"", "blocked statement text");
	ASSERT_HAS_SUBSTR(xout, "\"decision\":\"allow\",\"rule\":\"reads\"", "allowed decision");
	ASSERT_HAS_SUBSTR(xout, "[\"1\",\"[REDACTED]\",\"likes cats\"]", "masked row recorded");
	ASSERT_HAS_SUBSTR(xout, "\"masked_values\":3", "masked count");
	ASSERT_HAS_SUBSTR(xout, "\"kind\":\"session_end\"", "end");
	ASSERT_FALSE(strstr(xout, "alice@example.com"), "no unmasked value in the log");
	ASSERT_FALSE(strstr(xout, TH_PG_PASSWORD), "no credential in the log");
}

static void subtest_extended_protocol(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	const char *p1[] = { "2" };
	char types[64], state[8] = "";
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	pg_put_parse(&b, "", "SELECT email, 'ext-marker' FROM users WHERE id = $1");
	th_pg_m_bind(&b, "", "", 1, p1, 0);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000), "send");
	ASSERT_OK(th_pg_raw_collect(fd, 1, types, sizeof(types), state, NULL, 0, 10000), "answers");
	ASSERT_STREQ(state, "", "no error");
	ag_buf_free(&b);
	close(fd);
	settle();
	if (!ASSERT_OK(export(g, NULL), "export"))
		return;
	ASSERT_HAS_SUBSTR(xout,
			  "\"message\":\"parse\",\"name\":\"\",\"text\":\"SELECT email, "
			  "'ext-marker' FROM users WHERE id = $1\"",
			  "the Parse with its SQL");
	ASSERT_HAS_SUBSTR(xout,
			  "\"kind\":\"result\",\"agent\":\"t\",\"target\":\"db\",\"message\":"
			  "\"execute\",\"name\":\"\",\"command_tag\":\"SELECT 1\"",
			  "the Execute with its result");
	ASSERT_HAS_SUBSTR(xout, "[\"[REDACTED]\",\"ext-marker\"]", "its row, masked");
}

static void subtest_verify_intact(struct th_pg_gate *g)
{
	struct th_agctl_result *r = calloc(1, sizeof(*r));
	char dir[256];

	audit_dir(g, dir, sizeof(dir));
	ASSERT_EQ(verify(dir, NULL, r), 0, "verify exit");
	ASSERT_HAS_SUBSTR(r->out, "intact", "summary line");
	/* The default directory comes from the daemon's status. */
	ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "audit verify"), "verify via the daemon");
	ASSERT_HAS_SUBSTR(out, dir, "the daemon's state dir");
	free(r);
}

/*
 * agctl audit status asks the daemon: after sessions the log has records, a checkpoint and
 * durable ones, and it is not failing; -j names each field.
 */
static void subtest_status(struct th_pg_gate *g)
{
	long long segs = 0, bytes = 0, seq = 0, cp = 0, durable = 0;
	char dir[256];
	yajl_val v, f;

	audit_dir(g, dir, sizeof(dir));
	ASSERT_OK(psql(g, "SELECT 'status-probe' AS a;"), "a session");
	settle();
	if (!ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "audit status"), "agctl audit status"))
		return;
	ASSERT_HAS_SUBSTR(out, dir, "names the log directory");
	ASSERT_HAS_SUBSTR(out, "state:       ok", "not failing");
	if (!ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "-j audit status"), "-j audit status"))
		return;
	v = th_json_parse(out);
	if (!ASSERT_OK_PTR(v, "JSON")) {
		printf("%s\n", out);
		return;
	}
	ASSERT_STREQ(th_json_str(v, "dir"), dir, "dir");
	ASSERT_TRUE(th_json_int(v, "segments", &segs) && segs >= 1, "segments");
	ASSERT_TRUE(th_json_int(v, "bytes", &bytes) && bytes > 0, "bytes");
	ASSERT_TRUE(th_json_int(v, "last_seq", &seq) && seq > 0, "last_seq > 0");
	ASSERT_TRUE(th_json_int(v, "last_checkpoint_seq", &cp) && cp > 0 && cp <= seq,
		    "last_checkpoint_seq");
	ASSERT_OK_PTR(th_json_str(v, "last_checkpoint_at"), "last_checkpoint_at");
	ASSERT_TRUE(th_json_int(v, "durable_seq", &durable) && durable > 0 && durable <= seq,
		    "durable_seq");
	ASSERT_STREQ(th_json_str(v, "fsync"), "batch", "fsync policy");
	f = th_json_get(v, "failing");
	ASSERT_TRUE(f && YAJL_IS_FALSE(f), "failing: false");
	f = th_json_get(v, "reason");
	ASSERT_TRUE(f && YAJL_IS_NULL(f), "reason: null");
	yajl_tree_free(v);
}

static void subtest_replay_exact(struct th_pg_gate *g)
{
	char cmd[64];

	if (!ASSERT_GT(sid, 0, "session"))
		return;
	snprintf(cmd, sizeof(cmd), "session replay %llu", sid);
	if (!ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "%s", cmd), "replay"))
		return;
	ASSERT_HAS_SUBSTR(out, "start     agent t: pid", "who");
	ASSERT_HAS_SUBSTR(out, "(psql) uid 0", "comm and uid");
	ASSERT_HAS_SUBSTR(out, "query     allow (rule reads): SELECT 'audit-marker-1' AS m;",
			  "first statement");
	ASSERT_HAS_SUBSTR(out,
			  "id | email | note\n"
			  "          1 | [REDACTED] | likes cats\n"
			  "          2 | [REDACTED] | reach me at bob.personal@gmail.com\n"
			  "          3 | [REDACTED] | nothing to see\n",
			  "masked rows as the agent got them");
	ASSERT_HAS_SUBSTR(out, "query     deny (rule no-drop): DROP TABLE orders;", "blocked one");
	ASSERT_HAS_SUBSTR(out, "→ agentgate: blocked by rule no-drop", "what the agent was told");
	ASSERT_HAS_SUBSTR(out, "result    SELECT 1: 1 row", "count result");
	ASSERT_HAS_SUBSTR(out, "end       closed", "end");
	ASSERT_FALSE(strstr(out, "alice@example.com"), "nothing unmasked");
	/* Exactly the statements sent, in order. */
	{
		const char *want[] = { "SELECT 'audit-marker-1' AS m;",
				       "SELECT id, email, note FROM users ORDER BY id;",
				       "DROP TABLE orders;", "SELECT count(*) FROM orders;" };
		const char *p = out;
		int n = 0;

		while ((p = strstr(p, "\n+")) && (p = strstr(p, " query "))) {
			const char *colon = strstr(p, ": "), *nl = strchr(p, '\n');

			if (!colon || !nl || colon > nl)
				break;
			if (n < 4)
				ASSERT_EQ(strncmp(colon + 2, want[n], strlen(want[n])), 0,
					  "statement in order");
			n++;
			p = nl;
		}
		ASSERT_EQ(n, 4, "statements replayed");
	}
	if (ASSERT_OK(th_agctl(&g->d, out, sizeof(out), "-j %s", cmd), "replay -j")) {
		ASSERT_HAS_SUBSTR(out, "\"kind\":\"statement\"", "json statement");
		ASSERT_HAS_SUBSTR(out, "\"data_rows\":[[\"1\",\"[REDACTED]\",\"likes cats\"]",
				  "json rows");
	}
}

static void subtest_watch_live_statement(struct th_pg_gate *g)
{
	char path[256], buf[65536];
	bool seen = false;
	pid_t pid;

	snprintf(path, sizeof(path), "%s/watch.out", g->d.dir);
	pid = th_agctl_watch_start(&g->d, path);
	if (!ASSERT_GT(pid, 0, "agctl session watch"))
		return;
	ASSERT_OK(psql(g, "SELECT 'watch-marker-42' AS w;"), "psql");
	for (int i = 0; i < 100 && !seen; i++) {
		int f = open(path, O_RDONLY);
		ssize_t n = f >= 0 ? read(f, buf, sizeof(buf) - 1) : -1;

		if (f >= 0)
			close(f);
		buf[n > 0 ? n : 0] = '\0';
		seen = strstr(buf, "query     allow (rule reads): SELECT 'watch-marker-42'") &&
		       strstr(buf, "result    SELECT 1: 1 row");
		if (!seen)
			usleep(100 * 1000);
	}
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	if (!ASSERT_TRUE(seen, "live statement and its result watched"))
		printf("watch output:\n%s\n", buf);
	ASSERT_HAS_SUBSTR(buf, "start     agent t", "session start watched");
}

static void subtest_export_since(struct th_pg_gate *g)
{
	char since[64];
	time_t now = time(NULL) + 2;

	/* Everything so far is older than now + 2 s: nothing. */
	strftime(since, sizeof(since), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
	if (!ASSERT_OK(export(g, since), "export --since future"))
		return;
	ASSERT_STREQ(xout, "", "nothing after the future");
	ASSERT_OK(export(g, "1h"), "export --since 1h");
	ASSERT_HAS_SUBSTR(xout, "watch-marker-42", "recent included");
	ASSERT_HAS_SUBSTR(xout, "\"hash\":\"", "hash field");
	ASSERT_OK(export(g, "2000-01-01T00:00:00Z"), "export since 2000");
	ASSERT_HAS_SUBSTR(xout, "\"seq\":1,", "from the first record");
	ASSERT_NEQ(export(g, "yesterday-ish"), 0, "a bad --since is refused");
}

/* --- tampering, on copies of the stopped daemon's log ------------------------------------- */

struct ents {
	struct ag_audit_entry *e;
	size_t n;
};

static int collect(void *ctx, const struct ag_audit_entry *e)
{
	struct ents *v = ctx;
	uint8_t *rec = malloc(e->len ? e->len : 1);

	v->e = realloc(v->e, (v->n + 1) * sizeof(*v->e));
	memcpy(rec, e->rec, e->len);
	v->e[v->n] = *e;
	v->e[v->n].rec = rec;
	v->e[v->n].segment = NULL;
	v->n++;
	return 0;
}

static void ents_free(struct ents *v)
{
	for (size_t i = 0; i < v->n; i++)
		free((void *)v->e[i].rec);
	free(v->e);
	v->e = NULL;
	v->n = 0;
}

/* A copy of the state's audit/ and keys/ under tmp/<name>; its audit dir into dir. */
static int copy_log(struct th_pg_gate *g, const char *name, char *dir, size_t len)
{
	char base[256];

	snprintf(base, sizeof(base), "%s/%s", g->d.dir, name);
	snprintf(dir, len, "%s/audit", base);
	char cmd[1200];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s' && mkdir -p '%s' && cp -a '%s/audit' '%s/keys' '%s/'",
		 base, base, g->d.state_dir, g->d.state_dir, base);
	return system(cmd) ? -EIO : 0;
}

static int load(const char *dir, struct ents *v)
{
	char e[256];

	return ag_audit_walk(dir, collect, v, e, sizeof(e));
}

/* Verify must fail naming seq: "record seq N". */
static void expect_bad(const char *dir, const char *key, unsigned long long seq, const char *what)
{
	struct th_agctl_result *r = calloc(1, sizeof(*r));
	char want[64], want2[64];

	snprintf(want, sizeof(want), "record seq %llu ", seq);
	snprintf(want2, sizeof(want2), "record seq %llu:", seq);
	ASSERT_EQ(verify(dir, key, r), 1, what);
	if (!ASSERT_TRUE(strstr(r->err, want) || strstr(r->err, want2), what))
		printf("verify said (expected seq %llu): %s%s\n", seq, r->out, r->err);
	free(r);
}

/* A statement record in the middle of the log, to tamper with. */
static size_t some_statement(struct ents *v)
{
	for (size_t i = v->n / 2; i < v->n; i++) {
		Agentgate__Audit__Record *r =
			agentgate__audit__record__unpack(NULL, v->e[i].len, v->e[i].rec);
		bool st = r && r->body_case == AGENTGATE__AUDIT__RECORD__BODY_STATEMENT;

		if (r)
			agentgate__audit__record__free_unpacked(r, NULL);
		if (st)
			return i;
	}
	return v->n / 2;
}

static void subtest_tamper_edit(struct th_pg_gate *g)
{
	struct ents v = { 0 };
	char dir[256], seg[300];
	size_t k;

	if (!ASSERT_OK(copy_log(g, "t-edit", dir, sizeof(dir)), "copy") || !ASSERT_OK(load(dir, &v), "load"))
		return;
	k = some_statement(&v);
	/* One byte of the record (its statement text, say), frames rewritten with good CRCs. */
	((uint8_t *)v.e[k].rec)[v.e[k].len - 3] ^= 0x20;
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 1 << 20), "rewrite");
	expect_bad(dir, NULL, v.e[k].seq, "edited record");
	ents_free(&v);

	/* One byte of a segment file as it lies on disk. */
	if (!ASSERT_OK(copy_log(g, "t-edit2", dir, sizeof(dir)), "copy"))
		return;
	snprintf(seg, sizeof(seg), "%s/00000001.seg", dir);
	{
		int fd = open(seg, O_RDWR);
		uint8_t b;

		ASSERT_GE(fd, 0, "open segment");
		pread(fd, &b, 1, 40);
		b ^= 1;
		pwrite(fd, &b, 1, 40);
		close(fd);
	}
	expect_bad(dir, NULL, 1, "a flipped byte on disk");
}

static void subtest_tamper_delete(struct th_pg_gate *g)
{
	struct ents v = { 0 };
	char dir[256];
	size_t k;

	if (!ASSERT_OK(copy_log(g, "t-del", dir, sizeof(dir)), "copy") || !ASSERT_OK(load(dir, &v), "load"))
		return;
	k = some_statement(&v);
	free((void *)v.e[k].rec);
	memmove(&v.e[k], &v.e[k + 1], (v.n - k - 1) * sizeof(v.e[0]));
	v.n--;
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 1 << 20), "rewrite");
	expect_bad(dir, NULL, v.e[k].seq - 1, "deleted record");
	ents_free(&v);
}

static void subtest_tamper_reorder(struct th_pg_gate *g)
{
	struct ents v = { 0 };
	struct ag_audit_entry t;
	char dir[256];
	size_t k;

	if (!ASSERT_OK(copy_log(g, "t-reo", dir, sizeof(dir)), "copy") || !ASSERT_OK(load(dir, &v), "load"))
		return;
	k = some_statement(&v);
	t = v.e[k];
	v.e[k] = v.e[k + 1];
	v.e[k + 1] = t;
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 1 << 20), "rewrite");
	expect_bad(dir, NULL, v.e[k + 1].seq, "reordered records");
	ents_free(&v);
}

/*
 * The tail cut right after a checkpoint, and HEAD rebuilt from that checkpoint's own seq, hash
 * and signature: HEAD signs under its own tag (and its time), so the checkpoint's signature
 * does not pass for a HEAD's and the cut is still found.
 */
static void subtest_tamper_head_from_checkpoint(struct th_pg_gate *g)
{
	Agentgate__Audit__Head h = AGENTGATE__AUDIT__HEAD__INIT;
	struct ents v = { 0 };
	char dir[256], head[300];
	uint8_t buf[512], hash[32], sig[64];
	size_t cut = 0, len;
	struct th_agctl_result *r;
	FILE *f;

	if (!ASSERT_OK(copy_log(g, "t-head", dir, sizeof(dir)), "copy") ||
	    !ASSERT_OK(load(dir, &v), "load"))
		return;
	/* The last checkpoint that is not the last record. */
	for (size_t i = 0; i + 1 < v.n; i++) {
		Agentgate__Audit__Record *rec =
			agentgate__audit__record__unpack(NULL, v.e[i].len, v.e[i].rec);

		if (rec && rec->body_case == AGENTGATE__AUDIT__RECORD__BODY_CHECKPOINT &&
		    rec->checkpoint->covers_hash.len == 32 && rec->checkpoint->signature.len == 64) {
			cut = i;
			h.seq = rec->checkpoint->covers_seq;
			memcpy(hash, rec->checkpoint->covers_hash.data, 32);
			memcpy(sig, rec->checkpoint->signature.data, 64);
		}
		if (rec)
			agentgate__audit__record__free_unpacked(rec, NULL);
	}
	if (!ASSERT_GT(cut, 0, "a checkpoint before the last record"))
		goto out;
	while (v.n > cut)
		free((void *)v.e[--v.n].rec);
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 1 << 20), "rewrite");
	h.hash.data = hash;
	h.hash.len = 32;
	h.signature.data = sig;
	h.signature.len = 64;
	len = agentgate__audit__head__pack(&h, buf);
	snprintf(head, sizeof(head), "%s/HEAD", dir);
	f = fopen(head, "w");
	if (!ASSERT_OK_PTR(f, "HEAD"))
		goto out;
	fwrite(buf, 1, len, f);
	fclose(f);
	r = calloc(1, sizeof(*r));
	if (r) {
		ASSERT_EQ(verify(dir, NULL, r), 1, "a HEAD made of a checkpoint's signature");
		ASSERT_HAS_SUBSTR(r->err, "HEAD", "HEAD named");
		free(r);
	}
out:
	ents_free(&v);
}

static void subtest_tamper_truncate(struct th_pg_gate *g)
{
	struct ents v = { 0 };
	char dir[256], seg[300];
	unsigned long long last;
	struct stat st;

	if (!ASSERT_OK(copy_log(g, "t-trunc", dir, sizeof(dir)), "copy") || !ASSERT_OK(load(dir, &v), "load"))
		return;
	/* Whole records cut from the tail (at a frame boundary): HEAD still seals them. */
	last = v.e[v.n - 1].seq;
	for (int i = 0; i < 5; i++)
		free((void *)v.e[--v.n].rec);
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 1 << 20), "rewrite");
	expect_bad(dir, NULL, last - 4, "tail cut at a frame boundary");
	ents_free(&v);

	/* Bytes cut from the end of the newest segment: a torn frame. */
	if (!ASSERT_OK(copy_log(g, "t-trunc2", dir, sizeof(dir)), "copy"))
		return;
	snprintf(seg, sizeof(seg), "%s/00000001.seg", dir);
	/* The newest segment is the highest numbered one. */
	for (int i = 2; i < 100; i++) {
		char p[300];

		snprintf(p, sizeof(p), "%s/%08d.seg", dir, i);
		if (access(p, F_OK))
			break;
		snprintf(seg, sizeof(seg), "%s", p);
	}
	if (ASSERT_OK(stat(seg, &st), "stat") && ASSERT_OK(truncate(seg, st.st_size - 7), "cut")) {
		struct th_agctl_result *r = calloc(1, sizeof(*r));

		ASSERT_EQ(verify(dir, NULL, r), 1, "torn tail");
		ASSERT_HAS_SUBSTR(r->err, "torn frame", "torn frame named");
		ASSERT_HAS_SUBSTR(r->err, "record seq ", "first missing record named");
		free(r);
	}
	/* A whole segment gone in the middle: the records after it cannot follow. */
	if (!ASSERT_OK(copy_log(g, "t-seg", dir, sizeof(dir)), "copy") ||
	    !ASSERT_OK(load(dir, &v), "load"))
		return;
	/* Small segments (consistent: only the framing changes), then the second one removed. */
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 512), "resegment");
	{
		struct th_agctl_result *r = calloc(1, sizeof(*r));
		struct ents w = { 0 };
		char e[256];

		ASSERT_EQ(verify(dir, NULL, r), 0, "resegmented log verifies");
		free(r);
		snprintf(seg, sizeof(seg), "%s/00000002.seg", dir);
		/* The first seq of segment 2: its header says. */
		{
			FILE *f = fopen(seg, "r");
			uint8_t hdr[16] = { 0 };
			unsigned long long first = 0;

			if (ASSERT_OK_PTR(f, "segment 2")) {
				fread(hdr, 1, 16, f);
				fclose(f);
			}
			for (int i = 7; i >= 0; i--)
				first = first << 8 | hdr[8 + i];
			unlink(seg);
			ASSERT_OK(ag_audit_walk(dir, collect, &w, e, sizeof(e)), "walk");
			expect_bad(dir, NULL, first, "a segment deleted");
		}
		ents_free(&w);
	}
	ents_free(&v);
}

/* The whole chain forged with another key: consistent, so only the trusted key catches it. */
static void subtest_tamper_resign(struct th_pg_gate *g)
{
	struct ents v = { 0 };
	char dir[256], key[300], head[300], fp[80];
	uint8_t prev[32] = { 0 }, sig[64], pub[32];
	struct th_agctl_result *r = calloc(1, sizeof(*r));

	if (!ASSERT_OK(copy_log(g, "t-key", dir, sizeof(dir)), "copy") || !ASSERT_OK(load(dir, &v), "load"))
		goto out;
	snprintf(key, sizeof(key), "%s/../other.pem", dir);
	{
		EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
		int kfd = open(key, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		/* A signing key is read only from a root-owned 0600 file. */
		FILE *f = kfd >= 0 ? fdopen(kfd, "w") : NULL;
		size_t n = 32;

		if (!ASSERT_OK_PTR(k, "keygen") || !ASSERT_OK_PTR(f, "key file"))
			goto out;
		PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
		fclose(f);
		EVP_PKEY_get_raw_public_key(k, pub, &n);
		EVP_PKEY_free(k);
	}
	ASSERT_OK(ag_audit_sign_file(key, 0, prev, sig, fp, sizeof(fp)), "fingerprint");
	for (size_t i = 0; i < v.n; i++) {
		Agentgate__Audit__Record *rec =
			agentgate__audit__record__unpack(NULL, v.e[i].len, v.e[i].rec);
		size_t len;
		uint8_t *b;

		if (!ASSERT_OK_PTR(rec, "record"))
			goto out;
		if (rec->body_case == AGENTGATE__AUDIT__RECORD__BODY_CHAIN_START) {
			rec->chain_start->public_key.data = pub;
			rec->chain_start->key_fingerprint = fp;
		} else if (rec->body_case == AGENTGATE__AUDIT__RECORD__BODY_CHECKPOINT) {
			ag_audit_sign_file(key, v.e[i].seq - 1, prev, sig, NULL, 0);
			rec->checkpoint->covers_hash.data = prev;
			rec->checkpoint->signature.data = sig;
			rec->checkpoint->key_fingerprint = fp;
		}
		len = agentgate__audit__record__get_packed_size(rec);
		b = malloc(len);
		agentgate__audit__record__pack(rec, b);
		/* The unpacked record points into our buffers now: free only its own parts. */
		if (rec->body_case == AGENTGATE__AUDIT__RECORD__BODY_CHAIN_START ||
		    rec->body_case == AGENTGATE__AUDIT__RECORD__BODY_CHECKPOINT) {
			rec->body_case = AGENTGATE__AUDIT__RECORD__BODY__NOT_SET;
		}
		agentgate__audit__record__free_unpacked(rec, NULL);
		free((void *)v.e[i].rec);
		v.e[i].rec = b;
		v.e[i].len = len;
		ag_audit_chain_hash(prev, v.e[i].seq, b, len, v.e[i].hash);
		memcpy(prev, v.e[i].hash, 32);
	}
	ASSERT_OK(ag_audit_write_entries(dir, v.e, v.n, 1 << 20), "rewrite");
	{
		Agentgate__Audit__Head h = AGENTGATE__AUDIT__HEAD__INIT;
		uint8_t buf[512];
		size_t len;
		FILE *f;

		h.time_ns = 1;
		ag_audit_sign_head_file(key, v.e[v.n - 1].seq, prev, h.time_ns, sig);
		h.seq = v.e[v.n - 1].seq;
		h.hash.data = prev;
		h.hash.len = 32;
		h.signature.data = sig;
		h.signature.len = 64;
		h.key_fingerprint = fp;
		len = agentgate__audit__head__pack(&h, buf);
		snprintf(head, sizeof(head), "%s/HEAD", dir);
		f = fopen(head, "w");
		fwrite(buf, 1, len, f);
		fclose(f);
	}
	/* With the forger's key the forgery is consistent ... */
	ASSERT_EQ(verify(dir, key, r), 0, "consistent with the forger's key");
	/* ... with the daemon's key (the default, from keys/) it is not. */
	expect_bad(dir, NULL, 1, "re-signed with another key");
out:
	ents_free(&v);
	free(r);
}

void test_audit(void)
{
	static struct th_pg_gate g;
	struct th_agctl_result *r;
	char dir[256];

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.2", "md5", "enforce", AUDIT_RULES),
		       "gate"))
		goto out;
	if (test__start_subtest("records_pg_session"))
		subtest_records_pg_session(&g);
	if (test__start_subtest("extended_protocol"))
		subtest_extended_protocol(&g);
	if (test__start_subtest("verify_intact"))
		subtest_verify_intact(&g);
	if (test__start_subtest("replay_exact"))
		subtest_replay_exact(&g);
	if (test__start_subtest("watch_live_statement"))
		subtest_watch_live_statement(&g);
	if (test__start_subtest("export_since"))
		subtest_export_since(&g);
	if (test__start_subtest("status_seq_checkpoint_not_failing"))
		subtest_status(&g);
	/* Sealed by a clean stop: the tampering works on copies of a finished log. */
	ASSERT_OK(th_daemon_stop(&g.d), "stop");
	r = calloc(1, sizeof(*r));
	audit_dir(&g, dir, sizeof(dir));
	ASSERT_EQ(verify(dir, NULL, r), 0, "sealed log verifies");
	free(r);
	if (test__start_subtest("tamper_edit"))
		subtest_tamper_edit(&g);
	if (test__start_subtest("tamper_delete"))
		subtest_tamper_delete(&g);
	if (test__start_subtest("tamper_reorder"))
		subtest_tamper_reorder(&g);
	if (test__start_subtest("tamper_truncate"))
		subtest_tamper_truncate(&g);
	if (test__start_subtest("tamper_head_from_checkpoint"))
		subtest_tamper_head_from_checkpoint(&g);
	if (test__start_subtest("tamper_resign_other_key"))
		subtest_tamper_resign(&g);
out:
	th_pg_gate_cleanup(&g);
}

/* --- crash and full disk ---------------------------------------------------------------------- */

#define CRASH_CLIENT                                                                               \
	"import psycopg2, sys\n"                                                                   \
	"c = psycopg2.connect('')\n"                                                               \
	"c.autocommit = True\n"                                                                    \
	"cur = c.cursor()\n"                                                                       \
	"i = 0\n"                                                                                  \
	"try:\n"                                                                                   \
	"    while i < 1000000:\n"                                                                 \
	"        cur.execute(\"SELECT 'crash-%d-end'\" % i)\n"                                     \
	"        cur.fetchall()\n"                                                                 \
	"        print(i, flush=True)\n"                                                           \
	"        i += 1\n"                                                                         \
	"except Exception as e:\n"                                                                 \
	"    print('stopped:', e, file=sys.stderr)\n"

/* The newest segment of dir into path. */
static void newest_segment(const char *dir, char *path, size_t len)
{
	for (int i = 1; i < 100000; i++) {
		char p[300];

		snprintf(p, sizeof(p), "%s/%08d.seg", dir, i);
		if (access(p, F_OK))
			continue;
		snprintf(path, len, "%s", p);
	}
}

void test_audit_crash(void)
{
	static struct th_pg_gate g;
	static char acked[1 << 20], log[256 * 1024];
	struct th_agctl_result *r = calloc(1, sizeof(*r));
	char dir[256], seg[300] = "", marker[64];
	int n_acked = 0, present = 0, first_missing = -1, hole = -1;
	pid_t killer;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.2", "trust", "enforce",
					AUDIT_RULES "audit: { fsync: always, checkpoint_records: 50 }\n"),
		       "gate"))
		goto out;
	/* kill -9 while a client runs statements back to back. */
	killer = fork();
	if (killer == 0) {
		usleep(2500 * 1000);
		kill(g.d.pid, SIGKILL);
		_exit(0);
	}
	th_pg_python(&g.pg, g.tagged, CRASH_CLIENT, acked, sizeof(acked), err, sizeof(err), 60000);
	waitpid(killer, NULL, 0);
	th_daemon_kill(&g.d);
	for (const char *p = acked; *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : p + strlen(p))
		n_acked++;
	printf("statements acknowledged before the kill: %d\n", n_acked);
	if (!ASSERT_GT(n_acked, 0, "statements ran"))
		goto out;

	/* A torn frame on top, as a crash inside a write leaves it. */
	audit_dir(&g, dir, sizeof(dir));
	newest_segment(dir, seg, sizeof(seg));
	{
		int fd = open(seg, O_WRONLY | O_APPEND);
		static const uint8_t torn[] = { 'A', 'G', 'F', 'R', 0x00, 0x10, 0, 0, 0x00, 0x20,
						0, 0, 1, 2, 3, 4, 0x78, 0x01, 0xed };

		ASSERT_GE(fd, 0, "newest segment");
		ASSERT_EQ(write(fd, torn, sizeof(torn)), (ssize_t)sizeof(torn), "torn frame");
		close(fd);
	}
	if (!ASSERT_OK(th_daemon_restart(&g.d), "restart"))
		goto out;
	th_daemon_read_log(&g.d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "audit: torn tail at recovery", "torn tail reported");
	ASSERT_HAS_SUBSTR(log, "cutting 19 bytes", "cut to the last whole frame");
	ASSERT_EQ(verify(dir, NULL, r), 0, "verify after the restart");
	if (r->status)
		printf("verify: %s%s\n", r->out, r->err);
	/* Everything acknowledged is there, up to the tail: no hole. */
	if (!ASSERT_OK(export(&g, NULL), "export"))
		goto out;
	for (int i = 0; i < n_acked; i++) {
		snprintf(marker, sizeof(marker), "'crash-%d-end'", i);
		if (strstr(xout, marker)) {
			present++;
			if (first_missing >= 0 && hole < 0)
				hole = first_missing;
		} else if (first_missing < 0) {
			first_missing = i;
		}
	}
	printf("acknowledged statements in the log: %d of %d (first missing: %d)\n", present,
	       n_acked, first_missing);
	ASSERT_EQ(hole, -1, "no acknowledged statement lost before the tail");
	ASSERT_EQ(present, n_acked, "with fsync: always, every acknowledged statement is kept");
	ASSERT_HAS_SUBSTR(xout, "\"torn_bytes\":19", "the restart recorded the cut");
	/* The chain goes on: a new session is recorded after the restart and verifies. */
	ASSERT_OK(psql(&g, "SELECT 'after-restart' AS a;"), "psql after the restart");
	ASSERT_OK(th_daemon_stop(&g.d), "stop");
	ASSERT_EQ(verify(dir, NULL, r), 0, "verify after the new session");
out:
	free(r);
	th_pg_gate_cleanup(&g);
}

static int raw_query(int fd, const char *sql, char *sqlstate)
{
	uint8_t buf[512];
	size_t len = strlen(sql) + 1;

	buf[0] = 'Q';
	buf[1] = (len + 4) >> 24;
	buf[2] = (len + 4) >> 16;
	buf[3] = (len + 4) >> 8;
	buf[4] = len + 4;
	memcpy(buf + 5, sql, len);
	if (th_send_all(fd, buf, 5 + len, 5000))
		return -EIO;
	sqlstate[0] = '\0';
	return th_pg_raw_collect(fd, 1, NULL, 0, sqlstate, NULL, 0, 10000);
}

static bool log_has(struct th_pg_gate *g, const char *what, int timeout_ms)
{
	static char log[512 * 1024];

	for (int t = 0; t <= timeout_ms; t += 100) {
		if (!th_daemon_read_log(&g->d, log, sizeof(log)) && strstr(log, what))
			return true;
		usleep(100 * 1000);
	}
	return false;
}

void test_audit_disk_full(void)
{
	static struct th_pg_gate g;
	struct th_agctl_result *r = calloc(1, sizeof(*r));
	char dir[256], filler[300], sqlstate[8];
	bool mounted = false;
	int fd = -1;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.2", "trust", "enforce",
					AUDIT_RULES "audit: { fsync: batch }\n"),
		       "gate"))
		goto out;
	/* The state dir on a small tmpfs of its own. */
	th_daemon_stop(&g.d);
	if (!ASSERT_OK(mount("agtest-audit", g.d.state_dir, "tmpfs", MS_NOSUID | MS_NODEV,
			     "size=1m,mode=0700"),
		       "mount tmpfs"))
		goto out;
	mounted = true;
	if (!ASSERT_OK(th_daemon_restart(&g.d), "daemon on the tmpfs"))
		goto out;
	fd = th_pg_raw_connect(&g);
	if (!ASSERT_GE(fd, 0, "session A"))
		goto out;
	ASSERT_OK(raw_query(fd, "SELECT 'full-0'", sqlstate), "A before the disk is full");

	/* Fill the disk. */
	snprintf(filler, sizeof(filler), "%s/filler", g.d.state_dir);
	{
		static char chunk[16384];
		int ff = open(filler, O_WRONLY | O_CREAT | O_TRUNC, 0600);

		ASSERT_GE(ff, 0, "filler");
		while (ff >= 0 && write(ff, chunk, sizeof(chunk)) > 0)
			;
		if (ff >= 0)
			close(ff);
	}
	/* A session already running goes on; its records wait in memory. */
	for (int i = 1; i <= 5; i++) {
		char q[64];

		snprintf(q, sizeof(q), "SELECT 'full-%d'", i);
		ASSERT_OK(raw_query(fd, q, sqlstate), "A while the disk is full");
		ASSERT_STREQ(sqlstate, "", "A answered");
	}
	if (!ASSERT_TRUE(log_has(&g, "new sessions are refused", 10000), "failure noticed"))
		goto out;
	/* A new session is refused, with the reason. */
	ASSERT_NEQ(th_pg_psql(&g.pg, g.tagged, "SELECT 1;", out, sizeof(out), err, sizeof(err)), 0,
		   "new session refused");
	ASSERT_HAS_SUBSTR(err, "agentgate: audit log unavailable:", "clear error");
	ASSERT_HAS_SUBSTR(err, "No space left on device", "the reason");
	/* agctl audit status says so too. */
	if (ASSERT_OK(th_agctl(&g.d, out, sizeof(out), "-j audit status"), "audit status")) {
		yajl_val v = th_json_parse(out);
		yajl_val f = v ? th_json_get(v, "failing") : NULL;

		ASSERT_TRUE(f && YAJL_IS_TRUE(f), "status: failing");
		ASSERT_HAS_SUBSTR(v ? th_json_str(v, "reason") : NULL, "No space left on device",
				  "status: the reason");
		if (v)
			yajl_tree_free(v);
	}

	/* Room again: the records are written, sessions accepted. */
	unlink(filler);
	ASSERT_TRUE(log_has(&g, "the log is written again", 10000), "recovered");
	if (ASSERT_OK(th_agctl(&g.d, out, sizeof(out), "audit status"), "audit status after"))
		ASSERT_HAS_SUBSTR(out, "state:       ok", "status: ok again");
	ASSERT_OK(psql(&g, "SELECT 'full-after' AS a;"), "new session after recovery");
	ASSERT_OK(raw_query(fd, "SELECT 'full-6'", sqlstate), "A after recovery");
	close(fd);
	fd = -1;
	ASSERT_OK(th_daemon_stop(&g.d), "stop");
	audit_dir(&g, dir, sizeof(dir));
	ASSERT_EQ(verify(dir, NULL, r), 0, "verify");
	if (r->status)
		printf("verify: %s%s\n", r->out, r->err);
	if (ASSERT_OK(export(&g, NULL), "export")) {
		for (int i = 0; i <= 6; i++) {
			char m[32];

			snprintf(m, sizeof(m), "'full-%d'", i);
			if (!ASSERT_HAS_SUBSTR(xout, m, "no record lost"))
				printf("missing: %s\n", m);
		}
		ASSERT_HAS_SUBSTR(xout, "audit log unavailable", "the refusal recorded");
	}
out:
	if (fd >= 0)
		close(fd);
	th_daemon_stop(&g.d);
	if (mounted)
		umount2(g.d.state_dir, MNT_DETACH);
	free(r);
	th_pg_gate_cleanup(&g);
}

/* --- the policy's audit: mapping ------------------------------------------------------------ */

static const char *audit_policy(const char *audit, char *e, size_t elen, struct ag_audit_config *c)
{
	static char text[1024];
	struct ag_policy *p;

	snprintf(text, sizeof(text),
		 "apiVersion: agentgate/v1\n"
		 "agents: [{ name: a, cgroup: /x }]\n"
		 "%s\n"
		 "default: deny\n",
		 audit);
	e[0] = '\0';
	p = ag_policy_parse(text, strlen(text), "audit.yaml", e, elen);
	if (!p)
		return e;
	ag_audit_config_parse(p->audit, p->naudit, c, e, elen);
	ag_policy_free(p);
	return NULL;
}

void test_audit_policy(void)
{
	struct ag_audit_config c;
	char e[512];

	ASSERT_TRUE(!audit_policy("", e, sizeof(e), &c), "no audit: defaults");
	ASSERT_EQ(c.fsync, AG_AUDIT_FSYNC_BATCH, "default fsync");
	ASSERT_EQ(c.checkpoint_records, 1000, "default checkpoint_records");
	ASSERT_EQ(c.checkpoint_ms, 10000, "default checkpoint_interval");
	ASSERT_EQ(c.segment_size, 16 << 20, "default segment_size");
	ASSERT_TRUE(!audit_policy("audit: { fsync: always, checkpoint_records: 50, "
				  "checkpoint_interval: 2s, segment_size: 1M }",
				  e, sizeof(e), &c),
		    "all keys");
	if (e[0])
		printf("policy error: %s\n", e);
	ASSERT_EQ(c.fsync, AG_AUDIT_FSYNC_ALWAYS, "fsync always");
	ASSERT_EQ(c.checkpoint_records, 50, "checkpoint_records");
	ASSERT_EQ(c.checkpoint_ms, 2000, "checkpoint_interval");
	ASSERT_EQ(c.segment_size, 1 << 20, "segment_size");
	ASSERT_OK_PTR(audit_policy("audit: { fsync: sometimes }", e, sizeof(e), &c), "bad fsync");
	ASSERT_HAS_SUBSTR(e, "audit.yaml:3:", "names file:line");
	ASSERT_HAS_SUBSTR(e, "sometimes", "names the value");
	ASSERT_OK_PTR(audit_policy("audit: { checkpoint_records: 0 }", e, sizeof(e), &c),
		      "zero checkpoint_records");
	ASSERT_HAS_SUBSTR(e, "checkpoint_records", "says which");
	ASSERT_OK_PTR(audit_policy("audit: { checkpoint_interval: soon }", e, sizeof(e), &c),
		      "bad interval");
	ASSERT_OK_PTR(audit_policy("audit: { segment_size: 12 }", e, sizeof(e), &c),
		      "tiny segment");
	ASSERT_HAS_SUBSTR(e, "segment_size", "says which");
	ASSERT_OK_PTR(audit_policy("audit: { rotate: daily }", e, sizeof(e), &c), "unknown key");
	ASSERT_HAS_SUBSTR(e, "rotate", "names the key");
}

/* --- the signing key's file ----------------------------------------------------------------- */

/*
 * The audit signing key is read only from root's own 0600 file, never through a symbolic link:
 * either stops the start with an error naming the path; 0600 starts again with the same key.
 */
void test_audit_key_file(void)
{
	struct th_daemon d = {};
	char cg[256], policy[1024], key[300];

	if (!ASSERT_OK(th_cgroup_create("auditkey", cg, sizeof(cg)), "cgroup") ||
	    !ASSERT_OK(th_policy_tcp(policy, sizeof(policy), cg, "x", "127.0.0.47:9", NULL),
		       "policy"))
		return;
	if (!ASSERT_OK(th_daemon_start(&d, policy, NULL), "daemon makes its key"))
		goto out;
	th_daemon_stop(&d);
	snprintf(key, sizeof(key), "%s/%s", d.state_dir, AG_AUDIT_KEY_FILE);
	if (!th_key_file_refusals(&d, key, "audit signing key"))
		goto out;
	th_daemon_stop(&d);
	{
		struct th_agctl_result *r = calloc(1, sizeof(*r));
		char dir[300];

		snprintf(dir, sizeof(dir), "%s/audit", d.state_dir);
		if (r) {
			ASSERT_EQ(verify(dir, NULL, r), 0, "one chain, one key");
			free(r);
		}
	}
out:
	th_daemon_cleanup(&d);
}

/* --- the writer's scheduling class ---------------------------------------------------------- */

/* The id of this process's thread named comm, or -1. */
static int thread_named(const char *comm)
{
	char path[96], buf[64];
	struct dirent *de;
	int tid = -1;
	DIR *d = opendir("/proc/self/task");

	while (d && tid < 0 && (de = readdir(d))) {
		FILE *f;

		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", de->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(buf, sizeof(buf), f) && !strncmp(buf, comm, strlen(comm)) &&
		    buf[strlen(comm)] == '\n')
			tid = atoi(de->d_name);
		fclose(f);
	}
	if (d)
		closedir(d);
	return tid;
}

/* The scheduling policy of this process's thread named comm (stat field 41), or -1. */
static int thread_policy(const char *comm)
{
	char path[96], buf[1024], *p = NULL;
	int tid = thread_named(comm), field;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
	f = tid > 0 ? fopen(path, "r") : NULL;
	if (f) {
		p = fgets(buf, sizeof(buf), f);
		fclose(f);
	}
	/* After the command in parentheses: field 3 on, policy is field 41. */
	p = p ? strrchr(buf, ')') : NULL;
	for (field = 2; p && field < 41; field++)
		p = strchr(p + 1, ' ');
	return p ? atoi(p + 1) : -1;
}

static bool policy_becomes(const char *comm, int want)
{
	for (int i = 0; i < 200; i++) {
		if (thread_policy(comm) == want)
			return true;
		usleep(10 * 1000);
	}
	return false;
}

/* The I/O priority class of this process's thread named comm, or -1. */
static int thread_ioprio_class(const char *comm)
{
	int tid = thread_named(comm);
	long v = tid > 0 ? syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, tid) : -1;

	return v < 0 ? -1 : (int)(v >> 13);
}

#define BURST 200000

static int count_burst(void *ctx, const struct ag_audit_entry *e)
{
	Agentgate__Audit__Record *r = agentgate__audit__record__unpack(NULL, e->len, e->rec);

	if (!r)
		return -1;
	if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_ERROR &&
	    !strncmp(r->error->message, "burst ", 6))
		(*(int *)ctx)++;
	agentgate__audit__record__free_unpacked(r, NULL);
	return 0;
}

/*
 * The writer (thread ag-audit) runs a batch's CPU work (hash, deflate) at SCHED_IDLE so that it
 * never delays a statement, and everything else — the queue's lock, write, fsync — at the
 * workers' level with best-effort I/O: between batches it is SCHED_OTHER, its I/O class BE.
 * With fsync: always, where answers wait for it, no batch runs low. A backlog (1024 records
 * queued while a batch is low) raises it.
 */
void test_audit_writer_class(void)
{
	char dir[] = "/tmp/agentgate-audit-class.XXXXXX", adir[64], e[256];
	struct ag_session *s = calloc(1, sizeof(*s));
	struct ag_audit_config c;
	uint64_t low0, low1;
	int burst = 0;

	if (!ASSERT_OK_PTR(s, "alloc") || !ASSERT_OK_PTR(mkdtemp(dir), "temp dir")) {
		free(s);
		return;
	}
	ag_audit_config_parse(NULL, 0, &c, e, sizeof(e));
	if (!ASSERT_OK(ag_audit_open(dir, &c, e, sizeof(e)), e))
		goto rm;
	s->id = 5;
	ASSERT_TRUE(policy_becomes("ag-audit", SCHED_OTHER), "between batches: the workers' level");
	/* Set by the writer as it starts: a deadline, not a single look. */
	for (int i = 0; i < 200 && thread_ioprio_class("ag-audit") != 2; i++)
		usleep(10 * 1000);
	ASSERT_EQ(thread_ioprio_class("ag-audit"), 2, "best-effort I/O class");
	ag_audit_writer_stats(&low0);
	for (int i = 0; i < 20; i++) {
		ag_audit_error(s, "batch %d", i);
		usleep(20 * 1000);
	}
	ag_audit_writer_stats(&low1);
	if (ag_audit_can_renice())
		ASSERT_GT(low1 - low0, 0, "batches ran low (fsync batch)");
	else
		ASSERT_EQ(low1 - low0, 0, "never low without CAP_SYS_NICE (it could not come back)");
	ASSERT_TRUE(policy_becomes("ag-audit", SCHED_OTHER), "and back after each");
	/* A burst far beyond a batch (a low one is raised by the backlog): none of it lost. */
	for (int i = 0; i < BURST; i++)
		ag_audit_error(s, "burst %d", i);
	c.fsync = AG_AUDIT_FSYNC_ALWAYS;
	ag_audit_set_config(&c);
	usleep(100 * 1000);
	ag_audit_writer_stats(&low0);
	for (int i = 0; i < 20; i++) {
		ag_audit_error(s, "always %d", i);
		usleep(5 * 1000);
	}
	ag_audit_writer_stats(&low1);
	ASSERT_EQ(low1 - low0, 0, "no batch low with fsync always");
	ASSERT_TRUE(policy_becomes("ag-audit", SCHED_OTHER), "SCHED_OTHER");
	ag_audit_session_end(s);
	ag_audit_close();
	ASSERT_EQ(thread_policy("ag-audit"), -1, "the writer is gone after close");
	snprintf(adir, sizeof(adir), "%s/audit", dir);
	ASSERT_OK(ag_audit_walk(adir, count_burst, &burst, e, sizeof(e)), e);
	ASSERT_EQ(burst, BURST, "every record of the burst in the log");
rm:
	th_rm_rf(dir);
	free(s);
}
