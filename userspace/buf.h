/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A byte buffer with start/end offsets and explicit growth (PgBouncer/Odyssey style). Storage is
 * allocated on first use and released when the buffer drains, so an idle session holds none.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

struct ag_buf {
	uint8_t *data;
	size_t start; /* first unconsumed byte */
	size_t end;   /* one past the last byte */
	size_t cap;
};

static inline size_t ag_buf_len(const struct ag_buf *b)
{
	return b->end - b->start;
}

static inline const uint8_t *ag_buf_head(const struct ag_buf *b)
{
	return b->data + b->start;
}

/* Appends len bytes; 0 or -ENOMEM. */
int ag_buf_append(struct ag_buf *b, const void *data, size_t len);
/* Makes room for at least len more bytes at the end; returns the write pointer or NULL. */
uint8_t *ag_buf_reserve(struct ag_buf *b, size_t len);
static inline void ag_buf_commit(struct ag_buf *b, size_t len)
{
	b->end += len;
}
/* Drops n bytes from the front; frees the storage once empty. */
void ag_buf_consume(struct ag_buf *b, size_t n);
void ag_buf_free(struct ag_buf *b);
