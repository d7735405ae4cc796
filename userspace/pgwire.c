// SPDX-License-Identifier: GPL-2.0
/* Building the PostgreSQL messages the gateway writes itself; see pgwire.h. */
#include <errno.h>
#include <stdio.h>

#include "pgwire.h"

void pg_wr_begin(struct pg_wr *w, struct ag_buf *b, char type)
{
	static const uint8_t zero[4];

	w->b = b;
	w->oom = false;
	w->start = ag_buf_len(b);
	w->oom |= ag_buf_append(b, &type, 1) != 0;
	w->oom |= ag_buf_append(b, zero, 4) != 0;
}

void pg_wr_bytes(struct pg_wr *w, const void *p, size_t n)
{
	if (!w->oom && ag_buf_append(w->b, p, n))
		w->oom = true;
}

void pg_wr_u8(struct pg_wr *w, uint8_t v)
{
	pg_wr_bytes(w, &v, 1);
}

void pg_wr_u16(struct pg_wr *w, uint16_t v)
{
	uint8_t p[2];

	pg_put16(p, v);
	pg_wr_bytes(w, p, 2);
}

void pg_wr_u32(struct pg_wr *w, uint32_t v)
{
	uint8_t p[4];

	pg_put32(p, v);
	pg_wr_bytes(w, p, 4);
}

void pg_wr_str(struct pg_wr *w, const char *s)
{
	pg_wr_bytes(w, s, strlen(s) + 1);
}

int pg_wr_end(struct pg_wr *w)
{
	if (w->oom)
		return -ENOMEM;
	/* start is relative to the unconsumed head, which nobody consumes while building. */
	pg_put32(w->b->data + w->b->start + w->start + 1, ag_buf_len(w->b) - w->start - 1);
	return 0;
}

static void err_field(struct pg_wr *w, char code, const char *value)
{
	if (!value)
		return;
	pg_wr_u8(w, code);
	pg_wr_str(w, value);
}

int pg_put_error(struct ag_buf *b, char type, const struct pg_err *e)
{
	struct pg_wr w;
	char pos[16];

	pg_wr_begin(&w, b, type);
	err_field(&w, 'S', e->severity);
	err_field(&w, 'V', e->severity);
	err_field(&w, 'C', e->code);
	err_field(&w, 'M', e->message);
	err_field(&w, 'D', e->detail);
	err_field(&w, 'H', e->hint);
	if (e->position > 0) {
		snprintf(pos, sizeof(pos), "%d", e->position);
		err_field(&w, 'P', pos);
	}
	pg_wr_u8(&w, 0);
	return pg_wr_end(&w);
}

int pg_put_ready(struct ag_buf *b, char status)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, PG_B_READY);
	pg_wr_u8(&w, status);
	return pg_wr_end(&w);
}

int pg_put_query(struct ag_buf *b, const char *sql)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, PG_F_QUERY);
	pg_wr_str(&w, sql);
	return pg_wr_end(&w);
}

int pg_put_parse(struct ag_buf *b, const char *name, const char *sql)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, PG_F_PARSE);
	pg_wr_str(&w, name);
	pg_wr_str(&w, sql);
	pg_wr_u16(&w, 0);
	return pg_wr_end(&w);
}

int pg_put_describe(struct ag_buf *b, char what, const char *name)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, PG_F_DESCRIBE);
	pg_wr_u8(&w, what);
	pg_wr_str(&w, name);
	return pg_wr_end(&w);
}

const char *pg_error_field(const uint8_t *body, size_t len, char code)
{
	struct pg_rd r;

	pg_rd_init(&r, body, len);
	for (;;) {
		uint8_t c = pg_rd_u8(&r);
		const char *v;

		if (r.bad || !c)
			return NULL;
		v = pg_rd_str(&r, NULL);
		if (!v)
			return NULL;
		if (c == (uint8_t)code)
			return v;
	}
}
