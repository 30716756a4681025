"""Workloads, the interleaved schedule, one trial, and the aggregation.

A trial = one system under test started fresh + several load-generator
processes started together (``START`` at one monotonic instant) + CPU samples
of every process at the edges of the measuring window, read from /proc.
Repetitions run every (workload, system) pair once per round, the order of
systems rotated each round, so drift on a shared machine hits all of them
alike; the figure reported for a pair is the median over rounds.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import procstat, proxies

ANCHORS = ("nginx", "haproxy")
PROXIED = ("nginx", "haproxy", "naive", "wsrelay", "wsrelay-python")
TLS_SYSTEMS = ("nginx-tls", "haproxy-tls", "wsrelay-tls")


@dataclass
class Workload:
    key: str
    title: str
    mode: str                 # echo | handshake | idle | http | storm
    conns: int                # connections (echo, idle, http) or loops (handshake)
    size: int = 64
    systems: tuple[str, ...] = ("direct",) + PROXIED
    procs: int = 2            # load-generator processes
    metric: str = "msgs/s"    # the figure the ratios are taken on
    higher_better: bool = True
    pinned: bool = True       # follow --pin (the scaling workload never pins)
    deflate: bool = False     # echo with permessage-deflate (bench/loadgen.py --deflate)
    resume: bool = False      # tls-handshake: resume the previous cycle's session


def workloads(quick: bool, idle_conns: int) -> list[Workload]:
    wl = [
        # frames mode next to tunnel mode where per-chunk work shows most
        Workload("echo-64", "64 B echo, 50 conns", "echo", 50, 64,
                 systems=("direct",) + PROXIED + ("wsrelay-frames",)),
        Workload("echo-4k", "4 KiB echo, 50 conns", "echo", 50, 4096,
                 systems=("direct",) + PROXIED + ("wsrelay-frames",)),
        Workload("echo-1m", "1 MiB echo, 4 conns", "echo", 4, 1 << 20, metric="MB/s"),
        Workload("handshake", "handshakes, 8 loops", "handshake", 8, metric="handshakes/s",
                 systems=("direct",) + PROXIED + ("wsrelay-nofast", "wsrelay-pyheads")),
        # every proxy writing its access log (each its own default way: System.access_log)
        Workload("handshake-log", "handshakes, 8 loops, access log on", "handshake", 8, metric="handshakes/s",
                 systems=("nginx-log", "haproxy-log", "wsrelay-log", "wsrelay-log-nofast")),
        # routing decided once per request, at a cost that does not grow with the routes
        Workload("handshake-routes", "handshakes, 8 loops, 50 routes vs 1", "handshake", 8,
                 metric="handshakes/s", systems=("nginx", "haproxy", "wsrelay-routes-1", "wsrelay-routes-50",
                                                 "wsrelay-routes-1-nofast")),
        # cluster mode (RELAY_CLUSTER_REDIS) off vs on: the lease never sits on a handshake's path
        Workload("cluster-hs", "handshakes, 8 loops, cluster mode off vs on", "handshake", 8,
                 metric="handshakes/s", systems=("wsrelay", "wsrelay-cluster")),
        Workload("handshake-perip", "handshakes, 8 loops, per-IP limit off vs on", "handshake", 8,
                 metric="handshakes/s", systems=("wsrelay", "wsrelay-perip")),
        Workload("idle", f"{idle_conns:,} idle conns", "idle", idle_conns, systems=PROXIED,
                 procs=4, metric="KiB/tunnel", higher_better=False),
        # ... with the access logs on: what a tunnel keeps for its line (wsrelay: the fast path's record)
        Workload("idle-log", f"{idle_conns:,} idle conns, access log on", "idle", idle_conns,
                 systems=("nginx-log", "haproxy-log", "wsrelay-log"), procs=4, metric="KiB/tunnel",
                 higher_better=False),
        # 5,000 clients connecting at once (a reconnect storm after an outage or a deploy):
        # seconds until every one is upgraded; p99 = handshake latency of one client
        Workload("storm", "reconnect storm, 5,000 clients at once", "storm", 5000, systems=PROXIED + ("wsrelay-nofast", "wsrelay-pyheads"),
                 procs=4, metric="s to all upgraded", higher_better=False),
        Workload("scale-64", "64 B echo, 50 conns, 2 vs 1 worker", "echo", 50, 64,
                 systems=("wsrelay", "wsrelay-2w"), pinned=False),
        Workload("metrics-64", "64 B echo, 50 conns, /metrics off vs on", "echo", 50, 64,
                 systems=("wsrelay", "wsrelay-metrics")),
        # permessage-deflate end to end; the message limit makes frames mode inflate both ways
        Workload("deflate-64", "64 B compressed echo, 50 conns", "echo", 50, 64, deflate=True,
                 systems=("direct", "haproxy", "wsrelay", "wsrelay-frames", "wsrelay-frames-limit")),
        Workload("deflate-4k", "4 KiB compressed echo, 50 conns", "echo", 50, 4096, deflate=True,
                 systems=("direct", "haproxy", "wsrelay", "wsrelay-frames", "wsrelay-frames-limit")),
        # plain HTTP/1.1 (the long-polling fallback): keep-alive GETs to the origin's HTTP port,
        # size = the origin's response body (bench.origin.HTTP_BODY)
        Workload("http-rate", "HTTP GET, 128 B body, 50 keep-alive conns", "http", 50, 128, metric="req/s"),
        # TLS termination (README, "TLS"): the same ECDSA P-256 certificate and TLS 1.3 for all
        Workload("tls-echo-64", "wss 64 B echo, 50 conns", "echo", 50, 64, systems=TLS_SYSTEMS),
        Workload("tls-echo-4k", "wss 4 KiB echo, 50 conns", "echo", 50, 4096, systems=TLS_SYSTEMS),
        Workload("tls-echo-1m", "wss 1 MiB echo, 4 conns", "echo", 4, 1 << 20, metric="MB/s", systems=TLS_SYSTEMS),
        Workload("tls-handshake", "full TLS handshakes + upgrade + echo, 8 loops", "tls-handshake", 8,
                 metric="handshakes/s", systems=TLS_SYSTEMS),
        Workload("tls-resume", "resumed TLS handshakes + upgrade + echo, 8 loops", "tls-handshake", 8,
                 metric="handshakes/s", systems=TLS_SYSTEMS, resume=True),
        Workload("tls-idle", f"{idle_conns:,} idle wss conns", "idle", idle_conns, systems=TLS_SYSTEMS,
                 procs=4, metric="KiB/tunnel", higher_better=False),
    ]
    if quick:
        keep = {"echo-64", "echo-1m", "handshake", "idle", "http-rate", "storm"}
        wl = [w for w in wl if w.key in keep]
    return wl


# -- talking to load generators -------------------------------------------------

class Child:
    """A load-generator process with a line reader that can time out."""

    def __init__(self, argv: list[str], cpus: set[int] | None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, cwd=str(Path(__file__).resolve().parent.parent),
                                     preexec_fn=proxies.pinned(cpus), start_new_session=True)
        self.buf = b""

    def line(self, tag: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                word, _, rest = raw.decode().partition(" ")
                if word == tag:
                    return json.loads(rest)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"load generator: no {tag} in {timeout:.0f}s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-800:]
                    raise RuntimeError(f"load generator exited before {tag}: {err}")
                self.buf += chunk

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- one trial ------------------------------------------------------------------------

@dataclass
class Layout:
    """Which CPUs the system under test and the load (clients + origin) may use."""
    proxy: set[int] | None = None
    load: set[int] | None = None


def run_trial(w: Workload, key: str, origin_pid: int, origin_port: int, opts, tmp_root: Path,
              layout: Layout) -> dict:
    sysm = proxies.make(key)
    tmp = Path(tempfile.mkdtemp(prefix=f"{w.key}-{key}-", dir=tmp_root))
    cpus = layout if w.pinned else Layout()
    children: list[Child] = []
    res: dict = {"workload": w.key, "system": key}
    try:
        sysm.start(origin_port, tmp, cpus.proxy)
        time.sleep(0.3)  # let a freshly started runtime settle before the baseline
        ppids = sysm.pids()
        rss_before = procstat.rss_kib(ppids)
        warmup, duration = opts.warmup, opts.duration
        for i, n in enumerate(_split(w.conns, w.procs)):
            argv = [sys.executable, "-m", "bench.loadgen", "--steered", "--mode", w.mode, "--url", sysm.url,
                    "--conns", str(n), "--size", str(w.size), "--warmup", str(warmup),
                    "--duration", str(duration), "--lat-file", str(tmp / f"lat-{i}.bin")]
            if w.deflate:
                argv.append("--deflate")
            if sysm.tls:
                argv += ["--ca", str(proxies.pki(tmp_root)["ca"])]
            if w.resume:
                argv.append("--resume")
            children.append(Child(argv, cpus.load))
        connect_timeout = 30 + w.conns / 200
        readies = [c.line("READY", connect_timeout) for c in children]
        connected = sum(r["connected"] for r in readies)
        origin_pids = procstat.tree(origin_pid)
        load_pids = [c.proc.pid for c in children]
        if w.mode == "idle":
            time.sleep(opts.settle)
            ppids = sysm.pids()
            rss_after = procstat.rss_kib(ppids)
            for c in children:
                c.send("STOP")
            results = [c.line("RESULT", 60) for c in children]
            n = max(1, connected)
            res.update(connected=connected, requested=w.conns, rss_before_kib=rss_before, rss_after_kib=rss_after,
                       value=(rss_after - rss_before) / n, lost=sum(r["lost"] for r in results))
        elif w.mode == "storm":
            t0 = time.monotonic_ns() + 300_000_000
            origin_pids = procstat.tree(origin_pid)
            cpu0 = procstat.cpu_seconds(ppids)
            for c in children:
                c.send(f"START {t0}")
            ups = [c.line("UPGRADED", 180) for c in children]
            cpu1 = procstat.cpu_seconds(sysm.pids())
            for c in children:
                c.send("STOP")
            results = [c.line("RESULT", 60) for c in children]
            upgraded = sum(u["upgraded"] for u in ups)
            connected = upgraded
            res.update(connected=upgraded, requested=w.conns, value=(max(u["last_ns"] for u in ups) - t0) / 1e9,
                       proxy_cpu_s=cpu1 - cpu0, **_latency(tmp, len(children)))
        else:
            t0 = time.monotonic_ns() + 300_000_000
            for c in children:
                c.send(f"START {t0}")
            _sleep_until(t0 + int(warmup * 1e9))
            ppids = sysm.pids()
            cpu0 = [procstat.cpu_seconds(p) for p in (ppids, origin_pids, load_pids)]
            split0 = procstat.cpu_user_system(ppids)
            redis0 = sysm.redis_commands()
            w0 = time.monotonic()
            _sleep_until(t0 + int((warmup + duration) * 1e9))
            cpu1 = [procstat.cpu_seconds(p) for p in (ppids, origin_pids, load_pids)]
            split1 = procstat.cpu_user_system(ppids)
            redis1 = sysm.redis_commands()
            wall = time.monotonic() - w0
            results = [c.line("RESULT", 60 + duration) for c in children]
            msgs = sum(r["msgs"] for r in results)
            rate = msgs / duration
            proxy_cpu, origin_cpu, load_cpu = ((b - a) / wall for a, b in zip(cpu0, cpu1))
            if w.deflate:
                res["deflate_ratio"] = results[0].get("deflate_ratio")
            res.update(msgs=msgs, msgs_s=rate, mb_s=rate * w.size / 1e6, proxy_cpu=proxy_cpu,
                       origin_cpu=origin_cpu, load_cpu=load_cpu, connected=connected,
                       **_latency(tmp, len(children)))
            res["value"] = res["mb_s"] if w.metric == "MB/s" else rate
            if redis0 is not None and redis1 is not None and msgs:
                # Redis work per 1,000 handshakes in the window: script calls (round trips), and every
                # command Redis ran, those inside the script included (INFO commandstats counts both)
                done = {k: v - redis0.get(k, 0) for k, v in redis1.items() if k != "info"}
                res["redis_calls_per_1k"] = 1000 * (done.get("evalsha", 0) + done.get("eval", 0)) / msgs
                res["redis_cmds_per_1k"] = 1000 * sum(done.values()) / msgs
            # what one core of this proxy carries: the figure that survives a noisy machine
            res["per_core"] = res["value"] / proxy_cpu if key != "direct" and proxy_cpu > 0 else None
            res["proxy_us_per_msg"] = proxy_cpu * 1e6 / rate if key != "direct" and rate else None
            if key != "direct" and msgs:
                # where the proxy's CPU goes per operation: its own code (user) or the kernel (system)
                res["proxy_user_us"] = (split1[0] - split0[0]) * 1e6 / msgs * duration / wall
                res["proxy_sys_us"] = (split1[1] - split0[1]) * 1e6 / msgs * duration / wall
        res["errors"] = sum(r["errors"] for r in results)  # connect errors included
        kinds: dict[str, int] = {}
        for r in results:
            for k, v in r.get("error_kinds", {}).items():
                kinds[k] = kinds.get(k, 0) + v
        res["error_kinds"] = kinds
        if w.mode not in ("handshake", "tls-handshake") and connected < w.conns:
            res["errors"] += w.conns - connected
            kinds["not_connected"] = w.conns - connected
    except Exception as e:  # one failed trial must not lose the whole run
        res["failed"] = f"{type(e).__name__}: {e}"
    finally:
        for c in children:
            c.kill()
        sysm.stop()
        if not opts.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return res


def _sleep_until(t_ns: int) -> None:
    d = (t_ns - time.monotonic_ns()) / 1e9
    if d > 0:
        time.sleep(d)


def _latency(tmp: Path, n: int) -> dict:
    """Percentiles over every process's samples (exact: all samples are kept)."""
    import array
    lat = array.array("q")
    for i in range(n):
        path = tmp / f"lat-{i}.bin"
        if path.exists():
            with open(path, "rb") as f:
                lat.frombytes(f.read())
    if not len(lat):
        return {"p50_us": None, "p99_us": None, "p999_us": None}
    s = sorted(lat)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1e3
    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999)}


