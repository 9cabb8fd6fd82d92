#!/usr/bin/env bash
# Issue 19's incremental goal on a large volume: 0.5 % of the volume changed in scattered
# writes (64 KiB blocks, KubeVirt's dirty-bitmap granularity, and 4 KiB database pages),
# the exact extents given to Mover. RUNS full backups (each into a fresh repository; the
# last one is kept), then RUNS scattered incrementals per grain, each on a new random
# change; page cache dropped before every step. Prints medians: seconds, bytes read and
# stored per changed byte, and time as a fraction of the full backup.
#   benches/scatter.sh [--size-gib N] [--runs N] [--image IMG]
# --image reuses an existing benches/make-volume.sh image (it is changed in place).
# MOVER_BIN=path runs that binary instead of building this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=16; RUNS=3; IMG=
while [ $# -gt 0 ]; do
  case "$1" in
    --size-gib) SIZE_GIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --image) IMG=$2; shift 2 ;;
    *) echo "usage: $0 [--size-gib N] [--runs N] [--image IMG]" >&2; exit 2 ;;
  esac
done
. benches/lib.sh
M=$(mover_bin)
W=${MOVER_BENCH_DIR:-/var/tmp/mover-scatter}
rm -rf "$W/repo" "$W/cache" "$W/results.tsv"; mkdir -p "$W"
if [ -z "$IMG" ]; then
  IMG="$W/vm.img"
  echo "== building the volume: ext4, ${SIZE_GIB} GiB (benches/make-volume.sh --os)" >&2
  benches/make-volume.sh "$IMG" "$SIZE_GIB" --os
fi
IMG=$(realpath "$IMG")
export MOVER_PASSWORD=bench MOVER_CACHE_DIR="$W/cache"
# timed OP CMD...: seconds → results.tsv (op, seconds, then whatever the caller appends).
timed() {
  local op=$1; shift
  drop
  /usr/bin/time -f "%e" -o "$W/time.out" "$@" > "$W/last.out" 2> "$W/last.err" || { echo "$op failed:" >&2; tail -5 "$W/last.err" >&2; exit 1; }
  tail -n 1 "$W/time.out"
}
for i in $(seq "$RUNS"); do
  rm -rf "$W/repo" "$W/cache"
  "$M" --repo "$W/repo" init > /dev/null
  s=$(timed full "$M" --repo "$W/repo" backup "$IMG" --json)
  printf 'full\t%s\t0\t0\t0\n' "$s" >> "$W/results.tsv"
  echo "  full $i: $s s" >&2
done
for grain in 65536 4096; do
  for i in $(seq "$RUNS"); do
    python3 benches/scatter-write.py "$IMG" "$grain" "$W/scatter.txt" $((grain * 1000 + i))
    ch=$(awk '{s+=$2} END {print s+0}' "$W/scatter.txt")
    before=$(du -sb "$W/repo" | cut -f1)
    s=$(timed "scatter_$((grain >> 10))k" "$M" --repo "$W/repo" backup "$IMG" --parent latest --changed-extents "$W/scatter.txt" --json)
    rd=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["volumes"][0]["change_source"] == "extents", d["volumes"][0]; print(d["bytes_read"])' "$W/last.out")
    printf 'scatter_%sk\t%s\t%s\t%s\t%s\n' $((grain >> 10)) "$s" "$ch" "$rd" $(( $(du -sb "$W/repo" | cut -f1) - before )) >> "$W/results.tsv"
    echo "  scatter $((grain >> 10)) KiB $i: $s s" >&2
  done
done
rm -f "$W/out.img"
"$M" --repo "$W/repo" restore latest "$W/out.img" > /dev/null
[ "$(b3sum --no-names "$IMG")" = "$(b3sum --no-names "$W/out.img")" ] || { echo "restore after the scattered incrementals MISMATCH" >&2; exit 1; }
rm -f "$W/out.img"
python3 - "$W/results.tsv" "$(stat -c %s "$IMG")" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for l in open(sys.argv[1]):
    op, s, ch, rd, st = l.split("\t"); rows[op].append((float(s), int(ch), int(rd), int(st)))
med = lambda xs: statistics.median(xs)
full = med([r[0] for r in rows["full"]])
print(f"volume {int(sys.argv[2]) / (1 << 30):.0f} GiB; full backup {full:.2f} s (median of {len(rows['full'])}: {', '.join(f'{r[0]:.2f}' for r in rows['full'])})")
print(f"{'incremental':12} {'changed':>9} {'seconds':>8} {'read/chg':>9} {'stored/chg':>10} {'time/full':>9}   runs")
for op in [o for o in rows if o != "full"]:
    r = rows[op]
    print(f"{op:12} {med([x[1] for x in r]) / (1 << 20):8.1f}M {med([x[0] for x in r]):8.2f} {med([x[2] / x[1] for x in r]):9.2f} "
          f"{med([x[3] / x[1] for x in r]):10.2f} {med([x[0] for x in r]) / full:9.3f}   {', '.join(f'{x[0]:.2f}' for x in r)}")
print("restore after the incrementals: byte-exact")
PY
