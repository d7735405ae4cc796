// SPDX-License-Identifier: GPL-2.0
/*
 * Masking as the agent sees it, value by value: what each detector finds inside text (and the
 * look-alikes it must leave alone), what each style turns a value into, derived values
 * (row_to_json() text, concatenations) that stay valid JSON, typed values that can only become
 * NULL, column rules with globs, quoting and schemas, a masker with no mask, and thousands of
 * random and hostile values (up to 1 MB) that must neither crash nor leave something a detector
 * still finds. No daemon, no database: the PostgreSQL tests cover the wire.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <yajl/yajl_tree.h>

#include "buf.h"
#include "mask.h"
#include "../test_progs.h"

#define ALL_DETS "email", "credit-card", "ssn", "phone", "jwt", "aws-key", "private-key"

#define JWT_HDR "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
#define JWT                                                                                        \
	JWT_HDR ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"      \
		".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
#define AWS_SECRET "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
#define PEM_BODY                                                                                   \
	"MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"                       \
	"MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
#define PEM_RSA "-----BEGIN RSA PRIVATE KEY-----\n" PEM_BODY "-----END RSA PRIVATE KEY-----"

static struct ag_masker *new_masker(const char *style, const char *const *dets,
				    const char *const *cols, const char *key)
{
	struct ag_kv kv[3] = {};
	size_t n = 0, ndets = 0, ncols = 0;

	while (dets && dets[ndets])
		ndets++;
	while (cols && cols[ncols])
		ncols++;
	if (style) {
		kv[n].key = (char *)"style";
		kv[n++].value = (char *)style;
	}
	if (dets) {
		kv[n].key = (char *)"detectors";
		kv[n].kind = AG_KV_LIST;
		kv[n].list = (char **)dets;
		kv[n++].nlist = ndets;
	}
	if (cols) {
		kv[n].key = (char *)"columns";
		kv[n].kind = AG_KV_LIST;
		kv[n].list = (char **)cols;
		kv[n++].nlist = ncols;
	}
	return ag_masker_new(kv, n, (const uint8_t *)key, key ? strlen(key) : 0);
}

static struct ag_masker *all_detectors(const char *style, const char *key)
{
	static const char *const dets[] = { ALL_DETS, NULL };

	return new_masker(style, dets, NULL, key);
}

static char result[1 << 16];
static int nmasked;

/*
 * What the agent gets for in: the new text, the input itself when nothing changed, "NULL",
 * or "ERROR". nmasked holds the count.
 */
static const char *mask(const struct ag_masker *m, bool whole, enum ag_mask_kind kind,
			const char *in)
{
	struct ag_buf out = { .start = 3, .end = 3 }; /* not at 0: appending must respect start */
	bool is_null = true;

	out.data = malloc(16);
	out.cap = 16;
	if (!out.data)
		return "ERROR";
	memcpy(out.data, "abc", 3);
	nmasked = ag_mask_value(m, whole, kind, (const uint8_t *)in, strlen(in), &out, &is_null);
	if (nmasked < 0)
		snprintf(result, sizeof(result), "ERROR");
	else if (is_null && nmasked > 0)
		snprintf(result, sizeof(result), "NULL");
	else if (nmasked == 0)
		snprintf(result, sizeof(result), "%s%s", in,
			 ag_buf_len(&out) || is_null ? " (out or is_null touched)" : "");
	else
		snprintf(result, sizeof(result), "%.*s", (int)ag_buf_len(&out), ag_buf_head(&out));
	ag_buf_free(&out);
	return result;
}

static const char *text(const struct ag_masker *m, const char *in)
{
	return mask(m, false, AG_MASK_TEXT, in);
}

struct vec {
	const char *in;
	const char *out; /* NULL: unchanged */
};

static void check_vecs(const struct ag_masker *m, const struct vec *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		ASSERT_STREQ(text(m, v[i].in), v[i].out ? v[i].out : v[i].in, v[i].in);
}

#define CHECK_VECS(m, v) check_vecs(m, v, sizeof(v) / sizeof(v[0]))

