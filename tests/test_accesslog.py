"""Access log (gunicorn atoms, JSON, no log injection), --log-config, --log-level, USR1 reopen."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket

import pytest
from conftest import APPS, wait_for

from tiamat import accesslog

APP = str(APPS / "ops_app.py")


def _lines(path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def _wait_line(path, needle: str) -> str:
    """The first line of ``path`` containing ``needle``, once it is there (the readiness
    probe's own line may land at any moment, so lines are found by content, not position)."""
    def found() -> str | None:
        return next((line for line in _lines(path) if needle in line), None)

    return wait_for(found, message=f"{needle!r} in {path}")  # type: ignore[return-value]


# --- unit level: escaping and the atoms, without a server -----------------------------------
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger() -> tuple[logging.Logger, _Capture]:
    logger = logging.getLogger(f"test.access.{id(object())}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    capture = _Capture()
    logger.addHandler(capture)
    return logger, capture


def test_escape_neutralises_control_characters():
    assert accesslog.escape("plain /path?q=1") == "plain /path?q=1"
    assert accesslog.escape('a\nb\r\x1b[31m"\\\x9b') == 'a\\nb\\r\\x1b[31m\\"\\\\\\x9b'


def test_every_atom_from_plain_values():
    logger, capture = _logger()
    fmt = ("%(h)s|%(l)s|%(u)s|%(r)s|%(m)s|%(U)s|%(q)s|%(H)s|%(s)s|%(B)s|%(b)s|%(f)s|%(a)s|"
           "%(T)s|%(M)s|%(D)s|%(L)s|%(p)s|%({x-in}i)s|%({x-out}o)s|%({MY_VAR}e)s|%(t)s")
    log = accesslog.AccessLog(fmt, logger)
    log.log(remote_addr="10.0.0.1", method="GET", target="/a%20b?x=1", protocol="HTTP/1.1",
            status=201, length=0, duration=1.5,
            request_headers=[(b"authorization", b"Basic dXNlcjpwdw=="), (b"referer", b"http://r/"),
                             (b"user-agent", b"ua/1"), (b"x-in", b"in-value")],
            response_headers=[("X-Out", "out-value")], environ={"MY_VAR": "mine"}, path="/a b")
    fields = capture.lines[0].split("|")
    assert fields[:21] == ["10.0.0.1", "-", "user", "GET /a%20b?x=1 HTTP/1.1", "GET", "/a b", "x=1",
                           "HTTP/1.1", "201", "0", "-", "http://r/", "ua/1", "1", "1500", "1500000",
                           "1.500000", f"<{os.getpid()}>", "in-value", "out-value", "mine"]
    assert re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", fields[21])


def test_missing_values_are_dashes_and_bad_formats_do_not_raise():
    logger, capture = _logger()
    accesslog.AccessLog("%(u)s %(f)s %({nope}i)s %({nope}o)s %(zz)s", logger).log(
        remote_addr="1.2.3.4", method="GET", target="/", protocol="HTTP/1.0", status=200,
        length=5, duration=0.001)
    assert capture.lines == ["- - - - -"]
    accesslog.AccessLog("%(h)d broken", logger).log(
        remote_addr="1.2.3.4", method="GET", target="/", protocol="HTTP/1.0", status=200,
        length=5, duration=0.001)
    assert len(capture.lines) == 1  # logged as an error instead, never raised


def _start_quiet(tiamat_server, *args: str):
    """Start a server whose "Listening at" line does not reach its output (--error-logfile,
    --log-level warning): the port is chosen here instead of read from the log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = tiamat_server(*args, "-b", f"127.0.0.1:{port}", wait=False)
    server.port = port
    server.wait_answering()
    return server


# --- against a real server ---------------------------------------------------------------------
def test_default_format_written_when_the_response_completes(tiamat_server, tmp_path):
    access = tmp_path / "access.log"
    server = tiamat_server(APP, "--access-logfile", str(access))
    status, _, _ = server.get("/missing?x=1")
    assert status == 404
    line = _wait_line(access, "/missing")
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                        r'"GET /missing\?x=1 HTTP/1\.1" 404 14 "-" "-"', line), line


def test_custom_atoms_headers_and_duration(tiamat_server, tmp_path):
    access = tmp_path / "access.log"
    fmt = "%(m)s %(U)s %(s)s %(B)s %({x-echo}i)s %({x-out}o)s %({OPS_VAR}e)s %(D)s %(p)s"
    server = tiamat_server(APP, "--access-logfile", str(access), "--access-logformat", fmt,
                           "-e", "OPS_VAR=from-env")
    response = server.request(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Echo: hello\r\n"
                              b"Connection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200")
    server.request(b"GET /sleep?0.3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    method, path, status, length, echo, out, env, micros, pid = _wait_line(
        access, "GET /echo ").split(" ")
    assert (method, path, status, length, echo, out, env) == (
        "GET", "/echo", "200", "5", "hello", "hello", "from-env")
    assert pid.startswith("<") and int(pid[1:-1]) in server.worker_pids()
    assert int(micros) >= 0
    slow_micros = int(_wait_line(access, "GET /sleep ").split(" ")[7])
    assert slow_micros >= 250_000  # the duration covers the app's 0.3 s


def test_no_log_injection_from_path_or_header(tiamat_server, tmp_path):
    access = tmp_path / "access.log"
    server = tiamat_server(APP, "--access-logfile", str(access), "--access-logformat",
                           '%(U)s "%(r)s" "%({x-echo}i)s" %({x-out}o)s')
    # %0A and %1B decode to a newline and ESC in the path; obs-text \x9b is a C1 control (CSI)
    response = server.request(b"GET /echo%0Afake%20200%20line%1B[31m HTTP/1.1\r\nHost: t\r\n"
                              b"X-Echo: a\x9b31mb\"c\r\nConnection: close\r\n\r\n")
    if not response.startswith(b"HTTP/1.1 404") and not response.startswith(b"HTTP/1.1 200"):
        pytest.fail(f"unexpected response {response[:80]!r}")
    line = _wait_line(access, "/echo")
    assert not any("fake" in other for other in _lines(access) if other != line)  # no forged line
    assert "\x1b" not in line and "\x9b" not in line
    assert line.startswith("/echo\\nfake 200 line\\x1b[31m ")
    assert '"a\\x9b31mb\\"c"' in line


def test_json_format_one_object_per_line(tiamat_server, tmp_path):
    access = tmp_path / "access.log"
    server = tiamat_server(APP, "--access-logfile", str(access), "--access-logformat", "json")
    server.request(b"GET /x%0Ay%1B HTTP/1.1\r\nHost: t\r\nUser-Agent: agent/1\r\n"
                   b"Referer: http://ref/\r\nConnection: close\r\n\r\n")
    _wait_line(access, "agent/1")
    records = [json.loads(line) for line in _lines(access)]  # every line is one JSON object
    record = next(r for r in records if r["user_agent"] == "agent/1")
    assert record["method"] == "GET"
    assert record["path"] == "/x\ny\x1b"  # decoded, and safely escaped by JSON on disk
    assert record["status"] == 200
    assert record["bytes"] == 3
    assert record["user_agent"] == "agent/1"
    assert record["referer"] == "http://ref/"
    assert record["protocol"] == "HTTP/1.1"
    assert record["remote_addr"] == "127.0.0.1"
    assert record["duration_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert b"\x1b" not in access.read_bytes()


def test_access_log_off_by_default(tiamat_server, tmp_path):
    server = tiamat_server(APP, cwd=tmp_path)
    server.get("/")
    server.get("/missing")
    assert '"GET /missing' not in server.log()
    assert list(tmp_path.glob("*access*")) == []


def test_log_config_json_and_log_level(tiamat_server, tmp_path):
    routed = tmp_path / "routed-access.log"
    config = {
        "version": 1,
        "formatters": {"tagged": {"format": "ACCESS %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(routed),
                              "formatter": "tagged"}},
        "loggers": {"tiamat.access": {"handlers": ["file"], "level": "INFO",
                                      "propagate": False}},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    server = _start_quiet(tiamat_server, APP, "--log-config", str(path), "--log-level", "warning")
    server.get("/missing")
    line = _wait_line(routed, "/missing")
    assert line.startswith("ACCESS 127.0.0.1 - - [") and '"GET /missing HTTP/1.1" 404' in line
    assert "Booting worker" not in server.log()  # info lines are below --log-level warning


def test_log_config_python_file(tiamat_server, tmp_path):
    routed = tmp_path / "py-access.log"
    path = tmp_path / "logging_conf.py"
    path.write_text(
        "LOGGING = {'version': 1, 'formatters': {'f': {'format': 'PY %(message)s'}},\n"
        f" 'handlers': {{'h': {{'class': 'logging.FileHandler', 'filename': {str(routed)!r},\n"
        "  'formatter': 'f'}}, 'loggers': {'tiamat.access': {'handlers': ['h'],\n"
        "  'level': 'INFO', 'propagate': False}}}\n")
    server = tiamat_server(APP, "--log-config", str(path))
    server.get("/missing")
    assert _wait_line(routed, "/missing").startswith("PY 127.0.0.1")
    assert "Booting worker" in server.log()  # tiamat's own loggers still work


def test_usr1_reopens_access_and_error_logs(tiamat_server, tmp_path):
    access = tmp_path / "access.log"
    errors = tmp_path / "error.log"
    server = _start_quiet(tiamat_server, APP, "--access-logfile", str(access),
                          "--error-logfile", str(errors), "-w", "2")
    server.get("/missing?before")
    _wait_line(access, "/missing?before")
    access.rename(tmp_path / "access.log.1")
    errors.rename(tmp_path / "error.log.1")
    server.signal(signal.SIGUSR1)
    wait_for(lambda: errors.exists(), message="the error log to be reopened")

    def logged_after_reopen() -> bool:
        # each worker reopens on the master's message; keep asking until a fresh line lands
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(b"GET /missing?after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            sock.recv(1024)
        return any("/missing?after" in line for line in _lines(access))

    wait_for(logged_after_reopen, timeout=10, interval=0.2, message="a line in the new file")
    # A worker that had not read the master's message yet may still log a request to the old
    # file (as with any server that reopens on a signal); once both have, every line goes to
    # the new one.
    old = tmp_path / "access.log.1"
    batch = iter(range(1000))

    def a_batch_lands_in_the_new_file() -> bool:
        tags = [f"/missing?later{next(batch)}" for _ in range(6)]
        for tag in tags:
            server.get(tag)
        landed = {tag: wait_for(lambda t=tag: (any(t in line for line in _lines(access)) and "new")
                                or (any(t in line for line in _lines(old)) and "old"),
                                message=f"{tag} logged") for tag in tags}
        return all(where == "new" for where in landed.values())

    wait_for(a_batch_lands_in_the_new_file, timeout=10, interval=0.1,
             message="every line in the new file")


def test_logconfig_dict_in_a_config_file_and_usr1_reopens_its_files(tiamat_server, tmp_path):
    routed = tmp_path / "dict-access.log"
    conf = tmp_path / "conf.py"
    conf.write_text(
        "logconfig_dict = {'version': 1, 'formatters': {'f': {'format': 'DICT %(message)s'}},\n"
        f" 'handlers': {{'h': {{'class': 'logging.FileHandler', 'filename': {str(routed)!r},\n"
        "  'formatter': 'f'}}, 'loggers': {'tiamat.access': {'handlers': ['h'],\n"
        "  'level': 'INFO', 'propagate': False}}}\n")
    server = tiamat_server(APP, "-c", str(conf), "-b", "127.0.0.1:0")
    server.get("/missing?first")
    assert _wait_line(routed, "/missing?first").startswith("DICT 127.0.0.1")
    routed.rename(tmp_path / "dict-access.log.1")
    server.signal(signal.SIGUSR1)

    def in_new_file() -> bool:
        server.get("/missing?second")
        return any("/missing?second" in line for line in _lines(routed))

    wait_for(in_new_file, timeout=10, interval=0.2, message="the dictConfig file reopened")


def test_no_line_is_built_when_the_access_log_is_off():
    logger, _ = _logger()
    logger.setLevel(logging.CRITICAL + 1)
    assert not accesslog.enabled(logger)
    assert accesslog.enabled(_logger()[0])


def test_asgi_worker_writes_the_same_lines(tiamat_server, tmp_path):
    access = tmp_path / "access.log"
    server = tiamat_server(str(APPS / "asgi_hello.py"), "--access-logfile", str(access),
                           "--access-logformat", '%(m)s %(U)s %(q)s %(s)s %(B)s %({x-echo}i)s '
                           '%({x-out}o)s "%(r)s"')
    server.request(b"GET /missing%0Ax?a=1 HTTP/1.1\r\nHost: t\r\nX-Echo: hi\r\n"
                   b"Connection: close\r\n\r\n")
    line = _wait_line(access, "/missing")
    assert line == 'GET /missing\\nx a=1 404 14 hi hi "GET /missing%0Ax?a=1 HTTP/1.1"'
