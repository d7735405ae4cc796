// SPDX-License-Identifier: GPL-2.0
/*
 * agctl run: runs a command as an agent, in a fresh cgroup that agentgated intercepts. If the
 * agent's policy entry names a cgroup, the command gets a child of it (`<cgroup>/run-<pid>`,
 * which inherits the attached hooks); otherwise agctl creates /agentgate.slice/run/<agent>-<pid>
 * and has the daemon tag it for the run's duration. The child is moved into the cgroup before it
 * execs, so not one of its connects escapes; when it exits, whatever it left running in the
 * cgroup is killed (leftovers must not outlive the tag), the tag is dropped and the cgroup
 * removed, and agctl exits with the command's status (128+N if killed by signal N).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
#include <yajl/yajl_tree.h>

#include "cgroup.h"
#include "main.h"

#define RUN_SLICE "/agentgate.slice/run"

struct run_ctx {
	const char *agent;
	char agent_buf[256];
	char agent_cgroup[PATH_MAX]; /* from the policy, "" if none */
	char cgroot[PATH_MAX];
	char rel[PATH_MAX];
	bool created;
	bool tagged;
};

static volatile sig_atomic_t child_pid;
static const int fwd_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT };

static void forward_signal(int sig, siginfo_t *si, void *uc)
{
	/* A terminal's ^C already reached the child: it shares our process group. */
	if (si && si->si_code == SI_KERNEL)
		return;
	if (child_pid > 0)
		kill(child_pid, sig);
}

/*
 * The agent to run as and its cgroup, from the daemon's policy (as JSON): the one named, or the
 * policy's first agent.
 */
static int pick_agent(struct run_ctx *ctx, const char *policy_json)
{
	static const char *agents_path[] = { "agents", NULL };
	static const char *name_path[] = { "name", NULL };
	static const char *cgroup_path[] = { "cgroup", NULL };
	char err[256], names[512] = "";
	yajl_val root, agents;
	int ret = -1;
	size_t i;

	root = yajl_tree_parse(policy_json, err, sizeof(err));
	if (!root) {
		p_err("agentgated sent a policy that is not valid JSON: %s", err);
		return -1;
	}
	agents = yajl_tree_get(root, agents_path, yajl_t_array);
	if (!agents || !YAJL_GET_ARRAY(agents)->len) {
		p_err("the active policy defines no agents");
		goto out;
	}
	for (i = 0; i < YAJL_GET_ARRAY(agents)->len; i++) {
		yajl_val a = YAJL_GET_ARRAY(agents)->values[i];
		yajl_val name_v = yajl_tree_get(a, name_path, yajl_t_string);
		yajl_val cg_v = yajl_tree_get(a, cgroup_path, yajl_t_string);
		const char *name, *cg;
		size_t nl = strlen(names);

		if (!name_v)
			continue;
		name = name_v->u.string;
		cg = cg_v ? cg_v->u.string : "";
		snprintf(names + nl, sizeof(names) - nl, "%s%s", nl ? ", " : "", name);
		if (ctx->agent && strcmp(ctx->agent, name))
			continue;
		if (!ctx->agent) {
			snprintf(ctx->agent_buf, sizeof(ctx->agent_buf), "%s", name);
			ctx->agent = ctx->agent_buf;
		}
		if (cg[0] &&
		    ag_cgroup_normalize(cg, ctx->agent_cgroup, sizeof(ctx->agent_cgroup))) {
			p_err("agent %s has an invalid cgroup '%s'", ctx->agent, cg);
			goto out;
		}
		ret = 0;
		goto out;
	}
	p_err("unknown agent '%s' (the policy has: %s)", ctx->agent, names);
out:
	yajl_tree_free(root);
	return ret;
}

/* Fail closed: a run in an agent's cgroup is only as good as the hooks on that cgroup. */
static int check_attached(const char *path, const char *agent)
{
	ag_ctl_response *resp;
	int ret = -1;
	size_t i;

	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_CGROUP_LIST);
	if (!resp)
		return -1;
	for (i = 0; i < resp->n_cgroups; i++) {
		if (strcmp(resp->cgroups[i]->path, path))
			continue;
		if (resp->cgroups[i]->attached)
			ret = 0;
		break;
	}
	if (ret)
		p_err("cgroup %s of agent %s is not %s by agentgated: refusing to run "
		      "unintercepted",
		      path, agent, i < resp->n_cgroups ? "attached" : "tagged");
	ag_ctl_response_free(resp);
	return ret;
}

static int tag_call(const char *path, const char *agent, char *err, size_t errlen)
{
	ag_ctl_response *resp = ag_ctl_call_tag(ctl_socket, path, agent, 0, err, errlen);
	int ret = 0;

	if (!resp)
		return -1;
	if (resp->error && resp->error[0]) {
		snprintf(err, errlen, "%s", resp->error);
		ret = -1;
	} else if (agent && resp->n_cgroups && !resp->cgroups[0]->attached) {
		snprintf(err, errlen, "agentgated tagged %s but did not attach its hooks", path);
		ret = -1;
	}
	ag_ctl_response_free(resp);
	return ret;
}

