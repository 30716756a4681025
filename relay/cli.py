"""``wsrelay`` (also ``python -m relay``): run, demo, check, status, reload,
stop, --version (README: "Pointing it at your origin", "Seeing what runs").

Exit codes: 0 done, 2 bad configuration (one line per problem on stderr,
never a traceback), 3 (status, reload, stop) no relay running, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

from relay import __version__
from relay.config import Settings, load
from relay.errors import ConfigError
from relay.serve import print_problems, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsrelay", description="A fast, well-behaved WebSocket relay.")
    p.add_argument("--version", action="version", version=f"wsrelay {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (("run", "start the relay with settings from RELAY_* variables"),
                       ("check", "validate the settings and print them as JSON")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--env-file", metavar="PATH", help="read RELAY_* settings from this file too")
    d = sub.add_parser("demo", help="run a built-in echo origin behind the relay and prove a round trip",
                       description="The relay in front of a built-in echo origin, with the RELAY_* settings "
                                   "`run` reads (RELAY_ORIGIN excepted); proves one round trip, serves until Ctrl-C.")
    d.add_argument("--port", type=int, default=8080,
                   help="relay port when RELAY_LISTEN is not set (default 8080; a free one if taken)")
    d.add_argument("--env-file", metavar="PATH", help="read RELAY_* settings from this file too")
    d.add_argument("--tls", action="store_true",
                   help="also serve https:// and wss:// (RELAY_TLS_LISTEN, default 127.0.0.1:8443) with a "
                        "throwaway local CA (needs trustme)")
    st = sub.add_parser("status", help="show what the running relay serves (its /config)",
                        description="Version, pid, generation, workers, the last reload's outcome and the "
                                    "effective settings of the relay at RELAY_METRICS_LISTEN (its /config).")
    st.add_argument("--env-file", metavar="PATH", help="read RELAY_METRICS_LISTEN from this file too")
    st.add_argument("--json", action="store_true", help="print /config as served")
    for name, text in (("reload", "SIGHUP to the relay in RELAY_PID_FILE, then its outcome (outside systemd)"),
                       ("stop", "SIGTERM to the relay in RELAY_PID_FILE, then wait for its drain (outside systemd)")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--env-file", metavar="PATH", help="read RELAY_PID_FILE from this file too")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (wsrelay status | head): nothing more to say.
        # Python's docs (signal, "Note on SIGPIPE"): point stdout at devnull so
        # the flush at exit does not raise again, and exit 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "demo":
        from relay.demo import main as demo

        return demo(args.port, args.env_file, args.tls)
    if args.command in ("status", "reload", "stop"):
        from relay import control

        if args.command == "status":
            return control.status(args.env_file, args.json)
        return getattr(control, args.command)(args.env_file)
    try:
        settings = load(env_file=args.env_file, require_origin=True)
        if args.command == "check" and settings.tls_listen:
            from workers.tls import check as check_tls

            plan = check_tls(settings)
    except ConfigError as e:
        print_problems(e)
        return 2
    if args.command == "check":
        if settings.tls_listen:
            _describe_tls(plan)
        return check(settings)
    return run(settings, args.env_file)


def _describe_tls(plan) -> None:
    """``wsrelay check``: each certificate's names and expiry, and how tickets are shared."""
    from relay.tls import openssl
    from relay.tls.certs import describe

    for c in plan.certificates:
        print(f"wsrelay: TLS certificate {describe(c)}", file=sys.stderr)
    if openssl.HELPER is None:
        print(f"wsrelay: note: TLS session tickets are per worker process: {openssl.WHY_NOT}", file=sys.stderr)


def check(settings: Settings) -> int:
    """Print the effective settings as JSON (indented on a terminal, with the
    route table as a request tries it on stderr; one line otherwise, for
    scripts: the table is its ``effective_routes``), and a note on stderr for each listen
    address that cannot be bound right now: normal for the relay you are
    about to reload, but a second ``wsrelay run`` would refuse to start. In
    cluster mode, a note says whether Redis answers (a relay starts either
    way: README, "A fleet")."""
    from relay import pools
    from workers import listeners as listening

    if sys.stdout.isatty():
        import json

        sys.stdout.write(json.dumps(settings.to_dict(), indent=2) + "\n")
        if settings.routes:  # for the person at the terminal; stdout stays JSON
            print(pools.render(pools.table(settings)), file=sys.stderr)
    else:
        sys.stdout.write(settings.to_json().decode() + "\n")
    addresses = [("RELAY_LISTEN", a) for a in settings.listen] + [("RELAY_TLS_LISTEN", a) for a in settings.tls_listen]
    if settings.metrics_listen is not None:
        addresses.append(("RELAY_METRICS_LISTEN", settings.metrics_listen))
    for variable, addr in addresses:
        if addr.port == 0:
            continue
        problem = listening.probe(addr)
        if problem is not None:
            print(f"wsrelay: note: {listening.why(variable, addr, problem)} "
                  f"(fine if that is the running relay you are about to reload; a second relay would refuse to start)", file=sys.stderr)
    if settings.cluster_redis:
        from workers import cluster

        print(f"wsrelay: note: {cluster.probe(settings)}", file=sys.stderr)
    return 0
