// SPDX-License-Identifier: GPL-2.0
/*
 * Workers and the relay. Each worker thread runs its own epoll loop with its own pair of
 * SO_REUSEPORT listeners (127.0.0.1 and ::1 on the gateway port), so accepts spread over the
 * cores with no shared lock on the data path. A session's bytes go agent → handler → upstream
 * and back; reads stop while the destination's queue is over the high watermark (backpressure),
 * FINs are passed on once queued bytes are out (half-close), and an upstream refusal or reset
 * becomes an RST to the agent.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "clock.h"
#include "approval.h"
#include "audit.h"
#include "bpf_loader.h"
#include "cgroup.h"
#include "cred.h"
#include "daemon.h"
#include "krelay.h"
#include "log.h"
#include "session.h"
#include "tls.h"

#define AG_READ_CHUNK (64 * 1024)
#define AG_HIGH_WM (256 * 1024)
/*
 * Pipes a worker keeps for its raw relays. A side holds a pipe only while spliced bytes wait
 * in it: an idle session holds none (four fds and a pipe ring less each; 10,000 idle sessions
 * must fit in 20,000 open files), and a worker needs about as many pipes as it has sessions
 * with a full peer.
 */
#define AG_PIPE_POOL 32
#define AG_CONNECT_TIMEOUT_MS 10000
/* A peer that starts a handshake and stalls holds the session no longer than this. */
#define AG_TLS_HANDSHAKE_TIMEOUT_MS 10000

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

struct ag_worker {
	struct ag_daemon *d;
	int idx;
	pthread_t thread;
	struct ag_loop *loop;
	struct ag_io lis[2];
	uint8_t *scratch;
	struct ag_session *mine; /* this worker's sessions (for the tick), via wnext */
	/* Empty pipes of raw relays, for the next side that has bytes to splice (pipe_get()). */
	int pipes[AG_PIPE_POOL][2];
	int npipes;
};

const char *ag_session_state_name(int state)
{
	static const char *const names[] = { "connecting", "active", "closing", "closed",
					     "denied" };

	return state >= 0 && state <= AG_SESS_DENIED ? names[state] : "unknown";
}

static void format_endpoint(const uint8_t addr[16], uint16_t port, int family, char *out,
			    size_t len)
{
	char ip[INET6_ADDRSTRLEN];

	if (family == AF_INET) {
		inet_ntop(AF_INET, addr + 12, ip, sizeof(ip));
		snprintf(out, len, "%s:%u", ip, port);
	} else {
		inet_ntop(AF_INET6, addr, ip, sizeof(ip));
		snprintf(out, len, "[%s]:%u", ip, port);
	}
}

/* --- the daemon's session table ------------------------------------------------------------ */

/* Listed by agctl from here on: the identity fields must be filled before. */
static void table_add(struct ag_daemon *d, struct ag_session *s)
{
	if (s->in_table)
		return;
	pthread_mutex_lock(&d->sess_lock);
	s->in_table = true;
	s->next = d->sessions;
	if (d->sessions)
		d->sessions->prev = s;
	d->sessions = s;
	d->nsessions++;
	d->sessions_total++;
	pthread_mutex_unlock(&d->sess_lock);
}

static void table_del(struct ag_daemon *d, struct ag_session *s)
{
	if (!s->in_table)
		return;
	pthread_mutex_lock(&d->sess_lock);
	s->in_table = false;
	if (s->prev)
		s->prev->next = s->next;
	else if (d->sessions == s)
		d->sessions = s->next;
	if (s->next)
		s->next->prev = s->prev;
	s->next = s->prev = NULL;
	d->nsessions--;
	pthread_mutex_unlock(&d->sess_lock);
}

/*
 * The first session of the table that match() takes, called under the table's lock (so it may
 * copy fields out), or NULL. The session stays valid only on its own worker's thread.
 */
static struct ag_session *table_find(struct ag_daemon *d,
				     bool (*match)(const struct ag_session *s, void *arg),
				     void *arg)
{
	struct ag_session *s;

	pthread_mutex_lock(&d->sess_lock);
	for (s = d->sessions; s && !match(s, arg); s = s->next)
		;
	pthread_mutex_unlock(&d->sess_lock);
	return s;
}

/* --- relay ----------------------------------------------------------------------------------- */

static void side_update_events(struct ag_session *s, enum ag_side i);
static void session_end(struct ag_session *s, bool reset);
static void settle(struct ag_session *s);
static void pump_input(struct ag_session *s, enum ag_side from, const uint8_t *data, size_t len);

static inline enum ag_side other(enum ag_side i)
{
	return i == AG_SIDE_AGENT ? AG_SIDE_UPSTREAM : AG_SIDE_AGENT;
}

static bool side_open(const struct ag_side_conn *c)
{
	return c->io.fd >= 0;
}

static bool upstream_ready(const struct ag_session *s)
{
	return s->state == AG_SESS_ACTIVE || s->state == AG_SESS_CLOSING;
}

/* Bytes waiting to be written to side i (its buffer, and the pipe of a raw relay). */
static size_t queued(const struct ag_side_conn *c)
{
	return ag_buf_len(&c->out) + c->piped;
}

/* An empty pipe for a raw relay's side: the worker's, or a new one. false: none to be had. */
static bool pipe_get(struct ag_worker *w, int p[2])
{
	if (p[0] >= 0)
		return true;
	if (w->npipes) {
		w->npipes--;
		p[0] = w->pipes[w->npipes][0];
		p[1] = w->pipes[w->npipes][1];
		return true;
	}
	if (pipe2(p, O_NONBLOCK | O_CLOEXEC)) {
		p[0] = p[1] = -1;
		return false;
	}
	/* Fewer wakeups per megabyte; the kernel's default is 64 KiB. */
	fcntl(p[1], F_SETPIPE_SZ, AG_HIGH_WM);
	return true;
}

/* A side's pipe, empty, back to its worker (closed when the worker has enough). */
static void pipe_put(struct ag_worker *w, int p[2])
{
	if (p[0] < 0)
		return;
	if (w->npipes < AG_PIPE_POOL) {
		w->pipes[w->npipes][0] = p[0];
		w->pipes[w->npipes][1] = p[1];
		w->npipes++;
	} else {
		close(p[0]);
		close(p[1]);
	}
	p[0] = p[1] = -1;
}

/* Moves what the pipe holds for side i into its socket; -errno on a write error. */
static int drain_pipe(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];

	while (c->piped) {
		ssize_t n = splice(c->pipe[0], NULL, c->io.fd, NULL, c->piped,
				   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? 0 : -errno;
		}
		c->piped -= n;
		if (i == AG_SIDE_UPSTREAM)
			s->bytes_up += n;
		else
			s->bytes_down += n;
	}
	pipe_put(s->w, c->pipe);
	return 0;
}

static const char *side_name(enum ag_side i)
{
	return i == AG_SIDE_AGENT ? "agent" : "upstream";
}

/*
 * The thread's OpenSSL error queue emptied before a TLS read or write (SSL_get_error() needs
 * it so): looked at first, as it is almost always empty already and ERR_clear_error() wipes
 * all of its slots every time (about 1% of the daemon's CPU on small HTTPS requests).
 */
static inline void tls_err_clear(void)
{
	if (ERR_peek_error())
		ERR_clear_error();
}

/* Bytes through side i's TLS: how much it took before it would block, or -errno. */
static ssize_t tls_send(struct ag_side_conn *c, const uint8_t *data, size_t len, int *err)
{
	size_t off = 0;

	while (off < len) {
		size_t n = 0;
		int e;

		tls_err_clear();
		if (SSL_write_ex(c->ssl, data + off, len - off, &n)) {
			off += n;
			continue;
		}
		e = SSL_get_error(c->ssl, 0);
		if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
			break;
		*err = e == SSL_ERROR_SYSCALL && errno ? -errno : -EPIPE;
		ERR_clear_error();
		break;
	}
	return off;
}

