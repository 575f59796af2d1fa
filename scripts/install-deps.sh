#!/usr/bin/env bash
# Installs what building and testing meshpath needs on a Debian/Ubuntu machine (run as root).
# Idempotent: packages already present are left alone.
set -euo pipefail

pkgs=(clang llvm clang-format libelf-dev zlib1g-dev pkg-config bpftool iproute2 make protobuf-compiler libprotobuf-dev)
# Tools for looking inside the kernel (perf, bpftrace); not needed to build or test.
if [ "${MESHPATH_DEBUG_TOOLS:-0}" = 1 ]; then
  pkgs+=(linux-perf bpftrace)
fi
# A real proxy for the benchmarks' sidecar comparison (the haproxy path of
# benches/loopback.rs and examples/summary.rs); not needed to build or test.
if [ "${MESHPATH_BENCH_TOOLS:-0}" = 1 ]; then
  pkgs+=(haproxy)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "meshpath: missing packages ${missing[*]}; run this script as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# bpftool lives in /usr/sbin on Debian; make sure it is reachable.
command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ] || {
  echo "meshpath: bpftool not found after install" >&2
  exit 1
}
echo "meshpath: build dependencies present"
