#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# Installs the agentgate gateway CA into Debian's trust store, so that TLS clients on this
# runner (curl, libpq with sslrootcert=system, python, ...) accept the leaves the gateway shows
# when it terminates their TLS. --remove takes it out again.
#
#   scripts/install-ca.sh [--remove] [--socket PATH] [--from FILE]
#
# The certificate comes from the running daemon (agctl ca show) unless --from names a PEM file.
set -eu

dest=/usr/local/share/ca-certificates/agentgate.crt
remove=0
from=
agctl_args=

usage() {
	echo "usage: $0 [--remove] [--socket PATH] [--from FILE]" >&2
	exit 2
}

while [ $# -gt 0 ]; do
	case $1 in
	--remove) remove=1 ;;
	--socket) [ $# -ge 2 ] || usage; agctl_args="-S $2"; shift ;;
	--from) [ $# -ge 2 ] || usage; from=$2; shift ;;
	-h|--help) usage ;;
	*) usage ;;
	esac
	shift
done

if [ "$(id -u)" != 0 ]; then
	echo "$0: must run as root (writes $dest)" >&2
	exit 1
fi

if [ $remove = 1 ]; then
	if [ -e "$dest" ]; then
		rm -f "$dest"
		update-ca-certificates --fresh >/dev/null
		echo "removed $dest and refreshed the trust store"
	else
		echo "$dest is not installed"
	fi
	exit 0
fi

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
if [ -n "$from" ]; then
	cat "$from" >"$tmp"
else
	agctl=$(command -v agctl || echo "$(dirname "$0")/../build/agctl")
	# shellcheck disable=SC2086
	"$agctl" $agctl_args ca show >"$tmp"
fi
if ! openssl x509 -in "$tmp" -noout 2>/dev/null; then
	echo "$0: not a PEM certificate" >&2
	exit 1
fi
if [ "$(openssl x509 -in "$tmp" -noout -ext basicConstraints 2>/dev/null | grep -c 'CA:TRUE')" = 0 ]; then
	echo "$0: not a CA certificate" >&2
	exit 1
fi
install -d -m 0755 "$(dirname "$dest")"
install -m 0644 "$tmp" "$dest"
update-ca-certificates >/dev/null
echo "installed $dest ($(openssl x509 -in "$dest" -noout -subject))"
