// SPDX-License-Identifier: GPL-2.0
/*
 * Fail closed: with the daemon killed or stopped, a tagged cgroup's connects fail (EPERM or
 * ECONNREFUSED) and never reach the target directly, while untagged ones are untouched; once it
 * is back, enforcement resumes with exactly one program per hook on the tagged cgroup (no
 * duplicate attachments from the re-attach); `agctl prog detach` is the way out. And policies:
 * a bad file is a clear one-line error at start with nothing attached, and a bad reload keeps
 * the old policy in force.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <bpf/bpf.h>

#include "agentgate.h"
#include "cgroup.h"
#include "ctl.h"
#include "pins.h"
#include "../gate.h"
#include "../test_progs.h"

/* One short echo exchange from cg; 1 through the gateway, 0 direct, -1 failed. */
static int exchange(struct th_gate *g, const char *cg, struct th_job **out)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
	int before = th_server_accepted(g->echo4), rc, ret = -1;

	if (!j)
		return -1;
	rc = th_job_in(cg, j, 15000);
	if (!rc && th_server_accepted(g->echo4) == before + 1)
		ret = th_server_peer_port(g->echo4, before) != j->local_port;
	if (out)
		*out = j;
	else
		th_job_free(j);
	return ret;
}

/* A tagged connect with the daemon down: refused, and the server never hears of it. */
static void expect_refused(struct th_gate *g)
{
	struct th_job *j = th_job_new(AF_INET, "127.0.0.2", th_server_port(g->echo4));
	int before = th_server_accepted(g->echo4);

	if (!ASSERT_OK_PTR(j, "job"))
		return;
	ASSERT_NEQ(th_job_in(g->tagged, j, 15000), 0, "tagged exchange fails");
	if (!ASSERT_TRUE(j->connect_err == -EPERM || j->connect_err == -ECONNREFUSED,
			 "tagged connect refused (EPERM or ECONNREFUSED)"))
		printf("connect returned %d (%s)\n", j->connect_err, strerror(-j->connect_err));
	usleep(100 * 1000);
	ASSERT_EQ(th_server_accepted(g->echo4), before, "nothing went direct");
	th_job_free(j);
}

static void expect_one_each(struct th_gate *g)
{
	struct th_pinned_links_count {
		int n;
	} pinned = { 0 };
	struct ag_pinned_link *links = NULL;
	struct th_cg_progs p;
	uint64_t id = 0;
	size_t n = 0;

	if (!ASSERT_OK(th_cgroup_progs(g->tagged, &p), "bpftool cgroup show"))
		return;
	ASSERT_EQ(p.connect4, 1, "one connect4");
	ASSERT_EQ(p.connect6, 1, "one connect6");
	ASSERT_EQ(p.sockops, 1, "one sockops");
	ASSERT_EQ(p.total, 3, "nothing else");
	if (!ASSERT_OK(th_cgroup_id(g->tagged, &id), "cgroup id"))
		return;
	if (ASSERT_OK(ag_pins_links(g->d.pin_root, &links, &n), "pinned links")) {
		for (size_t i = 0; i < n; i++)
			pinned.n += links[i].cgroup_id == id;
		ASSERT_EQ(pinned.n, 3, "three pinned links for the cgroup");
	}
	free(links);
}

/* The id of the program pinned at path, or -errno. */
static int pinned_prog_id(const char *path)
{
	struct bpf_prog_info info = {};
	__u32 len = sizeof(info);
	int fd = bpf_obj_get(path), err;

	if (fd < 0)
		return -errno;
	err = bpf_obj_get_info_by_fd(fd, &info, &len);
	close(fd);
	return err ? -errno : (int)info.id;
}

/* The fast path switch in the pinned config map, or -errno. */
static int pinned_fastpath(const char *pin_root)
{
	struct ag_config cfg = {};
	char path[256];
	__u32 zero = 0;
	int fd, err;

	snprintf(path, sizeof(path), "%s/ag_config", pin_root);
	fd = bpf_obj_get(path);
	if (fd < 0)
		return -errno;
	err = bpf_map_lookup_elem(fd, &zero, &cfg);
	close(fd);
	return err ? -errno : (int)cfg.fastpath;
}

