/* SPDX-License-Identifier: GPL-2.0 */
/*
 * One logger for the daemon and its libraries: levels, a prefix per line, stderr or a file.
 * libbpf's own messages are routed here (ag_log_libbpf) so they obey --log-level.
 */
#pragma once

#include <stdarg.h>

enum ag_log_level { AG_LOG_ERROR = 0, AG_LOG_WARN, AG_LOG_INFO, AG_LOG_DEBUG };

void ag_log_set_level(enum ag_log_level level);
enum ag_log_level ag_log_get_level(void);
/* Parses "error|warn|info|debug"; returns 0 or -EINVAL. */
int ag_log_parse_level(const char *s, enum ag_log_level *level);
void ag_log(enum ag_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Routes libbpf's print callback through ag_log (warnings as warn, debug as debug). */
void ag_log_libbpf(void);

#define pr_err(...)   ag_log(AG_LOG_ERROR, __VA_ARGS__)
#define pr_warn(...)  ag_log(AG_LOG_WARN, __VA_ARGS__)
#define pr_info(...)  ag_log(AG_LOG_INFO, __VA_ARGS__)
#define pr_debug(...) ag_log(AG_LOG_DEBUG, __VA_ARGS__)
