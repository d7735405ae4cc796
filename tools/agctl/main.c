// SPDX-License-Identifier: GPL-2.0
/*
 * agctl: the operators' CLI for agentgate, shaped after bpftool. `agctl [OPTIONS] OBJECT
 * {COMMAND | help}`; each object lives in its own file with a command table, prefixes of
 * objects and commands select the first matching row, and -j/-p switch every printer to the one
 * JSON writer. Most commands talk to agentgated over its control socket; `prog` and
 * `policy check` also work without it. Exit status: 0, or 1 with one error (`Error: ...` on
 * stderr, or {"error": "..."} on stdout with -j); `run` exits with its command's status.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <bpf/libbpf.h>
#include <yajl/yajl_tree.h>

#include "cgroup.h"
#include "main.h"
#include "pins.h"

#ifndef AG_VERSION
#define AG_VERSION "0.1"
#endif

const char *bin_name = "agctl";
struct jsonw *json_wtr;
bool json_output;
bool pretty_output;
bool debug_output;
const char *ctl_socket = AG_DEFAULT_SOCKET;
const char *pin_root = AG_DEFAULT_PIN_ROOT;
bool pin_root_given;
FILE *help_out;

/* "object" while the top-level table is being searched, "command" below it. */
static const char *select_what = "object";

bool is_prefix(const char *pfx, const char *str)
{
	size_t n;

	if (!pfx || !*pfx)
		return false;
	n = strlen(pfx);
	return strlen(str) >= n && !memcmp(str, pfx, n);
}

int cmd_select(const struct cmd *cmds, int argc, char **argv, int (*help)(int argc, char **argv))
{
	const char *what = select_what;
	unsigned int i;

	select_what = "command";
	if (argc < 1)
		return cmds[0].func(argc, argv);
	for (i = 0; cmds[i].cmd; i++) {
		if (is_prefix(argv[0], cmds[i].cmd))
			return cmds[i].func(argc - 1, argv + 1);
	}
	p_err("unknown %s '%s'", what, argv[0]);
	if (!json_output) {
		help_out = stderr;
		help(argc - 1, argv + 1);
	}
	return -1;
}

static void p_vprint(const char *prefix, const char *fmt, va_list ap)
{
	fprintf(stderr, "%s", prefix);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
}

void p_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	/* An error while the options are still being read comes before main creates the writer. */
	if (json_output && !json_wtr)
		json_wtr = jsonw_new(stdout, pretty_output);
	if (json_output && json_wtr) {
		char buf[2048];

		vsnprintf(buf, sizeof(buf), fmt, ap);
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "error", buf);
		jsonw_end_object(json_wtr);
	} else {
		p_vprint("Error: ", fmt, ap);
	}
	va_end(ap);
}

/* Notes that are not the result: never on stdout, so -j output stays one JSON value. */
void p_info(const char *fmt, ...)
{
	va_list ap;

	if (json_output)
		return;
	va_start(ap, fmt);
	p_vprint("", fmt, ap);
	va_end(ap);
}

void p_debug(const char *fmt, ...)
{
	va_list ap;

	if (!debug_output)
		return;
	va_start(ap, fmt);
	p_vprint("agctl: debug: ", fmt, ap);
	va_end(ap);
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	if (level == LIBBPF_DEBUG && !debug_output)
		return 0;
	return vfprintf(stderr, fmt, ap);
}

ag_ctl_response *ctl_checked(ag_ctl_response *resp, const char *err)
{
	if (!resp) {
		p_err("%s", err);
		return NULL;
	}
	if (resp->error && resp->error[0]) {
		p_err("%s", resp->error);
		ag_ctl_response_free(resp);
		return NULL;
	}
	return resp;
}

ag_ctl_response *ctl_request(const ag_ctl_request *req)
{
	char err[512];

	p_debug("request %d to %s", req->cmd_case, ctl_socket);
	return ctl_checked(ag_ctl_call(ctl_socket, req, 0, err, sizeof(err)), err);
}

ag_ctl_response *ctl_request_simple(Agentgate__Ctl__Request__CmdCase cmd)
{
	char err[512];

	p_debug("request %d to %s", cmd, ctl_socket);
	return ctl_checked(ag_ctl_call_simple(ctl_socket, cmd, 0, err, sizeof(err)), err);
}

