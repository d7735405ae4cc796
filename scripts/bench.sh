#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# make bench: bulk throughput, request/response latency and connection rate, side by side in one
# run: direct (the client in no tagged cgroup), through agentgated (plain relay), through
# agentgated with the sockmap fast path and, with AGBENCH_KRELAY=1, through agentgated with the
# kernel relay (--kernel-relay on, experimental). build/agbench starts its own sink/echo server on
# 127.0.0.2; one daemon per mode, each with its own cgroup, port and pins, runs for the whole
# bench, and each test runs in every mode back to back (in turns) so that a noisy neighbour hits
# all of them alike; the tables give the median and the best of the rounds. First, on each fresh
# daemon, what an idle session costs it: AGBENCH_IDLE connections (10000, or what the open-file
# limit allows: two descriptors a session) held at once, and the growth of its resident memory.
# Installs nothing, needs no terminal, removes its cgroups, daemons and pins on every exit, and
# stops itself after 290 s.
#
# Environment: AGBENCH_BYTES (default 536870912), AGBENCH_RTTS (20000), AGBENCH_CONNS (2000),
# AGBENCH_ROUNDS (5), AGBENCH_IDLE (10000; 0 skips it), AGBENCH_KRELAY (0; 1 adds the kernel relay column);
# AGBENCH_KEEP=FILE keeps
# the raw results (scripts/bench.sh --table FILE).
set -u

cd "$(dirname "$0")/.." || exit 1
BENCH_NAME=bench
. scripts/bench/lib.sh
B=build
BYTES=${AGBENCH_BYTES:-536870912}
RTTS=${AGBENCH_RTTS:-20000}
CONNS=${AGBENCH_CONNS:-2000}
ROUNDS=${AGBENCH_ROUNDS:-5}
# Two descriptors a session in the daemon, a few of its own: what the hard limit allows.
IDLE=${AGBENCH_IDLE:-10000}
NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] || [ "$IDLE" -le $(((NOFILE - 100) / 2)) ] || IDLE=$(((NOFILE - 100) / 2))
LIMIT=290

fail() {
	echo "bench: $*" >&2
	exit 1
}

