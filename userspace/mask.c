// SPDX-License-Identifier: GPL-2.0
/*
 * Masking of result values (see mask.h). Column rules compile to one fnmatch() glob per part
 * (schema, table, column); unquoted parts are lower-cased and matched case-insensitively,
 * quoted ones ("Users") exactly. Value detectors are hand-written scanners rather than regular
 * expressions because they run on every text value of every row: one pass, 16 bytes at a time,
 * notes which trigger bytes are present and counts digits, and only the detectors whose
 * triggers are there ('@' and '.', enough digits, "eyJ", "AKIA"/"ASIA", a labelled secret,
 * "-----BEGIN") look further; most values end after that pass. Every scanner is linear in the
 * value, hostile input included (runs of '@', digits, backslashes, BEGIN lines). Matches
 * respect word boundaries; a JSON escape letter (the n of "\n" in row_to_json() text) counts
 * as a boundary. Replacements hold no quote, backslash, tab or line break and cover whole
 * escapes, so JSON text, COPY rows and CSV lines keep their shape. Masked text is scanned
 * again, since a replacement can turn its neighbour into a match: what the agent gets holds
 * nothing a detector finds.
 *
 * What a masked value looks like (the redact marker names what was found):
 *   whole column:  redact "[REDACTED]", partial = the detector's partial form when the whole
 *                  value is one detection, else the last 4 characters kept ("*******6789",
 *                  all stars under 8 characters), hash "h:" + 16 hex digits of
 *                  HMAC-SHA-256(key, value), null SQL NULL. Typed values become NULL always.
 *   typed values:  no text can go into an int, a date or a uuid: one that a detector finds
 *                  something in (4111111111111111::int8) becomes NULL, like a whole one.
 *   inside text:   redact "[REDACTED:email]" (":credit-card", ":ssn", ":phone", ":aws-key",
 *                  ":private-key"; a JWT keeps its header: "eyJhbGciOi....[REDACTED:jwt]"),
 *                  partial per detector (a***@example.com, ****-****-****-1111, ***-**-6789,
 *                  (***) ***-4567, AKIA****************, header.***.***; a private key is
 *                  always redacted), hash as above, null redacts (NULL is for whole values).
 *                  Overlapping detections of different kinds merge into one "[REDACTED]".
 *
 * Detectors assume an ASCII-compatible client encoding in which bytes below 0x80 are always
 * characters (UTF-8, LATIN*, EUC-*); they are best effort against derived values, not a
 * barrier against an agent that transforms a value on purpose (reverse(), translate()):
 * column rules, resolved at the column's origin, are that barrier.
 */
#include <errno.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "mask.h"

#define REDACTED "[REDACTED]"
#define HASH_HEX 16   /* hex digits of the HMAC kept by the hash style */
#define PARTIAL_MIN 8 /* generic partial keeps the last 4 characters from this length on */

struct mask_pat {
	char *glob[3]; /* schema, table, column */
	int flags[3];  /* FNM_CASEFOLD for unquoted parts */
};

struct ag_masker {
	uint64_t id; /* ag_masker_id() */
	bool active;
	enum ag_mask_style style;
	unsigned int detectors;
	struct mask_pat *pats;
	size_t npats;
	char **part[3];	  /* pats[i].glob[k] as arrays, for ag_masker_patterns() */
	EVP_MAC_CTX *mac; /* keyed HMAC-SHA-256 template (hash style only) */
};

/* ---- character classes ---- */

enum {
	C_DIGIT = 1 << 0, /* must stay bit 0: the prefilter adds it up to count digits */
	C_ALPHA = 1 << 1,
	C_UPPER = 1 << 2,
	C_WORD = 1 << 3,  /* [A-Za-z0-9_]: what a number or key must not touch */
	C_B64U = 1 << 4,  /* base64url, JWT segments */
	C_B64 = 1 << 5,	  /* base64, AWS secrets and PEM bodies */
	C_LOCAL = 1 << 6, /* e-mail local part */
	C_DOM = 1 << 7,	  /* e-mail domain label (UTF-8 bytes for IDNs) */
	/* Triggers: a detector looks at a value only when its trigger byte is in it. */
	T_AT = 1 << 8,
	T_J = 1 << 9,	    /* "eyJ" */
	T_A = 1 << 10,	    /* "AKIA", "ASIA" */
	T_S = 1 << 11,	    /* "secret" */
	T_ASSIGN = 1 << 12, /* the ':' or '=' after a secret's label */
	T_DASH = 1 << 13,   /* "-----BEGIN" */
	T_DOT = 1 << 14,    /* in every e-mail domain and JWT */
};

#define C_ALNUM (C_WORD | C_B64U | C_B64 | C_LOCAL | C_DOM)

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Woverride-init"
static const uint16_t ctab[256] = {
	['0' ... '9'] = C_DIGIT | C_ALNUM,
	['a' ... 'z'] = C_ALPHA | C_ALNUM,
	['A' ... 'Z'] = C_ALPHA | C_UPPER | C_ALNUM,
	['s'] = C_ALPHA | C_ALNUM | T_S,
	['A'] = C_ALPHA | C_UPPER | C_ALNUM | T_A,
	['J'] = C_ALPHA | C_UPPER | C_ALNUM | T_J,
	['S'] = C_ALPHA | C_UPPER | C_ALNUM | T_S,
	['_'] = C_WORD | C_B64U | C_LOCAL,
	['-'] = C_B64U | C_LOCAL | C_DOM | T_DASH,
	['.'] = C_LOCAL | T_DOT,
	['%'] = C_LOCAL,
	['+'] = C_LOCAL | C_B64,
	['/'] = C_B64,
	['='] = C_B64 | T_ASSIGN,
	[':'] = T_ASSIGN,
	['@'] = T_AT,
	[0x80 ... 0xff] = C_DOM,
};
#pragma GCC diagnostic pop

static inline bool is(uint8_t c, uint16_t cls)
{
	return ctab[c] & cls;
}

static inline bool is_digit(uint8_t c)
{
	return (unsigned int)(c - '0') < 10;
}

static inline bool is_hex(uint8_t c)
{
	return is_digit(c) || (unsigned int)((c | 0x20) - 'a') < 6;
}

/*
 * The first lit (n bytes) in s[at, len), or NULL: memchr() for lit[anchor], a byte chosen to be
 * rare in text ('J' of "eyJ"), so common bytes do not stop the scan. memmem() costs more on
 * the short values that are most of the data.
 */
static const uint8_t *find(const uint8_t *s, size_t len, size_t at, const char *lit, size_t n,
			   size_t anchor)
{
	const uint8_t *p;

	for (at += anchor; at < len && (p = memchr(s + at, lit[anchor], len - at));
	     at = p - s + 1) {
		size_t i = p - s - anchor;

		if (len - i >= n && !memcmp(s + i, lit, n))
			return s + i;
	}
	return NULL;
}

