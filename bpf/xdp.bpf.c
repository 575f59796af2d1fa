// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Policy on every packet a network device receives (XDP, native where
 * the driver allows, generic otherwise), before the kernel's stack sees
 * it: Ethernet, up to two VLAN tags (802.1Q 0x8100, 802.1ad 0x88A8),
 * then IPv4/IPv6 and TCP/UDP/ICMP through lib/parse.h, judged like
 * cgroup_skb judges (lib/policy.h, mp_policy_packet): with connection
 * tracking (lib/ct.h), a packet passes when policy allows the flow it
 * starts or when it belongs to a tracked flow that policy still allows.
 * Replies to flows that workloads behind this device started are tracked
 * by the cgroup_skb egress of their (attached) cgroups: meshpath_ct_v2 is
 * one map for every hook.
 *
 * Verdicts (counted at MP_POINT_XDP in meshpath_verdicts; see also
 * ARCHITECTURE.md, "Packets (XDP)"):
 *
 *   policy off                              XDP_PASS, not counted
 *   not IPv4/IPv6 after Ethernet/VLAN (ARP) XDP_PASS, MP_V_NOT_IP
 *   non-first IP fragment (no L4 header)    XDP_PASS, MP_V_FRAGMENT
 *                                           (its first fragment is judged:
 *                                           without it nothing reassembles)
 *   truncated Ethernet or VLAN header,
 *   a third VLAN tag, truncated or invalid
 *   IP header (version, ihl < 5, ihl past
 *   the end), truncated TCP/UDP/ICMP header,
 *   TCP doff < 5, an IPv6 extension header
 *   past the end or more of them than the
 *   parser follows                          XDP_DROP, MP_V_MALFORMED
 *   anything else                           policy: MP_V_ALLOW / MP_V_AUDIT
 *                                           pass, MP_V_DENY /
 *                                           MP_V_AUTH_REQUIRED drop
 *
 * Verdicts other than allow are also reported as flow events (packet
 * events, aggregated per flow key and interval: lib/events.h), as
 * cgroup_skb reports them, with the receiving interface's index.
 *
 * IP protocols other than TCP, UDP and ICMP are judged with port 0: only
 * port-less rules match them.  A third VLAN tag is refused rather than
 * passed as "not IP": nested VLAN devices could deliver what is inside it
 * to the stack unjudged.
 */
#include "lib/common.h"
#include "lib/events.h"
#include "lib/parse.h"
#include "lib/policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MP_ETH_P_8021Q	0x8100
#define MP_ETH_P_8021AD 0x88A8
/* VLAN tags followed; one more is MALFORMED. */
#define MP_MAX_VLAN_TAGS 2

struct mp_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

MP_ALWAYS_INLINE bool mp_is_vlan(__u16 proto)
{
	return proto == MP_ETH_P_8021Q || proto == MP_ETH_P_8021AD;
}

/* Parses Ethernet, VLAN tags and what follows into `p`. */
MP_ALWAYS_INLINE int mp_xdp_parse(void *data, void *data_end, struct mp_pkt *p)
{
	struct ethhdr *eth = data;
	__u16 proto;
	void *l3;
	int i;

	if ((void *)(eth + 1) > data_end)
		return MP_PARSE_MALFORMED;
	proto = bpf_ntohs(eth->h_proto);
	l3 = eth + 1;
#pragma unroll
	for (i = 0; i < MP_MAX_VLAN_TAGS; i++) {
		struct mp_vlan_hdr *vh = l3;

		if (!mp_is_vlan(proto))
			break;
		if ((void *)(vh + 1) > data_end)
			return MP_PARSE_MALFORMED;
		proto = bpf_ntohs(vh->encapsulated_proto);
		l3 = vh + 1;
	}
	if (mp_is_vlan(proto))
		return MP_PARSE_MALFORMED;
	return mp_parse_l3(l3, data_end, proto, p);
}

/* Reports a packet verdict other than allow (aggregated, lib/events.h). */
MP_ALWAYS_INLINE void mp_xdp_event(struct xdp_md *ctx, const struct mp_pkt *p,
				   const struct mp_judgement *j)
{
	struct mp_flow_event *ev;
	__u32 count;

	count =
	    mp_event_agg_count(p->saddr, p->daddr, ctx->ingress_ifindex,
			       p->dport, p->proto, MP_POINT_XDP, j->verdict);
	if (!count)
		return;
	/* Built in the ring: no room on this program's stack. */
	ev = mp_event_reserve();
	if (!ev)
		return;
	__builtin_memcpy(ev->saddr, p->saddr, sizeof(ev->saddr));
	__builtin_memcpy(ev->daddr, p->daddr, sizeof(ev->daddr));
	ev->count = count;
	ev->sport = p->sport;
	ev->dport = p->dport;
	ev->proto = p->proto;
	ev->tcp_flags = p->tcp_flags;
	ev->ipv6 = p->ipv6;
	ev->type = MP_EV_PACKET;
	ev->point = MP_POINT_XDP;
	ev->verdict = j->verdict;
	ev->src_identity = j->src_id;
	ev->dst_identity = j->dst_id;
	ev->rule = j->rule;
	ev->matched = j->matched;
	ev->is_reply = j->is_reply;
	ev->direction = MP_TRAFFIC_INGRESS; /* received by the device */
	ev->ifindex = ctx->ingress_ifindex;
	mp_event_submit(ev);
}

SEC("xdp")
int meshpath_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 word = mp_policy_word();
	struct mp_judgement j;
	struct mp_pkt p = {};
	bool syn_only;

	if (!mp_policy_on(word))
		return XDP_PASS;
	switch (mp_xdp_parse(data, data_end, &p)) {
	case MP_PARSE_OK:
		break;
	case MP_PARSE_FRAGMENT:
		mp_verdict_count(MP_POINT_XDP, MP_V_FRAGMENT);
		return XDP_PASS;
	case MP_PARSE_NOT_IP:
		mp_verdict_count(MP_POINT_XDP, MP_V_NOT_IP);
		return XDP_PASS;
	default:
		mp_verdict_count(MP_POINT_XDP, MP_V_MALFORMED);
		if (mp_events_on()) {
			j.verdict = MP_V_MALFORMED;
			j.src_id = j.dst_id = j.rule = 0;
			j.matched = j.is_reply = 0;
			mp_xdp_event(ctx, &p, &j);
		}
		return XDP_DROP;
	}
	syn_only = p.proto == MP_PROTO_TCP && p.kind == MP_PKT_STARTS;
	mp_policy_packet_j(word, MP_POINT_XDP, MP_LOCAL_DST, p.saddr, p.daddr,
			   p.proto, p.sport, p.dport, p.kind, p.tcp_flags, &j);
	/* As cgroup_skb: drops always reported (aggregated); an audited TCP
	 * flow by the packet that starts it, not by every segment. */
	if (j.verdict != MP_V_ALLOW && mp_events_on() &&
	    !(j.verdict == MP_V_AUDIT && p.proto == MP_PROTO_TCP && !syn_only))
		mp_xdp_event(ctx, &p, &j);
	return mp_verdict_passes(j.verdict) ? XDP_PASS : XDP_DROP;
}
