"""Smoke test of the benchmark tooling (bench/): the pieces start, talk and
report, in a few seconds. The benchmark itself is run by hand:
``python -m bench --quick``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent.parent.parent


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help():
    p = run("-m", "bench", "--help")
    assert p.returncode == 0
    assert "--quick" in p.stdout


def test_loadgen_against_origin_directly():
    origin = subprocess.Popen([sys.executable, "-m", "bench.origin"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(origin.stdout.readline().split(":")[-1])
        assert origin.stdout.readline().strip() == "ready"
        url = f"ws://127.0.0.1:{port}/"
        for mode, size in (("echo", 4096), ("handshake", 64)):
            p = run("-m", "bench.loadgen", "--mode", mode, "--url", url, "--conns", "2", "--size", str(size),
                    "--warmup", "0.1", "--duration", "0.5")
            assert p.returncode == 0, p.stderr
            result = json.loads(p.stdout.splitlines()[-1].split(" ", 1)[1])
            assert result["msgs"] > 0 and result["errors"] == 0, result
    finally:
        origin.terminate()
        origin.wait(10)


def test_runner_end_to_end(tmp_path):
    """direct and the naive relay through the whole pipeline, one short trial each."""
    p = run("-m", "bench", "--only", "echo-64", "--systems", "direct", "naive", "--rounds", "1",
            "--duration", "0.5", "--warmup", "0.2", "--out", str(tmp_path), timeout=90)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]["echo-64"]
    assert summary["direct"]["value"] > 0 and summary["naive"]["value"] > 0
    assert summary["naive"]["errors"] == 0
    assert "naive asyncio relay" in (tmp_path / "results.md").read_text()


def test_http_origin_and_loadgen_directly():
    """The origin's plain HTTP port: keep-alive, pipelining, a head split over
    writes; then the loadgen's http mode against it."""
    import socket
    origin = subprocess.Popen([sys.executable, "-m", "bench.origin", "--http", "127.0.0.1:0"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert origin.stdout.readline().startswith("listening on ")
        line = origin.stdout.readline()
        assert line.startswith("http on "), line
        port = int(line.split(":")[-1])
        assert origin.stdout.readline().strip() == "ready"
        from bench.origin import HTTP_RESPONSE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            s.sendall(req * 2 + req[:10])
            s.sendall(req[10:])
            got = b""
            while len(got) < 3 * len(HTTP_RESPONSE):
                chunk = s.recv(65536)
                assert chunk
                got += chunk
            assert got == HTTP_RESPONSE * 3
        p = run("-m", "bench.loadgen", "--mode", "http", "--url", f"http://127.0.0.1:{port}/", "--conns", "3",
                "--warmup", "0.1", "--duration", "0.5")
        assert p.returncode == 0, p.stderr
        result = json.loads(p.stdout.splitlines()[-1].split(" ", 1)[1])
        assert result["msgs"] > 0 and result["errors"] == 0, result
    finally:
        origin.terminate()
        origin.wait(10)


def test_runner_http_rate(tmp_path):
    """The http-rate workload through the naive relay and wsrelay (keep-alive passes through both)."""
    p = run("-m", "bench", "--only", "http-rate", "--systems", "naive", "wsrelay", "--rounds", "1",
            "--duration", "0.5", "--warmup", "0.2", "--out", str(tmp_path), timeout=90)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]["http-rate"]
    for key in ("naive", "wsrelay"):
        assert summary[key]["value"] > 0 and summary[key]["errors"] == 0, summary[key]
    assert "req/s" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(not shutil.which("nginx", path="/usr/sbin:/usr/bin:/usr/local/sbin"), reason="nginx not installed")
def test_generated_nginx_config_is_valid(tmp_path):
    from bench.proxies import nginx_conf
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, 1, 2))
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    p = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(not shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin"), reason="haproxy not installed")
def test_generated_haproxy_config_is_valid(tmp_path):
    from bench.proxies import haproxy_conf
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(haproxy_conf(tmp_path, 1, 2))
    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    p = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# -- the compressed echo (deflate-64, deflate-4k) --------------------------------------

def test_deflate_sequence_is_a_valid_stream_of_distinct_records():
    """What loadgen --deflate sends, pass after pass, inflates back to the
    records with one inflater kept across messages (context takeover), and
    no record is repeated within a window."""
    from bench.loadgen import deflate_sequence
    for size in (64, 4096):
        plain, first, steady = deflate_sequence(size)
        assert all(len(p) == size for p in plain) and len(set(plain)) == len(plain)
        assert len(plain) * size >= 4 * 32768
        d = zlib.decompressobj(-15)
        assert [d.decompress(c + b"\x00\x00\xff\xff") for c in first + steady + steady] == plain * 3
        assert sum(map(len, steady)) < 0.5 * sum(map(len, plain))  # text-like: it does compress


WS_ECHO = """
import asyncio
from websockets.asyncio.server import serve
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with serve(echo, "127.0.0.1", 0, ping_interval=None) as s:
        print(s.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def test_loadgen_deflate_against_an_origin_that_really_inflates():
    """websockets inflates every message (and would close with 1002 on bad
    data) and compresses its answers with its own window: the load
    generator's stream is real permessage-deflate."""
    origin = subprocess.Popen([sys.executable, "-c", WS_ECHO], stdout=subprocess.PIPE, text=True)
    try:
        port = int(origin.stdout.readline())
        for size in (64, 4096):
            p = run("-m", "bench.loadgen", "--mode", "echo", "--deflate", "--url", f"ws://127.0.0.1:{port}/",
                    "--conns", "2", "--size", str(size), "--warmup", "0.1", "--duration", "0.5")
            assert p.returncode == 0, p.stderr
            result = json.loads(p.stdout.splitlines()[-1].split(" ", 1)[1])
            assert result["msgs"] > 0 and result["errors"] == 0, result
    finally:
        origin.kill()
        origin.wait(10)


def test_runner_deflate_through_the_measuring_relay(tmp_path):
    """The picows origin echoes the compressed frames as they came; wsrelay
    with a limit inflates both directions, so a stream invalid either way
    would end in errors here."""
    p = run("-m", "bench", "--only", "deflate-64", "--systems", "direct", "wsrelay-frames-limit", "--rounds", "1",
            "--duration", "0.5", "--warmup", "0.2", "--out", str(tmp_path), timeout=90)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]["deflate-64"]
    for key in ("direct", "wsrelay-frames-limit"):
        assert summary[key]["value"] > 0 and summary[key]["errors"] == 0, summary[key]
    assert 0 < summary["direct"]["deflate_ratio"] < 0.5