/*
 * A second agentgated started by mistake on the same socket and pins refuses to run, and leaves
 * the first one's kernel side as it was: its sk_msg program and its fast path setting.
 */
static void subtest_second_daemon(struct th_gate *g)
{
	char path[256];
	int id, rc;

	snprintf(path, sizeof(path), "%s/progs/sk_msg", g->d.pin_root);
	id = pinned_prog_id(path);
	if (!ASSERT_GT(id, 0, "sk_msg pinned") ||
	    !ASSERT_EQ(pinned_fastpath(g->d.pin_root), 0, "fast path off"))
		return;
	rc = th_run(NULL, 0,
		    "%s/agentgated --foreground --config %s --state-dir %s --socket %s --bpffs %s "
		    "--port %d --fastpath on",
		    th_build_dir(), g->d.config, g->d.state_dir, g->d.socket, g->d.pin_root,
		    g->d.port);
	ASSERT_EQ(rc, 1, "the second daemon refuses to start");
	ASSERT_EQ(pinned_prog_id(path), id, "the first one's sk_msg program stays");
	ASSERT_EQ(pinned_fastpath(g->d.pin_root), 0, "the first one's fast path setting stays");
	ASSERT_EQ(exchange(g, g->tagged, NULL), 1, "the first one still serves");
}

/* The pid of the daemon answering on socket, or -errno. */
static int daemon_pid_on(const char *socket)
{
	char err[256];
	ag_ctl_response *resp = ag_ctl_call_simple(socket, AGENTGATE__CTL__REQUEST__CMD_STATUS,
						   2000, err, sizeof(err));
	int pid;

	if (!resp)
		return -ECONNREFUSED;
	pid = resp->status ? (int)resp->status->pid : -EPROTO;
	ag_ctl_response_free(resp);
	return pid;
}

/*
 * Started in the background (no --foreground) with paths relative to where it was started: the
 * daemon moves to "/", and still finds its state dir, socket and policy (reload) where given.
 */
static void subtest_background(struct th_gate *g)
{
	char cwd[PATH_MAX], out[4096], log[300];
	int pid = -1, rc;

	if (!ASSERT_EQ(th_daemon_stop(&g->d), 0, "stop the foreground daemon") ||
	    !ASSERT_OK_PTR(getcwd(cwd, sizeof(cwd)), "cwd") || !ASSERT_OK(chdir(g->d.dir), "cd"))
		return;
	rc = th_run(NULL, 0,
		    "%s/agentgated --config policy.yaml --state-dir state --socket ctl.sock "
		    "--bpffs %s --port %d",
		    th_build_dir(), g->d.pin_root, g->d.port);
	ASSERT_OK(chdir(cwd), "cd back");
	if (!ASSERT_EQ(rc, 0, "started in the background"))
		goto out;
	for (int t = 0; t < 100 && pid < 0; t++) {
		pid = daemon_pid_on(g->d.socket);
		if (pid < 0)
			usleep(100 * 1000);
	}
	if (!ASSERT_GT(pid, 0, "answers on the socket given"))
		goto out;
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "policy reload"), 0, "reloads its policy");
	ASSERT_EQ(exchange(g, g->tagged, NULL), 1, "serves");
	snprintf(log, sizeof(log), "%s/sessions.log", g->d.state_dir);
	ASSERT_OK(access(log, F_OK), "sessions.log in the state dir given");
out:
	if (pid > 0) {
		kill(pid, SIGTERM);
		for (int t = 0; t < 200 && !kill(pid, 0); t++) {
			waitpid(pid, NULL, WNOHANG); /* ours if we are a subreaper */
			usleep(50 * 1000);
		}
	}
	ASSERT_OK(th_daemon_restart(&g->d), "back in the foreground");
}

