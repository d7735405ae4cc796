// SPDX-License-Identifier: GPL-2.0
/*
 * agctl prog: what agentgate left in the kernel, read from its pins under the bpffs, so that it
 * works while the daemon is down (enforcement outlives the daemon: that is when an operator
 * most needs to see it, and to remove it). `show` lists the pinned links with their programs
 * and cgroups (the host-wide BPF LSM guard's links too), the pinned programs (sk_msg), the
 * pinned maps and the per-CPU counters summed;
 * `detach` removes enforcement, through the daemon if it runs, else straight from the pins.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "agentgate.h"
#include "cgroup.h"
#include "main.h"
#include "pins.h"

enum obj_type { OBJ_UNKNOWN = 0, OBJ_PROG, OBJ_MAP, OBJ_LINK };

struct link_row {
	char pin[PATH_MAX];
	char hook[16];
	uint32_t id;
	uint32_t prog_id;
	uint32_t attach_type;
	uint64_t cgroup_id;
	bool global; /* host-wide (the LSM guard): no cgroup */
	char prog_name[BPF_OBJ_NAME_LEN];
	char cgroup[PATH_MAX]; /* "" when the cgroup is gone or unknown */
};

/* A pinned program or map. */
struct obj_row {
	char pin[PATH_MAX];
	char name[BPF_OBJ_NAME_LEN];
	uint32_t id;
	uint32_t type;	      /* enum bpf_prog_type or enum bpf_map_type */
	int attached;	      /* progs: 1 on ag_sockhash (sk_msg), 0 not, -1 unknown */
	uint32_t max_entries; /* maps */
};

struct inventory {
	char root[PATH_MAX];
	bool from_daemon; /* root as reported by a running agentgated */
	uint32_t daemon_pid;
	struct link_row *links;
	size_t nlinks;
	struct obj_row *progs;
	size_t nprogs;
	struct obj_row *maps;
	size_t nmaps;
	uint64_t stats[AG_STAT_MAX];
	bool have_stats;
};

static const char *const stat_names[AG_STAT_MAX] = {
	[AG_STAT_REDIRECTED] = "redirected",
	[AG_STAT_DENIED] = "denied",
	[AG_STAT_EVENTS_DROPPED] = "events_dropped",
	[AG_STAT_CONNS_LINKED] = "conns_linked",
	[AG_STAT_CONNS_UNLINKED] = "conns_unlinked",
	[AG_STAT_FASTPATH_REDIRECTS] = "fastpath_redirects",
	[AG_STAT_FASTPATH_FALLBACKS] = "fastpath_fallbacks",
	[AG_STAT_FOREIGN_SOCKET] = "foreign_socket",
};

/* What kind of BPF object an fd is, from its anon inode's name (as bpftool does). */
static enum obj_type fd_type(int fd)
{
	char path[64], buf[64];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, buf, sizeof(buf) - 1);
	if (n < 0)
		return OBJ_UNKNOWN;
	buf[n] = '\0';
	if (strstr(buf, "bpf-prog"))
		return OBJ_PROG;
	if (strstr(buf, "bpf-map"))
		return OBJ_MAP;
	if (strstr(buf, "bpf-link"))
		return OBJ_LINK;
	return OBJ_UNKNOWN;
}

static int prog_info_by_id(uint32_t id, struct bpf_prog_info *info)
{
	__u32 len = sizeof(*info);
	int fd, err;

	fd = bpf_prog_get_fd_by_id(id);
	if (fd < 0)
		return -errno;
	memset(info, 0, sizeof(*info));
	err = bpf_obj_get_info_by_fd(fd, info, &len);
	if (err)
		err = -errno;
	close(fd);
	return err;
}

static int cmp_link(const void *a, const void *b)
{
	return strcmp(((const struct link_row *)a)->pin, ((const struct link_row *)b)->pin);
}

static int cmp_map(const void *a, const void *b)
{
	return strcmp(((const struct obj_row *)a)->name, ((const struct obj_row *)b)->name);
}

