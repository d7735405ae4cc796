// SPDX-License-Identifier: GPL-2.0
/*
 * Startup and authentication through the gateway, relayed as the server asks: trust, password,
 * md5 and scram-sha-256, with the right password and a wrong one; SSLRequest and GSSENCRequest
 * answered 'N' (psql sslmode=prefer goes on in clear, sslmode=require fails cleanly); and
 * CancelRequest on its own connection: psycopg2's cancel of a long query, a raw cancel with the
 * right key, and keys that must not work (unknown, or another agent's).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pgwire.h"
#include "../pg.h"
#include "../test_progs.h"

#define AUTH_RULES                                                                                 \
	"    sql:\n"                                                                               \
	"      - { name: reads, when: { command: [select, set, show, begin, commit, rollback] },"  \
	" then: allow }\n"

static char out[16384], err[16384];

static int psql_conn(struct th_pg_gate *g, const char *rel, const char *extra, const char *sql)
{
	char conn[512];
	char *argv[] = { "/usr/bin/psql", "-X", "-A", "-t", "-d", conn, "-c", (char *)sql, NULL };

	th_pg_conninfo(&g->pg, conn, sizeof(conn), extra);
	return th_pg_exec(rel, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
}

static void subtest_method(struct th_pg_gate *g, const char *method)
{
	int rc;

	if (!ASSERT_OK(th_pg_set_auth(&g->pg, method), "pg_hba"))
		return;
	rc = psql_conn(g, g->tagged, NULL, "SELECT current_user, 'ok'");
	if (!ASSERT_EQ(rc, 0, "psql through the gateway"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "agent|ok\n", "authenticated as the agent role");
	rc = psql_conn(g, g->tagged, "password=wrong", "SELECT 1");
	if (!strcmp(method, "trust")) {
		ASSERT_EQ(rc, 0, "trust needs no password");
	} else {
		ASSERT_NEQ(rc, 0, "a wrong password fails");
		ASSERT_HAS_SUBSTR(err, "password authentication failed", "the server's own error");
	}
	/* psycopg2 as well (libpq underneath, but its own startup path). */
	rc = th_pg_python(&g->pg, g->tagged,
			  "import psycopg2\n"
			  "c = psycopg2.connect('')\n"
			  "cur = c.cursor()\n"
			  "cur.execute('SELECT current_user')\n"
			  "print(cur.fetchone()[0])\n",
			  out, sizeof(out), err, sizeof(err), 30000);
	if (!ASSERT_EQ(rc, 0, "psycopg2"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "agent\n", "psycopg2 authenticated");
}

