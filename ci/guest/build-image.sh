#!/usr/bin/env bash
# Builds the test guest: Debian's 6.12 cloud kernel and a busybox initramfs with virtio_net,
# iperf3 (+ libraries), busybox httpd, tbench, and a command agent on a virtio-serial port.
# Usage: ci/guest/build-image.sh [OUTDIR]        (default: target/guest)
#   EXTRA_BINS="path ..."  extra static binaries copied to the guest's /usr/bin
# Cached: does nothing when the stamp of all inputs matches. Needs root for nothing but apt.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/target/guest}
mkdir -p "$out/cache"

need() { command -v "$1" >/dev/null 2>&1 || { echo "build-image: '$1' not found; run ci/setup.sh (as root) to install the test dependencies" >&2; exit 1; }; }
need busybox; need iperf3; need cpio; need dpkg-deb; need apt-cache; need xz; need gzip; need tbench

kpkg=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64$' | awk '{print $1}' | grep -v -- '-dbg' | sort -V | tail -1)
if [ -z "$kpkg" ]; then
  echo "build-image: no linux-image-6.12.*-cloud-amd64 package known to apt; run ci/setup.sh (adds bookworm-backports and runs apt-get update)" >&2
  exit 1
fi
kver_pkg=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')

hash_inputs() {
  {
    echo "$kpkg $kver_pkg"
    cat "$here"/build-image.sh "$here"/init "$here"/agent.sh
    sha256sum "$(command -v busybox)" "$(command -v iperf3)" "$(command -v tbench)"
    for b in ${EXTRA_BINS:-}; do sha256sum "$b"; done
  } | sha256sum | cut -c1-16
}
stamp=$(hash_inputs)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  echo "guest image up to date: $out/vmlinuz $out/initrd.img"
  exit 0
fi

deb=$(ls "$out"/cache/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  (cd "$out/cache" && apt-get download "$kpkg" >/dev/null)
  deb=$(ls "$out"/cache/"${kpkg}"_*.deb | head -1)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/k"
kver=$(ls "$work/k/lib/modules" | head -1)
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.new"

root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,www,usr/bin,usr/sbin,lib/modules,lib64,lib/x86_64-linux-gnu}
cp "$(command -v busybox)" "$root/bin/busybox"
# Modules in load order (dependencies first), decompressed for busybox insmod.
mods="net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/char/virtio_console"
: >"$root/lib/modules/load-order"
for m in $mods; do
  src=$(ls "$work/k/lib/modules/$kver/kernel/$m".ko* 2>/dev/null | head -1 || true)
  name=$(basename "$m")
  if [ -z "$src" ]; then
    if grep -q "/$name.ko" "$work/k/lib/modules/$kver/modules.builtin"; then continue; fi
    echo "build-image: module $m not in $kpkg" >&2; exit 1
  fi
  case "$src" in
    *.xz) xz -dc "$src" >"$root/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$src" >"$root/lib/modules/$name.ko" ;;
    *.gz) gzip -dc "$src" >"$root/lib/modules/$name.ko" ;;
    *) cp "$src" "$root/lib/modules/$name.ko" ;;
  esac
  echo "$name" >>"$root/lib/modules/load-order"
done

copy_with_libs() {
  local bin=$1 dest=$2
  cp "$bin" "$root$dest"
  ldd "$bin" 2>/dev/null | awk '/=>/ {print $3} /^\t\/lib64/ {print $1}' | while read -r lib; do
    [ -n "$lib" ] && [ -f "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
copy_with_libs "$(command -v iperf3)" /usr/bin/iperf3
copy_with_libs "$(command -v tbench)" /usr/bin/tbench
copy_with_libs "$(command -v tbench_srv)" /usr/bin/tbench_srv
mkdir -p "$root/usr/share/dbench"
cp /usr/share/dbench/client.txt "$root/usr/share/dbench/client.txt" 2>/dev/null || true
for b in ${EXTRA_BINS:-}; do cp "$b" "$root/usr/bin/"; done
cp "$here/init" "$root/init"
cp "$here/agent.sh" "$root/bin/vnb-agent"
chmod +x "$root/init" "$root/bin/vnb-agent"
echo "$kver" >"$root/etc/kernel-release"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initrd.img.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initrd.img.new" "$out/initrd.img"
echo "$stamp" >"$out/stamp"
echo "$kver" >"$out/kernel-release"
echo "guest image built ($kpkg): $out/vmlinuz $out/initrd.img ($(du -h "$out/initrd.img" | cut -f1))"
