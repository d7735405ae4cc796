/* SPDX-License-Identifier: GPL-2.0 */
/*
 * TLS with OpenSSL 3: the gateway's local CA, leaf certificates minted per (SNI, destination IP)
 * for the agent side, and verified client contexts per target for the upstream side. The
 * session layer (session.c) drives the handshakes non-blocking; this file only builds SSL
 * objects and certificates. Everything here is thread-safe (workers share the caches).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include <openssl/ssl.h>

#include "policy.h"

/* What a target's tls.upstream asks of the upstream leg. */
enum ag_tls_upstream {
	AG_TLS_UP_NONE = 0,    /* no tls: block, or upstream: disable|off */
	AG_TLS_UP_VERIFY_FULL, /* chain and name (the default when tls: is present) */
	AG_TLS_UP_VERIFY_CA,   /* chain only */
	AG_TLS_UP_REQUIRE,     /* encrypted, not verified (explicitly asked for) */
};

/*
 * Loads the CA from ca_cert/ca_key when both are given, else from <state_dir>/ca/, creating it
 * there at first start (ca/ 0700, ca.key 0600, ca.crt 0644). 0 or -errno with err set.
 */
int ag_tls_init(const char *state_dir, const char *ca_cert, const char *ca_key, char *err,
		size_t errlen);
void ag_tls_fini(void);
bool ag_tls_ready(void);

/* The CA certificate: PEM text (owned by tls.c), subject, notAfter (RFC 3339), SHA-256 hex. */
const char *ag_tls_ca_pem(void);
int ag_tls_ca_info(char *subject, size_t slen, char *not_after, size_t nlen, char *sha256,
		   size_t hlen);

/* tls.client: terminate on the target. */
bool ag_tls_client_terminates(const struct ag_policy_target *t);
enum ag_tls_upstream ag_tls_upstream_mode(const struct ag_policy_target *t);

/*
 * A server-side SSL for an agent connection: its leaf is minted in the handshake for the SNI
 * the client sends and orig_ip (the original destination, text form), both as SANs.
 */
SSL *ag_tls_server_new(const char *orig_ip, char *err, size_t errlen);
/*
 * A client-side SSL for the upstream of target t: verification per tls.upstream against the
 * system store or tls.ca_file, the target's host as SNI and as the name (or IP) checked, client
 * certificate from tls.cert_file/key_file, ALPN http/1.1 when alpn_http. NULL with err set.
 */
SSL *ag_tls_client_new(const struct ag_policy_target *t, bool alpn_http, char *err, size_t errlen);

/*
 * Why a handshake failed, for the session's reason and the agent: the verification result
 * when there is one ("certificate verify failed: hostname mismatch"), else OpenSSL's queue.
 * Clears the queue.
 */
void ag_tls_failure(SSL *ssl, char *out, size_t len);
