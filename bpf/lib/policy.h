/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Policy: (source identity, destination identity, protocol, destination
 * port) -> action, with wildcards, and the counters of every verdict.
 *
 * Precedence (also in ARCHITECTURE.md, "Policy"; tested in
 * tests/policy.rs and src/policy/ unit tests):
 *  1. a matching `deny` wins over everything;
 *  2. otherwise the most specific matching rule wins: more non-wildcard
 *     fields first; between rules with as many, the one whose source is
 *     given, then destination, then port, then protocol (mp_shape_order);
 *  3. no match: the default action (the policy word).
 * Two rules with the same key cannot exist: the library keeps the most
 * restrictive action (deny > auth > audit > allow) when compiling.
 *
 * An `auth` rule passes only while the pair is authenticated; until the
 * auth map exists (mutual-auth work) it drops and counts "auth required".
 */
#ifndef MESHPATH_BPF_POLICY_H
#define MESHPATH_BPF_POLICY_H

#include "auth.h"
#include "common.h"
#include "ct.h"
#include "endpoint.h"
#include "settings.h"
#include "sock.h"
#include "vcache.h"

#ifndef MP_MAX_POLICIES
#define MP_MAX_POLICIES 16384 /* default; the library sets max_entries */
#endif

/*
 * meshpath_policy_v2_0 / _1: key struct mp_policy_key, value struct
 * mp_policy_value.  Written by the library, read by every enforcement
 * point.  Sized for the compiled rules (one per rule and port).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_POLICIES);
	__type(key, struct mp_policy_key);
	__type(value, struct mp_policy_value);
} meshpath_policy_v2_0 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_POLICIES);
	__type(key, struct mp_policy_key);
	__type(value, struct mp_policy_value);
} meshpath_policy_v2_1 SEC(".maps");

/*
 * meshpath_policy_shapes: key __u32 epoch (0, 1), value __u32 bit set of
 * the key shapes (enum mp_shape_bits combinations) that rules of that
 * epoch use.  Written by the library with the rules; read here so that a
 * decision looks up only shapes that can match.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} meshpath_policy_shapes SEC(".maps");

/*
 * meshpath_verdicts: key __u32 point * MP_V_MAX + verdict (enum mp_point,
 * enum mp_verdict), value __u64 per CPU.  Written by every enforcement
 * point, summed by the library (stats.rs).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MP_POINT_MAX *MP_V_MAX);
	__type(key, __u32);
	__type(value, __u64);
} meshpath_verdicts SEC(".maps");

MP_ALWAYS_INLINE void mp_verdict_count(__u32 point, __u32 verdict)
{
	__u32 idx = point * MP_V_MAX + verdict;
	__u64 *v = bpf_map_lookup_elem(&meshpath_verdicts, &idx);

	if (v)
		*v += 1;
}

/* The policy word, loaded once (see enum mp_policy_word). */
MP_ALWAYS_INLINE __u64 mp_policy_word(void)
{
	struct mp_settings *cfg = mp_settings();

	return cfg ? *(volatile __u64 *)&cfg->policy : 0;
}

MP_ALWAYS_INLINE bool mp_policy_on(__u64 word)
{
	return word & MP_POLICY_ON_BIT;
}

MP_ALWAYS_INLINE __u32 mp_policy_gen(__u64 word)
{
	return word >> MP_POLICY_GEN_SHIFT;
}

/*
 * Shapes from most to least specific (see the precedence above), one per
 * nibble, lowest first: 15, 7, 11, 13, 14, 3, 5, 9, 6, 10, 12, 1, 2, 4, 8,
 * 0.  (A constant, not a static array: clang 14 emits BTF for a static
 * .rodata array that the kernel rejects.)
 */
#define MP_SHAPE_ORDER 0x08421ca6953edb7fULL

struct mp_decision {
	__u8 action;  /* enum mp_action, never NONE: the default is applied */
	__u8 matched; /* 1 if a rule matched, 0 if the default applied */
	__u32 rule;   /* the matching rule's number */
};

/*
 * The rule lookup, as a global BPF function: the verifier checks it once,
 * on its own, instead of once per path of every caller (inlined twice in
 * the packet hooks it exceeded the verifier's instruction budget).  Global
 * functions take and return scalars (identities are 64-bit scalars): the
 * result packs action (bits 0-7), matched (bit 8) and the rule number
 * (bits 32-63).
 */
