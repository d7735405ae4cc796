// SPDX-License-Identifier: GPL-2.0
/*
 * Streaming JSON masking (jsonmask.h). The parser's callbacks re-emit each event at once into
 * the caller's buffer, written as yajl's generator writes it (compact, the same string escapes:
 * emit.c-style here to skip the generator's second buffer and its per-byte printer), so memory
 * stays bounded by the nesting depth and the longest single value (yajl keeps a string that
 * spans chunks until it is whole).
 */
#include <errno.h>
#include <stddef.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_parse.h>

#include "jsonmask.h"
#include "mask.h"

#define JM_MAX_DEPTH 128
#define JM_KEY_MAX 128
#define JM_PAT_PARTS 16

struct jm_frame {
	bool map;
	bool secret;	      /* a Secret object: its data and stringData are masked */
	bool mask_all;	      /* every scalar below is masked whole */
	bool any;	      /* a member or element was written: the next one after a ',' */
	bool whole;	      /* maps: the member being read is masked whole (key_whole()) */
	uint8_t keylen;	      /* strlen(key) */
	char key[JM_KEY_MAX]; /* the member being read (maps) */
};

struct ag_jmask {
	struct ag_jmask_opts o;
	yajl_handle p;
	struct ag_buf *out; /* where the masked document goes (during a feed) */
	int depth;
	struct jm_pat *pats;
	size_t npats;
	/*
	 * Bit n set: a pattern's last part may match a key of n bytes (a literal part of that
	 * length; a glob sets them all). Most keys are told apart by their length alone.
	 */
	uint64_t lastlen;
	int masked;
	int err;
	char error[160];
	struct ag_buf tmp;
	/* last, and never zeroed whole: push() sets each frame as it is entered (17 KiB) */
	struct jm_frame st[JM_MAX_DEPTH];
};

static struct jm_frame *top(struct ag_jmask *j)
{
	return j->depth ? &j->st[j->depth - 1] : NULL;
}

/* A key pattern split once: "spec.*.token" → spec, *, token (literal parts compared plainly). */
struct jm_pat {
	char *buf;
	char *part[JM_PAT_PARTS];
	size_t len[JM_PAT_PARTS];
	bool glob[JM_PAT_PARTS];
	int n;
};

/* Does the key path (map keys from the root, arrays skipped) end with the pattern's parts? */
static bool path_matches(const struct ag_jmask *j, const struct jm_pat *pat)
{
	int np = pat->n, d = j->depth - 1;

	while (np > 0) {
		const char *want = pat->part[np - 1];

		while (d >= 0 && !j->st[d].map)
			d--;
		if (d < 0)
			return false;
		if (pat->glob[np - 1] ? fnmatch(want, j->st[d].key, 0)
				      : pat->len[np - 1] != j->st[d].keylen ||
						memcmp(want, j->st[d].key, pat->len[np - 1]))
			return false;
		np--;
		d--;
	}
	return true;
}

/*
 * Is the member whose key was just read into the top frame (a map) masked whole? Computed once
 * per key: what it depends on (the keys from the root, the Secret marks of the frames above)
 * cannot change before the member's value is read.
 */
static bool key_whole(const struct ag_jmask *j)
{
	const struct jm_frame *f = &j->st[j->depth - 1];

	if (j->o.secrets) {
		if (f->secret && (!strcmp(f->key, "data") || !strcmp(f->key, "stringData")))
			return true;
		/* kubectl apply keeps the whole object, data included, in this annotation */
		if (f->key[0] == 'k' &&
		    !strcmp(f->key, "kubectl.kubernetes.io/last-applied-configuration") &&
		    j->depth >= 3 && j->st[j->depth - 3].secret)
			return true;
	}
	if (f->keylen < 64 && !(j->lastlen >> f->keylen & 1))
		return false;
	for (size_t i = 0; i < j->npats; i++)
		if (path_matches(j, &j->pats[i]))
			return true;
	return false;
}

/* Is the value now being read (at the top frame's key) masked whole? */
static inline bool value_whole(const struct ag_jmask *j)
{
	const struct jm_frame *f = j->depth ? &j->st[j->depth - 1] : NULL;

	return f && (f->mask_all || (f->map && f->whole));
}

static int fail(struct ag_jmask *j, int err)
{
	j->err = err;
	return 0; /* stops the parse */
}

/* --- output, byte for byte as yajl_gen (no beautify, no solidus escape) writes it --------- */

