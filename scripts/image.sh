#!/usr/bin/env bash
# Builds the OCI image localhost/mover:<version> from scratch with buildah: the mover
# binary (debug info split off into dist/mover.debug), exactly the shared libraries it
# links, CA certificates, and a passwd naming a non-root user (65532, the default user).
# Nothing is downloaded.
#
#   scripts/image.sh [BINARY]    BINARY defaults to a fresh release build
#
# Prints the image name on its last line. dist/ holds mover (stripped) and mover.debug.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mover-target}
  cargo build --release -p mover --bin mover >&2
  bin=$CARGO_TARGET_DIR/release/mover
fi
for t in buildah objcopy ldd; do command -v $t >/dev/null || { echo "$t is missing (scripts/deps.sh image)" >&2; exit 1; }; done

# The shipped binary: symbols kept (readable backtraces), debug info in mover.debug, found
# by debuggers through the debuglink.
mkdir -p dist
objcopy --only-keep-debug "$bin" dist/mover.debug
objcopy --strip-debug --add-gnu-debuglink=dist/mover.debug "$bin" dist/mover
chmod 0755 dist/mover
version=$(dist/mover --version | awk '{print $2}')
echo "binary: $(du -m dist/mover | cut -f1) MiB (debug info: $(du -m dist/mover.debug | cut -f1) MiB in dist/mover.debug)" >&2

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 dist/mover "$root/usr/bin/mover"
# Exactly the libraries the binary links, and the loader, at the paths it expects.
for lib in $(ldd dist/mover | awk '/=>/ {print $3} /ld-linux/ && !/=>/ {print $1}'); do
  real=$(readlink -f "$lib")
  install -D -m 0755 "$real" "$root$lib"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nmover:x:65532:65532:mover:/var/lib/mover:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nmover:x:65532:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
mkdir -p "$root/tmp" "$root/var/lib/mover" "$root/run/mover" "$root/etc/mover"
chmod 1777 "$root/tmp"

image=localhost/mover:$version
c=$(buildah from scratch)
trap 'buildah rm "$c" >/dev/null 2>&1 || true; rm -rf "$root"' EXIT
buildah copy -q "$c" "$root" / >/dev/null
# The default user's state and runtime directories.
m=$(buildah mount "$c")
chown 65532:65532 "$m/var/lib/mover" "$m/run/mover"
buildah umount "$c" >/dev/null
buildah config \
  --entrypoint '["/usr/bin/mover"]' --cmd serve \
  --user 65532:65532 \
  --env HOME=/var/lib/mover --env MOVER_CACHE_DIR=/var/lib/mover/cache \
  --workingdir /var/lib/mover \
  --label org.opencontainers.image.title=mover \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$(dist/mover --version | sed -n 's/.*commit \([^;]*\);.*/\1/p')" \
  --port 7601 \
  "$c"
buildah commit -q --rm "$c" "$image" >/dev/null
trap 'rm -rf "$root"' EXIT
echo "$image"
