"""``-k asgi`` over HTTP/1.1: scope, bodies both ways, keep-alive, limits, framing edges.

Every case runs under both tokenisers (``--http httptools`` and ``--http h11``); a few
run under both event loops too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import read_response, read_to_end, read_until_closed, wait_for

APP = "tests/apps/wk_asgi.py:app"


@pytest.fixture(params=["httptools", "h11"])
def http_impl(request):
    return request.param


@pytest.fixture
def server(tiamat_server, http_impl, tmp_path):
    return tiamat_server("-k", "asgi", "--http", http_impl, APP, env={"WK_MARK_DIR": str(tmp_path)})


def test_scope_is_complete(server):
    response = httpx.get(f"http://{server.host}:{server.port}/scope?a=1&b=%20x",
                         headers={"X-Custom": "Value", "Cookie": "k=v"})
    assert response.status_code == 200
    scope = response.json()
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/scope"
    assert scope["raw_path"] == "/scope"
    assert scope["query_string"] == "a=1&b=%20x"
    assert scope["root_path"] == ""
    assert scope["types"] == {"raw_path": "bytes", "query_string": "bytes", "header": "bytes"}
    assert scope["server"] == ["127.0.0.1", server.port]
    assert scope["client"][0] == "127.0.0.1" and isinstance(scope["client"][1], int)
    assert ["x-custom", "Value"] in scope["headers"]
    assert all(name == name.lower() for name, _ in scope["headers"])
    assert scope["pathsend"] is True


def test_percent_encoded_path_and_root_path(tiamat_server, http_impl):
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--root-path", "/api", APP)
    head, body, _ = _get_raw(server, b"/scope/caf%C3%A9%2Fx?q")
    assert head.startswith(b"HTTP/1.1 200")
    scope = json.loads(body)
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/scope/caf\u00e9/x"
    assert scope["raw_path"] == "/api/scope/caf%C3%A9%2Fx"
    assert scope["query_string"] == "q"


def _get_raw(server, target: bytes, extra: bytes = b"") -> tuple[bytes, bytes, bytes]:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n")
        return read_response(sock)


def test_keep_alive_and_pipelining(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET /slow?s=0.1 HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                     b"GET /stream?n=2 HTTP/1.1\r\nHost: t\r\n\r\n")
        _, body1, rest = read_response(sock)
        _, body2, rest = read_response(sock, rest)
        head3, body3, rest = read_response(sock, rest)
        assert (body1, body2, body3) == (b"slow done", b"hello", b"part0\npart1\n")
        assert b"Transfer-Encoding: chunked" in head3
        # the connection is still usable afterwards
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock, rest)[1] == b"hello"


def test_small_response_is_one_write_with_content_length(server):
    head, body, _ = _get_raw(server, b"/")
    assert b"Content-Length: 5" in head
    assert body == b"hello"
    assert b"Connection" not in head  # HTTP/1.1 keep-alive is the default


def test_chunked_request_body(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        head, body, _ = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"abcdefg"


def test_large_streamed_request_body(server):
    size = 12 * 1024 * 1024

    def chunks():
        block = b"y" * 65536
        for _ in range(size // len(block)):
            yield block

    response = httpx.post(f"http://{server.host}:{server.port}/count", content=chunks(), timeout=30)
    assert response.text == str(size)


def test_streaming_request_and_response_together(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /stream-echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nfirst\r\n")
        data = b""
        while b"first" not in data:  # echoed before the request is complete
            data += sock.recv(4096)
        sock.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
        body = read_response(sock, data)[1]
    assert body == b"firstsecond"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_response_flow_control_keeps_memory_flat(server):
    """A client that does not read a 64 MB response: the app must wait, not buffer it all."""
    worker = wait_for(lambda: server.worker_pids())[0]
    before = _rss_kb(worker)
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(b"GET /big?mb=64 HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(1.0)
    grown = _rss_kb(worker) - before
    assert grown < 24 * 1024, f"worker grew by {grown} kB while the client was not reading"
    received = 0
    while received < 64 * 1024 * 1024:
        data = sock.recv(1 << 20)
        assert data
        received += len(data)
    sock.close()


def test_http_disconnect_reaches_the_app(server, tmp_path):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(b"GET /wait-disconnect HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    while b"waiting" not in data:  # (the head and the first chunk may come apart)
        more = sock.recv(4096)
        assert more, data
        data += more
    sock.close()
    wait_for(lambda: (tmp_path / "disconnect").exists(), 10, message="http.disconnect in the app")
    assert (tmp_path / "disconnect").read_text().strip() == "http.disconnect"


def test_keep_alive_timeout_closes_idle_connections(tiamat_server, http_impl):
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--keep-alive", "1", APP)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        _, body, rest = read_response(sock)
        assert body == b"hello" and rest == b""
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < 3.5


def test_keep_alive_zero_closes_after_each_response(tiamat_server, http_impl):
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--keep-alive", "0", APP)
    reply = server.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in reply


def test_limit_concurrency_answers_503(tiamat_server, http_impl):
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--limit-concurrency", "1", APP)
    before = server.worker_sockets()
    busy = socket.create_connection((server.host, server.port), timeout=5)
    busy.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    server.wait_accepted(before)
    time.sleep(0.1)  # (its request in the app: the loop reads it as soon as it is accepted)
    reply = server.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503")
    assert read_response(busy)[1] == b"slow done"
    busy.close()
    wait_for(lambda: server.request(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
             .startswith(b"HTTP/1.1 200"))


def test_pathsend(server):
    head, body, _ = _get_raw(server, b"/pathsend")
    assert head.startswith(b"HTTP/1.1 200")
    expected = Path("tests/apps/wk_asgi.py").read_bytes()
    assert b"Content-Length: %d" % len(expected) in head
    assert body == expected


def test_app_errors_are_500_and_the_worker_lives(server):
    for path in (b"/error", b"/nothing"):
        reply = server.request(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 500"), reply
    assert "Exception in ASGI application" in server.log()
    assert server.get("/")[2] == b"hello"


def test_head_and_204_framing(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"HEAD /head-length HTTP/1.1\r\nHost: t\r\n\r\n")
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        head, _, rest = buffer.partition(b"\r\n\r\n")
        assert b"Content-Length: 11" in head  # but no body follows
        assert rest == b""
        sock.sendall(b"GET /no-content HTTP/1.1\r\nHost: t\r\n\r\n")
        buffer = rest
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        head, _, rest = buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 204")
        assert b"Content-Length" not in head and b"chunked" not in head
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock, rest)[1] == b"hello"


def test_http10_closes_without_length(server):
    reply = server.request(b"GET /stream?n=2 HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in reply
    assert reply.endswith(b"part0\npart1\n")


def test_expect_100_continue(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"body")
        _, body, _ = read_response(sock, interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
        assert body == b"body"


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # no Host
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n", b"400"),
])
def test_protocol_errors_come_from_the_shared_core(server, raw, status):
    reply = server.request(raw)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:80]
    assert b"Connection: close" in reply


def test_body_larger_than_limit_is_413(tiamat_server, http_impl):
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--limit-request-body", "10", APP)
    reply = server.request(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world")
    assert reply.startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_both_event_loops(tiamat_server, loop):
    server = tiamat_server("-k", "asgi", "--loop", loop, APP)
    assert server.get("/")[2] == b"hello"
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        assert read_response(sock)[1] == b"abc"


def test_graceful_stop_finishes_in_flight_requests(server):
    before = server.worker_sockets()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    server.wait_accepted(before)
    server.signal(15)
    head, body, _ = read_response(sock)
    assert body == b"slow done"
    assert b"Connection: close" in head
    assert server.wait(10) == 0
    sock.close()


def test_a_request_sent_after_a_response_that_ends_during_the_stop_is_answered(server):
    """The response's head promised keep-alive before the stop came, so the client may send
    its next request as soon as the response ends: that request is read and answered (with
    ``Connection: close``), not met by a close."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        data, reply = server.stop_mid_response(
            sock, b"GET /stream-slow?s=2 HTTP/1.1\r\nHost: t\r\n\r\n", b"first", b"0\r\n\r\n",
            then=b"GET /slow?s=0 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b"Connection: close" not in data and b"last" in data
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slow done"), reply
    assert b"Connection: close" in reply
    assert server.wait(10) == 0


