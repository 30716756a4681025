"""Soak: many clients churning connections and messages through a real relay
while origins are restarted and workers are killed now and then.

    python -m bench.soak --duration 600 --clients 50 --workers 2
    python -m bench.soak --duration 60 --json soak.json   # what tests/system/relay/test_soak.py runs

What runs: ``--origins`` picows echo origins (``bench.origin``, each its own
process group, on fixed ports so one can be killed and started again), the
relay (``python -m relay run``, ``--workers``) in front of them all, and
``--clients`` client loops (picows, one uvloop loop in this process). Each
loop connects, sends a random number of binary messages of random sizes
(1 B to 256 KiB, so every frame-length encoding), checks every echo byte for
byte and in order, closes cleanly, and starts again.

Chaos, on a schedule: every ``--origin-restart-every`` seconds one origin
(round-robin) is killed with SIGKILL and started again on the same port;
every ``--kill-worker-every`` seconds one relay worker is killed with SIGKILL
(the supervisor restarts it). A connection cut at such a moment is
"deliberately cut"; its unanswered messages are not counted as lost.

Reported: connections made, messages sent and verified, errors by kind
(connect failures by status, cuts by cause, corrupt, lost, timeouts), and
the relay's resident memory and descriptors (sum over the worker processes,
from /proc) at the start, after warm-up, in the middle and at the end. The
warm-up, middle and end samples are taken at a quiet moment — clients paused,
every tunnel closed — so they compare like with like.

Exit code: 0 when nothing was corrupted or lost on a connection that was not
deliberately cut and memory and descriptors came back within ``--tolerance``
of their level after warm-up; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (1, 2, 16, 125, 126, 127, 1000, 4096, 65535, 65536, 100_000, 256 * 1024)
ECHO_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
#: a cut this close to a chaos event (before or after) is blamed on it
CHAOS_WINDOW = 1.5


# -- processes ------------------------------------------------------------------------

class Origin:
    """One ``bench.origin`` process group on a port that survives restarts."""

    def __init__(self, port: int = 0):
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Origin":
        deadline = time.monotonic() + 10
        while True:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.origin", "--listen", f"127.0.0.1:{self.port}"], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
            first = self.proc.stdout.readline()
            if first.startswith("listening on"):
                self.port = int(first.rsplit(":", 1)[1])
                if self.proc.stdout.readline().strip() == "ready":
                    return self
            self.kill()  # the port may still be held by the killed generation: retry
            if time.monotonic() > deadline:
                raise RuntimeError(f"origin could not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


class RelayProc:
    """``python -m relay run`` with its log in a file and its ports from its own log lines."""

    def __init__(self, origins: list[str], workers: int, env: dict[str, str] | None = None, log_path: str = ""):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.env.update({"RELAY_LISTEN": "127.0.0.1:0", "RELAY_METRICS_LISTEN": "127.0.0.1:0",
                         "RELAY_ORIGIN": ",".join(origins), "RELAY_WORKERS": str(workers),
                         "RELAY_ACCESS_LOG": "0", "RELAY_DRAIN_TIMEOUT": "2", "RELAY_CONNECT_TIMEOUT": "3",
                         "PYTHONUNBUFFERED": "1"})
        self.env.update(env or {})
        self.log_path = log_path or f"/tmp/wsrelay-soak-{os.getpid()}.log"
        self.lines: list[str] = []
        self.port = self.metrics_port = 0

    def start(self) -> "RelayProc":
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "run"], cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.logf = open(self.log_path, "w")
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 20
        while not any("ready:" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("relay did not start:\n" + "\n".join(self.lines))
            time.sleep(0.02)
        text = "\n".join(self.lines)
        self.port = int(re.search(r"listening on [^ ]*?:(\d+)", text).group(1))
        self.metrics_port = int(re.search(r"metrics on http://[^ ]*?:(\d+)/", text).group(1))
        return self

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self.logf.write(line)
        self.logf.close()

    def workers(self) -> list[int]:
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        fields = f.read().rsplit(b")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid and fields[0] != b"Z":
                    out.append(int(name))
        return sorted(out)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def proc_sample(pids: list[int]) -> dict[str, int]:
    """Resident memory (KiB) and open descriptors, summed over ``pids``."""
    rss = fds = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                        break
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return {"rss_kib": rss, "fds": fds, "workers": len(pids)}


# -- clients --------------------------------------------------------------------------

@dataclass
class Stats:
    connections: int = 0
    sent: int = 0
    verified: int = 0
    bytes_verified: int = 0
    cut_deliberately: int = 0
    unconfirmed_on_cut: int = 0
    errors: Counter = field(default_factory=Counter)
    chaos: list[tuple[float, str]] = field(default_factory=list)
    corrupt_samples: list[str] = field(default_factory=list)
    connect_samples: list[str] = field(default_factory=list)

    def blame(self, t0: float, t1: float) -> str | None:
        """The chaos event nearest the end of [t0, t1], if one is close enough to explain it."""
        near = [(abs(t - t1), what) for t, what in self.chaos if t0 - CHAOS_WINDOW <= t <= t1 + CHAOS_WINDOW]
        return min(near)[1] if near else None


def payload(rng: random.Random, client: int, seq: int) -> bytes:
    size = max(16, rng.choice(SIZES))
    return struct.pack("!QQ", client, seq) + rng.randbytes(size - 16)


def _picows():
    from picows import WSCloseCode, WSListener, WSMsgType, ws_connect
    return WSCloseCode, WSListener, WSMsgType, ws_connect


async def run_client(i: int, url: str, st: Stats, gate: asyncio.Event, stop: asyncio.Event,
                     active: list[int], seed: int) -> None:
    WSCloseCode, WSListener, WSMsgType, ws_connect = _picows()
    rng = random.Random(seed * 1_000_003 + i)

    class Echo(WSListener):
        def __init__(self):
            super().__init__()
            self.q: asyncio.Queue = asyncio.Queue()

        def on_ws_frame(self, transport, frame) -> None:
            if frame.msg_type == WSMsgType.BINARY:
                self.q.put_nowait(frame.get_payload_as_bytes() if frame.fin else ("fragment", frame.fin))
            elif frame.msg_type == WSMsgType.CLOSE:
                self.q.put_nowait(("close", frame.get_close_code()))
                transport.disconnect()

        def on_ws_disconnected(self, transport) -> None:
            self.q.put_nowait(None)

    seq = 0
    while not stop.is_set():
        await gate.wait()
        if stop.is_set():
            break
        active[0] += 1
        t0 = time.monotonic()
        try:
            try:
                transport, c = await asyncio.wait_for(
                    ws_connect(Echo, url, websocket_handshake_timeout=CONNECT_TIMEOUT, max_frame_size=1 << 20),
                    CONNECT_TIMEOUT + 1)
            except Exception as e:  # noqa: BLE001 - every failure is a counted result
                status = getattr(getattr(e, "response", None), "status", None)
                kind = f"connect:{int(status)}" if status else f"connect:{type(e).__name__}"
                if len(st.connect_samples) < 5:
                    st.connect_samples.append(f"{type(e).__name__}: {str(e)[:200]}")
                cause = st.blame(t0, time.monotonic())
                st.errors[kind + (f" (during {cause})" if cause else "")] += 1
                await asyncio.sleep(0.05 + rng.random() * 0.1)
                continue
            if c is None:  # picows gave no listener: the connection died inside ws_connect
                cause = st.blame(t0, time.monotonic())
                st.errors["connect:dropped" + (f" (during {cause})" if cause else "")] += 1
                transport.disconnect()
                continue
            st.connections += 1
            n = rng.randint(1, 40)
            in_flight: list[bytes] = []
            clean = True
            for k in range(n):
                if stop.is_set() or not gate.is_set():
                    break
                # one or two messages in flight, to exercise pipelining through the tunnel
                for _ in range(1 if rng.random() < 0.7 else 2):
                    seq += 1
                    p = payload(rng, i, seq)
                    transport.send(WSMsgType.BINARY, p)
                    in_flight.append(p)
                    st.sent += 1
                while in_flight:
                    try:
                        got = await asyncio.wait_for(c.q.get(), ECHO_TIMEOUT)
                    except asyncio.TimeoutError:
                        cause = st.blame(t0, time.monotonic())
                        if cause:
                            st.cut_deliberately += 1
                            st.unconfirmed_on_cut += len(in_flight)
                        else:
                            st.errors["lost (echo timeout)"] += len(in_flight)
                        clean = False
                        break
                    if got is None or isinstance(got, tuple):
                        cause = st.blame(t0, time.monotonic())
                        if cause:
                            st.cut_deliberately += 1
                            st.unconfirmed_on_cut += len(in_flight)
                        else:
                            st.errors[f"cut unexplained ({got!r})"] += 1
                            st.errors["lost (cut unexplained)"] += len(in_flight)
                        clean = False
                        break
                    want = in_flight.pop(0)
                    if got != want:
                        st.errors["corrupt"] += 1
                        if len(st.corrupt_samples) < 5:
                            st.corrupt_samples.append(f"client {i}: sent {len(want)} B {want[:16].hex()}, "
                                                      f"got {len(got)} B {got[:16].hex()}")
                        clean = False
                        break
                    st.verified += 1
                    st.bytes_verified += len(got)
                if not clean:
                    break
            if clean:
                transport.send_close(WSCloseCode.OK)
                try:
                    await asyncio.wait_for(transport.wait_disconnected(), 5)
                except asyncio.TimeoutError:
                    st.errors["close handshake timeout"] += 1
            transport.disconnect()
            try:
                await asyncio.wait_for(transport.wait_disconnected(), 5)
            except asyncio.TimeoutError:
                st.errors["disconnect timeout"] += 1
        finally:
            active[0] -= 1


# -- the soak ---------------------------------------------------------------------------

async def _wait(cond, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def soak(duration: float = 60.0, clients: int = 50, workers: int = 2, origins: int = 2,
               origin_restart_every: float = 20.0, kill_worker_every: float = 30.0, warmup: float = 10.0,
               seed: int = 1, progress=None, relay_env: dict | None = None) -> dict:
    """Run one soak; returns the report (see the module docstring)."""
    say = progress or (lambda *_: None)
    st = Stats()
    procs = [Origin().start() for _ in range(origins)]
    relay = RelayProc([o.addr for o in procs], workers, relay_env).start()
    samples: dict[str, dict] = {}
    report: dict = {}
    tasks: list[asyncio.Task] = []
    try:
        url = f"ws://127.0.0.1:{relay.port}/"
        samples["start"] = proc_sample(relay.workers())
        gate, stop = asyncio.Event(), asyncio.Event()
        gate.set()
        active = [0]
        tasks = [asyncio.ensure_future(run_client(i, url, st, gate, stop, active, seed)) for i in range(clients)]

        async def quiet(name: str) -> None:
            gate.clear()
            ok = await _wait(lambda: active[0] == 0, 30)
            ok = ok and await _wait(lambda: relay.metric("wsrelay_clients") == 0, 15, 0.1)
            # closed tunnels release their descriptors as the loop gets to them
            prev = None
            for _ in range(40):
                cur = proc_sample(relay.workers())
                if prev is not None and cur["fds"] == prev["fds"] and cur["workers"] == workers:
                    break
                prev = cur
                await asyncio.sleep(0.1)
            samples[name] = dict(cur, quiet=ok, t=round(time.monotonic() - t_start, 1),
                                 connections=st.connections, verified=st.verified)
            say(f"[{samples[name]['t']:>6.1f}s] {name}: {samples[name]}")
            gate.set()

        t_start = time.monotonic()
        next_origin = t_start + origin_restart_every if origin_restart_every else float("inf")
        next_kill = t_start + kill_worker_every if kill_worker_every else float("inf")
        warm_at, mid_at = t_start + warmup, t_start + warmup + (duration - warmup) / 2
        which_origin = 0
        end = t_start + duration
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= warm_at and "warm" not in samples:
                await quiet("warm")
            elif now >= mid_at and "middle" not in samples:
                await quiet("middle")
            elif now >= next_origin and now < end - 3:
                o = procs[which_origin % len(procs)]
                which_origin += 1
                st.chaos.append((time.monotonic(), "origin restart"))
                o.kill()
                await asyncio.get_running_loop().run_in_executor(None, o.start)
                st.chaos.append((time.monotonic(), "origin restart"))
                say(f"[{now - t_start:>6.1f}s] origin {o.addr} restarted")
                next_origin = now + origin_restart_every
            elif now >= next_kill and now < end - 3:
                pids = relay.workers()
                if pids:
                    victim = random.Random(seed + int(now)).choice(pids)
                    st.chaos.append((time.monotonic(), "worker kill"))
                    os.kill(victim, signal.SIGKILL)
                    say(f"[{now - t_start:>6.1f}s] worker {victim} killed")
                    await _wait(lambda: len(relay.workers()) == workers and victim not in relay.workers(), 10)
                    st.chaos.append((time.monotonic(), "worker kill"))
                next_kill = now + kill_worker_every
            else:
                await asyncio.sleep(0.1)
        await quiet("end")
        stop.set()
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        crashed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        report = {
            "duration_s": duration, "clients": clients, "workers": workers, "origins": origins,
            "connections": st.connections, "messages_sent": st.sent, "messages_verified": st.verified,
            "bytes_verified": st.bytes_verified, "cut_deliberately": st.cut_deliberately,
            "unconfirmed_on_deliberate_cuts": st.unconfirmed_on_cut,
            "errors": dict(sorted(st.errors.items())),
            "corrupt": st.errors.get("corrupt", 0),
            "lost": sum(v for k, v in st.errors.items() if k.startswith("lost")),
            "corrupt_samples": st.corrupt_samples,
            "connect_error_samples": st.connect_samples,
            "chaos": Counter(what for _t, what in st.chaos[::2]),
            "worker_restarts": relay.metric("wsrelay_worker_restarts_total"),
            "accept_errors": relay.metric("wsrelay_accept_errors_total"),
            "samples": samples,
            "tracebacks": sum("Traceback" in line for line in relay.lines),
            "client_loops_crashed": crashed,
        }
    finally:
        for t in tasks:
            t.cancel()
        report["relay_exit"] = relay.stop()
        for o in procs:
            o.kill()
    return report


def verdict(report: dict, tolerance: float = 0.10) -> list[str]:
    """What is wrong with a soak's report (empty: it passed)."""
    bad = []
    if report["corrupt"]:
        bad.append(f"{report['corrupt']} corrupted messages: {report['corrupt_samples']}")
    if report["lost"]:
        bad.append(f"{report['lost']} messages lost on connections that were not deliberately cut")
    if report["tracebacks"]:
        bad.append(f"{report['tracebacks']} tracebacks in the relay log")
    s = report["samples"]
    if "warm" in s and "end" in s:
        for key in ("rss_kib", "fds"):
            warm, end = s["warm"][key], s["end"][key]
            if warm and abs(end - warm) > tolerance * warm:
                bad.append(f"{key} {warm} after warm-up, {end} at the end (more than {tolerance:.0%} apart)")
        if not s["end"].get("quiet"):
            bad.append("the relay did not come back to zero clients at the end")
    if report.get("relay_exit") not in (0, None):
        bad.append(f"relay exited with {report['relay_exit']} on SIGTERM")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--origins", type=int, default=2)
    ap.add_argument("--origin-restart-every", type=float, default=20.0, help="seconds; 0 = never")
    ap.add_argument("--kill-worker-every", type=float, default=30.0, help="seconds; 0 = never")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed RSS/fd drift after warm-up")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args(argv)
    import uvloop

    report = uvloop.run(soak(a.duration, a.clients, a.workers, a.origins, a.origin_restart_every,
                             a.kill_worker_every, a.warmup, a.seed, progress=lambda m: print(m, flush=True)))
    print(json.dumps(report, indent=2, default=str))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    bad = verdict(report, a.tolerance)
    for line in bad:
        print("FAIL:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