void test_datapath_failclosed(void)
{
	struct th_gate g;
	struct th_job *j = NULL;

	if (!ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;

	if (test__start_subtest("baseline")) {
		ASSERT_EQ(exchange(&g, g.tagged, NULL), 1, "tagged through the gateway");
		expect_one_each(&g);
	}
	if (test__start_subtest("second_daemon_refused_untouched"))
		subtest_second_daemon(&g);
	if (test__start_subtest("killed_tagged_refused")) {
		ASSERT_EQ(th_daemon_kill(&g.d), 128 + SIGKILL, "daemon killed");
		expect_refused(&g);
	}
	if (test__start_subtest("killed_untagged_works"))
		ASSERT_EQ(exchange(&g, g.untagged, NULL), 0, "untagged goes direct");
	if (test__start_subtest("restarted_enforces")) {
		if (ASSERT_OK(th_daemon_restart(&g.d), "restart")) {
			ASSERT_EQ(exchange(&g, g.tagged, &j), 1,
				  "tagged through the gateway again");
			if (j) {
				yajl_val ev =
					th_daemon_wait_event(&g.d, "start", "pid", j->pid, 0, 5000);

				ASSERT_OK_PTR(ev, "session logged by the new daemon");
				yajl_tree_free(ev);
				th_job_free(j);
				j = NULL;
			}
			expect_one_each(&g);
		}
	}
	if (test__start_subtest("stopped_tagged_refused")) {
		ASSERT_EQ(th_daemon_stop(&g.d), 0, "SIGTERM: clean exit");
		expect_refused(&g);
		ASSERT_EQ(exchange(&g, g.untagged, NULL), 0, "untagged goes direct");
	}
	if (test__start_subtest("restarted_twice_no_duplicates")) {
		if (ASSERT_OK(th_daemon_restart(&g.d), "restart") &&
		    ASSERT_OK(th_daemon_restart(&g.d), "restart again")) {
			ASSERT_EQ(exchange(&g, g.tagged, NULL), 1, "tagged through the gateway");
			expect_one_each(&g);
		}
	}
	if (test__start_subtest("background_relative_paths"))
		subtest_background(&g);
	if (test__start_subtest("prog_detach")) {
		char out[4096];
		struct th_cg_progs p;

		th_daemon_stop(&g.d);
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "prog detach"), 0, "agctl prog detach");
		if (ASSERT_OK(th_cgroup_progs(g.tagged, &p), "bpftool cgroup show"))
			ASSERT_EQ(p.total, 0, "nothing left attached");
		ASSERT_EQ(exchange(&g, g.tagged, NULL), 0, "no longer enforced: direct");
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
}

/*
 * SIGTERM drains: a live session keeps working until it ends, new tagged connects are refused
 * meanwhile, and the daemon exits 0 once the last session is gone.
 */