void print_change(const ag_ctl_response *resp, const char *fallback,
		  void (*fields)(const ag_ctl_response *resp, const void *arg), const void *arg)
{
	const char *msg = resp->message && resp->message[0] ? resp->message : fallback;

	if (json_output) {
		jsonw_start_object(json_wtr);
		if (fields)
			fields(resp, arg);
		jsonw_string_field(json_wtr, "message", msg);
		jsonw_end_object(json_wtr);
	} else {
		printf("%s\n", msg);
	}
}

void json_flag_field(const ag_ctl_response *resp, const void *name)
{
	jsonw_bool_field(json_wtr, name, true);
}

ag_ctl_response *ctl_request_quiet(Agentgate__Ctl__Request__CmdCase cmd, int timeout_ms, char *err,
				   size_t errlen)
{
	return ag_ctl_call_simple(ctl_socket, cmd, timeout_ms, err, errlen);
}

static void json_emit_value(yajl_val v)
{
	size_t i;

	switch (v->type) {
	case yajl_t_string:
		jsonw_string(json_wtr, v->u.string);
		break;
	case yajl_t_number:
		/* The number as it was written, so 64-bit ids survive. */
		jsonw_raw(json_wtr, v->u.number.r);
		break;
	case yajl_t_object:
		jsonw_start_object(json_wtr);
		for (i = 0; i < v->u.object.len; i++) {
			jsonw_name(json_wtr, v->u.object.keys[i]);
			json_emit_value(v->u.object.values[i]);
		}
		jsonw_end_object(json_wtr);
		break;
	case yajl_t_array:
		jsonw_start_array(json_wtr);
		for (i = 0; i < v->u.array.len; i++)
			json_emit_value(v->u.array.values[i]);
		jsonw_end_array(json_wtr);
		break;
	case yajl_t_true:
		jsonw_bool(json_wtr, true);
		break;
	case yajl_t_false:
		jsonw_bool(json_wtr, false);
		break;
	default:
		jsonw_null(json_wtr);
		break;
	}
}

int json_emit_document(const char *text, char *err, size_t errlen)
{
	yajl_val v = yajl_tree_parse(text, err, errlen);

	if (!v)
		return -EINVAL;
	json_emit_value(v);
	yajl_tree_free(v);
	return 0;
}

char *fmt_bytes(uint64_t v, char *buf, size_t len)
{
	static const char units[] = "KMGTPE";
	double d = v;
	int u = -1;

	if (v < 1024) {
		snprintf(buf, len, "%llu", (unsigned long long)v);
		return buf;
	}
	while (d >= 1024 && u < (int)sizeof(units) - 2) {
		d /= 1024;
		u++;
	}
	snprintf(buf, len, d < 10 ? "%.1f%c" : "%.0f%c", d, units[u]);
	return buf;
}

char *fmt_start(int64_t unix_ns, char *buf, size_t len)
{
	time_t secs = unix_ns / 1000000000LL, now = time(NULL);
	struct tm tm, tm_now;

	if (!unix_ns) {
		snprintf(buf, len, "-");
		return buf;
	}
	localtime_r(&secs, &tm);
	localtime_r(&now, &tm_now);
	if (tm.tm_year == tm_now.tm_year && tm.tm_yday == tm_now.tm_yday)
		strftime(buf, len, "%H:%M:%S", &tm);
	else
		strftime(buf, len, "%b%d", &tm);
	return buf;
}

int parse_cgroup_arg(const char *arg, char *out, size_t len)
{
	char root[PATH_MAX];
	size_t rl;

	/* /sys/fs/cgroup/agents.slice (under the mount) stands for /agents.slice. */
	if (!ag_cgroup2_root(root, sizeof(root))) {
		rl = strlen(root);
		if (rl > 1 && !strncmp(arg, root, rl) && (arg[rl] == '/' || !arg[rl]))
			arg += rl;
	}
	return ag_cgroup_normalize(*arg ? arg : "/", out, len);
}

struct table {
	int ncols;
	int nrows; /* including the header row */
	int cap;
	char **cells;
};

struct table *table_new(const char *const *headers, int ncols)
{
	struct table *t = calloc(1, sizeof(*t));
	int i;