def test_storm_loadgen_against_origin_directly():
    """The reconnect-storm mode: every connection upgrades at once, each latency is kept."""
    origin = subprocess.Popen([sys.executable, "-m", "bench.origin"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(origin.stdout.readline().split(":")[-1])
        assert origin.stdout.readline().strip() == "ready"
        p = run("-m", "bench.loadgen", "--mode", "storm", "--url", f"ws://127.0.0.1:{port}/", "--conns", "200")
        assert p.returncode == 0, p.stderr
        lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines()}
        assert lines["UPGRADED"]["upgraded"] == 200 and lines["RESULT"]["errors"] == 0
        assert 0 < lines["RESULT"]["p50_us"] <= lines["RESULT"]["p99_us"]
    finally:
        origin.terminate()
        origin.wait(10)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_syscalls_per_round_trip_are_counted(tmp_path):
    out = tmp_path / "counts.json"
    p = run("-m", "bench.syscalls", "--only", "echo-64", "--systems", "wsrelay", "--seconds", "1",
            "--json", str(out), timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert "failed" not in r, r
    # epoll: one recv and one send per message each way plus a share of the polling;
    # io_uring: a share of one io_uring_enter (strace's stops batch even more)
    assert r["ops"] > 0 and 0 < r["total_per_op"] < 12, r
    assert "| echo-64 | wsrelay (1 worker) |" in p.stdout


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def test_a_run_ended_by_sigterm_leaves_nothing_behind(tmp_path):
    """`timeout` ends a run with SIGTERM: the origin, the system under test and
    the load generators (each in its own session, so not in the run's process
    group) must go with it, as after a run that ends."""
    import os
    import signal
    import time

    bench = subprocess.Popen([sys.executable, "-m", "bench", "--only", "echo-64", "--systems", "wsrelay",
                              "--rounds", "1", "--duration", "30", "--warmup", "0.2", "--out", str(tmp_path)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not any("bench.loadgen" in _cmdline(p) for p in started):  # the trial runs
            assert time.monotonic() < deadline and bench.poll() is None, "the run never started its load"
            started = _descendants(bench.pid)
            time.sleep(0.05)
        named = {p: _cmdline(p) for p in started}
        bench.send_signal(signal.SIGTERM)
        bench.wait(60)
        deadline = time.monotonic() + 15
        left = named
        while left and time.monotonic() < deadline:
            left = {p: c for p, c in named.items() if c and _cmdline(p) == c}
            time.sleep(0.05)
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        assert not left, f"outlived the run: {sorted(left.values())}"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
