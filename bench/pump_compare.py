"""epoll or io_uring for the native pump: the same load through C relays
(bench/pumps/pump.c: relay/native/engine.c on each of its two backends, and
the first io_uring prototype with multishot recv), interleaved.

    python -m bench.pump_compare [--rounds 3] [--seconds 4]

Per message size: round trips/s, the pump's user and system CPU per round
trip (from /proc), and its syscalls per round trip (perf's raw_syscalls
tracepoint, if perf works here). Needs gcc and liburing-dev.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procstat, proxies
from bench.runner import Child, start_origin

HERE = Path(__file__).resolve().parent
SIZES = {"64 B": (64, 50), "4 KiB": (4096, 50), "1 MiB": (1 << 20, 4)}


def build(tmp: Path) -> Path:
    exe = tmp / "pump"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "pumps" / "pump.c"),
                    str(HERE.parent / "relay" / "native" / "engine.c"), "-luring"], check=True)
    return exe


def trial(exe: Path, kind: str, size: int, conns: int, origin_port: int, seconds: float) -> dict:
    port = proxies.free_port()
    pump = subprocess.Popen([str(exe), kind, str(port), str(origin_port)], stdout=subprocess.PIPE, text=True)
    kids: list[Child] = []
    perf = None
    try:
        assert "listening" in pump.stdout.readline()
        url = f"ws://127.0.0.1:{port}/"
        per = [conns // 2 + conns % 2, conns // 2] if conns > 4 else [conns]
        kids = [Child([sys.executable, "-m", "bench.loadgen", "--steered", "--mode", "echo", "--url", url,
                       "--conns", str(n), "--size", str(size), "--warmup", "1", "--duration", str(seconds)], None)
                for n in per]
        for k in kids:
            k.line("READY", 30)
        t0 = time.monotonic_ns() + 200_000_000
        for k in kids:
            k.send(f"START {t0}")
        time.sleep(0.2 + 1.0)
        u0, s0 = procstat.cpu_split(pump.pid)
        try:
            perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", str(pump.pid),
                                     "--", "sleep", str(seconds - 0.2)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            perf = None
        w0 = time.monotonic()
        time.sleep(seconds - 0.2)
        u1, s1 = procstat.cpu_split(pump.pid)
        wall = time.monotonic() - w0
        res = [k.line("RESULT", 60) for k in kids]
        rate = sum(r["msgs"] for r in res) / seconds
        out = {"rate": rate, "user_us": (u1 - u0) / wall * 1e6 / rate, "sys_us": (s1 - s0) / wall * 1e6 / rate,
               "errors": sum(r["errors"] for r in res)}
        if perf is not None:
            err = perf.communicate(timeout=30)[1]
            for line in err.splitlines():
                parts = line.split(",")
                if len(parts) > 2 and "raw_syscalls" in parts[2] and parts[0].isdigit():
                    out["syscalls"] = int(parts[0]) / wall / rate
        return out
    finally:
        for k in kids:
            k.kill()
        pump.kill()
        pump.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pump_compare", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--pumps", nargs="+", choices=("epoll", "uring", "multishot", "splice"), default=["epoll", "uring"],
                    help="epoll / uring: relay/native/engine.c's two backends; multishot: the first prototype; "
                         "splice: socket -> pipe -> socket, no user-space copy")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="pump-compare-"))
    exe = build(tmp)
    origin, origin_port = start_origin(1, None)
    got: dict = {}
    try:
        for rnd in range(a.rounds):
            for label, (size, conns) in SIZES.items():
                if label not in a.only:
                    continue
                kinds = list(a.pumps) if rnd % 2 == 0 else list(reversed(a.pumps))
                for kind in kinds:
                    r = trial(exe, kind, size, conns, origin_port, a.seconds)
                    got.setdefault((label, kind), []).append(r)
                    print(f"  [{rnd}] {label:6s} {kind:6s} {r['rate']:9.0f} rt/s  user {r['user_us']:7.2f} us  "
                          f"sys {r['sys_us']:7.2f} us  syscalls {r.get('syscalls', float('nan')):6.2f} per rt  "
                          f"errors {r['errors']}", flush=True)
    finally:
        origin.terminate()
        origin.wait(10)
    print("\n| size | pump | round trips/s | user µs/rt | sys µs/rt | user+sys µs/rt | syscalls/rt |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for (label, kind), rs in got.items():
        med = {k: statistics.median(r[k] for r in rs if k in r) for k in ("rate", "user_us", "sys_us")}
        sc = [r["syscalls"] for r in rs if "syscalls" in r]
        print(f"| {label} | {kind} | {med['rate']:,.0f} | {med['user_us']:.2f} | {med['sys_us']:.2f} | "
              f"{med['user_us'] + med['sys_us']:.2f} | {statistics.median(sc) if sc else float('nan'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
