/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A streaming JSON writer (bpftool's json_writer shape) on top of yajl's generator: one value is
 * built with start/end calls and flushed to a FILE as it goes. Used by agctl's -j/-p output and
 * by the daemon to render its policy and session log.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct jsonw;

struct jsonw *jsonw_new(FILE *f, bool pretty);
/* Flushes, adds a newline after a complete top-level value, and frees. NULL is a no-op. */
void jsonw_destroy(struct jsonw **w);

void jsonw_start_object(struct jsonw *w);
void jsonw_end_object(struct jsonw *w);
void jsonw_start_array(struct jsonw *w);
void jsonw_end_array(struct jsonw *w);
void jsonw_name(struct jsonw *w, const char *name);
void jsonw_string(struct jsonw *w, const char *s);
void jsonw_uint(struct jsonw *w, uint64_t v);
void jsonw_int(struct jsonw *w, int64_t v);
void jsonw_bool(struct jsonw *w, bool v);
void jsonw_null(struct jsonw *w);
/* Emits already-serialized JSON (e.g. a document received from the daemon) as one value. */
void jsonw_raw(struct jsonw *w, const char *json);

void jsonw_string_field(struct jsonw *w, const char *name, const char *s);
void jsonw_uint_field(struct jsonw *w, const char *name, uint64_t v);
void jsonw_int_field(struct jsonw *w, const char *name, int64_t v);
void jsonw_bool_field(struct jsonw *w, const char *name, bool v);
void jsonw_null_field(struct jsonw *w, const char *name);
/* An RFC 3339 UTC time ("2026-11-22T03:16:57.123Z") from unix nanoseconds; 0 → null. */
void jsonw_time_field(struct jsonw *w, const char *name, int64_t unix_ns);

/* Formats unix nanoseconds as RFC 3339 UTC with milliseconds into buf; returns buf. */
char *ag_format_time(int64_t unix_ns, char *buf, size_t len);
