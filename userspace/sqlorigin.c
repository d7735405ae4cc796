// SPDX-License-Identifier: GPL-2.0
/*
 * Origin analysis of result columns; see sqlorigin.h. The parse tree comes from libpg_query as
 * JSON and is read through yajl. Results are cached by statement text and catalog (the catalog
 * stands for the column rules: it is resolved from their patterns, and the cache holds a
 * reference, so an address is never reused under a cached entry).
 */
#include <errno.h>
#include <pg_query.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yajl/yajl_tree.h>

#include "sql_shape.h"
#include "sqlorigin.h"

struct sql_origin {
	int refs;
	unsigned int n;	  /* positions known exactly */
	uint8_t *derived; /* [n] */
	bool tail;	  /* positions >= tail_from (after a '*'): derived when without origin */
	unsigned int tail_from;
};

struct rel {
	const char *schema, *name, *alias;
	bool masked; /* a covered column belongs to it */
};

struct sub {
	const char *name; /* a subquery's alias, a CTE's name, a function's alias */
	yajl_val node;	  /* its SelectStmt, or the functions of a RangeFunction */
};

struct an {
	const struct ag_masker *m;
	const struct pg_catalog *cat;
	struct rel *rels;
	size_t nrels, caprels;
	const char **names; /* names of outputs computed from masked columns (inner queries) */
	size_t nnames, capnames;
	struct sub *subs;
	size_t nsubs, capsubs;
	int depth; /* of whole-row lookups through subqueries (a recursive CTE names itself) */
	bool oom;
};

/* --- JSON helpers ---------------------------------------------------------------------------- */

static yajl_val jget(yajl_val obj, const char *key)
{
	const char *path[] = { key, NULL };

	return obj && YAJL_IS_OBJECT(obj) ? yajl_tree_get(obj, path, yajl_t_any) : NULL;
}

static const char *jstr(yajl_val obj, const char *key)
{
	yajl_val v = jget(obj, key);

	return v && YAJL_IS_STRING(v) ? YAJL_GET_STRING(v) : NULL;
}

static size_t jlen(yajl_val a)
{
	return a && YAJL_IS_ARRAY(a) ? YAJL_GET_ARRAY(a)->len : 0;
}

static yajl_val jat(yajl_val a, size_t i)
{
	return YAJL_GET_ARRAY(a)->values[i];
}

/* Element i of a, or NULL: a may be NULL or shorter (an INSERT's columns against its values). */
static yajl_val jat_or_null(yajl_val a, size_t i)
{
	return i < jlen(a) ? YAJL_GET_ARRAY(a)->values[i] : NULL;
}

static bool push(struct an *a, void *arrp, size_t *n, size_t *cap, size_t sz)
{
	void **arr = arrp;

	if (*n == *cap) {
		size_t nc = *cap ? 2 * *cap : 16;
		void *p = realloc(*arr, nc * sz);

		if (!p) {
			a->oom = true;
			return false;
		}
		*arr = p;
		*cap = nc;
	}
	return true;
}

static bool has_name(const char *const *v, size_t n, const char *s)
{
	for (size_t i = 0; s && i < n; i++)
		if (!strcmp(v[i], s))
			return true;
	return false;
}

/* A SelectStmt: wrapped as a node, or bare where the tree's field is typed (larg, rarg). */
static yajl_val sel_node(yajl_val v)
{
	yajl_val s = jget(v, "SelectStmt");

	return s ? s : (jget(v, "targetList") || jget(v, "op") ? v : NULL);
}

static void add_sub(struct an *a, const char *name, yajl_val node)
{
	if (name && push(a, &a->subs, &a->nsubs, &a->capsubs, sizeof(*a->subs)))
		a->subs[a->nsubs++] = (struct sub){ name, node };
}

static void add_name(struct an *a, const char *s)
{
	if (!s || has_name(a->names, a->nnames, s))
		return;
	if (push(a, &a->names, &a->nnames, &a->capnames, sizeof(*a->names)))
		a->names[a->nnames++] = s;
}

/* --- pass 1: the relations, subquery aliases and CTE names anywhere in the statement -------- */

