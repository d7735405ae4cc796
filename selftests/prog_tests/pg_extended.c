// SPDX-License-Identifier: GPL-2.0
/*
 * The extended query protocol through the gateway: pgbench -M extended and -M prepared (select
 * only and TPC-B with writes), and a raw client that pipelines Parse/Bind/Describe/Execute up to
 * Sync with a blocked Parse in the middle and checks the exact answers: the messages before it
 * answered by the server, then ErrorResponse 42501, everything up to Sync skipped, ReadyForQuery
 * with the right status; an earlier real error wins; named statements; several Syncs in one
 * pipeline; a block inside a transaction block; and a 100k-Parse pipeline.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pgwire.h"
#include "../pg.h"
#include "../test_progs.h"

#define EXT_RULES                                                                                  \
	"    sql:\n"                                                                               \
	"      - { name: no-unbounded-writes, when: { command: [update, delete], where: absent }," \
	" then: deny }\n"                                                                          \
	"      - { name: no-truncate, when: { command: [truncate] }, then: deny }\n"               \
	"      - { name: rw, when: { command: [select, insert, update, delete, begin, commit,"     \
	" rollback, set, show] }, then: allow }\n"

/* --- building messages ----------------------------------------------------------------------- */

static void m_parse(struct ag_buf *b, const char *name, const char *sql)
{
	pg_put_parse(b, name, sql);
}

static int send_buf(int fd, struct ag_buf *b)
{
	int rc = th_send_all(fd, ag_buf_head(b), ag_buf_len(b), 10000);

	ag_buf_free(b);
	return rc;
}

/* Sends b, collects up to n ReadyForQuery; checks the message types and first SQLSTATE. */
static void expect(int fd, struct ag_buf *b, int n_ready, const char *types, const char *state,
		   const char *what)
{
	char got[256], st[8], msg[512];
	int rc = send_buf(fd, b);

	if (!ASSERT_OK(rc, "send pipeline"))
		return;
	rc = th_pg_raw_collect(fd, n_ready, got, sizeof(got), st, msg, sizeof(msg), 10000);
	if (!ASSERT_OK(rc, "answers"))
		return;
	if (!ASSERT_STREQ(got, types, what))
		printf("%s: error %s %s\n", what, st, msg);
	ASSERT_STREQ(st, state ? state : "", "SQLSTATE");
	if (state && !strcmp(state, "42501"))
		ASSERT_HAS_SUBSTR(msg, "agentgate: blocked by rule no-unbounded-writes", "message");
}

static void subtest_pipeline(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	const char *p1[] = { "2" };
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	/* 1: allowed statement, described; 2: blocked Parse; then its Bind/Execute, Sync. */
	m_parse(&b, "", "SELECT email FROM users WHERE id = $1");
	th_pg_m_bind(&b, "", "", 1, p1, 0);
	pg_put_describe(&b, 'P', "");
	th_pg_m_execute(&b, "");
	m_parse(&b, "", "DELETE FROM orders");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "12TDCEZ", "42501", "answers before the block, the error, RFQ");

	/* The same connection goes on. */
	m_parse(&b, "", "SELECT count(*) FROM orders");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "12DCZ", NULL, "next pipeline");

	/* Blocked first: nothing but the error and RFQ. */
	m_parse(&b, "", "UPDATE orders SET amount = 0");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	pg_put_describe(&b, 'P', "");
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "EZ", "42501", "blocked first");

	/* A real error earlier in the pipeline wins; the blocked Parse is skipped like the rest. */
	m_parse(&b, "", "SELECT * FROM no_such_table");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	m_parse(&b, "", "DELETE FROM orders");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "EZ", "42P01", "the earlier error");

	/* Three Syncs, the middle group blocked. */
	m_parse(&b, "", "SELECT 1");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	m_parse(&b, "", "DELETE FROM orders");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	m_parse(&b, "", "SELECT 2");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 3, "12DCZEZ12DCZ", "42501", "three groups");

	/* Flush instead of Sync: the error comes at once, the skip still ends at Sync. */
	m_parse(&b, "", "DELETE FROM orders");
	th_pg_m_simple(&b, 'H');
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "EZ", "42501", "blocked before a Flush");

	/* Close and named portals. */
	m_parse(&b, "n1", "SELECT id FROM users ORDER BY id");
	th_pg_m_bind(&b, "p1", "n1", 0, NULL, 0);
	th_pg_m_execute(&b, "p1");
	{
		struct pg_wr w;

		pg_wr_begin(&w, &b, 'C');
		pg_wr_u8(&w, 'S');
		pg_wr_str(&w, "n1");
		pg_wr_end(&w);
	}
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "12DDDC3Z", NULL, "named statement and portal, Close");

	{
		char rows[4096];
		ssize_t n;

		th_pg_m_simple(&b, 'X');
		send_buf(fd, &b);
		n = th_recv_all(fd, rows, sizeof(rows), 5000);
		ASSERT_EQ(n, 0, "closed after Terminate");
	}
	close(fd);
	(void)p1;
}

static void subtest_named_many(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	char got[2048], st[8];
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	/* Prepared once, executed 200 times in one pipeline. */
	m_parse(&b, "q", "SELECT $1::int + 1");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "1Z", NULL, "prepared");
	for (int i = 0; i < 200; i++) {
		char v[16];
		const char *p[] = { v };

		snprintf(v, sizeof(v), "%d", i);
		th_pg_m_bind(&b, "", "q", 1, p, 0);
		th_pg_m_execute(&b, "");
	}
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(send_buf(fd, &b), "send");
	ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), st, NULL, 0, 10000), "answers");
	ASSERT_EQ(strlen(got), 601, "2DC per execute, then Z");
	ASSERT_STREQ(st, "", "no error");
	/* EXECUTE via SQL of a protocol-level statement: decided by what it prepared. */
	pg_put_query(&b, "EXECUTE q(41)");
	expect(fd, &b, 1, "TDCZ", NULL, "EXECUTE q by SQL");
	m_parse(&b, "d", "DELETE FROM orders WHERE id = -1");
	th_pg_m_simple(&b, 'S');
	expect(fd, &b, 1, "1Z", NULL, "a bounded delete prepared");
	close(fd);
}

static void subtest_txn(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	char got[256], st[8];
	struct th_pg_msg m;
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	pg_put_query(&b, "BEGIN");
	expect(fd, &b, 1, "CZ", NULL, "begin");
	m_parse(&b, "", "INSERT INTO orders VALUES (500, 1, 1, 'x', '2024-01-01')");
	th_pg_m_bind(&b, "", "", 0, NULL, 0);
	th_pg_m_execute(&b, "");
	m_parse(&b, "", "DELETE FROM orders");
	th_pg_m_simple(&b, 'S');
	ASSERT_OK(send_buf(fd, &b), "send");
	/* Read to the RFQ, keeping its status. */
	for (int i = 0; i < 10; i++) {
		if (th_pg_read_msg(fd, &m, 10000))
			break;
		if (m.type == 'Z') {
			ASSERT_EQ(m.body[0], 'E', "transaction status E after the block");
			th_pg_msg_free(&m);
			break;
		}
		th_pg_msg_free(&m);
	}
	pg_put_query(&b, "SELECT 1");
	expect(fd, &b, 1, "EZ", "25P02", "aborted");
	pg_put_query(&b, "COMMIT");
	ASSERT_OK(send_buf(fd, &b), "send");
	if (ASSERT_OK(th_pg_read_msg(fd, &m, 10000), "commit answer")) {
		ASSERT_EQ(m.type, 'C', "CommandComplete");
		ASSERT_STREQ((char *)m.body, "ROLLBACK", "COMMIT became ROLLBACK");
		th_pg_msg_free(&m);
	}
	th_pg_raw_collect(fd, 1, got, sizeof(got), st, NULL, 0, 10000);
	close(fd);
	{
		char out[64];

		th_pg_admin(&g->pg, "SELECT count(*) FROM orders WHERE id = 500", out, sizeof(out));
		ASSERT_STREQ(out, "0\n", "nothing committed");
	}
}

/* The daemon's peak resident memory (VmHWM), in KiB, or -1. */
static long daemon_peak_kb(struct th_pg_gate *g)
{
	char path[64], line[256];
	long kb = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", g->d.pid);
	f = fopen(path, "r");
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

static void subtest_function_call(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	struct pg_wr w;
	int fd = th_pg_raw_connect(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	/* The fastpath FunctionCall names a function by OID, outside SQL: refused. */
	pg_wr_begin(&w, &b, 'F');
	pg_wr_u32(&w, 2626); /* pg_sleep */
	pg_wr_u16(&w, 0);
	pg_wr_u16(&w, 1);
	pg_wr_u32(&w, 1);
	pg_wr_bytes(&w, "0", 1);
	pg_wr_u16(&w, 0);
	pg_wr_end(&w);
	ASSERT_OK(send_buf(fd, &b), "send");
	{
		char got[16], st[8], msg[256];

		ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), st, msg, sizeof(msg), 10000),
			  "answer");
		ASSERT_STREQ(got, "EZ", "an error, then ReadyForQuery");
		ASSERT_STREQ(st, "42501", "42501");
		ASSERT_HAS_SUBSTR(msg, "FunctionCall", "says what");
	}
	pg_put_query(&b, "SELECT 1");
	expect(fd, &b, 1, "TDCZ", NULL, "session goes on");
	close(fd);
}