__attribute__((noinline)) __u64
mp_policy_lookup(__u64 word, __u64 src, __u64 dst, __u32 proto, __u32 dport)
{
	__u32 epoch = word & MP_POLICY_EPOCH_BIT;
	struct mp_policy_value *v;
	struct mp_policy_key k;
	__u64 best = 0;
	__u32 *shapes;
	__u32 i;

	shapes = bpf_map_lookup_elem(&meshpath_policy_shapes, &epoch);
	if (!shapes || !*shapes)
		return 0;
		/* Unrolled: clang 14 lays this loop out entered in the middle
		 * and closed by a fall-through, which verifiers before
		 * Linux 6.7 reject as a back-edge.  Unrolled, each shape is a
		 * constant. */
#pragma unroll
	for (i = 0; i < 16; i++) {
		__u8 s = (MP_SHAPE_ORDER >> (4 * i)) & 0xf;

		if (!(*shapes & (1U << s)))
			continue;
		k.src_id = (s & MP_SHAPE_SRC) ? src : MP_ID_ANY;
		k.dst_id = (s & MP_SHAPE_DST) ? dst : MP_ID_ANY;
		k.dport = (s & MP_SHAPE_PORT) ? dport : 0;
		k.proto = (s & MP_SHAPE_PROTO) ? proto : MP_PROTO_ANY;
		k.pad = 0;
		k.pad1 = 0;
		if (epoch)
			v = bpf_map_lookup_elem(&meshpath_policy_v2_1, &k);
		else
			v = bpf_map_lookup_elem(&meshpath_policy_v2_0, &k);
		if (!v)
			continue;
		if (v->action == MP_ACTION_DENY)
			return MP_ACTION_DENY | (1ULL << 8) |
			       ((__u64)v->rule << 32);
		if (!best)
			best = v->action | (1ULL << 8) | ((__u64)v->rule << 32);
	}
	return best;
}

MP_ALWAYS_INLINE struct mp_decision
mp_policy_decide(__u64 word, __u64 src, __u64 dst, __u8 proto, __u16 dport)
{
	__u64 r = mp_policy_lookup(word, src, dst, proto, dport);
	struct mp_decision d = {
	    .action = r & 0xff,
	    .matched = (r >> 8) & 1,
	    .rule = r >> 32,
	};

	if (!d.matched)
		d.action = (word >> MP_POLICY_DEFAULT_SHIFT) & 0xf;
	if (d.action == MP_ACTION_NONE)
		d.action = MP_ACTION_DENY; /* a malformed word fails closed */
	return d;
}

/* The verdict for an action: whether it passes, and what is counted. */
MP_ALWAYS_INLINE __u32 mp_verdict_of(__u8 action)
{
	switch (action) {
	case MP_ACTION_ALLOW:
		return MP_V_ALLOW;
	case MP_ACTION_AUDIT:
		return MP_V_AUDIT;
	case MP_ACTION_AUTH:
		return MP_V_AUTH_REQUIRED;
	default:
		return MP_V_DENY;
	}
}

MP_ALWAYS_INLINE bool mp_verdict_passes(__u32 verdict)
{
	return verdict == MP_V_ALLOW || verdict == MP_V_AUDIT;
}

/* Which end of a flow is the workload on this node (for `auth`). */
enum mp_local_end {
	MP_LOCAL_SRC = 0, /* connect, sendmsg, egress, a connecting socket */
	MP_LOCAL_DST = 1, /* ingress, XDP, an accepting socket */
};

/* A judgement with what flow events report about it. */
struct mp_judgement {
	__u64 src_id;
	__u64 dst_id;
	__u32 src_node;
	__u32 dst_node;
	__u32 rule;    /* the deciding rule, if matched */
	__u8 verdict;  /* enum mp_verdict */
	__u8 matched;  /* a rule decided (not the default action) */
	__u8 is_reply; /* passed as a reply in an allowed flow */
	__u8 pad;
	__u64 auth_expiry; /* an `auth` rule passed: until then (ns) */
};

/*
 * The verdict of an action for the flow src -> dst: `auth` passes only
 * with a live entry for (local identity, remote identity, remote node),
 * which `local` tells apart; otherwise it signals the agent (rate-limited)
 * and drops.
 */
