#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# The HTTP bench: wrk against one static upstream (nginx serving files from a temp dir on
# 127.0.0.4, worker_processes 2) in four modes, side by side in one run:
#   direct     wrk talks to the upstream;
#   nginx      through nginx as a reverse proxy (127.0.0.5, worker_processes 2, upstream
#              keepalive), the usual way to put a proxy in front of an HTTP API;
#   agentgate  wrk in a tagged cgroup, through agentgated with full enforcement: http: rules
#              decided per request (first match, default deny), the agent's requests rebuilt
#              and re-framed, and for the JSON workload a mask: (keys and detectors) applied to
#              the streamed body — which nginx does not do;
#   relay      the 1 KiB file through the same daemon to a protocol: tcp target (the upstream's
#              third port): bytes relayed, nothing parsed. The floor of the hop on this host.
# Workloads: a 1 KiB text file and a 4 KiB JSON document, and the 1 KiB file over HTTPS with TLS
# on both legs (certificates from a throwaway CA): direct https to the upstream's TLS port,
# nginx terminating TLS and proxying over https (keepalive, session reuse, no upstream
# verification), agentgate terminating the agent's TLS (tls: client: terminate, a leaf minted
# for the address) and verifying the upstream (verify-full against the CA). Each runs in the
# modes back to back, in turns, so that a noisy neighbour hits all of them alike; the table
# gives the median of the rounds, the ratios to direct and to nginx, and each proxy's CPU time
# (user + system) per request. Target (issue 6): agentgate at or above nginx's proxy
# throughput on the same core count.
#
# Installs nothing, needs no terminal, removes its servers, daemon, cgroups and pins on every
# exit; stops itself after AGBENCH_HTTP_LIMIT seconds (default 260).
# Environment: AGBENCH_HTTP_T (seconds per run, 5), AGBENCH_HTTP_ROUNDS (3),
# AGBENCH_HTTP_CONNS (32), AGBENCH_HTTP_THREADS (2), AGBENCH_HTTP_IDLE (500: keep-alive
# sessions held idle at once through the gateway, plain then TLS, first, for the daemon's memory
# per idle session; 0 skips it), AGBENCH_BUILD (build), AGBENCH_HTTP_DAEMON_ARGS (extra
# agentgated arguments, e.g. "--workers 1"), AGBENCH_PERF (a path prefix: each
# agentgate run is recorded with perf record -g into PREFIX.WORKLOAD, for perf report).
set -u

cd "$(dirname "$0")/.." || exit 1
BENCH_NAME=bench_http
. scripts/bench/lib.sh
B=${AGBENCH_BUILD:-build}
T=${AGBENCH_HTTP_T:-5}
ROUNDS=${AGBENCH_HTTP_ROUNDS:-3}
CONNS=${AGBENCH_HTTP_CONNS:-32}
THREADS=${AGBENCH_HTTP_THREADS:-2}
LIMIT=${AGBENCH_HTTP_LIMIT:-260}
IDLE=${AGBENCH_HTTP_IDLE:-500}
NGINX=/usr/sbin/nginx
WRK=/usr/bin/wrk
UPADDR=127.0.0.4
PXADDR=127.0.0.5

