"""Render docs/settings.md from the settings table.

``python -m tiamat.settings_doc > docs/settings.md`` regenerates the reference; a test fails
when the committed file differs from what this prints, so the docs cannot drift from
:data:`tiamat.settings.SETTINGS`.
"""

from __future__ import annotations

import sys
from typing import Any

from tiamat.settings import SECTIONS, SETTINGS, Setting

HEADER = """\
# Settings reference

Generated from `tiamat/settings.py` by `python -m tiamat.settings_doc > docs/settings.md`;
do not edit by hand.

Every setting can be given, from lowest to highest precedence, as its default, in a config
file (`-c FILE`: module-level names, or a `load()` function returning a dict), as an
environment variable `TIAMAT_<NAME>`, or on the command line. A config file may use the
setting's name or any of its other keys (the original tiamat's and gunicorn's spellings).
Lists from the environment are comma-separated; booleans accept 1/0, true/false, yes/no,
on/off. Sizes accept a suffix: `64k`, `16m`, `1g`.
"""

_KIND_NAMES = {
    "int": "integer", "float": "number", "bool": "boolean", "str": "string",
    "list": "list of strings", "choice": "one of the choices", "callable": "callable",
    "dict": "dict", "size": "size in bytes",
}


def _default(setting: Setting) -> str:
    if setting.default_doc:
        return f"`{setting.default_doc}`"
    value: Any = setting.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, dict):
        return "`" + repr(value) + "`" if value else "empty"
    if isinstance(value, str):
        return f"`{value}`" if value else "empty string"
    return f"`{value}`"


def _anchor(section: str) -> str:
    return section.lower().replace(" ", "-")


def _setting(setting: Setting) -> list[str]:
    rows = []
    flags = [*setting.flags, *setting.off_flags]
    if flags:
        rows.append(("Command line", ", ".join(f"`{f}`" for f in flags)))
    if setting.from_env:
        rows.append(("Environment", f"`{setting.env_var}`"))
    if setting.in_file:
        rows.append(("Config file", ", ".join(f"`{k}`" for k in (setting.name, *setting.aliases))))
    kind = _KIND_NAMES[setting.kind]
    if setting.choices:
        kind = ", ".join(f"`{c}`" for c in setting.choices)
    limits = []
    if setting.minimum is not None:
        limits.append(f"at least {_num(setting.minimum)}")
    if setting.maximum is not None:
        limits.append(f"at most {_num(setting.maximum)}")
    if limits:
        kind += " (" + ", ".join(limits) + ")"
    rows.append(("Type", kind))
    rows.append(("Default", _default(setting)))
    lines = [f"### `{setting.name}`", "", setting.help, ""]
    lines += [f"- {label}: {value}" for label, value in rows]
    lines.append("")
    return lines


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def render() -> str:
    """The whole of docs/settings.md."""
    lines = [HEADER, "## Sections", ""]
    lines += [f"- [{section}](#{_anchor(section)})" for section in SECTIONS]
    lines.append("")
    for section in SECTIONS:
        lines += [f"## {section}", ""]
        for setting in SETTINGS:
            if setting.section == section:
                lines += _setting(setting)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
