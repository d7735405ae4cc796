// SPDX-License-Identifier: GPL-2.0
/*
 * The daemon's half of the control protocol (ctl.proto), on the main loop. The socket is open
 * to every local user (mode 0666) and each request is authorized by the peer's SO_PEERCRED uid:
 * root may do anything, other users only the approval commands and only as approvers of the
 * policy (approve/deny never for their own agent's requests: approval.c). Each client sends one framed Request and gets one framed
 * Response; `approval watch` keeps its connection and gets a Response per change. Reads and
 * writes are non-blocking with a per-client buffer, so a stuck client cannot stall the loop.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "approval.h"
#include "audit.h"
#include "bpf_loader.h"
#include "buf.h"
#include "cred.h"
#include "ctl.h"
#include "daemon.h"
#include "krelay.h"
#include "jsonw.h"
#include "log.h"
#include "session.h"
#include "tls.h"

struct ctl_client {
	struct ag_io io;
	struct ag_daemon *d;
	struct ag_buf in, out;
	bool replied;
	uid_t uid;		   /* SO_PEERCRED */
	bool awatch;		   /* approval watch: Responses pushed until it closes */
	struct ctl_client *anext; /* the approval watchers, on the main loop's thread only */
	uint64_t apolicy_gen;	  /* a watcher other than root: the policy that last listed it */
	bool watch;		   /* session watch: kept open, audit entries pushed */
	uint64_t watch_session;
	struct ctl_client *wnext; /* the session watchers, main loop only */
};

/* An approval watcher that reads this far behind is dropped. */
#define APPROVAL_WATCH_MAX_BACKLOG (1u << 20)
/* Requests of users other than root: the largest, and how many connections at once. */
#define USER_MAX_FRAME (64u << 10)
#define USER_MAX_CLIENTS 64

static int user_clients;

/* Connections per uid other than root: one user cannot take every slot from the approvers. */
#define USER_MAX_PER_UID 8
static struct {
	uid_t uid;
	int n;
} uid_slots[USER_MAX_CLIENTS];

static int *uid_count(uid_t uid, bool add)
{
	int *free_slot = NULL;

	for (size_t i = 0; i < USER_MAX_CLIENTS; i++) {
		if (uid_slots[i].n && uid_slots[i].uid == uid)
			return &uid_slots[i].n;
		if (!uid_slots[i].n && !free_slot) {
			free_slot = &uid_slots[i].n;
			if (add)
				uid_slots[i].uid = uid;
		}
	}
	return add ? free_slot : NULL;
}

static struct ctl_client *approval_watchers;
static struct ag_daemon *watch_d;

static void watch_del(struct ctl_client *c);
static void watch_add(struct ctl_client *c, uint64_t session, Agentgate__Ctl__Response *r);

/* c no longer watches approvals. */
static void awatch_del(struct ctl_client *c)
{
	if (!c->awatch)
		return;
	for (struct ctl_client **pp = &approval_watchers; *pp; pp = &(*pp)->anext)
		if (*pp == c) {
			*pp = c->anext;
			break;
		}
	c->awatch = false;
}

static void client_free(struct ctl_client *c)
{
	if (c->uid) {
		int *n = uid_count(c->uid, false);

		user_clients--;
		if (n && *n)
			(*n)--;
	}
	awatch_del(c);
	if (c->watch)
		watch_del(c);
	ag_loop_del(&c->io);
	close(c->io.fd);
	ag_buf_free(&c->in);
	ag_buf_free(&c->out);
	free(c);
}

static char *xstrdup(const char *s)
{
	return strdup(s ? s : "");
}

static Agentgate__Ctl__Session *session_pb(const struct ag_session *s)
{
	Agentgate__Ctl__Session *m = calloc(1, sizeof(*m));

	if (!m)
		return NULL;
	agentgate__ctl__session__init(m);
	m->id = s->id;
	m->agent = xstrdup(s->agent);
	m->cgroup = xstrdup(s->cgroup);
	m->pid = s->info.tgid;
	m->tid = s->info.tid;
	m->comm = xstrdup(s->info.comm);
	m->uid = s->info.uid;
	m->gid = s->info.gid;
	m->cgroup_id = s->info.cgroup_id;
	m->target = xstrdup(s->target_name);
	m->protocol = xstrdup(s->protocol);
	m->orig_dst = xstrdup(s->orig_dst);
	m->upstream = xstrdup(s->upstream);
	m->state = xstrdup(ag_session_state_name(s->state));
	m->started_at_ns = s->started_ns;
	ag_krelay_bytes(s, &m->bytes_up, &m->bytes_down); /* kernel relay: its share */
	m->bytes_up += s->bytes_up;
	m->bytes_down += s->bytes_down;
	m->statements = s->statements;
	m->blocked = s->blocked;
	m->masked_values = s->masked_values;
	m->pending_approvals = s->pending_approvals;
	m->fastpath = s->fastpath;
	m->reason = xstrdup(s->reason);
	m->db_user = xstrdup(s->db_user);
	m->database = xstrdup(s->database);
	m->credential = xstrdup(s->credential);
	return m;
}

