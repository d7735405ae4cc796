/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the end-to-end tests share, after the kernel selftests' cgroup_helpers.c and
 * network_helpers.c: per-run cgroups (never the root, never one we did not create), processes
 * spawned into them, loopback servers with known behaviour (echo, hashing sink, reset,
 * half-close), clients with timeouts, and an agentgated instance per test with its own state
 * dir, socket, bpffs pins and port. Helpers log what went wrong and return an error; they never
 * assert: the test decides. All waits are bounded.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <yajl/yajl_tree.h>

/* ---- cgroups ---- */

/*
 * Creates this run's test root cgroup, /agentgate-test-<pid> below the cgroup2 mount, and
 * registers th_cgroup_cleanup() with atexit. Idempotent. 0 or -errno.
 */
int th_cgroup_setup(void);
/* Creates /agentgate-test-<pid>/<name> (name may hold '/'); its path relative to the mount. */
int th_cgroup_create(const char *name, char *rel, size_t len);
/* The cgroup2 mount ("" before th_cgroup_setup()). */
const char *th_cgroup_mount(void);
/* Absolute path and cgroup id of a relative path. 0 or -errno. */
int th_cgroup_abs(const char *rel, char *out, size_t len);
int th_cgroup_id(const char *rel, uint64_t *id);
/* Kills what is left in the test cgroups and removes them all. Idempotent. */
void th_cgroup_cleanup(void);
/* The same for the per-run cgroup of another process (the runner, after a test was killed). */
int th_cgroup_reap(pid_t owner);

/* ---- processes ---- */

/*
 * Forks a child that moves itself into cgroup rel (relative path), then runs fn(arg); its exit
 * code is fn's return value (127 when the move failed). Returns the pid or -errno.
 */
pid_t th_spawn_in_cgroup(const char *rel, int (*fn)(void *), void *arg);
/* Reaps pid: its exit code, 128 + signal if killed, -ETIMEDOUT (after SIGKILL) or -errno. */
int th_wait(pid_t pid, int timeout_ms);
/* Shared anonymous memory that a spawned child can write results into; th_shared_free(). */
void *th_shared_alloc(size_t len);
void th_shared_free(void *p, size_t len);
/*
 * Runs a command (argv split on spaces, no quoting), stdout captured into out (NUL-terminated,
 * may be NULL), stderr to the test log. Its exit code, or -errno / -ETIMEDOUT (60 s).
 */
