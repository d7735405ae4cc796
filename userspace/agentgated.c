// SPDX-License-Identifier: GPL-2.0
/*
 * agentgated: loads the policy, the BPF programs and the workers, attaches to the tagged
 * cgroups, and runs the main loop (signals, control socket, kernel events) until SIGTERM.
 * Every startup failure is one clear line and exit status 1.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "agentgate.h"
#include "approval.h"
#include "audit.h"
#include "bpf_loader.h"
#include "cgroup.h"
#include "cred.h"
#include "ctl.h"
#include "daemon.h"
#include "log.h"
#include "pins.h"
#include "proto_pg.h"
#include "tls.h"

#define DRAIN_TIMEOUT_MS 10000
/* Open files the daemon asks for (root only; see main()). */
#define AG_NOFILE_WANT 262144

static struct ag_daemon daemon_ctx;
static uint64_t drain_deadline;

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: agentgated [--config FILE] [--state-dir DIR] [--socket PATH] [--foreground]\n"
		"                  [--log-level error|warn|info|debug] [--bpffs DIR] [--port PORT]\n"
		"                  [--mark MARK] [--fastpath on|off] [--kernel-relay on|off]\n"
		"                  [--workers N]\n"
		"                  [--pg-max-message BYTES] [--ca-cert FILE --ca-key FILE]\n"
		"                  [--version]\n"
		"\n"
		"  --config FILE     policy file (default %s)\n"
		"  --state-dir DIR   state: sessions.log, tags, ... (default %s)\n"
		"  --socket PATH     control socket for agctl (default %s)\n"
		"  --bpffs DIR       where programs, links and maps are pinned (default %s)\n"
		"  --port PORT       gateway listener on 127.0.0.1 and ::1 (default %d)\n"
		"  --mark MARK       SO_MARK of the gateway's sockets (default 0x%x)\n"
		"  --fastpath on|off sk_msg fast path on the agent-gateway leg (default: policy's\n"
		"                    gateway.fastpath, else off)\n"
		"  --kernel-relay on|off  protocol: tcp sessions relayed in the kernel (sk_skb\n"
		"                    verdict on a sockhash) once both legs are up (default off)\n"
		"  --workers N       worker threads (default: one per CPU)\n"
		"  --pg-max-message BYTES  largest PostgreSQL message accepted from an agent\n"
		"                    (k/M suffixes; default 64M); a larger one ends its session\n"
		"  --ca-cert FILE --ca-key FILE  the CA that signs the leaves shown to agents\n"
		"                    (default: created at first start in STATE-DIR/ca/)\n",
		AG_DEFAULT_CONFIG, AG_DEFAULT_STATE_DIR, AG_DEFAULT_SOCKET, AG_DEFAULT_PIN_ROOT,
		AG_DEFAULT_PORT, AG_DEFAULT_MARK);
}

static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];

	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(buf, mode) && errno != EEXIST)
		return -errno;
	return 0;
}

/* daemon() moves to "/": a path given relative to where we started must keep its meaning. */
static int absolute_path(const char **path, char *buf, size_t len)
{
	char cwd[PATH_MAX];

	if ((*path)[0] == '/')
		return 0;
	if (!getcwd(cwd, sizeof(cwd)))
		return -errno;
	if ((size_t)snprintf(buf, len, "%s/%s", cwd, *path) >= len)
		return -ENAMETOOLONG;
	*path = buf;
	return 0;
}

static const char *deny_reason(__u32 r)
{
	switch (r) {
	case AG_DENY_NO_DAEMON:
		return "gateway not listening: connect refused in the kernel (fail closed)";
	case AG_DENY_PROTO:
		return "a connection that is not TCP (SCTP): refused in the kernel";
	case AG_DENY_NO_STORAGE:
		return "could not record the caller's identity: refused in the kernel";
	case AG_DENY_FOREIGN_SOCKET:
		return "a socket made outside the tagged cgroups (before moving in, or passed over "
		       "a Unix socket): refused in the kernel";
	default:
		return "refused in the kernel";
	}
}

