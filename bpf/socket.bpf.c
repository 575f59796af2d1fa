// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Policy at socket(): a workload of an attached cgroup may not open the
 * sockets whose packets no other hook judges by the workload's identity,
 * unless its cgroup was attached with AttachOptions::raw_sockets(true).
 *
 *  - cgroup/sock_create (every kernel): raw IP sockets (AF_INET/AF_INET6,
 *    SOCK_RAW).  Their packets do pass cgroup_skb egress, but with any
 *    source address the workload writes (IP_HDRINCL, IPv6 raw), so policy
 *    would judge them by an identity the workload forged.
 *  - lsm_cgroup/socket_create (Linux 6.0+ with the bpf LSM active):
 *    packet sockets (AF_PACKET, which also covers SOCK_PACKET) and AF_XDP
 *    sockets, whose frames leave through the device without passing any
 *    cgroup hook.  cgroup/sock_create only runs for inet sockets, so this
 *    needs the LSM hook; where the bpf LSM is not active the library
 *    reports it (KernelQuirks::lsm_cgroup) and such frames are judged only
 *    by XDP on the devices they reach.
 *
 * Only while a policy is in force (the policy word's ON bit): without one
 * everything passes unchecked, as at every other hook.  A refused
 * socket() fails with EPERM and is counted (MP_C_SOCK_REFUSED).
 */
#include "lib/common.h"
#include "lib/settings.h"
#include "lib/stats.h"

#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MP_AF_PACKET	  17
#define MP_AF_XDP	  44
#define MP_SOCK_RAW	  3
#define MP_SOCK_TYPE_MASK 0xf

MP_ALWAYS_INLINE bool mp_inet_raw(int family, int type)
{
	return (family == AF_INET || family == AF_INET6) &&
	       (type & MP_SOCK_TYPE_MASK) == MP_SOCK_RAW;
}

MP_ALWAYS_INLINE bool mp_enforcing(void)
{
	struct mp_settings *cfg = mp_settings();

	return cfg && (*(volatile __u64 *)&cfg->policy & MP_POLICY_ON_BIT);
}

SEC("cgroup/sock_create")
int meshpath_sock_create(struct bpf_sock *sk)
{
	if (mp_inet_raw(sk->family, sk->type) && mp_enforcing()) {
		mp_count(MP_C_SOCK_REFUSED);
		return 0; /* EPERM */
	}
	return 1;
}

SEC("lsm_cgroup/socket_create")
int BPF_PROG(meshpath_socket_create, int family, int type, int protocol,
	     int kern)
{
	if (kern)
		return 1; /* the kernel's own sockets */
	if ((family == MP_AF_PACKET || family == MP_AF_XDP ||
	     mp_inet_raw(family, type)) &&
	    mp_enforcing()) {
		mp_count(MP_C_SOCK_REFUSED);
		return 0; /* EPERM */
	}
	return 1;
}
