/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet parsing from the network header on, shared by cgroup_skb
 * (whose data starts at the network header) and XDP (which parses
 * Ethernet and VLAN tags first).  Direct packet access only, every read
 * bounds-checked against data_end.
 *
 * Verdicts for what does not parse are documented in ARCHITECTURE.md
 * ("Packets (XDP)"): truncated or invalid headers are MALFORMED (dropped
 * while policy is on); non-first fragments carry no L4 header and are
 * FRAGMENT (passed: the first fragment is judged, and no datagram can be
 * reassembled without it); IP protocols other than TCP, UDP, ICMP are
 * judged with port 0 (only port-less rules match them).
 */
#ifndef MESHPATH_BPF_PARSE_H
#define MESHPATH_BPF_PARSE_H

#include "common.h"
#include "ct.h"
#include "sock.h"

#define MP_ETH_P_IP	     0x0800
#define MP_ETH_P_IPV6	     0x86DD
#define MP_IPPROTO_HOPOPTS   0
#define MP_IPPROTO_ICMP	     1
#define MP_IPPROTO_TCP	     6
#define MP_IPPROTO_UDP	     17
#define MP_IPPROTO_ROUTING   43
#define MP_IPPROTO_FRAGMENT  44
#define MP_IPPROTO_AH	     51
#define MP_IPPROTO_ICMPV6    58
#define MP_IPPROTO_NONE	     59
#define MP_IPPROTO_DSTOPTS   60
#define MP_TCP_FIN	     0x01
#define MP_TCP_SYN	     0x02
#define MP_TCP_RST	     0x04
#define MP_TCP_ACK	     0x10
#define MP_ICMP_ECHO_REPLY   0
#define MP_ICMP_ECHO	     8
#define MP_ICMPV6_ECHO	     128
#define MP_ICMPV6_ECHO_REPLY 129
/* IPv6 extension headers followed; a packet with more is MALFORMED. */
#define MP_MAX_EXT_HDRS 8

enum mp_parse {
	MP_PARSE_OK = 0,
	MP_PARSE_MALFORMED,
	MP_PARSE_FRAGMENT,
	MP_PARSE_NOT_IP,
};

struct mp_pkt {
	__u32 saddr[4]; /* v4-mapped for IPv4, network order */
	__u32 daddr[4];
	/* host order; 0 when the protocol has none; ICMP echo and echo
	 * reply: the identifier as sport (what pairs a reply with its
	 * request), 0 as dport */
	__u16 sport;
	__u16 dport;
	__u8 proto;	/* enum mp_proto for TCP/UDP/ICMP(v6), else IANA */
	__u8 tcp_flags; /* TCP only */
	__u8 ipv6;	/* 1 for IPv6 */
	__u8 kind;	/* enum mp_pkt_kind */
};

/* The L4 header at `l4` of protocol `nexthdr`. */
MP_ALWAYS_INLINE int mp_parse_l4(void *l4, void *data_end, __u8 nexthdr,
				 struct mp_pkt *p)
{
	switch (nexthdr) {
	case MP_IPPROTO_TCP: {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return MP_PARSE_MALFORMED;
		if (th->doff < 5)
			return MP_PARSE_MALFORMED;
		p->proto = MP_PROTO_TCP;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->tcp_flags = ((__u8 *)th)[13];
		if ((p->tcp_flags & (MP_TCP_SYN | MP_TCP_ACK)) == MP_TCP_SYN)
			p->kind = MP_PKT_STARTS;
		return MP_PARSE_OK;
	}
	case MP_IPPROTO_UDP: {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return MP_PARSE_MALFORMED;
		p->proto = MP_PROTO_UDP;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		return MP_PARSE_OK;
	}
	case MP_IPPROTO_ICMP:
	case MP_IPPROTO_ICMPV6: {
		__u8 *h = l4;
		__u8 req =
		    nexthdr == MP_IPPROTO_ICMP ? MP_ICMP_ECHO : MP_ICMPV6_ECHO;
		__u8 rep = nexthdr == MP_IPPROTO_ICMP ? MP_ICMP_ECHO_REPLY
						      : MP_ICMPV6_ECHO_REPLY;

		/* type and code */
		if (l4 + 4 > data_end)
			return MP_PARSE_MALFORMED;
		p->proto = MP_PROTO_ICMP;
		if (h[0] != req && h[0] != rep) {
			p->kind = MP_PKT_ALONE;
			return MP_PARSE_OK;
		}
		/* Echo: identifier and sequence follow the checksum. */
		if (l4 + 8 > data_end)
			return MP_PARSE_MALFORMED;
		p->sport = ((__u16)h[4] << 8) | h[5];
		p->kind = h[0] == req ? MP_PKT_STARTS : MP_PKT_REPLY;
		return MP_PARSE_OK;
	}
	default:
		p->proto = nexthdr;
		return MP_PARSE_OK;
	}
}

