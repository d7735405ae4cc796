// SPDX-License-Identifier: GPL-2.0
/*
 * Masking on the PostgreSQL wire; see pgmask.h. Rows are rewritten only when a value changes:
 * the untouched row is passed on as it came, and a changed one is rebuilt from the unchanged
 * stretches of the original plus the new values. COPY statements are read from libpg_query's
 * parse tree (JSON, through yajl) for their table, column list and format options.
 */
#include <ctype.h>
#include <errno.h>
#include <pg_query.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <yajl/yajl_tree.h>

#include "clock.h"
#include "log.h"
#include "pgmask.h"
#include "pgwire.h"
#include "sqlorigin.h"

/* --- type OIDs -------------------------------------------------------------------------------- */

/* Text whose bytes are the value in both formats (binary text is the raw string). */
static bool type_raw_text(uint32_t t)
{
	switch (t) {
	case PG_OID_TEXT:
	case PG_OID_VARCHAR:
	case PG_OID_BPCHAR:
	case PG_OID_NAME:
	case PG_OID_CHAR:
	case PG_OID_UNKNOWN:
	case PG_OID_JSON:
	case PG_OID_XML:
		return true;
	default:
		return false;
	}
}

/*
 * Text-format values that any replacement text keeps valid for the client: strings, documents,
 * and the containers whose text holds strings (records, composites and other user types, arrays
 * of strings).
 */
static bool type_textlike(uint32_t t)
{
	if (type_raw_text(t) || t == PG_OID_JSONB || t == PG_OID_RECORD)
		return true;
	switch (t) {
	case 1002: /* char[] */
	case 1003: /* name[] */
	case 1009: /* text[] */
	case 1014: /* bpchar[] */
	case 1015: /* varchar[] */
	case 199:  /* json[] */
	case 143:  /* xml[] */
	case 3807: /* jsonb[] */
	case 2287: /* record[] */
		return true;
	default:
		return t >= PG_OID_FIRST_NORMAL;
	}
}

/* Scalars whose text or binary form cannot carry a detectable value (no long digit runs). */
static bool type_opaque_scalar(uint32_t t)
{
	switch (t) {
	case PG_OID_BOOL:
	case PG_OID_INT2:
	case PG_OID_INT4:
	case PG_OID_OID:
	case PG_OID_FLOAT4:
	case PG_OID_FLOAT8:
	case 1082: /* date */
	case 1083: /* time */
	case 1114: /* timestamp */
	case 1184: /* timestamptz */
	case 1186: /* interval */
	case 1266: /* timetz */
	case 2950: /* uuid */
	case 869:  /* inet */
	case 650:  /* cidr */
	case 829:  /* macaddr */
	case 774:  /* macaddr8 */
	case 28:   /* xid */
	case 29:   /* cid */
	case 27:   /* tid */
		return true;
	default:
		return false;
	}
}

/* Binary values with a fixed layout of numbers: nothing for a detector to read. */
static bool type_binary_numeric(uint32_t t)
{
	return type_opaque_scalar(t) || t == PG_OID_INT8 || t == 1700 /* numeric */ ||
	       t == 790 /* money */;
}

static void plan_col(struct pg_col *c, const struct pg_masking *mk, bool covered)
{
	c->act = PG_COL_PASS;
	c->kind = AG_MASK_TEXT;
	c->jsonb_bin = false;
	if (c->format == 0) {
		if (covered) {
			if (c->type == PG_OID_BYTEA) {
				c->act = PG_COL_NULL; /* no replacement text is valid hex */
			} else {
				c->act = PG_COL_WHOLE;
				c->kind = type_textlike(c->type) ? AG_MASK_TEXT : AG_MASK_TYPED;
			}
		} else if (mk->detectors && c->type != PG_OID_BYTEA &&
			   !type_opaque_scalar(c->type)) {
			c->act = PG_COL_DETECT;
			c->kind = type_textlike(c->type) ? AG_MASK_TEXT : AG_MASK_TYPED;
		}
		return;
	}
	/* Binary: raw text and bytea are masked as bytes; anything else covered is NULLed. */
	if (type_raw_text(c->type) || c->type == PG_OID_BYTEA || c->type == PG_OID_JSONB) {
		c->jsonb_bin = c->type == PG_OID_JSONB;
		if (covered)
			c->act = PG_COL_WHOLE;
		else if (mk->detectors)
			c->act = PG_COL_DETECT;
	} else if (covered) {
		c->act = PG_COL_NULL;
	} else if (mk->detectors && !type_binary_numeric(c->type)) {
		/* Records, arrays, user types: their strings sit in the bytes; a hit NULLs it. */
		c->act = PG_COL_DETECT;
		c->kind = AG_MASK_TYPED;
	}
}

/* --- the catalog --------------------------------------------------------------------------- */

struct pg_catcol {
	uint32_t rel;
	int16_t attnum;
	int16_t copypos; /* position in COPY's default column list, 0: not in it */
	uint32_t type;
	char *nsp, *relname, *att;
};

struct pg_catalog {
	int refs;
	struct pg_catcol *cols;
	size_t n, cap;
};

/* A glob as a LIKE pattern (escape '!') that matches at least what the glob matches. */
static void like_pattern(FILE *f, const char *glob)
{
	fputs("pg_catalog.like_escape('", f);
	for (const char *p = glob; *p; p++) {
		switch (*p) {
		case '*':
			fputc('%', f);
			break;
		case '?':
			fputc('_', f);
			break;
		case '%':
		case '_':
		case '!':
			fputc('!', f);
			fputc(*p, f);
			break;
		case '[':
			/* A character class: anything from here on. */
			fputc('%', f);
			fputs("', '!')", f);
			return;
		case '\'':
			fputs("''", f);
			break;
		case '\\':
			fputc('_', f);
			break;
		default:
			fputc(*p, f);
		}
	}
	fputs("', '!')", f);
}

/*
 * The query runs in the agent's own session, under its search_path: every operator and
 * function is named in pg_catalog, so that nothing the agent defines can answer in their place.
 */