MP_ALWAYS_INLINE __u32 mp_verdict_for(__u8 action, __u32 point, __u32 local,
				      __u64 src, __u64 dst, __u32 src_node,
				      __u32 dst_node, __u64 *auth_expiry)
{
	struct mp_auth_key k = {};

	if (action != MP_ACTION_AUTH)
		return mp_verdict_of(action);
	if (local == MP_LOCAL_SRC) {
		k.local_id = src;
		k.remote_id = dst;
		k.remote_node = dst_node;
	} else {
		k.local_id = dst;
		k.remote_id = src;
		k.remote_node = src_node;
	}
	*auth_expiry = mp_auth_expiry(&k);
	if (*auth_expiry) {
		mp_count(MP_C_AUTH_OK);
		return MP_V_ALLOW;
	}
	mp_auth_signal(&k, point);
	return MP_V_AUTH_REQUIRED;
}

/* Judges a flow from src to dst (16-byte addresses) on proto/dport,
 * uncounted; MP_V_ALLOW with policy off.  `point` is only recorded in an
 * auth signal. */
MP_ALWAYS_INLINE void mp_policy_judge_j(__u64 word, __u32 point, __u32 local,
					const __u32 saddr[4],
					const __u32 daddr[4], __u8 proto,
					__u16 dport, struct mp_judgement *j)
{
	struct mp_endpoint se, de;
	struct mp_decision d;

	j->is_reply = 0;
	j->auth_expiry = 0;
	if (!mp_policy_on(word)) {
		j->verdict = MP_V_ALLOW;
		j->matched = 0;
		j->rule = 0;
		j->src_id = j->dst_id = MP_ID_ANY;
		j->src_node = j->dst_node = 0;
		return;
	}
	se = mp_endpoint_of(word, saddr);
	de = mp_endpoint_of(word, daddr);
	j->src_id = se.identity;
	j->dst_id = de.identity;
	j->src_node = se.node;
	j->dst_node = de.node;
	d = mp_policy_decide(word, j->src_id, j->dst_id, proto, dport);
	j->verdict =
	    mp_verdict_for(d.action, point, local, j->src_id, j->dst_id,
			   j->src_node, j->dst_node, &j->auth_expiry);
	j->matched = d.matched;
	j->rule = d.rule;
}

/* The verdict alone of mp_policy_judge_j. */
MP_ALWAYS_INLINE __u32 mp_policy_judge(__u64 word, __u32 point, __u32 local,
				       const __u32 saddr[4],
				       const __u32 daddr[4], __u8 proto,
				       __u16 dport)
{
	struct mp_judgement j;

	mp_policy_judge_j(word, point, local, saddr, daddr, proto, dport, &j);
	return j.verdict;
}

/* mp_policy_judge, counted at `point` (nothing is counted with policy
 * off). */
MP_ALWAYS_INLINE __u32 mp_policy_flow(__u64 word, __u32 point, __u32 local,
				      const __u32 saddr[4],
				      const __u32 daddr[4], __u8 proto,
				      __u16 dport)
{
	__u32 verdict =
	    mp_policy_judge(word, point, local, saddr, daddr, proto, dport);

	if (mp_policy_on(word))
		mp_verdict_count(point, verdict);
	return verdict;
}

/* Fills `j` from a cached judgement (never one involving `auth`: the
 * nodes and the expiry only matter for those). */
MP_ALWAYS_INLINE void mp_judgement_of_cached(struct mp_judgement *j,
					     const struct mp_vcache_value *c)
{
	j->src_id = c->src_id;
	j->dst_id = c->dst_id;
	j->src_node = j->dst_node = 0;
	j->rule = c->rule;
	j->verdict = c->verdict;
	j->matched = c->matched;
	j->is_reply = c->is_reply;
	j->auth_expiry = 0;
}

/* The judgement of `j` as the verdict cache and meshpath_ct_v2 keep it. */
MP_ALWAYS_INLINE void mp_cached_of(struct mp_vcache_value *c, __u32 gen,
				   const struct mp_judgement *j)
{
	c->gen = gen;
	c->src_id = j->src_id;
	c->dst_id = j->dst_id;
	c->rule = j->rule;
	c->verdict = j->verdict;
	c->matched = j->matched;
	c->is_reply = 0;
	c->pad = 0;
	c->pad1 = 0;
}

