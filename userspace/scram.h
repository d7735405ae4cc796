/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The client side of PostgreSQL password authentication, for the gateway's own upstream login
 * with a minted or static credential: SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel
 * binding (gs2 header "n,,"), the md5 method's answer, and nothing else (cleartext needs no
 * computing). Built on OpenSSL (PBKDF2-HMAC, HMAC, SHA-256, RAND_bytes).
 *
 * SASLprep (RFC 4013) is not applied: a password is used as its bytes. That is exact for ASCII
 * passwords without control characters — every password the gateway mints, and what a secret
 * file should hold — and it is what PostgreSQL itself falls back to for a password that is not
 * valid UTF-8. A non-ASCII static password that SASLprep would change does not log in.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Iteration counts above this are refused (a hostile server could make the gateway spin). */
#define AG_SCRAM_MAX_ITERATIONS 100000

/*
 * A password's SaltedPassword for one salt and iteration count, computed beforehand (off the
 * event loop: PBKDF2 is the expensive step). The gateway does this for the roles it mints, whose
 * verifier it writes itself.
 */
struct ag_scram_salted {
	char salt[32]; /* base64, as the server will send it */
	unsigned int iterations;
	uint8_t salted[32];
};

struct ag_scram {
	char nonce[64];		 /* client nonce, printable */
	char first_bare[160];	 /* client-first-message-bare */
	char *server_first;	 /* as received */
	uint8_t server_key[32];	 /* to check the server's signature */
	char auth_message[1024]; /* client-first-bare,server-first,client-final-without-proof */
	int step;		 /* 0 new, 1 first sent, 2 final sent, 3 server verified */
	struct ag_scram_salted pre; /* used when the server's salt and count match */
	bool have_pre;
	bool used_pre;
};

/* Salts and stretches password (16 random bytes of salt when salt is NULL). 0 or -errno. */
int ag_scram_salt_password(const char *password, const uint8_t *salt, size_t saltlen,
			   unsigned int iterations, struct ag_scram_salted *out);
/*
 * The verifier PostgreSQL keeps for it (pg_authid.rolpassword), what CREATE ROLE ... PASSWORD
 * accepts in place of the password: "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>".
 */
int ag_scram_verifier(const struct ag_scram_salted *k, char *out, size_t outlen);
/* After ag_scram_client_first(): use k instead of PBKDF2 if the server's salt and count match. */
void ag_scram_use_salted(struct ag_scram *sc, const struct ag_scram_salted *k);

/*
 * client-first-message into out ("n,,n=<user>,r=<nonce>"; PostgreSQL sends an empty user,
 * the startup packet names it). nonce NULL: 18 random bytes, base64. Returns its length or
 * -errno (-ENOSPC: out too small).
 */
int ag_scram_client_first(struct ag_scram *sc, const char *user, const char *nonce, char *out,
			  size_t outlen);
/*
 * From the server-first-message, the client-final-message into out. -EBADMSG: malformed, a
 * nonce that does not extend ours, or an iteration count out of range. Returns its length.
 */
int ag_scram_client_final(struct ag_scram *sc, const char *password, const char *server_first,
			  size_t len, char *out, size_t outlen);
/*
 * Checks the server-final-message: 0 when its signature proves the server knew the password's
 * verifier; -EACCES for a wrong signature, -EBADMSG for an error ("e=...") or garbage.
 */
int ag_scram_verify_server(struct ag_scram *sc, const char *server_final, size_t len);
void ag_scram_free(struct ag_scram *sc);

/* The md5 method's answer: "md5" + hex(md5(hex(md5(password + user)) + salt)), NUL-terminated. */
int ag_pg_md5_answer(const char *user, const char *password, const uint8_t salt[4], char out[36]);

/* Base64 (standard alphabet, padded) of n bytes into out; its length or -ENOSPC. */
int ag_b64_encode(const uint8_t *in, size_t n, char *out, size_t outlen);
/* Decodes padded base64; the number of bytes, or -EBADMSG / -ENOSPC. */
int ag_b64_decode(const char *in, size_t n, uint8_t *out, size_t outlen);
