"""The repository says what it is: the license it claims, and citations a reader
can follow (the README, never a SPEC that is not in the repository)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

from tests.support.relay import ROOT


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if out.returncode == 0 and out.stdout:
        return out.stdout.splitlines()
    return [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) if ".git" not in d for f in fs]


def test_no_citation_of_a_spec_that_is_not_here():
    cited = []
    for rel in tracked_files():
        if rel.endswith((".png", ".pyc")) or rel.startswith("tests/unit/test_repository.py"):
            continue
        try:
            text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        cited += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if re.search(r"\bSPEC\b", line)]
    assert cited == []


def test_license_file_matches_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["license"] == {"text": "MIT"}
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License\n\nCopyright (c) the wsrelay authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text


def test_quick_start_installs_into_a_venv():
    """Debian 12's own Python refuses a plain `pip install` (PEP 668,
    externally-managed-environment): the quick start makes a venv first and
    names the Python it needs, the one pyproject.toml requires."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first_block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1)
    venv = first_block.index("-m venv")
    activate = first_block.index("/bin/activate")
    assert venv < activate < first_block.index("pip install")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["project"]["requires-python"]
    assert requires == ">=3.11" and "Python ≥ 3.11" in quick.split("```", 1)[0]


def test_every_package_is_installed():
    """`pip install .` installs only the packages pyproject.toml lists: a
    subpackage left out imports in the checkout and fails once installed."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("relay", "workers", "metrics"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found == listed
