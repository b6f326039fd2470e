"""The access log: gunicorn's format atoms, or one JSON object per line.

A worker asks :func:`for_worker` once; it returns ``None`` when the access log is off, so
the request path pays one ``is None`` test and builds no string at all.  Otherwise the
format is parsed once into the list of atoms it uses, and each request computes only
those atoms.

Every value taken from the request or the response is escaped before it reaches the log:
control characters (``\\n``, ``\\r``, ESC ...) become ``\\xNN`` escapes and ``"`` / ``\\``
are backslash-escaped, so a client cannot forge log lines or colour a terminal.  The JSON
format gets the same protection from JSON string escaping.

The one entry point shared by every worker class is :meth:`AccessLog.log`, which takes
plain values (the WSGI handler and the ASGI worker both call it); :meth:`AccessLog.log_wsgi`
is a convenience that pulls those values out of a WSGI environ, and :class:`Refusals` logs
(and counts) the error responses a worker writes without calling the app.

Atoms (as in gunicorn): ``h`` remote address, ``l`` ``-``, ``u`` user from Basic auth,
``t`` request time ``[27/Nov/2026:23:43:29 +0000]``, ``r`` request line, ``m`` method,
``U`` decoded path, ``q`` query string, ``H`` protocol, ``s`` status, ``B`` body bytes, ``b`` body
bytes or ``-``, ``f`` referer, ``a`` user agent, ``T`` seconds, ``M`` milliseconds, ``D``
microseconds, ``L`` decimal seconds, ``p`` ``<pid>``, ``{name}i`` request header,
``{name}o`` response header, ``{name}e`` environ (or OS environment) variable.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

access_log = logging.getLogger("tiamat.access")

#: --access-logformat values that select the JSON writer
JSON_FORMATS = frozenset({"json", "JSON"})
_KEY = re.compile(r"%\(([^)]*)\)")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _escape_table() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                  ord('"'): '\\"', ord("\\"): "\\\\"})
    return table


_ESCAPES = _escape_table()
_UNSAFE = re.compile('[\x00-\x1f\x7f-\x9f"\\\\]')


def escape(value: str) -> str:
    """``value`` with control characters, ``"`` and ``\\`` escaped (no log injection)."""
    if _UNSAFE.search(value) is None:
        return value
    return value.translate(_ESCAPES)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return escape(value) if value else "-"


class _ClfClock:
    """``[27/Nov/2026:23:43:29 +0000]``, rebuilt at most once a second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def format(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            tm = time.localtime(second)
            offset = tm.tm_gmtoff or 0
            sign = "+" if offset >= 0 else "-"
            offset = abs(offset) // 60
            self._text = (f"[{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
                          f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
                          f"{sign}{offset // 60:02d}{offset % 60:02d}]")
            self._second = second
        return self._text


def _basic_user(authorization: str | None) -> str | None:
    """The user name of a Basic ``Authorization`` header (unescaped), or None."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(":")[0] or None


def _pick(headers: Iterable[tuple[bytes | str, bytes | str]], names: frozenset[str | bytes]
          ) -> dict[str, str]:
    """The first value of each header in ``names`` (lower-case, each as str and as bytes),
    in one pass; a bytes name is decoded only when it is one of them."""
    found: dict[str, str] = {}
    for key, value in headers:
        key = key.lower()
        if key in names:
            if key.__class__ is bytes:
                key = key.decode("latin-1")  # type: ignore[union-attr]
            if key not in found:
                found[key] = value.decode("latin-1") if isinstance(value, bytes) else value  # type: ignore[index]
    return found


def _both_types(names: set[str]) -> frozenset[str | bytes]:
    """``names`` as str (WSGI response headers) and as bytes (the core's request headers,
    ASGI response headers); a name outside latin-1 can never match bytes from the wire."""
    both: set[str | bytes] = set(names)
    for name in names:
        try:
            both.add(name.encode("latin-1"))
        except UnicodeEncodeError:
            pass
    return frozenset(both)


