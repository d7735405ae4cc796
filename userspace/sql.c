// SPDX-License-Identifier: GPL-2.0
/*
 * SQL classification with the PostgreSQL parser itself. libpg_query parses the string and hands
 * back its raw parse tree as JSON; yajl reads that into a small tree in one arena, and a walker
 * classifies each statement by what its tree contains, wherever it sits: data-modifying
 * statements inside CTEs and subqueries, row locks, SELECT INTO, COPY to or from programs and
 * server files, function calls that reach files, large objects, other backends or settings,
 * EXPLAIN ANALYZE (which runs its statement) and PREPARE (whose statement runs later). Text is
 * never matched: comments, case, quoting, dollar quoting and unicode escapes are the parser's
 * business. Then the policy's sql rules decide (first match wins, no match denies): a deny or
 * approve rule matches a statement when any of its classes is listed, an allow or observe rule
 * only when every one is covered (see "How a rule's when: matches" below).
 *
 * Why JSON and not the protobuf output: on this libpg_query (15-4.0), for a pgbench-sized
 * statement, the protobuf path costs about 18 µs to serialize and 10 µs to unpack (protobuf-c
 * visits all ~250 oneof fields of every Node) against 4 µs for the JSON and 2 µs for yajl's
 * event parser (its tree API alone takes 10 µs). Both outputs recurse once per tree level, the
 * protobuf one with about three times the stack (a 60 KB `SELECT 1+1+...` crashed
 * pg_query_parse_protobuf on an 8 MiB stack) and protobuf-c's unpack with about 1 KiB more per
 * level. Here yajl keeps its stack on the heap, the tree is depth-limited, and libpg_query's
 * JSON output (measured at most 64 bytes of stack per byte of SQL) runs on a thread with a
 * stack sized for the statement whenever the caller's stack might be too small for it.
 *
 * Results are cached per thread, keyed by the statement text (compared in full, never by hash
 * alone), so a repeated statement costs a copy rather than a parse; behind it, a cache keyed
 * by the statement's shape (its tokens, constants by kind only: sql_shape.c) answers the same
 * statement with other constants, when its classification read no constant's value.
 */
#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <pg_query.h>
#include <yajl/yajl_parse.h>

#include "sql.h"
#include "sql_shape.h"

/* Tree depth (JSON levels, about three per SQL nesting level) beyond which a string is refused. */
#define MAX_DEPTH 10000
/*
 * Stack the classifier may need: libpg_query's recursive output per byte of SQL (measured at
 * most 64; four times that), the walker per level of tree, and a fixed margin.
 */
#define STACK_PER_BYTE 256
#define STACK_PER_LEVEL 320
#define STACK_MARGIN (512u << 10)
/* Per-thread result cache: entries, and the longest statement text worth keeping. */
#define CACHE_SLOTS 256
#define CACHE_MAX_TEXT 4096

/* ---- class names: the policy's `command:` values, one per bit ---- */

/* clang-format off */
const char *const ag_sql_command_names[AG_SQL_NCLASSES + 1] = {
	"select", "insert", "update", "delete", "merge", "copy", "ddl", "create", "alter", "drop",
	"truncate", "comment", "grant", "revoke", "role", "function", "transaction", "set",
	"utility", "lock", "file", "program", "system", "prepare", "execute", "deallocate",
	"explain", "call", "do", "notify", "discard", "refresh", "begin", "commit", "rollback",
	"savepoint", "show", "reset", "vacuum", "analyze", "cluster", "reindex", "listen",
	"unlisten", "write", "empty", NULL
};
/* clang-format on */

_Static_assert(AG_SQL_EMPTY == 1ULL << (AG_SQL_NCLASSES - 1), "one name per class bit");
_Static_assert(AG_SQL_REFRESH == 1ULL << 31 && AG_SQL_VACUUM == 1ULL << 38, "bit order");

/* Bit numbers in the order of their names (all lower case), for a binary search. */
static uint8_t name_order[AG_SQL_NCLASSES];
static pthread_once_t name_order_once = PTHREAD_ONCE_INIT;

static int name_order_cmp(const void *a, const void *b)
{
	return strcmp(ag_sql_command_names[*(const uint8_t *)a],
		      ag_sql_command_names[*(const uint8_t *)b]);
}

static void name_order_init(void)
{
	for (int i = 0; i < AG_SQL_NCLASSES; i++)
		name_order[i] = i;
	qsort(name_order, AG_SQL_NCLASSES, sizeof(name_order[0]), name_order_cmp);
}