/* Is s[i] the payload of a backslash escape (odd number of backslashes before it)? */
static bool escaped(const uint8_t *s, size_t i)
{
	size_t n = 0;

	while (n < i && s[i - n - 1] == '\\')
		n++;
	return n & 1;
}

/* May a key or token start at s[p]: not glued to a word, an escape letter ("\n") aside? */
static bool word_left_ok(const uint8_t *s, size_t p)
{
	if (!p || !is(s[p - 1], C_WORD))
		return true;
	return is(s[p - 1], C_ALPHA) && escaped(s, p - 1);
}

/* Separators that, between digits, make one longer number (1.5, 12-34). */
static inline bool num_joiner(uint8_t c)
{
	return c == '.' || c == '-';
}

/*
 * May a card, SSN or phone number start at s[p]? Not glued to a word or to a number it would
 * continue. A space after digits does not join ("ref 12 4111 1111 1111 1111" has a card), and
 * neither does what ends before lo, a detection that will be masked ("<card>+<phone>").
 */
static bool num_left_ok(const uint8_t *s, size_t p, size_t lo)
{
	uint8_t c;

	if (p <= lo)
		return true;
	c = s[p - 1];
	if (is(c, C_WORD))
		return is(c, C_ALPHA) && escaped(s, p - 1);
	return !(num_joiner(c) && p - 1 > lo && is_digit(s[p - 2]));
}

/* May a number end before s[e]? A zero fraction does not extend it (card::numeric(20,2)). */
static bool num_right_ok(const uint8_t *s, size_t len, size_t e)
{
	if (e >= len)
		return true;
	if (is(s[e], C_WORD))
		return false;
	if (s[e] == '.' && e + 1 < len && s[e + 1] == '0') {
		for (e++; e < len && s[e] == '0'; e++)
			;
		return e >= len || !is(s[e], C_WORD);
	}
	return !(num_joiner(s[e]) && e + 1 < len && is_digit(s[e + 1]));
}

static bool digits_at(const uint8_t *s, size_t len, size_t i, size_t n)
{
	if (i > len || len - i < n)
		return false;
	for (; n; n--, i++)
		if (!is_digit(s[i]))
			return false;
	return true;
}

/* Case-insensitive compare with a lower-case ASCII word. */
static bool word_eq(const uint8_t *s, size_t avail, const char *w, size_t n)
{
	if (avail < n)
		return false;
	for (size_t i = 0; i < n; i++)
		if ((s[i] | 0x20) != (uint8_t)w[i])
			return false;
	return true;
}

/* ---- matches ---- */

struct span {
	size_t start, end;
	unsigned int det; /* one AG_DET_* bit; 0: overlapping detections merged */
};

struct spans {
	struct span *v;
	size_t n, cap;
	int err;
	struct span inl[8];
};

static void spans_init(struct spans *sp)
{
	sp->v = sp->inl;
	sp->n = 0;
	sp->cap = sizeof(sp->inl) / sizeof(sp->inl[0]);
	sp->err = 0;
}

static void spans_free(struct spans *sp)
{
	if (sp->v != sp->inl)
		free(sp->v);
}

static void push(struct spans *sp, size_t start, size_t end, unsigned int det)
{
	if (sp->n == sp->cap) {
		size_t ncap = sp->cap * 2;
		struct span *nv;

		if (sp->err)
			return;
		nv = sp->v == sp->inl ? malloc(ncap * sizeof(*nv))
				      : realloc(sp->v, ncap * sizeof(*nv));
		if (!nv) {
			sp->err = -ENOMEM;
			return;
		}
		if (sp->v == sp->inl)
			memcpy(nv, sp->inl, sizeof(sp->inl));
		sp->v = nv;
		sp->cap = ncap;
	}
	sp->v[sp->n++] = (struct span){ start, end, det };
}

static int span_cmp(const void *a, const void *b)
{
	const struct span *x = a, *y = b;

	if (x->start != y->start)
		return x->start < y->start ? -1 : 1;
	return x->end > y->end ? -1 : x->end < y->end;
}

/*
 * Sorted by start; overlapping spans merge into one. A merged span of two kinds is redacted
 * whole (det 0): a form that keeps part of one (a JWT's header) could show the other (an AWS
 * secret that is that header).
 */
static void spans_settle(struct spans *sp)
{
	size_t w = 0;

	if (sp->n > 1)
		qsort(sp->v, sp->n, sizeof(*sp->v), span_cmp);
	for (size_t r = 0; r < sp->n; r++) {
		struct span *last = w ? &sp->v[w - 1] : NULL;

		if (last && sp->v[r].start < last->end) {
			if (sp->v[r].end > last->end)
				last->end = sp->v[r].end;
			if (sp->v[r].det != last->det)
				last->det = 0;
			continue;
		}
		sp->v[w++] = sp->v[r];
	}
	sp->n = w;
}

/* ---- e-mail ---- */

/*
 * The domain from s[i]: labels of letters, digits and '-' (UTF-8 bytes allowed, for IDNs)
 * joined by single dots; at least two labels, the last one (the TLD) 2+ long and starting with
 * a letter. The longest such prefix ("bob@example.com.123" stops after com). End or 0.
 */
static size_t match_domain(const uint8_t *s, size_t len, size_t i)
{
	size_t end = 0, nlabels = 0;

	for (;;) {
		size_t l = i, te;

		while (i < len && is(s[i], C_DOM))
			i++;
		if (i == l)
			break;
		nlabels++;
		for (te = i; te > l && s[te - 1] == '-'; te--)
			;
		if (nlabels >= 2 && te - l >= 2 && (is(s[l], C_ALPHA) || s[l] >= 0x80))
			end = te;
		if (te < i || i + 1 >= len || s[i] != '.' || !is(s[i + 1], C_DOM))
			break;
		i++;
	}
	return end;
}

static void scan_emails(const uint8_t *s, size_t len, struct spans *sp)
{
	size_t lo = 0, at = 0;
	const uint8_t *p;

	while (at < len && (p = memchr(s + at, '@', len - at))) {
		size_t a = p - s, b = a, e;

		at = a + 1;
		/* Bounded by the previous '@' or match: the local part is never walked twice. */
		while (b > lo && is(s[b - 1], C_LOCAL))
			b--;
		while (b < a && s[b] == '.')
			b++;
		if (b < a && escaped(s, b)) {
			/* "\nbob@..." in JSON text: the n belongs to the escape, \u to 4 hex digits. */
			size_t k = s[b++] == 'u' ? 4 : 0;

			for (; k && b < a && is_hex(s[b]); k--)
				b++;
		}
		if (b >= a)
			continue;
		e = match_domain(s, len, a + 1);
		if (!e)
			continue;
		push(sp, b, e, AG_DET_EMAIL);
		lo = at = e;
	}
}

/* ---- numbers: credit cards, SSNs, phone numbers ---- */

