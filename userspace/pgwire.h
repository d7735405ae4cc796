/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The PostgreSQL v3 wire format: big-endian integers, a bounds-checked reader for message
 * bodies, a writer that builds messages into an ag_buf and fills in their length, and the
 * messages the gateway writes itself (ErrorResponse, ReadyForQuery, Query, Parse, Describe).
 * Shared by the protocol handler, the masking of rows and the selftests' raw client.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "buf.h"

/* Startup packet codes (the int32 after the length; no type byte). */
#define PG_PROTO_V3 0x00030000u
#define PG_CANCEL_REQUEST 80877102u
#define PG_SSL_REQUEST 80877103u
#define PG_GSSENC_REQUEST 80877104u
/* The server's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH). */
#define PG_STARTUP_MAX 10000u
/* Header of a typed message: type byte and int32 length (which counts itself). */
#define PG_HDR 5

/* Frontend (agent) message types. */
#define PG_F_BIND 'B'
#define PG_F_CLOSE 'C'
#define PG_F_COPY_DATA 'd'
#define PG_F_COPY_DONE 'c'
#define PG_F_COPY_FAIL 'f'
#define PG_F_DESCRIBE 'D'
#define PG_F_EXECUTE 'E'
#define PG_F_FLUSH 'H'
#define PG_F_FUNCTION_CALL 'F'
#define PG_F_PARSE 'P'
#define PG_F_PASSWORD 'p' /* also SASLInitialResponse, SASLResponse, GSSResponse */
#define PG_F_QUERY 'Q'
#define PG_F_SYNC 'S'
#define PG_F_TERMINATE 'X'

/* Backend (server) message types. */
#define PG_B_AUTH 'R'
#define PG_B_BACKEND_KEY 'K'
#define PG_B_BIND_COMPLETE '2'
#define PG_B_CLOSE_COMPLETE '3'
#define PG_B_COMMAND_COMPLETE 'C'
#define PG_B_COPY_BOTH 'W'
#define PG_B_COPY_DATA 'd'
#define PG_B_COPY_DONE 'c'
#define PG_B_COPY_IN 'G'
#define PG_B_COPY_OUT 'H'
#define PG_B_DATA_ROW 'D'
#define PG_B_EMPTY_QUERY 'I'
#define PG_B_ERROR 'E'
#define PG_B_FUNCTION_RESULT 'V'
#define PG_B_NEGOTIATE_VERSION 'v'
#define PG_B_NO_DATA 'n'
#define PG_B_NOTICE 'N'
#define PG_B_NOTIFICATION 'A'
#define PG_B_PARAM_DESC 't'
#define PG_B_PARAM_STATUS 'S'
#define PG_B_PARSE_COMPLETE '1'
#define PG_B_PORTAL_SUSPENDED 's'
#define PG_B_READY 'Z'
#define PG_B_ROW_DESC 'T'

/* SQLSTATEs the gateway reports. */
#define PG_SQLSTATE_INSUFFICIENT_PRIVILEGE "42501"
#define PG_SQLSTATE_SYNTAX_ERROR "42601"
#define PG_SQLSTATE_PROTOCOL_VIOLATION "08P01"
#define PG_SQLSTATE_FEATURE_NOT_SUPPORTED "0A000"
#define PG_SQLSTATE_PROGRAM_LIMIT "54000"
#define PG_SQLSTATE_INTERNAL "XX000"
#define PG_SQLSTATE_QUERY_CANCELED "57014"

/* Type OIDs the masking tells apart (pg_type.dat). */
#define PG_OID_BOOL 16
#define PG_OID_BYTEA 17
#define PG_OID_CHAR 18
#define PG_OID_NAME 19
#define PG_OID_INT8 20
#define PG_OID_INT2 21
#define PG_OID_INT4 23
#define PG_OID_TEXT 25
#define PG_OID_OID 26
#define PG_OID_JSON 114
#define PG_OID_XML 142
#define PG_OID_FLOAT4 700
#define PG_OID_FLOAT8 701
#define PG_OID_UNKNOWN 705
#define PG_OID_BPCHAR 1042
#define PG_OID_VARCHAR 1043
#define PG_OID_JSONB 3802
#define PG_OID_RECORD 2249
/* The first OID of objects made after initdb: user-defined types (composites, enums, ...). */
#define PG_OID_FIRST_NORMAL 16384

