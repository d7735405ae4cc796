// SPDX-License-Identifier: GPL-2.0
/*
 * protocol: http — HTTP/1.1 on both sides, parsed with http-parser (nodejs/http-parser), with
 * Kubernetes API semantics when the target says kubernetes: true.
 *
 * Every request's header block is read whole (64 KiB at most, 8 KiB a line), checked for what
 * request smuggling lives on (bare CR or LF, obsolete line folding, NUL and control bytes, both
 * Content-Length and Transfer-Encoding, a duplicate or invalid Content-Length, a
 * Transfer-Encoding other than chunked, an absolute-form target naming another host), parsed,
 * and decided against the rule's http: list before a byte of it goes upstream. What goes
 * upstream is rebuilt from what was parsed: the request line and headers as understood (the
 * agent's Authorization dropped, the gateway's credential added), the body re-framed from the
 * parser's decoded body, so the upstream reads exactly what was decided. A malformed request is
 * answered 400 and the connection closed; a refused one 403 (for Kubernetes a Status object),
 * and the connection stays usable.
 *
 * Pipelining: requests are queued in order (FIFO); each upstream response answers the oldest
 * forwarded one, and our own answers (403) wait for their turn, so the agent reads its answers
 * in the order it asked. HEAD, 1xx, 204 and 304 answers have no body; 1xx keeps the request
 * waiting for its final answer. An allowed upgrade (101) or CONNECT (2xx) turns the connection
 * into a relay both ways.
 *
 * Response bodies are passed on as they come (a watch stream is never buffered), re-framed;
 * JSON bodies are masked on the way (jsonmask.c: streamed with yajl), gzip and deflate inflated
 * with zlib first and sent on as identity, chunked (or close-delimited to an HTTP/1.0 agent).
 * The credential the gateway injects upstream never comes back: every byte for the agent (heads,
 * bodies decoded, the relay after an upgrade) goes through the session's scrubber (scrub.c).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <http_parser.h>
#include <yajl/yajl_gen.h>
#include <zlib.h>

#include "approval.h"
#include "audit.h"
#include "cred.h"
#include "daemon.h"
#include "httprule.h"
#include "jsonmask.h"
#include "k8s.h"
#include "log.h"
#include "mask.h"
#include "proto.h"
#include "proto_http.h"
#include "scrub.h"
#include "session.h"

#define HTTP_HEAD_MAX (64u << 10) /* a request's or response's whole header block */
#define HTTP_LINE_MAX (8u << 10)
#define HTTP_MAX_HEADERS 256
#define HTTP_QUEUE_MAX 1024 /* answers owed before we stop reading the agent */

enum a_state { A_HEAD = 0, A_BODY, A_WAIT, A_TUNNEL, A_DEAD, A_HELD };
enum u_state { U_HEAD = 0, U_BODY, U_TUNNEL, U_DEAD };

/* A request waiting for its answer, in the order the agent sent them. */
struct http_ent {
	struct http_ent *next;
	bool local;   /* answered by us: resp holds the answer */
	bool close;   /* the connection ends after this answer */
	bool head;    /* HEAD: the answer has no body */
	bool connect; /* CONNECT */
	bool upgrade; /* an upgrade was asked for (and allowed) */
	bool secrets; /* a Kubernetes secrets response: data masked */
	bool http10;  /* the agent spoke HTTP/1.0: no chunked framing to it */
	struct ag_buf resp;
};

struct http {
	http_parser rq, rs;
	const struct ag_policy_rule *rule;
	bool k8s;
	enum a_state astate;
	enum u_state ustate;

	/* the request being parsed: pointers into the input of the current call (worker_hdr) */
	struct ag_http_hdr *hdr;
	size_t nhdr;
	bool hdr_overflow, in_head, last_value, msg_done;
	const char *url;
	size_t urllen;
	bool body_forward, body_chunked; /* where the body of the current request goes */
	bool cur_close;			 /* the current request asked for Connection: close */

	/* the response being parsed */
	struct ag_http_hdr *rh; /* worker_rh */
	size_t nrh;
	bool rh_overflow, r_in_head, r_last_value, r_done;
	const char *reason;
	size_t reasonlen;
	bool r_chunked; /* to the agent: chunked framing */
	bool r_close;	/* close after this response */
	bool r_discard; /* the body is dropped (we answered in its place) */
	struct ag_jmask *jm;
	z_stream z;
	bool z_on;

	struct http_ent *qh, *qt; /* FIFO */
	size_t qn;
	struct http_ent *spare; /* the last one popped, for the next request: no malloc each */

	struct ag_buf *to; /* bytes for each side, sent once per input() call: the worker's */
	struct ag_buf scratch;
	int err; /* -errno while building output */

	/* masking */
	struct ag_masker *masker;
	char **keys;
	size_t nkeys;
	bool mask_json;	       /* the rule masks JSON bodies (keys or detectors) */
	bool secrets_unmasked; /* mask: { secrets: unmasked } */
	char cred[4096];       /* the Authorization value the gateway injects ("" none) */
	struct ag_scrub scrub; /* ... never goes back to the agent (scrub.c) */
	bool agent_eof;
	bool stalled; /* the queue of owed answers is full */
	bool shut[2]; /* FIN to that side after the output */
	uint64_t policy_gen;

	/* a request held for approval: its verdict, applied when it is parsed again */
	int verdict; /* -1: none; AG_ACT_ALLOW or AG_ACT_DENY */
	char verdict_rule[AG_NAME_MAX];
	char verdict_msg[256];
	struct ag_approval *held; /* the approval it waits for */
	char held_id[AG_APPROVAL_ID_MAX];
};

/*
 * What one input() (or eof()) call builds for each side is sent at its end (out_flush()), so
 * the buffers are empty between calls: one pair per worker thread serves all its sessions, with
 * no malloc and free of them per request and no memory held by an idle session.
 */
static __thread struct ag_buf worker_to[2];
/*
 * A head's header fields likewise: a head is parsed whole within one call (head_scan()) and its
 * fields are read before the call returns, so the worker's arrays serve all its sessions and an
 * idle session holds 16 KiB less. Each message's parse points its session at them again.
 */
static __thread struct ag_http_hdr worker_hdr[HTTP_MAX_HEADERS], worker_rh[HTTP_MAX_HEADERS];

static inline struct http *H(struct ag_session *s)
{
	return s->proto_state;
}

/* At the start of a call: this thread's pair, empty (never another session's leftovers). */
static void out_begin(struct http *h)
{
	h->to = worker_to;
	for (int i = 0; i < 2; i++)
		h->to[i].start = h->to[i].end = 0;
}

static inline void out_add(struct http *h, enum ag_side to, const void *p, size_t n)
{
	struct ag_buf *b = &h->to[to];

	/* the many small pieces of a head: into the worker's buffer with no call when it has room */
	if (!n || h->err)
		return;
	if (b->cap - b->end >= n) {
		memcpy(b->data + b->end, p, n);
		b->end += n;
		return;
	}
	if (ag_buf_append(b, p, n))
		h->err = -ENOMEM;
}

/* A header line, "name: value\r\n", with one reservation. */
static void out_hdr(struct http *h, enum ag_side to, const struct ag_http_hdr *x)
{
	size_t n = x->nlen + x->vlen + 4;
	uint8_t *w = h->err ? NULL : ag_buf_reserve(&h->to[to], n);

	if (!w) {
		h->err = h->err ? h->err : -ENOMEM;
		return;
	}
	memcpy(w, x->name, x->nlen);
	w += x->nlen;
	*w++ = ':';
	*w++ = ' ';
	if (x->vlen)
		memcpy(w, x->val, x->vlen);
	w += x->vlen;
	*w++ = '\r';
	*w = '\n';
	ag_buf_commit(&h->to[to], n);
}

