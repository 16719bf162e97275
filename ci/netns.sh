#!/usr/bin/env bash
# Private network namespaces for tests (DESIGN.md section 7).
#   ci/netns.sh create NS              add NS with lo up (idempotent)
#   ci/netns.sh addr NS DEV ADDR/LEN   wait for DEV in NS (10 s), set ADDR, link up
#   ci/netns.sh delete NS              kill what runs in NS, delete it (idempotent)
set -euo pipefail
cmd=${1:-}; ns=${2:-}
[ -n "$cmd" ] && [ -n "$ns" ] || { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
case "$cmd" in
  create)
    ip netns list | grep -qw "^$ns" || ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up ;;
  addr)
    dev=$3; addr=$4
    for _ in $(seq 100); do ip netns exec "$ns" ip link show "$dev" >/dev/null 2>&1 && break; sleep 0.1; done
    ip netns exec "$ns" ip link show "$dev" >/dev/null 2>&1 || { echo "netns: $dev did not appear in $ns" >&2; exit 1; }
    ip netns exec "$ns" ip addr replace "$addr" dev "$dev"
    ip netns exec "$ns" ip link set "$dev" up ;;
  delete)
    if ip netns list | grep -qw "^$ns"; then
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
      sleep 0.2
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$ns"
    fi ;;
  *) echo "netns: unknown command $cmd" >&2; exit 2 ;;
esac