# The tables from "mode metric value" lines in file $1: per mode and metric the median over the
# rounds, then the best round (a noisy neighbour only ever makes a figure worse).
table() {
	awk '
	function lower_is_better(m) { return m ~ /^rr_/ }
	function sorted(key, v,    n, i, j, t) {
		n = cnt[key]
		for (i = 1; i <= n; i++)
			v[i] = val[key, i]
		for (i = 2; i <= n; i++)
			for (j = i; j > 1 && v[j - 1] > v[j]; j--) {
				t = v[j]; v[j] = v[j - 1]; v[j - 1] = t
			}
		return n
	}
	function median(key,    n, v) {
		n = sorted(key, v)
		if (!n)
			return 0
		return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
	}
	function best(key, m,    n, v) {
		n = sorted(key, v)
		if (!n)
			return 0
		return lower_is_better(m) ? v[1] : v[n]
	}
	# Fills agg[mode, metric] with how (median or best) and prints that table and verdict.
	function block(how,    i, k, m, d, x, rel, mode, worst, r, p50, p99, wins, g, f, better) {
		for (i = 1; i <= nm; i++)
			for (k = 1; k <= nmodes; k++)
				agg[modes[k], mets[i]] = how == "median" ? \
					median(modes[k] SUBSEP mets[i]) : best(modes[k] SUBSEP mets[i], mets[i])
		printf "\n%-28s %10s %10s %9s %12s %9s", how == "median" ? \
			"median of " rounds " rounds" : "best of " rounds " rounds", "direct", "gateway", \
			"vs direct", "gw+fastpath", "vs direct"
		if (nmodes > 3)
			printf " %12s %9s", "gw+krelay", "vs direct"
		printf "\n"
		for (i = 1; i <= nm; i++) {
			m = mets[i]; d = agg["direct", m]
			printf "%-28s %10.1f", names[i], d
			for (k = 2; k <= nmodes; k++) {
				x = agg[modes[k], m]
				if (lower_is_better(m))
					rel = sprintf("%+.1f", x - d)
				else
					rel = sprintf("%.2fx", (d > 0) ? x / d : 0)
				printf " %10.1f %9s%s", x, rel, (k < nmodes) ? " " : "\n"
			}
		}
		for (k = 2; k <= nmodes; k++) {
			mode = modes[k]
			worst = 1e9
			for (i = 1; i <= 3; i++) {
				r = agg["direct", mets[i]] > 0 ? agg[mode, mets[i]] / agg["direct", mets[i]] : 0
				if (r < worst)
					worst = r
			}
			p50 = agg[mode, "rr_p50_us"] - agg["direct", "rr_p50_us"]
			p99 = agg[mode, "rr_p99_us"] - agg["direct", "rr_p99_us"]
			printf "  %-18s relay throughput %.2fx direct (worst of up/down/both) %s;", \
				labels[k] ":", worst, (worst >= 0.9) ? "ok" : "MISSED"
			printf " p50 %+.1f us %s; p99 %+.1f us %s\n", p50, (p50 < 30) ? "ok" : "MISSED", \
				p99, (p99 < 100) ? "ok" : "MISSED"
		}
		wins = 0
		printf "  fast path vs plain relay:"
		for (i = 1; i <= nm; i++) {
			m = mets[i]; g = agg["gw", m]; f = agg["fp", m]
			better = lower_is_better(m) ? (f < g) : (f > g)
			printf " %s %+.0f%%", short[i], g ? (f - g) / g * 100 : 0
			wins += better
		}
		printf "\n"
		return wins
	}
	{ key = $1 SUBSEP $2; val[key, ++cnt[key]] = $3 }
	END {
		nm = split("bulk_up_MBps bulk_down_MBps bulk_both_MBps rr_p50_us rr_p99_us conn_per_s", mets, " ")
		split("bulk up (MB/s)|bulk down (MB/s)|bulk both ways (MB/s, sum)|latency p50 (us)|latency p99 (us)|connections/s", names, "|")
		split("up down both p50 p99 conn/s", short, " ")
		nmodes = split("direct gw fp", modes, " ")
		split("direct|gateway|gateway+fastpath|gateway+krelay", labels, "|")
		if (cnt["kr" SUBSEP "bulk_up_MBps"])
			nmodes = split("direct gw fp kr", modes, " ")
		rounds = cnt["direct" SUBSEP "bulk_up_MBps"]
		printf "\ntargets (DESIGN.md): relay >= 0.90x direct throughput; latency p50 +<30 us, p99 +<100 us\n"
		wm = block("median")
		wb = block("best")
		if (wm == nm && wb == nm)
			w = "gateway+fastpath: better than the plain relay on every metric (median and best)"
		else if (wm == 0 && wb == 0)
			w = "the plain relay: the fast path is better on no metric"
		else
			w = sprintf("mixed: the fast path is better on %d of %d metrics by median, %d by best round", wm, nm, wb)
		printf "\nwinner: %s\n", w
		if (cnt["gw" SUBSEP "idle_held"]) {
			printf "\nidle sessions (DESIGN.md: under 64 KiB of daemon memory each, 10,000 held):\n"
			for (k = 2; k <= nmodes; k++) {
				h = median(modes[k] SUBSEP "idle_held")
				x = median(modes[k] SUBSEP "idle_kib_per_session")
				printf "  %-18s %d held at once, %.1f KiB of daemon memory each %s\n", \
					labels[k] ":", h, x, (x < 64 && h >= 10000) ? "ok" : \
					(x < 64 ? "(memory ok; fewer than 10,000: the open-file limit)" : "MISSED")
			}
		}
	}' "$1"
}

# scripts/bench.sh --table FILE: only format the results kept in FILE (AGBENCH_KEEP).
if [ "${1:-}" = --table ] && [ -n "${2:-}" ]; then
	table "$2"
	exit
fi

[ "$(id -u)" -eq 0 ] || fail "must run as root (BPF programs and cgroups): sudo make bench"
for f in agbench agentgated agctl; do
	[ -x "$B/$f" ] || fail "$B/$f is missing: run make first"
done
CGROOT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CGROOT" ] || fail "no cgroup2 mount in /proc/mounts"
grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf ||
	fail "no bpffs at /sys/fs/bpf"

TAG=agbench-$$
WORK=$(mktemp -d "/tmp/$TAG.XXXXXX") || fail "mktemp failed"
WATCHDOG=
MODES="gw fp kr"
# The kernel relay (--kernel-relay on) is experimental: a fourth column only on request.
KRELAY=${AGBENCH_KRELAY:-0}