/* The column rules as a WHERE condition on n.nspname, c.relname, a.attname. */
static void patterns_where(FILE *f, size_t n, const char *const *schemas, const char *const *tables,
			   const char *const *columns)
{
	fputs("(", f);
	for (size_t i = 0; i < n; i++) {
		const char *parts[3] = { schemas ? schemas[i] : NULL, tables ? tables[i] : NULL,
					 columns ? columns[i] : NULL };
		static const char *const exprs[3] = { "n.nspname", "c.relname", "a.attname" };
		bool any = false;

		fputs(i ? " OR (" : "(", f);
		for (int k = 0; k < 3; k++) {
			if (!parts[k] || !strcmp(parts[k], "*"))
				continue;
			fprintf(f, "%s%s::pg_catalog.text OPERATOR(pg_catalog.~~*) ",
				any ? " AND " : "", exprs[k]);
			like_pattern(f, parts[k]);
			any = true;
		}
		fputs(any ? ")" : "true)", f);
	}
	fputs(")", f);
}

#define EQ " OPERATOR(pg_catalog.=) "

/*
 * Rows: the column (relation OID, schema, relation, attnum, name, type, position in COPY's
 * column list) and the names the rules matched (the same, or for a column of a view or
 * materialized view reading a covered column: that column's). Every column of such a view is
 * covered: which of them the covered column feeds is not in the catalog, so all are.
 */
char *pg_catalog_sql(const struct ag_masker *m)
{
	const char *const *schemas = NULL, *const *tables = NULL, *const *columns = NULL;
	size_t n = m ? ag_masker_patterns(m, &schemas, &tables, &columns) : 0;
	char *sql = NULL;
	size_t len = 0;
	FILE *f;

	if (!n)
		return NULL;
	f = open_memstream(&sql, &len);
	if (!f)
		return NULL;
	fputs("SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname, a.atttypid, "
	      "CASE WHEN a.attgenerated OPERATOR(pg_catalog.=) '' THEN "
	      "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute b "
	      "WHERE b.attrelid OPERATOR(pg_catalog.=) a.attrelid "
	      "AND b.attnum OPERATOR(pg_catalog.>) 0 AND NOT b.attisdropped "
	      "AND b.attgenerated OPERATOR(pg_catalog.=) '' "
	      "AND b.attnum OPERATOR(pg_catalog.<=) a.attnum) ELSE 0 END, "
	      "n.nspname, c.relname, a.attname "
	      "FROM pg_catalog.pg_attribute a "
	      "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid "
	      "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
	      "WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped "
	      "AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p,v,m,f}'::pg_catalog.\"char\"[]) "
	      "AND ",
	      f);
	patterns_where(f, n, schemas, tables, columns);
	fputs(" UNION ALL SELECT v.oid, vn.nspname, v.relname, va.attnum, va.attname, va.atttypid, "
	      "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute b "
	      "WHERE b.attrelid" EQ "va.attrelid AND b.attnum OPERATOR(pg_catalog.>) 0 "
	      "AND NOT b.attisdropped AND b.attnum OPERATOR(pg_catalog.<=) va.attnum), "
	      "n.nspname, c.relname, a.attname "
	      "FROM pg_catalog.pg_attribute a "
	      "JOIN pg_catalog.pg_class c ON c.oid" EQ "a.attrelid "
	      "JOIN pg_catalog.pg_namespace n ON n.oid" EQ "c.relnamespace "
	      "JOIN pg_catalog.pg_depend d ON d.refclassid" EQ
	      "'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid" EQ "c.oid "
	      "AND d.refobjsubid" EQ "a.attnum AND d.classid" EQ
	      "'pg_catalog.pg_rewrite'::pg_catalog.regclass "
	      "JOIN pg_catalog.pg_rewrite rw ON rw.oid" EQ "d.objid "
	      "JOIN pg_catalog.pg_class v ON v.oid" EQ
	      "rw.ev_class AND v.oid OPERATOR(pg_catalog.<>) "
	      "c.oid AND v.relkind" EQ "ANY ('{v,m}'::pg_catalog.\"char\"[]) "
	      "JOIN pg_catalog.pg_namespace vn ON vn.oid" EQ "v.relnamespace "
	      "JOIN pg_catalog.pg_attribute va ON va.attrelid" EQ "v.oid "
	      "AND va.attnum OPERATOR(pg_catalog.>) 0 AND NOT va.attisdropped "
	      "WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped AND ",
	      f);
	patterns_where(f, n, schemas, tables, columns);
	fputs(" ORDER BY 1, 4", f);
	if (fclose(f)) {
		free(sql);
		return NULL;
	}
	return sql;
}

struct pg_catalog *pg_catalog_new(void)
{
	struct pg_catalog *c = calloc(1, sizeof(*c));

	if (c)
		c->refs = 1;
	return c;
}

struct pg_catalog *pg_catalog_ref(struct pg_catalog *c)
{
	if (c)
		__atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
	return c;
}

void pg_catalog_unref(struct pg_catalog *c)
{
	if (!c || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL))
		return;
	for (size_t i = 0; i < c->n; i++) {
		free(c->cols[i].nsp);
		free(c->cols[i].relname);
		free(c->cols[i].att);
	}
	free(c->cols);
	free(c);
}

static char *field_dup(const uint8_t *p, int32_t len)
{
	char *s = len >= 0 ? malloc(len + 1) : NULL;

	if (s) {
		memcpy(s, p, len);
		s[len] = '\0';
	}
	return s;
}