# -- the whole run ----------------------------------------------------------------------

def exit_on_term() -> None:
    """SIGTERM and SIGHUP (a ``timeout``, a closed terminal) end a run through
    its ``finally`` blocks, which stop what it started: the origin, the
    systems under test and the load generators each run in their own session
    (out of reach of a signal to the run's process group), and Python's
    default action for these signals skips ``finally``, leaving them all
    running."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def start_origin(procs: int, cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    """The origin processes and their WebSocket port; ``proc.http_port`` is
    where the same processes answer plain HTTP (the ``http`` workloads)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.origin", "--procs", str(procs),
                             "--http", f"{proxies.HOST}:0"],
                            stdout=subprocess.PIPE, text=True, preexec_fn=proxies.pinned(cpus),
                            cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"origin did not start: {line!r}")
    port = int(line.split(":")[-1])
    line = proc.stdout.readline()
    if not line.startswith("http on "):
        raise RuntimeError(f"origin did not serve HTTP: {line!r}")
    proc.http_port = int(line.split(":")[-1])
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("origin did not get ready")
    return proc, port


def layout_for(pin: bool) -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return Layout()
    return Layout(proxy={cpus[-1]}, load=set(cpus[:-1]))


def run(opts, log=print) -> dict:
    wls = workloads(opts.quick, min(opts.idle_conns, proxies.max_tunnels()))
    if opts.only:
        wls = [w for w in wls if w.key in opts.only]
    if opts.systems:
        for w in wls:
            w.systems = tuple(s for s in w.systems if s in opts.systems)
    layout = layout_for(opts.pin)
    tmp_root = Path(tempfile.mkdtemp(prefix="wsrelay-bench-"))
    origin, origin_port = start_origin(opts.origin_procs, layout.load)
    trials: list[dict] = []
    started = time.time()
    load_before = os.getloadavg()
    try:
        for rnd in range(opts.rounds):
            for w in wls:
                order = list(w.systems)
                k = rnd % len(order)
                order = order[k:] + order[:k]
                for key in order:
                    port = origin.http_port if w.mode == "http" else origin_port
                    t = run_trial(w, key, origin.pid, port, opts, tmp_root, layout)
                    t["round"] = rnd
                    trials.append(t)
                    log(_trial_line(w, t))
    finally:
        origin.terminate()
        try:
            origin.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(origin.pid, signal.SIGKILL)
            origin.wait()
        if not opts.keep_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "options": {k: (sorted(v) if isinstance(v, (set, tuple)) else v) for k, v in vars(opts).items()},
        "layout": {"proxy": sorted(layout.proxy or []), "load": sorted(layout.load or [])},
        "workloads": [asdict(w) for w in wls],
        "trials": trials,
        "summary": summarize(wls, trials),
    }