int th_run(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* rm -r; errors ignored (for temp dirs and bpffs pins). */
void th_rm_rf(const char *path);
/* Directory of the running test_progs binary (build/), where agentgated and agctl live. */
const char *th_build_dir(void);

/* ---- deterministic data and hashes ---- */

/* A reproducible byte stream (xorshift64*): the same seed gives the same bytes however cut. */
struct th_prng {
	uint64_t state;
	uint64_t word;
	unsigned int left; /* bytes of word not used yet */
};

void th_prng_init(struct th_prng *p, uint64_t seed);
void th_prng_fill(struct th_prng *p, void *buf, size_t len);
/* SHA-256 of the first n bytes of the stream of seed. */
int th_prng_sha256(uint64_t seed, uint64_t n, uint8_t out[32]);
int th_sha256(const void *buf, size_t len, uint8_t out[32]);
void th_hex(const uint8_t *in, size_t len, char *out); /* out: 2 * len + 1 */

/* ---- servers (an epoll thread each, on a loopback address, bound to port 0) ---- */

enum th_server_kind {
	TH_SRV_ECHO,	  /* sends back what it gets; closes its side after the peer's EOF */
	TH_SRV_SINK,	  /* hashes all it gets while sending send_bytes of seed's stream */
	TH_SRV_RESET,	  /* accepts, then closes with SO_LINGER 0 (RST) */
	TH_SRV_HALFCLOSE, /* reads to EOF, then replies "ok <bytes> <sha256 hex>\n" and closes */
};

/* What a sink or half-close server saw on one connection, reported when it ended. */
struct th_report {
	uint64_t bytes_in;
	uint8_t sha_in[32];
	uint64_t bytes_out;
	uint8_t sha_out[32];
	int error; /* 0, or the errno that ended the connection */
	int peer_port;
	char peer[64];
};

struct th_server;

/* family AF_INET or AF_INET6, addr "127.0.0.2" or "::1". NULL (errno set) on failure. */
struct th_server *th_server_start(enum th_server_kind kind, int family, const char *addr);
/* A sink that sends send_bytes of the stream of seed on each connection. */
struct th_server *th_server_sink(int family, const char *addr, uint64_t send_bytes, uint64_t seed);
int th_server_port(const struct th_server *s);
/* Connections accepted so far. */
int th_server_accepted(struct th_server *s);
/* Peer port of the i-th accepted connection, or -1. */
int th_server_peer_port(struct th_server *s, int i);
/* Waits until n connections have ended and been reported (sink, half-close). 0 or -ETIMEDOUT. */
int th_server_wait_reports(struct th_server *s, int n, int timeout_ms);
int th_server_report(struct th_server *s, int i, struct th_report *r);
/* Stops the thread, closes every socket, frees. NULL is a no-op. */
void th_server_stop(struct th_server *s);

/* ---- clients ---- */

/* A connected TCP socket (blocking), or -errno: -EPERM, -ECONNREFUSED, -ETIMEDOUT, ... */
int th_connect(int family, const char *addr, int port, int timeout_ms);
/* 0, or -errno (-ETIMEDOUT). */
int th_send_all(int fd, const void *buf, size_t len, int timeout_ms);
/* Reads until len bytes or EOF: the count read, or -errno (-ETIMEDOUT). */
ssize_t th_recv_all(int fd, void *buf, size_t len, int timeout_ms);

/* A full-duplex transfer: up_bytes of up_seed's stream sent (then SHUT_WR), all read to EOF. */
struct th_xfer {
	uint64_t bytes_out;
	uint8_t sha_out[32];
	uint64_t bytes_in;
	uint8_t sha_in[32];
	bool eof_while_sending; /* the peer's EOF came before all of ours was sent */
	int error;		/* 0 or errno */
};

int th_xfer(int fd, uint64_t up_bytes, uint64_t up_seed, int timeout_ms, struct th_xfer *x);
/* The same, each send() at most a pseudo-random 1..max_chunk bytes (many small writes). */
int th_xfer_chunked(int fd, uint64_t up_bytes, uint64_t up_seed, size_t max_chunk, int timeout_ms,
		    struct th_xfer *x);

/*
 * A client job for th_spawn_in_cgroup(th_job_run, job), with job in th_shared_alloc() memory:
 * takes the given name and uid, connects, exchanges data, and writes what it saw back into job.
 */
struct th_job {
	/* in */
	int family;
	char addr[64];
	int port;
	char comm[16];	   /* "" keeps the name */
	uint32_t uid, gid; /* 0: stays root */
	int nconns;	   /* connections held open at once (0 means 1) */
	uint64_t up_bytes; /* per connection; 0: one short line each */
	uint64_t seed;	   /* of the first connection; the next ones use seed + i */
	size_t max_chunk;  /* 0: large writes */
	bool expect_echo;  /* check that what comes back is what was sent */
	int timeout_ms;	   /* for the whole job (0: 30 s) */
	int hold_ms;	   /* after a short exchange keep the connections until release */
	bool again;	   /* after release, one more short exchange on each connection */
	/* out */
	int pid;
	int connect_err; /* first connect's 0 or -errno */
	int nconnected;
	int local_port;	    /* of the first connection */
	int bad;	    /* connections whose exchange failed */
	int first_error;    /* errno of the first failure */
	struct th_xfer x;   /* of the first connection */
	volatile int ready; /* holding */
	volatile int release;
};

int th_job_run(void *job);

/* ---- the daemon ---- */

struct th_daemon {
	char dir[128]; /* temp dir holding all of the below */
	char config[192];
	char state_dir[192];
	char socket[192];
	char log[192];
	char pin_root[128]; /* /sys/fs/bpf/agentgate-test-<pid>-<n> */
	char extra[512];
	int port;
	pid_t pid;     /* > 0 while running */
	int exit_code; /* of the last exit: code, 128 + signal, or -1 */
	bool initialized;
};

/* build/agctl run with no daemon in mind: stdout and stderr apart. */
struct th_agctl_result {
	int status; /* exit code; 128+N if killed by signal N; -errno if it could not run */
	char out[32768];
	char err[16384];
};

/*
 * Runs build/agctl ARGS (NULL-terminated) from the repository root (build/..), stdin from
 * /dev/null, 10 s at most; output past a buffer's size is read and dropped so agctl never
 * blocks on a full pipe. Returns r->status.
 */
int th_agctl_run(struct th_agctl_result *r, const char *const *args);
#define TH_AGCTL(r, ...) th_agctl_run((r), (const char *const[]){ __VA_ARGS__, NULL })

/*
 * Writes policy_yaml into a fresh temp dir, picks a free port and starts build/agentgated in the
 * foreground (stderr to d->log); waits up to 10 s for its control socket to answer. When the
 * daemon exits instead, d->exit_code is set and -ECHILD returned (its log stays readable).
 */
int th_daemon_start(struct th_daemon *d, const char *policy_yaml, const char *extra_args);
/* SIGTERM, then waits (10 s, then SIGKILL). The exit code, or -errno. */
int th_daemon_stop(struct th_daemon *d);
/* SIGKILL and reap: a crash. */
int th_daemon_kill(struct th_daemon *d);
/* Starts it again (stopping it first if it runs) with the same files, pins and port. */
int th_daemon_restart(struct th_daemon *d);
/* Rewrites the policy file (not reloaded) / sends SIGHUP. 0 or -errno. */
int th_daemon_write_policy(struct th_daemon *d, const char *policy_yaml);
int th_daemon_reload(struct th_daemon *d);
/* The daemon's log so far (NUL-terminated, the tail when it is longer than len). */
int th_daemon_read_log(const struct th_daemon *d, char *buf, size_t len);
/*
 * Stops the daemon, detaches its programs (agctl prog detach, then removes the pins), shows its
 * log if the test failed, removes the temp dir. Idempotent; a never-started d is a no-op.
 */
void th_daemon_cleanup(struct th_daemon *d);
/*
 * Runs build/agctl -S <socket> -B <pin root> ARGS (fmt split on spaces; d may be NULL for
 * neither); stdout into out (may be NULL). Its exit code, or -errno.
 */
int th_agctl(const struct th_daemon *d, char *out, size_t len, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/*
 * Starts `agctl -S <socket> session watch` in the background, stdout and stderr into out_path,
 * and gives it 300 ms to subscribe. Its pid (SIGTERM and reap it), or -errno.
 */
pid_t th_agctl_watch_start(const struct th_daemon *d, const char *out_path);

/*
 * Waits up to timeout_ms for a line of <state-dir>/sessions.log with "event" == event whose
 * numeric field key equals val (key NULL: the first with that event); the n-th such line
 * (0-based). The parsed object (yajl_tree_free() it) or NULL.
 */
yajl_val th_daemon_wait_event(const struct th_daemon *d, const char *event, const char *key,
			      long long val, int nth, int timeout_ms);
/* Lines with "event" == event (and key == val when key is set), now. -errno on error. */
int th_daemon_count_events(const struct th_daemon *d, const char *event, const char *key,
			   long long val);

/*
 * A policy (YAML) with one agent "t" on cgroup `cgroup` and tcp targets given as name, address
 * pairs ending with NULL ("echo", "127.0.0.2:4242", "echo6", "[::1]:4243", NULL); default deny.
 */
int th_policy_tcp(char *buf, size_t len, const char *cgroup, ...) __attribute__((sentinel));

/*
 * Programs attached directly to a cgroup (bpftool -j cgroup show), counted by hook: connect4,
 * connect6, sockops, and all of them. 0 or -errno.
 */
struct th_cg_progs {
	int connect4, connect6, sockops, total;
};

int th_cgroup_progs(const char *rel, struct th_cg_progs *c);

/* Entries in the pinned map <pin_root>/<name> now (hash-like maps), or -errno. */
int th_pinned_map_entries(const char *pin_root, const char *name);
/* The id of the map pinned at <pin_root>/<name>, or -errno. */
int th_pinned_map_id(const char *pin_root, const char *name);
/*
 * Links on the host (bpftool -j link show) whose program is named prog_name and uses the map
 * of id map_id (a daemon's ag_tagged: th_pinned_map_id()): one daemon's links of that program,
 * whatever other agentgated instances run. The count, or -errno.
 */
int th_bpf_links(uint32_t map_id, const char *prog_name);

/* ---- JSON (yajl tree) ---- */

/* Parses text; logs the parser's error and returns NULL on failure. */
yajl_val th_json_parse(const char *text);
/* Member key of an object, or NULL. */
yajl_val th_json_get(yajl_val obj, const char *key);
/* String member (NULL if absent or not a string). */
const char *th_json_str(yajl_val obj, const char *key);
/* Integer member: true and *out set if present and an integer. */
bool th_json_int(yajl_val obj, const char *key, long long *out);
/*
 * The counters of the daemon's session of process pid (pid < 0: its first session), from
 * `agctl -j session list`. 0, -ENOENT when there is none, -EIO when agctl fails.
 */
int th_daemon_counters(const struct th_daemon *d, int pid, long long *statements,
		       long long *blocked, long long *masked);
