"""TLS with a certificate the test generates (trustme): https scheme, TLS 1.2 minimum,
client certificates, ciphers, the ssl_context hook, and a handshake that never blocks the
sync worker's loop."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from apps.sec_support import WORKERS, read_until_close, server_args, statuses
from conftest import ROOT, TiamatServer, wait_for

from tiamat.http.proxy_protocol import encode_v1, encode_v2

GET = b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


class Certs:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.certfile = tmp / "server.pem"
        self.keyfile = tmp / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.certfile))
        server.private_key_pem.write_to_path(str(self.keyfile))
        self.cafile = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        self.client = self.ca.issue_cert("client@example")

    def args(self) -> list[str]:
        return ["--certfile", str(self.certfile), "--keyfile", str(self.keyfile)]

    def context(self, client_cert: bool = False, max_version: ssl.TLSVersion | None = None
                ) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if client_cert:
            self.client.configure_cert(ctx)
        if max_version is not None:
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
        return ctx


def tls_exchange(server: TiamatServer, ctx: ssl.SSLContext, raw: bytes = GET,
                 timeout: float = 5) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=timeout) as raw_sock, \
            ctx.wrap_socket(raw_sock, server_hostname="127.0.0.1") as sock:
        sock.sendall(raw)
        return read_until_close(sock, timeout)


def start_tls(tmp: Path, certs: Certs, worker: str, *extra: str, ctx: ssl.SSLContext | None = None
              ) -> TiamatServer:
    srv = TiamatServer(["-b", "127.0.0.1:0", *server_args(worker, *certs.args(), *extra)], tmp)
    srv.start(wait=False)
    try:
        srv.wait_listening()
        context = ctx or certs.context()

        def answers() -> bool:
            try:
                return b"HTTP/1.1" in tls_exchange(srv, context, timeout=2)
            except OSError:
                return False

        wait_for(answers, 15, 0.05, "the TLS server to answer")
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=WORKERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           certs: Certs) -> Iterator[TiamatServer]:
    srv = start_tls(tmp_path_factory.mktemp("tls"), certs, request.param)
    srv.worker = request.param  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def body_json(data: bytes) -> dict[str, object]:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def test_https_scheme(server: TiamatServer, certs: Certs) -> None:
    data = tls_exchange(server, certs.context())
    assert statuses(data) == [200]
    assert body_json(data)["scheme"] == "https"


def test_keep_alive_and_bodies_over_tls(server: TiamatServer, certs: Certs) -> None:
    body = b"p" * 200_000
    post = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    data = tls_exchange(server, certs.context(), post + GET)
    assert statuses(data) == [200, 200]
    assert b'"body_len": 200000' in data


def test_file_wrapper_over_tls(server: TiamatServer, certs: Certs) -> None:
    if server.worker == "asgi":  # type: ignore[attr-defined]
        return  # wsgi.file_wrapper is WSGI's
    data = tls_exchange(server, certs.context(), GET.replace(b"/echo", b"/file"))
    assert data.split(b"\r\n\r\n", 1)[1] == (ROOT / "tests/apps/sec_app.py").read_bytes()


def test_tls_1_2_accepted_1_1_refused(server: TiamatServer, certs: Certs) -> None:
    assert statuses(tls_exchange(server, certs.context(max_version=ssl.TLSVersion.TLSv1_2))) == [200]
    try:
        old = certs.context(max_version=ssl.TLSVersion.TLSv1_1)
    except (ValueError, ssl.SSLError):
        return  # this OpenSSL cannot even offer TLS 1.1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls_exchange(server, old)


def test_plain_http_on_a_tls_port_gets_nothing(server: TiamatServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(GET)
        assert b"200 OK" not in read_until_close(sock, 5)


def test_slow_handshakes_do_not_block_the_worker(tmp_path_factory: pytest.TempPathFactory,
                                                 certs: Certs) -> None:
    srv = start_tls(tmp_path_factory.mktemp("tls-slow"), certs, "sync")
    stalled = []
    try:
        for i in range(30):
            sock = socket.create_connection((srv.host, srv.port), timeout=5)
            if i % 2:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then silence
            stalled.append(sock)
        time.sleep(0.2)
        start = time.monotonic()
        for _ in range(5):
            assert statuses(tls_exchange(srv, certs.context())) == [200]
        assert time.monotonic() - start < 2.5
    finally:
        for sock in stalled:
            sock.close()
        srv.stop()


def test_handshake_bounded_by_header_timeout(tmp_path_factory: pytest.TempPathFactory,
                                             certs: Certs) -> None:
    srv = start_tls(tmp_path_factory.mktemp("tls-hto"), certs, "sync", "--header-timeout", "1")
    try:
        start = time.monotonic()
        with socket.create_connection((srv.host, srv.port), timeout=6) as sock:
            sock.sendall(b"\x16\x03\x01")
            read_until_close(sock, 6)
        assert time.monotonic() - start < 4
    finally:
        srv.stop()


@pytest.mark.parametrize("worker", WORKERS)
def test_client_certificates_required(tmp_path_factory: pytest.TempPathFactory, certs: Certs,
                                      worker: str) -> None:
    srv = start_tls(tmp_path_factory.mktemp("mtls"), certs, worker, "--cert-reqs", "2",
                    "--ca-certs", str(certs.cafile), ctx=certs.context(client_cert=True))
    try:
        assert statuses(tls_exchange(srv, certs.context(client_cert=True))) == [200]
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            data = tls_exchange(srv, certs.context())
            assert b"200 OK" not in data
            raise ssl.SSLError("no response without a client certificate")
    finally:
        srv.stop()


def test_ciphers(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> None:
    allowed = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    srv = start_tls(tmp_path_factory.mktemp("ciphers"), certs, "sync", "--ciphers", allowed)
    try:
        ctx = certs.context(max_version=ssl.TLSVersion.TLSv1_2)
        with socket.create_connection((srv.host, srv.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            cipher = sock.cipher()
        assert cipher is not None and cipher[0] in allowed.split(":")
        ctx.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            tls_exchange(srv, ctx)
    finally:
        srv.stop()


def test_ssl_context_hook(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> None:
    tmp = tmp_path_factory.mktemp("hook")
    conf = tmp / "conf.py"
    conf.write_text(
        "import ssl\n"
        "def ssl_context(config, default_factory):\n"
        "    ctx = default_factory()\n"
        "    ctx.minimum_version = ssl.TLSVersion.TLSv1_3\n"
        "    return ctx\n")
    srv = start_tls(tmp, certs, "sync", "-c", str(conf))
    try:
        assert statuses(tls_exchange(srv, certs.context())) == [200]
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            tls_exchange(srv, certs.context(max_version=ssl.TLSVersion.TLSv1_2))
    finally:
        srv.stop()


# --- PROXY protocol header, then the TLS handshake (every worker class) -------------------------
V1 = encode_v1(("203.0.113.5", 1000), ("198.51.100.2", 443))
V2 = encode_v2(("203.0.113.6", 1001), ("198.51.100.3", 8443))
V2_6 = encode_v2(("2001:db8::6", 1002), ("2001:db8::1", 443))


def proxied_tls_exchange(server: TiamatServer, ctx: ssl.SSLContext, header: bytes,
                         raw: bytes = GET) -> bytes:
    """Send ``header`` in the clear, then speak TLS on the same connection."""
    with socket.create_connection((server.host, server.port), timeout=5) as plain:
        plain.sendall(header)
        with ctx.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
            sock.sendall(raw)
            return read_until_close(sock)


@pytest.fixture(scope="module", params=[*WORKERS, "asgi-asyncio"])
def proxied(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            certs: Certs) -> Iterator[TiamatServer]:
    """TLS with ``--proxy-protocol auto`` (so the readiness probe needs no header); the asgi
    class also on the stdlib loop, whose TLS transport hands over the protocol differently."""
    worker, _, loop = request.param.partition("-")
    srv = start_tls(tmp_path_factory.mktemp("tls-pp"), certs, worker, "--proxy-protocol", "auto",
                    "--header-timeout", "2", *(["--loop", loop] if loop else []))
    yield srv
    srv.stop()


@pytest.mark.parametrize(("header", "client", "server_addr"), [
    (V1, ("203.0.113.5", "1000"), ("198.51.100.2", "443")),
    (V2, ("203.0.113.6", "1001"), ("198.51.100.3", "8443")),
    (V2_6, ("2001:db8::6", "1002"), ("2001:db8::1", "443"))], ids=["v1", "v2", "v2-ipv6"])
def test_proxy_header_before_the_handshake(proxied: TiamatServer, certs: Certs, header: bytes,
                                           client: tuple[str, str],
                                           server_addr: tuple[str, str]) -> None:
    keep_alive = GET.replace(b"Connection: close\r\n", b"")
    data = proxied_tls_exchange(proxied, certs.context(), header, keep_alive + GET)
    assert statuses(data) == [200, 200], data[:300]
    info = body_json(data.split(b"HTTP/1.1 200", 2)[1])
    assert (info["remote_addr"], info["remote_port"]) == client
    assert (info["server_name"], info["server_port"]) == server_addr
    assert info["scheme"] == "https"


def test_proxy_auto_without_header_over_tls(proxied: TiamatServer, certs: Certs) -> None:
    assert body_json(tls_exchange(proxied, certs.context()))["remote_addr"] == "127.0.0.1"
    local = proxied_tls_exchange(proxied, certs.context(), encode_v2(None, None))
    assert body_json(local)["remote_addr"] == "127.0.0.1"


def test_malformed_proxy_header_before_tls_closes(proxied: TiamatServer) -> None:
    with socket.create_connection((proxied.host, proxied.port), timeout=5) as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4 ::1 1 80\r\n\x16\x03\x01")
        assert read_until_close(sock, 5) == b""


def test_slow_proxy_header_is_timed_out(proxied: TiamatServer, certs: Certs) -> None:
    """--header-timeout (2 s here) bounds the header; other clients are served meanwhile."""
    stalled = []
    try:
        # part of a v1 header, nothing at all, part of a v2 header
        for piece in (b"PROXY TCP4 203.0", b"", V2[:20]):
            sock = socket.create_connection((proxied.host, proxied.port), timeout=8)
            if piece:
                sock.sendall(piece)
            stalled.append(sock)
        start = time.monotonic()
        assert statuses(proxied_tls_exchange(proxied, certs.context(), V1)) == [200]
        assert time.monotonic() - start < 1.5
        for sock in stalled:
            assert read_until_close(sock, 8) == b""
        assert time.monotonic() - start < 6
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("worker", WORKERS)
def test_proxy_header_from_a_peer_not_allowed(tmp_path_factory: pytest.TempPathFactory,
                                              certs: Certs, worker: str) -> None:
    """A peer outside --proxy-allow-from speaks TLS at once: its PROXY header breaks the
    handshake, and without one it is served under its own address."""
    srv = start_tls(tmp_path_factory.mktemp("tls-pp-deny"), certs, worker, "--proxy-protocol",
                    "v1", "--proxy-allow-from", "10.0.0.1")
    try:
        assert body_json(tls_exchange(srv, certs.context()))["remote_addr"] == "127.0.0.1"
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            data = proxied_tls_exchange(srv, certs.context(), V1)
            assert b"203.0.113.5" not in data
            raise ssl.SSLError("no response after a PROXY header from a peer not allowed")
    finally:
        srv.stop()


@pytest.mark.parametrize("worker", WORKERS)
def test_required_proxy_header_before_tls(tmp_path_factory: pytest.TempPathFactory, certs: Certs,
                                          worker: str) -> None:
    """``--proxy-protocol v2`` with TLS: a v2 header is required before the ClientHello."""
    tmp = tmp_path_factory.mktemp("tls-pp-v2")
    srv = TiamatServer(["-b", "127.0.0.1:0", *server_args(worker, *certs.args(),
                                                          "--proxy-protocol", "v2")], tmp)
    srv.start(wait=False)
    try:
        srv.wait_listening()

        def answers() -> bool:
            try:
                return b"203.0.113.6" in proxied_tls_exchange(srv, certs.context(), V2)
            except OSError:
                return False

        wait_for(answers, 15, 0.05, "the TLS server to answer behind a v2 header")
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            data = tls_exchange(srv, certs.context())
            assert b"200 OK" not in data
            raise ssl.SSLError("no response without the required header")
    finally:
        srv.stop()


def test_asgi_proxy_tls_set_ups_count_as_connections(tmp_path_factory: pytest.TempPathFactory,
                                                     certs: Certs) -> None:
    """asgi: a connection still before its PROXY header counts against --worker-connections
    (the next client waits in the backlog until the stalled ones time out)."""
    srv = start_tls(tmp_path_factory.mktemp("tls-pp-wc"), certs, "asgi", "--proxy-protocol", "auto",
                    "--worker-connections", "2", "--header-timeout", "2")
    stalled = []
    try:
        stalled = [socket.create_connection((srv.host, srv.port), timeout=8) for _ in range(2)]
        start = time.monotonic()
        assert statuses(proxied_tls_exchange(srv, certs.context(), V1)) == [200]
        assert time.monotonic() - start > 1.0
        for sock in stalled:
            assert read_until_close(sock, 8) == b""
    finally:
        for sock in stalled:
            sock.close()
        srv.stop()


def test_asgi_graceful_stop_does_not_wait_for_a_silent_connection(
        tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> None:
    """asgi, PROXY and TLS: a connection that sent nothing does not hold a graceful stop for
    --header-timeout (it gets the same short grace as an idle HTTP connection)."""
    srv = start_tls(tmp_path_factory.mktemp("tls-pp-stop"), certs, "asgi", "--proxy-protocol",
                    "auto", "--header-timeout", "10")
    try:
        with socket.create_connection((srv.host, srv.port), timeout=12) as silent:
            # answered after the silent one was accepted (the worker accepts in order)
            assert statuses(proxied_tls_exchange(srv, certs.context(), V1)) == [200]
            start = time.monotonic()
            srv.signal(signal.SIGTERM)
            assert srv.wait(12) == 0
            assert time.monotonic() - start < 6
            assert read_until_close(silent, 2) == b""
    finally:
        srv.stop()


def test_asgi_graceful_stop_answers_a_client_still_in_its_handshake(
        tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> None:
    """asgi with sibling workers accepts each socket itself and hands it to the loop, where
    the TLS handshake runs: a client accepted just before a graceful stop and still in its
    handshake gets STOP_GRACE for its request like any new connection (cancelled with the
    hand-off, it was closed unanswered)."""
    srv = start_tls(tmp_path_factory.mktemp("tls-stop-hs"), certs, "asgi", "-w", "2")
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as raw:
            # accepted at once (a worker watches the listener), the handshake not begun
            assert srv.worker_pids() and len(srv.worker_pids()) == 2
            srv.signal(signal.SIGTERM)
            srv.wait_log(r"Shutting down")
            # (every process closed the listener: the workers' stop has begun, and from
            # then on STOP_GRACE, 0.5 s, counts)
            wait_for(srv.refuses, interval=0.005, message="the listener closed")
            with certs.context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(GET)
                assert statuses(read_until_close(sock, 5)) == [200]
        assert srv.wait(15) == 0
    finally:
        srv.stop()