static void out_printf(struct http *h, enum ag_side to, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* A chunk's size line ("%zx\r\n"), without printf: once per chunk of every re-framed body. */
static void out_chunk_size(struct http *h, enum ag_side to, size_t n)
{
	char buf[2 * sizeof(size_t) + 2];
	size_t i = sizeof(buf);

	buf[--i] = '\n';
	buf[--i] = '\r';
	do {
		buf[--i] = "0123456789abcdef"[n & 15];
		n >>= 4;
	} while (n);
	out_add(h, to, buf + i, sizeof(buf) - i);
}

/* A small decimal (a status code, an HTTP version digit), without printf. */
static void out_uint(struct http *h, enum ag_side to, unsigned int v)
{
	char buf[12];
	size_t i = sizeof(buf);

	do {
		buf[--i] = '0' + v % 10;
		v /= 10;
	} while (v);
	out_add(h, to, buf + i, sizeof(buf) - i);
}

static void out_printf(struct http *h, enum ag_side to, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > 0)
		out_add(h, to, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/*
 * Sends what was built for both sides, then the FINs asked for; -1 when the session ended (the
 * handler's state is gone then: return at once). The only place output leaves the handler.
 */
static int out_flush(struct ag_session *s)
{
	struct http *h = H(s);

	if (h->err) {
		ag_session_fail(s, true, "http: %s", strerror(-h->err));
		return -1;
	}
	for (int i = 0; i < 2; i++) {
		struct ag_buf *b = &h->to[i];
		int rc;

		if (!ag_buf_len(b))
			continue;
		rc = ag_session_send(s, i, ag_buf_head(b), ag_buf_len(b));
		b->start = b->end = 0;
		if (b->cap > (256u << 10))
			ag_buf_free(b); /* a big body's: not kept */
		if (rc) {
			ag_session_fail(s, true, "http: relay to %s: %s",
					i == AG_SIDE_AGENT ? "agent" : "upstream",
					rc == -EPIPE ? "peer closed" : strerror(-rc));
			return -1;
		}
	}
	for (int i = 0; i < 2; i++)
		if (h->shut[i])
			ag_session_shutdown(s, i);
	return 0;
}

static int policy_refresh(struct ag_session *s);

/* --- hooks for the credential and approval modules ---------------------------------------- */

/*
 * The Authorization value the gateway injects upstream for this session (the target's jwt or
 * static credential, cred.c: minted once per session, ES256 signing is quick enough for the
 * loop), written to out; its length, 0 for none. The agent's own Authorization is always dropped.
 */
static size_t http_cred_authorization(struct ag_session *s, char *out, size_t len)
{
	char err[160];
	int n;

	out[0] = '\0';
	if (!s->target || !s->target->credential)
		return 0;
	n = ag_cred_bearer(s, out, len, err, sizeof(err));
	if (n < 0) {
		out[0] = '\0';
		if (n != -ENOENT)
			pr_warn("session %llu: no credential for target %s: %s",
				(unsigned long long)s->id, s->target_name, err);
		return 0;
	}
	return (size_t)n;
}

/*
 * What an approval of this request covers when granted by fingerprint: the request's shape, not
 * its instance. For Kubernetes the method and the API server's attributes (verb, group,
 * resource, subresource, namespace); otherwise the method and the path with its identifiers
 * (numbers, long hex or UUID segments) made wildcards. FNV-1a, 64 bits, never 0.
 */
static uint64_t fp_add(uint64_t h, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= (unsigned char)p[i];
		h *= 0x100000001b3ULL;
	}
	h ^= 0xff; /* a separator: ("ab", "c") is not ("a", "bc") */
	return h * 0x100000001b3ULL;
}

static bool id_segment(const char *p, size_t n)
{
	size_t digits = 0, hex = 0;

	for (size_t i = 0; i < n; i++) {
		if (isdigit((unsigned char)p[i]))
			digits++;
		if (isxdigit((unsigned char)p[i]) || p[i] == '-')
			hex++;
	}
	return n && (digits == n || (hex == n && n >= 8 && digits));
}

static uint64_t http_fingerprint(const char *method, const char *path, const struct ag_k8s_req *k)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	h = fp_add(h, "http", 4);
	h = fp_add(h, method, strlen(method));
	if (k && k->resource_request) {
		h = fp_add(h, k->verb, strlen(k->verb));
		h = fp_add(h, k->group, strlen(k->group));
		h = fp_add(h, k->resource, strlen(k->resource));
		h = fp_add(h, k->subresource, strlen(k->subresource));
		h = fp_add(h, k->ns, strlen(k->ns));
	} else {
		const char *p = path, *q = strchr(path, '?');
		const char *end = q ? q : path + strlen(path);

		while (p < end) {
			const char *seg = p, *e = memchr(p, '/', end - p);

			if (!e)
				e = end;
			if (id_segment(seg, e - seg))
				h = fp_add(h, "{id}", 4);
			else
				h = fp_add(h, seg, e - seg);
			p = e < end ? e + 1 : end;
		}
	}
	return h ? h : 1;
}

static void http_approval_cb(struct ag_session *s, void *arg, const struct ag_approval_info *a);

/*
 * A request a rule sends for approval (d->rule), described by what ("METHOD PATH"): an approval
 * is opened and the request held (true); its bytes stay buffered in the session and nothing more
 * is read from the agent until http_approval_cb() brings the decision, on this session's worker.
 * False: it could not be opened, refused now with msg.
 */
static bool http_approval_hold(struct ag_session *s, const struct ag_http_decision *d,
			       const char *what, uint64_t fp, char *msg, size_t len)
{
	struct http *h = H(s);

	h->held = ag_approval_request(s, "http", what, strlen(what), d->rule ? d->rule : "default",
				      fp, http_approval_cb, NULL, h->held_id);
	if (!h->held) {
		snprintf(msg, len, "agentgate: approval required by rule %s, and none could be "
			 "opened (%s)", d->rule ? d->rule : "default", strerror(errno));
		return false;
	}
	return true;
}

/*
 * The credential for this request: cred.c keeps the session's token and mints a new one before
 * the old one nears its expiry, so a long keep-alive session never sends an expired token.
 */
static void cred_refresh(struct ag_session *s, struct http *h)
{
	http_cred_authorization(s, h->cred, sizeof(h->cred));
	if (h->cred[0] && ag_scrub_set(&h->scrub, h->cred) && !h->err)
		h->err = -ENOMEM;
}

/* --- our own answers ------------------------------------------------------------------------ */

static void gen_str(yajl_gen g, const char *s)
{
	yajl_gen_string(g, (const unsigned char *)s, strlen(s));
}

static void gen_kv(yajl_gen g, const char *k, const char *v)
{
	gen_str(g, k);
	gen_str(g, v);
}

/*
 * A 403 or 400 answer in resp: a JSON body, for Kubernetes a Status object (reason Forbidden
 * or BadRequest) so that kubectl prints it as an error from the server.
 */
static void local_answer(struct http *h, struct ag_buf *resp, int code, const char *msg,
			 const char *rule, const struct ag_k8s_req *k, bool head, bool close)
{
	const char *reason = code == 403 ? "Forbidden" : code == 400 ? "BadRequest" : "BadGateway";
	const unsigned char *body;
	size_t blen;
	char hdr[512];
	yajl_gen g = yajl_gen_alloc(NULL);
	int n;

	if (!g) {
		h->err = -ENOMEM;
		return;
	}
	yajl_gen_map_open(g);
	if (h->k8s) {
		gen_kv(g, "kind", "Status");
		gen_kv(g, "apiVersion", "v1");
		gen_str(g, "metadata");
		yajl_gen_map_open(g);
		yajl_gen_map_close(g);
		gen_kv(g, "status", "Failure");
		gen_kv(g, "message", msg);
		gen_kv(g, "reason", reason);
		if (k && k->resource_request) {
			gen_str(g, "details");
			yajl_gen_map_open(g);
			if (k->name[0])
				gen_kv(g, "name", k->name);
			if (k->group[0])
				gen_kv(g, "group", k->group);
			gen_kv(g, "kind", k->resource);
			yajl_gen_map_close(g);
		}
		gen_str(g, "code");
		yajl_gen_integer(g, code);
	} else {
		gen_kv(g, "error",
		       code == 403   ? "forbidden"
		       : code == 400 ? "bad_request"
				     : "bad_gateway");
		gen_kv(g, "message", msg);
		if (rule)
			gen_kv(g, "rule", rule);
		gen_str(g, "code");
		yajl_gen_integer(g, code);
	}
	yajl_gen_map_close(g);
	yajl_gen_get_buf(g, &body, &blen);
	n = snprintf(hdr, sizeof(hdr),
		     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
		     "Cache-Control: no-store\r\nX-Agentgate: %s\r\n%s\r\n",
		     code,
		     code == 403   ? "Forbidden"
		     : code == 400 ? "Bad Request"
				   : "Bad Gateway",
		     blen + 1, code == 403 ? "blocked" : "refused",
		     close ? "Connection: close\r\n" : "");
	if (ag_buf_append(resp, hdr, n) ||
	    (!head && (ag_buf_append(resp, body, blen) || ag_buf_append(resp, "\n", 1))))
		h->err = -ENOMEM;
	yajl_gen_free(g);
}

static void ent_free(struct http_ent *e)
{
	ag_buf_free(&e->resp);
	free(e);
}

static struct http_ent *ent_push(struct http *h)
{
	struct http_ent *e = h->spare;

	if (e) {
		struct ag_buf resp = e->resp;

		h->spare = NULL;
		memset(e, 0, sizeof(*e));
		e->resp = resp;
		e->resp.start = e->resp.end = 0;
	} else {
		e = calloc(1, sizeof(*e));
	}
	if (!e) {
		h->err = -ENOMEM;
		return NULL;
	}
	if (h->qt)
		h->qt->next = e;
	else
		h->qh = e;
	h->qt = e;
	h->qn++;
	return e;
}

static void ent_pop(struct http *h)
{
	struct http_ent *e = h->qh;

	h->qh = e->next;
	if (!h->qh)
		h->qt = NULL;
	h->qn--;
	if (h->spare)
		ent_free(e);
	else
		h->spare = e;
}

/*
 * Both directions end once what is queued is written (out_flush() shuts them after sending):
 * nothing here ends the session, so callers may go on using the handler's state.
 */
static void close_both(struct ag_session *s)
{
	struct http *h = H(s);

	h->astate = A_DEAD;
	h->ustate = U_DEAD;
	h->shut[AG_SIDE_AGENT] = h->shut[AG_SIDE_UPSTREAM] = true;
}

