#!/usr/bin/env bash
# End to end: the application in netns $NS_APP fetches pages and a large file
# from http://10.200.1.2 (python3 http.server in netns $NS_SERVER, over veth)
# through the transparent proxy, once per mode. Checks that every byte
# arrives and that the counters show the path each mode took; prints a table.
# Root; installs iptables/curl if missing; removes everything it made.
#
#   examples/tproxy/run.sh                      # copy, ingress, egress, adaptive, both; 256 MiB
#   MODES="egress" SIZE_MIB=64 examples/tproxy/run.sh
#   RATES=1 examples/tproxy/run.sh              # also requests/s: wrk -> proxy -> nginx
set -euo pipefail
cd "$(dirname "$0")/../.."
MODES=${MODES:-copy ingress egress adaptive both}
SIZE_MIB=${SIZE_MIB:-256}
MANY=${MANY:-1000}  # concurrent connections through the proxy, 16 KiB each way
command -v iptables >/dev/null && command -v curl >/dev/null || scripts/install-deps.sh iptables curl
RATES=${RATES:-}
[ -z "$RATES" ] || { command -v wrk >/dev/null && command -v nginx >/dev/null; } || scripts/install-deps.sh wrk nginx-light
# FASTPATH_PREBUILT=1 (scripts/vmtest-guest.sh): a read-only tree, built.
[ "${FASTPATH_PREBUILT:-0}" = 1 ] || cargo build --release --quiet --example tproxy
TPROXY=${FASTPATH_EXAMPLES:-$PWD/target/release/examples}/tproxy

export NS_APP=fp-tpa-$$ NS_SERVER=fp-tps-$$ VETH=fptp$(($$ % 100000))
WORK=$(mktemp -d /tmp/fastpath-tproxy.XXXXXX)
chmod 755 "$WORK"
CG2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
CG=$CG2/sockmap-fastpath-tproxy-$$
SRV=
MANY_SRV=
NGINX=
cleanup() {
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null
  [ -n "$MANY_SRV" ] && kill "$MANY_SRV" 2>/dev/null
  [ -n "$NGINX" ] && kill "$NGINX" 2>/dev/null
  examples/tproxy/setup.sh down
  if [ -d "$CG" ]; then
    for p in $(cat "$CG/cgroup.procs"); do echo "$p" > "$CG2/cgroup.procs" || true; done
    rmdir "$CG"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

examples/tproxy/setup.sh up
# nsenter, not `ip netns exec`: the latter remounts /sys and hides cgroup2.
in_app() { nsenter --net="/run/netns/$NS_APP" "$@"; }
echo "hello through the proxy" > "$WORK/index.html"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$WORK/big.bin"
nsenter --net="/run/netns/$NS_SERVER" python3 -m http.server 80 --bind 10.200.1.2 -d "$WORK" >/dev/null 2>&1 &
SRV=$!
nsenter --net="/run/netns/$NS_SERVER" python3 examples/tproxy/many.py server 10.200.1.2 9000 &
MANY_SRV=$!
for _ in $(seq 100); do
  nsenter --net="/run/netns/$NS_SERVER" curl -s -o /dev/null http://10.200.1.2/index.html && break
  sleep 0.1
done
if [ -n "$RATES" ]; then
  cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 10.200.1.2:8080; root $WORK; } }
CONF
  nsenter --net="/run/netns/$NS_SERVER" nginx -c "$WORK/nginx.conf" &
  NGINX=$!
fi
mkdir "$CG"
FAILED=0
ROWS=()
stat_of() { awk -v k="$2" '$1 == k { print $2 }' "$1"; }

