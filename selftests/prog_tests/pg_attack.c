// SPDX-License-Identifier: GPL-2.0
/*
 * Hostile-agent probes against the PostgreSQL enforcement: statements smuggled through the
 * extended protocol, multi-statement strings, PREPARE/EXECUTE name reuse, dynamic SQL, the
 * FunctionCall message, and masked columns read back through other paths. Each subtest
 * asserts that the attack is blocked or masked.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pgwire.h"
#include "../pg.h"
#include "../test_progs.h"

#define ATK_RULES                                                                                  \
	"    sql:\n"                                                                               \
	"      - { name: no-unbounded-writes, when: { command: [update, delete], where: absent }," \
	" then: deny }\n"                                                                          \
	"      - { name: rw, when: { command: [select, insert, update, delete, begin, commit,"     \
	" rollback, set, show, create, ddl, copy, prepare, execute, deallocate, notify, listen],"  \
	" tables: [orders, users, public.orders, public.users, v*, t*] }, then: allow }\n"         \
	"    mask:\n"                                                                              \
	"      columns: [users.email, \"*.ssn\"]\n"                                                \
	"      detectors: [email, credit-card, ssn, phone, jwt, aws-key, private-key]\n"           \
	"      style: redact\n"

static char out[65536], err[16384];

static int psql(struct th_pg_gate *g, const char *sql)
{
	out[0] = err[0] = 0;
	return th_pg_psql(&g->pg, g->tagged, sql, out, sizeof(out), err, sizeof(err));
}

static int xchg(int fd, struct ag_buf *b, int n, char *types, char *st, char *msg)
{
	int rc = th_send_all(fd, ag_buf_head(b), ag_buf_len(b), 10000);

	ag_buf_free(b);
	if (rc)
		return rc;
	return th_pg_raw_collect(fd, n, types, 256, st, msg, 512, 10000);
}

static long long orders_count(struct th_pg_gate *g)
{
	char buf[64] = "";

	th_pg_admin(&g->pg, "SELECT count(*) FROM orders", buf, sizeof(buf));
	return atoll(buf);
}

static void blocked(struct th_pg_gate *g, const char *sql, const char *what)
{
	long long before = orders_count(g);

	ASSERT_NEQ(psql(g, sql), 0, what);
	ASSERT_HAS_SUBSTR(err, "agentgate: blocked", what);
	ASSERT_EQ(orders_count(g), before, "orders untouched");
}

static void subtest_statements(struct th_pg_gate *g)
{
	blocked(g, "SELECT 1; DELETE FROM orders", "multi-statement");
	blocked(g, "PREPARE p AS SELECT 1; DEALLOCATE p; PREPARE p AS DELETE FROM orders",
		"re-PREPARE");
	blocked(g, "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'",
		"create function");
	blocked(g, "CREATE RULE r AS ON INSERT TO orders DO ALSO DELETE FROM orders", "create rule");
	blocked(g, "DO $$BEGIN RAISE NOTICE '%', (SELECT email FROM users LIMIT 1); END$$", "DO");
	blocked(g, "SELECT lo_from_bytea(0, 'x')", "lo_*");
	blocked(g, "SELECT query_to_xml('select email from users', true, false, '')", "query_to_xml");
	blocked(g, "SELECT format('DELETE FROM orders%s', '') \\gexec", "gexec re-checked");
	blocked(g, "COPY (SELECT email, ssn FROM users) TO STDOUT", "COPY (query) of masked");
}

static void subtest_masked_paths(struct th_pg_gate *g)
{
	static const char *const sqls[] = {
		"SELECT array_agg(email), string_agg(ssn, ',') FROM users",
		"SELECT email::int FROM users",
		"SELECT ssn, email FROM \"public\".\"users\"",
		"BEGIN; DECLARE c CURSOR FOR SELECT * FROM users; FETCH ALL FROM c; COMMIT",
		"UPDATE users SET note = note WHERE id = 1 RETURNING email, ssn",
		"LISTEN x; SELECT pg_notify('x', email) FROM users",
		"SELECT (SELECT email FROM users WHERE id=1), (SELECT ssn FROM users WHERE id=1)",
	};

	for (size_t i = 0; i < sizeof(sqls) / sizeof(sqls[0]); i++) {
		psql(g, sqls[i]);
		ASSERT_TRUE(!strstr(out, "alice@example.com") && !strstr(err, "alice@example.com") &&
				    !strstr(out, "123-45-6789") && !strstr(err, "123-45-6789"),
			    sqls[i]);
	}
}

static void subtest_function_call(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	struct pg_wr w;
	char types[256], st[8], msg[512];
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	pg_wr_begin(&w, &b, 'F');
	pg_wr_u32(&w, 1299); /* now() */
	pg_wr_u16(&w, 0);
	pg_wr_u16(&w, 0);
	pg_wr_u16(&w, 0);
	pg_wr_end(&w);
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "answers");
	ASSERT_STREQ(st, "42501", "FunctionCall refused");
	close(fd);
}

