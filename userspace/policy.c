// SPDX-License-Identifier: GPL-2.0
/*
 * The policy loader: libyaml composes the file into a document tree, and this file walks it
 * against the schema of SPEC.md ("Policy files"), copying what it accepts into a struct
 * ag_policy that owns all its memory. Validation is strict because a typo in a security policy
 * must not silently turn a deny into nothing: unknown keys, wrong types, bad enum values,
 * duplicate names and dangling references are errors, each reported once as
 * "FILE:LINE:COL: problem (hint)" at the node that caused it. Host names are resolved here, at
 * load time, so the data path only compares addresses.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "cgroup.h"
#include "jsonw.h"
#include "audit.h"
#include "policy.h"
#include "sql.h"

/*
 * The document API shares aliased nodes instead of copying them, so a few nested aliases can
 * make a small file expand exponentially when walked; every node visit spends from this budget.
 */
#define NODE_BUDGET (1u << 20)
/*
 * libyaml's scanner walks its stack of flow levels on every token, so deeply nested flow
 * collections ("[[[[...") cost quadratic time; no valid policy nests deeper than about 8.
 */
#define MAX_DEPTH 32
/* Keys of a free-form mapping (a rule's headers:), checked for duplicates pairwise. */
#define MAX_FREE_KEYS 256
#define NAME_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"

struct parse_ctx {
	yaml_document_t *doc;
	const char *file;
	char *err;
	size_t errlen;
	bool failed;
	bool oom; /* callers pass -EINVAL up; this keeps ENOMEM for errno */
	size_t budget;
	struct ag_policy *p;
};

/* ---- errors ---- */

static void sanitize(char *s)
{
	/* Values quoted into a message may hold newlines; an error stays one line. */
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = '?';
}

static int __attribute__((format(printf, 4, 0)))
vperr(struct parse_ctx *c, size_t line, size_t col, const char *fmt, va_list ap)
{
	int off;

	if (c->failed)
		return -EINVAL;
	c->failed = true;
	if (!c->err || !c->errlen)
		return -EINVAL;
	off = snprintf(c->err, c->errlen, "%s:%zu:%zu: ", c->file, line, col);
	if (off >= 0 && (size_t)off < c->errlen)
		vsnprintf(c->err + off, c->errlen - off, fmt, ap);
	sanitize(c->err);
	return -EINVAL;
}

static int __attribute__((format(printf, 4, 5)))
perr_at(struct parse_ctx *c, size_t line, size_t col, const char *fmt, ...)
{
	va_list ap;
	int ret;

	va_start(ap, fmt);
	ret = vperr(c, line, col, fmt, ap);
	va_end(ap);
	return ret;
}

/* An error at node n (1-based line and column of where it starts); n NULL means 1:1. */
static int __attribute__((format(printf, 3, 4)))
perr(struct parse_ctx *c, const yaml_node_t *n, const char *fmt, ...)
{
	va_list ap;
	int ret;

	va_start(ap, fmt);
	ret = vperr(c, n ? n->start_mark.line + 1 : 1, n ? n->start_mark.column + 1 : 1, fmt, ap);
	va_end(ap);
	return ret;
}

static int oom(struct parse_ctx *c)
{
	if (!c->failed && c->err && c->errlen)
		snprintf(c->err, c->errlen, "%s: out of memory", c->file);
	c->failed = true;
	c->oom = true;
	return -ENOMEM;
}

static void __attribute__((format(printf, 3, 4)))
set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	sanitize(err);
}

/* "a, b or c" */
static const char *join_choices(const char *const *v, char *buf, size_t len)
{
	size_t o = 0;

	buf[0] = '\0';
	for (size_t i = 0; v[i] && o < len; i++) {
		const char *sep = !i ? "" : v[i + 1] ? ", " : " or ";

		o += snprintf(buf + o, len - o, "%s%s", sep, v[i]);
	}
	return buf;
}

static int find_choice(const char *const *v, const char *s)
{
	for (int i = 0; v[i]; i++)
		if (!strcmp(v[i], s))
			return i;
	return -1;
}

/* ---- document access ---- */

static yaml_node_t *node(struct parse_ctx *c, int id)
{
	return yaml_document_get_node(c->doc, id);
}

static size_t line_of(const yaml_node_t *n)
{
	return n->start_mark.line + 1;
}

