"""The machine-readable summary of a differential run (kept out of git).

Written by the test session and by ``python -m tests.differential`` to
``tests/differential/last-run.json`` (or ``$WSRELAY_DIFF_SUMMARY``): inputs
run, differences by kind, every finding with the input and what each
proxy did.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.differential.known import explain
from tests.differential.runner import Verdict

DEFAULT_PATH = Path(__file__).parent / "last-run.json"


@dataclass
class Run:
    corpus: list[Verdict] = field(default_factory=list)
    generated: list[Verdict] = field(default_factory=list)
    seed: int | None = None

    def unexplained(self, v: Verdict) -> list:
        """Findings of a verdict no known difference explains (corpus cases explain
        theirs with known_bug / expect.allow; generated ones through known.py)."""
        if v in self.generated:
            return [d for d in v.findings if explain(v.case.features, d) is None]
        return [] if v.case.known_bug else v.findings

    def counts(self) -> dict:
        kinds: Counter = Counter()
        for v in self.corpus + self.generated:
            kinds.update({d.kind for d in v.differences})
        return dict(sorted(kinds.items()))

    def to_json(self) -> dict:
        def entry(v: Verdict, source: str) -> dict:
            out = v.summary()
            out["source"] = source
            out["known_bug"] = v.case.known_bug
            if source == "generated":
                out["input"] = v.case.to_json()
                out["explained_by"] = sorted({k.corpus for d in v.findings
                                              if (k := explain(v.case.features, d)) is not None})
            out["unexplained"] = [d.kind for d in self.unexplained(v)]
            return out
        everything = [(v, "corpus") for v in self.corpus] + [(v, "generated") for v in self.generated]
        return {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "commit": _commit(),
            "inputs": {"corpus": len(self.corpus), "generated": len(self.generated), "seed": self.seed},
            "inputs_with_differences": sum(bool(v.differences) for v in self.corpus + self.generated),
            "differences_by_kind": self.counts(),
            "known_bug_cases": [v.case.name for v in self.corpus if v.case.known_bug],
            "unexplained_findings": sum(bool(self.unexplained(v)) for v in self.corpus + self.generated),
            "seconds": round(sum(v.seconds for v in self.corpus + self.generated), 1),
            "cases": [entry(v, s) for v, s in everything if v.differences or v.unconfirmed],
        }

    def write(self, path: Path | None = None) -> Path:
        path = Path(os.environ.get("WSRELAY_DIFF_SUMMARY", "") or path or DEFAULT_PATH)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def text(self) -> str:
        j = self.to_json()
        lines = [f"differential run: {j['inputs']['corpus']} corpus + {j['inputs']['generated']} generated inputs "
                 f"in {j['seconds']} s; {j['inputs_with_differences']} with a difference, "
                 f"{j['unexplained_findings']} with an unexplained finding",
                 "differences by kind (inputs): " + ", ".join(f"{k} {n}" for k, n in j["differences_by_kind"].items())]
        for v in self.corpus + self.generated:
            if self.unexplained(v):
                lines.append("UNEXPLAINED " + v.report())
        return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
