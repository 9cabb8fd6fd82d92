#!/usr/bin/env python3
"""A TCP proxy that adds a fixed one-way delay in each direction, without limiting
bandwidth: every chunk read is forwarded DELAY_MS after it arrived, while later chunks keep
flowing (a pipe, not stop-and-wait). This kernel has no netem; this stands in for an
object store 5-50 ms away.

    latency-proxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS

Listens on 127.0.0.1 only."""
import asyncio, sys, time

listen_port, target, delay_ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
t_host, t_port = target.rsplit(":", 1)
DELAY = delay_ms / 1000.0


async def pipe(reader, writer):
    # Reader → queue (timestamped) → writer after the delay; the reader never waits for it.
    q = asyncio.Queue()

    async def pump():
        while True:
            data = await reader.read(1 << 20)
            q.put_nowait((time.monotonic() + DELAY, data))
            if not data:
                return

    async def drain():
        while True:
            due, data = await q.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    writer.write_eof()
                except OSError:
                    pass
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(pump(), drain(), return_exceptions=True)


async def handle(c_reader, c_writer):
    try:
        s_reader, s_writer = await asyncio.open_connection(t_host, int(t_port))
    except OSError:
        c_writer.close()
        return
    await asyncio.gather(pipe(c_reader, s_writer), pipe(s_reader, c_writer), return_exceptions=True)
    for w in (c_writer, s_writer):
        w.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True)
    print(f"proxy 127.0.0.1:{listen_port} -> {target}, +{delay_ms} ms each way", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
