/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Opening the daemon's own sensitive files (the CA and its key, the audit signing key, secret
 * and key files a policy names): never through a symbolic link (O_NOFOLLOW), only a regular
 * file, and a private one only when root owns it and no group or other bit is set. Every check
 * is made with fstat() on the opened fd, so the file judged is the file read.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>

/*
 * Opens path read-only; what names it in errors ("secret file", "CA key", ...). A symbolic link
 * or anything but a regular file is refused, and with private_file also a file not owned by
 * root or with any group/other permission. The fd (O_CLOEXEC), or -errno (-EACCES for a
 * refusal) with err "<what> <path>: ...".
 */
int ag_keyfile_open(const char *path, const char *what, bool private_file, char *err,
		    size_t errlen);
/*
 * The owner and mode check alone (st from fstat): 0, or -EACCES with err
 * "<what> <path>: must be owned by root and mode 0600 (is 0644)..." and the fix.
 */
int ag_keyfile_check(const char *path, const char *what, const struct stat *st, char *err,
		     size_t errlen);
/*
 * ag_keyfile_open(), then the whole file (at most max bytes): malloc'ed and NUL-terminated,
 * its length in len; NULL with *rc (-errno) and err set.
 */
char *ag_keyfile_read(const char *path, const char *what, bool private_file, size_t max,
		      size_t *len, char *err, size_t errlen, int *rc);
