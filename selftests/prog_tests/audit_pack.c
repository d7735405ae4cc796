// SPDX-License-Identifier: GPL-2.0
/*
 * The hand-written encoder of Statement and Result records (userspace/audit_pack.c) writes
 * byte for byte what protobuf-c's packer writes, for every field set and unset, at its zero
 * value, long enough for multi-byte lengths, negative numbers, empty and NULL bytes, and
 * repeated rows; and the bytes read back as the same record. Other kinds go to protobuf-c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "audit_pack.h"
#include "../test_progs.h"

/* ours equals protobuf-c's, and protobuf-c reads it back (what verify/replay/export do) */
static bool same_as_protobuf_c(const Agentgate__Audit__Record *r, const char *what)
{
	size_t want = agentgate__audit__record__get_packed_size(r), got = ag_audit_record_size(r);
	uint8_t *a = malloc(want + 1), *b = malloc(got + 1);
	Agentgate__Audit__Record *back;
	bool ok = false;

	if (!a || !b)
		goto out;
	agentgate__audit__record__pack(r, a);
	if (!ASSERT_EQ(got, want, what) || !ASSERT_EQ(ag_audit_record_pack(r, b), got, what))
		goto out;
	if (!ASSERT_OK(memcmp(a, b, got), what))
		goto out;
	/* read back and written again: the same bytes */
	back = agentgate__audit__record__unpack(NULL, got, b);
	ok = ASSERT_OK_PTR(back, what) &&
	     ASSERT_EQ(agentgate__audit__record__get_packed_size(back), got, what);
	if (ok) {
		agentgate__audit__record__pack(back, a);
		ok = ASSERT_OK(memcmp(a, b, got), what);
	}
	if (back)
		agentgate__audit__record__free_unpacked(back, NULL);
out:
	free(a);
	free(b);
	return ok;
}

static void subtest_statement(void)
{
	static char big[70000];
	const char *texts[] = { "", "SELECT 1", big };
	Agentgate__Audit__Statement st = AGENTGATE__AUDIT__STATEMENT__INIT;
	Agentgate__Audit__Record r = AGENTGATE__AUDIT__RECORD__INIT;
	char what[64];

	memset(big, 'x', sizeof(big) - 1);
	r.kind = AGENTGATE__AUDIT__KIND__STATEMENT;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_STATEMENT;
	r.statement = &st;
	ASSERT_TRUE(same_as_protobuf_c(&r, "all empty"), "all empty");
	for (int mask = 0; mask < 1 << 9; mask++) {
		st.message = mask & 1 ? "query" : "";
		st.text = (char *)texts[(mask >> 1) % 3];
		st.text_truncated = mask & 4;
		st.decision = mask & 8 ? "allow" : NULL;
		st.rule = mask & 16 ? "pgbench" : "";
		st.classes = mask & 32 ? "select,write" : "";
		st.reason = mask & 64 ? "agentgate: blocked by rule x" : "";
		st.name = mask & 128 ? "p1" : "";
		st.host = mask & 256 ? "db.example" : "";
		r.time_ns = mask & 2 ? -1 : 1763800000123456789ll;
		r.session = mask & 4 ? 0 : (uint64_t)mask << 40;
		snprintf(what, sizeof(what), "statement fields %#x", mask);
		if (!same_as_protobuf_c(&r, what))
			break;
	}
}

