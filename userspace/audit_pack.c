// SPDX-License-Identifier: GPL-2.0
/*
 * A hand-written protobuf encoder for the records on the statement path (audit_pack.h). Every
 * statement through the gateway enqueues one or two records from a worker thread, and
 * protobuf-c's generic packer (a descriptor walk per field, once to size and once to write,
 * and again for the body) was most of that cost. The wire format written here is protobuf's:
 * a field is its tag (number << 3 | wire type) then a varint or a length and bytes; proto3
 * fields at their zero value are not written, exactly as protobuf-c decides it (a string that
 * is NULL or empty, bytes of length 0, a number or bool that is 0), so the bytes are
 * protobuf-c's own (selftests/prog_tests/audit_pack.c compares them) and any reader reads them.
 */
#include <stdbool.h>
#include <string.h>

#include "audit_pack.h"

enum { WT_VARINT = 0, WT_LEN = 2 };

/*
 * Each field twice: its size (s_*), and its bytes at p (w_*, returning the end). Field numbers
 * here are all under 16, so a tag is one byte.
 */
static size_t varint_size(uint64_t v)
{
	size_t n = 1;

	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

static uint8_t *varint(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)v | 0x80;
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

/* uint64, int64 (two's complement, as protobuf-c), uint32, enum, bool (as 0/1) */
static size_t s_num(uint64_t v)
{
	return v ? 1 + varint_size(v) : 0;
}

static uint8_t *w_num(uint8_t *p, unsigned int field, uint64_t v)
{
	if (!v)
		return p;
	*p++ = field << 3 | WT_VARINT;
	return varint(p, v);
}

static size_t s_len(size_t n)
{
	return 1 + varint_size(n) + n;
}

static uint8_t *w_len(uint8_t *p, unsigned int field, const void *d, size_t n)
{
	*p++ = field << 3 | WT_LEN;
	p = varint(p, n);
	memcpy(p, d, n);
	return p + n;
}

static size_t s_str(const char *s)
{
	return s && *s ? s_len(strlen(s)) : 0;
}

static uint8_t *w_str(uint8_t *p, unsigned int field, const char *s)
{
	return s && *s ? w_len(p, field, s, strlen(s)) : p;
}

static size_t s_bytes(const ProtobufCBinaryData *b)
{
	return b->data && b->len ? s_len(b->len) : 0;
}

static uint8_t *w_bytes(uint8_t *p, unsigned int field, const ProtobufCBinaryData *b)
{
	return b->data && b->len ? w_len(p, field, b->data, b->len) : p;
}

static size_t s_statement(const Agentgate__Audit__Statement *s)
{
	return s_str(s->message) + s_str(s->text) + s_num(!!s->text_truncated) +
	       s_str(s->decision) + s_str(s->rule) + s_str(s->classes) + s_str(s->reason) +
	       s_str(s->name) + s_str(s->host);
}

static uint8_t *w_statement(uint8_t *p, const Agentgate__Audit__Statement *s)
{
	p = w_str(p, 1, s->message);
	p = w_str(p, 2, s->text);
	p = w_num(p, 3, !!s->text_truncated);
	p = w_str(p, 4, s->decision);
	p = w_str(p, 5, s->rule);
	p = w_str(p, 6, s->classes);
	p = w_str(p, 7, s->reason);
	p = w_str(p, 8, s->name);
	return w_str(p, 9, s->host);
}

static size_t s_result(const Agentgate__Audit__Result *r)
{
	size_t n = s_str(r->command_tag) + s_num(r->rows) + s_num(r->masked_values) +
		   s_bytes(&r->row_description) + s_num(!!r->rows_capped) + s_str(r->sqlstate) +
		   s_num((uint64_t)r->elapsed_ns) + s_str(r->message) + s_str(r->name) +
		   s_num(r->http_status) + s_bytes(&r->body) + s_num(!!r->body_capped) +
		   s_num(r->body_bytes) + s_bytes(&r->body_sha256);

	for (size_t i = 0; i < r->n_data_rows; i++)
		n += s_len(r->data_rows[i].len);
	return n;
}

static uint8_t *w_result(uint8_t *p, const Agentgate__Audit__Result *r)
{
	p = w_str(p, 1, r->command_tag);
	p = w_num(p, 2, r->rows);
	p = w_num(p, 3, r->masked_values);
	p = w_bytes(p, 4, &r->row_description);
	for (size_t i = 0; i < r->n_data_rows; i++)
		p = w_len(p, 5, r->data_rows[i].data, r->data_rows[i].len);
	p = w_num(p, 6, !!r->rows_capped);
	p = w_str(p, 7, r->sqlstate);
	p = w_num(p, 8, (uint64_t)r->elapsed_ns);
	p = w_str(p, 9, r->message);
	p = w_str(p, 10, r->name);
	p = w_num(p, 11, r->http_status);
	p = w_bytes(p, 12, &r->body);
	p = w_num(p, 13, !!r->body_capped);
	p = w_num(p, 14, r->body_bytes);
	return w_bytes(p, 15, &r->body_sha256);
}

static bool hand_packed(const Agentgate__Audit__Record *r)
{
	return (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_STATEMENT && r->statement) ||
	       (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_RESULT && r->result);
}

static size_t s_body(const Agentgate__Audit__Record *r)
{
	if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_STATEMENT)
		return s_statement(r->statement);
	return s_result(r->result);
}

static size_t s_head(const Agentgate__Audit__Record *r)
{
	return s_num((uint64_t)r->time_ns) + s_num(r->session) + s_num((uint64_t)(int64_t)r->kind);
}

size_t ag_audit_record_size(const Agentgate__Audit__Record *r)
{
	if (!hand_packed(r))
		return agentgate__audit__record__get_packed_size(r);
	return s_head(r) + s_len(s_body(r));
}

size_t ag_audit_record_pack(const Agentgate__Audit__Record *r, uint8_t *out)
{
	uint8_t *p = out;
	size_t body;

	if (!hand_packed(r))
		return agentgate__audit__record__pack(r, out);
	body = s_body(r);
	p = w_num(p, 1, (uint64_t)r->time_ns);
	p = w_num(p, 2, r->session);
	p = w_num(p, 3, (uint64_t)(int64_t)r->kind);
	if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_STATEMENT) {
		*p++ = 14 << 3 | WT_LEN;
		p = w_statement(varint(p, body), r->statement);
	} else {
		*p++ = 15 << 3 | WT_LEN;
		p = w_result(varint(p, body), r->result);
	}
	return p - out;
}
