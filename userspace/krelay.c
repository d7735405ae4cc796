// SPDX-License-Identifier: GPL-2.0
/* The kernel relay of raw sessions; see krelay.h and bpf/sk_skb.bpf.c. */
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <linux/sockios.h>
#include <linux/tcp.h>

#include "bpf_loader.h"
#include "krelay.h"
#include "log.h"

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

/*
 * How soon a waiting direction checks again whether the program's bytes reached the peer's
 * socket: 1 ms, doubling up to 200 ms while they do not (a peer that does not read).
 */
#define AG_KRELAY_RETRY_MIN_NS 1000000L
#define AG_KRELAY_RETRY_MAX_NS 200000000L

struct ag_krelay {
	struct ag_session *s;
	struct ag_bpf *b;
	uint32_t slot;
	uint64_t cookie[2];
	uint64_t wbase[2];   /* bytes written into side i's socket when the relay began */
	uint64_t ubase[2];   /* bytes the daemon had sent to side i then (bytes_down, bytes_up) */
	bool waiting[2];     /* side i's direction waits for its redirected bytes to land */
	long retry_ns;	     /* the next wait (0: none yet since the last success) */
	struct ag_io tio;    /* timerfd for those waits */
	void (*resume)(struct ag_session *, enum ag_side);
};

static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t slots_used[AG_RELAY_SLOTS / 64];

static int slot_get(void)
{
	int slot = -ENOSPC;

	pthread_mutex_lock(&slots_lock);
	for (size_t w = 0; w < AG_RELAY_SLOTS / 64; w++) {
		if (slots_used[w] == UINT64_MAX)
			continue;
		slot = w * 64 + __builtin_ctzll(~slots_used[w]);
		slots_used[w] |= 1ULL << (slot % 64);
		break;
	}
	pthread_mutex_unlock(&slots_lock);
	return slot;
}

static void slot_put(uint32_t slot)
{
	pthread_mutex_lock(&slots_lock);
	slots_used[slot / 64] &= ~(1ULL << (slot % 64));
	pthread_mutex_unlock(&slots_lock);
}

static struct ag_relay_dir *dir_of(const struct ag_session *s, enum ag_side i)
{
	struct ag_relay_dir *dirs = ag_bpf_relay_dirs(s->krelay->b);

	return &dirs[s->krelay->slot * 2 + i];
}

static enum ag_side peer_of(enum ag_side i)
{
	return i == AG_SIDE_AGENT ? AG_SIDE_UPSTREAM : AG_SIDE_AGENT;
}

/* Bytes ever written into fd's send queue (relative: acked + still queued); 0 on error. */
static uint64_t written(int fd)
{
	struct tcp_info ti = {};
	socklen_t len = sizeof(ti);
	int outq = 0;

	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) || ioctl(fd, SIOCOUTQ, &outq))
		return 0;
	return ti.tcpi_bytes_acked + (uint64_t)outq;
}

static uint64_t user_sent(const struct ag_session *s, enum ag_side to)
{
	return to == AG_SIDE_UPSTREAM ? s->bytes_up : s->bytes_down;
}

/* Has every byte that came in on side i reached the peer's socket? */
static bool landed(struct ag_session *s, enum ag_side i)
{
	struct ag_krelay *kr = s->krelay;
	enum ag_side o = peer_of(i);
	uint64_t want = __atomic_load_n(&dir_of(s, i)->bytes, __ATOMIC_ACQUIRE) +
			user_sent(s, o) - kr->ubase[o];

	return written(s->side[o].io.fd) - kr->wbase[o] >= want;
}

static void on_timer(struct ag_io *io, uint32_t events)
{
	struct ag_krelay *kr = (void *)((char *)io - offsetof(struct ag_krelay, tio));
	uint64_t n;

	(void)events;
	if (read(io->fd, &n, sizeof(n)) < 0 && errno != EAGAIN)
		pr_debug("krelay timer: %s", strerror(errno));
	for (int i = 0; i < 2; i++) {
		if (!kr->waiting[i] || kr->s->state == AG_SESS_CLOSED)
			continue;
		kr->waiting[i] = false;
		kr->resume(kr->s, i);
	}
}

static int arm(struct ag_krelay *kr)
{
	struct itimerspec its = {};

	kr->retry_ns = kr->retry_ns ? kr->retry_ns * 2 : AG_KRELAY_RETRY_MIN_NS;
	if (kr->retry_ns > AG_KRELAY_RETRY_MAX_NS)
		kr->retry_ns = AG_KRELAY_RETRY_MAX_NS;
	its.it_value.tv_nsec = kr->retry_ns;

	if (kr->tio.fd < 0) {
		int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);

		if (fd < 0)
			return -errno;
		if (ag_loop_add(ag_session_loop(kr->s), &kr->tio, fd, EPOLLIN, on_timer)) {
			close(fd);
			return -errno;
		}
	}
	return timerfd_settime(kr->tio.fd, 0, &its, NULL) ? -errno : 0;
}

