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
 *  - a layout change renames its map (`_v2`) and bumps MP_ABI_VERSION, so
 *    a pin of the old layout is never reused;
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

/* Bumped when any map layout or meaning below changes; pinned state
 * carries it (mp_settings.abi_version).  An enum, not a #define, so it
 * reaches BTF.  3: single-address endpoints live in meshpath_hosts_{0,1}
 * (2 kept them in the tries, which 3's programs still consult, so a
 * version 2 pin is adopted and migrated by the first policy change).
 * 4: identity numbers are 64-bit (keyed hash, src/policy/identity.rs);
 * every map that carries one has a new name (`_v2`), and a version 2 or 3
 * pin directory is refused (its programs and maps hold 32-bit numbers). */
enum mp_abi {
	MP_ABI_VERSION = 4,
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
	MP_REASON_ADOPTED = 9,	    /* taken over: redirect never safe */
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
	__u8 client;	   /* 1: this end connected (active open) */
	__u8 verdict;	   /* enum mp_verdict of its flow at policy_gen */
	__u8 tracked;	   /* 1: established in an attached cgroup */
	__u32 rcv_nxt0;	   /* rcv_nxt at enrollment: TCP payload if moved */
	__u32 policy_gen;  /* policy generation the verdict was reached at */
	/* For a flow an `auth` rule allows: when its authentication expires
	 * (CLOCK_MONOTONIC ns); the verdict is judged again after.  0: not
	 * an authenticated flow. */
	__u64 auth_expiry_ns;
	__u8 adopted;	  /* 1: taken over after it was established */
	__u8 adopt_tries; /* sends that found the redirect not yet safe */
	__u16 pad0;
	__u32 pad1;
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
	/* Messages and bytes the peer redirected into this socket (added by
	 * the peer's sk_msg), for the short-circuit's close event. */
	__u64 rx_msgs;
	__u64 rx_bytes;
	/* MP_SOCK_F_ADOPTED: when it was taken over (CLOCK_MONOTONIC ns). */
	__u64 adopted_ns;
};

/* Values of meshpath_cgroups (HASH keyed by __u64 cgroup id): what an
 * attached cgroup's sockets get, for programs that do not run through the
 * cgroup's own attachments (the TCP iterator that takes over sockets
 * established before attach). */
enum mp_cgroup_flags {
	MP_CG_SHORTCIRCUIT = 1 << 0,
	MP_CG_POLICY = 1 << 1,
};

/* What the TCP iterator that takes over established sockets
 * (bpf/enroll.bpf.c) did with one socket: mp_enroll_record.outcome. */
enum mp_enroll_outcome {
	MP_ENROLL_TRACKED = 1,	/* tracked for policy; both ways on TCP */
	MP_ENROLL_ENROLLED = 2, /* in the short-circuit map */
	MP_ENROLL_RESET = 3,	/* policy denies its flow: reset */
	/* policy denies it; the iterator could not reset it (no
	 * bpf_sock_destroy before Linux 6.5): the library destroys it
	 * through sock_diag */
	MP_ENROLL_DENIED = 4,
	MP_ENROLL_ERROR = 5, /* the short-circuit map refused it */
	/* a thread sleeps in a read or write on it, inside the plain TCP code
	 * (which never looks at the sk_msg queue): tracked, stays on TCP */
	MP_ENROLL_BLOCKED = 6,
};

/* One record per socket taken over (bpf/enroll.bpf.c) or judged denied
 * (bpf/reset.bpf.c), written to the iterator's output. */
struct mp_enroll_record {
	struct mp_sock_key key;
	__u32 outcome; /* enum mp_enroll_outcome */
	__u16 mode;    /* enum mp_dir_mode of its sends when enrolled */
	__u16 flags;   /* enum mp_enroll_flags */
	__u64 cookie;  /* the socket's cookie (sock_diag matches it) */
};

/* Bits of mp_enroll_record.flags. */
enum mp_enroll_flags {
	/* The kernel refused to turn on the socket's sockops callbacks from
	 * the iterator (bpf_setsockopt TCP_BPF_SOCK_OPS_CB_FLAGS; older
	 * kernels): its index entry outlives it until the library sweeps it
	 * (Datapath::sweep_stale). */
	MP_ENROLL_F_NO_CLOSE_CB = 1 << 0,
};

