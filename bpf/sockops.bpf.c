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
 *
 * Leaving (ARCHITECTURE.md, "Leaving the short-circuit"): a connection
 * whose directions went TCP (sk_msg decides) leaves the SOCKHASH here,
 * socket by socket, so that it costs what plain TCP costs.  sk_msg
 * programs may not delete from a SOCKHASH; sockops may.  The RTT and
 * header-option callbacks run only when TCP segments flow, which a
 * redirected connection never does, so they cost nothing until then.
 */
#include "lib/common.h"
#include "lib/events.h"
#include "lib/policy.h"
#include "lib/psock.h"
#include "lib/settings.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

MP_DEFINE_KEY_FROM_CTX(mp_key_from_sockops, struct bpf_sock_ops)

/* The id of the cgroup a socket belongs to (kernfs node id). */
MP_ALWAYS_INLINE __u64 mp_sk_cgroup_id(struct bpf_sock *sk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

	if (!tp)
		return 0;
	return BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.sk_cgrp_data.cgroup, kn,
			     id);
}

/*
 * Reports the short-circuit of the connection of the socket keyed `key`
 * (`client`: this end connected): opening (both ends enrolled) or closing
 * with the bytes and messages each way.  Always described from the
 * connecting end to the accepting end.
 */
MP_ALWAYS_INLINE void mp_sc_event(struct bpf_sock_ops *skops, __u8 type,
				  const struct mp_sock_key *key, bool client,
				  const struct mp_sock_state *st,
				  const struct mp_sock_entry *self)
{
	struct mp_flow_event ev = {};
	__u64 word = mp_policy_word();
	struct bpf_sock *sk = skops->sk;

	if (client) {
		__builtin_memcpy(ev.saddr, key->local_ip, sizeof(ev.saddr));
		__builtin_memcpy(ev.daddr, key->remote_ip, sizeof(ev.daddr));
		ev.sport = key->local_port;
		ev.dport = key->remote_port;
	} else {
		__builtin_memcpy(ev.saddr, key->remote_ip, sizeof(ev.saddr));
		__builtin_memcpy(ev.daddr, key->local_ip, sizeof(ev.daddr));
		ev.sport = key->remote_port;
		ev.dport = key->local_port;
	}
	ev.ipv6 = !(ev.daddr[0] == 0 && ev.daddr[1] == 0 &&
		    ev.daddr[2] == bpf_htonl(0x0000ffff));
	ev.proto = MP_PROTO_TCP;
	ev.type = type;
	ev.point = MP_POINT_SHORTCIRCUIT;
	ev.verdict = st->verdict;
	if (mp_policy_on(word)) {
		ev.src_identity = mp_identity_of(word, ev.saddr);
		ev.dst_identity = mp_identity_of(word, ev.daddr);
	}
	ev.direction = MP_TRAFFIC_EGRESS;
	ev.cookie = st->cookie;
	if (sk)
		ev.cgroup_id = mp_sk_cgroup_id(sk);
	ev.count = 1;
	if (type == MP_EV_SC_CLOSE && client) {
		ev.tx_msgs = st->msgs_redir;
		ev.tx_bytes = st->bytes_redir;
		if (self) {
			ev.rx_msgs = self->rx_msgs;
			ev.rx_bytes = self->rx_bytes;
		}
	}
	mp_event_emit(&ev);
}

/* Callbacks that fire only when TCP segments flow on the socket. */
#define MP_EVICT_CB_FLAGS                                                      \
	(BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)

/*
 * An established TCP socket of an attached cgroup: track it (its role and
 * its flow's verdict, for sk_msg and the reset iterator), and enroll it
 * into the short-circuit when `shortcircuit` and the rules above allow.
 * A flow that policy denies is never enrolled: its packets meet the
 * packet hooks, which drop them.
 */
