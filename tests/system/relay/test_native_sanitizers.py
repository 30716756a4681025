"""The C pump under AddressSanitizer and valgrind, for a bounded time.

ASan: the extension is rebuilt with -fsanitize=address into a temp dir, and
a child pytest runs the native engine and head-phase tests, the
tunnel-endings suite, the TLS tunnel suites (the engine's record layer with
the SSL of Python's own OpenSSL, which is not instrumented: our reads and
writes around it are) and a few sequences of the data-plane fuzz with libasan
preloaded; relays started
by those tests inherit the preload and load the same build (a
sitecustomize.py puts it in place of relay.native._engine), so the workers'
pumps are checked too. Any report lands in a log file and fails the test.

valgrind (memcheck) reaches what ASan does not: uninitialised bytes passed
to syscalls (epoll events, socket options) or branched on. It runs a short
script driving the regular build through data, backpressure, FIN, reset,
close and abort, and a TLS tunnel (hand-over, records both ways,
close_notify each way).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from relay import native
from tests.support.relay import ROOT

NATIVE = os.path.join(ROOT, "relay", "native")
#: every C file of the extension (setup.py's list)
SOURCES = [os.path.join(NATIVE, f)
           for f in ("_engine.c", "_heads.c", "engine.c", "handshake.c", "http_head.c", "ws_accept.c", "tls.c",
                     "fast_path.c", "access_log.c")]
REQUIRED = os.environ.get("WSRELAY_REQUIRE_NATIVE", "") not in ("", "0")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if REQUIRED:
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def _libasan(cc: str) -> str:
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        if REQUIRED:
            pytest.fail("libasan not found (.ci/run installs libasan8)")
        pytest.skip("libasan not found")
    return os.path.realpath(out)


SITECUSTOMIZE = textwrap.dedent("""\
    # Load the sanitizer build of the engine as relay.native._engine. An error
    # here would only be printed (Python goes on without its sitecustomize) and
    # the regular build would load instead, unchecked: exit at once.
    import importlib.machinery, importlib.util, os, sys
    try:
        _path = os.environ["WSRELAY_TEST_ENGINE"]
        _loader = importlib.machinery.ExtensionFileLoader("relay.native._engine", _path)
        _spec = importlib.util.spec_from_file_location("relay.native._engine", _path, loader=_loader)
        _mod = importlib.util.module_from_spec(_spec)
        _loader.exec_module(_mod)
        sys.modules["relay.native._engine"] = _mod
    except BaseException as _e:
        sys.stderr.write(f"sitecustomize: the sanitizer build of the engine did not load: {_e!r}\\n")
        os._exit(86)
