/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The control protocol's framing (ctl.proto): a 4-byte big-endian length, then a protobuf-c
 * message. The client side is blocking (agctl); the daemon side is in the daemon's event loop.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ctl.pb-c.h"

#define AG_DEFAULT_SOCKET "/run/agentgate/agentgate.sock"
#define AG_CTL_MAX_FRAME (16u << 20)

typedef Agentgate__Ctl__Request ag_ctl_request;
typedef Agentgate__Ctl__Response ag_ctl_response;

/* Connects to the daemon's control socket; returns an fd or -errno. */
int ag_ctl_connect(const char *path);
/*
 * Sends req and waits for the response (timeout_ms, 0 = 30 s). On failure returns NULL and a
 * one-line reason in err ("agentgated is not running (no socket at PATH)", ...). A response
 * whose error field is set is returned as is: the caller reports it.
 */
ag_ctl_response *ag_ctl_call(const char *path, const ag_ctl_request *req, int timeout_ms,
			     char *err, size_t errlen);
/* ag_ctl_call() of a request that carries no argument (status, session_list, ...). */
ag_ctl_response *ag_ctl_call_simple(const char *path, Agentgate__Ctl__Request__CmdCase cmd,
				    int timeout_ms, char *err, size_t errlen);
/* ag_ctl_call() of cgroup tag CGROUP agent AGENT, or of cgroup untag CGROUP (agent NULL). */
ag_ctl_response *ag_ctl_call_tag(const char *path, const char *cgroup, const char *agent,
				 int timeout_ms, char *err, size_t errlen);
void ag_ctl_response_free(ag_ctl_response *resp);

/* Blocking helpers for one frame on fd: 0 or -errno (-EMSGSIZE over AG_CTL_MAX_FRAME). */
int ag_ctl_write_frame(int fd, const uint8_t *buf, size_t len, int timeout_ms);
int ag_ctl_read_frame(int fd, uint8_t **buf, size_t *len, int timeout_ms);