/* Appends the rows of pl[n] (global ones have no cgroup) to inv->links. */
static void add_links(struct inventory *inv, const struct ag_pinned_link *pl, size_t n, bool global,
		      const char *cgroot)
{
	for (size_t i = 0; i < n; i++) {
		struct link_row *l = &inv->links[inv->nlinks++];
		struct bpf_prog_info pi;

		snprintf(l->pin, sizeof(l->pin), "%s", pl[i].pin);
		snprintf(l->hook, sizeof(l->hook), "%s", pl[i].hook);
		l->id = pl[i].link_id;
		l->prog_id = pl[i].prog_id;
		l->attach_type = pl[i].attach_type;
		l->cgroup_id = pl[i].cgroup_id;
		l->global = global;
		if (l->prog_id && !prog_info_by_id(l->prog_id, &pi))
			snprintf(l->prog_name, sizeof(l->prog_name), "%s", pi.name);
		if (!global && cgroot && l->cgroup_id &&
		    ag_cgroup_path_of_id(cgroot, l->cgroup_id, l->cgroup, sizeof(l->cgroup)))
			l->cgroup[0] = '\0';
	}
}

static int collect_links(struct inventory *inv)
{
	struct ag_pinned_link *pl = NULL, *gl = NULL;
	char cgroot[PATH_MAX];
	bool have_cgroot;
	size_t n = 0, ng = 0;
	int err;

	err = ag_pins_links(inv->root, &pl, &n);
	if (!err)
		err = ag_pins_global_links(inv->root, &gl, &ng);
	if (err) {
		p_err("reading the links pinned under %s: %s", inv->root, strerror(-err));
		goto out;
	}
	if (!n && !ng)
		goto out;
	inv->links = calloc(n + ng, sizeof(*inv->links));
	if (!inv->links) {
		p_err("out of memory");
		err = -ENOMEM;
		goto out;
	}
	have_cgroot = !ag_cgroup2_root(cgroot, sizeof(cgroot));
	add_links(inv, gl, ng, true, NULL);
	add_links(inv, pl, n, false, have_cgroot ? cgroot : NULL);
	qsort(inv->links, inv->nlinks, sizeof(*inv->links), cmp_link);
out:
	free(pl);
	free(gl);
	return err;
}

/* Does the prog sit on map fd's attach point (sk_msg on the sockhash)? 1, 0, or -1 unknown. */
static int prog_attached_to(int map_fd, enum bpf_attach_type type, uint32_t prog_id)
{
	__u32 ids[16], cnt = ARRAY_SIZE(ids), i;

	if (bpf_prog_query(map_fd, type, 0, NULL, ids, &cnt))
		return -1;
	for (i = 0; i < cnt; i++) {
		if (ids[i] == prog_id)
			return 1;
	}
	return 0;
}

/*
 * Calls fn(ctx, path, name, fd) for each object of the given type pinned in dir (fd is open for
 * the call); fn returns false to stop. 0, or -errno when dir cannot be read (missing is 0).
 */
static int for_each_pin(const char *dir, enum obj_type type,
			bool (*fn)(void *ctx, const char *path, const char *name, int fd),
			void *ctx)
{
	char path[PATH_MAX * 2];
	struct dirent *de;
	struct stat st;
	bool more = true;
	DIR *d;

	d = opendir(dir);
	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while (more && (de = readdir(d))) {
		int fd;

		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if (stat(path, &st) || !S_ISREG(st.st_mode))
			continue;
		fd = bpf_obj_get(path);
		if (fd < 0)
			continue;
		if (fd_type(fd) == type)
			more = fn(ctx, path, de->d_name, fd);
		close(fd);
	}
	closedir(d);
	return 0;
}

