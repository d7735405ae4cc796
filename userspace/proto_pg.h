/* SPDX-License-Identifier: GPL-2.0 */
/* protocol: postgres (proto_pg.c): the PostgreSQL v3 handler and its one setting. */
#pragma once

#include <stddef.h>

#include "proto.h"

extern const struct ag_proto_ops ag_proto_pg;

/*
 * The largest message an agent may send (default 64 MiB; 1 KiB .. 1 GiB - 1): a longer one
 * ends its session with "message too large". Also read from AGENTGATE_PG_MAX_MESSAGE (bytes,
 * or with a k/M suffix) when the first postgres session starts.
 */
void ag_pg_set_max_message(size_t bytes);
