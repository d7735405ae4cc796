// SPDX-License-Identifier: GPL-2.0
/*
 * The audit log's writer and the session hooks (audit.h). Producers encode one Record with
 * protobuf-c and append it to a list under one mutex; the writer thread wakes on a short timer
 * (or at once with fsync: always, or when the list grows long), gives each record its seq and
 * chain hash, compresses the batch into one frame and appends it to the current segment:
 *
 *   segment  := "AGAUDIT1" le64(first seq) frame*
 *   frame    := "AGFR" le32(compressed len) le32(raw len) le32(crc32 of compressed) compressed
 *   raw      := entry*            entry := le32(len) le64(seq) hash[32] record[len]
 *
 * A frame is whole or it is the torn tail of a crash: at start the last segment is cut back to
 * its last whole frame (reported), and the chain continues from the last good hash in a new
 * segment. Checkpoints are records too, signed with the daemon's Ed25519 key over the seq and
 * hash they seal; HEAD holds the newest one, so a tail cut at a frame boundary is seen as well.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include <libdeflate.h>

#include "clock.h"
#include "audit.h"
#include "audit.pb-c.h"
#include "audit_pack.h"
#include "buf.h"
#include "httprule.h"
#include "k8s.h"
#include "keyfile.h"
#include "log.h"
#include "pgwire.h"
#include "session.h"

#define SEG_MAGIC "AGAUDIT1"
#define SEG_HDR 16
#define FRAME_MAGIC "AGFR"
#define FRAME_HDR 16
#define ENTRY_HDR 44
#define MAX_FRAME_RAW (64u << 20)
#define HASH_TAG "agentgate/audit/v1"
#define SIG_TAG "agentgate/audit/checkpoint/v1"
/* HEAD signs its time too, under its own tag: a checkpoint's signature is never a HEAD's. */
#define HEAD_TAG "agentgate/audit/head/v1"
#define WAKE_MS 10
#define WAKE_COUNT 256
/* The writer idles below the workers until records wait this long, or this many. */
#define BOOST_MS (2 * WAKE_MS)
#define BOOST_COUNT (4 * WAKE_COUNT)
#define RETRY_MS 1000

typedef Agentgate__Audit__Record Record;

/* --- time and small helpers ----------------------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = v >> (8 * i);
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = v >> (8 * i);
}

static uint32_t get32(const uint8_t *p)
{
	return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
	return get32(p) | (uint64_t)get32(p + 4) << 32;
}

static void hex(const uint8_t *in, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", in[i]);
}

/* One fetched SHA-256 and one context per thread: no lookup or allocation per record. */
static __thread EVP_MD_CTX *hash_ctx;
static __thread EVP_MD *hash_md;

void ag_audit_chain_hash(const uint8_t prev[32], uint64_t seq, const uint8_t *rec, size_t len,
			 uint8_t out[32])
{
	uint8_t s[8];
	unsigned int n = 32;

	if (!hash_ctx) {
		hash_md = EVP_MD_fetch(NULL, "SHA256", NULL);
		hash_ctx = EVP_MD_CTX_new();
	}
	put64(s, seq);
	EVP_DigestInit_ex2(hash_ctx, hash_md, NULL);
	EVP_DigestUpdate(hash_ctx, HASH_TAG, sizeof(HASH_TAG)); /* with its NUL */
	EVP_DigestUpdate(hash_ctx, prev, 32);
	EVP_DigestUpdate(hash_ctx, s, 8);
	EVP_DigestUpdate(hash_ctx, rec, len);
	EVP_DigestFinal_ex(hash_ctx, out, &n);
}

/* What a checkpoint (tag SIG_TAG) or HEAD (HEAD_TAG, with its time) signs. */
static size_t sig_message(const char *tag, uint64_t seq, const uint8_t hash[32], int64_t time_ns,
			  uint8_t *out)
{
	size_t t = strlen(tag) + 1, n;

	memcpy(out, tag, t);
	put64(out + t, seq);
	memcpy(out + t + 8, hash, 32);
	n = t + 40;
	if (!strcmp(tag, HEAD_TAG)) {
		put64(out + n, (uint64_t)time_ns);
		n += 8;
	}
	return n;
}

static int key_fingerprint(EVP_PKEY *k, uint8_t raw[32], char *fp, size_t fplen)
{
	size_t n = 32;
	uint8_t h[32];
	char hx[65];

	if (EVP_PKEY_get_raw_public_key(k, raw, &n) != 1 || n != 32)
		return -EINVAL;
	EVP_Digest(raw, 32, h, NULL, EVP_sha256(), NULL);
	hex(h, 32, hx);
	snprintf(fp, fplen, "SHA256:%s", hx);
	return 0;
}

static int sign_tagged(EVP_PKEY *k, const char *tag, uint64_t seq, const uint8_t hash[32],
		       int64_t time_ns, uint8_t sig[64])
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	uint8_t msg[64 + 48];
	size_t n = 64, mlen = sig_message(tag, seq, hash, time_ns, msg);
	int rc = -EINVAL;

	if (c && EVP_DigestSignInit(c, NULL, NULL, NULL, k) == 1 &&
	    EVP_DigestSign(c, sig, &n, msg, mlen) == 1 && n == 64)
		rc = 0;
	EVP_MD_CTX_free(c);
	return rc;
}

static int sign(EVP_PKEY *k, uint64_t seq, const uint8_t hash[32], uint8_t sig[64])
{
	return sign_tagged(k, SIG_TAG, seq, hash, 0, sig);
}

static bool sig_ok_tagged(EVP_PKEY *k, const char *tag, uint64_t seq, const uint8_t hash[32],
			  int64_t time_ns, const uint8_t *sig, size_t siglen)
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	uint8_t msg[64 + 48];
	size_t mlen = sig_message(tag, seq, hash, time_ns, msg);
	bool ok = c && EVP_DigestVerifyInit(c, NULL, NULL, NULL, k) == 1 &&
		  EVP_DigestVerify(c, sig, siglen, msg, mlen) == 1;

	EVP_MD_CTX_free(c);
	return ok;
}

static bool sig_ok(EVP_PKEY *k, uint64_t seq, const uint8_t hash[32], const uint8_t *sig,
		   size_t siglen)
{
	return sig_ok_tagged(k, SIG_TAG, seq, hash, 0, sig, siglen);
}

/*
 * A PEM private key, or a PEM public key (pub_ok: a key named to verify with, any readable
 * file). A private key to sign with only from a root-owned file of mode 0600 or stricter, never
 * through a symbolic link (err says why; may be NULL). NULL with errno set.
 */
static EVP_PKEY *key_load(const char *path, bool pub_ok, char *err, size_t errlen)
{
	char e[512];
	EVP_PKEY *k;
	FILE *f;
	int fd;

	fd = pub_ok ? open(path, O_RDONLY | O_CLOEXEC)
		    : ag_keyfile_open(path, "audit signing key", true, err ? err : e,
				      err ? errlen : sizeof(e));
	if (fd < 0) {
		if (!pub_ok)
			errno = -fd;
		return NULL;
	}
	f = fdopen(fd, "r");
	if (!f) {
		close(fd);
		return NULL;
	}
	k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
	if (!k && pub_ok) {
		rewind(f);
		k = PEM_read_PUBKEY(f, NULL, NULL, NULL);
	}
	fclose(f);
	if (!k || EVP_PKEY_get_id(k) != EVP_PKEY_ED25519) {
		EVP_PKEY_free(k);
		k = NULL;
		errno = EINVAL;
	}
	return k;
}

int ag_audit_sign_file(const char *key_file, uint64_t seq, const uint8_t hash[32], uint8_t sig[64],
		       char *fingerprint, size_t fplen)
{
	EVP_PKEY *k = key_load(key_file, false, NULL, 0);
	uint8_t raw[32];
	int rc;

	if (!k)
		return -EINVAL;
	rc = sign(k, seq, hash, sig);
	if (!rc && fingerprint)
		rc = key_fingerprint(k, raw, fingerprint, fplen);
	EVP_PKEY_free(k);
	return rc;
}

int ag_audit_sign_head_file(const char *key_file, uint64_t seq, const uint8_t hash[32],
			    int64_t time_ns, uint8_t sig[64])
{
	EVP_PKEY *k = key_load(key_file, false, NULL, 0);
	int rc;

	if (!k)
		return -EINVAL;
	rc = sign_tagged(k, HEAD_TAG, seq, hash, time_ns, sig);
	EVP_PKEY_free(k);
	return rc;
}

/* --- config ----------------------------------------------------------------------------------- */

static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	int shift = 0;

	if (!s || !*s || *s == '-')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;

	if (*end == 'k' || *end == 'K')
		shift = 10, end++;
	else if (*end == 'm' || *end == 'M')
		shift = 20, end++;
	else if (*end == 'g' || *end == 'G')
		shift = 30, end++;
	if (v > (~0ull >> shift))
		return -EINVAL; /* it would wrap */
	v <<= shift;
	if (*end == 'i')
		end++;
	if (*end == 'b' || *end == 'B')
		end++;
	if (*end)
		return -EINVAL;
	*out = v;
	return 0;
}

int ag_audit_config_parse(const struct ag_kv *kv, size_t n, struct ag_audit_config *c, char *err,
			  size_t errlen)
{
	const struct ag_kv *v;

	c->fsync = AG_AUDIT_FSYNC_BATCH;
	c->checkpoint_records = AG_AUDIT_DEFAULT_CHECKPOINT_RECORDS;
	c->checkpoint_ms = AG_AUDIT_DEFAULT_CHECKPOINT_MS;
	c->segment_size = AG_AUDIT_DEFAULT_SEGMENT_SIZE;
	c->body_bytes = AG_AUDIT_DEFAULT_BODY;
	if (!kv)
		return 0;
	if ((v = ag_kv_get(kv, n, "fsync")) && v->value) {
		if (!strcmp(v->value, "always"))
			c->fsync = AG_AUDIT_FSYNC_ALWAYS;
		else if (!strcmp(v->value, "never"))
			c->fsync = AG_AUDIT_FSYNC_NEVER;
		else if (strcmp(v->value, "batch"))
			goto bad_fsync;
	}
	if ((v = ag_kv_get(kv, n, "checkpoint_records")) && v->value) {
		char *end;

		errno = 0;
		c->checkpoint_records = strtoull(v->value, &end, 10);
		if (errno || *end || !c->checkpoint_records || v->value[0] == '-' ||
		    c->checkpoint_records > 100000000) {
			snprintf(err, errlen,
				 "audit.checkpoint_records: \"%s\" is not a count from 1 to 100000000",
				 v->value);
			return -EINVAL;
		}
	}
	if ((v = ag_kv_get(kv, n, "checkpoint_interval")) && v->value &&
	    ag_parse_duration(v->value, &c->checkpoint_ms)) {
		snprintf(err, errlen, "audit.checkpoint_interval: \"%s\" is not a duration (10s)",
			 v->value);
		return -EINVAL;
	}
	if ((v = ag_kv_get(kv, n, "segment_size")) && v->value &&
	    (parse_size(v->value, &c->segment_size) || c->segment_size < 4096 ||
	     c->segment_size > (1ull << 40))) {
		snprintf(err, errlen,
			 "audit.segment_size: \"%s\" is not a size from 4k to 1T (e.g. 16M)",
			 v->value);
		return -EINVAL;
	}
	if ((v = ag_kv_get(kv, n, "body_bytes")) && v->value &&
	    (parse_size(v->value, &c->body_bytes) || c->body_bytes > AG_AUDIT_MAX_BODY)) {
		snprintf(err, errlen, "audit.body_bytes: \"%s\" is not a size from 0 to 1M (e.g. 4k)",
			 v->value);
		return -EINVAL;
	}
	return 0;
bad_fsync:
	snprintf(err, errlen, "audit.fsync: \"%s\" is not one of always, batch, never", v->value);
	return -EINVAL;
}

