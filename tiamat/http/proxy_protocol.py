"""The PROXY protocol (HAProxy, v1 text and v2 binary), sans-I/O.

A load balancer in TCP mode (or passing TLS through) cannot add ``X-Forwarded-For``; it
sends one PROXY header before the client's bytes instead, naming the client and the address
it connected to.  :func:`parse` reads that header from the first bytes of a connection.

The worker calls it on bytes it *peeked* (``MSG_PEEK``) and then consumes exactly
:attr:`ProxyHeader.length` bytes, so nothing after the header (HTTP bytes, or a TLS
ClientHello) is ever taken from the socket early.  Only peers in ``--proxy-allow-from``
may send one; with ``--proxy-protocol auto`` a connection without a header is served as is.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: a v1 header is at most 107 bytes, CRLF included (the spec's own bound)
V1_MAX = 107
#: largest v2 header accepted (addresses plus TLVs; the spec allows 64 KiB, nobody sends it)
V2_MAX = 4096
#: enough peeked bytes to tell a PROXY header from anything else
DETECT_BYTES = len(V2_SIGNATURE)


class ProxyProtocolError(Exception):
    """A PROXY header that was required or announced but is malformed."""


class ProxyHeader(NamedTuple):
    """A parsed header: its length on the wire, and the addresses (None for LOCAL/UNKNOWN)."""

    length: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


#: :func:`parse` result when ``auto`` finds no PROXY header at all
NOT_PROXY = ProxyHeader(0, None, None)


def parse(data: bytes, mode: str) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``data``; None if more bytes are needed.

    ``mode`` is ``v1``, ``v2`` or ``auto``.  Raises :class:`ProxyProtocolError` if the
    header is missing (for v1/v2) or malformed.  In ``auto`` mode, bytes that start neither
    signature give :data:`NOT_PROXY`.
    """
    if mode in ("v2", "auto") and data[:DETECT_BYTES] == V2_SIGNATURE[:len(data)]:
        if len(data) < DETECT_BYTES:
            return None
        return _parse_v2(data)
    if mode in ("v1", "auto") and data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        if len(data) < len(V1_PREFIX):
            return None
        return _parse_v1(data)
    if mode == "auto":
        return NOT_PROXY
    raise ProxyProtocolError(f"expected a PROXY protocol {mode} header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 header too long")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None, None)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 header")
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError("malformed PROXY v1 address") from None
    if src.version != (4 if parts[1] == b"TCP4" else 6) or dst.version != src.version:
        raise ProxyProtocolError("PROXY v1 address family mismatch")
    ports = []
    for text in parts[4:6]:
        if not text.isdigit() or not text.isascii() or len(text) > 5 or \
                (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
            raise ProxyProtocolError("malformed PROXY v1 port")
        ports.append(int(text))
    return ProxyHeader(end + 2, (str(src), ports[0]), (str(dst), ports[1]))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    ver_cmd, family, length = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
        raise ProxyProtocolError("unsupported PROXY v2 version or command")
    total = 16 + length
    if total > V2_MAX:
        raise ProxyProtocolError("PROXY v2 header too long")
    if len(data) < total:
        return None
    if ver_cmd & 0xF == 0:  # LOCAL: a health check from the proxy itself
        return ProxyHeader(total, None, None)
    transport_family = family >> 4
    if transport_family == 1:  # AF_INET
        if length < 12:
            raise ProxyProtocolError("short PROXY v2 IPv4 address block")
        src = socket.inet_ntop(socket.AF_INET, data[16:20])
        dst = socket.inet_ntop(socket.AF_INET, data[20:24])
        sport, dport = struct.unpack_from("!HH", data, 24)
    elif transport_family == 2:  # AF_INET6
        if length < 36:
            raise ProxyProtocolError("short PROXY v2 IPv6 address block")
        src = socket.inet_ntop(socket.AF_INET6, data[16:32])
        dst = socket.inet_ntop(socket.AF_INET6, data[32:48])
        sport, dport = struct.unpack_from("!HH", data, 48)
    elif transport_family in (0, 3):  # UNSPEC or AF_UNIX: nothing usable, keep the peer
        return ProxyHeader(total, None, None)
    else:
        raise ProxyProtocolError("unknown PROXY v2 address family")
    return ProxyHeader(total, (src, sport), (dst, dport))


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and tools)."""
    family = b"TCP6" if ":" in source[0] else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (family, source[0].encode(), destination[0].encode(),
                                          source[1], destination[1])


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header (for tests and tools); ``source=None`` makes a LOCAL header."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0, len(tlvs)) + tlvs
    if ":" in source[0]:
        block = (socket.inet_pton(socket.AF_INET6, source[0])
                 + socket.inet_pton(socket.AF_INET6, destination[0]))
        family = 0x21
    else:
        block = (socket.inet_pton(socket.AF_INET, source[0])
                 + socket.inet_pton(socket.AF_INET, destination[0]))
        family = 0x11
    block += struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block
