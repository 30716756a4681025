"""The supervisor: binds the listening sockets once, starts the workers, and
keeps them at their target through crashes, reloads and shutdown.

A worker is forked and at once execs a fresh interpreter (workers/child.py),
so each generation runs the wsrelay installed now: a ``SIGHUP`` after an
upgrade rolls the new version out, and nothing of the supervisor's state
outlives the exec but the descriptors handed over. The supervisor is
single-threaded, a plain ``selectors`` loop turning signals → reconcile →
reap: signal handlers only queue (workers/signals.py), the loop dispatches
``_on_<signal>``; one reconciler, :meth:`_manage`, starts whatever worker the
current generation lacks; :meth:`_reap` collects the dead.

An upgrade whose shared-memory layout differs cannot join the running
supervisor: its workers exit with :data:`workers.child.EXIT_LAYOUT` before
touching shared memory, and the reload is refused as a bad env file would be
(the running generation keeps serving; nothing restarts in a loop). Parts:
sockets and TLS (workers/listeners.py, tls.py), workers and restarts (workerset.py),
signals (signals.py), the client limit (cluster.py), origin health (health.py), status (status.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time

import msgspec

from metrics.source import History
from relay import __version__, native
from relay.config import RESTART_ONLY, Settings, load
from relay.errors import ConfigError
from relay.shared_memory import SharedState
from workers import child, cluster, pidfile, proctitle, systemd
from workers.health import Origins
from workers.listeners import Listeners
from workers.signals import SignalQueue
from workers.status import Status
from workers.workerset import Reload, Restarts, Worker, WorkerSet

log = logging.getLogger("wsrelay")

# A worker whose event loop has not turned for this long (its 1 s sweep stamps
# its heartbeat, metrics/counters.py) is stuck — a blocking call, a runaway loop — and
# serves nobody: it is killed and replaced, as gunicorn does with --timeout.
HUNG_AFTER = 10.0


class Supervisor:
    def __init__(self, settings: Settings, env_file: str | None = None, environ: dict | None = None,
                 on_ready=None):
        self.settings = settings
        self.env_file = env_file
        self.environ = environ
        self.on_ready = on_ready
        self.workers = WorkerSet()
        self.generation = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.reload: Reload | None = None  # a reload starting, until its generation accepts
        self.ready_once = False
        self.restarts = Restarts()
        self.history = History()  # counters of dead workers, per index
        self.sel = selectors.DefaultSelector()
        self.status = Status(self)
        self.listeners = Listeners(environ)
        self.exit_code = 0

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
        self.listeners.open(s)
        n = s.effective_workers()
        self.shared = SharedState(max(64, 4 * n), s.max_clients)
        self.origins = Origins(self.shared.nslots)
        self.origins.configure(s, self.generation, ())
        self.signals = SignalQueue(self.sel, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                                              signal.SIGQUIT))
        if s.metrics_listen is not None:
            self.status.start_endpoint(self.sel)
        self.limits = cluster.limits(s, self.shared)  # RELAY_MAX_CLIENTS, or a lease of the fleet's limit
        log.info("wsrelay %s listening on %s (%s), %d workers, origin %s, mode %s, %s",
                 __version__, self.listeners.names(),
                 "socket-activated" if self.listeners.activated else "bound", n,
                 ", ".join(str(o) for o in s.origin), s.mode, native.describe(s))
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
        self.status.close()
        self.origins.close()
        self.limits.close()
        return self.exit_code

    # -- signals --------------------------------------------------------------------
    def _dispatch_signals(self) -> None:
        while (sig := self.signals.pop()) is not None:
            if sig == signal.SIGHUP:
                self._on_hup()
            elif sig != signal.SIGCHLD:  # SIGCHLD only wakes the loop: _reap follows
                self._on_term(signal.Signals(sig).name, now=sig == signal.SIGQUIT)

    def _on_term(self, name: str, now: bool = False) -> None:
        if self.stopping or now:
            log.warning("%s: stopping now, closing every connection", name)
            self.stopping = True
            self.stop_deadline = min(self.stop_deadline or 1e18, time.monotonic() + 5)
            self.workers.signal(signal.SIGQUIT)
            return
        log.info("%s: draining, open connections get %gs", name, self.settings.drain_timeout)
        systemd.notify("STOPPING=1")
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.drain_timeout + 5
        self.listeners.close()
        self.workers.signal(signal.SIGTERM)
        for w in self.workers:
            w.draining = True

    def _on_hup(self) -> None:
        if self.stopping:
            return
        try:
            new = load(self.environ, self.env_file)
            self.origins.check(new, {w.generation for w in self.workers})
            self.listeners.prepare(new, reloading=self.reload is not None)
        except ConfigError as e:
            for line in e.lines:
                log.error("reload refused, still serving the running configuration: %s", line)
            self.status.reloaded(e.lines)
            return
        for name in RESTART_ONLY:
            if getattr(new, name) != getattr(self.settings, name):
                log.warning("RELAY_%s changes need a restart; keeping %s", name.upper(),
                            self.settings.to_dict()["RELAY_" + name.upper()] or "none")
        new = msgspec.structs.replace(new, **{name: getattr(self.settings, name) for name in RESTART_ONLY})
        before = self.reload.before if self.reload is not None else self.settings
        self.settings = new
        self.limits.configure(new)
        # The new generation inherits the supervisor's level (workers/child.py).
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        self.generation += 1
        self.origins.configure(new, self.generation, {w.generation for w in self.workers})
        self.reload = Reload(self.generation, before)
        self.restarts.reset(blocked_too=True)
        systemd.notify("RELOADING=1")
        log.info("SIGHUP: starting worker generation %d, then draining the old one", self.generation)

    # -- workers ----------------------------------------------------------------------
    def _manage(self) -> None:
        """Start every worker the current generation lacks, respecting backoff."""
        if self.stopping:
            return
        n = self.settings.effective_workers()
        have = {w.index for w in self.workers.of(self.generation)}
        now = time.monotonic()
        for index in range(n):
            if index not in have and self.restarts.may_start(index, now):
                self._spawn(index)

    def _spawn(self, index: int) -> None:
        slot = self.workers.free_slot(self.shared.nslots)
        if slot is None:
            log.error("no free worker slot (too many draining workers); retrying")
            self.restarts.delay(index, 1.0)
            return
        self.shared.reset_slot(slot)
        r, w = os.pipe()
        handoff = child.handoff(self.settings, index, slot, self.generation, self.shared, w,
                                self.listeners.current, self.origins.table.fd,
                                self.listeners.is_tls, self.listeners.tls.handoff())
        self.origins.table.slot_started(slot)
        argv, env = child.command(handoff)
        pid = os.fork()
        if pid == 0:  # the child: a fresh interpreter, keeping only what the hand-off names
            child.exec_worker(argv, env, handoff.fds())
        os.close(w)
        self.workers.add(Worker(pid, index, slot, self.generation, r))
        self.sel.register(r, selectors.EVENT_READ, self._worker_ready)
        log.info("worker %d started (pid %d, generation %d)", index, pid, self.generation)

    def _worker_ready(self, fd, _ev) -> None:
        try:
            data = os.read(fd, 16)
        except OSError:
            data = b""
        w = self.workers.with_ready_fd(fd)
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
        current = self.workers.of(self.generation)
        n = self.settings.effective_workers()
        if len(current) < n or not all(w.ready for w in current):
            return
        if not self.ready_once:
            self.ready_once = True
            systemd.notify("READY=1\nSTATUS=accepting")
            log.info("ready: %d workers accepting", n)
            if self.on_ready is not None:
                self.on_ready(self)
        if self.reload is not None:
            self.reload = None
            old = [w for w in self.workers if w.generation != self.generation and not w.draining]
            for w in old:
                w.draining = True
            # SIGUSR1, not SIGTERM: the worker drains alike, but in frames mode
            # tells its clients 1012 Service Restart instead of 1001 Going Away.
            self.workers.signal(signal.SIGUSR1, only=lambda w: w in old)
            self.listeners.commit()
            systemd.notify("READY=1\nSTATUS=reloaded")
            log.info("reload: generation %d accepting, draining %d old workers", self.generation, len(old))
            self.status.reloaded([])

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid)
            if w is None:
                continue
            if w.ready_fd >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(w.ready_fd)
                os.close(w.ready_fd)
            self._retire(w)
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if w.draining or self.stopping:
                log.info("worker %d (pid %d) finished (%s)", w.index, pid, how)
                continue
            if code in child.INCOMPATIBLE and w.generation == self.generation:
                self._incompatible(w, child.INCOMPATIBLE[code])
                continue
            lived = time.monotonic() - w.started
            delay = self.restarts.died(w.index, lived)
            log.error("worker %d (pid %d) died (%s) after %.1fs; restarting in %.1fs",
                      w.index, pid, how, lived, delay)

    def _incompatible(self, w: Worker, reason: str) -> None:
        """A worker of the current generation runs code that cannot join this
        supervisor: refuse the reload that started it, never restart it in a loop."""
        if self.reload is not None:
            log.error("reload refused, still serving the running generation: %s", reason)
            self.status.reloaded([reason])
            failed = self.workers.of(self.generation)
            for x in failed:
                x.draining = True
            self.workers.signal(signal.SIGTERM, only=lambda x: x in failed)
            self.settings = prev = self.reload.before
            self.listeners.rollback(prev)
            self.limits.configure(prev)
            self.origins.configure(prev, self.generation, {x.generation for x in self.workers})
            # The running workers are the current generation again.
            for x in self.workers:
                if not x.draining:
                    x.generation = self.generation
            self.reload = None
            self.restarts.reset()
            systemd.notify("READY=1\nSTATUS=reload refused: the upgrade needs a restart")
        elif not self.ready_once:
            log.error("cannot start: %s", reason)
            self.exit_code = 1
            self.stopping = True
            self.stop_deadline = time.monotonic() + 5
            self.workers.signal(signal.SIGQUIT)
        else:  # a restart, after the upgrade was installed: leave the index down
            if not self.restarts.blocked:
                log.error("worker %d (pid %d) cannot be replaced until the next SIGHUP: %s",
                          w.index, w.pid, reason)
            self.restarts.blocked.add(w.index)

    def _retire(self, w: Worker) -> None:
        """Fold a dead worker's counters into its index's history, give back its clients."""
        self.history.fold(w.index, self.shared.values(w.slot))
        self.shared.reset_slot(w.slot)
        self.origins.table.retire_slot(w.slot)

    # -- timers ------------------------------------------------------------------------
    def _timeout(self) -> float:
        now = time.monotonic()
        t = 1.0
        due = self.restarts.due_in(now, {w.index for w in self.workers.of(self.generation)})
        if due is not None:
            t = min(t, max(0.0, due))
        if self.watchdog:
            t = min(t, max(0.0, self.next_watchdog - now))
        if self.stopping:
            t = min(t, 0.2)
        return t

    def _tick(self) -> None:
        self.listeners.tls.tick(now := time.monotonic())  # ticket key rotation (workers/tls.py)
        self.status.expire()
        fresh, stuck = self.workers.check_heartbeats(lambda w: self.shared.counters(w.slot).last_heartbeat,
                                                     now, HUNG_AFTER)
        for w, silent in stuck:
            log.error("worker %d (pid %d) unresponsive for %.0fs (its event loop is blocked): killing it",
                      w.index, w.pid, silent)
            w.killed = True
            self.workers.signal(signal.SIGKILL, only=lambda x: x is w)
        if self.watchdog and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog
            # systemd restarts the whole service only when no worker is serving:
            # a single stuck one is replaced above.
            if fresh:
                systemd.notify("WATCHDOG=1")
        if self.stopping and self.workers and now > self.stop_deadline:
            log.warning("drain deadline passed: killing %d workers", len(self.workers))
            self.workers.signal(signal.SIGKILL)
            self.stop_deadline = now + 5