static void session_pb_free(Agentgate__Ctl__Session *m)
{
	free(m->agent);
	free(m->cgroup);
	free(m->comm);
	free(m->target);
	free(m->protocol);
	free(m->orig_dst);
	free(m->upstream);
	free(m->state);
	free(m->reason);
	free(m->db_user);
	free(m->database);
	free(m->credential);
	free(m);
}

/* agctl cred list: the live credentials, without a secret (cred.c never hands one out). */
struct cred_acc {
	Agentgate__Ctl__Response *r;
	size_t cap;
};

static void cred_one(const struct ag_cred_info *ci, void *arg)
{
	struct cred_acc *a = arg;
	Agentgate__Ctl__Credential *m;

	if (a->r->n_credentials == a->cap) {
		size_t cap = a->cap ? 2 * a->cap : 16;
		void *p = realloc(a->r->credentials, cap * sizeof(*a->r->credentials));

		if (!p)
			return;
		a->r->credentials = p;
		a->cap = cap;
	}
	m = calloc(1, sizeof(*m));
	if (!m)
		return;
	agentgate__ctl__credential__init(m);
	m->session = ci->session;
	m->target = xstrdup(ci->target);
	m->provider = xstrdup(ci->provider);
	m->principal = xstrdup(ci->principal);
	m->issued_at_ns = ci->issued_ns;
	m->expires_at_ns = ci->expires_ns;
	m->state = xstrdup(ci->state);
	a->r->credentials[a->r->n_credentials++] = m;
}

static void do_sessions(struct ag_daemon *d, Agentgate__Ctl__Response *r, bool one, uint64_t id)
{
	size_t n = 0;

	pthread_mutex_lock(&d->sess_lock);
	r->sessions = calloc(d->nsessions + 1, sizeof(*r->sessions));
	for (struct ag_session *s = d->sessions; r->sessions && s; s = s->next) {
		if (one && s->id != id)
			continue;
		if (s->state == AG_SESS_CLOSED)
			continue;
		r->sessions[n] = session_pb(s);
		if (r->sessions[n])
			n++;
	}
	pthread_mutex_unlock(&d->sess_lock);
	r->n_sessions = n;
	/* Newest last, like a log. */
	for (size_t i = 0; i < n / 2; i++) {
		Agentgate__Ctl__Session *t = r->sessions[i];

		r->sessions[i] = r->sessions[n - 1 - i];
		r->sessions[n - 1 - i] = t;
	}
	if (one && !n) {
		char buf[64];

		snprintf(buf, sizeof(buf), "no live session %llu", (unsigned long long)id);
		r->error = strdup(buf);
	}
}

static void do_cgroups(struct ag_daemon *d, Agentgate__Ctl__Response *r)
{
	pthread_rwlock_rdlock(&d->tag_lock);
	r->cgroups = calloc(d->ntags + 1, sizeof(*r->cgroups));
	for (size_t i = 0; r->cgroups && i < d->ntags; i++) {
		Agentgate__Ctl__CgroupTag *t = calloc(1, sizeof(*t));

		if (!t)
			break;
		agentgate__ctl__cgroup_tag__init(t);
		t->path = xstrdup(d->tags[i].path);
		t->agent = xstrdup(d->tags[i].agent);
		t->id = d->tags[i].cgid;
		t->source = xstrdup(d->tags[i].from_policy ? "policy" : "runtime");
		t->attached = ag_bpf_is_attached(d->bpf, d->tags[i].cgid);
		r->cgroups[r->n_cgroups++] = t;
	}
	pthread_rwlock_unlock(&d->tag_lock);
}

