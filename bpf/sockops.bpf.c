// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: enrolls established TCP sockets of attached cgroups into the
 * short-circuit, and forgets them when they close.
 *
 * Enrollment rules (see ARCHITECTURE.md, "Who is enrolled"):
 *  - the connecting side (ACTIVE_ESTABLISHED) is enrolled when its peer
 *    address may be on this host: loopback, or in meshpath_local_nets;
 *  - the accepting side (PASSIVE_ESTABLISHED) is enrolled only when the
 *    connecting side already is: the client's ACTIVE_ESTABLISHED runs
 *    before it sends the final ACK, so on this host it always comes
 *    first.  Both ends enrolled or neither: no socket pays the sk_msg
 *    cost for a connection that cannot be short-circuited from its side;
 *  - ports in meshpath_bypass_ports stay on plain TCP.
 */
#include "lib/common.h"
#include "lib/settings.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

MP_DEFINE_KEY_FROM_CTX(mp_key_from_sockops, struct bpf_sock_ops)

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

MP_ALWAYS_INLINE bool mp_peer_may_be_local(const struct mp_sock_key *k)
{
	struct mp_lpm_key lpm = { .prefixlen = 128 };

	if (mp_ip_is_loopback(k->remote_ip))
		return true;
	__builtin_memcpy(lpm.addr, k->remote_ip, sizeof(lpm.addr));
	return bpf_map_lookup_elem(&meshpath_local_nets, &lpm) != NULL;
}

MP_ALWAYS_INLINE void mp_enroll(struct bpf_sock_ops *skops, bool active)
{
	struct mp_sock_entry entry = {};
	struct mp_sock_key key = {};
	struct mp_sock_key peer = {};
	struct mp_sock_state *st;
	struct mp_settings *cfg;
	struct bpf_sock *sk;
	struct tcp_sock *tp;

	cfg = mp_settings();
	if (!cfg || !cfg->shortcircuit || cfg->draining)
		return;
	if (!mp_key_from_sockops(skops, &key)) {
		mp_count(MP_C_SOCK_SKIP_FAMILY);
		return;
	}
	if (mp_port_bypassed(&key)) {
		mp_count(MP_C_SOCK_SKIP_BYPASS);
		return;
	}
	if (active) {
		if (!mp_peer_may_be_local(&key)) {
			mp_count(MP_C_SOCK_SKIP_NONLOCAL);
			return;
		}
	} else {
		mp_peer_key(&key, &peer);
		if (!bpf_map_lookup_elem(&meshpath_sock_index, &peer)) {
			mp_count(MP_C_SOCK_SKIP_NONLOCAL);
			return;
		}
	}

	sk = skops->sk;
	if (!sk)
		return;
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0,
				BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		mp_count(MP_C_SOCK_ENROLL_ERR);
		return;
	}
	st->cookie = bpf_get_socket_cookie(skops);
	/* Bytes this side already sent through TCP (TCP Fast Open data) may
	 * still sit unread in the peer's receive queue; the kernel would
	 * deliver redirected bytes before them.  Keep such a direction on
	 * TCP. */
	if (skops->data_segs_out > 0) {
		st->mode = MP_DIR_TCP;
		st->reason = MP_REASON_SENT_BEFORE;
	} else {
		st->mode = MP_DIR_UNDECIDED;
		st->reason = MP_REASON_NONE;
	}

	entry.cookie = st->cookie;
	tp = bpf_skc_to_tcp_sock(sk);
	if (tp && cfg->optout_rcvlowat &&
	    tp->inet_conn.icsk_inet.sk.sk_rcvlowat > 1) {
		/* The kernel's sk_msg receive path ignores SO_RCVLOWAT: a
		 * socket that set it keeps getting its bytes through TCP. */
		entry.flags |= MP_SOCK_F_NO_REDIRECT;
		mp_count(MP_C_SOCKOPT_OPTOUT);
	}

	if (bpf_sock_hash_update(skops, &meshpath_sockets, &key, BPF_ANY)) {
		mp_count(MP_C_SOCK_ENROLL_ERR);
		return;
	}
	if (bpf_map_update_elem(&meshpath_sock_index, &key, &entry, BPF_ANY)) {
		/* Without an index entry no peer redirects to us and the
		 * passive side will not enroll: the socket stays on TCP. */
		mp_count(MP_C_SOCK_ENROLL_ERR);
	}
	st->enrolled = 1;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_STATE_CB_FLAG);
	mp_count(MP_C_SOCK_ENROLLED);
}

MP_ALWAYS_INLINE void mp_forget(struct bpf_sock_ops *skops)
{
	struct mp_sock_key key = {};
	struct mp_sock_state *st;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0, 0);
	if (!st || !st->enrolled)
		return;
	st->enrolled = 0;
	if (mp_key_from_sockops(skops, &key))
		bpf_map_delete_elem(&meshpath_sock_index, &key);
	mp_count(MP_C_SOCK_REMOVED);
}

SEC("sockops")
int meshpath_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		mp_enroll(skops, true);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		mp_enroll(skops, false);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			mp_forget(skops);
		break;
	default:
		break;
	}
	return 1;
}
