// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Policy at connect() and sendmsg(): cgroup connect4/6 (TCP, connected
 * UDP) and sendmsg4/6 (unconnected UDP).  A denied flow fails at once with
 * EPERM in the application; no packet leaves.
 *
 * The source identity needs the source address.  It is known when the
 * socket is bound (loopback "pods" bind 127.0.0.x), when sendmsg names it
 * (IP_PKTINFO), or for loopback destinations, where the kernel always
 * picks 127.0.0.1 / ::1 for an unbound socket.  Otherwise the address is
 * chosen by routing after this hook: the connect is counted as
 * MP_V_NO_SOURCE and left to the packet hooks (cgroup_skb egress and
 * ingress, XDP), which judge every packet with real addresses
 * (ARCHITECTURE.md, "Policy").
 */
#include "lib/common.h"
#include "lib/events.h"
#include "lib/policy.h"
#include "lib/sock.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#ifndef IPPROTO_UDP
#define IPPROTO_UDP 17
#endif

MP_ALWAYS_INLINE __u8 mp_sock_proto(struct bpf_sock_addr *ctx)
{
	__u32 p = ctx->protocol;

	if (p == IPPROTO_TCP)
		return MP_PROTO_TCP;
	if (p == IPPROTO_UDP)
		return MP_PROTO_UDP;
	return MP_PROTO_ICMP; /* ping sockets */
}

MP_ALWAYS_INLINE bool mp_all_zero(const __u32 a[4])
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

/* Reports a connect/sendmsg verdict: allowed connects one by one, the
 * rest aggregated (a flood of denied sends cannot fill the ring). */
MP_ALWAYS_INLINE void mp_connect_event(struct bpf_sock_addr *ctx, __u32 point,
				       const __u32 src[4], const __u32 dst[4],
				       __u8 proto, __u16 sport, __u16 dport,
				       const struct mp_judgement *j)
{
	struct mp_flow_event *ev;
	__u32 count = 1;

	if (!(point == MP_POINT_CONNECT && j->verdict == MP_V_ALLOW))
		count = mp_event_agg_count(src, dst, 0, dport, proto, point,
					   j->verdict);
	if (!count)
		return;
	/* Built in the ring: the stack has little room beside the judging
	 * path and the rule lookup's frame. */
	ev = mp_event_reserve();
	if (!ev)
		return;
	__builtin_memcpy(ev->saddr, src, sizeof(ev->saddr));
	__builtin_memcpy(ev->daddr, dst, sizeof(ev->daddr));
	ev->count = count;
	ev->sport = sport;
	ev->dport = dport;
	ev->proto = proto;
	ev->ipv6 =
	    !(dst[0] == 0 && dst[1] == 0 && dst[2] == bpf_htonl(0x0000ffff));
	ev->type = MP_EV_POLICY;
	ev->point = point;
	ev->verdict = j->verdict;
	ev->src_identity = j->src_id;
	ev->dst_identity = j->dst_id;
	ev->rule = j->rule;
	ev->matched = j->matched;
	ev->is_reply = j->is_reply;
	ev->direction = MP_TRAFFIC_EGRESS;
	ev->cookie = bpf_get_socket_cookie(ctx);
	ev->cgroup_id = bpf_get_current_cgroup_id();
	mp_event_submit(ev);
}

/*
 * Judges src:sport -> dst:dport; returns the hook's answer (1 pass, 0
 * EPERM).  TCP connects start flows.  A UDP send may also be a reply in
 * a tracked flow (a server answering with sendto), judged as packets are
 * (mp_policy_packet_j, lib/ct.h).
 */
