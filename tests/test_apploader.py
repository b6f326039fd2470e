"""Issue 2, item 4: every APP form, the default attributes, sys.path and TIAMAT=1, and the
one-line failure (exit 4, no respawn loop) for every way an app can fail to load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import APPS, TiamatServer, run_tiamat

from tiamat import apploader
from tiamat.apploader import AppLoadError, load_app


def call(app) -> bytes:
    """Run a WSGI app in-process and return its body."""
    status = []
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, e=None: status.append(s)))
    assert status and status[0].startswith("200")
    return body


@pytest.fixture
def apps_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(APPS))


# --- the forms, in process ----------------------------------------------------------------
@pytest.mark.parametrize(("spec", "body"), [
    ("core_named_app:app", b"named app"),
    ("core_named_app", b"named app"),                   # default: application, then app
    ("core_both_names", b"application"),                # application wins over app
    ("core_named_app:holder.wsgi", b"named app"),       # dotted attribute
    ("core_factory:create_app()", b"factory mode=default n=1"),
    ("core_factory:create_app('prod')", b"factory mode=prod n=1"),
    ("core_factory:create_app('prod', n=2)", b"factory mode=prod n=2"),
    ("core_script", b"run(config) workers=3 TIAMAT=None"),
    ("core_script:run", b"run(config) workers=3 TIAMAT=None"),
    ("core_script_next", b"via next"),
])
def test_module_forms(apps_on_path, monkeypatch, spec, body):
    monkeypatch.delenv("TIAMAT", raising=False)

    class Cfg:
        workers = 3

    assert call(load_app(spec, Cfg())) == body


@pytest.mark.parametrize("suffix", ["", ":app", ":application"])
def test_file_path_forms(suffix):
    app = load_app(str(APPS.parent.parent / "examples" / "hello.py") + suffix)
    assert call(app) == b"Hello, World!\n"


def test_relative_file_path(monkeypatch):
    monkeypatch.chdir(APPS.parent.parent)
    assert call(load_app("examples/hello.py")) == b"Hello, World!\n"


def test_script_file_with_run(monkeypatch):
    monkeypatch.delenv("TIAMAT", raising=False)

    class Cfg:
        workers = 5

    assert call(load_app(str(APPS / "core_script.py"), Cfg())) == b"run(config) workers=5 TIAMAT=None"


@pytest.mark.parametrize(("spec", "reason"), [
    ("tiamat_no_such_module:app", "No module named 'tiamat_no_such_module'"),
    ("core_named_app:nope", "module 'core_named_app' has no attribute 'nope'"),
    ("core_not_callable", "the application is not callable (got int)"),
    ("core_factory:not_a_factory()", "the application is not callable (got int)"),
    ("core_import_error:app", "RuntimeError: database is not configured"),
    ("core_bad_dependency", "No module named 'tiamat_no_such_dependency'"),
    ("core_factory:create_app(open('x'))", "factory arguments must be literals"),
    ("core_factory:create_app(", "cannot parse attribute"),
    ("no/such/file.py", "no such file: no/such/file.py"),
    ("core_factory", "has no 'application' or 'app' attribute and no run(config) function"),
])
def test_failures_are_one_clear_reason(apps_on_path, spec, reason):
    with pytest.raises(AppLoadError) as info:
        load_app(spec)
    text = str(info.value)
    assert text.startswith(f"cannot load {spec!r}: ") and reason in text, text
    assert "\n" not in text
    assert info.value.exit_code == 4


def test_split_spec():
    assert apploader.split_spec("pkg.mod:app") == ("pkg.mod", "app")
    assert apploader.split_spec("pkg.mod") == ("pkg.mod", None)
    assert apploader.split_spec("a/b.py") == ("a/b.py", None)
    assert apploader.split_spec("a/b.py:app") == ("a/b.py", "app")
    assert apploader.split_spec("m:f('a:b')") == ("m", "f('a:b')")


# --- through the real server ----------------------------------------------------------------
FAILURES = [
    ("tiamat_no_such_module:app", "No module named 'tiamat_no_such_module'"),
    ("core_named_app:nope", "module 'core_named_app' has no attribute 'nope'"),
    ("core_not_callable", "the application is not callable (got int)"),
    ("core_import_error", "RuntimeError: database is not configured"),
]


@pytest.mark.parametrize(("spec", "reason"), FAILURES)
@pytest.mark.parametrize("extra", [[], ["-k", "sync"], ["--preload"]], ids=["auto", "sync", "preload"])
def test_server_exits_4_with_exactly_one_line(spec, reason, extra):
    started = time.monotonic()
    result = run_tiamat("-b", "127.0.0.1:0", "-w", "4", *extra, spec, cwd=APPS, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    assert elapsed < 15
    lines = [line for line in result.stderr.splitlines() if "cannot load" in line]
    assert lines == [f"tiamat: cannot load {spec!r}: {reason}"], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Booting worker") <= 4, "no respawn loop"


def test_traceback_only_at_debug():
    result = run_tiamat("-b", "127.0.0.1:0", "-w", "2", "--log-level", "debug", "core_import_error",
                        cwd=APPS, timeout=30)
    assert result.returncode == 4
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert 'core_import_error.py", line 3' in result.stderr
    assert [line for line in result.stderr.splitlines() if "tiamat: cannot load" in line] == [
        "tiamat: cannot load 'core_import_error': RuntimeError: database is not configured"]


def test_workers_and_preload_see_tiamat_1(tiamat_server):
    server = tiamat_server("core_selfbinding", cwd=APPS)
    assert server.get("/")[2] == b"named app"
    preloaded = tiamat_server("--preload", "core_selfbinding", cwd=APPS)
    assert preloaded.get("/")[2] == b"named app"
    script = tiamat_server("-s", "core_script.py", "-w", "2", cwd=APPS)
    assert script.get("/")[2] == b"run(config) workers=2 TIAMAT=1"


def test_factory_with_arguments_on_the_server(tiamat_server):
    server = tiamat_server("core_factory:create_app('prod', n=2)", cwd=APPS)
    assert server.get("/")[2] == b"factory mode=prod n=2"


def test_worker_app_and_chdir_in_a_config_file(tiamat_server, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "siteapp.py").write_text(
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'from site']\n")
    conf = tmp_path / "c.py"
    conf.write_text(f"working_directory = {str(site)!r}\nworker_app = 'siteapp'\n")
    server = tiamat_server("-c", str(conf), "-b", "127.0.0.1:0", cwd=tmp_path)
    assert server.get("/")[2] == b"from site"


def test_chdir_and_start_directory_are_on_sys_path(tmp_path):
    """With the ``tiamat`` console script (where Python itself adds nothing), both --chdir and
    the directory tiamat was started from are importable."""
    start, site = tmp_path / "start", tmp_path / "site"
    start.mkdir()
    site.mkdir()
    (start / "helper_in_start.py").write_text("GREETING = b'helper from the start directory'\n")
    (site / "siteapp.py").write_text(
        "from helper_in_start import GREETING\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [GREETING]\n")
    script = Path(sys.executable).parent / "tiamat"
    env = {k: v for k, v in os.environ.items() if k not in ("TIAMAT", "PYTHONPATH")}
    result = subprocess.run([str(script), "--check-config", "--chdir", str(site), "siteapp"],
                            cwd=start, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    server = TiamatServer(["-b", "127.0.0.1:0", "--chdir", str(site), "siteapp"], tmp_path,
                          env=env, cwd=start)
    # TiamatServer runs ``python -m tiamat``; -m puts the start directory on sys.path itself,
    # so the console-script check above is the one that proves tiamat does it.
    try:
        server.start()
        assert server.get("/")[2] == b"helper from the start directory"
    finally:
        server.stop()


def test_missing_app_file_via_script_flag():
    result = run_tiamat("-b", "127.0.0.1:0", "-s", "no_such_script.py", cwd=APPS)
    assert result.returncode == 4
    assert result.stderr.strip().splitlines()[-1] == (
        "tiamat: cannot load 'no_such_script.py': no such file: no_such_script.py")