def test_pipelined_requests_during_the_stop_are_all_answered(server):
    """A stop that comes with two pipelined requests on a connection: both are answered
    (the second is already there: closing after the first would make the client send it
    again), the last with ``Connection: close``, then a clean close."""
    before = server.worker_sockets()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /slow?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /slow?s=0 HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_accepted(before)
        server.signal(15)
        data, end = read_to_end(sock)
    assert data.count(b"slow done") == 2 and end == "eof", (data, end)
    first, _, second = data.partition(b"slow done")
    assert b"Connection: close" not in first and b"Connection: close" in second
    assert server.wait(10) == 0


def test_a_websocket_upgrade_during_the_stop_is_refused(tiamat_server, http_impl):
    """A WebSocket session begun during a graceful stop would only hold the worker until
    the graceful timeout (and its kill): the upgrade is answered 503, and the worker ends
    at once."""
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--graceful-timeout", "20", APP)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        _, reply = server.stop_mid_response(
            sock, b"GET /stream-slow?s=2 HTTP/1.1\r\nHost: t\r\n\r\n", b"first", b"0\r\n\r\n",
            then=b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    ended = time.monotonic()
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert server.wait(10) == 0
    assert time.monotonic() - ended < 5  # (not the 20 s graceful timeout)
    assert "did not stop in time" not in server.log()


