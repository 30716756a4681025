"""``wsrelay`` (also ``python -m relay``): run, demo, check, --version (SPEC §2).

Exit codes: 0 done, 2 bad configuration (one line per problem on stderr,
never a traceback), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import sys

from relay import __version__, logs
from relay.config import Settings, load
from relay.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsrelay", description="A fast, well-behaved WebSocket relay.")
    p.add_argument("--version", action="version", version=f"wsrelay {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (("run", "start the relay with settings from RELAY_* variables"),
                       ("check", "validate the settings and print them as JSON")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--env-file", metavar="PATH", help="read RELAY_* settings from this file too")
    d = sub.add_parser("demo", help="run a built-in echo origin behind the relay and prove a round trip")
    d.add_argument("--port", type=int, default=8080, help="relay port (default 8080; a free one if taken)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "demo":
        from relay.demo import main as demo

        return demo(args.port)
    try:
        settings = load(env_file=args.env_file, require_origin=True)
    except ConfigError as e:
        for line in e.lines:
            print(f"wsrelay: {line}", file=sys.stderr)
        return 2
    if args.command == "check":
        sys.stdout.write(settings.to_json().decode() + "\n")
        return 0
    return run(settings, args.env_file)


def run(settings: Settings, env_file: str | None, on_ready=None) -> int:
    from workers.supervisor import Supervisor

    logs.setup(settings.log_level)
    try:
        return Supervisor(settings, env_file, on_ready=on_ready).run()
    except ConfigError as e:
        for line in e.lines:
            print(f"wsrelay: {line}", file=sys.stderr)
        return 2