/* Bits of mp_sock_entry.flags: what a socket asks of its peers. */
enum mp_sock_flags {
	MP_SOCK_F_NO_REDIRECT = 1 << 0, /* deliver to me through TCP */
	MP_SOCK_F_TX_TCP = 1 << 1,	/* my sends take TCP for good */
	MP_SOCK_F_EVICTED = 1 << 2,	/* I left meshpath_sockets */
	MP_SOCK_F_TX_REDIRECT = 1 << 3, /* my sends have been redirected */
	/* I was taken over after my connection was established: a read that
	 * started before may still be inside the plain TCP code, which never
	 * looks at the sk_msg queue; see sk_msg.bpf.c, mp_adopted_unsettled. */
	MP_SOCK_F_ADOPTED = 1 << 4,
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
	MP_C_POLICY_RESET, /* established flows reset: policy now denies */
	MP_C_SOCK_ADOPTED, /* sockets established before attach, taken over */
	MP_C_FALLBACK_ADOPTED, /* ... taken over: redirect not safe yet */
	MP_C_EVENTS_LOST,      /* flow events the ring buffer had no room for */
	MP_C_EVENTS_AGGREGATED,	   /* packets folded into an earlier event */
	MP_C_AUTH_OK,		   /* auth flows that found a live entry */
	MP_C_AUTH_SIGNALS,	   /* auth-required signals sent */
	MP_C_AUTH_SIGNALS_DEDUP,   /* ... not sent: one for the key is recent */
	MP_C_AUTH_SIGNALS_DROPPED, /* ... not sent: rate limit or ring full */
	/* socket() refused to a workload: raw IP, packet or AF_XDP sockets
	 * (bpf/socket.bpf.c); read as 0 from a pin made before it existed */
	MP_C_SOCK_REFUSED,
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
	__u64 policy;	      /* the policy word, see enum mp_policy_word */
	__u8 events;	      /* 1: report flow events (meshpath_events_v2) */
	__u8 verdict_cache;   /* 1: packet hooks cache verdicts per flow
				 (meshpath_verdict_cache_v2) */
	/* 1: the socket iterators leave policy resets to the library, which
	 * destroys the sockets they report through sock_diag (set where the
	 * kernel lacks bpf_sock_destroy, or when asked: lib/destroy.h) */
	__u8 reset_by_diag;
	__u8 pad1;
	__u32 event_interval_ms; /* packet events: at most one per flow key
				    and verdict per interval, with a count */
	__u32 auth_signal_interval_ms; /* one auth-required signal per key
					  per interval */
	__u32 auth_signal_rate; /* at most this many signals per second and
				   CPU; the rest are counted and dropped */
	/* Kernel address of woken_wake_function (the wake function of a task
	 * asleep in a socket read or write), from /proc/kallsyms; 0 when
	 * unknown: sockets taken over then stay on TCP. */
	__u64 woken_wake_fn;
	/* Redirects into a socket taken over wait this long (ms) after it was
	 * taken over; a send before takes TCP for good (see sk_msg.bpf.c). */
	__u32 adopt_settle_ms;
	__u32 pad2;
};

/*
 * mp_settings.policy packs everything a policy decision depends on
 * besides the maps into one aligned 64-bit word: programs load it once
 * and the library stores it once, so no decision ever sees the epoch of
 * one policy state with the default action or generation of another.
 */
enum mp_policy_word {
	MP_POLICY_EPOCH_BIT = 1 << 0, /* live maps: meshpath_*_0 or _1 */
	MP_POLICY_ON_BIT = 1 << 1,    /* 0: no policy, nothing is checked */
	MP_POLICY_DEFAULT_SHIFT = 4,  /* bits 4..7: enum mp_action, no match */
	MP_POLICY_GEN_SHIFT = 32,     /* bits 32..63: bumped on every change */
};

/* ---------------------------------------------------------------------
 * Identities, endpoints, policy
 *
 * Endpoint and policy maps come in two copies, _0 and _1; the policy
 * word's epoch bit says which one programs use.  A whole-state replace
 * fills the idle copy, flips the bit, then brings the other copy up to
 * date: every decision sees one complete state, old or new.
 * ------------------------------------------------------------------- */

