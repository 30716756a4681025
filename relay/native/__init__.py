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

import os

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


#: WSRELAY_NATIVE_HANDSHAKE=0 keeps the head phase in Python (relay/client.py) on
#: the native plane: the milestone-1 path, for comparison (bench/README.md)
HANDSHAKE_ENV = "WSRELAY_NATIVE_HANDSHAKE"
#: WSRELAY_NATIVE_TLS_HANDSHAKE=0 keeps TLS listeners' head phase (and TLS handshake) in Python
TLS_HANDSHAKE_ENV = "WSRELAY_NATIVE_TLS_HANDSHAKE"


def head_phase_serves(settings, is_tls: bool) -> bool:
    """Whether the head phase in C (relay/native/front.py) serves a listener
    (TLS or plain) of a worker whose tunnels the native plane relays, with
    ``settings`` (relay.config.Settings): unless WSRELAY_NATIVE_HANDSHAKE=0,
    and for TLS unless the engine cannot use Python's OpenSSL or
    WSRELAY_NATIVE_TLS_HANDSHAKE=0. Connections that begin with a PROXY
    protocol header (RELAY_PROXY_PROTOCOL), whose origin connections begin
    with one (RELAY_ORIGIN_PROXY_PROTOCOL), or that may carry the edge's own
    client-certificate header (RELAY_TLS_CLIENT_CA) stay on relay/client.py."""
    if os.environ.get(HANDSHAKE_ENV, "1").strip() == "0" or settings.proxy_protocol == "on" \
            or settings.origin_proxy_protocol == "v2" or settings.tls_client_ca:
        return False
    if is_tls:
        return TLS_AVAILABLE and os.environ.get(TLS_HANDSHAKE_ENV, "1").strip() != "0"
    return True


def tls_head_in_c(settings) -> bool:
    """Whether TLS listeners' handshakes and heads are read in C with these
    settings (relay.config.Settings)."""
    return bool(settings.tls_listen) and AVAILABLE and resolve(settings.data_plane, settings.mode) == NATIVE \
        and head_phase_serves(settings, True)


def fast_path_status(settings) -> str | None:
    """Whether the fast path (relay/native/fast_path.py) decides common upgrades
    with ``settings`` (relay.config.Settings) on the native plane: ``"on"``,
    ``"on, except pool <name>: <why>; ..."`` (pools Python decides for),
    ``"off: <why>"``, or None where it has no place (no head phase in C on
    plain listeners). The caller has found the native plane chosen."""
    if not head_phase_serves(settings, False):
        return None
    from relay.native.fast_path import left_to_python, why_not

    off = why_not(settings)
    if off is not None:
        return f"off: {off}"
    left = left_to_python(settings)
    return "on" if not left else "on, except " + "; ".join(f"pool {name}: {why}" for name, why in left)


def describe(settings) -> str:
    """One phrase for the startup log: which plane serves tunnels, and why,
    with ``settings`` (relay.config.Settings): TLS listeners' tunnels are
    relayed on epoll, their handshakes and heads read in C (tls_head_in_c)."""
    data_plane, mode, tls = settings.data_plane, settings.mode, bool(settings.tls_listen)
    tls_head = tls_head_in_c(settings)
    chosen = resolve(data_plane, mode)
    if chosen == NATIVE:
        fast = fast_path_status(settings)
        upgrades = ("" if fast is None else "; common upgrades decided in C" + fast[2:] if fast.startswith("on")
                    else f"; fast path {fast}")
        if not tls:
            return f"data plane native ({backend()}{upgrades})"
        if not TLS_AVAILABLE:
            return f"data plane native ({backend()}{upgrades}; TLS tunnels python: {TLS_WHY_NOT})"
        if tls_head:
            return f"data plane native ({backend()}{upgrades}; TLS handshakes in C, TLS tunnels on epoll)"
        return f"data plane native ({backend()}{upgrades}; TLS tunnels on epoll)"
    if data_plane == PYTHON:
        return "data plane python (RELAY_DATA_PLANE=python)"
    if mode != "tunnel":
        return f"data plane python ({mode} mode)"
    return f"data plane python (native unavailable: {WHY_NOT})"
