/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Runtime settings the library may change while programs run. */
#ifndef MESHPATH_BPF_SETTINGS_H
#define MESHPATH_BPF_SETTINGS_H

#include "common.h"

/*
 * meshpath_settings: key __u32 0, value struct mp_settings.
 * Written by the library (datapath.rs) at load and on drain, read by
 * every program.  One entry: an ARRAY lookup is a pointer add.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mp_settings);
} meshpath_settings SEC(".maps");

MP_ALWAYS_INLINE struct mp_settings *mp_settings(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&meshpath_settings, &zero);
}

#endif /* MESHPATH_BPF_SETTINGS_H */