static bool luhn(const uint8_t *s, size_t a, size_t e)
{
	unsigned int sum = 0, dbl = 0;

	for (size_t i = e; i-- > a;) {
		unsigned int d;

		if (!is_digit(s[i]))
			continue;
		d = (s[i] - '0') << dbl;
		sum += d > 9 ? d - 9 : d;
		dbl ^= 1;
	}
	return sum % 10 == 0;
}

/*
 * A card number from s[p]: 13-19 digits starting with 2-6, either one run or groups split by
 * one kind of single separator (' ' or '-') in a card's shape: 4-4-...-4 with a last group of
 * 1-4, or Amex/Diners 4-6-5 and 4-6-4. The longest candidate passing Luhn wins. End or 0.
 */
static size_t match_card(const uint8_t *s, size_t len, size_t p)
{
	size_t ends[19], i = p;
	unsigned int gl[19], ng = 0, total = 0;
	uint8_t sep = 0;

	/* Issuers' numbers start with 2-6 (Mastercard 2-series, Amex, Visa, ...); epoch ms not. */
	if (s[p] < '2' || s[p] > '6')
		return 0;
	for (;;) {
		size_t g = i;

		while (i < len && is_digit(s[i]) && i - g < 20)
			i++;
		if (total + (i - g) > 19)
			break;
		total += i - g;
		gl[ng] = i - g;
		ends[ng++] = i;
		if (i + 1 < len && (s[i] == ' ' || s[i] == '-') && (!sep || s[i] == sep) &&
		    is_digit(s[i + 1])) {
			sep = s[i++];
			continue;
		}
		break;
	}
	for (unsigned int k = ng; k > 0; k--) {
		unsigned int tot = 0, j;
		bool shape;

		for (j = 0; j < k; j++)
			tot += gl[j];
		if (tot < 13)
			break;
		if (k == 1) {
			shape = true;
		} else if (gl[0] != 4) {
			shape = false;
		} else if (k == 3 && gl[1] == 6 && (gl[2] == 4 || gl[2] == 5)) {
			shape = true;
		} else {
			shape = gl[k - 1] <= 4;
			for (j = 1; j + 1 < k; j++)
				shape = shape && gl[j] == 4;
		}
		if (shape && num_right_ok(s, len, ends[k - 1]) && luhn(s, p, ends[k - 1]))
			return ends[k - 1];
	}
	return 0;
}

/* ddd-dd-dddd, not area 000, 666 or 9xx, group 00 or serial 0000. End or 0. */
static size_t match_ssn(const uint8_t *s, size_t len, size_t p)
{
	const uint8_t *d = s + p;
	unsigned int area;

	if (len - p < 11)
		return 0;
	for (int i = 0; i < 11; i++)
		if (i == 3 || i == 6 ? d[i] != '-' : !is_digit(d[i]))
			return 0;
	area = (d[0] - '0') * 100 + (d[1] - '0') * 10 + (d[2] - '0');
	if (!area || area == 666 || area >= 900)
		return 0;
	if (!memcmp(d + 4, "00", 2) || !memcmp(d + 7, "0000", 4))
		return 0;
	return num_right_ok(s, len, p + 11) ? p + 11 : 0;
}

/*
 * NANP from s[q]: (555) 123-4567, (555)123-4567, 555-123-4567, 555.123.4567, optionally after
 * "1-", "1." or "1 " (the "+1" forms are E.164's). The area code starts with 2-9. End or 0.
 */
static size_t match_nanp(const uint8_t *s, size_t len, size_t q)
{
	size_t i = q;
	uint8_t area, sep;

	if (i + 1 < len && s[i] == '1' && (s[i + 1] == '-' || s[i + 1] == '.' || s[i + 1] == ' '))
		i += 2;
	if (i < len && s[i] == '(') {
		if (!digits_at(s, len, i + 1, 3) || i + 4 >= len || s[i + 4] != ')')
			return 0;
		area = s[i + 1];
		i += 5;
		if (i < len && s[i] == ' ')
			i++;
		if (!digits_at(s, len, i, 3) || i + 3 >= len)
			return 0;
		sep = s[i + 3];
		if (sep != '-' && sep != '.' && sep != ' ')
			return 0;
		i += 4;
	} else {
		if (!digits_at(s, len, i, 3) || i + 3 >= len)
			return 0;
		area = s[i];
		sep = s[i + 3];
		if (sep != '-' && sep != '.')
			return 0;
		i += 4;
		if (!digits_at(s, len, i, 3) || i + 3 >= len || s[i + 3] != sep)
			return 0;
		i += 4;
	}
	if (area < '2' || !digits_at(s, len, i, 4))
		return 0;
	i += 4;
	return num_right_ok(s, len, i) ? i : 0;
}

/*
 * E.164 from the '+' at s[q]: a country code 1-9, 8-15 digits in all, in groups split by one
 * or two of " -.()" ("+1 (555) 123-4567", "+44 20 7946 0958"). A run of more than 15 digits
 * is some other number; trailing groups beyond 15 digits are left out. End or 0.
 */
static size_t match_e164(const uint8_t *s, size_t len, size_t q)
{
	size_t i = q + 1, nd = 0, best = 0;

	if (i >= len || s[i] < '1' || s[i] > '9')
		return 0;
	for (;;) {
		size_t g = i, j;

		while (i < len && is_digit(s[i]) && nd + (i - g) <= 15)
			i++;
		nd += i - g;
		if (nd > 15)
			break;
		if (nd >= 8 && num_right_ok(s, len, i))
			best = i;
		for (j = i; j < len && j - i < 2; j++)
			if (s[j] != ' ' && s[j] != '-' && s[j] != '.' && s[j] != '(' && s[j] != ')')
				break;
		if (j == i || j >= len || !is_digit(s[j]))
			break;
		i = j;
	}
	return best;
}

static void scan_numbers(const uint8_t *s, size_t len, unsigned int dets, struct spans *sp)
{
	size_t i = 0, lo = 0;

	while (i < len) {
		size_t q, e = 0, r, rl;
		bool card, ssn, nanp, prefixed;
		unsigned int det = AG_DET_PHONE;
		uint8_t next;

		while (i < len && !is_digit(s[i]))
			i++;
		if (i == len)
			break;
		q = r = i;
		/* A run of digits from i (the scan skips whole runs: s[i - 1] is no digit). */
		while (r < len && is_digit(s[r]))
			r++;
		rl = r - i;
		next = r < len ? s[r] : 0;
		/* Most runs (dates, times, amounts) have no shape worth a closer look. */
		prefixed = (dets & AG_DET_PHONE) && i &&
			   (s[i - 1] == '+' || (s[i - 1] == '(' && rl == 3));
		card = (dets & AG_DET_CREDIT_CARD) && s[i] >= '2' && s[i] <= '6' &&
		       ((rl >= 13 && rl <= 19) ||
			(rl == 4 && (next == ' ' || next == '-') && digits_at(s, len, r + 1, 4)));
		ssn = (dets & AG_DET_SSN) && rl == 3 && next == '-';
		nanp = (dets & AG_DET_PHONE) &&
		       ((rl == 3 && (next == '-' || next == '.')) ||
			(rl == 1 && s[i] == '1' && (next == '-' || next == '.' || next == ' ')));
		if (prefixed && num_left_ok(s, i - 1, lo)) {
			q = i - 1;
			e = s[q] == '+' ? match_e164(s, len, q) : match_nanp(s, len, q);
		}
		if (!e && (card || ssn || nanp) && num_left_ok(s, i, lo)) {
			q = i;
			if (card && (e = match_card(s, len, i)))
				det = AG_DET_CREDIT_CARD;
			else if (ssn && (e = match_ssn(s, len, i)))
				det = AG_DET_SSN;
			else if (nanp)
				e = match_nanp(s, len, i);
		}
		if (e) {
			push(sp, q, e, det);
			i = lo = e;
			continue;
		}
		i = r;
	}
}

