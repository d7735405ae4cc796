// SPDX-License-Identifier: GPL-2.0
/*
 * agctl cgroup: which cgroups agentgated intercepts. `list` shows the tagged cgroups (from the
 * policy or tagged at run time) and whether the hooks are attached; `tag PATH agent NAME` and
 * `untag PATH` change the runtime set through the daemon, which owns every attach and detach.
 */
#include <inttypes.h>
#include <limits.h>
#include <string.h>

#include "main.h"

static void cgroup_json(const Agentgate__Ctl__CgroupTag *c)
{
	jsonw_start_object(json_wtr);
	jsonw_string_field(json_wtr, "path", c->path);
	jsonw_string_field(json_wtr, "agent", c->agent);
	jsonw_uint_field(json_wtr, "id", c->id);
	jsonw_string_field(json_wtr, "source", c->source);
	jsonw_bool_field(json_wtr, "attached", c->attached);
	jsonw_end_object(json_wtr);
}

static void cgroups_plain(Agentgate__Ctl__CgroupTag **cs, size_t n)
{
	static const char *const hdr[] = { "PATH", "AGENT", "ID", "SOURCE", "ATTACHED" };
	struct table *t = table_new(hdr, ARRAY_SIZE(hdr));
	size_t i;

	for (i = 0; i < n; i++) {
		char id[24];

		snprintf(id, sizeof(id), "%" PRIu64, cs[i]->id);
		table_add(t, cs[i]->path, cs[i]->agent, id, cs[i]->source,
			  cs[i]->attached ? "yes" : "no");
	}
	table_print(t, stdout);
	table_free(t);
}

static int do_list(int argc, char **argv)
{
	ag_ctl_response *resp;
	size_t i;

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_CGROUP_LIST);
	if (!resp)
		return -1;
	if (json_output) {
		jsonw_start_array(json_wtr);
		for (i = 0; i < resp->n_cgroups; i++)
			cgroup_json(resp->cgroups[i]);
		jsonw_end_array(json_wtr);
	} else {
		cgroups_plain(resp->cgroups, resp->n_cgroups);
	}
	ag_ctl_response_free(resp);
	return 0;
}

struct tag_result {
	const char *path;
	const char *agent; /* NULL for untag */
};

/* What tag/untag did, with -j (print_change() adds the message). */
static void tag_fields(const ag_ctl_response *resp, const void *arg)
{
	const struct tag_result *r = arg;

	jsonw_string_field(json_wtr, "path", r->path);
	if (r->agent)
		jsonw_string_field(json_wtr, "agent", r->agent);
	if (resp->n_cgroups) {
		jsonw_uint_field(json_wtr, "id", resp->cgroups[0]->id);
		jsonw_bool_field(json_wtr, "attached", resp->cgroups[0]->attached);
	}
}

static int do_tag(int argc, char **argv)
{
	Agentgate__Ctl__CgroupTag tag = AGENTGATE__CTL__CGROUP_TAG__INIT;
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	char path[PATH_MAX], msg[PATH_MAX + 128];
	ag_ctl_response *resp;
	const char *agent;

	if (!REQ_ARGS(3))
		return -1;
	if (parse_cgroup_arg(*argv, path, sizeof(path))) {
		p_err("invalid cgroup path '%s'", *argv);
		return -1;
	}
	NEXT_ARG();
	if (!is_prefix(*argv, "agent"))
		return BAD_ARG();
	NEXT_ARG();
	agent = GET_ARG();
	if (!NO_MORE_ARGS())
		return -1;
	if (!strcmp(path, "/")) {
		p_err("refusing to tag the root cgroup (every process on the host would be "
		      "intercepted)");
		return -1;
	}

	tag.path = path;
	tag.agent = (char *)agent;
	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_CGROUP_TAG;
	req.cgroup_tag = &tag;
	resp = ctl_request(&req);
	if (!resp)
		return -1;
	snprintf(msg, sizeof(msg), "tagged %s for agent %s", path, agent);
	print_change(resp, msg, tag_fields, &(struct tag_result){ path, agent });
	ag_ctl_response_free(resp);
	return 0;
}

static int do_untag(int argc, char **argv)
{
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	char path[PATH_MAX], msg[PATH_MAX + 32];
	ag_ctl_response *resp;

	if (!REQ_ARGS(1))
		return -1;
	if (parse_cgroup_arg(*argv, path, sizeof(path))) {
		p_err("invalid cgroup path '%s'", *argv);
		return -1;
	}
	NEXT_ARG();
	if (!NO_MORE_ARGS())
		return -1;

	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_CGROUP_UNTAG;
	req.cgroup_untag = path;
	resp = ctl_request(&req);
	if (!resp)
		return -1;
	snprintf(msg, sizeof(msg), "untagged %s", path);
	print_change(resp, msg, tag_fields, &(struct tag_result){ path, NULL });
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
		"       %1$s %2$s tag PATH agent NAME\n"
		"       %1$s %2$s untag PATH\n"
		"       %1$s %2$s help\n"
		"\n"
		"       PATH := cgroup v2 path, relative to the cgroup2 mount "
		"(/agents.slice/job-42)\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "cgroup");
	return 0;
}

static const struct cmd cmds[] = {
	{ "list", do_list },
	{ "show", do_list },
	{ "tag", do_tag },
	{ "untag", do_untag },
	{ "help", do_help },
	{ 0 }
};

int do_cgroup(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
