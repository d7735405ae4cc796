/* SPDX-License-Identifier: GPL-2.0 */
/*
 * SQL classification with the PostgreSQL parser itself (libpg_query): every statement of a
 * string is parsed and classified by what it does, not how it is written — writes hidden in
 * CTEs, SELECT ... FOR UPDATE, COPY to/from programs and server files, DO blocks, function
 * definitions, role changes, ALTER SYSTEM, file and large-object functions, EXPLAIN ANALYZE of a
 * write, PREPARE/EXECUTE. Unparseable SQL is an error (the caller refuses it: fail closed).
 * Then the policy's sql rules decide (first match wins).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "policy.h"

/*
 * Classes of a statement: a bit set, since one statement can do several things (a SELECT
 * whose CTE deletes is select|delete; DROP TABLE is drop|ddl). Policy `command:` names map
 * 1:1 to these bits (ag_sql_class_by_name).
 */
enum ag_sql_class {
	AG_SQL_SELECT = 1ULL << 0,
	AG_SQL_INSERT = 1ULL << 1,
	AG_SQL_UPDATE = 1ULL << 2,
	AG_SQL_DELETE = 1ULL << 3,
	AG_SQL_MERGE = 1ULL << 4,
	AG_SQL_COPY = 1ULL << 5,
	AG_SQL_DDL = 1ULL << 6,		/* any schema change: create, alter, drop, comment, ... */
	AG_SQL_CREATE = 1ULL << 7,
	AG_SQL_ALTER = 1ULL << 8,
	AG_SQL_DROP = 1ULL << 9,
	AG_SQL_TRUNCATE = 1ULL << 10,
	AG_SQL_COMMENT = 1ULL << 11,
	AG_SQL_GRANT = 1ULL << 12,
	AG_SQL_REVOKE = 1ULL << 13,
	AG_SQL_ROLE = 1ULL << 14,	/* CREATE/ALTER/DROP ROLE|USER, SET ROLE, SET SESSION AUTHORIZATION */
	AG_SQL_FUNCTION = 1ULL << 15,	/* CREATE FUNCTION/PROCEDURE, DO */
	AG_SQL_TRANSACTION = 1ULL << 16, /* BEGIN, COMMIT, ROLLBACK, SAVEPOINT, ... */
	AG_SQL_SET = 1ULL << 17,	/* SET, RESET, SHOW */
	AG_SQL_UTILITY = 1ULL << 18,	/* VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, LISTEN, ... */
	AG_SQL_LOCK = 1ULL << 19,	/* LOCK TABLE, SELECT ... FOR UPDATE/SHARE */
	AG_SQL_FILE = 1ULL << 20,	/* server files: COPY to/from a file, pg_read_file, lo_import/export, ... */
	AG_SQL_PROGRAM = 1ULL << 21,	/* COPY ... PROGRAM */
	AG_SQL_SYSTEM = 1ULL << 22,	/* ALTER SYSTEM, LOAD, CREATE EXTENSION, ... */
	AG_SQL_PREPARE = 1ULL << 23,
	AG_SQL_EXECUTE = 1ULL << 24,
	AG_SQL_DEALLOCATE = 1ULL << 25,
	AG_SQL_EXPLAIN = 1ULL << 26,
	AG_SQL_CALL = 1ULL << 27,
	AG_SQL_DO = 1ULL << 28,
	AG_SQL_NOTIFY = 1ULL << 29,	/* LISTEN, NOTIFY, UNLISTEN */
	AG_SQL_DISCARD = 1ULL << 30,
	AG_SQL_REFRESH = 1ULL << 31,
	AG_SQL_BEGIN = 1ULL << 32,
	AG_SQL_COMMIT = 1ULL << 33,
	AG_SQL_ROLLBACK = 1ULL << 34,
	AG_SQL_SAVEPOINT = 1ULL << 35,
	AG_SQL_SHOW = 1ULL << 36,
	AG_SQL_RESET = 1ULL << 37,
	AG_SQL_VACUUM = 1ULL << 38,
	AG_SQL_ANALYZE = 1ULL << 39,
	AG_SQL_CLUSTER = 1ULL << 40,
	AG_SQL_REINDEX = 1ULL << 41,
	AG_SQL_LISTEN = 1ULL << 42,
	AG_SQL_UNLISTEN = 1ULL << 43,
	AG_SQL_WRITE = 1ULL << 44,	/* anything that changes data or schema */
	AG_SQL_EMPTY = 1ULL << 45,	/* an empty query (only comments/whitespace) */
};

#define AG_SQL_NCLASSES 46
/*
 * The class names by bit number ("select" is bit 0), NULL-terminated: the policy's `command:`
 * values are exactly these (policy.c validates against this table).
 */
extern const char *const ag_sql_command_names[AG_SQL_NCLASSES + 1];

/* Longer SQL strings are refused (-EINVAL) rather than classified. */
#define AG_SQL_MAX_LEN (1u << 20)
/*
 * So are strings nesting parentheses and brackets deeper than this (outside literals, quoted
 * names and comments), by a scan before libpg_query: "nesting too deep".
 */
#define AG_SQL_MAX_NESTING 1000

