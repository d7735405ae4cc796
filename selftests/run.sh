#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# Runs the selftests (make test): needs root (BPF, cgroups), a bpffs at /sys/fs/bpf, and
# build/test_progs. Arguments go to test_progs (-t NAME[/SUB], -v, -l). Works without a
# terminal (CI); the exit code is test_progs'.
set -u

cd "$(dirname "$0")/.." || exit 1

if [ "$(id -u)" -ne 0 ]; then
	echo "selftests: must run as root (BPF programs and cgroups): sudo make test" >&2
	exit 1
fi

if [ ! -x build/test_progs ]; then
	echo "selftests: build/test_progs is missing: run make first" >&2
	exit 1
fi

if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
	if ! mount -t bpf bpf /sys/fs/bpf; then
		echo "selftests: cannot mount the bpffs at /sys/fs/bpf" >&2
		exit 1
	fi
fi

build/test_progs "$@"
exit $?
