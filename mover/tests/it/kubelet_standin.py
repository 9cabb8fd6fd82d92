#!/usr/bin/python3
"""TEST STAND-IN for a node's kubelet and for the cluster's volume provisioning: no
kubelet, CSI driver or kube-controller-manager runs on the machines these tests run on.
It acts only through the Kubernetes API (kube_standin.py), polling it, and does what the
data mover relies on, as upstream does it:

Provisioning (with --provisioner; one per cluster), as the CSI external-provisioner and
the PV controller do (kubernetes-csi/external-provisioner pkg/controller/controller.go
Provision; kubernetes pkg/controller/volume/persistentvolume/pv_controller.go):
- a PVC with no spec.volumeName gets a PV named pvc-<PVC uid>: the claim's size, access
  modes, volumeMode (Filesystem when unset) and storage class, reclaim policy Delete,
  spec.csi {driver, volumeHandle}, and a claimRef with the claim's uid. The volume is a
  file in VOLUMES_DIR (the volumeHandle is its path): sparse of the requested size, or,
  with a VolumeSnapshot dataSource, a copy of the snapshot — the image file its
  VolumeSnapshotContent's status.snapshotHandle names (the stand-in CSI driver's handle).
  The claim's spec.volumeName is set and both are Bound.
- a PV whose claimRef names a claim (without uid: pre-bound, as Velero's restore does)
  and a claim whose spec.volumeName names the PV: both are Bound, the claimRef gets the uid.
- a claim that is deleted: its PV (claimRef uid no longer there) is deleted with its file
  when its reclaim policy is Delete (read again first), else Released.

The kubelet (one per node, NODE), for pods whose required node affinity names NODE
(kubernetes.io/hostname In [NODE]), as the kubelet does for a CSI block volume
(kubernetes pkg/volume/csi/csi_block.go): each claim's volume — which must be Bound and
Block — is attached (a loop device; read-only when the pod's volume says readOnly),
published as a device node at KUBELET_ROOT/plugins/kubernetes.io/csi/volumeDevices/
publish/<pv>/<pod uid>, and linked from KUBELET_ROOT/pods/<pod uid>/volumeDevices/
kubernetes.io~csi/<pv>; then the pod is Running. A pod that is gone is torn down: link
and device node removed, the loop device detached. On SIGTERM everything is torn down.

With --unreachable=CLASS it also plays the scheduler's verdict for its node: a pod
pinned here whose claim has storage class CLASS (a volume this node cannot reach, e.g.
in another zone) is not started; it gets the condition the scheduler writes
(kubernetes pkg/scheduler/schedule_one.go, volumebinding's ErrReasonNodeConflict):
PodScheduled False, reason Unschedulable, "0/2 nodes are available: 1 node(s) had volume
node affinity conflict, 1 node(s) didn't match Pod's node affinity/selector."

Usage: kubelet_standin.py API_URL NODE KUBELET_ROOT VOLUMES_DIR [--provisioner] [--unreachable=CLASS]
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

API, NODE, KUBELET, VOLUMES = sys.argv[1:5]
PROVISIONER = "--provisioner" in sys.argv[5:]
UNREACHABLE = [a.split("=", 1)[1] for a in sys.argv[5:] if a.startswith("--unreachable=")]
DRIVER = "standin.csi.mover.test"
attached = {}  # pod uid -> [(loop device, link, device node)]


def call(method, path, body=None, ctype="application/json"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(API + path, data=data, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def merge(path, body):
    return call("PATCH", path, body, "application/merge-patch+json")


def items(path):
    code, body = call("GET", path)
    return body.get("items", []) if code == 200 else []


def size_of(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1000, "M": 10**6, "G": 10**9}
    for u, m in units.items():
        if q.endswith(u):
            return int(q[: -len(u)]) * m
    return int(q)


def claim_path(ns, name=""):
    return f"/api/v1/namespaces/{ns}/persistentvolumeclaims" + (f"/{name}" if name else "")


def provision():
    pvcs = items("/api/v1/persistentvolumeclaims")
    pvs = {p["metadata"]["name"]: p for p in items("/api/v1/persistentvolumes")}
    claims = {(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in pvcs}
    for c in pvcs:
        meta, spec = c["metadata"], c["spec"]
        ns, name = meta["namespace"], meta["name"]
        if spec.get("volumeName") or meta.get("deletionTimestamp"):
            continue
        pv = "pvc-" + meta["uid"]
        if pv in pvs:
            continue
        path = os.path.join(VOLUMES, pv + ".img")
        size = size_of(spec["resources"]["requests"]["storage"])
        src = spec.get("dataSource") or {}
        if src.get("kind") == "VolumeSnapshot":
            code, vs = call("GET", f"/apis/snapshot.storage.k8s.io/v1/namespaces/{ns}/volumesnapshots/{src['name']}")
            content = (vs or {}).get("status", {}).get("boundVolumeSnapshotContentName") if code == 200 else None
            if not content:
                continue
            code, vsc = call("GET", f"/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/{content}")
            handle = (vsc or {}).get("status", {}).get("snapshotHandle") if code == 200 else None
            if not handle:
                continue
            subprocess.run(["cp", "--sparse=always", handle, path], check=True)
            if os.path.getsize(path) < size:
                os.truncate(path, size)
        else:
            with open(path, "wb") as f:
                f.truncate(size)
        body = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "storageClassName": spec.get("storageClassName", ""),
                "persistentVolumeReclaimPolicy": "Delete",
                "csi": {"driver": DRIVER, "volumeHandle": path},
                "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": ns, "name": name, "uid": meta["uid"]},
            },
        }
        call("POST", "/api/v1/persistentvolumes", body)
        merge(f"/api/v1/persistentvolumes/{pv}/status", {"status": {"phase": "Bound"}})
        merge(claim_path(ns, name), {"spec": {"volumeName": pv}})
        merge(claim_path(ns, name) + "/status", {"status": {"phase": "Bound"}})
    for name, pv in pvs.items():
        ref = pv["spec"].get("claimRef") or {}
        phase = pv.get("status", {}).get("phase")
        c = claims.get((ref.get("namespace"), ref.get("name")))
        if ref and not ref.get("uid") and c and c["spec"].get("volumeName") == name:
            # Pre-bound by name: the PV controller completes the binding.
            merge(f"/api/v1/persistentvolumes/{name}", {"spec": {"claimRef": {"uid": c["metadata"]["uid"]}}})
            merge(f"/api/v1/persistentvolumes/{name}/status", {"status": {"phase": "Bound"}})
            merge(claim_path(c["metadata"]["namespace"], c["metadata"]["name"]) + "/status", {"status": {"phase": "Bound"}})
        elif ref.get("uid") and phase == "Bound" and (c is None or c["metadata"]["uid"] != ref["uid"]):
            code, now = call("GET", f"/api/v1/persistentvolumes/{name}")
            if code != 200 or (now["spec"].get("claimRef") or {}).get("uid") != ref["uid"]:
                continue
            if now["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                call("DELETE", f"/api/v1/persistentvolumes/{name}")
                handle = now["spec"].get("csi", {}).get("volumeHandle", "")
                if handle.startswith(VOLUMES + "/") and os.path.exists(handle):
                    os.remove(handle)
            else:
                merge(f"/api/v1/persistentvolumes/{name}/status", {"status": {"phase": "Released"}})


def on_this_node(pod):
    try:
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    except (KeyError, TypeError):
        return pod["spec"].get("nodeName") == NODE
    return any(e.get("key") == "kubernetes.io/hostname" and e.get("operator") == "In" and NODE in e.get("values", [])
               for t in terms for e in t.get("matchExpressions", []))


def tear_down(uid):
    for loop, link, node in attached.pop(uid, []):
        for p in (link, node):
            if os.path.lexists(p):
                os.remove(p)
        subprocess.run(["losetup", "-d", loop], check=False)


def kubelet():
    pods = [p for p in items("/api/v1/pods") if on_this_node(p)]
    live = {p["metadata"]["uid"] for p in pods if not p["metadata"].get("deletionTimestamp")}
    for uid in list(attached):
        if uid not in live:
            tear_down(uid)
    for p in pods:
        meta = p["metadata"]
        uid, ns = meta["uid"], meta["namespace"]
        if uid in attached or p.get("status", {}).get("phase") not in (None, "Pending"):
            continue
        ready = []
        for v in p["spec"].get("volumes", []):
            claim = v.get("persistentVolumeClaim")
            if not claim:
                continue
            code, c = call("GET", claim_path(ns, claim["claimName"]))
            if code == 200 and c["spec"].get("storageClassName") in UNREACHABLE:
                cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/2 nodes are available: 1 node(s) had volume node affinity conflict, 1 node(s) didn't match Pod's node affinity/selector."}
                merge(f"/api/v1/namespaces/{ns}/pods/{meta['name']}/status", {"status": {"phase": "Pending", "conditions": [cond]}})
                break
            if code != 200 or c.get("status", {}).get("phase") != "Bound":
                break
            code, pv = call("GET", f"/api/v1/persistentvolumes/{c['spec']['volumeName']}")
            if code != 200 or pv["spec"].get("volumeMode") != "Block":
                break
            ready.append((pv, bool(claim.get("readOnly"))))
        else:
            done = []
            for pv, ro in ready:
                name = pv["metadata"]["name"]
                args = ["losetup", "-f", "--show"] + (["-r"] if ro else []) + [pv["spec"]["csi"]["volumeHandle"]]
                loop = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
                publish = os.path.join(KUBELET, "plugins/kubernetes.io/csi/volumeDevices/publish", name)
                os.makedirs(publish, exist_ok=True)
                node = os.path.join(publish, uid)
                os.mknod(node, stat.S_IFBLK | 0o600, os.stat(loop).st_rdev)
                entry = os.path.join(KUBELET, "pods", uid, "volumeDevices", "kubernetes.io~csi")
                os.makedirs(entry, exist_ok=True)
                link = os.path.join(entry, name)
                os.symlink(node, link)
                done.append((loop, link, node))
            attached[uid] = done
            merge(f"/api/v1/namespaces/{ns}/pods/{meta['name']}/status", {"status": {"phase": "Running"}})


def stop(*_):
    for uid in list(attached):
        tear_down(uid)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
os.makedirs(VOLUMES, exist_ok=True)
while True:
    try:
        if PROVISIONER:
            provision()
        kubelet()
    except (urllib.error.URLError, ConnectionError, OSError, subprocess.CalledProcessError) as e:
        print(f"kubelet stand-in {NODE}: {e}", file=sys.stderr)
    time.sleep(0.1)
