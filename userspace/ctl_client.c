// SPDX-License-Identifier: GPL-2.0
/* The blocking client half of the control protocol, used by agctl and the selftests. */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl.h"

int ag_ctl_connect(const char *path)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(sun.sun_path))
		return -ENAMETOOLONG;
	strcpy(sun.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	return fd;
}

static int wait_fd(int fd, short events, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = events };
	int n;

	do {
		n = poll(&p, 1, timeout_ms);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n == 0 ? -ETIMEDOUT : 0;
}

static int io_full(int fd, uint8_t *buf, size_t len, bool wr, int timeout_ms)
{
	size_t off = 0;

	while (off < len) {
		ssize_t n;
		int err = wait_fd(fd, wr ? POLLOUT : POLLIN, timeout_ms);

		if (err)
			return err;
		n = wr ? send(fd, buf + off, len - off, MSG_NOSIGNAL) : read(fd, buf + off, len - off);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ECONNRESET;
		off += n;
	}
	return 0;
}

int ag_ctl_write_frame(int fd, const uint8_t *buf, size_t len, int timeout_ms)
{
	uint8_t hdr[4] = { len >> 24, len >> 16, len >> 8, len };
	int err;

	if (len > AG_CTL_MAX_FRAME)
		return -EMSGSIZE;
	err = io_full(fd, hdr, 4, true, timeout_ms);
	return err ? err : io_full(fd, (uint8_t *)buf, len, true, timeout_ms);
}

int ag_ctl_read_frame(int fd, uint8_t **bufp, size_t *lenp, int timeout_ms)
{
	uint8_t hdr[4], *buf;
	size_t len;
	int err;

	err = io_full(fd, hdr, 4, false, timeout_ms);
	if (err)
		return err;
	len = (size_t)hdr[0] << 24 | hdr[1] << 16 | hdr[2] << 8 | hdr[3];
	if (len > AG_CTL_MAX_FRAME)
		return -EMSGSIZE;
	buf = malloc(len ? len : 1);
	if (!buf)
		return -ENOMEM;
	err = io_full(fd, buf, len, false, timeout_ms);
	if (err) {
		free(buf);
		return err;
	}
	*bufp = buf;
	*lenp = len;
	return 0;
}

ag_ctl_response *ag_ctl_call(const char *path, const ag_ctl_request *req, int timeout_ms,
			     char *err, size_t errlen)
{
	ag_ctl_response *resp = NULL;
	uint8_t *out = NULL, *in = NULL;
	size_t len, inlen;
	int fd, rc;

	if (!timeout_ms)
		timeout_ms = 30000;
	fd = ag_ctl_connect(path);
	if (fd < 0) {
		if (fd == -ENOENT || fd == -ECONNREFUSED)
			snprintf(err, errlen, "agentgated is not running (no daemon on %s)", path);
		else if (fd == -EACCES || fd == -EPERM)
			snprintf(err, errlen, "%s: permission denied (no access to the control socket)",
				 path);
		else
			snprintf(err, errlen, "%s: %s", path, strerror(-fd));
		return NULL;
	}
	len = agentgate__ctl__request__get_packed_size(req);
	out = malloc(len ? len : 1);
	if (!out) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	agentgate__ctl__request__pack(req, out);
	rc = ag_ctl_write_frame(fd, out, len, timeout_ms);
	if (!rc)
		rc = ag_ctl_read_frame(fd, &in, &inlen, timeout_ms);
	if (rc) {
		snprintf(err, errlen, "talking to agentgated on %s: %s", path,
			 rc == -ECONNRESET ? "connection closed by the daemon" : strerror(-rc));
		goto out;
	}
	resp = agentgate__ctl__response__unpack(NULL, inlen, in);
	if (!resp)
		snprintf(err, errlen, "agentgated sent a malformed response");
out:
	free(out);
	free(in);
	close(fd);
	return resp;
}

ag_ctl_response *ag_ctl_call_simple(const char *path, Agentgate__Ctl__Request__CmdCase cmd,
				    int timeout_ms, char *err, size_t errlen)
{
	Agentgate__Ctl__Empty empty = AGENTGATE__CTL__EMPTY__INIT;
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;

	req.cmd_case = cmd;
	switch (cmd) {
	case AGENTGATE__CTL__REQUEST__CMD_STATUS:
		req.status = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_SESSION_LIST:
		req.session_list = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CGROUP_LIST:
		req.cgroup_list = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_POLICY_SHOW:
		req.policy_show = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_POLICY_RELOAD:
		req.policy_reload = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_PROG_DETACH:
		req.prog_detach = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CA_SHOW:
		req.ca_show = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_CRED_LIST:
		req.cred_list = &empty;
		break;
	case AGENTGATE__CTL__REQUEST__CMD_AUDIT_STATUS:
		req.audit_status = &empty;
		break;
	default:
		/* Requests with an argument are built by their callers. */
		req.cmd_case = AGENTGATE__CTL__REQUEST__CMD__NOT_SET;
		break;
	}
	return ag_ctl_call(path, &req, timeout_ms, err, errlen);
}

ag_ctl_response *ag_ctl_call_tag(const char *path, const char *cgroup, const char *agent,
				 int timeout_ms, char *err, size_t errlen)
{
	Agentgate__Ctl__CgroupTag tag = AGENTGATE__CTL__CGROUP_TAG__INIT;
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;

	if (agent) {
		tag.path = (char *)cgroup;
		tag.agent = (char *)agent;
		req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_CGROUP_TAG;
		req.cgroup_tag = &tag;
	} else {
		req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_CGROUP_UNTAG;
		req.cgroup_untag = (char *)cgroup;
	}
	return ag_ctl_call(path, &req, timeout_ms, err, errlen);
}

void ag_ctl_response_free(ag_ctl_response *resp)
{
	if (resp)
		agentgate__ctl__response__free_unpacked(resp, NULL);
}