int ag_krelay_engage(struct ag_session *s, struct ag_bpf *b,
		     void (*resume)(struct ag_session *, enum ag_side), int *sock_err)
{
	struct ag_relay_dir *dirs = ag_bpf_relay_dirs(b);
	struct ag_krelay *kr;
	int slot, rc = 0;

	if (!dirs)
		return -EOPNOTSUPP;
	kr = calloc(1, sizeof(*kr));
	if (!kr)
		return -ENOMEM;
	slot = slot_get();
	if (slot < 0) {
		free(kr);
		return slot;
	}
	kr->s = s;
	kr->b = b;
	kr->slot = slot;
	kr->tio.fd = -1;
	kr->resume = resume;
	for (int i = 0; i < 2; i++) {
		socklen_t len = sizeof(kr->cookie[i]);
		struct ag_relay_dir *d = &dirs[slot * 2 + i];

		/* The slot's sockets left the sockhash with its last session: nobody reads it. */
		memset(d, 0, sizeof(*d));
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (getsockopt(s->side[i].io.fd, SOL_SOCKET, SO_COOKIE, &kr->cookie[i], &len)) {
			rc = -errno;
			break;
		}
		kr->wbase[i] = written(s->side[i].io.fd);
		kr->ubase[i] = user_sent(s, i);
	}
	for (int i = 0; i < 2 && !rc; i++) {
		rc = ag_bpf_relay_add(b, slot * 2 + i, s->side[i].io.fd, kr->cookie[i]);
		if (rc && i)
			ag_bpf_relay_del(b, slot * 2, kr->cookie[0]);
	}
	if (rc) {
		slot_put(slot);
		free(kr);
		return rc;
	}
	s->krelay = kr;
	/*
	 * What arrived before the sockets joined waits in their TCP receive queues until the next
	 * skb; a read (tcp_bpf's) runs the verdict on it now.
	 */
	*sock_err = 0;
	for (int i = 0; i < 2; i++) {
		char c;

		/* A reset that came meanwhile is reported once (the read clears it): pass it on. */
		if (recv(s->side[i].io.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno != EAGAIN &&
		    errno != EINTR && !*sock_err)
			*sock_err = errno;
	}
	return 0;
}

/*
 * Has the daemon read every byte the program passed it from side i? A passed skb may wait in
 * the psock's own backlog (the socket's receive buffer was full) where a read does not see it
 * yet: an EOF read then is no EOF of the stream.
 */
static bool all_read(struct ag_session *s, enum ag_side i)
{
	enum ag_side o = peer_of(i);
	/* A raw relay: what we read from i was sent to o or waits in o's buffer. */
	uint64_t got = user_sent(s, o) - s->krelay->ubase[o] + ag_buf_len(&s->side[o].out);

	return __atomic_load_n(&dir_of(s, i)->passed_bytes, __ATOMIC_ACQUIRE) <= got;
}

bool ag_krelay_take(struct ag_session *s, enum ag_side i, bool eof)
{
	struct ag_krelay *kr = s->krelay;

	if (kr->waiting[i])
		return false;
	if (landed(s, i) && (!eof || all_read(s, i))) {
		kr->retry_ns = 0;
		return true;
	}
	if (!arm(kr))
		kr->waiting[i] = true;
	/* (No timer: EPOLLIN stays armed and we come back through the loop.) */
	return false;
}

void ag_krelay_give(struct ag_session *s, enum ag_side i)
{
	struct ag_relay_dir *d = dir_of(s, i);
	enum ag_side o = peer_of(i);

	/* Every byte we wrote to o came from i (a raw relay). */
	__atomic_store_n(&d->relayed, user_sent(s, o) - s->krelay->ubase[o], __ATOMIC_RELEASE);
}

bool ag_krelay_waiting(const struct ag_session *s, enum ag_side i)
{
	return s->krelay && s->krelay->waiting[i];
}

void ag_krelay_bytes(const struct ag_session *s, uint64_t *up, uint64_t *down)
{
	struct ag_krelay *kr = s->krelay;
	struct ag_relay_dir *dirs;
	uint32_t slot;

	*up = *down = 0;
	if (!kr)
		return;
	/* Also read by agctl's thread: the slot once (it goes at the session's end). */
	slot = __atomic_load_n(&kr->slot, __ATOMIC_ACQUIRE);
	if (slot == UINT32_MAX)
		return;
	dirs = ag_bpf_relay_dirs(kr->b);
	*up = __atomic_load_n(&dirs[slot * 2 + AG_SIDE_AGENT].bytes, __ATOMIC_RELAXED);
	*down = __atomic_load_n(&dirs[slot * 2 + AG_SIDE_UPSTREAM].bytes, __ATOMIC_RELAXED);
}

void ag_krelay_end(struct ag_session *s)
{
	struct ag_krelay *kr = s->krelay;
	uint64_t up, down;

	if (!kr || kr->slot == UINT32_MAX)
		return;
	ag_krelay_bytes(s, &up, &down);
	for (int i = 0; i < 2; i++) {
		struct ag_relay_dir *d = dir_of(s, i);

		pr_debug("session %llu: kernel relay %s: %llu bytes redirected; %u skbs left to us "
			 "(%u: long backlog, %u: no peer)",
			 (unsigned long long)s->id, i ? "down" : "up",
			 (unsigned long long)d->bytes, d->passed, d->backlogged, d->no_peer);
	}
	for (int i = 0; i < 2; i++)
		ag_bpf_relay_del(kr->b, kr->slot * 2 + i, kr->cookie[i]);
	if (kr->tio.fd >= 0) {
		ag_loop_del(&kr->tio);
		close(kr->tio.fd);
	}
	kr->tio.fd = -1;
	slot_put(kr->slot);
	__atomic_store_n(&kr->slot, UINT32_MAX, __ATOMIC_RELEASE);
	s->bytes_up += up;
	s->bytes_down += down;
}

void ag_krelay_free(struct ag_session *s)
{
	free(s->krelay);
	s->krelay = NULL;
}
