"""``wsrelay demo``: the relay in front of a built-in origin, no configuration needed.

Starts the demo origin (:mod:`relay.demo_origin`: WebSocket echo, a page
with a polling fallback) on loopback in its own process, runs the real
supervisor in front of it with the same ``RELAY_*`` settings ``wsrelay run``
reads (environment, then ``--env-file``), prints the URLs, proves one round
trip through the relay with a plain blocking client, and serves until Ctrl-C.

Only what a demo needs differs from ``run``, and only while the variable is
not set: ``RELAY_LISTEN`` 127.0.0.1:8080 (``--port``; a free port if taken),
``RELAY_WORKERS`` 2, ``RELAY_METRICS_LISTEN`` 127.0.0.1:9108 (a free port if
taken), ``RELAY_ACCESS_LOG`` 0. ``RELAY_ORIGIN`` is always the demo origin.

``--tls`` adds a TLS listener (``RELAY_TLS_LISTEN`` 127.0.0.1:8443, a free
port if taken) with a throwaway local CA and a certificate for ``localhost``
and 127.0.0.1 (trustme: ECDSA P-256), written to a temporary directory the
demo prints, so a browser or curl can be told to trust that CA; the page is
then at https:// and opens wss://.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import sys

import msgspec

from relay.config import Address, load, read_env_file_all
from relay.errors import ConfigError
from relay.handshake import accept_key, path_allowed


def _bind_loopback(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s


def _free_port(preferred: int) -> int:
    s = _bind_loopback(preferred)
    port = s.getsockname()[1]
    s.close()
    return port


def serve_origin(sock: socket.socket) -> None:
    """The demo origin (echo, page, polling) in this process, on uvloop."""
    import uvloop

    from relay.demo_origin import serve_demo

    uvloop.run(serve_demo(sock))


def round_trip(host: str, port: int, path: str, text: str, timeout: float = 5.0, tls=None) -> str:
    """One text message through ws://host:port/path (wss:// with the
    ``ssl.SSLContext`` ``tls``) with a minimal blocking client."""
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        s = tls.wrap_socket(raw, server_hostname="localhost") if tls is not None else raw
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  % (path.encode(), _hostport(host, port).encode(), key))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("relay closed during the handshake")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101") or accept_key(key) not in head:
            raise ConnectionError("no valid 101: " + head.split(b"\r\n")[0].decode(errors="replace"))
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("relay closed before the echo")
            rest += chunk
        return rest[2: 2 + (rest[1] & 0x7F)].decode()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_host(host: str) -> str:
    """Where a local client reaches a listen address (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


DEMO_PAGE_SOCKET = "/ws"  # the path relay/demo_page.html opens its WebSocket on


def throwaway_pki(directory: str) -> dict[str, str]:
    """A local CA and a certificate for localhost/127.0.0.1 in ``directory``;
    the RELAY_TLS_* settings that serve it (and DEMO_CA: the CA to trust)."""
    try:
        import trustme
    except ImportError:
        raise ConfigError(["--tls needs the trustme package for its throwaway CA: pip install trustme"]) from None
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA, organization_name="wsrelay demo")
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    paths = {name: os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    with open(paths["cert.pem"], "wb") as f:
        f.write(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(paths["key.pem"])
    return {"RELAY_TLS_CERT": paths["cert.pem"], "RELAY_TLS_KEY": paths["key.pem"], "DEMO_CA": paths["ca.pem"]}


def demo_environ(port: int, env_file: str | None, tls: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``run`` would see, plus the demo's defaults where unset."""
    environ = dict(os.environ)
    from_file = read_env_file_all(env_file)[0] if env_file else {}
    given = set(environ) | set(from_file)
    if "RELAY_ORIGIN" in given:
        print("wsrelay demo: RELAY_ORIGIN ignored: the demo brings its own origin", file=sys.stderr)
    defaults = {"RELAY_LISTEN": f"127.0.0.1:{_free_port(port)}", "RELAY_WORKERS": "2",
                "RELAY_ACCESS_LOG": "0"}
    if "RELAY_METRICS_LISTEN" not in given:
        defaults["RELAY_METRICS_LISTEN"] = f"127.0.0.1:{_free_port(9108)}"
    if tls is not None:
        defaults["RELAY_TLS_LISTEN"] = f"127.0.0.1:{_free_port(8443 if port else 0)}"
        defaults.update({k: v for k, v in tls.items() if k.startswith("RELAY_")})
    for key, value in defaults.items():
        if key not in given:
            environ[key] = value
    environ.pop("RELAY_ORIGIN", None)
    return environ


def main(port: int = 8080, env_file: str | None = None, tls: bool = False) -> int:
    import ssl
    import tempfile

    from relay.serve import print_problems, run

    pki_dir = tempfile.TemporaryDirectory(prefix="wsrelay-demo-") if tls else None
    try:
        pki = throwaway_pki(pki_dir.name) if pki_dir is not None else None
        settings = load(demo_environ(port, env_file, pki), env_file, require_origin=False)
    except ConfigError as e:
        print_problems(e)
        return 2
    origin_sock = _bind_loopback(0)
    origin_port = origin_sock.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve_origin(origin_sock)
        finally:
            os._exit(0)
    origin_sock.close()
    settings = msgspec.structs.replace(settings, origin=(Address("127.0.0.1", origin_port),))

    def ready(sup) -> None:
        host = _connect_host(settings.listen[0].host)
        base = _hostport(host, sup.listeners.port)
        path = settings.ws_paths[0]
        url = f"ws://{base}{path}"
        try:
            answer = round_trip(host, sup.listeners.port, path, "hello through wsrelay")
        except OSError as e:
            print(f"wsrelay demo: round trip FAILED: {e}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        lines = [f"relay on {url} -> echo origin on ws://127.0.0.1:{origin_port}/",
                 f"open http://{base}/ in a browser for the demo page"]
        if pki is not None and sup.listeners.tls_port:
            tls_port = sup.listeners.tls_port
            try:
                answer_tls = round_trip("127.0.0.1", tls_port, path, "hello over TLS",
                                        tls=ssl.create_default_context(cafile=pki["DEMO_CA"]))
            except OSError as e:
                print(f"wsrelay demo: TLS round trip FAILED: {e}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            lines += [f"relay on wss://localhost:{tls_port}{path} (TLS; round trip OK: got {answer_tls!r})",
                      f"open https://localhost:{tls_port}/ for the page over TLS, trusting the throwaway CA "
                      f"{pki['DEMO_CA']}",
                      f"  e.g. curl --cacert {pki['DEMO_CA']} https://localhost:{tls_port}/"]
        if not path_allowed(DEMO_PAGE_SOCKET.encode(), tuple(p.encode() for p in settings.ws_paths)):
            lines.append(f"(RELAY_WS_PATHS refuses upgrades on {DEMO_PAGE_SOCKET}, where the page opens its "
                         f"WebSocket: it will fall back to polling)")
        lines.append(f"round trip OK: sent 'hello through wsrelay', got {answer!r}")
        if settings.metrics_listen is not None and sup.status.endpoint is not None:
            m = settings.metrics_listen
            lines.append(f"metrics on http://{_hostport(_connect_host(m.host), sup.status.endpoint.port)}/metrics")
        lines.append(f"try it:  python -m websockets {url}   (pip install websockets; Ctrl-C to stop)")
        print("\n".join("wsrelay demo: " + line for line in lines), flush=True)

    try:
        return run(settings, env_file, on_ready=ready)
    finally:
        if pki_dir is not None:
            pki_dir.cleanup()
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
