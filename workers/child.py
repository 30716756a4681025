"""A worker's entry point: the supervisor forks, and the child at once execs
``python -P -m workers.child``. Every worker — each generation a ``SIGHUP``
starts, each restart — is a fresh interpreter running the wsrelay installed
on disk *now*, not the code the supervisor imported when it started, so a
reload is also how an upgrade rolls out (README: "Deploying", the upgrade row).

What crosses the exec is explicit: a :class:`Handoff`, JSON in the
``WSRELAY_WORKER`` environment variable, and the descriptors it names (the
listening sockets, the shared memory, the ready pipe), which the child makes
inheritable between fork and exec (:func:`exec_worker`). Everything else the
supervisor holds is close-on-exec and never reaches a worker.

The supervisor that wrote the hand-off may be older than the code reading it.
Before touching anything shared, the worker checks it can: it exits with

- :data:`EXIT_HANDOFF` when the hand-off, or the settings in it, no longer
  decode (or name another :data:`PROTOCOL`);
- :data:`EXIT_LAYOUT` when :func:`relay.shared_memory.fingerprint` differs: the
  installed version lays out shared memory differently.

The supervisor treats both as a refused reload. The two numbers are a
contract between versions: never renumber them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from typing import NoReturn

import msgspec

from relay import __version__, logs, shared_memory
from relay.config import Settings
from relay.origins.table import OriginTable

log = logging.getLogger("wsrelay.worker")

ENV = "WSRELAY_WORKER"
PROTOCOL = 1
EXIT_HANDOFF = 76   # EX_PROTOCOL
EXIT_LAYOUT = 78    # EX_CONFIG
#: what the supervisor logs when a worker exits with one of them
INCOMPATIBLE = {
    EXIT_LAYOUT: "the installed wsrelay changed the shared-memory layout; "
                 "this upgrade needs `systemctl restart wsrelay`",
    EXIT_HANDOFF: "the installed wsrelay cannot read this supervisor's worker hand-off; "
                  "this upgrade needs `systemctl restart wsrelay`",
}


class Handoff(msgspec.Struct, frozen=True):
    """Everything a worker gets from its supervisor besides its environment."""

    protocol: int
    index: int
    slot: int
    generation: int
    nslots: int
    shared_fd: int
    origins_fd: int        # relay/origins/table.py
    ready_fd: int
    sockets: tuple[int, ...]
    layout: str            # the supervisor's relay.shared_memory.fingerprint()
    log_level: int         # the supervisor's root logger level
    settings: msgspec.Raw  # relay.config.Settings, decoded after the layout check
    # TLS (workers/tls.py): which of ``sockets`` serve TLS, each certificate's
    # chain + key and the client CA as sealed memfds, the ticket key store.
    tls: tuple[bool, ...] = ()
    tls_cert_fds: tuple[int, ...] = ()
    tls_names: tuple[tuple[str, ...], ...] = ()
    tls_ca_fd: int = -1
    tls_keys_fd: int = -1

    def fds(self) -> tuple[int, ...]:
        tls = (*self.tls_cert_fds, *(fd for fd in (self.tls_ca_fd, self.tls_keys_fd) if fd >= 0))
        return (self.shared_fd, self.origins_fd, self.ready_fd, *self.sockets, *tls)


# -- the supervisor's side ------------------------------------------------------------

def handoff(settings: Settings, index: int, slot: int, generation: int, state: shared_memory.SharedState,
            ready_fd: int, socks: list[socket.socket], origins_fd: int, tls_flags: list[bool] | None = None,
            tls: dict | None = None) -> Handoff:
    return Handoff(protocol=PROTOCOL, index=index, slot=slot, generation=generation, nslots=state.nslots,
                   shared_fd=state.fd, origins_fd=origins_fd, ready_fd=ready_fd,
                   sockets=tuple(s.fileno() for s in socks),
                   layout=shared_memory.fingerprint(), log_level=logging.getLogger().getEffectiveLevel(),
                   settings=msgspec.Raw(msgspec.json.encode(settings)),
                   tls=tuple(tls_flags or ()), **(tls or {}))


def command(h: Handoff) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the worker, built before the fork."""
    flags = subprocess._args_from_interpreter_flags()  # -O, -X dev, -W ...: as the supervisor runs
    if "-I" not in flags and "-P" not in flags:
        flags.append("-P")  # never the current directory first on sys.path: the installed package
    env = dict(os.environ)
    env[ENV] = msgspec.json.encode(h).decode()
    root = _import_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return [sys.executable, *flags, "-m", "workers.child"], env


