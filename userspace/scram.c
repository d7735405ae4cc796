// SPDX-License-Identifier: GPL-2.0
/*
 * SCRAM-SHA-256 and md5 answers for the gateway's upstream PostgreSQL login (see scram.h). The
 * salted password and the keys derived from it live on the stack and are wiped before return;
 * only the ServerKey is kept until the server's signature is checked.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "scram.h"

int ag_b64_encode(const uint8_t *in, size_t n, char *out, size_t outlen)
{
	size_t need = 4 * ((n + 2) / 3) + 1;

	if (outlen < need)
		return -ENOSPC;
	return EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

int ag_b64_decode(const char *in, size_t n, uint8_t *out, size_t outlen)
{
	uint8_t tmp[512];
	int len, pad = 0;

	if (n % 4 || n / 4 * 3 > sizeof(tmp))
		return -EBADMSG;
	if (n && in[n - 1] == '=')
		pad++;
	if (n > 1 && in[n - 2] == '=')
		pad++;
	len = EVP_DecodeBlock(tmp, (const unsigned char *)in, (int)n);
	if (len < 0)
		return -EBADMSG;
	len -= pad;
	if ((size_t)len > outlen) {
		OPENSSL_cleanse(tmp, sizeof(tmp));
		return -ENOSPC;
	}
	memcpy(out, tmp, len);
	OPENSSL_cleanse(tmp, sizeof(tmp));
	return len;
}

static int hmac256(const uint8_t *key, size_t klen, const void *msg, size_t mlen, uint8_t out[32])
{
	unsigned int olen = 32;

	return HMAC(EVP_sha256(), key, (int)klen, msg, mlen, out, &olen) ? 0 : -EIO;
}

int ag_scram_salt_password(const char *password, const uint8_t *salt, size_t saltlen,
			   unsigned int iterations, struct ag_scram_salted *out)
{
	uint8_t rnd[16];

	memset(out, 0, sizeof(*out));
	if (!salt) {
		if (RAND_bytes(rnd, sizeof(rnd)) != 1)
			return -EIO;
		salt = rnd;
		saltlen = sizeof(rnd);
	}
	if (ag_b64_encode(salt, saltlen, out->salt, sizeof(out->salt)) < 0)
		return -ENOSPC;
	out->iterations = iterations;
	if (PKCS5_PBKDF2_HMAC(password, (int)strlen(password), salt, (int)saltlen, (int)iterations,
			      EVP_sha256(), sizeof(out->salted), out->salted) != 1)
		return -EIO;
	return 0;
}

int ag_scram_verifier(const struct ag_scram_salted *k, char *out, size_t outlen)
{
	uint8_t ckey[32], stored[32], skey[32];
	char s64[64], k64[64];
	int n, rc = -EIO;

	if (hmac256(k->salted, 32, "Client Key", 10, ckey) ||
	    hmac256(k->salted, 32, "Server Key", 10, skey))
		goto out;
	SHA256(ckey, 32, stored);
	ag_b64_encode(stored, 32, s64, sizeof(s64));
	ag_b64_encode(skey, 32, k64, sizeof(k64));
	n = snprintf(out, outlen, "SCRAM-SHA-256$%u:%s$%s:%s", k->iterations, k->salt, s64, k64);
	rc = n < 0 || (size_t)n >= outlen ? -ENOSPC : n;
out:
	OPENSSL_cleanse(ckey, sizeof(ckey));
	OPENSSL_cleanse(skey, sizeof(skey));
	return rc;
}

void ag_scram_use_salted(struct ag_scram *sc, const struct ag_scram_salted *k)
{
	sc->pre = *k;
	sc->have_pre = true;
}

int ag_scram_client_first(struct ag_scram *sc, const char *user, const char *nonce, char *out,
			  size_t outlen)
{
	int n;

	memset(sc, 0, sizeof(*sc));
	if (nonce) {
		snprintf(sc->nonce, sizeof(sc->nonce), "%s", nonce);
	} else {
		uint8_t raw[18];

		if (RAND_bytes(raw, sizeof(raw)) != 1)
			return -EIO;
		ag_b64_encode(raw, sizeof(raw), sc->nonce, sizeof(sc->nonce));
	}
	/* A user name with ',' or '=' would need escaping; PostgreSQL sends none at all. */
	if (strpbrk(user, ",="))
		return -EINVAL;
	n = snprintf(sc->first_bare, sizeof(sc->first_bare), "n=%s,r=%s", user, sc->nonce);
	if (n < 0 || (size_t)n >= sizeof(sc->first_bare))
		return -ENOSPC;
	n = snprintf(out, outlen, "n,,%s", sc->first_bare);
	if (n < 0 || (size_t)n >= outlen)
		return -ENOSPC;
	sc->step = 1;
	return n;
}

