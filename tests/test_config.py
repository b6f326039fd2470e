"""Issue 2, item 3: configuration from one table, files in both forms, precedence, errors.

Most checks go through ``tiamat --print-config`` (a real subprocess, the way a user
inspects the final values); the hooks and keys that change what the server does are
checked on a running server.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import APPS, run_tiamat, wait_for

from tiamat.config import ConfigError, load_config
from tiamat.settings import BY_KEY, SETTINGS

APP = "core_app:application"


def print_config(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    result = run_tiamat("--print-config", *args, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.splitlines():
        name, _, text = line.partition(" = ")
        values[name.strip()] = text.strip()
    return values


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Listening" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


# --- the file forms -----------------------------------------------------------------------
def test_module_level_names_with_gunicorn_keys(tmp_path):
    conf = write(tmp_path / "gunicorn.conf.py", """
        import multiprocessing
        from os.path import join

        bind = ["127.0.0.1:9001", "unix:/tmp/x.sock"]
        workers = 3
        worker_class = "sync"
        timeout = 45
        daemon = False
        chdir = "."
        errorlog = "-"
        wsgi_app = "core_app:application"
        preload_app = True
        _private = "ignored"

        def pre_fork(server, worker):
            pass

        def post_fork(server, worker):
            pass

        def pre_exec(server):
            pass
    """)
    values = print_config("-c", str(conf))
    assert values["bind"] == "['127.0.0.1:9001', 'unix:/tmp/x.sock']"
    assert values["workers"] == "3"
    assert values["timeout"] == "45.0"
    assert values["app"] == "'core_app:application'"
    assert values["preload_app"] == "True"
    for hook in ("pre_fork", "post_fork", "pre_exec"):
        assert values[hook] == f"'__tiamat_config__.{hook}'"


def test_load_function_with_the_original_tiamat_keys(tmp_path):
    conf = write(tmp_path / "tiamat.conf.py", f"""
        def load():
            return {{
                "tcp": "tcp6",
                "backlog": 128,
                "listen_addr": "",
                "listen_port": 1337,
                "workers": 2,
                "timeout": 45,
                "worker_app": "worker.py",
                "daemonize": True,
                "working_directory": {str(tmp_path)!r},
                "stderr_path": {str(tmp_path / "stderr.log")!r},
                "stdout_path": {str(tmp_path / "stdout.log")!r},
                "pidfile": {str(tmp_path / "tiamat.pid")!r},
                "before_exec": lambda: None,
                "before_fork": lambda: None,
                "after_fork": lambda: None,
            }}
    """)
    values = print_config("-c", str(conf))
    assert values["bind"] == "['[::]:1337']"
    assert values["tcp"] == "'tcp6'" and values["backlog"] == "128"
    assert values["port"] == "1337" and values["host"] == "''"
    assert values["workers"] == "2" and values["timeout"] == "45.0"
    assert values["app"] == "'worker.py'"
    assert values["daemon"] == "True"
    assert values["chdir"] == repr(str(tmp_path))
    assert values["errorlog"] == repr(str(tmp_path / "stderr.log"))
    assert values["stdout_path"] == repr(str(tmp_path / "stdout.log"))
    assert values["pidfile"] == repr(str(tmp_path / "tiamat.pid"))
    for hook in ("pre_exec", "pre_fork", "post_fork"):
        assert "lambda" in values[hook], values[hook]


def test_every_original_tiamat_key_is_known():
    for key in ("tcp", "backlog", "listen_addr", "listen_port", "workers", "timeout", "worker_app",
                "daemonize", "working_directory", "stderr_path", "stdout_path", "pidfile",
                "before_exec", "before_fork", "after_fork"):
        assert key in BY_KEY, key
    for key in ("bind", "daemon", "chdir", "errorlog", "pre_fork", "post_fork", "pre_exec",
                "wsgi_app", "accesslog", "loglevel", "graceful_timeout", "keepalive", "preload_app"):
        assert key in BY_KEY, key


def test_config_file_from_the_environment(tmp_path):
    conf = write(tmp_path / "c.py", "workers = 5\n")
    assert print_config(env={"TIAMAT_CONFIG": str(conf)})["workers"] == "5"


# --- precedence: CLI > environment > config file > defaults ---------------------------------
@pytest.mark.parametrize(("file", "env", "cli", "expected"), [
    (None, None, None, "1"),   # default
    ("2", None, None, "2"),    # file > default
    (None, "3", None, "3"),    # env > default
    (None, None, "4", "4"),    # CLI > default
    ("2", "3", None, "3"),     # env > file
    ("2", None, "4", "4"),     # CLI > file
    (None, "3", "4", "4"),     # CLI > env
    ("2", "3", "4", "4"),      # all three
])
def test_precedence(tmp_path, file, env, cli, expected):
    args: list[str] = []
    environ = {"WEB_CONCURRENCY": ""}
    if file:
        args += ["-c", str(write(tmp_path / "c.py", f"workers = {file}\n"))]
    if env:
        environ["TIAMAT_WORKERS"] = env
    if cli:
        args += ["-w", cli]
    assert print_config(*args, env=environ)["workers"] == expected


def test_precedence_for_lists_and_bools(tmp_path):
    conf = write(tmp_path / "c.py", 'bind = ["127.0.0.1:1111"]\npreload_app = True\n')
    assert print_config("-c", str(conf))["bind"] == "['127.0.0.1:1111']"
    values = print_config("-c", str(conf), env={"TIAMAT_BIND": "127.0.0.1:2222,127.0.0.1:3333",
                                                "TIAMAT_PRELOAD_APP": "false"})
    assert values["bind"] == "['127.0.0.1:2222', '127.0.0.1:3333']"
    assert values["preload_app"] == "False"
    values = print_config("-c", str(conf), "-b", "127.0.0.1:4444", "--preload",
                          env={"TIAMAT_BIND": "127.0.0.1:2222", "TIAMAT_PRELOAD_APP": "false"})
    assert values["bind"] == "['127.0.0.1:4444']" and values["preload_app"] == "True"


def test_precedence_on_a_running_server(tiamat_server, tmp_path):
    """The layering is not only printed: the server really uses the winning value."""
    conf = write(tmp_path / "c.py", f"workers = 3\nbind = '127.0.0.1:{free_port()}'\n")
    port = free_port()
    server = tiamat_server("-c", str(conf), APP, cwd=APPS,
                           env={"TIAMAT_WORKERS": "2", "TIAMAT_BIND": f"127.0.0.1:{port}"})
    assert server.port == port
    assert len(wait_for(lambda: len(server.worker_pids()) == 2 and server.worker_pids(),
                        message="2 workers")) == 2


def test_every_setting_can_come_from_the_environment():
    """TIAMAT_<NAME> for every setting the environment may set, checked through load_config."""
    samples = {"int": "7", "size": "2048", "float": "2.5", "bool": "true", "str": "x",
               "list": "a,b"}
    for setting in SETTINGS:
        if not setting.from_env or setting.kind in ("callable", "dict"):
            continue
        if setting.name in ("config", "chdir", "certfile", "keyfile", "ca_certs", "bind",
                            "raw_env"):
            continue  # need real files/addresses; covered by their own tests
        raw = setting.choices[-1] if setting.kind == "choice" else samples[setting.kind]
        if setting.kind == "bool":
            raw = "false" if setting.default else "true"
        if setting.kind in ("int", "size") and setting.maximum is not None:
            raw = str(int(setting.maximum))
        if setting.kind in ("int", "size") and setting.minimum is not None:
            raw = str(max(int(raw), int(setting.minimum)))
        # strings some settings check further (request counts, host:port ...)
        candidates = [raw, "100", "127.0.0.1:9999", "/tmp"] if setting.kind == "str" else [raw]
        for candidate in candidates:
            try:
                cfg = load_config({}, environ={setting.env_var: candidate})
                break
            except ConfigError:
                continue
        else:
            raise AssertionError(f"{setting.env_var}: no sample value accepted")
        assert cfg.sources[setting.name] == "environment", setting.name
        assert cfg.values[setting.name] != setting.default_for({}), setting.name
    cfg = load_config({}, environ={"TIAMAT_BIND": "127.0.0.1:1,unix:/tmp/s",
                                   "TIAMAT_RAW_ENV": "A=1"})
    assert cfg.bind == ["127.0.0.1:1", "unix:/tmp/s"] and cfg.raw_env == ["A=1"]


# --- errors: one line, key and file named, exit 2, nothing bound ---------------------------
def _conf_with(tmp_path: Path, line: str) -> Path:
    sock = tmp_path / "must-not-exist.sock"
    return write(tmp_path / "bad.conf.py", f"bind = 'unix:{sock}'\n{line}\n")


@pytest.mark.parametrize(("line", "needles"), [
    ("wokers = 4", ("wokers", "unknown setting")),
    ("workers = 'four'", ("workers", "whole number")),
    ("workers = 0", ("workers", "at least 1")),
    ("listen_port = 70000", ("listen_port", "at most 65535")),
    ("timeout = [1]", ("timeout", "number")),
    ("preload_app = 'perhaps'", ("preload_app", "true or false")),
    ("tcp = 'tcp5'", ("tcp", "tcp4, tcp6")),
    ("post_fork = 'no_such_module:hook'", ("post_fork", "cannot import")),
    ("workers = 2\nworkers_x = 1", ("workers_x", "unknown setting")),
])
def test_bad_config_file_value_is_one_line_exit_2(tmp_path, line, needles):
    conf = _conf_with(tmp_path, line)
    started = time.monotonic()
    result = run_tiamat("-c", str(conf), APP, cwd=APPS)
    assert time.monotonic() - started < 20
    assert_one_line_error(result, str(conf), *needles)
    assert not (tmp_path / "must-not-exist.sock").exists(), "bound before validating"


def test_bad_bind_in_file_names_key_and_file(tmp_path):
    conf = write(tmp_path / "c.py", "bind = '127.0.0.1:70000'\n")
    assert_one_line_error(run_tiamat("-c", str(conf), APP, cwd=APPS), str(conf), "bind", "65535")


def test_config_file_errors(tmp_path):
    result = run_tiamat("-c", str(tmp_path / "missing.py"), APP, cwd=APPS)
    assert_one_line_error(result, "missing.py", "not found")
    broken = write(tmp_path / "broken.py", "workers = (\n")
    assert_one_line_error(run_tiamat("-c", str(broken), APP, cwd=APPS), "broken.py", "SyntaxError")
    raising = write(tmp_path / "raising.py", "def load():\n    raise RuntimeError('nope')\n")
    assert_one_line_error(run_tiamat("-c", str(raising), APP, cwd=APPS), "raising.py", "nope")
    not_dict = write(tmp_path / "notdict.py", "def load():\n    return [1]\n")
    assert_one_line_error(run_tiamat("-c", str(not_dict), APP, cwd=APPS), "notdict.py", "dict")
    twice = write(tmp_path / "twice.py", "def load():\n    return {'daemon': 1, 'daemonize': 0}\n")
    assert_one_line_error(run_tiamat("-c", str(twice), APP, cwd=APPS), "twice.py", "given twice")


@pytest.mark.parametrize(("env", "needles"), [
    ({"TIAMAT_WORKERS": "0"}, ("environment", "TIAMAT_WORKERS", "at least 1")),
    ({"TIAMAT_PORT": "70000"}, ("environment", "TIAMAT_PORT", "65535")),
    ({"TIAMAT_TIMEOUT": "soon"}, ("environment", "TIAMAT_TIMEOUT", "number")),
    ({"TIAMAT_BIND": "[::1"}, ("environment", "TIAMAT_BIND", "[IPV6]:PORT")),
])
def test_bad_environment_value_is_one_line_exit_2(env, needles):
    assert_one_line_error(run_tiamat(APP, env=env, cwd=APPS), *needles)


@pytest.mark.parametrize(("args", "needles"), [
    (["-w", "0"], ("command line", "--workers", "at least 1")),
    (["-p", "70000"], ("command line", "--port", "65535")),
    (["-b", "127.0.0.1:99999"], ("command line", "--bind", "65535")),
    (["--chdir", "/no/such/dir"], ("command line", "--chdir", "/no/such/dir")),
    (["-t", "-1"], ("command line", "--timeout", "at least 0")),
])
def test_bad_command_line_value_is_one_line_exit_2(args, needles):
    assert_one_line_error(run_tiamat(*args, APP, cwd=APPS), *needles)


def test_load_config_raises_config_error_in_process(tmp_path):
    with pytest.raises(ConfigError, match=r"TIAMAT_WORKERS: must be at least 1"):
        load_config({}, environ={"TIAMAT_WORKERS": "0"})


# --- keys that change what the server does -------------------------------------------------
def test_original_tiamat_config_runs_a_server(tiamat_server, tmp_path):
    """listen_port, worker_app (a run(config) script), working_directory, stderr_path,
    stdout_path, pidfile and the before_fork/after_fork hooks, all from a load() dict."""
    port = free_port()
    marks = tmp_path / "hooks.txt"
    app_dir = tmp_path / "site"
    app_dir.mkdir()
    (app_dir / "worker.py").write_text(textwrap.dedent("""
        def run(config):
            print("worker script loaded", flush=True)

            def app(environ, start_response):
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"from worker.py on port %d" % config.port]

            return app
    """))
    conf = write(tmp_path / "tiamat.conf.py", f"""
        import os

        def load():
            def mark(text):
                with open({str(marks)!r}, "a") as f:
                    f.write(text + " " + str(os.getpid()) + "\\n")

            return {{
                "tcp": "tcp4",
                "listen_addr": "127.0.0.1",
                "listen_port": {port},
                "backlog": 64,
                "workers": 2,
                "timeout": 30,
                "worker_app": "worker.py",
                "working_directory": {str(app_dir)!r},
                "stderr_path": {str(tmp_path / "stderr.log")!r},
                "stdout_path": {str(tmp_path / "stdout.log")!r},
                "pidfile": {str(tmp_path / "tiamat.pid")!r},
                "before_fork": lambda: mark("before_fork"),
                "after_fork": lambda: mark("after_fork"),
            }}
    """)
    server = tiamat_server("-c", str(conf), cwd=tmp_path, wait=False)
    server.host, server.port = "127.0.0.1", port
    server.wait_answering()
    status, _, body = server.get("/")
    assert (status, body) == (200, f"from worker.py on port {port}".encode())
    assert int((tmp_path / "tiamat.pid").read_text()) == server.pid
    assert "Listening at: http://127.0.0.1:" in (tmp_path / "stderr.log").read_text()
    wait_for(lambda: (tmp_path / "stdout.log").read_text().count("worker script loaded") == 2,
             message="stdout_path gets the workers' output")
    lines = wait_for(lambda: len(marks.read_text().splitlines()) >= 4 and marks.read_text().splitlines(),
                     message="hooks ran")
    befores = [int(x.split()[1]) for x in lines if x.startswith("before_fork")]
    afters = [int(x.split()[1]) for x in lines if x.startswith("after_fork")]
    assert set(befores) == {server.pid}, "before_fork runs in the master"
    assert len(afters) == 2 and server.pid not in afters, "after_fork runs in each worker"
    assert sorted(afters) == sorted(server.worker_pids())


def test_module_level_hooks_with_gunicorn_signatures(tiamat_server, tmp_path):
    marks = tmp_path / "marks.txt"
    conf = write(tmp_path / "gunicorn.conf.py", f"""
        workers = 1
        wsgi_app = "core_app:application"

        def _mark(text):
            with open({str(marks)!r}, "a") as f:
                f.write(text + "\\n")

        def on_starting(server):
            _mark("on_starting")

        def pre_fork(server, worker):
            _mark("pre_fork")

        def post_fork(server, worker):
            _mark("post_fork %d" % worker.slot)

        def when_ready(server):
            _mark("when_ready")
    """)
    server = tiamat_server("-c", str(conf), "-b", "127.0.0.1:0", cwd=APPS)
    assert server.get("/")[0] == 200
    got = wait_for(lambda: marks.exists() and "when_ready" in marks.read_text() and marks.read_text(),
                   message="hooks")
    assert got.splitlines()[:3] == ["on_starting", "pre_fork", "post_fork 0"]


# --- --print-config -----------------------------------------------------------------------
def test_print_config_lists_every_setting_once():
    values = print_config()
    assert list(values) == [s.name for s in SETTINGS]
    for setting in SETTINGS:
        if setting.kind in ("int", "float", "bool", "str", "list", "choice", "size"):
            ast.literal_eval(values[setting.name])  # a Python literal, copy-pasteable


def test_print_config_shows_the_computed_defaults():
    values = print_config(env={"PORT": "5123", "WEB_CONCURRENCY": "3"})
    assert values["bind"] == "['0.0.0.0:5123']" and values["workers"] == "3"
    values = print_config(env={"PORT": "", "WEB_CONCURRENCY": ""})
    assert values["bind"] == "['127.0.0.1:8000']" and values["workers"] == "1"


def test_gunicorn_settings_tiamat_does_not_use_are_ignored_with_a_warning(tmp_path):
    conf = write(tmp_path / "c.py", "worker_tmp_dir = '/dev/shm'\nworkers = 2\n")
    result = run_tiamat("--print-config", "-c", str(conf))
    assert result.returncode == 0
    assert re.search(r"warning: .*worker_tmp_dir", result.stderr)
    assert "workers                  = 2" in result.stdout


def test_python_m_and_console_script_agree():
    """pip install -e . gives both entry points; they are the same command."""
    bindir = Path(sys.executable).parent
    script = bindir / "tiamat"
    assert script.exists(), "the tiamat console script is installed next to python"
    env = {k: v for k, v in os.environ.items() if k != "TIAMAT"}
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0 and out.stdout == run_tiamat("--version").stdout


# --- docs/settings.md is generated from the table --------------------------------------------
def test_docs_settings_md_is_current():
    """Fails when the table changed and docs/settings.md was not regenerated with
    ``python -m tiamat.settings_doc > docs/settings.md``."""
    from tiamat.settings_doc import render

    committed = (Path(__file__).resolve().parent.parent / "docs" / "settings.md").read_text()
    assert committed == render(), \
        "docs/settings.md is stale: run python -m tiamat.settings_doc > docs/settings.md"


def test_settings_doc_covers_every_setting_and_key():
    result = subprocess.run([sys.executable, "-m", "tiamat.settings_doc"], capture_output=True,
                            text=True, check=True, timeout=30)
    for setting in SETTINGS:
        assert f"### `{setting.name}`" in result.stdout
        for flag in (*setting.flags, *setting.off_flags):
            assert f"`{flag}`" in result.stdout
        for alias in setting.aliases:
            assert f"`{alias}`" in result.stdout
