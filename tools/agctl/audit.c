// SPDX-License-Identifier: GPL-2.0
/*
 * agctl audit: the tamper-evident audit log, read offline from its directory (the daemon's
 * <state>/audit by default). `verify` checks frames, order, the hash chain, the pinned key, every
 * checkpoint signature and HEAD, and names the first bad record; `export` prints JSON lines.
 * `status` asks the running daemon how its live log stands (seqs, durability, failure).
 * The record printers here are shared with `session replay` and `session watch`.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "audit.h"
#include "audit.pb-c.h"
#include "daemon.h"
#include "main.h"

typedef Agentgate__Audit__Record Record;

/* The log directory: DIR as given, else the running daemon's <state>/audit, else the default. */
static void audit_dir(const char *given, char *out, size_t len)
{
	ag_ctl_response *resp;
	char err[256];

	if (given) {
		snprintf(out, len, "%s", given);
		return;
	}
	resp = ctl_request_quiet(AGENTGATE__CTL__REQUEST__CMD_STATUS, 3000, err, sizeof(err));
	if (resp && resp->status && resp->status->state_dir && resp->status->state_dir[0])
		snprintf(out, len, "%s/audit", resp->status->state_dir);
	else
		snprintf(out, len, "%s/audit", AG_DEFAULT_STATE_DIR);
	ag_ctl_response_free(resp);
	p_debug("audit log: %s", out);
}

static const char *kind_name(int k)
{
	static const char *const names[] = { "unspecified", "chain_start", "daemon_start",
					     "checkpoint",  "session_start", "statement",
					     "result",	    "approval",	    "error",
					     "session_end", "daemon_stop" };

	return k >= 0 && k < (int)ARRAY_SIZE(names) ? names[k] : "unknown";
}

/* Who each session was, from its start record: export names agent and target on every line. */
struct who {
	uint64_t id;
	char *agent, *target;
	int64_t started;
};

struct book {
	struct who *v;
	size_t n, cap;
};

static struct who *book_get(struct book *b, uint64_t id)
{
	for (size_t i = b->n; i-- > 0;)
		if (b->v[i].id == id)
			return &b->v[i];
	return NULL;
}

static void book_note(struct book *b, uint64_t id, const Record *r)
{
	struct who *w;

	if (r->body_case != AGENTGATE__AUDIT__RECORD__BODY_SESSION_START || book_get(b, id))
		return;
	if (b->n == b->cap) {
		struct who *nv = realloc(b->v, (b->cap = b->cap ? 2 * b->cap : 64) * sizeof(*nv));

		if (!nv)
			return;
		b->v = nv;
	}
	w = &b->v[b->n++];
	w->id = id;
	w->agent = strdup(r->session_start->agent);
	w->target = strdup(r->session_start->target);
	w->started = r->time_ns;
}

static void book_free(struct book *b)
{
	for (size_t i = 0; i < b->n; i++) {
		free(b->v[i].agent);
		free(b->v[i].target);
	}
	free(b->v);
}

static uint16_t be16(const uint8_t *p)
{
	return p[0] << 8 | p[1];
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3];
}

/* Column names and formats of a RowDescription body; the count, or -1 when malformed. */
static int rowdesc_parse(const ProtobufCBinaryData *d, char names[][64], int *fmt, int max)
{
	const uint8_t *p = d->data, *end = d->data + d->len;
	int n;

	if (d->len < 2)
		return -1;
	n = be16(p);
	p += 2;
	for (int i = 0; i < n; i++) {
		const uint8_t *z = memchr(p, 0, end - p);

		if (!z || end - z < 19)
			return -1;
		if (i < max) {
			snprintf(names[i], 64, "%.*s", (int)(z - p), (const char *)p);
			fmt[i] = be16(z + 17);
		}
		p = z + 19;
	}
	return n < max ? n : max;
}

#define MAX_COLS 256

/*
 * Calls fn for each column of a DataRow body: value (NULL for SQL NULL) and its length; binary
 * values (format 1) are shown as \x hex. -1 when malformed.
 */
