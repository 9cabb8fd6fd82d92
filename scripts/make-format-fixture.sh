#!/usr/bin/env bash
# Makes the frozen repository every later build must read (mover/tests/fixtures/format-v1):
# two volumes (one with a hole, one of odd size), a full snapshot, an incremental from
# changed extents (spliced segments), one from the parent's digests, two key files, the
# reports of a verify and a drill. Run once per repository format version, with that
# release's binary; the test `format::a_repository_of_format_v1_reads_checks_and_restores_byte_exact`
# then holds every later build to it. Do not regenerate an existing fixture: that would
# hide exactly the incompatibility it is there to catch.
#   scripts/make-format-fixture.sh BINARY OUT_DIR
set -euo pipefail
bin=$(realpath "${1:?usage: $0 BINARY OUT_DIR}")
out=${2:?usage: $0 BINARY OUT_DIR}
[ -e "$out" ] && { echo "$out exists: a fixture is never regenerated" >&2; exit 1; }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$out"
export MOVER_REPOSITORY="$out/repo" MOVER_PASSWORD=fixture-password MOVER_CACHE_DIR="$W/cache" MOVER_LOG=warn
python3 - "$W" <<'PY'
import sys, random
w = sys.argv[1]
r = random.Random(7)
words = [b"volume", b"segment", b"chunk", b"qemu", b"kubevirt", b"restore", b"backup", b"pack", b"index", b"lease"]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choice(words) for _ in range(12)) + b" %d\n" % r.randrange(1000)
    return bytes(out[:n])
with open(f"{w}/a.img", "wb") as f:            # 12 MiB: data, a 4 MiB hole, data
    f.write(text(4 << 20)); f.write(bytes(4 << 20)); f.write(text(4 << 20))
with open(f"{w}/b.img", "wb") as f:            # 4 MiB + 1000 bytes: an odd tail
    f.write(text((4 << 20) + 1000))
PY
echo "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: fixture}" > "$W/vm.yaml"
"$bin" init >/dev/null
vols=(--volume "a=$W/a.img" --volume "b=$W/b.img")
s1=$("$bin" backup "${vols[@]}" --group vms/fixture --tag k=v --metadata "vm=$W/vm.yaml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot_id"])')
h1a=$(b3sum --no-names "$W/a.img"); h1b=$(b3sum --no-names "$W/b.img")
# Three small changes in volume a, named as changed extents: their segments are spliced.
python3 - "$W" <<'PY'
import sys
w = sys.argv[1]
with open(f"{w}/a.img", "r+b") as f:
    for off in (8192, (9 << 20) + 4096, (12 << 20) - 4096):
        f.seek(off); f.write(b"\xa5" * 4096)
with open(f"{w}/a.ext", "w") as f:
    for off in (8192, (9 << 20) + 4096, (12 << 20) - 4096):
        f.write(f"{off} 4096\n")
PY
s2=$("$bin" backup "${vols[@]}" --group vms/fixture --parent latest --changed-extents "a=$W/a.ext" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot_id"])')
h2a=$(b3sum --no-names "$W/a.img")
# A whole segment rewritten, found by the parent's digests.
python3 - "$W" <<'PY'
import sys
with open(f"{sys.argv[1]}/b.img", "r+b") as f:
    f.seek(1 << 20); f.write(b"\x3c" * (2 << 20))
PY
s3=$("$bin" backup "${vols[@]}" --group vms/fixture --parent latest --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot_id"])')
h3b=$(b3sum --no-names "$W/b.img")
echo fixture-password-2 > "$W/pw2"
"$bin" key add --new-password-file "$W/pw2" >/dev/null
"$bin" check --read-data >/dev/null
"$bin" drill latest --group vms/fixture >/dev/null
cat > "$out/expected.json" <<JSON
{
  "made_by": "$("$bin" --version)",
  "passwords": ["fixture-password", "fixture-password-2"],
  "snapshots": [
    {"id": "$s1", "volumes": {"a": "$h1a", "b": "$h1b"}},
    {"id": "$s2", "volumes": {"a": "$h2a", "b": "$h1b"}},
    {"id": "$s3", "volumes": {"a": "$h2a", "b": "$h3b"}}
  ]
}
JSON
du -sh "$out"