/* ---- JWT ---- */

static size_t b64u_run(const uint8_t *s, size_t len, size_t i)
{
	while (i < len && is(s[i], C_B64U))
		i++;
	return i;
}

/*
 * header.payload.signature, base64url, the header starting with eyJ ('{"'); the signature may
 * be empty (alg none); JWE's five segments are taken whole. A token glued to what precedes it
 * ("...KEY-----eyJ...") still starts at its first eyJ: were it skipped, its payload (eyJ too)
 * would pass for a header, and the real header and claims would go out.
 */
static void scan_jwts(const uint8_t *s, size_t len, struct spans *sp)
{
	size_t at = 0;
	const uint8_t *p;

	while ((p = find(s, len, at, "eyJ", 3, 2))) {
		size_t h = p - s, e1, e2, e;
		int nseg;

		/*
		 * A failed start fails for every later eyJ of the same run (same end, shorter
		 * header): the scan moves past the run, so eyJeyJ... stays linear.
		 */
		at = e1 = b64u_run(s, len, h);
		if (e1 - h < 8 || e1 >= len || s[e1] != '.')
			continue;
		e2 = b64u_run(s, len, e1 + 1);
		if (e2 - e1 - 1 < 2 || e2 >= len || s[e2] != '.')
			continue;
		e = b64u_run(s, len, e2 + 1);
		for (nseg = 3; nseg < 5 && e + 1 < len && s[e] == '.' && is(s[e + 1], C_B64U);
		     nseg++)
			e = b64u_run(s, len, e + 1);
		push(sp, h, e, AG_DET_JWT);
		at = e;
	}
}

/* ---- AWS keys ---- */

/* Access key ids: AKIA (long-term) or ASIA (temporary) and 16 more upper-case alnum. */
static void scan_aws_ids(const uint8_t *s, size_t len, struct spans *sp)
{
	size_t at = 0;
	const uint8_t *p;

	while (at + 20 <= len && (p = memchr(s + at, 'A', len - at - 19))) {
		size_t a = p - s, k;

		at = a + 1;
		if ((s[a + 1] != 'K' && s[a + 1] != 'S') || s[a + 2] != 'I' || s[a + 3] != 'A')
			continue;
		if (!word_left_ok(s, a))
			continue;
		for (k = 4; k < 20 && is(s[a + k], C_UPPER | C_DIGIT); k++)
			;
		if (k < 20 || (a + 20 < len && is(s[a + 20], C_WORD)))
			continue;
		push(sp, a, a + 20, AG_DET_AWS_KEY);
		at = a + 20;
	}
}

/* After "secret" at s[i]: "[_-]access[_-]key" or "[_-]key", any case. End of the label or 0. */
static size_t secret_label(const uint8_t *s, size_t len, size_t i)
{
	i += 6;
	if (i < len && (s[i] == '_' || s[i] == '-'))
		i++;
	if (word_eq(s + i, len - i, "access", 6)) {
		i += 6;
		if (i < len && (s[i] == '_' || s[i] == '-'))
			i++;
	}
	return word_eq(s + i, len - i, "key", 3) ? i + 3 : 0;
}

static size_t skip_quoting(const uint8_t *s, size_t len, size_t i)
{
	for (size_t n = 0; i < len && n < 8; i++, n++)
		if (s[i] != ' ' && s[i] != '\t' && s[i] != '"' && s[i] != '\'' && s[i] != '\\')
			break;
	return i;
}

/*
 * Secret access keys (40 base64 characters) have no prefix; they are taken only when labelled:
 * aws_secret_access_key = ..., "SecretAccessKey": "...", secret_key: ... Only the 40
 * characters are masked, the label stays.
 */
static void scan_aws_secrets(const uint8_t *s, size_t len, struct spans *sp)
{
	for (size_t i = 0; i + 6 <= len; i++) {
		size_t j, k;

		if ((s[i] | 0x20) != 's' || !word_eq(s + i + 1, len - i - 1, "ecret", 5))
			continue;
		j = secret_label(s, len, i);
		if (!j)
			continue;
		j = skip_quoting(s, len, j);
		if (j >= len || (s[j] != ':' && s[j] != '='))
			continue;
		j++;
		if (j < len && s[j] == '>')
			j++;
		j = skip_quoting(s, len, j);
		for (k = j; k < len && k - j < 40 && is(s[k], C_B64) && s[k] != '='; k++)
			;
		if (k - j < 40 || (k < len && is(s[k], C_B64)))
			continue;
		push(sp, j, k, AG_DET_AWS_KEY);
		i = k - 1;
	}
}

/* ---- PEM private keys ---- */

/* "-----BEGIN " or "-----END " (skip bytes) at s[i], a label naming a private key, "-----". */
static size_t pem_line(const uint8_t *s, size_t len, size_t i, size_t skip)
{
	size_t l = i + skip, j = l;

	while (j < len && j - l <= 64 && (is(s[j], C_UPPER | C_DIGIT) || s[j] == ' '))
		j++;
	if (len - j < 5 || memcmp(s + j, "-----", 5) || !memmem(s + l, j - l, "PRIVATE KEY", 11))
		return 0;
	return j + 5;
}

/* RFC 1421 headers of an encrypted key: "Proc-Type: 4,ENCRYPTED", "DEK-Info: AES-128-CBC,..." */
static size_t pem_header(const uint8_t *s, size_t len, size_t i)
{
	size_t j = i;

	if (!word_eq(s + i, len - i, "proc-type:", 10) && !word_eq(s + i, len - i, "dek-info:", 9))
		return i;
	while (j < len && j - i < 128 &&
	       (is(s[j], C_ALPHA | C_DIGIT) || s[j] == '-' || s[j] == ':' || s[j] == ',' ||
		s[j] == ' '))
		j++;
	return j;
}

/*
 * From the end of a BEGIN line: headers, the body (base64, spaces and line breaks, JSON's \n
 * escapes) up to and including the END line. A key cut short (substr()) is masked as far as
 * its body goes, without the line break or blank after it: never across a quote, a tab or a
 * comma, so a JSON text, a COPY row (tab-separated, one per line) or a CSV line keeps its shape.
 */
