/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Masking on the PostgreSQL wire: which result columns a mask covers (their origin, the table
 * OID and attribute number of RowDescription, resolved against the catalog with one query per
 * session start and cached per target and database), the rewriting of DataRow messages (text
 * and binary formats) and of COPY TO STDOUT rows (text and csv), and the value detectors run
 * over error and notice texts. The values themselves are masked by mask.h; this module knows
 * where they are on the wire and keeps every message valid: same column count, types that
 * still parse (a typed value the mask cannot rewrite becomes NULL), lengths rewritten.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "mask.h"

/* --- the catalog: which (table OID, attnum) a mask's column rules cover ------------------- */

struct pg_catalog;

/*
 * The query resolving the masker's column patterns (a superset: LIKE filters, the masker's own
 * matching decides), or NULL when it has no column rules. Caller frees.
 */
char *pg_catalog_sql(const struct ag_masker *m);
struct pg_catalog *pg_catalog_new(void);
/* One DataRow of that query's answer (the message body). 0, or -EPROTO / -ENOMEM. */
int pg_catalog_add_row(struct pg_catalog *c, const struct ag_masker *m, const uint8_t *body,
		       size_t len);
/* Done adding: sorts for lookups. */
void pg_catalog_finish(struct pg_catalog *c);
void pg_catalog_unref(struct pg_catalog *c);
struct pg_catalog *pg_catalog_ref(struct pg_catalog *c);
/* Is (rel, attnum) covered? type gets the column's type when it is. */
bool pg_catalog_covered(const struct pg_catalog *c, uint32_t rel, int attnum, uint32_t *type);
/* Does any covered column belong to a relation named `table` (schema NULL: any schema)? */
bool pg_catalog_has_table(const struct pg_catalog *c, const char *schema, const char *table);
/* Is a column of that name in such a relation covered (a view's, say)? */
bool pg_catalog_has_column(const struct pg_catalog *c, const char *schema, const char *table,
			   const char *column);

/*
 * A process-wide cache of resolved catalogs, by target, database and key, for ttl_ms. get
 * returns a reference or NULL; put stores one. The key is ag_masker_columns_key(): the exact
 * column rules, which the query is made from, but not the query itself: it is a superset (a
 * character class is '%' to LIKE) and the rows kept are those the masker's own matching covers.
 */
struct pg_catalog *pg_catalog_cache_get(const char *target, const char *database, const char *key);
void pg_catalog_cache_put(const char *target, const char *database, const char *key,
			  struct pg_catalog *c, uint64_t ttl_ms);

/* --- result shapes: a RowDescription and what to do with each column ---------------------- */

enum pg_col_act {
	PG_COL_PASS = 0, /* never touched */
	PG_COL_WHOLE,	 /* a column rule covers it: mask all of the value */
	PG_COL_NULL,	 /* covered, but no rewrite keeps it valid: NULL */
	PG_COL_DETECT,	 /* run the detectors over it */
};

struct pg_col {
	uint32_t table;
	int16_t attnum;
	int16_t format; /* 0 text, 1 binary */
	uint32_t type;
	uint8_t act;	/* enum pg_col_act */
	uint8_t kind;	/* enum ag_mask_kind */
	bool jsonb_bin; /* binary jsonb: a version byte, then text */
	bool derived;	/* computed from a covered column (sqlorigin.h), not one itself */
};

struct sql_origin;

/*
 * A statement's text, shared by the statement and the shapes of its results (refcounted, one
 * thread), with the origin of its outputs as last analysed: analysed again only when the
 * catalog or the masker is another (a prepared statement's every Describe: no copy of the
 * text, no shape key, no lookup in sqlorigin.c's cache).
 */
struct pg_sql {
	int refs;
	bool analysed;		   /* orig holds for cat and m */
	struct pg_catalog *cat;	   /* a reference, so that its address is no other's */
	uint64_t m_id;		   /* ag_masker_id() of the masker orig holds for */
	struct sql_origin *orig;
	char text[];
};

struct pg_sql *pg_sql_new(const char *text, size_t len);
struct pg_sql *pg_sql_ref(struct pg_sql *q);
void pg_sql_unref(struct pg_sql *q);

