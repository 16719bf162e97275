#!/usr/bin/env bash
# The main job (for now): boot the test guest under stock QEMU over our backend inside a private
# network namespace and print iperf3 results both ways, plus the backend's counters.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$repo/target/release/vhost-net-batch
ns=vnbdemo$$
dir=$(mktemp -d)
sock=$dir/vm.sock
tap=vnbdemo0
qemu_pid=""
backend_pid=""
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
  [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null || true
  "$repo/ci/netns.sh" delete "$ns" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

[ -x "$bin" ] || { echo "demo: $bin missing; run 'make build'" >&2; exit 1; }
"$repo/ci/netns.sh" create "$ns"
ip netns exec "$ns" "$bin" serve --vm demo --socket "$sock" --tap "$tap" --mac 52:54:00:77:00:02 2>"$dir/backend.log" &
backend_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$dir/backend.log"; exit 1; }
"$repo/ci/netns.sh" addr "$ns" "$tap" 10.77.0.1/24
qemu_pid=$("$repo/ci/qemu-run.sh" --vhost-user "$sock" --mac 52:54:00:77:00:02 --ip 10.77.0.2/24 \
  --agent "$dir/agent" --console-log "$dir/console.log")
echo "booting the guest (QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), TCG) ..."
"$repo/ci/gexec.py" "$dir/agent" --wait-ready 180 || { cat "$dir/console.log"; exit 1; }
echo "guest up: $("$repo/ci/gexec.py" "$dir/agent" -- uname -r)"
ip netns exec "$ns" ping -c 3 -i 0.2 10.77.0.2 | tail -1
mbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.0f" % (d["end"]["sum_received"]["bits_per_second"]/1e6))'; }
rx=$(ip netns exec "$ns" iperf3 -c 10.77.0.2 -t 10 -J | mbps)
tx=$(ip netns exec "$ns" iperf3 -c 10.77.0.2 -t 10 -R -J | mbps)
echo
echo "iperf3 through vhost-net-batch (10 s each):"
printf '  host -> guest (guest RX): %6s Mb/s\n' "$rx"
printf '  guest -> host (guest TX): %6s Mb/s\n' "$tx"
echo "backend CPU seconds: $(awk '{printf "%.2f", ($14+$15)/100}' /proc/$backend_pid/stat)"
kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=""
sleep 0.5
echo "backend counters at disconnect:"
sed 's/\x1b\[[0-9;]*m//g' "$dir/backend.log" | grep counters | tail -1 | sed 's/.*t=QueueSnapshot/  /'