/* Sends what side i takes of data now, counted: how much, or -errno on a write error. */
static ssize_t send_now(struct ag_session *s, enum ag_side i, const uint8_t *data, size_t len)
{
	size_t off = 0;
	int err = 0;

	if (s->side[i].tls == AG_TLS_UP)
		off = tls_send(&s->side[i], data, len, &err);
	while (s->side[i].tls != AG_TLS_UP && off < len) {
		ssize_t n = send(s->side[i].io.fd, data + off, len - off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				err = -errno;
			break;
		}
		off += n;
	}
	if (i == AG_SIDE_UPSTREAM)
		s->bytes_up += off;
	else
		s->bytes_down += off;
	if (s->krelay && off)
		ag_krelay_give(s, other(i));
	if (err)
		errno = -err;
	return err ? err : (ssize_t)off;
}

/* Writes go through now: the side is clear, or its TLS is up. */
static bool tls_passes(const struct ag_side_conn *c)
{
	return c->tls == AG_TLS_NONE || c->tls == AG_TLS_UP;
}

/* Shuts side i's write half: a close_notify first when it speaks TLS. */
static void shut_wr(struct ag_side_conn *c)
{
	if (c->tls == AG_TLS_UP) {
		ERR_clear_error();
		SSL_shutdown(c->ssl);
		ERR_clear_error();
	}
	shutdown(c->io.fd, SHUT_WR);
	c->wr_shut = true;
}

/* A held side: its clear bytes out, then the handshake is armed (run from the loop). */
static int tls_flush_clear(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];

	if (c->clear_out) {
		ssize_t n = send_now(s, i, ag_buf_head(&c->out), c->clear_out);

		if (n < 0)
			return n;
		ag_buf_consume(&c->out, n);
		c->clear_out -= n;
	}
	if (!c->clear_out && c->ssl && c->tls == AG_TLS_HOLD) {
		c->tls = AG_TLS_HANDSHAKE;
		c->tls_deadline_ms = ag_mono_ms() + AG_TLS_HANDSHAKE_TIMEOUT_MS;
		/* The client speaks first; a server waits for its hello. */
		c->tls_want = SSL_is_server(c->ssl) ? EPOLLIN : EPOLLOUT;
	}
	return 0;
}

/* Writes what is queued for side i; returns 0, or -errno on a write error. */
static int flush_side(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];
	ssize_t n;

	if (i == AG_SIDE_UPSTREAM && !upstream_ready(s))
		return 0;
	if (!tls_passes(c))
		return tls_flush_clear(s, i);
	if (i == AG_SIDE_AGENT && ag_audit_hold(s))
		return 0; /* audit fsync: always: answers wait for their records (release_held) */
	if (ag_buf_len(&c->out)) {
		n = send_now(s, i, ag_buf_head(&c->out), ag_buf_len(&c->out));
		if (n < 0)
			return n;
		ag_buf_consume(&c->out, n);
	}
	/* The buffer holds older bytes than the pipe: it goes first. */
	if (!ag_buf_len(&c->out) && c->piped) {
		n = drain_pipe(s, i);
		if (n < 0) {
			errno = -n;
			return n;
		}
	}
	if (!queued(c) && c->shut_pending && !c->wr_shut)
		shut_wr(c);
	return 0;
}

int ag_session_send(struct ag_session *s, enum ag_side to, const void *data, size_t len)
{
	struct ag_side_conn *c = &s->side[to];
	size_t off = 0;

	if (!side_open(c) || c->wr_shut)
		return -EPIPE;
	if (!queued(c) && (to == AG_SIDE_AGENT ? !ag_audit_hold(s) : upstream_ready(s)) &&
	    tls_passes(c)) {
		ssize_t n = send_now(s, to, data, len);

		if (n < 0)
			return n;
		off = n;
	}
	if (off < len && ag_buf_append(&c->out, (const uint8_t *)data + off, len - off))
		return -ENOMEM;
	/*
	 * All of it went out on a clear side that had nothing queued: what either side waits for
	 * is what it was (nothing queued, so no EPOLLOUT; the other side's pause, on this one's
	 * queue, unchanged), so no update (two per message relayed). A kernel relay's give and
	 * TLS may change it: updated.
	 */
	if (off == len && !queued(c) && !s->krelay && !c->tls && !s->side[other(to)].tls &&
	    !(c->io.events & EPOLLOUT))
		return 0;
	side_update_events(s, to);
	side_update_events(s, other(to));
	return 0;
}

void ag_session_shutdown(struct ag_session *s, enum ag_side to)
{
	struct ag_side_conn *c = &s->side[to];

	if (!side_open(c) || c->wr_shut)
		return;
	c->shut_pending = true;
	if (to == AG_SIDE_UPSTREAM && !upstream_ready(s))
		return;
	if (!queued(c) && tls_passes(c))
		shut_wr(c);
}

void ag_session_fail(struct ag_session *s, bool reset, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(s->reason, sizeof(s->reason), fmt, ap);
	va_end(ap);
	session_end(s, reset);
}

static void side_readable(struct ag_session *s, enum ag_side i);

static void tls_kicked(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];

	c->tls_kicked = false;
	if (s->state != AG_SESS_CLOSED && c->tls == AG_TLS_UP && !c->rd_eof && !c->paused)
		side_readable(s, i);
}

static void tls_kicked_agent(void *arg)
{
	tls_kicked(arg, AG_SIDE_AGENT);
}

static void tls_kicked_upstream(void *arg)
{
	tls_kicked(arg, AG_SIDE_UPSTREAM);
}

/*
 * Records OpenSSL read ahead (tls.c) and the handler has not seen: the socket may be empty, so
 * its epoll says nothing; a read of them is queued on the loop instead. Not while tls_readable()
 * runs (it reads on), nor when the last SSL_read wanted more from the socket (a partial record:
 * the socket reports the rest). The session is freed by a later loop call than this one.
 */
static void tls_kick(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];

	if (c->tls_reading || c->tls_starved || c->tls_kicked || !c->ssl ||
	    !SSL_has_pending(c->ssl))
		return;
	if (!ag_loop_call(s->w->loop, i == AG_SIDE_AGENT ? tls_kicked_agent : tls_kicked_upstream,
			  s))
		c->tls_kicked = true;
}

/* EPOLLIN on side i unless it is done or its destination is over the watermark. */
static void side_update_events(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i], *o = &s->side[other(i)];
	uint32_t ev = 0;

	if (!side_open(c) || !c->io.loop)
		return;
	if (i == AG_SIDE_UPSTREAM && s->state == AG_SESS_CONNECTING) {
		ag_loop_mod(&c->io, EPOLLOUT);
		return;
	}
	if (c->tls == AG_TLS_HANDSHAKE) {
		ag_loop_mod(&c->io, c->tls_want);
		return;
	}
	/* A raw relay reads no more while its pipe could not be emptied into the other side. */
	c->paused = ag_buf_len(&o->out) >= AG_HIGH_WM || o->piped ||
		    (ag_buf_len(&c->in) >= AG_HIGH_WM && ag_buf_len(&c->in) >= c->hold);
	if (!c->rd_eof && !c->paused && !ag_krelay_waiting(s, i) &&
	    !(s->krelay_want && s->state == AG_SESS_CONNECTING))
		ev |= EPOLLIN | EPOLLRDHUP;
	/*
	 * A TLS-held side writes only its clear bytes; an SSL_read may wait to write (tls_want).
	 * Answers held for their audit records (fsync: always) wait for release_held().
	 */
	if (tls_passes(c) ? queued(c) && !(i == AG_SIDE_AGENT && ag_audit_held(s))
			  : c->clear_out > 0)
		ev |= EPOLLOUT;
	ag_loop_mod(&c->io, ev | c->tls_want);
	if ((ev & EPOLLIN) && c->tls == AG_TLS_UP)
		tls_kick(s, i);
}