static void collect(struct an *a, yajl_val v)
{
	if (!v)
		return;
	if (YAJL_IS_ARRAY(v)) {
		for (size_t i = 0; i < jlen(v); i++)
			collect(a, jat(v, i));
		return;
	}
	if (!YAJL_IS_OBJECT(v))
		return;
	for (size_t i = 0; i < YAJL_GET_OBJECT(v)->len; i++) {
		const char *k = YAJL_GET_OBJECT(v)->keys[i];
		yajl_val c = YAJL_GET_OBJECT(v)->values[i];

		/* A RangeVar: as a node, or bare in typed fields (UPDATE's relation). */
		bool rv = !strcmp(k, "RangeVar") ||
			  (!strcmp(k, "relation") && jget(c, "relpersistence"));

		if (rv && jstr(c, "relname") &&
		    push(a, &a->rels, &a->nrels, &a->caprels, sizeof(*a->rels))) {
			struct rel *r = &a->rels[a->nrels++];

			r->schema = jstr(c, "schemaname");
			r->name = jstr(c, "relname");
			r->alias = jstr(jget(c, "alias"), "aliasname");
			/* In any schema: the search_path decides which one, unsure is masked. */
			r->masked = pg_catalog_has_table(a->cat, NULL, r->name);
		} else if (!strcmp(k, "RangeSubselect")) {
			add_sub(a, jstr(jget(c, "alias"), "aliasname"),
				sel_node(jget(c, "subquery")));
		} else if (!strcmp(k, "RangeFunction")) {
			add_sub(a, jstr(jget(c, "alias"), "aliasname"), jget(c, "functions"));
		} else if (!strcmp(k, "CommonTableExpr")) {
			add_sub(a, jstr(c, "ctename"), sel_node(jget(c, "ctequery")));
		}
		collect(a, c);
	}
}

/* --- taint of an expression ------------------------------------------------------------------- */

/* A column name: covered in a table the statement reads, or computed from one inside. */
static bool name_tainted(const struct an *a, const char *col)
{
	if (has_name(a->names, a->nnames, col))
		return true;
	for (size_t i = 0; i < a->nrels; i++)
		if (ag_masker_column(a->m, a->rels[i].schema, a->rels[i].name, col) ||
		    (a->rels[i].masked && pg_catalog_has_column(a->cat, NULL, a->rels[i].name, col)))
			return true;
	return false;
}

static bool any_masked(const struct an *a)
{
	for (size_t i = 0; i < a->nrels; i++)
		if (a->rels[i].masked)
			return true;
	return a->nnames > 0;
}

static bool tainted(const struct an *a, yajl_val v);

/* Does a subquery, CTE or function in FROM put out anything derived from a masked column? */
static bool sub_tainted(struct an *a, const struct sub *sb)
{
	yajl_val sel = sel_node(sb->node);
	bool t;

	if (a->depth > 16)
		return true; /* unsure: derived */
	a->depth++;
	if (!sel)
		t = tainted(a, sb->node);
	else if (jget(sel, "larg"))
		t = tainted(a, jget(sel_node(jget(sel, "larg")), "targetList")) ||
		    tainted(a, jget(sel_node(jget(sel, "rarg")), "targetList"));
	else
		t = tainted(a, jget(sel, "targetList")) || tainted(a, jget(sel, "valuesLists"));
	a->depth--;
	return t;
}

/* A whole row (u, u.*, users): of a table with a covered column, or of a subquery or CTE. */
static bool row_tainted(const struct an *a, const char *q)
{
	if (!q)
		return any_masked(a);
	for (size_t i = 0; i < a->nrels; i++) {
		const struct rel *r = &a->rels[i];

		if (r->masked &&
		    ((r->alias && !strcmp(r->alias, q)) || (!r->alias && !strcmp(r->name, q))))
			return true;
	}
	for (size_t i = 0; i < a->nsubs; i++)
		if (!strcmp(a->subs[i].name, q) && sub_tainted((struct an *)a, &a->subs[i]))
			return true;
	return false;
}

static bool columnref_tainted(const struct an *a, yajl_val cr)
{
	yajl_val f = jget(cr, "fields");
	size_t n = jlen(f);
	const char *last, *qual = NULL;

	if (!n)
		return false;
	if (n >= 2)
		qual = jstr(jget(jat(f, n - 2), "String"), "sval");
	if (jget(jat(f, n - 1), "A_Star"))
		return row_tainted(a, qual);
	last = jstr(jget(jat(f, n - 1), "String"), "sval");
	if (!last)
		return false;
	if (name_tainted(a, last))
		return true;
	/* A bare name may be a whole row: row_to_json(u), u::text. */
	return n == 1 && row_tainted(a, last);
}

