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
	/* the quick key (no scan): a doubled quote is inside the constant, so is what follows */
	{ "quick_doubled_quote_is_one_constant",
	  "SELECT 'a''b', 1 FROM t",
	  "SELECT 'a'';DELETE FROM t;--', 2 FROM t" },
	{ "quick_semicolon_in_string",
	  "SELECT 'x' FROM t WHERE a = 1; SELECT 2",
	  "SELECT ';DELETE FROM t;' FROM t WHERE a = 22; SELECT 33" },
	{ "quick_string_continuation",
	  "SELECT 'a'\n'b' FROM t",
	  "SELECT 'c;'\n';d' FROM t" },
	{ "quick_int32_bound",
	  "SELECT * FROM t WHERE a = 2147483647",
	  "SELECT * FROM t WHERE a = 0000000000000000000001" },
	{ "quick_bigint_is_fconst",
	  "SELECT * FROM t WHERE a = 2147483648",
	  "SELECT * FROM t WHERE a = 12.5" },
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
	/* a quick-keyed benign text, and a disguise the quick path must leave to the scanner */
	{ "quick_e_prefix", "SELECT 'a', 1 FROM t",
	  "SELECT E'a\\', 1 FROM t; DELETE FROM t; --', 1 FROM t", false },
	{ "quick_backslash_in_string", "SELECT 'a', 1 FROM t",
	  "SELECT 'a\\', 1 FROM t", false },
	{ "quick_unicode_prefix", "SELECT x & 'a' FROM t", "SELECT U&'a' FROM t", false },
	{ "quick_line_comment", "SELECT 1 - 1 FROM t; DELETE FROM t WHERE a = 1",
	  "SELECT 1 --1 FROM t; DELETE FROM t WHERE a = 1\n", true },
	{ "quick_block_comment", "SELECT 1 / 1; DELETE FROM t WHERE a = 1",
	  "SELECT 1 /*1; DELETE FROM t WHERE a = 1*/", true },
	{ "quick_quotes_in_block_comment", "SELECT 1 /* 'x' */; SELECT 2",
	  "SELECT 1 /* ' */; DELETE FROM t; /* ' */; SELECT 2", true },
	{ "quick_quote_in_line_comment", "SELECT 1 -- 'x'\n; SELECT 2",
	  "SELECT 1 -- '\n; DELETE FROM t; -- '\n; SELECT 2", true },
	{ "quick_dollar_quote", "SELECT 1, 1; DELETE FROM t WHERE a = 1",
	  "SELECT 1, $$; DELETE FROM t WHERE a = 1$$", true },
	{ "quick_quoted_identifier", "SELECT 'x' FROM t WHERE a = 1",
	  "SELECT \"x\" FROM t WHERE a = 1", false },
	{ "quick_exponent", "SELECT * FROM t WHERE a = 1", "SELECT * FROM t WHERE a = 1e1", false },
	{ "quick_leading_dot", "SELECT * FROM t WHERE a = 1", "SELECT * FROM t WHERE a = .1",
	  false },
	{ "quick_trailing_junk", "SELECT 1 FROM t", "SELECT 1from t", false },
	{ "quick_non_ascii", "SELECT 'x' FROM t", "SELECT '\xc3\xa9' FROM t", false },
	{ "quick_param", "SELECT * FROM t WHERE a = 1", "SELECT * FROM t WHERE a = $1", false },
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

static bool quick_keyed(const char *sql)
{
	char *k;
	size_t klen;
	bool quick;

	if (ag_sql_shape_key(sql, strlen(sql), &k, &klen))
		return false;
	quick = klen >= 4 && !memcmp(k, "\xff\xff\xff\xff", 4);
	free(k);
	return quick;
}

