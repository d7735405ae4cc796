// SPDX-License-Identifier: GPL-2.0
/*
 * Masking end to end, real PostgreSQL and clients: column rules resolved at the column's origin
 * (a plain column, an alias, SELECT *, a join), a typed column covered (NULL), detectors on
 * derived values (lower(), concatenation, row_to_json), the binary result format (raw client,
 * result format 1, with and without a Describe), COPY TO STDOUT in text and csv (and the COPYs
 * that cannot be masked refused), error texts, the styles (partial, hash: deterministic across
 * sessions), a table made after the session started (the catalog resolved again), and the
 * session's masked_values counter. Whatever is not masked comes back exactly as direct.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cgroup.h"
#include "pgwire.h"
#include "../pg.h"
#include "../test_progs.h"

#define MASK_SQL                                                                                   \
	"    sql:\n"                                                                               \
	"      - { name: rw, when: { command: [select, insert, update, delete, copy, begin,"       \
	" commit, rollback, set, show, create, ddl, prepare, execute, function] }, then: allow }\n"

#define MASK_RULES(style)                                                                          \
	MASK_SQL                                                                                   \
	"    mask:\n"                                                                              \
	"      columns: [users.email, \"*.ssn\", orders.amount]\n"                                 \
	"      detectors: [email, credit-card, ssn, phone, jwt, aws-key, private-key]\n"           \
	"      style: " style "\n"

static char out[65536], err[16384], direct[65536];

/* None of the sensitive values of the users table appear in s. */
static void no_secrets(const char *s, const char *what)
{
	static const char *const secrets[] = {
		"alice@example.com",
		"bob@example.org",
		"carol@example.net",
		"123-45-6789",
		"321-54-9876",
		"078-05-1120",
		"4111 1111 1111 1111",
		"5500 0000 0000 0004",
		"bob.personal@gmail.com",
		"555 123 4567",
		"987-6543",
		"555-000-1111",
	};

	for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++)
		if (strstr(s, secrets[i])) {
			ASSERT_TRUE(false, what);
			printf("%s: \"%s\" went out unmasked in:\n%s\n", what, secrets[i], s);
			return;
		}
}

static int psql(struct th_pg_gate *g, const char *rel, const char *sql)
{
	int rc = th_pg_psql(&g->pg, rel, sql, rel ? out : direct, sizeof(out), err, sizeof(err));

	if (rc)
		printf("psql: %d: %s\n", rc, err);
	return rc;
}

static void subtest_columns(struct th_pg_gate *g)
{
	ASSERT_OK(psql(g, g->tagged, "SELECT id, email, note FROM users ORDER BY id"), "psql");
	ASSERT_STREQ(out,
		     "1|[REDACTED]|likes cats\n"
		     "2|[REDACTED]|reach me at [REDACTED:email]\n"
		     "3|[REDACTED]|nothing to see\n",
		     "email column and the email inside note");
	/* An alias changes nothing: the origin is what RowDescription says. */
	ASSERT_OK(psql(g, g->tagged,
		       "SELECT email AS contact, ssn AS x, id AS email FROM users "
		       "WHERE id = 1"),
		  "psql");
	ASSERT_STREQ(out, "[REDACTED]|[REDACTED]|1\n", "aliases");
	/* A join: ssn comes from users. */
	ASSERT_OK(psql(g, g->tagged,
		       "SELECT o.id, u.ssn, o.item FROM orders o JOIN users u "
		       "ON u.id = o.user_id ORDER BY o.id"),
		  "psql");
	ASSERT_HAS_SUBSTR(out, "1|[REDACTED]|book\n", "join");
	/* A typed column covered: NULL (empty in psql's unaligned output). */
	ASSERT_OK(psql(g, g->tagged, "SELECT id, amount, amount IS NULL FROM orders WHERE id = 2"),
		  "psql");
	/* Derived from a covered column: NULL too (sqlorigin.c). */
	ASSERT_STREQ(out, "2||\n", "numeric column NULLed, and a value derived from it");
	no_secrets(out, "columns");
}

static void subtest_select_star(struct th_pg_gate *g)
{
	int lines = 0;

	ASSERT_OK(psql(g, g->tagged, "SELECT * FROM users ORDER BY id"), "psql");
	printf("%s", out);
	no_secrets(out, "SELECT *");
	ASSERT_HAS_SUBSTR(out,
			  "1|[REDACTED]|[REDACTED]|[REDACTED:credit-card]|[REDACTED:phone]|"
			  "likes cats\n",
			  "row 1");
	for (const char *p = out; (p = strchr(p, '\n')); p++)
		lines++;
	ASSERT_EQ(lines, 3, "all rows");
	/* Columns nobody masks are exactly as direct. */
	ASSERT_OK(psql(g, g->tagged, "SELECT * FROM orders ORDER BY id"), "psql");
	ASSERT_OK(psql(g, NULL, "SELECT id, user_id, NULL, item, created FROM orders ORDER BY id"),
		  "direct");
	ASSERT_STREQ(out, direct, "orders: only amount masked");
}

