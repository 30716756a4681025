"""Frame-aware tunnelling, sans-I/O: where WebSocket frames start and end in a
byte stream the relay forwards without terminating it (RFC 6455 §5.2).

A :class:`FrameTracker` watches one direction of a tunnel. It is fed each chunk
as it arrives and reads only frame headers (2 to 14 bytes); payloads are
skipped by arithmetic, never unmasked, copied or re-masked, so extensions such
as permessage-deflate (RSV1) stay end to end. From the headers it knows:

- where the next frame boundary is (:attr:`~FrameTracker.at_boundary`,
  :attr:`~FrameTracker.to_boundary`), so the relay can inject frames of its
  own there: control frames may be injected between the fragments of a
  message (§5.4);
- how many messages passed, and how large the current one is (for
  ``RELAY_MAX_MESSAGE_BYTES``, close code 1009, §7.4.1);
- each control frame (§5.5): Close with its status code (§5.5.1, §7.4), Ping
  and Pong with their payload — control payloads are at most 125 bytes, so
  they alone are unmasked and copied; the relay needs a Pong's payload to
  recognise the answer to its own Ping and cut it out of the stream.

What to forward is returned as a *plan*. In the common case — no control frame
and nothing held back — :meth:`~FrameTracker.feed` returns ``None`` and the
whole chunk goes out as it came, zero-copy. Otherwise it returns a list, in
stream order, of byte pieces to forward and :class:`Control` events; a control
frame's bytes are never in the pieces, the relay forwards ``event.raw`` or
drops it. A frame header (or a control frame) cut by the end of a chunk is held
inside the tracker until it is complete, so every byte released has a
validated header before it, the relay can always inject at a released
boundary, and a frame that breaks the protocol is never passed on, not even
its first byte.

**Compressed messages** (RFC 7692). With a limit and permessage-deflate
agreed in the 101 (a :class:`~relay.deflate.PerMessageDeflate` passed in),
the limit counts what a message with RSV1 inflates to, the size the
application sees: the payload bytes of such a message are inflated as they
pass (:class:`~relay.deflate.Inflater`; from client frames a copy is unmasked
first, the forwarded bytes are untouched), the inflated bytes are counted and
dropped. RSV1 on a continuation or control frame is then a 1002 (RFC 7692
§6.1), and so is invalid deflate data. With no limit nothing is inflated.

What the limit can hold back. Each chunk's part of a compressed payload is
inflated *before* the chunk is released, so:

- a frame whose header and payload are in the chunk where the message goes
  over the limit is never passed on, not one byte (as for uncompressed
  messages, whose size the header tells);
- a frame that spans chunks has its header and its first chunks released as
  they come, each inflated first (the relay never buffers a payload). When
  a later chunk takes the message over, that chunk is not released: the
  peer holds a prefix of the message that inflates to at most the limit, so
  no endpoint inflates more than ``RELAY_MAX_MESSAGE_BYTES`` of it (the
  compressed bytes it got are those of the earlier chunks, at most one read
  — 256 KiB — each). The stream towards the peer now ends inside a frame,
  where no Close can follow:
  :class:`ProtocolError` says so with ``cut``, and the relay closes the
  peer's connection (its endpoint sees 1006) while the offender gets 1009.

Exceptions::

    Exception
     └── ProtocolError   .code: 1002 protocol error, 1009 message too big
                         .plan: what to forward of the chunk before the bad frame
                         .cut: the released stream ends inside the bad frame

:class:`ProtocolError` text is for logs; the peer only ever gets the code.
"""

from __future__ import annotations

import os

from relay.deflate import InflateError, Inflater, PerMessageDeflate

__all__ = [
    "Control",
    "FrameTracker",
    "ProtocolError",
    "close_frame",
    "ping_frame",
    "pong_frame",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
]

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_NO_STATUS = 1005  # §7.1.5: what a Close frame without a body means

MAX_CONTROL_PAYLOAD = 125  # §5.5
# Longest frame start the tracker ever holds: 14-byte header, or a whole
# control frame (2-byte header, 4-byte mask key, 125-byte payload).
_MAX_HELD = 2 + 4 + MAX_CONTROL_PAYLOAD

# What a frame's first byte means, given whether a fragmented message is open.
# A 256-entry table turns FIN, RSV2/RSV3, the opcode and the fragmentation
# rules of §5.4 into one lookup per frame; 0 means a protocol error.
_ERROR, _WHOLE, _FIRST, _LAST, _MORE, _CONTROL = range(6)