/* Which texts the quick path keys (no scan) and which it leaves to the scanner. */
static void subtest_quick_keyed(void)
{
	static const struct {
		const char *sql;
		bool quick;
	} c[] = {
		{ "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", true },
		{ "UPDATE pgbench_accounts SET abalance = abalance + -4000 WHERE aid = 9;", true },
		{ "INSERT INTO t (a, b) VALUES (1, 'x''y'); SELECT 2.5", true },
		{ "BEGIN;", true },
		{ "SELECT 1 -- c", false },
		{ "SELECT 1 /* c */", false },
		{ "SELECT $$x$$", false },
		{ "SELECT $1", false },
		{ "SELECT E'x'", false },
		{ "SELECT B'1'", false },
		{ "SELECT X'1'", false },
		{ "SELECT N'x'", false },
		{ "SELECT U&'x'", false },
		{ "SELECT \"x\"", false },
		{ "SELECT 'a\\'", false },
		{ "SELECT '\t'", false },
		{ "SELECT 1e5", false },
		{ "SELECT .5", false },
		{ "SELECT 1.", false },
		{ "SELECT 1..2", false },
		{ "SELECT 0x1f", false },
		{ "SELECT 'unterminated", false },
		{ "SELECT '\xc3\xa9'", false },
		{ "SELECT\v1", false },
	};

	ag_sql_cache_flush();
	for (size_t i = 0; i < N_ELEMS(c); i++)
		ASSERT_EQ(quick_keyed(c[i].sql), c[i].quick, c[i].sql);
	ag_sql_cache_flush();
}

/*
 * Every pair of constant-like fragments in the places of constants of a few templates, all
 * through one warm cache: each text's answer is its own parse's, whichever text of its key came
 * first. The fragments are the disguises a constant-folding key could misread (quotes, escapes,
 * prefixes, comments, dollar quotes, semicolons, exponents, dots, parameters, writes).
 */
static void subtest_disguises_differential(void)
{
	static const char *const frag[] = {
		"1", "42", "2147483648", "12.5", "-1", "'x'", "'x''y'", "';DELETE FROM t;'",
		"'a'';DELETE FROM t;--'", "'a\\'", "E'a\\';DELETE FROM t;--'",
		"$$;DELETE FROM t;$$",
		"$q$x$q$", "1e5", ".5", "1.", "1..2", "0x1F", "U&'\\0041'", "B'01'", "X'ff'",
		"N'x'", "'a'\n'b'", "'a' 'b'", "1/*;DELETE FROM t;*/", "1--;DELETE FROM t\n",
		"$1", "\"x\"", "1;DELETE FROM t", "(SELECT lo_import('/etc/passwd'))",
		"pg_read_file('/etc/passwd')", "'x'::regclass", "'unterminated", "1 /* 'x' */",
		"1 /* '", "' */; DELETE FROM t; /* '", "E'\\''", "'\\'",
		"E'\\'; DELETE FROM t; --'",
	};
	static const char *const tmpl[] = {
		"SELECT a FROM t WHERE b = %s AND c = %s",
		"UPDATE t SET a = %s WHERE b = %s",
		"SELECT %s; SELECT %s FROM u",
		"INSERT INTO t VALUES (%s, %s) RETURNING a",
	};
	char sql[512];
	size_t bad = 0, n = 0;
	uint64_t h0;
	struct ag_sql_result r;
	bool hit;

	ag_sql_cache_flush();
	h0 = shape_hits();
	for (size_t t = 0; t < N_ELEMS(tmpl); t++)
		for (size_t i = 0; i < N_ELEMS(frag); i++)
			for (size_t j = 0; j < N_ELEMS(frag); j++) {
				snprintf(sql, sizeof(sql), tmpl[t], frag[i], frag[j]);
				if (!classify_checked(sql, &r, &hit))
					bad++;
				ag_sql_result_free(&r);
				n++;
			}
	ASSERT_EQ(bad, 0, "every text as its own parse");
	ASSERT_GT(shape_hits() - h0, n / 10, "the shape cache answered many");
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
	if (test__start_subtest("quick_keyed"))
		subtest_quick_keyed();
	if (test__start_subtest("disguises_differential"))
		subtest_disguises_differential();
	ag_sql_cache_flush();
}
