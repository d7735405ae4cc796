/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Origin analysis of a statement's result columns, for masking: which output positions are
 * computed from a column a mask's column rules cover (reverse(email), email::bytea,
 * string_agg(email, ','), row_to_json(u), a scalar subquery, a CTE, RETURNING email, ...).
 * The server reports an origin (table OID, attnum) only for plain column references; anything
 * computed comes with table OID 0 and would otherwise meet only the value detectors. The
 * analysis reads libpg_query's parse tree and is conservative: a column name a rule covers in
 * any table the statement reads, a whole-row reference of such a table, or a name some inner
 * query computed from one, anywhere in an output expression, makes that output derived.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "mask.h"
#include "pgmask.h"

struct sql_origin;

/*
 * Analyses sql (all of its statements; positions are merged, a superset) against the masker's
 * column rules and the resolved catalog. *out NULL when no output is derived (the common case);
 * 0, or -ENOMEM. A statement that does not parse yields NULL (the server refuses it too).
 */
int sql_origin_analyze(const char *sql, const struct ag_masker *m, const struct pg_catalog *cat,
		       struct sql_origin **out);
/*
 * Does a statement of sql store a value computed from a masked column (an INSERT's rows, an
 * UPDATE's or MERGE's assignments, CREATE TABLE AS, SELECT INTO), where the agent could read it
 * back from a column no rule covers? 1 (*kind: "INSERT", ...), 0, or -ENOMEM. Conservative as
 * the rest: a covered column's name anywhere in those values counts, a WHERE inside an
 * INSERT's query too.
 */
int sql_origin_stores_masked(const char *sql, const struct ag_masker *m,
			     const struct pg_catalog *cat, const char **kind);
struct sql_origin *sql_origin_ref(struct sql_origin *o);
void sql_origin_unref(struct sql_origin *o);
/* Is output column pos (its RowDescription origin table OID: table) derived? o may be NULL. */
bool sql_origin_derived(const struct sql_origin *o, unsigned int pos, uint32_t table);