/* --- the writer ------------------------------------------------------------------------------- */

struct node {
	struct node *next;
	uint64_t enq; /* its place in the queue, for ag_audit_hold() */
	uint64_t session;
	size_t len;
	uint8_t data[];
};

/* A compressed frame not yet (fully) on disk. */
struct frame {
	struct frame *next;
	uint8_t *buf;
	size_t len;
	uint64_t first_seq;
};

struct tap_item {
	uint64_t session;
	size_t len;
	uint8_t *entry;
};

static struct audit {
	bool on;
	uint64_t body_max; /* cfg.body_bytes, read by the workers (atomic) */
	char dir[PATH_MAX];
	char key_path[PATH_MAX];
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct node *head, **tail;
	size_t queued;
	bool writer_waiting;
	bool stop;
	struct ag_audit_config cfg;

	/* failure, read by the hooks */
	volatile int failed;
	char why[160];

	/* the writer's own */
	EVP_PKEY *key;
	uint8_t pub[32];
	char fp[80];
	uint64_t seq;	       /* last assigned */
	uint8_t hash[32];      /* its chain hash */
	uint64_t sealed_seq;   /* last checkpoint record */
	int64_t sealed_ns;     /* its time */
	/* What ag_audit_status() reads from other threads (publish(), under the lock). */
	uint64_t pub_seq, pub_sealed_seq;
	int64_t pub_sealed_ns;
	uint64_t head_seq;     /* the newest checkpoint record, for HEAD ... */
	uint8_t head_hash[32];
	uint64_t head_written; /* ... and the one HEAD holds */
	uint64_t first_unsealed_ms;
	uint64_t durable;
	uint64_t enq;	      /* records enqueued (under lock) */
	uint64_t written_enq; /* ... taken by the writer into frames */
	uint64_t durable_enq; /* ... on disk and synced */
	int nheld; /* sessions whose output waits for durability */
	struct {
		void (*fn)(void *arg);
		void *arg;
	} wakers[64];
	int nwakers;
	struct frame *pending, **pending_tail;
	int fd;
	unsigned seg_no;
	uint64_t seg_size;
	bool need_fsync;
	uint64_t last_fsync_ms;
	uint64_t batch_ms; /* when the writer last took a batch */
	uint64_t first_enq_ms; /* when the oldest queued record came (under lock) */
	bool low;	       /* a batch's CPU work runs SCHED_IDLE now (atomic) */
	bool raise;	       /* ... and was raised (atomic) */
	uint64_t low_ms;       /* ... since (atomic; 0: not low) */
	bool no_low;	       /* never low: it could not be raised back */
	uint64_t low_batches;  /* count (atomic), for tests */
	uint64_t retry_at_ms;
	struct ag_buf raw;

	ag_audit_tap_fn tap;
	void *tap_ctx;
	int taps;
	struct tap_item *titems;
	size_t ntitems, captitems;
} A = { .fd = -1, .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static void set_failed(const char *what, int err)
{
	pthread_mutex_lock(&A.lock);
	snprintf(A.why, sizeof(A.why), "%s: %s", what, strerror(err));
	pthread_mutex_unlock(&A.lock);
	if (!A.failed)
		pr_err("audit: %s: %s; new sessions are refused until it works again (records "
		       "are kept in memory)",
		       what, strerror(err));
	__atomic_store_n(&A.failed, 1, __ATOMIC_RELEASE);
}

static void clear_failed(void)
{
	if (!A.failed)
		return;
	__atomic_store_n(&A.failed, 0, __ATOMIC_RELEASE);
	pr_info("audit: the log is written again; new sessions are accepted");
}

bool ag_audit_unavailable(char *why, size_t len)
{
	if (!A.on || !__atomic_load_n(&A.failed, __ATOMIC_ACQUIRE))
		return false;
	pthread_mutex_lock(&A.lock);
	snprintf(why, len, "%s", A.why);
	pthread_mutex_unlock(&A.lock);
	return true;
}

uint64_t ag_audit_durable_seq(void)
{
	return __atomic_load_n(&A.durable, __ATOMIC_ACQUIRE);
}

/* The writer's counters, for ag_audit_status() on other threads. */
/* One snapshot for ag_audit_status() (under the lock: its fields agree with each other). */
static void publish(void)
{
	pthread_mutex_lock(&A.lock);
	A.pub_seq = A.seq;
	A.pub_sealed_seq = A.sealed_seq;
	A.pub_sealed_ns = A.sealed_ns;
	pthread_mutex_unlock(&A.lock);
}

const char *ag_audit_fsync_name(enum ag_audit_fsync f)
{
	static const char *const n[] = { "batch", "always", "never" };

	return (unsigned)f < 3 ? n[f] : "unknown";
}

static int seg_list(const char *dir, unsigned **out, size_t *nout);

int ag_audit_status(struct ag_audit_status *st)
{
	unsigned *segs = NULL;
	size_t n = 0;

	memset(st, 0, sizeof(*st));
	if (!A.on)
		return -ENODEV;
	snprintf(st->dir, sizeof(st->dir), "%s", A.dir);
	pthread_mutex_lock(&A.lock);
	/* durable first: it only ever trails what was published before it. */
	st->durable_seq = ag_audit_durable_seq();
	st->last_seq = A.pub_seq;
	st->checkpoint_seq = A.pub_sealed_seq;
	st->checkpoint_ns = A.pub_sealed_ns;
	st->fsync = A.cfg.fsync;
	pthread_mutex_unlock(&A.lock);
	st->failing = ag_audit_unavailable(st->reason, sizeof(st->reason));
	if (!seg_list(A.dir, &segs, &n)) {
		for (size_t i = 0; i < n; i++) {
			char path[PATH_MAX + 32];
			struct stat sb;

			snprintf(path, sizeof(path), "%s/%08u.seg", A.dir, segs[i]);
			if (!stat(path, &sb))
				st->bytes += sb.st_size;
		}
		st->segments = n;
		free(segs);
	}
	return 0;
}

/*
 * The writer's priority. A batch's CPU work (hashing, signing, deflate: no lock held) runs
 * SCHED_IDLE: a worker waking on that core takes it at once, so a deflate never delays a
 * statement — on a busy box those were the latency tail of every session (SCHED_BATCH and
 * nice 19 still made workers wait out a slice). Everything else — the queue's lock, write,
 * fsync — at the workers' level, so it is never starved holding the lock, and its disk I/O
 * stays best-effort (ioprio set explicitly: SCHED_IDLE would imply the idle I/O class). A
 * batch found behind (BOOST_MS old or BOOST_COUNT records) is not lowered; a worker that sees
 * the backlog grow, or the main loop's tick that sees a low batch last BOOST_MS, raises it.
 * Never lowered with fsync always (answers wait for it), nor where the daemon could not
 * raise it back (no CAP_SYS_NICE).
 */
#define IOPRIO_CLASS_BE 2
#define IOPRIO_PRIO(class, level) (((class) << 13) | (level))

static void writer_class(bool low)
{
	struct sched_param sp = { 0 };

	pthread_setschedparam(A.thread, low ? SCHED_IDLE : SCHED_OTHER, &sp);
}

/* Raises a low batch (any thread). */
static void writer_raise(void)
{
	if (__atomic_load_n(&A.low, __ATOMIC_ACQUIRE) &&
	    !__atomic_exchange_n(&A.raise, true, __ATOMIC_ACQ_REL))
		writer_class(false);
}

void ag_audit_writer_stats(uint64_t *low_batches)
{
	*low_batches = __atomic_load_n(&A.low_batches, __ATOMIC_RELAXED);
}

void ag_audit_tick(void)
{
	uint64_t since = __atomic_load_n(&A.low_ms, __ATOMIC_ACQUIRE);

	if (A.on && since && ag_mono_ms() - since >= BOOST_MS)
		writer_raise();
}

/* Raising a thread's priority back needs CAP_SYS_NICE (bit 23 of CapEff). */
bool ag_audit_can_renice(void)
{
	char line[128];
	unsigned long long caps = 0;
	FILE *f = fopen("/proc/self/status", "re");

	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "CapEff: %llx", &caps) == 1)
			break;
	if (f)
		fclose(f);
	return caps & (1ull << 23);
}

/* Enqueues a packed record; the hot path: one allocation, one lock. */
static uint64_t enqueue(const Record *r)
{
	size_t len = ag_audit_record_size(r);
	struct node *n = malloc(sizeof(*n) + len);
	uint64_t enq;
	bool wake;

	if (!n) {
		set_failed("out of memory for an audit record", ENOMEM);
		return 0;
	}
	n->next = NULL;
	n->session = r->session;
	n->len = ag_audit_record_pack(r, n->data);
	pthread_mutex_lock(&A.lock);
	n->enq = enq = ++A.enq;
	if (!A.head)
		A.first_enq_ms = ag_mono_ms();
	*A.tail = n;
	A.tail = &n->next;
	A.queued++;
	wake = A.writer_waiting &&
	       (A.cfg.fsync == AG_AUDIT_FSYNC_ALWAYS || A.queued >= WAKE_COUNT || A.stop);
	if (wake)
		pthread_cond_signal(&A.cond);
	/* Every core busy and the writer idling below them: it runs at the workers' level. */
	/* Every core busy and a batch running low: it runs at the workers' level. */
	if (A.queued >= BOOST_COUNT || ag_mono_ms() - A.first_enq_ms >= BOOST_MS)
		writer_raise();
	pthread_mutex_unlock(&A.lock);
	return enq;
}

static void entry_append(struct ag_buf *b, uint64_t seq, const uint8_t hash[32],
			 const uint8_t *rec, size_t len)
{
	uint8_t *p = ag_buf_reserve(b, ENTRY_HDR + len);

	if (!p)
		return;
	put32(p, len);
	put64(p + 4, seq);
	memcpy(p + 12, hash, 32);
	memcpy(p + ENTRY_HDR, rec, len);
	ag_buf_commit(b, ENTRY_HDR + len);
}

