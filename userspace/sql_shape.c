// SPDX-License-Identifier: GPL-2.0
/*
 * Classification by shape. A client that sends its statements with the constants written in
 * (pgbench -S in simple-query mode: `SELECT abalance FROM pgbench_accounts WHERE aid = 12345;`)
 * misses the per-thread text cache on every query. Its statements differ only in constants,
 * and a classification that never looks at a constant's value is the same for all of them.
 *
 * The key is the statement's tokens as PostgreSQL's own lexer cuts them (libpg_query's
 * pg_query_scan, the scanner its parser runs on), comments left out: every token's kind and,
 * for every token but a constant (ICONST, FCONST, SCONST, USCONST, BCONST, XCONST), its text.
 * A constant contributes its kind only. So two strings share a key only when the parser sees
 * the same token sequence with the same identifiers, keywords, operators and parameters, and
 * the constants of the same kinds in the same places: the same tree but for constant values.
 * The text of a token is everything from its start to the next token's start, trailing
 * whitespace dropped (not libpg_query's end offset, which is short for some tokens, U&'' ones
 * for instance): anything the lexer did not make a token of is in some token's text.
 *
 * Kept by shape: only successful classifications that did not read a constant's value
 * (ag_sql_result.literal_read: set_config('role', ...) and EXPLAIN (ANALYZE 'off') read one).
 * Not keyed at all (classified by text as before): statements over AG_SQL_SHAPE_MAX_TEXT or
 * whose key would be over twice that (so 256 slots hold at most 2 MiB of keys), strings the
 * scanner refuses, and strings with UESCAPE (whose constant changes how a U&""
 * identifier next to it reads). Statement offsets depend on the lengths of constants: they are
 * kept as the index of the `;` token that starts or ends each statement and rebuilt from the
 * new string's tokens on a hit (a result whose offsets do not map is not kept).
 *
 * What a shape hit does not do: refuse a statement whose constant PostgreSQL's grammar itself
 * would reject (`float(0)`); the server refuses those when it parses them.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <pg_query.h>
#include <pg_query/pg_query.pb-c.h>

#include "sql_shape.h"

#define SHAPE_SLOTS 256
#define SHAPE_MAX_KEY (2 * AG_SQL_SHAPE_MAX_TEXT)

/* The tokens of one string: its key, and where its non-comment tokens start. */
struct shape {
	char *key;
	size_t klen, kcap;
	int *start;
	uint32_t *kind;
	size_t ntok, cap;
};

struct shape_slot {
	uint64_t hash;
	char *key;
	size_t klen;
	struct ag_sql_result r;
	/* Per statement: the token index of the `;` before it and of the one ending it, or -1. */
	int *map;
};

/*
 * The texts shaped last and their keys: a statement's text is shaped when it is classified
 * and again when its RowDescription is planned (sqlorigin.c), and a prepared statement's on
 * every Describe; the second and later scans are a lookup here.
 */
#define MEMO_SLOTS 32

struct memo {
	uint64_t hash; /* of the text */
	char *text, *key;
	size_t tlen, klen, cap; /* cap: the one allocation holding text then key */
};

struct shape_cache {
	struct shape_slot slot[SHAPE_SLOTS];
	struct memo memo[MEMO_SLOTS];
	uint64_t hits, misses;
};

static __thread struct shape_cache *scache;
static pthread_key_t scache_key;
static pthread_once_t scache_once = PTHREAD_ONCE_INIT;

static bool is_constant(uint32_t kind)
{
	switch (kind) {
	case PG_QUERY__TOKEN__ICONST:
	case PG_QUERY__TOKEN__FCONST:
	case PG_QUERY__TOKEN__SCONST:
	case PG_QUERY__TOKEN__USCONST:
	case PG_QUERY__TOKEN__BCONST:
	case PG_QUERY__TOKEN__XCONST:
		return true;
	default:
		return false;
	}
}

/* PostgreSQL's whitespace (scan.l's space: no \v). */
static bool pg_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f';
}