def _kind(b0: int, open_message: bool) -> int:
    fin, opcode = b0 & 0x80, b0 & 0x0F
    if b0 & 0x30:  # RSV2, RSV3: no extension of ours defines them (§5.2)
        return _ERROR
    if opcode in (OP_TEXT, OP_BINARY):
        if open_message:
            return _ERROR
        return _WHOLE if fin else _FIRST
    if opcode == OP_CONT:
        if not open_message:
            return _ERROR
        return _LAST if fin else _MORE
    if opcode in (OP_CLOSE, OP_PING, OP_PONG):
        return _CONTROL if fin else _ERROR  # control frames are never fragmented
    return _ERROR  # reserved opcodes 0x3-0x7, 0xB-0xF


def _why_plain(b0: int, open_message: bool) -> str:
    opcode = b0 & 0x0F
    if b0 & 0x30:
        return "RSV2 or RSV3 set"
    if opcode in (OP_TEXT, OP_BINARY):
        return "new data frame inside a fragmented message"
    if opcode == OP_CONT:
        return "continuation frame without a message to continue"
    if opcode in (OP_CLOSE, OP_PING, OP_PONG):
        return "fragmented control frame"
    return f"reserved opcode {opcode:#x}"


# With permessage-deflate measured (RFC 7692): RSV1 on the first frame marks a
# compressed message, anywhere else it is an error (§6.1). 6 whole, 7 first,
# 8 last and 9 more frames of a compressed message.
_Z_WHOLE, _Z_FIRST, _Z_LAST, _Z_MORE = 6, 7, 8, 9
IDLE, OPEN_PLAIN, OPEN_COMPRESSED = range(3)


def _kind_metered(b0: int, state: int) -> int:
    if b0 & 0x40:
        if b0 & 0x30 or state != IDLE or b0 & 0x0F not in (OP_TEXT, OP_BINARY):
            return _ERROR
        return _Z_WHOLE if b0 & 0x80 else _Z_FIRST
    kind = _kind(b0, state != IDLE)
    if state == OPEN_COMPRESSED and kind in (_LAST, _MORE):
        return _Z_LAST if kind == _LAST else _Z_MORE
    return kind


def _why(b0: int, open_message: bool, metered: bool = False) -> str:
    if metered and b0 & 0x40 and not b0 & 0x30:
        opcode = b0 & 0x0F
        if opcode in (OP_CLOSE, OP_PING, OP_PONG):
            return "RSV1 on a control frame (RFC 7692 §6.1)"
        if opcode == OP_CONT:
            return "RSV1 on a continuation frame (RFC 7692 §6.1)"
    return _why_plain(b0, open_message)


# tuples: CPython specialises tuple indexing, not bytes indexing
_IDLE = tuple(_kind(b, False) for b in range(256))
_OPEN = tuple(_kind(b, True) for b in range(256))
_IDLE_M = tuple(_kind_metered(b, IDLE) for b in range(256))
_OPEN_M = tuple(_kind_metered(b, OPEN_PLAIN) for b in range(256))
_OPEN_Z = tuple(_kind_metered(b, OPEN_COMPRESSED) for b in range(256))


class ProtocolError(Exception):
    """The tracked peer broke RFC 6455; close the connection with :attr:`code`.

    :attr:`plan` holds what may still be forwarded of the chunk being fed: the
    frames before the offending one (same shape as a plan from
    :meth:`FrameTracker.feed`, never ``None``). Unless :attr:`cut`, the
    offending frame's header has not been released, so the receiving side is
    at a frame boundary.
    """

    def __init__(self, code: int, reason: str, plan: list | None = None, cut: bool = False):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.plan: list = plan if plan is not None else []
        #: the bytes released so far end inside the offending frame (a compressed
        #: message found too big or invalid after part of it was passed on):
        #: no frame can follow them, the receiving connection must be closed
        self.cut = cut


