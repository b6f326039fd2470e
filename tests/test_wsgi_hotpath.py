"""The shortcuts the WSGI hot path takes must give exactly what the long way gives.

Each per-request shortcut (a value kept up to date instead of computed when read, a result
remembered for input seen before) is checked here against the computation it replaces, on
the readers' corpus of good and bad requests fed in every split, and on the environ a real
server hands a real app.
"""

from __future__ import annotations

import pytest

from tests.test_reader_unit import CORPUS
from tiamat.http import h1
from tiamat.http.h1 import RequestReader
from tiamat.http.h11_reader import H11RequestReader

READERS = [RequestReader, H11RequestReader]


def _in_message_long_way(reader: RequestReader) -> bool:
    """What ``in_message`` was as a property: a request has started but is not complete."""
    state = reader._state
    return (state != h1._HEAD and state != h1._DONE) or bool(reader._buf)


def _feed_checked(reader: RequestReader, pieces: list[bytes]) -> None:
    for piece in pieces:
        reader.feed(piece)
        assert reader.in_message == _in_message_long_way(reader), piece
    reader.feed_eof()
    assert reader.in_message == _in_message_long_way(reader)


SECOND = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("reader_class", READERS)
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_in_message_matches_the_state_at_every_split(reader_class: type[RequestReader],
                                                     name: str) -> None:
    data = CORPUS[name][0] + SECOND  # pipelined: a second request follows the first
    _feed_checked(reader_class(), [data])
    _feed_checked(reader_class(), [data[i:i + 1] for i in range(len(data))])
    for cut in range(1, len(data)):
        _feed_checked(reader_class(), [data[:cut], data[cut:]])


def test_in_message_follows_a_request_through_its_parts() -> None:
    reader = RequestReader()
    assert not reader.in_message
    reader.feed(b"POST / HTTP/1.1\r\nHo")
    assert reader.in_message  # a head has started
    reader.feed(b"st: a\r\nContent-Length: 3\r\n\r\n")
    assert reader.in_message  # the head is complete, the body is not
    reader.feed(b"ab")
    assert reader.in_message
    reader.feed(b"c")
    assert not reader.in_message  # complete: between requests
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not reader.in_message
    reader.feed(b"\r\n")  # an empty line before a request line is skipped (RFC 9112 2.2)
    assert not reader.in_message
    reader.feed(b"GET")
    assert reader.in_message
    reader.feed_eof()  # cut off inside a request: an error, and the reader stops
    assert reader.broken and reader.in_message == _in_message_long_way(reader)


def test_in_message_after_a_rejected_request() -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    assert reader.broken
    assert not reader.in_message  # nothing buffered: the worker answers and closes
