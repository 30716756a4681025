"""The ``--env-file`` syntax: systemd's ``EnvironmentFile=`` (systemd.exec(5)), sans-I/O.

One file can feed both ``wsrelay run --env-file`` and a unit's
``EnvironmentFile=`` (or ``systemd-run --property=EnvironmentFile=``), so
both must read the same values from it. :func:`parse` follows systemd's own
parser (src/basic/env-file.c, ``parse_env_file_internal``) character by
character:

- a line whose first non-blank character is ``#`` or ``;`` is a comment;
  a ``#`` anywhere else is part of the value (``KEY=/ws  # note`` is the
  value ``/ws  # note``: there are no inline comments);
- ``KEY=value``: blanks around the key and the value are dropped, blanks
  inside the value kept; a backslash keeps the next character, and a
  backslash at the end of a line continues the value on the next line;
- ``'...'`` keeps everything verbatim up to the next ``'`` (newlines too);
  ``"..."`` likewise, with ``\\"``, ``\\\\``, ``\\``` and ``\\$`` unescaped and
  a backslash before anything else kept; text right after a closing quote
  is appended (``KEY="a" b`` is ``ab``);
- a key assigned twice: the last one wins.

Where systemd would silently drop something, or its versions disagree, the
file is refused instead, with a problem naming the line: a line without
``=``, a key that is not a variable name (``export KEY=v``: systemd ignores
that line), a quote never closed, and a comment ending in a backslash
(systemd < 254 continues the comment on the next line, later versions do
not). So any file :func:`parse` accepts, systemd reads to the same values.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_WHITESPACE = " \t\n\r"
_NEWLINE = "\n\r"
_COMMENTS = "#;"
_SHELL_NEED_ESCAPE = '"\\`$'
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Assignment(NamedTuple):
    line: int   # 1-based line where the key starts
    key: str
    value: str


def parse(text: str) -> tuple[list[Assignment], list[str]]:
    """``text`` (the decoded file) -> (assignments in file order, problems).

    Each problem reads ``line N: ...``. Assignments are returned even when
    there are problems, so a caller can report every problem at once."""
    out: list[Assignment] = []
    problems: list[str] = []
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    key_ws = -1      # index in key where trailing blanks start, -1 if none
    value_ws = -1    # same for an unquoted value
    line = 1         # the line we are on
    start = 1        # the line the current key or comment started on
    quote_line = 1

    def push() -> None:
        k = "".join(key[:key_ws] if key_ws >= 0 else key)
        v = "".join(value)
        if _NAME.match(k):
            out.append(Assignment(start, k, v))
        elif k.startswith("export") and _NAME.match(k[6:].strip() or "-"):
            name = k[6:].strip()
            problems.append(f"line {start}: `export` is not part of the syntax (systemd's EnvironmentFile= "
                            f"ignores this line): write {name}=...")
        else:
            problems.append(f"line {start}: {k!r} is not a variable name")

    def chomp() -> None:
        if value_ws >= 0:
            del value[value_ws:]

    for c in text:
        if state == "pre_key":
            if c in _COMMENTS:
                state, start = "comment", line
            elif c not in _WHITESPACE:
                state, start = "key", line
                key, value, key_ws = [c], [], -1
        elif state == "key":
            if c in _NEWLINE:
                problems.append(f"line {start}: expected KEY=value, got {''.join(key).strip()!r}")
                state = "pre_key"
            elif c == "=":
                state, value_ws = "pre_value", -1
            else:
                if c not in _WHITESPACE:
                    key_ws = -1
                elif key_ws < 0:
                    key_ws = len(key)
                key.append(c)
        elif state == "pre_value":
            if c in _NEWLINE:
                push()
                state = "pre_key"
            elif c == "'":
                state, quote_line = "single", line
            elif c == '"':
                state, quote_line = "double", line
            elif c == "\\":
                state = "value_escape"
            elif c not in _WHITESPACE:
                state = "value"
                value.append(c)
        elif state == "value":
            if c in _NEWLINE:
                chomp()
                push()
                state = "pre_key"
            elif c == "\\":
                state, value_ws = "value_escape", -1
            else:
                if c not in _WHITESPACE:
                    value_ws = -1
                elif value_ws < 0:
                    value_ws = len(value)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if c not in _NEWLINE:
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in _SHELL_NEED_ESCAPE:
                value.append(c)
            elif c != "\n":
                value.append("\\")
                value.append(c)
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in _NEWLINE:
                state = "pre_key"
        elif state == "comment_escape":
            if c in _NEWLINE:
                problems.append(f"line {start}: a comment ending in a backslash (systemd before version 254 "
                                f"reads the next line as part of the comment, later versions do not): "
                                f"remove the backslash")
                state = "pre_key"
            else:
                state = "comment"
        if c == "\n":
            line += 1

    if state in ("pre_value", "value", "value_escape"):
        if state == "value":
            chomp()
        push()
    elif state in ("single", "double", "double_escape"):
        problems.append(f"line {quote_line}: a {'single' if state == 'single' else 'double'} quote "
                        f"is never closed")
    elif state == "key":
        problems.append(f"line {start}: expected KEY=value, got {''.join(key).strip()!r}")
    elif state == "comment_escape":
        problems.append(f"line {start}: a comment ending in a backslash: remove the backslash")
    return out, problems
