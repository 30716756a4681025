"""Session ticket keys (RFC 5077, RFC 8446 §4.6.1): one set for every worker,
and for every host that shares ``RELAY_TLS_TICKET_KEYS`` (README, "TLS").

A key is 80 bytes (16 name, 32 HMAC secret, 32 AES-256 key; 48 with AES-128),
the layout nginx's ``ssl_session_ticket_key`` and HAProxy's ``tls-ticket-keys``
read. Two sources:

- ``RELAY_TLS_TICKET_KEYS=/path``: HAProxy's file, one base64 key per line
  (``openssl rand 80 | openssl base64 -A``), read at start and at every reload.
  The last three lines are used; the second to last encrypts, the others only
  decrypt, so a fleet rotates by appending a key everywhere (it decrypts
  before anyone encrypts with it) and reloading. A file of exactly 48 or 80
  raw bytes (nginx's ``openssl rand 80 > file``) is one key.
- none: the supervisor makes them, ``previous, current, next`` (encrypting
  with ``current``) and rotates every :data:`ROTATE_EVERY` seconds (12 h,
  HAProxy's advice), so a ticket stays good for up to 24 h and forward
  secrecy is lost for at most that long.

:class:`KeyStore` carries them from the supervisor to the workers: a small
memfd both map; the supervisor writes under a sequence lock, each worker looks
at the sequence number once a second (its sweep) and hands a changed set to the
ticket callback (relay/tls/_openssl.c). A new encryption key is always one the
workers already decrypt with, so the second it takes to reach every worker
costs no resumption.
"""

from __future__ import annotations

import base64
import binascii
import mmap
import os
import struct

from relay.errors import ConfigError

ROTATE_EVERY = 12 * 3600.0
#: keys used from a file (HAProxy's TLS_TICKETS_NO)
FILE_KEYS = 3
MAX_KEYS = 8
SIZES = (48, 80)

_HEAD = struct.Struct("<QII")  # sequence, count, index of the encrypting key
_SLOT = 1 + 80
SIZE = _HEAD.size + MAX_KEYS * _SLOT


class KeySet(tuple):
    """``(keys, encrypt_with)``: the keys a worker decrypts with, and which one encrypts."""

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self[0]

    @property
    def encrypt_with(self) -> int:
        return self[1]

    @classmethod
    def of(cls, keys, encrypt_with: int) -> "KeySet":
        return cls((tuple(keys), encrypt_with))


def parse_key_file(data: bytes, path: str = "RELAY_TLS_TICKET_KEYS") -> KeySet:
    """A key file's bytes -> its KeySet; raises ConfigError naming the line at fault."""
    where = f"RELAY_TLS_TICKET_KEYS: {path}"
    if len(data) in SIZES and not _looks_base64(data):
        return KeySet.of([data], 0)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: expected base64 keys, one per line (openssl rand 80 | openssl base64 -A), "
                           f"or exactly 80 raw bytes (openssl rand 80)"]) from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise ConfigError([f"{where}:{number}: not base64"]) from None
        if len(key) not in SIZES:
            raise ConfigError([f"{where}:{number}: a key is 80 bytes (or 48), this one is {len(key)}"])
        keys.append(key)
    if not keys:
        raise ConfigError([f"{where}: no key in it"])
    keys = keys[-FILE_KEYS:]
    return KeySet.of(keys, len(keys) - 2 if len(keys) > 1 else 0)


def _looks_base64(data: bytes) -> bool:
    try:
        base64.b64decode(data.strip(), validate=True)
        return data.strip().isascii() and len(data.strip()) % 4 == 0
    except binascii.Error:
        return False


def read_key_file(path: str) -> KeySet:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"RELAY_TLS_TICKET_KEYS: {path}: cannot read: {e.strerror}"]) from None
    return parse_key_file(data, path)


def fresh_key() -> bytes:
    return os.urandom(80)


def generated() -> KeySet:
    """previous, current, next: encrypt with current."""
    return KeySet.of([fresh_key(), fresh_key(), fresh_key()], 1)


def rotated(keys: KeySet) -> KeySet:
    """The next generated set: current becomes previous, next current, a new next."""
    k = keys.keys
    return KeySet.of([k[1], k[2], fresh_key()], 1)


class KeyStore:
    """The key set in shared memory: written by the supervisor, read by workers."""

    def __init__(self, fd: int, writable: bool):
        self.fd = fd
        self.map = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        self.seen = -1

    @classmethod
    def create(cls) -> "KeyStore":
        fd = os.memfd_create("wsrelay-ticket-keys", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        return cls(fd, writable=True)

    @classmethod
    def attach(cls, fd: int) -> "KeyStore":
        return cls(fd, writable=False)

    def publish(self, keys: KeySet) -> None:
        m = self.map
        seq = _HEAD.unpack_from(m)[0]
        struct.pack_into("<Q", m, 0, seq + 1)  # odd: being written
        body = bytearray(MAX_KEYS * _SLOT)
        for i, key in enumerate(keys.keys):
            body[i * _SLOT] = len(key)
            body[i * _SLOT + 1: i * _SLOT + 1 + len(key)] = key
        m[_HEAD.size:] = bytes(body)
        struct.pack_into("<II", m, 8, len(keys.keys), keys.encrypt_with)
        struct.pack_into("<Q", m, 0, seq + 2)

    def changed(self) -> KeySet | None:
        """The key set if it changed since the last call (None otherwise, or while being written)."""
        m = self.map
        seq = _HEAD.unpack_from(m)[0]
        if seq == self.seen or seq % 2 or seq == 0:
            return None
        _, count, enc = _HEAD.unpack_from(m)
        body = m[_HEAD.size:]
        if _HEAD.unpack_from(m)[0] != seq:
            return None
        keys = [bytes(body[i * _SLOT + 1: i * _SLOT + 1 + body[i * _SLOT]]) for i in range(count)]
        self.seen = seq
        return KeySet.of(keys, enc)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class WorkerKeys:
    """A worker's view of the key store: hands a changed set to the ticket callback."""

    def __init__(self, store: KeyStore, apply):
        self.store = store
        self.apply = apply
        self.refresh()

    def refresh(self) -> None:
        keys = self.store.changed()
        if keys is not None:
            self.apply(list(keys.keys), keys.encrypt_with)
