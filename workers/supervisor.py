"""The supervisor: binds the listening sockets once, starts the workers, and
keeps them at their target through crashes, reloads and shutdown.

A worker is forked and at once execs a fresh interpreter
(:mod:`workers.child`), so each generation runs the wsrelay installed now: a
``SIGHUP`` after an upgrade rolls the new version out. Fork safety is therefore
trivially true: nothing of the supervisor's state outlives the
exec but the descriptors handed over. The supervisor still stays
single-threaded with no event loop — a plain ``selectors`` loop. Signal
handlers only queue the signal; the loop dispatches ``_on_<signal>``. One
reconciler, :meth:`_manage`, starts whatever worker the current generation
lacks.

An upgrade whose shared-memory layout differs cannot join the running
supervisor: its workers exit with :data:`workers.child.EXIT_LAYOUT` before
touching shared memory, and the reload is refused as a bad env file would be
(the running generation keeps serving; nothing restarts in a loop).

Why one inherited listening socket and not one per worker: with a socket
per worker the kernel hashes each connection to one worker's queue, and the
connections queued on a worker that exits are reset. With one socket shared by
every worker, a worker that stops accepting leaves its queue to the others, so
drains and reloads drop nothing; each worker accepts from the shared queue
whenever its loop is free, which spreads load by actual availability
(measured in tests/test_lifecycle.py). The socket is bound without
SO_REUSEPORT, so no other process can join it (workers/listening.py).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import time

import msgspec

from metrics import layout
from relay import __version__
from relay.config import Address, Settings, load
from relay.errors import ConfigError
from relay.shared import SharedState
from workers import child, listening, pidfile, proctitle, systemd

log = logging.getLogger("wsrelay")

RESTART_BACKOFF_MAX = 10.0
HEALTHY_AFTER = 5.0  # a worker that lived this long resets its backoff
# A worker whose event loop has not turned for this long (its 1 s sweep stamps
# metrics.layout.HEARTBEAT) is stuck — a blocking call, a runaway loop — and
# serves nobody: it is killed and replaced, as gunicorn does with --timeout.
HUNG_AFTER = 10.0
#: Exit codes of a worker that cannot join this supervisor (workers/child.py).
INCOMPATIBLE = {
    child.EXIT_LAYOUT: "the installed wsrelay changed the shared-memory layout; "
                       "this upgrade needs `systemctl restart wsrelay`",
    child.EXIT_HANDOFF: "the installed wsrelay cannot read this supervisor's worker hand-off; "
                        "this upgrade needs `systemctl restart wsrelay`",
}


class Worker:
    __slots__ = ("pid", "index", "slot", "generation", "ready", "started", "ready_fd", "draining", "killed")

    def __init__(self, pid: int, index: int, slot: int, generation: int, ready_fd: int):
        self.pid = pid
        self.index = index
        self.slot = slot
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        self.ready_fd = ready_fd
        self.killed = False
        self.draining = False


def bind(settings: Settings, held: dict[socket.socket, Address | None] | None = None) -> list[socket.socket]:
    """One listening socket per ``RELAY_LISTEN`` address: the one in ``held``
    (socket -> its address) when this relay serves that address already — a
    reload's new generation inherits it — else a new one, never shared with
    another process (workers/listening.py). Raises :class:`ConfigError` naming
    the address when one cannot be bound; nothing bound here is then kept."""
    reuse = {addr: sock for sock, addr in (held or {}).items() if addr is not None}
    socks: list[socket.socket] = []
    fresh: list[socket.socket] = []
    try:
        for addr in settings.listen:
            sock = reuse.get(addr)
            if sock is None:
                try:
                    sock = listening.bind(addr, settings.backlog)
                except OSError as e:
                    if held and listening.holder(addr.port, pids=[str(os.getpid())]):
                        raise ConfigError([f"RELAY_LISTEN: {addr} overlaps an address this relay serves now; "
                                           f"moving between overlapping addresses needs a restart"]) from None
                    line = listening.why("RELAY_LISTEN", addr, e)
                    if e.errno == errno.EADDRINUSE:
                        line += ": refusing to share it with another process; stop that one or choose another address"
                    raise ConfigError([line]) from None
                fresh.append(sock)
            socks.append(sock)
    except ConfigError:
        for sock in fresh:
            sock.close()
        raise
    return socks


class Supervisor:
    def __init__(self, settings: Settings, env_file: str | None = None, environ: dict | None = None,
                 on_ready=None):
        self.settings = settings
        self.env_file = env_file
        self.environ = environ
        self.on_ready = on_ready
        self.workers: dict[int, Worker] = {}  # pid -> worker
        self.generation = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.reloading = False
        self.ready_once = False
        self.restarts = 0
        self.failures: dict[int, int] = {}   # index -> consecutive early deaths
        self.not_before: dict[int, float] = {}  # index -> earliest restart time
        self.history: dict[int, list[float]] = {}  # index -> counters of dead workers
        self.signals: list[int] = []
        self.sel = selectors.DefaultSelector()
        self.endpoint = None
        self.socks: list[socket.socket] = []   # the newest generation's listening sockets
        self.running: list[socket.socket] = []  # those of the generation serving during a reload
        self.held: dict[socket.socket, Address | None] = {}  # every one we hold -> its address
        self.listen_key = settings.listen
        self.before_reload = settings  # what a refused upgrade goes back to
        self.blocked: set[int] = set()  # indices whose worker cannot join, until the next SIGHUP
        self.exit_code = 0
        self.started_at = time.time()
        self.reloads = 0  # finished reloads, applied or refused: what /config's "last_reload" counts
        self.last_reload: dict | None = None

    # -- public -------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit code. Raises ConfigError when it
        cannot start (an address or the pid file is taken)."""
        proctitle.set("wsrelay: supervisor")
        pid_file = self.settings.pid_file
        if pid_file:
            pidfile.claim(pid_file)
        try:
            return self._run()
        finally:
            if pid_file:
                pidfile.release(pid_file)

    def _run(self) -> int:
        s = self.settings
        activated = systemd.listen_fds()
        self.socks = activated or bind(s)
        for sock in self.socks:
            sock.setblocking(False)
        self.held = dict.fromkeys(activated) if activated else dict(zip(self.socks, s.listen))
        self.running = self.socks
        n = s.effective_workers()
        self.shared = SharedState(max(64, 4 * n), s.max_clients)
        self._install_signals()
        if s.metrics_listen is not None:
            self._start_endpoint(s)
        names = ", ".join(_sockname(x) for x in self.socks)
        log.info("wsrelay %s listening on %s (%s), %d workers, origin %s, mode %s",
                 __version__, names, "socket-activated" if activated else "bound", n,
                 ", ".join(str(o) for o in s.origin), s.mode)
        self.watchdog = systemd.watchdog_interval()
        self.next_watchdog = time.monotonic()
        self._manage()
        while True:
            timeout = self._timeout()
            for key, ev in self.sel.select(timeout):
                key.data(key.fileobj, ev)
            self._dispatch_signals()
            self._reap()
            self._manage()
            self._tick()
            if self.stopping and not self.workers:
                break
        log.info("wsrelay stopped")
        if self.endpoint is not None:
            self.endpoint.close()
        return self.exit_code

    @property
    def port(self) -> int:
        return self.socks[0].getsockname()[1]

    # -- signals --------------------------------------------------------------------
    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self.sel.register(r, selectors.EVENT_READ, self._drain_wakeup)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum, _frame) -> None:
        self.signals.append(signum)  # nothing else here: the loop does the work

    def _drain_wakeup(self, sock, _ev) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _dispatch_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._on_term(signal.Signals(sig).name)
            elif sig == signal.SIGQUIT:
                self._on_term("SIGQUIT", now=True)
            elif sig == signal.SIGHUP:
                self._on_hup()

    def _on_term(self, name: str, now: bool = False) -> None:
        if self.stopping or now:
            log.warning("%s: stopping now, closing every connection", name)
            self.stopping = True
            self.stop_deadline = min(self.stop_deadline or 1e18, time.monotonic() + 5)
            self._signal_all(signal.SIGQUIT)
            return
        log.info("%s: draining, open connections get %gs", name, self.settings.drain_timeout)
        systemd.notify("STOPPING=1")
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.drain_timeout + 5
        # Close our copy of the listening sockets: once the workers close
        # theirs, new connection attempts are refused instead of queued.
        self._close_socks(keep=())
        self._signal_all(signal.SIGTERM)
        for w in self.workers.values():
            w.draining = True

    def _on_hup(self) -> None:
        if self.stopping:
            return
        try:
            new = load(self.environ, self.env_file)
        except ConfigError as e:
            for line in e.lines:
                log.error("reload refused, still serving the running configuration: %s", line)
            self._reloaded(e.lines)
            return
        if not self.reloading:
            self.before_reload = self.settings
        if new.listen != self.listen_key:
            try:
                socks = bind(new, self.held)
            except ConfigError as e:
                log.error("reload refused, still serving the running configuration: %s", e)
                self._reloaded(e.lines)
                return
            for addr, sock in zip(new.listen, socks):
                self.held.setdefault(sock, addr)
            if not self.reloading:
                self.running = self.socks
            # A reload still starting may have bound sockets that neither the
            # running generation nor this one uses: close them now.
            self._close_socks(keep=(*self.running, *socks))
            self.socks = socks
            self.listen_key = new.listen
        if new.metrics_listen != self.settings.metrics_listen:
            log.warning("RELAY_METRICS_LISTEN changes need a restart; keeping %s", self.settings.metrics_listen)
        if new.pid_file != self.settings.pid_file:
            log.warning("RELAY_PID_FILE changes need a restart; keeping %s", self.settings.pid_file or "none")
        new = msgspec.structs.replace(new, metrics_listen=self.settings.metrics_listen,
                                      pid_file=self.settings.pid_file)
        self.settings = new
        self.shared.limit = new.max_clients
        # The new generation inherits the supervisor's level (workers/child.py).
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        self.generation += 1
        self.reloading = True
        self.failures.clear()
        self.not_before.clear()
        self.blocked.clear()
        systemd.notify("RELOADING=1")
        log.info("SIGHUP: starting worker generation %d, then draining the old one", self.generation)

    def _reloaded(self, problems: list[str]) -> None:
        """Record how the last SIGHUP ended, for /config and `wsrelay status`."""
        self.reloads += 1
        self.last_reload = {"count": self.reloads, "time": _iso(time.time()),
                            "result": "refused" if problems else "applied", "problems": problems}

    def config(self) -> bytes:
        """``/config``: what runs now. ``settings`` are the current generation's
        (the one starting, while ``reloading``), secrets redacted."""
        return msgspec.json.encode({
            "version": __version__, "pid": os.getpid(), "started": _iso(self.started_at),
            "generation": self.generation, "reloading": self.reloading, "env_file": self.env_file,
            "last_reload": self.last_reload,
            "workers": [{"index": w.index, "pid": w.pid, "generation": w.generation, "ready": w.ready,
                         "draining": w.draining} for w in sorted(self.workers.values(),
                                                                 key=lambda w: (w.generation, w.index))],
            "settings": self.settings.to_dict()})

    def _close_socks(self, keep) -> None:
        """Close every listening socket we hold but those in ``keep``."""
        for sock in list(self.held):
            if not any(sock is k for k in keep):
                del self.held[sock]
                sock.close()

    def _signal_all(self, sig: int, only=None) -> None:
        for w in self.workers.values():
            if only is None or only(w):
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass

    # -- workers ----------------------------------------------------------------------
    def _manage(self) -> None:
        """Start every worker the current generation lacks, respecting backoff."""
        if self.stopping:
            return
        n = self.settings.effective_workers()
        have = {w.index for w in self.workers.values() if w.generation == self.generation}
        now = time.monotonic()
        for index in range(n):
            if index not in have and index not in self.blocked and now >= self.not_before.get(index, 0.0):
                self._spawn(index)

    def _spawn(self, index: int) -> None:
        used = {w.slot for w in self.workers.values()}
        slot = next((i for i in range(self.shared.nslots) if i not in used), None)
        if slot is None:
            log.error("no free worker slot (too many draining workers); retrying")
            self.not_before[index] = time.monotonic() + 1
            return
        self.shared.reset_slot(slot)
        r, w = os.pipe()
        handoff = child.handoff(self.settings, index, slot, self.generation, self.shared, w, self.socks)
        argv, env = child.command(handoff)
        pid = os.fork()
        if pid == 0:  # the child: a fresh interpreter, keeping only what the hand-off names
            child.exec_worker(argv, env, handoff.fds())
        os.close(w)
        self.workers[pid] = Worker(pid, index, slot, self.generation, r)
        self.sel.register(r, selectors.EVENT_READ, self._worker_ready)
        log.info("worker %d started (pid %d, generation %d)", index, pid, self.generation)

    def _worker_ready(self, fd, _ev) -> None:
        try:
            data = os.read(fd, 16)
        except OSError:
            data = b""
        w = next((w for w in self.workers.values() if w.ready_fd == fd), None)
        self.sel.unregister(fd)
        if w is None:
            os.close(fd)
            return
        if data:
            w.ready = True
            log.debug("worker %d (pid %d) ready %.0f ms after its fork", w.index, w.pid,
                      1000 * (time.monotonic() - w.started))
        os.close(fd)
        w.ready_fd = -1
        self._check_generation_ready()

    def _check_generation_ready(self) -> None:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        n = self.settings.effective_workers()
        if len(current) < n or not all(w.ready for w in current):
            return
        if not self.ready_once:
            self.ready_once = True
            systemd.notify("READY=1\nSTATUS=accepting")
            log.info("ready: %d workers accepting", n)
            if self.on_ready is not None:
                self.on_ready(self)
        if self.reloading:
            self.reloading = False
            old = [w for w in self.workers.values() if w.generation != self.generation and not w.draining]
            for w in old:
                w.draining = True
            # SIGUSR1, not SIGTERM: the worker drains alike, but in frames mode
            # tells its clients 1012 Service Restart instead of 1001 Going Away.
            self._signal_all(signal.SIGUSR1, only=lambda w: w in old)
            self._close_socks(keep=self.socks)
            self.running = self.socks
            systemd.notify("READY=1\nSTATUS=reloaded")
            log.info("reload: generation %d accepting, draining %d old workers", self.generation, len(old))
            self._reloaded([])

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            if w.ready_fd >= 0:
                try:
                    self.sel.unregister(w.ready_fd)
                except (KeyError, ValueError):
                    pass
                os.close(w.ready_fd)
            self._retire(w)
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if w.draining or self.stopping:
                log.info("worker %d (pid %d) finished (%s)", w.index, pid, how)
                continue
            if code in INCOMPATIBLE and w.generation == self.generation:
                self._incompatible(w, INCOMPATIBLE[code])
                continue
            lived = time.monotonic() - w.started
            fails = self.failures.get(w.index, 0) + 1 if lived < HEALTHY_AFTER else 0
            self.failures[w.index] = fails
            delay = min(RESTART_BACKOFF_MAX, 0.1 * 2 ** (fails - 1)) if fails else 0.0
            self.not_before[w.index] = time.monotonic() + delay
            self.restarts += 1
            log.error("worker %d (pid %d) died (%s) after %.1fs; restarting in %.1fs",
                      w.index, pid, how, lived, delay)

    def _incompatible(self, w: Worker, reason: str) -> None:
        """A worker of the current generation runs code that cannot join this
        supervisor: refuse the reload that started it, never restart it in a loop."""
        if self.reloading:
            log.error("reload refused, still serving the running generation: %s", reason)
            self._reloaded([reason])
            failed = [x for x in self.workers.values() if x.generation == self.generation]
            for x in failed:
                x.draining = True
            self._signal_all(signal.SIGTERM, only=lambda x: x in failed)
            prev = self.before_reload
            self._close_socks(keep=self.running)
            self.socks = self.running
            self.settings, self.listen_key = prev, prev.listen
            self.shared.limit = prev.max_clients
            # The running workers are the current generation again.
            for x in self.workers.values():
                if not x.draining:
                    x.generation = self.generation
            self.reloading = False
            self.failures.clear()
            self.not_before.clear()
            systemd.notify("READY=1\nSTATUS=reload refused: the upgrade needs a restart")
        elif not self.ready_once:
            log.error("cannot start: %s", reason)
            self.exit_code = 1
            self.stopping = True
            self.stop_deadline = time.monotonic() + 5
            self._signal_all(signal.SIGQUIT)
        else:  # a restart, after the upgrade was installed: leave the index down
            if not self.blocked:
                log.error("worker %d (pid %d) cannot be replaced until the next SIGHUP: %s",
                          w.index, w.pid, reason)
            self.blocked.add(w.index)

    def _retire(self, w: Worker) -> None:
        """Fold a dead worker's counters into its index's history, give back its clients."""
        counters = self.shared.values(w.slot)
        hist = self.history.setdefault(w.index, [0.0] * layout.SIZE)
        for i in range(layout.SIZE):
            if i not in layout.GAUGES:
                hist[i] += counters[i]
        self.shared.reset_slot(w.slot)

    # -- timers ------------------------------------------------------------------------
    def _timeout(self) -> float:
        now = time.monotonic()
        t = 1.0
        if self.not_before:
            pending = [v - now for i, v in self.not_before.items()
                       if v > now and i not in {w.index for w in self.workers.values()
                                                if w.generation == self.generation}]
            if pending:
                t = min(t, max(0.0, min(pending)))
        if self.watchdog:
            t = min(t, max(0.0, self.next_watchdog - now))
        if self.stopping:
            t = min(t, 0.2)
        return t

    def _tick(self) -> None:
        now = time.monotonic()
        if self.endpoint is not None:
            self.endpoint.expire()
        fresh = False
        for w in list(self.workers.values()):
            if not w.ready or w.killed:
                continue
            silent = now - self.shared.counters(w.slot).last_heartbeat
            if silent < HUNG_AFTER:
                fresh = True
                continue
            log.error("worker %d (pid %d) unresponsive for %.0fs (its event loop is blocked): killing it",
                      w.index, w.pid, silent)
            w.killed = True
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.watchdog and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog
            # systemd restarts the whole service only when no worker is serving:
            # a single stuck one is replaced above.
            if fresh:
                systemd.notify("WATCHDOG=1")
        if self.stopping and self.workers and now > self.stop_deadline:
            log.warning("drain deadline passed: killing %d workers", len(self.workers))
            self._signal_all(signal.SIGKILL)
            self.stop_deadline = now + 5

    # -- metrics --------------------------------------------------------------------------
    def _start_endpoint(self, s: Settings) -> None:
        from prometheus_client import CollectorRegistry

        from metrics.collector import RelayCollector
        from metrics.endpoint import Endpoint

        registry = CollectorRegistry(auto_describe=False)
        registry.register(RelayCollector(_MetricsSource(self)))
        addr = s.metrics_listen
        try:
            self.endpoint = Endpoint.bind(addr.host, addr.port, registry=registry,
                                          healthy=self.healthy, ready=self.ready, config=self.config)
        except OSError as e:
            raise ConfigError([listening.why("RELAY_METRICS_LISTEN", addr, e)]) from None
        self.endpoint.register(self.sel)
        log.info("metrics on http://%s:%d/metrics", addr.host, self.endpoint.port)

    def healthy(self) -> bool:
        return any(True for _ in self.workers)

    def ready(self) -> bool:
        """``/readyz``: a worker accepts and the relay is not draining. Not
        every worker: the first one serves (upgrades get their 101) while its
        siblings start; systemd's ``READY=1`` still waits for all of them."""
        return not self.stopping and any(w.ready and not w.draining for w in self.workers.values())


