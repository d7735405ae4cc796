// SPDX-License-Identifier: GPL-2.0
/*
 * agctl policy: `show` prints the daemon's active policy (its file's text, or with -j the
 * policy as JSON), `reload` asks the daemon to re-read its file (refused whole if bad, as
 * SIGHUP), and `check FILE` validates a file locally with the daemon's own parser, so it works
 * on a machine where no daemon runs (CI, a pre-commit hook). `explain FILE --agent A --target T
 * --sql TEXT` runs the daemon's classifier and decision on TEXT, locally too: per statement its
 * classes, tables, WHERE and the rule that decides, and why.
 */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "explain_http.h"
#include "main.h"
#include "cred.h"
#include "policy.h"
#include "sql.h"

static int do_show(int argc, char **argv)
{
	ag_ctl_response *resp, *status = NULL;
	const char *src;
	char err[256];
	size_t n;
	int ret = 0;

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_POLICY_SHOW);
	if (!resp)
		return -1;
	if (json_output) {
		if (!resp->policy_json || !resp->policy_json[0]) {
			p_err("agentgated sent no policy");
			ret = -1;
		} else if (json_emit_document(resp->policy_json, err, sizeof(err))) {
			p_err("agentgated sent a policy that is not valid JSON: %s", err);
			ret = -1;
		}
	} else {
		/* The path is in the status; as a YAML comment, the output stays loadable. */
		status = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_STATUS);
		if (status && status->status && status->status->policy_file[0])
			printf("# %s\n", status->status->policy_file);
		src = resp->policy_source ? resp->policy_source : "";
		n = strlen(src);
		fwrite(src, 1, n, stdout);
		if (n && src[n - 1] != '\n')
			putchar('\n');
	}
	ag_ctl_response_free(status);
	ag_ctl_response_free(resp);
	return ret;
}

static int do_check(int argc, char **argv)
{
	struct ag_policy *p;
	const char *file;
	char err[1024];

	if (!REQ_ARGS(1))
		return -1;
	file = GET_ARG();
	if (!NO_MORE_ARGS())
		return -1;

	err[0] = '\0';
	p = ag_policy_load(file, err, sizeof(err));
	if (!p) {
		/* The parser's line already names FILE:LINE:COL. */
		p_err("%s", err[0] ? err : "policy refused");
		return -1;
	}
	{
		/* Secret and key files: what the daemon would refuse (owner, mode). */
		char warn[1024];

		if (ag_cred_check_policy(p, err, sizeof(err), warn, sizeof(warn))) {
			p_err("%s", err);
			ag_policy_free(p);
			return -1;
		}
		if (warn[0])
			fprintf(stderr, "Warning: %s\n", warn);
	}
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "file", file);
		jsonw_bool_field(json_wtr, "ok", true);
		jsonw_uint_field(json_wtr, "agents", p->nagents);
		jsonw_uint_field(json_wtr, "targets", p->ntargets);
		jsonw_uint_field(json_wtr, "rules", p->nrules);
		jsonw_end_object(json_wtr);
	} else {
		printf("%s: ok (%zu agent%s, %zu target%s, %zu rule%s)\n", file, p->nagents,
		       p->nagents == 1 ? "" : "s", p->ntargets, p->ntargets == 1 ? "" : "s",
		       p->nrules, p->nrules == 1 ? "" : "s");
	}
	ag_policy_free(p);
	return 0;
}

/* The text of statement s, without the whitespace around it. */
static const char *stmt_text(const char *sql, const struct ag_sql_stmt *s, size_t *len)
{
	size_t total = strlen(sql), off = s->location > 0 ? (size_t)s->location : 0, n;

	if (off > total)
		off = total;
	n = s->length > 0 ? (size_t)s->length : total - off;
	if (n > total - off)
		n = total - off;
	while (n && isspace((unsigned char)sql[off])) {
		off++;
		n--;
	}
	while (n && isspace((unsigned char)sql[off + n - 1]))
		n--;
	*len = n;
	return sql + off;
}

/* One line for a plain listing: runs of whitespace (newlines too) become one space. */
static void print_oneline(const char *s, size_t n)
{
	bool space = false;

	for (size_t i = 0; i < n; i++) {
		if (isspace((unsigned char)s[i])) {
			space = true;
			continue;
		}
		if (space)
			putchar(' ');
		space = false;
		putchar(s[i]);
	}
}

/*
 * EXECUTE of a statement PREPAREd earlier in the same string is decided as that statement, as
 * the daemon does with the statements a session prepared. Its tables are the prepared ones
 * (pointing into the same result); an EXECUTE whose parameters name tables of their own keeps
 * those and is marked with the prepared classes only.
 */