static const char *sval(const yaml_node_t *n)
{
	return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static bool is_null(const yaml_node_t *n)
{
	const char *s = sval(n);

	if (!s || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return false;
	return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") ||
	       !strcmp(s, "NULL");
}

static const char *kind_name(const yaml_node_t *n)
{
	if (!n || is_null(n))
		return "nothing";
	switch (n->type) {
	case YAML_SCALAR_NODE:
		return "a string";
	case YAML_SEQUENCE_NODE:
		return "a list";
	case YAML_MAPPING_NODE:
		return "a mapping";
	default:
		return "nothing";
	}
}

static size_t npairs(const yaml_node_t *n)
{
	return n->data.mapping.pairs.top - n->data.mapping.pairs.start;
}

static size_t nitems(const yaml_node_t *n)
{
	return n->data.sequence.items.top - n->data.sequence.items.start;
}

static int spend(struct parse_ctx *c, const yaml_node_t *n, size_t k)
{
	if (k > c->budget)
		return perr(c, n,
			    "the policy expands to too many nodes (aliases nested too deep?)");
	c->budget -= k;
	return 0;
}

/*
 * A mapping whose keys are distinct strings, all of them in keys (NULL: any key). Unknown keys
 * are looked for first, so the pairwise duplicate check only ever runs over known keys or over
 * a free mapping of at most MAX_FREE_KEYS.
 */
static int check_map(struct parse_ctx *c, const yaml_node_t *n, const char *what,
		     const char *const *keys)
{
	char hint[256];

	if (!n || n->type != YAML_MAPPING_NODE)
		return perr(c, n, "%s must be a mapping (got %s)", what, kind_name(n));
	if (spend(c, n, npairs(n)))
		return -EINVAL;
	if (!keys && npairs(n) > MAX_FREE_KEYS)
		return perr(c, n, "%s has more than %d keys", what, MAX_FREE_KEYS);
	for (yaml_node_pair_t *pr = n->data.mapping.pairs.start; pr < n->data.mapping.pairs.top;
	     pr++) {
		const yaml_node_t *k = node(c, pr->key);
		const char *ks = sval(k);

		if (!ks || strlen(ks) != k->data.scalar.length)
			return perr(c, k, "keys in %s must be strings (got %s)", what,
				    kind_name(k));
		if (keys && find_choice(keys, ks) < 0)
			return perr(c, k, "unknown key \"%s\" in %s (expected %s)", ks, what,
				    join_choices(keys, hint, sizeof(hint)));
		for (yaml_node_pair_t *q = n->data.mapping.pairs.start; q < pr; q++) {
			const yaml_node_t *qk = node(c, q->key);

			if (!strcmp(sval(qk), ks))
				return perr(c, k, "duplicate key \"%s\" in %s (first at line %zu)",
					    ks, what, line_of(qk));
		}
	}
	return 0;
}

static yaml_node_pair_t *map_pair(struct parse_ctx *c, const yaml_node_t *n, const char *key)
{
	for (yaml_node_pair_t *pr = n->data.mapping.pairs.start; pr < n->data.mapping.pairs.top;
	     pr++)
		if (!strcmp(sval(node(c, pr->key)), key))
			return pr;
	return NULL;
}

static yaml_node_t *map_get(struct parse_ctx *c, const yaml_node_t *n, const char *key)
{
	yaml_node_pair_t *pr = map_pair(c, n, key);

	return pr ? node(c, pr->value) : NULL;
}

/* A scalar's text (possibly empty); lists, mappings and embedded NULs are errors. */
static int get_str(struct parse_ctx *c, const yaml_node_t *n, const char *what, const char **out)
{
	*out = "";
	if (!n || n->type != YAML_SCALAR_NODE)
		return perr(c, n, "%s must be a string (got %s)", what, kind_name(n));
	if (strlen(sval(n)) != n->data.scalar.length)
		return perr(c, n, "%s contains a NUL character", what);
	*out = sval(n);
	return 0;
}

/* A scalar that is not null or empty. */
static int require_str(struct parse_ctx *c, const yaml_node_t *n, const char *what,
		       const char **out)
{
	if (get_str(c, n, what, out))
		return -EINVAL;
	if (is_null(n) || !**out)
		return perr(c, n, "%s needs a value", what);
	return 0;
}

static int get_bool(struct parse_ctx *c, const yaml_node_t *n, const char *what, bool *out)
{
	static const char *const yes[] = { "true", "True", "TRUE", NULL };
	static const char *const no[] = { "false", "False", "FALSE", NULL };
	const char *s;

	if (get_str(c, n, what, &s))
		return -EINVAL;
	if (find_choice(yes, s) >= 0)
		*out = true;
	else if (find_choice(no, s) >= 0)
		*out = false;
	else
		return perr(c, n, "%s must be true or false (got \"%s\")", what, s);
	return 0;
}

/* One of names; *idx is its position. */
static int pick(struct parse_ctx *c, const yaml_node_t *n, const char *what,
		const char *const *names, int *idx)
{
	char hint[256];
	const char *s;

	if (get_str(c, n, what, &s))
		return -EINVAL;
	*idx = find_choice(names, s);
	if (*idx >= 0)
		return 0;
	if (is_null(n))
		return perr(c, n, "%s needs a value (expected %s)", what,
			    join_choices(names, hint, sizeof(hint)));
	return perr(c, n, "unknown %s \"%s\" (expected %s)", what, s,
		    join_choices(names, hint, sizeof(hint)));
}

static int check_name(struct parse_ctx *c, const yaml_node_t *n, const char *what, const char *s)
{
	size_t len = strlen(s);

	if (len >= AG_NAME_MAX)
		return perr(c, n, "%s name \"%s\" is longer than %d characters", what, s,
			    AG_NAME_MAX - 1);
	if (strspn(s, NAME_CHARS) != len)
		return perr(c, n, "bad %s name \"%s\" (use letters, digits, '_', '.' and '-')",
			    what, s);
	return 0;
}

/* ---- enums and the kv schema ---- */

static const char *const proto_names[] = { "postgres", "http", "tcp", NULL };
static const enum ag_proto proto_vals[] = { AG_PROTO_POSTGRES, AG_PROTO_HTTP, AG_PROTO_TCP };
static const char *const mode_names[] = { "enforce", "observe", NULL };
static const enum ag_agent_mode mode_vals[] = { AG_MODE_ENFORCE, AG_MODE_OBSERVE };
static const char *const default_names[] = { "deny", "passthrough", NULL };
static const enum ag_default_action default_vals[] = { AG_DEFAULT_DENY, AG_DEFAULT_PASSTHROUGH };
static const char *const action_names[] = { "allow", "deny", "approve", "observe", NULL };
static const enum ag_action action_vals[] = { AG_ACT_ALLOW, AG_ACT_DENY, AG_ACT_APPROVE,
					      AG_ACT_OBSERVE };

static const char *const provider_names[] = { "pg-jit-role", "jwt", "static", NULL };
static const char *const tls_client_names[] = { "terminate", "passthrough", "off", NULL };
static const char *const tls_upstream_names[] = { "verify-full", "verify-ca", "require",
						  "disable", "off", NULL };
static const char *const where_names[] = { "absent", "present", NULL };
/* clang-format off */
static const char *const detector_names[] = {
	"email", "credit-card", "ssn", "phone", "jwt", "aws-key", "private-key", NULL
};
/* clang-format on */
static const char *const style_names[] = { "redact", "partial", "hash", "null", NULL };
enum fkind { F_STR, F_LIST, F_BOOL, F_DURATION, F_MAP, F_FREEMAP, F_ANY };

struct field {
	const char *key;
	enum fkind kind;
	const char *const *choices; /* allowed values of F_STR / F_LIST; NULL: any */
	const struct field *sub;    /* keys of an F_MAP */
	bool lower;		    /* compared and stored lower-case */
};

static const struct field tls_fields[] = {
	{ "client", F_STR, tls_client_names },
	{ "upstream", F_STR, tls_upstream_names },
	{ "ca_file", F_STR },
	{ "cert_file", F_STR },
	{ "key_file", F_STR },
	{ NULL },
};

static const struct field credential_fields[] = {
	{ "provider", F_STR, provider_names },
	{ "admin_secret", F_STR },
	{ "secret_file", F_STR },
	{ "key_file", F_STR },
	{ "grant", F_LIST },
	{ "ttl", F_DURATION },
	{ "audience", F_STR },
	{ "issuer", F_STR },
	{ "subject", F_STR },
	{ "user", F_STR },
	{ NULL },
};

/*
 * A sql rule's command: names the statement classes of sql.h (ag_sql_command_names: select,
 * insert, ..., ddl, write): one table for both, so they cannot drift apart. Written in any case,
 * stored lower-case.
 */
static const struct field sql_when_fields[] = {
	{ "command", F_LIST, ag_sql_command_names, .lower = true },
	{ "tables", F_LIST },
	{ "where", F_STR, where_names },
	{ NULL },
};

static const struct field k8s_when_fields[] = {
	{ "verb", F_LIST },	 { "resource", F_LIST }, { "subresource", F_LIST },
	{ "namespace", F_LIST }, { "name", F_LIST },	 { "group", F_LIST },
	{ "version", F_LIST },	 { "impersonate", F_BOOL }, { NULL },
};

static const struct field http_when_fields[] = {
	{ "method", F_LIST },
	{ "host", F_LIST },
	{ "path", F_LIST },
	{ "headers", F_FREEMAP },
	{ "kubernetes", F_MAP, .sub = k8s_when_fields },
	{ "upgrade", F_BOOL },
	{ NULL },
};

static const char *const secrets_names[] = { "masked", "unmasked", NULL };

static const struct field mask_fields[] = {
	{ "columns", F_LIST },
	{ "detectors", F_LIST, detector_names },
	{ "style", F_STR, style_names },
	{ "keys", F_LIST },			/* http: JSON key names or paths */
	{ "secrets", F_STR, secrets_names }, /* http, kubernetes: masked (default) | unmasked */
	{ NULL },
};

static const struct field approvals_fields[] = {
	{ "approvers", F_LIST },
	{ "timeout", F_DURATION },
	{ "notify", F_STR },
	{ NULL },
};

static const char *const fsync_names[] = { "always", "batch", "never", NULL };

static const struct field audit_fields[] = {
	{ "fsync", F_STR, fsync_names },
	{ "checkpoint_records", F_STR },
	{ "checkpoint_interval", F_DURATION },
	{ "segment_size", F_STR },
	{ "body_bytes", F_STR },
	{ NULL },
};

static const struct field any_field = { "", F_ANY };

/* approvals.approvers: user NAME, group:NAME or uid:N (approval.c matches them). */
static int check_approvers(struct parse_ctx *c, const yaml_node_t *n, const struct ag_policy *p)
{
	const struct ag_kv *kv = ag_kv_get(p->approvals, p->napprovals, "approvers");

	for (size_t i = 0; kv && i < kv->nlist; i++) {
		const char *e = kv->list[i];
		bool ok = *e;

		if (!strncmp(e, "uid:", 4))
			ok = e[4] && strspn(e + 4, "0123456789") == strlen(e + 4);
		else if (!strncmp(e, "group:", 6))
			ok = e[6];
		if (!ok)
			return perr(c, n,
				    "approvals.approvers: \"%s\" is not a user (NAME, group:NAME or "
				    "uid:N)",
				    e);
	}
	return 0;
}

int ag_parse_duration(const char *s, uint64_t *ms)
{
	uint64_t total = 0;

	if (!s || !*s)
		return -EINVAL;
	while (*s) {
		uint64_t v = 0, mul;

		if (!isdigit((unsigned char)*s))
			return -EINVAL;
		for (; isdigit((unsigned char)*s); s++) {
			v = v * 10 + (*s - '0');
			if (v > 1000000000000ULL)
				return -ERANGE;
		}
		if (s[0] == 'm' && s[1] == 's') {
			mul = 1;
			s += 2;
		} else if (*s == 's' || *s == 'm' || *s == 'h' || *s == 'd') {
			mul = *s == 's' ? 1000 : *s == 'm' ? 60000 : *s == 'h' ? 3600000 : 86400000;
			s++;
		} else {
			return -EINVAL;
		}
		if (__builtin_add_overflow(total, v * mul, &total))
			return -ERANGE;
	}
	if (!total)
		return -EINVAL;
	*ms = total;
	return 0;
}

static void kv_free(struct ag_kv *kv, size_t n)
{
	if (!kv)
		return;
	for (size_t i = 0; i < n; i++) {
		free(kv[i].key);
		free(kv[i].value);
		for (size_t j = 0; j < kv[i].nlist; j++)
			free(kv[i].list[j]);
		free(kv[i].list);
		kv_free(kv[i].map, kv[i].nmap);
	}
	free(kv);
}

static int build_kv(struct parse_ctx *c, const yaml_node_t *n, const char *path,
		    const struct field *fields, struct ag_kv **out, size_t *nout);

/* One scalar of a kv: not empty, one of choices when given; a copy into *out. */
static int kv_scalar(struct parse_ctx *c, const yaml_node_t *v, const char *path,
		     const struct field *f, bool allow_empty, char **out)
{
	char hint[512];
	const char *s;
	char *d;

	if (get_str(c, v, path, &s))
		return -EINVAL;
	d = strdup(s);
	if (!d)
		return oom(c);
	if (f->lower)
		for (char *q = d; *q; q++)
			*q = tolower((unsigned char)*q);
	if (f->choices && find_choice(f->choices, d) < 0) {
		free(d);
		if (is_null(v))
			return perr(c, v, "%s needs a value (expected %s)", path,
				    join_choices(f->choices, hint, sizeof(hint)));
		return perr(c, v, "unknown value \"%s\" for %s (expected %s)", s, path,
			    join_choices(f->choices, hint, sizeof(hint)));
	}
	if (!f->choices && !allow_empty && (is_null(v) || !*s)) {
		free(d);
		return perr(c, v, "%s needs a value", path);
	}
	*out = d;
	return 0;
}

static int kv_list(struct parse_ctx *c, const yaml_node_t *v, const char *path,
		   const struct field *f, struct ag_kv *e)
{
	size_t cnt;
	int err;

	e->kind = AG_KV_LIST;
	if (v->type == YAML_SCALAR_NODE) {
		e->list = calloc(1, sizeof(*e->list));
		if (!e->list)
			return oom(c);
		err = kv_scalar(c, v, path, f, false, &e->list[0]);
		if (!err)
			e->nlist = 1;
		return err;
	}
	if (v->type != YAML_SEQUENCE_NODE)
		return perr(c, v, "%s must be a list or a string (got %s)", path, kind_name(v));
	cnt = nitems(v);
	if (spend(c, v, cnt))
		return -EINVAL;
	e->list = calloc(cnt ? cnt : 1, sizeof(*e->list));
	if (!e->list)
		return oom(c);
	for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top;
	     it++) {
		err = kv_scalar(c, node(c, *it), path, f, false, &e->list[e->nlist]);
		if (err)
			return err;
		e->nlist++;
	}
	return 0;
}

static int kv_value(struct parse_ctx *c, const yaml_node_t *v, const struct field *f,
		    const char *path, struct ag_kv *e)
{
	uint64_t ms;
	bool b;

	switch (f->kind) {
	case F_STR:
		return kv_scalar(c, v, path, f, false, &e->value);
	case F_BOOL:
		if (get_bool(c, v, path, &b))
			return -EINVAL;
		e->value = strdup(b ? "true" : "false");
		return e->value ? 0 : oom(c);
	case F_DURATION:
		if (kv_scalar(c, v, path, f, false, &e->value))
			return -EINVAL;
		if (ag_parse_duration(e->value, &ms))
			return perr(
				c, v,
				"bad duration \"%s\" for %s (expected a number and a unit: 30s, "
				"10m, 1h)",
				e->value, path);
		return 0;
	case F_LIST:
		return kv_list(c, v, path, f, e);
	case F_MAP:
	case F_FREEMAP:
		e->kind = AG_KV_MAP;
		return build_kv(c, v, path, f->kind == F_MAP ? f->sub : NULL, &e->map, &e->nmap);
	case F_ANY:
		if (v->type == YAML_SEQUENCE_NODE)
			return kv_list(c, v, path, f, e);
		return kv_scalar(c, v, path, f, true, &e->value);
	}
	return -EINVAL;
}

/*
 * A mapping checked against fields (NULL: any key, each value a string or a list of strings)
 * into *out. *out is set before anything can fail, so the caller's free covers a partial one.
 */
static int build_kv(struct parse_ctx *c, const yaml_node_t *n, const char *path,
		    const struct field *fields, struct ag_kv **out, size_t *nout)
{
	const char *keys[16];
	size_t nk = 0;
	int err;

	if (fields) {
		for (; fields[nk].key; nk++)
			keys[nk] = fields[nk].key;
		keys[nk] = NULL;
	}
	err = check_map(c, n, path, fields ? keys : NULL);
	if (err)
		return err;
	*nout = 0;
	*out = calloc(npairs(n) ? npairs(n) : 1, sizeof(**out));
	if (!*out)
		return oom(c);
	for (yaml_node_pair_t *pr = n->data.mapping.pairs.start; pr < n->data.mapping.pairs.top;
	     pr++) {
		struct ag_kv *e = &(*out)[(*nout)++];
		const char *k = sval(node(c, pr->key));
		const struct field *f = &any_field;
		char sub[256];

		if (fields)
			f = &fields[find_choice(keys, k)];
		e->key = strdup(k);
		if (!e->key)
			return oom(c);
		snprintf(sub, sizeof(sub), "%s.%s", path, k);
		err = kv_value(c, node(c, pr->value), f, sub, e);
		if (err)
			return err;
	}
	return 0;
}

const struct ag_kv *ag_kv_get(const struct ag_kv *kv, size_t n, const char *key)
{
	for (size_t i = 0; kv && i < n; i++)
		if (!strcmp(kv[i].key, key))
			return &kv[i];
	return NULL;
}

static const char *kv_str(const struct ag_kv *kv, size_t n, const char *key)
{
	const struct ag_kv *e = ag_kv_get(kv, n, key);

	return e ? e->value : NULL;
}

/* ---- agents ---- */

static const char *const agent_keys[] = { "name", "cgroup", "mode", NULL };

static int parse_agent_cgroup(struct parse_ctx *c, const yaml_node_t *v, struct ag_policy_agent *a)
{
	struct ag_policy *p = c->p;
	char norm[PATH_MAX];
	const char *s;
	int err;

	if (require_str(c, v, "cgroup", &s))
		return -EINVAL;
	if (!strncmp(s, "/sys/fs/cgroup/", 15) || !strcmp(s, "/sys/fs/cgroup"))
		return perr(c, v,
			    "cgroup \"%s\" is a filesystem path (give it relative to the cgroup2 "
			    "mount: /agents.slice, not /sys/fs/cgroup/agents.slice)",
			    s);
	err = ag_cgroup_normalize(s, norm, sizeof(norm));
	if (err == -EINVAL)
		return perr(c, v,
			    "\"..\" is not allowed in cgroup \"%s\" (give the path from the "
			    "cgroup2 root, like /agents.slice)",
			    s);
	if (err)
		return perr(c, v, "cgroup \"%s\" is too long", s);
	if (!strcmp(norm, "/"))
		return perr(
			c, v,
			"cgroup \"%s\" is the cgroup root (agentgate never attaches to the root; "
			"use a child such as /agentgate.slice/agents)",
			s);
	for (size_t i = 0; i + 1 < p->nagents; i++)
		if (!strcmp(p->agents[i].cgroup, norm))
			return perr(c, v, "cgroup \"%s\" is already agent \"%s\" (line %d)", norm,
				    p->agents[i].name, p->agents[i].line);
	a->cgroup = strdup(norm);
	return a->cgroup ? 0 : oom(c);
}

static int parse_agents(struct parse_ctx *c, const yaml_node_t *n)
{
	struct ag_policy *p = c->p;
	size_t cnt;

	if (is_null(n))
		return 0;
	if (n->type != YAML_SEQUENCE_NODE)
		return perr(c, n, "agents must be a list (got %s)", kind_name(n));
	cnt = nitems(n);
	if (spend(c, n, cnt))
		return -EINVAL;
	p->agents = calloc(cnt ? cnt : 1, sizeof(*p->agents));
	if (!p->agents)
		return oom(c);
	for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
	     it++) {
		const yaml_node_t *item = node(c, *it), *v;
		struct ag_policy_agent *a = &p->agents[p->nagents++];
		const char *s;
		int idx;

		if (check_map(c, item, "an agent", agent_keys))
			return -EINVAL;
		a->line = line_of(item);
		v = map_get(c, item, "name");
		if (!v)
			return perr(c, item,
				    "agent has no name (every agent needs a name and a cgroup)");
		if (require_str(c, v, "agent name", &s) || check_name(c, v, "agent", s))
			return -EINVAL;
		for (size_t i = 0; i + 1 < p->nagents; i++)
			if (!strcmp(p->agents[i].name, s))
				return perr(c, v, "duplicate agent \"%s\" (first at line %d)", s,
					    p->agents[i].line);
		a->name = strdup(s);
		if (!a->name)
			return oom(c);
		v = map_get(c, item, "cgroup");
		if (!v)
			return perr(c, item,
				    "agent \"%s\" has no cgroup (the cgroup v2 path its "
				    "processes run in, like /agents.slice)",
				    s);
		if (parse_agent_cgroup(c, v, a))
			return -EINVAL;
		v = map_get(c, item, "mode");
		if (v && !is_null(v)) {
			if (pick(c, v, "mode", mode_names, &idx))
				return -EINVAL;
			a->mode = mode_vals[idx];
		}
	}
	return 0;
}

