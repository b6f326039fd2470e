"""Forwarded headers: applied only from --forwarded-allow-ips peers, ignored from others.

The test client is always 127.0.0.1, so "untrusted" is simulated by a trust list that
does not contain it.  What the app sees is read back from the echo app (REMOTE_ADDR,
wsgi.url_scheme, HTTP_HOST / SERVER_NAME; for ASGI the scope's client, scheme, server).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apps.sec_support import WORKERS, echo, start_server
from conftest import TiamatServer

from tiamat.http.proxy import ForwardedRules, apply_to_environ, apply_to_scope

XFF = {"X-Forwarded-For": "203.0.113.7, 127.0.0.1", "X-Forwarded-Proto": "https",
       "X-Forwarded-Host": "public.example:8443"}


def start(tmp_path_factory: pytest.TempPathFactory, worker: str, *args: str) -> TiamatServer:
    srv = start_server(tmp_path_factory.mktemp("fwd"), worker, *args)
    srv.worker = worker  # type: ignore[attr-defined]
    return srv


@pytest.fixture(scope="module", params=WORKERS)
def trusted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[TiamatServer]:
    """The default trust list (127.0.0.1, ::1): the test client is a trusted proxy."""
    srv = start(tmp_path_factory, request.param)
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=WORKERS)
def untrusted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[TiamatServer]:
    srv = start(tmp_path_factory, request.param, "--forwarded-allow-ips", "10.0.0.1,192.168.0.0/16")
    yield srv
    srv.stop()


def test_trusted_peer_x_forwarded(trusted: TiamatServer) -> None:
    info = echo(trusted, XFF)
    assert info["remote_addr"] == "203.0.113.7"
    assert info["scheme"] == "https"
    assert info["server_name"] == "public.example"
    assert info["server_port"] == "8443"
    if trusted.worker != "asgi":  # type: ignore[attr-defined]
        assert info["host"] == "public.example:8443"


def test_untrusted_peer_headers_ignored(untrusted: TiamatServer) -> None:
    info = echo(untrusted, {**XFF, "Forwarded": "for=198.51.100.1;proto=https;host=evil"})
    assert info["remote_addr"] == "127.0.0.1"
    assert info["scheme"] == "http"
    assert info["server_name"] != "public.example"
    assert info["host"] == "t"
    # the headers themselves still reach the app, untouched
    assert info["headers"]["HTTP_X_FORWARDED_FOR"] == XFF["X-Forwarded-For"]


def test_trusted_peer_rfc7239_forwarded(trusted: TiamatServer) -> None:
    info = echo(trusted, {"Forwarded": 'for="[2001:db8::17]:4711";proto=https;host=fw.example',
                          "X-Forwarded-For": "203.0.113.9"})
    assert info["remote_addr"] == "2001:db8::17"
    assert info["scheme"] == "https"
    assert info["server_name"] == "fw.example"


def test_secure_scheme_header(trusted: TiamatServer) -> None:
    assert echo(trusted, {"X-Forwarded-Ssl": "on"})["scheme"] == "https"


def test_underscore_spelling_cannot_pose_as_x_forwarded_for(trusted: TiamatServer) -> None:
    info = echo(trusted, {"X_Forwarded_For": "6.6.6.6"})
    assert info["remote_addr"] == "127.0.0.1"
    if trusted.worker != "asgi":  # type: ignore[attr-defined]
        assert "HTTP_X_FORWARDED_FOR" not in info["headers"]


@pytest.mark.parametrize("allow", ["127.0.0.0/8", "*", "10.0.0.1, 127.0.0.1"])
def test_cidr_and_star(tmp_path_factory: pytest.TempPathFactory, allow: str) -> None:
    srv = start(tmp_path_factory, "sync", "--forwarded-allow-ips", allow)
    try:
        assert echo(srv, XFF)["remote_addr"] == "203.0.113.7"
    finally:
        srv.stop()


def test_env_var_sets_the_trust_list(tmp_path_factory: pytest.TempPathFactory) -> None:
    from apps.sec_support import server_args
    from conftest import TiamatServer as Server

    srv = Server(["-b", "127.0.0.1:0", *server_args("sync")], tmp_path_factory.mktemp("env"),
                 env={"FORWARDED_ALLOW_IPS": "10.9.9.9"})
    try:
        srv.start()
        assert echo(srv, XFF)["remote_addr"] == "127.0.0.1"
    finally:
        srv.stop()


# --- the rule itself (tiamat.http.proxy), as both WSGI and ASGI apply it ----------------------
RULES = ForwardedRules(["127.0.0.1", "10.0.0.0/8"], {"X-FORWARDED-SSL": "on"})


@pytest.mark.parametrize(("headers", "client", "scheme", "host"), [
    ([(b"x-forwarded-for", b"1.2.3.4")], ("1.2.3.4", 0), None, None),
    # the rightmost untrusted address wins: a client cannot forge its way past our proxy
    ([(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.0.0.3")], ("1.2.3.4", 0), None, None),
    ([(b"x-forwarded-for", b"10.0.0.2, 10.0.0.3")], ("10.0.0.2", 0), None, None),
    ([(b"x-forwarded-for", b"garbage")], None, None, None),
    ([(b"x-forwarded-proto", b"https")], None, "https", None),
    ([(b"x-forwarded-proto", b"javascript")], None, None, None),
    ([(b"x-forwarded-ssl", b"on")], None, "https", None),
    ([(b"x-forwarded-host", b"a.example")], None, None, "a.example"),
    ([(b"x-forwarded-host", b"bad host\x00")], None, None, None),
    ([(b"forwarded", b'for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711"')],
     ("2001:db8:cafe::17", 4711), None, None),
    ([(b"forwarded", b"for=unknown;proto=https")], None, "https", None),
    ([(b"forwarded", b"for=1.1.1.1;host=h.example, for=10.0.0.9;host=inner")], ("1.1.1.1", 0),
     None, "h.example"),
])
def test_resolve(headers: list[tuple[bytes, bytes]], client: object, scheme: object,
                 host: object) -> None:
    result = RULES.resolve(headers)
    assert (result.client, result.scheme, result.host) == (client, scheme, host)


def test_trusts() -> None:
    assert RULES.trusts("127.0.0.1") and RULES.trusts("10.200.0.1")
    assert RULES.trusts("::ffff:10.0.0.1")
    assert not RULES.trusts("11.0.0.1") and not RULES.trusts("::1") and not RULES.trusts("bogus")
    assert RULES.trusts(None)  # a Unix-socket peer: only local processes can connect
    assert ForwardedRules(["*"]).trusts("8.8.8.8")


def test_apply_to_environ_and_scope_agree() -> None:
    headers = [(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-proto", b"https"),
               (b"x-forwarded-host", b"h.example")]
    environ = {"wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5",
               "HTTP_HOST": "x", "SERVER_NAME": "x", "SERVER_PORT": "80"}
    environ.update({"HTTP_X_FORWARDED_FOR": "1.2.3.4", "HTTP_X_FORWARDED_PROTO": "https",
                    "HTTP_X_FORWARDED_HOST": "h.example"})  # as build_environ puts them
    apply_to_environ(environ, headers, RULES)
    assert (environ["REMOTE_ADDR"], environ["wsgi.url_scheme"], environ["HTTP_HOST"],
            environ["SERVER_NAME"], environ["SERVER_PORT"]) == \
        ("1.2.3.4", "https", "h.example", "h.example", "443")
    client, scheme, server = apply_to_scope(headers, ("127.0.0.1", 5), "http", ("x", 80), RULES)
    assert (client, scheme, server) == (("1.2.3.4", 0), "https", ("h.example", 443))
    assert apply_to_scope(headers, None, "ws", None, RULES)[1] == "wss"
