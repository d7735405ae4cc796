/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The tamper-evident audit log. Every session event is one protobuf-c record (audit.proto),
 * hash-chained (each entry's SHA-256 covers the previous hash, its seq and its bytes), written by
 * one writer thread in zlib-compressed, CRC-checked frames of size-rotated segments under
 * <state>/audit/, and sealed by Ed25519-signed checkpoints (key in <state>/keys/). Producers on
 * the worker threads only encode and enqueue (one lock), never touch the disk. A failed write or
 * fsync keeps the records in memory, retries, and refuses new sessions until writes work again.
 *
 * The offline half (reading, verifying, rewriting segments) is shared by agctl and the tests.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "policy.h"

struct ag_session;
struct ag_k8s_req;
struct ag_http_decision;

enum ag_audit_fsync { AG_AUDIT_FSYNC_BATCH = 0, AG_AUDIT_FSYNC_ALWAYS, AG_AUDIT_FSYNC_NEVER };

struct ag_audit_config {
	enum ag_audit_fsync fsync;
	uint64_t checkpoint_records; /* a checkpoint after this many records ... */
	uint64_t checkpoint_ms;	     /* ... or this long after the first unsealed one */
	uint64_t segment_size;	     /* a new segment once one is this large */
	uint64_t body_bytes;	     /* an HTTP response body is kept up to this many bytes */
};

#define AG_AUDIT_DEFAULT_CHECKPOINT_RECORDS 1000
#define AG_AUDIT_DEFAULT_CHECKPOINT_MS 10000
#define AG_AUDIT_DEFAULT_SEGMENT_SIZE (16ull << 20)
/* Rows kept per result: the first ones, up to this many and this many bytes. */
#define AG_AUDIT_MAX_ROWS 1000
#define AG_AUDIT_MAX_ROW_BYTES (1u << 20)
#define AG_AUDIT_MAX_TEXT (64u << 10)
/*
 * An HTTP response body (as the agent got it, masked) is kept up to audit.body_bytes, by
 * default its first 256 bytes (the rest costs a deflate of every byte the gateway serves), and
 * at most AG_AUDIT_MAX_BODY; its whole length and SHA-256 are always recorded.
 */
#define AG_AUDIT_DEFAULT_BODY 256u
#define AG_AUDIT_MAX_BODY (1u << 20)

#define AG_AUDIT_KEY_FILE "keys/audit-ed25519.pem"
#define AG_AUDIT_PUB_FILE "audit-ed25519.pub"

/* Defaults, then the policy's audit: mapping (may be NULL). 0 or -EINVAL (err says why). */
int ag_audit_config_parse(const struct ag_kv *kv, size_t n, struct ag_audit_config *c, char *err,
			  size_t errlen);

/*
 * Opens <state_dir>/audit (recovering a torn tail, continuing the chain), loads or makes the
 * signing key and starts the writer. 0 or -errno with err set.
 */
int ag_audit_open(const char *state_dir, const struct ag_audit_config *c, char *err,
		  size_t errlen);
/* New fsync/checkpoint/segment settings (a policy reload). */
void ag_audit_set_config(const struct ag_audit_config *c);
/* Seals the log (a last checkpoint), writes everything queued, stops the writer. */
void ag_audit_close(void);
/* The main loop's tick: raises the writer when its low-priority batch has waited too long. */
void ag_audit_tick(void);
/* Can the writer be raised back from low priority (CAP_SYS_NICE)? Else it never goes low. */
bool ag_audit_can_renice(void);
/* Batches whose CPU work ran at low priority (tests). */
void ag_audit_writer_stats(uint64_t *low_batches);
/* True (and why) while the log cannot be written: new sessions are refused. */
bool ag_audit_unavailable(char *why, size_t len);
/* Records written and fsynced so far (the last durable seq), for tests and status. */
uint64_t ag_audit_durable_seq(void);

/* The live log, for agctl audit status. */
struct ag_audit_status {
	char dir[4096];
	uint64_t segments, bytes; /* the segment files on disk */
	uint64_t last_seq;
	uint64_t checkpoint_seq;
	int64_t checkpoint_ns; /* unix time of that checkpoint record */
	uint64_t durable_seq;
	enum ag_audit_fsync fsync;
	bool failing;
	char reason[160];
};
/* 0, or -ENODEV when no log is open. Reads the log directory (segments, bytes). */
int ag_audit_status(struct ag_audit_status *st);
const char *ag_audit_fsync_name(enum ag_audit_fsync f);

/* --- hooks: called on the session's worker thread, never block ---------------------------- */

/* A non-PostgreSQL session is refused here while the log is unavailable (reason set). */
bool ag_audit_refuse_session(struct ag_session *s);
void ag_audit_session_start(struct ag_session *s);
/* Also frees the session's audit state; records a start first for a session never started. */
void ag_audit_session_end(struct ag_session *s);
/* message: query | parse | execute | function_call; text may be NULL, else len bytes and a NUL. */
void ag_audit_statement(struct ag_session *s, const char *message, const char *name,
			const char *text, size_t len, enum ag_action action, const char *rule,
			const char *classes, const char *reason);
/* A RowDescription sent to the agent (the whole message). */
void ag_audit_rowdesc(struct ag_session *s, const uint8_t *msg, size_t len);
/* A DataRow as sent to the agent (the whole message, masked); NULL: streamed, counted only. */
void ag_audit_row(struct ag_session *s, const uint8_t *msg, size_t len);
/* The end of a statement's result: CommandComplete, EmptyQuery, PortalSuspended, ErrorResponse. */
void ag_audit_result(struct ag_session *s, const uint8_t *msg, size_t len);
void ag_audit_error(struct ag_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/*
 * HTTP (proto_http.c), answers in request order: a request as decided (its Statement: "METHOD
 * PATH", Kubernetes attributes as classes, the Host; never another header or a credential;
 * refused: msg is the 403's message); the status of the final response the agent gets; its body
 * bytes as sent (masked, unframed, kept up to AG_AUDIT_MAX_BODY); its end (the Result). One of
 * our own answers (a whole message: status line, headers, body) is recorded as it goes out.
 * A response still open at the session's end (a watch) is recorded then.
 */
void ag_audit_http_request(struct ag_session *s, const char *method, const char *path,
			   const char *host, const struct ag_k8s_req *k,
			   const struct ag_http_decision *d, bool refused, const char *msg);
void ag_audit_http_response(struct ag_session *s, unsigned int status);
void ag_audit_http_body(struct ag_session *s, const void *p, size_t n);
void ag_audit_http_done(struct ag_session *s);
void ag_audit_http_local(struct ag_session *s, const void *msg, size_t len);
/*
 * An approval event (for the approvals module): state requested | approved | denied | timeout;
 * by/by_uid the approver (NULL/0 when none), scope once | session | fingerprint.
 */
void ag_audit_approval(uint64_t session, const char *id, const char *state, const char *rule,
		       const char *statement, const char *by, uint32_t by_uid, const char *scope,
		       const char *reason);

/*
 * fsync: always — what goes to the agent waits until the session's records are on disk, so an
 * acknowledged statement is a recorded one. ag_audit_hold(): true when output must wait now
 * (the session is marked held); ag_audit_held() reads the mark; ag_audit_releasable() says a
 * held session's records are durable now; ag_audit_release() ends holding (the session ends).
 * The writer calls each fn registered with ag_audit_on_durable() (thread-safe, e.g. an
 * ag_loop_call() to a worker) when records of held sessions became durable.
 */
bool ag_audit_hold(struct ag_session *s);
bool ag_audit_held(const struct ag_session *s);
bool ag_audit_releasable(const struct ag_session *s);
void ag_audit_release(struct ag_session *s);
void ag_audit_on_durable(void (*fn)(void *arg), void *arg);

/* --- live taps (agctl session watch) ---------------------------------------------------------- */

/*
 * Entries as written, handed to fn on the writer thread while at least one tap is on: each is a
 * serialized audit Entry (seq, hash, record) of session `session`. fn owns nothing it is given.
 */
typedef void (*ag_audit_tap_fn)(void *ctx, uint64_t session, const uint8_t *entry, size_t len);
void ag_audit_tap_set(ag_audit_tap_fn fn, void *ctx);
void ag_audit_tap_get(void);
void ag_audit_tap_put(void);

/* --- offline: reading and verifying a log directory --------------------------------------- */

struct ag_audit_entry {
	uint64_t seq;
	uint8_t hash[32];
	const uint8_t *rec;
	size_t len;
	const char *segment; /* file name */
	uint64_t frame_off;  /* offset of its frame in the segment */
};

/*
 * Calls fn for every entry of every whole frame, in file order; a torn or corrupt frame stops
 * the walk with -EBADMSG (err names segment and offset). fn returning non-zero stops it too.
 */
int ag_audit_walk(const char *dir, int (*fn)(void *ctx, const struct ag_audit_entry *e), void *ctx,
		  char *err, size_t errlen);

struct ag_audit_verify {
	/* out */
	uint64_t records, segments, checkpoints, last_seq, last_checkpoint, unsealed;
	char fingerprint[80];
	char key_source[300];
	uint64_t bad_seq; /* the first bad record, 0 when none could be named */
	char bad_segment[64];
	char reason[512];
	bool live_tail; /* an incomplete frame after the sealed records: being written */
};

/*
 * Verifies dir: frames, seq order, the hash chain, the pinned key, every checkpoint signature
 * and HEAD. key_file: a PEM public or private key to trust (NULL: <dir>/../keys/, else the key
 * pinned in the log). 0 intact; -EBADMSG tampered or damaged (v->reason); other -errno.
 */
int ag_audit_verify_dir(const char *dir, const char *key_file, struct ag_audit_verify *v);

/*
 * Test and repair helper: writes entries (seq, hash, record as given: nothing recomputed) as
 * fresh segments into dir, replacing the ones there. 0 or -errno.
 */
int ag_audit_write_entries(const char *dir, const struct ag_audit_entry *e, size_t n,
			   uint64_t segment_size);
/*
 * The chain hash of an entry, and an Ed25519 checkpoint signature with the PEM private key in
 * key_file (tests: forge a consistent chain to prove the key is what catches it).
 */
void ag_audit_chain_hash(const uint8_t prev[32], uint64_t seq, const uint8_t *rec, size_t len,
			 uint8_t out[32]);
int ag_audit_sign_file(const char *key_file, uint64_t seq, const uint8_t hash[32], uint8_t sig[64],
		       char *fingerprint, size_t fplen);
/* The signature of a HEAD (its own tag, its time signed too) with that key, for tests. */
int ag_audit_sign_head_file(const char *key_file, uint64_t seq, const uint8_t hash[32],
			    int64_t time_ns, uint8_t sig[64]);
