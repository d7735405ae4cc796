/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The session's own secret never goes back to the agent: a streaming scrubber that replaces
 * every occurrence of the credential the gateway injected upstream (the token, "Bearer <token>"
 * and the token as a JSON string escapes it) with '*' of the same length, so that framing
 * (Content-Length) stays valid. Pieces are fed in order; at most the longest pattern's length
 * minus one is held back between pieces, and only while the stream ends in a prefix of a
 * pattern, so a token split across reads or chunks is still caught. ag_scrub_flush() at the end
 * of the stream releases what is held. Held bytes wait for the next piece: a stream that pauses
 * on a prefix of the token (after an upgrade, say) shows those bytes only when more come.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define AG_SCRUB_CREDS 2 /* the current credential and the one before it (a renewed JWT) */
#define AG_SCRUB_PATS (AG_SCRUB_CREDS * 3)

struct ag_scrub {
	char *pat[AG_SCRUB_PATS];
	size_t len[AG_SCRUB_PATS];
	unsigned int gen[AG_SCRUB_PATS], cur; /* which credential each pattern is of */
	bool framed[AG_SCRUB_PATS];	      /* "Bearer <token>" (the token is a pattern too) */
	/*
	 * A relay (after an upgrade) that has no end to flush at soon: held back only what may
	 * begin the token itself, not "Bearer", so that fewer quiet moments hold bytes.
	 */
	bool tunnel;
	size_t npat, maxlen;
	struct ag_buf work; /* held bytes, then the piece being scrubbed */
	uint64_t hits;	    /* occurrences replaced since the last ag_scrub_take_hits() */
};

/*
 * Sets the credential (an Authorization value, "Bearer <token>", or a bare token); the previous
 * one is kept as well. 0 or -ENOMEM. Values shorter than 8 bytes are not scrubbed (they would
 * blank ordinary text and cannot be a real token).
 */
int ag_scrub_set(struct ag_scrub *sc, const char *authorization);
static inline bool ag_scrub_active(const struct ag_scrub *sc)
{
	return sc->npat > 0;
}
/*
 * Scrubs the piece p/n (after what was held) and calls emit with the bytes that may go now
 * (possibly none). 0, or what emit returned when not 0, or -ENOMEM.
 */
int ag_scrub_feed(struct ag_scrub *sc, const void *p, size_t n,
		  void (*emit)(void *ctx, const void *p, size_t n), void *ctx);
/* The end of a stream: what was held goes out (it is no occurrence). */
void ag_scrub_flush(struct ag_scrub *sc, void (*emit)(void *ctx, const void *p, size_t n),
		    void *ctx);
/* Scrubs a whole buffer in place (a response head), no holding back; the occurrences. */
size_t ag_scrub_buf(struct ag_scrub *sc, void *p, size_t n);
static inline uint64_t ag_scrub_take_hits(struct ag_scrub *sc)
{
	uint64_t h = sc->hits;

	sc->hits = 0;
	return h;
}
/* Forgets the credentials (zeroed) and frees what it holds. */
void ag_scrub_free(struct ag_scrub *sc);
