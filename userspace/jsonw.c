// SPDX-License-Identifier: GPL-2.0
/* The streaming JSON writer: a thin, infallible-looking facade over yajl_gen. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <yajl/yajl_gen.h>

#include "jsonw.h"

struct jsonw {
	yajl_gen g;
	FILE *f;
	char last; /* last character written */
};

static void jsonw_print(void *ctx, const char *str, size_t len)
{
	struct jsonw *w = ctx;

	fwrite(str, 1, len, w->f);
	if (len)
		w->last = str[len - 1];
}

struct jsonw *jsonw_new(FILE *f, bool pretty)
{
	struct jsonw *w = calloc(1, sizeof(*w));

	if (!w)
		return NULL;
	w->f = f;
	w->g = yajl_gen_alloc(NULL);
	if (!w->g) {
		free(w);
		return NULL;
	}
	yajl_gen_config(w->g, yajl_gen_print_callback, jsonw_print, w);
	yajl_gen_config(w->g, yajl_gen_validate_utf8, 0);
	if (pretty) {
		yajl_gen_config(w->g, yajl_gen_beautify, 1);
		yajl_gen_config(w->g, yajl_gen_indent_string, "    ");
	}
	return w;
}

void jsonw_destroy(struct jsonw **wp)
{
	struct jsonw *w = wp ? *wp : NULL;

	if (!w)
		return;
	yajl_gen_free(w->g);
	/* yajl's pretty mode ends a top-level value with a newline of its own. */
	if (w->last != '\n')
		fputc('\n', w->f);
	fflush(w->f);
	free(w);
	*wp = NULL;
}

void jsonw_start_object(struct jsonw *w)
{
	yajl_gen_map_open(w->g);
}

void jsonw_end_object(struct jsonw *w)
{
	yajl_gen_map_close(w->g);
}

void jsonw_start_array(struct jsonw *w)
{
	yajl_gen_array_open(w->g);
}

void jsonw_end_array(struct jsonw *w)
{
	yajl_gen_array_close(w->g);
}

void jsonw_name(struct jsonw *w, const char *name)
{
	yajl_gen_string(w->g, (const unsigned char *)name, strlen(name));
}

void jsonw_string(struct jsonw *w, const char *s)
{
	if (!s)
		s = "";
	yajl_gen_string(w->g, (const unsigned char *)s, strlen(s));
}

void jsonw_uint(struct jsonw *w, uint64_t v)
{
	char buf[32];
	int n = snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);

	yajl_gen_number(w->g, buf, n);
}

void jsonw_int(struct jsonw *w, int64_t v)
{
	yajl_gen_integer(w->g, v);
}

void jsonw_bool(struct jsonw *w, bool v)
{
	yajl_gen_bool(w->g, v);
}

void jsonw_null(struct jsonw *w)
{
	yajl_gen_null(w->g);
}

void jsonw_raw(struct jsonw *w, const char *json)
{
	/* yajl_gen_number writes its argument verbatim: the one way to splice a document in. */
	yajl_gen_number(w->g, json, strlen(json));
}

void jsonw_string_field(struct jsonw *w, const char *name, const char *s)
{
	jsonw_name(w, name);
	jsonw_string(w, s);
}

void jsonw_uint_field(struct jsonw *w, const char *name, uint64_t v)
{
	jsonw_name(w, name);
	jsonw_uint(w, v);
}

void jsonw_int_field(struct jsonw *w, const char *name, int64_t v)
{
	jsonw_name(w, name);
	jsonw_int(w, v);
}

void jsonw_bool_field(struct jsonw *w, const char *name, bool v)
{
	jsonw_name(w, name);
	jsonw_bool(w, v);
}

void jsonw_null_field(struct jsonw *w, const char *name)
{
	jsonw_name(w, name);
	jsonw_null(w);
}

char *ag_format_time(int64_t unix_ns, char *buf, size_t len)
{
	time_t secs = unix_ns / 1000000000LL;
	struct tm tm;
	size_t n;

	gmtime_r(&secs, &tm);
	n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf + n, len - n, ".%03dZ", (int)((unix_ns / 1000000) % 1000));
	return buf;
}

void jsonw_time_field(struct jsonw *w, const char *name, int64_t unix_ns)
{
	char buf[64];

	if (!unix_ns) {
		jsonw_null_field(w, name);
		return;
	}
	jsonw_string_field(w, name, ag_format_time(unix_ns, buf, sizeof(buf)));
}
