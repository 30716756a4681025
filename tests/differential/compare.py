"""Judging wsrelay's views of one input against the two anchors' — sans-I/O.

The rule of issue 13: a **finding** is an input where wsrelay forwards to
the origin a message or bytes that neither nginx nor HAProxy forwards, or
answers the client with message boundaries that differ from both. Anything
else that differs is a **difference**: recorded and counted by kind, never
a failure (wsrelay refusing what an anchor lets through, status codes of
refusals, fewer headers).

A subject's message is *covered* when at least one anchor forwarded the
same one (:meth:`Message.key`, counted as a multiset, so a message sent
twice where the anchors sent it once is not covered); a truncated message is
covered by any anchor message with the same head whose body starts with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tests.differential.normalise import ClientView, Message, OriginView, Reply

#: kinds that are findings (the test fails on them unless the case explains them)
FINDINGS = {
    "origin-extra-message": "a request reached the origin that neither anchor forwarded",
    "origin-unproxied": "raw bytes reached the origin as a request the proxy never parsed "
                        "(no X-Forwarded-For entry of its own): request smuggling",
    "origin-after-close": "a request was written to an origin connection whose last answer ended it "
                          "(RFC 9112 §9.3)",
    "origin-authority": "a forwarded request names another host (Host, without case or port) than both "
                        "anchors told the origin (RFC 9112 §3.2.2: an absolute-form target's authority wins)",
    "origin-extra-header": "a forwarded request carries a header line or trailer neither anchor forwarded",
    "origin-extra-bytes": "bytes reached the origin (tunnel or unparseable) that neither anchor forwarded",
    "client-boundary": "the client's sequence of responses (count, origin, body, tunnel bytes) differs "
                       "from both anchors'",
    "client-proxy-error": "the proxy answered 5xx where both anchors relayed a well-formed origin answer",
    "client-extra-header": "a response reached the client with a header neither anchor passes "
                           "(hop-by-hop fields of the origin)",
    "client-missing-header": "a response reached the client without an end-to-end header both anchors keep",
    "client-unannounced-close": "the proxy closed the client connection after a response that promised "
                                "to keep it open (RFC 9112 §9.6)",
    "expected": "wsrelay's answer is not the one the case itself states (the README's refusal status, "
                "or the RFC's outcome where neither anchor is right)",
}
#: kinds that are deliberate or harmless differences: counted, listed in SECURITY.md
BENIGN = {
    "stricter-refusal": "wsrelay refused (4xx) a request at least one anchor forwarded",
    "stricter-response": "wsrelay answered 502 to (or cut) an origin answer that breaks RFC 9112, "
                         "which an anchor relayed",
    "refusal-status": "both refused, with different status codes",
    "fewer-headers": "wsrelay forwarded a request with fewer header lines than the anchors",
    "fewer-messages": "wsrelay forwarded fewer requests than an anchor (it refused or stopped earlier)",
    "closes-early": "wsrelay closed the client connection (announced) where an anchor kept serving it",
    "unanswered-refusal": "an anchor refused a request whose head the client never completed before it closed; "
                          "wsrelay waits for a whole head before judging it",
    "interim": "the 1xx interim answers the client got differ",
}


@dataclass(frozen=True)
class Difference:
    kind: str
    detail: str

    @property
    def finding(self) -> bool:
        return self.kind in FINDINGS


@dataclass
class Observed:
    """One proxy's run of one input."""
    origin: OriginView
    client: ClientView
    #: how the client script ended its side: "open", "shutdown", "close" or "reset"
    client_end: str = "open"


# -- the origin side -------------------------------------------------------------------------

def _near(m: Message, a: Message) -> bool:
    """The same request in substance: method, target, body (a truncated one as a prefix)."""
    if (m.method, m.target) != (a.method, a.target):
        return False
    if m.complete:
        return a.complete and a.body == m.body
    return a.body.startswith(m.body)


def _covers(a: Message, m: Message) -> bool:
    if m.complete:
        return a.key() == m.key()
    return (a.method, a.target, a.authority, a.headers, a.xff, a.proxied, a.after_close) == \
        (m.method, m.target, m.authority, m.headers, m.xff, m.proxied, m.after_close) and a.body.startswith(m.body)


def _multiset_minus(a, b) -> list:
    left = Counter(a)
    left.subtract(Counter(b))
    return sorted(k for k, n in left.items() for _ in range(n) if n > 0)