static int put(struct ag_jmask *j, const void *p, size_t n)
{
	struct ag_buf *b = j->out;

	/* most pieces are a few bytes into a buffer with room: no call for them */
	if (b->cap - b->end >= n) {
		memcpy(b->data + b->end, p, n);
		b->end += n;
		return 1;
	}
	return ag_buf_append(b, p, n) ? fail(j, -ENOMEM) : 1;
}

/* One byte (a ',' ':' or bracket): most often in place, with no call. */
static inline int put1(struct ag_jmask *j, char c)
{
	struct ag_buf *b = j->out;

	if (b->cap > b->end) {
		b->data[b->end++] = c;
		return 1;
	}
	return put(j, &c, 1);
}

/* Bytes a JSON string cannot hold as they are: '"', '\\' and the controls below 0x20. */
static const uint8_t needs_esc[256] = {
	[0 ... 0x1f] = 1, ['"'] = 1, ['\\'] = 1,
};

/*
 * How many bytes from s need no escape: 8 at a time while the word has no control, '"' or '\\'
 * (the classic exact tests for a byte below n and a zero byte), then by the table.
 */
static size_t plain_prefix(const unsigned char *s, size_t len)
{
	const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
	size_t i = 0;

	for (; len - i >= 8; i += 8) {
		uint64_t x, q, b;

		memcpy(&x, s + i, 8);
		q = x ^ (ones * '"');
		b = x ^ (ones * '\\');
		if ((((x - ones * 0x20) & ~x) | ((q - ones) & ~q) | ((b - ones) & ~b)) & high)
			break;
	}
	while (i < len && !needs_esc[s[i]])
		i++;
	return i;
}

static int put_string(struct ag_jmask *j, const unsigned char *s, size_t len)
{
	struct ag_buf *b = j->out;
	size_t run = 0, i = 0;
	uint8_t *w = b->cap - b->end >= len + 2 ? b->data + b->end : ag_buf_reserve(b, len + 2);

	if (!w)
		return fail(j, -ENOMEM);
	i = plain_prefix(s, len);
	if (i == len) {
		/* the common case: nothing to escape, one copy */
		w[0] = '"';
		memcpy(w + 1, s, len);
		w[len + 1] = '"';
		ag_buf_commit(j->out, len + 2);
		return 1;
	}
	if (!put1(j, '"'))
		return 0;
	for (; i < len; i++) {
		static const char hex[] = "0123456789ABCDEF";
		char u[6] = { '\\', 'u', '0', '0' };
		const char *e;
		size_t el = 2;

		if (!needs_esc[s[i]])
			continue;
		switch (s[i]) {
		case '\r': e = "\\r"; break;
		case '\n': e = "\\n"; break;
		case '\\': e = "\\\\"; break;
		case '"': e = "\\\""; break;
		case '\f': e = "\\f"; break;
		case '\b': e = "\\b"; break;
		case '\t': e = "\\t"; break;
		default:
			u[4] = hex[s[i] >> 4];
			u[5] = hex[s[i] & 15];
			e = u;
			el = 6;
		}
		if (!put(j, s + run, i - run) || !put(j, e, el))
			return 0;
		run = i + 1;
	}
	return put(j, s + run, len - run) && put1(j, '"');
}

/* Before a value: a ',' after an array's earlier element (a map's key wrote its ':'). */
static int value_sep(struct ag_jmask *j)
{
	struct jm_frame *f = top(j);

	if (!f || f->map)
		return 1;
	if (f->any && !put1(j, ','))
		return 0;
	f->any = true;
	return 1;
}

/* A scalar's text as it is (a number, true, false, null), after its separator. */
static int put_atom(struct ag_jmask *j, const void *p, size_t n)
{
	return value_sep(j) && put(j, p, n);
}

static int put_string_value(struct ag_jmask *j, const unsigned char *s, size_t len)
{
	return value_sep(j) && put_string(j, s, len);
}

static int emit_masked_scalar(struct ag_jmask *j, const unsigned char *s, size_t len, bool text)
{
	bool whole = value_whole(j), is_null = false;
	int rc;

	j->tmp.start = j->tmp.end = 0;
	if (!j->o.m || (!whole && !text))
		goto as_is;
	rc = ag_mask_value(j->o.m, whole, text ? AG_MASK_TEXT : AG_MASK_TYPED, s, len, &j->tmp,
			   &is_null);
	if (rc < 0)
		return fail(j, -EIO);
	if (!rc)
		goto as_is;
	j->masked += rc;
	if (is_null)
		return put_atom(j, "null", 4);
	return put_string_value(j, ag_buf_head(&j->tmp), ag_buf_len(&j->tmp));
as_is:
	if (text)
		return put_string_value(j, s, len);
	return put_atom(j, s, len);
}

