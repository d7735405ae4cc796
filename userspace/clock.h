/* SPDX-License-Identifier: GPL-2.0 */
/* The two clocks the daemon reads: monotonic milliseconds (deadlines) and unix nanoseconds. */
#pragma once

#include <stdint.h>
#include <time.h>

static inline uint64_t ag_mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000ULL + ts.tv_nsec / 1000000;
}

static inline int64_t ag_unix_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