static bool session_done(const struct ag_session *s)
{
	const struct ag_side_conn *a = &s->side[AG_SIDE_AGENT], *u = &s->side[AG_SIDE_UPSTREAM];

	return a->rd_eof && u->rd_eof && !queued(a) && !queued(u);
}

/*
 * Clear bytes left over on a side the handler just switched to TLS were sent after the request
 * to encrypt and before the handshake (CVE-2021-23214 for PostgreSQL): never taken as data.
 */
static bool tls_leftover(struct ag_session *s, enum ag_side from)
{
	struct ag_side_conn *c = &s->side[from];

	if (c->tls != AG_TLS_HANDSHAKE && !(c->tls == AG_TLS_HOLD && c->ssl))
		return false;
	if (!ag_buf_len(&c->in))
		return false;
	ag_session_fail(s, true, "%s: %zu clear bytes sent after the TLS request", side_name(from),
			ag_buf_len(&c->in));
	return true;
}

static void pump_input(struct ag_session *s, enum ag_side from, const uint8_t *data, size_t len)
{
	struct ag_side_conn *c = &s->side[from];
	long used;

	if (ag_buf_len(&c->in)) {
		if (ag_buf_append(&c->in, data, len)) {
			ag_session_fail(s, true, "out of memory");
			return;
		}
		used = s->proto->input(s, from, ag_buf_head(&c->in), ag_buf_len(&c->in));
		if (used < 0 || s->state == AG_SESS_CLOSED)
			return;
		ag_buf_consume(&c->in, used);
		tls_leftover(s, from);
		return;
	}
	used = s->proto->input(s, from, data, len);
	if (used < 0 || s->state == AG_SESS_CLOSED)
		return;
	if ((size_t)used < len && ag_buf_append(&c->in, data + used, len - used))
		ag_session_fail(s, true, "out of memory");
	else
		tls_leftover(s, from);
}

struct ag_loop *ag_session_loop(const struct ag_session *s)
{
	return s->w->loop;
}

void ag_session_resume(struct ag_session *s, enum ag_side from)
{
	struct ag_side_conn *c = &s->side[from];

	if (s->state == AG_SESS_CLOSED)
		return;
	if (ag_buf_len(&c->in)) {
		long used = s->proto->input(s, from, ag_buf_head(&c->in), ag_buf_len(&c->in));

		if (used < 0 || s->state == AG_SESS_CLOSED)
			return;
		ag_buf_consume(&c->in, used);
	}
	settle(s);
}

static void on_side_eof(struct ag_session *s, enum ag_side from)
{
	s->side[from].rd_eof = true;
	if (s->proto->eof)
		s->proto->eof(s, from);
	else
		ag_session_shutdown(s, other(from));
}

static void read_failed(struct ag_session *s, enum ag_side i)
{
	ag_session_fail(s, true, "%s: %s", side_name(i),
			errno == ECONNRESET ? "connection reset" : strerror(errno));
}

/* After reading: end a session both sides have finished, else re-arm both sides' events. */
static void settle(struct ag_session *s)
{
	if (s->state == AG_SESS_CLOSED)
		return;
	if (session_done(s)) {
		session_end(s, false);
		return;
	}
	side_update_events(s, AG_SIDE_AGENT);
	side_update_events(s, AG_SIDE_UPSTREAM);
}

/*
 * Can side i's bytes go socket → pipe → socket? A raw handler, the upstream up, nothing
 * half-consumed, and not on the sk_msg fast path (splice reads the TCP receive queue only, not
 * the sk_msg ingress queue where redirected bytes land).
 */
static bool can_splice(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *o = &s->side[other(i)];

	if (!s->proto->raw || s->fastpath || s->krelay || !upstream_ready(s) || ag_buf_len(&s->side[i].in) ||
	    ag_buf_len(&o->out) || s->tls_detect || s->side[i].tls || o->tls)
		return false;
	return pipe_get(s->w, o->pipe);
}

/* Raw relay of what side i sent: splice it through the other side's pipe. */
static void side_splice(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];
	enum ag_side o = other(i);
	int budget = 16, rc;

	while (budget-- > 0 && !c->rd_eof) {
		ssize_t n;

		/* The last drain gave the pipe back when it emptied it. */
		if (!pipe_get(s->w, s->side[o].pipe)) {
			ag_session_fail(s, true, "relay pipe: %s", strerror(errno));
			return;
		}
		n = splice(c->io.fd, NULL, s->side[o].pipe[1], NULL, AG_HIGH_WM,
			   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			read_failed(s, i);
			return;
		}
		if (n == 0) {
			on_side_eof(s, i);
			break;
		}
		s->side[o].piped += n;
		rc = drain_pipe(s, o);
		if (rc) {
			ag_session_fail(s, true, "%s: %s", o == AG_SIDE_AGENT ? "agent" : "upstream",
					strerror(-rc));
			return;
		}
		if (s->side[o].piped)
			break; /* the other side is full: wait for EPOLLOUT there */
		/*
		 * A short splice emptied the socket (as a short read does in side_readable()):
		 * no third splice just to hear EAGAIN. Under AG_READ_CHUNK, so that bulk, whose
		 * splices the pipe's slots may cut short, still loops.
		 */
		if (n < AG_READ_CHUNK)
			break;
	}
	if (!s->side[o].piped)
		pipe_put(s->w, s->side[o].pipe);
	settle(s);
}

/* --- TLS ------------------------------------------------------------------------------------ */

static void orig_ip(const struct ag_session *s, char *out, size_t len)
{
	const struct ag_endpoint *e = &s->info.orig_dst;

	if (e->family == AF_INET)
		inet_ntop(AF_INET, e->addr + 12, out, len);
	else
		inet_ntop(AF_INET6, e->addr, out, len);
}

int ag_session_tls_hold(struct ag_session *s, enum ag_side side)
{
	struct ag_side_conn *c = &s->side[side];

	if (c->tls != AG_TLS_NONE)
		return 0;
	if (c->piped)
		return -EBUSY; /* a raw relay: no TLS mid-stream */
	c->tls = AG_TLS_HOLD;
	c->clear_out = ag_buf_len(&c->out);
	return 0;
}

int ag_session_start_tls(struct ag_session *s, enum ag_side side)
{
	struct ag_side_conn *c = &s->side[side];
	char err[160], ip[INET6_ADDRSTRLEN];
	SSL *ssl;

	if (c->ssl)
		return 0;
	if (!side_open(c)) {
		ag_session_fail(s, true, "%s TLS: the connection is gone", side_name(side));
		return -EPIPE;
	}
	if (side == AG_SIDE_AGENT) {
		orig_ip(s, ip, sizeof(ip));
		ssl = ag_tls_server_new(ip, err, sizeof(err));
	} else if (!s->target) {
		snprintf(err, sizeof(err), "no target");
		ssl = NULL;
	} else {
		ssl = ag_tls_client_new(s->target, s->target->protocol == AG_PROTO_HTTP, err,
					sizeof(err));
	}
	if (!ssl || ag_session_tls_hold(s, side) || !SSL_set_fd(ssl, c->io.fd)) {
		SSL_free(ssl);
		ag_session_fail(s, true, "%s TLS: %s", side_name(side), ssl ? "setup failed" : err);
		return -EPROTO;
	}
	c->ssl = ssl;
	if (side == AG_SIDE_AGENT)
		SSL_set_accept_state(ssl);
	else
		SSL_set_connect_state(ssl);
	if (side == AG_SIDE_AGENT || upstream_ready(s))
		tls_flush_clear(s, side);
	side_update_events(s, side);
	return 0;
}

