"""Every error the data plane raises, in one tree. Each carries the answer it
gets, so no caller has to guess one::

    Exception
     ├── RelayError                .status: the HTTP answer, .outcome: the metrics outcome
     │    ├── HeadError            a head we refuse: 400, 414, 431, 505 (the client's,
     │    │    │                   relay/http_head.py) or 502 (the origin's)
     │    │    └── OriginClosed    the origin closed before a byte of answer: 502,
     │    │                        and the next origin may serve (relay/origins/)
     │    ├── Refused              a valid request the edge's rules refuse: 403
     │    │                        (path, Origin), 503 (limit, draining) (relay/gate.py)
     │    ├── FramingError         a body's framing is broken: 400 for a request
     │    │                        body, 502 for a response body (relay/http_body.py)
     │    ├── OriginUnavailable    no origin accepted a connection: 502
     │    └── OriginTimeout        no origin connection or answer in time: 504
     ├── ProtocolError             a WebSocket peer broke RFC 6455 or the message
     │                             limit: .code is the Close code, .cut when the
     │                             stream stopped inside the bad frame (relay/frames.py)
     ├── InflateError              a compressed message is invalid (.code 1002) or
     │                             too big inflated (1009); the frame tracker turns
     │                             it into a ProtocolError (relay/deflate.py)
     ├── ProxyProtocolError        a PROXY protocol header we refuse: .reason (a metrics
     │                             label); the connection closes without an answer
     │                             (relay/proxy_protocol.py)
     ├── ValueError
     │    └── ExtensionError       the origin's 101 agreed extensions the message limit
     │                             cannot measure through; a HeadError 502 at the
     │                             handshake (relay/deflate.py)
     └── ConfigError               bad settings: .lines, one message per problem
                                   (relay/config.py)

The text of an error is for logs; a peer only ever gets the status (or Close
code) and the relay's canned answer for it (relay/responses.py).
"""

from __future__ import annotations


class RelayError(Exception):
    """A request the relay answers with :attr:`status` and counts as :attr:`outcome`."""

    status = 500
    outcome = "error"
    #: the pool the request was routed to before it was refused ("" if none; the access log's ``pool``)
    pool = ""

    def __init__(self, reason: str, status: int | None = None, outcome: str | None = None):
        super().__init__(reason)
        if status is not None:
            self.status = status
        if outcome is not None:
            self.outcome = outcome


class HeadError(RelayError):
    """A request or response head we refuse (RFC 9112 §2-§5)."""

    def __init__(self, status: int, reason: str, outcome: str = "bad_request"):
        super().__init__(reason, status, outcome)


class OriginClosed(HeadError):
    """The origin accepted the connection and closed it without a byte of
    answer (restarting, overloaded): safe to try the next origin, as nginx's
    ``proxy_next_upstream error`` does; a 502 when none is left."""

    def __init__(self) -> None:
        super().__init__(502, "origin closed before answering", "origin_error")


class Refused(RelayError):
    """A well-formed request the edge does not serve: a rule (403), the client
    limit or a drain (503)."""

    def __init__(self, status: int, reason: str, outcome: str):
        super().__init__(reason, status, outcome)


class FramingError(RelayError):
    """Malformed body framing (RFC 9112 §6, §7): 400 in a request, 502 in a response."""

    status = 400
    outcome = "bad_request"


class OriginUnavailable(RelayError):
    """Every origin refused or failed the connection; :attr:`origin` is the
    last one tried."""

    status = 502
    outcome = "origin_error"

    def __init__(self, reason: str, origin: str = ""):
        super().__init__(reason)
        self.origin = origin


class OriginTimeout(RelayError):
    """The origin did not connect or answer within its timeout."""

    status = 504
    outcome = "timeout"


class ProxyProtocolError(Exception):
    """A PROXY protocol header we refuse (HAProxy's doc/proxy-protocol.txt):
    ``reason`` is ``"missing"`` (the bytes start like neither version) or
    ``"invalid"`` (a header that breaks the spec). The spec's answer is to
    abort the connection, so there is no status."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ConfigError(Exception):
    """One or more bad settings; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines
