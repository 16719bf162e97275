#!/usr/bin/env bash
# Boots the test guest (ci/guest/build-image.sh) under TCG in the background; prints QEMU's pid.
#
#   ci/qemu-run.sh --vhost-user SOCK [--reconnect-ms MS] [OPTIONS]     NIC served by a vhost-user backend
#   ci/qemu-run.sh --tap-netns NS --tap NAME [--vhost-net on|off] [--tx-timer] [OPTIONS]
#                                  QEMU's own virtio-net on a tap QEMU creates in namespace NS
#                                  (QEMU runs under 'ip netns exec NS')
# OPTIONS:
#   --mac MAC            NIC MAC (52:54:00:12:34:56)     --queues Q     queue pairs (1; mq=on if > 1)
#   --guest-queues G     pairs the guest turns on at boot with ethtool -L (default Q; 1 leaves
#                        Linux's default, one pair per vCPU)
#   --ip 10.77.N.2/24    guest eth0 address (kernel cmdline vnb.ip=)
#   --agent SOCK         command channel socket for ci/gexec.py (virtio-serial port vnb.agent)
#   --console-log FILE   guest console (ttyS0); QEMU's stderr goes to FILE.qemu-stderr
#   --pidfile FILE       also write QEMU's pid to FILE
#   --mem MB (512)  --smp N (1)  --kernel F  --initrd F (target/guest/vmlinuz, initrd.img)
#   --vectors N          MSI-X vectors of the NIC (default: QEMU's; 0 on QEMU < 8 with vhost-user)
#   --qemu BIN (qemu-system-x86_64, or $QEMU)  --extra "ARGS" (appended, word-split)
#   --append "ARGS"      extra kernel command line
#   --guest-driver stock|patched   the guest's virtio-net driver: Linux's virtio_net (default) or
#                        the patched virtio_net_batch.ko of guest-driver-patch/linux (vnb.driver=)
# Always TCG (-accel tcg -cpu max), shared memfd guest RAM (vhost-user needs it), no reboot.
# Works with QEMU 7.2 (vectors=0, reconnect=S) and 9.2+/10.x (reconnect-ms=MS).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit 2; }
die() { echo "qemu-run: $*" >&2; exit 1; }
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

vhost_user="" tap_netns="" tap="" vhost_net=off tx_timer=0 mac=52:54:00:12:34:56 queues=1
ip="" agent="" console="" pidfile="" mem=512 smp=1 reconnect_ms="" vectors_opt=""
kernel=$repo/target/guest/vmlinuz initrd=$repo/target/guest/initrd.img qemu=${QEMU:-qemu-system-x86_64}
extra="" append="" guest_queues="" guest_driver=stock
[ $# -gt 0 ] || usage
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage ;;
    --tx-timer) tx_timer=1; shift; continue ;;
    --*) [ $# -ge 2 ] || die "option $1 needs a value" ;;
    *) echo "qemu-run: unexpected argument '$1'" >&2; usage ;;
  esac
  case "$1" in
    --vhost-user) vhost_user=$2 ;;
    --tap-netns) tap_netns=$2 ;;
    --tap) tap=$2 ;;
    --vhost-net) vhost_net=$2 ;;
    --mac) mac=$2 ;;
    --queues) queues=$2 ;;
    --guest-queues) guest_queues=$2 ;;
    --ip) ip=$2 ;;
    --agent) agent=$2 ;;
    --console-log) console=$2 ;;
    --pidfile) pidfile=$2 ;;
    --mem) mem=$2 ;;
    --smp) smp=$2 ;;
    --reconnect-ms) reconnect_ms=$2 ;;
    --vectors) vectors_opt=$2 ;;
    --kernel) kernel=$2 ;;
    --initrd) initrd=$2 ;;
    --qemu) qemu=$2 ;;
    --extra) extra=$2 ;;
    --append) append=$2 ;;
    --guest-driver) guest_driver=$2 ;;
    *) echo "qemu-run: unknown option $1" >&2; usage ;;
  esac
  shift 2
done