static void subtest_derived(struct th_pg_gate *g)
{
	ASSERT_OK(psql(g, g->tagged,
		       "SELECT lower(email), email || '!', upper(ssn), row_to_json(u), "
		       "concat('card: ', card), u::text FROM users u ORDER BY id"),
		  "psql");
	printf("%s", out);
	no_secrets(out, "derived values");
	/* Computed from covered columns: masked whole (sqlorigin.c); card is only detected. */
	ASSERT_HAS_SUBSTR(out, "[REDACTED]|[REDACTED]|[REDACTED]|[REDACTED]|card: "
			  "[REDACTED:credit-card]|[REDACTED]\n", "derived values masked whole");
	/* A value no rule covers: the detectors find what they know. */
	ASSERT_OK(psql(g, g->tagged, "SELECT lower(note), row_to_json(o) FROM users, "
		       "(SELECT item FROM orders WHERE id = 1) o WHERE id = 2"),
		  "psql");
	ASSERT_STREQ(out, "reach me at [REDACTED:email]|{\"item\":\"book\"}\n",
		     "detectors on a derived value; row_to_json of an unmasked row stays JSON");
	/* A JWT and an AWS key made up on the fly. */
	ASSERT_OK(psql(g, g->tagged,
		       "SELECT 'token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
		       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U', 'AKIAIOSFODNN7EXAMPLE'"),
		  "psql");
	ASSERT_HAS_SUBSTR(out, "[REDACTED:jwt]", "jwt");
	ASSERT_HAS_SUBSTR(out, "[REDACTED:aws-key]", "aws key");
	/* A number that is a card, cast: the typed value becomes NULL. */
	ASSERT_OK(psql(g, g->tagged, "SELECT 4111111111111111::int8, 42::int8"), "psql");
	ASSERT_STREQ(out, "|42\n", "int8 card NULLed, other numbers kept");
}

static void subtest_errors(struct th_pg_gate *g)
{
	int rc = th_pg_psql(&g->pg, g->tagged, "SELECT email::int FROM users WHERE id = 1", out,
			    sizeof(out), err, sizeof(err));

	ASSERT_NEQ(rc, 0, "the cast fails");
	printf("%s", err);
	ASSERT_HAS_SUBSTR(err, "invalid input syntax for type integer", "the server's error");
	no_secrets(err, "error text");
	/* A covered column no detector recognizes: the quoted value is hidden all the same. */
	rc = th_pg_psql(&g->pg, g->tagged, "SELECT (ssn || 'x')::int FROM users WHERE id = 1", out,
			sizeof(out), err, sizeof(err));
	ASSERT_HAS_SUBSTR(err, "invalid input syntax for type integer: \"[REDACTED]\"",
			  "cast error value hidden");
	/* A unique violation's detail names the key's value. */
	rc = th_pg_psql(&g->pg, g->tagged,
			"INSERT INTO users (id, email) VALUES (1, 'x@example.com')", out,
			sizeof(out), err, sizeof(err));
	ASSERT_NEQ(rc, 0, "duplicate key");
	printf("%s", err);
	ASSERT_HAS_SUBSTR(err, "Key (id)=([REDACTED]) already exists", "key value hidden");
}

/* --- binary results with the raw client ------------------------------------------------------ */

static int raw_connect(struct th_pg_gate *g)
{
	int fd = th_pg_connect_from(g->tagged, g->pg.addr, g->pg.port);

	if (fd >= 0 && th_pg_raw_startup(fd, TH_PG_USER, TH_PG_DB, TH_PG_PASSWORD)) {
		close(fd);
		return -EACCES;
	}
	return fd;
}

/* Rows of DataRows up to ReadyForQuery as "len:bytes|..." lines (binary shown as hex). */
static int raw_rows(int fd, char *buf, size_t len, char *types, size_t tlen)
{
	size_t off = 0, nt = 0;

	buf[0] = '\0';
	for (;;) {
		struct th_pg_msg m;
		struct pg_rd r;
		uint16_t n;

		if (th_pg_read_msg(fd, &m, 10000))
			return -EIO;
		if (nt + 1 < tlen) {
			types[nt++] = m.type;
			types[nt] = '\0';
		}
		if (m.type == 'E')
			printf("error: %s\n", th_pg_err_field(&m, 'M'));
		if (m.type == 'D') {
			pg_rd_init(&r, m.body, m.len);
			n = pg_rd_u16(&r);
			for (uint16_t i = 0; i < n && off + 64 < len; i++) {
				int32_t fl = (int32_t)pg_rd_u32(&r);
				const uint8_t *v = fl > 0 ? pg_rd_bytes(&r, fl) : NULL;
				bool text = true;

				for (int k = 0; v && k < fl; k++)
					text &= v[k] >= 0x20 && v[k] < 0x7f;
				off += snprintf(buf + off, len - off, "%s", i ? "|" : "");
				if (fl < 0)
					off += snprintf(buf + off, len - off, "NULL");
				for (int k = 0; v && k < fl && off + 8 < len; k++)
					off += snprintf(buf + off, len - off, text ? "%c" : "%02x",
							v[k]);
			}
			off += snprintf(buf + off, len - off, "\n");
		}
		th_pg_msg_free(&m);
		if (m.type == 'Z')
			return 0;
	}
}

static void bind_exec(struct ag_buf *b, bool describe, int16_t fmt)
{
	struct pg_wr w;

	pg_wr_begin(&w, b, 'B');
	pg_wr_str(&w, "");
	pg_wr_str(&w, "");
	pg_wr_u16(&w, 0);
	pg_wr_u16(&w, 0);
	pg_wr_u16(&w, 1);
	pg_wr_u16(&w, fmt);
	pg_wr_end(&w);
	if (describe)
		pg_put_describe(b, 'P', "");
	pg_wr_begin(&w, b, 'E');
	pg_wr_str(&w, "");
	pg_wr_u32(&w, 0);
	pg_wr_end(&w);
	pg_wr_begin(&w, b, 'S');
	pg_wr_end(&w);
}

static void subtest_binary(struct th_pg_gate *g)
{
	static const char q[] = "SELECT u.id, u.email, u.ssn, o.amount, u.note, u.card::bytea, "
				"u.email::varchar, row(u.email, u.id) FROM users u JOIN orders o "
				"ON o.user_id = u.id WHERE o.id = 3";
	struct ag_buf b = { 0 };
	char rows[8192], types[64];
	int fd;

	/* The raw client speaks md5, not SCRAM. */
	th_pg_set_auth(&g->pg, "md5");
	fd = raw_connect(g);

	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	for (int describe = 1; describe >= 0; describe--) {
		pg_put_parse(&b, "", q);
		bind_exec(&b, describe, 1);
		ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000), "send");
		ag_buf_free(&b);
		ASSERT_OK(raw_rows(fd, rows, sizeof(rows), types, sizeof(types)), "rows");
		printf("describe %d: %s %s", describe, types, rows);
		/* The client sees only what it asked for: no RowDescription without Describe. */
		ASSERT_STREQ(types, describe ? "12TDCZ" : "12DCZ", "answers");
		/* email::varchar has no origin column: derived from email, masked whole. */
		ASSERT_HAS_SUBSTR(rows,
				  "00000002|[REDACTED]|[REDACTED]|NULL|reach me at "
				  "[REDACTED:email]|[REDACTED:credit-card]|[REDACTED]|",
				  "binary: text masked, int4 intact, numeric NULLed");
		/* A record in binary carries the email raw: the detector NULLs it. */
		ASSERT_HAS_SUBSTR(rows, "|NULL\n", "binary record with an email: NULL");
		no_secrets(rows, "binary");
	}
	close(fd);
}

