#!/usr/bin/env bash
# Peak RSS of a full backup and of its restore as the volume grows (1, 4, 16 GiB; half of
# each is random data, half a hole). Memory must stay flat: it is bounded by configuration.
#   benches/rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
M=$(mover_bin)
W=${MOVER_BENCH_DIR:-/var/tmp/mover-rss}
rm -rf "$W"; mkdir -p "$W"
export MOVER_PASSWORD=bench MOVER_CACHE_DIR="$W/cache" MOVER_REPOSITORY="$W/repo"
"$M" init >/dev/null
printf '%-8s %-8s %8s %10s %10s\n' volume step seconds "MiB/s" "peak RSS"
for g in 1 4 16; do
  img="$W/v$g.img"; truncate -s "${g}G" "$img"
  head -c "$((g * 512))M" /dev/urandom | dd of="$img" bs=4M conv=notrunc status=none iflag=fullblock
  drop
  /usr/bin/time -f "%e %M" -o "$W/t" "$M" backup "$img" --name "v$g" --json > "$W/b.json"
  read -r s rss < "$W/t"
  printf '%-8s %-8s %8.2f %10.0f %9dM\n' "${g} GiB" backup "$s" "$(echo "$g * 1024 / $s" | bc -l)" $((rss / 1024))
  drop
  /usr/bin/time -f "%e %M" -o "$W/t" "$M" restore "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot_id"])' "$W/b.json")" "$W/out.img" --json > /dev/null
  read -r s rss < "$W/t"
  cmp -s "$img" "$W/out.img" || { echo "restore of ${g} GiB differs" >&2; exit 1; }
  printf '%-8s %-8s %8.2f %10.0f %9dM\n' "${g} GiB" restore "$s" "$(echo "$g * 1024 / $s" | bc -l)" $((rss / 1024))
  rm -f "$img" "$W/out.img"
done