for mode in $MODES; do
  out=$WORK/tproxy.$mode
  # Application and proxy in one cgroup (ingress and both modes select sockets there).
  (
    echo $BASHPID > "$CG/cgroup.procs"
    # nsenter execs the proxy, so $! is the proxy itself.
    nsenter --net="/run/netns/$NS_APP" "$TPROXY" --mode "$mode" --cgroup "$CG" > "$out.log" 2>&1 &
    tp=$!
    for _ in $(seq 100); do grep -q listening "$out.log" && break; sleep 0.05; done
    grep -q listening "$out.log" || exit 1 # e.g. a mode this kernel refuses
    in_app curl -sS --max-time 60 http://10.200.1.2/index.html > "$out.index"
    in_app curl -sS --max-time 120 -o "$out.big" -w '%{speed_download}\n' http://10.200.1.2/big.bin > "$out.speed"
    in_app python3 examples/tproxy/many.py client 10.200.1.2 9000 "$MANY" 16384 > "$out.many" || true
    if [ -n "$RATES" ]; then
      in_app wrk -t2 -c16 -d3s http://10.200.1.2:8080/index.html > "$out.wrk"
    fi
    kill -TERM "$tp"
    wait "$tp"
  ) || { echo "FAIL: $mode: a command failed; proxy log:" >&2; tail "$out.log" >&2; FAILED=1; continue; }
  grep -v '^libbpf' "$out.log" | sed 's/^/    /' >&2
  ok=ok
  cmp -s "$out.index" "$WORK/index.html" || { ok="index differs"; }
  cmp -s "$out.big" "$WORK/big.bin" || { ok="$SIZE_MIB MiB file differs"; }
  # Checked: free its space (a test VM's /tmp is in its 3 GiB of memory).
  rm -f "$out.big"
  many=$(sed -n 's/^many: //p' "$out.many")
  grep -q "^many: $MANY of $MANY intact" "$out.many" || { ok="concurrent connections: ${many:-no result}"; }
  copied=$(sed -n 's/^tproxy: bytes copied in user space: //p' "$out.log")
  redirected=$(stat_of "$out.log" bytes_redirected)
  forwarded=$(stat_of "$out.log" fwd_bytes)
  direct=$(stat_of "$out.log" fwd_direct_bytes)
  handover=$(sed -n 's/^tproxy: bytes copied at hand-over: //p' "$out.log")
  size=$((SIZE_MIB << 20))
  # The app<->proxy hop: redirected, plain only where the receive-queue
  # bound sent bytes (a lagging reader).
  passed=$(stat_of "$out.log" bytes_passed); fallbacks=$(stat_of "$out.log" queue_limit_fallbacks)
  redirect_proof="app<->proxy hop redirected ${redirected:-0} bytes, ${passed:-0} plain after ${fallbacks:-0} receive-queue-bound fallbacks"
  redirected_ok() {
    [ "${redirected:-0}" -gt 0 ] && [ $(( ${redirected:-0} + ${passed:-0} )) -ge "$size" ] &&
      { [ "${passed:-0}" = 0 ] || [ "${fallbacks:-0}" -gt 0 ]; }
  }
  # The proxy's hop: forwarded by the kernel, copied by the forwarder only
  # where the backlog bound kept bytes (both mode: also the app's bytes
  # queued while the upstream had no room), never by the example's loops.
  waited=$(sed -n 's/^tproxy: bytes the forwarder copied: //p' "$out.log")
  # Whole pairs copied because the client had half-closed before the
  # proxy handed them over (the many-connections client sends and shuts
  # down as soon as all its connections are open; the proxy may accept
  # one later than that).
  not_taken=$(sed -n 's/^tproxy: bytes of pairs the kernel did not take: //p' "$out.log")
  backlog_kept=$(stat_of "$out.log" fwd_backlog_kept); queued_behind=$(stat_of "$out.log" fwd_queued_behind)
  kept=$(( ${backlog_kept:-0} + ${queued_behind:-0} ))
  forward_proof="kernel forwarded ${forwarded:-0} bytes, ${waited:-0} kept by the backlog bound and copied on ($kept segments), ${not_taken:-0} in pairs not taken (half-closed before the hand-over), user-space loops ${copied:-0}"
  forwarded_ok() {
    [ "${forwarded:-0}" -gt 0 ] && [ $(( ${forwarded:-0} + ${waited:-0} )) -ge "$size" ] && [ "${copied:-1}" = 0 ] &&
      { [ "${waited:-0}" = 0 ] || [ "$kept" -gt 0 ] || [ "$mode" = both ]; }
  }
  case $mode in
    copy) proof="user space copied ${copied:-0} bytes"; [ "${copied:-0}" -ge "$size" ] || ok="not copied in user space" ;;
    ingress) proof=$redirect_proof; redirected_ok || ok="not redirected" ;;
    egress) proof=$forward_proof; forwarded_ok || ok="not forwarded by the kernel" ;;
    # Adaptive: bulk (the download, the concurrent connections) stays on
    # the forwarder's relay; wrk's keep-alive requests may go to the kernel.
    adaptive) relayed=$(sed -n 's/^tproxy: bytes the forwarder relayed: //p' "$out.log")
      proof="forwarder relayed ${relayed:-0} bytes, kernel forwarded ${forwarded:-0}, ${waited:-0} kept and copied on, user-space loops ${copied:-0}"
      { [ "${relayed:-0}" -ge "$size" ] && [ "${copied:-1}" = 0 ]; } || ok="not relayed by the forwarder" ;;
    both) proof="$forward_proof; $redirect_proof; app sent ${direct:-0} straight upstream, ${handover:-0} copied at hand-over"
      { forwarded_ok && redirected_ok; } || ok="not forwarded and redirected by the kernel" ;;
  esac
  [ "$ok" = ok ] || { echo "FAIL: $mode: $ok ($proof)" >&2; FAILED=1; }
  rate=-
  if [ -n "$RATES" ]; then
    rate=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' "$out.wrk")
    grep -q "Socket errors\|Non-2xx" "$out.wrk" && { ok="wrk saw errors"; FAILED=1; }
  fi
  ROWS+=("| $mode | $(awk -v v="$(cat "$out.speed")" 'BEGIN { printf "%.0f MB/s", v / 1e6 }') | ${many:-none} | $rate | $proof | $ok |")
done

echo "| mode | $SIZE_MIB MiB download through the proxy | $MANY concurrent connections, 16 KiB each way | requests/s (wrk, 16 keep-alive conns, 3 s) | which path (counters) | result |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
[ "$FAILED" = 0 ] || { echo "tproxy end-to-end: FAILED" >&2; exit 1; }
echo "tproxy end-to-end: all modes passed" >&2
