"""Forwarded headers from trusted proxies: the one rule every worker class applies.

Only a connection whose peer is in ``--forwarded-allow-ips`` may tell the server who the
client is (``X-Forwarded-For`` / ``Forwarded: for=``), which scheme it used
(``X-Forwarded-Proto``, the ``secure_scheme_headers``, ``Forwarded: proto=``) and which
host it asked for (``X-Forwarded-Host`` / ``Forwarded: host=``).  From any other peer these
headers are passed to the app untouched but change nothing.

The trust decision depends only on the peer address, so it is made once per connection
(:meth:`ForwardedRules.trusts`); the headers are read per request, and only on trusted
connections (:meth:`ForwardedRules.resolve`).  WSGI applies the result with
:func:`apply_to_environ`, ASGI with :func:`apply_to_scope`.

Which client address wins: the list is read from the right (the entry our own proxy
appended) leftwards, skipping addresses that are themselves trusted proxies; the first
untrusted one is the client (the leftmost if all are trusted).  An RFC 7239 ``Forwarded``
header, when present, takes precedence over the ``X-Forwarded-*`` family.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

#: environ key the worker sets (once per connection) when the peer is a trusted proxy
TRUSTED_KEY = "tiamat.forwarded_trusted"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_SCHEMES = frozenset(("http", "https", "ws", "wss"))
_HOST_OK = re.compile(r"[A-Za-z0-9.\-_~%!$&'()*+,;=:\[\]]{1,255}").fullmatch
_FORWARDED_ELEMENT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_FORWARDED_PAIR = re.compile(r'\s*([A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


class Forwarded(NamedTuple):
    """What trusted forwarding headers said (None where they said nothing usable)."""

    client: tuple[str, int] | None
    scheme: str | None
    host: str | None


NOTHING = Forwarded(None, None, None)


class ForwardedRules:
    """``--forwarded-allow-ips`` and ``secure_scheme_headers``, parsed once per worker."""

    __slots__ = ("_addresses", "_networks", "any", "environ_keys", "header_names",
                 "secure_headers")

    def __init__(self, allow: Iterable[str], secure_headers: dict[str, str] | None = None) -> None:
        self.any = False
        self._addresses: set[str] = set()
        self._networks: list[_Network] = []
        for item in allow:
            item = item.strip()
            if not item:
                continue
            if item == "*":
                self.any = True
            elif "/" in item:
                self._networks.append(ipaddress.ip_network(item, strict=False))
            else:
                self._addresses.add(str(ipaddress.ip_address(item.strip("[]"))))
        #: lower-cased header name (bytes) -> the lower-cased value that means https
        self.secure_headers = {name.lower().encode("latin-1"): value.lower().encode("latin-1")
                               for name, value in (secure_headers or {}).items()}
        #: every request header (lower-cased) that can change something, and the same as
        #: WSGI environ keys: a request with none of them is left alone after a set check
        self.header_names = frozenset((b"x-forwarded-for", b"x-forwarded-proto",
                                       b"x-forwarded-host", b"forwarded", *self.secure_headers))
        self.environ_keys = frozenset("HTTP_" + name.decode("latin-1").upper().replace("-", "_")
                                      for name in self.header_names)

    @classmethod
    def from_config(cls, cfg: Any) -> ForwardedRules:
        return cls(cfg.forwarded_allow_ips, getattr(cfg, "secure_scheme_headers", None))

    def trusts(self, addr: str | None) -> bool:
        """Is a peer at ``addr`` a trusted proxy?  (Unix-socket peers, ``None``/"", are.)"""
        if self.any or not addr:
            return True
        if addr in self._addresses:
            return True
        try:
            ip = ipaddress.ip_address(addr.strip("[]"))
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
            if str(ip) in self._addresses:
                return True
        return any(ip in net for net in self._networks)

    def _pick(self, addrs: list[str]) -> str | None:
        """The client in a proxy chain: the rightmost address that is not a trusted proxy."""
        for addr in reversed(addrs):
            if not self.trusts(addr):
                return addr
        return addrs[0] if addrs else None

    def resolve(self, headers: list[tuple[bytes, bytes]]) -> Forwarded:
        """What the forwarding headers of one request say (call only on trusted connections)."""
        xff: list[str] = []
        proto = host = None
        forwarded: list[str] = []
        secure = None
        secure_headers = self.secure_headers
        for name, value in headers:
            if name == b"x-forwarded-for":
                xff.extend(part.strip() for part in value.decode("latin-1").split(","))
            elif name == b"x-forwarded-proto":
                proto = value.decode("latin-1").rsplit(",", 1)[-1].strip().lower()
            elif name == b"x-forwarded-host":
                host = value.decode("latin-1").rsplit(",", 1)[-1].strip()
            elif name == b"forwarded":
                forwarded.append(value.decode("latin-1"))
            if name in secure_headers:
                secure = value.strip().lower() == secure_headers[name]
                if proto is None and secure:
                    proto = "https"
        if forwarded:
            return self._resolve_forwarded(",".join(forwarded))
        if not xff and proto is None and host is None and secure is None:
            return NOTHING  # no forwarding header at all, the common case: nothing to apply
        if proto is None and secure is False:
            proto = "http"
        client_addr = self._pick([a for a in xff if a])
        return Forwarded(_client(client_addr), proto if proto in _SCHEMES else None,
                         host if host and _HOST_OK(host) else None)

    def _resolve_forwarded(self, value: str) -> Forwarded:
        elements = [_parse_forwarded_element(e) for e in _split_elements(value)]
        elements = [e for e in elements if e is not None]
        if not elements:
            return NOTHING
        chosen = elements[0]
        for element in reversed(elements):
            if not self.trusts(_strip_port(element.get("for", ""))):
                chosen = element
                break
        proto = chosen.get("proto", "").lower() or None
        host = chosen.get("host") or None
        return Forwarded(_client(chosen.get("for")), proto if proto in _SCHEMES else None,
                         host if host and _HOST_OK(host) else None)


def _split_elements(value: str) -> list[str]:
    """Split a Forwarded value at the commas that are not inside quoted strings."""
    return _FORWARDED_ELEMENT.findall(value)


def _parse_forwarded_element(element: str) -> dict[str, str] | None:
    pairs: dict[str, str] = {}
    for part in element.split(";"):
        if not part.strip():
            continue
        match = _FORWARDED_PAIR.fullmatch(part)
        if match is None:
            return None
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[match.group(1).lower()] = value
    return pairs or None


def _strip_port(node: str) -> str:
    """``'[2001:db8::1]:4711'`` -> ``'2001:db8::1'``; ``'192.0.2.1:80'`` -> ``'192.0.2.1'``."""
    if node.startswith("["):
        return node[1:node.find("]")] if "]" in node else node
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node


def _client(node: str | None) -> tuple[str, int] | None:
    """A ``for=`` / X-Forwarded-For node as an (address, port) pair; None if unusable."""
    if not node:
        return None
    port = 0
    if node.startswith("["):
        end = node.find("]")
        if end < 0:
            return None
        addr, rest = node[1:end], node[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif node.count(":") == 1:
        addr, _, port_text = node.partition(":")
        if port_text.isdigit():
            port = int(port_text)
    else:
        addr = node
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        return None  # "unknown", an obfuscated identifier or garbage: keep the peer's address
    return addr, port if port < 65536 else 0


def _split_host(host: str, scheme: str) -> tuple[str, str]:
    """``'example.com:8443'`` -> (``'example.com'``, ``'8443'``); default port by scheme."""
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[:end + 1], host[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    return name, port if port.isdigit() else ("443" if scheme in ("https", "wss") else "80")


def apply_to_environ(environ: dict[str, Any], headers: list[tuple[bytes, bytes]],
                     rules: ForwardedRules) -> None:
    """Apply trusted forwarding headers to a WSGI environ (REMOTE_ADDR, scheme, host).  The
    WSGI handler calls it only when a forwarding header came from a trusted peer, noted as it
    builds the environ (tiamat.wsgi.WSGIHandler.build_environ): most requests carry none."""
    result = rules.resolve(headers)
    if result is NOTHING:
        return
    if result.client is not None:
        environ["REMOTE_ADDR"] = result.client[0]
        environ["REMOTE_PORT"] = str(result.client[1])
    scheme = environ["wsgi.url_scheme"]
    if result.scheme is not None:
        scheme = environ["wsgi.url_scheme"] = "https" if result.scheme in ("https", "wss") else "http"
    if result.host is not None:
        environ["HTTP_HOST"] = result.host
        environ["SERVER_NAME"], environ["SERVER_PORT"] = _split_host(result.host, scheme)
    elif result.scheme is not None and "HTTP_HOST" in environ:
        environ["SERVER_NAME"], environ["SERVER_PORT"] = _split_host(environ["HTTP_HOST"], scheme)


Client = tuple[str, int] | None
Server = tuple[str, int | None] | None


def apply_to_scope(headers: list[tuple[bytes, bytes]], client: Client, scheme: str, server: Server,
                   rules: ForwardedRules) -> tuple[Client, str, Server]:
    """The ASGI ``(client, scheme, server)`` after trusted forwarding headers.

    ``scheme`` is the scope's ("http"/"https", or "ws"/"wss" for a WebSocket scope; a
    forwarded https turns ws into wss).  Call only for trusted connections.
    """
    result = rules.resolve(headers)
    if result is NOTHING:
        return client, scheme, server
    if result.client is not None:
        client = result.client
    if result.scheme is not None:
        secure = result.scheme in ("https", "wss")
        websocket = scheme in ("ws", "wss")
        scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
    if result.host is not None:
        name, port = _split_host(result.host, scheme)
        server = (name.strip("[]"), int(port))
    return client, scheme, server
