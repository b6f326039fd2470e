"""systemd glue: ``sd_notify`` state messages and socket-activation hygiene.

Both are optional and cost nothing outside systemd: without ``NOTIFY_SOCKET`` every
:func:`notify` is a no-op.  Socket activation itself (``LISTEN_FDS``/``LISTEN_PID``) is read by
:func:`tiamat.sockets.inherited_sockets`; :func:`forget_activation_env` then removes the
variables so that neither workers nor a re-executed master mistake them for their own.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket).  No libsystemd needed.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("tiamat.error")

ACTIVATION_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def notify(*lines: str) -> bool:
    """Send ``lines`` (``READY=1`` ...) to systemd; False when not under systemd or on error."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
        return True
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", address, exc)
        return False


def ready(main_pid: int) -> bool:
    """The server answers: ``READY=1`` (with ``MAINPID``, which changes after a USR2 upgrade)."""
    return notify("READY=1", f"MAINPID={main_pid}", "STATUS=serving")


def reloading() -> bool:
    """A HUP started: ``RELOADING=1`` (``MONOTONIC_USEC`` as Type=notify-reload expects)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  "STATUS=reloading")


def reloaded() -> bool:
    return notify("READY=1", "STATUS=serving")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping")


def forget_activation_env() -> None:
    """Drop LISTEN_* once the sockets are taken (sd_listen_fds' ``unset_environment``)."""
    for name in ACTIVATION_VARS:
        os.environ.pop(name, None)
