#!/usr/bin/env bash
# What ships, tested: the image (built from scratch by scripts/image.sh, run by podman), the
# seccomp profile, the Kubernetes manifests, the alert rules and the dashboard.
#
#   scripts/deploy-test.sh BINARY      (called by scripts/test.sh with the release build)
#
# Podman runs on the host network, so the container's listeners are the host's loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: scripts/deploy-test.sh BINARY}
VENV=${MOVER_VENV:-/var/tmp/mover-venv}
W=$(mktemp -d /var/tmp/mover-deploy-test.XXXXXX)
loops=()
name=mover-deploy-test-$$
cleanup() {
  podman rm -f "$name" >/dev/null 2>&1 || true
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
fail() { echo "deploy test: $*" >&2; exit 1; }
ok() { echo "deploy test: ok: $*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run=(podman --runtime runc run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

# --- The image -------------------------------------------------------------------------
image=$(scripts/image.sh "$bin" | tail -n 1)
size=$(podman image inspect "$image" --format '{{.Size}}')
ok "built $image ($((size >> 20)) MiB)"
v=$("${run[@]}" "$image" --version)
echo "$v" | grep -qE '^mover [0-9]+\.[0-9]+\.[0-9]+ \(commit [0-9a-f]{7,}; features: .*io_uring.*\)$' || fail "--version printed: $v"
[ "$(podman image inspect "$image" --format '{{.Config.User}}')" = "65532:65532" ] || fail "the image does not default to a non-root user"
ok "$v; default user 65532"

# --- mover serve inside the container, as its default non-root user -----------------------
g=$(free_port); h=$(free_port)
podman --runtime runc run -d --name "$name" --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --security-opt seccomp="$PWD/deploy/seccomp/mover.json" \
  "$image" serve --listen "127.0.0.1:$g" --http-listen "127.0.0.1:$h" --state-dir /var/lib/mover/state >/dev/null
for i in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$h/readyz" >/dev/null 2>&1 && break
  [ "$i" = 100 ] && { podman logs "$name" >&2; fail "the daemon in the container never became ready"; }
  sleep 0.2
done
[ "$(dist/mover client --server "http://127.0.0.1:$g" health)" = SERVING ] || fail "grpc.health.v1 does not answer SERVING"
curl -fs "http://127.0.0.1:$h/metrics" > "$W/metrics"
promtool check metrics < "$W/metrics" || fail "promtool check metrics"
# The startup line at the default log level: version, listeners, repositories, I/O backend.
podman logs "$name" 2>&1 | grep -E "mover [0-9.]+ serving gRPC on 127.0.0.1:$g, HTTP on 127.0.0.1:$h; repositories: default=.*; I/O: io_uring" >/dev/null ||
  { podman logs "$name" >&2; fail "no startup line naming version, listeners, repositories and I/O backend"; }
t0=$(date +%s)
podman stop -t 20 "$name" >/dev/null
[ $(( $(date +%s) - t0 )) -lt 15 ] || fail "the daemon took more than 15 s to stop on SIGTERM"
[ "$(podman inspect "$name" --format '{{.State.ExitCode}}')" = 0 ] || fail "the daemon exited with $(podman inspect "$name" --format '{{.State.ExitCode}}')"
podman rm "$name" >/dev/null
ok "serve in the container: grpc.health.v1 SERVING, /metrics valid, startup line, clean SIGTERM"

# --- A loop device passed with --device: byte-exact, io_uring under the shipped profile,
# --- the pread fallback under a profile that denies io_uring (as containerd's default) -----
python3 - "$W/vol.img" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(96 << 20)
    for i in range(0, 96, 3):          # 1 MiB of data every 3 MiB, holes between
        f.seek(i << 20); f.write(os.urandom(1 << 20))
EOF
python3 - deploy/seccomp/mover.json "$W/no-io-uring.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
for s in p["syscalls"]:
    s["names"] = [n for n in s["names"] if not n.startswith("io_uring")]
p["syscalls"].append({"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1})
json.dump(p, open(sys.argv[2], "w"))
EOF
src=$(losetup --direct-io=on -f --show "$W/vol.img"); loops+=("$src")
want=$(b3sum --no-names "$W/vol.img")
for profile in shipped no-io-uring; do
  case $profile in
    shipped) prof=$PWD/deploy/seccomp/mover.json; backend=io_uring ;;
    no-io-uring) prof=$W/no-io-uring.json; backend=pread ;;
  esac
  mkdir -p "$W/$profile"
  truncate -s 96M "$W/$profile/target.img"
  dst=$(losetup -f --show "$W/$profile/target.img"); loops+=("$dst")
  # --pid=host: as the DaemonSet's block-volumes component (the in-use look at every
  # process's open files before a restore writes onto a device).
  c=("${run[@]}" --pid=host --user 0 --security-opt seccomp="$prof" --device "$src" --device "$dst" -v "$W/$profile:/data" -e MOVER_PASSWORD=deploy-test "$image" --repo /data/repo --cache-dir /data/cache)
  "${c[@]}" init >/dev/null
  "${c[@]}" backup --volume "disk=$src" --json > "$W/$profile/backup.json"
  got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["io_backend"])' "$W/$profile/backup.json")
  [ "$got" = "$backend" ] || fail "under the $profile profile the backup read with '$got', expected '$backend'"
  "${c[@]}" restore latest "$dst" --json > "$W/$profile/restore.json"
  losetup -d "$dst"
  [ "$(b3sum --no-names "$W/$profile/target.img")" = "$want" ] || fail "restore under the $profile profile differs from the source"
  ok "seccomp $profile: backup read with $got, restore byte-exact"
done

# --- Manifests, rules, dashboard -----------------------------------------------------------
"$VENV/bin/pip" install -q kubernetes-validate
kubectl kustomize deploy/kubernetes > "$W/base.yaml"
grep -q 'image: localhost/mover:' "$W/base.yaml" || fail "kustomize did not set the image"
"$VENV/bin/kubernetes-validate" --strict "$W/base.yaml"
# Every optional component applies and validates too.
cp -r deploy/kubernetes "$W/all"
sed -i 's|^# components:|components:|; s|^#   - components/|  - components/|' "$W/all/kustomization.yaml"
# OpenShift's SecurityContextConstraints have no schema here: checked below, not validated.
sed -i '/components\/openshift/d' "$W/all/kustomization.yaml"
kubectl kustomize "$W/all" > "$W/all.yaml"
grep -q 'privileged: true' "$W/all.yaml" && grep -q 'audience: snapshot-metadata' "$W/all.yaml" &&
  grep -q 'name: mover-velero' "$W/all.yaml" && grep -q 'fieldPath: spec.nodeName' "$W/all.yaml" || fail "components did not apply"
"$VENV/bin/kubernetes-validate" --strict "$W/all.yaml"
# The base: the seccomp profile installs itself (an init container writes the one built
# into the binary, identical to deploy/seccomp/mover.json); secrets are optional (a pod
# without them runs unready, saying why); every node, tainted or not; a priority class.
grep -q 'install-seccomp-profile' "$W/base.yaml" && grep -q 'optional: true' "$W/base.yaml" && grep -q 'operator: Exists' "$W/base.yaml" &&
  grep -q 'priorityClassName: mover-node' "$W/base.yaml" && grep -q 'kind: PriorityClass' "$W/base.yaml" || fail "base DaemonSet: seccomp install, optional secrets, tolerations or priority class missing"
"$bin" install-seccomp-profile --dir "$W/seccomp-host" >/dev/null
cmp "$W/seccomp-host/mover.json" deploy/seccomp/mover.json || fail "install-seccomp-profile wrote another profile than deploy/seccomp/mover.json"
[ "$(stat -c %a "$W/seccomp-host/mover.json")" = 644 ] || fail "the installed profile is not mode 0644"
# OpenShift: the SCC allows exactly what the DaemonSet's pod asks for.
cp -r deploy/kubernetes "$W/os"
sed -i 's|^# components:|components:|; s|^#   - components/openshift|  - components/openshift|' "$W/os/kustomization.yaml"
kubectl kustomize "$W/os" > "$W/os.yaml"
"$VENV/bin/python" - "$W/os.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
scc = next(d for d in docs if d["kind"] == "SecurityContextConstraints")
ds = next(d for d in docs if d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
sa = f"system:serviceaccount:{ds['metadata']['namespace']}:{pod['serviceAccountName']}"
bad = []
if sa not in scc["users"]:
    bad.append(f"SCC does not name {sa}")
for c in pod.get("initContainers", []) + pod["containers"]:
    sc = c.get("securityContext", {})
    for cap in sc.get("capabilities", {}).get("add", []):
        if cap not in scc["allowedCapabilities"]:
            bad.append(f"{c['name']}: capability {cap} not allowed")
    if sc.get("privileged") and not scc["allowPrivilegedContainer"]:
        bad.append(f"{c['name']}: privileged")
    prof = sc.get("seccompProfile", {})
    want = {"Localhost": f"localhost/{prof.get('localhostProfile')}", "RuntimeDefault": "runtime/default"}.get(prof.get("type"))
    if want and want not in scc["seccompProfiles"]:
        bad.append(f"{c['name']}: seccomp {want} not allowed")
kinds = {"configMap", "secret", "hostPath", "emptyDir", "projected", "downwardAPI"}
for v in pod["volumes"]:
    k = next(k for k in v if k != "name")
    if k not in scc["volumes"]:
        bad.append(f"volume {v['name']}: {k} not allowed")
if pod.get("hostPID") and not scc["allowHostPID"]:
    bad.append("hostPID")
if not any(c.get("securityContext", {}).get("seLinuxOptions", {}).get("type") == "spc_t" for c in pod["containers"]):
    bad.append("the container does not run as spc_t")
if bad:
    sys.exit("deploy test: OpenShift SCC: " + "; ".join(bad))
EOF
kubectl kustomize deploy/kubernetes/monitoring > "$W/monitoring.yaml"
"$VENV/bin/kubernetes-validate" --strict "$W/monitoring.yaml"
# The PrometheusRule's spec is a plain rule file.
python3 - deploy/kubernetes/monitoring/prometheusrule.yaml "$W/rules.yaml" <<'EOF'
import sys
lines = open(sys.argv[1]).read().splitlines()
start = lines.index("spec:")
open(sys.argv[2], "w").write("\n".join(l[2:] for l in lines[start + 1:]) + "\n")
EOF
promtool check rules "$W/rules.yaml"
# Unit tests for every alert: it fires when it should, and stays silent after a restart,
# on a node with no VMs and on an idle cluster.
cp deploy/kubernetes/monitoring/rules-test.yaml "$W/"
promtool test rules "$W/rules-test.yaml" || fail "promtool test rules"
python3 - "$W/rules.yaml" "$W/rules-test.yaml" <<'EOF'
import re, sys
alerts = set(re.findall(r"- alert: (\w+)", open(sys.argv[1]).read()))
tested = set(re.findall(r"alertname: (\w+)", open(sys.argv[2]).read()))
untested = sorted(alerts - tested)
if untested:
    sys.exit(f"deploy test: alerts without a promtool test: {', '.join(untested)}")
EOF
scripts/check-dashboard.py "$W/metrics" deploy/grafana/mover-dashboard.json deploy/kubernetes/monitoring/prometheusrule.yaml
ok "manifests (kubernetes-validate --strict), rules (promtool check and unit tests for every alert), dashboard and alerts query only exported metrics"