/* ---- targets ---- */

static const char *const target_keys[] = { "name", "protocol",	 "address", "kubernetes",
					   "tls",  "credential", NULL };

static void map_v4(uint8_t out[16], const void *v4)
{
	memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	memcpy(out + 12, v4, 4);
}

static int add_addr(struct parse_ctx *c, struct ag_policy_target *t, const uint8_t a[16])
{
	uint8_t(*na)[16];

	for (size_t i = 0; i < t->naddrs; i++)
		if (!memcmp(t->addrs[i], a, 16))
			return 0;
	na = realloc(t->addrs, (t->naddrs + 1) * sizeof(*na));
	if (!na)
		return oom(c);
	t->addrs = na;
	memcpy(t->addrs[t->naddrs++], a, 16);
	return 0;
}

static int resolve_host(struct parse_ctx *c, const yaml_node_t *v, struct ag_policy_target *t)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	struct addrinfo *res, *ai;
	uint8_t a[16];
	int gai, err = 0;

	gai = getaddrinfo(t->host, NULL, &hints, &res);
	if (gai)
		return perr(c, v,
			    "cannot resolve host \"%s\" in address \"%s\": %s (check the name "
			    "or give an IP address)",
			    t->host, t->address,
			    gai == EAI_SYSTEM ? strerror(errno) : gai_strerror(gai));
	for (ai = res; ai && !err; ai = ai->ai_next) {
		if (ai->ai_family == AF_INET) {
			map_v4(a, &((struct sockaddr_in *)ai->ai_addr)->sin_addr);
			err = add_addr(c, t, a);
		} else if (ai->ai_family == AF_INET6) {
			err = add_addr(c, t,
				       ((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr.s6_addr);
		}
	}
	freeaddrinfo(res);
	if (!err && !t->naddrs)
		return perr(c, v, "host \"%s\" in address \"%s\" has no IPv4 or IPv6 address",
			    t->host, t->address);
	return err;
}

static int parse_address(struct parse_ctx *c, const yaml_node_t *v, struct ag_policy_target *t)
{
	static const char *hint = "expected IP:port, [v6]:port or host:port";
	const char *a = t->address, *hs, *he, *port;
	unsigned long pv;
	uint8_t addr[16];
	char *end;

	if (a[0] == '[') {
		hs = a + 1;
		he = strchr(hs, ']');
		if (!he)
			return perr(c, v, "address \"%s\" has no ']' after the IPv6 address (%s)",
				    a, hint);
		if (he[1] != ':')
			return perr(c, v, "address \"%s\" has no port (%s)", a, hint);
		port = he + 2;
	} else {
		he = strrchr(a, ':');
		if (!he)
			return perr(c, v, "address \"%s\" has no port (%s)", a, hint);
		hs = a;
		if (memchr(a, ':', he - a))
			return perr(c, v, "IPv6 address \"%s\" needs brackets ([::1]:5432)", a);
		port = he + 1;
	}
	if (he == hs)
		return perr(c, v, "address \"%s\" has no host (%s)", a, hint);
	if (he - hs > 253)
		return perr(c, v, "host in address \"%s\" is too long", a);
	if (!*port || strspn(port, "0123456789") != strlen(port))
		return perr(c, v, "bad port \"%s\" in address \"%s\" (expected 1-65535)", port, a);
	errno = 0;
	pv = strtoul(port, &end, 10);
	if (errno || pv < 1 || pv > 65535)
		return perr(c, v, "port %s out of range in address \"%s\" (expected 1-65535)", port,
			    a);
	t->port = pv;
	t->host = strndup(hs, he - hs);
	if (!t->host)
		return oom(c);

	if (a[0] == '[') {
		if (inet_pton(AF_INET6, t->host, addr) != 1)
			return perr(c, v, "bad IPv6 address \"%s\" in address \"%s\"", t->host, a);
		return add_addr(c, t, addr);
	}
	if (inet_pton(AF_INET, t->host, addr + 12) == 1) {
		map_v4(addr, addr + 12);
		return add_addr(c, t, addr);
	}
	if (strspn(t->host, NAME_CHARS) != strlen(t->host))
		return perr(c, v, "bad host \"%s\" in address \"%s\" (%s)", t->host, a, hint);
	return resolve_host(c, v, t);
}

static int check_credential(struct parse_ctx *c, const yaml_node_t *v, struct ag_policy_target *t)
{
	static const char *const needs[] = { "admin_secret", "key_file", "secret_file" };
	const char *prov = kv_str(t->credential, t->ncredential, "provider"), *ttl;
	char hint[128];
	uint64_t ms;
	int idx;

	if (!prov)
		return perr(c, v, "credential has no provider (expected %s)",
			    join_choices(provider_names, hint, sizeof(hint)));
	idx = find_choice(provider_names, prov);
	if (idx == 0 && t->protocol != AG_PROTO_POSTGRES)
		return perr(c, v,
			    "credential provider pg-jit-role needs a postgres target (\"%s\" "
			    "is %s)",
			    t->name, ag_proto_name(t->protocol));
	if (idx == 1 && t->protocol != AG_PROTO_HTTP)
		return perr(c, v, "credential provider jwt needs an http target (\"%s\" is %s)",
			    t->name, ag_proto_name(t->protocol));
	if (!ag_kv_get(t->credential, t->ncredential, needs[idx]))
		return perr(c, v, "credential provider %s needs %s", prov, needs[idx]);
	if (idx == 1 && !ag_kv_get(t->credential, t->ncredential, "audience"))
		return perr(c, v,
			    "credential provider jwt needs audience (who the token is for: the "
			    "target checks it)");
	ttl = kv_str(t->credential, t->ncredential, "ttl");
	/* A credential outlives its session by at most this: short-lived is the point. */
	if (ttl && (ag_parse_duration(ttl, &ms) || ms > 24 * 3600 * 1000ULL || ms < 1000))
		return perr(c, v, "credential ttl %s is out of range (1s to 24h)", ttl);
	return 0;
}

static int check_overlap(struct parse_ctx *c, const yaml_node_t *v,
			 const struct ag_policy_target *t)
{
	const struct ag_policy *p = c->p;

	for (size_t i = 0; i + 1 < p->ntargets; i++) {
		const struct ag_policy_target *o = &p->targets[i];

		if (o->port != t->port)
			continue;
		for (size_t j = 0; j < t->naddrs; j++)
			for (size_t k = 0; k < o->naddrs; k++)
				if (!memcmp(t->addrs[j], o->addrs[k], 16))
					return perr(
						c, v,
						"address \"%s\" is also target \"%s\" "
						"(line %d; a destination belongs to one target)",
						t->address, o->name, o->line);
	}
	return 0;
}

static int parse_target(struct parse_ctx *c, const yaml_node_t *item, struct ag_policy_target *t)
{
	struct ag_policy *p = c->p;
	const yaml_node_t *v, *addr;
	const char *s;
	int idx;

	if (check_map(c, item, "a target", target_keys))
		return -EINVAL;
	t->line = line_of(item);
	v = map_get(c, item, "name");
	if (!v)
		return perr(c, item,
			    "target has no name (every target needs a name, a protocol and "
			    "an address)");
	if (require_str(c, v, "target name", &s) || check_name(c, v, "target", s))
		return -EINVAL;
	for (size_t i = 0; i + 1 < p->ntargets; i++)
		if (!strcmp(p->targets[i].name, s))
			return perr(c, v, "duplicate target \"%s\" (first at line %d)", s,
				    p->targets[i].line);
	t->name = strdup(s);
	if (!t->name)
		return oom(c);

	v = map_get(c, item, "protocol");
	if (!v)
		return perr(c, item,
			    "target \"%s\" has no protocol (expected postgres, http or tcp)",
			    t->name);
	if (pick(c, v, "protocol", proto_names, &idx))
		return -EINVAL;
	t->protocol = proto_vals[idx];

	addr = map_get(c, item, "address");
	if (!addr)
		return perr(c, item,
			    "target \"%s\" has no address (expected IP:port, [v6]:port or "
			    "host:port)",
			    t->name);
	if (require_str(c, addr, "address", &s))
		return -EINVAL;
	t->address = strdup(s);
	if (!t->address)
		return oom(c);
	if (parse_address(c, addr, t) || check_overlap(c, addr, t))
		return -EINVAL;

	v = map_get(c, item, "kubernetes");
	if (v && !is_null(v)) {
		if (get_bool(c, v, "kubernetes", &t->kubernetes))
			return -EINVAL;
		if (t->kubernetes && t->protocol != AG_PROTO_HTTP)
			return perr(c, v, "kubernetes: true needs protocol http (\"%s\" is %s)",
				    t->name, ag_proto_name(t->protocol));
	}
	v = map_get(c, item, "tls");
	if (v && !is_null(v) && build_kv(c, v, "tls", tls_fields, &t->tls, &t->ntls))
		return -EINVAL;
	v = map_get(c, item, "credential");
	if (v && !is_null(v)) {
		if (build_kv(c, v, "credential", credential_fields, &t->credential,
			     &t->ncredential) ||
		    check_credential(c, v, t))
			return -EINVAL;
	}
	return 0;
}

static int parse_targets(struct parse_ctx *c, const yaml_node_t *n)
{
	struct ag_policy *p = c->p;
	size_t cnt;

	if (is_null(n))
		return 0;
	if (n->type != YAML_SEQUENCE_NODE)
		return perr(c, n, "targets must be a list (got %s)", kind_name(n));
	cnt = nitems(n);
	if (spend(c, n, cnt))
		return -EINVAL;
	p->targets = calloc(cnt ? cnt : 1, sizeof(*p->targets));
	if (!p->targets)
		return oom(c);
	for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
	     it++)
		if (parse_target(c, node(c, *it), &p->targets[p->ntargets++]))
			return -EINVAL;
	return 0;
}

