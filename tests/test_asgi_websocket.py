"""``-k asgi`` WebSocket, through the ``websockets`` client library and raw sockets."""

from __future__ import annotations

import base64
import json
import os
import socket

import pytest
from conftest import wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

APP = "tests/apps/wk_asgi.py:app"


@pytest.fixture(params=["websockets", "wsproto"])
def ws_impl(request):
    return request.param


@pytest.fixture
def start(tiamat_server, ws_impl, tmp_path):
    def start(*args: str):
        return tiamat_server("-k", "asgi", "--ws", ws_impl, *args, APP,
                             env={"WK_MARK_DIR": str(tmp_path)})
    return start


def url(server, path: str = "/ws") -> str:
    return f"ws://{server.host}:{server.port}{path}"


def test_echo_text_and_binary(start):
    server = start()
    with connect(url(server), max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(5) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(5) == b"\x00\x01binary"
        big = os.urandom(3 * 1024 * 1024)
        ws.send(big)
        assert ws.recv(10) == big
        assert ws.response.headers["x-ws"] == "accepted"


def test_scope_and_subprotocol(start):
    server = start()
    with connect(url(server, "/ws/room?x=1"), subprotocols=["chat", "superchat"]) as ws:
        assert ws.subprotocol == "chat"
        ws.send("scope")
        scope = json.loads(ws.recv(5))
    assert scope == {"path": "/ws/room", "subprotocols": ["chat", "superchat"], "scheme": "ws",
                     "state": True}


def test_fragmented_message_is_joined(start):
    server = start()
    with connect(url(server)) as ws:
        ws.send(["frag1-", "frag2-", "frag3"])
        assert ws.recv(5) == "frag1-frag2-frag3"
        ws.send([b"ab", b"cd"])
        assert ws.recv(5) == b"abcd"


def test_ping_pong(start):
    server = start()
    with connect(url(server)) as ws:
        assert ws.ping(b"are you there").wait(5)


def test_close_codes_both_ways(start, tmp_path):
    server = start()
    with connect(url(server, "/ws-close")) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(5)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")

    with connect(url(server)) as ws:
        ws.send("close please")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(5)
    assert closed.value.rcvd.code == 4002

    with connect(url(server)) as ws:
        ws.send("x")
        ws.recv(5)
        ws.close(code=4005, reason="client done")
    marks = tmp_path / "ws-disconnect"
    wait_for(lambda: marks.exists() and "4005" in marks.read_text(), 5,
             message="the app seeing close code 4005")


def test_max_message_size(start):
    server = start("--ws-max-size", "1000")
    with connect(url(server)) as ws:
        ws.send("x" * 900)
        assert ws.recv(5) == "x" * 900
        ws.send("y" * 2000)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(5)
    assert closed.value.rcvd.code == 1009
    # Each fragment fits, the message does not.  The client ends a fragmented message
    # with an empty final frame, so the server's close can arrive before send() returns.
    with connect(url(server), compression=None) as ws, \
            pytest.raises(ConnectionClosed) as closed:
        ws.send(["z" * 600, "z" * 600])
        ws.recv(5)
    assert closed.value.rcvd.code == 1009


def test_permessage_deflate(start, tiamat_server, ws_impl):
    server = start()
    with connect(url(server)) as ws:
        assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        ws.send("compressible " * 1000)
        assert ws.recv(5) == "compressible " * 1000
    plain = tiamat_server("-k", "asgi", "--ws", ws_impl, "--no-ws-per-message-deflate", APP)
    with connect(url(plain)) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send("ok")
        assert ws.recv(5) == "ok"


def test_close_before_accept_is_403(start):
    server = start()
    with pytest.raises(InvalidStatus) as rejected:
        connect(url(server, "/ws-reject"))
    assert rejected.value.response.status_code == 403


def test_http_response_extension_denies_with_the_apps_response(start):
    server = start()
    with pytest.raises(InvalidStatus) as denied:
        connect(url(server, "/ws-deny"))
    response = denied.value.response
    assert response.status_code == 401
    assert response.headers["x-denied"] == "yes"
    assert response.body == b"go away"


def test_invalid_handshake_is_refused(start):
    server = start()
    reply = server.request(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Version: 13\r\n\r\n")  # no Sec-WebSocket-Key
    assert reply.startswith(b"HTTP/1.1 4"), reply[:60]


def test_ws_none_answers_upgrades_as_http(tiamat_server):
    server = tiamat_server("-k", "asgi", "--ws", "none", APP)
    key = base64.b64encode(os.urandom(16))
    reply = server.request(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"hello")


def test_graceful_stop_closes_with_1012(start):
    server = start()
    with connect(url(server)) as ws:
        ws.send("before")
        assert ws.recv(5) == "before"
        server.signal(15)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd.code == 1012
    assert server.wait(10) == 0


def test_raw_socket_handshake_and_masked_frame(start):
    server = start()
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        mask = b"\x01\x02\x03\x04"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"raw"))
        sock.sendall(b"\x81\x83" + mask + payload)  # FIN + text, masked, 3 bytes
        while len(rest) < 5:
            rest += sock.recv(4096)
        assert rest[:5] == b"\x81\x03raw"  # the server's frames are not masked


def test_server_pings_and_drops_a_silent_client(start):
    """--ws-ping-interval: the server pings; a client that never answers is closed with 1011."""
    server = start("--ws-ping-interval", "0.5", "--ws-ping-timeout", "1")
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        frames = data.partition(b"\r\n\r\n")[2]
    assert frames[:1] == b"\x89", frames[:10]  # a ping came first ...
    close_at = 2 + (frames[1] & 0x7F)  # right after the ping frame
    assert frames[close_at:close_at + 1] == b"\x88"  # ... then a close frame, code 1011
    assert frames[close_at + 2:close_at + 4] == (1011).to_bytes(2, "big")


def test_upgrade_through_the_h11_tokeniser(start):
    server = start("--http", "h11")
    with connect(url(server)) as ws:
        ws.send("via h11")
        assert ws.recv(5) == "via h11"