/* --- values computed from masked columns (sqlorigin.c) --------------------------------------- */

struct disguise {
	const char *name, *sql, *expect;
};

static const struct disguise disguises[] = {
	{ "origin_reverse", "SELECT id, reverse(email), note FROM users WHERE id = 1",
	  "1|[REDACTED]|likes cats\n" },
	{ "origin_hex_encode",
	  "SELECT id, encode(convert_to(email, 'UTF8'), 'hex') FROM users WHERE id = 1",
	  "1|[REDACTED]\n" },
	/* bytea has no valid replacement text: NULL. */
	{ "origin_bytea_cast", "SELECT id, email::bytea, ssn::bytea FROM users WHERE id = 1",
	  "1||\n" },
	{ "origin_substr_concat",
	  "SELECT substr(ssn, 1, 3) || '-' || substr(ssn, 5), id FROM users WHERE id = 1",
	  "[REDACTED]|1\n" },
	{ "origin_translate", "SELECT translate(email, '@.', '#,') FROM users WHERE id = 1",
	  "[REDACTED]\n" },
	{ "origin_md5", "SELECT md5(ssn), id FROM users WHERE id = 1", "[REDACTED]|1\n" },
	/* The same shape with another constant: the analysis is cached by shape, still masked. */
	{ "origin_md5_same_shape", "SELECT md5(ssn), id FROM users WHERE id = 2", "[REDACTED]|2\n" },
	{ "origin_string_agg", "SELECT string_agg(email, ',' ORDER BY id), count(*) FROM users",
	  "[REDACTED]|3\n" },
	{ "origin_array_agg",
	  "SELECT array_agg(ssn ORDER BY id), array_agg(id ORDER BY id) FROM users",
	  "[REDACTED]|{1,2,3}\n" },
	{ "origin_whole_row",
	  "SELECT row_to_json(u), to_jsonb(u), u::text, u.id FROM users u WHERE id = 1",
	  "[REDACTED]|[REDACTED]|[REDACTED]|1\n" },
	{ "origin_whole_row_unaliased",
	  "SELECT json_agg(users.*), (SELECT users FROM users WHERE id = 2) FROM users",
	  "[REDACTED]|[REDACTED]\n" },
	{ "origin_scalar_subquery", "SELECT (SELECT email FROM users ORDER BY id LIMIT 1), 42",
	  "[REDACTED]|42\n" },
	{ "origin_subquery_in_from",
	  "SELECT x, y, r FROM (SELECT email AS x, id AS y, reverse(ssn) AS r FROM users) s "
	  "WHERE y = 1",
	  "[REDACTED]|1|[REDACTED]\n" },
	{ "origin_cte",
	  "WITH t AS (SELECT id, upper(email) AS e FROM users), c(y) AS (SELECT md5(ssn) "
	  "FROM users) SELECT t.id, t.e, (SELECT y FROM c LIMIT 1) FROM t WHERE t.id = 1",
	  "1|[REDACTED]|[REDACTED]\n" },
	{ "origin_case_coalesce_format",
	  "SELECT CASE WHEN id > 0 THEN email END, coalesce(ssn, ''), format('%s!', email) "
	  "FROM users WHERE id = 1",
	  "[REDACTED]|[REDACTED]|[REDACTED]\n" },
	{ "origin_left_lower",
	  "SELECT left(email, 3), lower(email), right(ssn, 4) FROM users WHERE id = 1",
	  "[REDACTED]|[REDACTED]|[REDACTED]\n" },
	/* A non-text value derived from a masked column is NULL: its type still parses. */
	{ "origin_casts_operators",
	  "SELECT email::varchar(100), ssn || '', length(email), id FROM users WHERE id = 1",
	  "[REDACTED]|[REDACTED]||1\n" },
	{ "origin_window",
	  "SELECT id, first_value(email) OVER w, lag(ssn) OVER w FROM users "
	  "WINDOW w AS (ORDER BY id) ORDER BY id DESC LIMIT 1",
	  "3|[REDACTED]|[REDACTED]\n" },
	/* SQL given as text (the query_to_xml family) cannot be traced: its result is derived. */
	{ "origin_query_to_xml",
	  "SELECT query_to_xml('SELECT ssn FROM users WHERE id = 1', true, false, ''), "
	  "table_to_xml('users', true, false, ''), 1",
	  "[REDACTED]|[REDACTED]|1\n" },
	{ "origin_union", "SELECT reverse(email) FROM users WHERE id = 1 UNION ALL SELECT 'x'",
	  "[REDACTED]\n[REDACTED]\n" },
	{ "origin_returning_insert",
	  "INSERT INTO users (id, email, ssn, note) SELECT 99, email, reverse(ssn), note "
	  "FROM users WHERE id = 1 RETURNING id, email, reverse(ssn), note",
	  "99|[REDACTED]|[REDACTED]|likes cats\n" },
	{ "origin_returning_update",
	  "UPDATE users SET note = note WHERE id = 99 RETURNING upper(email), id",
	  "[REDACTED]|99\n" },
	{ "origin_returning_delete", "DELETE FROM users WHERE id = 99 RETURNING ssn, id",
	  "[REDACTED]|99\n" },
	/* SQL-level PREPARE/EXECUTE: the origin is not followed; what has none is masked. */
	{ "origin_sql_execute",
	  "PREPARE p1 AS SELECT reverse(email), id FROM users WHERE id = 1; EXECUTE p1",
	  "[REDACTED]|1\n" },
	{ "origin_cursor_fetch",
	  "BEGIN; DECLARE c1 CURSOR FOR SELECT md5(ssn), id FROM users WHERE id = 1; "
	  "FETCH 1 FROM c1; COMMIT",
	  "[REDACTED]|1\n" },
};

