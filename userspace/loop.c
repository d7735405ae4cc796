// SPDX-License-Identifier: GPL-2.0
/* The epoll loop; cross-thread calls arrive through an eventfd and a locked queue. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"

struct ag_call {
	void (*fn)(void *);
	void *arg;
	struct ag_call *next;
};

struct ag_loop {
	int epfd;
	struct ag_io wake;
	volatile bool stop;
	pthread_mutex_t lock;
	struct ag_call *calls, **calls_tail;
};

static void run_calls(struct ag_loop *l)
{
	struct ag_call *c;

	/*
	 * None queued (the common batch): no lock. A call queued as this reads is not lost: its
	 * eventfd write, after the queue's unlock, wakes the loop for the next batch.
	 */
	if (!__atomic_load_n(&l->calls, __ATOMIC_ACQUIRE))
		return;
	pthread_mutex_lock(&l->lock);
	c = l->calls;
	__atomic_store_n(&l->calls, NULL, __ATOMIC_RELAXED);
	l->calls_tail = &l->calls;
	pthread_mutex_unlock(&l->lock);
	while (c) {
		struct ag_call *next = c->next;

		c->fn(c->arg);
		free(c);
		c = next;
	}
}

/* Only drains the eventfd: the calls run after the batch (see ag_loop_run). */
static void on_wake(struct ag_io *io, uint32_t events)
{
	uint64_t v;

	while (read(io->fd, &v, sizeof(v)) > 0)
		;
}

struct ag_loop *ag_loop_new(void)
{
	struct ag_loop *l = calloc(1, sizeof(*l));
	int efd;

	if (!l)
		return NULL;
	pthread_mutex_init(&l->lock, NULL);
	l->calls_tail = &l->calls;
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (l->epfd < 0 || efd < 0 || ag_loop_add(l, &l->wake, efd, EPOLLIN, on_wake)) {
		int err = errno;

		if (efd >= 0)
			close(efd);
		if (l->epfd >= 0)
			close(l->epfd);
		free(l);
		errno = err;
		return NULL;
	}
	return l;
}

void ag_loop_free(struct ag_loop *l)
{
	if (!l)
		return;
	run_calls(l);
	close(l->wake.fd);
	close(l->epfd);
	pthread_mutex_destroy(&l->lock);
	free(l);
}

int ag_loop_add(struct ag_loop *l, struct ag_io *io, int fd, uint32_t events, ag_io_fn fn)
{
	struct epoll_event ev = { .events = events, .data.ptr = io };

	io->fd = fd;
	io->fn = fn;
	io->loop = l;
	io->events = events;
	io->parked = false;
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev))
		return -errno;
	return 0;
}

int ag_loop_mod(struct ag_io *io, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = io };

	if (io->parked) {
		if (!events)
			return 0;
		if (epoll_ctl(io->loop->epfd, EPOLL_CTL_ADD, io->fd, &ev))
			return -errno;
		io->parked = false;
		io->events = events;
		return 0;
	}
	if (io->events == events)
		return 0;
	if (epoll_ctl(io->loop->epfd, EPOLL_CTL_MOD, io->fd, &ev))
		return -errno;
	io->events = events;
	return 0;
}

void ag_loop_park(struct ag_io *io)
{
	if (io->parked || !io->loop || io->fd < 0)
		return;
	epoll_ctl(io->loop->epfd, EPOLL_CTL_DEL, io->fd, NULL);
	io->parked = true;
	io->events = 0;
}

void ag_loop_del(struct ag_io *io)
{
	if (io->loop && io->fd >= 0 && !io->parked)
		epoll_ctl(io->loop->epfd, EPOLL_CTL_DEL, io->fd, NULL);
	io->loop = NULL;
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000ULL + ts.tv_nsec / 1000000;
}

int ag_loop_run(struct ag_loop *l, int tick_ms, void (*tick_fn)(void *), void *tick_ctx)
{
	struct epoll_event evs[128];
	uint64_t next_tick = now_ms() + tick_ms;

	while (!l->stop) {
		int timeout = -1, n;

		if (tick_fn) {
			uint64_t now = now_ms();

			if (now >= next_tick) {
				tick_fn(tick_ctx);
				next_tick = now + tick_ms;
			}
			timeout = next_tick - now;
		}
		n = epoll_wait(l->epfd, evs, 128, timeout);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (int i = 0; i < n; i++) {
			struct ag_io *io = evs[i].data.ptr;

			io->fn(io, evs[i].events);
		}
		/*
		 * Calls run only between batches: one may free an object (a session) that a later
		 * event of the same batch still points to, and the wakeup fd is no later than any.
		 */
		run_calls(l);
	}
	return 0;
}

void ag_loop_stop(struct ag_loop *l)
{
	uint64_t one = 1;

	l->stop = true;
	if (write(l->wake.fd, &one, sizeof(one)) < 0)
		pr_debug("loop wake: %s", strerror(errno));
}

int ag_loop_call(struct ag_loop *l, void (*fn)(void *), void *arg)
{
	struct ag_call *c = malloc(sizeof(*c));
	uint64_t one = 1;

	if (!c)
		return -ENOMEM;
	c->fn = fn;
	c->arg = arg;
	c->next = NULL;
	pthread_mutex_lock(&l->lock);
	__atomic_store_n(l->calls_tail, c, __ATOMIC_RELEASE); /* read unlocked: run_calls() */
	l->calls_tail = &c->next;
	pthread_mutex_unlock(&l->lock);
	if (write(l->wake.fd, &one, sizeof(one)) < 0)
		pr_debug("loop wake: %s", strerror(errno));
	return 0;
}
