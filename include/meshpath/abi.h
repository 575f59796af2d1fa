/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one definition of everything the BPF programs and the Rust library
 * exchange: map keys, map values, events and constants.
 *
 * Rules (see ARCHITECTURE.md, "The C/Rust boundary"):
 *  - fixed-width types only; every hole is an explicit, zeroed `pad` field,
 *    so hash keys never contain uninitialised bytes;
 *  - every struct reaches BTF through a map's __type(), so libbpf-cargo
 *    generates its Rust twin in the skeleton's `types` module;
 *  - a layout change renames the struct and its map (`_v2`), never reuses;
 *  - tests/abi_layout.rs checks sizes and offsets against the objects' BTF.
 *
 * Addresses are stored as 16 bytes in network byte order; IPv4 addresses
 * are stored v4-mapped (::ffff:a.b.c.d) so that an AF_INET socket and an
 * AF_INET6 socket talking v4-mapped produce the same key.
 */
#ifndef MESHPATH_ABI_H
#define MESHPATH_ABI_H

#ifdef __BPF__
/* vmlinux.h provides the __u* types in BPF programs. */
#else
#include <linux/types.h>
#endif

/* Bumped when any map layout below changes; pinned state carries it
 * (mp_settings.abi_version).  An enum, not a #define, so it reaches BTF. */
enum mp_abi {
	MP_ABI_VERSION = 1,
};

/* ---------------------------------------------------------------------
 * Sockets (short-circuit)
 * ------------------------------------------------------------------- */

/*
 * Key of meshpath_sockets (SOCKHASH) and meshpath_sock_index: one
 * established TCP socket, seen from its own side.  The peer of a socket
 * has the key with local and remote swapped.
 */
struct mp_sock_key {
	__u32 local_ip[4];  /* network byte order, v4-mapped for IPv4 */
	__u32 remote_ip[4]; /* network byte order, v4-mapped for IPv4 */
	__u32 local_port;   /* host byte order */
	__u32 remote_port;  /* host byte order */
	/* netns cookie when both addresses are loopback (the same 4-tuple
	 * can exist in two namespaces), else 0 so that sockets in two
	 * namespaces on this host find each other. */
	__u64 netns;
};

/* How a direction (this socket -> its peer) carries its bytes. */
enum mp_dir_mode {
	/* Nothing sent yet: the first message decides. */
	MP_DIR_UNDECIDED = 0,
	/* Messages go straight into the peer socket. */
	MP_DIR_REDIRECT = 1,
	/* Messages take the TCP stack, for the rest of the connection:
	 * bytes already in the peer's TCP receive queue must be read before
	 * anything redirected, and the kernel reads its sk_msg queue first,
	 * so a direction never goes back from TCP to redirect. */
	MP_DIR_TCP = 2,
};

/* Why a socket is not, or no longer, short-circuited. */
enum mp_sock_reason {
	MP_REASON_NONE = 0,
	MP_REASON_NO_PEER = 1,	   /* peer not in the map when data was sent */
	MP_REASON_BYPASS_PORT = 2, /* port listed in meshpath_bypass_ports */
	MP_REASON_PEER_OPTOUT = 3, /* peer asked to stay on TCP (entry flags) */
	MP_REASON_DRAINING = 4,	   /* datapath is shutting down */
	MP_REASON_SENT_BEFORE = 5, /* bytes went via TCP before enrollment */
	MP_REASON_REDIRECT_ERR = 6, /* kernel refused the redirect */
	MP_REASON_PEER_BUSY = 7,    /* peer's lock held: it busy-polls */
	MP_REASON_PEER_TCP = 8,	    /* peer's direction went TCP: follow it */
};

/* Value of meshpath_sock_state (SK_STORAGE): per-socket state. */
struct mp_sock_state {
	__u64 cookie;	   /* socket cookie */
	__u64 msgs_redir;  /* messages redirected into the peer */
	__u64 bytes_redir; /* bytes redirected into the peer */
	__u64 msgs_tcp;	   /* messages that took the TCP path */
	__u64 bytes_tcp;   /* bytes that took the TCP path */
	__u8 enrolled;	   /* 1 from enrollment until TCP_CLOSE */
	__u8 mode;	   /* enum mp_dir_mode */
	__u8 reason;	   /* enum mp_sock_reason, why mode is TCP */
	__u8 busy_score;   /* evidence that the peer busy-polls, see sk_msg */
	__u8 evicted;	   /* 1 once it left meshpath_sockets before closing */
	__u8 pad0;
	__u16 pad1;
	__u32
	    rcv_nxt0; /* rcv_nxt at enrollment: TCP payload arrived if moved */
	__u32 pad2;
};

/*
 * Value of meshpath_sock_index (HASH keyed by struct mp_sock_key): every
 * enrolled socket, so that a sender can learn about its peer without
 * holding a reference to it.
 */
