"""The naive relay: what most people write first with asyncio streams.

    python -m bench.naive_relay --listen 127.0.0.1:0 --origin 127.0.0.1:9000

Read the request head with ``readuntil``, connect to the origin, forward the
head, then pump both directions with ``read(65536)`` / ``write`` / ``drain``
until each side ends. One process, uvloop. No validation, no limits, no
headers added: it is the floor wsrelay has to beat, not a product. Prints
``listening on HOST:PORT`` when it accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def handle(origin: tuple[str, int], creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
    owriter = None
    try:
        head = await creader.readuntil(b"\r\n\r\n")
        oreader, owriter = await asyncio.open_connection(*origin)
        owriter.write(head)
        await asyncio.gather(pump(creader, owriter), pump(oreader, cwriter))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        pass
    finally:
        cwriter.close()
        if owriter is not None:
            owriter.close()


async def serve(listen: tuple[str, int], origin: tuple[str, int]) -> None:
    server = await asyncio.start_server(lambda r, w: handle(origin, r, w), *listen, backlog=4096)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.naive_relay", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--origin", required=True, help="HOST:PORT of the origin")
    args = ap.parse_args(argv)
    uvloop.run(serve(_addr(args.listen), _addr(args.origin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