def origin_differences(subject: OriginView, anchors: dict[str, OriginView]) -> list[Difference]:
    out: list[Difference] = []
    pools = {name: list(view.messages()) for name, view in anchors.items()}
    every = [a for view in anchors.values() for a in view.messages()]
    for m in subject.messages():
        taken = False
        for pool in pools.values():
            hit = next((i for i, a in enumerate(pool) if _covers(a, m)), None)
            if hit is not None:
                pool.pop(hit)
                taken = True
        if taken:
            continue
        near = [a for a in every if _near(m, a)]
        if not near:
            out.append(Difference("origin-extra-message", m.short()))
        elif any(_covers(a, m) for a in near):
            out.append(Difference("origin-extra-message", f"{m.short()} (forwarded more often than by any anchor)"))
        elif not m.proxied and all(a.proxied for a in near):
            out.append(Difference("origin-unproxied", m.short()))
        elif m.after_close and not any(a.after_close for a in near):
            out.append(Difference("origin-after-close", m.short()))
        elif all(a.authority != m.authority for a in near):
            out.append(Difference("origin-authority", f"{m.short()}: host {m.authority!r}, anchors "
                                                      f"{sorted({a.authority for a in near})!r}"))
        else:
            extra = [h for h in set(m.headers) | set(m.trailers) | {(b"x-forwarded-for", x) for x in m.xff}
                     if all(h not in a.headers and h not in a.trailers
                            and (h[0] != b"x-forwarded-for" or h[1] not in a.xff) for a in near)]
            if extra:
                out.append(Difference("origin-extra-header", f"{m.short()}: {sorted(extra)!r}"))
            else:
                missing = [_multiset_minus(a.headers + a.trailers, m.headers + m.trailers) for a in near]
                missing = min((x for x in missing if x), key=len, default=[])
                out.append(Difference("fewer-headers", f"{m.short()}: without {missing!r}"))
    counts = {name: len(v.messages()) for name, v in anchors.items()}
    if len(subject.messages()) < min(counts.values(), default=0):
        out.append(Difference("fewer-messages", f"{len(subject.messages())} forwarded, anchors {counts}"))
    tunnel = subject.tunnel()
    if tunnel and not any(v.tunnel().startswith(tunnel) for v in anchors.values()):
        out.append(Difference("origin-extra-bytes", f"tunnel bytes {tunnel[:80]!r}"))
    for left in subject.leftover():
        if not any(other.startswith(left) for v in anchors.values() for other in v.leftover()):
            out.append(Difference("origin-extra-bytes", f"unparseable bytes {left[:80]!r}"))
    return out


# -- the client side -------------------------------------------------------------------------

def _token(r: Reply) -> tuple:
    if r.from_origin:
        return ("origin", r.origin, r.status, r.body, r.trailers, r.complete)
    return ("proxy",)


def shape(view: ClientView) -> tuple:
    """The client's message boundaries: each final response (the origin's by
    marker, status and exact body; the proxy's own as one token, whatever its
    status), then tunnel bytes and unparseable bytes."""
    tokens = [_token(r) for r in view.finals()]
    if view.tunnel is not None:
        tokens.append(("tunnel", view.tunnel))
    if view.leftover:
        tokens.append(("leftover", view.leftover))
    return tuple(tokens)


def _describe(view: ClientView) -> str:
    parts = [r.short() for r in view.finals()]
    if view.tunnel is not None:
        parts.append(f"tunnel {view.tunnel[:60]!r}")
    if view.leftover:
        parts.append(f"leftover {view.leftover[:60]!r}")
    parts.append("closed" if view.closed else "open")
    return "[" + ", ".join(parts) + "]"


def client_differences(subject: Observed, anchors: dict[str, Observed]) -> list[Difference]:
    out: list[Difference] = []
    mine = shape(subject.client)
    matching = {n: o for n, o in anchors.items() if shape(o.client) == mine}
    finals = subject.client.finals()
    if not matching:
        out.append(_classify_mismatch(subject, anchors))
    else:
        # same boundaries: the proxies' own answers may still differ in status
        codes = [r.status for r in finals if not r.from_origin]
        if codes and all([r.status for r in o.client.finals() if not r.from_origin] != codes
                         for o in matching.values()):
            out.append(Difference("refusal-status", f"wsrelay {codes}, " + ", ".join(
                f"{n} {[r.status for r in o.client.finals() if not r.from_origin]}" for n, o in matching.items())))
    out.extend(_header_differences(subject, anchors))
    theirs = [tuple(r.status for r in o.client.replies if r.interim) for o in anchors.values()]
    interim = tuple(r.status for r in subject.client.replies if r.interim)
    if interim not in theirs:
        out.append(Difference("interim", f"wsrelay {list(interim)}, anchors {[list(t) for t in theirs]}"))
    # RFC 9112 §9.6: a server that closes after a response says so in it
    if (subject.client.closed and subject.client_end == "open" and finals and finals[-1].complete
            and finals[-1].persistent and not subject.client.tunnel
            and not any(o.client.closed and o.client.finals() and o.client.finals()[-1].persistent
                        for o in anchors.values())):
        out.append(Difference("client-unannounced-close", f"after {finals[-1].short()}"))
    return out


