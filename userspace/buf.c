// SPDX-License-Identifier: GPL-2.0
/* The session byte buffer; see buf.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

uint8_t *ag_buf_reserve(struct ag_buf *b, size_t len)
{
	size_t used = b->end - b->start, ncap;
	uint8_t *nd;

	if (b->cap - b->end >= len)
		return b->data + b->end;
	/* Slide down before growing: the front is often mostly consumed. */
	if (b->start && b->cap - used >= len) {
		memmove(b->data, b->data + b->start, used);
		b->start = 0;
		b->end = used;
		return b->data + b->end;
	}
	ncap = b->cap ? b->cap : 4096;
	while (ncap - used < len)
		ncap *= 2;
	nd = malloc(ncap);
	if (!nd)
		return NULL;
	if (used)
		memcpy(nd, b->data + b->start, used);
	free(b->data);
	b->data = nd;
	b->cap = ncap;
	b->start = 0;
	b->end = used;
	return b->data + b->end;
}

int ag_buf_append(struct ag_buf *b, const void *data, size_t len)
{
	uint8_t *p;

	if (!len)
		return 0;
	p = ag_buf_reserve(b, len);
	if (!p)
		return -ENOMEM;
	memcpy(p, data, len);
	b->end += len;
	return 0;
}

void ag_buf_consume(struct ag_buf *b, size_t n)
{
	b->start += n;
	if (b->start >= b->end)
		ag_buf_free(b);
}

void ag_buf_free(struct ag_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->start = b->end = b->cap = 0;
}
