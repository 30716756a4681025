"""Differences wsrelay still has, or keeps on purpose, for generated inputs.

A corpus case that shows a bug wsrelay still has is ``xfail(strict=True)``
through its ``known_bug`` field; one that shows a deliberate difference says
so in ``expect.allow``. Generated inputs hit the same patterns in endless
spellings, so a generated input's finding is *explained* when the input
contains the pattern (a feature :mod:`tests.differential.generate` records)
and the finding is of a kind that pattern produces. Each entry names its
corpus case, and the test checks that the case still carries the bug (or
still allows the kinds): once a bug is fixed and its case flipped, its
entry here must go too, so no fixed bug stays excused.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.differential.compare import Difference


@dataclass(frozen=True)
class Known:
    corpus: str                 # the corpus case that shows it
    features: frozenset[str]    # all of these in the input
    kinds: frozenset[str]       # the finding kinds it explains
    reason: str
    #: True: wsrelay differs on purpose (the case's expect.allow says why); False: a bug still open
    deliberate: bool = False


def _k(corpus: str, features: set[str], kinds: set[str], reason: str, deliberate: bool = False) -> Known:
    return Known(corpus, frozenset(features), frozenset(kinds), reason, deliberate)


KNOWN = [
    _k("123-absolute-form-other-authority-pipelined-interim", {"target-absolute-other"},
       {"origin-extra-message", "client-boundary"},
       "an absolute-form target naming another host than Host is forwarded with the target's authority "
       "(RFC 9112 §3.2.2, as nginx does) and HAProxy refuses it, so only nginx can agree; an input where nginx "
       "differs for another reason (it drops trailers, takes an unasked 1xx for the final answer, aborts on a "
       "client's half-close) has no anchor that does", deliberate=True),
    _k("107-http10-no-host", {"http10-no-host"}, {"origin-authority"},
       "an HTTP/1.0 request without Host reaches the origin with the origin's address as Host (nginx's default "
       "$proxy_host); the anchors as configured send none", deliberate=True),
    _k("119-http10-client-chunked-trailer", {"http10-client-chunked"}, {"client-missing-header", "client-boundary"},
       "an HTTP/1.0 client gets no trailers and no Trailer field; HAProxy 2.6 sends it chunked framing, so only "
       "nginx can agree, and an input where nginx refuses something else has no anchor that does",
       deliberate=True),
    _k("120-h2c-upgrade-answered-101", {"101-to-non-websocket"}, {"client-proxy-error", "client-boundary"},
       "a 101 to anything but a WebSocket upgrade is a 502 (no h2c tunnel); both anchors tunnel it", deliberate=True),
    _k("015-early-hints-before-101", {"interim-before-101"},
       {"client-boundary", "origin-extra-bytes", "client-unannounced-close"},
       "a 1xx before a 101 is consumed and the tunnel works; nginx 1.22 takes the 1xx for the final answer "
       "and HAProxy 2.6 answers 502, so what follows differs from both", deliberate=True),
]


def explain(features: frozenset[str], finding: Difference) -> Known | None:
    """The known difference that explains ``finding`` in an input with ``features``, if any."""
    for k in KNOWN:
        if finding.kind in k.kinds and k.features <= features:
            return k
    return None
