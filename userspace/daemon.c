// SPDX-License-Identifier: GPL-2.0
/*
 * The daemon's shared state: the active policy (swapped whole, refcounted so running sessions
 * keep the one they started under), and the cgroup tags — from the policy's agents and from
 * `agctl cgroup tag`, the latter persisted in <state>/tags so a restart keeps them.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bpf_loader.h"
#include "cgroup.h"
#include "cred.h"
#include "audit.h"
#include "daemon.h"
#include "log.h"
#include "pins.h"

struct ag_daemon *ag_d;

struct ag_policy_ref *ag_policy_get(struct ag_daemon *d)
{
	struct ag_policy_ref *r;

	pthread_mutex_lock(&d->pol_lock);
	r = d->pol;
	if (r)
		__atomic_add_fetch(&r->refs, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&d->pol_lock);
	return r;
}

void ag_policy_put(struct ag_policy_ref *r)
{
	if (!r)
		return;
	if (__atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) == 0) {
		ag_policy_free(r->p);
		free(r);
	}
}

static void tags_path(struct ag_daemon *d, char *out, size_t len)
{
	snprintf(out, len, "%s/tags", d->opts.state_dir);
}

static int save_runtime_tags(struct ag_daemon *d)
{
	char path[PATH_MAX], tmp[PATH_MAX + 8];
	FILE *f;

	tags_path(d, path, sizeof(path));
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "we");
	if (!f)
		return -errno;
	fprintf(f, "# agctl cgroup tag: <cgroup path> <agent>\n");
	for (size_t i = 0; i < d->ntags; i++)
		if (!d->tags[i].from_policy)
			fprintf(f, "%s %s\n", d->tags[i].path, d->tags[i].agent);
	if (fclose(f))
		return -errno;
	if (rename(tmp, path))
		return -errno;
	return 0;
}

static struct ag_tag *find_tag(struct ag_daemon *d, const char *path)
{
	for (size_t i = 0; i < d->ntags; i++)
		if (!strcmp(d->tags[i].path, path))
			return &d->tags[i];
	return NULL;
}

static int check_taggable(struct ag_daemon *d, const char *path, char *err, size_t errlen)
{
	if (!strcmp(path, "/")) {
		snprintf(err, errlen, "refusing to tag the cgroup root: every process on the host "
				      "would be intercepted");
		return -EINVAL;
	}
	if (ag_cgroup_is_within(d->self_cgroup, path)) {
		snprintf(err, errlen, "refusing to tag %s: agentgated itself runs in it (%s)", path,
			 d->self_cgroup);
		return -EINVAL;
	}
	return 0;
}

/*
 * Rebuilds the tag table: policy agents first, then runtime tags from the file, then attaches
 * what is missing and detaches links of cgroups nobody tags any more.
 */
static int apply_tags(struct ag_daemon *d, const struct ag_policy *p, struct ag_tag *runtime,
		      size_t nruntime, char *err, size_t errlen)
{
	size_t n = p->nagents + nruntime, cnt = 0;
	struct ag_tag *tags = calloc(n ? n : 1, sizeof(*tags));
	uint64_t *keep = calloc(n ? n : 1, sizeof(*keep));
	int rc = 0;

	if (!tags || !keep) {
		free(tags);
		free(keep);
		return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		struct ag_tag *t = &tags[cnt];
		char terr[256];
		int c;

		if (i < p->nagents) {
			snprintf(t->path, sizeof(t->path), "%s", p->agents[i].cgroup);
			snprintf(t->agent, sizeof(t->agent), "%s", p->agents[i].name);
			t->from_policy = true;
		} else {
			*t = runtime[i - p->nagents];
			t->from_policy = false;
		}
		if (check_taggable(d, t->path, terr, sizeof(terr))) {
			pr_err("%s", terr);
			if (!rc) {
				snprintf(err, errlen, "%s", terr);
				rc = -EINVAL;
			}
			continue;
		}
		/* A policy's agent cgroup is created if missing, so jobs can be placed in it. */
		if (t->from_policy) {
			c = ag_cgroup_create(d->cg_root, t->path);
			if (c)
				pr_warn("creating cgroup %s: %s", t->path, strerror(-c));
		}
		c = ag_bpf_tag(d->bpf, d->cg_root, t->path, &t->cgid, terr, sizeof(terr));
		if (c == -ENOENT && !t->from_policy) {
			/* Its cgroup is gone (a job that ended): nothing to enforce, no failure. */
			pr_warn("%s (runtime tag kept; 'agctl cgroup untag %s' drops it)", terr,
				t->path);
			cnt++;
			continue;
		}
		if (c) {
			pr_err("%s", terr);
			if (!rc) {
				snprintf(err, errlen, "%s", terr);
				rc = -EIO;
			}
			if (!t->from_policy)
				cnt++; /* keep a runtime tag so it is retried and shown */
			continue;
		}
		t->attached = true;
		keep[cnt] = t->cgid;
		cnt++;
	}
	ag_bpf_prune(d->bpf, keep, cnt);
	pthread_rwlock_wrlock(&d->tag_lock);
	free(d->tags);
	d->tags = tags;
	d->ntags = cnt;
	pthread_rwlock_unlock(&d->tag_lock);
	free(keep);
	return rc;
}

