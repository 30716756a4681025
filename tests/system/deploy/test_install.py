"""deploy/install.sh: ``--root`` builds the expected tree, a second run
changes nothing, the installed ``wsrelay`` serves, edited config files
survive, an interpreter ProtectHome=yes hides is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.support.relay import ROOT
from tests.system.deploy.support import (
    CmdRelay,
    clean_env,
    one,
    parse_unit,
    round_trip,
    runnable_copy,
    verify,
)

DEPLOY = Path(ROOT) / "deploy"
UNIT = DEPLOY / "wsrelay.service"
SOCKET_UNIT = DEPLOY / "wsrelay.socket"
ENV_FILE = DEPLOY / "wsrelay.env"
SYSCTL_FILE = DEPLOY / "sysctl.d" / "60-wsrelay.conf"
INSTALL = DEPLOY / "install.sh"
PREFIX = "/opt/wsrelay"

# The supervisor SIGKILLs workers this long after the drain timeout
# (workers/supervisor.py, _on_term): systemd must wait longer than both.
SUPERVISOR_KILL_GRACE = 5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze missing (apt-get install systemd)")




# -- the installer ------------------------------------------------------------------------------

def _hidden(path: str) -> bool:
    """Hidden from the service by the unit's ProtectHome=yes."""
    return (os.path.realpath(path) + "/").startswith(("/home/", "/root/", "/run/user/"))


def _python_ok(python: str) -> bool:
    """Python >= 3.11 with this interpreter's ABI (it will import our compiled dependencies)."""
    r = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 11), sys.implementation.cache_tag)"],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.split() == ["True", sys.implementation.cache_tag]


def service_python() -> str:
    """An interpreter the service could run: this one unless ProtectHome=yes hides it
    (a pyenv, uv or conda Python under /root or /home), else Debian's /usr/bin/python3."""
    if not _hidden(sys.executable) and not _hidden(sys.base_prefix):
        return sys.executable
    if os.path.exists("/usr/bin/python3") and _python_ok("/usr/bin/python3"):
        return "/usr/bin/python3"
    pytest.skip("no Python >= 3.11 outside home directories (apt-get install python3 python3-venv)")


def install_env() -> dict[str, str]:
    """The environment install.sh runs in: this interpreter's packages on PYTHONPATH
    (with --no-deps nothing is downloaded, and another interpreter needs them)."""
    import site

    return clean_env(PYTHONPATH=os.pathsep.join(site.getsitepackages()))


