// SPDX-License-Identifier: GPL-2.0
/*
 * The gateway's TLS material. One local CA (ECDSA P-256, created under <state>/ca/ at first
 * start or supplied by path) signs leaf certificates minted during the agent's handshake for
 * the name it asked for (SNI) and the address it dialled (both as SANs, one hour of validity,
 * backdated against clock skew), cached per (name, IP). Upstream, one client SSL_CTX per
 * distinct tls: setting verifies the server against the system store or the target's ca_file;
 * each SSL then checks the target's host name (or IP SAN). TLS 1.2 and 1.3 only, both ways.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "keyfile.h"
#include "log.h"
#include "tls.h"

#define LEAF_VALID_S 3600
#define LEAF_BACKDATE_S 3600
/* A cached leaf is minted again this long before it expires. */
#define LEAF_RENEW_S 600
#define LEAF_CACHE_MAX 4096
#define CA_VALID_DAYS 3650

static struct {
	pthread_mutex_t lock;
	bool ready;
	X509 *ca;
	EVP_PKEY *ca_key;
	char *ca_pem;
	SSL_CTX *server;
	int ip_idx; /* SSL ex_data: the original destination IP (text) */
} g = { .lock = PTHREAD_MUTEX_INITIALIZER, .ip_idx = -1 };

/* --- errors ----------------------------------------------------------------------------------- */

static void ssl_errs(char *out, size_t len, const char *what)
{
	unsigned long e;
	size_t off;

	off = snprintf(out, len, "%s", what);
	while ((e = ERR_get_error()) && off < len) {
		char buf[160];

		ERR_error_string_n(e, buf, sizeof(buf));
		/* "error:0A000086:SSL routines::certificate verify failed": the reason only. */
		{
			const char *r = ERR_reason_error_string(e);

			off += snprintf(out + off, len - off, ": %s", r ? r : buf);
		}
		break;
	}
	ERR_clear_error();
}

void ag_tls_failure(SSL *ssl, char *out, size_t len)
{
	long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
	unsigned long e = ERR_peek_error();

	if (vr != X509_V_OK && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
		snprintf(out, len, "certificate verify failed: %s",
			 X509_verify_cert_error_string(vr));
		ERR_clear_error();
		return;
	}
	if (!e) {
		snprintf(out, len, "connection closed during the handshake");
		return;
	}
	ssl_errs(out, len, "handshake failed");
}

/* --- the CA ----------------------------------------------------------------------------------- */

static int rand_serial(X509 *x)
{
	unsigned char b[16];
	BIGNUM *bn;
	int ok;

	if (RAND_bytes(b, sizeof(b)) != 1)
		return -1;
	b[0] &= 0x7f; /* positive */
	bn = BN_bin2bn(b, sizeof(b), NULL);
	ok = bn && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));
	BN_free(bn);
	return ok ? 0 : -1;
}

static int add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509_EXTENSION *ext;
	int ok;

	X509V3_set_ctx_nodb(&ctx);
	X509V3_set_ctx(&ctx, issuer, x, NULL, NULL, 0);
	ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
	if (!ext)
		return -1;
	ok = X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	return ok ? 0 : -1;
}

static X509 *ca_create(EVP_PKEY *key)
{
	X509 *x = X509_new();
	X509_NAME *n;
	char host[64] = "localhost", cn[128];

	if (!x)
		return NULL;
	gethostname(host, sizeof(host) - 1);
	snprintf(cn, sizeof(cn), "agentgate local CA (%s)", host);
	n = X509_get_subject_name(x);
	if (!X509_set_version(x, 2) || rand_serial(x) ||
	    !X509_gmtime_adj(X509_getm_notBefore(x), -LEAF_BACKDATE_S) ||
	    !X509_gmtime_adj(X509_getm_notAfter(x), (long)CA_VALID_DAYS * 86400) ||
	    !X509_NAME_add_entry_by_txt(n, "O", MBSTRING_UTF8, (const unsigned char *)"agentgate",
					-1, -1, 0) ||
	    !X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1,
					0) ||
	    !X509_set_issuer_name(x, n) || !X509_set_pubkey(x, key) ||
	    add_ext(x, x, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") ||
	    add_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign") ||
	    add_ext(x, x, NID_subject_key_identifier, "hash") || !X509_sign(x, key, EVP_sha256())) {
		X509_free(x);
		return NULL;
	}
	return x;
}

