// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg: runs on every sendmsg/sendfile of an enrolled socket and
 * delivers the message straight into the peer socket's receive queue
 * (redirect with BPF_F_INGRESS), or lets it take the TCP stack.
 *
 * Ordering (ARCHITECTURE.md, "Never reorder"): the kernel's receive path
 * of an enrolled socket reads its sk_msg queue before its TCP receive
 * queue.  So a direction may move from redirect to TCP at any message
 * boundary (queued redirected bytes are older and read first), but never
 * from TCP to redirect (redirected bytes would overtake TCP bytes not yet
 * read).  The first message decides; a direction that once took TCP
 * stays on TCP.
 *
 * Busy-polling peers (ARCHITECTURE.md, "Busy-polling receivers"): a
 * receiver spinning on recv(MSG_DONTWAIT) holds its socket lock most of
 * the time; the redirect must take that lock and sleeps, and the spinner
 * sleeps on the lock the redirect holds: each sleep costs a cross-CPU
 * wakeup.  When the peer is seen, again and again, holding its lock with
 * nothing queued, the connection moves to TCP; sockops then takes both
 * sockets out of the short-circuit once nothing can be lost (see
 * mp_maybe_evict in sockops.bpf.c), so the connection costs exactly what
 * plain TCP costs.
 */
#include "lib/common.h"
#include "lib/policy.h"
#include "lib/psock.h"
#include "lib/settings.h"
#include "lib/sock.h"
#include "lib/stats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Busy evidence: +4 per send that finds the peer in the spinning pattern
 * (mp_sock_looks_busy_polled), -1 per send that does not; TCP at
 * MP_BUSY_THRESHOLD, a few sends into a spinner.  Only peers that also
 * send to us are scored (request/response): the tail of a streaming
 * reader's copy looks the same for a moment, and streaming gains from the
 * short-circuit even when the sender sometimes waits for the reader.
 */
#define MP_BUSY_HIT	  4
#define MP_BUSY_THRESHOLD 16

MP_DEFINE_KEY_FROM_CTX(mp_key_from_msg, struct sk_msg_md)

/* Sends of a connection taken over that may take TCP while waiting for
 * the redirect to become safe, before the direction settles on TCP. */
#define MP_ADOPT_TRIES 255

/*
 * Whether this direction of a connection taken over after it was
 * established (bpf/enroll.bpf.c; `pe` the peer's entry) may start
 * redirecting now.  Until it may, its sends take TCP without deciding
 * (the direction stays undecided), so two conditions suffice:
 *
 * Nothing to overtake: every byte this socket ever queued to TCP has been
 * read by the peer's application (our write_seq is its copied_seq).
 *
 * Nobody to strand: a read of the peer's that entered the plain TCP code
 * before the takeover stays there until it returns, and that code never
 * looks at the sk_msg queue.  The takeover skips sockets with a task
 * asleep in them; what remains is a read that was between entering
 * recvmsg and taking the socket lock at that moment.  It shows as the
 * lock being held, or, once asleep, as one sleeper more than the psock
 * references (reads through the sk_msg path hold one while they sleep;
 * the map holds one); a read preempted before the lock has had
 * adopt_settle_ms to get there.  (A plain sleeper can still hide behind a
 * reference held by a send of the peer's in flight at that instant:
 * ARCHITECTURE.md, "Taking over existing sockets".)
 */
MP_ALWAYS_INLINE bool mp_adopted_may_redirect(struct bpf_sock *sk,
					      const struct mp_sock_entry *pe,
					      const struct mp_settings *cfg)
{
	__u64 settle = (__u64)cfg->adopt_settle_ms * 1000000ULL;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	struct mp_psock_view v;
	__u32 sleepers;

	if (!tp || !pe->kaddr)
		return false;
	if (tp->write_seq != mp_sock_copied_seq(pe->kaddr))
		return false;
	if (!(pe->flags & MP_SOCK_F_ADOPTED))
		return true;
	if (bpf_ktime_get_ns() - pe->adopted_ns < settle)
		return false;
	if (mp_sock_owned(pe->kaddr))
		return false;
	sleepers = mp_sock_syscall_sleepers(pe->kaddr, cfg->woken_wake_fn);
	if (!sleepers)
		return true;
	v = mp_psock_view(pe->kaddr);
	return v.present && sleepers != MP_SLEEPERS_UNKNOWN &&
	       sleepers + 1 <= v.refcnt;
}

/* This direction takes TCP for good; tell the peer through our index
 * entry so that it can follow and both can leave the short-circuit. */
MP_ALWAYS_INLINE void mp_go_tcp(struct mp_sock_state *st,
				const struct mp_sock_key *key, __u8 reason)
{
	struct mp_sock_entry *self;

	st->mode = MP_DIR_TCP;
	st->reason = reason;
	if (!key)
		return;
	self = bpf_map_lookup_elem(&meshpath_sock_index, key);
	if (self)
		__sync_fetch_and_or(&self->flags, MP_SOCK_F_TX_TCP);
}

