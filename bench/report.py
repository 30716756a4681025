"""Turning a run into a console table, a Markdown file and a PNG chart."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

from bench.proxies import SYSTEMS

COLUMNS = ["workload", "system", "figure", "× nginx", "× best", "per proxy core", "× best/core",
           "p50 µs", "p99 µs", "p99.9 µs", "proxy CPU", "errors"]


def _fmt(v, unit: str) -> str:
    if v is None:
        return "–"
    if unit in ("msgs/s", "handshakes/s", "req/s"):
        return f"{v:,.0f}"
    if unit == "MB/s":
        return f"{v:,.1f}"
    return f"{v:,.2f}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _us(v) -> str:
    return "–" if v is None else f"{v:,.0f}"


def rows(run: dict) -> list[list[str]]:
    out = []
    for w in run["workloads"]:
        summary = run["summary"].get(w["key"], {})
        for key in w["systems"]:
            r = summary.get(key)
            if r is None:
                continue
            unit = w["metric"]
            fig = f"{_fmt(r['value'], unit)} {unit}"
            if w["mode"] == "echo" and unit != "MB/s" and r.get("mb_s") is not None:
                fig += f" ({r['mb_s']:,.1f} MB/s)"
            if w["mode"] == "idle" and r.get("rss_after_kib") is not None:
                fig += f" (RSS {r['rss_before_kib'] / 1024:.1f}→{r['rss_after_kib'] / 1024:.1f} MiB, {r['connected']:,.0f} conns)"
            if r.get("x_wsrelay") is not None:
                fig += f" = {r['x_wsrelay']:.2f}× wsrelay (1 worker)"
                if r.get("x_wsrelay_core") is not None:
                    fig += f", {r['x_wsrelay_core']:.2f}× per core"
            if r.get("x_base") is not None:
                fig += f"; {r['x_base']:.2f}× {SYSTEMS[r['base']]['label']}"
                if r.get("x_base_core") is not None:
                    fig += f", {r['x_base_core']:.2f}× per core"
            if r.get("redis_calls_per_1k") is not None:
                fig += (f"; Redis per 1,000 handshakes: {r['redis_calls_per_1k']:.2f} script calls, "
                        f"{r['redis_cmds_per_1k']:.1f} commands")
            if r.get("deflate_ratio") is not None and key == w["systems"][0]:
                fig += f" (compressed to {r['deflate_ratio']:.0%})"
            per_core = f"{_fmt(r.get('per_core'), unit)}" if r.get("per_core") else "–"
            err = str(r["errors"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
            pc = "–" if r.get("proxy_cpu") is None or key == "direct" else f"{r['proxy_cpu'] * 100:.0f}%"
            out.append([w["title"], SYSTEMS[key]["label"], fig, _x(r.get("x_nginx")), _x(r.get("x_best")),
                        per_core, _x(r.get("x_best_core")), _us(r.get("p50_us")), _us(r.get("p99_us")),
                        _us(r.get("p999_us")), pc, err])
    return out


def console(run: dict) -> str:
    table = [COLUMNS] + rows(run)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = []
    prev = None
    for j, r in enumerate(table):
        if j > 1 and r[0] != prev:
            lines.append("")
        prev = r[0]
        lines.append("  ".join(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("× best: ratio to the better of nginx and HAProxy (for KiB/tunnel lower is better).")
    lines.append("per proxy core: the figure divided by the CPU share the proxy's processes used.")
    lines += ["", "targets for wsrelay:"] + [f"  {t}" for t in target_lines(run)]
    return "\n".join(lines)


def target_lines(run: dict) -> list[str]:
    from bench.runner import check_targets
    out = []
    for t in check_targets(run["summary"], run["workloads"]):
        op = "≥" if t["higher_better"] else "≤"
        against = "best of nginx/HAProxy" if t["against"] == "best" else "naive"
        s = f"{t['workload']:9s} vs {against:21s} {op} {t['goal']:.1f}×: end-to-end {_x(t.get('ratio'))} " \
            f"{_mark(t.get('met'))}"
        if "ratio_core" in t:
            s += f"; per proxy core {_x(t.get('ratio_core'))} {_mark(t.get('met_core'))}"
        out.append(s)
    return out


def _mark(met) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


def markdown(run: dict) -> str:
    env = run.get("environment", {})
    lines = ["# wsrelay benchmark", ""]
    if env:
        lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    lines += [f"- started {run['started']}, {run['elapsed_s']} s, {run['options']['rounds']} round(s), "
              f"{run['options']['duration']} s measured per trial after {run['options']['warmup']} s warm-up; "
              f"figures are medians over rounds",
              f"- CPU layout: proxy on {run['layout']['proxy'] or 'any CPU'}, load generator and origin on "
              f"{run['layout']['load'] or 'any CPU'}",
              f"- load average before/after: {_load(run['loadavg_before'])} / {_load(run['loadavg_after'])}",
              ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "--:" for i in range(len(COLUMNS))) + "|")
    for r in rows(run):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines += ["", "Targets for wsrelay:", ""] + [f"- {t}" for t in target_lines(run)]
    lines += ["", "Every trial (value per round):", ""]
    for w in run["workloads"]:
        for key in w["systems"]:
            r = run["summary"].get(w["key"], {}).get(key)
            if r:
                vals = ", ".join(_fmt(v, w["metric"]) for v in r["values"])
                split = ""
                if r.get("proxy_user_us") is not None:
                    split = f" (proxy CPU per operation: user {r['proxy_user_us']:.1f} µs + system {r['proxy_sys_us']:.1f} µs)"
                lines.append(f"- {w['key']} / {key}: {vals}{split}")
    return "\n".join(lines) + "\n"


def _load(t) -> str:
    return " ".join(f"{x:.2f}" for x in t)


def chart(run: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ["direct", "nginx", "haproxy", "naive", "wsrelay"]
    colors = {"direct": "#bbbbbb", "nginx": "#009639", "haproxy": "#1f6fb2", "naive": "#e69f00",
              "wsrelay": "#c0392b"}
    wls = [w for w in run["workloads"] if any(a in w["systems"] for a in ("nginx", "haproxy"))]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [len(wls), max(1, len(wls) - 1)]})
    for ax, field_, title, ws in (
            (axes[0], "x_best", "figure ÷ best of nginx/HAProxy", wls),
            (axes[1], "x_best_core", "per proxy core ÷ best of nginx/HAProxy", [w for w in wls if w["mode"] != "idle"])):
        width = 0.8 / len(systems)
        for i, key in enumerate(systems):
            xs, ys = [], []
            for j, w in enumerate(ws):
                r = run["summary"].get(w["key"], {}).get(key)
                if r and r.get(field_):
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(r[field_])
            if xs:
                bars = ax.bar(xs, ys, width, label=SYSTEMS[key]["label"], color=colors[key])
                if key == "wsrelay":
                    ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(ws)))
        ax.set_xticklabels([w["title"] + ("\n(lower is better)" if not w["higher_better"] else "") for w in ws],
                           fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ratio")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"wsrelay benchmark — {run.get('environment', {}).get('machine', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    """Machine and versions, as RESULTS.md wants them."""
    import os

    def first(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"

    model = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1) if m else "?"
    except OSError:
        pass

    def ver(mod: str) -> str:
        try:
            from importlib.metadata import version
            return version(mod)
        except Exception:
            return "not installed"

    import resource
    return {
        "machine": f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": ver("uvloop"), "picows": ver("picows"), "aiofastnet": ver("aiofastnet"),
        "wsrelay": ver("wsrelay"),
        "nginx": first(["nginx", "-v"]) if _which("nginx") else "not installed",
        "haproxy": first(["haproxy", "-v"]) if _which("haproxy") else "not installed",
        "RLIMIT_NOFILE": "%d/%d" % resource.getrlimit(resource.RLIMIT_NOFILE),
        "wsrelay commit": _git_head(),
        "command": " ".join(["python -m bench"] + sys.argv[1:]),
    }


def _git_head() -> str:
    """The commit wsrelay ran from, and whether its code had local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "relay", "workers", "metrics"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + (" (with uncommitted changes in relay/, workers/ or metrics/)" if dirty else "")


def _which(name: str) -> bool:
    import shutil
    return bool(shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin"))


def write(run: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / "chart.png"]
    paths[0].write_text(json.dumps(run, indent=1, default=str))
    paths[1].write_text(markdown(run))
    try:
        chart(run, paths[2])
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no chart", file=sys.stderr)
        paths.pop()
    return paths