""")


def test_the_pump_under_addresssanitizer(tmp_path):
    cc = _need(os.environ.get("CC", "gcc"))
    libasan = _libasan(cc)
    so = tmp_path / ("_engine" + sysconfig.get_config_var("EXT_SUFFIX"))
    build = subprocess.run(
        [cc, "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address",
         "-I", sysconfig.get_paths()["include"], *SOURCES, "-ldl", "-o", str(so)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    logs = tmp_path / "asan"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({
        "LD_PRELOAD": libasan,
        # Python itself is not instrumented and keeps memory until exit: leaks are not ours to judge here.
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={logs}:abort_on_error=0:halt_on_error=1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT]),
        "WSRELAY_TEST_ENGINE": str(so),
        "DATA_PLANE_FUZZ_EXAMPLES": "6",
        "FUZZ_EXAMPLES": "100",
    })
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/unit/test_native_head.py", "tests/system/relay/test_native.py", "tests/system/relay/test_native_handshake.py",
         "tests/system/relay/test_tunnel_endings.py", "tests/system/relay/test_data_plane_fuzz.py",
         "tests/system/relay/test_native_tls.py", "tests/system/relay/test_tls_tunnel.py",
         "tests/system/relay/test_native_tls_head.py", "tests/system/relay/test_fast_path.py",
         "tests/unit/test_fast_path_rules.py", "tests/unit/test_access_line.py",
         "-k", "not python"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    reports = [open(p).read() for p in glob.glob(f"{logs}*")]
    assert not reports, "\n".join(reports)[:20000]
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert " passed" in run.stdout


VALGRIND_SCRIPT = textwrap.dedent("""\
    import os, socket, struct, time
    from relay.native import Engine

    ended = []
    e = Engine(64 * 1024, lambda tok, up, down: ended.append((tok, up, down)))

    def pair():
        with socket.socket() as lst:
            lst.bind(("127.0.0.1", 0)); lst.listen(1)
            out = socket.create_connection(lst.getsockname()); inside, _ = lst.accept()
        inside.setblocking(False)
        return out, inside.detach()

    def pump(cond):
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline
            e.poll(); time.sleep(0.001)

    def recv_all(s, n):
        got = bytearray(); s.setblocking(False)
        def done():
            try:
                got.extend(s.recv(1 << 20))
            except BlockingIOError:
                pass
            return len(got) >= n
        pump(done); return bytes(got)

    for round in range(3):
        c, cfd = pair(); o, ofd = pair()
        t = e.tunnel(cfd, ofd, b"early-c", b"early-o", round)
        assert recv_all(o, 7) == b"early-o" and recv_all(c, 7) == b"early-c"
        blob = os.urandom(1 << 20)
        o.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        c.setblocking(True); c.sendall(blob[:200000])
        assert recv_all(o, 200000) == blob[:200000]
        o.setblocking(True); o.sendall(b"down"); assert recv_all(c, 4) == b"down"
        e.bytes(t); e.idle(t); e.totals; e.open_bytes
        if round == 0:
            c.shutdown(socket.SHUT_WR); o.shutdown(socket.SHUT_WR)
        elif round == 1:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
        else:
            e.close(t)
        pump(lambda: len(ended) == round + 1)
    c, cfd = pair(); o, ofd = pair()
    e.tunnel(cfd, ofd, b"", b"", "aborted"); e.abort_all(); e.close_idle(0.0)
    assert len(ended) == 4, ended

    # a TLS tunnel (epoll engine): the hand-over of what the SSL's BIOs hold, records both ways,
    # the origin's FIN as close_notify, the client's close_notify as a FIN
    import ssl
    from relay import native
    assert native.TLS_AVAILABLE, native.TLS_WHY_NOT
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain(os.environ["TLS_PEM"])
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); cctx.check_hostname = False; cctx.verify_mode = ssl.CERT_NONE
    si, so, ci, co = (ssl.MemoryBIO() for _ in range(4))
    s = sctx.wrap_bio(si, so, server_side=True); cl = cctx.wrap_bio(ci, co)
    for _ in range(10):
        for x in (cl, s):
            try:
                x.do_handshake()
            except ssl.SSLWantReadError:
                pass
        ci.write(so.read()); si.write(co.read())
    s.write(b"held-out|"); cl.write(b"held-in|"); si.write(co.read())
    te = Engine(64 * 1024, lambda tok, up, down: ended.append((tok, up, down)), backend="epoll")
    e = te  # pump() polls e
    c, cfd = pair(); o, ofd = pair()
    te.tls_tunnel(cfd, ofd, b"101|", b"early|", "tls", s._sslobj)
    assert recv_all(o, 14) == b"early|held-in|"
    cl.write(os.urandom(100000)); c.setblocking(True); c.sendall(co.read())
    assert len(recv_all(o, 100000)) == 100000
    o.setblocking(True); o.sendall(b"down"); o.shutdown(socket.SHUT_WR)
    got = bytearray()
    def plain():
        try:
            data = c.recv(1 << 20)
        except BlockingIOError:
            return False
        ci.write(data)
        try:
            got.extend(cl.read(1 << 20))
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        return got.endswith(b"down") or not data
    c.setblocking(False); pump(plain)
    assert bytes(got) == b"held-out|101|down", bytes(got)
    try:
        cl.unwrap()
    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
        pass
    c.setblocking(True); c.sendall(co.read())
    pump(lambda: len(ended) == 5)
    assert ended[-1] == ("tls", 100008, 4), ended  # held-in| was decrypted by the engine: counted
    print("valgrind-script-ok")
""")


def test_the_pump_under_valgrind(tmp_path):
    valgrind = _need("valgrind")
    if not native.AVAILABLE:
        pytest.fail(native.WHY_NOT) if REQUIRED else pytest.skip(native.WHY_NOT)
    script = tmp_path / "drive.py"
    script.write_text(VALGRIND_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    # a throwaway certificate for the TLS round
    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    env.update({"PYTHONMALLOC": "malloc", "PYTHONPATH": ROOT, "TLS_PEM": str(pem)})
    run = subprocess.run(
        [valgrind, "--leak-check=no", "--track-origins=yes", "--num-callers=40", sys.executable, str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "valgrind-script-ok" in run.stdout, run.stdout[-3000:] + run.stderr[-10000:]
    # CPython itself is not valgrind-clean (e.g. int.from_bytes); judge the
    # reports whose stack passes through the engine.
    ours = [block for block in _reports(run.stderr) if "engine.c" in block or "_engine" in block]
    assert not ours, "\n\n".join(ours)[:20000]
    assert "ERROR SUMMARY" in run.stderr  # valgrind did run


def _reports(stderr: str) -> list[str]:
    blocks, current = [], []
    for line in stderr.splitlines():
        body = line.split("== ", 1)[1] if line.startswith("==") and "== " in line else line
        if body.strip():
            current.append(body)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks
