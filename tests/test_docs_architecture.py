"""docs/architecture.md stays true to the modules under tiamat/.

Every module must be named there, either by its file (``master.py``, ``asgi/http.py``) or by
its own row in the "who imports whom" block (``workers.sync ─► ...``); and every module the
page names that way must exist, so a rename or a removal shows up here too.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tiamat"
DOC = ROOT / "docs" / "architecture.md"
ARROW = "─►"


def modules() -> dict[str, str]:
    """Every module under tiamat/: its path relative to tiamat/ -> its dotted name there."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        parts = rel[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[rel] = ".".join(parts) or "__init__"
    return found


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def file_mentions(text: str) -> set[str]:
    """Module files named in backticks (``cli.py``, ``workers/base.py``, ``tiamat/x.py``)."""
    names = set()
    for code in re.findall(r"`([^`\n]+)`", text):
        for name in re.findall(r"(?<![\w/])((?:[\w]+/)*[\w]+\.py)\b", code):
            names.add(name.removeprefix("tiamat/"))
    return names


def import_rows(text: str) -> set[str]:
    """The module names on the left of an arrow in the import block (``a, b ─► ...`` too)."""
    rows = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if ARROW not in line or line.startswith(" "):
            continue
        left = line.split(ARROW, 1)[0]
        # a row's module list may wrap onto the line before the arrow
        if i and lines[i - 1].rstrip().endswith(",") and ARROW not in lines[i - 1]:
            left = lines[i - 1] + " " + left
        rows.update(name.strip() for name in left.split(",") if name.strip())
    return rows


def test_every_module_is_on_the_architecture_page():
    text = doc_text()
    files, rows = file_mentions(text), import_rows(text)
    missing = [rel for rel, dotted in modules().items() if rel not in files and dotted not in rows]
    assert not missing, f"docs/architecture.md does not mention: {', '.join(missing)}"


def test_the_page_names_no_module_that_does_not_exist():
    text = doc_text()
    known = modules()
    dotted = set(known.values())
    stale_files = sorted(name for name in file_mentions(text) if name not in known
                         and not (ROOT / name).exists())
    stale_rows = sorted(name for name in import_rows(text) if name not in dotted)
    assert not stale_files and not stale_rows, (
        f"docs/architecture.md names modules that are gone: {stale_files + stale_rows}")


def test_the_checks_see_a_missing_module(tmp_path):
    """The helpers really read the page: a module row and a file name are both found."""
    text = "x\n```\nfoo.bar ─► baz\n```\nsee `workers/qux.py` and `master.py`.\n"
    assert import_rows(text) == {"foo.bar"}
    assert file_mentions(text) == {"workers/qux.py", "master.py"}
    assert "workers/base.py" not in file_mentions(text)
