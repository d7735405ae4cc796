// SPDX-License-Identifier: GPL-2.0
/*
 * The approval table. Each request is an entry with two owners while its session waits: the
 * table and the handler that holds the statement. A decision (agctl on the main loop, or expiry
 * on this module's timer thread) is posted to the session's worker with ag_loop_call(); the
 * handler's ag_approval_cancel() runs on that same thread, so "delivered" and "cancelled" are
 * decided under the table's lock and the callback never meets a freed session. Decisions that
 * outlive their statement are grants: the rule for the rest of a session, or a statement
 * fingerprint for an agent and target until a ttl. approvals.notify commands run on a notifier
 * thread of their own (posix_spawn, the request as JSON on stdin, a deadline, SIGKILL), so a
 * hanging hook never holds an approval or a loop up; they get a clean environment and no fd but
 * stdin, stdout and stderr.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "approval.h"
#include "daemon.h"
#include "jsonw.h"
#include "log.h"
#include "loop.h"
#include "policy.h"
#include "session.h"

/*
 * What a notify command gets for an environment: nothing of the daemon's own (its environment
 * may hold what the command has no business seeing); the request comes on stdin.
 */
static const char *const notify_env[] = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", NULL };

/* Decided approvals kept for list/show (and watch) after the fact. */
#define KEEP_DECIDED 256
/* A notify command gets this long to read its stdin and exit. */
#define NOTIFY_DEADLINE_MS 10000
#define NOTIFY_QUEUE_MAX 64

void (*ag_approval_event_hook)(const struct ag_approval_info *a);
void (*ag_approval_watch_hook)(const struct ag_approval_info *a);

struct ag_approval {
	struct ag_approval *next; /* the table, newest first */
	int refs;
	struct ag_approval_info info;
	uint64_t deadline_ms; /* monotonic */
	/* While the session waits: where and whom to tell. */
	bool waiting;
	struct ag_session *s;
	struct ag_loop *loop;
	ag_approval_fn fn;
	void *arg;
};

struct grant {
	struct grant *next;
	enum ag_approval_scope scope;
	uint64_t session;
	char rule[64];
	char agent[128];
	char target[128];
	uint64_t fingerprint;
	int64_t expires_ns; /* fingerprint grants */
	char id[AG_APPROVAL_ID_MAX];
};

struct notify_job {
	struct notify_job *next;
	char *cmd;
	char *json;
	char id[AG_APPROVAL_ID_MAX];
};

static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t timer_cv;
static struct ag_approval *table;
static struct grant *grants;
static pthread_once_t threads_once = PTHREAD_ONCE_INIT;

static pthread_mutex_t nlk = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t notify_cv = PTHREAD_COND_INITIALIZER;
static struct notify_job *nq, **nq_tail = &nq;
static int nq_len;

const char *ag_approval_state_name(enum ag_approval_state s)
{
	static const char *const n[] = { "pending", "approved", "denied", "expired", "cancelled" };

	return (unsigned)s < sizeof(n) / sizeof(n[0]) ? n[s] : "unknown";
}

const char *ag_approval_scope_name(enum ag_approval_scope s)
{
	static const char *const n[] = { "once", "session", "fingerprint" };

	return (unsigned)s < sizeof(n) / sizeof(n[0]) ? n[s] : "unknown";
}

int ag_approval_scope_parse(const char *s, enum ag_approval_scope *out)
{
	static const char *const n[] = { "once", "session", "fingerprint" };
	size_t len = s ? strlen(s) : 0;

	for (int i = 0; len && i < 3; i++)
		if (!strncmp(s, n[i], len)) {
			*out = i;
			return 0;
		}
	return -EINVAL;
}

