"""Differences wsrelay is known to still have, for generated inputs.

A corpus case showing a known difference is ``xfail(strict=True)`` through
its ``known_bug`` field. Generated inputs hit the same bugs in endless
spellings, so a generated input's finding is *explained* when the input
contains the pattern (a feature :mod:`tests.differential.generate` records)
and the finding is of a kind that pattern produces. Each entry names its
corpus case: once that case passes (the bug is fixed and its ``known_bug``
removed), the test of this module fails until the entry is removed too, so
no fixed bug stays excused here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.differential.compare import Difference


@dataclass(frozen=True)
class Known:
    corpus: str                 # the corpus case that shows it (must carry known_bug)
    features: frozenset[str]    # all of these in the input
    kinds: frozenset[str]       # the finding kinds it explains
    reason: str


def _k(corpus: str, features: set[str], kinds: set[str], reason: str) -> Known:
    return Known(corpus, frozenset(features), frozenset(kinds), reason)


KNOWN = [
    _k("010-upgrade-refused-bytes-behind-head", {"bytes-behind-upgrade"},
       {"origin-unproxied", "origin-extra-message", "origin-extra-bytes", "client-boundary"},
       "issue 13 case 1: bytes behind an upgrade head go to the origin with it"),
    _k("011-early-answer-during-upload", {"early-answer"},
       {"origin-unproxied", "origin-extra-message", "origin-extra-bytes", "client-boundary",
        "client-unannounced-close"},
       "issue 13 case 2: after an early answer the rest of the body is parsed as requests"),
    _k("012-http10-client-chunked-answer", {"http10-client-chunked"}, {"client-boundary"},
       "issue 13 case 3: chunked answers relayed as is to HTTP/1.0 clients"),
    _k("013-origin-http10-answer-not-reused", {"http10-answer"},
       {"origin-after-close", "client-proxy-error", "client-boundary"},
       "issue 13 case 4: an origin connection ended by an HTTP/1.0 answer is pooled"),
    _k("014-refused-upgrade-keepalive-fields", {"upgrade-refused"},
       {"client-unannounced-close", "client-boundary", "client-extra-header"},
       "issue 13 case 5: a refused upgrade's answer is relayed verbatim, then the relay closes"),
    _k("015-early-hints-before-101", {"interim-before-101"}, {"client-boundary", "client-unannounced-close"},
       "issue 13 case 6: a 1xx before the 101 is taken as the final answer"),
    _k("017-trailer-field-kept", {"trailer"}, {"client-missing-header"},
       "issue 13 case 7: Trailer is dropped while trailers are relayed"),
    _k("026-refuse-bare-lf", {"bare-lf-head"}, {"client-boundary"},
       "a head ended by bare LFs gets no answer until the handshake timeout"),
    _k("117-fragment-target-empty-host", {"host-invalid"}, {"origin-extra-message", "client-boundary"},
       "an invalid Host (empty, or with a space) is forwarded: nginx refuses it, HAProxy refuses it too "
       "once the target has a fragment or an absolute-form authority"),
    _k("116-head-refusal-without-body", {"head-request"}, {"client-boundary"},
       "wsrelay's refusals carry a body even in answer to HEAD"),
]


def explain(features: frozenset[str], finding: Difference) -> Known | None:
    """The known difference that explains ``finding`` in an input with ``features``, if any."""
    for k in KNOWN:
        if finding.kind in k.kinds and k.features <= features:
            return k
    return None
