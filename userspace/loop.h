/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A non-blocking epoll loop, one per thread. Each watched fd is a struct ag_io embedded in its
 * owner; the callback gets the io and the ready events. Nothing here blocks but epoll_wait.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>

struct ag_loop;
struct ag_io;

typedef void (*ag_io_fn)(struct ag_io *io, uint32_t events);

struct ag_io {
	int fd;
	uint32_t events; /* currently registered */
	ag_io_fn fn;
	struct ag_loop *loop;
	bool parked; /* out of the epoll set (ag_loop_park()) */
	void *data;  /* the owner's, untouched by the loop */
};

struct ag_loop *ag_loop_new(void);
void ag_loop_free(struct ag_loop *l);
/* Registers io->fd for `events` (EPOLLIN, EPOLLOUT, ...); 0 or -errno. */
int ag_loop_add(struct ag_loop *l, struct ag_io *io, int fd, uint32_t events, ag_io_fn fn);
int ag_loop_mod(struct ag_io *io, uint32_t events);
/*
 * Takes the fd out of the epoll set until ag_loop_mod() asks for an event again. For a socket
 * that reports EPOLLHUP (whatever the mask) while its owner may not act on it yet: level-
 * triggered, that HUP would wake the loop again and again.
 */
void ag_loop_park(struct ag_io *io);
void ag_loop_del(struct ag_io *io);
/* Runs until ag_loop_stop(); tick_fn (if any) every tick_ms. 0 or -errno. */
int ag_loop_run(struct ag_loop *l, int tick_ms, void (*tick_fn)(void *), void *tick_ctx);
/* Thread-safe: wakes the loop and makes ag_loop_run return. */
void ag_loop_stop(struct ag_loop *l);
/* Thread-safe: runs fn(arg) on the loop's thread, after the batch of events in hand. */
int ag_loop_call(struct ag_loop *l, void (*fn)(void *), void *arg);