def run_install(src: Path, root: Path, *args: str, python: str | None = None, check: bool = True,
                env: dict | None = None) -> str:
    r = subprocess.run(["bash", str(src / "deploy" / "install.sh"), "--root", str(root),
                        *(["--python", python or service_python()] if python != "" else []),
                        "--system-site-packages", "--no-deps", *args],
                       capture_output=True, text=True, timeout=300, env=env or install_env())
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    return r


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below root: type, mode, size, mtime, content hash or link target."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                what = ("link", os.readlink(p))
            elif os.path.isdir(p):
                what = ("dir",)
            else:
                with open(p, "rb") as f:
                    what = ("file", hashlib.sha256(f.read()).hexdigest())
            out[os.path.relpath(p, root)] = (*what, st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """install.sh run from a copy of this checkout (others may edit the real one meanwhile)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    shutil.copytree(DEPLOY, src / "deploy", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(Path(ROOT) / name, src / name)
    for package in ("relay", "workers", "metrics"):
        shutil.copytree(Path(ROOT) / package, src / package, ignore=ignore)
    root = base / "root"
    first = run_install(src, root)
    _see_this_environment(root / PREFIX.lstrip("/"))
    return src, root, first


def installed_python(root: Path) -> Path:
    return root / PREFIX.lstrip("/") / "bin" / "python"


def test_install_produces_the_expected_tree(installed):
    src, root, first = installed
    venv = root / PREFIX.lstrip("/")
    for rel in ("etc/systemd/system/wsrelay.service", "etc/systemd/system/wsrelay.socket",
                "etc/wsrelay/wsrelay.env", "etc/sysctl.d/60-wsrelay.conf"):
        p = root / rel
        assert p.is_file(), rel
        assert p.stat().st_mode & 0o777 == 0o644, rel  # readable by the service's dynamic user
        assert f"installed /{rel}" in first
    assert (root / "etc/wsrelay/wsrelay.env").read_bytes() == ENV_FILE.read_bytes()
    assert (root / "etc/sysctl.d/60-wsrelay.conf").read_bytes() == SYSCTL_FILE.read_bytes()
    assert os.readlink(root / "usr/local/bin/wsrelay") == f"{PREFIX}/bin/wsrelay"
    assert os.access(venv / "bin" / "wsrelay", os.X_OK)
    unit = parse_unit((root / "etc/systemd/system/wsrelay.service").read_text())
    assert one(unit, "Service", "ExecStart").startswith(f"{PREFIX}/bin/wsrelay run --env-file ")
    # The venv's own copy of the package, not this checkout's.
    r = subprocess.run([str(installed_python(root)), "-c", "import relay, workers; print(relay.__file__)"],
                       capture_output=True, text=True, timeout=30, cwd=root, env=clean_env())
    assert r.stdout.strip().startswith(str(venv)), r.stdout + r.stderr
    out = subprocess.run([str(venv / "bin" / "wsrelay"), "--version"], capture_output=True, text=True,
                         timeout=30, cwd=root, env=clean_env()).stdout
    assert out.strip() == f"wsrelay {__import__('relay').__version__}"


@needs_analyze
def test_installed_unit_verifies(installed, tmp_path):
    _, root, _ = installed
    text = (root / "etc/systemd/system/wsrelay.service").read_text()
    assert verify(runnable_copy(tmp_path, text, str(root / PREFIX.lstrip("/") / "bin" / "wsrelay"))) == ""


def test_install_twice_changes_nothing(installed):
    src, root, _ = installed
    before = tree(root)
    second = run_install(src, root)
    assert tree(root) == before
    assert "installed" not in second.replace("unchanged", ""), second


def test_install_with_another_prefix(tmp_path, installed):
    """--prefix moves the venv, the unit's ExecStart and the symlink with it. (The venv
    is the one installed above, copied there: creating one is tested already.)"""
    src, first_root, _ = installed
    root = tmp_path / "root"
    shutil.copytree(first_root / PREFIX.lstrip("/"), root / "srv/relay", symlinks=True)
    out = run_install(src, root, "--prefix", "/srv/relay")
    assert "unchanged /srv/relay" in out  # the copied venv was recognised as up to date
    assert (root / "srv/relay/bin/wsrelay").exists()
    unit = parse_unit((root / "etc/systemd/system/wsrelay.service").read_text())
    assert one(unit, "Service", "ExecStart").startswith("/srv/relay/bin/wsrelay ")
    assert os.readlink(root / "usr/local/bin/wsrelay") == "/srv/relay/bin/wsrelay"
    assert "installed" in out


def test_installed_wsrelay_serves_through_its_env_file(installed, ws_origin, tmp_path):
    _, root, _ = installed
    venv = root / PREFIX.lstrip("/")
    _see_this_environment(venv)
    env_file = tmp_path / "wsrelay.env"
    env_file.write_text((root / "etc/wsrelay/wsrelay.env").read_text()
                        + f"\nRELAY_ORIGIN={ws_origin.addr}\nRELAY_LISTEN=127.0.0.1:0\n"
                          "RELAY_METRICS_LISTEN=127.0.0.1:0\nRELAY_WORKERS=1\n")
    cmd = [str(venv / "bin" / "wsrelay"), "run", "--env-file", str(env_file)]
    r = CmdRelay(cmd, None, cwd=str(tmp_path))
    r.env = clean_env(PYTHONUNBUFFERED="1")  # every setting comes from the file
    with r:
        round_trip(r.port)
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/readyz", timeout=5) as resp:
            assert resp.status == 200


def _see_this_environment(venv: Path) -> None:
    """When the tests run in a venv or the installed venv uses another interpreter,
    --system-site-packages does not see this environment's packages: point the
    installed venv at them (after its own)."""
    if sys.prefix == sys.base_prefix and service_python() == sys.executable:
        return
    import site

    lib = next((venv / "lib").glob("python3*/site-packages"))
    (lib / "zz-test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def test_second_run_after_an_edit_writes_no_dist_file(installed, tmp_path):
    """The same checkout again after the operator edited the env file: there is
    no new version to merge (the old installer wrote a .dist and said there was)."""
    src, root, _ = installed
    root2 = tmp_path / "root"
    shutil.copytree(root, root2, symlinks=True)
    env = root2 / "etc/wsrelay/wsrelay.env"
    env.write_text(env.read_text() + "RELAY_ORIGIN=10.0.0.5:9000\n")
    out = run_install(src, root2)
    assert not (root2 / "etc/wsrelay/wsrelay.env.dist").exists()
    assert "kept edited /etc/wsrelay/wsrelay.env\n" in out
    assert ".dist" not in out and "new version" not in out
    assert "RELAY_ORIGIN=10.0.0.5:9000" in env.read_text()


def test_root_is_for_inspection_only(installed):
    """The staged venv's scripts name the staging directory: the installer says so."""
    _, root, first = installed
    venv = root / PREFIX.lstrip("/")
    assert f"--root: {root} is for inspection only" in first
    assert (venv / "bin" / "wsrelay").read_text().splitlines()[0] == f"#!{venv}/bin/python"