MP_ALWAYS_INLINE int mp_judge(struct bpf_sock_addr *ctx, __u64 word,
			      __u32 point, __u32 src[4], const __u32 dst[4],
			      __u8 proto, __u16 sport, __u16 dport)
{
	struct mp_judgement j;

	if (mp_all_zero(src)) {
		/* Unbound: for loopback the kernel will pick the loopback
		 * address of the destination's family. */
		if (!mp_ip_is_loopback(dst)) {
			mp_verdict_count(point, MP_V_NO_SOURCE);
			return 1;
		}
		if (dst[2] == bpf_htonl(0x0000ffff))
			mp_v4_mapped(src, bpf_htonl(0x7f000001));
		else
			src[3] = bpf_htonl(1);
	}
	if (proto == MP_PROTO_UDP && sport) {
		mp_policy_packet_j(word, point, MP_LOCAL_SRC, src, dst, proto,
				   sport, dport, MP_PKT_ANY, 0, &j);
	} else {
		mp_policy_judge_j(word, point, MP_LOCAL_SRC, src, dst, proto,
				  dport, &j);
		mp_verdict_count(point, j.verdict);
	}
	if (mp_events_on())
		mp_connect_event(ctx, point, src, dst, proto, sport, dport, &j);
	/* An `auth` flow not yet authenticated is held back, not refused:
	 * the agent was signalled, and the packet hooks drop its packets
	 * until the entry is in place (TCP retransmits its SYN). */
	if (j.verdict == MP_V_AUTH_REQUIRED)
		return 1;
	return mp_verdict_passes(j.verdict) ? 1 : 0;
}

MP_ALWAYS_INLINE __u16 mp_local_port(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	return sk ? sk->src_port : 0; /* host order; 0 before bind */
}

MP_ALWAYS_INLINE int mp_addr4(struct bpf_sock_addr *ctx, __u32 point,
			      __u32 src_ip4)
{
	__u64 word = mp_policy_word();
	__u32 src[4], dst[4];

	if (!mp_policy_on(word))
		return 1;
	if (src_ip4)
		mp_v4_mapped(src, src_ip4);
	else
		src[0] = src[1] = src[2] = src[3] = 0;
	mp_v4_mapped(dst, ctx->user_ip4);
	return mp_judge(ctx, word, point, src, dst, mp_sock_proto(ctx),
			mp_local_port(ctx), bpf_ntohs(ctx->user_port));
}

MP_ALWAYS_INLINE int mp_addr6(struct bpf_sock_addr *ctx, __u32 point,
			      const __u32 *src6)
{
	__u64 word = mp_policy_word();
	__u32 src[4], dst[4];

	if (!mp_policy_on(word))
		return 1;
	src[0] = src6[0];
	src[1] = src6[1];
	src[2] = src6[2];
	src[3] = src6[3];
	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	return mp_judge(ctx, word, point, src, dst, mp_sock_proto(ctx),
			mp_local_port(ctx), bpf_ntohs(ctx->user_port));
}

SEC("cgroup/connect4")
int meshpath_connect4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	return mp_addr4(ctx, MP_POINT_CONNECT, sk ? sk->src_ip4 : 0);
}

SEC("cgroup/connect6")
int meshpath_connect6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 src[4] = {};

	if (sk) {
		src[0] = sk->src_ip6[0];
		src[1] = sk->src_ip6[1];
		src[2] = sk->src_ip6[2];
		src[3] = sk->src_ip6[3];
	}
	return mp_addr6(ctx, MP_POINT_CONNECT, src);
}

SEC("cgroup/sendmsg4")
int meshpath_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 src = ctx->msg_src_ip4;

	if (!src && sk)
		src = sk->src_ip4;
	return mp_addr4(ctx, MP_POINT_SENDMSG, src);
}

SEC("cgroup/sendmsg6")
int meshpath_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 src[4];

	src[0] = ctx->msg_src_ip6[0];
	src[1] = ctx->msg_src_ip6[1];
	src[2] = ctx->msg_src_ip6[2];
	src[3] = ctx->msg_src_ip6[3];
	if (!(src[0] | src[1] | src[2] | src[3]) && sk) {
		src[0] = sk->src_ip6[0];
		src[1] = sk->src_ip6[1];
		src[2] = sk->src_ip6[2];
		src[3] = sk->src_ip6[3];
	}
	return mp_addr6(ctx, MP_POINT_SENDMSG, src);
}
