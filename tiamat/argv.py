"""``tiamat [OPTIONS] APP`` read straight from the settings table, without click.

Importing click (with the typing, inspect, uuid, platform and datetime modules it pulls in)
costs about 87 M instructions, some 15 ms, on every start of a server whose app does not
import click itself (FastAPI, Django, a plain WSGI app).  A server's command line is almost
always plain: options from the table, each spelled in full, and the app.  This module reads
exactly that, with click's rules (``--opt VALUE``, ``--opt=VALUE``, ``-o VALUE``,
``-oVALUE``, repeatable list options, options before or after APP) and gives what the click
command would give: the typed options, as strings, by setting name.  Anything else
(``--help``, ``--version``, an unknown or misspelt option, combined short flags, a missing
value, a value that looks like an option, a second APP, ``--``, shell completion) returns
None and the click command in :mod:`tiamat.cli` reads the line instead, errors included.
tests/test_argv.py checks that both readers agree on every flag of the table.
"""

from __future__ import annotations

import os
from typing import Any

from tiamat.settings import SETTINGS, Setting

#: the control subcommands (:data:`tiamat.control.SUBCOMMANDS`), repeated so that starting a
#: server does not import tiamat.control (tests/test_docs.py checks that both agree)
SUBCOMMANDS = ("status", "reload", "stop", "scale", "reopen-logs")

_VALUE, _ON, _OFF = 0, 1, 2
_flags: dict[str, tuple[str, int, bool]] | None = None


def switches(setting: Setting) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The spellings that switch a ``bool`` setting on and off on the command line, for
    both readers (tiamat.cli builds its click options from them): all of them, except that
    a setting with both kinds is click's ``--on/--off`` pair, one spelling each."""
    if setting.flags and setting.off_flags:
        return setting.flags[-1:], setting.off_flags[:1]
    return setting.flags, setting.off_flags


def _table() -> dict[str, tuple[str, int, bool]]:
    """flag -> (setting name, what it does, repeatable)."""
    global _flags
    if _flags is None:
        _flags = {}
        for s in SETTINGS:
            if s.kind == "bool":
                on, off = switches(s)
                _flags.update((f, (s.name, _ON, False)) for f in on)
                _flags.update((f, (s.name, _OFF, False)) for f in off)
            else:
                _flags.update((f, (s.name, _VALUE, s.kind == "list")) for f in s.flags)
    return _flags


def parse(args: list[str]) -> tuple[dict[str, Any], str | None] | None:
    """``(options typed, APP or None)``, or None for a line this reader leaves to click."""
    if not args or args[0] in SUBCOMMANDS or "_TIAMAT_COMPLETE" in os.environ:
        return None
    flags = _table()
    given: dict[str, Any] = {}
    app: str | None = None
    rest = iter(args)
    for arg in rest:
        if arg[:1] != "-":
            if app is not None:
                return None  # a second APP: click's "unexpected extra argument"
            app = arg
            continue
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            attached = value if eq else None
        elif len(arg) > 2:
            flag, attached = arg[:2], arg[2:]  # -w4: a short option with its value
        else:
            flag, attached = arg, None
        found = flags.get(flag)
        if found is None:
            return None  # --help, --version, "-", "--", unknown: click decides
        name, action, repeatable = found
        if action != _VALUE:
            if attached is not None:
                return None  # a switch given a value, or combined short switches
            given[name] = action == _ON
            continue
        if attached is None:
            attached = next(rest, None)
            if attached is None:
                return None  # a missing value
        if attached[:1] in ("-", "="):
            return None  # click takes it as the value; rare enough to let click say so
        if repeatable:
            given.setdefault(name, []).append(attached)
        else:
            given[name] = attached
    return given, app