bool ag_session_tls_up(const struct ag_session *s, enum ag_side side)
{
	return s->side[side].tls == AG_TLS_UP;
}

static void tls_failed(struct ag_session *s, enum ag_side i, const char *why)
{
	char reason[sizeof(s->reason)];

	/* Logged once, with the session's end (or by the handler that tells the agent). */
	snprintf(reason, sizeof(reason), "%s TLS: %s", side_name(i), why);
	if (s->proto->tls_done)
		s->proto->tls_done(s, i, why);
	if (s->state != AG_SESS_CLOSED)
		ag_session_fail(s, true, "%s", reason);
}

/* One step of side i's handshake, from the loop. */
static void tls_handshake(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];
	char why[160];
	int rc, e;

	ERR_clear_error();
	rc = SSL_do_handshake(c->ssl);
	if (rc == 1) {
		c->tls = AG_TLS_UP;
		c->tls_want = 0;
		pr_debug("session %llu: %s TLS up: %s %s", (unsigned long long)s->id, side_name(i),
			 SSL_get_version(c->ssl), SSL_get_cipher_name(c->ssl));
		if (s->proto->tls_done) {
			s->proto->tls_done(s, i, NULL);
			if (s->state == AG_SESS_CLOSED)
				return;
		}
		if (flush_side(s, i)) {
			ag_session_fail(s, true, "%s: %s", side_name(i), strerror(errno));
			return;
		}
		settle(s);
		return;
	}
	e = SSL_get_error(c->ssl, rc);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		c->tls_want = e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
		side_update_events(s, i);
		return;
	}
	if (e == SSL_ERROR_SYSCALL && errno && !ERR_peek_error()) {
		snprintf(why, sizeof(why), "handshake: %s",
			 errno == ECONNRESET ? "connection reset" : strerror(errno));
		ERR_clear_error();
	} else {
		ag_tls_failure(c->ssl, why, sizeof(why));
	}
	tls_failed(s, i, why);
}

/* Plaintext from side i's TLS, into the handler. */
static void tls_readable(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];
	int budget = 16;

	c->tls_want = 0;
	c->tls_reading = true;
	while (budget-- > 0 && !c->rd_eof && !c->paused && s->state != AG_SESS_CLOSED) {
		size_t n = 0;
		int e;

		tls_err_clear();
		c->tls_starved = false;
		if (!SSL_read_ex(c->ssl, s->w->scratch, AG_READ_CHUNK, &n)) {
			e = SSL_get_error(c->ssl, 0);
			if (e == SSL_ERROR_WANT_READ) {
				c->tls_starved = true;
				break;
			}
			if (e == SSL_ERROR_WANT_WRITE) {
				c->tls_want = EPOLLOUT;
				break;
			}
			if (e == SSL_ERROR_ZERO_RETURN) {
				on_side_eof(s, i);
				break;
			}
			if (e == SSL_ERROR_SYSCALL && !ERR_peek_error()) {
				if (!errno)
					errno = ECONNRESET;
				read_failed(s, i);
				return;
			}
			{
				char why[160];

				ag_tls_failure(c->ssl, why, sizeof(why));
				ag_session_fail(s, true, "%s TLS: %s", side_name(i), why);
			}
			return;
		}
		pump_input(s, i, s->w->scratch, n);
		if (s->state == AG_SESS_CLOSED)
			return;
		side_update_events(s, i);
		/*
		 * Nothing decrypted or read ahead is left in OpenSSL: what else there is waits in
		 * the socket, and the level-triggered epoll reports it. No read just for EAGAIN.
		 */
		if (!SSL_has_pending(c->ssl))
			break;
	}
	c->tls_reading = false;
	settle(s);
}

/*
 * HTTPS from the first bytes: a TLS record of type handshake (0x16) starts the server side,
 * and the upstream's when the target verifies it; anything else stays clear both ways.
 */
static bool tls_detect(struct ag_session *s)
{
	uint8_t b;
	ssize_t n = recv(s->side[AG_SIDE_AGENT].io.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return true;
	s->tls_detect = false;
	if (n != 1 || b != 0x16)
		return false;
	if (ag_session_start_tls(s, AG_SIDE_AGENT))
		return true;
	if (ag_tls_upstream_mode(s->target) != AG_TLS_UP_NONE &&
	    ag_session_start_tls(s, AG_SIDE_UPSTREAM))
		return true;
	settle(s);
	return true;
}

static void side_readable(struct ag_session *s, enum ag_side i)
{
	struct ag_side_conn *c = &s->side[i];
	int budget = 16; /* one session cannot hog the loop */

	if (i == AG_SIDE_AGENT && s->tls_detect && tls_detect(s))
		return;
	if (c->tls == AG_TLS_UP) {
		tls_readable(s, i);
		return;
	}
	if (s->krelay && !ag_krelay_take(s, i, false)) {
		side_update_events(s, i); /* no EPOLLIN until the timer says */
		return;
	}
	if (can_splice(s, i)) {
		side_splice(s, i);
		return;
	}
	while (budget-- > 0 && !c->rd_eof && s->state != AG_SESS_CLOSED) {
		ssize_t n = recv(c->io.fd, s->w->scratch, AG_READ_CHUNK, MSG_DONTWAIT);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			read_failed(s, i);
			return;
		}
		if (n == 0) {
			/* Kernel relay: the FIN goes on after the bytes redirected before it. */
			if (s->krelay && !ag_krelay_take(s, i, true)) {
				side_update_events(s, i);
				return;
			}
			on_side_eof(s, i);
			break;
		}
		pump_input(s, i, s->w->scratch, n);
		if (s->state == AG_SESS_CLOSED)
			return;
		/*
		 * A short read emptied the socket: no recv() just to hear EAGAIN (a third of
		 * the syscalls of a request/response round trip). The epoll is level-triggered:
		 * whatever arrives from now on, a FIN included, is reported again. (settle()
		 * updates both sides' events.)
		 */
		if (n < AG_READ_CHUNK)
			break;
		side_update_events(s, i);
		if (c->paused)
			break;
	}
	settle(s);
}

static void krelay_resume(struct ag_session *s, enum ag_side i)
{
	if (s->state != AG_SESS_CLOSED)
		side_readable(s, i);
}

/* Nothing was read from either socket yet (krelay_want): both go in the kernel relay. */
static void krelay_engage(struct ag_session *s)
{
	int rc, err = 0;

	s->krelay_want = false;
	if (ag_buf_len(&s->side[AG_SIDE_AGENT].in) || queued(&s->side[AG_SIDE_AGENT]) ||
	    queued(&s->side[AG_SIDE_UPSTREAM]) || s->side[AG_SIDE_AGENT].rd_eof)
		return;
	rc = ag_krelay_engage(s, s->w->d->bpf, krelay_resume, &err);
	if (!rc && err)
		ag_session_fail(s, true, "%s", err == ECONNRESET ? "connection reset" : strerror(err));
	else if (rc)
		pr_debug("session %llu: kernel relay unavailable: %s", (unsigned long long)s->id,
			 strerror(-rc));
}