/* Appends a row to rows (n of them); NULL when out of memory. */
static struct obj_row *add_row(struct obj_row **rows, size_t *n, const char *path,
			       const char *name, uint32_t id, uint32_t type)
{
	struct obj_row *r = realloc(*rows, (*n + 1) * sizeof(*r));

	if (!r)
		return NULL;
	*rows = r;
	r = &r[(*n)++];
	memset(r, 0, sizeof(*r));
	snprintf(r->pin, sizeof(r->pin), "%s", path);
	snprintf(r->name, sizeof(r->name), "%s", name);
	r->id = id;
	r->type = type;
	return r;
}

struct prog_ctx {
	struct inventory *inv;
	int sockhash_fd;
};

static bool add_prog(void *arg, const char *path, const char *name, int fd)
{
	struct prog_ctx *c = arg;
	struct inventory *inv = c->inv;
	struct bpf_prog_info info = {};
	__u32 len = sizeof(info);
	struct obj_row *p;

	if (bpf_obj_get_info_by_fd(fd, &info, &len))
		return true;
	p = add_row(&inv->progs, &inv->nprogs, path, info.name, info.id, info.type);
	if (!p)
		return false;
	p->attached = -1;
	if (info.type == BPF_PROG_TYPE_SK_MSG && c->sockhash_fd >= 0)
		p->attached = prog_attached_to(c->sockhash_fd, BPF_SK_MSG_VERDICT, info.id);
	return true;
}

static int collect_progs(struct inventory *inv)
{
	char dir[PATH_MAX + 8], sockhash[PATH_MAX + 16];
	struct prog_ctx c = { .inv = inv };
	int err;

	snprintf(dir, sizeof(dir), "%s/progs", inv->root);
	snprintf(sockhash, sizeof(sockhash), "%s/ag_sockhash", inv->root);
	c.sockhash_fd = bpf_obj_get(sockhash);
	err = for_each_pin(dir, OBJ_PROG, add_prog, &c);
	if (c.sockhash_fd >= 0)
		close(c.sockhash_fd);
	return err;
}

static bool add_map(void *arg, const char *path, const char *name, int fd)
{
	struct inventory *inv = arg;
	struct bpf_map_info info = {};
	__u32 len = sizeof(info);
	struct obj_row *m;

	if (bpf_obj_get_info_by_fd(fd, &info, &len))
		return true;
	/* The kernel keeps 15 characters of a map's name; the pin has it whole. */
	m = add_row(&inv->maps, &inv->nmaps, path, info.name[0] ? info.name : name, info.id,
		    info.type);
	if (!m)
		return false;
	m->max_entries = info.max_entries;
	return true;
}

static int collect_maps(struct inventory *inv)
{
	int err = for_each_pin(inv->root, OBJ_MAP, add_map, inv);

	if (!err && inv->nmaps)
		qsort(inv->maps, inv->nmaps, sizeof(*inv->maps), cmp_map);
	return err;
}

/* The pin root: -B if given, else the running daemon's, else the default. */
static void resolve_root(struct inventory *inv)
{
	ag_ctl_response *resp;
	char err[256];

	snprintf(inv->root, sizeof(inv->root), "%s", pin_root);
	resp = ctl_request_quiet(AGENTGATE__CTL__REQUEST__CMD_STATUS, 2000, err, sizeof(err));
	if (!resp) {
		p_debug("%s; reading pins under %s", err, inv->root);
		return;
	}
	if (resp->status && !(resp->error && resp->error[0])) {
		inv->daemon_pid = resp->status->pid;
		if (!pin_root_given && resp->status->pin_root && resp->status->pin_root[0]) {
			snprintf(inv->root, sizeof(inv->root), "%s", resp->status->pin_root);
			inv->from_daemon = true;
		}
	}
	ag_ctl_response_free(resp);
}

static int collect(struct inventory *inv)
{
	int err;

	err = collect_links(inv);
	if (err)
		return err;
	err = collect_progs(inv);
	if (!err)
		err = collect_maps(inv);
	if (err) {
		p_err("reading the pins under %s: %s", inv->root, strerror(-err));
		return err;
	}
	inv->have_stats = !ag_pins_stats(inv->root, inv->stats, AG_STAT_MAX);
	return 0;
}

