#!/usr/bin/env bash
# Idempotent system setup for vhost-net-batch tests, demo and benchmarks (Debian 12, as root).
# Installs QEMU 10.0 from bookworm-backports, the guest kernel package, iperf3, busybox, ab, DPDK,
# and reserves hugepages for DPDK's virtio-user frontend.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "ci/setup.sh must run as root (it installs Debian packages and sets hugepages)" >&2
  exit 1
fi

command -v cargo >/dev/null 2>&1 || { echo "ci/setup.sh: cargo not found; install the Rust toolchain (rustup, Rust >= 1.85) first" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
BPO=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$BPO" ]; then
  cat >"$BPO" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  rm -f /var/lib/vnb-apt-updated
fi

PKGS=(iperf3 busybox-static apache2-utils dpdk dpdk-dev iproute2 ethtool cpio kmod python3
      zstd xz-utils iputils-ping procps socat dbench pkg-config libc6-dev g++ fonts-dejavu-core)
BPO_PKGS=(qemu-system-x86 qemu-utils)
# The patched guest driver (ci/guest/build-driver.sh): the kernel sources and headers are fetched
# as .debs and unpacked privately (linux-headers-* would install a kernel image here); building
# needs the kernel's compiler (gcc-12), make, patch, binutils and the kbuild tools' libraries.
PKGS+=(make gcc-12 patch binutils pahole libelf1 libssl3 zlib1g)

missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
need_qemu=1
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
  [ "${v:-0}" -ge 10 ] && need_qemu=0
fi
if [ ${#missing[@]} -gt 0 ] || [ $need_qemu -eq 1 ]; then
  if [ ! -f /var/lib/vnb-apt-updated ] || [ -n "$(find /var/lib/vnb-apt-updated -mmin +720 2>/dev/null)" ]; then
    apt-get update -q
    touch /var/lib/vnb-apt-updated
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  if [ $need_qemu -eq 1 ]; then
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}"
  fi
fi

# Hugepages for dpdk-testpmd (virtio-user frontend); 512 x 2 MiB = 1 GiB.
want=512
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want" ]; then
  echo "$want" >/proc/sys/vm/nr_hugepages || true
fi
if ! mountpoint -q /dev/hugepages 2>/dev/null; then
  mkdir -p /dev/hugepages
  mount -t hugetlbfs nodev /dev/hugepages || true
fi
modprobe tun 2>/dev/null || true

# cargo-fuzz: the bounded fuzz tests (control-msg/tests, vhost-net-batch/tests) and `make fuzz`.
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2 ||
    { echo "ci/setup.sh: cargo install cargo-fuzz failed (crates.io reachable?)" >&2; exit 1; }
fi
echo "setup: ok ($(qemu-system-x86_64 --version | head -1); hugepages $(cat /proc/sys/vm/nr_hugepages))"