/*
 * Judges the flow saddr -> daddr:dport (its original direction) for a
 * packet of it: from its entry's judgement when that was made under the
 * live generation (and the verdict cache is on, and no `auth` rule takes
 * part), else in full, and the entry then remembers the new judgement.
 */
MP_ALWAYS_INLINE void mp_ct_judge(__u64 word, __u32 point, __u32 local,
				  const struct mp_ct_key *k,
				  struct mp_ct_value *ct, bool cache,
				  struct mp_judgement *j)
{
	struct mp_ct_value upd;
	bool auth;

	if (cache && ct->judged.gen == mp_policy_gen(word) &&
	    !(ct->flags & MP_CT_F_AUTH)) {
		mp_judgement_of_cached(j, &ct->judged);
		return;
	}
	mp_policy_judge_j(word, point, local, k->saddr, k->daddr, k->proto,
			  k->dport, j);
	auth = j->verdict == MP_V_AUTH_REQUIRED || j->auth_expiry;
	/* Replaced whole (an LRU hash update swaps the element), so that a
	 * reader on another CPU never sees half of it. */
	upd = *ct;
	mp_cached_of(&upd.judged, mp_policy_gen(word), j);
	upd.flags = auth ? upd.flags | MP_CT_F_AUTH : upd.flags & ~MP_CT_F_AUTH;
	bpf_map_update_elem(&meshpath_ct_v2, k, &upd, BPF_EXIST);
}

/*
 * Judges one packet from saddr:sport to daddr:dport, with connection
 * tracking (lib/ct.h): a packet of a tracked flow, in either direction,
 * passes while policy allows the flow's original direction; any other
 * packet is judged as a new flow in its own direction, and enters
 * meshpath_ct_v2 when it passes and can start one (`kind`, enum
 * mp_pkt_kind).  ICMP has no ports: an echo is tracked by its identifier
 * (`sport`), an ICMP error is judged on its own.  `local` says which end
 * of the packet is on this node.  Counted at `point`.
 *
 * New flows' judgements are remembered in the verdict cache
 * (lib/vcache.h) for the policy generation they were made under, unless
 * an `auth` rule took part; tracked flows keep theirs in their entry.
 */
MP_ALWAYS_INLINE void mp_policy_packet_j(__u64 word, __u32 point, __u32 local,
					 const __u32 saddr[4],
					 const __u32 daddr[4], __u8 proto,
					 __u16 sport, __u16 dport, __u8 kind,
					 __u8 tcp_flags, struct mp_judgement *j)
{
	struct mp_vcache_value *hit, put;
	struct mp_vcache_key ck;
	struct mp_ct_value *ct;
	struct mp_ct_key k;
	__u64 now;
	bool cache, auth;
	__u64 id;

	if (!mp_policy_on(word)) {
		mp_policy_judge_j(word, point, local, saddr, daddr, proto,
				  dport, j);
		return;
	}
	cache = mp_vcache_on();
	now = bpf_ktime_get_ns();
	if (kind != MP_PKT_ALONE) {
		/* A packet of a flow it belongs to, original direction. */
		mp_ct_key_of(&k, saddr, daddr, proto, sport, dport);
		ct = kind != MP_PKT_REPLY ? mp_ct_get(&k, now) : NULL;
		if (ct) {
			mp_ct_judge(word, point, local, &k, ct, cache, j);
			if (mp_verdict_passes(j->verdict))
				mp_ct_touch(ct, proto, tcp_flags, false, now);
			mp_verdict_count(point, j->verdict);
			return;
		}
		/* A reply in a tracked flow: judged as that flow.  An ICMP
		 * echo reply carries its request's identifier as it was. */
		if (proto == MP_PROTO_ICMP)
			mp_ct_key_of(&k, daddr, saddr, proto, sport, dport);
		else
			mp_ct_key_of(&k, daddr, saddr, proto, dport, sport);
		ct = kind != MP_PKT_STARTS ? mp_ct_get(&k, now) : NULL;
		if (ct) {
			/* In the flow the ends swap: so does the local one. */
			mp_ct_judge(word, point, local ^ 1, &k, ct, cache, j);
			/* Reported as this packet travels. */
			id = j->src_id;
			j->src_id = j->dst_id;
			j->dst_id = id;
			id = j->src_node;
			j->src_node = j->dst_node;
			j->dst_node = id;
			j->is_reply = 1;
			if (mp_verdict_passes(j->verdict))
				mp_ct_touch(ct, proto, tcp_flags, true, now);
			mp_verdict_count(point, j->verdict);
			return;
		}
	}
	/* A new flow, in this packet's direction. */
	if (cache) {
		mp_vcache_key_of(&ck, saddr, daddr, proto, sport, dport,
				 kind == MP_PKT_STARTS);
		hit = mp_vcache_get(&ck, mp_policy_gen(word));
		if (hit) {
			mp_judgement_of_cached(j, hit);
			goto judged;
		}
	}
	mp_policy_judge_j(word, point, local, saddr, daddr, proto, dport, j);
	auth = j->verdict == MP_V_AUTH_REQUIRED || j->auth_expiry;
	if (cache && !auth) {
		mp_cached_of(&put, mp_policy_gen(word), j);
		mp_vcache_put(&ck, &put);
	}
judged:
	if (mp_verdict_passes(j->verdict) &&
	    (kind == MP_PKT_ANY || kind == MP_PKT_STARTS)) {
		mp_ct_key_of(&k, saddr, daddr, proto, sport, dport);
		mp_cached_of(&put, mp_policy_gen(word), j);
		mp_ct_create(&k, &put,
			     j->verdict == MP_V_AUTH_REQUIRED || j->auth_expiry
				 ? MP_CT_F_AUTH
				 : 0,
			     now);
	}
	mp_verdict_count(point, j->verdict);
}