static void subtest_extended(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	char types[256], st[8], msg[512];
	long long before = orders_count(g);
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	/* Named statement given again with a denied query. */
	pg_put_parse(&b, "s1", "SELECT 1");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "parse s1");
	pg_put_parse(&b, "s1", "DELETE FROM orders");
	th_pg_m_bind(&b, "", "s1", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "re-parse s1");
	ASSERT_STREQ(st, "42501", "re-parse refused");
	/* The unnamed statement: allowed, then a denied one, then Bind to it. */
	pg_put_parse(&b, "", "SELECT 1");
	th_pg_m_bind(&b, "", "", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "unnamed");
	pg_put_parse(&b, "", "DELETE FROM orders");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "unnamed denied");
	ASSERT_STREQ(st, "42501", "unnamed refused");
	th_pg_m_bind(&b, "", "", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "bind after refused");
	ASSERT_STREQ(st, "26000", "no unnamed statement left");
	/* Bind to a name whose Parse was refused. */
	pg_put_parse(&b, "s2", "DELETE FROM orders");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "s2");
	th_pg_m_bind(&b, "", "s2", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "bind s2");
	ASSERT_STREQ(st, "26000", "s2 does not exist");
	/* A Sync-less pipeline, then Terminate. */
	pg_put_parse(&b, "", "DELETE FROM orders");
	th_pg_m_bind(&b, "", "", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'X');
	th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
	ag_buf_free(&b);
	close(fd);
	usleep(300000);
	ASSERT_EQ(orders_count(g), before, "orders untouched");
}

static void subtest_query_during_copy_in(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	struct th_pg_msg m;
	char types[256], st[8], msg[512];
	long long before = orders_count(g);
	int fd = th_pg_raw_connect(g), rc;

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	pg_put_query(&b, "COPY orders FROM STDIN");
	th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
	ag_buf_free(&b);
	rc = th_pg_read_msg(fd, &m, 5000);
	printf("copy: rc=%d type=%c\n", rc, rc ? '?' : m.type);
	if (!rc)
		th_pg_msg_free(&m);
	pg_put_query(&b, "DELETE FROM orders");
	th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
	ag_buf_free(&b);
	for (int i = 0; i < 6; i++) {
		rc = th_pg_read_msg(fd, &m, 3000);
		if (rc) {
			printf("copy: read rc=%d\n", rc);
			break;
		}
		printf("copy: got %c %s %s\n", m.type, m.type == 'E' ? th_pg_err_field(&m, 'C') : "",
		       m.type == 'E' ? th_pg_err_field(&m, 'M') : "");
		th_pg_msg_free(&m);
	}
	for (int k = 0; k < 3; k++) {
		pg_put_query(&b, k == 1 ? "SELECT email, ssn FROM users" : "SELECT 1");
		rc = xchg(fd, &b, 1, types, st, msg);
		printf("copy: after q%d rc=%d types=%s st=%s msg=%s\n", k, rc, types, st, msg);
	}
	close(fd);
	ASSERT_EQ(orders_count(g), before, "a Query during COPY IN did not run");
}

/* ---- policy reloads reaching live sessions ---- */

#define RO_RULES                                                                                   \
	"    sql:\n"                                                                               \
	"      - { name: read-only, when: { command: [select], tables: [orders, users,"            \
	" public.orders, public.users, v*, t*] }, then: allow }\n"                                 \
	"    mask:\n"                                                                              \
	"      columns: [users.email, \"*.ssn\"]\n"                                                \
	"      detectors: [email, credit-card, ssn, phone, jwt, aws-key, private-key]\n"           \
	"      style: redact\n"

static bool order_exists(struct th_pg_gate *g, int id)
{
	char sql[96], buf[64] = "";

	snprintf(sql, sizeof(sql), "SELECT count(*) FROM orders WHERE id = %d", id);
	th_pg_admin(&g->pg, sql, buf, sizeof(buf));
	return atoll(buf) == 1;
}

/*
 * Sends one simple Query and reads up to ReadyForQuery or the end of the connection: the first
 * DataRow's first column into val, the first error's severity/SQLSTATE/message. 0 when a
 * ReadyForQuery came, -EPIPE/-ECONNRESET when the connection ended, other -errno.
 */
static int query1(int fd, const char *sql, char *val, size_t vlen, char *sev, char *st, char *msg)
{
	struct ag_buf b = { 0 };
	int rc;

	val[0] = sev[0] = st[0] = msg[0] = '\0';
	pg_put_query(&b, sql);
	rc = th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000);
	ag_buf_free(&b);
	if (rc)
		return rc;
	for (;;) {
		struct th_pg_msg m;

		rc = th_pg_read_msg(fd, &m, 10000);
		if (rc)
			return rc;
		if (m.type == 'D' && !val[0] && m.len >= 6) {
			int32_t n = (int32_t)((uint32_t)m.body[2] << 24 | (uint32_t)m.body[3] << 16 |
					      (uint32_t)m.body[4] << 8 | m.body[5]);

			if (n >= 0 && (size_t)n + 6 <= m.len)
				snprintf(val, vlen, "%.*s", n, (const char *)m.body + 6);
		}
		if (m.type == 'E' && !st[0]) {
			snprintf(sev, 16, "%s", th_pg_err_field(&m, 'S'));
			snprintf(st, 6, "%s", th_pg_err_field(&m, 'C'));
			snprintf(msg, 512, "%s", th_pg_err_field(&m, 'M'));
		}
		rc = m.type == 'Z';
		th_pg_msg_free(&m);
		if (rc)
			return 0;
	}
}

/* Reads what comes until the connection ends: the first error into sev/st/msg. 0 on EOF. */
static int drain_to_eof(int fd, char *sev, char *st, char *msg)
{
	sev[0] = st[0] = msg[0] = '\0';
	for (int i = 0; i < 64; i++) {
		struct th_pg_msg m;
		int rc = th_pg_read_msg(fd, &m, 10000);

		if (rc == -EPIPE || rc == -ECONNRESET)
			return 0;
		if (rc)
			return rc;
		if (m.type == 'E' && !st[0]) {
			snprintf(sev, 16, "%s", th_pg_err_field(&m, 'S'));
			snprintf(st, 6, "%s", th_pg_err_field(&m, 'C'));
			snprintf(msg, 512, "%s", th_pg_err_field(&m, 'M'));
		}
		th_pg_msg_free(&m);
	}
	return -EPROTO;
}

static int count_in_log(struct th_pg_gate *g, const char *what)
{
	static char log[256 * 1024];
	int n = 0;

	if (th_daemon_read_log(&g->d, log, sizeof(log)))
		return -1;
	for (const char *p = log; (p = strstr(p, what)); p++)
		n++;
	return n;
}

static void subtest_reload_tightens(struct th_pg_gate *g)
{
	char val[64], sev[16], st[8], msg[512];
	int fd, rc;

	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", ATK_RULES), "policy: select+delete"))
		return;
	fd = th_pg_raw_connect(g);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	rc = query1(fd, "DELETE FROM orders WHERE id = 5", val, sizeof(val), sev, st, msg);
	ASSERT_OK(rc, "delete 5 answered");
	ASSERT_STREQ(st, "", "delete 5 allowed");
	ASSERT_FALSE(order_exists(g, 5), "row 5 deleted");
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", RO_RULES), "reload: select only"))
		goto out;
	rc = query1(fd, "DELETE FROM orders WHERE id = 4", val, sizeof(val), sev, st, msg);
	printf("after reload: rc=%d sev=%s st=%s msg=%s\n", rc, sev, st, msg);
	if (rc == -EPIPE || rc == -ECONNRESET) {
		/* Ended: if it said why, it must be the refusal. */
		if (st[0])
			ASSERT_STREQ(st, "42501", "session ended with 42501");
	} else {
		ASSERT_OK(rc, "delete 4 answered");
		ASSERT_STREQ(st, "42501", "delete 4 refused under the new rule");
	}
	ASSERT_TRUE(order_exists(g, 4), "row 4 still exists");
out:
	close(fd);
	ASSERT_OK(th_pg_gate_rules(g, "enforce", ATK_RULES), "policy restored");
}