static void subtest_disguise(struct th_pg_gate *g, const struct disguise *d)
{
	if (!ASSERT_OK(psql(g, g->tagged, d->sql), d->name))
		return;
	no_secrets(out, d->name);
	ASSERT_STREQ(out, d->expect, d->name);
}

/* What reads no masked column is exactly as direct, computed or not. */
static void subtest_origin_unrelated(struct th_pg_gate *g)
{
	static const char *const qs[] = {
		"SELECT id, reverse(item), upper(item), id * 2, created, md5(item) FROM orders "
		"ORDER BY id",
		"SELECT id, reverse(note), length(note), u.id + 1 FROM users u WHERE id IN (1, 3) "
		"ORDER BY id",
		"WITH t AS (SELECT item AS x FROM orders) SELECT upper(x) FROM t ORDER BY 1",
	};

	for (size_t i = 0; i < sizeof(qs) / sizeof(qs[0]); i++) {
		ASSERT_OK(psql(g, g->tagged, qs[i]), "psql");
		ASSERT_OK(psql(g, NULL, qs[i]), "direct");
		ASSERT_STREQ(out, direct, qs[i]);
	}
}

/* A view's columns have the view's own origin: a view reading a covered column is covered. */
static void subtest_origin_view(struct th_pg_gate *g)
{
	ASSERT_OK(psql(g, g->tagged,
		       "CREATE TEMP VIEW uv AS SELECT id, email, md5(ssn) AS h, note FROM users;\n"
		       "SELECT email, h, md5(h), upper(v.note) FROM uv v WHERE id = 1;\n"
		       "SELECT item FROM orders WHERE id = 1;\n"),
		  "psql");
	no_secrets(out, "view");
	ASSERT_STREQ(out, "[REDACTED]|[REDACTED]|[REDACTED]|[REDACTED]\nbook\n",
		     "view columns masked (all of them: which one a covered column feeds is "
		     "not known), other tables untouched");
}