char *ag_approval_fmt_duration(uint64_t ms, char *buf, size_t len)
{
	uint64_t s = ms / 1000;
	size_t o = 0;

	if (ms % 1000 || !ms) {
		snprintf(buf, len, "%llums", (unsigned long long)ms);
		return buf;
	}
	buf[0] = '\0';
	if (s >= 3600)
		o += snprintf(buf + o, len - o, "%lluh", (unsigned long long)(s / 3600));
	if (s % 3600 >= 60 && o < len)
		o += snprintf(buf + o, len - o, "%llum", (unsigned long long)(s % 3600 / 60));
	if (s % 60 && o < len)
		snprintf(buf + o, len - o, "%llus", (unsigned long long)(s % 60));
	return buf;
}

static void str_or_null(struct jsonw *w, const char *name, const char *s)
{
	if (s && *s)
		jsonw_string_field(w, name, s);
	else
		jsonw_null_field(w, name);
}

void ag_approval_to_json(const struct ag_approval_info *a, struct jsonw *w)
{
	bool decided = a->state != AG_APPROVAL_PENDING;
	bool approved = a->state == AG_APPROVAL_APPROVED;
	char fp[24];

	jsonw_start_object(w);
	/* The contract fields (SPEC.md), in its order. */
	jsonw_string_field(w, "id", a->id);
	jsonw_uint_field(w, "session", a->session);
	jsonw_string_field(w, "agent", a->agent);
	jsonw_string_field(w, "target", a->target);
	jsonw_string_field(w, "protocol", a->protocol);
	jsonw_string_field(w, "statement", a->statement);
	jsonw_string_field(w, "rule", a->rule);
	jsonw_time_field(w, "requested_at", a->requested_ns);
	jsonw_time_field(w, "expires_at", a->expires_ns);
	jsonw_string_field(w, "state", ag_approval_state_name(a->state));
	/* The decision (null while pending). */
	str_or_null(w, "decided_by", decided ? a->decided_by : NULL);
	jsonw_time_field(w, "decided_at", decided ? a->decided_ns : 0);
	str_or_null(w, "reason", decided ? a->reason : NULL);
	str_or_null(w, "scope", approved ? ag_approval_scope_name(a->scope) : NULL);
	if (approved && a->scope == AG_APPROVAL_FINGERPRINT)
		jsonw_uint_field(w, "ttl_ms", a->ttl_ms);
	/* Extras. */
	jsonw_uint_field(w, "agent_uid", a->agent_uid);
	jsonw_uint_field(w, "timeout_ms", a->timeout_ms);
	if (a->fingerprint) {
		snprintf(fp, sizeof(fp), "%016llx", (unsigned long long)a->fingerprint);
		jsonw_string_field(w, "fingerprint", fp);
	} else {
		jsonw_null_field(w, "fingerprint");
	}
	jsonw_end_object(w);
}

int ag_approval_state_parse(const char *s, enum ag_approval_state *out)
{
	for (int i = AG_APPROVAL_PENDING; i <= AG_APPROVAL_CANCELLED; i++)
		if (s && !strcmp(s, ag_approval_state_name(i))) {
			*out = i;
			return 0;
		}
	return -EINVAL;
}

/* --- threads ------------------------------------------------------------------------------ */

static void *timer_main(void *arg);
static void *notify_main(void *arg);