static void inventory_free(struct inventory *inv)
{
	free(inv->links);
	free(inv->progs);
	free(inv->maps);
}

static bool inventory_empty(const struct inventory *inv)
{
	return !inv->nlinks && !inv->nprogs && !inv->nmaps;
}

static const char *str_or(const char *s, const char *def)
{
	return s ? s : def;
}

static const char *base_name(const char *path)
{
	const char *s = strrchr(path, '/');

	return s ? s + 1 : path;
}

static const char *obj_type_str(const struct obj_row *r, bool map)
{
	return str_or(map ? libbpf_bpf_map_type_str(r->type) : libbpf_bpf_prog_type_str(r->type),
		      "unknown");
}

/* "key": [ the programs or the maps ] */
static void objs_json(const char *key, const struct obj_row *rows, size_t n, bool maps)
{
	jsonw_name(json_wtr, key);
	jsonw_start_array(json_wtr);
	for (size_t i = 0; i < n; i++) {
		const struct obj_row *r = &rows[i];

		jsonw_start_object(json_wtr);
		jsonw_uint_field(json_wtr, "id", r->id);
		jsonw_string_field(json_wtr, "name", r->name);
		jsonw_string_field(json_wtr, "type", obj_type_str(r, maps));
		if (maps)
			jsonw_uint_field(json_wtr, "max_entries", r->max_entries);
		else if (r->attached >= 0)
			jsonw_bool_field(json_wtr, "attached", r->attached);
		else
			jsonw_null_field(json_wtr, "attached");
		jsonw_string_field(json_wtr, "pin", r->pin);
		jsonw_end_object(json_wtr);
	}
	jsonw_end_array(json_wtr);
}

static void show_json(const struct inventory *inv)
{
	size_t i;

	jsonw_start_object(json_wtr);
	jsonw_string_field(json_wtr, "pin_root", inv->root);
	jsonw_bool_field(json_wtr, "daemon", inv->daemon_pid != 0);
	if (inv->daemon_pid)
		jsonw_uint_field(json_wtr, "daemon_pid", inv->daemon_pid);
	jsonw_bool_field(json_wtr, "attached", !inventory_empty(inv));

	jsonw_name(json_wtr, "links");
	jsonw_start_array(json_wtr);
	for (i = 0; i < inv->nlinks; i++) {
		const struct link_row *l = &inv->links[i];

		jsonw_start_object(json_wtr);
		jsonw_uint_field(json_wtr, "id", l->id);
		jsonw_string_field(json_wtr, "hook", l->hook);
		jsonw_string_field(json_wtr, "attach_type",
				   str_or(libbpf_bpf_attach_type_str(l->attach_type), "unknown"));
		jsonw_uint_field(json_wtr, "prog_id", l->prog_id);
		jsonw_string_field(json_wtr, "prog_name", l->prog_name);
		jsonw_bool_field(json_wtr, "global", l->global);
		jsonw_uint_field(json_wtr, "cgroup_id", l->cgroup_id);
		if (l->cgroup[0])
			jsonw_string_field(json_wtr, "cgroup", l->cgroup);
		else
			jsonw_null_field(json_wtr, "cgroup");
		jsonw_string_field(json_wtr, "pin", l->pin);
		jsonw_end_object(json_wtr);
	}
	jsonw_end_array(json_wtr);

	objs_json("progs", inv->progs, inv->nprogs, false);
	objs_json("maps", inv->maps, inv->nmaps, true);

	jsonw_name(json_wtr, "stats");
	if (inv->have_stats) {
		jsonw_start_object(json_wtr);
		for (i = 0; i < AG_STAT_MAX; i++)
			jsonw_uint_field(json_wtr, stat_names[i], inv->stats[i]);
		jsonw_end_object(json_wtr);
	} else {
		jsonw_null(json_wtr);
	}
	jsonw_end_object(json_wtr);
}

