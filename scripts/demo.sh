#!/bin/bash
# The data-path story in two minutes, on loopback only: a tagged "agent" reaches its allowed
# target through agentgated (identity from the kernel, session on record), is refused elsewhere,
# cannot go around the gateway, and stays fenced in while the daemon is down.
# (The PostgreSQL story — masking, blocking, approval, replay — joins as those handlers land.)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo: run as root (sudo make demo)" >&2; exit 1; }

B=build
T=$(mktemp -d /tmp/agentgate-demo.XXXXXX)
CG2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CG2" ] || { echo "demo: no cgroup2 mount" >&2; exit 1; }
CG=/agentgate-demo-$$
PIN=/sys/fs/bpf/agentgate-demo-$$
SOCK=$T/agentgate.sock
PORT=${DEMO_PORT:-17930}
DPID=""
SPID=""

cleanup() {
	set +e
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
	[ -n "$SPID" ] && kill "$SPID" 2>/dev/null
	$B/agctl -B "$PIN" prog detach >/dev/null 2>&1
	if [ -d "$CG2$CG" ]; then
		find "$CG2$CG" -depth -type d -exec rmdir {} + 2>/dev/null
	fi
	rm -rf "$T"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@" || true; }

start_daemon() {
	$B/agentgated --foreground --config "$T/policy.yaml" --state-dir "$T/state" \
		--socket "$SOCK" --bpffs "$PIN" --port "$PORT" --log-level warn &
	DPID=$!
	for _ in $(seq 50); do
		$B/agctl -S "$SOCK" session list >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "demo: agentgated did not start" >&2
	exit 1
}

step "a throwaway service on 127.0.0.2:8080 (the 'production' target)"
mkdir -p "$T/www" && echo "hello from the target" >"$T/www/index.html"
python3 -m http.server 8080 --bind 127.0.0.2 --directory "$T/www" >/dev/null 2>&1 &
SPID=$!
sleep 0.5

step "the policy: agent 'demo' is cgroup $CG; its only target is 127.0.0.2:8080"
cat >"$T/policy.yaml" <<YAML
apiVersion: agentgate/v1
agents:
  - name: demo
    cgroup: $CG
targets:
  - name: web
    protocol: tcp
    address: 127.0.0.2:8080
default: deny
YAML
cat "$T/policy.yaml"

step "agentgated starts and attaches to $CG (and everything below it)"
start_daemon
run $B/agctl -S "$SOCK" cgroup list
run $B/agctl -S "$SOCK" -B "$PIN" prog show

step "the agent reaches its target: the connection went through the gateway"
run $B/agctl -S "$SOCK" run --agent demo -- curl -s --max-time 5 http://127.0.0.2:8080/

step "...and is refused anywhere else (default: deny)"
run $B/agctl -S "$SOCK" run --agent demo -- curl -sS --max-time 5 http://127.0.0.3:8080/

step "what the gateway recorded, with the identity the kernel gave (sessions.log)"
cat "$T/state/sessions.log"

step "a long-running agent, seen live"
$B/agctl -S "$SOCK" run --agent demo -- python3 -c '
import socket, time
s = socket.create_connection(("127.0.0.2", 8080)); time.sleep(3)' &
RUNPID=$!
sleep 1
run $B/agctl -S "$SOCK" session list
run $B/agctl -S "$SOCK" socket list
run $B/agctl -S "$SOCK" socket list --bypass
wait $RUNPID || true

step "agentgated stops: the agent is fenced in (EPERM in the kernel), the host is not"
kill "$DPID"; wait "$DPID" 2>/dev/null || true; DPID=""
mkdir -p "$CG2$CG/job"
run bash -c "echo \$\$ > $CG2$CG/job/cgroup.procs; curl -sS --max-time 5 http://127.0.0.2:8080/"
run curl -s --max-time 5 http://127.0.0.2:8080/

step "agentgated is back: the same links, re-pointed, no duplicates"
start_daemon
run bpftool cgroup show "$CG2$CG"
run $B/agctl -S "$SOCK" run --agent demo -- curl -s --max-time 5 http://127.0.0.2:8080/

step "done: 'agctl prog detach' is the one way to remove enforcement (the demo cleans up)"
