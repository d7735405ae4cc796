#!/bin/sh
# Installs every Debian package that agentgate's build, run, tests and benchmarks need.
# Idempotent and quiet: when everything is present it prints nothing and touches nothing.
set -eu

PKGS="
make gcc clang llvm pkg-config bpftool libbpf-dev libelf-dev zlib1g-dev libssl-dev
libyaml-dev libprotobuf-c-dev protobuf-c-compiler libnl-3-dev libnl-idiag-3-dev
libnl-route-3-dev libpg-query-dev libhttp-parser-dev libyajl-dev libpq-dev libdeflate-dev
iproute2 procps psmisc util-linux curl openssl python3 python3-psycopg2
postgresql postgresql-client pgbouncer nginx-light wrk
"

# kubectl for the Kubernetes selftests: Debian's kubernetes-client, unless one is already there
# (a kubectl from another source must not be replaced).
command -v kubectl >/dev/null 2>&1 || PKGS="$PKGS kubernetes-client"

missing=""
for p in $PKGS; do
	st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	case "$st" in
	*"install ok installed"*) ;;
	*) missing="$missing $p" ;;
	esac
done

[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing packages:$missing (run as root to install them)" >&2
	exit 1
fi

echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# A stale or empty package list makes apt-get install fail on a fresh machine.
apt-get update -qq >/dev/null
# policy-rc.d keeps Debian from starting postgresql/nginx/pgbouncer services behind our back:
# tests and benchmarks start their own servers on their own ports.
prc=/usr/sbin/policy-rc.d
added_prc=0
if [ ! -e "$prc" ]; then
	printf '#!/bin/sh\nexit 101\n' >"$prc" && chmod +x "$prc" && added_prc=1
fi
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
[ "$added_prc" = 1 ] && rm -f "$prc"
exit 0