class _MetricsSource:
    """What the collector reads: live slots plus the history of dead workers."""

    version = __version__

    def __init__(self, sup: Supervisor):
        self.sup = sup

    def per_worker(self) -> dict[str, list[float]]:
        sup = self.sup
        out: dict[int, list[float]] = {}
        for index in range(sup.settings.effective_workers()):
            out[index] = list(sup.history.get(index, [0.0] * layout.SIZE))
        for index, hist in sup.history.items():
            out.setdefault(index, list(hist))
        for w in sup.workers.values():
            counters = sup.shared.values(w.slot)
            acc = out.setdefault(w.index, [0.0] * layout.SIZE)
            for i in range(layout.SIZE):
                acc[i] += counters[i]
        return {str(i): v for i, v in sorted(out.items())}

    def clients(self) -> int:
        return self.sup.shared.total_clients()

    def limit(self) -> int:
        return self.sup.shared.limit

    def restarts(self) -> int:
        return self.sup.restarts

    def processes(self) -> dict[str, tuple[float, float, float]]:
        out: dict[int, list[float]] = {}
        tick = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        for w in self.sup.workers.values():
            try:
                with open(f"/proc/{w.pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                rss = int(fields[21]) * page
                cpu = (int(fields[11]) + int(fields[12])) / tick
                fds = len(os.listdir(f"/proc/{w.pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue
            acc = out.setdefault(w.index, [0.0, 0.0, 0.0])
            acc[0] += rss
            acc[1] += cpu
            acc[2] += fds
        return {str(i): tuple(v) for i, v in sorted(out.items())}  # type: ignore[misc]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
