"""The compiled helper (relay/tls/_openssl.c), loaded once per process.

:data:`HELPER` is the module when it is built and finds the libssl that
Python's ``ssl`` uses, else None; :data:`WHY_NOT` says why not, for the
startup log and ``wsrelay check``.
"""

from __future__ import annotations

import ssl

#: the groups (key exchange) Mozilla's "intermediate" profile allows, fastest first
GROUPS = b"X25519:prime256v1:secp384r1"

HELPER = None
WHY_NOT = ""


def _load():
    global HELPER, WHY_NOT
    try:
        from relay.tls import _openssl
    except ImportError as e:
        WHY_NOT = f"the relay.tls._openssl extension is not built ({e}); pip install needs a C compiler and Python's headers"
        return
    import _ssl

    try:
        _openssl.load(getattr(_ssl, "__file__", None))
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        probe.options |= ssl.OP_NO_COMPRESSION
        if _openssl.options(probe) != int(probe.options):
            raise OSError("this Python's ssl.SSLContext is laid out differently from what it knows")
    except OSError as e:
        WHY_NOT = f"relay.tls._openssl cannot use Python's ssl module: {e}"
        return
    HELPER = _openssl


_load()


def configure(context: ssl.SSLContext, tickets: bool) -> None:
    """Groups, no session-ID cache, and (``tickets``) the shared ticket keys
    of :func:`set_keys`; nothing without the helper (OpenSSL's defaults)."""
    if HELPER is not None:
        HELPER.configure(context, GROUPS, tickets)


def set_keys(keys: list[bytes], encrypt_with: int) -> None:
    if HELPER is not None:
        HELPER.set_keys(keys, encrypt_with)