/* Numeric identities (64-bit) below MP_ID_FIRST_DERIVED are reserved;
 * the others are derived from the workload's SPIFFE ID with a keyed hash
 * the cluster shares (src/policy/identity.rs). */
enum mp_identity_reserved {
	MP_ID_ANY = 0,	 /* wildcard in policy keys; no endpoint has it */
	MP_ID_HOST = 1,	 /* this node */
	MP_ID_WORLD = 2, /* an address no endpoint covers */
	MP_ID_FIRST_DERIVED = 256,
};

/* Value of meshpath_identities_v2 (HASH keyed by __u64 identity): the name
 * the number was derived from, for observers and restarted agents.
 * Names longer than MP_IDENTITY_NAME_MAX bytes are refused. */
enum mp_identity_limits {
	MP_IDENTITY_NAME_MAX = 252,
};

struct mp_identity_name {
	__u32 len;
	__u8 name[252]; /* MP_IDENTITY_NAME_MAX, not NUL-terminated */
};

/* Key of meshpath_hosts_v2_{0,1} (HASH): one whole address, the endpoints
 * that are not prefixes (/32, /128). */
struct mp_host_key {
	__u32 addr[4]; /* network byte order, v4-mapped for IPv4 */
};

/* Value of meshpath_endpoints_v2_{0,1} (LPM_TRIE keyed by struct
 * mp_lpm_key) and of meshpath_hosts_v2_{0,1}: the identity of the
 * addresses under the prefix. */
struct mp_endpoint {
	__u64 identity;
	__u32 node; /* the node it runs on (src/policy: node_number), 0: this
		       node */
	__u32 pad;
};

/* Protocols in policy keys: IANA numbers; ICMPv6 is keyed as ICMP. */
enum mp_proto {
	MP_PROTO_ANY = 0,
	MP_PROTO_ICMP = 1,
	MP_PROTO_TCP = 6,
	MP_PROTO_UDP = 17,
};

/* Key of meshpath_policy_v2_{0,1} (HASH).  0 in a field is the wildcard
 * (MP_ID_ANY, any port, MP_PROTO_ANY). */
struct mp_policy_key {
	__u64 src_id;
	__u64 dst_id;
	__u16 dport; /* host order */
	__u8 proto;  /* enum mp_proto */
	__u8 pad;
	__u32 pad1;
};

enum mp_action {
	MP_ACTION_NONE = 0,  /* no rule: the default action applies */
	MP_ACTION_ALLOW = 1, /* pass */
	MP_ACTION_DENY = 2,  /* drop / EPERM */
	MP_ACTION_AUDIT = 3, /* pass, and report a would-be drop */
	MP_ACTION_AUTH = 4,  /* pass only while the pair is authenticated */
};

/* Value of meshpath_policy_v2_{0,1}. */
struct mp_policy_value {
	__u8 action; /* enum mp_action */
	__u8 pad[3];
	__u32 rule; /* the rule's number in the desired state, for reports */
};

/*
 * Key of meshpath_verdict_cache_v2 (LRU_HASH): a packet as the stateless
 * packet decision sees it.  Addresses v4-mapped, ports in host order.
 */
struct mp_vcache_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;	  /* IANA protocol number */
	__u8 starts_only; /* a TCP SYN without ACK: never judged as a reply */
	__u16 pad;
};

/* Value of meshpath_verdict_cache_v2: the judgement of such a packet and
 * the policy generation it was made under (valid only while it is live). */
struct mp_vcache_value {
	__u32 gen;    /* mp_policy_gen of the word it was judged by */
	__u32 rule;   /* the deciding rule, if matched */
	__u64 src_id; /* identities, as the judgement reports them */
	__u64 dst_id;
	__u8 verdict;  /* enum mp_verdict */
	__u8 matched;  /* a rule decided (not the default action) */
	__u8 is_reply; /* passed as a reply in an allowed flow */
	__u8 pad;
	__u32 pad1;
};

/*
 * Key of meshpath_ct_v2 (LRU_HASH): a flow that policy allowed, as the
 * packet that started it had it (the direction that was judged).
 * Addresses v4-mapped, network order; ports in host order; ICMP echo: the
 * identifier as sport, 0 as dport.
 */
