// SPDX-License-Identifier: GPL-2.0
/*
 * PostgreSQL through the gateway with the simple query protocol, real clients (psql, python3
 * psycopg2) in a tagged cgroup against a real PostgreSQL 15: allowed reads and writes return
 * what the same statements return directly; a blocked statement is SQLSTATE 42501 naming the
 * rule and the session goes on; a block inside a transaction aborts it (COMMIT becomes
 * ROLLBACK, nothing is committed); multi-statement strings; PREPARE/EXECUTE; COPY both ways;
 * unparseable SQL refused; an approve rule's statement held until its approval times out
 * (nobody decides; approval.c covers the rest); observe mode; the session's counters.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cgroup.h"
#include "../pg.h"
#include "../test_progs.h"

#define PG_RULES                                                                                   \
	"    sql:\n"                                                                               \
	"      - { name: no-drop, when: { command: [drop, truncate] }, then: deny }\n"             \
	"      - { name: no-unbounded-writes, when: { command: [update, delete], where: absent }," \
	" then: deny }\n"                                                                          \
	"      - { name: alter-needs-review, when: { command: [alter] }, then: approve }\n"        \
	"      - { name: watch-show, when: { command: [show] }, then: observe }\n"                 \
	"      - { name: orders-only-writes, when: { command: [insert], tables: [users] },"        \
	" then: deny }\n"                                                                          \
	"      - { name: rw, when: { command: [select, insert, update, delete, copy, begin,"       \
	" commit, rollback, savepoint, set, show, prepare, execute, deallocate] },"                \
	" then: allow }\n"                                                                         \
	"approvals: { approvers: [root], timeout: 1s }\n"

static char out_gw[65536], out_direct[65536], err_gw[16384], err_direct[16384];

/* The same psql script direct and through the gateway: the same output, both succeeding. */
static void same_as_direct(struct th_pg_gate *g, const char *sql)
{
	int rc_d = th_pg_psql(&g->pg, NULL, sql, out_direct, sizeof(out_direct), err_direct,
			      sizeof(err_direct));
	int rc_g =
		th_pg_psql(&g->pg, g->tagged, sql, out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));

	if (!ASSERT_EQ(rc_d, 0, "direct psql"))
		printf("direct stderr: %s\n", err_direct);
	if (!ASSERT_EQ(rc_g, 0, "gateway psql"))
		printf("gateway stderr: %s\n", err_gw);
	ASSERT_STREQ(out_gw, out_direct, "same output through the gateway");
	ASSERT_GT(strlen(out_gw), 0, "some output");
}

static void subtest_reads(struct th_pg_gate *g)
{
	same_as_direct(
		g,
		"SELECT * FROM users ORDER BY id;\n"
		"SELECT u.email, sum(o.amount), count(*) FROM users u JOIN orders o ON "
		"o.user_id = u.id GROUP BY u.email ORDER BY 1;\n"
		"SELECT NULL::text AS n, ''::text AS e, 'x'::bytea, now()::date > '2000-01-01';\n"
		"SELECT g, repeat('ab', g) FROM generate_series(1, 2000) g;\n");
}

