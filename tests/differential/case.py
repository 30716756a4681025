"""One differential input: what the client writes and how the origin answers.

Corpus files (``tests/differential/corpus/NNN-name.json``) hold one case
each, as JSON a reviewer can read: strings are bytes in Latin-1, so
``"\\r\\n"`` is CRLF and ``"\\u0000"`` a NUL; a list of strings is joined
(one string per line reads best). Fields::

    title      one line: what the input does
    why        optional: what it probes (RFC section, the attack)
    client     steps, in order:
                 {"send": "..."}                          one write
                 {"pause": 0.05}                          seconds, so writes reach the proxy apart
                 {"wait": "response", "count": 1, "timeout": 1.0}
                     until that many final responses arrived (or the proxy closed)
                 {"wait": "origin", "at": "head"|"request", "count": 1, "timeout": 1.0}
                     until the origin saw that many heads / whole requests
                 {"shutdown": true} | {"close": true} | {"reset": true}   the client's end
    origin     the origin's answers, consumed in order, each on an event of
               the connection it arrives on ("head": a request head is in;
               "request": a whole request is in; "connect"):
                 {"on": "request", "send": "...", "then": "keep"|"close"|"reset"|"shutdown"|"echo"|"ignore",
                  "close_after": 0.3}
               ``{accept}`` in ``send`` is the Sec-WebSocket-Accept for the
               request's key. A request no entry answers gets the default
               200 (``X-Origin: default``). After a 101 the origin echoes.
    expect     optional, for a deliberate difference or an outcome of its own:
                 {"allow": ["client-extra-header"], "status": [400], "tunnel": "...", "why": "..."}
               ``allow``: finding kinds this input may show (explained in
               ``why``); ``status``: the final statuses wsrelay must answer
               (pins the README's refusal list); ``tunnel``: the bytes the
               client must get back after a 101, where neither anchor is
               right and the case states the RFC's outcome itself.
    known_bug  optional: a difference wsrelay still has, with the reason; the
               test is ``xfail(strict=True)``, so it fails once fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"

DEFAULT_RESPONSE = b"HTTP/1.1 200 OK\r\nX-Origin: default\r\nContent-Length: 7\r\n\r\ndefault"

_CLIENT_KEYS = {"send", "pause", "wait", "shutdown", "close", "reset"}
_THEN = {"keep", "close", "reset", "shutdown", "echo", "ignore"}


class CaseError(ValueError):
    pass


def _bytes(value) -> bytes:
    if isinstance(value, list):
        return b"".join(_bytes(v) for v in value)
    if not isinstance(value, str):
        raise CaseError(f"expected a string or a list of strings, got {value!r}")
    return value.encode("latin-1")


@dataclass(frozen=True)
class Step:
    kind: str  # send, pause, wait-response, wait-origin, shutdown, close, reset
    data: bytes = b""
    seconds: float = 0.0
    count: int = 1
    at: str = "head"


@dataclass(frozen=True)
class Answer:
    on: str  # connect, head, request
    send: bytes = b""
    then: str = "keep"
    close_after: float = 0.0


@dataclass
class Case:
    name: str
    title: str
    client: list[Step]
    origin: list[Answer]
    why: str = ""
    allow: frozenset[str] = frozenset()
    status: list[int] | None = None
    tunnel: bytes | None = None
    expect_why: str = ""
    known_bug: str = ""
    #: generated inputs: the named patterns they contain (see tests/differential/known.py)
    features: frozenset[str] = frozenset()
    source: dict = field(default_factory=dict, repr=False)

    @property
    def sent(self) -> bytes:
        return b"".join(s.data for s in self.client if s.kind == "send")

    @property
    def client_end(self) -> str:
        ends = [s.kind for s in self.client if s.kind in ("shutdown", "close", "reset")]
        return ends[-1] if ends else "open"

    def to_json(self) -> dict:
        """The case as a corpus file would hold it (for a generated input worth keeping)."""
        steps = []
        for s in self.client:
            if s.kind == "send":
                steps.append({"send": s.data.decode("latin-1")})
            elif s.kind == "pause":
                steps.append({"pause": s.seconds})
            elif s.kind == "wait-response":
                steps.append({"wait": "response", "count": s.count, "timeout": s.seconds})
            elif s.kind == "wait-origin":
                steps.append({"wait": "origin", "at": s.at, "count": s.count, "timeout": s.seconds})
            else:
                steps.append({s.kind: True})
        answers = [{"on": a.on, "send": a.send.decode("latin-1"), "then": a.then,
                    **({"close_after": a.close_after} if a.close_after else {})} for a in self.origin]
        out = {"title": self.title, "client": steps, "origin": answers}
        if self.features:
            out["why"] = "features: " + ", ".join(sorted(self.features))
        return out


def _step(raw: dict) -> Step:
    keys = set(raw) & _CLIENT_KEYS
    if len(keys) != 1:
        raise CaseError(f"a client step needs exactly one of {sorted(_CLIENT_KEYS)}: {raw!r}")
    key = keys.pop()
    if key == "send":
        return Step("send", _bytes(raw["send"]))
    if key == "pause":
        return Step("pause", seconds=float(raw["pause"]))
    if key == "wait":
        what = raw["wait"]
        if what not in ("response", "origin"):
            raise CaseError(f"wait is 'response' or 'origin', not {what!r}")
        at = raw.get("at", "head")
        if at not in ("head", "request"):
            raise CaseError(f"wait at 'head' or 'request', not {at!r}")
        return Step(f"wait-{what}", seconds=float(raw.get("timeout", 1.0)), count=int(raw.get("count", 1)), at=at)
    return Step(key)


def _answer(raw: dict) -> Answer:
    on = raw.get("on", "request")
    then = raw.get("then", "keep")
    if on not in ("connect", "head", "request"):
        raise CaseError(f"origin 'on' is connect, head or request, not {on!r}")
    if then not in _THEN:
        raise CaseError(f"origin 'then' is one of {sorted(_THEN)}, not {then!r}")
    return Answer(on, _bytes(raw.get("send", "")), then, float(raw.get("close_after", 0.0)))


def from_json(name: str, raw: dict) -> Case:
    unknown = set(raw) - {"title", "why", "client", "origin", "expect", "known_bug"}
    if unknown:
        raise CaseError(f"{name}: unknown fields {sorted(unknown)}")
    expect = raw.get("expect", {})
    if set(expect) - {"allow", "status", "tunnel", "why"}:
        raise CaseError(f"{name}: unknown expect fields {sorted(set(expect) - {'allow', 'status', 'tunnel', 'why'})}")
    try:
        return Case(name=name, title=raw["title"], client=[_step(s) for s in raw["client"]],
                    origin=[_answer(a) for a in raw.get("origin", [])], why=raw.get("why", ""),
                    allow=frozenset(expect.get("allow", ())), status=expect.get("status"),
                    tunnel=_bytes(expect["tunnel"]) if "tunnel" in expect else None,
                    expect_why=expect.get("why", ""), known_bug=raw.get("known_bug", ""), source=raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CaseError(f"{name}: {e}") from e


def load(path: Path) -> Case:
    return from_json(path.stem, json.loads(path.read_text()))


def corpus() -> list[Case]:
    return [load(p) for p in sorted(CORPUS.glob("*.json"))]