static void subtest_email(void)
{
	static const struct vec redact[] = {
		{ "alice@example.com", "[REDACTED:email]" },
		{ "a@b.co", "[REDACTED:email]" },
		{ "mail: Bob.Smith+tag@mail.example.co.uk.", "mail: [REDACTED:email]." },
		{ "<ALICE@EXAMPLE.COM>", "<[REDACTED:email]>" },
		{ "x alice@example.com, bob@example.org y",
		  "x [REDACTED:email], [REDACTED:email] y" },
		{ "bob@example.com.123", "[REDACTED:email].123" },
		{ "bob@b\303\274cher.de", "[REDACTED:email]" },
		{ "mailto:carol_o%x@sub-1.example.io?subject=hi",
		  "mailto:[REDACTED:email]?subject=hi" },
		{ ".bob@example.com", ".[REDACTED:email]" },
		/* look-alikes */
		{ "bob@localhost" },
		{ "user@10.0.0.1" },
		{ "foo@bar.c" },
		{ "@example.com" },
		{ "alice@" },
		{ "follow @handle on x.com" },
		{ "a@b" },
		{ "price @ 5.00" },
	};
	static const struct vec partial[] = {
		{ "alice@example.com", "a***@example.com" },
		{ "to: z@example.org;", "to: z***@example.org;" },
	};
	struct ag_masker *m = all_detectors("redact", NULL);
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	CHECK_VECS(m, redact);
	CHECK_VECS(p, partial);
	ASSERT_STREQ(text(m, "a@b.co x@y.org"), "[REDACTED:email] [REDACTED:email]", "two");
	ASSERT_EQ(nmasked, 2, "two counted");
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

static void subtest_credit_card(void)
{
	static const struct vec redact[] = {
		{ "4111111111111111", "[REDACTED:credit-card]" },
		{ "4111 1111 1111 1111", "[REDACTED:credit-card]" },
		{ "card 4111-1111-1111-1111.", "card [REDACTED:credit-card]." },
		{ "5555555555554444", "[REDACTED:credit-card]" },
		{ "amex 3782 822463 10005 ok", "amex [REDACTED:credit-card] ok" },
		{ "378282246310005", "[REDACTED:credit-card]" },
		{ "4222222222222", "[REDACTED:credit-card]" },	     /* 13 digits */
		{ "4111111111111111110", "[REDACTED:credit-card]" }, /* 19 digits */
		{ "6011111111111117", "[REDACTED:credit-card]" },
		{ "2221 0000 0000 0009", "[REDACTED:credit-card]" },
		{ "3622 720627 1667", "[REDACTED:credit-card]" }, /* Diners 4-6-4 */
		{ "ref 12 4111 1111 1111 1111 paid", "ref 12 [REDACTED:credit-card] paid" },
		{ "(4111111111111111)", "([REDACTED:credit-card])" },
		{ "4111111111111111,5555555555554444",
		  "[REDACTED:credit-card],[REDACTED:credit-card]" },
		/* look-alikes */
		{ "4111111111111112" },		  /* Luhn */
		{ "4111 1111 1111 1112" },	  /* Luhn */
		{ "12345678904111111111111111" }, /* inside a longer number */
		{ "41111111111111110" },	  /* 17 digits, Luhn fails */
		{ "id4111111111111111" },	  /* glued to a word */
		{ "4111111111111111kg" },
		{ "3.4111111111111111" }, /* a decimal */
		{ "4111111111111111.5" },
		{ "4111111111111111.05" },
		{ "4111-1111-1111-1111-1111" }, /* a longer dashed number */
		{ "411 1111 1111 1111 1" },	/* not a card's shape */
		{ "4111  1111  1111  1111" },	/* double spaces */
		{ "4111-1111 1111-1111" },	/* mixed separators */
		{ "0000000000000000" },		/* Luhn-valid, no issuer */
		{ "at 1718000000006 ms" },	/* Luhn-valid epoch milliseconds */
		{ "411111111111" },		/* 12 digits */
		{ "2024-01-15 10:30:00.123456789012345" },
	};
	static const struct vec partial[] = {
		{ "4111111111111111", "************1111" },
		{ "4111-1111-1111-1111", "****-****-****-1111" },
		{ "pay 4111 1111 1111 1111 now", "pay **** **** **** 1111 now" },
		{ "3782 822463 10005", "**** ****** *0005" },
	};
	struct ag_masker *m = all_detectors(NULL, NULL); /* redact is the default */
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	ASSERT_EQ(ag_masker_style(m), AG_MASK_REDACT, "default style");
	CHECK_VECS(m, redact);
	CHECK_VECS(p, partial);
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

static void subtest_ssn(void)
{
	static const struct vec redact[] = {
		{ "123-45-6789", "[REDACTED:ssn]" },
		{ "ssn: 078-05-1120;", "ssn: [REDACTED:ssn];" },
		{ "\"899-99-9999\"", "\"[REDACTED:ssn]\"" },
		/* look-alikes */
		{ "000-12-3456" },
		{ "666-12-3456" },
		{ "900-12-3456" },
		{ "123-00-6789" },
		{ "123-45-0000" },
		{ "1123-45-6789" },
		{ "123-45-67890" },
		{ "123-45-6789-1" },
		{ "9-123-45-6789" },
		{ "123456789" },
		{ "x123-45-6789" },
		{ "123 45 6789" },
	};
	struct ag_masker *m = all_detectors("redact", NULL);
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	CHECK_VECS(m, redact);
	ASSERT_STREQ(text(p, "ssn 123-45-6789"), "ssn ***-**-6789", "partial");
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

static void subtest_phone(void)
{
	static const struct vec redact[] = {
		{ "+14155552671", "[REDACTED:phone]" },
		{ "call +44 20 7946 0958 now", "call [REDACTED:phone] now" },
		{ "+1 (555) 123-4567", "[REDACTED:phone]" },
		{ "(555) 123-4567", "[REDACTED:phone]" },
		{ "(555)123-4567", "[REDACTED:phone]" },
		{ "555-123-4567", "[REDACTED:phone]" },
		{ "555.123.4567", "[REDACTED:phone]" },
		{ "1-555-123-4567", "[REDACTED:phone]" },
		{ "tel:+4915112345678;", "tel:[REDACTED:phone];" },
		{ "+12345678", "[REDACTED:phone]" },
		/* look-alikes */
		{ "+1234567" },		  /* 7 digits */
		{ "+12345678901234567" }, /* 17 digits */
		{ "+0123456789" },	  /* no country code 0 */
		{ "155-123-4567" },	  /* area code 1xx */
		{ "555-123-45678" },
		{ "555-123.4567" },
		{ "2555-123-4567" },
		{ "2024-01-15" },
		{ "192.168.100.200" },
		{ "1+23456789012" },
		{ "x555-123-4567" },
		{ "5551234567" },
		{ "v1.555.123.4567" },
	};
	static const struct vec partial[] = {
		{ "+14155552671", "+*******2671" },	{ "+44 20 7946 0958", "+** ** **** 0958" },
		{ "(555) 123-4567", "(***) ***-4567" }, { "555.123.4567", "***.***.4567" },
		{ "1-555-123-4567", "*-***-***-4567" }, { "+12345678", "+******78" },
	};
	struct ag_masker *m = all_detectors("redact", NULL);
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	CHECK_VECS(m, redact);
	CHECK_VECS(p, partial);
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

static void subtest_jwt(void)
{
	static const struct vec redact[] = {
		{ JWT, JWT_HDR ".[REDACTED:jwt]" },
		{ "Authorization: Bearer " JWT "\r\n",
		  "Authorization: Bearer " JWT_HDR ".[REDACTED:jwt]\r\n" },
		{ "{\"t\":\"" JWT "\"}", "{\"t\":\"" JWT_HDR ".[REDACTED:jwt]\"}" },
		{ "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.", "eyJhbGciOiJub25lIn0.[REDACTED:jwt]" },
		/* a header that is also a labelled AWS secret: keeping it would show the secret */
		{ "secret_key=eyJ5" JWT, "secret_key=[REDACTED]" },
		/* glued on the left: the header is still the header, not the payload */
		{ "KEY-----" JWT, "KEY-----" JWT_HDR ".[REDACTED:jwt]" },
		{ "x" JWT, "x" JWT_HDR ".[REDACTED:jwt]" },
		/* look-alikes */
		{ JWT_HDR },
		{ JWT_HDR "." },
		{ "eyJ.ab.cd" },
		{ "eyJhbGciOiJIUzI1NiJ9.e" },
	};
	struct ag_masker *m = all_detectors("redact", NULL);
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	CHECK_VECS(m, redact);
	ASSERT_STREQ(text(p, "t=" JWT), "t=" JWT_HDR ".***.***", "partial keeps the header");
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

static void subtest_aws_key(void)
{
	static const struct vec redact[] = {
		{ "AKIAIOSFODNN7EXAMPLE", "[REDACTED:aws-key]" },
		{ "id=ASIAY34FZKBOKMUTVV7A;", "id=[REDACTED:aws-key];" },
		{ "aws_secret_access_key = " AWS_SECRET,
		  "aws_secret_access_key = [REDACTED:aws-key]" },
		{ "AWS_SECRET_ACCESS_KEY=" AWS_SECRET "\n",
		  "AWS_SECRET_ACCESS_KEY=[REDACTED:aws-key]\n" },
		{ "{\"AccessKeyId\":\"ASIAY34FZKBOKMUTVV7A\",\"SecretAccessKey\":\"" AWS_SECRET
		  "\"}",
		  "{\"AccessKeyId\":\"[REDACTED:aws-key]\",\"SecretAccessKey\":\"[REDACTED:aws-key]"
		  "\"}" },
		{ "{\\\"secret_key\\\": \\\"" AWS_SECRET "\\\"}",
		  "{\\\"secret_key\\\": \\\"[REDACTED:aws-key]\\\"}" },
		/* look-alikes */
		{ "AKIAIOSFODNN7EXAMPL" },
		{ "AKIAIOSFODNN7EXAMPLE1" },
		{ "XAKIAIOSFODNN7EXAMPLE" },
		{ "akiaiosfodnn7example" },
		{ "AKIAiosfodnn7EXAMPLE" },
		{ AWS_SECRET }, /* unlabelled */
		{ "aws_secret_access_key = " AWS_SECRET "X" },
		{ "secret = short, but this value is long enough to look at it" },
	};
	struct ag_masker *m = all_detectors("redact", NULL);
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	CHECK_VECS(m, redact);
	ASSERT_STREQ(text(p, "AKIAIOSFODNN7EXAMPLE"), "AKIA****************", "partial id");
	ASSERT_STREQ(text(p, "secret_key: " AWS_SECRET),
		     "secret_key: wJal************************************", "partial secret");
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

static void subtest_private_key(void)
{
	static const struct vec redact[] = {
		{ PEM_RSA, "[REDACTED:private-key]" },
		{ "key: " PEM_RSA "\ndone", "key: [REDACTED:private-key]\ndone" },
		{ "-----BEGIN PRIVATE KEY-----\r\n" PEM_BODY "-----END PRIVATE KEY-----\r\n",
		  "[REDACTED:private-key]\r\n" },
		{ "-----BEGIN ENCRYPTED PRIVATE KEY-----\n" PEM_BODY
		  "-----END ENCRYPTED PRIVATE KEY-----",
		  "[REDACTED:private-key]" },
		{ "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: "
		  "AES-128-CBC,AB12"
		  "\n\n" PEM_BODY "-----END EC PRIVATE KEY-----",
		  "[REDACTED:private-key]" },
		/* as row_to_json() prints it: newlines escaped */
		{ "{\"k\":\"-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAA\\n"
		  "-----END OPENSSH PRIVATE KEY-----\\n\",\"id\":1}",
		  "{\"k\":\"[REDACTED:private-key]\\n\",\"id\":1}" },
		/* cut short (substr()): masked as far as the body goes, the JSON around it kept */
		{ "{\"k\":\"-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqh\",\"id\":1}",
		  "{\"k\":\"[REDACTED:private-key]\",\"id\":1}" },
		/* cut short in a COPY row (tab-separated, newline-ended) and in a CSV line */
		{ "1\t-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg\tnext\n",
		  "1\t[REDACTED:private-key]\tnext\n" },
		{ "1,-----BEGIN PRIVATE KEY----- MIIEvQIBADANBg,next",
		  "1,[REDACTED:private-key],next" },
		{ "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n\n", "[REDACTED:private-key]\n\n" },
		/* look-alikes */
		{ "-----BEGIN CERTIFICATE-----\n" PEM_BODY "-----END CERTIFICATE-----" },
		{ "-----BEGIN PUBLIC KEY-----\n" PEM_BODY "-----END PUBLIC KEY-----" },
		{ "-----BEGIN private key-----\n" PEM_BODY },
	};
	struct ag_masker *m = all_detectors("redact", NULL);
	struct ag_masker *p = all_detectors("partial", NULL);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(p, "masker partial"))
		goto out;
	CHECK_VECS(m, redact);
	ASSERT_STREQ(text(p, PEM_RSA), "[REDACTED:private-key]", "partial masks it whole");
	ASSERT_STREQ(mask(p, true, AG_MASK_TEXT, PEM_RSA), "[REDACTED:private-key]", "whole");
out:
	ag_masker_free(m);
	ag_masker_free(p);
}

/*
 * Every detector wherever its match lands in a value: each offset of the first 16-byte blocks
 * and around 4080 bytes, where the trigger scan folds its per-lane digit counts.
 */
static void subtest_positions(void)
{
	static const struct vec samples[] = {
		{ "alice@example.com", "[REDACTED:email]" },
		{ "4111 1111 1111 1111", "[REDACTED:credit-card]" },
		{ "123-45-6789", "[REDACTED:ssn]" },
		{ "+14155552671", "[REDACTED:phone]" },
		{ JWT, JWT_HDR ".[REDACTED:jwt]" },
		{ "AKIAIOSFODNN7EXAMPLE", "[REDACTED:aws-key]" },
		{ "secret_key=" AWS_SECRET, "secret_key=[REDACTED:aws-key]" },
		{ PEM_RSA, "[REDACTED:private-key]" },
	};
	static const size_t big[] = { 4063, 4079, 4080, 4081, 4095, 4096, 8200 };
	struct ag_masker *m = all_detectors("redact", NULL);
	char *in = malloc(20000), *want = malloc(20000);

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(in, "in") || !ASSERT_OK_PTR(want, "want"))
		goto out;
	for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
		for (size_t k = 0; k < 40 + sizeof(big) / sizeof(big[0]); k++) {
			size_t pre = k < 40 ? k : big[k - 40], post = k < 40 ? 39 - k : big[k - 40];
			char name[64];
			int n;

			/* "xx..x0; <sample> ;7yy..y": a lone digit on each side, far or near */
			memset(in, 'x', pre);
			n = pre + sprintf(in + pre, "0; %s ;7", samples[i].in);
			memset(in + n, 'y', post);
			in[n + post] = '\0';
			memcpy(want, in, pre);
			n = pre + sprintf(want + pre, "0; %s ;7", samples[i].out);
			memset(want + n, 'y', post);
			want[n + post] = '\0';
			snprintf(name, sizeof(name), "%.12s at %zu+%zu", samples[i].in, pre, post);
			/* not ASSERT_STREQ: a failure would print 16 KiB */
			if (!ASSERT_TRUE(!strcmp(text(m, in), want), name))
				goto out;
		}
	}
out:
	ag_masker_free(m);
	free(in);
	free(want);
}

static void subtest_style_redact(void)
{
	static const char *const dets[] = { "email", NULL };
	static const char *const cols[] = { "users.email", NULL };
	struct ag_masker *m = new_masker("redact", dets, cols, NULL);

	if (!ASSERT_OK_PTR(m, "masker"))
		return;
	ASSERT_STREQ(mask(m, true, AG_MASK_TEXT, "alice@example.com"), "[REDACTED]", "whole");
	ASSERT_EQ(nmasked, 1, "whole counts one");
	ASSERT_STREQ(mask(m, true, AG_MASK_TEXT, ""), "[REDACTED]", "whole empty");
	ASSERT_STREQ(mask(m, true, AG_MASK_TYPED, "42"), "NULL", "whole typed");
	ASSERT_STREQ(text(m, "to alice@example.com"), "to [REDACTED:email]", "span");
	/* only the detectors asked for */
	ASSERT_STREQ(text(m, "4111111111111111"), "4111111111111111", "card not asked for");
	ag_masker_free(m);
}

static void subtest_style_partial(void)
{
	static const struct vec whole[] = {
		{ "alice@example.com", "a***@example.com" }, /* a detector's hint */
		{ "123-45-6789", "***-**-6789" },
		{ "4111 1111 1111 1111", "**** **** **** 1111" },
		{ "Sensitive Value", "***********alue" }, /* no detector: last 4 kept */
		{ "12345678", "****5678" },
		{ "1234567", "*******" }, /* short: all stars */
		{ "short", "*****" },
		{ "Gr\303\274\303\237e aus K\303\266ln", "**********K\303\266ln" }, /* UTF-8 */
		{ "", "" },
		{ "mail alice@example.com", "******************.com" }, /* not only a detection */
	};
	static const char *const cols[] = { "*.secret", NULL };
	struct ag_masker *m = new_masker("partial", NULL, cols, NULL);

	if (!ASSERT_OK_PTR(m, "masker"))
		return;
	for (size_t i = 0; i < sizeof(whole) / sizeof(whole[0]); i++) {
		ASSERT_STREQ(mask(m, true, AG_MASK_TEXT, whole[i].in), whole[i].out, whole[i].in);
		ASSERT_EQ(nmasked, 1, whole[i].in);
	}
	ASSERT_EQ(ag_masker_detectors(m), 0, "no detectors");
	ASSERT_STREQ(text(m, "alice@example.com"), "alice@example.com", "no detectors: no spans");
	ag_masker_free(m);
}

/* "h:" and the first 16 hex digits of HMAC-SHA-256(key, in), computed apart from mask.c. */
static void expected_hash(const char *key, const char *in, char out[19])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;

	HMAC(EVP_sha256(), key, strlen(key), (const unsigned char *)in, strlen(in), md, &mdlen);
	strcpy(out, "h:");
	for (int i = 0; i < 8; i++)
		sprintf(out + 2 + 2 * i, "%02x", md[i]);
}

static void subtest_style_hash(void)
{
	static const char *const cols[] = { "users.email", NULL };
	static const char *const dets[] = { "email", "ssn", NULL };
	struct ag_masker *m = new_masker("hash", dets, cols, "k1");
	struct ag_masker *m2 = new_masker("hash", dets, cols, "k1");
	struct ag_masker *other = new_masker("hash", dets, cols, "k2");
	struct ag_masker *nokey = new_masker("hash", dets, cols, NULL);
	char a[64], b[64], want[19];

	if (!ASSERT_OK_PTR(m, "masker") || !ASSERT_OK_PTR(m2, "masker 2") ||
	    !ASSERT_OK_PTR(other, "other key") || !ASSERT_OK_PTR(nokey, "no key"))
		goto out;
	expected_hash("k1", "alice@example.com", want);
	snprintf(a, sizeof(a), "%s", mask(m, true, AG_MASK_TEXT, "alice@example.com"));
	ASSERT_STREQ(a, want, "HMAC-SHA-256, 16 hex");
	ASSERT_EQ(strlen(a), 18, "length");
	ASSERT_STREQ(mask(m, true, AG_MASK_TEXT, "alice@example.com"), a, "deterministic");
	ASSERT_STREQ(mask(m2, true, AG_MASK_TEXT, "alice@example.com"), a, "same key, same hash");
	ASSERT_STREQ(text(m, "alice@example.com"), a, "a detection hashes like the column");
	expected_hash("k1", "123-45-6789", want);
	snprintf(b, sizeof(b), "ssn %s, mail %s.", want, a);
	ASSERT_STREQ(text(m, "ssn 123-45-6789, mail alice@example.com."), b, "spans");
	ASSERT_NEQ(strcmp(mask(other, true, AG_MASK_TEXT, "alice@example.com"), a), 0,
		   "another key, another hash");
	ASSERT_NEQ(strcmp(mask(m, true, AG_MASK_TEXT, "bob@example.com"), a), 0,
		   "another value, another hash");
	snprintf(b, sizeof(b), "%s", mask(nokey, true, AG_MASK_TEXT, "alice@example.com"));
	ASSERT_STREQ(mask(nokey, true, AG_MASK_TEXT, "alice@example.com"), b,
		     "no key: random, still deterministic");
	ASSERT_NEQ(strcmp(b, a), 0, "no key: not the k1 hash");
	ASSERT_STREQ(mask(m, true, AG_MASK_TYPED, "2024-01-15"), "NULL", "typed: NULL");
out:
	ag_masker_free(m);
	ag_masker_free(m2);
	ag_masker_free(other);
	ag_masker_free(nokey);
}

static void subtest_style_null(void)
{
	static const char *const cols[] = { "*.ssn", NULL };
	static const char *const dets[] = { "ssn", "email", NULL };
	struct ag_masker *m = new_masker("null", dets, cols, NULL);
	struct ag_buf out = {};
	bool is_null = false;
	int n;

	if (!ASSERT_OK_PTR(m, "masker"))
		return;
	n = ag_mask_value(m, true, AG_MASK_TEXT, (const uint8_t *)"123-45-6789", 11, &out,
			  &is_null);
	ASSERT_EQ(n, 1, "one value");
	ASSERT_TRUE(is_null, "is_null");
	ASSERT_EQ(ag_buf_len(&out), 0, "nothing written");
	ASSERT_STREQ(text(m, "ssn 123-45-6789 of a@b.co"), "ssn [REDACTED:ssn] of [REDACTED:email]",
		     "inside text: redacted");
	ASSERT_EQ(ag_mask_value(m, true, AG_MASK_TEXT, (const uint8_t *)"x", 1, &out, NULL),
		  -EINVAL, "NULL without is_null");
	ag_masker_free(m);
}

static bool json_valid(const char *s)
{
	char err[128];
	yajl_val v = yajl_tree_parse(s, err, sizeof(err));

	yajl_tree_free(v);
	return v != NULL;
}

static void subtest_derived_values(void)
{
	static const char *const styles[] = { "redact", "partial", "hash", "null" };
	const char *row = "{\"id\":1,\"name\":\"Alice\",\"email\":\"alice@example.com\","
			  "\"card\":\"4111 1111 1111 1111\",\"note\":\"call\\n555-123-4567\\t"
			  "or mail\\nbob@example.org\",\"joined\":\"2024-01-15\",\"n\":12.5}";

	for (size_t i = 0; i < 4; i++) {
		struct ag_masker *m = all_detectors(styles[i], "k");
		const char *out;

		if (!ASSERT_OK_PTR(m, styles[i]))
			continue;
		out = text(m, row);
		ASSERT_EQ(nmasked, 4, styles[i]);
		ASSERT_TRUE(json_valid(out), styles[i]);
		ASSERT_FALSE(strstr(out, "alice@") || strstr(out, "bob@") || strstr(out, "4111 ") ||
				     strstr(out, "555-123"),
			     styles[i]);
		ASSERT_HAS_SUBSTR(out, "\"joined\":\"2024-01-15\",\"n\":12.5}", styles[i]);
		if (i == 0)
			ASSERT_STREQ(out,
				     "{\"id\":1,\"name\":\"Alice\",\"email\":\"[REDACTED:email]\","
				     "\"card\":\"[REDACTED:credit-card]\",\"note\":\"call\\n"
				     "[REDACTED:phone]\\tor mail\\n[REDACTED:email]\",\"joined\":"
				     "\"2024-01-15\",\"n\":12.5}",
				     "row_to_json redacted");
		if (i == 1)
			ASSERT_STREQ(out,
				     "{\"id\":1,\"name\":\"Alice\",\"email\":\"a***@example.com\","
				     "\"card\":\"**** **** **** 1111\",\"note\":\"call\\n"
				     "***-***-4567\\tor mail\\nb***@example.org\",\"joined\":"
				     "\"2024-01-15\",\"n\":12.5}",
				     "row_to_json partial");
		/* 'mail: ' || email, lower(email), format('%s/%s', ssn, card) */
		out = text(m, "mail: alice@example.com");
		if (i == 2)
			ASSERT_TRUE(!strncmp(out, "mail: h:", 8) && strlen(out) == 24, out);
		else
			ASSERT_STREQ(out,
				     i == 1 ? "mail: a***@example.com" : "mail: [REDACTED:email]",
				     styles[i]);
		if (i == 0) {
			ASSERT_STREQ(text(m, "078-05-1120/4111111111111111"),
				     "[REDACTED:ssn]/[REDACTED:credit-card]", "format()");
			ASSERT_STREQ(text(m, "AKIAIOSFODNN7EXAMPLE:" JWT),
				     "[REDACTED:aws-key]:" JWT_HDR ".[REDACTED:jwt]", "key:token");
		}
		/*
		 * Glued together, the second starts no match until the first is masked:
		 * token || phone, card || phone. Found whatever the style renders.
		 */
		out = text(m, JWT "+14155552671");
		ASSERT_EQ(nmasked, 2, "token || phone");
		ASSERT_FALSE(strstr(out, "4155552671") || strstr(out, "eyJzdWIi"), out);
		out = text(m, "4111111111111111+14155552671");
		ASSERT_EQ(nmasked, 2, "card || phone");
		ASSERT_FALSE(strstr(out, "4155552671") || strstr(out, "41111111"), out);
		if (i == 1)
			ASSERT_STREQ(out, "************1111+*******2671", "card || phone, partial");
		ag_masker_free(m);
	}
}

static void subtest_typed_values(void)
{
	static const char *const styles[] = { "redact", "partial", "hash", "null" };
	/* what a detector finds in a typed value, and what it does not */
	static const char *const hits[] = {
		"4111111111111111",		     /* SELECT card::int8 */
		"4111111111111111.00",		     /* card::numeric(20,2) */
		"(1,alice@example.com,123-45-6789)", /* a record */
		"{555-123-4567,x}",		     /* an array */
	};
	static const char *const clean[] = {
		"4111111111111112",
		"2024-01-15",
		"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
		"-12.5",
		"42",
		"2024-01-15 10:30:00.123456+00",
		"",
	};
	static const char *const cols[] = { "*.*", NULL };

	for (size_t i = 0; i < 4; i++) {
		static const char *const dets[] = { ALL_DETS, NULL };
		struct ag_masker *m = new_masker(styles[i], dets, cols, "k");

		if (!ASSERT_OK_PTR(m, styles[i]))
			continue;
		for (size_t j = 0; j < sizeof(hits) / sizeof(hits[0]); j++) {
			/* no replacement text would parse: NULL, whatever the style */
			ASSERT_STREQ(mask(m, false, AG_MASK_TYPED, hits[j]), "NULL", hits[j]);
			ASSERT_GE(nmasked, 1, hits[j]);
		}
		for (size_t j = 0; j < sizeof(clean) / sizeof(clean[0]); j++) {
			ASSERT_STREQ(mask(m, false, AG_MASK_TYPED, clean[j]), clean[j], clean[j]);
			ASSERT_EQ(nmasked, 0, clean[j]);
			/* a column rule makes it NULL, whatever the style */
			ASSERT_STREQ(mask(m, true, AG_MASK_TYPED, clean[j]), "NULL", clean[j]);
			ASSERT_EQ(nmasked, 1, clean[j]);
		}
		ag_masker_free(m);
	}
}

static void subtest_column_globs(void)
{
	static const char *const cols[] = {
		"users.email",
		"*.ssn",
		"public.payments.*",
		"billing.\"CardHolders\".\"PAN\"",
		"secret_?",
		"\"a.b\".\"c\"\"d\".e",
		NULL,
	};
	static const struct {
		const char *schema, *table, *column;
		bool covered;
	} cases[] = {
		{ NULL, "users", "email", true },
		{ "public", "users", "email", true },
		{ "crm", "users", "email", true },    /* no schema in the rule: any schema */
		{ "public", "Users", "EMAIL", true }, /* unquoted: any case */
		{ "public", "users", "name", false },
		{ "public", "users_old", "email", false },
		{ "hr", "employees", "ssn", true },
		{ NULL, "people", "ssn", true },
		{ "hr", "employees", "ssn_hash", false },
		{ NULL, "payments", "amount", true },
		{ "public", "payments", "card", true },
		{ "billing", "payments", "amount", false },
		{ "billing", "CardHolders", "PAN", true },
		{ "billing", "cardholders", "pan", false }, /* quoted: exact */
		{ "x", "y", "secret_a", true },
		{ "x", "y", "secret_ab", false },
		{ "a.b", "c\"d", "e", true },
		{ "a", "b", "e", false },
		{ NULL, NULL, "ssn", false }, /* no origin table */
	};
	const char *const *schemas, *const *tables, *const *columns;
	/* too many parts, empty parts, unbalanced quotes, a lone quote inside a quoted name */
	static const char *const bad[] = {
		"a.b.c.d", "users..email", "\"unterminated.x", "",
		"users.",  "\"\".x",	   "\"a\"x\"y\".col",
	};
	struct ag_masker *m = new_masker(NULL, NULL, cols, NULL);
	size_t n;

	if (!ASSERT_OK_PTR(m, "masker"))
		return;
	ASSERT_TRUE(ag_masker_active(m), "columns alone: active");
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char name[128];

		snprintf(name, sizeof(name), "%s.%s.%s", cases[i].schema ?: "(null)",
			 cases[i].table ?: "(null)", cases[i].column);
		ASSERT_EQ(ag_masker_column(m, cases[i].schema, cases[i].table, cases[i].column),
			  cases[i].covered, name);
	}
	n = ag_masker_patterns(m, &schemas, &tables, &columns);
	if (ASSERT_EQ(n, 6, "patterns")) {
		ASSERT_STREQ(schemas[0], "*", "users.email schema");
		ASSERT_STREQ(tables[0], "users", "users.email table");
		ASSERT_STREQ(columns[0], "email", "users.email column");
		ASSERT_STREQ(tables[1], "*", "*.ssn table");
		ASSERT_STREQ(schemas[2], "public", "public.payments.* schema");
		ASSERT_STREQ(columns[2], "*", "public.payments.* column");
		ASSERT_STREQ(tables[3], "CardHolders", "quoted table");
		ASSERT_STREQ(schemas[4], "*", "secret_? schema");
		ASSERT_STREQ(columns[4], "secret_?", "secret_? column");
		ASSERT_STREQ(tables[5], "c\"d", "quoted quote");
	}
	ag_masker_free(m);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		const char *one[] = { bad[i], NULL };

		errno = 0;
		m = new_masker(NULL, NULL, one, NULL);
		ASSERT_TRUE(!m && errno == EINVAL, bad[i]);
		ag_masker_free(m);
	}
}

