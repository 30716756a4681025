"""relay.frames: the frame tracker of RFC 6455 §5.2 and the relay's own frames.

The invariant everywhere: however a stream is cut into chunks, the tracker
releases exactly the stream (in order, nothing lost, nothing duplicated), sees
the same control frames and counts the same messages, and every position it
calls a boundary is one. The ``websockets`` library's frame parser is the
reference for what a frame is.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from relay.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    Control,
    FrameTracker,
    ProtocolError,
    close_frame,
    ping_frame,
    pong_frame,
)
from tests.support.frames import BINARY, CONT, TEXT, Run, frame


def ws_parse(data: bytes, mask: bool) -> list[Frame]:
    """Frames as the websockets library parses them (raises on a bad stream)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while True:
        gen = Frame.parse(reader.read_exact, mask=mask)
        try:
            next(gen)
        except StopIteration as stop:
            frames.append(stop.value)
        except EOFError:
            return frames
        else:  # pragma: no cover - everything was fed
            raise AssertionError("parser wants more data")


# -- a stream and what the tracker must find in it ----------------------------
class Stream:
    """Frames appended one by one, with the expected observations."""

    def __init__(self, mask: bool):
        self.mask = mask
        self.data = bytearray()
        self.boundaries = {0}
        self.messages = 0
        self.controls: list[tuple[int, bytes]] = []
        self.close_code: int | None = None

    def add(self, opcode, payload=b"", *, fin=True, ends_message=None, **kw) -> "Stream":
        if isinstance(payload, int):
            payload = bytes(payload) if payload > 200 else os.urandom(payload)
        self.data += frame(opcode, payload, mask=self.mask, fin=fin, **kw)
        self.boundaries.add(len(self.data))
        if opcode & 0x8:
            self.controls.append((opcode, payload))
            if opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
        elif fin:
            self.messages += 1
        return self

    def __bytes__(self) -> bytes:
        return bytes(self.data)


def feed_chunks(s: Stream, cuts, *, as_view=True, max_message_bytes=0) -> Run:
    data = bytes(s)
    buf = memoryview(bytearray(data)) if as_view else data
    r = Run(FrameTracker(client_to_server=s.mask, max_message_bytes=max_message_bytes))
    prev = 0
    for c in [*sorted(set(cuts)), len(data)]:
        if not prev <= c <= len(data):
            continue
        r.feed(buf, prev, c)
        r.check_boundary(s.boundaries)
        prev = c
    return r


def check(s: Stream, r: Run) -> None:
    assert bytes(r.out) == bytes(s)
    assert r.t.held == 0
    assert r.t.at_boundary
    assert r.controls == s.controls
    assert r.t.messages == s.messages
    assert r.t.close_code == s.close_code


def mixed(mask: bool) -> Stream:
    """Every frame shape in a short stream: whole messages, a fragmented one
    with control frames between its fragments, empty frames, all 3 opcodes."""
    return (Stream(mask)
            .add(TEXT, b"hello")
            .add(BINARY, 0)
            .add(OP_PING, b"p1")
            .add(TEXT, b"frag-", fin=False)
            .add(OP_PONG, b"")
            .add(CONT, b"ment", fin=False)
            .add(OP_PING, 125)
            .add(CONT, 0, fin=False)
            .add(CONT, b"ed", fin=True)
            .add(BINARY, 126)
            .add(BINARY, 7, rsv=0b100)       # RSV1: permessage-deflate, end to end
            .add(BINARY, 3, form=16)         # non-minimal lengths are the endpoints' business
            .add(TEXT, 2, form=64)
            .add(OP_CLOSE, (1001).to_bytes(2, "big") + b"going away"))


# -- whole streams, every split ----------------------------------------------
@pytest.mark.parametrize("mask", [True, False], ids=["client", "origin"])
def test_mixed_stream_whole_and_split_at_every_byte(mask):
    s = mixed(mask)
    data = bytes(s)
    check(s, feed_chunks(s, []))
    for i in range(len(data) + 1):
        check(s, feed_chunks(s, [i]))
    check(s, feed_chunks(s, range(len(data))))  # one byte at a time


