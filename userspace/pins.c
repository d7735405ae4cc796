// SPDX-License-Identifier: GPL-2.0
/* The bpffs layout (pins.h): listing, counters and removal, shared by the daemon and agctl. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>
#include <linux/magic.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "agentgate.h"
#include "pins.h"

/* Links pinned in root/sub: per cgroup (<cgroup id>_<hook>) or global (<hook>). */
static int list_links(const char *root, const char *sub, bool global, struct ag_pinned_link **out,
		      size_t *n)
{
	char dir[PATH_MAX];
	struct ag_pinned_link *links = NULL;
	size_t cnt = 0, cap = 0;
	struct dirent *de;
	DIR *d;

	*out = NULL;
	*n = 0;
	snprintf(dir, sizeof(dir), "%s/%s", root, sub);
	d = opendir(dir);
	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d))) {
		struct bpf_link_info info = {};
		__u32 ilen = sizeof(info);
		struct ag_pinned_link *l;
		const char *hook = de->d_name;
		int fd;

		if (de->d_name[0] == '.')
			continue;
		if (!global) {
			hook = strchr(de->d_name, '_');
			if (!hook++)
				continue;
		}
		if (cnt == cap) {
			struct ag_pinned_link *nl;

			cap = cap ? cap * 2 : 16;
			nl = realloc(links, cap * sizeof(*links));
			if (!nl) {
				closedir(d);
				free(links);
				return -ENOMEM;
			}
			links = nl;
		}
		l = &links[cnt];
		memset(l, 0, sizeof(*l));
		snprintf(l->pin, sizeof(l->pin), "%s/%s", dir, de->d_name);
		snprintf(l->hook, sizeof(l->hook), "%s", hook);
		l->cgroup_id = global ? 0 : strtoull(de->d_name, NULL, 10);
		fd = bpf_obj_get(l->pin);
		if (fd >= 0) {
			if (!bpf_obj_get_info_by_fd(fd, &info, &ilen)) {
				l->link_id = info.id;
				l->prog_id = info.prog_id;
				if (info.type == BPF_LINK_TYPE_CGROUP) {
					/* 0 once its cgroup is gone: the name still tells which. */
					if (info.cgroup.cgroup_id)
						l->cgroup_id = info.cgroup.cgroup_id;
					l->attach_type = info.cgroup.attach_type;
				} else if (info.type == BPF_LINK_TYPE_TRACING) {
					l->attach_type = info.tracing.attach_type;
				}
			}
			close(fd);
		}
		cnt++;
	}
	closedir(d);
	*out = links;
	*n = cnt;
	return 0;
}

int ag_pins_links(const char *root, struct ag_pinned_link **out, size_t *n)
{
	return list_links(root, "links", false, out, n);
}

int ag_pins_global_links(const char *root, struct ag_pinned_link **out, size_t *n)
{
	return list_links(root, "global", true, out, n);
}

int ag_pins_stats(const char *root, uint64_t *stats, size_t nstats)
{
	char path[PATH_MAX];
	int ncpu = libbpf_num_possible_cpus();
	uint64_t *vals;
	int fd, err = 0;

	memset(stats, 0, nstats * sizeof(*stats));
	if (ncpu <= 0)
		return -EINVAL;
	snprintf(path, sizeof(path), "%s/ag_stats", root);
	fd = bpf_obj_get(path);
	if (fd < 0)
		return -errno;
	vals = calloc(ncpu, sizeof(*vals));
	if (!vals) {
		close(fd);
		return -ENOMEM;
	}
	for (__u32 k = 0; k < nstats && k < AG_STAT_MAX; k++) {
		if (bpf_map_lookup_elem(fd, &k, vals)) {
			err = -errno;
			break;
		}
		for (int c = 0; c < ncpu; c++)
			stats[k] += vals[c];
	}
	free(vals);
	close(fd);
	return err;
}

