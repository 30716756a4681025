#!/usr/bin/env bash
# Install wsrelay as a hardened systemd service (Debian/Ubuntu), from the
# checkout this script lives in. Idempotent: a second run changes nothing.
#
#   sudo deploy/install.sh                 install or upgrade (README: "Deploying")
#   sudo deploy/install.sh --uninstall     remove it (an edited env file stays)
#   sudo deploy/install.sh --uninstall --purge
#
# What goes where (every path below --root, default /):
#   PREFIX (/opt/wsrelay)                  a venv with wsrelay and its dependencies
#   /usr/local/bin/wsrelay                 symlink to PREFIX/bin/wsrelay
#   /etc/systemd/system/wsrelay.service    the unit (ExecStart rewritten to PREFIX)
#   /etc/systemd/system/wsrelay.socket     optional socket activation (not enabled)
#   /etc/wsrelay/wsrelay.env               settings; an edited copy is never replaced:
#                                          the new version goes to wsrelay.env.dist
#   /etc/sysctl.d/60-wsrelay.conf          kernel tuning; same rule as the env file
#   PREFIX/share/wsrelay/                  what was installed (for upgrades and --uninstall)
#
# `systemctl daemon-reload` and `sysctl --system` run only when installing to
# the real root on a host where systemd is running. Nothing is enabled or
# started: set RELAY_ORIGIN first (see the README, "Deploying").
set -euo pipefail
umask 022   # the service's dynamic user must be able to read the venv and the env file

usage() {
    cat <<'EOF'
usage: install.sh [options]
  --root DIR               install below DIR instead of /, for inspection and tests only: the
                           venv's scripts name DIR in their first line, so the tree cannot be
                           copied to a host (run install.sh there); no systemctl/sysctl
  --prefix DIR             venv location as the service sees it (default /opt/wsrelay)
  --python PY              interpreter for the venv, Python >= 3.11, outside /home, /root and
                           /run/user (the unit's ProtectHome=yes hides those: pyenv, uv and
                           conda interpreters usually live there). Default: python3 on PATH,
                           or /usr/bin/python3 when that one is hidden
  --system-site-packages   let the venv see PY's packages (with --no-deps: nothing downloaded)
  --no-deps                do not install dependencies (they must come from PY's site-packages)
  --pip-arg ARG            pass ARG to pip install (repeatable), e.g. --pip-arg=--no-index
  --uninstall              remove what was installed; keeps an edited env/sysctl file
  --purge                  with --uninstall: remove edited files too
  -h, --help               this text
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

ROOT=/
PREFIX=/opt/wsrelay
PYTHON=
DEFAULT_PYTHON=python3
SYSTEM_SITE=0
NO_DEPS=0
UNINSTALL=0
PURGE=0
PIP_ARGS=()

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#*=} ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#*=} ;;
        --system-site-packages) SYSTEM_SITE=1 ;;
        --no-deps) NO_DEPS=1 ;;
        --pip-arg) [ $# -ge 2 ] || die "--pip-arg needs an argument"; PIP_ARGS+=("$2"); shift ;;
        --pip-arg=*) PIP_ARGS+=("${1#*=}") ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path, got $PREFIX" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die "--prefix must not be /"