def _trial_line(w: Workload, t: dict) -> str:
    if "failed" in t:
        return f"  [{t['round']}] {w.key:9s} {t['system']:10s} FAILED {t['failed']}"
    if w.mode == "storm":
        return (f"  [{t['round']}] {w.key:9s} {t['system']:10s} {t['value']:8.3f} s to all upgraded "
                f"({t['connected']} of {t.get('requested')}), p99 {t['p99_us'] or 0:8.0f} us, "
                f"proxy CPU {t.get('proxy_cpu_s', 0):.2f} s, errors {t['errors']}")
    if w.mode == "idle":
        return (f"  [{t['round']}] {w.key:9s} {t['system']:10s} {t['value']:8.1f} KiB/tunnel "
                f"({t['connected']} conns, RSS {t['rss_before_kib'] / 1024:.1f} -> {t['rss_after_kib'] / 1024:.1f} MiB)")
    pc = f"proxy CPU {t['proxy_cpu'] * 100:4.0f}%" if t["system"] != "direct" else ""
    return (f"  [{t['round']}] {w.key:9s} {t['system']:10s} {t['value']:10.1f} {w.metric:12s} "
            f"p50 {t['p50_us'] or 0:8.0f} us  errors {t['errors']}  {pc}")


NUMERIC = ("value", "per_core", "proxy_cpu_s", "msgs_s", "mb_s", "p50_us", "p99_us", "p999_us", "proxy_cpu", "origin_cpu",
           "load_cpu", "proxy_us_per_msg", "proxy_user_us", "proxy_sys_us", "rss_before_kib", "rss_after_kib",
           "connected", "deflate_ratio", "redis_calls_per_1k", "redis_cmds_per_1k")


