#!/usr/bin/env bash
# The main job on the embedded default: a local-directory repository and a sample volume
# (an ext4 image with real files and free space). Installs what is missing, builds, then:
# init → full backup → change ~1 % like a running VM → incremental backup with changed
# extents → restore → compare hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh build
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mover-target}
cargo build --release -p mover
M="$CARGO_TARGET_DIR/release/mover"
W=${MOVER_DEMO_DIR:-$PWD/mover-demo}
mkdir -p "$W"
export MOVER_REPOSITORY=${MOVER_REPOSITORY:-$W/repo}
export MOVER_PASSWORD=${MOVER_PASSWORD:-demo-password}
export MOVER_CACHE_DIR=${MOVER_CACHE_DIR:-$W/cache}

img="$W/disk.img"
echo "== building a sample volume: $img (512 MiB ext4, ~200 MiB of files)"
rm -rf "$W/files" "$img" "$W/restored.img"
mkdir -p "$W/files/bin" "$W/files/log" "$W/files/db"
for i in $(seq 1 12); do head -c $((8 << 20)) /dev/urandom > "$W/files/bin/blob$i"; done
for i in $(seq 1 20); do (set +o pipefail; yes "log line $i: request served in 12ms status=200" | head -c $((4 << 20)) > "$W/files/log/app$i.log"); done
head -c $((16 << 20)) /dev/urandom > "$W/files/db/data"
cp "$W/files/db/data" "$W/files/db/data.bak"
truncate -s 512M "$img"
mkfs.ext4 -q -F -d "$W/files" "$img"

[ -f "$MOVER_REPOSITORY/config" ] || "$M" init
echo "== full backup"
"$M" backup "$img" --tag demo=yes

echo "== a running VM changes ~1 %: rewrite 5 MiB in place at a few spots"
: > "$W/changed.txt"
for off_mib in 40 130 260 333 470; do
  dd if=/dev/urandom of="$img" bs=1M count=1 seek=$off_mib conv=notrunc status=none
  echo "$((off_mib << 20)) $((1 << 20))" >> "$W/changed.txt"
done

echo "== incremental backup with changed extents"
"$M" backup "$img" --parent latest --changed-extents "$W/changed.txt"
echo "== incremental backup without extents (parent digests)"
"$M" backup "$img" --parent latest

echo "== restore the latest snapshot and compare"
"$M" restore latest "$W/restored.img"
"$M" snapshots
a=$(b3sum --no-names "$img"); b=$(b3sum --no-names "$W/restored.img")
echo "source   $a"
echo "restored $b"
if [ "$a" = "$b" ]; then echo "OK: restore is byte-exact"; else echo "MISMATCH" >&2; exit 1; fi
