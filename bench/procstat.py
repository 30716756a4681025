"""Reading /proc: a process tree, its resident memory and its CPU time.

Linux only, like wsrelay. Values are read, never estimated: VmRSS from
``/proc/PID/status`` and utime+stime from ``/proc/PID/stat``.
"""

from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after the last ')'
        rest = stat[stat.rindex(b")") + 2:].split()
        out[int(name)] = int(rest[1])
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for p, pp in _ppid_map().items():
        children.setdefault(pp, []).append(p)
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children.get(p, ()))
    return [p for p in seen if os.path.exists(f"/proc/{p}")]


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS over ``pids``, in KiB (processes that are gone count 0)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """Sum of user+system CPU time of ``pids`` (threads included), in seconds."""
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(b")") + 2:].split()
        ticks += int(rest[11]) + int(rest[12])  # fields 14 and 15: utime, stime
    return ticks / _CLK_TCK


def cpu_user_system(pids: list[int]) -> tuple[float, float]:
    """Sums of (user, system) CPU seconds of ``pids``."""
    user = system = 0.0
    for p in pids:
        u, s = cpu_split(p)
        user += u
        system += s
    return user, system


def nofile_limits() -> tuple[int, int]:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK
