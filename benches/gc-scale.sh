#!/usr/bin/env bash
# gc at scale: a repository of about a million chunks (4 KiB average chunks over 4.5 GiB
# of random data in four groups), then `forget` of one group and `gc`. Prints gc's time
# and peak RSS, and how much of the index a node that had synced before the gc re-reads
# after it, next to a node syncing from scratch.
#   benches/gc-scale.sh [MOVER_BINARY...]   (default: this tree's; several: compared on
#                                            copies of the same repository)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mover-target}
if [ $# -eq 0 ]; then
  cargo build --release -p mover >&2
  set -- "$CARGO_TARGET_DIR/release/mover"
fi
W=${MOVER_BENCH_DIR:-/var/tmp/mover-gc-scale}
rm -rf "$W"; mkdir -p "$W"
export MOVER_PASSWORD=bench
M=$1
echo "== building the repository with $M" >&2
MOVER_REPOSITORY="$W/repo" "$M" init --chunk-avg-kib 4 >/dev/null
chunks=0
for g in 0 1 2 3; do
  head -c 1152M /dev/urandom > "$W/v.img"
  n=$(MOVER_REPOSITORY="$W/repo" MOVER_CACHE_DIR="$W/cache" "$M" backup --volume "disk=$W/v.img" --group "vm$g" --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["chunks_new"])')
  chunks=$((chunks + n))
done
rm -f "$W/v.img"
# One VM's disk goes: its group is forgotten (gc frees its packs).
MOVER_REPOSITORY="$W/repo" MOVER_CACHE_DIR="$W/cache" "$M" forget --group vm0 --keep-tag none=none >/dev/null
segs=$(ls "$W/repo/index" | wc -l)
echo "repository: $chunks chunks, $segs index segments, $(du -sh "$W/repo" | cut -f1); group vm0 (a quarter) forgotten"
printf '%-32s %9s %8s %8s %9s %8s %8s %10s %9s\n' binary "fresh s" "gc s" "gc RSS" "seg kept" written deleted "node s" "node segs"
for bin in "$@"; do
  R="$W/run"; rm -rf "$R"-*; cp -a "$W/repo" "$R-repo"
  export MOVER_REPOSITORY="$R-repo" MOVER_CACHE_DIR="$R-cache"
  # A node's cache, synced from scratch before the gc.
  /usr/bin/time -f "%e" -o "$W/t" "$bin" index sync --json > /dev/null
  fs=$(cat "$W/t")
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "%e %M" -o "$W/t" env MOVER_CACHE_DIR="$R-gccache" "$bin" gc --json > "$W/gc.json"
  read -r gs grss < "$W/t"
  read -r kept written deleted < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("index_segments_kept","-"), d["index_segments_written"], d["index_segments_deleted"])' "$W/gc.json")
  # The same node after the gc.
  /usr/bin/time -f "%e" -o "$W/t" "$bin" index sync --json > "$W/sync.json"
  ns=$(cat "$W/t")
  nsegs=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["segments_ingested"], "read,", d.get("segments_removed", "all"), "removed")' "$W/sync.json")
  printf '%-32s %9.2f %8.2f %7dM %9s %8s %8s %10.2f  %s\n' "$bin" "$fs" "$gs" $((grss / 1024)) "$kept" "$written" "$deleted" "$ns" "$nsegs"
  rm -rf "$R"-*
done