static int datarow_each(const ProtobufCBinaryData *d, const int *fmt, int nfmt,
			void (*fn)(void *ctx, int i, const char *v), void *ctx)
{
	const uint8_t *p = d->data, *end = d->data + d->len;
	int n;

	if (d->len < 2)
		return -1;
	n = be16(p);
	p += 2;
	for (int i = 0; i < n; i++) {
		int32_t len;
		char *v;

		if (end - p < 4)
			return -1;
		len = (int32_t)be32(p);
		p += 4;
		if (len < 0) {
			fn(ctx, i, NULL);
			continue;
		}
		if (end - p < len)
			return -1;
		if (i < nfmt && fmt[i] == 1) {
			v = malloc(2 * len + 3);
			if (!v)
				return -1;
			strcpy(v, "\\x");
			for (int k = 0; k < len; k++)
				sprintf(v + 2 + 2 * k, "%02x", p[k]);
		} else {
			v = strndup((const char *)p, len);
			if (!v)
				return -1;
		}
		fn(ctx, i, v);
		free(v);
		p += len;
	}
	return 0;
}

static void col_json(void *ctx, int i, const char *v)
{
	if (v)
		jsonw_string(ctx, v);
	else
		jsonw_null(ctx);
}

static char *hex_str(const uint8_t *p, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", p[i]);
	out[2 * n] = '\0';
	return out;
}

/* Is the body text (UTF-8 without NUL or other control bytes than tab, CR, LF)? */
static bool body_is_text(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n;) {
		unsigned c = p[i], more = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2
							     : (c & 0xf8) == 0xf0 ? 3 : 4;

		if (more == 4 || (c < 0x20 && c != '\t' && c != '\r' && c != '\n') || c == 0x7f ||
		    i + more >= n + (more ? 0 : 1))
			return false;
		for (unsigned j = 1; j <= more; j++)
			if ((p[i + j] & 0xc0) != 0x80)
				return false;
		i += 1 + more;
	}
	return true;
}

/* An HTTP response's body: as a string when it is text, else as hex ("body_hex"). */
static void body_json(struct jsonw *w, const ProtobufCBinaryData *b)
{
	char *t = malloc(2 * b->len + 1);

	if (!t)
		return;
	if (body_is_text(b->data, b->len)) {
		memcpy(t, b->data, b->len);
		t[b->len] = '\0';
		jsonw_string_field(w, "body", t);
	} else {
		jsonw_string_field(w, "body_hex", hex_str(b->data, b->len, t));
	}
	free(t);
}

/* The body in the plain form: printable text (others as '.'), its first lines, indented. */
static void body_plain(const char *sid, const ProtobufCBinaryData *b, bool capped)
{
	size_t shown = b->len < 2048 ? b->len : 2048;
	bool bol = true;
	int lines = 0;

	for (size_t i = 0; i < shown && lines < 24; i++) {
		unsigned char c = b->data[i];

		if (bol)
			printf("%s          | ", sid);
		bol = c == '\n';
		if (bol)
			lines++;
		putchar(bol || (c >= 0x20 && c < 0x7f) || c == '\t' ? c : '.');
	}
	if (!bol)
		putchar('\n');
	if (shown < b->len || lines >= 24 || capped)
		printf("%s          | ... (%s)\n", sid,
		       capped ? "the log keeps the first audit.body_bytes" :
				"more in the log: session replay -j");
}