@pytest.mark.parametrize("mask", [True, False], ids=["client", "origin"])
def test_every_pair_of_splits_in_a_short_stream(mask):
    s = (Stream(mask).add(TEXT, b"ab", fin=False).add(OP_PING, b"xy")
         .add(CONT, b"c").add(OP_CLOSE, (1000).to_bytes(2, "big")))
    n = len(bytes(s))
    for i in range(n + 1):
        for j in range(i, n + 1):
            check(s, feed_chunks(s, [i, j]))


@pytest.mark.parametrize("mask", [True, False], ids=["client", "origin"])
def test_bytes_input_same_as_memoryview(mask):
    s = mixed(mask)
    for i in range(0, len(bytes(s)), 7):
        check(s, feed_chunks(s, [i, i + 3], as_view=False))


@pytest.mark.parametrize("mask", [True, False], ids=["client", "origin"])
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 1 << 20])
def test_length_forms_split_around_every_header_byte(size, mask):
    s = Stream(mask).add(BINARY, size).add(OP_PING, b"!").add(BINARY, size, rsv=0b100)
    data = bytes(s)
    check(s, feed_chunks(s, []))
    starts = sorted(s.boundaries)
    for b in starts:  # cut everywhere in and just after each header
        for d in range(-1, 16):
            check(s, feed_chunks(s, [b + d]))
    # ... and in 64 KiB chunks, as the pump sees it
    check(s, feed_chunks(s, range(0, len(data), 65536)))


@pytest.mark.parametrize("mask", [True, False], ids=["client", "origin"])
@pytest.mark.parametrize("form", [7, 16, 64])
def test_explicit_length_forms(form, mask):
    s = Stream(mask)
    for n in (0, 1, 125):
        s.add(TEXT, n, form=form)
    s.add(BINARY, 126 if form != 7 else 0, form=form)
    check(s, feed_chunks(s, []))
    for i in range(len(bytes(s)) + 1):
        check(s, feed_chunks(s, [i]))


# -- property: any valid stream, any chunking ---------------------------------
SIZES = st.one_of(st.integers(0, 300), st.sampled_from([125, 126, 127, 65535, 65536, 70000]))
CONTROL = st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125))


@st.composite
def streams(draw):
    mask = draw(st.booleans())
    s = Stream(mask)
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            s.add(draw(st.sampled_from([TEXT, BINARY])), draw(SIZES),
                  rsv=draw(st.sampled_from([0, 0b100])))
            continue
        parts = draw(st.integers(2, 5))
        for k in range(parts):
            s.add(TEXT if k == 0 else CONT, draw(SIZES), fin=k == parts - 1)
            for op, payload in draw(st.lists(CONTROL, max_size=2)):
                s.add(op, payload)
    if draw(st.booleans()):
        s.add(OP_CLOSE, draw(st.sampled_from([b"", (1000).to_bytes(2, "big"), (4000).to_bytes(2, "big") + b"r"])))
    return s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=streams(), data=st.data())
def test_any_stream_any_chunking(s, data):
    n = len(bytes(s))
    cuts = data.draw(st.lists(st.integers(0, n), max_size=40))
    check(s, feed_chunks(s, cuts))


@settings(max_examples=100, deadline=None)
@given(s=streams(), data=st.data())
def test_stream_parses_as_websockets_sees_it(s, data):
    """The tracker's control frames and message count match websockets' parse."""
    data_bytes = bytes(s)
    # RSV1 frames need the deflate extension in websockets: clear the bit for
    # the reference parse only (the tracker must not care either way).
    ref = bytearray(data_bytes)
    for b in sorted(s.boundaries)[:-1]:
        ref[b] &= ~0x40
    frames = ws_parse(bytes(ref), s.mask)
    controls = [(int(f.opcode), f.data) for f in frames if f.opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE)]
    messages = sum(1 for f in frames if f.fin and f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT))
    cuts = data.draw(st.lists(st.integers(0, len(data_bytes)), max_size=20))
    r = feed_chunks(s, cuts)
    assert r.controls == controls
    assert r.t.messages == messages


# -- injecting at boundaries ----------------------------------------------------
def inject_everywhere(s: Stream, cuts, marker: bytes) -> bytes:
    """Feed like a pump that injects ``marker`` at every boundary it can reach,
    splitting a chunk at ``to_boundary`` when the boundary is inside it."""
    data = memoryview(bytearray(bytes(s)))
    t = FrameTracker(client_to_server=s.mask)
    r = Run(t)
    prev = 0
    for c in [*sorted(set(cuts)), len(data)]:
        if not prev <= c <= len(data):
            continue
        pos = prev
        while True:
            if t.at_boundary:
                r.out += marker
                r.injected += len(marker)
            stop = pos + t.to_boundary if t.to_boundary else c
            if stop >= c or stop == pos:
                r.feed(data, pos, c)
                break
            r.feed(data, pos, stop)
            pos = stop
        prev = c
    return bytes(r.out)


@settings(max_examples=100, deadline=None)
@given(s=streams(), data=st.data())
def test_injected_frames_land_on_boundaries(s, data):
    """Frames injected whenever the tracker says so leave a valid stream: the
    original frames, in order, with the injected ones between them."""
    n = len(bytes(s))
    cuts = data.draw(st.lists(st.integers(0, n), max_size=15))
    marker = ping_frame(b"relay", s.mask)
    out = inject_everywhere(s, cuts, marker)
    ref = bytearray(out)
    frames = []
    pos = 0
    # walk the output with the reference parser, frame by frame
    while pos < len(ref):
        ref[pos] &= ~0x40
        (f,) = ws_parse(_one_frame(ref, pos, s.mask), s.mask)
        frames.append(f)
        pos += len(_one_frame(ref, pos, s.mask))
    originals = [f for f in frames if not (f.opcode == Opcode.PING and f.data == b"relay")]
    ref_orig = bytearray(bytes(s))
    for b in sorted(s.boundaries)[:-1]:
        ref_orig[b] &= ~0x40
    assert [(f.opcode, f.fin, f.data) for f in originals] == \
        [(f.opcode, f.fin, f.data) for f in ws_parse(bytes(ref_orig), s.mask)]
    assert len(frames) > len(originals)  # at least the one before the first frame


def _one_frame(buf, pos, mask) -> bytes:
    ln = buf[pos + 1] & 0x7F
    h = 2
    if ln == 126:
        ln, h = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
    elif ln == 127:
        ln, h = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
    h += 4 if mask else 0
    return bytes(buf[pos:pos + h + ln])


def test_to_boundary_inside_a_chunk():
    s = Stream(False).add(BINARY, 1000).add(TEXT, b"x")
    data = bytes(s)
    t = FrameTracker(client_to_server=False)
    assert t.feed(data, 0, 100) is None
    assert not t.at_boundary and t.to_boundary == len(frame(BINARY, 1000, mask=False)) - 100
    stop = 100 + t.to_boundary
    assert t.feed(data, 100, stop) is None
    assert t.at_boundary and t.to_boundary == 0 and t.messages == 1
    assert t.feed(data, stop, len(data)) is None
    assert t.messages == 2


# -- the plan's shape ---------------------------------------------------------
def test_common_case_returns_none():
    data = memoryview(bytearray(b"".join(frame(BINARY, 64, mask=True) for _ in range(1000))))
    t = FrameTracker(client_to_server=True)
    for i in range(0, len(data), 7 * 70):  # every chunk ends on a boundary
        assert t.feed(data, i, min(i + 7 * 70, len(data))) is None
    assert t.messages == 1000


def test_large_frame_streams_without_a_plan():
    f = frame(BINARY, 1 << 20, mask=True)
    t = FrameTracker(client_to_server=True, max_message_bytes=1 << 20)
    for i in range(0, len(f), 65536):
        assert t.feed(f, i, min(i + 65536, len(f))) is None
        assert t.messages == (1 if i + 65536 >= len(f) else 0)
    assert t.at_boundary


def test_control_frame_is_cut_out_of_the_pieces():
    d = frame(TEXT, b"a", mask=True)
    p = frame(OP_PONG, b"relay-7", mask=True)
    e = frame(TEXT, b"b", mask=True)
    data = memoryview(d + p + e)
    t = FrameTracker(client_to_server=True)
    plan = t.feed(data, 0, len(data))
    assert [bytes(x) if not isinstance(x, Control) else x for x in plan] == [
        d, Control(OP_PONG, b"relay-7", p), e]
    # a pump swallowing its own pong forwards only the pieces
    assert b"".join(bytes(x) for x in plan if not isinstance(x, Control)) == d + e


