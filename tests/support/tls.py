"""TLS test kit: throwaway CAs and certificates (trustme), a relay with a TLS
listener, and openssl s_client as the client that says exactly what happened."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
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


def head_env(head: str) -> dict[str, str]:
    """The environment that puts a TLS listener on head phase ``head``
    (the tls_head fixture: "native" or "python")."""
    return {"WSRELAY_NATIVE_TLS_HANDSHAKE": "1" if head == "native" else "0"}


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


class TlsConn:
    """A TLS client whose records are ours to place: an ``ssl.SSLObject``
    over memory BIOs on a blocking socket, so a test can put a request and
    data in one TCP write, send close_notify without closing, half-close
    the TCP stream under TLS, or reset it."""

    def __init__(self, port: int, ctx: ssl.SSLContext, server_name: str = "localhost", timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        #: plaintext received and not yet taken by recv_exactly / read_to_end
        self.plain = bytearray()
        self.close_notify_seen = False
        self.eof = False
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                if not self._fill_ciphertext():
                    raise ConnectionError("closed during the handshake")
        self.flush()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def seal(self, data: bytes) -> bytes:
        """``data`` as records, not sent."""
        self.obj.write(data)
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.seal(data))

    def _fill_ciphertext(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            self.eof = True
            return False
        self.incoming.write(chunk)
        return True

    def _fill(self) -> bool:
        """Read and decrypt once more; False at the end (close_notify or EOF)."""
        if self.close_notify_seen or self.eof:
            return False
        if not self._fill_ciphertext():
            return False
        while True:
            try:
                data = self.obj.read(1 << 20)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLZeroReturnError:
                self.close_notify_seen = True
                return True
            if not data:
                self.close_notify_seen = True
                return True
            self.plain += data

    def recv_exactly(self, n: int) -> bytes:
        while len(self.plain) < n:
            if not self._fill():
                raise ConnectionError(f"the stream ended after {len(self.plain)} of {n} bytes")
        out = bytes(self.plain[:n])
        del self.plain[:n]
        return out

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.plain:
            if not self._fill():
                raise ConnectionError(f"closed before a complete head: {bytes(self.plain)!r}")
        head, _, rest = bytes(self.plain).partition(b"\r\n\r\n")
        self.plain = bytearray(rest)
        return head

    def read_to_end(self) -> tuple[bytes, str]:
        """Everything until the stream ends, and how: ``close_notify`` (then
        the TCP EOF), ``eof`` (a FIN without close_notify) or ``reset``."""
        try:
            while self._fill():
                pass
            if self.close_notify_seen:
                while self.sock.recv(65536):  # what follows close_notify: the FIN
                    pass
            how = "close_notify" if self.close_notify_seen else "eof"
        except ConnectionResetError:
            how = "reset"
        out = bytes(self.plain)
        self.plain.clear()
        return out, how

    def close_notify(self) -> None:
        """Send close_notify; the connection stays open both ways for TCP."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.flush()

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