void test_datapath_drain(void)
{
	struct th_job *held = NULL;
	struct th_gate g;
	pid_t pid = -1;
	int status, rc;

	if (!ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;
	held = th_job_new(AF_INET, "127.0.0.2", th_server_port(g.echo4));
	if (!ASSERT_OK_PTR(held, "job"))
		goto out;
	held->hold_ms = 30000;
	held->again = true;
	pid = th_spawn_in_cgroup(g.tagged, th_job_run, held);
	if (!ASSERT_GT(pid, 0, "spawn"))
		goto out;
	for (int t = 0; t < 1000 && !held->ready; t++)
		usleep(10 * 1000);
	if (!ASSERT_TRUE(held->ready, "a live session"))
		goto out;

	ASSERT_OK(kill(g.d.pid, SIGTERM), "SIGTERM");
	usleep(300 * 1000);
	if (!ASSERT_EQ(waitpid(g.d.pid, &status, WNOHANG), 0, "still draining"))
		goto out;
	expect_refused(&g);
	held->release = 1;
	rc = th_wait(pid, 15000);
	pid = -1;
	ASSERT_EQ(rc, 0, "the live session worked to its end");
	ASSERT_EQ(th_daemon_stop(&g.d), 0, "exit 0 after draining");
out:
	if (pid > 0) {
		held->release = 1;
		th_wait(pid, 15000);
	}
	th_job_free(held);
	th_gate_cleanup(&g);
}

/* Tags or untags (agent NULL) through the control protocol: a path may hold spaces. */
static int ctl_tag(const struct th_gate *g, const char *path, const char *agent)
{
	char err[512];
	ag_ctl_response *resp = ag_ctl_call_tag(g->d.socket, path, agent, 10000, err, sizeof(err));
	int rc = 0;

	if (!resp) {
		printf("ctl: %s\n", err);
		return -EIO;
	}
	if (resp->error && resp->error[0]) {
		printf("ctl: %s\n", resp->error);
		rc = -EINVAL;
	}
	ag_ctl_response_free(resp);
	return rc;
}

/* A runtime tag of a cgroup whose name holds a space is the same cgroup after a restart. */
static void subtest_tag_space(struct th_gate *g)
{
	char rel[256];

	if (!ASSERT_OK(th_cgroup_create("with space", rel, sizeof(rel)), "cgroup") ||
	    !ASSERT_OK(ctl_tag(g, rel, "t"), "tag"))
		return;
	ASSERT_EQ(exchange(g, rel, NULL), 1, "redirected once tagged");
	if (ASSERT_OK(th_daemon_restart(&g->d), "restart"))
		ASSERT_EQ(exchange(g, rel, NULL), 1, "still redirected after a restart");
	ASSERT_OK(ctl_tag(g, rel, NULL), "untag");
}

/*
 * A runtime-tagged cgroup removed while the daemon is down (a job that ended): the daemon still
 * starts, and the links of the dead cgroup are unpinned rather than kept forever.
 */
static void subtest_tag_removed(struct th_gate *g)
{
	struct ag_pinned_link *links = NULL;
	char rel[256], out[4096];
	uint64_t id = 0;
	size_t n = 0;
	int left = 0;

	if (!ASSERT_OK(th_cgroup_create("ended", rel, sizeof(rel)), "cgroup") ||
	    !ASSERT_OK(th_cgroup_id(rel, &id), "cgroup id") ||
	    !ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "cgroup tag %s agent t", rel), 0, "tag"))
		return;
	ASSERT_EQ(th_daemon_stop(&g->d), 0, "stop");
	ASSERT_OK(ag_cgroup_destroy(th_cgroup_mount(), rel), "cgroup removed");
	if (!ASSERT_OK(th_daemon_restart(&g->d), "the daemon starts again"))
		return;
	if (ASSERT_OK(ag_pins_links(g->d.pin_root, &links, &n), "pinned links")) {
		for (size_t i = 0; i < n; i++)
			left += links[i].cgroup_id == id;
		ASSERT_EQ(left, 0, "no link left pinned for the removed cgroup");
	}
	free(links);
	ASSERT_EQ(exchange(g, g->tagged, NULL), 1, "the policy's cgroup still enforced");
	ASSERT_EQ(th_agctl(&g->d, out, sizeof(out), "cgroup untag %s", rel), 0, "untag it");
}

/*
 * Tags follow the policy and agctl at run time: a reload moving an agent to another cgroup
 * detaches from the old one; `agctl cgroup tag/untag` attach and detach without a restart.
 */