static int on_kernel_event(void *ctx, const struct ag_event *ev)
{
	struct ag_daemon *d = ctx;

	d->events_received++;
	if (ev->kind == AG_EV_DENY) {
		char ip[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN + 16];
		const struct ag_endpoint *e = &ev->info.orig_dst;

		if (e->family == AF_INET) {
			inet_ntop(AF_INET, e->addr + 12, ip, sizeof(ip));
			snprintf(dst, sizeof(dst), "%s:%u", ip, e->port);
		} else {
			inet_ntop(AF_INET6, e->addr, ip, sizeof(ip));
			snprintf(dst, sizeof(dst), "[%s]:%u", ip, e->port);
		}
		pr_info("kernel refused %s (pid %u, %.16s) → %s: %s", "connect", ev->info.tgid,
			ev->info.comm, dst, deny_reason(ev->reason));
		ag_slog_kernel_deny(d, ev, deny_reason(ev->reason),
				    ev->info.boot_ns ? ag_boot_to_unix_ns(ev->info.boot_ns) :
						       ag_unix_ns(),
				    dst);
	}
	return 0;
}

static void on_events(struct ag_io *io, uint32_t events)
{
	struct ag_daemon *d = io->data;

	ag_bpf_events_consume(d->bpf);
}

static void begin_drain(struct ag_daemon *d)
{
	if (d->draining)
		return;
	d->draining = true;
	pr_info("stopping: no new sessions; draining %zu live session(s) (up to %d s); "
		"links stay pinned: tagged connects now fail until agentgated is back",
		d->nsessions, DRAIN_TIMEOUT_MS / 1000);
	ag_workers_close_listeners(d);
	drain_deadline = ag_mono_ms() + DRAIN_TIMEOUT_MS;
}

static void on_signal(struct ag_io *io, uint32_t events)
{
	struct ag_daemon *d = io->data;
	struct signalfd_siginfo si;

	while (read(io->fd, &si, sizeof(si)) == sizeof(si)) {
		char err[512];

		switch (si.ssi_signo) {
		case SIGHUP:
			ag_daemon_reload(d, err, sizeof(err));
			break;
		case SIGTERM:
		case SIGINT:
			if (d->draining) {
				ag_loop_stop(d->loop);
				break;
			}
			begin_drain(d);
			break;
		default:
			break;
		}
	}
}

static void main_tick(void *arg)
{
	struct ag_daemon *d = arg;

	ag_bpf_events_consume(d->bpf);
	ag_daemon_seq_tick(d);
	ag_audit_tick();
	/* The control socket's listener, paused when fds ran out (ctl_server.c). */
	if (d->ctl_io.fd >= 0 && d->ctl_io.loop && !d->ctl_io.events)
		ag_loop_mod(&d->ctl_io, EPOLLIN);
	if (d->draining) {
		size_t n;

		pthread_mutex_lock(&d->sess_lock);
		n = d->nsessions;
		pthread_mutex_unlock(&d->sess_lock);
		if (!n || ag_mono_ms() > drain_deadline)
			ag_loop_stop(d->loop);
	}
}