static void threads_start(void)
{
	pthread_condattr_t ca;
	pthread_attr_t at;
	pthread_t t;
	sigset_t all, old;

	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&timer_cv, &ca);
	pthread_condattr_destroy(&ca);
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	/* Signals stay with the main loop's signalfd. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	if (pthread_create(&t, &at, timer_main, NULL))
		pr_err("approvals: cannot start the timer thread: approvals will not expire");
	else
		pthread_setname_np(t, "ag-approvals");
	if (pthread_create(&t, &at, notify_main, NULL))
		pr_err("approvals: cannot start the notifier thread: approvals.notify is not run");
	else
		pthread_setname_np(t, "ag-notify");
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&at);
}

static void put_locked(struct ag_approval *a)
{
	if (--a->refs == 0)
		free(a);
}

static void put(struct ag_approval *a)
{
	pthread_mutex_lock(&lk);
	put_locked(a);
	pthread_mutex_unlock(&lk);
}

static void fire_hooks(const struct ag_approval_info *info)
{
	void (*ev)(const struct ag_approval_info *) =
		__atomic_load_n(&ag_approval_event_hook, __ATOMIC_ACQUIRE);
	void (*wh)(const struct ag_approval_info *) =
		__atomic_load_n(&ag_approval_watch_hook, __ATOMIC_ACQUIRE);

	if (ev)
		ev(info);
	if (wh)
		wh(info);
}

/* On the session's worker: tell the handler, unless it cancelled first. */
static void deliver(void *arg)
{
	struct ag_approval *a = arg;
	struct ag_approval_info info;
	struct ag_session *s;
	ag_approval_fn fn;
	void *fn_arg;
	bool call;

	pthread_mutex_lock(&lk);
	call = a->waiting;
	a->waiting = false;
	s = a->s;
	fn = a->fn;
	fn_arg = a->arg;
	info = a->info;
	pthread_mutex_unlock(&lk);
	if (call) {
		__atomic_sub_fetch(&s->pending_approvals, 1, __ATOMIC_RELAXED);
		/* The handler's reference goes with the callback: the handle is gone after it. */
		put(a);
		fn(s, fn_arg, &info);
	}
	put(a);
}

/* Settles a pending entry (lock held); posts the decision to a waiting session. */
static void finish_locked(struct ag_approval *a, enum ag_approval_state st)
{
	a->info.state = st;
	a->info.decided_ns = ag_unix_ns();
	if (a->waiting) {
		a->refs++;
		if (ag_loop_call(a->loop, deliver, a)) {
			a->refs--;
			pr_err("approvals: cannot reach the worker of session %llu for %s",
			       (unsigned long long)a->info.session, a->info.id);
		}
	}
}

static void add_grant_locked(const struct ag_approval *a)
{
	struct grant *g;

	if (a->info.scope == AG_APPROVAL_ONCE)
		return;
	g = calloc(1, sizeof(*g));
	if (!g) {
		pr_warn("approvals: out of memory: the %s grant of %s is not kept",
			ag_approval_scope_name(a->info.scope), a->info.id);
		return;
	}
	g->scope = a->info.scope;
	g->session = a->info.session;
	snprintf(g->rule, sizeof(g->rule), "%s", a->info.rule);
	snprintf(g->agent, sizeof(g->agent), "%s", a->info.agent);
	snprintf(g->target, sizeof(g->target), "%s", a->info.target);
	g->fingerprint = a->info.fingerprint;
	g->expires_ns = ag_unix_ns() + (int64_t)a->info.ttl_ms * 1000000LL;
	snprintf(g->id, sizeof(g->id), "%s", a->info.id);
	g->next = grants;
	grants = g;
}

static void *timer_main(void *arg)
{
	pthread_mutex_lock(&lk);
	for (;;) {
		uint64_t now = ag_mono_ms(), next = UINT64_MAX;
		struct ag_approval_info fired[16];
		int nfired = 0;

		for (struct ag_approval *a = table; a; a = a->next) {
			if (a->info.state != AG_APPROVAL_PENDING)
				continue;
			if (a->deadline_ms <= now && nfired < 16) {
				snprintf(a->info.decided_by, sizeof(a->info.decided_by), "timeout");
				finish_locked(a, AG_APPROVAL_EXPIRED);
				fired[nfired++] = a->info;
			} else if (a->deadline_ms < next) {
				next = a->deadline_ms;
			}
		}
		if (nfired) {
			pthread_mutex_unlock(&lk);
			for (int i = 0; i < nfired; i++) {
				pr_info("approval %s (session %llu, rule %s) timed out",
					fired[i].id, (unsigned long long)fired[i].session,
					fired[i].rule);
				fire_hooks(&fired[i]);
			}
			pthread_mutex_lock(&lk);
			continue;
		}
		if (next == UINT64_MAX) {
			pthread_cond_wait(&timer_cv, &lk);
		} else {
			struct timespec ts = { .tv_sec = next / 1000,
					       .tv_nsec = (next % 1000) * 1000000 };

			pthread_cond_timedwait(&timer_cv, &lk, &ts);
		}
	}
	return NULL;
}