int pg_catalog_add_row(struct pg_catalog *c, const struct ag_masker *m, const uint8_t *body,
		       size_t len)
{
	char *f[10] = { 0 };
	struct pg_catcol *cc;
	struct pg_rd r;
	int err = -EPROTO;

	pg_rd_init(&r, body, len);
	if (pg_rd_u16(&r) != 10)
		return -EPROTO;
	for (int i = 0; i < 10; i++) {
		int32_t flen = (int32_t)pg_rd_u32(&r);
		const uint8_t *v = flen >= 0 ? pg_rd_bytes(&r, flen) : NULL;

		if (r.bad || !v)
			goto out;
		f[i] = field_dup(v, flen);
		if (!f[i]) {
			err = -ENOMEM;
			goto out;
		}
	}
	/* The LIKE filter is a superset: the masker's own matching has the last word. */
	if (!ag_masker_column(m, f[7], f[8], f[9])) {
		err = 0;
		goto out;
	}
	if (c->n == c->cap) {
		size_t ncap = c->cap ? 2 * c->cap : 16;
		struct pg_catcol *n = realloc(c->cols, ncap * sizeof(*n));

		if (!n) {
			err = -ENOMEM;
			goto out;
		}
		c->cols = n;
		c->cap = ncap;
	}
	cc = &c->cols[c->n++];
	cc->rel = strtoul(f[0], NULL, 10);
	cc->attnum = atoi(f[3]);
	cc->type = strtoul(f[5], NULL, 10);
	cc->copypos = atoi(f[6]);
	cc->nsp = f[1];
	cc->relname = f[2];
	cc->att = f[4];
	f[1] = f[2] = f[4] = NULL;
	err = 0;
out:
	for (int i = 0; i < 10; i++)
		free(f[i]);
	return err;
}

static int catcol_cmp(const void *a, const void *b)
{
	const struct pg_catcol *x = a, *y = b;

	if (x->rel != y->rel)
		return x->rel < y->rel ? -1 : 1;
	return x->attnum - y->attnum;
}

void pg_catalog_finish(struct pg_catalog *c)
{
	if (c->n)
		qsort(c->cols, c->n, sizeof(*c->cols), catcol_cmp);
}

bool pg_catalog_covered(const struct pg_catalog *c, uint32_t rel, int attnum, uint32_t *type)
{
	struct pg_catcol key = { .rel = rel, .attnum = attnum };
	const struct pg_catcol *hit;

	if (!c || !c->n || !rel)
		return false;
	hit = bsearch(&key, c->cols, c->n, sizeof(*c->cols), catcol_cmp);
	if (hit && type)
		*type = hit->type;
	return hit;
}

static bool rel_matches(const struct pg_catcol *cc, const char *schema, const char *table)
{
	return !strcmp(cc->relname, table) && (!schema || !strcmp(cc->nsp, schema));
}

bool pg_catalog_has_column(const struct pg_catalog *c, const char *schema, const char *table,
			   const char *column)
{
	for (size_t i = 0; c && i < c->n; i++)
		if (rel_matches(&c->cols[i], schema, table) && !strcmp(c->cols[i].att, column))
			return true;
	return false;
}

bool pg_catalog_has_table(const struct pg_catalog *c, const char *schema, const char *table)
{
	for (size_t i = 0; c && i < c->n; i++)
		if (rel_matches(&c->cols[i], schema, table))
			return true;
	return false;
}

/* The cache. Few entries (targets × databases × mask rules), so a list under a mutex. */
struct cat_entry {
	struct cat_entry *next;
	char *target, *database, *key;
	struct pg_catalog *cat;
	uint64_t expires_ms;
};

#define CAT_CACHE_MAX 256

static pthread_mutex_t cat_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cat_entry *cat_head;
static size_t cat_count;

static void cat_entry_free(struct cat_entry *e)
{
	pg_catalog_unref(e->cat);
	free(e->target);
	free(e->database);
	free(e->key);
	free(e);
}

/* Under cat_lock: drops expired entries (and the oldest beyond the cap). */
static void cat_expire(uint64_t now)
{
	struct cat_entry **pp = &cat_head;
	size_t kept = 0;

	while (*pp) {
		struct cat_entry *e = *pp;

		if (e->expires_ms <= now || kept >= CAT_CACHE_MAX) {
			*pp = e->next;
			cat_entry_free(e);
			cat_count--;
			continue;
		}
		kept++;
		pp = &e->next;
	}
}

struct pg_catalog *pg_catalog_cache_get(const char *target, const char *database, const char *key)
{
	struct pg_catalog *c = NULL;
	uint64_t now = ag_mono_ms();

	pthread_mutex_lock(&cat_lock);
	cat_expire(now);
	for (struct cat_entry *e = cat_head; e; e = e->next)
		if (!strcmp(e->target, target) && !strcmp(e->database, database) &&
		    !strcmp(e->key, key)) {
			c = pg_catalog_ref(e->cat);
			break;
		}
	pthread_mutex_unlock(&cat_lock);
	return c;
}

void pg_catalog_cache_put(const char *target, const char *database, const char *key,
			  struct pg_catalog *c, uint64_t ttl_ms)
{
	struct cat_entry *e = calloc(1, sizeof(*e));
	uint64_t now = ag_mono_ms();

	if (!e)
		return;
	e->target = strdup(target);
	e->database = strdup(database);
	e->key = strdup(key);
	e->cat = pg_catalog_ref(c);
	e->expires_ms = now + ttl_ms;
	if (!e->target || !e->database || !e->key) {
		cat_entry_free(e);
		return;
	}
	pthread_mutex_lock(&cat_lock);
	/* The newest first: a lookup finds it before an older one for the same key. */
	e->next = cat_head;
	cat_head = e;
	cat_count++;
	cat_expire(now);
	pthread_mutex_unlock(&cat_lock);
}

/* --- shapes ------------------------------------------------------------------------------ */

struct pg_sql *pg_sql_new(const char *text, size_t len)
{
	struct pg_sql *q = malloc(sizeof(*q) + len + 1);

	if (!q)
		return NULL;
	q->refs = 1;
	q->analysed = false;
	q->cat = NULL;
	q->m_id = 0;
	q->orig = NULL;
	memcpy(q->text, text, len);
	q->text[len] = '\0';
	return q;
}

struct pg_sql *pg_sql_ref(struct pg_sql *q)
{
	if (q)
		q->refs++;
	return q;
}

void pg_sql_unref(struct pg_sql *q)
{
	if (!q || --q->refs)
		return;
	sql_origin_unref(q->orig);
	pg_catalog_unref(q->cat);
	free(q);
}

/* The origin of q's outputs against mk's catalog, analysed once per catalog and masker. */
static int pg_sql_origin(struct pg_sql *q, const struct pg_masking *mk, struct sql_origin **out)
{
	struct sql_origin *o;
	int err;

	if (!q->analysed || q->cat != mk->cat || q->m_id != ag_masker_id(mk->m)) {
		err = sql_origin_analyze(q->text, mk->m, mk->cat, &o);
		if (err)
			return err;
		sql_origin_unref(q->orig);
		pg_catalog_unref(q->cat);
		q->orig = o;
		q->cat = pg_catalog_ref((struct pg_catalog *)mk->cat);
		q->m_id = ag_masker_id(mk->m);
		q->analysed = true;
	}
	*out = sql_origin_ref(q->orig);
	return 0;
}

