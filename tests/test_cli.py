"""Issue 2, items 1 and 2: the command line, gunicorn's flag names, defaults from the
environment, and the commands that only report (--version, --check-config, --print-config).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import APPS, ROOT, TiamatServer, run_tiamat, wait_for

APP = "core_app:application"

#: every flag issue 2 lists, with a valid value (None for flags without one)
ISSUE_FLAGS = {
    "-b": "127.0.0.1:0", "--bind": "127.0.0.1:0", "-p": "3000", "--port": "3000",
    "-s": "x.py", "--script": "x.py", "-w": "2", "--workers": "2", "-k": "sync",
    "--worker-class": "sync", "--threads": "2", "-t": "10", "--timeout": "10",
    "--graceful-timeout": "5", "--keep-alive": "3", "--backlog": "64", "-c": None,
    "--config": None, "--pid": "/tmp/t.pid", "-D": None, "--daemon": None, "--chdir": ".",
    "--preload": None, "--max-requests": "100", "--max-requests-jitter": "10",
    "--access-logfile": "-", "--error-logfile": "-", "--log-level": "debug",
    "--check-config": None, "--print-config": None, "--version": None,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def values(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    result = run_tiamat("--print-config", *args, env=env, cwd=APPS)
    assert result.returncode == 0, result.stderr
    return {n.strip(): v.strip() for n, _, v in (line.partition(" = ")
                                                 for line in result.stdout.splitlines())}


def test_help_lists_every_flag_of_the_issue():
    result = run_tiamat("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: tiamat [OPTIONS] APP")
    for flag in ISSUE_FLAGS:
        assert f" {flag}" in result.stdout or f"{flag}," in result.stdout, flag


def test_flags_set_their_settings():
    got = values("-b", "127.0.0.1:9000", "-b", "[::1]:9001", "-b", "unix:/tmp/a.sock",
                 "-b", "fd://3", "-b", ":9002", "-w", "3", "-k", "sync", "--threads", "4",
                 "-t", "12", "--graceful-timeout", "7", "--keep-alive", "3", "--backlog", "64",
                 "--pid", "/tmp/x.pid", "-D", "--chdir", ".", "--preload", "--max-requests", "100",
                 "--max-requests-jitter", "10", "--access-logfile", "-", "--error-logfile",
                 "/tmp/err.log", "--log-level", "debug", APP)
    assert got["bind"] == "['127.0.0.1:9000', '[::1]:9001', 'unix:/tmp/a.sock', 'fd://3', ':9002']"
    assert got["workers"] == "3" and got["worker_class"] == "'sync'" and got["threads"] == "4"
    assert got["timeout"] == "12.0" and got["graceful_timeout"] == "7.0"
    assert got["keepalive"] == "3.0" and got["backlog"] == "64"
    assert got["pidfile"] == "'/tmp/x.pid'" and got["daemon"] == "True"
    assert got["chdir"] == "'.'" and got["preload_app"] == "True"
    assert got["max_requests"] == "100" and got["max_requests_jitter"] == "10"
    assert got["accesslog"] == "'-'" and got["errorlog"] == "'/tmp/err.log'"
    assert got["loglevel"] == "'debug'" and got["app"] == repr(APP)


def test_dash_p_is_the_port_and_pid_is_the_pidfile():
    got = values("-p", "3000", "--pid", "/tmp/t.pid")
    assert got["port"] == "3000" and got["bind"] == "['127.0.0.1:3000']"
    assert got["pidfile"] == "'/tmp/t.pid'"


@pytest.mark.parametrize(("env", "bind"), [
    ({"PORT": ""}, "['127.0.0.1:8000']"),
    ({"PORT": "5005"}, "['0.0.0.0:5005']"),
])
def test_default_bind(env, bind):
    assert values(env=env)["bind"] == bind


def test_workers_default_from_web_concurrency():
    assert values(env={"WEB_CONCURRENCY": ""})["workers"] == "1"
    assert values(env={"WEB_CONCURRENCY": "4"})["workers"] == "4"
    assert values("-w", "2", env={"WEB_CONCURRENCY": "4"})["workers"] == "2"


@pytest.mark.parametrize("bad", ["127.0.0.1:x", "[::1", "::1:80", "unix:", "fd://x", "1.2.3.4:65536"])
def test_bad_bind_addresses_are_rejected(bad):
    result = run_tiamat("-b", bad, APP)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--bind" in result.stderr


def test_unknown_flag_is_a_usage_error():
    result = run_tiamat("--no-such-flag", APP)
    assert result.returncode == 2 and "No such option" in result.stderr


def test_missing_app_is_a_usage_error():
    result = run_tiamat("-w", "1")
    assert result.returncode == 2 and "missing APP" in result.stderr


def test_app_given_twice_is_a_usage_error():
    result = run_tiamat("-s", "a.py", "b.py")
    assert result.returncode == 2 and "give the app once" in result.stderr


def test_version():
    from tiamat import __version__

    result = run_tiamat("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"tiamat {__version__}")


# --- --check-config -------------------------------------------------------------------------
def test_check_config_ok_exits_0_without_binding():
    port = free_port()
    result = run_tiamat("--check-config", "-b", f"127.0.0.1:{port}", APP, cwd=APPS)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stderr and "Listening" not in result.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # still free: nothing was bound


def test_check_config_bad_config_exits_2():
    result = run_tiamat("--check-config", "-w", "0", APP, cwd=APPS)
    assert result.returncode == 2


def test_check_config_bad_app_exits_4():
    result = run_tiamat("--check-config", "core_app:nope", cwd=APPS)
    assert result.returncode == 4
    assert result.stderr.strip() == ("tiamat: cannot load 'core_app:nope': module 'core_app' "
                                     "has no attribute 'nope'")


def test_print_config_exits_0_without_loading_the_app():
    result = run_tiamat("--print-config", "no_such_module:app")
    assert result.returncode == 0 and "app" in result.stdout


# --- really serving -------------------------------------------------------------------------
def _start(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
           cwd: Path = APPS) -> TiamatServer:
    """A server started without the fixture's automatic -b (to test the default bind)."""
    return TiamatServer(args, tmp_path, env=env, cwd=cwd).start(wait=False)


