#!/usr/bin/env bash
# Sets up the transparent-proxy demo topology (root; needs iproute2, iptables):
#
#   netns $NS_APP (10.200.1.1)  ==veth==  netns $NS_SERVER (10.200.1.2)
#     application                              python3 http.server :80
#     tproxy on 127.0.0.1:15001                bulk sink/source :9000
#
# In $NS_APP, TCP to 10.200.1.2 is marked in mangle OUTPUT, routed to lo and
# diverted with TPROXY to the proxy, which sees the original destination as
# its socket's local address. The proxy's own upstream connections carry
# SO_MARK 2 and are not diverted.
#
# Usage: setup.sh up|down   (names come from NS_APP / NS_SERVER, default fp-app / fp-server)
set -euo pipefail
NS_APP=${NS_APP:-fp-app}
NS_SERVER=${NS_SERVER:-fp-server}
VETH=${VETH:-fptp}

case "${1:-}" in
up)
  ip netns add "$NS_APP"
  ip netns add "$NS_SERVER"
  ip link add "${VETH}a" netns "$NS_APP" type veth peer name "${VETH}s" netns "$NS_SERVER"
  ip -n "$NS_APP" addr add 10.200.1.1/24 dev "${VETH}a"
  ip -n "$NS_SERVER" addr add 10.200.1.2/24 dev "${VETH}s"
  for ns in "$NS_APP" "$NS_SERVER"; do
    ip -n "$ns" link set lo up
  done
  ip -n "$NS_APP" link set "${VETH}a" up
  ip -n "$NS_SERVER" link set "${VETH}s" up
  in_app() { ip netns exec "$NS_APP" "$@"; }
  in_app sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.lo.rp_filter=0
  in_app iptables -t mangle -A OUTPUT -p tcp -d 10.200.1.2 -m mark ! --mark 2 -j MARK --set-mark 1
  in_app ip rule add fwmark 1 lookup 100
  in_app ip route add local 0.0.0.0/0 dev lo table 100
  in_app iptables -t mangle -A PREROUTING -i lo -p tcp -m mark --mark 1 \
    -j TPROXY --on-ip 127.0.0.1 --on-port 15001 --tproxy-mark 1
  ;;
down)
  ip netns del "$NS_APP" 2>/dev/null || true
  ip netns del "$NS_SERVER" 2>/dev/null || true
  ;;
*)
  echo "usage: $0 up|down" >&2
  exit 2
  ;;
esac
