"""WebSocket frames for the tracker tests: an independent encoder (so tests
can build what a builder must refuse) and a recorder of what a tracker
released (shared by tests/unit/test_frames_tracker.py and test_frames_deflate.py)."""

from __future__ import annotations

import os

from relay.frames import Control, FrameTracker

TEXT, BINARY, CONT = 0x1, 0x2, 0x0


# -- an independent frame encoder (lets tests build what a builder must refuse)
def frame(opcode: int, payload: bytes | int = b"", *, mask: bool, fin: bool = True,
          rsv: int = 0, form: int | None = None, key: bytes | None = None) -> bytes:
    """One frame. ``payload`` may be a length (zero bytes then). ``form``
    forces the length encoding: 7, 16 or 64 bits (non-minimal allowed)."""
    if isinstance(payload, int):
        payload = bytes(payload)
    n = len(payload)
    if form is None:
        form = 7 if n < 126 else 16 if n < 65536 else 64
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    m = 0x80 if mask else 0
    if form == 7:
        head = bytes((b0, m | n))
    elif form == 16:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = key if key is not None else os.urandom(4)
    if n:
        keys = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return head + key + payload



class Run:
    """What a tracker released and reported when fed one chunking of a stream."""

    def __init__(self, tracker: FrameTracker):
        self.t = tracker
        self.out = bytearray()
        self.controls: list[tuple[int, bytes]] = []
        self.fed = 0
        self.injected = 0  # bytes a test wrote of its own, between frames
        self.plans = []

    def release(self, plan, buf, start, end) -> None:
        if plan is None:
            self.out += buf[start:end]
            return
        for item in plan:
            if isinstance(item, Control):
                self.controls.append((item.opcode, item.payload))
                self.out += item.raw
            else:
                assert isinstance(item, (bytes, memoryview)), item
                self.out += item

    def feed(self, buf, start, end) -> None:
        plan = self.t.feed(buf, start, end)
        self.plans.append(plan)
        self.release(plan, buf, start, end)
        self.fed += end - start
        # nothing lost or invented: what is not released is held, and only that
        assert len(self.out) - self.injected + self.t.held == self.fed

    def check_boundary(self, boundaries) -> None:
        released = len(self.out)
        if self.t.at_boundary:
            assert released in boundaries
            assert self.t.to_boundary == 0
        else:
            assert released + self.t.to_boundary in boundaries
            assert self.t.held == 0  # holding happens only at a boundary


