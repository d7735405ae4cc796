// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * lsm/socket_connect and lsm/socket_sendmsg, attached once for the whole host (BPF LSM).
 * The cgroup connect hooks run for the cgroup a socket was made in, not for the task calling
 * connect(): a socket made before its process moved into a tagged cgroup, or passed in over
 * SCM_RIGHTS by an untagged process, would connect straight to its destination. Contract: a
 * task at or below a tagged cgroup never connects an AF_INET/AF_INET6 stream socket whose own
 * cgroup is not at or below a tagged cgroup — refused with EPERM, counted (foreign_socket and
 * denied) and reported (AG_DENY_FOREIGN_SOCKET). TCP Fast Open (sendto/sendmsg with
 * MSG_FASTOPEN on an unconnected socket) connects without security_socket_connect(), so the
 * same test runs on a send that carries a destination to a stream socket not yet connected.
 * Every other task and socket passes untouched: these programs run for every connect (and
 * every send) on the host, so the common case costs a few loads and one compare.
 */
#include "lib/guard.h"
#include <bpf/bpf_tracing.h>

SEC("lsm/socket_connect")
int BPF_PROG(ag_lsm_connect, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	struct sock *sk;

	if (ret)
		return ret;
	sk = sock->sk;
	if (!ag_conn_socket(sock, sk))
		return 0;
	return ag_guard(sk, address, addrlen);
}

/*
 * TCP Fast Open: sendto()/sendmsg() with MSG_FASTOPEN and a destination connects an unconnected
 * socket with no connect() call. Any send with a destination on a stream socket still closed
 * is taken as a connect (without MSG_FASTOPEN the kernel refuses it anyway). Sends without a
 * destination, the bulk of all sends, stop at the first test.
 */
SEC("lsm/socket_sendmsg")
int BPF_PROG(ag_lsm_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	struct sock *sk;

	if (ret)
		return ret;
	if (!msg->msg_name)
		return 0;
	sk = sock->sk;
	if (!ag_conn_socket(sock, sk) || sk->__sk_common.skc_state != TCP_CLOSE)
		return 0;
	return ag_guard(sk, msg->msg_name, msg->msg_namelen);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