class _Request:
    """What one log line is built from (so each atom is a small function of it)."""

    __slots__ = ("duration", "environ", "length", "method", "path", "protocol", "remote_addr",
                 "request", "response", "status", "target")

    def __init__(self, remote_addr: str, method: str, target: str, path: str, protocol: str,
                 status: int, length: int, duration: float, request: dict[str, str],
                 response: dict[str, str], environ: Mapping[str, Any] | None) -> None:
        self.remote_addr = remote_addr
        self.method = method
        self.target = target
        self.path = path
        self.protocol = protocol
        self.status = status
        self.length = length
        self.duration = duration
        self.request = request
        self.response = response
        self.environ = environ


_Atom = Callable[[_Request], str]


def _environ_value(name: str) -> _Atom:
    def atom(r: _Request) -> str:
        value = r.environ.get(name) if r.environ is not None else None
        if value is None:
            value = os.environ.get(name)
        return _text(str(value) if value is not None else None)

    return atom


class AccessLog:
    """A parsed access-log format; :meth:`log` writes one line for one response.

    The format is compiled once: the atoms it uses become small functions, and the request
    and response headers it needs are collected in a single pass per request.
    """

    def __init__(self, fmt: str, logger: logging.Logger = access_log) -> None:
        self.logger = logger
        self.json = fmt.strip() in JSON_FORMATS
        self.format = fmt
        self.clock = _ClfClock()
        self.pid_number = os.getpid()
        self.pid = f"<{self.pid_number}>"
        request_names = {"authorization", "referer", "user-agent"} if self.json else set()
        response_names: set[str] = set()
        self.atoms: list[tuple[str, _Atom]] = []
        for key in ([] if self.json else dict.fromkeys(_KEY.findall(fmt))):
            self.atoms.append((key, self._compile(key, request_names, response_names)))
        self.request_names = _both_types(request_names)
        self.response_names = _both_types(response_names)

    def _compile(self, key: str, request_names: set[str], response_names: set[str]) -> _Atom:
        if key.startswith("{") and "}" in key:
            name, _, kind = key[1:].rpartition("}")
            name = name.lower() if kind in ("i", "o") else name
            if kind == "i":
                request_names.add(name)
                return lambda r: _text(r.request.get(name))
            if kind == "o":
                response_names.add(name)
                return lambda r: _text(r.response.get(name))
            if kind == "e":
                return _environ_value(name)
            return lambda r: "-"
        if key in ("u", "f", "a"):
            request_names.add({"u": "authorization", "f": "referer", "a": "user-agent"}[key])
        pid, clock = self.pid, self.clock
        simple: dict[str, _Atom] = {
            "h": lambda r: _text(r.remote_addr),
            "l": lambda r: "-",
            "u": lambda r: _text(_basic_user(r.request.get("authorization"))),
            "t": lambda r: clock.format(time.time() - r.duration),
            "r": lambda r: f"{_text(r.method)} {_text(r.target)} {_text(r.protocol)}",
            "m": lambda r: _text(r.method),
            "U": lambda r: _text(r.path),
            "q": lambda r: escape(r.target.partition("?")[2]),
            "H": lambda r: _text(r.protocol),
            "s": lambda r: str(r.status),
            "B": lambda r: str(r.length),
            "b": lambda r: str(r.length) if r.length else "-",
            "f": lambda r: _text(r.request.get("referer")),
            "a": lambda r: _text(r.request.get("user-agent")),
            "T": lambda r: str(int(r.duration)),
            "M": lambda r: str(int(r.duration * 1000)),
            "D": lambda r: str(int(r.duration * 1_000_000)),
            "L": lambda r: f"{r.duration:.6f}",
            "p": lambda r: pid,
        }
        return simple.get(key, lambda r: "-")

    def log(self, *, remote_addr: str, method: str, target: str, protocol: str, status: int,
            length: int, duration: float,
            request_headers: Iterable[tuple[bytes | str, bytes | str]] = (),
            response_headers: Iterable[tuple[bytes | str, bytes | str]] = (),
            environ: Mapping[str, Any] | None = None, path: str | None = None) -> None:
        """Write the line for one completed response.

        ``target`` is the raw request target (path and query), ``path`` the decoded path
        (``PATH_INFO``, the ASGI scope's ``path``; taken from ``target`` when None),
        ``length`` the body bytes sent, ``duration`` seconds from the complete request to
        the end of the response.  Header names are matched case-insensitively; values may
        be bytes or str.
        """
        if path is None:
            path = target.partition("?")[0]
        try:
            request = _pick(request_headers, self.request_names) if self.request_names else {}
            response = (_pick(response_headers, self.response_names) if self.response_names
                        else {})
            r = _Request(remote_addr, method, target, path, protocol, status, length, duration,
                         request, response, environ)
            if self.json:
                line = self._json_line(r)
            else:
                line = self.format % {key: atom(r) for key, atom in self.atoms}
        except Exception:  # a bad format must never fail the request
            logging.getLogger("tiamat.error").exception("access log format failed")
            return
        self.logger.info(line)

    def log_wsgi(self, environ: Mapping[str, Any], status: int, length: int, duration: float,
                 request_headers: Iterable[tuple[bytes | str, bytes | str]],
                 response_headers: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        """:meth:`log` with the request values taken from a WSGI environ."""
        self.log(remote_addr=environ.get("REMOTE_ADDR") or "-",
                 method=environ.get("REQUEST_METHOD") or "-",
                 target=environ.get("RAW_URI") or "-",
                 protocol=environ.get("SERVER_PROTOCOL") or "-", status=status, length=length,
                 duration=duration, request_headers=request_headers,
                 response_headers=response_headers, environ=environ,
                 path=environ.get("PATH_INFO"))

    def _json_line(self, r: _Request) -> str:
        when = time.time() - r.duration
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            + f".{int(when % 1 * 1000):03d}Z",
            "remote_addr": r.remote_addr,
            "user": _basic_user(r.request.get("authorization")),
            "method": r.method,
            "path": r.path,
            "query": r.target.partition("?")[2],
            "protocol": r.protocol,
            "status": r.status,
            "bytes": r.length,
            "duration_ms": round(r.duration * 1000, 3),
            "referer": r.request.get("referer"),
            "user_agent": r.request.get("user-agent"),
            "pid": self.pid_number,
        }
        return json.dumps(record, separators=(",", ":"))