static inline uint32_t pg_get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint16_t pg_get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline void pg_put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static inline void pg_put16(uint8_t *p, uint16_t v)
{
	p[0] = v >> 8;
	p[1] = v;
}

/* A reader over one message body; any read past the end sets bad and returns zeros. */
struct pg_rd {
	const uint8_t *p, *end;
	bool bad;
};

static inline void pg_rd_init(struct pg_rd *r, const uint8_t *body, size_t len)
{
	r->p = body;
	r->end = body + len;
	r->bad = false;
}

static inline size_t pg_rd_left(const struct pg_rd *r)
{
	return r->end - r->p;
}

static inline uint8_t pg_rd_u8(struct pg_rd *r)
{
	if (r->bad || pg_rd_left(r) < 1) {
		r->bad = true;
		return 0;
	}
	return *r->p++;
}

static inline uint16_t pg_rd_u16(struct pg_rd *r)
{
	uint16_t v;

	if (r->bad || pg_rd_left(r) < 2) {
		r->bad = true;
		return 0;
	}
	v = pg_get16(r->p);
	r->p += 2;
	return v;
}

static inline uint32_t pg_rd_u32(struct pg_rd *r)
{
	uint32_t v;

	if (r->bad || pg_rd_left(r) < 4) {
		r->bad = true;
		return 0;
	}
	v = pg_get32(r->p);
	r->p += 4;
	return v;
}

/* A NUL-terminated string inside the body (NULL and bad when there is no NUL). */
static inline const char *pg_rd_str(struct pg_rd *r, size_t *len)
{
	const uint8_t *nul;
	const char *s;

	if (r->bad || !(nul = memchr(r->p, 0, pg_rd_left(r)))) {
		r->bad = true;
		return NULL;
	}
	s = (const char *)r->p;
	if (len)
		*len = nul - r->p;
	r->p = nul + 1;
	return s;
}

static inline const uint8_t *pg_rd_bytes(struct pg_rd *r, size_t n)
{
	const uint8_t *p;

	if (r->bad || pg_rd_left(r) < n) {
		r->bad = true;
		return NULL;
	}
	p = r->p;
	r->p += n;
	return p;
}

/*
 * Building messages: pg_wr_begin() appends the type byte and room for the length and returns
 * the message's offset in the buffer; pg_wr_end() fills the length in. Appends that fail leave
 * the buffer short; pg_wr_end() then returns -ENOMEM.
 */
struct pg_wr {
	struct ag_buf *b;
	size_t start;
	bool oom;
};

void pg_wr_begin(struct pg_wr *w, struct ag_buf *b, char type);
void pg_wr_u8(struct pg_wr *w, uint8_t v);
void pg_wr_u16(struct pg_wr *w, uint16_t v);
void pg_wr_u32(struct pg_wr *w, uint32_t v);
void pg_wr_bytes(struct pg_wr *w, const void *p, size_t n);
void pg_wr_str(struct pg_wr *w, const char *s); /* with its NUL */
int pg_wr_end(struct pg_wr *w);

/* The fields of an ErrorResponse or NoticeResponse the gateway sends. */
struct pg_err {
	const char *severity; /* "ERROR", "FATAL" */
	const char *code;     /* SQLSTATE */
	const char *message;
	const char *detail; /* NULL: none */
	const char *hint;   /* NULL: none */
	int position;	    /* 1-based cursor position in the query, 0: none */
};

/* ErrorResponse ('E'), or NoticeResponse ('N') when type is 'N'. 0 or -ENOMEM. */
int pg_put_error(struct ag_buf *b, char type, const struct pg_err *e);
int pg_put_ready(struct ag_buf *b, char status);
int pg_put_query(struct ag_buf *b, const char *sql);
int pg_put_parse(struct ag_buf *b, const char *name, const char *sql);
int pg_put_describe(struct ag_buf *b, char what, const char *name);

/*
 * The fields of an ErrorResponse/NoticeResponse body: the value of field `code` (a pointer into
 * the body, NUL-terminated there), or NULL.
 */
const char *pg_error_field(const uint8_t *body, size_t len, char code);
