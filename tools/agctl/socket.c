// SPDX-License-Identifier: GPL-2.0
/*
 * agctl socket: every TCP socket held by a process of a tagged cgroup (or any cgroup below
 * one), and whether it goes through the gateway. The tagged cgroups come from the daemon; their
 * processes from cgroup.procs; a socket's owner from /proc/PID/fd (socket inodes); the sockets
 * themselves from the kernel's inet_diag dump (libnl-idiag), taken in each network namespace
 * the processes live in. A connected socket whose peer is not the gateway's loopback listener
 * is a BYPASS: with the hooks attached there should be none, so `list --bypass` is the check.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <netlink/netlink.h>
#include <netlink/msg.h>
#include <netlink/idiag/idiagnl.h>
#include <netlink/idiag/msg.h>

#include "cgroup.h"
#include "main.h"

/* A socket inode held by a process of a tagged cgroup. */
struct owner {
	uint64_t ino;
	uint64_t netns;
	bool seen; /* already reported (a dump may list a socket under both families) */
	pid_t pid;
	char comm[16];
	const char *cgroup; /* points into the procs array */
};

struct proc {
	pid_t pid;
	char cgroup[PATH_MAX];
};

struct row {
	const struct owner *o;
	char state[16];
	char local[64];
	char peer[64];
	const char *via;
};

struct sockctx {
	struct proc *procs;
	size_t nprocs;
	struct owner *owners;
	size_t nowners;
	struct row *rows;
	size_t nrows;
	uint64_t cur_netns; /* namespace being dumped */
	uint16_t listen_port;
	bool bypass_only;
	int err;
};

static const char *const tcp_states[] = {
	[1] = "ESTAB",	    [2] = "SYN-SENT",  [3] = "SYN-RECV", [4] = "FIN-WAIT-1",
	[5] = "FIN-WAIT-2", [6] = "TIME-WAIT", [7] = "UNCONN",	 [8] = "CLOSE-WAIT",
	[9] = "LAST-ACK",   [10] = "LISTEN",   [11] = "CLOSING",
};

#define TCP_LISTEN_STATE 10

static int add_proc(struct sockctx *c, pid_t pid, const char *cgroup)
{
	struct proc *np;

	if ((c->nprocs & 63) == 0) {
		np = realloc(c->procs, (c->nprocs + 64) * sizeof(*np));
		if (!np)
			return -ENOMEM;
		c->procs = np;
	}
	c->procs[c->nprocs].pid = pid;
	snprintf(c->procs[c->nprocs].cgroup, sizeof(c->procs[0].cgroup), "%s", cgroup);
	c->nprocs++;
	return 0;
}

/* The processes of cgroup `rel` and of every cgroup below it. */
static int walk_cgroup(struct sockctx *c, const char *root, const char *rel)
{
	char path[PATH_MAX * 2], sub[PATH_MAX], line[32];
	struct dirent *de;
	FILE *f;
	DIR *d;
	int err = 0;

	snprintf(path, sizeof(path), "%s%s/cgroup.procs", root, strcmp(rel, "/") ? rel : "");
	f = fopen(path, "re");
	if (!f)
		return errno == ENOENT ? 0 : -errno;
	while (!err && fgets(line, sizeof(line), f))
		err = add_proc(c, atoi(line), rel);
	fclose(f);
	if (err)
		return err;

	snprintf(path, sizeof(path), "%s%s", root, strcmp(rel, "/") ? rel : "");
	d = opendir(path);
	if (!d)
		return 0;
	while (!err && (de = readdir(d))) {
		if (de->d_type != DT_DIR || de->d_name[0] == '.')
			continue;
		if ((size_t)snprintf(sub, sizeof(sub), "%s/%s", strcmp(rel, "/") ? rel : "",
				     de->d_name) >= sizeof(sub))
			continue;
		err = walk_cgroup(c, root, sub);
	}
	closedir(d);
	return err;
}

static int cmp_proc(const void *a, const void *b)
{
	const struct proc *x = a, *y = b;

	return x->pid < y->pid ? -1 : x->pid > y->pid;
}

static int cmp_owner(const void *a, const void *b)
{
	const struct owner *x = a, *y = b;

	if (x->ino != y->ino)
		return x->ino < y->ino ? -1 : 1;
	return x->pid < y->pid ? -1 : x->pid > y->pid;
}

