"""Syscalls per round trip and per handshake cycle, counted on the proxy's
processes while the load generator runs a closed loop through it.

    python -m bench.syscalls                          # strace -c -f, every system, echo-64/4k/1m + handshake
    python -m bench.syscalls --tool perf --only echo-64 --systems nginx wsrelay

``--tool strace`` (the default) attaches ``strace -c -f`` to every process
of the system under test for the window; ``--tool perf`` counts the
``syscalls:sys_enter_*`` tracepoints instead (``perf stat``, far less
overhead, needs linux-perf). strace stops the traced process at every call,
which slows it and so batches more events per ``epoll_wait``: its
``epoll_wait`` figures are a lower bound, its read/write figures are not
affected. The table gives calls per operation (a 64 B round trip = one
message each way; a cycle = connect + upgrade + one echo + close), by
syscall, and their total.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import proxies
from bench.runner import Child, exit_on_term, start_origin

WORKLOADS = {
    # key: (mode, connections or loops, size)
    "echo-64": ("echo", 50, 64),
    "echo-4k": ("echo", 50, 4096),
    "echo-1m": ("echo", 4, 1 << 20),
    "handshake": ("handshake", 8, 64),
    # TLS (the *-tls systems): a cycle = connect + TLS 1.3 handshake (full or resumed) + upgrade + echo + close
    "tls-handshake": ("tls-handshake", 8, 64),
    "tls-resume": ("tls-handshake", 8, 64),
}


def count(tool: str, pids: list[int], out: Path) -> subprocess.Popen:
    if tool == "strace":
        argv = ["strace", "-c", "-f", "-q", "-o", str(out)]
        for p in pids:
            argv += ["-p", str(p)]
    else:
        argv = ["perf", "stat", "-x", ",", "-o", str(out), "-e", "syscalls:sys_enter_*",
                "-p", ",".join(str(p) for p in pids)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def parse(tool: str, text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    if tool == "strace":
        # % time  seconds  usecs/call  calls  [errors]  syscall
        for line in text.splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m and m.group(2) != "total":
                calls[m.group(2)] = calls.get(m.group(2), 0) + int(m.group(1))
    else:
        for line in text.splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_") and parts[0].isdigit():
                n = int(parts[0])
                if n:
                    calls[parts[2][len("syscalls:sys_enter_"):]] = n
    return calls


def measure(workload: str, key: str, origin, origin_port: int, tool: str, seconds: float, tmp: Path) -> dict:
    mode, conns, size = WORKLOADS[workload]
    sysm = proxies.make(key)
    children: list[Child] = []
    counter = None
    try:
        sysm.start(origin_port, tmp, None)
        time.sleep(0.3)
        procs = 2 if conns > 4 else 1
        per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        for i, n in enumerate(per):
            argv = [sys.executable, "-m", "bench.loadgen", "--steered", "--mode", mode,
                    "--url", sysm.url, "--conns", str(n), "--size", str(size), "--warmup", "0",
                    "--duration", str(seconds)]
            if sysm.tls:
                argv += ["--ca", str(proxies.pki(tmp.parent)["ca"])]  # the one sysm.start() serves
            if workload == "tls-resume":
                argv.append("--resume")
            children.append(Child(argv, None))
        for c in children:
            c.line("READY", 60)
        out = tmp / f"count-{workload}-{key}.txt"
        counter = count(tool, sysm.pids(), out)
        time.sleep(1.0)  # attached to every process
        t0 = time.monotonic_ns() + 200_000_000
        for c in children:
            c.send(f"START {t0}")
        results = [c.line("RESULT", 120 + seconds) for c in children]
        counter.send_signal(signal.SIGINT)
        counter.wait(30)
        ops = sum(r["msgs"] for r in results)
        calls = parse(tool, out.read_text(errors="replace"))
        # Connections set up before the window and torn down after it are outside the count;
        # the load generators' own START/RESULT take no proxy syscalls.
        per_op = {k: v / ops for k, v in sorted(calls.items(), key=lambda kv: -kv[1])} if ops else {}
        return {"workload": workload, "system": key, "ops": ops, "calls": calls, "per_op": per_op,
                "total_per_op": sum(per_op.values()), "errors": sum(r["errors"] for r in results)}
    except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
        return {"workload": workload, "system": key, "failed": f"{type(e).__name__}: {e}"}
    finally:
        if counter is not None and counter.poll() is None:
            os.killpg(counter.pid, signal.SIGKILL)
            counter.wait()
        for c in children:
            c.kill()
        sysm.stop()


def table(results: list[dict]) -> str:
    lines = ["| workload | system | operations | syscalls per operation | of which |", "|---|---|--:|--:|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['workload']} | {r['system']} | – | failed: {r['failed']} | |")
            continue
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["per_op"].items())[:7])
        lines.append(f"| {r['workload']} | {proxies.SYSTEMS[r['system']]['label']} | {r['ops']:,} | "
                     f"**{r['total_per_op']:.2f}** | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    exit_on_term()
    p = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=("strace", "perf"), default="strace")
    p.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--systems", nargs="+", default=["nginx", "haproxy", "wsrelay", "wsrelay-python"])
    p.add_argument("--seconds", type=float, default=3.0, help="closed-loop window per measurement")
    p.add_argument("--json", metavar="PATH", help="also write every count here")
    a = p.parse_args(argv)
    if shutil.which(a.tool) is None:
        print(f"{a.tool} is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="wsrelay-syscalls-"))
    origin, port = start_origin(1, None)
    results = []
    try:
        for w in a.only:
            for key in a.systems:
                r = measure(w, key, origin, port, a.tool, a.seconds, tmp)
                results.append(r)
                print(f"  {w:9s} {key:15s} " + (f"{r['total_per_op']:.2f} syscalls/op over {r['ops']:,} ops"
                                                  if "failed" not in r else "FAILED " + r["failed"]), flush=True)
    finally:
        origin.terminate()
        origin.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"Syscalls per operation ({a.tool}), {time.strftime('%Y-%m-%d %H:%M')}:")
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
