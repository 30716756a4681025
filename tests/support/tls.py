"""TLS test kit: throwaway CAs and certificates (trustme), a relay with a TLS
listener, and openssl s_client as the client that says exactly what happened."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import trustme

from tests.support.relay import Relay

ECDSA = trustme.KeyType.ECDSA


class Pair:
    """A certificate (chain: leaf, then intermediates) and its key, as files."""

    def __init__(self, directory: Path, name: str, cert):
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"
        self.cert.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        self.key.write_bytes(cert.private_key_pem.bytes())
        self.obj = cert


def make_ca(directory: Path) -> trustme.CA:
    ca = trustme.CA(key_type=ECDSA)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return ca


def issue(ca: trustme.CA, directory: Path, name: str, *names: str, **kw) -> Pair:
    return Pair(directory, name, ca.issue_cert(*(names or (name,)), key_type=ECDSA, **kw))


def tls_env(*pairs: Pair, **extra: str) -> dict[str, str]:
    env = {"RELAY_TLS_LISTEN": "127.0.0.1:0", "RELAY_TLS_CERT": ",".join(str(p.cert) for p in pairs),
           "RELAY_TLS_KEY": ",".join(str(p.key) for p in pairs)}
    env.update(extra)
    return env


def tls_relay(origin: str, *pairs: Pair, workers: int = 2, **extra: str) -> Relay:
    return Relay(origin, workers=workers, env=tls_env(*pairs, **extra))


def client_context(directory: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(directory / "ca.pem"))


REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def s_client(port: int, *args: str, stdin: bytes = REQUEST, timeout: float = 15.0) -> str:
    """``openssl s_client`` against the relay: its whole output (stdout + stderr)."""
    assert shutil.which("openssl"), "openssl (the CLI) is needed: apt-get install openssl"
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args],
                         input=stdin, capture_output=True, timeout=timeout)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def wss_echo(url: str, ctx: ssl.SSLContext, *messages, path_first: bool = False, **kw):
    """Open ``url`` with websockets' asyncio client, send each message and
    collect its echo (or, with ``path_first``, the first message first).

    Not websockets' sync client over TLS: its reader thread and the sender
    share one ssl.SSLSocket, and concurrent reads and writes on it corrupt
    records now and then (bad record MAC, or a request that never arrives),
    against any server (measured against websockets' own TLS server too)."""
    import asyncio

    from websockets.asyncio.client import connect

    async def main():
        async with connect(url, ssl=ctx, open_timeout=10, **kw) as ws:
            out = [await asyncio.wait_for(ws.recv(), 10)] if path_first else []
            for m in messages:
                await ws.send(m)
                out.append(await asyncio.wait_for(ws.recv(), 10))
            return out

    return asyncio.run(main())


def public_style_pair(directory: Path, name: str, days: int = 90) -> Pair:
    """A CA (``ca.pem`` in ``directory``) and a leaf for ``name`` shaped as a
    public CA issues them (ECDSA P-256, ``days`` of validity, SAN not critical,
    serverAuth): what a strict validator such as sslyze's accepts (trustme's
    leaves mark the SAN critical beside a non-empty subject, which it refuses)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsrelay test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))

    class _Leaf:
        cert_chain_pems = [type("P", (), {"bytes": lambda self, b=leaf.public_bytes(pem): b})()]
        private_key_pem = type("P", (), {"bytes": lambda self, b=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()): b})()

    return Pair(directory, name, _Leaf())


def names_for(relay, server_name: str) -> str:
    """The DNS names of the certificate the relay presents for ``server_name``."""
    der = None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", relay.tls_port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=server_name) as t:
            der = t.getpeercert(binary_form=True)
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return ",".join(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))
