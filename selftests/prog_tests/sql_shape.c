// SPDX-License-Identifier: GPL-2.0
/*
 * The shape cache behind ag_sql_classify (userspace/sql_shape.c): the same statement with other
 * constants is answered from it, with the same classes, tables and statement offsets as a full
 * parse gives; a classification that read a constant (set_config('role', ...), EXPLAIN
 * (ANALYZE 'off')) is never shared; and no quoting, comment or escape trick makes a dangerous
 * statement take a benign statement's entry (a table of hostile pairs, each checked against a
 * parse of its own).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sql.h"
#include "sql_shape.h"
#include "../test_progs.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

static bool str_eq(const char *a, const char *b)
{
	return a == b || (a && b && !strcmp(a, b));
}

/* Every field a caller reads: classes, tables, WHERE, names, offsets. */
static bool same_result(const struct ag_sql_result *a, const struct ag_sql_result *b)
{
	if (a->nstmts != b->nstmts || !str_eq(a->error, b->error))
		return false;
	for (size_t i = 0; i < a->nstmts; i++) {
		const struct ag_sql_stmt *x = &a->stmts[i], *y = &b->stmts[i];

		if (x->classes != y->classes || x->where_absent != y->where_absent ||
		    x->ntables != y->ntables || x->location != y->location ||
		    x->length != y->length || !str_eq(x->execute_name, y->execute_name) ||
		    !str_eq(x->prepare_name, y->prepare_name))
			return false;
		for (size_t k = 0; k < x->ntables; k++)
			if (strcmp(x->tables[k], y->tables[k]))
				return false;
	}
	return true;
}

static uint64_t shape_hits(void)
{
	uint64_t h, m;

	ag_sql_shape_stats(&h, &m);
	return h;
}

/* sql through the caches equals its own full parse; *hit says whether the shape cache answered. */
static bool classify_checked(const char *sql, struct ag_sql_result *r, bool *hit)
{
	struct ag_sql_result u;
	uint64_t h0 = shape_hits();
	int ret, uret;
	bool same;

	ret = ag_sql_classify(sql, r);
	*hit = shape_hits() != h0;
	uret = ag_sql_classify_uncached(sql, &u);
	same = ret == uret && same_result(r, &u);
	if (!same)
		fprintf(stderr, "  differs from its own parse: %s\n", sql);
	ag_sql_result_free(&u);
	return same;
}

struct same_shape {
	const char *name;
	const char *first, *second;
};

/* clang-format off */
static const struct same_shape hits[] = {
	{ "pgbench_select",
	  "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
	  "SELECT abalance FROM pgbench_accounts WHERE aid = 7;" },
	{ "pgbench_update",
	  "UPDATE pgbench_accounts SET abalance = abalance + -4000 WHERE aid = 9;",
	  "UPDATE pgbench_accounts SET abalance = abalance + -17 WHERE aid = 123456;" },
	{ "every_constant_kind",
	  "INSERT INTO t VALUES (1, 1.5, 'a', E'\\n', $$d$$, U&'\\0041', B'101', X'ff')",
	  "INSERT INTO t VALUES (22222, 3e10, 'bb''c', E'\\'', $q$x;y$q$, U&'x', B'0', X'a0b1')" },
	{ "comments_do_not_count",
	  "SELECT a /* one */ FROM t WHERE b = 'x' -- two",
	  "SELECT a /* three /* nested */ */ FROM t WHERE b = 'yy'" },
	{ "offsets_of_statements",
	  "SELECT 1; DELETE FROM t WHERE id = 5; SELECT 'x'",
	  "SELECT 123456; DELETE FROM t WHERE id = 987654321; SELECT 'yyyy'" },
	{ "do_body_is_a_constant",
	  "DO $$ BEGIN PERFORM 1; END $$",
	  "DO $$ BEGIN DROP TABLE x; END $$" },
};

struct hostile {
	const char *name;
	const char *benign, *hostile;
	bool differs; /* the two classify differently (else: they must still not share an entry) */
};