void test_datapath_tagging(void)
{
	char other[256], rt[256], pol[8192], out[4096];
	struct th_cg_progs p;
	struct th_gate g;
	int ok = 0;

	if (!ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;
	if (!ASSERT_OK(th_cgroup_create("other", other, sizeof(other)), "cgroup") ||
	    !ASSERT_OK(th_cgroup_create("runtime", rt, sizeof(rt)), "cgroup"))
		goto out;

	if (test__start_subtest("runtime_tag")) {
		ASSERT_EQ(exchange(&g, rt, NULL), 0, "direct before tagging");
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "cgroup tag %s agent t", rt), 0,
			  "agctl cgroup tag");
		ASSERT_EQ(exchange(&g, rt, NULL), 1, "redirected once tagged");
		if (ASSERT_OK(th_cgroup_progs(rt, &p), "bpftool cgroup show"))
			ASSERT_EQ(p.total, 3, "connect4, connect6, sockops attached");
	}
	if (test__start_subtest("runtime_untag")) {
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "cgroup untag %s", rt), 0,
			  "agctl cgroup untag");
		if (ASSERT_OK(th_cgroup_progs(rt, &p), "bpftool cgroup show"))
			ASSERT_EQ(p.total, 0, "detached");
		ASSERT_EQ(exchange(&g, rt, NULL), 0, "direct again");
		ASSERT_EQ(exchange(&g, g.tagged, NULL), 1, "the policy's cgroup still enforced");
	}
	if (test__start_subtest("runtime_tag_of_policy_cgroup_refused")) {
		/* It would be lost at the next reload: refused, the policy's tag stays. */
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "cgroup tag %s agent t", g.tagged), 1,
			  "refused");
		ASSERT_EQ(th_agctl(&g.d, out, sizeof(out), "-j cgroup list"), 0, "list");
		ASSERT_HAS_SUBSTR(out, "\"source\":\"policy\"", "still the policy's");
		ASSERT_EQ(exchange(&g, g.tagged, NULL), 1, "still enforced");
	}
	if (test__start_subtest("runtime_tag_path_with_space"))
		subtest_tag_space(&g);
	if (test__start_subtest("runtime_tag_cgroup_removed"))
		subtest_tag_removed(&g);
	if (test__start_subtest("reload_moves_agent")) {
		char saved[256];

		snprintf(saved, sizeof(saved), "%s", g.tagged);
		snprintf(g.tagged, sizeof(g.tagged), "%s", other);
		th_gate_policy(&g, pol, sizeof(pol), NULL);
		snprintf(g.tagged, sizeof(g.tagged), "%s", saved);
		ASSERT_OK(th_daemon_write_policy(&g.d, pol), "write policy");
		ASSERT_OK(th_daemon_reload(&g.d), "SIGHUP");
		for (int t = 0; t < 50 && !ok; t++) {
			ok = exchange(&g, other, NULL) == 1;
			if (!ok)
				usleep(100 * 1000);
		}
		ASSERT_TRUE(ok, "the new cgroup is redirected");
		ASSERT_EQ(exchange(&g, g.tagged, NULL), 0, "the old one goes direct");
		if (ASSERT_OK(th_cgroup_progs(g.tagged, &p), "bpftool cgroup show"))
			ASSERT_EQ(p.total, 0, "the old one is detached");
		if (ASSERT_OK(th_cgroup_progs(other, &p), "bpftool cgroup show"))
			ASSERT_EQ(p.total, 3, "the new one has one of each");
	}
out:
	test__end_subtest();
	th_gate_cleanup(&g);
}

/* ---- policies ---- */

static int count_substr(const char *s, const char *sub)
{
	int n = 0;

	for (const char *p = strstr(s, sub); p; p = strstr(p + 1, sub))
		n++;
	return n;
}

