// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Policy on every packet a workload of an attached cgroup receives or
 * sends (cgroup_skb ingress and egress), whoever the other end is: a
 * process outside the cgroup, another network namespace, another host.
 * Denied packets are dropped before the application sees them (ingress)
 * or before they leave (egress).
 *
 * Stateful (mp_policy_packet, lib/ct.h): a packet passes when policy
 * allows the flow it starts, or when it belongs to a tracked flow (in
 * either direction) that policy still allows; a reply passes only when its
 * flow really was allowed and started.  So a policy change applies to
 * established flows at their next packet.  Data starts at the network
 * header here.
 */
#include "lib/common.h"
#include "lib/events.h"
#include "lib/parse.h"
#include "lib/policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Reports a packet verdict other than allow (aggregated). */
MP_ALWAYS_INLINE void mp_skb_event(struct __sk_buff *skb, __u32 point,
				   const struct mp_pkt *p,
				   const struct mp_judgement *j)
{
	struct mp_flow_event *ev;
	__u32 count;

	count = mp_event_agg_count(p->saddr, p->daddr, skb->ifindex, p->dport,
				   p->proto, point, j->verdict);
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
	ev->point = point;
	ev->verdict = j->verdict;
	ev->src_identity = j->src_id;
	ev->dst_identity = j->dst_id;
	ev->rule = j->rule;
	ev->matched = j->matched;
	ev->is_reply = j->is_reply;
	ev->direction =
	    point == MP_POINT_INGRESS ? MP_TRAFFIC_INGRESS : MP_TRAFFIC_EGRESS;
	ev->ifindex = skb->ifindex;
	ev->cookie = bpf_get_socket_cookie(skb);
	ev->cgroup_id = bpf_skb_cgroup_id(skb);
	mp_event_submit(ev);
}

MP_ALWAYS_INLINE int mp_skb_judge(struct __sk_buff *skb, __u32 point)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 word = mp_policy_word();
	struct mp_judgement j;
	struct mp_pkt p = {};
	__u32 verdict;
	bool syn_only;
	int r;

	if (!mp_policy_on(word))
		return 1;
	r = mp_parse_l3(data, data_end, bpf_ntohs(skb->protocol), &p);
	switch (r) {
	case MP_PARSE_OK:
		break;
	case MP_PARSE_FRAGMENT:
		mp_verdict_count(point, MP_V_FRAGMENT);
		return 1;
	case MP_PARSE_NOT_IP:
		mp_verdict_count(point, MP_V_NOT_IP);
		return 1;
	default:
		mp_verdict_count(point, MP_V_MALFORMED);
		if (mp_events_on()) {
			j.verdict = MP_V_MALFORMED;
			j.src_id = j.dst_id = j.rule = 0;
			j.matched = j.is_reply = 0;
			mp_skb_event(skb, point, &p, &j);
		}
		return 0;
	}
	syn_only = p.proto == MP_PROTO_TCP && p.kind == MP_PKT_STARTS;
	mp_policy_packet_j(
	    word, point,
	    point == MP_POINT_INGRESS ? MP_LOCAL_DST : MP_LOCAL_SRC, p.saddr,
	    p.daddr, p.proto, p.sport, p.dport, p.kind, p.tcp_flags, &j);
	verdict = j.verdict;
	/* Drops are always reported (aggregated).  An audited TCP flow is
	 * reported by the packet that starts it, not by every segment. */
	if (verdict != MP_V_ALLOW && mp_events_on() &&
	    !(verdict == MP_V_AUDIT && p.proto == MP_PROTO_TCP && !syn_only))
		mp_skb_event(skb, point, &p, &j);
	return mp_verdict_passes(verdict) ? 1 : 0;
}

SEC("cgroup_skb/ingress")
int meshpath_ingress(struct __sk_buff *skb)
{
	return mp_skb_judge(skb, MP_POINT_INGRESS);
}

SEC("cgroup_skb/egress")
int meshpath_egress(struct __sk_buff *skb)
{
	return mp_skb_judge(skb, MP_POINT_EGRESS);
}