static const struct hostile pairs[] = {
	/* the classifier reads these constants: never shared */
	{ "set_config_role", "SELECT set_config('work_mem', '1MB', false)",
	  "SELECT set_config('role', 'admin', false)", true },
	{ "set_config_session_authorization", "SELECT set_config('search_path', 'a', true)",
	  "SELECT set_config('session_authorization', 'postgres', true)", true },
	{ "explain_analyze_string", "EXPLAIN (ANALYZE 'off') DELETE FROM t",
	  "EXPLAIN (ANALYZE 'on') DELETE FROM t", true },
	{ "explain_analyze_integer", "EXPLAIN (ANALYZE 0) DELETE FROM t",
	  "EXPLAIN (ANALYZE 1) DELETE FROM t", true },
	/* what a literal-stripping tokenizer would get wrong: PostgreSQL's lexer decides */
	{ "e_string_backslash_quote", "SELECT E'a\\' , 1; DELETE FROM t; --'",
	  "SELECT 'a\\' , 1; DELETE FROM t; --'", true },
	{ "dollar_quote_hides_statement", "SELECT $$ ; DELETE FROM t ; $$",
	  "SELECT $$x$$ ; DELETE FROM t ; SELECT $$ $$", true },
	{ "dollar_tag_mismatch", "SELECT $a$ $b$; DELETE FROM t; $b$ $a$",
	  "SELECT $a$ $b$ $a$; DELETE FROM t; SELECT $b$ $b$", true },
	{ "nested_comment", "SELECT 1 /* /* */ ; DELETE FROM t; */",
	  "SELECT 1 /* */ ; DELETE FROM t; /* */", true },
	{ "line_comment_end", "SELECT 1 -- ; DELETE FROM t",
	  "SELECT 1 -- x\n; DELETE FROM t", true },
	{ "uescape_changes_identifier", "SELECT * FROM U&\"d!0061ta\" UESCAPE '#'",
	  "SELECT * FROM U&\"d!0061ta\" UESCAPE '!'", true },
	{ "identifier_vs_string", "SELECT 'lo_import'", "SELECT \"lo_import\"", false },
	{ "quoted_function_name", "SELECT \"upper\"('/etc/passwd')",
	  "SELECT \"lo_import\"('/etc/passwd')", true },
	{ "case_of_identifier", "SELECT * FROM \"Secret\" WHERE a = 1",
	  "SELECT * FROM \"secret\" WHERE a = 2", true },
	{ "copy_file_vs_program", "COPY t TO '/tmp/x'", "COPY t TO PROGRAM 'rm -rf /tmp/x'", true },
	{ "param_vs_constant", "PREPARE p AS SELECT * FROM t WHERE a = $1",
	  "PREPARE p AS SELECT * FROM t WHERE a = 1", false },
	{ "standard_string_continuation", "SELECT 'a'\n'b' FROM t",
	  "SELECT 'a' FROM t\n; DELETE FROM t", true },
	{ "negative_number_vs_operator", "SELECT * FROM t WHERE a = -1",
	  "SELECT * FROM t WHERE a = - - 1", false },
};
/* clang-format on */

static void run_hit(const struct same_shape *c)
{
	struct ag_sql_result a, b;
	bool hit;

	ag_sql_cache_flush();
	if (!ASSERT_TRUE(classify_checked(c->first, &a, &hit), "first as its parse"))
		goto out_a;
	ASSERT_FALSE(hit, "first: no shape yet");
	if (ASSERT_TRUE(classify_checked(c->second, &b, &hit), "second as its parse")) {
		ASSERT_TRUE(hit, "second: a shape hit");
		ASSERT_EQ(b.fingerprint, 0, "no fingerprint from the shape");
		ASSERT_FALSE(b.literal_read, "literal-free");
	}
	ag_sql_result_free(&b);
out_a:
	ag_sql_result_free(&a);
	ag_sql_cache_flush();
}

static void run_pair(const struct hostile *c)
{
	struct ag_sql_result a, b;
	bool hit;

	ag_sql_cache_flush();
	/* The benign statement twice, with its shape as warm as it gets. */
	ASSERT_TRUE(classify_checked(c->benign, &a, &hit), "benign as its parse");
	ag_sql_result_free(&a);
	ag_sql_cache_flush();
	ag_sql_classify(c->benign, &a);
	if (ASSERT_TRUE(classify_checked(c->hostile, &b, &hit), "hostile as its own parse")) {
		ASSERT_FALSE(hit, "hostile never takes the benign entry");
		if (c->differs)
			ASSERT_FALSE(same_result(&a, &b), "the pair classifies differently");
	}
	ag_sql_result_free(&a);
	ag_sql_result_free(&b);
	ag_sql_cache_flush();
}

/* Which classifications say they read a constant. */
static void subtest_literal_read(void)
{
	static const struct {
		const char *sql;
		bool read;
	} c[] = {
		{ "SELECT abalance FROM pgbench_accounts WHERE aid = 1", false },
		{ "SELECT upper('x'), t.a.b FROM t", false },
		{ "SELECT set_config('work_mem', '1MB', false)", true },
		{ "SELECT set_config(current_setting('x'), '1MB', false)", false },
		{ "EXPLAIN (ANALYZE false) SELECT 1", true },
		{ "EXPLAIN (ANALYZE) SELECT 1", false },
		{ "DO $$ BEGIN END $$", false },
		{ "COPY t TO '/tmp/x'", true },
	};
	struct ag_sql_result r;

	for (size_t i = 0; i < N_ELEMS(c); i++) {
		if (ASSERT_OK(ag_sql_classify_uncached(c[i].sql, &r), c[i].sql))
			ASSERT_EQ(r.literal_read, c[i].read, c[i].sql);
		ag_sql_result_free(&r);
	}
}

