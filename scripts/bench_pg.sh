#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# The PostgreSQL bench: pgbench against one throwaway PostgreSQL 15 (initdb as the postgres
# user into a temp dir, listening on 127.0.0.2 and 127.0.0.6, fsync off, pgbench -i -s 10) in
# four modes, side by side in one run:
#   direct     the client talks to the server;
#   pgbouncer  through PgBouncer in session mode (127.0.0.3, its own config, as postgres);
#   agentgate  the client in a tagged cgroup, through agentgated with full enforcement: a rule
#              with sql: rules allowing pgbench's statements and a mask: (a column rule and
#              the value detectors, so masking is active), and the daemon's session log;
#   relay      the same tagged client through the same daemon to a protocol: tcp target (the
#              server's second address, 127.0.0.6): bytes relayed, nothing parsed. Its ratio
#              is the floor of one user-space hop on this host: no enforcement can beat it.
# Workloads: -S (simple), -S -M prepared, TPC-B -M prepared, at a fixed client count; then one
# client (-S simple and -S prepared) for the added latency (pgbench's average, and p50/p99 from
# its per-transaction log). Each workload runs in the modes back to back, in turns, so that a
# noisy neighbour hits all of them alike; the tables give the median of the rounds, and the
# proxies' CPU time per transaction (user + system, from /proc), which a busy machine disturbs
# less than it does TPS. Targets (DESIGN.md): >= 0.80 of direct TPS and ahead of PgBouncer;
# p50 +<30 us, p99 +<100 us.
# Then TLS on both legs (AGBENCH_PG_TLS=1, the default): the server gets ssl = on with a
# certificate from a CA made here, the target tls: { client: terminate, upstream: verify-full };
# pgbench with sslmode=verify-full against the gateway CA (direct: against the test CA), -S on
# kept connections, and -S -C (a new connection, so a new handshake — two through the gateway —
# per transaction: handshakes per second), as ratios to direct TLS in a third table.
#
# Installs nothing, needs no terminal, and removes its server, PgBouncer, daemon, cgroups and
# pins on every exit; stops itself after AGBENCH_PG_LIMIT seconds (default 540; a default run
# takes about 5.5 minutes, 6.5 with the TLS part).
#
# Environment: AGBENCH_PG_T (seconds per throughput run, default 5), AGBENCH_PG_LAT_T (seconds
# per latency run, 4), AGBENCH_PG_ROUNDS (3), AGBENCH_PG_CLIENTS (8), AGBENCH_PG_THREADS (2),
# AGBENCH_PG_SCALE (10), AGBENCH_PG_LAT (1: run the one-client part, 0: skip it),
# AGBENCH_PG_IDLE (500: sessions held idle at once, first, for the daemon's memory per idle
# session; 0 skips it), AGBENCH_BUILD (build), AGBENCH_PG_DAEMON_ARGS (extra agentgated arguments, e.g.
# "--fastpath on"), AGBENCH_PG_KEEP=FILE keeps the raw results (scripts/bench_pg.sh --table FILE
# formats them again), AGBENCH_PERF=PREFIX records each gateway run with perf record -g into
# PREFIX.MODE-WORKLOAD-ROUND (for perf report).
set -u

cd "$(dirname "$0")/.." || exit 1
BENCH_NAME=bench_pg
. scripts/bench/lib.sh
B=${AGBENCH_BUILD:-build}
T=${AGBENCH_PG_T:-5}
LAT_T=${AGBENCH_PG_LAT_T:-4}
ROUNDS=${AGBENCH_PG_ROUNDS:-3}
CLIENTS=${AGBENCH_PG_CLIENTS:-8}
THREADS=${AGBENCH_PG_THREADS:-2}
SCALE=${AGBENCH_PG_SCALE:-10}
LAT=${AGBENCH_PG_LAT:-1}
IDLE=${AGBENCH_PG_IDLE:-500}
TLS=${AGBENCH_PG_TLS:-1}
LIMIT=${AGBENCH_PG_LIMIT:-540}
PGBIN=/usr/lib/postgresql/15/bin
PGBENCH=/usr/bin/pgbench
PSQL=/usr/bin/psql
PGBOUNCER=/usr/sbin/pgbouncer
PGADDR=127.0.0.2
PBADDR=127.0.0.3
RAWADDR=127.0.0.6
DB=bench