/* ---- rules ---- */

static const char *const rule_keys[] = { "agent", "target", "sql", "http", "mask", NULL };
static const char *const stmt_keys[] = { "name", "when", "then", NULL };

static int parse_stmt_rules(struct parse_ctx *c, const yaml_node_t *n, const char *kind,
			    const struct ag_policy_target *tgt, struct ag_policy_stmt_rule **out,
			    size_t *nout)
{
	const struct field *fields = !strcmp(kind, "sql") ? sql_when_fields : http_when_fields;
	char what[32];
	size_t cnt;

	if (is_null(n))
		return 0;
	if (n->type != YAML_SEQUENCE_NODE)
		return perr(c, n, "%s must be a list of rules (got %s)", kind, kind_name(n));
	cnt = nitems(n);
	if (spend(c, n, cnt))
		return -EINVAL;
	*out = calloc(cnt ? cnt : 1, sizeof(**out));
	if (!*out)
		return oom(c);
	snprintf(what, sizeof(what), "a %s rule", kind);
	for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
	     it++) {
		const yaml_node_t *item = node(c, *it), *v;
		struct ag_policy_stmt_rule *r = &(*out)[(*nout)++];
		yaml_node_pair_t *k8s;
		const char *s;
		int idx;

		if (check_map(c, item, what, stmt_keys))
			return -EINVAL;
		r->line = line_of(item);
		v = map_get(c, item, "name");
		if (!v)
			return perr(c, item,
				    "%s rule has no name (every rule needs a name and a then)",
				    kind);
		if (require_str(c, v, "rule name", &s))
			return -EINVAL;
		for (size_t i = 0; i + 1 < *nout; i++)
			if (!strcmp((*out)[i].name, s))
				return perr(c, v, "duplicate %s rule \"%s\" (first at line %d)",
					    kind, s, (*out)[i].line);
		r->name = strdup(s);
		if (!r->name)
			return oom(c);

		v = map_get(c, item, "when");
		if (v && !is_null(v)) {
			if (build_kv(c, v, "when", fields, &r->when, &r->nwhen))
				return -EINVAL;
			k8s = map_pair(c, v, "kubernetes");
			if (k8s && tgt && !tgt->kubernetes)
				return perr(c, node(c, k8s->key),
					    "when.kubernetes needs a target with kubernetes: true "
					    "(\"%s\" has none)",
					    tgt->name);
		}
		v = map_get(c, item, "then");
		if (!v)
			return perr(c, item,
				    "%s rule \"%s\" has no then (expected allow, deny, "
				    "approve or observe)",
				    kind, r->name);
		if (pick(c, v, "action", action_names, &idx))
			return -EINVAL;
		r->then = action_vals[idx];
		if (fields == sql_when_fields) {
			const struct ag_kv *cmd = ag_kv_get(r->when, r->nwhen, "command");

			for (size_t i = 0; cmd && i < cmd->nlist; i++)
				r->classes |= ag_sql_class_by_name(cmd->list[i]);
			/* Looked up here once, not for every statement (sql.c). */
			r->w_command = cmd;
			r->w_tables = ag_kv_get(r->when, r->nwhen, "tables");
			r->w_where = ag_kv_get(r->when, r->nwhen, "where");
		}
	}
	return 0;
}