static uint64_t netns_of(pid_t pid)
{
	char path[64];
	struct stat st;

	snprintf(path, sizeof(path), "/proc/%d/ns/net", pid);
	return stat(path, &st) ? 0 : st.st_ino;
}

static int add_owners_of(struct sockctx *c, const struct proc *p)
{
	char path[64], link[64], comm[16] = "";
	uint64_t netns = netns_of(p->pid);
	struct dirent *de;
	ssize_t n;
	FILE *f;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/comm", p->pid);
	f = fopen(path, "re");
	if (f) {
		if (fgets(comm, sizeof(comm), f))
			comm[strcspn(comm, "\n")] = '\0';
		fclose(f);
	}
	snprintf(path, sizeof(path), "/proc/%d/fd", p->pid);
	d = opendir(path);
	if (!d) {
		p_debug("%s: %s", path, strerror(errno));
		return 0;
	}
	while ((de = readdir(d))) {
		char fdpath[320];
		unsigned long long ino;
		struct owner *no;

		if (de->d_name[0] == '.')
			continue;
		snprintf(fdpath, sizeof(fdpath), "%s/%s", path, de->d_name);
		n = readlink(fdpath, link, sizeof(link) - 1);
		if (n < 0)
			continue;
		link[n] = '\0';
		if (sscanf(link, "socket:[%llu]", &ino) != 1)
			continue;
		if ((c->nowners & 63) == 0) {
			no = realloc(c->owners, (c->nowners + 64) * sizeof(*no));
			if (!no) {
				closedir(d);
				return -ENOMEM;
			}
			c->owners = no;
		}
		no = &c->owners[c->nowners++];
		no->ino = ino;
		no->netns = netns;
		no->seen = false;
		no->pid = p->pid;
		no->cgroup = p->cgroup;
		snprintf(no->comm, sizeof(no->comm), "%s", comm);
	}
	closedir(d);
	return 0;
}

static struct owner *find_owner(struct sockctx *c, uint64_t ino)
{
	size_t lo = 0, hi = c->nowners;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (c->owners[mid].ino < ino)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < c->nowners && c->owners[lo].ino == ino ? &c->owners[lo] : NULL;
}

static void fmt_endpoint(struct nl_addr *a, uint16_t port, char *buf, size_t len)
{
	char ip[INET6_ADDRSTRLEN] = "*";
	int fam = a ? nl_addr_get_family(a) : AF_UNSPEC;

	if (a && (fam == AF_INET || fam == AF_INET6))
		inet_ntop(fam, nl_addr_get_binary_addr(a), ip, sizeof(ip));
	if (fam == AF_INET6)
		snprintf(buf, len, "[%s]:%u", ip, port);
	else
		snprintf(buf, len, "%s:%u", ip, port);
}

/* Is the peer the gateway's listener: 127.0.0.1, ::1 or ::ffff:127.0.0.1 on its port? */
static bool is_gateway(struct nl_addr *a, uint16_t port, uint16_t listen_port)
{
	static const uint8_t lo6[16] = { [15] = 1 };
	static const uint8_t mapped[16] = { [10] = 0xff, [11] = 0xff, 127, 0, 0, 1 };
	const uint8_t *b;
	unsigned int n;

	if (!a || !listen_port || port != listen_port)
		return false;
	b = nl_addr_get_binary_addr(a);
	n = nl_addr_get_len(a);
	/* libnl may keep an IPv4 address in a 16-byte buffer: only the first 4 count. */
	if (nl_addr_get_family(a) == AF_INET && n >= 4)
		return b[0] == 127 && b[1] == 0 && b[2] == 0 && b[3] == 1;
	if (nl_addr_get_family(a) == AF_INET6 && n >= 16)
		return !memcmp(b, lo6, 16) || !memcmp(b, mapped, 16);
	return false;
}

