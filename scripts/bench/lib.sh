# SPDX-License-Identifier: GPL-2.0
# What the benches (scripts/bench.sh, bench_pg.sh, bench_http.sh) share; sourced, POSIX sh.
# BENCH_NAME names the bench in messages.

PICKED=
# A port nothing listens on, in [BASE, BASE + 10000) (default 20000: outside the ephemeral
# range), never one handed out before in this run; into PORT.
free_port() { # [base]
	while :; do
		p=$((${1:-20000} + $(od -An -N2 -tu2 /dev/urandom) % 10000))
		case " $PICKED " in *" $p "*) continue ;; esac
		hex=$(printf '%04X' "$p")
		if ! awk -v h=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == h { f = 1 }
			END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
			PICKED="$PICKED $p"
			PORT=$p
			return
		fi
	done
}

# Kills what runs in cgroup directory $1 and removes it.
kill_cgroup() { # dir
	[ -d "$1" ] || return 0
	for _ in 1 2 3; do
		for p in $(cat "$1/cgroup.procs" 2>/dev/null); do
			kill -KILL "$p" 2>/dev/null
		done
		i=0
		while ! rmdir "$1" 2>/dev/null && [ $i -lt 20 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		[ -d "$1" ] || return 0
	done
	echo "$BENCH_NAME: could not remove $1" >&2
}

# Stops process $1 (TERM, then KILL after 50 waits of $2 seconds, default 0.1) and reaps it.
stop_pid() { # pid [interval]
	kill -TERM "$1" 2>/dev/null || return 0
	i=0
	while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do
		sleep "${2:-0.1}"
		i=$((i + 1))
	done
	kill -KILL "$1" 2>/dev/null
	wait "$1" 2>/dev/null
	return 0
}

# Detaches and removes the pins under bpffs directory $1 ($B/agctl does the detaching).
detach_pins() { # dir
	[ -d "$1" ] || return 0
	"$B/agctl" -B "$1" prog detach >/dev/null 2>&1
	rm -rf "$1"
}

TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
# CPU time (user + system, all threads) of processes so far, in clock ticks (0 without any).
# (sh has no locals: the names here are used nowhere else; an empty pid is none, not /proc/stat)
cpu_ticks() { # pid...
	ct_t=0
	for ct_p in "$@"; do
		case $ct_p in '' | *[!0-9]*) continue ;; esac
		[ -r "/proc/$ct_p/stat" ] || continue
		# The fields after the command (which may hold spaces): utime and stime.
		ct_t=$((ct_t + $(sed 's/^.*) //' "/proc/$ct_p/stat" | awk '{ print $12 + $13 }')))
	done
	echo "$ct_t"
}

# With AGBENCH_PERF=PREFIX set, records process $2 with perf record -g for $3 seconds into
# PREFIX.$1 (in the background: perf_wait waits for it), for perf report; otherwise nothing.
PERF_JOB=
perf_start() { # name pid seconds
	PERF_JOB=
	[ -n "${AGBENCH_PERF:-}" ] && [ -n "$2" ] || return 0
	command -v perf >/dev/null 2>&1 || {
		echo "$BENCH_NAME: AGBENCH_PERF is set but perf is not installed" >&2
		return 0
	}
	perf record -q -F 999 -g -p "$2" -o "$AGBENCH_PERF.$1" -- sleep "$3" >/dev/null 2>&1 &
	PERF_JOB=$!
}
perf_wait() {
	[ -n "$PERF_JOB" ] && wait "$PERF_JOB"
	PERF_JOB=
	return 0
}