static void tap_add(uint64_t session, uint64_t seq, const uint8_t hash[32], const uint8_t *rec,
		    size_t len)
{
	Agentgate__Audit__Entry e = AGENTGATE__AUDIT__ENTRY__INIT;
	struct tap_item *t;

	if (A.ntitems == A.captitems) {
		size_t cap = A.captitems ? 2 * A.captitems : 64;
		struct tap_item *n = realloc(A.titems, cap * sizeof(*n));

		if (!n)
			return;
		A.titems = n;
		A.captitems = cap;
	}
	e.seq = seq;
	e.hash.data = (uint8_t *)hash;
	e.hash.len = 32;
	e.record.data = (uint8_t *)rec;
	e.record.len = len;
	t = &A.titems[A.ntitems];
	t->len = agentgate__audit__entry__get_packed_size(&e);
	t->entry = malloc(t->len);
	if (!t->entry)
		return;
	agentgate__audit__entry__pack(&e, t->entry);
	t->session = session;
	A.ntitems++;
}

/* Gives rec the next seq, chains it and adds it to the batch being built. */
static void chain_add(uint64_t session, const uint8_t *rec, size_t len, bool tapped)
{
	A.seq++;
	ag_audit_chain_hash(A.hash, A.seq, rec, len, A.hash);
	entry_append(&A.raw, A.seq, A.hash, rec, len);
	if (tapped)
		tap_add(session, A.seq, A.hash, rec, len);
	if (!A.first_unsealed_ms)
		A.first_unsealed_ms = ag_mono_ms();
}

static void chain_add_record(const Record *r)
{
	size_t len = agentgate__audit__record__get_packed_size(r);
	uint8_t *b = malloc(len ? len : 1);

	if (!b)
		return;
	agentgate__audit__record__pack(r, b);
	chain_add(r->session, b, len, false);
	free(b);
}

static int write_head(void)
{
	Agentgate__Audit__Head h = AGENTGATE__AUDIT__HEAD__INIT;
	char path[PATH_MAX + 16], tmp[PATH_MAX + 16];
	uint8_t sig[64], *buf;
	size_t len;
	int fd, rc = 0;

	h.time_ns = ag_unix_ns();
	if (sign_tagged(A.key, HEAD_TAG, A.head_seq, A.head_hash, h.time_ns, sig))
		return -EINVAL;
	h.seq = A.head_seq;
	h.hash.data = A.head_hash;
	h.hash.len = 32;
	h.signature.data = sig;
	h.signature.len = 64;
	h.key_fingerprint = A.fp;
	len = agentgate__audit__head__get_packed_size(&h);
	buf = malloc(len);
	if (!buf)
		return -ENOMEM;
	agentgate__audit__head__pack(&h, buf);
	snprintf(path, sizeof(path), "%s/HEAD", A.dir);
	snprintf(tmp, sizeof(tmp), "%s/HEAD.tmp", A.dir);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	/* Synced only with fsync: always; a HEAD older than the log is a prefix: still valid. */
	if (fd < 0 || write(fd, buf, len) != (ssize_t)len ||
	    (A.cfg.fsync == AG_AUDIT_FSYNC_ALWAYS && fsync(fd)) || rename(tmp, path))
		rc = -(errno ? errno : EIO);
	if (fd >= 0)
		close(fd);
	free(buf);
	return rc;
}

/* A checkpoint record sealing everything so far. */
static void checkpoint_add(void)
{
	Agentgate__Audit__Checkpoint cp = AGENTGATE__AUDIT__CHECKPOINT__INIT;
	Record r = AGENTGATE__AUDIT__RECORD__INIT;
	uint8_t sig[64];

	if (sign(A.key, A.seq, A.hash, sig)) {
		pr_err("audit: signing a checkpoint failed");
		return;
	}
	cp.covers_seq = A.seq;
	cp.covers_hash.data = A.hash;
	cp.covers_hash.len = 32;
	cp.signature.data = sig;
	cp.signature.len = 64;
	cp.key_fingerprint = A.fp;
	r.time_ns = ag_unix_ns();
	r.kind = AGENTGATE__AUDIT__KIND__CHECKPOINT;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_CHECKPOINT;
	r.checkpoint = &cp;
	{
		uint8_t h[32];

		memcpy(h, A.hash, 32);
		cp.covers_hash.data = h;
		chain_add_record(&r);
	}
	A.sealed_seq = A.seq;
	A.sealed_ns = r.time_ns;
	A.head_seq = A.seq;
	memcpy(A.head_hash, A.hash, 32);
	A.first_unsealed_ms = 0;
}

static int seg_open_new(void)
{
	char path[PATH_MAX + 32];
	uint8_t hdr[SEG_HDR];
	int fd;

	A.seg_no++;
	snprintf(path, sizeof(path), "%s/%08u.seg", A.dir, A.seg_no);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
	if (fd < 0) {
		A.seg_no--;
		return -errno;
	}
	memcpy(hdr, SEG_MAGIC, 8);
	put64(hdr + 8, A.pending ? A.pending->first_seq : A.seq + 1);
	if (write(fd, hdr, SEG_HDR) != SEG_HDR) {
		int e = errno ? errno : ENOSPC;

		close(fd);
		unlink(path);
		A.seg_no--;
		return -e;
	}
	if (A.fd >= 0) {
		if (A.cfg.fsync != AG_AUDIT_FSYNC_NEVER)
			fsync(A.fd);
		close(A.fd);
	}
	A.fd = fd;
	A.seg_size = SEG_HDR;
	A.need_fsync = true;
	return 0;
}

/*
 * The writer's one compressor (libdeflate at its fastest level: the zlib format zlib's inflate
 * reads, at about a third of zlib's CPU for a frame of records). NULL without memory.
 */
static struct libdeflate_compressor *frame_compressor(void)
{
	static struct libdeflate_compressor *c;

	if (!c)
		c = libdeflate_alloc_compressor(1);
	return c;
}

/* in as a zlib stream into out (*clen: its room, then the stream's length). 0 or -1. */
static int deflate_frame(uint8_t *out, size_t *clen, const uint8_t *in, size_t len)
{
	struct libdeflate_compressor *c = frame_compressor();
	size_t n = c ? libdeflate_zlib_compress(c, in, len, out, *clen) : 0;

	if (!n)
		return -1;
	*clen = n;
	return 0;
}

/* The batch built in A.raw becomes a pending frame. */
static void frame_seal(uint64_t first_seq)
{
	size_t raw = ag_buf_len(&A.raw), clen;
	struct frame *f;

	if (!raw)
		return;
	clen = frame_compressor() ? libdeflate_zlib_compress_bound(frame_compressor(), raw) : 0;
	f = calloc(1, sizeof(*f));
	if (!f || !clen || !(f->buf = malloc(FRAME_HDR + clen)) ||
	    deflate_frame(f->buf + FRAME_HDR, &clen, ag_buf_head(&A.raw), raw)) {
		/* Memory: the records cannot be kept; say so loudly. */
		pr_err("audit: cannot build a frame: records %llu..%llu lost",
		       (unsigned long long)first_seq, (unsigned long long)A.seq);
		if (f)
			free(f->buf);
		free(f);
		ag_buf_consume(&A.raw, raw);
		return;
	}
	memcpy(f->buf, FRAME_MAGIC, 4);
	put32(f->buf + 4, clen);
	put32(f->buf + 8, raw);
	put32(f->buf + 12, crc32(0, f->buf + FRAME_HDR, clen));
	f->len = FRAME_HDR + clen;
	f->first_seq = first_seq;
	*A.pending_tail = f;
	A.pending_tail = &f->next;
	ag_buf_consume(&A.raw, raw);
}

/* Writes pending frames; 0 when all are on disk (not necessarily synced). */
static int frames_write(void)
{
	while (A.pending) {
		struct frame *f = A.pending;
		ssize_t n;
		int rc;

		if (A.fd < 0 || A.seg_size >= A.cfg.segment_size) {
			rc = seg_open_new();
			if (rc) {
				set_failed("cannot start an audit segment", -rc);
				return rc;
			}
		}
		n = write(A.fd, f->buf, f->len);
		if (n != (ssize_t)f->len) {
			int e = n < 0 ? errno : ENOSPC;

			/* No half frame stays behind: the retry writes it whole. */
			if (n > 0 && ftruncate(A.fd, A.seg_size))
				pr_warn("audit: cannot cut a partial frame: %s", strerror(errno));
			set_failed("writing the audit log", e);
			return -e;
		}
		A.seg_size += f->len;
		A.need_fsync = true;
		A.pending = f->next;
		if (!A.pending)
			A.pending_tail = &A.pending;
		free(f->buf);
		free(f);
	}
	return 0;
}

static void tap_flush(void)
{
	ag_audit_tap_fn fn;
	void *ctx;

	pthread_mutex_lock(&A.lock);
	fn = A.taps ? A.tap : NULL;
	ctx = A.tap_ctx;
	pthread_mutex_unlock(&A.lock);
	for (size_t i = 0; i < A.ntitems; i++) {
		if (fn)
			fn(ctx, A.titems[i].session, A.titems[i].entry, A.titems[i].len);
		free(A.titems[i].entry);
	}
	A.ntitems = 0;
}

/*
 * Everything is written: fsync as the policy says (always: now; batch: once a second and at the
 * end; never: not), then HEAD — the newest checkpoint, once what it seals is synced, so that
 * HEAD never names records a power cut could lose.
 */
static void durable_advance(void);

static void sync_and_seal(uint64_t now, bool stop)
{
	if (A.need_fsync && A.fd >= 0 &&
	    (A.cfg.fsync == AG_AUDIT_FSYNC_ALWAYS || stop ||
	     (A.cfg.fsync == AG_AUDIT_FSYNC_BATCH && now - A.last_fsync_ms >= 1000))) {
		if (fsync(A.fd)) {
			set_failed("fsync of the audit log", errno);
			A.retry_at_ms = now + RETRY_MS;
			return;
		}
		A.need_fsync = false;
		A.last_fsync_ms = now;
	}
	if (!A.need_fsync) {
		__atomic_store_n(&A.durable, A.seq, __ATOMIC_RELEASE);
		durable_advance();
	}
	if (A.head_seq > A.head_written && (!A.need_fsync || A.cfg.fsync == AG_AUDIT_FSYNC_NEVER)) {
		if (write_head()) {
			set_failed("writing the audit HEAD", errno ? errno : EIO);
			A.retry_at_ms = now + RETRY_MS;
			return;
		}
		A.head_written = A.head_seq;
	}
	clear_failed();
}

/* What was enqueued up to written_enq is on disk: sessions held for it may answer now. */
static void durable_advance(void)
{
	__atomic_store_n(&A.durable_enq, A.written_enq, __ATOMIC_SEQ_CST);
	if (!__atomic_load_n(&A.nheld, __ATOMIC_SEQ_CST))
		return;
	for (int i = 0; i < A.nwakers; i++)
		A.wakers[i].fn(A.wakers[i].arg);
}

