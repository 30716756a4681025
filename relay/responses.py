"""The relay's own short answers (README: "What happens at the edge"), built once at import.

Every refusal closes the connection; the body is one line of text so a human
with curl sees why. Exception text never reaches the peer.
"""

from __future__ import annotations

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
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
# The same answers to a HEAD request: the head alone (RFC 9110 §9.3.2).
_HEAD_ONLY: dict[int, bytes] = {status: answer[: answer.index(b"\r\n\r\n") + 4]
                                for status, answer in REFUSALS.items()}


# nginx's answer to plain HTTP on an HTTPS port (its 497), as a 400.
PLAIN_HTTP_ON_TLS_BODY = b"400 bad request: a plain HTTP request was sent to a TLS port (use https:// or wss://)\n"
PLAIN_HTTP_ON_TLS = (b"HTTP/1.1 400 Bad Request\r\nServer: wsrelay\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(PLAIN_HTTP_ON_TLS_BODY)
                     + PLAIN_HTTP_ON_TLS_BODY)


def refusal(status: int, head_request: bool = False) -> bytes:
    """The canned answer for ``status`` (500 for one we have none for);
    without its body when answering a HEAD request."""
    table = _HEAD_ONLY if head_request else REFUSALS
    return table.get(status) or table[500]
