"""wsrelay against nginx and HAProxy on the same inputs (issue 13).

Every corpus case and a bounded number of generated inputs go through the
three proxies to one recording origin (tests/differential/runner.py); the
test fails on any finding — wsrelay forwarding to the origin what neither
anchor forwards, or answering the client with other message boundaries —
that the case does not explain (``expect.allow``). Cases that show a
difference wsrelay still has are ``xfail(strict=True)`` with the reason, so
they fail the day the fix lands and the ``known_bug`` line must go.

``WSRELAY_DIFF_EXAMPLES`` sets the number of generated inputs (default 30,
the same ones every run; with the variable set they are random and the
seed is in the summary). ``python -m tests.differential`` runs the same
outside pytest and prints a summary; tests/differential/last-run.json keeps
the last run's.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.differential import case as corpus_files
from tests.differential import proxies
from tests.differential.generate import cases
from tests.differential.known import KNOWN, explain
from tests.differential.runner import Harness
from tests.differential.summary import Run

MISSING = proxies.missing()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not installed: the differential "
                                                      "harness needs both anchors (apt-get install -y nginx haproxy)")

EXAMPLES = int(os.environ.get("WSRELAY_DIFF_EXAMPLES", "30"))
CORPUS = corpus_files.corpus()


@pytest.fixture(scope="module")
def run():
    r = Run()
    yield r
    if r.corpus or r.generated:
        r.write()


@pytest.fixture(scope="module")
def harness(loop_thread, tmp_path_factory):
    h = Harness(loop_thread, tmp_path_factory.mktemp("differential")).start()
    yield h
    h.stop()


def _param(c):
    marks = [pytest.mark.xfail(strict=True, reason=c.known_bug)] if c.known_bug else []
    return pytest.param(c, id=c.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CORPUS])
def test_corpus(harness, run, case):
    verdict = harness.run(case)
    run.corpus.append(verdict)
    assert not verdict.findings, verdict.report()
    if case.allow:
        # a deliberate difference that no longer shows must lose its explanation too
        assert case.allow & {d.kind for d in verdict.allowed}, \
            f"{case.name}: expect.allow {sorted(case.allow)} no longer occurs; remove it\n{verdict.report()}"


def test_generated(harness, run):
    """Generated framing/Connection/Expect/1xx/pipelining/early-close inputs:
    no finding that a known difference (tests/differential/known.py) does not explain."""
    if "WSRELAY_DIFF_EXAMPLES" in os.environ:
        run.seed = random.randrange(2**32)  # random inputs, the seed in the summary
        play = seed(run.seed)(_play(harness, run, derandomize=False))
    else:
        play = _play(harness, run, derandomize=True)
    play()
    assert len(run.generated) >= min(EXAMPLES, 10)
    bad = [v for v in run.generated if run.unexplained(v)]
    assert not bad, "\n\n".join(v.report() + "\ninput: " + repr(v.case.to_json()) for v in bad)


def _play(harness, run, derandomize: bool):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=derandomize, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases())
    def play(case):
        run.generated.append(harness.run(case))
    return play


def test_no_connection_leaked_between_inputs(harness):
    """Every origin connection of one input was closed before the next began
    (a pooled connection carried into the next input would mix their bytes)."""
    assert harness.stray == 0, harness.stray_report()


def test_known_differences_still_exist():
    """Each excuse for generated inputs points at a corpus case that still
    shows it: a bug's case is still marked known_bug (when the lead fixes it and
    flips the case, its entry in known.py goes too); a deliberate difference's
    case still allows one of its kinds."""
    by_name = {c.name: c for c in CORPUS}
    for k in KNOWN:
        assert k.corpus in by_name, f"known.py names {k.corpus}, which is not in the corpus"
        case = by_name[k.corpus]
        if k.deliberate:
            assert case.allow & k.kinds and not case.known_bug, f"{k.corpus} does not allow {sorted(k.kinds)}"
        else:
            assert case.known_bug, f"{k.corpus} is fixed (no known_bug): remove its entry from known.py"


def test_explain_needs_the_pattern():
    from tests.differential.compare import Difference
    finding = Difference("client-boundary", "x")
    assert explain(frozenset({"interim-before-101", "upgrade"}), finding) is not None
    assert explain(frozenset({"upgrade"}), finding) is None
    assert explain(frozenset({"interim-before-101"}), Difference("origin-extra-message", "x")) is None