static int on_diag_msg(struct nl_msg *msg, void *arg)
{
	struct sockctx *c = arg;
	struct idiagnl_msg *m = NULL;
	uint16_t sport, dport;
	struct owner *o;
	struct row *r, *nr;
	uint8_t state;
	const char *via;

	if (idiagnl_msg_parse(nlmsg_hdr(msg), &m) < 0)
		return NL_SKIP;
	o = find_owner(c, idiagnl_msg_get_inode(m));
	if (!o || o->netns != c->cur_netns || o->seen)
		goto out;
	o->seen = true;
	/* libnl hands the ports over as the kernel has them: network order. */
	sport = ntohs(idiagnl_msg_get_sport(m));
	dport = ntohs(idiagnl_msg_get_dport(m));
	state = idiagnl_msg_get_state(m);
	if (state == TCP_LISTEN_STATE)
		via = "listen";
	else if (is_gateway(idiagnl_msg_get_dst(m), dport, c->listen_port))
		via = "gateway";
	else if (!dport)
		via = "unconnected";
	else
		via = "BYPASS";
	if (c->bypass_only && strcmp(via, "BYPASS"))
		goto out;
	if ((c->nrows & 63) == 0) {
		nr = realloc(c->rows, (c->nrows + 64) * sizeof(*nr));
		if (!nr) {
			c->err = -ENOMEM;
			goto out;
		}
		c->rows = nr;
	}
	r = &c->rows[c->nrows++];
	r->o = o;
	r->via = via;
	snprintf(r->state, sizeof(r->state), "%s",
		 state < ARRAY_SIZE(tcp_states) && tcp_states[state] ? tcp_states[state] : "?");
	fmt_endpoint(idiagnl_msg_get_src(m), sport, r->local, sizeof(r->local));
	fmt_endpoint(idiagnl_msg_get_dst(m), dport, r->peer, sizeof(r->peer));
out:
	idiagnl_msg_put(m);
	return NL_OK;
}

/* Every TCP socket of the current network namespace, both families, all states. */
static int dump_tcp(struct sockctx *c)
{
	static const int families[] = { AF_INET, AF_INET6 };
	struct nl_sock *sk;
	unsigned int i;
	int err = 0;

	sk = nl_socket_alloc();
	if (!sk)
		return -ENOMEM;
	err = idiagnl_connect(sk);
	if (err < 0)
		goto out;
	nl_socket_modify_cb(sk, NL_CB_VALID, NL_CB_CUSTOM, on_diag_msg, c);
	for (i = 0; i < ARRAY_SIZE(families); i++) {
		err = idiagnl_send_simple(sk, NLM_F_DUMP, families[i], IDIAGNL_SS_ALL, 0);
		if (err < 0)
			break;
		err = nl_recvmsgs_default(sk);
		if (err < 0)
			break;
	}
out:
	nl_socket_free(sk);
	if (err < 0) {
		p_err("inet_diag dump: %s", nl_geterror(err));
		return -1;
	}
	return c->err;
}

/* Dumps once per network namespace the owners live in, entering it when it is not ours. */
static int dump_all_netns(struct sockctx *c)
{
	uint64_t self = netns_of(getpid()), *seen = NULL;
	size_t nseen = 0, i, j;
	int self_fd = -1, ret = 0;

	for (i = 0; i < c->nowners && !ret; i++) {
		uint64_t ns = c->owners[i].netns;
		char path[64];
		int fd;

		for (j = 0; j < nseen && seen[j] != ns; j++)
			;
		if (j < nseen)
			continue;
		seen = realloc(seen, (nseen + 1) * sizeof(*seen));
		if (!seen)
			return -ENOMEM;
		seen[nseen++] = ns;
		c->cur_netns = ns;
		if (ns == self) {
			ret = dump_tcp(c);
			continue;
		}
		if (self_fd < 0)
			self_fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
		snprintf(path, sizeof(path), "/proc/%d/ns/net", c->owners[i].pid);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (self_fd < 0 || fd < 0 || setns(fd, CLONE_NEWNET)) {
			p_debug("cannot enter the network namespace of pid %d: %s",
				c->owners[i].pid, strerror(errno));
			if (fd >= 0)
				close(fd);
			continue;
		}
		close(fd);
		ret = dump_tcp(c);
		if (setns(self_fd, CLONE_NEWNET)) {
			p_err("returning to our network namespace: %s", strerror(errno));
			ret = -1;
		}
	}
	if (self_fd >= 0)
		close(self_fd);
	free(seen);
	return ret;
}

static int cmp_row(const void *a, const void *b)
{
	const struct row *x = a, *y = b;

	if (x->o->pid != y->o->pid)
		return x->o->pid < y->o->pid ? -1 : 1;
	return strcmp(x->local, y->local);
}