/*
 * A shape is made per Describe and per result and freed when the statement is done: each
 * thread keeps the last one freed, with its column array, for the next (no malloc and free of
 * either per statement). Not calloc for a new one: it skips malloc's per-thread cache.
 */
#define SPARE_MAX_COLS 64

static __thread struct pg_shape *spare_shape;
static pthread_key_t spare_key;
static pthread_once_t spare_once = PTHREAD_ONCE_INIT;

static void spare_free(void *p)
{
	struct pg_shape *sh = p;

	if (sh) {
		free(sh->cols);
		free(sh);
	}
	spare_shape = NULL;
}

static void spare_key_init(void)
{
	pthread_key_create(&spare_key, spare_free); /* frees a thread's spare when it exits */
}

struct pg_shape *pg_shape_new(void)
{
	struct pg_shape *sh = spare_shape;
	struct pg_col *cols = NULL;
	uint16_t ccap = 0;

	if (sh) {
		spare_shape = NULL;
		pthread_setspecific(spare_key, NULL);
		cols = sh->cols;
		ccap = sh->ccap;
	} else if (!(sh = malloc(sizeof(*sh)))) {
		return NULL;
	}
	*sh = (struct pg_shape){ .refs = 1, .cols = cols, .ccap = ccap };
	return sh;
}

struct pg_shape *pg_shape_ref(struct pg_shape *sh)
{
	if (sh)
		sh->refs++;
	return sh;
}

void pg_shape_unref(struct pg_shape *sh)
{
	if (!sh || --sh->refs)
		return;
	sql_origin_unref(sh->orig);
	pg_sql_unref(sh->sql);
	if (!spare_shape && sh->ccap <= SPARE_MAX_COLS) {
		pthread_once(&spare_once, spare_key_init);
		spare_shape = sh;
		pthread_setspecific(spare_key, sh);
		return;
	}
	free(sh->cols);
	free(sh);
}

void pg_shape_set_nodata(struct pg_shape *sh)
{
	sh->ncols = 0; /* (the array stays for the next RowDescription) */
	sh->any = false;
	sh->known = true;
}

int pg_shape_from_rowdesc(struct pg_shape *sh, const struct pg_masking *mk, const uint8_t *body,
			  size_t len)
{
	struct pg_col *cols = NULL;
	struct pg_rd r;
	uint16_t n;
	bool any = false;

	/* With the catalog as it is now (a view made since the statement came is in it). */
	if (sh->sql && mk->cat) {
		int err;

		sql_origin_unref(sh->orig);
		sh->orig = NULL;
		err = pg_sql_origin(sh->sql, mk, &sh->orig);
		if (err)
			return err;
	}
	pg_rd_init(&r, body, len);
	n = pg_rd_u16(&r);
	if (r.bad)
		return -EPROTO;
	/* Every field is set below: the shape's own array when it has room. */
	if (n > sh->ccap) {
		cols = malloc(n * sizeof(*cols));
		if (!cols)
			return -ENOMEM;
	} else {
		cols = sh->cols;
		sh->ncols = 0; /* rewritten in place: unknown until done */
		sh->known = false;
		sh->any = false;
	}
	for (uint16_t i = 0; i < n; i++) {
		struct pg_col *c = &cols[i];
		bool covered;
		uint32_t ctype;

		pg_rd_str(&r, NULL); /* the column's label: an alias changes nothing here */
		c->table = pg_rd_u32(&r);
		c->attnum = (int16_t)pg_rd_u16(&r);
		c->type = pg_rd_u32(&r);
		pg_rd_u16(&r); /* typlen */
		pg_rd_u32(&r); /* typmod */
		c->format = (int16_t)pg_rd_u16(&r);
		if (r.bad) {
			if (cols != sh->cols)
				free(cols);
			return -EPROTO;
		}
		covered = c->table && pg_catalog_covered(mk->cat, c->table, c->attnum, &ctype);
		c->derived = !covered && sql_origin_derived(sh->orig, i, c->table);
		plan_col(c, mk, covered || c->derived);
		any |= c->act != PG_COL_PASS;
	}
	if (cols != sh->cols) {
		free(sh->cols);
		sh->cols = cols;
		sh->ccap = n;
	}
	sh->ncols = n;
	sh->any = any;
	sh->known = true;
	return 0;
}

/* --- rewriting values ---------------------------------------------------------------------- */

/*
 * A message being rebuilt: the stretches of the original not replaced are copied in as the
 * rewrite goes (copied = how far the original is in out), changed values in between.
 */
struct rewrite {
	struct ag_buf *out;
	const uint8_t *msg;
	size_t copied;
	size_t start; /* where the new message begins in out */
	bool changed;
	bool oom;
};

static void rw_upto(struct rewrite *rw, size_t off)
{
	if (!rw->changed) {
		rw->changed = true;
		rw->start = ag_buf_len(rw->out);
	}
	if (off > rw->copied && ag_buf_append(rw->out, rw->msg + rw->copied, off - rw->copied))
		rw->oom = true;
	rw->copied = off;
}

static void rw_put(struct rewrite *rw, const void *p, size_t n)
{
	if (ag_buf_append(rw->out, p, n))
		rw->oom = true;
}

static int rw_finish(struct rewrite *rw, size_t len)
{
	if (!rw->changed)
		return 0;
	rw_upto(rw, len);
	if (rw->oom)
		return -ENOMEM;
	pg_put32((uint8_t *)ag_buf_head(rw->out) + rw->start + 1,
		 ag_buf_len(rw->out) - rw->start - 1);
	return 1;
}

/*
 * Masks one value into tmp. Returns >0 (masked: tmp holds the value, or *is_null), 0 (left as it
 * is) or <0.
 */
