/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters (enum mp_counter in abi.h), summed by the library. */
#ifndef MESHPATH_BPF_STATS_H
#define MESHPATH_BPF_STATS_H

#include "common.h"

/*
 * meshpath_counters: key __u32 (enum mp_counter), value __u64 per CPU.
 * Written by every program, read by the library (stats.rs), which sums
 * the CPUs.  Per-CPU so the hot path never shares a cache line.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MP_C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} meshpath_counters SEC(".maps");

MP_ALWAYS_INLINE void mp_count_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&meshpath_counters, &idx);

	if (v)
		*v += n;
}

MP_ALWAYS_INLINE void mp_count(__u32 idx)
{
	mp_count_add(idx, 1);
}

#endif /* MESHPATH_BPF_STATS_H */
