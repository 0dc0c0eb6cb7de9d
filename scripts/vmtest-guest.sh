#!/usr/bin/env bash
# Runs inside a vmtest guest (or on the host for the "host" row): every test
# binary given, one after the other, then the quick real-programs suite;
# writes NAME.log and a "NAME STATUS SECONDS" line per run to OUT/status, and the
# probe() report to OUT/probe.txt. With VMTEST_ONLY=NAME, each binary runs
# only that test and the real programs do not run.
#   scripts/vmtest-guest.sh OUT TEST-BINARY...
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
# Prebuilt copies (scripts/vmtest.sh): a rebuild on the host meanwhile
# cannot change what the guest runs.
export CI=true FASTPATH_TEST_DEADLINE_SECS=300 FASTPATH_PREBUILT=1
export FASTPATH_EXAMPLES=$PWD/target/vmtest/examples
uname -r > "$out/kernel"
# The demo prints probe() and then shows the shortcut at work.
timeout 600 "$FASTPATH_EXAMPLES/demo" --seconds 0.2 > "$out/demo.log" 2>&1
echo "demo $?" >> "$out/status"
sed -n '/^sockmap-fastpath probe/,/^$/p' "$out/demo.log" > "$out/probe.txt"
for bin in "$@"; do
  name=$(basename "$bin")
  start=$SECONDS
  timeout 900 "$bin" --test-threads=1 ${VMTEST_ONLY:+--exact "$VMTEST_ONLY"} > "$out/$name.log" 2>&1
  echo "$name $? $((SECONDS - start))" >> "$out/status"
done
# VMTEST_ONLY (a kernel below the minimum): that one test, nothing else.
[ -z "${VMTEST_ONLY:-}" ] || exit 0
start=$SECONDS
GOPROXY_BIN=$PWD/target/vmtest/tools/goproxy REAL_PROGRAMS_OUT="$out" \
  timeout 900 scripts/real-programs.sh --quick > "$out/real-programs.log" 2>&1
echo "real-programs $? $((SECONDS - start))" >> "$out/status"