static int write_pem(const char *path, mode_t mode, bool key, void *obj, char *err, size_t errlen)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
	FILE *f;
	int ok;

	if (fd < 0) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -errno;
	}
	fchmod(fd, mode); /* whatever the umask */
	f = fdopen(fd, "w");
	if (!f) {
		close(fd);
		return -ENOMEM;
	}
	ok = key ? PEM_write_PrivateKey(f, obj, NULL, NULL, 0, NULL, NULL) : PEM_write_X509(f, obj);
	if (fflush(f) || fsync(fileno(f)))
		ok = 0;
	fclose(f);
	if (!ok) {
		unlink(path);
		snprintf(err, errlen, "%s: cannot write", path);
		return -EIO;
	}
	return 0;
}

/* A PEM file opened by ag_keyfile_open(): the certificate, or the private key (key). */
static void *read_pem_fd(int fd, bool key)
{
	FILE *f = fdopen(fd, "re");
	void *obj;

	if (!f) {
		close(fd);
		return NULL;
	}
	obj = key ? (void *)PEM_read_PrivateKey(f, NULL, NULL, NULL)
		  : (void *)PEM_read_X509(f, NULL, NULL, NULL);
	fclose(f);
	return obj;
}

/*
 * The CA pair. The key must be root's and 0600, never read through a symbolic link; so must the
 * certificate of the CA kept in the state dir (own_crt). A supplied certificate may be a link
 * (trust stores are made of them): it is public.
 */
static int load_pair(const char *crt, const char *keyp, bool own_crt, char *err, size_t errlen)
{
	int fd;

	if (own_crt) {
		fd = ag_keyfile_open(crt, "CA certificate", false, err, errlen);
		if (fd < 0)
			return fd;
	} else if ((fd = open(crt, O_RDONLY | O_CLOEXEC)) < 0) {
		int e = errno;

		snprintf(err, errlen, "CA certificate %s: %s", crt, strerror(e));
		return -e;
	}
	g.ca = read_pem_fd(fd, false);
	fd = ag_keyfile_open(keyp, "CA key", true, err, errlen);
	if (fd < 0)
		return fd;
	g.ca_key = read_pem_fd(fd, true);
	if (!g.ca || !g.ca_key) {
		ssl_errs(err, errlen,
			 g.ca ? "CA key: not a PEM private key"
			      : "CA certificate: not a PEM certificate");
		return -EINVAL;
	}
	if (!X509_check_private_key(g.ca, g.ca_key)) {
		ERR_clear_error();
		snprintf(err, errlen, "CA key %s does not match the certificate %s", keyp, crt);
		return -EINVAL;
	}
	if (X509_check_ca(g.ca) < 1) {
		snprintf(err, errlen, "%s is not a CA certificate (basicConstraints CA:TRUE)", crt);
		return -EINVAL;
	}
	return 0;
}

static int ca_load_or_create(const char *state_dir, char *err, size_t errlen)
{
	char dir[PATH_MAX], crt[PATH_MAX + 8], key[PATH_MAX + 8];
	struct stat st;
	int rc;

	snprintf(dir, sizeof(dir), "%s/ca", state_dir);
	snprintf(crt, sizeof(crt), "%s/ca.crt", dir);
	snprintf(key, sizeof(key), "%s/ca.key", dir);
	if (mkdir(dir, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "%s: %s", dir, strerror(errno));
		return -errno;
	}
	chmod(dir, 0700);
	/* lstat: a dangling link in the key's place is refused, not replaced. */
	if (!lstat(key, &st))
		return load_pair(crt, key, true, err, errlen);
	g.ca_key = EVP_EC_gen("P-256");
	g.ca = g.ca_key ? ca_create(g.ca_key) : NULL;
	if (!g.ca) {
		ssl_errs(err, errlen, "creating the CA");
		return -EINVAL;
	}
	unlink(crt); /* a certificate without its key is of no use */
	rc = write_pem(key, 0600, true, g.ca_key, err, errlen);
	if (!rc)
		rc = write_pem(crt, 0644, false, g.ca, err, errlen);
	if (rc) {
		unlink(key);
		return rc;
	}
	pr_info("created the gateway CA in %s (install it with agctl ca show)", dir);
	return 0;
}

