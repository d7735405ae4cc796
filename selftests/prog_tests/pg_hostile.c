// SPDX-License-Identifier: GPL-2.0
/*
 * Malformed and hostile PostgreSQL protocol input, from a raw client in the tagged cgroup. Each
 * case is its own subtest and must end only its own session, with a FATAL ErrorResponse that
 * says what was wrong and a line in the daemon's log; after each, the daemon still answers
 * agctl and a session opened before the whole run still runs queries.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pgwire.h"
#include "../pg.h"
#include "../test_progs.h"

#define HOSTILE_RULES                                                                              \
	"    sql:\n"                                                                               \
	"      - { name: reads, when: { command: [select] }, then: allow }\n"

static int bystander = -1;

static bool bystander_ok(void)
{
	struct ag_buf b = { 0 };
	char types[16];
	int rc;

	pg_put_query(&b, "SELECT 1");
	rc = th_send_all(bystander, ag_buf_head(&b), ag_buf_len(&b), 5000);
	ag_buf_free(&b);
	if (!rc)
		rc = th_pg_raw_collect(bystander, 1, types, sizeof(types), NULL, NULL, 0, 5000);
	return !rc && !strcmp(types, "TDCZ");
}

/*
 * Sends bytes (after a normal startup when started), half-closes when shut, and expects a FATAL
 * ErrorResponse with SQLSTATE code whose message holds what, then the end of the connection.
 */
static void hostile_skip(struct th_pg_gate *g, bool started, const void *bytes, size_t len,
			 bool shut, size_t skip, const char *code, const char *what)
{
	struct th_pg_msg m;
	bool fatal = false, closed = false;
	char log[65536];
	int fd = th_pg_connect_from(g->tagged, g->pg.addr, g->pg.port);

	if (!ASSERT_GE(fd, 0, "connect"))
		return;
	if (started &&
	    !ASSERT_OK(th_pg_raw_startup(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD), "startup"))
		goto out;
	/* The peer may close while we still send: that is fine, the answer is what counts. */
	th_send_all(fd, bytes, len, 5000);
	if (shut)
		shutdown(fd, SHUT_WR);
	/* Single-byte answers (SSLRequest's 'N') come before any message. */
	for (size_t i = 0; i < skip; i++) {
		char c;

		ASSERT_EQ(th_recv_all(fd, &c, 1, 5000), 1, "an answer byte");
		ASSERT_EQ(c, 'N', "N");
	}
	for (int i = 0; i < 20; i++) {
		int rc = th_pg_read_msg(fd, &m, 10000);

		if (rc) {
			closed = rc == -EPIPE || rc == -ECONNRESET;
			break;
		}
		if (m.type == 'E') {
			printf("got: %s %s %s\n", th_pg_err_field(&m, 'S'),
			       th_pg_err_field(&m, 'C'), th_pg_err_field(&m, 'M'));
			fatal = !strcmp(th_pg_err_field(&m, 'S'), "FATAL");
			ASSERT_STREQ(th_pg_err_field(&m, 'C'), code, "SQLSTATE");
			ASSERT_HAS_SUBSTR(th_pg_err_field(&m, 'M'), what, "the error says what");
			ASSERT_HAS_SUBSTR(th_pg_err_field(&m, 'M'),
					  "agentgate: ", "from the gateway");
		}
		th_pg_msg_free(&m);
	}
	ASSERT_TRUE(fatal, "a FATAL ErrorResponse");
	ASSERT_TRUE(closed, "then the connection ends");
	usleep(100 * 1000);
	th_daemon_read_log(&g->d, log, sizeof(log));
	ASSERT_HAS_SUBSTR(log, what, "logged");
out:
	close(fd);
	ASSERT_TRUE(th_pg_gate_alive(g), "daemon alive");
	ASSERT_TRUE(bystander_ok(), "another session still works");
}

static void hostile(struct th_pg_gate *g, bool started, const void *bytes, size_t len, bool shut,
		    const char *code, const char *what)
{
	hostile_skip(g, started, bytes, len, shut, 0, code, what);
}