/* One record as a JSON object: seq, time, session, kind, agent, target, the body's fields, hash. */
void audit_record_json(struct jsonw *w, uint64_t seq, const uint8_t *hash, const Record *r,
		       const char *agent, const char *target)
{
	char hx[65];

	jsonw_start_object(w);
	jsonw_uint_field(w, "seq", seq);
	jsonw_time_field(w, "time", r->time_ns);
	jsonw_uint_field(w, "time_ns", r->time_ns);
	if (r->session)
		jsonw_uint_field(w, "session", r->session);
	else
		jsonw_null_field(w, "session");
	jsonw_string_field(w, "kind", kind_name(r->kind));
	if (agent)
		jsonw_string_field(w, "agent", agent);
	else
		jsonw_null_field(w, "agent");
	if (target)
		jsonw_string_field(w, "target", target);
	else
		jsonw_null_field(w, "target");
	switch (r->body_case) {
	case AGENTGATE__AUDIT__RECORD__BODY_CHAIN_START:
		jsonw_string_field(w, "key_fingerprint", r->chain_start->key_fingerprint);
		jsonw_string_field(w, "host", r->chain_start->host);
		break;
	case AGENTGATE__AUDIT__RECORD__BODY_DAEMON_START:
		jsonw_string_field(w, "version", r->daemon_start->version);
		jsonw_uint_field(w, "pid", r->daemon_start->pid);
		jsonw_uint_field(w, "torn_bytes", r->daemon_start->torn_bytes);
		if (r->daemon_start->torn_segment[0])
			jsonw_string_field(w, "torn_segment", r->daemon_start->torn_segment);
		jsonw_string_field(w, "key_fingerprint", r->daemon_start->key_fingerprint);
		break;
	case AGENTGATE__AUDIT__RECORD__BODY_CHECKPOINT:
		jsonw_uint_field(w, "covers_seq", r->checkpoint->covers_seq);
		jsonw_string_field(w, "key_fingerprint", r->checkpoint->key_fingerprint);
		break;
	case AGENTGATE__AUDIT__RECORD__BODY_SESSION_START: {
		const Agentgate__Audit__SessionStart *s = r->session_start;

		jsonw_string_field(w, "cgroup", s->cgroup);
		jsonw_uint_field(w, "cgroup_id", s->cgroup_id);
		jsonw_uint_field(w, "pid", s->pid);
		jsonw_uint_field(w, "tid", s->tid);
		jsonw_uint_field(w, "uid", s->uid);
		jsonw_uint_field(w, "gid", s->gid);
		jsonw_string_field(w, "comm", s->comm);
		jsonw_string_field(w, "protocol", s->protocol);
		jsonw_string_field(w, "orig_dst", s->orig_dst);
		jsonw_string_field(w, "upstream", s->upstream);
		jsonw_bool_field(w, "observe", s->observe);
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_STATEMENT: {
		const Agentgate__Audit__Statement *s = r->statement;

		jsonw_string_field(w, "message", s->message);
		jsonw_string_field(w, "name", s->name);
		jsonw_string_field(w, "text", s->text);
		jsonw_bool_field(w, "text_truncated", s->text_truncated);
		jsonw_string_field(w, "decision", s->decision);
		jsonw_string_field(w, "rule", s->rule);
		jsonw_string_field(w, "classes", s->classes);
		jsonw_string_field(w, "reason", s->reason);
		if (s->host[0])
			jsonw_string_field(w, "host", s->host);
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_RESULT: {
		const Agentgate__Audit__Result *s = r->result;
		char names[MAX_COLS][64];
		int fmt[MAX_COLS], n = rowdesc_parse(&s->row_description, names, fmt, MAX_COLS);

		if (s->message[0]) {
			jsonw_string_field(w, "message", s->message);
			jsonw_string_field(w, "name", s->name);
		}
		jsonw_string_field(w, "command_tag", s->command_tag);
		jsonw_uint_field(w, "rows", s->rows);
		jsonw_uint_field(w, "masked_values", s->masked_values);
		jsonw_string_field(w, "sqlstate", s->sqlstate);
		jsonw_uint_field(w, "elapsed_us", s->elapsed_ns / 1000);
		jsonw_name(w, "columns");
		jsonw_start_array(w);
		for (int i = 0; i < n; i++)
			jsonw_string(w, names[i]);
		jsonw_end_array(w);
		jsonw_name(w, "data_rows");
		jsonw_start_array(w);
		for (size_t i = 0; i < s->n_data_rows; i++) {
			jsonw_start_array(w);
			datarow_each(&s->data_rows[i], fmt, n < 0 ? 0 : n, col_json, w);
			jsonw_end_array(w);
		}
		jsonw_end_array(w);
		jsonw_bool_field(w, "rows_capped", s->rows_capped);
		if (s->http_status) {
			jsonw_uint_field(w, "http_status", s->http_status);
			body_json(w, &s->body);
			jsonw_uint_field(w, "body_bytes", s->body_bytes);
			jsonw_bool_field(w, "body_capped", s->body_capped);
			if (s->body_sha256.len == 32) {
				char sh[65];

				jsonw_string_field(w, "body_sha256",
						   hex_str(s->body_sha256.data, 32, sh));
			}
		}
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_APPROVAL: {
		const Agentgate__Audit__Approval *a = r->approval;

		jsonw_string_field(w, "approval", a->id);
		jsonw_string_field(w, "state", a->state);
		jsonw_string_field(w, "rule", a->rule);
		jsonw_string_field(w, "statement", a->statement);
		jsonw_string_field(w, "by", a->by);
		jsonw_uint_field(w, "by_uid", a->by_uid);
		jsonw_string_field(w, "scope", a->scope);
		jsonw_string_field(w, "reason", a->reason);
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_ERROR:
		jsonw_string_field(w, "message", r->error->message);
		break;
	case AGENTGATE__AUDIT__RECORD__BODY_SESSION_END: {
		const Agentgate__Audit__SessionEnd *e = r->session_end;

		jsonw_string_field(w, "state", e->state);
		jsonw_string_field(w, "reason", e->reason);
		jsonw_uint_field(w, "bytes_up", e->bytes_up);
		jsonw_uint_field(w, "bytes_down", e->bytes_down);
		jsonw_uint_field(w, "statements", e->statements);
		jsonw_uint_field(w, "blocked", e->blocked);
		jsonw_uint_field(w, "masked_values", e->masked_values);
		jsonw_uint_field(w, "duration_ms", e->duration_ns / 1000000);
		break;
	}
	default:
		break;
	}
	jsonw_string_field(w, "hash", hash ? hex_str(hash, 32, hx) : "");
	jsonw_end_object(w);
}

static void col_plain(void *ctx, int i, const char *v)
{
	printf("%s%s", i ? " | " : "", v ? v : "NULL");
}

/* One record as replay lines; t0: the session's start (offsets are from it). */
void audit_record_plain(const Record *r, int64_t t0, bool with_session)
{
	double off = t0 && r->time_ns >= t0 ? (r->time_ns - t0) / 1e9 : 0;
	char sid[32] = "";

	if (with_session)
		snprintf(sid, sizeof(sid), "[%" PRIu64 "] ", r->session);
	printf("%s+%.6f ", sid, off);
	switch (r->body_case) {
	case AGENTGATE__AUDIT__RECORD__BODY_SESSION_START: {
		const Agentgate__Audit__SessionStart *s = r->session_start;
		char t[40];

		printf("start     agent %s: pid %u tid %u (%s) uid %u gid %u cgroup %s (id %" PRIu64
		       ")\n",
		       s->agent, s->pid, s->tid, s->comm, s->uid, s->gid, s->cgroup, s->cgroup_id);
		printf("%s          target %s (%s) orig_dst %s upstream %s%s, at %s\n", sid,
		       s->target, s->protocol, s->orig_dst, s->upstream[0] ? s->upstream : "-",
		       s->observe ? " (observe mode)" : "", ag_format_time(r->time_ns, t, sizeof(t)));
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_STATEMENT: {
		const Agentgate__Audit__Statement *s = r->statement;

		printf("%-9s %s%s%s%s", s->message, s->decision, s->rule[0] ? " (rule " : "",
		       s->rule, s->rule[0] ? ")" : "");
		if (s->name[0])
			printf(" name \"%s\"", s->name);
		if (s->text[0])
			printf(": %s%s", s->text, s->text_truncated ? " ..." : "");
		if (s->host[0])
			printf(" host %s", s->host);
		printf("\n");
		if (s->classes[0] && !strcmp(s->message, "request"))
			printf("%s          %s\n", sid, s->classes);
		if (s->reason[0])
			printf("%s          → %s\n", sid, s->reason);
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_RESULT: {
		const Agentgate__Audit__Result *s = r->result;
		char names[MAX_COLS][64];
		int fmt[MAX_COLS], n = rowdesc_parse(&s->row_description, names, fmt, MAX_COLS);

		if (s->message[0])
			printf("%-9s portal \"%s\" → ", s->message, s->name);
		else
			printf("result    ");
		printf("%s", s->command_tag[0] ? s->command_tag : "-");
		if (s->sqlstate[0])
			printf(" SQLSTATE %s", s->sqlstate);
		if (s->http_status) {
			printf(": %" PRIu64 " body byte%s, %" PRIu64 " masked value%s, %.3f ms\n",
			       s->body_bytes, s->body_bytes == 1 ? "" : "s", s->masked_values,
			       s->masked_values == 1 ? "" : "s", s->elapsed_ns / 1e6);
			body_plain(sid, &s->body, s->body_capped);
			if (s->body_sha256.len == 32) {
				char hx[65];

				printf("%s          sha256 %s\n", sid,
				       hex_str(s->body_sha256.data, 32, hx));
			}
			break;
		}
		printf(": %" PRIu64 " row%s, %" PRIu64 " masked value%s, %.3f ms%s\n", s->rows,
		       s->rows == 1 ? "" : "s", s->masked_values, s->masked_values == 1 ? "" : "s",
		       s->elapsed_ns / 1e6, s->rows_capped ? " (rows kept: the first ones only)" : "");
		if (n > 0) {
			printf("%s          ", sid);
			for (int i = 0; i < n; i++)
				printf("%s%s", i ? " | " : "", names[i]);
			printf("\n");
		}
		for (size_t i = 0; i < s->n_data_rows; i++) {
			printf("%s          ", sid);
			datarow_each(&s->data_rows[i], fmt, n < 0 ? 0 : n, col_plain, NULL);
			printf("\n");
		}
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_APPROVAL: {
		const Agentgate__Audit__Approval *a = r->approval;

		printf("approval  %s %s (rule %s)", a->id, a->state, a->rule);
		if (a->by[0])
			printf(" by %s (uid %u)", a->by, a->by_uid);
		if (a->scope[0])
			printf(" scope %s", a->scope);
		if (a->reason[0])
			printf(": %s", a->reason);
		printf("\n");
		break;
	}
	case AGENTGATE__AUDIT__RECORD__BODY_ERROR:
		printf("error     %s\n", r->error->message);
		break;
	case AGENTGATE__AUDIT__RECORD__BODY_SESSION_END: {
		const Agentgate__Audit__SessionEnd *e = r->session_end;

		printf("end       %s%s%s: %" PRIu64 " bytes up, %" PRIu64 " down, %" PRIu64
		       " statements, %" PRIu64 " blocked, %" PRIu64 " masked values\n",
		       e->state, e->reason[0] ? ", " : "", e->reason, e->bytes_up, e->bytes_down,
		       e->statements, e->blocked, e->masked_values);
		break;
	}
	default:
		printf("%s\n", kind_name(r->kind));
		break;
	}
}

/* --- export ----------------------------------------------------------------------------------- */

/* RFC 3339 ("2026-11-22T06:00:00Z", fractions and offsets too) or a duration ago ("10m"). */
static int parse_since(const char *s, int64_t *ns)
{
	struct tm tm = { 0 };
	uint64_t ms;
	const char *p;
	long off = 0;

	if (!ag_parse_duration(s, &ms)) {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		*ns = ts.tv_sec * 1000000000LL + ts.tv_nsec - (int64_t)ms * 1000000;
		return 0;
	}
	p = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
	if (!p)
		p = strptime(s, "%Y-%m-%d %H:%M:%S", &tm);
	if (!p)
		return -EINVAL;
	*ns = (int64_t)timegm(&tm) * 1000000000LL;
	if (*p == '.') {
		int64_t mul = 100000000;

		for (p++; *p >= '0' && *p <= '9'; p++, mul /= 10)
			*ns += (*p - '0') * mul;
	}
	if (*p == 'Z' || *p == 'z') {
		p++;
	} else if (*p == '+' || *p == '-') {
		int h, m;

		if (sscanf(p + 1, "%2d:%2d", &h, &m) != 2)
			return -EINVAL;
		off = (h * 3600L + m * 60L) * (*p == '-' ? -1 : 1);
		p += 6;
	}
	if (*p)
		return -EINVAL;
	*ns -= off * 1000000000LL;
	return 0;
}

struct walk {
	struct book book;
	int64_t since;
	uint64_t session; /* replay: only this one */
	bool json;
	bool found, ended;
	int64_t t0;
	int bad;
};

static int export_cb(void *ctx, const struct ag_audit_entry *e)
{
	struct walk *wk = ctx;
	Record *r = agentgate__audit__record__unpack(NULL, e->len, e->rec);
	struct who *who;
	struct jsonw *w;

	if (!r) {
		p_err("seq %" PRIu64 " (segment %s): not a valid audit record", e->seq, e->segment);
		return -EBADMSG;
	}
	book_note(&wk->book, r->session, r);
	if (r->time_ns >= wk->since) {
		who = r->session ? book_get(&wk->book, r->session) : NULL;
		w = jsonw_new(stdout, false);
		if (w) {
			audit_record_json(w, e->seq, e->hash, r, who ? who->agent : NULL,
					  who ? who->target : NULL);
			jsonw_destroy(&w);
		}
	}
	agentgate__audit__record__free_unpacked(r, NULL);
	return 0;
}

static int do_export(int argc, char **argv)
{
	struct walk wk = { .since = INT64_MIN };
	const char *given = NULL;
	char dir[4096], err[512];
	int rc;

	while (argc) {
		if (!strcmp(*argv, "--since") || is_prefix(*argv, "since")) {
			NEXT_ARG();
			if (!REQ_ARGS(1))
				return -1;
			if (parse_since(*argv, &wk.since)) {
				p_err("--since: '%s' is not an RFC 3339 time or a duration (10m)",
				      *argv);
				return -1;
			}
		} else if (!strncmp(*argv, "--since=", 8)) {
			if (parse_since(*argv + 8, &wk.since)) {
				p_err("--since: '%s' is not an RFC 3339 time or a duration (10m)",
				      *argv + 8);
				return -1;
			}
		} else if (!given) {
			given = *argv;
		} else {
			return BAD_ARG();
		}
		NEXT_ARG();
	}
	audit_dir(given, dir, sizeof(dir));
	/* JSON lines whatever the options: nothing else goes to stdout. */
	if (json_wtr) {
		jsonw_destroy(&json_wtr);
		json_output = false;
	}
	rc = ag_audit_walk(dir, export_cb, &wk, err, sizeof(err));
	book_free(&wk.book);
	if (rc && rc != -EBADMSG)
		p_err("%s", err);
	else if (rc && err[0])
		p_err("%s (agctl audit verify)", err);
	return rc ? -1 : 0;
}

/* --- verify ----------------------------------------------------------------------------------- */

static int do_verify(int argc, char **argv)
{
	const char *given = NULL, *key = NULL;
	struct ag_audit_verify v;
	char dir[4096];
	int rc;

	while (argc) {
		if (!strcmp(*argv, "--key") || !strcmp(*argv, "key")) {
			NEXT_ARG();
			if (!REQ_ARGS(1))
				return -1;
			key = *argv;
		} else if (!strncmp(*argv, "--key=", 6)) {
			key = *argv + 6;
		} else if (!given) {
			given = *argv;
		} else {
			return BAD_ARG();
		}
		NEXT_ARG();
	}
	audit_dir(given, dir, sizeof(dir));
	rc = ag_audit_verify_dir(dir, key, &v);
	if (rc == -EBADMSG && v.bad_seq) {
		p_err("audit log %s: record seq %" PRIu64 "%s%s%s: %s", dir, v.bad_seq,
		      v.bad_segment[0] ? " (segment " : "", v.bad_segment,
		      v.bad_segment[0] ? ")" : "", v.reason);
		return -1;
	}
	if (rc) {
		p_err("audit log %s: %s", dir, v.reason[0] ? v.reason : strerror(-rc));
		return -1;
	}
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "dir", dir);
		jsonw_bool_field(json_wtr, "intact", true);
		jsonw_uint_field(json_wtr, "records", v.records);
		jsonw_uint_field(json_wtr, "segments", v.segments);
		jsonw_uint_field(json_wtr, "last_seq", v.last_seq);
		jsonw_uint_field(json_wtr, "checkpoints", v.checkpoints);
		jsonw_uint_field(json_wtr, "last_checkpoint", v.last_checkpoint);
		jsonw_uint_field(json_wtr, "unsealed", v.unsealed);
		jsonw_bool_field(json_wtr, "frame_being_written", v.live_tail);
		jsonw_string_field(json_wtr, "key_fingerprint", v.fingerprint);
		jsonw_string_field(json_wtr, "key_source", v.key_source);
		jsonw_end_object(json_wtr);
	} else {
		printf("audit log %s intact: %" PRIu64 " records (seq 1..%" PRIu64 ") in %" PRIu64
		       " segment%s, %" PRIu64 " checkpoints, the last at seq %" PRIu64
		       " (%" PRIu64 " after it), key %s from %s\n",
		       dir, v.records, v.last_seq, v.segments, v.segments == 1 ? "" : "s",
		       v.checkpoints, v.last_checkpoint, v.unsealed, v.fingerprint, v.key_source);
		if (v.live_tail)
			printf("(a frame after seq %" PRIu64 " was being written: not read)\n",
			       v.last_seq);
	}
	return 0;
}

/* --- session replay and watch (session.c) ---------------------------------------------------- */

static int replay_cb(void *ctx, const struct ag_audit_entry *e)
{
	struct walk *wk = ctx;
	Record *r = agentgate__audit__record__unpack(NULL, e->len, e->rec);

	if (!r)
		return 0;
	if (r->session == wk->session) {
		if (!wk->found)
			wk->t0 = r->time_ns;
		wk->found = true;
		if (wk->json)
			audit_record_json(json_wtr, e->seq, e->hash, r, NULL, NULL);
		else
			audit_record_plain(r, wk->t0, false);
		if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_SESSION_END)
			wk->ended = true;
	}
	agentgate__audit__record__free_unpacked(r, NULL);
	return 0;
}

int audit_replay(uint64_t id, const char *given)
{
	struct walk wk = { .session = id, .json = json_output };
	char dir[4096], err[512] = "";
	int rc;

	audit_dir(given, dir, sizeof(dir));
	if (wk.json)
		jsonw_start_array(json_wtr);
	rc = ag_audit_walk(dir, replay_cb, &wk, err, sizeof(err));
	if (wk.json)
		jsonw_end_array(json_wtr);
	if (rc) {
		p_err("%s", err);
		return -1;
	}
	if (!wk.found) {
		p_err("no session %" PRIu64 " in the audit log %s", id, dir);
		return -1;
	}
	if (!wk.ended && !wk.json)
		printf("(the session has not ended in the log yet)\n");
	return 0;
}

int audit_watch(uint64_t id)
{
	Agentgate__Ctl__Watch wreq = AGENTGATE__CTL__WATCH__INIT;
	ag_ctl_request req = AGENTGATE__CTL__REQUEST__INIT;
	struct book book = { 0 };
	uint8_t *out = NULL, *in;
	size_t len, inlen;
	bool first = true;
	int fd, rc;

	wreq.session = id;
	req.cmd_case = AGENTGATE__CTL__REQUEST__CMD_SESSION_WATCH;
	req.session_watch = &wreq;
	fd = ag_ctl_connect(ctl_socket);
	if (fd < 0) {
		p_err("agentgated is not running (no daemon on %s): %s", ctl_socket,
		      strerror(-fd));
		return -1;
	}
	len = agentgate__ctl__request__get_packed_size(&req);
	out = malloc(len);
	if (!out) {
		close(fd);
		return -1;
	}
	agentgate__ctl__request__pack(&req, out);
	rc = ag_ctl_write_frame(fd, out, len, 5000);
	free(out);
	if (json_wtr) {
		jsonw_destroy(&json_wtr);
		json_output = true; /* JSON lines from here on */
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (!rc && !(rc = ag_ctl_read_frame(fd, &in, &inlen, -1))) {
		ag_ctl_response *resp = agentgate__ctl__response__unpack(NULL, inlen, in);

		free(in);
		if (!resp) {
			p_err("agentgated sent a malformed response");
			rc = -EBADMSG;
			break;
		}
		if (resp->error && resp->error[0]) {
			p_err("%s", resp->error);
			ag_ctl_response_free(resp);
			rc = -EINVAL;
			break;
		}
		if (first && resp->message && resp->message[0])
			fprintf(stderr, "%s\n", resp->message);
		first = false;
		for (size_t i = 0; i < resp->n_audit_entries; i++) {
			Agentgate__Audit__Entry *e = agentgate__audit__entry__unpack(
				NULL, resp->audit_entries[i].len, resp->audit_entries[i].data);
			Record *r = e ? agentgate__audit__record__unpack(NULL, e->record.len,
									  e->record.data) :
					NULL;
			struct who *who;

			if (r) {
				book_note(&book, r->session, r);
				who = book_get(&book, r->session);
				if (json_output) {
					struct jsonw *w = jsonw_new(stdout, false);

					if (w) {
						audit_record_json(w, e->seq, e->hash.data, r,
								  who ? who->agent : NULL,
								  who ? who->target : NULL);
						jsonw_destroy(&w);
					}
				} else {
					audit_record_plain(r, who ? who->started : 0, true);
				}
				fflush(stdout);
				agentgate__audit__record__free_unpacked(r, NULL);
			}
			if (e)
				agentgate__audit__entry__free_unpacked(e, NULL);
		}
		ag_ctl_response_free(resp);
	}
	close(fd);
	book_free(&book);
	if (rc == -ECONNRESET)
		return 0; /* the daemon stopped */
	if (rc)
		p_err("watching: %s", strerror(-rc));
	return rc ? -1 : 0;
}

/* The live log, from the daemon: where it is, how far it got, and whether it is failing. */
static int do_status(int argc, char **argv)
{
	const Agentgate__Ctl__AuditStatus *st;
	ag_ctl_response *resp;
	char t[64], b[32];

	if (!NO_MORE_ARGS())
		return -1;
	resp = ctl_request_simple(AGENTGATE__CTL__REQUEST__CMD_AUDIT_STATUS);
	if (!resp)
		return -1;
	st = resp->audit_status;
	if (!st) {
		p_err("agentgated sent no audit status");
		ag_ctl_response_free(resp);
		return -1;
	}
	if (json_output) {
		jsonw_start_object(json_wtr);
		jsonw_string_field(json_wtr, "dir", st->dir);
		jsonw_uint_field(json_wtr, "segments", st->segments);
		jsonw_uint_field(json_wtr, "bytes", st->bytes);
		jsonw_uint_field(json_wtr, "last_seq", st->last_seq);
		jsonw_uint_field(json_wtr, "last_checkpoint_seq", st->last_checkpoint_seq);
		jsonw_time_field(json_wtr, "last_checkpoint_at", st->last_checkpoint_at_ns);
		jsonw_uint_field(json_wtr, "durable_seq", st->durable_seq);
		jsonw_string_field(json_wtr, "fsync", st->fsync);
		jsonw_bool_field(json_wtr, "failing", st->failing);
		if (st->failing)
			jsonw_string_field(json_wtr, "reason", st->reason);
		else
			jsonw_null_field(json_wtr, "reason");
		jsonw_end_object(json_wtr);
	} else {
		printf("dir:         %s\n", st->dir);
		if (st->bytes < 1024)
			b[0] = '\0';
		else
			strcat(fmt_bytes(st->bytes, b, sizeof(b) - 2), ", ");
		printf("segments:    %" PRIu64 " (%s%" PRIu64 " bytes)\n", st->segments, b,
		       st->bytes);
		printf("last seq:    %" PRIu64 "\n", st->last_seq);
		printf("checkpoint:  seq %" PRIu64 " at %s\n", st->last_checkpoint_seq,
		       st->last_checkpoint_at_ns
			       ? ag_format_time(st->last_checkpoint_at_ns, t, sizeof(t))
			       : "-");
		printf("durable seq: %" PRIu64 "\n", st->durable_seq);
		printf("fsync:       %s\n", st->fsync);
		if (st->failing)
			printf("state:       failing: %s (new sessions are refused)\n", st->reason);
		else
			printf("state:       ok\n");
	}
	ag_ctl_response_free(resp);
	return 0;
}

static int do_help(int argc, char **argv)
{
	if (json_output) {
		jsonw_null(json_wtr);
		return 0;
	}
	fprintf(help_out,
		"Usage: %1$s %2$s status\n"
		"       %1$s %2$s verify [DIR] [--key FILE]\n"
		"       %1$s %2$s export [DIR] [--since TIME]\n"
		"       %1$s %2$s help\n"
		"\n"
		"       DIR := the audit log directory (default: the daemon's <state-dir>/audit,\n"
		"              else " AG_DEFAULT_STATE_DIR "/audit)\n"
		"       TIME := { RFC3339 | DURATION ago (10m, 2h) }\n"
		"       " HELP_SPEC_OPTIONS " }\n",
		bin_name, "audit");
	return 0;
}

static const struct cmd cmds[] = {
	{ "verify", do_verify },
	{ "status", do_status },
	{ "export", do_export },
	{ "help", do_help },
	{ 0 }
};

int do_audit(int argc, char **argv)
{
	return cmd_select(cmds, argc, argv, do_help);
}