class Control:
    """A complete control frame seen in the stream (§5.5).

    ``raw`` is the frame exactly as received (still masked if it was); the
    relay forwards it or drops it. ``payload`` is unmasked.
    """

    __slots__ = ("opcode", "payload", "raw")

    def __init__(self, opcode: int, payload: bytes, raw: bytes):
        self.opcode = opcode
        self.payload = payload
        self.raw = raw

    @property
    def code(self) -> int | None:
        """A Close frame's status code (1005 when it has none); None otherwise."""
        if self.opcode != OP_CLOSE:
            return None
        if not self.payload:
            return CLOSE_NO_STATUS
        return int.from_bytes(self.payload[:2], "big")

    @property
    def reason(self) -> bytes:
        """A Close frame's reason, as sent (UTF-8 per §5.5.1; not checked here)."""
        return self.payload[2:] if self.opcode == OP_CLOSE else b""

    def __repr__(self) -> str:
        return f"Control(opcode={self.opcode:#x}, payload={self.payload!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Control):
            return NotImplemented
        return (self.opcode, self.payload, self.raw) == (other.opcode, other.payload, other.raw)

    __hash__ = None  # type: ignore[assignment]


def _unmask(data, key: bytes, phase: int = 0) -> bytes:
    """``data`` XOR the masking key (§5.3), starting at byte ``phase`` of the key.

    One big-integer XOR instead of a Python loop per byte: 0.5 µs for 64 B,
    8 µs for 4 KiB (2 ns/B; websockets' C ``apply_mask`` does 4 KiB in 0.2 µs,
    but it is not a runtime dependency). Used on control payloads, frames we
    build, and copies of compressed payloads the limit measures."""
    n = len(data)
    if not n:
        return b""
    if phase:
        key = key[phase:] + key[:phase]
    keys = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


