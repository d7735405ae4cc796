// SPDX-License-Identifier: GPL-2.0
/* The daemon's BPF loader; see bpf_loader.h. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "agentgate.skel.h"
#include "bpf_loader.h"
#include "cgroup.h"
#include "log.h"
#include "pins.h"

struct ag_bpf {
	struct agentgate_bpf *skel;
	struct ring_buffer *rb;
	ag_bpf_event_fn fn;
	void *fn_ctx;
	bool lsm; /* BPF LSM active: the guard programs are loaded */
	struct ag_relay_dir *relay_dirs; /* mmap of ag_relay_dirs */
	char pin_root[PATH_MAX];
};

static const struct {
	const char *hook;
	enum bpf_attach_type type;
} hooks[] = {
	{ "connect4", BPF_CGROUP_INET4_CONNECT },
	{ "connect6", BPF_CGROUP_INET6_CONNECT },
	{ "sockops", BPF_CGROUP_SOCK_OPS },
};
#define NHOOKS (sizeof(hooks) / sizeof(hooks[0]))

static int hook_prog_fd(struct ag_bpf *b, size_t i)
{
	switch (i) {
	case 0:
		return bpf_program__fd(b->skel->progs.ag_connect4);
	case 1:
		return bpf_program__fd(b->skel->progs.ag_connect6);
	default:
		return bpf_program__fd(b->skel->progs.ag_sockops);
	}
}

/*
 * Host-wide BPF LSM programs, pinned under <root>/global/ (never under links/, which holds only
 * per-cgroup links and is pruned by cgroup id).
 */
static const char *const lsm_pins[] = { "lsm_connect", "lsm_sendmsg" };
#define NLSM (sizeof(lsm_pins) / sizeof(lsm_pins[0]))

static struct bpf_program *lsm_prog(struct ag_bpf *b, size_t i)
{
	return i == 0 ? b->skel->progs.ag_lsm_connect : b->skel->progs.ag_lsm_sendmsg;
}