static void print_rows(const struct sockctx *c)
{
	static const char *const hdr[] = { "PID", "COMM", "STATE", "LOCAL", "PEER", "VIA" };
	struct table *t;
	char pid[16];
	size_t i;

	if (json_output) {
		jsonw_start_array(json_wtr);
		for (i = 0; i < c->nrows; i++) {
			const struct row *r = &c->rows[i];

			jsonw_start_object(json_wtr);
			jsonw_uint_field(json_wtr, "pid", r->o->pid);
			jsonw_string_field(json_wtr, "comm", r->o->comm);
			jsonw_string_field(json_wtr, "cgroup", r->o->cgroup);
			jsonw_string_field(json_wtr, "state", r->state);
			jsonw_string_field(json_wtr, "local", r->local);
			jsonw_string_field(json_wtr, "peer", r->peer);
			jsonw_string_field(json_wtr, "via", r->via);
			jsonw_end_object(json_wtr);
		}
		jsonw_end_array(json_wtr);
		return;
	}
	t = table_new(hdr, ARRAY_SIZE(hdr));
	for (i = 0; i < c->nrows; i++) {
		const struct row *r = &c->rows[i];

		snprintf(pid, sizeof(pid), "%d", r->o->pid);
		table_add(t, pid, r->o->comm, r->state, r->local, r->peer, r->via);
	}
	table_print(t, stdout);
	table_free(t);
}

static int do_list(int argc, char **argv)
{
	ag_ctl_response *status = NULL, *cgroups = NULL;
	struct sockctx c = {};
	char cgroot[PATH_MAX];
	size_t i, n;
	int ret = -1, err;

	while (argc) {
		if (!strcmp(*argv, "--bypass")) {
			c.bypass_only = true;
			NEXT_ARG();
		} else {
			return BAD_ARG();
		}
	}

	status = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_STATUS);
	if (!status)
		return -1;
	cgroups = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_CGROUP_LIST);
	if (!cgroups)
		goto out;
	if (status->status)
		c.listen_port = status->status->listen_port;
	p_debug("gateway port %u", c.listen_port);
	if (ag_cgroup2_root(cgroot, sizeof(cgroot))) {
		if (!status->status || !status->status->cgroup_root[0]) {
			p_err("no cgroup2 filesystem is mounted");
			goto out;
		}
		snprintf(cgroot, sizeof(cgroot), "%s", status->status->cgroup_root);
	}

	for (i = 0; i < cgroups->n_cgroups; i++) {
		err = walk_cgroup(&c, cgroot, cgroups->cgroups[i]->path);
		if (err) {
			p_err("reading cgroup %s: %s", cgroups->cgroups[i]->path, strerror(-err));
			goto out;
		}
	}
	/* Nested tagged cgroups list a process twice: keep it once. */
	if (c.nprocs)
		qsort(c.procs, c.nprocs, sizeof(*c.procs), cmp_proc);
	for (i = 0, n = 0; i < c.nprocs; i++) {
		if (n && c.procs[n - 1].pid == c.procs[i].pid)
			continue;
		c.procs[n++] = c.procs[i];
	}
	c.nprocs = n;
	for (i = 0; i < c.nprocs; i++) {
		err = add_owners_of(&c, &c.procs[i]);
		if (err) {
			p_err("reading /proc: %s", strerror(-err));
			goto out;
		}
	}
	/* A socket shared across fork is shown once, under its lowest pid. */
	if (c.nowners)
		qsort(c.owners, c.nowners, sizeof(*c.owners), cmp_owner);
	for (i = 0, n = 0; i < c.nowners; i++) {
		if (n && c.owners[n - 1].ino == c.owners[i].ino)
			continue;
		c.owners[n++] = c.owners[i];
	}
	c.nowners = n;

	if (c.nowners && dump_all_netns(&c))
		goto out;
	if (c.nrows)
		qsort(c.rows, c.nrows, sizeof(*c.rows), cmp_row);
	print_rows(&c);
	ret = 0;
out:
	free(c.rows);
	free(c.owners);
	free(c.procs);
	ag_ctl_response_free(cgroups);
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
		"Usage: %1$s %2$s { list | show } [--bypass]\n"
		"       %1$s %2$s help\n"
		"\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "socket");
	return 0;
}

static const struct cmd cmds[] = {
	{ "list", do_list },
	{ "show", do_list },
	{ "help", do_help },
	{ 0 }
};

int do_socket(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
