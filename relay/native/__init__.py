"""The native data plane: after the 101, a tunnel's two sockets belong to a C
pump (engine.c) polled from the worker's event loop, instead of two uvloop
transports driven from Python (relay/tunnel.py, the reference).

``RELAY_DATA_PLANE`` picks it (README "Settings"): ``auto`` uses it where it
applies — tunnel mode — and the Python data plane elsewhere (frames mode,
plain HTTP); ``native`` insists (a configuration error where it cannot
apply); ``python`` never uses it.

This module only says whether the extension is importable, and why not;
:mod:`relay.native.plane` is the worker's side of it.
"""

from __future__ import annotations

try:
    from relay.native._engine import Engine
except ImportError as e:  # not built: no compiler or headers at install time
    Engine = None  # type: ignore[assignment,misc]
    AVAILABLE = False
    WHY_NOT = (f"the extension relay.native._engine is not built ({e}); install a C compiler and "
               "Python's headers (Debian: apt-get install build-essential python3-dev) and reinstall wsrelay")
else:
    AVAILABLE = True
    WHY_NOT = ""

#: TLS tunnels in the pump too (engine.c "TLS tunnels"): the engine found
#: OpenSSL in the libssl Python's ssl module loaded (relay/native/tls.c says
#: why there); else TLS tunnels stay on the Python data plane, for TLS_WHY_NOT.
TLS_AVAILABLE = False
TLS_WHY_NOT = WHY_NOT
if AVAILABLE:
    try:
        import _ssl

        from relay.native import _engine

        _engine.tls_load(getattr(_ssl, "__file__", None))
    except (ImportError, OSError) as e:
        TLS_WHY_NOT = f"the engine cannot use Python's OpenSSL ({e})"
    else:
        TLS_AVAILABLE = True

NATIVE = "native"
PYTHON = "python"

#: What drives the native plane's sockets: io_uring where the kernel allows it,
#: else epoll (engine.c says why io_uring is preferred). WSRELAY_NATIVE_BACKEND=epoll
#: forces epoll, for comparison or where io_uring is unwelcome.
BACKEND_ENV = "WSRELAY_NATIVE_BACKEND"


def wanted_backend() -> str:
    import os

    return "epoll" if os.environ.get(BACKEND_ENV, "").strip().lower() == "epoll" else "io_uring"


_backend: str | None = None


def backend() -> str:
    """``"io_uring"``, or ``"epoll"`` with the reason io_uring is not used (probed once)."""
    global _backend
    if _backend is None:
        e = Engine(backend=wanted_backend())
        if e.backend == "io_uring":
            _backend = "io_uring"
        else:
            _backend = "epoll" + (f": {e.fallback_reason}" if e.fallback_reason else f" ({BACKEND_ENV}=epoll)")
        del e
    return _backend


def resolve(data_plane: str, mode: str) -> str:
    """The data plane tunnels get: ``"native"`` or ``"python"``.

    ``data_plane`` is ``RELAY_DATA_PLANE`` (``auto``, ``native``, ``python``);
    a ``native`` that cannot apply was refused by relay.config already, so
    here it can only fall back for ``auto``.
    """
    if data_plane == PYTHON or mode != "tunnel" or not AVAILABLE:
        return PYTHON
    return NATIVE


def problem(data_plane: str, mode: str) -> str | None:
    """Why ``RELAY_DATA_PLANE=native`` cannot be honoured here, or None."""
    if data_plane != NATIVE:
        return None
    if mode != "tunnel":
        return "applies to RELAY_MODE=tunnel only (frames mode runs on the Python data plane); use auto"
    if not AVAILABLE:
        return "not available: " + WHY_NOT
    return None


def describe(data_plane: str, mode: str, tls: bool = False, tls_head: bool = False) -> str:
    """One phrase for the startup log: which plane serves tunnels, and why
    (``tls``: there are TLS listeners, whose tunnels the pump relays on epoll;
    ``tls_head``: their TLS handshakes and heads are read in C too)."""
    chosen = resolve(data_plane, mode)
    if chosen == NATIVE:
        if not tls:
            return f"data plane native ({backend()})"
        if not TLS_AVAILABLE:
            return f"data plane native ({backend()}; TLS tunnels python: {TLS_WHY_NOT})"
        if tls_head:
            return f"data plane native ({backend()}; TLS handshakes in C, TLS tunnels on epoll)"
        return f"data plane native ({backend()}; TLS tunnels on epoll)"
    if data_plane == PYTHON:
        return "data plane python (RELAY_DATA_PLANE=python)"
    if mode != "tunnel":
        return f"data plane python ({mode} mode)"
    return f"data plane python (native unavailable: {WHY_NOT})"
