// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Takes over TCP sockets established before the datapath was attached
 * (a late start, or a restart without pins): a TCP socket iterator (one
 * network namespace per run, the caller's) visits every socket; those of
 * an attached cgroup (meshpath_cgroups, the cgroup or an ancestor) that
 * meshpath does not track yet are judged by policy (a denied flow is
 * reset), tracked, and enrolled into the short-circuit under the same
 * rules sockops applies at establishment (ARCHITECTURE.md, "Taking over
 * existing sockets").  A socket with a task asleep in it stays out (that
 * task runs the plain TCP code, blind to redirected bytes).  The sends of
 * a socket taken over take TCP until redirecting cannot overtake or strand
 * a byte (mp_adopted_may_redirect in sk_msg.bpf.c).  Run by
 * Datapath::enroll_existing, once per network namespace.
 */
#include "lib/common.h"
#include "lib/destroy.h"
#include "lib/policy.h"
#include "lib/psock.h"
#include "lib/settings.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#ifndef SOL_TCP
#define SOL_TCP 6
#endif
#define MP_MAX_CGROUP_DEPTH 16

/* Callbacks an enrolled socket needs (sockops.bpf.c: the close and the
 * eviction callbacks). */
#define MP_ENROLLED_CB_FLAGS                                                   \
	(BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG |               \
	 BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)

/* The flags of the nearest attached cgroup of `sk`, 0 when none is. */
MP_ALWAYS_INLINE __u32 mp_cgroup_flags_of(struct sock *sk)
{
	struct cgroup *cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	int level, i;

	if (!cg)
		return 0;
	level = BPF_CORE_READ(cg, level);
	for (i = MP_MAX_CGROUP_DEPTH; i >= 0; i--) {
		struct cgroup *anc;
		__u32 *flags;
		__u64 id;

		if (i > level)
			continue;
		anc = BPF_CORE_READ(cg, ancestors[i]);
		if (!anc)
			continue;
		id = BPF_CORE_READ(anc, kn, id);
		flags = bpf_map_lookup_elem(&meshpath_cgroups, &id);
		if (flags)
			return *flags;
	}
	return 0;
}

/* Reports what was done with one socket in the iterator's output. */

/* Whether a socket in TCP state `state` carries a connection policy has
 * a say on: established, or closing with data still able to flow. */
MP_ALWAYS_INLINE bool mp_state_judged(int state)
{
	return state == BPF_TCP_ESTABLISHED || state == BPF_TCP_CLOSE_WAIT ||
	       state == BPF_TCP_FIN_WAIT1 || state == BPF_TCP_FIN_WAIT2;
}

SEC("iter/tcp")
int meshpath_enroll(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct mp_sock_entry entry = {};
	struct mp_sock_key key = {};
	struct mp_judgement fwd, rev;
	struct mp_sock_state *st;
	struct mp_settings *cfg;
	struct tcp_sock *tp;
	struct sock *sk;
	__u32 cgflags;
	int cb = MP_ENROLLED_CB_FLAGS;
	__u16 flags = 0;
	__u64 word;
	int state;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	sk = &tp->inet_conn.icsk_inet.sk;
	state = sk->__sk_common.skc_state;
	if (!mp_state_judged(state))
		return 0;
	cgflags = mp_cgroup_flags_of(sk);
	if (!cgflags)
		return 0;
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0,
				BPF_SK_STORAGE_GET_F_CREATE);
	if (!st || st->tracked)
		return 0;

	if (!mp_key_from_sock(sk, &key))
		return 0;

	/* Which end connected is not recorded by the kernel: the direction
	 * policy allows tells; when both or neither are allowed, the end with
	 * the higher port is taken for the client (ephemeral ports are). */
	word = mp_policy_word();
	mp_policy_sock_flow_j(word, &key, true, &fwd);
	mp_policy_sock_flow_j(word, &key, false, &rev);
	if (mp_verdict_passes(fwd.verdict) && !mp_verdict_passes(rev.verdict))
		st->client = 1;
	else if (!mp_verdict_passes(fwd.verdict) &&
		 mp_verdict_passes(rev.verdict))
		st->client = 0;
	else
		st->client = key.local_port > key.remote_port;
	st->verdict = st->client ? fwd.verdict : rev.verdict;
	st->auth_expiry_ns = st->client ? fwd.auth_expiry : rev.auth_expiry;
	st->policy_gen = mp_policy_gen(word);
	st->cookie = bpf_get_socket_cookie(sk);
	st->tracked = 1;
	mp_count(MP_C_SOCK_ADOPTED);
	if (mp_policy_on(word))
		mp_ct_track_sock(word, &key, st->client,
				 st->client ? &fwd : &rev);
	if ((cgflags & MP_CG_POLICY) && mp_policy_on(word) &&
	    !mp_verdict_passes(st->verdict)) {
		/* Established before a policy that denies it: cut it. */
		if (mp_sock_destroy(skc) == 0) {
			mp_count(MP_C_POLICY_RESET);
			mp_enroll_report(ctx->meta, &key, st->cookie,
					 MP_ENROLL_RESET, 0, 0);
		} else {
			mp_enroll_report(ctx->meta, &key, st->cookie,
					 MP_ENROLL_DENIED, 0, 0);
		}
		return 0;
	}

	cfg = mp_settings();
	if (state != BPF_TCP_ESTABLISHED || !(cgflags & MP_CG_SHORTCIRCUIT) ||
	    !cfg || !cfg->shortcircuit || cfg->draining) {
		mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_TRACKED,
				 MP_DIR_TCP, 0);
		return 0;
	}
	if (mp_port_bypassed(&key)) {
		mp_count(MP_C_SOCK_SKIP_BYPASS);
		mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_TRACKED,
				 MP_DIR_TCP, 0);
		return 0;
	}
	if (!mp_peer_may_be_local(&key)) {
		mp_count(MP_C_SOCK_SKIP_NONLOCAL);
		mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_TRACKED,
				 MP_DIR_TCP, 0);
		return 0;
	}
	/* A task asleep in recv() or send() on it runs the plain TCP code
	 * until it returns: its reads would never see redirected bytes, its
	 * writes would pass sk_msg.  Leave such a socket on TCP. */
	if (mp_sock_syscall_sleepers((__u64)(unsigned long)sk,
				     cfg->woken_wake_fn)) {
		mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_BLOCKED,
				 MP_DIR_TCP, 0);
		return 0;
	}
	/* Bytes already sent through TCP are not overtaken: this socket's
	 * sends take TCP until the peer's application has read them all (see
	 * mp_adopted_may_redirect in sk_msg.bpf.c). */
	st->rcv_nxt0 = tp->rcv_nxt;
	st->mode = MP_DIR_UNDECIDED;
	st->reason = MP_REASON_NONE;
	st->adopted = 1;
	entry.cookie = st->cookie;
	entry.kaddr = (__u64)(unsigned long)sk;
	entry.flags = MP_SOCK_F_ADOPTED;
	entry.adopted_ns = bpf_ktime_get_ns();
	if (cfg->optout_rcvlowat && sk->sk_rcvlowat > 1)
		entry.flags |= MP_SOCK_F_NO_REDIRECT;
	if (bpf_map_update_elem(&meshpath_sockets, &key, sk, BPF_ANY)) {
		mp_count(MP_C_SOCK_ENROLL_ERR);
		mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_ERROR,
				 MP_DIR_TCP, 0);
		return 0;
	}
	if (bpf_map_update_elem(&meshpath_sock_index, &key, &entry, BPF_ANY))
		mp_count(MP_C_SOCK_ENROLL_ERR);
	st->enrolled = 1;
	/* Without the close callback the entries wait for a sweep. */
	if (bpf_setsockopt(sk, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, &cb,
			   sizeof(cb)))
		flags |= MP_ENROLL_F_NO_CLOSE_CB;
	mp_count(MP_C_SOCK_ENROLLED);
	mp_enroll_report(ctx->meta, &key, st->cookie, MP_ENROLL_ENROLLED,
			 st->mode, flags);
	return 0;
}