static void subtest_origin_copy(struct th_pg_gate *g)
{
	ASSERT_NEQ(th_pg_psql(&g->pg, g->tagged,
			      "COPY (SELECT reverse(email), md5(ssn) FROM users) TO STDOUT", out,
			      sizeof(out), err, sizeof(err)),
		   0, "copy (query) of derived values refused");
	ASSERT_HAS_SUBSTR(err, "COPY (query) TO STDOUT reads masked columns", "says why");
	no_secrets(out, "copy");
}

/* The extended protocol: Parse, Bind, (Describe), Execute; text and binary results. */
static void subtest_origin_extended(struct th_pg_gate *g)
{
	static const char q[] = "SELECT id, reverse(email), md5(ssn), note, length(ssn) FROM users "
				"WHERE id = 1";
	struct ag_buf b = { 0 };
	char rows[8192], types[64];
	int fd;

	th_pg_set_auth(&g->pg, "md5");
	fd = raw_connect(g);
	if (!ASSERT_GE(fd, 0, "raw connection"))
		return;
	for (int fmt = 0; fmt <= 1; fmt++)
		for (int describe = 1; describe >= 0; describe--) {
			pg_put_parse(&b, "", q);
			bind_exec(&b, describe, fmt);
			ASSERT_OK(th_send_all(fd, ag_buf_head(&b), ag_buf_len(&b), 5000), "send");
			ag_buf_free(&b);
			ASSERT_OK(raw_rows(fd, rows, sizeof(rows), types, sizeof(types)), "rows");
			printf("fmt %d describe %d: %s %s", fmt, describe, types, rows);
			ASSERT_STREQ(rows,
				     fmt ? "00000001|[REDACTED]|[REDACTED]|likes cats|NULL\n"
					 : "1|[REDACTED]|[REDACTED]|likes cats|NULL\n",
				     "extended: derived columns masked");
			no_secrets(rows, "extended");
		}
	close(fd);
}

/* --- COPY ---------------------------------------------------------------------------------- */

static void subtest_copy(struct th_pg_gate *g)
{
	ASSERT_OK(psql(g, g->tagged, "COPY users TO STDOUT"), "copy text");
	printf("%s", out);
	no_secrets(out, "COPY text");
	ASSERT_HAS_SUBSTR(out,
			  "1\t[REDACTED]\t[REDACTED]\t[REDACTED:credit-card]\t"
			  "[REDACTED:phone]\tlikes cats\n",
			  "text row");
	ASSERT_OK(psql(g, g->tagged, "COPY users (note, ssn, id) TO STDOUT"), "copy columns");
	ASSERT_HAS_SUBSTR(out, "likes cats\t[REDACTED]\t1\n", "by the column list");
	ASSERT_OK(psql(g, g->tagged, "COPY users TO STDOUT (FORMAT csv, HEADER)"), "copy csv");
	printf("%s", out);
	no_secrets(out, "COPY csv");
	ASSERT_HAS_SUBSTR(out, "id,email,ssn,card,phone,note\n", "header untouched");
	ASSERT_HAS_SUBSTR(out, "1,\"[REDACTED]\",\"[REDACTED]\"", "csv row");
	ASSERT_OK(psql(g, g->tagged, "COPY orders TO STDOUT"), "copy orders");
	ASSERT_HAS_SUBSTR(out, "1\t1\t\\N\tbook\t2024-01-02\n", "numeric column NULL in COPY");
	ASSERT_OK(psql(g, g->tagged, "\\copy (SELECT 1, 'bob@example.org') TO STDOUT"),
		  "copy (query) reading no masked table");
	ASSERT_STREQ(out, "1\t[REDACTED:email]\n", "query form: detectors");
	/* What cannot be masked is refused. */
	ASSERT_NEQ(th_pg_psql(&g->pg, g->tagged, "COPY (SELECT email FROM users) TO STDOUT", out,
			      sizeof(out), err, sizeof(err)),
		   0, "copy (query) of a masked table refused");
	ASSERT_HAS_SUBSTR(err, "COPY (query) TO STDOUT reads masked columns", "says why");
	ASSERT_NEQ(th_pg_psql(&g->pg, g->tagged, "COPY users TO STDOUT (FORMAT binary)", out,
			      sizeof(out), err, sizeof(err)),
		   0, "binary copy refused");
	ASSERT_HAS_SUBSTR(err, "binary format cannot be masked", "says why");
}