/* --- leaves ----------------------------------------------------------------------------------- */

struct leaf {
	struct leaf *next;
	char *key; /* "name|ip" */
	X509 *x;
	EVP_PKEY *pk;
	time_t renew_at;
};

#define LEAF_BUCKETS 1024
static struct leaf *leaves[LEAF_BUCKETS];
static size_t nleaves;

static size_t leaf_bucket(const char *k)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (; *k; k++)
		h = (h ^ (unsigned char)*k) * 0x100000001b3ULL;
	return h % LEAF_BUCKETS;
}

static void leaf_free(struct leaf *l)
{
	X509_free(l->x);
	EVP_PKEY_free(l->pk);
	free(l->key);
	free(l);
}

static void leaves_clear(void)
{
	for (size_t i = 0; i < LEAF_BUCKETS; i++) {
		while (leaves[i]) {
			struct leaf *l = leaves[i];

			leaves[i] = l->next;
			leaf_free(l);
		}
	}
	nleaves = 0;
}

/* A host name fit for a dNSName SAN (the SNI is the client's word: checked, not trusted). */
static bool dns_name_ok(const char *n)
{
	size_t len = strlen(n);

	if (!len || len > 253)
		return false;
	for (const char *p = n; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_'))
			return false;
	return true;
}

static bool is_ip(const char *s)
{
	unsigned char b[16];

	return inet_pton(AF_INET, s, b) == 1 || inet_pton(AF_INET6, s, b) == 1;
}

static struct leaf *leaf_mint(const char *name, const char *ip)
{
	struct leaf *l = calloc(1, sizeof(*l));
	char san[600], cn[256];
	X509 *x = NULL;
	X509_NAME *n;

	if (!l)
		return NULL;
	if (name && name[0] && is_ip(name))
		snprintf(san, sizeof(san), "IP:%s%s%s", name, strcmp(name, ip) ? ",IP:" : "",
			 strcmp(name, ip) ? ip : "");
	else if (name && name[0])
		snprintf(san, sizeof(san), "DNS:%s,IP:%s", name, ip);
	else
		snprintf(san, sizeof(san), "IP:%s", ip);
	snprintf(cn, sizeof(cn), "%.64s", name && name[0] ? name : ip);
	l->pk = EVP_EC_gen("P-256");
	x = X509_new();
	if (!l->pk || !x)
		goto fail;
	n = X509_get_subject_name(x);
	if (!X509_set_version(x, 2) || rand_serial(x) ||
	    !X509_gmtime_adj(X509_getm_notBefore(x), -LEAF_BACKDATE_S) ||
	    !X509_gmtime_adj(X509_getm_notAfter(x), LEAF_VALID_S) ||
	    !X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1,
					0) ||
	    !X509_set_issuer_name(x, X509_get_subject_name(g.ca)) || !X509_set_pubkey(x, l->pk) ||
	    add_ext(x, g.ca, NID_basic_constraints, "critical,CA:FALSE") ||
	    add_ext(x, g.ca, NID_key_usage, "critical,digitalSignature") ||
	    add_ext(x, g.ca, NID_ext_key_usage, "serverAuth") ||
	    add_ext(x, g.ca, NID_authority_key_identifier, "keyid:always") ||
	    add_ext(x, g.ca, NID_subject_alt_name, san) || !X509_sign(x, g.ca_key, EVP_sha256()))
		goto fail;
	l->x = x;
	l->renew_at = time(NULL) + LEAF_VALID_S - LEAF_RENEW_S;
	return l;
fail:
	X509_free(x);
	EVP_PKEY_free(l->pk);
	free(l);
	return NULL;
}