/* A bad policy at start: non-zero exit (not a crash), one error naming the file, no attach. */
static void bad_at_start(const char *name, const char *yaml, const char *cg, const char *expect)
{
	static char log[65536];
	struct ag_pinned_link *links = NULL;
	struct th_daemon d;
	struct th_cg_progs p;
	char where[256];
	size_t n = 0;
	int rc;

	printf("policy %s:\n%s", name, yaml);
	rc = th_daemon_start(&d, yaml, NULL);
	if (!ASSERT_EQ(rc, -ECHILD, "daemon refuses to start"))
		goto out;
	ASSERT_TRUE(d.exit_code > 0 && d.exit_code < 128, "exit code 1-127, not a crash");
	th_daemon_read_log(&d, log, sizeof(log));
	printf("daemon said:\n%s", log);
	snprintf(where, sizeof(where), "%s%s", d.config, expect ? "" : ":");
	ASSERT_HAS_SUBSTR(log, expect ? expect : where, "the error names the problem");
	ASSERT_EQ(count_substr(log, ": error:"), 1, "one error line");
	if (ASSERT_OK(th_cgroup_progs(cg, &p), "bpftool cgroup show"))
		ASSERT_EQ(p.total, 0, "nothing attached");
	if (ASSERT_OK(ag_pins_links(d.pin_root, &links, &n), "pins"))
		ASSERT_EQ(n, 0, "nothing pinned");
	free(links);
out:
	th_daemon_cleanup(&d);
}

static void subtest_bad_at_start(void)
{
	char cg[256], pol[2048];
	const char *good_tail = "targets:\n"
				"  - name: echo\n"
				"    protocol: tcp\n"
				"    address: 127.0.0.2:4000\n"
				"default: deny\n";

	if (!ASSERT_OK(th_cgroup_create("bad", cg, sizeof(cg)), "cgroup"))
		return;
	snprintf(pol, sizeof(pol),
		 "apiVersion: agentgate/v1\nagents:\n  - name: t\n    cgroup: %s\n%s"
		 "targets: [\n",
		 cg, good_tail);
	bad_at_start("not YAML", pol, cg, NULL);
	snprintf(pol, sizeof(pol),
		 "apiVersion: agentgate/v1\nagents:\n  - name: t\n    cgroup: %s\n    bogus: 1\n%s",
		 cg, good_tail);
	bad_at_start("unknown key", pol, cg, NULL);
	snprintf(pol, sizeof(pol),
		 "apiVersion: agentgate/v1\nagents:\n  - name: t\n    cgroup: %s\n"
		 "targets:\n  - name: echo\n    protocol: tcp\n    address: 127.0.0.2:notaport\n"
		 "default: deny\n",
		 cg);
	bad_at_start("bad address", pol, cg, NULL);
	snprintf(pol, sizeof(pol),
		 "apiVersion: agentgate/v9\nagents:\n  - name: t\n    cgroup: %s\n%s", cg,
		 good_tail);
	bad_at_start("wrong apiVersion", pol, cg, NULL);
}

/* Tagging the cgroup root would intercept the whole host: refused, nothing attached to it. */
static void subtest_root_refused(void)
{
	const char *pol =
		"apiVersion: agentgate/v1\n"
		"agents:\n  - name: everyone\n    cgroup: /\n"
		"targets:\n  - name: echo\n    protocol: tcp\n    address: 127.0.0.2:4000\n"
		"default: deny\n";
	struct th_cg_progs before, after;
	static char log[65536];
	struct th_daemon d;
	int rc;

	if (!ASSERT_OK(th_cgroup_setup(), "cgroup setup") ||
	    !ASSERT_OK(th_cgroup_progs("/", &before), "root before"))
		return;
	rc = th_daemon_start(&d, pol, NULL);
	ASSERT_EQ(rc, -ECHILD, "daemon refuses to start");
	th_daemon_read_log(&d, log, sizeof(log));
	printf("daemon said:\n%s", log);
	ASSERT_HAS_SUBSTR(log, "root", "the error says why");
	if (ASSERT_OK(th_cgroup_progs("/", &after), "root after")) {
		ASSERT_EQ(after.connect4, before.connect4, "no connect4 on the root");
		ASSERT_EQ(after.connect6, before.connect6, "no connect6 on the root");
		ASSERT_EQ(after.sockops, before.sockops, "no sockops on the root");
	}
	th_daemon_cleanup(&d);
}