/* The value of attribute `a` ("r=...") in a comma-separated SCRAM message, bounded by end. */
static const char *attr(const char *msg, const char *end, char a, size_t *vlen)
{
	const char *p = msg;

	while (p < end) {
		const char *comma = memchr(p, ',', end - p);
		const char *e = comma ? comma : end;

		if (e - p >= 2 && p[0] == a && p[1] == '=') {
			*vlen = e - p - 2;
			return p + 2;
		}
		p = e + 1;
	}
	return NULL;
}

int ag_scram_client_final(struct ag_scram *sc, const char *password, const char *server_first,
			  size_t len, char *out, size_t outlen)
{
	const char *end = server_first + len, *r, *s, *i;
	size_t rlen, slen, ilen;
	uint8_t salt[128], salted[32], ckey[32], stored[32], csig[32], proof[32];
	char without_proof[256], proof64[64], num[16];
	unsigned long iters;
	int saltlen, n, rc = -EBADMSG;

	if (sc->step != 1 || memchr(server_first, 0, len))
		return -EBADMSG;
	r = attr(server_first, end, 'r', &rlen);
	s = attr(server_first, end, 's', &slen);
	i = attr(server_first, end, 'i', &ilen);
	if (!r || !s || !i || ilen == 0 || ilen >= sizeof(num))
		return -EBADMSG;
	/* The server's nonce must extend ours, and add something. */
	if (rlen <= strlen(sc->nonce) || memcmp(r, sc->nonce, strlen(sc->nonce)))
		return -EBADMSG;
	memcpy(num, i, ilen);
	num[ilen] = '\0';
	if (strspn(num, "0123456789") != ilen)
		return -EBADMSG;
	iters = strtoul(num, NULL, 10);
	if (iters < 1 || iters > AG_SCRAM_MAX_ITERATIONS)
		return -EBADMSG;
	saltlen = ag_b64_decode(s, slen, salt, sizeof(salt));
	if (saltlen <= 0)
		return -EBADMSG;
	free(sc->server_first);
	sc->server_first = strndup(server_first, len);
	if (!sc->server_first)
		return -ENOMEM;

	/* "c=biws" is base64 of the gs2 header "n,,". */
	n = snprintf(without_proof, sizeof(without_proof), "c=biws,r=%.*s", (int)rlen, r);
	if (n < 0 || (size_t)n >= sizeof(without_proof))
		return -EBADMSG;
	n = snprintf(sc->auth_message, sizeof(sc->auth_message), "%s,%s,%s", sc->first_bare,
		     sc->server_first, without_proof);
	if (n < 0 || (size_t)n >= sizeof(sc->auth_message))
		return -EBADMSG;

	rc = -EIO;
	if (sc->have_pre && sc->pre.iterations == iters && strlen(sc->pre.salt) == slen &&
	    !memcmp(sc->pre.salt, s, slen)) {
		memcpy(salted, sc->pre.salted, sizeof(salted));
		sc->used_pre = true;
	} else if (PKCS5_PBKDF2_HMAC(password, (int)strlen(password), salt, saltlen, (int)iters,
				     EVP_sha256(), sizeof(salted), salted) != 1) {
		goto out;
	}
	if (hmac256(salted, 32, "Client Key", 10, ckey) ||
	    hmac256(salted, 32, "Server Key", 10, sc->server_key))
		goto out;
	SHA256(ckey, 32, stored);
	if (hmac256(stored, 32, sc->auth_message, strlen(sc->auth_message), csig))
		goto out;
	for (int k = 0; k < 32; k++)
		proof[k] = ckey[k] ^ csig[k];
	ag_b64_encode(proof, 32, proof64, sizeof(proof64));
	n = snprintf(out, outlen, "%s,p=%s", without_proof, proof64);
	if (n < 0 || (size_t)n >= outlen) {
		rc = -ENOSPC;
		goto out;
	}
	sc->step = 2;
	rc = n;
out:
	OPENSSL_cleanse(salted, sizeof(salted));
	OPENSSL_cleanse(ckey, sizeof(ckey));
	OPENSSL_cleanse(stored, sizeof(stored));
	OPENSSL_cleanse(csig, sizeof(csig));
	OPENSSL_cleanse(proof, sizeof(proof));
	OPENSSL_cleanse(proof64, sizeof(proof64));
	return rc;
}