static int key_add(struct shape *sh, const void *p, size_t n)
{
	if (sh->klen + n > sh->kcap) {
		size_t cap = sh->kcap ? sh->kcap * 2 : 256;
		char *k;

		while (cap < sh->klen + n)
			cap *= 2;
		k = realloc(sh->key, cap);
		if (!k)
			return -ENOMEM;
		sh->key = k;
		sh->kcap = cap;
	}
	memcpy(sh->key + sh->klen, p, n);
	sh->klen += n;
	return 0;
}

static int tok_add(struct shape *sh, int start, uint32_t kind)
{
	if (sh->ntok == sh->cap) {
		size_t cap = sh->cap ? sh->cap * 2 : 32;
		int *s = realloc(sh->start, cap * sizeof(*s));
		uint32_t *k;

		if (!s)
			return -ENOMEM;
		sh->start = s;
		k = realloc(sh->kind, cap * sizeof(*k));
		if (!k)
			return -ENOMEM;
		sh->kind = k;
		sh->cap = cap;
	}
	sh->start[sh->ntok] = start;
	sh->kind[sh->ntok++] = kind;
	return 0;
}

static void shape_free(struct shape *sh)
{
	free(sh->key);
	free(sh->start);
	free(sh->kind);
	memset(sh, 0, sizeof(*sh));
}

/*
 * A thread's shapes are built in one scratch shape (tsh), its arrays kept from one statement
 * to the next (three allocations fewer per statement), unless one made them large.
 */
static __thread struct shape tsh;

#define SCRATCH_KEEP_KEY 8192
#define SCRATCH_KEEP_TOK 1024

static void shape_done(struct shape *sh)
{
	if (sh != &tsh || sh->kcap > SCRATCH_KEEP_KEY || sh->cap > SCRATCH_KEEP_TOK)
		shape_free(sh);
	sh->klen = sh->ntok = 0;
}

/* The tokens of scan in sql, into sh. 0, or -EINVAL when sql must not be keyed by shape. */
static int shape_build(const char *sql, size_t len, const PgQuery__ScanResult *scan,
		       struct shape *sh)
{
	size_t n = scan->n_tokens;
	int prev = -1;

	for (size_t i = 0; i < n; i++) {
		const PgQuery__ScanToken *t = scan->tokens[i];

		/* Offsets that do not walk the string forwards: not a scan to trust. */
		if (t->start <= prev || t->start < 0 || (size_t)t->start >= len)
			return -EINVAL;
		prev = t->start;
		if (t->token == PG_QUERY__TOKEN__UESCAPE)
			return -EINVAL;
	}
	/* Before the first token: nothing the lexer skipped but whitespace. */
	for (size_t o = 0; o < (n ? (size_t)scan->tokens[0]->start : len); o++)
		if (!pg_space(sql[o]))
			return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		const PgQuery__ScanToken *t = scan->tokens[i];
		uint32_t kind = t->token, tlen;
		size_t end = i + 1 < n ? (size_t)scan->tokens[i + 1]->start : len;

		if (kind == PG_QUERY__TOKEN__SQL_COMMENT || kind == PG_QUERY__TOKEN__C_COMMENT)
			continue;
		if (tok_add(sh, t->start, kind) || key_add(sh, &kind, sizeof(kind)))
			return -ENOMEM;
		if (is_constant(kind))
			continue;
		while (end > (size_t)t->start + 1 && pg_space(sql[end - 1]))
			end--;
		tlen = end - t->start;
		if (key_add(sh, &tlen, sizeof(tlen)) || key_add(sh, sql + t->start, tlen))
			return -ENOMEM;
	}
	return 0;
}

/*
 * protobuf-c's unpack allocates every token on its own: here from a per-thread block instead
 * (a pgbench statement's tokens fit many times over), the heap only past its end.
 */
#define UNPACK_BLOCK (16u << 10)

struct unpack_block {
	size_t used;
	max_align_t blk[UNPACK_BLOCK / sizeof(max_align_t)];
};

