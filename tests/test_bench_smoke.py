"""Smoke test of the benchmark tooling (bench/): the pieces start, talk and
report, in a few seconds. The benchmark itself is run by hand:
``python -m bench --quick``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
