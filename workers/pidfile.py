"""``RELAY_PID_FILE``: the supervisor's pid for ``wsrelay reload|stop`` outside
systemd (which knows the pid itself), as nginx's ``pid`` directive.

Written atomically (a temporary file in the same directory, then rename), so
a reader never sees a half-written number; removed at exit if it still names
this process. A file naming a live wsrelay supervisor refuses the start; a
stale one (dead pid, or a pid reused by another program) is replaced.
"""

from __future__ import annotations

import os

from relay.errors import ConfigError

#: What a supervisor's /proc/PID/cmdline starts with (its process title).
TITLE = "wsrelay: supervisor"


def read(path: str) -> int | None:
    """The pid in ``path``, or None if there is no readable pid there."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def is_supervisor(pid: int) -> bool:
    """Whether ``pid`` is a live wsrelay supervisor."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(TITLE.encode())
    except OSError:
        return False


def claim(path: str) -> None:
    """Write this process's pid to ``path``; ConfigError if a live wsrelay holds it."""
    pid = read(path)
    if pid is not None and pid != os.getpid() and is_supervisor(pid):
        raise ConfigError([f"RELAY_PID_FILE: {path} names a running wsrelay (pid {pid}): "
                           f"stop it first (wsrelay stop) or use another pid file"])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError([f"RELAY_PID_FILE: cannot write {path}: {e.strerror}"]) from None


def release(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    if read(path) == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass
