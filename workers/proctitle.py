"""Process titles, as nginx's "nginx: master process" / "nginx: worker process":
``ps`` and ``top`` show ``wsrelay: supervisor`` and ``wsrelay: worker 0
(generation 2)`` instead of ``python3 -B -P -m workers.child``.

setproctitle rewrites the argv area (what ``ps`` and /proc/PID/cmdline show)
and the kernel's short name (/proc/PID/comm); ``wsrelay reload|stop`` also
recognise a live supervisor by its title (workers/pidfile.py).
"""

from __future__ import annotations

import setproctitle


def set(title: str) -> None:  # noqa: A001 - the module's one verb
    setproctitle.setproctitle(title)