static void show_plain(const struct inventory *inv)
{
	static const char *const link_hdr[] = { "LINK",	     "HOOK",	  "ATTACH_TYPE", "PROG",
						"PROG_NAME", "CGROUP_ID", "CGROUP" };
	static const char *const prog_hdr[] = { "PROG", "TYPE", "NAME", "ATTACHED", "PIN" };
	static const char *const map_hdr[] = { "MAP", "NAME", "TYPE", "MAX_ENTRIES" };
	struct table *t;
	char a[24], b[24], c[24];
	size_t i;

	if (inv->daemon_pid)
		printf("pin root %s (agentgated running, pid %u)\n", inv->root, inv->daemon_pid);
	else
		printf("pin root %s (agentgated not running)\n", inv->root);

	if (inv->nlinks) {
		putchar('\n');
		t = table_new(link_hdr, ARRAY_SIZE(link_hdr));
		for (i = 0; i < inv->nlinks; i++) {
			const struct link_row *l = &inv->links[i];

			snprintf(a, sizeof(a), "%u", l->id);
			snprintf(b, sizeof(b), "%u", l->prog_id);
			snprintf(c, sizeof(c), "%" PRIu64, l->cgroup_id);
			table_add(t, a, l->hook,
				  str_or(libbpf_bpf_attach_type_str(l->attach_type), "unknown"), b,
				  l->prog_name, l->global ? "-" : c,
				  l->global	 ? "(host-wide)"
				  : l->cgroup[0] ? l->cgroup
						 : "(gone)");
		}
		table_print(t, stdout);
		table_free(t);
	}
	if (inv->nprogs) {
		putchar('\n');
		t = table_new(prog_hdr, ARRAY_SIZE(prog_hdr));
		for (i = 0; i < inv->nprogs; i++) {
			const struct obj_row *p = &inv->progs[i];

			snprintf(a, sizeof(a), "%u", p->id);
			table_add(t, a, obj_type_str(p, false), p->name,
				  p->attached > 0    ? "ag_sockhash"
				  : p->attached == 0 ? "no"
						     : "-",
				  p->pin);
		}
		table_print(t, stdout);
		table_free(t);
	}
	if (inv->nmaps) {
		putchar('\n');
		t = table_new(map_hdr, ARRAY_SIZE(map_hdr));
		for (i = 0; i < inv->nmaps; i++) {
			const struct obj_row *m = &inv->maps[i];

			snprintf(a, sizeof(a), "%u", m->id);
			snprintf(b, sizeof(b), "%u", m->max_entries);
			table_add(t, a, m->name, obj_type_str(m, true), b);
		}
		table_print(t, stdout);
		table_free(t);
	}
	if (inv->have_stats) {
		printf("\ncounters\n");
		for (i = 0; i < AG_STAT_MAX; i++)
			printf("  %-20s %" PRIu64 "\n", stat_names[i], inv->stats[i]);
	}
}

static int do_show(int argc, char **argv)
{
	struct inventory inv = {};
	int ret;

	if (!NO_MORE_ARGS())
		return -1;
	resolve_root(&inv);
	ret = collect(&inv);
	if (ret)
		goto out;
	if (json_output)
		show_json(&inv);
	else if (inventory_empty(&inv))
		printf("no agentgate programs attached (nothing pinned under %s)\n", inv.root);
	else
		show_plain(&inv);
out:
	inventory_free(&inv);
	return ret ? -1 : 0;
}

static bool pin_gone(const char *pin)
{
	return access(pin, F_OK) && errno == ENOENT;
}

/* The programs or maps whose pins went, for detach_local(). */
static void objs_removed(const struct obj_row *rows, size_t n, bool maps)
{
	for (size_t i = 0; i < n; i++) {
		const struct obj_row *r = &rows[i];

		if (!pin_gone(r->pin))
			continue;
		if (json_output) {
			jsonw_start_object(json_wtr);
			jsonw_string_field(json_wtr, "kind", maps ? "map" : "prog");
			jsonw_uint_field(json_wtr, "id", r->id);
			jsonw_string_field(json_wtr, "name", r->name);
			jsonw_string_field(json_wtr, "pin", r->pin);
			jsonw_end_object(json_wtr);
		} else if (maps) {
			printf("removed map %s\n", base_name(r->pin));
		} else {
			printf("detached prog %u (%s)\n", r->id, base_name(r->pin));
		}
	}
}