/* Shared by a portal and the Executes queued on it (refcounted, one thread). */
struct pg_shape {
	int refs;
	bool known; /* RowDescription or NoData arrived */
	bool any;   /* some column may be rewritten */
	uint16_t ncols, ccap; /* ccap: room in cols */
	struct pg_col *cols;
	struct pg_sql *sql;	 /* its statement, analysed when the RowDescription comes */
	struct sql_origin *orig; /* outputs derived from masked columns (sqlorigin.h), or NULL */
};

struct pg_masking {
	const struct ag_masker *m;
	const struct pg_catalog *cat; /* may be NULL: no column rules */
	bool detectors;		      /* the mask has value detectors */
};

struct pg_shape *pg_shape_new(void);
struct pg_shape *pg_shape_ref(struct pg_shape *sh);
void pg_shape_unref(struct pg_shape *sh);
/* Fills a shape from a RowDescription body and plans each column. 0, -EPROTO or -ENOMEM. */
int pg_shape_from_rowdesc(struct pg_shape *sh, const struct pg_masking *mk, const uint8_t *body,
			  size_t len);
void pg_shape_set_nodata(struct pg_shape *sh);

/*
 * Rewrites one DataRow message (msg: type byte, length, body). Returns 1 with the whole new
 * message in out (appended), 0 when nothing changed, -EPROTO when the row does not fit the
 * shape, -ENOMEM. *masked counts the values masked.
 */
int pg_mask_datarow(const struct pg_masking *mk, const struct pg_shape *sh, const uint8_t *msg,
		    size_t len, struct ag_buf *out, uint64_t *masked);

/*
 * Runs the detectors over the text fields (message, detail, hint, context, where) of an
 * ErrorResponse/NoticeResponse, and over a NotificationResponse's payload. Same returns.
 */
int pg_mask_notice(const struct pg_masking *mk, const uint8_t *msg, size_t len, struct ag_buf *out,
		   uint64_t *masked);
/*
 * With column rules active, errors of SQLSTATE class 22 (data exception) and 23 (integrity
 * constraint) quote the offending value ("invalid input syntax for type integer: "<value>"",
 * "Key (email)=(<value>)"), which no column rule sees: the quoted values of their message,
 * detail and context are replaced. Same returns as pg_mask_datarow().
 */
int pg_mask_error_values(const uint8_t *msg, size_t len, struct ag_buf *out, uint64_t *masked);

/* --- COPY TO STDOUT -------------------------------------------------------------------------- */

enum pg_copy_format { PG_COPY_TEXT = 0, PG_COPY_CSV, PG_COPY_BINARY };

/* What a COPY statement says (from the parse tree). */
struct pg_copy_spec {
	char *schema; /* NULL: unqualified */
	char *table;  /* NULL: COPY (query) */
	char **cols;  /* the column list; NULL: all columns */
	size_t ncols;
	bool to_stdout; /* COPY ... TO STDOUT (the only direction masked) */
	enum pg_copy_format format;
	char delim;
	char quote, escape;
	char *null_str;
	bool header;
};

/* Parses one COPY statement (sql, NUL-terminated); -EINVAL when it is not one. */
int pg_copy_spec_parse(const char *sql, struct pg_copy_spec **out);
void pg_copy_spec_free(struct pg_copy_spec *cs);

/* A COPY TO STDOUT in progress: the spec resolved against the catalog. */
struct pg_copy_plan {
	const struct pg_copy_spec *spec; /* NULL: nothing known, detectors only (text format) */
	enum pg_copy_format format;
	char delim, quote, escape;
	const char *null_str;
	size_t null_len;
	bool header_pending;
	uint16_t nfields;
	uint8_t *act;  /* per field, enum pg_col_act */
	uint8_t *kind; /* per field, enum ag_mask_kind */
	bool any;
};

/*
 * Resolves a plan for a CopyOutResponse with nfields columns. spec may be NULL (a COPY the
 * gateway did not see parsed): the text format with default options is assumed. 0 or -ENOMEM.
 */
int pg_copy_plan_init(struct pg_copy_plan *p, const struct pg_masking *mk,
		      const struct pg_copy_spec *spec, uint16_t nfields);
void pg_copy_plan_fini(struct pg_copy_plan *p);
/* Rewrites one CopyData message (msg whole). Same returns as pg_mask_datarow(). */
int pg_mask_copydata(const struct pg_masking *mk, struct pg_copy_plan *p, const uint8_t *msg,
		     size_t len, struct ag_buf *out, uint64_t *masked);