static void sanitize(char *s)
{
	for (; *s; s++) {
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
		      (*s >= '0' && *s <= '9') || *s == '-' || *s == '_' || *s == '.'))
			*s = '_';
	}
}

static int setup_cgroup(struct run_ctx *ctx)
{
	char path[PATH_MAX + 64], name[NAME_MAX + 1], err[512];
	int rc;

	if (ag_cgroup2_root(ctx->cgroot, sizeof(ctx->cgroot))) {
		p_err("no cgroup2 filesystem is mounted");
		return -1;
	}
	if (ctx->agent_cgroup[0]) {
		if (check_attached(ctx->agent_cgroup, ctx->agent))
			return -1;
		snprintf(path, sizeof(path), "%s/run-%d", ctx->agent_cgroup, getpid());
	} else {
		snprintf(name, sizeof(name), "%s-%d", ctx->agent, getpid());
		sanitize(name);
		snprintf(path, sizeof(path), RUN_SLICE "/%s", name);
	}
	if (ag_cgroup_normalize(path, ctx->rel, sizeof(ctx->rel))) {
		p_err("cgroup path too long: %s", path);
		return -1;
	}
	rc = ag_cgroup_create(ctx->cgroot, ctx->rel);
	if (rc) {
		p_err("creating cgroup %s: %s", ctx->rel, strerror(-rc));
		return -1;
	}
	ctx->created = true;
	p_debug("running as agent %s in cgroup %s", ctx->agent, ctx->rel);
	if (ctx->agent_cgroup[0])
		return 0;
	if (tag_call(ctx->rel, ctx->agent, err, sizeof(err))) {
		p_err("tagging %s for agent %s: %s", ctx->rel, ctx->agent, err);
		return -1;
	}
	ctx->tagged = true;
	return 0;
}

static bool cgroup_populated(const struct run_ctx *ctx)
{
	char path[PATH_MAX * 2], line[64];
	bool populated = false;
	FILE *f;

	snprintf(path, sizeof(path), "%s%s/cgroup.events", ctx->cgroot, ctx->rel);
	f = fopen(path, "re");
	if (!f)
		return false;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, "populated ", 10))
			populated = line[10] == '1';
	}
	fclose(f);
	return populated;
}

/* Whatever the command left behind goes with it (cgroup.kill, or one SIGKILL each). */
static void kill_leftovers(const struct run_ctx *ctx)
{
	char path[PATH_MAX * 2], line[32];
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	int fd, i;
	FILE *f;

	if (!cgroup_populated(ctx))
		return;
	p_debug("killing what is left in %s", ctx->rel);
	snprintf(path, sizeof(path), "%s%s/cgroup.kill", ctx->cgroot, ctx->rel);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (write(fd, "1", 1) < 0)
			p_debug("cgroup.kill: %s", strerror(errno));
		close(fd);
	} else {
		snprintf(path, sizeof(path), "%s%s/cgroup.procs", ctx->cgroot, ctx->rel);
		f = fopen(path, "re");
		while (f && fgets(line, sizeof(line), f))
			kill(atoi(line), SIGKILL);
		if (f)
			fclose(f);
	}
	for (i = 0; i < 200 && cgroup_populated(ctx); i++)
		nanosleep(&ts, NULL);
}

static void teardown(struct run_ctx *ctx)
{
	char err[512];
	int rc;

	if (!ctx->created)
		return;
	kill_leftovers(ctx);
	if (ctx->tagged && tag_call(ctx->rel, NULL, err, sizeof(err)))
		fprintf(stderr, "Warning: untagging %s: %s\n", ctx->rel, err);
	rc = ag_cgroup_destroy(ctx->cgroot, ctx->rel);
	if (rc)
		fprintf(stderr, "Warning: removing cgroup %s: %s\n", ctx->rel, strerror(-rc));
}

static void set_signals(bool forward)
{
	struct sigaction sa = {};
	unsigned int i;

	if (forward) {
		sa.sa_sigaction = forward_signal;
		sa.sa_flags = SA_SIGINFO;
	} else {
		sa.sa_handler = SIG_DFL;
	}
	sigemptyset(&sa.sa_mask);
	for (i = 0; i < ARRAY_SIZE(fwd_signals); i++)
		sigaction(fwd_signals[i], &sa, NULL);
}

static ssize_t read_full(int fd, void *buf, size_t len)
{
	ssize_t n;

	do {
		n = read(fd, buf, len);
	} while (n < 0 && errno == EINTR);
	return n;
}

static int wait_child(pid_t pid)
{
	int status;

	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return 1;
}

/*
 * fork, move the child into the cgroup, let it exec. The child waits on `go` until it is in
 * place; `ex` (close-on-exec) carries errno back if exec fails.
 */