# What the unit's ProtectHome=yes makes invisible to the service.
hidden() { case "$1/" in /home/*|/root/*|/run/user/*) return 0 ;; *) return 1 ;; esac; }

case "$PREFIX/" in
    /home/*|/root/*|/run/user/*)
        die "--prefix $PREFIX is hidden from the service by ProtectHome=yes; use e.g. /opt/wsrelay" ;;
    /usr/*|/etc/*|/var/*|/bin/*|/sbin/*|/lib/*|/boot/*|/proc/*|/sys/*|/dev/*)
        die "--prefix $PREFIX: use a directory of its own, e.g. /opt/wsrelay" ;;
esac
[ $PURGE -eq 0 ] || [ $UNINSTALL -eq 1 ] || die "--purge goes with --uninstall"

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY="$SRC/deploy"
R=${ROOT%/}                     # "" for the real root
if [ -n "$R" ]; then
    mkdir -p "$R"
    R=$(cd "$R" && pwd)
fi
if [ -z "$R" ] && [ "$(id -u)" -ne 0 ]; then
    die "installing to / needs root (or use --root DIR)"
fi

VENV="$R$PREFIX"
STATE="$VENV/share/wsrelay"
MANIFEST="$STATE/manifest"      # "<sha256> <path below root>" per installed file
STAMP="$STATE/source.sha256"    # what the venv's wsrelay was built from
UNIT_DIR="$R/etc/systemd/system"
CONF_DIR="$R/etc/wsrelay"
SYSCTL_DIR="$R/etc/sysctl.d"
BIN_LINK="$R/usr/local/bin/wsrelay"

live_systemd() { [ -z "$R" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

sha() { sha256sum "$1" | cut -d' ' -f1; }

# The hash the previous install recorded for a path (below root), or nothing.
recorded() {
    [ -f "$MANIFEST" ] || return 0
    awk -v p="$1" '$2 == p { print $1 }' "$MANIFEST"
}

NEW_MANIFEST=()
record() { NEW_MANIFEST+=("$1 $2"); }   # hash path-below-root

UNITS_CHANGED=0
SYSCTL_CHANGED=0

# The put_* functions set CHANGED=1 when they wrote something (they do not
# use their status for it: `set -e` is off inside a function tested with ||).
CHANGED=0

# A file we own outright (the units): replaced whenever its content differs.
put_owned() {   # src dest mode
    local src=$1 dest=$2 mode=$3
    CHANGED=0
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        [ "$(stat -c %a "$dest")" = "$mode" ] || chmod "$mode" "$dest"
        say "unchanged ${dest#"$R"}"
    else
        install -D -m "$mode" "$src" "$dest"
        say "installed ${dest#"$R"}"
        CHANGED=1
    fi
}

# A configuration file the operator may edit (dpkg conffile rules): installed
# when missing, upgraded when still exactly what we installed last time, else
# kept, with the new version beside it as .dist.
put_conffile() {   # src dest mode
    local src=$1 dest=$2 mode=$3 rel=${2#"$R"} new old
    CHANGED=0
    new=$(sha "$src")
    if [ ! -e "$dest" ]; then
        install -D -m "$mode" "$src" "$dest"
        say "installed $rel"
        record "$new" "$rel"
        CHANGED=1
        return 0
    fi
    old=$(recorded "$rel")
    if cmp -s "$src" "$dest"; then
        say "unchanged $rel"
        record "$new" "$rel"
        if [ -e "$dest.dist" ]; then rm -f "$dest.dist"; fi
        return 0
    fi
    if [ -n "$old" ] && [ "$(sha "$dest")" = "$old" ]; then
        install -m "$mode" "$src" "$dest"
        say "upgraded $rel (it had not been edited)"
        record "$new" "$rel"
        if [ -e "$dest.dist" ]; then rm -f "$dest.dist"; fi
        CHANGED=1
        return 0
    fi
    # Edited by the operator (or not ours): keep it; what we recorded stays,
    # so it keeps counting as edited.
    record "${old:-edited}" "$rel"
    if [ "$old" = "$new" ]; then
        # Our version is the one installed last time: nothing new to merge.
        say "kept edited $rel"
        return 0
    fi
    if [ -f "$dest.dist" ] && cmp -s "$src" "$dest.dist"; then
        say "kept edited $rel (new version unchanged in $rel.dist)"
    else
        install -m "$mode" "$src" "$dest.dist"
        say "kept edited $rel; new version installed as $rel.dist: compare and merge"
    fi
    return 0
}

# Source hash (pyproject.toml and the package directories it lists, plus the
# pip options), and with a second argument: a copy of those files to build from.
source_tree() {   # python [destdir]
    "$1" - "$SRC" "${2:-}" "$NO_DEPS ${PIP_ARGS[*]:-}" <<'PY'
import hashlib, os, shutil, sys, tomllib
src, dest, options = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(src, "pyproject.toml"), "rb") as f:
    meta = tomllib.load(f)
files = [name for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
         if os.path.exists(os.path.join(src, name))]
readme = meta.get("project", {}).get("readme")
if isinstance(readme, str) and os.path.exists(os.path.join(src, readme)):
    files.append(readme)
for package in meta.get("tool", {}).get("setuptools", {}).get("packages", []):
    top = os.path.join(src, *package.split("."))
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in filenames:
            if not name.endswith((".pyc", ".pyo")):
                files.append(os.path.relpath(os.path.join(dirpath, name), src))
h = hashlib.sha256(options.encode() + b"\0")
for rel in sorted(set(files)):
    with open(os.path.join(src, rel), "rb") as f:
        data = f.read()
    h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    if dest:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(src, rel), os.path.join(dest, rel))
print(h.hexdigest())
PY
}

# ---------------------------------------------------------------------------------
# Configuration files by name, for --purge after a plain --uninstall (which
# removed the manifest but kept them).
CONFFILES=(/etc/wsrelay/wsrelay.env /etc/sysctl.d/60-wsrelay.conf)

purge_conffiles() {
    local rel
    for rel in "${CONFFILES[@]}"; do
        if [ -e "$R$rel" ] || [ -e "$R$rel.dist" ]; then
            rm -f "$R$rel" "$R$rel.dist"
            say "removed $rel"
        fi
    done
    rmdir "$CONF_DIR/tls" "$CONF_DIR" 2>/dev/null || true
}

uninstall() {
    if [ ! -f "$MANIFEST" ]; then
        if [ $PURGE -eq 1 ]; then
            purge_conffiles
        else
            say "nothing to uninstall: no $MANIFEST"
        fi
        return 0
    fi
    if live_systemd; then
        systemctl disable --now wsrelay.socket wsrelay.service 2>/dev/null || true
    fi
    local hash rel path
    while read -r hash rel; do
        path="$R$rel"
        rm -f "$path.dist"
        [ -e "$path" ] || [ -L "$path" ] || continue
        if [ $PURGE -eq 0 ] && [ -f "$path" ] && [ ! -L "$path" ] \
            && case " ${CONFFILES[*]} " in *" $rel "*) true ;; *) false ;; esac \
            && [ "$(sha "$path")" != "$hash" ]; then
            say "kept edited $rel (--purge removes it)"
            continue
        fi
        rm -f "$path"
        say "removed $rel"
    done < "$MANIFEST"
    rm -rf "$VENV"
    say "removed $PREFIX"
    if [ $PURGE -eq 1 ]; then purge_conffiles; fi
    rmdir "$CONF_DIR/tls" "$CONF_DIR" 2>/dev/null || true
    if live_systemd; then
        systemctl daemon-reload
        say "sysctl values stay in effect until reboot"
    fi
}

if [ $UNINSTALL -eq 1 ]; then
    uninstall
    exit 0
fi

# -- the interpreter ----------------------------------------------------------------
# The venv links to its interpreter and loads the standard library from the
# interpreter's installation (even with --copies), so both must be visible to
# the service: a pyenv, uv or conda Python under /root or /home is not
# (ProtectHome=yes), and the service would fail at start (status 127/203).
# Prints the first hidden path the interpreter needs, or nothing.
hidden_part() {   # python
    local path
    while read -r path; do
        if hidden "$path"; then echo "$path"; return 0; fi
    done < <("$1" -c 'import os, sys; print(os.path.realpath(sys.executable)); print(os.path.realpath(sys.base_prefix))' 2>/dev/null)
    return 0
}

PY="$VENV/bin/python"
if [ -x "$PY" ]; then
    where=$(hidden_part "$PY")
    [ -z "$where" ] || die "the venv $PREFIX uses $where, which ProtectHome=yes hides from the service;" \
        "remove it (install.sh --uninstall) and install again with --python /usr/bin/python3"
fi
if [ -z "$PYTHON" ] && [ ! -x "$PY" ]; then
    PYTHON=$DEFAULT_PYTHON
    if command -v "$PYTHON" >/dev/null 2>&1 && [ -n "$(hidden_part "$PYTHON")" ] \
        && [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "$PYTHON on PATH lives in $(hidden_part "$PYTHON"), hidden from the service by ProtectHome=yes:" \
            "using /usr/bin/python3 ($(/usr/bin/python3 -V 2>&1))"
        PYTHON=/usr/bin/python3
    fi
fi

# -- the venv --------------------------------------------------------------------
if [ ! -x "$PY" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter $PYTHON (use --python)"
    where=$(hidden_part "$PYTHON")
    [ -z "$where" ] || die "$PYTHON lives in $where, which the unit's ProtectHome=yes hides from the service" \
        "(it could not start: status 127). Use an interpreter outside /home, /root and /run/user," \
        "e.g. --python /usr/bin/python3 (Debian 12: Python 3.11; apt-get install python3-venv)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); wsrelay needs Python >= 3.11 (use --python)"
    venv_args=(--without-pip)
    [ $SYSTEM_SITE -eq 0 ] || venv_args+=(--system-site-packages)
    "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
    say "created venv $PREFIX ($("$PY" -V 2>&1))"
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    if ! "$PY" -m ensurepip --default-pip >/dev/null 2>&1; then
        if [ -z "$R" ] && command -v apt-get >/dev/null 2>&1 \
            && case "$(readlink -f "$(command -v "${PYTHON:-$DEFAULT_PYTHON}")")" in /usr/bin/python3*) true ;; *) false ;; esac; then
            say "installing python3-venv (ensurepip) with apt-get"
            apt-get install -y --no-install-recommends python3-venv >/dev/null
            "$PY" -m ensurepip --default-pip >/dev/null
        else
            die "the venv has no pip and ensurepip failed (Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
fi

# -- the package -----------------------------------------------------------------
want=$(source_tree "$PY")
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/wsrelay" --version >/dev/null 2>&1; then
    say "unchanged $PREFIX ($("$VENV/bin/wsrelay" --version))"
    PACKAGE_CHANGED=0
else
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    source_tree "$PY" "$build/src" >/dev/null
    pip_args=(install --disable-pip-version-check --no-warn-script-location --quiet)
    [ $NO_DEPS -eq 0 ] || pip_args+=(--no-deps)
    pip_args+=("${PIP_ARGS[@]}")
    # [tls]: cryptography, which reads RELAY_TLS_CERT (README, "TLS")
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip "${pip_args[@]}" "$build/src[tls]"
    mkdir -p "$STATE"
    echo "$want" > "$STAMP"
    say "installed $("$VENV/bin/wsrelay" --version) into $PREFIX"
    PACKAGE_CHANGED=1
fi

# -- files ---------------------------------------------------------------------------
unit=$(mktemp)
trap 'rm -f "$unit"; rm -rf "${build:-}"' EXIT
for name in wsrelay.service wsrelay.socket; do
    sed "s#/opt/wsrelay/#$PREFIX/#g" "$DEPLOY/$name" > "$unit"
    put_owned "$unit" "$UNIT_DIR/$name" 644
    [ $CHANGED -eq 0 ] || UNITS_CHANGED=1
    record "$(sha "$UNIT_DIR/$name")" "/etc/systemd/system/$name"
done
put_conffile "$DEPLOY/wsrelay.env" "$CONF_DIR/wsrelay.env" 644
# TLS certificates and keys, handed to the service by LoadCredential= (root only)
if [ ! -d "$CONF_DIR/tls" ]; then
    install -d -m 700 "$CONF_DIR/tls"
    say "installed /etc/wsrelay/tls (empty; README \"TLS\")"
fi
put_conffile "$DEPLOY/sysctl.d/60-wsrelay.conf" "$SYSCTL_DIR/60-wsrelay.conf" 644
SYSCTL_CHANGED=$CHANGED

if [ -L "$BIN_LINK" ] && [ "$(readlink "$BIN_LINK")" = "$PREFIX/bin/wsrelay" ]; then
    say "unchanged /usr/local/bin/wsrelay"
elif [ -e "$BIN_LINK" ] || [ -L "$BIN_LINK" ]; then
    say "left /usr/local/bin/wsrelay alone: it is not our symlink"
    BIN_LINK=
else
    mkdir -p "$(dirname "$BIN_LINK")"
    ln -s "$PREFIX/bin/wsrelay" "$BIN_LINK"
    say "installed /usr/local/bin/wsrelay -> $PREFIX/bin/wsrelay"
fi
[ -z "$BIN_LINK" ] || record "-" "/usr/local/bin/wsrelay"

mkdir -p "$STATE"
new_manifest=$(mktemp)
printf '%s\n' "${NEW_MANIFEST[@]}" > "$new_manifest"
if [ -f "$MANIFEST" ] && cmp -s "$new_manifest" "$MANIFEST"; then
    rm -f "$new_manifest"
else
    chmod 644 "$new_manifest"
    mv "$new_manifest" "$MANIFEST"
fi

# -- tell the running system -------------------------------------------------------
if live_systemd; then
    if [ $UNITS_CHANGED -eq 1 ]; then
        systemctl daemon-reload
        say "systemctl daemon-reload"
    fi
    if [ $SYSCTL_CHANGED -eq 1 ]; then
        sysctl --system >/dev/null
        say "sysctl --system"
    fi
    if systemctl is-active --quiet wsrelay.service; then
        if [ $UNITS_CHANGED -eq 1 ]; then
            say "wsrelay is running the previous version and unit: systemctl restart wsrelay"
        elif [ $PACKAGE_CHANGED -eq 1 ]; then
            # Workers exec the installed code: a reload rolls the new version out,
            # unless the log then says the shared-memory layout changed.
            say "wsrelay is running the previous version: systemctl reload wsrelay (restart if its log says so)"
        fi
    else
        say "next: set RELAY_ORIGIN in /etc/wsrelay/wsrelay.env, then"
        say "      wsrelay check --env-file /etc/wsrelay/wsrelay.env && systemctl enable --now wsrelay"
    fi
elif [ -z "$R" ]; then
    say "systemd is not running here: daemon-reload and sysctl --system skipped"
else
    say "--root: $R is for inspection only: the venv's scripts start with #!$VENV/bin/python," \
        "so the tree cannot be copied to a host; run install.sh on the host itself"
fi
