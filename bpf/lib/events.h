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
 * Whether a packet event for this key goes out now: how many packets it
 * stands for (>= 1), or 0 when an event for the key went out less than
 * the interval ago and the packet is folded into the next one.
 */
MP_ALWAYS_INLINE __u32 mp_event_agg_count(const __u32 saddr[4],
					  const __u32 daddr[4], __u32 ifindex,
					  __u16 dport, __u8 proto, __u8 point,
					  __u8 verdict)
{
	struct mp_settings *cfg = mp_settings();
	struct mp_agg_key k = {};
	struct mp_agg_value *v, fresh = {};
	__u64 now = bpf_ktime_get_ns();
	__u64 interval;

	if (!cfg)
		return 0;
	interval = (__u64)cfg->event_interval_ms * 1000000ULL;
	__builtin_memcpy(k.saddr, saddr, sizeof(k.saddr));
	__builtin_memcpy(k.daddr, daddr, sizeof(k.daddr));
	k.ifindex = ifindex;
	k.dport = dport;
	k.proto = proto;
	k.point = point;
	k.verdict = verdict;
	v = bpf_map_lookup_elem(&meshpath_event_agg, &k);
	if (v) {
		if (now - v->last_ns < interval) {
			__sync_fetch_and_add(&v->suppressed, 1);
			mp_count(MP_C_EVENTS_AGGREGATED);
			return 0;
		}
		v->last_ns = now;
		/* An exchange: a fold on another CPU between a read and a
		 * store of 0 would be lost from the counts. */
		return 1 + __sync_lock_test_and_set(&v->suppressed, 0);
	}
	fresh.last_ns = now;
	bpf_map_update_elem(&meshpath_event_agg, &k, &fresh, BPF_ANY);
	return 1;
}

/*
 * A zeroed event built in place in the ring buffer (the packet hooks: an
 * event on their stack would not fit beside their judging path and the
 * rule lookup's frame, 512 bytes in all), to fill and pass to
 * mp_event_submit.  NULL, counted as lost, when the ring is full.
 */
MP_ALWAYS_INLINE struct mp_flow_event *mp_event_reserve(void)
{
	struct mp_flow_event *ev =
	    bpf_ringbuf_reserve(&meshpath_events_v2, sizeof(*ev), 0);

	if (!ev) {
		mp_count(MP_C_EVENTS_LOST);
		return NULL;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	return ev;
}

MP_ALWAYS_INLINE void mp_event_submit(struct mp_flow_event *ev)
{
	ev->time_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(ev, 0);
}

#endif /* MESHPATH_BPF_EVENTS_H */