static void do_status(struct ag_daemon *d, Agentgate__Ctl__Response *r)
{
	Agentgate__Ctl__Status *st = calloc(1, sizeof(*st));
	struct ag_policy_ref *pol;

	if (!st)
		return;
	agentgate__ctl__status__init(st);
	st->version = xstrdup(AG_VERSION);
	st->pid = getpid();
	st->pin_root = xstrdup(ag_bpf_pin_root(d->bpf));
	st->listen_port = d->opts.port;
	pol = ag_policy_get(d);
	st->policy_file = xstrdup(pol ? pol->p->path : d->opts.config);
	ag_policy_put(pol);
	st->state_dir = xstrdup(d->opts.state_dir);
	st->fastpath = d->fastpath;
	st->sessions_total = d->sessions_total;
	st->sessions_denied = d->sessions_denied;
	st->events_received = d->events_received;
	st->started_at_ns = d->started_ns;
	st->cgroup_root = xstrdup(d->cg_root);
	r->status = st;
}

static void do_policy_show(struct ag_daemon *d, Agentgate__Ctl__Response *r)
{
	struct ag_policy_ref *pol = ag_policy_get(d);
	char *buf = NULL;
	size_t len = 0;
	FILE *f;

	if (!pol) {
		r->error = strdup("no policy loaded");
		return;
	}
	f = open_memstream(&buf, &len);
	if (f) {
		struct jsonw *w = jsonw_new(f, false);

		if (w) {
			ag_policy_to_json(pol->p, w);
			jsonw_destroy(&w);
		}
		fclose(f);
		if (len && buf[len - 1] == '\n')
			buf[len - 1] = '\0';
	}
	r->policy_json = buf ? buf : strdup("{}");
	r->policy_source = xstrdup(pol->p->source);
	r->message = xstrdup(pol->p->path);
	ag_policy_put(pol);
}

static void do_ca_show(Agentgate__Ctl__Response *r)
{
	Agentgate__Ctl__CaInfo *ca = calloc(1, sizeof(*ca));
	char subject[512], not_after[32], sha[2 * 32 + 1] = "";

	if (!ca || !ag_tls_ready() ||
	    ag_tls_ca_info(subject, sizeof(subject), not_after, sizeof(not_after), sha,
			   sizeof(sha))) {
		free(ca);
		r->error = strdup("agentgated has no CA loaded");
		return;
	}
	agentgate__ctl__ca_info__init(ca);
	ca->pem = xstrdup(ag_tls_ca_pem());
	ca->subject = xstrdup(subject);
	ca->not_after = xstrdup(not_after);
	ca->sha256 = xstrdup(sha);
	r->ca = ca;
}

static void do_audit_status(Agentgate__Ctl__Response *r)
{
	Agentgate__Ctl__AuditStatus *m = calloc(1, sizeof(*m));
	struct ag_audit_status st;

	if (!m || ag_audit_status(&st)) {
		free(m);
		r->error = strdup("agentgated has no audit log open");
		return;
	}
	agentgate__ctl__audit_status__init(m);
	m->dir = xstrdup(st.dir);
	m->segments = st.segments;
	m->bytes = st.bytes;
	m->last_seq = st.last_seq;
	m->last_checkpoint_seq = st.checkpoint_seq;
	m->last_checkpoint_at_ns = st.checkpoint_ns;
	m->durable_seq = st.durable_seq;
	m->fsync = xstrdup(ag_audit_fsync_name(st.fsync));
	m->failing = st.failing;
	m->reason = xstrdup(st.failing ? st.reason : "");
	r->audit_status = m;
}

static Agentgate__Ctl__Approval *approval_pb(const struct ag_approval_info *a)
{
	Agentgate__Ctl__Approval *m = calloc(1, sizeof(*m));

	if (!m)
		return NULL;
	agentgate__ctl__approval__init(m);
	m->id = xstrdup(a->id);
	m->session = a->session;
	m->agent = xstrdup(a->agent);
	m->target = xstrdup(a->target);
	m->protocol = xstrdup(a->protocol);
	m->statement = xstrdup(a->statement);
	m->rule = xstrdup(a->rule);
	m->requested_at_ns = a->requested_ns;
	m->expires_at_ns = a->expires_ns;
	m->state = xstrdup(ag_approval_state_name(a->state));
	m->decided_by = xstrdup(a->state == AG_APPROVAL_PENDING ? "" : a->decided_by);
	m->reason = xstrdup(a->reason);
	m->scope = xstrdup(a->state == AG_APPROVAL_APPROVED ? ag_approval_scope_name(a->scope)
							     : "");
	m->fingerprint = a->fingerprint;
	m->decided_at_ns = a->decided_ns;
	m->agent_uid = a->agent_uid;
	m->ttl_ms = a->ttl_ms;
	m->timeout_ms = a->timeout_ms;
	return m;
}

