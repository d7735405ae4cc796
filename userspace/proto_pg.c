// SPDX-License-Identifier: GPL-2.0
/*
 * protocol: postgres — the v3 wire protocol on both sides, message by message, and from the
 * first ReadyForQuery on every Query and Parse is classified and decided before a byte of it
 * goes upstream.
 *
 * Startup. When the target's tls: terminates the agent's TLS, its SSLRequest is answered 'S'
 * and the session layer runs the handshake (a leaf from the gateway CA for the address dialled);
 * otherwise, and for GSSENCRequest, 'N'. With tls.upstream on, the gateway sends its own
 * SSLRequest before the startup packet, holds that packet until the server's handshake is done
 * (its certificate checked against ca_file for verify-full and verify-ca), and refuses the
 * session, never downgrading, when the server answers 'N' or its certificate fails, telling the
 * agent why. Without a credential, authentication then passes through both ways. With one
 * (credential:, pg_login.c and cred.c), the agent holds no secret: its startup packet stays
 * here, the credential is obtained off the loop (a pg-jit-role role minted for this session,
 * only once the upstream TLS is up, or a static secret), the gateway sends its own startup
 * packet and answers the server's SCRAM-SHA-256, md5 or cleartext challenge itself, and the
 * agent sees only AuthenticationOk and what follows; a failure reaches it as a FATAL with the
 * reason, never a secret. The role is dropped when the session ends.
 *
 * Approvals: a statement whose rule says approve is held (its input not read past it), the
 * agent is told with a NoticeResponse, and it goes upstream on approval or is refused like a
 * deny on a denial, a timeout or a CancelRequest, while the server and other sessions go on.
 *
 * A refused message is never answered by the gateway out of turn: a stand-in that cannot
 * succeed (a statement that is a syntax error, carrying a per-session nonce) goes upstream in
 * its place, and the server's error for it is replaced by ours. So the answers keep the server's
 * order in a pipeline, the server skips to Sync exactly as for a real error, and a refusal in a
 * transaction block aborts the transaction in the server itself: the client sees status 'E',
 * later statements get the server's own 25P02 and a COMMIT becomes a ROLLBACK — savepoints
 * included. To know which server message answers what, every message forwarded that the server
 * will answer is queued (pg_pq) and each answer is matched to the head of the queue.
 *
 * Masking rewrites DataRow and COPY TO STDOUT rows (pgmask.c) when the rule has a mask; the
 * column rules are resolved against the catalog with a query of our own at the first
 * ReadyForQuery (its answers swallowed), cached per target and database. Without masking, server
 * messages are passed on from their headers only, and long ones streamed as they come.
 *
 * CancelRequests arrive on a connection of their own: their (pid, key) is looked up in a
 * daemon-wide table of the BackendKeyData our sessions saw, and forwarded only to the server
 * and target that issued it, for the same agent.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "approval.h"
#include <openssl/crypto.h>

#include "cred.h"
#include "audit.h"
#include "daemon.h"
#include "log.h"
#include "mask.h"
#include "pgmask.h"
#include "pgwire.h"
#include "pg_login.h"
#include "proto.h"
#include "proto_pg.h"
#include "session.h"
#include "sql.h"
#include "sqlorigin.h"
#include "tls.h"

#define PG_MAX_MESSAGE_DEFAULT (64u << 20)
/* Named prepared statements and portals one session may hold. */
#define PG_MAX_NAMED 16384
/* Answers the server owes before we stop reading the agent (a pipeline that never reads). */
#define PG_PQ_STALL 16384
#define PG_CATALOG_TTL_MS 10000

static size_t pg_max_message = PG_MAX_MESSAGE_DEFAULT;
static pthread_once_t pg_once = PTHREAD_ONCE_INIT;

void ag_pg_set_max_message(size_t bytes)
{
	if (bytes >= 1024 && bytes <= 0x3fffffff)
		pg_max_message = bytes;
}

static void pg_global_init(void)
{
	const char *e = getenv("AGENTGATE_PG_MAX_MESSAGE");

	if (e && *e) {
		char *end;
		unsigned long long v = strtoull(e, &end, 10);

		if (*end == 'k' || *end == 'K')
			v <<= 10;
		else if (*end == 'm' || *end == 'M')
			v <<= 20;
		ag_pg_set_max_message(v);
	}
}

/* --- the queue of answers owed by the server ---------------------------------------------- */

enum pq_kind {
	PQ_SIMPLE,   /* count × Parse/Bind/Close: one completion message each */
	PQ_DESCRIBE, /* ParameterDescription (statements), then RowDescription or NoData */
	PQ_EXECUTE,  /* rows, then CommandComplete | EmptyQueryResponse | PortalSuspended */
	PQ_SYNC,     /* ReadyForQuery */
	PQ_QUERY,    /* any number of results, then ReadyForQuery */
	PQ_SUBST,    /* our stand-in for a refused message: its error is replaced by ours */
	PQ_CATALOG,  /* our catalog query: all of its answers swallowed, up to ReadyForQuery */
};

#define PQF_INTERNAL 0x01 /* our own Describe: its answer is swallowed */
#define PQF_QUERY 0x02	  /* (PQ_SUBST) stands for a Query: ReadyForQuery follows the error */
#define PQF_REFRESH 0x04  /* (PQ_CATALOG) a refresh after DDL */

struct pg_stmt;
struct pg_refusal;

struct pq_ent {
	uint8_t kind;
	uint8_t flags;
	uint32_t count;
	union {
		void *ref;
		struct pg_shape *shape;	    /* PQ_DESCRIBE (portal), PQ_EXECUTE */
		struct pg_refusal *refusal; /* PQ_SUBST */
		struct pg_qinfo *qinfo;	    /* PQ_QUERY */
	};
	struct pg_stmt *stmt; /* PQ_EXECUTE: for a COPY's spec */
};

struct pg_pq {
	struct pq_ent *e;
	size_t head, n, cap; /* ring; cap a power of two */
};

/* What a refused message is answered with. */
struct pg_refusal {
	char code[6];
	char *message;
	char *detail;
	int position;
};

/* A forwarded Query's COPY TO STDOUT statements, in order (masking only). */
struct pg_qinfo {
	struct pg_copy_spec **copies;
	size_t n, next;
	struct pg_sql *sql; /* the string, for the origin of its results' columns (sqlorigin.h) */
};

/* --- prepared statements and portals ------------------------------------------------------ */

struct pg_named {
	struct pg_named *next;
	char *name;
};

struct pg_map {
	struct pg_named **b;
	size_t nb, n;
};

struct pg_stmt {
	struct pg_named nm;
	int refs;
	uint64_t classes; /* of what it prepared */
	char **tables;
	size_t ntables;
	bool where_absent;
	bool approved;		   /* its Parse was let through by an approval */
	struct pg_copy_spec *copy; /* a COPY TO STDOUT (masking only) */
	struct pg_sql *sql;	   /* for the origin of its result columns (masking only) */
};

struct pg_portal {
	struct pg_named nm;
	struct pg_stmt *stmt;
	struct pg_shape *shape; /* described (masking only) */
};

/* PH_LOGIN: the gateway logs in upstream with a credential of its own (pg_login.c). */
enum pg_phase { PH_STARTUP = 0, PH_LOGIN, PH_AUTH, PH_READY, PH_CANCEL };

struct pg {
	enum pg_phase phase;
	char user[64];
	char database[64];
	char nonce[24];
	uint32_t be_pid, be_key;
	bool key_registered;
	int negotiations; /* SSLRequest/GSSENCRequest answered */
	bool up_tls_wait; /* our SSLRequest is upstream: its 'S' or 'N' comes first */
	bool cred_wait_tls; /* the credential is minted once the server's TLS is verified */
	struct pg_login *login; /* the target has a credential: the gateway's own login */
	uint8_t *startup;	/* the agent's startup packet, for its parameters */
	size_t startup_len;

	const struct ag_policy_rule *rule;
	uint64_t policy_gen; /* the daemon's policy generation rule was taken from */
	struct ag_masker *masker;
	struct pg_masking mk; /* mk.m NULL: no masking */
	struct pg_catalog *cat;
	char *cat_sql;
	char *cat_key; /* the catalog cache's key: the exact column rules (cat_sql is made from them) */
	bool cat_dirty;	  /* DDL ran: resolve again before the next statement */
	bool cat_pending; /* a catalog query is on its way */
	struct pg_catalog *cat_new;
	char cat_error[160];
	int held_ready; /* the first ReadyForQuery, held for the catalog; -1: none */

	/* agent side */
	bool terminated; /* Terminate seen */
	bool skip;	 /* a refused extended message: discard up to Sync */
	bool ext_open;	 /* extended messages sent since the last Sync */
	bool stalled;	 /* agent input waits for the server (auth, a full queue) */
	bool agent_eof;
	size_t a_pass;	  /* bytes of a CopyData still to stream upstream */
	bool a_pass_drop; /* ... or to drop (skipping) */

	/* server side */
	struct pg_pq pq;
	bool srv_skip;		 /* the server skips to the next Sync we send */
	char txn;		 /* the last ReadyForQuery's status */
	size_t u_pass;		 /* bytes of a message still to stream to the agent */
	struct pg_shape *qshape; /* the current Query result's shape */
	struct pg_copy_plan copy;
	bool copy_out;

	struct pg_map stmts, portals;
	struct ag_buf scratch; /* rewritten messages */

	/*
	 * A statement held for approval: the agent's input stays buffered, unread by us, from the
	 * held message on until the decision; then that message is decided again with the answer.
	 */
	struct ag_approval *held;
	char held_id[AG_APPROVAL_ID_MAX];
	int resume;			   /* RESUME_*: the answer for the held message */
	struct pg_refusal *resume_refusal; /* RESUME_REFUSE: what the agent is told */
};

enum { RESUME_NONE = 0, RESUME_ALLOW, RESUME_REFUSE };
/* on_query()/on_parse(): the message is held, not consumed. */
#define PG_HELD 1

/* --- small helpers -------------------------------------------------------------------------- */

static inline struct pg *PG(struct ag_session *s)
{
	return s->proto_state;
}

/*
 * snprintf(dst, len, "%s", src), without printf's machinery (a rule's name per statement); strlen,
 * not strnlen: libpg_query's own strnlen, a byte at a time, stands in for libc's.
 */
static void copy_str(char *dst, size_t len, const char *src)
{
	size_t n = src ? strlen(src) : 0;

	if (n > len - 1)
		n = len - 1;
	memcpy(dst, src ? src : "", n);
	dst[n] = '\0';
}

/* A statement for the log: one line, bounded. */
static void sql_excerpt(const char *sql, size_t len, char *out, size_t outlen)
{
	size_t j = 0;

	for (size_t i = 0; i < len && j + 4 < outlen; i++)
		out[j++] = isprint((unsigned char)sql[i]) ? sql[i] : ' ';
	if (len && j + 4 >= outlen) {
		memcpy(out + j, "...", 3);
		j += 3;
	}
	out[j] = '\0';
}

