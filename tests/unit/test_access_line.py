"""The access-log line C writes for a fast-path tunnel (relay/native/access_log.c)
against the one relay/logs.py writes for the same record: byte for byte, over
random field values (every byte value, lengths across _text()'s 512-byte cut,
X-Forwarded-For lines whose join crosses it)."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from relay import native
from relay.logs import AccessRecord, _encode, _text

if not native.AVAILABLE:
    if os.environ.get("WSRELAY_REQUIRE_NATIVE", "") not in ("", "0"):
        pytest.fail("WSRELAY_REQUIRE_NATIVE is set but the native data plane is unavailable: " + native.WHY_NOT)
    pytest.skip("native data plane unavailable: " + native.WHY_NOT, allow_module_level=True)

from relay.native import _engine  # noqa: E402


def python_line(worker, client, method, path, origin, pool, ua, xff, rid, version, hs_ms, resumed, now, dur, up, down):
    """What relay/logs.py writes: NativeFront.on_head's record, as _upgraded and
    Context.tunnel_ended fill it, at time ``now`` (AccessLog.write's clock)."""
    second = int(now)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{int((now - second) * 1000):03d}Z"
    joined = None if not xff else xff[0] if len(xff) == 1 else b", ".join(xff)
    rec = AccessRecord(time=stamp, worker=worker, client=client.decode(), method=_text(method, 32), path=_text(path),
                       status=101, outcome="upgraded", handshake_ms=round(hs_ms, 3), duration_s=round(dur, 3),
                       bytes_up=up, bytes_down=down, origin=origin.decode(), pool=pool.decode(), tries=1,
                       user_agent=_text(ua), x_forwarded_for=_text(joined), request_id=rid.decode(),
                       data_plane="native", tls_version=version.decode(), tls_resumed=resumed)
    return _encode(rec) + b"\n"


def _bytes(rng: random.Random) -> bytes:
    n = rng.choice([0, 1, 5, 40, 510, 511, 512, 513, 600, 2000])
    if rng.random() < 0.3:
        return bytes(rng.randrange(256) for _ in range(n))
    return bytes(rng.choice(b'abc /"\\\t\x00\x1f\x7f\x80\xff%') for _ in range(n))


def _number(rng: random.Random) -> float:
    return rng.choice([0.0, 0.0625, 0.5, 1.0, 12.0, rng.random(), rng.random() * 1000, rng.random() * 86400 * 30])


@pytest.mark.parametrize("seed", range(40))
def test_the_line_is_the_reference_line(seed):
    rng = random.Random(seed)
    for _ in range(50):
        xff = tuple(_bytes(rng) for _ in range(rng.choice([0, 1, 1, 2, 3, 9])))
        args = (rng.randrange(64), rng.choice([b"127.0.0.1", b"::1", b"2001:db8::7", b"-"]),
                rng.choice([b"GET", _bytes(rng)]), b"/" + _bytes(rng),
                rng.choice([b"127.0.0.1:9000", b"app.internal:443", b'odd"name']), rng.choice([b"default", b"chat"]),
                _bytes(rng), xff, rng.choice([b"0" * 32, b"a" * 200, b"req-1"]),
                rng.choice([b"", b"TLSv1.3", b"TLSv1.2"]), _number(rng), rng.random() < 0.5,
                1_700_000_000 + rng.random() * 1e8, _number(rng), rng.randrange(2**63), rng.randrange(2**40))
        got = _engine.access_line(*args)
        assert got == python_line(*args), args
        assert json.loads(got)["outcome"] == "upgraded"


def test_a_join_cut_inside_its_separator():
    """X-Forwarded-For lines whose join reaches 512 bytes inside a ", ": cut there, as _text() cuts the join."""
    xff = (b"a" * 511, b"b" * 10)
    args = (0, b"127.0.0.1", b"GET", b"/", b"o:1", b"default", b"", xff, b"r", b"", 1.0, False, 1e9, 2.0, 1, 2)
    line = _engine.access_line(*args)
    assert json.loads(line)["x_forwarded_for"] == "a" * 511 + ","
    assert line == python_line(*args)
