"""A worker process: one uvloop event loop serving the inherited listening
sockets until the supervisor asks it to drain — SIGTERM for a shutdown,
SIGUSR1 for a reload (its generation is being replaced) — or to stop at once
(SIGQUIT).

Draining: stop accepting at once (the supervisor and the other workers still
hold the listening socket, so nothing queued is reset), close idle keep-alive
connections, give open tunnels ``RELAY_DRAIN_TIMEOUT`` to end by themselves,
then close what is left. In tunnel mode both signals drain alike. In frames
mode the signal says which Close the clients get — 1001 Going Away on
shutdown, 1012 Service Restart on reload (the origins get 1001 either way) —
and the closes are spread evenly over the first ``DRAIN_SPREAD`` of the
window (relay/frames_tunnel.py), so the clients reconnect as a trickle; the
rest of the window is for their answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import uvloop

from relay.client import ClientConnection
from relay.config import Settings
from relay.context import Context
from relay.frames_tunnel import GOING_AWAY, SERVICE_RESTART
from relay.origins.table import OriginTable
from relay.shared_memory import Admission, SharedState
from workers.accept import Acceptor

log = logging.getLogger("wsrelay.worker")


def run(settings: Settings, socks: list[socket.socket], index: int, slot: int,
        shared: SharedState, ready_fd: int, origins: OriginTable, handoff=None) -> int:
    """Serve until drained; returns the exit code. Called by workers/child.py in
    a fresh interpreter the supervisor forked and exec'd."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    # SIGINT from a terminal reaches the whole process group: the supervisor
    # decides what happens, the worker waits for its word.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(settings, socks, index, slot, shared, ready_fd, origins, handoff))
    finally:
        loop.close()


def head_phase(ctx: Context, is_tls: bool) -> str:
    """Who reads the request heads of a listener's connections: ``"native"``
    (relay/native/front.py: accept and the head phase in C) when the native
    data plane serves this worker's tunnels (tunnel mode) and
    :func:`relay.native.head_phase_serves` says so for the listener's kind;
    ``"python"`` (workers/accept.py and relay/client.py) otherwise."""
    if ctx.native is None:
        return "python"
    from relay import native

    return "native" if native.head_phase_serves(ctx.settings, is_tls) else "python"