static size_t msg(uint8_t *buf, char type, uint32_t len, const char *body, size_t blen)
{
	buf[0] = type;
	pg_put32(buf + 1, len);
	memcpy(buf + 5, body, blen);
	return 5 + blen;
}

void test_pg_hostile(void)
{
	static uint8_t buf[1 << 16];
	struct th_pg_gate g;
	size_t n;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.7", "md5", "enforce", HOSTILE_RULES), "gate"))
		goto out;
	bystander = th_pg_connect_from(g.tagged, g.pg.addr, g.pg.port);
	if (!ASSERT_GE(bystander, 0, "bystander") ||
	    !ASSERT_OK(th_pg_raw_startup(bystander, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD),
		       "bystander startup"))
		goto out;

	if (test__start_subtest("length_below_4")) {
		n = msg(buf, 'Q', 3, "", 0);
		hostile(&g, true, buf, n, false, "08P01", "invalid message length 3");
	}
	if (test__start_subtest("length_2gb")) {
		n = msg(buf, 'Q', 0x7fffffff, "SELECT 1", 8);
		hostile(&g, true, buf, n, false, "54000", "message too large");
	}
	if (test__start_subtest("length_over_limit")) {
		n = msg(buf, 'P', (64u << 20) + 1, "", 0);
		hostile(&g, true, buf, n, false, "54000", "message too large");
	}
	if (test__start_subtest("unknown_message_type")) {
		n = msg(buf, '~', 4, "", 0);
		hostile(&g, true, buf, n, false, "08P01", "unknown message type 0x7e");
	}
	if (test__start_subtest("password_message_after_auth")) {
		n = msg(buf, 'p', 4 + 7, "secret", 7);
		hostile(&g, true, buf, n, false, "08P01", "unknown message type 0x70");
	}
	if (test__start_subtest("truncated_message_then_eof")) {
		n = msg(buf, 'Q', 100, "SELECT", 6);
		hostile(&g, true, buf, n, true, "08P01", "truncated message");
	}
	if (test__start_subtest("message_after_terminate")) {
		n = msg(buf, 'X', 4, "", 0);
		n += msg(buf + n, 'Q', 4 + 9, "SELECT 1", 9);
		hostile(&g, true, buf, n, false, "08P01", "message after Terminate");
	}
	if (test__start_subtest("query_without_nul")) {
		n = msg(buf, 'Q', 4 + 8, "SELECT 1", 8);
		hostile(&g, true, buf, n, false, "08P01", "malformed Query message");
	}
	if (test__start_subtest("query_with_hidden_second_string")) {
		/* Only the first string would be parsed by a careless proxy; the server reads both. */
		n = msg(buf, 'Q', 4 + 28, "SELECT 1\0DELETE FROM orders", 28);
		hostile(&g, true, buf, n, false, "08P01", "malformed Query message");
	}
	if (test__start_subtest("parse_without_nul")) {
		n = msg(buf, 'P', 4 + 9, "\0SELECT 1", 9);
		hostile(&g, true, buf, n, false, "08P01", "malformed P message");
	}
	if (test__start_subtest("describe_bad_kind")) {
		n = msg(buf, 'D', 4 + 2, "Z", 2);
		hostile(&g, true, buf, n, false, "08P01", "malformed D message");
	}
	if (test__start_subtest("garbage_startup")) {
		static const char http[] = "GET / HTTP/1.1\r\nHost: db\r\n\r\n";

		hostile(&g, false, http, sizeof(http) - 1, false, "08P01",
			"invalid length of startup packet");
	}
	if (test__start_subtest("startup_too_short")) {
		uint8_t p[8];

		pg_put32(p, 4);
		pg_put32(p + 4, PG_PROTO_V3);
		hostile(&g, false, p, 8, false, "08P01", "invalid length of startup packet");
	}
	if (test__start_subtest("startup_wrong_protocol_version")) {
		uint8_t p[] = { 0,   0, 0,   22,  0,   2,   0,	 0, 'u', 's', 'e',
				'r', 0, 'a', 'g', 'e', 'n', 't', 0, 0,	 0,   0 };

		hostile(&g, false, p, sizeof(p), false, "0A000",
			"unsupported frontend protocol 2.0");
	}
	if (test__start_subtest("startup_unterminated_parameters")) {
		uint8_t p[] = {
			0, 0, 0, 17, 0, 3, 0, 0, 'u', 's', 'e', 'r', 0, 'a', 'g', 'e', 'n'
		};

		hostile(&g, false, p, sizeof(p), false, "08P01", "invalid startup packet layout");
	}
	if (test__start_subtest("startup_without_user")) {
		uint8_t p[] = { 0, 0, 0, 9, 0, 3, 0, 0, 0 };

		hostile(&g, false, p, sizeof(p), false, "28000", "no PostgreSQL user name");
	}
	if (test__start_subtest("ssl_request_flood")) {
		uint8_t p[24];

		for (int i = 0; i < 3; i++) {
			pg_put32(p + 8 * i, 8);
			pg_put32(p + 8 * i + 4, PG_SSL_REQUEST);
		}
		hostile_skip(&g, false, p, sizeof(p), false, 2, "08P01", "invalid SSL request");
	}
	if (test__start_subtest("cancel_request_bad_length")) {
		uint8_t p[12];

		pg_put32(p, 12);
		pg_put32(p + 4, PG_CANCEL_REQUEST);
		pg_put32(p + 8, 1);
		hostile(&g, false, p, sizeof(p), false, "08P01",
			"invalid length of cancel request");
	}
	if (test__start_subtest("replication_startup_refused")) {
		uint8_t p[64];
		size_t k = 8;

		memcpy(p + k, "user\0agent\0replication\0true", 28);
		k += 28;
		p[k++] = 0;
		pg_put32(p, k);
		pg_put32(p + 4, PG_PROTO_V3);
		hostile(&g, false, p, k, false, "42501", "replication connections are not allowed");
	}
	if (test__start_subtest("named_parse_flood")) {
		/* 20000 distinct prepared statements in one pipeline: refused past the cap, the
		 * session survives and its memory stays bounded. */
		struct ag_buf b = { 0 };
		char name[32], types[8], state[8];
		int fd = th_pg_connect_from(g.tagged, g.pg.addr, g.pg.port), ok = 0;
		struct th_pg_msg m;

		if (ASSERT_GE(fd, 0, "connect") &&
		    ASSERT_OK(th_pg_raw_startup(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD),
			      "start")) {
			for (int i = 0; i < 20000; i++) {
				snprintf(name, sizeof(name), "s%d", i);
				pg_put_parse(&b, name, "SELECT 1");
			}
			{
				struct pg_wr w;

				pg_wr_begin(&w, &b, 'S');
				pg_wr_end(&w);
			}
			ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 20000), "send");
			ag_buf_free(&b);
			state[0] = '\0';
			while (!th_pg_read_msg(fd, &m, 20000)) {
				ok += m.type == '1';
				if (m.type == 'E')
					snprintf(state, sizeof(state), "%s",
						 th_pg_err_field(&m, 'C'));
				th_pg_msg_free(&m);
				if (m.type == 'Z')
					break;
			}
			ASSERT_EQ(ok, 16384, "up to the cap");
			ASSERT_STREQ(state, "54000", "then refused");
			pg_put_query(&b, "SELECT 1");
			th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000);
			ag_buf_free(&b);
			ASSERT_OK(
				th_pg_raw_collect(fd, 1, types, sizeof(types), NULL, NULL, 0, 5000),
				"session usable");
		}
		if (fd >= 0)
			close(fd);
		ASSERT_TRUE(bystander_ok(), "another session still works");
	}
out:
	test__end_subtest();
	if (bystander >= 0)
		close(bystander);
	bystander = -1;
	th_pg_gate_cleanup(&g);
}