/* Our answers at the head of the queue go out now (their turn came). */
static void queue_flush(struct ag_session *s)
{
	struct http *h = H(s);

	while (h->qh && h->qh->local) {
		struct http_ent *e = h->qh;
		bool close = e->close;

		out_add(h, AG_SIDE_AGENT, ag_buf_head(&e->resp), ag_buf_len(&e->resp));
		ag_audit_http_local(s, ag_buf_head(&e->resp), ag_buf_len(&e->resp));
		ent_pop(h);
		if (close) {
			close_both(s);
			return;
		}
	}
	if (!h->qh && h->agent_eof && h->astate != A_TUNNEL)
		h->shut[AG_SIDE_AGENT] = true;
}

/*
 * Malformed input from the agent: 400 and the connection closed, nothing of it forwarded.
 * Answers still owed for earlier requests are given up (the upstream side is closed too).
 */
static long bad_request(struct ag_session *s, const char *why)
{
	struct http *h = H(s);
	struct ag_buf resp = { 0 };
	char msg[256];

	snprintf(msg, sizeof(msg), "agentgate: malformed request refused: %s", why);
	pr_info("session %llu: %s", (unsigned long long)s->id, msg + 11);
	s->blocked++;
	local_answer(h, &resp, 400, msg, NULL, NULL, false, true);
	/* in the middle of a response, a 400 would corrupt it: then only the close says it */
	if (h->ustate != U_BODY)
		out_add(h, AG_SIDE_AGENT, ag_buf_head(&resp), ag_buf_len(&resp));
	ag_buf_free(&resp);
	h->to[AG_SIDE_UPSTREAM].start = h->to[AG_SIDE_UPSTREAM].end = 0; /* nothing goes up */
	close_both(s);
	return 0;
}

/* --- parsing callbacks ------------------------------------------------------------------------ */

static int hdr_field(struct ag_http_hdr *a, size_t *n, bool *overflow, bool *last_value,
		     const char *at, size_t len)
{
	if (*last_value || !*n) {
		if (*n == HTTP_MAX_HEADERS) {
			*overflow = true;
			return 0;
		}
		a[(*n)++] = (struct ag_http_hdr){ .name = at, .nlen = len };
	} else {
		a[*n - 1].nlen += len; /* continued: the block is contiguous */
	}
	*last_value = false;
	return 0;
}

static int hdr_value(struct ag_http_hdr *a, size_t n, bool overflow, bool *last_value,
		     const char *at, size_t len)
{
	if (overflow || !n)
		return 0;
	if (!*last_value) {
		a[n - 1].val = at;
		a[n - 1].vlen = len;
	} else {
		a[n - 1].vlen += len;
	}
	*last_value = true;
	return 0;
}

static int rq_begin(http_parser *p)
{
	struct http *h = H(p->data);

	h->hdr = worker_hdr;
	h->nhdr = 0;
	h->hdr_overflow = h->last_value = h->msg_done = false;
	h->in_head = true;
	h->url = NULL;
	h->urllen = 0;
	return 0;
}

static int rq_url(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->url)
		h->url = at;
	h->urllen = at + len - h->url;
	return 0;
}

static int rq_field(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->in_head)
		return 0; /* trailers: dropped */
	return hdr_field(h->hdr, &h->nhdr, &h->hdr_overflow, &h->last_value, at, len);
}

static int rq_value(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->in_head)
		return 0;
	return hdr_value(h->hdr, h->nhdr, h->hdr_overflow, &h->last_value, at, len);
}

static int rq_headers_done(http_parser *p)
{
	H(p->data)->in_head = false;
	return 0;
}

static int rq_body(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->body_forward || !len)
		return 0;
	if (h->body_chunked)
		out_chunk_size(h, AG_SIDE_UPSTREAM, len);
	out_add(h, AG_SIDE_UPSTREAM, at, len);
	if (h->body_chunked)
		out_add(h, AG_SIDE_UPSTREAM, "\r\n", 2);
	return 0;
}

static int rq_done(http_parser *p)
{
	struct http *h = H(p->data);

	h->msg_done = true;
	if (h->astate == A_BODY && h->body_forward && h->body_chunked)
		out_add(h, AG_SIDE_UPSTREAM, "0\r\n\r\n", 5);
	http_parser_pause(p, 1); /* the next request's head is checked before it is parsed */
	return 0;
}

static const http_parser_settings rq_settings = {
	.on_message_begin = rq_begin,
	.on_url = rq_url,
	.on_header_field = rq_field,
	.on_header_value = rq_value,
	.on_headers_complete = rq_headers_done,
	.on_body = rq_body,
	.on_message_complete = rq_done,
};

/* Has the word at p a byte below 0x20 (HT included: the table decides) or a DEL? Exact. */
static inline bool ctl_in_word(const uint8_t *p)
{
	const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
	uint64_t x, d;

	memcpy(&x, p, 8);
	d = x ^ (ones * 0x7f);
	return (((x - ones * 0x20) & ~x) | ((d - ones) & ~d)) & high;
}

/*
 * The header block at p: 1 when complete (*hlen bytes with the empty line), 0 when more is
 * needed, -1 when it is malformed (*why): bare CR or LF, obsolete line folding, NUL or control
 * bytes, a line over 8 KiB, over 64 KiB in all, too many headers.
 */
static int head_scan(const uint8_t *p, size_t len, size_t *hlen, const char **why)
{
	/* Bytes that end a line or are refused in a header: CR, LF, NUL, controls but HT, DEL. */
	static const uint8_t special[256] = {
		[0 ... 8] = 1, [10 ... 31] = 1, [127] = 1,
	};
	size_t i = 0, line = 0, lines = 0, lim = len < HTTP_HEAD_MAX ? len : HTTP_HEAD_MAX;

	while (i + 1 < len && p[i] == '\r' && p[i + 1] == '\n' && i < 64)
		i += 2; /* empty lines before a request are allowed (RFC 9112 2.2) */
	line = i;
	for (; i < len; i++) {
		uint8_t c;

		/* the plain bytes of a line, up to its 8 KiB and the block's 64 KiB */
		{
			size_t stop = line + HTTP_LINE_MAX + 1 < lim ? line + HTTP_LINE_MAX + 1 : lim;

			for (;;) {
				size_t e;

				/* 8 at a time while none is below 0x20 or DEL */
				while (i + 8 <= stop && !ctl_in_word(p + i))
					i += 8;
				e = i + 8 <= stop ? i + 8 : stop;
				while (i < e && !special[p[i]])
					i++;
				if (i >= stop || special[p[i]])
					break;
			}
		}
		if (i >= len)
			break;
		if (i >= HTTP_HEAD_MAX) {
			*why = "header block over 64 KiB";
			return -1;
		}
		if (i - line > HTTP_LINE_MAX) {
			*why = "header line over 8 KiB";
			return -1;
		}
		c = p[i];
		if (c == '\r') {
			if (i + 1 >= len)
				return 0;
			if (p[i + 1] != '\n') {
				*why = "CR without LF in the header";
				return -1;
			}
			if (i == line) {
				if (!lines) {
					*why = "empty request line";
					return -1;
				}
				*hlen = i + 2;
				return 1;
			}
			if (lines && (p[line] == ' ' || p[line] == '\t')) {
				*why = "obsolete line folding in the header";
				return -1;
			}
			if (++lines > HTTP_MAX_HEADERS) {
				*why = "too many header fields";
				return -1;
			}
			i++;
			line = i + 1;
			continue;
		}
		if (c == '\n') {
			*why = "bare LF in the header";
			return -1;
		}
		if (!c) {
			*why = "NUL byte in the header";
			return -1;
		}
		*why = "control character in the header";
		return -1;
	}
	if (len >= HTTP_HEAD_MAX) {
		*why = "header block over 64 KiB";
		return -1;
	}
	return 0;
}

static bool hdr_is(const struct ag_http_hdr *h, const char *name)
{
	size_t n = strlen(name);

	return h->nlen == n && !strncasecmp(h->name, name, n);
}

static void trim(const char **v, size_t *n)
{
	while (*n && (**v == ' ' || **v == '\t')) {
		(*v)++;
		(*n)--;
	}
	while (*n && ((*v)[*n - 1] == ' ' || (*v)[*n - 1] == '\t'))
		(*n)--;
}

/* Framing checks beyond the parser's: what smuggling needs two parsers to disagree on. */
static const char *framing_check(struct http *h, const http_parser *p)
{
	size_t ncl = 0, nte = 0, nhost = 0;

	for (size_t i = 0; i < h->nhdr; i++) {
		const struct ag_http_hdr *x = &h->hdr[i];
		const char *v = x->val;
		size_t vl = x->vlen;

		trim(&v, &vl);
		if (hdr_is(x, "content-length")) {
			if (ncl++)
				return "duplicate Content-Length";
			if (!vl || vl > 18)
				return "invalid Content-Length";
			for (size_t k = 0; k < vl; k++)
				if (!isdigit((unsigned char)v[k]))
					return "invalid Content-Length";
		} else if (hdr_is(x, "transfer-encoding")) {
			if (nte++)
				return "duplicate Transfer-Encoding";
			if (vl != 7 || strncasecmp(v, "chunked", 7))
				return "Transfer-Encoding other than chunked";
		} else if (hdr_is(x, "host")) {
			if (nhost++)
				return "duplicate Host";
		} else if (x->nlen == 0) {
			return "empty header name";
		}
	}
	if (ncl && nte)
		return "both Content-Length and Transfer-Encoding";
	if (nte && p->http_minor == 0)
		return "Transfer-Encoding in an HTTP/1.0 request";
	if (p->http_major != 1 || p->http_minor > 1)
		return "unsupported HTTP version";
	if (!nhost && p->http_minor == 1)
		return "HTTP/1.1 request without Host";
	return NULL;
}