static int rule_ref(struct parse_ctx *c, const yaml_node_t *item, const char *key, char **out,
		    const struct ag_policy_target **tgt)
{
	const yaml_node_t *v = map_get(c, item, key);
	bool known;
	const char *s;

	if (!v)
		return perr(c, item, "rule has no %s (name a defined %s or \"*\")", key, key);
	if (require_str(c, v, key, &s))
		return -EINVAL;
	if (!strcmp(key, "agent")) {
		known = ag_policy_agent_by_name(c->p, s);
	} else {
		*tgt = ag_policy_target_by_name(c->p, s);
		known = *tgt;
	}
	if (strcmp(s, "*") && !known)
		return perr(c, v,
			    "rule names unknown %s \"%s\" (define it under %ss: or use \"*\")", key,
			    s, key);
	*out = strdup(s);
	return *out ? 0 : oom(c);
}

static int parse_rule(struct parse_ctx *c, const yaml_node_t *item, struct ag_policy_rule *r)
{
	const struct ag_policy_target *tgt = NULL;
	yaml_node_pair_t *pr;

	if (check_map(c, item, "a rule", rule_keys))
		return -EINVAL;
	r->line = line_of(item);
	if (rule_ref(c, item, "agent", &r->agent, &tgt) ||
	    rule_ref(c, item, "target", &r->target, &tgt))
		return -EINVAL;

	pr = map_pair(c, item, "sql");
	if (pr) {
		if (tgt && tgt->protocol != AG_PROTO_POSTGRES)
			return perr(c, node(c, pr->key),
				    "sql rules on target \"%s\", which is %s "
				    "(sql: needs a postgres target)",
				    tgt->name, ag_proto_name(tgt->protocol));
		if (parse_stmt_rules(c, node(c, pr->value), "sql", tgt, &r->sql, &r->nsql))
			return -EINVAL;
	}
	pr = map_pair(c, item, "http");
	if (pr) {
		if (tgt && tgt->protocol != AG_PROTO_HTTP)
			return perr(c, node(c, pr->key),
				    "http rules on target \"%s\", which is %s "
				    "(http: needs an http target)",
				    tgt->name, ag_proto_name(tgt->protocol));
		if (parse_stmt_rules(c, node(c, pr->value), "http", tgt, &r->http, &r->nhttp))
			return -EINVAL;
	}
	pr = map_pair(c, item, "mask");
	if (pr && !is_null(node(c, pr->value))) {
		if (tgt && tgt->protocol == AG_PROTO_TCP)
			return perr(c, node(c, pr->key),
				    "mask on target \"%s\", which is tcp (masking "
				    "needs a postgres or http target)",
				    tgt->name);
		if (build_kv(c, node(c, pr->value), "mask", mask_fields, &r->mask, &r->nmask))
			return -EINVAL;
	}
	return 0;
}