MP_ALWAYS_INLINE int mp_parse_ipv4(void *l3, void *data_end, struct mp_pkt *p)
{
	struct iphdr *ip = l3;
	__u32 hlen;

	if ((void *)(ip + 1) > data_end)
		return MP_PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return MP_PARSE_MALFORMED;
	hlen = ip->ihl * 4; /* options included: at most 60 */
	if (l3 + hlen > data_end)
		return MP_PARSE_MALFORMED;
	mp_v4_mapped(p->saddr, ip->saddr);
	mp_v4_mapped(p->daddr, ip->daddr);
	/* Fragment offset (13 bits) not zero: a non-first fragment. */
	if (ip->frag_off & bpf_htons(0x1fff)) {
		p->proto = ip->protocol == MP_IPPROTO_ICMP ? MP_PROTO_ICMP
							   : ip->protocol;
		return MP_PARSE_FRAGMENT;
	}
	return mp_parse_l4(l3 + hlen, data_end, ip->protocol, p);
}

MP_ALWAYS_INLINE int mp_parse_ipv6(void *l3, void *data_end, struct mp_pkt *p)
{
	struct ipv6hdr *ip6 = l3;
	__u8 nexthdr;
	void *cur;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return MP_PARSE_MALFORMED;
	if (ip6->version != 6)
		return MP_PARSE_MALFORMED;
	p->ipv6 = 1;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	nexthdr = ip6->nexthdr;
	cur = ip6 + 1;
	/* One turn per extension header, and one for the upper layer. */
	for (i = 0; i <= MP_MAX_EXT_HDRS; i++) {
		switch (nexthdr) {
		case MP_IPPROTO_HOPOPTS:
		case MP_IPPROTO_ROUTING:
		case MP_IPPROTO_DSTOPTS: {
			__u8 *h = cur;

			if ((void *)(h + 2) > data_end)
				return MP_PARSE_MALFORMED;
			nexthdr = h[0];
			cur += ((__u32)h[1] + 1) * 8;
			break;
		}
		case MP_IPPROTO_AH: {
			__u8 *h = cur;

			if ((void *)(h + 2) > data_end)
				return MP_PARSE_MALFORMED;
			nexthdr = h[0];
			cur += ((__u32)h[1] + 2) * 4;
			break;
		}
		case MP_IPPROTO_FRAGMENT: {
			__u8 *h = cur;

			if ((void *)(h + 8) > data_end)
				return MP_PARSE_MALFORMED;
			nexthdr = h[0];
			/* Offset: the high 13 bits of bytes 2-3. */
			if ((((__u16)h[2] << 8) | h[3]) & 0xfff8) {
				p->proto = nexthdr == MP_IPPROTO_ICMPV6
					       ? MP_PROTO_ICMP
					       : nexthdr;
				return MP_PARSE_FRAGMENT;
			}
			cur += 8;
			break;
		}
		case MP_IPPROTO_NONE:
			/* The headers before it must fit too. */
			if (cur > data_end)
				return MP_PARSE_MALFORMED;
			p->proto = MP_IPPROTO_NONE;
			return MP_PARSE_OK;
		default:
			if (cur > data_end)
				return MP_PARSE_MALFORMED;
			return mp_parse_l4(cur, data_end, nexthdr, p);
		}
	}
	/* More extension headers than we follow. */
	return MP_PARSE_MALFORMED;
}

/* Parses from the network header at `l3`, `eth_proto` in host order. */
MP_ALWAYS_INLINE int mp_parse_l3(void *l3, void *data_end, __u16 eth_proto,
				 struct mp_pkt *p)
{
	if (eth_proto == MP_ETH_P_IP)
		return mp_parse_ipv4(l3, data_end, p);
	if (eth_proto == MP_ETH_P_IPV6)
		return mp_parse_ipv6(l3, data_end, p);
	return MP_PARSE_NOT_IP;
}

#endif /* MESHPATH_BPF_PARSE_H */