static void upstream_connected(struct ag_session *s)
{
	struct ag_side_conn *u = &s->side[AG_SIDE_UPSTREAM];
	int soerr = 0;
	socklen_t sl = sizeof(soerr);

	if (getsockopt(u->io.fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) || soerr) {
		ag_session_fail(s, true, "upstream %s: %s", s->upstream,
				strerror(soerr ? soerr : errno));
		return;
	}
	s->state = AG_SESS_ACTIVE;
	ag_slog_session(s->w->d, "start", s);
	ag_audit_session_start(s);
	pr_debug("session %llu: upstream %s connected", (unsigned long long)s->id, s->upstream);
	/* Bytes the agent sent while we connected, and a FIN it may already have sent. */
	if (ag_buf_len(&s->side[AG_SIDE_AGENT].in)) {
		struct ag_side_conn *a = &s->side[AG_SIDE_AGENT];
		long used = s->proto->input(s, AG_SIDE_AGENT, ag_buf_head(&a->in), ag_buf_len(&a->in));

		if (used < 0 || s->state == AG_SESS_CLOSED)
			return;
		ag_buf_consume(&a->in, used);
	}
	if (flush_side(s, AG_SIDE_UPSTREAM)) {
		ag_session_fail(s, true, "upstream %s: %s", s->upstream, strerror(errno));
		return;
	}
	if (s->krelay_want) {
		krelay_engage(s);
		if (s->state == AG_SESS_CLOSED)
			return;
	}
	side_update_events(s, AG_SIDE_AGENT);
	side_update_events(s, AG_SIDE_UPSTREAM);
}

static int sock_error(int fd)
{
	int e = 0;
	socklen_t len = sizeof(e);

	getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len);
	return e;
}

static void on_io(struct ag_session *s, enum ag_side i, uint32_t events)
{
	struct ag_side_conn *c = &s->side[i];

	/* Ended by an earlier event of this batch: its sockets are closed, its memory not yet. */
	if (s->state == AG_SESS_CLOSED)
		return;
	s->io_seen = true;
	s->tls_slim = false;
	if (i == AG_SIDE_UPSTREAM && s->state == AG_SESS_CONNECTING) {
		if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
			upstream_connected(s);
		return;
	}
	if (c->tls == AG_TLS_HANDSHAKE) {
		tls_handshake(s, i);
		return;
	}
	/* An SSL_read that had to write first (a TLS 1.3 key update, say). */
	if (c->tls == AG_TLS_UP && c->tls_want && (events & EPOLLOUT)) {
		side_readable(s, i);
		if (s->state == AG_SESS_CLOSED)
			return;
	}
	if (events & EPOLLOUT) {
		if (flush_side(s, i)) {
			ag_session_fail(s, true, "%s: %s", i == AG_SIDE_AGENT ? "agent" : "upstream",
					strerror(errno));
			return;
		}
		if (session_done(s)) {
			session_end(s, false);
			return;
		}
		side_update_events(s, i);
		side_update_events(s, other(i));
	}
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
		/* (A kernel relay waiting for its bytes to land reads when its timer says.) */
		if (!c->rd_eof && !c->paused && !ag_krelay_waiting(s, i))
			side_readable(s, i);
		else if (events & EPOLLERR)
			ag_session_fail(s, true, "%s: socket error (%s)", side_name(i),
					strerror(sock_error(c->io.fd)));
		else if (events & EPOLLHUP)
			/* Shut both ways, not to be read now (paused, waiting, at EOF): aside. */
			ag_loop_park(&c->io);
	}
}

static void on_agent_io(struct ag_io *io, uint32_t events)
{
	struct ag_session *s = (void *)((char *)io - offsetof(struct ag_session, side[0].io));

	on_io(s, AG_SIDE_AGENT, events);
}

static void on_upstream_io(struct ag_io *io, uint32_t events)
{
	struct ag_session *s = (void *)((char *)io - offsetof(struct ag_session, side[1].io));

	on_io(s, AG_SIDE_UPSTREAM, events);
}

static void session_free(void *arg)
{
	struct ag_session *s = arg;

	for (int i = 0; i < 2; i++) {
		ag_buf_free(&s->side[i].in);
		ag_buf_free(&s->side[i].out);
		if (s->side[i].piped) {
			close(s->side[i].pipe[0]);
			close(s->side[i].pipe[1]);
		} else {
			pipe_put(s->w, s->side[i].pipe);
		}
	}
	ag_krelay_free(s);
	ag_policy_put(s->pol);
	free(s);
}

