// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/setsockopt: watches the socket options the short-circuit cannot
 * honour.  The kernel's sk_msg receive path returns as soon as any byte
 * is queued and reports readiness for one byte, whatever SO_RCVLOWAT
 * says; a socket that sets SO_RCVLOWAT > 1 therefore asks its peer to
 * deliver through TCP from now on (bytes already redirected are read
 * first, so nothing is reordered).  Never changes the option itself.
 */
#include "lib/common.h"
#include "lib/settings.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/setsockopt")
int meshpath_setsockopt(struct bpf_sockopt *ctx)
{
	struct mp_sock_entry *entry;
	struct mp_sock_key key = {};
	struct mp_settings *cfg;
	struct bpf_sock *sk = ctx->sk;
	int *val = ctx->optval;

	if (ctx->level != SOL_SOCKET || ctx->optname != SO_RCVLOWAT)
		goto out;
	if ((void *)(val + 1) > ctx->optval_end || *val <= 1)
		goto out;
	cfg = mp_settings();
	if (!cfg || !cfg->optout_rcvlowat)
		goto out;
	if (!sk || sk->protocol != IPPROTO_TCP ||
	    sk->state != BPF_TCP_ESTABLISHED)
		goto out;

	if (sk->family == AF_INET) {
		mp_v4_mapped(key.local_ip, sk->src_ip4);
		mp_v4_mapped(key.remote_ip, sk->dst_ip4);
	} else if (sk->family == AF_INET6) {
		key.local_ip[0] = sk->src_ip6[0];
		key.local_ip[1] = sk->src_ip6[1];
		key.local_ip[2] = sk->src_ip6[2];
		key.local_ip[3] = sk->src_ip6[3];
		key.remote_ip[0] = sk->dst_ip6[0];
		key.remote_ip[1] = sk->dst_ip6[1];
		key.remote_ip[2] = sk->dst_ip6[2];
		key.remote_ip[3] = sk->dst_ip6[3];
	} else {
		goto out;
	}
	key.local_port = sk->src_port;
	key.remote_port = bpf_ntohs(sk->dst_port);
	if (mp_ip_is_loopback(key.local_ip) || mp_ip_is_loopback(key.remote_ip))
		key.netns = bpf_get_netns_cookie(ctx);

	entry = bpf_map_lookup_elem(&meshpath_sock_index, &key);
	if (entry && !(entry->flags & MP_SOCK_F_NO_REDIRECT)) {
		__sync_fetch_and_or(&entry->flags, MP_SOCK_F_NO_REDIRECT);
		mp_count(MP_C_SOCKOPT_OPTOUT);
	}
out:
	/* Options longer than a page reach us truncated: optlen 0 tells the
	 * kernel to use the caller's original buffer.  Shorter ones are
	 * passed on unchanged.  (-1 would skip the kernel's handler.) */
	if (ctx->optlen > 4096)
		ctx->optlen = 0;
	return 1;
}
