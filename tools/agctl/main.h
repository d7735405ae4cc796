/* SPDX-License-Identifier: GPL-2.0 */
/*
 * agctl's shared plumbing, after bpftool's main.h: the command tables and their selector, the
 * argv macros, the one JSON writer behind -j/-p, error reporting, the daemon call wrapper and a
 * small aligned-table printer that every object's _plain printers use.
 */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ctl.h"
#include "jsonw.h"

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#define NEXT_ARG()                                                                                 \
	({                                                                                         \
		argc--;                                                                            \
		argv++;                                                                            \
	})
#define GET_ARG()                                                                                  \
	({                                                                                         \
		argc--;                                                                            \
		*argv++;                                                                           \
	})
#define BAD_ARG()                                                                                  \
	({                                                                                         \
		p_err("what is '%s'?", *argv);                                                     \
		-1;                                                                                \
	})
#define REQ_ARGS(cnt)                                                                              \
	({                                                                                         \
		int _cnt = (cnt);                                                                  \
		bool _res = true;                                                                  \
		if (argc < _cnt) {                                                                 \
			p_err("'%s' needs at least %d argument%s, %d found", argv[-1], _cnt,       \
			      _cnt == 1 ? "" : "s", argc);                                         \
			_res = false;                                                              \
		}                                                                                  \
		_res;                                                                              \
	})
/* Nothing may follow the arguments a command consumed. */
#define NO_MORE_ARGS()                                                                             \
	({                                                                                         \
		bool _res = true;                                                                  \
		if (argc > 0) {                                                                    \
			p_err("what is '%s'?", *argv);                                             \
			_res = false;                                                              \
		}                                                                                  \
		_res;                                                                              \
	})

#define HELP_SPEC_OPTIONS                                                                          \
	"OPTIONS := { {-j|--json} [{-p|--pretty}] | {-S|--socket PATH} | {-B|--bpffs DIR} |\n"     \
	"                    {-d|--debug}"

struct cmd {
	const char *cmd;
	int (*func)(int argc, char **argv);
};

extern const char *bin_name;
extern struct jsonw *json_wtr;
extern bool json_output;
extern bool pretty_output;
extern bool debug_output;
extern const char *ctl_socket;
extern const char *pin_root;
extern bool pin_root_given;
/* Where help goes: stdout when asked for, stderr after a usage error. */
extern FILE *help_out;

/*
 * Runs the row of cmds whose name argv[0] is a prefix of (the first such row: table order
 * decides between "session" and "socket"); no argv[0] runs the first row. A command returns 0,
 * a negative value (exit 1), or a positive exit status of its own (run).
 */
int cmd_select(const struct cmd *cmds, int argc, char **argv, int (*help)(int argc, char **argv));
bool is_prefix(const char *pfx, const char *str);

void p_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void p_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void p_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * One request to agentgated. Unreachable daemon or an error answer: reported through p_err,
 * NULL returned. The caller frees the response with ag_ctl_response_free().
 */
ag_ctl_response *ctl_request(const ag_ctl_request *req);
/* The same, for the requests that carry no argument (status, session_list, ...). */
ag_ctl_response *ctl_request_simple(Agentgate__Ctl__Request__CmdCase cmd);
/* Quiet variant: NULL when the daemon cannot be reached (reason in err), nothing printed. */
ag_ctl_response *ctl_request_quiet(Agentgate__Ctl__Request__CmdCase cmd, int timeout_ms, char *err,
				   size_t errlen);
/* resp as the others return it: NULL after reporting err (no resp) or the daemon's error. */
ag_ctl_response *ctl_checked(ag_ctl_response *resp, const char *err);
/*
 * What a change the daemon made did: its message (or fallback) on a line, or with -j an object
 * of what fields(resp, arg) writes (may be NULL) and "message".
 */
void print_change(const ag_ctl_response *resp, const char *fallback,
		  void (*fields)(const ag_ctl_response *resp, const void *arg), const void *arg);
/* A fields callback for print_change(): the field named arg, true. */
void json_flag_field(const ag_ctl_response *resp, const void *name);

/* Re-emits an already serialized JSON document through json_wtr (so -p pretty-prints it). */
int json_emit_document(const char *text, char *err, size_t errlen);

/* "512", "1.5K", "20.3M" */
char *fmt_bytes(uint64_t v, char *buf, size_t len);
/* A start time for a table: "03:16:57" today (local), "Nov21" before; "-" for 0. */
char *fmt_start(int64_t unix_ns, char *buf, size_t len);
/* Accepts a path inside the cgroup2 mount, absolute or relative to it; writes "/a/b". */
int parse_cgroup_arg(const char *arg, char *out, size_t len);

/* Aligned columns for the _plain printers; the last column is never padded. */
struct table;
struct table *table_new(const char *const *headers, int ncols);
void table_add(struct table *t, ...); /* ncols strings; NULL prints as "-" */
int table_rows(const struct table *t);
void table_print(const struct table *t, FILE *f);
void table_free(struct table *t);

int do_session(int argc, char **argv);
int do_approval(int argc, char **argv);
int do_cgroup(int argc, char **argv);
int do_policy(int argc, char **argv);
int do_prog(int argc, char **argv);
int do_run(int argc, char **argv);
int do_socket(int argc, char **argv);
int do_ca(int argc, char **argv);
int do_cred(int argc, char **argv);
int do_audit(int argc, char **argv);

/* audit.c: a session from the audit log (DIR NULL: the daemon's), and live sessions. */
int audit_replay(uint64_t id, const char *dir);
int audit_watch(uint64_t id);