static void subtest_writes(struct th_pg_gate *g)
{
	char out[4096];

	/* Through the gateway first, then the same writes direct on other keys: same answers. */
	th_pg_psql(&g->pg, g->tagged,
		   "INSERT INTO orders VALUES (100, 1, 3.50, 'gw', '2024-06-01') RETURNING *;\n"
		   "UPDATE orders SET amount = amount * 2 WHERE id = 100 RETURNING amount;\n"
		   "DELETE FROM orders WHERE id = 100 RETURNING id;\n",
		   out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));
	th_pg_psql(&g->pg, NULL,
		   "INSERT INTO orders VALUES (100, 1, 3.50, 'gw', '2024-06-01') RETURNING *;\n"
		   "UPDATE orders SET amount = amount * 2 WHERE id = 100 RETURNING amount;\n"
		   "DELETE FROM orders WHERE id = 100 RETURNING id;\n",
		   out_direct, sizeof(out_direct), err_direct, sizeof(err_direct));
	ASSERT_STREQ(out_gw, out_direct, "writes answer the same");
	ASSERT_HAS_SUBSTR(out_gw, "100|1|3.50|gw|2024-06-01", "insert returned the row");
	/* And a write that stays: seen directly afterwards. */
	ASSERT_EQ(th_pg_psql(&g->pg, g->tagged,
			     "INSERT INTO orders VALUES (101, 2, 7.00, 'kept', '2024-06-02');\n",
			     NULL, 0, err_gw, sizeof(err_gw)),
		  0, "insert through the gateway");
	th_pg_admin(&g->pg, "SELECT item FROM orders WHERE id = 101", out, sizeof(out));
	ASSERT_STREQ(out, "kept\n", "the insert is in the table");
	th_pg_admin(&g->pg, "DELETE FROM orders WHERE id = 101", NULL, 0);
}

static const char py_blocked[] = "import psycopg2, sys\n"
				 "c = psycopg2.connect('')\n"
				 "c.autocommit = True\n"
				 "cur = c.cursor()\n"
				 "try:\n"
				 "    cur.execute('DELETE FROM orders')\n"
				 "    print('NOT BLOCKED')\n"
				 "except psycopg2.Error as e:\n"
				 "    print('code', e.pgcode)\n"
				 "    print('msg', e.diag.message_primary)\n"
				 "    print('detail', e.diag.message_detail)\n"
				 "cur.execute('SELECT count(*) FROM orders')\n"
				 "print('count', cur.fetchone()[0])\n"
				 "try:\n"
				 "    cur.execute('DROP TABLE orders')\n"
				 "except psycopg2.Error as e:\n"
				 "    print('code2', e.pgcode, e.diag.message_primary)\n"
				 "try:\n"
				 "    cur.execute('ALTER TABLE orders ADD COLUMN x int')\n"
				 "except psycopg2.Error as e:\n"
				 "    print('code3', e.pgcode, e.diag.message_primary)\n"
				 "try:\n"
				 "    cur.execute('INSERT INTO users (id) VALUES (99)')\n"
				 "except psycopg2.Error as e:\n"
				 "    print('code4', e.pgcode, e.diag.message_primary)\n"
				 "cur.execute('SELECT 42')\n"
				 "print('after', cur.fetchone()[0])\n";

static void subtest_blocked(struct th_pg_gate *g)
{
	char out[4096];
	int rc = th_pg_python(&g->pg, g->tagged, py_blocked, out_gw, sizeof(out_gw), err_gw,
			      sizeof(err_gw), 30000);

	if (!ASSERT_EQ(rc, 0, "python"))
		printf("stderr: %s\n", err_gw);
	printf("%s", out_gw);
	ASSERT_HAS_SUBSTR(out_gw, "code 42501\n", "SQLSTATE 42501");
	ASSERT_HAS_SUBSTR(out_gw, "msg agentgate: blocked by rule no-unbounded-writes\n",
			  "message names the rule");
	ASSERT_HAS_SUBSTR(out_gw, "detail statement class: ", "detail gives the class");
	ASSERT_HAS_SUBSTR(out_gw, "count 5\n", "same connection goes on, nothing deleted");
	ASSERT_HAS_SUBSTR(out_gw, "code2 42501 agentgate: blocked by rule no-drop", "drop");
	ASSERT_HAS_SUBSTR(out_gw,
			  "code3 42501 agentgate: approval ap-", "approve is held, nobody decides");
	ASSERT_HAS_SUBSTR(out_gw, " timed out after 1s\n", "and it times out");
	ASSERT_HAS_SUBSTR(out_gw, "code4 42501 agentgate: blocked by rule orders-only-writes",
			  "tables rule");
	ASSERT_HAS_SUBSTR(out_gw, "after 42\n", "still usable");
	th_pg_admin(&g->pg, "SELECT count(*) FROM orders", out, sizeof(out));
	ASSERT_STREQ(out, "5\n", "orders intact");
	th_pg_admin(&g->pg,
		    "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' "
		    "AND column_name = 'x'",
		    out, sizeof(out));
	ASSERT_STREQ(out, "0\n", "the held ALTER did not run");
}