struct mp_sock_entry {
	__u64 cookie; /* socket cookie of the enrolled socket */
	/* Kernel address of the socket, read (never written) by the peer's
	 * sk_msg program to see whether the socket's lock is held right
	 * now.  Not a reference: only valid while the entry exists. */
	__u64 kaddr;
	__u32 flags; /* MP_SOCK_F_* */
	__u32 pad;
};

/* Bits of mp_sock_entry.flags: what a socket asks of its peers. */
enum mp_sock_flags {
	MP_SOCK_F_NO_REDIRECT = 1 << 0, /* deliver to me through TCP */
	MP_SOCK_F_TX_TCP = 1 << 1,	/* my sends take TCP for good */
	MP_SOCK_F_EVICTED = 1 << 2,	/* I left meshpath_sockets */
	MP_SOCK_F_TX_REDIRECT = 1 << 3, /* my sends have been redirected */
};

/* Key of meshpath_local_nets (LPM_TRIE): addresses whose sockets are on
 * this host (pods in other network namespaces); loopback always is. */
struct mp_lpm_key {
	__u32 prefixlen; /* 0..128, of the v4-mapped form for IPv4 */
	__u32 addr[4];	 /* network byte order, v4-mapped for IPv4 */
};

/* Values of meshpath_bypass_ports (key: port, host order): ports kept
 * off the short-circuit. */
enum mp_bypass_flags {
	MP_BYPASS_F_LOCAL = 1 << 0,  /* match the socket's local port */
	MP_BYPASS_F_REMOTE = 1 << 1, /* match the socket's remote port */
};

/* ---------------------------------------------------------------------
 * Counters: meshpath_counters is a PERCPU_ARRAY of __u64, indexed by
 * enum mp_counter; the library sums the CPUs.
 * ------------------------------------------------------------------- */
enum mp_counter {
	MP_C_SOCK_ENROLLED = 0,	 /* sockets added to meshpath_sockets */
	MP_C_SOCK_REMOVED,	 /* enrolled, not evicted, reached TCP_CLOSE */
	MP_C_SOCK_ENROLL_ERR,	 /* sock_hash_update failed */
	MP_C_SOCK_SKIP_NONLOCAL, /* peer address not local: not enrolled */
	MP_C_SOCK_SKIP_BYPASS,	 /* port in meshpath_bypass_ports */
	MP_C_SOCK_SKIP_FAMILY,	 /* not AF_INET/AF_INET6 */
	MP_C_MSG_REDIRECT,	 /* messages redirected */
	MP_C_BYTES_REDIRECT,	 /* bytes redirected */
	MP_C_MSG_FALLBACK,	 /* messages that took the TCP path */
	MP_C_BYTES_FALLBACK,	 /* bytes that took the TCP path */
	MP_C_FALLBACK_NO_PEER,	 /* ... because the peer was not in the map */
	MP_C_FALLBACK_STICKY,	 /* ... because the direction is on TCP */
	MP_C_FALLBACK_PEER_OPTOUT, /* ... because the peer opted out */
	MP_C_FALLBACK_DRAINING,	   /* ... because the datapath is draining */
	MP_C_FALLBACK_NO_STATE,	   /* ... because socket state was missing */
	MP_C_FALLBACK_SENT_BEFORE, /* sockets kept on TCP: bytes went first */
	MP_C_SOCKOPT_OPTOUT,	   /* sockets that opted out (SO_RCVLOWAT) */
	MP_C_FALLBACK_PEER_BUSY,   /* ... because the peer busy-polls */
	MP_C_FALLBACK_PEER_TCP,	   /* ... because the peer went TCP */
	MP_C_SOCK_EVICTED, /* sockets that left the map, both ways TCP */
	MP_C_MAX,
};

/* ---------------------------------------------------------------------
 * Settings: meshpath_settings is an ARRAY with one struct mp_settings,
 * written by the library at any time, read by every program.
 * ------------------------------------------------------------------- */
struct mp_settings {
	__u32 abi_version;    /* MP_ABI_VERSION of the writer */
	__u8 draining;	      /* 1: stop redirecting, let queues empty */
	__u8 shortcircuit;    /* 1: enroll sockets (0 keeps all on TCP) */
	__u8 optout_rcvlowat; /* 1: SO_RCVLOWAT > 1 keeps a socket on TCP */
	__u8 busy_detect;     /* 1: a peer whose lock is held gets TCP */
	__u64 pad1;
};

/*
 * Puts the enums above into every object's BTF (through a read-only
 * global, see bpf/lib/common.h), so that libbpf-cargo generates their Rust
 * twins: the library reads counter indices and reasons from there.
 */
struct mp_abi_anchor {
	enum mp_abi abi;
	enum mp_sock_flags sock_flags;
	enum mp_bypass_flags bypass_flags;
	enum mp_counter counter;
	enum mp_dir_mode dir_mode;
	enum mp_sock_reason reason;
};

#endif /* MESHPATH_ABI_H */
