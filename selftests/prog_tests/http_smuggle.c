// SPDX-License-Identifier: GPL-2.0
/*
 * Request smuggling and malformed input: each case is answered 400 and the connection closed,
 * nothing of it reaches the server (its request log never shows the smuggled path), and
 * afterwards the daemon answers a fresh connection and a session opened before the case still
 * works.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../http.h"
#include "../test_progs.h"

#define SMUGGLE_RULES                                                                              \
	"    http:\n"                                                                              \
	"      - { name: all, when: { method: [GET, POST, PUT, HEAD] }, then: allow }\n"

static char out[65536], logbuf[1 << 20];

/* The keep-alive session opened first, asked again after every case. */
static int bystander = -1;

static bool bystander_ok(struct th_http_gate *g)
{
	static const char req[] = "GET /echo/bystander HTTP/1.1\r\nHost: x\r\n\r\n";
	char resp[4096];
	bool closed;

	if (bystander < 0)
		bystander = th_http_connect(g);
	if (bystander < 0 || th_send_all(bystander, req, sizeof(req) - 1, 5000))
		return false;
	th_http_read_until(bystander, resp, sizeof(resp), "\"body_len\"", 15000, &closed);
	return strstr(resp, "HTTP/1.1 200") && strstr(resp, "/echo/bystander");
}

static void expect_400(struct th_http_gate *g, const char *req, size_t len, const char *why)
{
	bool closed = false;

	th_http_raw(g, req, len, out, sizeof(out), 15000, &closed);
	if (!ASSERT_TRUE(!strncmp(out, "HTTP/1.1 400", 12), "answered 400"))
		printf("got: %.300s\n", out);
	if (why)
		ASSERT_HAS_SUBSTR(out, why, "the reason named");
	ASSERT_HAS_SUBSTR(out, "Connection: close", "says it closes");
	ASSERT_TRUE(closed, "connection closed");
	ASSERT_OK(th_http_srvlog(g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "smuggled"), "nothing smuggled reached the server");
	ASSERT_TRUE(th_http_alive(g), "daemon alive, a new connection answered");
	ASSERT_TRUE(bystander_ok(g), "a session opened before still works");
}

#define CASE(g, lit, why) expect_400((g), (lit), sizeof(lit) - 1, (why))

