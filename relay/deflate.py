"""permessage-deflate (RFC 7692) as the relay sees it, sans-I/O: what the
origin's 101 agreed, and how large each compressed message is once inflated.

The relay does not terminate WebSocket: whatever the origin accepted in its
``101`` (RFC 7692 §7.1) is what both ends use, so reading that answer tells
the relay how each direction is compressed. :func:`parse_extensions` turns the
``Sec-WebSocket-Extensions`` of the ``101`` into a :class:`PerMessageDeflate`
value; :class:`Inflater` measures the messages of one direction for
``RELAY_MAX_MESSAGE_BYTES`` (relay/frames.py feeds it the payloads of
messages with RSV1 set). Nothing here is used when the limit is 0.

How a message is inflated (RFC 7692 §7.2.2), and what the relay adds:

- The message's payloads are inflated in order, then ``00 00 ff ff`` (the
  stripped end of the sender's flush). Output is never kept: each call to
  zlib may produce at most :data:`OUT_PIECE` bytes, or one byte past what the
  limit still allows, so memory stays bounded whatever the ratio.
- Context takeover: the inflater lives across messages unless the
  ``*_no_context_takeover`` parameter of that direction was agreed, as in the
  endpoints; window bits give zlib's ``wbits`` (raw deflate, negative).
  zlib inflates with 8 (``decompressobj(wbits=-8)`` works; it is *deflate*
  that refuses 8, websockets' ``PerMessageDeflate`` notes the same, madler/zlib#171).
- A deflate stream that ends (a block with BFINAL, §7.2.3.4) inside a message
  is followed by a fresh inflater for the bytes after it, as Chromium
  (``inflateReset`` in ``WebSocketInflater``) and aiohttp (a new
  ``decompressobj`` per "member") do, so what those endpoints would inflate
  is counted. More than :data:`MAX_STREAMS` streams in one message is refused
  with 1009, aiohttp's bound (``MAX_DECOMPRESS_MEMBERS``): each costs a new
  inflater, so without a bound 2 bytes of input would cost one.
- Invalid deflate data is close code 1002, as websockets
  (``ProtocolError("decompression failed")`` → ``PROTOCOL_ERROR``) and
  Chromium (``ERR_WS_PROTOCOL_ERROR``) answer it; 1007 is for data that
  does not fit the message type (bad UTF-8), which RFC 6455 §7.4.1 names.
- With ``*_no_context_takeover``, each message must end at a block boundary,
  as every compliant one does (§7.2.1: it ends with an empty stored block).
  Endpoints differ here — websockets and ``ws`` start each message with a new
  inflater, aiohttp keeps one for the connection — and a message that ends
  inside a block would be read one way by the relay and another by such an
  origin: a window for a decompression bomb the relay would not see. So the
  relay checks, at the end of each such message, that its inflater is at a
  block boundary (a final stored block with 8 random bytes must come out
  exactly), and refuses the message with 1002 before its last frame is
  passed on if not. With context takeover every endpoint keeps the one
  inflater, as the relay does, and they cannot disagree.
- An inflater costs 7 KiB of zlib state plus its window (2**bits bytes, 32
  KiB at 15) once it has produced output. With context takeover, a direction
  that has been quiet for a sweep (1 s) and sits at a block boundary gives
  its inflater back (:meth:`Inflater.rest`): the next message gets a new one
  whose window is that many zero bytes. Inflated sizes and "distance too far
  back" errors depend only on how much window there is, never on its
  content, so the measurement is the same, and idle tunnels hold no zlib
  state.

Exceptions::

    ValueError
     └── ExtensionError     the 101's extensions cannot be measured through
    Exception
     └── InflateError       .code: 1002 invalid compressed data, 1009 too big
"""

from __future__ import annotations

import os
import re
import zlib
from typing import NamedTuple

__all__ = ["ExtensionError", "InflateError", "Inflater", "PerMessageDeflate", "parse_extensions", "TAIL"]

#: what the sender stripped from the end of each compressed message (§7.2.1)
TAIL = b"\x00\x00\xff\xff"
#: most inflated bytes produced by one call to zlib (and so held at once)
OUT_PIECE = 256 * 1024
#: most deflate streams (ended by BFINAL) in one message: aiohttp's bound
MAX_STREAMS = 1024

_ZEROS = bytes(1 << 15)
_ZEROS_VIEW = memoryview(_ZEROS)
# A final stored block of 8 bytes (RFC 1951 §3.2.4): BFINAL=1, BTYPE=00,
# LEN=8, NLEN=~8; the 8 bytes follow.
_PROBE_HEAD = b"\x01\x08\x00\xf7\xff"