static void subtest_inactive(void)
{
	static const char *const none[] = { NULL };
	static const char *const bogus[] = { "iban", NULL };
	const char *const *s, *const *t, *const *c;
	struct ag_masker *m = ag_masker_new(NULL, 0, NULL, 0);
	struct ag_masker *empty = new_masker("hash", none, none, NULL);

	if (!ASSERT_OK_PTR(m, "NULL mask") || !ASSERT_OK_PTR(empty, "empty lists"))
		goto out;
	ASSERT_FALSE(ag_masker_active(m), "inactive");
	ASSERT_FALSE(ag_masker_active(empty), "empty lists: inactive");
	ASSERT_STREQ(mask(m, true, AG_MASK_TEXT, "alice@example.com"), "alice@example.com",
		     "whole: unchanged");
	ASSERT_STREQ(text(m, "alice@example.com"), "alice@example.com", "text: unchanged");
	ASSERT_FALSE(ag_masker_column(m, "public", "users", "email"), "no column");
	ASSERT_EQ(ag_masker_patterns(m, &s, &t, &c), 0, "no patterns");
	ASSERT_EQ(ag_masker_detectors(m), 0, "no detectors");
	ASSERT_FALSE(ag_masker_active(NULL), "NULL masker");
	ASSERT_EQ(ag_mask_value(NULL, true, AG_MASK_TEXT, (const uint8_t *)"x", 1, NULL, NULL), 0,
		  "NULL masker masks nothing");
	ASSERT_STREQ(ag_detector_name(AG_DET_CREDIT_CARD), "credit-card", "detector name");
	ASSERT_TRUE(ag_detector_name(0) == NULL, "no detector name");
	errno = 0;
	ASSERT_TRUE(!new_masker("scramble", NULL, NULL, NULL) && errno == EINVAL, "bad style");
	errno = 0;
	ASSERT_TRUE(!new_masker(NULL, bogus, NULL, NULL) && errno == EINVAL, "bad detector");
out:
	ag_masker_free(m);
	ag_masker_free(empty);
	ag_masker_free(NULL);
}