/* --- notify ---------------------------------------------------------------------------------- */

static void notify_run(const struct notify_job *j)
{
	char *const argv[] = { "/bin/sh", "-c", j->cmd, NULL };
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t sa;
	sigset_t none, all;
	uint64_t deadline = ag_mono_ms() + NOTIFY_DEADLINE_MS;
	size_t len = strlen(j->json), off = 0;
	int p[2], rc, status = 0;
	bool killed = false;
	pid_t pid;

	if (pipe2(p, O_CLOEXEC)) {
		pr_warn("approvals.notify for %s: pipe: %s", j->id, strerror(errno));
		return;
	}
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, p[0], 0);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	/* stdin, stdout and stderr only: no socket, key or log fd of the daemon leaks. */
	posix_spawn_file_actions_addclosefrom_np(&fa, 3);
	/*
	 * Signals as a fresh process has them: this thread blocks all of them (the main loop's
	 * signalfd takes them) and the daemon ignores SIGPIPE; a hook inherits neither.
	 */
	posix_spawnattr_init(&sa);
	sigemptyset(&none);
	sigfillset(&all);
	posix_spawnattr_setsigmask(&sa, &none);
	posix_spawnattr_setsigdefault(&sa, &all);
	posix_spawnattr_setflags(&sa, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	rc = posix_spawn(&pid, "/bin/sh", &fa, &sa, argv, (char **)notify_env);
	posix_spawnattr_destroy(&sa);
	posix_spawn_file_actions_destroy(&fa);
	close(p[0]);
	if (rc) {
		close(p[1]);
		pr_warn("approvals.notify for %s: cannot run %s: %s", j->id, j->cmd, strerror(rc));
		return;
	}
	fcntl(p[1], F_SETFL, O_NONBLOCK);
	while (off < len) {
		struct pollfd pf = { .fd = p[1], .events = POLLOUT };
		int64_t left = (int64_t)(deadline - ag_mono_ms());
		ssize_t n;

		if (left <= 0 || poll(&pf, 1, (int)left) <= 0)
			break;
		n = write(p[1], j->json + off, len - off);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (n <= 0)
			break; /* it does not read its stdin: fine */
		off += n;
	}
	close(p[1]);
	for (;;) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		if (r == pid || (r < 0 && errno != EINTR))
			break;
		if (ag_mono_ms() >= deadline) {
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			killed = true;
			break;
		}
		usleep(20000);
	}
	if (killed)
		pr_warn("approvals.notify for %s: %s still ran after %d s: killed", j->id, j->cmd,
			NOTIFY_DEADLINE_MS / 1000);
	else if (WIFEXITED(status) && WEXITSTATUS(status))
		pr_warn("approvals.notify for %s: %s exited with %d", j->id, j->cmd,
			WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		pr_warn("approvals.notify for %s: %s killed by signal %d", j->id, j->cmd,
			WTERMSIG(status));
	else
		pr_debug("approvals.notify for %s: done", j->id);
}

static void *notify_main(void *arg)
{
	for (;;) {
		struct notify_job *j;

		pthread_mutex_lock(&nlk);
		while (!nq)
			pthread_cond_wait(&notify_cv, &nlk);
		j = nq;
		nq = j->next;
		if (!nq)
			nq_tail = &nq;
		nq_len--;
		pthread_mutex_unlock(&nlk);
		notify_run(j);
		free(j->cmd);
		free(j->json);
		free(j);
	}
	return NULL;
}

