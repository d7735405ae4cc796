/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Masking of JSON bodies as they stream by: yajl's incremental parser feeds a yajl generator,
 * value by value, and never holds a tree of the document. Values are masked whole when their key
 * path matches a key pattern or when they sit in a Kubernetes Secret's data/stringData, and
 * otherwise scanned by the masker's value detectors. Several top-level values in a row (a watch
 * stream) are fine; each comes out followed by a newline.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

struct ag_masker;
struct ag_jmask;

struct ag_jmask_opts {
	const struct ag_masker *m; /* active, or nothing is masked but secrets */
	char *const *keys;	   /* key patterns: "email", "spec.*.token" (fnmatch per part) */
	size_t nkeys;
	bool secrets;	     /* mask the data and stringData of kind: Secret objects */
	bool secret_objects; /* the response is for resource secrets: its objects are Secrets */
};

/* NULL with errno ENOMEM. The options' arrays must outlive the masker. */
struct ag_jmask *ag_jmask_new(const struct ag_jmask_opts *o);
void ag_jmask_free(struct ag_jmask *j);
/*
 * Parses len more bytes and appends what is ready of the masked document to out. Returns the
 * number of values masked by this call, or -EPROTO (not JSON: what was appended before stays
 * valid, the rest must not go out), -ENOMEM, -EIO (the masker failed: fail closed).
 */
int ag_jmask_feed(struct ag_jmask *j, const uint8_t *data, size_t len, struct ag_buf *out);
/* The body ended: the document must be complete. Same returns as ag_jmask_feed(). */
int ag_jmask_finish(struct ag_jmask *j, struct ag_buf *out);
/* The parser's complaint after -EPROTO ("" when none). */
const char *ag_jmask_error(const struct ag_jmask *j);