static bool lsm_listed(void)
{
	char buf[512], *tok, *save = NULL;
	ssize_t n;
	int fd;

	fd = open("/sys/kernel/security/lsm", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	for (tok = strtok_r(buf, ",\n", &save); tok; tok = strtok_r(NULL, ",\n", &save)) {
		if (!strcmp(tok, "bpf"))
			return true;
	}
	return false;
}

/*
 * Can we run BPF LSM programs? "bpf" must be among the active LSMs (the securityfs mounted to
 * find out, if nobody did), and the kernel must take a program: some refuse every program
 * that needs a trampoline (fentry, LSM) even as root. If not, why says why.
 */
static bool bpf_lsm_usable(char *why, size_t len)
{
	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	LIBBPF_OPTS(bpf_prog_load_opts, po, .expected_attach_type = BPF_LSM_MAC);
	int fd, id;

	if (access("/sys/kernel/security/lsm", F_OK) &&
	    mount("none", "/sys/kernel/security", "securityfs", 0, NULL) && errno != EBUSY)
		pr_debug("mounting the securityfs: %s", strerror(errno));
	if (!lsm_listed()) {
		snprintf(why, len, "no \"bpf\" in /sys/kernel/security/lsm: boot with lsm=...,bpf");
		return false;
	}
	id = libbpf_find_vmlinux_btf_id("socket_connect", BPF_LSM_MAC);
	if (id < 0) {
		snprintf(why, len, "no bpf_lsm_socket_connect in the kernel's BTF");
		return false;
	}
	po.attach_btf_id = id;
	fd = bpf_prog_load(BPF_PROG_TYPE_LSM, "ag_lsm_probe", "GPL", insns, 2, &po);
	if (fd < 0) {
		snprintf(why, len, "the kernel refuses BPF LSM programs: %s", strerror(errno));
		return false;
	}
	close(fd);
	return true;
}

/*
 * Attaches guard program i and pins its link. With replace, an existing pin (a previous
 * daemon's) is pointed at our program: in place where the kernel updates the link, else a new
 * link is attached and pinned over the old one before the old one goes, so there is never a
 * moment without the guard and never two links left. Without replace, an existing pin is kept.
 */
static int attach_lsm_one(struct ag_bpf *b, size_t i, bool replace, char *err, size_t errlen)
{
	struct bpf_program *prog = lsm_prog(b, i);
	char pin[PATH_MAX], tmp[PATH_MAX];
	struct bpf_link *link;
	int old, rc = 0;

	snprintf(pin, sizeof(pin), "%s/global/%s", b->pin_root, lsm_pins[i]);
	snprintf(tmp, sizeof(tmp), "%s/global/%s_new", b->pin_root, lsm_pins[i]);
	old = bpf_obj_get(pin);
	if (old >= 0 && (!replace || !bpf_link_update(old, bpf_program__fd(prog), NULL)))
		goto out;
	/* Tracing (LSM) links cannot be updated: a new one, pinned over the old. */
	link = bpf_program__attach_lsm(prog);
	if (!link) {
		rc = -errno;
		snprintf(err, errlen, "attaching %s (BPF LSM): %s", bpf_program__name(prog),
			 strerror(errno));
		goto out;
	}
	unlink(tmp);
	rc = bpf_link__pin(link, tmp);
	if (!rc && rename(tmp, pin))
		rc = -errno;
	if (rc) {
		snprintf(err, errlen, "pinning %s: %s", pin, strerror(-rc));
		unlink(tmp);
	}
	/* Pinned, the link stays attached when our fd closes; unpinned, it goes. */
	bpf_link__destroy(link);
	/*
	 * The replaced link: its pin is gone and our fd is its last reference (most kernels cannot
	 * detach a tracing link otherwise: EOPNOTSUPP).
	 */
	if (!rc && old >= 0)
		bpf_link_detach(old);
out:
	if (old >= 0)
		close(old);
	return rc;
}

/* The host-wide guard (no-op without BPF LSM); see attach_lsm_one(). */
static int attach_lsm(struct ag_bpf *b, bool replace, char *err, size_t errlen)
{
	for (size_t i = 0; i < NLSM && b->lsm; i++) {
		int rc = attach_lsm_one(b, i, replace, err, errlen);

		if (rc)
			return rc;
	}
	return 0;
}

static int on_event(void *ctx, void *data, size_t len)
{
	struct ag_bpf *b = ctx;

	if (len < sizeof(struct ag_event))
		return 0;
	return b->fn ? b->fn(b->fn_ctx, data) : 0;
}

/* Opens and loads the skeleton into b->skel (NULL on failure), the LSM guard only with lsm. */
static int open_and_load(struct ag_bpf *b, const struct ag_bpf_opts *opts, bool lsm, char *err,
			 size_t errlen)
{
	LIBBPF_OPTS(bpf_object_open_opts, oopts, .pin_root_path = b->pin_root);
	int rc;

	b->skel = agentgate_bpf__open_opts(&oopts);
	if (!b->skel) {
		rc = -errno;
		snprintf(err, errlen, "opening the BPF object: %s", strerror(errno));
		return rc;
	}
	b->skel->rodata->gw_port = opts->port;
	b->skel->rodata->daemon_mark = opts->mark;
	b->skel->rodata->daemon_tgid = getpid();
	for (size_t i = 0; i < NLSM && !lsm; i++)
		bpf_program__set_autoload(lsm_prog(b, i), false);
	rc = agentgate_bpf__load(b->skel);
	if (rc) {
		snprintf(err, errlen,
			 "loading the BPF programs: %s (the verifier's log is above; pins of an "
			 "incompatible version under %s are removed by 'agctl prog detach')",
			 strerror(-rc), b->pin_root);
		agentgate_bpf__destroy(b->skel);
		b->skel = NULL;
	}
	return rc;
}

struct ag_bpf *ag_bpf_load(const struct ag_bpf_opts *opts, ag_bpf_event_fn fn, void *ctx,
			   char *err, size_t errlen)
{
	char path[PATH_MAX], why[256];
	struct ag_bpf *b;
	int rc, pfd, mfd;

	if (access("/sys/kernel/btf/vmlinux", R_OK)) {
		snprintf(err, errlen, "kernel BTF (/sys/kernel/btf/vmlinux) not available: "
				      "agentgate needs a kernel built with CONFIG_DEBUG_INFO_BTF=y");
		return NULL;
	}
	b = calloc(1, sizeof(*b));
	if (!b) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	b->fn = fn;
	b->fn_ctx = ctx;
	snprintf(b->pin_root, sizeof(b->pin_root), "%s", opts->pin_root);
	rc = ag_pins_prepare(b->pin_root, err, errlen);
	if (rc)
		goto fail;

	b->lsm = bpf_lsm_usable(why, sizeof(why));
	rc = open_and_load(b, opts, b->lsm, err, errlen);
	if (rc && b->lsm) {
		/* The guard is a second line: never the reason the data path is down. */
		pr_warn("%s; loading again without the BPF LSM guard", err);
		snprintf(why, sizeof(why), "its programs failed to load");
		b->lsm = false;
		rc = open_and_load(b, opts, false, err, errlen);
	}
	if (rc)
		goto fail;
	if (!b->lsm)
		pr_warn("BPF LSM not active: sockets created outside tagged cgroups are not "
			"covered (%s)",
			why);

	/* sk_msg verdict on the sockhash; re-attaching replaces a previous daemon's program. */
	pfd = bpf_program__fd(b->skel->progs.ag_sk_msg);
	mfd = bpf_map__fd(b->skel->maps.ag_sockhash);
	if (bpf_prog_attach(pfd, mfd, BPF_SK_MSG_VERDICT, 0)) {
		snprintf(err, errlen, "attaching sk_msg to the sockhash: %s", strerror(errno));
		goto fail;
	}
	snprintf(path, sizeof(path), "%s/progs/sk_msg", b->pin_root);
	unlink(path);
	if (bpf_obj_pin(pfd, path))
		pr_warn("pinning %s: %s", path, strerror(errno));

	/* The kernel relay's verdict (sk_skb.bpf.c) on its own sockhash; see ag_bpf_relay_*(). */
	pfd = bpf_program__fd(b->skel->progs.ag_sk_skb);
	mfd = bpf_map__fd(b->skel->maps.ag_relay_socks);
	/* Optional (--kernel-relay): without it, raw sessions keep the splice relay. */
	if (bpf_prog_attach(pfd, mfd, BPF_SK_SKB_STREAM_VERDICT, 0))
		pr_warn("attaching sk_skb to the relay sockhash: %s (no kernel relay)",
			strerror(errno));
	else
		b->relay_dirs = mmap(NULL, 2 * AG_RELAY_SLOTS * sizeof(struct ag_relay_dir),
				     PROT_READ | PROT_WRITE, MAP_SHARED,
				     bpf_map__fd(b->skel->maps.ag_relay_dirs), 0);
	if (b->relay_dirs == MAP_FAILED) {
		b->relay_dirs = NULL;
		pr_warn("mapping the relay state: %s (no kernel relay)", strerror(errno));
	}

	/*
	 * A previous daemon's guard runs its programs (its tgid exempt, not ours): ours now. With
	 * none there, the guard comes with the first tagged cgroup (ag_bpf_tag).
	 */
	snprintf(path, sizeof(path), "%s/global/%s", b->pin_root, lsm_pins[0]);
	if (b->lsm && !access(path, F_OK) && attach_lsm(b, true, err, errlen))
		goto fail;

	if (ag_bpf_set_fastpath(b, opts->fastpath)) {
		snprintf(err, errlen, "writing the config map: %s", strerror(errno));
		goto fail;
	}
	b->rb = ring_buffer__new(bpf_map__fd(b->skel->maps.ag_events), on_event, b, NULL);
	if (!b->rb) {
		snprintf(err, errlen, "opening the event ring buffer: %s", strerror(errno));
		goto fail;
	}
	return b;
fail:
	ag_bpf_free(b);
	return NULL;
}

void ag_bpf_free(struct ag_bpf *b)
{
	if (!b)
		return;
	ring_buffer__free(b->rb);
	if (b->relay_dirs)
		munmap(b->relay_dirs, 2 * AG_RELAY_SLOTS * sizeof(struct ag_relay_dir));
	agentgate_bpf__destroy(b->skel);
	free(b);
}

static void link_pin_path(struct ag_bpf *b, uint64_t cgid, size_t hook, char *out, size_t len)
{
	snprintf(out, len, "%s/links/%llu_%s", b->pin_root, (unsigned long long)cgid,
		 hooks[hook].hook);
}

/*
 * Another agentgated (other pins) attached to this very cgroup? Its hooks and ours would both
 * rewrite each connect. Refuse instead, naming the program, unless the link is our own pin.
 */
static int foreign_attach(struct ag_bpf *b, int cgfd, uint64_t cgid, char *err, size_t errlen,
			  const char *rel)
{
	char pin[PATH_MAX];
	__u32 ids[64], cnt = 64, flags = 0;

	link_pin_path(b, cgid, 0, pin, sizeof(pin));
	if (!access(pin, F_OK))
		return 0;
	if (bpf_prog_query(cgfd, BPF_CGROUP_INET4_CONNECT, 0, &flags, ids, &cnt))
		return 0;
	for (__u32 i = 0; i < cnt; i++) {
		struct bpf_prog_info info = {};
		__u32 len = sizeof(info);
		int fd = bpf_prog_get_fd_by_id(ids[i]);
		bool ours;

		if (fd < 0)
			continue;
		ours = !bpf_obj_get_info_by_fd(fd, &info, &len) && !strcmp(info.name, "ag_connect4");
		close(fd);
		if (ours) {
			snprintf(err, errlen,
				 "cgroup %s already has agentgate's connect4 (prog id %u) attached by "
				 "another agentgated; remove it first with 'agctl -B <its pin dir> prog "
				 "detach'",
				 rel, ids[i]);
			return -EEXIST;
		}
	}
	return 0;
}

int ag_bpf_tag(struct ag_bpf *b, const char *cg_root, const char *rel, uint64_t *cgidp, char *err,
	       size_t errlen)
{
	char abs[PATH_MAX], pin[PATH_MAX];
	uint64_t cgid;
	__u32 one = 1;
	int cgfd, rc;

	rc = ag_cgroup_abs(cg_root, rel, abs, sizeof(abs));
	if (!rc)
		rc = ag_cgroup_id(cg_root, rel, &cgid);
	if (rc) {
		snprintf(err, errlen, "cgroup %s: %s", rel, strerror(-rc));
		return rc;
	}
	cgfd = open(abs, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cgfd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cgroup %s: %s", rel, strerror(errno));
		return rc;
	}
	rc = foreign_attach(b, cgfd, cgid, err, errlen, rel);
	if (rc)
		goto out;
	/* After an 'agctl prog detach' the pin folders are gone: make them again. */
	rc = ag_pins_prepare(b->pin_root, err, errlen);
	if (rc)
		goto out;
	/* The guard before the tag: a socket made outside must not slip through meanwhile. */
	rc = attach_lsm(b, false, err, errlen);
	if (rc)
		goto out;
	/* Tag first: a connect that runs the hook must find its agent. */
	if (bpf_map_update_elem(bpf_map__fd(b->skel->maps.ag_tagged), &cgid, &one, BPF_ANY)) {
		rc = -errno;
		snprintf(err, errlen, "tagging cgroup %s: %s", rel, strerror(errno));
		goto out;
	}
	for (size_t i = 0; i < NHOOKS; i++) {
		int lfd;

		link_pin_path(b, cgid, i, pin, sizeof(pin));
		lfd = bpf_obj_get(pin);
		if (lfd >= 0) {
			/* A link from a previous daemon: point it at our program, no gap. */
			if (!bpf_link_update(lfd, hook_prog_fd(b, i), NULL)) {
				close(lfd);
				continue;
			}
			pr_warn("updating %s failed (%s); re-creating it", pin, strerror(errno));
			bpf_link_detach(lfd);
			close(lfd);
			unlink(pin);
		}
		lfd = bpf_link_create(hook_prog_fd(b, i), cgfd, hooks[i].type, NULL);
		if (lfd < 0) {
			rc = -errno;
			snprintf(err, errlen, "attaching %s to cgroup %s: %s", hooks[i].hook, rel,
				 strerror(errno));
			goto out;
		}
		if (bpf_obj_pin(lfd, pin)) {
			rc = -errno;
			snprintf(err, errlen, "pinning %s: %s", pin, strerror(errno));
			bpf_link_detach(lfd);
			close(lfd);
			goto out;
		}
		close(lfd);
	}
	if (cgidp)
		*cgidp = cgid;
	pr_info("tagged cgroup %s (id %llu)", rel, (unsigned long long)cgid);
out:
	close(cgfd);
	return rc;
}

int ag_bpf_untag(struct ag_bpf *b, uint64_t cgid)
{
	char pin[PATH_MAX];
	int ret = 0;

	for (size_t i = 0; i < NHOOKS; i++) {
		int lfd;

		link_pin_path(b, cgid, i, pin, sizeof(pin));
		lfd = bpf_obj_get(pin);
		if (lfd >= 0) {
			if (bpf_link_detach(lfd) && errno != ENOLINK)
				ret = -errno;
			close(lfd);
		}
		unlink(pin);
	}
	bpf_map_delete_elem(bpf_map__fd(b->skel->maps.ag_tagged), &cgid);
	return ret;
}

bool ag_bpf_is_attached(struct ag_bpf *b, uint64_t cgid)
{
	char pin[PATH_MAX];

	for (size_t i = 0; i < NHOOKS; i++) {
		link_pin_path(b, cgid, i, pin, sizeof(pin));
		if (access(pin, F_OK))
			return false;
	}
	return true;
}

int ag_bpf_prune(struct ag_bpf *b, const uint64_t *keep, size_t nkeep)
{
	struct ag_pinned_link *links;
	__u64 key, next, *pkey = NULL;
	int tfd = bpf_map__fd(b->skel->maps.ag_tagged);
	size_t n;
	int rc = ag_pins_links(b->pin_root, &links, &n);

	if (rc)
		return rc;
	for (size_t i = 0; i < n; i++) {
		bool kept = false;

		for (size_t j = 0; j < nkeep && !kept; j++)
			kept = keep[j] == links[i].cgroup_id;
		if (kept)
			continue;
		pr_info("detaching stale %s link of cgroup id %llu", links[i].hook,
			(unsigned long long)links[i].cgroup_id);
		ag_bpf_untag(b, links[i].cgroup_id);
	}
	free(links);
	/* Tagged ids nobody keeps (the map is pinned and outlives policies). */
	while (!bpf_map_get_next_key(tfd, pkey, &next)) {
		bool kept = false;

		for (size_t j = 0; j < nkeep && !kept; j++)
			kept = keep[j] == next;
		key = next;
		pkey = &key;
		if (!kept)
			bpf_map_delete_elem(tfd, &next);
	}
	return 0;
}

int ag_bpf_lookup_conn(struct ag_bpf *b, const struct ag_conn_key *key, struct ag_conn_info *info)
{
	if (bpf_map_lookup_elem(bpf_map__fd(b->skel->maps.ag_conns), key, info))
		return -errno;
	return 0;
}

int ag_bpf_set_fastpath(struct ag_bpf *b, bool on)
{
	struct ag_config cfg = { .fastpath = on };
	__u32 zero = 0;

	if (bpf_map_update_elem(bpf_map__fd(b->skel->maps.ag_config), &zero, &cfg, BPF_ANY))
		return -errno;
	return 0;
}

int ag_bpf_sockhash_add(struct ag_bpf *b, int fd, const struct ag_sock_key *key)
{
	struct ag_sock_key agent = { .lport = key->rport, .rport = key->lport };
	int mfd = bpf_map__fd(b->skel->maps.ag_sockhash);
	__u64 v = fd, cookie;

	/*
	 * The agent's end joined at connect unless it was blocking (bpf/lib/fastpath.h): then
	 * nothing is ever redirected and our socket would only pay for tcp_bpf.
	 */
	memcpy(agent.local, key->remote, sizeof(agent.local));
	memcpy(agent.remote, key->local, sizeof(agent.remote));
	if (bpf_map_lookup_elem(mfd, &agent, &cookie))
		return -errno;
	if (bpf_map_update_elem(mfd, key, &v, BPF_NOEXIST))
		return -errno;
	return 0;
}

struct ag_relay_dir *ag_bpf_relay_dirs(struct ag_bpf *b)
{
	return b->relay_dirs;
}

int ag_bpf_relay_add(struct ag_bpf *b, uint32_t key, int fd, uint64_t cookie)
{
	__u64 v = fd;

	if (bpf_map_update_elem(bpf_map__fd(b->skel->maps.ag_relay_idx), &cookie, &key, BPF_ANY))
		return -errno;
	if (bpf_map_update_elem(bpf_map__fd(b->skel->maps.ag_relay_socks), &key, &v, BPF_ANY)) {
		int rc = -errno;

		bpf_map_delete_elem(bpf_map__fd(b->skel->maps.ag_relay_idx), &cookie);
		return rc;
	}
	return 0;
}

void ag_bpf_relay_del(struct ag_bpf *b, uint32_t key, uint64_t cookie)
{
	bpf_map_delete_elem(bpf_map__fd(b->skel->maps.ag_relay_socks), &key);
	bpf_map_delete_elem(bpf_map__fd(b->skel->maps.ag_relay_idx), &cookie);
}

int ag_bpf_events_fd(struct ag_bpf *b)
{
	return ring_buffer__epoll_fd(b->rb);
}

int ag_bpf_events_consume(struct ag_bpf *b)
{
	return ring_buffer__consume(b->rb);
}

const char *ag_bpf_pin_root(struct ag_bpf *b)
{
	return b->pin_root;
}

int64_t ag_boot_to_unix_ns(uint64_t boot_ns)
{
	struct timespec rt, bt;

	clock_gettime(CLOCK_REALTIME, &rt);
	clock_gettime(CLOCK_BOOTTIME, &bt);
	return (int64_t)boot_ns + ((int64_t)rt.tv_sec - bt.tv_sec) * 1000000000LL +
	       (rt.tv_nsec - bt.tv_nsec);
}