static void notify_queue(const char *cmd, const struct ag_approval_info *info)
{
	struct notify_job *j = calloc(1, sizeof(*j));
	size_t len = 0;
	FILE *f;

	if (!j)
		goto fail;
	snprintf(j->id, sizeof(j->id), "%s", info->id);
	j->cmd = strdup(cmd);
	f = open_memstream(&j->json, &len);
	if (f) {
		struct jsonw *w = jsonw_new(f, false);

		if (w) {
			ag_approval_to_json(info, w);
			jsonw_destroy(&w);
		}
		fclose(f);
	}
	if (!j->cmd || !j->json)
		goto fail;
	pthread_mutex_lock(&nlk);
	if (nq_len >= NOTIFY_QUEUE_MAX) {
		pthread_mutex_unlock(&nlk);
		pr_warn("approvals.notify for %s: %d notifications still queued: not run", info->id,
			NOTIFY_QUEUE_MAX);
		goto drop;
	}
	*nq_tail = j;
	nq_tail = &j->next;
	nq_len++;
	pthread_cond_signal(&notify_cv);
	pthread_mutex_unlock(&nlk);
	return;
fail:
	pr_warn("approvals.notify for %s: out of memory: not run", info->id);
drop:
	if (j) {
		free(j->cmd);
		free(j->json);
		free(j);
	}
}

/* --- requests ------------------------------------------------------------------------------ */

static void make_id(char id[AG_APPROVAL_ID_MAX])
{
	static const char b32[] = "abcdefghijkmnpqrstuvwxyz23456789";
	uint8_t r[8];

	if (getrandom(r, sizeof(r), 0) != sizeof(r)) {
		uint64_t t = ag_unix_ns();

		memcpy(r, &t, sizeof(r));
	}
	memcpy(id, "ap-", 3);
	for (int i = 0; i < 8; i++)
		id[3 + i] = b32[r[i] & 31];
	id[11] = '\0';
}

static struct ag_approval *find_locked(const char *id)
{
	for (struct ag_approval *a = table; a; a = a->next)
		if (!strcmp(a->info.id, id))
			return a;
	return NULL;
}

/* Drops the oldest decided entries beyond KEEP_DECIDED. */
static void trim_locked(void)
{
	struct ag_approval **pp = &table;
	int decided = 0;

	while (*pp) {
		struct ag_approval *a = *pp;

		if (a->info.state != AG_APPROVAL_PENDING && ++decided > KEEP_DECIDED) {
			*pp = a->next;
			put_locked(a);
			continue;
		}
		pp = &a->next;
	}
}

static void excerpt(const char *text, size_t len, char *out, size_t outlen)
{
	size_t j = 0;

	for (size_t i = 0; i < len && text[i] && j + 4 < outlen; i++)
		out[j++] = isprint((unsigned char)text[i]) ? text[i] : ' ';
	if (len && j + 4 >= outlen) {
		memcpy(out + j, "...", 3);
		j += 3;
	}
	out[j] = '\0';
}

