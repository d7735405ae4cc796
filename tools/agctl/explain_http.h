/* SPDX-License-Identifier: GPL-2.0 */
#pragma once

#include "policy.h"

/* agctl policy explain ... --http "METHOD PATH [Name: value; ...]": 0 or -1 (error printed). */
int agctl_explain_http(const struct ag_policy *p, const char *agent,
		       const struct ag_policy_target *t, enum ag_agent_mode mode, const char *http);