/* --- requests ------------------------------------------------------------------------------- */

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/*
 * The path as rules see it: percent-encoded unreserved characters decoded (RFC 3986 6.2.2.2:
 * the same resource, so /adm%69n is /admin to a rule). A path two servers could read as two
 * different resources is refused instead (the reason returned): dot segments, an encoded '/',
 * '\\' or NUL, an empty segment ("//"), bad percent-encoding, too long.
 */
static const char *path_canon(const char *in, size_t n, char *out, size_t outlen)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		char c = in[i];

		if (c == '%') {
			int hi = i + 2 < n ? hexval(in[i + 1]) : -1;
			int lo = i + 2 < n ? hexval(in[i + 2]) : -1;

			if (hi < 0 || lo < 0)
				return "bad percent-encoding in the path";
			c = (char)(hi << 4 | lo);
			if (!(isalnum((unsigned char)c) || c == '-' || c == '.' || c == '_' ||
			      c == '~')) {
				if (c == '/' || c == '\\' || !c)
					return "encoded '/', '\\' or NUL in the path";
				if (o + 3 >= outlen)
					return "path too long";
				memcpy(out + o, in + i, 3); /* reserved: stays encoded */
				o += 3;
				i += 2;
				continue;
			}
			i += 2;
		} else if (c == '\\') {
			return "'\\' in the path";
		}
		if (o + 1 >= outlen)
			return "path too long";
		out[o++] = c;
	}
	out[o] = '\0';
	for (const char *p = out; *p; p++) {
		if (*p != '/')
			continue;
		if (p[1] == '/')
			return "empty segment ('//') in the path";
		if (p[1] == '.' &&
		    (p[2] == '/' || !p[2] || (p[2] == '.' && (p[3] == '/' || !p[3]))))
			return "dot segment in the path";
	}
	return NULL;
}

static const char *hdr_get(struct http *h, const char *name, size_t *vl)
{
	const char *v;

	if (!ag_http_header(h->hdr, h->nhdr, name, &v, vl))
		return NULL;
	trim(&v, vl);
	return v;
}

/* Writes the request as it goes upstream: request line, kept headers, the injected credential. */
static void forward_head(struct ag_session *s, const char *method, const char *target, size_t tlen,
			 const char *host_from_url)
{
	struct http *h = H(s);
	bool dropped = false;

	cred_refresh(s, h);
	out_add(h, AG_SIDE_UPSTREAM, method, strlen(method));
	out_add(h, AG_SIDE_UPSTREAM, " ", 1);
	out_add(h, AG_SIDE_UPSTREAM, target, tlen);
	/* framing_check() let only HTTP/1.0 and 1.1 through */
	out_add(h, AG_SIDE_UPSTREAM, h->rq.http_minor ? " HTTP/1.1\r\n" : " HTTP/1.0\r\n", 11);
	if (host_from_url)
		out_printf(h, AG_SIDE_UPSTREAM, "Host: %s\r\n", host_from_url);
	for (size_t i = 0; i < h->nhdr; i++) {
		const struct ag_http_hdr *x = &h->hdr[i];

		if (hdr_is(x, "authorization") || hdr_is(x, "proxy-authorization")) {
			dropped = true;
			continue;
		}
		if (h->k8s && hdr_is(x, "accept") && memmem(x->val, x->vlen, "protobuf", 8)) {
			/* Masking reads JSON: the API server is asked for JSON only. */
			out_add(h, AG_SIDE_UPSTREAM, "Accept: application/json\r\n", 26);
			continue;
		}
		/*
		 * With our credential upstream, nothing that would bring its reflection back in a
		 * form the scrubber cannot read whole: transfer codings, byte ranges (the token in
		 * pieces), compressed WebSocket frames.
		 */
		if (h->cred[0] && (hdr_is(x, "te") || hdr_is(x, "range") || hdr_is(x, "if-range") ||
				   hdr_is(x, "sec-websocket-extensions")))
			continue;
		if (h->cred[0] && hdr_is(x, "accept-encoding")) {
			/* the answer is scrubbed of our credential: only encodings we can inflate */
			static const char ae[] = "Accept-Encoding: gzip, deflate\r\n";

			out_add(h, AG_SIDE_UPSTREAM, ae, sizeof(ae) - 1);
			continue;
		}
		out_hdr(h, AG_SIDE_UPSTREAM, x);
	}
	if (h->cred[0]) {
		/* a JWT is longer than out_printf()'s buffer */
		out_add(h, AG_SIDE_UPSTREAM, "Authorization: ", 15);
		out_add(h, AG_SIDE_UPSTREAM, h->cred, strlen(h->cred));
		out_add(h, AG_SIDE_UPSTREAM, "\r\n", 2);
	}
	out_add(h, AG_SIDE_UPSTREAM, "\r\n", 2);
	if (dropped) {
		pr_info("session %llu: the agent's Authorization header was dropped%s",
			(unsigned long long)s->id,
			h->cred[0] ? " (the gateway's credential sent)" : "");
		ag_slog_note(ag_d, s, "authorization_dropped",
			     h->cred[0] ? "the agent's Authorization header was replaced by the "
					  "gateway's credential"
					: "the agent's Authorization header was dropped");
	}
}

