#!/usr/bin/env bash
# What `mover gc --recompress LEVEL` saves and costs: one full backup of IMAGE into a new
# local repository, then for each level a copy of it recompressed, timed (page cache dropped
# first), with its size and peak RSS.
#   benches/recompress.sh IMAGE [LEVEL...]      (default levels: 9 15 19)
# MOVER_BIN=path runs that binary instead of this tree's release build.
set -euo pipefail
cd "$(dirname "$0")/.."
img=${1:?usage: benches/recompress.sh IMAGE [LEVEL...]}; shift
levels=("$@"); [ ${#levels[@]} -gt 0 ] || levels=(9 15 19)
. benches/lib.sh
M=$(mover_bin)
W=$(mktemp -d /var/tmp/mover-recompress.XXXXXX); trap 'rm -rf "$W"' EXIT
export MOVER_PASSWORD=bench
MOVER_CACHE_DIR=$W/cache "$M" --repo "$W/full" init >/dev/null
MOVER_CACHE_DIR=$W/cache "$M" --repo "$W/full" backup "$img" --json >/dev/null
full=$(du -sb "$W/full" | cut -f1)
echo "after the full backup: $full bytes"
for l in "${levels[@]}"; do
  cp -r "$W/full" "$W/l$l"; cp -r "$W/cache" "$W/cache$l"
  drop
  /usr/bin/time -f "%e %M" -o "$W/t" env MOVER_CACHE_DIR="$W/cache$l" "$M" --repo "$W/l$l" gc --recompress "$l" --json >/dev/null
  read -r secs rss < "$W/t"
  size=$(du -sb "$W/l$l" | cut -f1)
  printf 'level %2d: %d bytes (%.3f of the full backup), %s s, peak RSS %d MiB\n' "$l" "$size" "$(python3 -c "print($size / $full)")" "$secs" $((rss / 1024))
  rm -rf "$W/l$l" "$W/cache$l"
done