static int parse_rules(struct parse_ctx *c, const yaml_node_t *n)
{
	struct ag_policy *p = c->p;
	size_t cnt;

	if (is_null(n))
		return 0;
	if (n->type != YAML_SEQUENCE_NODE)
		return perr(c, n, "rules must be a list (got %s)", kind_name(n));
	cnt = nitems(n);
	if (spend(c, n, cnt))
		return -EINVAL;
	p->rules = calloc(cnt ? cnt : 1, sizeof(*p->rules));
	if (!p->rules)
		return oom(c);
	for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top;
	     it++)
		if (parse_rule(c, node(c, *it), &p->rules[p->nrules++]))
			return -EINVAL;
	return 0;
}

/* ---- the document ---- */

static const char *const top_keys[] = { "apiVersion", "agents",	 "targets", "rules",
					"approvals",  "default", "gateway", "audit", NULL };
static const char *const gateway_keys[] = { "fastpath", NULL };

static int parse_root(struct parse_ctx *c, const yaml_node_t *root)
{
	struct ag_policy *p = c->p;
	const yaml_node_t *v;
	const char *s;
	int idx;

	if (is_null(root))
		return perr(c, root,
			    "empty policy (expected a mapping that starts with apiVersion: "
			    "agentgate/v1)");
	if (root->type != YAML_MAPPING_NODE)
		return perr(c, root,
			    "the policy must be a mapping of apiVersion, agents, targets, "
			    "rules, ... (got %s)",
			    kind_name(root));
	if (check_map(c, root, "the policy", top_keys))
		return -EINVAL;

	v = map_get(c, root, "apiVersion");
	if (!v)
		return perr(c, root, "missing apiVersion (expected apiVersion: agentgate/v1)");
	if (get_str(c, v, "apiVersion", &s))
		return -EINVAL;
	if (strcmp(s, "agentgate/v1"))
		return perr(c, v, "unsupported apiVersion \"%s\" (expected agentgate/v1)", s);

	/* Rules refer to agents and targets, wherever they are in the file. */
	if ((v = map_get(c, root, "agents")) && parse_agents(c, v))
		return -EINVAL;
	if ((v = map_get(c, root, "targets")) && parse_targets(c, v))
		return -EINVAL;
	if ((v = map_get(c, root, "rules")) && parse_rules(c, v))
		return -EINVAL;
	v = map_get(c, root, "approvals");
	if (v && !is_null(v) &&
	    (build_kv(c, v, "approvals", approvals_fields, &p->approvals, &p->napprovals) ||
	     check_approvers(c, v, p)))
		return -EINVAL;
	v = map_get(c, root, "audit");
	if (v && !is_null(v)) {
		struct ag_audit_config ac;
		char why[256];

		if (build_kv(c, v, "audit", audit_fields, &p->audit, &p->naudit))
			return -EINVAL;
		if (ag_audit_config_parse(p->audit, p->naudit, &ac, why, sizeof(why)))
			return perr(c, v, "%s", why);
	}
	v = map_get(c, root, "default");
	if (v) {
		if (pick(c, v, "default", default_names, &idx))
			return -EINVAL;
		p->default_action = default_vals[idx];
	}
	v = map_get(c, root, "gateway");
	if (v && !is_null(v)) {
		if (check_map(c, v, "gateway", gateway_keys))
			return -EINVAL;
		v = map_get(c, v, "fastpath");
		if (v && !is_null(v)) {
			if (get_bool(c, v, "gateway.fastpath", &p->fastpath))
				return -EINVAL;
			p->fastpath_set = true;
		}
	}
	return 0;
}