static void *writer_main(void *arg)
{
	/* An explicit best-effort I/O priority: SCHED_IDLE alone would imply the idle class. */
	syscall(SYS_ioprio_set, 1 /* IOPRIO_WHO_PROCESS */, gettid(),
		IOPRIO_PRIO(IOPRIO_CLASS_BE, 4));
	A.no_low = !ag_audit_can_renice();
	for (;;) {
		struct node *list, *n;
		uint64_t first = A.seq + 1, now;
		bool stop, tapped, low;
		struct timespec ts;

		pthread_mutex_lock(&A.lock);
		now = ag_mono_ms();
		/*
		 * Records come in batches: WAKE_COUNT of them, or what came in WAKE_MS — not the
		 * few that arrived while the last batch was written, which under load made a
		 * frame (a deflate reset, a write) of a handful of records. fsync always takes
		 * them at once: an agent's answer waits for them.
		 */
		if (!A.stop && (!A.head || (A.cfg.fsync != AG_AUDIT_FSYNC_ALWAYS &&
					    A.queued < WAKE_COUNT &&
					    now - A.batch_ms < WAKE_MS))) {
			uint64_t wait_ms = A.cfg.fsync == AG_AUDIT_FSYNC_ALWAYS ? 1000 : WAKE_MS;

			if (A.head)
				wait_ms = A.batch_ms + WAKE_MS - now;
			else if (A.pending)
				wait_ms = RETRY_MS / 4;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += (wait_ms % 1000) * 1000000;
			ts.tv_sec += wait_ms / 1000 + ts.tv_nsec / 1000000000;
			ts.tv_nsec %= 1000000000;
			A.writer_waiting = true;
			pthread_cond_timedwait(&A.cond, &A.lock, &ts);
			A.writer_waiting = false;
		}
		A.batch_ms = ag_mono_ms();
		low = A.head && !A.no_low && A.cfg.fsync != AG_AUDIT_FSYNC_ALWAYS &&
		      A.queued < BOOST_COUNT && A.batch_ms - A.first_enq_ms < BOOST_MS;
		list = A.head;
		A.head = NULL;
		A.tail = &A.head;
		A.queued = 0;
		stop = A.stop;
		tapped = A.taps > 0;
		pthread_mutex_unlock(&A.lock);

		if (low) {
			__atomic_store_n(&A.raise, false, __ATOMIC_RELEASE);
			__atomic_store_n(&A.low_ms, A.batch_ms, __ATOMIC_RELEASE);
			__atomic_store_n(&A.low, true, __ATOMIC_RELEASE);
			writer_class(true);
			__atomic_add_fetch(&A.low_batches, 1, __ATOMIC_RELAXED);
			/* Raised between the two lines above: up again. */
			if (__atomic_load_n(&A.raise, __ATOMIC_ACQUIRE))
				writer_class(false);
		}
		while ((n = list)) {
			list = n->next;
			chain_add(n->session, n->data, n->len, tapped);
			A.written_enq = n->enq;
			free(n);
		}
		now = ag_mono_ms();
		if (A.seq > A.sealed_seq &&
		    (stop || A.seq - A.sealed_seq >= A.cfg.checkpoint_records ||
		     (A.first_unsealed_ms && now - A.first_unsealed_ms >= A.cfg.checkpoint_ms)))
			checkpoint_add();
		frame_seal(first);
		if (low) {
			__atomic_store_n(&A.low, false, __ATOMIC_RELEASE);
			__atomic_store_n(&A.low_ms, 0, __ATOMIC_RELEASE);
			/* Raised (or raising) already: its call lands; else up now. */
			if (!__atomic_exchange_n(&A.raise, true, __ATOMIC_ACQ_REL))
				writer_class(false);
		}
		publish();

		if (A.pending && (!A.failed || now >= A.retry_at_ms) && frames_write())
			A.retry_at_ms = now + RETRY_MS;
		if (!A.pending && (!A.failed || now >= A.retry_at_ms))
			sync_and_seal(now, stop);
		tap_flush();
		if (stop && !A.pending) {
			pthread_mutex_lock(&A.lock);
			stop = !A.head;
			pthread_mutex_unlock(&A.lock);
			if (stop)
				break;
		}
		if (stop && A.pending && A.failed) {
			pr_err("audit: stopping with records %llu..%llu not written: %s",
			       (unsigned long long)A.pending->first_seq, (unsigned long long)A.seq,
			       A.why);
			break;
		}
	}
	return NULL;
}

/* --- opening: keys, recovery ------------------------------------------------------------------ */

static int key_init(const char *state_dir, char *err, size_t errlen)
{
	char dir[PATH_MAX], pub[PATH_MAX + 32];
	FILE *f;
	int fd;

	snprintf(dir, sizeof(dir), "%s/keys", state_dir);
	if (mkdir(dir, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "mkdir %s: %s", dir, strerror(errno));
		return -errno;
	}
	chmod(dir, 0700);
	snprintf(A.key_path, sizeof(A.key_path), "%s/%s", state_dir, AG_AUDIT_KEY_FILE);
	A.key = key_load(A.key_path, false, err, errlen);
	if (!A.key && errno != ENOENT) {
		int e = errno;

		if (e == EINVAL)
			snprintf(err, errlen, "%s: not an Ed25519 private key in PEM", A.key_path);
		return -e;
	}
	if (!A.key) {
		A.key = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
		if (!A.key) {
			snprintf(err, errlen, "cannot generate the audit signing key");
			return -EINVAL;
		}
		fd = open(A.key_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		f = fd >= 0 ? fdopen(fd, "w") : NULL;
		if (!f || PEM_write_PrivateKey(f, A.key, NULL, NULL, 0, NULL, NULL) != 1 ||
		    fflush(f) || fsync(fd)) {
			snprintf(err, errlen, "cannot write %s: %s", A.key_path, strerror(errno));
			if (f)
				fclose(f);
			else if (fd >= 0)
				close(fd);
			return -EIO;
		}
		fclose(f);
		pr_info("audit: made a new signing key %s", A.key_path);
	}
	key_fingerprint(A.key, A.pub, A.fp, sizeof(A.fp));
	snprintf(pub, sizeof(pub), "%s/%s", A.dir, AG_AUDIT_PUB_FILE);
	f = fopen(pub, "w");
	if (!f || PEM_write_PUBKEY(f, A.key) != 1) {
		snprintf(err, errlen, "cannot write %s: %s", pub, strerror(errno));
		if (f)
			fclose(f);
		return -EIO;
	}
	fclose(f);
	return 0;
}

static int seg_number(const char *name, unsigned *n)
{
	char *end;
	unsigned long v;

	if (strlen(name) != 12 || strcmp(name + 8, ".seg"))
		return -1;
	v = strtoul(name, &end, 10);
	if (end != name + 8)
		return -1;
	*n = v;
	return 0;
}

static int cmp_uint(const void *a, const void *b)
{
	unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;

	return x < y ? -1 : x > y;
}

/* The segment numbers of dir, sorted. */
static int seg_list(const char *dir, unsigned **out, size_t *nout)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	unsigned *v = NULL;
	size_t n = 0, cap = 0;

	if (!d)
		return -errno;
	while ((de = readdir(d))) {
		unsigned k;

		if (seg_number(de->d_name, &k))
			continue;
		if (n == cap) {
			unsigned *nv = realloc(v, (cap = cap ? 2 * cap : 16) * sizeof(*v));

			if (!nv) {
				free(v);
				closedir(d);
				return -ENOMEM;
			}
			v = nv;
		}
		v[n++] = k;
	}
	closedir(d);
	qsort(v, n, sizeof(*v), cmp_uint);
	*out = v;
	*nout = n;
	return 0;
}

static int read_file(const char *path, uint8_t **buf, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	size_t off = 0;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st)) {
		close(fd);
		return -errno;
	}
	*buf = malloc(st.st_size ? st.st_size : 1);
	if (!*buf) {
		close(fd);
		return -ENOMEM;
	}
	while (off < (size_t)st.st_size) {
		ssize_t n = read(fd, *buf + off, st.st_size - off);

		if (n <= 0)
			break;
		off += n;
	}
	close(fd);
	*len = off;
	return 0;
}

/*
 * Walks one segment's frames: fn per entry. Returns the offset after the last whole frame in
 * *good; -EBADMSG when a frame is torn or corrupt (reason in err).
 */
static int seg_walk(const char *dir, const char *name, const uint8_t *b, size_t len,
		    int (*fn)(void *ctx, const struct ag_audit_entry *e), void *ctx, size_t *good,
		    char *err, size_t errlen)
{
	size_t off = SEG_HDR;
	uint8_t *raw = NULL;
	int rc = 0;

	*good = 0;
	if (len < SEG_HDR || memcmp(b, SEG_MAGIC, 8)) {
		snprintf(err, errlen, "segment %s: %s", name,
			 len < SEG_HDR ? "shorter than its header" : "not an audit segment");
		return -EBADMSG;
	}
	*good = SEG_HDR;
	while (off < len) {
		uint32_t clen, rlen;
		uLongf dlen;

		if (len - off < FRAME_HDR || memcmp(b + off, FRAME_MAGIC, 4)) {
			snprintf(err, errlen, "segment %s offset %zu: %s", name, off,
				 len - off < FRAME_HDR ? "torn frame header" : "not a frame");
			rc = -EBADMSG;
			break;
		}
		clen = get32(b + off + 4);
		rlen = get32(b + off + 8);
		if (clen > len - off - FRAME_HDR) {
			snprintf(err, errlen, "segment %s offset %zu: torn frame (%u of %u bytes)",
				 name, off, (unsigned)(len - off - FRAME_HDR), clen);
			rc = -EBADMSG;
			break;
		}
		if (crc32(0, b + off + FRAME_HDR, clen) != get32(b + off + 12) ||
		    rlen > MAX_FRAME_RAW) {
			snprintf(err, errlen, "segment %s offset %zu: frame checksum mismatch", name,
				 off);
			rc = -EBADMSG;
			break;
		}
		free(raw);
		raw = malloc(rlen ? rlen : 1);
		dlen = rlen;
		if (!raw || uncompress(raw, &dlen, b + off + FRAME_HDR, clen) != Z_OK ||
		    dlen != rlen) {
			snprintf(err, errlen, "segment %s offset %zu: frame does not decompress",
				 name, off);
			rc = -EBADMSG;
			break;
		}
		for (size_t p = 0; p < rlen;) {
			struct ag_audit_entry e = { .segment = name, .frame_off = off };
			uint32_t elen;

			if (rlen - p < ENTRY_HDR || (elen = get32(raw + p)) > rlen - p - ENTRY_HDR) {
				snprintf(err, errlen, "segment %s offset %zu: malformed entry", name,
					 off);
				rc = -EBADMSG;
				goto out;
			}
			e.len = elen;
			e.seq = get64(raw + p + 4);
			memcpy(e.hash, raw + p + 12, 32);
			e.rec = raw + p + ENTRY_HDR;
			p += ENTRY_HDR + elen;
			if (fn && (rc = fn(ctx, &e)))
				goto out;
		}
		off += FRAME_HDR + clen;
		*good = off;
	}
out:
	free(raw);
	(void)dir;
	return rc;
}

