"""Where an HTTP/1.1 body ends, sans-I/O (RFC 9112 §6, §7.1).

A :class:`BodyScanner` is fed the bytes that follow a head, as they arrive,
and says how many of them belong to the body and whether it is complete. It
never copies or changes the body: the relay forwards the same bytes, still
chunked, so the receiver sees exactly what the sender framed. Chunk-size and
trailer lines have a cap; a malformed one raises :class:`FramingError`.

The one exception is a chunked response for an HTTP/1.0 client, which must
not see chunked framing (RFC 9112 §6.1, §7.1): with ``dechunk=True`` the
scanner also records where the chunk data lies in each fed buffer, and
:meth:`BodyScanner.payload` returns just those bytes (trailers are dropped).
"""

from __future__ import annotations

import re

from relay.errors import FramingError

_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
# RFC 9112 §7.1.2: a trailer line is a field line (token, colon, no CTLs),
# relayed as received, so it must not hide a bare CR or a NUL.
_TRAILER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\Z")
MAX_LINE = 4096

# scanner states
_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class BodyScanner:
    """Tracks one body. ``length``: Content-Length, -1 chunked, None until close.

    Raises :class:`~relay.errors.FramingError`: 400 for a request body, 502
    for a response body (``response=True``)."""

    __slots__ = ("remaining", "chunked", "state", "line", "until_close", "spans", "response")

    def __init__(self, length: int | None, dechunk: bool = False, response: bool = False):
        #: a response body (the origin's fault when malformed: 502) or a request body (400)
        self.response = response
        self.chunked = length == -1
        #: (start, end) of chunk data in the last fed buffer, when de-chunking
        self.spans: list[tuple[int, int]] | None = [] if dechunk and self.chunked else None
        self.until_close = length is None
        self.remaining = length if length and length > 0 else 0
        self.line = bytearray()
        if self.chunked:
            self.state = _SIZE
        elif self.until_close or self.remaining:
            self.state = _DATA
        else:
            self.state = _DONE

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def finish(self) -> None:
        """The body is over whatever the framing said: the sender closed (a
        body delimited by close) or broke the framing (nothing more is relayed)."""
        self.state = _DONE

    def payload(self, data: bytes | bytearray | memoryview) -> bytes:
        """The chunk data of ``data``, the buffer just fed (``dechunk=True`` only)."""
        spans = self.spans
        out = b"".join(data[a:b] for a, b in spans)
        spans.clear()
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume from ``data``; returns how many bytes belong to this body."""
        if self.until_close:
            return len(data)
        if not self.chunked:
            n = min(self.remaining, len(data))
            self.remaining -= n
            if not self.remaining:
                self.state = _DONE
            return n
        return self._feed_chunked(data)

    def _error(self, reason: str) -> FramingError:
        if self.response:
            return FramingError(reason, 502, "origin_error")
        return FramingError(reason)

    def _line(self, data, pos: int) -> tuple[bytes | None, int]:
        # A line may hold MAX_LINE bytes plus its CRLF, however it is split
        # across reads: look for the LF only within the room left.
        room = MAX_LINE + 2 - len(self.line)
        piece = bytes(data[pos:pos + room])
        end = piece.find(b"\n")
        if end < 0:
            if len(piece) == room:
                raise self._error("chunk line too long")
            self.line += piece
            return None, len(data)
        self.line += piece[:end + 1]
        line = bytes(self.line)
        self.line.clear()
        if not line.endswith(b"\r\n"):
            raise self._error("chunk line not ended by CRLF")
        return line[:-2], pos + end + 1

    def _feed_chunked(self, data) -> int:
        pos, n = 0, len(data)
        while pos < n and self.state != _DONE:
            if self.state == _DATA:
                take = min(self.remaining, n - pos)
                if self.spans is not None and take:
                    self.spans.append((pos, pos + take))
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _DATA_CRLF
                continue
            line, pos = self._line(data, pos)
            if line is None:
                break
            if self.state == _SIZE:
                m = _CHUNK_SIZE.match(line)
                if m is None:
                    raise self._error("bad chunk size line")
                self.remaining = int(m.group(1), 16)
                self.state = _DATA if self.remaining else _TRAILER
            elif self.state == _DATA_CRLF:
                if line:
                    raise self._error("chunk data longer than its size")
                self.state = _SIZE
            else:  # trailer section ends with an empty line
                if not line:
                    self.state = _DONE
                elif not _TRAILER_LINE.match(line):
                    raise self._error("bad trailer line")
        return pos