static void subtest_many_parses(struct th_pg_gate *g)
{
	struct ag_buf b = { 0 };
	char got[8];
	int fd = th_pg_raw_connect(g), n = 0;
	long before = daemon_peak_kb(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	/* 100k Parse messages and one Sync, written before a byte is read back. */
	for (int i = 0; i < 100000; i++)
		m_parse(&b, "", "SELECT 1");
	th_pg_m_simple(&b, 'S');
	if (!ASSERT_OK(send_buf(fd, &b), "send 100k Parses"))
		goto out;
	for (;;) {
		struct th_pg_msg m;

		if (th_pg_read_msg(fd, &m, 20000))
			break;
		if (m.type == '1')
			n++;
		th_pg_msg_free(&m);
		if (m.type == 'Z' || m.type == 'E')
			break;
	}
	ASSERT_EQ(n, 100000, "every Parse answered");
	printf("daemon peak RSS %ld KiB before, %ld KiB after\n", before, daemon_peak_kb(g));
	ASSERT_LT(daemon_peak_kb(g) - before, 32 * 1024, "the daemon's memory stayed bounded");
	pg_put_query(&b, "SELECT 1");
	send_buf(fd, &b);
	ASSERT_OK(th_pg_raw_collect(fd, 1, got, sizeof(got), NULL, NULL, 0, 10000), "usable");
out:
	close(fd);
}

static int pgbench(struct th_pg_gate *g, const char *rel, const char *args, char *out,
		   size_t outlen, char *err, size_t errlen)
{
	char port[16], cmd[512], *argv[40];
	int n = 0;

	snprintf(port, sizeof(port), "%d", g->pg.port);
	snprintf(cmd, sizeof(cmd), "%s", args);
	argv[n++] = "/usr/bin/pgbench";
	argv[n++] = "-h";
	argv[n++] = g->pg.addr;
	argv[n++] = "-p";
	argv[n++] = port;
	argv[n++] = "-U";
	argv[n++] = TH_PG_USER;
	for (char *save = NULL, *t = strtok_r(cmd, " ", &save); t && n < 38;
	     t = strtok_r(NULL, " ", &save))
		argv[n++] = t;
	argv[n++] = TH_PG_DB;
	argv[n] = NULL;
	return th_pg_exec(rel, argv, NULL, out, outlen, err, errlen, 120000);
}

static void subtest_pgbench(struct th_pg_gate *g, const char *mode, bool select_only)
{
	static char out[16384], err[16384];
	char args[256];
	int rc;

	snprintf(args, sizeof(args), "-n -M %s %s -c 4 -j 2 -t 300", mode, select_only ? "-S" : "");
	rc = pgbench(g, g->tagged, args, out, sizeof(out), err, sizeof(err));
	if (!ASSERT_EQ(rc, 0, "pgbench through the gateway"))
		printf("stdout: %s\nstderr: %s\n", out, err);
	ASSERT_HAS_SUBSTR(out, "number of transactions actually processed: 1200/1200", "all ran");
	ASSERT_HAS_SUBSTR(out, "number of failed transactions: 0", "none failed");
	if (test__verbose())
		printf("%s", out);
}

void test_pg_extended(void)
{
	static char out[16384], err[16384];
	struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.3", "md5", "enforce", EXT_RULES), "gate"))
		goto out;
	if (test__start_subtest("pipeline_blocked_parse"))
		subtest_pipeline(&g);
	if (test__start_subtest("named_statement_many_executes"))
		subtest_named_many(&g);
	if (test__start_subtest("blocked_in_transaction_block"))
		subtest_txn(&g);
	if (test__start_subtest("function_call_refused"))
		subtest_function_call(&g);
	if (test__start_subtest("pipeline_100k_parses"))
		subtest_many_parses(&g);
	/* pgbench's tables, made directly. */
	if (pgbench(&g, NULL, "-i -q -s 1", out, sizeof(out), err, sizeof(err)))
		printf("pgbench -i: %s\n", err);
	if (test__start_subtest("pgbench_extended_select"))
		subtest_pgbench(&g, "extended", true);
	if (test__start_subtest("pgbench_prepared_select"))
		subtest_pgbench(&g, "prepared", true);
	if (test__start_subtest("pgbench_prepared_tpcb"))
		subtest_pgbench(&g, "prepared", false);
	if (test__start_subtest("pgbench_simple_tpcb"))
		subtest_pgbench(&g, "simple", false);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}