MP_ALWAYS_INLINE void mp_established(struct bpf_sock_ops *skops, bool active,
				     bool shortcircuit)
{
	struct mp_judgement j;
	struct mp_sock_entry entry = {};
	struct mp_sock_key key = {};
	struct mp_sock_key peer = {};
	struct mp_sock_state *st;
	struct mp_settings *cfg;
	struct bpf_sock *sk;
	struct tcp_sock *tp;
	__u64 word;

	if (!mp_key_from_sockops(skops, &key)) {
		mp_count(MP_C_SOCK_SKIP_FAMILY);
		return;
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
	/* Nested cgroups attached to one datapath run this program once per
	 * attachment: act once. */
	if (st->tracked)
		return;
	st->tracked = 1;
	st->client = active;
	st->cookie = bpf_get_socket_cookie(skops);
	word = mp_policy_word();
	st->policy_gen = mp_policy_gen(word);
	mp_policy_sock_flow_j(word, &key, active, &j);
	st->verdict = j.verdict;
	st->auth_expiry_ns = j.auth_expiry;
	if (mp_policy_on(word))
		mp_verdict_count(MP_POINT_SHORTCIRCUIT, st->verdict);
	if (!mp_verdict_passes(st->verdict) || !shortcircuit)
		return;

	cfg = mp_settings();
	if (!cfg || !cfg->shortcircuit || cfg->draining)
		return;
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

	st->rcv_nxt0 = skops->rcv_nxt;
	/* Bytes this side already sent through TCP (TCP Fast Open data) may
	 * still sit unread in the peer's receive queue; the kernel would
	 * deliver redirected bytes before them.  Keep such a direction on
	 * TCP. */
	if (skops->data_segs_out > 0) {
		st->mode = MP_DIR_TCP;
		st->reason = MP_REASON_SENT_BEFORE;
		mp_count(MP_C_FALLBACK_SENT_BEFORE);
	} else {
		st->mode = MP_DIR_UNDECIDED;
		st->reason = MP_REASON_NONE;
	}

	entry.cookie = st->cookie;
	entry.kaddr = (__u64)(unsigned long)sk;
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
					     BPF_SOCK_OPS_STATE_CB_FLAG |
					     MP_EVICT_CB_FLAGS);
	mp_count(MP_C_SOCK_ENROLLED);
	/* The accepting end enrolls last: the connection is short-circuited
	 * from now on. */
	if (!active && cfg->events)
		mp_sc_event(skops, MP_EV_SC_OPEN, &key, false, st, NULL);
}

/*
 * Whether the peer can never again redirect into this socket, given the
 * peer's index entry `pe` (NULL: the peer is not enrolled).
 *
 * A sender decides redirect-or-TCP for each message under its own socket
 * lock, then delivers a redirect into our queue after releasing it, and a
 * direction never goes back from TCP to redirect.  So once TCP payload
 * from the peer has reached us (rcv_nxt moved since enrollment), every
 * redirect the peer decided earlier has been delivered, and none will be
 * decided again.  A peer with no call in flight at all (psock refcnt 1:
 * the map's link only; no psock left once evicted) cannot be mid-delivery
 * either.  (Two threads writing one socket concurrently can still have an
 * older redirect in flight after a newer TCP send: their bytes have no
 * defined order anyway; see ARCHITECTURE.md.)
 */
MP_ALWAYS_INLINE bool mp_peer_done_redirecting(struct bpf_sock_ops *skops,
					       struct mp_sock_state *st,
					       struct mp_sock_entry *pe)
{
	struct mp_psock_view v;

	if (!pe)
		return true;
	if (!(pe->flags & MP_SOCK_F_TX_TCP))
		return false;
	if (skops->rcv_nxt != st->rcv_nxt0)
		return true;
	v = mp_psock_view(pe->kaddr);
	if (pe->flags & MP_SOCK_F_EVICTED)
		return !v.present;
	return !v.present || v.refcnt <= 1;
}

/*
 * Leaves the SOCKHASH when nothing can be lost or reordered by it.
 * Leaving frees the socket's sk_msg queue and restores its TCP callbacks:
 *  - the connection is moving to TCP: this socket's sends or the peer's
 *    take TCP for good (or the peer is not enrolled at all);
 *  - its own sk_msg queue is empty;
 *  - the peer can never again redirect into it (mp_peer_done_redirecting).
 * Our sends taking TCP afterwards is always safe: whatever we redirected
 * earlier sits in the peer's sk_msg queue, which the kernel reads first.
 */
