"""An app's own ``Connection`` header: the close option ends the connection after the response,
judged as a token list (RFC 9110 7.6.1) in both the WSGI and the ASGI path."""

from __future__ import annotations

import socket
from urllib.parse import quote

import pytest

from tests.conftest import read_until_closed

APPS = {"sync": "tests/apps/wk_wsgi.py:application", "asgi": "tests/apps/wk_asgi.py:app"}

CASES = [
    ("close", True),
    ("Close", True),
    ("keep-alive, close", True),
    ("close , upgrade", True),
    ("keep-alive", False),
    ("closed", False),
    ("x-close-later", False),
]


def ask(server, value: str) -> tuple[bytes, bool]:
    """One request whose answer carries ``Connection: value``; (the answer, closed after it?)."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(f"GET /connection?v={quote(value)} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"told"):
            data = sock.recv(65536)
            assert data, f"closed before the whole answer: {answer!r}"
            answer += data
        sock.settimeout(1.0)
        try:
            rest = sock.recv(65536)
        except TimeoutError:
            return answer, False  # still open: nothing more came
        assert rest == b"", f"unexpected bytes after the answer: {rest!r}"
        return answer, True


@pytest.mark.parametrize("kind", sorted(APPS))
def test_close_option_is_a_token(tiamat_server, kind):
    server = tiamat_server("-k", kind, APPS[kind])
    for value, closes in CASES:
        answer, closed = ask(server, value)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert closed is closes, f"Connection: {value!r}: closed={closed}"
        assert (b"\r\nConnection: close\r\n" in answer) is closes, answer
        # the app's own Connection header is the server's to frame: never sent as given
        assert f"Connection: {value}\r\n".encode() not in answer or value == "close"


@pytest.mark.parametrize("kind", sorted(APPS))
def test_keep_alive_answer_leaves_the_connection_usable(tiamat_server, kind):
    server = tiamat_server("-k", kind, APPS[kind])
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /connection?v=keep-alive HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = b""
            while not answer.endswith(b"told"):
                data = sock.recv(65536)
                assert data, "closed after a keep-alive answer"
                answer += data
        sock.sendall(b"GET /connection?v=close HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_until_closed(sock).endswith(b"told")


@pytest.mark.parametrize("kind", sorted(APPS))
def test_an_app_content_length_is_digits_only(tiamat_server, kind):
    """One rule (tiamat.http.response.app_content_length) for both paths: a Content-Length
    the app gives is ASCII digits, else the app's error (a 500), never sent on as given."""
    server = tiamat_server("-k", kind, APPS[kind])
    status, _, body = server.get("/length?v=4")
    assert (status, body) == (200, b"told")
    for bad in ("-1", "1_0", "+4", " 4"):
        status, headers, _ = server.get(f"/length?v={quote(bad)}")
        assert status == 500, (bad, status, headers)