/* ---- robustness ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
	uint64_t x = rng_state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static bool utf8_valid(const uint8_t *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		size_t k;

		if (s[i] < 0x80) {
			i++;
			continue;
		}
		k = (s[i] & 0xe0) == 0xc0   ? 1
		    : (s[i] & 0xf0) == 0xe0 ? 2
		    : (s[i] & 0xf8) == 0xf0 ? 3
					    : 0;
		if (!k || s[i] < 0xc2 || s[i] > 0xf4 || n - i <= k)
			return false;
		for (size_t j = 1; j <= k; j++)
			if ((s[i + j] & 0xc0) != 0x80)
				return false;
		i += k + 1;
	}
	return true;
}

static const char *const snippets[] = {
	"alice@example.com",
	"4111 1111 1111 1111",
	"4111111111111111",
	"123-45-6789",
	"+14155552671",
	"(555) 123-4567",
	"555.123.4567",
	JWT,
	"AKIAIOSFODNN7EXAMPLE",
	"aws_secret_access_key = " AWS_SECRET,
	PEM_RSA,
	"-----BEGIN PRIVATE KEY-----\\n",
	"-----END PRIVATE KEY-----",
	"\\n",
	"\\u00e9",
	"\"",
	"@",
	"eyJ",
	".",
	"-",
	" ",
	"+",
	"(",
	")",
	"0",
	"9",
	"\xc3\xa9",
	"\xe2\x82\xac",
	"secret_key=",
	"{\"a\":\"",
	"\"}",
	"1.5",
	"2024-01-15",
};

/* A random value: snippets, characters the detectors care about, random bytes, mutations. */
static size_t gen_value(uint8_t *buf, size_t cap)
{
	static const char alpha[] = "0123456789 -.+()@eyJAKISsecret:=\"\\n/_xyz\xc3\xa9";
	size_t len = rnd() % (cap + 1), n = 0;
	int mode = rnd() % 4;

	while (n < len) {
		uint64_t r = rnd();

		if (mode == 0 || r % 3 == 0) {
			const char *sn =
				snippets[(r >> 8) % (sizeof(snippets) / sizeof(snippets[0]))];
			size_t k = strlen(sn);

			if (k > len - n)
				k = len - n;
			memcpy(buf + n, sn, k);
			n += k;
		} else if (mode == 1 || r % 3 == 1) {
			buf[n++] = alpha[(r >> 8) % (sizeof(alpha) - 1)];
		} else {
			buf[n++] = r >> 16;
		}
	}
	/* a few byte flips, truncations and doubled bytes */
	for (int k = rnd() % 4; k > 0 && n; k--) {
		size_t at = rnd() % n;

		switch (rnd() % 3) {
		case 0:
			buf[at] ^= 1 << (rnd() % 8);
			break;
		case 1:
			n = at;
			break;
		default:
			if (at + 1 < n)
				buf[at + 1] = buf[at];
		}
	}
	return n;
}