/* --- styles, catalog refresh, counters ------------------------------------------------------- */

static void subtest_partial(struct th_pg_gate *g)
{
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", MASK_RULES("partial")), "reload"))
		return;
	ASSERT_OK(psql(g, g->tagged, "SELECT email, ssn, card FROM users WHERE id = 1"), "psql");
	ASSERT_STREQ(out, "a***@example.com|***-**-6789|**** **** **** 1111\n", "partial forms");
	/* A computed value keeps no hint: reversed, its last characters are the first ones. */
	ASSERT_OK(psql(g, g->tagged, "SELECT reverse(ssn), lower(email) FROM users WHERE id = 1"),
		  "psql");
	ASSERT_STREQ(out, "[REDACTED]|[REDACTED]\n", "derived values redacted under partial");
}

static void subtest_hash(struct th_pg_gate *g)
{
	char first[4096];

	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", MASK_RULES("hash")), "reload"))
		return;
	ASSERT_OK(psql(g, g->tagged, "SELECT email FROM users ORDER BY id"), "psql");
	snprintf(first, sizeof(first), "%s", out);
	printf("%s", out);
	ASSERT_OK(strncmp(first, "h:", 2), "hash form");
	no_secrets(out, "hash");
	/* Another session: the same hashes (joins line up); different values differ. */
	ASSERT_OK(psql(g, g->tagged, "SELECT email FROM users ORDER BY id"), "psql");
	ASSERT_STREQ(out, first, "deterministic across sessions");
	ASSERT_NEQ(strncmp(first, strchr(first, '\n') + 1, 18), 0, "distinct values");
}

static void subtest_new_table(struct th_pg_gate *g)
{
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", MASK_RULES("redact")), "reload"))
		return;
	/* Made in the session: *.ssn covers it; the gateway resolves the catalog again. */
	ASSERT_OK(
		psql(g, g->tagged,
		     "CREATE TEMP TABLE copy_of_users AS SELECT id, ssn AS ssn, note FROM users;\n"
		     "SELECT * FROM copy_of_users ORDER BY id;\n"
		     "COPY copy_of_users TO STDOUT;\n"),
		"psql");
	printf("%s", out);
	ASSERT_HAS_SUBSTR(out, "1|[REDACTED]|likes cats\n", "new table's column masked");
	ASSERT_HAS_SUBSTR(out, "1\t[REDACTED]\tlikes cats\n", "and in COPY");
	no_secrets(out, "new table");
}

static void subtest_counter(struct th_pg_gate *g)
{
	static const char py[] = "import psycopg2, sys\n"
				 "c = psycopg2.connect('')\n"
				 "cur = c.cursor()\n"
				 "cur.execute('SELECT email, ssn FROM users')\n"
				 "rows = cur.fetchall()\n"
				 "print('rows', len(rows), rows[0][0], flush=True)\n"
				 "sys.stdin.readline()\n";
	long long st = -1, bl = -1, ma = -1;
	int in;
	pid_t pid = th_pg_python_held(&g->pg, g->tagged, py, &in);

	if (!ASSERT_GT(pid, 0, "script"))
		return;
	for (int t = 0; t < 100; t++) {
		if (!th_daemon_counters(&g->d, pid, &st, &bl, &ma) && ma >= 6)
			break;
		usleep(100 * 1000);
	}
	ASSERT_EQ(ma, 6, "masked values counted (3 rows x 2 columns)");
	ASSERT_EQ(bl, 0, "nothing blocked");
	close(in);
	ASSERT_EQ(th_wait(pid, 10000), 0, "script");
}

