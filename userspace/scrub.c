// SPDX-License-Identifier: GPL-2.0
/*
 * The streaming credential scrubber (scrub.h). Patterns are few (at most six) and short (a
 * token of at most a few KiB), the pieces are what one read or one inflate produced: a plain
 * memmem() per pattern, then the longest tail that is a pattern's prefix is held back.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "scrub.h"

#define SCRUB_MIN 8

static void pat_drop(struct ag_scrub *sc, size_t i)
{
	explicit_bzero(sc->pat[i], sc->len[i]);
	free(sc->pat[i]);
	sc->pat[i] = NULL;
	sc->len[i] = 0;
}

static void maxlen_update(struct ag_scrub *sc)
{
	sc->maxlen = 0;
	for (size_t i = 0; i < sc->npat; i++)
		if (sc->len[i] > sc->maxlen)
			sc->maxlen = sc->len[i];
}

static int pat_add(struct ag_scrub *sc, const char *p, size_t n, bool framed)
{
	for (size_t i = 0; i < sc->npat; i++)
		if (sc->len[i] == n && !memcmp(sc->pat[i], p, n))
			return 0;
	if (sc->npat == AG_SCRUB_PATS)
		return 0;
	sc->pat[sc->npat] = malloc(n);
	if (!sc->pat[sc->npat])
		return -ENOMEM;
	memcpy(sc->pat[sc->npat], p, n);
	sc->gen[sc->npat] = sc->cur;
	sc->framed[sc->npat] = framed;
	sc->len[sc->npat++] = n;
	return 0;
}

/* The token as it appears inside a JSON string ('/' may be escaped as "\/"; '"', '\\'). */
static int pat_add_json(struct ag_scrub *sc, const char *tok, size_t n)
{
	char *e;
	size_t k = 0;
	int rc;

	if (!memchr(tok, '/', n) && !memchr(tok, '"', n) && !memchr(tok, '\\', n))
		return 0;
	e = malloc(2 * n);
	if (!e)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (tok[i] == '/' || tok[i] == '"' || tok[i] == '\\')
			e[k++] = '\\';
		e[k++] = tok[i];
	}
	rc = pat_add(sc, e, k, false);
	explicit_bzero(e, k);
	free(e);
	return rc;
}

int ag_scrub_set(struct ag_scrub *sc, const char *authorization)
{
	const char *tok = authorization;
	size_t n = strlen(authorization), tn;
	int rc;

	if (!strncasecmp(tok, "Bearer ", 7)) {
		tok += 7;
		while (*tok == ' ')
			tok++;
	}
	tn = strlen(tok);
	if (tn < SCRUB_MIN)
		return 0;
	/* already the current one? */
	for (size_t i = 0; i < sc->npat; i++)
		if (sc->len[i] == tn && !memcmp(sc->pat[i], tok, tn))
			return 0;
	/* keep the credential before this one (a renewed JWT), forget older ones */
	if (sc->npat) {
		size_t j = 0;

		for (size_t i = 0; i < sc->npat; i++) {
			if (sc->gen[i] != sc->cur) {
				pat_drop(sc, i);
				continue;
			}
			sc->pat[j] = sc->pat[i];
			sc->len[j] = sc->len[i];
			sc->framed[j] = sc->framed[i];
			sc->gen[j++] = sc->gen[i];
		}
		sc->npat = j;
	}
	sc->cur++;
	/* "Bearer <token>" first: the longest */
	rc = tok != authorization ? pat_add(sc, authorization, n, true) : 0;
	if (!rc)
		rc = pat_add(sc, tok, tn, false);
	if (!rc)
		rc = pat_add_json(sc, tok, tn);
	maxlen_update(sc);
	return rc;
}

static size_t replace_all(struct ag_scrub *sc, uint8_t *p, size_t n)
{
	size_t hits = 0;

	for (size_t i = 0; i < sc->npat; i++) {
		uint8_t *q = p, *end = p + n;

		while ((size_t)(end - q) >= sc->len[i]) {
			uint8_t *m = memmem(q, end - q, sc->pat[i], sc->len[i]);

			if (!m)
				break;
			memset(m, '*', sc->len[i]);
			q = m + sc->len[i];
			hits++;
		}
	}
	return hits;
}

size_t ag_scrub_buf(struct ag_scrub *sc, void *p, size_t n)
{
	size_t hits;

	if (!sc->npat)
		return 0;
	hits = replace_all(sc, p, n);
	sc->hits += hits;
	return hits;
}

/* The longest tail of p/n (shorter than the pattern) that begins some pattern. */
static size_t tail_hold(struct ag_scrub *sc, const uint8_t *p, size_t n)
{
	size_t hold = 0;

	for (size_t i = 0; i < sc->npat; i++) {
		size_t k = sc->len[i] - 1 < n ? sc->len[i] - 1 : n;

		if (sc->framed[i] && sc->tunnel)
			continue; /* the token alone decides what a relay holds back */

		for (; k > hold; k--)
			if (p[n - k] == (uint8_t)sc->pat[i][0] && !memcmp(p + n - k, sc->pat[i], k)) {
				hold = k;
				break;
			}
	}
	return hold;
}

int ag_scrub_feed(struct ag_scrub *sc, const void *p, size_t n,
		  void (*emit)(void *ctx, const void *p, size_t n), void *ctx)
{
	uint8_t *w;
	size_t len, hold;

	if (!sc->npat) {
		if (n)
			emit(ctx, p, n);
		return 0;
	}
	if (!n)
		return 0;
	if (ag_buf_append(&sc->work, p, n))
		return -ENOMEM;
	w = sc->work.data + sc->work.start;
	len = ag_buf_len(&sc->work);
	sc->hits += replace_all(sc, w, len);
	hold = tail_hold(sc, w, len);
	if (len > hold)
		emit(ctx, w, len - hold);
	ag_buf_consume(&sc->work, len - hold);
	return 0;
}

void ag_scrub_flush(struct ag_scrub *sc, void (*emit)(void *ctx, const void *p, size_t n),
		    void *ctx)
{
	size_t len = ag_buf_len(&sc->work);

	if (len)
		emit(ctx, ag_buf_head(&sc->work), len);
	ag_buf_consume(&sc->work, len);
}

void ag_scrub_free(struct ag_scrub *sc)
{
	for (size_t i = 0; i < sc->npat; i++)
		pat_drop(sc, i);
	sc->npat = sc->maxlen = 0;
	if (sc->work.data)
		explicit_bzero(sc->work.data, sc->work.cap);
	ag_buf_free(&sc->work);
}