struct ag_approval *ag_approval_request(struct ag_session *s, const char *protocol,
					const char *text, size_t len, const char *rule,
					uint64_t fingerprint, ag_approval_fn fn, void *arg,
					char id[AG_APPROVAL_ID_MAX])
{
	const struct ag_policy *p = s->pol ? s->pol->p : NULL;
	uint64_t timeout = AG_APPROVAL_TIMEOUT_DEFAULT_MS;
	const struct ag_kv *kv;
	const char *notify = NULL;
	struct ag_approval *a;
	struct ag_approval_info info;

	pthread_once(&threads_once, threads_start);
	if (p) {
		kv = ag_kv_get(p->approvals, p->napprovals, "timeout");
		if (kv && kv->value && ag_parse_duration(kv->value, &timeout))
			timeout = AG_APPROVAL_TIMEOUT_DEFAULT_MS;
		kv = ag_kv_get(p->approvals, p->napprovals, "notify");
		if (kv && kv->value && kv->value[0])
			notify = kv->value;
	}
	a = calloc(1, sizeof(*a));
	if (!a)
		return NULL;
	a->refs = 2; /* the table's and the handler's */
	a->waiting = true;
	a->s = s;
	a->loop = ag_session_loop(s);
	a->fn = fn;
	a->arg = arg;
	a->deadline_ms = ag_mono_ms() + timeout;
	make_id(a->info.id);
	a->info.session = s->id;
	a->info.agent_uid = s->info.uid;
	snprintf(a->info.agent, sizeof(a->info.agent), "%s", s->agent);
	snprintf(a->info.target, sizeof(a->info.target), "%s", s->target_name);
	snprintf(a->info.protocol, sizeof(a->info.protocol), "%s", protocol);
	excerpt(text, len, a->info.statement, sizeof(a->info.statement));
	snprintf(a->info.rule, sizeof(a->info.rule), "%s", rule ? rule : "default");
	a->info.fingerprint = fingerprint;
	a->info.requested_ns = ag_unix_ns();
	a->info.timeout_ms = timeout;
	a->info.expires_ns = a->info.requested_ns + (int64_t)timeout * 1000000LL;
	a->info.state = AG_APPROVAL_PENDING;
	pthread_mutex_lock(&lk);
	while (find_locked(a->info.id))
		make_id(a->info.id);
	a->next = table;
	table = a;
	trim_locked();
	info = a->info;
	pthread_cond_signal(&timer_cv);
	pthread_mutex_unlock(&lk);
	__atomic_add_fetch(&s->pending_approvals, 1, __ATOMIC_RELAXED);
	if (id)
		snprintf(id, AG_APPROVAL_ID_MAX, "%s", info.id);
	pr_info("session %llu: approval %s requested by rule %s: %s", (unsigned long long)s->id,
		info.id, info.rule, info.statement);
	if (notify)
		notify_queue(notify, &info);
	fire_hooks(&info);
	return a;
}

void ag_approval_cancel(struct ag_approval *a)
{
	struct ag_approval_info info;
	bool was_waiting, changed = false;

	if (!a)
		return;
	pthread_mutex_lock(&lk);
	was_waiting = a->waiting;
	a->waiting = false;
	if (a->info.state == AG_APPROVAL_PENDING) {
		snprintf(a->info.decided_by, sizeof(a->info.decided_by), "cancelled");
		snprintf(a->info.reason, sizeof(a->info.reason),
			 "the session ended while it waited");
		finish_locked(a, AG_APPROVAL_CANCELLED);
		changed = true;
	}
	info = a->info;
	pthread_mutex_unlock(&lk);
	if (was_waiting) {
		__atomic_sub_fetch(&a->s->pending_approvals, 1, __ATOMIC_RELAXED);
		put(a);
	}
	if (changed) {
		pr_info("approval %s of session %llu cancelled: the session ended", info.id,
			(unsigned long long)info.session);
		fire_hooks(&info);
	}
}

int ag_approval_withdraw(uint64_t session, const char *why)
{
	struct ag_approval_info fired[8];
	int n = 0;

	pthread_mutex_lock(&lk);
	for (struct ag_approval *a = table; a && n < 8; a = a->next) {
		if (a->info.session != session || a->info.state != AG_APPROVAL_PENDING)
			continue;
		snprintf(a->info.decided_by, sizeof(a->info.decided_by), "agent");
		snprintf(a->info.reason, sizeof(a->info.reason), "%s", why);
		finish_locked(a, AG_APPROVAL_CANCELLED);
		fired[n++] = a->info;
	}
	pthread_mutex_unlock(&lk);
	for (int i = 0; i < n; i++) {
		pr_info("approval %s of session %llu withdrawn by the agent: %s", fired[i].id,
			(unsigned long long)session, why);
		fire_hooks(&fired[i]);
	}
	return n;
}

void ag_approval_session_end(uint64_t session)
{
	struct grant **pp = &grants;

	pthread_mutex_lock(&lk);
	while (*pp) {
		struct grant *g = *pp;

		if (g->scope == AG_APPROVAL_SESSION && g->session == session) {
			*pp = g->next;
			free(g);
			continue;
		}
		pp = &g->next;
	}
	pthread_mutex_unlock(&lk);
}