struct mp_ct_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto; /* enum mp_proto */
	__u8 pad[3];
};

/* Value of meshpath_ct_v2: the flow's lifetime and its judgement under the
 * policy generation `judged.gen` (re-judged under any other). */
struct mp_ct_value {
	__u64 expires_ns; /* bpf_ktime_get_ns() deadline, moved by packets */
	struct mp_vcache_value judged; /* its original direction's judgement */
	__u8 flags;		       /* enum mp_ct_flags */
	__u8 pad[7];
};

enum mp_ct_flags {
	MP_CT_F_REPLIED = 1 << 0, /* a reply was seen */
	MP_CT_F_CLOSING = 1 << 1, /* TCP FIN or RST seen */
	MP_CT_F_AUTH = 1 << 2,	  /* an `auth` rule decides: never cached */
};

/* Lifetimes of meshpath_ct_v2 entries since their flow's last packet, in
 * seconds (Cilium's defaults for the TCP ones). */
enum mp_ct_lifetime {
	MP_CT_TCP_S = 21600,	  /* TCP, replied */
	MP_CT_TCP_OPENING_S = 60, /* TCP, no reply seen yet */
	MP_CT_TCP_CLOSING_S = 10, /* TCP after FIN or RST */
	MP_CT_DATAGRAM_S = 60,	  /* UDP, ICMP echo, other protocols */
};

/*
 * A policy key has four fields that may each be a wildcard: 16 shapes.
 * Bit n of meshpath_policy_shapes[epoch] is set when some rule has shape
 * n (bit 0 set: source given; 1: destination; 2: port; 3: protocol), so
 * a decision looks up only the shapes in use.
 */
enum mp_shape_bits {
	MP_SHAPE_SRC = 1 << 0,
	MP_SHAPE_DST = 1 << 1,
	MP_SHAPE_PORT = 1 << 2,
	MP_SHAPE_PROTO = 1 << 3,
};

/* Where a verdict was reached. */
enum mp_point {
	MP_POINT_CONNECT = 0,  /* cgroup connect4/6: TCP and connected UDP */
	MP_POINT_SENDMSG,      /* cgroup sendmsg4/6: unconnected UDP */
	MP_POINT_INGRESS,      /* cgroup_skb ingress of an attached cgroup */
	MP_POINT_EGRESS,       /* cgroup_skb egress of an attached cgroup */
	MP_POINT_SHORTCIRCUIT, /* sockops enrollment and sk_msg */
	MP_POINT_XDP,	       /* XDP on a device */
	MP_POINT_MAX,
};

/* What happened; with the point, the index into meshpath_verdicts. */
enum mp_verdict {
	MP_V_ALLOW = 0,	    /* a rule or the default allowed */
	MP_V_DENY,	    /* a rule or the default denied */
	MP_V_AUDIT,	    /* allowed, but policy would have dropped it */
	MP_V_AUTH_REQUIRED, /* an auth rule and no authentication: dropped */
	MP_V_MALFORMED,	    /* a header was truncated or invalid: dropped */
	MP_V_FRAGMENT,	    /* a non-first fragment (no L4 header): passed */
	MP_V_NOT_IP,	    /* not IPv4/IPv6 (ARP, ...): passed */
	MP_V_NO_SOURCE,	    /* connect/sendmsg before a source address is
			       known: the flow's packets are judged instead */
	MP_V_MAX,
};

/* ---------------------------------------------------------------------
 * Authentication: meshpath_auth_v2 holds the pairs of identities that have
 * proven themselves with mutual TLS between node agents, until an expiry.
 * ------------------------------------------------------------------- */

/* Key of meshpath_auth_v2 (HASH), and what an auth-required signal asks
 * for.  Local is the identity of the workload on this node. */
struct mp_auth_key {
	__u64 local_id;
	__u64 remote_id;
	__u32 remote_node; /* 0: a workload on this node too */
	__u32 pad;
};

/* Value of meshpath_auth_v2. */
struct mp_auth_value {
	__u64 expiry_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns): fail closed
			    after it */
};

/* Records of meshpath_auth_signals_v2 (RINGBUF): an `auth` flow found no
 * live entry. */
struct mp_auth_signal {
	__u64 time_ns;
	struct mp_auth_key key;
	__u32 point; /* enum mp_point */
	__u32 pad;
};

