"""The request readers on their own: one corpus of good and bad requests, both tokenisers.

Every case is fed whole, one byte at a time and split at every offset, to the llhttp
reader and to the h11 reader; all must give the same verdict, and the verdict must be the
expected one.  The server tests (test_http_framing.py ...) then check the same rules over
real sockets.
"""

from __future__ import annotations

import pytest

from tiamat.http.errors import ProtocolError
from tiamat.http.h1 import END_OF_MESSAGE, KNOWN_METHODS, Limits, RequestHead, RequestReader
from tiamat.http.h11_reader import H11RequestReader

READERS = [RequestReader, H11RequestReader]

H = b"Host: a\r\n"
CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
CL1 = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"

#: name -> (request bytes, expected): an int status for a rejection, or the body bytes the
#: app would receive for an accepted request
CORPUS: dict[str, tuple[bytes, int | bytes]] = {
    "simple get": (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b""),
    "http/1.0 without host": (b"GET / HTTP/1.0\r\n\r\n", b""),
    "leading empty line": (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", b""),
    "content-length body": (CL1, b"x"),
    "chunked body": (CHUNKED + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
    "chunked upper case": (CHUNKED.replace(b"chunked", b"CHUNKED") + b"1\r\nx\r\n0\r\n\r\n", b"x"),
    "chunk extension": (CHUNKED + b"1;a=b;c=\"d e\"\r\nx\r\n0\r\n\r\n", b"x"),
    "chunk 16 digits": (CHUNKED + b"0000000000000001\r\nx\r\n0\r\n\r\n", b"x"),
    "trailer": (CHUNKED + b"1\r\nx\r\n0\r\nX-T: 1\r\n\r\n", b"x"),
    "obs-text value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xe9\r\n\r\n", b""),
    "absolute form": (b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\n\r\n", b""),
    "asterisk form": (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", b""),
    "ows around value": (b"GET / HTTP/1.1\r\nHost: \t a \t\r\n\r\n", b""),
    # --- framing -------------------------------------------------------------------------
    "te and cl": (CHUNKED[:-2] + b"Content-Length: 3\r\n\r\n0\r\n\r\n", 400),
    "cl and te": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te nbsp chunked": (CHUNKED.replace(b" chunked", b" \xa0chunked") + b"0\r\n\r\n", 400),
    "te chunked nel": (CHUNKED.replace(b"chunked", b"chunked\x85") + b"0\r\n\r\n", 400),
    "te gzip": (CHUNKED.replace(b"chunked", b"gzip"), 400),
    "te gzip then chunked": (CHUNKED.replace(b"chunked", b"gzip, chunked") + b"0\r\n\r\n", 501),
    "te chunked then gzip": (CHUNKED.replace(b"chunked", b"chunked, gzip"), 400),
    "te chunked twice": (CHUNKED.replace(b"chunked", b"chunked, chunked") + b"0\r\n\r\n", 400),
    "te two fields": (CHUNKED[:-2] + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te in http/1.0": (CHUNKED.replace(b"1.1", b"1.0") + b"0\r\n\r\n", 400),
    "te identity": (CHUNKED.replace(b"chunked", b"identity"), 400),
    "cl twice equal": (CL1.replace(b"\r\n\r\n", b"\r\nContent-Length: 1\r\n\r\n"), 400),
    "cl twice differing": (CL1.replace(b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\n"), 400),
    "cl list equal": (CL1.replace(b": 1", b": 1, 1"), 400),
    "cl list differing": (CL1.replace(b": 1", b": 1, 2"), 400),
    "cl plus": (CL1.replace(b": 1", b": +1"), 400),
    "cl minus": (CL1.replace(b": 1", b": -1"), 400),
    "cl underscore": (CL1.replace(b": 1", b": 1_0"), 400),
    "cl arabic digit": (CL1.replace(b": 1", ": \u0661".encode()), 400),
    "cl hex": (CL1.replace(b": 1", b": 0x1"), 400),
    "cl empty": (CL1.replace(b": 1", b":"), 400),
    "cl inner space": (CL1.replace(b": 1", b": 1 0"), 400),
    "cl overflow": (CL1.replace(b": 1", b": 99999999999999999999999"), 400),
    "chunk 0x": (CHUNKED + b"0x1\r\nx\r\n0\r\n\r\n", 400),
    "chunk plus": (CHUNKED + b"+1\r\nx\r\n0\r\n\r\n", 400),
    "chunk underscore": (CHUNKED + b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400),
    "chunk leading space": (CHUNKED + b" 1\r\nx\r\n0\r\n\r\n", 400),
    "chunk trailing space": (CHUNKED + b"1 \r\nx\r\n0\r\n\r\n", 400),
    "chunk tab before ext": (CHUNKED + b"1\t;a=b\r\nx\r\n0\r\n\r\n", 400),
    "chunk 17 digits": (CHUNKED + b"00000000000000001\r\nx\r\n0\r\n\r\n", 400),
    "chunk overflow": (CHUNKED + b"fffffffffffffffff\r\nx\r\n0\r\n\r\n", 400),
    "chunk empty size": (CHUNKED + b"\r\nx\r\n0\r\n\r\n", 400),
    "chunk data too long": (CHUNKED + b"1\r\nxy\r\n0\r\n\r\n", 400),
    "chunk data then lf": (CHUNKED + b"1\r\nx\n0\r\n\r\n", 400),
    "chunk size bare lf": (CHUNKED + b"1\nx\r\n0\r\n\r\n", 400),
    "chunk last bare lf": (CHUNKED + b"1\r\nx\r\n0\r\n\n", 400),
    "chunk extension too long": (CHUNKED + b"1;a=" + b"b" * 5000 + b"\r\nx\r\n0\r\n\r\n", 400),
    "chunk extension bad": (CHUNKED + b"1;a b\r\nx\r\n0\r\n\r\n", 400),
    "trailer bad": (CHUNKED + b"1\r\nx\r\n0\r\nX T: 1\r\n\r\n", 400),
    # --- line endings, fields ---------------------------------------------------------------
    "bare cr in head": (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    "bare cr in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    "bare lf after request line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    "bare lf after field": (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    "bare lf ending the head": (b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    "bare lf everywhere": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "obs-fold space": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    "obs-fold tab": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n", 400),
    "tab before colon": (b"GET / HTTP/1.1\r\nHost: a\r\nX\t: b\r\n\r\n", 400),
    "space before first field": (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    "empty field name": (b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400),
    "field name with parens": (b"GET / HTTP/1.1\r\nHost: a\r\nX(y): b\r\n\r\n", 400),
    "field name with at": (b"GET / HTTP/1.1\r\nHost: a\r\nX@y: b\r\n\r\n", 400),
    "field name 8-bit": (b"GET / HTTP/1.1\r\nHost: a\r\nX\xffy: b\r\n\r\n", 400),
    "field without colon": (b"GET / HTTP/1.1\r\nHost: a\r\nXy\r\n\r\n", 400),
    "nul in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "ctl in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    "del in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
    "no host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "two hosts http/1.0": (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # --- request line -----------------------------------------------------------------------
    "method with parens": (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "method empty": (b" / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "method unknown token": (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "method lower case": (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "method rtsp": (b"DESCRIBE / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "version 1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    "version 2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    "version 3.0": (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 400),
    "version 0.9": (b"GET /\r\n\r\n", 400),
    "version lower case": (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    "version 11": (b"GET / HTTP/11\r\nHost: a\r\n\r\n", 400),
    "version 1.10": (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
    "version missing": (b"GET / \r\nHost: a\r\n\r\n", 400),
    "two spaces": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "ctl in target": (b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "8-bit in target": (b"GET /a\xffb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "trailing space after version": (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
}


def read_all(cls: type[RequestReader], data: bytes, step: int = 0, limits: Limits | None = None,
             eof: bool = True) -> tuple[int | bytes, list[object]]:
    """Feed ``data`` (whole, or ``step`` bytes at a time); the verdict and the events."""
    reader = cls(limits or Limits())
    if step:
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
    else:
        reader.feed(data)
    if eof:
        reader.feed_eof()
    events = list(reader.events)
    for event in events:
        if isinstance(event, ProtocolError):
            return event.status, events
    assert events, "no events"
    assert isinstance(events[0], RequestHead)
    assert events[-1] is END_OF_MESSAGE, events
    return b"".join(e for e in events if isinstance(e, bytes)), events


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_same_verdict_whole_and_bytewise(name: str) -> None:
    data, expected = CORPUS[name]
    for cls in READERS:
        for step in (0, 1, 7):
            verdict, _ = read_all(cls, data, step)
            assert verdict == expected, f"{cls.__name__} step={step}: {verdict!r} != {expected!r}"


@pytest.mark.parametrize("name", [n for n, (d, _) in CORPUS.items() if len(d) < 120])
def test_corpus_split_at_every_offset(name: str) -> None:
    data, expected = CORPUS[name]
    for cls in READERS:
        for cut in range(1, len(data)):
            reader = cls()
            reader.feed(data[:cut])
            reader.feed(data[cut:])
            reader.feed_eof()
            errors = [e for e in reader.events if isinstance(e, ProtocolError)]
            if isinstance(expected, int):
                assert errors and errors[0].status == expected, (cls.__name__, cut)
            else:
                assert not errors, (cls.__name__, cut, errors)


def test_obs_fold_permitted_is_unfolded() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\tc\r\n\r\n"
    for cls in READERS:
        verdict, events = read_all(cls, data, limits=Limits(permit_obs_fold=True))
        assert verdict == b""
        assert (b"x", b"a b c") in events[0].headers  # type: ignore[attr-defined]


def test_nothing_after_a_rejected_request() -> None:
    bad = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    good = b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
    for cls in READERS:
        reader = cls()
        reader.feed(good + bad + good)
        kinds = [type(e).__name__ for e in reader.events]
        assert kinds == ["RequestHead", "_EndOfMessage", "ProtocolError"]
        reader.feed(good)
        assert len(reader.events) == 3 and reader.broken


def test_pipelined_requests_in_one_feed() -> None:
    one = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    two = CHUNKED.replace(b"/ ", b"/b ") + b"2\r\nde\r\n0\r\n\r\n"
    three = b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
    for cls in READERS:
        for step in (0, 1, 5):
            reader = cls()
            data = one + two + three
            for i in range(0, len(data), step or len(data)):
                reader.feed(data[i:i + (step or len(data))])
            heads = [e.path for e in reader.events if isinstance(e, RequestHead)]
            body = b"".join(e for e in reader.events if isinstance(e, bytes))
            assert heads == [b"/a", b"/b", b"/c"]
            assert body == b"abcde"
            assert reader.events.count(END_OF_MESSAGE) == 3
            assert not reader.in_message


LIMITS = Limits(request_line=100, fields=5, field_size=100, head=1024, body=10)


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET /" + b"a" * 200, 414),  # no line end yet: cut off while arriving
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 100 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: b\r\n" * 5 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"b" * 60 + b"\r\n" * 1 + b"Y: c\r\n" * 200, 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", 413),
    (CHUNKED + b"5\r\nabcde\r\n6\r\nabcdef\r\n0\r\n\r\n", 413),
    (CHUNKED + b"1\r\nx\r\n0\r\n" + b"X-T: 1\r\n" * 6 + b"\r\n", 431),
])
def test_limits(data: bytes, status: int) -> None:
    for cls in READERS:
        for step in (0, 1):
            verdict, _ = read_all(cls, data, step, LIMITS, eof=False)
            assert verdict == status, (cls.__name__, step)


def test_body_limit_zero_is_unlimited() -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n" + b"x" * 20
    for cls in READERS:
        verdict, _ = read_all(cls, data, limits=Limits(body=0))
        assert verdict == b"x" * 20


def test_huge_head_in_pieces_is_cut_off_without_buffering() -> None:
    """A head that never ends is refused once it passes the head limit; the buffer stays small."""
    for cls in READERS:
        reader = cls(Limits(request_line=8190, head=65536))
        reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
        fed = 0
        while not reader.events and fed < 1_000_000:
            reader.feed(b"a" * 1000)
            fed += 1000
        assert isinstance(reader.events[0], ProtocolError)
        assert reader.events[0].status == 431
        assert fed <= 66_000
        assert len(reader._buf) == 0  # released once broken


def test_trickled_head_is_linear() -> None:
    """64 KiB fed one byte at a time: the end-of-head search resumes, it does not restart."""
    import time

    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Long: " + b"v" * 8000 + b"\r\n"
    head += b"X: y\r\n" * 90 + b"\r\n"
    for cls in READERS:
        reader = cls()
        start = time.perf_counter()
        for i in range(len(head)):
            reader.feed(head[i:i + 1])
        assert time.perf_counter() - start < 2.0
        assert isinstance(reader.events[0], RequestHead)


def test_upgrade_leaves_following_bytes() -> None:
    data = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"\x81\x05hello")
    for cls in READERS:
        reader = cls()
        reader.feed(data)
        assert reader.events[0].upgrade  # type: ignore[attr-defined]
        assert reader.events[-1] is END_OF_MESSAGE
        assert reader.upgraded == b"\x81\x05hello"


def test_keep_alive_decisions() -> None:
    cases = {
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n": True,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n": False,
        b"GET / HTTP/1.0\r\n\r\n": False,
        b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n": True,
    }
    for cls in READERS:
        for data, keep in cases.items():
            _, events = read_all(cls, data)
            assert events[0].keep_alive is keep, (cls.__name__, data)  # type: ignore[attr-defined]


def test_known_methods_are_what_llhttp_accepts() -> None:
    """The h11 reader's method list must equal llhttp's, or verdicts would differ."""
    for method in sorted(KNOWN_METHODS):
        data = method + b" / HTTP/1.1\r\nHost: a\r\n\r\n"
        for cls in READERS:
            verdict, _ = read_all(cls, data)
            assert verdict == b"", (cls.__name__, method)


def test_feed_after_eof_midway_is_400() -> None:
    for cls in READERS:
        verdict, _ = read_all(cls, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
        assert verdict == 400


def _summary(cls: type[RequestReader], data: bytes) -> list[object]:
    reader = cls(Limits(body=100_000))
    reader.feed(data)
    reader.feed_eof()
    out: list[object] = []
    for event in reader.events:
        if isinstance(event, ProtocolError):
            out.append(("error", event.status))
        elif isinstance(event, RequestHead):
            out.append((event.method, event.target, event.version, tuple(event.headers),
                        event.keep_alive, event.chunked, event.content_length, event.upgrade))
        else:
            out.append(event)
    return out


def test_tokenisers_agree_on_random_input() -> None:
    """Differential property test: llhttp and h11 readers give the same events and verdicts."""
    from hypothesis import HealthCheck, given, settings
    from test_http_fuzz import requests

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=requests)
    def agree(data: bytes) -> None:
        assert _summary(RequestReader, data) == _summary(H11RequestReader, data)

    agree()


def test_nothing_after_a_request_that_closes() -> None:
    """RFC 9112 9.6: after ``Connection: close`` (or HTTP/1.0) nothing more is processed."""
    close = b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    for cls in READERS:
        for first in (close, b"GET /a HTTP/1.0\r\n\r\n",
                      b"POST /a HTTP/1.0\r\nContent-Length: 1\r\n\r\nx"):
            reader = cls()
            reader.feed(first + b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n" + b"garbage\r\n\r\n")
            heads = [e.path for e in reader.events if isinstance(e, RequestHead)]
            assert heads == [b"/a"], (cls.__name__, first)
            assert not any(isinstance(e, ProtocolError) for e in reader.events)
            assert not reader.in_message


@pytest.mark.parametrize("cls", READERS)
@pytest.mark.parametrize(("version", "expected"), [(b"1.1", True), (b"1.0", False)])
def test_expect_continue_only_for_http11(cls: type[RequestReader], version: bytes,
                                         expected: bool) -> None:
    """RFC 9110 10.1.1: the core decides it once; no worker re-checks the version."""
    reader = cls()
    reader.feed(b"POST / HTTP/" + version + b"\r\nHost: a\r\nExpect: 100-continue\r\n"
                b"Content-Length: 1\r\n\r\n")
    head = reader.events[0]
    assert isinstance(head, RequestHead)
    assert head.expect_continue is expected
