/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Includes and small helpers every meshpath program uses. */
#ifndef MESHPATH_BPF_COMMON_H
#define MESHPATH_BPF_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "meshpath/abi.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
#ifndef SO_RCVLOWAT
#define SO_RCVLOWAT 18
#endif
#ifndef IPPROTO_TCP
#define IPPROTO_TCP 6
#endif

#define MP_ALWAYS_INLINE static __always_inline

/* See struct mp_abi_anchor: never read, only there for BTF. */
const volatile struct mp_abi_anchor meshpath_abi_anchor = {};

#endif /* MESHPATH_BPF_COMMON_H */