static uint64_t hash_bytes(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* --- forwarding runs of bytes ----------------------------------------------------------------- */

/*
 * Messages passed on unchanged are sent as one run per input call: one send() for a whole
 * pipeline instead of one per message. A run is flushed before anything else goes to that side.
 */
struct fwd {
	struct ag_session *s;
	enum ag_side to;
	const uint8_t *base;
	size_t start, end;
	int err;
};

static void fwd_flush(struct fwd *f)
{
	if (f->end > f->start && !f->err)
		f->err = ag_session_send(f->s, f->to, f->base + f->start, f->end - f->start);
	f->start = f->end;
}

static void fwd_keep(struct fwd *f, size_t off, size_t n)
{
	if (off != f->end) {
		fwd_flush(f);
		f->start = f->end = off;
	}
	f->end += n;
}

static void fwd_send(struct fwd *f, const void *p, size_t n)
{
	fwd_flush(f);
	if (!f->err && n)
		f->err = ag_session_send(f->s, f->to, p, n);
}

static void fwd_send_buf(struct fwd *f, struct ag_buf *b)
{
	fwd_send(f, ag_buf_head(b), ag_buf_len(b));
	b->start = b->end = 0;
	if (b->cap > 256 * 1024)
		ag_buf_free(b); /* a big row was masked: do not keep its room for the session */
}

/* Sends to the other side (not the run's): the run itself is not touched. */
static int send_to(struct ag_session *s, enum ag_side to, struct ag_buf *b)
{
	int rc = ag_session_send(s, to, ag_buf_head(b), ag_buf_len(b));

	b->start = b->end = 0;
	return rc;
}

/*
 * Ends the session after telling the agent why (a FATAL ErrorResponse). Returns -1 for input().
 */
static long pg_fatal(struct ag_session *s, struct fwd *f, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static long pg_fatal(struct ag_session *s, struct fwd *f, const char *code, const char *fmt, ...)
{
	char msg[256], full[300];
	struct ag_buf b = { 0 };
	struct pg_err e = { .severity = "FATAL", .code = code, .message = full };
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	snprintf(full, sizeof(full), "agentgate: %s", msg);
	if (f && f->to == AG_SIDE_AGENT)
		fwd_flush(f);
	if (!pg_put_error(&b, PG_B_ERROR, &e))
		ag_session_send(s, AG_SIDE_AGENT, ag_buf_head(&b), ag_buf_len(&b));
	ag_buf_free(&b);
	pr_warn("session %llu: postgres: %s", (unsigned long long)s->id, msg);
	ag_audit_error(s, "%s", full);
	ag_session_fail(s, false, "postgres: %s", msg);
	return -1;
}

/* --- the answer queue ------------------------------------------------------------------------ */

static void ent_release(struct pq_ent *e);

static struct pq_ent *pq_at(struct pg_pq *q, size_t i)
{
	return &q->e[(q->head + i) & (q->cap - 1)];
}

static struct pq_ent *pq_head(struct pg_pq *q)
{
	return q->n ? pq_at(q, 0) : NULL;
}

static struct pq_ent *pq_tail(struct pg_pq *q)
{
	return q->n ? pq_at(q, q->n - 1) : NULL;
}

static int pq_grow(struct pg_pq *q)
{
	size_t ncap = q->cap ? q->cap * 2 : 16;
	struct pq_ent *ne = malloc(ncap * sizeof(*ne));

	if (!ne)
		return -ENOMEM;
	for (size_t i = 0; i < q->n; i++)
		ne[i] = *pq_at(q, i);
	free(q->e);
	q->e = ne;
	q->cap = ncap;
	q->head = 0;
	return 0;
}

static void pq_pop(struct pg_pq *q)
{
	struct pq_ent *e = pq_head(q);

	if (!e)
		return;
	ent_release(e);
	q->head = (q->head + 1) & (q->cap - 1);
	q->n--;
}

/*
 * Queues what the server owes for a message just forwarded. While the server skips to Sync
 * after an error, it answers nothing but that Sync: nothing else is queued.
 */
static int pq_push(struct pg *pg, uint8_t kind, uint8_t flags, void *ref, struct pg_stmt *stmt)
{
	struct pg_pq *q = &pg->pq;
	struct pq_ent *t;

	if (pg->srv_skip && kind != PQ_SYNC) {
		struct pq_ent tmp = { .kind = kind, .ref = ref, .stmt = stmt };

		ent_release(&tmp);
		return 0;
	}
	if (kind == PQ_SYNC)
		pg->srv_skip = false;
	/* Runs of Parse/Bind/Close are one entry: a pipeline of 100k Parses costs one. */
	t = pq_tail(q);
	if (kind == PQ_SIMPLE && t && t->kind == PQ_SIMPLE && t->count < UINT32_MAX) {
		t->count++;
		return 0;
	}
	if (q->n == q->cap && pq_grow(q)) {
		struct pq_ent tmp = { .kind = kind, .ref = ref, .stmt = stmt };

		ent_release(&tmp);
		return -ENOMEM;
	}
	t = pq_at(q, q->n++);
	*t = (struct pq_ent){ .kind = kind, .flags = flags, .count = 1, .ref = ref, .stmt = stmt };
	return 0;
}

/* The server had an error in an extended sequence: it skips everything up to the next Sync. */
static void pq_skip_to_sync(struct pg *pg)
{
	struct pq_ent *h;

	while ((h = pq_head(&pg->pq)) && h->kind != PQ_SYNC)
		pq_pop(&pg->pq);
	if (!h)
		pg->srv_skip = true;
}

/* --- names ------------------------------------------------------------------------------ */

static size_t name_bucket(const struct pg_map *m, const char *name)
{
	return hash_bytes(name, strlen(name)) & (m->nb - 1);
}

static struct pg_named *map_get(const struct pg_map *m, const char *name)
{
	if (!m->nb)
		return NULL;
	for (struct pg_named *n = m->b[name_bucket(m, name)]; n; n = n->next)
		if (!strcmp(n->name, name))
			return n;
	return NULL;
}

static struct pg_named *map_del(struct pg_map *m, const char *name)
{
	struct pg_named **pp;

	if (!m->nb)
		return NULL;
	for (pp = &m->b[name_bucket(m, name)]; *pp; pp = &(*pp)->next)
		if (!strcmp((*pp)->name, name)) {
			struct pg_named *n = *pp;

			*pp = n->next;
			m->n--;
			return n;
		}
	return NULL;
}

static int map_put(struct pg_map *m, struct pg_named *n)
{
	size_t b;

	if (m->n + 1 > m->nb * 2) {
		size_t nb = m->nb ? m->nb * 4 : 16;
		struct pg_named **nbk = calloc(nb, sizeof(*nbk));

		if (!nbk)
			return -ENOMEM;
		for (size_t i = 0; i < m->nb; i++)
			for (struct pg_named *x = m->b[i], *next; x; x = next) {
				next = x->next;
				b = hash_bytes(x->name, strlen(x->name)) & (nb - 1);
				x->next = nbk[b];
				nbk[b] = x;
			}
		free(m->b);
		m->b = nbk;
		m->nb = nb;
	}
	b = name_bucket(m, n->name);
	n->next = m->b[b];
	m->b[b] = n;
	m->n++;
	return 0;
}

static void stmt_unref(struct pg_stmt *st)
{
	if (!st || --st->refs)
		return;
	for (size_t i = 0; i < st->ntables; i++)
		free(st->tables[i]);
	free(st->tables);
	pg_copy_spec_free(st->copy);
	pg_sql_unref(st->sql);
	free(st->nm.name);
	free(st);
}

static void portal_free(struct pg_portal *p)
{
	if (!p)
		return;
	stmt_unref(p->stmt);
	pg_shape_unref(p->shape);
	free(p->nm.name);
	free(p);
}

static void map_clear(struct pg_map *m, bool portals)
{
	for (size_t i = 0; i < m->nb; i++)
		for (struct pg_named *x = m->b[i], *next; x; x = next) {
			next = x->next;
			if (portals)
				portal_free((struct pg_portal *)x);
			else
				stmt_unref((struct pg_stmt *)x);
		}
	free(m->b);
	m->b = NULL;
	m->nb = m->n = 0;
}

/* One per Query with masking: not calloc, which skips malloc's per-thread cache. */
static struct pg_qinfo *qinfo_new(void)
{
	struct pg_qinfo *qi = malloc(sizeof(*qi));

	if (qi)
		*qi = (struct pg_qinfo){ 0 };
	return qi;
}

static void qinfo_free(struct pg_qinfo *qi)
{
	if (!qi)
		return;
	for (size_t i = 0; i < qi->n; i++)
		pg_copy_spec_free(qi->copies[i]);
	free(qi->copies);
	pg_sql_unref(qi->sql);
	free(qi);
}

static void refusal_free(struct pg_refusal *r)
{
	if (!r)
		return;
	free(r->message);
	free(r->detail);
	free(r);
}

static void ent_release(struct pq_ent *e)
{
	switch (e->kind) {
	case PQ_DESCRIBE:
	case PQ_EXECUTE:
		pg_shape_unref(e->shape);
		break;
	case PQ_SUBST:
		refusal_free(e->refusal);
		break;
	case PQ_QUERY:
		qinfo_free(e->qinfo);
		break;
	default:
		break;
	}
	stmt_unref(e->stmt);
	e->ref = NULL;
	e->stmt = NULL;
}

/* --- the cancel table ---------------------------------------------------------------------- */

struct cancel_key {
	struct cancel_key *next;
	uint32_t pid, key;
	uint64_t session;
	char agent[128];
	char target[128];
	char upstream[64];
};

static pthread_mutex_t cancel_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cancel_key *cancel_keys[256];

static size_t cancel_bucket(uint32_t pid, uint32_t key)
{
	return (pid * 2654435761u ^ key) & 255;
}

static void cancel_register(struct ag_session *s, uint32_t pid, uint32_t key)
{
	struct cancel_key *k = calloc(1, sizeof(*k));
	size_t b = cancel_bucket(pid, key);

	if (!k)
		return;
	k->pid = pid;
	k->key = key;
	k->session = s->id;
	copy_str(k->agent, sizeof(k->agent), s->agent);
	copy_str(k->target, sizeof(k->target), s->target_name);
	copy_str(k->upstream, sizeof(k->upstream), s->orig_dst);
	pthread_mutex_lock(&cancel_lock);
	k->next = cancel_keys[b];
	cancel_keys[b] = k;
	pthread_mutex_unlock(&cancel_lock);
}

static void cancel_unregister(uint64_t session, uint32_t pid, uint32_t key)
{
	struct cancel_key **pp;

	pthread_mutex_lock(&cancel_lock);
	for (pp = &cancel_keys[cancel_bucket(pid, key)]; *pp; pp = &(*pp)->next)
		if ((*pp)->session == session && (*pp)->pid == pid && (*pp)->key == key) {
			struct cancel_key *k = *pp;

			*pp = k->next;
			free(k);
			break;
		}
	pthread_mutex_unlock(&cancel_lock);
}

/*
 * Which session a CancelRequest is for; true only when that session is of the same agent and
 * reaches the same target at the same address as this connection does.
 */
static bool cancel_lookup(struct ag_session *s, uint32_t pid, uint32_t key, uint64_t *session)
{
	bool ok = false;

	pthread_mutex_lock(&cancel_lock);
	for (struct cancel_key *k = cancel_keys[cancel_bucket(pid, key)]; k && !ok; k = k->next) {
		if (k->pid != pid || k->key != key)
			continue;
		*session = k->session;
		ok = !strcmp(k->agent, s->agent) && !strcmp(k->target, s->target_name) &&
		     !strcmp(k->upstream, s->orig_dst);
	}
	pthread_mutex_unlock(&cancel_lock);
	return ok;
}

/* --- decisions --------------------------------------------------------------------------- */

struct verdict {
	bool refuse;
	struct pg_refusal *refusal; /* when refused */
	bool hold;		    /* a `then: approve` rule asks a human first */
	bool approved;		    /* ... and an approval or a grant of one lets it pass */
	char rule[64];		    /* hold: the rule */
	uint64_t fingerprint;	    /* hold: of the whole string */
	uint64_t classes;	    /* of all statements */
	size_t nstmts;		    /* not counting empty ones */
	enum ag_action action;	    /* the rule's, for the audit log */
};

static struct pg_refusal *refusal_new(const char *code, const char *msg, const char *detail,
				      int position)
{
	struct pg_refusal *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	copy_str(r->code, sizeof(r->code), code);
	r->message = strdup(msg);
	r->detail = detail ? strdup(detail) : NULL;
	r->position = position;
	if (!r->message || (detail && !r->detail)) {
		refusal_free(r);
		return NULL;
	}
	return r;
}

static struct pg_stmt *stmt_find(struct pg *pg, const char *name)
{
	return (struct pg_stmt *)map_get(&pg->stmts, name);
}

/*
 * Decides a Query string or a Parse: every statement classified (into res, the caller's to
 * free), EXECUTE resolved to what was prepared under its name, then the rule. On success
 * v->refuse says what to do; <0: -ENOMEM. res->nstmts is 0 when the SQL did not parse.
 */
static int decide_rules(struct ag_session *s, const char *sql, size_t len, struct verdict *v,
			struct ag_sql_result *res, bool approved)
{
	struct pg *pg = PG(s);
	struct ag_sql_stmt *adj = NULL;
	struct ag_sql_result view;
	struct ag_sql_decision d;
	char classes[256], detail[512], msg[256], ex[160];
	int rc;

	memset(v, 0, sizeof(*v));
	memset(res, 0, sizeof(*res));
	/* Classification is cached per worker by text in sql.c: -M prepared parses once. */
	rc = ag_sql_classify(sql, res);
	if (rc == -EINVAL) {
		snprintf(msg, sizeof(msg), "agentgate: cannot parse the statement: %s",
			 res->error ? res->error : "syntax error");
		v->refuse = true;
		v->refusal = refusal_new(PG_SQLSTATE_SYNTAX_ERROR, msg,
					 "Statements agentgate cannot parse are refused.",
					 res->error_pos);
		sql_excerpt(sql, len, ex, sizeof(ex));
		pr_info("session %llu: refused unparseable SQL (%s): %s", (unsigned long long)s->id,
			res->error ? res->error : "?", ex);
		ag_sql_result_free(res);
		memset(res, 0, sizeof(*res));
		return v->refusal ? 0 : -ENOMEM;
	}
	if (rc) {
		memset(res, 0, sizeof(*res));
		return rc;
	}
	view = *res;
	for (size_t i = 0; i < res->nstmts; i++) {
		const struct ag_sql_stmt *st = &res->stmts[i];
		struct pg_stmt *p;

		v->classes |= st->classes;
		/* Only a truly empty statement skips the rules; an unknown class (0) does not. */
		if (st->classes == AG_SQL_EMPTY)
			continue;
		v->nstmts++;
		if (!st->execute_name)
			continue;
		/* EXECUTE: decided by what was prepared under that name. */
		p = stmt_find(pg, st->execute_name);
		if (!p) {
			snprintf(msg, sizeof(msg),
				 "agentgate: blocked: EXECUTE of unknown prepared statement \"%s\"",
				 st->execute_name);
			v->refuse = true;
			v->refusal = refusal_new(PG_SQLSTATE_INSUFFICIENT_PRIVILEGE, msg,
						 "A prepared statement agentgate did not see "
						 "prepared cannot be decided.",
						 0);
			free(adj);
			return v->refusal ? 0 : -ENOMEM;
		}
		if (!adj) {
			adj = malloc(res->nstmts * sizeof(*adj));
			if (!adj)
				return -ENOMEM;
			memcpy(adj, res->stmts, res->nstmts * sizeof(*adj));
			view.stmts = adj;
		}
		adj[i].classes = p->classes;
		adj[i].tables = p->tables;
		adj[i].ntables = p->ntables;
		adj[i].where_absent = p->where_absent;
		v->classes |= p->classes;
	}
	if (!v->nstmts) {
		free(adj);
		return 0; /* only empty statements: nothing runs */
	}
	ag_sql_decide_run(pg->rule, &view, &d);
	free(adj);
	v->action = s->observe && d.action != AG_ACT_ALLOW ? AG_ACT_OBSERVE : d.action;
	copy_str(v->rule, sizeof(v->rule), d.rule ? d.rule : "");
	if (d.action == AG_ACT_ALLOW || d.action == AG_ACT_OBSERVE)
		return 0;
	ag_sql_class_names(v->classes, classes, sizeof(classes));
	sql_excerpt(sql, len, ex, sizeof(ex));
	if (s->observe) {
		pr_info("session %llu: observe mode, would %s by rule %s (%s): %s",
			(unsigned long long)s->id, d.action == AG_ACT_DENY ? "block" : "hold",
			d.rule ? d.rule : "default", classes, ex);
		return 0;
	}
	if (d.action == AG_ACT_APPROVE) {
		char grant[AG_APPROVAL_ID_MAX];

		v->fingerprint = ag_sql_fingerprint(sql);
		if (approved) {
			v->approved = true;
			pr_info("session %llu: approved, runs (rule %s): %s",
				(unsigned long long)s->id, d.rule ? d.rule : "default", ex);
			return 0;
		}
		if (ag_approval_granted(s, d.rule, v->fingerprint, grant)) {
			v->approved = true;
			pr_info("session %llu: passes by the grant of approval %s (rule %s): %s",
				(unsigned long long)s->id, grant, d.rule ? d.rule : "default", ex);
			return 0;
		}
		v->hold = true;
		copy_str(v->rule, sizeof(v->rule), d.rule ? d.rule : "default");
		return 0;
	}
	snprintf(detail, sizeof(detail), "statement class: %s; %s", classes,
		 d.why[0] ? d.why : "no rule allows it");
	snprintf(msg, sizeof(msg), "agentgate: blocked by rule %s", d.rule ? d.rule : "default");
	pr_info("session %llu: %s (%s): %s", (unsigned long long)s->id, msg + 11, classes, ex);
	v->refuse = true;
	v->refusal = refusal_new(PG_SQLSTATE_INSUFFICIENT_PRIVILEGE, msg, detail, 0);
	return v->refusal ? 0 : -ENOMEM;
}

/*
 * decide_rules(), and the answer to a held message when it comes back: approved lets a
 * `then: approve` decision pass; denied or timed out refuses it whatever the rules say now.
 */
static int decide(struct ag_session *s, const char *sql, size_t len, struct verdict *v,
		  struct ag_sql_result *res)
{
	struct pg *pg = PG(s);
	struct pg_refusal *r = pg->resume_refusal;
	int resume = pg->resume, rc;

	pg->resume = RESUME_NONE;
	pg->resume_refusal = NULL;
	rc = decide_rules(s, sql, len, v, res, resume == RESUME_ALLOW);
	if (rc || resume != RESUME_REFUSE) {
		refusal_free(r);
		return rc;
	}
	refusal_free(v->refusal);
	v->refuse = true;
	v->hold = false;
	v->approved = false;
	v->refusal = r;
	return r ? 0 : -ENOMEM;
}

/* Remembers what a name prepares, so that EXECUTE name is decided by it. */
static struct pg_stmt *stmt_record(struct pg *pg, const char *name, const struct ag_sql_result *r,
				   bool from_prepare, int *err)
{
	struct pg_stmt *st = stmt_find(pg, name), *old = NULL;

	*err = 0;
	if (!st && pg->stmts.n >= PG_MAX_NAMED) {
		*err = -E2BIG;
		return NULL;
	}
	/* A name given again keeps what it had too: the server may refuse the new one. */
	if (st && *name) {
		old = st;
	} else if (st) {
		map_del(&pg->stmts, name);
		stmt_unref(st);
	}
	if (!old) {
		st = calloc(1, sizeof(*st));
		if (!st || !(st->nm.name = strdup(name))) {
			free(st);
			*err = -ENOMEM;
			return NULL;
		}
		st->refs = 1;
	} else {
		st = old;
	}
	for (size_t i = 0; r && i < r->nstmts; i++) {
		const struct ag_sql_stmt *x = &r->stmts[i];
		uint64_t c = x->classes;

		if (from_prepare) {
			if (!x->prepare_name || strcmp(x->prepare_name, name))
				continue;
			c &= ~(uint64_t)AG_SQL_PREPARE;
		}
		if (x->execute_name) {
			const struct pg_stmt *p = stmt_find(pg, x->execute_name);

			if (p && p != st)
				c = p->classes;
		}
		st->classes |= c;
		st->where_absent |= x->where_absent;
		for (size_t t = 0; t < x->ntables; t++) {
			char **nt = realloc(st->tables, (st->ntables + 1) * sizeof(*nt));

			if (!nt)
				break;
			st->tables = nt;
			if (!(nt[st->ntables] = strdup(x->tables[t])))
				break;
			st->ntables++;
		}
	}
	if (!old && map_put(&pg->stmts, &st->nm)) {
		stmt_unref(st);
		*err = -ENOMEM;
		return NULL;
	}
	return st;
}

static bool is_ddl(uint64_t classes);

/* DDL may add columns a mask covers: resolve them again before the next statement. */
static void note_ddl(struct pg *pg, uint64_t classes)
{
	if (pg->cat_sql && is_ddl(classes))
		pg->cat_dirty = true;
}

/* The text of statement i of a string, NUL-terminated (caller frees). */
static char *stmt_text(const char *sql, size_t len, const struct ag_sql_stmt *st)
{
	size_t from = st->location > 0 ? (size_t)st->location : 0, n;
	char *t;

	if (from > len)
		from = len;
	n = st->length > 0 ? (size_t)st->length : len - from;
	if (from + n > len)
		n = len - from;
	t = malloc(n + 1);
	if (t) {
		memcpy(t, sql + from, n);
		t[n] = '\0';
	}
	return t;
}

/*
 * For masking: the COPY TO STDOUT statements of a string, in order. A COPY that cannot be
 * masked is refused instead (binary format; a query reading a table with masked columns).
 */
static int copy_specs(struct ag_session *s, const char *sql, size_t len,
		      const struct ag_sql_result *r, struct pg_copy_spec ***out, size_t *nout,
		      struct verdict *v)
{
	struct pg *pg = PG(s);
	struct pg_copy_spec **list = NULL;
	size_t n = 0;
	int err = 0;

	*out = NULL;
	*nout = 0;
	for (size_t i = 0; r && i < r->nstmts; i++) {
		const struct ag_sql_stmt *st = &r->stmts[i];
		struct pg_copy_spec *cs = NULL, **nl;
		const char *why = NULL;
		char *text;

		if (!(st->classes & AG_SQL_COPY))
			continue;
		text = stmt_text(sql, len, st);
		if (!text)
			return -ENOMEM;
		err = pg_copy_spec_parse(text, &cs);
		free(text);
		if (err == -EINVAL) {
			err = 0;
			continue; /* EXPLAIN of a COPY, say: no rows come back */
		}
		if (err)
			break;
		if (!cs->to_stdout) {
			pg_copy_spec_free(cs);
			continue;
		}
		if (cs->format == PG_COPY_BINARY)
			why = "COPY TO STDOUT in binary format cannot be masked; use text or csv";
		for (size_t t = 0; !why && !cs->table && t < st->ntables; t++) {
			char schema[128] = "", *dot = strchr(st->tables[t], '.');
			const char *table = st->tables[t];

			if (dot) {
				snprintf(schema, sizeof(schema), "%.*s", (int)(dot - table), table);
				table = dot + 1;
			}
			if (pg_catalog_has_table(pg->mk.cat, dot ? schema : NULL, table))
				why = "COPY (query) TO STDOUT reads masked columns; use SELECT, or "
				      "COPY the table";
		}
		if (why) {
			char msg[256];

			pg_copy_spec_free(cs);
			snprintf(msg, sizeof(msg), "agentgate: blocked: %s", why);
			v->refuse = true;
			v->refusal = refusal_new(PG_SQLSTATE_INSUFFICIENT_PRIVILEGE, msg,
						 "The rule masks values this COPY would send.", 0);
			err = v->refusal ? 0 : -ENOMEM;
			break;
		}
		nl = realloc(list, (n + 1) * sizeof(*nl));
		if (!nl) {
			pg_copy_spec_free(cs);
			err = -ENOMEM;
			break;
		}
		list = nl;
		list[n++] = cs;
	}
	if (err || v->refuse) {
		for (size_t i = 0; i < n; i++)
			pg_copy_spec_free(list[i]);
		free(list);
		return err;
	}
	*out = list;
	*nout = n;
	return 0;
}

/* --- stand-ins for refused messages -------------------------------------------------------- */

/*
 * The stand-in: for a Query, a Query; for a Parse, a Parse of the same statement name (a failed
 * Parse drops the unnamed statement, a named one is left alone — as for the real one).
 */
static int send_stand_in(struct ag_session *s, struct fwd *f, const char *parse_name)
{
	struct pg *pg = PG(s);
	char sql[64];
	int rc;

	/* A lone identifier: a syntax error at parse time, before anything runs or locks. */
	snprintf(sql, sizeof(sql), "agentgate_refused_%s", pg->nonce);
	rc = parse_name ? pg_put_parse(&pg->scratch, parse_name, sql)
			: pg_put_query(&pg->scratch, sql);
	if (rc)
		return rc;
	fwd_send_buf(f, &pg->scratch);
	return f->err;
}

/*
 * Answers a refused Query or FunctionCall: the stand-in goes upstream, its error comes back as
 * ours, then the server's ReadyForQuery.
 */
static int refuse_query(struct ag_session *s, struct fwd *f, struct pg_refusal *r)
{
	struct pg *pg = PG(s);
	int rc;

	s->blocked++;
	if (!r)
		return -ENOMEM;
	if (pg->srv_skip) {
		/* The server ignores a Query while it skips to Sync; so would it this one. */
		refusal_free(r);
		return 0;
	}
	rc = send_stand_in(s, f, NULL);
	if (!rc)
		rc = pq_push(pg, PQ_SUBST, PQF_QUERY, r, NULL);
	else
		refusal_free(r);
	return rc;
}

/* A refused Parse: the stand-in's error is ours, and everything up to Sync is dropped. */
static int refuse_parse(struct ag_session *s, struct fwd *f, const char *name, struct pg_refusal *r)
{
	struct pg *pg = PG(s);
	int rc;

	s->blocked++;
	pg->skip = true;
	if (!r)
		return -ENOMEM;
	if (pg->srv_skip) {
		refusal_free(r);
		return 0;
	}
	rc = send_stand_in(s, f, name);
	if (!rc)
		rc = pq_push(pg, PQ_SUBST, 0, r, NULL);
	else
		refusal_free(r);
	pg->ext_open = true;
	return rc;
}

/* --- statements held for approval ----------------------------------------------------------- */

/*
 * The decision, on the session's thread: the held message is decided again with it (approved:
 * it runs; denied or timed out: it is refused as a blocked one is, stand-in and all), and then
 * whatever the agent sent after it.
 */
static void approval_done(struct ag_session *s, void *arg, const struct ag_approval_info *a)
{
	struct pg *pg = PG(s);
	char msg[400], detail[160], dur[32];

	if (!pg)
		return;
	pg->held = NULL;
	if (a->state == AG_APPROVAL_APPROVED) {
		pg->resume = RESUME_ALLOW;
	} else if (a->state == AG_APPROVAL_CANCELLED) {
		/* The agent's CancelRequest: answered as the server answers one. */
		snprintf(detail, sizeof(detail), "agentgate: approval %s withdrawn by the agent.",
			 a->id);
		pg->resume = RESUME_REFUSE;
		refusal_free(pg->resume_refusal);
		pg->resume_refusal = refusal_new(PG_SQLSTATE_QUERY_CANCELED,
						 "canceling statement due to user request", detail,
						 0);
		pr_info("session %llu: approval %s withdrawn by a CancelRequest",
			(unsigned long long)s->id, a->id);
	} else {
		if (a->state == AG_APPROVAL_EXPIRED)
			snprintf(msg, sizeof(msg), "agentgate: approval %s timed out after %s", a->id,
				 ag_approval_fmt_duration(a->timeout_ms, dur, sizeof(dur)));
		else if (a->reason[0])
			snprintf(msg, sizeof(msg), "agentgate: denied by %s: %s", a->decided_by,
				 a->reason);
		else
			snprintf(msg, sizeof(msg), "agentgate: denied by %s", a->decided_by);
		snprintf(detail, sizeof(detail), "Rule %s asked for an approval (%s).", a->rule,
			 a->id);
		pg->resume = RESUME_REFUSE;
		refusal_free(pg->resume_refusal);
		pg->resume_refusal =
			refusal_new(PG_SQLSTATE_INSUFFICIENT_PRIVILEGE, msg, detail, 0);
		pr_info("session %llu: %s", (unsigned long long)s->id, msg + 11);
	}
	ag_session_resume(s, AG_SIDE_AGENT);
}

/*
 * Holds the message being decided: an approval is opened, the agent is told at once with a
 * NoticeResponse, and its input stops being read by us from this message on (what came before
 * it goes upstream now). The server and every other session carry on.
 */
static int hold_begin(struct ag_session *s, struct fwd *f, const char *sql, size_t len,
		      const struct verdict *v)
{
	struct pg *pg = PG(s);
	char msg[200], hint[120];
	struct pg_err e = { .severity = "NOTICE", .code = "00000", .message = msg, .hint = hint };
	struct ag_buf b = { 0 };
	int rc;

	pg->held = ag_approval_request(s, "postgres", sql, len, v->rule, v->fingerprint,
				       approval_done, NULL, pg->held_id);
	if (!pg->held)
		return -ENOMEM;
	snprintf(msg, sizeof(msg), "agentgate: waiting for approval %s (rule %s)", pg->held_id,
		 v->rule);
	snprintf(hint, sizeof(hint), "An approver runs: agctl approval approve %s", pg->held_id);
	fwd_flush(f);
	rc = f->err ? f->err : pg_put_error(&b, PG_B_NOTICE, &e);
	if (!rc)
		rc = ag_session_send(s, AG_SIDE_AGENT, ag_buf_head(&b), ag_buf_len(&b));
	ag_buf_free(&b);
	return rc ? rc : PG_HELD;
}

/* --- the catalog query --------------------------------------------------------------------- */

static int catalog_send(struct ag_session *s, struct fwd *f, bool refresh)
{
	struct pg *pg = PG(s);
	int rc;

	pg_catalog_unref(pg->cat_new);
	pg->cat_new = pg_catalog_new();
	if (!pg->cat_new)
		return -ENOMEM;
	pg->cat_error[0] = '\0';
	rc = pg_put_query(&pg->scratch, pg->cat_sql);
	if (rc)
		return rc;
	if (f)
		fwd_send_buf(f, &pg->scratch);
	else
		rc = send_to(s, AG_SIDE_UPSTREAM, &pg->scratch);
	if (f && f->err)
		return f->err;
	if (rc)
		return rc;
	pg->cat_pending = true;
	pg->cat_dirty = false;
	/* Never dropped as skipped: it is sent only between complete sequences. */
	pg->srv_skip = false;
	return pq_push(pg, PQ_CATALOG, refresh ? PQF_REFRESH : 0, NULL, NULL);
}

/*
 * Before a statement is forwarded at a boundary (no extended sequence open): resolve the masked
 * columns again if DDL may have added some.
 */
static int catalog_refresh(struct ag_session *s, struct fwd *f, bool boundary)
{
	struct pg *pg = PG(s);

	if (!pg->cat_dirty || pg->cat_pending || !boundary || pg->txn == 'E')
		return 0;
	return catalog_send(s, f, true);
}

/*
 * Column rules: a statement that stores a value computed from a masked column (INSERT ...
 * SELECT email, UPDATE ... SET note = email, CREATE TABLE AS, set_config(..., email)) would
 * let the agent read it back from a column no rule covers. Refused, when the statement writes
 * or sets anything (a plain SELECT's outputs are masked on their way out).
 */
static void refuse_stored_masked(struct pg *pg, const char *sql, struct verdict *v)
{
	const char *kind = NULL;
	char m[192];
	int rc;

	if (v->refuse || !pg->mk.m || !pg->mk.cat ||
	    !(v->classes & (AG_SQL_WRITE | AG_SQL_SET | AG_SQL_NOTIFY | AG_SQL_PREPARE |
			    AG_SQL_EXPLAIN | AG_SQL_INSERT | AG_SQL_UPDATE | AG_SQL_MERGE |
			    AG_SQL_DDL)))
		return;
	rc = sql_origin_stores_masked(sql, pg->mk.m, pg->mk.cat, &kind);
	if (!rc)
		return;
	snprintf(m, sizeof(m),
		 "agentgate: blocked: %s: masked values would be readable unmasked afterwards",
		 rc < 0 ? "out of memory checking the statement" : kind);
	v->refuse = true;
	v->refusal = refusal_new(PG_SQLSTATE_INSUFFICIENT_PRIVILEGE, m,
				 "Masked columns may be read, not copied where no rule covers them, "
				 "nor renamed.",
				 0);
}

/*
 * Rows that could read columns made by DDL in the same string or pipeline would come back
 * before the catalog is resolved again: such a mix is refused while columns are masked.
 */
static struct pg_refusal *ddl_mix_refusal(void)
{
	return refusal_new(
		PG_SQLSTATE_FEATURE_NOT_SUPPORTED,
		"agentgate: blocked: DDL and other statements in one string or pipeline "
		"while columns are masked",
		"Send the DDL on its own (its own Query, or Sync after it), then the rest.", 0);
}

static bool is_ddl(uint64_t classes)
{
	return classes & (AG_SQL_DDL | AG_SQL_CREATE | AG_SQL_ALTER);
}

/* --- agent messages ------------------------------------------------------------------------ */

/* ag_sql_class_names() into the thread's buffer, the last set's names kept (one per statement). */
static const char *class_names(uint64_t classes)
{
	static __thread char names[256];
	static __thread uint64_t last;
	static __thread bool valid;

	if (!valid || classes != last) {
		ag_sql_class_names(classes, names, sizeof(names));
		last = classes;
		valid = true;
	}
	return names;
}

/* A decided Query or Parse, for the audit log. */
static void audit_statement(struct ag_session *s, const char *what, const char *name,
			    const char *sql, size_t len, const struct verdict *v)
{
	/* Refused without a deny or approve rule: unparseable, an unknown EXECUTE, a limit. */
	enum ag_action a = v->refuse && v->action != AG_ACT_APPROVE ? AG_ACT_DENY : v->action;

	ag_audit_statement(s, what, name, sql, len, a,
			   v->refuse && v->action == AG_ACT_ALLOW ? NULL : v->rule[0] ? v->rule : NULL,
			   class_names(v->classes),
			   v->refuse && v->refusal ? v->refusal->message : NULL);
}

static int on_query(struct ag_session *s, struct fwd *f, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);
	const char *sql = (const char *)msg + PG_HDR;
	size_t len = total - PG_HDR - 1;
	struct ag_sql_result r;
	struct pg_qinfo *qi = NULL;
	struct verdict v;
	int rc;

	rc = decide(s, sql, len, &v, &r);
	if (rc)
		return rc;
	if (v.hold) {
		ag_sql_result_free(&r);
		return hold_begin(s, f, sql, len, &v);
	}
	s->statements += v.nstmts;
	if (!v.refuse && pg->cat_sql && v.nstmts > 1 && is_ddl(v.classes)) {
		v.refuse = true;
		v.refusal = ddl_mix_refusal();
	}
	refuse_stored_masked(pg, sql, &v);
	if (!v.refuse && pg->mk.m && (v.classes & AG_SQL_COPY)) {
		struct pg_copy_spec **list;
		size_t n;

		rc = copy_specs(s, sql, len, &r, &list, &n, &v);
		if (!rc && n) {
			qi = qinfo_new();
			if (qi) {
				qi->copies = list;
				qi->n = n;
			} else {
				for (size_t i = 0; i < n; i++)
					pg_copy_spec_free(list[i]);
				free(list);
				rc = -ENOMEM;
			}
		}
		if (rc)
			goto out;
	}
	if (!v.refuse && pg->mk.m && pg->cat_sql) {
		/* Column rules: the results' shapes read the string's origins (sqlorigin.h). */
		if (!qi)
			qi = qinfo_new();
		if (!qi || !(qi->sql = pg_sql_new(sql, len))) {
			rc = -ENOMEM;
			goto out;
		}
	}
	audit_statement(s, "query", NULL, sql, len, &v);
	if (v.refuse) {
		rc = refuse_query(s, f, v.refusal);
		goto out;
	}
	/* Prepared by name: remember what, for EXECUTE. */
	for (size_t i = 0; i < r.nstmts; i++)
		if (r.stmts[i].prepare_name) {
			int err;

			stmt_record(pg, r.stmts[i].prepare_name, &r, true, &err);
		}
	rc = catalog_refresh(s, f, !pg->ext_open);
	if (rc)
		goto out;
	note_ddl(pg, v.classes);
	fwd_keep(f, msg - f->base, total);
	rc = pq_push(pg, PQ_QUERY, 0, qi, NULL);
	qi = NULL;
out:
	qinfo_free(qi);
	ag_sql_result_free(&r);
	return rc;
}

static int on_parse(struct ag_session *s, struct fwd *f, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);
	struct ag_sql_result r;
	struct pg_copy_spec **copies = NULL;
	size_t ncopies = 0;
	const char *name, *sql;
	bool was_open = pg->ext_open;
	struct verdict v;
	struct pg_rd rd;
	size_t sqllen;
	int rc;

	pg_rd_init(&rd, msg + PG_HDR, total - PG_HDR);
	name = pg_rd_str(&rd, NULL);
	sql = pg_rd_str(&rd, &sqllen);
	if (rd.bad)
		return -EPROTO;
	pg->ext_open = true;
	rc = decide(s, sql, sqllen, &v, &r);
	if (rc)
		return rc;
	if (v.hold) {
		/* Decided again from the same state once the answer is in. */
		pg->ext_open = was_open;
		ag_sql_result_free(&r);
		return hold_begin(s, f, sql, sqllen, &v);
	}
	if (!v.refuse && pg->cat_sql && was_open && pg->cat_dirty) {
		v.refuse = true;
		v.refusal = ddl_mix_refusal();
	}
	refuse_stored_masked(pg, sql, &v);
	if (!v.refuse && *name && !stmt_find(pg, name) && pg->stmts.n >= PG_MAX_NAMED) {
		char m[128];

		snprintf(m, sizeof(m),
			 "agentgate: too many prepared statements in one session (%d)",
			 PG_MAX_NAMED);
		v.refuse = true;
		v.refusal = refusal_new(PG_SQLSTATE_PROGRAM_LIMIT, m, NULL, 0);
	}
	if (!v.refuse && pg->mk.m && (v.classes & AG_SQL_COPY)) {
		rc = copy_specs(s, sql, sqllen, &r, &copies, &ncopies, &v);
		if (rc)
			goto out;
	}
	audit_statement(s, "parse", name, sql, sqllen, &v);
	if (v.refuse) {
		rc = refuse_parse(s, f, name, v.refusal);
		goto out;
	}
	/* Named: for EXECUTE and Bind; unnamed only when masking needs its COPY spec. */
	if (*name || pg->mk.m) {
		struct pg_stmt *st = stmt_record(pg, name, &r, false, &rc);

		if (st && v.approved)
			st->approved = true;
		if (st && ncopies && !st->copy) {
			st->copy = copies[0];
			copies[0] = NULL;
		}
		if (!rc && st && pg->mk.m && pg->cat_sql && !st->sql &&
		    !(st->sql = pg_sql_new(sql, sqllen)))
			rc = -ENOMEM;
		if (rc)
			goto out;
	}
	rc = catalog_refresh(s, f, !was_open);
	if (rc)
		goto out;
	note_ddl(pg, v.classes);
	fwd_keep(f, msg - f->base, total);
	rc = pq_push(pg, PQ_SIMPLE, 0, NULL, NULL);
out:
	for (size_t i = 0; i < ncopies; i++)
		pg_copy_spec_free(copies[i]);
	free(copies);
	ag_sql_result_free(&r);
	return rc;
}

