"""``--http h11``: the same :class:`~tiamat.http.h1.RequestReader`, tokenising heads with h11.

Only the tokenising of one complete head differs: the request line and every field line
are matched against h11's RFC 9110/9112 grammar (``h11._abnf``), the way h11 itself reads
them.  Everything else (finding the end of the head, size limits, framing rules, body and
chunk decoding) is the shared reader's, so both tokenisers give the same verdicts.  Where
h11 is more lenient than llhttp (bare LF line endings, obs-fold, control characters in field
values), this module adds the check, so the verdict does not depend on ``--http``.
"""

from __future__ import annotations

import re

from h11 import _abnf

from tiamat.http.errors import ProtocolError
from tiamat.http.h1 import RequestReader

_REQUEST_LINE = re.compile(_abnf.request_line.encode("ascii")).fullmatch
_FIELD = re.compile(_abnf.header_field.encode("ascii")).fullmatch
#: origin-form, asterisk-form or absolute-form (llhttp's rule; CONNECT takes anything)
_TARGET_FORM = re.compile(rb"[/*]|[A-Za-z]+://").match
#: control characters llhttp refuses in a field value (HTAB is allowed, obs-text is too)
_VALUE_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search


class H11RequestReader(RequestReader):
    """A request reader whose heads are tokenised with h11's grammar instead of llhttp."""

    __slots__ = ()

    def _tokenise(self, head: bytes, method: bytes, line_end: int, space: int) -> str:
        crlf = head.count(b"\r\n")
        if head.count(b"\n") != crlf:
            raise ProtocolError(400, "bare LF in the request head")
        if head.count(b"\r") != crlf:
            raise ProtocolError(400, "bare CR in the request head")
        lines = head[:-4].split(b"\r\n")
        match = _REQUEST_LINE(lines[0])
        if match is None:
            raise ProtocolError(400, "malformed request line")
        target = self._url = match.group("target")
        if method != b"CONNECT" and _TARGET_FORM(target) is None:
            raise ProtocolError(400, "invalid request target")
        field = self._field
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise ProtocolError(400, "obsolete line folding")
            match = _FIELD(line)
            if match is None:
                raise ProtocolError(400, "invalid header field")
            value = match.group("field_value")
            if _VALUE_CTL(value) is not None:
                raise ProtocolError(400, "invalid character in a header value")
            field(match.group("field_name"), value)
        return match_version(lines[0])


def match_version(request_line: bytes) -> str:
    """``b'GET / HTTP/1.1'`` -> ``'1.1'`` (the line already matched the grammar)."""
    return request_line[-3:].decode("ascii")