static void subtest_result(void)
{
	static uint8_t row[300], desc[40];
	ProtobufCBinaryData rows[3] = { { sizeof(row), row }, { 0, row }, { 5, row } };
	Agentgate__Audit__Result res = AGENTGATE__AUDIT__RESULT__INIT;
	Agentgate__Audit__Record r = AGENTGATE__AUDIT__RECORD__INIT;
	char what[64];

	r.kind = AGENTGATE__AUDIT__KIND__RESULT;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_RESULT;
	r.result = &res;
	ASSERT_TRUE(same_as_protobuf_c(&r, "all empty"), "all empty");
	for (int mask = 0; mask < 1 << 15; mask += 1 + (mask & 7)) {
		res.command_tag = mask & 1 ? "SELECT 1" : "";
		res.rows = mask & 2 ? 300 : 0;
		res.masked_values = mask & 4 ? 1ull << 63 : 0;
		res.row_description.data = mask & 8 ? desc : NULL;
		/* set but empty too */
		res.row_description.len = (mask & 8) && (mask & 16) ? sizeof(desc) : 0;
		res.n_data_rows = (mask >> 5) % 4;
		res.data_rows = res.n_data_rows ? rows : NULL;
		res.rows_capped = mask & 128;
		res.sqlstate = mask & 256 ? "42501" : "";
		res.elapsed_ns = mask & 512 ? -5 : mask;
		res.message = mask & 1024 ? "execute" : "";
		res.name = mask & 2048 ? "portal" : "";
		res.http_status = mask & 4096 ? 200 : 0;
		res.body.data = mask & 8192 ? row : NULL;
		res.body.len = mask & 8192 ? 17 : 0;
		res.body_capped = mask & 16384;
		res.body_bytes = mask & 16384 ? 123456789 : 0;
		res.body_sha256.data = mask & 2 ? desc : NULL;
		res.body_sha256.len = mask & 2 ? 32 : 0;
		r.time_ns = mask;
		r.session = mask * 7919ull;
		snprintf(what, sizeof(what), "result fields %#x", mask);
		if (!same_as_protobuf_c(&r, what))
			break;
	}
}

/* Other kinds (and a body case without its body) are protobuf-c's own packing. */
static void subtest_other_kinds(void)
{
	Agentgate__Audit__SessionEnd e = AGENTGATE__AUDIT__SESSION_END__INIT;
	Agentgate__Audit__Record r = AGENTGATE__AUDIT__RECORD__INIT;

	e.state = "closed";
	e.statements = 3;
	r.kind = AGENTGATE__AUDIT__KIND__SESSION_END;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_SESSION_END;
	r.session_end = &e;
	ASSERT_TRUE(same_as_protobuf_c(&r, "session end"), "session end");
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_STATEMENT;
	r.statement = NULL;
	ASSERT_TRUE(same_as_protobuf_c(&r, "statement case, no body"), "no body");
}

/*
 * The hand packer writes the fields it knows: a field added to audit.proto's Record (outside
 * its body), Statement or Result must be added to audit_pack.c too, or it would silently be
 * left out of every statement record. This fails until it is.
 */
static void subtest_knows_every_field(void)
{
	static const struct {
		const ProtobufCMessageDescriptor *d;
		unsigned int last; /* fields 1..last, each written by audit_pack.c */
		unsigned int body; /* then this many oneof body fields (Record) */
	} known[] = {
		{ &agentgate__audit__statement__descriptor, 9, 0 },
		{ &agentgate__audit__result__descriptor, 15, 0 },
		{ &agentgate__audit__record__descriptor, 3, 9 },
	};

	for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++) {
		const ProtobufCMessageDescriptor *d = known[k].d;

		if (!ASSERT_EQ(d->n_fields, known[k].last + known[k].body, d->name))
			continue;
		for (unsigned int i = 0; i < known[k].last; i++)
			ASSERT_EQ(d->fields[i].id, i + 1, d->fields[i].name);
		for (unsigned int i = known[k].last; i < d->n_fields; i++)
			ASSERT_NEQ(d->fields[i].flags & PROTOBUF_C_FIELD_FLAG_ONEOF, 0,
				   d->fields[i].name);
	}
}

void test_audit_pack(void)
{
	if (test__start_subtest("statement_as_protobuf_c"))
		subtest_statement();
	if (test__start_subtest("result_as_protobuf_c"))
		subtest_result();
	if (test__start_subtest("other_kinds_protobuf_c"))
		subtest_other_kinds();
	if (test__start_subtest("knows_every_field_of_audit_proto"))
		subtest_knows_every_field();
}