static int on_bind(struct ag_session *s, struct fwd *f, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);

	pg->ext_open = true;
	if (pg->mk.m) {
		const char *portal, *stmt;
		struct pg_portal *p;
		struct pg_rd rd;

		pg_rd_init(&rd, msg + PG_HDR, total - PG_HDR);
		portal = pg_rd_str(&rd, NULL);
		stmt = pg_rd_str(&rd, NULL);
		if (rd.bad)
			return -EPROTO;
		p = (struct pg_portal *)map_get(&pg->portals, portal);
		if (p) {
			/* Bound again (the unnamed portal of every -M prepared Execute): reused. */
			stmt_unref(p->stmt);
			pg_shape_unref(p->shape);
			p->stmt = NULL;
			p->shape = NULL;
		} else {
			if (pg->portals.n >= PG_MAX_NAMED)
				return -E2BIG;
			p = calloc(1, sizeof(*p));
			if (!p || !(p->nm.name = strdup(portal))) {
				free(p);
				return -ENOMEM;
			}
			if (map_put(&pg->portals, &p->nm)) {
				portal_free(p);
				return -ENOMEM;
			}
		}
		p->stmt = stmt_find(pg, stmt);
		if (p->stmt)
			p->stmt->refs++;
	}
	fwd_keep(f, msg - f->base, total);
	return pq_push(pg, PQ_SIMPLE, 0, NULL, NULL);
}

