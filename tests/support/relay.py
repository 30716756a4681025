"""The one relay launcher of the suite: ``wsrelay run`` (and ``wsrelay demo``)
as a child process, with its logs captured, plus the background event loop
the origins run on and the one polling wait.

Everything listens on 127.0.0.1 port 0; ports are read from the relay's own
log lines, never guessed. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Relay:
    """``wsrelay run`` as a child process, with its stderr (log) and stdout (access log) captured."""

    #: RELAY_DATA_PLANE unless ``env`` says otherwise (tests/conftest.py sets it per module)
    data_plane = "auto"
    #: WSRELAY_NATIVE_BACKEND ("epoll" to run the native engine without io_uring; "" = its default)
    native_backend = ""
    #: None: the default (on the native plane the fast path in C decides plain
    #: upgrades, relay/native/fast_path.py); False: WSRELAY_NATIVE_FAST_PATH=0,
    #: Python decides every upgrade (the reference the fast path is held to)
    fast_path: bool | None = None

    def __init__(self, origin: str | None, workers: int = 2, env: dict | None = None,
                 args: tuple[str, ...] = (), metrics: bool = True, tracebacks: bool = False):
        """``tracebacks``: the test provokes some (a worker crashing on purpose);
        otherwise a traceback in the relay's log fails the test when it stops."""
        self.tracebacks = tracebacks
        e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        e.update({
            "RELAY_LISTEN": "127.0.0.1:0",
            "RELAY_WORKERS": str(workers),
            "RELAY_METRICS_LISTEN": "127.0.0.1:0" if metrics else "",
            "RELAY_DRAIN_TIMEOUT": "5",
            "PYTHONUNBUFFERED": "1",
            "RELAY_DATA_PLANE": self.data_plane,
        })
        if self.native_backend:
            e["WSRELAY_NATIVE_BACKEND"] = self.native_backend
        if self.fast_path is False:
            e["WSRELAY_NATIVE_FAST_PATH"] = "0"
        if origin is not None:
            e["RELAY_ORIGIN"] = origin
        e.update(env or {})
        self.env = e
        self.args = args
        self.log: list[str] = []
        self.access: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tls_port = 0
        self.metrics_port = 0

    def start(self, wait_ready: bool = True) -> "Relay":
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "run", *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.log), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.access), daemon=True).start()
        if wait_ready:
            self.wait_log("ready:", timeout=20)
            m = re.search(r"listening on (?:\[[^\]]*\]|[^ :,]*):(\d+)", self.text())  # [::1]:N too
            self.port = int(m.group(1))
            m = re.search(r"listening on .*?:(\d+) \(TLS\)", self.text())
            self.tls_port = int(m.group(1)) if m else 0
            m = re.search(r"metrics on http://[^ ]*?:(\d+)/", self.text())
            self.metrics_port = int(m.group(1)) if m else 0
        return self

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line.decode(errors="replace").rstrip("\n"))
        stream.close()

    def text(self) -> str:
        return "\n".join(self.log)

    def wait_log(self, needle: str, timeout: float = 10.0, count: int = 1) -> None:
        def seen():
            if self.proc.poll() is not None and self.text().count(needle) < count:
                raise AssertionError(f"relay exited ({self.proc.returncode}) before logging {needle!r}:\n"
                                     + self.text())
            return self.text().count(needle) >= count
        wait_for(seen, timeout, what=f"log line {needle!r}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def worker_pids(self) -> dict[int, int]:
        """Live workers by index, from /proc (children of the supervisor)."""
        out = {}
        for m in re.finditer(r"worker (\d+) started \(pid (\d+)", self.text()):
            index, pid = int(m.group(1)), int(m.group(2))
            if _alive_child(pid, self.proc.pid):
                out[index] = pid
        return out

    def rss(self) -> int:
        """Sum of VmRSS of the workers, in bytes."""
        total = 0
        for pid in self.worker_pids().values():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def rss_growth(self, seconds: float, before: int | None = None) -> int:
        """How far the workers' RSS rose above ``before`` (now, if not given),
        in bytes, sampled every 0.1 s for ``seconds`` (a bound on memory under
        backpressure, which has no event to wait for)."""
        before = self.rss() if before is None else before
        peak = before
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, self.rss())
            time.sleep(0.1)
        return peak - before

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """Stop the relay (SIGTERM, then harder); fails when its log shows a traceback."""
        code = self._stop(timeout)
        self.check_log()
        return code

    def check_log(self) -> None:
        if not self.tracebacks and "Traceback" in self.text():
            self.tracebacks = True  # say it once
            raise AssertionError("the relay logged a traceback:\n" + self.text()[-4000:])

    def _stop(self, timeout: float) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                return self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()

    def __enter__(self) -> "Relay":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        try:
            self._stop(15.0)
        finally:
            # Workers are children of the supervisor; make sure none outlives a test.
            for pid in list(self.worker_pids().values()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if exc[0] is not None:
                # pytest shows a failed test's stdout: the relay's side of what went wrong
                print("the relay's log, last 80 lines:\n" + "\n".join(list(self.log)[-80:]))
        self.check_log()


def wsrelay_command() -> list[str]:
    """The installed ``wsrelay`` script when there is one (what the README runs), else ``python -m relay``."""
    script = os.path.join(os.path.dirname(sys.executable), "wsrelay")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "relay"]


class Demo:
    """``wsrelay demo`` as a user runs it, with ``env`` added to a clean environment."""

    def __init__(self, *args: str, env: dict | None = None):
        e = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        e.update(PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([*wsrelay_command(), "demo", *args], env=e, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        threading.Thread(target=Relay._pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 30) -> "Demo":
        def seen():
            if self.proc.poll() is not None:
                raise AssertionError(f"demo exited ({self.proc.returncode}):\n{self.text()}")
            return "wsrelay demo: try it:" in self.text()
        wait_for(seen, timeout, what="the demo's round trip")
        return self

    def url(self, what: str) -> str:
        pattern = {"ws": r"relay on (ws://\S+)", "page": r"open (http://\S+) in a browser",
                   "metrics": r"metrics on (http://\S+)"}[what]
        return re.search(pattern, self.text()).group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> "Demo":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive_child(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0] != b"Z" and int(fields[1]) == parent
    except (OSError, IndexError, ValueError):
        return False


class LoopThread:
    """An asyncio loop on a daemon thread, for origin servers the tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def run(coro, timeout: float = 60):
    """Run ``coro`` to completion on a fresh event loop, bounded by ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
