#!/usr/bin/env bash
# The splice guard on arm64: tests/arm64/splice_guard.c (a C program using
# the real BPF object, built for arm64) and the AArch32 helper
# (tests/helpers/splice_arm32.s) in Debian arm64 kernels booted under
# qemu-system-aarch64 (emulated) from a small initramfs. The Rust crate is
# not built for arm64 here: this machine's toolchain has no arm64 standard
# library, and none can be installed from the package registries.
#
#   scripts/vmtest-arm64.sh            # Debian's 6.12 and 6.1 arm64 kernels
#   scripts/vmtest-arm64.sh 6.1.0-57   # one kernel (a linux-image-*-arm64 version)
#
# Needs root (it adds the arm64 architecture to dpkg to download arm64
# packages; nothing arm64 is installed, the packages are unpacked under
# target/arm64/). Prints each guest's checks and a table (target/vmtest-arm64.md);
# exits non-zero if a check failed or a guest did not finish.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ "$#" -gt 0 ] || set -- 6.12 6.1
WORK=$ROOT/target/arm64
mkdir -p "$WORK/debs"

scripts/install-deps.sh qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
  binutils-arm-linux-gnueabihf cpio
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -qq
fi

# kernel_version SPEC: the newest arm64 linux-image of a series.
kernel_version() {
  local pattern
  case "$1" in
    6.12) pattern='^linux-image-6\.12\.[0-9]+\+deb12-arm64$' ;;
    6.1) pattern='^linux-image-6\.1\.0-[0-9]+-arm64$' ;;
    *) echo "$1-arm64"; return ;;
  esac
  local found
  found=$(apt-cache search --names-only "$pattern" | awk '{print $1}' | sort -V | tail -1)
  [ -n "$found" ] || { echo "vmtest-arm64: no Debian arm64 kernel for series $1" >&2; exit 1; }
  echo "${found#linux-image-}"
}

# deb PACKAGE: the arm64 package's file, downloaded once.
deb() {
  local found
  found=$(ls "$WORK/debs/${1}_"*_arm64.deb 2>/dev/null | head -1 || true)
  if [ -z "$found" ]; then
    (cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root "$1:arm64")
    found=$(ls "$WORK/debs/${1}_"*_arm64.deb | head -1)
  fi
  echo "$found"
}
SYSROOT=$WORK/sysroot
for pkg in busybox-static libelf-dev zlib1g-dev libzstd-dev; do
  dpkg-deb -x "$(deb "$pkg")" "$SYSROOT"
done

# libbpf for arm64, from the same sources the crate links (libbpf-sys).
LIBBPF_SRC=$(cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "libbpf-sys":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "libbpf", "src"))')
[ -d "$LIBBPF_SRC" ] || { echo "vmtest-arm64: libbpf-sys sources not found" >&2; exit 1; }
make -s -C "$LIBBPF_SRC" BUILD_STATIC_ONLY=1 OBJDIR="$WORK/libbpf-obj" DESTDIR="$WORK/libbpf" \
  PREFIX=/usr CC=aarch64-linux-gnu-gcc AR=aarch64-linux-gnu-ar \
  EXTRA_CFLAGS="-I$SYSROOT/usr/include -I$SYSROOT/usr/include/aarch64-linux-gnu" \
  install install_headers > "$WORK/libbpf-build.log"

# The BPF object as build.rs compiles it, for arm64; its skeleton; the
# in-guest program and the AArch32 helper.
CLANG=${SOCKMAP_FASTPATH_CLANG:-$(ls /usr/bin/clang-[0-9]* | sort -V | tail -1)}
BUILD=$WORK/build
rm -rf "$BUILD"; mkdir -p "$BUILD"
"$CLANG" -g -O2 -target bpf -D__TARGET_ARCH_arm64 -Ibpf -I"$WORK/libbpf/usr/include" \
  -I/usr/aarch64-linux-gnu/include -c bpf/fastpath.bpf.c -o "$BUILD/fastpath.bpf.o"
