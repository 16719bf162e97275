#!/usr/bin/env bash
# Builds the test guest: Debian's 6.12 cloud kernel (vmlinuz) and a busybox initramfs (initrd.img)
# with virtio_net, iperf3, ethtool, busybox httpd, tbench and a command agent on a virtio-serial
# port (ci/guest/init, ci/guest/agent.sh, ci/guest/vnb-run). The image also carries the patched
# driver virtio_net_batch.ko (guest-driver-patch/linux, built by ci/guest/build-driver.sh), which
# the guest loads instead of the stock virtio_net only when booted with vnb.driver=patched.
#
# Usage: ci/guest/build-image.sh [OUTDIR]          (default OUTDIR: <repo>/target/guest)
# Environment:
#   EXTRA_BINS="/path/a /path/b"  extra binaries copied to the guest's /usr/bin (their shared
#                                 libraries too, if any)
#   KERNEL_PKG=linux-image-...    pin the kernel package (default: the newest
#                                 linux-image-6.12.*-cloud-amd64 apt knows, bookworm-backports or
#                                 bookworm-security)
#   FORCE=1                       rebuild even if the stamp matches
# Cached: when the stamp (hash of ci/guest/*, kernel package version, busybox/iperf3/ethtool/
# tbench binaries, the patched driver module and EXTRA_BINS) matches OUTDIR/stamp, nothing is
# done. Needs root only for 'apt-get update' (done once, when apt does not know any 6.12 cloud
# kernel yet).
set -euo pipefail
trap 'echo "build-image: failed (line $LINENO: $BASH_COMMAND)" >&2' ERR

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; }
case "${1:-}" in -h|--help) usage; exit 0 ;; -*) usage >&2; exit 2 ;; esac
[ $# -le 1 ] || { usage >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/target/guest}
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)

die() { echo "build-image: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install Debian package '$2' (ci/setup.sh installs it)"; }
need busybox busybox-static
need iperf3 iperf3
need cpio cpio
need dpkg-deb dpkg
need apt-cache apt
need xz xz-utils
need zstd zstd
need gzip gzip
need depmod kmod
need modprobe kmod
need ldd libc-bin
need sha256sum coreutils
need flock util-linux
# busybox must be the static one (the guest has no libc for it).
if ldd "$(command -v busybox)" >/dev/null 2>&1; then
  die "$(command -v busybox) is dynamically linked; install busybox-static"
fi

# One build at a time per OUTDIR (tests may call this concurrently).
exec 9>"$out/.lock"
flock 9

# --- kernel package choice (cached while apt's lists are unchanged) -------------------------
choose_kernel() {
  if [ -n "${KERNEL_PKG:-}" ]; then
    echo "$KERNEL_PKG"
    return
  fi
  apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9.]+-cloud-amd64$' 2>/dev/null |
    awk '{print $1}' | sort -V | tail -1
}
lists_key="$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0) ${KERNEL_PKG:-newest}"
kpkg="" kver_pkg=""
if [ -f "$out/cache/kernel-choice" ] && [ "$(sed -n 1p "$out/cache/kernel-choice")" = "$lists_key" ]; then
  kpkg=$(sed -n 2p "$out/cache/kernel-choice")
  kver_pkg=$(sed -n 3p "$out/cache/kernel-choice")
fi
if [ -z "$kpkg" ] || [ -z "$kver_pkg" ]; then
  kpkg=$(choose_kernel)
  if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
    [ -n "$(ls /etc/apt/sources.list.d/*backports* 2>/dev/null)" ] ||
      die "no bookworm-backports apt source; run ci/setup.sh (as root) first"
    echo "build-image: apt knows no linux-image-6.12.*-cloud-amd64 yet; running apt-get update" >&2
    apt-get update -q >&2
    lists_key="$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0) ${KERNEL_PKG:-newest}"
    kpkg=$(choose_kernel)
  fi
  [ -n "$kpkg" ] || die "no linux-image-6.12.*-cloud-amd64 package known to apt; run ci/setup.sh as root (adds bookworm-backports and runs apt-get update)"
  kver_pkg=$(apt-cache policy "$kpkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$kver_pkg" ] || [ "$kver_pkg" = "(none)" ]; then
    die "apt has no installable version of $kpkg (KERNEL_PKG?); run 'apt-get update'"
  fi
  printf '%s\n%s\n%s\n' "$lists_key" "$kpkg" "$kver_pkg" >"$out/cache/kernel-choice"
fi