static void close_side(struct ag_session *s, enum ag_side i, bool reset)
{
	struct ag_side_conn *c = &s->side[i];

	if (!side_open(c))
		return;
	ag_loop_del(&c->io);
	if (c->ssl) {
		/* close_notify, best effort (the socket is non-blocking) */
		if (!reset && c->tls == AG_TLS_UP && !c->wr_shut) {
			ERR_clear_error();
			SSL_shutdown(c->ssl);
		}
		ERR_clear_error();
		SSL_free(c->ssl);
		c->ssl = NULL;
		c->tls = AG_TLS_NONE;
	}
	if (reset) {
		struct linger lg = { .l_onoff = 1, .l_linger = 0 };

		setsockopt(c->io.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	close(c->io.fd);
	c->io.fd = -1;
}

static void session_end(struct ag_session *s, bool reset)
{
	bool was_denied = s->state == AG_SESS_DENIED;
	bool started = s->state != AG_SESS_CONNECTING && !was_denied;

	if (s->state == AG_SESS_CLOSED)
		return;
	if (!started && !was_denied && !s->reason[0])
		snprintf(s->reason, sizeof(s->reason), "closed before the upstream connected");
	/* Best effort: whatever is still queued for the agent (an error message, say). */
	ag_audit_release(s);
	if (!reset)
		flush_side(s, AG_SIDE_AGENT);
	if (s->proto && s->proto->fini)
		s->proto->fini(s);
	ag_approval_session_end(s->id);
	ag_cred_session_end(s);
	ag_krelay_end(s);
	close_side(s, AG_SIDE_AGENT, reset);
	close_side(s, AG_SIDE_UPSTREAM, reset);
	s->ended_ns = ag_unix_ns();
	if (!started && !was_denied)
		ag_slog_session(s->w->d, "start", s);
	if (!was_denied)
		s->state = AG_SESS_CLOSED;
	ag_slog_session(s->w->d, was_denied ? "deny" : "end", s);
	ag_audit_session_end(s);
	s->state = AG_SESS_CLOSED;
	if (s->reason[0])
		pr_info("session %llu (%s pid %u %s → %s): %s", (unsigned long long)s->id, s->agent,
			s->info.tgid, s->info.comm, s->orig_dst, s->reason);
	table_del(s->w->d, s);
	/* Freed after this loop iteration: other events for it may still be in the batch. */
	ag_loop_call(s->w->loop, session_free, s);
}

/* --- accept ---------------------------------------------------------------------------------- */

static void to_mapped(const struct sockaddr_storage *ss, uint8_t addr[16], uint16_t *port)
{
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *in = (const void *)ss;

		memset(addr, 0, 10);
		addr[10] = addr[11] = 0xff;
		memcpy(addr + 12, &in->sin_addr, 4);
		*port = ntohs(in->sin_port);
	} else {
		const struct sockaddr_in6 *in6 = (const void *)ss;

		memcpy(addr, &in6->sin6_addr, 16);
		*port = ntohs(in6->sin6_port);
	}
}

/*
 * The kernel connects 0.0.0.0 and :: to the local host; so do we, under that name, so that a
 * target on 127.0.0.1 or ::1 is not reached past its rules (default: passthrough) by another.
 */
static void unspecified_to_loopback(struct ag_endpoint *e)
{
	static const uint8_t zero[16];

	if (e->family == AF_INET && !memcmp(e->addr + 12, zero, 4)) {
		e->addr[12] = 127;
		e->addr[15] = 1;
	} else if (e->family == AF_INET6 && !memcmp(e->addr, zero, 16)) {
		e->addr[15] = 1;
	}
}

static int upstream_connect(struct ag_session *s)
{
	struct ag_daemon *d = s->w->d;
	struct ag_endpoint *dst = &s->info.orig_dst;
	struct sockaddr_storage ss = {};
	socklen_t sl;
	int fd, one = 1;
	bool v4 = dst->family == AF_INET;

	if (v4) {
		struct sockaddr_in *in = (void *)&ss;

		in->sin_family = AF_INET;
		memcpy(&in->sin_addr, dst->addr + 12, 4);
		in->sin_port = htons(dst->port);
		sl = sizeof(*in);
	} else {
		struct sockaddr_in6 *in6 = (void *)&ss;

		in6->sin6_family = AF_INET6;
		memcpy(&in6->sin6_addr, dst->addr, 16);
		in6->sin6_port = htons(dst->port);
		sl = sizeof(*in6);
	}
	fd = socket(v4 ? AF_INET : AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* The mark tells our connect hooks this is the gateway itself, never to be redirected. */
	if (setsockopt(fd, SOL_SOCKET, SO_MARK, &d->opts.mark, sizeof(d->opts.mark))) {
		int err = -errno;

		close(fd);
		return err;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&ss, sl) && errno != EINPROGRESS) {
		int err = -errno;

		close(fd);
		return err;
	}
	format_endpoint(dst->addr, dst->port, dst->family, s->upstream, sizeof(s->upstream));
	s->connect_deadline_ms = ag_mono_ms() + AG_CONNECT_TIMEOUT_MS;
	if (ag_loop_add(s->w->loop, &s->side[AG_SIDE_UPSTREAM].io, fd, EPOLLOUT, on_upstream_io)) {
		int err = -errno;

		close(fd);
		/* ag_loop_add() stored it: the session's end must not close it a second time. */
		s->side[AG_SIDE_UPSTREAM].io.fd = -1;
		return err;
	}
	return 0;
}

static void fastpath_join(struct ag_session *s, int fd, const struct sockaddr_storage *local,
			  const struct sockaddr_storage *peer)
{
	struct ag_sock_key k = {};
	int rc;

	to_mapped(local, k.local, &k.lport);
	to_mapped(peer, k.remote, &k.rport);
	rc = ag_bpf_sockhash_add(s->w->d->bpf, fd, &k);
	if (rc)
		pr_debug("session %llu: fast path unavailable: %s", (unsigned long long)s->id,
			 rc == -ENOENT ? "the agent's socket is blocking" : strerror(-rc));
	else
		s->fastpath = true;
}

/* Decides what to do with a new session; false: deny (reason set). */
static bool session_decide(struct ag_session *s)
{
	struct ag_daemon *d = s->w->d;
	const struct ag_policy *p = s->pol->p;
	const struct ag_policy_agent *agent;
	const struct ag_policy_target *t;

	agent = ag_policy_agent_by_name(p, s->agent);
	s->observe = agent && agent->mode == AG_MODE_OBSERVE;
	t = ag_policy_target_by_addr(p, s->info.orig_dst.addr, s->info.orig_dst.port);
	if (!t) {
		snprintf(s->target_name, sizeof(s->target_name), "-");
		snprintf(s->protocol, sizeof(s->protocol), "tcp");
		if (p->default_action == AG_DEFAULT_PASSTHROUGH) {
			s->proto = &ag_proto_tcp;
			return true;
		}
		snprintf(s->reason, sizeof(s->reason), "%s is not a known target (default: deny)",
			 s->orig_dst);
		goto deny;
	}
	s->target = t;
	snprintf(s->target_name, sizeof(s->target_name), "%s", t->name);
	snprintf(s->protocol, sizeof(s->protocol), "%s", ag_proto_name(t->protocol));
	s->proto = ag_proto_lookup(t->protocol);
	if (!s->proto) {
		/* Never relay a protocol we cannot parse: that would skip its rules. */
		snprintf(s->reason, sizeof(s->reason),
			 "no %s handler in this build: refused (fail closed)", s->protocol);
		s->observe = false;
		goto deny;
	}
	(void)d;
	return true;
deny:
	if (s->observe) {
		pr_info("session %llu: observe mode, would deny: %s", (unsigned long long)s->id,
			s->reason);
		s->reason[0] = '\0';
		s->proto = &ag_proto_tcp;
		return true;
	}
	return false;
}

/* Accepts one connection; false when there is none left. */
static bool accept_one(struct ag_worker *w, int lfd)
{
	struct ag_daemon *d = w->d;
	struct sockaddr_storage peer = {}, local = {};
	socklen_t pl = sizeof(peer), ll = sizeof(local);
	struct ag_conn_key key = {};
	struct ag_session *s;
	int fd, rc, one = 1;

	fd = accept4(lfd, (struct sockaddr *)&peer, &pl, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		int e = errno;

		if (e != EAGAIN && e != EINTR)
			pr_warn("accept: %s", strerror(e));
		errno = e;
		return e == EINTR;
	}
	getsockname(fd, (struct sockaddr *)&local, &ll);
	s = calloc(1, sizeof(*s));
	if (!s) {
		close(fd);
		return true;
	}
	s->w = w;
	s->side[AG_SIDE_AGENT].io.fd = fd;
	s->side[AG_SIDE_UPSTREAM].io.fd = -1;
	for (int i = 0; i < 2; i++)
		s->side[i].pipe[0] = s->side[i].pipe[1] = -1;
	s->started_ns = ag_unix_ns();
	s->state = AG_SESS_CONNECTING;
	s->pol = ag_policy_get(d);
	s->id = __atomic_add_fetch(&d->next_session_id, 1, __ATOMIC_RELAXED);
	/* At start the links can bring connections before the first policy is in place. */
	if (!s->pol) {
		snprintf(s->agent, sizeof(s->agent), "-");
		snprintf(s->reason, sizeof(s->reason), "no policy loaded yet");
		goto deny;
	}

	key.netns_cookie = d->netns_cookie;
	to_mapped(&peer, key.addr, &key.port);
	rc = ag_bpf_lookup_conn(d->bpf, &key, &s->info);
	if (rc) {
		char ep[64];

		format_endpoint(key.addr, key.port, AF_INET6, ep, sizeof(ep));
		snprintf(s->agent, sizeof(s->agent), "-");
		snprintf(s->reason, sizeof(s->reason),
			 "no kernel identity for %s: not a redirected connection", ep);
		goto deny;
	}
	format_endpoint(s->info.orig_dst.addr, s->info.orig_dst.port, s->info.orig_dst.family,
			s->orig_dst, sizeof(s->orig_dst));
	unspecified_to_loopback(&s->info.orig_dst);
	if (ag_cgroup_path_of_id(d->cg_root, s->info.cgroup_id, s->cgroup, sizeof(s->cgroup)))
		snprintf(s->cgroup, sizeof(s->cgroup), "cgroup:%llu",
			 (unsigned long long)s->info.cgroup_id);
	if (!ag_daemon_agent_of(d, s->info.tag_cgroup_id, s->cgroup, s->agent, sizeof(s->agent))) {
		snprintf(s->agent, sizeof(s->agent), "-");
		snprintf(s->reason, sizeof(s->reason), "cgroup %s belongs to no known agent",
			 s->cgroup);
		goto deny;
	}
	table_add(d, s);
	if (d->draining) {
		snprintf(s->reason, sizeof(s->reason), "agentgated is shutting down");
		goto deny;
	}
	if (!session_decide(s) || ag_audit_refuse_session(s))
		goto deny;
	/* HTTPS is told from the first bytes (tcp and http; postgres asks with SSLRequest). */
	s->tls_detect = s->target && s->target->protocol != AG_PROTO_POSTGRES &&
			ag_tls_client_terminates(s->target) && ag_tls_ready();
	if (d->fastpath)
		fastpath_join(s, fd, &local, &peer);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (s->proto->init && (rc = s->proto->init(s))) {
		if (!s->reason[0])
			snprintf(s->reason, sizeof(s->reason), "handler refused: %s", strerror(-rc));
		goto deny;
	}
	/* Kernel relay: nothing is read from the agent before the upstream is up (krelay.h). */
	s->krelay_want = d->kernel_relay && s->proto->raw && !s->tls_detect && !s->fastpath;
	if (ag_loop_add(w->loop, &s->side[AG_SIDE_AGENT].io, fd,
			s->krelay_want ? 0 : EPOLLIN | EPOLLRDHUP,
			on_agent_io)) {
		snprintf(s->reason, sizeof(s->reason), "epoll: %s", strerror(errno));
		goto deny;
	}
	rc = upstream_connect(s);
	if (rc) {
		ag_session_fail(s, true, "upstream %s: %s", s->orig_dst, strerror(-rc));
		return true;
	}
	pr_debug("session %llu: %s pid %u (%s) uid %u cgroup %s → %s (%s)",
		 (unsigned long long)s->id, s->agent, s->info.tgid, s->info.comm, s->info.uid,
		 s->cgroup, s->orig_dst, s->target_name);
	return true;
deny:
	table_add(d, s);
	__atomic_add_fetch(&d->sessions_denied, 1, __ATOMIC_RELAXED);
	s->state = AG_SESS_DENIED;
	/* An RST: the agent's client fails at once instead of waiting on a silent socket. */
	session_end(s, true);
	return true;
}

static void on_listener(struct ag_io *io, uint32_t events)
{
	struct ag_worker *w = io->data;

	for (int n = 0; n < 64; n++) {
		if (accept_one(w, io->fd))
			continue;
		/*
		 * Out of fds or memory, the pending connection stays and would wake us at once,
		 * again and again: stop listening until the next tick.
		 */
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
			ag_loop_mod(io, 0);
		break;
	}
}

/* The gateway's address of family for fd: 127.0.0.1, or [::1] with fd IPv6 only. */
static socklen_t gateway_addr(int fd, int family, uint16_t port, struct sockaddr_storage *ss)
{
	struct sockaddr_in6 *in6 = (void *)ss;
	struct sockaddr_in *in = (void *)ss;
	int one = 1;

	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		in->sin_family = AF_INET;
		in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		in->sin_port = htons(port);
		return sizeof(*in);
	}
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	in6->sin6_family = AF_INET6;
	in6->sin6_addr = in6addr_loopback;
	in6->sin6_port = htons(port);
	return sizeof(*in6);
}

