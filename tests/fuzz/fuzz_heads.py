"""Coverage-guided fuzzing of wsrelay's sans-I/O parsers with atheris (libFuzzer).

Run by an operator, for as long as there is time (not collected by pytest)::

    pip install atheris
    python tests/fuzz/fuzz_heads.py -max_total_time=600          # ten minutes
    python tests/fuzz/fuzz_heads.py -dict=tests/fuzz/http.dict -max_total_time=600 corpus/  # better
    python tests/fuzz/fuzz_heads.py crash-<sha1>                  # replay a finding

The first input byte picks the target: request head, response head, chunked
body, the configuration loader (environment), an ``--env-file``'s text
(``read_env_file`` then ``load``), a PROXY protocol header, or the compiled
head parsers and forward_head (relay/native/http_head.c) against their
references; the rest is the input. The invariants are
the ones the hypothesis properties check (tests/fuzz/invariants.py): only the
parser's own error, the same answer whole and in pieces, forwarded requests
that keep their meaning. A crash file is a regression test to add to
tests/unit/test_fuzz.py before fixing the parser.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from relay import config, handshake, http_body, http_head, proxy_protocol  # noqa: F401
    from tests.fuzz import invariants

TARGETS = ("request", "response", "body", "config", "envfile", "proxy", "native-request", "native-response")
try:
    from relay.native import _engine as native_engine
except ImportError:  # not built: the native targets check nothing
    native_engine = None
_ENV_FILE = os.path.join(tempfile.mkdtemp(prefix="wsrelay-fuzz-"), "fuzz.env")


def _cuts(fdp: atheris.FuzzedDataProvider, n: int) -> list[int]:
    return sorted({fdp.ConsumeIntInRange(0, n) for _ in range(fdp.ConsumeIntInRange(0, 6))})


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
    if target.startswith("native-"):
        if native_engine is None:
            return
        buf = fdp.ConsumeBytes(fdp.remaining_bytes())
        cuts = None if len(buf) < 64 else range(1, len(buf), 7)
        if target == "native-request":
            invariants.check_same_as_reference(native_engine.parse_request_head, http_head.parse_request_head, buf,
                                               cuts)
            invariants.check_same_forward(native_engine.parse_request_head, native_engine.forward_head, buf)
        else:
            invariants.check_same_as_reference(native_engine.parse_response_head, http_head.parse_response_head, buf,
                                               cuts)
    elif target == "request":
        byte_by_byte = fdp.ConsumeBool()
        buf = fdp.ConsumeBytes(fdp.remaining_bytes())
        invariants.check_head_parser(http_head.parse_request_head, buf,
                                     cuts=None if byte_by_byte or len(buf) < 64 else range(1, len(buf), 7))
        invariants.check_request_semantics(buf)
    elif target == "proxy":
        invariants.check_proxy_header(fdp.ConsumeBytes(fdp.remaining_bytes()))
    elif target == "response":
        buf = fdp.ConsumeBytes(fdp.remaining_bytes())
        invariants.check_head_parser(http_head.parse_response_head, buf)
        invariants.check_response_semantics(buf)
    elif target == "body":
        length = (-1, None, fdp.ConsumeIntInRange(0, 1 << 16))[fdp.ConsumeIntInRange(0, 2)]
        cuts = _cuts(fdp, 1 << 12)
        buf = fdp.ConsumeBytes(fdp.remaining_bytes())
        invariants.check_body_scanner(length, buf, cuts)
        invariants.check_body_scanner(length, buf)
    elif target == "envfile":
        with open(_ENV_FILE, "wb") as f:
            f.write(fdp.ConsumeBytes(fdp.remaining_bytes()))
        try:
            values = config.read_env_file(_ENV_FILE)
        except config.ConfigError as e:
            assert e.lines
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
        try:
            config.load({}, env_file=_ENV_FILE, require_origin=False).to_json()
        except config.ConfigError as e:
            assert e.lines
    else:
        environ = {}
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            key = config.VARIABLES[fdp.ConsumeIntInRange(0, len(config.VARIABLES) - 1)]
            environ[key] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
        try:
            s = config.load(environ, require_origin=fdp.ConsumeBool())
        except config.ConfigError:
            return
        s.to_json()
        for name in s.__struct_fields__:
            v = getattr(s, name)
            if isinstance(v, int):
                assert -(1 << 63) <= v < (1 << 63), (name, v)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
