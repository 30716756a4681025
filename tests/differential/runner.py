"""Runs one case through the three proxies at once and judges wsrelay's run.

The same client script is played against each proxy concurrently (one
client connection each), each proxy talking to its own listener of the
recording origin. A proxy's run ends when its client connection and every
origin connection are closed, or when nothing has happened for ``idle``
seconds (a proxy keeping a connection open for the next request is quiet,
not finished, so quiet is the only end there is). A case whose first run
shows a finding is run again with a long quiet period (``confirm_idle``),
so a proxy slowed by a loaded machine is not mistaken for a wrong one; the
second run's verdict is the one kept.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.differential.case import Case
from tests.differential.compare import Difference, Observed, compare
from tests.differential.normalise import client_view, origin_view, parse_replies, requests_sent
from tests.differential.origin import Listener
from tests.differential.proxies import ANCHORS, NAMES, Proxies

IDLE = 0.15
CONFIRM_IDLE = 1.0
CAP = 8.0  # seconds a proxy's run of one case may take at most


@dataclass
class ClientRun:
    sent: bytes = b""
    received: bytearray = field(default_factory=bytearray)
    closed: bool = False
    reset: bool = False


@dataclass
class Verdict:
    case: Case
    observed: dict[str, Observed]
    differences: list[Difference]
    seconds: float
    confirmed: bool = False
    #: findings the first run showed and the confirming run did not
    unconfirmed: list[Difference] = field(default_factory=list)

    @property
    def findings(self) -> list[Difference]:
        return [d for d in self.differences if d.finding and d.kind not in self.case.allow]

    @property
    def allowed(self) -> list[Difference]:
        return [d for d in self.differences if d.finding and d.kind in self.case.allow]

    def report(self) -> str:
        lines = [f"{self.case.name}: {self.case.title}"]
        for d in self.differences:
            tag = "FINDING" if d in self.findings else ("allowed" if d.finding else "difference")
            lines.append(f"  {tag} {d.kind}: {d.detail}")
        for name, o in self.observed.items():
            msgs = "; ".join(m.short() for m in o.origin.messages()) or "nothing"
            extra = ""
            if o.origin.tunnel():
                extra += f" tunnel={o.origin.tunnel()[:60]!r}"
            if o.origin.leftover():
                extra += f" leftover={o.origin.leftover()!r:.100}"
            finals = ", ".join(f"{r.status}{'*' if not r.from_origin else ''}{'' if r.complete else '(cut)'}"
                               for r in o.client.replies)
            lines.append(f"  {name:8} origin got [{msgs}]{extra}; client got [{finals}]"
                         f"{' + tunnel %r' % o.client.tunnel[:40] if o.client.tunnel else ''}"
                         f"{' leftover %r' % o.client.leftover[:40] if o.client.leftover else ''}"
                         f" {'closed' if o.client.closed else 'open'}")
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            "case": self.case.name, "title": self.case.title, "seconds": round(self.seconds, 3),
            "differences": [{"kind": d.kind, "finding": d in self.findings, "allowed": d in self.allowed,
                             "detail": d.detail} for d in self.differences],
            "unconfirmed": [{"kind": d.kind, "detail": d.detail} for d in self.unconfirmed],
            "proxies": {name: {
                "origin": [m.short() for m in o.origin.messages()],
                "origin_tunnel": o.origin.tunnel()[:200].decode("latin-1"),
                "origin_leftover": [x[:200].decode("latin-1") for x in o.origin.leftover()],
                "client": [r.short() for r in o.client.replies],
                "client_tunnel": (o.client.tunnel or b"")[:200].decode("latin-1"),
                "client_closed": o.client.closed,
            } for name, o in self.observed.items()},
        }


class Harness:
    """The recording origin and the three proxies; ``run`` plays one case."""

    def __init__(self, loop_thread, tmp: Path) -> None:
        self.lt = loop_thread
        self.tmp = tmp
        self.listeners: dict[str, Listener] = {}
        self.proxies: Proxies | None = None
        self.aborted = 0

    def start(self) -> "Harness":
        async def listen():
            for name in NAMES:
                listener = Listener(name)
                await listener.start()
                self.listeners[name] = listener
        self.lt.run(listen())
        self.proxies = Proxies({n: lst.port for n, lst in self.listeners.items()}, self.tmp).start()
        return self

    def stop(self) -> None:
        if self.proxies is not None:
            self.proxies.stop()
        async def close():
            for listener in self.listeners.values():
                await listener.stop()
        self.lt.run(close())

    @property
    def stray(self) -> int:
        return sum(lst.stray for lst in self.listeners.values())

    def stray_report(self) -> dict[str, list[str]]:
        return {n: lst.stray_names for n, lst in self.listeners.items() if lst.stray_names}

    def run(self, case: Case, idle: float = IDLE, confirm_idle: float = CONFIRM_IDLE) -> Verdict:
        verdict = self._run_once(case, idle)
        # a finding a known bug explains needs no second look; any other does
        if _unexplained(verdict) and confirm_idle > idle:
            first = verdict.findings
            verdict = self._run_once(case, confirm_idle)
            verdict.confirmed = True
            kinds = {d.kind for d in verdict.findings}
            verdict.unconfirmed = [d for d in first if d.kind not in kinds]
        return verdict

    def _run_once(self, case: Case, idle: float) -> Verdict:
        dead = self.proxies.alive()
        if dead:
            raise RuntimeError(f"proxy exited during the run: {dead}")
        t0 = time.monotonic()
        runs = self.lt.run(self._play(case, idle), timeout=CAP * 2 + 30)
        observed = {}
        for name, (client, recordings) in runs.items():
            observed[name] = Observed(origin_view(recordings),
                                      client_view(bytes(client.received), client.sent, client.closed, client.reset),
                                      case.client_end)
        differences = compare(observed["wsrelay"], {n: observed[n] for n in ANCHORS})
        mine = observed["wsrelay"].client
        if case.status is not None:
            got = [r.status for r in mine.finals()]
            if got != case.status:
                differences.append(Difference("expected", f"wsrelay answered {got}, the case expects {case.status}"))
        if case.tunnel is not None and mine.tunnel != case.tunnel:
            differences.append(Difference("expected", f"the client got {mine.tunnel!r} through the tunnel, "
                                                       f"the case expects {case.tunnel!r}"))
        return Verdict(case, observed, differences, time.monotonic() - t0)

    async def _play(self, case: Case, idle: float) -> dict:
        for listener in self.listeners.values():
            listener.begin(case.origin, case.title if case.name == "generated" else case.name)
        writers: dict[str, asyncio.StreamWriter] = {}
        runs = await asyncio.gather(*(self._client(name, case, idle, writers) for name in NAMES))
        for w in writers.values():
            w.transport.abort()
        aborted = await asyncio.gather(*(lst.end() for lst in self.listeners.values()))
        self.aborted += sum(aborted)
        return {name: (run, self.listeners[name].recordings()) for name, run in zip(NAMES, runs)}

    async def _client(self, name: str, case: Case, idle: float, writers: dict) -> ClientRun:
        listener = self.listeners[name]
        activity = listener.activity
        loop = asyncio.get_running_loop()
        run = ClientRun()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxies.ports[name])
        writers[name] = writer
        ended = False  # the client closed or reset its own side

        async def pump():
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    run.received += data
                    activity.touch()
            except (ConnectionError, OSError):
                run.reset = True
            run.closed = True
            activity.touch()

        reading = asyncio.ensure_future(pump())

        async def until(cond, timeout: float) -> None:
            deadline = loop.time() + timeout
            while not cond():
                left = deadline - loop.time()
                if left <= 0:
                    return
                activity.changed.clear()
                try:
                    await asyncio.wait_for(activity.changed.wait(), left)
                except TimeoutError:
                    return

        def finals() -> int:
            parsed = parse_replies(bytes(run.received), requests_sent(run.sent), eof=run.closed)
            return sum(1 for r in parsed.replies if not r.interim and r.complete)

        for step in case.client:
            if step.kind == "send":
                if run.closed or writer.transport.is_closing():
                    continue
                try:
                    writer.write(step.data)
                    await writer.drain()
                    run.sent += step.data
                except (ConnectionError, OSError):
                    pass
                activity.touch()
            elif step.kind == "pause":
                await asyncio.sleep(step.seconds)
            elif step.kind == "wait-response":
                await until(lambda: run.closed or finals() >= step.count, step.seconds)
            elif step.kind == "wait-origin":
                attr = "heads" if step.at == "head" else "requests"
                await until(lambda: getattr(listener, attr) >= step.count, step.seconds)
            elif step.kind == "shutdown":
                if writer.can_write_eof() and not writer.transport.is_closing():
                    try:
                        writer.write_eof()
                    except OSError:
                        pass
            elif step.kind in ("close", "reset"):
                if step.kind == "reset":
                    sock = writer.get_extra_info("socket")
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                    writer.transport.abort()
                else:
                    writer.close()
                ended = True
                activity.touch()
                break

        # quiet: the proxy closed and no origin connection is open, or nothing
        # happening for `idle` seconds (a client that closed first may still
        # have its request forwarded: only quiet tells)
        deadline = loop.time() + CAP
        while loop.time() < deadline:
            if run.closed and not ended and listener.open_connections() == 0:
                break
            quiet_for = loop.time() - activity.last
            if quiet_for >= idle:
                break
            activity.changed.clear()
            try:
                await asyncio.wait_for(activity.changed.wait(), idle - quiet_for)
            except TimeoutError:
                pass
        if not reading.done():
            reading.cancel()
        return run


def _unexplained(v: Verdict) -> list[Difference]:
    from tests.differential.known import explain
    if v.case.known_bug:
        return []
    return [d for d in v.findings if explain(v.case.features, d) is None]
