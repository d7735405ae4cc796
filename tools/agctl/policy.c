// SPDX-License-Identifier: GPL-2.0
/*
 * agctl policy: `show` prints the daemon's active policy (its file's text, or with -j the
 * policy as JSON), `reload` asks the daemon to re-read its file (refused whole if bad, as
 * SIGHUP), and `check FILE` validates a file locally with the daemon's own parser, so it works
 * on a machine where no daemon runs (CI, a pre-commit hook).
 */
#include <string.h>

#include "main.h"
#include "policy.h"

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

static int do_reload(int argc, char **argv)
{
	ag_ctl_response *resp;
	const char *msg;

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_POLICY_RELOAD);
	if (!resp)
		return -1;
	msg = resp->message && resp->message[0] ? resp->message : "policy reloaded";
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_bool_field(json_wtr, "reloaded", true);
		jsonw_string_field(json_wtr, "message", msg);
		jsonw_end_object(json_wtr);
	} else {
		printf("%s\n", msg);
	}
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
	{ "help", do_help },
	{ 0 }
};

int do_policy(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