static size_t pem_block_end(const uint8_t *s, size_t len, size_t i)
{
	size_t start = i, h;

	while (i < len) {
		uint8_t c = s[i];

		if (c == '-' && len - i >= 9 && !memcmp(s + i, "-----END ", 9)) {
			size_t e = pem_line(s, len, i, 9);

			if (e)
				return e;
		}
		if ((c | 0x20) == 'p' || (c | 0x20) == 'd') {
			h = pem_header(s, len, i);
			if (h > i) {
				i = h;
				continue;
			}
		}
		if (is(c, C_B64) || c == ' ' || c == '\r' || c == '\n')
			i++;
		else if (c == '\\' && i + 1 < len &&
			 (s[i + 1] == 'n' || s[i + 1] == 'r' || s[i + 1] == 't'))
			i += 2;
		else
			break;
	}
	while (i > start && (s[i - 1] == ' ' || s[i - 1] == '\r' || s[i - 1] == '\n'))
		i--;
	return i;
}

static void scan_pem(const uint8_t *s, size_t len, struct spans *sp)
{
	size_t at = 0;
	const uint8_t *p;

	while ((p = find(s, len, at, "-----BEGIN ", 11, 5))) {
		size_t b = p - s, l, e;

		at = b + 1;
		l = pem_line(s, len, b, 11);
		if (!l)
			continue;
		e = pem_block_end(s, len, l);
		push(sp, b, e, AG_DET_PRIVATE_KEY);
		at = e;
	}
}

/* ---- detection ---- */

/* Internal: labelled AWS secrets, triggered apart from key ids. */
#define DET_AWS_SECRET (1u << 16)

typedef uint8_t v16u8 __attribute__((vector_size(16)));

static inline bool any16(v16u8 v)
{
	uint64_t w[2];

	memcpy(w, &v, sizeof(w));
	return w[0] | w[1];
}

/* The sum of the 16 bytes, in SWAR: pairs into 16-bit lanes, then the 4 lanes by a multiply. */
static inline size_t sum16(v16u8 v)
{
	const uint64_t lo = 0x00ff00ff00ff00ffULL;
	uint64_t w[2], x;

	memcpy(w, &v, sizeof(w));
	x = (w[0] & lo) + ((w[0] >> 8) & lo) + (w[1] & lo) + ((w[1] >> 8) & lo);
	return (x * 0x0001000100010001ULL) >> 48;
}

/*
 * The trigger bits (T_*) present in s, and its number of digits: the one pass every text value
 * pays for. 16 bytes at a time with GCC's generic vectors (SSE2, NEON).
 */
static unsigned int scan_triggers(const uint8_t *s, size_t len, size_t *ndigits)
{
	unsigned int f = 0;
	size_t nd = 0, i = 0;

	if (len >= 16) {
		v16u8 at = {}, dot = {}, j = {}, a = {}, dash = {}, es = {}, asg = {}, dg = {};
		unsigned int k = 0;

		for (; len - i >= 16; i += 16) {
			v16u8 v;

			memcpy(&v, s + i, sizeof(v));
			at |= (v16u8)(v == '@');
			dot |= (v16u8)(v == '.');
			j |= (v16u8)(v == 'J');
			a |= (v16u8)(v == 'A');
			dash |= (v16u8)(v == '-');
			es |= (v16u8)((v | 0x20) == 's');
			asg |= (v16u8)((v == ':') | (v == '='));
			dg -= (v16u8)((v16u8)(v - '0') < 10); /* a lane counts up to 255 */
			if (++k == 255) {
				nd += sum16(dg);
				dg = (v16u8){};
				k = 0;
			}
		}
		nd += sum16(dg);
		f = (any16(at) ? T_AT : 0) | (any16(dot) ? T_DOT : 0) | (any16(j) ? T_J : 0) |
		    (any16(a) ? T_A : 0) | (any16(dash) ? T_DASH : 0) | (any16(es) ? T_S : 0) |
		    (any16(asg) ? T_ASSIGN : 0);
	}
	/* Short values and the tail: by the table, cheaper than a vector's setup. */
	for (; i < len; i++) {
		f |= ctab[s[i]];
		nd += ctab[s[i]] & C_DIGIT;
	}
	*ndigits = nd;
	return f;
}

/* The detectors worth running on s: those whose trigger bytes are there (and enough digits). */
static unsigned int triggered(const uint8_t *s, size_t len, unsigned int dets)
{
	unsigned int run = 0, f;
	size_t nd;

	/*
	 * Under 8 bytes no detector but e-mail (6 bytes at least, with '@' and '.') can find
	 * anything: the short values that most documents are full of skip the scan.
	 */
	if (len < 8) {
		if (len < 6 || !(dets & AG_DET_EMAIL))
			return 0;
		return memchr(s, '@', len) && memchr(s, '.', len) ? AG_DET_EMAIL : 0;
	}
	f = scan_triggers(s, len, &nd);
	if ((f & T_AT) && (f & T_DOT) && len >= 6)
		run |= AG_DET_EMAIL;
	if (nd >= 13)
		run |= AG_DET_CREDIT_CARD;
	if (nd >= 9)
		run |= AG_DET_SSN;
	if (nd >= 8)
		run |= AG_DET_PHONE;
	if ((f & T_J) && (f & T_DOT) && len >= 12)
		run |= AG_DET_JWT;
	if ((f & T_A) && len >= 20)
		run |= AG_DET_AWS_KEY;
	if ((f & T_S) && (f & T_ASSIGN) && len >= 50 && (dets & AG_DET_AWS_KEY))
		run |= DET_AWS_SECRET;
	if ((f & T_DASH) && len >= 27)
		run |= AG_DET_PRIVATE_KEY;
	return run & (dets | DET_AWS_SECRET);
}

/* Runs the detectors in run (from triggered()); the spans come out sorted and disjoint. */
static int detect(const uint8_t *s, size_t len, unsigned int run, struct spans *sp)
{
	if (run & AG_DET_EMAIL)
		scan_emails(s, len, sp);
	if (run & (AG_DET_CREDIT_CARD | AG_DET_SSN | AG_DET_PHONE))
		scan_numbers(s, len, run, sp);
	if (run & AG_DET_JWT)
		scan_jwts(s, len, sp);
	if (run & AG_DET_AWS_KEY)
		scan_aws_ids(s, len, sp);
	if (run & DET_AWS_SECRET)
		scan_aws_secrets(s, len, sp);
	if (run & AG_DET_PRIVATE_KEY)
		scan_pem(s, len, sp);
	if (sp->err)
		return sp->err;
	spans_settle(sp);
	return 0;
}

/* ---- rendering ---- */

static const struct {
	const char *name;
	unsigned int det;
} detectors[] = {
	{ "email", AG_DET_EMAIL },
	{ "credit-card", AG_DET_CREDIT_CARD },
	{ "ssn", AG_DET_SSN },
	{ "phone", AG_DET_PHONE },
	{ "jwt", AG_DET_JWT },
	{ "aws-key", AG_DET_AWS_KEY },
	{ "private-key", AG_DET_PRIVATE_KEY },
};