static const char py_txn[] =
	"import psycopg2, psycopg2.extensions as ext\n"
	"c = psycopg2.connect('')\n"
	"cur = c.cursor()\n"
	"cur.execute(\"INSERT INTO orders VALUES (200, 1, 1.00, 'txn', '2024-07-01')\")\n"
	"print('status1', c.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS)\n"
	"try:\n"
	"    cur.execute('DELETE FROM orders')\n"
	"except psycopg2.Error as e:\n"
	"    print('blocked', e.pgcode)\n"
	"print('status2', c.info.transaction_status == ext.TRANSACTION_STATUS_INERROR)\n"
	"try:\n"
	"    cur.execute('SELECT 1')\n"
	"except psycopg2.Error as e:\n"
	"    print('aborted', e.pgcode)\n"
	"c.rollback()\n"
	"cur.execute('SELECT count(*) FROM orders WHERE id = 200')\n"
	"print('after rollback', cur.fetchone()[0])\n"
	"c.commit()\n";

static void subtest_txn(struct th_pg_gate *g)
{
	char out[4096];
	int rc;

	rc = th_pg_python(&g->pg, g->tagged, py_txn, out_gw, sizeof(out_gw), err_gw, sizeof(err_gw),
			  30000);
	if (!ASSERT_EQ(rc, 0, "python"))
		printf("stderr: %s\n", err_gw);
	printf("%s", out_gw);
	ASSERT_HAS_SUBSTR(out_gw, "status1 True", "in a transaction");
	ASSERT_HAS_SUBSTR(out_gw, "blocked 42501", "blocked");
	ASSERT_HAS_SUBSTR(out_gw, "status2 True", "the client sees status E");
	ASSERT_HAS_SUBSTR(out_gw, "aborted 25P02", "later statements: transaction aborted");
	ASSERT_HAS_SUBSTR(out_gw, "after rollback 0", "the insert was rolled back");

	/* psql: COMMIT after the block answers ROLLBACK, and nothing is committed. */
	rc = th_pg_psql(&g->pg, g->tagged,
			"\\set ON_ERROR_STOP 0\n"
			"BEGIN;\n"
			"INSERT INTO orders VALUES (201, 1, 1.00, 'txn', '2024-07-01');\n"
			"DELETE FROM orders;\n"
			"SELECT 1;\n"
			"COMMIT;\n",
			out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));
	printf("psql: %d\nstdout: %s\nstderr: %s\n", rc, out_gw, err_gw);
	ASSERT_HAS_SUBSTR(err_gw, "agentgate: blocked by rule no-unbounded-writes", "blocked");
	ASSERT_HAS_SUBSTR(err_gw, "current transaction is aborted", "aborted after");
	th_pg_admin(&g->pg, "SELECT count(*) FROM orders WHERE id = 201", out, sizeof(out));
	ASSERT_STREQ(out, "0\n", "nothing committed");
	/* psql -e echoes the command tag: ROLLBACK where COMMIT was asked. */
	{
		char conn[256];
		char *argv[] = { "/usr/bin/psql", "-X", "-d", conn, NULL };

		th_pg_conninfo(&g->pg, conn, sizeof(conn), NULL);
		rc = th_pg_exec(g->tagged, argv, "BEGIN;\nDELETE FROM orders;\nCOMMIT;\n", out_gw,
				sizeof(out_gw), err_gw, sizeof(err_gw), 30000);
		ASSERT_HAS_SUBSTR(out_gw, "ROLLBACK", "COMMIT answered ROLLBACK");
	}
	/* A savepoint rolled back to makes the transaction usable again, as in PostgreSQL. */
	rc = th_pg_psql(&g->pg, g->tagged,
			"BEGIN;\n"
			"INSERT INTO orders VALUES (202, 1, 1.00, 'sp', '2024-07-01');\n"
			"SAVEPOINT a;\n"
			"\\set ON_ERROR_STOP 0\n"
			"DELETE FROM orders;\n"
			"\\set ON_ERROR_STOP 1\n"
			"ROLLBACK TO SAVEPOINT a;\n"
			"COMMIT;\n",
			out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));
	ASSERT_EQ(rc, 0, "savepoint script");
	th_pg_admin(&g->pg, "SELECT count(*) FROM orders WHERE id = 202", out, sizeof(out));
	ASSERT_STREQ(out, "1\n", "committed after rolling back to the savepoint");
	th_pg_admin(&g->pg, "DELETE FROM orders WHERE id >= 200", NULL, 0);
}

static void subtest_multi(struct th_pg_gate *g)
{
	char out[4096];
	int rc;

	/* One Query message with several statements (psql sends -c strings whole). */
	{
		char conn[256];
		char *argv[] = { "/usr/bin/psql",
				 "-X",
				 "-A",
				 "-t",
				 "-d",
				 conn,
				 "-c",
				 "SELECT 1; SELECT 'two'; SELECT count(*) FROM users",
				 NULL };

		th_pg_conninfo(&g->pg, conn, sizeof(conn), NULL);
		rc = th_pg_exec(g->tagged, argv, NULL, out_gw, sizeof(out_gw), err_gw,
				sizeof(err_gw), 30000);
		rc |= th_pg_exec(NULL, argv, NULL, out_direct, sizeof(out_direct), err_direct,
				 sizeof(err_direct), 30000);
		ASSERT_EQ(rc, 0, "psql -c");
		ASSERT_STREQ(out_gw, out_direct, "all statements answered");
	}
	/* A string with one blocked statement is refused whole: nothing of it runs. */
	{
		char conn[256];
		char *argv[] = { "/usr/bin/psql",
				 "-X",
				 "-A",
				 "-t",
				 "-d",
				 conn,
				 "-c",
				 "INSERT INTO orders VALUES (300, 1, 1, 'multi', '2024-01-01'); "
				 "DELETE FROM orders; SELECT 1",
				 NULL };

		th_pg_conninfo(&g->pg, conn, sizeof(conn), NULL);
		rc = th_pg_exec(g->tagged, argv, NULL, out_gw, sizeof(out_gw), err_gw,
				sizeof(err_gw), 30000);
		ASSERT_NEQ(rc, 0, "refused");
		ASSERT_HAS_SUBSTR(err_gw, "agentgate: blocked by rule no-unbounded-writes", "rule");
		th_pg_admin(&g->pg, "SELECT count(*) FROM orders WHERE id = 300", out, sizeof(out));
		ASSERT_STREQ(out, "0\n", "the allowed part did not run either");
	}
}

static void subtest_prepare(struct th_pg_gate *g)
{
	int rc = th_pg_psql(&g->pg, g->tagged,
			    "PREPARE q(int) AS SELECT email FROM users WHERE id = $1;\n"
			    "EXECUTE q(2);\n"
			    "\\set ON_ERROR_STOP 0\n"
			    "PREPARE d AS DELETE FROM orders;\n"
			    "EXECUTE d;\n"
			    "EXECUTE never_prepared;\n"
			    "SELECT 'end';\n",
			    out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));

	printf("rc %d\nstdout: %s\nstderr: %s\n", rc, out_gw, err_gw);
	ASSERT_HAS_SUBSTR(out_gw, "bob@example.org", "EXECUTE of an allowed PREPARE");
	ASSERT_HAS_SUBSTR(err_gw, "blocked by rule no-unbounded-writes", "PREPARE of a delete");
	ASSERT_HAS_SUBSTR(err_gw, "EXECUTE of unknown prepared statement \"d\"",
			  "EXECUTE of what was refused");
	ASSERT_HAS_SUBSTR(err_gw, "EXECUTE of unknown prepared statement \"never_prepared\"",
			  "EXECUTE of an unknown name");
	ASSERT_HAS_SUBSTR(out_gw, "end", "session continues");
}

