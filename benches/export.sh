#!/usr/bin/env bash
# Reading a snapshot in place: `mover export` (NBD) against `mover restore` on the same
# snapshot. Prints sequential throughput (nbdcopy to null), time to first byte, and random
# 4 KiB read latency (p50/p99), cold (page cache dropped, fresh export) and warm.
#   benches/export.sh [--size-gib N]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=4
[ "${1:-}" = "--size-gib" ] && SIZE_GIB=$2
scripts/deps.sh test >&2
. benches/lib.sh
M=$(mover_bin)
W=${MOVER_BENCH_DIR:-/var/tmp/mover-export-bench}
rm -rf "$W"; mkdir -p "$W"
export MOVER_PASSWORD=bench MOVER_REPOSITORY="$W/repo" MOVER_CACHE_DIR="$W/cache"
"$M" init >/dev/null
head -c "${SIZE_GIB}G" /dev/urandom > "$W/vol.img"
"$M" backup "$W/vol.img" >/dev/null
rm -f "$W/vol.img"
drop
t=$( { /usr/bin/time -f "%e" "$M" restore latest "$W/restored.img" >/dev/null; } 2>&1 | tail -1)
rm -f "$W/restored.img"
echo "restore:                 $t s  ($(echo "$SIZE_GIB * 1024 / $t" | bc) MiB/s)"

start_export() {
  rm -f "$W/s.sock" "$W/export.out"
  "$M" export latest --socket "$W/s.sock" --json > "$W/export.out" 2>"$W/export.err" &
  EXPORT=$!
  while [ ! -s "$W/export.out" ]; do sleep 0.02; done
}
stop_export() { kill "$EXPORT"; wait "$EXPORT" || true; }
URI="nbd+unix:///?socket=$W/s.sock"

drop; start_export
t=$( { /usr/bin/time -f "%e" nbdcopy "$URI" null: ; } 2>&1 | tail -1)
rss=$(grep VmHWM "/proc/$EXPORT/status" | awk '{print $2}')
echo "export, nbdcopy to null: $t s  ($(echo "$SIZE_GIB * 1024 / $t" | bc) MiB/s), export peak RSS $((rss / 1024)) MiB"
stop_export

# Random 4 KiB reads: first byte, then 2,000 reads at random offsets, cold then warm.
drop; start_export
/usr/bin/python3 - "$URI" <<'PY'
import nbd, random, sys, time
h = nbd.NBD(); t0 = time.perf_counter(); h.connect_uri(sys.argv[1]); h.pread(4096, 0)
print(f"time to first byte:      {(time.perf_counter() - t0) * 1000:.1f} ms (connect + first 4 KiB read)")
size = h.get_size(); rnd = random.Random(1)
offs = [rnd.randrange(0, size // 4096) * 4096 for _ in range(2000)]
for label in ("cold", "warm"):
    lat = []
    for o in offs:
        t = time.perf_counter(); h.pread(4096, o); lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    print(f"random 4 KiB reads, {label}: p50 {lat[len(lat) // 2]:.2f} ms, p99 {lat[len(lat) * 99 // 100]:.2f} ms")
PY
stop_export