/* A shape hit is put in the text cache too; the text's fingerprint is its own parse's. */
static void subtest_fingerprint(void)
{
	const char *a = "SELECT * FROM users WHERE id = 1", *b = "SELECT * FROM users WHERE id = 2";
	struct ag_sql_result r;
	uint64_t want, got, h, m;

	ag_sql_cache_flush();
	want = ag_sql_fingerprint(b);
	ag_sql_cache_flush();
	ag_sql_classify(a, &r);
	ag_sql_result_free(&r);
	ag_sql_classify(b, &r);
	ag_sql_result_free(&r);
	ag_sql_shape_stats(&h, &m);
	ASSERT_EQ(h, 1, "b was a shape hit");
	got = ag_sql_fingerprint(b);
	ASSERT_NEQ(got, 0, "set");
	ASSERT_EQ(got, want, "the text's own fingerprint");
	ag_sql_cache_flush();
}

/* Not keyed: over the bound, unscannable, UESCAPE. Each is classified by its text alone. */
static void subtest_not_keyed(void)
{
	static char big[AG_SQL_SHAPE_MAX_TEXT + 64];
	const char *c[] = { "SELECT 'unterminated", "SELECT U&\"a!0061\" UESCAPE '!'", big };
	struct ag_sql_result r;
	uint64_t h, m;

	snprintf(big, sizeof(big), "SELECT %0*d", AG_SQL_SHAPE_MAX_TEXT, 1);
	ag_sql_cache_flush();
	for (size_t i = 0; i < N_ELEMS(c); i++) {
		ag_sql_classify(c[i], &r);
		ag_sql_result_free(&r);
	}
	ag_sql_shape_stats(&h, &m);
	ASSERT_EQ(h + m, 0, "never looked up by shape");
	ag_sql_cache_flush();
}

/*
 * Keys are remembered by text (classify, then the RowDescription's origin analysis): a key
 * from the memo is the key a fresh scan gives, for the same text only, whatever ran between.
 */
static void subtest_key_memo(void)
{
	const char *t[] = { "SELECT a FROM t WHERE id = 1", "SELECT a FROM t WHERE id = 2",
			    "SELECT b FROM t WHERE id = 1", "DELETE FROM t WHERE id = 1",
			    "SELECT a FROM t WHERE id = 1 -- x" };
	char *fresh[N_ELEMS(t)] = { 0 }, *k;
	size_t flen[N_ELEMS(t)] = { 0 }, klen;
	struct ag_sql_result r;

	for (size_t i = 0; i < N_ELEMS(t); i++) {
		ag_sql_cache_flush();
		ASSERT_OK(ag_sql_shape_key(t[i], strlen(t[i]), &fresh[i], &flen[i]), t[i]);
	}
	ag_sql_cache_flush();
	for (int round = 0; round < 2; round++) {
		for (size_t i = 0; i < N_ELEMS(t); i++) {
			if (round == 0) {
				ag_sql_classify(t[i], &r);
				ag_sql_result_free(&r);
			}
			for (size_t j = 0; j < N_ELEMS(t); j++) {
				if (!ASSERT_OK(ag_sql_shape_key(t[j], strlen(t[j]), &k, &klen), t[j]))
					continue;
				ASSERT_TRUE(klen == flen[j] && !memcmp(k, fresh[j], klen), t[j]);
				free(k);
			}
		}
	}
	ASSERT_TRUE(flen[0] == flen[1] && !memcmp(fresh[0], fresh[1], flen[0]),
		    "one shape for two literals");
	ASSERT_FALSE(flen[0] == flen[2] && !memcmp(fresh[0], fresh[2], flen[0]),
		     "another column, another key");
	for (size_t i = 0; i < N_ELEMS(t); i++)
		free(fresh[i]);
	ag_sql_cache_flush();
}

void test_sql_shape(void)
{
	char name[96];

	for (size_t i = 0; i < N_ELEMS(hits); i++) {
		snprintf(name, sizeof(name), "hit_%s", hits[i].name);
		if (test__start_subtest(name))
			run_hit(&hits[i]);
	}
	for (size_t i = 0; i < N_ELEMS(pairs); i++) {
		snprintf(name, sizeof(name), "hostile_%s", pairs[i].name);
		if (test__start_subtest(name))
			run_pair(&pairs[i]);
	}
	if (test__start_subtest("literal_read"))
		subtest_literal_read();
	if (test__start_subtest("fingerprint_of_shape_hit"))
		subtest_fingerprint();
	if (test__start_subtest("not_keyed"))
		subtest_not_keyed();
	if (test__start_subtest("key_memo_same_as_scan"))
		subtest_key_memo();
	ag_sql_cache_flush();
}
