"""The three proxies under comparison, started once per session.

- ``nginx`` and ``haproxy``: Debian's packages with the benchmark's own
  configurations (:func:`bench.proxies.nginx_conf`, :func:`bench.proxies.haproxy_conf`:
  one worker / one thread, HTTP/1.1 keep-alive to the upstream, WebSocket
  upgrades passed through), so the anchors are the ones the README's
  figures compare against.
- ``wsrelay``: the real supervisor with one worker (:class:`tests.support.relay.Relay`),
  ``RELAY_ALLOWED_ORIGINS`` set so the corpus can reach the 403 refusal.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import proxies as bench_proxies
from tests.support.relay import Relay

ANCHORS = ("nginx", "haproxy")
NAMES = ("wsrelay",) + ANCHORS
ALLOWED_ORIGIN = "https://allowed.test"


def missing() -> list[str]:
    """Which anchor binaries are not installed (the harness skips without them)."""
    return [name for name in ANCHORS
            if shutil.which(name) is None and shutil.which(name, path="/usr/sbin:/usr/local/sbin") is None]


class Proxies:
    """Each proxy in front of its own origin listener; ``ports`` by name."""

    def __init__(self, origin_ports: dict[str, int], tmp: Path) -> None:
        self.origin_ports = origin_ports
        self.tmp = tmp
        self.ports: dict[str, int] = {}
        self.relay: Relay | None = None
        self.systems: list[bench_proxies.System] = []

    def start(self) -> "Proxies":
        try:
            for name in ANCHORS:
                d = self.tmp / name
                d.mkdir(parents=True, exist_ok=True)
                system = bench_proxies.make(name)
                system.start(self.origin_ports[name], d, cpus=None)
                self.systems.append(system)
                self.ports[name] = system.port
            self.relay = Relay(f"127.0.0.1:{self.origin_ports['wsrelay']}", workers=1, metrics=False,
                               env={"RELAY_ALLOWED_ORIGINS": ALLOWED_ORIGIN, "RELAY_ACCESS_LOG": "0"}).start()
            self.ports["wsrelay"] = self.relay.port
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> list[str]:
        """Names of proxies whose process has exited (empty when all run)."""
        dead = [s.key for s in self.systems if s.proc is None or s.proc.poll() is not None]
        if self.relay is None or self.relay.proc.poll() is not None:
            dead.append("wsrelay")
        return dead

    def stop(self) -> None:
        for system in self.systems:
            system.stop()
        self.systems = []
        if self.relay is not None:
            self.relay.__exit__(None, None, None)
            self.relay = None