/* The header block of a request was parsed: decide it, forward it or answer it. */
static long request_head(struct ag_session *s, const char *method)
{
	struct http *h = H(s);
	struct http_parser_url u;
	struct ag_k8s_req k8s;
	struct ag_http_decision d;
	struct ag_http_req r = { .method = method };
	struct http_ent *e;
	char host[256] = "", urlhost[300] = "", path[HTTP_LINE_MAX + 1], msg[512];
	const char *why, *v, *tgt = h->url;
	size_t vl, tlen = h->urllen;
	bool upgrade = h->rq.upgrade, has_body, expect = false, refuse = false, held = false;
	int minor = h->rq.http_minor;

	why = framing_check(h, &h->rq);
	if (why)
		return bad_request(s, why);
	if (!tgt || !tlen)
		return bad_request(s, "no request target");
	v = hdr_get(h, "host", &vl);
	if (v) {
		if (vl >= sizeof(host))
			return bad_request(s, "Host too long");
		memcpy(host, v, vl);
		host[vl] = '\0';
	}
	has_body = (h->rq.flags & F_CHUNKED) ||
		   (h->rq.content_length > 0 && h->rq.content_length != ULLONG_MAX);
	if (h->rq.method == HTTP_CONNECT) {
		upgrade = true;
		http_parser_url_init(&u);
		if (http_parser_parse_url(tgt, tlen, 1, &u))
			return bad_request(s, "invalid CONNECT target");
		snprintf(path, sizeof(path), "%.*s", (int)tlen, tgt);
	} else {
		http_parser_url_init(&u);
		if (http_parser_parse_url(tgt, tlen, 0, &u))
			return bad_request(s, "invalid request target");
		if (u.field_set & (1 << UF_HOST)) {
			/* absolute-form: the Host header must agree; origin-form goes upstream */
			size_t hl = u.field_data[UF_HOST].len;
			const char *uh = tgt + u.field_data[UF_HOST].off;

			if (u.field_set & (1 << UF_PORT))
				hl = u.field_data[UF_PORT].off + u.field_data[UF_PORT].len -
				     u.field_data[UF_HOST].off;
			if (hl >= sizeof(urlhost))
				return bad_request(s, "host in the request target too long");
			snprintf(urlhost, sizeof(urlhost), "%.*s", (int)hl, uh);
			if (host[0] && strcasecmp(host, urlhost))
				return bad_request(s,
						   "absolute-form target names another host than "
						   "Host");
			if (!(u.field_set & (1 << UF_PATH)))
				return bad_request(s, "absolute-form target without a path");
			tgt += u.field_data[UF_PATH].off;
			tlen -= u.field_data[UF_PATH].off;
			if (u.field_set & (1 << UF_FRAGMENT))
				tlen = u.field_data[UF_FRAGMENT].off - 1 -
				       u.field_data[UF_PATH].off;
			if (!host[0])
				snprintf(host, sizeof(host), "%s", urlhost);
			else
				urlhost[0] = '\0';
		} else if (tgt[0] != '/' && !(tlen == 1 && tgt[0] == '*')) {
			return bad_request(s, "invalid request target");
		} else {
			urlhost[0] = '\0';
		}
		if (u.field_set & (1 << UF_PATH))
			why = path_canon(h->url + u.field_data[UF_PATH].off,
					 u.field_data[UF_PATH].len, path, sizeof(path));
		else
			why = path_canon(tgt, tlen, path, sizeof(path));
		if (why)
			return bad_request(s, why);
	}
	if (upgrade && has_body)
		return bad_request(s, "upgrade request with a body");
	v = hdr_get(h, "expect", &vl);
	if (v) {
		if (vl != 12 || strncasecmp(v, "100-continue", 12))
			return bad_request(s, "unsupported Expect");
		expect = true;
	}
	h->cur_close = !http_should_keep_alive(&h->rq);

	r.host = host;
	r.path = path;
	r.hdrs = h->hdr;
	r.nhdrs = h->nhdr;
	r.upgrade = upgrade;
	for (size_t i = 0; i < h->nhdr; i++)
		if (h->hdr[i].nlen > 12 && !strncasecmp(h->hdr[i].name, "impersonate-", 12))
			r.impersonate = true;
	if (h->k8s) {
		/* the canonical path, and the query as sent */
		const char *q = memchr(tgt, '?', tlen);
		size_t pl = strlen(path);

		if (q && pl + (tgt + tlen - q) < sizeof(path)) {
			memcpy(path + pl, q, tgt + tlen - q);
			path[pl + (tgt + tlen - q)] = '\0';
		}
		ag_k8s_parse(method, path, strlen(path), &k8s);
		path[pl] = '\0';
		r.k8s = &k8s;
	}
	msg[0] = '\0';
	if (h->verdict >= 0) {
		/* held for approval, and the answer came: parsed again, decided by it */
		memset(&d, 0, sizeof(d));
		d.action = h->verdict;
		d.rule = h->verdict_rule;
		snprintf(d.why, sizeof(d.why), "approval %s (rule %s)",
			 d.action == AG_ACT_ALLOW ? "granted" : "refused", h->verdict_rule);
		if (d.action == AG_ACT_DENY)
			snprintf(msg, sizeof(msg), "%s", h->verdict_msg);
		h->verdict = -1;
	} else {
		ag_http_decide(h->rule, &r, &d);
		s->statements++;
	}
	if (d.action == AG_ACT_DENY) {
		if (!msg[0])
			snprintf(msg, sizeof(msg), "agentgate: blocked by rule %s",
				 d.rule ? d.rule : "default (no rule allows this request)");
		refuse = true;
	} else if (d.action == AG_ACT_APPROVE && !s->observe) {
		char what[300], grant[AG_APPROVAL_ID_MAX];
		uint64_t fp = http_fingerprint(method, path, h->k8s ? &k8s : NULL);

		if (ag_approval_granted(s, d.rule, fp, grant)) {
			pr_info("session %llu: %s %s passes by the grant of approval %s (rule %s)",
				(unsigned long long)s->id, method, path, grant,
				d.rule ? d.rule : "default");
			d.action = AG_ACT_ALLOW;
		} else {
			snprintf(what, sizeof(what), "%s %s", method, path);
			held = http_approval_hold(s, &d, what, fp, msg, sizeof(msg));
			if (held) {
				snprintf(h->verdict_rule, sizeof(h->verdict_rule), "%s",
					 d.rule ? d.rule : "default");
				h->astate = A_HELD;
				pr_info("session %llu: %s held for approval %s (rule %s)",
					(unsigned long long)s->id, what, h->held_id,
					h->verdict_rule);
				return 0;
			}
			refuse = true;
		}
	}

	e = ent_push(h);
	if (!e)
		return -1;
	e->head = h->rq.method == HTTP_HEAD;
	e->connect = h->rq.method == HTTP_CONNECT;
	e->http10 = minor == 0;
	e->close = h->cur_close;
	e->secrets = h->k8s && !h->secrets_unmasked && k8s.resource_request &&
		     !strcmp(k8s.resource, "secrets");

	if (refuse && s->observe) {
		pr_info("session %llu: observe mode, would refuse %s %s: %s",
			(unsigned long long)s->id, method, path, d.why);
		refuse = false;
	}
	if (h->k8s && msg[0] && k8s.resource_request) {
		size_t n = strlen(msg);

		snprintf(msg + n, sizeof(msg) - n, ": %s %s%s%s%s%s%s%s", k8s.verb,
			 k8s.group[0] ? k8s.group : "", k8s.group[0] ? "/" : "", k8s.resource,
			 k8s.subresource[0] ? "/" : "", k8s.subresource,
			 k8s.ns[0] ? " in namespace " : "", k8s.ns);
	}
	ag_audit_http_request(s, method, path, host, h->k8s ? &k8s : NULL, &d, refuse, msg);
	if (refuse) {
		s->blocked++;
		pr_info("session %llu: %s %s refused: %s", (unsigned long long)s->id, method, path,
			d.why);
		e->local = true;
		/*
		 * A body the agent will not send (Expect: 100-continue) or an upgrade leaves the
		 * framing unknown to the agent: close after the answer.
		 */
		if ((expect && has_body) || h->cur_close)
			e->close = true;
		local_answer(h, &e->resp, 403, msg, d.rule, h->k8s ? &k8s : NULL, e->head,
			     e->close);
		h->body_forward = false;
		queue_flush(s);
		return 0;
	}
	if (d.action == AG_ACT_OBSERVE)
		pr_info("session %llu: %s %s observed by rule %s", (unsigned long long)s->id,
			method, path, d.rule);
	e->upgrade = upgrade;
	h->body_forward = true;
	h->body_chunked = h->rq.flags & F_CHUNKED;
	forward_head(s, method, tgt, tlen, urlhost[0] ? urlhost : NULL);
	return 0;
}

/* What the agent sent: header blocks checked and decided, bodies streamed after an allow. */
static long agent_process(struct ag_session *s, const uint8_t *data, size_t len)
{
	struct http *h = H(s);
	size_t off = 0;

	s->side[AG_SIDE_AGENT].hold = 0;
	while (off < len) {
		const uint8_t *p = data + off;
		size_t avail = len - off, hlen, n;
		const char *why;
		enum http_errno he;
		int rc;

		switch (h->astate) {
		case A_DEAD:
			return len; /* after Connection: close or a refusal: nothing more is read */
		case A_WAIT:
			return off; /* kept until the upgrade's answer says what follows */
		case A_HELD:
			return off; /* kept until the approval comes back */
		case A_TUNNEL:
			out_add(h, AG_SIDE_UPSTREAM, p, avail);
			return len;
		case A_HEAD:
			if (h->qn >= HTTP_QUEUE_MAX) {
				/* a pipeline far ahead of its answers: read on once they come */
				if (!h->stalled)
					pr_debug("session %llu: %zu answers owed: the agent waits",
						 (unsigned long long)s->id, h->qn);
				h->stalled = true;
				return off;
			}
			h->stalled = false;
			rc = head_scan(p, avail, &hlen, &why);
			if (rc < 0)
				return bad_request(s, why);
			if (!rc) {
				s->side[AG_SIDE_AGENT].hold = HTTP_HEAD_MAX;
				return off;
			}
			http_parser_pause(&h->rq, 0);
			n = http_parser_execute(&h->rq, &rq_settings, (const char *)p, hlen);
			he = HTTP_PARSER_ERRNO(&h->rq);
			if ((he != HPE_OK && he != HPE_PAUSED) || n != hlen) {
				if (he == HPE_OK || he == HPE_PAUSED)
					return bad_request(s, "trailing bytes in the header block");
				return bad_request(s, http_errno_description(he));
			}
			if (h->hdr_overflow)
				return bad_request(s, "too many header fields");
			rc = policy_refresh(s);
			if (rc) {
				ag_session_fail(s, false, "http: the policy was reloaded and %s",
						rc == -ESRCH ? "the target is gone"
							     : strerror(-rc));
				return -1;
			}
			if (!h->url || h->in_head)
				return bad_request(s, "incomplete header block");
			{
				bool upgrade = h->rq.upgrade;

				if (request_head(s, http_method_str(h->rq.method)) < 0)
					return -1;
				if (h->astate == A_HELD) {
					/* parsed again from its first byte once approved */
					http_parser_init(&h->rq, HTTP_REQUEST);
					h->rq.data = s;
					return off;
				}
				off += hlen;
				if (h->astate == A_DEAD || s->state == AG_SESS_CLOSED)
					return s->state == AG_SESS_CLOSED ? -1 : (long)len;
				if (upgrade) {
					/* the parser stops at an upgrade; a new one for what follows */
					http_parser_init(&h->rq, HTTP_REQUEST);
					h->rq.data = s;
					if (h->body_forward)
						h->astate = A_WAIT;
					else if (h->qt && h->qt->close)
						h->astate = A_DEAD;
					continue;
				}
			}
			if (h->msg_done)
				h->astate = h->cur_close ? A_DEAD : A_HEAD;
			else
				h->astate = A_BODY;
			break;
		case A_BODY:
			http_parser_pause(&h->rq, 0);
			n = http_parser_execute(&h->rq, &rq_settings, (const char *)p, avail);
			he = HTTP_PARSER_ERRNO(&h->rq);
			if (he != HPE_OK && he != HPE_PAUSED)
				return bad_request(s, http_errno_description(he));
			off += n;
			if (h->msg_done)
				h->astate = h->cur_close ? A_DEAD : A_HEAD;
			break;
		}
		if (h->err)
			break;
	}
	return off;
}