static size_t runtime_tags(struct ag_daemon *d, struct ag_tag **out)
{
	struct ag_tag *rt = NULL;
	size_t n = 0;

	pthread_rwlock_rdlock(&d->tag_lock);
	for (size_t i = 0; i < d->ntags; i++)
		if (!d->tags[i].from_policy)
			n++;
	rt = calloc(n ? n : 1, sizeof(*rt));
	n = 0;
	for (size_t i = 0; rt && i < d->ntags; i++)
		if (!d->tags[i].from_policy)
			rt[n++] = d->tags[i];
	pthread_rwlock_unlock(&d->tag_lock);
	*out = rt;
	return rt ? n : 0;
}

static size_t load_runtime_tags(struct ag_daemon *d, struct ag_tag **out)
{
	char path[PATH_MAX], line[PATH_MAX + 256];
	struct ag_tag *rt = NULL;
	size_t n = 0, cap = 0;
	FILE *f;

	*out = NULL;
	tags_path(d, path, sizeof(path));
	f = fopen(path, "re");
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		char *agent;

		/* "<path> <agent>": a path may hold spaces, an agent name never does. */
		line[strcspn(line, "\n")] = '\0';
		agent = strrchr(line, ' ');
		if (line[0] != '/' || !agent || !agent[1])
			continue;
		*agent++ = '\0';
		if (n == cap) {
			struct ag_tag *nt = realloc(rt, (cap = cap ? cap * 2 : 8) * sizeof(*rt));

			if (!nt)
				break;
			rt = nt;
		}
		memset(&rt[n], 0, sizeof(rt[n]));
		snprintf(rt[n].path, sizeof(rt[n].path), "%s", line);
		snprintf(rt[n].agent, sizeof(rt[n].agent), "%s", agent);
		n++;
	}
	fclose(f);
	*out = rt;
	return n;
}

int ag_daemon_set_policy(struct ag_daemon *d, struct ag_policy *p, char *err, size_t errlen)
{
	struct ag_policy_ref *r = calloc(1, sizeof(*r)), *old;
	struct ag_tag *rt;
	size_t nrt;
	bool first = !d->pol;
	int rc;

	if (!r)
		return -ENOMEM;
	r->p = p;
	r->refs = 1;
	nrt = first ? load_runtime_tags(d, &rt) : runtime_tags(d, &rt);
	/* Runtime tags of an agent the new policy dropped are kept: they name their agent. */
	rc = apply_tags(d, p, rt, nrt, err, errlen);
	free(rt);
	{
		struct ag_audit_config ac;

		if (!ag_audit_config_parse(p->audit, p->naudit, &ac, err, errlen))
			ag_audit_set_config(&ac);
	}
	if (d->opts.fastpath < 0) {
		d->fastpath = p->fastpath_set ? p->fastpath : false;
		ag_bpf_set_fastpath(d->bpf, d->fastpath);
	}
	pthread_mutex_lock(&d->pol_lock);
	old = d->pol;
	d->pol = r;
	__atomic_add_fetch(&d->policy_gen, 1, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&d->pol_lock);
	ag_policy_put(old);
	return rc;
}

