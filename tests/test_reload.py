"""--reload: a changed .py file (or an extra file) replaces the workers; off by default."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import wait_for

from tiamat.reloader import Rules, watch_roots

APP_SOURCE = '''
from pathlib import Path

VERSION = {version!r}
EXTRA = Path(__file__).with_name("greeting.txt").read_text().strip()


def app(environ, start_response):
    body = f"{{VERSION}} {{EXTRA}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def _write_app(directory: Path, version: str) -> None:
    path = directory / "devapp.py"
    path.write_text(APP_SOURCE.format(version=version))
    # make sure the mtime moves even on coarse-timestamp file systems
    stamp = time.time() + 1
    os.utime(path, (stamp, stamp))


def _body(server) -> str:
    try:
        status, _, body = server.get("/")
    except OSError:
        return ""
    return body.decode() if status == 200 else ""


def test_reload_on_py_change_and_extra_file(tiamat_server, tmp_path):
    (tmp_path / "greeting.txt").write_text("hello")
    _write_app(tmp_path, "v1")
    server = tiamat_server("devapp:app", "--reload", "--reload-extra-file", "greeting.txt",
                           "-w", "2", cwd=tmp_path)
    server.wait_log("Reloader watching")
    assert _body(server) == "v1 hello"
    server.wait_log(r"Ready: 2 worker")
    old = set(server.worker_pids())

    _write_app(tmp_path, "v2")
    wait_for(lambda: _body(server) == "v2 hello", timeout=20, interval=0.2,
             message="the new code to be served")
    server.wait_log(r"Reloading: devapp\.py changed")
    # (the replacement is per slot: the second old worker may serve until its successor is
    # ready, a moment after the first new one answered)
    wait_for(lambda: not set(server.worker_pids()) & old and len(server.worker_pids()) == 2,
             timeout=20, message="both workers replaced")
    # every worker serves the new code, not just one
    assert all(_body(server) == "v2 hello" for _ in range(6))

    (tmp_path / "greeting.txt").write_text("bonjour")
    wait_for(lambda: _body(server) == "v2 bonjour", timeout=20, interval=0.2,
             message="the extra file's change to be picked up")


def test_reload_is_off_by_default(tiamat_server, tmp_path):
    (tmp_path / "greeting.txt").write_text("hello")
    _write_app(tmp_path, "v1")
    server = tiamat_server("devapp:app", cwd=tmp_path)
    assert "Reloader" not in server.log()
    pids = server.worker_pids()
    _write_app(tmp_path, "v2")
    # nothing watches: the same workers keep serving the code they loaded
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert _body(server) == "v1 hello"
        time.sleep(0.1)
    assert server.worker_pids() == pids


def test_rules_for_include_exclude_and_extra_files(tmp_path):
    rules = Rules(extra_files=[str(tmp_path / "settings.toml")], include=["*.html"],
                  exclude=["*_test.py", "*/migrations/*"])
    assert rules.relevant(str(tmp_path / "app.py"))
    assert rules.relevant(str(tmp_path / "templates" / "index.html"))
    assert rules.relevant(str(tmp_path / "settings.toml"))
    assert not rules.relevant(str(tmp_path / "notes.txt"))
    assert not rules.relevant(str(tmp_path / "app_test.py"))
    assert not rules.relevant(str(tmp_path / "migrations" / "0001.py"))


def test_watch_roots_are_not_nested(tmp_path):
    class Cfg:
        app = str(tmp_path / "sub" / "app.py")
        reload_extra_files = [str(tmp_path / "sub" / "deeper" / "x.txt"), "/etc/hosts"]

    # the app's directory and the first extra file are inside the working directory;
    # the outside extra file is watched on its own, not all of /etc
    assert watch_roots(Cfg, cwd=str(tmp_path)) == [str(tmp_path), "/etc/hosts"]


def test_reload_with_preload_reexecutes_the_master(tiamat_server, tmp_path):
    (tmp_path / "greeting.txt").write_text("hello")
    _write_app(tmp_path, "v1")
    server = tiamat_server("devapp:app", "--reload", "--preload", cwd=tmp_path)
    server.wait_log("Reloader watching")
    assert _body(server) == "v1 hello"
    _write_app(tmp_path, "v2")
    wait_for(lambda: _body(server) == "v2 hello", timeout=20, interval=0.2,
             message="the new code, loaded by a new master")
    server.wait_log("re-executing to load the new code")


def test_include_and_exclude_patterns(tiamat_server, tmp_path):
    (tmp_path / "greeting.txt").write_text("hello")
    _write_app(tmp_path, "v1")
    (tmp_path / "page.html").write_text("<p>1</p>")
    (tmp_path / "devapp_test.py").write_text("X = 1\n")
    server = tiamat_server("devapp:app", "--reload", "--reload-include", "*.html",
                           "--reload-exclude", "*_test.py", cwd=tmp_path)
    server.wait_log("Reloader watching")
    (tmp_path / "devapp_test.py").write_text("X = 2\n")  # excluded: no reload
    time.sleep(1.0)  # absence cannot be polled for: give the watcher time to (not) react
    (tmp_path / "page.html").write_text("<p>2</p>")  # included although not .py
    server.wait_log(r"Reloading: page\.html changed")
    assert "devapp_test.py" not in server.log()
    assert server.log().count("Reloading:") == 1