/* Puts the leaf for (name, ip) on ssl, minting it if the cache has none fresh. 0 or -1. */
static int leaf_use(SSL *ssl, const char *name, const char *ip)
{
	char k[600];
	struct leaf **pp, *l;
	time_t now = time(NULL);
	int rc = -1;

	snprintf(k, sizeof(k), "%s|%s", name ? name : "", ip);
	pthread_mutex_lock(&g.lock);
	for (pp = &leaves[leaf_bucket(k)]; (l = *pp); pp = &l->next)
		if (!strcmp(l->key, k))
			break;
	if (l && now >= l->renew_at) {
		*pp = l->next;
		leaf_free(l);
		nleaves--;
		l = NULL;
	}
	if (!l) {
		/* Minting is a key generation and a signature: tens of microseconds. */
		if (nleaves >= LEAF_CACHE_MAX)
			leaves_clear();
		l = leaf_mint(name, ip);
		if (l)
			l->key = strdup(k);
		if (l && !l->key) {
			leaf_free(l);
			l = NULL;
		}
		if (l) {
			size_t b = leaf_bucket(k);

			l->next = leaves[b];
			leaves[b] = l;
			nleaves++;
		}
	}
	if (l && SSL_use_certificate(ssl, l->x) == 1 && SSL_use_PrivateKey(ssl, l->pk) == 1 &&
	    SSL_add1_chain_cert(ssl, g.ca) == 1)
		rc = 0;
	pthread_mutex_unlock(&g.lock);
	return rc;
}

/* In the handshake, once the ClientHello is in: the leaf for its SNI and our destination. */
static int cert_cb(SSL *ssl, void *arg)
{
	const char *ip = SSL_get_ex_data(ssl, g.ip_idx);
	const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);

	(void)arg;
	if (!ip)
		return 0;
	if (sni && !dns_name_ok(sni) && !is_ip(sni)) {
		pr_info("tls: agent asked for a name unfit for a certificate: ignored");
		sni = NULL;
	}
	return leaf_use(ssl, sni, ip) ? 0 : 1;
}

/* HTTP/1.1 when the client offers it (curl offers h2 first: we relay bytes, not frames). */
static int alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
		   const unsigned char *in, unsigned int inlen, void *arg)
{
	static const unsigned char h11[] = "\x08http/1.1";

	(void)ssl;
	(void)arg;
	if (SSL_select_next_proto((unsigned char **)out, outlen, h11, sizeof(h11) - 1, in, inlen) ==
	    OPENSSL_NPN_NEGOTIATED)
		return SSL_TLSEXT_ERR_OK;
	return SSL_TLSEXT_ERR_NOACK;
}

static void ip_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
	(void)parent;
	(void)ad;
	(void)idx;
	(void)argl;
	(void)argp;
	free(ptr);
}

static SSL_CTX *ctx_new(const SSL_METHOD *m)
{
	SSL_CTX *c = SSL_CTX_new(m);

	if (!c)
		return NULL;
	SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
	SSL_CTX_set_max_proto_version(c, TLS1_3_VERSION);
	/*
	 * No renegotiation; a peer that closes without close_notify is an EOF (most HTTP clients
	 * do); partial writes from a buffer that may move between retries (our queues grow). The
	 * record buffers stay (SSL_MODE_RELEASE_BUFFERS costs a malloc/free per record).
	 */
	SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF |
				       SSL_OP_NO_COMPRESSION);
	SSL_CTX_set_mode(c, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	/*
	 * Read-ahead: a record's header and body in one read(2), not two (session.c reads on what
	 * OpenSSL holds, as the socket's epoll cannot report it).
	 */
	SSL_CTX_set_read_ahead(c, 1);
	return c;
}

