/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Masking of values the agent receives: by column (rules such as "users.email", "*.ssn",
 * "public.users.*"; matched against a column's origin table and name) and by value detectors
 * that catch derived values wherever they appear (email, credit card with a Luhn check, SSN,
 * phone, JWT, AWS keys, PEM private keys). Styles: redact, partial (a hint kept, e.g. the last
 * 4 digits), hash (keyed HMAC-SHA-256, deterministic so joins still line up), null.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "policy.h"

enum ag_mask_style { AG_MASK_REDACT = 0, AG_MASK_PARTIAL, AG_MASK_HASH, AG_MASK_NULL };

enum ag_detector {
	AG_DET_EMAIL = 1 << 0,
	AG_DET_CREDIT_CARD = 1 << 1,
	AG_DET_SSN = 1 << 2,
	AG_DET_PHONE = 1 << 3,
	AG_DET_JWT = 1 << 4,
	AG_DET_AWS_KEY = 1 << 5,
	AG_DET_PRIVATE_KEY = 1 << 6,
};

struct ag_masker;

/*
 * From a rule's mask: mapping (columns, detectors, style); NULL mask → a masker that masks
 * nothing (ag_masker_active() false). key: the HMAC key for the hash style (none: a random
 * one, so hashes line up only within this masker). NULL with errno EINVAL for an unknown
 * detector or style or a bad column pattern, ENOMEM, EIO (OpenSSL).
 */
struct ag_masker *ag_masker_new(const struct ag_kv *mask, size_t nmask, const uint8_t *key,
				size_t keylen);
void ag_masker_free(struct ag_masker *m);
/*
 * This masker's number, unique for the daemon's life (never reused, as its address may be once
 * it is freed): for caches of what was worked out against a masker. 0 for NULL.
 */
uint64_t ag_masker_id(const struct ag_masker *m);
bool ag_masker_active(const struct ag_masker *m);
/* The rule's style (redact when absent) and detectors (AG_DET_* bits; 0 when inactive). */
enum ag_mask_style ag_masker_style(const struct ag_masker *m);
unsigned int ag_masker_detectors(const struct ag_masker *m);
/* "email", "credit-card", ... as in policies; NULL for anything but one AG_DET_* bit. */
const char *ag_detector_name(enum ag_detector det);
/*
 * Does a column rule cover (schema, table, column)? schema may be NULL ("public" assumed).
 * Patterns: "col", "table.col", "schema.table.col", each part an fnmatch() glob; a missing
 * schema or table is "*" (users.email covers users in any schema). Unquoted parts match
 * case-insensitively, "Quoted" ones exactly.
 */
bool ag_masker_column(const struct ag_masker *m, const char *schema, const char *table,
		      const char *column);

/*
 * What the column rules look like, for the catalog query that resolves them: each pattern as
 * (schema glob, table glob, column glob), "*" for any. Returns the count. Unquoted parts come
 * lower-case; a quoted part is its exact name with glob characters backslash-escaped. The
 * arrays belong to the masker.
 */
size_t ag_masker_patterns(const struct ag_masker *m, const char *const **schemas,
			  const char *const **tables, const char *const **columns);
/*
 * The column rules exactly (each glob with how it matches: what ag_masker_column() answers
 * depends on nothing else), as a string: equal for two maskers that cover the same columns.
 * NULL without column rules or memory. Caller frees.
 */
char *ag_masker_columns_key(const struct ag_masker *m);

enum ag_mask_kind {
	AG_MASK_TEXT = 0, /* a text value: any replacement text is valid */
	AG_MASK_TYPED,	  /* a typed text value (int, date, uuid, ...): only NULL keeps it valid */
};

/*
 * Masks one value. whole: the column is covered by a column rule (mask all of it); otherwise
 * only what the detectors find is replaced, inside the text. On a change returns the number of
 * masked values (>0) and puts the new value in out (or sets *is_null); 0: leave it as it is.
 * The new value is appended at out's end (out is untouched on 0, on NULL and on error).
 * Negative errno on failure (-ENOMEM, -EIO from OpenSSL): the value must not go out as it is.
 * A typed value becomes NULL when whole or when a detector finds something in it (no other
 * replacement would parse); so does a whole value under the null style. Markers and styles:
 * see mask.c. A masker is read-only here, so threads may share one.
 */
int ag_mask_value(const struct ag_masker *m, bool whole, enum ag_mask_kind kind,
		  const uint8_t *val, size_t len, struct ag_buf *out, bool *is_null);