static int on_describe(struct ag_session *s, struct fwd *f, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);
	struct pg_shape *sh = NULL;
	struct pg_rd rd;
	uint8_t what;
	const char *name;

	pg->ext_open = true;
	pg_rd_init(&rd, msg + PG_HDR, total - PG_HDR);
	what = pg_rd_u8(&rd);
	name = pg_rd_str(&rd, NULL);
	if (rd.bad || (what != 'S' && what != 'P'))
		return -EPROTO;
	if (pg->mk.m && what == 'P') {
		struct pg_portal *p = (struct pg_portal *)map_get(&pg->portals, name);

		sh = pg_shape_new();
		if (!sh)
			return -ENOMEM;
		if (p) {
			pg_shape_unref(p->shape);
			p->shape = pg_shape_ref(sh);
			if (p->stmt)
				sh->sql = pg_sql_ref(p->stmt->sql);
		}
	}
	fwd_keep(f, msg - f->base, total);
	return pq_push(pg, PQ_DESCRIBE, 0, sh, NULL);
}

static int on_execute(struct ag_session *s, struct fwd *f, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);
	struct pg_shape *sh = NULL;
	struct pg_stmt *st = NULL;
	int rc;

	pg->ext_open = true;
	s->statements++;
	ag_audit_statement(s, "execute",
			   memchr(msg + PG_HDR, 0, total - PG_HDR) ? (const char *)msg + PG_HDR : "",
			   NULL, 0, AG_ACT_ALLOW, NULL, NULL, NULL);
	if (pg->mk.m) {
		struct pg_portal *p;
		const char *name;
		struct pg_rd rd;

		pg_rd_init(&rd, msg + PG_HDR, total - PG_HDR);
		name = pg_rd_str(&rd, NULL);
		if (rd.bad)
			return -EPROTO;
		p = (struct pg_portal *)map_get(&pg->portals, name);
		sh = p ? pg_shape_ref(p->shape) : NULL;
		if (p && p->stmt) {
			st = p->stmt;
			st->refs++;
		}
		if (!sh) {
			/* Rows we must mask and no RowDescription asked for: ask ourselves. */
			sh = pg_shape_new();
			if (sh && st)
				sh->sql = pg_sql_ref(st->sql);
			if (!sh || pg_put_describe(&pg->scratch, 'P', name)) {
				pg_shape_unref(sh);
				stmt_unref(st);
				return -ENOMEM;
			}
			fwd_send_buf(f, &pg->scratch);
			rc = pq_push(pg, PQ_DESCRIBE, PQF_INTERNAL, pg_shape_ref(sh), NULL);
			if (rc) {
				pg_shape_unref(sh);
				stmt_unref(st);
				return rc;
			}
			if (p)
				p->shape = pg_shape_ref(sh);
		}
	}
	fwd_keep(f, msg - f->base, total);
	return pq_push(pg, PQ_EXECUTE, 0, sh, st);
}