int ag_daemon_reload(struct ag_daemon *d, char *err, size_t errlen)
{
	struct ag_policy *p = ag_policy_load(d->opts.config, err, errlen);
	int rc;

	if (!p || ag_cred_check_policy(p, err, errlen, NULL, 0)) {
		pr_err("policy reload refused, the previous policy stays: %s", err);
		ag_policy_free(p);
		return -EINVAL;
	}
	rc = ag_daemon_set_policy(d, p, err, errlen);
	ag_ctl_policy_changed(d);
	if (rc)
		pr_warn("policy %s loaded with problems: %s", d->opts.config, err);
	else
		pr_info("policy %s reloaded (%zu agents, %zu targets, %zu rules)", d->opts.config,
			p->nagents, p->ntargets, p->nrules);
	return rc;
}

int ag_daemon_tag(struct ag_daemon *d, const char *path_in, const char *agent, char *err,
		  size_t errlen)
{
	char path[PATH_MAX];
	struct ag_tag *t, nt = {};
	int rc;

	rc = ag_cgroup_normalize(path_in, path, sizeof(path));
	if (rc) {
		snprintf(err, errlen, "bad cgroup path '%s'", path_in);
		return rc;
	}
	/* The tags file holds one tag a line. */
	for (const char *p = path; *p; p++) {
		if ((unsigned char)*p < ' ') {
			snprintf(err, errlen, "bad cgroup path: control characters not supported");
			return -EINVAL;
		}
	}
	rc = check_taggable(d, path, err, errlen);
	if (rc)
		return rc;
	if (!agent || !agent[0]) {
		snprintf(err, errlen, "an agent name is required");
		return -EINVAL;
	}
	{
		struct ag_policy_ref *r = ag_policy_get(d);
		bool known = r && ag_policy_agent_by_name(r->p, agent);

		ag_policy_put(r);
		if (!known) {
			snprintf(err, errlen,
				 "agent '%s' is not in the policy (%s): its connections would have "
				 "no rules",
				 agent, d->opts.config);
			return -ENOENT;
		}
	}
	/* A runtime tag there would be neither saved nor kept by the next reload. */
	pthread_rwlock_rdlock(&d->tag_lock);
	t = find_tag(d, path);
	if (t && t->from_policy) {
		snprintf(err, errlen,
			 "cgroup %s is tagged by the policy (agent %s): edit the policy and reload",
			 path, t->agent);
		pthread_rwlock_unlock(&d->tag_lock);
		return -EEXIST;
	}
	pthread_rwlock_unlock(&d->tag_lock);
	snprintf(nt.path, sizeof(nt.path), "%s", path);
	snprintf(nt.agent, sizeof(nt.agent), "%s", agent);
	rc = ag_bpf_tag(d->bpf, d->cg_root, path, &nt.cgid, err, errlen);
	if (rc)
		return rc;
	nt.attached = true;
	pthread_rwlock_wrlock(&d->tag_lock);
	t = find_tag(d, path);
	if (t) {
		snprintf(t->agent, sizeof(t->agent), "%s", agent);
		t->cgid = nt.cgid;
		t->attached = true;
	} else {
		struct ag_tag *tags = realloc(d->tags, (d->ntags + 1) * sizeof(*tags));

		if (!tags) {
			pthread_rwlock_unlock(&d->tag_lock);
			return -ENOMEM;
		}
		d->tags = tags;
		d->tags[d->ntags++] = nt;
	}
	rc = save_runtime_tags(d);
	pthread_rwlock_unlock(&d->tag_lock);
	if (rc)
		pr_warn("saving runtime tags: %s", strerror(-rc));
	return 0;
}

int ag_daemon_untag(struct ag_daemon *d, const char *path_in, char *err, size_t errlen)
{
	char path[PATH_MAX];
	struct ag_tag *t;
	uint64_t cgid;
	int rc;

	if (ag_cgroup_normalize(path_in, path, sizeof(path))) {
		snprintf(err, errlen, "bad cgroup path '%s'", path_in);
		return -EINVAL;
	}
	pthread_rwlock_wrlock(&d->tag_lock);
	t = find_tag(d, path);
	if (!t) {
		pthread_rwlock_unlock(&d->tag_lock);
		snprintf(err, errlen, "cgroup %s is not tagged", path);
		return -ENOENT;
	}
	if (t->from_policy) {
		pthread_rwlock_unlock(&d->tag_lock);
		snprintf(err, errlen,
			 "cgroup %s is tagged by the policy (agent %s): edit the policy and reload",
			 path, t->agent);
		return -EPERM;
	}
	cgid = t->cgid;
	*t = d->tags[--d->ntags];
	rc = save_runtime_tags(d);
	pthread_rwlock_unlock(&d->tag_lock);
	if (rc)
		pr_warn("saving runtime tags: %s", strerror(-rc));
	rc = ag_bpf_untag(d->bpf, cgid);
	if (rc)
		snprintf(err, errlen, "detaching from %s: %s", path, strerror(-rc));
	else
		pr_info("untagged cgroup %s", path);
	return rc;
}