def summarize(wls: list[Workload], trials: list[dict]) -> dict:
    """Median over rounds of each figure, then the ratios."""
    out: dict = {}
    for w in wls:
        rows: dict = {}
        for key in w.systems:
            ts = [t for t in trials if t["workload"] == w.key and t["system"] == key and "failed" not in t]
            row: dict = {"trials": len(ts), "failed": sum(1 for t in trials if t["workload"] == w.key
                                                           and t["system"] == key and "failed" in t)}
            for f in NUMERIC:
                vals = [t[f] for t in ts if t.get(f) is not None]
                row[f] = statistics.median(vals) if vals else None
            row["values"] = [t["value"] for t in ts]
            row["errors"] = sum(t.get("errors", 0) for t in ts)
            rows[key] = row
        # TLS rows: the TLS anchors; access-log rows: the anchors logging
        suffix = next((x for x in ("-tls", "-log") if any(k.endswith(x) for k in w.systems)), "")
        for field_, tag in (("value", ""), ("per_core", "_core")):
            nginx = rows.get("nginx" + suffix, {}).get(field_)
            anchors = [rows[a + suffix][field_] for a in ANCHORS if a + suffix in rows and rows[a + suffix].get(field_)]
            best = (max(anchors) if w.higher_better else min(anchors)) if anchors else None
            naive = rows.get("naive", {}).get(field_)
            for key, row in rows.items():
                v = row.get(field_)
                row["x_nginx" + tag] = v / nginx if v and nginx else None
                row["x_best" + tag] = v / best if v and best else None
                row["x_naive" + tag] = v / naive if v and naive else None
        # every wsrelay variant (2 workers, metrics on, ...) against plain wsrelay in the same run
        base = rows.get("wsrelay", {}).get("value")
        for key, row in rows.items():
            if key.startswith("wsrelay-") and base:
                row["x_wsrelay"] = (row["value"] or 0) / base
                row["x_wsrelay_core"] = ((row.get("per_core") or 0) / rows["wsrelay"]["per_core"]
                                         if rows["wsrelay"].get("per_core") else None)
        # ... and some against another variant too (proxies.BASELINES)
        for key, other in proxies.BASELINES.items():
            row, ref = rows.get(key), rows.get(other)
            if row and ref and ref.get("value"):
                row["base"] = other
                row["x_base"] = (row["value"] or 0) / ref["value"]
                row["x_base_core"] = ((row.get("per_core") or 0) / ref["per_core"] if ref.get("per_core") else None)
        out[w.key] = rows
    return out