int ag_audit_walk(const char *dir, int (*fn)(void *ctx, const struct ag_audit_entry *e), void *ctx,
		  char *err, size_t errlen)
{
	unsigned *segs;
	size_t n;
	int rc = seg_list(dir, &segs, &n);

	if (rc) {
		snprintf(err, errlen, "%s: %s", dir, strerror(-rc));
		return rc;
	}
	for (size_t i = 0; i < n && !rc; i++) {
		char path[PATH_MAX + 32], name[16];
		uint8_t *b;
		size_t len, good;

		snprintf(name, sizeof(name), "%08u.seg", segs[i]);
		snprintf(path, sizeof(path), "%s/%s", dir, name);
		rc = read_file(path, &b, &len);
		if (rc) {
			snprintf(err, errlen, "%s: %s", path, strerror(-rc));
			break;
		}
		rc = seg_walk(dir, name, b, len, fn, ctx, &good, err, errlen);
		free(b);
	}
	free(segs);
	return rc;
}

struct last_ctx {
	uint64_t seq;
	uint8_t hash[32];
	bool any;
};

static int last_cb(void *ctx, const struct ag_audit_entry *e)
{
	struct last_ctx *l = ctx;

	l->seq = e->seq;
	memcpy(l->hash, e->hash, 32);
	l->any = true;
	return 0;
}

/*
 * Finds where the chain ends: the last whole entry of the newest segment that has one. A torn
 * tail of the newest segment is cut off (*torn bytes of segment torn_seg).
 */
static int recover(uint64_t *torn, char *torn_seg, size_t tslen, char *err, size_t errlen)
{
	unsigned *segs;
	size_t n;
	int rc = seg_list(A.dir, &segs, &n);

	*torn = 0;
	if (rc) {
		snprintf(err, errlen, "%s: %s", A.dir, strerror(-rc));
		return rc;
	}
	A.seq = 0;
	memset(A.hash, 0, 32);
	A.seg_no = n ? segs[n - 1] : 0;
	for (size_t i = n; i-- > 0;) {
		char path[PATH_MAX + 32], name[16], why[256];
		struct last_ctx l = { 0 };
		uint8_t *b;
		size_t len, good;

		snprintf(name, sizeof(name), "%08u.seg", segs[i]);
		snprintf(path, sizeof(path), "%s/%s", A.dir, name);
		rc = read_file(path, &b, &len);
		if (rc) {
			snprintf(err, errlen, "%s: %s", path, strerror(-rc));
			break;
		}
		rc = seg_walk(A.dir, name, b, len, last_cb, &l, &good, why, sizeof(why));
		free(b);
		if (rc && i == n - 1) {
			/* Only the newest segment may have a torn tail: a crash in a write. */
			pr_warn("audit: torn tail at recovery: %s; cutting %zu bytes (the log goes "
				"on from seq %llu)",
				why, len - good, (unsigned long long)l.seq);
			*torn = len - good;
			snprintf(torn_seg, tslen, "%s", name);
			if (good < SEG_HDR ? unlink(path) : truncate(path, good)) {
				snprintf(err, errlen, "cutting the torn tail of %s: %s", path,
					 strerror(errno));
				rc = -errno;
				break;
			}
			rc = 0;
		} else if (rc) {
			snprintf(err, errlen,
				 "%s (not the newest segment: refusing to guess; agctl audit verify)",
				 why);
			break;
		}
		if (l.any) {
			A.seq = l.seq;
			memcpy(A.hash, l.hash, 32);
			break;
		}
	}
	free(segs);
	return rc;
}

static void genesis(void)
{
	Agentgate__Audit__ChainStart cs = AGENTGATE__AUDIT__CHAIN_START__INIT;
	Record r = AGENTGATE__AUDIT__RECORD__INIT;
	char host[256] = "";

	gethostname(host, sizeof(host) - 1);
	cs.public_key.data = A.pub;
	cs.public_key.len = 32;
	cs.key_fingerprint = A.fp;
	cs.host = host;
	r.time_ns = ag_unix_ns();
	r.kind = AGENTGATE__AUDIT__KIND__CHAIN_START;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_CHAIN_START;
	r.chain_start = &cs;
	chain_add_record(&r);
}

int ag_audit_open(const char *state_dir, const struct ag_audit_config *c, char *err,
		  size_t errlen)
{
	Agentgate__Audit__DaemonStart ds = AGENTGATE__AUDIT__DAEMON_START__INIT;
	Record r = AGENTGATE__AUDIT__RECORD__INIT;
	char torn_seg[32] = "";
	uint64_t torn, first;
	int rc;

	A.cfg = *c;
	__atomic_store_n(&A.body_max, c->body_bytes, __ATOMIC_RELAXED);
	A.tail = &A.head;
	A.pending_tail = &A.pending;
	snprintf(A.dir, sizeof(A.dir), "%s/audit", state_dir);
	if (mkdir(A.dir, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "mkdir %s: %s", A.dir, strerror(errno));
		return -errno;
	}
	rc = key_init(state_dir, err, errlen);
	if (rc)
		return rc;
	rc = recover(&torn, torn_seg, sizeof(torn_seg), err, errlen);
	if (rc)
		return rc;
	first = A.seq + 1;
	A.sealed_seq = A.seq;
	if (!A.seq)
		genesis();
	ds.version = AG_VERSION;
	ds.pid = getpid();
	ds.torn_bytes = torn;
	ds.torn_segment = torn_seg;
	ds.key_fingerprint = A.fp;
	r.time_ns = ag_unix_ns();
	r.kind = AGENTGATE__AUDIT__KIND__DAEMON_START;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_DAEMON_START;
	r.daemon_start = &ds;
	chain_add_record(&r);
	checkpoint_add();
	frame_seal(first);
	/* The first frame is written now: a log that cannot be written is a startup error. */
	rc = frames_write();
	if (!rc && A.cfg.fsync != AG_AUDIT_FSYNC_NEVER && fsync(A.fd))
		rc = -errno;
	if (!rc)
		rc = write_head();
	if (rc) {
		snprintf(err, errlen, "audit log %s: %s", A.dir, strerror(-rc));
		return rc;
	}
	A.head_written = A.head_seq;
	A.need_fsync = false;
	A.durable = A.seq;
	publish();
	__atomic_store_n(&A.failed, 0, __ATOMIC_RELEASE);
	rc = pthread_create(&A.thread, NULL, writer_main, NULL);
	if (!rc)
		pthread_setname_np(A.thread, "ag-audit");
	if (rc) {
		snprintf(err, errlen, "audit writer: %s", strerror(rc));
		return -rc;
	}
	A.on = true;
	pr_info("audit: %s, records %llu.., key %s", A.dir, (unsigned long long)first, A.fp);
	return 0;
}

void ag_audit_set_config(const struct ag_audit_config *c)
{
	if (!A.on)
		return;
	pthread_mutex_lock(&A.lock);
	A.cfg = *c;
	__atomic_store_n(&A.body_max, c->body_bytes, __ATOMIC_RELAXED);
	pthread_cond_signal(&A.cond); /* the writer's priority follows fsync at once */
	pthread_mutex_unlock(&A.lock);
}

static void record_init(Record *r, uint64_t session, Agentgate__Audit__Kind kind)
{
	agentgate__audit__record__init(r);
	r->time_ns = ag_unix_ns();
	r->session = session;
	r->kind = kind;
}

void ag_audit_close(void)
{
	Record r;

	if (!A.on)
		return;
	record_init(&r, 0, AGENTGATE__AUDIT__KIND__DAEMON_STOP);
	enqueue(&r);
	pthread_mutex_lock(&A.lock);
	A.stop = true;
	pthread_cond_signal(&A.cond);
	pthread_mutex_unlock(&A.lock);
	pthread_join(A.thread, NULL);
	A.on = false;
	/* A next ag_audit_open() (tests) starts a writer from scratch. */
	A.stop = false;
	A.batch_ms = A.first_enq_ms = 0;
	if (A.fd >= 0)
		close(A.fd);
	A.fd = -1;
	EVP_PKEY_free(A.key);
	A.key = NULL;
	ag_buf_free(&A.raw);
	free(A.titems);
	A.titems = NULL;
	A.captitems = 0;
	pr_info("audit: sealed at seq %llu", (unsigned long long)A.seq);
}

void ag_audit_tap_set(ag_audit_tap_fn fn, void *ctx)
{
	pthread_mutex_lock(&A.lock);
	A.tap = fn;
	A.tap_ctx = ctx;
	pthread_mutex_unlock(&A.lock);
}

void ag_audit_tap_get(void)
{
	pthread_mutex_lock(&A.lock);
	A.taps++;
	pthread_mutex_unlock(&A.lock);
}

void ag_audit_tap_put(void)
{
	pthread_mutex_lock(&A.lock);
	if (A.taps > 0)
		A.taps--;
	pthread_mutex_unlock(&A.lock);
}

/* --- session hooks ---------------------------------------------------------------------------- */

/* What one session's current statement has sent back so far. */
struct ag_audit_sess {
	uint64_t last_enq; /* the session's newest record in the queue */
	bool held;	   /* output to the agent waits for last_enq to be durable */
	bool no_hold;	   /* ending: what is left goes out */
	bool started;
	bool pending; /* a statement whose result is not recorded yet */
	int64_t stmt_ns;
	uint64_t masked_at;
	uint64_t rows;
	bool capped;
	bool execute;	/* the pending result is an Execute's */
	char portal[64];
	struct ag_buf rowdesc;
	struct ag_buf kept; /* le32 length, DataRow body; ... */
	size_t nkept;
	struct ag_audit_http *http;
};

/* HTTP: the answers owed, in request order, and the response going out now. */
struct ag_audit_http {
	struct ag_buf owed; /* the decision time (int64 ns) of each request still owed an answer */
	bool open;	    /* a final response is being sent */
	unsigned int status;
	uint64_t masked_at, bytes;
	bool capped;
	struct ag_buf body; /* its first audit.body_bytes bytes */
	EVP_MD_CTX *sha;    /* of the whole body */
};

static EVP_MD *body_md;
static pthread_once_t body_md_once = PTHREAD_ONCE_INIT;

