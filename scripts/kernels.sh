#!/usr/bin/env bash
# Runs the demo and every test executable under other kernels than the one
# this machine runs: Debian 12's own 6.1 and 6.12, each booted in a QEMU guest
# by virtme-ng with software emulation (no KVM), the guest seeing this
# machine's filesystem. Run as root from a checkout:
#
#   sudo ./scripts/kernels.sh              # 6.1 and 6.12
#   sudo ./scripts/kernels.sh 6.1          # one kernel: a series, an installed
#                                          # release (6.1.0-57-amd64) or a bzImage
#
# Installs what is missing (QEMU, busybox-static, linux-image-amd64,
# linux-image-6.12-amd64 with apt-get; virtme-ng from PyPI into
# /opt/meshpath-virtme-ng) through scripts/install-deps.sh, builds the test
# executables and the demo here (nothing is built in the guests), then per
# kernel boots a guest that runs scripts/kernels-guest.sh: bpffs, loopback,
# the demo, then each test executable in turn with its own timeout. Logs go to
# target/kernels/<version>/ (one per suite, guest.txt, console.log). Prints
# one line per kernel and suite, one per kernel, and exits non-zero when
# anything failed.
#
# Environment: MESHPATH_KERNELS (kernels when no arguments, "6.1 6.12"),
# MESHPATH_SUITE_TIMEOUT (seconds per test executable, 1200),
# MESHPATH_DEMO_TIMEOUT (seconds, 600), MESHPATH_KERNEL_TIMEOUT (seconds per
# guest, boot included, 3600), MESHPATH_TEST_ARGS (added to every test
# executable's arguments, e.g. "--test-threads=1" or a test name filter),
# MESHPATH_GUEST_MEMORY (4G), MESHPATH_VNG (the vng to use).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)

if [ "$(id -u)" != 0 ]; then
  echo "kernels.sh: run as root (the guests run the root tests as root)" >&2
  exit 1
fi

if [ "$#" -gt 0 ]; then
  wanted=("$@")
else
  read -r -a wanted <<<"${MESHPATH_KERNELS:-6.1 6.12}"
fi
suite_timeout=${MESHPATH_SUITE_TIMEOUT:-1200}
demo_timeout=${MESHPATH_DEMO_TIMEOUT:-600}
kernel_timeout=${MESHPATH_KERNEL_TIMEOUT:-3600}
memory=${MESHPATH_GUEST_MEMORY:-4G}

MESHPATH_KERNEL_TOOLS=1 scripts/install-deps.sh
vng=${MESHPATH_VNG:-/opt/meshpath-virtme-ng/bin/vng}
# vng runs virtme-run, which lies beside it, through PATH.
PATH=$(dirname "$vng"):$PATH

# A kernel argument -> the image to boot: a file as it is, an installed
# release (/boot/vmlinuz-RELEASE), or a series (6.1: the newest installed
# /boot/vmlinuz-6.1.*).
kernel_image() {
  local k=$1
  if [ -f "$k" ]; then
    echo "$k"
  elif [ -f "/boot/vmlinuz-$k" ]; then
    echo "/boot/vmlinuz-$k"
  else
    find /boot -maxdepth 1 -name "vmlinuz-$k.*" | sort -V | tail -1
  fi
}

# The upstream version of an image, for the logs and the summary: Debian's
# release names (6.1.0-57-amd64) hide it, its package version (6.1.192-3)
# does not.
kernel_label() {
  local img=$1 pkg ver
  if pkg=$(dpkg-query -S "$img" 2>/dev/null | cut -d: -f1 | head -1) && [ -n "$pkg" ]; then
    ver=$(dpkg-query -W -f='${Version}' "$pkg")
    echo "${ver%%-*}"
  else
    basename "$img" | sed 's/^vmlinuz-//'
  fi
}

images=()
for k in "${wanted[@]}"; do
  img=$(kernel_image "$k")
  if [ -z "$img" ]; then
    echo "kernels.sh: no kernel image for $k in /boot" >&2
    exit 1
  fi
  images+=("$img")
done

mkdir -p target/kernels
echo "== build (test executables, the demo)"
build_start=$(date +%s)
cargo test --locked --no-run --message-format=json-render-diagnostics >target/kernels/build-tests.json
cargo build --release --locked --example shortcircuit --message-format=json-render-diagnostics \
  >target/kernels/build-demo.json
# Suite name, executable: the library's unit tests as `unit`, integration
# tests as tests/NAME, in cargo test's order; the demo first.
python3 - "$demo_timeout" "$suite_timeout" "${MESHPATH_KERNEL_SUITES:-*}" "${MESHPATH_KERNEL_SKIP:-}" \
  >target/kernels/plan.tsv <<'EOF'
