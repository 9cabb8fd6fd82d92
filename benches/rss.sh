#!/usr/bin/env bash
# Peak RSS of a full backup as the volume grows (1, 4, 16 GiB; half of each is random
# data, half a hole). Memory must stay flat: it is bounded by configuration.
#   benches/rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
M=$(mover_bin)
W=${MOVER_BENCH_DIR:-/var/tmp/mover-rss}
rm -rf "$W"; mkdir -p "$W"
export MOVER_PASSWORD=bench MOVER_CACHE_DIR="$W/cache" MOVER_REPOSITORY="$W/repo"
"$M" init >/dev/null
printf '%-8s %8s %10s %10s\n' volume seconds "MiB/s" "peak RSS"
for g in 1 4 16; do
  img="$W/v$g.img"; truncate -s "${g}G" "$img"
  head -c "$((g * 512))M" /dev/urandom | dd of="$img" bs=4M conv=notrunc status=none iflag=fullblock
  drop
  /usr/bin/time -f "%e %M" -o "$W/t" "$M" backup "$img" --name "v$g" --json > /dev/null
  read -r s rss < "$W/t"
  printf '%-8s %8.2f %10.0f %9dM\n' "${g} GiB" "$s" "$(echo "$g * 1024 / $s" | bc -l)" $((rss / 1024))
  rm -f "$img"
done