async def _serve(settings: Settings, socks: list[socket.socket], index: int, slot: int,
                 shared: SharedState, ready_fd: int, origins: OriginTable, handoff=None) -> int:
    fault = os.environ.get("WSRELAY_FAULT")
    if fault == "crash-on-start":
        # Fault injection for tests and chaos drills: a worker that cannot start.
        raise RuntimeError("WSRELAY_FAULT=crash-on-start")
    if fault == "slow-start" and index > 0:
        # ... or every worker but the first one slow to start (5 s).
        await asyncio.sleep(5)
    loop = asyncio.get_running_loop()
    ctx = Context(settings, index, Admission(shared, slot, settings.max_clients_per_ip, settings.per_ip_v6_prefix),
                  shared.counters(slot), origins, slot)
    # Our own accept loop, not loop.create_server: see workers/accept.py (EMFILE).
    for sock in socks:
        sock.listen(settings.backlog)  # a reload may change RELAY_BACKLOG on the same socket
    siblings = tuple(shared.counters(i) for i in range(shared.nslots) if i != slot)
    flags = tuple(handoff.tls) if handoff is not None and handoff.tls else (False,) * len(socks)
    tls = tls_server(settings, handoff, ctx) if any(flags) else None

    def factory(is_tls: bool):
        # Which listener a connection came from decides what it needs: the TLS
        # contexts (and X-Forwarded-Proto: https), or nothing.
        if is_tls:
            return lambda: ClientConnection(ctx, tls)
        return lambda: ClientConnection(ctx)

    native_socks = [sock for sock, is_tls in zip(socks, flags) if head_phase(ctx, is_tls) == "native"]
    servers: list = []
    if native_socks:
        from relay.native.front import NativeFront

        servers.append(NativeFront(ctx, native_socks, shared.values(slot),
                                   [shared.values(i) for i in range(shared.nslots) if i != slot],
                                   [is_tls for sock, is_tls in zip(socks, flags) if sock in native_socks], tls))
    for sock, is_tls in zip(socks, flags):
        if sock not in native_socks:
            acceptor = Acceptor(sock, factory(is_tls), ctx.counters, siblings,
                                lambda: len(ctx.connections) + len(ctx.tunnels))
            acceptor.start()
            servers.append(acceptor)
    ctx.start_sweeping()
    drain = asyncio.Event()
    now = asyncio.Event()
    close_code = [GOING_AWAY]  # what frames mode tells the clients: the first signal decides

    def drain_with(code: int) -> None:
        if not drain.is_set():
            close_code[0] = code
            drain.set()

    loop.add_signal_handler(signal.SIGTERM, drain_with, GOING_AWAY)
    loop.add_signal_handler(signal.SIGUSR1, drain_with, SERVICE_RESTART)
    loop.add_signal_handler(signal.SIGQUIT, lambda: (drain.set(), now.set()))
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    log.debug("worker %d (pid %d) accepting", index, os.getpid())

    await drain.wait()
    for server in servers:
        server.close()
    ctx.start_draining()
    code = close_code[0]
    spreading = None if now.is_set() else ctx.tunnel_class.drain(ctx.tunnels, code, settings.drain_timeout, loop)
    if not now.is_set() and settings.drain_timeout > 0 and not ctx.idle.is_set():
        # the head phase in C stands for all of its connections at once (relay/native/front.py)
        connections = sum(getattr(c, "connections", 1) for c in ctx.connections)
        tunnels = len(ctx.tunnels) + sum(getattr(c, "tunnels", 0) for c in ctx.connections)  # + the fast path's
        log.info("worker %d draining: %d tunnels, %d connections, up to %gs",
                 index, tunnels, connections, settings.drain_timeout)
        waits = [asyncio.ensure_future(ctx.idle.wait()), asyncio.ensure_future(now.wait())]
        await asyncio.wait(waits, timeout=settings.drain_timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    if spreading is not None:
        spreading.cancel()
    for tunnel in list(ctx.tunnels):
        tunnel.shutdown(code)
        tunnel.close()
    for conn in list(ctx.connections):
        conn.close()
    ctx.stop_sweeping()
    for server in servers:
        line = getattr(server, "summary", lambda: None)()
        if line:
            log.info("worker %d: %s", index, line)
    # Let the closes flush; every transport is closing, so this is short.
    for _ in range(10):
        if not ctx.tunnels and not ctx.connections:
            break
        await asyncio.sleep(0.05)
    return 0


def tls_server(settings: Settings, handoff, ctx: Context):
    """The TLS listeners' contexts, from what the supervisor checked and handed
    over (workers/tls.py), and the shared ticket keys (relay/tls/tickets.py)."""
    from relay.tls import openssl, tickets
    from relay.tls.server import TlsServer, context

    ca = f"/proc/self/fd/{handoff.tls_ca_fd}" if handoff.tls_ca_fd >= 0 else ""
    shared_keys = handoff.tls_keys_fd >= 0 and openssl.HELPER is not None
    contexts = [context(f"/proc/self/fd/{fd}", settings.tls_min_version, ca, settings.tls_client_verify,
                        tickets=shared_keys) for fd in handoff.tls_cert_fds]
    if shared_keys:
        ctx.ticket_keys = tickets.WorkerKeys(tickets.KeyStore.attach(handoff.tls_keys_fd), openssl.set_keys)
    header = settings.tls_client_header.encode() if settings.tls_client_ca else b""
    return TlsServer(contexts, handoff.tls_names, settings.tls_strict_sni, header)