/* Every approval event (requested, decided, expired, cancelled) is an audit record. */
static void audit_approval_event(const struct ag_approval_info *a)
{
	const char *state = a->state == AG_APPROVAL_PENDING   ? "requested"
			    : a->state == AG_APPROVAL_EXPIRED ? "timeout"
							      : ag_approval_state_name(a->state);
	bool decided = a->state == AG_APPROVAL_APPROVED || a->state == AG_APPROVAL_DENIED;

	ag_audit_approval(a->session, a->id, state, a->rule, a->statement,
			  decided ? a->decided_by : NULL, decided ? a->decided_uid : 0,
			  a->state == AG_APPROVAL_APPROVED ? ag_approval_scope_name(a->scope) : NULL,
			  a->reason[0] ? a->reason : NULL);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "state-dir", required_argument, NULL, 's' },
		{ "socket", required_argument, NULL, 'S' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "bpffs", required_argument, NULL, 'B' },
		{ "port", required_argument, NULL, 'P' },
		{ "mark", required_argument, NULL, 'm' },
		{ "fastpath", required_argument, NULL, 'F' },
		{ "kernel-relay", required_argument, NULL, 'R' },
		{ "workers", required_argument, NULL, 'w' },
		{ "pg-max-message", required_argument, NULL, 'M' },
		{ "ca-cert", required_argument, NULL, 'C' },
		{ "ca-key", required_argument, NULL, 'K' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{},
	};
	struct ag_daemon *d = &daemon_ctx;
	char err[1024] = "";
	struct ag_policy *pol;
	sigset_t mask;
	int opt, sfd, rc, ret = 1;

	d->opts.config = AG_DEFAULT_CONFIG;
	d->opts.state_dir = AG_DEFAULT_STATE_DIR;
	d->opts.socket = AG_DEFAULT_SOCKET;
	d->opts.pin_root = AG_DEFAULT_PIN_ROOT;
	d->opts.port = AG_DEFAULT_PORT;
	d->opts.mark = AG_DEFAULT_MARK;
	d->opts.fastpath = -1;
	d->slog_fd = -1;
	d->ctl_io.fd = -1;

	while ((opt = getopt_long(argc, argv, "c:s:S:fl:B:P:m:F:R:w:M:C:K:Vh", longopts, NULL)) !=
	       -1) {
		char *end;
		unsigned long v;
		enum ag_log_level lvl;

		switch (opt) {
		case 'c':
			d->opts.config = optarg;
			break;
		case 's':
			d->opts.state_dir = optarg;
			break;
		case 'S':
			d->opts.socket = optarg;
			break;
		case 'C':
			d->opts.ca_cert = optarg;
			break;
		case 'K':
			d->opts.ca_key = optarg;
			break;
		case 'f':
			d->opts.foreground = true;
			break;
		case 'l':
			if (ag_log_parse_level(optarg, &lvl)) {
				pr_err("--log-level: '%s' is not one of error, warn, info, debug",
				       optarg);
				return 1;
			}
			ag_log_set_level(lvl);
			break;
		case 'B':
			d->opts.pin_root = optarg;
			break;
		case 'P':
			v = strtoul(optarg, &end, 10);
			if (*end || !v || v > 65535) {
				pr_err("--port: '%s' is not a port (1-65535)", optarg);
				return 1;
			}
			d->opts.port = v;
			break;
		case 'm':
			v = strtoul(optarg, &end, 0);
			if (*end || !v || v > UINT32_MAX) {
				pr_err("--mark: '%s' is not a non-zero 32-bit mark", optarg);
				return 1;
			}
			d->opts.mark = v;
			break;
		case 'F':
			if (!strcmp(optarg, "on"))
				d->opts.fastpath = 1;
			else if (!strcmp(optarg, "off"))
				d->opts.fastpath = 0;
			else {
				pr_err("--fastpath: '%s' is not on or off", optarg);
				return 1;
			}
			break;
		case 'R':
			if (strcmp(optarg, "on") && strcmp(optarg, "off")) {
				pr_err("--kernel-relay: '%s' is not on or off", optarg);
				return 1;
			}
			d->opts.kernel_relay = !strcmp(optarg, "on");
			break;
		case 'M':
			v = strtoul(optarg, &end, 10);
			if (*end == 'k' || *end == 'K')
				v <<= 10, end++;
			else if (*end == 'm' || *end == 'M')
				v <<= 20, end++;
			if (*end || v < 1024 || v > 0x3fffffff) {
				pr_err("--pg-max-message: '%s' is not a size from 1k to 1023M", optarg);
				return 1;
			}
			ag_pg_set_max_message(v);
			break;
		case 'w':
			v = strtoul(optarg, &end, 10);
			if (*end || !v || v > 64) {
				pr_err("--workers: '%s' is not 1-64", optarg);
				return 1;
			}
			d->opts.workers = v;
			break;
		case 'V':
			printf("agentgated %s\n", AG_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind < argc) {
		pr_err("unexpected argument '%s' (see --help)", argv[optind]);
		return 1;
	}
	if (geteuid() != 0) {
		pr_err("must run as root (loads BPF programs and attaches them to cgroups)");
		return 1;
	}

	ag_d = d;
	d->started_ns = ag_unix_ns();
	pthread_mutex_init(&d->pol_lock, NULL);
	pthread_mutex_init(&d->sess_lock, NULL);
	pthread_rwlock_init(&d->tag_lock, NULL);

	pol = ag_policy_load(d->opts.config, err, sizeof(err));
	if (!pol) {
		pr_err("%s", err);
		return 1;
	}
	{
		char warn[1024];

		if (ag_cred_check_policy(pol, err, sizeof(err), warn, sizeof(warn))) {
			pr_err("%s", err);
			goto out_policy;
		}
		if (warn[0])
			pr_warn("%s", warn);
	}
	if (ag_cgroup2_root(d->cg_root, sizeof(d->cg_root))) {
		pr_err("no cgroup2 filesystem mounted (none in /proc/mounts): agentgate needs "
		       "cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)");
		goto out_policy;
	}
	if (ag_cgroup_of_pid(0, d->self_cgroup, sizeof(d->self_cgroup)))
		snprintf(d->self_cgroup, sizeof(d->self_cgroup), "/");
	rc = mkdir_p(d->opts.state_dir, 0700);
	if (rc) {
		pr_err("state dir %s: %s", d->opts.state_dir, strerror(-rc));
		goto out_policy;
	}
	rc = ag_daemon_seq_init(d);
	if (rc) {
		pr_err("state dir %s is not writable: %s", d->opts.state_dir, strerror(-rc));
		goto out_policy;
	}
	/* Before daemon(): relative --ca-cert/--ca-key paths still mean what they said. */
	rc = ag_tls_init(d->opts.state_dir, d->opts.ca_cert, d->opts.ca_key, err, sizeof(err));
	if (rc) {
		pr_err("TLS: %s", err);
		goto out_policy;
	}
	d->kernel_relay = d->opts.kernel_relay;
	if (d->opts.fastpath >= 0)
		d->fastpath = d->opts.fastpath;
	else
		d->fastpath = pol->fastpath_set && pol->fastpath;

	if (!d->opts.foreground) {
		static char config[PATH_MAX], state_dir[PATH_MAX], socket[PATH_MAX];
		int e = absolute_path(&d->opts.config, config, sizeof(config));

		if (!e)
			e = absolute_path(&d->opts.state_dir, state_dir, sizeof(state_dir));
		if (!e)
			e = absolute_path(&d->opts.socket, socket, sizeof(socket));
		if (e) {
			pr_err("cannot make the paths absolute: %s", strerror(-e));
			goto out_policy;
		}
		if (daemon(0, 0)) {
			pr_err("daemon(): %s", strerror(errno));
			goto out_policy;
		}
	}

	ag_log_libbpf();
	{
		struct rlimit rl = { RLIM_INFINITY, RLIM_INFINITY };

		setrlimit(RLIMIT_MEMLOCK, &rl);
		/*
		 * Two fds a session (four while a raw relay's pipes live): the usual soft limit
		 * of 1024 would cap us near 500, and a hard limit of 20000 below 10,000 sessions.
		 * Root may go up to fs.nr_open; else the soft limit goes up to the hard one.
		 */
		if (!getrlimit(RLIMIT_NOFILE, &rl)) {
			struct rlimit want = { AG_NOFILE_WANT, AG_NOFILE_WANT };

			if (rl.rlim_max < AG_NOFILE_WANT && !setrlimit(RLIMIT_NOFILE, &want))
				rl = want;
			else if (rl.rlim_cur < rl.rlim_max) {
				rl.rlim_cur = rl.rlim_max;
				setrlimit(RLIMIT_NOFILE, &rl);
			}
		}
	}
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&mask);
	sigaddset(&mask, SIGHUP);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	/* Blocked before the workers start, so only the main loop's signalfd sees them. */
	pthread_sigmask(SIG_BLOCK, &mask, NULL);

	d->loop = ag_loop_new();
	if (!d->loop) {
		pr_err("epoll: %s", strerror(errno));
		goto out_policy;
	}
	if (ag_slog_open(d, err, sizeof(err))) {
		pr_err("%s", err);
		goto out_loop;
	}
	{
		struct ag_audit_config ac;

		/* After daemon(): the writer thread would not survive the fork. */
		if (ag_audit_config_parse(pol->audit, pol->naudit, &ac, err, sizeof(err)) ||
		    ag_audit_open(d->opts.state_dir, &ac, err, sizeof(err))) {
			pr_err("%s", err);
			goto out_slog;
		}
		__atomic_store_n(&ag_approval_event_hook, audit_approval_event, __ATOMIC_RELEASE);
	}
	/*
	 * The control socket before the BPF side: its probe refuses to run beside a live daemon,
	 * whose sk_msg program and settings in the pinned maps the load would otherwise replace.
	 */
	if (ag_ctl_server_start(d, err, sizeof(err))) {
		pr_err("%s", err);
		goto out_slog;
	}
	{
		struct ag_bpf_opts bo = {
			.pin_root = d->opts.pin_root,
			.port = d->opts.port,
			.mark = d->opts.mark,
			.fastpath = d->fastpath,
		};

		d->bpf = ag_bpf_load(&bo, on_kernel_event, d, err, sizeof(err));
		if (!d->bpf) {
			pr_err("%s", err);
			goto out_ctl;
		}
	}
	/* Listeners before the links: a tagged connect must find the gateway once attached. */
	if (ag_workers_start(d, err, sizeof(err))) {
		pr_err("%s", err);
		goto out_workers;
	}
	if (ag_daemon_set_policy(d, pol, err, sizeof(err))) {
		pol = NULL; /* owned by the daemon now */
		pr_err("%s", err);
		goto out_workers;
	}
	pol = NULL;

	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd < 0 || ag_loop_add(d->loop, &d->sig_io, sfd, EPOLLIN, on_signal)) {
		pr_err("signalfd: %s", strerror(errno));
		goto out_workers;
	}
	d->sig_io.data = d;
	if (!ag_loop_add(d->loop, &d->ev_io, ag_bpf_events_fd(d->bpf), EPOLLIN, on_events))
		d->ev_io.data = d;
	/* Events queued while no daemon ran (connects refused in the kernel). */
	ag_bpf_events_consume(d->bpf);

	{
		struct ag_policy_ref *r = ag_policy_get(d);

		pr_info("agentgated %s: listening on 127.0.0.1:%u and [::1]:%u, %zu tagged "
			"cgroup(s), policy %s, fast path %s, control %s",
			AG_VERSION, d->opts.port, d->opts.port, d->ntags, r->p->path,
			d->fastpath ? "on" : "off", d->opts.socket);
		ag_cred_sweep(r->p);
		ag_policy_put(r);
	}
	rc = ag_loop_run(d->loop, 200, main_tick, d);
	if (rc)
		pr_err("main loop: %s", strerror(-rc));
	ret = rc ? 1 : 0;
	pr_info("stopped; %llu session(s) served", (unsigned long long)d->sessions_total);

out_workers:
	ag_workers_stop(d);
	ag_cred_shutdown(10000);
	ag_daemon_seq_fini(d);
	if (d->sig_io.loop) {
		ag_loop_del(&d->sig_io);
		close(d->sig_io.fd);
	}
	if (d->ev_io.loop)
		ag_loop_del(&d->ev_io);
	ag_bpf_free(d->bpf);
out_ctl:
	ag_ctl_server_stop(d);
out_slog:
	__atomic_store_n(&ag_approval_event_hook, NULL, __ATOMIC_RELEASE);
	ag_audit_close(); /* after the workers: their sessions' ends are recorded */
	ag_slog_close(d);
out_loop:
	ag_loop_free(d->loop);
out_policy:
	ag_policy_free(pol);
	if (d->pol)
		ag_policy_put(d->pol);
	free(d->tags);
	ag_tls_fini();
	return ret;
}