static void approval_pb_free(Agentgate__Ctl__Approval *m)
{
	free(m->id);
	free(m->agent);
	free(m->target);
	free(m->protocol);
	free(m->statement);
	free(m->rule);
	free(m->state);
	free(m->decided_by);
	free(m->reason);
	free(m->scope);
	free(m);
}

static void approvals_add(Agentgate__Ctl__Response *r, const struct ag_approval_info *a,
			  size_t n)
{
	r->approvals = calloc(n + 1, sizeof(*r->approvals));
	for (size_t i = 0; r->approvals && i < n; i++) {
		r->approvals[r->n_approvals] = approval_pb(&a[i]);
		if (r->approvals[r->n_approvals])
			r->n_approvals++;
	}
}

static void do_approvals(Agentgate__Ctl__Response *r, const char *one)
{
	struct ag_approval_info *list, a;
	size_t n;

	if (one) {
		if (ag_approval_get(one, &a)) {
			char buf[128];

			snprintf(buf, sizeof(buf), "no approval %s", one);
			r->error = strdup(buf);
			return;
		}
		approvals_add(r, &a, 1);
		return;
	}
	list = ag_approval_list(&n);
	if (list)
		approvals_add(r, list, n);
	free(list);
}

static void do_approval_decide(struct ag_daemon *d, uid_t uid,
			       const Agentgate__Ctl__ApprovalDecision *dec, char *err,
			       size_t errlen, char *msg, size_t msglen)
{
	enum ag_approval_scope scope = AG_APPROVAL_ONCE;
	struct ag_policy_ref *pol;
	char who[64] = "";
	int rc;

	if (dec->approve && dec->scope && dec->scope[0] &&
	    ag_approval_scope_parse(dec->scope, &scope)) {
		snprintf(err, errlen, "unknown scope '%s' (once, session or fingerprint)",
			 dec->scope);
		return;
	}
	pol = ag_policy_get(d);
	rc = ag_approval_authorize(pol ? pol->p : NULL, uid, dec->id, who, sizeof(who), err,
				   errlen);
	ag_policy_put(pol);
	if (rc) {
		if (rc == -EPERM)
			pr_warn("control socket: uid %u may not decide approval %s: %s",
				(unsigned)uid, dec->id, err);
		return;
	}
	if (ag_approval_decide(dec->id, dec->approve, scope, dec->ttl_ms, who, uid,
			       dec->reason && dec->reason[0] ? dec->reason : NULL, err, errlen))
		return;
	if (dec->approve)
		snprintf(msg, msglen, "approval %s approved by %s (scope %s)", dec->id, who,
			 ag_approval_scope_name(scope));
	else
		snprintf(msg, msglen, "approval %s denied by %s", dec->id, who);
}

static bool root_only(Agentgate__Ctl__Request__CmdCase cmd)
{
	switch (cmd) {
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_LIST:
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_SHOW:
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_DECIDE:
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_WATCH:
		return false;
	default:
		return true;
	}
}

