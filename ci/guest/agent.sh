#!/bin/sh
# Guest command agent (/bin/vnb-agent, run and restarted by busybox init).
# Channel: the virtio-serial port named "vnb.agent" (host side: a QEMU chardev unix socket, see
# ci/qemu-run.sh --agent and ci/gexec.py).
# Protocol: the host writes one line, a shell command; the agent runs it with 'sh -c' (stdin
# /dev/null, stdout+stderr captured), then writes the output, a newline if the output did not end
# with one, and the line "__VNB_RC__ <exit code>". Empty lines are ignored. One command at a
# time, forever.
# The port is opened once and never closed: closing it would drop input the host already sent.
# While no host is connected, reads return EOF at once (poll every 0.1 s) and writes block until
# a host connects.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
cd / || exit 1

announce() { # the ready line on the console, once per boot, then the console shell starts
  [ -e /run/vnb-agent.started ] && return
  echo "$(cat /run/vnb-ready 2>/dev/null || echo VNB-GUEST-READY) agent=$1" >/dev/console
  : >/run/vnb-agent.started
}
find_port() {
  for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] && [ "$(cat "$p/name")" = vnb.agent ] && [ -c "/dev/${p##*/}" ] &&
      { echo "/dev/${p##*/}"; return 0; }
  done
  return 1
}
i=0
until port=$(find_port); do
  # The port is there at boot if QEMU has one (virtio_console is built in); keep looking anyway.
  i=$((i + 1))
  [ $i -eq 20 ] && announce "none (no virtio-serial port named vnb.agent: QEMU without --agent?)"
  if [ $i -lt 20 ]; then sleep 0.1; else sleep 1; fi
done
exec 3<>"$port" || { echo "vnb-agent: cannot open $port" >/dev/console; sleep 1; exit 1; }
if [ ! -e /run/vnb-agent.started ]; then
  announce "$port"
  # Also through the channel; this blocks until the first host connects (gexec skips it).
  echo "$(cat /run/vnb-ready 2>/dev/null || echo VNB-GUEST-READY) agent=$port" >&3
fi

out=/run/vnb-agent.out
cr=$(printf '\r')
while true; do
  if ! IFS= read -r cmd <&3; then
    # EOF: no host connected (or it left mid-line); a partial line is dropped.
    sleep 0.1
    continue
  fi
  cmd=${cmd%"$cr"}
  [ -n "$cmd" ] || continue
  sh -c "$cmd" >"$out" 2>&1 </dev/null
  rc=$?
  cat "$out" >&3
  # (wc, not $(...): a last byte NUL would vanish in a command substitution)
  [ "$(tail -c 1 "$out" | tr -d '\n' | wc -c)" -eq 0 ] || echo >&3
  echo "__VNB_RC__ $rc" >&3
  rm -f "$out"
done
