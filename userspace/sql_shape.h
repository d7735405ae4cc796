/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The second-level SQL classification cache, keyed by a statement's shape: the tokens of the
 * PostgreSQL lexer (pg_query_scan), each by its kind and, unless it is a constant, its text.
 * `... WHERE aid = 1` and `... WHERE aid = 2` share a shape; only a classification that never
 * read a constant's value (ag_sql_result.literal_read) is kept by shape. See sql_shape.c.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "sql.h"

/* Statements longer than this are never classified by shape. */
#define AG_SQL_SHAPE_MAX_TEXT 4096

/*
 * ag_sql_classify_uncached(sql), answered from the calling thread's shape cache when a
 * statement of the same shape was classified before; len is strlen(sql), hash
 * ag_sql_hash_text(sql, len) (the caller's text cache has it already).
 */
int ag_sql_shape_classify(const char *sql, size_t len, uint64_t hash, struct ag_sql_result *out);
/* Hits and misses of the calling thread's shape cache (statements it could key only). */
void ag_sql_shape_stats(uint64_t *hits, uint64_t *misses);
/* Frees the calling thread's shape cache. */
void ag_sql_shape_flush(void);
/*
 * The shape key of sql (malloc'd bytes, not a string: free it), for other caches whose answer
 * does not depend on constants (sqlorigin.c). 0, or -EINVAL when sql has no shape key.
 */
int ag_sql_shape_key(const char *sql, size_t len, char **key, size_t *klen);
/*
 * The same key, not copied: *key points into the thread's cache, valid up to its next call
 * into this module. 0, or -EINVAL when sql has no shape key (or -ENOMEM: no cache to keep it).
 */
int ag_sql_shape_key_peek(const char *sql, size_t len, const char **key, size_t *klen);
/* The hash of n bytes both caches use (sql.c). */
uint64_t ag_sql_hash_text(const char *s, size_t n);