class ExtensionError(ValueError):
    """The origin's 101 negotiated extensions the relay cannot measure
    messages through: another extension, or permessage-deflate parameters
    RFC 7692 §7.1 forbids in a response (the client must fail those anyway)."""


class InflateError(Exception):
    """A compressed message is invalid (``code`` 1002) or inflates past the limit (1009)."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class PerMessageDeflate(NamedTuple):
    """The parameters the origin's 101 agreed (RFC 7692 §7.1.1, §7.1.2).

    Window bits are 8-15; 15 when the 101 did not name them (the sender may
    then use any window up to 32 KiB).
    """

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15

    def direction(self, client_to_server: bool) -> tuple[int, bool]:
        """(window bits, no context takeover) of the messages one side sends:
        the ``client_*`` parameters govern client→origin, ``server_*`` the other way."""
        if client_to_server:
            return self.client_max_window_bits, self.client_no_context_takeover
        return self.server_max_window_bits, self.server_no_context_takeover


# RFC 6455 §9.1 over RFC 9110 §5.6: extension = token *( OWS ";" OWS param ),
# param = token [ OWS "=" OWS ( token / quoted-string ) ], elements separated
# by OWS "," OWS, empty ones allowed (RFC 9110 §5.6.1). A quoted value must be
# a token once unquoted, so a valid header has no "," or ";" inside quotes:
# splitting on them first cannot make an invalid header pass (a split quote
# leaves both halves unbalanced).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_NAME = re.compile(_TOKEN)
_PARAM = re.compile(rf"({_TOKEN})(?:[ \t]*=[ \t]*({_TOKEN}|{_QUOTED}))?")
_UNESCAPE = re.compile(r"\\(.)")
_BITS = {str(b): b for b in range(8, 16)}  # decimal, no leading zeros (RFC 7692 §7.1.2.1)
_NO_VALUE = ("server_no_context_takeover", "client_no_context_takeover")


def _elements(values: list[bytes]):
    """(name, [(param, value or None)]) per non-empty list element."""
    try:
        text = ", ".join(v.decode("ascii") for v in values)
    except UnicodeDecodeError:
        raise ExtensionError("Sec-WebSocket-Extensions is not ASCII") from None
    for element in text.split(","):
        name, *params = element.split(";")
        name = name.strip(" \t")
        if not name and not params:
            continue  # an empty element
        if not _NAME.fullmatch(name):
            raise ExtensionError(f"malformed extension name {name!r}")
        parsed = []
        for param in params:
            m = _PARAM.fullmatch(param.strip(" \t"))
            if m is None:
                raise ExtensionError(f"malformed extension parameter {param.strip()!r}")
            value = m.group(2)
            if value is not None and value[0] == '"':
                value = _UNESCAPE.sub(r"\1", value[1:-1])
                if not _NAME.fullmatch(value):  # RFC 6455 §9.1: a token once unquoted
                    raise ExtensionError(f"quoted value of {m.group(1)} is not a token")
            parsed.append((m.group(1), value))
        yield name, parsed


def parse_extensions(values: list[bytes]) -> PerMessageDeflate | None:
    """The ``Sec-WebSocket-Extensions`` values of an origin's 101 → what
    permessage-deflate agreed, or None when no extension was.

    Raises :class:`ExtensionError` for any other extension (its effect on
    payloads is unknown, so messages could not be measured), permessage-
    deflate listed twice, or parameters a response may not carry (§7.1:
    unknown or repeated ones, a value where none is allowed, window bits
    missing or outside 8-15). Names compare case-insensitively.
    """
    found = None
    for name, params in _elements(values):
        if name.lower() != "permessage-deflate":
            raise ExtensionError(f"extension {name!r} cannot be measured through")
        if found is not None:
            raise ExtensionError("permessage-deflate accepted twice")
        seen: dict[str, object] = {}
        for pname, value in params:
            key = pname.lower()
            if key in seen:
                raise ExtensionError(f"{pname} repeated")
            if key in _NO_VALUE:
                if value is not None:
                    raise ExtensionError(f"{pname} takes no value")
                seen[key] = True
            elif key in ("server_max_window_bits", "client_max_window_bits"):
                if value not in _BITS:  # a response must give the value (§7.1.2.2)
                    raise ExtensionError(f"{pname}={value} is not 8-15")
                seen[key] = _BITS[value]
            else:
                raise ExtensionError(f"unknown permessage-deflate parameter {pname}")
        found = PerMessageDeflate(**seen)  # type: ignore[arg-type]
    return found


def _clean(d) -> bool:
    """Is ``d`` at a block boundary? Feeds it a final stored block of 8 random
    bytes (so ``d`` is spent): only an inflater waiting for a block header on
    a byte boundary gives back exactly those bytes and ends there. Random, so
    no crafted state can be made to pass."""
    r = os.urandom(8)
    try:
        out = d.decompress(_PROBE_HEAD + r, 64)
    except zlib.error:
        return False
    return out == r and d.eof and not d.unused_data


class Inflater:
    """Measures the compressed messages of one direction (RFC 7692 §7.2.2).

    ``limit``: the largest message once inflated, bytes (> 0). ``window_bits``
    8-15 and ``no_context_takeover`` as agreed for this direction
    (:meth:`PerMessageDeflate.direction`).

    Per message: :meth:`begin`, :meth:`feed` with each piece of the payload
    (unmasked), :meth:`finish` after the last one. :meth:`feed` and
    :meth:`finish` raise :class:`InflateError`; the inflater is then of no
    further use (the relay closes the connection).
    """

    __slots__ = ("limit", "wbits", "takeover", "_d", "_left", "_history", "_streams", "_open", "_kept")

    def __init__(self, limit: int, window_bits: int = 15, no_context_takeover: bool = False):
        if limit <= 0:
            raise ValueError("limit must be > 0")
        if not 8 <= window_bits <= 15:
            raise ValueError("window_bits must be 8-15")
        self.limit = limit
        self.wbits = -window_bits  # raw deflate
        self.takeover = not no_context_takeover
        self._d = None        # the zlib inflater; None between messages when not needed
        self._left = 0        # inflated bytes the open message may still take
        self._history = 0     # bytes inflated since the inflater's stream began (its window fill)
        self._streams = 0     # deflate streams in the open message
        self._open = False
        self._kept = False    # rest() found the state not rebuildable; not retried before the next message

    @property
    def holding(self) -> bool:
        """True while zlib state is held (a message is open, or context takeover keeps it)."""
        return self._d is not None

    def begin(self) -> None:
        """A compressed message starts."""
        self._left = self.limit
        self._streams = 1
        self._open = True
        self._kept = False
        if self._d is None:
            h = self._history
            if h:  # rebuilt after rest(): a window as full as the one given back
                zdict = _ZEROS if h >= len(_ZEROS) else _ZEROS_VIEW[:h]
                self._d = zlib.decompressobj(self.wbits, zdict=zdict)
            else:
                self._d = zlib.decompressobj(self.wbits)

    def feed(self, data) -> None:
        """Inflate the next piece of the message's (unmasked) payload."""
        d = self._d
        while True:
            cap = self._left + 1
            if cap > OUT_PIECE:
                cap = OUT_PIECE
            try:
                out = d.decompress(data, cap)
            except zlib.error as e:
                raise InflateError(1002, f"invalid compressed data ({e})") from None
            n = len(out)
            left = self._left = self._left - n
            if left < 0:
                raise InflateError(1009, "message too big once inflated")
            self._history += n
            if n == cap:
                # Output was cut short at a piece: the input left over, or
                # output zlib still holds, comes with the next call.
                data = d.unconsumed_tail
                continue
            if not d.eof:
                return
            # The deflate stream ended (BFINAL): what follows is a new one.
            self._streams += 1
            if self._streams > MAX_STREAMS:
                raise InflateError(1009, f"more than {MAX_STREAMS} deflate streams in one message")
            data = d.unused_data
            d = self._d = zlib.decompressobj(self.wbits)
            self._history = 0
            if not data:
                return

    def whole(self, data) -> None:
        """:meth:`begin`, :meth:`feed` and :meth:`finish` for a message in one
        piece; one call to zlib when it is small (as websockets does below 2 KiB)."""
        self.begin()
        if len(data) < 2048:
            self.feed(bytes(data) + TAIL)
        else:
            self.feed(data)
            self.feed(TAIL)
        self._ended()

    def finish(self) -> None:
        """The message's last payload byte was fed."""
        self.feed(TAIL)
        self._ended()

    def _ended(self) -> None:
        self._open = False
        if not self.takeover:
            d, self._d = self._d, None
            self._history = 0
            if not _clean(d):
                raise InflateError(1002, "compressed message does not end at a block boundary")

    def rest(self) -> bool:
        """Between messages, with context takeover: give the zlib state back if
        it can be rebuilt exactly (see the module docstring). Returns True if
        it was given back."""
        d = self._d
        if d is None or self._open or self._kept:
            return False
        if not _clean(d.copy()):
            self._kept = True
            return False
        self._d = None
        if self._history > len(_ZEROS):
            self._history = len(_ZEROS)
        return True
