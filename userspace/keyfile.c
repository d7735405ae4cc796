// SPDX-License-Identifier: GPL-2.0
/*
 * Safe opening of keys, CA files and secret files (keyfile.h): O_NOFOLLOW, a regular file, and
 * for private ones root's ownership and mode 0600 or stricter, all judged on the opened fd.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keyfile.h"

int ag_keyfile_check(const char *path, const char *what, const struct stat *st, char *err,
		     size_t errlen)
{
	const char *acc = st->st_mode & 070  ? ", group-accessible"
			  : st->st_mode & 07 ? ", world-accessible"
					     : "";
	char owner[64] = "", fix[2 * PATH_MAX + 48];

	if (st->st_uid == 0 && !(st->st_mode & 077))
		return 0;
	if (st->st_uid)
		snprintf(owner, sizeof(owner), ", owned by uid %u, not root", (unsigned)st->st_uid);
	if (st->st_uid && (st->st_mode & 077))
		snprintf(fix, sizeof(fix), "chown root:root %s; chmod 600 %s", path, path);
	else if (st->st_uid)
		snprintf(fix, sizeof(fix), "chown root:root %s", path);
	else
		snprintf(fix, sizeof(fix), "chmod 600 %s", path);
	snprintf(err, errlen,
		 "%s %s: must be owned by root and mode 0600 (is %04o%s)%s: only root may read it "
		 "(%s)",
		 what, path, (unsigned)(st->st_mode & 07777), owner, acc, fix);
	return -EACCES;
}

int ag_keyfile_open(const char *path, const char *what, bool private_file, char *err, size_t errlen)
{
	/* O_NONBLOCK: a FIFO put in a key's place must not hang the open. */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
	struct stat st;
	int rc;

	if (fd < 0) {
		rc = errno;
		if (rc == ELOOP) {
			snprintf(err, errlen,
				 "%s %s: is a symbolic link: refused (name the file itself)", what,
				 path);
			return -EACCES;
		}
		snprintf(err, errlen, "%s %s: %s", what, path, strerror(rc));
		return -rc;
	}
	if (fstat(fd, &st)) {
		rc = -errno;
		snprintf(err, errlen, "%s %s: %s", what, path, strerror(-rc));
		close(fd);
		return rc;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(err, errlen, "%s %s: not a regular file", what, path);
		close(fd);
		return -EACCES;
	}
	if (private_file) {
		rc = ag_keyfile_check(path, what, &st, err, errlen);
		if (rc) {
			close(fd);
			return rc;
		}
	}
	/* Reads block again (a regular file: O_NONBLOCK changed nothing but the open). */
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
	return fd;
}

char *ag_keyfile_read(const char *path, const char *what, bool private_file, size_t max,
		      size_t *len, char *err, size_t errlen, int *rc)
{
	int fd = ag_keyfile_open(path, what, private_file, err, errlen);
	struct stat st;
	size_t used = 0;
	char *buf = NULL;

	if (fd < 0) {
		*rc = fd;
		return NULL;
	}
	if (fstat(fd, &st)) {
		*rc = -errno;
		snprintf(err, errlen, "%s %s: %s", what, path, strerror(errno));
		goto out;
	}
	if ((size_t)st.st_size > max) {
		*rc = -EFBIG;
		snprintf(err, errlen, "%s %s is larger than %zu KiB", what, path, max >> 10);
		goto out;
	}
	buf = malloc(st.st_size + 1);
	if (!buf) {
		*rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	while (used < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + used, st.st_size - used);

		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			break;
		}
		used += n;
	}
	buf[used] = '\0';
	*len = used;
	*rc = 0;
out:
	close(fd);
	return buf;
}