# --- inputs and stamp ------------------------------------------------------------------------
bb=$(command -v busybox)
iperf=$(command -v iperf3)
ethtool=$(command -v ethtool || true)
if [ -z "$ethtool" ] && [ -x /usr/sbin/ethtool ]; then ethtool=/usr/sbin/ethtool; fi
tbench=$(command -v tbench || true)
tbench_srv=$(command -v tbench_srv || true)
# The guest tools (vnb-guest, vnb-frame) as static executables: built here with their own target
# directory, so a cargo run holding target/'s build lock (cargo test) does not block this one.
command -v cargo >/dev/null || die "cargo not found (install Rust; the guest tools are built from guest-driver-patch/)"
tools_dir=$repo/target/guest-tools
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" CARGO_TARGET_DIR="$tools_dir" \
  cargo build --quiet --release --target x86_64-unknown-linux-gnu -p guest-driver-patch --bins >&2) ||
  die "building the static guest tools (guest-driver-patch) failed"
tools=()
for t in vnb-guest vnb-frame; do
  f=$tools_dir/x86_64-unknown-linux-gnu/release/$t
  [ -x "$f" ] || die "guest tool $f missing after the build"
  if ldd "$f" 2>&1 | grep -q "=>"; then die "guest tool $f is not statically linked"; fi
  tools+=("$f")
done

extra=()
for b in ${EXTRA_BINS:-}; do
  if [ ! -f "$b" ] || [ ! -x "$b" ]; then die "EXTRA_BINS: '$b' is not an executable file"; fi
  extra+=("$(readlink -f "$b")")
done

# The patched guest driver for this kernel (cached by build-driver.sh itself).
driver_ko=$(bash "$here/build-driver.sh" --kernel-pkg "$kpkg" --kernel-version "$kver_pkg" --out "$out/driver") ||
  die "building the patched guest driver (ci/guest/build-driver.sh) failed; see above"
[ -s "$driver_ko" ] || die "build-driver.sh printed no module"