static int yaml_error(struct parse_ctx *c, const yaml_parser_t *y, const char *text, size_t len)
{
	size_t line = 1, col = 1;

	switch (y->error) {
	case YAML_MEMORY_ERROR:
		return oom(c);
	case YAML_READER_ERROR:
		/* The reader reports a byte offset, not a mark. */
		for (size_t i = 0; i < y->problem_offset && i < len; i++) {
			col++;
			if (text[i] == '\n') {
				line++;
				col = 1;
			}
		}
		return perr_at(c, line, col, "%s (a policy is UTF-8 text)",
			       y->problem ? y->problem : "unreadable input");
	default:
		if (y->problem_mark.index < len && text[y->problem_mark.index] == '\t')
			return perr_at(c, y->problem_mark.line + 1, y->problem_mark.column + 1,
				       "YAML syntax error: a tab (YAML indents with spaces only)");
		if (y->context)
			return perr_at(c, y->problem_mark.line + 1, y->problem_mark.column + 1,
				       "YAML syntax error: %s (%s that starts at line %zu)",
				       y->problem ? y->problem : "unknown problem", y->context,
				       y->context_mark.line + 1);
		return perr_at(c, y->problem_mark.line + 1, y->problem_mark.column + 1,
			       "YAML syntax error: %s",
			       y->problem ? y->problem : "unknown problem");
	}
}

/*
 * A first pass over the events: syntax errors, nesting beyond MAX_DEPTH (refused before the
 * scanner gets deep enough to be slow), and a second document.
 */
static int prescan(struct parse_ctx *c, const char *text, size_t len)
{
	int depth = 0, docs = 0, ret = 0;
	yaml_event_type_t type;
	yaml_parser_t y;
	yaml_event_t ev;

	if (!yaml_parser_initialize(&y))
		return oom(c);
	yaml_parser_set_input_string(&y, (const unsigned char *)text, len);
	do {
		if (!yaml_parser_parse(&y, &ev)) {
			ret = yaml_error(c, &y, text, len);
			break;
		}
		type = ev.type;
		if (type == YAML_SEQUENCE_START_EVENT || type == YAML_MAPPING_START_EVENT) {
			if (++depth > MAX_DEPTH)
				ret = perr_at(c, ev.start_mark.line + 1, ev.start_mark.column + 1,
					      "lists and mappings nest deeper than %d levels",
					      MAX_DEPTH);
		} else if (type == YAML_SEQUENCE_END_EVENT || type == YAML_MAPPING_END_EVENT) {
			depth--;
		} else if (type == YAML_DOCUMENT_START_EVENT && ++docs > 1) {
			ret = perr_at(
				c, ev.start_mark.line + 1, ev.start_mark.column + 1,
				"a second YAML document (a policy is one document; remove the "
				"'---')");
		}
		yaml_event_delete(&ev);
	} while (!ret && type != YAML_STREAM_END_EVENT);
	yaml_parser_delete(&y);
	return ret;
}

struct ag_policy *ag_policy_parse(const char *text, size_t len, const char *name, char *err,
				  size_t errlen)
{
	struct parse_ctx c = {
		.file = name ? name : "<policy>",
		.err = err,
		.errlen = errlen,
		.budget = NODE_BUDGET,
	};
	yaml_document_t doc;
	yaml_parser_t parser;
	yaml_node_t *root;
	struct ag_policy *p;
	int ret = 0;

	if (err && errlen)
		err[0] = '\0';
	if (!text && len) {
		errno = EINVAL;
		return NULL;
	}
	if (len > AG_POLICY_MAX_SIZE) {
		set_err(err, errlen, "%s: policy is %zu bytes, over the %u MiB limit", c.file, len,
			AG_POLICY_MAX_SIZE >> 20);
		errno = EFBIG;
		return NULL;
	}
	p = calloc(1, sizeof(*p));
	if (!p || !(p->path = strdup(c.file)) || !(p->source = malloc(len + 1))) {
		ret = oom(&c);
		goto fail;
	}
	if (len)
		memcpy(p->source, text, len);
	p->source[len] = '\0';
	c.p = p;

	ret = prescan(&c, p->source, len);
	if (ret)
		goto fail;
	if (!yaml_parser_initialize(&parser)) {
		ret = oom(&c);
		goto fail;
	}
	yaml_parser_set_input_string(&parser, (const unsigned char *)p->source, len);
	if (!yaml_parser_load(&parser, &doc)) {
		ret = yaml_error(&c, &parser, p->source, len);
		yaml_parser_delete(&parser);
		goto fail;
	}
	c.doc = &doc;
	root = yaml_document_get_root_node(&doc);
	if (!root)
		ret = perr(&c, NULL,
			   "empty policy (expected a mapping that starts with apiVersion: "
			   "agentgate/v1)");
	else
		ret = parse_root(&c, root);
	yaml_document_delete(&doc);
	yaml_parser_delete(&parser);
	if (ret)
		goto fail;
	return p;
fail:
	ag_policy_free(p);
	errno = c.oom ? ENOMEM : -ret;
	return NULL;
}

struct ag_policy *ag_policy_load(const char *path, char *err, size_t errlen)
{
	struct ag_policy *p = NULL;
	size_t cap = 0, n = 0;
	char *buf = NULL;
	struct stat st;
	int fd, e = 0;

	if (err && errlen)
		err[0] = '\0';
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		e = errno;
		set_err(err, errlen, "%s: cannot open the policy: %s", path, strerror(e));
		errno = e;
		return NULL;
	}
	if (fstat(fd, &st)) {
		e = errno;
		set_err(err, errlen, "%s: cannot stat the policy: %s", path, strerror(e));
		goto out;
	}
	if (S_ISDIR(st.st_mode)) {
		e = EISDIR;
		set_err(err, errlen, "%s: is a directory, not a policy file", path);
		goto out;
	}
	if (S_ISREG(st.st_mode) && st.st_size > AG_POLICY_MAX_SIZE) {
		e = EFBIG;
		set_err(err, errlen, "%s: policy is %lld bytes, over the %u MiB limit", path,
			(long long)st.st_size, AG_POLICY_MAX_SIZE >> 20);
		goto out;
	}
	/* st_size is only a hint (pipes, /proc); read until EOF, one byte past the limit. */
	for (;;) {
		ssize_t r;

		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 64 * 1024;
			char *nb;

			if (ncap > AG_POLICY_MAX_SIZE + 1)
				ncap = AG_POLICY_MAX_SIZE + 1;
			if (ncap == cap) {
				e = EFBIG;
				set_err(err, errlen, "%s: policy is over the %u MiB limit", path,
					AG_POLICY_MAX_SIZE >> 20);
				goto out;
			}
			nb = realloc(buf, ncap);
			if (!nb) {
				e = ENOMEM;
				set_err(err, errlen, "%s: out of memory", path);
				goto out;
			}
			buf = nb;
			cap = ncap;
		}
		r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			e = errno;
			set_err(err, errlen, "%s: cannot read the policy: %s", path, strerror(e));
			goto out;
		}
		if (!r)
			break;
		n += r;
	}
	p = ag_policy_parse(buf, n, path, err, errlen);
	e = p ? 0 : errno;
out:
	close(fd);
	free(buf);
	if (!p)
		errno = e;
	return p;
}

void ag_policy_free(struct ag_policy *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->nagents; i++) {
		free(p->agents[i].name);
		free(p->agents[i].cgroup);
	}
	free(p->agents);
	for (size_t i = 0; i < p->ntargets; i++) {
		struct ag_policy_target *t = &p->targets[i];

		free(t->name);
		free(t->address);
		free(t->host);
		free(t->addrs);
		kv_free(t->tls, t->ntls);
		kv_free(t->credential, t->ncredential);
	}
	free(p->targets);
	for (size_t i = 0; i < p->nrules; i++) {
		struct ag_policy_rule *r = &p->rules[i];

		free(r->agent);
		free(r->target);
		for (size_t j = 0; j < r->nsql; j++) {
			free(r->sql[j].name);
			kv_free(r->sql[j].when, r->sql[j].nwhen);
		}
		free(r->sql);
		for (size_t j = 0; j < r->nhttp; j++) {
			free(r->http[j].name);
			kv_free(r->http[j].when, r->http[j].nwhen);
		}
		free(r->http);
		kv_free(r->mask, r->nmask);
	}
	free(p->rules);
	kv_free(p->approvals, p->napprovals);
	kv_free(p->audit, p->naudit);
	free(p->path);
	free(p->source);
	free(p);
}