/* Every decision looks up each name of a rule's command: list, so not one by one. */
uint64_t ag_sql_class_by_name(const char *name)
{
	int lo = 0, hi = AG_SQL_NCLASSES;
	char low[16];
	size_t i;

	if (!name)
		return 0;
	for (i = 0; name[i]; i++) {
		if (i == sizeof(low) - 1)
			return 0; /* longer than any class name */
		low[i] = tolower((unsigned char)name[i]);
	}
	low[i] = '\0';
	pthread_once(&name_order_once, name_order_init);
	while (lo < hi) {
		int mid = (lo + hi) / 2, c;

		c = strcmp(low, ag_sql_command_names[name_order[mid]]);
		if (!c)
			return 1ULL << name_order[mid];
		if (c < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return 0;
}

/*
 * Appends sep (when buf has something) and s to the string in buf, at o, its length; whole or
 * not at all. The new length, or len when it did not fit (and buf is unchanged).
 */
static size_t append(char *buf, size_t len, size_t o, const char *sep, const char *s)
{
	size_t ls = o ? strlen(sep) : 0, n = strlen(s);

	if (o >= len || ls + n >= len - o)
		return len;
	memcpy(buf + o, sep, ls);
	memcpy(buf + o + ls, s, n + 1);
	return o + ls + n;
}

char *ag_sql_class_names(uint64_t classes, char *buf, size_t len)
{
	size_t o = 0;

	if (!len)
		return buf;
	buf[0] = '\0';
	for (int i = 0; i < AG_SQL_NCLASSES; i++) {
		if (!(classes & (1ULL << i)))
			continue;
		o = append(buf, len, o, ",", ag_sql_command_names[i]);
		if (o == len)
			break; /* never half a name */
	}
	return buf;
}

/* ---- an arena for the tree ---- */

struct arena_blk {
	struct arena_blk *next;
	size_t cap, used;
	char data[];
};

struct arena {
	struct arena_blk *head;
};

#define ARENA_BLOCK (16u << 10)

struct cache;
static __thread struct cache *tcache;
/* A thread with a cache keeps one first block for its next tree (freed with the cache). */
static __thread struct arena_blk *spare_blk;

static void *arena_alloc(struct arena *a, size_t n)
{
	struct arena_blk *b = a->head;

	n = (n + 7) & ~(size_t)7;
	if (!b && spare_blk && n <= spare_blk->cap) {
		b = a->head = spare_blk;
		spare_blk = NULL;
		b->used = 0;
		b->next = NULL;
	}
	if (!b || b->cap - b->used < n) {
		size_t cap = n > ARENA_BLOCK ? n : ARENA_BLOCK;

		if (b && b->cap * 2 > cap && b->cap < (1u << 20))
			cap = b->cap * 2;
		b = malloc(sizeof(*b) + cap);
		if (!b)
			return NULL;
		b->cap = cap;
		b->used = 0;
		b->next = a->head;
		a->head = b;
	}
	b->used += n;
	return b->data + b->used - n;
}

static char *arena_strndup(struct arena *a, const char *s, size_t n)
{
	char *d = arena_alloc(a, n + 1);

	if (d) {
		memcpy(d, s, n);
		d[n] = '\0';
	}
	return d;
}

static void arena_free(struct arena *a)
{
	while (a->head) {
		struct arena_blk *n = a->head->next;

		if (!n && tcache && !spare_blk && a->head->cap == ARENA_BLOCK)
			spare_blk = a->head;
		else
			free(a->head);
		a->head = n;
	}
}

/* ---- libpg_query's JSON as a tree (yajl events → arena nodes) ---- */

enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_OBJ, J_ARR };

struct jv {
	const char *key; /* in the parent object; NULL in an array */
	const char *s;	 /* J_STR, J_NUM */
	struct jv *kids; /* J_OBJ, J_ARR */
	struct jv *next;
	uint8_t t;
	bool b;
};

struct jbuild {
	struct arena *a;
	struct jv **open; /* containers being filled, and the last child of each */
	struct jv **tail;
	int depth, cap;
	const char *key;
	struct jv *root;
	int err;
};

static struct jv *jb_add(struct jbuild *b, enum jtype t)
{
	struct jv *v = arena_alloc(b->a, sizeof(*v));

	if (!v) {
		b->err = -ENOMEM;
		return NULL;
	}
	memset(v, 0, sizeof(*v));
	v->t = t;
	v->key = b->key;
	b->key = NULL;
	if (!b->depth) {
		b->root = v;
	} else {
		if (b->tail[b->depth - 1])
			b->tail[b->depth - 1]->next = v;
		else
			b->open[b->depth - 1]->kids = v;
		b->tail[b->depth - 1] = v;
	}
	return v;
}

static int jb_scalar(void *ctx, enum jtype t, const char *s, size_t n, bool bv)
{
	struct jbuild *b = ctx;
	struct jv *v = jb_add(b, t);

	if (!v)
		return 0;
	v->b = bv;
	if (s && !(v->s = arena_strndup(b->a, s, n))) {
		b->err = -ENOMEM;
		return 0;
	}
	return 1;
}

static int jb_null(void *ctx)
{
	return jb_scalar(ctx, J_NULL, NULL, 0, false);
}

static int jb_bool(void *ctx, int v)
{
	return jb_scalar(ctx, J_BOOL, NULL, 0, v);
}

static int jb_number(void *ctx, const char *s, size_t n)
{
	return jb_scalar(ctx, J_NUM, s, n, false);
}

static int jb_string(void *ctx, const unsigned char *s, size_t n)
{
	return jb_scalar(ctx, J_STR, (const char *)s, n, false);
}

static int jb_open(void *ctx, enum jtype t)
{
	struct jbuild *b = ctx;
	struct jv *v;

	if (b->depth >= MAX_DEPTH) {
		b->err = -E2BIG;
		return 0;
	}
	if (b->depth == b->cap) {
		int cap = b->cap ? b->cap * 2 : 64;
		struct jv **o = realloc(b->open, cap * sizeof(*o));

		if (o)
			b->open = o;
		o = o ? realloc(b->tail, cap * sizeof(*o)) : NULL;
		if (!o) {
			b->err = -ENOMEM;
			return 0;
		}
		b->tail = o;
		b->cap = cap;
	}
	v = jb_add(b, t);
	if (!v)
		return 0;
	b->open[b->depth] = v;
	b->tail[b->depth] = NULL;
	b->depth++;
	return 1;
}

static int jb_start_map(void *ctx)
{
	return jb_open(ctx, J_OBJ);
}

static int jb_start_array(void *ctx)
{
	return jb_open(ctx, J_ARR);
}

static int jb_close(void *ctx)
{
	struct jbuild *b = ctx;

	b->depth--;
	return 1;
}

static int jb_key(void *ctx, const unsigned char *s, size_t n)
{
	struct jbuild *b = ctx;

	b->key = arena_strndup(b->a, (const char *)s, n);
	if (!b->key) {
		b->err = -ENOMEM;
		return 0;
	}
	return 1;
}

static const yajl_callbacks jb_callbacks = {
	.yajl_null = jb_null,
	.yajl_boolean = jb_bool,
	.yajl_number = jb_number,
	.yajl_string = jb_string,
	.yajl_start_map = jb_start_map,
	.yajl_map_key = jb_key,
	.yajl_end_map = jb_close,
	.yajl_start_array = jb_start_array,
	.yajl_end_array = jb_close,
};

/* 0 and *root, -E2BIG (nested deeper than MAX_DEPTH), -ENOMEM, or -EINVAL (not JSON). */
static int json_tree(const char *json, struct arena *a, struct jv **root)
{
	struct jbuild b = { .a = a };
	yajl_status st;
	yajl_handle h;

	h = yajl_alloc(&jb_callbacks, NULL, &b);
	if (!h)
		return -ENOMEM;
	/* Literals keep whatever bytes the SQL had; the structure is what matters here. */
	yajl_config(h, yajl_dont_validate_strings, 1);
	st = yajl_parse(h, (const unsigned char *)json, strlen(json));
	if (st == yajl_status_ok)
		st = yajl_complete_parse(h);
	yajl_free(h);
	free(b.open);
	free(b.tail);
	if (b.err)
		return b.err;
	if (st != yajl_status_ok || !b.root || b.root->t != J_OBJ)
		return -EINVAL;
	*root = b.root;
	return 0;
}

static const struct jv *jfind(const struct jv *o, const char *key)
{
	if (!o || o->t != J_OBJ)
		return NULL;
	for (const struct jv *k = o->kids; k; k = k->next)
		if (!strcmp(k->key, key))
			return k;
	return NULL;
}

/* Set when the walk reads a field that holds a constant's value (see jget). */
static __thread bool literal_read;

/*
 * Fields of the raw parse tree that hold what a constant of the SQL says: A_Const's and the
 * value nodes' (sval, ival, fval, boolval, bsval), and the statement fields filled from a
 * string constant (COPY's and LOAD's filename, NOTIFY's payload, COMMENT's comment, SECURITY
 * LABEL's label, a subscription's conninfo, a prepared transaction's gid, a tablespace's
 * location). Reading one makes the classification hold for this text only (literal_read).
 */
static bool is_value_field(const char *key)
{
	/* clang-format off */
	static const char *const f[] = {
		"sval", "ival", "fval", "boolval", "bsval", "filename", "payload", "comment",
		"label", "conninfo", "gid", "location", NULL
	};
	/* clang-format on */

	for (int i = 0; f[i]; i++)
		if (!strcmp(key, f[i]))
			return true;
	return false;
}

/*
 * A field of o; every read of a value field through here sets literal_read, found or not:
 * libpg_query leaves out zeros and false, so ANALYZE 0 is an Integer without an ival.
 */
static const struct jv *jget(const struct jv *o, const char *key)
{
	if (o && is_value_field(key))
		literal_read = true;
	return jfind(o, key);
}

static const char *jstr(const struct jv *o, const char *key)
{
	const struct jv *v = jget(o, key);

	return v && v->t == J_STR ? v->s : NULL;
}

/* libpg_query leaves false booleans and zero numbers out. */
static bool jbool(const struct jv *o, const char *key)
{
	const struct jv *v = jget(o, key);

	return v && v->t == J_BOOL && v->b;
}

static long jlong(const struct jv *o, const char *key)
{
	const struct jv *v = jget(o, key);

	return v && v->t == J_NUM ? strtol(v->s, NULL, 10) : 0;
}

/* {"TypeName": {...}} is a Node; its type and fields. */
static const struct jv *jnode(const struct jv *v, const char **type)
{
	if (!v || v->t != J_OBJ || !v->kids || v->kids->next || v->kids->t != J_OBJ ||
	    !isupper((unsigned char)v->kids->key[0]))
		return NULL;
	*type = v->kids->key;
	return v->kids;
}

/*
 * The text of a String node ({"String": {"sval": "x"}}) that names something, or NULL: only for
 * lists the grammar builds from identifiers and keywords alone (function names, ColumnRef
 * fields, indirection, DROP and COMMENT object names), so reading it does not set
 * literal_read. A String that may hold a constant (a DefElem's arg) is read with jstr.
 */
static const char *jstring_node(const struct jv *v)
{
	const char *type;
	const struct jv *f = jnode(v, &type), *s;

	if (!f || strcmp(type, "String"))
		return NULL;
	s = jfind(f, "sval");
	return s && s->t == J_STR ? s->s : NULL;
}

/* ---- the walker ---- */

struct tab {
	const char *schema; /* NULL when the SQL did not qualify it */
	const char *rel;
};

struct acc {
	uint64_t classes;
	bool where_absent;
	const char *execute_name;
	const char *prepare_name;
	size_t tab_first, ntabs;
	int location, length;
};

struct walk {
	struct acc *cur;
	int suppress; /* inside EXPLAIN without ANALYZE: nothing runs */
	const char **ctes;
	size_t nctes, capctes;
	struct tab *tabs;
	size_t ntabs, captabs;
	int err;
};

static void add_class(struct walk *w, uint64_t c)
{
	if (!w->suppress)
		w->cur->classes |= c;
}

/* scoped: a CTE of that name would hide it (false for what a statement writes to). */
static void add_table(struct walk *w, const char *schema, const char *rel, bool scoped)
{
	struct acc *a = w->cur;

	if (!rel || !*rel)
		return;
	if (schema && !*schema)
		schema = NULL;
	/* A CTE's name is not a table, but a qualified name always is. */
	if (!schema && scoped)
		for (size_t i = w->nctes; i-- > 0;)
			if (!strcmp(w->ctes[i], rel))
				return;
	for (size_t i = a->tab_first; i < w->ntabs; i++) {
		const struct tab *t = &w->tabs[i];

		if (!strcmp(t->rel, rel) &&
		    (t->schema == schema || (t->schema && schema && !strcmp(t->schema, schema))))
			return;
	}
	if (w->ntabs == w->captabs) {
		size_t cap = w->captabs ? w->captabs * 2 : 16;
		struct tab *n = realloc(w->tabs, cap * sizeof(*n));

		if (!n) {
			w->err = -ENOMEM;
			return;
		}
		w->tabs = n;
		w->captabs = cap;
	}
	w->tabs[w->ntabs++] = (struct tab){ schema, rel };
	a->ntabs++;
}

/* A relation named by a list of String nodes ([schema,] name), as DROP and COMMENT give it. */
static void add_table_list(struct walk *w, const struct jv *list, bool drop_last)
{
	const char *names[4];
	int n = 0;
	const char *type;
	const struct jv *f = jnode(list, &type);

	if (f && !strcmp(type, "List"))
		list = jget(f, "items");
	if (!list || list->t != J_ARR)
		return;
	for (const struct jv *k = list->kids; k; k = k->next) {
		const char *s = jstring_node(k);

		if (!s || n == 4)
			return;
		names[n++] = s;
	}
	if (drop_last)
		n--;
	if (n == 1)
		add_table(w, NULL, names[0], false);
	else if (n >= 2) /* [catalog,] schema, name */
		add_table(w, names[n - 2], names[n - 1], false);
}

static void push_cte(struct walk *w, const char *name)
{
	if (w->nctes == w->capctes) {
		size_t cap = w->capctes ? w->capctes * 2 : 8;
		const char **n = realloc(w->ctes, cap * sizeof(*n));

		if (!n) {
			w->err = -ENOMEM;
			return;
		}
		w->ctes = n;
		w->capctes = cap;
	}
	w->ctes[w->nctes++] = name;
}

static void visit(struct walk *w, const struct jv *v, bool top);

/*
 * WITH: a CTE's name hides a table of that name in the statement and, when RECURSIVE, in every
 * CTE of the clause; otherwise only in the CTEs after it. The caller drops the names again.
 */
static void visit_with(struct walk *w, const struct jv *with)
{
	const struct jv *ctes = jget(with, "ctes");
	bool rec = jbool(with, "recursive");
	const char *type;

	if (!ctes || ctes->t != J_ARR)
		return;
	if (rec)
		for (const struct jv *c = ctes->kids; c; c = c->next) {
			const struct jv *f = jnode(c, &type);

			if (f && jstr(f, "ctename"))
				push_cte(w, jstr(f, "ctename"));
		}
	for (const struct jv *c = ctes->kids; c; c = c->next) {
		const struct jv *f = jnode(c, &type);

		if (!f)
			continue;
		visit(w, jget(f, "ctequery"), false);
		if (!rec && jstr(f, "ctename"))
			push_cte(w, jstr(f, "ctename"));
	}
}

/* Any struct of the tree, Node or not: a RangeVar is a table, a WITH opens a scope. */
static void visit_fields(struct walk *w, const struct jv *o)
{
	const struct jv *with = NULL, *rel = NULL, *schema = NULL;
	size_t mark = w->nctes;

	/* One pass over the keys (this runs for every object of the tree). */
	for (const struct jv *k = o->kids; k; k = k->next) {
		if (k->key[0] == 'w' && k->t == J_OBJ && !strcmp(k->key, "withClause"))
			with = k;
		else if (k->key[0] == 'r' && k->t == J_STR && !strcmp(k->key, "relname"))
			rel = k;
		else if (k->key[0] == 's' && k->t == J_STR && !strcmp(k->key, "schemaname"))
			schema = k;
	}
	if (with)
		visit_with(w, with);
	if (rel)
		add_table(w, schema ? schema->s : NULL, rel->s, true);
	for (const struct jv *k = o->kids; k && !w->err; k = k->next)
		if (k != with && (k->t == J_OBJ || k->t == J_ARR))
			visit(w, k, false);
	w->nctes = mark;
}

/*
 * The table a statement writes to: INSERT, UPDATE, DELETE and MERGE targets and SELECT INTO's
 * new table are never a CTE, whatever the WITH around them names (PostgreSQL's setTargetTable:
 * "CTEs don't hide tables").
 */
static void add_target(struct walk *w, const struct jv *rangevar)
{
	if (rangevar)
		add_table(w, jstr(rangevar, "schemaname"), jstr(rangevar, "relname"), false);
}

/* ---- functions that reach past the tables ---- */

struct func_class {
	const char *name;
	uint64_t classes;
};

#define F_FILE AG_SQL_FILE
#define F_FILE_W (AG_SQL_FILE | AG_SQL_WRITE)

/* Sorted at first use. Matched on the last name part: pg_catalog.x is x. */
static struct func_class funcs[] = {
	/* server files (adminpack's too) */
	{ "pg_read_file", F_FILE },
	{ "pg_read_binary_file", F_FILE },
	{ "pg_ls_dir", F_FILE },
	{ "pg_stat_file", F_FILE },
	{ "pg_ls_logdir", F_FILE },
	{ "pg_ls_waldir", F_FILE },
	{ "pg_ls_tmpdir", F_FILE },
	{ "pg_ls_archive_statusdir", F_FILE },
	{ "pg_ls_logicalsnapdir", F_FILE },
	{ "pg_ls_logicalmapdir", F_FILE },
	{ "pg_ls_replslotdir", F_FILE },
	{ "pg_current_logfile", F_FILE },
	{ "pg_logdir_ls", F_FILE },
	{ "pg_file_write", F_FILE_W },
	{ "pg_file_rename", F_FILE_W },
	{ "pg_file_unlink", F_FILE_W },
	{ "pg_file_sync", F_FILE_W },
	/* large objects */
	{ "lo_import", F_FILE_W },
	{ "lo_export", F_FILE_W },
	{ "lo_from_bytea", F_FILE_W },
	{ "lo_put", F_FILE_W },
	{ "lowrite", F_FILE_W },
	{ "lo_create", F_FILE_W },
	{ "lo_creat", F_FILE_W },
	{ "lo_unlink", F_FILE_W },
	{ "lo_truncate", F_FILE_W },
	{ "lo_truncate64", F_FILE_W },
	{ "lo_get", F_FILE },
	{ "loread", F_FILE },
	{ "lo_open", F_FILE },
	{ "lo_close", F_FILE },
	{ "lo_lseek", F_FILE },
	{ "lo_lseek64", F_FILE },
	{ "lo_tell", F_FILE },
	{ "lo_tell64", F_FILE },
	/* other backends, the server, replication */
	{ "pg_terminate_backend", AG_SQL_SYSTEM },
	{ "pg_cancel_backend", AG_SQL_SYSTEM },
	{ "pg_reload_conf", AG_SQL_SYSTEM },
	{ "pg_rotate_logfile", AG_SQL_SYSTEM },
	{ "pg_promote", AG_SQL_SYSTEM },
	{ "pg_switch_wal", AG_SQL_SYSTEM },
	{ "pg_create_restore_point", AG_SQL_SYSTEM },
	{ "pg_backup_start", AG_SQL_SYSTEM },
	{ "pg_backup_stop", AG_SQL_SYSTEM },
	{ "pg_start_backup", AG_SQL_SYSTEM },
	{ "pg_stop_backup", AG_SQL_SYSTEM },
	{ "pg_create_physical_replication_slot", AG_SQL_SYSTEM },
	{ "pg_create_logical_replication_slot", AG_SQL_SYSTEM },
	{ "pg_copy_physical_replication_slot", AG_SQL_SYSTEM },
	{ "pg_copy_logical_replication_slot", AG_SQL_SYSTEM },
	{ "pg_drop_replication_slot", AG_SQL_SYSTEM },
	{ "pg_replication_slot_advance", AG_SQL_SYSTEM },
	{ "pg_logical_slot_get_changes", AG_SQL_SYSTEM },
	{ "pg_logical_slot_get_binary_changes", AG_SQL_SYSTEM },
	{ "pg_logical_slot_peek_changes", AG_SQL_SYSTEM },
	{ "pg_logical_slot_peek_binary_changes", AG_SQL_SYSTEM },
	{ "pg_logical_emit_message", AG_SQL_SYSTEM },
	{ "pg_wal_replay_pause", AG_SQL_SYSTEM },
	{ "pg_wal_replay_resume", AG_SQL_SYSTEM },
	{ "pg_log_backend_memory_contexts", AG_SQL_SYSTEM },
	{ "pg_import_system_collations", AG_SQL_SYSTEM },
	{ "pg_stat_reset", AG_SQL_SYSTEM },
	{ "pg_stat_reset_shared", AG_SQL_SYSTEM },
	{ "pg_stat_reset_single_table_counters", AG_SQL_SYSTEM },
	{ "pg_stat_reset_single_function_counters", AG_SQL_SYSTEM },
	{ "pg_stat_reset_slru", AG_SQL_SYSTEM },
	{ "pg_stat_reset_replication_slot", AG_SQL_SYSTEM },
	{ "pg_stat_reset_subscription_stats", AG_SQL_SYSTEM },
	/* settings: set_config('role', ...) is SET ROLE (see check_func) */
	{ "set_config", AG_SQL_SET },
	/* locks, notifications, sequences */
	{ "pg_advisory_lock", AG_SQL_LOCK },
	{ "pg_advisory_lock_shared", AG_SQL_LOCK },
	{ "pg_advisory_xact_lock", AG_SQL_LOCK },
	{ "pg_advisory_xact_lock_shared", AG_SQL_LOCK },
	{ "pg_try_advisory_lock", AG_SQL_LOCK },
	{ "pg_try_advisory_lock_shared", AG_SQL_LOCK },
	{ "pg_try_advisory_xact_lock", AG_SQL_LOCK },
	{ "pg_try_advisory_xact_lock_shared", AG_SQL_LOCK },
	{ "pg_notify", AG_SQL_NOTIFY },
	{ "nextval", AG_SQL_WRITE },
	{ "setval", AG_SQL_WRITE },
	/* functions that run SQL given as a string, which this walk cannot see */
	{ "query_to_xml", AG_SQL_FUNCTION },
	{ "query_to_xmlschema", AG_SQL_FUNCTION },
	{ "query_to_xml_and_xmlschema", AG_SQL_FUNCTION },
	{ "table_to_xml", AG_SQL_FUNCTION },
	{ "table_to_xmlschema", AG_SQL_FUNCTION },
	{ "table_to_xml_and_xmlschema", AG_SQL_FUNCTION },
	{ "schema_to_xml", AG_SQL_FUNCTION },
	{ "schema_to_xmlschema", AG_SQL_FUNCTION },
	{ "schema_to_xml_and_xmlschema", AG_SQL_FUNCTION },
	{ "database_to_xml", AG_SQL_FUNCTION },
	{ "database_to_xmlschema", AG_SQL_FUNCTION },
	{ "database_to_xml_and_xmlschema", AG_SQL_FUNCTION },
	{ "ts_stat", AG_SQL_FUNCTION },
	{ "ts_rewrite", AG_SQL_FUNCTION }, /* ts_rewrite(tsquery, text): the text is a query */
	/* FETCH from a cursor whose query this statement does not show */
	{ "cursor_to_xml", AG_SQL_FUNCTION },
	{ "cursor_to_xmlschema", AG_SQL_FUNCTION },
};

static int func_cmp(const void *a, const void *b)
{
	return strcmp(((const struct func_class *)a)->name, ((const struct func_class *)b)->name);
}

static bool is_role_setting(const char *s)
{
	return !strcasecmp(s, "role") || !strcasecmp(s, "session_authorization");
}

/*
 * A call of the function name (its last part) with args (NULL when not known): its name decides;
 * set_config of a role setting, or of a setting not given as a constant, is a role change.
 */
static void check_func_name(struct walk *w, const char *name, const struct jv *args)
{
	struct func_class key, *f;
	const char *type, *setting = NULL;

	if (!name)
		return;
	/* dblink, dblink_exec, dblink_connect_u, ...: a connection out of the server */
	if (!strncmp(name, "dblink", 6)) {
		add_class(w, AG_SQL_SYSTEM);
		return;
	}
	key.name = name;
	f = bsearch(&key, funcs, sizeof(funcs) / sizeof(funcs[0]), sizeof(funcs[0]), func_cmp);
	if (!f)
		return;
	add_class(w, f->classes);
	if (f->classes != AG_SQL_SET)
		return;
	/* The setting's name as a constant string, or anything else: assume the worst. */
	if (args && args->t == J_ARR && args->kids) {
		const struct jv *c = jnode(args->kids, &type);

		if (c && !strcmp(type, "A_Const"))
			setting = jstr(jget(c, "sval"), "sval");
	}
	if (!setting || is_role_setting(setting))
		add_class(w, AG_SQL_ROLE);
}

/* A FuncCall's fields. */
static void check_func(struct walk *w, const struct jv *fc)
{
	const struct jv *names = jget(fc, "funcname"), *last = NULL;

	if (!names || names->t != J_ARR)
		return;
	for (const struct jv *k = names->kids; k; k = k->next)
		last = k;
	check_func_name(w, jstring_node(last), jget(fc, "args"));
}

/*
 * PostgreSQL's attribute notation: a one-argument function func(x) is also x.func and (x).func
 * (ParseFuncOrColumn tries a function when a field name is not a column). So a String in an
 * A_Indirection's list, or in a ColumnRef after its first field, is checked as a call; a column
 * that happens to share a listed function's name is denied too (failing closed).
 */
static void check_attr_names(struct walk *w, const struct jv *list, bool skip_first)
{
	if (!list || list->t != J_ARR)
		return;
	for (const struct jv *k = list->kids; k; k = k->next)
		if (!skip_first || k != list->kids)
			check_func_name(w, jstring_node(k), NULL);
}

/* ---- statements and the nodes that classify them ---- */

enum node_kind {
	N_PLAIN = 0,
	N_SELECT,
	N_INSERT,
	N_UPDATE_DELETE,
	N_MERGE,
	N_MERGE_WHEN,
	N_COPY,
	N_EXPLAIN,
	N_PREPARE,
	N_EXECUTE,
	N_DECLARE,
	N_FETCH,
	N_CALL,
	N_FUNCCALL,
	N_VARSET,
	N_TRANSACTION,
	N_VACUUM,
	N_DROP,
	N_COMMENT,
	N_GRANT,
	N_DEFPRIV,
};

struct node_class {
	const char *name;
	uint64_t classes;
	enum node_kind kind;
};

#define W AG_SQL_WRITE
#define DDL_CREATE (AG_SQL_CREATE | AG_SQL_DDL | W)
#define DDL_ALTER (AG_SQL_ALTER | AG_SQL_DDL | W)
#define DDL_DROP (AG_SQL_DROP | AG_SQL_DDL | W)
#define UTIL AG_SQL_UTILITY

/* Sorted at first use. Nodes not listed only contribute what is below them. */
static struct node_class nodes[] = {
	{ "SelectStmt", 0, N_SELECT },
	{ "InsertStmt", AG_SQL_INSERT | W, N_INSERT },
	{ "UpdateStmt", AG_SQL_UPDATE | W, N_UPDATE_DELETE },
	{ "DeleteStmt", AG_SQL_DELETE | W, N_UPDATE_DELETE },
	{ "MergeStmt", AG_SQL_MERGE | W, N_MERGE },
	{ "MergeWhenClause", 0, N_MERGE_WHEN },
	{ "LockingClause", AG_SQL_LOCK },
	{ "FuncCall", 0, N_FUNCCALL },
	{ "CopyStmt", AG_SQL_COPY, N_COPY },
	{ "ExplainStmt", AG_SQL_EXPLAIN, N_EXPLAIN },
	{ "PrepareStmt", AG_SQL_PREPARE, N_PREPARE },
	{ "ExecuteStmt", AG_SQL_EXECUTE, N_EXECUTE },
	{ "DeallocateStmt", AG_SQL_DEALLOCATE },
	{ "DeclareCursorStmt", 0, N_DECLARE },
	{ "FetchStmt", 0, N_FETCH },
	{ "ClosePortalStmt", UTIL },
	{ "CallStmt", AG_SQL_CALL, N_CALL },
	{ "DoStmt", AG_SQL_DO | AG_SQL_FUNCTION },
	{ "CreateFunctionStmt", AG_SQL_FUNCTION | DDL_CREATE },
	{ "AlterFunctionStmt", AG_SQL_FUNCTION | DDL_ALTER },
	{ "VariableSetStmt", AG_SQL_SET, N_VARSET },
	{ "VariableShowStmt", AG_SQL_SET | AG_SQL_SHOW },
	{ "ConstraintsSetStmt", AG_SQL_SET },
	{ "TransactionStmt", AG_SQL_TRANSACTION, N_TRANSACTION },
	{ "LockStmt", AG_SQL_LOCK },
	{ "VacuumStmt", UTIL, N_VACUUM },
	{ "ClusterStmt", UTIL | AG_SQL_CLUSTER },
	{ "ReindexStmt", UTIL | AG_SQL_REINDEX },
	{ "CheckPointStmt", UTIL },
	{ "ListenStmt", UTIL | AG_SQL_NOTIFY | AG_SQL_LISTEN },
	{ "UnlistenStmt", UTIL | AG_SQL_NOTIFY | AG_SQL_UNLISTEN },
	{ "NotifyStmt", AG_SQL_NOTIFY },
	{ "DiscardStmt", AG_SQL_DISCARD },
	{ "RefreshMatViewStmt", AG_SQL_REFRESH | W },
	{ "LoadStmt", AG_SQL_SYSTEM },
	{ "AlterSystemStmt", AG_SQL_SYSTEM },
	{ "DropStmt", DDL_DROP, N_DROP },
	{ "TruncateStmt", AG_SQL_TRUNCATE | W },
	{ "CommentStmt", AG_SQL_COMMENT | AG_SQL_DDL | W, N_COMMENT },
	{ "SecLabelStmt", AG_SQL_DDL | W },
	{ "GrantStmt", AG_SQL_ROLE | W, N_GRANT },
	{ "GrantRoleStmt", AG_SQL_ROLE | W, N_GRANT },
	{ "AlterDefaultPrivilegesStmt", AG_SQL_ROLE | W, N_DEFPRIV },
	{ "CreateRoleStmt", AG_SQL_ROLE | DDL_CREATE },
	{ "AlterRoleStmt", AG_SQL_ROLE | DDL_ALTER },
	{ "AlterRoleSetStmt", AG_SQL_ROLE | DDL_ALTER },
	{ "DropRoleStmt", AG_SQL_ROLE | DDL_DROP },
	{ "ReassignOwnedStmt", AG_SQL_ROLE | DDL_ALTER },
	{ "DropOwnedStmt", AG_SQL_ROLE | DDL_DROP },
	{ "CreateStmt", DDL_CREATE },
	{ "CreateTableAsStmt", DDL_CREATE },
	{ "IndexStmt", DDL_CREATE },
	{ "ViewStmt", DDL_CREATE },
	{ "CreateSeqStmt", DDL_CREATE },
	{ "CreateSchemaStmt", DDL_CREATE },
	{ "CompositeTypeStmt", DDL_CREATE },
	{ "CreateEnumStmt", DDL_CREATE },
	{ "CreateRangeStmt", DDL_CREATE },
	{ "DefineStmt", DDL_CREATE },
	{ "CreateDomainStmt", DDL_CREATE },
	{ "CreateCastStmt", DDL_CREATE },
	{ "CreateOpClassStmt", DDL_CREATE },
	{ "CreateOpFamilyStmt", DDL_CREATE },
	{ "CreateConversionStmt", DDL_CREATE },
	{ "CreateTransformStmt", DDL_CREATE },
	{ "CreateAmStmt", DDL_CREATE },
	{ "CreateStatsStmt", DDL_CREATE },
	{ "CreatePolicyStmt", DDL_CREATE },
	{ "CreatePublicationStmt", DDL_CREATE },
	{ "CreateTrigStmt", DDL_CREATE },
	{ "RuleStmt", DDL_CREATE },
	{ "CreatedbStmt", DDL_CREATE },
	{ "CreateExtensionStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreateFdwStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreateForeignServerStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreateUserMappingStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreateForeignTableStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "ImportForeignSchemaStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreateSubscriptionStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreateEventTrigStmt", DDL_CREATE | AG_SQL_SYSTEM },
	{ "CreatePLangStmt", DDL_CREATE | AG_SQL_SYSTEM | AG_SQL_FUNCTION },
	{ "CreateTableSpaceStmt", DDL_CREATE | AG_SQL_SYSTEM | AG_SQL_FILE },
	{ "AlterTableStmt", DDL_ALTER },
	{ "AlterDomainStmt", DDL_ALTER },
	{ "AlterEnumStmt", DDL_ALTER },
	{ "AlterSeqStmt", DDL_ALTER },
	{ "AlterTSDictionaryStmt", DDL_ALTER },
	{ "AlterTSConfigurationStmt", DDL_ALTER },
	{ "AlterCollationStmt", DDL_ALTER },
	{ "AlterOperatorStmt", DDL_ALTER },
	{ "AlterTypeStmt", DDL_ALTER },
	{ "AlterOpFamilyStmt", DDL_ALTER },
	{ "AlterObjectDependsStmt", DDL_ALTER },
	{ "AlterObjectSchemaStmt", DDL_ALTER },
	{ "AlterOwnerStmt", DDL_ALTER },
	{ "RenameStmt", DDL_ALTER },
	{ "AlterPolicyStmt", DDL_ALTER },
	{ "AlterPublicationStmt", DDL_ALTER },
	{ "AlterStatsStmt", DDL_ALTER },
	{ "AlterTableMoveAllStmt", DDL_ALTER },
	{ "AlterTableSpaceOptionsStmt", DDL_ALTER },
	{ "AlterDatabaseStmt", DDL_ALTER },
	{ "AlterDatabaseSetStmt", DDL_ALTER },
	{ "AlterDatabaseRefreshCollStmt", DDL_ALTER },
	{ "AlterEventTrigStmt", DDL_ALTER },
	{ "AlterExtensionStmt", DDL_ALTER | AG_SQL_SYSTEM },
	{ "AlterExtensionContentsStmt", DDL_ALTER | AG_SQL_SYSTEM },
	{ "AlterFdwStmt", DDL_ALTER | AG_SQL_SYSTEM },
	{ "AlterForeignServerStmt", DDL_ALTER | AG_SQL_SYSTEM },
	{ "AlterUserMappingStmt", DDL_ALTER | AG_SQL_SYSTEM },
	{ "AlterSubscriptionStmt", DDL_ALTER | AG_SQL_SYSTEM },
	{ "DropdbStmt", DDL_DROP },
	{ "DropTableSpaceStmt", DDL_DROP | AG_SQL_SYSTEM },
	{ "DropUserMappingStmt", DDL_DROP | AG_SQL_SYSTEM },
	{ "DropSubscriptionStmt", DDL_DROP | AG_SQL_SYSTEM },
};

static int node_cmp(const void *a, const void *b)
{
	return strcmp(((const struct node_class *)a)->name, ((const struct node_class *)b)->name);
}

static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void tables_init(void)
{
	qsort(funcs, sizeof(funcs) / sizeof(funcs[0]), sizeof(funcs[0]), func_cmp);
	qsort(nodes, sizeof(nodes) / sizeof(nodes[0]), sizeof(nodes[0]), node_cmp);
}

/* EXPLAIN's ANALYZE option as PostgreSQL reads it; anything it would not call false is true. */
static bool explain_analyze(const struct jv *options)
{
	const char *type;
	bool on = false;

	if (!options || options->t != J_ARR)
		return false;
	for (const struct jv *o = options->kids; o; o = o->next) {
		const struct jv *d = jnode(o, &type), *arg, *v;
		const char *s;

		if (!d || strcmp(type, "DefElem") || !jstr(d, "defname") ||
		    strcasecmp(jstr(d, "defname"), "analyze"))
			continue;
		arg = jget(d, "arg");
		v = jnode(arg, &type);
		if (!v) {
			on = true;
		} else if (!strcmp(type, "String") && (s = jstr(v, "sval"))) {
			on = strcasecmp(s, "false") && strcasecmp(s, "off") && strcmp(s, "0");
		} else if (!strcmp(type, "Boolean")) {
			on = jbool(v, "boolval");
		} else if (!strcmp(type, "Integer")) {
			on = jlong(v, "ival") != 0;
		} else {
			on = true;
		}
	}
	return on;
}

static bool is_relation_type(const char *objtype)
{
	/* clang-format off */
	static const char *const rel[] = {
		"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE",
		"OBJECT_FOREIGN_TABLE", NULL
	};
	/* clang-format on */

	for (int i = 0; objtype && rel[i]; i++)
		if (!strcmp(objtype, rel[i]))
			return true;
	return false;
}

/* Objects named [table..., name]: a trigger, rule or policy on a table, a column of one. */
static bool is_on_relation_type(const char *objtype)
{
	return objtype && (!strcmp(objtype, "OBJECT_TRIGGER") || !strcmp(objtype, "OBJECT_RULE") ||
			   !strcmp(objtype, "OBJECT_POLICY") || !strcmp(objtype, "OBJECT_COLUMN") ||
			   !strcmp(objtype, "OBJECT_TABCONSTRAINT"));
}

static void visit_node(struct walk *w, const char *type, const struct jv *f, bool top)
{
	struct node_class key = { .name = type }, *n;
	const struct jv *v;
	const char *s;
	size_t len;

	/* Expression nodes are most of a tree, and none of them is listed but these three. */
	len = strlen(type);
	if (type[0] == 'A' && !strcmp(type, "A_Indirection"))
		check_attr_names(w, jget(f, "indirection"), false);
	else if (type[0] == 'C' && !strcmp(type, "ColumnRef"))
		check_attr_names(w, jget(f, "fields"), true);
	if ((len < 4 || memcmp(type + len - 4, "Stmt", 4)) && strcmp(type, "FuncCall") &&
	    strcmp(type, "LockingClause") && strcmp(type, "MergeWhenClause"))
		n = NULL;
	else
		n = bsearch(&key, nodes, sizeof(nodes) / sizeof(nodes[0]), sizeof(nodes[0]),
			    node_cmp);
	if (!n) {
		visit_fields(w, f);
		return;
	}
	add_class(w, n->classes);
	switch (n->kind) {
	case N_PLAIN:
		break;
	case N_SELECT:
		/*
		 * SELECT ... INTO creates a table; a SELECT reads only where it is the statement
		 * (a subquery's reads belong to the statement around it).
		 */
		if ((v = jget(f, "intoClause"))) {
			add_class(w, DDL_CREATE);
			add_target(w, jget(v, "rel"));
		} else if (top) {
			add_class(w, AG_SQL_SELECT);
		}
		break;
	case N_INSERT:
		add_target(w, jget(f, "relation"));
		v = jget(f, "onConflictClause");
		if ((s = jstr(v, "action")) && !strcmp(s, "ONCONFLICT_UPDATE"))
			add_class(w, AG_SQL_UPDATE);
		break;
	case N_UPDATE_DELETE:
		add_target(w, jget(f, "relation"));
		/* Present means written: WHERE true is a WHERE (a rule can still name the table). */
		if (!jget(f, "whereClause") && !w->suppress)
			w->cur->where_absent = true;
		break;
	case N_MERGE:
		add_target(w, jget(f, "relation"));
		break;
	case N_MERGE_WHEN:
		s = jstr(f, "commandType");
		if (s && !strcmp(s, "CMD_UPDATE"))
			add_class(w, AG_SQL_UPDATE);
		else if (s && !strcmp(s, "CMD_DELETE"))
			add_class(w, AG_SQL_DELETE);
		else if (s && !strcmp(s, "CMD_INSERT"))
			add_class(w, AG_SQL_INSERT);
		break;
	case N_COPY: {
		bool from = jbool(f, "is_from");

		if (jbool(f, "is_program"))
			add_class(w, AG_SQL_PROGRAM | W);
		else if (jstr(f, "filename"))
			add_class(w, AG_SQL_FILE | W);
		else if (!from)
			add_class(w, AG_SQL_SELECT); /* TO STDOUT: the rows come to the client */
		if (from)
			add_class(w, AG_SQL_INSERT | W);
		break;
	}
	case N_EXPLAIN:
		/* Without ANALYZE nothing runs: the statement's tables, none of its classes. */
		if (explain_analyze(jget(f, "options"))) {
			visit(w, jget(f, "query"), true);
		} else {
			w->suppress++;
			visit(w, jget(f, "query"), true);
			w->suppress--;
		}
		return;
	case N_PREPARE:
		if (!w->suppress)
			w->cur->prepare_name = jstr(f, "name");
		visit(w, jget(f, "query"), true);
		return;
	case N_EXECUTE:
		if (!w->suppress)
			w->cur->execute_name = jstr(f, "name");
		break;
	case N_DECLARE:
		visit(w, jget(f, "query"), true);
		return;
	case N_FETCH:
		add_class(w, jbool(f, "ismove") ? UTIL : AG_SQL_SELECT);
		break;
	case N_CALL:
		check_func(w, jget(f, "funccall"));
		break;
	case N_FUNCCALL:
		check_func(w, f);
		break;
	case N_VARSET:
		s = jstr(f, "kind");
		if (s && (!strcmp(s, "VAR_RESET") || !strcmp(s, "VAR_RESET_ALL")))
			add_class(w, AG_SQL_RESET);
		if ((s = jstr(f, "name")) && is_role_setting(s))
			add_class(w, AG_SQL_ROLE);
		break;
	case N_TRANSACTION:
		s = jstr(f, "kind");
		if (!s)
			break;
		if (!strcmp(s, "TRANS_STMT_BEGIN") || !strcmp(s, "TRANS_STMT_START"))
			add_class(w, AG_SQL_BEGIN);
		else if (!strcmp(s, "TRANS_STMT_COMMIT") ||
			 !strcmp(s, "TRANS_STMT_COMMIT_PREPARED"))
			add_class(w, AG_SQL_COMMIT);
		else if (!strncmp(s, "TRANS_STMT_ROLLBACK", 19))
			add_class(w, AG_SQL_ROLLBACK);
		else if (!strcmp(s, "TRANS_STMT_SAVEPOINT") || !strcmp(s, "TRANS_STMT_RELEASE"))
			add_class(w, AG_SQL_SAVEPOINT);
		break;
	case N_VACUUM:
		add_class(w, jbool(f, "is_vacuumcmd") ? AG_SQL_VACUUM : AG_SQL_ANALYZE);
		break;
	case N_DROP:
		s = jstr(f, "removeType");
		v = jget(f, "objects");
		if (s && (is_relation_type(s) || is_on_relation_type(s)) && v && v->t == J_ARR)
			for (const struct jv *o = v->kids; o; o = o->next)
				add_table_list(w, o, is_on_relation_type(s));
		if (s && (!strcmp(s, "OBJECT_FUNCTION") || !strcmp(s, "OBJECT_PROCEDURE") ||
			  !strcmp(s, "OBJECT_ROUTINE")))
			add_class(w, AG_SQL_FUNCTION);
		if (s && (!strcmp(s, "OBJECT_EXTENSION") || !strcmp(s, "OBJECT_LANGUAGE")))
			add_class(w, AG_SQL_SYSTEM);
		break;
	case N_COMMENT:
		s = jstr(f, "objtype");
		if (is_relation_type(s) || is_on_relation_type(s))
			add_table_list(w, jget(f, "object"), is_on_relation_type(s));
		break;
	case N_GRANT:
		add_class(w, jbool(f, "is_grant") ? AG_SQL_GRANT : AG_SQL_REVOKE);
		break;
	case N_DEFPRIV:
		add_class(w, jbool(jget(f, "action"), "is_grant") ? AG_SQL_GRANT : AG_SQL_REVOKE);
		break;
	}
	visit_fields(w, f);
}

static void visit(struct walk *w, const struct jv *v, bool top)
{
	const struct jv *f;
	const char *type;

	if (!v || w->err)
		return;
	if (v->t == J_ARR) {
		for (const struct jv *k = v->kids; k; k = k->next)
			visit(w, k, false);
	} else if (v->t == J_OBJ) {
		f = jnode(v, &type);
		if (f)
			visit_node(w, type, f, top);
		else
			visit_fields(w, v);
	}
}

/* ---- results: one allocation holding the statements, table arrays and strings ---- */

static size_t table_len(const struct tab *t)
{
	return (t->schema ? strlen(t->schema) + 1 : 0) + strlen(t->rel) + 1;
}

static int pack(const struct walk *w, const struct acc *accs, size_t n, struct ag_sql_result *out)
{
	size_t size = n * sizeof(struct ag_sql_stmt), ptrs = 0, chars = 0;
	struct ag_sql_stmt *st;
	char **tp, *cp;

	for (size_t i = 0; i < n; i++) {
		ptrs += accs[i].ntabs;
		for (size_t j = 0; j < accs[i].ntabs; j++)
			chars += table_len(&w->tabs[accs[i].tab_first + j]);
		if (accs[i].execute_name)
			chars += strlen(accs[i].execute_name) + 1;
		if (accs[i].prepare_name)
			chars += strlen(accs[i].prepare_name) + 1;
	}
	size += ptrs * sizeof(char *) + chars;
	st = calloc(1, size);
	if (!st)
		return -ENOMEM;
	tp = (char **)(st + n);
	cp = (char *)(tp + ptrs);
	for (size_t i = 0; i < n; i++) {
		const struct acc *a = &accs[i];

		st[i].classes = a->classes;
		st[i].where_absent = a->where_absent;
		st[i].location = a->location;
		st[i].length = a->length;
		st[i].tables = a->ntabs ? tp : NULL;
		st[i].ntables = a->ntabs;
		for (size_t j = 0; j < a->ntabs; j++) {
			const struct tab *t = &w->tabs[a->tab_first + j];

			*tp++ = cp;
			if (t->schema) {
				cp = stpcpy(cp, t->schema);
				*cp++ = '.';
			}
			cp = stpcpy(cp, t->rel) + 1;
		}
		if (a->execute_name) {
			st[i].execute_name = strcpy(cp, a->execute_name);
			cp += strlen(cp) + 1;
		}
		if (a->prepare_name) {
			st[i].prepare_name = strcpy(cp, a->prepare_name);
			cp += strlen(cp) + 1;
		}
	}
	out->stmts = st;
	out->nstmts = n;
	out->size = size;
	return 0;
}

static int set_error(struct ag_sql_result *out, const char *msg, int pos)
{
	out->error = strdup(msg);
	out->error_pos = pos;
	return out->error ? -EINVAL : -ENOMEM;
}

static int classify_tree(const struct jv *root, struct ag_sql_result *out)
{
	const struct jv *stmts = jget(root, "stmts");
	struct walk w = { 0 };
	struct acc *accs = NULL;
	size_t n = 0, cap = 0;
	int err;

	for (const struct jv *s = stmts && stmts->t == J_ARR ? stmts->kids : NULL; s; s = s->next) {
		if (n == cap) {
			struct acc *na;

			cap = cap ? cap * 2 : 4;
			na = realloc(accs, cap * sizeof(*na));
			if (!na) {
				w.err = -ENOMEM;
				break;
			}
			accs = na;
		}
		memset(&accs[n], 0, sizeof(accs[n]));
		accs[n].location = jlong(s, "stmt_location");
		accs[n].length = jlong(s, "stmt_len");
		accs[n].tab_first = w.ntabs;
		w.cur = &accs[n++];
		w.nctes = 0;
		visit(&w, jget(s, "stmt"), true);
		if (w.err)
			break;
	}
	if (!w.err && !n) {
		/* Nothing but whitespace and comments: an empty query. */
		accs = calloc(1, sizeof(*accs));
		if (accs) {
			accs[0].classes = AG_SQL_EMPTY;
			n = 1;
		} else {
			w.err = -ENOMEM;
		}
	}
	err = w.err ? w.err : pack(&w, accs, n, out);
	free(accs);
	free(w.tabs);
	free(w.ctes);
	return err;
}

/* Parses and classifies on the current stack (the caller made sure it is deep enough). */
static int classify_here(const char *sql, struct ag_sql_result *out)
{
	PgQueryParseResult pr;
	struct arena a = { 0 };
	struct jv *root;
	int err;

	pthread_once(&tables_once, tables_init);
	pr = pg_query_parse(sql);
	if (pr.error) {
		err = set_error(out, pr.error->message ? pr.error->message : "syntax error",
				pr.error->cursorpos);
		pg_query_free_parse_result(pr);
		return err;
	}
	err = json_tree(pr.parse_tree, &a, &root);
	pg_query_free_parse_result(pr);
	if (err == -E2BIG) {
		char msg[96];

		snprintf(msg, sizeof(msg), "statement nests too deep to classify (over %d levels)",
			 MAX_DEPTH);
		err = set_error(out, msg, 0);
	} else if (err == -EINVAL) {
		err = set_error(out, "libpg_query returned a parse tree that is not JSON", 0);
	} else if (!err) {
		literal_read = false;
		err = classify_tree(root, out);
		out->literal_read = literal_read;
	}
	arena_free(&a);
	return err;
}

/* ---- running on a stack deep enough ---- */

static __thread uintptr_t stack_lo;

/* Bytes of stack left below this frame; 0 when it cannot be told. */
static size_t stack_left(void)
{
	char here;

	if (!stack_lo) {
		pthread_attr_t attr;
		void *addr;
		size_t size;

		if (pthread_getattr_np(pthread_self(), &attr))
			return 0;
		if (!pthread_attr_getstack(&attr, &addr, &size))
			stack_lo = (uintptr_t)addr;
		pthread_attr_destroy(&attr);
		if (!stack_lo)
			return 0;
	}
	return (uintptr_t)&here > stack_lo ? (uintptr_t)&here - stack_lo : 0;
}

/* The fingerprint of sql, computed on the current stack; 0 when libpg_query cannot. */
static int fingerprint_here(const char *sql, struct ag_sql_result *out)
{
	PgQueryFingerprintResult fp;

	fp = pg_query_fingerprint(sql);
	out->fingerprint = fp.error ? 0 : fp.fingerprint;
	pg_query_free_fingerprint_result(fp);
	return 0;
}

struct job {
	int (*fn)(const char *sql, struct ag_sql_result *out);
	const char *sql;
	struct ag_sql_result *out;
	int ret;
};

static void *job_main(void *arg)
{
	struct job *j = arg;

	j->ret = j->fn(j->sql, j->out);
	return NULL;
}

/* A byte that continues a name (PostgreSQL's ident_cont, with the bytes of UTF-8). */
static bool ident_char(unsigned char c)
{
	return isalnum(c) || c == '_' || c == '$' || c >= 0x80;
}

/*
 * Deeper nesting of parentheses and brackets than AG_SQL_MAX_NESTING is refused before
 * libpg_query sees it (bison itself gives up near 10000 levels; nothing a person or a program
 * writes nests a thousand). The scan skips what the lexer does not read as nesting: string
 * literals ('...', and E'...' with its backslash escapes), quoted names, dollar quoting, -- and
 * nested block comments. It only ever refuses: where it reads a string differently from the
 * lexer, the worst is the refusal of a statement nesting a thousand brackets inside a literal.
 * true when sql nests too deep, *at the byte that went over.
 */
static bool nests_too_deep(const char *s, size_t len, size_t *at)
{
	int depth = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned char c = s[i];

		switch (c) {
		case '(':
		case '[':
			if (++depth > AG_SQL_MAX_NESTING) {
				*at = i;
				return true;
			}
			break;
		case ')':
		case ']':
			if (depth)
				depth--;
			break;
		case '-':
			if (i + 1 < len && s[i + 1] == '-')
				while (i + 1 < len && s[i + 1] != '\n')
					i++;
			break;
		case '/':
			if (i + 1 < len && s[i + 1] == '*') {
				int nest = 1;

				for (i += 2; i < len && nest; i++) {
					if (s[i] == '/' && i + 1 < len && s[i + 1] == '*')
						nest++, i++;
					else if (s[i] == '*' && i + 1 < len && s[i + 1] == '/')
						nest--, i++;
				}
				i--;
			}
			break;
		case '\'': {
			/* E'...' (not the tail of a name like somE'...') takes backslash escapes. */
			bool esc = i && (s[i - 1] == 'e' || s[i - 1] == 'E') &&
				   (i < 2 || !ident_char(s[i - 2]));

			for (i++; i < len; i++) {
				if (esc && s[i] == '\\')
					i++;
				else if (s[i] == '\'' && i + 1 < len && s[i + 1] == '\'')
					i++;
				else if (s[i] == '\'')
					break;
			}
			break;
		}
		case '"':
			for (i++; i < len; i++) {
				if (s[i] == '"' && i + 1 < len && s[i + 1] == '"')
					i++;
				else if (s[i] == '"')
					break;
			}
			break;
		case '$': {
			size_t j = i + 1;
			const char *end;

			/* a$b is a name, $1 a parameter; $tag$ or $$ opens a dollar quote */
			if ((i && ident_char(s[i - 1])) ||
			    (j < len && isdigit((unsigned char)s[j])))
				break;
			while (j < len && s[j] != '$' && ident_char(s[j]))
				j++;
			if (j >= len || s[j] != '$')
				break;
			end = memmem(s + j + 1, len - j - 1, s + i, j - i + 1);
			if (!end)
				return false; /* unterminated: the parser says so */
			i = end - s + (j - i);
			break;
		}
		}
	}
	return false;
}

/*
 * Runs fn (classify_here or fingerprint_here) on a stack deep enough for sql: this one when it
 * is, else a short-lived thread of its own. Long and too deeply nested SQL is refused first.
 */
static int run_sized(int (*fn)(const char *, struct ag_sql_result *), const char *sql,
		     struct ag_sql_result *out)
{
	size_t len, need, at;
	pthread_attr_t attr;
	pthread_t t;
	struct job j;
	char msg[128];
	int err;

	memset(out, 0, sizeof(*out));
	if (!sql)
		return -EINVAL;
	len = strlen(sql);
	if (len > AG_SQL_MAX_LEN) {
		snprintf(msg, sizeof(msg),
			 "SQL of %zu bytes is over the %u KiB classification limit", len,
			 AG_SQL_MAX_LEN >> 10);
		return set_error(out, msg, 0);
	}
	if (nests_too_deep(sql, len, &at)) {
		snprintf(msg, sizeof(msg),
			 "nesting too deep: over %d levels of parentheses or brackets",
			 AG_SQL_MAX_NESTING);
		return set_error(out, msg, at + 1);
	}
	need = len * STACK_PER_BYTE + (size_t)MAX_DEPTH * STACK_PER_LEVEL + STACK_MARGIN;
	if (need <= stack_left())
		return fn(sql, out);

	/* A long statement: its own thread, with a stack sized for it (touched only as used). */
	j = (struct job){ .fn = fn, .sql = sql, .out = out };
	if (pthread_attr_init(&attr))
		return -ENOMEM;
	err = pthread_attr_setstacksize(&attr, need + (1u << 20));
	if (!err)
		err = pthread_create(&t, &attr, job_main, &j);
	pthread_attr_destroy(&attr);
	if (err)
		return -ENOMEM;
	pthread_join(t, NULL);
	return j.ret;
}

int ag_sql_classify_uncached(const char *sql, struct ag_sql_result *out)
{
	return run_sized(classify_here, sql, out);
}

/* ---- the per-thread cache ---- */

struct cache_slot {
	uint64_t hash;
	size_t len;
	char *text;
	size_t tcap, rcap;	/* the sizes of text and r.stmts, reused by the next store */
	struct ag_sql_result r; /* ret -EINVAL: r.error holds the message */
	int ret;
	bool has_fp; /* fp computed (ag_sql_fingerprint) */
	uint64_t fp;
};

struct cache {
	struct cache_slot slot[CACHE_SLOTS];
	uint64_t hits, misses;
};

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;

static void slot_clear(struct cache_slot *s)
{
	free(s->text);
	ag_sql_result_free(&s->r);
	memset(s, 0, sizeof(*s));
}

static void cache_destroy(void *p)
{
	struct cache *c = p;

	for (int i = 0; c && i < CACHE_SLOTS; i++)
		slot_clear(&c->slot[i]);
	free(c);
	free(spare_blk);
	spare_blk = NULL;
	tcache = NULL;
}

static void cache_key_init(void)
{
	/* Frees a thread's cache when it exits. */
	pthread_key_create(&cache_key, cache_destroy);
}

static struct cache *cache_get(void)
{
	if (tcache)
		return tcache;
	pthread_once(&cache_once, cache_key_init);
	tcache = calloc(1, sizeof(*tcache));
	if (tcache)
		pthread_setspecific(cache_key, tcache);
	return tcache;
}

void ag_sql_cache_flush(void)
{
	ag_sql_shape_flush();
	if (!tcache)
		return;
	pthread_setspecific(cache_key, NULL);
	cache_destroy(tcache);
}

void ag_sql_cache_stats(uint64_t *hits, uint64_t *misses)
{
	*hits = tcache ? tcache->hits : 0;
	*misses = tcache ? tcache->misses : 0;
}

uint64_t ag_sql_hash_text(const char *s, size_t n)
{
	uint64_t h = 0x9e3779b97f4a7c15ULL ^ n, v;

	for (; n >= 8; s += 8, n -= 8) {
		memcpy(&v, s, 8);
		h = (h ^ v) * 0xbf58476d1ce4e5b9ULL;
		h ^= h >> 31;
	}
	v = 0;
	memcpy(&v, s, n);
	h = (h ^ v) * 0x94d049bb133111ebULL;
	return h ^ (h >> 29);
}

static void *moved(void *p, uintptr_t from, uintptr_t to)
{
	return (void *)((uintptr_t)p - from + to);
}

/* ag_sql_result_copy() into blk (src->size bytes or more, dst's then), or a new block (NULL). */
static int result_copy_in(const struct ag_sql_result *src, struct ag_sql_result *dst, void *blk)
{
	uintptr_t from = (uintptr_t)src->stmts, to;

	memset(dst, 0, sizeof(*dst));
	dst->fingerprint = src->fingerprint;
	dst->error_pos = src->error_pos;
	dst->literal_read = src->literal_read;
	if (src->error && !(dst->error = strdup(src->error))) {
		free(blk);
		return -ENOMEM;
	}
	if (!src->stmts) {
		free(blk);
		return 0;
	}
	dst->stmts = blk ? blk : malloc(src->size);
	if (!dst->stmts) {
		free(dst->error);
		dst->error = NULL;
		return -ENOMEM;
	}
	memcpy(dst->stmts, src->stmts, src->size);
	dst->nstmts = src->nstmts;
	dst->size = src->size;
	/* Every pointer inside the block moves with it. */
	to = (uintptr_t)dst->stmts;
	for (size_t i = 0; i < dst->nstmts; i++) {
		struct ag_sql_stmt *s = &dst->stmts[i];

		if (s->tables)
			s->tables = moved(s->tables, from, to);
		for (size_t k = 0; k < s->ntables; k++)
			s->tables[k] = moved(s->tables[k], from, to);
		if (s->execute_name)
			s->execute_name = moved(s->execute_name, from, to);
		if (s->prepare_name)
			s->prepare_name = moved(s->prepare_name, from, to);
	}
	return 0;
}

int ag_sql_result_copy(const struct ag_sql_result *src, struct ag_sql_result *dst)
{
	return result_copy_in(src, dst, NULL);
}

/*
 * Keeps r (ret) for sql in slot s, in the slot's own buffers when they are big enough: a text
 * classified by shape (a new constant each time) takes a slot with every miss.
 */
static void slot_store(struct cache_slot *s, uint64_t h, const char *sql, size_t len,
		       const struct ag_sql_result *r, int ret)
{
	void *blk = NULL;

	if (s->tcap < len + 1) {
		free(s->text);
		s->tcap = 0;
		if (!(s->text = malloc(len + 1))) {
			slot_clear(s);
			return; /* a cache that cannot grow is only slower */
		}
		s->tcap = len + 1;
	}
	if (r->stmts && s->r.stmts && s->rcap >= r->size) {
		blk = s->r.stmts;
		s->r.stmts = NULL;
	}
	ag_sql_result_free(&s->r);
	if (result_copy_in(r, &s->r, blk)) {
		slot_clear(s);
		return;
	}
	s->rcap = blk ? s->rcap : r->size;
	memcpy(s->text, sql, len + 1);
	s->hash = h;
	s->len = len;
	s->ret = ret;
	s->has_fp = false;
	s->fp = 0;
}

int ag_sql_classify(const char *sql, struct ag_sql_result *out)
{
	struct cache_slot *s;
	struct cache *c;
	uint64_t h;
	size_t len;
	int ret;

	memset(out, 0, sizeof(*out));
	if (!sql)
		return -EINVAL;
	len = strlen(sql);
	c = len <= CACHE_MAX_TEXT ? cache_get() : NULL;
	if (!c)
		return ag_sql_classify_uncached(sql, out);
	h = ag_sql_hash_text(sql, len);
	s = &c->slot[h % CACHE_SLOTS];
	if (s->text && s->hash == h && s->len == len && !memcmp(s->text, sql, len)) {
		c->hits++;
		return ag_sql_result_copy(&s->r, out) ?: s->ret;
	}
	c->misses++;
	ret = ag_sql_shape_classify(sql, len, h, out);
	if (ret && ret != -EINVAL)
		return ret;
	slot_store(s, h, sql, len, out, ret);
	return ret;
}

/* The cache slot holding sql's result, or NULL. */
static struct cache_slot *cache_find(const char *sql, size_t len)
{
	struct cache_slot *s;
	uint64_t h;

	if (!tcache || len > CACHE_MAX_TEXT)
		return NULL;
	h = ag_sql_hash_text(sql, len);
	s = &tcache->slot[h % CACHE_SLOTS];
	return s->text && s->hash == h && s->len == len && !memcmp(s->text, sql, len) ? s : NULL;
}

/*
 * Computed only here, on request: it is a second parse (about 40% of a cache miss), and the
 * classification does not need it. Classifying first bounds the tree the fingerprint walks and
 * puts the statement in the cache, where its fingerprint is kept next to its classes.
 */
uint64_t ag_sql_fingerprint(const char *sql)
{
	struct ag_sql_result r;
	struct cache_slot *s;
	uint64_t fp;
	int err;

	err = ag_sql_classify(sql, &r);
	ag_sql_result_free(&r);
	if (err)
		return 0;
	s = cache_find(sql, strlen(sql));
	if (s && s->has_fp)
		return s->fp;
	err = run_sized(fingerprint_here, sql, &r);
	fp = err ? 0 : r.fingerprint;
	ag_sql_result_free(&r);
	if (s && !err) {
		s->fp = fp;
		s->has_fp = true;
	}
	return fp;
}

void ag_sql_result_free(struct ag_sql_result *r)
{
	if (!r)
		return;
	free(r->stmts);
	free(r->error);
	memset(r, 0, sizeof(*r));
}

/* ---- policy ---- */

const struct ag_policy_rule *ag_sql_rule_for(const struct ag_policy *p, const char *agent,
					     const char *target)
{
	for (size_t i = 0; p && agent && target && i < p->nrules; i++) {
		const struct ag_policy_rule *r = &p->rules[i];

		if ((!strcmp(r->agent, "*") || !strcmp(r->agent, agent)) &&
		    (!strcmp(r->target, "*") || !strcmp(r->target, target)))
			return r;
	}
	return NULL;
}

/* An unqualified table is public's, and public.x is x (search_path is not known here). */
static bool table_matches(const char *glob, const char *table)
{
	char q[256];

	if (!fnmatch(glob, table, 0))
		return true;
	if (!strchr(table, '.')) {
		if ((size_t)snprintf(q, sizeof(q), "public.%s", table) >= sizeof(q))
			return false;
		return !fnmatch(glob, q, 0);
	}
	return !strncmp(table, "public.", 7) && !fnmatch(glob, table + 7, 0);
}

static void __attribute__((format(printf, 3, 4)))
why_add(char *why, size_t len, const char *fmt, ...)
{
	size_t o = strlen(why);
	va_list ap;

	if (o && o + 2 < len) {
		memcpy(why + o, ", ", 3);
		o += 2;
	}
	va_start(ap, fmt);
	if (o < len)
		vsnprintf(why + o, len - o, fmt, ap);
	va_end(ap);
}

/* "a, b, c" of a list, as many whole names as fit. */
static void list_str(const struct ag_kv *kv, char *buf, size_t len)
{
	size_t o = 0;

	buf[0] = '\0';
	for (size_t i = 0; i < kv->nlist && o < len; i++)
		o = append(buf, len, o, ", ", kv->list[i]);
}

/*
 * How a rule's when: matches a statement depends on what the rule does with it.
 *
 * deny and approve stop a statement: they match when ANY class of the statement is listed in
 * command:, and when ANY of its tables matches a glob of tables:. A statement carries the
 * umbrella class of what it does (CREATE TABLE is create,ddl,write; BEGIN is
 * begin,transaction; LISTEN is listen,notify,utility), so a deny of [ddl] stops every schema
 * change.
 *
 * allow and observe let a statement run: they match only when EVERY class of the statement is
 * covered by command:, and when EVERY table of it matches a glob of tables: (a statement
 * without tables, SELECT 1, has none left uncovered). Otherwise an allow of [select] would let
 * through all a SELECT can also do: a DELETE in a CTE, pg_read_file, lo_export, dblink,
 * set_config('role', ...), FOR UPDATE. A class of the statement is covered when
 *  - it is listed;
 *  - a listed umbrella implies it (umbrellas[] below: [ddl] covers create, alter, drop and
 *    comment; [transaction] begin, commit, rollback and savepoint; ...);
 *  - it is an umbrella or write, and a class of the same statement that brings it is covered
 *    ([begin] covers BEGIN's transaction, [insert] INSERT's write, [create] CREATE TABLE's ddl
 *    and write, [ddl] the write of a schema change).
 * The dangerous classes are implied by no umbrella: file, program, system, role, function, do
 * and lock are covered only where listed. A statement without any class is never covered.
 */
#define DANGEROUS                                                                                  \
	(AG_SQL_FILE | AG_SQL_PROGRAM | AG_SQL_SYSTEM | AG_SQL_ROLE | AG_SQL_FUNCTION |            \
	 AG_SQL_DO | AG_SQL_LOCK)
#define TX_KINDS (AG_SQL_BEGIN | AG_SQL_COMMIT | AG_SQL_ROLLBACK | AG_SQL_SAVEPOINT)
#define SCHEMA_KINDS (AG_SQL_CREATE | AG_SQL_ALTER | AG_SQL_DROP | AG_SQL_COMMENT)
#define UTIL_KINDS                                                                                 \
	(AG_SQL_VACUUM | AG_SQL_ANALYZE | AG_SQL_CLUSTER | AG_SQL_REINDEX | AG_SQL_LISTEN |        \
	 AG_SQL_UNLISTEN)

static const struct umbrella {
	uint64_t bit;	  /* the umbrella's own class */
	uint64_t implies; /* covered where the umbrella is listed (never a DANGEROUS one) */
	uint64_t from;	  /* the bit is covered where the statement has one of these covered */
} umbrellas[] = {
	{ AG_SQL_DDL, SCHEMA_KINDS, SCHEMA_KINDS },
	{ AG_SQL_TRANSACTION, TX_KINDS, TX_KINDS },
	{ AG_SQL_SET, AG_SQL_SHOW | AG_SQL_RESET, AG_SQL_SHOW | AG_SQL_RESET },
	{ AG_SQL_UTILITY, UTIL_KINDS, UTIL_KINDS },
	{ AG_SQL_NOTIFY, AG_SQL_LISTEN | AG_SQL_UNLISTEN, AG_SQL_LISTEN | AG_SQL_UNLISTEN },
	/*
	 * write is no umbrella (listing it covers only itself) but comes with what changes data
	 * or schema; last, after ddl. nextval() and setval() are select,write: list write.
	 */
	{ AG_SQL_WRITE, 0,
	  AG_SQL_INSERT | AG_SQL_UPDATE | AG_SQL_DELETE | AG_SQL_MERGE | AG_SQL_TRUNCATE |
		  AG_SQL_REFRESH | AG_SQL_DDL | SCHEMA_KINDS | AG_SQL_GRANT | AG_SQL_REVOKE |
		  AG_SQL_ROLE | AG_SQL_FILE | AG_SQL_PROGRAM },
};

/* The classes of stmt (a statement's bits) that a command: list (its bits: listed) covers. */
static uint64_t covered_classes(uint64_t listed, uint64_t stmt)
{
	uint64_t cov;
	size_t i;

	cov = listed;
	for (i = 0; i < sizeof(umbrellas) / sizeof(umbrellas[0]); i++)
		if (listed & umbrellas[i].bit)
			cov |= umbrellas[i].implies & ~(uint64_t)DANGEROUS;
	for (i = 0; i < sizeof(umbrellas) / sizeof(umbrellas[0]); i++)
		if ((stmt & umbrellas[i].bit) && (stmt & umbrellas[i].from & cov))
			cov |= umbrellas[i].bit;
	return cov & stmt;
}

static bool lets_run(enum ag_action a)
{
	return a == AG_ACT_ALLOW || a == AG_ACT_OBSERVE;
}

/*
 * The allow or observe rule that came closest to matching and what it left uncovered, for the
 * default's why (put in words only then: this runs for every statement).
 */
struct near_miss {
	const char *rule;  /* NULL: none had a say */
	uint64_t classes;  /* the classes it did not cover, or 0 and */
	const char *table; /* the table it did not */
	int left;	   /* how many things it left uncovered */
};

static void near_miss(struct near_miss *m, const char *rule, uint64_t classes, const char *table)
{
	int left = table ? 1 : __builtin_popcountll(classes);

	if (!m->rule || left < m->left)
		*m = (struct near_miss){ rule, classes, table, left };
}

/*
 * Does every condition of r's when: hold for s? why gets what matched and miss the near
 * misses, unless why is NULL (a decision that is not explained).
 */
static bool rule_matches(const struct ag_policy_stmt_rule *r, const struct ag_sql_stmt *s,
			 char *why, size_t len, struct near_miss *miss)
{
	const struct ag_kv *cmd = r->w_command, *tabs = r->w_tables, *where = r->w_where;
	bool every = lets_run(r->then);
	char list[192], names[256];

	if (why)
		why[0] = '\0';
	if (cmd && every) {
		uint64_t cov = covered_classes(r->classes, s->classes);

		if (!s->classes || cov != s->classes) {
			if (cov && why)
				near_miss(miss, r->name, s->classes & ~cov, NULL);
			return false;
		}
		if (why) {
			list_str(cmd, list, sizeof(list));
			why_add(why, len, "command %s covered by [%s]",
				ag_sql_class_names(s->classes, names, sizeof(names)), list);
		}
	} else if (cmd) {
		const char *hit = NULL;

		if (!(s->classes & r->classes))
			return false;
		for (size_t i = 0; why && i < cmd->nlist && !hit; i++)
			if (s->classes & ag_sql_class_by_name(cmd->list[i]))
				hit = cmd->list[i];
		if (why) {
			list_str(cmd, list, sizeof(list));
			why_add(why, len, "command %s in [%s]", hit ? hit : "?", list);
		}
	}
	if (tabs && every) {
		for (size_t i = 0; i < s->ntables; i++) {
			size_t j;

			for (j = 0; j < tabs->nlist; j++)
				if (table_matches(tabs->list[j], s->tables[i]))
					break;
			if (j == tabs->nlist) {
				if (why)
					near_miss(miss, r->name, 0, s->tables[i]);
				return false;
			}
		}
		if (why) {
			list_str(tabs, list, sizeof(list));
			if (s->ntables)
				why_add(why, len, "every table in [%s]", list);
			else
				why_add(why, len, "no table outside [%s]", list);
		}
	} else if (tabs) {
		const char *t = NULL, *g = NULL;

		for (size_t i = 0; i < s->ntables && !g; i++)
			for (size_t j = 0; j < tabs->nlist && !g; j++)
				if (table_matches(tabs->list[j], s->tables[i])) {
					t = s->tables[i];
					g = tabs->list[j];
				}
		if (!g)
			return false;
		if (why)
			why_add(why, len, "table %s matches %s", t, g);
	}
	if (where && where->value) {
		bool writes = s->classes & (AG_SQL_UPDATE | AG_SQL_DELETE);

		if (!strcmp(where->value, "absent") ? !s->where_absent : !writes || s->where_absent)
			return false;
		if (why)
			why_add(why, len, "where %s", where->value);
	}
	if (why && !why[0])
		snprintf(why, len, "no conditions");
	return true;
}

/* ag_sql_decide_stmt(), d->why left empty unless explain. */
static void decide_stmt(const struct ag_policy_rule *rule, const struct ag_sql_stmt *s,
			struct ag_sql_decision *d, bool explain)
{
	struct near_miss miss = { 0 };
	char names[256], left[192] = "";
	char *why = explain ? d->why : NULL;

	d->action = AG_ACT_DENY;
	d->rule = "default";
	d->stmt = 0;
	d->why[0] = '\0';
	if (!rule) {
		snprintf(d->why, sizeof(d->why), "no rule for this agent and target");
		return;
	}
	for (size_t i = 0; i < rule->nsql; i++)
		if (rule_matches(&rule->sql[i], s, why, sizeof(d->why), &miss)) {
			d->action = rule->sql[i].then;
			d->rule = rule->sql[i].name;
			return;
		}
	if (s->classes == AG_SQL_EMPTY) {
		/* Clients ping with an empty query (JDBC's isValid); nothing runs. */
		d->action = AG_ACT_ALLOW;
		snprintf(d->why, sizeof(d->why), "empty query, nothing runs");
		return;
	}
	if (!explain)
		return;
	if (miss.table)
		snprintf(left, sizeof(left), " (%s does not cover table %s)", miss.rule,
			 miss.table);
	else if (miss.rule)
		snprintf(left, sizeof(left), " (%s does not cover %s)", miss.rule,
			 ag_sql_class_names(miss.classes, names, sizeof(names)));
	snprintf(d->why, sizeof(d->why), "no sql rule matches %s%s",
		 s->classes ? ag_sql_class_names(s->classes, names, sizeof(names))
			    : "(an unclassified statement)",
		 left);
}

void ag_sql_decide_stmt(const struct ag_policy_rule *rule, const struct ag_sql_stmt *s,
			struct ag_sql_decision *d)
{
	memset(d, 0, sizeof(*d));
	decide_stmt(rule, s, d, true);
}

static int restrictiveness(enum ag_action a)
{
	switch (a) {
	case AG_ACT_ALLOW:
		return 0;
	case AG_ACT_OBSERVE:
		return 1;
	case AG_ACT_APPROVE:
		return 2;
	case AG_ACT_DENY:
		break;
	}
	return 3;
}

static void decide(const struct ag_policy_rule *rule, const struct ag_sql_result *r,
		   struct ag_sql_decision *d, bool explain)
{
	struct ag_sql_decision one;

	d->action = AG_ACT_DENY;
	d->rule = "default";
	d->stmt = 0;
	d->why[0] = '\0';
	if (!r || r->error || !r->nstmts) {
		snprintf(d->why, sizeof(d->why), "the SQL does not parse");
		return;
	}
	for (size_t i = 0; i < r->nstmts; i++) {
		decide_stmt(rule, &r->stmts[i], &one, explain);
		if (!i || restrictiveness(one.action) > restrictiveness(d->action)) {
			*d = one;
			d->stmt = i;
		}
	}
}

void ag_sql_decide(const struct ag_policy_rule *rule, const struct ag_sql_result *r,
		   struct ag_sql_decision *d)
{
	memset(d, 0, sizeof(*d));
	decide(rule, r, d, true);
}

void ag_sql_decide_run(const struct ag_policy_rule *rule, const struct ag_sql_result *r,
		       struct ag_sql_decision *d)
{
	size_t at;

	decide(rule, r, d, false);
	if (d->action == AG_ACT_ALLOW || d->action == AG_ACT_OBSERVE || d->why[0])
		return;
	/* It stops the string: the deciding statement's why, as ag_sql_decide gives it. */
	at = d->stmt;
	decide_stmt(rule, &r->stmts[at], d, true);
	d->stmt = at;
}
