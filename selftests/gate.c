// SPDX-License-Identifier: GPL-2.0
/* The data-path tests' fixture; see gate.h. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gate.h"
#include "test_progs.h"

static int gate_counter;

static int append(char *buf, size_t len, size_t *off, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int append(char *buf, size_t len, size_t *off, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf + *off, len - *off, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= len - *off)
		return -ENOSPC;
	*off += n;
	return 0;
}

int th_gate_policy(struct th_gate *g, char *buf, size_t len, const char *const *extra_targets)
{
	size_t off = 0;
	int err;

	err = append(buf, len, &off,
		     "apiVersion: agentgate/v1\n"
		     "agents:\n"
		     "  - name: t\n"
		     "    cgroup: %s\n"
		     "targets:\n"
		     "  - name: echo\n"
		     "    protocol: tcp\n"
		     "    address: 127.0.0.2:%d\n"
		     "  - name: echo6\n"
		     "    protocol: tcp\n"
		     "    address: \"[::1]:%d\"\n",
		     g->tagged, th_server_port(g->echo4), th_server_port(g->echo6));
	for (size_t i = 0; !err && extra_targets && extra_targets[i]; i += 2)
		err = append(buf, len, &off,
			     "  - name: %s\n"
			     "    protocol: tcp\n"
			     "    address: \"%s\"\n",
			     extra_targets[i], extra_targets[i + 1]);
	if (!err)
		err = append(buf, len, &off, "default: deny\n");
	return err;
}

int th_gate_start(struct th_gate *g, const char *daemon_args, const char *const *extra_targets)
{
	char name[32];
	int err, n = gate_counter++;

	memset(g, 0, sizeof(*g));
	snprintf(name, sizeof(name), "t%d", n);
	err = th_cgroup_create(name, g->tagged, sizeof(g->tagged));
	if (err)
		return err;
	snprintf(name, sizeof(name), "u%d", n);
	err = th_cgroup_create(name, g->untagged, sizeof(g->untagged));
	if (err)
		return err;
	g->echo4 = th_server_start(TH_SRV_ECHO, AF_INET, "127.0.0.2");
	g->echo6 = th_server_start(TH_SRV_ECHO, AF_INET6, "::1");
	if (!g->echo4 || !g->echo6)
		return -errno;
	err = th_gate_policy(g, g->policy, sizeof(g->policy), extra_targets);
	if (err)
		return err;
	if (test__verbose())
		printf("gate: policy:\n%s", g->policy);
	return th_daemon_start(&g->d, g->policy, daemon_args);
}

void th_gate_cleanup(struct th_gate *g)
{
	th_daemon_cleanup(&g->d);
	th_server_stop(g->echo4);
	th_server_stop(g->echo6);
	g->echo4 = g->echo6 = NULL;
}

struct th_job *th_job_new(int family, const char *addr, int port)
{
	struct th_job *j = th_shared_alloc(sizeof(*j));

	if (!j)
		return NULL;
	memset(j, 0, sizeof(*j));
	j->family = family;
	snprintf(j->addr, sizeof(j->addr), "%s", addr);
	j->port = port;
	j->expect_echo = true;
	j->timeout_ms = 30000;
	return j;
}

void th_job_free(struct th_job *j)
{
	th_shared_free(j, sizeof(*j));
}

int th_job_in(const char *rel, struct th_job *j, int timeout_ms)
{
	pid_t pid = th_spawn_in_cgroup(rel, th_job_run, j);
	int rc;

	if (pid < 0)
		return pid;
	rc = th_wait(pid, timeout_ms);
	if (rc)
		printf("gate: job %d in %s to %s:%d exited with %d (connect %d, %d of %d bad, "
		       "first error %s)\n",
		       pid, rel, j->addr, j->port, rc, j->connect_err, j->bad,
		       j->nconns ? j->nconns : 1, strerror(j->first_error));
	return rc;
}

bool th_check_session_start(const struct th_gate *g, int pid, const char *target,
			    const char *orig_dst, const char *orig_dst_alt, const char *cgroup,
			    const char *comm, long long uid)
{
	yajl_val ev = th_daemon_wait_event(&g->d, "start", "pid", pid, 0, 5000);
	const char *dst;
	long long v = -1;
	bool ok = true;

	if (!ASSERT_OK_PTR(ev, "session start logged"))
		return false;
	ok &= ASSERT_STREQ(th_json_str(ev, "agent"), "t", "agent");
	ok &= ASSERT_STREQ(th_json_str(ev, "target"), target, "target");
	ok &= ASSERT_STREQ(th_json_str(ev, "protocol"), "tcp", "protocol");
	dst = th_json_str(ev, "orig_dst");
	if (orig_dst_alt && dst && !strcmp(dst, orig_dst_alt))
		ok &= ASSERT_STREQ(dst, orig_dst_alt, "orig_dst");
	else
		ok &= ASSERT_STREQ(dst, orig_dst, "orig_dst");
	ok &= ASSERT_STREQ(th_json_str(ev, "cgroup"), cgroup, "cgroup");
	if (th_json_get(ev, "cgroup_id")) {
		uint64_t id = 0;

		th_cgroup_id(cgroup, &id);
		ok &= ASSERT_TRUE(th_json_int(ev, "cgroup_id", &v), "cgroup_id integer");
		ok &= ASSERT_EQ(v, (long long)id, "cgroup_id");
	}
	if (comm)
		ok &= ASSERT_STREQ(th_json_str(ev, "comm"), comm, "comm");
	ok &= ASSERT_TRUE(th_json_int(ev, "uid", &v), "uid present");
	ok &= ASSERT_EQ(v, uid, "uid");
	yajl_tree_free(ev);
	return ok;
}

bool th_key_file_refusals(struct th_daemon *d, const char *key, const char *what)
{
	static char log[65536];
	char real[320], want[400];

	snprintf(real, sizeof(real), "%s.real", key);
	if (!ASSERT_OK(chmod(key, 0644), "chmod 0644"))
		return false;
	ASSERT_EQ(th_daemon_restart(d), -ECHILD, "a 0644 key stops the start");
	th_daemon_read_log(d, log, sizeof(log));
	snprintf(want, sizeof(want), "%s %s: must be owned by root and mode 0600 (is 0644)", what,
		 key);
	ASSERT_HAS_SUBSTR(log, want, "with the rule, the path and the mode");
	if (!ASSERT_OK(chmod(key, 0600), "chmod 0600") || !ASSERT_OK(rename(key, real), "move") ||
	    !ASSERT_OK(symlink(real, key), "link"))
		return false;
	ASSERT_EQ(th_daemon_restart(d), -ECHILD, "a symlinked key stops the start");
	th_daemon_read_log(d, log, sizeof(log));
	snprintf(want, sizeof(want), "%s %s: is a symbolic link: refused", what, key);
	ASSERT_HAS_SUBSTR(log, want, "and names the path");
	if (!ASSERT_OK(unlink(key), "unlink") || !ASSERT_OK(rename(real, key), "key back"))
		return false;
	return ASSERT_OK(th_daemon_restart(d), "0600 starts again");
}
