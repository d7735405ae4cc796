// SPDX-License-Identifier: GPL-2.0
/*
 * The gateway's upstream PostgreSQL login (pg_login.h): a startup packet of its own and answers
 * to AuthenticationCleartextPassword, AuthenticationMD5Password and the SASL exchange
 * (AuthenticationSASL, SASLContinue, SASLFinal) for SCRAM-SHA-256 without channel binding.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>

#include "pg_login.h"
#include "pgwire.h"

#define AUTH_OK 0
#define AUTH_CLEARTEXT 3
#define AUTH_MD5 5
#define AUTH_SASL 10
#define AUTH_SASL_CONTINUE 11
#define AUTH_SASL_FINAL 12

void pg_login_init(struct pg_login *l, const char *user, const char *password)
{
	memset(l, 0, sizeof(*l));
	snprintf(l->user, sizeof(l->user), "%s", user);
	snprintf(l->password, sizeof(l->password), "%s", password);
}

void pg_login_use_salted(struct pg_login *l, const struct ag_scram_salted *k)
{
	l->pre = *k;
	l->have_pre = true;
}

void pg_login_fini(struct pg_login *l)
{
	ag_scram_free(&l->sc);
	OPENSSL_cleanse(l, sizeof(*l));
}

int pg_login_startup(struct ag_buf *b, const char *user, const char *database,
		     const uint8_t *pkt, size_t plen)
{
	size_t start = ag_buf_len(b);
	uint8_t hdr[8];
	struct pg_rd rd;

	pg_put32(hdr + 4, PG_PROTO_V3);
	if (ag_buf_append(b, hdr, 8) || ag_buf_append(b, "user", 5) ||
	    ag_buf_append(b, user, strlen(user) + 1) || ag_buf_append(b, "database", 9) ||
	    ag_buf_append(b, database, strlen(database) + 1))
		return -ENOMEM;
	if (pkt && plen > 8) {
		pg_rd_init(&rd, pkt + 8, plen - 8);
		for (;;) {
			size_t klen, vlen;
			const char *k = pg_rd_str(&rd, &klen), *v;

			if (rd.bad || !klen)
				break;
			v = pg_rd_str(&rd, &vlen);
			if (rd.bad)
				break;
			if (!strcmp(k, "user") || !strcmp(k, "database") ||
			    !strcmp(k, "replication") || !strncmp(k, "_pq_.", 5))
				continue;
			if (ag_buf_append(b, k, klen + 1) || ag_buf_append(b, v, vlen + 1))
				return -ENOMEM;
		}
	}
	if (ag_buf_append(b, "", 1))
		return -ENOMEM;
	pg_put32(b->data + b->start + start, (uint32_t)(ag_buf_len(b) - start));
	return 0;
}

static int failf(char *sqlstate, const char *code, char *why, size_t whylen, int err,
		 const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static int failf(char *sqlstate, const char *code, char *why, size_t whylen, int err,
		 const char *fmt, ...)
{
	va_list ap;

	snprintf(sqlstate, 6, "%s", code);
	va_start(ap, fmt);
	vsnprintf(why, whylen, fmt, ap);
	va_end(ap);
	return err;
}

static int sasl_start(struct pg_login *l, struct pg_rd *rd, struct ag_buf *reply, char *sqlstate,
		      char *why, size_t whylen)
{
	char first[256];
	struct pg_wr w;
	bool found = false;
	int n;

	for (;;) {
		size_t mlen;
		const char *mech = pg_rd_str(rd, &mlen);

		if (rd->bad || !mlen)
			break;
		if (!strcmp(mech, "SCRAM-SHA-256"))
			found = true;
	}
	if (rd->bad)
		return failf(sqlstate, "08P01", why, whylen, -EPROTO,
			     "malformed AuthenticationSASL from the server");
	if (!found)
		return failf(sqlstate, "28000", why, whylen, -EPROTONOSUPPORT,
			     "the server offers no SASL mechanism the gateway speaks "
			     "(SCRAM-SHA-256)");
	l->method = "SCRAM-SHA-256";
	n = ag_scram_client_first(&l->sc, "", NULL, first, sizeof(first));
	if (n < 0)
		return failf(sqlstate, "28000", why, whylen, n, "SCRAM: %s", strerror(-n));
	if (l->have_pre)
		ag_scram_use_salted(&l->sc, &l->pre);
	pg_wr_begin(&w, reply, PG_F_PASSWORD);
	pg_wr_str(&w, "SCRAM-SHA-256");
	pg_wr_u32(&w, (uint32_t)n);
	pg_wr_bytes(&w, first, n);
	l->sasl_step = 1;
	return pg_wr_end(&w) ? -ENOMEM : PG_LOGIN_CONTINUE;
}

static int auth_request(struct pg_login *l, const uint8_t *body, size_t blen, struct ag_buf *reply,
			char *sqlstate, char *why, size_t whylen)
{
	struct pg_rd rd;
	struct pg_wr w;
	uint32_t code;
	char buf[512];
	int n;

	pg_rd_init(&rd, body, blen);
	code = pg_rd_u32(&rd);
	if (rd.bad)
		return failf(sqlstate, "08P01", why, whylen, -EPROTO,
			     "malformed authentication request from the server");
	switch (code) {
	case AUTH_OK:
		/*
		 * A role the gateway made with a SCRAM verifier logs in with SCRAM only, proven both
		 * ways: a server that lets it in without asking, or asks for the password in clear or
		 * as md5, is not the server that holds the verifier (libpq's
		 * require_auth=scram-sha-256). Its password never leaves the gateway.
		 */
		if (l->have_pre && l->sasl_step != 3)
			return failf(sqlstate, "28000", why, whylen, -EACCES,
				     "the server let the minted role in without SCRAM: refused");
		if (l->sasl_step && l->sasl_step != 3)
			return failf(sqlstate, "28000", why, whylen, -EACCES,
				     "the server ended SCRAM authentication without proving "
				     "it knows the password");
		return PG_LOGIN_OK;
	case AUTH_CLEARTEXT:
		if (l->have_pre)
			return failf(sqlstate, "28000", why, whylen, -EACCES,
				     "the server asked for the minted role's password in clear: "
				     "refused (SCRAM-SHA-256 only)");
		l->method = "password";
		pg_wr_begin(&w, reply, PG_F_PASSWORD);
		pg_wr_str(&w, l->password);
		return pg_wr_end(&w) ? -ENOMEM : PG_LOGIN_CONTINUE;
	case AUTH_MD5: {
		const uint8_t *salt = pg_rd_bytes(&rd, 4);
		char ans[36];

		if (l->have_pre)
			return failf(sqlstate, "28000", why, whylen, -EACCES,
				     "the server asked for the minted role's password as md5: "
				     "refused (SCRAM-SHA-256 only)");
		if (!salt)
			return failf(sqlstate, "08P01", why, whylen, -EPROTO,
				     "malformed AuthenticationMD5Password from the server");
		l->method = "md5";
		if (ag_pg_md5_answer(l->user, l->password, salt, ans))
			return -ENOMEM;
		pg_wr_begin(&w, reply, PG_F_PASSWORD);
		pg_wr_str(&w, ans);
		OPENSSL_cleanse(ans, sizeof(ans));
		return pg_wr_end(&w) ? -ENOMEM : PG_LOGIN_CONTINUE;
	}
	case AUTH_SASL:
		if (l->sasl_step)
			break;
		return sasl_start(l, &rd, reply, sqlstate, why, whylen);
	case AUTH_SASL_CONTINUE:
		if (l->sasl_step != 1)
			break;
		n = ag_scram_client_final(&l->sc, l->password, (const char *)rd.p, pg_rd_left(&rd),
					  buf, sizeof(buf));
		if (n < 0)
			return failf(sqlstate, "28000", why, whylen, n,
				     "SCRAM: the server's first message is not acceptable");
		pg_wr_begin(&w, reply, PG_F_PASSWORD);
		pg_wr_bytes(&w, buf, n);
		OPENSSL_cleanse(buf, sizeof(buf));
		l->sasl_step = 2;
		if (l->sc.used_pre)
			l->method = "SCRAM-SHA-256, keys stretched off the loop";
		return pg_wr_end(&w) ? -ENOMEM : PG_LOGIN_CONTINUE;
	case AUTH_SASL_FINAL:
		if (l->sasl_step != 2)
			break;
		n = ag_scram_verify_server(&l->sc, (const char *)rd.p, pg_rd_left(&rd));
		if (n)
			return failf(sqlstate, "28000", why, whylen, -EACCES,
				     "SCRAM: the server's signature is wrong (it does not know "
				     "the role's password)");
		l->sasl_step = 3;
		return PG_LOGIN_CONTINUE;
	default:
		return failf(sqlstate, "28000", why, whylen, -EPROTONOSUPPORT,
			     "the server asks for authentication method %u, which the gateway "
			     "does not speak (SCRAM-SHA-256, md5 and password do)",
			     code);
	}
	return failf(sqlstate, "08P01", why, whylen, -EPROTO,
		     "authentication request %u from the server out of order", code);
}

int pg_login_server_msg(struct pg_login *l, const uint8_t *m, size_t total, struct ag_buf *reply,
			char *sqlstate, char *why, size_t whylen)
{
	const uint8_t *body = m + PG_HDR;
	size_t blen = total - PG_HDR;

	switch (m[0]) {
	case PG_B_AUTH:
		return auth_request(l, body, blen, reply, sqlstate, why, whylen);
	case PG_B_ERROR: {
		const char *code = pg_error_field(body, blen, 'C');
		const char *msg = pg_error_field(body, blen, 'M');

		return failf(sqlstate, code && strlen(code) == 5 ? code : "28000", why, whylen,
			     -EACCES, "upstream login as \"%s\" refused: %s", l->user,
			     msg ? msg : "no reason given");
	}
	case PG_B_NOTICE:
	case PG_B_NEGOTIATE_VERSION:
		return PG_LOGIN_PASS;
	default:
		return failf(sqlstate, "08P01", why, whylen, -EPROTO,
			     "unexpected message type 0x%02x from the server during login", m[0]);
	}
}