fail() {
	echo "bench_http: $*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || fail "must run as root (BPF programs and cgroups)"
for f in "$B/agentgated" "$B/agctl" "$NGINX" "$WRK" /usr/bin/curl; do
	[ -x "$f" ] || fail "$f is missing (make; nginx-light, wrk, curl)"
done
CGROOT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CGROOT" ] || fail "no cgroup2 mount in /proc/mounts"
grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf ||
	fail "no bpffs at /sys/fs/bpf"

TAG=agbenchhttp-$$
WORK=$(mktemp -d "/tmp/$TAG.XXXXXX") || fail "mktemp failed"
chmod 755 "$WORK"
CG_SRV=$CGROOT/$TAG-srv
CG_CLI=$CGROOT/$TAG-cli
CG_AGENT=$CGROOT/$TAG-agent
PINS=/sys/fs/bpf/$TAG
WATCHDOG=
DPID=
NG_UP=
NG_PX=

cleanup() {
	trap - EXIT INT TERM HUP
	[ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
	[ -n "$DPID" ] && stop_pid "$DPID"
	detach_pins "$PINS"
	for p in $NG_UP $NG_PX; do
		kill -TERM "$p" 2>/dev/null
	done
	kill_cgroup "$CG_AGENT"
	kill_cgroup "$CG_CLI"
	kill_cgroup "$CG_SRV"
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench_http: interrupted" >&2; exit 130' INT TERM HUP

in_cgroup() { # cgroup dir, command...
	cg=$1
	shift
	sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "$@"
}

wait_http() { # url what
	i=0
	# shellcheck disable=SC2086 # $1 may carry curl options
	until curl -sf -o /dev/null --max-time 2 $1; do
		[ $i -ge 50 ] && fail "$2 did not answer"
		sleep 0.1
		i=$((i + 1))
	done
}

(
	trap 'kill "$spid" 2>/dev/null; exit 0' TERM
	sleep "$LIMIT" &
	spid=$!
	wait "$spid" && echo "bench_http: time limit ($LIMIT s) reached" >&2 && kill -TERM $$
) &
WATCHDOG=$!

mkdir "$CG_SRV" "$CG_CLI" "$CG_AGENT" || fail "cannot create cgroups under $CGROOT"
mkdir -p "$WORK/www" "$WORK/up" "$WORK/px" "$WORK/gw/state" "$WORK/pki" || fail "mkdir"
(
	cd "$WORK/pki" || exit 1
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
		-out ca.crt -subj /CN=benchca -days 2 -addext basicConstraints=critical,CA:TRUE \
		-addext keyUsage=critical,keyCertSign,cRLSign || exit 1
	for n in up:$UPADDR px:$PXADDR; do
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "${n%%:*}.key" \
			-out "${n%%:*}.csr" -subj "/CN=${n%%:*}" || exit 1
		printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
			"${n#*:}" >"${n%%:*}.ext"
		openssl x509 -req -in "${n%%:*}.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
			-extfile "${n%%:*}.ext" -out "${n%%:*}.crt" || exit 1
	done
	chmod 0644 ./*.crt ./*.key
) >/dev/null 2>&1 || fail "openssl could not make the test certificates"
awk 'BEGIN { for (i = 0; i < 1024; i++) printf "%c", 97 + i % 26 }' >"$WORK/www/1k.txt"
awk 'BEGIN {
	printf "{\"kind\":\"UserList\",\"items\":["
	for (i = 0; i < 40; i++)
		printf "%s{\"id\":%d,\"name\":\"user-%d\",\"email\":\"user%d@example.com\",\"note\":\"n\"}", \
			i ? "," : "", i, i, i
	printf "]}\n"
}' >"$WORK/www/users.json"
chmod -R a+rX "$WORK/www"

free_port 30000
UPPORT=$PORT
free_port 30000
UPTLS=$PORT
free_port 30000
UPRAW=$PORT
cat >"$WORK/up/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/up/nginx.pid;
error_log $WORK/up/error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	types { text/plain txt; application/json json; }
	client_body_temp_path $WORK/up;
	proxy_temp_path $WORK/up;
	fastcgi_temp_path $WORK/up;
	uwsgi_temp_path $WORK/up;
	scgi_temp_path $WORK/up;
	keepalive_requests 1000000;
	server { listen $UPADDR:$UPPORT; root $WORK/www; }
	server { listen $UPADDR:$UPRAW; root $WORK/www; }
	server {
		listen $UPADDR:$UPTLS ssl;
		ssl_certificate $WORK/pki/up.crt;
		ssl_certificate_key $WORK/pki/up.key;
		root $WORK/www;
	}
}
EOF
free_port 30000
PXPORT=$PORT
free_port 30000
PXTLS=$PORT
cat >"$WORK/px/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/px/nginx.pid;
error_log $WORK/px/error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	client_body_temp_path $WORK/px;
	proxy_temp_path $WORK/px;
	fastcgi_temp_path $WORK/px;
	uwsgi_temp_path $WORK/px;
	scgi_temp_path $WORK/px;
	keepalive_requests 1000000;
	upstream up { server $UPADDR:$UPPORT; keepalive 64; }
	upstream ups { server $UPADDR:$UPTLS; keepalive 64; }
	server {
		listen $PXADDR:$PXTLS ssl;
		ssl_certificate $WORK/pki/px.crt;
		ssl_certificate_key $WORK/pki/px.key;
		location / {
			proxy_pass https://ups;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_ssl_session_reuse on;
		}
	}
	server {
		listen $PXADDR:$PXPORT;
		location / {
			proxy_pass http://up;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
		}
	}
}
EOF
in_cgroup "$CG_SRV" "$NGINX" -e "$WORK/up/error.log" -p "$WORK/up" -c "$WORK/up/nginx.conf" \
	</dev/null >/dev/null 2>&1 &
NG_UP=$!
in_cgroup "$CG_SRV" "$NGINX" -e "$WORK/px/error.log" -p "$WORK/px" -c "$WORK/px/nginx.conf" \
	</dev/null >/dev/null 2>&1 &
NG_PX=$!
wait_http "http://$UPADDR:$UPPORT/1k.txt" "the nginx upstream"
wait_http "http://$PXADDR:$PXPORT/1k.txt" "the nginx proxy"
wait_http "https://$UPADDR:$UPTLS/1k.txt --cacert $WORK/pki/ca.crt" "the nginx upstream (TLS)"
wait_http "https://$PXADDR:$PXTLS/1k.txt --cacert $WORK/pki/ca.crt" "the nginx proxy (TLS)"

free_port 30000
GWPORT=$PORT
cat >"$WORK/gw/policy.yaml" <<EOF
apiVersion: agentgate/v1
agents:
  - name: bench
    cgroup: /$TAG-agent
targets:
  - name: web
    protocol: http
    address: $UPADDR:$UPPORT
  - name: webraw
    protocol: tcp
    address: $UPADDR:$UPRAW
  - name: webtls
    protocol: http
    address: $UPADDR:$UPTLS
    tls: { client: terminate, upstream: verify-full, ca_file: $WORK/pki/ca.crt }
rules:
  - agent: bench
    target: web
    http:
      - { name: no-admin, when: { path: ["/admin/*"] }, then: deny }
      - { name: reads, when: { method: [GET, HEAD] }, then: allow }
    mask:
      keys: [ssn, password]
      detectors: [email, credit-card, jwt, aws-key]
      style: redact
  - agent: bench
    target: webtls
    http:
      - { name: no-admin, when: { path: ["/admin/*"] }, then: deny }
      - { name: reads, when: { method: [GET, HEAD] }, then: allow }
default: deny
EOF
# shellcheck disable=SC2086 # extra arguments are words
"$B/agentgated" --foreground --config "$WORK/gw/policy.yaml" --state-dir "$WORK/gw/state" \
	--socket "$WORK/gw/ctl.sock" --bpffs "$PINS" --port "$GWPORT" \
	${AGBENCH_HTTP_DAEMON_ARGS:-} >"$WORK/gw/log" 2>&1 </dev/null &
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
out=$(in_cgroup "$CG_AGENT" curl -s --max-time 10 "http://$UPADDR:$UPPORT/users.json")
case "$out" in
*"user1@example.com"* | "") fail "the gateway did not mask as expected (got: $out)" ;;
esac
GWCA=$WORK/gw/state/ca/ca.crt
out=$(in_cgroup "$CG_AGENT" curl -sS --max-time 10 --cacert "$GWCA" "https://$UPADDR:$UPTLS/1k.txt" 2>&1)
case "$out" in
abcdefghij*) ;;
*) fail "https through the gateway failed (got: $out)" ;;
esac

RES=$WORK/results
: >"$RES"
# An idle session's cost, first, while the daemon's heap is fresh: IDLE keep-alive sessions
# (one request each) held at once, plain then TLS on both legs, and the growth of the daemon's
# resident memory.
if [ "$IDLE" -gt 0 ]; then
	for k in http https; do
		port=$UPPORT
		[ $k = https ] && port=$UPTLS
		in_cgroup "$CG_AGENT" /usr/bin/python3 scripts/bench/idle.py $k --pid "$DPID" -n "$IDLE" \
			--host "$UPADDR" --port "$port" --path /1k.txt --cafile "$GWCA" \
			>"$WORK/idle" 2>"$WORK/idle.err" || {
			cat "$WORK/idle.err" >&2
			fail "holding $IDLE idle $k sessions through the gateway failed"
		}
		awk -v k=$k '{ printf "idle-%s %s %s\n", k, $1, $2 }' "$WORK/idle" >>"$RES"
	done
	echo "bench_http: $IDLE idle sessions held through the gateway, plain and TLS"
fi
# wrk from a cgroup: "mode workload rps" to $RES, and for a proxy "mode-cpu workload us" (its
# CPU time, user + system of all its processes, per request: a busy machine disturbs it less).
run_wrk() { # mode workload cgroup url [proxy pid...]
	w_mode=$1 w_wl=$2 w_cg=$3 w_url=$4
	shift 4
	w_c0=$(cpu_ticks "$@")
	[ "$w_mode" = agentgate ] && perf_start "$w_wl" "$DPID" "$T"
	w_out=$(in_cgroup "$w_cg" "$WRK" -t"$THREADS" -c"$CONNS" -d"${T}s" "$w_url" 2>/dev/null)
	w_c1=$(cpu_ticks "$@")
	perf_wait
	echo "$w_out" | awk -v m="$w_mode" -v w="$w_wl" -v t=$((w_c1 - w_c0)) -v hz="$TCK" \
		-v proxy=$# '
		/ requests in / { n = $1 }
		/^Requests\/sec:/ { r = $2 }
		END {
			printf "%s %s %s\n", m, w, r + 0
			if (proxy && n > 0)
				printf "%s-cpu %s %.1f\n", m, w, t * 1000000 / hz / n
		}' >>"$RES"
}
# nginx's proxy: its master and workers.
nginx_pids() {
	m=$(cat "$WORK/px/nginx.pid" 2>/dev/null)
	[ -n "$m" ] && echo "$m $(pgrep -P "$m" | tr '\n' ' ')"
}
echo "bench_http: wrk -t$THREADS -c$CONNS -d${T}s, $ROUNDS round(s) ..."
r=1
while [ $r -le "$ROUNDS" ]; do
	# shellcheck disable=SC2046 # the pids are words
	for w in 1k.txt users.json; do
		run_wrk direct $w "$CG_CLI" "http://$UPADDR:$UPPORT/$w"
		run_wrk nginx $w "$CG_CLI" "http://$PXADDR:$PXPORT/$w" $(nginx_pids)
		run_wrk agentgate $w "$CG_AGENT" "http://$UPADDR:$UPPORT/$w" "$DPID"
	done
	run_wrk relay 1k.txt "$CG_AGENT" "http://$UPADDR:$UPRAW/1k.txt" "$DPID"
	run_wrk direct tls "$CG_CLI" "https://$UPADDR:$UPTLS/1k.txt"
	# shellcheck disable=SC2046 # the pids are words
	run_wrk nginx tls "$CG_CLI" "https://$PXADDR:$PXTLS/1k.txt" $(nginx_pids)
	run_wrk agentgate tls "$CG_AGENT" "https://$UPADDR:$UPTLS/1k.txt" "$DPID"
	r=$((r + 1))
done

awk -v conns="$CONNS" -v threads="$THREADS" -v t="$T" -v rounds="$ROUNDS" '
function median(key,    n, i, j, v, x) {
	n = cnt[key]
	for (i = 1; i <= n; i++)
		v[i] = val[key, i]
	for (i = 2; i <= n; i++)
		for (j = i; j > 1 && v[j - 1] > v[j]; j--) {
			x = v[j]; v[j] = v[j - 1]; v[j - 1] = x
		}
	return n ? (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2) : 0
}
function ratio(a, b) { if (b == 0) return 0; return a / b }
NF == 3 { key = $1 SUBSEP $2; val[key, ++cnt[key]] = $3 + 0 }
END {
	printf "\nHTTP requests/s, wrk -t%d -c%d -d%ds, median of %d round(s); target: agentgate >= nginx (reverse proxy)\n", threads, conns, t, rounds
	printf "%-24s %10s %10s %7s %10s %7s %8s  %-7s %s\n", "workload", "direct", "nginx", "ratio", \
		"agentgate", "ratio", "vs nginx", "target", "proxy CPU us/req: nginx, agentgate"
	split("1k.txt users.json tls", ws, " ")
	split("1 KiB text|4 KiB JSON (gw masks)|1 KiB text, TLS both legs", names, "|")
	for (i = 1; i <= 3; i++) {
		d = median("direct" SUBSEP ws[i]); n = median("nginx" SUBSEP ws[i])
		g = median("agentgate" SUBSEP ws[i])
		printf "%-24s %10.0f %10.0f %6.2fx %10.0f %6.2fx %7.2fx  %-7s %.1f, %.1f\n", names[i], \
			d, n, ratio(n, d), g, ratio(g, d), ratio(g, n), (g >= n) ? "ok" : "MISSED", \
			median("nginx-cpu" SUBSEP ws[i]), median("agentgate-cpu" SUBSEP ws[i])
	}
	if (cnt["relay" SUBSEP "1k.txt"]) {
		d = median("direct" SUBSEP "1k.txt"); n = median("nginx" SUBSEP "1k.txt")
		g = median("relay" SUBSEP "1k.txt")
		printf "%-24s %10.0f %10.0f %6.2fx %10.0f %6.2fx %7.2fx  %-7s %.1f, %.1f\n", \
			"1 KiB text, tcp relay", d, n, ratio(n, d), g, ratio(g, d), ratio(g, n), "-", \
			median("nginx-cpu" SUBSEP "1k.txt"), median("relay-cpu" SUBSEP "1k.txt")
		printf "(tcp relay: the same daemon relaying the same bytes to a protocol: tcp target, nothing parsed: the floor of the hop)\n"
	}
	for (i = 1; i <= 2; i++) {
		k = i == 1 ? "http" : "https"
		if (!cnt["idle-" k SUBSEP "idle_held"])
			continue
		x = median("idle-" k SUBSEP "idle_kib_per_session")
		printf "%sidle %s sessions: %d held at once through the gateway, %.1f KiB of daemon memory each (DESIGN.md: under 64 KiB) %s\n", \
			i == 1 ? "\n" : "", k == "http" ? "HTTP" : "HTTPS (TLS both legs)", \
			median("idle-" k SUBSEP "idle_held"), x, x < 64 ? "ok" : "MISSED"
	}
}' "$RES"