#define ALL_DETECTORS                                                                              \
	(AG_DET_EMAIL | AG_DET_CREDIT_CARD | AG_DET_SSN | AG_DET_PHONE | AG_DET_JWT |              \
	 AG_DET_AWS_KEY | AG_DET_PRIVATE_KEY)

const char *ag_detector_name(enum ag_detector det)
{
	for (size_t i = 0; i < sizeof(detectors) / sizeof(detectors[0]); i++)
		if (detectors[i].det == (unsigned int)det)
			return detectors[i].name;
	return NULL;
}

static int put(struct ag_buf *o, const void *p, size_t n)
{
	return ag_buf_append(o, p, n);
}

static int put_str(struct ag_buf *o, const char *str)
{
	return ag_buf_append(o, str, strlen(str));
}

static int put_stars(struct ag_buf *o, size_t n)
{
	uint8_t *w;

	if (!n)
		return 0;
	w = ag_buf_reserve(o, n);
	if (!w)
		return -ENOMEM;
	memset(w, '*', n);
	ag_buf_commit(o, n);
	return 0;
}

/* The span with every digit but the last keep starred; separators and '+', '(' as they are. */
static int put_digits_kept(struct ag_buf *o, const uint8_t *v, size_t n, size_t keep)
{
	size_t nd = 0, k = 0;
	uint8_t *w;

	for (size_t i = 0; i < n; i++)
		nd += is_digit(v[i]);
	w = ag_buf_reserve(o, n);
	if (!w)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++)
		w[i] = is_digit(v[i]) && k++ + keep < nd ? '*' : v[i];
	ag_buf_commit(o, n);
	return 0;
}

static int put_hash(const struct ag_masker *m, struct ag_buf *o, const uint8_t *v, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	uint8_t md[EVP_MAX_MD_SIZE];
	char txt[2 + HASH_HEX];
	size_t mdlen = 0;
	EVP_MAC_CTX *c;
	int ok;

	/* A copy of the keyed template: the masker stays read-only, shared by threads. */
	c = EVP_MAC_CTX_dup(m->mac);
	if (!c)
		return -ENOMEM;
	ok = (!n || EVP_MAC_update(c, v, n)) && EVP_MAC_final(c, md, &mdlen, sizeof(md));
	EVP_MAC_CTX_free(c);
	if (!ok || mdlen < HASH_HEX / 2)
		return -EIO;
	txt[0] = 'h';
	txt[1] = ':';
	for (int i = 0; i < HASH_HEX / 2; i++) {
		txt[2 + 2 * i] = hex[md[i] >> 4];
		txt[3 + 2 * i] = hex[md[i] & 15];
	}
	return put(o, txt, sizeof(txt));
}

/* "[REDACTED:<name>]" for each detector, written with one append (AG_DET_* bit order). */
static const struct {
	const char *s;
	size_t n;
} redacted_marks[] = {
#define MARK(x) { "[REDACTED:" x "]", sizeof("[REDACTED:" x "]") - 1 }
	MARK("email"), MARK("credit-card"), MARK("ssn"),	   MARK("phone"),
	MARK("jwt"),   MARK("aws-key"),	    MARK("private-key"),
#undef MARK
};
_Static_assert(AG_DET_EMAIL == 1 && AG_DET_JWT == 1 << 4 && AG_DET_PRIVATE_KEY == 1 << 6,
	       "redacted_marks[] is in AG_DET_* bit order");

static int put_redacted(struct ag_buf *o, const uint8_t *v, size_t n, unsigned int det)
{
	unsigned int k = det ? __builtin_ctz(det) : 0;

	if (!det || det & (det - 1) || k >= sizeof(redacted_marks) / sizeof(redacted_marks[0]))
		return put(o, REDACTED, sizeof(REDACTED) - 1);
	if (det == AG_DET_JWT) {
		const uint8_t *dot = memchr(v, '.', n);
		int err = put(o, v, dot - v + 1); /* the header and its dot */

		if (err)
			return err;
	}
	return put(o, redacted_marks[k].s, redacted_marks[k].n);
}

static int put_partial(struct ag_buf *o, const uint8_t *v, size_t n, unsigned int det)
{
	const uint8_t *mark;
	size_t nd = 0;
	int err;

	switch (det) {
	case AG_DET_EMAIL:
		mark = memchr(v, '@', n);
		err = put(o, v, 1);
		if (!err)
			err = put_str(o, "***");
		return err ?: put(o, mark, v + n - mark);
	case AG_DET_CREDIT_CARD:
		return put_digits_kept(o, v, n, 4);
	case AG_DET_SSN:
		err = put_str(o, "***-**-");
		return err ?: put(o, v + 7, 4);
	case AG_DET_PHONE:
		for (size_t i = 0; i < n; i++)
			nd += is_digit(v[i]);
		return put_digits_kept(o, v, n, nd >= 10 ? 4 : 2);
	case AG_DET_JWT:
		mark = memchr(v, '.', n);
		err = put(o, v, mark - v);
		return err ?: put_str(o, ".***.***");
	case AG_DET_AWS_KEY:
		err = put(o, v, 4);
		return err ?: put_stars(o, n - 4);
	default:
		return put_redacted(o, v, n, det);
	}
}

/* Whole-value partial when no detector recognizes it: the last 4 characters (UTF-8) kept. */
static int put_partial_generic(struct ag_buf *o, const uint8_t *v, size_t n)
{
	size_t nchars = 0, tail = n, k = 0;
	int err;

	for (size_t i = 0; i < n; i++)
		nchars += (v[i] & 0xc0) != 0x80;
	if (nchars < PARTIAL_MIN)
		return put_stars(o, nchars);
	while (tail > 0 && k < 4)
		if ((v[--tail] & 0xc0) != 0x80)
			k++;
	err = put_stars(o, nchars - 4);
	return err ?: put(o, v + tail, n - tail);
}

/* ---- the masker ---- */

static char *star(void)
{
	return strdup("*");
}

/*
 * One dotted part: unquoted → lower-case glob; "Quoted" → the exact name, its glob characters
 * escaped ("" is a quote).
 */
static char *parse_part(const char *s, size_t n, int *flags)
{
	char *g, *w;

	if (!n)
		return NULL;
	g = malloc(2 * n + 1);
	if (!g)
		return NULL;
	w = g;
	if (s[0] == '"') {
		if (n < 3 || s[n - 1] != '"')
			goto bad;
		for (size_t i = 1; i + 1 < n; i++) {
			if (s[i] == '"' && (i + 2 >= n || s[++i] != '"'))
				goto bad; /* a quote inside is doubled */
			if (strchr("*?[]\\", s[i]))
				*w++ = '\\';
			*w++ = s[i];
		}
		*flags = 0;
	} else {
		for (size_t i = 0; i < n; i++) {
			if (s[i] == '"' || s[i] == ' ')
				goto bad;
			*w++ = s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i];
		}
		*flags = FNM_CASEFOLD;
	}
	*w = '\0';
	return g;
