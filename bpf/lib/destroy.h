/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Aborting a TCP socket from a socket iterator (policy resets).
 *
 * bpf_sock_destroy is a kfunc of Linux 6.5+, declared weak so that the
 * objects load on older kernels.  Where the kernel lacks it, or the
 * library asked for it (mp_settings.reset_by_diag), mp_sock_destroy does
 * nothing and returns -EOPNOTSUPP: the iterator then reports the socket
 * (MP_ENROLL_DENIED with its cookie) and the library destroys it from user
 * space through sock_diag's SOCK_DESTROY (src/diag.rs).
 */
#ifndef MESHPATH_BPF_DESTROY_H
#define MESHPATH_BPF_DESTROY_H

#include "common.h"
#include "settings.h"

extern int bpf_sock_destroy(struct sock_common *sk) __ksym __weak;

MP_ALWAYS_INLINE int mp_sock_destroy(struct sock_common *skc)
{
	struct mp_settings *cfg = mp_settings();

	if (!bpf_ksym_exists(bpf_sock_destroy) || !cfg || cfg->reset_by_diag)
		return -95; /* EOPNOTSUPP */
	return bpf_sock_destroy(skc);
}

/* Reports what an iterator did with one socket in its output. */
MP_ALWAYS_INLINE void mp_enroll_report(struct bpf_iter_meta *meta,
				       const struct mp_sock_key *key,
				       __u64 cookie, __u32 outcome, __u16 mode,
				       __u16 flags)
{
	struct mp_enroll_record rec = {
	    .key = *key,
	    .outcome = outcome,
	    .mode = mode,
	    .flags = flags,
	    .cookie = cookie,
	};

	bpf_seq_write(meta->seq, &rec, sizeof(rec));
}

#endif /* MESHPATH_BPF_DESTROY_H */