def _classify_mismatch(subject: Observed, anchors: dict[str, Observed]) -> Difference:
    mine = shape(subject.client)
    desc = f"wsrelay {_describe(subject.client)}; " + "; ".join(
        f"{n} {_describe(o.client)}" for n, o in anchors.items())
    finals = subject.client.finals()
    for o in anchors.values():
        theirs = shape(o.client)
        # wsrelay stopped with its own answer where an anchor went on relaying
        if mine and mine[-1] == ("proxy",) and subject.client.closed and theirs[:len(mine) - 1] == mine[:-1] \
                and len(theirs) >= len(mine):
            status = finals[-1].status
            if status < 500:
                return Difference("stricter-refusal", desc)
            problems = subject.origin.problems()
            if problems:
                return Difference("stricter-response", f"{desc} ({'; '.join(problems)})")
            return Difference("client-proxy-error", desc)
    last = finals[-1] if finals else None
    problems = subject.origin.problems()
    for o in anchors.values():
        theirs = shape(o.client)
        if not problems or not subject.client.closed or len(theirs) <= len(mine) - 1:
            continue
        # wsrelay cut (or reset before any byte of) an origin answer whose
        # framing a strict reading refuses, where an anchor relayed it whole
        cut = last is not None and last.from_origin and not last.complete \
            and theirs[:len(mine) - 1] == mine[:-1] and theirs[len(mine) - 1][:3] == mine[-1][:3]
        if cut or (theirs[:len(mine)] == mine and len(theirs) > len(mine)):
            return Difference("stricter-response", f"{desc} ({'; '.join(problems)})")
    for o in anchors.values():
        theirs = shape(o.client)
        # the client left mid-request; an anchor refused the partial head at once
        if subject.client_end in ("close", "reset") and theirs[:len(mine)] == mine and len(theirs) > len(mine) \
                and all(t == ("proxy",) for t in theirs[len(mine):]):
            return Difference("unanswered-refusal", desc)
    for o in anchors.values():
        theirs = shape(o.client)
        # wsrelay announced a close and closed where an anchor kept serving
        if finals and len(mine) < len(theirs) and theirs[:len(mine)] == mine and subject.client.closed \
                and not finals[-1].persistent:
            return Difference("closes-early", desc)
    return Difference("client-boundary", desc)


#: RFC 9110 §7.6.1: fields a proxy must not pass on, so never "missing" when it does not
RESPONSE_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
                                 b"upgrade"})


def _header_differences(subject: Observed, anchors: dict[str, Observed]) -> list[Difference]:
    """Header multisets of the same origin answer (matched by its X-Origin
    marker, in order) as wsrelay and each anchor relayed it: a field no anchor
    passed is extra; an end-to-end field every anchor passed is missing."""
    out = []
    theirs = {n: [r for r in o.client.finals() if r.origin is not None] for n, o in anchors.items()}
    for r in subject.client.finals():
        if r.origin is None:
            continue
        others = []
        for rs in theirs.values():
            hit = next((i for i, a in enumerate(rs) if a.origin == r.origin), None)
            if hit is not None:
                others.append(rs.pop(hit))
        if not others:
            continue
        headers = set(r.end_to_end())
        extra = sorted(h for h in headers if all(h not in set(a.end_to_end()) for a in others))
        if extra:
            out.append(Difference("client-extra-header", f"{r.short()}: {extra!r}"))
        named = {t.strip().lower() for a in others for n, v in a.headers if n == b"connection" for t in v.split(b",")}
        common = set.intersection(*(set(a.end_to_end()) for a in others))
        missing = sorted(h for h in common - headers
                         if (h[0] not in RESPONSE_HOP_BY_HOP or (h[0] == b"upgrade" and r.status == 101))
                         and h[0] not in named)
        if missing:
            out.append(Difference("client-missing-header", f"{r.short()}: {missing!r}"))
    return out


def compare(subject: Observed, anchors: dict[str, Observed]) -> list[Difference]:
    """Every difference between wsrelay's run and the anchors' runs of one input."""
    return origin_differences(subject.origin, {n: o.origin for n, o in anchors.items()}) \
        + client_differences(subject, anchors)
