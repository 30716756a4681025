"""Profile wsrelay's worker under one of the benchmark's workloads.

    python -m bench.profile --workload handshake [--seconds 10] [--native] [--out bench/out]
    python -m bench.profile --workload deflate-4k --system wsrelay-frames-limit

Starts the echo origin, wsrelay with one worker and the load generators,
then runs ``py-spy record`` on the worker process (``pip install py-spy``).
Writes a flame graph (``profile-WORKLOAD.svg``), the collapsed stacks
(``profile-WORKLOAD.txt``) and prints the functions with the most samples,
own time and including callees. ``--native`` adds C frames (uvloop, the
kernel entry points) to the stacks.

``--perf`` samples with ``perf record`` instead (every CPU cycle the worker
spends, kernel included, whatever runs it: the interpreter, uvloop, the
engine, the kernel): prints the share of each shared object, user against
kernel, and the top symbols (``perf-WORKLOAD.txt``). Python 3.11 has no perf
trampoline, so Python frames show as the interpreter's own functions; pair it
with a py-spy run to see which Python code that is.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import proxies, runner


def top(collapsed: Path, n: int = 25) -> str:
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        own[_short(frames[-1])] += c
        for f in set(_short(f) for f in frames):
            incl[f] += c
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    out += ["", "including callees:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(n)]
    return "\n".join(out)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; line numbers split one function into many
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(where).name})" if where else name


def main(argv: list[str] | None = None) -> int:
    runner.exit_on_term()
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="echo-64", choices=[w.key for w in runner.workloads(False, 1000)])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--native", action="store_true", help="include native frames (py-spy --native)")
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--perf", action="store_true", help="sample with perf record (kernel included) instead of py-spy")
    ap.add_argument("--system", default="wsrelay", choices=list(proxies.SYSTEMS),
                    help="which row of the benchmark to profile (e.g. wsrelay-pyheads, wsrelay-python; "
                         "nginx or haproxy with --perf, to compare where their time goes)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = ap.parse_args(argv)
    if a.perf and shutil.which("perf") is None:
        print("perf is missing: apt-get install linux-perf", file=sys.stderr)
        return 2
    if not a.perf and not a.system.startswith("wsrelay"):
        print("py-spy profiles Python: use --perf for nginx and HAProxy", file=sys.stderr)
        return 2
    if not a.perf and shutil.which("py-spy") is None:
        print("py-spy is missing: pip install py-spy", file=sys.stderr)
        return 2
    w = next(w for w in runner.workloads(False, 1000) if w.key == a.workload)
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wsrelay-profile-"))
    origin, oport = runner.start_origin(1, None)
    relay = proxies.make(a.system)
    children: list[runner.Child] = []
    try:
        (tmp / "run").mkdir()
        relay.start(origin.http_port if w.mode == "http" else oport, tmp / "run", None)
        # the worker (wsrelay's, nginx's), or the one process (HAProxy -db)
        worker = next((p for p in relay.pids() if p != relay.proc.pid), relay.proc.pid)
        for n in runner._split(w.conns, w.procs):
            children.append(runner.Child(
                [sys.executable, "-m", "bench.loadgen", "--mode", w.mode, "--url", relay.url, "--conns", str(n),
                 "--size", str(w.size), "--warmup", "1", "--duration", str(a.seconds + 2)]
                + (["--deflate"] if w.deflate else [])
                + (["--ca", str(proxies.pki(tmp)["ca"])] if relay.tls else [])
                + (["--resume"] if w.resume else []), None))
        for c in children:
            c.line("READY", 120)
        time.sleep(1.0)
        base = a.out / f"profile-{w.key}" if a.system == "wsrelay" else a.out / f"profile-{w.key}-{a.system}"
        if a.perf:
            return _perf(worker, a, w, children, base.with_name(base.name.replace("profile-", "perf-")))
        # --native has to stop the process to unwind C stacks; Python-only sampling need not
        spy = ["py-spy", "record", "--pid", str(worker), "--duration", str(int(a.seconds)), "--rate", str(a.rate)]
        spy += ["--native"] if a.native else ["--nonblocking"]
        done = subprocess.run(spy + ["--format", "raw", "-o", f"{base}.txt"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"py-spy failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        if w.mode != "idle":
            results = [c.line("RESULT", 60 + a.seconds) for c in children]
            rate = sum(r["msgs"] for r in results) / (a.seconds + 2)
            print(f"{w.title}: {rate:,.0f} per second while profiled (the profiler slows the worker)")
        print(top(Path(f"{base}.txt")))
        # the flame graph from the same stacks, without a second recording
        _flamegraph(Path(f"{base}.txt"), Path(f"{base}.svg"))
        print(f"wrote {base}.txt and {base}.svg")
    finally:
        for c in children:
            c.kill()
        relay.stop()
        origin.terminate()
        origin.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _perf(worker: int, a, w, children, base: Path) -> int:
    data = base.with_suffix(".data")
    t0 = _cpu(worker)
    done = subprocess.run(["perf", "record", "-F", str(a.rate * 4), "-g", "-p", str(worker), "-o", str(data),
                           "--", "sleep", str(a.seconds)], capture_output=True, text=True)
    t1 = _cpu(worker)
    if done.returncode != 0:
        print(f"perf record failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    rate = None
    if w.mode != "idle":
        results = [c.line("RESULT", 60 + a.seconds) for c in children]
        rate = sum(r["msgs"] for r in results) / (a.seconds + 2)
        print(f"{w.title}: {rate:,.0f} per second while profiled")
    user, system = t1[0] - t0[0], t1[1] - t0[1]
    print(f"worker CPU over {a.seconds:g}s: user {user:.2f}s, system {system:.2f}s")
    if rate:
        print(f"  per operation (at the loaded rate): user {user * 1e6 / (rate * a.seconds):.1f} us, "
              f"system {system * 1e6 / (rate * a.seconds):.1f} us")
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso",
                             "-g", "none", "--percent-limit", "0.5"], capture_output=True, text=True).stdout
    syms = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
                           "-g", "none", "--percent-limit", "0.4"], capture_output=True, text=True).stdout
    text = "by shared object:\n" + _rows(report) + "\n\ntop symbols:\n" + _rows(syms)
    base.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"wrote {base}.txt ({data} for perf report)")
    return 0


def _rows(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if line.strip() and not line.startswith("#"))


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _flamegraph(collapsed: Path, svg: Path) -> None:
    """A simple icicle chart with matplotlib, since py-spy writes one format per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tree: dict = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        node = tree
        for f in stack.split(";"):
            f = _short(f)
            entry = node.setdefault(f, [0, {}])
            entry[0] += c
            node = entry[1]
    if not total:
        return
    rects = []

    def walk(node: dict, x: float, depth: int) -> None:
        for name, (c, kids) in sorted(node.items()):
            wdt = c / total
            rects.append((x, depth, wdt, name))
            walk(kids, x, depth + 1)
            x += wdt
    walk(tree, 0.0, 0)
    depth = max(r[1] for r in rects) + 1
    fig, ax = plt.subplots(figsize=(16, max(4, depth * 0.28)))
    for x, d, wdt, name in rects:
        ax.barh(d, wdt, left=x, height=0.95, color=plt.cm.YlOrRd(0.2 + 0.6 * ((hash(name) % 97) / 97)),
                edgecolor="white", linewidth=0.3)
        if wdt > 0.04:
            ax.text(x + 0.002, d, name[: int(wdt * 160)], va="center", fontsize=6)
    ax.set_ylim(depth, -1)
    ax.set_xlim(0, 1)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(svg)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
