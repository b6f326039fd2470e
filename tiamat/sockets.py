"""Listening sockets: parse bind addresses, bind them once in the master, or inherit them.

Sockets are bound by the master before any worker exists and are inherited across fork;
on USR2 they also survive ``execve`` (their fds are listed in ``TIAMAT_FD``), and under
systemd socket activation they arrive as ``LISTEN_FDS``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
from collections.abc import Mapping
from typing import Any, NamedTuple

#: environment variable carrying inherited listening fds across a USR2 re-exec
INHERIT_ENV = "TIAMAT_FD"
#: accept() failures that concern only the one connection: go on with the next.  Linux
#: reports a new connection's pending network error from accept() itself, and its man page
#: asks servers to treat those like EAGAIN (EPERM: a firewall rule refused it)
ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                         errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                         errno.ENETUNREACH, errno.EPERM})
#: any other accept() failure (out of descriptors or memory, or not foreseen): stop watching
#: the listener for ACCEPT_RETRY seconds (as asyncio's own servers do), else a level-triggered
#: poller wakes again at once and the worker spins, logging the error over and over
ACCEPT_RETRY = 1.0
#: of those, the ones a connection closing ends (see AcceptPaused.frees_on_close)
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
#: connections a worker accepts per wake-up before it turns to its other work
ACCEPT_BATCH = 32

_log = logging.getLogger("tiamat.error")


class AcceptPaused(Exception):
    """accept() failed (logged already): the caller stops watching its listener for
    ACCEPT_RETRY seconds, each worker class in its own way.  ``frees_on_close``: the failure
    was running out of descriptors, which a closing connection ends sooner (any other
    failure waits out the pause: re-armed by every close, a lasting error logged per close)."""

    def __init__(self, frees_on_close: bool) -> None:
        super().__init__()
        self.frees_on_close = frees_on_close


def dup_listener(sock: socket.socket) -> socket.socket:
    """A duplicate of a listening socket that leaves it non-blocking.

    ``socket.dup()`` applies the object's timeout to the copy, and a listener inherited
    from the master has none (blocking, as Python sees it): the copy clears O_NONBLOCK on
    the open file that every worker shares, and a worker woken for a connection a sibling
    took then blocks in accept(), its whole loop with it (a refork's promotion stalled
    both asgi workers so)."""
    copy = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    copy.setblocking(False)
    return copy


def accept_next(listener: socket.socket) -> tuple[socket.socket, Any] | None:
    """The next connection waiting on a non-blocking listening socket, or None if none waits.

    The one rule for accept()'s failures, for every worker class: a connection that failed
    before it was taken (ACCEPT_SKIP) is passed over; running out of descriptors or memory,
    or any error not foreseen, is logged and raises AcceptPaused.  An
    unforeseen error is not raised as it is: out of the worker's loop it would end the worker,
    and its replacement would meet the same error (a restart loop), where a pause retries
    the listener once a second and keeps serving the connections already taken.
    """
    while True:
        try:
            return listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in ACCEPT_SKIP:
                continue
            _log.error("accept failed: %s; not accepting for %g s", exc, ACCEPT_RETRY)
            raise AcceptPaused(exc.errno in _OUT_OF_DESCRIPTORS) from exc


def backlog_waiting(listeners: list[socket.socket]) -> bool:
    """Whether a connection waits in the backlog of one of these listening sockets (a
    zero-timeout poll: one syscall)."""
    poller = select.poll()
    for sock in listeners:
        if sock.fileno() >= 0:  # (closed as the worker stops)
            poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
SD_LISTEN_FDS_START = 3


class Address(NamedTuple):
    """A parsed bind address (a NamedTuple, not a dataclass: see tiamat.settings.Setting)."""

    family: int
    #: (host, port) for TCP, the path for unix sockets, the fd number for ``fd://``
    target: tuple[str, int] | str | int
    text: str

    @property
    def is_unix(self) -> bool:
        return self.family == socket.AF_UNIX


def parse_address(text: str, default_port: int = 8000) -> Address:
    """Parse ``HOST:PORT``, ``:PORT``, ``[V6]:PORT``, ``HOST``, ``unix:PATH`` or ``fd://N``."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty address")
    if raw.startswith("unix:"):
        path = raw[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"{text!r}: unix socket path is empty")
        return Address(socket.AF_UNIX, path, raw)
    if raw.startswith("fd://"):
        number = raw[5:]
        if not number.isdigit():
            raise ValueError(f"{text!r}: fd:// needs a file descriptor number")
        return Address(-1, int(number), raw)
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else str(default_port)
        family = socket.AF_INET6
    elif raw.count(":") > 1:
        raise ValueError(f"{text!r}: IPv6 addresses need brackets, as [::1]:8000")
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            host, port_text = raw, str(default_port)
        host = host or "0.0.0.0"
        family = socket.AF_INET
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    if host == "localhost":
        host = "127.0.0.1"
    return Address(family, (host, int(port_text)), raw)


