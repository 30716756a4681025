"""Certificate/key pairs: read, checked and described (README, "TLS").

:func:`check_pair` reads one ``RELAY_TLS_CERT``/``RELAY_TLS_KEY`` pair and
returns a :class:`Certificate` or raises :class:`ConfigError` with one line per
problem: unreadable, not PEM, an encrypted key, a key that does not match the
certificate, a chain out of order (each certificate must be issued by the next,
as nginx and HAProxy expect: leaf first), not yet valid, expired. The bytes
checked are the bytes served: the supervisor hands them to the workers
(workers/tls.py), so a file replaced in between changes nothing.

Parsing uses ``cryptography`` (the ``tls`` extra), a well-kept X.509 parser;
Python's ``ssl`` can load a pair but not say what is in it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import time

import msgspec

from relay.errors import ConfigError


class Certificate(msgspec.Struct, frozen=True):
    """One served certificate: where it came from and what it says."""

    cert_path: str
    key_path: str
    names: tuple[str, ...]   # DNS names (SAN, else the CN), as SNI is matched against them
    not_after: float         # Unix time
    subject: str
    issuer: str
    key_type: str            # "ECDSA P-256", "RSA 2048", ...
    pem: bytes               # the chain, then the key: what workers load

    @property
    def label(self) -> str:
        """The metric label ``name``: the first name (the file when it has none)."""
        return self.names[0] if self.names else os.path.basename(self.cert_path)


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise ConfigError(["RELAY_TLS_CERT: reading certificates needs the cryptography package: "
                           "pip install 'wsrelay[tls]'"]) from None
    return x509, serialization


def _read(variable: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([f"{variable}: {path}: cannot read: {e.strerror}"]) from None


def _key_type(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(
            key.curve.name, f"ECDSA {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _names(cert) -> tuple[str, ...]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
        if names:
            return names
    except x509.ExtensionNotFound:
        pass
    return tuple(a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str))


def check_pair(cert_path: str, key_path: str, now: float | None = None) -> Certificate:
    """Read and check one pair; raises ConfigError with every problem found."""
    x509, serialization = _crypto()
    now = time.time() if now is None else now
    cert_pem, key_pem = _read("RELAY_TLS_CERT", cert_path), _read("RELAY_TLS_KEY", key_path)
    where = f"RELAY_TLS_CERT: {cert_path}"
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError([f"{where}: no PEM certificate in it"]) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError([f"RELAY_TLS_KEY: {key_path}: the key is encrypted (a passphrase cannot be "
                           f"asked for at every reload): decrypt it, e.g. openssl pkey -in KEY -out KEY"]) from None
    except (ValueError, Exception) as e:  # noqa: BLE001 - cryptography raises several kinds for garbage
        raise ConfigError([f"RELAY_TLS_KEY: {key_path}: not a PEM private key ({type(e).__name__})"]) from None
    leaf = chain[0]
    problems = []
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        problems.append(f"RELAY_TLS_KEY: {key_path} does not match the certificate in {cert_path} "
                        f"(its first certificate must be the one for this key)")
    for i in range(len(chain) - 1):
        try:
            chain[i].verify_directly_issued_by(chain[i + 1])
        except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
            problems.append(f"{where}: certificate {i + 1} ({chain[i].subject.rfc4514_string()}) is not issued "
                            f"by certificate {i + 2} ({chain[i + 1].subject.rfc4514_string()}): "
                            f"the chain must go from the server's certificate up, in order")
            break
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if now < not_before:
        problems.append(f"{where}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now >= not_after:
        problems.append(f"{where}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if problems:
        raise ConfigError(problems)
    pem = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    # Last, OpenSSL itself must take it (what cryptography accepts it may not).
    try:
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pem)
    except ssl.SSLError as e:
        raise ConfigError([f"{where}: OpenSSL refuses the pair: {e.reason or e}"]) from None
    return Certificate(cert_path=cert_path, key_path=key_path, names=_names(leaf), not_after=not_after,
                       subject=leaf.subject.rfc4514_string(), issuer=leaf.issuer.rfc4514_string(),
                       key_type=_key_type(leaf.public_key()), pem=pem)


def load(context: ssl.SSLContext, pem: bytes) -> None:
    """Load a chain + key given as bytes (Python's ssl reads files only): from
    an anonymous memory file, never from disk."""
    fd = os.memfd_create("wsrelay-certificate", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # no /proc: a private temporary file
        with tempfile.NamedTemporaryFile() as f:
            f.write(pem)
            f.flush()
            context.load_cert_chain(f.name)
    finally:
        os.close(fd)


def describe(c: Certificate, now: float | None = None) -> str:
    """One line for ``wsrelay check``: names, key, expiry."""
    now = time.time() if now is None else now
    days = (c.not_after - now) / 86400
    expiry = time.strftime("%Y-%m-%d", time.gmtime(c.not_after))
    return f"{c.cert_path}: {', '.join(c.names) or '(no names)'}; {c.key_type}; expires {expiry} (in {days:.0f} days)"