	if (!t)
		return NULL;
	t->ncols = ncols;
	t->cap = 16;
	t->cells = calloc((size_t)t->cap * ncols, sizeof(char *));
	if (!t->cells) {
		free(t);
		return NULL;
	}
	for (i = 0; i < ncols; i++)
		t->cells[i] = strdup(headers[i]);
	t->nrows = 1;
	return t;
}

void table_add(struct table *t, ...)
{
	va_list ap;
	int i;

	if (!t)
		return;
	if (t->nrows == t->cap) {
		char **cells = realloc(t->cells, (size_t)t->cap * 2 * t->ncols * sizeof(char *));

		if (!cells)
			return;
		t->cells = cells;
		t->cap *= 2;
	}
	va_start(ap, t);
	for (i = 0; i < t->ncols; i++) {
		const char *s = va_arg(ap, const char *);

		t->cells[(size_t)t->nrows * t->ncols + i] = strdup(s && *s ? s : "-");
	}
	va_end(ap);
	t->nrows++;
}

int table_rows(const struct table *t)
{
	return t ? t->nrows - 1 : 0;
}

void table_print(const struct table *t, FILE *f)
{
	int r, c, *w;

	if (!t)
		return;
	w = calloc(t->ncols, sizeof(int));
	if (!w)
		return;
	for (r = 0; r < t->nrows; r++) {
		for (c = 0; c < t->ncols; c++) {
			const char *s = t->cells[(size_t)r * t->ncols + c];
			int n = s ? (int)strlen(s) : 0;

			if (n > w[c])
				w[c] = n;
		}
	}
	for (r = 0; r < t->nrows; r++) {
		for (c = 0; c < t->ncols; c++) {
			const char *s = t->cells[(size_t)r * t->ncols + c];

			if (!s)
				s = "";
			if (c == t->ncols - 1)
				fprintf(f, "%s\n", s);
			else
				fprintf(f, "%-*s  ", w[c], s);
		}
	}
	free(w);
}

void table_free(struct table *t)
{
	int i;

	if (!t)
		return;
	for (i = 0; i < t->nrows * t->ncols; i++)
		free(t->cells[i]);
	free(t->cells);
	free(t);
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %s [OPTIONS] OBJECT { COMMAND | help }\n"
		"       %s version\n"
		"\n"
		"       OBJECT := { session | approval | cgroup | policy | prog | run | socket | ca | cred | audit }\n"
		"       " HELP_SPEC_OPTIONS " |\n"
		"                    {-V|--version} | {-h|--help} }\n"
		"\n"
		"Unique prefixes of objects and commands work (%s s l = %s session list);\n"
		"'%s OBJECT help' shows an object's commands.\n",
		bin_name, bin_name, bin_name, bin_name, bin_name);
	return 0;
}

static int do_version(int argc, char **argv)
{
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "version", AG_VERSION);
		jsonw_string_field(json_wtr, "libbpf_version", libbpf_version_string());
		jsonw_end_object(json_wtr);
	} else {
		printf("%s %s\n", bin_name, AG_VERSION);
	}
	return 0;
}

static const struct cmd cmds[] = {
	{ "help", do_help },
	{ "session", do_session },
	{ "approval", do_approval },
	{ "cgroup", do_cgroup },
	{ "policy", do_policy },
	{ "prog", do_prog },
	{ "run", do_run },
	{ "socket", do_socket },
	{ "ca", do_ca },
	{ "cred", do_cred },
	{ "audit", do_audit },
	{ "version", do_version },
	{ 0 }
};

enum { OPT_NOT_OURS = 0, OPT_TAKEN = 1, OPT_ERROR = -1 };

static bool want_version, want_help;

/* The global options: each has a letter; -S and -B (--socket, --bpffs) take a value. */
static const struct {
	const char *name;
	char letter;
} global_opts[] = {
	{ "json", 'j' },    { "pretty", 'p' }, { "debug", 'd' }, { "version", 'V' },
	{ "help", 'h' },    { "socket", 'S' }, { "bpffs", 'B' },
};

static bool takes_value(char letter)
{
	return letter == 'S' || letter == 'B';
}

static void set_option(char letter, const char *value)
{
	switch (letter) {
	case 'p':
		pretty_output = true;
		/* fallthrough */
	case 'j':
		json_output = true;
		break;
	case 'd':
		debug_output = true;
		break;
	case 'V':
		want_version = true;
		break;
	case 'h':
		want_help = true;
		break;
	case 'S':
		ctl_socket = value;
		break;
	case 'B':
		pin_root = value;
		pin_root_given = true;
		break;
	}
}