# --- checks ----------------------------------------------------------------------------------
if [ -n "$vhost_user" ] && [ -n "$tap_netns$tap" ]; then die "give either --vhost-user or --tap-netns/--tap, not both"; fi
[ -n "$vhost_user" ] || [ -n "$tap_netns" ] || die "give --vhost-user SOCK or --tap-netns NS --tap NAME (see --help)"
[ -z "$tap_netns" ] || [ -n "$tap" ] || die "--tap-netns needs --tap NAME"
[ -z "$tap" ] || [ -n "$tap_netns" ] || die "--tap needs --tap-netns NS (the tap is never made in the root namespace)"
[[ "$queues" =~ ^[1-9][0-9]*$ ]] || die "--queues must be a positive number"
[[ "$mem" =~ ^[1-9][0-9]*$ ]] || die "--mem must be a number of MiB"
[[ "$smp" =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive number"
[[ "$mac" =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || die "bad --mac '$mac'"
[ -z "$reconnect_ms" ] || [[ "$reconnect_ms" =~ ^[0-9]+$ ]] || die "--reconnect-ms must be a number"
[ -z "$vectors_opt" ] || [[ "$vectors_opt" =~ ^[0-9]+$ ]] || die "--vectors must be a number"
case "$vhost_net" in on|off) ;; *) die "--vhost-net must be on or off" ;; esac
case "$guest_driver" in stock|patched) ;; *) die "--guest-driver must be stock or patched" ;; esac
for f in "$kernel" "$initrd"; do
  [ -s "$f" ] || die "guest image missing: $f; build it with ci/guest/build-image.sh"
done
command -v "$qemu" >/dev/null 2>&1 || die "$qemu not found; run ci/setup.sh (installs qemu-system-x86 from bookworm-backports)"
kernel=$(abspath "$kernel") initrd=$(abspath "$initrd")
[ -z "$vhost_user" ] || vhost_user=$(abspath "$vhost_user")
[ -z "$agent" ] || agent=$(abspath "$agent")
[ -z "$console" ] || console=$(abspath "$console")
[ -z "$pidfile" ] || pidfile=$(abspath "$pidfile")
if [ -n "$vhost_user" ] && [ -z "$reconnect_ms" ] && [ ! -S "$vhost_user" ]; then
  die "vhost-user socket $vhost_user does not exist (start the backend first, or use --reconnect-ms)"
fi
if [ -n "$tap_netns" ]; then
  [ "$(id -u)" -eq 0 ] || die "--tap-netns needs root"
  ip netns list | awk '{print $1}' | grep -qxF "$tap_netns" || die "namespace $tap_netns does not exist (ci/netns.sh create $tap_netns)"
  [ -c /dev/net/tun ] || die "/dev/net/tun missing (modprobe tun)"
  if [ "$vhost_net" = on ] && [ ! -c /dev/vhost-net ]; then die "--vhost-net on needs /dev/vhost-net (modprobe vhost_net)"; fi
fi
if [ -n "$agent" ] && [ -e "$agent" ]; then
  [ -S "$agent" ] || die "--agent $agent exists and is not a socket"
  # A stale socket from an earlier run; QEMU would fail to bind.
  rm -f "$agent"
fi

ver=$("$qemu" --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1)
read -r major minor <<<"${ver:-0 0}"
vnum=$((major * 100 + minor))

# --- command line ----------------------------------------------------------------------------
cmdline="console=ttyS0 quiet panic=-1"
[ -z "$ip" ] || cmdline+=" vnb.ip=$ip"
guest_queues=${guest_queues:-$queues}
[[ "$guest_queues" =~ ^[1-9][0-9]*$ ]] && [ "$guest_queues" -le "$queues" ] ||
  die "--guest-queues must be between 1 and --queues ($queues)"
[ "$guest_queues" -le 1 ] || cmdline+=" vnb.mq=$guest_queues"
[ "$guest_driver" = stock ] || cmdline+=" vnb.driver=$guest_driver"
[ -z "$append" ] || cmdline+=" $append"