def test_port_env_binds_all_interfaces(tmp_path):
    port = free_port()
    server = _start([APP], tmp_path, env={"PORT": str(port)})
    try:
        assert server.wait_listening() == f"http://0.0.0.0:{port}"
        server.host, server.port = "127.0.0.1", port
        server.wait_answering()
    finally:
        server.stop()


def test_original_tiamat_command_line(tmp_path):
    """``tiamat -s app.py -p 3000`` with a worker script whose run(config) returns the app."""
    (tmp_path / "app.py").write_text(
        "def run(config):\n"
        "    def app(environ, start_response):\n"
        "        start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "        return [b'script app']\n"
        "    return app\n")
    port = free_port()
    server = _start(["-s", "app.py", "-p", str(port)], tmp_path, cwd=tmp_path)
    try:
        assert server.wait_listening() == f"http://127.0.0.1:{port}"
        server.wait_answering()
        assert server.get("/")[2] == b"script app"
    finally:
        server.stop()


def test_gunicorn_dockerfile_command_line_works(tiamat_server, tmp_path):
    """The common gunicorn flags, unchanged: only the program name differs."""
    port = free_port()
    pidfile = tmp_path / "app.pid"
    server = tiamat_server(
        "--workers", "2", "--bind", f"127.0.0.1:{port}", "--worker-class", "sync",
        "--timeout", "30", "--graceful-timeout", "10", "--keep-alive", "5",
        "--access-logfile", "-", "--error-logfile", "-", "--log-level", "info",
        "--max-requests", "1000", "--max-requests-jitter", "50", "--preload",
        "--chdir", str(APPS), "--pid", str(pidfile), "--backlog", "512", APP, cwd=ROOT)
    assert server.port == port
    assert server.get("/")[0] == 200
    assert int(pidfile.read_text()) == server.pid
    wait_for(lambda: len(server.worker_pids()) == 2, message="2 workers")


def test_web_concurrency_sets_the_worker_count(tiamat_server):
    server = tiamat_server(APP, cwd=APPS, env={"WEB_CONCURRENCY": "3"})
    wait_for(lambda: len(server.worker_pids()) == 3, message="3 workers")


def test_settings_from_environment_reach_the_server(tiamat_server, tmp_path):
    pidfile = tmp_path / "env.pid"
    server = tiamat_server(APP, cwd=APPS, env={"TIAMAT_WORKERS": "2", "TIAMAT_PIDFILE": str(pidfile)})
    wait_for(lambda: len(server.worker_pids()) == 2, message="2 workers")
    assert int(pidfile.read_text()) == server.pid


def test_check_config_unknown_worker_class_exits_2():
    result = run_tiamat("--check-config", "-k", "no_such_class", APP, cwd=APPS)
    assert result.returncode == 2 and "unknown worker class 'no_such_class'" in result.stderr