import fnmatch, json, sys
demo_limit, limit = sys.argv[1], sys.argv[2]
want, skip = sys.argv[3].split(), sys.argv[4].split()
def chosen(suite):
    match = lambda pats: any(fnmatch.fnmatchcase(suite, p) for p in pats)
    return match(want) and not match(skip)
def artifacts(path):
    for line in open(path):
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            yield m
demo = [m["executable"] for m in artifacts("target/kernels/build-demo.json")
        if m["target"]["name"] == "shortcircuit" and "example" in m["target"]["kind"]]
assert len(demo) == 1, "no demo executable in cargo's output"
if chosen("demo"):
    print(f"demo\t{demo_limit}\t{demo[0]}")
tests, seen = [], set()
for m in artifacts("target/kernels/build-tests.json"):
    if not m["profile"]["test"] or m["executable"] in seen:
        continue
    seen.add(m["executable"])
    kind, name = m["target"]["kind"][0], m["target"]["name"]
    suite = {"lib": "unit", "test": f"tests/{name}", "bin": f"bin/{name}"}.get(kind, f"{kind}/{name}")
    tests.append((kind != "lib", suite, m["executable"]))
assert tests, "no test executable in cargo's output"
for _, suite, exe in sorted(tests):
    if chosen(suite):
        print(f"{suite}\t{limit}\t{exe}")
EOF
# The tests rebuild an example they drive when it is older than their own
# executable, which cargo does not guarantee (an example left as it was, a
# test relinked): make the examples this build produced the newest files.
python3 - <<'EOF' | xargs -r -d '\n' touch
import json
for line in open("target/kernels/build-tests.json"):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and "example" in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])
EOF
echo "built in $(($(date +%s) - build_start)) s; to run: $(cut -f1 target/kernels/plan.tsv | tr '\n' ' ')"

status=0
total_passed=0
total_failed=0
for img in "${images[@]}"; do
  label=$(kernel_label "$img")
  out=$repo/target/kernels/$label
  rm -rf "$out"
  mkdir -p "$out"
  cp target/kernels/plan.tsv "$out/plan.tsv"
  printf '%s\n' "${MESHPATH_TEST_ARGS:-}" >"$out/test-args"
  echo "== kernel $label ($img)"
  start=$(date +%s)
  # --disable-kvm: TCG (KVM here cannot boot a stock kernel); the host's / is
  # the guest's root (read-only 9p, writable overlays), $out its only
  # read-write share; virtme-ng takes the modules for virtio/9p from
  # /lib/modules/<release> into its initramfs. Through a pipe: QEMU truncates
  # a file it is redirected to.
  set +e
  timeout -k 30 "$kernel_timeout" "$vng" --run "$img" --disable-kvm --cpus 2 --memory "$memory" \
    --rwdir="$out" --cwd "$repo" --name meshpath-kernels \
    --exec "$repo/scripts/kernels-guest.sh $out $label" \
    </dev/null 2>&1 | tee "$out/console.log"
  vng_rc=${PIPESTATUS[0]}
  set -e
  secs=$(($(date +%s) - start))
  passed=0 failed=0 bad=()
  if [ -f "$out/results.tsv" ]; then
    while IFS=$'\t' read -r suite p f rc _ _; do
      [ "$suite" != end ] || continue
      passed=$((passed + p))
      failed=$((failed + f))
      [ "$rc" = 0 ] || bad+=("$suite")
    done <"$out/results.tsv"
  fi
  ran=$(grep -vc '^end$' "$out/results.tsv" 2>/dev/null || true)
  planned=$(wc -l <"$out/plan.tsv")
  note=
  if ! grep -qx end "$out/results.tsv" 2>/dev/null; then
    note="; guest did not finish (vng exit $vng_rc, ran ${ran:-0} of $planned suites)"
    [ "$vng_rc" != 124 ] || note="; guest timed out after $kernel_timeout s (ran ${ran:-0} of $planned suites)"
    bad+=(unfinished)
  fi
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  if [ "${#bad[@]}" -gt 0 ] || [ "$failed" -gt 0 ]; then
    status=1
    echo "kernel $label: FAILED: $passed passed, $failed failed in $secs s; failing: ${bad[*]:-}$note; logs in target/kernels/$label/"
  else
    echo "kernel $label: ok: $passed passed, $failed failed in $secs s; logs in target/kernels/$label/"
  fi
done

echo "kernels: $total_passed passed, $total_failed failed"
exit "$status"