static void resolve_execute(struct ag_sql_result *r)
{
	for (size_t i = 0; i < r->nstmts; i++) {
		struct ag_sql_stmt *e = &r->stmts[i];

		if (!e->execute_name)
			continue;
		for (size_t j = i; j-- > 0;) {
			const struct ag_sql_stmt *pr = &r->stmts[j];

			if (!pr->prepare_name || strcmp(pr->prepare_name, e->execute_name))
				continue;
			e->classes |= pr->classes & ~(uint64_t)AG_SQL_PREPARE;
			e->where_absent |= pr->where_absent;
			if (!e->ntables) {
				e->tables = pr->tables;
				e->ntables = pr->ntables;
			}
			break;
		}
	}
}

static void names_list(const struct ag_policy *p, bool agents, char *buf, size_t len)
{
	size_t n = agents ? p->nagents : p->ntargets, o = 0;

	buf[0] = '\0';
	for (size_t i = 0; i < n && o < len; i++)
		o += snprintf(buf + o, len - o, "%s%s", i ? ", " : "",
			      agents ? p->agents[i].name : p->targets[i].name);
	if (!n)
		snprintf(buf, len, "none");
}

static void explain_json(const char *sql, const struct ag_sql_result *r,
			 const struct ag_sql_decision *ds, const struct ag_sql_decision *d,
			 const char *agent, const char *target, enum ag_agent_mode mode)
{
	char *text;
	size_t n;

	jsonw_start_object(json_wtr);
	jsonw_string_field(json_wtr, "agent", agent);
	jsonw_string_field(json_wtr, "target", target);
	jsonw_string_field(json_wtr, "mode", ag_mode_name(mode));
	jsonw_string_field(json_wtr, "decision", ag_action_name(d->action));
	jsonw_string_field(json_wtr, "rule", d->rule);
	jsonw_string_field(json_wtr, "why", d->why);
	jsonw_uint_field(json_wtr, "statement", d->stmt);
	jsonw_name(json_wtr, "statements");
	jsonw_start_array(json_wtr);
	for (size_t i = 0; i < r->nstmts; i++) {
		const struct ag_sql_stmt *s = &r->stmts[i];
		const char *t = stmt_text(sql, s, &n);

		jsonw_start_object(json_wtr);
		text = strndup(t, n);
		jsonw_string_field(json_wtr, "sql", text ? text : "");
		free(text);
		jsonw_name(json_wtr, "classes");
		jsonw_start_array(json_wtr);
		for (int b = 0; b < AG_SQL_NCLASSES; b++)
			if (s->classes & (1ULL << b))
				jsonw_string(json_wtr, ag_sql_command_names[b]);
		jsonw_end_array(json_wtr);
		jsonw_name(json_wtr, "tables");
		jsonw_start_array(json_wtr);
		for (size_t k = 0; k < s->ntables; k++)
			jsonw_string(json_wtr, s->tables[k]);
		jsonw_end_array(json_wtr);
		jsonw_bool_field(json_wtr, "where_absent", s->where_absent);
		if (s->execute_name)
			jsonw_string_field(json_wtr, "execute_name", s->execute_name);
		if (s->prepare_name)
			jsonw_string_field(json_wtr, "prepare_name", s->prepare_name);
		jsonw_string_field(json_wtr, "decision", ag_action_name(ds[i].action));
		jsonw_string_field(json_wtr, "rule", ds[i].rule);
		jsonw_string_field(json_wtr, "why", ds[i].why);
		jsonw_end_object(json_wtr);
	}
	jsonw_end_array(json_wtr);
	jsonw_end_object(json_wtr);
}

static void explain_plain(const char *sql, const struct ag_sql_result *r,
			  const struct ag_sql_decision *ds, const struct ag_sql_decision *d,
			  const char *agent, const char *target, enum ag_agent_mode mode)
{
	char classes[512];
	size_t n;

	printf("%s by rule %s", ag_action_name(d->action), d->rule);
	if (r->nstmts > 1)
		printf(" (statement %zu of %zu)", d->stmt + 1, r->nstmts);
	printf(": %s\n", d->why);
	printf("agent %s, target %s%s\n", agent, target,
	       mode == AG_MODE_OBSERVE ? " (observe mode: decided and recorded, never blocked)"
				       : "");
	for (size_t i = 0; i < r->nstmts; i++) {
		const struct ag_sql_stmt *s = &r->stmts[i];
		const char *t = stmt_text(sql, s, &n), *where = "-";

		/* WHERE only means something for an UPDATE or DELETE. */
		if (s->where_absent)
			where = "absent";
		else if (s->classes & (AG_SQL_UPDATE | AG_SQL_DELETE))
			where = "present";
		printf("\nstatement %zu: ", i + 1);
		if (n)
			print_oneline(t, n);
		else
			printf("(empty)");
		printf("\n  classes:  %s\n  tables:   ",
		       ag_sql_class_names(s->classes, classes, sizeof(classes)));
		for (size_t k = 0; k < s->ntables; k++)
			printf("%s%s", k ? ", " : "", s->tables[k]);
		printf("%s\n  where:    %s\n", s->ntables ? "" : "-", where);
		if (s->prepare_name)
			printf("  prepares: %s\n", s->prepare_name);
		if (s->execute_name)
			printf("  executes: %s\n", s->execute_name);
		printf("  decision: %s by rule %s: %s\n", ag_action_name(ds[i].action), ds[i].rule,
		       ds[i].why);
	}
}