static void handle(struct ctl_client *c, const Agentgate__Ctl__Request *req,
		   Agentgate__Ctl__Response *r)
{
	struct ag_daemon *d = c->d;
	char err[512] = "", msg[512] = "";
	int rc;

	if (c->uid != 0 && root_only(req->cmd_case)) {
		snprintf(err, sizeof(err),
			 "permission denied: uid %u may only use the approval commands (the rest "
			 "is root-only)",
			 (unsigned)c->uid);
		r->error = strdup(err);
		return;
	}
	/* Statements may carry what only approvers should read: list/show/watch are theirs. */
	if (c->uid != 0 && req->cmd_case != AGENTGATE__CTL__REQUEST__CMD_APPROVAL_DECIDE) {
		struct ag_policy_ref *pol = ag_policy_get(d);
		char who[64];
		bool ok = ag_approval_is_approver(pol ? pol->p : NULL, c->uid, who, sizeof(who));

		ag_policy_put(pol);
		if (!ok) {
			snprintf(err, sizeof(err),
				 "permission denied: %s (uid %u) is not an approver "
				 "(approvals.approvers)",
				 who, (unsigned)c->uid);
			r->error = strdup(err);
			return;
		}
	}
	switch (req->cmd_case) {
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_LIST:
		do_approvals(r, NULL);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_SHOW:
		do_approvals(r, req->approval_show);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_DECIDE:
		do_approval_decide(d, c->uid, req->approval_decide, err, sizeof(err), msg,
				   sizeof(msg));
		break;
	case AGENTGATE__CTL__REQUEST__CMD_APPROVAL_WATCH:
		do_approvals(r, NULL);
		/* Judged an approver under this policy just now (root_only/approver check above). */
		c->apolicy_gen = __atomic_load_n(&d->policy_gen, __ATOMIC_ACQUIRE);
		c->awatch = true;
		c->anext = approval_watchers;
		approval_watchers = c;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_SESSION_WATCH:
		/* Root only (root_only() above): audit entries hold statements and rows. */
		watch_add(c, req->session_watch ? req->session_watch->session : 0, r);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_STATUS:
		do_status(d, r);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_SESSION_LIST:
		do_sessions(d, r, false, 0);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_SESSION_SHOW:
		do_sessions(d, r, true, req->session_show);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_SESSION_KILL:
		rc = ag_session_kill_by_id(d, req->session_kill);
		if (rc)
			snprintf(err, sizeof(err), "no live session %llu",
				 (unsigned long long)req->session_kill);
		else
			snprintf(msg, sizeof(msg), "session %llu killed",
				 (unsigned long long)req->session_kill);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CGROUP_LIST:
		do_cgroups(d, r);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CGROUP_TAG:
		if (!ag_daemon_tag(d, req->cgroup_tag->path, req->cgroup_tag->agent, err,
				   sizeof(err)))
			snprintf(msg, sizeof(msg), "cgroup %s tagged for agent %s",
				 req->cgroup_tag->path, req->cgroup_tag->agent);
		else if (!err[0])
			snprintf(err, sizeof(err), "tagging %s failed", req->cgroup_tag->path);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CGROUP_UNTAG:
		if (!ag_daemon_untag(d, req->cgroup_untag, err, sizeof(err)))
			snprintf(msg, sizeof(msg), "cgroup %s untagged", req->cgroup_untag);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_POLICY_SHOW:
		do_policy_show(d, r);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_POLICY_RELOAD:
		if (!ag_daemon_reload(d, err, sizeof(err)))
			snprintf(msg, sizeof(msg), "policy %s reloaded", d->opts.config);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CRED_LIST: {
		struct cred_acc a = { .r = r };

		ag_cred_list(cred_one, &a);
		break;
	}
	case AGENTGATE__CTL__REQUEST__CMD_PROG_DETACH:
		if (!ag_daemon_detach_all(d, err, sizeof(err)))
			snprintf(msg, sizeof(msg), "detached every link and removed every pin under "
				 "%s", ag_bpf_pin_root(d->bpf));
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CA_SHOW:
		do_ca_show(r);
		break;
	case AGENTGATE__CTL__REQUEST__CMD_AUDIT_STATUS:
		do_audit_status(r);
		break;
	default:
		snprintf(err, sizeof(err), "unknown request (agctl newer than agentgated?)");
		break;
	}
	if (err[0])
		r->error = strdup(err);
	if (msg[0])
		r->message = strdup(msg);
}

static void response_free(Agentgate__Ctl__Response *r)
{
	for (size_t i = 0; i < r->n_sessions; i++)
		session_pb_free(r->sessions[i]);
	free(r->sessions);
	for (size_t i = 0; i < r->n_credentials; i++) {
		free(r->credentials[i]->target);
		free(r->credentials[i]->provider);
		free(r->credentials[i]->principal);
		free(r->credentials[i]->state);
		free(r->credentials[i]);
	}
	free(r->credentials);
	for (size_t i = 0; i < r->n_cgroups; i++) {
		free(r->cgroups[i]->path);
		free(r->cgroups[i]->agent);
		free(r->cgroups[i]->source);
		free(r->cgroups[i]);
	}
	free(r->cgroups);
	for (size_t i = 0; i < r->n_approvals; i++)
		approval_pb_free(r->approvals[i]);
	free(r->approvals);
	if (r->status) {
		free(r->status->version);
		free(r->status->pin_root);
		free(r->status->policy_file);
		free(r->status->state_dir);
		free(r->status->cgroup_root);
		free(r->status);
	}
	if (r->audit_status) {
		free(r->audit_status->dir);
		free(r->audit_status->fsync);
		free(r->audit_status->reason);
		free(r->audit_status);
	}
	if (r->ca) {
		free(r->ca->pem);
		free(r->ca->subject);
		free(r->ca->not_after);
		free(r->ca->sha256);
		free(r->ca);
	}
	if (r->error != protobuf_c_empty_string)
		free(r->error);
	if (r->message != protobuf_c_empty_string)
		free(r->message);
	if (r->policy_json != protobuf_c_empty_string)
		free(r->policy_json);
	if (r->policy_source != protobuf_c_empty_string)
		free(r->policy_source);
}