def _import_root() -> str | None:
    """The directory this package was imported from, if a new interpreter would
    not find it by itself (the supervisor found it as sys.path[0]: its current
    directory or its script's; a worker starts with -P, without either)."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import site

    found = list(site.getsitepackages()) + [site.getusersitepackages()]
    found += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if any(p and os.path.realpath(p) == root for p in found):
        return None
    return root


def exec_worker(argv: list[str], env: dict[str, str], fds: tuple[int, ...]) -> NoReturn:
    """In the forked child: keep ``fds`` across the exec, become the worker."""
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's wake-up socket is not ours
        # Ignored stays ignored across exec: Ctrl-C reaches the whole process
        # group, and the supervisor decides what a worker does about it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for fd in fds:
            os.set_inheritable(fd, True)
        os.execve(argv[0], argv, env)
    except BaseException as e:  # noqa: BLE001 - never return into the supervisor's code
        try:
            os.write(2, f"wsrelay: cannot start a worker ({argv[0]}): {e}\n".encode(errors="replace"))
        finally:
            os._exit(1)
    os._exit(1)  # not reached: execve returns only by raising


# -- the worker's side ------------------------------------------------------------------

def main() -> int:
    try:
        h = msgspec.json.decode(os.environ.pop(ENV, ""), type=Handoff)
        if h.protocol != PROTOCOL:
            raise ValueError(f"hand-off protocol {h.protocol}, this version speaks {PROTOCOL}")
    except (msgspec.DecodeError, ValueError) as e:  # msgspec.ValidationError is a DecodeError
        logs.setup("info")
        log.error("worker (pid %d): cannot read the supervisor's hand-off: %s", os.getpid(), e)
        return EXIT_HANDOFF
    logs.setup("info")
    logging.getLogger().setLevel(h.log_level)
    mine = shared_memory.fingerprint()
    if h.layout != mine:
        log.error("worker %d (pid %d): wsrelay %s lays out shared memory as %s, the supervisor as %s",
                  h.index, os.getpid(), __version__, mine, h.layout)
        return EXIT_LAYOUT
    from workers import proctitle

    proctitle.set(f"wsrelay: worker {h.index} (generation {h.generation})")
    try:
        settings = msgspec.json.decode(h.settings, type=Settings)
    except msgspec.DecodeError as e:
        log.error("worker %d (pid %d): cannot read the supervisor's settings: %s", h.index, os.getpid(), e)
        return EXIT_HANDOFF
    try:
        for fd in h.fds():
            os.set_inheritable(fd, False)
        state = shared_memory.SharedState.attach(h.shared_fd, h.nslots)
        origins = OriginTable.attach(h.origins_fd, h.nslots)
        socks = [socket.socket(fileno=fd) for fd in h.sockets]
        log.info("worker %d (pid %d) running wsrelay %s, generation %d", h.index, os.getpid(), __version__,
                 h.generation)
        from workers import worker

        return worker.run(settings, socks, h.index, h.slot, state, h.ready_fd, origins, h)
    except BaseException:  # noqa: BLE001 - report and exit with 1
        log.exception("worker %d failed", h.index)
        return 1


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except BaseException:  # noqa: BLE001 - say why, then exit 1
        log.exception("worker (pid %d) failed to start", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)