static int mask_value(const struct pg_masking *mk, uint8_t act, uint8_t kind, const uint8_t *v,
		      size_t n, struct ag_buf *tmp, bool *is_null)
{
	int rc;

	tmp->start = tmp->end = 0;
	*is_null = false;
	if (act == PG_COL_NULL) {
		*is_null = true;
		return 1;
	}
	if (act == PG_COL_DETECT && kind == AG_MASK_TYPED) {
		/* No replacement text is valid for the type: a detection NULLs the value. */
		rc = ag_mask_value(mk->m, false, AG_MASK_TEXT, v, n, tmp, is_null);
		if (rc > 0) {
			tmp->start = tmp->end = 0;
			*is_null = true;
		}
		return rc;
	}
	return ag_mask_value(mk->m, act == PG_COL_WHOLE, kind, v, n, tmp, is_null);
}

int pg_mask_datarow(const struct pg_masking *mk, const struct pg_shape *sh, const uint8_t *msg,
		    size_t len, struct ag_buf *out, uint64_t *masked)
{
	struct rewrite rw = { .out = out, .msg = msg };
	struct ag_buf tmp = { 0 };
	struct pg_rd r;
	uint16_t n;
	int err = 0;

	pg_rd_init(&r, msg + PG_HDR, len - PG_HDR);
	n = pg_rd_u16(&r);
	if (r.bad || n != sh->ncols)
		return -EPROTO;
	for (uint16_t i = 0; i < n; i++) {
		const struct pg_col *c = &sh->cols[i];
		size_t at = r.p - msg;
		int32_t flen = (int32_t)pg_rd_u32(&r);
		const uint8_t *v = flen > 0 ? pg_rd_bytes(&r, flen) : NULL;
		const uint8_t *mv;
		size_t mlen;
		bool is_null;
		int rc;

		if (r.bad || flen < -1)
			goto bad;
		if (flen < 0 || c->act == PG_COL_PASS)
			continue;
		if (!v)
			v = r.p; /* an empty value */
		mv = v;
		mlen = flen;
		if (c->jsonb_bin) {
			if (!mlen)
				continue;
			mv++; /* the version byte stays */
			mlen--;
		}
		if (c->derived && c->act == PG_COL_WHOLE && c->kind == AG_MASK_TEXT &&
		    ag_masker_style(mk->m) == AG_MASK_PARTIAL) {
			/* The hint kept of a computed value can be the secret's own characters. */
			tmp.start = tmp.end = 0;
			is_null = false;
			rc = ag_buf_append(&tmp, "[REDACTED]", 10) ? -ENOMEM : 1;
		} else {
			rc = mask_value(mk, c->act, c->kind, mv, mlen, &tmp, &is_null);
		}
		if (rc < 0) {
			err = rc;
			goto out;
		}
		if (!rc)
			continue;
		*masked += rc;
		rw_upto(&rw, at);
		if (is_null) {
			uint8_t m1[4] = { 0xff, 0xff, 0xff, 0xff };

			rw_put(&rw, m1, 4);
		} else {
			uint8_t l[4];

			pg_put32(l, ag_buf_len(&tmp) + (c->jsonb_bin ? 1 : 0));
			rw_put(&rw, l, 4);
			if (c->jsonb_bin)
				rw_put(&rw, v, 1);
			rw_put(&rw, ag_buf_head(&tmp), ag_buf_len(&tmp));
		}
		rw.copied = r.p - msg;
	}
	if (pg_rd_left(&r))
		goto bad;
	err = rw_finish(&rw, len);
out:
	if (err < 0 && rw.changed)
		out->end = out->start + rw.start; /* nothing half-built stays */
	ag_buf_free(&tmp);
	return err;
bad:
	err = -EPROTO;
	goto out;
}

int pg_mask_notice(const struct pg_masking *mk, const uint8_t *msg, size_t len, struct ag_buf *out,
		   uint64_t *masked)
{
	struct rewrite rw = { .out = out, .msg = msg };
	struct ag_buf tmp = { 0 };
	struct pg_rd r;
	int err = 0;
	bool notify = msg[0] == PG_B_NOTIFICATION;

	if (!mk->detectors)
		return 0;
	pg_rd_init(&r, msg + PG_HDR, len - PG_HDR);
	if (notify) {
		pg_rd_u32(&r);	     /* pid */
		pg_rd_str(&r, NULL); /* channel */
	}
	while (!r.bad && pg_rd_left(&r)) {
		uint8_t code = notify ? 0 : pg_rd_u8(&r);
		size_t at, vlen;
		const char *v;
		bool is_null;
		int rc;

		if (!notify && !code)
			break;
		at = r.p - msg;
		v = pg_rd_str(&r, &vlen);
		if (!v)
			break;
		/* Texts that can quote data: message, detail, hint, context, internal query. */
		if (!notify && !strchr("MDHWq", code))
			continue;
		rc = mask_value(mk, PG_COL_DETECT, AG_MASK_TEXT, (const uint8_t *)v, vlen, &tmp,
				&is_null);
		if (rc < 0) {
			err = rc;
			goto out;
		}
		if (rc > 0) {
			*masked += rc;
			rw_upto(&rw, at);
			if (!is_null)
				rw_put(&rw, ag_buf_head(&tmp), ag_buf_len(&tmp));
			rw_put(&rw, "", 1);
			rw.copied = r.p - msg;
		}
		if (notify)
			break;
	}
	if (r.bad)
		err = -EPROTO;
	else
		err = rw_finish(&rw, len);
out:
	if (err < 0 && rw.changed)
		out->end = out->start + rw.start;
	ag_buf_free(&tmp);
	return err;
}

/* Copies text with every "quoted" and (parenthesized)=(value) run replaced; true if any was. */
static bool redact_quoted(const char *v, size_t n, struct rewrite *rw)
{
	static const char red[] = "[REDACTED]";
	bool any = false;

	for (size_t i = 0; i < n; i++) {
		char close = v[i] == '"'				   ? '"'
			     : v[i] == '=' && i + 1 < n && v[i + 1] == '(' ? ')'
									   : 0;
		const char *end;

		if (close) {
			size_t from = i + (close == ')' ? 2 : 1);

			end = memchr(v + from, close, n - from);
			if (end) {
				rw_put(rw, v + i, from - i);
				rw_put(rw, red, sizeof(red) - 1);
				rw_put(rw, end, 1);
				i = end - v;
				any = true;
				continue;
			}
		}
		rw_put(rw, v + i, 1);
	}
	return any;
}

