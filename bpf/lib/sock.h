/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The short-circuit's maps and the helpers that build socket keys.
 *
 * A socket is "enrolled" when it is in meshpath_sockets (so that sk_msg
 * runs on its sends and peers can redirect into it) and in
 * meshpath_sock_index (so that its peer can learn about it with a plain
 * hash lookup).  sockops enrolls, the kernel removes a closed socket from
 * the SOCKHASH by itself, and sockops removes it from the index when it
 * reaches TCP_CLOSE.
 */
#ifndef MESHPATH_BPF_SOCK_H
#define MESHPATH_BPF_SOCK_H

#include "common.h"

#ifndef MP_MAX_SOCKETS
#define MP_MAX_SOCKETS 65536 /* default; the library sets max_entries */
#endif

/*
 * meshpath_sockets: key struct mp_sock_key, value the socket (cookie when
 * read from user space).  Written by sockops (enroll), read by sk_msg
 * (redirect target).  Sized for the number of established local TCP
 * sockets the node carries (two per connection).
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MP_MAX_SOCKETS);
	__type(key, struct mp_sock_key);
	__type(value, __u64);
} meshpath_sockets SEC(".maps");

/*
 * meshpath_sock_index: key struct mp_sock_key, value struct mp_sock_entry.
 * Written by sockops (enroll, TCP_CLOSE) and the setsockopt hook (flags);
 * read by sk_msg (peer flags) and sockops (is the client enrolled?).
 * Same size as meshpath_sockets.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_SOCKETS);
	__type(key, struct mp_sock_key);
	__type(value, struct mp_sock_entry);
} meshpath_sock_index SEC(".maps");

/*
 * meshpath_sock_state: socket local storage, value struct mp_sock_state.
 * Created by sockops at enrollment, updated by sk_msg on every message;
 * freed by the kernel with the socket.  Read by the library's diagnostics.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct mp_sock_state);
} meshpath_sock_state SEC(".maps");

/*
 * meshpath_bypass_ports: key __u32 port (host order), value __u32
 * MP_BYPASS_F_* flags.  Written by the library; read by sockops, which
 * leaves matching sockets off the short-circuit entirely (plain TCP, no
 * sk_msg cost).  Small: a handful of ports per node.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} meshpath_bypass_ports SEC(".maps");

/*
 * meshpath_local_nets: key struct mp_lpm_key, value __u32 (unused, 1).
 * Written by the library: prefixes of workloads on this host that live in
 * other network namespaces.  Read by sockops: a connecting socket is
 * enrolled only when its peer may be local (loopback or one of these).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct mp_lpm_key);
	__type(value, __u32);
} meshpath_local_nets SEC(".maps");

/*
 * meshpath_cgroups: key __u64 cgroup id, value __u32 enum mp_cgroup_flags.
 * Written by the library on attach/detach; read by the TCP iterator that
 * takes over sockets established before attach (bpf/enroll.bpf.c).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} meshpath_cgroups SEC(".maps");

MP_ALWAYS_INLINE void mp_v4_mapped(__u32 out[4], __u32 v4)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = v4;
}

MP_ALWAYS_INLINE bool mp_ip_is_loopback(const __u32 ip[4])
{
	if (ip[0] != 0 || ip[1] != 0)
		return false;
	if (ip[2] == bpf_htonl(0x0000ffff))
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/*
 * Fill the addresses and ports of a key from a context that has the
 * family/local_ip4/remote_ip4/local_ip6/remote_ip6/local_port/remote_port
 * fields (struct bpf_sock_ops and struct sk_msg_md both do; remote_port
 * is the be16 shifted into the high half, local_port host order).
 * Returns false for a family the short-circuit does not handle.
 *
 * Every context field is loaded once, unconditionally, at a fixed
 * offset, before branching on the family: otherwise clang merges the
 * IPv4 and IPv6 loads into one load through a pointer that selects
 * between two context offsets, and the verifier refuses a dereference of
 * a modified context pointer.  (Reading the IPv6 fields of an IPv4
 * socket is allowed and harmless.)
 */
