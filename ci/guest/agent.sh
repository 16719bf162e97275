#!/bin/sh
# Guest command agent: reads one shell command per line from the virtio-serial port vnb.agent,
# runs it, writes its output and a line "__VNB_RC__ <exit code>".
port=""
i=0
while [ -z "$port" ] && [ $i -lt 200 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = vnb.agent ] && port=/dev/$(basename "$p")
  done
  [ -z "$port" ] && sleep 0.1
  i=$((i+1))
done
[ -n "$port" ] || { echo "vnb-agent: no virtio-serial port named vnb.agent" >/dev/console; exit 1; }
# A virtio-serial port opens once: one read-write descriptor for both directions.
while true; do
  exec 3<>"$port" || { sleep 0.5; continue; }
  while IFS= read -r cmd <&3; do
    sh -c "$cmd" >/tmp/agent.out 2>&1 </dev/null
    rc=$?
    cat /tmp/agent.out >&3
    echo "__VNB_RC__ $rc" >&3
  done
  exec 3<&-
  sleep 0.1
done