/* Without the daemon: remove the pins ourselves and say what went. */
static int detach_local(void)
{
	struct inventory inv = {};
	char err[512] = "";
	size_t i;
	int rc;

	snprintf(inv.root, sizeof(inv.root), "%s", pin_root);
	if (collect(&inv)) {
		inventory_free(&inv);
		return -1;
	}
	if (inventory_empty(&inv)) {
		if (json_output) {
			jsonw_start_object(json_wtr);
			jsonw_bool_field(json_wtr, "daemon", false);
			jsonw_string_field(json_wtr, "pin_root", inv.root);
			jsonw_name(json_wtr, "removed");
			jsonw_start_array(json_wtr);
			jsonw_end_array(json_wtr);
			jsonw_end_object(json_wtr);
		} else {
			printf("nothing to detach (nothing pinned under %s)\n", inv.root);
		}
		inventory_free(&inv);
		return 0;
	}

	rc = ag_pins_detach_all(inv.root, err, sizeof(err));

	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_bool_field(json_wtr, "daemon", false);
		jsonw_string_field(json_wtr, "pin_root", inv.root);
		jsonw_name(json_wtr, "removed");
		jsonw_start_array(json_wtr);
	} else {
		printf("agentgated is not running: removing the pins under %s\n", inv.root);
	}
	for (i = 0; i < inv.nlinks; i++) {
		const struct link_row *l = &inv.links[i];

		if (!pin_gone(l->pin))
			continue;
		if (json_output) {
			jsonw_start_object(json_wtr);
			jsonw_string_field(json_wtr, "kind", "link");
			jsonw_uint_field(json_wtr, "id", l->id);
			jsonw_string_field(json_wtr, "hook", l->hook);
			jsonw_bool_field(json_wtr, "global", l->global);
			jsonw_uint_field(json_wtr, "cgroup_id", l->cgroup_id);
			jsonw_string_field(json_wtr, "pin", l->pin);
			jsonw_end_object(json_wtr);
		} else if (l->global) {
			printf("detached link %u (%s, host-wide)\n", l->id, l->hook);
		} else {
			printf("detached link %u (%s on cgroup %s)\n", l->id, l->hook,
			       l->cgroup[0] ? l->cgroup : "(gone)");
		}
	}
	objs_removed(inv.progs, inv.nprogs, false);
	objs_removed(inv.maps, inv.nmaps, true);
	if (json_output) {
		jsonw_end_array(json_wtr);
		if (rc)
			jsonw_string_field(json_wtr, "error", err[0] ? err : strerror(-rc));
		jsonw_end_object(json_wtr);
	} else if (rc) {
		p_err("%s", err[0] ? err : strerror(-rc));
	}
	inventory_free(&inv);
	return rc ? -1 : 0;
}

static int do_detach(int argc, char **argv)
{
	ag_ctl_response *resp;
	char err[512];

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_quiet(AGENTGATE__CTL__REQUEST__CMD_PROG_DETACH, 0, err, sizeof(err));
	if (!resp) {
		p_debug("%s", err);
		return detach_local();
	}
	resp = ctl_checked(resp, err);
	if (!resp)
		return -1;
	print_change(resp, "detached", json_flag_field, "daemon");
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
		"Usage: %1$s %2$s { show | list }\n"
		"       %1$s %2$s detach\n"
		"       %1$s %2$s help\n"
		"\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "prog");
	return 0;
}

static const struct cmd cmds[] = {
	{ "show", do_show },
	{ "list", do_show },
	{ "detach", do_detach },
	{ "help", do_help },
	{ 0 }
};

int do_prog(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
