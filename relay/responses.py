"""The relay's own short answers (README: "What happens at the edge"), built once at import.

Every refusal closes the connection; the body is one line of text so a human
with curl sees why. Exception text never reaches the peer.
"""

from __future__ import annotations

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    414: "URI Too Long",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_EXTRA = {
    426: b"Sec-WebSocket-Version: 13\r\n",
    503: b"Retry-After: 5\r\n",
}


def _build(status: int) -> bytes:
    reason = _REASONS[status]
    body = f"{status} {reason.lower()}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Server: wsrelay\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode() + _EXTRA.get(status, b"") + b"Connection: close\r\n\r\n" + body


REFUSALS: dict[int, bytes] = {status: _build(status) for status in _REASONS}


def refusal(status: int) -> bytes:
    return REFUSALS.get(status) or REFUSALS[500]
