// SPDX-License-Identifier: GPL-2.0
/* The logger: one line per call, "agentgated: <level>: <message>", to stderr. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <bpf/libbpf.h>

#include "log.h"

static enum ag_log_level cur_level = AG_LOG_INFO;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = { "error", "warn", "info", "debug" };

void ag_log_set_level(enum ag_log_level level)
{
	cur_level = level;
}

enum ag_log_level ag_log_get_level(void)
{
	return cur_level;
}

int ag_log_parse_level(const char *s, enum ag_log_level *level)
{
	for (unsigned int i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
		if (!strcmp(s, level_names[i])) {
			*level = i;
			return 0;
		}
	}
	return -EINVAL;
}

static void ag_vlog(enum ag_log_level level, const char *fmt, va_list ap)
{
	char buf[2048];
	size_t n;

	if (level > cur_level)
		return;
	vsnprintf(buf, sizeof(buf), fmt, ap);
	n = strlen(buf);
	while (n && buf[n - 1] == '\n')
		buf[--n] = '\0';
	pthread_mutex_lock(&log_lock);
	fprintf(stderr, "agentgated: %s: %s\n", level_names[level], buf);
	pthread_mutex_unlock(&log_lock);
}

void ag_log(enum ag_log_level level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	ag_vlog(level, fmt, ap);
	va_end(ap);
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	static int libbpf_debug = -1;
	enum ag_log_level l = level == LIBBPF_WARN ? AG_LOG_WARN : AG_LOG_DEBUG;

	/* libbpf's debug output (relocations, BTF) is only wanted when asked for by name. */
	if (libbpf_debug < 0)
		libbpf_debug = getenv("AGENTGATE_LIBBPF_DEBUG") != NULL;
	if (level != LIBBPF_WARN && !libbpf_debug)
		return 0;
	ag_vlog(l, fmt, ap);
	return 0;
}

void ag_log_libbpf(void)
{
	libbpf_set_print(libbpf_print);
}