/* --- responses ------------------------------------------------------------------------------ */

static int rs_begin(http_parser *p)
{
	struct http *h = H(p->data);

	h->rh = worker_rh;
	h->nrh = 0;
	h->rh_overflow = h->r_last_value = h->r_done = false;
	h->r_in_head = true;
	h->reason = NULL;
	h->reasonlen = 0;
	return 0;
}

static int rs_status(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->reason)
		h->reason = at;
	h->reasonlen = at + len - h->reason;
	return 0;
}

static int rs_field(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->r_in_head)
		return 0;
	return hdr_field(h->rh, &h->nrh, &h->rh_overflow, &h->r_last_value, at, len);
}

static int rs_value(http_parser *p, const char *at, size_t len)
{
	struct http *h = H(p->data);

	if (!h->r_in_head)
		return 0;
	return hdr_value(h->rh, h->nrh, h->rh_overflow, &h->r_last_value, at, len);
}

static int rs_headers_done(http_parser *p)
{
	struct http *h = H(p->data);
	unsigned int st = p->status_code;

	h->r_in_head = false;
	if (!h->qh)
		return 0;
	if (h->qh->connect && st / 100 == 2)
		return 2;
	if (h->qh->head || (st / 100 == 1 && st != 101) || st == 204 || st == 304)
		return 1;
	return 0;
}

/* Body bytes to the agent in the response's framing. */
static void body_out(struct http *h, const void *p, size_t n)
{
	if (!n)
		return;
	if (h->r_chunked)
		out_chunk_size(h, AG_SIDE_AGENT, n);
	out_add(h, AG_SIDE_AGENT, p, n);
	if (h->r_chunked)
		out_add(h, AG_SIDE_AGENT, "\r\n", 2);
}

static void mask_error(struct ag_session *s, int rc)
{
	struct http *h = H(s);

	pr_warn("session %llu: response body cannot be masked (%s): connection closed",
		(unsigned long long)s->id, rc == -EPROTO ? ag_jmask_error(h->jm) : strerror(-rc));
	h->r_discard = true;
	h->err = h->err ? h->err : -EPROTO;
}

/* Body bytes as the agent gets them: to the agent and to the audit log. */
static void body_emit(void *ctx, const void *p, size_t n)
{
	struct ag_session *s = ctx;

	body_out(H(s), p, n);
	ag_audit_http_body(s, p, n);
}

/* ... after the credential scrubber (scrub.h): never our own credential. */
static void agent_body(struct ag_session *s, const void *p, size_t n)
{
	struct http *h = H(s);

	if (ag_scrub_feed(&h->scrub, p, n, body_emit, s) && !h->err)
		h->err = -ENOMEM;
}

static void tunnel_emit(void *ctx, const void *p, size_t n)
{
	out_add(ctx, AG_SIDE_AGENT, p, n);
}

static void discard_emit(void *ctx, const void *p, size_t n)
{
	(void)ctx;
	(void)p;
	(void)n;
}

/* Occurrences of our credential replaced: counted as masked values, noted (never the value). */
static void scrub_note(struct ag_session *s)
{
	uint64_t n = ag_scrub_take_hits(&H(s)->scrub);
	char msg[160];

	if (!n)
		return;
	s->masked_values += n;
	pr_info("session %llu: the gateway's credential came back from the upstream: %llu "
		"occurrence(s) masked",
		(unsigned long long)s->id, (unsigned long long)n);
	snprintf(msg, sizeof(msg), "%llu occurrence(s) of the gateway's credential in the "
		 "upstream's answer masked", (unsigned long long)n);
	ag_slog_note(ag_d, s, "credential_reflected", msg);
}

static void masked_out(struct ag_session *s, const uint8_t *p, size_t n, bool finish)
{
	struct http *h = H(s);
	int rc;

	h->scratch.start = h->scratch.end = 0;
	rc = finish ? ag_jmask_finish(h->jm, &h->scratch) : ag_jmask_feed(h->jm, p, n, &h->scratch);
	agent_body(s, ag_buf_head(&h->scratch), ag_buf_len(&h->scratch));
	if (rc < 0) {
		mask_error(s, rc);
		return;
	}
	s->masked_values += rc;
}

static int rs_body(http_parser *p, const char *at, size_t len)
{
	struct ag_session *s = p->data;
	struct http *h = H(s);
	uint8_t buf[16384];

	if (h->r_discard || h->err)
		return 0;
	if (!h->z_on) {
		if (h->jm)
			masked_out(s, (const uint8_t *)at, len, false);
		else
			agent_body(s, at, len);
		return 0;
	}
	h->z.next_in = (Bytef *)at;
	h->z.avail_in = len;
	while (h->z.avail_in && !h->err) {
		int zr;

		h->z.next_out = buf;
		h->z.avail_out = sizeof(buf);
		zr = inflate(&h->z, Z_NO_FLUSH);
		if (zr != Z_OK && zr != Z_STREAM_END && zr != Z_BUF_ERROR) {
			pr_warn("session %llu: cannot inflate the response body: %s",
				(unsigned long long)s->id, h->z.msg ? h->z.msg : "zlib error");
			h->err = -EPROTO;
			break;
		}
		if (h->jm)
			masked_out(s, buf, sizeof(buf) - h->z.avail_out, false);
		else
			agent_body(s, buf, sizeof(buf) - h->z.avail_out);
		if (zr == Z_STREAM_END || (zr == Z_BUF_ERROR && h->z.avail_out))
			break;
	}
	return 0;
}

static int rs_done(http_parser *p)
{
	struct http *h = H(p->data);

	h->r_done = true;
	http_parser_pause(p, 1);
	return 0;
}

static const http_parser_settings rs_settings = {
	.on_message_begin = rs_begin,
	.on_status = rs_status,
	.on_header_field = rs_field,
	.on_header_value = rs_value,
	.on_headers_complete = rs_headers_done,
	.on_body = rs_body,
	.on_message_complete = rs_done,
};

static const char *rh_get(struct http *h, const char *name, size_t *vl)
{
	const char *v;

	if (!ag_http_header(h->rh, h->nrh, name, &v, vl))
		return NULL;
	trim(&v, vl);
	return v;
}

static bool is_json(const char *ct, size_t n)
{
	size_t end = 0;

	while (end < n && ct[end] != ';')
		end++;
	while (end && ct[end - 1] == ' ')
		end--;
	return (end == 16 && !strncasecmp(ct, "application/json", 16)) ||
	       (end > 5 && !strncasecmp(ct + end - 5, "+json", 5));
}

/* The agent reads no more answers from this upstream connection: tell it so and end. */
static long upstream_broken(struct ag_session *s, const char *why)
{
	ag_session_fail(s, true, "http: upstream %s", why);
	return -1;
}

/* Turns the connection into a relay both ways (after 101, or 2xx to CONNECT). */
static void go_tunnel(struct ag_session *s)
{
	struct http *h = H(s);
	struct ag_side_conn *a = &s->side[AG_SIDE_AGENT];

	h->ustate = U_TUNNEL;
	h->astate = A_TUNNEL;
	h->scrub.tunnel = true;
	pr_info("session %llu: connection upgraded: relaying both ways", (unsigned long long)s->id);
	if (ag_buf_len(&a->in)) {
		out_add(h, AG_SIDE_UPSTREAM, ag_buf_head(&a->in), ag_buf_len(&a->in));
		ag_buf_consume(&a->in, ag_buf_len(&a->in));
	}
}

/* The upgrade was answered otherwise: the agent's held bytes are parsed as HTTP again. */
static int resume_agent(struct ag_session *s)
{
	struct ag_side_conn *a = &s->side[AG_SIDE_AGENT];
	long used;

	if (!ag_buf_len(&a->in))
		return 0;
	used = agent_process(s, ag_buf_head(&a->in), ag_buf_len(&a->in));
	if (used < 0 || s->state == AG_SESS_CLOSED)
		return -1;
	ag_buf_consume(&a->in, used);
	return 0;
}

/*
 * A response that must be masked and cannot be: the agent gets a 502 in its place, the body is
 * dropped and the connection closed after it.
 */
static long refuse_response(struct ag_session *s, const char *msg)
{
	struct http *h = H(s);
	struct ag_buf resp = { 0 };

	pr_warn("session %llu: %s", (unsigned long long)s->id, msg + 11);
	local_answer(h, &resp, 502, msg, NULL, NULL, h->qh->head, true);
	out_add(h, AG_SIDE_AGENT, ag_buf_head(&resp), ag_buf_len(&resp));
	ag_buf_free(&resp);
	h->r_discard = true;
	h->r_close = true;
	h->r_chunked = false;
	return 0;
}

