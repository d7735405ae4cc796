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
#include <time.h>
#include <unistd.h>

#include "clock.h"
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

/* One line being written: a JSON object built in memory, then one write(). */
struct slog_line {
	char *buf;
	size_t len;
	FILE *f;
	struct jsonw *w;
};

/* Starts an object; NULL (nothing to do) without a log or memory. */
static struct jsonw *line_begin(struct ag_daemon *d, struct slog_line *l)
{
	memset(l, 0, sizeof(*l));
	if (d->slog_fd < 0)
		return NULL;
	l->f = open_memstream(&l->buf, &l->len);
	if (!l->f)
		return NULL;
	l->w = jsonw_new(l->f, false);
	if (!l->w) {
		fclose(l->f);
		free(l->buf);
		return NULL;
	}
	jsonw_start_object(l->w);
	return l->w;
}

static void line_end(struct ag_daemon *d, struct slog_line *l)
{
	jsonw_end_object(l->w);
	jsonw_destroy(&l->w); /* adds the newline */
	fclose(l->f);
	if (l->buf && write(d->slog_fd, l->buf, l->len) != (ssize_t)l->len)
		pr_warn("sessions.log: %s", strerror(errno));
	free(l->buf);
}

/* Who connected, as the kernel saw it. */
static void caller_fields(struct jsonw *w, const struct ag_conn_info *info)
{
	jsonw_uint_field(w, "cgroup_id", info->cgroup_id);
	jsonw_uint_field(w, "pid", info->tgid);
	jsonw_uint_field(w, "tid", info->tid);
	jsonw_string_field(w, "comm", info->comm);
	jsonw_uint_field(w, "uid", info->uid);
	jsonw_uint_field(w, "gid", info->gid);
}

void ag_slog_session(struct ag_daemon *d, const char *event, const struct ag_session *s)
{
	struct slog_line l;
	struct jsonw *w = line_begin(d, &l);

	if (!w)
		return;
	jsonw_string_field(w, "event", event);
	jsonw_time_field(w, "time", event[0] == 's' ? s->started_ns : s->ended_ns);
	jsonw_uint_field(w, "id", s->id);
	jsonw_string_field(w, "agent", s->agent);
	jsonw_string_field(w, "cgroup", s->cgroup);
	caller_fields(w, &s->info);
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
	line_end(d, &l);
}

void ag_slog_note(struct ag_daemon *d, const struct ag_session *s, const char *what,
		  const char *detail)
{
	struct slog_line l;
	struct jsonw *w = line_begin(d, &l);

	if (!w)
		return;
	jsonw_string_field(w, "event", "note");
	jsonw_time_field(w, "time", ag_unix_ns());
	jsonw_uint_field(w, "id", s->id);
	jsonw_string_field(w, "agent", s->agent);
	jsonw_string_field(w, "target", s->target_name);
	jsonw_string_field(w, "what", what);
	jsonw_string_field(w, "detail", detail);
	line_end(d, &l);
}

/* A connect refused in the kernel (no gateway listening, a non-TCP stream socket, ...). */
void ag_slog_kernel_deny(struct ag_daemon *d, const struct ag_event *ev, const char *reason,
			 int64_t when_ns, const char *orig_dst)
{
	struct slog_line l;
	struct jsonw *w = line_begin(d, &l);

	if (!w)
		return;
	jsonw_string_field(w, "event", "deny");
	jsonw_time_field(w, "time", when_ns);
	jsonw_string_field(w, "by", "kernel");
	caller_fields(w, &ev->info);
	jsonw_string_field(w, "orig_dst", orig_dst);
	jsonw_string_field(w, "state", "denied");
	jsonw_string_field(w, "reason", reason);
	line_end(d, &l);
}
