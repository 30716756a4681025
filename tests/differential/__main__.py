"""``python -m tests.differential``: the differential harness outside pytest.

    python -m tests.differential                      # corpus + 200 random generated inputs
    python -m tests.differential --examples 2000      # more (about 0.4 s each on 2 cores)
    python -m tests.differential --corpus-only -k 011 # corpus cases whose name contains 011
    python -m tests.differential --save DIR           # unexplained generated inputs as corpus files

Prints the inputs run and the differences by kind, every unexplained
finding in full, writes tests/differential/last-run.json, and exits 1 if a
finding is unexplained (a corpus case without known_bug, a generated input
no entry of known.py covers).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.differential import case as corpus_files
from tests.differential import proxies
from tests.differential.generate import cases
from tests.differential.runner import Harness
from tests.differential.summary import Run
from tests.support.relay import LoopThread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.differential", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=200, help="generated inputs (default 200)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    p.add_argument("--corpus-only", action="store_true")
    p.add_argument("-k", dest="select", default="", help="only corpus cases whose name contains this")
    p.add_argument("--save", type=Path, default=None, help="write unexplained generated inputs here as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print every input's report")
    args = p.parse_args(argv)
    missing = proxies.missing()
    if missing:
        print(f"{' and '.join(missing)} not installed (apt-get install -y nginx haproxy)", file=sys.stderr)
        return 2
    run = Run(seed=args.seed if args.seed is not None else random.randrange(2**32))
    lt = LoopThread()
    harness = Harness(lt, Path(tempfile.mkdtemp(prefix="wsrelay-diff-"))).start()
    try:
        for c in corpus_files.corpus():
            if args.select in c.name:
                v = harness.run(c)
                run.corpus.append(v)
                if args.verbose:
                    print(v.report())
        if not args.corpus_only and not args.select and args.examples > 0:
            @seed(run.seed)
            @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(cases())
            def play(case):
                v = harness.run(case)
                run.generated.append(v)
                if args.verbose:
                    print(v.report())
            play()
    finally:
        harness.stop()
        lt.stop()
    path = run.write()
    print(run.text())
    print(f"summary: {path} (seed {run.seed})")
    bad = [v for v in run.generated if run.unexplained(v)]
    if args.save and bad:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(bad):
            (args.save / f"generated-{run.seed}-{i}.json").write_text(json.dumps(v.case.to_json(), indent=2) + "\n")
    return 1 if any(run.unexplained(v) for v in run.corpus + run.generated) else 0


if __name__ == "__main__":
    sys.exit(main())