/*
 * SO_REUSEPORT spreads accepts over our workers, but would just as happily let a second
 * agentgated share the port and take half of the connections without their identities. A plain
 * bind first proves the port is free.
 */
static int port_free(int family, uint16_t port, char *err, size_t errlen)
{
	struct sockaddr_storage ss = {};
	socklen_t sl;
	int fd, one = 1, rc = 0;

	fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	/* Connections of a previous daemon in TIME_WAIT are no reason to refuse; a listener is. */
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	sl = gateway_addr(fd, family, port, &ss);
	if (bind(fd, (struct sockaddr *)&ss, sl) && errno == EADDRINUSE) {
		snprintf(err, errlen,
			 "port %u is in use on %s (another agentgated? choose one with --port)", port,
			 family == AF_INET ? "127.0.0.1" : "[::1]");
		rc = -EADDRINUSE;
	}
	close(fd);
	return rc;
}

static int listen_on(int family, uint16_t port, uint32_t mark, int *out, char *err, size_t errlen)
{
	struct sockaddr_storage ss = {};
	socklen_t sl;
	int fd, one = 1;

	fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -errno;
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	/* The connect hooks redirect only to a listener with our mark (lib/connect.h). */
	if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark))) {
		int e = errno;

		snprintf(err, errlen, "SO_MARK on the listener: %s", strerror(e));
		close(fd);
		return -e;
	}
	sl = gateway_addr(fd, family, port, &ss);
	if (bind(fd, (struct sockaddr *)&ss, sl) || listen(fd, 4096)) {
		int e = errno;

		snprintf(err, errlen, "cannot listen on %s:%u: %s%s",
			 family == AF_INET ? "127.0.0.1" : "[::1]", port, strerror(e),
			 e == EADDRINUSE ? " (another agentgated, or choose --port)" : "");
		close(fd);
		return -e;
	}
	*out = fd;
	return 0;
}

struct tick_match {
	struct ag_worker *w;
	uint64_t now;
};

static bool connect_expired(const struct ag_session *s, void *arg)
{
	const struct tick_match *m = arg;

	return s->w == m->w && s->state == AG_SESS_CONNECTING && s->connect_deadline_ms &&
	       m->now > s->connect_deadline_ms;
}

static bool handshake_expired(const struct ag_session *s, void *arg)
{
	const struct tick_match *m = arg;

	if (s->w != m->w || s->state == AG_SESS_CLOSED)
		return false;
	for (int i = 0; i < 2; i++)
		if (s->side[i].tls == AG_TLS_HANDSHAKE && m->now > s->side[i].tls_deadline_ms)
			return true;
	return false;
}

/*
 * A TLS session of this worker with no event for a whole tick gives back its record buffers
 * (about 17 KiB each way per SSL, 4 of them with TLS on both legs: most of what an idle TLS
 * session would hold). OpenSSL allocates them again at the next record; SSL_free_buffers()
 * keeps them while they hold data. Busy sessions keep theirs (SSL_MODE_RELEASE_BUFFERS would cost a malloc and
 * a free per record). Runs on the worker, the only thread that touches its sessions' SSLs.
 */
/*
 * OpenSSL before 3.0.14 (3.1.6, 3.2.2, 3.3.1) freed a read buffer that held a record's header
 * only, or a decrypted record not yet read (CVE-2024-4741): slimming waits for a fixed library.
 */
static bool free_buffers_safe(void)
{
	static int safe = -1;

	if (safe < 0) {
		unsigned long v = OpenSSL_version_num();
		unsigned int major = v >> 28, minor = (v >> 20) & 0xff, patch = (v >> 4) & 0xff;
		static const unsigned int fixed[] = { 14, 6, 2, 1 }; /* 3.0 .. 3.3 */

		safe = major > 3 || (major == 3 && (minor > 3 || patch >= fixed[minor]));
	}
	return safe;
}

/*
 * May side c's SSL give its buffers back: no decrypted bytes waiting for a paused side or a
 * queued read. (A record begun but not whole is SSL_free_buffers()'s own refusal: tls_starved
 * cannot tell it, as every read of an idle side ends wanting bytes.)
 */
static bool tls_idle(const struct ag_side_conn *c)
{
	return !c->paused && !c->tls_kicked && !SSL_has_pending(c->ssl);
}

static bool tls_slim(const struct ag_session *cs, void *arg)
{
	struct ag_session *s = (struct ag_session *)cs;
	bool slim = true;

	if (s->w != arg)
		return false;
	if (!s->io_seen && !s->tls_slim && free_buffers_safe() &&
	    (s->state == AG_SESS_ACTIVE || s->state == AG_SESS_CLOSING)) {
		for (int i = 0; i < 2; i++) {
			if (!s->side[i].ssl || s->side[i].tls != AG_TLS_UP)
				continue;
			if (!tls_idle(&s->side[i]) || !SSL_free_buffers(s->side[i].ssl))
				slim = false;
		}
		s->tls_slim = slim;
	}
	s->io_seen = false;
	return false;
}