def describe(sock: socket.socket) -> str:
    """How a listening socket is shown in logs: ``http://127.0.0.1:8000`` or ``unix:/path``."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _remove_stale_unix_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens there: a leftover from a crashed server
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


def bind_socket(address: Address, backlog: int, reuse_port: bool = False) -> socket.socket:
    """Create, bind and listen on one address; raise OSError with a readable message."""
    if address.family == -1:
        sock = socket.socket(fileno=int(address.target))  # type: ignore[arg-type]
        sock.listen(backlog)
        return sock
    if address.is_unix:
        _remove_stale_unix_socket(str(address.target))
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        if not address.is_unix:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address.target)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def inherited_sockets(environ: Mapping[str, str]) -> list[socket.socket]:
    """Listening sockets handed over by a previous master (USR2) or by systemd."""
    fds: list[int] = []
    if environ.get(INHERIT_ENV):
        fds = [int(fd) for fd in environ[INHERIT_ENV].split(",") if fd.strip().isdigit()]
    elif environ.get("LISTEN_FDS", "").isdigit() and environ.get("LISTEN_PID") == str(os.getpid()):
        count = int(environ["LISTEN_FDS"])
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    return [socket.socket(fileno=fd) for fd in fds]


def create_listeners(addresses: list[str], backlog: int, reuse_port: bool = False,
                     environ: Mapping[str, str] | None = None,
                     explicit: bool = True) -> list[socket.socket]:
    """Bind every address, reusing inherited sockets whose address matches.

    Under systemd socket activation with no bind configured (``explicit`` False), the
    sockets systemd passed are the whole set: the default address is not bound as well.
    """
    environ = os.environ if environ is None else environ
    inherited = inherited_sockets(environ)
    from_systemd = bool(inherited) and not environ.get(INHERIT_ENV)
    if from_systemd and not explicit:
        listeners = inherited
    else:
        listeners = []
        for text in addresses:
            address = parse_address(text)
            match = next((s for s in inherited if _same_address(s, address)), None)
            if match is not None:
                inherited.remove(match)
                listeners.append(match)
                continue
            try:
                listeners.append(bind_socket(address, backlog, reuse_port))
            except OSError as exc:
                for sock in listeners:
                    sock.close()
                raise OSError(exc.errno, f"cannot listen on {text}: {exc.strerror or exc}") from None
        for sock in inherited:  # handed over but no longer configured
            if from_systemd:
                listeners.append(sock)
            else:
                sock.close()
    for sock in listeners:
        sock.set_inheritable(True)
    return listeners


def _same_address(sock: socket.socket, address: Address) -> bool:
    """Does an inherited socket serve this address?  Port 0 matches any port on the host."""
    try:
        if address.family == -1:
            return sock.fileno() == address.target
        if sock.family != address.family:
            return False
        if address.is_unix:
            return sock.getsockname() == address.target
        host, port = address.target  # type: ignore[misc]
        bound_host, bound_port = sock.getsockname()[:2]
        return (port == 0 or bound_port == port) and _host_matches(bound_host, host)
    except OSError:
        return False


def _host_matches(bound: str, wanted: str) -> bool:
    if bound == wanted:
        return True
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in wanted else socket.AF_INET, wanted) == \
            socket.inet_pton(socket.AF_INET6 if ":" in bound else socket.AF_INET, bound)
    except OSError:
        return False
