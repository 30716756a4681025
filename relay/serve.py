"""Running the relay in the foreground: what ``wsrelay run`` and ``wsrelay
demo`` share (exit codes as README "Pointing it at your origin" says: 0 done,
2 a bad configuration, one line per problem on stderr, never a traceback)."""

from __future__ import annotations

import sys

from relay import logs
from relay.config import Settings
from relay.errors import ConfigError


def print_problems(e: ConfigError) -> None:
    """One ``wsrelay: ...`` line per problem, on stderr."""
    for line in e.lines:
        print(f"wsrelay: {line}", file=sys.stderr)


def run(settings: Settings, env_file: str | None, on_ready=None) -> int:
    """The supervisor and its workers until stopped; returns the exit code."""
    from workers.supervisor import Supervisor

    logs.setup(settings.log_level)
    try:
        return Supervisor(settings, env_file, on_ready=on_ready).run()
    except ConfigError as e:
        print_problems(e)
        return 2