static void subtest_unparseable(struct th_pg_gate *g)
{
	int rc = th_pg_psql(&g->pg, g->tagged,
			    "\\set ON_ERROR_STOP 0\n"
			    "SELEC * FROM users;\n"
			    "SELECT 'still here';\n",
			    out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));

	ASSERT_EQ(rc, 0, "psql");
	ASSERT_HAS_SUBSTR(err_gw, "agentgate: cannot parse the statement", "refused");
	ASSERT_HAS_SUBSTR(out_gw, "still here", "session continues");
}

static void subtest_copy(struct th_pg_gate *g)
{
	char path[256], back[256], cmd[1024], out[4096], a[8192], b[8192];
	FILE *f;
	size_t na, nb;
	int rc;

	snprintf(path, sizeof(path), "%s/in.tsv", g->pg.dir);
	snprintf(back, sizeof(back), "%s/out.tsv", g->pg.dir);
	f = fopen(path, "w");
	if (!ASSERT_OK_PTR(f, "input file"))
		return;
	for (int i = 0; i < 1000; i++)
		fprintf(f, "%d\t2\t%d.25\tbulk item \\t%d\t2024-08-01\n", 1000 + i, i, i);
	fclose(f);
	snprintf(cmd, sizeof(cmd),
		 "\\copy orders FROM '%s'\n"
		 "\\copy (SELECT * FROM orders WHERE id >= 1000 ORDER BY id) TO '%s'\n",
		 path, back);
	rc = th_pg_psql(&g->pg, g->tagged, cmd, out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));
	if (!ASSERT_EQ(rc, 0, "psql \\copy in and out"))
		printf("stderr: %s\n", err_gw);
	th_pg_admin(&g->pg, "SELECT count(*), sum(amount) FROM orders WHERE id >= 1000", out,
		    sizeof(out));
	ASSERT_STREQ(out, "1000|499750.00\n", "all rows copied in");
	f = fopen(path, "r");
	na = f ? fread(a, 1, sizeof(a), f) : 0;
	if (f)
		fclose(f);
	f = fopen(back, "r");
	nb = f ? fread(b, 1, sizeof(b), f) : 0;
	if (f)
		fclose(f);
	ASSERT_EQ(nb, na, "copied out as long as in");
	ASSERT_OK(memcmp(a, b, na < nb ? na : nb), "copied out as it went in");
	th_pg_admin(&g->pg, "DELETE FROM orders WHERE id >= 1000", NULL, 0);
}

static void subtest_counters(struct th_pg_gate *g)
{
	static const char py[] = "import psycopg2, sys, time\n"
				 "c = psycopg2.connect('')\n"
				 "c.autocommit = True\n"
				 "cur = c.cursor()\n"
				 "for i in range(5):\n"
				 "    cur.execute('SELECT %s', (i,))\n"
				 "try:\n"
				 "    cur.execute('DROP TABLE users')\n"
				 "except psycopg2.Error:\n"
				 "    pass\n"
				 "print('ready', flush=True)\n"
				 "sys.stdin.readline()\n";
	long long st = -1, bl = -1, ma = -1;
	int in;
	/* The script waits on stdin while the test reads the live session's counters. */
	pid_t pid = th_pg_python_held(&g->pg, g->tagged, py, &in);

	if (!ASSERT_GT(pid, 0, "script"))
		return;
	for (int t = 0; t < 100; t++) {
		if (!th_daemon_counters(&g->d, pid, &st, &bl, &ma) && st >= 6)
			break;
		usleep(100 * 1000);
	}
	ASSERT_EQ(st, 6, "statements counted");
	ASSERT_EQ(bl, 1, "blocks counted");
	ASSERT_EQ(ma, 0, "nothing masked");
	close(in);
	ASSERT_EQ(th_wait(pid, 10000), 0, "script");
}