#define MP_CTX_READ(x) (*(volatile typeof(x) *)&(x))
#define MP_DEFINE_KEY_FROM_CTX(name, ctx_type)                                 \
	MP_ALWAYS_INLINE bool name(ctx_type *ctx, struct mp_sock_key *k)       \
	{                                                                      \
		__u32 family = MP_CTX_READ(ctx->family);                       \
		__u32 l4 = MP_CTX_READ(ctx->local_ip4);                        \
		__u32 r4 = MP_CTX_READ(ctx->remote_ip4);                       \
		__u32 l6_0 = MP_CTX_READ(ctx->local_ip6[0]);                   \
		__u32 l6_1 = MP_CTX_READ(ctx->local_ip6[1]);                   \
		__u32 l6_2 = MP_CTX_READ(ctx->local_ip6[2]);                   \
		__u32 l6_3 = MP_CTX_READ(ctx->local_ip6[3]);                   \
		__u32 r6_0 = MP_CTX_READ(ctx->remote_ip6[0]);                  \
		__u32 r6_1 = MP_CTX_READ(ctx->remote_ip6[1]);                  \
		__u32 r6_2 = MP_CTX_READ(ctx->remote_ip6[2]);                  \
		__u32 r6_3 = MP_CTX_READ(ctx->remote_ip6[3]);                  \
		k->local_port = MP_CTX_READ(ctx->local_port);                  \
		k->remote_port = bpf_ntohl(MP_CTX_READ(ctx->remote_port));     \
		if (family == AF_INET) {                                       \
			mp_v4_mapped(k->local_ip, l4);                         \
			mp_v4_mapped(k->remote_ip, r4);                        \
		} else if (family == AF_INET6) {                               \
			k->local_ip[0] = l6_0;                                 \
			k->local_ip[1] = l6_1;                                 \
			k->local_ip[2] = l6_2;                                 \
			k->local_ip[3] = l6_3;                                 \
			k->remote_ip[0] = r6_0;                                \
			k->remote_ip[1] = r6_1;                                \
			k->remote_ip[2] = r6_2;                                \
			k->remote_ip[3] = r6_3;                                \
		} else {                                                       \
			return false;                                          \
		}                                                              \
		if (mp_ip_is_loopback(k->local_ip) ||                          \
		    mp_ip_is_loopback(k->remote_ip))                           \
			k->netns = bpf_get_netns_cookie(ctx);                  \
		else                                                           \
			k->netns = 0;                                          \
		return true;                                                   \
	}

MP_ALWAYS_INLINE bool mp_port_bypassed(const struct mp_sock_key *k)
{
	__u32 port = k->local_port;
	__u32 *flags = bpf_map_lookup_elem(&meshpath_bypass_ports, &port);

	if (flags && (*flags & MP_BYPASS_F_LOCAL))
		return true;
	port = k->remote_port;
	flags = bpf_map_lookup_elem(&meshpath_bypass_ports, &port);
	return flags && (*flags & MP_BYPASS_F_REMOTE);
}

/* Whether the peer of the socket keyed `k` may be on this host: loopback,
 * or inside a prefix the library declared local (meshpath_local_nets). */
MP_ALWAYS_INLINE bool mp_peer_may_be_local(const struct mp_sock_key *k)
{
	struct mp_lpm_key lpm = {.prefixlen = 128};

	if (mp_ip_is_loopback(k->remote_ip))
		return true;
	__builtin_memcpy(lpm.addr, k->remote_ip, sizeof(lpm.addr));
	return bpf_map_lookup_elem(&meshpath_local_nets, &lpm) != NULL;
}

/*
 * The key of a full TCP socket seen by an iterator (a trusted `struct
 * sock *`); false for a family other than IPv4/IPv6.  The netns cookie
 * (loopback keys only) is read from the socket's namespace, as
 * bpf_get_netns_cookie would (iterators may not call it).
 */
MP_ALWAYS_INLINE bool mp_key_from_sock(struct sock *sk, struct mp_sock_key *key)
{
	if (sk->__sk_common.skc_family == AF_INET) {
		mp_v4_mapped(key->local_ip, sk->__sk_common.skc_rcv_saddr);
		mp_v4_mapped(key->remote_ip, sk->__sk_common.skc_daddr);
	} else if (sk->__sk_common.skc_family == AF_INET6) {
		__builtin_memcpy(key->local_ip,
				 &sk->__sk_common.skc_v6_rcv_saddr, 16);
		__builtin_memcpy(key->remote_ip, &sk->__sk_common.skc_v6_daddr,
				 16);
	} else {
		return false;
	}
	key->local_port = sk->__sk_common.skc_num;
	key->remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
	if (mp_ip_is_loopback(key->local_ip) ||
	    mp_ip_is_loopback(key->remote_ip))
		key->netns =
		    BPF_CORE_READ(sk, __sk_common.skc_net.net, net_cookie);
	return true;
}

/* The key the peer of the socket keyed by `k` is enrolled under. */
MP_ALWAYS_INLINE void mp_peer_key(const struct mp_sock_key *k,
				  struct mp_sock_key *peer)
{
	peer->local_ip[0] = k->remote_ip[0];
	peer->local_ip[1] = k->remote_ip[1];
	peer->local_ip[2] = k->remote_ip[2];
	peer->local_ip[3] = k->remote_ip[3];
	peer->remote_ip[0] = k->local_ip[0];
	peer->remote_ip[1] = k->local_ip[1];
	peer->remote_ip[2] = k->local_ip[2];
	peer->remote_ip[3] = k->local_ip[3];
	peer->local_port = k->remote_port;
	peer->remote_port = k->local_port;
	peer->netns = k->netns;
}

#endif /* MESHPATH_BPF_SOCK_H */
