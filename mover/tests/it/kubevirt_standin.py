#!/usr/bin/python3
"""TEST STAND-IN for KubeVirt's backup export server (virt-exportserver serving a
pull-mode VirtualMachineBackup, backup.kubevirt.io). There is no Kubernetes here; this
follows the published endpoint shapes and reads the disk from a real QEMU NBD export
(qemu-nbd with a real dirty bitmap) through libnbd, as the real server reads QEMU's:

  GET <base>/exports/<disk>/map?offset=O&page_size=N
      -> {"extents": [{"offset", "length", "type", "description"}], "next_offset": M|null}
         Full backup: the disk's base:allocation (type bit 0 hole, bit 1 zero).
         Incremental: the checkpoint's dirty bitmap (type bit 0 dirty).
  GET <base>/exports/<disk>/data?offset=O&length=L -> 206, the bytes
  Every request needs the header x-kubevirt-export-token.

Also `push-incremental SRC_URI BITMAP DST_URI`: what QEMU's push-mode backup job writes
for an incremental backup — the bitmap's dirty clusters of SRC copied into DST (a fresh
qcow2 exported writable), nothing else.

/stats returns {"data_bytes": bytes served by /data, "data_requests": N} (test only).
"""
import json
import ssl
import sys
import threading
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


def serve(args):
    listen, cert, key, token, uri, disk, mode = args[:7]
    bitmap = args[7] if len(args) > 7 else None
    context = "base:allocation" if mode == "full" else f"qemu:dirty-bitmap:{bitmap}"
    h = connect(uri, [context])
    size = h.get_size()
    lock = threading.Lock()
    stats = {"data_bytes": 0, "data_requests": 0}
    prefix = f"/api/v1beta1/namespaces/vms/virtualmachinebackups/backup-1/exports/{disk}"

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
            if u.path == prefix + "/map":
                off, page = int(q.get("offset", 0)), int(q.get("page_size", 1000))
                with lock:
                    ext = extents(h, context, off, size)
                pg = ext[:page]
                nxt = pg[-1][0] + pg[-1][1] if len(ext) > page else None
                body = {"extents": [{"offset": o, "length": l, "type": t, "description": ""} for o, l, t in pg], "next_offset": nxt}
                return self.reply(200, json.dumps(body).encode())
            if u.path == prefix + "/data":
                off, ln = int(q["offset"]), int(q["length"])
                if off + ln > size or ln <= 0:
                    return self.reply(416, b"range outside the disk", "text/plain")
                with lock:
                    data = h.pread(ln, off)
                    stats["data_bytes"] += ln
                    stats["data_requests"] += 1
                return self.reply(206, bytes(data), "application/octet-stream")
            return self.reply(404, b"no such export", "text/plain")

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
