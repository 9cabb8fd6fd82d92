#!/usr/bin/env bash
# Installs what Mover's build, tests, demo and benchmark need and is missing, on Debian.
#   scripts/deps.sh build|test|bench
set -euo pipefail
what=${1:-build}
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
want() { for p in "$@"; do have_pkg "$p" || need+=("$p"); done; }

want libclang-dev clang pkg-config util-linux e2fsprogs curl b3sum protobuf-compiler
case "$what" in
  test) want qemu-utils libnbd-bin python3-libnbd nbdkit openssl fuse3 buildah podman runc binutils kubectl prometheus time ;;
  image) want buildah binutils ;;
  bench) want restic borgbackup hyperfine fio time ;;
esac
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq "${need[@]}" >&2
  # Only promtool is wanted from the prometheus package: never leave a server running.
  if printf '%s\n' "${need[@]}" | grep -qx prometheus && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
# The test command lints with clippy: rustup's default profile has it; add it where not.
if [ "$what" = test ] && ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null; then
    echo "installing: clippy (rustup component)" >&2
    rustup component add clippy >&2
  else
    echo "cargo clippy is missing and there is no rustup to add it: install clippy" >&2
    exit 1
  fi
fi