bpftool gen skeleton "$BUILD/fastpath.bpf.o" name fastpath > "$BUILD/fastpath.skel.h"
aarch64-linux-gnu-gcc -static -O2 -Wall -Wextra -Werror -Ibpf -I"$BUILD" \
  -I"$WORK/libbpf/usr/include" -I"$SYSROOT/usr/include" -o "$BUILD/splice_guard" \
  tests/arm64/splice_guard.c -L"$WORK/libbpf/usr/lib64" -L"$SYSROOT/usr/lib/aarch64-linux-gnu" \
  -lbpf -lelf -lz -lzstd
arm-linux-gnueabihf-as -o "$BUILD/splice_arm32.o" tests/helpers/splice_arm32.s
arm-linux-gnueabihf-ld -o "$BUILD/splice_arm32" "$BUILD/splice_arm32.o"

# The initramfs: busybox, the two programs, an init that runs them.
INITRD=$BUILD/initrd
mkdir -p "$INITRD"/{bin,proc,sys,dev}
cp "$SYSROOT/bin/busybox" "$INITRD/bin/"
cp "$BUILD/splice_guard" "$BUILD/splice_arm32" "$INITRD/"
cat > "$INITRD/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "guest: $(uname -r) $(uname -m)"
/splice_guard /splice_arm32
echo "guest: splice_guard exited $?"
poweroff -f
EOF
chmod +x "$INITRD/init"
(cd "$INITRD" && find . | cpio -o -H newc --quiet | gzip -1 > "$BUILD/initrd.gz")

FAILED=0
TABLE=$ROOT/target/vmtest-arm64.md
printf '| kernel (arm64, emulated) | splice guard checks | time |\n|---|---|---|\n' > "$TABLE"
for spec in "$@"; do
  version=$(kernel_version "$spec")
  # Only the kernel image: its modules are not needed.
  dpkg-deb --fsys-tarfile "$(deb "linux-image-$version")" | tar -x -C "$SYSROOT" "./boot/vmlinuz-$version"
  log=$WORK/$version.log
  start=$(date +%s)
  echo "vmtest-arm64: booting $version (emulated)" >&2
  # cortex-a57: runs AArch32 at EL0, which the kernel's compat support
  # needs; single-threaded TCG as in scripts/vmtest.sh.
  timeout --kill-after=10s 10m qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1G \
    -accel tcg,thread=single -nographic -no-reboot \
    -kernel "$SYSROOT/boot/vmlinuz-$version" -initrd "$BUILD/initrd.gz" \
    -append "console=ttyAMA0 rdinit=/init panic=-1 quiet" < /dev/null 2>&1 | tr -d '\r' > "$log" || true
  took=$(( $(date +%s) - start ))
  sed -n '/^guest: /,/^guest: splice_guard exited/p' "$log"
  held=$(grep -o '[0-9]* of [0-9]* checks held.*' "$log" || echo "none run")
  # Debian's arm64 6.1 refuses to attach LSM programs (measured: ENOTSUPP,
  # exit 3 after the checks without the guard); later kernels take them.
  expected=0
  case "$version" in 6.1.0-*) expected=3 ;; esac
  if grep -q "^guest: splice_guard exited $expected\$" "$log"; then
    printf '| %s | %s | %s s |\n' "$version" "$held" "$took" >> "$TABLE"
  else
    printf '| %s | FAIL (%s) | %s s |\n' "$version" "$held" "$took" >> "$TABLE"
    FAILED=1
    echo "== $version: end of its console:"; tail -n 40 "$log"
  fi
done
cat "$TABLE"
if [ "$FAILED" != 0 ]; then
  echo "vmtest-arm64: FAILED (consoles in target/arm64/)" >&2
  exit 1
fi
echo "vmtest-arm64: all passed" >&2