static int on_close(struct ag_session *s, struct fwd *f, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);
	struct pg_rd rd;
	uint8_t what;
	const char *name;

	pg->ext_open = true;
	pg_rd_init(&rd, msg + PG_HDR, total - PG_HDR);
	what = pg_rd_u8(&rd);
	name = pg_rd_str(&rd, NULL);
	if (rd.bad || (what != 'S' && what != 'P'))
		return -EPROTO;
	if (what == 'S')
		stmt_unref((struct pg_stmt *)map_del(&pg->stmts, name));
	else
		portal_free((struct pg_portal *)map_del(&pg->portals, name));
	fwd_keep(f, msg - f->base, total);
	return pq_push(pg, PQ_SIMPLE, 0, NULL, NULL);
}

/* Types an agent may send once the session is ready. */
static bool agent_type_known(uint8_t t)
{
	return t && strchr("BCdcfDEHFPQSX", t);
}

/*
 * Agent messages after the startup packet. Returns bytes consumed or -1 (session ended).
 */
static long agent_messages(struct ag_session *s, struct fwd *f, const uint8_t *data, size_t len,
			   size_t off)
{
	struct pg *pg = PG(s);

	s->side[AG_SIDE_AGENT].hold = 0;
	while (off < len) {
		const uint8_t *m = data + off;
		size_t avail = len - off, total;
		uint32_t mlen;
		uint8_t type;
		int rc = 0;

		if (pg->a_pass) {
			size_t n = avail < pg->a_pass ? avail : pg->a_pass;

			if (!pg->a_pass_drop)
				fwd_keep(f, off, n);
			pg->a_pass -= n;
			off += n;
			continue;
		}
		if (pg->stalled || pg->held)
			break;
		if (avail < PG_HDR)
			break;
		type = m[0];
		mlen = pg_get32(m + 1);
		if (pg->terminated)
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"message after Terminate (type 0x%02x)", type);
		if (mlen < 4)
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"invalid message length %u (type 0x%02x)", mlen, type);
		if (mlen > pg_max_message)
			return pg_fatal(
				s, f, PG_SQLSTATE_PROGRAM_LIMIT,
				"message too large (%u bytes, type 0x%02x; the limit is %zu)", mlen,
				type, pg_max_message);
		if (pg->phase == PH_AUTH && type == PG_F_PASSWORD && pg->login)
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"a password message, but the gateway asked for none");
		if (pg->phase == PH_AUTH) {
			if (type != PG_F_PASSWORD && type != PG_F_TERMINATE) {
				if (!agent_type_known(type))
					return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
							"expected an authentication response, got "
							"message type 0x%02x",
							type);
				/* Sent ahead of ReadyForQuery: decided once the session is ready. */
				pg->stalled = true;
				break;
			}
		} else if (!agent_type_known(type)) {
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"unknown message type 0x%02x", type);
		}
		total = (size_t)mlen + 1;
		if (avail < total) {
			/* CopyData needs no decision: stream it instead of holding it whole. */
			if (type == PG_F_COPY_DATA && pg->phase == PH_READY) {
				pg->a_pass = total;
				pg->a_pass_drop = pg->skip;
				continue;
			}
			s->side[AG_SIDE_AGENT].hold = total;
			break;
		}
		if (pg->phase == PH_READY && pg->pq.n >= PG_PQ_STALL) {
			pg->stalled = true;
			break;
		}
		if (pg->phase == PH_AUTH) {
			fwd_keep(f, off, total);
			if (type == PG_F_TERMINATE)
				pg->terminated = true;
			off += total;
			continue;
		}
		if (pg->skip && type != PG_F_SYNC && type != PG_F_TERMINATE) {
			off += total; /* after a refused message, up to Sync, as the server does */
			continue;
		}
		switch (type) {
		case PG_F_QUERY:
			if (total < PG_HDR + 1 || m[total - 1] ||
			    memchr(m + PG_HDR, 0, total - PG_HDR - 1))
				return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
						"malformed Query message (the query must be one "
						"NUL-terminated string)");
			rc = on_query(s, f, m, total);
			break;
		case PG_F_PARSE:
			rc = on_parse(s, f, m, total);
			break;
		case PG_F_BIND:
			rc = on_bind(s, f, m, total);
			break;
		case PG_F_DESCRIBE:
			rc = on_describe(s, f, m, total);
			break;
		case PG_F_EXECUTE:
			rc = on_execute(s, f, m, total);
			break;
		case PG_F_CLOSE:
			rc = on_close(s, f, m, total);
			break;
		case PG_F_SYNC:
			pg->skip = false;
			pg->ext_open = false;
			fwd_keep(f, off, total);
			rc = pq_push(pg, PQ_SYNC, 0, NULL, NULL);
			break;
		case PG_F_FUNCTION_CALL:
			/* Calls any function by OID, around every SQL rule. */
			pr_info("session %llu: refused a FunctionCall message",
				(unsigned long long)s->id);
			ag_audit_statement(s, "function_call", NULL, NULL, 0, AG_ACT_DENY, NULL,
					   NULL, "the FunctionCall protocol message is not allowed");
			rc = refuse_query(
				s, f,
				refusal_new(PG_SQLSTATE_INSUFFICIENT_PRIVILEGE,
					    "agentgate: blocked: the FunctionCall protocol "
					    "message is not allowed",
					    "Call functions with SQL, where rules apply.", 0));
			break;
		case PG_F_TERMINATE:
			pg->terminated = true;
			fwd_keep(f, off, total);
			break;
		default: /* Flush, CopyData, CopyDone, CopyFail: nothing to decide */
			fwd_keep(f, off, total);
			break;
		}
		if (rc == PG_HELD)
			break; /* not consumed: it waits in the buffer, with all after it */
		if (rc == -EPROTO)
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"malformed %c message", type);
		if (rc == -E2BIG)
			return pg_fatal(s, f, PG_SQLSTATE_PROGRAM_LIMIT,
					"too many portals in one session");
		if (rc || f->err)
			return pg_fatal(s, NULL, PG_SQLSTATE_INTERNAL, "relaying to the server: %s",
					strerror(-(rc ? rc : f->err)));
		off += total;
	}
	fwd_flush(f);
	if (f->err)
		return pg_fatal(s, NULL, PG_SQLSTATE_INTERNAL, "relaying to the server: %s",
				strerror(-f->err));
	return off;
}

/* --- TLS: SSLRequest both ways (the session layer does the handshakes) --------------------- */

#define PG_TLS_SQLSTATE "08006" /* connection_failure */

/* The agent's SSLRequest is answered 'S' when the target terminates TLS, and not twice. */
static bool pg_tls_agent_wants(struct ag_session *s)
{
	return ag_tls_client_terminates(s->target) && ag_tls_ready() &&
	       s->side[AG_SIDE_AGENT].tls == AG_TLS_NONE;
}

static long pg_tls_accept(struct ag_session *s)
{
	if (ag_session_send(s, AG_SIDE_AGENT, "S", 1)) {
		ag_session_fail(s, true, "postgres: agent closed");
		return -1;
	}
	return ag_session_start_tls(s, AG_SIDE_AGENT) ? -1 : 8;
}

/*
 * Before the startup packet first goes upstream: our own SSLRequest when the target's
 * tls.upstream asks for TLS; the startup packet then waits (in clear, queued) for the handshake.
 */
static int pg_tls_upstream_begin(struct ag_session *s, struct fwd *f)
{
	static const uint8_t ssl_request[8] = { 0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f };
	struct pg *pg = PG(s);

	if (ag_tls_upstream_mode(s->target) == AG_TLS_UP_NONE)
		return 0;
	fwd_flush(f);
	if (ag_session_send(s, AG_SIDE_UPSTREAM, ssl_request, sizeof(ssl_request)) ||
	    ag_session_tls_hold(s, AG_SIDE_UPSTREAM)) {
		ag_session_fail(s, true, "postgres: cannot send the SSLRequest upstream");
		return -1;
	}
	pg->up_tls_wait = true;
	return 0;
}

/* The server's one-byte answer to our SSLRequest: 'S' or the session is refused. */
static long pg_tls_answer(struct ag_session *s, const uint8_t *data, size_t len)
{
	struct pg *pg = PG(s);

	if (!len)
		return 0;
	pg->up_tls_wait = false;
	if (data[0] == 'S')
		return ag_session_start_tls(s, AG_SIDE_UPSTREAM) ? -1 : 1;
	/* Never a silent downgrade: the policy asked for TLS upstream. */
	return pg_fatal(s, NULL, PG_TLS_SQLSTATE, "upstream TLS refused: the server %s",
			data[0] == 'N' ? "does not accept TLS (answered 'N' to SSLRequest)"
				       : "answered SSLRequest with neither 'S' nor 'N'");
}

static void cred_after_tls(struct ag_session *s);