def test_max_requests_restarts_the_worker(tiamat_server):
    server = tiamat_server("-k", "asgi", "--max-requests", "3", APP)
    first = wait_for(lambda: server.worker_pids())[0]
    for _ in range(6):
        server.get("/")
    wait_for(lambda: server.worker_pids() and server.worker_pids()[0] != first, 10,
             message="a new worker after --max-requests")
    assert os.path.exists(f"/proc/{server.pid}")


def test_access_log(tiamat_server, http_impl):
    server = tiamat_server("-k", "asgi", "--http", http_impl, "--access-logfile", "-", APP)
    server.get("/stream?n=2")
    server.request(b"GET /error HTTP/1.1\r\nHost: t\r\nUser-Agent: probe\r\n\r\n")
    server.wait_log(r'"GET /stream\?n=2 HTTP/1\.1" 200 12 ')
    server.wait_log(r'"GET /error HTTP/1\.1" 500 - "-" "probe"')


def test_header_injection_is_refused(server):
    reply = server.request(b"GET /inject HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500")
    assert b"stolen" not in reply


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pathsend_large_file(tiamat_server, tmp_path, loop):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    server = tiamat_server("-k", "asgi", "--loop", loop, APP, env={"WK_SEND_FILE": str(big)})
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /pathsend?big=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        body = read_response(sock)[1]
        assert body == big.read_bytes()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # the connection is still usable
        assert read_response(sock)[1] == b"hello"