/* The verdict alone of mp_policy_packet_j. */
MP_ALWAYS_INLINE __u32 mp_policy_packet(__u64 word, __u32 point, __u32 local,
					const __u32 saddr[4],
					const __u32 daddr[4], __u8 proto,
					__u16 sport, __u16 dport, __u8 kind,
					__u8 tcp_flags)
{
	struct mp_judgement j;

	mp_policy_packet_j(word, point, local, saddr, daddr, proto, sport,
			   dport, kind, tcp_flags, &j);
	return j.verdict;
}

/*
 * Judges the TCP flow of the socket keyed `k`, as policy sees it: from the
 * connecting end to the accepting end's port, whichever end asks
 * (`client`: the socket connected; the asking end is the local one for
 * `auth`).  Uncounted.
 */
MP_ALWAYS_INLINE void mp_policy_sock_flow_j(__u64 word,
					    const struct mp_sock_key *k,
					    bool client, struct mp_judgement *j)
{
	if (client)
		mp_policy_judge_j(word, MP_POINT_SHORTCIRCUIT, MP_LOCAL_SRC,
				  k->local_ip, k->remote_ip, MP_PROTO_TCP,
				  k->remote_port, j);
	else
		mp_policy_judge_j(word, MP_POINT_SHORTCIRCUIT, MP_LOCAL_DST,
				  k->remote_ip, k->local_ip, MP_PROTO_TCP,
				  k->local_port, j);
}

/*
 * Enters the established TCP connection of the socket keyed `k` into
 * meshpath_ct_v2 when policy allows it (`j`, from mp_policy_sock_flow_j): the
 * socket iterators do it for connections that existed before a policy was
 * in force, or before their cgroup was attached, so that their replies
 * pass.  An entry already there is left as it is.
 */
MP_ALWAYS_INLINE void mp_ct_track_sock(__u64 word, const struct mp_sock_key *k,
				       bool client,
				       const struct mp_judgement *j)
{
	struct mp_ct_value v = {};
	struct mp_ct_key ck;

	if (!mp_verdict_passes(j->verdict))
		return;
	if (client)
		mp_ct_key_of(&ck, k->local_ip, k->remote_ip, MP_PROTO_TCP,
			     k->local_port, k->remote_port);
	else
		mp_ct_key_of(&ck, k->remote_ip, k->local_ip, MP_PROTO_TCP,
			     k->remote_port, k->local_port);
	mp_cached_of(&v.judged, mp_policy_gen(word), j);
	v.flags = MP_CT_F_REPLIED;
	if (j->auth_expiry)
		v.flags |= MP_CT_F_AUTH;
	v.expires_ns = bpf_ktime_get_ns() + MP_CT_TCP_S * MP_NS_PER_S;
	bpf_map_update_elem(&meshpath_ct_v2, &ck, &v, BPF_NOEXIST);
}

#endif /* MESHPATH_BPF_POLICY_H */
