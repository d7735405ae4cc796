// SPDX-License-Identifier: GPL-2.0
/*
 * agctl ca: the gateway's CA certificate, the one that signs the leaves agents see when the
 * gateway terminates their TLS. A platform team installs it in a runner's trust store
 * (scripts/install-ca.sh for Debian's). Only the certificate ever leaves the daemon.
 */
#include <stdio.h>
#include <string.h>

#include "main.h"

static int do_show(int argc, char **argv)
{
	ag_ctl_response *resp;
	const Agentgate__Ctl__CaInfo *ca;
	int ret = 0;

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_CA_SHOW);
	if (!resp)
		return -1;
	ca = resp->ca;
	if (!ca || !ca->pem || !ca->pem[0]) {
		p_err("agentgated sent no CA certificate");
		ret = -1;
	} else if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "subject", ca->subject);
		jsonw_string_field(json_wtr, "not_after", ca->not_after);
		jsonw_string_field(json_wtr, "sha256", ca->sha256);
		jsonw_string_field(json_wtr, "pem", ca->pem);
		jsonw_end_object(json_wtr);
	} else {
		/* The PEM alone on stdout: `agctl ca show > agentgate.crt` is the install step. */
		fputs(ca->pem, stdout);
	}
	ag_ctl_response_free(resp);
	return ret;
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %1$s %2$s { show | help }\n"
		"\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "ca");
	return 0;
}

static const struct cmd cmds[] = {
	{ "show", do_show },
	{ "help", do_help },
	{ 0 }
};

int do_ca(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
