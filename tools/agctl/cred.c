// SPDX-License-Identifier: GPL-2.0
/*
 * agctl cred: the credentials the daemon minted or injects for live sessions — which session
 * and target, the provider, the principal (role name, JWT subject, static user), when it was
 * issued and when it expires, and its state. Never the secret: the daemon does not send one.
 */
#include <inttypes.h>
#include <stdio.h>

#include "main.h"

static void cred_json(const Agentgate__Ctl__Credential *c)
{
	jsonw_start_object(json_wtr);
	jsonw_uint_field(json_wtr, "session", c->session);
	jsonw_string_field(json_wtr, "target", c->target);
	jsonw_string_field(json_wtr, "provider", c->provider);
	if (c->principal && c->principal[0])
		jsonw_string_field(json_wtr, "principal", c->principal);
	else
		jsonw_null_field(json_wtr, "principal");
	jsonw_time_field(json_wtr, "issued_at", c->issued_at_ns);
	if (c->expires_at_ns)
		jsonw_time_field(json_wtr, "expires_at", c->expires_at_ns);
	else
		jsonw_null_field(json_wtr, "expires_at");
	jsonw_string_field(json_wtr, "state", c->state);
	jsonw_end_object(json_wtr);
}

static int do_list(int argc, char **argv)
{
	static const char *const hdr[] = { "SESSION", "TARGET",	 "PROVIDER", "PRINCIPAL",
					   "ISSUED",  "EXPIRES", "STATE" };
	ag_ctl_response *resp;
	struct table *t;

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_CRED_LIST);
	if (!resp)
		return -1;
	if (json_output) {
		jsonw_start_array(json_wtr);
		for (size_t i = 0; i < resp->n_credentials; i++)
			cred_json(resp->credentials[i]);
		jsonw_end_array(json_wtr);
		ag_ctl_response_free(resp);
		return 0;
	}
	t = table_new(hdr, ARRAY_SIZE(hdr));
	for (size_t i = 0; i < resp->n_credentials; i++) {
		const Agentgate__Ctl__Credential *c = resp->credentials[i];
		char id[24], issued[64], expires[64];

		snprintf(id, sizeof(id), "%" PRIu64, c->session);
		ag_format_time(c->issued_at_ns, issued, sizeof(issued));
		if (c->expires_at_ns)
			ag_format_time(c->expires_at_ns, expires, sizeof(expires));
		else
			snprintf(expires, sizeof(expires), "never (static)");
		table_add(t, id, c->target, c->provider, c->principal, issued, expires, c->state);
	}
	table_print(t, stdout);
	table_free(t);
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
		"Usage: %1$s %2$s { list | show }\n"
		"       %1$s %2$s help\n"
		"\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "cred");
	return 0;
}

static const struct cmd cmds[] = {
	{ "list", do_list },
	{ "show", do_list },
	{ "help", do_help },
	{ 0 }
};

int do_cred(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
