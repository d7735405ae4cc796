/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The policy: a YAML file (apiVersion: agentgate/v1, SPEC.md) parsed with libyaml into an
 * immutable struct ag_policy. The daemon swaps whole policies atomically on SIGHUP (the old one
 * stays if the new file is refused). Errors name file:line:col, the problem and a hint.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct jsonw;

/* Policy files larger than this are refused before parsing. */
#define AG_POLICY_MAX_SIZE (4u << 20)
/* Agent and target names are [A-Za-z0-9_.-]+ and shorter than this (they fit a char[64]). */
#define AG_NAME_MAX 64

enum ag_proto { AG_PROTO_TCP = 0, AG_PROTO_POSTGRES, AG_PROTO_HTTP };
enum ag_agent_mode { AG_MODE_ENFORCE = 0, AG_MODE_OBSERVE };
enum ag_default_action { AG_DEFAULT_DENY = 0, AG_DEFAULT_PASSTHROUGH };
enum ag_action { AG_ACT_ALLOW = 0, AG_ACT_DENY, AG_ACT_APPROVE, AG_ACT_OBSERVE };

struct ag_policy_agent {
	char *name;
	char *cgroup; /* normalized, relative to the cgroup2 mount: "/agents.slice" */
	enum ag_agent_mode mode;
	int line;
};

enum ag_kv_kind { AG_KV_SCALAR = 0, AG_KV_LIST, AG_KV_MAP };

/*
 * A key: value pair kept as written (tls: {...}, credential: {...}, a rule's when: {...}).
 * Keys that take a list (grant, command, tables, method, host, path, the kubernetes: keys,
 * columns, detectors, approvers) are always AG_KV_LIST, even when written as one scalar.
 * SQL command values are stored lower-case; booleans as "true"/"false"; durations as written
 * (parse them with ag_parse_duration()).
 */
struct ag_kv {
	char *key;
	char *value; /* scalar value, or NULL when the value is a list or a mapping */
	char **list; /* scalar list values ([drop, truncate]) */
	size_t nlist;
	struct ag_kv *map; /* nested mapping */
	size_t nmap;
	enum ag_kv_kind kind; /* tells an empty list from an empty mapping */
};

struct ag_policy_target {
	char *name;
	enum ag_proto protocol;
	char *address; /* as written: "127.0.0.2:5432", "[::1]:5432", "db.internal:5432" */
	char *host;    /* without the port and brackets */
	uint16_t port;
	/* Addresses the host resolved to at load time, IPv4 as IPv4-mapped IPv6. */
	uint8_t (*addrs)[16];
	size_t naddrs;
	bool kubernetes;
	struct ag_kv *tls; /* NULL when absent */
	size_t ntls;
	struct ag_kv *credential;
	size_t ncredential;
	int line;
};

struct ag_policy_stmt_rule {
	char *name;
	struct ag_kv *when; /* the when: mapping, validated for known keys */
	size_t nwhen;
	enum ag_action then;
	int line;
	uint64_t classes; /* sql rules: the command: list as class bits (sql.h), set at load */
	/* sql rules: when:'s command, tables and where (into when, or NULL), set at load */
	const struct ag_kv *w_command, *w_tables, *w_where;
};

struct ag_policy_rule {
	char *agent;  /* agent name, or "*" */
	char *target; /* target name, or "*" */
	struct ag_policy_stmt_rule *sql;
	size_t nsql;
	struct ag_policy_stmt_rule *http;
	size_t nhttp;
	struct ag_kv *mask; /* the mask: mapping (columns, detectors, style) */
	size_t nmask;
	int line;
};

struct ag_policy {
	char *path;   /* file it came from */
	char *source; /* the file's text */
	struct ag_policy_agent *agents;
	size_t nagents;
	struct ag_policy_target *targets;
	size_t ntargets;
	struct ag_policy_rule *rules;
	size_t nrules;
	enum ag_default_action default_action;
	/* gateway: { fastpath: true|false } — sk_msg fast path on the agent↔gateway leg */
	bool fastpath;
	bool fastpath_set; /* false: not in the file, the daemon decides */
	struct ag_kv *approvals;
	size_t napprovals;
	struct ag_kv *audit; /* audit: { fsync, checkpoint_records, checkpoint_interval, segment_size } */
	size_t naudit;
};

/*
 * Parses and validates a policy. On error returns NULL and writes one line into err:
 * "FILE:LINE:COL: problem (hint)". Unknown keys, wrong types, duplicate names, rules naming an
 * unknown agent or target, bad addresses, bad enum values and an apiVersion other than
 * agentgate/v1 are all errors. errno: EINVAL (a bad policy), EFBIG (over AG_POLICY_MAX_SIZE),
 * ENOMEM, or the open/read error (ENOENT, EACCES, EISDIR). Host names are resolved here
 * (getaddrinfo, blocking): load off the event loop.
 */
struct ag_policy *ag_policy_load(const char *path, char *err, size_t errlen);
struct ag_policy *ag_policy_parse(const char *text, size_t len, const char *name, char *err,
				  size_t errlen);
void ag_policy_free(struct ag_policy *p);

const struct ag_policy_agent *ag_policy_agent_by_name(const struct ag_policy *p, const char *name);
/* The agent whose cgroup is the longest prefix of (or equal to) cgroup `rel`, or NULL. */
const struct ag_policy_agent *ag_policy_agent_by_cgroup(const struct ag_policy *p, const char *rel);
/* The target that a destination (IPv4-mapped for IPv4) and port belong to, or NULL. */
const struct ag_policy_target *ag_policy_target_by_addr(const struct ag_policy *p,
							const uint8_t addr[16], uint16_t port);
const struct ag_policy_target *ag_policy_target_by_name(const struct ag_policy *p,
							const char *name);

const char *ag_proto_name(enum ag_proto p);
const char *ag_action_name(enum ag_action a);
const char *ag_mode_name(enum ag_agent_mode m);
const char *ag_default_action_name(enum ag_default_action a);

/* The entry for key in a kv array (tls, credential, when, mask, approvals), or NULL. */
const struct ag_kv *ag_kv_get(const struct ag_kv *kv, size_t n, const char *key);
/*
 * Parses a policy duration ("30s", "10m", "1h", "1h30m", "500ms", "2d") into milliseconds.
 * 0, or -EINVAL when malformed or zero, -ERANGE when absurdly large.
 */
int ag_parse_duration(const char *s, uint64_t *ms);

/*
 * The whole policy as one JSON object (file, default, gateway, agents, targets, rules,
 * approvals); absent tls, credential, mask and approvals are null, and so is gateway.fastpath
 * when the file leaves it to the daemon. Secret-bearing keys hold file paths, printed as such.
 */
void ag_policy_to_json(const struct ag_policy *p, struct jsonw *w);
