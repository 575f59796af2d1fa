/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Read-only looks at a socket's sk_psock (the kernel's per-socket sockmap
 * state), through the socket's kernel address.  All reads are
 * bpf_probe_read_kernel with CO-RE offsets: they never fault and never
 * take a reference, so they are only hints unless the caller knows the
 * socket is alive (see ARCHITECTURE.md, "Leaving the short-circuit").
 */
#ifndef MESHPATH_BPF_PSOCK_H
#define MESHPATH_BPF_PSOCK_H

#include "common.h"

/* include/net/sock.h: low bits of sk_user_data are flags. */
#define MP_SK_USER_DATA_PTRMASK (~7UL)

struct mp_psock_view {
	__u32 refcnt; /* references: 1 per map link + 1 per call in flight */
	bool queue_empty; /* nothing waits in the sk_msg ingress queue */
	bool present;	  /* the socket has a psock at all */
};

MP_ALWAYS_INLINE struct mp_psock_view mp_psock_view(__u64 sk_addr)
{
	struct mp_psock_view v = {};
	struct sock *sk = (struct sock *)(unsigned long)sk_addr;
	struct sk_psock *psock;
	struct list_head *next;
	__u64 ud, head;
	__u32 qlen;

	if (!sk_addr)
		return v;
	ud = (__u64)(unsigned long)BPF_CORE_READ(sk, sk_user_data);
	psock =
	    (struct sk_psock *)(unsigned long)(ud & MP_SK_USER_DATA_PTRMASK);
	if (!psock)
		return v;
	v.present = true;
	v.refcnt = BPF_CORE_READ(psock, refcnt.refs.counter);
	next = BPF_CORE_READ(psock, ingress_msg.next);
	head = (__u64)(unsigned long)psock +
	       bpf_core_field_offset(struct sk_psock, ingress_msg);
	qlen = BPF_CORE_READ(psock, ingress_skb.qlen);
	v.queue_empty = (__u64)(unsigned long)next == head && qlen == 0;
	return v;
}

/* Whether the socket at sk_addr is locked by a task right now. */
MP_ALWAYS_INLINE bool mp_sock_owned(__u64 sk_addr)
{
	struct sock *sk = (struct sock *)(unsigned long)sk_addr;

	return sk_addr && BPF_CORE_READ(sk, sk_lock.owned);
}

/* Whether a task waits on the socket: a blocking reader or writer asleep
 * in it, or an epoll instance watching it. */
MP_ALWAYS_INLINE bool mp_sock_has_waiter(__u64 sk_addr)
{
	struct sock *sk = (struct sock *)(unsigned long)sk_addr;
	struct socket_wq *wq;
	struct list_head *next;
	__u64 head;

	if (!sk_addr)
		return false;
	wq = BPF_CORE_READ(sk, sk_wq);
	if (!wq)
		return false;
	next = BPF_CORE_READ(wq, wait.head.next);
	head = (__u64)(unsigned long)wq +
	       bpf_core_field_offset(struct socket_wq, wait.head);
	return (__u64)(unsigned long)next != head;
}

/* How many wait queue entries mp_sock_syscall_sleepers looks at. */
#define MP_WAITERS_SCANNED  8
#define MP_SLEEPERS_UNKNOWN 255

/*
 * How many tasks sleep inside a read or write on the socket at sk_addr:
 * recv/send and the TCP wait helpers queue a wait entry whose function is
 * woken_wake_function (kernel address `woken_fn`); epoll and poll queue
 * other functions.  MP_SLEEPERS_UNKNOWN when woken_fn is unknown (0) or
 * the queue is longer than MP_WAITERS_SCANNED.
 */
MP_ALWAYS_INLINE __u32 mp_sock_syscall_sleepers(__u64 sk_addr, __u64 woken_fn)
{
	struct sock *sk = (struct sock *)(unsigned long)sk_addr;
	struct wait_queue_entry *e;
	struct socket_wq *wq;
	struct list_head *pos;
	__u32 n = 0;
	__u64 head;
	int i;

	if (!woken_fn)
		return MP_SLEEPERS_UNKNOWN;
	if (!sk_addr)
		return 0;
	wq = BPF_CORE_READ(sk, sk_wq);
	if (!wq)
		return 0;
	head = (__u64)(unsigned long)wq +
	       bpf_core_field_offset(struct socket_wq, wait.head);
	pos = BPF_CORE_READ(wq, wait.head.next);
	for (i = 0; i < MP_WAITERS_SCANNED; i++) {
		if ((__u64)(unsigned long)pos == head || !pos)
			return n;
		e = (struct wait_queue_entry *)((unsigned long)pos -
						bpf_core_field_offset(
						    struct wait_queue_entry,
						    entry));
		if ((__u64)(unsigned long)BPF_CORE_READ(e, func) == woken_fn)
			n++;
		pos = BPF_CORE_READ(pos, next);
	}
	return MP_SLEEPERS_UNKNOWN;
}

/* The socket at sk_addr's copied_seq: the next byte its application will
 * read (a hint, see above). */
MP_ALWAYS_INLINE __u32 mp_sock_copied_seq(__u64 sk_addr)
{
	struct tcp_sock *tp = (struct tcp_sock *)(unsigned long)sk_addr;

	return BPF_CORE_READ(tp, copied_seq);
}

/*
 * The signature of a receiver spinning on recv(MSG_DONTWAIT): it holds
 * its socket lock, has nothing queued to read, and nobody waits on the
 * socket (a blocking reader about to sleep has queued itself before it
 * releases the lock; an epoll user is always queued).
 */
MP_ALWAYS_INLINE bool mp_sock_looks_busy_polled(__u64 sk_addr)
{
	return mp_sock_owned(sk_addr) && !mp_sock_has_waiter(sk_addr) &&
	       mp_psock_view(sk_addr).queue_empty;
}

#endif /* MESHPATH_BPF_PSOCK_H */