bad:
	free(g);
	errno = EINVAL;
	return NULL;
}

/* "col", "table.col", "schema.table.col"; missing parts are "*" (any schema, any table). */
static int parse_pattern(const char *pat, struct mask_pat *p)
{
	const char *parts[3], *start = pat, *c;
	size_t lens[3];
	int n = 0;
	bool quoted = false;

	for (c = pat;; c++) {
		if (*c == '"') {
			quoted = !quoted;
		} else if (!*c || (*c == '.' && !quoted)) {
			if (n == 3 || c == start)
				return -EINVAL;
			parts[n] = start;
			lens[n++] = c - start;
			if (!*c)
				break;
			start = c + 1;
		}
	}
	if (quoted)
		return -EINVAL;
	for (int k = 0; k < 3; k++) {
		int i = k - (3 - n);

		errno = ENOMEM;
		p->flags[k] = 0;
		p->glob[k] = i < 0 ? star() : parse_part(parts[i], lens[i], &p->flags[k]);
		if (!p->glob[k])
			return -errno;
	}
	return 0;
}

static void kv_items(const struct ag_kv *kv, char *const **items, size_t *n)
{
	if (kv->value) {
		*items = &kv->value;
		*n = 1;
	} else {
		*items = kv->list;
		*n = kv->list ? kv->nlist : 0;
	}
}

static int parse_mask(struct ag_masker *m, const struct ag_kv *mask, size_t nmask)
{
	const struct ag_kv *kv;
	char *const *items;
	size_t n;
	int err;

	kv = ag_kv_get(mask, nmask, "style");
	if (kv && kv->value) {
		static const char *const styles[] = { "redact", "partial", "hash", "null" };
		size_t i;

		for (i = 0; i < 4 && strcasecmp(kv->value, styles[i]); i++)
			;
		if (i == 4)
			return -EINVAL;
		m->style = (enum ag_mask_style)i;
	}
	kv = ag_kv_get(mask, nmask, "detectors");
	if (kv) {
		kv_items(kv, &items, &n);
		for (size_t i = 0; i < n; i++) {
			size_t d;

			for (d = 0; d < sizeof(detectors) / sizeof(detectors[0]); d++)
				if (!strcasecmp(items[i], detectors[d].name))
					break;
			if (d == sizeof(detectors) / sizeof(detectors[0]))
				return -EINVAL;
			m->detectors |= detectors[d].det;
		}
	}
	kv = ag_kv_get(mask, nmask, "columns");
	if (kv) {
		kv_items(kv, &items, &n);
		if (!n)
			return 0;
		m->pats = calloc(n, sizeof(*m->pats));
		for (int k = 0; k < 3; k++)
			m->part[k] = calloc(n, sizeof(char *));
		if (!m->pats || !m->part[0] || !m->part[1] || !m->part[2])
			return -ENOMEM;
		for (size_t i = 0; i < n; i++) {
			err = parse_pattern(items[i], &m->pats[i]);
			m->npats++;
			if (err)
				return err;
			for (int k = 0; k < 3; k++)
				m->part[k][i] = m->pats[i].glob[k];
		}
	}
	return 0;
}

static EVP_MAC_CTX *mac_new(const uint8_t *key, size_t keylen)
{
	OSSL_PARAM params[2];
	EVP_MAC_CTX *ctx = NULL;
	uint8_t rnd[32];
	EVP_MAC *mac;

	mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
	if (!mac)
		return NULL;
	ctx = EVP_MAC_CTX_new(mac);
	EVP_MAC_free(mac);
	if (!ctx)
		return NULL;
	if (!key || !keylen) {
		/* No key given: a random one, so hashes line up only within this masker. */
		if (RAND_bytes(rnd, sizeof(rnd)) != 1)
			goto err;
		key = rnd;
		keylen = sizeof(rnd);
	}
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
	params[1] = OSSL_PARAM_construct_end();
	if (!EVP_MAC_init(ctx, key, keylen, params))
		goto err;
	OPENSSL_cleanse(rnd, sizeof(rnd));
	return ctx;
err:
	OPENSSL_cleanse(rnd, sizeof(rnd));
	EVP_MAC_CTX_free(ctx);
	return NULL;
}

static uint64_t masker_ids;

uint64_t ag_masker_id(const struct ag_masker *m)
{
	return m ? m->id : 0;
}

struct ag_masker *ag_masker_new(const struct ag_kv *mask, size_t nmask, const uint8_t *key,
				size_t keylen)
{
	struct ag_masker *m = calloc(1, sizeof(*m));
	int err;

	if (!m)
		return NULL;
	m->id = __atomic_add_fetch(&masker_ids, 1, __ATOMIC_RELAXED);
	m->style = AG_MASK_REDACT;
	if (mask && nmask) {
		err = parse_mask(m, mask, nmask);
		if (err)
			goto err;
	}
	m->active = m->npats || m->detectors;
	if (m->active && m->style == AG_MASK_HASH) {
		m->mac = mac_new(key, keylen);
		if (!m->mac) {
			err = -EIO;
			goto err;
		}
	}
	return m;
err:
	ag_masker_free(m);
	errno = -err;
	return NULL;
}

void ag_masker_free(struct ag_masker *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->npats; i++)
		for (int k = 0; k < 3; k++)
			free(m->pats[i].glob[k]);
	free(m->pats);
	for (int k = 0; k < 3; k++)
		free(m->part[k]);
	EVP_MAC_CTX_free(m->mac);
	free(m);
}

bool ag_masker_active(const struct ag_masker *m)
{
	return m && m->active;
}

enum ag_mask_style ag_masker_style(const struct ag_masker *m)
{
	return m ? m->style : AG_MASK_REDACT;
}

unsigned int ag_masker_detectors(const struct ag_masker *m)
{
	return m && m->active ? m->detectors : 0;
}

bool ag_masker_column(const struct ag_masker *m, const char *schema, const char *table,
		      const char *column)
{
	if (!m || !table || !column)
		return false;
	if (!schema || !*schema)
		schema = "public";
	for (size_t i = 0; i < m->npats; i++) {
		const struct mask_pat *p = &m->pats[i];

		if (!fnmatch(p->glob[2], column, p->flags[2]) &&
		    !fnmatch(p->glob[1], table, p->flags[1]) &&
		    !fnmatch(p->glob[0], schema, p->flags[0]))
			return true;
	}
	return false;
}

size_t ag_masker_patterns(const struct ag_masker *m, const char *const **schemas,
			  const char *const **tables, const char *const **columns)
{
	if (!m || !m->npats) {
		*schemas = *tables = *columns = NULL;
		return 0;
	}
	*schemas = (const char *const *)m->part[0];
	*tables = (const char *const *)m->part[1];
	*columns = (const char *const *)m->part[2];
	return m->npats;
}