/* The response's header block is parsed: pass it on, re-framed and with masking set up. */
static long response_head(struct ag_session *s)
{
	struct http *h = H(s);
	struct http_ent *e = h->qh;
	unsigned int st = h->rs.status_code;
	const char *ct, *ce, *te;
	size_t ctl = 0, cel = 0, tel = 0, head0 = ag_buf_len(&h->to[AG_SIDE_AGENT]);
	bool bodyless, chunked_in = h->rs.flags & F_CHUNKED, reframe, mask, inflating;

	bodyless =
		e->head || st / 100 == 1 || st == 204 || st == 304 || (e->connect && st / 100 == 2);
	ct = rh_get(h, "content-type", &ctl);
	ce = rh_get(h, "content-encoding", &cel);
	te = rh_get(h, "transfer-encoding", &tel);
	/* Bodies are re-framed decoded: a transfer coding we would not undo (gzip, chunked). */
	if (!bodyless && te && !(tel == 7 && !strncasecmp(te, "chunked", 7)))
		return refuse_response(s, "agentgate: the response has a transfer coding other "
					  "than chunked");
	mask = !bodyless && ct && is_json(ct, ctl) && (h->mask_json || e->secrets);
	h->r_close = !http_should_keep_alive(&h->rs) || e->close;
	h->r_discard = false;
	h->z_on = false;
	if (!bodyless && e->secrets && !mask)
		return refuse_response(s, "agentgate: the secrets response is not JSON and cannot "
					  "be masked");
	/* what we mask or scrub of our credential is read decoded */
	inflating = !bodyless && (mask || ag_scrub_active(&h->scrub));
	if (inflating && ce && cel && !(cel == 8 && !strncasecmp(ce, "identity", 8))) {
		int wbits;

		if ((cel == 4 && !strncasecmp(ce, "gzip", 4)) ||
		    (cel == 6 && !strncasecmp(ce, "x-gzip", 6)))
			wbits = 16 + MAX_WBITS;
		else if (cel == 7 && !strncasecmp(ce, "deflate", 7))
			wbits = 32 + MAX_WBITS;
		else
			return refuse_response(s, "agentgate: the response is in a content "
						  "encoding that cannot be masked");
		memset(&h->z, 0, sizeof(h->z));
		if (inflateInit2(&h->z, wbits) != Z_OK)
			return upstream_broken(s, "zlib init failed");
		h->z_on = true;
	}
	if (mask) {
		struct ag_jmask_opts o = {
			.m = h->masker,
			.keys = h->mask_json ? h->keys : NULL,
			.nkeys = h->mask_json ? h->nkeys : 0,
			.secrets = e->secrets,
			.secret_objects = e->secrets,
		};

		h->jm = ag_jmask_new(&o);
		if (!h->jm)
			return upstream_broken(s, "out of memory");
	}
	/* To the agent: chunked when we change the body or it came chunked. */
	reframe = mask || h->z_on;
	h->r_chunked = !bodyless && (reframe || chunked_in) && !e->http10;
	if (!bodyless && (reframe || chunked_in) && e->http10)
		h->r_close = true; /* close-delimited to an HTTP/1.0 agent */

	out_add(h, AG_SIDE_AGENT, "HTTP/", 5);
	out_uint(h, AG_SIDE_AGENT, h->rs.http_major);
	out_add(h, AG_SIDE_AGENT, ".", 1);
	out_uint(h, AG_SIDE_AGENT, h->rs.http_minor);
	out_add(h, AG_SIDE_AGENT, " ", 1);
	out_uint(h, AG_SIDE_AGENT, st);
	out_add(h, AG_SIDE_AGENT, " ", 1);
	out_add(h, AG_SIDE_AGENT, h->reason, h->reason ? h->reasonlen : 0);
	out_add(h, AG_SIDE_AGENT, "\r\n", 2);
	for (size_t i = 0; i < h->nrh; i++) {
		const struct ag_http_hdr *x = &h->rh[i];

		if (hdr_is(x, "transfer-encoding") && !bodyless)
			continue;
		if (hdr_is(x, "content-length") && !bodyless && (reframe || chunked_in))
			continue;
		if (hdr_is(x, "content-encoding") && h->z_on)
			continue;
		if (hdr_is(x, "connection") && h->r_close)
			continue;
		out_hdr(h, AG_SIDE_AGENT, x);
	}
	if (h->r_chunked)
		out_add(h, AG_SIDE_AGENT, "Transfer-Encoding: chunked\r\n", 28);
	if (h->r_close && st != 101)
		out_add(h, AG_SIDE_AGENT, "Connection: close\r\n", 19);
	out_add(h, AG_SIDE_AGENT, "\r\n", 2);
	/* never our credential in a header either (same length: nothing else moves) */
	if (!h->err && ag_scrub_active(&h->scrub)) {
		struct ag_buf *b = &h->to[AG_SIDE_AGENT];

		ag_scrub_buf(&h->scrub, b->data + b->start + head0, ag_buf_len(b) - head0);
		scrub_note(s);
	}
	return 0;
}

static void response_end_state(struct http *h)
{
	ag_scrub_flush(&h->scrub, discard_emit, NULL); /* only what an error left */
	if (h->jm) {
		ag_jmask_free(h->jm);
		h->jm = NULL;
	}
	if (h->z_on) {
		inflateEnd(&h->z);
		h->z_on = false;
	}
}

/* The response is complete: finish its framing, pop its request, let our answers out. */
static void response_done(struct ag_session *s)
{
	struct http *h = H(s);
	unsigned int st = h->rs.status_code;
	bool close = h->r_close;

	if (h->jm && !h->r_discard)
		masked_out(s, NULL, 0, true);
	if (!h->r_discard)
		ag_scrub_flush(&h->scrub, body_emit, s);
	scrub_note(s);
	if (h->r_chunked && !h->r_discard)
		out_add(h, AG_SIDE_AGENT, "0\r\n\r\n", 5);
	response_end_state(h);
	h->r_chunked = false;
	if (st / 100 == 1)
		return; /* interim: the request still waits for its final answer */
	ag_audit_http_done(s);
	ent_pop(h);
	if (close) {
		close_both(s);
		return;
	}
	queue_flush(s);
}

static long upstream_process(struct ag_session *s, const uint8_t *data, size_t len)
{
	struct http *h = H(s);
	size_t off = 0;

	s->side[AG_SIDE_UPSTREAM].hold = 0;
	while (off < len && !h->err) {
		const uint8_t *p = data + off;
		size_t avail = len - off, hlen, n;
		const char *why;
		enum http_errno he;
		int rc;

		switch (h->ustate) {
		case U_DEAD:
			return len;
		case U_TUNNEL:
			if (ag_scrub_feed(&h->scrub, p, avail, tunnel_emit, h))
				h->err = -ENOMEM;
			scrub_note(s);
			return len;
		case U_HEAD:
			if (!h->qh || h->qh->local)
				return upstream_broken(s, "sent a response nobody asked for");
			rc = head_scan(p, avail, &hlen, &why);
			if (rc < 0)
				return upstream_broken(s, why);
			if (!rc) {
				s->side[AG_SIDE_UPSTREAM].hold = HTTP_HEAD_MAX;
				return off;
			}
			http_parser_pause(&h->rs, 0);
			n = http_parser_execute(&h->rs, &rs_settings, (const char *)p, hlen);
			he = HTTP_PARSER_ERRNO(&h->rs);
			if ((he != HPE_OK && he != HPE_PAUSED) || n != hlen || h->rh_overflow ||
			    h->r_in_head)
				return upstream_broken(s, he != HPE_OK && he != HPE_PAUSED
								  ? http_errno_description(he)
								  : "malformed response head");
			off += hlen;
			if (response_head(s) < 0)
				return -1;
			ag_audit_http_response(s, h->r_discard ? 502 : h->rs.status_code);
			if (h->rs.status_code == 101 && h->qh->upgrade) {
				ent_pop(h);
				go_tunnel(s);
				continue;
			}
			if (h->qh->connect && h->rs.status_code / 100 == 2) {
				ent_pop(h);
				go_tunnel(s);
				continue;
			}
			if (h->rs.status_code == 101)
				return upstream_broken(s, "switched protocols unasked");
			if (h->qh->upgrade && h->rs.status_code / 100 != 1) {
				/* the upgrade was refused upstream: plain HTTP goes on */
				h->qh->upgrade = false;
				if (h->astate == A_WAIT)
					h->astate = A_HEAD;
			}
			if (h->r_done) {
				response_done(s);
				http_parser_init(&h->rs, HTTP_RESPONSE);
				h->rs.data = s;
			} else {
				h->ustate = U_BODY;
			}
			break;
		case U_BODY:
			http_parser_pause(&h->rs, 0);
			n = http_parser_execute(&h->rs, &rs_settings, (const char *)p, avail);
			he = HTTP_PARSER_ERRNO(&h->rs);
			if (he != HPE_OK && he != HPE_PAUSED)
				return upstream_broken(s, http_errno_description(he));
			off += n;
			if (h->r_done) {
				if (h->ustate != U_DEAD)
					h->ustate = U_HEAD;
				response_done(s);
			}
			break;
		}
	}
	/*
	 * Agent bytes left unread (a refused upgrade's followers, a pipeline that outran the
	 * queue) are taken up once there is room again.
	 */
	if (h->astate == A_HEAD && h->qn < HTTP_QUEUE_MAX / 2 &&
	    ag_buf_len(&s->side[AG_SIDE_AGENT].in) && s->state != AG_SESS_CLOSED && resume_agent(s))
		return -1;
	return off;
}

/* --- the handler ---------------------------------------------------------------------------- */

