"""The fleet of deploy/fleet/fleet.sh as a test fixture: build it, break it,
always tear it down. Clients run on an asyncio loop whose thread entered the
balancer's network namespace (setns(2) moves only the calling thread), so
every socket the tests open lives in that namespace and reaches HAProxy and
the hosts' front addresses, and nothing else."""

from __future__ import annotations

import asyncio
import base64
import ctypes
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import NamedTuple

from tests.support.relay import ROOT

SCRIPT = os.path.join(ROOT, "deploy", "fleet", "fleet.sh")
HAPROXY = ("198.18.0.1", 8080)
CLONE_NEWNET = 0x40000000


def host_addr(i: int) -> str:
    return f"198.18.0.1{i}"


def namespaces_work() -> str | None:
    """None if this process can create a network namespace, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    name = f"wsprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class NetnsLoop:
    """An asyncio loop on a thread inside network namespace ``ns``."""

    def __init__(self, ns: str) -> None:
        self.loop = asyncio.new_event_loop()
        entered = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {ns}")
                finally:
                    os.close(fd)
            except BaseException as e:  # noqa: BLE001 - reported to the starter
                failure.append(e)
                entered.set()
                return
            entered.set()
            asyncio.set_event_loop(self.loop)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name=f"netns-{ns}")
        self.thread.start()
        entered.wait(10)
        if failure:
            raise failure[0]

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Answer(NamedTuple):
    status: int            # 0: no answer (connection failed or closed)
    head: bytes
    writer: asyncio.StreamWriter | None  # open after a 101
    reader: asyncio.StreamReader | None
    at: float              # time.monotonic() when the answer came


async def upgrade(host: str, port: int) -> Answer:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return Answer(0, b"", None, None, time.monotonic())
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: fleet.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        writer.close()
        return Answer(0, b"", None, None, time.monotonic())
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        writer.close()
        return Answer(status, head, None, None, time.monotonic())
    return Answer(101, head, writer, reader, time.monotonic())


async def echo(a: Answer, text: bytes = b"ping") -> bool:
    mask = os.urandom(4)
    a.writer.write(bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
    try:
        data = await asyncio.wait_for(a.reader.readexactly(2 + len(text)), 5)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return False
    return data[2:] == text


async def _get(host: str, port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


class Fleet:
    """deploy/fleet/fleet.sh with its settings, plus clients in the balancer's namespace."""

    def __init__(self, directory: str, **settings: str) -> None:
        self.name = f"wsft{os.getpid() % 100000}"
        self.dir = directory
        self.env = {**os.environ, "FLEET_NAME": self.name, "FLEET_DIR": directory, "FLEET_PYTHON": sys.executable,
                    **{f"FLEET_{k.upper()}": str(v) for k, v in settings.items()}}
        self.limit = int(settings.get("limit", 100))
        self.hosts = 3
        self.loop: NetnsLoop | None = None
        self.held: list[Answer] = []

    def sh(self, *args: str, timeout: float = 90) -> str:
        r = subprocess.run([SCRIPT, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"fleet.sh {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r.stdout

    def up(self) -> str:
        out = self.sh("up")
        self.loop = NetnsLoop(f"{self.name}-lb")
        return out

    def down(self) -> None:
        if self.loop is not None:
            self.close_all()
            self.loop.stop()
            self.loop = None
        self.sh("down")

    # -- observing ---------------------------------------------------------------------
    def metrics(self, i: int) -> dict[str, float]:
        """Host i's wsrelay_clients* and wsrelay_cluster_* samples (label-less names), {} if it is down."""
        try:
            status, body = self.loop.run(_get(host_addr(i), 9108, "/metrics"), 10)
        except (OSError, asyncio.TimeoutError):
            return {}
        out: dict[str, float] = {}
        for m in re.finditer(r"^(wsrelay_clients(?:_limit)?|wsrelay_cluster_\w+?)(\{[^}]*\})? (\S+)$", body, re.M):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    def readyz(self, i: int) -> int:
        return self.loop.run(_get(host_addr(i), 9108, "/readyz"), 10)[0]

    def clients(self) -> dict[int, int]:
        """Open WebSocket clients per live host (wsrelay_clients)."""
        out = {}
        for i in range(1, self.hosts + 1):
            m = self.metrics(i)
            if m:
                out[i] = int(m["wsrelay_clients"])
        return out

    def leases(self) -> dict[str, tuple[int, int]]:
        """Redis's view: host id -> (lease, held); {} if Redis is down."""
        import redis

        from workers.cluster import prefix

        p = prefix(self.name)
        out = {}
        try:
            with redis.Redis(unix_socket_path=os.path.join(self.dir, "redis.sock"), socket_timeout=2,
                             decode_responses=True) as r:
                for h in r.smembers(p + "hosts"):
                    v = r.hmget(p + "host:" + h, "lease", "held")
                    if v[0] is not None:
                        out[h] = (int(v[0]), int(v[1]))
        except (redis.RedisError, OSError):
            return {}
        return out

    def host_id(self, i: int) -> str:
        """Host i's id in Redis (from its log: ``host id ...``)."""
        with open(os.path.join(self.dir, f"h{i}.log")) as f:
            ids = re.findall(r"host id (\S+),", f.read())
        return ids[-1]

    def starved(self) -> bool:
        import redis

        from workers.cluster import prefix

        with redis.Redis(unix_socket_path=os.path.join(self.dir, "redis.sock"), socket_timeout=2) as r:
            return bool(r.exists(prefix(self.name) + "starved"))

    def at_rest(self) -> bool:
        leases = self.leases()
        total = min(self.limit, self.hosts * int(self.env.get("FLEET_BLOCK", 64)))
        return (len(leases) == self.hosts and all(h == 0 for _, h in leases.values())
                and sum(lease for lease, _ in leases.values()) == total and not self.starved())

    def wait_at_rest(self, timeout: float = 15) -> None:
        """No client anywhere, and the hosts leasing what an idle fleet leases:
        every slot of the limit (or a block each), and no host starved."""
        deadline = time.monotonic() + timeout
        while not self.at_rest():
            assert time.monotonic() < deadline, f"not at rest after {timeout}s: {self.leases()}"
            time.sleep(0.1)

    # -- clients ----------------------------------------------------------------------------
    def burst(self, n: int, host: str = HAPROXY[0], port: int = HAPROXY[1]) -> list[Answer]:
        """``n`` concurrent upgrades; the admitted ones stay open (in :attr:`held`)."""
        async def go():
            return await asyncio.gather(*(upgrade(host, port) for _ in range(n)))
        answers = self.loop.run(go(), 60)
        self.held += [a for a in answers if a.writer is not None]
        return answers

    def until_full(self, want_admitted: int, timeout: float, n: int = 50, **kw) -> tuple[int, float]:
        """Bursts of ``n`` until ``want_admitted`` were admitted in all; (admitted, seconds)."""
        t0 = time.monotonic()
        got = 0
        while got < want_admitted:
            assert time.monotonic() - t0 < timeout, f"{got} of {want_admitted} admitted in {timeout}s"
            got += sum(a.status == 101 for a in self.burst(n, **kw))
            time.sleep(0.05)
        return got, time.monotonic() - t0

    def echo_all(self, answers: list[Answer] | None = None) -> bool:
        answers = self.held if answers is None else answers

        async def go():
            return all(await asyncio.gather(*(echo(a) for a in answers)))
        return self.loop.run(go(), 60)

    def close(self, answers: list[Answer]) -> None:
        async def go():
            for a in answers:
                a.writer.close()
        self.loop.run(go())
        ids = {id(a) for a in answers}
        self.held = [a for a in self.held if id(a) not in ids]

    def close_all(self) -> None:
        self.close(list(self.held))

    def drop_dead(self) -> int:
        """Forget held clients whose connection was closed by the far side; how many."""
        async def go():
            alive = []
            for a in self.held:
                if a.reader.at_eof() or a.writer.is_closing():
                    a.writer.close()
                else:
                    alive.append(a)
            return alive
        before = len(self.held)
        self.held = self.loop.run(go())
        return before - len(self.held)


def counts(answers: list[Answer]) -> Counter:
    return Counter(a.status for a in answers)
