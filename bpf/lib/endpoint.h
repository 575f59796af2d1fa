/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Endpoints: which workload identity an address belongs to.
 *
 * Two copies (epoch 0 and 1, see abi.h); the policy word's epoch bit says
 * which one is live.  Longest prefix wins; an address no prefix covers has
 * the reserved identity MP_ID_WORLD.
 */
#ifndef MESHPATH_BPF_ENDPOINT_H
#define MESHPATH_BPF_ENDPOINT_H

#include "common.h"

#ifndef MP_MAX_ENDPOINTS
#define MP_MAX_ENDPOINTS 16384 /* default; the library sets max_entries */
#endif

/*
 * meshpath_hosts_v2_0 / _1: key struct mp_host_key (a whole v4-mapped
 * address), value struct mp_endpoint: the endpoints that are single
 * addresses (/32, /128), which is what most workloads are.  Looked up
 * before the trie: an exact match is always the longest prefix, and a
 * hash lookup costs ~30 ns where a walk of a 100,000-entry trie costs
 * ~125 ns (ARCHITECTURE.md, "The verdict cache").  Written by the
 * library (policy.rs) with the tries, read by every enforcement point.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_ENDPOINTS);
	__type(key, struct mp_host_key);
	__type(value, struct mp_endpoint);
} meshpath_hosts_v2_0 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_ENDPOINTS);
	__type(key, struct mp_host_key);
	__type(value, struct mp_endpoint);
} meshpath_hosts_v2_1 SEC(".maps");

/*
 * meshpath_endpoints_v2_0 / _1: key struct mp_lpm_key (prefix of the
 * v4-mapped address), value struct mp_endpoint: the endpoints that are
 * prefixes.  Written by the library (policy.rs), read by every
 * enforcement point when the address is not in meshpath_hosts.  Sized
 * for the node's workload prefixes.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MP_MAX_ENDPOINTS);
	__type(key, struct mp_lpm_key);
	__type(value, struct mp_endpoint);
} meshpath_endpoints_v2_0 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MP_MAX_ENDPOINTS);
	__type(key, struct mp_lpm_key);
	__type(value, struct mp_endpoint);
} meshpath_endpoints_v2_1 SEC(".maps");

/*
 * meshpath_identities_v2: key __u64 numeric identity, value struct
 * mp_identity_name.  Written by the library with every policy change;
 * not read by programs: it lets observers and a restarted agent turn
 * numbers back into names.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_ENDPOINTS);
	__type(key, __u64);
	__type(value, struct mp_identity_name);
} meshpath_identities_v2 SEC(".maps");

/* The endpoint of a 16-byte (v4-mapped) address in the given epoch: its
 * identity (MP_ID_WORLD when no endpoint covers it) and node.  The
 * address itself first, then the longest prefix that covers it. */
MP_ALWAYS_INLINE struct mp_endpoint mp_endpoint_of(__u64 word,
						   const __u32 addr[4])
{
	struct mp_lpm_key k = {.prefixlen = 128};
	struct mp_endpoint out = {.identity = MP_ID_WORLD};
	struct mp_host_key h;
	struct mp_endpoint *e;
	bool one = word & MP_POLICY_EPOCH_BIT;

	h.addr[0] = k.addr[0] = addr[0];
	h.addr[1] = k.addr[1] = addr[1];
	h.addr[2] = k.addr[2] = addr[2];
	h.addr[3] = k.addr[3] = addr[3];
	if (one)
		e = bpf_map_lookup_elem(&meshpath_hosts_v2_1, &h);
	else
		e = bpf_map_lookup_elem(&meshpath_hosts_v2_0, &h);
	if (!e) {
		if (one)
			e = bpf_map_lookup_elem(&meshpath_endpoints_v2_1, &k);
		else
			e = bpf_map_lookup_elem(&meshpath_endpoints_v2_0, &k);
	}
	if (e)
		out = *e;
	return out;
}

/* The identity alone. */
MP_ALWAYS_INLINE __u64 mp_identity_of(__u64 word, const __u32 addr[4])
{
	return mp_endpoint_of(word, addr).identity;
}

#endif /* MESHPATH_BPF_ENDPOINT_H */
