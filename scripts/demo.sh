#!/bin/bash
# The story in two minutes, on loopback only, against a throwaway PostgreSQL and web service:
# a tagged "agent" reads through agentgated (identity from the kernel, sensitive values
# masked), is blocked when it tries something destructive and carries on in the same session,
# waits for a human's approval before it changes the schema, has that session replayed from the
# tamper-evident audit log, is refused anywhere else, cannot go around the gateway, and stays
# fenced in while the daemon is down.
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
PGBIN=/usr/lib/postgresql/15/bin
PGDIR=""
PGPORT=${DEMO_PG_PORT:-15439}

cleanup() {
	set +e
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
	[ -n "$SPID" ] && kill "$SPID" 2>/dev/null
	[ -n "$PGDIR" ] && su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $PGDIR/data -m immediate stop" >/dev/null 2>&1
	[ -n "$PGDIR" ] && rm -rf "$PGDIR"
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

step "a throwaway PostgreSQL 15 on 127.0.0.2:$PGPORT with personal data in it"
PGDIR=$(mktemp -d /tmp/agentgate-demo-pg.XXXXXX)
chown postgres "$PGDIR"
su postgres -s /bin/sh -c "$PGBIN/initdb -D $PGDIR/data -A trust -U postgres" >/dev/null
su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $PGDIR/data -l $PGDIR/log -w \
	-o \"-c listen_addresses=127.0.0.2 -c port=$PGPORT -c unix_socket_directories=$PGDIR\" start" >/dev/null
psql_admin() { su postgres -s /bin/sh -c "psql -X -q -h $PGDIR -p $PGPORT -U postgres -d shop $*"; }
su postgres -s /bin/sh -c "psql -X -q -h $PGDIR -p $PGPORT -U postgres -c 'CREATE DATABASE shop'"
psql_admin <<'SQL'
CREATE TABLE users (id int PRIMARY KEY, name text, email text, ssn text, note text);
INSERT INTO users VALUES
  (1, 'Ada', 'ada@example.com', '123-45-6789', 'card 4111 1111 1111 1111 on file'),
  (2, 'Linus', 'linus@example.org', '987-65-4321', 'prefers email');
CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric);
INSERT INTO orders VALUES (1, 1, 42.50), (2, 2, 7.00);
SQL
echo "users: 2 rows (emails, SSNs, a card number in a note); orders: 2 rows"

step "the policy: agent 'demo' is cgroup $CG; targets: the database and a web service"
cat >"$T/policy.yaml" <<YAML
apiVersion: agentgate/v1
agents:
  - name: demo
    cgroup: $CG
targets:
  - name: shop-db
    protocol: postgres
    address: 127.0.0.2:$PGPORT
  - name: web
    protocol: tcp
    address: 127.0.0.2:8080
rules:
  - agent: demo
    target: shop-db
    sql:
      - { name: no-drop, when: { command: [drop, truncate] }, then: deny }
      - { name: no-unbounded-writes, when: { command: [update, delete], where: absent }, then: deny }
      - { name: ddl-needs-review, when: { command: [ddl] }, then: approve }
      - { name: reads, when: { command: [select] }, then: allow }
      - { name: small-writes, when: { command: [update], where: present }, then: allow }
    mask:
      columns: [users.email, "*.ssn"]
      detectors: [email, credit-card, ssn]
      style: partial
approvals: { approvers: [root], timeout: 2m }
default: deny
YAML
cat "$T/policy.yaml"

step "agentgated starts and attaches to $CG (and everything below it)"
start_daemon
run $B/agctl -S "$SOCK" cgroup list
run $B/agctl -S "$SOCK" -B "$PIN" prog show

step "the agent reads: same rows, sensitive values masked on the wire"
AGPSQL="psql -X -h 127.0.0.2 -p $PGPORT -U postgres -d shop"
run $B/agctl -S "$SOCK" run --agent demo -- $AGPSQL -c "SELECT * FROM users ORDER BY id"
run $B/agctl -S "$SOCK" run --agent demo -- $AGPSQL -c "SELECT name, lower(email) AS mail, note FROM users"

step "a destructive statement is blocked (42501), whatever its disguise; the session goes on"
run $B/agctl -S "$SOCK" run --agent demo -- $AGPSQL -v ON_ERROR_STOP=0 <<'SQL'
DROP TABLE users;
/* a comment */ dRoP   TABLE "users";
WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d;
UPDATE orders SET total = 0;
UPDATE orders SET total = total + 1 WHERE id = 1;
SELECT id, total FROM orders ORDER BY id;
SQL
run $B/agctl -S "$SOCK" policy explain "$T/policy.yaml" --agent demo --target shop-db \
	--sql "SELECT pg_read_file('/etc/passwd')"

step "a schema change waits for a human: the agent (uid nobody) is held, root decides"
chmod 711 "$T"  # approvers who are not root reach the control socket too
AS_NOBODY="setpriv --reuid=nobody --regid=nogroup --clear-groups"
pending_id() {
	local id=""
	for _ in $(seq 50); do
		id=$($B/agctl -S "$SOCK" approval list | awk '$6 == "pending" { print $1; exit }')
		[ -n "$id" ] && break
		sleep 0.2
	done
	echo "$id"
}
printf '$ %s\n' "agctl run --agent demo -- $AS_NOBODY psql -c 'CREATE TABLE coupons (...)' &"
$B/agctl -S "$SOCK" run --agent demo -- $AS_NOBODY $AGPSQL \
	-c "CREATE TABLE coupons (code text, pct int)" 2>&1 | sed 's/^/    agent| /' &
AGENT=$!
ID=$(pending_id)
run $B/agctl -S "$SOCK" approval list
run $B/agctl -S "$SOCK" approval show "$ID"
echo "# the agent's own uid may look, not decide (separation of duties):"
run $AS_NOBODY $B/agctl -S "$SOCK" approval approve "$ID"
run $B/agctl -S "$SOCK" approval approve "$ID"
wait $AGENT || true
printf '$ %s\n' "agctl run --agent demo -- $AS_NOBODY psql -c 'ALTER TABLE orders ADD note text' &"
$B/agctl -S "$SOCK" run --agent demo -- $AS_NOBODY $AGPSQL \
	-c "ALTER TABLE orders ADD note text" 2>&1 | sed 's/^/    agent| /' &
AGENT=$!
ID=$(pending_id)
run $B/agctl -S "$SOCK" approval deny "$ID" reason not during the freeze
wait $AGENT || true
run $B/agctl -S "$SOCK" -jp approval show "$ID"

step "that session, replayed from the tamper-evident audit log (who, what, each decision, what came back)"
SID=$($B/agctl -S "$SOCK" -j approval show "$ID" | sed -n 's/.*"session":\([0-9]*\).*/\1/p')
sleep 0.3 # the audit writer's batch interval
run $B/agctl -S "$SOCK" session replay "$SID"
run $B/agctl -S "$SOCK" audit verify

step "the agent reaches its web target: the connection went through the gateway"
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