/*
 * Mask one value with every style, as text and typed, whole and not: nothing fails, counts and
 * outputs agree, UTF-8 stays UTF-8, and what redaction leaves holds nothing a detector finds.
 */
static bool check_value(struct ag_masker **ms, const uint8_t *v, size_t n)
{
	bool valid = utf8_valid(v, n), ok = true;

	for (int s = 0; s < 4 && ok; s++) {
		struct ag_buf out = {}, again = {};
		bool is_null;
		int r;

		r = ag_mask_value(ms[s], false, AG_MASK_TEXT, v, n, &out, &is_null);
		ok = ASSERT_GE(r, 0, "text") && ASSERT_FALSE(is_null, "text never NULL");
		if (ok && r == 0)
			ok = ASSERT_EQ(ag_buf_len(&out), 0, "unchanged: out untouched");
		if (ok && r > 0 && valid)
			ok = ASSERT_TRUE(utf8_valid(ag_buf_head(&out), ag_buf_len(&out)),
					 "UTF-8 in, UTF-8 out");
		if (ok && r > 0 && s == 0) {
			r = ag_mask_value(ms[s], false, AG_MASK_TEXT, ag_buf_head(&out),
					  ag_buf_len(&out), &again, &is_null);
			ok = ASSERT_EQ(r, 0, "redacted text holds no detection");
			if (!ok)
				printf("in: %.*s\nout: %.*s\n", (int)(n < 300 ? n : 300), v,
				       (int)(ag_buf_len(&out) < 300 ? ag_buf_len(&out) : 300),
				       ag_buf_head(&out));
		}
		ag_buf_free(&again);
		ag_buf_free(&out);
		if (!ok)
			break;
		r = ag_mask_value(ms[s], false, AG_MASK_TYPED, v, n, &out, &is_null);
		ok = ASSERT_GE(r, 0, "typed") &&
		     ASSERT_EQ(is_null, r > 0, "typed: NULL or as is") &&
		     ASSERT_EQ(ag_buf_len(&out), 0, "typed: no text");
		r = ag_mask_value(ms[s], true, AG_MASK_TEXT, v, n, &out, &is_null);
		ok = ok && ASSERT_EQ(r, 1, "whole") && ASSERT_EQ(is_null, s == 3, "whole null");
		if (ok && s == 1 && valid)
			ok = ASSERT_TRUE(utf8_valid(ag_buf_head(&out), ag_buf_len(&out)),
					 "whole partial: UTF-8");
		ag_buf_free(&out);
	}
	return ok;
}