bool ag_approval_granted(const struct ag_session *s, const char *rule, uint64_t fingerprint,
			 char id[AG_APPROVAL_ID_MAX])
{
	int64_t now = ag_unix_ns();
	struct grant **pp = &grants;
	bool ok = false;

	if (!rule)
		rule = "default";
	pthread_mutex_lock(&lk);
	while (*pp && !ok) {
		struct grant *g = *pp;

		if (g->scope == AG_APPROVAL_FINGERPRINT && g->expires_ns <= now) {
			*pp = g->next;
			free(g);
			continue;
		}
		if (g->scope == AG_APPROVAL_SESSION)
			ok = g->session == s->id && !strcmp(g->rule, rule);
		else
			ok = fingerprint && g->fingerprint == fingerprint &&
			     !strcmp(g->agent, s->agent) && !strcmp(g->target, s->target_name);
		if (ok && id)
			snprintf(id, AG_APPROVAL_ID_MAX, "%s", g->id);
		pp = &g->next;
	}
	pthread_mutex_unlock(&lk);
	return ok;
}

/* --- decisions ------------------------------------------------------------------------------ */

static bool in_group(const char *user, gid_t primary, gid_t gid)
{
	gid_t *groups = NULL;
	int n = 64;
	bool found = false;

	if (primary == gid)
		return true;
	for (int tries = 0; tries < 4; tries++) {
		gid_t *ng = realloc(groups, n * sizeof(*groups));
		int want = n;

		if (!ng)
			break;
		groups = ng;
		if (getgrouplist(user, primary, groups, &want) >= 0) {
			for (int i = 0; i < want && !found; i++)
				found = groups[i] == gid;
			break;
		}
		n = want > n ? want : n * 2;
	}
	free(groups);
	return found;
}

bool ag_approval_is_approver(const struct ag_policy *p, uid_t uid, char *who, size_t wholen)
{
	static const char *const root_only[] = { "root" };
	struct passwd pw, *pwp = NULL;
	const struct ag_kv *kv;
	const char *const *list = root_only;
	size_t nlist = 1;
	char buf[4096];

	getpwuid_r(uid, &pw, buf, sizeof(buf), &pwp);
	if (pwp)
		snprintf(who, wholen, "%s", pwp->pw_name);
	else
		snprintf(who, wholen, "uid:%u", (unsigned)uid);
	kv = p ? ag_kv_get(p->approvals, p->napprovals, "approvers") : NULL;
	if (kv) {
		list = (const char *const *)kv->list;
		nlist = kv->nlist;
	}
	for (size_t i = 0; i < nlist; i++) {
		const char *e = list[i];

		if (!strncmp(e, "uid:", 4)) {
			char *end;
			unsigned long v = strtoul(e + 4, &end, 10);

			if (e[4] && !*end && v == uid)
				return true;
		} else if (!strncmp(e, "group:", 6)) {
			struct group gr, *grp = NULL;
			char gbuf[8192];

			if (pwp && !getgrnam_r(e + 6, &gr, gbuf, sizeof(gbuf), &grp) && grp &&
			    in_group(pwp->pw_name, pwp->pw_gid, grp->gr_gid))
				return true;
		} else if (pwp && !strcmp(e, pwp->pw_name)) {
			return true;
		}
	}
	return false;
}

