"""Issue 6, item 4: a plain ``tiamat [OPTIONS] APP`` is read without importing click
(tiamat.argv), and reads exactly as the click command (tiamat.cli) reads it.

The click command stays the reference: for every flag of the settings table, in every
spelling click accepts, both readers must give the same settings and APP; every line the
plain reader does not take must be left to click (None), never read differently.
"""

from __future__ import annotations

import pytest
from conftest import APPS, ROOT, run_tiamat, wait_for

from tiamat import argv, cli
from tiamat.settings import SETTINGS

APP = "core_app:application"


def _click_reads(args: list[str]) -> tuple[dict, str | None]:
    ctx = cli.build_command().make_context("tiamat", list(args))
    params = dict(ctx.params)
    app = params.pop("app_arg")
    return cli._given(ctx, params), app


def _spellings() -> list[list[str]]:
    """Every flag of the table, in the spellings click accepts, with APP before or after."""
    lines: list[list[str]] = []
    for flag, (name, action, _) in argv._table().items():
        setting = next(s for s in SETTINGS if s.name == name)
        if action != argv._VALUE:
            lines += [[flag, APP], [APP, flag]]
            continue
        value = setting.choices[0] if setting.choices else "7"
        if flag.startswith("--"):
            lines += [[flag, value, APP], [f"{flag}={value}", APP], [APP, flag, value],
                      [f"{flag}=", APP]]
        else:
            lines += [[flag, value, APP], [f"{flag}{value}", APP], [APP, flag, value]]
    return lines


def test_the_table_is_read_with_every_spelling():
    lines = _spellings()
    assert len(lines) > 300  # (every flag: the table has well over a hundred)
    for args in lines:
        assert argv.parse(args) == _click_reads(args), args


def test_repeats_and_mixes_read_as_click_reads_them():
    lines = [
        ["-b", "127.0.0.1:1", "--bind", "[::1]:2", "-b:3", "--bind=unix:/tmp/x", APP],
        ["-w", "2", "-w", "3", APP],  # the last wins
        ["--sendfile", APP] if "--sendfile" in argv._table() else ["--no-sendfile", APP],
        ["--gc-freeze", "--no-gc-freeze", APP],
        ["--preload", "-D", "-k", "sync", "--threads", "4", APP, "--log-level", "debug"],
        ["-c", "conf.py", "--forwarded-allow-ips", "10.0.0.1,10.0.0.2", APP],
        ["-w", "2"],  # no APP: both read it; the missing APP is found later
        [""],
    ]
    for args in lines:
        assert argv.parse(args) == _click_reads(args), args


@pytest.mark.parametrize("args", [
    [], ["-h"], ["--help"], ["--version"], [APP, "--help"], ["status"], ["scale", "3"],
    ["--workers"], ["-w"], ["--nope", APP], ["--work", "2", APP], ["-Dw", "2", APP],
    ["--preload=yes", APP], [APP, "other:app"], ["--", APP], ["-", APP],
    ["-b", "-w", APP], ["-w=2", APP], ["--bind", "--", APP],
])
def test_anything_else_is_left_to_click(args):
    assert argv.parse(args) is None


def test_shell_completion_is_left_to_click(monkeypatch):
    monkeypatch.setenv("_TIAMAT_COMPLETE", "bash_source")
    assert argv.parse([APP]) is None


def test_a_plain_start_does_not_import_click_and_the_click_path_serves_alike(tiamat_server, tmp_path):
    conf = str(ROOT / "tests" / "apps" / "argv_hooks.py")
    for tail, imported in (([APP], "False"), (["--", APP], "True")):  # "--": click reads it
        report = tmp_path / f"report-{len(tail)}.txt"
        server = tiamat_server("-c", conf, "-w", "1", *tail, cwd=APPS,
                               env={"ARGV_REPORT": str(report)})
        wait_for(lambda r=report: r.exists() and r.read_text(), message="on_starting report")
        assert report.read_text() == imported
        status, _, body = server.get("/")
        assert status == 200, body


def test_both_readers_print_the_same_config_and_the_same_usage_error():
    line = ["--print-config", "-w", "3", "-b", ":9000", "--bind=:9001", "--no-sendfile",
            "-t30", "--log-level", "debug"]
    plain = run_tiamat(*line, APP, cwd=APPS)
    clicked = run_tiamat(*line, "--", APP, cwd=APPS)
    assert plain.returncode == clicked.returncode == 0, plain.stderr + clicked.stderr
    assert plain.stdout == clicked.stdout and "workers                  = 3" in plain.stdout
    plain, clicked = run_tiamat("-w", "2", cwd=APPS), run_tiamat("-w", "2", "--", cwd=APPS)
    assert plain.returncode == clicked.returncode == 2
    assert plain.stderr == clicked.stderr and "Error: missing APP" in plain.stderr
    plain = run_tiamat("-s", "a:b", "c:d", cwd=APPS)
    clicked = run_tiamat("-s", "a:b", "--", "c:d", cwd=APPS)
    assert plain.returncode == clicked.returncode == 2
    assert plain.stderr == clicked.stderr and "give the app once" in plain.stderr
