"""deploy/fleet/fleet.sh's helper, run inside the balancer's namespace:

    probe.py wait-up DIR HOSTS SECONDS    until every host's /readyz is 200 and HAProxy has them all UP
    probe.py wait-host HOST:PORT SECONDS  until that host's /readyz is 200
    probe.py status DIR HOSTS NAME        leases in Redis, clients and limits per host
    probe.py burst HOST:PORT N SECONDS    N concurrent upgrades, held SECONDS, then closed; prints the outcome

Standard library only, but for the redis client in ``status``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import sys
import time
from collections import Counter

FRONT = "198.18.0"


def get(addr: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def ready(addr: str) -> bool:
    try:
        return get(addr, "/readyz")[0] == 200
    except OSError:
        return False


def haproxy_up(directory: str) -> dict[str, str]:
    """Server name -> status (UP, DOWN, ...) from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(os.path.join(directory, "haproxy.sock"))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for line in data.decode().splitlines():
        f = line.split(",")
        if len(f) > 17 and f[0] == "hosts" and f[1] not in ("FRONTEND", "BACKEND"):
            out[f[1]] = f[17]
    return out


def wait(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def metrics(addr: str) -> dict[str, float]:
    out = {}
    for line in get(addr, "/metrics")[1].splitlines():
        m = re.match(r"^(wsrelay_clients(?:_limit)?|wsrelay_cluster_\w+?)(\{[^}]*\})? (\S+)$", line)
        if m and "lease_errors" not in m.group(1):
            out[m.group(1)] = float(m.group(3))
    return out


def status(directory: str, hosts: int, name: str) -> int:
    import redis

    r = redis.Redis(unix_socket_path=os.path.join(directory, "redis.sock"), socket_timeout=2, decode_responses=True)
    p = f"wsrelay:{{{name}}}:"
    leased = held = 0
    try:
        ids = sorted(r.smembers(p + "hosts"))
        print(f"Redis: {len(ids)} hosts registered")
        for h in ids:
            v = r.hmget(p + "host:" + h, "lease", "held")
            ttl = r.pttl(p + "host:" + h)
            if v[0] is None:
                continue
            leased += int(v[0])
            held += int(v[1])
            print(f"  {h}: lease {v[0]}, held {v[1]}, expires in {ttl / 1000:.1f}s")
        print(f"  sum: lease {leased}, held {held}")
    except redis.RedisError as e:
        print(f"Redis: does not answer ({e})")
    servers = haproxy_up(directory)
    for i in range(1, hosts + 1):
        addr = f"{FRONT}.1{i}:9108"
        try:
            m = metrics(addr)
            print(f"host {i}: clients {m['wsrelay_clients']:.0f}, limit {m['wsrelay_clients_limit']:.0f}, "
                  f"leased {m['wsrelay_cluster_leased_slots']:.0f}, redis_up {m['wsrelay_cluster_redis_up']:.0f}, "
                  f"fallback {m['wsrelay_cluster_fallback']:.0f}, HAProxy {servers.get(f'h{i}', '?')}")
        except OSError as e:
            print(f"host {i}: not answering ({e}), HAProxy {servers.get(f'h{i}', '?')}")
    return 0


async def upgrade(host: str, port: int) -> tuple[str, asyncio.StreamWriter | None]:
    try:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET / HTTP/1.1\r\nHost: fleet\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        return f"error {type(e).__name__}", None
    status = head.split(b" ", 2)[1].decode()
    if status == "101":
        return status, writer
    retry = b"\r\nRetry-After:" in head
    writer.close()
    return status + (" + Retry-After" if retry else ""), None


async def burst(addr: str, n: int, hold: float) -> int:
    host, _, port = addr.rpartition(":")
    t = time.monotonic()
    results = await asyncio.gather(*(upgrade(host, int(port)) for _ in range(n)))
    took = time.monotonic() - t
    counts = Counter(status for status, _ in results)
    print(f"{n} concurrent upgrades through {addr} in {took:.2f}s: "
          + ", ".join(f"{c} × {s}" for s, c in sorted(counts.items())))
    await asyncio.sleep(hold)
    for _, w in results:
        if w is not None:
            w.close()
    return 0


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "wait-up":
        directory, hosts, seconds = args[0], int(args[1]), float(args[2])
        addrs = [f"{FRONT}.1{i}:9108" for i in range(1, hosts + 1)]
        ok = wait(lambda: all(ready(a) for a in addrs), seconds) and wait(
            lambda: list(haproxy_up(directory).values()) == ["UP"] * hosts, seconds)
        return 0 if ok else 1
    if cmd == "wait-host":
        return 0 if wait(lambda: ready(args[0]), float(args[1])) else 1
    if cmd == "status":
        return status(args[0], int(args[1]), args[2])
    if cmd == "burst":
        return asyncio.run(burst(args[0], int(args[1]), float(args[2])))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
