"""Where an HTTP/1.1 body ends, sans-I/O (RFC 9112 §6, §7.1).

A :class:`BodyScanner` is fed the bytes that follow a head, as they arrive,
and says how many of them belong to the body and whether it is complete. It
never copies or changes the body: the relay forwards the same bytes, still
chunked, so the receiver sees exactly what the sender framed. Chunk-size and
trailer lines have a cap; a malformed one raises :class:`FramingError`.
"""

from __future__ import annotations

import re

_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
MAX_LINE = 4096

# scanner states
_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class FramingError(Exception):
    """Malformed chunked framing."""


class BodyScanner:
    """Tracks one body. ``length``: Content-Length, -1 chunked, None until close."""

    __slots__ = ("remaining", "chunked", "state", "line", "until_close")

    def __init__(self, length: int | None):
        self.chunked = length == -1
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

    def _line(self, data, pos: int) -> tuple[bytes | None, int]:
        end = bytes(data[pos:pos + MAX_LINE + 2]).find(b"\n") if len(self.line) < MAX_LINE else -1
        if end < 0:
            self.line += data[pos:]
            if len(self.line) > MAX_LINE:
                raise FramingError("chunk line too long")
            return None, len(data)
        self.line += data[pos:pos + end + 1]
        line = bytes(self.line)
        self.line.clear()
        if not line.endswith(b"\r\n") or len(line) > MAX_LINE + 2:
            raise FramingError("chunk line not ended by CRLF")
        return line[:-2], pos + end + 1

    def _feed_chunked(self, data) -> int:
        pos, n = 0, len(data)
        while pos < n and self.state != _DONE:
            if self.state == _DATA:
                take = min(self.remaining, n - pos)
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
                    raise FramingError("bad chunk size line")
                self.remaining = int(m.group(1), 16)
                self.state = _DATA if self.remaining else _TRAILER
            elif self.state == _DATA_CRLF:
                if line:
                    raise FramingError("chunk data longer than its size")
                self.state = _SIZE
            else:  # trailer section ends with an empty line
                if not line:
                    self.state = _DONE
                elif b":" not in line or line[:1] in b" \t":
                    raise FramingError("bad trailer line")
        return pos
