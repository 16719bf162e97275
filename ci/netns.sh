#!/usr/bin/env bash
# Private network namespaces for tests (needs root). All commands are idempotent.
#   ci/netns.sh create NS              add NS with lo up
#   ci/netns.sh addr NS DEV ADDR/LEN   wait up to 10 s for DEV in NS, set ADDR (e.g. 10.77.1.1/24), link up
#   ci/netns.sh delete NS              kill the processes left in NS (TERM, then KILL), delete NS
# Nothing is ever configured in the root namespace.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit 2; }
die() { echo "netns: $*" >&2; exit 1; }

cmd=${1:-}; ns=${2:-}
case "$cmd" in -h|--help|"") usage ;; esac
[ -n "$ns" ] || usage
[[ "$ns" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "bad namespace name '$ns'"
[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v ip >/dev/null || die "'ip' not found; install iproute2"

exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$ns"; }
alive() { [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; }

case "$cmd" in
  create)
    [ $# -eq 2 ] || usage
    exists || ip netns add "$ns" 2>/dev/null || exists || die "ip netns add $ns failed"
    ip netns exec "$ns" ip link set lo up
    ;;
  addr)
    [ $# -eq 4 ] || usage
    dev=$3 addr=$4
    [[ "$addr" == */* ]] || die "address '$addr' needs a prefix length (e.g. 10.77.1.1/24)"
    exists || die "namespace $ns does not exist (ci/netns.sh create $ns)"
    for _ in $(seq 100); do
      ip netns exec "$ns" ip link show dev "$dev" >/dev/null 2>&1 && break
      sleep 0.1
    done
    ip netns exec "$ns" ip link show dev "$dev" >/dev/null 2>&1 ||
      die "device $dev did not appear in namespace $ns within 10 s (did QEMU or the backend start?)"
    ip netns exec "$ns" ip addr replace "$addr" dev "$dev"
    ip netns exec "$ns" ip link set dev "$dev" up
    ;;
  delete)
    [ $# -eq 2 ] || usage
    exists || exit 0
    if alive; then
      # shellcheck disable=SC2046
      kill $(ip netns pids "$ns") 2>/dev/null || true
      for _ in $(seq 50); do alive || break; sleep 0.1; done
      if alive; then
        # shellcheck disable=SC2046
        kill -9 $(ip netns pids "$ns") 2>/dev/null || true
        for _ in $(seq 50); do alive || break; sleep 0.1; done
      fi
      alive && echo "netns: processes still in $ns: $(ip netns pids "$ns" | tr '\n' ' ')" >&2
    fi
    ip netns del "$ns" 2>/dev/null || ! exists || die "ip netns del $ns failed"
    ;;
  *) echo "netns: unknown command '$cmd'" >&2; usage ;;
esac
