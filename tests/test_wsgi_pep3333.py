"""Issue 2, item 6: PEP 3333 as an app sees it.

The app under test is wrapped in ``wsgiref.validate.validator`` with its warnings turned
into errors, so any environ, input stream, start_response or iteration rule the server
breaks turns the request into a 500 (or a broken response) and fails the test.
"""

from __future__ import annotations

import json
import socket

import pytest
from conftest import APPS, TiamatServer
from test_sync_worker import GET, connect, exchange

CHUNK = 1024 * 1024
#: the file tests/apps/core_sendfile.py serves
DATA = bytes(range(256)) * 1024


def _server(tmp_path_factory, *args: str) -> TiamatServer:
    return TiamatServer(["-b", "127.0.0.1:0", "-w", "1", *args], tmp_path_factory.mktemp("pep3333"),
                        cwd=APPS).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _server(tmp_path_factory, "core_app:validated")
    try:
        yield srv
    finally:
        srv.stop()


def environ_of(server, target: bytes, extra: bytes = b"") -> dict:
    response = exchange(server, b"GET %s HTTP/1.1\r\nHost: example.org:8080\r\n%s\r\n" % (target, extra))
    assert response.status == 200, response.body
    return json.loads(response.body)


# --- validator over every kind of response -------------------------------------------------------
@pytest.mark.parametrize(("raw", "status", "body"), [
    (GET % b"/", 200, b"hello from core_app\n"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc", 200, b"abc"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     200, b"abc"),
    (GET % b"/stream?n=4", 200, b"part 0\npart 1\npart 2\npart 3\n"),
    (GET % b"/write", 200, b"written and returned\n"),
    (GET % b"/empty", 204, b""),
    (GET % b"/errors", 200, b"logged\n"),
    (GET % b"/file", 200, b"0123456789abcdef" * 4096),
])
def test_validator_passes(server, raw, status, body):
    response = exchange(server, raw)
    assert (response.status, response.body) == (status, body)
    assert response.complete


@pytest.mark.parametrize("path", [b"/", b"/stream", b"/file", b"/write"])
def test_validator_passes_for_head(server, path):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: t\r\n\r\n" % path + GET % b"/")
        assert reader.read(head_request=True).status == 200
        assert reader.read().body == b"hello from core_app\n"


# --- the environ ------------------------------------------------------------------------------------
def test_environ_basics(server):
    env = environ_of(server, b"/environ/x?a=1&b=%20", b"Content-Type: text/plain\r\nX-Multi: 1\r\n"
                     b"X-Multi: 2\r\n")
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/environ/x"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["RAW_URI"] == "/environ/x?a=1&b=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(server.port)
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["HTTP_HOST"] == "example.org:8080"
    assert env["CONTENT_TYPE"] == "text/plain" and "HTTP_CONTENT_TYPE" not in env
    assert env["HTTP_X_MULTI"] == "1,2"
    assert env["wsgi.version"] == [1, 0] and env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is False and env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert env["wsgi.file_wrapper"] is True
    assert env["TIAMAT"] == "1"


def test_remote_port_is_the_clients(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(GET % b"/environ")
        env = json.loads(reader.read().body)
        assert env["REMOTE_PORT"] == str(sock.getsockname()[1])


def test_path_info_is_percent_decoded_as_latin1(server):
    env = environ_of(server, b"/environ/caf%C3%A9/a%2Fb%20c?q=%C3%A9")
    assert env["PATH_INFO"] == "/environ/caf\u00c3\u00a9/a/b c"  # UTF-8 bytes seen as latin-1
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/environ/café/a/b c"
    assert env["QUERY_STRING"] == "q=%C3%A9", "the query string stays encoded"


def test_absolute_form_target(server):
    env = environ_of(server, b"http://example.org/environ/abs?x=1")
    assert env["PATH_INFO"] == "/environ/abs" and env["QUERY_STRING"] == "x=1"


def test_http10_protocol(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"GET /environ HTTP/1.0\r\n\r\n")
        assert json.loads(reader.read().body)["SERVER_PROTOCOL"] == "HTTP/1.0"


def test_script_name_with_root_path(tmp_path_factory):
    srv = _server(tmp_path_factory, "--root-path", "/mount", "core_app:validated")
    try:
        env = environ_of(srv, b"/mount/environ/y")
        assert env["SCRIPT_NAME"] == "/mount" and env["PATH_INFO"] == "/environ/y"
        outside = environ_of(srv, b"/environ")
        assert outside["SCRIPT_NAME"] == "/mount" and outside["PATH_INFO"] == "/environ"
    finally:
        srv.stop()


# --- wsgi.input ----------------------------------------------------------------------------------
BODY = b"first line\nsecond line\n\nlast line without newline"
EXPECTED = {
    "read": BODY,
    "read1k": BODY,
    "readline": b"".join(b"[" + line + b"]" for line in BODY.splitlines(keepends=True)),
    "readlines": b"".join(b"[" + line + b"]" for line in BODY.splitlines(keepends=True)),
    "iter": b"".join(b"[" + line + b"]" for line in BODY.splitlines(keepends=True)),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_wsgi_input(server, mode, framing):
    if framing == "length":
        raw = b"POST /echo?mode=%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
            mode.encode(), len(BODY), BODY)
    else:
        parts = [BODY[:7], BODY[7:30], BODY[30:]]
        raw = (b"POST /echo?mode=%s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               % mode.encode() + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
               + b"0\r\n\r\n")
    response = exchange(server, raw)
    assert response.status == 200 and response.body == EXPECTED[mode]


@pytest.mark.parametrize("mode", ["read", "read1k", "iter"])
def test_large_body_spooled_to_disk(server, mode):
    body = (b"0123456789" * 100 + b"\n") * (3 * CHUNK // 1001)  # ~3 MiB, past the 1 MiB buffer
    sock, reader = connect(server, timeout=20)
    with sock:
        sock.sendall(b"POST /echo?mode=%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % (mode.encode(), len(body)))
        sock.sendall(body)
        response = reader.read()
    expected = body if mode != "iter" else b"".join(b"[" + line + b"]" for line in
                                                      body.splitlines(keepends=True))
    assert response.status == 200 and response.body == expected


def test_empty_body_reads_empty(server):
    response = exchange(server, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert response.status == 200 and response.body == b""


# --- wsgi.errors ---------------------------------------------------------------------------------
def test_wsgi_errors_reaches_the_error_log(server):
    assert exchange(server, GET % b"/errors").status == 200
    server.wait_log(r"message to wsgi.errors\nsecond line to wsgi.errors")


# --- wsgi.file_wrapper through os.sendfile ---------------------------------------------------------
@pytest.fixture(scope="module")
def sendfile_server(tmp_path_factory):
    srv = _server(tmp_path_factory, "core_sendfile")
    try:
        yield srv
    finally:
        srv.stop()


def test_file_wrapper_uses_sendfile(sendfile_server):
    before = int(exchange(sendfile_server, GET % b"/count").body)
    response = exchange(sendfile_server, GET % b"/")
    assert response.status == 200
    assert response.header("Content-Length") == str(len(DATA))
    assert response.body == DATA
    after = int(exchange(sendfile_server, GET % b"/count").body)
    assert after > before, "the file went out through os.sendfile"


def test_file_wrapper_honours_position_and_length(sendfile_server):
    response = exchange(sendfile_server, GET % b"/offset")
    assert response.header("Content-Length") == "5000"
    assert response.body == DATA[1000:6000]


def test_file_wrapper_keep_alive_and_head(sendfile_server):
    sock, reader = connect(sendfile_server)
    with sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n" + GET % b"/" + GET % b"/offset")
        head = reader.read(head_request=True)
        assert head.status == 200 and head.header("Content-Length") == str(len(DATA))
        assert reader.read().body == DATA
        assert reader.read().body == DATA[1000:6000]


def test_file_wrapper_shorter_than_its_content_length_closes(sendfile_server):
    """The app declares more than the file holds: the connection must close after the file,
    or the client would read the next response as the rest of this body."""
    with socket.create_connection((sendfile_server.host, sendfile_server.port), timeout=10) as sock:
        sock.sendall(GET % b"/overlong" + GET % b"/count")  # no answer due to the second
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    assert received.endswith(DATA)
    assert b"Content-Length: %d\r\n" % (len(DATA) + 100) in received


def test_file_wrapper_without_sendfile(tmp_path_factory):
    srv = _server(tmp_path_factory, "--no-sendfile", "core_sendfile")
    try:
        assert exchange(srv, GET % b"/").body == DATA
        assert exchange(srv, GET % b"/count").body == b"0"
    finally:
        srv.stop()


def test_client_gone_mid_response_does_not_hurt_the_worker(sendfile_server):
    for _ in range(5):
        with socket.create_connection((sendfile_server.host, sendfile_server.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(GET % b"/")
            sock.recv(100)
    reader_sock, reader = connect(sendfile_server)
    with reader_sock:
        reader_sock.sendall(GET % b"/count")
        assert reader.read().status == 200


def test_wsgi_errors_follows_the_error_logfile(tmp_path_factory):
    """With --error-logfile, what the app writes to wsgi.errors goes to that file."""
    import re

    from conftest import wait_for

    logfile = tmp_path_factory.mktemp("errlog") / "error.log"
    srv = TiamatServer(["-b", "127.0.0.1:0", "--error-logfile", str(logfile), "core_app:validated"],
                       tmp_path_factory.mktemp("errlog-run"), cwd=APPS).start(wait=False)
    try:
        match = wait_for(lambda: logfile.exists() and re.search(r"Listening at: http://127.0.0.1:(\d+)",
                                                                  logfile.read_text()),
                         message="the log file names the port")
        srv.port = int(match.group(1))
        srv.wait_answering()
        assert exchange(srv, GET % b"/errors").status == 200
        wait_for(lambda: "message to wsgi.errors\nsecond line to wsgi.errors" in logfile.read_text(),
                 message="wsgi.errors output in the error log file")
        assert "message to wsgi.errors" not in srv.log()
    finally:
        srv.stop()