/* A value for -S/-B: the rest of the word, or the next word. */
static const char *opt_value(const char *rest, int argc, char **argv, int *i, const char *name)
{
	if (rest && *rest)
		return rest;
	if (*i + 1 >= argc) {
		p_err("option '%s' needs an argument", name);
		return NULL;
	}
	return argv[++*i];
}

static int long_option(const char *opt, int argc, char **argv, int *i)
{
	const char *eq = strchr(opt, '=');
	size_t n = eq ? (size_t)(eq - opt) : strlen(opt);
	const char *v = NULL;
	char name[16];
	unsigned int f;

	for (f = 0; f < ARRAY_SIZE(global_opts); f++)
		if (strlen(global_opts[f].name) == n && !strncmp(opt, global_opts[f].name, n))
			break;
	if (f == ARRAY_SIZE(global_opts))
		return OPT_NOT_OURS;
	snprintf(name, sizeof(name), "--%s", global_opts[f].name);
	if (takes_value(global_opts[f].letter)) {
		v = opt_value(eq ? eq + 1 : NULL, argc, argv, i, name);
		if (!v)
			return OPT_ERROR;
	} else if (eq) {
		p_err("option '%s' takes no argument", name);
		return OPT_ERROR;
	}
	set_option(global_opts[f].letter, v);
	return OPT_TAKEN;
}

static int short_options(const char *opts, int argc, char **argv, int *i)
{
	const char *p, *v;

	/* A cluster is ours only if every letter is (-jp); -S/-B end it with their value. */
	for (p = opts; *p; p++) {
		if (takes_value(*p))
			break;
		if (!strchr("jpdVh", *p))
			return OPT_NOT_OURS;
	}
	for (p = opts; *p; p++) {
		if (!takes_value(*p)) {
			set_option(*p, NULL);
			continue;
		}
		v = opt_value(p + 1, argc, argv, i, *p == 'S' ? "-S" : "-B");
		if (!v)
			return OPT_ERROR;
		set_option(*p, v);
		return OPT_TAKEN;
	}
	return OPT_TAKEN;
}

/*
 * Global options may stand anywhere before "--" (`agctl session list -j`), as bpftool's
 * permuting getopt allows. A word starting with '-' that is not a global option belongs to the
 * command (run --agent, socket list --bypass) and stays in place; before the object it is an
 * error. Returns the new argc, or -1 after reporting.
 */
static int parse_global_options(int argc, char **argv)
{
	bool seen_object = false;
	int i, out = 1, rc;

	for (i = 1; i < argc; i++) {
		char *a = argv[i];

		if (!strcmp(a, "--")) {
			while (i < argc)
				argv[out++] = argv[i++];
			break;
		}
		if (a[0] != '-' || !a[1]) {
			argv[out++] = a;
			seen_object = true;
			continue;
		}
		rc = a[1] == '-' ? long_option(a + 2, argc, argv, &i)
				 : short_options(a + 1, argc, argv, &i);
		if (rc == OPT_ERROR)
			return -1;
		if (rc == OPT_NOT_OURS) {
			if (!seen_object) {
				p_err("unrecognized option '%s'", a);
				return -1;
			}
			argv[out++] = a;
		}
	}
	argv[out] = NULL;
	return out;
}

int main(int argc, char **argv)
{
	int ret;

	help_out = stdout;
	setlinebuf(stdout);
	libbpf_set_print(libbpf_print);

	argc = parse_global_options(argc, argv);
	if (argc < 0) {
		ret = -1;
		goto out;
	}
	if (json_output && !json_wtr) {
		json_wtr = jsonw_new(stdout, pretty_output);
		if (!json_wtr) {
			json_output = false;
			p_err("failed to create the JSON writer");
			return 1;
		}
	}
	argc--;
	argv++;

	if (want_version)
		ret = do_version(argc, argv);
	else if (want_help)
		ret = do_help(argc, argv);
	else
		ret = cmd_select(cmds, argc, argv, do_help);
out:
	jsonw_destroy(&json_wtr);
	return ret < 0 ? 1 : ret;
}