stop_daemon() { # mode
	pidf=$WORK/$1/pid
	[ -f "$pidf" ] || return 0
	pid=$(cat "$pidf")
	rm -f "$pidf"
	stop_pid "$pid" 0.2
}

cleanup() {
	trap - EXIT INT TERM HUP
	[ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
	for m in $MODES; do
		stop_daemon "$m"
		detach_pins "/sys/fs/bpf/$TAG-$m"
		kill_cgroup "$CGROOT/$TAG-$m"
	done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM HUP

free_port
SRVPORT=$PORT

start_daemon() { # mode port fastpath:on|off [kernel-relay:on|off]
	dir=$WORK/$1
	mkdir -p "$dir/state" && mkdir -p "$CGROOT/$TAG-$1" || fail "cannot create $CGROOT/$TAG-$1"
	cat >"$dir/policy.yaml" <<EOF
apiVersion: agentgate/v1
agents: [{name: bench, cgroup: /$TAG-$1}]
targets: [{name: sink, protocol: tcp, address: 127.0.0.2:$SRVPORT}]
default: deny
EOF
	"$B/agentgated" --foreground --config "$dir/policy.yaml" --state-dir "$dir/state" \
		--socket "$dir/ctl.sock" --bpffs "/sys/fs/bpf/$TAG-$1" --port "$2" \
		--fastpath "$3" --kernel-relay "${4:-off}" >"$dir/log" 2>&1 </dev/null &
	echo $! >"$dir/pid"
	i=0
	until grep -qs 'listening on' "$dir/log"; do
		if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null || [ $i -ge 100 ]; then
			cat "$dir/log" >&2
			fail "agentgated ($1) did not start"
		fi
		sleep 0.1
		i=$((i + 1))
	done
}

(
	trap 'kill "$spid" 2>/dev/null; exit 0' TERM
	sleep $LIMIT &
	spid=$!
	wait "$spid" && echo "bench: time limit ($LIMIT s) reached" >&2 && kill -TERM $$
) &
WATCHDOG=$!

free_port
start_daemon gw "$PORT" off
free_port
start_daemon fp "$PORT" on
if [ "$KRELAY" = 1 ]; then
	free_port
	start_daemon kr "$PORT" off on
fi

run() { # mode round test
	case $1 in
	direct) cg= ;;
	*) cg="--cgroup $CGROOT/$TAG-$1 --pid $(cat "$WORK/$1/pid")" ;;
	esac
	# shellcheck disable=SC2086
	"$B/agbench" --port "$SRVPORT" $cg --bytes "$BYTES" --rtts "$RTTS" --conns "$CONNS" \
		--idle "$((IDLE > 0 ? IDLE : 1))" --timeout 60 "$3" >"$WORK/out" 2>"$WORK/err" || {
		cat "$WORK/err" >&2
		[ "$1" = direct ] || tail -5 "$WORK/$1/log" >&2
		fail "agbench $3 failed in mode $1 (round $2)"
	}
	sed "s/^/$1 /" "$WORK/out" >>"$WORK/results"
}

echo "agentgate bench: $((BYTES / 1048576)) MiB bulk per direction, $RTTS round trips of 64 B," \
	"$CONNS connections, $ROUNDS rounds; each test runs in every mode back to back"
: >"$WORK/results"
r=1
order="direct gw fp"
[ "$KRELAY" = 1 ] && order="$order kr"
# Idle sessions first, while each daemon's heap is fresh (later tests leave it grown).
if [ "$IDLE" -gt 0 ]; then
	for m in $order; do
		[ "$m" = direct ] || run "$m" 0 idle
	done
	echo "  $IDLE idle sessions held in each gateway mode"
fi
while [ $r -le "$ROUNDS" ]; do
	for t in up down both rr conn; do
		for m in $order; do
			run $m $r $t
		done
		order="${order#* } ${order%% *}" # the next test starts with the next mode
	done
	echo "  round $r of $ROUNDS done"
	r=$((r + 1))
done

table "$WORK/results"
[ -n "${AGBENCH_KEEP:-}" ] && cp "$WORK/results" "$AGBENCH_KEEP"
exit 0