static int run_child(struct run_ctx *ctx, char **cmd, int *exec_errno)
{
	int go[2] = { -1, -1 }, ex[2] = { -1, -1 }, rc, e, status;
	sigset_t block, old;
	ssize_t n;
	pid_t pid;
	char c = 1;

	if (pipe2(go, O_CLOEXEC) || pipe2(ex, O_CLOEXEC)) {
		p_err("pipe: %s", strerror(errno));
		status = -1;
		goto out;
	}
	sigemptyset(&block);
	for (unsigned int i = 0; i < ARRAY_SIZE(fwd_signals); i++)
		sigaddset(&block, fwd_signals[i]);
	sigprocmask(SIG_BLOCK, &block, &old);
	set_signals(true);
	pid = fork();
	if (pid < 0) {
		p_err("fork: %s", strerror(errno));
		sigprocmask(SIG_SETMASK, &old, NULL);
		status = -1;
		goto out;
	}
	if (pid == 0) {
		set_signals(false);
		sigprocmask(SIG_SETMASK, &old, NULL);
		close(go[1]);
		close(ex[0]);
		if (read_full(go[0], &c, 1) != 1)
			_exit(126);
		execvp(cmd[0], cmd);
		e = errno;
		if (write(ex[1], &e, sizeof(e)) < 0)
			_exit(126);
		_exit(e == ENOENT ? 127 : 126);
	}
	child_pid = pid;
	sigprocmask(SIG_SETMASK, &old, NULL);
	close(go[0]);
	close(ex[1]);
	go[0] = ex[1] = -1;

	rc = ag_cgroup_move(ctx->cgroot, ctx->rel, pid);
	if (rc) {
		/* Closing `go` without a byte makes the child exit without running anything. */
		close(go[1]);
		go[1] = -1;
		wait_child(pid);
		p_err("moving the command into cgroup %s: %s", ctx->rel, strerror(-rc));
		status = -1;
		goto out;
	}
	if (write(go[1], &c, 1) != 1) {
		p_err("starting the command: %s", strerror(errno));
		wait_child(pid);
		status = -1;
		goto out;
	}
	close(go[1]);
	go[1] = -1;
	n = read_full(ex[0], &e, sizeof(e));
	status = wait_child(pid);
	if (n == sizeof(e))
		*exec_errno = e;
out:
	/* The handlers stay (doing nothing now) until the cgroup is torn down. */
	child_pid = 0;
	for (int i = 0; i < 2; i++) {
		if (go[i] >= 0)
			close(go[i]);
		if (ex[i] >= 0)
			close(ex[i]);
	}
	return status;
}

static int run_cmd(int argc, char **argv)
{
	struct run_ctx ctx = {};
	ag_ctl_response *status = NULL, *policy = NULL;
	int ret = -1, exec_errno = 0, st;
	char **cmd;

	while (argc) {
		if (!strcmp(*argv, "--")) {
			NEXT_ARG();
			break;
		} else if (!strcmp(*argv, "--agent")) {
			NEXT_ARG();
			if (!REQ_ARGS(1))
				return -1;
			ctx.agent = GET_ARG();
		} else if (!strncmp(*argv, "--agent=", 8)) {
			ctx.agent = *argv + 8;
			NEXT_ARG();
		} else if (**argv == '-') {
			return BAD_ARG();
		} else {
			p_err("expected '--' before the command: %s run [--agent NAME] -- CMD "
			      "ARGS...",
			      bin_name);
			return -1;
		}
	}
	if (!argc) {
		p_err("no command to run: %s run [--agent NAME] -- CMD ARGS...", bin_name);
		return -1;
	}
	if (ctx.agent && !*ctx.agent) {
		p_err("empty agent name");
		return -1;
	}
	cmd = argv;

	status = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_STATUS);
	if (!status)
		return -1;
	policy = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_POLICY_SHOW);
	if (!policy)
		goto out;
	if (!policy->policy_json || !policy->policy_json[0]) {
		p_err("agentgated sent no policy");
		goto out;
	}
	if (pick_agent(&ctx, policy->policy_json))
		goto out;
	if (setup_cgroup(&ctx))
		goto out;

	st = run_child(&ctx, cmd, &exec_errno);
	if (st < 0)
		goto out;
	if (exec_errno) {
		p_err("%s: %s", cmd[0], strerror(exec_errno));
		ret = exec_errno == ENOENT ? 127 : 126;
		goto out;
	}
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "agent", ctx.agent);
		jsonw_string_field(json_wtr, "cgroup", ctx.rel);
		jsonw_int_field(json_wtr, "exit_code", st);
		jsonw_end_object(json_wtr);
	}
	/* 0 is success for cmd_select's callers too; a failing command's status passes through. */
	ret = st;
out:
	teardown(&ctx);
	set_signals(false);
	ag_ctl_response_free(policy);
	ag_ctl_response_free(status);
	return ret;
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %1$s run [--agent NAME] -- CMD [ARGS...]\n"
		"       %1$s run help\n"
		"\n"
		"       NAME := an agent of the active policy (default: its first agent)\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name);
	return 0;
}

int do_run(int argc, char **argv)
{
	/* Not a command table: everything after "run" is the command line to run. */
	if (argc && is_prefix(*argv, "help")) {
		help_out = stdout;
		return do_help(argc - 1, argv + 1);
	}
	return run_cmd(argc, argv);
}
