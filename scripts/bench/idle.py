#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0
"""What an idle session costs the gateway, for scripts/bench_pg.sh and bench_http.sh.

Opens N sessions one after another (each does one real exchange: a query and a commit, or one
HTTP request on a keep-alive connection), in two waves with a pause for the gateway's worker
ticks after each (an idle TLS session gives back its record buffers after one), holds them all
open, and prints the growth of the gateway's resident memory across the second wave, per
session, as "name value" lines:

    idle_held N
    idle_kib_per_session X

Run it in the tagged cgroup (the caller moves it there). Every wait is bounded.
"""
import argparse
import os
import socket
import ssl
import sys
import time


def rss_kib(pid):
    with open('/proc/%d/smaps_rollup' % pid) as f:
        for line in f:
            if line.startswith('Rss:'):
                return int(line.split()[1])
    raise RuntimeError('no Rss for pid %d' % pid)


def open_pg(a):
    import psycopg2

    c = psycopg2.connect(host=a.host, port=a.port, user=a.user, dbname=a.db, connect_timeout=10)
    cur = c.cursor()
    cur.execute('SELECT aid, abalance FROM pgbench_accounts WHERE aid = %s', (1,))
    cur.fetchall()
    c.commit()
    return c


def open_http(a, ctx):
    s = socket.create_connection((a.host, a.port), timeout=10)
    if ctx:
        s = ctx.wrap_socket(s, server_hostname=a.host)
    s.sendall(('GET %s HTTP/1.1\r\nHost: %s\r\n\r\n' % (a.path, a.host)).encode())
    got = b''
    while b'\r\n\r\n' not in got:
        d = s.recv(65536)
        if not d:
            raise RuntimeError('the connection closed before an answer')
        got += d
    head, body = got.split(b'\r\n\r\n', 1)
    if not head.startswith(b'HTTP/1.1 200'):
        raise RuntimeError('answer: %s' % head.split(b'\r\n')[0].decode(errors='replace'))
    length = 0
    for line in head.split(b'\r\n')[1:]:
        k, _, v = line.partition(b':')
        if k.strip().lower() == b'content-length':
            length = int(v)
    while len(body) < length:
        d = s.recv(65536)
        if not d:
            raise RuntimeError('the connection closed mid-answer')
        body += d
    return s


def main():
    p = argparse.ArgumentParser()
    p.add_argument('kind', choices=['pg', 'http', 'https'])
    p.add_argument('--pid', type=int, required=True, help='the gateway')
    p.add_argument('-n', type=int, default=1000)
    p.add_argument('--host', required=True)
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--user', default='postgres')
    p.add_argument('--db', default='postgres')
    p.add_argument('--path', default='/')
    p.add_argument('--cafile')
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile) if a.kind == 'https' else None
    held = []
    # Two waves, measured across the second: what a session holds once idle, not the peak of
    # sessions still busy (a TLS session gives its record buffers back after a worker tick,
    # and the daemon keeps freed memory for the next ones, as the second wave's get them).
    first = a.n // 2
    before = 0
    for i in range(a.n):
        if i == first:
            time.sleep(2.5)  # two worker ticks: the first wave is idle
            before = rss_kib(a.pid)
        held.append(open_pg(a) if a.kind == 'pg' else open_http(a, ctx))
        if i and i % 1000 == 0:
            print('idle.py: %d of %d %s sessions up' % (i, a.n, a.kind), file=sys.stderr)
    time.sleep(2.5)
    after = rss_kib(a.pid)
    print('idle_held %d' % len(held))
    print('idle_kib_per_session %.1f' % ((after - before) / (a.n - first)))
    for h in held:
        h.close()


if __name__ == '__main__':
    main()
