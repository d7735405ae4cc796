// SPDX-License-Identifier: GPL-2.0
/*
 * <state>/sessions.log: one JSON object per line for each session start, end and refusal, with
 * the caller's kernel identity, the target and the byte counts. Each line is one write() on an
 * O_APPEND fd, so lines from several workers never interleave. (The tamper-evident audit log
 * is a separate module; this is the plain operational record.)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon.h"
#include "jsonw.h"
#include "log.h"
#include "session.h"

int ag_slog_open(struct ag_daemon *d, char *err, size_t errlen)
{
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/sessions.log", d->opts.state_dir);
	d->slog_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (d->slog_fd < 0) {
		snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		return -errno;
	}
	return 0;
}

void ag_slog_close(struct ag_daemon *d)
{
	if (d->slog_fd >= 0)
		close(d->slog_fd);
	d->slog_fd = -1;
}

void ag_slog_session(struct ag_daemon *d, const char *event, const struct ag_session *s)
{
	char *buf = NULL;
	size_t len = 0;
	struct jsonw *w;
	FILE *f;

	if (d->slog_fd < 0)
		return;
	f = open_memstream(&buf, &len);
	if (!f)
		return;
	w = jsonw_new(f, false);
	if (!w) {
		fclose(f);
		free(buf);
		return;
	}
	jsonw_start_object(w);
	jsonw_string_field(w, "event", event);
	jsonw_time_field(w, "time", event[0] == 's' ? s->started_ns : s->ended_ns);
	jsonw_uint_field(w, "id", s->id);
	jsonw_string_field(w, "agent", s->agent);
	jsonw_string_field(w, "cgroup", s->cgroup);
	jsonw_uint_field(w, "cgroup_id", s->info.cgroup_id);
	jsonw_uint_field(w, "pid", s->info.tgid);
	jsonw_uint_field(w, "tid", s->info.tid);
	jsonw_string_field(w, "comm", s->info.comm);
	jsonw_uint_field(w, "uid", s->info.uid);
	jsonw_uint_field(w, "gid", s->info.gid);
	jsonw_string_field(w, "target", s->target_name);
	jsonw_string_field(w, "protocol", s->protocol);
	jsonw_string_field(w, "orig_dst", s->orig_dst);
	jsonw_string_field(w, "state", ag_session_state_name(s->state));
	jsonw_time_field(w, "started_at", s->started_ns);
	if (strcmp(event, "start")) {
		jsonw_time_field(w, "ended_at", s->ended_ns);
		jsonw_uint_field(w, "duration_ms",
				 s->ended_ns > s->started_ns ?
					 (s->ended_ns - s->started_ns) / 1000000 : 0);
		jsonw_uint_field(w, "bytes_up", s->bytes_up);
		jsonw_uint_field(w, "bytes_down", s->bytes_down);
		jsonw_string_field(w, "reason", s->reason);
	}
	jsonw_end_object(w);
	jsonw_destroy(&w); /* adds the newline */
	fclose(f);
	if (buf && write(d->slog_fd, buf, len) != (ssize_t)len)
		pr_warn("sessions.log: %s", strerror(errno));
	free(buf);
}

/* A connect refused in the kernel (no gateway listening, a non-TCP stream socket, ...). */
void ag_slog_kernel_deny(struct ag_daemon *d, const struct ag_event *ev, const char *reason,
			 int64_t when_ns, const char *orig_dst)
{
	char *buf = NULL;
	size_t len = 0;
	struct jsonw *w;
	FILE *f;

	if (d->slog_fd < 0)
		return;
	f = open_memstream(&buf, &len);
	if (!f)
		return;
	w = jsonw_new(f, false);
	if (w) {
		jsonw_start_object(w);
		jsonw_string_field(w, "event", "deny");
		jsonw_time_field(w, "time", when_ns);
		jsonw_string_field(w, "by", "kernel");
		jsonw_uint_field(w, "cgroup_id", ev->info.cgroup_id);
		jsonw_uint_field(w, "pid", ev->info.tgid);
		jsonw_uint_field(w, "tid", ev->info.tid);
		jsonw_string_field(w, "comm", ev->info.comm);
		jsonw_uint_field(w, "uid", ev->info.uid);
		jsonw_uint_field(w, "gid", ev->info.gid);
		jsonw_string_field(w, "orig_dst", orig_dst);
		jsonw_string_field(w, "state", "denied");
		jsonw_string_field(w, "reason", reason);
		jsonw_end_object(w);
		jsonw_destroy(&w);
	}
	fclose(f);
	if (buf && write(d->slog_fd, buf, len) != (ssize_t)len)
		pr_warn("sessions.log: %s", strerror(errno));
	free(buf);
}
