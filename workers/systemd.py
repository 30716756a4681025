"""systemd integration, both halves no-ops outside systemd.

- :func:`notify` speaks the ``NOTIFY_SOCKET`` datagram protocol (sd_notify(3)),
  including abstract socket names (a leading ``@``).
- :func:`listen_fds` takes sockets passed by socket activation
  (sd_listen_fds(3)): only when ``LISTEN_PID`` is this process.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """sd_notify(3): ``message`` to $NOTIFY_SOCKET; False when there is none
    or it cannot take the message now.

    Never blocks: a datagram to a manager whose queue is full
    (net.unix.max_dgram_qlen, 10 by default, unread) is dropped, where a
    blocking send would stop the supervisor's loop (its workers, reloads
    and stop) until the manager read again. A dropped WATCHDOG=1 is followed
    by the next within half the watchdog interval."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.connect(address)
            s.send(message.encode())
        return True
    except OSError:  # BlockingIOError among them: the manager is not reading
        return False


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, when the watchdog is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def listen_fds() -> list[tuple[socket.socket, str]]:
    """The sockets passed to us, each with its ``FileDescriptorName=`` ("" if none)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    socks = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        socks.append((socket.socket(fileno=fd), names[i] if i < len(names) else ""))
    return socks