MP_ALWAYS_INLINE void mp_maybe_evict(struct bpf_sock_ops *skops)
{
	struct mp_sock_key key = {}, peer = {};
	struct mp_sock_entry *self, *pe;
	struct mp_sock_state *st;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0, 0);
	if (!st || !st->enrolled || st->evicted)
		return;
	if (!mp_key_from_sockops(skops, &key))
		return;
	self = bpf_map_lookup_elem(&meshpath_sock_index, &key);
	if (!self)
		return;
	mp_peer_key(&key, &peer);
	pe = bpf_map_lookup_elem(&meshpath_sock_index, &peer);
	if (pe && !(pe->flags & MP_SOCK_F_TX_TCP) && st->mode != MP_DIR_TCP)
		return; /* a short-circuited connection: stay */
	if (!mp_psock_view(self->kaddr).queue_empty)
		return;
	if (!mp_peer_done_redirecting(skops, st, pe))
		return;
	__sync_fetch_and_or(&self->flags, MP_SOCK_F_TX_TCP | MP_SOCK_F_EVICTED);
	if (st->mode != MP_DIR_TCP) {
		st->mode = MP_DIR_TCP;
		st->reason = MP_REASON_PEER_TCP;
	}
	bpf_map_delete_elem(&meshpath_sockets, &key);
	st->evicted = 1;
	if (st->client && mp_events_on())
		mp_sc_event(skops, MP_EV_SC_CLOSE, &key, true, st, self);
	/* Our entry only serves the peer's own decision to leave; once the
	 * peer is gone or has left too, neither entry is needed. */
	if (!pe || (pe->flags & MP_SOCK_F_EVICTED)) {
		bpf_map_delete_elem(&meshpath_sock_index, &key);
		if (pe)
			bpf_map_delete_elem(&meshpath_sock_index, &peer);
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
					     ~MP_EVICT_CB_FLAGS);
	mp_count(MP_C_SOCK_EVICTED);
}

MP_ALWAYS_INLINE void mp_forget(struct bpf_sock_ops *skops)
{
	struct mp_sock_key key = {}, peer = {};
	struct mp_sock_entry *pe;
	struct mp_sock_state *st;
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0, 0);
	if (!st || !st->enrolled)
		return;
	st->enrolled = 0;
	if (mp_key_from_sockops(skops, &key)) {
		/* An evicted connection reported its close when it left. */
		if (st->client && !st->evicted && mp_events_on())
			mp_sc_event(
			    skops, MP_EV_SC_CLOSE, &key, true, st,
			    bpf_map_lookup_elem(&meshpath_sock_index, &key));
		bpf_map_delete_elem(&meshpath_sock_index, &key);
		/* An evicted peer's entry was kept for our decision only. */
		mp_peer_key(&key, &peer);
		pe = bpf_map_lookup_elem(&meshpath_sock_index, &peer);
		if (pe && (pe->flags & MP_SOCK_F_EVICTED))
			bpf_map_delete_elem(&meshpath_sock_index, &peer);
	}
	/* An evicted socket was already counted when it left. */
	if (!st->evicted)
		mp_count(MP_C_SOCK_REMOVED);
}

MP_ALWAYS_INLINE int mp_sockops(struct bpf_sock_ops *skops, bool shortcircuit)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		mp_established(skops, true, shortcircuit);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		mp_established(skops, false, shortcircuit);
		break;
	case BPF_SOCK_OPS_RTT_CB:
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		mp_maybe_evict(skops);
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

/* For cgroups with the short-circuit (AttachOptions::short_circuit). */
SEC("sockops")
int meshpath_sockops(struct bpf_sock_ops *skops)
{
	return mp_sockops(skops, true);
}

/* For cgroups without it: policy tracking only. */
SEC("sockops")
int meshpath_sockops_track(struct bpf_sock_ops *skops)
{
	return mp_sockops(skops, false);
}