/* Is a FuncCall's (last) name one of names? */
static bool func_named(yajl_val fc, const char *const *names, size_t n)
{
	yajl_val f = jget(fc, "funcname");
	const char *nm = f && jlen(f) ? jstr(jget(jat(f, jlen(f) - 1), "String"), "sval") : NULL;

	for (size_t i = 0; nm && i < n; i++)
		if (!strcasecmp(nm, names[i]))
			return true;
	return false;
}

/*
 * Built-in functions that run SQL given as text or read a table, schema or database named by a
 * string (the query_to_xml family): what they return cannot be traced to its columns, so their
 * result is derived (this analysis only runs when the mask has column rules).
 */
static bool func_runs_sql(yajl_val fc)
{
	static const char *const names[] = {
		"query_to_xml",	      "query_to_xmlschema",	 "query_to_xml_and_xmlschema",
		"table_to_xml",	      "table_to_xmlschema",	 "table_to_xml_and_xmlschema",
		"cursor_to_xml",      "cursor_to_xmlschema",	 "schema_to_xml",
		"schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml",
		"database_to_xmlschema", "database_to_xml_and_xmlschema", "dblink",
	};

	return func_named(fc, names, sizeof(names) / sizeof(names[0]));
}

static bool tainted(const struct an *a, yajl_val v)
{
	if (!v)
		return false;
	if (YAJL_IS_ARRAY(v)) {
		for (size_t i = 0; i < jlen(v); i++)
			if (tainted(a, jat(v, i)))
				return true;
		return false;
	}
	if (!YAJL_IS_OBJECT(v))
		return false;
	for (size_t i = 0; i < YAJL_GET_OBJECT(v)->len; i++) {
		const char *k = YAJL_GET_OBJECT(v)->keys[i];
		yajl_val c = YAJL_GET_OBJECT(v)->values[i];

		if (!strcmp(k, "ColumnRef")) {
			if (columnref_tainted(a, c))
				return true;
		} else if (!strcmp(k, "FuncCall") && func_runs_sql(c)) {
			return true;
		} else if (tainted(a, c)) {
			return true;
		}
	}
	return false;
}

/* --- pass 2: names inner queries compute from masked columns, to a fixed point ---------------- */

/* The name an output column gets: its alias, a column's name, a function's name. */
static const char *target_name(yajl_val rt)
{
	yajl_val val = jget(rt, "val"), f;
	const char *nm = jstr(rt, "name");

	if (nm)
		return nm;
	if ((f = jget(jget(val, "ColumnRef"), "fields")) && jlen(f))
		return jstr(jget(jat(f, jlen(f) - 1), "String"), "sval");
	if ((f = jget(jget(val, "FuncCall"), "funcname")) && jlen(f))
		return jstr(jget(jat(f, jlen(f) - 1), "String"), "sval");
	return NULL;
}

static bool select_tainted(struct an *a, yajl_val sel);

/* Marks the names of a SELECT's (or a RETURNING list's) derived outputs; true if any. */
static bool targets_mark(struct an *a, yajl_val tl)
{
	bool any = false;

	for (size_t i = 0; i < jlen(tl); i++) {
		yajl_val rt = jget(jat(tl, i), "ResTarget");

		if (rt && tainted(a, jget(rt, "val"))) {
			add_name(a, target_name(rt));
			any = true;
		}
	}
	return any;
}

static bool select_tainted(struct an *a, yajl_val sel)
{
	bool any = false;

	if (!sel)
		return false;
	any |= select_tainted(a, sel_node(jget(sel, "larg")));
	any |= select_tainted(a, sel_node(jget(sel, "rarg")));
	any |= targets_mark(a, jget(sel, "targetList"));
	return any;
}

