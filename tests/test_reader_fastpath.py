"""The request reader's fast path gives exactly the verdicts and events of its general path.

A read that holds exactly one whole head (the usual read) is parsed by a shorter path in
``RequestReader.feed``; the same bytes arriving in pieces, or after another request, go the
general way.  Both must agree on every request, good or bad, and on every limit; and the
field limits, which a short head skips without counting its fields, must still refuse exactly
the heads the rules refuse.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_http_fuzz import requests
from tests.test_reader_unit import CORPUS
from tiamat.http.errors import ProtocolError
from tiamat.http.h1 import END_OF_MESSAGE, Limits, RequestHead, RequestReader
from tiamat.http.h11_reader import H11RequestReader

READERS = [RequestReader, H11RequestReader]
FIRST = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"


def _events(reader: RequestReader) -> list[object]:
    """The reader's events, comparable: body bytes joined (pieces arrive as they were cut)."""
    out: list[object] = []
    for event in reader.events:
        if isinstance(event, ProtocolError):
            out.append(("error", event.status))
        elif isinstance(event, RequestHead):
            out.append(tuple(getattr(event, name) for name in RequestHead.__slots__))
        elif isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        else:
            out.append(event)
    return out


def _whole(cls: type[RequestReader], data: bytes, limits: Limits) -> list[object]:
    reader = cls(limits)
    reader.feed(data)
    reader.feed_eof()
    return _events(reader)


def _general_ways(cls: type[RequestReader], data: bytes, limits: Limits) -> list[list[object]]:
    """The same bytes the general way: in two pieces, and after a first request in one read
    (whose events are dropped)."""
    results = []
    for cut in (1, len(data) // 2, len(data) - 1):
        if 0 < cut < len(data):
            reader = cls(limits)
            reader.feed(data[:cut])
            reader.feed(data[cut:])
            reader.feed_eof()
            results.append(_events(reader))
    first = _whole(cls, FIRST, limits)
    if first[-1] is END_OF_MESSAGE:  # (unless the limits refuse the first one itself)
        reader = cls(limits)
        reader.feed(FIRST + data)
        reader.feed_eof()
        events = _events(reader)
        assert events[:2] == first
        results.append(events[2:])
    return results


def _agree(data: bytes, limits: Limits) -> None:
    for cls in READERS:
        whole = _whole(cls, data, limits)
        for other in _general_ways(cls, data, limits):
            assert other == whole, (cls.__name__, data, limits)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_the_same_whole_or_the_general_way(name: str) -> None:
    _agree(CORPUS[name][0], Limits(body=100_000))


def test_random_requests_the_same_whole_or_the_general_way() -> None:
    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=requests)
    def agree(data: bytes) -> None:
        _agree(data, Limits(body=100_000))

    agree()


def _head_of(size: int) -> bytes:
    """A valid GET head of exactly ``size`` bytes."""
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    return head.replace(b"X: ", b"X: " + b"v" * (size - len(head)))


@pytest.mark.parametrize("cls", READERS)
def test_the_head_limit_holds_for_a_head_in_one_read(cls: type[RequestReader]) -> None:
    limit = 200
    limits = Limits(head=limit)
    for size, ok in ((limit - 1, True), (limit, True), (limit + 1, False), (limit * 5, False)):
        data = _head_of(size)
        assert len(data) == size
        whole = _whole(cls, data, limits)
        assert (whole[-1] is END_OF_MESSAGE) == ok, (size, whole)
        if not ok:
            assert whole == [("error", 431)]
        _agree(data, limits)


def _expected_field_verdict(fields: list[tuple[bytes, bytes]], limits: Limits) -> int | None:
    """The field limits as the rules state them: more fields than ``fields``, or one whose
    name and value are longer together than ``field_size``, is 431 (0 disables either)."""
    if limits.fields > 0 and len(fields) > limits.fields:
        return 431
    if limits.field_size > 0 and any(len(n) + len(v) > limits.field_size for n, v in fields):
        return 431
    return None


@st.composite
def _fields_and_limits(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], Limits, bytes]:
    """Fields (as few bytes as a field line can take, too), limits, and the separator."""
    names = st.sampled_from([b"x", b"y", b"ab", b"x-long-name", b"accept", b"user-agent"])
    values = st.binary(min_size=0, max_size=30).map(
        lambda v: bytes(b for b in v if 0x21 <= b <= 0x7e))  # visible ASCII: always valid
    fields = draw(st.lists(st.tuples(names, values), max_size=12))
    limits = Limits(fields=draw(st.integers(0, 14)), field_size=draw(st.integers(0, 45)))
    return fields, limits, draw(st.sampled_from([b":", b": ", b":\t "]))


def test_field_limits_refuse_exactly_what_the_rules_refuse() -> None:
    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=_fields_and_limits())
    def check(case: tuple[list[tuple[bytes, bytes]], Limits, bytes]) -> None:
        fields, limits, separator = case
        every = [(b"host", b"a"), *fields]
        data = (b"GET / HTTP/1.1\r\n"
                + b"".join(n + separator + v + b"\r\n" for n, v in every) + b"\r\n")
        expected = _expected_field_verdict(every, limits)
        for cls in READERS:
            whole = _whole(cls, data, limits)
            if expected is None:
                assert whole[-1] is END_OF_MESSAGE, (cls.__name__, data, limits, whole)
                assert whole[0][4] == every  # type: ignore[index] # (the headers slot)
            else:
                assert whole == [("error", expected)], (cls.__name__, data, limits, whole)
        _agree(data, limits)

    check()


@pytest.mark.parametrize("cls", READERS)
def test_field_limits_at_their_bounds_with_the_shortest_lines(cls: type[RequestReader]) -> None:
    """The shortest field lines ("x:"), so that a head is as short as its field count allows,
    and single fields right at the size limit."""
    for count in range(1, 30):
        data = b"GET / HTTP/1.1\r\nHost:a\r\n" + b"x:\r\n" * (count - 1) + b"\r\n"
        for limit in range(1, 30):
            whole = _whole(cls, data, Limits(fields=limit))
            assert (whole == [("error", 431)]) == (count > limit), (count, limit, whole)
    for size in range(1, 12):
        data = b"GET / HTTP/1.1\r\nHost:a\r\nx:" + b"v" * (size - 1) + b"\r\n\r\n"
        for limit in range(1, 12):
            whole = _whole(cls, data, Limits(field_size=limit))
            # (Host's name and value count too: 5 bytes)
            assert (whole == [("error", 431)]) == (max(size, 5) > limit), (size, limit, whole)


@pytest.mark.parametrize("cls", READERS)
def test_targets_split_as_before(cls: type[RequestReader]) -> None:
    """The heads' inlined target split against every target form."""
    cases = {
        b"/": (b"/", b""),
        b"/a?b=1&c": (b"/a", b"b=1&c"),
        b"/a?": (b"/a", b""),
        b"*": (b"*", b""),
        b"http://h/x/y?q": (b"/x/y", b"q"),
        b"http://h": (b"/", b""),
    }
    # a plain head, one with a framing field, and an HTTP/1.0 one (the long way)
    forms = (b"HTTP/1.1\r\nHost: h\r\n", b"HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n",
             b"HTTP/1.0\r\n")
    for target, (path, query) in cases.items():
        for form in forms:
            reader = cls()
            reader.feed(b"OPTIONS " + target + b" " + form + b"\r\n")
            head = reader.events[0]
            assert isinstance(head, RequestHead), (target, form, reader.events)
            assert (head.target, head.path, head.query) == (target, path, query), form
            assert not head.has_body and head.keep_alive == (form != forms[2])
