#!/usr/bin/python3
"""TEST STAND-IN for KubeVirt's backup export server (virt-exportserver serving a
pull-mode VirtualMachineBackup, backup.kubevirt.io). There is no Kubernetes here. It
follows upstream (kubevirt/kubevirt, read at the commit the issue names):
pkg/storage/export/virt-exportserver/exportserver.go (backupMapHandler,
backupDataHandler, collectMapPage: status codes, page size, `null` extents) and
pkg/storage/nbdclient/nbdclient.go (allocDescription, mergedDescription, the merged
base:allocation + dirty-bitmap map of an incremental, clampLength). It reads the disk
from a real QEMU NBD export (qemu-nbd with a real dirty bitmap) through libnbd, as the
real server reads QEMU's through virt-launcher's tunnel:

  GET <base>/exports/<disk>/map?offset=O&page_size=N   (N default 512)
      -> 200 {"extents": [{"offset", "length", "type", "description"}] | null,
              "next_offset": M | null}
         Full: base:allocation (type bit 0 hole, bit 1 zero; data/hole/zero/hole,zero).
         Incremental: the bitmap merged with the zero bit (bit 0 dirty, bit 1 zero;
         clean/dirty/zero/dirty,zero).
  GET <base>/exports/<disk>/data?offset=O&length=L -> 200, the bytes (streamed); a length
      past the end is clamped; an offset at or past the end fails the stream (the
      connection is cut, as upstream's http.ErrAbortHandler does).
  503 "Backup source (virt-launcher) not connected via tunnel" while not connected.
  Every request needs the header x-kubevirt-export-token (401 otherwise).

Test knobs (not upstream): --unavailable-for S (503 for the first S seconds),
--blip-after N --blip-for S (after N data requests, 503 for S seconds),
--map-ends-at B (the map says next_offset null at B: a server that ends the map early).

Also `push-incremental SRC_URI BITMAP DST_URI`: what QEMU's push-mode backup job writes
for an incremental backup — the bitmap's dirty clusters of SRC copied into DST (a fresh
qcow2 exported writable), nothing else.

/stats returns {"data_bytes": bytes served by /data, "data_requests": N} (test only).
"""
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import nbd

CHUNK = 1 << 30


def extents(h, context, offset, size):
    """(offset, length, flags) of `context` from `offset` to the end."""
    out = []
    while offset < size:
        got = []

        def cb(meta, off, ents, err):
            if meta == context:
                got.extend(ents)
            return 0

        h.block_status(min(CHUNK, size - offset), offset, cb)
        if not got:
            raise RuntimeError(f"no {context} extents at {offset}")
        for i in range(0, len(got), 2):
            ln = min(got[i], size - offset)
            if ln == 0:
                break
            out.append((offset, ln, got[i + 1]))
            offset += ln
    return out


def connect(uri, contexts):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


ALLOC = {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}
MERGED = {0: "clean", 1: "dirty", 2: "zero", 3: "dirty,zero"}


def merged_extents(h, bitmap_ctx, offset, size):
    """An incremental's map: the dirty bitmap's bit 0 with base:allocation's zero bit."""
    alloc = extents(h, "base:allocation", offset, size)
    dirty = extents(h, bitmap_ctx, offset, size)
    out, a, b = [], 0, 0
    while a < len(alloc) and b < len(dirty):
        ao, al, af = alloc[a]
        do, dl, df = dirty[b]
        start = max(ao, do)
        end = min(ao + al, do + dl)
        flags = (af & 2) | (df & 1)
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == flags:
            out[-1] = (out[-1][0], out[-1][1] + end - start, flags)
        else:
            out.append((start, end - start, flags))
        if ao + al == end:
            a += 1
        if do + dl == end:
            b += 1
    return out


def serve(args):
    opts = {}
    while args and args[0].startswith("--"):
        opts[args[0]] = float(args[1])
        args = args[2:]
    listen, cert, key, token, uri, disk, mode = args[:7]
    bitmap = args[7] if len(args) > 7 else None
    contexts = ["base:allocation"] if mode == "full" else ["base:allocation", f"qemu:dirty-bitmap:{bitmap}"]
    h = connect(uri, contexts)
    size = h.get_size()
    map_end = int(opts.get("--map-ends-at", size))
    lock = threading.Lock()
    stats = {"data_bytes": 0, "data_requests": 0, "unavailable": 0}
    started = time.monotonic()
    blip = {"until": 0.0}
    prefix = f"/api/export.kubevirt.io/v1/namespaces/vms/virtualmachineexports/backup-1/exports/{disk}"

    def all_extents(off):
        if mode == "full":
            return [(o, l, f, ALLOC.get(f, "unknown")) for o, l, f in extents(h, "base:allocation", off, size)]
        return [(o, l, f, MERGED.get(f, "unknown")) for o, l, f in merged_extents(h, f"qemu:dirty-bitmap:{bitmap}", off, size)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, code, body, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            u = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            if u.path == "/stats":
                return self.reply(200, json.dumps(stats).encode())
            if self.headers.get("x-kubevirt-export-token") != token:
                return self.reply(401, b"invalid token", "text/plain")
            now = time.monotonic()
            if u.path in (prefix + "/map", prefix + "/data") and (now - started < opts.get("--unavailable-for", 0) or now < blip["until"]):
                with lock:
                    stats["unavailable"] += 1
                return self.reply(503, b"Backup source (virt-launcher) not connected via tunnel\n", "text/plain; charset=utf-8")
            if u.path == prefix + "/map":
                off, page = int(q.get("offset", 0)), int(q.get("page_size", 512))
                if off >= size:
                    return self.reply(500, f"Failed to call map for export: {disk}\n".encode(), "text/plain; charset=utf-8")
                with lock:
                    ext = [e for e in all_extents(off) if e[0] < map_end]
                pg = ext[:page]
                nxt = ext[page][0] if len(ext) > page else None
                body = {"extents": [{"offset": o, "length": l, "type": t, "description": d} for o, l, t, d in pg] or None, "next_offset": nxt}
                return self.reply(200, (json.dumps(body) + "\n").encode())
            if u.path == prefix + "/data":
                off, ln = int(q.get("offset", 0)), int(q.get("length", 0))
                if off >= size:
                    # The tunnel's Read fails before any byte: the handler aborts.
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if ln == 0 or off + ln > size:
                    ln = size - off
                with lock:
                    data = h.pread(ln, off)
                    stats["data_bytes"] += ln
                    stats["data_requests"] += 1
                    if stats["data_requests"] == int(opts.get("--blip-after", -1)):
                        blip["until"] = time.monotonic() + opts.get("--blip-for", 0)
                return self.reply(200, bytes(data), "application/octet-stream")
            return self.reply(404, b"404 page not found\n", "text/plain; charset=utf-8")

    host, port = listen.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"{srv.server_address[1]} {prefix}", flush=True)
    srv.serve_forever()


def push_incremental(args):
    src_uri, bitmap, dst_uri = args
    context = f"qemu:dirty-bitmap:{bitmap}"
    src = connect(src_uri, [context])
    dst = connect(dst_uri, [])
    copied = 0
    for off, ln, flags in extents(src, context, 0, src.get_size()):
        if flags & 1:
            dst.pwrite(src.pread(ln, off), off)
            copied += ln
    dst.flush()
    print(copied)


if __name__ == "__main__":
    {"serve": serve, "push-incremental": push_incremental}[sys.argv[1]](sys.argv[2:])