/* ---- lookups ---- */

const struct ag_policy_agent *ag_policy_agent_by_name(const struct ag_policy *p, const char *name)
{
	for (size_t i = 0; p && name && i < p->nagents; i++)
		if (p->agents[i].name && !strcmp(p->agents[i].name, name))
			return &p->agents[i];
	return NULL;
}

const struct ag_policy_agent *ag_policy_agent_by_cgroup(const struct ag_policy *p, const char *rel)
{
	const struct ag_policy_agent *best = NULL;
	size_t best_len = 0;
	char norm[PATH_MAX];

	if (!p || !rel)
		return NULL;
	if (!ag_cgroup_normalize(rel, norm, sizeof(norm)))
		rel = norm;
	for (size_t i = 0; i < p->nagents; i++) {
		const struct ag_policy_agent *a = &p->agents[i];
		size_t l = strlen(a->cgroup);

		if (l > best_len && ag_cgroup_is_within(rel, a->cgroup)) {
			best = a;
			best_len = l;
		}
	}
	return best;
}

const struct ag_policy_target *ag_policy_target_by_addr(const struct ag_policy *p,
							const uint8_t addr[16], uint16_t port)
{
	for (size_t i = 0; p && i < p->ntargets; i++) {
		const struct ag_policy_target *t = &p->targets[i];

		if (t->port != port)
			continue;
		for (size_t j = 0; j < t->naddrs; j++)
			if (!memcmp(t->addrs[j], addr, 16))
				return t;
	}
	return NULL;
}

const struct ag_policy_target *ag_policy_target_by_name(const struct ag_policy *p, const char *name)
{
	for (size_t i = 0; p && name && i < p->ntargets; i++)
		if (p->targets[i].name && !strcmp(p->targets[i].name, name))
			return &p->targets[i];
	return NULL;
}

const char *ag_proto_name(enum ag_proto p)
{
	switch (p) {
	case AG_PROTO_TCP:
		return "tcp";
	case AG_PROTO_POSTGRES:
		return "postgres";
	case AG_PROTO_HTTP:
		return "http";
	}
	return "unknown";
}

const char *ag_action_name(enum ag_action a)
{
	switch (a) {
	case AG_ACT_ALLOW:
		return "allow";
	case AG_ACT_DENY:
		return "deny";
	case AG_ACT_APPROVE:
		return "approve";
	case AG_ACT_OBSERVE:
		return "observe";
	}
	return "unknown";
}

const char *ag_mode_name(enum ag_agent_mode m)
{
	return m == AG_MODE_OBSERVE ? "observe" : "enforce";
}

const char *ag_default_action_name(enum ag_default_action a)
{
	return a == AG_DEFAULT_PASSTHROUGH ? "passthrough" : "deny";
}

/* ---- JSON ---- */

static void kv_to_json(struct jsonw *w, const struct ag_kv *kv, size_t n)
{
	jsonw_start_object(w);
	for (size_t i = 0; i < n; i++) {
		const struct ag_kv *e = &kv[i];

		jsonw_name(w, e->key);
		switch (e->kind) {
		case AG_KV_SCALAR:
			jsonw_string(w, e->value);
			break;
		case AG_KV_LIST:
			jsonw_start_array(w);
			for (size_t j = 0; j < e->nlist; j++)
				jsonw_string(w, e->list[j]);
			jsonw_end_array(w);
			break;
		case AG_KV_MAP:
			kv_to_json(w, e->map, e->nmap);
			break;
		}
	}
	jsonw_end_object(w);
}

static void kv_field_json(struct jsonw *w, const char *name, const struct ag_kv *kv, size_t n)
{
	jsonw_name(w, name);
	if (kv)
		kv_to_json(w, kv, n);
	else
		jsonw_null(w);
}

static void stmt_rules_json(struct jsonw *w, const char *name, const struct ag_policy_stmt_rule *r,
			    size_t n)
{
	jsonw_name(w, name);
	jsonw_start_array(w);
	for (size_t i = 0; i < n; i++) {
		jsonw_start_object(w);
		jsonw_string_field(w, "name", r[i].name);
		kv_field_json(w, "when", r[i].when, r[i].nwhen);
		jsonw_string_field(w, "then", ag_action_name(r[i].then));
		jsonw_end_object(w);
	}
	jsonw_end_array(w);
}

static void addr_str(const uint8_t a[16], char *buf, size_t len)
{
	if (IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)a))
		inet_ntop(AF_INET, a + 12, buf, len);
	else
		inet_ntop(AF_INET6, a, buf, len);
}

void ag_policy_to_json(const struct ag_policy *p, struct jsonw *w)
{
	char buf[INET6_ADDRSTRLEN];

	jsonw_start_object(w);
	jsonw_string_field(w, "file", p->path);
	jsonw_string_field(w, "default", ag_default_action_name(p->default_action));
	jsonw_name(w, "gateway");
	jsonw_start_object(w);
	if (p->fastpath_set)
		jsonw_bool_field(w, "fastpath", p->fastpath);
	else
		jsonw_null_field(w, "fastpath");
	jsonw_end_object(w);

	jsonw_name(w, "agents");
	jsonw_start_array(w);
	for (size_t i = 0; i < p->nagents; i++) {
		jsonw_start_object(w);
		jsonw_string_field(w, "name", p->agents[i].name);
		jsonw_string_field(w, "cgroup", p->agents[i].cgroup);
		jsonw_string_field(w, "mode", ag_mode_name(p->agents[i].mode));
		jsonw_end_object(w);
	}
	jsonw_end_array(w);

	jsonw_name(w, "targets");
	jsonw_start_array(w);
	for (size_t i = 0; i < p->ntargets; i++) {
		const struct ag_policy_target *t = &p->targets[i];

		jsonw_start_object(w);
		jsonw_string_field(w, "name", t->name);
		jsonw_string_field(w, "protocol", ag_proto_name(t->protocol));
		jsonw_string_field(w, "address", t->address);
		jsonw_string_field(w, "host", t->host);
		jsonw_uint_field(w, "port", t->port);
		jsonw_name(w, "addrs");
		jsonw_start_array(w);
		for (size_t j = 0; j < t->naddrs; j++) {
			addr_str(t->addrs[j], buf, sizeof(buf));
			jsonw_string(w, buf);
		}
		jsonw_end_array(w);
		jsonw_bool_field(w, "kubernetes", t->kubernetes);
		kv_field_json(w, "tls", t->tls, t->ntls);
		kv_field_json(w, "credential", t->credential, t->ncredential);
		jsonw_end_object(w);
	}
	jsonw_end_array(w);

	jsonw_name(w, "rules");
	jsonw_start_array(w);
	for (size_t i = 0; i < p->nrules; i++) {
		const struct ag_policy_rule *r = &p->rules[i];

		jsonw_start_object(w);
		jsonw_string_field(w, "agent", r->agent);
		jsonw_string_field(w, "target", r->target);
		stmt_rules_json(w, "sql", r->sql, r->nsql);
		stmt_rules_json(w, "http", r->http, r->nhttp);
		kv_field_json(w, "mask", r->mask, r->nmask);
		jsonw_end_object(w);
	}
	jsonw_end_array(w);

	kv_field_json(w, "approvals", p->approvals, p->napprovals);
	kv_field_json(w, "audit", p->audit, p->naudit);
	jsonw_end_object(w);
}
