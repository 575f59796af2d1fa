// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Policy on every packet a workload of an attached cgroup receives or
 * sends (cgroup_skb ingress and egress), whoever the other end is: a
 * process outside the cgroup, another network namespace, another host.
 * Denied packets are dropped before the application sees them (ingress)
 * or before they leave (egress).
 *
 * Stateless (mp_policy_packet): a packet passes when the flow it starts
 * is allowed, or when it can be a reply in an allowed flow; a TCP SYN
 * only starts flows.  So a policy change applies to established flows at
 * their next packet.  Data starts at the network header here.
 */
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

MP_ALWAYS_INLINE int mp_skb_judge(struct __sk_buff *skb, __u32 point)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 word = mp_policy_word();
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
		return 0;
	}
	syn_only = p.proto == MP_PROTO_TCP &&
		   (p.tcp_flags & (MP_TCP_SYN | MP_TCP_ACK)) == MP_TCP_SYN;
	verdict = mp_policy_packet(word, point, p.saddr, p.daddr, p.proto,
				   p.sport, p.dport, syn_only);
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
