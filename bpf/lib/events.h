/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow events: every program reports through one ring buffer,
 * meshpath_events_v2, read by the library (src/events.rs).
 *
 * Connect verdicts that pass and the short-circuit's open/close/reset
 * events are reported one by one.  Per-packet verdicts (drops, audits,
 * auth required at ingress/egress/XDP, sendmsg, and denied connects) are
 * aggregated: at most one event per (point, verdict, flow key) per
 * interval, carrying how many packets it stands for, so a flood cannot
 * fill the ring.  Events the ring has no room for are counted
 * (MP_C_EVENTS_LOST), never silently lost.  With mp_settings.events 0
 * nothing is built or reported.
 */
#ifndef MESHPATH_BPF_EVENTS_H
#define MESHPATH_BPF_EVENTS_H

#include "common.h"
#include "settings.h"
#include "stats.h"

#ifndef MP_EVENTS_RING_BYTES
#define MP_EVENTS_RING_BYTES (4 << 20) /* the library sets the size */
#endif

/*
 * meshpath_events_v2: ring buffer of struct mp_flow_event.  Written by every
 * program, read by the library.  4 MiB by default: 32,768 events.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MP_EVENTS_RING_BYTES);
} meshpath_events_v2 SEC(".maps");

/* Key of meshpath_event_agg: what makes packets "the same" for
 * aggregation. */
struct mp_agg_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 ifindex;
	__u16 dport;
	__u8 proto;
	__u8 point;
	__u8 verdict;
	__u8 pad[3];
};

struct mp_agg_value {
	__u64 last_ns;	  /* when an event for this key was last sent */
	__u32 suppressed; /* packets since then */
	__u32 pad;
};

/*
 * meshpath_event_agg: key struct mp_agg_key, value struct mp_agg_value.
 * Written and read by the programs only.  LRU: a flood of distinct keys
 * evicts old ones, which at worst sends one more event.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct mp_agg_key);
	__type(value, struct mp_agg_value);
} meshpath_event_agg SEC(".maps");

MP_ALWAYS_INLINE bool mp_events_on(void)
{
	struct mp_settings *cfg = mp_settings();

	return cfg && cfg->events;
}

MP_ALWAYS_INLINE void mp_event_emit(struct mp_flow_event *ev)
{
	ev->time_ns = bpf_ktime_get_ns();
	if (bpf_ringbuf_output(&meshpath_events_v2, ev, sizeof(*ev), 0))
		mp_count(MP_C_EVENTS_LOST);
}

/*
 * Reports `ev` unless an event for the same key went out less than the
 * interval ago; then the packet is folded into the next one (`count`).
 */
MP_ALWAYS_INLINE void mp_event_aggregate(struct mp_flow_event *ev)
{
	struct mp_settings *cfg = mp_settings();
	struct mp_agg_key k = {};
	struct mp_agg_value *v, fresh = {};
	__u64 now = bpf_ktime_get_ns();
	__u64 interval;

	if (!cfg)
		return;
	interval = (__u64)cfg->event_interval_ms * 1000000ULL;
	__builtin_memcpy(k.saddr, ev->saddr, sizeof(k.saddr));
	__builtin_memcpy(k.daddr, ev->daddr, sizeof(k.daddr));
	k.ifindex = ev->ifindex;
	k.dport = ev->dport;
	k.proto = ev->proto;
	k.point = ev->point;
	k.verdict = ev->verdict;
	v = bpf_map_lookup_elem(&meshpath_event_agg, &k);
	if (v) {
		if (now - v->last_ns < interval) {
			__sync_fetch_and_add(&v->suppressed, 1);
			mp_count(MP_C_EVENTS_AGGREGATED);
			return;
		}
		/* An exchange: a fold on another CPU between a read and a
		 * store of 0 would be lost from the counts. */
		ev->count = 1 + __sync_lock_test_and_set(&v->suppressed, 0);
		v->last_ns = now;
	} else {
		ev->count = 1;
		fresh.last_ns = now;
		bpf_map_update_elem(&meshpath_event_agg, &k, &fresh, BPF_ANY);
	}
	mp_event_emit(ev);
}

#endif /* MESHPATH_BPF_EVENTS_H */