static void walk_marks(struct an *a, yajl_val v)
{
	if (!v)
		return;
	if (YAJL_IS_ARRAY(v)) {
		for (size_t i = 0; i < jlen(v); i++)
			walk_marks(a, jat(v, i));
		return;
	}
	if (!YAJL_IS_OBJECT(v))
		return;
	for (size_t i = 0; i < YAJL_GET_OBJECT(v)->len; i++) {
		const char *k = YAJL_GET_OBJECT(v)->keys[i];
		yajl_val c = YAJL_GET_OBJECT(v)->values[i];

		if (!strcmp(k, "SelectStmt"))
			select_tainted(a, c);
		if (!strcmp(k, "CommonTableExpr") &&
		    select_tainted(a, sel_node(jget(c, "ctequery")))) {
			yajl_val cn = jget(c, "aliascolnames");

			for (size_t j = 0; j < jlen(cn); j++)
				add_name(a, jstr(jget(jat(cn, j), "String"), "sval"));
		}
		if (!strcmp(k, "RangeSubselect") &&
		    select_tainted(a, sel_node(jget(c, "subquery")))) {
			yajl_val cn = jget(jget(c, "alias"), "colnames");

			for (size_t j = 0; j < jlen(cn); j++)
				add_name(a, jstr(jget(jat(cn, j), "String"), "sval"));
		}
		walk_marks(a, c);
	}
}

/* --- the result ------------------------------------------------------------------------------ */

static int mark_pos(struct sql_origin *o, unsigned int pos)
{
	if (pos >= o->n) {
		uint8_t *d = realloc(o->derived, pos + 1);

		if (!d)
			return -ENOMEM;
		memset(d + o->n, 0, pos + 1 - o->n);
		o->derived = d;
		o->n = pos + 1;
	}
	o->derived[pos] = 1;
	return 0;
}

/* The outputs of one target list (a SELECT's, a RETURNING list). */
static int outputs(struct an *a, yajl_val tl, struct sql_origin *o)
{
	unsigned int pos = 0;
	bool star = false;

	for (size_t i = 0; i < jlen(tl); i++) {
		yajl_val rt = jget(jat(tl, i), "ResTarget");
		yajl_val val = jget(rt, "val");
		yajl_val f = jget(jget(val, "ColumnRef"), "fields");
		bool t = tainted(a, val);

		if (jlen(f) && jget(jat(f, jlen(f) - 1), "A_Star")) {
			/* Expands to columns of a count not known here. */
			if (!star)
				o->tail_from = pos;
			star = true;
			/* Over base tables the columns have origins; over a subquery, not. */
			if (t)
				o->tail = true;
			continue;
		}
		if (star) {
			o->tail |= t;
			continue;
		}
		if (t && mark_pos(o, pos))
			return -ENOMEM;
		pos++;
	}
	return 0;
}

static int select_outputs(struct an *a, yajl_val sel, struct sql_origin *o)
{
	int err;

	if (!sel)
		return 0;
	if (jget(sel, "larg")) {
		err = select_outputs(a, sel_node(jget(sel, "larg")), o);
		return err ? err : select_outputs(a, sel_node(jget(sel, "rarg")), o);
	}
	return outputs(a, jget(sel, "targetList"), o);
}

static int stmt_outputs(struct an *a, yajl_val stmt, struct sql_origin *o)
{
	static const char *const dml[] = { "InsertStmt", "UpdateStmt", "DeleteStmt" };
	yajl_val sel = jget(stmt, "SelectStmt");

	if (jget(stmt, "ExecuteStmt") || jget(stmt, "FetchStmt")) {
		/* What it runs was prepared (declared) elsewhere: whatever has no origin. */
		o->tail = true;
		o->tail_from = 0;
		return 0;
	}
	if (sel)
		return select_outputs(a, sel, o);
	for (size_t i = 0; i < 3; i++) {
		yajl_val d = jget(stmt, dml[i]);

		if (d)
			return outputs(a, jget(d, "returningList"), o);
	}
	/* DECLARE ... CURSOR FOR: its FETCHes are not followed (a follow-up). */
	return 0;
}

static int analyze(const char *sql, const struct ag_masker *m, const struct pg_catalog *cat,
		   struct sql_origin **out)
{
	PgQueryParseResult pr = pg_query_parse(sql);
	struct sql_origin *o = NULL;
	yajl_val root = NULL, stmts;
	int err = 0;

