"""``python -m bench``: wsrelay against nginx, HAProxy, a naive relay and a
direct connection, in one interleaved run. See bench/README.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import proxies, report, runner


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark wsrelay against nginx, HAProxy, a naive asyncio relay and a direct "
                    "connection (all on 127.0.0.1), interleaved in one run; prints a table and writes "
                    "results.md, results.json and chart.png.",
        # from the tables themselves, so a workload or system added there is listed here
        epilog=f"workloads: {', '.join(w.key for w in runner.workloads(False, 1000))}. "
               f"systems: {', '.join(proxies.SYSTEMS)}.")
    ap.add_argument("--quick", action="store_true",
                    help="about a minute: 1 round, 1 s windows, 64 B / 1 MiB / handshakes / 1,000 idle / HTTP")
    ap.add_argument("--rounds", type=int, help="repetitions of every trial (default 3, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds measured per trial (default 8, quick 1)")
    ap.add_argument("--warmup", type=float, help="seconds before measuring (default 1.5, quick 0.4)")
    ap.add_argument("--idle-conns", type=int, help="idle connections (default 10000, quick 1000; "
                    "capped by the fd limit: a proxy holds 2 fds per tunnel)")
    ap.add_argument("--settle", type=float, default=None, help="seconds idle connections rest before RSS is read")
    ap.add_argument("--only", nargs="+", metavar="WORKLOAD", help="run only these workloads")
    ap.add_argument("--systems", nargs="+", metavar="SYSTEM", help="run only these systems")
    ap.add_argument("--pin", action="store_true",
                    help="pin the proxy to the last CPU and the load generator + origin to the others")
    ap.add_argument("--origin-procs", type=int, default=1, help="echo origin processes")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                    help="output directory (default bench/out)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep generated configs and logs")
    a = ap.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.duration = a.duration or (1.0 if q else 8.0)
    a.warmup = a.warmup if a.warmup is not None else (0.4 if q else 1.5)
    a.idle_conns = a.idle_conns or (1000 if q else 10000)
    a.settle = a.settle if a.settle is not None else (0.5 if q else 2.0)
    return a


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    runner.exit_on_term()
    env = report.environment()
    print(f"# {env['machine']}; python {env['python']}, uvloop {env['uvloop']}, picows {env['picows']}; "
          f"{env['nginx']}; {env['haproxy']}", flush=True)
    run = runner.run(opts, log=lambda s: print(s, flush=True))
    run["environment"] = env
    print()
    print(report.console(run))
    for p in report.write(run, opts.out):
        print(f"wrote {p}")
    failed = [t for t in run["trials"] if "failed" in t]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