/* Waits until the daemon's log holds `sub` more than `had` times. */
static bool log_grows(struct th_gate *g, const char *sub, int had)
{
	static char log[256 * 1024];

	for (int t = 0; t < 100; t++) {
		th_daemon_read_log(&g->d, log, sizeof(log));
		if (count_substr(log, sub) > had)
			return true;
		usleep(50 * 1000);
	}
	return false;
}

static void subtest_reload(void)
{
	static char log[256 * 1024];
	struct th_server *echo3 = th_server_start(TH_SRV_ECHO, AF_INET, "127.0.0.3");
	char addr3[64], pol[8192], where[256];
	const char *extra[] = { "echo3", addr3, NULL };
	struct th_job *j = NULL;
	struct th_gate g;
	int had, ok = 0;

	memset(&g, 0, sizeof(g));
	if (!ASSERT_OK_PTR(echo3, "echo3") || !ASSERT_OK(th_gate_start(&g, NULL, NULL), "gate"))
		goto out;
	snprintf(addr3, sizeof(addr3), "127.0.0.3:%d", th_server_port(echo3));
	snprintf(where, sizeof(where), "%s:", g.d.config);

	/* Before: echo3 is nobody's target. */
	j = th_job_new(AF_INET, "127.0.0.3", th_server_port(echo3));
	if (!ASSERT_OK_PTR(j, "job"))
		goto out;
	ASSERT_NEQ(th_job_in(g.tagged, j, 10000), 0, "echo3 denied at first");

	/* A broken file: refused with its error, the daemon lives on under the old policy. */
	th_daemon_read_log(&g.d, log, sizeof(log));
	had = count_substr(log, where);
	ASSERT_OK(th_daemon_write_policy(&g.d, "agents: [\n  - name: t\n"), "write bad policy");
	ASSERT_OK(th_daemon_reload(&g.d), "SIGHUP");
	ASSERT_TRUE(log_grows(&g, where, had), "reload error names file:line");
	ASSERT_OK(kill(g.d.pid, 0), "daemon still runs");
	ASSERT_EQ(exchange(&g, g.tagged, NULL), 1, "old policy still enforced: echo works");
	ASSERT_NEQ(th_job_in(g.tagged, j, 10000), 0, "echo3 still denied");

	/* Valid YAML, invalid policy (a rule for an unknown target): refused the same way. */
	th_daemon_read_log(&g.d, log, sizeof(log));
	had = count_substr(log, where);
	th_gate_policy(&g, pol, sizeof(pol), extra);
	strcat(pol, "rules:\n  - agent: t\n    target: nosuchtarget\n");
	ASSERT_OK(th_daemon_write_policy(&g.d, pol), "write invalid policy");
	ASSERT_OK(th_daemon_reload(&g.d), "SIGHUP");
	ASSERT_TRUE(log_grows(&g, where, had), "reload error names file:line");
	ASSERT_NEQ(th_job_in(g.tagged, j, 10000), 0, "echo3 still denied");

	/* A good file with echo3: applied. */
	th_gate_policy(&g, pol, sizeof(pol), extra);
	ASSERT_OK(th_daemon_write_policy(&g.d, pol), "write good policy");
	ASSERT_OK(th_daemon_reload(&g.d), "SIGHUP");
	for (int t = 0; t < 50 && !ok; t++) {
		j->bad = j->first_error = 0;
		ok = !th_job_in(g.tagged, j, 10000);
		if (!ok)
			usleep(100 * 1000);
	}
	ASSERT_TRUE(ok, "echo3 allowed after a good reload");
	ASSERT_EQ(exchange(&g, g.tagged, NULL), 1, "echo still works");
out:
	th_job_free(j);
	th_gate_cleanup(&g);
	th_server_stop(echo3);
}

void test_datapath_policy(void)
{
	if (test__start_subtest("bad_policy_at_start"))
		subtest_bad_at_start();
	if (test__start_subtest("cgroup_root_refused"))
		subtest_root_refused();
	if (test__start_subtest("reload_keeps_old_on_error"))
		subtest_reload();
}