# shellcheck disable=SC2054  # commas inside QEMU option values
args=(-name vnb-guest,debug-threads=on -accel tcg -cpu max -m "$mem" -smp "$smp" -nodefaults -display none -no-reboot
  -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -machine "q35,memory-backend=mem"
  -kernel "$kernel" -initrd "$initrd" -append "$cmdline")
if [ -n "$console" ]; then
  args+=(-chardev "file,id=con,path=$console" -serial chardev:con)
else
  args+=(-serial null)
fi
if [ -n "$agent" ]; then
  # shellcheck disable=SC2054
  args+=(-device virtio-serial-pci,id=vser
    -chardev "socket,id=agent,path=$agent,server=on,wait=off"
    -device virtserialport,bus=vser.0,chardev=agent,name=vnb.agent)
fi

nic="virtio-net-pci,netdev=net0,mac=$mac,romfile="
[ "$queues" -le 1 ] || nic+=",mq=on"
if [ -n "$vhost_user" ]; then
  rc=""
  if [ -n "$reconnect_ms" ]; then
    if [ "$vnum" -ge 902 ]; then rc=",reconnect-ms=$reconnect_ms"
    else rc=",reconnect=$(((reconnect_ms + 999) / 1000))"; fi
  fi
  if [ -n "$vectors_opt" ]; then nic+=",vectors=$vectors_opt"
  # QEMU 7.2 under TCG segfaults (msix vector notifiers) with vhost-user unless vectors=0.
  elif [ "$major" -lt 8 ]; then nic+=",vectors=0"; fi
  args+=(-chardev "socket,id=vnb0,path=$vhost_user$rc"
    -netdev "vhost-user,id=net0,chardev=vnb0,queues=$queues" -device "$nic")
else
  [ -z "$vectors_opt" ] || nic+=",vectors=$vectors_opt"
  [ "$tx_timer" = 0 ] || nic+=",tx=timer"
  args+=(-netdev "tap,id=net0,ifname=$tap,script=no,downscript=no,vhost=$vhost_net,queues=$queues"
    -device "$nic")
fi
# shellcheck disable=SC2206
[ -z "$extra" ] || args+=($extra)

# --- start -----------------------------------------------------------------------------------
if [ -n "$console" ]; then
  : >"$console"
  errlog=$console.qemu-stderr
  keep_errlog=1
else
  errlog=$(mktemp "${TMPDIR:-/tmp}/vnb-qemu-stderr.XXXXXX")
  keep_errlog=0
fi
prefix=()
[ -z "$tap_netns" ] || prefix=(ip netns exec "$tap_netns")
# setsid: QEMU must not get the caller's terminal signals; no stdin/stdout so that callers
# capturing our output do not wait for QEMU.
setsid "${prefix[@]}" "$qemu" "${args[@]}" </dev/null >/dev/null 2>"$errlog" &
pid=$!

# Catch immediate failures (bad options, backend socket refused, tap busy, ...): wait until the
# vCPU thread exists plus a little for device creation, at most 3 s, or until QEMU exits.
seen=0
for _ in $(seq 60); do
  sleep 0.05
  kill -0 "$pid" 2>/dev/null || break
  if [ "$seen" -gt 0 ]; then
    seen=$((seen + 1))
    [ "$seen" -lt 6 ] || break
  elif grep -qs '^CPU 0/TCG' /proc/"$pid"/task/*/comm; then
    seen=1
  fi
done
if ! kill -0 "$pid" 2>/dev/null; then
  wait "$pid" 2>/dev/null && st=0 || st=$?
  echo "qemu-run: QEMU exited at once (status $st):" >&2
  sed 's/^/  /' "$errlog" >&2
  echo "  command: ${prefix[*]} $qemu ${args[*]}" >&2
  [ "$keep_errlog" = 1 ] || rm -f "$errlog"
  exit 1
fi
[ "$keep_errlog" = 1 ] || rm -f "$errlog"   # QEMU keeps writing to the unlinked file
[ -z "$pidfile" ] || echo "$pid" >"$pidfile"
echo "$pid"