int ag_approval_authorize(const struct ag_policy *p, uid_t uid, const char *id, char *who,
			  size_t wholen, char *err, size_t errlen)
{
	uint32_t agent_uid = 0;
	uint64_t session = 0;
	struct ag_approval *a;
	bool listed;

	pthread_mutex_lock(&lk);
	a = find_locked(id);
	if (a) {
		agent_uid = a->info.agent_uid;
		session = a->info.session;
	}
	pthread_mutex_unlock(&lk);
	if (!a) {
		snprintf(err, errlen, "no approval %s", id);
		return -ENOENT;
	}
	listed = ag_approval_is_approver(p, uid, who, wholen);
	if (uid == agent_uid) {
		snprintf(err, errlen,
			 "%s (uid %u) runs the agent of session %llu: another approver must decide "
			 "(separation of duties)",
			 who, (unsigned)uid, (unsigned long long)session);
		return -EPERM;
	}
	if (!listed) {
		snprintf(err, errlen, "%s (uid %u) is not an approver (approvals.approvers%s)", who,
			 (unsigned)uid,
			 p && ag_kv_get(p->approvals, p->napprovals, "approvers")
				 ? ""
				 : " is not set: root only");
		return -EPERM;
	}
	return 0;
}

int ag_approval_decide(const char *id, bool approve, enum ag_approval_scope scope, uint64_t ttl_ms,
		       const char *who, uid_t uid, const char *reason, char *err, size_t errlen)
{
	struct ag_approval_info info;
	struct ag_approval *a;

	if (approve && scope == AG_APPROVAL_FINGERPRINT && ttl_ms > AG_APPROVAL_TTL_MAX_MS) {
		snprintf(err, errlen,
			 "ttl too long: a fingerprint grant lasts at most 7d (make it a policy rule)");
		return -ERANGE;
	}
	pthread_mutex_lock(&lk);
	a = find_locked(id);
	if (!a) {
		pthread_mutex_unlock(&lk);
		snprintf(err, errlen, "no approval %s", id);
		return -ENOENT;
	}
	if (a->info.state != AG_APPROVAL_PENDING) {
		snprintf(err, errlen, "approval %s is already %s", id,
			 ag_approval_state_name(a->info.state));
		pthread_mutex_unlock(&lk);
		return -EALREADY;
	}
	if (approve && scope == AG_APPROVAL_FINGERPRINT && !a->info.fingerprint) {
		pthread_mutex_unlock(&lk);
		snprintf(err, errlen,
			 "approval %s has no statement fingerprint: use scope once "
			 "or session",
			 id);
		return -EINVAL;
	}
	snprintf(a->info.decided_by, sizeof(a->info.decided_by), "%s", who);
	a->info.decided_uid = uid;
	snprintf(a->info.reason, sizeof(a->info.reason), "%s", reason ? reason : "");
	if (approve) {
		a->info.scope = scope;
		if (scope == AG_APPROVAL_FINGERPRINT)
			a->info.ttl_ms = ttl_ms ? ttl_ms : AG_APPROVAL_TTL_DEFAULT_MS;
		add_grant_locked(a);
	}
	finish_locked(a, approve ? AG_APPROVAL_APPROVED : AG_APPROVAL_DENIED);
	info = a->info;
	pthread_mutex_unlock(&lk);
	pr_info("approval %s (session %llu, rule %s) %s by %s%s%s", info.id,
		(unsigned long long)info.session, info.rule, approve ? "approved" : "denied", who,
		approve ? ", scope " : (info.reason[0] ? ": " : ""),
		approve ? ag_approval_scope_name(scope) : info.reason);
	fire_hooks(&info);
	return 0;
}

struct ag_approval_info *ag_approval_list(size_t *n)
{
	struct ag_approval_info *out;
	size_t cnt = 0, i;

	pthread_mutex_lock(&lk);
	for (struct ag_approval *a = table; a; a = a->next)
		cnt++;
	out = calloc(cnt + 1, sizeof(*out));
	/* Oldest first, like a log. */
	i = cnt;
	for (struct ag_approval *a = table; out && a; a = a->next)
		out[--i] = a->info;
	pthread_mutex_unlock(&lk);
	*n = out ? cnt : 0;
	return out;
}

int ag_approval_get(const char *id, struct ag_approval_info *out)
{
	struct ag_approval *a;

	pthread_mutex_lock(&lk);
	a = find_locked(id);
	if (a)
		*out = a->info;
	pthread_mutex_unlock(&lk);
	return a ? 0 : -ENOENT;
}
