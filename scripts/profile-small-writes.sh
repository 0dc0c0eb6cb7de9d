#!/usr/bin/env bash
# Where the time goes when streaming small writes: iperf3 sending 64-byte
# writes over loopback TCP for 3 s, plainly and accelerated (each in a fresh
# child cgroup via examples/accelerate.rs), both ends pinned to CPU 0, while
# `perf record` samples CPU 0. Prints the throughput and the top symbols of
# each run. Root; installs linux-perf and iperf3 if missing.
#
#   scripts/profile-small-writes.sh [WRITE_BYTES]     # default 64
set -euo pipefail
cd "$(dirname "$0")/.."
LEN=${1:-64}
{ command -v perf && command -v iperf3; } >/dev/null || scripts/install-deps.sh linux-perf iperf3
cargo build --release --quiet --example accelerate
WORK=$(mktemp -d /tmp/fastpath-profile.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

for mode in plain accelerated; do
  flag=()
  [ "$mode" = plain ] && flag=(--plain)
  target/release/examples/accelerate "${flag[@]}" --stats-file "$WORK/$mode.stats" -- bash -c "
    taskset -c 0 iperf3 -s -1 -p 15301 >/dev/null 2>&1 &
    sleep 0.5
    perf record -q -C 0 -o $WORK/$mode.data -- \
      taskset -c 0 iperf3 -c 127.0.0.1 -p 15301 -l $LEN -t 3 -J > $WORK/$mode.json
    wait" >/dev/null 2>&1
  rate=$(python3 -c 'import json,sys; print("%.3f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e9))' "$WORK/$mode.json")
  redirected=$(awk '$1 == "bytes_redirected" { print $2 }' "$WORK/$mode.stats" 2>/dev/null || true)
  echo "== $mode: $LEN-byte writes, $rate Gbit/s, bytes_redirected ${redirected:-0}"
  perf report -i "$WORK/$mode.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -E '^ +[0-9.]+%' | awk 'n++ < 25'
done