static void reply(struct ctl_client *c, Agentgate__Ctl__Response *r)
{
	size_t len = agentgate__ctl__response__get_packed_size(r);
	uint8_t hdr[4] = { len >> 24, len >> 16, len >> 8, len };
	uint8_t *p;

	ag_buf_append(&c->out, hdr, 4);
	p = ag_buf_reserve(&c->out, len);
	if (p) {
		agentgate__ctl__response__pack(r, p);
		ag_buf_commit(&c->out, len);
	}
	c->replied = true;
}

/* A full frame in c->in? Returns its payload length, or -1. */
static long frame_ready(struct ctl_client *c)
{
	const uint8_t *h = ag_buf_head(&c->in);
	size_t len;

	if (ag_buf_len(&c->in) < 4)
		return -1;
	len = (size_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
	/* Any local user may connect: theirs are small requests, and few at a time. */
	if (len > (c->uid ? USER_MAX_FRAME : AG_CTL_MAX_FRAME))
		return -2;
	return ag_buf_len(&c->in) >= 4 + len ? (long)len : -1;
}

static void client_io(struct ag_io *io, uint32_t events)
{
	struct ctl_client *c = io->data;

	/* A watcher sends nothing after its request: input is its end. */
	if (c->watch && (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) {
		char b[256];
		ssize_t n = read(io->fd, b, sizeof(b));

		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
			client_free(c);
			return;
		}
	}
	if (!c->replied) {
		Agentgate__Ctl__Response r = AGENTGATE__CTL__RESPONSE__INIT;
		Agentgate__Ctl__Request *req;
		long len = -1;

		for (;;) {
			uint8_t *p = ag_buf_reserve(&c->in, 65536);
			ssize_t n;

			if (!p) {
				client_free(c);
				return;
			}
			n = read(io->fd, p, 65536);
			if (n < 0 && (errno == EAGAIN || errno == EINTR))
				break;
			if (n <= 0) {
				client_free(c);
				return;
			}
			ag_buf_commit(&c->in, n);
			len = frame_ready(c);
			if (len != -1)
				break;
		}
		if (len == -2) {
			pr_warn("control client sent an oversized frame: dropped");
			client_free(c);
			return;
		}
		if (len < 0)
			return;
		req = agentgate__ctl__request__unpack(NULL, len, ag_buf_head(&c->in) + 4);
		if (!req) {
			r.error = strdup("malformed request");
		} else {
			handle(c, req, &r);
			agentgate__ctl__request__free_unpacked(req, NULL);
		}
		reply(c, &r);
		response_free(&r);
		ag_loop_mod(io, EPOLLOUT);
	}
	if (c->awatch && (events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
		uint8_t junk[256];
		ssize_t n = read(io->fd, junk, sizeof(junk));

		/* A watcher says nothing more: anything but EAGAIN ends it. */
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) ||
		    (events & (EPOLLHUP | EPOLLERR))) {
			client_free(c);
			return;
		}
	}
	while (ag_buf_len(&c->out)) {
		ssize_t n = send(io->fd, ag_buf_head(&c->out), ag_buf_len(&c->out),
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			client_free(c);
			return;
		}
		ag_buf_consume(&c->out, n);
	}
	if (c->awatch || (c->watch && !ag_buf_len(&c->out))) {
		ag_loop_mod(io, EPOLLIN);
		return;
	}
	client_free(c);
}

/*
 * A watcher other than root was an approver when it subscribed; after a policy reload it must
 * still be one to see the next statement. One that is not is told so and let go (its stream
 * ends once the error is flushed).
 */
static bool watcher_still_approver(struct ctl_client *c)
{
	uint64_t gen = __atomic_load_n(&watch_d->policy_gen, __ATOMIC_ACQUIRE);
	Agentgate__Ctl__Response r = AGENTGATE__CTL__RESPONSE__INIT;
	struct ag_policy_ref *pol;
	char who[64], err[256];
	bool ok;

	if (!c->uid || c->apolicy_gen == gen)
		return true;
	pol = ag_policy_get(watch_d);
	ok = ag_approval_is_approver(pol ? pol->p : NULL, c->uid, who, sizeof(who));
	ag_policy_put(pol);
	if (ok) {
		c->apolicy_gen = gen;
		return true;
	}
	pr_info("control socket: %s (uid %u) is no approver under the reloaded policy: its "
		"approval watch ends",
		who, (unsigned)c->uid);
	awatch_del(c);
	snprintf(err, sizeof(err),
		 "permission denied: %s (uid %u) is no longer an approver (approvals.approvers "
		 "changed by a policy reload)",
		 who, (unsigned)c->uid);
	r.error = err;
	reply(c, &r);
	ag_loop_mod(&c->io, EPOLLOUT);
	return false;
}