stamp=$(
  {
    echo "kernel $kpkg $kver_pkg"
    sha256sum "$driver_ko"
    (cd "$here" && find . -type f ! -name '*~' ! -name '.*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    for f in "$bb" "$iperf" $ethtool $tbench $tbench_srv "${tools[@]}"; do sha256sum "$f"; done
    echo "extra ${#extra[@]}"
    for f in ${extra[@]+"${extra[@]}"}; do sha256sum "$f"; done
  } | sha256sum | cut -c1-32
)
if [ "${FORCE:-0}" != 1 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
  [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
  echo "build-image: up to date ($kpkg $kver_pkg)"
  echo "$out/vmlinuz"
  echo "$out/initrd.img"
  exit 0
fi

echo "build-image: building the guest image with $kpkg $kver_pkg" >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/vnb-guest.XXXXXX")
trap 'rm -rf "$work" "$out/.vmlinuz.new" "$out/.initrd.img.new"' EXIT

# --- kernel ----------------------------------------------------------------------------------
debname="${kpkg}_${kver_pkg//:/%3a}_amd64.deb"
deb=$out/cache/$debname
if [ ! -s "$deb" ]; then
  (cd "$work" && apt-get download "$kpkg=$kver_pkg" >&2) ||
    die "apt-get download $kpkg=$kver_pkg failed (network? run 'apt-get update' as root)"
  dl=$(find "$work" -maxdepth 1 -name "${kpkg}_*.deb" | head -1)
  [ -n "$dl" ] || die "apt-get download $kpkg=$kver_pkg produced no .deb"
  # Keep only the package in use in the cache.
  find "$out/cache" -maxdepth 1 -name 'linux-image-*.deb' -delete
  mv "$dl" "$deb"
fi
dpkg-deb -x "$deb" "$work/k"
moddir=""
for d in "$work"/k/lib/modules/* "$work"/k/usr/lib/modules/*; do
  [ -d "$d" ] && { moddir=$d; break; }
done
[ -n "$moddir" ] || die "$deb has no lib/modules"
kver=$(basename "$moddir")
kbase=${moddir%/lib/modules/"$kver"}
vmlinuz=$work/k/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "$deb has no boot/vmlinuz-$kver"
depmod -b "$kbase" "$kver"

# --- initramfs tree --------------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,www,root,lib/vnb-modules}
ln -s usr/lib64 "$root/lib64" 2>/dev/null || true
mkdir -p "$root/usr/lib64"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

cp "$bb" "$root/bin/busybox"
busybox --list-full | while read -r a; do
  case "$a" in bin/busybox|"") continue ;; esac
  mkdir -p "$root/$(dirname "$a")"
  ln -sf /bin/busybox "$root/$a"
done

# Kernel modules for the NIC (and their dependencies, in load order), decompressed so that
# busybox insmod can load them. virtio_pci and virtio_console are built in (checked below).
order=$root/lib/vnb-modules/load-order
: >"$order"
add_module() { # add_module NAME: the module and its dependencies, dependencies first
  local kind path name
  modprobe -d "$kbase" -S "$kver" --show-depends "$1" >"$work/deps" 2>&1 ||
    die "module $1 not found in $kpkg: $(cat "$work/deps")"
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
    grep -qx "$name" "$order" && continue
    case "$path" in
      *.xz) xz -dc "$path" >"$root/lib/vnb-modules/$name" ;;
      *.zst) zstd -qdc "$path" >"$root/lib/vnb-modules/$name" ;;
      *.gz) gzip -dc "$path" >"$root/lib/vnb-modules/$name" ;;
      *) cp "$path" "$root/lib/vnb-modules/$name" ;;
    esac
    echo "$name" >>"$order"
  done <"$work/deps"
}
for m in virtio_pci virtio_console virtio_net; do
  grep -q "/$m\.ko" "$moddir/modules.builtin" || add_module "$m"
done
grep -qx virtio_net.ko "$order" || die "virtio_net is not a module in $kpkg: the patched driver cannot replace it"
# The patched driver: /init loads it in virtio_net.ko's place with vnb.driver=patched.
mkdir -p "$root/lib/vnb-modules/patched"
cp "$driver_ko" "$root/lib/vnb-modules/patched/virtio_net_batch.ko"

# Binaries with their shared libraries (same paths as on the host, so the loader finds them).
copy_with_libs() {
  local bin=$1 dest=$2 lib
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$bin" "$root$dest"
  { ldd "$bin" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
    while read -r lib; do
      [ -f "$lib" ] || continue
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
}
copy_with_libs "$iperf" /usr/bin/iperf3
for f in "${tools[@]}"; do cp "$f" "$root/usr/bin/"; done
if [ -n "$ethtool" ]; then
  copy_with_libs "$ethtool" /usr/sbin/ethtool
else
  echo "build-image: ethtool not installed (Debian package ethtool); vnb.mq=N will not work in the guest" >&2
fi
if [ -n "$tbench" ] && [ -n "$tbench_srv" ] && [ -f /usr/share/dbench/client.txt ]; then
  # tbench's loadfile is 26 MB: ship it xz-compressed; the wrapper unpacks it on first use.
  copy_with_libs "$tbench" /usr/lib/vnb/tbench
  copy_with_libs "$tbench_srv" /usr/bin/tbench_srv
  mkdir -p "$root/usr/share/dbench"
  xz -T0 -6 -c /usr/share/dbench/client.txt >"$root/usr/share/dbench/client.txt.xz"
  cat >"$root/usr/bin/tbench" <<'EOF'
#!/bin/sh
# tbench (dbench) with its default loadfile unpacked on first use.
f=/usr/share/dbench/client.txt
[ -s "$f" ] || { xzcat "$f.xz" >"$f.tmp" && mv "$f.tmp" "$f"; } || exit 1
exec /usr/lib/vnb/tbench "$@"
EOF
  chmod 755 "$root/usr/bin/tbench"
else
  echo "build-image: tbench/tbench_srv or /usr/share/dbench/client.txt missing (Debian package dbench); the guest will have no tbench" >&2
fi
for b in ${extra[@]+"${extra[@]}"}; do copy_with_libs "$b" "/usr/bin/$(basename "$b")"; done

cp "$here/init" "$root/init"
cp "$here/agent.sh" "$root/bin/vnb-agent"
cp "$here/vnb-run" "$root/bin/vnb-run"
chmod 755 "$root/init" "$root/bin/vnb-agent" "$root/bin/vnb-run"
cat >"$root/bin/vnb-console" <<'EOF'
#!/bin/sh
# The console shell, started once the agent has printed VNB-GUEST-READY (keeps that line whole).
i=0
while [ ! -e /run/vnb-agent.started ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
exec cttyhack sh -l
EOF
chmod 755 "$root/bin/vnb-console"
cat >"$root/etc/inittab" <<'EOF'
::respawn:/bin/vnb-agent
::respawn:/bin/vnb-console
::ctrlaltdel:/bin/poweroff -f
::shutdown:/bin/sync
EOF
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
echo vnb-guest >"$root/etc/hostname"
cat >"$root/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
PS1='vnb-guest# '
EOF
echo "$kver" >"$root/etc/kernel-release"

# gzip: boots as fast as zstd or an uncompressed cpio under TCG (measured), xz is ~0.5 s slower.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$out/.initrd.img.new"
cp "$vmlinuz" "$out/.vmlinuz.new"

# Replace atomically (same file system); a missing stamp means "rebuild" if we die in between.
rm -f "$out/stamp"
mv -f "$out/.vmlinuz.new" "$out/vmlinuz"
mv -f "$out/.initrd.img.new" "$out/initrd.img"
echo "$kver" >"$out/kernel-release"
echo "$kpkg $kver_pkg" >"$out/kernel-package"
echo "$stamp" >"$out/stamp"
echo "build-image: built guest with kernel $kver ($kpkg $kver_pkg), initrd $(du -h "$out/initrd.img" | cut -f1)," \
  "modules: $(tr '\n' ' ' <"$order")(patched: virtio_net_batch.ko)" >&2
echo "$out/vmlinuz"
echo "$out/initrd.img"
