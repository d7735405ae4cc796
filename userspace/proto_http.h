/* SPDX-License-Identifier: GPL-2.0 */
/* protocol: http (and Kubernetes API semantics for kubernetes: true targets). */
#pragma once

#include "proto.h"

extern const struct ag_proto_ops ag_proto_http;