/* Detaches and unpins each link of links[n]; the last problem in err. 0 or -errno. */
static int detach_links(struct ag_pinned_link *links, size_t n, char *err, size_t errlen)
{
	int ret = 0;

	for (size_t i = 0; i < n; i++) {
		int fd = bpf_obj_get(links[i].pin);

		if (fd >= 0) {
			/*
			 * Tracing (LSM) links may not support detach (EOPNOTSUPP): they go with
			 * their last reference, the pin removed below.
			 */
			if (bpf_link_detach(fd) && errno != EINVAL && errno != ENOLINK &&
			    errno != EOPNOTSUPP) {
				ret = -errno;
				snprintf(err, errlen, "detach %s: %s", links[i].pin,
					 strerror(errno));
			}
			close(fd);
		}
		if (unlink(links[i].pin) && errno != ENOENT) {
			ret = -errno;
			snprintf(err, errlen, "unpin %s: %s", links[i].pin, strerror(errno));
		}
	}
	return ret;
}

int ag_pins_detach_all(const char *root, char *err, size_t errlen)
{
	struct ag_pinned_link *links, *global;
	char path[PATH_MAX];
	struct dirent *de;
	size_t n, ng;
	int rc, ret = 0;
	DIR *d;

	if (err && errlen)
		err[0] = '\0';
	rc = ag_pins_links(root, &links, &n);
	if (rc)
		return rc;
	rc = ag_pins_global_links(root, &global, &ng);
	if (rc) {
		free(links);
		return rc;
	}
	rc = detach_links(links, n, err, errlen);
	if (rc)
		ret = rc;
	rc = detach_links(global, ng, err, errlen);
	if (rc)
		ret = rc;
	free(links);
	free(global);

	/* The sk_msg verdict lives on the sockhash; detach it before dropping the pins. */
	snprintf(path, sizeof(path), "%s/progs/sk_msg", root);
	{
		int pfd = bpf_obj_get(path), mfd;
		char mpath[PATH_MAX];

		snprintf(mpath, sizeof(mpath), "%s/ag_sockhash", root);
		mfd = bpf_obj_get(mpath);
		if (pfd >= 0 && mfd >= 0)
			bpf_prog_detach2(pfd, mfd, BPF_SK_MSG_VERDICT);
		if (pfd >= 0)
			close(pfd);
		if (mfd >= 0)
			close(mfd);
		unlink(path);
	}
	snprintf(path, sizeof(path), "%s/progs", root);
	rmdir(path);
	snprintf(path, sizeof(path), "%s/links", root);
	rmdir(path);
	snprintf(path, sizeof(path), "%s/global", root);
	rmdir(path);

	d = opendir(root);
	if (d) {
		while ((de = readdir(d))) {
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "%s/%s", root, de->d_name);
			if (unlink(path) && errno != ENOENT) {
				ret = -errno;
				snprintf(err, errlen, "unpin %s: %s", path, strerror(errno));
			}
		}
		closedir(d);
	}
	if (rmdir(root) && errno != ENOENT) {
		ret = -errno;
		snprintf(err, errlen, "rmdir %s: %s", root, strerror(errno));
	}
	return ret;
}

int ag_pins_prepare(const char *root, char *err, size_t errlen)
{
	struct statfs st;
	char path[PATH_MAX];

	if (strncmp(root, "/sys/fs/bpf/", 12)) {
		snprintf(err, errlen, "pin root %s is not under /sys/fs/bpf", root);
		return -EINVAL;
	}
	if (statfs("/sys/fs/bpf", &st) || st.f_type != BPF_FS_MAGIC) {
		mkdir("/sys/fs/bpf", 0700);
		if (mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700")) {
			snprintf(err, errlen, "no bpffs at /sys/fs/bpf and mounting one failed: %s",
				 strerror(errno));
			return -errno;
		}
	}
	if (mkdir(root, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "mkdir %s: %s", root, strerror(errno));
		return -errno;
	}
	snprintf(path, sizeof(path), "%s/links", root);
	if (mkdir(path, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "mkdir %s: %s", path, strerror(errno));
		return -errno;
	}
	snprintf(path, sizeof(path), "%s/progs", root);
	if (mkdir(path, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "mkdir %s: %s", path, strerror(errno));
		return -errno;
	}
	snprintf(path, sizeof(path), "%s/global", root);
	if (mkdir(path, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "mkdir %s: %s", path, strerror(errno));
		return -errno;
	}
	return 0;
}
