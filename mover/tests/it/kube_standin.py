#!/usr/bin/python3
"""TEST STAND-IN for the Kubernetes API server: no API server runs on the machines these
tests run on. It serves, on 127.0.0.1 over plain HTTP, the resources Mover's Velero data
mover touches, with the REST semantics it relies on, as upstream defines them:

- paths: /api/v1/[namespaces/NS/]PLURAL[/NAME[/status]] and
  /apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME[/status]]; a namespaced PLURAL without
  a namespace lists across all namespaces.
- get, list (kind <Kind>List, metadata.resourceVersion), labelSelector (k=v, k!=v, k).
- watch (?watch=true): a chunked stream of {"type": ADDED|MODIFIED|DELETED|ERROR,
  "object": ...} lines (kubernetes/apimachinery pkg/apis/meta/v1/watch.go WatchEvent,
  pkg/watch/watch.go event types). resourceVersion unset or "0": the current objects as
  ADDED first; resourceVersion N: every change after N; N older than the kept history:
  one ERROR event with a 410 Status, reason Expired, "too old resource version: N (M)"
  (kubernetes/apiserver pkg/storage/cacher/watch_cache_history.go). timeoutSeconds ends
  the stream.
- create (POST): 409 AlreadyExists for a taken name; generateName; uid, resourceVersion,
  creationTimestamp set; status dropped for resources with a status subresource.
- update (PUT) and merge patch (PATCH, application/merge-patch+json, RFC 7386): the
  object's metadata.resourceVersion, when it differs from the stored one, is a 409
  Conflict "Operation cannot be fulfilled on PLURAL.GROUP "NAME": the object has been
  modified; please apply your changes to the latest version and try again"
  (kubernetes/apiserver pkg/registry/generic/registry/store.go OptimisticLockErrorMsg;
  kubernetes/apimachinery pkg/api/errors/errors.go NewConflict). A PUT without
  resourceVersion is 422 Invalid ("must be specified for an update"). A patch without
  it applies unconditionally. Other patch types: 415.
- the /status subresource: writes to it change only status; writes to the main resource
  leave status as it was.
- delete: an object with finalizers gets deletionTimestamp and stays until an update
  empties its finalizers; otherwise it is removed (DELETED event).
- errors are metav1.Status objects with code, reason, message and details (NotFound:
  `PLURAL.GROUP "NAME" not found`).
- discovery (/api, /apis, /api/v1, /apis/GROUP/VERSION) for the resources it serves, so
  kubectl can be pointed at it.

Not upstream, for tests: GET /standin/requests returns the count of requests by method
and resource path, and POST /standin/fail-next {"method":..., "path_contains":...,
"code":...} makes the next matching request fail with that status code.

Usage: kube_standin.py PORT_FILE [HISTORY]   (binds 127.0.0.1:0, writes the port to
PORT_FILE; HISTORY: watch events kept, 1000 by default, fewer to test expiry)
"""
import json
import random
import string
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# (group/version path, plural) -> (kind, namespaced, has status subresource)
RESOURCES = {
    ("api/v1", "pods"): ("Pod", True, True),
    ("api/v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True, True),
    ("api/v1", "persistentvolumes"): ("PersistentVolume", False, True),
    ("api/v1", "configmaps"): ("ConfigMap", True, False),
    ("apis/velero.io/v2alpha1", "datauploads"): ("DataUpload", True, True),
    ("apis/velero.io/v2alpha1", "datadownloads"): ("DataDownload", True, True),
    ("apis/snapshot.storage.k8s.io/v1", "volumesnapshots"): ("VolumeSnapshot", True, True),
    ("apis/snapshot.storage.k8s.io/v1", "volumesnapshotcontents"): ("VolumeSnapshotContent", False, True),
}
HISTORY = [1000]  # watch events kept; an older resourceVersion is 410 Expired

lock = threading.Condition()
objects = {}  # (gv, plural, ns, name) -> object
events = []  # (rv, gv, plural, ns, type, object)
rv = [100]
requests = {}
fail_next = []


def group_resource(gv, plural):
    group = gv.split("/")[1] if gv.startswith("apis/") else ""
    return f"{plural}.{group}" if group else plural


def api_version(gv):
    return gv[len("apis/"):] if gv.startswith("apis/") else "v1"


def status(code, reason, message, gv=None, plural=None, name=None):
    s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}
    if plural is not None:
        group = gv.split("/")[1] if gv.startswith("apis/") else ""
        s["details"] = {"name": name, "group": group, "kind": plural}
    return s


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def merge(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def matches(obj, selector):
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v:
                return False
        elif term not in labels:
            return False
    return True


def record(kind, gv, plural, ns, obj):
    """Bumps the resource version, stamps it on obj, records the event (lock held)."""
    rv[0] += 1
    obj.setdefault("metadata", {})["resourceVersion"] = str(rv[0])
    events.append((rv[0], gv, plural, ns, kind, json.loads(json.dumps(obj))))
    del events[:-HISTORY[0]]
    lock.notify_all()


def parse_path(path):
    """-> (gv, plural, ns, name, sub) or None."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        gv, rest = "api/v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        gv, rest = "/".join(parts[:3]), parts[3:]
    else:
        return None
    ns = None
    if len(rest) >= 2 and rest[0] == "namespaces" and (len(rest) > 2):
        ns, rest = rest[1], rest[2:]
    if not rest or (gv, rest[0]) not in RESOURCES:
        return None
    plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    if len(rest) > 3 or (sub is not None and sub != "status"):
        return None
    return gv, plural, ns, name, sub


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        return json.loads(self.raw) if self.raw else {}

    def route(self, method):
        # Every request's body is read, used or not (a DELETE carries DeleteOptions): what
        # is left unread would be taken for the next request on the connection.
        n = int(self.headers.get("Content-Length") or 0)
        self.raw = self.rfile.read(n) if n else b""
        u = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        with lock:
            requests[f"{method} {u.path}"] = requests.get(f"{method} {u.path}", 0) + 1
            for f in list(fail_next):
                if f["method"] == method and f["path_contains"] in u.path:
                    fail_next.remove(f)
                    return self.send_json(f["code"], status(f["code"], "InternalError", "injected failure (test stand-in)"))
        if u.path.startswith("/standin/"):
            return self.standin(method, u.path)
        if method == "GET" and self.discovery(u.path):
            return
        p = parse_path(u.path)
        if p is None:
            return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
        gv, plural, ns, name, sub = p
        kind, namespaced, has_status = RESOURCES[(gv, plural)]
        if not namespaced and ns is not None:
            return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
        if namespaced and name is not None and ns is None:
            return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
        if sub == "status" and not has_status:
            return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
        key = (gv, plural, ns or "", name)
        if method == "GET" and name is None and q.get("watch") in ("true", "1"):
            return self.watch(gv, plural, ns, kind, q)
        if method == "GET" and name is None:
            with lock:
                items = [o for (g, pl, n, _), o in sorted(objects.items()) if g == gv and pl == plural and (ns is None or n == ns) and matches(o, q.get("labelSelector"))]
                body = {"apiVersion": api_version(gv), "kind": kind + "List", "metadata": {"resourceVersion": str(rv[0])}, "items": items}
            return self.send_json(200, body)
        if method == "GET":
            with lock:
                o = objects.get(key)
            if o is None:
                return self.not_found(gv, plural, name)
            return self.send_json(200, o)
        if method == "POST" and name is None:
            return self.create(gv, plural, ns, kind, has_status)
        if method in ("PUT", "PATCH") and name is not None:
            return self.write(method, gv, plural, ns, name, sub, has_status)
        if method == "DELETE" and name is not None:
            with lock:
                o = objects.get(key)
                if o is None:
                    return self.not_found(gv, plural, name)
                if o["metadata"].get("finalizers"):
                    if not o["metadata"].get("deletionTimestamp"):
                        o["metadata"]["deletionTimestamp"] = now()
                        record("MODIFIED", gv, plural, ns or "", o)
                else:
                    del objects[key]
                    record("DELETED", gv, plural, ns or "", o)
            return self.send_json(200, o)
        return self.send_json(405, status(405, "MethodNotAllowed", f"{method} is not supported on {u.path}"))

    def not_found(self, gv, plural, name):
        return self.send_json(404, status(404, "NotFound", f'{group_resource(gv, plural)} "{name}" not found', gv, plural, name))

    def create(self, gv, plural, ns, kind, has_status):
        o = self.body()
        md = o.setdefault("metadata", {})
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        name = md.get("name")
        if not name:
            return self.send_json(422, status(422, "Invalid", f"{kind}.{group_resource(gv, plural)} is invalid: metadata.name: Required value: name or generateName is required"))
        if ns is not None:
            md["namespace"] = ns
        key = (gv, plural, ns or "", name)
        with lock:
            if key in objects:
                return self.send_json(409, status(409, "AlreadyExists", f'{group_resource(gv, plural)} "{name}" already exists', gv, plural, name))
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now()
            md.pop("resourceVersion", None)
            o["apiVersion"], o["kind"] = api_version(gv), kind
            if has_status:
                o.pop("status", None)
            objects[key] = o
            record("ADDED", gv, plural, ns or "", o)
            out = json.loads(json.dumps(o))
        return self.send_json(201, out)

    def write(self, method, gv, plural, ns, name, sub, has_status):
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if method == "PATCH" and ctype != "application/merge-patch+json":
            return self.send_json(415, status(415, "UnsupportedMediaType", f"the stand-in serves only application/merge-patch+json patches, not '{ctype}'"))
        patch = self.body()
        key = (gv, plural, ns or "", name)
        with lock:
            cur = objects.get(key)
            if cur is None:
                return self.not_found(gv, plural, name)
            new = merge(json.loads(json.dumps(cur)), patch) if method == "PATCH" else patch
            want = (new.get("metadata") or {}).get("resourceVersion")
            if method == "PUT" and not want:
                return self.send_json(422, status(422, "Invalid", f'{plural} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update'))
            if want and want != cur["metadata"]["resourceVersion"]:
                msg = f'Operation cannot be fulfilled on {group_resource(gv, plural)} "{name}": the object has been modified; please apply your changes to the latest version and try again'
                return self.send_json(409, status(409, "Conflict", msg, gv, plural, name))
            if sub == "status":
                out = json.loads(json.dumps(cur))
                if "status" in new:
                    out["status"] = new["status"]
                else:
                    out.pop("status", None)
            else:
                out = new
                # Identity and server-set fields stay the server's.
                for f in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
                    if f in cur["metadata"]:
                        out.setdefault("metadata", {})[f] = cur["metadata"][f]
                out["apiVersion"], out["kind"] = cur.get("apiVersion"), cur.get("kind")
                if has_status:
                    if "status" in cur:
                        out["status"] = cur["status"]
                    else:
                        out.pop("status", None)
            if out["metadata"].get("deletionTimestamp") and not out["metadata"].get("finalizers"):
                del objects[key]
                record("DELETED", gv, plural, ns or "", out)
            else:
                objects[key] = out
                record("MODIFIED", gv, plural, ns or "", out)
            reply = json.loads(json.dumps(out))
        return self.send_json(200, reply)

    def watch(self, gv, plural, ns, kind, q):
        since = q.get("resourceVersion", "")
        deadline = time.time() + float(q.get("timeoutSeconds") or 1800)
        sel = q.get("labelSelector")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(ev):
            data = (json.dumps(ev) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def mine(g, pl, n, o):
            return g == gv and pl == plural and (ns is None or n == ns) and matches(o, sel)

        try:
            with lock:
                if since in ("", "0"):
                    initial = [o for (g, pl, n, _), o in sorted(objects.items()) if mine(g, pl, n, o)]
                    last = rv[0]
                else:
                    last = int(since)
                    oldest = events[0][0] if events else rv[0] + 1
                    initial = None
                    if last < oldest - 1 and last < rv[0]:
                        msg = f"too old resource version: {last} ({oldest - 1})"
                        initial = "expired"
            if initial == "expired":
                send({"type": "ERROR", "object": status(410, "Expired", msg)})
                self.wfile.write(b"0\r\n\r\n")
                return
            for o in initial or []:
                send({"type": "ADDED", "object": o})
            while time.time() < deadline:
                with lock:
                    batch = [(r, t, o) for (r, g, pl, n, t, o) in events if r > last and mine(g, pl, n, o)]
                    if events and events[-1][0] > last:
                        last = events[-1][0]
                    if not batch:
                        lock.wait(timeout=min(1.0, max(0.0, deadline - time.time())))
                        continue
                for r, t, o in batch:
                    send({"type": t, "object": o})
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def discovery(self, path):
        groups = {}
        for (gv, plural), (kind, namespaced, has_status) in RESOURCES.items():
            groups.setdefault(gv, []).append({"name": plural, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            if has_status:
                groups[gv].append({"name": plural + "/status", "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": ["get", "patch", "update"]})
        p = path.rstrip("/")
        if p == "/api":
            self.send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        elif p == "/apis":
            gl = []
            for gv in groups:
                if gv.startswith("apis/"):
                    g, v = gv.split("/")[1:]
                    gl.append({"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}], "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}})
            self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": gl})
        elif p.lstrip("/") in groups:
            gv = p.lstrip("/")
            self.send_json(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version(gv), "resources": groups[gv]})
        elif p == "/version":
            self.send_json(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-mover-standin"})
        else:
            return False
        return True

    def standin(self, method, path):
        if method == "GET" and path == "/standin/requests":
            with lock:
                return self.send_json(200, dict(requests))
        if method == "POST" and path == "/standin/fail-next":
            f = self.body()
            with lock:
                fail_next.append(f)
            return self.send_json(200, f)
        return self.send_json(404, status(404, "NotFound", path))

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_PATCH(self):
        self.route("PATCH")

    def do_DELETE(self):
        self.route("DELETE")


def main():
    if len(sys.argv) > 2:
        HISTORY[0] = int(sys.argv[2])
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os

    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    srv.serve_forever()


if __name__ == "__main__":
    main()
