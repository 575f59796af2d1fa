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
# Running the tests under other kernels (scripts/kernels.sh): QEMU, a static
# busybox for virtme-ng's initramfs, and Debian 12's own kernels, 6.1 (the
# release's kernel) and 6.12 (bookworm-security). virtme-ng itself comes from
# PyPI (below). Not needed to build or test on the running kernel.
if [ "${MESHPATH_KERNEL_TOOLS:-0}" = 1 ]; then
  pkgs+=(qemu-system-x86 busybox-static linux-image-amd64 linux-image-6.12-amd64)
  # Python's venv module (Debian splits it out of python3) for virtme-ng.
  python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3 python3-venv)
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

# virtme-ng (vng), pinned, in its own virtual environment so that neither the
# system's Python (externally managed on Debian 12) nor a user's is touched.
# Its guest init is a binary inside the package; the guest reaches it through
# the host's root filesystem, so the environment must stay on the host's /.
if [ "${MESHPATH_KERNEL_TOOLS:-0}" = 1 ]; then
  venv=${MESHPATH_VNG_VENV:-/opt/meshpath-virtme-ng}
  want=${MESHPATH_VNG_VERSION:-1.42}
  if [ "$("$venv/bin/vng" --version 2>/dev/null | awk '{print $NF}')" != "$want" ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "meshpath: virtme-ng missing; run this script as root" >&2
      exit 1
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "virtme-ng==$want"
  fi
fi

# bpftool lives in /usr/sbin on Debian; make sure it is reachable.
command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ] || {
  echo "meshpath: bpftool not found after install" >&2
  exit 1
}
echo "meshpath: build dependencies present"
