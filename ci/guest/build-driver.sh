#!/usr/bin/env bash
# Builds the patched guest virtio_net driver (guest-driver-patch/linux/<series>/*.patch) out of
# tree as virtio_net_batch.ko for one Debian cloud kernel, from Debian's own packages at the
# kernel package's exact version:
#   - the source: drivers/net/virtio_net.c from linux-source-<series> (e.g. linux-source-6.12),
#     patched with 'patch -p1 --fuzz=0' (the series must apply cleanly);
#   - the build tree: linux-headers-<release>, the linux-headers-*-common and linux-kbuild-*
#     packages it depends on.
# The packages are fetched with 'apt-get download' and unpacked under OUTDIR/cache, not
# installed: Debian's linux-headers-* depend on the linux-image package, which would put a
# kernel into this machine's /boot. Building needs make, the kernel's compiler (gcc-12), patch,
# binutils, kmod and the kbuild tools' libraries (ci/setup.sh installs them).
#
# Usage: ci/guest/build-driver.sh [--kernel-pkg PKG] [--kernel-version VER] [--out DIR]
#   --kernel-pkg PKG      linux-image-*-cloud-amd64 package the guest boots (default: the one
#                         ci/guest/build-image.sh chose last for target/guest, else the newest
#                         linux-image-6.12.*-cloud-amd64 apt knows)
#   --kernel-version VER  its Debian version (default: apt's candidate for PKG)
#   --out DIR             output and cache directory (default: <repo>/target/guest/driver)
# Prints the path of the module (DIR/<release>/virtio_net_batch.ko) on stdout, logs on stderr.
# Cached: nothing is done while the patches, this script and the kernel package are unchanged.
# Environment: FORCE=1 rebuilds.
set -euo pipefail
trap 'echo "build-driver: failed (line $LINENO: $BASH_COMMAND)" >&2' ERR

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; }
die() { echo "build-driver: $*" >&2; exit 1; }
log() { echo "build-driver: $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install Debian package '$2' (ci/setup.sh installs it)"; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
kpkg="" kver_pkg="" out=$repo/target/guest/driver
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --kernel-pkg|--kernel-version|--out) [ $# -ge 2 ] || { usage >&2; exit 2; } ;;
    *) usage >&2; exit 2 ;;
  esac
  case "$1" in
    --kernel-pkg) kpkg=$2 ;;
    --kernel-version) kver_pkg=$2 ;;
    --out) out=$2 ;;
  esac
  shift 2
done

need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need xz xz-utils
need make make
need patch patch
need strip binutils
need modinfo kmod
need sha256sum coreutils
need flock util-linux

# --- which kernel ----------------------------------------------------------------------------
if [ -z "$kpkg" ]; then
  choice=$repo/target/guest/cache/kernel-choice
  if [ -f "$choice" ]; then
    kpkg=$(sed -n 2p "$choice")
    [ -n "$kver_pkg" ] || kver_pkg=$(sed -n 3p "$choice")
  else
    kpkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9.]+-cloud-amd64$' 2>/dev/null |
      awk '{print $1}' | sort -V | tail -1)
  fi
  [ -n "$kpkg" ] || die "no linux-image-6.12.*-cloud-amd64 known to apt; run ci/setup.sh as root (apt-get update), or give --kernel-pkg"
fi
[[ "$kpkg" =~ ^linux-image-(([0-9]+\.[0-9]+)\.[^ ]*-cloud-amd64)$ ]] ||
  die "--kernel-pkg '$kpkg' is not a linux-image-*-cloud-amd64 package"
krel=${BASH_REMATCH[1]}
series=${BASH_REMATCH[2]}
if [ -z "$kver_pkg" ]; then
  kver_pkg=$(apt-cache policy "$kpkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$kver_pkg" ] && [ "$kver_pkg" != "(none)" ] || die "apt has no version of $kpkg; give --kernel-version or run 'apt-get update'"
fi
patches=$repo/guest-driver-patch/linux/$series
compgen -G "$patches/*.patch" >/dev/null ||
  die "no patch series for Linux $series in $patches (kernel $kpkg)"