	*out = NULL;
	if (pr.error || !pr.parse_tree)
		goto done;
	root = yajl_tree_parse(pr.parse_tree, NULL, 0);
	stmts = jget(root, "stmts");
	o = calloc(1, sizeof(*o));
	if (!o) {
		err = -ENOMEM;
		goto done;
	}
	o->refs = 1;
	for (size_t i = 0; i < jlen(stmts); i++) {
		yajl_val stmt = jget(jat(stmts, i), "stmt");
		struct an a = { .m = m, .cat = cat };

		collect(&a, stmt);
		if (!a.oom && !a.nrels) {
			err = stmt_outputs(&a, stmt, o); /* EXECUTE, FETCH */
		} else if (!a.oom) {
			/* Each round may name more outputs; names only grow. */
			for (size_t prev = (size_t)-1; !a.oom && prev != a.nnames;) {
				prev = a.nnames;
				walk_marks(&a, stmt);
			}
			if (!a.oom)
				err = stmt_outputs(&a, stmt, o);
		}
		if (a.oom)
			err = -ENOMEM;
		free(a.rels);
		free(a.names);
		free(a.subs);
		if (err)
			break;
	}
	if (err || (!o->n && !o->tail)) {
		sql_origin_unref(o);
		o = NULL;
	}
	*out = o;
done:
	yajl_tree_free(root);
	pg_query_free_parse_result(pr);
	return err;
}

/* Functions that keep a value where a later statement reads it back unmasked. */
static bool func_stores(yajl_val fc)
{
	static const char *const names[] = {
		"set_config", "pg_notify", "setval", "lo_from_bytea", "lo_put", "lowrite",
		"pg_logical_emit_message",
	};

	return func_named(fc, names, sizeof(names) / sizeof(names[0]));
}

/* Is column col of relation rv (a RangeVar) covered by a rule, so masked when read back? */
static bool dest_covered(const struct an *a, yajl_val rv, const char *col)
{
	const char *rel = jstr(rv, "relname");

	return rel && col && ag_masker_column(a->m, jstr(rv, "schemaname"), rel, col);
}

/*
 * Values stored into columns of rv: names (a ResTarget list: an INSERT's columns), or by_name
 * the outputs' own names (CREATE TABLE AS), else unknown, for the outputs of sel, a SELECT or
 * VALUES. Tainted unless each value computed from a masked column goes to a covered column.
 */
static bool rows_tainted(const struct an *a, yajl_val rv, yajl_val names, bool by_name,
			 yajl_val sel)
{
	yajl_val tl, vl;

	sel = sel_node(sel);
	if (!sel || jget(sel, "larg"))
		return tainted(a, sel); /* a UNION: not followed position by position */
	if ((vl = jget(sel, "valuesLists"))) {
		for (size_t r = 0; r < jlen(vl); r++) {
			yajl_val row = jget(jat(vl, r), "List") ? jget(jget(jat(vl, r), "List"),
								  "items")
								: jat(vl, r);

			for (size_t i = 0; i < jlen(row); i++)
				if (tainted(a, jat(row, i)) &&
				    !dest_covered(a, rv,
						  jstr(jget(jat_or_null(names, i), "ResTarget"),
						       "name")))
					return true;
		}
		return false;
	}
	tl = jget(sel, "targetList");
	for (size_t i = 0; i < jlen(tl); i++) {
		yajl_val rt = jget(jat(tl, i), "ResTarget");
		const char *col = names	  ? jstr(jget(jat_or_null(names, i), "ResTarget"), "name")
				  : by_name ? target_name(rt)
					    : NULL; /* an INSERT without columns: by position */
		yajl_val f = jget(jget(jget(rt, "val"), "ColumnRef"), "fields");

		if (jlen(f) && jget(jat(f, jlen(f) - 1), "A_Star"))
			col = NULL; /* expands to columns not known here */
		if (tainted(a, jget(rt, "val")) && !dest_covered(a, rv, col))
			return true;
	}
	/* What else the query reads (WHERE, FROM's subqueries) is not stored. */
	return false;
}

/* Does relation rv (a RangeVar) have a covered column? */
static bool rel_masked(const struct an *a, yajl_val rv)
{
	const char *rel = jstr(rv, "relname");

	return rel && (pg_catalog_has_table(a->cat, NULL, rel) ||
		       ag_masker_column(a->m, jstr(rv, "schemaname"), rel, "*"));
}

/*
 * A rename that takes a covered column, or a table with one, out from under its rule's name
 * (ALTER TABLE users RENAME email TO contact; ALTER TABLE users RENAME TO people).
 */
