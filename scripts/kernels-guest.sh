#!/usr/bin/env bash
# Runs inside a scripts/kernels.sh guest (virtme-ng, as root, the host's
# filesystem read-only with writable overlays on /etc, /tmp, /var...; OUT is
# the one directory shared read-write with the host). Not meant to be run by
# hand.
#
#   kernels-guest.sh OUT LABEL
#
# OUT/plan.tsv, written by the host, lists what to run, one per line:
# SUITE<TAB>TIMEOUT_SECONDS<TAB>EXECUTABLE. SUITE `demo` is judged by its
# exit status; the others are libtest binaries, run one after the other with
# their default arguments (as `cargo test` does: the tests of one binary in
# parallel, one thread per CPU) plus those in OUT/test-args (the host's
# $MESHPATH_TEST_ARGS). Each writes
# OUT/<suite>.log; OUT/results.tsv gets one line per suite
# (SUITE PASSED FAILED EXIT SECONDS NOTE) and `end` last, so the host can tell
# a finished run from a guest that died.
set -uo pipefail

out=$1
label=$2
results=$out/results.tsv
: >"$results"

say() { echo "kernel $label: $*"; }

# What the tests need and virtme-ng does not set up: bpffs (cgroup2 is mounted
# at /sys/fs/cgroup by virtme-ng-init; mounted here when missing) and a
# loopback that is up.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
grep -q ' - cgroup2 ' /proc/self/mountinfo || mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up

{
  echo "uname: $(uname -a)"
  echo "uptime at start: $(cut -d' ' -f1 /proc/uptime) s"
  echo "cpus: $(nproc), memory: $(free -m | awk '/^Mem:/ {print $2}') MiB"
  echo "btf: $(ls -l /sys/kernel/btf/vmlinux 2>&1)"
  echo "cgroup2: $(grep ' - cgroup2 ' /proc/self/mountinfo | cut -d' ' -f5 | head -1)"
  echo "bpffs: $(grep ' - bpf ' /proc/self/mountinfo | cut -d' ' -f5 | head -1)"
  echo "kernel.bpf_stats_enabled: $(sysctl -n kernel.bpf_stats_enabled 2>&1)"
} >"$out/guest.txt"
say "booted in $(cut -d' ' -f1 /proc/uptime) s (guest uptime)"

# The tests find the examples they drive (agent, flows) next to their own
# executable and rebuild them with $CARGO when they look older than their
# sources: the host built them just before, and nothing is built in here.
export CARGO=/bin/true
# Software emulation is tens of times slower than the machines the tests'
# waits were written for: they scale their waits (never what they assert
# about speed) by this; the demo runs its short plan, which still proves
# the redirect.
export MESHPATH_TEST_TIME_SCALE=${MESHPATH_TEST_TIME_SCALE:-10}
export MESHPATH_DEMO_QUICK=1
read -r -a test_args <"$out/test-args" || true

while IFS=$'\t' read -r suite limit exe; do
  [ -n "$suite" ] || continue
  log=$out/${suite//\//_}.log
  start=$(date +%s%N)
  if [ "$suite" = demo ]; then
    timeout -k 10 "$limit" "$exe" >"$log" 2>&1
  else
    timeout -k 10 "$limit" "$exe" "${test_args[@]}" >"$log" 2>&1
  fi
  rc=$?
  secs=$((($(date +%s%N) - start) / 1000000000))
  note=
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    note="timed out after $limit s"
  fi
  if [ "$suite" = demo ]; then
    if [ "$rc" = 0 ]; then passed=1 failed=0; else passed=0 failed=1; fi
    [ -n "$note" ] || [ "$rc" = 0 ] || note="exit $rc"
  elif grep -q '^test result: ' "$log"; then
    passed=$(awk '/^test result: / {n += $4} END {print n + 0}' "$log")
    failed=$(awk '/^test result: / {n += $6} END {print n + 0}' "$log")
  else
    # No result line: the binary crashed, hung or never started. Count what
    # it reported, and the suite fails whatever the counts say.
    passed=$(grep -c ' \.\.\. ok$' "$log")
    failed=$(grep -c ' \.\.\. FAILED$' "$log")
    [ -n "$note" ] || note="exit $rc, no result line"
  fi
  [ "$rc" = 0 ] || [ -n "$note" ] || note="exit $rc"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$suite" "$passed" "$failed" "$rc" "$secs" "$note" >>"$results"
  say "$suite: $passed passed, $failed failed ($secs s${note:+; $note})"
done <"$out/plan.tsv"

echo end >>"$results"
sync
