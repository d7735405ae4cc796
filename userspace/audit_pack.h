/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The audit records a statement makes (Statement, Result), serialized without protobuf-c's
 * reflective packer: the same bytes agentgate__audit__record__pack() writes (fields in number
 * order, proto3 zero values left out as protobuf-c leaves them out), in a fraction of its
 * instructions. Every other record kind goes through protobuf-c. See audit_pack.c.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "audit.pb-c.h"

/* The serialized size of r. */
size_t ag_audit_record_size(const Agentgate__Audit__Record *r);
/* Serializes r into out (ag_audit_record_size(r) bytes); returns the bytes written. */
size_t ag_audit_record_pack(const Agentgate__Audit__Record *r, uint8_t *out);