static void pg_tls_done(struct ag_session *s, enum ag_side side, const char *err)
{
	static const char verify[] = "certificate verify failed: ";

	if (side != AG_SIDE_UPSTREAM)
		return;
	if (!err) {
		if (PG(s)->cred_wait_tls)
			cred_after_tls(s);
		return;
	}
	if (!strncmp(err, verify, sizeof(verify) - 1))
		pg_fatal(s, NULL, PG_TLS_SQLSTATE, "upstream TLS verification failed: %s",
			 err + sizeof(verify) - 1);
	else
		pg_fatal(s, NULL, PG_TLS_SQLSTATE, "upstream TLS failed: %s", err);
}

static long cancel_request(struct ag_session *s, const uint8_t *pkt)
{
	struct pg *pg = PG(s);
	uint32_t pid = pg_get32(pkt + 8), key = pg_get32(pkt + 12);
	uint64_t owner = 0;

	pg->phase = PH_CANCEL;
	if (!cancel_lookup(s, pid, key, &owner)) {
		/* Like the server: no answer either way. */
		pr_info("session %llu: CancelRequest for backend %u %s: dropped",
			(unsigned long long)s->id, pid,
			owner ? "of another agent or target" : "that no session knows");
		ag_session_fail(s, false, "postgres: CancelRequest for an unknown backend dropped");
		return -1;
	}
	pr_info("session %llu: CancelRequest for backend %u of session %llu forwarded to %s",
		(unsigned long long)s->id, pid, (unsigned long long)owner, s->orig_dst);
	/* A statement of that session held for approval is what the agent gives up on. */
	ag_approval_withdraw(owner, "CancelRequest");
	if (ag_session_send(s, AG_SIDE_UPSTREAM, pkt, 16)) {
		ag_session_fail(s, true, "postgres: cannot forward the CancelRequest");
		return -1;
	}
	ag_session_shutdown(s, AG_SIDE_UPSTREAM);
	return 16;
}

/* --- the gateway's own login (a target with a credential) --------------------------------------- */

/* The credential is here (on the session's worker): log in upstream with it. */
static void cred_ready(struct ag_session *s, int err, const char *sqlstate, const char *why,
		       const struct ag_cred_login *login)
{
	struct pg *pg = PG(s);
	struct ag_buf b = { 0 };
	int rc;

	if (err) {
		pg_fatal(s, NULL, sqlstate, "no credential for target %s: %s", s->target_name, why);
		return;
	}
	pg->login = calloc(1, sizeof(*pg->login));
	if (!pg->login) {
		pg_fatal(s, NULL, PG_SQLSTATE_INTERNAL, "out of memory");
		return;
	}
	pg_login_init(pg->login, login->user, login->password);
	if (login->has_scram)
		pg_login_use_salted(pg->login, &login->scram);
	rc = pg_login_startup(&b, login->user, pg->database, pg->startup, pg->startup_len);
	free(pg->startup);
	pg->startup = NULL;
	if (!rc)
		rc = ag_session_send(s, AG_SIDE_UPSTREAM, ag_buf_head(&b), ag_buf_len(&b));
	ag_buf_free(&b);
	if (rc)
		pg_fatal(s, NULL, "08006", "sending the startup packet upstream: %s",
			 strerror(-rc));
}

/*
 * The agent is who the kernel says: its startup packet stays here, and its input waits while
 * the credential is minted (cred.c) and the gateway logs in with it.
 */
static long cred_begin(struct ag_session *s, struct fwd *f, const uint8_t *pkt, size_t plen)
{
	struct pg *pg = PG(s);
	int rc;

	pg->startup = malloc(plen);
	if (!pg->startup)
		return pg_fatal(s, f, PG_SQLSTATE_INTERNAL, "out of memory");
	memcpy(pg->startup, pkt, plen);
	pg->startup_len = plen;
	pg->phase = PH_LOGIN;
	pg->stalled = true;
	/*
	 * TLS upstream: no role is minted before the server's handshake is done (its certificate
	 * checked as tls.upstream asks): a refused one gives the agent the verification error and
	 * leaves nothing behind.
	 */
	if (ag_tls_upstream_mode(s->target) != AG_TLS_UP_NONE &&
	    !ag_session_tls_up(s, AG_SIDE_UPSTREAM)) {
		pg->cred_wait_tls = true;
		return plen;
	}
	rc = ag_cred_pg_login(s, pg->user, cred_ready);
	if (rc)
		return pg_fatal(s, f, "28000", "no credential for target %s: %s", s->target_name,
				strerror(-rc));
	return plen;
}

/* The server's TLS is up (and checked): the credential the login waited for is minted now. */
static void cred_after_tls(struct ag_session *s)
{
	struct pg *pg = PG(s);
	int rc;

	pg->cred_wait_tls = false;
	rc = ag_cred_pg_login(s, pg->user, cred_ready);
	if (rc)
		pg_fatal(s, NULL, "28000", "no credential for target %s: %s", s->target_name,
			 strerror(-rc));
}

/* A server message while the gateway logs in: answered here; AuthenticationOk goes on. */
static int upstream_login(struct ag_session *s, struct fwd *f, const uint8_t *m, size_t off,
			  size_t total)
{
	struct pg *pg = PG(s);
	char sqlstate[6], why[256];
	struct ag_buf reply = { 0 };
	int rc;

	if (!pg->login) {
		pg_fatal(s, NULL, PG_SQLSTATE_PROTOCOL_VIOLATION,
			 "the server spoke before the gateway's startup packet");
		return -ECANCELED;
	}
	rc = pg_login_server_msg(pg->login, m, total, &reply, sqlstate, why, sizeof(why));
	if (rc < 0) {
		ag_buf_free(&reply);
		fwd_flush(f);
		pg_fatal(s, NULL, sqlstate, "%s", why);
		return -ECANCELED;
	}
	if (ag_buf_len(&reply)) {
		int e = ag_session_send(s, AG_SIDE_UPSTREAM, ag_buf_head(&reply),
					ag_buf_len(&reply));

		OPENSSL_cleanse(reply.data, reply.cap);
		ag_buf_free(&reply);
		if (e)
			return e;
	}
	if (rc == PG_LOGIN_OK) {
		pr_info("session %llu: logged in upstream as %s (%s, %s)", (unsigned long long)s->id,
			pg->login->user, s->credential,
			pg->login->method ? pg->login->method : "trust");
		pg_login_fini(pg->login);
		pg->phase = PH_AUTH;
	}
	if (rc == PG_LOGIN_OK || rc == PG_LOGIN_PASS)
		fwd_keep(f, off, total);
	return 0;
}

/* The startup packet's parameters: user, database; a replication connection is refused. */
static long startup_message(struct ag_session *s, struct fwd *f, const uint8_t *pkt, size_t plen,
			    size_t off)
{
	struct pg *pg = PG(s);
	struct pg_rd rd;
	bool has_user = false;
	char why[160];

	if (ag_audit_unavailable(why, sizeof(why)))
		return pg_fatal(s, f, "58030", "audit log unavailable: %s", why);
	pg_rd_init(&rd, pkt + 8, plen - 8);
	for (;;) {
		size_t klen;
		const char *k = pg_rd_str(&rd, &klen), *v;

		if (rd.bad)
			break;
		if (!klen)
			break;
		v = pg_rd_str(&rd, NULL);
		if (rd.bad)
			break;
		if (!strcmp(k, "user")) {
			copy_str(pg->user, sizeof(pg->user), v);
			has_user = *v;
		} else if (!strcmp(k, "database")) {
			copy_str(pg->database, sizeof(pg->database), v);
		} else if (!strcmp(k, "replication") && strcasecmp(v, "false") &&
			   strcasecmp(v, "off") && strcasecmp(v, "no") && strcmp(v, "0")) {
			return pg_fatal(s, f, PG_SQLSTATE_INSUFFICIENT_PRIVILEGE,
					"replication connections are not allowed");
		}
	}
	if (rd.bad || pg_rd_left(&rd))
		return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
				"invalid startup packet layout: expected a terminator as the last "
				"byte");
	if (!has_user)
		return pg_fatal(s, f, "28000",
				"no PostgreSQL user name specified in startup packet");
	if (!pg->database[0])
		copy_str(pg->database, sizeof(pg->database), pg->user);
	{
		char u[sizeof(pg->user)], d[sizeof(pg->database)];

		/* What the agent wrote goes to the log only as printable text. */
		sql_excerpt(pg->user, strlen(pg->user), u, sizeof(u));
		sql_excerpt(pg->database, strlen(pg->database), d, sizeof(d));
		pr_info("session %llu: postgres user %s database %s", (unsigned long long)s->id, u,
			d);
		copy_str(s->db_user, sizeof(s->db_user), u);
		copy_str(s->database, sizeof(s->database), d);
	}
	if (pg_tls_upstream_begin(s, f) < 0)
		return -1;
	if (ag_cred_provider(s->target))
		return cred_begin(s, f, pkt, plen);
	fwd_keep(f, off, plen);
	pg->phase = PH_AUTH;
	return plen;
}

static long agent_startup(struct ag_session *s, struct fwd *f, const uint8_t *data, size_t len,
			  size_t off)
{
	struct pg *pg = PG(s);
	uint32_t plen, code;

	if (len < 8)
		return 0;
	plen = pg_get32(data);
	code = pg_get32(data + 4);
	if (plen < 8 || plen > PG_STARTUP_MAX)
		return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
				"invalid length of startup packet (%u)", plen);
	if (len < plen)
		return 0;
	switch (code) {
	case PG_SSL_REQUEST:
	case PG_GSSENC_REQUEST:
		if (plen != 8 || ++pg->negotiations > 2)
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION, "invalid %s request",
					code == PG_SSL_REQUEST ? "SSL" : "GSSAPI encryption");
		if (code == PG_SSL_REQUEST && pg_tls_agent_wants(s))
			return pg_tls_accept(s);
		/* Not terminated for this target: the client goes on in clear (or gives up). */
		if (ag_session_send(s, AG_SIDE_AGENT, "N", 1)) {
			ag_session_fail(s, true, "postgres: agent closed");
			return -1;
		}
		return 8;
	case PG_CANCEL_REQUEST:
		if (plen != 16)
			return pg_fatal(s, f, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"invalid length of cancel request (%u)", plen);
		return cancel_request(s, data);
	default:
		if (code >> 16 != 3)
			return pg_fatal(s, f, PG_SQLSTATE_FEATURE_NOT_SUPPORTED,
					"unsupported frontend protocol %u.%u: server supports 3.0 "
					"to 3.0",
					code >> 16, code & 0xffff);
		return startup_message(s, f, data, plen, off);
	}
}

static bool kv_equal(const struct ag_kv *a, size_t na, const struct ag_kv *b, size_t nb)
{
	if (na != nb)
		return false;
	for (size_t i = 0; i < na; i++) {
		if (strcmp(a[i].key, b[i].key) || !a[i].value != !b[i].value ||
		    (a[i].value && strcmp(a[i].value, b[i].value)) || a[i].nlist != b[i].nlist ||
		    !kv_equal(a[i].map, a[i].nmap, b[i].map, b[i].nmap))
			return false;
		for (size_t j = 0; j < a[i].nlist; j++)
			if (strcmp(a[i].list[j], b[i].list[j]))
				return false;
	}
	return true;
}

/*
 * A policy reload reaches live sessions: at the next message from the agent the session takes
 * the new rule, and every statement it has prepared is decided again under it. What the new
 * rule would refuse, or a change of masking (results in flight were shaped by the old one),
 * ends the session (fail closed): the agent reconnects under the new policy.
 */
static int policy_refresh(struct ag_session *s)
{
	struct pg *pg = PG(s);
	uint64_t gen = __atomic_load_n(&ag_d->policy_gen, __ATOMIC_ACQUIRE);
	const struct ag_policy_target *t;
	const struct ag_policy_rule *rule;
	struct ag_policy_ref *r;
	const char *why = NULL;
	char buf[200];

	if (gen == pg->policy_gen)
		return 0;
	r = ag_policy_get(ag_d);
	if (!r)
		return 0;
	t = ag_policy_target_by_name(r->p, s->target_name);
	rule = ag_sql_rule_for(r->p, s->agent, s->target_name);
	if (!t || t->protocol != AG_PROTO_POSTGRES) {
		why = "its target is no longer a postgres target of the policy";
	} else if (!pg->rule != !rule || (rule && !kv_equal(pg->rule->mask, pg->rule->nmask,
							      rule->mask, rule->nmask))) {
		why = "its masking changed";
	} else {
		for (size_t b = 0; !why && b < pg->stmts.nb; b++) {
			for (struct pg_named *n = pg->stmts.b[b]; !why && n; n = n->next) {
				struct pg_stmt *st = (struct pg_stmt *)n;
				struct ag_sql_stmt one = { .classes = st->classes,
							   .tables = st->tables,
							   .ntables = st->ntables,
							   .where_absent = st->where_absent };
				struct ag_sql_result view = { .stmts = &one, .nstmts = 1 };
				struct ag_sql_decision d;

				if (!st->classes || st->classes == AG_SQL_EMPTY)
					continue;
				ag_sql_decide_run(rule, &view, &d);
				if (d.action == AG_ACT_DENY ||
				    (d.action == AG_ACT_APPROVE && !st->approved)) {
					snprintf(buf, sizeof(buf),
						 "its prepared statement \"%s\" is refused by rule %s now",
						 n->name, d.rule ? d.rule : "default");
					why = buf;
				}
			}
		}
	}
	if (why && (!s->observe || !t)) {
		ag_policy_put(r);
		return (int)pg_fatal(s, NULL, PG_SQLSTATE_INSUFFICIENT_PRIVILEGE,
				     "the policy was reloaded and %s: reconnect", why);
	}
	ag_policy_put(s->pol);
	s->pol = r;
	s->target = t;
	pg->rule = rule;
	pg->policy_gen = gen;
	pr_info("session %llu: policy reload applied to the live session",
		(unsigned long long)s->id);
	return 0;
}