static int do_explain(int argc, char **argv)
{
	const char *file = NULL, *agent = NULL, *target = NULL, *sql = NULL, *http = NULL;
	const struct ag_policy_agent *a;
	const struct ag_policy_target *t;
	struct ag_sql_decision d, *ds = NULL;
	struct ag_sql_result r = { 0 };
	struct ag_policy *p;
	char err[1024];
	int ret = -1;

	while (argc) {
		const char **opt = NULL;

		if (!strcmp(*argv, "--agent"))
			opt = &agent;
		else if (!strcmp(*argv, "--target"))
			opt = &target;
		else if (!strcmp(*argv, "--sql"))
			opt = &sql;
		else if (!strcmp(*argv, "--http"))
			opt = &http;
		if (opt) {
			NEXT_ARG();
			if (!REQ_ARGS(1))
				return -1;
			*opt = GET_ARG();
		} else if (!file) {
			file = GET_ARG();
		} else {
			return BAD_ARG();
		}
	}
	if (!file || !agent || !target || !sql == !http) {
		p_err("explain needs FILE --agent NAME --target NAME { --sql TEXT | --http "
		      "\"METHOD PATH\" }");
		return -1;
	}

	err[0] = '\0';
	p = ag_policy_load(file, err, sizeof(err));
	if (!p) {
		p_err("%s", err[0] ? err : "policy refused");
		return -1;
	}
	a = ag_policy_agent_by_name(p, agent);
	t = ag_policy_target_by_name(p, target);
	if (!a) {
		names_list(p, true, err, sizeof(err));
		p_err("%s has no agent \"%s\" (agents: %s)", file, agent, err);
		goto out;
	}
	if (!t) {
		names_list(p, false, err, sizeof(err));
		p_err("%s has no target \"%s\" (targets: %s)", file, target, err);
		goto out;
	}
	if (http && t->protocol == AG_PROTO_HTTP) {
		ret = agctl_explain_http(p, agent, t, a->mode, http);
		goto out;
	}
	if (http) {
		p_err("target \"%s\" is %s: --http needs an http target", target,
		      ag_proto_name(t->protocol));
		goto out;
	}
	if (t->protocol != AG_PROTO_POSTGRES) {
		p_err("target \"%s\" is %s: --sql needs a postgres target", target,
		      ag_proto_name(t->protocol));
		goto out;
	}

	switch (ag_sql_classify(sql, &r)) {
	case 0:
		break;
	case -EINVAL:
		if (r.error_pos > 0)
			p_err("the SQL does not parse: %s at position %d", r.error, r.error_pos);
		else
			p_err("the SQL does not parse: %s", r.error);
		goto out;
	default:
		p_err("cannot classify the SQL: %s", strerror(ENOMEM));
		goto out;
	}
	ds = calloc(r.nstmts, sizeof(*ds));
	if (!ds) {
		p_err("cannot classify the SQL: %s", strerror(ENOMEM));
		goto out;
	}
	resolve_execute(&r);
	for (size_t i = 0; i < r.nstmts; i++)
		ag_sql_decide_stmt(ag_sql_rule_for(p, agent, target), &r.stmts[i], &ds[i]);
	ag_sql_decide(ag_sql_rule_for(p, agent, target), &r, &d);

	if (json_output)
		explain_json(sql, &r, ds, &d, agent, target, a->mode);
	else
		explain_plain(sql, &r, ds, &d, agent, target, a->mode);
	ret = 0;
out:
	free(ds);
	ag_sql_result_free(&r);
	ag_policy_free(p);
	return ret;
}

static int do_reload(int argc, char **argv)
{
	ag_ctl_response *resp;

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_POLICY_RELOAD);
	if (!resp)
		return -1;
	print_change(resp, "policy reloaded", json_flag_field, "reloaded");
	ag_ctl_response_free(resp);
	return 0;
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %1$s %2$s { show | list }\n"
		"       %1$s %2$s check FILE\n"
		"       %1$s %2$s reload\n"
		"       %1$s %2$s explain FILE --agent NAME --target NAME --sql TEXT\n"
		"       %1$s %2$s explain FILE --agent NAME --target NAME --http \"METHOD PATH\"\n"
		"       %1$s %2$s help\n"
		"\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "policy");
	return 0;
}

static const struct cmd cmds[] = {
	{ "show", do_show },
	{ "list", do_show },
	{ "check", do_check },
	{ "reload", do_reload },
	{ "explain", do_explain },
	{ "help", do_help },
	{ 0 }
};

int do_policy(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