static bool renames_covered(const struct an *a, yajl_val rs)
{
	const char *type = jstr(rs, "renameType");
	yajl_val rv = jget(rs, "relation");

	if (!type || !rv)
		return false;
	if (!strcmp(type, "OBJECT_COLUMN"))
		return dest_covered(a, rv, jstr(rs, "subname"));
	return !strcmp(type, "OBJECT_TABLE") || !strcmp(type, "OBJECT_VIEW") ||
			       !strcmp(type, "OBJECT_MATVIEW") || !strcmp(type, "OBJECT_FOREIGN_TABLE") ?
		       rel_masked(a, rv) :
		       false;
}

/* An UPDATE's SET list: each value from a masked column must go to a covered column. */
static bool sets_tainted(const struct an *a, yajl_val rv, yajl_val tl)
{
	for (size_t i = 0; i < jlen(tl); i++) {
		yajl_val rt = jget(jat(tl, i), "ResTarget");

		if (tainted(a, jget(rt, "val")) && !dest_covered(a, rv, jstr(rt, "name")))
			return true;
	}
	return false;
}

/*
 * Anywhere in v (a CTE's INSERT, a PREPARE's or EXPLAIN's statement included): a place that
 * stores values computed from a masked column: an INSERT's rows (its query or VALUES), an
 * UPDATE's or MERGE's assignments, CREATE TABLE AS / MATERIALIZED VIEW, SELECT INTO, or the
 * arguments of a function that keeps them (set_config, pg_notify, ...). Its kind, or NULL.
 */
static const char *stores_masked(const struct an *a, yajl_val v)
{
	const char *k;

	if (!v)
		return NULL;
	if (YAJL_IS_ARRAY(v)) {
		for (size_t i = 0; i < jlen(v); i++)
			if ((k = stores_masked(a, jat(v, i))))
				return k;
		return NULL;
	}
	if (!YAJL_IS_OBJECT(v))
		return NULL;
	for (size_t i = 0; i < YAJL_GET_OBJECT(v)->len; i++) {
		const char *key = YAJL_GET_OBJECT(v)->keys[i];
		yajl_val c = YAJL_GET_OBJECT(v)->values[i];

		if (!strcmp(key, "InsertStmt") &&
		    (rows_tainted(a, jget(c, "relation"), jget(c, "cols"), false,
				  jget(c, "selectStmt")) ||
		     sets_tainted(a, jget(c, "relation"),
				  jget(jget(c, "onConflictClause"), "targetList"))))
			return "INSERT";
		if (!strcmp(key, "RenameStmt") && renames_covered(a, c))
			return "a rename";
		if (!strcmp(key, "AlterObjectSchemaStmt") && rel_masked(a, jget(c, "relation")))
			return "a move to another schema";
		if (!strcmp(key, "UpdateStmt") &&
		    sets_tainted(a, jget(c, "relation"), jget(c, "targetList")))
			return "UPDATE";
		if (!strcmp(key, "MergeStmt") && tainted(a, jget(c, "mergeWhenClauses")))
			return "MERGE";
		if (!strcmp(key, "CreateTableAsStmt") &&
		    (jget(jget(c, "into"), "colNames") ?
			     tainted(a, jget(c, "query")) :
			     rows_tainted(a, jget(jget(c, "into"), "rel"), NULL, true,
					  jget(c, "query"))))
			return "CREATE TABLE AS";
		if (!strcmp(key, "SelectStmt") && jget(c, "intoClause") &&
		    rows_tainted(a, jget(jget(c, "intoClause"), "rel"), NULL, true, (yajl_val)v))
			return "SELECT INTO";
		if (!strcmp(key, "FuncCall") && func_stores(c) && tainted(a, jget(c, "args")))
			return "a function that keeps its arguments";
		if ((k = stores_masked(a, c)))
			return k;
	}
	return NULL;
}

int sql_origin_stores_masked(const char *sql, const struct ag_masker *m,
			     const struct pg_catalog *cat, const char **kind)
{
	PgQueryParseResult pr;
	yajl_val root = NULL, stmts;
	int ret = 0;

	*kind = NULL;
	if (!cat || !m)
		return 0;
	pr = pg_query_parse(sql);
	if (pr.error || !pr.parse_tree)
		goto done;
	root = yajl_tree_parse(pr.parse_tree, NULL, 0);
	if (!root) {
		ret = -ENOMEM;
		goto done;
	}
	stmts = jget(root, "stmts");
	for (size_t i = 0; !ret && i < jlen(stmts); i++) {
		yajl_val stmt = jget(jat(stmts, i), "stmt");
		struct an a = { .m = m, .cat = cat };

		collect(&a, stmt);
		for (size_t prev = (size_t)-1; !a.oom && prev != a.nnames;) {
			prev = a.nnames;
			walk_marks(&a, stmt);
		}
		if (a.oom)
			ret = -ENOMEM;
		else if ((*kind = stores_masked(&a, stmt)))
			ret = 1;
		free(a.rels);
		free(a.names);
		free(a.subs);
	}
	if (ret <= 0)
		*kind = NULL;
done:
	yajl_tree_free(root);
	pg_query_free_parse_result(pr);
	return ret;
}