struct ag_sql_stmt {
	uint64_t classes;
	/* Relations the statement touches, "schema.name" when qualified, else "name". */
	char **tables;
	size_t ntables;
	/* An UPDATE or DELETE (anywhere in it, CTEs included) without a WHERE clause. */
	bool where_absent;
	/* For EXECUTE: the prepared statement's name (the caller resolves what it was). */
	char *execute_name;
	/* For PREPARE: the name, and the classes of the statement it prepares (in classes too). */
	char *prepare_name;
	int location; /* byte offset of the statement in the string */
	int length;   /* its length, 0 meaning "to the end" */
};

struct ag_sql_result {
	struct ag_sql_stmt *stmts;
	size_t nstmts;
	uint64_t fingerprint; /* 0: not computed here (a second parse); see ag_sql_fingerprint() */
	char *error;	      /* parse error (NULL when parsed) */
	int error_pos;	      /* 1-based cursor position of the error, 0 if unknown */
	/*
	 * The classification read a constant's value (set_config('role', ...), EXPLAIN (ANALYZE
	 * 'off')): it holds for this text only, never for others of its shape (sql_shape.c).
	 */
	bool literal_read;
	/*
	 * stmts is one allocation of size bytes that also holds every tables array and string
	 * the statements point to: read it, never free or realloc parts of it.
	 */
	size_t size;
};

/*
 * 0 when parsed (out filled, at least one statement: an empty or comment-only string is one
 * AG_SQL_EMPTY statement); -EINVAL with out->error set for unparseable SQL (and for SQL over
 * AG_SQL_MAX_LEN or AG_SQL_MAX_NESTING, or nested too deep to classify safely); -ENOMEM.
 * Results are cached per thread by statement text (4 KiB and shorter), and by shape (the
 * same tokens with other constants, when the classification read no constant: sql_shape.c);
 * out is always the caller's own copy.
 * Statements too long for the caller's stack are parsed on a short-lived thread of their own.
 */
int ag_sql_classify(const char *sql, struct ag_sql_result *out);
/* The same without the cache (benchmarks, tests). */
int ag_sql_classify_uncached(const char *sql, struct ag_sql_result *out);
void ag_sql_result_free(struct ag_sql_result *r);
/*
 * libpg_query's fingerprint of the whole string (the same for the same statement with other
 * constants, case, spacing or comments), or 0 when it does not classify. Computed only when
 * asked, and kept in the calling thread's cache next to the classification.
 */
uint64_t ag_sql_fingerprint(const char *sql);
/* A deep copy of src, a result of ag_sql_classify(), into dst (overwritten). 0 or -ENOMEM. */
int ag_sql_result_copy(const struct ag_sql_result *src, struct ag_sql_result *dst);
/* Frees the calling thread's cache (it is freed at thread exit anyway). */
void ag_sql_cache_flush(void);
/* Hits and misses of the calling thread's cache. */
void ag_sql_cache_stats(uint64_t *hits, uint64_t *misses);

/* The class bit of a policy command name ("select", "ddl", ...), 0 when unknown. */
uint64_t ag_sql_class_by_name(const char *name);
/* Comma-separated class names of a bit set into buf ("select,delete,write"). */
char *ag_sql_class_names(uint64_t classes, char *buf, size_t len);

struct ag_sql_decision {
	enum ag_action action;
	const char *rule;	/* name of the deciding rule (points into the policy), or "default" */
	size_t stmt;		/* index of the statement that decided (the most restrictive one) */
	char why[256];		/* one line: which condition matched */
};

/* The rule (agent, target) that applies, or NULL. First match wins; "*" matches any. */
const struct ag_policy_rule *ag_sql_rule_for(const struct ag_policy *p, const char *agent,
					     const char *target);
/*
 * Decides a whole parsed string: each statement against the rule's sql list (first match wins,
 * no match → deny by "default"); the string's action is the most restrictive of its statements
 * (deny > approve > observe > allow; the first statement at that level decides). rule may be
 * NULL (no rule for this agent and target: deny). A result with an error is denied.
 *
 * A rule's when: conditions must all hold. For a deny or approve rule (one that stops the
 * statement): `command` when ANY class of the statement is listed; `tables` when ANY of its
 * tables matches a glob. For an allow or observe rule (one that lets it run): `command` only
 * when EVERY class of the statement is covered (listed, implied by a listed umbrella such as
 * ddl or transaction, or brought by a covered class, as insert brings write; file, program,
 * system, role, function, do and lock only where listed; a statement with no class never);
 * `tables` only when EVERY table matches a glob (none: covered). So an allow of [select] does
 * not let through a SELECT whose CTE deletes, that calls pg_read_file or that locks rows. The
 * umbrellas are a table in sql.c and policies/README.md. Globs are fnmatch's; x also matches
 * public.x and public.x matches x. `where: absent` when an UPDATE or DELETE in it has no
 * WHERE, `where: present` when it updates or deletes and every such part has one. An empty
 * query that no rule matched is allowed by "default" (nothing runs; JDBC pings with one).
 */
void ag_sql_decide(const struct ag_policy_rule *rule, const struct ag_sql_result *r,
		   struct ag_sql_decision *d);
/*
 * The same decision for a statement about to run: d->why is filled only when the action
 * stops it (deny, approve), as ag_sql_decide fills it; an allow or observe is not explained.
 */
void ag_sql_decide_run(const struct ag_policy_rule *rule, const struct ag_sql_result *r,
		       struct ag_sql_decision *d);
/* One statement against the rule, as ag_sql_decide does for each (d->stmt is 0). */
void ag_sql_decide_stmt(const struct ag_policy_rule *rule, const struct ag_sql_stmt *s,
			struct ag_sql_decision *d);