class Refusals:
    """Logs and counts a response the worker wrote itself (400, 408, 413, 414, 431, 501, 503).

    The app never saw the request, so neither the WSGI handler nor an ASGI cycle records
    it; every worker class calls this from the one place it writes such a response.  The
    method, target and protocol are ``-`` when the request head never became complete.
    Made once per worker by :func:`refusals`, which returns None when neither the access
    log nor metrics are on: the error path then pays one ``is None`` test.
    """

    __slots__ = ("access", "recorder")

    def __init__(self, access: AccessLog | None, recorder: Any) -> None:
        self.access = access
        self.recorder = recorder

    def __call__(self, status: int, response: bytes, remote_addr: str | None,
                 head: Any = None) -> None:
        """``response`` as written (its body length is logged); ``head`` a RequestHead or None."""
        if self.recorder is not None:
            self.recorder.refused(status)
        if self.access is None:
            return
        if head is None:
            method = target = protocol = "-"
            headers: Iterable[tuple[bytes, bytes]] = ()
        else:
            method, target = head.method.decode("latin-1"), head.target.decode("latin-1")
            protocol, headers = "HTTP/" + head.version, head.headers
        self.access.log(remote_addr=remote_addr or "-", method=method, target=target,
                        protocol=protocol, status=status,
                        length=len(response) - response.find(b"\r\n\r\n") - 4, duration=0.0,
                        request_headers=headers)


def refusals(access: AccessLog | None, recorder: Any) -> Refusals | None:
    """A worker's :class:`Refusals` over its access log and metrics row (None: both off)."""
    if access is None and recorder is None:
        return None
    return Refusals(access, recorder)


def enabled(logger: logging.Logger = access_log) -> bool:
    """True when access lines would be written (``--access-logfile`` or a log config)."""
    return logger.isEnabledFor(logging.INFO)


def for_worker(cfg: Any) -> AccessLog | None:
    """The worker's access log, or None when it is off (then nothing is ever built)."""
    if not enabled():
        return None
    return AccessLog(cfg.access_log_format or "")