static void subtest_search_path(struct th_pg_gate *g)
{
	/* Operators of the agent's own, ahead of pg_catalog, that would make every match fail. */
	static const char evil[] =
		"CREATE SCHEMA evil;\n"
		"CREATE FUNCTION evil.f(text, text) RETURNS bool LANGUAGE sql AS 'SELECT false';\n"
		"CREATE OPERATOR evil.~~* (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.f);\n"
		"CREATE FUNCTION evil.g(oid, oid) RETURNS bool LANGUAGE sql AS 'SELECT false';\n"
		"CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.g);\n"
		"GRANT USAGE ON SCHEMA evil TO agent;\n";
	char conn[512];
	char *argv[] = { "/usr/bin/psql",
			 "-X",
			 "-A",
			 "-t",
			 "-d",
			 conn,
			 "-c",
			 "SELECT email, ssn FROM users WHERE id = 1",
			 NULL };
	int rc;

	if (!ASSERT_OK(th_pg_admin(&g->pg, evil, NULL, 0), "evil operators"))
		return;
	/* Other column rules: a query of its own, not the cached answer of an earlier session. */
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce",
					MASK_SQL
					"    mask:\n"
					"      columns: [users.email, \"*.ssn\", users.phone]\n"
					"      style: redact\n"),
		       "reload"))
		return;
	th_pg_conninfo(&g->pg, conn, sizeof(conn),
		       "options='-c search_path=evil,pg_catalog,public'");
	rc = th_pg_exec(g->tagged, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	if (!ASSERT_EQ(rc, 0, "psql"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "[REDACTED]|[REDACTED]\n", "still masked");
	th_pg_admin(&g->pg, "DROP SCHEMA evil CASCADE", NULL, 0);
	ASSERT_OK(th_pg_gate_rules(g, "enforce", MASK_RULES("redact")), "restore");
}

/* Reloads with a mask of only these column rules; then email and note of user 3 are want. */
static bool columns_then(struct th_pg_gate *g, const char *columns, const char *want)
{
	char rules[1024];

	snprintf(rules, sizeof(rules), MASK_SQL "    mask:\n      columns: %s\n", columns);
	if (!ASSERT_OK(th_pg_gate_rules(g, "enforce", rules), "reload"))
		return false;
	ASSERT_OK(psql(g, g->tagged, "SELECT email, note FROM users WHERE id = 3"), "psql");
	return ASSERT_STREQ(out, want, columns);
}

/*
 * Two masks whose column globs differ only inside a character class ask the server the same
 * catalog query (LIKE has no classes: '%' from the '[' on): the catalog cached for the first
 * must not answer for the second, whose columns it never covered.
 */
static void subtest_catalog_cache_exact_globs(struct th_pg_gate *g)
{
	if (columns_then(g, "[\"users.[e]mail\"]", "[REDACTED]|nothing to see\n"))
		columns_then(g, "[\"users.[n]ote\"]", "carol@example.net|[REDACTED]\n");
	ASSERT_OK(th_pg_gate_rules(g, "enforce", MASK_RULES("redact")), "restore");
}

/*
 * A masked value copied into somewhere no rule covers, or a covered column renamed away from
 * its rule, would come back unmasked: each way is refused (42501), while writes of other
 * values go through and the session stays usable.
 */
static void subtest_launder_refused(struct th_pg_gate *g)
{
	static const char py[] =
		"import psycopg2\n"
		"c = psycopg2.connect('')\n"
		"c.autocommit = True\n"
		"cur = c.cursor()\n"
		"cur.execute('CREATE TEMP TABLE ly (id int PRIMARY KEY, v text)')\n"
		"for q in ['CREATE TEMP TABLE lx AS SELECT id, amount * 1 AS a FROM orders',\n"
		"          'SELECT amount INTO TEMP lz FROM orders',\n"
		"          'INSERT INTO ly SELECT id, amount::text FROM orders',\n"
		"          'INSERT INTO ly SELECT id, ssn FROM users',\n"
		"          'INSERT INTO ly VALUES (5, (SELECT email FROM users WHERE id = 1))',\n"
		"          'INSERT INTO ly (id) VALUES (6, (SELECT email FROM users WHERE id = 1))',\n"
		"          'INSERT INTO ly (id) SELECT id, email FROM users',\n"
		"          'INSERT INTO ly SELECT * FROM (SELECT id, amount::text FROM orders) s',\n"
		"          'WITH w AS (INSERT INTO ly SELECT id, amount::text FROM orders RETURNING 1)'\n"
		"          ' SELECT count(*) FROM w',\n"
		"          'UPDATE ly SET v = (SELECT amount::text FROM orders WHERE id = 1)',\n"
		"          'UPDATE users SET note = email WHERE id = 1',\n"
		"          \"SELECT set_config('x.y', (SELECT amount::text FROM orders LIMIT 1), false)\",\n"
		"          'PREPARE p AS INSERT INTO ly SELECT id, amount::text FROM orders',\n"
		"          'CREATE TEMP TABLE lw AS SELECT * FROM orders',\n"
		"          \"INSERT INTO ly VALUES (1, 'x') ON CONFLICT (id) DO UPDATE\"\n"
		"          ' SET v = (SELECT amount::text FROM orders WHERE id = 1)',\n"
		"          'ALTER TABLE users RENAME COLUMN email TO contact',\n"
		"          'ALTER TABLE orders RENAME TO orders2',\n"
		"          'ALTER TABLE orders SET SCHEMA public']:\n"
		"    try:\n"
		"        cur.execute(q)\n"
		"        print('ran:', q)\n"
		"    except psycopg2.Error as e:\n"
		"        print(e.pgcode, str(e).splitlines()[0])\n"
		"cur.execute(\"INSERT INTO ly VALUES (9, 'plain')\")\n"
		"cur.execute('SELECT v FROM ly')\n"
		"print('ly', cur.fetchall())\n";
	int rc = th_pg_python(&g->pg, g->tagged, py, out, sizeof(out), err, sizeof(err), 60000);

	if (!ASSERT_EQ(rc, 0, "python"))
		printf("stderr: %s\n", err);
	ASSERT_FALSE(strstr(out, "ran:"), "every copy refused");
	if (strstr(out, "ran:"))
		printf("%s", out);
	ASSERT_HAS_SUBSTR(out,
			  "42501 agentgate: blocked: CREATE TABLE AS: masked values would be "
			  "readable unmasked afterwards",
			  "says what");
	ASSERT_HAS_SUBSTR(out, "42501 agentgate: blocked: a rename: masked", "a rename too");
	ASSERT_HAS_SUBSTR(out, "ly [('plain',)]", "other writes pass, nothing copied");
	ASSERT_FALSE(strstr(out, "10.50") || strstr(out, "99.99"), "no amount out");
}

static void subtest_ddl_mix(struct th_pg_gate *g)
{
	char conn[256];
	char *argv[] = { "/usr/bin/psql",
			 "-X",
			 "-A",
			 "-t",
			 "-d",
			 conn,
			 "-c",
			 "CREATE TEMP TABLE t3 AS SELECT ssn FROM users; SELECT * FROM t3",
			 NULL };
	int rc;

	th_pg_conninfo(&g->pg, conn, sizeof(conn), NULL);
	rc = th_pg_exec(g->tagged, argv, NULL, out, sizeof(out), err, sizeof(err), 30000);
	ASSERT_NEQ(rc, 0, "refused");
	ASSERT_HAS_SUBSTR(err, "DDL and other statements in one string", "says why");
	no_secrets(out, "ddl mix");
}

static void subtest_large_row(struct th_pg_gate *g)
{
	int rc =
		th_pg_python(&g->pg, g->tagged,
			     "import psycopg2\n"
			     "c = psycopg2.connect('')\n"
			     "cur = c.cursor()\n"
			     "cur.execute(\"SELECT repeat('y', 3000000) || ' ' || note FROM users "
			     "WHERE id = 2\")\n"
			     "v = cur.fetchone()[0]\n"
			     "print(len(v), v[-20:])\n",
			     out, sizeof(out), err, sizeof(err), 60000);

	if (!ASSERT_EQ(rc, 0, "python"))
		printf("stderr: %s\n", err);
	ASSERT_STREQ(out, "3000029  at [REDACTED:email]\n", "a 3 MB row held whole and masked");
}

void test_pg_mask(void)
{
	struct th_pg_gate g;

	if (!ASSERT_OK(th_pg_gate_start(&g, "127.0.0.6", "scram-sha-256", "enforce",
					MASK_RULES("redact")),
		       "gate"))
		goto out;
	if (test__start_subtest("column_rule_alias_join_typed"))
		subtest_columns(&g);
	if (test__start_subtest("select_star"))
		subtest_select_star(&g);
	if (test__start_subtest("detectors_on_derived_values"))
		subtest_derived(&g);
	if (test__start_subtest("error_text"))
		subtest_errors(&g);
	if (test__start_subtest("binary_format"))
		subtest_binary(&g);
	if (test__start_subtest("copy_to_stdout"))
		subtest_copy(&g);
	if (test__start_subtest("masked_values_counted"))
		subtest_counter(&g);
	if (test__start_subtest("style_partial"))
		subtest_partial(&g);
	if (test__start_subtest("style_hash_deterministic"))
		subtest_hash(&g);
	if (test__start_subtest("table_made_in_session"))
		subtest_new_table(&g);
	if (test__start_subtest("search_path_cannot_hide_columns"))
		subtest_search_path(&g);
	if (test__start_subtest("catalog_cache_keyed_by_exact_globs"))
		subtest_catalog_cache_exact_globs(&g);
	if (test__start_subtest("copy_into_unmasked_place_refused"))
		subtest_launder_refused(&g);
	if (test__start_subtest("ddl_and_query_in_one_string_refused"))
		subtest_ddl_mix(&g);
	if (test__start_subtest("large_row_masked"))
		subtest_large_row(&g);
	ASSERT_OK(th_pg_gate_rules(&g, "enforce", MASK_RULES("redact")), "redact again");
	for (size_t i = 0; i < sizeof(disguises) / sizeof(disguises[0]); i++) {
		if (test__start_subtest(disguises[i].name))
			subtest_disguise(&g, &disguises[i]);
	}
	if (test__start_subtest("origin_unrelated_untouched"))
		subtest_origin_unrelated(&g);
	if (test__start_subtest("origin_view"))
		subtest_origin_view(&g);
	if (test__start_subtest("origin_copy_query_refused"))
		subtest_origin_copy(&g);
	if (test__start_subtest("origin_extended_protocol"))
		subtest_origin_extended(&g);
out:
	test__end_subtest();
	th_pg_gate_cleanup(&g);
}