int ag_daemon_detach_all(struct ag_daemon *d, char *err, size_t errlen)
{
	int rc;

	pthread_rwlock_wrlock(&d->tag_lock);
	for (size_t i = 0; i < d->ntags; i++)
		ag_bpf_untag(d->bpf, d->tags[i].cgid);
	d->ntags = 0;
	save_runtime_tags(d);
	pthread_rwlock_unlock(&d->tag_lock);
	/* The maps and programs stay loaded in this daemon; only their pins go. */
	rc = ag_pins_detach_all(ag_bpf_pin_root(d->bpf), err, errlen);
	pr_warn("all programs detached on request: tagged cgroups are no longer intercepted "
		"(a policy reload or restart attaches them again)");
	return rc;
}

bool ag_daemon_agent_of(struct ag_daemon *d, uint64_t tag_cgid, const char *cgroup_path, char *out,
			size_t len)
{
	const struct ag_tag *best = NULL;
	bool found = false;

	pthread_rwlock_rdlock(&d->tag_lock);
	for (size_t i = 0; i < d->ntags; i++) {
		const struct ag_tag *t = &d->tags[i];

		if (tag_cgid && t->cgid == tag_cgid) {
			best = t;
			break;
		}
		/* No tag id (a socket handed to an untagged process): the deepest tag above it. */
		if (!tag_cgid && ag_cgroup_is_within(cgroup_path, t->path) &&
		    (!best || strlen(t->path) > strlen(best->path)))
			best = t;
	}
	if (best) {
		snprintf(out, len, "%s", best->agent);
		found = true;
	}
	pthread_rwlock_unlock(&d->tag_lock);
	return found;
}

/*
 * Session ids stay unique across restarts: ids are handed out from blocks reserved in
 * <state>/session_seq before use, so even a crash never reuses one; a clean stop writes back
 * where it got to, so ids stay contiguous across ordinary restarts.
 */
#define AG_SEQ_BLOCK 10000

static int write_seq(struct ag_daemon *d, uint64_t v)
{
	char path[PATH_MAX], tmp[PATH_MAX + 8];
	FILE *f;

	snprintf(path, sizeof(path), "%s/session_seq", d->opts.state_dir);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "we");
	if (!f)
		return -errno;
	fprintf(f, "%llu\n", (unsigned long long)v);
	if (fflush(f) || fsync(fileno(f))) {
		fclose(f);
		return -errno;
	}
	fclose(f);
	return rename(tmp, path) ? -errno : 0;
}

int ag_daemon_seq_init(struct ag_daemon *d)
{
	char path[PATH_MAX];
	unsigned long long v = 0;
	FILE *f;

	snprintf(path, sizeof(path), "%s/session_seq", d->opts.state_dir);
	f = fopen(path, "re");
	if (f) {
		if (fscanf(f, "%llu", &v) != 1)
			v = 0;
		fclose(f);
	}
	d->next_session_id = v;
	d->seq_reserved = v + AG_SEQ_BLOCK;
	return write_seq(d, d->seq_reserved);
}

void ag_daemon_seq_tick(struct ag_daemon *d)
{
	uint64_t cur = __atomic_load_n(&d->next_session_id, __ATOMIC_RELAXED);

	if (cur + AG_SEQ_BLOCK / 2 < d->seq_reserved)
		return;
	d->seq_reserved = cur + AG_SEQ_BLOCK;
	if (write_seq(d, d->seq_reserved))
		pr_warn("saving the session id sequence: %s", strerror(errno));
}

void ag_daemon_seq_fini(struct ag_daemon *d)
{
	if (write_seq(d, __atomic_load_n(&d->next_session_id, __ATOMIC_RELAXED)))
		pr_warn("saving the session id sequence: %s", strerror(errno));
}