MP_ALWAYS_INLINE int mp_fallback(struct mp_sock_state *st,
				 const struct mp_sock_key *key, __u32 size,
				 __u32 counter, __u8 reason)
{
	if (st) {
		if (st->mode != MP_DIR_TCP)
			mp_go_tcp(st, key, reason);
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
	__u64 word;

	sk = msg->sk;
	if (!sk)
		return mp_fallback(NULL, NULL, size, MP_C_FALLBACK_NO_STATE,
				   MP_REASON_NONE);
	st = bpf_sk_storage_get(&meshpath_sock_state, sk, 0, 0);
	if (!st)
		return mp_fallback(NULL, NULL, size, MP_C_FALLBACK_NO_STATE,
				   MP_REASON_NONE);
	if (!mp_key_from_msg(msg, &key))
		return mp_fallback(st, NULL, size, MP_C_FALLBACK_NO_STATE,
				   MP_REASON_NONE);
	/* Policy changed since this flow was judged, or its authentication
	 * expired: judge it again.  A denied flow's messages are dropped (the
	 * sender sees EACCES) until the reset iterator aborts the connection;
	 * an `auth` flow without a live entry asks the agent again. */
	word = mp_policy_word();
	/* Only sockets established in an attached cgroup are judged (the
	 * library's own probe sockets, for instance, are not). */
	if (!st->tracked)
		word = 0;
	if (mp_policy_on(word) &&
	    (st->policy_gen != mp_policy_gen(word) ||
	     (st->auth_expiry_ns &&
	      bpf_ktime_get_ns() >= st->auth_expiry_ns))) {
		struct mp_judgement j;

		mp_policy_sock_flow_j(word, &key, st->client, &j);
		st->verdict = j.verdict;
		st->auth_expiry_ns = j.auth_expiry;
		st->policy_gen = mp_policy_gen(word);
	}
	if (mp_policy_on(word) && !mp_verdict_passes(st->verdict)) {
		mp_verdict_count(MP_POINT_SHORTCIRCUIT, st->verdict);
		return SK_DROP;
	}
	if (st->mode == MP_DIR_TCP)
		return mp_fallback(st, NULL, size, MP_C_FALLBACK_STICKY,
				   st->reason);
	cfg = mp_settings();
	if (!cfg || cfg->draining)
		return mp_fallback(st, &key, size, MP_C_FALLBACK_DRAINING,
				   MP_REASON_DRAINING);

	mp_peer_key(&key, &peer);
	entry = bpf_map_lookup_elem(&meshpath_sock_index, &peer);
	if (!entry)
		return mp_fallback(st, &key, size, MP_C_FALLBACK_NO_PEER,
				   MP_REASON_NO_PEER);
	if (entry->flags & MP_SOCK_F_NO_REDIRECT)
		return mp_fallback(st, &key, size, MP_C_FALLBACK_PEER_OPTOUT,
				   MP_REASON_PEER_OPTOUT);
	if (entry->flags & MP_SOCK_F_TX_TCP)
		return mp_fallback(st, &key, size, MP_C_FALLBACK_PEER_TCP,
				   MP_REASON_PEER_TCP);
	if (st->mode == MP_DIR_UNDECIDED &&
	    (st->adopted || (entry->flags & MP_SOCK_F_ADOPTED)) &&
	    !mp_adopted_may_redirect(sk, entry, cfg)) {
		if (st->adopt_tries >= MP_ADOPT_TRIES)
			return mp_fallback(st, &key, size,
					   MP_C_FALLBACK_ADOPTED,
					   MP_REASON_ADOPTED);
		/* TCP for this message, the direction still undecided. */
		st->adopt_tries++;
		st->msgs_tcp++;
		st->bytes_tcp += size;
		mp_count(MP_C_FALLBACK_ADOPTED);
		mp_count(MP_C_MSG_FALLBACK);
		mp_count_add(MP_C_BYTES_FALLBACK, size);
		return SK_PASS;
	}

	if (cfg->busy_detect && entry->kaddr &&
	    (entry->flags & MP_SOCK_F_TX_REDIRECT)) {
		if (mp_sock_looks_busy_polled(entry->kaddr)) {
			if (st->busy_score >= MP_BUSY_THRESHOLD - MP_BUSY_HIT)
				return mp_fallback(st, &key, size,
						   MP_C_FALLBACK_PEER_BUSY,
						   MP_REASON_PEER_BUSY);
			st->busy_score += MP_BUSY_HIT;
		} else if (st->busy_score) {
			st->busy_score--;
		}
	}

	if (bpf_msg_redirect_hash(msg, &meshpath_sockets, &peer,
				  BPF_F_INGRESS) != SK_PASS)
		return mp_fallback(st, &key, size, MP_C_FALLBACK_NO_PEER,
				   MP_REASON_NO_PEER);

	if (st->mode != MP_DIR_REDIRECT) {
		struct mp_sock_entry *self;

		st->mode = MP_DIR_REDIRECT;
		self = bpf_map_lookup_elem(&meshpath_sock_index, &key);
		if (self)
			__sync_fetch_and_or(&self->flags,
					    MP_SOCK_F_TX_REDIRECT);
	}
	st->msgs_redir++;
	st->bytes_redir += size;
	/* The peer's received counts, for the connection's close event. */
	if (cfg->events) {
		__sync_fetch_and_add(&entry->rx_msgs, 1);
		__sync_fetch_and_add(&entry->rx_bytes, size);
	}
	mp_count(MP_C_MSG_REDIRECT);
	mp_count_add(MP_C_BYTES_REDIRECT, size);
	return SK_PASS;
}