/* On the main loop: one Response with the changed approval to every watcher. */
static void watch_push(void *arg)
{
	struct ag_approval_info *a = arg;
	Agentgate__Ctl__Response r = AGENTGATE__CTL__RESPONSE__INIT;

	approvals_add(&r, a, 1);
	for (struct ctl_client *c = approval_watchers, *next; c; c = next) {
		next = c->anext;
		if (ag_buf_len(&c->out) > APPROVAL_WATCH_MAX_BACKLOG) {
			pr_warn("control socket: an approval watcher fell behind: dropped");
			client_free(c);
			continue;
		}
		if (!watcher_still_approver(c))
			continue;
		reply(c, &r);
		ag_loop_mod(&c->io, EPOLLIN | EPOLLOUT);
	}
	response_free(&r);
	free(a);
}

/* After a policy reload (main loop): a watcher no longer an approver is let go at once. */
void ag_ctl_policy_changed(struct ag_daemon *d)
{
	(void)d;
	if (!watch_d)
		return;
	for (struct ctl_client *c = approval_watchers, *next; c; c = next) {
		next = c->anext;
		watcher_still_approver(c);
	}
}

/* ag_approval_watch_hook: any thread. */
static void watch_hook(const struct ag_approval_info *a)
{
	struct ag_approval_info *copy;

	if (!watch_d || !__atomic_load_n(&approval_watchers, __ATOMIC_RELAXED))
		return;
	copy = malloc(sizeof(*copy));
	if (!copy)
		return;
	*copy = *a;
	if (ag_loop_call(watch_d->loop, watch_push, copy))
		free(copy);
}

/* --- session watch: audit entries pushed to the clients that asked ---------------------------- */

#define WATCH_MAX_BACKLOG (8u << 20)

struct tap_entry {
	struct tap_entry *next;
	uint64_t session;
	size_t len;
	uint8_t data[];
};

static struct ctl_client *watchers; /* main loop only */
static pthread_mutex_t tap_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tap_entry *tap_head, **tap_tail = &tap_head;
static bool tap_scheduled;

static void watch_add(struct ctl_client *c, uint64_t session, Agentgate__Ctl__Response *r)
{
	char msg[64];

	c->watch = true;
	c->watch_session = session;
	c->wnext = watchers;
	watchers = c;
	ag_audit_tap_get();
	if (session)
		snprintf(msg, sizeof(msg), "watching session %llu", (unsigned long long)session);
	else
		snprintf(msg, sizeof(msg), "watching every session");
	r->message = strdup(msg);
}

static void watch_del(struct ctl_client *c)
{
	for (struct ctl_client **p = &watchers; *p; p = &(*p)->wnext)
		if (*p == c) {
			*p = c->wnext;
			ag_audit_tap_put();
			break;
		}
	c->watch = false;
}

/* On the main loop: each watcher gets one Response with the entries of its sessions. */
static void tap_deliver(void *arg)
{
	struct tap_entry *list, *e;
	struct ctl_client *c, *next;
	size_t n = 0;

	pthread_mutex_lock(&tap_lock);
	list = tap_head;
	tap_head = NULL;
	tap_tail = &tap_head;
	tap_scheduled = false;
	pthread_mutex_unlock(&tap_lock);
	for (e = list; e; e = e->next)
		n++;
	for (c = watchers; c && n; c = next) {
		Agentgate__Ctl__Response r = AGENTGATE__CTL__RESPONSE__INIT;
		ProtobufCBinaryData *v = calloc(n, sizeof(*v));

		next = c->wnext;
		if (!v)
			break;
		for (e = list; e; e = e->next)
			if (e->session && (!c->watch_session || e->session == c->watch_session)) {
				v[r.n_audit_entries].data = e->data;
				v[r.n_audit_entries++].len = e->len;
			}
		r.audit_entries = v;
		if (r.n_audit_entries && ag_buf_len(&c->out) > WATCH_MAX_BACKLOG) {
			pr_warn("control socket: a session watcher does not read: dropped");
			free(v);
			client_free(c);
			continue;
		}
		if (r.n_audit_entries) {
			reply(c, &r);
			ag_loop_mod(&c->io, EPOLLIN | EPOLLOUT);
		}
		free(v);
	}
	while ((e = list)) {
		list = e->next;
		free(e);
	}
}