static void body_md_fetch(void)
{
	body_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

static void http_free(struct ag_audit_http *h);
static void http_emit(struct ag_session *s, struct ag_audit_sess *a);

static struct ag_audit_sess *sess_state(struct ag_session *s)
{
	if (!s->audit)
		s->audit = calloc(1, sizeof(*s->audit));
	return s->audit;
}

bool ag_audit_hold(struct ag_session *s)
{
	struct ag_audit_sess *a = s->audit;

	bool now;

	if (!a || A.cfg.fsync != AG_AUDIT_FSYNC_ALWAYS || !A.on)
		return false;
	now = !a->no_hold && a->last_enq > __atomic_load_n(&A.durable_enq, __ATOMIC_SEQ_CST);
	if (now && !a->held) {
		__atomic_add_fetch(&A.nheld, 1, __ATOMIC_SEQ_CST);
		/* The writer may have synced before it saw the count: look again. */
		now = a->last_enq > __atomic_load_n(&A.durable_enq, __ATOMIC_SEQ_CST);
		if (!now)
			__atomic_sub_fetch(&A.nheld, 1, __ATOMIC_SEQ_CST);
	} else if (!now && a->held) {
		__atomic_sub_fetch(&A.nheld, 1, __ATOMIC_SEQ_CST);
	}
	a->held = now;
	return now;
}

bool ag_audit_held(const struct ag_session *s)
{
	return s->audit && s->audit->held;
}

bool ag_audit_releasable(const struct ag_session *s)
{
	return s->audit && s->audit->held &&
	       s->audit->last_enq <= __atomic_load_n(&A.durable_enq, __ATOMIC_ACQUIRE);
}

void ag_audit_release(struct ag_session *s)
{
	if (s->audit) {
		if (s->audit->held)
			__atomic_sub_fetch(&A.nheld, 1, __ATOMIC_SEQ_CST);
		s->audit->no_hold = true;
		s->audit->held = false;
	}
}

void ag_audit_on_durable(void (*fn)(void *arg), void *arg)
{
	pthread_mutex_lock(&A.lock);
	if (A.nwakers < (int)(sizeof(A.wakers) / sizeof(A.wakers[0]))) {
		A.wakers[A.nwakers].fn = fn;
		A.wakers[A.nwakers++].arg = arg;
	}
	pthread_mutex_unlock(&A.lock);
}

bool ag_audit_refuse_session(struct ag_session *s)
{
	char why[160];

	if (!ag_audit_unavailable(why, sizeof(why)) || (s->proto && !strcmp(s->proto->name, "postgres")))
		return false;
	snprintf(s->reason, sizeof(s->reason), "audit log unavailable: %s", why);
	return true;
}

void ag_audit_session_start(struct ag_session *s)
{
	Agentgate__Audit__SessionStart st = AGENTGATE__AUDIT__SESSION_START__INIT;
	struct ag_audit_sess *a;
	Record r;

	if (!A.on || !(a = sess_state(s)) || a->started)
		return;
	a->started = true;
	st.agent = s->agent;
	st.cgroup = s->cgroup;
	st.cgroup_id = s->info.cgroup_id;
	st.pid = s->info.tgid;
	st.tid = s->info.tid;
	st.uid = s->info.uid;
	st.gid = s->info.gid;
	st.comm = s->info.comm;
	st.target = s->target_name;
	st.protocol = s->protocol;
	st.orig_dst = s->orig_dst;
	st.upstream = s->upstream;
	st.observe = s->observe;
	st.started_ns = s->started_ns;
	record_init(&r, s->id, AGENTGATE__AUDIT__KIND__SESSION_START);
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_SESSION_START;
	r.session_start = &st;
	a->last_enq = enqueue(&r);
}

static void result_emit(struct ag_session *s, struct ag_audit_sess *a, const char *tag,
			const char *sqlstate)
{
	Agentgate__Audit__Result res = AGENTGATE__AUDIT__RESULT__INIT;
	ProtobufCBinaryData rows[64], *rv = rows;
	const uint8_t *p = ag_buf_head(&a->kept);
	Record r;

	if (a->nkept > 64 && !(rv = malloc(a->nkept * sizeof(*rv)))) {
		rv = rows;
		a->nkept = 0;
		a->capped = true;
	}
	for (size_t i = 0; i < a->nkept; i++) {
		rv[i].len = get32(p);
		rv[i].data = (uint8_t *)p + 4;
		p += 4 + rv[i].len;
	}
	res.command_tag = (char *)tag;
	res.rows = a->rows;
	res.masked_values = s->masked_values - a->masked_at;
	res.row_description.data = (uint8_t *)ag_buf_head(&a->rowdesc);
	res.row_description.len = ag_buf_len(&a->rowdesc);
	res.n_data_rows = a->nkept;
	res.data_rows = rv;
	res.rows_capped = a->capped;
	res.sqlstate = (char *)(sqlstate ? sqlstate : "");
	res.message = (char *)(a->execute ? "execute" : "");
	res.name = a->execute ? a->portal : (char *)"";
	record_init(&r, s->id, AGENTGATE__AUDIT__KIND__RESULT);
	res.elapsed_ns = a->stmt_ns ? r.time_ns - a->stmt_ns : 0;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_RESULT;
	r.result = &res;
	a->last_enq = enqueue(&r);
	if (rv != rows)
		free(rv);
	a->rows = 0;
	a->nkept = 0;
	a->capped = false;
	a->execute = false;
	a->masked_at = s->masked_values;
	a->pending = false;
	ag_buf_consume(&a->kept, ag_buf_len(&a->kept));
	ag_buf_consume(&a->rowdesc, ag_buf_len(&a->rowdesc));
}

void ag_audit_session_end(struct ag_session *s)
{
	Agentgate__Audit__SessionEnd e = AGENTGATE__AUDIT__SESSION_END__INIT;
	struct ag_audit_sess *a;
	Record r;

	if (!A.on) {
		free(s->audit);
		s->audit = NULL;
		return;
	}
	ag_audit_session_start(s);
	a = s->audit;
	if (a && (a->rows || a->nkept))
		result_emit(s, a, "", NULL);
	if (a && a->http && a->http->open)
		http_emit(s, a); /* a response still streaming (a watch): what it sent so far */
	e.state = s->state == AG_SESS_DENIED ? "denied" : "closed";
	e.reason = s->reason;
	e.bytes_up = s->bytes_up;
	e.bytes_down = s->bytes_down;
	e.statements = s->statements;
	e.blocked = s->blocked;
	e.masked_values = s->masked_values;
	e.duration_ns = s->ended_ns > s->started_ns ? s->ended_ns - s->started_ns : 0;
	record_init(&r, s->id, AGENTGATE__AUDIT__KIND__SESSION_END);
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_SESSION_END;
	r.session_end = &e;
	enqueue(&r);
	if (a) {
		ag_buf_free(&a->kept);
		ag_buf_free(&a->rowdesc);
		http_free(a->http);
		free(a);
	}
	s->audit = NULL;
}

/* The string at src (up to max bytes, or its NUL) into dst, cut to fit: snprintf's "%.*s". */
static void copy_cut(char *dst, size_t size, const char *src, size_t max)
{
	size_t n = strnlen(src, max < size - 1 ? max : size - 1);

	memcpy(dst, src, n);
	dst[n] = '\0';
}

void ag_audit_statement(struct ag_session *s, const char *message, const char *name,
			const char *text, size_t len, enum ag_action action, const char *rule,
			const char *classes, const char *reason)
{
	Agentgate__Audit__Statement st = AGENTGATE__AUDIT__STATEMENT__INIT;
	struct ag_audit_sess *a;
	char *t = NULL;
	Record r;

	if (!A.on || !(a = sess_state(s)))
		return;
	/* An Execute (decided at its Parse) goes into its result's record: one record, not two. */
	if (!strcmp(message, "execute") && action == AG_ACT_ALLOW && !text) {
		if (!a->pending)
			a->stmt_ns = ag_unix_ns();
		a->pending = true;
		a->execute = true;
		copy_cut(a->portal, sizeof(a->portal), name ? name : "", SIZE_MAX);
		return;
	}
	if (text) {
		st.text_truncated = len > AG_AUDIT_MAX_TEXT;
		if (st.text_truncated)
			len = AG_AUDIT_MAX_TEXT;
		/*
		 * The wire's strings end in a NUL: copied only when cut (or not terminated). (memchr,
		 * not strnlen: libpg_query's own strnlen, a byte at a time, stands in for libc's.)
		 */
		if (st.text_truncated || memchr(text, 0, len + 1) != text + len)
			t = strndup(text, len);
		else
			st.text = (char *)text;
	}
	st.message = (char *)message;
	st.name = (char *)(name ? name : "");
	if (t)
		st.text = t;
	else if (!text)
		st.text = (char *)"";
	st.decision = (char *)ag_action_name(action);
	st.rule = (char *)(rule ? rule : "");
	st.classes = (char *)(classes ? classes : "");
	st.reason = (char *)(reason ? reason : "");
	record_init(&r, s->id, AGENTGATE__AUDIT__KIND__STATEMENT);
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_STATEMENT;
	r.statement = &st;
	a->last_enq = enqueue(&r);
	free(t);
	if (!a->pending)
		a->stmt_ns = r.time_ns;
	a->pending = true;
}

/*
 * ag_buf_append() for a statement's row description and kept rows, which are small: a first
 * block of SMALL_BUF bytes (served by malloc's per-thread cache) rather than ag_buf's 4 KiB
 * (a trip through malloc's bins, which consolidates them, twice per statement); more grows
 * as ag_buf grows. Drained, the buffer is freed as any ag_buf (an idle session holds none).
 */
#define SMALL_BUF 512

static int buf_append_small(struct ag_buf *b, const void *p, size_t n)
{
	if (!b->data && n <= SMALL_BUF) {
		b->data = malloc(SMALL_BUF);
		if (!b->data)
			return -ENOMEM;
		b->cap = SMALL_BUF;
		b->start = b->end = 0;
	}
	return ag_buf_append(b, p, n);
}

void ag_audit_rowdesc(struct ag_session *s, const uint8_t *msg, size_t len)
{
	struct ag_audit_sess *a;

	if (!A.on || !(a = sess_state(s)) || len < PG_HDR)
		return;
	ag_buf_consume(&a->rowdesc, ag_buf_len(&a->rowdesc));
	buf_append_small(&a->rowdesc, msg + PG_HDR, len - PG_HDR);
}

void ag_audit_row(struct ag_session *s, const uint8_t *msg, size_t len)
{
	struct ag_audit_sess *a;
	uint8_t l[4];

	if (!A.on || !(a = sess_state(s)))
		return;
	a->rows++;
	if (!msg || len < PG_HDR || a->nkept >= AG_AUDIT_MAX_ROWS ||
	    ag_buf_len(&a->kept) + len > AG_AUDIT_MAX_ROW_BYTES) {
		a->capped = true;
		return;
	}
	put32(l, len - PG_HDR);
	if (buf_append_small(&a->kept, l, 4) ||
	    ag_buf_append(&a->kept, msg + PG_HDR, len - PG_HDR)) {
		a->capped = true;
		return;
	}
	a->nkept++;
}

void ag_audit_result(struct ag_session *s, const uint8_t *msg, size_t len)
{
	struct ag_audit_sess *a;
	char tag[64] = "", code[6] = "";

	if (!A.on || !(a = sess_state(s)) || len < PG_HDR)
		return;
	switch (msg[0]) {
	case PG_B_COMMAND_COMPLETE:
		copy_cut(tag, sizeof(tag), (const char *)msg + PG_HDR, len - PG_HDR);
		break;
	case PG_B_EMPTY_QUERY:
		copy_cut(tag, sizeof(tag), "empty", SIZE_MAX);
		break;
	case PG_B_PORTAL_SUSPENDED:
		copy_cut(tag, sizeof(tag), "suspended", SIZE_MAX);
		break;
	case PG_B_ERROR: {
		const char *c = pg_error_field(msg + PG_HDR, len - PG_HDR, 'C');

		copy_cut(tag, sizeof(tag), "error", SIZE_MAX);
		copy_cut(code, sizeof(code), c ? c : "", 5);
		break;
	}
	default:
		return;
	}
	result_emit(s, a, tag, code);
}

/* --- HTTP ------------------------------------------------------------------------------------ */

static struct ag_audit_http *http_state(struct ag_session *s)
{
	struct ag_audit_sess *a = sess_state(s);

	if (a && !a->http)
		a->http = calloc(1, sizeof(*a->http));
	return a ? a->http : NULL;
}

/*
 * Empties b, keeping its storage when small (no malloc and free per request: ag_buf's own
 * 4 KiB first allocation is past malloc's thread cache).
 */
static void http_buf_empty(struct ag_buf *b)
{
	b->start = b->end = 0;
	if (b->cap > 4096)
		ag_buf_free(b);
}

/* Room for len more bytes, a small buffer first (not ag_buf's 4 KiB): 0 or -ENOMEM. */
static int http_buf_room(struct ag_buf *b, size_t len)
{
	size_t cap = len < 64 ? 64 : len;

	if (b->data)
		return 0;
	b->data = malloc(cap);
	if (!b->data)
		return -ENOMEM;
	b->cap = cap;
	b->start = b->end = 0;
	return 0;
}

static void http_free(struct ag_audit_http *h)
{
	if (!h)
		return;
	ag_buf_free(&h->owed);
	ag_buf_free(&h->body);
	EVP_MD_CTX_free(h->sha);
	free(h);
}

/* "verb=get resource=secrets ns=default name=x": the attributes the rules saw. */
static void k8s_attrs(const struct ag_k8s_req *k, char *out, size_t len)
{
	const struct {
		const char *name, *v;
	} f[] = { { "verb", k->verb },	       { "group", k->group },
		  { "version", k->version },   { "resource", k->resource },
		  { "subresource", k->subresource }, { "ns", k->ns },
		  { "name", k->name } };
	size_t n = 0;

	out[0] = '\0';
	for (size_t i = 0; i < sizeof(f) / sizeof(f[0]) && n < len; i++)
		if (f[i].v[0])
			n += snprintf(out + n, len - n, "%s%s=%s", n ? " " : "", f[i].name, f[i].v);
	if (!k->resource_request && n < len)
		snprintf(out + n, len - n, "%snonresource", n ? " " : "");
}

void ag_audit_http_request(struct ag_session *s, const char *method, const char *path,
			   const char *host, const struct ag_k8s_req *k,
			   const struct ag_http_decision *d, bool refused, const char *msg)
{
	Agentgate__Audit__Statement st = AGENTGATE__AUDIT__STATEMENT__INIT;
	struct ag_audit_http *h;
	enum ag_action act;
	char classes[800] = "", why[256] = "", line[512], *text = line;
	size_t ml = strlen(method), pl = strlen(path);
	Record r;

	if (!A.on || !(h = http_state(s)))
		return;
	ag_audit_session_start(s); /* a request may be decided before the upstream is connected */
	/* What was done: refused, let through, or let through only because of observe mode. */
	act = refused ? AG_ACT_DENY : d->action == AG_ACT_ALLOW ? AG_ACT_ALLOW : AG_ACT_OBSERVE;
	if (act == AG_ACT_OBSERVE && d->action != AG_ACT_OBSERVE)
		snprintf(why, sizeof(why), "observe mode, would refuse: %s", d->why);
	/* "METHOD PATH": on the stack unless the path is long (no printf, no malloc each) */
	if (ml + pl + 2 > sizeof(line) && !(text = malloc(ml + pl + 2)))
		text = NULL;
	if (text) {
		memcpy(text, method, ml);
		text[ml] = ' ';
		memcpy(text + ml + 1, path, pl + 1);
	}
	if (k)
		k8s_attrs(k, classes, sizeof(classes));
	st.message = (char *)"request";
	st.text = text ? text : (char *)"";
	st.decision = (char *)ag_action_name(act);
	st.rule = (char *)(d->rule ? d->rule : "");
	st.classes = classes;
	st.reason = refused ? (char *)(msg ? msg : "") : why;
	st.host = (char *)(host ? host : "");
	record_init(&r, s->id, AGENTGATE__AUDIT__KIND__STATEMENT);
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_STATEMENT;
	r.statement = &st;
	s->audit->last_enq = enqueue(&r);
	if (text != line)
		free(text);
	if (!http_buf_room(&h->owed, 8 * sizeof(r.time_ns)))
		ag_buf_append(&h->owed, &r.time_ns, sizeof(r.time_ns));
}

void ag_audit_http_response(struct ag_session *s, unsigned int status)
{
	struct ag_audit_http *h;

	if (!A.on || !(h = http_state(s)))
		return;
	h->open = true;
	h->status = status;
	h->masked_at = s->masked_values;
	h->bytes = 0;
	h->capped = false;
	http_buf_empty(&h->body);
	pthread_once(&body_md_once, body_md_fetch);
	if (!h->sha)
		h->sha = EVP_MD_CTX_new();
	/* No digest (out of memory) is recorded as none, never as a wrong one. */
	if (h->sha && (!body_md || !EVP_DigestInit_ex2(h->sha, body_md, NULL))) {
		EVP_MD_CTX_free(h->sha);
		h->sha = NULL;
	}
}

void ag_audit_http_body(struct ag_session *s, const void *p, size_t n)
{
	struct ag_audit_http *h = s->audit ? s->audit->http : NULL;
	size_t keep;

	if (!A.on || !h || !h->open)
		return;
	h->bytes += n;
	if (h->sha && n && !EVP_DigestUpdate(h->sha, p, n)) {
		EVP_MD_CTX_free(h->sha);
		h->sha = NULL;
	}
	keep = __atomic_load_n(&A.body_max, __ATOMIC_RELAXED);
	keep = keep > ag_buf_len(&h->body) ? keep - ag_buf_len(&h->body) : 0;
	if (n > keep)
		h->capped = true;
	if (n && keep &&
	    (http_buf_room(&h->body, __atomic_load_n(&A.body_max, __ATOMIC_RELAXED)) ||
	     ag_buf_append(&h->body, p, n < keep ? n : keep)))
		h->capped = true;
}

static void http_emit(struct ag_session *s, struct ag_audit_sess *a)
{
	Agentgate__Audit__Result res = AGENTGATE__AUDIT__RESULT__INIT;
	struct ag_audit_http *h = a->http;
	int64_t t0 = 0;
	uint8_t sha[32];
	unsigned int shalen = 0;
	char tag[32];
	Record r;

	if (h->sha && !EVP_DigestFinal_ex(h->sha, sha, &shalen))
		shalen = 0;
	if (ag_buf_len(&h->owed) >= sizeof(t0)) {
		memcpy(&t0, ag_buf_head(&h->owed), sizeof(t0));
		h->owed.start += sizeof(t0);
		if (!ag_buf_len(&h->owed))
			http_buf_empty(&h->owed);
	}
	{
		/* "HTTP <status>", without printf (once per response) */
		char num[12];
		size_t i = sizeof(num);
		unsigned int v = h->status;

		do {
			num[--i] = '0' + v % 10;
			v /= 10;
		} while (v);
		memcpy(tag, "HTTP ", 5);
		memcpy(tag + 5, num + i, sizeof(num) - i);
		tag[5 + sizeof(num) - i] = '\0';
	}
	res.command_tag = tag;
	res.http_status = h->status;
	res.masked_values = s->masked_values - h->masked_at;
	res.body.data = (uint8_t *)ag_buf_head(&h->body);
	res.body.len = ag_buf_len(&h->body);
	res.body_capped = h->capped;
	res.body_bytes = h->bytes;
	res.body_sha256.data = sha;
	res.body_sha256.len = shalen == sizeof(sha) ? shalen : 0;
	record_init(&r, s->id, AGENTGATE__AUDIT__KIND__RESULT);
	res.elapsed_ns = t0 ? r.time_ns - t0 : 0;
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_RESULT;
	r.result = &res;
	a->last_enq = enqueue(&r);
	h->open = false;
	http_buf_empty(&h->body);
}

void ag_audit_http_done(struct ag_session *s)
{
	if (A.on && s->audit && s->audit->http && s->audit->http->open)
		http_emit(s, s->audit);
}

void ag_audit_http_local(struct ag_session *s, const void *msg, size_t len)
{
	const char *m = msg, *end = memmem(m, len, "\r\n\r\n", 4);
	unsigned int status = 0;

	if (!A.on)
		return;
	if (len > 12 && !memcmp(m, "HTTP/1.", 7))
		status = strtoul(m + 9, NULL, 10);
	ag_audit_http_response(s, status);
	if (end)
		ag_audit_http_body(s, end + 4, m + len - end - 4);
	ag_audit_http_done(s);
}

void ag_audit_error(struct ag_session *s, const char *fmt, ...)
{
	Agentgate__Audit__Error e = AGENTGATE__AUDIT__ERROR__INIT;
	char msg[512];
	va_list ap;
	Record r;

	if (!A.on)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	e.message = msg;
	record_init(&r, s ? s->id : 0, AGENTGATE__AUDIT__KIND__ERROR);
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_ERROR;
	r.error = &e;
	if (s && s->audit)
		s->audit->last_enq = enqueue(&r);
	else
		enqueue(&r);
}

void ag_audit_approval(uint64_t session, const char *id, const char *state, const char *rule,
		       const char *statement, const char *by, uint32_t by_uid, const char *scope,
		       const char *reason)
{
	Agentgate__Audit__Approval ap = AGENTGATE__AUDIT__APPROVAL__INIT;
	Record r;

#define S(x) ((char *)((x) ? (x) : ""))
	if (!A.on)
		return;
	ap.id = S(id);
	ap.state = S(state);
	ap.rule = S(rule);
	ap.statement = S(statement);
	ap.by = S(by);
	ap.by_uid = by_uid;
	ap.scope = S(scope);
	ap.reason = S(reason);
#undef S
	record_init(&r, session, AGENTGATE__AUDIT__KIND__APPROVAL);
	r.body_case = AGENTGATE__AUDIT__RECORD__BODY_APPROVAL;
	r.approval = &ap;
	enqueue(&r);
}

/* --- offline: verify -------------------------------------------------------------------------- */

struct vctx {
	struct ag_audit_verify *v;
	EVP_PKEY *trusted;
	uint64_t expect;
	uint8_t prev[32];
	uint64_t head_seq;
	uint8_t head_hash[32];
	bool head_seen;
};

static int vbad(struct vctx *c, const struct ag_audit_entry *e, uint64_t seq, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int vbad(struct vctx *c, const struct ag_audit_entry *e, uint64_t seq, const char *fmt, ...)
{
	va_list ap;

	c->v->bad_seq = seq;
	snprintf(c->v->bad_segment, sizeof(c->v->bad_segment), "%s", e ? e->segment : "");
	va_start(ap, fmt);
	vsnprintf(c->v->reason, sizeof(c->v->reason), fmt, ap);
	va_end(ap);
	return -EBADMSG;
}

static int verify_cb(void *ctx, const struct ag_audit_entry *e)
{
	struct vctx *c = ctx;
	uint8_t h[32];
	Record *r;
	int rc = 0;

	if (e->seq != c->expect)
		return vbad(c, e, c->expect,
			    e->seq > c->expect ?
				    "record missing: seq %llu found where seq %llu belongs "
				    "(deleted, reordered or a segment missing)" :
				    "record out of order: seq %llu found where seq %llu belongs "
				    "(reordered or repeated)",
			    (unsigned long long)e->seq, (unsigned long long)c->expect);
	ag_audit_chain_hash(c->prev, e->seq, e->rec, e->len, h);
	if (memcmp(h, e->hash, 32))
		return vbad(c, e, e->seq,
			    "hash mismatch: the record was edited or the chain broken here");
	r = agentgate__audit__record__unpack(NULL, e->len, e->rec);
	if (!r)
		return vbad(c, e, e->seq, "not a valid audit record");
	if (e->seq == 1) {
		uint8_t raw[32];
		char fp[80];

		if (r->body_case != AGENTGATE__AUDIT__RECORD__BODY_CHAIN_START ||
		    r->chain_start->public_key.len != 32) {
			rc = vbad(c, e, 1, "the first record is not the chain start");
			goto out;
		}
		if (c->trusted) {
			key_fingerprint(c->trusted, raw, fp, sizeof(fp));
			if (memcmp(raw, r->chain_start->public_key.data, 32)) {
				rc = vbad(c, e, 1,
					  "the chain pins key %s, not the trusted key %s (re-signed "
					  "with another key?)",
					  r->chain_start->key_fingerprint, fp);
				goto out;
			}
		} else {
			c->trusted = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL,
								 r->chain_start->public_key.data,
								 32);
			snprintf(c->v->key_source, sizeof(c->v->key_source),
				 "the key pinned in the log (no trusted key given: --key)");
		}
		key_fingerprint(c->trusted, raw, c->v->fingerprint, sizeof(c->v->fingerprint));
	} else if (!c->trusted) {
		rc = vbad(c, e, 1, "the chain start (seq 1) is missing");
		goto out;
	}
	if (r->body_case == AGENTGATE__AUDIT__RECORD__BODY_CHECKPOINT) {
		Agentgate__Audit__Checkpoint *cp = r->checkpoint;

		if (cp->covers_seq != e->seq - 1 || cp->covers_hash.len != 32 ||
		    memcmp(cp->covers_hash.data, c->prev, 32)) {
			rc = vbad(c, e, e->seq, "checkpoint does not seal the records before it");
			goto out;
		}
		if (!sig_ok(c->trusted, cp->covers_seq, c->prev, cp->signature.data,
			    cp->signature.len)) {
			rc = vbad(c, e, e->seq,
				  "checkpoint signature does not verify with key %s (signed by %s)",
				  c->v->fingerprint, cp->key_fingerprint);
			goto out;
		}
		c->v->checkpoints++;
		c->v->last_checkpoint = e->seq;
	}
	if (e->seq == c->head_seq) {
		memcpy(c->head_hash, e->hash, 32);
		c->head_seen = true;
	}
	memcpy(c->prev, e->hash, 32);
	c->expect++;
	c->v->records++;
	c->v->last_seq = e->seq;
out:
	agentgate__audit__record__free_unpacked(r, NULL);
	return rc;
}

int ag_audit_verify_dir(const char *dir, const char *key_file, struct ag_audit_verify *v)
{
	struct vctx c = { .v = v, .expect = 1 };
	Agentgate__Audit__Head *head = NULL;
	char path[PATH_MAX + 32], err[512] = "", newest[32] = "";
	unsigned *segs;
	uint8_t *hb = NULL;
	size_t n, hlen;
	int rc;

	memset(v, 0, sizeof(*v));
	if (key_file) {
		c.trusted = key_load(key_file, true, NULL, 0);
		if (!c.trusted) {
			snprintf(v->reason, sizeof(v->reason),
				 "%s: not an Ed25519 key in PEM (public or private)", key_file);
			return -EINVAL;
		}
		snprintf(v->key_source, sizeof(v->key_source), "%s", key_file);
	} else {
		snprintf(path, sizeof(path), "%s/../%s", dir, AG_AUDIT_KEY_FILE);
		c.trusted = key_load(path, false, NULL, 0);
		if (c.trusted)
			snprintf(v->key_source, sizeof(v->key_source), "%s", path);
	}
	rc = seg_list(dir, &segs, &n);
	if (rc) {
		snprintf(v->reason, sizeof(v->reason), "%s: %s", dir, strerror(-rc));
		goto out;
	}
	if (n)
		snprintf(newest, sizeof(newest), "%08u.seg", segs[n - 1]);
	free(segs);
	v->segments = n;
	snprintf(path, sizeof(path), "%s/HEAD", dir);
	if (!read_file(path, &hb, &hlen))
		head = agentgate__audit__head__unpack(NULL, hlen, hb);
	if (head)
		c.head_seq = head->seq;
	rc = ag_audit_walk(dir, verify_cb, &c, err, sizeof(err));
	if (rc == -EBADMSG && !v->reason[0]) {
		v->bad_seq = c.expect;
		snprintf(v->reason, sizeof(v->reason), "%s", err);
		{
			const char *sp = strstr(err, "segment ");

			if (sp)
				sscanf(sp + 8, "%63[^: ]", v->bad_segment);
		}
	}
	/*
	 * A frame being written as we read (a live log): an incomplete last frame of the newest
	 * segment, after everything HEAD seals. What is cut there was never sealed, so it cannot
	 * be told from a write in progress; anything HEAD sealed still has to be there.
	 */
	if (rc == -EBADMSG && !strcmp(v->bad_segment, newest) && strstr(err, "torn") && head &&
	    head->seq <= v->last_seq && c.expect == v->last_seq + 1) {
		v->live_tail = true;
		v->bad_seq = 0;
		v->bad_segment[0] = v->reason[0] = '\0';
		rc = 0;
	}
	if (rc) {
		if (!v->reason[0])
			snprintf(v->reason, sizeof(v->reason), "%s", err);
		goto out;
	}
	if (!v->records) {
		rc = -EBADMSG;
		v->bad_seq = 1;
		snprintf(v->reason, sizeof(v->reason), "no audit records in %s", dir);
		goto out;
	}
	if (!head) {
		rc = -EBADMSG;
		v->bad_seq = v->last_seq + 1;
		snprintf(v->reason, sizeof(v->reason), "%s missing or unreadable", path);
		goto out;
	}
	if (head->hash.len != 32 ||
	    !sig_ok_tagged(c.trusted, HEAD_TAG, head->seq, head->hash.data, head->time_ns,
			   head->signature.data, head->signature.len)) {
		rc = -EBADMSG;
		v->bad_seq = head->seq;
		snprintf(v->reason, sizeof(v->reason),
			 "HEAD signature does not verify with key %s (signed by %s)",
			 v->fingerprint, head->key_fingerprint);
		goto out;
	}
	if (head->seq > v->last_seq) {
		rc = -EBADMSG;
		v->bad_seq = v->last_seq + 1;
		snprintf(v->reason, sizeof(v->reason),
			 "records missing at the tail: the log ends at seq %llu, the last "
			 "checkpoint (HEAD) seals seq %llu",
			 (unsigned long long)v->last_seq, (unsigned long long)head->seq);
		goto out;
	}
	if (!c.head_seen || memcmp(c.head_hash, head->hash.data, 32)) {
		rc = -EBADMSG;
		v->bad_seq = head->seq;
		snprintf(v->reason, sizeof(v->reason),
			 "seq %llu differs from what the last checkpoint (HEAD) sealed",
			 (unsigned long long)head->seq);
		goto out;
	}
	v->unsealed = v->last_seq - v->last_checkpoint;
	rc = 0;
out:
	if (head)
		agentgate__audit__head__free_unpacked(head, NULL);
	free(hb);
	EVP_PKEY_free(c.trusted);
	return rc;
}

int ag_audit_write_entries(const char *dir, const struct ag_audit_entry *e, size_t n,
			   uint64_t segment_size)
{
	unsigned *segs, no = 0;
	size_t nseg, i = 0;
	struct ag_buf raw = { 0 };
	int rc = seg_list(dir, &segs, &nseg), fd = -1;
	uint64_t size = 0;

	if (rc)
		return rc;
	for (size_t k = 0; k < nseg; k++) {
		char path[PATH_MAX + 32];

		snprintf(path, sizeof(path), "%s/%08u.seg", dir, segs[k]);
		unlink(path);
	}
	free(segs);
	while (i < n && !rc) {
		uint64_t first = e[i].seq;
		uLongf clen;
		uint8_t *f;

		for (size_t k = 0; k < 8 && i < n; k++, i++)
			entry_append(&raw, e[i].seq, e[i].hash, e[i].rec, e[i].len);
		if (fd < 0 || size >= segment_size) {
			char path[PATH_MAX + 32];
			uint8_t hdr[SEG_HDR];

			if (fd >= 0)
				close(fd);
			snprintf(path, sizeof(path), "%s/%08u.seg", dir, ++no);
			fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
			if (fd < 0) {
				rc = -errno;
				break;
			}
			memcpy(hdr, SEG_MAGIC, 8);
			put64(hdr + 8, first);
			if (write(fd, hdr, SEG_HDR) != SEG_HDR)
				rc = -EIO;
			size = SEG_HDR;
		}
		clen = compressBound(ag_buf_len(&raw));
		f = malloc(FRAME_HDR + clen);
		if (!f || compress2(f + FRAME_HDR, &clen, ag_buf_head(&raw), ag_buf_len(&raw), 6)) {
			free(f);
			rc = -ENOMEM;
			break;
		}
		memcpy(f, FRAME_MAGIC, 4);
		put32(f + 4, clen);
		put32(f + 8, ag_buf_len(&raw));
		put32(f + 12, crc32(0, f + FRAME_HDR, clen));
		if (write(fd, f, FRAME_HDR + clen) != (ssize_t)(FRAME_HDR + clen))
			rc = -EIO;
		size += FRAME_HDR + clen;
		free(f);
		ag_buf_consume(&raw, ag_buf_len(&raw));
	}
	if (fd >= 0)
		close(fd);
	ag_buf_free(&raw);
	return rc;
}