int pg_mask_error_values(const uint8_t *msg, size_t len, struct ag_buf *out, uint64_t *masked)
{
	struct rewrite rw = { .out = out, .msg = msg };
	const char *code = pg_error_field(msg + PG_HDR, len - PG_HDR, 'C');
	struct pg_rd r;
	int err;

	if (!code || (strncmp(code, "22", 2) && strncmp(code, "23", 2)))
		return 0;
	pg_rd_init(&r, msg + PG_HDR, len - PG_HDR);
	while (!r.bad && pg_rd_left(&r)) {
		uint8_t c = pg_rd_u8(&r);
		size_t at = r.p - msg, vlen;
		const char *v;

		if (!c)
			break;
		v = pg_rd_str(&r, &vlen);
		if (!v || !strchr("MDW", c) || (!memchr(v, '"', vlen) && !strstr(v, ")=(")))
			continue;
		rw_upto(&rw, at);
		if (redact_quoted(v, vlen, &rw))
			(*masked)++;
		rw_put(&rw, "", 1);
		rw.copied = r.p - msg;
	}
	if (r.bad)
		return -EPROTO;
	err = rw_finish(&rw, len);
	if (err < 0 && rw.changed)
		out->end = out->start + rw.start;
	return err;
}

/* --- COPY ------------------------------------------------------------------------------------ */

static const char *jstr(yajl_val obj, const char *key)
{
	const char *path[] = { key, NULL };
	yajl_val v = obj ? yajl_tree_get(obj, path, yajl_t_string) : NULL;

	return v ? YAJL_GET_STRING(v) : NULL;
}

static yajl_val jget(yajl_val obj, const char *key)
{
	const char *path[] = { key, NULL };

	return obj ? yajl_tree_get(obj, path, yajl_t_any) : NULL;
}

/* A DefElem's argument as a string ("true" for a bare option, as the server reads it). */
static const char *defelem_arg(yajl_val de, char *buf, size_t len)
{
	yajl_val arg = jget(de, "arg"), v;

	if (!arg)
		return "true";
	if ((v = jget(arg, "String")))
		return jstr(v, "sval") ? jstr(v, "sval") : "";
	if ((v = jget(arg, "Boolean"))) {
		yajl_val b = jget(v, "boolval");

		return b && YAJL_IS_TRUE(b) ? "true" : "false";
	}
	if ((v = jget(arg, "Integer"))) {
		yajl_val i = jget(v, "ival");

		snprintf(buf, len, "%lld", i && YAJL_IS_INTEGER(i) ? YAJL_GET_INTEGER(i) : 0);
		return buf;
	}
	return "";
}

static bool str_true(const char *s)
{
	return strcasecmp(s, "false") && strcasecmp(s, "off") && strcmp(s, "0") &&
	       strcasecmp(s, "no");
}

void pg_copy_spec_free(struct pg_copy_spec *cs)
{
	if (!cs)
		return;
	free(cs->schema);
	free(cs->table);
	for (size_t i = 0; i < cs->ncols; i++)
		free(cs->cols[i]);
	free(cs->cols);
	free(cs->null_str);
	free(cs);
}

static int copy_options(struct pg_copy_spec *cs, yajl_val opts)
{
	const char *delim = NULL, *null_str = NULL, *quote = NULL, *escape = NULL;

	for (size_t i = 0; opts && YAJL_IS_ARRAY(opts) && i < YAJL_GET_ARRAY(opts)->len; i++) {
		yajl_val de = jget(YAJL_GET_ARRAY(opts)->values[i], "DefElem");
		const char *name = jstr(de, "defname"), *arg;
		char buf[32];

		if (!name)
			continue;
		arg = defelem_arg(de, buf, sizeof(buf));
		if (!strcmp(name, "format")) {
			if (!strcasecmp(arg, "csv"))
				cs->format = PG_COPY_CSV;
			else if (!strcasecmp(arg, "binary"))
				cs->format = PG_COPY_BINARY;
		} else if (!strcmp(name, "delimiter")) {
			delim = arg;
		} else if (!strcmp(name, "null")) {
			null_str = arg;
		} else if (!strcmp(name, "quote")) {
			quote = arg;
		} else if (!strcmp(name, "escape")) {
			escape = arg;
		} else if (!strcmp(name, "header")) {
			cs->header = str_true(arg);
		}
	}
	cs->delim = cs->format == PG_COPY_CSV ? ',' : '\t';
	cs->quote = '"';
	if (delim && delim[0])
		cs->delim = delim[0];
	if (quote && quote[0])
		cs->quote = quote[0];
	cs->escape = escape && escape[0] ? escape[0] : cs->quote;
	cs->null_str = strdup(null_str ? null_str : cs->format == PG_COPY_CSV ? "" : "\\N");
	return cs->null_str ? 0 : -ENOMEM;
}

int pg_copy_spec_parse(const char *sql, struct pg_copy_spec **out)
{
	PgQueryParseResult pr = pg_query_parse(sql);
	struct pg_copy_spec *cs = NULL;
	yajl_val root = NULL, stmts, copy, rel, attl;
	int err = -EINVAL;

	*out = NULL;
	if (pr.error)
		goto out;
	root = yajl_tree_parse(pr.parse_tree, NULL, 0);
	stmts = jget(root, "stmts");
	if (!stmts || !YAJL_IS_ARRAY(stmts) || YAJL_GET_ARRAY(stmts)->len != 1)
		goto out;
	copy = jget(jget(YAJL_GET_ARRAY(stmts)->values[0], "stmt"), "CopyStmt");
	if (!copy)
		goto out;
	err = -ENOMEM;
	cs = calloc(1, sizeof(*cs));
	if (!cs)
		goto out;
	cs->to_stdout = !YAJL_IS_TRUE(jget(copy, "is_from")) && !jget(copy, "filename") &&
			!YAJL_IS_TRUE(jget(copy, "is_program"));
	rel = jget(copy, "relation");
	if (rel) {
		const char *schema = jstr(rel, "schemaname"), *table = jstr(rel, "relname");

		if ((schema && !(cs->schema = strdup(schema))) ||
		    (table && !(cs->table = strdup(table))))
			goto out;
	}
	attl = jget(copy, "attlist");
	if (attl && YAJL_IS_ARRAY(attl) && YAJL_GET_ARRAY(attl)->len) {
		size_t n = YAJL_GET_ARRAY(attl)->len;

		cs->cols = calloc(n, sizeof(*cs->cols));
		if (!cs->cols)
			goto out;
		for (size_t i = 0; i < n; i++) {
			const char *name =
				jstr(jget(YAJL_GET_ARRAY(attl)->values[i], "String"), "sval");

			cs->cols[i] = strdup(name ? name : "");
			if (!cs->cols[i])
				goto out;
			cs->ncols++;
		}
	}
	if (copy_options(cs, jget(copy, "options")))
		goto out;
	*out = cs;
	cs = NULL;
	err = 0;
out:
	pg_copy_spec_free(cs);
	yajl_tree_free(root);
	pg_query_free_parse_result(pr);
	return err;
}