/* On the audit writer's thread. */
static void ctl_tap(void *ctx, uint64_t session, const uint8_t *entry, size_t len)
{
	struct ag_daemon *d = ctx;
	struct tap_entry *e = malloc(sizeof(*e) + len);

	if (!e)
		return;
	e->next = NULL;
	e->session = session;
	e->len = len;
	memcpy(e->data, entry, len);
	pthread_mutex_lock(&tap_lock);
	*tap_tail = e;
	tap_tail = &e->next;
	if (!tap_scheduled && !ag_loop_call(d->loop, tap_deliver, NULL))
		tap_scheduled = true;
	pthread_mutex_unlock(&tap_lock);
}

static void on_accept(struct ag_io *io, uint32_t events)
{
	struct ag_daemon *d = io->data;

	for (;;) {
		struct ucred cred;
		socklen_t cl = sizeof(cred);
		struct ctl_client *c;
		int fd = accept4(io->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			/* Out of fds: paused, or the client waiting would spin the loop. */
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
			    errno == ENOMEM)
				ag_loop_mod(io, 0); /* main_tick() listens again */
			return;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl)) {
			pr_warn("control socket: no peer credentials: %s", strerror(errno));
			close(fd);
			continue;
		}
		if (cred.uid && user_clients >= USER_MAX_CLIENTS) {
			pr_warn("control socket: %d connections of users other than root already: "
				"refused uid %u",
				USER_MAX_CLIENTS, (unsigned)cred.uid);
			close(fd);
			continue;
		}
		if (cred.uid) {
			int *n = uid_count(cred.uid, true);

			if (!n || *n >= USER_MAX_PER_UID) {
				pr_warn("control socket: uid %u has %d connections already: refused",
					(unsigned)cred.uid, USER_MAX_PER_UID);
				close(fd);
				continue;
			}
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->d = d;
		c->uid = cred.uid;
		if (ag_loop_add(d->loop, &c->io, fd, EPOLLIN, client_io)) {
			close(fd);
			free(c);
			continue;
		}
		if (c->uid) {
			user_clients++;
			(*uid_count(c->uid, true))++;
		}
		c->io.data = c;
	}
}

int ag_ctl_server_start(struct ag_daemon *d, char *err, size_t errlen)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	char dir[PATH_MAX], *slash;
	int fd;

	if (strlen(d->opts.socket) >= sizeof(sun.sun_path)) {
		snprintf(err, errlen, "socket path too long: %s", d->opts.socket);
		return -ENAMETOOLONG;
	}
	snprintf(dir, sizeof(dir), "%s", d->opts.socket);
	slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = '\0';
		if (mkdir(dir, 0755) && errno != EEXIST) {
			snprintf(err, errlen, "mkdir %s: %s", dir, strerror(errno));
			return -errno;
		}
	}
	strcpy(sun.sun_path, d->opts.socket);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -errno;
	}
	/* A live daemon answers on it: refuse to steal its socket. */
	{
		int probe = ag_ctl_connect(d->opts.socket);

		if (probe >= 0) {
			close(probe);
			close(fd);
			snprintf(err, errlen, "another agentgated is running on %s", d->opts.socket);
			return -EADDRINUSE;
		}
	}
	unlink(d->opts.socket);
	/* Everyone may connect (approvers are not root); each request is authorized by uid. */
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) || chmod(d->opts.socket, 0666) ||
	    listen(fd, 64)) {
		snprintf(err, errlen, "control socket %s: %s", d->opts.socket, strerror(errno));
		close(fd);
		return -errno;
	}
	if (ag_loop_add(d->loop, &d->ctl_io, fd, EPOLLIN, on_accept)) {
		close(fd);
		return -errno;
	}
	d->ctl_io.data = d;
	watch_d = d;
	__atomic_store_n(&ag_approval_watch_hook, watch_hook, __ATOMIC_RELEASE);
	ag_audit_tap_set(ctl_tap, d);
	return 0;
}

void ag_ctl_server_stop(struct ag_daemon *d)
{
	ag_audit_tap_set(NULL, NULL);
	if (d->ctl_io.fd < 0)
		return;
	__atomic_store_n(&ag_approval_watch_hook, NULL, __ATOMIC_RELEASE);
	while (approval_watchers)
		client_free(approval_watchers);
	while (watchers)
		client_free(watchers);
	ag_loop_del(&d->ctl_io);
	close(d->ctl_io.fd);
	d->ctl_io.fd = -1;
	unlink(d->opts.socket);
}