def test_split_control_frame_is_held_whole():
    d = frame(BINARY, 10, mask=True)
    p = frame(OP_PONG, b"relay-7", mask=True)
    data = d + p
    t = FrameTracker(client_to_server=True)
    plan = t.feed(data, 0, len(d) + 5)
    assert [bytes(x) for x in plan] == [d]
    assert t.held == 5 and t.at_boundary  # released bytes end at a boundary
    plan = t.feed(data, len(d) + 5, len(data))
    assert plan == [Control(OP_PONG, b"relay-7", p)]
    assert t.held == 0


def test_split_data_header_comes_out_whole_before_the_rest():
    a = frame(TEXT, b"x", mask=False)
    b = frame(BINARY, 300, mask=False)  # 4-byte header
    data = a + b
    t = FrameTracker(client_to_server=False)
    assert [bytes(x) for x in t.feed(data, 0, len(a) + 3)] == [a]
    assert t.held == 3 and t.at_boundary
    plan = t.feed(data, len(a) + 3, len(a) + 10)
    assert plan[0] == b[:4] and isinstance(plan[0], bytes)
    assert bytes(plan[1]) == b[4:10]
    assert not t.at_boundary and t.to_boundary == len(b) - 10


def test_empty_feed():
    t = FrameTracker(client_to_server=True)
    assert t.feed(b"", 0, 0) is None
    t.feed(b"\x81", 0, 1)
    assert t.feed(b"", 0, 0) == [] and t.held == 1


# -- close frames ----------------------------------------------------------------
@pytest.mark.parametrize("mask", [True, False], ids=["client", "origin"])
@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 1014, 3000, 4999])
def test_close_code_read_through_the_mask(code, mask):
    raw = frame(OP_CLOSE, code.to_bytes(2, "big") + "é-bye".encode(), mask=mask)
    for i in range(len(raw) + 1):
        t = FrameTracker(client_to_server=mask)
        events = [x for p in (t.feed(raw, 0, i), t.feed(raw, i, len(raw))) if p for x in p
                  if isinstance(x, Control)]
        (ev,) = events
        assert (ev.opcode, ev.code, ev.reason, ev.raw) == (OP_CLOSE, code, "é-bye".encode(), raw)
        assert t.close_code == code


def test_close_without_body_is_1005():
    t = FrameTracker(client_to_server=True)
    (ev,) = t.feed(frame(OP_CLOSE, b"", mask=True), 0, 6)
    assert ev.code == 1005 and ev.reason == b"" and t.close_code == 1005


def test_control_event_properties_for_ping():
    (ev,) = FrameTracker(client_to_server=False).feed(ping_frame(b"hi", False), 0, 4)
    assert (ev.opcode, ev.payload, ev.code, ev.reason) == (OP_PING, b"hi", None, b"")