void test_http_smuggle(void)
{
	struct th_http_gate g;
	char *big;

	if (!ASSERT_OK(th_http_gate_start(&g, "127.0.0.62", false, NULL, SMUGGLE_RULES), "gate"))
		goto out;
	if (!ASSERT_TRUE(bystander_ok(&g), "bystander session"))
		goto out;
	if (test__start_subtest("content_length_and_transfer_encoding"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\n"
		     "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: "
		     "x\r\n\r\n",
		     NULL);
	if (test__start_subtest("transfer_encoding_and_content_length"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
		     "Content-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
		     NULL);
	if (test__start_subtest("duplicate_content_length"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: "
		     "35\r\n\r\n"
		     "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
		     NULL);
	if (test__start_subtest("invalid_content_length"))
		CASE(&g, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5a\r\n\r\nhello", NULL);
	if (test__start_subtest("negative_content_length"))
		CASE(&g, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhello", NULL);
	if (test__start_subtest("content_length_list"))
		CASE(&g, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
		     NULL);
	if (test__start_subtest("transfer_encoding_not_chunked_last"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, "
		     "identity\r\n\r\n"
		     "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
		     NULL);
	if (test__start_subtest("transfer_encoding_gzip"))
		CASE(&g, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxx",
		     NULL);
	if (test__start_subtest("transfer_encoding_obfuscated"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
		     "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
		     NULL);
	if (test__start_subtest("space_before_colon"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n"
		     "Content-Length: 35\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
		     NULL);
	if (test__start_subtest("duplicate_transfer_encoding"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
		     "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		     "duplicate Transfer-Encoding");
	if (test__start_subtest("obsolete_line_folding"))
		CASE(&g, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
		     "obsolete line folding");
	if (test__start_subtest("folded_transfer_encoding"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n"
		     "Content-Length: 35\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
		     "obsolete line folding");
	if (test__start_subtest("oversize_header_line")) {
		size_t n = 9000;

		big = malloc(n + 100);
		if (ASSERT_OK_PTR(big, "malloc")) {
			int k = snprintf(big, 100, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ");

			memset(big + k, 'a', n);
			memcpy(big + k + n, "\r\n\r\n", 4);
			expect_400(&g, big, k + n + 4, "header line over 8 KiB");
			free(big);
		}
	}
	if (test__start_subtest("oversize_header_block")) {
		size_t lines = 80, off;

		big = malloc(lines * 1100 + 100);
		if (ASSERT_OK_PTR(big, "malloc")) {
			off = snprintf(big, 100, "GET /echo HTTP/1.1\r\nHost: x\r\n");
			for (size_t i = 0; i < lines; i++) {
				off += snprintf(big + off, 20, "X-H%zu: ", i);
				memset(big + off, 'b', 1000);
				off += 1000;
				memcpy(big + off, "\r\n", 2);
				off += 2;
			}
			memcpy(big + off, "\r\n", 2);
			expect_400(&g, big, off + 2, "header block over 64 KiB");
			free(big);
		}
	}
	if (test__start_subtest("bad_chunk_size"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
		     "zz\r\nhello\r\n0\r\n\r\n",
		     NULL);
	if (test__start_subtest("huge_chunk_size"))
		CASE(&g,
		     "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
		     "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
		     NULL);
	if (test__start_subtest("invalid_method"))
		CASE(&g, "G@T /echo HTTP/1.1\r\nHost: x\r\n\r\n", NULL);
	if (test__start_subtest("invalid_version"))
		CASE(&g, "GET /echo HTTP/1.7\r\nHost: x\r\n\r\n", NULL);
	if (test__start_subtest("http2_version_in_http1"))
		CASE(&g, "GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", NULL);
	if (test__start_subtest("nul_in_header_value"))
		CASE(&g, "GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n", "NUL byte");
	if (test__start_subtest("bare_cr_in_header_value"))
		CASE(&g,
		     "GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n",
		     "CR without LF");
	if (test__start_subtest("bare_lf_line_ending"))
		CASE(&g, "GET /echo HTTP/1.1\nHost: x\nX-A: a\n\n", "bare LF");
	if (test__start_subtest("control_char_in_header"))
		CASE(&g,
		     "GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x01"
		     "b\r\n\r\n",
		     "control");
	if (test__start_subtest("absolute_form_other_host"))
		CASE(&g, "GET http://evil.example/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
		     "another host");
	if (test__start_subtest("missing_host"))
		CASE(&g, "GET /echo HTTP/1.1\r\nUser-Agent: t\r\n\r\n", "without Host");
	if (test__start_subtest("duplicate_host"))
		CASE(&g, "GET /echo HTTP/1.1\r\nHost: x\r\nHost: evil\r\n\r\n", "duplicate Host");
	if (test__start_subtest("transfer_encoding_in_http10"))
		CASE(&g, "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		     NULL);
	if (test__start_subtest("dot_segment_path"))
		CASE(&g, "GET /echo/../smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "dot segment");
	if (test__start_subtest("encoded_dot_segment_path"))
		CASE(&g, "GET /echo/%2e%2E/smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "dot segment");
	if (test__start_subtest("encoded_slash_in_path"))
		CASE(&g, "GET /echo%2fsmuggled HTTP/1.1\r\nHost: x\r\n\r\n", "encoded '/'");
	if (test__start_subtest("double_slash_in_path"))
		CASE(&g, "GET //smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "empty segment");
	if (test__start_subtest("bad_percent_encoding"))
		CASE(&g, "GET /smuggled%zz HTTP/1.1\r\nHost: x\r\n\r\n", "percent-encoding");
	if (test__start_subtest("absolute_form_same_host_allowed")) {
		static const char req[] = "GET http://x/echo/abs HTTP/1.1\r\nHost: x\r\n"
					  "Connection: close\r\n\r\n";
		bool closed;

		th_http_raw(&g, req, sizeof(req) - 1, out, sizeof(out), 15000, &closed);
		ASSERT_TRUE(!strncmp(out, "HTTP/1.1 200", 12), "answered");
		ASSERT_HAS_SUBSTR(out, "\"path\": \"/echo/abs\"", "sent on in origin-form");
	}
	ASSERT_OK(th_http_srvlog(&g, logbuf, sizeof(logbuf)), "server log");
	ASSERT_FALSE(strstr(logbuf, "smuggled"), "nothing smuggled at the end");
out:
	if (bystander >= 0)
		close(bystander);
	bystander = -1;
	th_http_gate_cleanup(&g);
}
