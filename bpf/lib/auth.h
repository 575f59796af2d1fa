/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Authentication of `auth` flows: the datapath never does crypto; it
 * asks (a signal on meshpath_auth_signals_v2), the node agent proves the two
 * identities with mutual TLS, and the datapath remembers (meshpath_auth_v2)
 * until an expiry.  Fail closed: no entry, or an expired one, drops.
 */
#ifndef MESHPATH_BPF_AUTH_H
#define MESHPATH_BPF_AUTH_H

#include "common.h"
#include "settings.h"
#include "stats.h"

#ifndef MP_MAX_AUTH
#define MP_MAX_AUTH 16384 /* default; the library sets max_entries */
#endif

/*
 * meshpath_auth_v2: key struct mp_auth_key, value struct mp_auth_value.
 * Written by the library for the agent (after a handshake; deleted on
 * revocation or expiry sweeps), read by every enforcement point for
 * `auth` rules.  Sized for the authenticated identity pairs of a node.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MP_MAX_AUTH);
	__type(key, struct mp_auth_key);
	__type(value, struct mp_auth_value);
} meshpath_auth_v2 SEC(".maps");

/*
 * meshpath_auth_signals_v2: ring buffer of struct mp_auth_signal, read by
 * the library (src/auth.rs) for the agent.  256 KiB: 8,192 signals.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} meshpath_auth_signals_v2 SEC(".maps");

/*
 * meshpath_auth_pending_v2: key struct mp_auth_key, value __u64 time of its
 * last signal.  Programs only: de-duplicates signals per key.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct mp_auth_key);
	__type(value, __u64);
} meshpath_auth_pending_v2 SEC(".maps");

struct mp_auth_rate {
	__u64 window_ns; /* start of the current one-second window */
	__u64 sent;	 /* signals sent in it */
};

/*
 * meshpath_auth_rate: per-CPU token window for signals.  Programs only:
 * a flood of distinct keys cannot overwhelm the agent.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mp_auth_rate);
} meshpath_auth_rate SEC(".maps");

/*
 * meshpath_certs_v2: key __u64 local identity, value struct mp_cert_info.
 * Written by the library for the agent; not read by programs: which
 * certificate proves each local identity, and until when.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct mp_cert_info);
} meshpath_certs_v2 SEC(".maps");

/* The live entry's expiry for `k`, or 0 when there is none (or it has
 * expired). */
MP_ALWAYS_INLINE __u64 mp_auth_expiry(const struct mp_auth_key *k)
{
	struct mp_auth_value *v = bpf_map_lookup_elem(&meshpath_auth_v2, k);
	__u64 now = bpf_ktime_get_ns();

	if (!v || v->expiry_ns <= now)
		return 0;
	return v->expiry_ns;
}

/* Asks the agent to authenticate `k`: at most one signal per key per
 * interval, at most auth_signal_rate per second and CPU. */
MP_ALWAYS_INLINE void mp_auth_signal(const struct mp_auth_key *k, __u32 point)
{
	struct mp_settings *cfg = mp_settings();
	struct mp_auth_signal sig = {};
	struct mp_auth_rate *rate;
	__u64 now = bpf_ktime_get_ns();
	__u64 *last, interval;
	__u32 zero = 0;

	if (!cfg)
		return;
	interval = (__u64)cfg->auth_signal_interval_ms * 1000000ULL;
	last = bpf_map_lookup_elem(&meshpath_auth_pending_v2, k);
	if (last && now - *last < interval) {
		mp_count(MP_C_AUTH_SIGNALS_DEDUP);
		return;
	}
	rate = bpf_map_lookup_elem(&meshpath_auth_rate, &zero);
	if (!rate)
		return;
	if (now - rate->window_ns >= 1000000000ULL) {
		rate->window_ns = now;
		rate->sent = 0;
	}
	if (rate->sent >= cfg->auth_signal_rate) {
		mp_count(MP_C_AUTH_SIGNALS_DROPPED);
		return;
	}
	sig.time_ns = now;
	sig.key = *k;
	sig.point = point;
	if (bpf_ringbuf_output(&meshpath_auth_signals_v2, &sig, sizeof(sig),
			       0)) {
		mp_count(MP_C_AUTH_SIGNALS_DROPPED);
		return;
	}
	rate->sent++;
	bpf_map_update_elem(&meshpath_auth_pending_v2, k, &now, BPF_ANY);
	mp_count(MP_C_AUTH_SIGNALS);
}

#endif /* MESHPATH_BPF_AUTH_H */