/* Is field i (0-based) of COPY spec covered? */
static bool copy_field_covered(const struct pg_masking *mk, const struct pg_copy_spec *cs,
			       uint16_t i, uint32_t *type)
{
	const struct pg_catalog *c = mk->cat;

	*type = PG_OID_TEXT;
	if (!cs || !cs->table)
		return false;
	if (cs->cols) {
		if (i >= cs->ncols)
			return false;
		for (size_t k = 0; c && k < c->n; k++)
			if (rel_matches(&c->cols[k], cs->schema, cs->table) &&
			    !strcmp(c->cols[k].att, cs->cols[i])) {
				*type = c->cols[k].type;
				return true;
			}
		/* Not in the snapshot (a table made since): the rule itself still decides. */
		return ag_masker_column(mk->m, cs->schema, cs->table, cs->cols[i]);
	}
	/* Tables of that name in several schemas: masked in any of them (more, never less). */
	for (size_t k = 0; c && k < c->n; k++)
		if (rel_matches(&c->cols[k], cs->schema, cs->table) &&
		    c->cols[k].copypos == i + 1) {
			*type = c->cols[k].type;
			return true;
		}
	return false;
}

int pg_copy_plan_init(struct pg_copy_plan *p, const struct pg_masking *mk,
		      const struct pg_copy_spec *spec, uint16_t nfields)
{
	memset(p, 0, sizeof(*p));
	p->spec = spec;
	p->format = spec ? spec->format : PG_COPY_TEXT;
	p->delim = spec ? spec->delim : '\t';
	p->quote = spec ? spec->quote : '"';
	p->escape = spec ? spec->escape : '"';
	p->null_str = spec ? spec->null_str : "\\N";
	p->null_len = strlen(p->null_str);
	p->header_pending = spec && spec->header;
	p->nfields = nfields;
	if (!nfields)
		return 0;
	p->act = calloc(nfields, 1);
	p->kind = calloc(nfields, 1);
	if (!p->act || !p->kind) {
		pg_copy_plan_fini(p);
		return -ENOMEM;
	}
	for (uint16_t i = 0; i < nfields; i++) {
		uint32_t type;

		if (copy_field_covered(mk, spec, i, &type)) {
			p->act[i] = type == PG_OID_BYTEA ? PG_COL_NULL : PG_COL_WHOLE;
			p->kind[i] = type_textlike(type) ? AG_MASK_TEXT : AG_MASK_TYPED;
		} else if (mk->detectors) {
			/* The field's type is not known here: a hit is replaced by text. */
			p->act[i] = PG_COL_DETECT;
			p->kind[i] = AG_MASK_TEXT;
		}
		p->any |= p->act[i] != PG_COL_PASS;
	}
	return 0;
}

void pg_copy_plan_fini(struct pg_copy_plan *p)
{
	free(p->act);
	free(p->kind);
	p->act = p->kind = NULL;
	p->any = false;
}

static unsigned hexval(uint8_t c)
{
	return isdigit(c) ? (unsigned)(c - '0') : (unsigned)(tolower(c) - 'a' + 10);
}

/* COPY text format: backslash escapes, as the server writes them (CopyAttributeOutText). */
static int text_decode(const uint8_t *s, size_t n, struct ag_buf *out)
{
	for (size_t i = 0; i < n; i++) {
		uint8_t c = s[i];

		if (c == '\\' && i + 1 < n) {
			c = s[++i];
			switch (c) {
			case 'b':
				c = '\b';
				break;
			case 'f':
				c = '\f';
				break;
			case 'n':
				c = '\n';
				break;
			case 'r':
				c = '\r';
				break;
			case 't':
				c = '\t';
				break;
			case 'v':
				c = '\v';
				break;
			case 'x':
				if (i + 1 < n && isxdigit(s[i + 1])) {
					unsigned v = 0;

					for (int k = 0; k < 2 && i + 1 < n && isxdigit(s[i + 1]);
					     k++)
						v = v * 16 + hexval(s[++i]);
					c = v;
				}
				break;
			default:
				if (c >= '0' && c <= '7') {
					unsigned v = c - '0';

					for (int k = 0; k < 2 && i + 1 < n && s[i + 1] >= '0' &&
							s[i + 1] <= '7';
					     k++)
						v = v * 8 + (s[++i] - '0');
					c = v;
				}
			}
		}
		if (ag_buf_append(out, &c, 1))
			return -ENOMEM;
	}
	return 0;
}

static int text_encode(const uint8_t *s, size_t n, char delim, struct ag_buf *out)
{
	for (size_t i = 0; i < n; i++) {
		uint8_t c = s[i], e[2] = { '\\', 0 };
		int rc;

		switch (c) {
		case '\b':
			e[1] = 'b';
			break;
		case '\f':
			e[1] = 'f';
			break;
		case '\n':
			e[1] = 'n';
			break;
		case '\r':
			e[1] = 'r';
			break;
		case '\t':
			e[1] = 't';
			break;
		case '\v':
			e[1] = 'v';
			break;
		case '\\':
			e[1] = '\\';
			break;
		default:
			if (c == (uint8_t)delim)
				e[1] = c;
		}
		rc = e[1] ? ag_buf_append(out, e, 2) : ag_buf_append(out, &c, 1);
		if (rc)
			return rc;
	}
	return 0;
}