# -- protocol errors ------------------------------------------------------------
def bad_streams():
    """(name, client_to_server, max_message_bytes, good prefix, bad frame, code)."""
    good_c = frame(TEXT, b"ok", mask=True) + frame(OP_PING, b"p", mask=True)
    good_o = frame(TEXT, b"ok", mask=False) + frame(OP_PING, b"p", mask=False)
    frag_c = frame(TEXT, b"a", mask=True, fin=False)
    cases = []
    for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):
        cases.append((f"reserved-opcode-{op:x}", True, 0, good_c, frame(op, b"z", mask=True), 1002))
    cases += [
        ("control-126", True, 0, good_c, frame(OP_PING, 126, mask=True), 1002),
        ("control-long-64", False, 0, good_o, frame(OP_PONG, 200, mask=False, form=64), 1002),
        ("control-fragmented", True, 0, good_c, frame(OP_PING, b"x", mask=True, fin=False), 1002),
        ("close-fragmented", False, 0, good_o, frame(OP_CLOSE, b"", mask=False, fin=False), 1002),
        ("close-1-byte", True, 0, good_c, frame(OP_CLOSE, b"\x03", mask=True), 1002),
        ("client-unmasked", True, 0, good_c, frame(TEXT, b"x", mask=False), 1002),
        ("client-unmasked-control", True, 0, good_c, frame(OP_PING, b"x", mask=False), 1002),
        ("origin-masked", False, 0, good_o, frame(BINARY, b"x", mask=True), 1002),
        ("origin-masked-126", False, 0, good_o, frame(BINARY, 200, mask=True), 1002),
        ("rsv2", True, 0, good_c, frame(TEXT, b"x", mask=True, rsv=0b010), 1002),
        ("rsv3", False, 0, good_o, frame(TEXT, b"x", mask=False, rsv=0b001), 1002),
        ("rsv2-control", False, 0, good_o, frame(OP_PING, b"x", mask=False, rsv=0b010), 1002),
        ("continuation-first", True, 0, good_c, frame(CONT, b"x", mask=True), 1002),
        ("continuation-after-last", True, 0, good_c + frag_c + frame(CONT, b"b", mask=True),
         frame(CONT, b"c", mask=True, fin=False), 1002),
        ("data-inside-fragmented", True, 0, good_c + frag_c + frame(OP_PING, b"", mask=True),
         frame(BINARY, b"x", mask=True), 1002),
        ("first-inside-fragmented", True, 0, good_c + frag_c, frame(TEXT, b"x", mask=True, fin=False), 1002),
        ("length-top-bit", False, 0, good_o, bytes((0x82, 127)) + (1 << 63).to_bytes(8, "big"), 1002),
        ("too-big-whole", True, 100, good_c, frame(BINARY, 101, mask=True), 1009),
        ("too-big-16", False, 100, good_o, frame(BINARY, 1000, mask=False), 1009),
        ("too-big-64", False, 65536, good_o, frame(BINARY, 65537, mask=False), 1009),
        ("too-big-fragments", True, 100,
         good_c + frame(TEXT, 60, mask=True, fin=False) + frame(OP_PONG, b"", mask=True)
         + frame(CONT, 30, mask=True, fin=False),
         frame(CONT, 11, mask=True), 1009),
        ("too-big-first-fragment", False, 10, good_o, frame(TEXT, 11, mask=False, fin=False), 1009),
    ]
    return cases


BAD = bad_streams()


@pytest.mark.parametrize("name,c2s,limit,good,bad,code", BAD, ids=[c[0] for c in BAD])
def test_protocol_errors_split_everywhere(name, c2s, limit, good, bad, code):
    data = good + bad + frame(TEXT, b"after", mask=c2s)
    for i in list(range(len(good) + len(bad) + 1)) + [None]:
        t = FrameTracker(client_to_server=c2s, max_message_bytes=limit)
        r = Run(t)
        with pytest.raises(ProtocolError) as err:
            if i is not None:
                r.feed(data, 0, i)
            r.feed(data, i or 0, len(data))
        assert err.value.code == code
        r.release(err.value.plan, None, 0, 0)
        # everything before the bad frame went out, not one byte of it
        assert bytes(r.out) == good
        # and the tracker stays dead
        with pytest.raises(ProtocolError) as again:
            t.feed(data, 0, len(data))
        assert again.value.code == code and again.value.plan == []


def test_too_big_is_raised_at_the_header_before_the_payload():
    f = frame(BINARY, 70000, mask=True)
    t = FrameTracker(client_to_server=True, max_message_bytes=65536)
    with pytest.raises(ProtocolError) as err:
        t.feed(f, 0, 14)  # the header alone
    assert err.value.code == 1009 and err.value.plan == []


def test_limit_is_inclusive_and_summed_per_message():
    s = (Stream(True).add(BINARY, 100).add(TEXT, 50, fin=False).add(OP_PING, b"")
         .add(CONT, 50).add(BINARY, 100))
    check(s, feed_chunks(s, [], max_message_bytes=100))
    for i in range(len(bytes(s))):
        check(s, feed_chunks(s, [i], max_message_bytes=100))


def test_rsv1_is_not_validated():
    s = Stream(True).add(TEXT, b"deflated", rsv=0b100).add(TEXT, b"a", rsv=0b100, fin=False).add(CONT, b"b")
    check(s, feed_chunks(s, []))