static long agent_process(struct ag_session *s, const uint8_t *data, size_t len)
{
	struct pg *pg = PG(s);
	struct fwd f = { .s = s, .to = AG_SIDE_UPSTREAM, .base = data };
	size_t off = 0;

	while (pg->phase == PH_STARTUP) {
		long n = agent_startup(s, &f, data + off, len - off, off);

		if (n < 0)
			return -1; /* the session has ended */
		if (!n) {
			fwd_flush(&f);
			return off;
		}
		off += n;
	}
	if (pg->phase == PH_CANCEL)
		return len; /* nothing more is read on a cancel connection */
	if (pg->phase == PH_READY && off == 0 && policy_refresh(s) < 0)
		return -1;
	return agent_messages(s, &f, data, len, off);
}

/* --- server messages ------------------------------------------------------------------------ */

/* Replaces the server's error for our stand-in by the refusal. */
static int send_refusal(struct ag_session *s, struct fwd *f, const struct pg_refusal *r)
{
	struct pg *pg = PG(s);
	struct pg_err e = { .severity = "ERROR",
			    .code = r->code,
			    .message = r->message,
			    .detail = r->detail,
			    .position = r->position };
	int rc = pg_put_error(&pg->scratch, PG_B_ERROR, &e);

	if (rc)
		return rc;
	fwd_send_buf(f, &pg->scratch);
	return f->err;
}

static void catalog_done(struct ag_session *s)
{
	struct pg *pg = PG(s);

	pg->cat_pending = false;
	if (pg->cat_error[0]) {
		pg_catalog_unref(pg->cat_new);
		pg->cat_new = NULL;
		return;
	}
	pg_catalog_finish(pg->cat_new);
	pg_catalog_cache_put(s->target_name, pg->database, pg->cat_key, pg->cat_new,
			     PG_CATALOG_TTL_MS);
	pg_catalog_unref(pg->cat);
	pg->cat = pg->cat_new;
	pg->cat_new = NULL;
	pg->mk.cat = pg->cat;
}

/* The shape rows are read with now, or NULL. */
static struct pg_shape *rows_shape(struct pg *pg)
{
	struct pq_ent *h = pq_head(&pg->pq);

	if (!h)
		return NULL;
	if (h->kind == PQ_QUERY)
		return pg->qshape;
	if (h->kind == PQ_EXECUTE)
		return h->shape;
	return NULL;
}

/* Could this message be passed on before it is whole? */
static bool upstream_streamable(struct pg *pg, uint8_t type)
{
	struct pq_ent *h = pq_head(&pg->pq);

	if (h && (h->kind == PQ_CATALOG || (h->flags & PQF_INTERNAL)))
		return false;
	if (type == PG_B_DATA_ROW) {
		struct pg_shape *sh;

		if (!pg->mk.m)
			return true;
		sh = rows_shape(pg);
		return sh && sh->known && !sh->any;
	}
	if (type == PG_B_COPY_DATA)
		return !pg->mk.m || !pg->copy_out || !pg->copy.any;
	return false;
}

static void copy_end(struct pg *pg)
{
	if (pg->copy_out)
		pg_copy_plan_fini(&pg->copy);
	pg->copy_out = false;
}

/* A CopyOutResponse: plan the masking of its rows. */
static int copy_out_begin(struct ag_session *s, const uint8_t *msg, size_t total)
{
	struct pg *pg = PG(s);
	struct pq_ent *h = pq_head(&pg->pq);
	const struct pg_copy_spec *spec = NULL;
	struct pg_rd rd;
	uint16_t n;

	copy_end(pg);
	if (!pg->mk.m)
		return 0;
	pg_rd_init(&rd, msg + PG_HDR, total - PG_HDR);
	pg_rd_u8(&rd);
	n = pg_rd_u16(&rd);
	if (rd.bad)
		return -EPROTO;
	if (h && h->kind == PQ_QUERY && h->qinfo && h->qinfo->next < h->qinfo->n)
		spec = h->qinfo->copies[h->qinfo->next++];
	else if (h && h->kind == PQ_EXECUTE && h->stmt)
		spec = h->stmt->copy;
	if (!spec)
		pr_debug("session %llu: COPY TO STDOUT without a parsed statement: detectors only",
			 (unsigned long long)s->id);
	pg->copy_out = true;
	return pg_copy_plan_init(&pg->copy, &pg->mk, spec, n);
}

/* Passes a message on, masked if the masking rewrote it. */
static int pass_masked(struct ag_session *s, struct fwd *f, int rc, size_t off, size_t total)
{
	struct pg *pg = PG(s);

	if (rc < 0)
		return rc;
	if (rc > 0) {
		fwd_send_buf(f, &pg->scratch);
		return f->err;
	}
	fwd_keep(f, off, total);
	return 0;
}

/* An error or notice, masked: quoted values (with column rules), then the detectors. */
static int pass_error(struct ag_session *s, struct fwd *f, const uint8_t *m, size_t off,
		      size_t total)
{
	struct pg *pg = PG(s);
	struct ag_buf first = { 0 };
	int rc = 0;

	if (pg->cat_sql) {
		rc = pg_mask_error_values(m, total, &first, &s->masked_values);
		if (rc < 0) {
			ag_buf_free(&first);
			return rc;
		}
	}
	if (rc > 0) {
		rc = pg_mask_notice(&pg->mk, ag_buf_head(&first), ag_buf_len(&first), &pg->scratch,
				    &s->masked_values);
		if (!rc)
			rc = ag_buf_append(&pg->scratch, ag_buf_head(&first), ag_buf_len(&first));
		ag_buf_free(&first);
		if (rc < 0)
			return rc;
		fwd_send_buf(f, &pg->scratch);
		return f->err;
	}
	return pass_masked(s, f, pg_mask_notice(&pg->mk, m, total, &pg->scratch, &s->masked_values),
			   off, total);
}

/*
 * One whole server message once the session is ready. Returns 0 or -errno (-EPROTO: the
 * server said something the queue cannot place, or rows that do not fit their description).
 */
static int upstream_message(struct ag_session *s, struct fwd *f, const uint8_t *m, size_t off,
			    size_t total)
{
	struct pg *pg = PG(s);
	struct pq_ent *h = pq_head(&pg->pq);
	uint8_t type = m[0];
	const uint8_t *body = m + PG_HDR;
	size_t blen = total - PG_HDR;
	bool internal = h && (h->kind == PQ_CATALOG || (h->flags & PQF_INTERNAL));
	int rc = 0;

	/* Asynchronous: any time, whatever is queued. */
	if (type == PG_B_PARAM_STATUS || type == PG_B_NOTIFICATION ||
	    (type == PG_B_NOTICE && !(h && h->kind == PQ_CATALOG))) {
		if (pg->mk.m && type == PG_B_NOTICE)
			return pass_error(s, f, m, off, total);
		if (pg->mk.m && type == PG_B_NOTIFICATION)
			return pass_masked(
				s, f,
				pg_mask_notice(&pg->mk, m, total, &pg->scratch, &s->masked_values),
				off, total);
		fwd_keep(f, off, total);
		return 0;
	}
	if (h && h->kind == PQ_CATALOG) {
		switch (type) {
		case PG_B_DATA_ROW:
			if (pg->cat_new && !pg->cat_error[0] &&
			    pg_catalog_add_row(pg->cat_new, pg->masker, body, blen))
				snprintf(pg->cat_error, sizeof(pg->cat_error),
					 "unexpected catalog row");
			return 0;
		case PG_B_ERROR: {
			const char *msg = pg_error_field(body, blen, 'M');

			snprintf(pg->cat_error, sizeof(pg->cat_error), "%s",
				 msg ? msg : "error without a message");
			return 0;
		}
		case PG_B_READY: {
			pq_pop(&pg->pq);
			pg->txn = body[0];
			catalog_done(s);
			/* Fail closed: columns we cannot find cannot be masked. */
			if (pg->cat_error[0])
				return -EIO;
			if (pg->held_ready >= 0) {
				rc = pg_put_ready(&pg->scratch, (char)pg->held_ready);
				pg->held_ready = -1;
				if (!rc) {
					fwd_send_buf(f, &pg->scratch);
					rc = f->err;
				}
			}
			return rc;
		}
		default:
			return 0; /* RowDescription, CommandComplete */
		}
	}
	switch (type) {
	case PG_B_READY:
		if (blen < 1)
			return -EPROTO;
		pg->txn = body[0];
		while (h && h->kind != PQ_SYNC && h->kind != PQ_QUERY &&
		       !(h->kind == PQ_SUBST && (h->flags & PQF_QUERY))) {
			pr_debug("session %llu: ReadyForQuery with answers still owed (kind %d)",
				 (unsigned long long)s->id, h->kind);
			pq_pop(&pg->pq);
			h = pq_head(&pg->pq);
		}
		if (h && h->kind == PQ_QUERY) {
			pg_shape_unref(pg->qshape);
			pg->qshape = NULL;
			copy_end(pg);
		}
		pq_pop(&pg->pq);
		fwd_keep(f, off, total);
		return 0;
	case PG_B_ERROR:
		if (h && h->kind == PQ_SUBST) {
			const char *msg = pg_error_field(body, blen, 'M');

			if (!msg || !strstr(msg, pg->nonce))
				pr_warn("session %llu: the server's error for a refused statement "
					"was not the expected one: %s",
					(unsigned long long)s->id, msg ? msg : "?");
			rc = send_refusal(s, f, h->refusal);
			if (h->flags & PQF_QUERY) {
				/* Now it waits for the Query's ReadyForQuery. */
				refusal_free(h->refusal);
				h->refusal = NULL;
				h->kind = PQ_QUERY;
				h->flags = 0;
			} else {
				pq_pop(&pg->pq);
				pq_skip_to_sync(pg);
			}
			return rc;
		}
		copy_end(pg);
		if (h && h->kind != PQ_QUERY && h->kind != PQ_SYNC)
			pq_skip_to_sync(pg);
		ag_audit_result(s, m, total);
		if (pg->mk.m)
			return pass_error(s, f, m, off, total);
		fwd_keep(f, off, total);
		return 0;
	case PG_B_PARSE_COMPLETE:
	case PG_B_BIND_COMPLETE:
	case PG_B_CLOSE_COMPLETE:
		if (h && h->kind == PQ_SIMPLE && !--h->count)
			pq_pop(&pg->pq);
		fwd_keep(f, off, total);
		return 0;
	case PG_B_PARAM_DESC:
		if (!internal)
			fwd_keep(f, off, total);
		return 0;
	case PG_B_ROW_DESC:
	case PG_B_NO_DATA:
		if (h && h->kind == PQ_DESCRIBE) {
			if (h->shape) {
				if (type == PG_B_NO_DATA)
					pg_shape_set_nodata(h->shape);
				else
					rc = pg_shape_from_rowdesc(h->shape, &pg->mk, body, blen);
			}
			pq_pop(&pg->pq);
		} else if (h && h->kind == PQ_QUERY && pg->mk.m && type == PG_B_ROW_DESC) {
			pg_shape_unref(pg->qshape);
			pg->qshape = pg_shape_new();
			if (pg->qshape && h->qinfo)
				pg->qshape->sql = pg_sql_ref(h->qinfo->sql);
			rc = pg->qshape ? pg_shape_from_rowdesc(pg->qshape, &pg->mk, body, blen)
					: -ENOMEM;
		}
		if (!internal && !rc)
			fwd_keep(f, off, total);
		if (!internal && !rc && type == PG_B_ROW_DESC)
			ag_audit_rowdesc(s, m, total);
		return rc;
	case PG_B_DATA_ROW: {
		struct pg_shape *sh = pg->mk.m ? rows_shape(pg) : NULL;

		if (pg->mk.m && (!sh || !sh->known)) {
			/* Rows we cannot place cannot be masked: they do not go out. */
			return -EPROTO;
		}
		if (sh && sh->any) {
			rc = pg_mask_datarow(&pg->mk, sh, m, total, &pg->scratch, &s->masked_values);
			/* The row as the agent gets it: masked when rewritten. */
			if (rc >= 0)
				ag_audit_row(s, rc ? ag_buf_head(&pg->scratch) : m,
					     rc ? ag_buf_len(&pg->scratch) : total);
			return pass_masked(s, f, rc, off, total);
		}
		ag_audit_row(s, m, total);
		fwd_keep(f, off, total);
		return 0;
	}
	case PG_B_COMMAND_COMPLETE:
	case PG_B_EMPTY_QUERY:
	case PG_B_PORTAL_SUSPENDED:
		ag_audit_result(s, m, total);
		copy_end(pg);
		if (h && h->kind == PQ_EXECUTE)
			pq_pop(&pg->pq);
		else if (h && h->kind == PQ_QUERY && type == PG_B_COMMAND_COMPLETE) {
			pg_shape_unref(pg->qshape);
			pg->qshape = NULL;
		}
		fwd_keep(f, off, total);
		return 0;
	case PG_B_COPY_OUT:
		rc = copy_out_begin(s, m, total);
		if (!rc)
			fwd_keep(f, off, total);
		return rc;
	case PG_B_COPY_DATA:
		if (pg->copy_out && pg->copy.any)
			return pass_masked(s, f,
					   pg_mask_copydata(&pg->mk, &pg->copy, m, total,
							    &pg->scratch, &s->masked_values),
					   off, total);
		fwd_keep(f, off, total);
		return 0;
	case PG_B_COPY_DONE:
		copy_end(pg);
		fwd_keep(f, off, total);
		return 0;
	default:
		/* CopyInResponse, CopyBothResponse, FunctionCallResponse, ... */
		fwd_keep(f, off, total);
		return 0;
	}
}