class FrameTracker:
    """Follows the frames of one direction of a tunnel (RFC 6455 §5.2).

    ``client_to_server``: the tracked bytes come from the client, whose frames
    must be masked; the origin's must not be (§5.1). ``max_message_bytes``:
    the largest message, summed over its fragments' payloads; 0 = no limit.
    ``deflate``: what permessage-deflate the 101 agreed (None: not agreed);
    with a limit, messages with RSV1 are measured inflated (RFC 7692 §7.2.2,
    see the module docstring), using the parameters of this direction.

    Call :meth:`feed` with each chunk, in order. Attributes, current after
    every call:

    ``messages``
        data messages whose last frame has passed completely.
    ``close_code``
        None until a Close frame passed, then its code (1005 without one).
    """

    __slots__ = (
        "messages", "close_code",
        "_xmask", "_hlen", "_limit", "_kinds", "_size",
        "_left", "_fin", "_carry", "_error",
        "_meter", "_idle_t", "_open_t", "_z", "_key", "_phase", "_cut",
    )

    def __init__(self, client_to_server: bool, max_message_bytes: int = 0,
                 deflate: PerMessageDeflate | None = None):
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        self.messages = 0
        self.close_code: int | None = None
        # The second header byte XOR _xmask is the 7-bit length when the MASK
        # bit is as it must be, and > 127 when it is not: one operation checks
        # the masking rule and extracts the length.
        self._xmask = 0x80 if client_to_server else 0x00
        # Header size before extended lengths: 2, plus the masking key.
        self._hlen = 6 if client_to_server else 2
        # 2**64 is above any 63-bit length: "no limit" costs no extra test.
        self._limit = max_message_bytes or 1 << 64
        self._kinds = _IDLE        # _OPEN while a fragmented message is open
        self._size = 0             # payload bytes so far of the open message
        self._left = 0             # payload bytes of the current frame still to pass
        self._fin = False          # passing them completes a message
        self._carry = bytearray()  # an incomplete frame start, held back
        self._error: ProtocolError | None = None
        # permessage-deflate measured: only with a limit (nothing to measure
        # without one, so nothing is inflated)
        self._meter: Inflater | None = None
        self._idle_t, self._open_t = _IDLE, _OPEN
        if deflate is not None and max_message_bytes:
            bits, no_takeover = deflate.direction(client_to_server)
            self._meter = Inflater(max_message_bytes, bits, no_takeover)
            self._idle_t, self._open_t = _IDLE_M, _OPEN_M
            self._kinds = _IDLE_M
        self._z = False            # the rest of the current payload is inflated as it passes
        self._key = b""            # ... and unmasked with this key
        self._phase = 0            # ... from this byte of it
        self._cut = False          # failed with the released bytes ending inside a frame

    # -- state the pump reads --------------------------------------------------
    @property
    def at_boundary(self) -> bool:
        """True when the bytes released so far end exactly at a frame boundary.

        A held (unreleased) partial header does not count against it: frames
        the relay injects now go out before it. False for good once a
        :class:`ProtocolError` was ``cut``.
        """
        return not self._left and not self._cut

    @property
    def to_boundary(self) -> int:
        """How many more bytes must pass before :attr:`at_boundary` (0 if it is).

        To inject at the next boundary inside a chunk of ``n`` bytes: when
        ``0 < to_boundary < n``, feed ``[0, to_boundary)``, forward, inject,
        then feed ``[to_boundary, n)``.
        """
        return self._left

    @property
    def inflating(self) -> bool:
        """True while zlib state is held to measure compressed messages."""
        return self._meter is not None and self._meter.holding

    def rest(self) -> bool:
        """The stream has been quiet for a while: let the inflater give its
        zlib state back if it can (:meth:`relay.deflate.Inflater.rest`).
        Returns True if it did. Never during a message."""
        meter = self._meter
        if meter is None or self._left or self._error is not None:
            return False
        return meter.rest()

    @property
    def held(self) -> int:
        """Bytes of an incomplete frame start kept inside the tracker, unreleased."""
        return 0 if self._error else len(self._carry)

    # -- the hot path ----------------------------------------------------------
    def feed(self, buf, start: int, end: int) -> list | None:
        """Track ``buf[start:end]``, the next bytes of the stream.

        ``buf`` is anything indexable to ints and sliceable (a memoryview of
        the read buffer, bytes, bytearray). Returns ``None`` when exactly
        ``buf[start:end]`` is to be forwarded — the common case, which
        allocates nothing. Otherwise returns the plan: a list, in stream
        order, of byte pieces to forward (memoryview slices of ``buf``, or
        small ``bytes`` the tracker held from earlier chunks) and
        :class:`Control` events, whose ``raw`` bytes are forwarded only if the
        relay chooses to. An empty list: forward nothing yet.

        Raises :class:`ProtocolError`; the tracker is then dead and every
        later call raises it again, with an empty plan.
        """
        left = self._left
        if left:
            # Inside a payload: skip it by arithmetic (or, for a compressed
            # message under a limit, inflate it before it is released).
            n = end - start
            if n < left:
                if self._z:
                    self._inflate_rest(buf, start, end, False)
                self._left = left - n
                return None
            pos = start + left
            if self._z:
                self._inflate_rest(buf, start, pos, True)
            self._left = 0
            if self._fin:
                self._fin = False
                self.messages += 1
        elif self._carry:
            return self._feed_carried(buf, start, end)
        else:
            pos = start

        xmask = self._xmask
        hlen = self._hlen
        limit = self._limit
        kinds = self._kinds
        messages = self.messages
        plan = None
        seg = start  # start of the bytes not yet put in the plan
        last = end - 1  # a header needs at least two bytes
        while pos < last:
            b0 = buf[pos]
            ln = buf[pos + 1] ^ xmask
            if ln < 126:
                # Checked against `end` below, with the frame's end: a frame
                # that fits has a header that fits.
                h = pos + hlen
            elif ln == 126:
                h = pos + hlen + 2
                if h > end:
                    break
                ln = buf[pos + 2] << 8 | buf[pos + 3]
            elif ln == 127:
                h = pos + hlen + 8
                if h > end:
                    break
                ln = int.from_bytes(buf[pos + 2:pos + 10], "big")
                if ln >> 63:
                    self._fail(1002, "64-bit length with its top bit set", plan, buf, seg, pos, messages)
            else:
                self._fail(1002, "frame masked wrongly for its direction", plan, buf, seg, pos, messages)
            kind = kinds[b0]
            # literals, not the _KIND globals, in this loop: they are cheaper
            if kind == 1:  # _WHOLE
                if ln > limit:
                    self._fail(1009, "message too big", plan, buf, seg, pos, messages)
                f = h + ln
                if f > end:
                    if h > end:
                        break  # header incomplete: hold it
                    self._left = f - end
                    self._fin = True
                    pos = end
                    break
                pos = f
                messages += 1
            elif kind == 5:  # _CONTROL
                if ln > 125:
                    self._fail(1002, "control frame longer than 125 bytes", plan, buf, seg, pos, messages)
                f = h + ln
                if f > end:
                    break  # hold the whole control frame: the relay may cut it out
                event = self._control(buf, pos, h, f, b0, plan, seg, messages)
                if plan is None:
                    plan = []
                if seg < pos:
                    plan.append(buf[seg:pos])
                plan.append(event)
                seg = pos = f
            elif kind:
                # A fragment: 2 _FIRST opens a message, 4 _MORE continues it,
                # 3 _LAST ends it.
                if kind > 5:
                    # A frame of a compressed message (RFC 7692): 6 whole,
                    # 7 first, 8 last, 9 more; measured once inflated.
                    if h > end:
                        break  # hold the header; no state changed yet
                    f = h + ln
                    if kind == _Z_WHOLE and f <= end:
                        # the common case, inline: a whole message in the chunk
                        try:
                            self._meter.whole(_unmask(buf[h:f], bytes(buf[h - 4:h])) if xmask else buf[h:f])
                        except InflateError as e:
                            self._fail(e.code, e.reason, plan, buf, seg, pos, messages)
                        pos = f
                        messages += 1
                        continue
                    self._inflate(buf, kind, h, f if f < end else end, f <= end, plan, seg, pos, messages)
                    if kind != _Z_WHOLE:
                        kinds = self._kinds = _OPEN_Z if kind != _Z_LAST else self._idle_t
                    if f > end:
                        self._left = f - end
                        self._fin = kind == _Z_WHOLE or kind == _Z_LAST
                        pos = end
                        break
                    pos = f
                    if kind == _Z_WHOLE or kind == _Z_LAST:
                        messages += 1
                    continue
                size = ln if kind == 2 else self._size + ln
                if size > limit:
                    self._fail(1009, "message too big", plan, buf, seg, pos, messages)
                if h > end:
                    break  # hold the header; no state changed yet
                self._size = size
                kinds = self._kinds = self._idle_t if kind == 3 else self._open_t
                f = h + ln
                if f > end:
                    self._left = f - end
                    self._fin = kind == 3
                    pos = end
                    break
                pos = f
                if kind == 3:
                    messages += 1
            else:
                self._fail(1002, _why(b0, kinds is not self._idle_t, self._meter is not None),
                           plan, buf, seg, pos, messages)
        self.messages = messages
        if pos < end:
            # An incomplete header or control frame: hold it (≤ _MAX_HELD bytes).
            self._carry[:] = buf[pos:end]
            if plan is None:
                plan = []
            if seg < pos:
                plan.append(buf[seg:pos])
            return plan
        if plan is not None and seg < end:
            plan.append(buf[seg:end])
        return plan

    # -- compressed messages (RFC 7692) ----------------------------------------
    def _inflate(self, buf, kind, h, stop, complete, plan, seg, pos, messages) -> None:
        """Inflate the payload of the frame at ``pos`` that is in this chunk,
        ``buf[h:stop]``, before any of the frame is released; over the limit
        or invalid, the frame is not released at all."""
        meter = self._meter
        try:
            if kind < _Z_LAST:
                meter.begin()
            if self._xmask:
                key = bytes(buf[h - 4:h])
                if stop > h:
                    meter.feed(_unmask(buf[h:stop], key))
                if not complete:
                    self._key = key
                    self._phase = (stop - h) & 3
            elif stop > h:
                meter.feed(buf[h:stop])
            if complete:
                if kind == _Z_WHOLE or kind == _Z_LAST:
                    meter.finish()
            else:
                self._z = True
        except InflateError as e:
            self._fail(e.code, e.reason, plan, buf, seg, pos, messages)

    def _inflate_rest(self, buf, start: int, stop: int, complete: bool) -> None:
        """Inflate ``buf[start:stop]``, more of a compressed payload whose
        header was released with an earlier chunk."""
        meter = self._meter
        try:
            if self._xmask:
                phase = self._phase
                meter.feed(_unmask(buf[start:stop], self._key, phase))
                self._phase = (phase + stop - start) & 3
            else:
                meter.feed(buf[start:stop])
            if complete:
                self._z = False
                if self._fin:
                    meter.finish()
        except InflateError as e:
            # Part of this frame went out with earlier chunks: this chunk is
            # held back, and the stream stays cut inside the frame.
            self._cut = True
            self._fail(e.code, e.reason, None, buf, start, start, self.messages, cut=True)

    # -- rare paths ------------------------------------------------------------
    def _fail(self, code, reason, plan, buf, seg, pos, messages, cut=False):
        if plan is None:
            plan = []
        if seg < pos:
            plan.append(buf[seg:pos])
        self.messages = messages
        self._left = 0
        self._carry[:] = b"!"  # route later calls to _feed_carried, which re-raises
        self._z = False
        self._error = ProtocolError(code, reason)
        raise ProtocolError(code, reason, plan, cut)

    def _control(self, buf, pos, h, f, b0, plan, seg, messages) -> Control:
        raw = bytes(buf[pos:f])
        opcode = b0 & 0x0F
        payload = raw[h - pos:]
        if self._xmask:
            payload = _unmask(payload, raw[h - pos - 4:h - pos])
        if opcode == OP_CLOSE:
            if len(payload) == 1:  # §5.5.1: a body starts with a 2-byte code
                self._fail(1002, "close frame with a 1-byte body", plan, buf, seg, pos, messages)
            self.close_code = int.from_bytes(payload[:2], "big") if payload else CLOSE_NO_STATUS
        return Control(opcode, payload, raw)

    def _feed_carried(self, buf, start: int, end: int) -> list:
        """Complete the frame start held from earlier chunks, then go on."""
        if self._error is not None:
            raise ProtocolError(self._error.code, self._error.reason, [])
        carry = self._carry
        # _start_size only grows as it learns more (at most twice: the second
        # byte gives the length form, then the rest of the header).
        need = self._start_size(carry)
        while need > len(carry):
            if start == end:
                # Still incomplete: the chunk was all frame start. Pass what
                # we have through feed, which raises on what these bytes
                # already prove wrong (as it would unsplit) and holds them again.
                head = bytes(carry)
                carry.clear()
                return self.feed(head, 0, len(head))
            take = min(need - len(carry), end - start)
            carry += buf[start:start + take]
            start += take
            need = self._start_size(carry)
        # The frame start is complete and exactly `carry`: track it as a chunk
        # of its own (same rules, one place), then the rest of this chunk.
        head = bytes(carry)
        carry.clear()
        plan = self.feed(head, 0, len(head))  # cannot hold: head is complete
        if plan is None:
            plan = [head]
        if start < end:
            try:
                rest = self.feed(buf, start, end)
            except ProtocolError as e:
                if e.cut:
                    # The frame that failed began with ``head``, still held:
                    # keep it back too, and the stream stays at a boundary.
                    e.cut = self._cut = False
                else:
                    e.plan[:0] = plan
                raise
            if rest is None:
                plan.append(buf[start:end])
            else:
                plan += rest
        return plan

    def _start_size(self, data) -> int:
        """Bytes that make a complete frame start: the header, or for a control
        frame the whole frame. A lower bound while ``data`` is too short to
        tell; at most _MAX_HELD when the header says something impossible
        (feed then raises on it)."""
        n = len(data)
        if n < 2:
            return 2
        ln = data[1] & 0x7F
        size = self._hlen + (2 if ln == 126 else 8 if ln == 127 else 0)
        if data[0] & 0x08 and ln < 126:  # control opcodes are 0x8-0xF
            size += ln
        return size