@pytest.fixture
def home_python():
    """An interpreter under a home directory, as pyenv, uv or conda install them:
    this one if it is (pyenv's, on the development machines), else a copy in /home."""
    if _hidden(sys.base_prefix):
        yield sys.executable
        return
    if not os.access("/home", os.W_OK):
        pytest.skip("/home is not writable")
    home = tempfile.mkdtemp(prefix="wsrelay-test-", dir="/home")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", f"{home}/py"], check=True,
                       timeout=120)
        yield f"{home}/py/bin/python"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_interpreter_hidden_by_protecthome_is_refused(home_python, tmp_path):
    """The unit's ProtectHome=yes hides /root and /home: a venv made from a pyenv
    Python there cannot start (status 127). Refused, with what to do instead."""
    r = run_install(Path(ROOT), tmp_path / "root", python=home_python, check=False)
    assert r.returncode == 1
    assert "ProtectHome=yes hides from the service" in r.stderr and "--python /usr/bin/python3" in r.stderr
    assert not (tmp_path / "root" / PREFIX.lstrip("/")).exists()


def test_default_interpreter_avoids_a_hidden_python3(home_python, tmp_path, installed):
    """python3 first on PATH is a pyenv one: the default becomes /usr/bin/python3."""
    if not (os.path.exists("/usr/bin/python3") and _python_ok("/usr/bin/python3")):
        pytest.skip("no Debian python3 >= 3.11")
    src, _, _ = installed
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(home_python)
    env = install_env()
    env["PATH"] = f"{bindir}:{env['PATH']}"
    out = run_install(src, tmp_path / "root", python="", env=env)
    assert "hidden from the service by ProtectHome=yes: using /usr/bin/python3" in out
    venv_python = tmp_path / "root" / PREFIX.lstrip("/") / "bin" / "python"
    assert not _hidden(os.path.realpath(venv_python))


def test_install_keeps_edited_config_and_uninstalls(installed, tmp_path):
    src, root, _ = installed
    # A private copy of the installed tree, so the tests above keep theirs.
    root2 = tmp_path / "root"
    shutil.copytree(root, root2, symlinks=True)
    # The venv's scripts name their interpreter by absolute path: this copy
    # reuses the original venv's files but must not need them to be re-created.
    env = root2 / "etc/wsrelay/wsrelay.env"
    env.write_text(env.read_text() + "RELAY_ORIGIN=10.0.0.5:9000\n")
    edited = env.read_bytes()
    sysctl = root2 / "etc/sysctl.d/60-wsrelay.conf"
    # A new version of both files in the source.
    src2 = tmp_path / "src"
    shutil.copytree(src, src2)
    for rel in ("deploy/wsrelay.env", "deploy/sysctl.d/60-wsrelay.conf"):
        with open(src2 / rel, "a") as f:
            f.write("# a newer version\n")
    out = run_install(src2, root2)
    assert env.read_bytes() == edited, "an edited env file was overwritten"
    assert (root2 / "etc/wsrelay/wsrelay.env.dist").read_bytes() == (src2 / "deploy/wsrelay.env").read_bytes()
    assert "kept edited /etc/wsrelay/wsrelay.env" in out
    # Not edited: upgraded in place, no .dist.
    assert sysctl.read_bytes() == (src2 / "deploy/sysctl.d/60-wsrelay.conf").read_bytes()
    assert not (root2 / "etc/sysctl.d/60-wsrelay.conf.dist").exists()
    # And still idempotent in that state.
    before = tree(root2)
    run_install(src2, root2)
    assert tree(root2) == before

    out = run_install(src2, root2, "--uninstall")
    left = sorted(str(p.relative_to(root2)) for p in root2.rglob("*") if not p.is_dir())
    assert left == ["etc/wsrelay/wsrelay.env"], left
    assert "kept edited /etc/wsrelay/wsrelay.env" in out
    run_install(src2, root2, "--uninstall", "--purge")
    left = sorted(str(p.relative_to(root2)) for p in root2.rglob("*") if not p.is_dir())
    assert left == [], left