/* Authentication and the parameters before the first ReadyForQuery. */
static int upstream_auth(struct ag_session *s, struct fwd *f, const uint8_t *m, size_t off,
			 size_t total)
{
	struct pg *pg = PG(s);
	const uint8_t *body = m + PG_HDR;
	size_t blen = total - PG_HDR;
	int rc;

	switch (m[0]) {
	case PG_B_BACKEND_KEY:
		if (blen >= 8 && !pg->key_registered) {
			pg->be_pid = pg_get32(body);
			pg->be_key = pg_get32(body + 4);
			cancel_register(s, pg->be_pid, pg->be_key);
			pg->key_registered = true;
		}
		break;
	case PG_B_READY:
		if (blen < 1)
			return -EPROTO;
		pg->phase = PH_READY;
		pg->txn = body[0];
		if (!pg->cat_sql)
			break;
		pg->cat = pg_catalog_cache_get(s->target_name, pg->database, pg->cat_key);
		if (pg->cat) {
			pg->mk.cat = pg->cat;
			break;
		}
		/* The client sees its ReadyForQuery once the masked columns are known. */
		pg->held_ready = body[0];
		fwd_flush(f);
		rc = catalog_send(s, NULL, false);
		return rc ? rc : f->err;
	default:
		break;
	}
	fwd_keep(f, off, total);
	return 0;
}

/* Agent bytes that waited for the server (ahead of ReadyForQuery, or a full queue). */
static int agent_kick(struct ag_session *s)
{
	struct pg *pg = PG(s);
	struct ag_side_conn *a = &s->side[AG_SIDE_AGENT];
	long used;

	if (!pg->stalled || pg->phase != PH_READY || pg->pq.n >= PG_PQ_STALL / 2)
		return 0;
	pg->stalled = false;
	if (ag_buf_len(&a->in)) {
		used = agent_process(s, ag_buf_head(&a->in), ag_buf_len(&a->in));
		if (used < 0)
			return -1;
		ag_buf_consume(&a->in, used);
	}
	if (pg->agent_eof && pg->held) {
		ag_session_fail(s, false, "postgres: the agent left while approval %s waited",
				pg->held_id);
		return -1;
	}
	if (pg->agent_eof && !pg->stalled) {
		if (ag_buf_len(&a->in) || pg->a_pass) {
			pg_fatal(s, NULL, PG_SQLSTATE_PROTOCOL_VIOLATION,
				 "truncated message at end of input");
			return -1;
		}
		ag_session_shutdown(s, AG_SIDE_UPSTREAM);
	}
	return 0;
}

static long upstream_process(struct ag_session *s, const uint8_t *data, size_t len)
{
	struct pg *pg = PG(s);
	struct fwd f = { .s = s, .to = AG_SIDE_AGENT, .base = data };
	size_t off = 0;

	s->side[AG_SIDE_UPSTREAM].hold = 0;
	if (pg->phase == PH_CANCEL)
		return len;
	if (pg->up_tls_wait)
		return pg_tls_answer(s, data, len);
	if (pg->phase == PH_STARTUP) {
		ag_session_fail(s, true, "postgres: the server spoke before the startup packet");
		return -1;
	}
	while (off < len) {
		const uint8_t *m = data + off;
		size_t avail = len - off, total;
		uint32_t mlen;
		int rc;

		if (pg->u_pass) {
			size_t n = avail < pg->u_pass ? avail : pg->u_pass;

			fwd_keep(&f, off, n);
			pg->u_pass -= n;
			off += n;
			continue;
		}
		if (avail < PG_HDR)
			break;
		mlen = pg_get32(m + 1);
		if (mlen < 4) {
			fwd_flush(&f);
			return pg_fatal(s, NULL, PG_SQLSTATE_PROTOCOL_VIOLATION,
					"invalid message length %u from the server", mlen);
		}
		total = (size_t)mlen + 1;
		if (avail < total) {
			if (pg->phase == PH_READY && upstream_streamable(pg, m[0])) {
				if (m[0] == PG_B_DATA_ROW)
					ag_audit_row(s, NULL, total); /* streamed: counted, not kept */
				pg->u_pass = total;
				continue;
			}
			if (total > pg_max_message + PG_HDR) {
				fwd_flush(&f);
				return pg_fatal(s, NULL, PG_SQLSTATE_PROGRAM_LIMIT,
						"a server message of %zu bytes is too large to "
						"inspect",
						total);
			}
			s->side[AG_SIDE_UPSTREAM].hold = total;
			break;
		}
		if (pg->phase == PH_AUTH)
			rc = upstream_auth(s, &f, m, off, total);
		else if (pg->phase == PH_LOGIN)
			rc = upstream_login(s, &f, m, off, total);
		else
			rc = upstream_message(s, &f, m, off, total);
		if (rc == -ECANCELED)
			return -1; /* the agent was told, the session has ended */
		if (rc) {
			fwd_flush(&f);
			if (rc == -EIO)
				return pg_fatal(s, NULL, PG_SQLSTATE_INTERNAL,
						"cannot resolve the masked columns: %s",
						pg->cat_error[0] ? pg->cat_error : "no answer");
			if (rc == -EPROTO)
				return pg_fatal(s, NULL, PG_SQLSTATE_PROTOCOL_VIOLATION,
						"unexpected '%c' message from the server", m[0]);
			return pg_fatal(s, NULL, PG_SQLSTATE_INTERNAL, "relaying to the agent: %s",
					strerror(-rc));
		}
		off += total;
	}
	fwd_flush(&f);
	if (f.err)
		return pg_fatal(s, NULL, PG_SQLSTATE_INTERNAL, "relaying to the agent: %s",
				strerror(-f.err));
	if (pg->stalled && agent_kick(s))
		return -1;
	return off;
}

/* --- the handler -------------------------------------------------------------------------- */

/* The HMAC key of the hash style: one per daemon state dir, so hashes line up across sessions. */
static uint8_t mask_key[32];
static pthread_once_t mask_key_once = PTHREAD_ONCE_INIT;

static void mask_key_load(void)
{
	char path[PATH_MAX];
	int fd = -1;

	if (getrandom(mask_key, sizeof(mask_key), 0) != sizeof(mask_key))
		pr_warn("postgres: getrandom failed for the mask key");
	if (!ag_d || !ag_d->opts.state_dir)
		return;
	snprintf(path, sizeof(path), "%s/keys", ag_d->opts.state_dir);
	mkdir(path, 0700);
	snprintf(path, sizeof(path), "%s/keys/mask-hmac.key", ag_d->opts.state_dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		uint8_t k[sizeof(mask_key)];

		if (read(fd, k, sizeof(k)) == sizeof(k))
			memcpy(mask_key, k, sizeof(k));
		close(fd);
		return;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, mask_key, sizeof(mask_key)) != sizeof(mask_key))
		pr_warn("postgres: cannot keep the mask key in %s: %s", path, strerror(errno));
	if (fd >= 0)
		close(fd);
}

static int pg_init(struct ag_session *s)
{
	struct pg *pg;
	uint8_t rnd[8];

	pthread_once(&pg_once, pg_global_init);
	pg = calloc(1, sizeof(*pg));
	if (!pg)
		return -ENOMEM;
	pg->held_ready = -1;
	pg->txn = 'I';
	if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd))
		memcpy(rnd, &s->id, sizeof(rnd));
	for (int i = 0; i < 8; i++)
		snprintf(pg->nonce + 2 * i, 3, "%02x", rnd[i]);
	/* Read before the rule: a swap in between only makes the first check refresh again. */
	pg->policy_gen = __atomic_load_n(&ag_d->policy_gen, __ATOMIC_ACQUIRE);
	pg->rule = ag_sql_rule_for(s->pol->p, s->agent, s->target_name);
	if (pg->rule && pg->rule->mask) {
		pthread_once(&mask_key_once, mask_key_load);
		pg->masker =
			ag_masker_new(pg->rule->mask, pg->rule->nmask, mask_key, sizeof(mask_key));
		if (!pg->masker) {
			free(pg);
			snprintf(s->reason, sizeof(s->reason), "postgres: the rule's mask: %s",
				 strerror(errno));
			return -EINVAL;
		}
		if (ag_masker_active(pg->masker)) {
			pg->mk.m = pg->masker;
			pg->mk.detectors = ag_masker_detectors(pg->masker) != 0;
			pg->cat_sql = pg_catalog_sql(pg->masker);
			pg->cat_key = ag_masker_columns_key(pg->masker);
			if (pg->cat_sql && !pg->cat_key) {
				snprintf(s->reason, sizeof(s->reason), "postgres: the rule's mask: %s",
					 strerror(ENOMEM));
				return -ENOMEM;
			}
		}
	}
	s->proto_state = pg;
	return 0;
}

static long pg_input(struct ag_session *s, enum ag_side from, const uint8_t *data, size_t len)
{
	return from == AG_SIDE_AGENT ? agent_process(s, data, len) : upstream_process(s, data, len);
}

static void pg_eof(struct ag_session *s, enum ag_side from)
{
	struct pg *pg = PG(s);
	struct ag_side_conn *c = &s->side[from];

	if (from == AG_SIDE_AGENT) {
		pg->agent_eof = true;
		if (pg->held) {
			/* Nobody is left to run it for: the approval is cancelled (pg_fini). */
			ag_session_fail(s, false,
					"postgres: the agent left while approval %s waited",
					pg->held_id);
			return;
		}
		if (pg->phase == PH_LOGIN) {
			ag_session_fail(s, false, "postgres: the agent left during the upstream login");
			return;
		}
		if (pg->stalled && pg->phase != PH_STARTUP)
			return; /* what is buffered is decided first; agent_kick() passes the FIN */
		if (ag_buf_len(&c->in) || pg->a_pass) {
			pg_fatal(s, NULL, PG_SQLSTATE_PROTOCOL_VIOLATION,
				 "truncated message at end of input (%zu bytes of it)",
				 ag_buf_len(&c->in));
			return;
		}
		ag_session_shutdown(s, AG_SIDE_UPSTREAM);
		return;
	}
	if (ag_buf_len(&c->in) || pg->u_pass)
		pr_info("session %llu: the server closed mid-message", (unsigned long long)s->id);
	ag_session_shutdown(s, AG_SIDE_AGENT);
}

static void pg_fini(struct ag_session *s)
{
	struct pg *pg = PG(s);

	if (!pg)
		return;
	if (pg->key_registered)
		cancel_unregister(s->id, pg->be_pid, pg->be_key);
	ag_approval_cancel(pg->held);
	pg->held = NULL;
	refusal_free(pg->resume_refusal);
	while (pg->pq.n)
		pq_pop(&pg->pq);
	free(pg->pq.e);
	map_clear(&pg->portals, true);
	map_clear(&pg->stmts, false);
	pg_shape_unref(pg->qshape);
	copy_end(pg);
	pg_catalog_unref(pg->cat);
	pg_catalog_unref(pg->cat_new);
	free(pg->cat_sql);
	free(pg->cat_key);
	ag_masker_free(pg->masker);
	ag_buf_free(&pg->scratch);
	if (pg->login) {
		pg_login_fini(pg->login);
		free(pg->login);
	}
	free(pg->startup);
	free(pg);
	s->proto_state = NULL;
}

const struct ag_proto_ops ag_proto_pg = {
	.name = "postgres",
	.init = pg_init,
	.input = pg_input,
	.eof = pg_eof,
	.fini = pg_fini,
	.tls_done = pg_tls_done,
};