fail() {
	echo "bench_pg: $*" >&2
	exit 1
}

# The tables from "mode workload metric value" lines in file $1.
table() {
	awk '
function median(key,    n, i, j, v, x) {
	n = cnt[key]
	for (i = 1; i <= n; i++)
		v[i] = val[key, i]
	for (i = 2; i <= n; i++)
		for (j = i; j > 1 && v[j - 1] > v[j]; j--) {
			x = v[j]; v[j] = v[j - 1]; v[j - 1] = x
		}
	if (!n)
		return -1
	return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function m(mode, w, metric) { return median(mode SUBSEP w SUBSEP metric) }
$1 == "param" { clients = $2; threads = $3; t = $4; rounds = $5; lt = $6; next }
{ key = $1 SUBSEP $2 SUBSEP $3; val[key, ++cnt[key]] = $4 }
END {
	split("S SP TP", wls, " ")
	split("-S (simple)|-S -M prepared|TPC-B -M prepared", names, "|")
	printf "\nTPS, pgbench -c %d -j %d -T %d, median of %d round(s); target: agentgate >= 0.80x direct and ahead of pgbouncer\n", clients, threads, t, rounds
	printf "%-18s %9s %10s %6s %10s %6s  %-18s %-34s %10s %6s  %s\n", "workload", "direct", \
		"pgbouncer", "ratio", "agentgate", "ratio", "target", \
		"proxy CPU us/txn: pgbouncer, agentgate", "tcp relay", "ratio", "relay CPU us/txn"
	for (i = 1; i <= 3; i++) {
		w = wls[i]
		d = m("direct", w, "tps"); p = m("pgbouncer", w, "tps"); g = m("agentgate", w, "tps")
		rp = d > 0 ? p / d : 0
		rg = d > 0 ? g / d : 0
		verdict = ((rg >= 0.80) ? "ok" : "MISSED") ", " ((g > p) ? "ahead" : "behind")
		rr = m("relay", w, "tps")
		printf "%-18s %9.1f %10.1f %5.2fx %10.1f %5.2fx  %-18s %-34s %10s %6s  %.1f\n", names[i], d, \
			p, rp, g, rg, verdict, sprintf("%.1f, %.1f", m("pgbouncer", w, "cpu_us"), \
			m("agentgate", w, "cpu_us")), rr < 0 ? "-" : sprintf("%.1f", rr), \
			rr < 0 || d <= 0 ? "-" : sprintf("%.2fx", rr / d), m("relay", w, "cpu_us")
	}
	if (cnt["relay" SUBSEP "S" SUBSEP "tps"])
		printf "(tcp relay: the same daemon relaying the same bytes to a protocol: tcp target, nothing parsed or recorded but the session: the floor of one user-space hop here)\n"
	if (cnt["direct-tls" SUBSEP "S" SUBSEP "tps"]) {
		printf "\nTLS on both legs (verify-full), pgbench -c %d -j %d -T %d, median of %d round(s)\n", clients, threads, t, rounds
		printf "%-30s %11s %11s %6s  %s\n", "workload", "direct TLS", "agentgate", "ratio", \
			"agentgate CPU us/txn"
		split("S SC", tw, " ")
		split("-S, kept connections (TPS)|-S -C, handshakes per second", tn, "|")
		for (i = 1; i <= 2; i++) {
			d = m("direct-tls", tw[i], "tps"); g = m("agentgate-tls", tw[i], "tps")
			rg = d > 0 ? g / d : 0
			printf "%-30s %11.1f %11.1f %5.2fx  %.1f\n", tn[i], d, g, rg, \
				m("agentgate-tls", tw[i], "cpu_us")
		}
	}
	if (cnt["agentgate" SUBSEP "idle" SUBSEP "idle_held"])
		printf "\nidle sessions: %d held at once through the gateway, %.1f KiB of daemon memory each (DESIGN.md: under 64 KiB) %s\n", \
			m("agentgate", "idle", "idle_held"), m("agentgate", "idle", "idle_kib_per_session"), \
			m("agentgate", "idle", "idle_kib_per_session") < 64 ? "ok" : "MISSED"
	if (!cnt["direct" SUBSEP "S1" SUBSEP "tps"])
		exit
	printf "\nlatency, one client (-c 1 -j 1 -T %d), median of %d round(s); target: agentgate p50 +<30 us, p99 +<100 us\n", lt, rounds
	printf "%-18s %-10s %9s %8s %8s %8s  %8s %8s %8s\n", "workload", "mode", "TPS", "avg us", \
		"p50 us", "p99 us", "+avg", "+p50", "+p99"
	split("S1 SP1", lw, " ")
	split("-S (simple)|-S -M prepared", ln, "|")
	split("direct pgbouncer agentgate", lm, " ")
	for (i = 1; i <= 2; i++) {
		w = lw[i]
		a0 = m("direct", w, "lat_ms") * 1000
		p0 = m("direct", w, "p50_us"); q0 = m("direct", w, "p99_us")
		for (k = 1; k <= 3; k++) {
			mo = lm[k]
			av = m(mo, w, "lat_ms") * 1000
			p50 = m(mo, w, "p50_us"); p99 = m(mo, w, "p99_us")
			printf "%-18s %-10s %9.1f %8.1f %8.1f %8.1f", k == 1 ? ln[i] : "", mo, \
				m(mo, w, "tps"), av, p50, p99
			if (k == 1)
				printf "\n"
			else
				printf "  %+8.1f %+8.1f %+8.1f%s\n", av - a0, p50 - p0, p99 - q0, \
					mo != "agentgate" ? "" : sprintf("  p50 %s, p99 %s", \
					(p50 - p0 < 30) ? "ok" : "MISSED", (p99 - q0 < 100) ? "ok" : "MISSED")
		}
	}
}' "$1"
}

# scripts/bench_pg.sh --table FILE: only format the results kept in FILE (AGBENCH_PG_KEEP).
if [ "${1:-}" = --table ] && [ -n "${2:-}" ]; then
	table "$2"
	exit
fi

[ "$(id -u)" -eq 0 ] || fail "must run as root (BPF programs and cgroups)"
for f in agentgated agctl; do
	[ -x "$B/$f" ] || fail "$B/$f is missing: run make first"
done
for f in "$PGBIN/initdb" "$PGBIN/pg_ctl" "$PGBENCH" "$PSQL" "$PGBOUNCER" /usr/sbin/runuser \
	/usr/bin/timeout; do
	[ -x "$f" ] || fail "$f is missing (PostgreSQL 15, its client, pgbouncer)"
done
id postgres >/dev/null 2>&1 || fail "no postgres user"
CGROOT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CGROOT" ] || fail "no cgroup2 mount in /proc/mounts"
grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf ||
	fail "no bpffs at /sys/fs/bpf"

export PGCONNECT_TIMEOUT=10
TAG=agbenchpg-$$
WORK=$(mktemp -d "/tmp/$TAG.XXXXXX") || fail "mktemp failed"
CG_SRV=$CGROOT/$TAG-srv	 # PostgreSQL and PgBouncer
CG_CLI=$CGROOT/$TAG-cli	 # clients of the direct and pgbouncer modes (not tagged)
CG_AGENT=$CGROOT/$TAG-agent # clients of the agentgate mode (tagged by the policy)
PINS=/sys/fs/bpf/$TAG
WATCHDOG=
CHILD=
DPID=

cleanup() {
	trap - EXIT INT TERM HUP
	[ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
	[ -n "$CHILD" ] && kill -KILL "$CHILD" 2>/dev/null
	[ -n "$DPID" ] && stop_pid "$DPID"
	detach_pins "$PINS"
	if [ -f "$WORK/data/postmaster.pid" ]; then
		runuser -u postgres -- "$PGBIN/pg_ctl" stop -s -m immediate -w -t 10 \
			-D "$WORK/data" >/dev/null 2>&1 </dev/null
	fi
	kill_cgroup "$CG_AGENT"
	kill_cgroup "$CG_CLI"
	kill_cgroup "$CG_SRV"
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench_pg: interrupted" >&2; exit 130' INT TERM HUP

# Runs a command in the background and waits for it, so that a signal (the watchdog's) is
# handled at once instead of after the command. Its exit code.
run() {
	"$@" </dev/null &
	CHILD=$!
	wait "$CHILD"
	rc=$?
	CHILD=
	return $rc
}

# A command in cgroup $1 (a directory), as the user $2 ("-": root).
in_cgroup() {
	cg=$1 user=$2
	shift 2
	if [ "$user" = - ]; then
		sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "$@"
	else
		sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec runuser -u "$0" -- "$@"' \
			"$user" "$cg" "$@"
	fi
}

(
	trap 'kill "$spid" 2>/dev/null; exit 0' TERM
	sleep "$LIMIT" &
	spid=$!
	wait "$spid" && echo "bench_pg: time limit ($LIMIT s) reached" >&2 && kill -TERM $$
) &
WATCHDOG=$!

mkdir "$CG_SRV" "$CG_CLI" "$CG_AGENT" || fail "cannot create cgroups under $CGROOT"
chown postgres "$WORK" && chmod 700 "$WORK" || fail "chown $WORK"

# --- PostgreSQL ---------------------------------------------------------------------------------
free_port
PGPORT=$PORT
run in_cgroup "$CG_SRV" postgres "$PGBIN/initdb" -D "$WORK/data" -A trust -U postgres -E UTF8 \
	--locale=C --no-sync >"$WORK/initdb.log" 2>&1 || {
	cat "$WORK/initdb.log" >&2
	fail "initdb failed"
}
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = '$PGADDR,$RAWADDR'
port = $PGPORT
unix_socket_directories = '$WORK'
max_connections = $((IDLE + 50))
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
autovacuum = off
checkpoint_timeout = 30min
max_wal_size = 4GB
log_min_messages = warning
EOF
printf 'local all all trust\nhost all all 127.0.0.0/8 trust\n' >"$WORK/data/pg_hba.conf"
run in_cgroup "$CG_SRV" postgres "$PGBIN/pg_ctl" start -w -s -t 60 -D "$WORK/data" \
	-l "$WORK/server.log" >/dev/null 2>&1 || {
	cat "$WORK/server.log" >&2
	fail "PostgreSQL did not start"
}
run "$PSQL" -X -q -h "$WORK" -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE $DB" \
	>/dev/null || fail "CREATE DATABASE failed"
echo "bench_pg: pgbench -i -s $SCALE ..."
run in_cgroup "$CG_CLI" - "$PGBENCH" -i -q -s "$SCALE" -h "$PGADDR" -p "$PGPORT" -U postgres \
	"$DB" >"$WORK/init.log" 2>&1 || {
	cat "$WORK/init.log" >&2
	fail "pgbench -i failed"
}

# --- PgBouncer, session mode ------------------------------------------------------------------
free_port
PBPORT=$PORT
printf '"postgres" ""\n' >"$WORK/userlist.txt"
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
$DB = host=$PGADDR port=$PGPORT dbname=$DB
[pgbouncer]
listen_addr = $PBADDR
listen_port = $PBPORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
chown postgres "$WORK/userlist.txt" "$WORK/pgbouncer.ini"
in_cgroup "$CG_SRV" postgres "$PGBOUNCER" -q "$WORK/pgbouncer.ini" </dev/null \
	>"$WORK/pgbouncer.out" 2>&1 &
i=0
until timeout 10 "$PSQL" -X -q -A -t -h "$PBADDR" -p "$PBPORT" -U postgres -d "$DB" -c 'SELECT 1' \
	</dev/null >/dev/null 2>&1; do
	if [ $i -ge 50 ]; then
		cat "$WORK/pgbouncer.out" "$WORK/pgbouncer.log" >&2 2>/dev/null
		fail "PgBouncer did not start"
	fi
	sleep 0.2
	i=$((i + 1))
done

# --- agentgated, full enforcement ------------------------------------------------------------
mkdir -p "$WORK/gw/state" || fail "mkdir"
free_port
GWPORT=$PORT
cat >"$WORK/gw/policy.yaml" <<EOF
apiVersion: agentgate/v1
agents:
  - name: bench
    cgroup: /$TAG-agent
    mode: enforce
targets:
  - name: db
    protocol: postgres
    address: $PGADDR:$PGPORT
  - name: dbraw
    protocol: tcp
    address: $RAWADDR:$PGPORT
rules:
  - agent: bench
    target: db
    sql:
      - { name: no-unbounded-writes, when: { command: [update, delete], where: absent }, then: deny }
      - { name: pgbench, when: { command: [select, insert, update, begin, commit, set, show] }, then: allow }
    mask:
      columns: [pgbench_accounts.filler, "*.ssn"]
      detectors: [email, credit-card, ssn, phone, jwt, aws-key, private-key]
      style: redact
default: deny
EOF
# shellcheck disable=SC2086
"$B/agentgated" --foreground --config "$WORK/gw/policy.yaml" --state-dir "$WORK/gw/state" \
	--socket "$WORK/gw/ctl.sock" --bpffs "$PINS" --port "$GWPORT" \
	${AGBENCH_PG_DAEMON_ARGS:-} >"$WORK/gw/log" 2>&1 </dev/null &
DPID=$!
i=0
until grep -qs 'listening on' "$WORK/gw/log"; do
	if ! kill -0 "$DPID" 2>/dev/null || [ $i -ge 100 ]; then
		cat "$WORK/gw/log" >&2
		fail "agentgated did not start"
	fi
	sleep 0.1
	i=$((i + 1))
done
# The gateway answers, with masking: a value the detectors catch comes back redacted.
out=$(in_cgroup "$CG_AGENT" - timeout 20 "$PSQL" -X -q -A -t -h "$PGADDR" -p "$PGPORT" -U postgres \
	-d "$DB" -c "SELECT 'x@example.com'" 2>&1)
[ "$out" = "[REDACTED:email]" ] || {
	tail -20 "$WORK/gw/log" >&2
	fail "the gateway did not mask as expected (got: $out)"
}

# --- the runs ------------------------------------------------------------------------------------
RES=$WORK/results
echo "param $CLIENTS $THREADS $T $ROUNDS $LAT_T" >"$RES"

# An idle session's cost, first, while the daemon's heap is fresh: IDLE sessions (a query and a
# commit each) held at once, and the growth of the daemon's resident memory.
if [ "$IDLE" -gt 0 ]; then
	run in_cgroup "$CG_AGENT" - /usr/bin/python3 scripts/bench/idle.py pg --pid "$DPID" \
		-n "$IDLE" --host "$PGADDR" --port "$PGPORT" --db "$DB" >"$WORK/idle" 2>"$WORK/idle.err" || {
		cat "$WORK/idle.err" >&2
		fail "holding $IDLE idle sessions through the gateway failed"
	}
	sed 's/^/agentgate idle /' "$WORK/idle" >>"$RES"
	echo "  $IDLE idle sessions held through the gateway"
fi

# pgbench in a mode; its results go to $RES as "mode workload metric value" lines. Workloads:
# S, SP, TP; S1 and SP1 are S and SP at one client, with per-transaction logs.
pgb() { # mode workload round clients threads seconds [log prefix]
	# (sh has no locals: the names here are used nowhere else)
	p_mode=$1 p_wl=$2 p_round=$3 p_c=$4 p_j=$5 p_t=$6 p_log=${7:-}
	case $p_wl in
	S | S1) args="-S" ;;
	SC) args="-S -C" ;;
	SP | SP1) args="-S -M prepared" ;;
	TP) args="-M prepared" ;;
	esac
	p_env=PGSSLMODE=prefer
	case $p_mode in
	direct) p_cg=$CG_CLI p_host=$PGADDR p_port=$PGPORT ;;
	pgbouncer) p_cg=$CG_CLI p_host=$PBADDR p_port=$PBPORT ;;
	agentgate) p_cg=$CG_AGENT p_host=$PGADDR p_port=$PGPORT ;;
	relay) p_cg=$CG_AGENT p_host=$RAWADDR p_port=$PGPORT ;;
	direct-tls) p_cg=$CG_CLI p_host=$PGADDR p_port=$PGPORT
		p_env="PGSSLMODE=verify-full PGSSLROOTCERT=$WORK/tls/ca.crt" ;;
	agentgate-tls) p_cg=$CG_AGENT p_host=$PGADDR p_port=$PGPORT
		p_env="PGSSLMODE=verify-full PGSSLROOTCERT=$WORK/gw/state/ca/ca.crt" ;;
	esac
	[ -n "$p_log" ] && args="$args -l --log-prefix=$p_log"
	p_pid=
	case $p_mode in
	pgbouncer) p_pid=$(cat "$WORK/pgbouncer.pid" 2>/dev/null) ;;
	agentgate | agentgate-tls | relay) p_pid=$DPID ;;
	esac
	p_cpu0=$(cpu_ticks "$p_pid")
	case $p_mode in agentgate*) perf_start "$p_mode-$p_wl-$p_round" "$p_pid" "$p_t" ;; esac
	# shellcheck disable=SC2086
	run in_cgroup "$p_cg" - env $p_env "$PGBENCH" -n $args -c "$p_c" -j "$p_j" -T "$p_t" \
		-h "$p_host" -p "$p_port" -U postgres "$DB" >"$WORK/out" 2>"$WORK/err"
	rc=$?
	p_cpu1=$(cpu_ticks "$p_pid")
	perf_wait
	tps=$(awk '/^tps = / { print $3; exit }' "$WORK/out")
	txns=$(awk '/^number of transactions actually processed: / { print $6; exit }' "$WORK/out")
	lat=$(awk '/^latency average = / { print $4; exit }' "$WORK/out")
	failed=$(awk '/^number of failed transactions: / { print $5; exit }' "$WORK/out")
	if [ $rc -ne 0 ] || [ -z "$tps" ] || [ "${failed:-0}" != 0 ]; then
		cat "$WORK/out" "$WORK/err" >&2
		case $p_mode in agentgate*) tail -20 "$WORK/gw/log" >&2 ;; esac
		fail "pgbench $args failed in mode $p_mode (round $p_round)"
	fi
	echo "$p_mode $p_wl tps $tps" >>"$RES"
	echo "$p_mode $p_wl lat_ms $lat" >>"$RES"
	# The proxy's CPU time (user + system, all threads) per transaction.
	[ -n "$p_pid" ] && [ "${txns:-0}" -gt 0 ] &&
		awk -v m="$p_mode" -v w="$p_wl" -v t=$((p_cpu1 - p_cpu0)) -v hz="$TCK" -v n="$txns" \
			'BEGIN { printf "%s %s cpu_us %.1f\n", m, w, t * 1000000 / hz / n }' >>"$RES"
	if [ -n "$p_log" ]; then
		cat "$p_log".* | awk '{ print $3 }' | sort -n | awk -v m="$p_mode" -v w="$p_wl" '
			{ v[NR] = $1 }
			END {
				if (!NR)
					exit
				i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
				i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
				printf "%s %s p50_us %s\n%s %s p99_us %s\n", m, w, v[i50], m, w, v[i99]
			}' >>"$RES"
		rm -f "$p_log".*
	fi
}