int ag_tls_init(const char *state_dir, const char *ca_cert, const char *ca_key, char *err,
		size_t errlen)
{
	BIO *b;
	BUF_MEM *bm;
	int rc;

	if (g.ready)
		return 0;
	if (!!ca_cert != !!ca_key) {
		snprintf(err, errlen, "--ca-cert and --ca-key go together");
		return -EINVAL;
	}
	rc = ca_cert ? load_pair(ca_cert, ca_key, false, err, errlen)
		     : ca_load_or_create(state_dir, err, errlen);
	if (rc)
		goto fail;
	b = BIO_new(BIO_s_mem());
	if (!b || !PEM_write_bio_X509(b, g.ca)) {
		BIO_free(b);
		rc = -ENOMEM;
		goto fail;
	}
	BIO_get_mem_ptr(b, &bm);
	g.ca_pem = strndup(bm->data, bm->length);
	BIO_free(b);
	g.ip_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, ip_free);
	g.server = ctx_new(TLS_server_method());
	if (!g.ca_pem || g.ip_idx < 0 || !g.server) {
		snprintf(err, errlen, "TLS server context: out of memory");
		rc = -ENOMEM;
		goto fail;
	}
	SSL_CTX_set_cert_cb(g.server, cert_cb, NULL);
	SSL_CTX_set_alpn_select_cb(g.server, alpn_cb, NULL);
	/* Short sessions from many clients: no server-side cache to grow, tickets do resumption. */
	SSL_CTX_set_session_cache_mode(g.server, SSL_SESS_CACHE_OFF);
	g.ready = true;
	return 0;
fail:
	ag_tls_fini();
	return rc;
}

struct cctx {
	struct cctx *next;
	char *key;
	SSL_CTX *ctx;
};
static struct cctx *cctxs;

void ag_tls_fini(void)
{
	pthread_mutex_lock(&g.lock);
	leaves_clear();
	while (cctxs) {
		struct cctx *c = cctxs;

		cctxs = c->next;
		SSL_CTX_free(c->ctx);
		free(c->key);
		free(c);
	}
	SSL_CTX_free(g.server);
	X509_free(g.ca);
	EVP_PKEY_free(g.ca_key);
	free(g.ca_pem);
	g.server = NULL;
	g.ca = NULL;
	g.ca_key = NULL;
	g.ca_pem = NULL;
	g.ready = false;
	pthread_mutex_unlock(&g.lock);
}

bool ag_tls_ready(void)
{
	return g.ready;
}

const char *ag_tls_ca_pem(void)
{
	return g.ca_pem;
}

int ag_tls_ca_info(char *subject, size_t slen, char *not_after, size_t nlen, char *sha256,
		   size_t hlen)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	struct tm tm;

	if (!g.ready)
		return -ENOENT;
	X509_NAME_oneline(X509_get_subject_name(g.ca), subject, slen);
	if (ASN1_TIME_to_tm(X509_get0_notAfter(g.ca), &tm))
		strftime(not_after, nlen, "%Y-%m-%dT%H:%M:%SZ", &tm);
	else
		snprintf(not_after, nlen, "-");
	X509_digest(g.ca, EVP_sha256(), md, &mdlen);
	for (unsigned int i = 0; i < mdlen && 2 * i + 2 < hlen; i++)
		snprintf(sha256 + 2 * i, 3, "%02x", md[i]);
	return 0;
}

/* --- per target --------------------------------------------------------------------------- */

static const char *tls_get(const struct ag_policy_target *t, const char *k)
{
	const struct ag_kv *kv = ag_kv_get(t->tls, t->ntls, k);

	return kv ? kv->value : NULL;
}

bool ag_tls_client_terminates(const struct ag_policy_target *t)
{
	const char *v = t ? tls_get(t, "client") : NULL;

	return v && !strcmp(v, "terminate");
}

enum ag_tls_upstream ag_tls_upstream_mode(const struct ag_policy_target *t)
{
	const char *v;

	if (!t || !t->tls)
		return AG_TLS_UP_NONE;
	v = tls_get(t, "upstream");
	if (!v || !strcmp(v, "verify-full"))
		return AG_TLS_UP_VERIFY_FULL;
	if (!strcmp(v, "verify-ca"))
		return AG_TLS_UP_VERIFY_CA;
	if (!strcmp(v, "require"))
		return AG_TLS_UP_REQUIRE;
	return AG_TLS_UP_NONE; /* disable, off */
}