static void subtest_reload_prepared(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	char types[256], sev[16], st[8], msg[512];
	int fd;

	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", ATK_RULES), "policy: select+delete"))
		return;
	ASSERT_TRUE(order_exists(g, 3), "row 3 there before");
	fd = th_pg_raw_connect(g);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	pg_put_parse(&b, "s_del", "DELETE FROM orders WHERE id = 3");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(xchg(fd, &b, 1, types, st, msg), "parse s_del");
	ASSERT_STREQ(st, "", "s_del allowed when prepared");
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", RO_RULES), "reload: select only"))
		goto out;
	th_pg_m_bind(&b, "", "s_del", 0, NULL, -1);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 10000), "send bind/execute");
	ag_buf_free(&b);
	ASSERT_OK(drain_to_eof(fd, sev, st, msg), "connection ended");
	printf("after reload: sev=%s st=%s msg=%s\n", sev, st, msg);
	ASSERT_STREQ(sev, "FATAL", "FATAL");
	ASSERT_STREQ(st, "42501", "42501");
	ASSERT_HAS_SUBSTR(msg, "the policy was reloaded", "why");
	ASSERT_HAS_SUBSTR(msg, "s_del", "names the statement");
	usleep(200000);
	ASSERT_TRUE(order_exists(g, 3), "row 3 still exists");
out:
	close(fd);
	ASSERT_OK(th_pg_gate_rules(g, "enforce", ATK_RULES), "policy restored");
}

static void subtest_reload_unrelated(struct th_pg_gate *g)
{
	static char policy[sizeof(g->policy) + 256];
	char val[64], sev[16], st[8], msg[512];
	const char *at;
	int fd, before, applied;

	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", ATK_RULES), "policy"))
		return;
	fd = th_pg_raw_connect(g);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	ASSERT_OK(query1(fd, "SELECT 1", val, sizeof(val), sev, st, msg), "select before");
	ASSERT_STREQ(val, "1", "select before");
	/* The same policy with one more (unrelated) target. */
	at = strstr(g->policy, "targets:\n");
	if (!ASSERT_OK_PTR(at, "targets in policy"))
		goto out;
	at += strlen("targets:\n");
	snprintf(policy, sizeof(policy),
		 "%.*s  - name: unrelated\n    protocol: tcp\n    address: 127.0.0.99:9\n%s",
		 (int)(at - g->policy), g->policy, at);
	before = count_in_log(g, " reloaded (");
	applied = count_in_log(g, "policy reload applied to the live session");
	if (!ASSERT_OK(th_daemon_write_policy(&g->d, policy), "write policy") ||
	    !ASSERT_OK(th_daemon_reload(&g->d), "SIGHUP"))
		goto out;
	for (int t = 0; t < 100 && count_in_log(g, " reloaded (") <= before; t++)
		usleep(50 * 1000);
	if (!ASSERT_GT(count_in_log(g, " reloaded ("), before, "reload logged"))
		goto out;
	ASSERT_OK(query1(fd, "SELECT 1", val, sizeof(val), sev, st, msg), "session kept");
	ASSERT_STREQ(st, "", "no error");
	ASSERT_STREQ(val, "1", "SELECT 1 returns 1");
	ASSERT_GT(count_in_log(g, "policy reload applied to the live session"), applied,
		  "the live session took the new policy");
	ASSERT_OK(query1(fd, "SELECT 1", val, sizeof(val), sev, st, msg), "still there");
	ASSERT_STREQ(val, "1", "SELECT 1 again");
out:
	close(fd);
	ASSERT_OK(th_pg_gate_rules(g, "enforce", ATK_RULES), "policy restored");
}

void test_pg_attack(void)
{
	struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.23", "trust", "enforce", ATK_RULES),
		       "gate"))
		goto out;
	th_pg_admin(&g.pg,
		    "CREATE TABLE secrets (s text); INSERT INTO secrets VALUES ('topsecret42');"
		    "ALTER TABLE secrets OWNER TO agent; CREATE TABLE orders_bak AS SELECT * FROM orders; GRANT ALL ON orders_bak TO agent",
		    NULL, 0);
	if (test__start_subtest("statements_blocked"))
		subtest_statements(&g);
	if (test__start_subtest("masked_paths"))
		subtest_masked_paths(&g);
	if (test__start_subtest("function_call_refused"))
		subtest_function_call(&g);
	if (test__start_subtest("extended_smuggling"))
		subtest_extended(&g);
	if (test__start_subtest("query_during_copy_in"))
		subtest_query_during_copy_in(&g);
	if (test__start_subtest("reload_tightens_live_session"))
		subtest_reload_tightens(&g);
	if (test__start_subtest("reload_prepared_statement_refused"))
		subtest_reload_prepared(&g);
	if (test__start_subtest("reload_unrelated_keeps_session"))
		subtest_reload_unrelated(&g);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}