int ag_scram_verify_server(struct ag_scram *sc, const char *server_final, size_t len)
{
	const char *end = server_final + len, *v;
	uint8_t want[32], got[64];
	size_t vlen;
	int n;

	if (sc->step != 2)
		return -EBADMSG;
	if (attr(server_final, end, 'e', &vlen))
		return -EBADMSG;
	v = attr(server_final, end, 'v', &vlen);
	if (!v)
		return -EBADMSG;
	n = ag_b64_decode(v, vlen, got, sizeof(got));
	if (n != 32)
		return -EACCES;
	if (hmac256(sc->server_key, 32, sc->auth_message, strlen(sc->auth_message), want))
		return -EIO;
	if (CRYPTO_memcmp(want, got, 32))
		return -EACCES;
	sc->step = 3;
	return 0;
}

void ag_scram_free(struct ag_scram *sc)
{
	if (!sc)
		return;
	free(sc->server_first);
	OPENSSL_cleanse(sc, sizeof(*sc));
}

int ag_pg_md5_answer(const char *user, const char *password, const uint8_t salt[4], char out[36])
{
	static const char hex[] = "0123456789abcdef";
	uint8_t d[16];
	char inner[33 + 4];
	size_t plen = strlen(password), ulen = strlen(user);
	unsigned char *buf = malloc(plen + ulen + 1);
	EVP_MD_CTX *ctx;
	unsigned int dl = 16;

	if (!buf)
		return -ENOMEM;
	memcpy(buf, password, plen);
	memcpy(buf + plen, user, ulen);
	ctx = EVP_MD_CTX_new();
	if (!ctx || EVP_DigestInit_ex(ctx, EVP_md5(), NULL) != 1 ||
	    EVP_DigestUpdate(ctx, buf, plen + ulen) != 1 || EVP_DigestFinal_ex(ctx, d, &dl) != 1)
		goto fail;
	for (int i = 0; i < 16; i++) {
		inner[2 * i] = hex[d[i] >> 4];
		inner[2 * i + 1] = hex[d[i] & 15];
	}
	memcpy(inner + 32, salt, 4);
	if (EVP_DigestInit_ex(ctx, EVP_md5(), NULL) != 1 || EVP_DigestUpdate(ctx, inner, 36) != 1 ||
	    EVP_DigestFinal_ex(ctx, d, &dl) != 1)
		goto fail;
	memcpy(out, "md5", 3);
	for (int i = 0; i < 16; i++) {
		out[3 + 2 * i] = hex[d[i] >> 4];
		out[3 + 2 * i + 1] = hex[d[i] & 15];
	}
	out[35] = '\0';
	EVP_MD_CTX_free(ctx);
	OPENSSL_cleanse(buf, plen + ulen);
	free(buf);
	OPENSSL_cleanse(inner, sizeof(inner));
	return 0;
fail:
	EVP_MD_CTX_free(ctx);
	OPENSSL_cleanse(buf, plen + ulen);
	free(buf);
	return -EIO;
}