static int csv_encode(const uint8_t *s, size_t n, const struct pg_copy_plan *p, struct ag_buf *out)
{
	int rc = ag_buf_append(out, &p->quote, 1);

	for (size_t i = 0; !rc && i < n; i++) {
		if (s[i] == (uint8_t)p->quote || s[i] == (uint8_t)p->escape)
			rc = ag_buf_append(out, &p->escape, 1);
		if (!rc)
			rc = ag_buf_append(out, &s[i], 1);
	}
	return rc ? rc : ag_buf_append(out, &p->quote, 1);
}

/*
 * The end of the field starting at `at` (exclusive), for the row ending at `end`; *quoted set
 * for a csv field in quotes.
 */
static size_t field_end(const struct pg_copy_plan *p, const uint8_t *s, size_t at, size_t end,
			bool *quoted)
{
	size_t i = at;

	*quoted = false;
	if (p->format == PG_COPY_CSV && i < end && s[i] == (uint8_t)p->quote) {
		*quoted = true;
		for (i++; i < end; i++) {
			if (s[i] == (uint8_t)p->escape && p->escape != p->quote && i + 1 < end &&
			    (s[i + 1] == (uint8_t)p->quote || s[i + 1] == (uint8_t)p->escape)) {
				i++;
				continue;
			}
			if (s[i] == (uint8_t)p->quote) {
				if (p->escape == p->quote && i + 1 < end &&
				    s[i + 1] == (uint8_t)p->quote) {
					i++;
					continue;
				}
				i++;
				break;
			}
		}
		/* After the closing quote, up to the delimiter. */
		while (i < end && s[i] != (uint8_t)p->delim)
			i++;
		return i;
	}
	while (i < end && s[i] != (uint8_t)p->delim) {
		if (p->format == PG_COPY_TEXT && s[i] == '\\' && i + 1 < end)
			i++;
		i++;
	}
	return i;
}

static int csv_decode(const struct pg_copy_plan *p, const uint8_t *s, size_t n, struct ag_buf *out)
{
	size_t i = 1, last = n && s[n - 1] == (uint8_t)p->quote ? n - 1 : n;
	int rc = 0;

	/* Inside the quotes: escape + quote (or escape) is the second character. */
	for (; !rc && i < last; i++) {
		if (s[i] == (uint8_t)p->escape && i + 1 < last &&
		    (s[i + 1] == (uint8_t)p->quote || s[i + 1] == (uint8_t)p->escape))
			i++;
		rc = ag_buf_append(out, &s[i], 1);
	}
	return rc;
}

/* Masks the fields of one row s[0..end) (without its newline). */
static int copy_row(const struct pg_masking *mk, const struct pg_copy_plan *p, struct rewrite *rw,
		    size_t base, const uint8_t *s, size_t end, uint64_t *masked)
{
	struct ag_buf raw = { 0 }, tmp = { 0 };
	size_t at = 0;
	int err = 0;

	for (uint16_t f = 0; at <= end; f++) {
		bool quoted, is_null;
		size_t fe = field_end(p, s, at, end, &quoted), flen = fe - at;
		const uint8_t *v;
		size_t vlen;
		int rc;

		if (f < p->nfields && p->act[f] != PG_COL_PASS &&
		    !(!quoted && flen == p->null_len && !memcmp(s + at, p->null_str, flen))) {
			raw.start = raw.end = 0;
			if (p->format == PG_COPY_CSV && quoted)
				err = csv_decode(p, s + at, flen, &raw);
			else if (p->format == PG_COPY_CSV)
				err = ag_buf_append(&raw, s + at, flen);
			else
				err = text_decode(s + at, flen, &raw);
			if (err)
				goto out;
			v = ag_buf_len(&raw) ? ag_buf_head(&raw) : (const uint8_t *)"";
			vlen = ag_buf_len(&raw);
			rc = mask_value(mk, p->act[f], p->kind[f], v, vlen, &tmp, &is_null);
			if (rc < 0) {
				err = rc;
				goto out;
			}
			if (rc > 0) {
				*masked += rc;
				rw_upto(rw, base + at);
				if (is_null)
					rw_put(rw, p->null_str, p->null_len);
				else if (p->format == PG_COPY_CSV)
					err = csv_encode(ag_buf_head(&tmp), ag_buf_len(&tmp), p,
							 rw->out);
				else
					err = text_encode(ag_buf_head(&tmp), ag_buf_len(&tmp),
							  p->delim, rw->out);
				if (err)
					goto out;
				rw->copied = base + fe;
			}
		}
		if (fe >= end)
			break;
		at = fe + 1;
	}
out:
	ag_buf_free(&raw);
	ag_buf_free(&tmp);
	return err;
}

int pg_mask_copydata(const struct pg_masking *mk, struct pg_copy_plan *p, const uint8_t *msg,
		     size_t len, struct ag_buf *out, uint64_t *masked)
{
	struct rewrite rw = { .out = out, .msg = msg };
	const uint8_t *s = msg + PG_HDR;
	size_t n = len - PG_HDR, at = 0;
	int err = 0;

	if (!p->any || p->format == PG_COPY_BINARY)
		return 0;
	/* The server sends a row per message; rows are split on newlines outside quotes anyway. */
	while (at < n) {
		size_t end = at;
		bool inq = false;

		while (end < n && (inq || s[end] != '\n')) {
			if (p->format == PG_COPY_CSV && s[end] == (uint8_t)p->quote)
				inq = !inq;
			else if (p->format == PG_COPY_TEXT && s[end] == '\\' && end + 1 < n)
				end++;
			end++;
		}
		if (p->header_pending) {
			p->header_pending = false;
		} else {
			size_t rowend = end > at && s[end - 1] == '\r' ? end - 1 : end;

			err = copy_row(mk, p, &rw, PG_HDR + at, s + at, rowend - at, masked);
			if (err)
				break;
		}
		at = end + 1;
	}
	if (!err)
		err = rw_finish(&rw, len);
	if (err < 0 && rw.changed)
		out->end = out->start + rw.start;
	return err;
}