# what wsrelay is asked to reach (issue 15, the native data plane): (workload, against, ratio);
# for lower-is-better workloads (idle, storm) the ratio is a ceiling
TARGETS = [
    ("echo-64", "best", 1.15), ("echo-4k", "best", 1.2), ("echo-1m", "best", 1.5),
    ("handshake", "best", 1.0), ("idle", "best", 0.25), ("storm", "best", 1.0),
    ("echo-64", "naive", 1.4), ("echo-1m", "naive", 2.5),
    # issue 16: TLS, per proxy core against the better of nginx and HAProxy
    ("tls-echo-64", "best", 1.0), ("tls-echo-4k", "best", 1.0), ("tls-echo-1m", "best", 1.0),
    ("tls-handshake", "best", 1.0), ("tls-resume", "best", 1.0), ("tls-idle", "best", 1.0),
]


def check_targets(summary: dict, wls: list[dict]) -> list[dict]:
    hb = {w["key"]: w["higher_better"] for w in wls}
    out = []
    for wl, against, goal in TARGETS:
        row = summary.get(wl, {}).get("wsrelay") or summary.get(wl, {}).get("wsrelay-tls")
        if row is None:
            continue
        higher = hb[wl]
        item = {"workload": wl, "against": against, "goal": goal, "higher_better": higher}
        for tag in ("", "_core"):
            if not higher and tag:
                continue
            r = row.get(f"x_{against}{tag}")
            item["ratio" + tag] = r
            item["met" + tag] = None if r is None else (r >= goal if higher else r <= goal)
        out.append(item)
    return out
