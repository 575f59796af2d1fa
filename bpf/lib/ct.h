/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking for the packet hooks (cgroup_skb, XDP): a packet is
 * a reply only when a flow that policy allowed in the other direction
 * really exists, never because it could be one.
 *
 * An entry is made when policy allows a packet that can start a flow (any
 * TCP, UDP or other-protocol packet, an ICMP echo request; not an echo
 * reply or an ICMP error), keyed by that packet's addresses, ports and
 * protocol.  A later packet in the same direction belongs to the flow; one
 * in the other direction is its reply.  Either is judged as the flow is:
 * by the original direction's policy under the live generation, so a
 * policy change that denies the flow stops both directions at their next
 * packet, and one that allows a flow never lets in a "reply" that no
 * allowed packet asked for.  Entries live MP_CT_*_S seconds past their
 * flow's last packet (enum mp_ct_lifetime) and are evicted least recently
 * used first when the map is full; an evicted TCP flow's next packet is
 * judged as a new flow in its own direction.  TCP connections that existed
 * before a policy was in force are entered by the socket iterators
 * (bpf/reset.bpf.c, bpf/enroll.bpf.c) when they judge them.
 */
#ifndef MESHPATH_BPF_CT_H
#define MESHPATH_BPF_CT_H

#include "common.h"

#ifndef MP_CT_ENTRIES
#define MP_CT_ENTRIES 65536 /* default; the library sets max_entries */
#endif

#define MP_NS_PER_S 1000000000ULL

/*
 * What a packet can be in a flow (connection tracking, lib/ct.h): any
 * packet may start a flow or answer one, except these.
 */
enum mp_pkt_kind {
	MP_PKT_ANY = 0,	   /* starts a flow or answers one */
	MP_PKT_STARTS = 1, /* TCP SYN without ACK, ICMP echo: never a reply */
	MP_PKT_REPLY = 2,  /* ICMP echo reply: never starts a flow */
	MP_PKT_ALONE = 3,  /* other ICMP (errors...): judged on its own */
};

/*
 * meshpath_ct_v2: key struct mp_ct_key, value struct mp_ct_value.  Written
 * and read by the packet hooks and the socket iterators; read by the
 * library (Datapath::conntrack).  LRU, one list for all CPUs (see
 * meshpath_verdict_cache_v2): a full map evicts, it never fails a packet.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MP_CT_ENTRIES);
	__type(key, struct mp_ct_key);
	__type(value, struct mp_ct_value);
} meshpath_ct_v2 SEC(".maps");

MP_ALWAYS_INLINE void mp_ct_key_of(struct mp_ct_key *k, const __u32 saddr[4],
				   const __u32 daddr[4], __u8 proto,
				   __u16 sport, __u16 dport)
{
	k->saddr[0] = saddr[0];
	k->saddr[1] = saddr[1];
	k->saddr[2] = saddr[2];
	k->saddr[3] = saddr[3];
	k->daddr[0] = daddr[0];
	k->daddr[1] = daddr[1];
	k->daddr[2] = daddr[2];
	k->daddr[3] = daddr[3];
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* The live entry for `k` (not expired), or NULL. */
MP_ALWAYS_INLINE struct mp_ct_value *mp_ct_get(const struct mp_ct_key *k,
					       __u64 now)
{
	struct mp_ct_value *v = bpf_map_lookup_elem(&meshpath_ct_v2, k);

	return v && v->expires_ns > now ? v : NULL;
}

/* How long a flow lives past a packet, given its flags. */
MP_ALWAYS_INLINE __u64 mp_ct_lifetime(__u8 proto, __u8 flags)
{
	if (proto != MP_PROTO_TCP)
		return MP_CT_DATAGRAM_S * MP_NS_PER_S;
	if (flags & MP_CT_F_CLOSING)
		return MP_CT_TCP_CLOSING_S * MP_NS_PER_S;
	if (flags & MP_CT_F_REPLIED)
		return MP_CT_TCP_S * MP_NS_PER_S;
	return MP_CT_TCP_OPENING_S * MP_NS_PER_S;
}

/*
 * A packet of the flow passed: note a reply and a TCP FIN or RST, and move
 * the deadline (written at most about once a second per flow, so that
 * packets of one flow on several CPUs do not keep writing one line).
 */
MP_ALWAYS_INLINE void mp_ct_touch(struct mp_ct_value *v, __u8 proto,
				  __u8 tcp_flags, bool reply, __u64 now)
{
	__u8 flags = v->flags;
	__u64 until;

	if (reply)
		flags |= MP_CT_F_REPLIED;
	if (proto == MP_PROTO_TCP && (tcp_flags & (0x01 | 0x04))) /* FIN|RST */
		flags |= MP_CT_F_CLOSING;
	if (flags != v->flags)
		v->flags = flags;
	until = now + mp_ct_lifetime(proto, flags);
	if (until > v->expires_ns + MP_NS_PER_S ||
	    (flags & MP_CT_F_CLOSING && until < v->expires_ns))
		v->expires_ns = until;
}

/* Enters the flow `k`, allowed by `judged` (a failure only means its next
 * packet is judged as a new flow again). */
MP_ALWAYS_INLINE void mp_ct_create(const struct mp_ct_key *k,
				   const struct mp_vcache_value *judged,
				   __u8 flags, __u64 now)
{
	struct mp_ct_value v = {
	    .judged = *judged,
	    .flags = flags,
	};

	v.expires_ns = now + mp_ct_lifetime(k->proto, flags);
	bpf_map_update_elem(&meshpath_ct_v2, k, &v, BPF_ANY);
}

#endif /* MESHPATH_BPF_CT_H */
