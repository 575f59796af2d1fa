/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The verdict cache: the packet hooks' judgement of a flow, remembered
 * for as long as the policy generation it was made under is live.
 *
 * A packet decision without the cache costs two endpoint lookups (the
 * host hash, then the prefix trie when the address is not a host) and one
 * hash lookup per rule shape in use, twice when the packet may be a
 * reply: 130-230 ns on this project's VM with a large state
 * (benches/policy.rs).  With it, every packet of a flow after the first
 * costs one hash lookup: 36-41 ns.
 *
 * Why it cannot serve a stale verdict:
 *  - the judgement depends only on the policy word (epoch, default,
 *    generation), the endpoint and policy maps of that epoch, and the
 *    packet's addresses, ports, protocol and SYN-only flag, which are the
 *    key;
 *  - every change of the word or the maps bumps the generation (the
 *    library's replace, disable and revocation paths), and an entry is
 *    used only when its generation is the live one.  A program that read
 *    the old word and stores after the flip stores the old generation,
 *    which is never live again (32 bits);
 *  - verdicts that involved an `auth` rule are never stored: they also
 *    depend on the auth map and the clock, which do not bump the
 *    generation;
 *  - counting and flow events still happen per packet, by the caller.
 */
#ifndef MESHPATH_BPF_VCACHE_H
#define MESHPATH_BPF_VCACHE_H

#include "common.h"
#include "settings.h"

#ifndef MP_VCACHE_ENTRIES
#define MP_VCACHE_ENTRIES 16384 /* default; the library sets max_entries */
#endif

/*
 * meshpath_verdict_cache_v2: key struct mp_vcache_key, value struct
 * mp_vcache_value.  Written and read by the packet hooks (XDP,
 * cgroup_skb) through mp_policy_packet_j; the library only sizes it and
 * turns it on or off (mp_settings.verdict_cache).  LRU: a flood of new
 * flows evicts old entries, it never fails a packet.  One LRU list for
 * all CPUs: with BPF_F_NO_COMMON_LRU each CPU could keep only
 * max_entries / possible CPUs of the flows it inserts, a few dozen on a
 * large machine whose flows arrive on one receive queue.  Only misses
 * insert, so the shared list's lock is taken once per flow, not per
 * packet.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MP_VCACHE_ENTRIES);
	__type(key, struct mp_vcache_key);
	__type(value, struct mp_vcache_value);
} meshpath_verdict_cache_v2 SEC(".maps");

MP_ALWAYS_INLINE bool mp_vcache_on(void)
{
	struct mp_settings *cfg = mp_settings();

	return cfg && cfg->verdict_cache;
}

MP_ALWAYS_INLINE void mp_vcache_key_of(struct mp_vcache_key *k,
				       const __u32 saddr[4],
				       const __u32 daddr[4], __u8 proto,
				       __u16 sport, __u16 dport,
				       bool starts_only)
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
	k->starts_only = starts_only;
	k->pad = 0;
}

/* The cached judgement for `k` made under generation `gen`, or NULL. */
MP_ALWAYS_INLINE struct mp_vcache_value *
mp_vcache_get(const struct mp_vcache_key *k, __u32 gen)
{
	struct mp_vcache_value *v =
	    bpf_map_lookup_elem(&meshpath_verdict_cache_v2, k);

	return v && v->gen == gen ? v : NULL;
}

MP_ALWAYS_INLINE void mp_vcache_put(const struct mp_vcache_key *k,
				    const struct mp_vcache_value *v)
{
	/* A failure only means the next packet is judged in full. */
	bpf_map_update_elem(&meshpath_verdict_cache_v2, k, v, BPF_ANY);
}

#endif /* MESHPATH_BPF_VCACHE_H */
