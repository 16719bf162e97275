#!/usr/bin/env bash
# Boots the test guest under TCG in the background and prints QEMU's pid.
#   ci/qemu-run.sh --vhost-user SOCK [--queues N] [--reconnect-ms MS] ...    our backend
#   ci/qemu-run.sh --tap-netns NS --tap NAME [--vhost-net on|off] [--tx-timer] ...  QEMU's own virtio-net
# Common: --mac MAC --ip 10.77.N.2/24 --agent SOCK --console-log FILE --pidfile FILE
#         --mem MB (512) --smp N (1) --kernel F --initrd F --qemu BIN --extra "ARGS"
# Works with QEMU 10.0 and 7.2 (7.2 needs vectors=0 on the NIC under TCG with vhost-user).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
vhost_user="" tap_netns="" tap="" vhost_net=off tx_timer=0 mac=52:54:00:12:34:56 queues=1
ip="" agent="" console=/dev/null pidfile="" mem=512 smp=1 reconnect_ms=""
kernel=$repo/target/guest/vmlinuz initrd=$repo/target/guest/initrd.img qemu=${QEMU:-qemu-system-x86_64} extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --vhost-user) vhost_user=$2; shift ;;
    --tap-netns) tap_netns=$2; shift ;;
    --tap) tap=$2; shift ;;
    --vhost-net) vhost_net=$2; shift ;;
    --tx-timer) tx_timer=1 ;;
    --mac) mac=$2; shift ;;
    --queues) queues=$2; shift ;;
    --ip) ip=$2; shift ;;
    --agent) agent=$2; shift ;;
    --console-log) console=$2; shift ;;
    --pidfile) pidfile=$2; shift ;;
    --mem) mem=$2; shift ;;
    --smp) smp=$2; shift ;;
    --reconnect-ms) reconnect_ms=$2; shift ;;
    --kernel) kernel=$2; shift ;;
    --initrd) initrd=$2; shift ;;
    --qemu) qemu=$2; shift ;;
    --extra) extra=$2; shift ;;
    -h|--help) usage ;;
    *) echo "qemu-run: unknown option $1" >&2; usage ;;
  esac
  shift
done
[ -f "$kernel" ] && [ -f "$initrd" ] || { echo "qemu-run: guest image missing ($kernel); run ci/guest/build-image.sh" >&2; exit 1; }
command -v "$qemu" >/dev/null || { echo "qemu-run: $qemu not found; run ci/setup.sh (installs qemu-system-x86)" >&2; exit 1; }
if [ -z "$vhost_user" ] && [ -z "$tap_netns" ]; then echo "qemu-run: give --vhost-user SOCK or --tap-netns NS --tap NAME" >&2; exit 2; fi

major=$("$qemu" --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
vectors=""
if [ -n "$vhost_user" ]; then
  # QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers with vhost-user unless vectors=0.
  [ "${major:-0}" -lt 8 ] && vectors=",vectors=0"
  [ "$queues" -gt 1 ] && [ -z "$vectors" ] && vectors=",vectors=$((2 * queues + 2))"
fi
mq=""
[ "$queues" -gt 1 ] && mq=",mq=on"

args=(-name vnb-guest -accel tcg -cpu max -m "$mem" -smp "$smp" -nodefaults -display none -no-reboot
  -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -machine "q35,memory-backend=mem"
  -kernel "$kernel" -initrd "$initrd"
  -append "console=ttyS0 quiet panic=-1 vnb.ip=$ip vnb.mq=$queues"
  -chardev "file,id=con,path=$console" -serial chardev:con)
if [ -n "$agent" ]; then
  args+=(-device virtio-serial-pci,id=vser -chardev "socket,id=agent,path=$agent,server=on,wait=off"
    -device virtserialport,bus=vser.0,chardev=agent,name=vnb.agent)
fi
if [ -n "$vhost_user" ]; then
  rc=""
  if [ -n "$reconnect_ms" ]; then
    if [ "${major:-0}" -ge 9 ]; then rc=",reconnect-ms=$reconnect_ms"; else rc=",reconnect=$(( (reconnect_ms + 999) / 1000 ))"; fi
  fi
  args+=(-chardev "socket,id=vnb0,path=$vhost_user$rc" -netdev "vhost-user,id=net0,chardev=vnb0,queues=$queues"
    -device "virtio-net-pci,netdev=net0,mac=$mac,romfile=$mq$vectors")
  # shellcheck disable=SC2086
  "$qemu" "${args[@]}" $extra >/dev/null 2>"${console}.qemu-stderr" &
  pid=$!
else
  [ -n "$tap" ] || { echo "qemu-run: --tap-netns needs --tap NAME" >&2; exit 2; }
  txt=""
  [ "$tx_timer" = 1 ] && txt=",tx=timer"
  args+=(-netdev "tap,id=net0,ifname=$tap,script=no,downscript=no,vhost=$vhost_net,queues=$queues"
    -device "virtio-net-pci,netdev=net0,mac=$mac,romfile=$mq$txt")
  # shellcheck disable=SC2086
  ip netns exec "$tap_netns" "$qemu" "${args[@]}" $extra >/dev/null 2>"${console}.qemu-stderr" &
  pid=$!
fi
[ -n "$pidfile" ] && echo "$pid" >"$pidfile"
echo "$pid"