static void subtest_observe(struct th_pg_gate *g)
{
	char log[65536];
	int rc;

	/* then: observe — allowed, and counted as any statement. */
	rc = th_pg_psql(&g->pg, g->tagged, "SHOW server_version_num", out_gw, sizeof(out_gw),
			err_gw, sizeof(err_gw));
	ASSERT_EQ(rc, 0, "then: observe runs");
	ASSERT_HAS_SUBSTR(out_gw, "15", "answered");
	/* An agent in mode: observe is never blocked; what would have been is logged. */
	if (!ASSERT_OK(th_pg_gate_rules(g, "observe", PG_RULES), "observe mode"))
		return;
	rc = th_pg_psql(&g->pg, g->tagged, "DROP TABLE IF EXISTS not_there", out_gw, sizeof(out_gw),
			err_gw, sizeof(err_gw));
	ASSERT_EQ(rc, 0, "not blocked in observe mode");
	ASSERT_HAS_SUBSTR(err_gw, "does not exist, skipping", "the server ran it");
	usleep(100 * 1000);
	th_daemon_read_log(&g->d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, "observe mode, would block by rule no-drop", "logged");
	ASSERT_OK(th_pg_gate_rules(g, "enforce", PG_RULES), "back to enforce");
}

static void subtest_large(struct th_pg_gate *g)
{
	size_t n = 600000;
	char *sql = malloc(n + 64);
	int rc;

	if (!ASSERT_OK_PTR(sql, "malloc"))
		return;
	/* A 600 KB Query: held whole (past the relay's read watermark) before it is decided. */
	strcpy(sql, "SELECT length('");
	memset(sql + strlen(sql), 'q', n);
	strcpy(sql + 15 + n, "');\n");
	rc = th_pg_psql(&g->pg, g->tagged, sql, out_gw, sizeof(out_gw), err_gw, sizeof(err_gw));
	if (!ASSERT_EQ(rc, 0, "large query"))
		printf("stderr: %s\n", err_gw);
	ASSERT_STREQ(out_gw, "600000\n", "decided and answered");
	free(sql);
	/* A 20 MB row: streamed through (nothing to mask here). */
	rc = th_pg_python(&g->pg, g->tagged,
			  "import psycopg2\n"
			  "c = psycopg2.connect('')\n"
			  "cur = c.cursor()\n"
			  "cur.execute(\"SELECT repeat('y', 20000000) || 'end'\")\n"
			  "v = cur.fetchone()[0]\n"
			  "print(len(v), v[-5:])\n",
			  out_gw, sizeof(out_gw), err_gw, sizeof(err_gw), 60000);
	if (!ASSERT_EQ(rc, 0, "large row"))
		printf("stderr: %s\n", err_gw);
	ASSERT_STREQ(out_gw, "20000003 yyend\n", "all of it");
}

void test_pg_query(void)
{
	struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.2", "scram-sha-256", "enforce", PG_RULES),
		       "gate"))
		goto out;
	if (test__start_subtest("reads_same_as_direct"))
		subtest_reads(&g);
	if (test__start_subtest("writes_same_as_direct"))
		subtest_writes(&g);
	if (test__start_subtest("blocked_42501_session_continues"))
		subtest_blocked(&g);
	if (test__start_subtest("blocked_in_transaction_aborts"))
		subtest_txn(&g);
	if (test__start_subtest("multi_statement"))
		subtest_multi(&g);
	if (test__start_subtest("prepare_execute"))
		subtest_prepare(&g);
	if (test__start_subtest("unparseable_refused"))
		subtest_unparseable(&g);
	if (test__start_subtest("copy_in_and_out"))
		subtest_copy(&g);
	if (test__start_subtest("session_counters"))
		subtest_counters(&g);
	if (test__start_subtest("observe_rule_and_observe_mode"))
		subtest_observe(&g);
	if (test__start_subtest("large_query_and_row"))
		subtest_large(&g);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}