char *ag_masker_columns_key(const struct ag_masker *m)
{
	char *key = NULL;
	size_t len = 0;
	FILE *f;

	if (!m || !m->npats)
		return NULL;
	f = open_memstream(&key, &len);
	if (!f)
		return NULL;
	for (size_t i = 0; i < m->npats; i++)
		for (int k = 0; k < 3; k++)
			fprintf(f, "%c%s%c", m->pats[i].flags[k] & FNM_CASEFOLD ? 'i' : 'e',
				m->pats[i].glob[k], k == 2 ? '\x1e' : '\x1f');
	if (fclose(f)) {
		free(key);
		return NULL;
	}
	return key;
}

static int mask_whole(const struct ag_masker *m, const uint8_t *val, size_t len, struct ag_buf *out)
{
	struct spans sp;
	int err;

	switch (m->style) {
	case AG_MASK_HASH:
		return put_hash(m, out, val, len);
	case AG_MASK_PARTIAL:
		/* A value that is exactly one detection gets that detector's hint. */
		spans_init(&sp);
		err = detect(val, len, triggered(val, len, ALL_DETECTORS), &sp);
		if (!err && sp.n == 1 && sp.v[0].start == 0 && sp.v[0].end == len && sp.v[0].det)
			err = put_partial(out, val, len, sp.v[0].det);
		else if (!err)
			err = put_partial_generic(out, val, len);
		spans_free(&sp);
		return err;
	default:
		return put_str(out, REDACTED);
	}
}

/* Writes val with the spans replaced, each in the masker's style, to out. */
static int render(const struct ag_masker *m, const uint8_t *val, size_t len, const struct spans *sp,
		  struct ag_buf *out)
{
	size_t pos = 0;
	int err = 0;

	for (size_t i = 0; !err && i < sp->n; i++) {
		const struct span *s = &sp->v[i];
		const uint8_t *v = val + s->start;
		size_t n = s->end - s->start;

		err = put(out, val + pos, s->start - pos);
		if (err)
			break;
		if (m->style == AG_MASK_HASH)
			err = put_hash(m, out, v, n);
		else if (m->style == AG_MASK_PARTIAL)
			err = put_partial(out, v, n, s->det);
		else
			err = put_redacted(out, v, n, s->det);
		pos = s->end;
	}
	return err ?: put(out, val + pos, len - pos);
}

/*
 * A detection can hide its neighbour: in "<jwt>+14155552671" the '+' is glued to the JWT and
 * starts no phone number, until the JWT is masked. So the value is scanned again with every
 * detection so far replaced by one PROBE_MARK byte (a boundary to every detector, as a
 * "[REDACTED]" is), up to MAX_PASSES times, and the new detections are mapped back to the
 * value. Whatever the style, what the agent gets then holds nothing a detector finds.
 */
#define PROBE_MARK 0x01
#define MAX_PASSES 4

static int rescan(const struct ag_masker *m, const uint8_t *val, size_t len, struct spans *all)
{
	/* One probe buffer per thread (the masker is shared, read-only): no malloc per value. */
	static __thread struct ag_buf probe;
	struct spans sp;
	int err = 0;

	spans_init(&sp);
	for (int pass = 1; pass < MAX_PASSES; pass++) {
		static const uint8_t mark = PROBE_MARK;
		size_t pos = 0, k = 0, shift = 0, n0 = all->n;
		unsigned int run;

		probe.start = probe.end = 0;
		for (size_t i = 0; !err && i < all->n; i++) {
			err = put(&probe, val + pos, all->v[i].start - pos);
			if (!err)
				err = put(&probe, &mark, 1);
			pos = all->v[i].end;
		}
		if (!err)
			err = put(&probe, val + pos, len - pos);
		if (err)
			break;
		run = triggered(ag_buf_head(&probe), ag_buf_len(&probe), m->detectors);
		sp.n = 0;
		if (run)
			err = detect(ag_buf_head(&probe), ag_buf_len(&probe), run, &sp);
		if (err || !sp.n)
			break;
		/* Back to the value: past each mark before it, a probe offset moves by len - 1. */
		for (size_t i = 0; i < sp.n; i++) {
			size_t start = sp.v[i].start, end = sp.v[i].end, ks, es;

			for (; k < n0 && all->v[k].start - shift < start; k++)
				shift += all->v[k].end - all->v[k].start - 1;
			ks = k;
			es = shift;
			for (; ks < n0 && all->v[ks].start - es < end; ks++)
				es += all->v[ks].end - all->v[ks].start - 1;
			push(all, start + shift, end + es, sp.v[i].det);
		}
		if (all->err) {
			err = all->err;
			break;
		}
		spans_settle(all);
	}
	if (probe.cap > (64u << 10))
		ag_buf_free(&probe); /* a huge value's: not kept */
	spans_free(&sp);
	return err;
}

/* Detections inside text, replaced; returns how many, or <0. */
static int mask_text(const struct ag_masker *m, unsigned int run, const uint8_t *val, size_t len,
		     struct ag_buf *out)
{
	size_t before = ag_buf_len(out), n = 0;
	struct spans sp;
	int err;

	spans_init(&sp);
	err = detect(val, len, run, &sp);
	if (!err && sp.n)
		err = rescan(m, val, len, &sp);
	if (!err && sp.n)
		err = render(m, val, len, &sp, out);
	n = sp.n;
	spans_free(&sp);
	if (err) {
		out->end = out->start + before;
		return err;
	}
	return n > INT_MAX ? INT_MAX : (int)n;
}

/*
 * A typed value that holds a detection (a card cast to int8, a record with an e-mail inside
 * in binary) cannot take replacement text and still parse: the whole value becomes NULL.
 */
static int mask_typed(unsigned int run, const uint8_t *val, size_t len, bool *is_null)
{
	struct spans sp;
	int err;

	spans_init(&sp);
	err = detect(val, len, run, &sp);
	spans_free(&sp);
	if (err || !sp.n)
		return err;
	if (!is_null)
		return -EINVAL;
	*is_null = true;
	return sp.n > INT_MAX ? INT_MAX : (int)sp.n;
}

int ag_mask_value(const struct ag_masker *m, bool whole, enum ag_mask_kind kind, const uint8_t *val,
		  size_t len, struct ag_buf *out, bool *is_null)
{
	size_t before;
	int err;

	if (is_null)
		*is_null = false;
	if (!m || !m->active)
		return 0;
	if ((!val && len) || !out)
		return -EINVAL;
	if (!whole) {
		unsigned int run = m->detectors ? triggered(val, len, m->detectors) : 0;

		if (!run)
			return 0;
		if (kind == AG_MASK_TYPED)
			return mask_typed(run, val, len, is_null);
		return mask_text(m, run, val, len, out);
	}
	if (kind == AG_MASK_TYPED || m->style == AG_MASK_NULL) {
		if (!is_null)
			return -EINVAL;
		*is_null = true;
		return 1;
	}
	before = ag_buf_len(out);
	err = mask_whole(m, val, len, out);
	if (err) {
		out->end = out->start + before;
		return err;
	}
	return 1;
}