def test_negative_limit_refused():
    with pytest.raises(ValueError):
        FrameTracker(client_to_server=True, max_message_bytes=-1)


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=300), c2s=st.booleans(), data=st.data())
def test_any_bytes_either_track_or_raise_protocol_error(junk, c2s, data):
    """h11's fuzz invariant: any input parses or raises our own error, and the
    outcome does not depend on the chunking."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(junk)), max_size=10)))
    limit = data.draw(st.sampled_from([0, 50]))

    def outcome(cuts):
        t = FrameTracker(client_to_server=c2s, max_message_bytes=limit)
        r = Run(t)
        prev = 0
        try:
            for c in [*cuts, len(junk)]:
                r.feed(junk, prev, c)
                prev = c
        except ProtocolError as e:
            r.release(e.plan, None, 0, 0)
            return ("error", e.code, bytes(r.out), r.controls, t.messages)
        return ("ok", bytes(r.out), t.held, r.controls, t.messages, t.at_boundary)

    assert outcome(cuts) == outcome([])


# -- the relay's own frames ---------------------------------------------------
@pytest.mark.parametrize("mask", [True, False])
def test_builders_parse_back_with_websockets(mask):
    frames = [close_frame(1001, b"shutting down", mask=mask), close_frame(1014, mask=mask),
              ping_frame(b"relay-1", mask), pong_frame(b"", mask), ping_frame(125 * b"x", mask)]
    parsed = ws_parse(b"".join(frames), mask=mask)
    assert [f.opcode for f in parsed] == [Opcode.CLOSE, Opcode.CLOSE, Opcode.PING, Opcode.PONG, Opcode.PING]
    assert Close.parse(parsed[0].data) == Close(1001, "shutting down")
    assert Close.parse(parsed[1].data) == Close(1014, "")
    assert parsed[2].data == b"relay-1" and parsed[3].data == b"" and parsed[4].data == 125 * b"x"
    # and the tracker of that direction reads them back
    t = FrameTracker(client_to_server=mask)
    data = b"".join(frames)
    events = t.feed(data, 0, len(data))
    assert [(e.opcode, e.payload) for e in events] == [(OP_CLOSE, b"\x03\xe9shutting down"),
                                                     (OP_CLOSE, b"\x03\xf6"), (OP_PING, b"relay-1"),
                                                     (OP_PONG, b""), (OP_PING, 125 * b"x")]
    assert events[0].code == 1001 and t.close_code == 1014


def test_masked_builders_use_a_fresh_key():
    a, b = ping_frame(b"same", True), ping_frame(b"same", True)
    assert a[2:6] != b[2:6]
    assert a[1] & 0x80 and not ping_frame(b"same", False)[1] & 0x80


def test_builders_refuse_what_may_not_be_sent():
    for code in (999, 1004, 1005, 1006, 1015, 1016, 2999, 5000):
        with pytest.raises(ValueError):
            close_frame(code, mask=False)
    with pytest.raises(ValueError):
        close_frame(1000, b"x" * 124, mask=True)
    close_frame(1000, b"x" * 123, mask=True)
    with pytest.raises(ValueError):
        ping_frame(b"x" * 126, False)


def test_websockets_serialized_frames_are_tracked():
    """Frames serialised by websockets itself, masked with its own keys."""
    rnd = random.Random(7)
    frames = []
    for _ in range(50):
        n = rnd.choice([0, 1, 125, 126, 65535, 65536, rnd.randrange(300)])
        frames.append(Frame(Opcode.BINARY, rnd.randbytes(n)))
        frames.append(Frame(Opcode.PING, rnd.randbytes(rnd.randrange(126))))
    frames.append(Frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
    data = b"".join(f.serialize(mask=True) for f in frames)
    cuts = sorted(rnd.sample(range(len(data)), 500))
    t = FrameTracker(client_to_server=True)
    r = Run(t)
    prev = 0
    for c in [*cuts, len(data)]:
        r.feed(memoryview(data), prev, c)
        prev = c
    assert bytes(r.out) == data
    assert r.controls == [(int(f.opcode), f.data) for f in frames if f.opcode != Opcode.BINARY]
    assert t.messages == 50 and t.close_code == 1000
