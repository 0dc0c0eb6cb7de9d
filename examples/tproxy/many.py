#!/usr/bin/env python3
"""Many concurrent connections through the transparent proxy, every byte checked.

server HOST PORT: for each connection, read to EOF, then send the bytes back
reversed and close.
client HOST PORT N SIZE: open N connections (all open at once before any
sends), then on each send SIZE bytes of its own, half-close, and check that
the reply is exactly those bytes reversed. Prints "many: K of N intact" and
exits 1 unless all N are.
"""
import asyncio
import os
import resource
import sys


def raise_open_files(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted <= soft:
        return
    try:  # root may raise the hard limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def serve(host, port):
    async def handle(reader, writer):
        data = await reader.read()
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


async def clients(host, port, n, size):
    connecting = asyncio.Semaphore(64)  # a burst would overflow accept queues
    all_open = asyncio.Event()
    opened = 0

    async def one(i):
        nonlocal opened
        async with connecting:
            reader, writer = await asyncio.open_connection(host, port)
        opened += 1
        if opened == n:
            all_open.set()
        await all_open.wait()
        data = os.urandom(size)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        return reply == data[::-1]

    results = await asyncio.wait_for(
        asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True), 300
    )
    intact = sum(1 for r in results if r is True)
    errors = [r for r in results if isinstance(r, BaseException)]
    print(f"many: {intact} of {n} intact ({len(errors)} errors{': ' + repr(errors[0]) if errors else ''})")
    return intact == n


def main():
    raise_open_files(65536)  # guests often start at 1024
    if sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    else:
        ok = asyncio.run(clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