static void subtest_ssl(struct th_pg_gate *g)
{
	int rc;

	th_pg_set_auth(&g->pg, "scram-sha-256");
	rc = psql_conn(g, g->tagged, "sslmode=prefer", "SELECT 'clear'");
	if (!ASSERT_EQ(rc, 0, "sslmode=prefer"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "clear\n", "went on without TLS");
	rc = psql_conn(g, g->tagged, "sslmode=require", "SELECT 1");
	ASSERT_NEQ(rc, 0, "sslmode=require fails");
	ASSERT_HAS_SUBSTR(err, "server does not support SSL", "and says why");
}

static void subtest_gssenc(struct th_pg_gate *g)
{
	uint8_t req[8], ans;
	char types[16];
	int fd;

	th_pg_set_auth(&g->pg, "md5");
	fd = th_pg_connect_from(g->tagged, g->pg.addr, g->pg.port);
	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	pg_put32(req, 8);
	pg_put32(req + 4, PG_GSSENC_REQUEST);
	ASSERT_OK(th_send_all(fd, req, 8, 5000), "GSSENCRequest");
	ASSERT_EQ(th_recv_all(fd, &ans, 1, 5000), 1, "an answer");
	ASSERT_EQ(ans, 'N', "N");
	pg_put32(req + 4, PG_SSL_REQUEST);
	ASSERT_OK(th_send_all(fd, req, 8, 5000), "then SSLRequest");
	ASSERT_EQ(th_recv_all(fd, &ans, 1, 5000), 1, "an answer");
	ASSERT_EQ(ans, 'N', "N");
	ASSERT_OK(th_pg_raw_startup(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD), "then startup");
	{
		struct ag_buf b = { 0 };

		pg_put_query(&b, "SELECT 1");
		th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
		ag_buf_free(&b);
		ASSERT_OK(th_pg_raw_collect(fd, 1, types, sizeof(types), NULL, NULL, 0, 5000),
			  "query");
		ASSERT_STREQ(types, "TDCZ", "answered");
	}
	close(fd);
}

void test_pg_auth(void)
{
	struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.4", "trust", "enforce", AUTH_RULES), "gate"))
		goto out;
	if (test__start_subtest("trust"))
		subtest_method(&g, "trust");
	if (test__start_subtest("password"))
		subtest_method(&g, "password");
	if (test__start_subtest("md5"))
		subtest_method(&g, "md5");
	if (test__start_subtest("scram_sha_256"))
		subtest_method(&g, "scram-sha-256");
	if (test__start_subtest("sslrequest_answered_n"))
		subtest_ssl(&g);
	if (test__start_subtest("gssencrequest_answered_n"))
		subtest_gssenc(&g);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}

/* --- cancel -------------------------------------------------------------------------------- */

static const char py_cancel[] = "import psycopg2, threading, time\n"
				"c = psycopg2.connect('')\n"
				"cur = c.cursor()\n"
				"def cancel():\n"
				"    time.sleep(1)\n"
				"    c.cancel()\n"
				"threading.Thread(target=cancel).start()\n"
				"t0 = time.time()\n"
				"try:\n"
				"    cur.execute('SELECT pg_sleep(30)')\n"
				"    print('not cancelled')\n"
				"except psycopg2.Error as e:\n"
				"    print('code', e.pgcode)\n"
				"print('elapsed %.1f' % (time.time() - t0))\n"
				"c.rollback()\n"
				"cur.execute('SELECT 7')\n"
				"print('after', cur.fetchone()[0])\n";

static void subtest_psycopg2(struct th_pg_gate *g)
{
	double elapsed = 99;
	const char *e;
	int rc = th_pg_python(&g->pg, g->tagged, py_cancel, out, sizeof(out), err, sizeof(err),
			      60000);

	if (!ASSERT_EQ(rc, 0, "python"))
		printf("stderr: %s\n", err);
	printf("%s", out);
	ASSERT_HAS_SUBSTR(out, "code 57014", "the query was cancelled");
	e = strstr(out, "elapsed ");
	if (e)
		elapsed = atof(e + 8);
	ASSERT_LT(elapsed, 10, "quickly");
	ASSERT_HAS_SUBSTR(out, "after 7", "the session goes on");
}

static void send_cancel(struct th_pg_gate *g, const char *rel, uint32_t pid, uint32_t key,
			bool *closed)
{
	uint8_t pkt[16], c;
	int fd = th_pg_connect_from(rel, g->pg.addr, g->pg.port);

	*closed = false;
	if (!ASSERT_GE(fd, 0, "cancel connection"))
		return;
	pg_put32(pkt, 16);
	pg_put32(pkt + 4, PG_CANCEL_REQUEST);
	pg_put32(pkt + 8, pid);
	pg_put32(pkt + 12, key);
	ASSERT_OK(th_send_all(fd, pkt, 16, 5000), "CancelRequest");
	/* Neither the server nor the gateway answers a CancelRequest: they close. */
	*closed = th_recv_all(fd, &c, 1, 5000) == 0;
	close(fd);
}

/* Starts `SELECT pg_sleep(secs)` on a raw connection from the tagged cgroup. */
static int sleeper(struct th_pg_gate *g, uint32_t *pid, uint32_t *key, int secs)
{
	struct ag_buf b = { 0 };
	char sql[64];
	int fd = th_pg_connect_from(g->tagged, g->pg.addr, g->pg.port);

	if (fd < 0)
		return fd;
	if (th_pg_raw_startup_key(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD, pid, key)) {
		close(fd);
		return -EACCES;
	}
	snprintf(sql, sizeof(sql), "SELECT pg_sleep(%d)", secs);
	pg_put_query(&b, sql);
	th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
	ag_buf_free(&b);
	return fd;
}

static void subtest_raw(struct th_pg_gate *g)
{
	char types[16], state[8];
	uint32_t pid = 0, key = 0;
	struct timespec t0, t1;
	bool closed;
	int fd;

	/* Keys that must not work: a made-up one, and the right one from another agent. */
	fd = sleeper(g, &pid, &key, 3);
	if (!ASSERT_GE(fd, 0, "sleeper"))
		return;
	usleep(200 * 1000);
	send_cancel(g, g->tagged, pid, key ^ 0x5a5a5a5a, &closed);
	ASSERT_TRUE(closed, "a wrong key: closed");
	send_cancel(g, g->tagged2, pid, key, &closed);
	ASSERT_TRUE(closed, "another agent's cancel: closed");
	ASSERT_OK(th_pg_raw_collect(fd, 1, types, sizeof(types), state, NULL, 0, 10000),
		  "sleep ends");
	ASSERT_STREQ(state, "", "not cancelled by either");
	close(fd);

	/* The right key from the same agent cancels. */
	fd = sleeper(g, &pid, &key, 30);
	if (!ASSERT_GE(fd, 0, "sleeper"))
		return;
	usleep(300 * 1000);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	send_cancel(g, g->tagged, pid, key, &closed);
	ASSERT_OK(th_pg_raw_collect(fd, 1, types, sizeof(types), state, NULL, 0, 10000), "answer");
	clock_gettime(CLOCK_MONOTONIC, &t1);
	ASSERT_STREQ(state, "57014", "cancelled");
	ASSERT_LT(t1.tv_sec - t0.tv_sec, 5, "at once");
	close(fd);
}

void test_pg_cancel(void)
{
	struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.5", "md5", "enforce", AUTH_RULES), "gate"))
		goto out;
	if (test__start_subtest("psycopg2_cancel_long_query"))
		subtest_psycopg2(&g);
	if (test__start_subtest("raw_cancel_keys"))
		subtest_raw(&g);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}