echo "agentgate PostgreSQL bench: pgbench -c $CLIENTS -j $THREADS -T $T, scale $SCALE," \
	"$ROUNDS round(s); modes run back to back in turns"
order="direct pgbouncer agentgate relay"
r=1
while [ "$r" -le "$ROUNDS" ]; do
	for wl in S SP TP; do
		for m in $order; do
			pgb "$m" "$wl" "$r" "$CLIENTS" "$THREADS" "$T"
		done
		order="${order#* } ${order%% *}"
	done
	echo "  round $r of $ROUNDS done"
	r=$((r + 1))
done
if [ "$LAT" = 1 ]; then
	order="direct pgbouncer agentgate"
	r=1
	while [ "$r" -le "$ROUNDS" ]; do
		for wl in S SP; do
			for m in $order; do
				pgb "$m" "${wl}1" "$r" 1 1 "$LAT_T" "$WORK/lat-$m-$wl"
			done
			order="${order#* } ${order%% *}"
		done
		r=$((r + 1))
	done
	echo "  latency runs done"
fi

# --- TLS on both legs ------------------------------------------------------------------------------
tls_setup() {
	mkdir -p "$WORK/tls" && cd "$WORK/tls" || return 1
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
		-out ca.crt -subj /CN=bench-ca -days 2 -addext basicConstraints=critical,CA:TRUE \
		-addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key \
		-out server.csr -subj /CN=bench-db 2>/dev/null &&
	printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$PGADDR" >server.ext &&
	openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
		-extfile server.ext -out server.crt 2>/dev/null || return 1
	cd - >/dev/null || return 1
	chmod 0755 "$WORK/tls" && chmod 0644 "$WORK/tls/ca.crt"
	cp "$WORK/tls/server.crt" "$WORK/tls/server.key" "$WORK/data/" &&
		chown postgres "$WORK/data/server.crt" "$WORK/data/server.key" &&
		chmod 0600 "$WORK/data/server.key" || return 1
	run "$PSQL" -X -q -h "$WORK" -p "$PGPORT" -U postgres -d postgres \
		-c "ALTER SYSTEM SET ssl = on" >/dev/null &&
		run runuser -u postgres -- "$PGBIN/pg_ctl" reload -s -D "$WORK/data" >/dev/null ||
		return 1
	awk -v a="    address: $PGADDR:$PGPORT" -v ca="$WORK/tls/ca.crt" '{ print }
		$0 == a { print "    tls: { client: terminate, upstream: verify-full, ca_file: " ca " }" }' \
		"$WORK/gw/policy.yaml" >"$WORK/gw/policy.new" &&
		mv "$WORK/gw/policy.new" "$WORK/gw/policy.yaml" || return 1
	n=$(grep -c ' reloaded (' "$WORK/gw/log")
	kill -HUP "$DPID"
	i=0
	until [ "$(grep -c ' reloaded (' "$WORK/gw/log")" -gt "$n" ]; do
		[ $i -ge 50 ] && return 1
		sleep 0.1
		i=$((i + 1))
	done
	sleep 0.3
	out=$(in_cgroup "$CG_AGENT" - env PGSSLMODE=verify-full \
		PGSSLROOTCERT="$WORK/gw/state/ca/ca.crt" timeout 20 "$PSQL" -X -q -A -t \
		-h "$PGADDR" -p "$PGPORT" -U postgres -d "$DB" \
		-c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1)
	[ "$out" = t ] || {
		echo "bench_pg: TLS through the gateway: $out" >&2
		tail -5 "$WORK/gw/log" >&2
		return 1
	}
}
if [ "$TLS" = 1 ]; then
	tls_setup || fail "TLS setup failed"
	order="direct-tls agentgate-tls"
	r=1
	while [ "$r" -le "$ROUNDS" ]; do
		for wl in S SC; do
			for m in $order; do
				pgb "$m" "$wl" "$r" "$CLIENTS" "$THREADS" "$T"
			done
			order="${order#* } ${order%% *}"
		done
		r=$((r + 1))
	done
	echo "  TLS runs done"
fi

table "$RES"
st=$(grep -c '"event": *"end"' "$WORK/gw/state/sessions.log" 2>/dev/null)
echo
echo "agentgate sessions logged: ${st:-0} ended; daemon: $(grep -c . "$WORK/gw/log") log lines"
[ -n "${AGBENCH_PG_KEEP:-}" ] && cp "$RES" "$AGBENCH_PG_KEEP"
exit 0