/* Masking as the rule says: key patterns (keys:, and columns: read as key paths), a masker. */
static int mask_setup(struct ag_session *s, struct http *h)
{
	const struct ag_kv *mk, *det, *style, *keys, *cols, *sec;

	mk = h->rule ? h->rule->mask : NULL;
	det = mk ? ag_kv_get(mk, h->rule->nmask, "detectors") : NULL;
	style = mk ? ag_kv_get(mk, h->rule->nmask, "style") : NULL;
	keys = mk ? ag_kv_get(mk, h->rule->nmask, "keys") : NULL;
	cols = mk ? ag_kv_get(mk, h->rule->nmask, "columns") : NULL;
	sec = mk ? ag_kv_get(mk, h->rule->nmask, "secrets") : NULL;
	h->secrets_unmasked = sec && sec->value && !strcmp(sec->value, "unmasked");
	for (int pass = 0; pass < 2; pass++) {
		const struct ag_kv *kv = pass ? cols : keys;

		for (size_t i = 0; kv && i < (kv->value ? 1 : kv->nlist); i++) {
			char **nk = realloc(h->keys, (h->nkeys + 1) * sizeof(*nk));

			if (!nk)
				return -ENOMEM;
			h->keys = nk;
			nk[h->nkeys] = strdup(kv->value ? kv->value : kv->list[i]);
			if (!nk[h->nkeys])
				return -ENOMEM;
			h->nkeys++;
		}
	}
	h->mask_json = h->nkeys || (det && (det->value || det->nlist));
	if (h->mask_json || h->k8s) {
		/* One masker for both: the rule's style and detectors; whole values by key here. */
		static char any[] = "*";
		static char *anyl[] = { any };
		struct ag_kv kv[3];
		size_t n = 0;

		kv[n++] = (struct ag_kv){
			.key = "columns", .list = anyl, .nlist = 1, .kind = AG_KV_LIST
		};
		if (det)
			kv[n++] = *det;
		if (style)
			kv[n++] = *style;
		h->masker = ag_masker_new(kv, n, NULL, 0);
		if (!h->masker) {
			snprintf(s->reason, sizeof(s->reason), "http: the rule's mask: %s",
				 strerror(errno));
			return -EINVAL;
		}
	}
	return 0;
}

static void mask_clear(struct http *h)
{
	for (size_t i = 0; i < h->nkeys; i++)
		free(h->keys[i]);
	free(h->keys);
	h->keys = NULL;
	h->nkeys = 0;
	ag_masker_free(h->masker);
	h->masker = NULL;
	h->mask_json = h->secrets_unmasked = false;
}

/*
 * A policy reload reaches live sessions at their next request: the new rule decides it and
 * masks its answer. Not while a masked response is in flight (its masker is in use): then at a
 * later request. A target gone from the policy (or no longer http) ends the session.
 */
static int policy_refresh(struct ag_session *s)
{
	struct http *h = H(s);
	uint64_t gen = __atomic_load_n(&ag_d->policy_gen, __ATOMIC_ACQUIRE);
	const struct ag_policy_target *t;
	struct ag_policy_ref *r;

	if (gen == h->policy_gen || h->jm)
		return 0;
	r = ag_policy_get(ag_d);
	if (!r)
		return 0;
	t = ag_policy_target_by_name(r->p, s->target_name);
	if (!t || t->protocol != AG_PROTO_HTTP) {
		ag_policy_put(r);
		return -ESRCH;
	}
	ag_policy_put(s->pol);
	s->pol = r;
	s->target = t;
	h->policy_gen = gen;
	h->k8s = t->kubernetes;
	h->rule = ag_http_rule_for(r->p, s->agent, s->target_name);
	mask_clear(h);
	pr_info("session %llu: policy reload applied to the live session",
		(unsigned long long)s->id);
	return mask_setup(s, h);
}

/* The decision on a held request, on the session's worker: it is parsed again and decided by it. */
static void http_approval_cb(struct ag_session *s, void *arg, const struct ag_approval_info *a)
{
	struct http *h = H(s);
	char msg[400], dur[32];

	(void)arg;
	if (!h)
		return;
	h->held = NULL;
	if (a->state == AG_APPROVAL_APPROVED) {
		msg[0] = '\0';
		pr_info("session %llu: approval %s granted by %s", (unsigned long long)s->id,
			a->id, a->decided_by);
	} else if (a->state == AG_APPROVAL_EXPIRED) {
		snprintf(msg, sizeof(msg), "agentgate: approval %s timed out after %s", a->id,
			 ag_approval_fmt_duration(a->timeout_ms, dur, sizeof(dur)));
	} else if (a->reason[0]) {
		snprintf(msg, sizeof(msg), "agentgate: approval %s denied by %s: %s", a->id,
			 a->decided_by, a->reason);
	} else {
		snprintf(msg, sizeof(msg), "agentgate: approval %s denied by %s", a->id,
			 a->decided_by);
	}
	if (msg[0])
		pr_info("session %llu: %s", (unsigned long long)s->id, msg + 11);
	ag_http_approval_done(s, a->state == AG_APPROVAL_APPROVED, msg);
}

void ag_http_approval_done(struct ag_session *s, bool approved, const char *msg)
{
	struct http *h = H(s);

	if (!h || h->astate != A_HELD || s->state == AG_SESS_CLOSED)
		return;
	h->verdict = approved ? AG_ACT_ALLOW : AG_ACT_DENY;
	snprintf(h->verdict_msg, sizeof(h->verdict_msg), "%s",
		 msg && *msg ? msg : "agentgate: approval refused");
	h->astate = A_HEAD;
	/* the held bytes are parsed again (http_input, then out_flush), and reading resumes */
	ag_session_resume(s, AG_SIDE_AGENT);
}

static int http_init(struct ag_session *s)
{
	struct http *h = calloc(1, sizeof(*h));

	if (!h)
		return -ENOMEM;
	h->verdict = -1;
	h->to = worker_to;
	s->proto_state = h;
	http_parser_init(&h->rq, HTTP_REQUEST);
	http_parser_init(&h->rs, HTTP_RESPONSE);
	h->rq.data = h->rs.data = s;
	/* Read before the rule: a swap in between only makes the first check refresh again. */
	h->policy_gen = __atomic_load_n(&ag_d->policy_gen, __ATOMIC_ACQUIRE);
	h->k8s = s->target && s->target->kubernetes;
	h->rule = ag_http_rule_for(s->pol->p, s->agent, s->target_name);
	return mask_setup(s, h);
}

static long http_input(struct ag_session *s, enum ag_side from, const uint8_t *data, size_t len)
{
	long used;

	out_begin(H(s));
	used = from == AG_SIDE_AGENT ? agent_process(s, data, len) : upstream_process(s, data, len);

	if (used < 0 || s->state == AG_SESS_CLOSED)
		return -1;
	if (out_flush(s))
		return -1;
	return used;
}

static void http_eof(struct ag_session *s, enum ag_side from)
{
	struct http *h = H(s);

	out_begin(h);
	if (from == AG_SIDE_AGENT) {
		h->agent_eof = true;
		if (h->held) {
			ag_session_fail(s, false, "http: the agent left while approval %s waited",
					h->held_id);
			return;
		}
		if (h->astate == A_BODY) {
			ag_session_fail(s, false,
					"http: the agent closed in the middle of a request");
			return;
		}
		if (h->astate == A_HEAD && ag_buf_len(&s->side[AG_SIDE_AGENT].in))
			pr_info("session %llu: the agent closed in the middle of a request head",
				(unsigned long long)s->id);
		h->shut[AG_SIDE_UPSTREAM] = true;
		if (!h->qh && h->astate != A_TUNNEL)
			h->shut[AG_SIDE_AGENT] = true;
		out_flush(s);
		return;
	}
	if (h->ustate == U_BODY) {
		/* a close-delimited body ends here; anything else was cut short */
		http_parser_execute(&h->rs, &rs_settings, NULL, 0);
		if (h->r_done && !h->err) {
			h->r_close = true;
			response_done(s);
		} else {
			ag_session_fail(s, false,
					"http: the upstream closed in the middle of a "
					"response");
			return;
		}
	}
	if (h->ustate == U_TUNNEL)
		ag_scrub_flush(&h->scrub, tunnel_emit, h);
	h->shut[AG_SIDE_AGENT] = true;
	out_flush(s);
}

static void http_fini(struct ag_session *s)
{
	struct http *h = H(s);

	if (!h)
		return;
	if (h->held) {
		/* nobody is left to answer: the approval is cancelled */
		ag_approval_cancel(h->held);
		h->held = NULL;
	}
	while (h->qh)
		ent_pop(h);
	if (h->spare)
		ent_free(h->spare);
	response_end_state(h);
	mask_clear(h);
	if (h->to)
		for (int i = 0; i < 2; i++)
			h->to[i].start = h->to[i].end = 0;
	ag_buf_free(&h->scratch);
	ag_scrub_free(&h->scrub);
	explicit_bzero(h->cred, sizeof(h->cred));
	free(h);
	s->proto_state = NULL;
}

const struct ag_proto_ops ag_proto_http = {
	.name = "http",
	.init = http_init,
	.input = http_input,
	.eof = http_eof,
	.fini = http_fini,
};