# --- cache check -----------------------------------------------------------------------------
mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9
dest=$out/$krel
ko=$dest/virtio_net_batch.ko
stamp=$(
  {
    echo "kernel $kpkg $kver_pkg"
    sha256sum <"$0"
    (cd "$patches" && LC_ALL=C sha256sum ./*.patch)
  } | sha256sum | cut -c1-32
)
if [ "${FORCE:-0}" != 1 ] && [ -s "$ko" ] && [ "$(cat "$dest/stamp" 2>/dev/null)" = "$stamp" ]; then
  log "up to date ($krel)"
  echo "$ko"
  exit 0
fi
log "building virtio_net_batch.ko for $krel ($kpkg $kver_pkg, patches $patches)"

work=$(mktemp -d "${TMPDIR:-/tmp}/vnb-driver.XXXXXX")
trap 'rm -rf "$work"' EXIT

download() { # download PKG VERSION DIR: the .deb's path on stdout
  local pkg=$1 ver=$2 dir=$3 f
  mkdir -p "$dir"
  f=$(find "$dir" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -1)
  if [ -z "$f" ]; then
    (cd "$work" && apt-get download -q "$pkg=$ver" >/dev/null 2>"$work/apt.err") ||
      die "apt-get download $pkg=$ver failed: $(grep -v '^W:' "$work/apt.err" | tail -3) (run 'apt-get update' as root; is $ver still in the archive?)"
    f=$(find "$work" -maxdepth 1 -name "${pkg}_*.deb" | head -1)
    [ -n "$f" ] || die "apt-get download $pkg=$ver produced no .deb"
    mv "$f" "$dir/"
    f=$dir/$(basename "$f")
  fi
  echo "$f"
}

# --- the pristine source file (the 150 MB source package is not kept) ------------------------
src=$out/cache/src/virtio_net.c-$series-$kver_pkg
if [ ! -s "$src" ]; then
  log "extracting drivers/net/virtio_net.c from linux-source-$series $kver_pkg"
  sdeb=$(download "linux-source-$series" "$kver_pkg" "$work/src")
  mkdir -p "$out/cache/src"
  dpkg-deb --fsys-tarfile "$sdeb" | tar -xO "./usr/src/linux-source-$series.tar.xz" | xz -dc |
    tar -xO "linux-source-$series/drivers/net/virtio_net.c" >"$src.tmp" ||
    die "linux-source-$series $kver_pkg has no drivers/net/virtio_net.c"
  mv "$src.tmp" "$src"
  rm -f "$sdeb"
fi

# --- the build tree: headers, common headers, kbuild, unpacked privately ---------------------
kroot=$out/cache/kbuild-$krel
kdir=$kroot/usr/src/linux-headers-$krel
if [ ! -f "$kroot/.complete" ]; then
  log "unpacking linux-headers-$krel $kver_pkg and its common headers and kbuild"
  rm -rf "$kroot"
  hdeb=$(download "linux-headers-$krel" "$kver_pkg" "$work/debs")
  deps=$(dpkg-deb -f "$hdeb" Depends)
  common=$(grep -o 'linux-headers-[^ ,(]*-common[^ ,(]*' <<<"$deps" | head -1 || true)
  kbuild=$(grep -o 'linux-kbuild-[^ ,(]*' <<<"$deps" | head -1 || true)
  [ -n "$common" ] && [ -n "$kbuild" ] || die "cannot find the common headers and kbuild packages in linux-headers-$krel's Depends: $deps"
  mkdir -p "$kroot"
  for d in "$hdeb" "$(download "$common" "$kver_pkg" "$work/debs")" "$(download "$kbuild" "$kver_pkg" "$work/debs")"; do
    dpkg-deb -x "$d" "$kroot"
  done
  [ -f "$kdir/Makefile" ] || die "linux-headers-$krel has no usr/src/linux-headers-$krel/Makefile"
  # The flavour's Makefile includes the common one by absolute path: point it at our copy.
  sed -i "s|^include /usr/src/|include $kroot/usr/src/|" "$kdir/Makefile"
  cc=$(sed -n 's/^CC = .*\$(CROSS_COMPILE)\(.*\)$/\1/p' "$kdir/.kernelvariables" 2>/dev/null || true)
  echo "${cc:-gcc}" >"$kroot/.compiler"
  touch "$kroot/.complete"
fi
cc=$(cat "$kroot/.compiler")
command -v "$cc" >/dev/null 2>&1 || die "'$cc' not found: the kernel was built with it; install Debian package '$cc' (ci/setup.sh installs it)"

# --- patch and build -------------------------------------------------------------------------
mkdir -p "$work/tree/drivers/net"
cp "$src" "$work/tree/drivers/net/virtio_net.c"
for p in "$patches"/*.patch; do
  patch -p1 --fuzz=0 --no-backup-if-mismatch -s -d "$work/tree" <"$p" >"$work/patch.log" 2>&1 ||
    die "$(basename "$p") does not apply cleanly to virtio_net.c of linux-source-$series $kver_pkg: $(cat "$work/patch.log")"
done
mkdir -p "$work/mod"
cp "$work/tree/drivers/net/virtio_net.c" "$work/mod/virtio_net.c"
printf 'obj-m := virtio_net_batch.o\nvirtio_net_batch-y := virtio_net.o\n' >"$work/mod/Kbuild"
make -s -C "$kdir" M="$work/mod" modules >"$work/build.log" 2>&1 ||
  die "the module does not build against linux-headers-$krel:
$(tail -40 "$work/build.log")"
[ -s "$work/mod/virtio_net_batch.ko" ] || die "the build made no virtio_net_batch.ko: $(tail -20 "$work/build.log")"
strip --strip-debug "$work/mod/virtio_net_batch.ko"
vermagic=$(modinfo -F vermagic "$work/mod/virtio_net_batch.ko")
[ "${vermagic%% *}" = "$krel" ] || die "virtio_net_batch.ko has vermagic '$vermagic', not $krel"

mkdir -p "$dest"
cp "$work/mod/virtio_net_batch.ko" "$ko.new"
cp "$work/mod/virtio_net.c" "$dest/virtio_net.c"
mv -f "$ko.new" "$ko"
echo "$stamp" >"$dest/stamp"
log "built $ko ($(du -h "$ko" | cut -f1), vermagic $vermagic)"
echo "$ko"