/* A top-level value done: a newline after it, and the generator ready for the next. */
static int value_done(struct ag_jmask *j, int rc)
{
	if (rc && !j->depth)
		return put1(j, '\n');
	return rc;
}

static int cb_null(void *ctx)
{
	struct ag_jmask *j = ctx;

	return value_done(j, put_atom(j, "null", 4));
}

static int cb_boolean(void *ctx, int v)
{
	struct ag_jmask *j = ctx;

	if (j->o.m && value_whole(j)) {
		j->masked++;
		return value_done(j, put_atom(j, "null", 4));
	}
	return value_done(j, v ? put_atom(j, "true", 4) : put_atom(j, "false", 5));
}

static int cb_number(void *ctx, const char *s, size_t len)
{
	return value_done(ctx, emit_masked_scalar(ctx, (const unsigned char *)s, len, false));
}

static int cb_string(void *ctx, const unsigned char *s, size_t len)
{
	struct ag_jmask *j = ctx;
	struct jm_frame *f = top(j);

	/* kind: Secret marks its object (the API server writes kind first) */
	if (j->o.secrets && f && f->map && !strcmp(f->key, "kind") && len == 6 &&
	    !memcmp(s, "Secret", 6))
		f->secret = true;
	return value_done(j, emit_masked_scalar(j, s, len, true));
}

static int push(struct ag_jmask *j, bool map)
{
	struct jm_frame *f = top(j), *n;
	bool all;

	if (j->depth == JM_MAX_DEPTH) {
		snprintf(j->error, sizeof(j->error), "JSON nested deeper than %d", JM_MAX_DEPTH);
		return fail(j, -EPROTO);
	}
	all = j->o.m && value_whole(j);
	n = &j->st[j->depth++];
	n->map = map;
	n->secret = n->any = n->whole = false;
	n->mask_all = all;
	n->keylen = 0;
	n->key[0] = '\0';
	/* The objects of a secrets response: the document, items[*], a watch event's object */
	if (map && j->o.secrets && j->o.secret_objects) {
		if (!f)
			n->secret = true;
		else if (f->map && !strcmp(f->key, "object"))
			n->secret = j->depth == 2;
		else if (!f->map && j->depth == 3 && j->st[0].map && !strcmp(j->st[0].key, "items"))
			n->secret = true;
	}
	return 1;
}

static int cb_start_map(void *ctx)
{
	struct ag_jmask *j = ctx;

	if (!value_sep(j) || !push(j, true))
		return 0;
	return put1(j, '{');
}

static int cb_start_array(void *ctx)
{
	struct ag_jmask *j = ctx;

	if (!value_sep(j) || !push(j, false))
		return 0;
	return put1(j, '[');
}

static int pop(struct ag_jmask *j)
{
	j->depth--;
	return value_done(j, 1);
}

/*
 * A member's key as yajl_gen writes it, after a ',' when not the first: "key": in one
 * reservation when nothing needs escaping (*plain then: no control byte, so no NUL in it).
 */
static int put_key(struct ag_jmask *j, const unsigned char *s, size_t len, bool comma,
		   bool *plain)
{
	struct ag_buf *b = j->out;
	size_t need = len + 3 + comma;
	uint8_t *w;

	*plain = plain_prefix(s, len) == len;
	if (!*plain)
		return (!comma || put1(j, ',')) && put_string(j, s, len) && put1(j, ':');
	w = b->cap - b->end >= need ? b->data + b->end : ag_buf_reserve(b, need);
	if (!w)
		return fail(j, -ENOMEM);
	if (comma)
		*w++ = ',';
	*w++ = '"';
	memcpy(w, s, len);
	w += len;
	*w++ = '"';
	*w = ':';
	ag_buf_commit(b, need);
	return 1;
}

static int cb_map_key(void *ctx, const unsigned char *s, size_t len)
{
	struct ag_jmask *j = ctx;
	struct jm_frame *f = top(j);
	size_t klen = len < JM_KEY_MAX ? len : JM_KEY_MAX - 1;
	bool comma = f->any, plain;
	const unsigned char *nul;

	f->any = true;
	if (!put_key(j, s, len, comma, &plain))
		return 0;
	memcpy(f->key, s, klen);
	f->key[klen] = '\0';
	nul = plain ? NULL : memchr(s, 0, klen);
	f->keylen = nul ? (size_t)(nul - s) : klen; /* as strcmp() read it: up to a \u0000 */
	f->whole = key_whole(j);
	return 1;
}