# -- frames of the relay's own (§5.5) ------------------------------------------
def _frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    n = len(payload)
    if n > MAX_CONTROL_PAYLOAD:
        raise ValueError("control frame payload longer than 125 bytes")
    if mask:
        # Frames towards the origin are masked with a fresh key each (§5.3).
        key = os.urandom(4)
        return bytes((0x80 | opcode, 0x80 | n)) + key + _unmask(payload, key)
    return bytes((0x80 | opcode, n)) + payload


def _sendable(code: int) -> bool:
    # §7.4.1/§7.4.2 and the IANA registry: 1004-1006 and 1015 are never sent.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_frame(code: int, reason: bytes = b"", *, mask: bool) -> bytes:
    """A Close frame with ``code`` and ``reason`` (§5.5.1). ``mask``: True
    towards the origin (the relay speaks as the client there), False towards
    the client."""
    if not _sendable(code):
        raise ValueError(f"close code {code} may not be sent")
    return _frame(OP_CLOSE, code.to_bytes(2, "big") + bytes(reason), mask)


def ping_frame(payload: bytes, mask: bool) -> bytes:
    """A Ping frame (§5.5.2); ``payload`` ≤ 125 bytes."""
    return _frame(OP_PING, bytes(payload), mask)


def pong_frame(payload: bytes, mask: bool) -> bytes:
    """A Pong frame (§5.5.3); ``payload`` ≤ 125 bytes."""
    return _frame(OP_PONG, bytes(payload), mask)