static __thread struct unpack_block *ublk; /* allocated and freed with the thread's cache */

static bool in_block(const void *p)
{
	return ublk && (const char *)p >= (const char *)ublk->blk &&
	       (const char *)p < (const char *)ublk->blk + sizeof(ublk->blk);
}

static void *unpack_alloc(void *data, size_t n)
{
	size_t a = (n + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
	void *p;

	(void)data;
	if (!ublk || a > sizeof(ublk->blk) - ublk->used)
		return malloc(n);
	p = (char *)ublk->blk + ublk->used;
	ublk->used += a;
	return p;
}

static void unpack_free(void *data, void *p)
{
	(void)data;
	if (!in_block(p))
		free(p);
}

static ProtobufCAllocator unpack_allocator = { unpack_alloc, unpack_free, NULL };

/*
 * The quick key: for the plain statements most clients send (identifiers, keywords, operators,
 * integers, decimals, standard strings), the text itself with each constant's bytes replaced
 * by one byte naming its kind, without a pg_query_scan. It must be a finer key than the scan's:
 * two texts with the same quick key have the same tokens but for constant values. So the quick
 * path takes only what it lexes exactly as PostgreSQL's lexer does, and gives up (-EINVAL: the
 * scanner decides) on anything else: comments, dollar quotes and parameters ($), quoted names,
 * any string with a prefix (E'', B'', X'', N'', U&'') or a backslash in it, numbers touching a
 * letter, dot or quote (1e5, 1.x, .5, 1..2), bytes outside printable ASCII and PostgreSQL's
 * whitespace. Everything between constants is kept byte for byte, so the lexer reads the rest
 * of two such texts alike; constants are digits-only or quote-delimited, so no token around one
 * can take a byte of it. The constant marks (bytes 1 to 3) never occur in an accepted text, and
 * a quick key starts with QUICK_TAG, which no scan key does (a token kind is under 2^16). Its
 * "tokens" (sh->start, sh->kind) are the `;` outside constants only: what map_offsets needs.
 */
#define QUICK_TAG "\xff\xff\xff\xff"

enum { QUICK_ICONST = 1, QUICK_FCONST = 2, QUICK_SCONST = 3 };

/* The bytes the quick path knows, by what they may be (one lookup per byte of a statement). */
enum { Q_START = 1, Q_DIGIT = 2, Q_CONT = 4, Q_SELF = 8 };

static const uint8_t q_class[256] = {
	['a' ... 'z'] = Q_START | Q_CONT, ['A' ... 'Z'] = Q_START | Q_CONT,
	['_'] = Q_START | Q_CONT,	  ['0' ... '9'] = Q_DIGIT | Q_CONT,
	['$'] = Q_CONT,
	/* The operator and punctuation bytes kept as they are ('-' and '/' checked for comments). */
	[','] = Q_SELF, ['('] = Q_SELF, [')'] = Q_SELF, ['['] = Q_SELF, [']'] = Q_SELF,
	['.'] = Q_SELF, [';'] = Q_SELF, [':'] = Q_SELF, ['+'] = Q_SELF, ['-'] = Q_SELF,
	['*'] = Q_SELF, ['/'] = Q_SELF, ['%'] = Q_SELF, ['^'] = Q_SELF, ['<'] = Q_SELF,
	['>'] = Q_SELF, ['='] = Q_SELF, ['~'] = Q_SELF, ['!'] = Q_SELF, ['@'] = Q_SELF,
	['#'] = Q_SELF, ['&'] = Q_SELF, ['|'] = Q_SELF, ['`'] = Q_SELF, ['?'] = Q_SELF,
};

static inline bool q_ident_start(unsigned char c)
{
	return q_class[c] & Q_START;
}

static inline bool q_digit(unsigned char c)
{
	return q_class[c] & Q_DIGIT;
}

static inline bool q_ident_cont(unsigned char c)
{
	return q_class[c] & Q_CONT;
}

static inline bool q_self(unsigned char c)
{
	return q_class[c] & Q_SELF;
}

static int quick_shape(const char *sql, size_t len, struct shape *sh)
{
	const unsigned char *p = (const unsigned char *)sql;
	size_t i = 0, from = 0;
	uint8_t mark;

	if (key_add(sh, QUICK_TAG, 4))
		return -ENOMEM;
	while (i < len) {
		unsigned char c = p[i];

		if (pg_space(c)) {
			i++;
		} else if (q_ident_start(c)) {
			while (++i < len && q_ident_cont(p[i]))
				;
		} else if (q_digit(c)) {
			size_t start = i;
			uint64_t v = 0;
			bool big = false;

			/* After a dot (.5, t.1) the lexer may read otherwise: the scanner says. */
			if (i && p[i - 1] == '.')
				return -EINVAL;
			for (; i < len && q_digit(p[i]); i++) {
				v = v * 10 + (p[i] - '0');
				big |= v > 2147483647u; /* the lexer's ICONST is an int32 */
			}
			mark = big ? QUICK_FCONST : QUICK_ICONST;
			if (i < len && p[i] == '.') {
				if (i + 1 >= len || !q_digit(p[i + 1]))
					return -EINVAL;
				for (i++; i < len && q_digit(p[i]); i++)
					;
				mark = QUICK_FCONST;
			}
			if (i < len && (q_ident_cont(p[i]) || p[i] == '.' || p[i] == '\'' ||
					p[i] == '"'))
				return -EINVAL;
			if (key_add(sh, sql + from, start - from) || key_add(sh, &mark, 1))
				return -ENOMEM;
			from = i;
		} else if (c == '\'') {
			size_t start = i;

			/* A prefix (E'', B'', X'', N'', U&'') or something touching it. */
			if (i && (q_ident_cont(p[i - 1]) || p[i - 1] == '&'))
				return -EINVAL;
			for (i++;; i++) {
				if (i >= len)
					return -EINVAL; /* unterminated */
				if (p[i] == '\'') {
					if (i + 1 < len && p[i + 1] == '\'') {
						i++;
						continue;
					}
					break;
				}
				if (p[i] < 0x20 || p[i] > 0x7e || p[i] == '\\')
					return -EINVAL;
			}
			i++;
			mark = QUICK_SCONST;
			if (key_add(sh, sql + from, start - from) || key_add(sh, &mark, 1))
				return -ENOMEM;
			from = i;
		} else if (q_self(c)) {
			if ((c == '-' && i + 1 < len && p[i + 1] == '-') ||
			    (c == '/' && i + 1 < len && p[i + 1] == '*'))
				return -EINVAL;
			if (c == ';' && tok_add(sh, i, PG_QUERY__TOKEN__ASCII_59))
				return -ENOMEM;
			i++;
		} else {
			return -EINVAL; /* $, quoted names, backslash, control or non-ASCII bytes */
		}
	}
	return key_add(sh, sql + from, len - from);
}

/* Keys sql by shape (0), or says it cannot be (-EINVAL, -ENOMEM). */
static int shape_of(const char *sql, size_t len, struct shape *sh)
{
	PgQueryScanResult sr;
	PgQuery__ScanResult *scan;
	int err;

	sh->klen = sh->ntok = 0;
	if (len > AG_SQL_SHAPE_MAX_TEXT)
		return -EINVAL;
	err = quick_shape(sql, len, sh);
	if (err != -EINVAL)
		return err;
	sh->klen = sh->ntok = 0;
	sr = pg_query_scan(sql);
	if (sr.error) {
		pg_query_free_scan_result(sr);
		return -EINVAL;
	}
	if (ublk)
		ublk->used = 0;
	scan = pg_query__scan_result__unpack(&unpack_allocator, sr.pbuf.len,
					     (const uint8_t *)sr.pbuf.data);
	pg_query_free_scan_result(sr);
	if (!scan)
		return -EINVAL;
	err = shape_build(sql, len, scan, sh);
	pg_query__scan_result__free_unpacked(scan, &unpack_allocator);
	/* A key is at most 9 bytes per byte of text ("1,1,..."): bound what a slot may hold. */
	if (!err && sh->klen > SHAPE_MAX_KEY)
		err = -EINVAL;
	return err;
}

static void slot_clear(struct shape_slot *s)
{
	free(s->key);
	free(s->map);
	ag_sql_result_free(&s->r);
	memset(s, 0, sizeof(*s));
}

static void scache_destroy(void *p)
{
	struct shape_cache *c = p;

	for (int i = 0; c && i < SHAPE_SLOTS; i++)
		slot_clear(&c->slot[i]);
	for (int i = 0; c && i < MEMO_SLOTS; i++)
		free(c->memo[i].text);
	free(c);
	scache = NULL;
	free(ublk);
	ublk = NULL;
	shape_free(&tsh);
}

static void scache_key_init(void)
{
	pthread_key_create(&scache_key, scache_destroy);
}

static struct shape_cache *scache_get(void)
{
	if (scache)
		return scache;
	pthread_once(&scache_once, scache_key_init);
	scache = calloc(1, sizeof(*scache));
	if (scache)
		pthread_setspecific(scache_key, scache);
	if (scache && !ublk)
		ublk = calloc(1, sizeof(*ublk)); /* without it, unpack uses the heap */
	return scache;
}

void ag_sql_shape_flush(void)
{
	if (!scache)
		return;
	pthread_setspecific(scache_key, NULL);
	scache_destroy(scache);
}

void ag_sql_shape_stats(uint64_t *hits, uint64_t *misses)
{
	*hits = scache ? scache->hits : 0;
	*misses = scache ? scache->misses : 0;
}

/* The index of the `;` token starting at off, or -1. */
static int semi_at(const struct shape *sh, int off)
{
	size_t lo = 0, hi = sh->ntok;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (sh->start[mid] < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < sh->ntok && sh->start[lo] == off && sh->kind[lo] == PG_QUERY__TOKEN__ASCII_59 ?
		       (int)lo :
		       -1;
}

/* Each statement's offsets as `;` token indexes (see struct shape_slot); NULL if one cannot be. */
static int *map_offsets(const struct shape *sh, const struct ag_sql_result *r)
{
	int *map = malloc((r->nstmts ? r->nstmts : 1) * 2 * sizeof(*map));

	for (size_t i = 0; map && i < r->nstmts; i++) {
		const struct ag_sql_stmt *s = &r->stmts[i];

		map[2 * i] = s->location ? semi_at(sh, s->location - 1) : -1;
		map[2 * i + 1] = s->length ? semi_at(sh, s->location + s->length) : -1;
		if ((s->location && map[2 * i] < 0) || (s->length && map[2 * i + 1] < 0)) {
			free(map);
			return NULL;
		}
	}
	return map;
}

static void store(struct shape_slot *s, uint64_t h, struct shape *sh,
		  const struct ag_sql_result *r)
{
	int *map = map_offsets(sh, r);

	if (!map)
		return;
	slot_clear(s);
	if (ag_sql_result_copy(r, &s->r)) {
		free(map);
		slot_clear(s);
		return;
	}
	s->r.fingerprint = 0; /* the fingerprint is the text's, kept with the text */
	s->map = map;
	s->key = malloc(sh->klen);
	if (!s->key) {
		slot_clear(s);
		return;
	}
	memcpy(s->key, sh->key, sh->klen);
	s->hash = h;
	s->klen = sh->klen;
}

static void memo_put(struct shape_cache *c, uint64_t th, const char *sql, size_t len,
		     const struct shape *sh)
{
	struct memo *m = &c->memo[th % MEMO_SLOTS];

	if (len + sh->klen > m->cap) {
		char *t = realloc(m->text, len + sh->klen);

		if (!t) {
			m->tlen = m->klen = 0;
			return;
		}
		m->text = t;
		m->cap = len + sh->klen;
	}
	m->hash = th;
	m->tlen = len;
	m->klen = sh->klen;
	memcpy(m->text, sql, len);
	m->key = m->text + len;
	memcpy(m->key, sh->key, sh->klen);
}

static const struct memo *memo_get(struct shape_cache *c, uint64_t th, const char *sql, size_t len)
{
	const struct memo *m = &c->memo[th % MEMO_SLOTS];

	return m->text && m->hash == th && m->tlen == len && !memcmp(m->text, sql, len) ? m : NULL;
}

int ag_sql_shape_classify(const char *sql, size_t len, uint64_t th, struct ag_sql_result *out)
{
	struct shape_cache *c;
	struct shape_slot *s;
	struct shape *sh = &tsh;
	uint64_t h;
	int ret;

	/* The scratch shape lives with the thread's cache (freed with it). */
	if (!(c = scache_get()) || shape_of(sql, len, sh)) {
		if (c)
			shape_done(sh);
		return ag_sql_classify_uncached(sql, out);
	}
	memo_put(c, th, sql, len, sh);
	h = ag_sql_hash_text(sh->key, sh->klen);
	s = &c->slot[h % SHAPE_SLOTS];
	if (s->key && s->hash == h && s->klen == sh->klen && !memcmp(s->key, sh->key, sh->klen)) {
		c->hits++;
		ret = ag_sql_result_copy(&s->r, out);
		for (size_t i = 0; !ret && i < out->nstmts; i++) {
			struct ag_sql_stmt *st = &out->stmts[i];
			int a = s->map[2 * i], b = s->map[2 * i + 1];

			st->location = a < 0 ? 0 : sh->start[a] + 1;
			st->length = b < 0 ? 0 : sh->start[b] - st->location;
		}
		shape_done(sh);
		return ret;
	}
	c->misses++;
	ret = ag_sql_classify_uncached(sql, out);
	if (!ret && !out->literal_read && !out->error)
		store(s, h, sh, out);
	shape_done(sh);
	return ret;
}

int ag_sql_shape_key(const char *sql, size_t len, char **key, size_t *klen)
{
	struct shape_cache *c = len <= AG_SQL_SHAPE_MAX_TEXT ? scache_get() : NULL;
	uint64_t th = c ? ag_sql_hash_text(sql, len) : 0;
	const struct memo *m = c ? memo_get(c, th, sql, len) : NULL;
	struct shape own = { 0 }, *sh = c ? &tsh : &own;
	int err;

	*key = NULL;
	*klen = 0;
	if (m) {
		if (!(*key = malloc(m->klen ? m->klen : 1)))
			return -ENOMEM;
		memcpy(*key, m->key, m->klen);
		*klen = m->klen;
		return 0;
	}
	err = shape_of(sql, len, sh);
	if (!err && c)
		memo_put(c, th, sql, len, sh);
	if (!err && !(*key = malloc(sh->klen ? sh->klen : 1)))
		err = -ENOMEM;
	if (!err) {
		memcpy(*key, sh->key, sh->klen);
		*klen = sh->klen;
	}
	shape_done(sh);
	return err;
}

int ag_sql_shape_key_peek(const char *sql, size_t len, const char **key, size_t *klen)
{
	struct shape_cache *c = len <= AG_SQL_SHAPE_MAX_TEXT ? scache_get() : NULL;
	uint64_t th = c ? ag_sql_hash_text(sql, len) : 0;
	const struct memo *m = c ? memo_get(c, th, sql, len) : NULL;
	int err;

	if (!c)
		return len <= AG_SQL_SHAPE_MAX_TEXT ? -ENOMEM : -EINVAL;
	if (!m) {
		err = shape_of(sql, len, &tsh);
		if (!err)
			memo_put(c, th, sql, len, &tsh);
		shape_done(&tsh);
		if (err)
			return err;
		m = memo_get(c, th, sql, len);
		if (!m)
			return -ENOMEM;
	}
	*key = m->key;
	*klen = m->klen;
	return 0;
}