/* Value of meshpath_certs_v2 (HASH keyed by __u64 local identity): the
 * certificate that proves a local identity, for the agent and observers. */
struct mp_cert_info {
	__u64 not_after;  /* seconds since the Unix epoch */
	__u32 serial_len; /* bytes of serial used */
	__u8 serial[20];  /* big-endian, as in the certificate */
};

/* ---------------------------------------------------------------------
 * Flow events: meshpath_events_v2 is a RINGBUF of struct mp_flow_event.
 * ------------------------------------------------------------------- */
enum mp_event_type {
	MP_EV_POLICY = 1,   /* a connect/sendmsg verdict (every one) */
	MP_EV_PACKET = 2,   /* packets dropped, audited or needing auth at
			       ingress/egress/XDP, aggregated: `count` */
	MP_EV_SC_OPEN = 3,  /* a connection entered the short-circuit */
	MP_EV_SC_CLOSE = 4, /* it left (closed or evicted): byte counts */
	MP_EV_RESET = 5,    /* an established flow reset: policy denies it */
};

enum mp_traffic_direction {
	MP_TRAFFIC_UNKNOWN = 0,
	MP_TRAFFIC_INGRESS = 1,
	MP_TRAFFIC_EGRESS = 2,
};

struct mp_flow_event {
	__u64 time_ns;	 /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;	 /* socket cookie, 0 for packet events */
	__u64 cgroup_id; /* cgroup of the socket or process, 0 if none */
	__u32 saddr[4];	 /* v4-mapped for IPv4, network order */
	__u32 daddr[4];
	__u16 sport; /* host order, 0 when the protocol has none */
	__u16 dport;
	__u32 ifindex; /* XDP and cgroup_skb: the device, else 0 */
	__u64 src_identity;
	__u64 dst_identity;
	__u32 count;   /* packets this event stands for (>= 1) */
	__u32 rule;    /* number of the deciding rule, if `matched` */
	__u64 tx_msgs; /* short-circuit: sent by the connecting end */
	__u64 tx_bytes;
	__u64 rx_msgs; /* ... and by the accepting end */
	__u64 rx_bytes;
	__u8 type;	/* enum mp_event_type */
	__u8 verdict;	/* enum mp_verdict */
	__u8 point;	/* enum mp_point */
	__u8 proto;	/* enum mp_proto, or the IANA number */
	__u8 tcp_flags; /* of the (first) packet, TCP only */
	__u8 ipv6;	/* 1: IPv6 addresses */
	__u8 direction; /* enum mp_traffic_direction */
	__u8 is_reply;	/* 1: judged as a reply in an allowed flow */
	__u8 matched;	/* 1: a rule decided, 0: the default action */
	__u8 pad0[7];
};

/*
 * Puts the enums above into every object's BTF (through a read-only
 * global, see bpf/lib/common.h), so that libbpf-cargo generates their Rust
 * twins: the library reads counter indices and reasons from there.
 */
struct mp_abi_anchor {
	enum mp_abi abi;
	enum mp_policy_word policy_word;
	enum mp_identity_reserved identity_reserved;
	enum mp_identity_limits identity_limits;
	enum mp_proto proto;
	enum mp_action action;
	enum mp_shape_bits shape_bits;
	enum mp_point point;
	enum mp_verdict verdict;
	enum mp_event_type event_type;
	enum mp_traffic_direction traffic_direction;
	struct mp_flow_event flow_event;   /* not in any map: anchored here */
	struct mp_auth_signal auth_signal; /* ditto */
	enum mp_sock_flags sock_flags;
	enum mp_bypass_flags bypass_flags;
	enum mp_cgroup_flags cgroup_flags;
	enum mp_enroll_outcome enroll_outcome;
	struct mp_enroll_record enroll_record;
	enum mp_enroll_flags enroll_flags;
	struct mp_ct_key ct_key;
	struct mp_ct_value ct_value;
	enum mp_ct_flags ct_flags;
	enum mp_ct_lifetime ct_lifetime;
	enum mp_counter counter;
	enum mp_dir_mode dir_mode;
	enum mp_sock_reason reason;
};

#endif /* MESHPATH_ABI_H */