static int cb_end_map(void *ctx)
{
	struct ag_jmask *j = ctx;

	if (!put1(j, '}'))
		return 0;
	return pop(j);
}

static int cb_end_array(void *ctx)
{
	struct ag_jmask *j = ctx;

	if (!put1(j, ']'))
		return 0;
	return pop(j);
}

static const yajl_callbacks callbacks = {
	.yajl_null = cb_null,
	.yajl_boolean = cb_boolean,
	.yajl_number = cb_number,
	.yajl_string = cb_string,
	.yajl_start_map = cb_start_map,
	.yajl_map_key = cb_map_key,
	.yajl_end_map = cb_end_map,
	.yajl_start_array = cb_start_array,
	.yajl_end_array = cb_end_array,
};

struct ag_jmask *ag_jmask_new(const struct ag_jmask_opts *o)
{
	struct ag_jmask *j = malloc(sizeof(*j));

	if (!j)
		return NULL;
	memset(j, 0, offsetof(struct ag_jmask, st));
	j->o = *o;
	j->p = yajl_alloc(&callbacks, NULL, j);
	if (!j->p) {
		ag_jmask_free(j);
		errno = ENOMEM;
		return NULL;
	}
	yajl_config(j->p, yajl_allow_multiple_values, 1);
	j->pats = calloc(o->nkeys ? o->nkeys : 1, sizeof(*j->pats));
	if (!j->pats)
		goto nomem;
	for (size_t i = 0; i < o->nkeys; i++) {
		struct jm_pat *pt = &j->pats[j->npats++];
		char *save = NULL;

		pt->buf = strdup(o->keys[i]);
		if (!pt->buf)
			goto nomem;
		for (char *t = strtok_r(pt->buf, ".", &save); t && pt->n < JM_PAT_PARTS;
		     t = strtok_r(NULL, ".", &save)) {
			pt->glob[pt->n] = strpbrk(t, "*?[\\") != NULL;
			pt->len[pt->n] = strlen(t);
			pt->part[pt->n++] = t;
		}
		/* no parts (".") matches every path */
		if (!pt->n || pt->glob[pt->n - 1] || pt->len[pt->n - 1] >= 64)
			j->lastlen = ~0ULL;
		else
			j->lastlen |= 1ULL << pt->len[pt->n - 1];
	}
	return j;
nomem:
	ag_jmask_free(j);
	errno = ENOMEM;
	return NULL;
}

void ag_jmask_free(struct ag_jmask *j)
{
	if (!j)
		return;
	if (j->p)
		yajl_free(j->p);
	for (size_t i = 0; i < j->npats; i++)
		free(j->pats[i].buf);
	free(j->pats);
	ag_buf_free(&j->tmp);
	free(j);
}

/* After a parse into out (from its length before): what failed appends nothing. */
static int result(struct ag_jmask *j, yajl_status st, const uint8_t *data, size_t len,
		  struct ag_buf *out, size_t before)
{
	int n;

	j->out = NULL;

	if (st != yajl_status_ok && !j->err) {
		unsigned char *e = yajl_get_error(j->p, 0, data, len);

		snprintf(j->error, sizeof(j->error), "%s", e ? (char *)e : "invalid JSON");
		if (e)
			yajl_free_error(j->p, e);
		j->err = -EPROTO;
	}
	if (j->err) {
		out->end = out->start + before;
		return j->err;
	}
	n = j->masked;
	j->masked = 0;
	return n;
}

int ag_jmask_feed(struct ag_jmask *j, const uint8_t *data, size_t len, struct ag_buf *out)
{
	size_t before = ag_buf_len(out);

	if (j->err)
		return j->err;
	j->out = out;
	return result(j, yajl_parse(j->p, data, len), data, len, out, before);
}

int ag_jmask_finish(struct ag_jmask *j, struct ag_buf *out)
{
	size_t before = ag_buf_len(out);

	if (j->err)
		return j->err;
	j->out = out;
	return result(j, yajl_complete_parse(j->p), NULL, 0, out, before);
}

const char *ag_jmask_error(const struct ag_jmask *j)
{
	return j->error;
}
