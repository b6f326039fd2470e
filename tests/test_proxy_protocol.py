"""PROXY protocol v1/v2 (``--proxy-protocol``, ``--proxy-allow-from``), parsed before HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from apps.sec_support import WORKERS, exchange, read_until_close, start_server, statuses
from conftest import TiamatServer

from tiamat.http import proxy_protocol as pp

GET = b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
V1 = pp.encode_v1(("203.0.113.5", 40000), ("198.51.100.2", 443))
V2 = pp.encode_v2(("203.0.113.6", 40001), ("198.51.100.3", 8443), tlvs=b"\x04\x00\x01x")
V2_6 = pp.encode_v2(("2001:db8::5", 40002), ("2001:db8::1", 80))


def start(tmp_path_factory: pytest.TempPathFactory, worker: str, *args: str,
          probe: bytes | None = None) -> TiamatServer:
    return start_server(tmp_path_factory.mktemp("pp"), worker, *args, probe=probe)


@pytest.fixture(scope="module", params=WORKERS)
def auto(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[TiamatServer]:
    srv = start(tmp_path_factory, request.param, "--proxy-protocol", "auto")
    yield srv
    srv.stop()


@pytest.mark.parametrize(("header", "addr", "port"), [
    (V1, "203.0.113.5", "40000"), (V2, "203.0.113.6", "40001"), (V2_6, "2001:db8::5", "40002")])
def test_header_sets_the_client(auto: TiamatServer, header: bytes, addr: str, port: str) -> None:
    data = exchange(auto, header + GET)
    assert statuses(data) == [200], data[:200]
    assert f'"remote_addr": "{addr}"'.encode() in data
    assert f'"remote_port": "{port}"'.encode() in data


def test_auto_without_header(auto: TiamatServer) -> None:
    data = exchange(auto, GET)
    assert statuses(data) == [200] and b'"remote_addr": "127.0.0.1"' in data


def test_v2_local_keeps_the_peer(auto: TiamatServer) -> None:
    data = exchange(auto, pp.encode_v2(None, None) + GET)
    assert statuses(data) == [200] and b'"remote_addr": "127.0.0.1"' in data


def test_header_in_pieces(auto: TiamatServer) -> None:
    with socket.create_connection((auto.host, auto.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(V2)):
            sock.send(V2[i:i + 1])
            time.sleep(0.002)
        sock.sendall(GET)
        data = read_until_close(sock)
    assert b'"remote_addr": "203.0.113.6"' in data


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n",
    b"PROXY TCP4 1.2.3.4 ::1 1 80\r\n",
    b"PROXY TCP9 1.2.3.4 5.6.7.8 1 80\r\n",
    b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
    pp.V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
])
def test_malformed_header_closes(auto: TiamatServer, bad: bytes) -> None:
    data = exchange(auto, bad + GET)
    assert b"200 OK" not in data


@pytest.mark.parametrize("worker", WORKERS)
def test_required_header_missing_closes(tmp_path_factory: pytest.TempPathFactory, worker: str) -> None:
    srv = start(tmp_path_factory, worker, "--proxy-protocol", "v1", probe=V1)
    try:
        assert b"200 OK" not in exchange(srv, GET)
        assert b"203.0.113.5" in exchange(srv, V1 + GET)
    finally:
        srv.stop()


@pytest.mark.parametrize("worker", WORKERS)
def test_header_from_a_peer_not_allowed_is_not_honoured(tmp_path_factory: pytest.TempPathFactory,
                                                        worker: str) -> None:
    srv = start(tmp_path_factory, worker, "--proxy-protocol", "v1", "--proxy-allow-from", "10.0.0.1")
    try:
        data = exchange(srv, V1 + GET)
        assert b"203.0.113.5" not in data
        assert statuses(data) and statuses(data)[0] >= 400
    finally:
        srv.stop()


def test_forwarded_trust_follows_the_proxied_client(auto: TiamatServer) -> None:
    """Behind PROXY protocol, X-Forwarded-For counts only if the *announced* client is trusted."""
    spoof = GET.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    assert b'"remote_addr": "203.0.113.5"' in exchange(auto, V1 + spoof)
    local = pp.encode_v1(("127.0.0.1", 1234), ("127.0.0.1", 80))
    assert b'"remote_addr": "6.6.6.6"' in exchange(auto, local + spoof)


# --- the parser on its own -----------------------------------------------------------------------
def test_parse_incremental() -> None:
    for header in (V1, V2, V2_6):
        for cut in range(len(header)):
            assert pp.parse(header[:cut], "auto") is None
        result = pp.parse(header + b"GET", "auto")
        assert result is not None and result.length == len(header)


def test_parse_modes() -> None:
    assert pp.parse(b"GET / HTTP/1.1\r\n", "auto") == pp.NOT_PROXY
    with pytest.raises(pp.ProxyProtocolError):
        pp.parse(b"GET / HTTP/1.1\r\n", "v1")
    with pytest.raises(pp.ProxyProtocolError):
        pp.parse(V1, "v2")
    with pytest.raises(pp.ProxyProtocolError):
        pp.parse(V2, "v1")
    assert pp.parse(b"PROXY UNKNOWN\r\n", "v1") == pp.ProxyHeader(15, None, None)
