// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg: runs on every sendmsg/sendfile of an enrolled socket and
 * delivers the message straight into the peer socket's receive queue
 * (redirect with BPF_F_INGRESS), or lets it take the TCP stack.
 *
 * Ordering (see ARCHITECTURE.md, "Never reorder"): the kernel's receive
 * path of an enrolled socket reads its sk_msg queue before its TCP
 * receive queue.  So a direction may move from redirect to TCP at any
 * message boundary (queued redirected bytes are older and read first),
 * but never from TCP to redirect (redirected bytes would overtake TCP
 * bytes not yet read).  The first message decides; a direction that once
 * took TCP stays on TCP.
 */
#include "lib/common.h"
#include "lib/settings.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

MP_DEFINE_KEY_FROM_CTX(mp_key_from_msg, struct sk_msg_md)

MP_ALWAYS_INLINE int mp_fallback(struct mp_sock_state *st, __u32 size,
				 __u32 counter, __u8 reason)
{
	if (st) {
		if (st->mode != MP_DIR_TCP) {
			st->mode = MP_DIR_TCP;
			st->reason = reason;
		}
		st->msgs_tcp++;
		st->bytes_tcp += size;
	}
	mp_count(counter);
	mp_count(MP_C_MSG_FALLBACK);
	mp_count_add(MP_C_BYTES_FALLBACK, size);
	return SK_PASS;
}

SEC("sk_msg")
int meshpath_sk_msg(struct sk_msg_md *msg)
{
	struct mp_sock_key key = {};
	struct mp_sock_key peer = {};
	struct mp_sock_entry *entry;
	struct mp_sock_state *st;
	struct mp_settings *cfg;
	struct bpf_sock *sk;
	__u32 size = msg->size;

	sk = msg->sk;
	if (!sk)
		return mp_fallback(NULL, size, MP_C_FALLBACK_NO_STATE,
				   MP_REASON_NONE);
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0, 0);
	if (!st)
		return mp_fallback(NULL, size, MP_C_FALLBACK_NO_STATE,
				   MP_REASON_NONE);
	if (st->mode == MP_DIR_TCP)
		return mp_fallback(st, size, MP_C_FALLBACK_STICKY, st->reason);

	cfg = mp_settings();
	if (!cfg || cfg->draining)
		return mp_fallback(st, size, MP_C_FALLBACK_DRAINING,
				   MP_REASON_DRAINING);

	if (!mp_key_from_msg(msg, &key))
		return mp_fallback(st, size, MP_C_FALLBACK_NO_STATE,
				   MP_REASON_NONE);
	mp_peer_key(&key, &peer);
	entry = bpf_map_lookup_elem(&meshpath_sock_index, &peer);
	if (!entry)
		return mp_fallback(st, size, MP_C_FALLBACK_NO_PEER,
				   MP_REASON_NO_PEER);
	if (entry->flags & MP_SOCK_F_NO_REDIRECT)
		return mp_fallback(st, size, MP_C_FALLBACK_PEER_OPTOUT,
				   MP_REASON_PEER_OPTOUT);

	if (bpf_msg_redirect_hash(msg, &meshpath_sockets, &peer,
				  BPF_F_INGRESS) != SK_PASS)
		return mp_fallback(st, size, MP_C_FALLBACK_NO_PEER,
				   MP_REASON_NO_PEER);

	st->mode = MP_DIR_REDIRECT;
	st->msgs_redir++;
	st->bytes_redir += size;
	mp_count(MP_C_MSG_REDIRECT);
	mp_count_add(MP_C_BYTES_REDIRECT, size);
	return SK_PASS;
}
