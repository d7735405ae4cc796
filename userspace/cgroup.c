// SPDX-License-Identifier: GPL-2.0
/* cgroup v2 helpers; see cgroup.h. Nothing here attaches programs. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <mntent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cgroup.h"

int ag_cgroup2_root(char *buf, size_t len)
{
	struct mntent *m;
	FILE *f = setmntent("/proc/mounts", "r");
	int err = -ENOENT;

	if (!f)
		return -errno;
	while ((m = getmntent(f))) {
		if (!strcmp(m->mnt_type, "cgroup2")) {
			snprintf(buf, len, "%s", m->mnt_dir);
			err = 0;
			break;
		}
	}
	endmntent(f);
	return err;
}

int ag_cgroup_normalize(const char *in, char *out, size_t len)
{
	size_t o = 0;
	const char *p = in;

	if (!in || len < 2)
		return -EINVAL;
	while (*p) {
		const char *s;
		size_t n;

		while (*p == '/')
			p++;
		if (!*p)
			break;
		s = p;
		while (*p && *p != '/')
			p++;
		n = p - s;
		if ((n == 1 && s[0] == '.'))
			continue;
		if (n == 2 && s[0] == '.' && s[1] == '.')
			return -EINVAL;
		if (o + n + 2 > len)
			return -ENAMETOOLONG;
		out[o++] = '/';
		memcpy(out + o, s, n);
		o += n;
	}
	if (!o)
		out[o++] = '/';
	out[o] = '\0';
	return 0;
}

int ag_cgroup_abs(const char *root, const char *rel, char *out, size_t len)
{
	char norm[PATH_MAX];
	int err = ag_cgroup_normalize(rel, norm, sizeof(norm));

	if (err)
		return err;
	if ((size_t)snprintf(out, len, "%s%s", root, strcmp(norm, "/") ? norm : "") >= len)
		return -ENAMETOOLONG;
	return 0;
}

int ag_cgroup_id(const char *root, const char *rel, uint64_t *id)
{
	char path[PATH_MAX];
	struct {
		struct file_handle fh;
		uint64_t cgid;
	} h;
	int mount_id, err;

	err = ag_cgroup_abs(root, rel, path, sizeof(path));
	if (err)
		return err;
	h.fh.handle_bytes = sizeof(h.cgid);
	if (name_to_handle_at(AT_FDCWD, path, &h.fh, &mount_id, 0) < 0)
		return -errno;
	if (h.fh.handle_bytes != sizeof(uint64_t))
		return -EINVAL;
	memcpy(id, h.fh.f_handle, sizeof(*id));
	return 0;
}

int ag_cgroup_path_of_id(const char *root, uint64_t id, char *out, size_t len)
{
	struct {
		struct file_handle fh;
		uint64_t cgid;
	} h;
	char link[64], target[PATH_MAX];
	int mfd, fd, err = 0;
	ssize_t n;
	size_t rl = strlen(root);

	mfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (mfd < 0)
		return -errno;
	h.fh.handle_bytes = sizeof(uint64_t);
	h.fh.handle_type = 0xfe; /* FILEID_KERNFS */
	memcpy(h.fh.f_handle, &id, sizeof(id));
	fd = open_by_handle_at(mfd, &h.fh, O_RDONLY | O_CLOEXEC);
	close(mfd);
	if (fd < 0)
		return errno == ESTALE ? -ENOENT : -errno;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, target, sizeof(target) - 1);
	if (n < 0) {
		err = -errno;
		goto out;
	}
	target[n] = '\0';
	if (strncmp(target, root, rl) || (target[rl] && target[rl] != '/')) {
		err = -ENOENT;
		goto out;
	}
	snprintf(out, len, "%s", target[rl] ? target + rl : "/");
out:
	close(fd);
	return err;
}

int ag_cgroup_create(const char *root, const char *rel)
{
	char path[PATH_MAX];
	size_t rl = strlen(root);
	int err = ag_cgroup_abs(root, rel, path, sizeof(path));

	if (err)
		return err;
	for (char *p = path + rl + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(path, 0755) && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(path, 0755) && errno != EEXIST)
		return -errno;
	return 0;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, s, strlen(s));
	if (n < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	close(fd);
	return 0;
}

static int destroy_abs(const char *path, const char *parent_procs)
{
	char sub[PATH_MAX], procs[PATH_MAX], line[32];
	struct dirent *de;
	DIR *d = opendir(path);
	FILE *f;

	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d))) {
		if (de->d_type != DT_DIR || !strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(sub, sizeof(sub), "%s/%s", path, de->d_name);
		snprintf(procs, sizeof(procs), "%s/cgroup.procs", path);
		destroy_abs(sub, procs);
	}
	closedir(d);
	snprintf(procs, sizeof(procs), "%s/cgroup.procs", path);
	f = fopen(procs, "re");
	if (f) {
		while (fgets(line, sizeof(line), f))
			write_file(parent_procs, line);
		fclose(f);
	}
	if (rmdir(path) && errno != ENOENT)
		return -errno;
	return 0;
}

int ag_cgroup_destroy(const char *root, const char *rel)
{
	char path[PATH_MAX], parent[PATH_MAX], *slash;
	int err = ag_cgroup_abs(root, rel, path, sizeof(path));

	if (err)
		return err;
	if (!strcmp(path, root))
		return -EINVAL;
	snprintf(parent, sizeof(parent), "%s", path);
	slash = strrchr(parent, '/');
	snprintf(slash, sizeof(parent) - (slash - parent), "/cgroup.procs");
	return destroy_abs(path, parent);
}

int ag_cgroup_move(const char *root, const char *rel, pid_t pid)
{
	char path[PATH_MAX], buf[32];
	int err = ag_cgroup_abs(root, rel, path, sizeof(path));

	if (err)
		return err;
	if (strlen(path) + sizeof("/cgroup.procs") > sizeof(path))
		return -ENAMETOOLONG;
	strcat(path, "/cgroup.procs");
	snprintf(buf, sizeof(buf), "%d", pid ? pid : getpid());
	return write_file(path, buf);
}

int ag_cgroup_of_pid(pid_t pid, char *out, size_t len)
{
	char path[64], line[PATH_MAX + 16];
	FILE *f;
	int err = -ENOENT;

	snprintf(path, sizeof(path), "/proc/%d/cgroup", pid ? pid : getpid());
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, "0::", 3))
			continue;
		line[strcspn(line, "\n")] = '\0';
		snprintf(out, len, "%s", line + 3);
		err = 0;
		break;
	}
	fclose(f);
	return err;
}

int ag_cgroup_is_within(const char *rel, const char *ancestor)
{
	size_t n = strlen(ancestor);

	if (!strcmp(ancestor, "/"))
		return 1;
	return !strncmp(rel, ancestor, n) && (rel[n] == '\0' || rel[n] == '/');
}
