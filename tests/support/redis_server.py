"""A real ``redis-server`` (Debian's package) for the cluster tests, started
by the test itself: no persistence, so a restart comes back empty."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.support.relay import wait_for

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server missing (apt-get install redis-server)")


class RedisServer:
    """redis-server on a unix socket in ``directory`` (and on ``port`` of
    ``host`` if given), as a child process: :meth:`kill` is a crash."""

    def __init__(self, directory: str, port: int = 0, host: str = "127.0.0.1", netns: str | None = None):
        self.dir = directory
        self.sock = os.path.join(directory, "redis.sock")
        self.port = port
        self.host = host
        self.netns = netns
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> "RedisServer":
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--unixsocket", self.sock,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--protected-mode", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, what="redis-server to answer")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited ({self.proc.returncode})")
        try:
            with self.client() as c:
                return c.ping()
        except Exception:  # noqa: BLE001 - not yet
            return False

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=self.sock, socket_timeout=5, decode_responses=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()

    def leases(self, name: str) -> dict[str, tuple[int, int]]:
        """Live hosts of fleet ``name``: id -> (lease, held), as Redis holds them."""
        from workers.cluster import prefix

        p = prefix(name)
        out = {}
        with self.client() as c:
            for h in c.smembers(p + "hosts"):
                v = c.hmget(p + "host:" + h, "lease", "held")
                if v[0] is not None:
                    out[h] = (int(v[0]), int(v[1]))
        return out

    def commands(self) -> dict[str, int]:
        """INFO commandstats: calls per command (those run by scripts included)."""
        with self.client() as c:
            return {k.removeprefix("cmdstat_"): v["calls"] for k, v in c.info("commandstats").items()}