static void fill_repeat(uint8_t *buf, size_t n, const char *pat)
{
	size_t k = strlen(pat);

	for (size_t i = 0; i < n; i++)
		buf[i] = pat[i % k];
}

static double seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void subtest_robustness(void)
{
	static const char *const styles[] = { "redact", "partial", "hash", "null" };
	/* Hostile shapes for each scanner: runs that could make one quadratic. */
	static const char *const repeats[] = {
		"@",
		"a@",
		"x.y@",
		"a@b.co ",
		"1",
		"1 ",
		"4111 1111 1111 1111 ",
		"1-",
		"+1",
		"(555) ",
		"eyJ",
		"eyJhbGciOiJIUzI1NiJ9.",
		"AKIA",
		"secret_key=",
		"aws_secret_access_key: ",
		"-----BEGIN PRIVATE KEY-----",
		"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
		"\\",
		"\\n",
		".",
	};
	const size_t big = 1 << 20;
	struct ag_masker *ms[4] = {};
	uint8_t *buf = malloc(big);
	double base;

	if (!ASSERT_OK_PTR(buf, "buffer"))
		return;
	for (int s = 0; s < 4; s++) {
		static const char *const cols[] = { "*.*", NULL };
		static const char *const dets[] = { ALL_DETS, NULL };

		ms[s] = new_masker(styles[s], dets, cols, "robust");
		if (!ASSERT_OK_PTR(ms[s], styles[s]))
			goto out;
	}
	if (!check_value(ms, buf, 0))
		goto out;
	buf[0] = '@';
	if (!check_value(ms, buf, 1))
		goto out;
	for (int i = 0; i < 4000; i++) {
		size_t n = gen_value(buf, i % 10 == 0 ? 4096 : 256);

		if (!check_value(ms, buf, n)) {
			printf("value %d\n", i);
			goto out;
		}
	}
	/*
	 * 1 MB values: random bytes, then each hostile shape. A scanner gone quadratic would take
	 * hours on one of them; timed against the dense but linear card list, so the check holds
	 * under valgrind too.
	 */
	for (size_t i = 0; i < big; i++)
		buf[i] = rnd() >> 24;
	if (!check_value(ms, buf, big))
		goto out;
	fill_repeat(buf, big, "4111 1111 1111 1111 ");
	base = seconds();
	if (!check_value(ms, buf, big))
		goto out;
	base = seconds() - base;
	for (size_t i = 0; i < sizeof(repeats) / sizeof(repeats[0]); i++) {
		double t;

		fill_repeat(buf, big, repeats[i]);
		t = seconds();
		if (!check_value(ms, buf, big)) {
			printf("repeated: %s\n", repeats[i]);
			goto out;
		}
		t = seconds() - t;
		if (test__verbose())
			printf("1 MB of \"%s\": %.3f s (cards: %.3f s)\n", repeats[i], t, base);
		if (!ASSERT_LT(t, 10 * base + 0.1, repeats[i]))
			goto out;
	}
out:
	for (int s = 0; s < 4; s++)
		ag_masker_free(ms[s]);
	free(buf);
}

void test_mask_detectors(void)
{
	if (test__start_subtest("email"))
		subtest_email();
	if (test__start_subtest("credit_card"))
		subtest_credit_card();
	if (test__start_subtest("ssn"))
		subtest_ssn();
	if (test__start_subtest("phone"))
		subtest_phone();
	if (test__start_subtest("jwt"))
		subtest_jwt();
	if (test__start_subtest("aws_key"))
		subtest_aws_key();
	if (test__start_subtest("private_key"))
		subtest_private_key();
	if (test__start_subtest("positions"))
		subtest_positions();
	if (test__start_subtest("style_redact"))
		subtest_style_redact();
	if (test__start_subtest("style_partial"))
		subtest_style_partial();
	if (test__start_subtest("style_hash"))
		subtest_style_hash();
	if (test__start_subtest("style_null"))
		subtest_style_null();
	if (test__start_subtest("derived_values"))
		subtest_derived_values();
	if (test__start_subtest("typed_values"))
		subtest_typed_values();
	if (test__start_subtest("column_globs"))
		subtest_column_globs();
	if (test__start_subtest("inactive"))
		subtest_inactive();
	if (test__start_subtest("robustness"))
		subtest_robustness();
}
