"""The supervisor's side of TLS (README, "TLS"): certificates checked before
any worker sees them, handed over as the bytes that were checked, and the
session ticket keys every worker shares.

At start and at each ``SIGHUP`` :meth:`Tls.prepare` reads every
``RELAY_TLS_CERT``/``RELAY_TLS_KEY`` pair, the client CA and the ticket key
file, and refuses the whole reload with one line per problem (the running
generation keeps serving), as a bad env file is refused. What it accepted goes
to the new generation as anonymous memory files (memfd), which the workers
load: a file replaced between the check and a worker's start changes nothing,
and a restarted worker serves what its generation was given. Like the
listening sockets, the running generation's files are kept until a reload's
generation accepts (:meth:`commit`) or is refused (:meth:`rollback`).

Ticket keys live in a :class:`relay.tls.tickets.KeyStore` for the
supervisor's whole life, so a client resumes across workers and across
reloads; generated keys rotate every 12 h, file keys at each reload.
"""

from __future__ import annotations

import logging
import os
import time

from relay.config import Settings, resolve
from relay.errors import ConfigError
from relay.tls import tickets
from relay.tls.certs import Certificate, check_pair

log = logging.getLogger("wsrelay")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    # Sealed: no worker (or anything else holding it) can change what the others load.
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


class Plan:
    """What a generation serves: its certificates, client CA and ticket key set."""

    def __init__(self, certificates: list[Certificate], client_ca: bytes, keys: tickets.KeySet | None):
        self.certificates = certificates
        self.client_ca = client_ca
        #: the key file's keys (None: generated ones)
        self.keys = keys
        self.cert_fds: list[int] = []
        self.ca_fd = -1

    def open(self) -> "Plan":
        self.cert_fds = [_memfd(f"wsrelay-tls-{i}", c.pem) for i, c in enumerate(self.certificates)]
        if self.client_ca:
            self.ca_fd = _memfd("wsrelay-tls-client-ca", self.client_ca)
        return self

    def fds(self) -> tuple[int, ...]:
        return (*self.cert_fds, *([self.ca_fd] if self.ca_fd >= 0 else []))

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.cert_fds, self.ca_fd = [], -1


def check(settings: Settings, environ=None, now: float | None = None) -> Plan:
    """Read and check everything TLS in ``settings``; raises ConfigError with every problem."""
    problems: list[str] = []
    certs: list[Certificate] = []
    for cert, key in zip(settings.tls_cert, settings.tls_key):
        try:
            certs.append(check_pair(resolve(cert, environ), resolve(key, environ), now))
        except ConfigError as e:
            problems.extend(e.lines)
    ca = b""
    if settings.tls_client_ca:
        path = resolve(settings.tls_client_ca, environ)
        try:
            with open(path, "rb") as f:
                ca = f.read()
            import ssl

            ssl.create_default_context(cadata=ca.decode("ascii"))
        except OSError as e:
            problems.append(f"RELAY_TLS_CLIENT_CA: {path}: cannot read: {e.strerror}")
        except (ValueError, UnicodeDecodeError, Exception) as e:  # noqa: BLE001 - ssl.SSLError and kin
            problems.append(f"RELAY_TLS_CLIENT_CA: {path}: no PEM CA certificate OpenSSL can use ({e})")
    keys = None
    if settings.tls_ticket_keys:
        try:
            keys = tickets.read_key_file(resolve(settings.tls_ticket_keys, environ))
        except ConfigError as e:
            problems.extend(e.lines)
    if problems:
        raise ConfigError(problems)
    return Plan(certs, ca, keys)


class Tls:
    """Certificates and ticket keys across reloads (None of it without RELAY_TLS_LISTEN)."""

    def __init__(self, environ=None) -> None:
        self.environ = environ
        self.current: Plan | None = None
        self.running: Plan | None = None
        self.store: tickets.KeyStore | None = None
        self.generated: tickets.KeySet | None = None
        self.rotated_at = 0.0

    def open(self, settings: Settings) -> None:
        """At start: raises ConfigError when anything is wrong."""
        if not settings.tls_listen:
            return
        self.current = self.running = check(settings, self.environ).open()
        self._publish(self.current)
        from relay.tls import openssl
        from relay.tls.certs import describe

        for c in self.current.certificates:
            log.info("TLS certificate %s", describe(c))
        if openssl.HELPER is None:
            log.warning("TLS session tickets are per worker process (a client resumes only on the worker "
                        "that issued its ticket): %s", openssl.WHY_NOT)
        log.info("TLS: session ticket keys %s; TLS connections are served by the Python data plane",
                 f"from {settings.tls_ticket_keys}" if settings.tls_ticket_keys else "generated, rotated every 12 h")

    def prepare(self, settings: Settings, reloading: bool) -> None:
        """A reload: check the new settings' TLS files (ConfigError: nothing changes)."""
        if not settings.tls_listen:
            new = None
        else:
            new = check(settings, self.environ).open()
        if not reloading:
            self.running = self.current
        elif self.current is not None and self.current is not self.running:
            self.current.close()
        self.current = new
        if new is not None:
            self._publish(new)

    def commit(self) -> None:
        if self.running is not None and self.running is not self.current:
            self.running.close()
        self.running = self.current

    def rollback(self) -> None:
        if self.current is not None and self.current is not self.running:
            self.current.close()
        self.current = self.running
        if self.current is not None:
            self._publish(self.current)

    def _publish(self, plan: Plan) -> None:
        """The plan's keys (the file's, or the generated ones) to every worker."""
        if self.store is None:
            self.store = tickets.KeyStore.create()
        if plan.keys is not None:
            self.store.publish(plan.keys)
            return
        if self.generated is None:
            self.generated = tickets.generated()
            self.rotated_at = time.monotonic()
        self.store.publish(self.generated)

    def tick(self, now: float) -> None:
        """Rotate generated keys every 12 h (file keys rotate by reload)."""
        if self.generated is None or now - self.rotated_at < tickets.ROTATE_EVERY:
            return
        self.generated = tickets.rotated(self.generated)
        self.rotated_at = now
        if self.current is not None and self.current.keys is None:
            self.store.publish(self.generated)
            log.info("TLS session ticket keys rotated (the previous key still decrypts)")

    # -- what workers and the operator get --------------------------------------------
    def handoff(self) -> dict:
        """The hand-off fields of the current generation (workers/child.py)."""
        plan = self.current
        if plan is None:
            return {}
        return {"tls_cert_fds": tuple(plan.cert_fds), "tls_names": tuple(c.names for c in plan.certificates),
                "tls_ca_fd": plan.ca_fd, "tls_keys_fd": self.store.fd if self.store else -1}

    def fds(self) -> tuple[int, ...]:
        if self.current is None:
            return ()
        return (*self.current.fds(), *([self.store.fd] if self.store else []))

    def expiries(self) -> dict[str, float]:
        """``wsrelay_tls_certificate_expiry_timestamp_seconds``: one series per served certificate."""
        out: dict[str, float] = {}
        for c in self.current.certificates if self.current else ():
            name = c.label
            while name in out:
                name += "'"
            out[name] = c.not_after
        return out