struct sql_origin *sql_origin_ref(struct sql_origin *o)
{
	if (o)
		__atomic_add_fetch(&o->refs, 1, __ATOMIC_RELAXED);
	return o;
}

void sql_origin_unref(struct sql_origin *o)
{
	if (!o || __atomic_sub_fetch(&o->refs, 1, __ATOMIC_ACQ_REL))
		return;
	free(o->derived);
	free(o);
}

bool sql_origin_derived(const struct sql_origin *o, unsigned int pos, uint32_t table)
{
	if (!o)
		return false;
	if (o->tail && pos >= o->tail_from)
		return !table || (pos < o->n && o->derived[pos]);
	return pos < o->n && o->derived[pos];
}

/* --- the cache ------------------------------------------------------------------------------- */

#define ORIGIN_CACHE 256
#define ORIGIN_MAX_SQL 8192 /* longer statements are analysed every time */

struct origin_slot {
	char *key; /* the statement's shape key (sql_shape.c), or its text when it has none */
	size_t klen;
	bool shaped; /* key is a shape key, not text: the two never match each other */
	struct pg_catalog *cat; /* a reference: the key's address stays this catalog's */
	uint64_t m_id;		/* ag_masker_id(): the answer depends on its column rules too */
	struct sql_origin *o;
};

static pthread_mutex_t origin_lock = PTHREAD_MUTEX_INITIALIZER;
static struct origin_slot origin_cache[ORIGIN_CACHE];

/*
 * Which output columns derive from masked ones depends on names only (columns, tables,
 * functions, aliases: identifiers), never on a constant's value: statements of one shape (the
 * lexer's tokens, constants by kind) share the answer, so pgbench-style traffic with a new
 * literal each time is analysed once.
 */
int sql_origin_analyze(const char *sql, const struct ag_masker *m, const struct pg_catalog *cat,
		       struct sql_origin **out)
{
	struct origin_slot *s;
	size_t len = strlen(sql), klen;
	const char *peek;
	char *key;
	bool shaped = true;
	int err;

	*out = NULL;
	if (!cat || !m)
		return 0; /* no column rules */
	if (len > ORIGIN_MAX_SQL)
		return analyze(sql, m, cat, out);
	/* The key is looked up where it is, copied only to be kept. */
	if (ag_sql_shape_key_peek(sql, len, &peek, &klen)) {
		shaped = false;
		peek = sql;
		klen = len;
	}
	s = &origin_cache[(ag_sql_hash_text(peek, klen) ^ (uintptr_t)cat ^
			   ag_masker_id(m) * 0x9e3779b97f4a7c15ull) % ORIGIN_CACHE];
	pthread_mutex_lock(&origin_lock);
	if (s->key && s->cat == cat && s->m_id == ag_masker_id(m) && s->shaped == shaped &&
	    s->klen == klen && !memcmp(s->key, peek, klen)) {
		*out = sql_origin_ref(s->o);
		pthread_mutex_unlock(&origin_lock);
		return 0;
	}
	pthread_mutex_unlock(&origin_lock);
	key = malloc(klen ? klen : 1);
	if (!key)
		return analyze(sql, m, cat, out);
	memcpy(key, peek, klen);
	err = analyze(sql, m, cat, out);
	if (err) {
		free(key);
		return err;
	}
	pthread_mutex_lock(&origin_lock);
	free(s->key);
	pg_catalog_unref(s->cat);
	sql_origin_unref(s->o);
	s->key = key;
	s->klen = klen;
	s->shaped = shaped;
	s->cat = pg_catalog_ref((struct pg_catalog *)cat);
	s->m_id = ag_masker_id(m);
	s->o = sql_origin_ref(*out);
	pthread_mutex_unlock(&origin_lock);
	return 0;
}
