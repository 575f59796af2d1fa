// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Resets established TCP flows that policy now denies: a TCP socket
 * iterator (one network namespace per run: the caller's) visits every
 * socket; the ones meshpath tracks (established in an attached cgroup)
 * are judged again, and a denied one is aborted with bpf_sock_destroy:
 * the peer gets a RST, the local application ECONNABORTED (where the
 * kernel has no bpf_sock_destroy, the socket is reported in the output
 * and the library resets it through sock_diag).  Run by
 * Datapath::reset_denied_flows after a policy change.
 */
#include "lib/common.h"
#include "lib/destroy.h"
#include "lib/events.h"
#include "lib/policy.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("iter/tcp")
int meshpath_reset(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct mp_sock_key key = {};
	struct mp_judgement j;
	struct mp_sock_state *st;
	struct tcp_sock *tp;
	struct sock *sk;
	__u64 word;
	__u32 verdict;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; /* request and time-wait sockets */
	sk = &tp->inet_conn.icsk_inet.sk;
	if (sk->__sk_common.skc_state != BPF_TCP_ESTABLISHED &&
	    sk->__sk_common.skc_state != BPF_TCP_CLOSE_WAIT)
		return 0;
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0, 0);
	if (!st || !st->tracked)
		return 0;
	word = mp_policy_word();
	if (!mp_policy_on(word))
		return 0;

	if (!mp_key_from_sock(sk, &key))
		return 0;

	mp_policy_sock_flow_j(word, &key, st->client, &j);
	verdict = j.verdict;
	st->verdict = verdict;
	st->auth_expiry_ns = j.auth_expiry;
	st->policy_gen = mp_policy_gen(word);
	if (mp_verdict_passes(verdict)) {
		mp_ct_track_sock(word, &key, st->client, &j);
		return 0;
	}
	if (mp_sock_destroy(skc) != 0) {
		/* The library resets it through sock_diag (lib/destroy.h). */
		mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_DENIED,
				 0, 0);
		return 0;
	}
	mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_RESET, 0, 0);
	mp_count(MP_C_POLICY_RESET);
	if (mp_events_on()) {
		struct mp_flow_event ev = {};

		/* Described from the connecting end. */
		if (st->client) {
			__builtin_memcpy(ev.saddr, key.local_ip, 16);
			__builtin_memcpy(ev.daddr, key.remote_ip, 16);
			ev.sport = key.local_port;
			ev.dport = key.remote_port;
		} else {
			__builtin_memcpy(ev.saddr, key.remote_ip, 16);
			__builtin_memcpy(ev.daddr, key.local_ip, 16);
			ev.sport = key.remote_port;
			ev.dport = key.local_port;
		}
		ev.src_identity = j.src_id;
		ev.dst_identity = j.dst_id;
		ev.rule = j.rule;
		ev.matched = j.matched;
		ev.verdict = verdict;
		ev.type = MP_EV_RESET;
		ev.point = MP_POINT_SHORTCIRCUIT;
		ev.proto = MP_PROTO_TCP;
		ev.ipv6 = sk->__sk_common.skc_family == AF_INET6 &&
			  !(key.remote_ip[2] == bpf_htonl(0x0000ffff) &&
			    key.remote_ip[0] == 0 && key.remote_ip[1] == 0);
		ev.cookie = st->cookie;
		ev.count = 1;
		mp_event_emit(&ev);
	}
	return 0;
}