SSL *ag_tls_server_new(const char *orig_ip, char *err, size_t errlen)
{
	char *ip;
	SSL *ssl;

	if (!g.ready) {
		snprintf(err, errlen, "no gateway CA");
		return NULL;
	}
	ssl = SSL_new(g.server);
	ip = strdup(orig_ip);
	if (!ssl || !ip || !SSL_set_ex_data(ssl, g.ip_idx, ip)) {
		SSL_free(ssl);
		free(ip);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	return ssl;
}

static SSL_CTX *client_ctx(const struct ag_policy_target *t, enum ag_tls_upstream mode,
			   bool alpn_http, char *err, size_t errlen)
{
	const char *ca = tls_get(t, "ca_file"), *crt = tls_get(t, "cert_file"),
		   *key = tls_get(t, "key_file");
	char k[3 * PATH_MAX];
	struct cctx *c;
	SSL_CTX *ctx = NULL;

	snprintf(k, sizeof(k), "%d|%d|%s|%s|%s", mode, alpn_http, ca ? ca : "", crt ? crt : "",
		 key ? key : "");
	pthread_mutex_lock(&g.lock);
	for (c = cctxs; c; c = c->next)
		if (!strcmp(c->key, k)) {
			SSL_CTX_up_ref(c->ctx);
			pthread_mutex_unlock(&g.lock);
			return c->ctx;
		}
	ctx = ctx_new(TLS_client_method());
	if (!ctx) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if (mode != AG_TLS_UP_REQUIRE) {
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
		if (ca ? SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1
		       : SSL_CTX_set_default_verify_paths(ctx) != 1) {
			ssl_errs(err, errlen, ca ? "tls.ca_file" : "the system trust store");
			goto fail;
		}
	}
	if (crt) {
		/* The client key as the daemon's own keys are read (keyfile.h): root's, 0600. */
		size_t klen;
		int krc;
		char *pem = ag_keyfile_read(key ? key : crt, "tls.key_file", true, 1 << 20, &klen,
					    err, errlen, &krc);
		BIO *bio = pem ? BIO_new_mem_buf(pem, (int)klen) : NULL;
		EVP_PKEY *pk = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
		bool ok = pk && SSL_CTX_use_certificate_chain_file(ctx, crt) == 1 &&
			  SSL_CTX_use_PrivateKey(ctx, pk) == 1 && SSL_CTX_check_private_key(ctx) == 1;

		EVP_PKEY_free(pk);
		BIO_free(bio);
		if (pem) {
			OPENSSL_cleanse(pem, klen);
			free(pem);
		}
		if (!ok) {
			if (pem)
				ssl_errs(err, errlen, "tls.cert_file/key_file");
			goto fail;
		}
	}
	if (alpn_http && SSL_CTX_set_alpn_protos(ctx, (const unsigned char *)"\x08http/1.1", 9)) {
		snprintf(err, errlen, "ALPN: out of memory");
		goto fail;
	}
	c = calloc(1, sizeof(*c));
	if (!c || !(c->key = strdup(k))) {
		free(c);
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	c->ctx = ctx;
	c->next = cctxs;
	cctxs = c;
	SSL_CTX_up_ref(ctx);
	pthread_mutex_unlock(&g.lock);
	return ctx;
fail:
	pthread_mutex_unlock(&g.lock);
	SSL_CTX_free(ctx);
	return NULL;
}

SSL *ag_tls_client_new(const struct ag_policy_target *t, bool alpn_http, char *err, size_t errlen)
{
	enum ag_tls_upstream mode = ag_tls_upstream_mode(t);
	const char *host = t->host;
	SSL_CTX *ctx;
	SSL *ssl;

	if (mode == AG_TLS_UP_NONE) {
		snprintf(err, errlen, "the target has no upstream TLS");
		return NULL;
	}
	ctx = client_ctx(t, mode, alpn_http, err, errlen);
	if (!ctx)
		return NULL;
	ssl = SSL_new(ctx);
	SSL_CTX_free(ctx); /* the SSL holds its own reference */
	if (!ssl) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	if (!is_ip(host))
		SSL_set_tlsext_host_name(ssl, host);
	if (mode == AG_TLS_UP_VERIFY_FULL) {
		X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
		int ok = is_ip(host) ? X509_VERIFY_PARAM_set1_ip_asc(vp, host)
				     : SSL_set1_host(ssl, host);

		if (ok != 1) {
			SSL_free(ssl);
			snprintf(err, errlen, "cannot verify the name %s", host);
			return NULL;
		}
		X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
	}
	return ssl;
}