def test_worker_connections_stops_accepting(tiamat_server):
    """At --worker-connections the worker stops accepting; it starts again once one closes."""
    server = tiamat_server("-k", "asgi", "--worker-connections", "2", APP)
    held = []
    for _ in range(2):
        sock = socket.create_connection((server.host, server.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock)[1] == b"hello"
        held.append(sock)
    waiting = socket.create_connection((server.host, server.port), timeout=5)  # the backlog
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    waiting.settimeout(0.7)
    with pytest.raises(TimeoutError):
        waiting.recv(100)
    held.pop().close()
    waiting.settimeout(5)
    assert read_response(waiting)[1] == b"hello"
    for sock in [*held, waiting]:
        sock.close()


def test_pre_and_post_request_hooks(tiamat_server, tmp_path):
    marks = tmp_path / "hooks.log"
    config = tmp_path / "conf.py"
    config.write_text(
        "def pre_request(worker, req):\n"
        f"    open({str(marks)!r}, 'a').write('pre %s\\n' % req.path.decode())\n"
        "def post_request(worker, req, scope, resp):\n"
        f"    open({str(marks)!r}, 'a').write('post %s %s %s\\n' % (scope['path'], resp.status,"
        " resp.sent))\n")
    server = tiamat_server("-b", "127.0.0.1:0", "-c", str(config), "-k", "asgi", APP)
    server.get("/stream?n=2")
    wait_for(lambda: marks.exists() and "post /stream 200 12" in marks.read_text(), 5,
             message="post_request")
    assert "pre /stream" in marks.read_text()


@pytest.mark.parametrize(("path", "extra"), [("/expect", b"Expect: 100-continue\r\n"),
                                             ("/pathsend", b"")])
def test_an_app_still_running_after_its_request_is_refused_writes_nothing(tiamat_server, path,
                                                                           extra):
    # a malformed chunk arrives while the app sleeps: the server answers 400 and closes
    # lingering (write_eof).  The app's later receive() (which would write 100 Continue) or
    # pathsend must write nothing: a write after write_eof raised in the app
    server = tiamat_server("tests/apps/asgi_refused_mid_app.py:app", "-k", "asgi")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\n%sTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                     % (path.encode(), extra))
        data = read_until_closed(sock)
        # (kept open: the server is still lingering when the app wakes after 0.3 s)
        time.sleep(0.5)
    assert data.startswith(b"HTTP/1.1 400"), data[:100]
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-2000:]


def test_a_refused_client_that_stopped_reading_is_still_dropped(tiamat_server):
    # the app streams; the client reads nothing (the server's writes pause), then sends a
    # malformed chunk: refused while lingering, the connection must still be dropped after
    # --send-timeout (an abort), not wait for a close that never ends (its write buffer
    # never drains)
    server = tiamat_server("tests/apps/asgi_refused_mid_app.py:app", "-k", "asgi",
                           "--send-timeout", "1")
    (worker,) = server.worker_pids()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def held() -> bool:
        """Whether the worker still has a descriptor for its end of this connection."""
        client_port = sock.getsockname()[1]
        inodes = set()
        with open(f"/proc/{worker}/net/tcp") as table:
            for line in list(table)[1:]:
                fields = line.split()
                if (int(fields[1].split(":")[1], 16) == server.port
                        and int(fields[2].split(":")[1], 16) == client_port):
                    inodes.add(f"socket:[{fields[9]}]")
        return bool(inodes & {link for _, link in server.worker_sockets()})

    try:
        sock.connect((server.host, server.port))
        sock.sendall(b"POST /stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        wait_for(held, timeout=5, interval=0.05, message="the worker to take the connection")
        time.sleep(1.0)  # (the server's buffers fill: it stops writing)
        sock.sendall(b"zz\r\n")
        wait_for(lambda: not held(), timeout=8, interval=0.1,
                 message="the server to drop the stuck connection")
    finally:
        sock.close()


RAISES_ON_DISCONNECT = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RuntimeError("client gone")  # (as Starlette's Request.stream() does)
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
'''


def test_an_app_raising_on_the_refusal_does_not_cut_the_lingering_close(tiamat_server, tmp_path):
    """A body over the limit is refused (413, then the lingering close); the app reading it
    gets http.disconnect and raises.  Its failure must not close the connection under the
    client still uploading: that reset could destroy the 413 (it did within 0.13 s)."""
    (tmp_path / "raises.py").write_text(RAISES_ON_DISCONNECT)
    server = tiamat_server(f"{tmp_path / 'raises.py'}:app", "-k", "asgi",
                           "--limit-request-body", "100000")
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (16384, b"z" * 16384)
        deadline = time.monotonic() + 0.6  # (past the limit after 7 pieces, then on sending)
        failed = None
        try:
            while time.monotonic() < deadline:
                sock.sendall(piece)
                time.sleep(0.005)
        except OSError as exc:  # (the server's reset: it closed with our bytes unread)
            failed = exc
        data, ending = read_to_end(sock)
    assert failed is None, f"the upload was reset: {failed!r}"
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert ending == "eof"