/* Connect timeouts: a worker tick scans the daemon table for its own connecting sessions. */
static void worker_tick(void *arg)
{
	struct tick_match m = { .w = arg, .now = ag_mono_ms() };
	struct ag_worker *w = m.w;
	struct ag_session *s;

	/* Each one failed leaves the table. */
	while ((s = table_find(w->d, connect_expired, &m)))
		ag_session_fail(s, true, "upstream %s: connect timed out", s->orig_dst);
	while ((s = table_find(w->d, handshake_expired, &m))) {
		const struct ag_side_conn *a = &s->side[AG_SIDE_AGENT];
		bool agent = a->tls == AG_TLS_HANDSHAKE && m.now > a->tls_deadline_ms;

		tls_failed(s, agent ? AG_SIDE_AGENT : AG_SIDE_UPSTREAM, "handshake timed out");
	}
	table_find(w->d, tls_slim, w); /* each session, none matches */
	/* Listeners paused for want of fds (on_listener) try again. */
	for (int k = 0; k < 2; k++)
		if (w->lis[k].fd >= 0 && w->lis[k].loop && !w->lis[k].events)
			ag_loop_mod(&w->lis[k], EPOLLIN);
}

static bool releasable_of_worker(const struct ag_session *s, void *w)
{
	return s->w == w && s->state != AG_SESS_CLOSED && ag_audit_releasable(s);
}

/* Sessions whose answers waited for their audit records: those records are on disk now. */
static void release_held(void *arg)
{
	struct ag_worker *w = arg;
	struct ag_session *s;

	while ((s = table_find(w->d, releasable_of_worker, w))) {
		if (flush_side(s, AG_SIDE_AGENT)) {
			read_failed(s, AG_SIDE_AGENT);
			continue;
		}
		if (session_done(s)) {
			session_end(s, false);
			continue;
		}
		side_update_events(s, AG_SIDE_AGENT);
		side_update_events(s, AG_SIDE_UPSTREAM);
	}
}

static void durable_wake(void *arg)
{
	struct ag_worker *w = arg;

	ag_loop_call(w->loop, release_held, w);
}

static void *worker_main(void *arg)
{
	struct ag_worker *w = arg;
	int rc = ag_loop_run(w->loop, 1000, worker_tick, w);

	if (rc)
		pr_err("worker %d: %s", w->idx, strerror(-rc));
	return NULL;
}

int ag_workers_start(struct ag_daemon *d, char *err, size_t errlen)
{
	int n = d->opts.workers > 0 ? d->opts.workers : (int)sysconf(_SC_NPROCESSORS_ONLN);

	if (n < 1)
		n = 1;
	if (n > 64)
		n = 64;
	if (port_free(AF_INET, d->opts.port, err, errlen) ||
	    port_free(AF_INET6, d->opts.port, err, errlen))
		return -EADDRINUSE;
	d->workers = calloc(n, sizeof(*d->workers));
	if (!d->workers)
		return -ENOMEM;
	for (int i = 0; i < n; i++) {
		struct ag_worker *w = calloc(1, sizeof(*w));
		int fds[2] = { -1, -1 }, rc;

		if (!w)
			return -ENOMEM;
		d->workers[i] = w;
		d->nworkers = i + 1;
		w->d = d;
		w->idx = i;
		w->lis[0].fd = w->lis[1].fd = -1;
		w->scratch = malloc(AG_READ_CHUNK);
		w->loop = ag_loop_new();
		if (!w->scratch || !w->loop) {
			snprintf(err, errlen, "worker %d: %s", i, strerror(errno));
			return -ENOMEM;
		}
		rc = listen_on(AF_INET, d->opts.port, d->opts.mark, &fds[0], err, errlen);
		if (rc)
			return rc;
		rc = listen_on(AF_INET6, d->opts.port, d->opts.mark, &fds[1], err, errlen);
		if (rc) {
			close(fds[0]);
			return rc;
		}
		if (i == 0) {
			uint64_t cookie = 0;
			socklen_t cl = sizeof(cookie);

			if (getsockopt(fds[0], SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &cl)) {
				snprintf(err, errlen, "SO_NETNS_COOKIE: %s (kernel 5.14+ needed)",
					 strerror(errno));
				close(fds[0]);
				close(fds[1]);
				return -errno;
			}
			d->netns_cookie = cookie;
		}
		ag_audit_on_durable(durable_wake, w);
		for (int k = 0; k < 2; k++) {
			if (ag_loop_add(w->loop, &w->lis[k], fds[k], EPOLLIN, on_listener)) {
				snprintf(err, errlen, "epoll: %s", strerror(errno));
				return -errno;
			}
			w->lis[k].data = w;
		}
	}
	for (int i = 0; i < n; i++) {
		int rc = pthread_create(&d->workers[i]->thread, NULL, worker_main, d->workers[i]);

		char name[16];

		/* pthread_create() returns its error; errno is not set. */
		if (rc) {
			snprintf(err, errlen, "starting worker %d: %s", i, strerror(rc));
			return -rc;
		}
		snprintf(name, sizeof(name), "ag-worker%d", i);
		pthread_setname_np(d->workers[i]->thread, name); /* top -H, perf */
	}
	return 0;
}

static void close_listeners_cb(void *arg)
{
	struct ag_worker *w = arg;

	for (int k = 0; k < 2; k++) {
		if (w->lis[k].fd < 0)
			continue;
		ag_loop_del(&w->lis[k]);
		close(w->lis[k].fd);
		w->lis[k].fd = -1;
	}
}

void ag_workers_close_listeners(struct ag_daemon *d)
{
	for (int i = 0; i < d->nworkers; i++)
		if (d->workers[i]->loop)
			ag_loop_call(d->workers[i]->loop, close_listeners_cb, d->workers[i]);
}

static bool live_of_worker(const struct ag_session *s, void *w)
{
	return s->w == w && s->state != AG_SESS_CLOSED;
}

static void kill_all_cb(void *arg)
{
	struct ag_worker *w = arg;
	struct ag_session *victim;

	while ((victim = table_find(w->d, live_of_worker, w)))
		ag_session_fail(victim, false, "agentgated stopped");
	ag_loop_stop(w->loop);
}

void ag_workers_stop(struct ag_daemon *d)
{
	for (int i = 0; i < d->nworkers; i++) {
		struct ag_worker *w = d->workers[i];

		if (w->thread) {
			ag_loop_call(w->loop, kill_all_cb, w);
			pthread_join(w->thread, NULL);
		}
		close_listeners_cb(w);
		ag_loop_free(w->loop);
		while (w->npipes--) {
			close(w->pipes[w->npipes][0]);
			close(w->pipes[w->npipes][1]);
		}
		free(w->scratch);
		free(w);
	}
	free(d->workers);
	d->workers = NULL;
	d->nworkers = 0;
}

struct kill_req {
	struct ag_daemon *d;
	uint64_t id;
	struct ag_worker *w; /* the session's, copied under the table's lock */
	bool live;	     /* only a session not closed yet */
};

static bool kill_match(const struct ag_session *s, void *arg)
{
	struct kill_req *k = arg;

	if (s->id != k->id || (k->live && s->state == AG_SESS_CLOSED))
		return false;
	k->w = s->w;
	return true;
}

/* On the session's worker, where it may be ended. */
static void kill_one_cb(void *arg)
{
	struct kill_req *k = arg;
	struct ag_session *victim;

	victim = table_find(k->d, kill_match, k);
	if (victim)
		ag_session_fail(victim, true, "killed by agctl");
	free(k);
}

int ag_session_kill_by_id(struct ag_daemon *d, uint64_t id)
{
	struct kill_req *k = calloc(1, sizeof(*k));
	int rc;

	if (!k)
		return -ENOMEM;
	k->d = d;
	k->id = id;
	k->live = true; /* a closed session still listed is not killed again */
	if (!table_find(d, kill_match, k)) {
		free(k);
		return -ENOENT;
	}
	rc = ag_loop_call(k->w->loop, kill_one_cb, k);
	if (rc)
		free(k);
	return rc;
}
